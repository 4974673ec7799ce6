//! Every store behaviour, each run on SQLite and on PostgreSQL (see `on_both_backends!`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use common::*;
use qutemail_store::testing::TestStore;
use qutemail_store::*;

on_both_backends!(
    account_creation_makes_the_five_mailboxes,
    authentication_rejects_wrong_unknown_and_disabled_alike,
    uids_strictly_increase_and_are_never_reused,
    fifty_concurrent_appends_get_distinct_increasing_uids,
    flags_and_modseq_follow_condstore,
    copy_move_and_expunge,
    rename_keeps_uidvalidity_and_delete_removes_messages,
    orphan_blobs_are_swept_on_open,
    deleting_an_account_removes_its_blobs,
    only_given_bytes_reach_the_disk,
    search_by_flags_date_size_and_uid,
    quota_is_enforced_and_released,
    sequence_numbers_map_to_uids,
    blob_of_25_mb_streams_through,
    schema_is_versioned_and_a_newer_one_refused,
    a_repeated_peer_delivery_is_stored_once_per_account,
);

/// A peer site that resends a delivery (it crashed after our 250) gets it accepted again, but
/// each account keeps one copy: no second row, no second blob, no second quota charge. Another
/// account's copy of the same delivery, and another delivery, are stored as usual; the record
/// survives a restart.
async fn a_repeated_peer_delivery_is_stored_once_per_account(t: TestStore) {
    let s = &t.store;
    let a = create(s, "erin@site.example").await;
    let b = create(s, "frank@site.example").await;
    let a_inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    let b_inbox = s.mailbox(b.id, "INBOX").await.unwrap();
    let first = PeerDeliveryId([7; 32]);
    let other = PeerDeliveryId([8; 32]);
    let deliver = |mailbox: MailboxId, id: PeerDeliveryId, bytes: &'static [u8]| async move {
        let mut src = bytes;
        s.append_peer_delivery(mailbox, &new_message(bytes.len() as u64), &id, &mut src).await.unwrap()
    };
    let stored = deliver(a_inbox.id, first, b"sealed first attempt").await.expect("first delivery stored");
    assert_eq!(stored.uid, 1);
    assert_eq!(deliver(a_inbox.id, first, b"sealed again with new keys").await, None, "repeat not stored");
    assert!(deliver(b_inbox.id, first, b"the same delivery for frank").await.is_some());
    assert_eq!(deliver(a_inbox.id, other, b"another message").await.map(|a| a.uid), Some(2));
    let blobs = t.config.blob_dir.join("blobs");
    assert_eq!(files_under(&blobs).len(), 3, "the repeat's blob is not kept");
    assert_eq!(s.uids(a_inbox.id).await.unwrap(), vec![1, 2]);
    let used = s.account("erin@site.example").await.unwrap().used_bytes;
    assert_eq!(used, (b"sealed first attempt".len() + b"another message".len()) as u64);
    s.close().await;
    let s = t.reopen().await;
    let mut src: &[u8] = b"after a restart";
    let again = s.append_peer_delivery(a_inbox.id, &new_message(15), &first, &mut src).await.unwrap();
    assert_eq!(again, None, "remembered across a restart");
}

async fn account_creation_makes_the_five_mailboxes(t: TestStore) {
    let s = &t.store;
    let a = create(s, "Alice@Site.Example").await;
    assert_eq!(a.address, "alice@site.example");
    assert!(!a.disabled);
    let boxes = s.list_mailboxes(a.id).await.unwrap();
    let mut got: Vec<(String, Option<&str>)> =
        boxes.iter().map(|m| (m.name.clone(), m.special_use.map(SpecialUse::as_imap))).collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("Drafts".to_string(), Some("\\Drafts")),
            ("INBOX".to_string(), None),
            ("Junk".to_string(), Some("\\Junk")),
            ("Sent".to_string(), Some("\\Sent")),
            ("Trash".to_string(), Some("\\Trash")),
        ]
    );
    assert!(boxes.iter().all(|m| m.uidnext == 1 && m.uidvalidity != 0 && m.subscribed));
    // Lookup is case-insensitive; a second account with the same address is refused and
    // leaves no extra mailboxes behind.
    assert_eq!(s.account("ALICE@site.example").await.unwrap().id, a.id);
    let again = s
        .create_account(NewAccount {
            address: "alice@SITE.example",
            display_name: "x",
            password: "p",
            quota_bytes: None,
        })
        .await;
    assert!(matches!(again, Err(StoreError::AccountExists(_))), "{again:?}");
    assert_eq!(s.list_mailboxes(a.id).await.unwrap().len(), 5);
    for bad in ["no-at-sign", "a@", "@b.example", "a..b@c.example", "a b@c.example", "a@-c.example"] {
        let r = s
            .create_account(NewAccount { address: bad, display_name: "", password: "p", quota_bytes: None })
            .await;
        assert!(matches!(r, Err(StoreError::Invalid { what: "address", .. })), "{bad}: {r:?}");
    }
    assert_eq!(s.list_accounts().await.unwrap().len(), 1);
    assert_eq!(s.mailbox(a.id, "inbox").await.unwrap().name, "INBOX");
}

