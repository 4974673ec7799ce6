//! `qkd-sim run` in KME mode: the simulated link's key blocks, from the physics model, are
//! served by two ETSI GS QKD 014 KMEs; a key taken at A is the key given at B, once.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etsi014::client::Etsi014Client;
use etsi014::pki::Ca;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `qkd-sim run` in KME mode, with its throw-away PKI in `dir`.
struct KmeSim {
    dir: tempfile::TempDir,
    /// The state file's `kme` object: base URLs of KME A and KME B.
    urls: (String, String),
    _sim: Kill,
}

async fn start_kme_sim() -> KmeSim {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("test SAE CA").unwrap();
    std::fs::write(d.join("ca.pem"), ca.ca_pem()).unwrap();
    ca.server(&["localhost", "127.0.0.1"]).unwrap().write(d, "kme-a").unwrap();
    ca.server(&["localhost", "127.0.0.1"]).unwrap().write(d, "kme-b").unwrap();
    ca.client("A-app").unwrap().write(d, "sae-a").unwrap();
    ca.client("B-app").unwrap().write(d, "sae-b").unwrap();
    let p = |n: &str| d.join(n).display().to_string();
    let config = format!(
        r#"
link_id = "kme-link"
[physics]
distance_km = 10
pulse_rate_hz = 1e9
[kme]
listen_a = "127.0.0.1:0"
listen_b = "127.0.0.1:0"
kme_id_a = "KME-A"
kme_id_b = "KME-B"
sae_id_a = "A-app"
sae_id_b = "B-app"
server_cert_a = "{}"
server_key_a = "{}"
server_cert_b = "{}"
server_key_b = "{}"
client_ca = "{}"
"#,
        p("kme-a.pem"),
        p("kme-a.key"),
        p("kme-b.pem"),
        p("kme-b.key"),
        p("ca.pem")
    );
    std::fs::write(d.join("sim.toml"), config).unwrap();
    let state = d.join("state.json");
    let sim = Kill(
        Command::new(env!("CARGO_BIN_EXE_qkd-sim"))
            .args(["run", "--print-every", "0", "--config"])
            .arg(d.join("sim.toml"))
            .arg("--state-file")
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let info: serde_json::Value = loop {
        if let Ok(bytes) = std::fs::read(&state)
            && let Ok(v) = serde_json::from_slice(&bytes)
        {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "qkd-sim wrote no state file");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let url = |k: &str| info["kme"][k].as_str().unwrap().to_string();
    KmeSim { urls: (url("a"), url("b")), dir, _sim: sim }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_link_as_two_kmes() {
    let sim = start_kme_sim().await;
    let tls = |stem: &str| {
        let d = sim.dir.path();
        etsi014::tls::TlsPem::from_files(
            &d.join("ca.pem"),
            &d.join(format!("{stem}.pem")),
            &d.join(format!("{stem}.key")),
        )
        .unwrap()
    };
    let a = Etsi014Client::new(&sim.urls.0, tls("sae-a")).unwrap();
    let b = Etsi014Client::new(&sim.urls.1, tls("sae-b")).unwrap();
    let start = Instant::now();
    let status = a.status("B-app").await.unwrap();
    assert_eq!(status.source_kme_id, "KME-A");
    // Keys appear as the simulated link distils them.
    let keys = loop {
        match a.enc_keys("B-app", 4, Some(256)).await {
            Ok(k) => break k,
            Err(e) if e.status() == Some(503) && start.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("enc_keys: {e}"),
        }
    };
    assert_eq!(keys.keys.len(), 4);
    let ids: Vec<String> = keys.keys.iter().map(|k| k.key_id.clone()).collect();
    let got = b.dec_keys("A-app", &ids).await.unwrap();
    for (x, y) in keys.keys.iter().zip(&got.keys) {
        assert_eq!(x.key_id, y.key_id);
        assert_eq!(x.key, y.key, "key {} differs between the sites", x.key_id);
        assert_eq!(x.key.len(), 32);
    }
    let again = b.dec_keys("A-app", &ids).await.unwrap_err();
    assert_eq!(again.status(), Some(400), "{again}");
}

/// The third-party Python client (`etsi-qkd-014-client`, written by others from the spec)
/// against the simulator's KMEs: status, a key at A, the same key at B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_python_client_works_unmodified() {
    let python = std::env::var("QUTEMAIL_PYTHON").expect(
        "QUTEMAIL_PYTHON is not set: run the tests with `cargo xtask test`, which makes the venv with the Python test clients",
    );
    let sim = start_kme_sim().await;
    let d = sim.dir.path();
    // Give the link a moment to distil keys.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let host = |u: &str| u.trim_start_matches("https://").to_string();
    let script = r#"
import json, sys
from etsi_qkd_014_client import QKD014Client
host_a, host_b, d = sys.argv[1], sys.argv[2], sys.argv[3]
a = QKD014Client(host_a, f"{d}/sae-a.pem", f"{d}/sae-a.key", f"{d}/ca.pem")
b = QKD014Client(host_b, f"{d}/sae-b.pem", f"{d}/sae-b.key", f"{d}/ca.pem")
code, status = a.get_status("B-app")
code_enc, keys = a.get_key("B-app", number=2, size=256)
ids = [k.key_id for k in keys.keys]
code_dec, same = b.get_key_with_key_IDs("A-app", ids)
print(json.dumps({
    "status_code": code, "source": status.source_kme_id, "target": status.target_kme_id,
    "enc_code": code_enc, "enc": [[k.key_id, k.key] for k in keys.keys],
    "dec_code": code_dec, "dec": [[k.key_id, k.key] for k in same.keys],
}))
"#;
    let out = Command::new(&python)
        .args(["-c", script, &host(&sim.urls.0), &host(&sim.urls.1)])
        .arg(d)
        .output()
        .expect("running the Python client");
    assert!(out.status.success(), "python client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status_code"], 200, "{r}");
    assert_eq!(r["source"], "KME-A");
    assert_eq!(r["target"], "KME-B");
    assert_eq!(r["enc_code"], 200, "{r}");
    assert_eq!(r["dec_code"], 200, "{r}");
    assert_eq!(r["enc"].as_array().unwrap().len(), 2);
    assert_eq!(r["enc"], r["dec"], "the sites gave different keys");
}
