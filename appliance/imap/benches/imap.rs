//! IMAP benchmark (harness = false; prints a table).
//!
//! 1. FETCH BODY[] of N (default 1,000) 10 KiB messages through the server over TLS, each one
//!    opened by the vault, against the reference measured in the same run: reading the same
//!    sealed blobs straight from the store (no decryption, no IMAP). Reported as a ratio.
//! 2. Memory per idle IMAP connection: the server process's RSS growth (`/proc/self/status`)
//!    while a child process holds C (default 200) authenticated connections, first without
//!    and then with INBOX selected, divided by C.
//!
//! SoftHSM reads its configuration once per process, so the benchmark re-executes itself with
//! a fresh token (`QUTEMAIL_BENCH_CHILD`); a second re-execution plays the idle clients.
//!
//! `QUTEMAIL_BENCH_MESSAGES`, `QUTEMAIL_BENCH_CONNECTIONS` change N and C.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qutemail_hsm::HsmKeyWrapper;
use qutemail_imap::{ImapConfig, ImapServer};
use qutemail_store::testing::TestStore;
use qutemail_store::{Backend, NewAccount, Selection};
use qutemail_vault::{AppendRequest, MailVault, Protection, SiteDirectory, SiteKeys, VaultSettings};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const CHILD: &str = "QUTEMAIL_BENCH_CHILD";
const CLIENTS: &str = "QUTEMAIL_BENCH_IDLE_CLIENTS";
const USER: &str = "bench@a.example";
const PASSWORD: &str = "bench password";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if let Ok(spec) = std::env::var(CLIENTS) {
        idle_clients(&spec);
        return;
    }
    if std::env::var(CHILD).is_err() {
        // Parent: make a token, run the benchmark in a child that uses it.
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = qutemail_hsm::testing::init_tokens(dir.path(), &["bench"]);
        let status = std::process::Command::new(std::env::current_exe().expect("exe"))
            .env("SOFTHSM2_CONF", conf)
            .env(CHILD, dir.path())
            .status()
            .expect("bench child");
        assert!(status.success(), "benchmark child failed");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(bench());
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn tls_configs() -> (rustls::ServerConfig, Arc<rustls::ClientConfig>, String) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = etsi014::pki::Ca::new("bench CA").expect("CA");
    let issued = ca.server(&["localhost", "127.0.0.1"]).expect("cert");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes()).collect::<Result<_, _>>().expect("pem");
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key");
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server");
    (server, client_config(&ca.ca_pem()), ca.ca_pem())
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

type Client = BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn connect(port: u16, tls: &Arc<rustls::ClientConfig>) -> Client {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
        .await
        .expect("TLS");
    let mut c = BufReader::new(stream);
    let mut greeting = String::new();
    c.read_line(&mut greeting).await.expect("greeting");
    c
}

/// Sends a command and reads to its tagged answer; returns the literal bytes received.
async fn command(c: &mut Client, tag: &str, text: &str) -> u64 {
    c.get_mut().write_all(format!("{tag} {text}\r\n").as_bytes()).await.expect("write");
    let mut literal_bytes = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        c.read_until(b'\n', &mut line).await.expect("read");
        assert!(!line.is_empty(), "server closed");
        if line.starts_with(format!("{tag} ").as_bytes()) {
            assert!(line.starts_with(format!("{tag} OK").as_bytes()), "{}", String::from_utf8_lossy(&line));
            return literal_bytes;
        }
        if line.ends_with(b"}\r\n")
            && let Some(open) = line.iter().rposition(|&b| b == b'{')
        {
            let n: u64 = std::str::from_utf8(&line[open + 1..line.len() - 3]).expect("n").parse().expect("n");
            let mut buf = vec![0u8; usize::try_from(n).expect("size")];
            c.read_exact(&mut buf).await.expect("literal");
            literal_bytes += n;
        }
    }
}

