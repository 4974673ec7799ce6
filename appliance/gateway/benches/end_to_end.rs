//! End-to-end throughput and latency of the gateway's SMTP intake, with Postfix's
//! `smtp-source` as the load generator and Postfix's `smtp-sink` as the reference measured in
//! the same run (the ratio is the figure; absolute numbers depend on the machine).
//!
//! Target: site B's MX listener in the live two-site demo (`qutemail_e2e::LiveDemo`), receiving
//! 10 KiB messages for `bob@b.qutemail.test` from an outside sender. A 250 from B's MX means
//! the message is durably stored at B, sealed at rest under an HSM-wrapped key: the "stored at
//! B" end of the path. `smtp-source` cannot authenticate, so it cannot submit at A (submission
//! requires AUTH), and A's MX refuses to relay to B (no open relay); the A → B relay leg is
//! what the queue's `qutemail_gateway_delivery_latency_seconds` histogram reports in the demo.
//!
//! Throughput: `smtp-source -m N -s C -l 10240` against B's MX and against `smtp-sink`, one
//! message per session. Latency: `smtp-source -m 1 -s 1` run K times against each, timed from
//! start to exit (connect, EHLO, MAIL, RCPT, DATA, the 250, QUIT), p50 and p99.
//!
//! Run: `cargo bench -p qutemail-gateway --bench end_to_end` (needs the `postfix` package for
//! /usr/sbin/smtp-source and /usr/sbin/smtp-sink; it takes the demo's machine-wide lock).
//! `QUTEMAIL_BENCH_MESSAGES`, `QUTEMAIL_BENCH_SESSIONS` and `QUTEMAIL_BENCH_SAMPLES` override
//! N (500), C (10) and K (100).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SOURCE: &str = "/usr/sbin/smtp-source";
const SINK: &str = "/usr/sbin/smtp-sink";
const LENGTH: &str = "10240";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs smtp-source with `args` against `target` and returns how long it took.
fn source(target: &str, args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = Command::new(SOURCE)
        .args(args)
        .args([
            "-l",
            LENGTH,
            "-f",
            "load@source.example",
            "-t",
            "bob@b.qutemail.test",
            "-M",
            "source.example",
        ])
        .arg(target)
        .stdin(Stdio::null())
        .output()
        .expect("running smtp-source");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "smtp-source {args:?} {target}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

struct Figures {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

fn measure(target: &str, messages: usize, sessions: usize, samples: usize) -> Figures {
    // Warm up (TLS-less sessions, first HSM use, SQLite pages).
    source(target, &["-m", "20", "-s", "2"]);
    let took = source(target, &["-m", &messages.to_string(), "-s", &sessions.to_string()]);
    let mut latencies: Vec<Duration> =
        (0..samples).map(|_| source(target, &["-m", "1", "-s", "1"])).collect();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    Figures { per_second: messages as f64 / took.as_secs_f64(), p50: at(0.50), p99: at(0.99) }
}

fn main() {
    // `cargo bench` passes `--bench`; with a filter that is not ours, do nothing.
    if std::env::args().skip(1).any(|a| !a.starts_with('-') && !"end_to_end".contains(a.as_str())) {
        return;
    }
    for tool in [SOURCE, SINK] {
        assert!(
            std::path::Path::new(tool).is_file(),
            "{tool} is missing: apt-get install -y postfix (debconf: No configuration)"
        );
    }
    let messages = env_or("QUTEMAIL_BENCH_MESSAGES", 500);
    let sessions = env_or("QUTEMAIL_BENCH_SESSIONS", 10);
    let samples = env_or("QUTEMAIL_BENCH_SAMPLES", 100);

    // The reference: smtp-sink on an ephemeral port, accepting everything, storing nothing.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("its address").port()
    };
    let sink_addr = format!("127.0.0.1:{port}");
    let mut sink_cmd = Command::new(SINK);
    // smtp-sink refuses to run as root without a user to switch to.
    if is_root() {
        sink_cmd.args(["-u", "nobody"]);
    }
    let mut sink =
        sink_cmd.arg(&sink_addr).arg("256").stdout(Stdio::null()).spawn().expect("starting smtp-sink");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&sink_addr).is_err() {
        assert!(Instant::now() < deadline, "smtp-sink does not listen on {sink_addr}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let demo = qutemail_e2e::LiveDemo::start();
    let mx = demo.site("B")["gateway"]["smtp_mx"].as_str().expect("sites.B.gateway.smtp_mx").to_owned();

    let gateway = measure(&mx, messages, sessions, samples);
    let reference = measure(&sink_addr, messages, sessions, samples);
    let _ = sink.kill();
    let _ = sink.wait();
    let (status, out) = demo.stop();
    assert!(status.success(), "{out}");

    println!(
        "end_to_end: {messages} messages of {LENGTH} bytes, {sessions} sessions; latency over {samples} single-message sessions"
    );
    for (name, f) in
        [("qutemail B MX (stored, sealed)", &gateway), ("postfix smtp-sink (reference)", &reference)]
    {
        println!(
            "  {name:32} {:8.1} msg/s   p50 {:7.2} ms   p99 {:7.2} ms",
            f.per_second,
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "  ratio gateway/sink: throughput {:.3}, p50 latency {:.2}x, p99 latency {:.2}x",
        gateway.per_second / reference.per_second,
        gateway.p50.as_secs_f64() / reference.p50.as_secs_f64(),
        gateway.p99.as_secs_f64() / reference.p99.as_secs_f64()
    );
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
