//! Test harness: two complete KMEs (site A Lower, site B Upper), each with its own SQLite pool on
//! its own SoftHSM token, serving their ETSI 014 and peer routers over real mutual TLS on
//! loopback, fed the same blocks.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once per process, so each `#[test]` re-executes the test binary
//! for just itself with a fresh token directory (adapted from kmd/keypool/tests/common).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etsi014::client::Etsi014Client;
use etsi014::pki::{Ca, Issued};
use etsi014::server::{self, ServeOptions, ServerHandle};
use kmd_keypool::{KeyPool, PoolConfig, Side, Zeroizing};
use kmd_kme::{
    Endpoint, Kme, KmeObserver, KmeSettings, LinkRetention, LinkSettings, PeerSettings, SaePair, SyncSettings,
};
use qkd_device::{BlockId, DeviceKeyBlock};
use qutemail_hsm::{HsmConfig, HsmKeyWrapper, PinSource, TokenSelector};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

pub use qutemail_hsm::testing::{SOFTHSM_MODULE, SoftHsmEnv as TestEnv};

/// The two sites' SoftHSM tokens.
const TOKENS: [&str; 2] = ["site-a", "site-b"];
pub const LINK: &str = "link-ab";
pub const KME_A: &str = "kme-A";
pub const KME_B: &str = "kme-B";

/// Runs `body` for test `name` in a fresh process with tokens `site-a` and `site-b`
/// (`qutemail_hsm::testing::isolated`).
pub fn isolated(name: &str, body: impl FnOnce(&TestEnv)) {
    qutemail_hsm::testing::isolated(name, &TOKENS, body)
}

/// Creates tokens `site-a` and `site-b` in `dir/tokens` and the PIN file `dir/user.pin`;
/// returns the SoftHSM2 configuration file to point `SOFTHSM2_CONF` at.
pub fn init_tokens(dir: &Path) -> PathBuf {
    qutemail_hsm::testing::init_tokens(dir, &TOKENS)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Deterministic block bytes.
pub fn block_bytes(n: u64, len: usize) -> Vec<u8> {
    let mut state =
        n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (len as u64).rotate_left(32) ^ 0xD1B5_4A32_D192_ED03;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8 | 1
        })
        .collect()
}

pub fn device_block(n: u64) -> DeviceKeyBlock {
    device_block_sized(n, [1000, 257, 1500, 64, 733][(n % 5) as usize])
}

pub fn device_block_sized(n: u64, len: usize) -> DeviceKeyBlock {
    let bytes = block_bytes(n, len);
    let d = Sha256::digest(&bytes);
    let mut kcv = [0u8; 16];
    kcv.copy_from_slice(&d[..16]);
    DeviceKeyBlock {
        block_id: BlockId::Sequence(n),
        key: Zeroizing::new(bytes),
        kcv,
        created_unix_ms: 1_700_000_000_000 + n,
        qber_ppm: Some(20_000),
        security_bits: Some(64),
    }
}

/// The test PKI: one CA issuing the KMEs' server and peer certificates and the SAEs'.
pub struct Pki {
    pub ca: Ca,
    pub ca_pem: String,
    pub server: Issued,
    pub certs: Vec<(String, Issued)>,
}

impl Pki {
    pub fn new() -> Pki {
        let ca = Ca::new("QuteMail test CA").unwrap();
        let ca_pem = ca.ca_pem();
        let server = ca.server(&["localhost", "127.0.0.1"]).unwrap();
        let certs = ["A-mail", "B-mail", "B-other", "C-mail", KME_A, KME_B]
            .iter()
            .map(|cn| ((*cn).to_owned(), ca.client(cn).unwrap()))
            .collect();
        Pki { ca, ca_pem, server, certs }
    }

    pub fn cert(&self, cn: &str) -> &Issued {
        &self.certs.iter().find(|(n, _)| n == cn).unwrap().1
    }

