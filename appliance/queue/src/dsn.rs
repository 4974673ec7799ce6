//! Delivery status notifications (RFC 3464 inside RFC 6522 `multipart/report`): what the sender
//! receives when a message is delayed or cannot be delivered.

use std::time::{SystemTime, UNIX_EPOCH};

/// Whether the report says the message failed for good or is still being retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnAction {
    /// Delivery failed permanently (or the queue gave up).
    Failed,
    /// Delivery is delayed; the queue keeps trying.
    Delayed,
}

impl DsnAction {
    fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
        }
    }
}

/// One recipient's line in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientReport {
    /// The recipient address (`Final-Recipient`).
    pub recipient: String,
    /// `ORCPT` as the sender gave it (`addr-type; address`), if any.
    pub original_recipient: Option<String>,
    /// What happened.
    pub action: DsnAction,
    /// Enhanced status code, e.g. `5.1.1` or `4.4.1`.
    pub status: String,
    /// The remote server that answered, if one did.
    pub remote_mta: Option<String>,
    /// Its reply (`smtp; 550 5.1.1 …`) or our own diagnosis.
    pub diagnostic: String,
}

/// What is being reported on.
#[derive(Debug, Clone)]
pub struct DsnRequest<'a> {
    /// This site's domain (`Reporting-MTA`, the report's sender).
    pub reporting_domain: &'a str,
    /// The original sender, to whom the report goes. Never the null path: callers must not
    /// report on a report (RFC 3461 § 6.2).
    pub sender: &'a str,
    /// `ENVID` of the original message, if given.
    pub envelope_id: Option<&'a str>,
    /// When the message arrived, seconds since the Unix epoch.
    pub arrival_unix: u64,
    /// When the last attempt was made.
    pub last_attempt_unix: u64,
    /// For delays: until when the queue keeps trying.
    pub retry_until_unix: Option<u64>,
    /// The recipients reported on.
    pub recipients: &'a [RecipientReport],
    /// The original message's header block (returned as `text/rfc822-headers`), or with
    /// `RET=FULL` the whole message (returned as `message/rfc822`).
    pub original: &'a [u8],
    /// Whether `original` is the full message.
    pub full: bool,
    /// A unique token for the Message-ID and the boundary.
    pub token: &'a str,
}

