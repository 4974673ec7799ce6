//! The routing headers a sealed message shows outside: taken from the inner message.

use qutemail_envelope::RoutingHeaders;

use crate::VaultError;

/// Reads `From`, `To`, `Cc`, `Date` and `Message-ID` from the header block at the start of an
/// RFC 5322 message (unfolding continuation lines). `From`, `To`, `Date` and `Message-ID` are
/// required: an envelope without them could not be routed or bound.
pub fn routing_headers(message: &[u8]) -> Result<RoutingHeaders, VaultError> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for raw in message.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            break;
        }
        let line = String::from_utf8_lossy(line);
        if line.starts_with([' ', '\t']) {
            match fields.last_mut() {
                Some((_, value)) => {
                    value.push(' ');
                    value.push_str(line.trim());
                }
                None => {
                    return Err(VaultError::BadMessage("the message starts with a continuation line".into()));
                }
            }
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(VaultError::BadMessage(format!(
                "header line without a colon: {:?}",
                truncate(&line)
            )));
        };
        fields.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let get = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let need = |name: &str, shown: &str| {
        get(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| VaultError::BadMessage(format!("the message has no {shown} header")))
    };
    Ok(RoutingHeaders {
        from: need("from", "From")?,
        to: need("to", "To")?,
        cc: get("cc").filter(|v| !v.is_empty()),
        date: need("date", "Date")?,
        message_id: need("message-id", "Message-ID")?,
    })
}

fn truncate(line: &str) -> String {
    line.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_headers_are_unfolded_and_missing_ones_named() {
        let m = b"From: Alice <alice@a.test>\r\nTo: bob@b.test,\r\n carol@b.test\r\nDate: Wed, 25 Nov 2026 12:00:00 +0000\r\nMessage-ID: <1@a.test>\r\nSubject: secret\r\n\r\nTo: not-a-header\r\n";
        let r = routing_headers(m).unwrap();
        assert_eq!(r.to, "bob@b.test, carol@b.test");
        assert_eq!(r.cc, None);
        assert_eq!(r.message_id, "<1@a.test>");
        let e = routing_headers(b"From: a@a.test\r\nTo: b@b.test\r\n\r\nbody").unwrap_err().to_string();
        assert!(e.contains("no Date header"), "{e}");
        assert!(routing_headers(b" folded\r\n\r\n").is_err());
    }
}
