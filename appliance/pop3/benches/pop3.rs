//! What serving mail over POP3 costs compared with only reading the sealed bytes:
//!
//! * `pop3 RETR`: one client on port 995 (TLS), logged in, `RETR` of each of N messages of
//!   10 KiB, read to the final `.`: store metadata, blob read, HSM unwrap of the message key,
//!   decryption and verification, rendering, TLS.
//! * `ref blob read`: the same N messages' metadata (one [`Store::fetch`]) and every sealed blob
//!   read to its end, without opening anything: the floor of reading them from this disk.
//!
//! The ratio `pop3 RETR / ref blob read` (medians of R rounds, both measured in this run) is what
//! to compare across machines. `cargo bench -p qutemail-pop3 --bench pop3`;
//! `QUTEMAIL_BENCH_MESSAGES` (default 1000) and `QUTEMAIL_BENCH_ROUNDS` (default 5) change N
//! and R. Needs SoftHSM2 (`apt-get install -y softhsm2`), like the tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Site, TOKEN};
use qutemail_hsm::testing::{SoftHsmEnv, init_tokens};
use qutemail_store::{Backend, Selection};
use tokio::io::AsyncReadExt;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let messages = env("QUTEMAIL_BENCH_MESSAGES", 1000);
    let rounds = env("QUTEMAIL_BENCH_ROUNDS", 5).max(1);
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let conf = init_tokens(&dir, &[TOKEN]);
    // SAFETY: set before any thread exists and before SoftHSM is loaded, which reads it once.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    let hsm_env = SoftHsmEnv { token_dir: dir.join("tokens"), pin_file: dir.join("user.pin"), dir };

    let rt = common::runtime();
    rt.block_on(async {
        let site = Site::start(&hsm_env, Backend::Sqlite).await;
        // Start from exactly N messages of 10 KiB.
        let mut c = site.tls_client().await;
        for n in 1..=3 {
            assert!(c.cmd(&format!("DELE {n}")).await.starts_with("+OK"));
        }
        assert!(c.cmd("QUIT").await.starts_with("+OK"));
        let mut body = b"From: bench@a.example\r\nTo: alice@a.example\r\nSubject: bench\r\n\r\n".to_vec();
        while body.len() < 10 * 1024 {
            body.extend_from_slice(
                b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\r\n",
            );
        }
        for _ in 0..messages {
            site.deliver(body.clone()).await;
        }
        assert_eq!(site.count().await, messages);

        let (mut pop3, mut reference) = (Vec::new(), Vec::new());
        let mut bytes = 0usize;
        for _ in 0..rounds {
            let t = Instant::now();
            let mut c = site.tls_client().await;
            bytes = 0;
            for n in 1..=messages {
                assert!(c.cmd(&format!("RETR {n}")).await.starts_with("+OK"));
                bytes += c.body().await.len();
            }
            assert!(c.cmd("QUIT").await.starts_with("+OK"));
            pop3.push(t.elapsed());

            let t = Instant::now();
            let mut sealed = 0usize;
            for meta in site.store.store.fetch(site.inbox, &Selection::All).await.unwrap() {
                let mut reader = site.store.store.read_blob(&meta).await.unwrap();
                let mut buf = Vec::with_capacity(meta.blob_len as usize);
                reader.read_to_end(&mut buf).await.unwrap();
                sealed += buf.len();
            }
            assert!(sealed > 0);
            reference.push(t.elapsed());
        }
        let (p, r) = (median(pop3), median(reference));
        println!("messages: {messages} x {} bytes presented, {rounds} rounds (medians)", bytes / messages);
        println!(
            "pop3 RETR over TLS : {:>10.1} ms  ({:.0} messages/s)",
            p.as_secs_f64() * 1e3,
            messages as f64 / p.as_secs_f64()
        );
        println!(
            "ref blob read      : {:>10.1} ms  ({:.0} messages/s)",
            r.as_secs_f64() * 1e3,
            messages as f64 / r.as_secs_f64()
        );
        println!("ratio pop3 RETR / ref blob read: {:.1}", p.as_secs_f64() / r.as_secs_f64());
    });
}
