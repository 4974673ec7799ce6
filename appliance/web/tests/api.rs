//! The REST API over real HTTPS against a real store (SQLite and PostgreSQL, each test runs on
//! both), a real SoftHSM token and the real vault and queue: authentication and token attacks,
//! mail routes and account isolation, compose per mode, uploads, the reset flow, errors and
//! headers, no plaintext on disk and no secret in logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use common::*;
use hyper::{Method, StatusCode};
use qutemail_hsm::testing::isolated;
use qutemail_store::Backend;
use qutemail_web::token::{AUDIENCE, Claims};
use serde_json::{Value, json};

const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn hs256(key: &[u8], input: &str) -> Vec<u8> {
    ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), input.as_bytes()).as_ref().to_vec()
}

#[test]
fn authentication_tokens_and_attacks() {
    isolated("authentication_tokens_and_attacks", &[TOKEN], |env| {
        runtime().block_on(async {
            for backend in BACKENDS {
                let s = Site::start(env, backend).await;
                auth_checks(&s).await;
            }
        })
    });
}

async fn auth_checks(s: &Site) {
    // Sign-up: created and logged in; taken, weak and malformed refused.
    let (st, v) = s
        .json(
            Method::POST,
            "/api/auth/signup/",
            None,
            Some(json!({"username": "carol", "password": "long enough pw", "display_name": "Carol"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["account"]["address"], "carol@a.test");
    assert_eq!((v["token_type"].as_str(), v["expires_in"].as_u64()), (Some("Bearer"), Some(900)));
    let (st, v) = s
        .json(
            Method::POST,
            "/api/auth/signup/",
            None,
            Some(json!({"username": "Carol", "password": "long enough pw"})),
        )
        .await;
    assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
    let (st, v) = s
        .json(Method::POST, "/api/auth/signup/", None, Some(json!({"username": "dave", "password": "short"})))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed"))
    );
    let (st, _) = s
        .json(
            Method::POST,
            "/api/auth/signup/",
            None,
            Some(json!({"username": "../x", "password": "long enough pw"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);

    // Login: by bare name and by address; wrong password is invalid_credentials.
    let (access, refresh) = s.login("alice", PASSWORD).await;
    let (st, v) = s.json(Method::GET, "/api/account/", Some(&access), None).await;
    assert_eq!(
        (st, v["address"].as_str(), v["is_admin"].as_bool()),
        (StatusCode::OK, Some("alice@a.test"), Some(true))
    );
    let (st, v) = s
        .json(
            Method::POST,
            "/api/auth/login/",
            None,
            Some(json!({"address": "alice@a.test", "password": "wrong password"})),
        )
        .await;
    assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_credentials")));

    // Token attacks.
    let [h, c, sig]: [&str; 3] = access.split('.').collect::<Vec<_>>().try_into().unwrap();
    let claims: Value = serde_json::from_slice(&B64URL.decode(c).unwrap()).unwrap();
    let none = format!("{}.{c}.", B64URL.encode(br#"{"alg":"none","typ":"JWT"}"#));
    let hs_header = B64URL.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let hs_input = format!("{hs_header}.{c}");
    let hs = format!("{hs_input}.{}", B64URL.encode(hs256(s.token_key.public_key(), &hs_input)));
    let mut tampered_claims = claims.clone();
    tampered_claims["sub"] = json!("bob@a.test");
    let tampered = format!("{h}.{}.{sig}", B64URL.encode(tampered_claims.to_string()));
    let base = Claims {
        iss: "qutemail:a.test".into(),
        aud: AUDIENCE.into(),
        sub: "alice@a.test".into(),
        sid: claims["sid"].as_str().unwrap().into(),
        iat: now() - 2000,
        nbf: now() - 2000,
        exp: now() - 1000,
    };
    let expired = s.token_key.sign(&base);
    let future = s.token_key.sign(&Claims { nbf: now() + 600, exp: now() + 1200, ..base.clone() });
    let foreign =
        s.token_key.sign(&Claims { iss: "qutemail:b.test".into(), exp: now() + 600, ..base.clone() });
    let wrong_aud = s.token_key.sign(&Claims { aud: "other".into(), exp: now() + 600, ..base.clone() });
    for (what, bad) in [
        ("alg none", none.as_str()),
        ("HS256 with the public key", hs.as_str()),
        ("tampered payload", tampered.as_str()),
        ("expired", expired.as_str()),
        ("not yet valid", future.as_str()),
        ("other issuer", foreign.as_str()),
        ("other audience", wrong_aud.as_str()),
        ("garbage", "a.b"),
    ] {
        let (st, v) = s.json(Method::GET, "/api/account/", Some(bad), None).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized")),
            "{what}: {v}"
        );
    }
    let (st, _) = s.json(Method::GET, "/api/account/", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "no token");

    // Refresh rotates; the spent token presented again ends the session (its access token too).
    let (st, v) =
        s.json(Method::POST, "/api/auth/refresh/", None, Some(json!({"refresh_token": refresh}))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let access2 = v["access_token"].as_str().unwrap().to_owned();
    let refresh2 = v["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(refresh2, refresh);
    assert_eq!(s.json(Method::GET, "/api/account/", Some(&access2), None).await.0, StatusCode::OK);
    let (st, _) =
        s.json(Method::POST, "/api/auth/refresh/", None, Some(json!({"refresh_token": refresh}))).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "reuse refused");
    assert_eq!(s.json(Method::GET, "/api/account/", Some(&access2), None).await.0, StatusCode::UNAUTHORIZED);
    let (st, _) =
        s.json(Method::POST, "/api/auth/refresh/", None, Some(json!({"refresh_token": refresh2}))).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "the whole family is revoked");

    // Logout: the access and refresh tokens stop working.
    let (access, refresh) = s.login("bob@a.test", PASSWORD).await;
    assert_eq!(
        s.json(Method::POST, "/api/auth/logout/", Some(&access), None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(s.json(Method::GET, "/api/account/", Some(&access), None).await.0, StatusCode::UNAUTHORIZED);
    let (st, _) =
        s.json(Method::POST, "/api/auth/refresh/", None, Some(json!({"refresh_token": refresh}))).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // Password change: the other session ends, this one stays; the old password is refused.
    let (a1, _) = s.login("bob", PASSWORD).await;
    let (a2, _) = s.login("bob", PASSWORD).await;
    let body = json!({"current_password": "not it at all", "new_password": "a new password"});
    assert_eq!(
        s.json(Method::POST, "/api/auth/password/", Some(&a1), Some(body)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let body = json!({"current_password": PASSWORD, "new_password": "a new password"});
    assert_eq!(
        s.json(Method::POST, "/api/auth/password/", Some(&a1), Some(body)).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(s.json(Method::GET, "/api/account/", Some(&a1), None).await.0, StatusCode::OK);
    assert_eq!(s.json(Method::GET, "/api/account/", Some(&a2), None).await.0, StatusCode::UNAUTHORIZED);
    s.login("bob", "a new password").await;

    // Failed logins (counted with IMAP, POP3 and SMTP AUTH): each one past the free ones slows
    // the next; the owner still gets in. A client address that keeps failing (8 times with
    // this test's settings) is refused with 429 and Retry-After for every account, also with
    // the right password.
    for _ in 0..5 {
        let (st, _) = s
            .json(
                Method::POST,
                "/api/auth/login/",
                None,
                Some(json!({"address": "carol", "password": "guess guess"})),
            )
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
    s.login("carol", "long enough pw").await;
    // Alice's guesser, from the same address: 401 until the address has failed 8 times (this
    // site had one failed login before these), then refused.
    let mut refused_after = None;
    for guess in 1..=8 {
        let (st, v) = s
            .json(
                Method::POST,
                "/api/auth/login/",
                None,
                Some(json!({"address": "alice", "password": "guess guess"})),
            )
            .await;
        if st == StatusCode::TOO_MANY_REQUESTS {
            refused_after = Some(guess);
            break;
        }
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_credentials"))
        );
    }
    assert!(refused_after.is_some(), "the address was never refused");
    let (st, headers, body) = s
        .send(
            Method::POST,
            "/api/auth/login/",
            &[("content-type", "application/json")],
            json!({"address": "alice", "password": PASSWORD}).to_string(),
        )
        .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{}", String::from_utf8_lossy(&body));
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=900).contains(&retry), "{retry}");
    let carol = json!({"address": "carol", "password": "long enough pw"});
    let (st, v) = s.json(Method::POST, "/api/auth/login/", None, Some(carol)).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited")),
        "the address is refused for every account"
    );
}

#[test]
fn mail_routes_compose_and_isolation() {
    isolated("mail_routes_compose_and_isolation", &[TOKEN], |env| {
        runtime().block_on(async {
            for backend in BACKENDS {
                let s = Site::start(env, backend).await;
                mail_checks(&s, backend).await;
            }
        })
    });
}

async fn wait_for_message(s: &Site, token: &str, folder: &str, subject: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (st, v) =
            s.json(Method::GET, &format!("/api/mail/folders/{folder}/messages/"), Some(token), None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        if let Some(m) = v["messages"].as_array().unwrap().iter().find(|m| m["subject"] == subject) {
            return m.clone();
        }
        assert!(std::time::Instant::now() < deadline, "{subject:?} never arrived in {folder}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn mail_checks(s: &Site, backend: Backend) {
    let (alice, _) = s.login("alice", PASSWORD).await;
    let (bob, _) = s.login("bob", PASSWORD).await;
    let canary = format!("CANARY-WEB-{}", backend.name());
    let attachment: Vec<u8> =
        (0..100_000u32).flat_map(|i| format!("{canary}-{i};").into_bytes()).take(150_000).collect();

    // Upload: streamed and sealed; over the limit 413 and nothing stored.
    let (st, up) = s.upload(&alice, "report.txt", &attachment).await;
    assert_eq!(st, StatusCode::CREATED, "{up}");
    assert_eq!(up["size"].as_u64(), Some(attachment.len() as u64));
    let alice_id = s.t.store.account("alice@a.test").await.unwrap().id;
    let (st, v) = s.upload(&alice, "big.bin", &vec![7u8; UPLOAD_LIMIT as usize + 1]).await;
    assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")));
    assert_eq!(s.t.store.web_upload_count(alice_id).await.unwrap(), 1, "the refused upload left nothing");

    // Compose to a local user with the attachment: in bob's INBOX and alice's Sent.
    let body = json!({"to": ["bob@a.test"], "subject": format!("Hello {canary}"), "text": format!("Body {canary}"),
        "attachments": [up["upload_id"]]});
    let (st, sent) = s.json(Method::POST, "/api/mail/compose/", Some(&alice), Some(body)).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{sent}");
    assert_eq!(sent["queued"][0], json!({"recipient": "bob@a.test", "queue_id": "local"}));
    let m = wait_for_message(s, &bob, "INBOX", &format!("Hello {canary}")).await;
    assert_eq!((m["seen"].as_bool(), m["has_attachments"].as_bool()), (Some(false), Some(true)));
    assert!(m["snippet"].as_str().unwrap().starts_with("Body CANARY"), "{m}");
    assert_eq!(m["from"]["address"], "alice@a.test");
    let id = m["id"].as_str().unwrap().to_owned();
    wait_for_message(s, &alice, "Sent", &format!("Hello {canary}")).await;

    // Folders with counts; inbox alias.
    let (_, f) = s.json(Method::GET, "/api/mail/folders/", Some(&bob), None).await;
    let inbox = f["folders"].as_array().unwrap().iter().find(|f| f["name"] == "INBOX").unwrap().clone();
    assert_eq!((inbox["role"].as_str(), inbox["unread"].as_u64()), (Some("inbox"), Some(1)));
    let (_, l) = s.json(Method::GET, "/api/mail/inbox/?page=1&per_page=10", Some(&bob), None).await;
    assert_eq!(l["total"].as_u64(), Some(1));
    assert_eq!(
        s.json(Method::GET, "/api/mail/inbox/?per_page=0", Some(&bob), None).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        s.json(Method::GET, "/api/mail/folders/Nope/messages/", Some(&bob), None).await.0,
        StatusCode::NOT_FOUND
    );

    // Another account cannot reach the message by id; malformed ids are not found.
    for path in [
        format!("/api/mail/{id}/decrypt/"),
        format!("/api/mail/{id}/raw/"),
        format!("/api/mail/{id}/attachments/0/"),
    ] {
        let (st, v) = s.json(Method::GET, &path, Some(&alice), None).await;
        assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{path}");
    }
    assert_eq!(
        s.json(Method::DELETE, &format!("/api/mail/{id}/"), Some(&alice), None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.json(Method::GET, "/api/mail/nothex/decrypt/", Some(&bob), None).await.0,
        StatusCode::NOT_FOUND
    );

    // Read: text, attachment list, marked seen; raw has the X-QKD headers; download intact.
    let (st, msg) = s.json(Method::GET, &format!("/api/mail/{id}/decrypt/"), Some(&bob), None).await;
    assert_eq!(st, StatusCode::OK, "{msg}");
    assert_eq!(
        (msg["text"].as_str().map(str::trim), msg["seen"].as_bool()),
        (Some(format!("Body {canary}").as_str()), Some(true))
    );
    assert_eq!(msg["attachments"][0]["filename"], "report.txt");
    assert_eq!(msg["protection"]["mode"], "normal");
    assert_eq!(msg["certificate"], Value::Null);
    let (st, headers, raw) = s
        .send(
            Method::GET,
            &format!("/api/mail/{id}/raw/"),
            &[("authorization", &format!("Bearer {bob}"))],
            "",
        )
        .await;
    assert_eq!((st, headers["content-type"].to_str().unwrap()), (StatusCode::OK, "message/rfc822"));
    assert!(raw.starts_with(b"X-QKD-Secure: False\r\n"));
    let (st, headers, got) = s
        .send(
            Method::GET,
            &format!("/api/mail/{id}/attachments/0/"),
            &[("authorization", &format!("Bearer {bob}"))],
            "",
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        headers["content-disposition"].to_str().unwrap().starts_with("attachment; filename=\"report.txt\"")
    );
    assert_eq!(&got[..], &attachment[..], "the attachment downloads intact");
    assert_eq!(
        s.json(Method::GET, &format!("/api/mail/{id}/attachments/9/"), Some(&bob), None).await.0,
        StatusCode::NOT_FOUND
    );

    // Flags, move, search, delete to Trash then for good.
    let (st, v) = s
        .json(
            Method::PATCH,
            &format!("/api/mail/{id}/"),
            Some(&bob),
            Some(json!({"seen": false, "flagged": true})),
        )
        .await;
    assert_eq!(
        (st, v["seen"].as_bool(), v["flagged"].as_bool()),
        (StatusCode::OK, Some(false), Some(true)),
        "{v}"
    );
    let (st, v) =
        s.json(Method::PATCH, &format!("/api/mail/{id}/"), Some(&bob), Some(json!({"folder": "Junk"}))).await;
    assert_eq!((st, v["folder"].as_str()), (StatusCode::OK, Some("Junk")));
    let (st, _) = s
        .json(Method::PATCH, &format!("/api/mail/{id}/"), Some(&bob), Some(json!({"folder": "Nowhere"})))
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, v) = s.json(Method::GET, "/api/mail/search/?q=hello%20canary", Some(&bob), None).await;
    assert_eq!(v["total"].as_u64(), Some(1), "{v}");
    let (_, v) = s.json(Method::GET, "/api/mail/search/?q=absent-word", Some(&bob), None).await;
    assert_eq!(v["total"].as_u64(), Some(0));
    assert_eq!(
        s.json(Method::DELETE, &format!("/api/mail/{id}/"), Some(&bob), None).await.0,
        StatusCode::NO_CONTENT
    );
    let (_, v) = s.json(Method::GET, "/api/mail/folders/Trash/messages/", Some(&bob), None).await;
    assert_eq!(v["messages"][0]["id"].as_str(), Some(id.as_str()));
    assert_eq!(
        s.json(Method::DELETE, &format!("/api/mail/{id}/"), Some(&bob), None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.json(Method::GET, &format!("/api/mail/{id}/decrypt/"), Some(&bob), None).await.0,
        StatusCode::NOT_FOUND
    );

    // Drafts: saved, replaced, sent (and then gone from Drafts).
    let (st, d) = s
        .json(
            Method::POST,
            "/api/mail/drafts/",
            Some(&alice),
            Some(json!({"to": [], "subject": "draft 1", "text": "x"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{d}");
    let (st, d2) = s
        .json(
            Method::PUT,
            &format!("/api/mail/drafts/{}", d["id"].as_str().unwrap()),
            Some(&alice),
            Some(json!({"to": ["bob@a.test"], "subject": "draft 2", "text": "y"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{d2}");
    let (_, v) = s.json(Method::GET, "/api/mail/folders/Drafts/messages/", Some(&alice), None).await;
    assert_eq!((v["total"].as_u64(), v["messages"][0]["subject"].as_str()), (Some(1), Some("draft 2")));
    let (st, _) = s
        .json(
            Method::POST,
            "/api/mail/compose/",
            Some(&alice),
            Some(json!({"to": ["bob@a.test"], "subject": "from draft", "text": "z", "draft_id": d2["id"]})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (_, v) = s.json(Method::GET, "/api/mail/folders/Drafts/messages/", Some(&alice), None).await;
    assert_eq!(v["total"].as_u64(), Some(0));

    // Compose to the peer site in each mode: a Sent copy and a queue entry each.
    for mode in ["hybrid", "qaes", "otp", "normal"] {
        let body = json!({"to": ["carol@b.test"], "subject": format!("to peer {mode}"), "text": "short", "mode": mode});
        let (st, v) = s.json(Method::POST, "/api/mail/compose/", Some(&alice), Some(body)).await;
        assert_eq!(st, StatusCode::ACCEPTED, "{mode}: {v}");
        assert_eq!(v["mode"], mode);
        let queue_id = v["queued"][0]["queue_id"].as_str().unwrap().to_owned();
        assert_eq!(queue_id.len(), 32, "{v}");
        let (_, q) = s.json(Method::GET, "/api/admin/queue/", Some(&alice), None).await;
        assert!(
            q["entries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["queue_id"] == queue_id.as_str() && e["recipient"] == "carol@b.test"),
            "{q}"
        );
        let (st, c) =
            s.json(Method::POST, "/api/qkd/confirm/", Some(&alice), Some(json!({"id": v["id"]}))).await;
        assert_eq!(
            (st, c["state"].as_str(), c["mode"].as_str()),
            (StatusCode::OK, Some("queued"), Some(mode)),
            "{c}"
        );
        wait_for_message(s, &alice, "Sent", &format!("to peer {mode}")).await;
    }
    // The account default applies when compose names no mode.
    let (st, v) = s
        .json(Method::PUT, "/api/account/settings/", Some(&alice), Some(json!({"default_mode": "qaes"})))
        .await;
    assert_eq!((st, v["default_mode"].as_str()), (StatusCode::OK, Some("qaes")));
    let (_, v) = s
        .json(
            Method::POST,
            "/api/mail/compose/",
            Some(&alice),
            Some(json!({"to": ["carol@b.test"], "subject": "default", "text": "t"})),
        )
        .await;
    assert_eq!(v["mode"], "qaes");
    // OTP over the site's limit: 422 with the limits; a QKD mode to a domain without a link: 422.
    let big = "x".repeat(OTP_LIMIT + 10);
    let (st, v) = s
        .json(
            Method::POST,
            "/api/mail/compose/",
            Some(&alice),
            Some(json!({"to": ["carol@b.test"], "subject": "big", "text": big, "mode": "otp"})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("otp_too_large")),
        "{v}"
    );
    assert_eq!(v["error"]["details"]["limit_bytes"].as_u64(), Some(OTP_LIMIT as u64));
    assert!(v["error"]["details"]["message_bytes"].as_u64().unwrap() > OTP_LIMIT as u64);
    let (st, v) = s
        .json(
            Method::POST,
            "/api/mail/compose/",
            Some(&alice),
            Some(json!({"to": ["x@elsewhere.test"], "subject": "s", "text": "t", "mode": "qaes"})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("mode_unavailable")),
        "{v}"
    );
    for bad in [
        json!({"to": [], "text": "t"}),
        json!({"to": ["not an address"]}),
        json!({"to": ["bob@a.test"], "mode": "quantum"}),
        json!({"to": ["nobody@a.test"], "text": "t"}),
        json!({"to": ["bob@a.test"], "attachments": ["ffff"]}),
    ] {
        let (st, v) = s.json(Method::POST, "/api/mail/compose/", Some(&alice), Some(bad.clone())).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {v}");
    }
    // Bob cannot confirm alice's sent message.
    let sent_id = sent["id"].as_str().unwrap();
    assert_eq!(
        s.json(Method::POST, "/api/qkd/confirm/", Some(&bob), Some(json!({"id": sent_id}))).await.0,
        StatusCode::NOT_FOUND
    );

    // QKD readiness: the peer is linked but its kmd is unreachable here: not ready, no error.
    let (st, v) = s
        .json(Method::POST, "/api/qkd/request_key/", Some(&bob), Some(json!({"recipient": "carol@b.test"})))
        .await;
    assert_eq!(
        (st, v["ready"].as_bool(), v["sae_id"].as_str()),
        (StatusCode::OK, Some(false), Some("B-mail")),
        "{v}"
    );
    let (_, v) = s
        .json(
            Method::POST,
            "/api/qkd/request_key/",
            Some(&bob),
            Some(json!({"recipient": "x@elsewhere.test"})),
        )
        .await;
    assert_eq!((v["mode_if_sent_now"].as_str(), v["sae_id"].clone()), (Some("normal"), Value::Null));
    let (_, v) = s.json(Method::GET, "/api/modes/", None, None).await;
    assert_eq!(v["modes"][2]["max_bytes"].as_u64(), Some(OTP_LIMIT as u64));

    // Admin: bob is refused, alice sees users, creates and disables one, issues a reset token.
    for path in ["/api/admin/users/", "/api/admin/links/", "/api/admin/queue/", "/api/admin/saes/"] {
        let (st, v) = s.json(Method::GET, path, Some(&bob), None).await;
        assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{path}");
        assert_eq!(s.json(Method::GET, path, Some(&alice), None).await.0, StatusCode::OK, "{path}");
    }
    let (st, _) = s
        .json(
            Method::POST,
            "/api/admin/users/",
            Some(&alice),
            Some(json!({"address": "erin@a.test", "password": "erins password"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _) = s
        .json(
            Method::POST,
            "/api/admin/users/",
            Some(&alice),
            Some(json!({"address": "erin@b.test", "password": "erins password"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "only this site's domain");
    let (erin, _) = s.login("erin", "erins password").await;
    let (st, v) = s
        .json(Method::PATCH, "/api/admin/users/erin@a.test", Some(&alice), Some(json!({"disabled": true})))
        .await;
    assert_eq!((st, v["disabled"].as_bool()), (StatusCode::OK, Some(true)));
    assert_eq!(
        s.json(Method::GET, "/api/account/", Some(&erin), None).await.0,
        StatusCode::UNAUTHORIZED,
        "disabled: sessions end"
    );
    assert_eq!(
        s.json(Method::PATCH, "/api/admin/users/nobody@a.test", Some(&alice), Some(json!({}))).await.0,
        StatusCode::NOT_FOUND
    );
    let (st, v) = s.json(Method::POST, "/api/admin/users/bob@a.test/reset-token", Some(&alice), None).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, _) = s
        .json(
            Method::POST,
            "/api/auth/reset/confirm/",
            None,
            Some(json!({"token": v["token"], "new_password": "bobs new password"})),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(
        s.json(Method::GET, "/api/account/", Some(&bob), None).await.0,
        StatusCode::UNAUTHORIZED,
        "reset ends sessions"
    );

    // No plaintext on disk: neither the body/subject canary nor the attachment's.
    let mut dirs = vec![s.t.dir.path().to_path_buf()];
    if let Some(pg) = qutemail_store::testing::postgres_data_dir_if(backend) {
        dirs.push(pg);
    }
    for dir in &dirs {
        let hits = files_containing(dir, canary.as_bytes());
        assert!(hits.is_empty(), "plaintext canary on disk: {hits:?}");
    }
}

#[test]
fn password_reset_by_mail_end_to_end() {
    isolated("password_reset_by_mail_end_to_end", &[TOKEN], |env| {
        runtime().block_on(async {
            for backend in BACKENDS {
                let s = Site::start(env, backend).await;
                let (alice, _) = s.login("alice", PASSWORD).await;
                let (st, v) = s
                    .json(
                        Method::PUT,
                        "/api/account/settings/",
                        Some(&alice),
                        Some(json!({"recovery_address": "bob@a.test", "display_name": "Alice A."})),
                    )
                    .await;
                assert_eq!(
                    (st, v["recovery_address"].as_str(), v["display_name"].as_str()),
                    (StatusCode::OK, Some("bob@a.test"), Some("Alice A."))
                );
                // Always 202, also for an unknown account.
                for address in ["alice", "nobody@a.test"] {
                    let (st, _) = s
                        .json(
                            Method::POST,
                            "/api/auth/reset/request/",
                            None,
                            Some(json!({"address": address})),
                        )
                        .await;
                    assert_eq!(st, StatusCode::ACCEPTED);
                }
                // The token arrives in the recovery mailbox (bob's INBOX), read through the store.
                let (bob, _) = s.login("bob", PASSWORD).await;
                let m = wait_for_message(&s, &bob, "INBOX", "Password reset for alice@a.test").await;
                let (_, msg) = s
                    .json(
                        Method::GET,
                        &format!("/api/mail/{}/decrypt/", m["id"].as_str().unwrap()),
                        Some(&bob),
                        None,
                    )
                    .await;
                let text = msg["text"].as_str().unwrap();
                let token = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("Reset token: "))
                    .unwrap()
                    .trim()
                    .to_owned();
                let (st, v) = s
                    .json(
                        Method::POST,
                        "/api/auth/reset/confirm/",
                        None,
                        Some(json!({"token": token, "new_password": "short"})),
                    )
                    .await;
                assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
                let (st, _) = s
                    .json(
                        Method::POST,
                        "/api/auth/reset/confirm/",
                        None,
                        Some(json!({"token": token, "new_password": "alices new password"})),
                    )
                    .await;
                assert_eq!(st, StatusCode::NO_CONTENT);
                assert_eq!(
                    s.json(Method::GET, "/api/account/", Some(&alice), None).await.0,
                    StatusCode::UNAUTHORIZED
                );
                s.login("alice", "alices new password").await;
                let (st, v) = s
                    .json(
                        Method::POST,
                        "/api/auth/reset/confirm/",
                        None,
                        Some(json!({"token": token, "new_password": "another password"})),
                    )
                    .await;
                assert_eq!(
                    (st, v["error"]["code"].as_str()),
                    (StatusCode::BAD_REQUEST, Some("invalid_token")),
                    "single use"
                );
                let (st, _) = s
                    .json(
                        Method::POST,
                        "/api/auth/reset/confirm/",
                        None,
                        Some(json!({"token": "made-up", "new_password": "another password"})),
                    )
                    .await;
                assert_eq!(st, StatusCode::BAD_REQUEST);
            }
        })
    });
}

/// Captures tracing output in memory.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn errors_headers_openapi_and_quiet_logs() {
    isolated("errors_headers_openapi_and_quiet_logs", &[TOKEN], |env| {
        let logs = LogBuffer::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        runtime().block_on(async {
            let s = Site::start(env, Backend::Sqlite).await;
            // Unknown route, wrong method, bad JSON, wrong content type, too large: all JSON errors.
            let (st, v) = s.json(Method::GET, "/api/nothing/", None, None).await;
            assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
            let (st, v) = s.json(Method::DELETE, "/api/auth/login/", None, None).await;
            assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")));
            let (st, _, b) = s.send(Method::POST, "/api/auth/login/", &[("content-type", "application/json")], "{not json").await;
            let v: Value = serde_json::from_slice(&b).unwrap();
            assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_json")));
            let (st, _, b) = s.send(Method::POST, "/api/auth/login/", &[("content-type", "text/plain")], "{}").await;
            let v: Value = serde_json::from_slice(&b).unwrap();
            assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupported_media_type")));
            let (st, v) = s.json(Method::POST, "/api/auth/login/", None, Some(json!({"address": 5}))).await;
            assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("validation_failed")));
            let huge = format!("{{\"address\":\"{}\",\"password\":\"x\"}}", "a".repeat(3 * 1024 * 1024));
            let (st, _, b) = s.send(Method::POST, "/api/auth/login/", &[("content-type", "application/json")], huge).await;
            let v: Value = serde_json::from_slice(&b).unwrap();
            assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")));

            // Security headers everywhere; no-store on the API; the SPA with its assets.
            for path in ["/", "/admin", "/assets/app.js", "/api/modes/", "/api/nothing"] {
                let (st, h, _) = s.send(Method::GET, path, &[], "").await;
                assert!(st == StatusCode::OK || st == StatusCode::NOT_FOUND, "{path}: {st}");
                assert!(h["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"), "{path}");
                assert_eq!(h["x-content-type-options"], "nosniff");
                assert_eq!(h["x-frame-options"], "DENY");
                assert_eq!(h["referrer-policy"], "no-referrer");
                assert!(h.contains_key("strict-transport-security"));
                if path.starts_with("/api/") {
                    assert_eq!(h["cache-control"], "no-store", "{path}");
                }
            }
            let (st, h, body) = s.send(Method::GET, "/", &[], "").await;
            assert_eq!((st, h["content-type"].to_str().unwrap()), (StatusCode::OK, "text/html; charset=utf-8"));
            assert!(String::from_utf8_lossy(&body).contains("/assets/app.js"));
            let etag = h["etag"].to_str().unwrap().to_owned();
            let (st, _, _) = s.send(Method::GET, "/", &[("if-none-match", &etag)], "").await;
            assert_eq!(st, StatusCode::NOT_MODIFIED);
            let (_, h, _) = s.send(Method::GET, "/assets/app.css", &[], "").await;
            assert_eq!(h["content-type"], "text/css; charset=utf-8");

            // The OpenAPI document: 3.1, every route of the contract.
            let (st, _, doc) = s.send(Method::GET, "/api/openapi.json", &[], "").await;
            assert_eq!(st, StatusCode::OK);
            let doc: Value = serde_json::from_slice(&doc).unwrap();
            assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
            for (path, method) in [
                ("/api/auth/signup/", "post"), ("/api/auth/login/", "post"), ("/api/auth/refresh/", "post"),
                ("/api/auth/logout/", "post"), ("/api/auth/password/", "post"), ("/api/auth/reset/request/", "post"),
                ("/api/auth/reset/confirm/", "post"), ("/api/admin/users/{address}/reset-token", "post"),
                ("/api/account/", "get"), ("/api/account/settings/", "put"), ("/api/mail/folders/", "get"),
                ("/api/mail/inbox/", "get"), ("/api/mail/folders/{name}/messages/", "get"), ("/api/mail/{id}/decrypt/", "get"),
                ("/api/mail/{id}/raw/", "get"), ("/api/mail/{id}/attachments/{index}/", "get"), ("/api/mail/{id}/", "patch"),
                ("/api/mail/{id}/", "delete"), ("/api/mail/attachments/", "post"), ("/api/mail/compose/", "post"),
                ("/api/mail/drafts/", "post"), ("/api/mail/drafts/{id}", "put"), ("/api/mail/search/", "get"),
                ("/api/modes/", "get"), ("/api/qkd/request_key/", "post"), ("/api/qkd/confirm/", "post"),
                ("/api/admin/users/", "get"), ("/api/admin/users/", "post"), ("/api/admin/users/{address}", "patch"),
                ("/api/admin/links/", "get"), ("/api/admin/queue/", "get"), ("/api/admin/saes/", "get"),
            ] {
                assert!(doc["paths"][path][method].is_object(), "{method} {path} missing from the OpenAPI document");
            }

            // No secret or content in the logs: passwords, tokens, subjects, bodies.
            let secret_pw = "Secret-Password-7731";
            let (st, v) = s.json(Method::POST, "/api/auth/signup/", None, Some(json!({"username": "frank", "password": secret_pw}))).await;
            assert_eq!(st, StatusCode::CREATED);
            let access = v["access_token"].as_str().unwrap().to_owned();
            let refresh = v["refresh_token"].as_str().unwrap().to_owned();
            s.json(Method::POST, "/api/auth/login/", None, Some(json!({"address": "frank", "password": "Wrong-Password-5521"}))).await;
            let log_canary = "LOG-CANARY-4471";
            let (st, _) = s
                .json(Method::POST, "/api/mail/compose/", Some(&access), Some(json!({"to": ["bob@a.test", "carol@b.test"], "subject": log_canary, "text": log_canary})))
                .await;
            assert_eq!(st, StatusCode::ACCEPTED);
            s.json(Method::POST, "/api/auth/refresh/", None, Some(json!({"refresh_token": refresh}))).await;
            s.json(Method::POST, "/api/auth/refresh/", None, Some(json!({"refresh_token": refresh}))).await;
            let (st, t) = s.json(Method::POST, "/api/admin/users/bob@a.test/reset-token", Some(&s.login("alice", PASSWORD).await.0), None).await;
            assert_eq!(st, StatusCode::CREATED);
            let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
            assert!(text.contains("web session started"), "the capture works: {text}");
            for secret in [secret_pw, "Wrong-Password-5521", log_canary, &access, &refresh, t["token"].as_str().unwrap()] {
                assert!(!text.contains(secret), "{secret:?} reached the logs");
            }
        })
    });
}

/// A 20 MB attachment downloads streamed (chunked, no length known up front), byte for byte,
/// with its headers; an index past the last attachment is a JSON 404; a message whose sealed
/// blob was altered near its end aborts the download instead of ending it short.
#[test]
fn attachment_download_streamed_intact_and_aborted_on_damage() {
    isolated("attachment_download_streamed_intact_and_aborted_on_damage", &[TOKEN], |env| {
        runtime().block_on(async {
            for backend in BACKENDS {
                let s = Site::start(env, backend).await;
                let (bob, _) = s.login("bob", PASSWORD).await;
                let mut big = vec![0u8; 20 * 1024 * 1024];
                getrandom::fill(&mut big).unwrap();
                let notes = b"line one\r\nline two\r\n".to_vec();
                let message = mail_builder::MessageBuilder::new()
                    .from(("Alice", "alice@a.test"))
                    .to("bob@a.test")
                    .subject("big attachment")
                    .text_body("see attached")
                    .attachment("application/octet-stream", "random.bin", big.clone())
                    .attachment("text/plain", "notes.txt", notes.clone())
                    .write_to_vec()
                    .unwrap();
                let account = s.t.store.account("bob@a.test").await.unwrap();
                let inbox = s.t.store.mailbox(account.id, "INBOX").await.unwrap();
                let request = qutemail_vault::AppendRequest::default();
                let appended = s
                    .vault
                    .append_plain(
                        &s.t.store,
                        inbox.id,
                        qutemail_vault::Protection::Normal,
                        &request,
                        zeroize::Zeroizing::new(message),
                    )
                    .await
                    .unwrap();
                let id = appended.unique_id;
                let auth = format!("Bearer {bob}");

                // The attachment list the UI shows names what the indexes download.
                let (st, view) =
                    s.json(Method::GET, &format!("/api/mail/{id}/decrypt/"), Some(&bob), None).await;
                assert_eq!(st, StatusCode::OK);
                assert_eq!(view["attachments"][0]["filename"], "random.bin");
                assert_eq!(view["attachments"][0]["size"].as_u64(), Some(big.len() as u64));
                assert_eq!(view["attachments"][1]["filename"], "notes.txt");

                let path0 = format!("/api/mail/{id}/attachments/0/");
                let (st, headers, got) = s.send(Method::GET, &path0, &[("authorization", &auth)], "").await;
                assert_eq!(st, StatusCode::OK);
                assert_eq!(headers["content-type"], "application/octet-stream");
                assert_eq!(
                    headers["content-disposition"],
                    "attachment; filename=\"random.bin\"; filename*=UTF-8''random%2Ebin"
                );
                assert_eq!(headers.get("transfer-encoding").map(|v| v.to_str().unwrap()), Some("chunked"));
                assert!(
                    got.len() == big.len() && got[..] == big[..],
                    "the 20 MB attachment downloads intact"
                );
                let path = format!("/api/mail/{id}/attachments/1/");
                let (st, headers, got) = s.send(Method::GET, &path, &[("authorization", &auth)], "").await;
                assert_eq!((st, headers["content-type"].to_str().unwrap()), (StatusCode::OK, "text/plain"));
                assert_eq!(&got[..], &notes[..]);
                let (st, v) =
                    s.json(Method::GET, &format!("/api/mail/{id}/attachments/2/"), Some(&bob), None).await;
                assert_eq!(st, StatusCode::NOT_FOUND);
                assert_eq!(
                    (v["error"]["code"].as_str(), v["error"]["message"].as_str()),
                    (Some("not_found"), Some("no such attachment"))
                );

                // Alter a byte in the sealed blob's last chunk: the attachment's headers and most
                // of its bytes verify and go out, but the download must fail, not end short.
                let blob = file_larger_than(&s.t.dir.path().join("blobs"), 20 * 1024 * 1024);
                let mut sealed = std::fs::read(&blob).unwrap();
                let at = sealed.len() - 40;
                sealed[at] ^= 1;
                std::fs::write(&blob, &sealed).unwrap();
                let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
                let connector = tokio_rustls::TlsConnector::from(s.tls.clone());
                let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let tls = connector.connect(name, tcp).await.unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
                tokio::spawn(conn);
                let req = hyper::Request::get(format!("/api/mail/{id}/attachments/0/"))
                    .header("host", "127.0.0.1")
                    .header("authorization", &auth)
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let res = sender.send_request(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK, "the part's headers verified before the damage");
                let body = http_body_util::BodyExt::collect(res.into_body()).await;
                assert!(
                    body.is_err(),
                    "a download whose end does not verify is aborted, not delivered short"
                );

                // Damage the first chunk too: nothing verifies before the attachment is found, so
                // the message is answered as reading shows it, with the sealed original attached.
                sealed[100] ^= 1;
                std::fs::write(&blob, &sealed).unwrap();
                let (st, headers, got) = s.send(Method::GET, &path0, &[("authorization", &auth)], "").await;
                assert_eq!(st, StatusCode::OK);
                assert!(headers["content-disposition"].to_str().unwrap().contains("sealed-message.eml"));
                assert!(got[..] == sealed[..], "the sealed original, as stored");
            }
        })
    });

    /// The one file under `dir` larger than `size` bytes (the sealed big message).
    fn file_larger_than(dir: &std::path::Path, size: u64) -> std::path::PathBuf {
        let mut found = Vec::new();
        let mut dirs = vec![dir.to_owned()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    dirs.push(e.path());
                } else if meta.len() > size {
                    found.push(e.path());
                }
            }
        }
        assert_eq!(found.len(), 1, "{found:?}");
        found.remove(0)
    }
}
