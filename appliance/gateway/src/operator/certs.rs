//! `qutemailctl cert …`: per-message "Quantum Secured" certificates. `verify` checks a sealed
//! message file offline against the sender's public card; `show` checks a message in the
//! store, opening it as IMAP, POP3 and the web do (`MailVault::open_stored`, which verifies
//! the certificate under the key of the peer named by its KME in the site's `[[peer]]`
//! directory) and discarding the plaintext.

use std::path::Path;
use std::process::ExitCode;

use qutemail_envelope::{Certificate, CertificateCheck, CertificateVerifyingKey};
use qutemail_vault::{MailVault, SiteCard, StoredKind, StoredProtection, VaultError};
use serde::Serialize;
use tokio::io::AsyncReadExt as _;

use super::{OperatorError, load, print_json};
use crate::wiring;

/// A certificate's state as `cert show --json` prints it.
#[derive(Debug, Serialize)]
pub struct CertificateReport {
    /// The account.
    pub address: String,
    /// The mailbox.
    pub mailbox: String,
    /// The message's UID.
    pub uid: u32,
    /// The protection the message is stored with (`hybrid`, `qaes`, `otp`, `pqc`, `normal`).
    pub protection: String,
    /// `valid` (signature verified under the peer's key), `unsigned` (sound, but no peer key to
    /// check the signature), `invalid` (forged, altered or missing) or `none` (mail protected
    /// at rest only carries no certificate).
    pub signature: &'static str,
    /// Why it is not valid.
    pub problem: Option<String>,
    /// The certificate's fields (as sealed; for `invalid`, as stored on arrival, untrusted).
    pub certificate: Option<Certificate>,
}

/// Prints a certificate's fields, one per line, as both `verify` and `show` do.
pub fn print_certificate(c: &Certificate) {
    println!("  mode          {} ({})", c.mode, c.algorithm);
    println!("  key IDs       {}", if c.key_ids.is_empty() { "-".to_owned() } else { c.key_ids.join(", ") });
    println!("  link          {}", c.link_id.as_deref().unwrap_or("-"));
    println!(
        "  KMEs          {} -> {}",
        c.source_kme_id.as_deref().unwrap_or("-"),
        c.target_kme_id.as_deref().unwrap_or("-")
    );
    println!("  QBER          {}", c.qber_ppm.map_or("-".into(), |q| format!("{:.3} %", f64::from(q) / 1e4)));
    println!("  key rate      {}", c.key_rate_bps.map_or("-".into(), |r| format!("{r} bit/s")));
    println!("  ciphertext    {} bytes, SHA-256 {}", c.ciphertext_len, c.ciphertext_sha256);
    println!("  sealed at     {} (Unix time)", c.sealed_at);
    println!("  signing key   {}", c.signing_key_id);
}