    /// An ETSI 014 client for `cn` towards the server at `addr`.
    pub fn client(&self, cn: &str, addr: SocketAddr) -> Etsi014Client {
        Etsi014Client::new(&format!("https://localhost:{}", addr.port()), self.cert(cn).tls(&self.ca_pem))
            .unwrap()
    }

    /// Writes the CA and every client certificate as PEM files into `dir`.
    pub fn write(&self, dir: &Path) {
        std::fs::write(dir.join("ca.pem"), &self.ca_pem).unwrap();
        for (cn, issued) in &self.certs {
            issued.write(dir, cn).unwrap();
        }
    }
}

pub struct Site {
    pub name: &'static str,
    pub kme: Kme,
    pub counts: Arc<Counts>,
    pub etsi_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub etsi: Option<ServerHandle>,
    pub peer: Option<ServerHandle>,
    pub stop_sync: Option<tokio::sync::oneshot::Sender<()>>,
    pub sync: Option<tokio::task::JoinHandle<()>>,
}

impl Site {
    pub async fn stop_peer_server(&mut self) {
        if let Some(h) = self.peer.take() {
            h.shutdown().await.unwrap();
        }
    }

    pub async fn start_peer_server(&mut self, pki: &Pki) {
        let listener = TcpListener::bind(self.peer_addr).await.unwrap();
        let tls = server::server_config(&pki.server.tls(&pki.ca_pem)).unwrap();
        self.peer =
            Some(server::spawn(listener, tls, self.kme.peer_router(), ServeOptions::default()).unwrap());
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop_sync.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.sync.take() {
            h.await.unwrap();
        }
        if let Some(h) = self.etsi.take() {
            h.shutdown().await.unwrap();
        }
        self.stop_peer_server().await;
    }
}

pub fn fast_sync() -> SyncSettings {
    SyncSettings {
        block_check_interval: Duration::from_millis(200),
        status_interval: Duration::from_millis(200),
        discard_retry_min: Duration::from_millis(50),
        discard_retry_max: Duration::from_millis(500),
        ..SyncSettings::default()
    }
}

pub async fn pool(env: &TestEnv, token: &str) -> KeyPool {
    let mut cfg = HsmConfig::new(
        SOFTHSM_MODULE,
        TokenSelector::Label(token.into()),
        PinSource::File(env.pin_file.clone()),
        "kmd-kme-kek",
    );
    cfg.pool_size = 2;
    let hsm = HsmKeyWrapper::open_async(cfg).await.unwrap();
    KeyPool::open(PoolConfig::new(env.dir.join(format!("{token}.sqlite"))), hsm).await.unwrap()
}

/// Counts what a [`Kme`] reports.
#[derive(Default)]
pub struct Counts {
    pub requests: Mutex<HashMap<(Endpoint, u16), u64>>,
    pub peer_events: Mutex<Vec<bool>>,
    pub keys_served: Mutex<HashMap<Endpoint, usize>>,
}

impl Counts {
    pub fn requests(&self, endpoint: Endpoint, status: u16) -> u64 {
        self.requests.lock().unwrap().get(&(endpoint, status)).copied().unwrap_or(0)
    }
}

impl KmeObserver for Counts {
    fn request(&self, endpoint: Endpoint, status: u16, _elapsed: Duration) {
        *self.requests.lock().unwrap().entry((endpoint, status)).or_default() += 1;
    }
    fn peer_up(&self, _link_id: &str, up: bool) {
        self.peer_events.lock().unwrap().push(up);
    }
    fn keys_served(&self, _link_id: &str, endpoint: Endpoint, keys: usize) {
        *self.keys_served.lock().unwrap().entry(endpoint).or_default() += keys;
    }
}

