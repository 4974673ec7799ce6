//! No open relay: a real `qutemail serve` (SQLite store, SoftHSM token, TLS from a test CA) and
//! Python's smtplib trying every way through — unauthenticated, wrong password, forged local
//! and external senders, external to external, percent hack, source route — on ports 25, 587
//! and 465. Only local delivery and an account's own submissions get through.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use qutemail_hsm::testing::{SOFTHSM_MODULE, isolated};

const TOKEN: &str = "gateway";

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(dir: &Path, pin: &Path) -> String {
    format!(
        r#"[site]
domain = "a.test"
site_keys = "{d}/site-keys.json"

[hsm]
module_path = "{SOFTHSM_MODULE}"
token = {{ label = "{TOKEN}" }}
pin = {{ file = "{pin}" }}
wrapping_key_label = "gateway-kek"

[store]
sqlite = "{d}/mail.sqlite"
blob_dir = "{d}/blobs"

[tls]
cert = "{d}/mail.pem"
key = "{d}/mail.key"

[smtp]
hostname = "mail.a.test"
mx_listen = "127.0.0.1:0"
submission_listen = "127.0.0.1:0"
submissions_listen = "127.0.0.1:0"
"#,
        d = dir.display(),
        pin = pin.display()
    )
}

fn qutemail(args: &[&str], config: &Path, stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qutemail"))
        .arg(args[0])
        .arg("--config")
        .arg(config)
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

#[test]
fn no_open_relay_on_any_port() {
    isolated("no_open_relay_on_any_port", &[TOKEN], |env| {
        let dir = &env.dir;
        let ca = etsi014::pki::Ca::new("relay test CA").unwrap();
        ca.server(&["localhost", "127.0.0.1"]).unwrap().write(dir, "mail").unwrap();
        std::fs::write(dir.join("ca.pem"), ca.ca_pem()).unwrap();
        let config_path = dir.join("qutemail.toml");
        std::fs::write(&config_path, config(dir, &env.pin_file)).unwrap();
        for (user, password) in [("alice@a.test", "alice-pass-1"), ("bob@a.test", "bob-pass-1")] {
            let out = qutemail(&["account", "add", user], &config_path, Some(&format!("{password}\n")));
            assert!(out.status.success(), "account add: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_qutemail"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let serve = Serve(child);
        let mut ready = String::new();
        BufReader::new(stdout).read_line(&mut ready).unwrap();
        assert!(ready.starts_with("READY "), "{ready:?}");
        let addr = |name: &str| {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} in {ready:?}"))
                .to_owned()
        };
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
