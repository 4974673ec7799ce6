//! Bad input against a real `qutemail serve` (SQLite store, SoftHSM token, TLS from a test CA)
//! over real sockets, on the MX port: 1,000 connections at once, clients that vanish in the
//! middle of DATA, broken commands, bare line feeds, over-long lines, malformed MIME and a
//! forged sealed envelope. Every client gets a clear reply code (a banner or 421), the gateway
//! stays up and serves a normal client afterwards, it releases every file descriptor, and
//! nothing is half-stored: the blob folder holds exactly the messages that got a 250, its
//! `tmp/` is empty and the outbound queue is empty.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{add_account, listener, qutemailctl, serve, site_config, write_tls};
use qutemail_hsm::testing::isolated;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::TcpStream;

const TOKEN: &str = "gateway";
const PARALLEL: usize = 1000;

fn config(dir: &Path, pin: &Path) -> String {
    site_config(dir, pin, TOKEN)
        + r#"
[smtp]
hostname = "mail.a.test"
mx_listen = "127.0.0.1:0"

# Loopback only, no DNS: SPF/DKIM/DMARC checks (on by default) are tested in mail_auth.rs.
[mail_auth]
check = false
"#
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The stored message blobs, and what is left in the blob store's `tmp/`.
fn blobs(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let root = dir.join("blobs");
    let stored = qutemail_files(&root.join("blobs"));
    let partial = qutemail_files(&root.join("tmp"));
    (stored, partial)
}

fn qutemail_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// A line-level SMTP client.
struct Smtp {
    io: TokioBufReader<TcpStream>,
}

impl Smtp {
    async fn connect(addr: &str) -> (Smtp, String) {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut c = Smtp { io: TokioBufReader::new(tcp) };
        let banner = c.reply().await;
        (c, banner)
    }

    /// One reply (the last line of a multi-line one).
    async fn reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(60), self.io.read_line(&mut line))
                .await
                .expect("the server answers")
                .expect("read");
            assert!(n > 0, "the server closed the connection");
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.expect("write");
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// EHLO, MAIL, RCPT to bob, DATA: ready for the message.
    async fn start_data(&mut self) {
        assert!(self.cmd("EHLO client.example").await.starts_with("250"));
        assert!(self.cmd("MAIL FROM:<sender@other.example>").await.starts_with("250"));
        assert!(self.cmd("RCPT TO:<bob@a.test>").await.starts_with("250"));
        assert!(self.cmd("DATA").await.starts_with("354"));
    }

    /// A whole transaction; returns the reply to the end of DATA.
    async fn deliver(&mut self, message: &str) -> String {
        self.start_data().await;
        self.send(message.as_bytes()).await;
        self.cmd(".").await
    }
}