async fn authentication_rejects_wrong_unknown_and_disabled_alike(t: TestStore) {
    let s = &t.store;
    create(s, "bob@site.example").await;
    let ok = s.authenticate("BOB@site.example", "correct horse").await.unwrap();
    assert_eq!(ok.address, "bob@site.example");
    let wrong = s.authenticate("bob@site.example", "wrong").await.unwrap_err();
    let unknown = s.authenticate("nobody@site.example", "correct horse").await.unwrap_err();
    let malformed = s.authenticate("not an address", "correct horse").await.unwrap_err();
    s.set_disabled("bob@site.example", true).await.unwrap();
    let disabled = s.authenticate("bob@site.example", "correct horse").await.unwrap_err();
    for e in [&wrong, &unknown, &malformed, &disabled] {
        assert!(matches!(e, AuthError::Rejected), "{e:?}");
        assert_eq!(e.to_string(), wrong.to_string());
    }
    s.set_disabled("bob@site.example", false).await.unwrap();
    s.set_password("bob@site.example", "battery staple").await.unwrap();
    assert!(s.authenticate("bob@site.example", "correct horse").await.is_err());
    assert!(s.authenticate("bob@site.example", "battery staple").await.is_ok());
    assert!(matches!(s.set_password("nobody@site.example", "x").await, Err(StoreError::NoSuchAccount(_))));
}

async fn uids_strictly_increase_and_are_never_reused(t: TestStore) {
    let s = &t.store;
    let a = create(s, "carol@site.example").await;
    let inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    let mut uids = Vec::new();
    for i in 0..3u8 {
        uids.push(append(s, inbox.id, &[i; 10]).await.uid);
    }
    assert_eq!(uids, vec![1, 2, 3]);
    let gone = s.expunge(inbox.id, &ExpungeScope::Uids(NumberSet::range(2..=3))).await.unwrap();
    assert_eq!(gone, vec![2, 3]);
    assert_eq!(append(s, inbox.id, b"after expunge").await.uid, 4);
    // Also across a restart.
    s.close().await;
    let s = t.reopen().await;
    let next = append(&s, inbox.id, b"after reopen").await;
    assert_eq!(next.uid, 5);
    assert_eq!(next.uidvalidity, inbox.uidvalidity);
    assert_eq!(s.uids(inbox.id).await.unwrap(), vec![1, 4, 5]);
    let st = s.status(inbox.id).await.unwrap();
    assert_eq!((st.messages, st.uidnext), (3, 6));
}

async fn fifty_concurrent_appends_get_distinct_increasing_uids(t: TestStore) {
    let s = t.store.clone();
    let a = create(&s, "dave@site.example").await;
    let inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("message {i}").into_bytes();
            let r = append(&s, inbox.id, &body).await;
            (i, r)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let uids: BTreeSet<u32> = results.iter().map(|(_, r)| r.uid).collect();
    assert_eq!(uids, (1..=50).collect::<BTreeSet<u32>>(), "every UID exactly once");
    let modseqs: BTreeSet<u64> = results.iter().map(|(_, r)| r.modseq).collect();
    assert_eq!(modseqs.len(), 50, "every append has its own MODSEQ");
    // A higher UID never got a lower MODSEQ: UIDs are handed out in commit order.
    let mut by_uid: Vec<_> = results.iter().map(|(_, r)| (r.uid, r.modseq)).collect();
    by_uid.sort();
    assert!(by_uid.windows(2).all(|w| w[0].1 < w[1].1));
    // Each UID holds the body that append call stored.
    for (i, r) in &results {
        let m = s.message(inbox.id, r.uid).await.unwrap().unwrap();
        assert_eq!(read_all(&s, &m).await, format!("message {i}").into_bytes());
    }
    let st = s.status(inbox.id).await.unwrap();
    assert_eq!((st.messages, st.uidnext, st.unseen), (50, 51, 50));
    assert_eq!(st.highestmodseq, *modseqs.iter().max().unwrap());
}

