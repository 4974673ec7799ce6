//! The Received: trace header the server prepends (RFC 5321 § 4.4, RFC 3848 protocol
//! keywords, RFC 8314 § 4.3 TLS clause) and its RFC 5322 date.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::proto::server::{Recipient, SessionInfo};

/// Keeps only characters that cannot end a comment or a header line: the HELO name and user
/// name come from the client.
fn sanitize(value: &str) -> String {
    value.chars().filter(|c| c.is_ascii_graphic() && !matches!(c, '(' | ')' | '\\' | ';')).take(255).collect()
}

/// The Received: header for a message received in this session, CRLF-terminated and folded.
pub(crate) fn received_header(
    hostname: &str,
    info: &SessionInfo,
    recipients: &[Recipient],
    now: SystemTime,
) -> String {
    let helo = info.helo.as_deref().map(sanitize).unwrap_or_else(|| "unknown".into());
    let peer = info.peer.map(|p| format!(" ([{}])", p.ip())).unwrap_or_default();
    // RFC 3848: ESMTP, then S for TLS and A for authenticated.
    let protocol = match (info.esmtp, info.tls.is_some(), info.authenticated_as.is_some()) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    };
    let mut header =
        format!("Received: from {helo}{peer}\r\n\tby {} (QuteMail)\r\n\twith {protocol}", sanitize(hostname));
    if let Some(tls) = &info.tls {
        header.push_str(&format!(
            " ({} cipher {})\r\n\ttls {}",
            sanitize(&tls.version),
            sanitize(&tls.cipher),
            sanitize(&tls.cipher)
        ));
    }
    if let Some(user) = &info.authenticated_as {
        header.push_str(&format!("\r\n\t(authenticated user {})", sanitize(user)));
    }
    // Naming the recipient only when there is one keeps other recipients private (§ 7.2).
    if let [only] = recipients {
        header.push_str(&format!("\r\n\tfor <{}>", only.address));
    }
    header.push_str(&format!(";\r\n\t{}\r\n", rfc5322_date(now)));
    header
}

/// An RFC 5322 date in UTC, e.g. `Thu, 26 Nov 2026 00:30:00 +0000`.
pub fn rfc5322_date(now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proto::server::TlsInfo;

    #[test]
    fn date_matches_known_instants() {
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        // 2026-11-26T00:30:00Z
        assert_eq!(
            rfc5322_date(UNIX_EPOCH + Duration::from_secs(1_795_653_000)),
            "Thu, 26 Nov 2026 00:30:00 +0000"
        );
        assert_eq!(
            rfc5322_date(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "Tue, 29 Feb 2000 00:00:00 +0000"
        );
    }

    #[test]
    fn header_names_tls_user_and_strips_comment_breakers() {
        let info = SessionInfo {
            peer: Some("192.0.2.7:4000".parse().unwrap()),
            helo: Some("evil) (x\\".into()),
            esmtp: true,
            tls: Some(TlsInfo { version: "TLSv1.3".into(), cipher: "TLS_AES_256_GCM_SHA384".into() }),
            authenticated_as: Some("alice".into()),
        };
        let h = received_header("mx.example", &info, &[], UNIX_EPOCH);
        assert!(
            h.starts_with(
                "Received: from evilx ([192.0.2.7])\r\n\tby mx.example (QuteMail)\r\n\twith ESMTPSA (TLSv1.3"
            ),
            "{h}"
        );
        assert!(h.contains("tls TLS_AES_256_GCM_SHA384"), "{h}");
        assert!(h.contains("(authenticated user alice)"), "{h}");
        assert!(h.ends_with(";\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"), "{h}");
        assert!(h.lines().all(|l| l.len() < 100));
    }
}
