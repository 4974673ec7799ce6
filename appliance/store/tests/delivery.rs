//! Delivery records (schema v5), on SQLite and on PostgreSQL: the queue's final outcome per
//! recipient — delivered with the QKD key IDs, link, KMEs and signed certificate of the sealed
//! envelope, or bounced with its reply — outlives the queue entry and a reopen, an operator's
//! deletion reports the waiting recipients bounced, nothing is recorded for an attempt that is
//! refused as invalid, old records are pruned, and backup's dump carries them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime};

use qutemail_store::testing::TestStore;
use qutemail_store::*;

on_both_backends!(
    outcomes_and_their_keys_outlive_the_queue_entry,
    an_operators_deletion_reports_the_waiting_recipients_bounced,
    an_invalid_record_changes_nothing,
    records_past_the_retention_are_pruned,
    a_dump_carries_the_delivery_records
);

fn message(recipients: &[&str]) -> NewQueuedMessage {
    NewQueuedMessage {
        sender: "alice@a.example".into(),
        envid: None,
        ret_full: false,
        requested: Some("hybrid".into()),
        size: 321,
        protection: Protection {
            kind: "at-rest.normal".into(),
            wrapped_key: vec![7; 40],
            key_ids: vec![],
            certificate: None,
        },
        recipients: recipients
            .iter()
            .map(|a| NewQueueRecipient { address: (*a).into(), notify: String::new(), orcpt: None })
            .collect(),
    }
}

