//! `kmd.toml`: the daemon's one configuration file.
//!
//! Every table rejects unknown keys. Loading happens in three steps, each with errors that name
//! the file, the line and column, and the key:
//!
//! 1. TOML syntax (`toml`'s spanned document).
//! 2. The inline-secret probe: `[hsm] pin` must be `{ file = "/abs/path" }` or
//!    `{ env = "NAME" }`; anything that looks like the PIN itself is refused *without echoing it*
//!    (serde's own message would quote the value).
//! 3. serde into [`Config`] (`deny_unknown_fields` everywhere), then [`Config::validate`]: ranges,
//!    cross-references and uniqueness, every problem reported (not only the first) with the
//!    location of the key it is about.
//!
//! Relative paths are resolved against the directory of the configuration file, except the HSM
//! PIN file (which must be absolute) and the PKCS#11 module path (left to the dynamic loader).
//!
//! The files the configuration names are checked by [`Config::check_files`] (certificates, keys,
//! the store's directory; `kmd check-config` and start-up both run it) and
//! [`Config::check_hsm_files`] (PKCS#11 module, PIN file; `check-config` only, since opening the
//! HSM reports those itself); their errors name the key and the path. Every key is documented in `docs/kmd-config.md`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use qkd_device::kme::{KmeDeviceConfig, KmeRole};
use qkd_device::serial::SerialConfig;
use qutemail_hsm::{HsmConfig, PinSource, TokenSelector, WrapMechanism};
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Where `kmd` looks for its configuration unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/qutemail/kmd.toml";

/// Largest key the key pool can cut, in bits (ETSI 014 `max_key_size` may not exceed it).
pub const MAX_KEY_SIZE_BITS: u32 = 524_288;

/// Most keys one ETSI 014 request may ask for (the key pool cuts at most this many per call).
pub const MAX_KEYS_PER_REQUEST: u32 = 1024;

// ---------------------------------------------------------------------------------------------
// The schema
// ---------------------------------------------------------------------------------------------

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[site]`: who this kmd is.
    pub site: SiteConfig,
    /// `[hsm]`: the PKCS#11 token that wraps every stored key (`qutemail_hsm::HsmConfig`).
    pub hsm: HsmConfig,
    /// `[store]`: the key pool's database.
    pub store: StoreConfig,
    /// `[[link]]`: the QKD links this kmd serves (one per device).
    #[serde(default, rename = "link")]
    pub links: Vec<LinkConfig>,
    /// `[etsi014]`: the ETSI GS QKD 014 server for local SAEs.
    pub etsi014: Etsi014Config,
    /// `[[sae]]`: the local SAEs and how their client certificates are recognised.
    #[serde(default, rename = "sae")]
    pub saes: Vec<SaeConfig>,
    /// `[peer]`: the channel to the peer sites' kmds (required when there is a link).
    #[serde(default)]
    pub peer: Option<PeerConfig>,
    /// `[metrics]`: the Prometheus listener.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[log]`: level and format.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[site]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// This kmd's KME ID (ETSI 014 `source_KME_ID`; compared with the peer's to split keys).
    pub kme_id: String,
    /// A human name for logs and the status line (default: the KME ID).
    #[serde(default)]
    pub name: Option<String>,
}

impl SiteConfig {
    /// The name, or the KME ID when no name is set.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.kme_id)
    }
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite database of the key pool. Its directory must exist.
    pub path: PathBuf,
}

/// `[[link]]`: one QKD link, its device and its peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Link ID, the same at both ends (a serial device reports it; blocks from a device that
    /// reports another link are rejected).
    pub id: String,
    /// The peer site kmd's KME ID.
    pub peer_kme_id: String,
    /// Base URL of the peer kmd's peer channel, `https://host:port`.
    pub peer_url: String,
    /// SHA-256 fingerprint of the peer kmd's peer-channel client certificate. When set, only
    /// that certificate is the peer; otherwise any certificate from `[peer] ca_cert` whose
    /// subject CN is `peer_kme_id`.
    #[serde(default)]
    pub peer_certificate_sha256: Option<String>,
    /// SAE IDs at the peer site that keys on this link may be shared with (SAE pairs: every
    /// `[[sae]]` listing the link × these). Empty: no pair, no key served (only allowed with a
    /// single link).
    #[serde(default)]
    pub peer_sae_ids: Vec<String>,
    /// Blocks the peer has not confirmed within this many seconds are discarded (global in the
    /// key service: the first link's value applies).
    #[serde(default = "default_unconfirmed_grace_s")]
    pub unconfirmed_grace_s: u64,
    /// Keys assigned to an SAE pair and not fetched by the slave within this many seconds are
    /// discarded at both ends (not enforced yet: the key service has no such timer).
    #[serde(default = "default_assigned_key_ttl_s")]
    pub assigned_key_ttl_s: u64,
    /// Spent blocks and keys are pruned from the store after this many days (global in the key
    /// service: the first link's value applies). Must exceed any time a device could re-deliver an old block ID.
    #[serde(default = "default_history_retention_days")]
    pub history_retention_days: u32,
    /// The QKD device: `{ serial = { ... } }` or `{ kme = { ... } }`.
    pub device: DeviceConfig,
    /// `[link.pool]`: how many key blocks to keep.
    #[serde(default)]
    pub pool: PoolLimits,
}

fn default_unconfirmed_grace_s() -> u64 {
    600
}
fn default_assigned_key_ttl_s() -> u64 {
    86_400
}
fn default_history_retention_days() -> u32 {
    30
}

