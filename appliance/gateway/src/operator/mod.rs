//! The operator's commands behind `qutemailctl`: accounts ([`users`]), the outbound queue
//! ([`queue`]), QKD links and key pools as kmd reports them ([`links`]), per-message
//! certificates ([`certs`]) and the DNS records a site publishes ([`dns`]).
//!
//! Each command loads the gateway configuration itself, opens only what it needs (the store,
//! the HSM-backed vault, kmd's metrics page) and prints either text for a person or, with
//! `--json`, one JSON document for scripts. Commands return the process's exit code; errors say
//! what went wrong in the operator's terms ([`OperatorError`] for the ones this module decides).

pub mod certs;
pub mod dns;
pub mod links;
pub mod queue;
pub mod users;

use std::path::Path;

use crate::config::GatewayConfig;

/// What an operator command refuses, beyond the configuration, store and HSM errors it passes on.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// An address without a domain.
    #[error("{address:?} is not a mail address (no @domain)")]
    NotAnAddress {
        /// As given.
        address: String,
    },
    /// An account must be in this site's domain.
    #[error("{address} is not in this site's domain {domain}: accounts are created in [site] domain only")]
    WrongDomain {
        /// As given.
        address: String,
        /// `[site] domain`.
        domain: String,
    },
    /// No password on standard input.
    #[error(
        "no password on standard input (give it as the first line; it is never taken from the command line)"
    )]
    NoPassword,
    /// Reading standard input failed.
    #[error("reading the password from standard input: {0}")]
    Stdin(#[source] std::io::Error),
    /// The queue has no such message.
    #[error("no message {queue_id} in the queue (delivered, bounced or deleted already? see `queue list`)")]
    NoSuchQueuedMessage {
        /// As given.
        queue_id: String,
    },
    /// The account has no such mailbox.
    #[error("{address} has no mailbox {mailbox:?}")]
    NoSuchMailbox {
        /// The account.
        address: String,
        /// As given.
        mailbox: String,
    },
    /// The mailbox has no message with that UID.
    #[error("{address}'s {mailbox} has no message with UID {uid}")]
    NoSuchMessage {
        /// The account.
        address: String,
        /// The mailbox.
        mailbox: String,
        /// As given.
        uid: u32,
    },
    /// Neither `--kmd-metrics` nor `[web] kmd_metrics_url` says where kmd's metrics are.
    #[error(
        "{} names no kmd metrics URL: set [web] kmd_metrics_url or give --kmd-metrics URL",
        path.display()
    )]
    NoKmdMetricsUrl {
        /// The configuration file.
        path: std::path::PathBuf,
    },
    /// kmd's metrics page could not be read.
    #[error("cannot read kmd's metrics at {url}: {reason} (is kmd running with [metrics] enabled?)")]
    KmdMetrics {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The configuration lacks a section a command needs.
    #[error("{} has no {section} section: {why}", path.display())]
    MissingSection {
        /// The configuration file.
        path: std::path::PathBuf,
        /// E.g. `[dkim]`.
        section: &'static str,
        /// What the command needed it for.
        why: &'static str,
    },
}

/// Loads the gateway configuration (its errors name the file, line and key).
fn load(path: &Path) -> anyhow::Result<GatewayConfig> {
    Ok(GatewayConfig::load(path)?)
}

/// Prints `value` as pretty JSON on standard output.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The domain of `address`, lower-cased.
fn domain_of(address: &str) -> Result<(&str, String), OperatorError> {
    match address.rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
            Ok((local, domain.to_ascii_lowercase()))
        }
        _ => Err(OperatorError::NotAnAddress { address: address.to_owned() }),
    }
}

/// Seconds since the Unix epoch of `t` (0 before it).
fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
