//! SMTP replies: the three-digit code, the RFC 3463 enhanced status code, and the text.
//!
//! The server builds [`Reply`] values and serialises them; the client parses them back with
//! [`ReplyParser`], which is sans-I/O (feed bytes, take complete replies).

use std::fmt;

/// An RFC 3463 enhanced status code (`class.subject.detail`, e.g. `5.7.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    /// 2 (success), 4 (persistent transient failure) or 5 (permanent failure).
    pub class: u8,
    /// The subject (e.g. 1 = addressing, 3 = mail system, 5 = protocol, 7 = security).
    pub subject: u16,
    /// The detail within the subject.
    pub detail: u16,
}

impl EnhancedCode {
    /// `class.subject.detail`.
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        Self { class, subject, detail }
    }

    /// Parses `x.y.z` at the start of a reply text; returns the code and the rest of the text.
    fn parse_prefix(text: &str) -> Option<(Self, &str)> {
        let (token, rest) = match text.split_once(' ') {
            Some((token, rest)) => (token, rest),
            None => (text, ""),
        };
        let mut parts = token.split('.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) || subject > 999 || detail > 999 {
            return None;
        }
        Some((Self { class, subject, detail }, rest))
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// How a reply code is to be treated by a sender (RFC 5321 § 4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyClass {
    /// 2xx: done.
    Positive,
    /// 3xx: go on (334 AUTH challenge, 354 send data).
    Intermediate,
    /// 4xx: failed for now, try again later.
    TransientFailure,
    /// 5xx: failed for good, bounce.
    PermanentFailure,
}

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code (200..=599).
    pub code: u16,
    /// The enhanced status code, if the reply carries one.
    pub enhanced: Option<EnhancedCode>,
    /// The text lines (without the code and enhanced code); at least one.
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: EnhancedCode, text: impl Into<String>) -> Self {
        Self { code, enhanced: Some(enhanced), lines: vec![text.into()] }
    }

    /// A one-line reply without an enhanced code (greeting, EHLO/HELO, 334, 354: RFC 2034 § 4).
    pub fn plain(code: u16, text: impl Into<String>) -> Self {
        Self { code, enhanced: None, lines: vec![text.into()] }
    }

    /// The reply's class from its first digit.
    pub fn class(&self) -> ReplyClass {
        match self.code / 100 {
            2 => ReplyClass::Positive,
            3 => ReplyClass::Intermediate,
            4 => ReplyClass::TransientFailure,
            _ => ReplyClass::PermanentFailure,
        }
    }

    /// True for 2xx.
    pub fn is_positive(&self) -> bool {
        self.class() == ReplyClass::Positive
    }

    /// All text lines joined with a space (for logs and bounce messages).
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// Appends the wire form (`code[-| ][enhanced ]text CRLF` per line) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        let fallback = [String::new()];
        let lines: &[String] = if self.lines.is_empty() { &fallback } else { &self.lines };
        for (i, line) in lines.iter().enumerate() {
            let sep = if i == last || lines.len() == 1 { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{sep}", self.code).as_bytes());
            if let Some(enhanced) = self.enhanced {
                out.extend_from_slice(format!("{enhanced} ").as_bytes());
            }
            // Replies carry only printable text: never let a value (a HELO name, an address)
            // break the line structure.
            out.extend(line.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(enhanced) = self.enhanced {
            write!(f, " {enhanced}")?;
        }
        write!(f, " {}", self.text())
    }
}

/// A server reply could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The line does not start with a three-digit code followed by space, dash or end of line.
    #[error("malformed SMTP reply line: {line:?}")]
    Malformed {
        /// The offending line (truncated to 100 characters).
        line: String,
    },
    /// A continuation line carried a different code than the first line.
    #[error("multi-line SMTP reply changed its code from {first} to {later}")]
    CodeChanged {
        /// The first line's code.
        first: u16,
        /// The later line's code.
        later: u16,
    },
    /// A reply line exceeded the length limit.
    #[error("SMTP reply line longer than {limit} bytes")]
    LineTooLong {
        /// The limit.
        limit: usize,
    },
    /// A reply had too many lines.
    #[error("SMTP reply with more than {limit} lines")]
    TooManyLines {
        /// The limit.
        limit: usize,
    },
}

/// Longest reply line accepted (RFC 5321 § 4.5.3.1.5 says 512; servers exceed it in practice).
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one multi-line reply accepted.
pub const MAX_REPLY_LINES: usize = 256;

/// A sans-I/O parser of server replies: feed received bytes, take complete replies.
#[derive(Debug, Default)]
pub struct ReplyParser {
    buffer: Vec<u8>,
    partial: Option<Reply>,
}

impl ReplyParser {
    /// An empty parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// True when bytes of an unfinished reply are buffered.
    pub fn has_partial(&self) -> bool {
        !self.buffer.is_empty() || self.partial.is_some()
    }

