//! `qutemailctl` against the two-site demo (qkd-sim, two kmds, SoftHSM, two gateways): `links`
//! reads each site's real kmd metrics listener and shows the QKD link up with keys in its pool;
//! after Alice at A mails Bob at B, `cert show` at B verifies the stored message's "Quantum
//! Secured" certificate against A's key from B's peer directory, and reports it NOT VERIFIABLE
//! once the certificate in the stored bytes is altered. Then Alice writes on the web to Bob and
//! to a mailbox B does not have: `POST /api/qkd/confirm/` at A reports Bob delivered with exactly
//! the QKD key IDs Bob's copy names in `X-QKD-Key-ID` and the certificate B's stored envelope
//! carries (verified with A's site card), and the other recipient bounced once A's queue is done.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use qutemail_e2e::{
    DemoGateway, LiveDemo, WebApi, files_containing, pop3_fetch, python, wait_for, workspace_root,
};
use serde_json::{Value, json};

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
    let original = std::fs::read(&stored).unwrap();
    let mut bytes = original.clone();
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
    // Put the byte back: verified again (and Bob's maildrop is sound for what follows).
    std::fs::write(&stored, &original).unwrap();
    ctl_ok(&demo, "B", &["cert", "show", &bob, "--uid", &uid]);

    web_mail_is_confirmed_with_its_keys_and_certificate(&demo, &bob);
}