/// The QKD device of a link, with the driver's own configuration type.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum DeviceConfig {
    /// A device speaking the QuteMail serial protocol (`qkd_device::serial::SerialConfig`).
    Serial(SerialConfig),
    /// A vendor device exposing an ETSI 014 KME (`qkd_device::kme::KmeDeviceConfig`).
    Kme(KmeDeviceConfig),
}

impl DeviceConfig {
    /// `serial` or `kme`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Serial(_) => "serial",
            Self::Kme(_) => "kme",
        }
    }
}

/// `[link.pool]`: water marks in key blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolLimits {
    /// Most blocks stored for the link; further blocks are rejected (`pool_full`).
    #[serde(default = "default_max_blocks")]
    pub max_blocks: u64,
    /// When fewer blocks than this are stored, kmd asks the device for more.
    #[serde(default = "default_low_water")]
    pub low_water: u64,
    /// kmd asks the device for blocks up to this many stored.
    #[serde(default = "default_high_water")]
    pub high_water: u64,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_blocks: default_max_blocks(),
            low_water: default_low_water(),
            high_water: default_high_water(),
        }
    }
}

fn default_max_blocks() -> u64 {
    10_000
}
fn default_low_water() -> u64 {
    256
}
fn default_high_water() -> u64 {
    1024
}

/// `[etsi014]`: the key delivery API for local SAEs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Etsi014Config {
    /// Address to listen on.
    #[serde(default = "default_etsi_listen")]
    pub listen: SocketAddr,
    /// This KME's server certificate chain, PEM.
    pub server_cert: PathBuf,
    /// Its private key, PEM.
    pub server_key: PathBuf,
    /// The CA that issues SAE client certificates, PEM.
    pub client_ca: PathBuf,
    /// Key size in bits when a request names none (ETSI `key_size`).
    #[serde(default = "default_key_size")]
    pub key_size: u32,
    /// Smallest key size a request may ask for, bits (ETSI `min_key_size`).
    #[serde(default = "default_min_key_size")]
    pub min_key_size: u32,
    /// Largest key size a request may ask for, bits (ETSI `max_key_size`).
    #[serde(default = "default_max_key_size")]
    pub max_key_size: u32,
    /// Most keys one request may ask for (ETSI `max_key_per_request`).
    #[serde(default = "default_max_key_per_request")]
    pub max_key_per_request: u32,
    /// Most additional slave SAEs in one request (ETSI `max_SAE_ID_count`; 0: no multicast).
    #[serde(default)]
    pub max_sae_id_count: u32,
    /// TLS connections served at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_etsi_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_key_size() -> u32 {
    256
}
fn default_min_key_size() -> u32 {
    64
}
fn default_max_key_size() -> u32 {
    1024
}
fn default_max_key_per_request() -> u32 {
    128
}
fn default_max_connections() -> usize {
    1024
}

/// `[[sae]]`: a local SAE (an application such as the mail gateway).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaeConfig {
    /// The SAE ID.
    pub sae_id: String,
    /// SHA-256 fingerprint of its client certificate (64 hex digits, colons allowed). When set,
    /// only that certificate speaks for the SAE.
    #[serde(default)]
    pub certificate_sha256: Option<String>,
    /// Subject common name of its client certificate. Alone: any certificate from
    /// `[etsi014] client_ca` with this CN speaks for the SAE (and it must equal `sae_id`). With
    /// `certificate_sha256`: checked as well.
    #[serde(default)]
    pub common_name: Option<String>,
    /// IDs of the `[[link]]`s whose keys this SAE may obtain.
    pub links: Vec<String>,
}

/// `[peer]`: the mutual-TLS channel between the kmds of a link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Address to listen on for peer kmds.
    #[serde(default = "default_peer_listen")]
    pub listen: SocketAddr,
    /// The peer sites' CA certificate(s), PEM (a bundle for several peers): trusted for this
    /// channel only, to verify the peer kmd's client certificate on the listener and its server
    /// certificate when dialling `peer_url`.
    pub ca_cert: PathBuf,
    /// This kmd's server certificate chain for the listener, PEM.
    pub server_cert: PathBuf,
    /// Its private key, PEM.
    pub server_key: PathBuf,
    /// This kmd's client certificate for dialling the peer, PEM; subject CN = `[site] kme_id`.
    pub client_cert: PathBuf,
    /// Its private key, PEM.
    pub client_key: PathBuf,
    /// How long one request to the peer kmd may take, in milliseconds.
    #[serde(default = "default_peer_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

fn default_peer_request_timeout_ms() -> u64 {
    2000
}

fn default_peer_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8444))
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve metrics at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Address of the plain-HTTP listener (`GET /metrics`).
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true, listen: default_metrics_listen() }
    }
}

fn default_true() -> bool {
    true
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, or `warn,kmd=debug`.
    #[serde(default = "default_level")]
    pub level: String,
    /// Output format; default `journald` under systemd (`JOURNAL_STREAM` set), `text` otherwise.
    #[serde(default)]
    pub format: Option<LogFormat>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: default_level(), format: None }
    }
}

fn default_level() -> String {
    "info".into()
}

/// How log lines are written (always to standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `<N>` syslog priority prefix, no timestamp: what journald parses from a service's stderr.
    Journald,
    /// Human-readable lines with timestamps.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Journald => "journald",
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One problem in the configuration, located in the file when possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column of the key the problem is about, if it is in the file.
    pub location: Option<(usize, usize)>,
    /// The key in dotted form (`link[0].pool.low_water`), when known.
    pub key: Option<String>,
    /// What is wrong, naming the key.
    pub message: String,
}

