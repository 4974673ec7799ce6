//! A site for the web API tests: a real mail store (SQLite or PostgreSQL), a real SoftHSM
//! token, the vault with a peer site, the outbound queue, and the web server over real HTTPS
//! on 127.0.0.1:0, with a small HTTPS client (hyper over rustls).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use qutemail_hsm::HsmKeyWrapper;
use qutemail_hsm::testing::SoftHsmEnv;
use qutemail_queue::{OutboundQueue, QueueSettings, RetryPolicy};
use qutemail_store::testing::TestStore;
use qutemail_store::{Backend, NewAccount};
use qutemail_vault::{
    KmdKeySource, MailVault, PeerSite, ProtectionPolicy, SiteDirectory, SiteKeys, VaultSettings,
};
use qutemail_web::{PeerSae, TokenKey, WebConfig, WebDeps, WebServer};
use serde_json::Value;

pub const TOKEN: &str = "gateway";
pub const DOMAIN: &str = "a.test";
pub const PEER: &str = "b.test";
pub const PASSWORD: &str = "correct horse battery";
pub const UPLOAD_LIMIT: u64 = 256 * 1024;
pub const OTP_LIMIT: usize = 4096;

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A running site.
pub struct Site {
    pub t: TestStore,
    pub addr: SocketAddr,
    pub tls: Arc<rustls::ClientConfig>,
    pub token_key: Arc<TokenKey>,
    pub vault: MailVault,
    pub dir: PathBuf,
}

impl Site {
    /// Starts a site on `backend`; alice is admin, bob a user; sign-up open.
    pub async fn start(env: &SoftHsmEnv, backend: Backend) -> Site {
        let t = TestStore::new(backend).await;
        let dir = t.dir.path().join("site");
        std::fs::create_dir_all(&dir).unwrap();
        let hsm = HsmKeyWrapper::open_async(env.config(TOKEN, "gateway-kek")).await.unwrap();
        let keys = SiteKeys::load_or_create(&dir.join("a-keys.json"), DOMAIN, &hsm).await.unwrap();
        let peer_keys = SiteKeys::load_or_create(&dir.join("b-keys.json"), PEER, &hsm).await.unwrap();
        let peer = PeerSite::from_card(&peer_keys.card(), "B-mail", "B-kme").unwrap();
        // A kmd client that is never reached in these tests (the queue runner is not started):
        // the peer counts as QKD-linked, so the QKD modes are available to compose.
        let ca = etsi014::pki::Ca::new("test CA").unwrap();
        let client = ca.client("A-mail").unwrap();
        client.write(&dir, "kmd-client").unwrap();
        std::fs::write(dir.join("ca.pem"), ca.ca_pem()).unwrap();
        let kmd_tls = etsi014::client::ClientTlsConfig::from_files(
            &dir.join("ca.pem"),
            &dir.join("kmd-client.pem"),
            &dir.join("kmd-client.key"),
        )
        .unwrap();
        let kmd = KmdKeySource::new("https://127.0.0.1:9/api/v1/keys", kmd_tls.clone()).unwrap();
        let policy = ProtectionPolicy { otp_max_bytes: OTP_LIMIT, ..ProtectionPolicy::default() };
        let mut settings = VaultSettings::new("A-mail");
        settings.policy = policy.clone();
        let vault =
            MailVault::new(settings, Some(kmd), hsm.clone(), keys, SiteDirectory::new(vec![peer]).unwrap());
        let queue = OutboundQueue::new(
            t.store.clone(),
            vault.clone(),
            QueueSettings {
                hostname: "mail.a.test".into(),
                domain: DOMAIN.into(),
                peer_routes: Default::default(),
                smarthost: None,
                mx: None,
                dkim: None,
                retry: RetryPolicy::default(),
                batch: 10,
                lease: std::time::Duration::from_secs(60),
                poll: std::time::Duration::from_secs(5),
                key_wait_retry: std::time::Duration::from_secs(5),
            },
        );
        let token_key =
            Arc::new(TokenKey::load_or_create(&dir.join("web-token-key.json"), DOMAIN, &hsm).await.unwrap());
        let etsi = etsi014::client::Etsi014Client::new("https://127.0.0.1:9/api/v1/keys", kmd_tls).unwrap();
        let deps = WebDeps {
            domain: DOMAIN.into(),
            store: t.store.clone(),
            vault: vault.clone(),
            queue,
            policy,
            token_key: token_key.clone(),
            kmd: Some(Arc::new(etsi)),
            peers: vec![PeerSae { domain: PEER.into(), sae_id: "B-mail".into() }],
            on_delivery: None,
            // The production counting with short waits, so the tests reach each stage quickly.
            login_throttle: Arc::new(qutemail_store::LoginThrottle::new(
                qutemail_store::LoginThrottleSettings {
                    free_failures: 3,
                    first_delay: std::time::Duration::from_millis(100),
                    max_delay: std::time::Duration::from_secs(2),
                    refuse_address_after: 8,
                    forget_after: std::time::Duration::from_secs(900),
                },
            )),
        };
        for (user, name) in [("alice", "Alice"), ("bob", "Bob")] {
            t.store
                .create_account(NewAccount {
                    address: &format!("{user}@{DOMAIN}"),
                    display_name: name,
                    password: PASSWORD,
                    quota_bytes: None,
                })
                .await
                .unwrap();
        }
        let server_cert = ca.server(&["127.0.0.1", "localhost"]).unwrap();
        let server_tls = qutemail_smtp::tls::server_config(
            server_cert.cert_pem.as_bytes(),
            server_cert.key_pem.as_bytes(),
        )
        .unwrap();
        let mut config = WebConfig::new("127.0.0.1:0".parse().unwrap());
        config.signup = true;
        config.max_upload_bytes = UPLOAD_LIMIT;
        config.admins = vec![format!("alice@{DOMAIN}")];
        let server = WebServer::bind(config, deps, server_tls).await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(server.run(std::future::pending()));
        let tls = qutemail_smtp::tls::client_config(ca.ca_pem().as_bytes()).unwrap();
        Site { t, addr, tls, token_key, vault, dir }
    }

    /// One request over a fresh HTTPS connection.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let stream = connector.connect(name, tcp).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header("host", "127.0.0.1");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = sender.send_request(req.body(Full::new(body.into())).unwrap()).await.unwrap();
        let (parts, body) = res.into_parts();
        (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
    }

    /// A JSON request; returns status and JSON (Null for an empty body).
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, _, bytes) = self.send(method, path, &headers, body).await;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        (status, value)
    }

    /// Logs in and returns (access, refresh).
    pub async fn login(&self, user: &str, password: &str) -> (String, String) {
        let (status, v) = self
            .json(
                Method::POST,
                "/api/auth/login/",
                None,
                Some(serde_json::json!({"address": user, "password": password})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "login of {user}: {v}");
        (v["access_token"].as_str().unwrap().to_owned(), v["refresh_token"].as_str().unwrap().to_owned())
    }

    /// Uploads `bytes` as `name`.
    pub async fn upload(&self, token: &str, name: &str, bytes: &[u8]) -> (StatusCode, Value) {
        let boundary = "qutemail-test-boundary";
        let mut body = Vec::new();
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let auth = format!("Bearer {token}");
        let ct = format!("multipart/form-data; boundary={boundary}");
        let (status, _, bytes) = self
            .send(
                Method::POST,
                "/api/mail/attachments/",
                &[("authorization", &auth), ("content-type", &ct)],
                body,
            )
            .await;
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

/// Files under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(p);
            }
        }
    }
    hits
}
