//! Throughput of wrap + unwrap of 32-byte keys through SoftHSM2, at pool
//! sizes 1 and 4, next to two references measured in the same run:
//!
//! * `software`: AES-256-GCM seal + open of the same 32 bytes with `ring`,
//!   in process memory — what a software-only key store would pay. The
//!   ratio says what keeping the wrapping key in the HSM costs.
//! * `pkcs11 direct`: `C_Encrypt` + `C_Decrypt` (AES-256-GCM, 32 bytes) with
//!   a token AES key like the wrapper's, on one SoftHSM session driven
//!   directly through `cryptoki`, no pool — the floor
//!   for anything going through this token. The ratio says how much this
//!   crate adds (queueing to workers, blob format, IVs from the token RNG,
//!   and for key wrap the session-object life cycle). It is also run with
//!   two sessions on two threads, to show whether the token itself scales
//!   with more sessions (SoftHSM 2.6.1 on one key object does not).
//!
//! One "op" below is a wrap followed by an unwrap of the result.
//! `cargo bench -p qutemail-hsm --bench wrap`; `QUTEMAIL_BENCH_SECS` sets the
//! measuring time per case (default 3).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::Attribute;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use qutemail_hsm::{HsmConfig, HsmKeyWrapper, PinSource, TokenSelector, WrapMechanism};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "bench";
const PIN: &str = "bench-pin";

fn main() {
    assert!(
        std::path::Path::new(MODULE).is_file(),
        "{MODULE} is missing: install SoftHSM2 with `apt-get install -y softhsm2`"
    );
    let secs: u64 = std::env::var("QUTEMAIL_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let measure = Duration::from_secs(secs);

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
    let status = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", LABEL, "--pin", PIN, "--so-pin", "bench-so"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(status.status.success(), "softhsm2-util failed: {status:?}");
    // SAFETY: no other thread exists yet; SoftHSM reads the variable in C_Initialize.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, PIN).unwrap();

    println!(
        "wrap+unwrap of 32-byte keys, SoftHSM {}, {} CPUs, {secs} s per case",
        softhsm_version(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let software = bench_ring(measure);
    report("software: ring AES-256-GCM seal+open, 1 thread", software, None);
    let direct = bench_direct(measure, 1);
    report("pkcs11 direct: C_Encrypt+C_Decrypt AES-GCM, token key, 1 session", direct, None);
    let direct2 = bench_direct(measure, 2);
    report("pkcs11 direct: same, 2 sessions on 2 threads", direct2, None);

    for mechanism in [
        WrapMechanism::AesKeyWrapPad { mechanism_id: qutemail_hsm::CKM_AES_KEY_WRAP_PAD_PRE_V3 },
        WrapMechanism::AesGcm,
    ] {
        for pool in [1usize, 4] {
            let mut cfg = HsmConfig::new(
                MODULE,
                TokenSelector::Label(LABEL.into()),
                PinSource::File(pin_file.clone()),
                format!("bench-{}", mechanism.name()),
            );
            cfg.mechanism = mechanism;
            cfg.pool_size = pool;
            let hsm = HsmKeyWrapper::open(cfg).unwrap();
            let clients = pool * 2;
            let rate = run_threads(clients, measure, |i| {
                let hsm = hsm.clone();
                let key = [i as u8 ^ 0x5a; 32];
                move || {
                    let blob = hsm.wrap(&key).unwrap();
                    let back = hsm.unwrap(&blob).unwrap();
                    assert_eq!(&back[..], &key[..]);
                }
            });
            report(
                &format!("hsm {} pool={pool} ({clients} client threads)", mechanism.name()),
                rate,
                Some((software, direct)),
            );
        }
    }
}

fn softhsm_version() -> String {
    Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn report(name: &str, ops_per_sec: f64, refs: Option<(f64, f64)>) {
    match refs {
        None => println!("{name:<58} {ops_per_sec:>12.0} ops/s"),
        Some((software, direct)) => println!(
            "{name:<58} {ops_per_sec:>12.0} ops/s  ({:.1}% of pkcs11 direct, {:.2}% of software)",
            100.0 * ops_per_sec / direct,
            100.0 * ops_per_sec / software
        ),
    }
}

/// Runs `clients` threads, each repeating the closure made by `make(i)`,
/// for `measure` after a short warm-up; returns completed ops per second.
fn run_threads<F, G>(clients: usize, measure: Duration, make: F) -> f64
where
    F: Fn(usize) -> G,
    G: FnMut() + Send + 'static,
{
    let done = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let mut op = make(i);
            let (done, counting, stop) = (done.clone(), counting.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    op();
                    if counting.load(Ordering::Relaxed) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    counting.store(true, Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(measure);
    let n = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    n as f64 / elapsed.as_secs_f64()
}

fn bench_ring(measure: Duration) -> f64 {
    run_threads(1, measure, |_| {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
        let mut counter = 0u64;
        move || {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&counter.to_be_bytes());
            let mut buf = [0x42u8; 32].to_vec();
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(b"QK\x01\x02"),
                &mut buf,
            )
            .unwrap();
            let plain = key
                .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(b"QK\x01\x02"), &mut buf)
                .unwrap();
            assert_eq!(plain, &[0x42u8; 32]);
        }
    })
}

/// `C_Encrypt` + `C_Decrypt` straight through `cryptoki`, one session per
/// thread, all using one AES key object stored in the token (private,
/// sensitive, non-extractable) like the wrapper's: SoftHSM checks a token
/// object's backing file on every use, which makes it about twice as slow
/// as a session-only key, so a session key would not be a fair floor.
fn bench_direct(measure: Duration, threads: usize) -> f64 {
    let ctx = Pkcs11::new(MODULE).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).unwrap();
    let slot = ctx.get_slots_with_token().unwrap()[0];
    let rate = {
        let session = ctx.open_rw_session(slot).unwrap();
        session.login(UserType::User, Some(&AuthPin::new(PIN.into()))).unwrap();
        let key = session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::ValueLen(32.into()),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(b"bench-direct".to_vec()),
                ],
            )
            .unwrap();
        let rate = run_threads(threads, measure, |_| {
            let session = ctx.open_rw_session(slot).unwrap();
            move || {
                let aad = *b"QK\x01\x02";
                let mut iv = [3u8; 12];
                let ct = session
                    .encrypt(
                        &Mechanism::AesGcm(GcmParams::new(&mut iv, &aad, 128.into()).unwrap()),
                        key,
                        &[0x42; 32],
                    )
                    .unwrap();
                let pt = session
                    .decrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, &aad, 128.into()).unwrap()), key, &ct)
                    .unwrap();
                assert_eq!(pt, [0x42; 32]);
            }
        });
        drop(session);
        rate
    };
    ctx.finalize().unwrap();
    rate
}
