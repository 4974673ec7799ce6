//! What a message submission agent adds to a user's message (RFC 6409 § 8): a `Message-ID`
//! and a `Date` when the client sent none. Sealing for a peer site binds both to the
//! ciphertext, and the receiving site recognises a repeated delivery by the Message-ID, so every
//! message must leave with one.

use crate::dsn::{header_block, rfc5322_date, unix_now};

/// The message with `Message-ID` (`<random@domain>`) and `Date` (now) prepended where its
/// header block has none. Anything else is left byte for byte as it was.
pub fn complete_headers(message: &[u8], domain: &str) -> Result<Option<Vec<u8>>, getrandom::Error> {
    let header = header_block(message);
    let has = |name: &str| {
        header.split(|b| *b == b'\n').any(|line| {
            line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                && line[name.len()] == b':'
        })
    };
    let mut added = Vec::new();
    if !has("Message-ID") {
        let mut token = [0u8; 16];
        getrandom::fill(&mut token)?;
        added.extend_from_slice(format!("Message-ID: <{}@{domain}>\r\n", hex::encode(token)).as_bytes());
    }
    if !has("Date") {
        added.extend_from_slice(format!("Date: {}\r\n", rfc5322_date(unix_now())).as_bytes());
    }
    if added.is_empty() {
        return Ok(None);
    }
    added.extend_from_slice(message);
    Ok(Some(added))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_message_is_left_alone() {
        let m = b"From: a@a.test\r\nmessage-id: <1@a.test>\r\nDATE: Wed, 25 Nov 2026 12:00:00 +0000\r\n\r\nbody\r\n";
        assert_eq!(complete_headers(m, "a.test").unwrap(), None);
    }

    #[test]
    fn missing_message_id_and_date_are_added_before_the_original_bytes() {
        let m = b"From: a@a.test\r\nSubject: x\r\n\r\nMessage-ID: <in-body@x>\r\nDate: not a header\r\n";
        let out = complete_headers(m, "a.test").unwrap().unwrap();
        let text = String::from_utf8(out).unwrap();
        let (added, rest) = text.split_at(text.find("From:").unwrap());
        assert!(rest.as_bytes() == m, "the original follows unchanged");
        let mut lines = added.lines();
        let id = lines.next().unwrap();
        assert!(id.starts_with("Message-ID: <") && id.ends_with("@a.test>"), "{id}");
        assert_eq!(id.len(), "Message-ID: <@a.test>".len() + 32);
        assert!(lines.next().unwrap().starts_with("Date: "), "{added}");
        let again = complete_headers(m, "a.test").unwrap().unwrap();
        assert_ne!(&again[..50], &text.as_bytes()[..50], "each Message-ID is new");
    }

    #[test]
    fn a_header_named_like_a_prefix_does_not_count() {
        let m = b"Message-IDs: no\r\nDated: no\r\n\r\n";
        let out = complete_headers(m, "a.test").unwrap().unwrap();
        assert!(out.starts_with(b"Message-ID: <"));
    }
}