async fn flags_and_modseq_follow_condstore(t: TestStore) {
    let s = &t.store;
    let a = create(s, "erin@site.example").await;
    let inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    let m1 = append(s, inbox.id, b"one").await;
    let m2 = append(s, inbox.id, b"two").await;
    let before = s.status(inbox.id).await.unwrap().highestmodseq;
    assert_eq!(before, m2.modseq);

    let add_seen = FlagChange { op: FlagOp::Add, flags: Flags::SEEN, keywords: vec!["$Forwarded".into()] };
    let r = s.store_flags(inbox.id, &Selection::All, &add_seen, None).await.unwrap();
    assert_eq!(r.changed.len(), 2);
    assert!(r.modified.is_empty());
    let m = r.changed[0].modseq;
    assert!(m > before && r.changed.iter().all(|c| c.modseq == m), "one new MODSEQ for the STORE");
    assert_eq!(s.status(inbox.id).await.unwrap().highestmodseq, m);
    assert_eq!(s.status(inbox.id).await.unwrap().unseen, 0);

    // Setting what is already set changes nothing, not even MODSEQ.
    let again = s.store_flags(inbox.id, &Selection::All, &add_seen, None).await.unwrap();
    assert!(again.changed.is_empty());
    assert_eq!(s.status(inbox.id).await.unwrap().highestmodseq, m);

    // Message 2 changes after the client's view (modseq m); message 1 stays at m.
    let flag = FlagChange { op: FlagOp::Add, flags: Flags::FLAGGED, keywords: vec![] };
    let r2 = s
        .store_flags(inbox.id, &Selection::Uids(NumberSet::range(m2.uid..=m2.uid)), &flag, None)
        .await
        .unwrap();
    let m_after = r2.changed[0].modseq;
    assert!(m_after > m);
    // UNCHANGEDSINCE m: message 1 may change, message 2 is reported MODIFIED.
    let del = FlagChange { op: FlagOp::Add, flags: Flags::DELETED, keywords: vec![] };
    let r3 = s.store_flags(inbox.id, &Selection::All, &del, Some(m)).await.unwrap();
    assert_eq!(r3.modified, vec![m2.uid]);
    assert_eq!(r3.changed.iter().map(|c| c.uid).collect::<Vec<_>>(), vec![m1.uid]);
    let msgs = s.fetch(inbox.id, &Selection::All).await.unwrap();
    assert!(msgs[0].flags.contains(Flags::DELETED | Flags::SEEN));
    assert!(!msgs[1].flags.contains(Flags::DELETED));
    assert!(msgs[0].keywords.contains("$Forwarded"));

    // Remove and replace.
    let rm = FlagChange { op: FlagOp::Remove, flags: Flags::SEEN, keywords: vec!["$Forwarded".into()] };
    s.store_flags(inbox.id, &Selection::Uids(NumberSet::range(m1.uid..=m1.uid)), &rm, None).await.unwrap();
    let msg1 = s.message(inbox.id, m1.uid).await.unwrap().unwrap();
    assert_eq!(msg1.flags, Flags::DELETED);
    assert!(msg1.keywords.is_empty());
    let rep = FlagChange { op: FlagOp::Replace, flags: Flags::ANSWERED, keywords: vec!["work".into()] };
    s.store_flags(inbox.id, &Selection::Uids(NumberSet::range(m1.uid..=m1.uid)), &rep, None).await.unwrap();
    let msg1 = s.message(inbox.id, m1.uid).await.unwrap().unwrap();
    assert_eq!(msg1.flags, Flags::ANSWERED);
    assert_eq!(msg1.keywords, BTreeSet::from(["work".to_string()]));

    // CHANGEDSINCE: both changed after `before`; only message 1 after m_after.
    let ch = s.changes_since(inbox.id, m_after).await.unwrap();
    assert_eq!(ch.changed.iter().map(|c| c.uid).collect::<Vec<_>>(), vec![m1.uid]);
    assert!(ch.vanished.is_empty());
    let hm = ch.highestmodseq;
    s.expunge(inbox.id, &ExpungeScope::Uids(NumberSet::range(m2.uid..=m2.uid))).await.unwrap();
    let ch = s.changes_since(inbox.id, hm).await.unwrap();
    assert_eq!(ch.vanished, vec![m2.uid]);
    assert!(ch.changed.is_empty());
    assert!(ch.highestmodseq > hm);

    let bad = FlagChange { op: FlagOp::Add, flags: Flags::NONE, keywords: vec!["bad keyword".into()] };
    assert!(matches!(
        s.store_flags(inbox.id, &Selection::All, &bad, None).await,
        Err(StoreError::Invalid { what: "keyword", .. })
    ));
}

