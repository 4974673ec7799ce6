//! POP3 command lines (RFC 1939 § 3, RFC 2449, RFC 2595, RFC 5034): parsing only.

use zeroize::Zeroizing;

/// Longest command line a client may send, CRLF included (RFC 2449 § 4: 255 octets).
pub const MAX_COMMAND_LINE: usize = 255;

/// Longest line accepted at all: a SASL response (base64 of authorisation id, user and
/// password) may exceed a command's 255 octets (RFC 5034 § 4 lets it be longer).
pub const MAX_LINE: usize = 2048;

/// One client command, parsed. Its `Debug` form hides passwords and SASL responses.
#[derive(PartialEq, Eq)]
pub enum Command {
    /// `CAPA` (RFC 2449).
    Capa,
    /// `STLS` (RFC 2595).
    Stls,
    /// `USER name`.
    User(String),
    /// `PASS password` (the rest of the line: passwords may contain spaces).
    Pass(Zeroizing<String>),
    /// `AUTH mechanism [initial-response]` (RFC 5034); `AUTH` alone lists mechanisms.
    Auth {
        /// The SASL mechanism, upper-cased; `None` for the bare `AUTH` listing.
        mechanism: Option<String>,
        /// The initial response, base64 or `=` for empty.
        initial: Option<Zeroizing<String>>,
    },
    /// `APOP name digest`: recognised so it gets a precise refusal (no shared secrets here).
    Apop,
    /// `STAT`.
    Stat,
    /// `LIST [msg]`.
    List(Option<u32>),
    /// `UIDL [msg]`.
    Uidl(Option<u32>),
    /// `RETR msg`.
    Retr(u32),
    /// `TOP msg n`.
    Top(u32, u32),
    /// `DELE msg`.
    Dele(u32),
    /// `RSET`.
    Rset,
    /// `NOOP`.
    Noop,
    /// `QUIT`.
    Quit,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Pass(_) => f.write_str("Pass(<hidden>)"),
            Command::Auth { mechanism, initial } => f
                .debug_struct("Auth")
                .field("mechanism", mechanism)
                .field("initial", &initial.as_ref().map(|_| "<hidden>"))
                .finish(),
            Command::User(u) => f.debug_tuple("User").field(u).finish(),
            Command::List(n) => f.debug_tuple("List").field(n).finish(),
            Command::Uidl(n) => f.debug_tuple("Uidl").field(n).finish(),
            Command::Retr(n) => f.debug_tuple("Retr").field(n).finish(),
            Command::Dele(n) => f.debug_tuple("Dele").field(n).finish(),
            Command::Top(n, l) => f.debug_tuple("Top").field(n).field(l).finish(),
            other => f.write_str(other.keyword()),
        }
    }
}

/// Why a command line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The line is longer than [`MAX_COMMAND_LINE`].
    #[error("command line too long (at most {MAX_COMMAND_LINE} octets)")]
    TooLong,
    /// Not a POP3 command this server knows.
    #[error("unknown command")]
    Unknown,
    /// A known command with missing, extra or malformed arguments.
    #[error("{command}: {reason}")]
    BadArguments {
        /// The command.
        command: &'static str,
        /// What is wrong, e.g. `expected a message number`.
        reason: &'static str,
    },
    /// The line is not text (a NUL byte, or not UTF-8).
    #[error("command line is not text")]
    NotText,
}

