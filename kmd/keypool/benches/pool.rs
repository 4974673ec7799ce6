//! Cost of `reserve_keys` against the size of the pool, with references measured in the same
//! run on the same machine, database and token.
//!
//! * `reserve 1x256` / `reserve 100x256`: one call cutting one / a hundred 256-bit keys, with
//!   10^3 and 10^5 confirmed 1 KiB blocks in the pool (kept within 5 % of that count by
//!   topping up between timed calls). What must hold: the 10^5 figures equal the 10^3 ones
//!   (nothing scans the pool: a partial index serves the oldest owned blocks, counters give
//!   the available bits).
//! * `ref sqlite commit`: `BEGIN IMMEDIATE; INSERT one row; COMMIT` on another connection to
//!   the same database file with the same settings (WAL, `synchronous=FULL`): the floor for
//!   any durable state change.
//! * `ref hsm wrap 32B`: one `wrap_async` of 32 bytes through the same SoftHSM token; one
//!   256-bit key costs at least one of these (its own wrap), plus an unwrap and a re-wrap of
//!   the block it is cut from.
//! * `ref hsm unwrap+wrap 1KiB`: unwrap of a wrapped 1 KiB block and wrap of 1 KiB: the block
//!   handling every reserve does once per block it touches.
//!
//! `cargo bench -p kmd-keypool --bench pool`; `QUTEMAIL_BENCH_SECS` sets the measuring time
//! per case (default 5). Needs SoftHSM2 (`apt-get install -y softhsm2`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use kmd_keypool::{BlockMeta, KeyPool, NewBlock, PoolConfig, SaeId, Side, Verdict, Zeroizing};
use qutemail_hsm::{HsmConfig, HsmKeyWrapper, PinSource, TokenSelector};
use sqlx::Connection;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LINK: &str = "bench-link";
const BLOCK_LEN: usize = 1024;

/// Mean time per call of every case, over everything criterion ran (warm-up included).
static MEANS: Mutex<BTreeMap<String, (Duration, u64)>> = Mutex::new(BTreeMap::new());

fn record(name: &str, total: Duration, iters: u64) {
    let mut m = MEANS.lock().unwrap();
    let e = m.entry(name.to_owned()).or_default();
    e.0 += total;
    e.1 += iters;
}

struct Bench {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    hsm: HsmKeyWrapper,
}

fn setup() -> Bench {
    assert!(std::path::Path::new(MODULE).is_file(), "{MODULE} is missing: apt-get install -y softhsm2");
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "bench", "--pin", "bench-pin", "--so-pin", "bench-so"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "softhsm2-util failed: {out:?}");
    // SAFETY: no other thread exists yet; SoftHSM reads the variable in C_Initialize.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    let pin = dir.path().join("pin");
    std::fs::write(&pin, "bench-pin").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut cfg =
        HsmConfig::new(MODULE, TokenSelector::Label("bench".into()), PinSource::File(pin), "bench-kek");
    cfg.pool_size = 2;
    let hsm = rt.block_on(HsmKeyWrapper::open_async(cfg)).unwrap();
    let path = dir.path().to_path_buf();
    Bench { rt, _dir: dir, dir: path, hsm }
}

fn block(n: u64) -> NewBlock {
    let mut state = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let key: Vec<u8> = (0..BLOCK_LEN)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let mut kcv = [0u8; 16];
    kcv[..8].copy_from_slice(&n.to_be_bytes());
    NewBlock { block_id: n.to_string(), kcv, key: Zeroizing::new(key), meta: BlockMeta::default() }
}

/// A pool with `blocks` confirmed blocks on one link (side Lower: it owns about half).
struct Filled {
    pool: KeyPool,
    next_block: u64,
    target_owned_bits: u64,
}

impl Filled {
    async fn new(b: &Bench, blocks: u64) -> Filled {
        let pool = KeyPool::open(PoolConfig::new(b.dir.join(format!("pool-{blocks}.sqlite"))), b.hsm.clone())
            .await
            .unwrap();
        pool.register_link(LINK, Side::Lower).await.unwrap();
        let started = Instant::now();
        let mut f = Filled { pool, next_block: 0, target_owned_bits: 0 };
        f.add(blocks).await;
        f.target_owned_bits = f.pool.counts(LINK).await.unwrap().available_bits_owned;
        f.pool.checkpoint().await.unwrap();
        println!(
            "pool of {blocks} blocks ({} MiB, {} owned bits) filled and confirmed in {:.1} s",
            (blocks * BLOCK_LEN as u64) >> 20,
            f.target_owned_bits,
            started.elapsed().as_secs_f64()
        );
        f
    }

    async fn add(&mut self, blocks: u64) {
        let mut left = blocks;
        while left > 0 {
            let n = left.min(2_000);
            let batch: Vec<NewBlock> = (self.next_block..self.next_block + n).map(block).collect();
            self.next_block += n;
            left -= n;
            self.pool.insert_blocks(LINK, batch).await.unwrap();
            let pending = self.pool.unconfirmed_blocks(LINK, 100_000).await.unwrap();
            let verdicts = pending.into_iter().map(|c| (c.block_id, Verdict::Match)).collect();
            self.pool.apply_peer_verdicts(LINK, verdicts).await.unwrap();
        }
    }