/// Alice composes at A's web API to Bob and to `nobody` at B in hybrid mode; `POST
/// /api/qkd/confirm/` at A is polled until A's queue is done with both.
fn web_mail_is_confirmed_with_its_keys_and_certificate(demo: &LiveDemo, bob: &str) {
    let (a, b) = (demo.site("A"), demo.site("B"));
    let alice = &a["users"][0];
    let api = WebApi::login(a, alice["address"].as_str().unwrap(), alice["password"].as_str().unwrap());
    let nobody = format!("nobody@{}", b["domain"].as_str().unwrap());
    let subject = format!("keys confirmed {}", std::process::id());
    let before = inbox(demo, "B", bob)["messages"].as_u64().unwrap();
    let (status, sent) = api.post(
        "/api/mail/compose/",
        &json!({"to": [bob, nobody], "subject": subject, "text": "Dear Bob,\nwhich keys sealed this?\n",
            "mode": "hybrid"}),
    );
    assert_eq!(status, 202, "{sent:#}");
    let id = sent["id"].as_str().unwrap();
    let queue_id = sent["queued"][0]["queue_id"].as_str().unwrap().to_owned();
    assert_eq!(sent["queued"][1]["queue_id"], queue_id.as_str(), "one queue entry for both: {sent:#}");

    let mut confirmation = Value::Null;
    wait_for("A's queue to be done with both recipients", Duration::from_secs(150), || {
        let (status, answer) = api.post("/api/qkd/confirm/", &json!({ "id": id }));
        assert_eq!(status, 200, "{answer:#}");
        confirmation = answer;
        confirmation["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "delivered" || r["state"] == "bounced")
    });
    let c = &confirmation;
    assert!(!ctl_ok(demo, "A", &["queue", "list"]).contains(&queue_id), "the queue entry is gone");
    let recipient = |address: &str| -> &Value {
        c["recipients"].as_array().unwrap().iter().find(|r| r["recipient"] == address).unwrap()
    };

    // Bob: delivered, sealed in hybrid mode with keys of the link A–B.
    let to_bob = recipient(bob);
    assert_eq!(
        (to_bob["state"].as_str(), to_bob["mode"].as_str(), to_bob["link_id"].as_str()),
        (Some("delivered"), Some("hybrid"), Some("link-a-b")),
        "{c:#}"
    );
    assert_eq!(
        (to_bob["source_kme_id"].as_str(), to_bob["target_kme_id"].as_str()),
        (Some("KME-A"), Some("KME-B"))
    );
    assert_eq!(to_bob["status"], "2.0.0", "{c:#}");
    assert!(to_bob["last_error"].is_null() && to_bob["completed_at"].is_string(), "{c:#}");
    let key_ids: Vec<String> =
        to_bob["key_ids"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_owned()).collect();
    assert!(!key_ids.is_empty(), "{c:#}");
    // nobody: refused by B at RCPT, bounced although the message has left the queue.
    let to_nobody = recipient(&nobody);
    assert_eq!(to_nobody["state"], "bounced", "{c:#}");
    assert_eq!(to_nobody["status"], "5.1.1", "{c:#}");
    assert!(to_nobody["last_error"].as_str().is_some_and(|e| e.contains("5.1.1")), "{c:#}");
    assert!(
        to_nobody["key_ids"].as_array().unwrap().is_empty() && to_nobody["certificate"].is_null(),
        "{c:#}"
    );
    // Top level: the least advanced state, the delivered keys, the one certificate.
    assert_eq!(c["state"], "bounced", "{c:#}");
    assert_eq!(c["key_ids"], to_bob["key_ids"], "{c:#}");
    assert_eq!(c["certificate"], to_bob["certificate"], "{c:#}");
    let certificate = &to_bob["certificate"];
    assert_eq!(certificate["certificate"]["key_ids"], to_bob["key_ids"], "{c:#}");
    assert_eq!(certificate["certificate"]["link_id"], "link-a-b", "{c:#}");
    assert_eq!(certificate["certificate"]["mode"], "hybrid", "{c:#}");
    assert_eq!(certificate["certificate"]["sender_domain"], a["domain"], "{c:#}");

    // Bob reads it over POP3 at B: X-QKD-Key-ID names exactly the reported keys.
    wait_for("delivery at B", Duration::from_secs(150), || {
        inbox(demo, "B", bob)["messages"].as_u64() == Some(before + 1)
    });
    let work = tempfile::tempdir().unwrap();
    let messages = pop3_fetch(b, work.path());
    let read = messages
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .find(|m| m.contains(&subject))
        .expect("Bob's copy over POP3");
    assert_eq!(header_list(&read, "X-QKD-Key-ID"), key_ids, "{read}");

    // B's stored envelope of it carries exactly the reported certificate (its signature too),
    // and it verifies offline with A's site card, naming the same keys and link.
    let blobs =
        PathBuf::from(b["gateway"]["config"].as_str().unwrap()).parent().unwrap().join("mail/B/blobs");
    let carried: Vec<(PathBuf, Value)> = files_containing(&[&blobs], &[CERT_MARKER.as_bytes()])
        .into_iter()
        .filter_map(|(path, _)| {
            let json = certificate_part(&std::fs::read(&path).unwrap())?;
            (json["certificate"]["key_ids"] == to_bob["key_ids"]).then_some((path, json))
        })
        .collect();
    assert_eq!(carried.len(), 1, "one envelope at B sealed with {key_ids:?}: {carried:?}");
    assert_eq!(&carried[0].1, certificate, "A's record is the certificate B holds");
    let card = a["gateway"]["site_card"].as_str().unwrap();
    let out = ctl(
        demo,
        "B",
        &["cert", "verify", "--message", carried[0].0.to_str().unwrap(), "--sender-card", card, "--json"],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(&verified, &certificate["certificate"], "the verified certificate is the reported one");
}

/// The comma-separated values of header `name` (unfolded) in a message's header block.
fn header_list(message: &str, name: &str) -> Vec<String> {
    let head = message.split("\r\n\r\n").next().unwrap();
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    let prefix = format!("{}:", name.to_ascii_lowercase());
    let line = unfolded
        .split("\r\n")
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {name} header in {head}"));
    line[prefix.len()..].split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect()
}

/// The JSON of a stored envelope's certificate part (base64 lines after its headers), or
/// `None` when it does not decode (as in the envelope altered above).
fn certificate_part(envelope: &[u8]) -> Option<Value> {
    let start = find(envelope, CERT_MARKER.as_bytes())? + CERT_MARKER.len();
    let mut text = Vec::new();
    for line in envelope[start..].split(|&b| b == b'\n') {
        if line.starts_with(b"--") {
            break;
        }
        text.extend(line.iter().filter(|b| !b.is_ascii_whitespace()));
    }
    serde_json::from_slice(&base64_decode(&text)?).ok()
}

/// Standard base64 (with padding), as MIME writes it.
fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text.iter().take_while(|&&c| c != b'=') {
        acc = (acc << 6) | ALPHABET.iter().position(|&a| a == c)? as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
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