async fn copy_move_and_expunge(t: TestStore) {
    let s = &t.store;
    let a = create(s, "frank@site.example").await;
    let inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    let trash = s.mailbox(a.id, "Trash").await.unwrap();
    let archive = s.create_mailbox(a.id, "Archive/2026").await.unwrap();
    for i in 1..=4u8 {
        append(s, inbox.id, &vec![i; 100 * usize::from(i)]).await;
    }
    let seen = FlagChange { op: FlagOp::Add, flags: Flags::SEEN, keywords: vec!["kept".into()] };
    s.store_flags(inbox.id, &Selection::Uids(NumberSet::range(1..=1)), &seen, None).await.unwrap();

    let copied = s.copy_messages(inbox.id, &NumberSet::parse_imap("1:2").unwrap(), archive.id).await.unwrap();
    assert_eq!(copied.uids, vec![(1, 1), (2, 2)]);
    assert_eq!(copied.uidvalidity, archive.uidvalidity);
    let orig = s.fetch(inbox.id, &Selection::All).await.unwrap();
    let copy = s.fetch(archive.id, &Selection::All).await.unwrap();
    assert_eq!(copy[0].flags, Flags::SEEN);
    assert!(copy[0].keywords.contains("kept"));
    assert_ne!(copy[0].unique_id, orig[0].unique_id);
    assert_eq!(copy[0].protection, orig[0].protection);
    // Expunging the originals leaves the copies readable.
    let gone = s.expunge(inbox.id, &ExpungeScope::Uids(NumberSet::range(1..=2))).await.unwrap();
    assert_eq!(gone, vec![1, 2]);
    assert_eq!(read_all(s, &copy[0]).await, vec![1u8; 100]);
    assert_eq!(read_all(s, &copy[1]).await, vec![2u8; 200]);
    assert_eq!(s.account("frank@site.example").await.unwrap().used_bytes, 300 + 300 + 400);

    // MOVE: same unique id and blob, new UID in the target, vanished in the source.
    let before_move = s.status(inbox.id).await.unwrap().highestmodseq;
    let moved_meta = s.message(inbox.id, 3).await.unwrap().unwrap();
    let moved = s.move_messages(inbox.id, &NumberSet::range(3..=3), trash.id).await.unwrap();
    assert_eq!(moved.uids, vec![(3, 1)]);
    let in_trash = s.message(trash.id, 1).await.unwrap().unwrap();
    assert_eq!(in_trash.unique_id, moved_meta.unique_id);
    assert_eq!(read_all(s, &in_trash).await, vec![3u8; 300]);
    assert!(s.message(inbox.id, 3).await.unwrap().is_none());
    assert_eq!(s.changes_since(inbox.id, before_move).await.unwrap().vanished, vec![3]);
    let (mb, found) = s.message_by_unique_id(&in_trash.unique_id).await.unwrap().unwrap();
    assert_eq!((mb, found.uid), (trash.id, 1));

    // EXPUNGE removes only \Deleted messages (and within the set for UID EXPUNGE).
    let del = FlagChange { op: FlagOp::Add, flags: Flags::DELETED, keywords: vec![] };
    s.store_flags(archive.id, &Selection::All, &del, None).await.unwrap();
    assert_eq!(
        s.expunge(archive.id, &ExpungeScope::DeletedIn(NumberSet::range(2..=2))).await.unwrap(),
        vec![2]
    );
    assert_eq!(s.expunge(inbox.id, &ExpungeScope::Deleted).await.unwrap(), Vec::<u32>::new());
    assert_eq!(s.expunge(archive.id, &ExpungeScope::Deleted).await.unwrap(), vec![1]);
    assert_eq!(s.uids(inbox.id).await.unwrap(), vec![4]);
    assert_eq!(s.account("frank@site.example").await.unwrap().used_bytes, 300 + 400);
    // Blob files left: the moved one and uid 4's.
    let blob_files = files_under(&t.config.blob_dir.join("blobs"));
    assert_eq!(blob_files.len(), 2, "{blob_files:?}");
    // Copy across accounts is refused.
    let other = create(s, "grace@site.example").await;
    let other_inbox = s.mailbox(other.id, "INBOX").await.unwrap();
    assert!(s.copy_messages(inbox.id, &NumberSet::all(), other_inbox.id).await.is_err());
}

