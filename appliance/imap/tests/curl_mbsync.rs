//! Two more real clients: `curl` (imap:// with STARTTLS required, and imaps://) listing and
//! fetching, and `mbsync` (isync) syncing a 1,000-message mailbox both ways to a Maildir, then
//! syncing again with nothing to do. Missing tools fail with the install hint.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{ALICE, ALICE_PASSWORD, Site, TOKEN, message, run_tool, runtime};
use qutemail_hsm::testing::isolated;
use qutemail_store::Backend;

const CURL_HINT: &str = "install curl (Debian: apt-get install -y curl)";
const MBSYNC_HINT: &str = "install mbsync (Debian: apt-get install -y isync)";

async fn curl(site: &Site, url: String, extra: &[&str]) -> Vec<u8> {
    let mut args = vec![
        "--silent".to_owned(),
        "--show-error".to_owned(),
        "--cacert".to_owned(),
        site.ca_file.display().to_string(),
        "--user".to_owned(),
        format!("{ALICE}:{ALICE_PASSWORD}"),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args.push(url);
    let out =
        tokio::task::spawn_blocking(move || run_tool("curl", CURL_HINT, &args, &[])).await.expect("curl");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn curl_lists_and_fetches_over_starttls_and_imaps() {
    isolated("curl_lists_and_fetches_over_starttls_and_imaps", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Sqlite).await;
            let sent = message("for curl", "fetched by curl");
            let uid = site.deliver(&site.alice, "INBOX", &sent).await;
            let presented = site.presented(&site.alice, "INBOX", uid).await;

            // imap:// with --ssl-reqd: curl must upgrade with STARTTLS before it logs in.
            let list = curl(&site, format!("imap://127.0.0.1:{}/", site.plain.port()), &["--ssl-reqd"]).await;
            let list = String::from_utf8_lossy(&list);
            assert!(list.contains("* LIST (\\Sent \\HasNoChildren) \"/\" \"Sent\""), "{list}");
            assert!(list.contains("\"INBOX\""), "{list}");
            let body = curl(
                &site,
                format!("imap://127.0.0.1:{}/INBOX;UID={uid}", site.plain.port()),
                &["--ssl-reqd"],
            )
            .await;
            assert_eq!(body, presented, "curl gets exactly the presented message");

            let body =
                curl(&site, format!("imaps://127.0.0.1:{}/INBOX;UID={uid}", site.tls.port()), &[]).await;
            assert_eq!(body, presented);
            let search =
                curl(&site, format!("imaps://127.0.0.1:{}/INBOX?SUBJECT%20curl", site.tls.port()), &[]).await;
            assert_eq!(String::from_utf8_lossy(&search).trim(), format!("* SEARCH {uid}"));

            // Without --ssl-reqd curl would log in in the clear; the server refuses that.
            let out = tokio::task::spawn_blocking({
                let args = vec![
                    "--silent".to_owned(),
                    "--user".to_owned(),
                    format!("{ALICE}:{ALICE_PASSWORD}"),
                    format!("imap://127.0.0.1:{}/", site.plain.port()),
                ];
                move || run_tool("curl", CURL_HINT, &args, &[])
            })
            .await
            .expect("curl");
            assert!(!out.status.success(), "a login without TLS must fail");
        })
    });
}

/// Every file of a Maildir tree: path (relative) → contents.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let e = e.expect("entry");
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("prefix").display().to_string();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

