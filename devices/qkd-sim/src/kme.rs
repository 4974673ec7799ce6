//! KME mode: the simulated device pair exposes ETSI GS QKD 014 itself, as some vendors' devices
//! do.
//!
//! [`KmePair::start`] opens two HTTPS listeners, KME A and KME B, each serving the SAE attached
//! at its site over mutual TLS. Both KMEs draw from one in-memory pool fed by the link's key
//! stream (the identical blocks both ends of the simulated link produce), so a key handed out at
//! one KME is exactly the key the other KME hands to the peer SAE:
//!
//! - `GET  /api/v1/keys/{slave}/status` — the pool as seen by the calling (master) SAE.
//! - `GET|POST /api/v1/keys/{slave}/enc_keys` — cuts `number` keys of `size` bits from the pool
//!   (size a multiple of 8; block bytes are joined or split as needed), gives each a random
//!   UUIDv4 and assigns it to the pair (caller → slave).
//! - `GET|POST /api/v1/keys/{master}/dec_keys` — at the other KME, the slave SAE gets each
//!   assigned key once; then it is erased.
//!
//! Either site's SAE may act as master (the pair works in both directions). The caller is the SAE
//! whose ID is the **subject CN** of its client certificate, which must be issued by
//! `client_ca`; each KME serves only its own site's SAE (anyone else: 401). Errors use the
//! specification's format: 400 for a malformed or unsatisfiable request (unknown key IDs:
//! "one or more keys specified are not found on KME"), 401, and 503 when the pool holds too
//! little key. Extensions are not supported (`extension_mandatory` is refused, multicast to
//! `additional_slave_SAE_IDs` too: `max_SAE_ID_count` is 0).
//!
//! This is a simulated vendor device: correct but simple — memory only, no HSM, no
//! synchronisation protocol between the two KMEs beyond sharing the process.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::extract::{FromRef, RawQuery, State};
use axum::routing::get;
use etsi014::server::{
    self, ApiError, CallerSae, JsonBody, JsonResponse, SaeIdPath, SaeIdentityMap, ServeOptions, ServerHandle,
    ServerTlsConfig,
};
use etsi014::tls::TlsConfigError;
use etsi014::types::{Key, KeyContainer, KeyIds, KeyMaterial, KeyRequest, Status, messages};
use qkd_serial_proto::KeyBlock;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeroize::{Zeroize, Zeroizing};

/// Smallest key a KME hands out, bits (its status `min_key_size`).
pub const MIN_KEY_SIZE_BITS: u32 = 64;
/// Largest key a KME hands out, bits (its status `max_key_size`).
pub const MAX_KEY_SIZE_BITS: u32 = 8192;

/// Configuration of the simulated KME pair (the `[kme]` table of the simulator's
/// configuration). Unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmeConfig {
    /// Address KME A listens on (HTTPS), e.g. `127.0.0.1:8441`; port 0 picks a free port.
    pub listen_a: SocketAddr,
    /// Address KME B listens on (HTTPS).
    pub listen_b: SocketAddr,
    /// KME ID of KME A (status `source_KME_ID` at A, `target_KME_ID` at B).
    pub kme_id_a: String,
    /// KME ID of KME B.
    pub kme_id_b: String,
    /// SAE ID of the application at site A (the master side of the usual direction): the
    /// subject CN of its client certificate.
    pub sae_id_a: String,
    /// SAE ID of the application at site B.
    pub sae_id_b: String,
    /// KME A's server certificate chain, PEM file.
    pub server_cert_a: PathBuf,
    /// KME A's private key, PEM file.
    pub server_key_a: PathBuf,
    /// KME B's server certificate chain, PEM file.
    pub server_cert_b: PathBuf,
    /// KME B's private key, PEM file.
    pub server_key_b: PathBuf,
    /// CA that issues the SAEs' client certificates, PEM file (one or more certificates).
    pub client_ca: PathBuf,
    /// Default key size in bits (status `key_size`), a multiple of 8 between
    /// [`MIN_KEY_SIZE_BITS`] and [`MAX_KEY_SIZE_BITS`]. Default 256.
    #[serde(default = "default_key_size_bits")]
    pub key_size_bits: u32,
    /// Most keys in one request (status `max_key_per_request`). Default 128.
    #[serde(default = "default_max_keys_per_request")]
    pub max_keys_per_request: u32,
    /// Most keys of the default size the pool holds (status `max_key_count`); blocks arriving
    /// when it is full are discarded, as a device with a full buffer does. The same limit
    /// applies to keys handed out but not yet fetched by the peer SAE (the oldest is dropped).
    /// Default 10000.
    #[serde(default = "default_max_stored_keys")]
    pub max_stored_keys: u64,
}

