//! A POP3 server on 127.0.0.1 over a real store and a vault on a throw-away SoftHSM token,
//! with TLS from a test CA, and helpers to run real clients against it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use qutemail_hsm::HsmKeyWrapper;
use qutemail_hsm::testing::SoftHsmEnv;
use qutemail_pop3::{Pop3Config, Pop3Server};
use qutemail_store::testing::TestStore;
use qutemail_store::{Backend, LoginThrottle, LoginThrottleSettings, MailboxId, NewAccount, Selection};
use qutemail_vault::{AppendRequest, MailVault, Protection, SiteDirectory, SiteKeys, VaultSettings};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub const TOKEN: &str = "gateway";
pub const USER: &str = "alice@a.example";
pub const PASSWORD: &str = "correct horse battery";

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

/// The messages every test starts with: plain text, one with lines starting with "." (also a
/// line that is only "."), and a larger one.
pub fn sample_messages() -> Vec<Vec<u8>> {
    vec![
        b"From: bob@a.example\r\nTo: alice@a.example\r\nSubject: first\r\n\r\nHello Alice.\r\nSecond line.\r\n"
            .to_vec(),
        b"From: carol@a.example\r\nTo: alice@a.example\r\nSubject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
            .to_vec(),
        {
            let mut m = b"From: dave@a.example\r\nTo: alice@a.example\r\nSubject: big\r\n\r\n".to_vec();
            for i in 0..2000 {
                m.extend_from_slice(format!("line {i:05} of a longer message body\r\n").as_bytes());
            }
            m
        },
    ]
}

pub struct Site {
    pub store: TestStore,
    pub vault: MailVault,
    pub server: Pop3Server,
    pub inbox: MailboxId,
    pub plain_port: u16,
    pub tls_port: u16,
    pub dir: PathBuf,
    pub ca_file: PathBuf,
    pub ca_pem: String,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub fn tls_config(ca: &etsi014::pki::Ca) -> Arc<rustls::ServerConfig> {
    let issued = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    Arc::new(config)
}

/// Failed logins in the tests: short delays, an address refused after four failures.
pub fn test_throttle() -> LoginThrottleSettings {
    LoginThrottleSettings {
        free_failures: 2,
        first_delay: Duration::from_millis(200),
        max_delay: Duration::from_millis(500),
        refuse_address_after: 4,
        forget_after: Duration::from_secs(600),
    }
}

impl Site {
    /// A site with `alice` holding [`sample_messages`] in her INBOX.
    pub async fn start(env: &SoftHsmEnv, backend: Backend) -> Site {
        Site::start_with(env, backend, |_| {}).await
    }

    pub async fn start_with(env: &SoftHsmEnv, backend: Backend, tune: impl FnOnce(&mut Pop3Config)) -> Site {
        let hsm = HsmKeyWrapper::open_async(env.config(TOKEN, "gateway-kek")).await.unwrap();
        let keys =
            SiteKeys::load_or_create(&env.dir.join("site-keys.json"), "a.example", &hsm).await.unwrap();
        let vault = MailVault::new(VaultSettings::new("A-mail"), None, hsm, keys, SiteDirectory::default());
        let store = TestStore::new(backend).await;
        let account = store
            .store
            .create_account(NewAccount {
                address: USER,
                display_name: "Alice",
                password: PASSWORD,
                quota_bytes: None,
            })
            .await
            .unwrap();
        let inbox = store.store.mailbox(account.id, "INBOX").await.unwrap().id;

        let ca = etsi014::pki::Ca::new("QuteMail POP3 test CA").unwrap();
        let dir = env.dir.join("pop3");
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.ca_pem()).unwrap();
        let mut config = Pop3Config::new(tls_config(&ca));
        config.login_throttle = std::sync::Arc::new(LoginThrottle::new(test_throttle()));
        tune(&mut config);

        let server = Pop3Server::new(config, store.store.clone(), vault.clone());
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let implicit = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (plain_port, tls_port) =
            (plain.local_addr().unwrap().port(), implicit.local_addr().unwrap().port());
        let (a, b) = (server.clone(), server.clone());
        let tasks = vec![
            tokio::spawn(async move { a.serve_plain(plain).await }),
            tokio::spawn(async move { b.serve_tls(implicit).await }),
        ];
        let ca_pem = ca.ca_pem();
        let site = Site { store, vault, server, inbox, plain_port, tls_port, dir, ca_file, ca_pem, tasks };
        for m in sample_messages() {
            site.deliver(m).await;
        }
        site
    }

    pub async fn deliver(&self, message: Vec<u8>) {
        self.vault
            .append_plain(
                &self.store.store,
                self.inbox,
                Protection::Normal,
                &AppendRequest::default(),
                zeroize::Zeroizing::new(message),
            )
            .await
            .unwrap();
    }