async fn rename_keeps_uidvalidity_and_delete_removes_messages(t: TestStore) {
    let s = &t.store;
    let a = create(s, "heidi@site.example").await;
    let work = s.create_mailbox(a.id, "Work").await.unwrap();
    let child = s.create_mailbox(a.id, "Work/Projects").await.unwrap();
    let odd = s.create_mailbox(a.id, "Work_x").await.unwrap();
    append(s, work.id, b"kept across rename").await;
    assert!(matches!(s.create_mailbox(a.id, "Work").await, Err(StoreError::MailboxExists(_))));
    s.rename_mailbox(a.id, "Work", "Jobs").await.unwrap();
    let jobs = s.mailbox(a.id, "Jobs").await.unwrap();
    assert_eq!((jobs.id, jobs.uidvalidity, jobs.uidnext), (work.id, work.uidvalidity, 2));
    let jobs_child = s.mailbox(a.id, "Jobs/Projects").await.unwrap();
    assert_eq!((jobs_child.id, jobs_child.uidvalidity), (child.id, child.uidvalidity));
    assert_eq!(
        s.mailbox(a.id, "Work_x").await.unwrap().id,
        odd.id,
        "a sibling with a longer name is not renamed"
    );
    assert!(matches!(s.mailbox(a.id, "Work").await, Err(StoreError::NoSuchMailbox(_))));
    assert_eq!(s.fetch(jobs.id, &Selection::All).await.unwrap().len(), 1);
    assert!(matches!(s.rename_mailbox(a.id, "inbox", "Old").await, Err(StoreError::InboxProtected(_))));
    assert!(matches!(s.rename_mailbox(a.id, "Jobs", "Sent").await, Err(StoreError::MailboxExists(_))));
    assert!(matches!(s.delete_mailbox(a.id, "INBOX").await, Err(StoreError::InboxProtected(_))));
    // A re-created mailbox of the same name is a new mailbox with another UIDVALIDITY.
    s.delete_mailbox(a.id, "Jobs").await.unwrap();
    assert!(files_under(&t.config.blob_dir.join("blobs")).is_empty());
    assert_eq!(s.account("heidi@site.example").await.unwrap().used_bytes, 0);
    let again = s.create_mailbox(a.id, "Jobs").await.unwrap();
    assert_ne!(again.id, jobs.id);
    assert_eq!(again.uidnext, 1);
    assert!(s.mailbox(a.id, "Jobs/Projects").await.is_ok(), "inferiors survive their parent's deletion");
    s.set_subscribed(again.id, false).await.unwrap();
    assert!(!s.mailbox(a.id, "Jobs").await.unwrap().subscribed);
}

async fn orphan_blobs_are_swept_on_open(t: TestStore) {
    let s = &t.store;
    let a = create(s, "ivan@site.example").await;
    let inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    let kept = append(s, inbox.id, b"referenced").await;
    // An orphan: a blob whose append never committed (as after a crash), and a temp file.
    let mut src: &[u8] = b"orphan";
    let orphan = s.blobs().put(&mut src).await.unwrap();
    std::fs::write(t.config.blob_dir.join("tmp").join("0123456789abcdef0123456789abcdef"), b"half").unwrap();
    s.close().await;
    // Within the grace period nothing is touched.
    let young = t.reopen().await;
    assert!(young.blobs().get(&orphan.id).await.is_ok());
    young.close().await;
    std::thread::sleep(Duration::from_millis(20));
    let cfg = StoreConfig { orphan_grace: Duration::from_millis(10), ..t.config.clone() };
    let s2 = Store::open(cfg).await.unwrap();
    assert!(matches!(s2.blobs().get(&orphan.id).await, Err(BlobError::NotFound(_))));
    assert!(files_under(&t.config.blob_dir.join("tmp")).is_empty());
    let m = s2.message(inbox.id, kept.uid).await.unwrap().unwrap();
    assert_eq!(read_all(&s2, &m).await, b"referenced");
}