/// The configuration could not be used.
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
    /// Syntax, type or semantic problems; each names the file, line, column and key.
    #[error("{}", Problems(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

struct Problems<'a>(&'a Path, &'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.1.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            match p.location {
                Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.0.display(), p.message)?,
                None => write!(f, "{}: {}", self.0.display(), p.message)?,
            }
        }
        Ok(())
    }
}

impl ConfigError {
    /// The problems, if this is not a read error.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

impl Config {
    /// Reads, parses and validates the file at `path` (not the files it names: see
    /// [`Config::check_files`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` names it in errors and anchors relative
    /// paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |problems| ConfigError::Invalid { path: path.into(), problems };
        let doc = DeTable::parse(text).map_err(|e| {
            let location = e.span().map(|s| line_col(text, s.start));
            invalid(vec![Problem { location, key: None, message: format!("TOML syntax: {}", e.message()) }])
        })?;
        let secrets = probe_secrets(&doc, text);
        if !secrets.is_empty() {
            return Err(invalid(secrets));
        }
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            let key = offset.and_then(|o| key_at(doc.get_ref(), o));
            let message = e.message().trim_end().to_owned();
            let message = match &key {
                Some(k) => format!("{}: {message}", toml_key(k)),
                None => message,
            };
            invalid(vec![Problem { location: offset.map(|o| line_col(text, o)), key, message }])
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.resolve_paths(&base);
        let mut problems = config.validate();
        for p in &mut problems {
            if p.location.is_none()
                && let Some(key) = &p.key
            {
                p.location = span_of(doc.get_ref(), key).map(|o| line_col(text, o));
            }
        }
        if problems.is_empty() { Ok(config) } else { Err(invalid(problems)) }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.store.path);
        fix(&mut self.etsi014.server_cert);
        fix(&mut self.etsi014.server_key);
        fix(&mut self.etsi014.client_ca);
        if let Some(peer) = &mut self.peer {
            fix(&mut peer.ca_cert);
            fix(&mut peer.server_cert);
            fix(&mut peer.server_key);
            fix(&mut peer.client_cert);
            fix(&mut peer.client_key);
        }
        for link in &mut self.links {
            match &mut link.device {
                DeviceConfig::Serial(s) => fix(&mut s.path),
                DeviceConfig::Kme(k) => {
                    fix(&mut k.ca_cert);
                    fix(&mut k.client_cert);
                    fix(&mut k.client_key);
                }
            }
        }
    }

    /// Checks what serde cannot: ranges, uniqueness, cross-references. Returns every problem.
    pub fn validate(&self) -> Vec<Problem> {
        let mut v = Validator::default();
        self.validate_site(&mut v);
        if let Err(e) = self.hsm.validate() {
            v.push(
                "hsm",
                format!("[hsm] {}", e.to_string().trim_start_matches("invalid HSM configuration: ")),
            );
        }
        if self.store.path.as_os_str().is_empty() {
            v.push("store.path", "[store] path must not be empty");
        } else if self.store.path.is_dir() {
            v.push(
                "store.path",
                format!("[store] path {} is a directory; name the database file", self.store.path.display()),
            );
        }
        self.validate_links(&mut v);
        self.validate_etsi(&mut v);
        self.validate_saes(&mut v);
        self.validate_peer(&mut v);
        self.validate_listeners(&mut v);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            v.push("log.level", format!("[log] level {:?} is not a valid filter: {e}", self.log.level));
        }
        v.problems
    }

    fn validate_site(&self, v: &mut Validator) {
        if let Err(why) = check_id(&self.site.kme_id) {
            v.push("site.kme_id", format!("[site] kme_id {why}"));
        }
        if let Some(name) = &self.site.name
            && name.trim().is_empty()
        {
            v.push("site.name", "[site] name must not be blank (leave it out to use kme_id)");
        }
    }

    fn validate_links(&self, v: &mut Validator) {
        let mut ids = HashSet::new();
        let mut remote_saes: HashMap<&str, &str> = HashMap::new();
        for (i, link) in self.links.iter().enumerate() {
            let at = |k: &str| format!("link[{i}].{k}");
            let name = format!("[[link]] {:?}", link.id);
            if let Err(why) = check_id(&link.id) {
                v.push(at("id"), format!("[[link]] #{} id {why}", i + 1));
            } else if !ids.insert(link.id.as_str()) {
                v.push(at("id"), format!("{name}: id is used by another [[link]]"));
            }
            if let Err(why) = check_id(&link.peer_kme_id) {
                v.push(at("peer_kme_id"), format!("{name}: peer_kme_id {why}"));
            } else if link.peer_kme_id == self.site.kme_id {
                v.push(
                    at("peer_kme_id"),
                    format!("{name}: peer_kme_id {:?} is this site's own [site] kme_id", link.peer_kme_id),
                );
            }
            if let Err(why) = check_https_url(&link.peer_url) {
                v.push(at("peer_url"), format!("{name}: peer_url {why}"));
            }
            if let Some(fp) = &link.peer_certificate_sha256
                && parse_fingerprint(fp).is_none()
            {
                v.push(
                    at("peer_certificate_sha256"),
                    format!("{name}: peer_certificate_sha256 must be 64 hex digits (colons allowed)"),
                );
            }
            if link.unconfirmed_grace_s == 0 {
                v.push(at("unconfirmed_grace_s"), format!("{name}: unconfirmed_grace_s must be positive"));
            }
            if link.assigned_key_ttl_s == 0 {
                v.push(at("assigned_key_ttl_s"), format!("{name}: assigned_key_ttl_s must be positive"));
            }
            if link.history_retention_days == 0 {
                v.push(
                    at("history_retention_days"),
                    format!("{name}: history_retention_days must be at least 1"),
                );
            }
            if self.links.len() > 1 && link.peer_sae_ids.is_empty() {
                v.push(
                    at("peer_sae_ids"),
                    format!(
                        "{name}: peer_sae_ids must list the peer site's SAEs when there are several links"
                    ),
                );
            }
            for sae in &link.peer_sae_ids {
                if let Err(why) = check_id(sae) {
                    v.push(at("peer_sae_ids"), format!("{name}: peer_sae_ids entry {sae:?} {why}"));
                } else if let Some(other) = remote_saes.insert(sae, &link.id)
                    && other != link.id
                {
                    v.push(
                        at("peer_sae_ids"),
                        format!("{name}: peer SAE {sae:?} is also listed on link {other:?}; an SAE is reached over one link"),
                    );
                }
            }
            let p = &link.pool;
            if p.high_water == 0 {
                v.push(
                    at("pool.high_water"),
                    format!("[link.pool] high_water must be at least 1 (link {:?})", link.id),
                );
            }
            if p.low_water >= p.high_water {
                v.push(
                    at("pool.low_water"),
                    format!(
                        "[link.pool] low_water ({}) must be below high_water ({}) (link {:?})",
                        p.low_water, p.high_water, link.id
                    ),
                );
            }
            if p.high_water > p.max_blocks {
                v.push(
                    at("pool.high_water"),
                    format!(
                        "[link.pool] high_water ({}) must not exceed max_blocks ({}) (link {:?})",
                        p.high_water, p.max_blocks, link.id
                    ),
                );
            }
            if p.high_water > u64::from(u32::MAX) {
                v.push(
                    at("pool.high_water"),
                    format!("[link.pool] high_water must be below 2^32 (link {:?})", link.id),
                );
            }
            match &link.device {
                DeviceConfig::Serial(s) => validate_serial(s, &name, i, v),
                DeviceConfig::Kme(k) => validate_kme(k, &name, i, v),
            }
        }
        for sae in &self.saes {
            if remote_saes.contains_key(sae.sae_id.as_str()) {
                v.push(
                    "sae",
                    format!("[[sae]] {:?} is local but also listed in a [[link]] peer_sae_ids", sae.sae_id),
                );
            }
        }
    }

    fn validate_etsi(&self, v: &mut Validator) {
        let e = &self.etsi014;
        for (key, bits) in
            [("key_size", e.key_size), ("min_key_size", e.min_key_size), ("max_key_size", e.max_key_size)]
        {
            if bits == 0 || !bits.is_multiple_of(8) {
                v.push(
                    format!("etsi014.{key}"),
                    format!("[etsi014] {key} ({bits}) must be a positive multiple of 8"),
                );
            }
        }
        if e.min_key_size > e.key_size {
            v.push(
                "etsi014.min_key_size",
                format!(
                    "[etsi014] min_key_size ({}) must not exceed key_size ({})",
                    e.min_key_size, e.key_size
                ),
            );
        }
        if e.key_size > e.max_key_size {
            v.push(
                "etsi014.key_size",
                format!(
                    "[etsi014] key_size ({}) must not exceed max_key_size ({})",
                    e.key_size, e.max_key_size
                ),
            );
        }
        if e.max_key_size > MAX_KEY_SIZE_BITS {
            v.push(
                "etsi014.max_key_size",
                format!("[etsi014] max_key_size ({}) must not exceed {MAX_KEY_SIZE_BITS}", e.max_key_size),
            );
        }
        if e.max_key_per_request == 0 || e.max_key_per_request > MAX_KEYS_PER_REQUEST {
            v.push(
                "etsi014.max_key_per_request",
                format!(
                    "[etsi014] max_key_per_request ({}) must be in 1..={MAX_KEYS_PER_REQUEST}",
                    e.max_key_per_request
                ),
            );
        }
        if e.max_connections == 0 {
            v.push("etsi014.max_connections", "[etsi014] max_connections must be at least 1");
        }
        check_secret_path(v, "etsi014.server_key", "[etsi014] server_key", &e.server_key);
    }

    fn validate_saes(&self, v: &mut Validator) {
        let links: HashSet<&str> = self.links.iter().map(|l| l.id.as_str()).collect();
        let mut ids = HashSet::new();
        let mut fingerprints: HashMap<[u8; 32], &str> = HashMap::new();
        let mut cns: HashMap<&str, &str> = HashMap::new();
        for (i, sae) in self.saes.iter().enumerate() {
            let at = |k: &str| format!("sae[{i}].{k}");
            let name = format!("[[sae]] {:?}", sae.sae_id);
            if let Err(why) = check_id(&sae.sae_id) {
                v.push(at("sae_id"), format!("[[sae]] #{} sae_id {why}", i + 1));
            } else if !ids.insert(sae.sae_id.as_str()) {
                v.push(at("sae_id"), format!("{name}: sae_id is used by another [[sae]]"));
            }
            if sae.certificate_sha256.is_none() && sae.common_name.is_none() {
                v.push(
                    at("sae_id"),
                    format!("{name}: give certificate_sha256 and/or common_name to recognise its client certificate"),
                );
            }
            if let Some(fp) = &sae.certificate_sha256 {
                match parse_fingerprint(fp) {
                    Some(bytes) => {
                        if let Some(other) = fingerprints.insert(bytes, &sae.sae_id) {
                            v.push(
                                at("certificate_sha256"),
                                format!(
                                    "{name}: certificate_sha256 is also the fingerprint of [[sae]] {other:?}"
                                ),
                            );
                        }
                    }
                    None => v.push(
                        at("certificate_sha256"),
                        format!("{name}: certificate_sha256 must be 64 hex digits (colons allowed)"),
                    ),
                }
            }
            if let Some(cn) = &sae.common_name {
                if cn.is_empty() {
                    v.push(at("common_name"), format!("{name}: common_name must not be empty"));
                } else if sae.certificate_sha256.is_none() && *cn != sae.sae_id {
                    v.push(
                        at("common_name"),
                        format!(
                            "{name}: common_name {cn:?} alone must equal sae_id (the key service takes the SAE ID from the certificate's CN); pin certificate_sha256 to map another CN"
                        ),
                    );
                } else if sae.certificate_sha256.is_none()
                    && let Some(other) = cns.insert(cn, &sae.sae_id)
                {
                    v.push(
                        at("common_name"),
                        format!("{name}: common_name {cn:?} already identifies [[sae]] {other:?}"),
                    );
                }
            }
            for link in &sae.links {
                if !links.contains(link.as_str()) {
                    v.push(at("links"), format!("{name}: links names {link:?}, which is no [[link]] id"));
                }
            }
        }
    }

    fn validate_peer(&self, v: &mut Validator) {
        match &self.peer {
            None if !self.links.is_empty() => {
                v.push("link", "[peer] is required when a [[link]] is configured (the peer kmd channel)")
            }
            None => {}
            Some(peer) => {
                if peer.request_timeout_ms == 0 {
                    v.push("peer.request_timeout_ms", "[peer] request_timeout_ms must be positive");
                }
                check_secret_path(v, "peer.server_key", "[peer] server_key", &peer.server_key);
                check_secret_path(v, "peer.client_key", "[peer] client_key", &peer.client_key);
            }
        }
    }

    fn validate_listeners(&self, v: &mut Validator) {
        let mut seen: Vec<(&str, SocketAddr)> = vec![("etsi014.listen", self.etsi014.listen)];
        if let Some(peer) = &self.peer {
            seen.push(("peer.listen", peer.listen));
        }
        if self.metrics.enabled {
            seen.push(("metrics.listen", self.metrics.listen));
        }
        for (i, (key, addr)) in seen.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((other, _)) =
                seen[..i].iter().find(|(_, a)| a.port() == addr.port() && overlap(a, addr))
            {
                v.push(
                    *key,
                    format!("[{}] listen {addr} clashes with [{}] listen", section(key), section(other)),
                );
            }
        }
    }

    /// Checks that the PKCS#11 module and the PIN file exist (what `kmd check-config` adds; at
    /// start-up opening the HSM reports these itself). The PIN is not read.
    pub fn check_hsm_files(&self) -> Vec<Problem> {
        let mut v = Validator::default();
        if !self.hsm.module_path.is_file() {
            v.push(
                "hsm.module_path",
                format!(
                    "[hsm] module_path: {} is not a file (is the HSM client library installed? for SoftHSM2: apt-get install softhsm2)",
                    self.hsm.module_path.display()
                ),
            );
        }
        if let PinSource::File(pin) = &self.hsm.pin
            && let Err(e) = std::fs::File::open(pin)
        {
            v.push("hsm.pin", format!("[hsm] pin.file: cannot open {}: {e}", pin.display()));
        }
        v.problems
    }

    /// Checks the files the configuration names: certificates and keys are read and parsed, TLS
    /// server configurations built, the store's directory must exist. Errors name the key and
    /// the path; key contents never appear.
    pub fn check_files(&self) -> Vec<Problem> {
        let mut v = Validator::default();
        if let Some(parent) = self.store.path.parent()
            && !parent.as_os_str().is_empty()
            && !parent.is_dir()
        {
            v.push("store.path", format!("[store] path: directory {} does not exist", parent.display()));
        }
        let e = &self.etsi014;
        if let Err(p) = server_tls(
            "etsi014",
            &e.client_ca,
            "client_ca",
            &e.server_cert,
            "server_cert",
            &e.server_key,
            "server_key",
        ) {
            v.problems.push(p);
        }
        if let Some(peer) = &self.peer {
            if let Err(p) = server_tls(
                "peer",
                &peer.ca_cert,
                "ca_cert",
                &peer.server_cert,
                "server_cert",
                &peer.server_key,
                "server_key",
            ) {
                v.problems.push(p);
            }
            if let Err(p) =
                client_pair("peer", &peer.client_cert, "client_cert", &peer.client_key, "client_key")
            {
                v.problems.push(p);
            }
        }
        for (i, link) in self.links.iter().enumerate() {
            if let DeviceConfig::Kme(k) = &link.device {
                let base = format!("link[{i}].device.kme");
                for (key, path, is_key) in [
                    ("ca_cert", &k.ca_cert, false),
                    ("client_cert", &k.client_cert, false),
                    ("client_key", &k.client_key, true),
                ] {
                    let label = format!("[[link]] {:?} device.kme.{key}", link.id);
                    let result = read_file(&label, path).and_then(|pem| {
                        if is_key { parse_key(&label, path, &pem) } else { parse_certs(&label, path, &pem) }
                    });
                    if let Err(mut p) = result {
                        p.key = Some(format!("{base}.{key}"));
                        v.problems.push(p);
                    }
                }
            }
        }
        v.problems
    }

    /// The rustls configuration of the ETSI 014 server, from the files `[etsi014]` names.
    pub fn etsi014_tls(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, Problem> {
        let e = &self.etsi014;
        server_tls(
            "etsi014",
            &e.client_ca,
            "client_ca",
            &e.server_cert,
            "server_cert",
            &e.server_key,
            "server_key",
        )
    }

    /// The rustls configuration of the peer channel's server, if `[peer]` is configured.
    pub fn peer_tls(&self) -> Option<Result<std::sync::Arc<rustls::ServerConfig>, Problem>> {
        self.peer.as_ref().map(|p| {
            server_tls(
                "peer",
                &p.ca_cert,
                "ca_cert",
                &p.server_cert,
                "server_cert",
                &p.server_key,
                "server_key",
            )
        })
    }

    /// A multi-line human summary (what `kmd check-config` prints). No secret appears in it.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(s, "site      {} (KME ID {})", self.site.display_name(), self.site.kme_id);
        let token = match &self.hsm.token {
            TokenSelector::Label(l) => format!("token labelled {l:?}"),
            TokenSelector::Serial(n) => format!("token with serial {n:?}"),
        };
        let mechanism = match self.hsm.mechanism {
            WrapMechanism::AesKeyWrapPad { mechanism_id } => format!("aes-key-wrap-pad {mechanism_id:#x}"),
            WrapMechanism::AesGcm => "aes-gcm".into(),
        };
        let _ = writeln!(
            s,
            "hsm       {token} in {}, PIN from {}, wrapping key {:?} ({mechanism}), {} sessions",
            self.hsm.module_path.display(),
            self.hsm.pin,
            self.hsm.wrapping_key_label,
            self.hsm.pool_size
        );
        let _ = writeln!(s, "store     {}", self.store.path.display());
        let e = &self.etsi014;
        let _ = writeln!(
            s,
            "etsi014   https://{} (client CA {}); key_size {} bits, {}..={} bits, at most {} keys per request",
            e.listen,
            e.client_ca.display(),
            e.key_size,
            e.min_key_size,
            e.max_key_size,
            e.max_key_per_request
        );
        if self.saes.is_empty() {
            let _ = writeln!(s, "sae       none: every ETSI 014 request will be refused (401)");
        }
        for sae in &self.saes {
            let mut how = Vec::new();
            if let Some(fp) = &sae.certificate_sha256 {
                how.push(format!("certificate SHA-256 {}", fp.to_ascii_lowercase().replace(':', "")));
            }
            if let Some(cn) = &sae.common_name {
                how.push(format!("CN {cn:?}"));
            }
            let links = if sae.links.is_empty() { "no link".to_owned() } else { sae.links.join(", ") };
            let _ = writeln!(s, "sae       {} ({}); links: {links}", sae.sae_id, how.join(" and "));
        }
        if self.links.is_empty() {
            let _ = writeln!(s, "link      none: no key material will be produced");
        }
        for link in &self.links {
            let device = match &link.device {
                DeviceConfig::Serial(d) => {
                    format!("serial device {} at {} baud", d.path.display(), d.baud_rate)
                }
                DeviceConfig::Kme(k) => format!(
                    "ETSI 014 KME {} as {} SAE {} (peer SAE {})",
                    k.base_url,
                    match k.role {
                        KmeRole::Master => "master",
                        KmeRole::Slave => "slave",
                    },
                    k.sae_id,
                    k.peer_sae_id
                ),
            };
            let _ = writeln!(
                s,
                "link      {}: {device}; peer {} at {}; pool low/high/max {}/{}/{} blocks",
                link.id,
                link.peer_kme_id,
                link.peer_url,
                link.pool.low_water,
                link.pool.high_water,
                link.pool.max_blocks
            );
        }
        match &self.peer {
            Some(p) => {
                let _ = writeln!(s, "peer      https://{} (peer CA {})", p.listen, p.ca_cert.display());
            }
            None => {
                let _ = writeln!(s, "peer      not configured");
            }
        }
        if self.metrics.enabled {
            let _ = writeln!(s, "metrics   http://{}/metrics", self.metrics.listen);
        } else {
            let _ = writeln!(s, "metrics   disabled");
        }
        let format = self.log.format.map_or("journald under systemd, text otherwise", LogFormat::as_str);
        let _ = write!(s, "log       level {:?}, format {format}", self.log.level);
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Validation helpers
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { location: None, key: Some(key.into()), message: message.into() });
    }
}

