//! The ETSI 014 listener of the real `kmd`: mutual TLS, SAE recognition by CN and by pinned
//! fingerprint, 401 for strangers, the key service's answers (status; 503 with no key material)
//! in the specification's format, request metrics; and `kmd enrol-sae` issuing the SAE certificates from a CA on disk.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Daemon, Site, run_kmd};
use etsi014::client::{ClientOptions, Etsi014Client, Etsi014Error};
use etsi014::tls::TlsPem;

/// A CA whose certificate and key are files (what an operator has).
fn file_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    common::write_private(&key_path, &key.serialize_pem());
    (cert_path, key_path)
}

/// Runs `kmd enrol-sae`; returns the fingerprint it printed.
fn enrol(ca: &(PathBuf, PathBuf), sae: &str, out: &Path) -> String {
    let output = run_kmd(&[
        "enrol-sae",
        "--ca-cert",
        ca.0.to_str().unwrap(),
        "--ca-key",
        ca.1.to_str().unwrap(),
        "--sae-id",
        sae,
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "enrol-sae failed: {output:?}");
    stdout.lines().find_map(|l| l.strip_prefix("sha256")).expect("fingerprint printed").trim().to_owned()
}

fn sha256_of_pem(path: &Path) -> String {
    let pem = std::fs::read(path).unwrap();
    let der = etsi014::tls::parse_certs(&pem, "cert").unwrap().remove(0);
    ring::digest::digest(&ring::digest::SHA256, der.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn client(site: &Site, addr: std::net::SocketAddr, cert: &Path, key: &Path) -> Etsi014Client {
    let tls = TlsPem::from_files(&site.ca_cert, cert, key).unwrap();
    let options = ClientOptions { timeout: Duration::from_secs(10), ..ClientOptions::default() };
    Etsi014Client::with_options(&format!("https://localhost:{}", addr.port()), tls, options).unwrap()
}

/// No key material has arrived on the link yet.
fn assert_exhausted_503(result: Result<impl std::fmt::Debug, Etsi014Error>) {
    match result {
        Err(e @ Etsi014Error::ServiceUnavailable { .. }) => {
            assert_eq!(e.message(), Some("not enough key material on KME"), "{e}");
        }
        other => panic!("expected 503 (no key material), got {other:?}"),
    }
}

fn assert_401(result: Result<impl std::fmt::Debug, Etsi014Error>) {
    match result {
        Err(Etsi014Error::Unauthorized { error, .. }) => {
            assert_eq!(error.map(|e| e.message).as_deref(), Some("unauthorized"));
        }
        other => panic!("expected 401, got {other:?}"),
    }
}

#[test]
fn sae_recognition_over_mutual_tls() {
    let site = Site::new();
    let saes = site.path().join("saes");
    std::fs::create_dir(&saes).unwrap();
    let sae_ca = file_ca(site.path(), "sae-ca");
    enrol(&sae_ca, "A-mail", &saes);
    let web_fp = enrol(&sae_ca, "A-web", &saes);
    assert_eq!(web_fp, sha256_of_pem(&saes.join("A-web.pem")), "printed fingerprint = SHA-256 of the DER");
    enrol(&sae_ca, "A-stranger", &saes);
    let mismatch_fp = enrol(&sae_ca, "A-mismatch", &saes);

    let upper_colons: String = web_fp
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let extra = format!(
        r#"
[[sae]]
sae_id = "A-web"
certificate_sha256 = "{upper_colons}"
common_name = "A-web"
links = ["A-B"]

[[sae]]
sae_id = "A-pinned"
certificate_sha256 = "{mismatch_fp}"
common_name = "A-pinned"
links = []

[[link]]
id = "A-B"
peer_kme_id = "KME-B"
peer_url = "https://127.0.0.1:1"
peer_sae_ids = ["B-mail"]
device = {{ serial = {{ path = "{dev}", baud_rate = 921600 }} }}

[peer]
listen = "127.0.0.1:0"
ca_cert = "ca.pem"
server_cert = "kmd.pem"
server_key = "kmd.key"
client_cert = "peer.pem"
client_key = "peer.key"
"#,
        dev = site.path().join("no-such-device").display()
    );
    let text = site.config(&extra).replace("client_ca = \"ca.pem\"", "client_ca = \"sae-ca.pem\"").replace(
        "sae_id = \"A-mail\"\ncommon_name = \"A-mail\"\nlinks = []",
        "sae_id = \"A-mail\"\ncommon_name = \"A-mail\"\nlinks = [\"A-B\"]",
    );
    let config = site.write_config(&text);
    let mut kmd = Daemon::start(&site, &config, None);
    let ready = kmd.wait_ready();
    let addr = ready.etsi014;
    let pem = |name: &str| (saes.join(format!("{name}.pem")), saes.join(format!("{name}.key")));

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        // Recognised by CN.
        let (cert, key) = pem("A-mail");
        let mail = client(&site, addr, &cert, &key);
        assert_exhausted_503(mail.enc_keys("B-mail", 1, None).await);
        assert_exhausted_503(mail.enc_keys_with("B-mail", &etsi014::KeyRequest::default()).await);
        let status = mail.status("B-mail").await.unwrap();
        assert_eq!(status.source_kme_id, "KME-A");
        assert_eq!(status.target_kme_id, "KME-B");
        assert_eq!(status.stored_key_count, 0);
        let unknown = mail.dec_keys("B-mail", &["00000000-0000-4000-8000-000000000000"]).await;
        assert_eq!(unknown.as_ref().err().and_then(|e| e.status()), Some(400), "{unknown:?}");
        // A configured SAE, but not paired with the slave it names.
        assert_401(mail.enc_keys("C-mail", 1, None).await);

        // Recognised by pinned fingerprint (given upper-case with colons) and CN.
        let (cert, key) = pem("A-web");
        assert_exhausted_503(client(&site, addr, &cert, &key).enc_keys("B-mail", 2, Some(256)).await);

        // From the right CA, but configured for no SAE.
        let (cert, key) = pem("A-stranger");
        assert_401(client(&site, addr, &cert, &key).enc_keys("B-mail", 1, None).await);

        // Pinned, but the CN cross-check fails.
        let (cert, key) = pem("A-mismatch");
        assert_401(client(&site, addr, &cert, &key).status("B-mail").await);

        // A certificate with a configured CN from another CA never gets past the handshake.
        let foreign = site.client("A-mail");
        foreign.write(site.path(), "foreign").unwrap();
        let result = client(&site, addr, &site.path().join("foreign.pem"), &site.path().join("foreign.key"))
            .enc_keys("B-mail", 1, None)
            .await;
        assert!(matches!(&result, Err(e) if e.is_transport()), "{result:?}");
    });
    // Closes the pooled connections (an idle runtime would leave them open through kmd's
    // shutdown grace period).
    drop(runtime);

    let (status, content_type, body) = common::http_get(ready.metrics.unwrap(), "/metrics");
    assert_eq!(status, 200);
    assert_eq!(content_type, kmd::metrics::CONTENT_TYPE);
    let count = |endpoint: &str, status: u16| {
        common::sample(
            &body,
            &format!("kmd_etsi014_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("enc_keys", 503), 3.0, "{body}");
    assert_eq!(count("status", 200), 1.0, "{body}");
    assert_eq!(count("dec_keys", 400), 1.0, "{body}");
    assert_eq!(count("enc_keys", 401), 2.0, "{body}");
    assert_eq!(count("status", 401), 1.0, "{body}");
    assert!(
        common::sample(
            &body,
            "kmd_etsi014_request_duration_seconds_count{endpoint=\"enc_keys\",status=\"503\"}"
        ) == Some(3.0),
        "{body}"
    );
    common::promtool_check(&body);
    assert!(kmd.stop().success());
    assert!(kmd.stderr().contains("speaks for no configured [[sae]]"), "{}", kmd.stderr());
}

#[test]
fn enrol_sae_writes_a_verifiable_certificate_and_a_private_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = file_ca(dir.path(), "site-ca");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let fp = enrol(&ca, "A-mail", &out);
    let cert = out.join("A-mail.pem");
    let key = out.join("A-mail.key");
    assert_eq!(fp, sha256_of_pem(&cert));
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);

    // The certificate chains to the CA, carries the SAE ID as CN, and authenticates a client.
    let der = etsi014::tls::parse_certs(&std::fs::read(&cert).unwrap(), "cert").unwrap().remove(0);
    let peer = etsi014::server::PeerCertificate::new(der.clone());
    assert_eq!(peer.subject_common_name().as_deref(), Some("A-mail"));
    let roots = etsi014::tls::root_store(&std::fs::read(&ca.0).unwrap()).unwrap();
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        etsi014::tls::provider(),
    )
    .build()
    .unwrap()
    .verify_client_cert(&der, &[], rustls::pki_types::UnixTime::now())
    .expect("issued by the CA");
    etsi014::tls::parse_key(&std::fs::read(&key).unwrap()).expect("a private key");

    // No silent overwrite; --force replaces.
    let args = |extra: &[&str]| {
        let mut v = vec![
            "enrol-sae",
            "--ca-cert",
            ca.0.to_str().unwrap(),
            "--ca-key",
            ca.1.to_str().unwrap(),
            "--sae-id",
            "A-mail",
            "--out",
            out.to_str().unwrap(),
        ];
        v.extend_from_slice(extra);
        v.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |v: Vec<String>| run_kmd(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let again = run(args(&[]));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists; pass --force"), "{again:?}");
    let forced = run(args(&["--force", "--days", "30"]));
    assert!(forced.status.success(), "{forced:?}");
    assert_ne!(sha256_of_pem(&cert), fp, "a new certificate");

    // A CA key that does not belong to the CA certificate is refused before anything is written.
    let other = file_ca(dir.path(), "other-ca");
    let output = run_kmd(&[
        "enrol-sae",
        "--ca-cert",
        ca.0.to_str().unwrap(),
        "--ca-key",
        other.1.to_str().unwrap(),
        "--sae-id",
        "B-mail",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("does not belong to the CA certificate"),
        "{output:?}"
    );
    assert!(!out.join("B-mail.pem").exists() && !out.join("B-mail.key").exists());

    // An SAE ID that is no file name.
    let output = run_kmd(&[
        "enrol-sae",
        "--ca-cert",
        ca.0.to_str().unwrap(),
        "--ca-key",
        ca.1.to_str().unwrap(),
        "--sae-id",
        "../evil",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid SAE ID"), "{output:?}");
}
