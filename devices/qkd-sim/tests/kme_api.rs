//! The simulator's KME pair through the `etsi014` client, over real mutual TLS on loopback.

mod kme_support;

use etsi014::client::{Etsi014Error, HttpVersionPolicy};
use etsi014::pki::Ca;
use etsi014::types::{KeyIdEntry, KeyIds, KeyRequest, messages};
use kme_support::{Fixture, KME_A, KME_B, Limits, SAE_A, SAE_B};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_pair_and_the_pool() {
    let mut fx = Fixture::start(Limits::default()).await;
    fx.feed_random(4, 40).await; // 160 bytes = 5 keys of 256 bits

    let status = fx.a().status(SAE_B).await.expect("status at A");
    assert_eq!(status.source_kme_id, KME_A);
    assert_eq!(status.target_kme_id, KME_B);
    assert_eq!(status.master_sae_id, SAE_A);
    assert_eq!(status.slave_sae_id, SAE_B);
    assert_eq!(status.key_size, 256);
    assert_eq!(status.stored_key_count, 5);
    assert_eq!(status.max_key_count, 1000);
    assert_eq!(status.max_key_per_request, 16);
    assert_eq!(status.min_key_size, 64);
    assert_eq!(status.max_key_size, 8192);
    assert_eq!(status.max_sae_id_count, 0);
    assert!(status.status_extension.is_none());

    // B sees the same pool, from its side.
    let status = fx.b().status(SAE_A).await.expect("status at B");
    assert_eq!((status.source_kme_id.as_str(), status.target_kme_id.as_str()), (KME_B, KME_A));
    assert_eq!((status.master_sae_id.as_str(), status.slave_sae_id.as_str()), (SAE_B, SAE_A));
    assert_eq!(status.stored_key_count, 5);

    // An SAE the KME does not know in the path.
    let err = fx.a().status("C-mail").await.expect_err("unknown slave");
    assert_eq!(err.status(), Some(400), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enc_keys_at_a_are_dec_keys_at_b_exactly_once() {
    let mut fx = Fixture::start(Limits::default()).await;
    // Blocks of 40 bytes: keys of 32 bytes straddle block boundaries.
    let stream = fx.feed_random(6, 40).await;
    let (a, b) = (fx.a(), fx.b());

    let enc = a.enc_keys(SAE_B, 3, None).await.expect("enc_keys");
    assert_eq!(enc.keys.len(), 3);
    for (i, key) in enc.keys.iter().enumerate() {
        assert_eq!(key.key.bits(), 256);
        // Keys are cut from the link's stream in order.
        assert_eq!(key.key.as_bytes(), &stream[i * 32..(i + 1) * 32]);
        let id = uuid::Uuid::parse_str(&key.key_id).expect("UUID key ID");
        assert_eq!(id.get_version_num(), 4);
        assert_eq!(key.key_id, id.hyphenated().to_string(), "lower-case hyphenated");
    }
    let ids: Vec<&str> = enc.keys.iter().map(|k| k.key_id.as_str()).collect();

    let dec = b.dec_keys(SAE_A, &ids).await.expect("dec_keys");
    assert_eq!(dec, enc, "same IDs, same bytes, same order");

    let err = b.dec_keys(SAE_A, &ids).await.expect_err("second dec_keys");
    match &err {
        Etsi014Error::BadRequest { error, url } => {
            assert_eq!(error.message, messages::KEYS_NOT_FOUND);
            assert!(url.ends_with("/api/v1/keys/A-mail/dec_keys"), "{url}");
        }
        other => panic!("expected 400, got {other}"),
    }
    assert_eq!(fx.pair.pending_keys(), 0);

    // The POST form of Get key, with a size other than the default; the GET form of Get key
    // with key IDs, in upper case.
    let enc = a.enc_keys_with(SAE_B, &KeyRequest::new(1, Some(512))).await.expect("POST enc_keys");
    assert_eq!(enc.keys[0].key.as_bytes(), &stream[96..160]);
    let dec = b.dec_key_get(SAE_A, &enc.keys[0].key_id.to_uppercase()).await.expect("GET dec_keys");
    assert_eq!(dec.keys[0].key, enc.keys[0].key);
    assert_eq!(dec.keys[0].key_id, enc.keys[0].key_id);

    // The direction B → A works alike.
    let enc = b.enc_keys(SAE_A, 1, Some(64)).await.expect("enc_keys at B");
    let dec = a.dec_keys(SAE_B, &[enc.keys[0].key_id.as_str()]).await.expect("dec_keys at A");
    assert_eq!(dec, enc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dec_keys_is_all_or_nothing() {
    let mut fx = Fixture::start(Limits::default()).await;
    fx.feed_random(1, 64).await;
    let enc = fx.a().enc_keys(SAE_B, 2, None).await.expect("enc_keys");
    let known = enc.keys[0].key_id.clone();
    let request =
        KeyIds::new([known.clone(), "0a782fb5-3434-48fe-aa4d-14f41d46cf92".into(), "not-a-uuid".into()]);
    let err = fx.b().dec_keys_with(SAE_A, &request).await.expect_err("unknown IDs");
    assert_eq!(err.message(), Some(messages::KEYS_NOT_FOUND), "{err}");
    // Nothing was erased: the known key is still there.
    let request = KeyIds { key_ids: vec![KeyIdEntry::new(known)], key_ids_extension: None };
    let dec = fx.b().dec_keys_with(SAE_A, &request).await.expect("still there");
    assert_eq!(dec.keys[0].key, enc.keys[0].key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_sae_is_unauthorized_with_a_json_body() {
    let mut fx = Fixture::start(Limits::default()).await;
    fx.feed_random(2, 64).await;

    // A certificate from the right CA, for an SAE this KME does not serve.
    let intruder = fx.ca.client("C-mail").expect("cert");
    let client = fx.client_with('A', &intruder, HttpVersionPolicy::Auto);
    for err in [
        client.status(SAE_B).await.expect_err("status"),
        client.enc_keys(SAE_B, 1, None).await.expect_err("enc_keys"),
    ] {
        match err {
            Etsi014Error::Unauthorized { error: Some(body), .. } => {
                assert_eq!(body.message, messages::UNAUTHORIZED)
            }
            other => panic!("expected 401 with a body, got {other}"),
        }
    }

    // SAE B's own certificate, presented at KME A.
    let b_at_a = fx.client_with('A', &fx.sae_b, HttpVersionPolicy::Auto);
    assert_eq!(b_at_a.status(SAE_A).await.expect_err("B at A").status(), Some(401));

    // The master asking for its own keys as if it were the slave: they belong to another pair.
    let enc = fx.a().enc_keys(SAE_B, 1, None).await.expect("enc_keys");
    let err = fx.a().dec_keys(SAE_B, &[enc.keys[0].key_id.as_str()]).await.expect_err("own key");
    assert_eq!(err.status(), Some(401), "{err}");
    // … and the rightful slave still gets it.
    fx.b().dec_keys(SAE_A, &[enc.keys[0].key_id.as_str()]).await.expect("slave gets it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_an_unknown_ca_fails_the_handshake() {
    let fx = Fixture::start(Limits::default()).await;
    let rogue_ca = Ca::new("rogue CA").expect("CA");
    let rogue = rogue_ca.client(SAE_A).expect("cert"); // the right name, the wrong issuer
    let client = fx.client_with('A', &rogue, HttpVersionPolicy::Auto);
    let err = client.status(SAE_B).await.expect_err("refused");
    assert!(err.is_transport(), "expected a TLS failure, got {err}");
    // TLS 1.3 delivers the KME's refusal after the handshake; the cause is kept all the same.
    assert!(err.to_string().contains("UnknownCA"), "the error says why: {err}");
    assert!(err.to_string().contains(&fx.url_a()), "the error names the URL: {err}");

    // A client that does not trust the KME's CA refuses the server too.
    let wrong_trust =
        etsi014::client::Etsi014Client::new(&fx.url_a(), fx.sae_a.tls(&rogue_ca.ca_pem())).expect("client");
    let err = wrong_trust.status(SAE_B).await.expect_err("server not trusted");
    assert!(err.is_transport(), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_answers_503() {
    let mut fx = Fixture::start(Limits::default()).await;
    let a = fx.a();
    let err = a.enc_keys(SAE_B, 1, None).await.expect_err("empty pool");
    assert!(matches!(err, Etsi014Error::ServiceUnavailable { error: Some(_), .. }), "{err}");

    fx.feed_random(1, 64).await; // two keys
    let err = a.enc_keys(SAE_B, 3, None).await.expect_err("three of two");
    assert_eq!(err.status(), Some(503));
    assert_eq!(a.enc_keys(SAE_B, 2, None).await.expect("two of two").keys.len(), 2);
    assert_eq!(a.enc_keys(SAE_B, 1, None).await.expect_err("none left").status(), Some(503));
    assert_eq!(a.status(SAE_B).await.expect("status").stored_key_count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400_in_the_spec_format() {
    let mut fx = Fixture::start(Limits::default()).await;
    fx.feed_random(4, 64).await;
    let a = fx.a();

    let err = a.enc_keys(SAE_B, 1, Some(100)).await.expect_err("size 100");
    assert_eq!(err.message(), Some(messages::SIZE_NOT_MULTIPLE_OF_8), "{err}");
    let err = a.enc_keys_with(SAE_B, &KeyRequest::new(1, Some(257))).await.expect_err("size 257");
    assert_eq!(err.message(), Some(messages::SIZE_NOT_MULTIPLE_OF_8), "{err}");

    let err = a.enc_keys(SAE_B, 17, None).await.expect_err("over max_key_per_request");
    assert_eq!(err.message(), Some(messages::PARAMETERS_NOT_ADHERING), "{err}");
    let err = a.enc_keys(SAE_B, 0, None).await.expect_err("zero keys");
    assert_eq!(err.status(), Some(400));
    let err = a.enc_keys(SAE_B, 1, Some(16)).await.expect_err("below min_key_size");
    assert_eq!(err.message(), Some(messages::PARAMETERS_NOT_ADHERING), "{err}");

    let mut request = KeyRequest::new(1, None);
    let mut ext = etsi014::types::Extension::new();
    ext.insert("abc_route_type".into(), "direct".into());
    request.extension_mandatory.push(ext);
    match a.enc_keys_with(SAE_B, &request).await.expect_err("mandatory extension") {
        Etsi014Error::BadRequest { error, .. } => {
            assert_eq!(error.message, messages::EXTENSION_MANDATORY_UNSUPPORTED);
            assert_eq!(
                error.details[0]["extension_mandatory_unsupported"],
                serde_json::json!(["abc_route_type"])
            );
        }
        other => panic!("expected 400, got {other}"),
    }
    let mut request = KeyRequest::new(1, None);
    request.additional_slave_sae_ids.push("C-mail".into());
    assert_eq!(a.enc_keys_with(SAE_B, &request).await.expect_err("multicast").status(), Some(400));

    // Nothing was taken by the refused requests.
    assert_eq!(a.status(SAE_B).await.expect("status").stored_key_count, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_http11_both_work() {
    let mut fx = Fixture::start(Limits::default()).await;
    fx.feed_random(4, 64).await;
    for http in [HttpVersionPolicy::Http2Only, HttpVersionPolicy::Http1Only, HttpVersionPolicy::Auto] {
        let a = fx.client_with('A', &fx.sae_a, http);
        let b = fx.client_with('B', &fx.sae_b, http);
        a.status(SAE_B).await.unwrap_or_else(|e| panic!("{http:?} status: {e}"));
        // Several requests on one pooled connection (keep-alive), concurrently for HTTP/2.
        let (x, y) = tokio::join!(a.enc_keys(SAE_B, 1, None), a.enc_keys(SAE_B, 1, None));
        let (x, y) = (x.expect("enc 1"), y.expect("enc 2"));
        let ids = [x.keys[0].key_id.as_str(), y.keys[0].key_id.as_str()];
        let dec = b.dec_keys(SAE_A, &ids).await.unwrap_or_else(|e| panic!("{http:?} dec_keys: {e}"));
        assert_eq!(dec.keys[0].key, x.keys[0].key);
        assert_eq!(dec.keys[1].key, y.keys[0].key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pair_shuts_down_gracefully() {
    let fx = Fixture::start(Limits::default()).await;
    let a = fx.a();
    a.status(SAE_B).await.expect("up");
    let url = fx.url_a();
    fx.pair.shutdown().await;
    let err = a.status(SAE_B).await.expect_err("down");
    assert!(err.is_transport(), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
}
