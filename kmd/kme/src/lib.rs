//! `kmd-kme`: the key management entity (KME) logic of kmd, independent of configuration files
//! and process lifecycle.
//!
//! A [`Kme`] sits on one [`KeyPool`] and serves:
//!
//! - the **ETSI GS QKD 014 V1.1.1** key delivery API to local SAEs ([`Kme::etsi_router`]):
//!   `status`, `enc_keys` (GET and POST), `dec_keys` (GET and POST), the caller identified by
//!   its client certificate ([`etsi014::server::CallerSae`]), errors in the specification's
//!   format;
//! - the **kmd peer protocol** (`docs/kmd-peer-protocol.md`) to the peer kmd at the other end
//!   of each QKD link ([`Kme::peer_router`]), the caller authenticated as that peer KME
//!   (certificate subject CN = its KME ID, or a pinned SHA-256 fingerprint);
//! - the **peer client and background tasks** ([`Kme::spawn_sync`]): block confirmation,
//!   retried discards (among them those of keys reserved but never delivered before a restart,
//!   dropped by [`Kme::new`] before anything is served), status polling (peer up/down);
//! - the **device feed** ([`Kme::accept_block`]).
//!
//! `enc_keys` follows § 5 of the peer protocol: reserve in the pool, push the assignment to the
//! peer, and only once the peer has durably accepted it mark the keys delivered and answer the
//! SAE. On a refusal, timeout or unreachable peer the keys are discarded at both ends and the
//! SAE gets 503: no SAE ever holds an encryption key its peer cannot serve for decryption.
//! Concurrent requests of one SAE pair are group-committed (`batch`): those arriving while a
//! batch is in flight share the next one — one reservation, one assignment POST, one
//! mark-delivered — and each gets its own keys; a batch the peer does not accept fails whole.
//!
//! Key bytes live only in [`zeroize::Zeroizing`] buffers and [`etsi014::KeyMaterial`]; they
//! never appear in `Debug` output or logs. The daemon mounts the routers with
//! [`etsi014::server::serve`] and reports metrics through a [`KmeObserver`].

#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod batch;
mod client;
mod etsi;
mod peer;
mod sync;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use etsi014::server::SaeIdentityMap;
use etsi014::tls::{TlsConfigError, TlsPem};
use kmd_keypool::{BlockMeta, InsertOutcome, KeyPool, PoolError, Side};
use tokio::sync::Notify;

pub use client::PeerError;
pub use etsi::LINK_EXTENSION;
pub use peer::{
    AcceptReply, AssignmentRequest, BlockCheckReply, BlockCheckRequest, DiscardReply, DiscardRequest,
    PROTOCOL_VERSION, PeerLinkStatus, PeerStatus, RefusalDetail, WireKey, WireVerdict,
};

/// Everything that can go wrong constructing or driving a [`Kme`] (request errors are answered
/// to the caller in the specification's format and never surface here).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmeError {
    /// The settings are inconsistent.
    #[error("KME settings: {0}")]
    Config(String),
    /// The key pool failed.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A peer's TLS material is unusable.
    #[error("peer TLS material of link {link_id}: {source}")]
    Tls {
        /// The link.
        link_id: String,
        /// What is wrong.
        #[source]
        source: TlsConfigError,
    },
    /// No such link.
    #[error("unknown link {0:?}")]
    UnknownLink(String),
    /// The peer kmd could not be reached or answered an error.
    #[error(transparent)]
    Peer(#[from] PeerError),
}

/// What a link's device last reported about the quantum channel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkTelemetry {
    /// Quantum bit error rate, 0..1.
    pub qber: Option<f64>,
    /// Secret key rate, bits per second.
    pub secret_key_rate_bps: Option<f64>,
    /// When it was observed, milliseconds since the Unix epoch.
    pub observed_unix_ms: u64,
}

