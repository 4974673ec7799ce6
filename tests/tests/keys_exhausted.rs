//! Issue 5's "keys exhausted" promise on the live two-site demo, made deterministic: the fibre
//! is cut first (no new key can arrive), then A's pool for the pair A-mail → B-mail is drained
//! through ETSI GS QKD 014 as A-mail until kmd answers that it has not enough keys, and the
//! empty pool is confirmed twice, a block period apart, before anything is sent. Then each
//! `keys_exhausted` rule in turn:
//! - `defer` (the demo's): Alice's message waits in A's queue with the reason "keys exhausted"
//!   (`qutemailctl queue list` and A's metrics say so), nothing reaches B and nothing is sent in
//!   a weaker mode; once the fibre is mended it is delivered hybrid-sealed and Bob's copy ends
//!   with exactly the bytes Alice sent.
//! - `pqc` (A restarted with the rule on its `[[peer]]`): with the pool empty again, the next
//!   message leaves at once sealed with ML-KEM-768 alone, and says so at B.
//! - `refuse`: the next one is bounced at once; Alice gets the delivery status notification,
//!   B gets nothing.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use qutemail_e2e::{
    DemoGateway, LiveDemo, gateway_metrics, pop3_fetch, python, sample, submit, wait_for, workspace_root,
};

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