fn section(key: &str) -> &str {
    key.split('.').next().unwrap_or(key)
}

fn overlap(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

/// IDs (KME, SAE, link) appear in URLs and metric labels: printable, no spaces or slashes.
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > 128 {
        return Err(format!("{id:?} is longer than 128 bytes"));
    }
    if let Some(c) =
        id.chars().find(|c| c.is_control() || c.is_whitespace() || matches!(c, '/' | '?' | '#' | '%' | '\\'))
    {
        return Err(format!("{id:?} contains {c:?}; use letters, digits and - _ . : @"));
    }
    Ok(())
}

fn check_https_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url:?} must start with https://"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}

fn validate_serial(s: &SerialConfig, name: &str, i: usize, v: &mut Validator) {
    let at = |k: &str| format!("link[{i}].device.serial.{k}");
    if s.path.as_os_str().is_empty() {
        v.push(at("path"), format!("{name}: device.serial.path must not be empty"));
    }
    if s.baud_rate == 0 {
        v.push(at("baud_rate"), format!("{name}: device.serial.baud_rate must be positive"));
    }
    if s.dead_after_ms <= s.ping_interval_ms {
        v.push(
            at("dead_after_ms"),
            format!(
                "{name}: device.serial.dead_after_ms ({}) must exceed ping_interval_ms ({})",
                s.dead_after_ms, s.ping_interval_ms
            ),
        );
    }
    for (key, ms) in [
        ("hello_interval_ms", s.hello_interval_ms),
        ("ping_interval_ms", s.ping_interval_ms),
        ("reopen_interval_ms", s.reopen_interval_ms),
    ] {
        if ms == 0 {
            v.push(at(key), format!("{name}: device.serial.{key} must be positive"));
        }
    }
}

