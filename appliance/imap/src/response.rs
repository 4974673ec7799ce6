//! The sans-I/O protocol core, output side: IMAP strings and response lines.

use std::time::{SystemTime, UNIX_EPOCH};

use qutemail_store::{Flags, MessageMeta};

/// `"text"` when it can be quoted (7-bit, no CR/LF/NUL), else a literal `{n}\r\ntext`.
pub fn quoted_or_literal(b: &[u8]) -> String {
    if b.iter().all(|&c| c.is_ascii() && c != b'\r' && c != b'\n' && c != 0) {
        let mut s = String::with_capacity(b.len() + 2);
        s.push('"');
        for &c in b {
            if c == b'"' || c == b'\\' {
                s.push('\\');
            }
            s.push(char::from(c));
        }
        s.push('"');
        s
    } else {
        // Literals carry 8-bit text; a lossy conversion keeps the response a valid String.
        let text = String::from_utf8_lossy(b);
        format!("{{{}}}\r\n{text}", text.len())
    }
}

/// A string or NIL.
pub fn nstring(b: Option<&[u8]>) -> String {
    b.map_or_else(|| "NIL".into(), quoted_or_literal)
}

/// A mailbox name as an astring: quoted (names are validated printable by the store).
pub fn mailbox_name(name: &str) -> String {
    quoted_or_literal(name.as_bytes())
}

/// `(\Seen \Answered $Keyword)`.
pub fn flag_list(flags: Flags, keywords: &std::collections::BTreeSet<String>) -> String {
    let mut all: Vec<&str> = flags.names().collect();
    all.extend(keywords.iter().map(String::as_str));
    format!("({})", all.join(" "))
}

/// The flags of a message.
pub fn message_flags(meta: &MessageMeta) -> String {
    flag_list(meta.flags, &meta.keywords)
}

/// INTERNALDATE `"17-Jul-1996 02:44:25 +0000"` (always UTC).
pub fn internal_date(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let (y, m, d) = crate::parse::civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "\"{d:02}-{}-{y:04} {:02}:{:02}:{:02} +0000\"",
        crate::parse::month_name(m),
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Seconds since the epoch of a SystemTime (negative before 1970).
pub fn epoch_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Makes text safe for a response line (no CR/LF).
pub fn one_line(text: &str) -> String {
    text.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted_or_literal() {
        assert_eq!(quoted_or_literal(b"a \"b\"\\"), "\"a \\\"b\\\"\\\\\"");
        assert_eq!(quoted_or_literal("grüß".as_bytes()), "{6}\r\ngrüß");
        assert_eq!(nstring(None), "NIL");
        assert_eq!(internal_date(UNIX_EPOCH), "\"01-Jan-1970 00:00:00 +0000\"");
    }
}
