//! Failed logins are counted once for SMTP AUTH, IMAP and POP3 (`[login_throttle]`): a guessing
//! run over SMTP submission gets its address refused, with the right password too, on SMTP and
//! on IMAP; the account's owner from another address still logs in (no lockout).
//! Real `qutemail serve`, SoftHSM, real TLS, Python's smtplib and imaplib.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use qutemail_hsm::testing::isolated;

const TOKEN: &str = "gateway";
const REFUSE_AFTER: u32 = 5;

fn config(dir: &Path, pin: &Path) -> String {
    site_config(dir, pin, TOKEN)
        + LOOPBACK_SMTP
        + &format!(
            r#"
[imap]
listen = "127.0.0.1:0"
tls_listen = "127.0.0.1:0"

# Short delays so the test reaches the refusal quickly; the counting is the production code's.
[login_throttle]
free_failures = 1
first_delay_ms = 10
max_delay_s = 1
refuse_address_after = {REFUSE_AFTER}
"#
        )
}

#[derive(Debug)]
struct Attempt {
    ok: bool,
    code: Option<u64>,
    reply: String,
}

fn attempts(proto: &str, addr: &str, ca: &Path, source: &str, password: &str, count: u32) -> Vec<Attempt> {
    let python = std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients/login_attempts.py"))
        .args([proto, addr])
        .arg(ca)
        .args([source, "alice@a.test", password, &count.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .expect("python3");
    assert!(out.status.success(), "login_attempts.py {proto} failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Attempt {
                ok: v["ok"].as_bool().unwrap(),
                code: v["code"].as_u64(),
                reply: v["reply"].to_string(),
            }
        })
        .collect()
}

#[test]
fn failed_smtp_logins_refuse_the_address_everywhere_but_never_lock_the_owner_out() {
    isolated(
        "failed_smtp_logins_refuse_the_address_everywhere_but_never_lock_the_owner_out",
        &[TOKEN],
        |env| {
            let dir = &env.dir;
            write_tls(dir, "throttle test CA", &["localhost", "127.0.0.1"]);
            let config_path = dir.join("qutemail.toml");
            std::fs::write(&config_path, config(dir, &env.pin_file)).unwrap();
            add_account(&config_path, "alice@a.test", "alice-right-1");
            let (_serve, ready) = serve(&config_path, Stdio::inherit());
            let smtp = listener(&ready, "smtp-submission");
            let imap = listener(&ready, "imap");
            let ca = dir.join("ca.pem");

            // Before any failure the right password works over both protocols.
            assert!(attempts("smtp", &smtp, &ca, "127.0.0.1", "alice-right-1", 1)[0].ok);
            assert!(attempts("imap", &imap, &ca, "127.0.0.1", "alice-right-1", 1)[0].ok);

            // The guessing run: each wrong password is 535, until the address is refused.
            let guesses = attempts("smtp", &smtp, &ca, "127.0.0.1", "guess", REFUSE_AFTER + 2);
            for (i, a) in guesses.iter().enumerate().take(REFUSE_AFTER as usize) {
                assert_eq!((a.ok, a.code), (false, Some(535)), "guess {i}: {a:?}");
            }
            for a in &guesses[REFUSE_AFTER as usize..] {
                assert_eq!((a.ok, a.code), (false, Some(454)), "beyond the limit: {a:?}");
            }

            // Refused with the right password too, on SMTP and (one count) on IMAP.
            let smtp_right = &attempts("smtp", &smtp, &ca, "127.0.0.1", "alice-right-1", 1)[0];
            assert_eq!((smtp_right.ok, smtp_right.code), (false, Some(454)), "{smtp_right:?}");
            let imap_right = &attempts("imap", &imap, &ca, "127.0.0.1", "alice-right-1", 1)[0];
            assert!(!imap_right.ok && imap_right.reply.contains("UNAVAILABLE"), "{imap_right:?}");

            // Alice from another address is only slowed (at most max_delay_s), never locked out.
            let elsewhere = &attempts("smtp", &smtp, &ca, "127.0.0.2", "alice-right-1", 1)[0];
            assert_eq!((elsewhere.ok, elsewhere.code), (true, Some(235)), "{elsewhere:?}");
            assert!(attempts("imap", &imap, &ca, "127.0.0.2", "alice-right-1", 1)[0].ok);
        },
    );
}