fn mbsync(config: &Path) -> (bool, String) {
    let args =
        vec!["--config".to_owned(), config.display().to_string(), "--all".to_owned(), "--verbose".to_owned()];
    let out = run_tool("mbsync", MBSYNC_HINT, &args, &[]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn mbsync_syncs_1000_messages_both_ways_and_a_second_run_changes_nothing() {
    isolated("mbsync_syncs_1000_messages_both_ways_and_a_second_run_changes_nothing", &[TOKEN], |env| {
        runtime().block_on(async {
            let site = Site::start(env, Backend::Sqlite).await;
            let inbox = site.mailbox(&site.alice, "INBOX").await;
            let mut tasks = Vec::new();
            for chunk in 0..8u32 {
                let vault = site.vault.clone();
                let store = site.store.store.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..125u32 {
                        let n = chunk * 125 + i;
                        let body = format!("message number {n}\r\n{}", "x".repeat(200));
                        vault
                            .append_plain(
                                &store,
                                inbox.id,
                                qutemail_vault::Protection::Normal,
                                &qutemail_vault::AppendRequest::default(),
                                zeroize::Zeroizing::new(message(&format!("sync {n}"), &body)),
                            )
                            .await
                            .expect("append");
                    }
                }));
            }
            for t in tasks {
                t.await.expect("append task");
            }
            let maildir = site.dir.path().join("Mail");
            std::fs::create_dir_all(&maildir).expect("maildir");
            let config = site.dir.path().join("mbsyncrc");
            std::fs::write(
                &config,
                format!(
                    "IMAPAccount qutemail\nHost localhost\nPort {port}\nUser {ALICE}\nPass \"{ALICE_PASSWORD}\"\n\
                     SSLType IMAPS\nCertificateFile {ca}\n\n\
                     IMAPStore remote\nAccount qutemail\n\n\
                     MaildirStore local\nPath {dir}/\nInbox {dir}/INBOX\nSubFolders Verbatim\n\n\
                     Channel sync\nFar :remote:\nNear :local:\nPatterns INBOX Sent\nCreate Near\nSync All\n\
                     Expunge Both\nSyncState *\n",
                    port = site.tls.port(),
                    ca = site.ca_file.display(),
                    dir = maildir.display(),
                ),
            )
            .expect("config");

            let cfg = config.clone();
            let (ok, out) = tokio::task::spawn_blocking(move || mbsync(&cfg)).await.expect("mbsync");
            assert!(ok, "first mbsync run failed:\n{out}");
            let first = snapshot(&maildir.join("INBOX"));
            let mails: Vec<&Vec<u8>> =
                first.iter().filter(|(p, _)| p.starts_with("cur/") || p.starts_with("new/")).map(|(_, v)| v).collect();
            assert_eq!(mails.len(), 1000, "every message arrived in the Maildir");
            // mbsync keeps Maildir files with Unix line ends and adds its own X-TUID line to
            // each header (to recognise the message later).
            let one = String::from_utf8(site.presented(&site.alice, "INBOX", 1).await).expect("text");
            let one = one.replace("\r\n", "\n").into_bytes();
            assert!(
                mails.iter().any(|m| {
                    let text = String::from_utf8_lossy(m);
                    let without_tuid: String =
                        text.split_inclusive('\n').filter(|l| !l.starts_with("X-TUID: ")).collect();
                    without_tuid.as_bytes() == one.as_slice()
                }),
                "no Maildir file holds exactly the presented message {:?}; one of them: {:?}",
                String::from_utf8_lossy(&one),
                String::from_utf8_lossy(mails[0])
            );

            // Near → far: a message written into the Maildir and a flag set there go up.
            let new_file = maildir.join("INBOX/new/1700000000.local.test");
            std::fs::write(&new_file, message("written locally", "goes up")).expect("local message");
            let (picked, _) = first
                .iter()
                .find(|(p, _)| p.starts_with("new/") || (p.starts_with("cur/") && !p.contains(",S")))
                .expect("an unread message");
            let base = Path::new(picked).file_name().expect("name").to_string_lossy().into_owned();
            let base = base.split(":2,").next().unwrap_or(&base).to_owned();
            std::fs::rename(maildir.join("INBOX").join(picked), maildir.join("INBOX/cur").join(format!("{base}:2,S")))
                .expect("mark read locally");
            let cfg = config.clone();
            let (ok, out) = tokio::task::spawn_blocking(move || mbsync(&cfg)).await.expect("mbsync");
            assert!(ok, "second mbsync run failed:\n{out}");
            let status = site.store.store.status(inbox.id).await.expect("status");
            assert_eq!(status.messages, 1001, "the local message was uploaded");
            assert_eq!(status.unseen, 1000, "the message read locally is \\Seen on the server");
            let uploaded = site.presented(&site.alice, "INBOX", status.uidnext - 1).await;
            // mbsync uploads with its X-TUID line in the header.
            let uploaded = String::from_utf8(uploaded).expect("text");
            assert!(uploaded.contains("\r\nSubject: written locally\r\n"), "{uploaded}");
            assert!(uploaded.ends_with("\r\n\r\ngoes up\r\n"), "{uploaded}");

            // A run with nothing to do changes nothing on either side.
            let before = snapshot(&maildir);
            let modseq = site.store.store.status(inbox.id).await.expect("status").highestmodseq;
            let cfg = config.clone();
            let (ok, out) = tokio::task::spawn_blocking(move || mbsync(&cfg)).await.expect("mbsync");
            assert!(ok, "third mbsync run failed:\n{out}");
            assert_eq!(snapshot(&maildir), before, "the Maildir is unchanged:\n{out}");
            let after = site.store.store.status(inbox.id).await.expect("status");
            assert_eq!(after.highestmodseq, modseq, "nothing changed on the server");
            assert_eq!(after.messages, 1001);
        })
    });
}
