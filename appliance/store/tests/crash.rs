//! Crash safety: a child process appends in a loop and is killed with SIGKILL at arbitrary
//! moments (often mid-blob, since blobs are up to 2 MB); after each kill the store is reopened
//! and every message it shows must be whole, and every message the child reported stored must
//! be there. Run on SQLite and on PostgreSQL.
//!
//! The child is this test executable re-invoked for the same test with `CHILD_VAR` set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::{create, files_under, read_all};
use qutemail_store::testing::TestStore;
use qutemail_store::{Backend, Flags, NewMessage, Store, StoreConfig};
use sha2::{Digest, Sha256};

const CHILD_VAR: &str = "QUTEMAIL_STORE_CRASH_CHILD";
const ADDRESS: &str = "crash@site.example";

/// The bytes of the n-th message the child stores: 100 KB to 2 MB, a window (chosen by n) of
/// one pattern made once, so that the child spends its time storing, not generating.
fn body(pattern: &[u8], n: u64) -> &[u8] {
    let len = 100_000 + (n * 7919 % 19) as usize * 100_000;
    let start = (n as usize * 4099) % (pattern.len() - len);
    &pattern[start..start + len]
}

fn pattern() -> Vec<u8> {
    let mut out = Vec::with_capacity(4 << 20);
    let mut block = Sha256::digest(b"crash-test pattern");
    while out.len() < 4 << 20 {
        out.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_killed_mid_append_leaves_whole_messages_only() {
    if std::env::var_os(CHILD_VAR).is_some() {
        return child().await;
    }
    parent(Backend::Sqlite, "sqlite_killed_mid_append_leaves_whole_messages_only").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_mid_append_leaves_whole_messages_only() {
    if std::env::var_os(CHILD_VAR).is_some() {
        return child().await;
    }
    parent(Backend::Postgres, "postgres_killed_mid_append_leaves_whole_messages_only").await;
}

/// Appends forever, printing `stored <uid>` after each append returned.
async fn child() {
    let spec = std::env::var(CHILD_VAR).unwrap();
    let (url, blob_dir, first) = {
        let mut it = spec.split('\t');
        (
            it.next().unwrap().to_owned(),
            it.next().unwrap().to_owned(),
            it.next().unwrap().parse::<u64>().unwrap(),
        )
    };
    let mut cfg = StoreConfig::new(url, blob_dir);
    cfg.password = qutemail_store::testing::test_password_params();
    let store = Store::open(cfg).await.unwrap();
    let account = store.account(ADDRESS).await.unwrap();
    let inbox = store.mailbox(account.id, "INBOX").await.unwrap();
    let mut stdout = std::io::stdout();
    let pattern = pattern();
    for n in first.. {
        let bytes = body(&pattern, n);
        let meta = NewMessage {
            flags: Flags::NONE,
            keywords: vec![],
            internal_date: SystemTime::now(),
            size: bytes.len() as u64,
            protection: common::protection("crash"),
            // The summary names the body, so the parent can regenerate and compare it.
            summary: Some(n.to_le_bytes().to_vec()),
        };
        let mut src: &[u8] = bytes;
        let r = store.append(inbox.id, &meta, &mut src).await.unwrap();
        writeln!(stdout, "stored {}", r.uid).unwrap();
        stdout.flush().unwrap();
    }
}

/// The UID of a `stored <uid>` line. libtest may have printed `test <name> ... ` without a line
/// break just before the child's first line, so the marker is searched anywhere in the line.
fn stored_uid(line: &str) -> Option<u32> {
    let (_, rest) = line.split_once("stored ")?;
    Some(rest.trim().parse().expect("a UID after `stored `"))
}

async fn parent(backend: Backend, test_name: &str) {
    let t = TestStore::new(backend).await;
    let account = create(&t.store, ADDRESS).await;
    let inbox = t.store.mailbox(account.id, "INBOX").await.unwrap();
    t.store.close().await;
    let pattern = pattern();
    let mut acknowledged = BTreeSet::new();
    let mut next_body = 0u64;
    for (round, wait_for) in [3usize, 5, 4, 6, 3, 5].into_iter().enumerate() {
        let spec = format!("{}\t{}\t{}", t.config.database_url, t.config.blob_dir.display(), next_body);
        next_body += 1000;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_VAR, spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while seen < wait_for {
            let line = lines.next().expect("child ended before storing enough").unwrap();
            if let Some(uid) = stored_uid(&line) {
                acknowledged.insert(uid);
                seen += 1;
            }
        }
        // Kill at a moment that drifts across the append cycle from round to round.
        std::thread::sleep(Duration::from_millis(4 * round as u64 + 1));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Lines the child printed before dying were acknowledged too.
        for line in lines.map_while(Result::ok) {
            if let Some(uid) = stored_uid(&line) {
                acknowledged.insert(uid);
            }
        }

        let store = t.reopen().await;
        let visible = store.fetch(inbox.id, &qutemail_store::Selection::All).await.unwrap();
        let uids: BTreeSet<u32> = visible.iter().map(|m| m.uid).collect();
        assert!(acknowledged.is_subset(&uids), "acknowledged {acknowledged:?} but visible {uids:?}");
        // At most one append per round (the one in flight at the kill) committed unreported.
        assert!(
            visible.len() <= acknowledged.len() + round + 1,
            "{} visible, {} acknowledged",
            visible.len(),
            acknowledged.len()
        );
        for m in &visible {
            let bytes = read_all(&store, m).await;
            assert_eq!(bytes.len() as u64, m.blob_len, "uid {} blob length", m.uid);
            assert_eq!(bytes.len() as u64, m.size, "uid {} size", m.uid);
            let n = u64::from_le_bytes(m.summary.clone().unwrap().try_into().unwrap());
            assert!(bytes == body(&pattern, n), "uid {} content differs from body {n}", m.uid);
        }
        store.close().await;
    }
    // Whatever the kills left behind (blobs without rows) is swept once past the grace period;
    // afterwards there is exactly one blob per message.
    let before = files_under(&t.config.blob_dir.join("blobs")).len()
        + files_under(&t.config.blob_dir.join("tmp")).len();
    let cfg = StoreConfig { orphan_grace: Duration::ZERO, ..t.config.clone() };
    let store = Store::open(cfg).await.unwrap();
    let count = store.fetch(inbox.id, &qutemail_store::Selection::All).await.unwrap().len();
    eprintln!("{backend:?}: {count} messages, {} blob files left by the kills swept", before - count);
    assert_eq!(files_under(&t.config.blob_dir.join("blobs")).len(), count);
    assert!(files_under(&t.config.blob_dir.join("tmp")).is_empty());
}
