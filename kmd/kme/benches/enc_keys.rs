//! `enc_keys` under concurrent load over mutual TLS, with the peer round trip (§ 5 of the peer
//! protocol: reserve, POST the assignment to the peer kmd, mark delivered; concurrent requests
//! are group-committed), against `status` (no peer call, no pool write) in the same run.
//!
//! Two complete KMEs on loopback, SoftHSM-wrapped SQLite pools (WAL, `synchronous=FULL`), one
//! 2-worker Tokio runtime for both sites and the clients. 16 SAE connections (one
//! `Etsi014Client` each, so 16 keep-alive mTLS connections) send requests back to back;
//! criterion's time per iteration is wall time / requests, i.e. 1 / throughput. Each case runs
//! with the pool at about 10^3 and at about 10^6 256-bit keys (A's own confirmed material,
//! 8 KiB blocks inserted and confirmed directly through `KeyPool` APIs at both sites), to show
//! the cost does not grow with the pool. Before every sample the pool is topped up to the
//! target plus what the sample will take, so the small pool holds between 10^3 keys and
//! 10^3 + one sample's keys while measured.
//!
//! At the end a table gives requests/s, p50 and p99 latency over every measured request of
//! each case, and the ratios to `status` and between the two pool sizes.
//!
//! `cargo bench -p kmd-kme --bench enc_keys` (needs softhsm2); `QUTEMAIL_BENCH_BIG_POOL` sets
//! the large pool's keys (default 1000000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{LINK, Pki, TestEnv, block_bytes, init_tokens, runtime, two_sites};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use etsi014::client::Etsi014Client;
use kmd_keypool::{BlockMeta, NewBlock, Side, Zeroizing, block_owner};
use kmd_kme::Kme;
use qutemail_hsm::testing::require_softhsm;
use sha2::{Digest, Sha256};

/// Block size fed to both sites (a typical device block).
const BLOCK: usize = 8 * 1024;
/// Concurrent keep-alive connections.
const CONNECTIONS: usize = 16;
/// Bytes of one 256-bit key.
const KEY_BYTES: u64 = 32;

/// Inserts confirmed A-owned blocks at both sites until A owns at least `bytes`.
async fn fill(a: &Kme, b: &Kme, bytes: u64, next: &AtomicU64) {
    loop {
        let have = a.pool().counts(LINK).await.unwrap().available_bits_owned / 8;
        if have >= bytes {
            return;
        }
        let want = ((bytes - have).div_ceil(BLOCK as u64)).min(256);
        let mut batch_a = Vec::new();
        let mut batch_b = Vec::new();
        while (batch_a.len() as u64) < want {
            let n = next.fetch_add(1, Ordering::Relaxed) + 1;
            let id = n.to_string();
            // Only A's side cuts for A's SAE: blocks B owns would only idle in this benchmark.
            if block_owner(&id) != Side::Lower {
                continue;
            }
            let bytes = block_bytes(n, BLOCK);
            let kcv: [u8; 16] = Sha256::digest(&bytes)[..16].try_into().unwrap();
            let meta = BlockMeta { created_unix_ms: 1_700_000_000_000, qber_ppm: None, security_bits: None };
            for batch in [&mut batch_a, &mut batch_b] {
                batch.push(NewBlock { block_id: id.clone(), kcv, key: Zeroizing::new(bytes.clone()), meta });
            }
        }
        a.pool().insert_blocks(LINK, batch_a).await.unwrap();
        b.pool().insert_blocks(LINK, batch_b).await.unwrap();
        // Confirm as the block-check exchange would (§ 4), without the HTTP hop.
        loop {
            let checks = a.pool().unconfirmed_blocks(LINK, 1000).await.unwrap();
            if checks.is_empty() {
                break;
            }
            let verdicts = b.pool().check_peer_blocks(LINK, checks).await.unwrap();
            a.pool().apply_peer_verdicts(LINK, verdicts).await.unwrap();
        }
    }
}

/// Latencies of every measured request of one case.
#[derive(Default)]
struct Record {
    latencies: Vec<Duration>,
    requests: u64,
    wall: Duration,
}

impl Record {
    fn per_second(&self) -> f64 {
        self.requests as f64 / self.wall.as_secs_f64()
    }
    fn quantile(&self, q: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default()
    }
}

