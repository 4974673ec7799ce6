//! Prometheus metrics: the families kmd exports, the [`Metrics`] handle the rest of the daemon
//! updates, and the plain-HTTP listener that serves them (`GET /metrics`, text exposition format
//! 0.0.4).
//!
//! Built on `prometheus-client` 0.26, whose `encoding::prometheus_text` encoder writes the
//! Prometheus 0.0.4 text format (`# HELP`, `# TYPE`, counters with `_total`, no OpenMetrics
//! `# EOF`), so Prometheus 2.x and `promtool check metrics` read it as is.
//!
//! | family | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `kmd_build_info` | gauge | `version` | always 1 |
//! | `process_start_time_seconds` | gauge | | start of the process, Unix seconds |
//! | `kmd_keys_available` | gauge | `link` | keys of the default size this kmd can still hand out |
//! | `kmd_keys_assigned` | gauge | `link`, `master_sae`, `slave_sae` | keys assigned to an SAE pair, not yet delivered |
//! | `kmd_keys_delivered` | gauge | `link`, `master_sae`, `slave_sae` | keys delivered to the pair (history kept in the store) |
//! | `kmd_key_blocks` | gauge | `link`, `state` | stored key blocks by state |
//! | `kmd_key_blocks_received_total` | counter | `link` | key blocks the device delivered |
//! | `kmd_key_blocks_rejected_total` | counter | `link`, `reason` | key blocks refused, by reason |
//! | `kmd_device_link_state` | gauge | `link`, `state` | 1 for the link's current state, 0 for the others |
//! | `kmd_device_alarms_total` | counter | `link`, `severity` | alarms raised by the device |
//! | `kmd_link_qber_ratio` | gauge | `link` | quantum bit error rate from telemetry (0..1) |
//! | `kmd_link_secret_key_rate_bytes_per_second` | gauge | `link` | secret key rate from telemetry (bytes: Prometheus' base unit; ×8 for bit/s) |
//! | `kmd_hsm_operation_duration_seconds` | histogram | `op` | HSM call latency |
//! | `kmd_hsm_operation_errors_total` | counter | `op` | HSM calls that failed |
//! | `kmd_hsm_healthy` | gauge | | 1 while the last HSM health check passed |
//! | `kmd_etsi014_requests_total` | counter | `endpoint`, `status` | ETSI 014 requests answered |
//! | `kmd_etsi014_request_duration_seconds` | histogram | `endpoint`, `status` | ETSI 014 request latency |
//! | `kmd_peer_sync_state` | gauge | `link`, `state` | 1 for the peer channel's current state per link |
//! | `kmd_tls_certificate_expiry_timestamp_seconds` | gauge | `certificate` | not-after time of each certificate kmd presents (`etsi014_server`, `peer_server`, `peer_client`), Unix seconds |

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use qkd_device::{Alarm, LinkState, LinkTelemetry, Severity};

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabel {
    link: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkStateLabel {
    link: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabel {
    link: String,
    master_sae: String,
    slave_sae: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabel {
    link: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SeverityLabel {
    link: String,
    severity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabel {
    certificate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EtsiLabel {
    endpoint: String,
    status: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Why a key block was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The device reported another link ID than the configured one.
    LinkMismatch,
    /// The block was already stored.
    Duplicate,
    /// Same block ID, different key check value than the stored copy.
    Conflict,
    /// The link already stores `[link.pool] max_blocks`.
    PoolFull,
    /// The peer kmd's copy has another key check value.
    KcvMismatch,
    /// Not confirmed by the peer in time.
    Stale,
    /// Empty or oversized.
    Invalid,
    /// The store (or the HSM behind it) failed.
    StoreError,
}

impl RejectReason {
    /// Every reason, in label order.
    pub const ALL: [RejectReason; 8] = [
        Self::LinkMismatch,
        Self::Duplicate,
        Self::Conflict,
        Self::PoolFull,
        Self::KcvMismatch,
        Self::Stale,
        Self::Invalid,
        Self::StoreError,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LinkMismatch => "link_mismatch",
            Self::Duplicate => "duplicate",
            Self::Conflict => "conflict",
            Self::PoolFull => "pool_full",
            Self::KcvMismatch => "kcv_mismatch",
            Self::Stale => "stale",
            Self::Invalid => "invalid",
            Self::StoreError => "store_error",
        }
    }
}

/// A device link's state as `kmd_device_link_state` shows it: the device's own quantum link
/// state, or `disconnected` while kmd cannot reach the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceLinkState {
    /// kmd has no session with the device.
    Disconnected,
    /// Connected, no telemetry yet.
    Connected,
    /// No quantum signal.
    Down,
    /// Starting up or realigning.
    Aligning,
    /// Distilling key.
    Up,
    /// Aborted for security (QBER above threshold).
    SecurityAbort,
    /// Hardware fault.
    Fault,
}

impl DeviceLinkState {
    /// Every state, in label order.
    pub const ALL: [DeviceLinkState; 7] = [
        Self::Disconnected,
        Self::Connected,
        Self::Down,
        Self::Aligning,
        Self::Up,
        Self::SecurityAbort,
        Self::Fault,
    ];

    /// The `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disconnected => "disconnected",
            Self::Connected => "connected",
            Self::Down => "down",
            Self::Aligning => "aligning",
            Self::Up => "up",
            Self::SecurityAbort => "security_abort",
            Self::Fault => "fault",
        }
    }
}

impl From<LinkState> for DeviceLinkState {
    fn from(s: LinkState) -> Self {
        match s {
            LinkState::Down => Self::Down,
            LinkState::Aligning => Self::Aligning,
            LinkState::Up => Self::Up,
            LinkState::SecurityAbort => Self::SecurityAbort,
            LinkState::Fault => Self::Fault,
        }
    }
}

/// The peer channel's state for one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerSyncState {
    /// No session with the peer kmd.
    Down,
    /// Connecting or exchanging the initial state.
    Connecting,
    /// In step with the peer kmd.
    Up,
}

impl PeerSyncState {
    /// Every state, in label order.
    pub const ALL: [PeerSyncState; 3] = [Self::Down, Self::Connecting, Self::Up];

    /// The `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Down => "down",
            Self::Connecting => "connecting",
            Self::Up => "up",
        }
    }
}