#[test]
fn a_thousand_connections_vanishing_clients_and_bad_input_leave_nothing_behind() {
    isolated(
        "a_thousand_connections_vanishing_clients_and_bad_input_leave_nothing_behind",
        &[TOKEN],
        |env| {
            use nix::sys::resource::{Resource, getrlimit, setrlimit};
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
            assert!(
                hard >= PARALLEL as u64 + 512,
                "the hard RLIMIT_NOFILE ({hard}) is too low for this test"
            );
            // The gateway inherits it.
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();

            let dir = &env.dir;
            write_tls(dir, "abuse test CA", &["localhost", "127.0.0.1"]);
            let config_path = dir.join("qutemail.toml");
            std::fs::write(&config_path, config(dir, &env.pin_file)).unwrap();
            add_account(&config_path, "bob@a.test", "bob-pass-1");
            let (serve, ready) = serve(&config_path, Stdio::null());
            let pid = serve.pid();
            let mx = listener(&ready, "smtp-mx");

            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async {
            let mut accepted = 0;
            // A normal client first, and the gateway's descriptors at rest.
            let (mut c, banner) = Smtp::connect(&mx).await;
            assert!(banner.starts_with("220 "), "{banner}");
            assert!(c.deliver("Subject: first\r\n\r\nhello\r\n").await.starts_with("250"));
            accepted += 1;
            assert!(c.cmd("QUIT").await.starts_with("221"));
            drop(c);
            let settle = |limit: usize| async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while open_fds(pid) > limit && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                open_fds(pid)
            };
            let fds_before = settle(usize::MAX).await;

            // 1,000 connections at once: each gets the banner or a clear 421, and is held.
            // At most 100 handshakes in flight at a time: a single burst of 1,000 SYNs overflows
            // the kernel's accept queue on loopback, and a client whose final ACK the kernel
            // dropped believes it is connected while the server never sees it (it only reads,
            // so it would wait forever). Every connection is still held open at once.
            let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(100));
            let mut tasks = Vec::new();
            for _ in 0..PARALLEL {
                let mx = mx.clone();
                let handshakes = handshakes.clone();
                tasks.push(tokio::spawn(async move {
                    let handshake = handshakes.acquire_owned().await.expect("semaphore");
                    let mut tcp = TcpStream::connect(&mx).await.expect("connect");
                    let mut first = vec![0u8; 512];
                    let n = tokio::time::timeout(Duration::from_secs(120), tcp.read(&mut first))
                        .await
                        .expect("an answer")
                        .expect("read");
                    drop(handshake);
                    (String::from_utf8_lossy(&first[..n]).into_owned(), tcp)
                }));
            }
            let mut held = Vec::new();
            let (mut banners, mut refused) = (0, 0);
            for t in tasks {
                let (first, tcp) = t.await.unwrap();
                if first.starts_with("220 ") {
                    banners += 1;
                } else if first.starts_with("421 4.3.2 ") {
                    refused += 1;
                } else {
                    panic!("neither a banner nor 421: {first:?}");
                }
                held.push(tcp);
            }
            eprintln!("{PARALLEL} parallel connections: {banners} banners, {refused} refused with 421 4.3.2");
            assert!(banners > 0, "some are served");
            assert_eq!(banners + refused, PARALLEL);
            drop(held);
            let fds_after = settle(fds_before).await;
            assert!(fds_after <= fds_before, "descriptors: {fds_before} at rest, {fds_after} after 1,000 connections");

            // Clients that vanish in the middle of DATA, in several ways.
            for i in 0..20 {
                let (mut c, _) = Smtp::connect(&mx).await;
                c.start_data().await;
                match i % 4 {
                    0 => {}
                    1 => c.send(b"Subject: half\r\n\r\nthe first half of a mess").await,
                    2 => c.send(format!("Subject: big\r\n\r\n{}", "line\r\n".repeat(20_000)).as_bytes()).await,
                    _ => c.send(b"Subject: almost\r\n\r\nall of it\r\n").await, // but no "."
                }
                drop(c);
            }
            // Broken commands, bare line feeds and an over-long line: clear codes, session goes on.
            let (mut c, _) = Smtp::connect(&mx).await;
            assert!(c.cmd("EHLO client.example").await.starts_with("250"));
            for (command, code) in
                [("FROB the server".to_owned(), "500"), ("MAIL FROM:<<<>>".into(), "5"), ("X".repeat(100_000), "500")]
            {
                let reply = c.cmd(&command).await;
                assert!(reply.starts_with(code), "{:.40}: {reply}", command);
            }
            // A bare LF ends a command line (leniently): two commands, two replies.
            c.send(b"NOOP\nNOOP\r\n").await;
            let replies = [c.reply().await, c.reply().await];
            assert!(replies.iter().all(|r| r.starts_with("250")), "{replies:?}");
            // A message with bare line feeds ending in "\n.\n" (smuggling) is refused whole.
            c.start_data().await;
            c.send(b"Subject: smuggle\r\n\r\none\n.\nMAIL FROM:<evil@x.example>\r\n").await;
            assert!(c.cmd(".").await.starts_with("554"), "bare LF in DATA");
            // Malformed MIME is stored as it came (the gateway does not rewrite mail): 250.
            let broken_mime = "Subject: broken\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; \
                               boundary=\"never-closed\"\r\n\r\n--never-closed\r\nContent-Type: text/plain\r\n\
                               Content-Transfer-Encoding: base64\r\n\r\n!!not base64!!\r\n";
            let reply = c.deliver(broken_mime).await;
            assert!(reply.starts_with("250"), "{reply}");
            accepted += 1;
            // A message claiming to be a sealed envelope that is none: refused, nothing kept.
            let reply = c.deliver("X-QKD-Secure: True\r\nX-QKD-Key-ID: nonsense\r\nSubject: fake\r\n\r\nnot sealed\r\n").await;
            assert!(reply.starts_with("5") || reply.starts_with("4"), "a forged envelope is refused: {reply}");
            assert!(c.cmd("QUIT").await.starts_with("221"));
            drop(c);

            // The gateway is still up and serves a normal client.
            let (mut c, banner) = Smtp::connect(&mx).await;
            assert!(banner.starts_with("220 "), "{banner}");
            assert!(c.deliver("Subject: last\r\n\r\nstill here\r\n").await.starts_with("250"));
            accepted += 1;
            assert!(c.cmd("QUIT").await.starts_with("221"));
            drop(c);
            let fds_end = settle(fds_before).await;
            assert!(fds_end <= fds_before, "descriptors: {fds_before} at rest, {fds_end} at the end");

            // Nothing half-stored: one blob per accepted message, nothing in tmp/, no queue.
            let (stored, partial) = blobs(dir);
            assert_eq!(stored.len(), accepted, "stored blobs: {stored:?}");
            assert!(partial.is_empty(), "partial writes left behind: {partial:?}");
        });
            let listing = qutemailctl(&["queue", "list"], &config_path, None);
            assert!(
                String::from_utf8_lossy(&listing.stdout).contains("the queue is empty"),
                "{}",
                String::from_utf8_lossy(&listing.stdout)
            );
            drop(serve);
        },
    );
}
