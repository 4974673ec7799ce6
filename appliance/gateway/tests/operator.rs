//! `qutemailctl` as an operator runs it, against a real site (SQLite store, SoftHSM token, TLS
//! from a test CA, `qutemail serve` running): the account lifecycle with its refusals, a
//! message stuck for an unreachable next hop listed, retried (the running queue attempts it
//! again at once) and deleted with a bounce to its local sender, the DNS records parsed and the
//! DKIM keys checked against the configured private keys, `links` refusing what is not kmd,
//! and errors that name what is wrong. Links and certificates of mail that crossed sites are
//! tested against the two-site demo (tests/tests/operator_two_sites.rs).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{LOOPBACK_SMTP, listener, qutemailctl, serve, site_config, smarthost_queue, write_tls};
use qutemail_hsm::testing::isolated;

const TOKEN: &str = "gateway-operator";

fn config(dir: &Path, pin: &Path, relay: &str, extra: &str) -> String {
    site_config(dir, pin, TOKEN)
        + LOOPBACK_SMTP
        + &smarthost_queue(relay)
        + &format!(
            r#"
[metrics]
listen = "127.0.0.1:0"
{extra}"#
        )
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `qutemailctl ARGS` and expects success; returns standard output.
fn ok(config: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = qutemailctl(args, config, stdin);
    assert!(out.status.success(), "qutemailctl {args:?} failed: {}{}", text(&out), err(&out));
    text(&out)
}

/// Runs `qutemailctl ARGS`, expects it to fail; returns standard error.
fn refused(config: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = qutemailctl(args, config, stdin);
    assert!(!out.status.success(), "qutemailctl {args:?} should have failed: {}", text(&out));
    err(&out)
}

fn json(config: &Path, args: &[&str]) -> serde_json::Value {
    let out = ok(config, args, None);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"))
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().expect("openssl (apt-get install -y openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", err(&out));
    out.stdout
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Polls `qutemailctl queue list --json` until `done` holds, up to a generous deadline.
fn queue_until(config: &Path, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let queue = json(config, &["queue", "list", "--json"]);
        if done(&queue) {
            return queue;
        }
        assert!(Instant::now() < deadline, "{what} did not happen within 120 s: {queue:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn an_operator_manages_users_the_queue_and_dns_of_a_running_site() {
    isolated("an_operator_manages_users_the_queue_and_dns_of_a_running_site", &[TOKEN], |env| {
        let dir = &env.dir;
        write_tls(dir, "operator test CA", &["localhost", "127.0.0.1"]);
        // A relay nobody listens on: mail for other domains waits in the queue.
        let relay = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let rsa = dir.join("dkim-rsa.pem");
        openssl(&["genrsa", "-out", rsa.to_str().unwrap(), "2048"]);
        let ed = dir.join("dkim-ed.pem");
        openssl(&["genpkey", "-algorithm", "ed25519", "-out", ed.to_str().unwrap()]);
        let dkim = format!(
            "\n[dkim]\nselector = \"rsa1\"\nprivate_key = \"{}\"\nadditional_keys = [{{ selector = \"ed1\", \
             private_key = \"{}\" }}]\n",
            rsa.display(),
            ed.display()
        );
        let config_path = dir.join("qutemail.toml");
        std::fs::write(&config_path, config(dir, &env.pin_file, &relay, &dkim)).unwrap();
        let c = config_path.as_path();

        // --- Users -------------------------------------------------------------------------
        let out =
            ok(c, &["users", "add", "alice@a.test", "--name", "Alice", "--quota", "1000000"], Some("pw-1\n"));
        assert!(out.contains("created alice@a.test"), "{out}");
        ok(c, &["users", "add", "bob@a.test"], Some("pw-2\n"));
        let e = refused(c, &["users", "add", "alice@a.test"], Some("other\n"));
        assert!(e.contains("an account for alice@a.test already exists"), "{e}");
        let e = refused(c, &["users", "add", "mallory@b.test"], Some("pw\n"));
        assert!(e.contains("mallory@b.test is not in this site's domain a.test"), "{e}");
        let e = refused(c, &["users", "add", "nobody"], Some("pw\n"));
        assert!(e.contains("\"nobody\" is not a mail address"), "{e}");
        let e = refused(c, &["users", "add", "carol@a.test"], Some(""));
        assert!(e.contains("no password on standard input"), "{e}");
        let e = refused(c, &["users", "show", "carol@a.test"], None);
        assert!(e.contains("no account for carol@a.test"), "{e}");
        let e = refused(c, &["users", "disable", "carol@a.test"], None);
        assert!(e.contains("carol@a.test"), "{e}");

        ok(c, &["users", "disable", "bob@a.test"], None);
        assert!(ok(c, &["users", "list"], None).contains("bob@a.test\tdisabled\tbob"));
        ok(c, &["users", "enable", "bob@a.test"], None);
        ok(c, &["users", "passwd", "alice@a.test"], Some("alice-pass-2\n"));
        let users = json(c, &["users", "list", "--json"]);
        let states: Vec<(&str, &str)> = users
            .as_array()
            .unwrap()
            .iter()
            .map(|u| (u["address"].as_str().unwrap(), u["state"].as_str().unwrap()))
            .collect();
        assert_eq!(states, [("alice@a.test", "active"), ("bob@a.test", "active")]);
        let alice = json(c, &["users", "show", "alice@a.test", "--json"]);
        assert_eq!((alice["name"].as_str(), alice["quota_bytes"].as_u64()), (Some("Alice"), Some(1_000_000)));
        let mut boxes: Vec<&str> =
            alice["mailboxes"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
        boxes.sort_unstable();
        assert_eq!(boxes, ["Drafts", "INBOX", "Junk", "Sent", "Trash"]);

        // --- The queue -------------------------------------------------------------------
        let (_serve, ready) = serve(&config_path, Stdio::null());
        let addr = |name: &str| listener(&ready, name);
        // The new password works: alice submits to bob (local) and carol (the relay, down).
        let python = std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/metrics_mail.py"))
            .args([addr("smtp-mx"), addr("smtp-submission")])
            .arg(dir.join("ca.pem"))
            .args(["alice@a.test", "alice-pass-2", "bob@a.test", "carol@elsewhere.test", "0"])
            .output()
            .expect("python3 (apt-get install -y python3)");
        assert!(out.status.success(), "smtplib: {}", err(&out));
        let queue = queue_until(c, "the first attempt for carol", |q| {
            q.as_array().is_some_and(|a| a.len() == 1 && a[0]["recipients"][0]["attempts"] == 1)
        });
        let m = &queue[0];
        let id = m["queue_id"].as_str().unwrap().to_owned();
        assert_eq!(m["sender"], "alice@a.test");
        let r = &m["recipients"][0];
        assert_eq!(
            (r["address"].as_str(), r["state"].as_str()),
            (Some("carol@elsewhere.test"), Some("queued"))
        );
        assert!(r["last_reply"].as_str().unwrap().contains("next hop unreachable"), "{r}");
        let listing = ok(c, &["queue", "list"], None);
        assert!(listing.contains(&format!("{id}  ")) && listing.contains("from <alice@a.test>"), "{listing}");
        assert!(listing.contains("<carol@elsewhere.test>  queued  1 attempt(s), next in "), "{listing}");

        // The next attempt is an hour away; retry makes it due and the running queue takes it.
        let out = ok(c, &["queue", "retry", &id], None);
        assert!(out.contains(&format!("1 recipient(s) of message {id} due now")), "{out}");
        queue_until(c, "the retried attempt", |q| q[0]["recipients"][0]["attempts"] == 2);
        let out = ok(c, &["queue", "retry", "--all"], None);
        assert!(out.contains("recipient(s) of the queue due now"), "{out}");
        queue_until(c, "the attempt after retry --all", |q| q[0]["recipients"][0]["attempts"] == 3);
        let e = refused(c, &["queue", "retry", "0123456789abcdef0123456789abcdef"], None);
        assert!(e.contains("no message 0123456789abcdef0123456789abcdef in the queue"), "{e}");
        let e = refused(c, &["queue", "retry"], None);
        assert!(e.contains("--all"), "retry without an ID or --all: {e}");

        // Delete: the queue is empty and alice has the bounce in her INBOX (a local report,
        // stored at rest: it has no certificate).
        let inbox_before = mailbox(c, "alice@a.test", "INBOX");
        let out = ok(c, &["queue", "delete", &id], None);
        assert!(out.contains(&format!("deleted {id} from the queue")), "{out}");
        assert!(
            out.contains("a delivery status notification for 1 recipient(s) went to alice@a.test's INBOX")
        );
        assert!(ok(c, &["queue", "list"], None).contains("the queue is empty"));
        assert_eq!(json(c, &["queue", "list", "--json"]), serde_json::json!([]));
        let inbox = mailbox(c, "alice@a.test", "INBOX");
        assert_eq!(inbox["messages"].as_u64(), inbox_before["messages"].as_u64().map(|n| n + 1));
        assert_eq!(inbox["unseen"].as_u64(), Some(1));
        let bounce_uid = (inbox["uid_next"].as_u64().unwrap() - 1).to_string();
        let out = qutemailctl(&["cert", "show", "alice@a.test", "--uid", &bounce_uid], c, None);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            text(&out).contains("NO CERTIFICATE") && text(&out).contains("at rest only"),
            "{}",
            text(&out)
        );
        let e = refused(c, &["queue", "delete", &id], None);
        assert!(e.contains(&format!("no message {id} in the queue")), "{e}");
        let e = refused(c, &["cert", "show", "alice@a.test", "--uid", "999"], None);
        assert!(e.contains("alice@a.test's INBOX has no message with UID 999"), "{e}");
        let e = refused(c, &["cert", "show", "alice@a.test", "--uid", "1", "--mailbox", "Nope"], None);
        assert!(e.contains("alice@a.test has no mailbox \"Nope\""), "{e}");

        // --- DNS -----------------------------------------------------------------------------
        check_dns(c, &rsa, &ed);

        // --- links: what is not kmd is refused by name -----------------------------------
        let e = refused(c, &["links"], None);
        assert!(e.contains("qutemail.toml names no kmd metrics URL") && e.contains("--kmd-metrics"), "{e}");
        let gateway_metrics = format!("http://{}/metrics", addr("metrics"));
        let e = refused(c, &["links", "--kmd-metrics", &gateway_metrics], None);
        assert!(e.contains("has no kmd_* metric: is this kmd?"), "{e}");
        let e = refused(c, &["links", "--kmd-metrics", &format!("http://{relay}/metrics")], None);
        assert!(e.contains(&format!("cannot read kmd's metrics at http://{relay}/metrics")), "{e}");
    });
}

/// A mailbox of `user` as `users show --json` reports it.
fn mailbox(config: &Path, user: &str, name: &str) -> serde_json::Value {
    let shown = json(config, &["users", "show", user, "--json"]);
    shown["mailboxes"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned().unwrap()
}

/// Parses `qutemailctl dns` (zone-file lines) and checks every record an operator publishes.
fn check_dns(c: &Path, rsa: &Path, ed: &Path) {
    let zone = ok(c, &["dns"], None);
    let mut records: Vec<(String, String, String)> = Vec::new();
    for line in zone.lines().filter(|l| !l.starts_with(';') && !l.is_empty()) {
        let mut words = line.splitn(4, ' ');
        let (name, class, kind, data) =
            (words.next().unwrap(), words.next().unwrap(), words.next().unwrap(), words.next().unwrap());
        assert!(name.ends_with('.') && class == "IN", "{line}");
        let data = if kind == "TXT" {
            // Character strings: quoted, at most 255 bytes each, joined.
            let strings: Vec<&str> = data.split("\" \"").map(|s| s.trim_matches('"')).collect();
            assert!(strings.iter().all(|s| s.len() <= 255), "{line}");
            strings.concat()
        } else {
            data.to_owned()
        };
        records.push((name.trim_end_matches('.').to_owned(), kind.to_owned(), data));
    }
    let find = |name: &str, kind: &str| -> Vec<String> {
        records.iter().filter(|r| r.0 == name && r.1 == kind).map(|r| r.2.clone()).collect()
    };
    assert_eq!(find("a.test", "MX"), ["10 mail.a.test."], "{zone}");
    let spf = find("a.test", "TXT");
    assert_eq!(spf.len(), 1, "{zone}");
    assert!(spf[0].starts_with("v=spf1 ") && spf[0].ends_with(" -all"), "{zone}");
    let dmarc = find("_dmarc.a.test", "TXT");
    assert!(dmarc.len() == 1 && dmarc[0].starts_with("v=DMARC1; p="), "{zone}");
    let sts = find("_mta-sts.a.test", "TXT");
    assert_eq!(sts.len(), 1, "{zone}");
    let sts_id = sts[0].strip_prefix("v=STSv1; id=").unwrap();
    assert!((1..=32).contains(&sts_id.len()) && sts_id.chars().all(|c| c.is_ascii_alphanumeric()), "{zone}");
    let tlsrpt = find("_smtp._tls.a.test", "TXT");
    assert!(tlsrpt.len() == 1 && tlsrpt[0].starts_with("v=TLSRPTv1; rua=mailto:"), "{zone}");

    // The DKIM keys are the configured ones: RSA as SubjectPublicKeyInfo, Ed25519 bare (RFC 8463).
    let rsa_spki = openssl(&["pkey", "-in", rsa.to_str().unwrap(), "-pubout", "-outform", "DER"]);
    let ed_spki = openssl(&["pkey", "-in", ed.to_str().unwrap(), "-pubout", "-outform", "DER"]);
    assert_eq!(
        find("rsa1._domainkey.a.test", "TXT"),
        [format!("v=DKIM1; k=rsa; p={}", base64(&rsa_spki))],
        "{zone}"
    );
    assert_eq!(
        find("ed1._domainkey.a.test", "TXT"),
        [format!("v=DKIM1; k=ed25519; p={}", base64(&ed_spki[ed_spki.len() - 32..]))],
        "{zone}"
    );

    // The policy file: enforcing, naming the MX; the JSON says the same and where to serve it.
    let policy = ok(c, &["dns", "--mta-sts-policy"], None);
    assert_eq!(policy, "version: STSv1\r\nmode: enforce\r\nmx: mail.a.test\r\nmax_age: 604800\r\n");
    let j = json(c, &["dns", "--json"]);
    assert_eq!(j["mta_sts_policy"], policy.as_str());
    assert_eq!(j["mta_sts_policy_url"], "https://mta-sts.a.test/.well-known/mta-sts.txt");
    assert_eq!(j["records"].as_array().unwrap().len(), records.len());
}

#[test]
fn errors_name_the_file_and_help_explains_every_flag() {
    let missing = Path::new("/nonexistent/qutemail.toml");
    for args in [&["users", "list"][..], &["queue", "list"], &["dns"], &["links"]] {
        let e = refused(missing, args, None);
        assert!(e.contains("/nonexistent/qutemail.toml"), "{args:?}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[site]\ndomain = \"a.test\"\nsite_keys = \"k.json\"\nfrobnicate = 1\n").unwrap();
    let e = refused(&bad, &["users", "list"], None);
    assert!(e.contains("bad.toml:4:") && e.contains("frobnicate"), "{e}");

    // Every subcommand's --help gives each flag and argument a description.
    let commands: &[&[&str]] = &[
        &[],
        &["users"],
        &["users", "add"],
        &["users", "passwd"],
        &["users", "disable"],
        &["users", "enable"],
        &["users", "list"],
        &["users", "show"],
        &["queue"],
        &["queue", "list"],
        &["queue", "retry"],
        &["queue", "delete"],
        &["links"],
        &["cert"],
        &["cert", "verify"],
        &["cert", "show"],
        &["dns"],
        &["backup"],
        &["restore"],
    ];
    for command in commands {
        let out =
            Command::new(env!("CARGO_BIN_EXE_qutemailctl")).args(*command).arg("--help").output().unwrap();
        assert!(out.status.success(), "{command:?} --help");
        let help = text(&out);
        let mut entries = 0;
        let mut in_list = false;
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.ends_with(':') && !line.starts_with(' ') {
                in_list = matches!(*line, "Options:" | "Arguments:" | "Commands:");
                continue;
            }
            let entry = line.trim_start();
            if !in_list || entry.is_empty() || !line.starts_with("  ") || line.starts_with("          ") {
                continue;
            }
            // A described entry has text after its name, on its line or (long help) the next.
            let name_end = entry.find("  ").unwrap_or(entry.len());
            let described = entry[name_end..].trim().len() > 3
                || lines.get(i + 1).is_some_and(|n| n.starts_with("          ") && n.trim().len() > 3);
            assert!(described, "{command:?}: {entry:?} has no description:\n{help}");
            entries += 1;
        }
        assert!(entries > 0, "{command:?}: no options listed:\n{help}");
    }
    let help = text(&Command::new(env!("CARGO_BIN_EXE_qutemailctl")).arg("--help").output().unwrap());
    for word in ["users", "queue", "links", "cert", "dns", "--config", "/etc/qutemail/qutemail.toml"] {
        assert!(help.contains(word), "{word} in:\n{help}");
    }
}

/// What a terminal shows while `qutemailctl` runs on it with `typed` lines typed at its
/// prompts (tests/tty_secret.py, Python's pty): the exit code and the transcript.
/// The test's SoftHSM configuration (`SOFTHSM2_CONF`) passes on through the environment.
fn at_terminal(config: &Path, args: &[&str], typed: &[&str]) -> (i32, String) {
    let python = std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tty_secret.py"))
        .args(typed)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_qutemailctl"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("python3");
    assert!(out.status.success(), "tty_secret.py: {}", err(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (report["status"].as_i64().unwrap() as i32, report["transcript"].as_str().unwrap().to_owned())
}

#[test]
fn secrets_typed_at_a_terminal_are_not_shown_and_new_ones_are_asked_twice() {
    isolated("secrets_typed_at_a_terminal_are_not_shown_and_new_ones_are_asked_twice", &[TOKEN], |env| {
        let dir = &env.dir;
        write_tls(dir, "tty test CA", &["localhost", "127.0.0.1"]);
        let config_path = dir.join("qutemail.toml");
        std::fs::write(&config_path, config(dir, &env.pin_file, "127.0.0.1:9", "")).unwrap();
        let c = config_path.as_path();

        // A new account's password: prompted, not echoed, asked twice.
        let (status, shown) = at_terminal(c, &["users", "add", "dave@a.test"], &["tty-pass-1", "tty-pass-1"]);
        assert_eq!(status, 0, "{shown}");
        assert!(shown.contains("New password: ") && shown.contains("Again, to confirm: "), "{shown}");
        assert!(shown.contains("created dave@a.test"), "{shown}");
        assert!(!shown.contains("tty-pass-1"), "the password was shown: {shown}");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store = runtime.block_on(qutemail_store::Store::open(qutemail_store::StoreConfig::sqlite(
            dir.join("mail.sqlite"),
            dir.join("blobs"),
        )));
        let store = store.unwrap();
        assert!(runtime.block_on(store.authenticate("dave@a.test", "tty-pass-1")).is_ok());

        // Two different entries: refused, no account.
        let (status, shown) = at_terminal(c, &["users", "add", "erin@a.test"], &["tty-pass-2", "tty-pass-3"]);
        assert_ne!(status, 0, "{shown}");
        assert!(shown.contains("the two entries differ"), "{shown}");
        assert!(!shown.contains("tty-pass-2") && !shown.contains("tty-pass-3"), "{shown}");
        refused(c, &["users", "show", "erin@a.test"], None);

        // A backup passphrase is asked twice. (The site's keys, which a backup holds, are made
        // by its first start or `qutemail site-card`.)
        let card = Command::new(env!("CARGO_BIN_EXE_qutemail"))
            .args([
                "site-card",
                "--config",
                c.to_str().unwrap(),
                "--out",
                dir.join("card.json").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(card.status.success(), "qutemail site-card: {}", err(&card));
        let archive = dir.join("site.qmbackup");
        let passphrase = "terminal passphrase 2026";
        let (status, shown) =
            at_terminal(c, &["backup", "--out", archive.to_str().unwrap()], &[passphrase, passphrase]);
        assert_eq!(status, 0, "{shown}");
        assert!(shown.contains("Backup passphrase: ") && shown.contains("Again, to confirm: "), "{shown}");
        assert!(!shown.contains(passphrase), "the passphrase was shown: {shown}");
        assert!(archive.exists());
        let (status, shown) = at_terminal(
            c,
            &["backup", "--out", dir.join("other.qmbackup").to_str().unwrap()],
            &[passphrase, "terminal passphrase 2027"],
        );
        assert_ne!(status, 0, "{shown}");
        assert!(shown.contains("the two entries differ") && !dir.join("other.qmbackup").exists(), "{shown}");
        runtime.block_on(store.close());
    });
}