async fn deleting_an_account_removes_its_blobs(t: TestStore) {
    let s = &t.store;
    let a = create(s, "judy@site.example").await;
    let b = create(s, "mallory@site.example").await;
    let a_inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    let a_sent = s.mailbox(a.id, "Sent").await.unwrap();
    let b_inbox = s.mailbox(b.id, "INBOX").await.unwrap();
    append(s, a_inbox.id, b"a1").await;
    append(s, a_sent.id, b"a2").await;
    s.copy_messages(a_inbox.id, &NumberSet::all(), a_sent.id).await.unwrap();
    append(s, b_inbox.id, b"b1").await;
    let blobs = t.config.blob_dir.join("blobs");
    assert_eq!(files_under(&blobs).len(), 4);
    s.delete_account("JUDY@site.example").await.unwrap();
    let left = files_under(&blobs);
    assert_eq!(left.len(), 1, "only mallory's blob is left: {left:?}");
    assert_eq!(std::fs::read(&left[0]).unwrap(), b"b1");
    assert!(matches!(s.account("judy@site.example").await, Err(StoreError::NoSuchAccount(_))));
    assert!(s.list_mailboxes(a.id).await.unwrap().is_empty());
    assert!(matches!(s.authenticate("judy@site.example", "correct horse").await, Err(AuthError::Rejected)));
    assert!(matches!(s.delete_account("judy@site.example").await, Err(StoreError::NoSuchAccount(_))));
}

/// The caller seals the plaintext (here with a keystream from SHA-256: a stand-in for the
/// envelope crate) and hands the store only sealed bytes and the protection record. Every file
/// the store wrote (database, WAL, SHM, blobs; for PostgreSQL its data directory) must contain
/// none of the plaintext canaries, while the bytes the store was given are found (so the scan
/// does see the data).
async fn only_given_bytes_reach_the_disk(t: TestStore) {
    use sha2::{Digest, Sha256};
    let seal = |plain: &[u8]| -> Vec<u8> {
        plain
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ Sha256::digest((i / 32).to_le_bytes())[i % 32] ^ 0x5a)
            .collect()
    };
    let s = &t.store;
    let tag =
        format!("{:016x}", SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos());
    let subject = format!("CANARY-SUBJECT-{tag}");
    let body = format!("CANARY-BODY-{tag} the quantum secret plans");
    let recipients = format!("CANARY-RCPT-{tag}@partner.example");
    let a = create(s, &format!("scan-{tag}@site.example")).await;
    let inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    let plain = format!("Subject: {subject}\r\nTo: {recipients}\r\n\r\n{body}\r\n");
    let sealed = seal(plain.as_bytes());
    let sealed_summary = seal(format!("{subject}\n{recipients}").as_bytes());
    let marker = format!("WRAPPED-KEY-{tag}");
    let mut msg = new_message(plain.len() as u64);
    msg.protection.wrapped_key = marker.clone().into_bytes();
    msg.summary = Some(sealed_summary.clone());
    let mut src: &[u8] = &sealed;
    let uid = s.append(inbox.id, &msg, &mut src).await.unwrap().uid;
    // Flag changes and a copy write more rows and WAL frames.
    let seen = FlagChange { op: FlagOp::Add, flags: Flags::SEEN, keywords: vec![] };
    s.store_flags(inbox.id, &Selection::All, &seen, None).await.unwrap();
    let trash = s.mailbox(a.id, "Trash").await.unwrap();
    s.copy_messages(inbox.id, &NumberSet::range(uid..=uid), trash.id).await.unwrap();
    if s.backend() == Backend::Postgres {
        // Make PostgreSQL write its buffers to the data files too, not only to its WAL.
        let pg = qutemail_store::testing::postgres();
        if pg.data_dir().is_some() {
            use sqlx::Connection;
            let mut c = sqlx::AnyConnection::connect(&t.database.as_ref().unwrap().url).await.unwrap();
            sqlx::raw_sql("CHECKPOINT").execute(&mut c).await.unwrap();
        }
    }
    let mut files = files_under(t.dir.path());
    if let Some(d) = qutemail_store::testing::postgres_data_dir_if(s.backend()) {
        files.extend(files_under(&d));
    }
    let mut seen_marker = false;
    let mut seen_sealed = false;
    let mut seen_address = false;
    for f in &files {
        let Ok(bytes) = std::fs::read(f) else { continue };
        for canary in [&subject, &body, &recipients] {
            assert!(!contains(&bytes, canary.as_bytes()), "plaintext {canary:?} found in {}", f.display());
        }
        seen_marker |= contains(&bytes, marker.as_bytes());
        seen_sealed |= contains(&bytes, &sealed[..64]);
        seen_address |= contains(&bytes, format!("scan-{tag}@site.example").as_bytes());
    }
    assert!(seen_sealed, "the sealed blob was not found: the scan missed the blobs");
    // An external server (QUTEMAIL_PG_URL) keeps its files out of reach: only blobs are scanned.
    let database_scanned = s.backend() == Backend::Sqlite
        || qutemail_store::testing::postgres_data_dir_if(s.backend()).is_some();
    if database_scanned {
        assert!(seen_marker, "the wrapped key given as metadata was not found: the scan missed the database");
        assert!(seen_address, "the account address was not found: the scan missed the database");
    }
    if s.backend() == Backend::Sqlite {
        let names: BTreeSet<String> =
            files.iter().filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
        assert!(names.contains("store.sqlite") && names.contains("store.sqlite-wal"), "{names:?}");
    }
}