/// What an HSM call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HsmOp {
    /// Opening the token (module load, login, wrapping key lookup).
    Open,
    /// Wrapping a key.
    Wrap,
    /// Unwrapping a key.
    Unwrap,
    /// The periodic health check (token present, wrap/unwrap round trip).
    HealthCheck,
}

impl HsmOp {
    /// Every operation, in label order.
    pub const ALL: [HsmOp; 4] = [Self::Open, Self::Wrap, Self::Unwrap, Self::HealthCheck];

    /// The `op` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Wrap => "wrap",
            Self::Unwrap => "unwrap",
            Self::HealthCheck => "health_check",
        }
    }
}

/// The ETSI 014 endpoint a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtsiEndpoint {
    /// `…/status`.
    Status,
    /// `…/enc_keys`.
    EncKeys,
    /// `…/dec_keys`.
    DecKeys,
    /// Anything else.
    Other,
}

impl EtsiEndpoint {
    /// Classifies a request path.
    pub fn of_path(path: &str) -> Self {
        let path = path.trim_end_matches('/');
        if !path.starts_with("/api/v1/keys/") {
            Self::Other
        } else if path.ends_with("/status") {
            Self::Status
        } else if path.ends_with("/enc_keys") {
            Self::EncKeys
        } else if path.ends_with("/dec_keys") {
            Self::DecKeys
        } else {
            Self::Other
        }
    }

    /// The `endpoint` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::EncKeys => "enc_keys",
            Self::DecKeys => "dec_keys",
            Self::Other => "other",
        }
    }
}

/// Keys of one SAE pair on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairStock {
    /// Master SAE ID.
    pub master_sae: String,
    /// Slave SAE ID.
    pub slave_sae: String,
    /// Assigned, not yet delivered.
    pub assigned: u64,
    /// Delivered (history kept in the store).
    pub delivered: u64,
}

