//! The web API's state (schema v3) on SQLite and PostgreSQL: refresh tokens rotate and a
//! replayed one revokes its session; reset tokens work once; settings; uploads per account.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use qutemail_store::testing::TestStore;
use qutemail_store::*;

on_both_backends!(
    refresh_tokens_rotate_and_reuse_revokes_the_session,
    logout_and_password_change_revoke_sessions,
    reset_tokens_are_single_use_and_expire,
    settings_are_kept_per_account,
    uploads_and_messages_belong_to_their_account,
);

fn later(s: u64) -> SystemTime {
    SystemTime::now() + Duration::from_secs(s)
}

async fn refresh_tokens_rotate_and_reuse_revokes_the_session(t: TestStore) {
    let s = &t.store;
    let a = create(s, "alice@a.example").await;
    let sid = s.web_create_session(a.id, "h1", later(3600)).await.unwrap();
    assert_eq!(s.web_session_account(&sid).await.unwrap().as_deref(), Some("alice@a.example"));
    assert_eq!(
        s.web_rotate_refresh("h1", "h2", later(3600)).await.unwrap(),
        RefreshOutcome::Rotated { session_id: sid.clone(), address: "alice@a.example".into() }
    );
    assert_eq!(
        s.web_rotate_refresh("h2", "h3", later(3600)).await.unwrap(),
        RefreshOutcome::Rotated { session_id: sid.clone(), address: "alice@a.example".into() }
    );
    // h1 was spent: presenting it again revokes the whole session, h3 included.
    assert_eq!(
        s.web_rotate_refresh("h1", "h4", later(3600)).await.unwrap(),
        RefreshOutcome::Reused { session_id: sid.clone() }
    );
    assert_eq!(s.web_session_account(&sid).await.unwrap(), None);
    assert_eq!(s.web_rotate_refresh("h3", "h5", later(3600)).await.unwrap(), RefreshOutcome::Invalid);
    assert_eq!(s.web_rotate_refresh("unknown", "h6", later(3600)).await.unwrap(), RefreshOutcome::Invalid);
    // An expired refresh token is refused.
    let sid2 = s.web_create_session(a.id, "old", SystemTime::now() - Duration::from_secs(1)).await.unwrap();
    assert_eq!(s.web_rotate_refresh("old", "h7", later(3600)).await.unwrap(), RefreshOutcome::Invalid);
    assert!(s.web_session_account(&sid2).await.unwrap().is_some());
    // A disabled account's session is not live.
    s.set_disabled("alice@a.example", true).await.unwrap();
    assert_eq!(s.web_session_account(&sid2).await.unwrap(), None);
}

async fn logout_and_password_change_revoke_sessions(t: TestStore) {
    let s = &t.store;
    let a = create(s, "alice@a.example").await;
    let b = create(s, "bob@a.example").await;
    let one = s.web_create_session(a.id, "a1", later(60)).await.unwrap();
    let two = s.web_create_session(a.id, "a2", later(60)).await.unwrap();
    let three = s.web_create_session(a.id, "a3", later(60)).await.unwrap();
    let bobs = s.web_create_session(b.id, "b1", later(60)).await.unwrap();
    s.web_revoke_session(&one).await.unwrap();
    assert_eq!(s.web_session_account(&one).await.unwrap(), None);
    assert_eq!(s.web_rotate_refresh("a1", "x", later(60)).await.unwrap(), RefreshOutcome::Invalid);
    assert_eq!(s.web_revoke_account_sessions(a.id, Some(&two)).await.unwrap(), 1);
    assert!(s.web_session_account(&two).await.unwrap().is_some());
    assert_eq!(s.web_session_account(&three).await.unwrap(), None);
    assert!(s.web_session_account(&bobs).await.unwrap().is_some(), "another account is untouched");
}

