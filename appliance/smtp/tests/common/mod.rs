//! Shared by the integration tests: a host that behaves like the gateway's policy (local domain
//! `local.test`, users alice and carol, relaying only for authenticated users) and records
//! deliveries, a test CA, and the three listeners started on 127.0.0.1.

#![allow(dead_code)] // Each test binary uses a different part.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qutemail_smtp::server::{ListenerConfig, ListenerMode, ServerTimeouts, SmtpHandler, SmtpServer};
use qutemail_smtp::{
    Address, AuthOutcome, Credentials, DeliveryReceipt, EnhancedCode, MailEnvelope, MailParams, RcptParams,
    Refusal, ReversePath, SessionInfo,
};
use tokio::net::TcpListener;

pub const LOCAL_DOMAIN: &str = "local.test";
pub const MAX_SIZE: u64 = 12 * 1024 * 1024;

/// One message the host accepted.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub envelope: MailEnvelope,
    pub message: Vec<u8>,
}

impl Delivered {
    /// The message as the client sent it, without the Received: header the server added.
    pub fn body(&self) -> &[u8] {
        let end = self.message.windows(7).position(|w| w == b"+0000\r\n").map_or(0, |p| p + 7);
        &self.message[end..]
    }

    pub fn received_header(&self) -> String {
        String::from_utf8_lossy(&self.message[..self.message.len() - self.body().len()]).into_owned()
    }
}

#[derive(Debug, Default)]
pub struct RecordingHost {
    pub deliveries: Mutex<Vec<Delivered>>,
}

impl RecordingHost {
    pub fn delivered(&self) -> Vec<Delivered> {
        self.deliveries.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

impl SmtpHandler for RecordingHost {
    async fn authenticate(&self, _session: &SessionInfo, credentials: &Credentials) -> AuthOutcome {
        match (credentials.username.as_str(), credentials.password.as_str()) {
            ("alice", "secret") | ("carol", "c-pass") => AuthOutcome::Accepted,
            _ => AuthOutcome::Rejected,
        }
    }

    async fn check_sender(
        &self,
        session: &SessionInfo,
        from: &ReversePath,
        _: &MailParams,
    ) -> Result<(), Refusal> {
        // Submission: the sender must be the authenticated user's own address.
        if let Some(user) = &session.authenticated_as {
            let own = from.address().is_some_and(|a| a.local_part() == user && a.domain() == LOCAL_DOMAIN);
            if !own {
                return Err(Refusal::new(
                    553,
                    EnhancedCode::new(5, 7, 1),
                    format!("Sender not owned by {user}"),
                ));
            }
        }
        Ok(())
    }

    async fn check_recipient(
        &self,
        session: &SessionInfo,
        to: &Address,
        _: &RcptParams,
    ) -> Result<(), Refusal> {
        if to.domain() != LOCAL_DOMAIN {
            if session.authenticated_as.is_some() {
                return Ok(());
            }
            return Err(Refusal::new(550, EnhancedCode::new(5, 7, 1), "Relaying denied"));
        }
        match to.local_part() {
            "busy" => Err(Refusal::new(450, EnhancedCode::new(4, 2, 1), "Mailbox busy, try later")),
            "nobody" => Err(Refusal::new(550, EnhancedCode::new(5, 1, 1), "No such user here")),
            _ => Ok(()),
        }
    }

    async fn deliver(&self, envelope: MailEnvelope, message: Vec<u8>) -> Result<DeliveryReceipt, Refusal> {
        let mut deliveries = self
            .deliveries
            .lock()
            .map_err(|_| Refusal::new(451, EnhancedCode::new(4, 3, 0), "store poisoned"))?;
        deliveries.push(Delivered { envelope, message });
        Ok(DeliveryReceipt { id: format!("Q{}", deliveries.len()) })
    }
}

/// A test CA, the server certificate for localhost/127.0.0.1, and the CA PEM on disk.
pub struct Pki {
    pub ca: etsi014::pki::Ca,
    pub server_tls: Arc<rustls::ServerConfig>,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub dir: tempfile::TempDir,
    pub ca_file: PathBuf,
}

pub fn pki() -> Pki {
    let ca = etsi014::pki::Ca::new("QuteMail SMTP test CA").expect("test CA");
    let server = ca.server(&["localhost", "127.0.0.1"]).expect("server certificate");
    let server_tls = qutemail_smtp::tls::server_config(server.cert_pem.as_bytes(), server.key_pem.as_bytes())
        .expect("server TLS");
    let client_tls = qutemail_smtp::tls::client_config(ca.ca_pem().as_bytes()).expect("client TLS");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.ca_pem()).expect("write CA");
    Pki { ca, server_tls, client_tls, dir, ca_file }
}

/// Starts a listener of `mode` on 127.0.0.1 with `host`; returns its address.
pub async fn start(config: ListenerConfig, host: Arc<RecordingHost>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(SmtpServer::new(config, host).run(listener, std::future::pending()));
    addr
}

/// MX, submission (STARTTLS) and implicit-TLS listeners sharing one host.
pub struct Site {
    pub pki: Pki,
    pub host: Arc<RecordingHost>,
    pub mx: SocketAddr,
    pub submission: SocketAddr,
    pub implicit_tls: SocketAddr,
}

pub async fn site() -> Site {
    let pki = pki();
    let host = Arc::new(RecordingHost::default());
    let tls = Some(pki.server_tls.clone());
    let config = |mode| {
        ListenerConfig::new(mode, "mx.local.test", tls.clone())
            .and_then(|c| c.max_message_size(MAX_SIZE))
            .expect("listener config")
            .timeouts(ServerTimeouts { command: Duration::from_secs(30), ..ServerTimeouts::default() })
    };
    let mx = start(config(ListenerMode::Mx), host.clone()).await;
    let submission = start(config(ListenerMode::Submission), host.clone()).await;
    let implicit_tls = start(config(ListenerMode::SubmissionImplicitTls), host.clone()).await;
    Site { pki, host, mx, submission, implicit_tls }
}

/// Runs an external program; a missing program fails the test with the install hint.
pub fn run_tool(program: &str, install_hint: &str, args: &[String]) -> std::process::Output {
    match Command::new(program).args(args).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is required for this test and was not found on PATH: {install_hint}")
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// Runs `tool` on a blocking thread so the in-process server keeps serving.
pub async fn run_tool_async(
    program: &'static str,
    install_hint: &'static str,
    args: Vec<String>,
) -> std::process::Output {
    tokio::task::spawn_blocking(move || run_tool(program, install_hint, &args)).await.expect("tool thread")
}
