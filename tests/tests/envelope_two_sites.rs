//! Issue 4's core promise, with every part real: the two-site demo (qkd-sim, two kmds, SoftHSM),
//! each site's gateway (`qutemail`) with its own site keys wrapped by its token. A message
//! sealed at A in each mode opens at B to the exact bytes, a 25 MB attachment included;
//! tampering and forged certificates are detected; no plaintext canary reaches any disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qutemail_e2e::{LiveDemo, files_containing, workspace_bin};

struct Gateway {
    domain: String,
    config: PathBuf,
    softhsm2_conf: PathBuf,
    card: PathBuf,
}

impl Gateway {
    fn run(&self, qutemail: &Path, args: &[&str]) -> Output {
        Command::new(qutemail)
            .arg(args[0])
            .arg("--config")
            .arg(&self.config)
            .args(&args[1..])
            .env("SOFTHSM2_CONF", &self.softhsm2_conf)
            .output()
            .expect("running qutemail")
    }
}

fn config_text(site: &serde_json::Value, work: &Path, peer: Option<(&serde_json::Value, &Path)>) -> String {
    let name = site["name"].as_str().unwrap();
    let mail = &site["saes"][0];
    let hsm = &site["hsm"];
    let mut text = format!(
        r#"[site]
domain = "{domain}"
site_keys = "{work}/site-keys-{name}.json"

[kmd]
etsi014_url = "{url}"
sae_id = "{sae}"
ca_cert = "{ca}"
client_cert = "{cert}"
client_key = "{key}"

[hsm]
module_path = "{module}"
token = {{ label = "{label}" }}
pin = {{ file = "{pin}" }}
wrapping_key_label = "qutemail-gateway-kek"

[policy]
keys_exhausted = "pqc"
"#,
        domain = site["domain"].as_str().unwrap(),
        work = work.display(),
        url = site["etsi014_url"].as_str().unwrap(),
        sae = mail["sae_id"].as_str().unwrap(),
        ca = site["ca_cert"].as_str().unwrap(),
        cert = mail["cert"].as_str().unwrap(),
        key = mail["key"].as_str().unwrap(),
        module = hsm["module_path"].as_str().unwrap(),
        label = hsm["token_label"].as_str().unwrap(),
        pin = hsm["pin_file"].as_str().unwrap(),
    );
    if let Some((peer, card)) = peer {
        text.push_str(&format!(
            "\n[[peer]]\ndomain = \"{}\"\nsae_id = \"{}\"\nkme_id = \"{}\"\nsite_card = \"{}\"\n",
            peer["domain"].as_str().unwrap(),
            peer["saes"][0]["sae_id"].as_str().unwrap(),
            peer["kme_id"].as_str().unwrap(),
            card.display()
        ));
    }
    text
}

/// `qutemailctl cert verify`: the offline check anyone holding the sender's card can run.
fn cert_verify(qutemailctl: &Path, sealed: &Path, sender_card: &Path) -> Output {
    Command::new(qutemailctl)
        .args(["cert", "verify", "--message"])
        .arg(sealed)
        .arg("--sender-card")
        .arg(sender_card)
        .output()
        .expect("running qutemailctl cert verify")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn failed(out: &Output, what: &str) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{what} should have failed but succeeded: {text}");
    text
}

/// An RFC 5322 message whose subject, body and attachment each hold a canary.
fn message(canaries: &[String; 3], attachment_bytes: usize, id: &str) -> Vec<u8> {
    let mut m = format!(
        "From: Alice <alice@a.qutemail.test>\r\nTo: Bob <bob@b.qutemail.test>\r\n\
         Date: Wed, 25 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{id}@a.qutemail.test>\r\n\
         Subject: quarterly figures {subject}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nDear Bob, the secret is {body}.\r\n--b1\r\n\
         Content-Type: text/plain; name=\"figures.txt\"\r\nContent-Disposition: attachment; filename=\"figures.txt\"\r\n\r\n",
        subject = canaries[0],
        body = canaries[1],
    )
    .into_bytes();
    let line = format!("{} row of figures 0123456789\r\n", canaries[2]);
    let mut written = 0;
    while written < attachment_bytes.max(1) {
        m.extend_from_slice(line.as_bytes());
        written += line.len();
    }
    m.extend_from_slice(b"--b1--\r\n");
    m
}