async fn search_by_flags_date_size_and_uid(t: TestStore) {
    let s = &t.store;
    let a = create(s, "ken@site.example").await;
    let inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    let day = |d: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + d * 86_400);
    for i in 1..=5u64 {
        let mut m = new_message(i * 1000);
        m.internal_date = day(i);
        if i % 2 == 0 {
            m.flags = Flags::SEEN;
            m.keywords = vec!["even".into()];
        }
        let mut src: &[u8] = b"x";
        s.append(inbox.id, &m, &mut src).await.unwrap();
    }
    let q = |f: fn(&mut SearchQuery)| {
        let mut q = SearchQuery::default();
        f(&mut q);
        q
    };
    assert_eq!(s.search(inbox.id, &q(|q| q.flags_set = Flags::SEEN)).await.unwrap(), vec![2, 4]);
    assert_eq!(s.search(inbox.id, &q(|q| q.flags_unset = Flags::SEEN)).await.unwrap(), vec![1, 3, 5]);
    assert_eq!(s.search(inbox.id, &q(|q| q.keywords = vec!["even".into()])).await.unwrap(), vec![2, 4]);
    assert_eq!(
        s.search(inbox.id, &q(|q| q.without_keywords = vec!["even".into()])).await.unwrap(),
        vec![1, 3, 5]
    );
    assert_eq!(s.search(inbox.id, &q(|q| q.larger = Some(3000))).await.unwrap(), vec![4, 5]);
    assert_eq!(s.search(inbox.id, &q(|q| q.smaller = Some(3000))).await.unwrap(), vec![1, 2]);
    let mut dates = SearchQuery { since: Some(day(2)), before: Some(day(4)), ..Default::default() };
    assert_eq!(s.search(inbox.id, &dates).await.unwrap(), vec![2, 3]);
    dates.uids = Some(NumberSet::parse_imap("3,5:*").unwrap());
    assert_eq!(s.search(inbox.id, &dates).await.unwrap(), vec![3]);
    let m4 = s.message(inbox.id, 4).await.unwrap().unwrap().modseq;
    assert_eq!(
        s.search(inbox.id, &SearchQuery { modseq_at_least: Some(m4), ..Default::default() }).await.unwrap(),
        vec![4, 5]
    );
}

