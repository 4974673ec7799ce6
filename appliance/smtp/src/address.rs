//! RFC 5321 § 4.1.2 paths: `<local@domain>`, the null reverse-path `<>`, source routes
//! (`<@relay:local@domain>`, accepted and ignored per § C), quoted local parts, and address
//! literals (`[192.0.2.1]`, `[IPv6:...]`). Non-ASCII is accepted only when the transaction uses
//! SMTPUTF8 (RFC 6531).

use std::fmt;

/// Longest local part (RFC 5321 § 4.5.3.1.1).
pub const MAX_LOCAL_PART: usize = 64;
/// Longest domain (RFC 5321 § 4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Longest path including the angle brackets (RFC 5321 § 4.5.3.1.3).
pub const MAX_PATH: usize = 256;

/// A mailbox: `local@domain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    local: String,
    domain: String,
}

impl Address {
    /// Parses `local@domain` (no angle brackets). `utf8` allows non-ASCII (SMTPUTF8).
    pub fn parse(mailbox: &str, utf8: bool) -> Result<Self, AddressError> {
        parse_mailbox(mailbox, utf8)
    }

    /// The local part as written on the wire (a quoted local part keeps its quotes).
    pub fn local_part(&self) -> &str {
        &self.local
    }

    /// The domain, lower-cased (domains are case-insensitive; local parts are not).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// True when any part is non-ASCII (needs SMTPUTF8 to be relayed).
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The sender of a transaction: a mailbox, or `<>` for bounces (RFC 5321 § 4.5.5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReversePath {
    /// `<>`: a delivery status notification; never bounced.
    Null,
    /// `<local@domain>`.
    Mailbox(Address),
}

impl ReversePath {
    /// The mailbox, if not null.
    pub fn address(&self) -> Option<&Address> {
        match self {
            Self::Null => None,
            Self::Mailbox(a) => Some(a),
        }
    }
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => f.write_str("<>"),
            Self::Mailbox(a) => write!(f, "<{a}>"),
        }
    }
}

/// Why a path or mailbox was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The path is not enclosed in `<` and `>`.
    #[error("the address must be enclosed in angle brackets, e.g. <user@example.com>")]
    MissingAngleBrackets,
    /// The null path `<>` was given where a mailbox is required (a recipient).
    #[error("an empty address <> is not allowed here")]
    NullNotAllowed,
    /// The path is longer than RFC 5321 allows.
    #[error("the address is longer than {MAX_PATH} characters")]
    PathTooLong,
    /// No `@domain`.
    #[error("the address has no @domain part")]
    MissingDomain,
    /// Nothing before the `@`.
    #[error("the address has an empty local part")]
    EmptyLocalPart,
    /// The local part is longer than 64 octets.
    #[error("the local part is longer than {MAX_LOCAL_PART} characters")]
    LocalPartTooLong,
    /// The local part is neither a valid dot-string nor a valid quoted string.
    #[error("the local part contains characters that are not allowed unquoted")]
    InvalidLocalPart,
    /// The domain is longer than 255 octets.
    #[error("the domain is longer than {MAX_DOMAIN} characters")]
    DomainTooLong,
    /// The domain is not a valid host name or address literal.
    #[error("the domain is not a valid host name or address literal")]
    InvalidDomain,
    /// The source route before `:` is malformed.
    #[error("the source route is malformed")]
    InvalidSourceRoute,
    /// Non-ASCII characters without SMTPUTF8.
    #[error("non-ASCII characters in an address require the SMTPUTF8 parameter")]
    NonAscii,
}

/// Parses a reverse-path (`<>` or `<mailbox>`), as in `MAIL FROM:`.
pub fn parse_reverse_path(path: &str, utf8: bool) -> Result<ReversePath, AddressError> {
    let inner = strip_brackets(path)?;
    if inner.is_empty() {
        return Ok(ReversePath::Null);
    }
    parse_routed_mailbox(inner, utf8).map(ReversePath::Mailbox)
}

/// Parses a forward-path (`<mailbox>`), as in `RCPT TO:`. `<postmaster>` without a domain
/// (RFC 5321 § 4.1.1.3) becomes `postmaster@<local_domain>`.
pub fn parse_forward_path(path: &str, utf8: bool, local_domain: &str) -> Result<Address, AddressError> {
    let inner = strip_brackets(path)?;
    if inner.is_empty() {
        return Err(AddressError::NullNotAllowed);
    }
    if inner.eq_ignore_ascii_case("postmaster") {
        return Ok(Address { local: "postmaster".into(), domain: local_domain.to_ascii_lowercase() });
    }
    parse_routed_mailbox(inner, utf8)
}

fn strip_brackets(path: &str) -> Result<&str, AddressError> {
    if path.len() > MAX_PATH {
        return Err(AddressError::PathTooLong);
    }
    path.strip_prefix('<').and_then(|p| p.strip_suffix('>')).ok_or(AddressError::MissingAngleBrackets)
}

fn parse_routed_mailbox(inner: &str, utf8: bool) -> Result<Address, AddressError> {
    // A source route `@a,@b:` precedes the mailbox; RFC 5321 § C says to ignore it. A quoted
    // local part may itself contain ':' so only a leading '@' starts a route.
    let mailbox = if inner.starts_with('@') {
        let (route, mailbox) = inner.split_once(':').ok_or(AddressError::InvalidSourceRoute)?;
        for hop in route.split(',') {
            let domain = hop.strip_prefix('@').ok_or(AddressError::InvalidSourceRoute)?;
            if !is_domain(domain, true) {
                return Err(AddressError::InvalidSourceRoute);
            }
        }
        mailbox
    } else {
        inner
    };
    parse_mailbox(mailbox, utf8)
}

