//! The gateway's configuration file (`qutemail.toml`); every key is documented in
//! `docs/gateway-config.md`. Unknown keys are refused with the file, line and key named.

use std::path::{Path, PathBuf};

use qutemail_hsm::HsmConfig;
use qutemail_vault::ProtectionPolicy;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// `[site]`.
    pub site: SiteSection,
    /// `[kmd]`: absent on a site without QKD links.
    pub kmd: Option<KmdSection>,
    /// `[hsm]`: the token that wraps the site keys and every stored message key.
    pub hsm: HsmConfig,
    /// `[policy]`.
    #[serde(default)]
    pub policy: ProtectionPolicy,
    /// `[[peer]]`: sites sharing a QKD link with this one.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerSection>,
    /// `[store]`: where mail is kept (required by `serve` and the account commands).
    pub store: Option<StoreSection>,
    /// `[tls]`: the gateway's server certificate (SMTP, IMAP, POP3).
    pub tls: Option<TlsSection>,
    /// `[smtp]`: listeners.
    pub smtp: Option<SmtpSection>,
    /// `[queue]`: outbound delivery.
    #[serde(default)]
    pub queue: QueueSection,
    /// `[pop3]`: listeners.
    pub pop3: Option<ListenSection>,
    /// `[imap]`: listeners.
    pub imap: Option<ListenSection>,
    /// `[dns]`: the resolver for MX routing and sender authentication.
    #[serde(default)]
    pub dns: DnsSection,
    /// `[dkim]`: signing of outbound mail (absent: unsigned).
    pub dkim: Option<DkimSection>,
    /// `[mail_auth]`: what SPF/DKIM/DMARC results of inbound mail lead to.
    #[serde(default)]
    pub mail_auth: MailAuthSection,
    /// `[metrics]`: the Prometheus listener (absent: no metrics are served).
    pub metrics: Option<MetricsSection>,
    /// `[login_throttle]`: how failed logins (IMAP, POP3, SMTP AUTH) are slowed and refused.
    #[serde(default)]
    pub login_throttle: LoginThrottleSection,
    /// `[web]`: the REST API, webmail and admin console over HTTPS (absent: not served).
    pub web: Option<qutemail_web::WebConfig>,
}

/// `[login_throttle]`: one count of failed logins for IMAP, POP3 and SMTP AUTH, per account
/// and per client address (IPv6 per /64). Delays rather than locks out an account. A key left
/// out keeps the production value ([`qutemail_store::LoginThrottleSettings::default`]).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoginThrottleSection {
    /// Failed logins that cost nothing (typos); default 3.
    pub free_failures: u32,
    /// The wait after the first failure beyond the free ones, doubling after each further one;
    /// default 1000 ms.
    pub first_delay_ms: u64,
    /// The longest wait; default 30 s.
    pub max_delay_s: u64,
    /// Failed logins from one address after which its logins are refused (also with the right
    /// password) until they are forgotten; default 50.
    pub refuse_address_after: u32,
    /// Seconds after its last failure that a count is forgotten; default 900.
    pub forget_after_s: u64,
}

impl Default for LoginThrottleSection {
    fn default() -> Self {
        let d = qutemail_store::LoginThrottleSettings::default();
        Self {
            free_failures: d.free_failures,
            first_delay_ms: u64::try_from(d.first_delay.as_millis()).unwrap_or(u64::MAX),
            max_delay_s: d.max_delay.as_secs(),
            refuse_address_after: d.refuse_address_after,
            forget_after_s: d.forget_after.as_secs(),
        }
    }
}

impl LoginThrottleSection {
    /// The throttle's settings.
    pub fn settings(&self) -> qutemail_store::LoginThrottleSettings {
        qutemail_store::LoginThrottleSettings {
            free_failures: self.free_failures,
            first_delay: std::time::Duration::from_millis(self.first_delay_ms),
            max_delay: std::time::Duration::from_secs(self.max_delay_s),
            refuse_address_after: self.refuse_address_after,
            forget_after: std::time::Duration::from_secs(self.forget_after_s),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Plain-HTTP listener for `GET /metrics`, e.g. `127.0.0.1:9471` (keep it off public
    /// interfaces: it tells who mails whom how often).
    pub listen: std::net::SocketAddr,
}

/// `[dns]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    /// Recursive resolvers to ask (IP addresses); empty: the system's (`/etc/resolv.conf`).
    #[serde(default)]
    pub servers: Vec<std::net::IpAddr>,
    /// Their port (default 53).
    #[serde(default = "default_dns_port")]
    pub port: u16,
    /// Seconds to wait for one answer (default 5).
    #[serde(default = "default_dns_timeout")]
    pub timeout_s: u64,
}

impl Default for DnsSection {
    fn default() -> Self {
        Self { servers: Vec::new(), port: default_dns_port(), timeout_s: default_dns_timeout() }
    }
}

fn default_dns_port() -> u16 {
    53
}

fn default_dns_timeout() -> u64 {
    5
}

/// `[dkim]`: the signing key(s) of outbound mail, published under `<selector>._domainkey.<domain>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimSection {
    /// The selector of the key.
    pub selector: String,
    /// Its PEM private key (RSA of 2048 bits or more, or Ed25519; a secret: mode 0600).
    pub private_key: PathBuf,
    /// More keys signing side by side, e.g. `[{ selector = "ed1", private_key = "ed.pem" }]`.
    #[serde(default)]
    pub additional_keys: Vec<DkimKeySection>,
}

/// One more DKIM key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeySection {
    /// Its selector.
    pub selector: String,
    /// Its PEM private key.
    pub private_key: PathBuf,
}

