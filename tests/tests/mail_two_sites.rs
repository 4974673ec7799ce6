//! Issue 5's promise with every part real: the two-site demo (qkd-sim, two kmds, SoftHSM, two
//! `qutemail serve` gateways). Alice submits with Python's smtplib (STARTTLS + AUTH) at site A;
//! A's queue seals the message with a fresh QKD key (hybrid with ML-KEM) and relays it over
//! STARTTLS to B, which verifies it with the key fetched once from its kmd and stores it as it
//! came. A message to a mailbox B does not have comes back to Alice as a delivery report. No
//! canary from subject or body is on any disk the demo wrote.

use std::process::Command;
use std::time::Duration;

use qutemail_e2e::{
    DemoGateway, LiveDemo, files_containing, pop3_fetch, python, submit, wait_for, workspace_root,
};

/// How long a delivery, a queue run or a report may take on a loaded machine.
const LIMIT: Duration = Duration::from_secs(150);

fn log(demo: &LiveDemo, name: &str) -> String {
    std::fs::read_to_string(demo.dir.path().join("logs").join(name)).unwrap_or_default()
}

#[test]
fn alice_at_a_mails_bob_at_b_sealed_with_qkd_keys() {
    let demo = LiveDemo::start();
    let a = demo.site("A").clone();
    let clear = tempfile::tempdir().unwrap();
    let id = format!(
        "{:x}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    );
    let canaries = [format!("CANARY-SUBJECT-{id}"), format!("CANARY-BODY-{id}")];
    let body = clear.path().join("body.txt");
    std::fs::write(&body, format!("Dear Bob,\nthe figures are {}.\n", canaries[1])).unwrap();

    // Bob is waiting in IMAP IDLE at B before Alice sends.
    let b_site = demo.site("B").clone();
    let idle_out = clear.path().join("idle.eml");
    let mut idle = Command::new(python())
        .arg(workspace_root().join("tests/clients/imap_idle_wait.py"))
        .arg(b_site["gateway"]["imap"].as_str().unwrap())
        .arg(b_site["gateway"]["tls_ca"].as_str().unwrap())
        .arg(b_site["users"][0]["address"].as_str().unwrap())
        .arg(b_site["users"][0]["password"].as_str().unwrap())
        .arg(&idle_out)
        .arg("120")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with imapclient (QUTEMAIL_PYTHON)");
    let mut idle_stdout = std::io::BufReader::new(idle.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut idle_stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "IDLING", "imapclient did not enter IDLE");

    let sent = clear.path().join("sent.eml");
    let refused = submit(&a, "bob@b.qutemail.test", &format!("figures {}", canaries[0]), &body, Some(&sent));
    assert_eq!(refused, "{}", "every recipient accepted");
    wait_for("delivery at B", LIMIT, || {
        log(&demo, "qutemail-B.log").contains("quantum-secured message delivered")
    });
    let b_log = log(&demo, "qutemail-B.log");
    assert!(b_log.contains("protection=hybrid"), "{b_log}");
    wait_for("A's queue to empty", LIMIT, || {
        DemoGateway::of(&demo, "A").qutemailctl(&["queue", "list"]).contains("the queue is empty")
    });
    let a_log = log(&demo, "qutemail-A.log");
    assert!(
        a_log.contains("message sealed for a peer site peer=b.qutemail.test protection=hybrid"),
        "{a_log}"
    );

    // Bob reads it over POP3 at B: the gateway's protection headers, then exactly what Alice's
    // client sent (after A's Received line, which is part of the sealed message).
    let fetched = clear.path().join("pop3");
    std::fs::create_dir(&fetched).unwrap();
    let messages = pop3_fetch(demo.site("B"), &fetched);
    assert_eq!(messages.len(), 1);
    let got = &messages[0];
    let sent = std::fs::read(&sent).unwrap();
    assert!(got.ends_with(&sent), "Bob's copy ends with the exact bytes Alice sent");
    let text = String::from_utf8_lossy(got).into_owned();
    assert!(text.starts_with("X-QKD-Secure: True\r\nX-QKD-Protection: hybrid\r\n"), "{text}");
    assert!(text.contains("X-QKD-Algorithm: QKD-MLKEM768-HKDF-SHA256-AES256GCM-STREAM\r\n"), "{text}");
    assert!(text.contains("X-QKD-Certificate: verified; signed by a.qutemail.test"), "{text}");
    assert!(text.contains("link link-a-b"), "{text}");

    // IDLE pushed it to Bob as it arrived, and it is the same message.
    let status = idle.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut idle_stdout, &mut rest).unwrap();
    assert!(status.success(), "IDLE saw no new mail: {rest}");
    assert_eq!(&std::fs::read(&idle_out).unwrap(), got, "the message IDLE announced is the one POP3 gives");

    // The same message over IMAP (imaplib, STARTTLS): BODY[] is what POP3 gave.
    let over_imap = clear.path().join("imap");
    std::fs::create_dir(&over_imap).unwrap();
    let b = demo.site("B");
    let out = Command::new(python())
        .arg(workspace_root().join("tests/clients/imap_fetch.py"))
        .arg(b["gateway"]["imap"].as_str().unwrap())
        .arg(b["gateway"]["tls_ca"].as_str().unwrap())
        .arg(b["users"][0]["address"].as_str().unwrap())
        .arg(b["users"][0]["password"].as_str().unwrap())
        .arg(&over_imap)
        .output()
        .unwrap();
    assert!(out.status.success(), "imaplib: {}", String::from_utf8_lossy(&out.stderr));
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uid = listing["uids"][0].as_str().unwrap();
    assert_eq!(&std::fs::read(over_imap.join(format!("{uid}.eml"))).unwrap(), got, "IMAP and POP3 agree");

    // A mailbox B does not have: B refuses at RCPT, A's queue bounces, Alice gets a report.
    let refused = submit(&a, "nobody@b.qutemail.test", "to nobody", &body, None);
    assert_eq!(refused, "{}", "A accepts it for relaying");
    wait_for("the bounce report", LIMIT, || {
        log(&demo, "qutemail-A.log").contains("delivery status notification sent to the sender")
    });
    assert!(log(&demo, "qutemail-A.log").contains("status=5.1.1"));

    // No canary on any disk: the gateways' stores and queues, the kmds, the tokens, the logs.
    let needles: Vec<&[u8]> = canaries.iter().map(|c| c.as_bytes()).collect();
    let hits = files_containing(&[demo.dir.path()], &needles);
    assert!(hits.is_empty(), "plaintext on disk: {hits:?}");
    assert!(!files_containing(&[clear.path()], &needles).is_empty(), "the scan finds what it looks for");
    let (status, out) = demo.stop();
    assert!(status.success(), "{out}");
}