/// One SAE pair a link serves: `local` (an SAE at this site) may ask for keys shared with
/// `remote` (an SAE at the peer site), as master (`enc_keys`) and as slave (`dec_keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaePair {
    /// SAE at this site.
    pub local: String,
    /// SAE at the peer site.
    pub remote: String,
}

impl SaePair {
    /// A pair.
    pub fn new(local: impl Into<String>, remote: impl Into<String>) -> Self {
        Self { local: local.into(), remote: remote.into() }
    }
}

/// How to reach and recognise the peer kmd of a link.
#[derive(Clone)]
pub struct PeerSettings {
    /// The peer's KME ID (its peer-channel certificate's subject CN unless `fingerprint` is set;
    /// also the ETSI status `target_KME_ID`).
    pub kme_id: String,
    /// The peer's peer-channel base URL, `https://host:port` (paths `/peer/v1/…` are appended).
    pub base_url: String,
    /// CA that issued the peer's certificates, and this kmd's peer-channel certificate and key.
    pub tls: TlsPem,
    /// Per-request time limit (`[peer] request_timeout_ms`, default 2 s).
    pub request_timeout: Duration,
    /// If set, the peer's client certificate must have this SHA-256 fingerprint (hex, colons
    /// allowed) instead of subject CN = `kme_id`.
    pub fingerprint: Option<String>,
}

impl std::fmt::Debug for PeerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSettings")
            .field("kme_id", &self.kme_id)
            .field("base_url", &self.base_url)
            .field("request_timeout", &self.request_timeout)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// One QKD link.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// Link ID (as in the key pool).
    pub link_id: String,
    /// This kmd's side on the link; must equal `Side::from_kme_ids(kme_id, peer.kme_id)`.
    pub side: Side,
    /// The peer kmd.
    pub peer: PeerSettings,
    /// SAE pairs allowed on this link.
    pub sae_pairs: Vec<SaePair>,
    /// How long this link keeps keys and history.
    pub retention: LinkRetention,
}

/// How long a link keeps what it holds (from the link's `[[link]]` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkRetention {
    /// Unconfirmed blocks older than this are discarded (`unconfirmed_grace_s`, 600 s).
    pub unconfirmed_grace: Duration,
    /// Keys the peer assigned that no local SAE fetched within this are erased
    /// (`assigned_key_ttl_s`, 1 day).
    pub assigned_key_ttl: Duration,
    /// Spent history older than this is pruned (`history_retention_days`, 30 days); must exceed
    /// any device's block redelivery window.
    pub history_retention: Duration,
}

impl Default for LinkRetention {
    fn default() -> Self {
        Self {
            unconfirmed_grace: Duration::from_secs(600),
            assigned_key_ttl: Duration::from_secs(86_400),
            history_retention: Duration::from_secs(30 * 86_400),
        }
    }
}

/// Timers of the background tasks ([`Kme::spawn_sync`]).
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Block-check exchange period (doc § 4: 1 s).
    pub block_check_interval: Duration,
    /// Unconfirmed blocks waiting that trigger an exchange at once (doc § 4: 256).
    pub block_check_trigger: u64,
    /// Peer status poll period (doc § 8: 5 s).
    pub status_interval: Duration,
    /// Failed polls in a row that mark the peer down (doc § 8: 3).
    pub down_after_failures: u32,
    /// First retry delay of a failed discard; doubles up to `discard_retry_max`.
    pub discard_retry_min: Duration,
    /// Longest retry delay of a failed discard.
    pub discard_retry_max: Duration,
    /// How often history is pruned and unfetched keys expire (1 h).
    pub prune_interval: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            block_check_interval: Duration::from_secs(1),
            block_check_trigger: 256,
            status_interval: Duration::from_secs(5),
            down_after_failures: 3,
            discard_retry_min: Duration::from_millis(200),
            discard_retry_max: Duration::from_secs(30),
            prune_interval: Duration::from_secs(3600),
        }
    }
}