fn default_key_size_bits() -> u32 {
    256
}

fn default_max_keys_per_request() -> u32 {
    128
}

fn default_max_stored_keys() -> u64 {
    10_000
}

impl KmeConfig {
    fn validate(&self) -> Result<(), KmeError> {
        let bad = |what: String| Err(KmeError::Config(what));
        if !self.key_size_bits.is_multiple_of(8)
            || !(MIN_KEY_SIZE_BITS..=MAX_KEY_SIZE_BITS).contains(&self.key_size_bits)
        {
            return bad(format!(
                "key_size_bits = {} must be a multiple of 8 in {MIN_KEY_SIZE_BITS}..={MAX_KEY_SIZE_BITS}",
                self.key_size_bits
            ));
        }
        if self.max_keys_per_request == 0 {
            return bad("max_keys_per_request must be at least 1".into());
        }
        if self.max_stored_keys == 0 {
            return bad("max_stored_keys must be at least 1".into());
        }
        for (name, value) in [
            ("kme_id_a", &self.kme_id_a),
            ("kme_id_b", &self.kme_id_b),
            ("sae_id_a", &self.sae_id_a),
            ("sae_id_b", &self.sae_id_b),
        ] {
            if value.is_empty() {
                return bad(format!("{name} must not be empty"));
            }
        }
        if self.sae_id_a == self.sae_id_b {
            return bad(format!("sae_id_a and sae_id_b are both {:?}", self.sae_id_a));
        }
        if self.kme_id_a == self.kme_id_b {
            return bad(format!("kme_id_a and kme_id_b are both {:?}", self.kme_id_a));
        }
        Ok(())
    }
}

