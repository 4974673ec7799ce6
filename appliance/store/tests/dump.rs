//! The logical copy behind backup and restore: a dump loaded into a store without mail (a fresh
//! site with only its first-boot admin account, which it replaces) gives back the
//! same rows (ids, UIDs, flags, folders, protection records), the store keeps working after it,
//! and a non-empty store or another schema version is refused with nothing changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{append, create};
use qutemail_store::testing::TestStore;
use qutemail_store::{
    DUMP_TABLES, DumpValue, ExpungeScope, FlagChange, FlagOp, Flags, NewQueueRecipient, NewQueuedMessage,
    NumberSet, Selection, StoreError,
};

async fn a_dump_loads_into_a_store_without_mail_and_reads_back_the_same(t: TestStore) {
    let source = &t.store;
    let alice = create(source, "alice@a.example").await;
    let bob = create(source, "bob@a.example").await;
    let inbox = source.mailbox(alice.id, "INBOX").await.unwrap();
    let work = source.create_mailbox(alice.id, "Work/2026").await.unwrap();
    append(source, inbox.id, b"first sealed bytes").await;
    append(source, inbox.id, b"second sealed bytes").await;
    append(source, work.id, b"third sealed bytes").await;
    let bob_inbox = source.mailbox(bob.id, "INBOX").await.unwrap();
    append(source, bob_inbox.id, b"bob's sealed bytes").await;
    let change =
        FlagChange { op: FlagOp::Add, flags: Flags::SEEN | Flags::FLAGGED, keywords: vec!["$Label1".into()] };
    source.store_flags(inbox.id, &Selection::Uids(NumberSet::range(1..=1)), &change, None).await.unwrap();
    source.expunge(inbox.id, &ExpungeScope::Uids(NumberSet::range(2..=2))).await.unwrap();
    let queued = NewQueuedMessage {
        sender: "alice@a.example".into(),
        envid: None,
        ret_full: false,
        requested: None,
        size: 5,
        protection: common::protection("q"),
        recipients: vec![NewQueueRecipient {
            address: "carol@b.example".into(),
            notify: String::new(),
            orcpt: None,
        }],
    };
    source.enqueue(&queued, &mut &b"queued"[..]).await.unwrap();

    let dump = source.dump().await.unwrap();
    assert_eq!(dump.count("accounts"), 2);
    assert_eq!(dump.count("queue_messages"), 1);
    assert_eq!(dump.count("queue_recipients"), 1);
    let names: Vec<&str> = dump.tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, DUMP_TABLES, "a dump covers every table of the schema, parents first");

    // A fresh site: only a first-boot admin account, no mail. The dump replaces it.
    let target = TestStore::new(t.store.backend()).await;
    create(&target.store, "postmaster@a.example").await;
    assert!(!target.store.holds_mail().await.unwrap());
    let replaced = target.store.load_dump(&dump).await.unwrap();
    assert_eq!(replaced, vec!["postmaster@a.example".to_owned()]);
    assert!(target.store.holds_mail().await.unwrap());
    assert_eq!(target.store.dump().await.unwrap(), dump, "every row comes back identical");

    // The restored store works on: the same login, folders and flags; new rows get fresh ids.
    let restored = target.store.authenticate("alice@a.example", "correct horse").await.unwrap();
    assert_eq!(restored.id, alice.id);
    assert_eq!(restored.used_bytes, alice_used(&dump, "alice@a.example"));
    let work2 = target.store.mailbox(alice.id, "Work/2026").await.unwrap();
    assert_eq!(work2.uidvalidity, work.uidvalidity);
    let first = target.store.fetch(inbox.id, &Selection::Uids(NumberSet::range(1..=10))).await.unwrap();
    assert_eq!(first.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![1]);
    assert!(first[0].flags.contains(Flags::SEEN | Flags::FLAGGED));
    assert!(first[0].keywords.contains("$Label1"));
    let carol = create(&target.store, "carol@a.example").await;
    assert!(carol.id > bob.id, "a new account after the restore gets a new id");
    let next = target.store.create_mailbox(carol.id, "Archive").await.unwrap();
    assert!(next.id > work.id);

    // Loading again into the now non-empty store is refused and changes nothing.
    let before = target.store.dump().await.unwrap();
    let err = target.store.load_dump(&dump).await.unwrap_err();
    assert!(matches!(err, StoreError::NotEmpty { .. }), "{err}");
    assert!(err.to_string().contains("not empty"), "{err}");
    assert_eq!(target.store.dump().await.unwrap(), before);

    // A dump of another schema version is refused before anything is written.
    let other = TestStore::new(t.store.backend()).await;
    let mut old = dump.clone();
    old.schema_version -= 1;
    let err = other.store.load_dump(&old).await.unwrap_err();
    assert!(matches!(err, StoreError::SchemaMismatch { .. }), "{err}");
    assert!(other.store.is_empty().await.unwrap());
}

/// The sum of the sizes of `address`'s messages in `dump`.
fn alice_used(dump: &qutemail_store::StoreDump, address: &str) -> u64 {
    let accounts = dump.table("accounts").unwrap();
    let (aid, aaddr) = (accounts.column("id").unwrap(), accounts.column("address").unwrap());
    let row = accounts.rows.iter().find(|r| r[aaddr] == DumpValue::Text(address.into())).unwrap();
    let DumpValue::Integer(account) = row[aid] else { panic!("ids are integers") };
    let mailboxes = dump.table("mailboxes").unwrap();
    let (mid, maccount) = (mailboxes.column("id").unwrap(), mailboxes.column("account_id").unwrap());
    let mine: Vec<&DumpValue> = mailboxes
        .rows
        .iter()
        .filter(|r| r[maccount] == DumpValue::Integer(account))
        .map(|r| &r[mid])
        .collect();
    let messages = dump.table("messages").unwrap();
    let (box_col, size_col) = (messages.column("mailbox_id").unwrap(), messages.column("size").unwrap());
    messages
        .rows
        .iter()
        .filter(|r| mine.contains(&&r[box_col]))
        .map(|r| match r[size_col] {
            DumpValue::Integer(n) => n as u64,
            _ => panic!("size is an integer"),
        })
        .sum()
}

on_both_backends!(a_dump_loads_into_a_store_without_mail_and_reads_back_the_same);