async fn reset_tokens_are_single_use_and_expire(t: TestStore) {
    let s = &t.store;
    let a = create(s, "alice@a.example").await;
    s.web_create_reset_token(a.id, "r1", later(1800)).await.unwrap();
    s.web_create_reset_token(a.id, "r2", SystemTime::now() - Duration::from_secs(1)).await.unwrap();
    assert_eq!(s.web_consume_reset_token("r1").await.unwrap().as_deref(), Some("alice@a.example"));
    assert_eq!(s.web_consume_reset_token("r1").await.unwrap(), None, "second use refused");
    assert_eq!(s.web_consume_reset_token("r2").await.unwrap(), None, "expired");
    assert_eq!(s.web_consume_reset_token("nope").await.unwrap(), None);
}

async fn settings_are_kept_per_account(t: TestStore) {
    let s = &t.store;
    let a = create(s, "alice@a.example").await;
    let b = create(s, "bob@a.example").await;
    assert_eq!(s.web_settings(a.id).await.unwrap(), WebSettings::default());
    let set = s
        .web_update_settings(
            a.id,
            &WebSettingsUpdate {
                display_name: Some("Alice A.".into()),
                default_mode: Some(Some("otp".into())),
                recovery_address: Some(Some("Alice@Elsewhere.Example".into())),
            },
        )
        .await
        .unwrap();
    assert_eq!(set.recovery_address.as_deref(), Some("alice@elsewhere.example"));
    assert_eq!(s.account("alice@a.example").await.unwrap().display_name, "Alice A.");
    // A partial update keeps the rest; clearing works.
    let set = s
        .web_update_settings(a.id, &WebSettingsUpdate { default_mode: Some(None), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(
        set,
        WebSettings { default_mode: None, recovery_address: Some("alice@elsewhere.example".into()) }
    );
    assert_eq!(s.web_settings(b.id).await.unwrap(), WebSettings::default());
    let bad =
        WebSettingsUpdate { recovery_address: Some(Some("not an address".into())), ..Default::default() };
    assert!(s.web_update_settings(a.id, &bad).await.is_err());
}

async fn uploads_and_messages_belong_to_their_account(t: TestStore) {
    let s = &t.store;
    let a = create(s, "alice@a.example").await;
    let b = create(s, "bob@a.example").await;
    let p = protection("u");
    let id = s
        .web_put_upload(&NewUpload {
            account: a.id,
            filename: "r.pdf",
            content_type: "application/pdf",
            size: 3,
            sealed: b"sealed-bytes",
            protection: &p,
            expires_at: later(3600),
        })
        .await
        .unwrap();
    let up = s.web_upload(a.id, &id).await.unwrap().unwrap();
    assert_eq!((up.filename.as_str(), up.size, up.sealed.as_slice()), ("r.pdf", 3, &b"sealed-bytes"[..]));
    assert_eq!(up.protection.wrapped_key, p.wrapped_key);
    assert!(s.web_upload(b.id, &id).await.unwrap().is_none(), "not bob's");
    s.web_put_upload(&NewUpload {
        account: a.id,
        filename: "old",
        content_type: "text/plain",
        size: 1,
        sealed: b"x",
        protection: &p,
        expires_at: SystemTime::now() - Duration::from_secs(1),
    })
    .await
    .unwrap();
    assert_eq!(s.web_upload_count(a.id).await.unwrap(), 2);
    assert_eq!(s.web_delete_expired_uploads().await.unwrap(), 1);
    assert_eq!(s.web_upload_count(a.id).await.unwrap(), 1);

    let inbox = s.mailbox(a.id, "INBOX").await.unwrap();
    let m = append(s, inbox.id, b"message").await;
    let (mb, meta) = s.web_message(a.id, &m.unique_id).await.unwrap().unwrap();
    assert_eq!((mb.name.as_str(), meta.uid), ("INBOX", m.uid));
    assert!(s.web_message(b.id, &m.unique_id).await.unwrap().is_none(), "bob cannot address alice's mail");
    s.web_record_sent(a.id, &m.unique_id, "hybrid", &[("bob@b.example".into(), "q1".into())]).await.unwrap();
    let rec = s.web_sent(a.id, &m.unique_id).await.unwrap().unwrap();
    assert_eq!(rec.recipients, vec![("bob@b.example".to_string(), "q1".to_string())]);
    assert!(s.web_sent(b.id, &m.unique_id).await.unwrap().is_none());
}