/// Everything a [`Kme`] needs (the daemon builds it from its configuration file).
#[derive(Debug, Clone)]
pub struct KmeSettings {
    /// This KME's ID (ETSI status `source_KME_ID`; its peer-channel certificate's CN).
    pub kme_id: String,
    /// The links this kmd serves.
    pub links: Vec<LinkSettings>,
    /// Default key size in bits (`size` absent; status `key_size`).
    pub key_size_default: u32,
    /// Smallest key size in bits.
    pub min_key_size: u32,
    /// Largest key size in bits.
    pub max_key_size: u32,
    /// Most keys per `enc_keys` / `dec_keys` request (status `max_key_per_request`).
    pub max_keys_per_request: u32,
    /// Most SAE IDs a key may be shared with, master excluded (status `max_SAE_ID_count`;
    /// 0 = no multicast, `additional_slave_SAE_IDs` refused).
    pub max_sae_id_count: u32,
    /// How SAE client certificates map to SAE IDs (default: subject CN).
    pub sae_identities: SaeIdentityMap,
    /// Background task timers.
    pub sync: SyncSettings,
}

impl KmeSettings {
    /// Settings with the defaults (256-bit keys, 64..=8192 bits, 1000 keys per request, no
    /// multicast, SAE ID = certificate subject CN).
    pub fn new(kme_id: impl Into<String>, links: Vec<LinkSettings>) -> Self {
        Self {
            kme_id: kme_id.into(),
            links,
            key_size_default: 256,
            min_key_size: 64,
            max_key_size: 8192,
            max_keys_per_request: 1000,
            max_sae_id_count: 0,
            sae_identities: SaeIdentityMap::subject_cn(),
            sync: SyncSettings::default(),
        }
    }
}

/// The API endpoints, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// ETSI `status`.
    Status,
    /// ETSI `enc_keys`.
    EncKeys,
    /// ETSI `dec_keys`.
    DecKeys,
    /// Any other path on the ETSI router.
    EtsiOther,
    /// Peer `block-checks` (served).
    PeerBlockChecks,
    /// Peer `assignments` (served).
    PeerAssignments,
    /// Peer `discards` (served).
    PeerDiscards,
    /// Peer `status` (served).
    PeerStatus,
    /// Any other path on the peer router.
    PeerOther,
}

impl Endpoint {
    /// A stable label (`status`, `enc_keys`, …, `peer_status`).
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Status => "status",
            Endpoint::EncKeys => "enc_keys",
            Endpoint::DecKeys => "dec_keys",
            Endpoint::EtsiOther => "other",
            Endpoint::PeerBlockChecks => "peer_block_checks",
            Endpoint::PeerAssignments => "peer_assignments",
            Endpoint::PeerDiscards => "peer_discards",
            Endpoint::PeerStatus => "peer_status",
            Endpoint::PeerOther => "peer_other",
        }
    }
}

/// Hooks for the daemon's metrics. Every method has an empty default; implementations must be
/// cheap (they run on request paths).
pub trait KmeObserver: Send + Sync + 'static {
    /// A request to one of the routers was answered with `status` after `elapsed`.
    fn request(&self, endpoint: Endpoint, status: u16, elapsed: Duration) {
        let _ = (endpoint, status, elapsed);
    }
    /// The peer of `link_id` was marked up or down.
    fn peer_up(&self, link_id: &str, up: bool) {
        let _ = (link_id, up);
    }
    /// Keys handed to SAEs: `endpoint` is [`Endpoint::EncKeys`] or [`Endpoint::DecKeys`].
    fn keys_served(&self, link_id: &str, endpoint: Endpoint, keys: usize) {
        let _ = (link_id, endpoint, keys);
    }
}

/// An observer that records nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl KmeObserver for NoObserver {}

/// A discard waiting to be delivered to the peer (doc § 6).
#[derive(Debug, Clone)]
pub(crate) struct PendingDiscard {
    pub(crate) key_ids: Vec<String>,
    pub(crate) block_ids: Vec<String>,
    pub(crate) reason: String,
}

