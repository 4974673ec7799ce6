//! A message on the POP3 wire (RFC 1939 § 3): CRLF lines, byte-stuffed, ended by `.` CRLF.
//!
//! The octet count POP3 announces (STAT, LIST, `RETR`'s `+OK n octets`) is that of the message
//! in canonical form: every line ended by CRLF, without the stuffing dots and without the
//! final `.` line. The store's size is the presented message's length, which is the same
//! number exactly when the presented message already is canonical (every line ends in CRLF,
//! as SMTP delivers it). [`render`] returns the canonical count it actually sent, so the
//! session can correct its listing for a message that was not (a bare LF, or no final CRLF).

use zeroize::Zeroizing;

/// A message (or its top) ready to send after the `+OK` line.
pub struct Rendered {
    /// The byte-stuffed lines, each ended by CRLF, then `.` CRLF. Wiped when dropped: it is
    /// the plaintext.
    pub wire: Zeroizing<Vec<u8>>,
    /// Octets of the whole message in canonical form (what LIST must say).
    pub canonical_size: u64,
}

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendered")
            .field("wire", &format_args!("<{} bytes>", self.wire.len()))
            .field("canonical_size", &self.canonical_size)
            .finish()
    }
}

/// Renders `message` for RETR (`top: None`) or for `TOP n` (`top: Some(n)`: the header, the
/// blank line and the first `n` body lines).
pub fn render(message: &[u8], top: Option<u32>) -> Rendered {
    let mut wire = Zeroizing::new(Vec::with_capacity(message.len() + message.len() / 64 + 8));
    let mut canonical_size = 0u64;
    let mut in_body = false;
    let mut body_lines_left = top.map(u64::from);
    for line in lines(message) {
        canonical_size += line.len() as u64 + 2;
        let sending = match (in_body, body_lines_left) {
            (false, _) | (true, None) => true,
            (true, Some(left)) => left > 0,
        };
        if sending {
            if in_body && let Some(left) = body_lines_left.as_mut() {
                *left -= 1;
            }
            if line.first() == Some(&b'.') {
                wire.push(b'.');
            }
            wire.extend_from_slice(line);
            wire.extend_from_slice(b"\r\n");
        }
        if !in_body && line.is_empty() {
            in_body = true;
        }
    }
    wire.extend_from_slice(b".\r\n");
    Rendered { wire, canonical_size }
}

/// The lines of `message` without their ending (CRLF or a bare LF). A last line without an
/// ending is still a line; an empty message has none.
fn lines(message: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = message.strip_suffix(b"\n").unwrap_or(message);
    let empty = message.is_empty();
    body.split(|b| *b == b'\n').filter(move |_| !empty).map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(m: &[u8], top: Option<u32>) -> String {
        String::from_utf8(render(m, top).wire.to_vec()).unwrap()
    }

    #[test]
    fn a_canonical_message_is_sent_byte_for_byte_with_stuffed_dots() {
        let m = b"Subject: x\r\n\r\n.hidden\r\n..two\r\nplain\r\n.\r\n";
        let r = render(m, None);
        assert_eq!(r.canonical_size, m.len() as u64, "the count is the message's own length");
        assert_eq!(
            String::from_utf8(r.wire.to_vec()).unwrap(),
            "Subject: x\r\n\r\n..hidden\r\n...two\r\nplain\r\n..\r\n.\r\n"
        );
    }

    #[test]
    fn bare_line_feeds_and_a_missing_final_crlf_are_canonicalised_and_counted() {
        let r = render(b"A: 1\n\nbody", None);
        assert_eq!(String::from_utf8(r.wire.to_vec()).unwrap(), "A: 1\r\n\r\nbody\r\n.\r\n");
        assert_eq!(r.canonical_size, 14);
        assert_eq!(render(b"", None).canonical_size, 0);
        assert_eq!(wire(b"", None), ".\r\n");
    }

    #[test]
    fn top_sends_the_header_the_blank_line_and_n_body_lines() {
        let m = b"A: 1\r\nB: 2\r\n\r\nl1\r\n.l2\r\nl3\r\n";
        assert_eq!(wire(m, Some(0)), "A: 1\r\nB: 2\r\n\r\n.\r\n");
        assert_eq!(wire(m, Some(2)), "A: 1\r\nB: 2\r\n\r\nl1\r\n..l2\r\n.\r\n");
        assert_eq!(wire(m, Some(99)), wire(m, None));
        // A message without a body: TOP is the whole message.
        assert_eq!(wire(b"A: 1\r\n", Some(0)), "A: 1\r\n.\r\n");
        assert_eq!(render(m, Some(0)).canonical_size, m.len() as u64, "the size is the whole message's");
    }
}
