//! Sans-I/O pieces of the SMTP client: EHLO extension parsing, dot-stuffing, and the MAIL/RCPT
//! command lines. The tokio driver in [`crate::client`] sequences them.

use crate::address::{Address, ReversePath};
use crate::params::{DsnReturn, MailParams, RcptParams};
use crate::reply::Reply;

/// What a server announced in its EHLO reply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Extensions {
    /// The server's name (the first word of the first line).
    pub server_name: String,
    /// RFC 2920.
    pub pipelining: bool,
    /// RFC 3207.
    pub starttls: bool,
    /// RFC 1870: `SIZE` with its limit (0 or absent means no fixed limit).
    pub size: Option<u64>,
    /// RFC 6152.
    pub eight_bit_mime: bool,
    /// RFC 2034.
    pub enhanced_status_codes: bool,
    /// RFC 3461.
    pub dsn: bool,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 4954: the SASL mechanisms offered, upper-case.
    pub auth: Vec<String>,
}

impl Extensions {
    /// Parses a 250 EHLO reply.
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut ext = Self {
            server_name: reply
                .lines
                .first()
                .and_then(|l| l.split_whitespace().next())
                .unwrap_or_default()
                .to_owned(),
            ..Self::default()
        };
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else { continue };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => ext.pipelining = true,
                "STARTTLS" => ext.starttls = true,
                "SIZE" => ext.size = Some(words.next().and_then(|w| w.parse().ok()).unwrap_or(0)),
                "8BITMIME" => ext.eight_bit_mime = true,
                "ENHANCEDSTATUSCODES" => ext.enhanced_status_codes = true,
                "DSN" => ext.dsn = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "AUTH" => ext.auth.extend(words.map(str::to_ascii_uppercase)),
                _ => {}
            }
        }
        ext
    }

    /// True when the server offers this SASL mechanism.
    pub fn offers_auth(&self, mechanism: &str) -> bool {
        self.auth.iter().any(|m| m.eq_ignore_ascii_case(mechanism))
    }
}

/// Encodes RFC 3461 § 4 xtext: `+`, `=` and anything outside `!`..`~` as `+XX`.
pub fn encode_xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// `MAIL FROM:<from>` with the parameters the server announced: SIZE, BODY=8BITMIME (for
/// 8-bit content), SMTPUTF8 (for a non-ASCII sender), and RET/ENVID from `dsn` when it
/// offers DSN. CRLF-terminated.
pub fn mail_command(
    from: &ReversePath,
    size: usize,
    eight_bit: bool,
    dsn: &MailParams,
    ext: &Extensions,
) -> String {
    let mut command = format!("MAIL FROM:{from}");
    if ext.size.is_some() {
        command.push_str(&format!(" SIZE={size}"));
    }
    if eight_bit && ext.eight_bit_mime {
        command.push_str(" BODY=8BITMIME");
    }
    let utf8 = from.address().is_some_and(Address::is_utf8);
    if utf8 && ext.smtputf8 {
        command.push_str(" SMTPUTF8");
    }
    if ext.dsn {
        match dsn.ret {
            Some(DsnReturn::Full) => command.push_str(" RET=FULL"),
            Some(DsnReturn::Headers) => command.push_str(" RET=HDRS"),
            None => {}
        }
        if let Some(envid) = &dsn.envid {
            command.push_str(&format!(" ENVID={}", encode_xtext(envid)));
        }
    }
    command.push_str("\r\n");
    command
}

/// `RCPT TO:<to>` with NOTIFY and ORCPT when the server offers DSN. CRLF-terminated.
pub fn rcpt_command(to: &Address, params: &RcptParams, ext: &Extensions) -> String {
    let mut command = format!("RCPT TO:<{to}>");
    if ext.dsn {
        if let Some(notify) = params.notify {
            let words: Vec<&str> = if notify.never {
                vec!["NEVER"]
            } else {
                [(notify.success, "SUCCESS"), (notify.failure, "FAILURE"), (notify.delay, "DELAY")]
                    .into_iter()
                    .filter_map(|(on, word)| on.then_some(word))
                    .collect()
            };
            if !words.is_empty() {
                command.push_str(&format!(" NOTIFY={}", words.join(",")));
            }
        }
        if let Some(orcpt) = &params.orcpt {
            command.push_str(&format!(" ORCPT={};{}", orcpt.addr_type, encode_xtext(&orcpt.address)));
        }
    }
    command.push_str("\r\n");
    command
}

