//! `qutemail-web`: QuteMail's HTTP side. The REST API under `/api/` (contract:
//! `docs/rest-api.md`), the webmail and admin console (static files from `ui/`, embedded in the
//! binary), served over HTTPS only (rustls, the gateway's `[tls]` certificate).
//!
//! - Authentication ([`token`]): short-lived access tokens (JWT, EdDSA/Ed25519 with a key the
//!   appliance generates and keeps HSM-wrapped), rotating refresh tokens with reuse detection,
//!   logout and password change revoke sessions, single-use reset tokens sent by mail, failed
//!   logins throttled per account and per client address with the gateway's other protocols
//!   ([`qutemail_store::LoginThrottle`]).
//! - Mail: folders, listing (messages are opened through the vault on request: the store knows
//!   no subject or body), reading with the per-message certificate, raw and attachments, flags,
//!   move, delete to Trash, drafts, search, sealed uploads, compose. Compose builds the MIME
//!   message and submits it through [`qutemail_queue::submit`], the same path as SMTP
//!   submission.
//! - QKD: key readiness for a recipient (ETSI 014 `status` at the site's kmd) and the state of a
//!   sent message.
//! - Admin: users, the outbound queue, QKD links with one hour of history sampled from kmd's
//!   Prometheus endpoint ([`metrics`]).
//!
//! Every state the API keeps beyond the mail store's messages (sessions, hashed tokens,
//! settings, sealed uploads) lives in the mail store (schema v3), so several gateway nodes can
//! serve one site. No token, password, plaintext or key is logged.

#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod admin;
mod auth;
mod download;
pub mod error;
mod extract;
mod mail;
mod message;
pub mod metrics;
mod openapi;
pub mod part_stream;
mod qkd;
mod server;
pub mod token;
mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use qutemail_queue::OutboundQueue;
use qutemail_store::Store;
use qutemail_vault::{MailVault, ProtectionPolicy};
use serde::Deserialize;

pub use openapi::openapi_json;
pub use server::WebServer;
pub use token::TokenKey;

/// `[web]` of the gateway configuration (see `docs/gateway-config.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// HTTPS listener, e.g. `127.0.0.1:8443`.
    pub listen: SocketAddr,
    /// Whether anyone may create an account (`POST /api/auth/signup/`).
    #[serde(default)]
    pub signup: bool,
    /// Largest attachment upload, bytes (default 25 MiB).
    #[serde(default = "default_max_upload")]
    pub max_upload_bytes: u64,
    /// Accounts with the admin role.
    #[serde(default)]
    pub admins: Vec<String>,
    /// kmd's Prometheus endpoint (`http://127.0.0.1:9461/metrics`) for the admin console.
    pub kmd_metrics_url: Option<String>,
    /// Where the token signing key is kept, HSM-wrapped (default: `web-token-key.json` next to
    /// the site key file).
    pub token_key: Option<PathBuf>,
}

fn default_max_upload() -> u64 {
    25 * 1024 * 1024
}

impl WebConfig {
    /// A configuration listening on `listen` with defaults for the rest.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            signup: false,
            max_upload_bytes: default_max_upload(),
            admins: Vec::new(),
            kmd_metrics_url: None,
            token_key: None,
        }
    }
}

/// A peer site's SAE at the site's kmd (from `[[peer]]`).
#[derive(Debug, Clone)]
pub struct PeerSae {
    /// The peer's mail domain.
    pub domain: String,
    /// Its gateway's SAE ID.
    pub sae_id: String,
}

/// What the web API works with: the site's parts.
#[derive(Clone)]
pub struct WebDeps {
    /// The site's mail domain.
    pub domain: String,
    /// The mail store.
    pub store: Store,
    /// The vault.
    pub vault: MailVault,
    /// The outbound queue.
    pub queue: OutboundQueue,
    /// The site's protection policy (the same as the vault's).
    pub policy: ProtectionPolicy,
    /// The token signing key.
    pub token_key: Arc<TokenKey>,
    /// ETSI 014 client of the site's kmd (for `request_key`), if the site has one.
    pub kmd: Option<Arc<etsi014::client::Etsi014Client>>,
    /// The peers' SAE IDs.
    pub peers: Vec<PeerSae>,
    /// Wakes IMAP sessions after local deliveries, if IMAP runs.
    pub on_delivery: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Failed logins, counted with IMAP's, POP3's and SMTP AUTH's (one guessing run, one
    /// count, whichever protocol it uses).
    pub login_throttle: Arc<qutemail_store::LoginThrottle>,
}

impl std::fmt::Debug for WebDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebDeps").field("domain", &self.domain).finish_non_exhaustive()
    }
}

/// Errors starting the web server.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The listener could not be bound.
    #[error("[web] cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is unusable.
    #[error("[web] {0}")]
    Config(String),
}

pub(crate) struct AppState {
    pub(crate) deps: WebDeps,
    pub(crate) config: WebConfig,
    pub(crate) monitor: metrics::LinkMonitor,
    pub(crate) admins: Vec<String>,
}

pub(crate) type Shared = Arc<AppState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn web_section_defaults_and_unknown_keys() {
        let c: WebConfig =
            toml::from_str("listen = \"127.0.0.1:8443\"\nadmins = [\"alice@a.test\"]").unwrap();
        assert_eq!((c.signup, c.max_upload_bytes, c.kmd_metrics_url), (false, 25 * 1024 * 1024, None));
        assert_eq!(c.admins, vec!["alice@a.test".to_string()]);
        let e = toml::from_str::<WebConfig>("listen = \"127.0.0.1:8443\"\nhttp_listen = \"0.0.0.0:80\"")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `http_listen`"), "{e}");
    }
}