async fn quota_is_enforced_and_released(t: TestStore) {
    let s = &t.store;
    let a = s
        .create_account(NewAccount {
            address: "leo@site.example",
            display_name: "Leo",
            password: "pw",
            quota_bytes: Some(1000),
        })
        .await
        .unwrap();
    assert_eq!(a.quota_bytes, Some(1000));
    let inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    let sent = s.mailbox(a.id, "Sent").await.unwrap();
    append(s, inbox.id, &[0u8; 600]).await;
    let mut src: &[u8] = &[0u8; 500];
    let r = s.append(inbox.id, &new_message(500), &mut src).await;
    assert!(matches!(r, Err(StoreError::QuotaExceeded { used: 600, quota: 1000, requested: 500 })), "{r:?}");
    assert!(matches!(
        s.copy_messages(inbox.id, &NumberSet::all(), sent.id).await,
        Err(StoreError::QuotaExceeded { .. })
    ));
    // Nothing of the refused operations is left: one message, one blob.
    assert_eq!(s.status(inbox.id).await.unwrap().messages, 1);
    assert_eq!(s.status(sent.id).await.unwrap().messages, 0);
    assert_eq!(files_under(&t.config.blob_dir.join("blobs")).len(), 1);
    // The refused append used no UID... it may, but UIDNEXT never goes back: check the next.
    s.expunge(inbox.id, &ExpungeScope::Uids(NumberSet::all())).await.unwrap();
    assert_eq!(s.account("leo@site.example").await.unwrap().used_bytes, 0);
    let next = append(s, inbox.id, &[0u8; 900]).await;
    assert!(next.uid > 1);
    s.set_quota("leo@site.example", None).await.unwrap();
    append(s, inbox.id, &[0u8; 900]).await;
    assert_eq!(s.account("leo@site.example").await.unwrap().used_bytes, 1800);
}

async fn sequence_numbers_map_to_uids(t: TestStore) {
    let s = &t.store;
    let a = create(s, "mia@site.example").await;
    let inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    for i in 0..5u8 {
        append(s, inbox.id, &[i]).await;
    }
    s.expunge(inbox.id, &ExpungeScope::Uids(NumberSet::from_numbers([2, 4]))).await.unwrap();
    // UIDs 1 3 5 are sequence numbers 1 2 3.
    let sel = Selection::Sequence(NumberSet::parse_imap("2:*").unwrap());
    let got: Vec<u32> = s.fetch(inbox.id, &sel).await.unwrap().iter().map(|m| m.uid).collect();
    assert_eq!(got, vec![3, 5]);
    let seen = FlagChange { op: FlagOp::Add, flags: Flags::SEEN, keywords: vec![] };
    let r = s
        .store_flags(inbox.id, &Selection::Sequence(NumberSet::parse_imap("*").unwrap()), &seen, None)
        .await
        .unwrap();
    assert_eq!(r.changed.iter().map(|c| c.uid).collect::<Vec<_>>(), vec![5]);
    // UID `9:*` includes the highest UID even though 9 is above it (RFC 3501 6.4.8).
    let star = Selection::Uids(NumberSet::parse_imap("9:*").unwrap());
    assert_eq!(s.fetch(inbox.id, &star).await.unwrap().iter().map(|m| m.uid).collect::<Vec<_>>(), vec![5]);
    assert!(NumberSet::parse_imap("0").is_err());
    assert!(NumberSet::parse_imap("1,,2").is_err());
}

async fn blob_of_25_mb_streams_through(t: TestStore) {
    let s = &t.store;
    let a = create(s, "nina@site.example").await;
    let inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    // A generated stream (never materialised as one buffer) of 25 MB.
    let len = 25 * 1024 * 1024u64;
    let mut src = tokio::io::AsyncReadExt::take(tokio::io::repeat(0xA5), len);
    let r = s.append(inbox.id, &new_message(len), &mut src).await.unwrap();
    let m = s.message(inbox.id, r.uid).await.unwrap().unwrap();
    assert_eq!(m.blob_len, len);
    let mut reader = s.read_blob(&m).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = tokio::io::AsyncReadExt::read(&mut reader, &mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|b| *b == 0xA5));
        total += n as u64;
    }
    assert_eq!(total, len);
}

async fn schema_is_versioned_and_a_newer_one_refused(t: TestStore) {
    use sqlx::Connection;
    t.store.close().await;
    // Reopening an up-to-date database applies nothing and keeps the data.
    let s = t.reopen().await;
    create(&s, "olga@site.example").await;
    s.close().await;
    let s = t.reopen().await;
    assert!(s.account("olga@site.example").await.is_ok());
    s.close().await;
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(&t.config.database_url).await.unwrap();
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all(&mut c)
        .await
        .unwrap();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, 0)")
        .bind(SCHEMA_VERSION + 1)
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    let r = Store::open(t.config.clone()).await;
    assert!(matches!(r, Err(StoreError::SchemaTooNew { .. })), "{r:?}");
}