/// `[mail_auth]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailAuthSection {
    /// Inbound internet mail: check SPF, DKIM and DMARC (default true). With checks on, an
    /// unreachable resolver makes internet mail wait with 451 (senders retry; nothing is lost);
    /// only a site with no DNS at all (a closed lab) turns it off.
    #[serde(default = "default_true")]
    pub check: bool,
    /// `enforce` (default): DMARC reject → 550, quarantine → Junk; `report-only`: deliver to
    /// the INBOX and only record the results.
    #[serde(default)]
    pub dmarc: crate::inbound_auth::DmarcEnforcement,
}

impl Default for MailAuthSection {
    fn default() -> Self {
        Self { check: true, dmarc: Default::default() }
    }
}

fn default_true() -> bool {
    true
}

/// `[pop3]` (and other retrieval protocols): a plain listener with STARTTLS/STLS and an
/// implicit-TLS listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// Plain listener offering STLS/STARTTLS (110 for POP3).
    pub listen: Option<std::net::SocketAddr>,
    /// Implicit-TLS listener (995 for POP3).
    pub tls_listen: Option<std::net::SocketAddr>,
}

/// `[store]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `sqlite:///path/mail.sqlite` or `postgres://user@host/db` (secrets in the URL are not
    /// allowed: use `database_url_file`).
    pub database_url: Option<String>,
    /// A file holding the URL (for PostgreSQL with a password).
    pub database_url_file: Option<PathBuf>,
    /// The SQLite file (instead of a URL).
    pub sqlite: Option<PathBuf>,
    /// The folder for sealed blobs.
    pub blob_dir: PathBuf,
}

/// `[tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// `[smtp]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSection {
    /// Host name in greetings, EHLO and Received headers.
    pub hostname: String,
    /// MX listener (mail from other sites and the Internet), e.g. `0.0.0.0:25`.
    pub mx_listen: Option<std::net::SocketAddr>,
    /// Submission listener with STARTTLS (587).
    pub submission_listen: Option<std::net::SocketAddr>,
    /// Submission listener with implicit TLS (465).
    pub submissions_listen: Option<std::net::SocketAddr>,
    /// Largest message accepted, bytes (default 25 MiB).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: u64,
}

fn default_max_message() -> u64 {
    25 * 1024 * 1024
}

/// `[queue]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// Relay for domains that are not peer sites, `host:port` (it overrides MX routing).
    pub smarthost: Option<String>,
    /// The relay's certificate name (default: the host part of `smarthost`).
    pub smarthost_tls_name: Option<String>,
    /// CA that verifies the relay (default: STARTTLS with no verification is NOT done; without
    /// a CA the relay is used without TLS).
    pub smarthost_ca: Option<PathBuf>,
    /// Retry schedule.
    #[serde(default)]
    pub retry: qutemail_queue::RetryPolicy,
    /// Deliver to other domains by MX lookup when there is no smarthost (default true).
    #[serde(default = "default_true")]
    pub mx_routing: bool,
    /// The port of mail exchangers (default 25; tests use their own).
    #[serde(default = "default_mx_port")]
    pub mx_port: u16,
    /// Most delivery attempts in flight to one next hop: a peer site, the smarthost, or one
    /// domain's mail exchangers (default 4, at least 1).
    #[serde(default = "default_parallel_per_destination", deserialize_with = "at_least_one")]
    pub parallel_per_destination: std::num::NonZeroUsize,
    /// Most delivery attempts in flight in all (default 16, at least 1).
    #[serde(default = "default_parallel_total", deserialize_with = "at_least_one")]
    pub parallel_total: std::num::NonZeroUsize,
}

fn default_mx_port() -> u16 {
    25
}

fn default_parallel_per_destination() -> std::num::NonZeroUsize {
    qutemail_queue::Parallelism::default().per_destination
}

fn default_parallel_total() -> std::num::NonZeroUsize {
    qutemail_queue::Parallelism::default().total
}