/// Settings of site `name` ("a": kme-A, Lower, A-mail ↔ B-mail; "b": kme-B, Upper), whose peer
/// serves the peer protocol at `other_peer`.
pub fn settings(pki: &Pki, name: &str, other_peer: SocketAddr) -> KmeSettings {
    let (me, other, side, local, remote) = match name {
        "a" => (KME_A, KME_B, Side::Lower, "A-mail", "B-mail"),
        _ => (KME_B, KME_A, Side::Upper, "B-mail", "A-mail"),
    };
    let mut settings = KmeSettings::new(
        me,
        vec![LinkSettings {
            link_id: LINK.into(),
            side,
            peer: PeerSettings {
                kme_id: other.into(),
                base_url: format!("https://localhost:{}", other_peer.port()),
                tls: pki.cert(me).tls(&pki.ca_pem),
                request_timeout: Duration::from_secs(2),
                fingerprint: None,
            },
            sae_pairs: vec![SaePair::new(local, remote)],
            retention: LinkRetention::default(),
        }],
    );
    settings.sync = fast_sync();
    settings
}

/// Builds a KME over `pool` and serves it on the two listeners, with its background tasks.
pub async fn start_site(
    name: &'static str,
    settings: KmeSettings,
    pool: KeyPool,
    pki: &Pki,
    etsi_l: TcpListener,
    peer_l: TcpListener,
) -> Site {
    let counts = Arc::new(Counts::default());
    let kme = Kme::with_observer(settings, pool, counts.clone()).await.unwrap();
    let etsi_addr = etsi_l.local_addr().unwrap();
    let peer_addr = peer_l.local_addr().unwrap();
    let tls = server::server_config(&pki.server.tls(&pki.ca_pem)).unwrap();
    let etsi = server::spawn(etsi_l, tls.clone(), kme.etsi_router(), ServeOptions::default()).unwrap();
    let peer = server::spawn(peer_l, tls, kme.peer_router(), ServeOptions::default()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sync = kme.spawn_sync(async move {
        let _ = stop_rx.await;
    });
    Site {
        name,
        kme,
        counts,
        etsi_addr,
        peer_addr,
        etsi: Some(etsi),
        peer: Some(peer),
        stop_sync: Some(stop_tx),
        sync: Some(sync),
    }
}

/// Brings up both sites (servers and background sync), feeds blocks `0..blocks` to both and
/// confirms them.
pub async fn two_sites(env: &TestEnv, pki: &Pki, blocks: u64) -> (Site, Site) {
    two_sites_with(env, pki, blocks, |_, _| {}).await
}

/// [`two_sites`] with the settings of each site (`"a"`, `"b"`) adjusted by `tweak`.
pub async fn two_sites_with(
    env: &TestEnv,
    pki: &Pki,
    blocks: u64,
    tweak: impl Fn(&str, &mut KmeSettings),
) -> (Site, Site) {
    let mut listeners = Vec::new();
    for _ in 0..4 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let b_peer = listeners.pop().unwrap();
    let b_etsi = listeners.pop().unwrap();
    let a_peer = listeners.pop().unwrap();
    let a_etsi = listeners.pop().unwrap();
    let mut sa = settings(pki, "a", addrs[3]);
    tweak("a", &mut sa);
    let mut sb = settings(pki, "b", addrs[1]);
    tweak("b", &mut sb);
    let a = start_site("a", sa, pool(env, "site-a").await, pki, a_etsi, a_peer).await;
    let b = start_site("b", sb, pool(env, "site-b").await, pki, b_etsi, b_peer).await;
    for n in 0..blocks {
        a.kme.accept_block(LINK, device_block(n)).await.unwrap();
        b.kme.accept_block(LINK, device_block(n)).await.unwrap();
    }
    a.kme.exchange_block_checks(LINK).await.unwrap();
    b.kme.exchange_block_checks(LINK).await.unwrap();
    for site in [&a, &b] {
        let counts = site.kme.pool().counts(LINK).await.unwrap();
        assert!(counts.available_bits_owned > 0, "site {} has no confirmed material", site.name);
    }
    (a, b)
}
