//! Seal and open throughput of the envelope against raw AES-256-GCM, measured in one run.
//!
//! Groups: `raw-aes-gcm` (one AES-256-GCM call over the whole buffer, with `ring` and with
//! RustCrypto `aes-gcm`), `seal` and `open` (qaes and hybrid, whole envelopes: HKDF, STREAM
//! chunks, base64 MIME body, SHA-256 for the certificate, Ed25519 signature; hybrid adds ML-KEM
//! encapsulation or decapsulation), and `otp` at its maximum size. Sizes: 1 KiB, 1 MiB, 25 MiB.
//! The durations criterion measures are also collected here (through `iter_custom`) and printed
//! at the end as MiB/s with ratios against raw AES-GCM of the backend the envelope uses, and
//! beside `openssl speed -evp aes-256-gcm` run by this process as an outside reference.
//!
//! Run: `cargo bench -p qutemail-envelope --bench seal` (ring backend) or with
//! `--no-default-features --features rustcrypto`. Samples are few to keep it near two minutes.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use qutemail_envelope::*;
use uuid::Uuid;
use zeroize::Zeroizing;

const SIZES: [(usize, &str); 3] = [(1024, "1KiB"), (1024 * 1024, "1MiB"), (25 * 1024 * 1024, "25MiB")];

/// Measured (iterations, total time) per benchmark, as criterion drove them.
static MEASURED: Mutex<BTreeMap<String, (u64, Duration, usize)>> = Mutex::new(BTreeMap::new());

fn timed(name: String, bytes: usize, iters: u64, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    let elapsed = start.elapsed();
    if let Ok(mut m) = MEASURED.lock() {
        let e = m.entry(name).or_insert((0, Duration::ZERO, bytes));
        e.0 += iters;
        e.1 += elapsed;
    }
    elapsed
}

struct Fixture {
    routing: RoutingHeaders,
    link: LinkInfo,
    qkd: Vec<QkdKey>,
    kem: SiteKemSecretKey,
    signer: InMemorySigner,
}

impl Fixture {
    fn new() -> Self {
        Self {
            routing: RoutingHeaders {
                from: "alice@a.example".into(),
                to: "bob@b.example".into(),
                cc: None,
                date: "Wed, 25 Nov 2026 12:00:00 +0000".into(),
                message_id: "<bench@a.example>".into(),
            },
            link: LinkInfo {
                link_id: "link-a-b".into(),
                source_kme_id: "KME-A".into(),
                target_kme_id: "KME-B".into(),
                qber_ppm: 20_000,
                key_rate_bps: 10_000,
            },
            qkd: vec![QkdKey::new(Uuid::from_bytes([1; 16]), Zeroizing::new(vec![7; 32]))],
            kem: SiteKemSecretKey::from_seed(&Zeroizing::new([3; 64])).expect("key"),
            signer: InMemorySigner::from_seed("a.example/bench", &Zeroizing::new([9; 32])),
        }
    }

    fn otp_keys(len: usize) -> Vec<QkdKey> {
        (0..otp_keys_needed(len, 32))
            .map(|i| QkdKey::new(Uuid::from_u128(i as u128), Zeroizing::new(vec![i as u8; 32])))
            .collect()
    }

    fn seal(&self, mode: Mode, plaintext: &[u8], qkd: &[QkdKey], out: &mut Vec<u8>) {
        let mut request = SealRequest::new(mode, &self.routing, "a.example", 0);
        request.link = Some(&self.link);
        request.qkd_keys = qkd;
        request.recipient_kem_key = Some(self.kem.public_key());
        let randomness = SealRandomness { salt: [5; 32], kem_seed: Zeroizing::new([6; 32]) };
        out.clear();
        seal(&request, &self.signer, &randomness, plaintext, out).expect("seal");
    }

    fn open(&self, sealed: &[u8], qkd: &[QkdKey]) {
        let message = SealedMessage::read_header(sealed).expect("header");
        let keys = OpenKeys { qkd_keys: qkd, kem_secret_key: Some(&self.kem), ..OpenKeys::default() };
        message.open(&keys, std::io::sink()).expect("open");
    }
}

fn raw_ring(key: &ring::aead::LessSafeKey, buf: &mut [u8]) {
    let nonce = ring::aead::Nonce::assume_unique_for_key([0; 12]);
    let tag = key.seal_in_place_separate_tag(nonce, ring::aead::Aad::empty(), buf).expect("ring seal");
    let _ = black_box(tag);
}

fn raw_rustcrypto(cipher: &aes_gcm::Aes256Gcm, buf: &mut [u8]) {
    use aes_gcm::AeadInOut;
    let tag = cipher.encrypt_inout_detached(&[0u8; 12].into(), b"", buf.into()).expect("aes-gcm seal");
    let _ = black_box(tag);
}

