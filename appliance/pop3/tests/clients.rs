//! Real POP3 clients against the server over real TLS: Python's poplib (STLS and POP3_SSL),
//! curl (pop3:// with --ssl-reqd, pop3s://) and fetchmail (into an MDA, with and without
//! `keep`). The server runs on 127.0.0.1 over a real store (SQLite, and PostgreSQL for the
//! poplib core) and a vault on a throw-away SoftHSM token. A missing client fails the test.

mod common;

use std::process::Command;

use common::*;
use qutemail_hsm::testing::isolated;
use qutemail_store::Backend;

/// The poplib walk through the protocol every backend must pass.
async fn poplib_core(site: &Site) {
    site.poplib("capa").await;

    let read = site.poplib("read").await;
    let listed: Vec<String> = read["uidl"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().split(' ').nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(listed, site.unique_ids().await, "UIDL lists the store's stable unique ids");

    site.poplib("dele-rset").await;
    assert_eq!(site.count().await, 3, "DELE undone by RSET removes nothing");

    site.poplib("drop").await;
    assert_eq!(site.count().await, 3, "a connection dropped after DELE removes nothing");
    // The dropped session's lock goes with its connection; give the server a moment to see
    // the hang-up before the next login (the in-use scenario fails if the lock is still held).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    site.poplib("in-use").await;
    site.poplib("auth-plain").await;

    let before = site.unique_ids().await;
    let deleted = site.poplib("dele-quit").await["deleted_uidl"].as_str().unwrap().to_owned();
    let after = site.unique_ids().await;
    assert_eq!(deleted, before[0], "DELE 1 + QUIT deleted the first message");
    assert_eq!(after, before[1..].to_vec(), "only that message is gone");
}

#[test]
fn poplib_over_stls_and_pop3s_on_sqlite() {
    isolated("poplib_over_stls_and_pop3s_on_sqlite", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Sqlite).await;
            poplib_core(&site).await;
            // Last: it leaves this client address (127.0.0.1) refused.
            site.poplib("bad-logins").await;
            // Alice from another address still gets in (delayed, not locked out).
            let mut alice = site.tls_client_from("127.0.0.2").await;
            assert!(alice.cmd("QUIT").await.starts_with("+OK"));
        })
    });
}

#[test]
fn poplib_over_stls_and_pop3s_on_postgres() {
    isolated("poplib_over_stls_and_pop3s_on_postgres", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Postgres).await;
            poplib_core(&site).await;
        })
    });
}

fn curl(site: &Site, url: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(require("curl", "apt-get install -y curl"));
    c.args(["--silent", "--show-error", "--fail", "--max-time", "30", "--cacert"])
        .arg(&site.ca_file)
        .args(["--user", &format!("{USER}:{PASSWORD}")])
        .args(extra)
        .arg(url);
    c
}

#[test]
fn curl_lists_and_retrieves_over_stls_and_pop3s() {
    isolated("curl_lists_and_retrieves_over_stls_and_pop3s", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Sqlite).await;
            let presented = site.presented().await;

            // STLS on the plain port, required.
            let stls = format!("pop3://127.0.0.1:{}/", site.plain_port);
            let out = run(&mut curl(&site, &stls, &["--ssl-reqd"])).await;
            assert_success("curl LIST over STLS", &out);
            let expected_list: String =
                presented.iter().enumerate().map(|(i, m)| format!("{} {}\r\n", i + 1, m.len())).collect();
            assert_eq!(String::from_utf8_lossy(&out.stdout), expected_list);

            for n in [1usize, 2, 3] {
                let out = run(&mut curl(&site, &format!("{stls}{n}"), &["--ssl-reqd"])).await;
                assert_success("curl RETR over STLS", &out);
                assert!(
                    out.stdout == presented[n - 1],
                    "curl RETR {n} over STLS got other bytes than presented"
                );
            }

            // Implicit TLS.
            let pop3s = format!("pop3s://127.0.0.1:{}/", site.tls_port);
            let out = run(&mut curl(&site, &pop3s, &[])).await;
            assert_success("curl LIST over pop3s", &out);
            assert_eq!(String::from_utf8_lossy(&out.stdout), expected_list);
            let out = run(&mut curl(&site, &format!("{pop3s}2"), &[])).await;
            assert_success("curl RETR over pop3s", &out);
            assert!(out.stdout == presented[1], "curl RETR 2 over pop3s got other bytes than presented");

            // Not asked to use TLS, curl tries USER/PASS in the clear: refused (67: login denied).
            let out = run(&mut curl(&site, &stls, &[])).await;
            assert_eq!(
                out.status.code(),
                Some(67),
                "curl without TLS: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        })
    });
}