/// The key stock of one link, as the store reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyStock {
    /// Keys of the default size this kmd can still hand out.
    pub available_keys: u64,
    /// Stored blocks by state (`unconfirmed`, `confirmed`, ...).
    pub blocks: Vec<(String, u64)>,
    /// Per SAE pair.
    pub pairs: Vec<PairStock>,
}

fn hsm_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

fn etsi_histogram() -> Histogram {
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

/// Every metric kmd exports. Shared (`Arc<Metrics>`) by all tasks; updates are lock-free
/// atomics (label lookups take a short read lock).
pub struct Metrics {
    registry: Registry,
    keys_available: Family<LinkLabel, Gauge>,
    keys_assigned: Family<PairLabel, Gauge>,
    keys_delivered: Family<PairLabel, Gauge>,
    key_blocks: Family<LinkStateLabel, Gauge>,
    blocks_received: Family<LinkLabel, Counter>,
    blocks_rejected: Family<RejectLabel, Counter>,
    link_state: Family<LinkStateLabel, Gauge>,
    alarms: Family<SeverityLabel, Counter>,
    qber: Family<LinkLabel, FloatGauge>,
    secret_rate: Family<LinkLabel, FloatGauge>,
    hsm_duration: HistogramFamily<OpLabel>,
    hsm_errors: Family<OpLabel, Counter>,
    hsm_healthy: Gauge,
    etsi_requests: Family<EtsiLabel, Counter>,
    etsi_duration: HistogramFamily<EtsiLabel>,
    peer_sync: Family<LinkStateLabel, Gauge>,
    certificate_expiry: Family<CertificateLabel, Gauge>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family; `process_start_time_seconds` is now.
    pub fn new() -> Self {
        let mut registry = Registry::default();

        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info.get_or_create(&VersionLabel { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        registry.register("kmd_build_info", "kmd version; always 1", build_info);

        let start = FloatGauge::default();
        start.set(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            start,
        );

        let m = Self {
            keys_available: Family::default(),
            keys_assigned: Family::default(),
            keys_delivered: Family::default(),
            key_blocks: Family::default(),
            blocks_received: Family::default(),
            blocks_rejected: Family::default(),
            link_state: Family::default(),
            alarms: Family::default(),
            qber: Family::default(),
            secret_rate: Family::default(),
            hsm_duration: Family::new_with_constructor(hsm_histogram),
            hsm_errors: Family::default(),
            hsm_healthy: Gauge::default(),
            etsi_requests: Family::default(),
            etsi_duration: Family::new_with_constructor(etsi_histogram),
            peer_sync: Family::default(),
            certificate_expiry: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "kmd_keys_available",
            "Keys of the default ETSI 014 key size this kmd can still hand out on the link",
            m.keys_available.clone(),
        );
        registry.register(
            "kmd_keys_assigned",
            "Keys assigned to an SAE pair and not yet delivered",
            m.keys_assigned.clone(),
        );
        registry.register(
            "kmd_keys_delivered",
            "Keys delivered to an SAE pair (history kept in the key store)",
            m.keys_delivered.clone(),
        );
        registry.register("kmd_key_blocks", "Stored key blocks by state", m.key_blocks.clone());
        registry.register(
            "kmd_key_blocks_received",
            "Key blocks the QKD device delivered",
            m.blocks_received.clone(),
        );
        registry.register(
            "kmd_key_blocks_rejected",
            "Key blocks that were not stored, by reason",
            m.blocks_rejected.clone(),
        );
        registry.register(
            "kmd_device_link_state",
            "State of the QKD device link: 1 for the current state, 0 for the others",
            m.link_state.clone(),
        );
        registry.register(
            "kmd_device_alarms",
            "Alarms raised by the QKD device, by severity",
            m.alarms.clone(),
        );
        registry.register(
            "kmd_link_qber_ratio",
            "Quantum bit error rate the device last reported (0 to 1)",
            m.qber.clone(),
        );
        registry.register(
            "kmd_link_secret_key_rate_bytes_per_second",
            "Secret key rate the device last reported, in bytes per second (multiply by 8 for bit/s)",
            m.secret_rate.clone(),
        );
        registry.register(
            "kmd_hsm_operation_duration_seconds",
            "Latency of HSM operations",
            m.hsm_duration.clone(),
        );
        registry.register("kmd_hsm_operation_errors", "HSM operations that failed", m.hsm_errors.clone());
        registry.register(
            "kmd_hsm_healthy",
            "1 while the last HSM health check passed, 0 otherwise",
            m.hsm_healthy.clone(),
        );
        registry.register(
            "kmd_etsi014_requests",
            "ETSI GS QKD 014 requests answered, by endpoint and HTTP status",
            m.etsi_requests.clone(),
        );
        registry.register(
            "kmd_etsi014_request_duration_seconds",
            "Latency of ETSI GS QKD 014 requests, by endpoint and HTTP status",
            m.etsi_duration.clone(),
        );
        registry.register(
            "kmd_peer_sync_state",
            "State of the channel to the peer kmd per link: 1 for the current state, 0 for the others",
            m.peer_sync.clone(),
        );
        registry.register(
            "kmd_tls_certificate_expiry_timestamp_seconds",
            "Not-after time of each TLS certificate kmd presents, in Unix seconds",
            m.certificate_expiry.clone(),
        );
        for op in HsmOp::ALL {
            let _ = m.hsm_errors.get_or_create(&OpLabel { op: op.as_str().into() });
        }
        Self { registry, ..m }
    }

    /// Creates a link's series at their initial values (disconnected, peer down, nothing
    /// received), so dashboards and alerts see the link before anything happens on it.
    pub fn register_link(&self, link: &str) {
        let _ = self.blocks_received.get_or_create(&link_label(link));
        for reason in RejectReason::ALL {
            let _ = self
                .blocks_rejected
                .get_or_create(&RejectLabel { link: link.into(), reason: reason.as_str().into() });
        }
        let _ = self.keys_available.get_or_create(&link_label(link));
        self.set_link_state(link, DeviceLinkState::Disconnected);
        self.set_peer_sync(link, PeerSyncState::Down);
    }

    /// A key block arrived from the device.
    pub fn key_block_received(&self, link: &str) {
        self.blocks_received.get_or_create(&link_label(link)).inc();
    }

    /// A key block was not stored.
    pub fn key_block_rejected(&self, link: &str, reason: RejectReason) {
        self.blocks_rejected
            .get_or_create(&RejectLabel { link: link.into(), reason: reason.as_str().into() })
            .inc();
    }

    /// Sets the link's state (1 for `state`, 0 for every other state).
    pub fn set_link_state(&self, link: &str, state: DeviceLinkState) {
        for s in DeviceLinkState::ALL {
            self.link_state
                .get_or_create(&LinkStateLabel { link: link.into(), state: s.as_str().into() })
                .set(i64::from(s == state));
        }
    }

    /// Records telemetry: link state, QBER, secret key rate.
    pub fn telemetry(&self, link: &str, t: &LinkTelemetry) {
        self.set_link_state(link, t.link_state.into());
        if let Some(q) = t.qber.filter(|q| q.is_finite()) {
            self.qber.get_or_create(&link_label(link)).set(q);
        }
        if let Some(r) = t.secret_rate_bps.filter(|r| r.is_finite()) {
            self.secret_rate.get_or_create(&link_label(link)).set(r / 8.0);
        }
    }

    /// Counts an alarm when it is raised.
    pub fn alarm(&self, link: &str, alarm: &Alarm) {
        if alarm.raised {
            let severity = match alarm.severity {
                Severity::Info => "info",
                Severity::Warning => "warning",
                Severity::Critical => "critical",
            };
            self.alarms.get_or_create(&SeverityLabel { link: link.into(), severity: severity.into() }).inc();
        }
    }

    /// Records one HSM call.
    pub fn observe_hsm(&self, op: HsmOp, elapsed: Duration, ok: bool) {
        let label = OpLabel { op: op.as_str().into() };
        self.hsm_duration.get_or_create(&label).observe(elapsed.as_secs_f64());
        if !ok {
            self.hsm_errors.get_or_create(&label).inc();
        }
    }

    /// Sets `kmd_hsm_healthy`.
    pub fn set_hsm_healthy(&self, healthy: bool) {
        self.hsm_healthy.set(i64::from(healthy));
    }

    /// Records one ETSI 014 request.
    pub fn observe_etsi(&self, endpoint: EtsiEndpoint, status: u16, elapsed: Duration) {
        let label = EtsiLabel { endpoint: endpoint.as_str().into(), status: status.to_string() };
        self.etsi_requests.get_or_create(&label).inc();
        self.etsi_duration.get_or_create(&label).observe(elapsed.as_secs_f64());
    }

    /// Sets a link's peer channel state (1 for `state`, 0 for the others).
    pub fn set_peer_sync(&self, link: &str, state: PeerSyncState) {
        for s in PeerSyncState::ALL {
            self.peer_sync
                .get_or_create(&LinkStateLabel { link: link.into(), state: s.as_str().into() })
                .set(i64::from(s == state));
        }
    }

    /// Sets a link's key stock gauges from the store's counts.
    pub fn set_key_stock(&self, link: &str, stock: &KeyStock) {
        self.keys_available.get_or_create(&link_label(link)).set(clamp(stock.available_keys));
        for (state, n) in &stock.blocks {
            self.key_blocks
                .get_or_create(&LinkStateLabel { link: link.into(), state: state.clone() })
                .set(clamp(*n));
        }
        for pair in &stock.pairs {
            let label = PairLabel {
                link: link.into(),
                master_sae: pair.master_sae.clone(),
                slave_sae: pair.slave_sae.clone(),
            };
            self.keys_assigned.get_or_create(&label).set(clamp(pair.assigned));
            self.keys_delivered.get_or_create(&label).set(clamp(pair.delivered));
        }
    }

    /// Records the not-after time of each `(name, PEM file)` certificate (the first one in the
    /// file: the leaf of a chain), for the certificate-expiry alert. A file that cannot be read
    /// or parsed is logged and skipped: start-up has already checked the files, and a missing
    /// series is itself visible to the alert rules (`absent`).
    pub fn set_certificate_expiry(&self, certificates: &[(&str, &std::path::Path)]) {
        for (name, path) in certificates {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject as _;
            let parsed = CertificateDer::from_pem_file(path).map_err(|e| e.to_string()).and_then(|der| {
                not_after_unix(&der).ok_or_else(|| "no X.509 validity in the first certificate".to_owned())
            });
            match parsed {
                Ok(not_after) => {
                    self.certificate_expiry
                        .get_or_create(&CertificateLabel { certificate: (*name).into() })
                        .set(not_after);
                }
                Err(e) => tracing::warn!(
                    certificate = name,
                    path = %path.display(),
                    error = %e,
                    "cannot read the certificate's expiry for kmd_tls_certificate_expiry_timestamp_seconds"
                ),
            }
        }
    }

    /// The exposition, Prometheus text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// `notAfter` of a DER X.509 certificate, Unix seconds (RFC 5280 § 4.1: Certificate →
/// tbsCertificate → [version], serialNumber, signature, issuer, validity { notBefore, notAfter }).
/// Read by hand: rcgen 0.14 no longer parses certificates into parameters, and the walk is short.
fn not_after_unix(der: &[u8]) -> Option<i64> {
    /// One DER element: tag, contents, what follows.
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            (rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b)), &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let (0x30, certificate, _) = tlv(der)? else { return None };
    let (0x30, tbs, _) = tlv(certificate)? else { return None };
    let (tag, _, mut rest) = tlv(tbs)?;
    if tag == 0xa0 {
        // [0] version; the serial number follows.
        rest = tlv(rest)?.2;
    }
    let rest = tlv(rest)?.2; // signature algorithm
    let rest = tlv(rest)?.2; // issuer
    let (0x30, validity, _) = tlv(rest)? else { return None };
    let (_, _, after_not_before) = tlv(validity)?;
    let (tag, time, _) = tlv(after_not_before)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        // UTCTime YYMMDDHHMMSSZ: 50..99 are 19xx (RFC 5280 § 4.1.2.5.1).
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        // GeneralizedTime YYYYMMDDHHMMSSZ.
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    if rest.len() != 10 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field = |i: usize| rest.get(i..i + 2).and_then(|f| f.parse::<i64>().ok());
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    // Days from 1970-01-01 to the civil date (H. Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

fn link_label(link: &str) -> LinkLabel {
    LinkLabel { link: link.into() }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The metrics listener's router: `GET /metrics`; everything else is 404.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(move || async move { exposition(&metrics) }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; metrics are at /metrics\n") })
}

fn exposition(metrics: &Metrics) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE), (header::CACHE_CONTROL, "no-store")], metrics.encode())
        .into_response()
}