async fn bench() {
    let n = env_usize("QUTEMAIL_BENCH_MESSAGES", 1000);
    let connections = env_usize("QUTEMAIL_BENCH_CONNECTIONS", 200);
    let dir = std::path::PathBuf::from(std::env::var(CHILD).expect("child dir"));
    let pin_file = dir.join("user.pin");
    let hsm = HsmKeyWrapper::open_async(qutemail_hsm::HsmConfig::new(
        qutemail_hsm::testing::SOFTHSM_MODULE,
        qutemail_hsm::TokenSelector::Label("bench".into()),
        qutemail_hsm::PinSource::File(pin_file),
        "bench-kek",
    ))
    .await
    .expect("HSM");
    let keys = SiteKeys::load_or_create(&dir.join("keys.json"), "a.example", &hsm).await.expect("keys");
    let vault = MailVault::new(VaultSettings::new("A-mail"), None, hsm, keys, SiteDirectory::default());
    let t = TestStore::new(Backend::Sqlite).await;
    let store = t.store.clone();
    let account = store
        .create_account(NewAccount {
            address: USER,
            display_name: "Bench",
            password: PASSWORD,
            quota_bytes: None,
        })
        .await
        .expect("account");
    let inbox = store.mailbox(account.id, "INBOX").await.expect("inbox");
    let filler = "0123456789abcdef".repeat(640); // 10 KiB
    let started = Instant::now();
    for i in 0..n {
        let msg = format!("From: a@b.example\r\nSubject: bench {i}\r\n\r\n{filler}\r\n");
        vault
            .append_plain(
                &store,
                inbox.id,
                Protection::Normal,
                &AppendRequest::default(),
                msg.into_bytes().into(),
            )
            .await
            .expect("append");
    }
    eprintln!("stored {n} messages of 10 KiB in {:.1} s", started.elapsed().as_secs_f64());

    let (server_tls, client_tls, ca_pem) = tls_configs();
    let mut config = ImapConfig::new(Arc::new(server_tls));
    config.max_connections = connections + 16;
    let server = ImapServer::new(config, store.clone(), vault.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let s = server.clone();
    tokio::spawn(async move { s.serve_tls(listener).await });

    // 1. FETCH BODY[] through the server vs reading the sealed blobs.
    let mut imap_times = Vec::new();
    let mut raw_times = Vec::new();
    for round in 0..3 {
        let mut c = connect(port, &client_tls).await;
        command(&mut c, "a", &format!("LOGIN {USER} \"{PASSWORD}\"")).await;
        command(&mut c, "b", "EXAMINE INBOX").await;
        let t0 = Instant::now();
        let bytes = command(&mut c, "c", "UID FETCH 1:* (BODY.PEEK[])").await;
        imap_times.push(t0.elapsed());
        assert!(bytes >= (n * 10 * 1024) as u64, "round {round}: {bytes} bytes");
        command(&mut c, "d", "LOGOUT").await;

        let t0 = Instant::now();
        let metas = store.fetch(inbox.id, &Selection::All).await.expect("fetch");
        let mut total = 0usize;
        for m in &metas {
            let mut sealed = Vec::new();
            store.read_blob(m).await.expect("blob").read_to_end(&mut sealed).await.expect("read");
            total += sealed.len();
        }
        raw_times.push(t0.elapsed());
        assert!(total >= n * 10 * 1024);
    }
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let (imap, raw) = (best(&imap_times), best(&raw_times));
    println!("| measurement | value |");
    println!("| --- | ---: |");
    println!(
        "| FETCH BODY[] of {n} × 10 KiB over TLS, decrypting (best of 3) | {:.0} ms |",
        imap.as_secs_f64() * 1e3
    );
    println!(
        "| reference: read the {n} sealed blobs from the store (best of 3) | {:.0} ms |",
        raw.as_secs_f64() * 1e3
    );
    println!("| ratio IMAP / raw blob read | {:.1} |", imap.as_secs_f64() / raw.as_secs_f64().max(1e-9));
    println!("| messages per second through IMAP | {:.0} |", n as f64 / imap.as_secs_f64().max(1e-9));

    // 2. Memory per idle authenticated connection (clients in another process), without and
    //    with INBOX selected.
    let ca_file = dir.join("bench-ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("ca");
    for select in [false, true] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss_kib();
        let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
            .env(CLIENTS, format!("{port},{connections},{},{}", u8::from(select), ca_file.display()))
            .env_remove(CHILD)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("clients");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let ready = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            out.read_line(&mut line).expect("ready");
            line
        })
        .await
        .expect("ready");
        assert_eq!(ready.trim(), "ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib();
        drop(child.stdin.take());
        let _ = child.wait();
        let grown = after.saturating_sub(before);
        let what =
            if select { format!("INBOX ({n} messages) selected") } else { "no mailbox selected".into() };
        println!(
            "| RSS growth with {connections} idle authenticated TLS connections, {what} | {grown} KiB |"
        );
        println!("| memory per idle connection, {what} | {:.1} KiB |", grown as f64 / connections as f64);
        // Let the sessions end before the next measurement.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Child: holds `count` authenticated connections with INBOX selected until stdin closes.
fn idle_clients(spec: &str) {
    let mut parts = spec.splitn(4, ',');
    let port: u16 = parts.next().expect("port").parse().expect("port");
    let count: usize = parts.next().expect("count").parse().expect("count");
    let select = parts.next() == Some("1");
    let ca = std::fs::read_to_string(parts.next().expect("ca")).expect("ca");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let tls = client_config(&ca);
        let mut held = Vec::new();
        for i in 0..count {
            let mut c = connect(port, &tls).await;
            command(&mut c, &format!("l{i}"), &format!("LOGIN {USER} \"{PASSWORD}\"")).await;
            if select {
                command(&mut c, &format!("s{i}"), "SELECT INBOX").await;
            }
            held.push(c);
        }
        println!("ready");
        std::io::stdout().flush().expect("flush");
        tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await
        .expect("stdin");
        drop(held);
    });
}
