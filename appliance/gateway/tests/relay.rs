//! No open relay: a real `qutemail serve` (SQLite store, SoftHSM token, TLS from a test CA) and
//! Python's smtplib trying every way through — unauthenticated, wrong password, forged local
//! and external senders, external to external, percent hack, source route — on ports 25, 587
//! and 465. Only local delivery and an account's own submissions get through.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{add_account, listener, serve, site_config, write_tls};
use qutemail_hsm::testing::isolated;

const TOKEN: &str = "gateway";

fn config(dir: &Path, pin: &Path) -> String {
    site_config(dir, pin, TOKEN)
        + r#"
[smtp]
hostname = "mail.a.test"
mx_listen = "127.0.0.1:0"
submission_listen = "127.0.0.1:0"
submissions_listen = "127.0.0.1:0"

# Loopback only, no DNS: SPF/DKIM/DMARC checks (on by default) are tested in mail_auth.rs.
[mail_auth]
check = false
"#
}

#[test]
fn no_open_relay_on_any_port() {
    isolated("no_open_relay_on_any_port", &[TOKEN], |env| {
        let dir = &env.dir;
        write_tls(dir, "relay test CA", &["localhost", "127.0.0.1"]);
        let config_path = dir.join("qutemail.toml");
        std::fs::write(&config_path, config(dir, &env.pin_file)).unwrap();
        for (user, password) in [("alice@a.test", "alice-pass-1"), ("bob@a.test", "bob-pass-1")] {
            add_account(&config_path, user, password);
        }
        let (serve, ready) = serve(&config_path, Stdio::null());
        let addr = |name: &str| listener(&ready, name);
        let python = std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/relay_matrix.py"))
            .args([addr("smtp-mx"), addr("smtp-submission"), addr("smtp-submissions")])
            .arg(dir.join("ca.pem"))
            .args(["alice@a.test", "alice-pass-1", "bob@a.test"])
            .output()
            .expect("python3 (apt-get install -y python3)");
        assert!(out.status.success(), "relay matrix: {}", String::from_utf8_lossy(&out.stderr));
        let results: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&out.stdout).unwrap();
        let code = |case: &str| results.get(case).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let expected: &[(&str, u64)] = &[
            ("mx: external to external", 550),
            ("mx: external to external after STARTTLS", 550),
            ("mx: forged local sender to external", 550),
            ("mx: percent hack", 550),
            ("mx: source route", 550),
            ("mx: unknown local user", 550),
            ("mx: local recipient (allowed)", 250),
            ("587: no authentication", 530),
            ("587: wrong password", 535),
            ("587: forged local sender", 553),
            ("587: forged external sender", 553),
            ("587: own address to external (allowed)", 250),
            ("465: no authentication", 530),
            ("465: wrong password", 535),
            ("465: forged local sender", 553),
            ("465: forged external sender", 553),
            ("465: own address to external (allowed)", 250),
            ("587: MAIL before STARTTLS", 530),
        ];
        for (case, want) in expected {
            assert_eq!(code(case), *want, "{case}: all results {results:?}");
        }
        assert_eq!(results.len(), expected.len(), "{results:?}");
        drop(serve);
    });
}