    /// The messages as the vault presents them, in UID order (what a client must receive).
    pub async fn presented(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for meta in self.store.store.fetch(self.inbox, &Selection::All).await.unwrap() {
            let shown = self.vault.present(&self.store.store, &meta).await.unwrap();
            assert!(shown.verified);
            out.push(shown.message.to_vec());
        }
        out
    }

    pub async fn count(&self) -> usize {
        self.store.store.fetch(self.inbox, &Selection::All).await.unwrap().len()
    }

    pub async fn unique_ids(&self) -> Vec<String> {
        self.store
            .store
            .fetch(self.inbox, &Selection::All)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.unique_id)
            .collect()
    }

    /// Writes msg-N.eml with the presented bytes for the client scripts to compare with.
    pub async fn write_expected(&self) -> PathBuf {
        let dir = self.dir.join("expected");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, m) in self.presented().await.iter().enumerate() {
            std::fs::write(dir.join(format!("msg-{}.eml", i + 1)), m).unwrap();
        }
        dir
    }

    /// Runs the poplib scenario; returns its JSON results. Fails the test on any failed check.
    pub async fn poplib(&self, scenario: &str) -> serde_json::Value {
        let expected = self.write_expected().await;
        let out_file = self.dir.join(format!("{scenario}.out.json"));
        let config = serde_json::json!({
            "host": "localhost",
            "plain_port": self.plain_port,
            "tls_port": self.tls_port,
            "ca_file": self.ca_file,
            "user": USER,
            "password": PASSWORD,
            "expected_dir": expected,
            "out_file": out_file,
            "per_address_limit": test_throttle().refuse_address_after,
        });
        let config_file = self.dir.join(format!("{scenario}.json"));
        std::fs::write(&config_file, config.to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/poplib_check.py");
        let out = run(Command::new(require("python3", "apt-get install -y python3"))
            .arg(script)
            .arg(scenario)
            .arg(&config_file))
        .await;
        assert_success(&format!("poplib {scenario}"), &out);
        serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap()
    }
}

/// The path of a client program, or a failed test saying how to install it (never a skip).
pub fn require(program: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{program}` is needed by this test but is not on PATH; install it: {install}");
}

/// Runs a client process off the runtime's worker threads (the server runs on them).
pub async fn run(command: &mut Command) -> Output {
    let mut command = std::mem::replace(command, Command::new("true"));
    tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap()
}

pub fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A minimal POP3 client for what the real clients cannot send (malformed input, pipelined
/// STLS) or show (the exact status lines).
pub struct RawClient<S> {
    io: tokio::io::BufReader<S>,
}

const CLIENT_WAIT: Duration = Duration::from_secs(20);

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> RawClient<S> {
    pub fn new(stream: S) -> Self {
        RawClient { io: tokio::io::BufReader::new(stream) }
    }

    /// One line with its CRLF removed; `None` at end of stream.
    pub async fn line(&mut self) -> Option<String> {
        use tokio::io::AsyncBufReadExt;
        let mut line = Vec::new();
        let n = tokio::time::timeout(CLIENT_WAIT, self.io.read_until(b'\n', &mut line))
            .await
            .expect("the server answers")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        assert!(line.ends_with(b"\r\n"), "a reply line not ended by CRLF: {line:?}");
        line.truncate(line.len() - 2);
        Some(String::from_utf8(line).unwrap())
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.io.get_mut().write_all(bytes).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    /// Sends a command line and returns the status line.
    pub async fn cmd(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes()).await;
        self.line().await.expect("a reply")
    }

    /// The lines of a multi-line reply after its status line, byte-stuffing undone, each with
    /// its CRLF.
    pub async fn body(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let line = self.line().await.expect("the multi-line reply ends with .");
            if line == "." {
                return out;
            }
            out.extend_from_slice(line.strip_prefix('.').unwrap_or(&line).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn into_inner(self) -> S {
        self.io.into_inner()
    }
}

impl Site {
    pub async fn plain_client(&self) -> RawClient<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.plain_port)).await.unwrap();
        let mut c = RawClient::new(tcp);
        assert!(c.line().await.unwrap().starts_with("+OK"), "greeting");
        c
    }

    /// A client on port 995, logged in as alice.
    pub async fn tls_client(&self) -> RawClient<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        self.tls_client_from("127.0.0.1").await
    }

    /// A client on port 995 from `source` (any 127.0.0.0/8 address), logged in as alice.
    pub async fn tls_client_from(
        &self,
        source: &str,
    ) -> RawClient<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let tcp = socket.connect(([127, 0, 0, 1], self.tls_port).into()).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let mut c = RawClient::new(tls);
        assert!(c.line().await.unwrap().starts_with("+OK"), "greeting");
        assert!(c.cmd(&format!("USER {USER}")).await.starts_with("+OK"));
        let login = c.cmd(&format!("PASS {PASSWORD}")).await;
        assert!(login.starts_with("+OK"), "login: {login}");
        c
    }
}
