//! Many idle clients at once over real sockets: 10,000 connections that say nothing after the
//! greeting (held by a separate client process, Python's asyncio), against the gateway's IMAP
//! server. Each gets the greeting (or, beyond `max_connections`, a clear `* BYE`), the server's
//! memory per idle connection stays bounded, a normal client logs in while they are all held
//! and after, and once they close the server's file descriptors return to where they were.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ALICE, ALICE_PASSWORD, PYTHON_HINT, Site, TOKEN, python_program, runtime};
use qutemail_hsm::testing::isolated;
use qutemail_store::Backend;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};

const IDLE_CONNECTIONS: usize = 10_000;

/// Lets this process hold every server-side socket: the soft RLIMIT_NOFILE up to the hard one.
fn raise_fd_limit(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= needed,
        "this test needs {needed} file descriptors but the hard limit is {hard}: raise it (ulimit -Hn)"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

/// Resident memory of this process (the server), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The idle clients: a Python process holding `count` connections until told to let go.
struct Swarm {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Swarm {
    fn open(port: u16, count: usize) -> (Swarm, serde_json::Value) {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/idle_swarm.py");
        let mut child = Command::new(python_program())
            .arg(script)
            .args(["127.0.0.1", &port.to_string(), &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("python: {e}; {PYTHON_HINT}"));
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("the swarm's report");
        let report = serde_json::from_str(&line).unwrap_or_else(|e| panic!("swarm report {line:?}: {e}"));
        (Swarm { child, stdin, stdout }, report)
    }

    fn close(mut self) {
        let mut stdin = self.stdin.take().expect("stdin");
        stdin.write_all(b"close\n").expect("telling the swarm to close");
        drop(stdin);
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("the swarm's last line");
        assert!(line.contains("closed"), "{line:?}");
        assert!(self.child.wait().expect("swarm").success());
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A normal client: implicit TLS, LOGIN, SELECT, LOGOUT.
async fn normal_login(site: &Site) {
    let tcp = tokio::net::TcpStream::connect(site.tls).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&site.client_tls));
    let tls = connector.connect(ServerName::try_from("127.0.0.1").expect("name"), tcp).await.expect("TLS");
    let mut io = TokioBufReader::new(tls);
    let mut transcript = Vec::new();
    let mut line = String::new();
    io.read_line(&mut line).await.expect("greeting");
    assert!(line.starts_with("* OK"), "greeting {line:?}");
    for (tag, command) in [
        ("n1", format!("LOGIN {ALICE} \"{ALICE_PASSWORD}\"")),
        ("n2", "SELECT INBOX".into()),
        ("n3", "LOGOUT".into()),
    ] {
        io.get_mut().write_all(format!("{tag} {command}\r\n").as_bytes()).await.expect("write");
        loop {
            line.clear();
            let n = tokio::time::timeout(Duration::from_secs(60), io.read_line(&mut line))
                .await
                .expect("the server answers")
                .expect("read");
            assert!(n > 0, "closed during {command}: {transcript:?}");
            transcript.push(line.clone());
            if line.starts_with(&format!("{tag} ")) {
                assert!(line.starts_with(&format!("{tag} OK")), "{transcript:?}");
                break;
            }
        }
    }
}

/// Polls (up to 60 s) until this process holds at most `limit` file descriptors.
async fn fds_drop_to(limit: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = open_fds();
        if now <= limit || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn ten_thousand_idle_connections_are_greeted_bounded_and_released() {
    isolated("ten_thousand_idle_connections_are_greeted_bounded_and_released", &[TOKEN], |env| {
        raise_fd_limit(IDLE_CONNECTIONS as u64 + 1024);
        runtime().block_on(async {
            let site = Site::start_with(env, Backend::Sqlite, |c| {
                c.max_connections = IDLE_CONNECTIONS + 16;
                // Held for the whole test, however slowly this machine opens them.
                c.preauth_timeout = Duration::from_secs(600);
            })
            .await;
            normal_login(&site).await;
            let (fds_before, rss_before) = (open_fds(), rss_kib());

            let port = site.plain.port();
            let (swarm, report) = tokio::task::spawn_blocking(move || Swarm::open(port, IDLE_CONNECTIONS))
                .await
                .expect("swarm");
            assert_eq!(report["greeted"], IDLE_CONNECTIONS, "every connection is greeted: {report}");
            let (fds_held, rss_held) = (open_fds(), rss_kib());
            assert!(fds_held >= fds_before + IDLE_CONNECTIONS, "the server holds them all: {fds_held}");
            let per_connection = (rss_held.saturating_sub(rss_before)) * 1024 / IDLE_CONNECTIONS as u64;
            eprintln!(
                "{IDLE_CONNECTIONS} idle IMAP connections: opened in {} s, server RSS {rss_before} KiB -> \
                 {rss_held} KiB, {per_connection} bytes per idle connection",
                report["seconds"]
            );
            // Bounded: a few KiB of session state and buffers, not a growing backlog per client.
            assert!(per_connection < 64 * 1024, "{per_connection} bytes of memory per idle connection");

            // Service goes on while they are all held.
            normal_login(&site).await;

            tokio::task::spawn_blocking(move || swarm.close()).await.expect("swarm");
            let fds_after = fds_drop_to(fds_before + 8).await;
            assert!(
                fds_after <= fds_before + 8,
                "file descriptors: {fds_before} before, {fds_after} after closing"
            );
            normal_login(&site).await;
        })
    });
}

#[test]
fn connections_beyond_the_cap_get_bye_and_are_let_go() {
    isolated("connections_beyond_the_cap_get_bye_and_are_let_go", &[TOKEN], |env| {
        raise_fd_limit(2048);
        runtime().block_on(async {
            let site = Site::start_with(env, Backend::Sqlite, |c| c.max_connections = 100).await;
            let fds_before = open_fds();
            let port = site.plain.port();
            let (swarm, report) =
                tokio::task::spawn_blocking(move || Swarm::open(port, 300)).await.expect("swarm");
            assert_eq!(report["greeted"], 100, "{report}");
            assert_eq!(report["bye"], 200, "the others are told BYE: {report}");
            // The refused ones are closed by the server at once: it holds only the 100.
            let held = fds_drop_to(fds_before + 100 + 8).await;
            assert!(
                held <= fds_before + 100 + 8,
                "{held} descriptors held for 100 sessions ({fds_before} before)"
            );
            tokio::task::spawn_blocking(move || swarm.close()).await.expect("swarm");
            let after = fds_drop_to(fds_before + 8).await;
            assert!(after <= fds_before + 8, "{after} descriptors after closing ({fds_before} before)");
            normal_login(&site).await;
        })
    });
}
