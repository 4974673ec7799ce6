//! The operator commands: site card, seal, accept, open, certificate verification.

use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use qutemail_envelope::CertificateVerifyingKey;
use qutemail_vault::{Protection, SealOrder, SiteCard, StoredKind, StoredProtection, routing_headers};
use serde::{Deserialize, Serialize};

use crate::config::GatewayConfig;
use crate::wiring;

/// How much of a message is read to find its header block.
const HEADER_PROBE: u64 = 256 * 1024;

pub async fn site_card(config: &Path, out: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(config)?;
    let (_hsm, keys) = wiring::site_keys(&config).await?;
    let mut text = serde_json::to_string_pretty(&keys.card())?;
    text.push('\n');
    match out {
        Some(path) => std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `qutemail dns-records`: zone-file lines for DKIM (from the configured keys), SPF and DMARC.
pub fn dns_records(config: &Path) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(config)?;
    let domain = &config.site.domain;
    let Some(dkim) = wiring::dkim(&config)? else {
        anyhow::bail!("the configuration has no [dkim] section: there is no DKIM key to publish");
    };
    for record in dkim.dns_records() {
        println!("{}. IN TXT {}", record.name, zone_text(&record.value));
    }
    let host = config.smtp.as_ref().map_or(domain.as_str(), |s| s.hostname.as_str());
    // SPF and DMARC depend on the site's network and reporting: a starting point to adapt.
    println!("{domain}. IN TXT {}", zone_text(&format!("v=spf1 a:{host} mx -all")));
    println!(
        "_dmarc.{domain}. IN TXT {}",
        zone_text(&format!("v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"))
    );
    Ok(ExitCode::SUCCESS)
}

/// A TXT value as zone-file character strings (each at most 255 bytes, RFC 1035 § 3.3.14).
fn zone_text(value: &str) -> String {
    value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

pub async fn seal(
    config: &Path,
    to_domain: &str,
    protection: Option<Protection>,
    input: &Path,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(config)?;
    let vault = wiring::vault(&config).await?;
    let requested = protection;
    let protection = vault.choose(to_domain, requested)?;
    let open = || std::fs::File::open(input).with_context(|| format!("opening {}", input.display()));
    let len = open()?.metadata()?.len();
    let mut head = Vec::new();
    open()?.take(HEADER_PROBE).read_to_end(&mut head)?;
    let routing = routing_headers(&head)?;
    let output = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let order = SealOrder {
        recipient_domain: to_domain.to_owned(),
        protection,
        may_fall_back: requested.is_none(),
        routing,
        inner_len: len,
    };
    let sealed = vault.seal_outbound(order, open()?, output).await?;
    sealed.output.sync_all()?;
    let s = &sealed.summary;
    eprintln!(
        "sealed {} bytes with {} for {to_domain}: key IDs {}",
        s.plaintext_len,
        sealed.protection,
        s.key_ids_used.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    );
    Ok(ExitCode::SUCCESS)
}

/// A protection record as a file (JSON; nothing in it is secret in clear).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFile {
    kind: String,
    protection: Protection,
    key_record: String,
    key_ids: Vec<uuid::Uuid>,
    certificate: Option<serde_json::Value>,
}

pub async fn accept(config: &Path, input: &Path, record: &Path) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(config)?;
    let vault = wiring::vault(&config).await?;
    let file = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let inbound = vault.accept_inbound(file).await?;
    let s = &inbound.stored;
    let certificate = match &s.certificate {
        Some(bytes) => Some(serde_json::from_slice(bytes)?),
        None => None,
    };
    let text = serde_json::to_vec_pretty(&RecordFile {
        kind: s.kind.as_str().to_owned(),
        protection: s.protection,
        key_record: B64.encode(&s.key_record),
        key_ids: s.key_ids.clone(),
        certificate,
    })?;
    std::fs::write(record, text).with_context(|| format!("writing {}", record.display()))?;
    eprintln!(
        "accepted a {} message of {} bytes from {}; certificate: {}",
        s.protection,
        inbound.plaintext_len,
        inbound.sender_domain,
        certificate_state(&inbound.certificate)
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn open(config: &Path, input: &Path, record: &Path, out: &Path) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(config)?;
    let vault = wiring::vault(&config).await?;
    let text = std::fs::read(record).with_context(|| format!("reading {}", record.display()))?;
    let r: RecordFile =
        serde_json::from_slice(&text).with_context(|| format!("{} is not a record", record.display()))?;
    let stored = StoredProtection {
        kind: StoredKind::parse(&r.kind)?,
        protection: r.protection,
        key_record: B64.decode(&r.key_record).context("key_record is not base64")?,
        key_ids: r.key_ids,
        certificate: r.certificate.map(|c| c.to_string().into_bytes()),
    };
    let blob = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    // Plaintext goes to memory first: nothing is written unless the whole message verified.
    let opened = vault.open_stored(&stored, blob, Vec::new()).await?;
    std::fs::write(out, &opened.output).with_context(|| format!("writing {}", out.display()))?;
    if let Some(c) = &opened.certificate {
        eprintln!("opened {} bytes; certificate: {}", opened.plaintext_len, certificate_state(c));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn cert_verify(message: &Path, sender_card: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let card = SiteCard::read(sender_card)?;
    let key: CertificateVerifyingKey = card.certificate_key()?;
    let file = std::fs::File::open(message).with_context(|| format!("opening {}", message.display()))?;
    match qutemail_envelope::verify_sealed_message(file, &key) {
        Ok(report) => {
            let c = &report.certificate;
            if !c.sender_domain.eq_ignore_ascii_case(&card.domain) {
                println!(
                    "NOT VERIFIABLE: signed by {}'s key but claims to come from {}",
                    card.domain, c.sender_domain
                );
                return Ok(ExitCode::FAILURE);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(c)?);
            } else {
                println!("VERIFIED: Quantum Secured certificate of {}", c.sender_domain);
                println!("  mode          {} ({})", c.mode, c.algorithm);
                println!("  key IDs       {}", c.key_ids.join(", "));
                println!("  link          {}", c.link_id.as_deref().unwrap_or("-"));
                println!(
                    "  KMEs          {} -> {}",
                    c.source_kme_id.as_deref().unwrap_or("-"),
                    c.target_kme_id.as_deref().unwrap_or("-")
                );
                println!(
                    "  QBER          {}",
                    c.qber_ppm.map_or("-".into(), |q| format!("{:.3} %", f64::from(q) / 1e4))
                );
                println!("  key rate      {}", c.key_rate_bps.map_or("-".into(), |r| format!("{r} bit/s")));
                println!("  ciphertext    {} bytes, SHA-256 {}", c.ciphertext_len, c.ciphertext_sha256);
                println!("  sealed at     {} (Unix time)", c.sealed_at);
                println!("  signing key   {}", c.signing_key_id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("NOT VERIFIABLE: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn certificate_state(c: &qutemail_envelope::CertificateCheck) -> String {
    match c {
        qutemail_envelope::CertificateCheck::Verified(c) => {
            format!("verified ({} via {})", c.mode, c.sender_domain)
        }
        qutemail_envelope::CertificateCheck::Unsigned(_) => "signature not checked".into(),
        qutemail_envelope::CertificateCheck::NotVerifiable(p) => format!("NOT VERIFIABLE: {p}"),
    }
}
