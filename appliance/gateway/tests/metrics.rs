//! The gateway's `/metrics` as Prometheus scrapes it: a real `qutemail serve` (SQLite store,
//! SoftHSM token, TLS from a test CA) takes mail from Python's smtplib on its MX and
//! submission listeners; the counters move by exactly what was sent, a message its relay
//! cannot take waits in the queue with the reason `peer_unreachable`, and `promtool check
//! metrics` accepts the exposition.

mod common;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    LOOPBACK_SMTP, add_account, listener, qutemailctl, serve, site_config, smarthost_queue, write_tls,
};
use qutemail_hsm::testing::isolated;

const TOKEN: &str = "gateway-metrics";

fn config(dir: &Path, pin: &Path, relay: &str) -> String {
    site_config(dir, pin, TOKEN)
        + LOOPBACK_SMTP
        + &smarthost_queue(relay)
        + r#"
[metrics]
listen = "127.0.0.1:0"
"#
}

/// `GET /metrics` over plain HTTP/1.1, as Prometheus does: (status line, content type, body).
fn scrape(addr: &str) -> (String, String, String) {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(conn, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_owned();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: ").or_else(|| l.strip_prefix("Content-Type: ")))
        .unwrap_or_default()
        .to_owned();
    (status, content_type, body.to_owned())
}

/// The value of the sample `series` (name and labels exactly as exposed), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install -y prometheus)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Scrapes until `done` holds for the exposition, up to a generous deadline.
fn scrape_until(addr: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, _, text) = scrape(addr);
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what} did not show within 120 s:\n{text}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn counters_move_by_what_was_sent_and_the_exposition_passes_promtool() {
    isolated("counters_move_by_what_was_sent_and_the_exposition_passes_promtool", &[TOKEN], |env| {
        let dir = &env.dir;
        write_tls(dir, "metrics test CA", &["localhost", "127.0.0.1"]);
        // A relay address nobody listens on: mail for other domains must wait in the queue.
        let relay = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let config_path = dir.join("qutemail.toml");
        std::fs::write(&config_path, config(dir, &env.pin_file, &relay)).unwrap();
        for (user, password) in [("alice@a.test", "alice-pass-1"), ("bob@a.test", "bob-pass-1")] {
            add_account(&config_path, user, password);
        }
        let (serve, ready) = serve(&config_path, Stdio::null());
        let addr = |name: &str| listener(&ready, name);
        let metrics = addr("metrics");

        // Before any mail: the families are there, nothing counted, the queue empty.
        let (status, content_type, before) = scrape(&metrics);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        assert!(!before.contains("qutemail_gateway_messages_received_total{"), "{before}");
        assert!(before.contains("# TYPE qutemail_gateway_queue_messages gauge\n"), "{before}");
        assert!(
            before.contains("qutemail_gateway_queue_messages{reason=\"peer_unreachable\"} 0\n"),
            "{before}"
        );
        promtool_check(&before);

        let python = std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/metrics_mail.py"))
            .args([addr("smtp-mx"), addr("smtp-submission")])
            .arg(dir.join("ca.pem"))
            .args(["alice@a.test", "alice-pass-1", "bob@a.test", "carol@elsewhere.test", "3"])
            .output()
            .expect("python3 (apt-get install -y python3)");
        assert!(out.status.success(), "smtplib: {}", String::from_utf8_lossy(&out.stderr));
        let accepted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(accepted, serde_json::json!({"mx": 3, "submission": 2}));

        // The relay is down: the message for elsewhere.test waits, and says why.
        let after = scrape_until(&metrics, "the deferral of the message to the relay", |t| {
            sample(t, "qutemail_gateway_messages_deferred_total{route=\"other\",reason=\"peer_unreachable\"}")
                >= 1.0
                // The attempt is counted as it ends, its outcome stored just after.
                && sample(t, "qutemail_gateway_queue_messages{reason=\"peer_unreachable\"}") == 1.0
                && sample(t, "qutemail_gateway_smtp_session_duration_seconds_count{listener=\"submission\"}")
                    >= 2.0
        });
        let received = |listener: &str, peer: &str| {
            sample(
                &after,
                &format!(
                    "qutemail_gateway_messages_received_total{{listener=\"{listener}\",mode=\"normal\",peer=\"{peer}\"}}"
                ),
            )
        };
        assert_eq!(received("mx", "internet"), 3.0, "{after}");
        assert_eq!(received("submission", "local"), 2.0, "{after}");
        assert!(after.contains("# TYPE qutemail_gateway_messages_received_total counter\n"), "{after}");
        assert!(after.contains("# TYPE qutemail_gateway_smtp_session_duration_seconds histogram\n"));
        assert_eq!(
            sample(&after, "qutemail_gateway_smtp_session_duration_seconds_count{listener=\"mx\"}"),
            3.0,
            "{after}"
        );
        assert_eq!(
            sample(&after, "qutemail_gateway_smtp_session_duration_seconds_count{listener=\"submission\"}"),
            2.0,
            "{after}"
        );
        // One attempt only (the next is an hour away): exactly one deferral, nothing sent.
        assert_eq!(
            sample(
                &after,
                "qutemail_gateway_messages_deferred_total{route=\"other\",reason=\"peer_unreachable\"}"
            ),
            1.0,
            "{after}"
        );
        assert!(!after.contains("qutemail_gateway_messages_sent_total{"), "{after}");
        assert!(!after.contains("qutemail_gateway_messages_bounced_total{"), "{after}");
        assert_eq!(
            sample(&after, "qutemail_gateway_queue_messages{reason=\"peer_unreachable\"}"),
            1.0,
            "{after}"
        );
        assert_eq!(
            sample(&after, "qutemail_gateway_queue_messages{reason=\"keys_exhausted\"}"),
            0.0,
            "{after}"
        );
        assert!(
            sample(&after, "qutemail_gateway_queue_oldest_message_age_seconds{reason=\"peer_unreachable\"}")
                > 0.0,
            "{after}"
        );
        promtool_check(&after);

        // The operator's listing names the same reason.
        let listing = qutemailctl(&["queue", "list"], &config_path, None);
        let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
        assert!(listing.contains("<carol@elsewhere.test>  queued  1 attempt(s)"), "{listing}");
        assert!(listing.contains("next hop unreachable"), "{listing}");
        drop(serve);
    });
}
