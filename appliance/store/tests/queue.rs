//! The outbound queue's durable part, on SQLite and on PostgreSQL: queued messages survive a
//! reopen, due recipients are claimed once (a lease keeps a second runner off them), outcomes
//! are recorded, and a message leaves the queue (with its blob) when every recipient is done.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime};

use qutemail_store::testing::TestStore;
use qutemail_store::*;

on_both_backends!(
    queued_messages_are_claimed_once_and_leave_when_done,
    queue_blobs_are_not_swept_as_orphans,
    operators_retry_and_delete_queued_messages
);

fn protection() -> Protection {
    Protection { kind: "at-rest.normal".into(), wrapped_key: vec![7; 40], key_ids: vec![], certificate: None }
}

fn message(recipients: &[&str]) -> NewQueuedMessage {
    NewQueuedMessage {
        sender: "alice@a.example".into(),
        envid: Some("env-1".into()),
        ret_full: false,
        requested: None,
        size: 1234,
        protection: protection(),
        recipients: recipients
            .iter()
            .map(|a| NewQueueRecipient { address: (*a).into(), notify: String::new(), orcpt: None })
            .collect(),
    }
}

async fn queued_messages_are_claimed_once_and_leave_when_done(t: TestStore) {
    let s = &t.store;
    let sealed = b"sealed bytes of the queued message".to_vec();
    let id = s
        .enqueue(&message(&["bob@b.example", "carol@b.example", "dave@c.example"]), &mut sealed.as_slice())
        .await
        .unwrap();
    assert_eq!(id.len(), 32);
    // Nothing without recipients or with a recipient lacking a domain.
    assert!(s.enqueue(&message(&[]), &mut &b"x"[..]).await.is_err());
    assert!(s.enqueue(&message(&["nodomain"]), &mut &b"x"[..]).await.is_err());

    // After a restart the message is still there, due now, grouped by domain.
    let s = t.reopen().await;
    let now = SystemTime::now();
    let mut claimed = s.claim_due(now, Duration::from_secs(60), 100).await.unwrap();
    claimed.sort_by(|a, b| a.domain.cmp(&b.domain));
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    assert_eq!(claimed[0].domain, "b.example");
    assert_eq!(claimed[0].recipients.len(), 2);
    assert_eq!(claimed[1].domain, "c.example");
    assert_eq!(claimed[0].message.queue_id, id);
    assert_eq!(claimed[0].message.envid.as_deref(), Some("env-1"));
    assert_eq!(claimed[0].message.protection, protection());
    let mut blob = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(
        &mut s.read_queued_blob(&claimed[0].message).await.unwrap(),
        &mut blob,
    )
    .await
    .unwrap();
    assert_eq!(blob, sealed);
    // Claimed rows are leased: a second runner gets nothing until the lease ends.
    assert!(s.claim_due(now, Duration::from_secs(60), 100).await.unwrap().is_empty());
    assert_eq!(
        s.claim_due(now + Duration::from_secs(61), Duration::from_secs(60), 100).await.unwrap().len(),
        2
    );

    // Outcomes: bob delivered, carol retried later, dave failed.
    let later = now + Duration::from_secs(300);
    let (bob, carol, dave) =
        (claimed[0].recipients[0].id, claimed[0].recipients[1].id, claimed[1].recipients[0].id);
    s.record_delivery_outcomes(
        &[
            (bob, QueueOutcome::Delivered { remote: "mx.b.example".into(), reply: "250 2.0.0 ok".into() }),
            (
                carol,
                QueueOutcome::Retry {
                    at: later,
                    status: "4.2.2".into(),
                    reply: "452 4.2.2 mailbox full".into(),
                    remote: Some("mx.b.example".into()),
                    warned: false,
                },
            ),
            (
                dave,
                QueueOutcome::Failed {
                    status: "5.1.1".into(),
                    reply: "550 5.1.1 no such user".into(),
                    remote: None,
                },
            ),
        ],
        None,
    )
    .await
    .unwrap();
    let listing = s.queue_listing().await.unwrap();
    assert_eq!(listing.len(), 1);
    let states: Vec<(&str, &str, u32)> =
        listing[0].recipients.iter().map(|r| (r.0.as_str(), r.1.as_str(), r.2)).collect();
    assert_eq!(
        states,
        [
            ("bob@b.example", "delivered", 1),
            ("carol@b.example", "queued", 1),
            ("dave@c.example", "failed", 1)
        ]
    );
    assert!(
        s.claim_due(later - Duration::from_secs(1), Duration::from_secs(60), 100).await.unwrap().is_empty()
    );
    let again = s.claim_due(later, Duration::from_secs(60), 100).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].recipients[0].address, "carol@b.example");
    assert_eq!(again[0].recipients[0].attempts, 1);

    // The last recipient done: the message and its blob leave the queue.
    let blob_files = || common::files_under(&t.config.blob_dir);
    let before = blob_files().len();
    s.record_delivery_outcomes(
        &[(
            again[0].recipients[0].id,
            QueueOutcome::Delivered { remote: "mx.b.example".into(), reply: "250 ok".into() },
        )],
        None,
    )
    .await
    .unwrap();
    assert!(s.queue_listing().await.unwrap().is_empty());
    assert_eq!(blob_files().len(), before - 1);
}

