//! The real tokio server on 127.0.0.1 driven by real SMTP clients: Python's smtplib and swaks.
//! A missing `python3` or `swaks` fails these tests with the install hint (never skipped).

mod common;

use common::{MAX_SIZE, run_tool_async, site};
use serde_json::Value;

const PYTHON_HINT: &str = "install Python 3 (Debian: apt-get install -y python3)";
const SWAKS_HINT: &str = "install swaks (Debian: apt-get install -y swaks)";

/// Runs a Python program (smtplib is in the standard library); returns its JSON output.
async fn python(program: &str, args: &[String]) -> Value {
    let mut argv = vec!["-c".to_owned(), program.to_owned()];
    argv.extend_from_slice(args);
    let out = run_tool_async("python3", PYTHON_HINT, argv).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("python printed no JSON ({e}): {stdout}"))
}

const SUBMISSION_SCRIPT: &str = r#"
import json, smtplib, ssl, sys
port, ca, big_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
r = {}
with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as s:
    s.ehlo()
    r["before_tls"] = sorted(s.esmtp_features)
    r["mail_before_tls"] = s.mail("alice@local.test")[0]
    s.starttls(context=ctx)
    s.ehlo()
    r["after_tls"] = sorted(s.esmtp_features)
    r["size_limit"] = int(s.esmtp_features["size"])
    r["mail_before_auth"] = s.mail("alice@local.test")[0]
    s.rset()
    code, _ = s.login("alice", "secret")  # smtplib prefers PLAIN over LOGIN
    r["auth_plain"] = code
    # SIZE refusal at MAIL FROM.
    code, msg = s.mail("alice@local.test", ["SIZE=%d" % (r["size_limit"] + 1)])
    r["size_refusal"] = [code, msg.decode()]
    s.rset()
    # Pipelined RCPTs: MAIL and three RCPTs in one write, then the four replies.
    s.send("MAIL FROM:<alice@local.test>\r\nRCPT TO:<bob@local.test>\r\nRCPT TO:<nobody@local.test>\r\n"
           "RCPT TO:<dave@remote.example>\r\n")
    r["pipelined"] = [s.getreply()[0] for _ in range(4)]
    code, _ = s.data(b"Subject: pipelined\r\n\r\nthree recipients, one refused\r\n")
    r["pipelined_data"] = code
    # A 10 MB message, with dot lines that must survive stuffing.
    big = open(big_file, "rb").read()
    refused = s.sendmail("alice@local.test", ["bob@local.test"], big)
    r["big_refused"] = list(refused)
    # 8BITMIME with UTF-8 content.
    body = "Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\nContent-Type: text/plain; charset=utf-8\r\n" \
           "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Zürich\r\n"
    s.sendmail("alice@local.test", ["bob@local.test"], body.encode("utf-8"), mail_options=["BODY=8BITMIME"])
    # Sending as someone else is refused by the host.
    code, _ = s.mail("bob@local.test")
    r["foreign_sender"] = code
print(json.dumps(r))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn smtplib_submission_with_starttls_auth_size_pipelining_10mb_and_8bitmime() {
    let site = site().await;
    // The 10 MB message: many lines, some starting with dots.
    let mut big = b"From: alice@local.test\r\nTo: bob@local.test\r\nSubject: big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while big.len() < 10 * 1024 * 1024 {
        let line = if i.is_multiple_of(50) {
            format!(".dot line {i}\r\n")
        } else {
            format!("line {i} {}\r\n", "z".repeat(70))
        };
        big.extend_from_slice(line.as_bytes());
        i += 1;
    }
    let big_file = site.pki.dir.path().join("big.eml");
    std::fs::write(&big_file, &big).expect("write message");
    let r = python(
        SUBMISSION_SCRIPT,
        &[
            site.submission.port().to_string(),
            site.pki.ca_file.display().to_string(),
            big_file.display().to_string(),
        ],
    )
    .await;

    let features = |key: &str| -> Vec<String> {
        r[key].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
    };
    assert!(features("before_tls").contains(&"starttls".to_owned()));
    assert!(!features("before_tls").contains(&"auth".to_owned()), "AUTH must not be offered before TLS");
    assert_eq!(r["mail_before_tls"], 530);
    assert!(features("after_tls").contains(&"auth".to_owned()));
    assert!(!features("after_tls").contains(&"starttls".to_owned()));
    assert_eq!(r["size_limit"], MAX_SIZE);
    assert_eq!(r["mail_before_auth"], 530);
    assert_eq!(r["auth_plain"], 235);
    assert_eq!(r["size_refusal"][0], 552);
    assert!(r["size_refusal"][1].as_str().unwrap().starts_with("5.3.4 "), "{}", r["size_refusal"]);
    assert_eq!(r["pipelined"], serde_json::json!([250, 250, 550, 250]));
    assert_eq!(r["pipelined_data"], 250);
    assert_eq!(r["big_refused"], serde_json::json!([]));
    assert_eq!(r["foreign_sender"], 553);

    let delivered = site.host.delivered();
    assert_eq!(delivered.len(), 3);
    let rcpts: Vec<String> = delivered[0].envelope.recipients.iter().map(|r| r.address.to_string()).collect();
    assert_eq!(rcpts, ["bob@local.test", "dave@remote.example"]);
    assert_eq!(delivered[1].body(), &big[..], "the 10 MB message arrives byte for byte");
    let header = delivered[1].received_header();
    assert!(header.contains("from client.test ([127.0.0.1])"), "{header}");
    assert!(header.contains("with ESMTPSA (TLSv1.3 cipher TLS_"), "{header}");
    assert!(header.contains("(authenticated user alice)"), "{header}");
    assert_eq!(delivered[2].envelope.params.body, qutemail_smtp::BodyType::EightBitMime);
    assert!(String::from_utf8_lossy(delivered[2].body()).contains("Grüße aus Zürich"));
}