    /// The next complete reply, `Ok(None)` when more bytes are needed.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, ReplyError> {
        loop {
            let Some(end) = self.buffer.iter().position(|&b| b == b'\n') else {
                if self.buffer.len() > MAX_REPLY_LINE {
                    return Err(ReplyError::LineTooLong { limit: MAX_REPLY_LINE });
                }
                return Ok(None);
            };
            if end > MAX_REPLY_LINE {
                return Err(ReplyError::LineTooLong { limit: MAX_REPLY_LINE });
            }
            let raw: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']);
            let malformed = || ReplyError::Malformed { line: line.chars().take(100).collect() };
            let bytes = line.as_bytes();
            if bytes.len() < 3
                || !bytes[..3].iter().all(u8::is_ascii_digit)
                || !(b'2'..=b'5').contains(&bytes[0])
            {
                return Err(malformed());
            }
            let code: u16 = line[..3].parse().map_err(|_| malformed())?;
            let (last, text) = match bytes.get(3) {
                None => (true, ""),
                Some(b' ') => (true, &line[4..]),
                Some(b'-') => (false, &line[4..]),
                Some(_) => return Err(malformed()),
            };
            let (enhanced, text) = match EnhancedCode::parse_prefix(text) {
                Some((enhanced, rest)) if u16::from(enhanced.class) == code / 100 => (Some(enhanced), rest),
                _ => (None, text),
            };
            let reply = self.partial.get_or_insert_with(|| Reply { code, enhanced, lines: Vec::new() });
            if reply.code != code {
                return Err(ReplyError::CodeChanged { first: reply.code, later: code });
            }
            if reply.lines.len() >= MAX_REPLY_LINES {
                return Err(ReplyError::TooManyLines { limit: MAX_REPLY_LINES });
            }
            reply.lines.push(text.to_owned());
            if last {
                return Ok(self.partial.take());
            }
        }
    }
}

/// Enhanced status codes used by the server (RFC 3463 and the RFCs of each extension).
pub(crate) mod codes {
    use super::EnhancedCode;

    pub const OK: EnhancedCode = EnhancedCode::new(2, 0, 0);
    pub const SENDER_OK: EnhancedCode = EnhancedCode::new(2, 1, 0);
    pub const RECIPIENT_OK: EnhancedCode = EnhancedCode::new(2, 1, 5);
    pub const VRFY: EnhancedCode = EnhancedCode::new(2, 5, 0);
    pub const AUTH_OK: EnhancedCode = EnhancedCode::new(2, 7, 0);
    pub const BAD_DESTINATION_SYNTAX: EnhancedCode = EnhancedCode::new(5, 1, 3);
    pub const BAD_SENDER_SYNTAX: EnhancedCode = EnhancedCode::new(5, 1, 7);
    pub const SIZE_EXCEEDED: EnhancedCode = EnhancedCode::new(5, 3, 4);
    pub const SHUTTING_DOWN: EnhancedCode = EnhancedCode::new(4, 3, 2);
    pub const TIMEOUT: EnhancedCode = EnhancedCode::new(4, 4, 2);
    pub const TOO_MANY_RECIPIENTS: EnhancedCode = EnhancedCode::new(4, 5, 3);
    pub const INVALID_COMMAND: EnhancedCode = EnhancedCode::new(5, 5, 1);
    pub const SYNTAX: EnhancedCode = EnhancedCode::new(5, 5, 2);
    pub const BAD_ARGUMENTS: EnhancedCode = EnhancedCode::new(5, 5, 4);
    pub const MEDIA: EnhancedCode = EnhancedCode::new(5, 6, 0);
    pub const NON_ASCII_ADDRESS: EnhancedCode = EnhancedCode::new(5, 6, 7);
    pub const SECURITY: EnhancedCode = EnhancedCode::new(5, 7, 0);
    pub const TEMP_SECURITY: EnhancedCode = EnhancedCode::new(4, 7, 0);
    pub const AUTH_FAILED: EnhancedCode = EnhancedCode::new(5, 7, 8);
    pub const ENCRYPTION_REQUIRED: EnhancedCode = EnhancedCode::new(5, 7, 11);
    pub const CANCELLED: EnhancedCode = EnhancedCode::new(5, 0, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_reply_serialises_with_dashes_and_parses_back() {
        let reply = Reply {
            code: 250,
            enhanced: Some(EnhancedCode::new(2, 0, 0)),
            lines: vec!["first".into(), "second".into(), "third".into()],
        };
        let wire = reply.to_bytes();
        assert_eq!(wire, b"250-2.0.0 first\r\n250-2.0.0 second\r\n250 2.0.0 third\r\n");
        let mut parser = ReplyParser::new();
        // Byte by byte: replies must survive any split.
        for b in &wire {
            parser.feed(std::slice::from_ref(b));
        }
        assert_eq!(parser.next_reply().unwrap(), Some(reply));
        assert_eq!(parser.next_reply().unwrap(), None);
    }

    #[test]
    fn parser_rejects_garbage_and_code_changes() {
        let mut parser = ReplyParser::new();
        parser.feed(b"hello\r\n");
        assert!(matches!(parser.next_reply(), Err(ReplyError::Malformed { .. })));
        let mut parser = ReplyParser::new();
        parser.feed(b"250-a\r\n251 b\r\n");
        assert_eq!(parser.next_reply(), Err(ReplyError::CodeChanged { first: 250, later: 251 }));
    }

    #[test]
    fn enhanced_code_is_only_taken_when_its_class_matches() {
        let mut parser = ReplyParser::new();
        parser.feed(b"550 5.7.1 Relaying denied\r\n220 2.0.0\r\n250 1.2.3 not a code\r\n");
        let r = parser.next_reply().unwrap().unwrap();
        assert_eq!(
            (r.code, r.enhanced, r.text().as_str()),
            (550, Some(EnhancedCode::new(5, 7, 1)), "Relaying denied")
        );
        let r = parser.next_reply().unwrap().unwrap();
        assert_eq!(r.code, 220);
        let r = parser.next_reply().unwrap().unwrap();
        assert_eq!((r.enhanced, r.text().as_str()), (None, "1.2.3 not a code"));
    }
}