fn validate_kme(k: &KmeDeviceConfig, name: &str, i: usize, v: &mut Validator) {
    let at = |key: &str| format!("link[{i}].device.kme.{key}");
    if let Err(why) = check_https_url(&k.base_url) {
        v.push(at("base_url"), format!("{name}: device.kme.base_url {why}"));
    }
    if k.key_size_bits == 0 || !k.key_size_bits.is_multiple_of(8) {
        v.push(
            at("key_size_bits"),
            format!(
                "{name}: device.kme.key_size_bits ({}) must be a positive multiple of 8",
                k.key_size_bits
            ),
        );
    }
    if k.keys_per_request == 0 {
        v.push(at("keys_per_request"), format!("{name}: device.kme.keys_per_request must be at least 1"));
    }
    for (key, ms) in [
        ("poll_interval_ms", k.poll_interval_ms),
        ("request_timeout_ms", k.request_timeout_ms),
        ("max_backoff_ms", k.max_backoff_ms),
    ] {
        if ms == 0 {
            v.push(at(key), format!("{name}: device.kme.{key} must be positive"));
        }
    }
    for (key, id) in [("sae_id", &k.sae_id), ("peer_sae_id", &k.peer_sae_id)] {
        if let Err(why) = check_id(id) {
            v.push(at(key), format!("{name}: device.kme.{key} {why}"));
        }
    }
    check_secret_path(v, &at("client_key"), &format!("{name}: device.kme.client_key"), &k.client_key);
}

