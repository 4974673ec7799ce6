//! End to end: one simulated QKD link (qkd-sim, in this process), two real `kmd` processes
//! (site A "KME-A" on the Alice end, site B "KME-B" on the Bob end), each with its own SoftHSM
//! token and SQLite store, one PKI (`etsi014::pki`) for SAEs and peer channels. A-mail takes
//! keys with `enc_keys` at kmd A, B-mail gets the same bytes with `dec_keys` at kmd B, once.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, Site, fast_link, free_port, sae_client, site_config};
use etsi014::client::Etsi014Error;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn store_files(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("keys.db")))
        .collect()
}

#[test]
fn keys_from_enc_keys_at_a_decrypt_at_b_once() {
    let site_a = Site::new();
    let site_b = Site::new();
    // One PKI: site A's CA issues site B's certificates too (peer channels and SAEs).
    let ca_pem = site_a.ca.ca_pem();
    std::fs::write(&site_b.ca_cert, &ca_pem).unwrap();
    site_a.ca.server(&["localhost", "127.0.0.1"]).unwrap().write(site_b.path(), "kmd").unwrap();
    site_a.ca.client("KME-B").unwrap().write(site_b.path(), "peer").unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let _guard = runtime.enter();
    let sim = qkd_sim::Simulator::start(fast_link(), None).unwrap();

    let (peer_a, peer_b) = (free_port(), free_port());
    let alice = sim.pty_path(qkd_sim::End::Alice).to_string();
    let bob = sim.pty_path(qkd_sim::End::Bob).to_string();
    let config_a = site_a
        .write_config(&site_config(&site_a, "KME-A", "KME-B", "A-mail", "B-mail", &alice, peer_a, peer_b));
    let config_b = site_b
        .write_config(&site_config(&site_b, "KME-B", "KME-A", "B-mail", "A-mail", &bob, peer_b, peer_a));
    let mut kmd_a = Daemon::start(&site_a, &config_a, None);
    let mut kmd_b = Daemon::start(&site_b, &config_b, None);
    let ready_a = kmd_a.wait_ready();
    let ready_b = kmd_b.wait_ready();

    let a_mail = sae_client(&site_a, &ca_pem, ready_a.etsi014, "A-mail");
    let b_mail_at_b = sae_client(&site_a, &ca_pem, ready_b.etsi014, "B-mail");
    let b_mail_at_a = sae_client(&site_a, &ca_pem, ready_a.etsi014, "B-mail");

    let raw_keys: Vec<Vec<u8>> = runtime.block_on(async {
        // Wait for confirmed key material at A (blocks from the device, confirmed with B).
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = a_mail.status("B-mail").await.unwrap();
            assert_eq!(status.source_kme_id, "KME-A");
            assert_eq!(status.target_kme_id, "KME-B");
            if status.stored_key_count >= 4 {
                break;
            }
            assert!(Instant::now() < deadline, "no key material at A: {status:?}\n{}", kmd_a.stderr());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        let container = a_mail.enc_keys("B-mail", 2, None).await.unwrap();
        assert_eq!(container.keys.len(), 2);
        let ids: Vec<String> = container.keys.iter().map(|k| k.key_id.clone()).collect();
        let enc: Vec<Vec<u8>> = container.keys.iter().map(|k| k.key.as_bytes().to_vec()).collect();
        assert!(enc.iter().all(|k| k.len() == 32), "256-bit keys by default");

        let dec = b_mail_at_b.dec_keys("A-mail", &ids).await.unwrap();
        for (id, bytes) in ids.iter().zip(&enc) {
            let key = dec.keys.iter().find(|k| &k.key_id == id).expect("every key ID answered");
            assert_eq!(key.key.as_bytes(), bytes.as_slice(), "byte-identical at both ends");
        }

        // Once only.
        let again = b_mail_at_b.dec_keys("A-mail", &ids).await;
        assert_eq!(again.as_ref().err().and_then(Etsi014Error::status), Some(400), "{again:?}");

        // B-mail is no SAE of site A.
        let foreign = b_mail_at_a.dec_keys("A-mail", &ids).await;
        assert_eq!(foreign.as_ref().err().and_then(Etsi014Error::status), Some(401), "{foreign:?}");
        enc
    });
    drop(runtime);

    // curl with the SAE's certificate and key: status at A.
    let issued = site_a.client("A-mail");
    issued.write(site_a.path(), "curl-sae").unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(&site_a.ca_cert)
        .arg("--cert")
        .arg(site_a.path().join("curl-sae.pem"))
        .arg("--key")
        .arg(site_a.path().join("curl-sae.key"))
        .arg(format!("https://localhost:{}/api/v1/keys/B-mail/status", ready_a.etsi014.port()))
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl: {out:?}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["source_KME_ID"], "KME-A", "{body}");
    assert_eq!(status["target_KME_ID"], "KME-B", "{body}");
    assert_eq!(status["master_SAE_ID"], "A-mail", "{body}");

    // `kmd status` shows an operator the link, its pool, the SAE pair and the traffic (the pool
    // gauges refresh every 5 s).
    let kmd_status = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kmd"))
            .arg("status")
            .arg("--config")
            .arg(&config_a)
            // The test binds the metrics listener to port 0; kmd reported the port it got.
            .arg("--metrics")
            .arg(ready_a.metrics.expect("metrics listener").to_string())
            .output()
            .expect("kmd status");
        assert!(out.status.success(), "kmd status: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = kmd_status();
    while !text.contains("A-mail -> B-mail") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        text = kmd_status();
    }
    assert!(text.contains("HSM: healthy"), "{text}");
    // (The simulator stopped with the test's runtime above, so the device shows disconnected.)
    assert!(text.contains("qkd-link-1: device disconnected, peer up, QBER "), "{text}");
    assert!(text.contains("A-mail -> B-mail: 0 assigned (waiting for the slave), 2 delivered"), "{text}");
    assert!(text.contains("enc_keys: 200 × 1"), "{text}");
    assert!(text.contains(" confirmed"), "{text}");

    // The keys A handed out are nowhere in its store (database, WAL): neither while it runs
    // nor after it stopped.
    let scan = |when: &str| {
        let files = store_files(site_a.path());
        assert!(files.iter().any(|f| f.ends_with("keys.db")), "{files:?}");
        for file in &files {
            let bytes = std::fs::read(file).unwrap();
            for key in &raw_keys {
                assert!(!contains(&bytes, &key[..16]), "raw key bytes in {} ({when})", file.display());
            }
        }
    };
    scan("running");
    assert!(kmd_a.stop().success());
    assert!(kmd_b.stop().success());
    scan("stopped");
    drop(sim);
}