#[test]
fn sealed_at_a_opened_at_b_in_every_mode() {
    let demo = LiveDemo::start();
    let qutemail = workspace_bin("qutemail-gateway", "qutemail");
    let qutemailctl = workspace_bin("qutemail-gateway", "qutemailctl");
    let work = tempfile::tempdir().unwrap();
    // Plaintext the test itself writes (inputs and opened outputs) lives apart, in memory where
    // possible, and is excluded from the scan.
    let clear = tempfile::Builder::new().prefix("qutemail-clear").tempdir_in(shm_or_tmp()).unwrap();

    let (sa, sb) = (demo.site("A").clone(), demo.site("B").clone());
    let mut gateways = Vec::new();
    for (name, site) in [("A", &sa), ("B", &sb)] {
        let config = work.path().join(format!("qutemail-{name}.toml"));
        std::fs::write(&config, config_text(site, work.path(), None)).unwrap();
        let g = Gateway {
            domain: site["domain"].as_str().unwrap().to_owned(),
            config,
            softhsm2_conf: PathBuf::from(site["hsm"]["softhsm2_conf"].as_str().unwrap()),
            card: work.path().join(format!("card-{name}.json")),
        };
        ok(&g.run(&qutemail, &["site-card", "--out", g.card.to_str().unwrap()]), "site-card");
        gateways.push(g);
    }
    // Each site now knows the other's card.
    for (g, (me, peer, peer_card)) in
        gateways.iter().zip([(&sa, &sb, gateways[1].card.clone()), (&sb, &sa, gateways[0].card.clone())])
    {
        std::fs::write(&g.config, config_text(me, work.path(), Some((peer, &peer_card)))).unwrap();
    }
    let (a, b) = (&gateways[0], &gateways[1]);
    let card: serde_json::Value = serde_json::from_slice(&std::fs::read(&a.card).unwrap()).unwrap();
    assert_eq!(card["domain"], "a.qutemail.test");
    // The key file holds no secret in clear: only HSM-wrapped seeds and public keys.
    let keys_a: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("site-keys-A.json")).unwrap()).unwrap();
    assert_eq!(keys_a["kem_public_key"], card["kem_public_key"]);
    assert!(keys_a.get("wrapped_kem_seed").is_some());

    let id = uuid_like();
    let canaries =
        [format!("CANARY-SUBJECT-{id}"), format!("CANARY-BODY-{id}"), format!("CANARY-ATTACHMENT-{id}")];
    let cases: [(&str, usize); 5] = [
        ("hybrid", 10_000),
        ("qaes", 10_000),
        ("otp", 20_000),
        ("pqc", 10_000),
        ("hybrid", 25 * 1024 * 1024),
    ];
    for (i, (mode, size)) in cases.iter().enumerate() {
        let what = format!("{mode} ({size} bytes)");
        let plain = message(&canaries, *size, &format!("m{i}-{id}"));
        let input = clear.path().join(format!("in-{i}.eml"));
        std::fs::write(&input, &plain).unwrap();
        let sealed = work.path().join(format!("sealed-{i}.eml"));
        // A pad needs much key material: like the outbound queue, wait while kmd has too little.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let args =
                ["seal", "--to-domain", &b.domain, "--protection", mode, "--in", input.to_str().unwrap()];
            let out = a.run(&qutemail, &[&args[..], &["--out", sealed.to_str().unwrap()]].concat());
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            if out.status.success()
                || !text.contains("no QKD keys available")
                || std::time::Instant::now() > deadline
            {
                let text = ok(&out, &format!("seal {what}"));
                assert!(text.contains(&format!("with {mode} for b.qutemail.test")), "{what}: {text}");
                break;
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        let sealed_bytes = std::fs::read(&sealed).unwrap();
        let head = String::from_utf8_lossy(&sealed_bytes[..4096.min(sealed_bytes.len())]).into_owned();
        assert!(head.contains("X-QKD-Secure: True"), "{what}: {head}");
        assert!(!head.contains("quarterly figures"), "{what}: the real subject is outside: {head}");
        if *mode != "pqc" {
            assert!(head.contains("X-QKD-Key-ID:"), "{what}: {head}");
        }

        // Anyone holding A's public card can check the certificate offline, with no key.
        let out = cert_verify(&qutemailctl, &sealed, &a.card);
        let text = ok(&out, &format!("cert verify {what}"));
        assert!(text.contains("VERIFIED") && text.contains(&format!("mode          {mode}")), "{text}");
        if *mode != "pqc" {
            assert!(text.contains("link          link-a-b") && text.contains("KME-A -> KME-B"), "{text}");
        }

        let record = work.path().join(format!("record-{i}.json"));
        let text = ok(
            &b.run(
                &qutemail,
                &["accept", "--in", sealed.to_str().unwrap(), "--record", record.to_str().unwrap()],
            ),
            &format!("accept {what}"),
        );
        assert!(text.contains("certificate: verified"), "{what}: {text}");
        let opened = clear.path().join(format!("out-{i}.eml"));
        ok(
            &b.run(
                &qutemail,
                &[
                    "open",
                    "--in",
                    sealed.to_str().unwrap(),
                    "--record",
                    record.to_str().unwrap(),
                    "--out",
                    opened.to_str().unwrap(),
                ],
            ),
            &format!("open {what}"),
        );
        assert!(std::fs::read(&opened).unwrap() == plain, "{what}: B did not get the exact bytes A sealed");

        // kmd hands a decryption key out once: the same envelope cannot be accepted twice.
        if *mode != "pqc" {
            let again = work.path().join(format!("again-{i}.json"));
            let text = failed(
                &b.run(
                    &qutemail,
                    &["accept", "--in", sealed.to_str().unwrap(), "--record", again.to_str().unwrap()],
                ),
                "second accept",
            );
            assert!(text.contains("400") || text.to_lowercase().contains("not found"), "{text}");
        }
    }

    // Tampering, each on a fresh sealed message: the receiver refuses, never shows it as valid.
    let plain = message(&canaries, 2_000, &format!("t-{id}"));
    let input = clear.path().join("tamper.eml");
    std::fs::write(&input, &plain).unwrap();
    let tampers: [(&str, Tamper); 2] =
        [("a flipped ciphertext byte", flip_ciphertext), ("a changed To header", change_to)];
    for (what, tamper) in tampers {
        let sealed = work.path().join("tamper-sealed.eml");
        ok(
            &a.run(
                &qutemail,
                &[
                    "seal",
                    "--to-domain",
                    &b.domain,
                    "--protection",
                    "qaes",
                    "--in",
                    input.to_str().unwrap(),
                    "--out",
                    sealed.to_str().unwrap(),
                ],
            ),
            "seal for tampering",
        );
        std::fs::write(&sealed, tamper(std::fs::read(&sealed).unwrap())).unwrap();
        let record = work.path().join("tamper-record.json");
        let text = failed(
            &b.run(
                &qutemail,
                &["accept", "--in", sealed.to_str().unwrap(), "--record", record.to_str().unwrap()],
            ),
            what,
        );
        assert!(text.to_lowercase().contains("not verifiable"), "{what}: {text}");
        let out = cert_verify(&qutemailctl, &sealed, &a.card);
        assert!(failed(&out, what).contains("NOT VERIFIABLE"));
    }
    // A certificate checked against another site's key (a forgery claim) is not verifiable.
    let sealed = work.path().join("sealed-0.eml");
    let out = cert_verify(&qutemailctl, &sealed, &b.card);
    assert!(failed(&out, "verify with the wrong site's card").contains("NOT VERIFIABLE"));

    // No canary on any disk the gateways, the kmds or the HSM tokens wrote.
    let needles: Vec<&[u8]> = canaries.iter().map(|c| c.as_bytes()).collect();
    let hits = files_containing(&[work.path(), demo.dir.path()], &needles);
    assert!(hits.is_empty(), "plaintext on disk: {hits:?}");
    // ...while the test's own plaintext files do hold them (the scan can find what it looks for).
    assert!(!files_containing(&[clear.path()], &needles).is_empty());

    let (status, out) = demo.stop();
    assert!(status.success(), "demo: {out}");
}

/// Damages a sealed message.
type Tamper = fn(Vec<u8>) -> Vec<u8>;

fn flip_ciphertext(mut bytes: Vec<u8>) -> Vec<u8> {
    // In the middle of the base64 ciphertext part, swap one base64 letter for another.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let start = text.find("Content-Type: application/octet-stream").expect("ciphertext part");
    let body = start + text[start..].find("\r\n\r\n").expect("part body") + 4;
    let at = body + 40;
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    bytes
}

fn change_to(bytes: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let changed = text.replacen("To: Bob <bob@b.qutemail.test>", "To: Eve <eve@b.qutemail.test>", 1);
    assert_ne!(changed, text, "the outer To header is where the test expects it");
    changed.into_bytes()
}

fn shm_or_tmp() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() }
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{:x}-{}", nanos, std::process::id())
}