/// Cuts the fibre, then empties A's pool for the pair. The block period (one block of sifted
/// key at the link's sifted rate) spaces the checks that the pool stays empty, so a block in
/// flight from the device when the fibre was cut has landed before anything is sent.
fn exhaust_keys(demo: &LiveDemo) {
    let before = control(demo, r#"{"cmd":"status"}"#);
    let config = std::fs::read_to_string(demo.state["link"]["simulator_config"].as_str().unwrap()).unwrap();
    let bits_per_block: f64 = config
        .lines()
        .find_map(|l| l.strip_prefix("sifted_bits_per_block = "))
        .map_or(16384.0, |v| v.trim().parse().unwrap());
    let sifted_bps = before["status"]["link"]["sifted_rate_bps"].as_f64().unwrap_or(0.0).max(1.0);
    let block_period = Duration::from_secs_f64((bits_per_block / sifted_bps).clamp(1.0, 10.0));
    control(demo, r#"{"cmd":"fibre_cut","cut":true}"#);
    // Empty means: not even one key of kmd's smallest size could be taken, twice in a row a
    // block period apart (kmd may still count key material it cannot hand out, for example
    // keys the peer kmd has not confirmed yet: those are no use to the gateway either).
    let mut empty_reads = 0;
    let mut last = serde_json::Value::Null;
    // Generous: on a loaded machine the device and kmd may still be working off blocks made
    // before the cut for a while.
    let deadline = Instant::now() + Duration::from_secs(240);
    while empty_reads < 2 {
        assert!(Instant::now() < deadline, "A's pool did not stay empty within 240 s of the cut: {last}");
        let report = drain(demo);
        assert!(matches!(report["last_status"].as_u64(), Some(400 | 503)), "{report}");
        empty_reads = if report["keys_taken"] == 0 { empty_reads + 1 } else { 0 };
        last = report;
        std::thread::sleep(block_period);
    }
    let link = control(demo, r#"{"cmd":"status"}"#);
    assert_eq!(link["status"]["link"]["fibre_cut"], true, "{link}");
}

/// Alice at A sends `text` to Bob at B with smtplib (STARTTLS, AUTH); returns the bytes sent.
fn alice_sends(a: &serde_json::Value, dir: &Path, subject: &str, text: &str) -> Vec<u8> {
    let body = dir.join(format!("{subject}.txt"));
    std::fs::write(&body, text).unwrap();
    let sent = dir.join(format!("{subject}.eml"));
    assert_eq!(
        submit(a, "bob@b.qutemail.test", subject, &body, Some(&sent)),
        "{}",
        "every recipient accepted"
    );
    std::fs::read(&sent).unwrap()
}

/// A copy of A's demo configuration whose `[[peer]]` for B has `keys_exhausted = RULE`, next to
/// the original (so its relative paths hold).
fn config_with_rule(gateway: &DemoGateway, rule: &str) -> std::path::PathBuf {
    let original = gateway.config();
    let text = std::fs::read_to_string(&original).unwrap();
    assert_eq!(text.matches("[[peer]]\n").count(), 1, "{text}");
    let variant = original.with_file_name(format!("qutemail-{rule}.toml"));
    let text = text.replace("[[peer]]\n", &format!("[[peer]]\nkeys_exhausted = \"{rule}\"\n"));
    std::fs::write(&variant, text).unwrap();
    variant
}

#[test]
fn with_keys_exhausted_mail_waits_goes_pqc_or_is_refused_as_the_policy_says() {
    let demo = LiveDemo::start();
    let (a, b) = (demo.site("A").clone(), demo.site("B").clone());
    let mut gateway_a = DemoGateway::of(&demo, "A");
    let to_b = "qutemail_gateway_messages_sent_total{route=\"b.qutemail.test\"";
    let mx_from_a = |mode: &str| {
        format!(
            "qutemail_gateway_messages_received_total{{listener=\"mx\",mode=\"{mode}\",peer=\"a.qutemail.test\"}}"
        )
    };
    let limit = Duration::from_secs(120);
    let clear = tempfile::tempdir().unwrap();
    let bob_has = |n: usize, name: &str| {
        let fetched = clear.path().join(name);
        std::fs::create_dir(&fetched).unwrap();
        let messages = pop3_fetch(&b, &fetched);
        assert_eq!(messages.len(), n, "Bob's maildrop at B");
        messages
    };

    // 1. No keys can arrive, and A's pool for B is empty.
    exhaust_keys(&demo);

    // 2. `defer` (the demo's rule): Alice's message waits at A, for keys.
    let sent = alice_sends(
        &a,
        clear.path(),
        "while the keys were out",
        "Dear Bob,\nthis waited for fresh QKD keys.\n",
    );
    wait_for("the keys-exhausted deferral in A's metrics", limit, || {
        let m = gateway_metrics(&a);
        sample(
            &m,
            "qutemail_gateway_messages_deferred_total{route=\"b.qutemail.test\",reason=\"keys_exhausted\"}",
        ) >= 1.0
            && sample(&m, "qutemail_gateway_queue_messages{reason=\"keys_exhausted\"}") == 1.0
    });
    let listing = gateway_a.qutemailctl(&["queue", "list"]);
    assert!(listing.contains("<bob@b.qutemail.test>  queued"), "{listing}");
    assert!(listing.contains("waiting for QKD keys"), "{listing}");
    // Nothing left A in any mode, and B received nothing.
    let m = gateway_metrics(&a);
    assert!(!m.contains(to_b), "A sent something while keys were out:\n{m}");
    assert!(
        !gateway_metrics(&b).contains("qutemail_gateway_messages_received_total{listener=\"mx\""),
        "B got mail"
    );
    bob_has(0, "pop3-waiting");

    // 3. Mend the fibre: keys flow again and the message leaves, hybrid-sealed.
    control(&demo, r#"{"cmd":"fibre_cut","cut":false}"#);
    wait_for("delivery to B after the fibre was mended", limit, || {
        sample(&gateway_metrics(&a), &format!("{to_b},mode=\"hybrid\"}}")) == 1.0
    });
    let m = gateway_metrics(&a);
    for mode in ["pqc", "normal", "qaes", "otp"] {
        assert_eq!(sample(&m, &format!("{to_b},mode=\"{mode}\"}}")), 0.0, "sent as {mode}:\n{m}");
    }
    assert_eq!(sample(&m, "qutemail_gateway_queue_messages{reason=\"keys_exhausted\"}"), 0.0, "{m}");
    assert_eq!(sample(&gateway_metrics(&b), &mx_from_a("hybrid")), 1.0);
    let messages = bob_has(1, "pop3-hybrid");
    assert!(messages[0].ends_with(&sent), "Bob's copy ends with the exact bytes Alice sent");
    let text = String::from_utf8_lossy(&messages[0]);
    assert!(text.contains("X-QKD-Secure: True\r\nX-QKD-Protection: hybrid\r\n"), "{text}");

    // 4. `pqc`: A restarted with the fallback for B; the pool is emptied again, and the next
    //    message leaves at once, sealed with ML-KEM-768 alone.
    exhaust_keys(&demo);
    let log = clear.path().join("gateway-a.log");
    gateway_a.kill_hard();
    gateway_a.restart_with(&config_with_rule(&gateway_a, "pqc"), &log);
    let sent = alice_sends(&a, clear.path(), "pqc fallback", "Dear Bob,\nno QKD keys: ML-KEM only.\n");
    wait_for("the pqc fallback's delivery to B", limit, || {
        sample(&gateway_metrics(&a), &format!("{to_b},mode=\"pqc\"}}")) == 1.0
    });
    assert_eq!(sample(&gateway_metrics(&b), &mx_from_a("pqc")), 1.0);
    let messages = bob_has(2, "pop3-pqc");
    assert!(messages[1].ends_with(&sent), "the pqc copy ends with the exact bytes Alice sent");
    let text = String::from_utf8_lossy(&messages[1]);
    // Post-quantum, but no QKD key: B does not call it quantum-secured (no badge).
    assert!(text.contains("X-QKD-Secure: False\r\nX-QKD-Protection: pqc\r\n"), "{text}");
    assert!(text.contains("X-QKD-Certificate: verified; signed by a.qutemail.test"), "{text}");

    // 5. `refuse`: the next message is bounced at once, with a report to Alice; B gets nothing.
    gateway_a.kill_hard();
    gateway_a.restart_with(&config_with_rule(&gateway_a, "refuse"), &log);
    alice_sends(&a, clear.path(), "refused without keys", "Dear Bob,\nthis must not go weaker.\n");
    wait_for("the refusal in A's metrics", limit, || {
        sample(&gateway_metrics(&a), "qutemail_gateway_messages_bounced_total{route=\"b.qutemail.test\"}")
            == 1.0
    });
    assert!(gateway_a.qutemailctl(&["queue", "list"]).contains("the queue is empty"));
    let m = gateway_metrics(&a);
    assert!(!m.contains(to_b), "A sent something under the refuse rule:\n{m}");
    let reports = clear.path().join("pop3-alice");
    std::fs::create_dir(&reports).unwrap();
    let alice = pop3_fetch(&a, &reports);
    let report = alice
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .find(|m| m.contains("multipart/report") && m.contains("refused without keys"))
        .unwrap_or_else(|| {
            panic!("no delivery status notification in Alice's maildrop ({} messages)", alice.len())
        });
    assert!(report.contains("Action: failed") && report.contains("Status: 5.7.1"), "{report}");
    assert!(report.contains("no QKD keys for b.qutemail.test"), "{report}");
    bob_has(2, "pop3-after-refusal");

    drop(gateway_a);
    let (status, out) = demo.stop();
    assert!(status.success() || status.code() == Some(130), "demo: {out}");
}