impl Command {
    /// The keyword, for logs (never the arguments: they may hold a password).
    pub fn keyword(&self) -> &'static str {
        match self {
            Command::Capa => "CAPA",
            Command::Stls => "STLS",
            Command::User(_) => "USER",
            Command::Pass(_) => "PASS",
            Command::Auth { .. } => "AUTH",
            Command::Apop => "APOP",
            Command::Stat => "STAT",
            Command::List(_) => "LIST",
            Command::Uidl(_) => "UIDL",
            Command::Retr(_) => "RETR",
            Command::Top(..) => "TOP",
            Command::Dele(_) => "DELE",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
        }
    }

    /// Parses one line, without its CRLF (a bare LF ending is tolerated by the reader).
    pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
        // +2: the CRLF the reader removed counts against the limit.
        if line.len() + 2 > MAX_COMMAND_LINE {
            return Err(CommandError::TooLong);
        }
        if line.contains(&0) {
            return Err(CommandError::NotText);
        }
        let text = std::str::from_utf8(line).map_err(|_| CommandError::NotText)?;
        let (keyword, rest) = match text.split_once(' ') {
            Some((k, r)) => (k, Some(r)),
            None => (text, None),
        };
        let keyword = keyword.to_ascii_uppercase();
        let bad =
            |command: &'static str, reason: &'static str| CommandError::BadArguments { command, reason };
        let args: Vec<&str> =
            rest.map(|r| r.split(' ').filter(|a| !a.is_empty()).collect()).unwrap_or_default();
        let none = |command: &'static str, c: Command| {
            if args.is_empty() { Ok(c) } else { Err(bad(command, "takes no arguments")) }
        };
        match keyword.as_str() {
            "CAPA" => none("CAPA", Command::Capa),
            "STLS" => none("STLS", Command::Stls),
            "STAT" => none("STAT", Command::Stat),
            "RSET" => none("RSET", Command::Rset),
            "NOOP" => none("NOOP", Command::Noop),
            "QUIT" => none("QUIT", Command::Quit),
            "USER" => match args.as_slice() {
                [name] => Ok(Command::User((*name).to_owned())),
                _ => Err(bad("USER", "expected one mailbox name")),
            },
            // The password is everything after the first space (RFC 1939 allows spaces in it).
            "PASS" => match rest {
                Some(p) if !p.is_empty() => Ok(Command::Pass(Zeroizing::new(p.to_owned()))),
                _ => Err(bad("PASS", "expected a password")),
            },
            "AUTH" => match args.as_slice() {
                [] => Ok(Command::Auth { mechanism: None, initial: None }),
                [m] => Ok(Command::Auth { mechanism: Some(m.to_ascii_uppercase()), initial: None }),
                [m, i] => Ok(Command::Auth {
                    mechanism: Some(m.to_ascii_uppercase()),
                    initial: Some(Zeroizing::new((*i).to_owned())),
                }),
                _ => Err(bad("AUTH", "expected a mechanism and at most an initial response")),
            },
            "APOP" => Ok(Command::Apop),
            "LIST" => optional_number("LIST", &args).map(Command::List),
            "UIDL" => optional_number("UIDL", &args).map(Command::Uidl),
            "RETR" => match args.as_slice() {
                [n] => Ok(Command::Retr(message_number("RETR", n)?)),
                _ => Err(bad("RETR", "expected a message number")),
            },
            "DELE" => match args.as_slice() {
                [n] => Ok(Command::Dele(message_number("DELE", n)?)),
                _ => Err(bad("DELE", "expected a message number")),
            },
            "TOP" => match args.as_slice() {
                [n, lines] => Ok(Command::Top(
                    message_number("TOP", n)?,
                    number(lines).ok_or(bad("TOP", "expected a non-negative number of lines"))?,
                )),
                _ => Err(bad("TOP", "expected a message number and a number of lines")),
            },
            _ => Err(CommandError::Unknown),
        }
    }
}

fn number(s: &str) -> Option<u32> {
    // Digits only: `+1`, `-1` and `0x1` are not numbers in POP3.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn message_number(command: &'static str, s: &str) -> Result<u32, CommandError> {
    match number(s) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(CommandError::BadArguments { command, reason: "expected a message number" }),
    }
}

fn optional_number(command: &'static str, args: &[&str]) -> Result<Option<u32>, CommandError> {
    match args {
        [] => Ok(None),
        [n] => message_number(command, n).map(Some),
        _ => Err(CommandError::BadArguments { command, reason: "expected at most one message number" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively_with_their_arguments() {
        assert_eq!(Command::parse(b"capa"), Ok(Command::Capa));
        assert_eq!(Command::parse(b"LIST"), Ok(Command::List(None)));
        assert_eq!(Command::parse(b"list 3"), Ok(Command::List(Some(3))));
        assert_eq!(Command::parse(b"TOP 2 0"), Ok(Command::Top(2, 0)));
        assert_eq!(Command::parse(b"USER alice@a.example"), Ok(Command::User("alice@a.example".into())));
        assert_eq!(
            Command::parse(b"PASS correct horse "),
            Ok(Command::Pass(Zeroizing::new("correct horse ".into())))
        );
        assert_eq!(
            Command::parse(b"auth plain AGEAYg=="),
            Ok(Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial: Some(Zeroizing::new("AGEAYg==".into()))
            })
        );
    }

    #[test]
    fn malformed_commands_are_refused_with_a_reason() {
        assert_eq!(Command::parse(b"XYZZY"), Err(CommandError::Unknown));
        assert_eq!(Command::parse(b""), Err(CommandError::Unknown));
        for bad in [&b"RETR"[..], b"RETR 0", b"RETR -1", b"RETR +1", b"RETR 99999999999", b"DELE a", b"TOP 1"]
        {
            assert!(matches!(Command::parse(bad), Err(CommandError::BadArguments { .. })), "{bad:?}");
        }
        assert!(matches!(Command::parse(b"STAT 1"), Err(CommandError::BadArguments { .. })));
        assert_eq!(Command::parse(b"NOOP\0"), Err(CommandError::NotText));
        assert_eq!(Command::parse(&[b'N', 0xff]), Err(CommandError::NotText));
        assert_eq!(Command::parse(&[b'A'; 254]), Err(CommandError::TooLong));
    }

    #[test]
    fn the_keyword_never_carries_the_password() {
        let c = Command::parse(b"PASS s3cret").unwrap();
        assert_eq!(c.keyword(), "PASS");
        assert!(!format!("{c:?}").contains("s3cret"));
        let a = Command::parse(b"AUTH PLAIN czNjcmV0").unwrap();
        assert!(!format!("{a:?}").contains("czNjcmV0"));
    }
}
