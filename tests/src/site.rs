//! What the two-site tests do to a demo site as its users and its monitoring would: submit
//! with smtplib, read a maildrop with poplib, scrape the gateway's metrics.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::workspace_root;

/// The Python that runs the test clients (`QUTEMAIL_PYTHON`, the venv `cargo xtask test` makes).
pub fn python() -> String {
    std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The site's first user submits `body` (a text file) to `to` with smtplib (STARTTLS, AUTH);
/// the exact bytes sent are kept in `sent` when given. Returns what `submit.py` printed (the
/// refused recipients as JSON: `{}` when every one was accepted).
pub fn submit(site: &serde_json::Value, to: &str, subject: &str, body: &Path, sent: Option<&Path>) -> String {
    let user = &site["users"][0];
    let out = Command::new(python())
        .arg(workspace_root().join("tests/clients/submit.py"))
        .arg(site["gateway"]["smtp_submission"].as_str().unwrap())
        .arg(site["gateway"]["tls_ca"].as_str().unwrap())
        .arg(user["address"].as_str().unwrap())
        .arg(user["password"].as_str().unwrap())
        .arg(user["address"].as_str().unwrap())
        .arg(to)
        .arg(subject)
        .arg(body)
        .args(sent)
        .output()
        .expect("python3 (QUTEMAIL_PYTHON)");
    assert!(out.status.success(), "smtplib submission failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The site's first user's maildrop over POP3 (poplib, STLS), written to `out` as `N.eml`;
/// returns the messages as the server sent them (each `LIST` size checked against its bytes).
pub fn pop3_fetch(site: &serde_json::Value, out: &Path) -> Vec<Vec<u8>> {
    let user = &site["users"][0];
    let result = Command::new(python())
        .arg(workspace_root().join("tests/clients/pop3_fetch.py"))
        .arg(site["gateway"]["pop3"].as_str().unwrap())
        .arg(site["gateway"]["tls_ca"].as_str().unwrap())
        .arg(user["address"].as_str().unwrap())
        .arg(user["password"].as_str().unwrap())
        .arg(out)
        .output()
        .expect("python3 (QUTEMAIL_PYTHON)");
    assert!(result.status.success(), "poplib: {}", String::from_utf8_lossy(&result.stderr));
    let listing: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    let count = listing["count"].as_u64().unwrap();
    (1..=count)
        .map(|n| {
            let bytes = std::fs::read(out.join(format!("{n}.eml"))).unwrap();
            assert_eq!(
                listing["sizes"][n as usize - 1].as_u64(),
                Some(bytes.len() as u64),
                "LIST size = RETR octets"
            );
            bytes
        })
        .collect()
}

/// The site's gateway metrics (`state.json` `sites.X.gateway.metrics`), scraped over HTTP.
pub fn gateway_metrics(site: &serde_json::Value) -> String {
    let url = site["gateway"]["metrics"].as_str().unwrap();
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_once('/').unwrap();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(conn, "GET /{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of `series` (name and labels as exposed) in Prometheus text, 0 when absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// `user`'s INBOX at the site over IMAPS, read with curl as a mail client would (`UID SEARCH
/// ALL`, then `UID FETCH n BODY[]` each): the messages' exact bytes, in UID order. The
/// credentials reach curl on its standard input, not its command line.
pub fn imaps_inbox(site: &serde_json::Value, user: &str, password: &str) -> Vec<Vec<u8>> {
    let base = format!("imaps://{}/INBOX", site["gateway"]["imaps"].as_str().unwrap());
    let ca = site["gateway"]["tls_ca"].as_str().unwrap();
    let curl = |url: &str, request: Option<&str>| -> Vec<u8> {
        let mut cmd = Command::new("curl");
        cmd.args(["--config", "-", "--silent", "--show-error", "--max-time", "60", "--cacert", ca, url]);
        if let Some(r) = request {
            cmd.args(["--request", r]);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("curl (apt-get install -y curl)");
        writeln!(child.stdin.take().unwrap(), "user = \"{user}:{password}\"").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let listing = String::from_utf8(curl(&base, Some("UID SEARCH ALL"))).unwrap();
    let uids = listing.lines().find_map(|l| l.strip_prefix("* SEARCH")).expect("an untagged SEARCH");
    uids.split_whitespace().map(|uid| curl(&format!("{base}/;UID={uid}"), None)).collect()
}
