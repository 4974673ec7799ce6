//! The server piece and the client together over real mutual TLS on loopback: SAE identity from
//! certificates, 401s in the spec's format, handshakes refused, graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, State};
use axum::routing::get;
use etsi014::client::{ClientOptions, Etsi014Client, HttpVersionPolicy};
use etsi014::pki::{Ca, Issued};
use etsi014::server::{
    self, ApiError, CallerSae, JsonResponse, PeerAddr, PeerCertificate, SaeIdPath, SaeIdentityMap,
    ServeOptions, ServerHandle,
};
use etsi014::types::Status;

#[derive(Clone)]
struct AppState {
    identities: SaeIdentityMap,
    delay: Duration,
}

impl FromRef<AppState> for SaeIdentityMap {
    fn from_ref(state: &AppState) -> Self {
        state.identities.clone()
    }
}

/// Echoes who called: `master_SAE_ID` is the caller's SAE ID, `source_KME_ID` its certificate's
/// subject CN as the server saw it.
async fn status(
    State(state): State<AppState>,
    CallerSae(caller): CallerSae,
    SaeIdPath(slave): SaeIdPath,
    axum::Extension(cert): axum::Extension<PeerCertificate>,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
) -> Result<JsonResponse<Status>, ApiError> {
    tokio::time::sleep(state.delay).await;
    let mut extension = etsi014::types::Extension::new();
    extension.insert("peer_port".into(), peer.port().into());
    Ok(JsonResponse(Status {
        source_kme_id: cert.subject_common_name().unwrap_or_default(),
        target_kme_id: cert.fingerprint_hex(),
        master_sae_id: caller,
        slave_sae_id: slave,
        key_size: 256,
        stored_key_count: 0,
        max_key_count: 0,
        max_key_per_request: 1,
        max_key_size: 256,
        min_key_size: 256,
        max_sae_id_count: 0,
        status_extension: Some(extension),
    }))
}

struct Setup {
    ca: Ca,
    handle: ServerHandle,
}

async fn start(identities: SaeIdentityMap, delay: Duration) -> Setup {
    let ca = Ca::new("test CA").expect("CA");
    let kme = ca.server(&["localhost", "127.0.0.1"]).expect("server cert");
    let tls = server::server_config(&kme.tls(&ca.ca_pem())).expect("server config");
    let router = Router::new()
        .route("/api/v1/keys/{sae}/status", get(status))
        .fallback(|| async { ApiError::not_found() })
        .with_state(AppState { identities, delay });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let handle = server::spawn(listener, tls, router, ServeOptions::default()).expect("spawn");
    Setup { ca, handle }
}

impl Setup {
    fn client(&self, cert: &Issued, http: HttpVersionPolicy) -> Etsi014Client {
        let url = format!("https://localhost:{}", self.handle.local_addr().port());
        let options = ClientOptions { http, ..ClientOptions::default() };
        Etsi014Client::with_options(&url, cert.tls(&self.ca.ca_pem()), options).expect("client")
    }
}

fn fingerprint(cert: &Issued) -> String {
    let der = etsi014::tls::parse_certs(cert.cert_pem.as_bytes(), "cert").expect("PEM").remove(0);
    ring::digest::digest(&ring::digest::SHA256, der.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}:"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subject_cn_is_the_sae_id() {
    let setup = start(SaeIdentityMap::subject_cn(), Duration::ZERO).await;
    let alice = setup.ca.client("A-mail").expect("cert");
    for http in [HttpVersionPolicy::Http1Only, HttpVersionPolicy::Http2Only] {
        let status = setup.client(&alice, http).status("B mail/x").await.expect("status");
        assert_eq!(status.master_sae_id, "A-mail");
        assert_eq!(status.source_kme_id, "A-mail");
        assert_eq!(status.slave_sae_id, "B mail/x", "path segments are encoded and decoded");
        assert_eq!(status.target_kme_id.len(), 64);
    }
}

