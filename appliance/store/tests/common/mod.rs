//! Helpers shared by the test files.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use qutemail_store::{Appended, Flags, MailboxId, NewAccount, NewMessage, Protection, Store};
use tokio::io::AsyncReadExt;

/// Runs each named `async fn(TestStore)` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let t = qutemail_store::testing::TestStore::new(qutemail_store::Backend::Sqlite).await;
                    super::$name(t).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let t = qutemail_store::testing::TestStore::new(qutemail_store::Backend::Postgres).await;
                    super::$name(t).await;
                }
            )*
        }
    };
}

pub fn protection(tag: &str) -> Protection {
    Protection {
        kind: "qkd-envelope".into(),
        wrapped_key: format!("wrapped-key-{tag}").into_bytes(),
        key_ids: vec![format!("key-{tag}-1"), format!("key-{tag}-2")],
        certificate: Some(format!("certificate-{tag}").into_bytes()),
    }
}

pub fn new_message(size: u64) -> NewMessage {
    NewMessage {
        flags: Flags::NONE,
        keywords: Vec::new(),
        internal_date: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        size,
        protection: protection("t"),
        summary: Some(b"sealed-summary".to_vec()),
    }
}

pub async fn append(store: &Store, mailbox: MailboxId, bytes: &[u8]) -> Appended {
    let mut src = bytes;
    store.append(mailbox, &new_message(bytes.len() as u64), &mut src).await.unwrap()
}

pub async fn create(store: &Store, address: &str) -> qutemail_store::Account {
    store
        .create_account(NewAccount {
            address,
            display_name: "Test User",
            password: "correct horse",
            quota_bytes: None,
        })
        .await
        .unwrap()
}

pub async fn read_all(store: &Store, m: &qutemail_store::MessageMeta) -> Vec<u8> {
    let mut r = store.read_blob(m).await.unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    out
}

/// Every regular file under `dir`.
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