/// A count of attempts at once: 0 would stop delivery altogether, so it is refused.
fn at_least_one<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::num::NonZeroUsize, D::Error> {
    let n = usize::deserialize(d)?;
    std::num::NonZeroUsize::new(n).ok_or_else(|| {
        serde::de::Error::custom("must be at least 1 (0 attempts at once would never deliver anything)")
    })
}

// By hand: an absent [queue] must get the same defaults as an empty one.
impl Default for QueueSection {
    fn default() -> Self {
        Self {
            smarthost: None,
            smarthost_tls_name: None,
            smarthost_ca: None,
            retry: Default::default(),
            mx_routing: true,
            mx_port: default_mx_port(),
            parallel_per_destination: default_parallel_per_destination(),
            parallel_total: default_parallel_total(),
        }
    }
}

/// `[site]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    /// The site's mail domain.
    pub domain: String,
    /// The site key file (created on first start; secrets wrapped by the HSM).
    pub site_keys: PathBuf,
}

/// `[kmd]`: the gateway as an SAE of the site's kmd.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmdSection {
    /// kmd's ETSI GS QKD 014 base URL (https).
    pub etsi014_url: String,
    /// The gateway's SAE ID (the subject CN of its client certificate).
    pub sae_id: String,
    /// CA that issued kmd's server certificate.
    pub ca_cert: PathBuf,
    /// The gateway's client certificate (PEM).
    pub client_cert: PathBuf,
    /// Its private key (PEM).
    pub client_key: PathBuf,
    /// Size of QKD keys for `qaes`/`hybrid`, bits (default 256).
    #[serde(default = "default_key_bits")]
    pub key_bits: u32,
    /// Largest QKD key asked for to build a one-time pad, bits (default 8192; kmd's
    /// `max_key_size` caps it).
    #[serde(default = "default_otp_key_bits")]
    pub otp_key_bits: u32,
}

fn default_key_bits() -> u32 {
    256
}

fn default_otp_key_bits() -> u32 {
    8192
}

/// `[[peer]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    /// The peer's mail domain.
    pub domain: String,
    /// The peer gateway's SAE ID.
    pub sae_id: String,
    /// The peer's KME ID.
    pub kme_id: String,
    /// The peer's site card (JSON, from `qutemail site-card` there).
    pub site_card: PathBuf,
    /// The peer gateway's MX listener, `host:port`.
    pub smtp: Option<String>,
    /// The name on the peer gateway's certificate (default: the peer's domain).
    pub smtp_tls_name: Option<String>,
    /// CA that verifies the peer gateway's certificate (required with `smtp`: STARTTLS is
    /// mandatory between sites).
    pub ca_cert: Option<PathBuf>,
    /// What happens to mail for this peer when kmd has no keys for it (default: `[policy]
    /// keys_exhausted`).
    pub keys_exhausted: Option<qutemail_vault::KeysExhausted>,
}

/// The configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Syntax or content problem, at a line and column, about a key.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong (names the key).
        message: String,
    },
}

impl GatewayConfig {
    /// Reads and parses `path`; relative paths inside are taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses configuration text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: GatewayConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            // Name the key the problem is on (the line's `key = value`), as kmd's errors do.
            let key = text
                .lines()
                .nth(line - 1)
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim())
                .filter(|k| !k.is_empty() && !k.starts_with('['));
            let message = match key {
                Some(k) => format!("key `{k}`: {}", e.message()),
                None => e.message().to_owned(),
            };
            ConfigError::Invalid { path: path.into(), line, column, message }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let anchor = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        anchor(&mut config.site.site_keys);
        if let Some(k) = &mut config.kmd {
            anchor(&mut k.ca_cert);
            anchor(&mut k.client_cert);
            anchor(&mut k.client_key);
        }
        for p in &mut config.peers {
            anchor(&mut p.site_card);
            if let Some(c) = &mut p.ca_cert {
                anchor(c);
            }
            if let Some(rule) = p.keys_exhausted {
                config.policy.per_peer.insert(p.domain.to_ascii_lowercase(), rule);
            }
        }
        if let Some(st) = &mut config.store {
            anchor(&mut st.blob_dir);
            if let Some(f) = &mut st.sqlite {
                anchor(f);
            }
            if let Some(f) = &mut st.database_url_file {
                anchor(f);
            }
        }
        if let Some(t) = &mut config.tls {
            anchor(&mut t.cert);
            anchor(&mut t.key);
        }
        if let Some(c) = &mut config.queue.smarthost_ca {
            anchor(c);
        }
        if let Some(d) = &mut config.dkim {
            anchor(&mut d.private_key);
            for k in &mut d.additional_keys {
                anchor(&mut k.private_key);
            }
        }
        if let Some(k) = config.web.as_mut().and_then(|w| w.token_key.as_mut()) {
            anchor(k);
        }
        Ok(config)
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[site]
domain = "a.qutemail.test"
site_keys = "site-keys.json"