/// fetchmail's run control file: poll this server, deliver each message to `deliver.sh`.
fn fetchmail_rc(site: &Site, implicit_tls: bool, keep: bool) -> std::path::PathBuf {
    let home = site.dir.join("fetchmail");
    std::fs::create_dir_all(home.join("inbox")).unwrap();
    let mda = home.join("deliver.sh");
    std::fs::write(&mda, "#!/bin/sh\nexec cat > \"$(mktemp \"$FETCHMAIL_TEST_INBOX/msg-XXXXXX\")\"\n")
        .unwrap();
    let (port, tls) = if implicit_tls {
        (site.tls_port, "ssl sslproto tls1.2+")
    } else {
        // No `ssl` but a TLS protocol: fetchmail must use STLS and fails without it.
        (site.plain_port, "sslproto tls1.2+")
    };
    let rc = format!(
        "set no syslog\nset no bouncemail\n\
         poll localhost via 127.0.0.1 protocol POP3 port {port} uidl timeout 30\n\
         \tuser \"{USER}\" there with password \"{PASSWORD}\" is \"tester\" here\n\
         \t{tls} sslcertck sslcertfile \"{ca}\" sslcommonname \"localhost\"\n\
         \tmda \"/bin/sh {mda}\"\n\t{keep}\n",
        ca = site.ca_file.display(),
        mda = mda.display(),
        keep = if keep { "keep" } else { "no keep" },
    );
    let path = home.join("fetchmailrc");
    std::fs::write(&path, rc).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

async fn fetchmail(site: &Site, rc: &std::path::Path) -> std::process::Output {
    let home = site.dir.join("fetchmail");
    let mut c = Command::new(require("fetchmail", "apt-get install -y fetchmail"));
    c.arg("-f")
        .arg(rc)
        .arg("--idfile")
        .arg(home.join("fetchids"))
        .arg("--pidfile")
        .arg(home.join("fetchmail.pid"))
        .args(["--nodetach", "--verbose"])
        .env("HOME", &home)
        .env("FETCHMAIL_TEST_INBOX", home.join("inbox"));
    run(&mut c).await
}

fn delivered(site: &Site) -> Vec<Vec<u8>> {
    let mut files: Vec<_> =
        std::fs::read_dir(site.dir.join("fetchmail/inbox")).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    files.into_iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// The message as delivered by fetchmail (which adds a Received: line and hands the MDA LF
/// line ends) still holds every line of the presented message, in order.
fn holds(delivered: &[u8], presented: &[u8]) -> bool {
    let delivered = String::from_utf8_lossy(delivered).replace("\r\n", "\n");
    let presented = String::from_utf8_lossy(presented).replace("\r\n", "\n");
    delivered.ends_with(&presented)
}

#[test]
fn fetchmail_keeps_with_uidl_then_downloads_and_deletes() {
    isolated("fetchmail_keeps_with_uidl_then_downloads_and_deletes", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Sqlite).await;
            let presented = site.presented().await;

            // keep, over STLS: everything downloaded, nothing removed.
            let rc = fetchmail_rc(&site, false, true);
            let out = fetchmail(&site, &rc).await;
            assert_success("fetchmail (keep, STLS)", &out);
            let log =
                String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
            let (stls, user) = (log.find("POP3> STLS"), log.find("POP3> USER"));
            assert!(
                stls.is_some() && user.is_some() && stls < user,
                "fetchmail logged in after STLS:\n{log}"
            );
            let got = delivered(&site);
            assert_eq!(got.len(), 3, "fetchmail delivered every message");
            for p in &presented {
                assert!(got.iter().any(|d| holds(d, p)), "a presented message was not delivered intact");
            }
            assert_eq!(site.count().await, 3, "keep leaves the messages on the server");

            // Again: UIDL tracking finds nothing new (fetchmail exits 1, "no mail").
            let out = fetchmail(&site, &rc).await;
            assert_eq!(out.status.code(), Some(1), "second run: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(delivered(&site).len(), 3, "nothing fetched twice");

            // A new message arrives: only it is fetched.
            site.deliver(b"From: erin@a.example\r\nSubject: later\r\n\r\nnew one\r\n".to_vec()).await;
            let out = fetchmail(&site, &rc).await;
            assert_success("fetchmail (keep, new message)", &out);
            assert_eq!(delivered(&site).len(), 4, "exactly the new message was fetched");

            // Without keep, over implicit TLS: fetched and deleted on the server.
            let rc = fetchmail_rc(&site, true, false);
            let _ = std::fs::remove_file(site.dir.join("fetchmail/fetchids"));
            let out = fetchmail(&site, &rc).await;
            assert_success("fetchmail (no keep, pop3s)", &out);
            assert_eq!(delivered(&site).len(), 8, "all four fetched again (the id file was removed)");
            assert_eq!(site.count().await, 0, "without keep the server's messages are deleted");
        })
    });
}
