//! Test harness: every test runs in its own process against its own SoftHSM2 token directory
//! (holding one token per simulated site), with its own scratch directory for the databases.
//!
//! The tokens and the per-test process come from `qutemail_hsm::testing` (SoftHSM2 reads
//! `SOFTHSM2_CONF` once per process, so each `#[test]` re-executes the test binary for just
//! itself with the variable set on the child only).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use kmd_keypool::{
    BlockMeta, KeyPool, NewBlock, PeerKey, PoolConfig, SaeId, Side, Verdict, VerdictOutcome, Zeroizing,
};
use qutemail_hsm::{HsmConfig, HsmKeyWrapper, PinSource, TokenSelector};
use sha2::{Digest, Sha256};

pub use qutemail_hsm::testing::SOFTHSM_MODULE;
pub const SITE_A_TOKEN: &str = "site-a";
pub const SITE_B_TOKEN: &str = "site-b";
pub const LINK: &str = "link-ab";

/// What a test body gets.
pub struct TestEnv {
    /// Scratch directory (databases, conf, tokens, pin file).
    pub dir: PathBuf,
    /// The SoftHSM token directory.
    pub token_dir: PathBuf,
    /// File holding the user PIN of both tokens.
    pub pin_file: PathBuf,
}

impl TestEnv {
    pub fn hsm_config(&self, token: &str) -> HsmConfig {
        let mut cfg = HsmConfig::new(
            SOFTHSM_MODULE,
            TokenSelector::Label(token.into()),
            PinSource::File(self.pin_file.clone()),
            "kmd-keypool-kek",
        );
        cfg.pool_size = 2;
        cfg
    }

    pub async fn hsm(&self, token: &str) -> HsmKeyWrapper {
        HsmKeyWrapper::open_async(self.hsm_config(token)).await.unwrap()
    }

    pub fn db_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sqlite"))
    }

    /// Opens (or reopens) the pool of site `name` (`a` → token site-a, Lower; `b` → site-b,
    /// Upper) and registers the link.
    pub async fn site(&self, name: &str) -> KeyPool {
        let (token, side) = match name {
            "a" => (SITE_A_TOKEN, Side::Lower),
            "b" => (SITE_B_TOKEN, Side::Upper),
            _ => panic!("unknown site {name}"),
        };
        let pool = KeyPool::open(PoolConfig::new(self.db_path(name)), self.hsm(token).await).await.unwrap();
        pool.register_link(LINK, side).await.unwrap();
        pool
    }
}

/// Runs `body` for test `name` (the test function's name) in a fresh process with a fresh
/// token directory holding the tokens `site-a` and `site-b`.
pub fn isolated(name: &str, body: impl FnOnce(&TestEnv)) {
    qutemail_hsm::testing::isolated(name, &[SITE_A_TOKEN, SITE_B_TOKEN], |e| {
        body(&TestEnv { dir: e.dir.clone(), token_dir: e.token_dir.clone(), pin_file: e.pin_file.clone() })
    })
}

/// A multi-threaded runtime for a test body (2 workers, like the target machine).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Deterministic block bytes without zero bytes (so a zeroed region never matches a secret).
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

/// A KCV both sites compute alike.
pub fn kcv(bytes: &[u8]) -> [u8; 16] {
    let d = Sha256::digest(bytes);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// Block number `n`'s length: varied, so that keys span blocks of different sizes.
pub fn block_len(n: u64) -> usize {
    [1000, 257, 1500, 64, 733][(n % 5) as usize]
}

pub fn new_block(n: u64) -> NewBlock {
    let bytes = block_bytes(n, block_len(n));
    NewBlock {
        block_id: n.to_string(),
        kcv: kcv(&bytes),
        key: Zeroizing::new(bytes),
        meta: BlockMeta {
            created_unix_ms: 1_700_000_000_000 + n,
            qber_ppm: Some(21_000),
            security_bits: Some(64),
        },
    }
}

/// Feeds blocks `range` to every pool (same bytes, same IDs).
pub async fn feed(pools: &[&KeyPool], range: std::ops::Range<u64>) {
    for pool in pools {
        let blocks: Vec<NewBlock> = range.clone().map(new_block).collect();
        pool.insert_blocks(LINK, blocks).await.unwrap();
    }
}

/// One confirmation round in each direction.
pub async fn confirm(a: &KeyPool, b: &KeyPool) -> (VerdictOutcome, VerdictOutcome) {
    let mut out = Vec::new();
    for (asker, answerer) in [(a, b), (b, a)] {
        let checks = asker.unconfirmed_blocks(LINK, 100_000).await.unwrap();
        let verdicts: Vec<(String, Verdict)> = answerer.check_peer_blocks(LINK, checks).await.unwrap();
        out.push(asker.apply_peer_verdicts(LINK, verdicts).await.unwrap());
    }
    (out[0], out[1])
}

pub fn sae(s: &str) -> SaeId {
    SaeId::new(s).unwrap()
}

/// Panics if two segments of `keys` share a byte.
pub fn assert_disjoint<'a>(keys: impl IntoIterator<Item = &'a PeerKey>) -> usize {
    let mut ranges: Vec<(String, u32, u32, String)> = Vec::new();
    let mut ids = HashSet::new();
    for k in keys {
        assert!(ids.insert(k.key_id.clone()), "key ID {} issued twice", k.key_id);
        for s in &k.segments {
            ranges.push((s.block_id.clone(), s.offset, s.offset + s.len, k.key_id.clone()));
        }
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[0].0 == w[1].0 {
            assert!(
                w[0].2 <= w[1].1,
                "block {} bytes {}..{} (key {}) overlap {}..{} (key {})",
                w[0].0,
                w[0].1,
                w[0].2,
                w[0].3,
                w[1].1,
                w[1].2,
                w[1].3
            );
        }
    }
    ids.len()
}

/// Asserts the pool is internally consistent.
pub async fn assert_integrity(pool: &KeyPool) {
    let report = pool.verify_integrity().await.unwrap();
    assert!(
        report.problems.is_empty(),
        "integrity problems in {}: {:#?}",
        pool.path().display(),
        report.problems
    );
}

/// Every regular file below `dir`, with its contents.
pub fn read_tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path, bytes));
            }
        }
    }
    out
}
