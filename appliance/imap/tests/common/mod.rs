//! Shared by the integration tests: a gateway's IMAP server on 127.0.0.1 (plain with STARTTLS
//! and implicit TLS) over a throw-away store and a vault on a throw-away SoftHSM token, a test
//! CA, two accounts, and runners for the real client programs.

#![allow(dead_code)] // Each test binary uses a different part.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use qutemail_hsm::HsmKeyWrapper;
use qutemail_hsm::testing::SoftHsmEnv;
use qutemail_imap::{ImapConfig, ImapServer};
use qutemail_store::testing::TestStore;
use qutemail_store::{Account, Backend, Flags, LoginThrottle, LoginThrottleSettings, Mailbox, NewAccount};
use qutemail_vault::{AppendRequest, MailVault, Protection, SiteDirectory, SiteKeys, VaultSettings};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

pub const TOKEN: &str = "gateway";
pub const ALICE: &str = "alice@a.example";
pub const ALICE_PASSWORD: &str = "correct horse battery";
pub const BOB: &str = "bob@a.example";
pub const BOB_PASSWORD: &str = "bob's own password";
pub const MAX_MESSAGE: u64 = 1024 * 1024;
/// Failed logins in the tests: short delays, an address refused after six failures.
pub const LOGIN_THROTTLE: LoginThrottleSettings = LoginThrottleSettings {
    free_failures: 3,
    first_delay: Duration::from_millis(500),
    max_delay: Duration::from_secs(1),
    refuse_address_after: 6,
    forget_after: Duration::from_secs(600),
};

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime")
}

/// A running gateway IMAP server.
pub struct Site {
    pub store: TestStore,
    pub vault: MailVault,
    pub server: ImapServer,
    pub plain: SocketAddr,
    pub tls: SocketAddr,
    pub ca_file: PathBuf,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub alice: Account,
    pub bob: Account,
    pub dir: tempfile::TempDir,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Site {
    pub async fn start(env: &SoftHsmEnv, backend: Backend) -> Site {
        Self::start_with(env, backend, |_| {}).await
    }

    pub async fn start_with(env: &SoftHsmEnv, backend: Backend, tune: impl FnOnce(&mut ImapConfig)) -> Site {
        let hsm = HsmKeyWrapper::open_async(env.config(TOKEN, "gateway-kek")).await.expect("HSM");
        let keys =
            SiteKeys::load_or_create(&env.dir.join("keys.json"), "a.example", &hsm).await.expect("keys");
        let vault = MailVault::new(VaultSettings::new("A-mail"), None, hsm, keys, SiteDirectory::default());
        let store = TestStore::new(backend).await;
        let alice = store
            .store
            .create_account(NewAccount {
                address: ALICE,
                display_name: "Alice",
                password: ALICE_PASSWORD,
                quota_bytes: None,
            })
            .await
            .expect("alice");
        let bob = store
            .store
            .create_account(NewAccount {
                address: BOB,
                display_name: "Bob",
                password: BOB_PASSWORD,
                quota_bytes: None,
            })
            .await
            .expect("bob");

        let ca = etsi014::pki::Ca::new("QuteMail IMAP test CA").expect("CA");
        let issued = ca.server(&["localhost", "127.0.0.1"]).expect("server certificate");
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("certificate PEM");
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key PEM");
        let server_tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server TLS");
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.ca_pem().as_bytes()) {
            roots.add(c.expect("CA PEM")).expect("CA");
        }
        let client_tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.ca_pem()).expect("CA file");

        let mut config = ImapConfig::new(Arc::new(server_tls));
        config.max_message_bytes = MAX_MESSAGE;
        config.login_throttle = Arc::new(LoginThrottle::new(LOGIN_THROTTLE));
        tune(&mut config);
        let server = ImapServer::new(config, store.store.clone(), vault.clone());
        let plain_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let plain = plain_listener.local_addr().expect("addr");
        let tls = tls_listener.local_addr().expect("addr");
        let s = server.clone();
        tokio::spawn(async move { s.serve_plain(plain_listener).await });
        let s = server.clone();
        tokio::spawn(async move { s.serve_tls(tls_listener).await });
        Site { store, vault, server, plain, tls, ca_file, client_tls: Arc::new(client_tls), alice, bob, dir }
    }

    pub async fn mailbox(&self, account: &Account, name: &str) -> Mailbox {
        self.store.store.mailbox(account.id, name).await.expect("mailbox")
    }

    /// Delivers `message` into `account`'s `mailbox`, sealed, as the gateway does.
    pub async fn deliver(&self, account: &Account, mailbox: &str, message: &[u8]) -> u32 {
        let mb = self.mailbox(account, mailbox).await;
        let request = AppendRequest { flags: Flags::NONE, ..AppendRequest::default() };
        let appended = self
            .vault
            .append_plain(
                &self.store.store,
                mb.id,
                Protection::Normal,
                &request,
                Zeroizing::new(message.to_vec()),
            )
            .await
            .expect("append");
        self.server.events().mailbox_changed();
        appended.uid
    }

    /// What a client must see for the message with `uid`: the vault's presentation.
    pub async fn presented(&self, account: &Account, mailbox: &str, uid: u32) -> Vec<u8> {
        let mb = self.mailbox(account, mailbox).await;
        let meta = self.store.store.message(mb.id, uid).await.expect("fetch").expect("message exists");
        let p = self.vault.present(&self.store.store, &meta).await.expect("present");
        assert!(p.verified);
        assert_eq!(p.message.len() as u64, meta.size, "RFC822.SIZE is the presented length");
        p.message.to_vec()
    }
}

/// A simple message.
pub fn message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Bob <bob@b.example>\r\nTo: alice@a.example\r\nSubject: {subject}\r\n\
         Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{}@b.example>\r\n\r\n{body}\r\n",
        subject.replace(' ', ".")
    )
    .into_bytes()
}

/// A multipart message: text plus a PDF attachment.
pub fn multipart(subject: &str) -> Vec<u8> {
    format!(
        "From: \"Bob B\" <bob@b.example>\r\nTo: alice@a.example, Carol <carol@a.example>\r\n\
         Subject: {subject}\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <mp@b.example>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nquarterly numbers attached\r\n\
         --b1\r\nContent-Type: application/pdf; name=\"q3.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"q3.pdf\"\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n"
    )
    .into_bytes()
}

/// Runs a tool; a missing tool fails the test with `hint` (tests never skip).
pub fn run_tool(program: &str, hint: &str, args: &[String], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{program} is not installed: {hint}")
        }
        Err(e) => panic!("running {program}: {e}"),
    }
}

/// The Python with the pinned test clients: `QUTEMAIL_PYTHON` (the venv `cargo xtask test`
/// makes), else `python3` from PATH.
pub fn python_program() -> String {
    std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| "python3".into())
}

pub const PYTHON_HINT: &str = "install Python 3 (Debian: apt-get install -y python3) and the pinned clients \
    (pip install -r tests/python-requirements.txt, or set QUTEMAIL_PYTHON to the venv's python; \
    `cargo xtask test` does both)";

/// Runs a Python program with arguments in a blocking thread; returns its JSON output.
pub async fn python(program: &str, args: Vec<String>) -> serde_json::Value {
    let program = program.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        let mut argv = vec!["-c".to_owned(), program];
        argv.extend(args);
        run_tool(&python_program(), PYTHON_HINT, &argv, &[])
    })
    .await
    .expect("python thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("python printed no JSON ({e}): {stdout}"))
}