fn bench(c: &mut Criterion) {
    let fx = Fixture::new();
    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7; 32]).expect("ring key"),
    );
    let rc_key = {
        use aes_gcm::KeyInit;
        aes_gcm::Aes256Gcm::new(&[7u8; 32].into())
    };

    for (size, label) in SIZES {
        let plaintext: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let mut group = c.benchmark_group(format!("envelope-{label}"));
        group.throughput(Throughput::Bytes(size as u64));
        if size > 1024 * 1024 {
            group
                .sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(3));
        } else {
            group
                .sample_size(20)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(1));
        }
        let mut buf = plaintext.clone();
        group.bench_function(BenchmarkId::new("raw-aes-gcm", "ring"), |b| {
            b.iter_custom(|n| timed(format!("{label} raw ring"), size, n, || raw_ring(&ring_key, &mut buf)))
        });
        group.bench_function(BenchmarkId::new("raw-aes-gcm", "rustcrypto"), |b| {
            b.iter_custom(|n| {
                timed(format!("{label} raw rustcrypto"), size, n, || raw_rustcrypto(&rc_key, &mut buf))
            })
        });
        for mode in [Mode::Qaes, Mode::Hybrid] {
            let mut sealed = Vec::new();
            group.bench_function(BenchmarkId::new("seal", mode.name()), |b| {
                b.iter_custom(|n| {
                    timed(format!("{label} seal {mode}"), size, n, || {
                        fx.seal(mode, &plaintext, &fx.qkd, &mut sealed)
                    })
                })
            });
            fx.seal(mode, &plaintext, &fx.qkd, &mut sealed);
            group.bench_function(BenchmarkId::new("open", mode.name()), |b| {
                b.iter_custom(|n| {
                    timed(format!("{label} open {mode}"), size, n, || fx.open(&sealed, &fx.qkd))
                })
            });
        }
        group.finish();
    }

    // One-time pad at its maximum size.
    let size = DEFAULT_OTP_MAX_SIZE;
    let plaintext = vec![0x42u8; size];
    let keys = Fixture::otp_keys(size);
    let mut group = c.benchmark_group("envelope-otp-64KiB");
    group.throughput(Throughput::Bytes(size as u64));
    group.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    let mut buf = plaintext.clone();
    group.bench_function("raw-aes-gcm/ring", |b| {
        b.iter_custom(|n| timed("64KiB raw ring".into(), size, n, || raw_ring(&ring_key, &mut buf)))
    });
    group.bench_function("raw-aes-gcm/rustcrypto", |b| {
        b.iter_custom(|n| timed("64KiB raw rustcrypto".into(), size, n, || raw_rustcrypto(&rc_key, &mut buf)))
    });
    let mut sealed = Vec::new();
    group.bench_function("seal/otp", |b| {
        b.iter_custom(|n| {
            timed("64KiB seal otp".into(), size, n, || fx.seal(Mode::Otp, &plaintext, &keys, &mut sealed))
        })
    });
    fx.seal(Mode::Otp, &plaintext, &keys, &mut sealed);
    group.bench_function("open/otp", |b| {
        b.iter_custom(|n| timed("64KiB open otp".into(), size, n, || fx.open(&sealed, &keys)))
    });
    group.finish();
}

/// `openssl speed -evp aes-256-gcm` on 16 KiB blocks, in MB/s (10^6 bytes), if openssl runs.
fn openssl_reference() -> Result<f64, String> {
    let out = std::process::Command::new("openssl")
        .args(["speed", "-evp", "aes-256-gcm", "-seconds", "2", "-bytes", "16384"])
        .output()
        .map_err(|e| format!("openssl not run ({e})"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("aes-256-gcm"))
        .ok_or_else(|| "openssl printed no aes-256-gcm line".to_string())?;
    println!("openssl speed -evp aes-256-gcm -bytes 16384 (1000s of bytes per second): {line}");
    let value =
        line.split_whitespace().last().and_then(|v| v.strip_suffix('k')).and_then(|v| v.parse::<f64>().ok());
    value.map(|k| k * 1000.0 / 1e6).ok_or_else(|| format!("cannot parse {line:?}"))
}

fn mib_per_s(name: &str) -> Option<f64> {
    let m = MEASURED.lock().ok()?;
    let (iters, total, bytes) = m.get(name)?;
    Some(*iters as f64 * *bytes as f64 / total.as_secs_f64() / (1024.0 * 1024.0))
}

fn summary() {
    let backend = AES_GCM_BACKEND;
    println!("\n== Summary (MiB/s, measured above in this run; envelope backend: {backend}) ==");
    let openssl = match openssl_reference() {
        Ok(mb) => {
            println!("openssl reference: {:.0} MiB/s", mb * 1e6 / (1024.0 * 1024.0));
            Some(mb * 1e6 / (1024.0 * 1024.0))
        }
        Err(why) => {
            println!("openssl reference skipped: {why}");
            None
        }
    };
    println!(
        "{:<7} {:<11} {:>10} {:>16} {:>16} {:>12}",
        "size", "operation", "MiB/s", "/raw ring", "/raw rustcrypto", "/openssl"
    );
    let labels = ["1KiB", "1MiB", "25MiB", "64KiB"];
    for label in labels {
        let ring = mib_per_s(&format!("{label} raw ring"));
        let rc = mib_per_s(&format!("{label} raw rustcrypto"));
        let ops: &[&str] = if label == "64KiB" {
            &["raw ring", "raw rustcrypto", "seal otp", "open otp"]
        } else {
            &["raw ring", "raw rustcrypto", "seal qaes", "open qaes", "seal hybrid", "open hybrid"]
        };
        for op in ops {
            let Some(v) = mib_per_s(&format!("{label} {op}")) else { continue };
            let ratio = |r: Option<f64>| r.map(|r| format!("{:.3}", v / r)).unwrap_or_else(|| "-".into());
            println!(
                "{label:<7} {op:<11} {v:>10.1} {:>16} {:>16} {:>12}",
                ratio(ring),
                ratio(rc),
                ratio(openssl)
            );
        }
    }
    println!(
        "ratio = operation MiB/s / reference MiB/s; the envelope's own AES-GCM is the {backend} column's backend."
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    summary();
}