/// `cert verify --message FILE --sender-card FILE [--json]`: exits 0 when the certificate
/// verifies, 1 when it does not.
pub fn verify(message: &Path, sender_card: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let card = SiteCard::read(sender_card)?;
    let key: CertificateVerifyingKey = card.certificate_key()?;
    let file = std::fs::File::open(message)
        .map_err(|e| anyhow::anyhow!("cannot open the message {}: {e}", message.display()))?;
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
                print_json(c)?;
            } else {
                println!("VERIFIED: Quantum Secured certificate of {}", c.sender_domain);
                print_certificate(c);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("NOT VERIFIABLE: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `cert show ADDRESS --uid N [--mailbox M] [--json]`: exits 0 when the stored message's
/// certificate verifies, 1 when it does not or the message has none.
pub async fn show(
    config: &Path,
    address: &str,
    mailbox: &str,
    uid: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let config = load(config)?;
    let store = wiring::store(&config).await?;
    let vault = wiring::vault(&config).await?;
    let result = check(&store, &vault, address, mailbox, uid).await;
    store.close().await;
    let report = result?;
    if json {
        print_json(&report)?;
    } else {
        let subject = format!("{address} {mailbox} UID {uid} ({})", report.protection);
        match (report.signature, &report.certificate) {
            ("valid", Some(c)) => {
                println!("VERIFIED: {subject}: Quantum Secured certificate of {}", c.sender_domain);
                print_certificate(c);
            }
            ("none", _) => println!("NO CERTIFICATE: {subject}: {}", report.problem.as_deref().unwrap_or("")),
            (_, c) => {
                println!("NOT VERIFIABLE: {subject}: {}", report.problem.as_deref().unwrap_or("unknown"));
                if let Some(c) = c {
                    println!("  (as stored on arrival, not trusted:)");
                    print_certificate(c);
                }
            }
        }
    }
    Ok(if report.signature == "valid" { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn check(
    store: &qutemail_store::Store,
    vault: &MailVault,
    address: &str,
    mailbox: &str,
    uid: u32,
) -> anyhow::Result<CertificateReport> {
    let account = store.account(address).await?;
    let folder = store.mailbox(account.id, mailbox).await.map_err(|e| match e {
        qutemail_store::StoreError::NoSuchMailbox(_) => {
            OperatorError::NoSuchMailbox { address: account.address.clone(), mailbox: mailbox.to_owned() }
                .into()
        }
        e => anyhow::Error::from(e),
    })?;
    let meta = store.message(folder.id, uid).await?.ok_or_else(|| OperatorError::NoSuchMessage {
        address: account.address.clone(),
        mailbox: folder.name.clone(),
        uid,
    })?;
    let stored = StoredProtection::from_store(&meta.protection)?;
    let as_stored: Option<Certificate> =
        stored.certificate.as_deref().and_then(|c| serde_json::from_slice(c).ok());
    let mut report = CertificateReport {
        address: account.address.clone(),
        mailbox: folder.name.clone(),
        uid,
        protection: stored.protection.to_string(),
        signature: "none",
        problem: None,
        certificate: None,
    };
    if stored.kind == StoredKind::AtRest {
        report.problem = Some(format!(
            "the message was stored with {} protection at rest only (local or plain mail): no certificate",
            stored.protection
        ));
        return Ok(report);
    }
    let mut sealed = Vec::new();
    store.read_blob(&meta).await?.read_to_end(&mut sealed).await?;
    // The plaintext goes nowhere: only the certificate's verdict is wanted.
    let (signature, problem, certificate) =
        match vault.open_stored(&stored, std::io::Cursor::new(sealed), std::io::sink()).await {
            Ok(opened) => match opened.certificate {
                Some(CertificateCheck::Verified(c)) => match peer_domain(vault, &c) {
                    Some(d) if d.eq_ignore_ascii_case(&c.sender_domain) => ("valid", None, Some(c)),
                    peer => {
                        let signer = peer.unwrap_or_else(|| "an unknown peer".into());
                        let why =
                            format!("signed by {signer}'s key but claims to come from {}", c.sender_domain);
                        ("invalid", Some(why), Some(c))
                    }
                },
                Some(CertificateCheck::Unsigned(c)) => {
                    let why = format!(
                        "the message is intact but no [[peer]] has KME {}: its signature cannot be checked",
                        c.source_kme_id.as_deref().unwrap_or("(none named)")
                    );
                    ("unsigned", Some(why), Some(c))
                }
                Some(CertificateCheck::NotVerifiable(p)) => ("invalid", Some(p.to_string()), as_stored),
                None => ("none", Some("the message carries no certificate".into()), None),
            },
            Err(e) if e.is_not_verifiable() || matches!(e, VaultError::CorruptRecord(_)) => {
                ("invalid", Some(e.to_string()), as_stored)
            }
            Err(e) => return Err(e.into()),
        };
    report.signature = signature;
    report.problem = problem;
    report.certificate = certificate;
    Ok(report)
}

/// The domain of the peer whose key verified `c` (found, as the vault does, by its KME).
fn peer_domain(vault: &MailVault, c: &Certificate) -> Option<String> {
    vault.peers().by_kme(c.source_kme_id.as_deref()?).map(|p| p.domain.clone())
}