[kmd]
etsi014_url = "https://127.0.0.1:8441"
sae_id = "A-mail"
ca_cert = "/pki/ca.pem"
client_cert = "sae.pem"
client_key = "sae.key"

[hsm]
module_path = "/usr/lib/softhsm/libsofthsm2.so"
token = { label = "qutemail" }
pin = { file = "/run/pin" }
wrapping_key_label = "qutemail-gateway-kek"

[[peer]]
domain = "b.qutemail.test"
sae_id = "B-mail"
kme_id = "KME-B"
site_card = "peers/b.json"
"#;

    #[test]
    fn a_complete_file_parses_with_relative_paths_anchored() {
        let c = GatewayConfig::parse(GOOD, Path::new("/etc/qutemail/qutemail.toml")).unwrap();
        assert_eq!(c.site.site_keys, Path::new("/etc/qutemail/site-keys.json"));
        let kmd = c.kmd.unwrap();
        assert_eq!(kmd.ca_cert, Path::new("/pki/ca.pem"));
        assert_eq!(kmd.client_key, Path::new("/etc/qutemail/sae.key"));
        assert_eq!((kmd.key_bits, kmd.otp_key_bits), (256, 8192));
        assert_eq!(c.peers[0].site_card, Path::new("/etc/qutemail/peers/b.json"));
        assert_eq!(c.policy, ProtectionPolicy::default());
        // A peer's keys-exhausted rule overrides the site's.
        let refusing = GOOD.replace(
            "site_card = \"peers/b.json\"",
            "site_card = \"peers/b.json\"\nkeys_exhausted = \"refuse\"",
        );
        let c2 = GatewayConfig::parse(&refusing, Path::new("/etc/q.toml")).unwrap();
        assert_eq!(c2.policy.keys_exhausted_for("B.qutemail.test"), qutemail_vault::KeysExhausted::Refuse);
        assert_eq!(c2.policy.keys_exhausted_for("c.qutemail.test"), qutemail_vault::KeysExhausted::Defer);
        // Inbound SPF/DKIM/DMARC checks are on unless the file turns them off.
        assert!(c.mail_auth.check);
        let off = format!("{GOOD}\n[mail_auth]\ncheck = false\n");
        assert!(!GatewayConfig::parse(&off, Path::new("/etc/q.toml")).unwrap().mail_auth.check);
        let dmarc_only = format!("{GOOD}\n[mail_auth]\ndmarc = \"report-only\"\n");
        assert!(GatewayConfig::parse(&dmarc_only, Path::new("/etc/q.toml")).unwrap().mail_auth.check);
    }

    #[test]
    fn an_unknown_key_is_named_with_file_and_line() {
        let text = GOOD.replace("sae_id = \"A-mail\"", "sae_id = \"A-mail\"\nsae_secret = 1");
        let e = GatewayConfig::parse(&text, Path::new("/etc/q.toml")).unwrap_err().to_string();
        assert!(e.starts_with("/etc/q.toml:9:1: "), "{e}");
        assert!(e.contains("key `sae_secret`: unknown field `sae_secret`"), "{e}");
        let text = GOOD
            .replace("[policy]", "")
            .replace("[[peer]]", "[policy]\nlinked_default = \"quantum\"\n[[peer]]");
        let e = GatewayConfig::parse(&text, Path::new("/etc/q.toml")).unwrap_err().to_string();
        assert!(e.starts_with("/etc/q.toml:20:18: key `linked_default`: "), "{e}");
        assert!(e.contains("quantum"), "{e}");
    }

    #[test]
    fn queue_parallelism_defaults_reads_and_refuses_zero() {
        let c = GatewayConfig::parse(GOOD, Path::new("/etc/q.toml")).unwrap();
        assert_eq!((c.queue.parallel_per_destination.get(), c.queue.parallel_total.get()), (4, 16));
        let set = format!("{GOOD}\n[queue]\nparallel_per_destination = 2\nparallel_total = 40\n");
        let c = GatewayConfig::parse(&set, Path::new("/etc/q.toml")).unwrap();
        assert_eq!((c.queue.parallel_per_destination.get(), c.queue.parallel_total.get()), (2, 40));
        for key in ["parallel_per_destination", "parallel_total"] {
            let zero = format!("{GOOD}\n[queue]\n{key} = 0\n");
            let e = GatewayConfig::parse(&zero, Path::new("/etc/q.toml")).unwrap_err().to_string();
            assert!(e.contains(&format!("key `{key}`: must be at least 1")), "{e}");
        }
    }
}