fn peer_port(status: &Status) -> u64 {
    status
        .status_extension
        .as_ref()
        .and_then(|e| e.get("peer_port"))
        .and_then(|p| p.as_u64())
        .expect("peer_port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_kept_alive_and_reused() {
    let setup = start(SaeIdentityMap::subject_cn(), Duration::ZERO).await;
    let alice = setup.ca.client("A-mail").expect("cert");
    for http in [HttpVersionPolicy::Http1Only, HttpVersionPolicy::Http2Only, HttpVersionPolicy::Auto] {
        let client = setup.client(&alice, http);
        let first = peer_port(&client.status("B").await.expect("first"));
        let mut reused = 0;
        for _ in 0..4 {
            // An HTTP/1.1 connection returns to the pool just after its answer is read; a request
            // sent in that instant opens another connection, so leave it a moment.
            tokio::time::sleep(Duration::from_millis(20)).await;
            // Clones share the pool.
            if peer_port(&client.clone().status("B").await.expect("again")) == first {
                reused += 1;
            }
        }
        assert!(reused >= 3, "{http:?}: the first connection served only {reused} of 4 later requests");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_fingerprints_override_and_restrict() {
    // The pinned certificate must exist before the map is built.
    let ca = Ca::new("test CA").expect("CA");
    let kme = ca.server(&["localhost"]).expect("server cert");
    let pinned = ca.client("some-device-serial-123").expect("cert");
    let other = ca.client("B-mail").expect("cert");
    let identities =
        SaeIdentityMap::pinned_only().pin(fingerprint(&pinned).trim_end_matches(':'), "A-kmd").expect("pin");

    let router = Router::new()
        .route("/api/v1/keys/{sae}/status", get(status))
        .with_state(AppState { identities, delay: Duration::ZERO });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls = server::server_config(&kme.tls(&ca.ca_pem())).expect("config");
    let handle = server::spawn(listener, tls, router, ServeOptions::default()).expect("spawn");
    let setup = Setup { ca, handle };

    let status = setup.client(&pinned, HttpVersionPolicy::Auto).status("B").await.expect("pinned");
    assert_eq!(status.master_sae_id, "A-kmd");
    assert_eq!(status.source_kme_id, "some-device-serial-123");
    // Only pins count: a valid certificate from the same CA is not enough.
    let err = setup.client(&other, HttpVersionPolicy::Auto).status("A").await.expect_err("not pinned");
    assert_eq!(err.status(), Some(401));
    assert_eq!(err.message(), Some("unauthorized"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_certificate_never_reach_the_router() {
    let setup = start(SaeIdentityMap::subject_cn(), Duration::ZERO).await;
    let rogue = Ca::new("rogue").expect("CA").client("A-mail").expect("cert");
    let err = setup.client(&rogue, HttpVersionPolicy::Auto).status("B").await.expect_err("refused");
    assert!(err.is_transport(), "{err}");
    assert!(err.to_string().contains("UnknownCA"), "{err}");

    // No client certificate at all.
    let roots = etsi014::tls::root_store(setup.ca.ca_pem().as_bytes()).expect("roots");
    let config = rustls::ClientConfig::builder_with_provider(etsi014::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(setup.handle.local_addr()).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let outcome = async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"GET /api/v1/keys/B/status HTTP/1.1\r\nhost: localhost\r\n\r\n").await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let err = outcome.await.expect_err("no certificate, no answer");
    assert!(err.to_string().contains("CertificateRequired"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_requests_finish() {
    let setup = start(SaeIdentityMap::subject_cn(), Duration::from_millis(300)).await;
    let client = setup.client(&setup.ca.client("A-mail").expect("cert"), HttpVersionPolicy::Auto);
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.status("B").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let Setup { handle, .. } = setup;
    handle.shutdown().await.expect("clean shutdown");
    let status = in_flight.await.expect("join").expect("the open request completed");
    assert_eq!(status.master_sae_id, "A-mail");
    let err = client.status("B").await.expect_err("server gone");
    assert!(err.is_transport(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_get_json_errors() {
    let setup = start(SaeIdentityMap::subject_cn(), Duration::ZERO).await;
    let client = setup.client(&setup.ca.client("A-mail").expect("cert"), HttpVersionPolicy::Auto);
    // enc_keys is not routed by this test server: the fallback answers 404 in the spec's format.
    let err = client.enc_keys("B", 1, None).await.expect_err("404");
    assert_eq!(err.status(), Some(404));
    assert_eq!(err.message(), Some("not found"));
}