/// Sends `total` requests over the 16 clients, back to back on each; returns the wall time.
async fn load<F, Fut>(clients: &[Etsi014Client], total: u64, record: &Mutex<Record>, request: F) -> Duration
where
    F: Fn(Etsi014Client) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let (client, issued, request) = (client.clone(), issued.clone(), request.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while issued.fetch_add(1, Ordering::Relaxed) < total {
                let t = Instant::now();
                request(client.clone()).await;
                latencies.push(t.elapsed());
            }
            latencies
        });
    }
    let mut all = Vec::new();
    while let Some(l) = tasks.join_next().await {
        all.extend(l.unwrap());
    }
    let wall = started.elapsed();
    let mut r = record.lock().unwrap();
    r.latencies.extend(all);
    r.requests += total;
    r.wall += wall;
    wall
}

fn enc_keys(c: &mut Criterion) {
    require_softhsm();
    let big_pool: u64 =
        std::env::var("QUTEMAIL_BENCH_BIG_POOL").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let conf = init_tokens(&dir);
    // SAFETY: set before any thread of this process reads the environment (SoftHSM reads it
    // when the HSM is first opened, below).
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    let env = TestEnv { token_dir: dir.join("tokens"), pin_file: dir.join("user.pin"), dir };
    let rt = runtime();
    let pki = Pki::new();
    let (a, b) = rt.block_on(two_sites(&env, &pki, 10));
    // Separate clients: one pool each, hence one keep-alive connection each.
    let clients: Vec<Etsi014Client> = (0..CONNECTIONS).map(|_| pki.client("A-mail", a.etsi_addr)).collect();
    let next = AtomicU64::new(10_000_000);
    let mut table: Vec<(u64, String, Record)> = Vec::new();

    for pool_keys in [1_000u64, big_pool] {
        let started = Instant::now();
        rt.block_on(fill(&a.kme, &b.kme, pool_keys * KEY_BYTES, &next));
        eprintln!("pool of {pool_keys} keys filled in {:.1} s", started.elapsed().as_secs_f64());
        let mut group = c.benchmark_group(format!("kme_mtls_16conn_pool_{pool_keys}_keys"));
        group.sample_size(10).measurement_time(Duration::from_secs(8)).throughput(Throughput::Elements(1));

        let record = Mutex::new(Record::default());
        group.bench_function("status", |bench| {
            bench.iter_custom(|iters| {
                rt.block_on(load(&clients, iters, &record, |client: Etsi014Client| async move {
                    client.status("B-mail").await.unwrap();
                }))
            });
        });
        table.push((pool_keys, "status".into(), record.into_inner().unwrap()));

        for n in [1u32, 100] {
            let record = Mutex::new(Record::default());
            group.bench_function(format!("enc_keys_{n}x256"), |bench| {
                bench.iter_custom(|iters| {
                    rt.block_on(async {
                        let target = (pool_keys + iters * u64::from(n)) * KEY_BYTES;
                        fill(&a.kme, &b.kme, target, &next).await;
                        load(&clients, iters, &record, move |client: Etsi014Client| async move {
                            let keys = client.enc_keys("B-mail", n, Some(256)).await.unwrap();
                            assert_eq!(keys.keys.len(), n as usize);
                        })
                        .await
                    })
                });
            });
            table.push((pool_keys, format!("enc_keys {n}x256"), record.into_inner().unwrap()));
        }
        group.finish();
    }

    let status_of = |pool: u64| {
        table.iter().find(|(p, c, _)| *p == pool && c == "status").map(|(_, _, r)| r.per_second())
    };
    let small_of =
        |case: &str| table.iter().find(|(p, c, _)| *p == 1_000 && c == case).map(|(_, _, r)| r.per_second());
    println!("\n{CONNECTIONS} mTLS keep-alive connections, 2 Tokio workers, both KMEs in this process");
    println!(
        "{:>10}  {:<16} {:>10} {:>9} {:>9} {:>10} {:>12}",
        "pool keys", "case", "req/s", "p50 ms", "p99 ms", "vs status", "vs 10^3 pool"
    );
    for (pool, case, r) in &table {
        let rps = r.per_second();
        println!(
            "{:>10}  {:<16} {:>10.0} {:>9.2} {:>9.2} {:>10.3} {:>12.2}",
            pool,
            case,
            rps,
            r.quantile(0.5).as_secs_f64() * 1e3,
            r.quantile(0.99).as_secs_f64() * 1e3,
            rps / status_of(*pool).unwrap_or(f64::NAN),
            rps / small_of(case).unwrap_or(f64::NAN),
        );
    }
    rt.block_on(async {
        a.shutdown().await;
        b.shutdown().await;
    });
}

criterion_group!(benches, enc_keys);
criterion_main!(benches);