/// What an envelope sealed for b.example in hybrid mode carried.
fn sealed_for_b() -> DeliveryProtection {
    DeliveryProtection {
        mode: "hybrid".into(),
        algorithm: Some("QKD-MLKEM768-HKDF-SHA256-AES256GCM-STREAM".into()),
        key_ids: vec!["0b7f2c1e-8a51-4d6e-9c3b-2f4a5e6d7c8b".into()],
        link_id: Some("link-a-b".into()),
        source_kme_id: Some("KME-A".into()),
        target_kme_id: Some("KME-B".into()),
        certificate: Some(br#"{"certificate":{"mode":"hybrid"},"signature":"c2lnbmF0dXJl"}"#.to_vec()),
    }
}

fn delivered(reply: &str) -> QueueOutcome {
    QueueOutcome::Delivered { remote: "127.0.0.1:2525".into(), reply: reply.into() }
}

async fn claim(s: &Store) -> Vec<QueuedDelivery> {
    let mut due = s
        .claim_due(SystemTime::now() + Duration::from_secs(7200), Duration::from_secs(60), 100)
        .await
        .unwrap();
    due.sort_by(|a, b| a.domain.cmp(&b.domain));
    due
}

fn states(status: &[RecipientDelivery]) -> Vec<(&str, DeliveryState, u32)> {
    status.iter().map(|r| (r.recipient.as_str(), r.state, r.attempts)).collect()
}

async fn outcomes_and_their_keys_outlive_the_queue_entry(t: TestStore) {
    let s = &t.store;
    let id = s
        .enqueue(&message(&["bob@b.example", "nobody@b.example", "dave@c.example"]), &mut &b"sealed"[..])
        .await
        .unwrap();
    let before = s.delivery_status(&id).await.unwrap();
    assert_eq!(
        states(&before),
        [
            ("bob@b.example", DeliveryState::Queued, 0),
            ("nobody@b.example", DeliveryState::Queued, 0),
            ("dave@c.example", DeliveryState::Queued, 0)
        ]
    );
    assert!(before.iter().all(|r| r.sent_as.is_none() && r.completed_at.is_none()));

    // One sealed delivery to b.example: bob accepted, nobody refused at RCPT. c.example waits.
    let due = claim(s).await;
    let (b, c) = (&due[0], &due[1]);
    assert_eq!((b.domain.as_str(), c.domain.as_str()), ("b.example", "c.example"));
    s.record_delivery_outcomes(
        &[
            (b.recipients[0].id, delivered("250 2.0.0 stored")),
            (
                b.recipients[1].id,
                QueueOutcome::Failed {
                    status: "5.1.1".into(),
                    reply: "550 5.1.1 no such mailbox".into(),
                    remote: Some("127.0.0.1:2525".into()),
                },
            ),
        ],
        Some(&sealed_for_b()),
    )
    .await
    .unwrap();
    let retry = QueueOutcome::Retry {
        at: SystemTime::now() + Duration::from_secs(60),
        status: "4.4.1".into(),
        reply: "next hop unreachable: connection refused".into(),
        remote: None,
        warned: false,
    };
    s.record_delivery_outcomes(&[(c.recipients[0].id, retry)], None).await.unwrap();
    let during = s.delivery_status(&id).await.unwrap();
    assert_eq!(
        states(&during),
        [
            ("bob@b.example", DeliveryState::Delivered, 1),
            ("nobody@b.example", DeliveryState::Bounced, 1),
            ("dave@c.example", DeliveryState::Deferred, 1)
        ]
    );
    assert_eq!(during[0].sent_as.as_ref(), Some(&sealed_for_b()));
    assert_eq!(during[0].reply.as_deref(), Some("250 2.0.0 stored"));
    assert_eq!(during[0].status.as_deref(), Some("2.0.0"));
    assert!(during[0].completed_at.is_some());
    assert_eq!(during[1].status.as_deref(), Some("5.1.1"));
    assert_eq!(during[1].reply.as_deref(), Some("550 5.1.1 no such mailbox"));
    assert_eq!(during[2].reply.as_deref(), Some("next hop unreachable: connection refused"));
    assert!(during[2].sent_as.is_none() && during[2].completed_at.is_none());

    // The last recipient relayed in normal mode: the message leaves the queue, its records stay.
    let due = claim(s).await;
    assert_eq!(due.len(), 1);
    let relayed = DeliveryProtection { mode: "normal".into(), ..DeliveryProtection::default() };
    s.record_delivery_outcomes(&[(due[0].recipients[0].id, delivered("250 ok"))], Some(&relayed))
        .await
        .unwrap();
    assert!(s.queued_message(&id).await.unwrap().is_none(), "the message left the queue");
    assert!(s.queue_listing().await.unwrap().is_empty());

    let s = t.reopen().await;
    let after = s.delivery_status(&id).await.unwrap();
    let mut by_name = states(&after);
    by_name.sort_by_key(|r| r.0);
    assert_eq!(
        by_name,
        [
            ("bob@b.example", DeliveryState::Delivered, 1),
            ("dave@c.example", DeliveryState::Delivered, 2),
            ("nobody@b.example", DeliveryState::Bounced, 1)
        ]
    );
    let find = |name: &str| after.iter().find(|r| r.recipient == name).unwrap();
    assert_eq!(find("bob@b.example").sent_as.as_ref(), Some(&sealed_for_b()));
    assert_eq!(find("bob@b.example").sent_as.as_ref().unwrap().certificate, sealed_for_b().certificate);
    assert_eq!(find("dave@c.example").sent_as.as_ref(), Some(&relayed));
    assert_eq!(find("nobody@b.example").status.as_deref(), Some("5.1.1"));
    assert!(s.delivery_status("0123456789abcdef0123456789abcdef").await.unwrap().is_empty());
}

async fn an_operators_deletion_reports_the_waiting_recipients_bounced(t: TestStore) {
    let s = &t.store;
    let id = s.enqueue(&message(&["bob@b.example", "carol@c.example"]), &mut &b"sealed"[..]).await.unwrap();
    let due = claim(s).await;
    s.record_delivery_outcomes(&[(due[0].recipients[0].id, delivered("250 ok"))], Some(&sealed_for_b()))
        .await
        .unwrap();
    let waiting = s.delete_queued(&id).await.unwrap().unwrap();
    assert_eq!(waiting.len(), 1);
    let status = s.delivery_status(&id).await.unwrap();
    assert_eq!(
        states(&status),
        [("bob@b.example", DeliveryState::Delivered, 1), ("carol@c.example", DeliveryState::Bounced, 0)]
    );
    assert_eq!(status[1].reply.as_deref(), Some(DELETED_BY_OPERATOR));
    assert!(status[1].sent_as.is_none());
    // The runner's outcome for the deleted recipient finds no row: nothing changes.
    s.record_delivery_outcomes(&[(due[1].recipients[0].id, delivered("250 late"))], None).await.unwrap();
    assert_eq!(s.delivery_status(&id).await.unwrap(), status);
}

async fn an_invalid_record_changes_nothing(t: TestStore) {
    let s = &t.store;
    let id = s.enqueue(&message(&["bob@b.example"]), &mut &b"sealed"[..]).await.unwrap();
    let due = claim(s).await;
    let unknown_mode = DeliveryProtection { mode: "quantum".into(), ..sealed_for_b() };
    let err = s
        .record_delivery_outcomes(&[(due[0].recipients[0].id, delivered("250 ok"))], Some(&unknown_mode))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid { what: "delivery protection", .. }), "{err}");
    assert!(err.to_string().contains("\"quantum\" is not a protection mode"), "{err}");
    let bad_key = DeliveryProtection { key_ids: vec!["a\nb".into()], ..sealed_for_b() };
    assert!(
        s.record_delivery_outcomes(&[(due[0].recipients[0].id, delivered("250 ok"))], Some(&bad_key))
            .await
            .is_err()
    );
    assert_eq!(states(&s.delivery_status(&id).await.unwrap()), [("bob@b.example", DeliveryState::Queued, 0)]);
}

