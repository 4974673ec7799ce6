//! `qutemailctl dns`: every DNS record a site publishes for its mail, as zone-file lines (or
//! JSON): MX, SPF, DKIM (from the configured keys), DMARC, MTA-STS (RFC 8461, with the policy
//! file to serve) and SMTP TLS reporting (RFC 8460).

use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::{OperatorError, load, print_json};
use crate::config::GatewayConfig;
use crate::wiring;

/// How long senders may cache the MTA-STS policy: one week, the RFC 8461 § 3.2 example and
/// long enough to ride out an outage of the policy host.
pub const MTA_STS_MAX_AGE_S: u64 = 604_800;

/// One record to publish.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DnsRecord {
    /// Owner name, fully qualified, without the final dot.
    pub name: String,
    /// `MX` or `TXT`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The record data: for TXT the text (not split into character strings), for MX
    /// `PREFERENCE HOST.`.
    pub value: String,
    /// What the record is for.
    pub purpose: &'static str,
}

/// Everything a site publishes.
#[derive(Debug, Clone, Serialize)]
pub struct SiteDns {
    /// The DNS records.
    pub records: Vec<DnsRecord>,
    /// The MTA-STS policy file, served at `mta_sts_policy_url` over HTTPS.
    pub mta_sts_policy: String,
    /// Where the policy file must be served.
    pub mta_sts_policy_url: String,
    /// Why there is no DKIM record, when there is none.
    pub dkim_note: Option<String>,
}

/// The MTA-STS policy for mail exchanger `mx` (RFC 8461 § 3.2; CRLF line ends).
pub fn mta_sts_policy(mx: &str) -> String {
    format!("version: STSv1\r\nmode: enforce\r\nmx: {mx}\r\nmax_age: {MTA_STS_MAX_AGE_S}\r\n")
}

/// The records for `config`.
pub fn site_dns(config: &GatewayConfig, path: &Path) -> anyhow::Result<SiteDns> {
    let domain = config.site.domain.to_ascii_lowercase();
    let Some(smtp) = &config.smtp else {
        return Err(OperatorError::MissingSection {
            path: path.to_owned(),
            section: "[smtp]",
            why: "its hostname is the mail exchanger the MX and MTA-STS records name",
        }
        .into());
    };
    let host = smtp.hostname.trim_end_matches('.').to_ascii_lowercase();
    let policy = mta_sts_policy(&host);
    // The id changes exactly when the policy does, which is what tells senders to refetch it.
    let digest = Sha256::digest(policy.as_bytes());
    let id: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    let txt = |name: String, value: String, purpose| DnsRecord { name, kind: "TXT", value, purpose };
    let mut records = vec![
        DnsRecord {
            name: domain.clone(),
            kind: "MX",
            value: format!("10 {host}."),
            purpose: "mail exchanger",
        },
        // SPF and DMARC depend on the site's network and reporting: a strict starting point.
        txt(domain.clone(), format!("v=spf1 a:{host} mx -all"), "SPF: who may send as the domain"),
    ];
    let mut dkim_note = None;
    match wiring::dkim(config)? {
        Some(dkim) => {
            for r in dkim.dns_records() {
                records.push(txt(r.name, r.value, "DKIM public key"));
            }
        }
        None => {
            dkim_note = Some("no [dkim] section: outbound mail is not signed, there is no DKIM key".into())
        }
    }
    records.push(txt(
        format!("_dmarc.{domain}"),
        format!("v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"),
        "DMARC policy and aggregate reports",
    ));
    records.push(txt(format!("_mta-sts.{domain}"), format!("v=STSv1; id={id}"), "MTA-STS policy version"));
    records.push(txt(
        format!("_smtp._tls.{domain}"),
        format!("v=TLSRPTv1; rua=mailto:postmaster@{domain}"),
        "SMTP TLS reports",
    ));
    Ok(SiteDns {
        records,
        mta_sts_policy: policy,
        mta_sts_policy_url: format!("https://mta-sts.{domain}/.well-known/mta-sts.txt"),
        dkim_note,
    })
}

/// A TXT value as zone-file character strings (each at most 255 bytes, RFC 1035 § 3.3.14; DKIM
/// RSA keys are longer). Quotes and backslashes are escaped.
pub fn zone_text(value: &str) -> String {
    let escaped: Vec<u8> = value
        .bytes()
        .flat_map(|b| if matches!(b, b'"' | b'\\') { vec![b'\\', b] } else { vec![b] })
        .collect();
    // Split between characters, never inside an escape.
    let mut strings = Vec::new();
    let mut current = Vec::new();
    let mut i = 0;
    while i < escaped.len() {
        let step = if escaped[i] == b'\\' { 2 } else { 1 };
        let unescaped_len = current.iter().filter(|b| **b != b'\\').count();
        if unescaped_len + 1 > 255 {
            strings.push(std::mem::take(&mut current));
        }
        current.extend_from_slice(&escaped[i..(i + step).min(escaped.len())]);
        i += step;
    }
    if !current.is_empty() || strings.is_empty() {
        strings.push(current);
    }
    strings.iter().map(|s| format!("\"{}\"", String::from_utf8_lossy(s))).collect::<Vec<_>>().join(" ")
}

/// The zone-file text: records, then the MTA-STS policy file as comments.
pub fn render_zone(dns: &SiteDns) -> String {
    let mut out = String::new();
    for r in &dns.records {
        out.push_str(&format!("; {}\n", r.purpose));
        match r.kind {
            "TXT" => out.push_str(&format!("{}. IN TXT {}\n", r.name, zone_text(&r.value))),
            kind => out.push_str(&format!("{}. IN {kind} {}\n", r.name, r.value)),
        }
    }
    if let Some(note) = &dns.dkim_note {
        out.push_str(&format!("; DKIM: {note}\n"));
    }
    out.push_str(&format!(
        "; MTA-STS: serve this file at {} (HTTPS, a certificate valid for its host;\n\
         ; `qutemailctl dns --mta-sts-policy` prints it alone):\n",
        dns.mta_sts_policy_url
    ));
    for line in dns.mta_sts_policy.lines() {
        out.push_str(&format!(";   {line}\n"));
    }
    out
}

/// `dns [--json | --mta-sts-policy]`.
pub fn dns(config_path: &Path, json: bool, policy_only: bool) -> anyhow::Result<ExitCode> {
    let config = load(config_path)?;
    let dns = site_dns(&config, config_path)?;
    if policy_only {
        print!("{}", dns.mta_sts_policy);
    } else if json {
        print_json(&dns)?;
    } else {
        print!("{}", render_zone(&dns));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_txt_values_split_into_255_byte_strings() {
        let value = "p=".to_owned() + &"A".repeat(400);
        let text = zone_text(&value);
        let strings: Vec<&str> = text.split(' ').collect();
        assert_eq!(strings.len(), 2, "{text}");
        assert_eq!(strings[0].len(), 255 + 2);
        let joined: String = strings.iter().map(|s| s.trim_matches('"')).collect();
        assert_eq!(joined, value);
        assert_eq!(zone_text(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(zone_text(""), "\"\"");
    }

    #[test]
    fn the_policy_is_enforcing_and_names_the_mx() {
        let p = mta_sts_policy("mail.a.test");
        assert_eq!(p, "version: STSv1\r\nmode: enforce\r\nmx: mail.a.test\r\nmax_age: 604800\r\n");
    }
}