pub(crate) struct Link {
    pub(crate) id: String,
    pub(crate) side: Side,
    pub(crate) peer_kme_id: String,
    pub(crate) peer_fingerprint: Option<[u8; 32]>,
    pub(crate) pairs: Vec<SaePair>,
    pub(crate) client: client::PeerClient,
    pub(crate) up: AtomicBool,
    pub(crate) failures: AtomicU32,
    pub(crate) discards: std::sync::Mutex<std::collections::VecDeque<PendingDiscard>>,
    pub(crate) discard_wakeup: Notify,
    pub(crate) inserted_since_check: AtomicU64,
    /// Unknown verdicts in the last block-check answered for the peer, until taken.
    pub(crate) blocks_behind_peer: AtomicU64,
    pub(crate) check_wakeup: Notify,
    pub(crate) telemetry: std::sync::Mutex<Option<LinkTelemetry>>,
    pub(crate) retention: LinkRetention,
    pub(crate) batcher: batch::EncBatcher,
}

impl Link {
    pub(crate) fn has_pair(&self, local: &str, remote: &str) -> bool {
        self.pairs.iter().any(|p| p.local == local && p.remote == remote)
    }

    pub(crate) fn queue_discard(&self, discard: PendingDiscard) {
        if let Ok(mut q) = self.discards.lock() {
            q.push_back(discard);
        }
        self.discard_wakeup.notify_one();
    }

    pub(crate) fn discard_queue_len(&self) -> usize {
        self.discards.lock().map(|q| q.len()).unwrap_or(0)
    }

    pub(crate) fn set_up(&self, up: bool, observer: &dyn KmeObserver) {
        if self.up.swap(up, Ordering::SeqCst) != up {
            if up {
                tracing::info!(link = %self.id, peer = %self.peer_kme_id, "peer kmd is up");
            } else {
                tracing::warn!(link = %self.id, peer = %self.peer_kme_id, "peer kmd is down");
            }
            observer.peer_up(&self.id, up);
        }
    }
}

pub(crate) struct Inner {
    pub(crate) kme_id: String,
    pub(crate) key_size_default: u32,
    pub(crate) min_key_size: u32,
    pub(crate) max_key_size: u32,
    pub(crate) max_keys_per_request: u32,
    pub(crate) max_sae_id_count: u32,
    pub(crate) sae_identities: SaeIdentityMap,
    pub(crate) sync: SyncSettings,
    pub(crate) pool: KeyPool,
    pub(crate) links: Vec<Link>,
    pub(crate) observer: Arc<dyn KmeObserver>,
}

impl Inner {
    pub(crate) fn link(&self, link_id: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.id == link_id)
    }
}