/// Dot-stuffs `message` for DATA (RFC 5321 § 4.5.2) into `out`, turning bare LF and bare CR
/// into CRLF, making sure the message ends with CRLF, and appending the `.` CRLF terminator.
pub fn dot_stuff(message: &[u8], out: &mut Vec<u8>) {
    out.reserve(message.len() + message.len() / 64 + 5);
    let mut at_line_start = true;
    let mut i = 0;
    while i < message.len() {
        let b = message[i];
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        match b {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                // Swallow the LF of a CRLF pair; a bare CR becomes CRLF.
                if message.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                at_line_start = true;
            }
            b'\n' => {
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
            }
            _ => {
                // Copy the rest of the line at once.
                let rest = &message[i..];
                let len = rest.iter().position(|&c| c == b'\r' || c == b'\n').unwrap_or(rest.len());
                out.extend_from_slice(&rest[..len]);
                i += len;
                at_line_start = false;
                continue;
            }
        }
        i += 1;
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::ReplyParser;

    #[test]
    fn ehlo_reply_extensions_are_recognised() {
        let mut parser = ReplyParser::new();
        parser.feed(
            b"250-mx.example greets me\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n\
              250-STARTTLS\r\n250-auth plain LOGIN\r\n250 DSN\r\n",
        );
        let ext = Extensions::from_ehlo(&parser.next_reply().unwrap().unwrap());
        assert_eq!(ext.server_name, "mx.example");
        assert!(ext.pipelining && ext.starttls && ext.eight_bit_mime && ext.dsn && !ext.smtputf8);
        assert_eq!(ext.size, Some(1000));
        assert!(ext.offers_auth("PLAIN") && ext.offers_auth("login") && !ext.offers_auth("CRAM-MD5"));
    }

    #[test]
    fn dsn_parameters_are_sent_xtext_encoded_only_when_offered() {
        use crate::params::{DsnNotify, OriginalRecipient, decode_xtext};
        let ext = Extensions { dsn: true, size: Some(0), ..Extensions::default() };
        let dsn = MailParams {
            ret: Some(DsnReturn::Headers),
            envid: Some("id=1+x y".into()),
            ..MailParams::default()
        };
        let from = ReversePath::Null;
        assert_eq!(
            mail_command(&from, 5, false, &dsn, &ext),
            "MAIL FROM:<> SIZE=5 RET=HDRS ENVID=id+3D1+2Bx+20y\r\n"
        );
        assert_eq!(decode_xtext("ENVID", &encode_xtext("id=1+x y")).unwrap(), "id=1+x y");
        let rcpt = RcptParams {
            notify: Some(DsnNotify { failure: true, delay: true, ..DsnNotify::default() }),
            orcpt: Some(OriginalRecipient { addr_type: "rfc822".into(), address: "b+1@x.example".into() }),
        };
        let to = Address::parse("b@x.example", false).unwrap();
        assert_eq!(
            rcpt_command(&to, &rcpt, &ext),
            "RCPT TO:<b@x.example> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+2B1@x.example\r\n"
        );
        let plain = Extensions::default();
        assert_eq!(mail_command(&from, 5, true, &dsn, &plain), "MAIL FROM:<>\r\n");
        assert_eq!(rcpt_command(&to, &rcpt, &plain), "RCPT TO:<b@x.example>\r\n");
    }

    #[test]
    fn dot_stuffing_escapes_leading_dots_and_normalises_line_endings() {
        let mut out = Vec::new();
        dot_stuff(b".hidden\r\n..two\nbare\rend", &mut out);
        assert_eq!(out, b"..hidden\r\n...two\r\nbare\r\nend\r\n.\r\n");
        let mut out = Vec::new();
        dot_stuff(b"", &mut out);
        assert_eq!(out, b".\r\n");
        let mut out = Vec::new();
        dot_stuff(b"line\r\n.\r\n", &mut out);
        assert_eq!(out, b"line\r\n..\r\n.\r\n");
    }
}