/// Serves [`router`] on `listener` (plain HTTP/1.1) until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local: Option<SocketAddr> = listener.local_addr().ok();
    if let Some(local) = local {
        tracing::info!(%local, "metrics listener serving /metrics");
    }
    axum::serve(listener, router(metrics)).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_classified() {
        assert_eq!(EtsiEndpoint::of_path("/api/v1/keys/B/status"), EtsiEndpoint::Status);
        assert_eq!(EtsiEndpoint::of_path("/api/v1/keys/B/enc_keys"), EtsiEndpoint::EncKeys);
        assert_eq!(EtsiEndpoint::of_path("/api/v1/keys/B/dec_keys/"), EtsiEndpoint::DecKeys);
        assert_eq!(EtsiEndpoint::of_path("/api/v1/keys/B/other"), EtsiEndpoint::Other);
        assert_eq!(EtsiEndpoint::of_path("/status"), EtsiEndpoint::Other);
    }

    #[test]
    fn link_state_is_one_hot() {
        let m = Metrics::new();
        m.register_link("A-B");
        m.set_link_state("A-B", DeviceLinkState::Up);
        let text = m.encode();
        assert!(text.contains("kmd_device_link_state{link=\"A-B\",state=\"up\"} 1\n"), "{text}");
        assert!(text.contains("kmd_device_link_state{link=\"A-B\",state=\"disconnected\"} 0\n"), "{text}");
        assert!(text.contains("# TYPE kmd_key_blocks_received_total counter\n"), "{text}");
        assert!(text.contains("kmd_peer_sync_state{link=\"A-B\",state=\"down\"} 1\n"), "{text}");
        assert!(!text.contains("# EOF"), "0.0.4 text has no EOF marker");
    }

    #[test]
    fn certificate_expiry_is_the_not_after_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["kmd.test".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = dir.path().join("server.pem");
        std::fs::write(&path, cert.pem()).unwrap();
        let m = Metrics::new();
        m.set_certificate_expiry(&[
            ("etsi014_server", &path),
            ("peer_client", &dir.path().join("missing.pem")),
        ]);
        let text = m.encode();
        // 2031-01-02T00:00:00Z
        assert!(
            text.contains(
                "kmd_tls_certificate_expiry_timestamp_seconds{certificate=\"etsi014_server\"} 1925078400\n"
            ),
            "{text}"
        );
        assert!(!text.contains("peer_client"), "an unreadable file gives no series: {text}");
        // After 2049 the time is a GeneralizedTime rather than a UTCTime (2051-03-04T00:00:00Z).
        params.not_after = rcgen::date_time_ymd(2051, 3, 4);
        std::fs::write(&path, params.self_signed(&key).unwrap().pem()).unwrap();
        m.set_certificate_expiry(&[("peer_server", &path)]);
        let text = m.encode();
        assert!(text.contains("{certificate=\"peer_server\"} 2561500800\n"), "{text}");
    }
}
