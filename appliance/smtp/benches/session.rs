//! Server session throughput: 10 KiB messages from the crate's client to its tokio server over
//! one loopback TCP connection (plain, and inside STARTTLS), against a reference measured in
//! the same run: a raw TCP echo of the same 10 KiB over loopback (one write, one read back).
//! At the end it prints messages/s and the ratio to the reference.
//!
//! Run: `cargo bench -p qutemail-smtp --bench session` (about 20 seconds).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use qutemail_smtp::client::{ClientConfig, SmtpClient, TlsMode};
use qutemail_smtp::server::{ListenerConfig, ListenerMode, SmtpHandler, SmtpServer};
use qutemail_smtp::{
    Address, AuthOutcome, Credentials, DeliveryReceipt, MailEnvelope, MailParams, RcptParams, Refusal,
    ReversePath, SessionInfo,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const MESSAGE_SIZE: usize = 10 * 1024;

static MEASURED: Mutex<BTreeMap<&'static str, (u64, Duration)>> = Mutex::new(BTreeMap::new());

fn record(name: &'static str, iters: u64, elapsed: Duration) -> Duration {
    if let Ok(mut m) = MEASURED.lock() {
        let e = m.entry(name).or_insert((0, Duration::ZERO));
        e.0 += iters;
        e.1 += elapsed;
    }
    elapsed
}

/// Accepts everything and counts messages (what a fast store would do, minus the store).
#[derive(Default)]
struct CountingHost {
    messages: AtomicU64,
}

impl SmtpHandler for CountingHost {
    async fn authenticate(&self, _: &SessionInfo, _: &Credentials) -> AuthOutcome {
        AuthOutcome::Rejected
    }
    async fn check_sender(&self, _: &SessionInfo, _: &ReversePath, _: &MailParams) -> Result<(), Refusal> {
        Ok(())
    }
    async fn check_recipient(&self, _: &SessionInfo, _: &Address, _: &RcptParams) -> Result<(), Refusal> {
        Ok(())
    }
    async fn deliver(&self, _: MailEnvelope, message: Vec<u8>) -> Result<DeliveryReceipt, Refusal> {
        let n = self.messages.fetch_add(1, Ordering::Relaxed);
        Ok(DeliveryReceipt { id: format!("{n}-{}", message.len()) })
    }
}

fn message() -> Vec<u8> {
    let mut m = b"From: bench@a.test\r\nTo: sink@b.test\r\nSubject: bench\r\n\r\n".to_vec();
    let mut i = 0;
    while m.len() < MESSAGE_SIZE {
        // Every 20th line starts with a dot, to exercise stuffing.
        let line = if i % 20 == 0 {
            ".dotted line of text\r\n".to_owned()
        } else {
            format!("line {i:05} {}\r\n", "x".repeat(60))
        };
        m.extend_from_slice(line.as_bytes());
        i += 1;
    }
    m.truncate(MESSAGE_SIZE - 2);
    m.extend_from_slice(b"\r\n");
    m
}

fn main() {
    let rt = Runtime::new().expect("tokio runtime");
    let ca = etsi014::pki::Ca::new("bench CA").expect("CA");
    let cert = ca.server(&["localhost"]).expect("server certificate");
    let server_tls =
        qutemail_smtp::tls::server_config(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).expect("TLS");
    let client_tls = qutemail_smtp::tls::client_config(ca.ca_pem().as_bytes()).expect("roots");
    let message = message();

    let (smtp_addr, echo_addr) = rt.block_on(async {
        let host = Arc::new(CountingHost::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let smtp_addr = listener.local_addr().expect("addr");
        let config = ListenerConfig::new(ListenerMode::Mx, "bench.test", Some(server_tls)).expect("config");
        tokio::spawn(SmtpServer::new(config, host).run(listener, std::future::pending()));
        // The reference: echo every byte back.
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (smtp_addr, echo_addr)
    });

    let mut criterion = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    let mut group = criterion.benchmark_group("10KiB-message");
    group.throughput(Throughput::Elements(1));

    group.bench_function("tcp-echo-reference", |b| {
        let mut stream = rt.block_on(TcpStream::connect(echo_addr)).expect("connect echo");
        let _ = stream.set_nodelay(true);
        let mut back = vec![0u8; message.len()];
        b.iter_custom(|iters| {
            let start = Instant::now();
            rt.block_on(async {
                for _ in 0..iters {
                    stream.write_all(&message).await.expect("echo write");
                    stream.read_exact(&mut back).await.expect("echo read");
                }
            });
            record("tcp-echo-reference", iters, start.elapsed())
        });
    });

    let from = ReversePath::Mailbox(Address::parse("bench@a.test", false).expect("address"));
    let to = [Address::parse("sink@b.test", false).expect("address")];
    for (name, tls) in [("smtp-plain", TlsMode::Disabled), ("smtp-starttls", TlsMode::Required)] {
        group.bench_function(name, |b| {
            let mut config = ClientConfig::new("bench-client.test", client_tls.clone());
            config.tls = tls;
            let mut client =
                rt.block_on(SmtpClient::connect(smtp_addr, "localhost", &config)).expect("client connect");
            b.iter_custom(|iters| {
                let start = Instant::now();
                rt.block_on(async {
                    for _ in 0..iters {
                        let report = client.send(&from, &to, &message).await.expect("send");
                        assert!(report.recipients[0].reply.is_positive());
                    }
                });
                record(name, iters, start.elapsed())
            });
        });
    }
    group.finish();

    let measured = MEASURED.lock().map(|m| m.clone()).unwrap_or_default();
    let per_second = |name| {
        measured.get(name).filter(|(n, d)| *n > 0 && !d.is_zero()).map(|(n, d)| *n as f64 / d.as_secs_f64())
    };
    println!("\n10 KiB messages over one loopback connection (same run):");
    if let Some(reference) = per_second("tcp-echo-reference") {
        println!("  {:<20} {:>10.0} round trips/s  (reference)", "tcp-echo-reference", reference);
        for name in ["smtp-plain", "smtp-starttls"] {
            if let Some(rate) = per_second(name) {
                println!(
                    "  {name:<20} {rate:>10.0} messages/s     ratio to reference {:.3}",
                    rate / reference
                );
            }
        }
    }
}