/// Builds the report message (CRLF line ends).
pub fn build_dsn(r: &DsnRequest<'_>) -> Vec<u8> {
    let failed = r.recipients.iter().any(|x| x.action == DsnAction::Failed);
    let subject =
        if failed { "Undelivered Mail Returned to Sender" } else { "Delivery Status Notification (Delay)" };
    let boundary = format!("dsn-{}", r.token);
    let mut m = String::new();
    m.push_str(&format!("From: Mail Delivery System <MAILER-DAEMON@{}>\r\n", r.reporting_domain));
    m.push_str(&format!("To: <{}>\r\n", r.sender));
    m.push_str(&format!("Subject: {subject}\r\n"));
    m.push_str(&format!("Date: {}\r\n", rfc5322_date(r.last_attempt_unix)));
    m.push_str(&format!("Message-ID: <{}@{}>\r\n", r.token, r.reporting_domain));
    m.push_str("Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n boundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str("This is a MIME-formatted delivery status notification.\r\n\r\n");

    m.push_str(&format!("--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"));
    if failed {
        m.push_str(&format!(
            "This is the mail system at {}.\r\n\r\nYour message could not be delivered to one or more recipients.\r\n\r\n",
            r.reporting_domain
        ));
    } else {
        m.push_str(&format!(
            "This is the mail system at {}.\r\n\r\nYour message has not been delivered yet; the mail system keeps trying{}.\r\nYou do not need to send it again.\r\n\r\n",
            r.reporting_domain,
            r.retry_until_unix.map(|t| format!(" until {}", rfc5322_date(t))).unwrap_or_default()
        ));
    }
    for x in r.recipients {
        m.push_str(&format!("<{}>: {} ({})\r\n", x.recipient, one_line(&x.diagnostic), x.status));
    }
    m.push_str("\r\n");

    m.push_str(&format!("--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"));
    m.push_str(&format!("Reporting-MTA: dns; {}\r\n", r.reporting_domain));
    if let Some(id) = r.envelope_id {
        m.push_str(&format!("Original-Envelope-Id: {}\r\n", one_line(id)));
    }
    m.push_str(&format!("Arrival-Date: {}\r\n", rfc5322_date(r.arrival_unix)));
    for x in r.recipients {
        m.push_str("\r\n");
        if let Some(o) = &x.original_recipient {
            m.push_str(&format!("Original-Recipient: {}\r\n", one_line(o)));
        }
        m.push_str(&format!("Final-Recipient: rfc822; {}\r\n", x.recipient));
        m.push_str(&format!("Action: {}\r\n", x.action.as_str()));
        m.push_str(&format!("Status: {}\r\n", x.status));
        if let Some(mta) = &x.remote_mta {
            m.push_str(&format!("Remote-MTA: dns; {}\r\n", one_line(mta)));
        }
        m.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", one_line(&x.diagnostic)));
        m.push_str(&format!("Last-Attempt-Date: {}\r\n", rfc5322_date(r.last_attempt_unix)));
        if x.action == DsnAction::Delayed
            && let Some(t) = r.retry_until_unix
        {
            m.push_str(&format!("Will-Retry-Until: {}\r\n", rfc5322_date(t)));
        }
    }
    m.push_str("\r\n");

    let content_type = if r.full { "message/rfc822" } else { "text/rfc822-headers" };
    m.push_str(&format!("--{boundary}\r\nContent-Type: {content_type}\r\n\r\n"));
    let mut out = m.into_bytes();
    out.extend_from_slice(r.original);
    if !r.original.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// The header block of a message (up to and including the blank line).
pub fn header_block(message: &[u8]) -> &[u8] {
    for (i, w) in message.windows(4).enumerate() {
        if w == b"\r\n\r\n" {
            return &message[..i + 4];
        }
    }
    for (i, w) in message.windows(2).enumerate() {
        if w == b"\n\n" {
            return &message[..i + 2];
        }
    }
    message
}

fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

/// Formats Unix seconds as an RFC 5322 date in UTC, e.g. `Wed, 25 Nov 2026 12:00:00 +0000`.
pub fn rfc5322_date(unix: u64) -> String {
    qutemail_smtp::rfc5322_date(UNIX_EPOCH + std::time::Duration::from_secs(unix))
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_as_rfc5322() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(1_795_608_000), "Wed, 25 Nov 2026 12:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn a_failure_report_has_the_three_parts() {
        let original = b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: hi\r\n\r\nsecret body\r\n";
        let recipients = [RecipientReport {
            recipient: "bob@b.test".into(),
            original_recipient: Some("rfc822; bob@b.test".into()),
            action: DsnAction::Failed,
            status: "5.1.1".into(),
            remote_mta: Some("mx.b.test".into()),
            diagnostic: "550 5.1.1 no such user\r\n".into(),
        }];
        let dsn = build_dsn(&DsnRequest {
            reporting_domain: "a.test",
            sender: "alice@a.test",
            envelope_id: Some("env-1"),
            arrival_unix: 1_795_608_000,
            last_attempt_unix: 1_795_608_060,
            retry_until_unix: None,
            recipients: &recipients,
            original: header_block(original),
            full: false,
            token: "t1",
        });
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("Subject: Undelivered Mail Returned to Sender\r\n"));
        assert!(text.contains("report-type=delivery-status"));
        assert!(text.contains("Original-Envelope-Id: env-1\r\n"));
        assert!(text.contains("Final-Recipient: rfc822; bob@b.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user  \r\n"));
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nFrom: alice@a.test"));
        assert!(!text.contains("secret body"), "only the headers come back by default");
        assert!(text.ends_with("--dsn-t1--\r\n"));
    }
}
