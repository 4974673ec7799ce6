//! `qutemailctl` against the two-site demo (qkd-sim, two kmds, SoftHSM, two gateways): `links`
//! reads each site's real kmd metrics listener and shows the QKD link up with keys in its pool;
//! after Alice at A mails Bob at B, `cert show` at B verifies the stored message's "Quantum
//! Secured" certificate against A's key from B's peer directory, and reports it NOT VERIFIABLE
//! once the certificate in the stored bytes is altered.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use qutemail_e2e::{DemoGateway, LiveDemo, files_containing, python, wait_for, workspace_root};

const CERT_MARKER: &str = "Content-Description: Quantum Secured certificate\r\n\r\n";

fn ctl(demo: &LiveDemo, site: &str, args: &[&str]) -> Output {
    DemoGateway::of(demo, site).qutemailctl_output(args)
}

fn ctl_ok(demo: &LiveDemo, site: &str, args: &[&str]) -> String {
    DemoGateway::of(demo, site).qutemailctl(args)
}

fn ctl_json(demo: &LiveDemo, site: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ctl_ok(demo, site, args)).unwrap()
}

fn inbox(demo: &LiveDemo, site: &str, user: &str) -> serde_json::Value {
    let shown = ctl_json(demo, site, &["users", "show", user, "--json"]);
    shown["mailboxes"].as_array().unwrap().iter().find(|m| m["name"] == "INBOX").cloned().unwrap()
}

#[test]
fn links_and_certificates_of_mail_between_two_sites() {
    let demo = LiveDemo::start();
    let (a, b) = (demo.site("A").clone(), demo.site("B").clone());

    // Links: each site's kmd (the URL from [web] kmd_metrics_url, or given) reports the link.
    wait_for("keys in A's pool", Duration::from_secs(150), || {
        let links = ctl_json(&demo, "A", &["links", "--json"]);
        links["links"][0]["keys_available"].as_f64().is_some_and(|n| n > 0.0)
    });
    let links = ctl_json(&demo, "A", &["links", "--json"]);
    assert_eq!(links["kmd_metrics_url"], a["metrics_url"]);
    assert_eq!(links["hsm_healthy"], true);
    let link = &links["links"][0];
    assert_eq!(
        (link["link_id"].as_str(), link["state"].as_str()),
        (Some("link-a-b"), Some("up")),
        "{links:#}"
    );
    assert!(link["qber"].as_f64().is_some_and(|q| q > 0.0 && q < 0.11), "{links:#}");
    assert!(link["key_rate_bps"].as_f64().is_some_and(|r| r > 0.0), "{links:#}");
    assert!(link["blocks_received"].as_f64().is_some_and(|n| n > 0.0), "{links:#}");
    let text = ctl_ok(&demo, "B", &["links", "--kmd-metrics", b["metrics_url"].as_str().unwrap()]);
    assert!(text.contains("link-a-b: link up, peer kmd "), "{text}");
    assert!(text.contains("keys available") && text.contains("HSM: healthy"), "{text}");

    // Alice at A mails Bob at B; B stores it sealed, as it came.
    let bob = b["users"][0]["address"].as_str().unwrap().to_owned();
    let before = inbox(&demo, "B", &bob)["messages"].as_u64().unwrap();
    let work = tempfile::tempdir().unwrap();
    let body = work.path().join("body.txt");
    std::fs::write(&body, "Dear Bob,\nthe certificate of this message is checked by the operator.\n")
        .unwrap();
    let user = &a["users"][0];
    let out = Command::new(python())
        .arg(workspace_root().join("tests/clients/submit.py"))
        .arg(a["gateway"]["smtp_submission"].as_str().unwrap())
        .arg(a["gateway"]["tls_ca"].as_str().unwrap())
        .arg(user["address"].as_str().unwrap())
        .arg(user["password"].as_str().unwrap())
        .arg(user["address"].as_str().unwrap())
        .arg(&bob)
        .arg("operator's certificate check")
        .arg(&body)
        .output()
        .expect("python3 (apt-get install -y python3)");
    assert!(out.status.success(), "smtplib: {}", String::from_utf8_lossy(&out.stderr));
    wait_for("delivery at B", Duration::from_secs(150), || {
        inbox(&demo, "B", &bob)["messages"].as_u64() == Some(before + 1)
    });
    let uid = (inbox(&demo, "B", &bob)["uid_next"].as_u64().unwrap() - 1).to_string();

    // cert show: verified under A's key from B's [[peer]] directory.
    let report = ctl_json(&demo, "B", &["cert", "show", &bob, "--uid", &uid, "--json"]);
    assert_eq!(report["signature"], "valid", "{report:#}");
    let c = &report["certificate"];
    assert_eq!((c["mode"].as_str(), c["link_id"].as_str()), (Some("hybrid"), Some("link-a-b")), "{report:#}");
    assert_eq!(c["sender_domain"], a["domain"]);
    assert!(c["key_ids"].as_array().is_some_and(|k| !k.is_empty()), "{report:#}");
    assert!(c["qber_ppm"].as_u64().is_some_and(|q| q > 0), "{report:#}");
    let text = ctl_ok(&demo, "B", &["cert", "show", &bob, "--uid", &uid]);
    assert!(text.starts_with(&format!("VERIFIED: {bob} INBOX UID {uid} (hybrid)")), "{text}");
    assert!(text.contains("link          link-a-b") && text.contains("KME-A -> KME-B"), "{text}");

    // Alter one character of the certificate in the stored bytes: no longer verifiable.
    let stored = stored_envelope(&PathBuf::from(b["gateway"]["config"].as_str().unwrap()));
    let mut bytes = std::fs::read(&stored).unwrap();
    let at = find(&bytes, CERT_MARKER.as_bytes()).unwrap() + CERT_MARKER.len() + 20;
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    std::fs::write(&stored, &bytes).unwrap();
    let out = ctl(&demo, "B", &["cert", "show", &bob, "--uid", &uid]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with(&format!("NOT VERIFIABLE: {bob} INBOX UID {uid}")), "{text}");
    let out = ctl(&demo, "B", &["cert", "show", &bob, "--uid", &uid, "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["signature"], "invalid", "{report:#}");
    assert!(report["problem"].as_str().is_some_and(|p| !p.is_empty()), "{report:#}");
}

/// The one stored blob at site B holding a sealed envelope (Bob's only message).
fn stored_envelope(gateway_config: &Path) -> PathBuf {
    let site_dir = gateway_config.parent().unwrap().join("mail").join("B").join("blobs");
    let hits = files_containing(&[&site_dir], &[CERT_MARKER.as_bytes()]);
    assert_eq!(hits.len(), 1, "envelopes stored at B: {hits:?}");
    hits[0].0.clone()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