async fn queue_blobs_are_not_swept_as_orphans(t: TestStore) {
    let s = &t.store;
    s.enqueue(&message(&["bob@b.example"]), &mut &b"queued"[..]).await.unwrap();
    // A store whose orphan grace is zero sweeps at open: the queued blob must survive.
    let config = StoreConfig { orphan_grace: Duration::ZERO, ..t.config.clone() };
    let s2 = Store::open(config).await.unwrap();
    let claimed = s2.claim_due(SystemTime::now(), Duration::from_secs(60), 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(s2.read_queued_blob(&claimed[0].message).await.is_ok());
    let mut bytes = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(
        &mut s2.read_queued_blob(&claimed[0].message).await.unwrap(),
        &mut bytes,
    )
    .await
    .unwrap();
    assert_eq!(bytes, b"queued");
}

async fn operators_retry_and_delete_queued_messages(t: TestStore) {
    let s = &t.store;
    let first = s.enqueue(&message(&["bob@b.example", "carol@b.example"]), &mut &b"first"[..]).await.unwrap();
    let second = s.enqueue(&message(&["dave@c.example"]), &mut &b"second"[..]).await.unwrap();
    let now = SystemTime::now();
    let claimed = s.claim_due(now, Duration::from_secs(60), 100).await.unwrap();
    // Every recipient waits an hour (as after a failed attempt) but bob, who was delivered.
    let hour = now + Duration::from_secs(3600);
    let retry = |at| QueueOutcome::Retry {
        at,
        status: "4.4.1".into(),
        reply: "peer unreachable".into(),
        remote: None,
        warned: false,
    };
    let mut outcomes = Vec::new();
    for d in &claimed {
        for r in &d.recipients {
            let outcome = if r.address == "bob@b.example" {
                QueueOutcome::Delivered { remote: "mx.b.example".into(), reply: "250 ok".into() }
            } else {
                retry(hour)
            };
            outcomes.push((r.id, outcome));
        }
    }
    s.record_delivery_outcomes(&outcomes, None).await.unwrap();
    assert!(s.claim_due(SystemTime::now(), Duration::from_secs(60), 100).await.unwrap().is_empty());

    // The message as an operator looks it up: only carol still waits.
    let (m, waiting) = s.queued_message(&first).await.unwrap().unwrap();
    assert_eq!((m.queue_id.as_str(), m.sender.as_str(), m.size), (first.as_str(), "alice@a.example", 1234));
    assert_eq!(waiting.iter().map(|r| r.address.as_str()).collect::<Vec<_>>(), ["carol@b.example"]);
    assert_eq!(waiting[0].attempts, 1);
    assert!(s.queued_message("0123456789abcdef0123456789abcdef").await.unwrap().is_none());

    // Retry one message: only its waiting recipient becomes due, once.
    assert_eq!(s.retry_queued_now(Some(&first)).await.unwrap(), 1);
    assert_eq!(s.retry_queued_now(Some("no-such-id")).await.unwrap(), 0);
    let due = s.claim_due(SystemTime::now(), Duration::from_secs(60), 100).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].recipients[0].address, "carol@b.example");
    s.record_delivery_outcomes(&[(due[0].recipients[0].id, retry(hour))], None).await.unwrap();
    // Retry everything: both waiting recipients become due.
    assert_eq!(s.retry_queued_now(None).await.unwrap(), 2);
    let due = s.claim_due(SystemTime::now(), Duration::from_secs(60), 100).await.unwrap();
    let mut addresses: Vec<&str> =
        due.iter().flat_map(|d| &d.recipients).map(|r| r.address.as_str()).collect();
    addresses.sort_unstable();
    assert_eq!(addresses, ["carol@b.example", "dave@c.example"]);
    // While their attempts are under way, "retry now" leaves them to their runner: no second
    // runner may take them.
    assert_eq!(s.retry_queued_now(None).await.unwrap(), 0, "in-flight recipients made due again");
    assert!(s.claim_due(SystemTime::now(), Duration::from_secs(60), 100).await.unwrap().is_empty());

    // Delete the first message while its recipient is leased: it leaves with its blob, the
    // waiting recipient is returned, and the late outcome of the attempt changes nothing.
    let blob_files = || common::files_under(&t.config.blob_dir);
    let before = blob_files().len();
    let carol = due.iter().flat_map(|d| &d.recipients).find(|r| r.address == "carol@b.example").unwrap();
    let removed = s.delete_queued(&first).await.unwrap().unwrap();
    assert_eq!(removed.iter().map(|r| r.address.as_str()).collect::<Vec<_>>(), ["carol@b.example"]);
    assert_eq!(blob_files().len(), before - 1);
    s.record_delivery_outcomes(&[(carol.id, retry(hour))], None).await.unwrap();
    assert!(s.delete_queued(&first).await.unwrap().is_none(), "deleted twice");
    assert!(s.queued_message(&first).await.unwrap().is_none());
    let listing = s.queue_listing().await.unwrap();
    assert_eq!(listing.iter().map(|l| l.queue_id.as_str()).collect::<Vec<_>>(), [second.as_str()]);
}