/// The key management entity. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Kme {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Kme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kme")
            .field("kme_id", &self.inner.kme_id)
            .field("links", &self.inner.links.iter().map(|l| l.id.as_str()).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = text.bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

impl Kme {
    /// Checks the settings, registers every link's side in the pool, builds the peer clients
    /// and discards the keys reserved but never delivered before a restart
    /// ([`Kme::discard_undelivered`]). Call within a Tokio runtime. Reports nothing to an
    /// observer (see [`Kme::with_observer`]).
    pub async fn new(settings: KmeSettings, pool: KeyPool) -> Result<Kme, KmeError> {
        Self::with_observer(settings, pool, Arc::new(NoObserver)).await
    }

    /// [`Kme::new`] reporting to `observer`.
    pub async fn with_observer(
        settings: KmeSettings,
        pool: KeyPool,
        observer: Arc<dyn KmeObserver>,
    ) -> Result<Kme, KmeError> {
        let s = settings;
        let config = |m: String| Err(KmeError::Config(m));
        if s.kme_id.is_empty() {
            return config("kme_id is empty".into());
        }
        if s.min_key_size == 0
            || !s.min_key_size.is_multiple_of(8)
            || !s.max_key_size.is_multiple_of(8)
            || s.min_key_size > s.max_key_size
            || s.max_key_size > kmd_keypool::MAX_KEY_BITS
            || s.key_size_default < s.min_key_size
            || s.key_size_default > s.max_key_size
            || !s.key_size_default.is_multiple_of(8)
        {
            return config(format!(
                "key sizes must be multiples of 8 with 0 < min ({}) <= default ({}) <= max ({}) <= {}",
                s.min_key_size,
                s.key_size_default,
                s.max_key_size,
                kmd_keypool::MAX_KEY_BITS
            ));
        }
        if s.max_keys_per_request == 0 {
            return config("max_keys_per_request must be at least 1".into());
        }
        let mut links = Vec::with_capacity(s.links.len());
        for l in s.links {
            if links.iter().any(|x: &Link| x.id == l.link_id) {
                return config(format!("link {} is listed twice", l.link_id));
            }
            let expected = Side::from_kme_ids(&s.kme_id, &l.peer.kme_id)?;
            if expected != l.side {
                return config(format!(
                    "link {}: side {} does not match the KME IDs ({} vs peer {} gives {})",
                    l.link_id,
                    l.side.as_str(),
                    s.kme_id,
                    l.peer.kme_id,
                    expected.as_str()
                ));
            }
            let peer_fingerprint = match &l.peer.fingerprint {
                None => None,
                Some(f) => Some(parse_fingerprint(f).ok_or_else(|| {
                    KmeError::Config(format!("link {}: invalid peer fingerprint {f:?}", l.link_id))
                })?),
            };
            pool.register_link(&l.link_id, l.side).await?;
            let client = client::PeerClient::new(&l.peer.base_url, &l.peer.tls, l.peer.request_timeout)
                .map_err(|e| match e {
                    client::ClientBuildError::Tls(source) => {
                        KmeError::Tls { link_id: l.link_id.clone(), source }
                    }
                    client::ClientBuildError::Url(m) => {
                        KmeError::Config(format!("link {}: peer base URL: {m}", l.link_id))
                    }
                })?;
            links.push(Link {
                id: l.link_id,
                side: l.side,
                peer_kme_id: l.peer.kme_id,
                peer_fingerprint,
                pairs: l.sae_pairs,
                client,
                up: AtomicBool::new(true),
                failures: AtomicU32::new(0),
                discards: std::sync::Mutex::new(std::collections::VecDeque::new()),
                discard_wakeup: Notify::new(),
                inserted_since_check: AtomicU64::new(0),
                blocks_behind_peer: AtomicU64::new(0),
                check_wakeup: Notify::new(),
                telemetry: std::sync::Mutex::new(None),
                retention: l.retention,
                batcher: batch::EncBatcher::default(),
            });
        }
        let kme = Kme {
            inner: Arc::new(Inner {
                kme_id: s.kme_id,
                key_size_default: s.key_size_default,
                min_key_size: s.min_key_size,
                max_key_size: s.max_key_size,
                max_keys_per_request: s.max_keys_per_request,
                max_sae_id_count: s.max_sae_id_count,
                sae_identities: s.sae_identities,
                sync: s.sync,
                pool,
                links,
                observer,
            }),
        };
        // Keys reserved before a restart and never marked delivered are dropped (and their
        // discard queued for the peer) before any request is served: done later, it would race
        // with new `enc_keys` and could withdraw keys an SAE has just received.
        for link in &kme.inner.links {
            match sync::discard_pending_local(&kme.inner, link).await? {
                0 => {}
                n => tracing::info!(link = %link.id, keys = n, "discarded keys reserved before the restart"),
            }
        }
        Ok(kme)
    }

    /// This KME's ID.
    pub fn kme_id(&self) -> &str {
        &self.inner.kme_id
    }

    /// The key pool.
    pub fn pool(&self) -> &KeyPool {
        &self.inner.pool
    }

    /// Whether the peer of `link_id` is currently considered up (`None`: unknown link).
    pub fn peer_up(&self, link_id: &str) -> Option<bool> {
        self.inner.link(link_id).map(|l| l.up.load(Ordering::SeqCst))
    }

    /// Records the latest device telemetry of `link_id`; keys served afterwards carry it in the
    /// `qutemail_link` key container extension (see the crate README), so that applications can
    /// certify under which link conditions a key was made. Unknown links are ignored.
    pub fn record_telemetry(&self, link_id: &str, telemetry: LinkTelemetry) {
        if let Some(link) = self.inner.link(link_id)
            && let Ok(mut t) = link.telemetry.lock()
        {
            *t = Some(telemetry);
        }
    }

    /// How many blocks the peer of `link_id` last asked this side to confirm that this side
    /// does not hold (verdict `unknown`), and resets the count: the peer has read that many
    /// blocks from its device that this side has not read from its own yet. The daemon's device
    /// credit adds them, so that both ends keep reading the same blocks even when one end's
    /// stock is full (its SAEs idle) while the other's SAEs drain theirs, or after one end lost
    /// the blocks in flight to a crash; otherwise neither end could confirm the other's newer
    /// blocks until they expire unconfirmed. `None`: unknown link.
    pub fn take_blocks_behind_peer(&self, link_id: &str) -> Option<u64> {
        self.inner.link(link_id).map(|l| l.blocks_behind_peer.swap(0, Ordering::SeqCst))
    }

    /// Discards waiting for delivery to the peer of `link_id`.
    pub fn pending_discards(&self, link_id: &str) -> Option<usize> {
        self.inner.link(link_id).map(Link::discard_queue_len)
    }

    /// Stores a block from the device of `link_id` (wrapped, unconfirmed until the peer
    /// confirms it). Idempotent on the block ID.
    pub async fn accept_block(
        &self,
        link_id: &str,
        block: qkd_device::DeviceKeyBlock,
    ) -> Result<InsertOutcome, KmeError> {
        let link = self.inner.link(link_id).ok_or_else(|| KmeError::UnknownLink(link_id.to_owned()))?;
        let meta = BlockMeta {
            created_unix_ms: block.created_unix_ms,
            qber_ppm: block.qber_ppm,
            security_bits: block.security_bits,
        };
        let outcome = self
            .inner
            .pool
            .insert_block(link_id, block.block_id.to_string(), block.kcv, block.key, meta)
            .await?;
        if outcome == InsertOutcome::Inserted {
            let n = link.inserted_since_check.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= self.inner.sync.block_check_trigger {
                link.check_wakeup.notify_one();
            }
        }
        Ok(outcome)
    }

    /// Runs one block-confirmation exchange with the peer of `link_id` now (§ 4): sends every
    /// unconfirmed block (in calls of at most 1000) and applies the verdicts. Returns how many
    /// blocks became confirmed. The background task does this periodically.
    pub async fn exchange_block_checks(&self, link_id: &str) -> Result<u64, KmeError> {
        let link = self.inner.link(link_id).ok_or_else(|| KmeError::UnknownLink(link_id.to_owned()))?;
        sync::exchange_block_checks(&self.inner, link).await
    }

    /// Discards the keys this side reserved on `link_id` but never marked delivered (an
    /// `enc_keys` interrupted by a restart: its SAE never got them) and queues their discard for
    /// the peer (§ 6). [`Kme::new`] does this for every link before the KME serves anything;
    /// called while `enc_keys` are in flight it would also withdraw theirs. Returns how many keys.
    pub async fn discard_undelivered(&self, link_id: &str) -> Result<u64, KmeError> {
        let link = self.inner.link(link_id).ok_or_else(|| KmeError::UnknownLink(link_id.to_owned()))?;
        sync::discard_pending_local(&self.inner, link).await
    }

    /// Sends the queued discards of `link_id` now; returns how many are still queued.
    pub async fn flush_discards(&self, link_id: &str) -> Result<usize, KmeError> {
        let link = self.inner.link(link_id).ok_or_else(|| KmeError::UnknownLink(link_id.to_owned()))?;
        sync::flush_discards(link).await?;
        Ok(link.discard_queue_len())
    }
}