    /// Keeps the owned material within 5 % of the initial amount (not timed).
    async fn top_up(&mut self) {
        let owned = self.pool.counts(LINK).await.unwrap().available_bits_owned;
        if owned * 100 < self.target_owned_bits * 95 {
            let missing_blocks = (self.target_owned_bits - owned) / (BLOCK_LEN as u64 * 8) * 2 + 2;
            self.add(missing_blocks).await;
            // Leave no WAL backlog for a timed commit's auto-checkpoint to pay for.
            self.pool.checkpoint().await.unwrap();
        }
    }
}

fn bench(c: &mut Criterion) {
    let b = setup();
    let master = SaeId::new("A-mail").unwrap();
    let slaves = [SaeId::new("B-mail").unwrap()];

    // References, in the same database directory and token.
    let ref_db = b.dir.join("pool-1000.sqlite");
    let mut filled_small = b.rt.block_on(Filled::new(&b, 1_000));
    let mut conn = b.rt.block_on(async {
        let mut conn = sqlx::SqliteConnection::connect_with(
            &sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&ref_db)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Full),
        )
        .await
        .unwrap();
        sqlx::raw_sql("CREATE TABLE IF NOT EXISTS bench_reference (id INTEGER PRIMARY KEY, v BLOB)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    });
    let mut g = c.benchmark_group("reference");
    g.bench_function("ref sqlite commit", |bencher| {
        bencher.iter_custom(|iters| {
            let total = b.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.unwrap();
                    sqlx::query("INSERT INTO bench_reference (v) VALUES (?1)")
                        .bind(&[7u8; 32][..])
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
                start.elapsed()
            });
            record("ref sqlite commit", total, iters);
            total
        })
    });
    let hsm = b.hsm.clone();
    g.bench_function("ref hsm wrap 32B", |bencher| {
        bencher.iter_custom(|iters| {
            let total = b.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(hsm.wrap_async(&[0x5a; 32]).await.unwrap());
                }
                start.elapsed()
            });
            record("ref hsm wrap 32B", total, iters);
            total
        })
    });
    let wrapped_block = b.rt.block_on(hsm.wrap_async(&[0xa5; BLOCK_LEN])).unwrap();
    g.bench_function("ref hsm unwrap+wrap 1KiB", |bencher| {
        bencher.iter_custom(|iters| {
            let total = b.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let plain = hsm.unwrap_async(&wrapped_block).await.unwrap();
                    std::hint::black_box(hsm.wrap_async(&plain).await.unwrap());
                }
                start.elapsed()
            });
            record("ref hsm unwrap+wrap 1KiB", total, iters);
            total
        })
    });
    g.finish();
    b.rt.block_on(conn.close()).unwrap();

    let mut filled_large = b.rt.block_on(Filled::new(&b, 100_000));
    let mut g = c.benchmark_group("reserve_keys");
    for (label, filled) in [("1e3 blocks", &mut filled_small), ("1e5 blocks", &mut filled_large)] {
        for count in [1u32, 100] {
            let name = format!("reserve {count}x256, {label}");
            g.bench_function(&name, |bencher| {
                bencher.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        b.rt.block_on(filled.top_up());
                        let start = Instant::now();
                        let keys =
                            b.rt.block_on(filled.pool.reserve_keys(LINK, &master, &slaves, count, 256))
                                .unwrap();
                        total += start.elapsed();
                        assert_eq!(keys.len(), count as usize);
                    }
                    record(&name, total, iters);
                    total
                })
            });
        }
    }
    g.finish();
    b.rt.block_on(async {
        filled_small.pool.close().await.unwrap();
        filled_large.pool.close().await.unwrap();
    });
    summary();
}

fn summary() {
    let m = MEANS.lock().unwrap();
    let mean = |k: &str| m.get(k).map(|(d, n)| d.as_secs_f64() / (*n).max(1) as f64).unwrap_or(f64::NAN);
    println!("\nsummary (mean per call over all iterations, warm-up included):");
    for (k, _) in m.iter() {
        println!("  {k:<34} {:>10.1} µs", mean(k) * 1e6);
    }
    let (commit, wrap, block) =
        (mean("ref sqlite commit"), mean("ref hsm wrap 32B"), mean("ref hsm unwrap+wrap 1KiB"));
    for count in [1, 100] {
        let small = mean(&format!("reserve {count}x256, 1e3 blocks"));
        let large = mean(&format!("reserve {count}x256, 1e5 blocks"));
        println!(
            "  reserve {count}x256: 1e5/1e3 blocks = {:.2}; per call = {:.1}x sqlite commit, {:.1}x hsm wrap 32B, \
             {:.1}x (hsm unwrap+wrap 1KiB); per key = {:.1} µs",
            large / small,
            small / commit,
            small / wrap,
            small / block,
            small / f64::from(count) * 1e6
        );
    }
}

fn config() -> Criterion {
    let secs: u64 = std::env::var("QUTEMAIL_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(secs))
}

criterion_group! { name = benches; config = config(); targets = bench }
criterion_main!(benches);