/// A private key is named by path, never given inline.
fn check_secret_path(v: &mut Validator, key: &str, label: &str, path: &Path) {
    let text = path.to_string_lossy();
    if text.contains("-----BEGIN") || text.contains('\n') {
        v.push(
            key,
            format!(
                "{label} holds PEM text; give the path of the key file instead (secrets are never inline)"
            ),
        );
    } else if path.as_os_str().is_empty() {
        v.push(key, format!("{label} must not be empty"));
    }
}

/// Parses a SHA-256 fingerprint: 64 hex digits, colons allowed.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = text.bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Refuses an inline PIN before serde sees (and would quote) it.
fn probe_secrets(doc: &Spanned<DeTable<'_>>, text: &str) -> Vec<Problem> {
    const HOW: &str = "give pin = { file = \"/absolute/path\" } (for example a systemd credential) or pin = { env = \"VARIABLE\" }";
    let mut problems = Vec::new();
    let Some(hsm) = doc.get_ref().get("hsm") else { return problems };
    let DeValue::Table(hsm) = hsm.get_ref() else { return problems };
    let Some(pin) = hsm.get("pin") else { return problems };
    let at = |span: std::ops::Range<usize>| Some(line_col(text, span.start));
    let mut refuse = |span, message: String| {
        problems.push(Problem { location: at(span), key: Some("hsm.pin".into()), message });
    };
    match pin.get_ref() {
        DeValue::Table(t) => {
            for (k, value) in t.iter() {
                match (k.get_ref().as_ref(), value.get_ref()) {
                    ("env", DeValue::String(name)) if !is_env_name(name) => refuse(
                        value.span(),
                        format!(
                            "[hsm] pin.env must name an environment variable (letters, digits, _; not starting with a digit); \
                             the value given looks like an inline PIN, which is never accepted: {HOW}"
                        ),
                    ),
                    ("file", DeValue::String(path)) if !Path::new(path.as_ref()).is_absolute() => refuse(
                        value.span(),
                        format!(
                            "[hsm] pin.file must be an absolute path; a relative value may be the PIN itself, which is never accepted inline: {HOW}"
                        ),
                    ),
                    ("env" | "file", DeValue::String(_)) => {}
                    ("env" | "file", _) => refuse(
                        value.span(),
                        format!(
                            "[hsm] pin.{} must be a string; the PIN itself is never accepted inline: {HOW}",
                            k.get_ref()
                        ),
                    ),
                    _ => refuse(
                        k.span(),
                        format!(
                            "[hsm] pin: unknown source `{}`; the PIN itself is never accepted inline: {HOW}",
                            k.get_ref()
                        ),
                    ),
                }
            }
        }
        _ => refuse(pin.span(), format!("[hsm] pin: an inline PIN is never accepted: {HOW}")),
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Locations
// ---------------------------------------------------------------------------------------------

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// `link[0].pool.low_water` → `link[0].pool.low_water` as TOML readers know it: unchanged, but
/// a top-level key gets its table brackets (`[site]`).
fn toml_key(key: &str) -> String {
    if key.contains('.') || key.contains('[') { key.to_owned() } else { format!("[{key}]") }
}

/// The dotted key whose key or value span is the smallest one containing `offset`.
fn key_at(doc: &DeTable<'_>, offset: usize) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    walk(doc, "", offset, &mut best);
    best.map(|(_, k)| k)
}

fn consider(span: std::ops::Range<usize>, offset: usize, path: &str, best: &mut Option<(usize, String)>) {
    if span.start <= offset && offset < span.end.max(span.start + 1) {
        let len = span.end - span.start;
        if best.as_ref().is_none_or(|(l, _)| len <= *l) {
            *best = Some((len, path.to_owned()));
        }
    }
}

fn walk(table: &DeTable<'_>, prefix: &str, offset: usize, best: &mut Option<(usize, String)>) {
    for (k, value) in table.iter() {
        let path =
            if prefix.is_empty() { k.get_ref().to_string() } else { format!("{prefix}.{}", k.get_ref()) };
        consider(k.span(), offset, &path, best);
        consider(value.span(), offset, &path, best);
        walk_value(value, &path, offset, best);
    }
}

fn walk_value(value: &Spanned<DeValue<'_>>, path: &str, offset: usize, best: &mut Option<(usize, String)>) {
    match value.get_ref() {
        DeValue::Table(t) => walk(t, path, offset, best),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{path}[{i}]");
                consider(item.span(), offset, &path, best);
                walk_value(item, &path, offset, best);
            }
        }
        _ => {}
    }
}