async fn records_past_the_retention_are_pruned(t: TestStore) {
    let s = &t.store;
    let old = s.enqueue(&message(&["bob@b.example"]), &mut &b"old"[..]).await.unwrap();
    let due = claim(s).await;
    s.record_delivery_outcomes(&[(due[0].recipients[0].id, delivered("250 ok"))], Some(&sealed_for_b()))
        .await
        .unwrap();
    assert_eq!(s.delivery_status(&old).await.unwrap().len(), 1);
    // Age the record past the retention, as if it had been written 31 days ago.
    let pool = sqlx::AnyPool::connect(&t.config.database_url).await.unwrap();
    let aged = SystemTime::now() - DELIVERY_RECORD_RETENTION - Duration::from_secs(86_400);
    let aged_ms = aged.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
    sqlx::query("UPDATE delivery_records SET recorded_at = $1 WHERE queue_id = $2")
        .bind(aged_ms)
        .bind(&old)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert_eq!(s.delivery_status(&old).await.unwrap().len(), 1, "pruned only when outcomes are recorded");

    let new = s.enqueue(&message(&["carol@b.example"]), &mut &b"new"[..]).await.unwrap();
    let due = claim(s).await;
    s.record_delivery_outcomes(&[(due[0].recipients[0].id, delivered("250 ok"))], Some(&sealed_for_b()))
        .await
        .unwrap();
    assert!(s.delivery_status(&old).await.unwrap().is_empty(), "the aged record is pruned");
    assert_eq!(
        states(&s.delivery_status(&new).await.unwrap()),
        [("carol@b.example", DeliveryState::Delivered, 1)]
    );
}

async fn a_dump_carries_the_delivery_records(t: TestStore) {
    let s = &t.store;
    common::create(s, "alice@a.example").await;
    let id = s.enqueue(&message(&["bob@b.example", "nobody@b.example"]), &mut &b"sealed"[..]).await.unwrap();
    let due = claim(s).await;
    let failed = QueueOutcome::Failed {
        status: "5.1.1".into(),
        reply: "550 5.1.1 no such mailbox".into(),
        remote: None,
    };
    s.record_delivery_outcomes(
        &[(due[0].recipients[0].id, delivered("250 ok")), (due[0].recipients[1].id, failed)],
        Some(&sealed_for_b()),
    )
    .await
    .unwrap();
    let status = s.delivery_status(&id).await.unwrap();
    let dump = s.dump().await.unwrap();
    assert_eq!(dump.count("delivery_records"), 2);
    assert_eq!(dump.count("queue_messages"), 0, "the message itself left the queue");

    let target = TestStore::new(s.backend()).await;
    target.store.load_dump(&dump).await.unwrap();
    assert_eq!(target.store.delivery_status(&id).await.unwrap(), status);
}