const LOGIN_SCRIPT: &str = r#"
import json, smtplib, ssl, sys
port, ca, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
r = {}
if mode == "implicit":
    s = smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="client.test", context=ctx, timeout=30)
else:
    s = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30)
    s.starttls(context=ctx)
s.ehlo()
s.user, s.password = "carol", "wrong"
try:
    s.auth("LOGIN", s.auth_login, initial_response_ok=False)
    r["wrong"] = 235
except smtplib.SMTPAuthenticationError as e:
    r["wrong"] = [e.smtp_code, e.smtp_error.decode()]
s.user, s.password = "carol", "c-pass"
r["login"] = s.auth("LOGIN", s.auth_login, initial_response_ok=False)[0]
s.sendmail("carol@local.test", ["bob@local.test"], b"Subject: login\r\n\r\nvia LOGIN\r\n")
r["quit"] = s.quit()[0]
print(json.dumps(r))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn smtplib_auth_login_over_starttls_and_implicit_tls() {
    let site = site().await;
    for (port, mode) in [(site.submission.port(), "starttls"), (site.implicit_tls.port(), "implicit")] {
        let r =
            python(LOGIN_SCRIPT, &[port.to_string(), site.pki.ca_file.display().to_string(), mode.into()])
                .await;
        assert_eq!(r["wrong"][0], 535, "{mode}: {r}");
        assert!(r["wrong"][1].as_str().unwrap().starts_with("5.7.8 "), "{mode}: {r}");
        assert_eq!(r["login"], 235, "{mode}");
        assert_eq!(r["quit"], 221, "{mode}");
    }
    let delivered = site.host.delivered();
    assert_eq!(delivered.len(), 2);
    assert!(delivered.iter().all(|d| d.envelope.session.authenticated_as.as_deref() == Some("carol")));
}

const VERIFY_SCRIPT: &str = r#"
import json, smtplib, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
r = {}
s = smtplib.SMTP("localhost", port, local_hostname="client.test", timeout=30)
try:
    s.starttls(context=ssl.create_default_context())  # system roots: must not trust the test CA
    r["untrusted"] = "accepted"
except ssl.SSLCertVerificationError as e:
    r["untrusted"] = "refused"
print(json.dumps(r))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn smtplib_refuses_the_certificate_without_the_test_ca() {
    // Proves the STARTTLS tests above really verify: the same certificate fails without the CA.
    let site = site().await;
    let r =
        python(VERIFY_SCRIPT, &[site.mx.port().to_string(), site.pki.ca_file.display().to_string()]).await;
    assert_eq!(r["untrusted"], "refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn swaks_submits_with_starttls_and_auth_plain() {
    let site = site().await;
    let args = [
        "--server",
        &format!("127.0.0.1:{}", site.submission.port()),
        "--ehlo",
        "swaks.test",
        "--from",
        "alice@local.test",
        "--to",
        "bob@local.test",
        "--tls",
        "--tls-verify",
        "--tls-ca-path",
        &site.pki.ca_file.display().to_string(),
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "secret",
        "--header",
        "Subject: from swaks",
        "--body",
        "hello from swaks",
    ]
    .map(str::to_owned)
    .to_vec();
    let out = run_tool_async("swaks", SWAKS_HINT, args).await;
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "swaks failed:\n{transcript}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(transcript.contains("<-  220 2.0.0 Ready to start TLS"), "{transcript}");
    assert!(transcript.contains("=== TLS started with cipher TLSv1.3"), "{transcript}");
    assert!(transcript.contains("<~  235 2.7.0 Authentication successful"), "{transcript}");
    let delivered = site.host.delivered();
    assert_eq!(delivered.len(), 1);
    assert!(String::from_utf8_lossy(delivered[0].body()).contains("hello from swaks"));
    assert_eq!(delivered[0].envelope.session.helo.as_deref(), Some("swaks.test"));
}

#[tokio::test(flavor = "multi_thread")]
async fn swaks_to_a_non_local_domain_on_mx_is_refused_550_5_7_1() {
    let site = site().await;
    let args = [
        "--server",
        &format!("127.0.0.1:{}", site.mx.port()),
        "--from",
        "someone@remote.example",
        "--to",
        "victim@elsewhere.example",
    ]
    .map(str::to_owned)
    .to_vec();
    let out = run_tool_async("swaks", SWAKS_HINT, args).await;
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "relaying must fail:\n{transcript}");
    assert!(transcript.contains("<** 550 5.7.1 Relaying denied"), "{transcript}");
    assert!(site.host.delivered().is_empty());
}