/// The start of the key named by a dotted path, or of its nearest present ancestor.
fn span_of(doc: &DeTable<'_>, key: &str) -> Option<usize> {
    let mut found = None;
    let mut table = Some(doc);
    let mut current: Option<&Spanned<DeValue<'_>>> = None;
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let t = match (table, current) {
            (Some(t), None) => t,
            (_, Some(v)) => match v.get_ref() {
                DeValue::Table(t) => t,
                _ => break,
            },
            (None, None) => break,
        };
        let Some((k, v)) = t.get_key_value(name) else { break };
        found = Some(k.span().start);
        current = Some(v);
        table = None;
        if let Some(i) = index {
            match v.get_ref() {
                DeValue::Array(items) if i < items.len() => {
                    let item = &items[i];
                    if let DeValue::Table(t) = item.get_ref()
                        && let Some((first, _)) = t.iter().min_by_key(|(k, _)| k.span().start)
                    {
                        found = Some(first.span().start);
                    }
                    current = Some(item);
                }
                _ => break,
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

fn file_problem(label: &str, message: String) -> Problem {
    Problem { location: None, key: None, message: format!("{label}: {message}") }
}

fn read_file(label: &str, path: &Path) -> Result<Vec<u8>, Problem> {
    std::fs::read(path).map_err(|e| file_problem(label, format!("cannot read {}: {e}", path.display())))
}

fn parse_certs(label: &str, path: &Path, pem: &[u8]) -> Result<(), Problem> {
    etsi014::tls::parse_certs(pem, "certificate")
        .map(drop)
        .map_err(|e| file_problem(label, format!("{}: {e}", path.display())))
}

fn parse_key(label: &str, path: &Path, pem: &[u8]) -> Result<(), Problem> {
    etsi014::tls::parse_key(pem)
        .map(drop)
        .map_err(|e| file_problem(label, format!("{}: {e}", path.display())))
}

/// Reads and parses a client certificate chain and its key.
fn client_pair(section: &str, cert: &Path, cert_key: &str, key: &Path, key_key: &str) -> Result<(), Problem> {
    let with_key = |mut p: Problem, k: &str| {
        p.key = Some(format!("{section}.{k}"));
        p
    };
    let label = |k: &str| format!("[{section}] {k}");
    let cert_pem = read_file(&label(cert_key), cert).map_err(|p| with_key(p, cert_key))?;
    parse_certs(&label(cert_key), cert, &cert_pem).map_err(|p| with_key(p, cert_key))?;
    let key_pem = zeroize::Zeroizing::new(read_file(&label(key_key), key).map_err(|p| with_key(p, key_key))?);
    parse_key(&label(key_key), key, &key_pem).map_err(|p| with_key(p, key_key))
}

/// Reads and parses a server's CA, certificate chain and key, then builds the rustls
/// configuration (which also checks that the key belongs to the certificate).
fn server_tls(
    section: &str,
    ca: &Path,
    ca_key: &str,
    cert: &Path,
    cert_key: &str,
    key: &Path,
    key_key: &str,
) -> Result<std::sync::Arc<rustls::ServerConfig>, Problem> {
    let label = |k: &str| format!("[{section}] {k}");
    let with_key = |mut p: Problem, k: &str| {
        p.key = Some(format!("{section}.{k}"));
        p
    };
    let ca_pem = read_file(&label(ca_key), ca).map_err(|p| with_key(p, ca_key))?;
    parse_certs(&label(ca_key), ca, &ca_pem).map_err(|p| with_key(p, ca_key))?;
    let cert_pem = read_file(&label(cert_key), cert).map_err(|p| with_key(p, cert_key))?;
    parse_certs(&label(cert_key), cert, &cert_pem).map_err(|p| with_key(p, cert_key))?;
    let mut key_pem =
        zeroize::Zeroizing::new(read_file(&label(key_key), key).map_err(|p| with_key(p, key_key))?);
    parse_key(&label(key_key), key, &key_pem).map_err(|p| with_key(p, key_key))?;
    // Moves the buffer (no copy); `TlsPem` wipes it when dropped.
    let tls = etsi014::tls::TlsPem::new(ca_pem, cert_pem, std::mem::take(&mut *key_pem));
    etsi014::server::server_config(&tls).map_err(|e| {
        with_key(
            file_problem(
                &format!("[{section}] {cert_key}/{key_key}"),
                format!("{} and {}: {e}", cert.display(), key.display()),
            ),
            cert_key,
        )
    })
}

#[cfg(test)]
mod tests;
