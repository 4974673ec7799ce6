//! `enc_keys` requests per second over mutual TLS with the peer round trip (§ 5 of the peer
//! protocol: reserve, POST the assignment to the peer kmd, mark delivered), for 1 × 256-bit and
//! 100 × 256-bit keys per request, against `status` (no peer call, no pool write) in the same
//! run. Two complete KMEs on loopback, SoftHSM-wrapped SQLite pools. Needs softhsm2.
//!
//! `cargo bench -p kmd-kme --bench enc_keys`

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{LINK, Pki, TestEnv, device_block_sized, init_tokens, require_softhsm, runtime, two_sites};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kmd_kme::Kme;

/// Block size fed to both sites. The pool re-wraps a block on every cut (consumed bytes are zeroed
/// in the stored copy), so the per-request cost grows with the block size; 8 KiB is a typical
/// device block.
const BLOCK: usize = 8 * 1024;

/// Feeds both sites until A owns at least `bytes` of confirmed material.
async fn refill(a: &Kme, b: &Kme, bytes: u64, next: &mut u64) {
    loop {
        let have = a.pool().counts(LINK).await.unwrap().available_bits_owned / 8;
        if have >= bytes {
            return;
        }
        let blocks = (bytes - have) * 2 / BLOCK as u64 + 4;
        for _ in 0..blocks {
            a.accept_block(LINK, device_block_sized(*next, BLOCK)).await.unwrap();
            b.accept_block(LINK, device_block_sized(*next, BLOCK)).await.unwrap();
            *next += 1;
        }
        a.exchange_block_checks(LINK).await.unwrap();
    }
}

fn enc_keys(c: &mut Criterion) {
    require_softhsm();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let conf = init_tokens(&dir);
    // SAFETY: set before any thread of this process reads the environment (SoftHSM reads it
    // when the HSM is first opened, below).
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    let env = TestEnv { pin_file: dir.join("user.pin"), dir };
    let rt = runtime();
    let pki = Pki::new();
    let (a, b) = rt.block_on(two_sites(&env, &pki, 10));
    let client = pki.client("A-mail", a.etsi_addr);
    let mut next = 1_000_000u64;

    let mut group = c.benchmark_group("kme_mtls");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).throughput(Throughput::Elements(1));
    group.bench_function("status", |bench| {
        bench.to_async(&rt).iter(|| async { client.status("B-mail").await.unwrap() });
    });
    for n in [1u32, 100] {
        group.bench_function(format!("enc_keys_{n}x256"), |bench| {
            bench.iter_custom(|iters| {
                rt.block_on(async {
                    refill(&a.kme, &b.kme, iters * u64::from(n) * 32 + 4096, &mut next).await;
                    let started = Instant::now();
                    for _ in 0..iters {
                        client.enc_keys("B-mail", n, Some(256)).await.unwrap();
                    }
                    started.elapsed()
                })
            });
        });
    }
    group.finish();
    rt.block_on(async {
        a.shutdown().await;
        b.shutdown().await;
    });
}

criterion_group!(benches, enc_keys);
criterion_main!(benches);