fn parse_mailbox(mailbox: &str, utf8: bool) -> Result<Address, AddressError> {
    if !utf8 && !mailbox.is_ascii() {
        return Err(AddressError::NonAscii);
    }
    let at = if mailbox.starts_with('"') {
        // The closing quote is the first unescaped '"' after the opening one.
        let bytes = mailbox.as_bytes();
        let mut i = 1;
        let mut close = None;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => {
                    close = Some(i);
                    break;
                }
                _ => i += 1,
            }
        }
        let close = close.ok_or(AddressError::InvalidLocalPart)?;
        match bytes.get(close + 1) {
            Some(b'@') => close + 1,
            _ => return Err(AddressError::MissingDomain),
        }
    } else {
        mailbox.rfind('@').ok_or(AddressError::MissingDomain)?
    };
    let (local, domain) = (&mailbox[..at], &mailbox[at + 1..]);
    if local.is_empty() {
        return Err(AddressError::EmptyLocalPart);
    }
    if local.len() > MAX_LOCAL_PART {
        return Err(AddressError::LocalPartTooLong);
    }
    if !(is_dot_string(local) || is_quoted_string(local)) {
        return Err(AddressError::InvalidLocalPart);
    }
    if domain.is_empty() {
        return Err(AddressError::MissingDomain);
    }
    if domain.len() > MAX_DOMAIN {
        return Err(AddressError::DomainTooLong);
    }
    if !is_domain(domain, false) {
        return Err(AddressError::InvalidDomain);
    }
    Ok(Address { local: local.to_owned(), domain: domain.to_lowercase() })
}

/// RFC 5321 atext, plus any non-ASCII character (RFC 6531 extends atext with UTF8-non-ascii).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn is_dot_string(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

fn is_quoted_string(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return false;
    };
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            // quoted-pairSMTP: backslash followed by any printable ASCII.
            '\\' => match chars.next() {
                Some(' '..='~') => {}
                _ => return false,
            },
            '"' => return false,
            // qtextSMTP: printable ASCII except '"' and '\', or non-ASCII (SMTPUTF8).
            ' '..='~' => {}
            c if !c.is_ascii() => {}
            _ => return false,
        }
    }
    true
}

fn is_domain(domain: &str, in_route: bool) -> bool {
    if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        return !in_route && is_address_literal(literal);
    }
    domain.split('.').all(|label| {
        let b = label.as_bytes();
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
            && b.first() != Some(&b'-')
            && b.last() != Some(&b'-')
    })
}

fn is_address_literal(literal: &str) -> bool {
    if let Some(v6) = literal.get(..5).filter(|p| p.eq_ignore_ascii_case("IPv6:")).map(|_| &literal[5..]) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    literal.parse::<std::net::Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(path: &str) -> Result<Address, AddressError> {
        parse_forward_path(path, false, "mail.example")
    }

    #[test]
    fn accepts_ordinary_quoted_routed_and_literal_addresses() {
        let a = mailbox("<Alice.Smith+tag@Example.COM>").unwrap();
        assert_eq!((a.local_part(), a.domain()), ("Alice.Smith+tag", "example.com"));
        let a = mailbox("<\"john doe\\\"@x\"@example.com>").unwrap();
        assert_eq!(a.local_part(), "\"john doe\\\"@x\"");
        let a = mailbox("<@relay.one,@relay.two:bob@example.org>").unwrap();
        assert_eq!(a.to_string(), "bob@example.org");
        assert_eq!(mailbox("<u@[192.0.2.1]>").unwrap().domain(), "[192.0.2.1]");
        assert_eq!(mailbox("<u@[IPv6:2001:db8::1]>").unwrap().domain(), "[ipv6:2001:db8::1]");
        assert_eq!(mailbox("<Postmaster>").unwrap().to_string(), "postmaster@mail.example");
        assert_eq!(parse_reverse_path("<>", false), Ok(ReversePath::Null));
    }

    #[test]
    fn refuses_malformed_paths_with_the_specific_reason() {
        assert_eq!(mailbox("bob@example.org"), Err(AddressError::MissingAngleBrackets));
        assert_eq!(mailbox("<>"), Err(AddressError::NullNotAllowed));
        assert_eq!(mailbox("<bob>"), Err(AddressError::MissingDomain));
        assert_eq!(mailbox("<@example.org>"), Err(AddressError::InvalidSourceRoute));
        assert_eq!(mailbox("<bob@>"), Err(AddressError::MissingDomain));
        assert_eq!(mailbox("<bo b@example.org>"), Err(AddressError::InvalidLocalPart));
        assert_eq!(mailbox("<a..b@example.org>"), Err(AddressError::InvalidLocalPart));
        assert_eq!(mailbox("<bob@exa_mple.org>"), Err(AddressError::InvalidDomain));
        assert_eq!(mailbox("<bob@-example.org>"), Err(AddressError::InvalidDomain));
        assert_eq!(mailbox("<bob@[300.1.1.1]>"), Err(AddressError::InvalidDomain));
        assert_eq!(
            mailbox(&format!("<{}@example.org>", "a".repeat(65))),
            Err(AddressError::LocalPartTooLong)
        );
        assert_eq!(mailbox(&format!("<a@{}>", "b".repeat(260))), Err(AddressError::PathTooLong));
        assert_eq!(mailbox("<jörg@example.org>"), Err(AddressError::NonAscii));
        assert!(parse_forward_path("<jörg@exämple.org>", true, "x").is_ok());
    }
}
