//! Delivery rate to one peer site, one attempt at a time (how the queue worked before) against
//! the default parallelism, in the same run: N messages of 10 KiB queued (not timed), then
//! delivered by queue rounds (timed) over real SMTP sessions to a local sink that waits a WAN
//! round trip before answering each flight of commands. Real store (SQLite) and SoftHSM token.
//!
//! `cargo bench -p qutemail-queue --bench parallel`; `QUEUE_BENCH_MESSAGES` (default 300) and
//! `QUEUE_BENCH_RTT_MS` (default 10) change the load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Sink, SinkOptions, TOKEN, site, submit};
use qutemail_hsm::testing::{SoftHsmEnv, init_tokens};
use qutemail_queue::{OutboundQueue, Parallelism};

/// Set in the child process that runs the bench with its SoftHSM token directory.
const CHILD_DIR: &str = "QUTEMAIL_QUEUE_BENCH_HSM_DIR";

fn main() {
    // SoftHSM reads SOFTHSM2_CONF once per process: the bench runs in a child that has it.
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        return bench(PathBuf::from(dir));
    }
    let scratch = tempfile::tempdir().unwrap();
    let conf = init_tokens(scratch.path(), &[TOKEN]);
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", conf)
        .env(CHILD_DIR, scratch.path())
        .status()
        .unwrap();
    std::process::exit(status.code().unwrap_or(1));
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bench(dir: PathBuf) {
    let messages = setting("QUEUE_BENCH_MESSAGES", 300) as usize;
    let rtt = Duration::from_millis(setting("QUEUE_BENCH_RTT_MS", 10));
    let env = SoftHsmEnv { token_dir: dir.join("tokens"), pin_file: dir.join("user.pin"), dir };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let sink = Sink::start(SinkOptions { reply_delay: rtt, ..Default::default() }).await;
        let (_t, queue) = site(&env, &[("b.test", sink.addr)], Parallelism::default()).await;
        println!("{messages} messages × 10 KiB to one peer site, {} ms per reply flight", rtt.as_millis());
        let default = Parallelism::default();
        let runs = [
            ("one at a time (before)", Parallelism::SEQUENTIAL),
            ("default (4 per destination, 16 in all)", default),
        ];
        let mut rates = Vec::new();
        for (round, (name, parallelism)) in runs.into_iter().enumerate() {
            let queue = queue.clone().with_parallelism(parallelism);
            let rate = deliver(&queue, &sink, &format!("r{round}"), messages).await;
            println!("{name:>40}: {rate:8.1} messages/s");
            rates.push(rate);
        }
        println!("{:>40}: {:8.2}×", "default / one at a time", rates[1] / rates[0]);
    });
}

/// Queues `n` messages, then delivers them; returns messages per second of the delivery.
async fn deliver(queue: &OutboundQueue, sink: &Sink, run: &str, n: usize) -> f64 {
    let before = sink.received().len();
    for i in 0..n {
        submit(queue, &format!("{run}-{i}"), &[&format!("user{}@b.test", i % 50)], 10 * 1024).await;
    }
    let started = Instant::now();
    while queue.run_once().await.unwrap() > 0 {}
    let took = started.elapsed();
    assert_eq!(sink.received().len() - before, n, "not every message arrived");
    n as f64 / took.as_secs_f64()
}
