//! Issue 5's "keys exhausted" promise on the live two-site demo, made deterministic: the fibre
//! is cut first (no new key can arrive), then A's pool for the pair A-mail → B-mail is drained
//! through ETSI GS QKD 014 as A-mail until kmd answers that it has not enough keys, and the
//! empty pool is confirmed twice, a block period apart, before anything is sent. With the
//! demo's policy (defer, no `pqc` fallback) Alice's message then waits in A's queue with the
//! reason "keys exhausted" (`qutemail queue list` and A's metrics say so), nothing reaches B and
//! nothing is sent in a weaker mode; once the fibre is mended it is delivered hybrid-sealed and
//! Bob's copy ends with exactly the bytes Alice sent.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use qutemail_e2e::{LiveDemo, workspace_root};

fn python() -> String {
    std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// One request on the simulator's control socket; returns its answer.
fn control(demo: &LiveDemo, request: &str) -> serde_json::Value {
    let socket = demo.state["link"]["control_socket"].as_str().unwrap();
    let mut conn = UnixStream::connect(socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    conn.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(answer["ok"], true, "{request}: {line}");
    answer
}

/// Drains A's keys for A-mail → B-mail; returns the drain's report.
fn drain(demo: &LiveDemo) -> serde_json::Value {
    let a = demo.site("A");
    let mail = &a["saes"][0];
    let out = Command::new(python())
        .arg(workspace_root().join("tests/clients/kmd_drain.py"))
        .arg(a["etsi014_url"].as_str().unwrap())
        .arg(a["ca_cert"].as_str().unwrap())
        .arg(mail["cert"].as_str().unwrap())
        .arg(mail["key"].as_str().unwrap())
        .arg(demo.site("B")["saes"][0]["sae_id"].as_str().unwrap())
        .output()
        .expect("python3");
    assert!(out.status.success(), "kmd_drain.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The site's gateway metrics (`state.json` `sites.X.gateway.metrics`), scraped over HTTP.
fn metrics(site: &serde_json::Value) -> String {
    let url = site["gateway"]["metrics"].as_str().unwrap();
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_once('/').unwrap();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(conn, "GET /{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of `series` (name and labels as exposed), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn qutemail(demo: &LiveDemo, site: &str, args: &[&str]) -> String {
    let s = demo.site(site);
    // The binary the demo runs (no cargo build, which may wait long for the build lock).
    let exe = std::fs::read_link(format!("/proc/{}/exe", s["gateway"]["pid"])).unwrap();
    let out = Command::new(exe)
        .arg(args[0])
        .arg("--config")
        .arg(s["gateway"]["config"].as_str().unwrap())
        .args(&args[1..])
        .env("SOFTHSM2_CONF", s["hsm"]["softhsm2_conf"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "qutemail {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen within 120 s");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Bob's maildrop at B over POP3 (poplib, STLS).
fn pop3_fetch(site: &serde_json::Value, out: &Path) -> Vec<Vec<u8>> {
    let user = &site["users"][0];
    let result = Command::new(python())
        .arg(workspace_root().join("tests/clients/pop3_fetch.py"))
        .arg(site["gateway"]["pop3"].as_str().unwrap())
        .arg(site["gateway"]["tls_ca"].as_str().unwrap())
        .arg(user["address"].as_str().unwrap())
        .arg(user["password"].as_str().unwrap())
        .arg(out)
        .output()
        .expect("python3");
    assert!(result.status.success(), "poplib: {}", String::from_utf8_lossy(&result.stderr));
    let listing: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    let count = listing["count"].as_u64().unwrap();
    (1..=count).map(|n| std::fs::read(out.join(format!("{n}.eml"))).unwrap()).collect()
}

#[test]
fn with_keys_exhausted_mail_waits_then_goes_hybrid_when_keys_return() {
    let demo = LiveDemo::start();
    let (a, b) = (demo.site("A").clone(), demo.site("B").clone());
    let to_b = "qutemail_gateway_messages_sent_total{route=\"b.qutemail.test\"";

    // 1. Cut the fibre, then empty A's pool for the pair. The block period (one block of
    //    sifted key at the link's sifted rate) spaces the checks that the pool stays empty, so
    //    a block in flight from the device when the fibre was cut has landed before we send.
    let before = control(&demo, r#"{"cmd":"status"}"#);
    let config = std::fs::read_to_string(demo.state["link"]["simulator_config"].as_str().unwrap()).unwrap();
    let bits_per_block: f64 = config
        .lines()
        .find_map(|l| l.strip_prefix("sifted_bits_per_block = "))
        .map_or(16384.0, |v| v.trim().parse().unwrap());
    let sifted_bps = before["status"]["link"]["sifted_rate_bps"].as_f64().unwrap_or(0.0).max(1.0);
    let block_period = Duration::from_secs_f64((bits_per_block / sifted_bps).clamp(1.0, 10.0));
    control(&demo, r#"{"cmd":"fibre_cut","cut":true}"#);
    let mut empty_reads = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while empty_reads < 2 {
        assert!(Instant::now() < deadline, "A's pool did not stay empty within 60 s of the cut");
        let report = drain(&demo);
        assert!(matches!(report["last_status"].as_u64(), Some(400 | 503)), "{report}");
        empty_reads =
            if report["stored_key_count"] == 0 && report["keys_taken"] == 0 { empty_reads + 1 } else { 0 };
        std::thread::sleep(block_period);
    }
    let link = control(&demo, r#"{"cmd":"status"}"#);
    assert_eq!(link["status"]["link"]["fibre_cut"], true, "{link}");

    // 2. Alice sends; with the defer policy the message waits at A, for keys.
    let clear = tempfile::tempdir().unwrap();
    let body = clear.path().join("body.txt");
    std::fs::write(&body, "Dear Bob,\nthis waited for fresh QKD keys.\n").unwrap();
    let sent = clear.path().join("sent.eml");
    let user = &a["users"][0];
    let out = Command::new(python())
        .arg(workspace_root().join("tests/clients/submit.py"))
        .arg(a["gateway"]["smtp_submission"].as_str().unwrap())
        .arg(a["gateway"]["tls_ca"].as_str().unwrap())
        .arg(user["address"].as_str().unwrap())
        .arg(user["password"].as_str().unwrap())
        .arg(user["address"].as_str().unwrap())
        .arg("bob@b.qutemail.test")
        .arg("while the keys were out")
        .arg(&body)
        .arg(&sent)
        .output()
        .expect("python3");
    assert!(out.status.success(), "smtplib: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{}", "every recipient accepted");
    wait_for("the keys-exhausted deferral in A's metrics", || {
        let m = metrics(&a);
        sample(
            &m,
            "qutemail_gateway_messages_deferred_total{route=\"b.qutemail.test\",reason=\"keys_exhausted\"}",
        ) >= 1.0
            && sample(&m, "qutemail_gateway_queue_messages{reason=\"keys_exhausted\"}") == 1.0
    });
    let listing = qutemail(&demo, "A", &["queue", "list"]);
    assert!(listing.contains("<bob@b.qutemail.test>  queued"), "{listing}");
    assert!(listing.contains("waiting for QKD keys"), "{listing}");
    // Nothing left A in any mode, and B received nothing.
    let m = metrics(&a);
    assert!(!m.contains(to_b), "A sent something while keys were out:\n{m}");
    assert!(!metrics(&b).contains("qutemail_gateway_messages_received_total{listener=\"mx\""), "B got mail");
    let fetched = clear.path().join("pop3-before");
    std::fs::create_dir(&fetched).unwrap();
    assert!(pop3_fetch(&b, &fetched).is_empty(), "Bob has mail while A's keys were out");

    // 3. Mend the fibre: keys flow again and the message leaves, hybrid-sealed.
    control(&demo, r#"{"cmd":"fibre_cut","cut":false}"#);
    wait_for("delivery to B after the fibre was mended", || {
        sample(&metrics(&a), &format!("{to_b},mode=\"hybrid\"}}")) == 1.0
    });
    let m = metrics(&a);
    for mode in ["pqc", "normal", "qaes", "otp"] {
        assert_eq!(sample(&m, &format!("{to_b},mode=\"{mode}\"}}")), 0.0, "sent as {mode}:\n{m}");
    }
    assert_eq!(sample(&m, "qutemail_gateway_queue_messages{reason=\"keys_exhausted\"}"), 0.0, "{m}");
    let bm = metrics(&b);
    assert_eq!(
        sample(
            &bm,
            "qutemail_gateway_messages_received_total{listener=\"mx\",mode=\"hybrid\",peer=\"a.qutemail.test\"}"
        ),
        1.0,
        "{bm}"
    );
    let fetched = clear.path().join("pop3-after");
    std::fs::create_dir(&fetched).unwrap();
    let messages = pop3_fetch(&b, &fetched);
    assert_eq!(messages.len(), 1);
    let got = &messages[0];
    let sent = std::fs::read(&sent).unwrap();
    assert!(got.ends_with(&sent), "Bob's copy ends with the exact bytes Alice sent");
    let text = String::from_utf8_lossy(got);
    assert!(text.contains("X-QKD-Secure: True\r\nX-QKD-Protection: hybrid\r\n"), "{text}");
    let (status, out) = demo.stop();
    assert!(status.success(), "{out}");
}
