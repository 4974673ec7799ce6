//! Shared set-up of the KME tests: a throw-away PKI written to a temporary directory, a running
//! `KmePair`, and the sender side of its key stream.

#![allow(dead_code)] // each test file uses a different part

use std::path::PathBuf;
use std::time::Duration;

use etsi014::client::{ClientOptions, Etsi014Client, HttpVersionPolicy};
use etsi014::pki::{Ca, Issued};
use qkd_serial_proto::KeyBlock;
use qkd_sim::kme::{KmeConfig, KmePair};
use tokio::sync::mpsc;

pub const KME_A: &str = "KME-A";
pub const KME_B: &str = "KME-B";
pub const SAE_A: &str = "A-mail";
pub const SAE_B: &str = "B-mail";

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub pair: KmePair,
    pub blocks: mpsc::Sender<KeyBlock>,
    pub sae_a: Issued,
    pub sae_b: Issued,
    pub config: KmeConfig,
    next_block: u64,
}

pub struct Limits {
    pub key_size_bits: u32,
    pub max_keys_per_request: u32,
    pub max_stored_keys: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { key_size_bits: 256, max_keys_per_request: 16, max_stored_keys: 1000 }
    }
}

impl Fixture {
    pub async fn start(limits: Limits) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Ca::new("QuteMail test SAE CA").expect("CA");
        let path = |name: &str| -> PathBuf { dir.path().join(name) };
        std::fs::write(path("ca.pem"), ca.ca_pem()).expect("write CA");
        ca.server(&["localhost", "127.0.0.1"])
            .expect("server cert")
            .write(dir.path(), "kme-a")
            .expect("write");
        ca.server(&["localhost", "127.0.0.1"])
            .expect("server cert")
            .write(dir.path(), "kme-b")
            .expect("write");
        let sae_a = ca.client(SAE_A).expect("client cert");
        let sae_b = ca.client(SAE_B).expect("client cert");
        sae_a.write(dir.path(), "sae-a").expect("write");
        sae_b.write(dir.path(), "sae-b").expect("write");
        let cfg = KmeConfig {
            listen_a: "127.0.0.1:0".parse().expect("addr"),
            listen_b: "127.0.0.1:0".parse().expect("addr"),
            kme_id_a: KME_A.into(),
            kme_id_b: KME_B.into(),
            sae_id_a: SAE_A.into(),
            sae_id_b: SAE_B.into(),
            server_cert_a: path("kme-a.pem"),
            server_key_a: path("kme-a.key"),
            server_cert_b: path("kme-b.pem"),
            server_key_b: path("kme-b.key"),
            client_ca: path("ca.pem"),
            key_size_bits: limits.key_size_bits,
            max_keys_per_request: limits.max_keys_per_request,
            max_stored_keys: limits.max_stored_keys,
        };
        let (blocks, rx) = mpsc::channel(64);
        let pair = KmePair::start(cfg.clone(), rx).await.expect("KME pair starts");
        Fixture { dir, ca, pair, blocks, sae_a, sae_b, config: cfg, next_block: 1 }
    }

    /// Stops the pair; [`Stopped::start`] starts a new one on the same addresses.
    pub async fn stop(self) -> Stopped {
        let Fixture { dir, ca, pair, sae_a, sae_b, mut config, next_block, .. } = self;
        (config.listen_a, config.listen_b) = pair.addrs();
        pair.shutdown().await;
        Stopped { dir, ca, sae_a, sae_b, config, next_block }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn url_a(&self) -> String {
        format!("https://127.0.0.1:{}", self.pair.addrs().0.port())
    }

    pub fn url_b(&self) -> String {
        format!("https://localhost:{}", self.pair.addrs().1.port())
    }

    /// A client of KME A (`side == 'A'`) or B presenting `cert`.
    pub fn client_with(&self, side: char, cert: &Issued, http: HttpVersionPolicy) -> Etsi014Client {
        let url = if side == 'A' { self.url_a() } else { self.url_b() };
        let options = ClientOptions { http, timeout: Duration::from_secs(10), ..ClientOptions::default() };
        Etsi014Client::with_options(&url, cert.tls(&self.ca.ca_pem()), options).expect("client")
    }

    /// SAE A's client of KME A.
    pub fn a(&self) -> Etsi014Client {
        self.client_with('A', &self.sae_a, HttpVersionPolicy::Auto)
    }

    /// SAE B's client of KME B.
    pub fn b(&self) -> Etsi014Client {
        self.client_with('B', &self.sae_b, HttpVersionPolicy::Auto)
    }

    /// Feeds key blocks with these contents and waits until the pool holds them.
    pub async fn feed(&mut self, keys: Vec<Vec<u8>>) {
        let before = self.pair.pool_bytes();
        let total: usize = keys.iter().map(Vec::len).sum();
        self.send(keys).await;
        for _ in 0..500 {
            if self.pair.pool_bytes() >= before + total {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the pool did not take the blocks");
    }

    /// Sends key blocks with these contents into the link's stream, without waiting.
    pub async fn send(&mut self, keys: Vec<Vec<u8>>) {
        for key in keys {
            let block = KeyBlock::new(self.next_block, 0, 20_000, 64, key);
            self.next_block += 1;
            self.blocks.send(block).await.expect("feeder alive");
        }
    }

    /// Feeds `n` blocks of `len` random bytes; returns their concatenation.
    pub async fn feed_random(&mut self, n: usize, len: usize) -> Vec<u8> {
        use ring::rand::SecureRandom as _;
        let rng = ring::rand::SystemRandom::new();
        let keys: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                let mut k = vec![0u8; len];
                rng.fill(&mut k).expect("random");
                k
            })
            .collect();
        let all = keys.concat();
        self.feed(keys).await;
        all
    }
}

/// A fixture whose KME pair is stopped.
pub struct Stopped {
    dir: tempfile::TempDir,
    ca: Ca,
    sae_a: Issued,
    sae_b: Issued,
    config: KmeConfig,
    next_block: u64,
}

impl Stopped {
    /// A new pair (with an empty pool) on the old addresses.
    pub async fn start(self) -> Fixture {
        let Stopped { dir, ca, sae_a, sae_b, config, next_block } = self;
        let (blocks, rx) = mpsc::channel(64);
        let pair = KmePair::start(config.clone(), rx).await.expect("KME pair restarts");
        Fixture { dir, ca, pair, blocks, sae_a, sae_b, config, next_block }
    }
}
