//! Mail authentication and MX routing with real parts: a real `qutemail serve` (SQLite store,
//! SoftHSM token, TLS from a test CA), a real DNS server on 127.0.0.1 (Python `dnslib`,
//! `tests/clients/dns_server.py`) serving MX, A and TXT records of test domains, an internet
//! mail server (Python `aiosmtpd`), real clients (Python `smtplib`, `imaplib`), and dkimpy as an
//! independent DKIM signer and verifier.
//!
//! Outbound: mail to an internet domain goes to the MX from DNS, over STARTTLS, in normal
//! mode, DKIM-signed with RSA and Ed25519 keys; the signatures verify with mail-auth and with
//! dkimpy; a null-MX domain bounces with a DSN. Inbound: SPF pass/fail/softfail, DKIM pass and
//! fail (tampered body), DMARC reject → 550 with nothing stored, quarantine → Junk, a temporary
//! DNS failure → 451 and a later retry gets through.

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Running, add_account, listener as addr, qutemailctl, site_config, write_tls};
use qutemail_hsm::testing::isolated;
use serde_json::Value;

const TOKEN: &str = "gateway";
const PASSWORD: &str = "alice-pass-1";

fn python() -> String {
    std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn client(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients").join(name)
}

/// Starts a Python server that prints `PORT <n>` and serves until its standard input closes.
fn python_server(script: &str, args: &[&Path]) -> (Running, u16) {
    let mut child = Command::new(python())
        .arg(client(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with the test requirements (tests/python-requirements.txt)");
    let stdin = child.stdin.take();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port =
        line.trim().strip_prefix("PORT ").unwrap_or_else(|| panic!("{script}: {line:?}")).parse().unwrap();
    (Running(child, stdin), port)
}

fn run_json(args: &[&str]) -> Value {
    let out = Command::new(python()).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {:?}", out.stdout))
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().expect("openssl (apt-get install -y openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// An RSA key for a test sender domain and its DKIM record value.
fn sender_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{name}.pem"));
    openssl(&["genrsa", "-out", key.to_str().unwrap(), "2048"]);
    let der = openssl(&["rsa", "-in", key.to_str().unwrap(), "-pubout", "-outform", "DER"]);
    use base64::Engine as _;
    (key, format!("v=DKIM1; k=rsa; p={}", base64::engine::general_purpose::STANDARD.encode(der)))
}

struct Zone {
    path: PathBuf,
    records: Vec<(String, String, String)>,
    servfail: Vec<String>,
}

impl Zone {
    fn new(path: PathBuf) -> Self {
        let zone = Self { path, records: Vec::new(), servfail: Vec::new() };
        zone.write();
        zone
    }

    fn add(&mut self, name: &str, rtype: &str, value: &str) {
        self.records.push((name.into(), rtype.into(), value.into()));
        self.write();
    }

    fn set_servfail(&mut self, names: &[&str]) {
        self.servfail = names.iter().map(|n| (*n).to_owned()).collect();
        self.write();
    }

    fn write(&self) {
        let json = serde_json::json!({ "records": self.records, "servfail": self.servfail });
        // Written whole and renamed: the server reads the file on every query.
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, json.to_string()).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

fn config(dir: &Path, pin: &Path, dns_port: u16, mx_port: u16, extra: &str) -> String {
    site_config(dir, pin, TOKEN)
        + &format!(
            r#"
[smtp]
hostname = "mx.a.test"
mx_listen = "127.0.0.1:0"
submission_listen = "127.0.0.1:0"

[imap]
listen = "127.0.0.1:0"

[dns]
servers = ["127.0.0.1"]
port = {dns_port}
timeout_s = 3

[mail_auth]
check = true

[queue]
mx_port = {mx_port}
retry = {{ delays_s = [1, 2] }}
{extra}"#
        )
}

/// Starts `qutemail serve` (its log on the test's standard error); returns it and its
/// `READY` line.
fn serve(config_path: &Path) -> (Running, String) {
    common::serve(config_path, Stdio::inherit())
}

fn folder(imap: &str, dir: &Path, name: &str) -> Vec<String> {
    let out = dir.join(format!("fetch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let ca = dir.join("ca.pem");
    let result = run_json(&[
        client("imap_folder.py").to_str().unwrap(),
        imap,
        ca.to_str().unwrap(),
        "alice@a.test",
        PASSWORD,
        name,
        out.to_str().unwrap(),
    ]);
    result["uids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            String::from_utf8(std::fs::read(out.join(format!("{}.eml", u.as_str().unwrap()))).unwrap())
                .unwrap()
        })
        .collect()
}

fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Common set-up: CA and server certificate, the DNS server, an account.
fn prepare(dir: &Path) -> (Zone, Running, u16) {
    write_tls(dir, "mail auth test CA", &["localhost", "127.0.0.1", "mx.a.test"]);
    let zone = Zone::new(dir.join("zone.json"));
    let (dns, port) = python_server("dns_server.py", &[&zone.path]);
    (zone, dns, port)
}

fn add_alice(config_path: &Path) {
    add_account(config_path, "alice@a.test", PASSWORD);
}

#[test]
fn outbound_mail_goes_to_the_mx_from_dns_dkim_signed_and_null_mx_bounces() {
    isolated("outbound_mail_goes_to_the_mx_from_dns_dkim_signed_and_null_mx_bounces", &[TOKEN], |env| {
        let dir = &env.dir;
        let (mut zone, _dns, dns_port) = prepare(dir);
        let sink_dir = dir.join("sink");
        std::fs::create_dir_all(&sink_dir).unwrap();
        let (_sink, sink_port) =
            python_server("smtp_sink.py", &[&dir.join("mail.pem"), &dir.join("mail.key"), &sink_dir]);
        let rsa = dir.join("dkim-rsa.pem");
        openssl(&["genrsa", "-out", rsa.to_str().unwrap(), "2048"]);
        let ed = dir.join("dkim-ed.pem");
        openssl(&["genpkey", "-algorithm", "ed25519", "-out", ed.to_str().unwrap()]);
        let extra = format!(
            "\n[dkim]\nselector = \"rsa1\"\nprivate_key = \"{}\"\nadditional_keys = [{{ selector = \"ed1\", \
             private_key = \"{}\" }}]\n",
            rsa.display(),
            ed.display()
        );
        let config_path = dir.join("qutemail.toml");
        std::fs::write(&config_path, config(dir, &env.pin_file, dns_port, sink_port, &extra)).unwrap();

        // What an operator publishes, printed by the gateway, served by the test DNS.
        let out = qutemailctl(&["dns"], &config_path, None);
        assert!(out.status.success(), "dns: {}", String::from_utf8_lossy(&out.stderr));
        let records = String::from_utf8(out.stdout).unwrap();
        let mut published = 0;
        for line in records.lines() {
            let Some((name, value)) = line.split_once(" IN TXT ") else { continue };
            let value: String = value.split('"').skip(1).step_by(2).collect();
            if name.contains("._domainkey.") {
                published += 1;
            }
            zone.add(name.trim_end_matches('.'), "TXT", &value);
        }
        assert_eq!(published, 2, "{records}");
        assert!(records.contains("rsa1._domainkey.a.test. IN TXT \"v=DKIM1; k=rsa; p="), "{records}");
        assert!(records.contains("ed1._domainkey.a.test. IN TXT \"v=DKIM1; k=ed25519; p="), "{records}");
        assert!(records.contains("_dmarc.a.test. IN TXT \"v=DMARC1;"), "{records}");
        zone.add("internet.test", "MX", "20 backup.internet.test");
        zone.add("internet.test", "MX", "10 mx.internet.test");
        zone.add("mx.internet.test", "A", "127.0.0.1");
        zone.add("nullmx.test", "MX", "0 .");

        add_alice(&config_path);
        let (_gateway, ready) = serve(&config_path);
        let submission = addr(&ready, "smtp-submission");
        let imap = addr(&ready, "imap");
        let body = dir.join("body.txt");
        std::fs::write(&body, "Hello from site A to the internet.\n").unwrap();
        let sent = dir.join("sent.eml");
        for (to, sent_file) in [("bob@internet.test", Some(&sent)), ("nobody@nullmx.test", None)] {
            let mut args = vec![
                client("submit.py").to_str().unwrap().to_owned(),
                submission.clone(),
                dir.join("ca.pem").to_str().unwrap().to_owned(),
                "alice@a.test".into(),
                PASSWORD.into(),
                "alice@a.test".into(),
                to.into(),
                "to the internet".into(),
                body.to_str().unwrap().to_owned(),
            ];
            if let Some(f) = sent_file {
                args.push(f.to_str().unwrap().to_owned());
            }
            let refused = run_json(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(refused, serde_json::json!({}), "submission to {to}");
        }

        // The MX (preference 10) got it, over STARTTLS, from alice, for bob.
        let envelope: Value = poll("the message at the internet MX", || {
            std::fs::read(sink_dir.join("1.json")).ok().map(|b| serde_json::from_slice(&b).unwrap())
        });
        assert_eq!(envelope["mail_from"], "alice@a.test");
        assert_eq!(envelope["rcpt_tos"], serde_json::json!(["bob@internet.test"]));
        assert_eq!(envelope["tls"], true, "opportunistic STARTTLS was offered and must be used");
        let received = std::fs::read(sink_dir.join("1.eml")).unwrap();
        let text = String::from_utf8_lossy(&received);
        let sealed = text.lines().any(|l| l.to_ascii_lowercase().starts_with("x-qkd-secure:"));
        assert!(!sealed, "normal mode, not a sealed envelope: {text}");
        let original = std::fs::read(&sent).unwrap();
        assert!(received.ends_with(&original), "the submitted message, unchanged, after the added headers");
        assert_eq!(text.matches("DKIM-Signature:").count(), 2, "{text}");
        assert!(text.contains("a=rsa-sha256") && text.contains("a=ed25519-sha256"), "{text}");

        // dkimpy, with its DNS at the test server, verifies both signatures.
        let eml = sink_dir.join("1.eml");
        let verdict = run_json(&[
            client("dkim_tool.py").to_str().unwrap(),
            "verify",
            &dns_port.to_string(),
            eml.to_str().unwrap(),
        ]);
        assert_eq!(verdict, serde_json::json!({"pass": true, "signatures": 2}), "dkimpy");

        // And so does mail-auth through the gateway's resolver code.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let results = runtime.block_on(async {
            let dns = qutemail_queue::dns::MailDns::new(&qutemail_queue::dns::DnsSettings {
                servers: vec!["127.0.0.1".parse().unwrap()],
                port: dns_port,
                timeout: Duration::from_secs(5),
            })
            .unwrap();
            let message = qutemail_queue::mail_auth::AuthenticatedMessage::parse(&received).unwrap();
            dns.authenticator()
                .verify_dkim(&message)
                .await
                .iter()
                .map(|o| o.result().clone())
                .collect::<Vec<_>>()
        });
        assert_eq!(results, vec![qutemail_queue::mail_auth::DkimResult::Pass; 2], "mail-auth");

        // The null-MX domain bounced at once: alice has a DSN saying why.
        let dsn = poll("the null-MX bounce", || {
            folder(&imap, dir, "INBOX").into_iter().find(|m| m.contains("nobody@nullmx.test"))
        });
        assert!(dsn.contains("Status: 5.1.10"), "{dsn}");
        assert!(dsn.contains("does not accept mail (null MX"), "{dsn}");
        assert!(!sink_dir.join("2.json").exists(), "nothing else reached the MX");
    });
}

/// A message from `from` (header and envelope), signed by dkimpy when `key` is given.
fn inbound_message(dir: &Path, name: &str, from: &str, key: Option<(&str, &Path)>, tamper: bool) -> PathBuf {
    let plain = dir.join(format!("{name}.plain.eml"));
    std::fs::write(
        &plain,
        format!(
            "From: <{from}>\r\nTo: <alice@a.test>\r\nSubject: {name}\r\n\
             Date: Thu, 26 Nov 2026 03:00:00 +0000\r\n\
             Message-ID: <{name}@test>\r\n\r\nThis is the {name} message.\r\n"
        ),
    )
    .unwrap();
    let Some((domain, key)) = key else { return plain };
    let signed = dir.join(format!("{name}.eml"));
    let out = Command::new(python())
        .arg(client("dkim_tool.py"))
        .args(["sign", domain, "s1"])
        .args([key, &plain, &signed])
        .output()
        .unwrap();
    assert!(out.status.success(), "dkim sign: {}", String::from_utf8_lossy(&out.stderr));
    if tamper {
        let text = std::fs::read_to_string(&signed).unwrap().replace("This is the", "This was the");
        std::fs::write(&signed, text).unwrap();
    }
    signed
}

fn send_mx(mx: &str, helo: &str, from: &str, message: &Path) -> (u64, String) {
    let result = run_json(&[
        client("mx_send.py").to_str().unwrap(),
        mx,
        helo,
        from,
        "alice@a.test",
        message.to_str().unwrap(),
    ]);
    (result["code"].as_u64().unwrap(), result["reply"].as_str().unwrap().to_owned())
}

#[test]
fn inbound_mail_is_judged_by_spf_dkim_and_dmarc() {
    isolated("inbound_mail_is_judged_by_spf_dkim_and_dmarc", &[TOKEN], |env| {
        let dir = &env.dir;
        let (mut zone, _dns, dns_port) = prepare(dir);
        let (pass_key, pass_record) = sender_key(dir, "pass");
        let (other_key, other_record) = sender_key(dir, "other");
        // pass.test: SPF and DKIM pass, DMARC reject (an authentic message still gets through).
        zone.add("pass.test", "TXT", "v=spf1 ip4:127.0.0.1 -all");
        zone.add("s1._domainkey.pass.test", "TXT", &pass_record);
        zone.add("_dmarc.pass.test", "TXT", "v=DMARC1; p=reject");
        // signed.test: SPF fails, so only its DKIM signature can authenticate it; DMARC none.
        zone.add("signed.test", "TXT", "v=spf1 ip4:192.0.2.1 -all");
        zone.add("s1._domainkey.signed.test", "TXT", &other_record);
        zone.add("_dmarc.signed.test", "TXT", "v=DMARC1; p=none");
        // forged.test: SPF fail, no signature, DMARC reject.
        zone.add("forged.test", "TXT", "v=spf1 ip4:192.0.2.1 -all");
        zone.add("_dmarc.forged.test", "TXT", "v=DMARC1; p=reject");
        // soft.test: SPF softfail, DMARC quarantine.
        zone.add("soft.test", "TXT", "v=spf1 ip4:192.0.2.1 ~all");
        zone.add("_dmarc.soft.test", "TXT", "v=DMARC1; p=quarantine");
        // flaky.test: its records exist but its DNS server fails for a while.
        zone.add("flaky.test", "TXT", "v=spf1 ip4:127.0.0.1 -all");
        zone.add("_dmarc.flaky.test", "TXT", "v=DMARC1; p=reject");
        zone.set_servfail(&["flaky.test", "_dmarc.flaky.test"]);

        let config_path = dir.join("qutemail.toml");
        std::fs::write(&config_path, config(dir, &env.pin_file, dns_port, 25, "")).unwrap();
        add_alice(&config_path);
        let (_gateway, ready) = serve(&config_path);
        let mx = addr(&ready, "smtp-mx");
        let imap = addr(&ready, "imap");

        let authentic =
            inbound_message(dir, "authentic", "news@pass.test", Some(("pass.test", &pass_key)), false);
        assert_eq!(send_mx(&mx, "mail.pass.test", "news@pass.test", &authentic).0, 250);
        let tampered =
            inbound_message(dir, "tampered", "x@signed.test", Some(("signed.test", &other_key)), true);
        assert_eq!(send_mx(&mx, "mail.signed.test", "x@signed.test", &tampered).0, 250);
        let intact =
            inbound_message(dir, "intact", "y@signed.test", Some(("signed.test", &other_key)), false);
        assert_eq!(send_mx(&mx, "mail.signed.test", "y@signed.test", &intact).0, 250);

        let forged = inbound_message(dir, "forged", "ceo@forged.test", None, false);
        let (code, reply) = send_mx(&mx, "mail.forged.test", "ceo@forged.test", &forged);
        assert_eq!(code, 550, "{reply}");
        assert!(
            reply.contains("5.7.1") && reply.contains("DMARC") && reply.contains("forged.test"),
            "{reply}"
        );

        let soft = inbound_message(dir, "soft", "promo@soft.test", None, false);
        assert_eq!(send_mx(&mx, "mail.soft.test", "promo@soft.test", &soft).0, 250);

        let flaky = inbound_message(dir, "flaky", "ops@flaky.test", None, false);
        let (code, reply) = send_mx(&mx, "mail.flaky.test", "ops@flaky.test", &flaky);
        assert_eq!(code, 451, "{reply}");
        assert!(reply.contains("4.7.0") && reply.contains("try again later"), "{reply}");
        // The sender's DNS recovers; its server retries later and the message gets through.
        zone.set_servfail(&[]);
        poll("the retried message to be accepted", || {
            let (code, reply) = send_mx(&mx, "mail.flaky.test", "ops@flaky.test", &flaky);
            assert!(code == 250 || code == 451, "{code} {reply}");
            (code == 250).then_some(())
        });

        let inbox = folder(&imap, dir, "INBOX");
        let junk = folder(&imap, dir, "Junk");
        let find = |box_: &[String], subject: &str| -> Option<String> {
            box_.iter().find(|m| m.contains(&format!("Subject: {subject}\r\n"))).cloned()
        };
        // The Authentication-Results field we added (its first line and continuation lines).
        let results = |m: &str| -> String {
            let mut lines =
                m.split("\r\n").skip_while(|l| !l.starts_with("Authentication-Results: mx.a.test;"));
            let first = lines.next().unwrap_or_else(|| panic!("no Authentication-Results in {m}"));
            let folded = lines.take_while(|l| l.starts_with([' ', '\t']));
            std::iter::once(first).chain(folded).collect::<Vec<_>>().join(" ")
        };

        let m = find(&inbox, "authentic").expect("authentic message in INBOX");
        let r = results(&m);
        for want in
            ["dkim=pass", "header.i=@pass.test", "spf=pass", "smtp.mailfrom=", "news@pass.test", "dmarc=pass"]
        {
            assert!(r.contains(want), "{want} in {r}");
        }
        let m = find(&inbox, "tampered").expect("tampered message in INBOX (DMARC p=none)");
        let r = results(&m);
        // mail-auth reports a body-hash mismatch as dkim=neutral with the reason (RFC 8601 § 2.7.1
        // leaves the choice between neutral and fail to the verifier): anything but pass.
        assert!(!r.contains("dkim=pass") && r.contains("body hash did not verify"), "{r}");
        assert!(r.contains("spf=fail") && r.contains("dmarc=fail"), "{r}");
        let m = find(&inbox, "intact").expect("intact message in INBOX");
        let r = results(&m);
        assert!(r.contains("dkim=pass") && r.contains("spf=fail") && r.contains("dmarc=pass"), "{r}");
        let m = find(&junk, "soft").expect("quarantined message in Junk");
        let r = results(&m);
        assert!(r.contains("spf=softfail") && r.contains("policy.dmarc=quarantine"), "{r}");
        assert!(find(&inbox, "soft").is_none(), "quarantined mail is not in the INBOX");
        let m = find(&inbox, "flaky").expect("the retried message in INBOX");
        assert!(results(&m).contains("spf=pass"), "{m}");
        assert!(
            find(&inbox, "forged").is_none() && find(&junk, "forged").is_none(),
            "a DMARC reject stores nothing"
        );
        assert_eq!(inbox.len(), 4, "authentic, tampered, intact, flaky: {inbox:?}");
        assert_eq!(junk.len(), 1);
    });
}
