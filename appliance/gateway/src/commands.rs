//! The `qutemail` binary's own commands: the site card, and seal, accept and open (what SMTP
//! does, by hand). The operator's commands are `qutemailctl`'s ([`crate::operator`]).

use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use qutemail_vault::{Protection, SealOrder, StoredKind, StoredProtection, routing_headers};
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

fn certificate_state(c: &qutemail_envelope::CertificateCheck) -> String {
    match c {
        qutemail_envelope::CertificateCheck::Verified(c) => {
            format!("verified ({} via {})", c.mode, c.sender_domain)
        }
        qutemail_envelope::CertificateCheck::Unsigned(_) => "signature not checked".into(),
        qutemail_envelope::CertificateCheck::NotVerifiable(p) => format!("NOT VERIFIABLE: {p}"),
    }
}