/// The KME pair could not start.
#[derive(Debug, thiserror::Error)]
pub enum KmeError {
    /// The configuration is inconsistent.
    #[error("invalid KME configuration: {0}")]
    Config(String),
    /// A certificate, key or CA file could not be read or used.
    #[error("KME {kme}: {source}")]
    Tls {
        /// Which KME (A or B).
        kme: char,
        /// The cause.
        #[source]
        source: TlsConfigError,
    },
    /// A listener could not be opened.
    #[error("KME {kme}: cannot listen on {addr}: {source}")]
    Bind {
        /// Which KME (A or B).
        kme: char,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The two simulated KMEs, running. Dropping it stops both (gracefully) and the pool feeder.
#[derive(Debug)]
pub struct KmePair {
    addrs: (SocketAddr, SocketAddr),
    servers: Vec<ServerHandle>,
    feeder: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl KmePair {
    /// Binds both listeners and spawns their tasks; `blocks` is the link's key stream: the
    /// identical blocks that both ends of the simulated link produce. Blocks whose key check
    /// value does not match are discarded.
    pub async fn start(cfg: KmeConfig, blocks: mpsc::Receiver<KeyBlock>) -> Result<KmePair, KmeError> {
        cfg.validate()?;
        let tls_for = |kme: char, cert: &PathBuf, key: &PathBuf| {
            ServerTlsConfig::from_files(&cfg.client_ca, cert, key)
                .and_then(|pem| server::server_config(&pem))
                .map_err(|source| KmeError::Tls { kme, source })
        };
        let tls_a = tls_for('A', &cfg.server_cert_a, &cfg.server_key_a)?;
        let tls_b = tls_for('B', &cfg.server_cert_b, &cfg.server_key_b)?;
        let listener_a = bind('A', cfg.listen_a).await?;
        let listener_b = bind('B', cfg.listen_b).await?;
        let addr_of = |kme, l: &TcpListener, addr| {
            l.local_addr().map_err(|source| KmeError::Bind { kme, addr, source })
        };
        let addrs = (addr_of('A', &listener_a, cfg.listen_a)?, addr_of('B', &listener_b, cfg.listen_b)?);

        let shared = Arc::new(Shared::new(&cfg));
        let feeder = tokio::spawn(feed(shared.clone(), blocks));
        let mut servers = Vec::with_capacity(2);
        for (side, listener, tls) in [(Side::A, listener_a, tls_a), (Side::B, listener_b, tls_b)] {
            let router =
                router(SideState { shared: shared.clone(), side, identities: SaeIdentityMap::subject_cn() });
            let handle = server::spawn(listener, tls, router, ServeOptions::default()).map_err(|source| {
                KmeError::Bind { kme: side.letter(), addr: cfg_addr(&cfg, side), source }
            })?;
            servers.push(handle);
        }
        tracing::info!(a = %addrs.0, b = %addrs.1, sae_a = %cfg.sae_id_a, sae_b = %cfg.sae_id_b, "ETSI 014 KME pair started");
        Ok(KmePair { addrs, servers, feeder, shared })
    }

    /// The addresses KME A and KME B listen on.
    pub fn addrs(&self) -> (SocketAddr, SocketAddr) {
        self.addrs
    }

    /// Bytes of key in the pool, not yet handed out.
    pub fn pool_bytes(&self) -> usize {
        self.shared.lock().pool.bytes
    }

    /// Keys handed out at one KME and not yet fetched at the other.
    pub fn pending_keys(&self) -> usize {
        self.shared.lock().assigned.len()
    }

    /// Stops both KMEs gracefully (open requests finish) and waits for them.
    pub async fn shutdown(mut self) {
        self.feeder.abort();
        for server in std::mem::take(&mut self.servers) {
            if let Err(e) = server.shutdown().await {
                tracing::warn!(error = %e, "KME server stopped with an error");
            }
        }
    }
}

impl Drop for KmePair {
    fn drop(&mut self) {
        self.feeder.abort();
        // The server handles stop their servers when dropped.
    }
}

fn cfg_addr(cfg: &KmeConfig, side: Side) -> SocketAddr {
    match side {
        Side::A => cfg.listen_a,
        Side::B => cfg.listen_b,
    }
}

async fn bind(kme: char, addr: SocketAddr) -> Result<TcpListener, KmeError> {
    TcpListener::bind(addr).await.map_err(|source| KmeError::Bind { kme, addr, source })
}

/// Moves the link's blocks into the pool until the stream ends.
async fn feed(shared: Arc<Shared>, mut blocks: mpsc::Receiver<KeyBlock>) {
    while let Some(block) = blocks.recv().await {
        if !block.kcv_matches() {
            tracing::warn!(block_id = block.block_id, "key block fails its check value; discarded");
            continue;
        }
        shared.push(block);
    }
    tracing::info!("the link's key stream ended; the KMEs serve what is left in the pool");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Side {
    fn index(self) -> usize {
        self as usize
    }

    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn letter(self) -> char {
        match self {
            Side::A => 'A',
            Side::B => 'B',
        }
    }
}

/// What both KMEs share.
#[derive(Debug)]
struct Shared {
    kme_ids: [String; 2],
    sae_ids: [String; 2],
    key_size_bits: u32,
    max_keys_per_request: u32,
    max_stored_keys: u64,
    /// Pool capacity in bytes: `max_stored_keys` keys of the default size.
    capacity: usize,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    pool: Pool,
    assigned: HashMap<String, Assigned>,
    next_seq: u64,
}

/// A key handed out to a master SAE, waiting for the slave SAE.
struct Assigned {
    seq: u64,
    master: Side,
    key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Assigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assigned")
            .field("seq", &self.seq)
            .field("master", &self.master)
            .finish_non_exhaustive()
    }
}

/// Key bytes in arrival order. Bytes handed out are wiped at once.
#[derive(Default)]
struct Pool {
    chunks: VecDeque<Zeroizing<Vec<u8>>>,
    /// Bytes of the front chunk already handed out (and wiped).
    offset: usize,
    bytes: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("chunks", &self.chunks.len()).field("bytes", &self.bytes).finish()
    }
}

impl Pool {
    fn push(&mut self, key: Zeroizing<Vec<u8>>) {
        if !key.is_empty() {
            self.bytes += key.len();
            self.chunks.push_back(key);
        }
    }

    /// Exactly `n` bytes from the front, or `None` (and nothing taken) if there are fewer.
    fn take(&mut self, n: usize) -> Option<Zeroizing<Vec<u8>>> {
        if n > self.bytes {
            return None;
        }
        let mut out = Zeroizing::new(Vec::with_capacity(n));
        while out.len() < n {
            let front = self.chunks.front_mut()?;
            let available = &mut front[self.offset..];
            let k = available.len().min(n - out.len());
            out.extend_from_slice(&available[..k]);
            available[..k].zeroize();
            self.offset += k;
            self.bytes -= k;
            if self.offset == front.len() {
                self.chunks.pop_front();
                self.offset = 0;
            }
        }
        Some(out)
    }
}

impl Shared {
    fn new(cfg: &KmeConfig) -> Self {
        let capacity = usize::try_from(cfg.max_stored_keys.saturating_mul(u64::from(cfg.key_size_bits / 8)))
            .unwrap_or(usize::MAX);
        Self {
            kme_ids: [cfg.kme_id_a.clone(), cfg.kme_id_b.clone()],
            sae_ids: [cfg.sae_id_a.clone(), cfg.sae_id_b.clone()],
            key_size_bits: cfg.key_size_bits,
            max_keys_per_request: cfg.max_keys_per_request,
            max_stored_keys: cfg.max_stored_keys,
            capacity,
            state: Mutex::new(PoolState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock cannot leave the pool inconsistent in a way that
        // matters for a simulator: keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, block: KeyBlock) {
        let mut state = self.lock();
        if state.pool.bytes >= self.capacity {
            tracing::debug!(block_id = block.block_id, "KME pool full; block discarded");
            return;
        }
        state.pool.push(block.key);
    }

    fn stored_key_count(&self) -> u64 {
        (self.lock().pool.bytes / (self.key_size_bits as usize / 8)) as u64
    }
}

/// The router state of one KME.
#[derive(Clone)]
struct SideState {
    shared: Arc<Shared>,
    side: Side,
    identities: SaeIdentityMap,
}

impl FromRef<SideState> for SaeIdentityMap {
    fn from_ref(state: &SideState) -> Self {
        state.identities.clone()
    }
}

impl SideState {
    fn local_sae(&self) -> &str {
        &self.shared.sae_ids[self.side.index()]
    }

    fn remote_sae(&self) -> &str {
        &self.shared.sae_ids[self.side.other().index()]
    }

    /// Only this site's SAE may use this KME.
    fn authorize(&self, caller: &str) -> Result<(), ApiError> {
        if caller == self.local_sae() {
            Ok(())
        } else {
            tracing::info!(kme = %self.side.letter(), caller, "SAE not served by this KME");
            Err(ApiError::unauthorized())
        }
    }

    /// The SAE named in the path must be the other site's.
    fn check_peer(&self, sae: &str) -> Result<(), ApiError> {
        if sae == self.remote_sae() {
            Ok(())
        } else {
            Err(ApiError::bad_request("the SAE ID in the path is not known to this KME")
                .with_detail("SAE_ID", sae))
        }
    }
}

fn router(state: SideState) -> Router {
    Router::new()
        .route("/api/v1/keys/{sae}/status", get(status))
        .route("/api/v1/keys/{sae}/enc_keys", get(enc_keys_get).post(enc_keys_post))
        .route("/api/v1/keys/{sae}/dec_keys", get(dec_keys_get).post(dec_keys_post))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

async fn status(
    State(st): State<SideState>,
    CallerSae(caller): CallerSae,
    SaeIdPath(slave): SaeIdPath,
) -> Result<JsonResponse<Status>, ApiError> {
    st.authorize(&caller)?;
    st.check_peer(&slave)?;
    let shared = &st.shared;
    Ok(JsonResponse(Status {
        source_kme_id: shared.kme_ids[st.side.index()].clone(),
        target_kme_id: shared.kme_ids[st.side.other().index()].clone(),
        master_sae_id: caller,
        slave_sae_id: slave,
        key_size: shared.key_size_bits,
        stored_key_count: shared.stored_key_count(),
        max_key_count: shared.max_stored_keys,
        max_key_per_request: shared.max_keys_per_request,
        max_key_size: MAX_KEY_SIZE_BITS,
        min_key_size: MIN_KEY_SIZE_BITS,
        max_sae_id_count: 0,
        status_extension: None,
    }))
}

async fn enc_keys_get(
    State(st): State<SideState>,
    CallerSae(caller): CallerSae,
    SaeIdPath(slave): SaeIdPath,
    RawQuery(query): RawQuery,
) -> Result<JsonResponse<KeyContainer>, ApiError> {
    let mut request = KeyRequest::default();
    for (name, value) in server::query_pairs(query.as_deref()) {
        let parse = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| ApiError::parameters_not_adhering().with_detail(name.clone(), v.to_owned()))
        };
        match name.as_str() {
            "number" => request.number = Some(parse(&value)?),
            "size" => request.size = Some(parse(&value)?),
            _ => {} // unknown parameters are ignored
        }
    }
    enc_keys(&st, caller, slave, request)
}

async fn enc_keys_post(
    State(st): State<SideState>,
    CallerSae(caller): CallerSae,
    SaeIdPath(slave): SaeIdPath,
    JsonBody(request): JsonBody<KeyRequest>,
) -> Result<JsonResponse<KeyContainer>, ApiError> {
    enc_keys(&st, caller, slave, request)
}

/// *Get key*: cuts keys from the pool and assigns them to (caller → slave).
fn enc_keys(
    st: &SideState,
    caller: String,
    slave: String,
    request: KeyRequest,
) -> Result<JsonResponse<KeyContainer>, ApiError> {
    st.authorize(&caller)?;
    st.check_peer(&slave)?;
    let shared = &st.shared;
    if !request.additional_slave_sae_ids.is_empty() {
        return Err(ApiError::parameters_not_adhering().with_detail("max_SAE_ID_count", 0));
    }
    if !request.extension_mandatory.is_empty() {
        let names: Vec<String> = request.extension_mandatory.iter().flat_map(|e| e.keys().cloned()).collect();
        return Err(ApiError::bad_request(messages::EXTENSION_MANDATORY_UNSUPPORTED)
            .with_detail("extension_mandatory_unsupported", names));
    }
    let number = request.number.unwrap_or(1);
    if number == 0 || number > shared.max_keys_per_request {
        return Err(ApiError::parameters_not_adhering()
            .with_detail("max_key_per_request", shared.max_keys_per_request));
    }
    let size = request.size.unwrap_or(shared.key_size_bits);
    if !size.is_multiple_of(8) {
        return Err(ApiError::size_not_multiple_of_8());
    }
    if !(MIN_KEY_SIZE_BITS..=MAX_KEY_SIZE_BITS).contains(&size) {
        return Err(ApiError::parameters_not_adhering()
            .with_detail("min_key_size", MIN_KEY_SIZE_BITS)
            .with_detail("max_key_size", MAX_KEY_SIZE_BITS));
    }
    let key_bytes = size as usize / 8;
    let total = key_bytes * number as usize;

    let mut ids = Vec::with_capacity(number as usize);
    for _ in 0..number {
        ids.push(new_key_id()?);
    }
    let mut state = shared.lock();
    let Some(mut material) = state.pool.take(total) else {
        let available = state.pool.bytes / key_bytes;
        drop(state);
        tracing::info!(kme = %st.side.letter(), number, size, available, "not enough key for enc_keys");
        return Err(ApiError::service_unavailable("not enough key material available on KME")
            .with_detail("stored_key_count", available as u64));
    };
    let mut keys = Vec::with_capacity(number as usize);
    for (i, id) in ids.into_iter().enumerate() {
        let key = Zeroizing::new(material[i * key_bytes..(i + 1) * key_bytes].to_vec());
        let seq = state.next_seq;
        state.next_seq += 1;
        state.assigned.insert(id.clone(), Assigned { seq, master: st.side, key: key.clone() });
        keys.push(Key::new(id, KeyMaterial::new(key)));
    }
    material.zeroize();
    evict_oldest(&mut state, shared.max_stored_keys);
    drop(state);
    tracing::info!(
        kme = %st.side.letter(),
        master = %caller,
        %slave,
        number,
        size,
        ids = ?keys.iter().map(|k| k.key_id.as_str()).collect::<Vec<_>>(),
        "enc_keys delivered"
    );
    Ok(JsonResponse(KeyContainer { keys, key_container_extension: None }))
}

/// Keeps at most `max` keys waiting for their slave SAE, dropping the oldest.
fn evict_oldest(state: &mut PoolState, max: u64) {
    while state.assigned.len() as u64 > max {
        let Some(oldest) = state.assigned.iter().min_by_key(|(_, a)| a.seq).map(|(id, _)| id.clone()) else {
            return;
        };
        state.assigned.remove(&oldest);
        tracing::warn!(key_id = %oldest, "too many keys waiting for the slave SAE; the oldest is dropped");
    }
}

fn new_key_id() -> Result<String, ApiError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ApiError::service_unavailable("the KME's random source failed"))?;
    Ok(uuid::Builder::from_random_bytes(bytes).into_uuid().hyphenated().to_string())
}

async fn dec_keys_get(
    State(st): State<SideState>,
    CallerSae(caller): CallerSae,
    SaeIdPath(master): SaeIdPath,
    RawQuery(query): RawQuery,
) -> Result<JsonResponse<KeyContainer>, ApiError> {
    let ids: Vec<String> = server::query_pairs(query.as_deref())
        .into_iter()
        .filter(|(k, _)| k == "key_ID")
        .map(|(_, v)| v)
        .collect();
    dec_keys(&st, caller, master, ids)
}

async fn dec_keys_post(
    State(st): State<SideState>,
    CallerSae(caller): CallerSae,
    SaeIdPath(master): SaeIdPath,
    JsonBody(request): JsonBody<KeyIds>,
) -> Result<JsonResponse<KeyContainer>, ApiError> {
    dec_keys(&st, caller, master, request.key_ids.into_iter().map(|k| k.key_id).collect())
}

/// *Get key with key IDs*: hands the slave SAE the keys its master obtained, once. All or
/// nothing: if any ID is not deliverable, nothing is delivered or erased.
fn dec_keys(
    st: &SideState,
    caller: String,
    master: String,
    ids: Vec<String>,
) -> Result<JsonResponse<KeyContainer>, ApiError> {
    st.authorize(&caller)?;
    st.check_peer(&master)?;
    if ids.is_empty() {
        return Err(ApiError::parameters_not_adhering().with_detail("key_IDs", "no key_ID given"));
    }
    if ids.len() > st.shared.max_keys_per_request as usize {
        return Err(ApiError::parameters_not_adhering()
            .with_detail("max_key_per_request", st.shared.max_keys_per_request));
    }
    // Key IDs are UUIDs: accept any case, look up the canonical form.
    let canonical: Vec<Option<String>> =
        ids.iter().map(|id| uuid::Uuid::parse_str(id).ok().map(|u| u.hyphenated().to_string())).collect();
    let mut seen = HashSet::new();
    if canonical.iter().flatten().any(|id| !seen.insert(id.as_str())) {
        return Err(ApiError::parameters_not_adhering().with_detail("key_IDs", "a key_ID is repeated"));
    }
    let master_side = st.side.other();
    let mut state = st.shared.lock();
    let mut unknown = Vec::new();
    for (given, id) in ids.iter().zip(&canonical) {
        match id.as_ref().and_then(|id| state.assigned.get(id)) {
            None => unknown.push(given.clone()),
            // A key of the other direction: it belongs to this SAE as master, not as slave.
            Some(assigned) if assigned.master != master_side => {
                drop(state);
                tracing::info!(kme = %st.side.letter(), %caller, key_id = %given, "dec_keys for a key of another SAE pair");
                return Err(ApiError::unauthorized());
            }
            Some(_) => {}
        }
    }
    if !unknown.is_empty() {
        drop(state);
        tracing::info!(kme = %st.side.letter(), %caller, ?unknown, "dec_keys for unknown key IDs");
        return Err(ApiError::keys_not_found().with_detail("key_IDs_not_found", unknown));
    }
    let keys: Vec<Key> = canonical
        .into_iter()
        .flatten()
        .filter_map(|id| state.assigned.remove(&id).map(|a| Key::new(id, KeyMaterial::new(a.key))))
        .collect();
    drop(state);
    tracing::info!(
        kme = %st.side.letter(),
        %master,
        slave = %caller,
        ids = ?keys.iter().map(|k| k.key_id.as_str()).collect::<Vec<_>>(),
        "dec_keys delivered"
    );
    Ok(JsonResponse(KeyContainer { keys, key_container_extension: None }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_joins_and_splits_blocks() {
        let mut pool = Pool::default();
        pool.push(Zeroizing::new(vec![1, 2, 3]));
        pool.push(Zeroizing::new(vec![4, 5]));
        pool.push(Zeroizing::new(vec![6, 7, 8, 9]));
        assert_eq!(pool.bytes, 9);
        assert_eq!(pool.take(2).as_deref().map(Vec::as_slice), Some(&[1, 2][..]));
        assert_eq!(pool.take(4).as_deref().map(Vec::as_slice), Some(&[3, 4, 5, 6][..]));
        assert_eq!(pool.take(4), None, "all or nothing");
        assert_eq!(pool.bytes, 3);
        assert_eq!(pool.take(3).as_deref().map(Vec::as_slice), Some(&[7, 8, 9][..]));
        assert_eq!(pool.bytes, 0);
        assert!(pool.chunks.is_empty());
        assert_eq!(pool.take(0).as_deref().map(Vec::len), Some(0));
    }

    #[test]
    fn config_rejects_unknown_keys_and_bad_sizes() {
        let base = r#"
            listen_a = "127.0.0.1:0"
            listen_b = "127.0.0.1:0"
            kme_id_a = "KME-A"
            kme_id_b = "KME-B"
            sae_id_a = "A-mail"
            sae_id_b = "B-mail"
            server_cert_a = "a.pem"
            server_key_a = "a.key"
            server_cert_b = "b.pem"
            server_key_b = "b.key"
            client_ca = "ca.pem"
        "#;
        let cfg: KmeConfig = toml::from_str(base).expect("valid");
        assert_eq!((cfg.key_size_bits, cfg.max_keys_per_request, cfg.max_stored_keys), (256, 128, 10_000));
        assert!(cfg.validate().is_ok());
        let mut odd = cfg.clone();
        odd.key_size_bits = 100;
        assert!(odd.validate().is_err());
        let mut same = cfg;
        same.sae_id_b = same.sae_id_a.clone();
        assert!(same.validate().is_err());
        assert!(toml::from_str::<KmeConfig>(&format!("{base}\nbogus = 1")).is_err());
    }
}
