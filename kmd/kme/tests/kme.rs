//! Two real KMEs over mutual TLS on loopback: the ETSI 014 API and the peer protocol end to end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{LINK, Pki, isolated, runtime, settings, start_site, two_sites, two_sites_with};
use etsi014::client::Etsi014Error;
use etsi014::types::messages;
use etsi014::{KeyRequest, Status};
use kmd_keypool::SaeId;
use kmd_kme::{Endpoint, SaePair};

#[test]
fn enc_at_a_dec_at_b_once_and_errors() {
    isolated("enc_at_a_dec_at_b_once_and_errors", |env| {
        runtime().block_on(async {
            let pki = Pki::new();
            let (a, b) = two_sites(env, &pki, 40).await;
            let a_mail = pki.client("A-mail", a.etsi_addr);
            let b_mail = pki.client("B-mail", b.etsi_addr);

            // Status: all 11 fields.
            let status: Status = a_mail.status("B-mail").await.unwrap();
            assert_eq!(status.source_kme_id, "kme-A");
            assert_eq!(status.target_kme_id, "kme-B");
            assert_eq!(status.master_sae_id, "A-mail");
            assert_eq!(status.slave_sae_id, "B-mail");
            assert_eq!(status.key_size, 256);
            assert!(status.stored_key_count > 0);
            assert!(status.max_key_count >= status.stored_key_count);
            assert_eq!(status.max_key_per_request, 1000);
            assert_eq!((status.min_key_size, status.max_key_size, status.max_sae_id_count), (64, 8192, 0));

            // enc_keys at A (GET and POST), dec_keys at B: byte-identical, once.
            let sent = a_mail.enc_keys("B-mail", 3, Some(512)).await.unwrap();
            assert_eq!(sent.keys.len(), 3);
            assert!(sent.keys.iter().all(|k| k.key.bits() == 512));
            let sent2 = a_mail.enc_keys_with("B-mail", &KeyRequest::new(1, None)).await.unwrap();
            assert_eq!(sent2.keys[0].key.bits(), 256);
            let ids: Vec<&str> = sent.keys.iter().map(|k| k.key_id.as_str()).collect();
            let got = b_mail.dec_keys("A-mail", &ids).await.unwrap();
            assert_eq!(got.keys.len(), 3);
            for (s, g) in sent.keys.iter().zip(&got.keys) {
                assert_eq!(s.key_id, g.key_id);
                assert_eq!(s.key.as_bytes(), g.key.as_bytes());
            }
            let got2 = b_mail.dec_key_get("A-mail", &sent2.keys[0].key_id).await.unwrap();
            assert_eq!(got2.keys[0].key.as_bytes(), sent2.keys[0].key.as_bytes());

            // The `qutemail_link` extension names the link and KMEs (source = the master's KME at
            // both ends) and carries the link's last telemetry once the device reported some.
            let link = |c: &etsi014::KeyContainer| {
                c.key_container_extension.as_ref().unwrap()[kmd_kme::LINK_EXTENSION].clone()
            };
            assert_eq!(link(&sent)["link_id"], LINK);
            assert!(link(&sent)["qber"].is_null(), "no telemetry yet: {}", link(&sent));
            for c in [&sent, &got] {
                assert_eq!(
                    (link(c)["source_KME_ID"].as_str(), link(c)["target_KME_ID"].as_str()),
                    (Some("kme-A"), Some("kme-B"))
                );
            }
            for site in [&a, &b] {
                let t = kmd_kme::LinkTelemetry {
                    qber: Some(0.031),
                    secret_key_rate_bps: Some(1.5e5),
                    observed_unix_ms: 7,
                };
                site.kme.record_telemetry(LINK, t);
            }
            let sent3 = a_mail.enc_keys("B-mail", 1, None).await.unwrap();
            let got3 = b_mail.dec_key_get("A-mail", &sent3.keys[0].key_id).await.unwrap();
            for c in [&sent3, &got3] {
                assert_eq!(link(c)["qber"].as_f64(), Some(0.031));
                assert_eq!(link(c)["secret_key_rate_bps"].as_f64(), Some(1.5e5));
                assert_eq!(link(c)["telemetry_unix_ms"].as_u64(), Some(7));
            }

            // Second dec_keys: 400 with the spec's message.
            match b_mail.dec_keys("A-mail", &ids).await {
                Err(Etsi014Error::BadRequest { error, .. }) => {
                    assert_eq!(error.message, messages::KEYS_NOT_FOUND)
                }
                other => panic!("second dec_keys: {other:?}"),
            }
            // Unknown key ID: 400.
            match b_mail.dec_keys("A-mail", &["00000000-0000-4000-8000-000000000000"]).await {
                Err(Etsi014Error::BadRequest { error, .. }) => {
                    assert_eq!(error.message, messages::KEYS_NOT_FOUND)
                }
                other => panic!("unknown key: {other:?}"),
            }

            // A third SAE's certificate: 401 with the JSON body, on every endpoint.
            let c_mail = pki.client("C-mail", a.etsi_addr);
            for result in [
                c_mail.status("B-mail").await.map(|_| ()),
                c_mail.enc_keys("B-mail", 1, None).await.map(|_| ()),
                c_mail.dec_keys("B-mail", &ids).await.map(|_| ()),
            ] {
                match result {
                    Err(Etsi014Error::Unauthorized { error: Some(body), .. }) => {
                        assert_eq!(body.message, messages::UNAUTHORIZED)
                    }
                    other => panic!("third SAE: {other:?}"),
                }
            }
            // dec_keys at B by A-mail (the master, not the slave): 401.
            let fresh = a_mail.enc_keys("B-mail", 1, None).await.unwrap();
            let a_at_b = pki.client("A-mail", b.etsi_addr);
            match a_at_b.dec_keys("A-mail", &[fresh.keys[0].key_id.as_str()]).await {
                Err(Etsi014Error::Unauthorized { error: Some(_), .. }) => {}
                other => panic!("A-mail at B: {other:?}"),
            }
            // The key is still there for B-mail.
            let still = b_mail.dec_keys("A-mail", &[fresh.keys[0].key_id.as_str()]).await.unwrap();
            assert_eq!(still.keys[0].key.as_bytes(), fresh.keys[0].key.as_bytes());

            // Parameter errors with the spec's messages.
            match a_mail.enc_keys("B-mail", 1, Some(100)).await {
                Err(Etsi014Error::BadRequest { error, .. }) => {
                    assert_eq!(error.message, messages::SIZE_NOT_MULTIPLE_OF_8)
                }
                other => panic!("size 100: {other:?}"),
            }
            match a_mail.enc_keys("B-mail", 1001, None).await {
                Err(Etsi014Error::BadRequest { error, .. }) => {
                    assert_eq!(error.message, messages::PARAMETERS_NOT_ADHERING)
                }
                other => panic!("1001 keys: {other:?}"),
            }
            let mut ext = KeyRequest::new(1, None);
            let mut m = serde_json::Map::new();
            m.insert("abc_routing_method".into(), "Direct".into());
            ext.extension_mandatory.push(m);
            match a_mail.enc_keys_with("B-mail", &ext).await {
                Err(Etsi014Error::BadRequest { error, .. }) => {
                    assert_eq!(error.message, messages::EXTENSION_MANDATORY_UNSUPPORTED)
                }
                other => panic!("extension_mandatory: {other:?}"),
            }
            let mut multi = KeyRequest::new(1, None);
            multi.additional_slave_sae_ids.push("B-other".into());
            match a_mail.enc_keys_with("B-mail", &multi).await {
                Err(Etsi014Error::BadRequest { .. }) => {}
                other => panic!("multicast with max_SAE_ID_count 0: {other:?}"),
            }
            // Exhaustion: 503.
            match a_mail.enc_keys("B-mail", 1000, Some(8192)).await {
                Err(Etsi014Error::ServiceUnavailable { error: Some(_), .. }) => {}
                other => panic!("exhausted: {other:?}"),
            }
            // Nothing is left pending at A: every reserved key was delivered or discarded.
            assert!(a.kme.pool().pending_local_keys(LINK, 10).await.unwrap().is_empty());

            // The observer saw the requests, by endpoint and status.
            assert_eq!(a.counts.requests(Endpoint::Status, 200), 1);
            assert_eq!(a.counts.requests(Endpoint::EncKeys, 200), 4);
            assert!(a.counts.requests(Endpoint::EncKeys, 401) >= 1);
            assert_eq!(a.counts.requests(Endpoint::EncKeys, 503), 1);
            assert_eq!(b.counts.requests(Endpoint::DecKeys, 200), 4);
            assert_eq!(b.counts.requests(Endpoint::DecKeys, 401), 1);
            assert_eq!(b.counts.requests(Endpoint::PeerAssignments, 200), 4);
            assert_eq!(a.counts.keys_served.lock().unwrap().get(&Endpoint::EncKeys), Some(&6));

            a.shutdown().await;
            b.shutdown().await;
        });
    });
}

#[test]
fn keys_left_unfetched_expire_at_the_slave() {
    isolated("keys_left_unfetched_expire_at_the_slave", |env| {
        runtime().block_on(async {
            let pki = Pki::new();
            let (a, b) = two_sites(env, &pki, 8).await;
            let a_mail = pki.client("A-mail", a.etsi_addr);
            let b_mail = pki.client("B-mail", b.etsi_addr);
            let fetched = a_mail.enc_keys("B-mail", 1, None).await.unwrap();
            let abandoned = a_mail.enc_keys("B-mail", 2, None).await.unwrap();
            b_mail.dec_key_get("A-mail", &fetched.keys[0].key_id).await.unwrap();

            // Within the TTL nothing expires; past it, only the keys nobody fetched are erased.
            let pool = b.kme.pool();
            assert_eq!(pool.expire_unfetched(LINK, Duration::from_secs(3600)).await.unwrap(), 0);
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(pool.expire_unfetched(LINK, Duration::from_millis(1)).await.unwrap(), 2);
            for k in &abandoned.keys {
                let info = pool.key_info(&k.key_id).await.unwrap().unwrap();
                assert_eq!(info.state, kmd_keypool::KeyState::Discarded, "{info:?}");
                match b_mail.dec_key_get("A-mail", &k.key_id).await {
                    Err(Etsi014Error::BadRequest { error, .. }) => {
                        assert_eq!(error.message, messages::KEYS_NOT_FOUND)
                    }
                    other => panic!("expired key: {other:?}"),
                }
            }
            let info = pool.key_info(&fetched.keys[0].key_id).await.unwrap().unwrap();
            assert_eq!(info.state, kmd_keypool::KeyState::Delivered);
            a.shutdown().await;
            b.shutdown().await;
        })
    });
}

#[test]
fn both_directions_concurrently() {
    isolated("both_directions_concurrently", |env| {
        runtime().block_on(async {
            let pki = Pki::new();
            let (a, b) = two_sites(env, &pki, 200).await;
            let mut tasks = Vec::new();
            for (site, master, slave) in [(&a, "A-mail", "B-mail"), (&b, "B-mail", "A-mail")] {
                for _ in 0..16 {
                    let client = pki.client(master, site.etsi_addr);
                    let slave = slave.to_owned();
                    tasks.push(tokio::spawn(async move {
                        let mut out = Vec::new();
                        for i in 0..20u32 {
                            let c = client.enc_keys(&slave, 1 + i % 2, Some(256)).await.unwrap();
                            out.extend(c.keys.into_iter().map(|k| (k.key_id, k.key.as_bytes().to_vec())));
                        }
                        (slave, out)
                    }));
                }
            }
            let mut to_b = Vec::new();
            let mut to_a = Vec::new();
            for t in tasks {
                let (slave, keys) = t.await.unwrap();
                if slave == "B-mail" { to_b.extend(keys) } else { to_a.extend(keys) }
            }
            let all_ids: HashSet<&str> = to_a.iter().chain(&to_b).map(|(id, _)| id.as_str()).collect();
            assert_eq!(all_ids.len(), to_a.len() + to_b.len(), "a key ID was handed out twice");
            let all_bytes: HashSet<&[u8]> = to_a.iter().chain(&to_b).map(|(_, k)| k.as_slice()).collect();
            assert_eq!(all_bytes.len(), all_ids.len(), "two keys share their bytes");
            assert_eq!(to_b.len(), 16 * 30);

            // Every key from A is fetched once at B and vice versa, concurrently.
            let mut fetches = Vec::new();
            for (site, me, master, keys) in [(&b, "B-mail", "A-mail", to_b), (&a, "A-mail", "B-mail", to_a)] {
                for chunk in keys.chunks(40) {
                    let client = pki.client(me, site.etsi_addr);
                    let chunk = chunk.to_vec();
                    let master = master.to_owned();
                    fetches.push(tokio::spawn(async move {
                        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
                        let got = client.dec_keys(&master, &ids).await.unwrap();
                        for ((id, bytes), k) in chunk.iter().zip(&got.keys) {
                            assert_eq!(id, &k.key_id);
                            assert_eq!(bytes.as_slice(), k.key.as_bytes());
                        }
                        assert!(client.dec_keys(&master, &ids[..1]).await.is_err(), "fetched twice");
                    }));
                }
            }
            for f in fetches {
                f.await.unwrap();
            }
            a.shutdown().await;
            b.shutdown().await;
        });
    });
}

#[test]
fn peer_down_answers_503_and_recovers() {
    isolated("peer_down_answers_503_and_recovers", |env| {
        runtime().block_on(async {
            let pki = Pki::new();
            let (a, mut b) = two_sites(env, &pki, 40).await;
            let a_mail = pki.client("A-mail", a.etsi_addr);
            let b_mail = pki.client("B-mail", b.etsi_addr);
            a_mail.enc_keys("B-mail", 1, None).await.unwrap();
            let before = a.kme.pool().stored_key_count(LINK, 256).await.unwrap();

            b.stop_peer_server().await;
            match a_mail.enc_keys("B-mail", 2, None).await {
                Err(Etsi014Error::ServiceUnavailable { error: Some(body), .. }) => {
                    assert_eq!(body.message, "peer KME unreachable")
                }
                other => panic!("peer down: {other:?}"),
            }
            assert!(
                a.kme.pool().pending_local_keys(LINK, 10).await.unwrap().is_empty(),
                "a key stayed reserved"
            );
            // The status poll marks the peer down; enc_keys keeps answering 503 without trying.
            let t = Instant::now();
            while a.kme.peer_up(LINK) != Some(false) {
                assert!(t.elapsed() < Duration::from_secs(10), "peer never marked down");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(a_mail.enc_keys("B-mail", 1, None).await.is_err());
            assert!(a.kme.pending_discards(LINK).unwrap() >= 1, "the abandoned keys' discard is queued");
            // The keys that were abandoned are gone (never re-cut).
            assert!(a.kme.pool().stored_key_count(LINK, 256).await.unwrap() < before);

            b.start_peer_server(&pki).await;
            let t = Instant::now();
            let keys = loop {
                match a_mail.enc_keys("B-mail", 2, None).await {
                    Ok(keys) => break keys,
                    Err(e) => {
                        assert!(t.elapsed() < Duration::from_secs(15), "never recovered: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            let ids: Vec<&str> = keys.keys.iter().map(|k| k.key_id.as_str()).collect();
            let got = b_mail.dec_keys("A-mail", &ids).await.unwrap();
            assert_eq!(got.keys[1].key.as_bytes(), keys.keys[1].key.as_bytes());
            // The queued discard reaches B.
            let t = Instant::now();
            while a.kme.pending_discards(LINK) != Some(0) {
                assert!(t.elapsed() < Duration::from_secs(10), "discard never delivered");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            a.shutdown().await;
            b.shutdown().await;
        });
    });
}

const PY_SCRIPT: &str = r#"
import json, sys
from etsi_qkd_014_client import QKD014Client
mode, host, d, sae, other = sys.argv[1:6]
c = QKD014Client(host, f"{d}/{sae}.pem", f"{d}/{sae}.key", f"{d}/ca.pem")
if mode == "enc":
    code, st = c.get_status(other)
    assert code == 200, (code, vars(st))
    assert st.stored_key_count > 0 and st.key_size == 256, vars(st)
    code, kc = c.get_key(other, number=2, size=512)
    assert code == 200, (code, vars(kc))
    code1, kc1 = c.get_key(other)
    assert code1 == 200, (code1, vars(kc1))
    keys = kc.keys + kc1.keys
    code, err = c.get_key(other, number=1, size=100)
    assert code == 400 and err.message == "size shall be a multiple of 8", (code, vars(err))
else:
    ids = json.loads(sys.argv[6])
    code, kc = c.get_key_with_key_IDs(other, ids)
    assert code == 200, (code, vars(kc))
    keys = kc.keys
    code, err = c.get_key_with_key_IDs(other, ids)
    assert code == 400 and err.message == "one or more keys specified are not found on KME", (code, vars(err))
print(json.dumps([[k.key_id, k.key] for k in keys]))
"#;

fn python() -> String {
    std::env::var("QUTEMAIL_PYTHON").unwrap_or_else(|_| {
        panic!(
            "QUTEMAIL_PYTHON is not set: it must name a Python interpreter with the PyPI package \
             etsi-qkd-014-client installed. Run the tests with `cargo xtask test` (it creates that venv)."
        )
    })
}

async fn run_python(args: &[&str]) -> Vec<(String, String)> {
    let out =
        tokio::process::Command::new(python()).arg("-c").arg(PY_SCRIPT).args(args).output().await.unwrap();
    assert!(
        out.status.success(),
        "python client failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn third_party_python_client() {
    // Checked in the parent too, so a missing interpreter fails with the message above.
    let _ = python();
    isolated("third_party_python_client", |env| {
        runtime().block_on(async {
            let pki = Pki::new();
            let certs = env.dir.join("certs");
            std::fs::create_dir(&certs).unwrap();
            pki.write(&certs);
            let d = certs.to_str().unwrap();
            let (a, b) = two_sites(env, &pki, 40).await;
            let host_a = format!("localhost:{}", a.etsi_addr.port());
            let host_b = format!("localhost:{}", b.etsi_addr.port());
            let sent = run_python(&["enc", &host_a, d, "A-mail", "B-mail"]).await;
            assert_eq!(sent.len(), 3);
            let ids: Vec<&str> = sent.iter().map(|(id, _)| id.as_str()).collect();
            let ids_json = serde_json::to_string(&ids).unwrap();
            let got = run_python(&["dec", &host_b, d, "B-mail", "A-mail", &ids_json]).await;
            assert_eq!(sent, got, "the Python client got different keys at A and B");
            a.shutdown().await;
            b.shutdown().await;
        });
    });
}

/// The peer router answers only the peer KME's certificate (subject CN = its KME ID).
#[test]
fn peer_router_authenticates_the_peer_kme() {
    isolated("peer_router_authenticates_the_peer_kme", |env| {
        runtime().block_on(async {
            use http_body_util::BodyExt;
            use tower_service::Service;

            let pki = Pki::new();
            let (a, b) = two_sites(env, &pki, 10).await;
            let cert = |cn: &str| {
                let der = etsi014::tls::parse_certs(pki.cert(cn).cert_pem.as_bytes(), "test").unwrap().remove(0);
                etsi014::server::PeerCertificate::new(der)
            };
            let call = |cn: &str, method: &str, path: &str, body: &str| {
                let mut router = b.kme.peer_router();
                let mut request = http::Request::builder()
                    .method(method)
                    .uri(path)
                    .body(axum::body::Body::from(body.to_owned()))
                    .unwrap();
                request.extensions_mut().insert(cert(cn));
                async move {
                    let response = router.call(request).await.unwrap();
                    let status = response.status().as_u16();
                    let body = response.into_body().collect().await.unwrap().to_bytes();
                    (status, serde_json::from_slice::<serde_json::Value>(&body).unwrap())
                }
            };
            let (status, body) = call("kme-A", "GET", "/peer/v1/status", "").await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["kme_ID"], "kme-B");
            assert_eq!(body["links"][0]["side"], "upper");
            for cn in ["A-mail", "B-mail", "kme-B"] {
                let (status, body) = call(cn, "GET", "/peer/v1/status", "").await;
                assert_eq!(status, 401, "{cn}: {body}");
                assert_eq!(body["message"], "unauthorized");
                let discard = r#"{"key_IDs": [], "block_ids": ["1"], "reason": "test"}"#;
                let (status, _) = call(cn, "POST", "/peer/v1/links/link-ab/discards", discard).await;
                assert_eq!(status, 401, "{cn} may not discard");
            }
            // An assignment of B's own block, or for an SAE pair the link does not serve, is refused.
            let owned_by_b = (0..10u64).find(|n| kmd_keypool::block_owner(&n.to_string()) == kmd_keypool::Side::Upper);
            let owned_by_b = owned_by_b.expect("some block belongs to B");
            let assignment = |master: &str| {
                format!(
                    r#"{{"keys":[{{"key_ID":"6f1c6b4e-0000-4000-8000-000000000001","master_SAE_ID":"{master}",
                    "slave_SAE_IDs":["B-mail"],"size":64,"segments":[{{"block_id":"{owned_by_b}","offset":0,"len":8}}]}}]}}"#
                )
            };
            let (status, body) = call("kme-A", "POST", "/peer/v1/links/link-ab/assignments", &assignment("A-mail")).await;
            assert_eq!(status, 409, "{body}");
            assert_eq!(body["details"][0]["reason"], "block_owned_here");
            let (status, body) = call("kme-A", "POST", "/peer/v1/links/link-ab/assignments", &assignment("C-mail")).await;
            assert_eq!(status, 409, "{body}");
            assert_eq!(body["details"][0]["reason"], "sae_pair_not_allowed");
            let (status, _) = call("kme-A", "POST", "/peer/v1/links/other/assignments", &assignment("A-mail")).await;
            assert_eq!(status, 404);
            a.shutdown().await;
            b.shutdown().await;
        });
    });
}

/// `additional_slave_SAE_IDs`: one key for two slaves at the peer site, each fetching it once.
#[test]
fn multicast_to_two_slaves_at_the_peer() {
    isolated("multicast_to_two_slaves_at_the_peer", |env| {
        runtime().block_on(async {
            let pki = Pki::new();
            let a_fingerprint = peer_cert(&pki.cert("kme-A").cert_pem).fingerprint_hex();
            let (a, b) = two_sites_with(env, &pki, 40, |site, s| {
                s.max_sae_id_count = 1;
                if site == "b" {
                    // B recognises A by its pinned certificate rather than by subject CN.
                    s.links[0].peer.fingerprint = Some(a_fingerprint.clone());
                }
                let pair = if site == "a" {
                    SaePair::new("A-mail", "B-other")
                } else {
                    SaePair::new("B-other", "A-mail")
                };
                s.links[0].sae_pairs.push(pair);
            })
            .await;
            let a_mail = pki.client("A-mail", a.etsi_addr);
            assert_eq!(a_mail.status("B-mail").await.unwrap().max_sae_id_count, 1);
            let mut request = KeyRequest::new(2, Some(128));
            request.additional_slave_sae_ids.push("B-other".into());
            let sent = a_mail.enc_keys_with("B-mail", &request).await.unwrap();
            let ids: Vec<&str> = sent.keys.iter().map(|k| k.key_id.as_str()).collect();
            for slave in ["B-mail", "B-other"] {
                let client = pki.client(slave, b.etsi_addr);
                let got = client.dec_keys("A-mail", &ids).await.unwrap();
                assert_eq!(got.keys[0].key.as_bytes(), sent.keys[0].key.as_bytes());
                assert_eq!(got.keys[1].key.as_bytes(), sent.keys[1].key.as_bytes());
                assert!(client.dec_keys("A-mail", &ids).await.is_err(), "{slave} fetched twice");
            }
            // Two additional slaves exceed max_SAE_ID_count; an unpaired one is refused.
            request.additional_slave_sae_ids.push("C-mail".into());
            match a_mail.enc_keys_with("B-mail", &request).await {
                Err(Etsi014Error::BadRequest { error, .. }) => {
                    assert_eq!(error.message, messages::PARAMETERS_NOT_ADHERING)
                }
                other => panic!("too many slaves: {other:?}"),
            }
            let mut request = KeyRequest::new(1, None);
            request.additional_slave_sae_ids.push("C-mail".into());
            assert!(matches!(
                a_mail.enc_keys_with("B-mail", &request).await,
                Err(Etsi014Error::Unauthorized { .. })
            ));
            // Another certificate with subject CN kme-A is not the pinned one.
            let impostor = peer_cert(&pki.ca.client("kme-A").unwrap().cert_pem);
            assert_eq!(peer_call(&b.kme, impostor, "GET", "/peer/v1/status", "").await.0, 401);
            let genuine = peer_cert(&pki.cert("kme-A").cert_pem);
            assert_eq!(peer_call(&b.kme, genuine, "GET", "/peer/v1/status", "").await.0, 200);
            a.shutdown().await;
            b.shutdown().await;
        });
    });
}

fn peer_cert(pem: &str) -> etsi014::server::PeerCertificate {
    let der = etsi014::tls::parse_certs(pem.as_bytes(), "test").unwrap().remove(0);
    etsi014::server::PeerCertificate::new(der)
}

async fn peer_call(
    kme: &kmd_kme::Kme,
    cert: etsi014::server::PeerCertificate,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    use tower_service::Service;
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .body(axum::body::Body::from(body.to_owned()))
        .unwrap();
    request.extensions_mut().insert(cert);
    let response = kme.peer_router().call(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

/// Keys reserved before a restart and never delivered are dropped at both ends when the KME
/// starts again, even those the peer had already accepted.
#[test]
fn restart_discards_undelivered_keys_at_both_ends() {
    isolated("restart_discards_undelivered_keys_at_both_ends", |env| {
        runtime().block_on(async {
            let pki = Pki::new();
            let (a, b) = two_sites(env, &pki, 40).await;
            let (master, slave) = (SaeId::new("A-mail").unwrap(), SaeId::new("B-mail").unwrap());
            // An enc_keys cut short after the peer accepted, and one before it heard of the keys.
            let accepted =
                a.kme.pool().reserve_keys(LINK, &master, std::slice::from_ref(&slave), 2, 256).await.unwrap();
            let outcome = b
                .kme
                .pool()
                .accept_peer_assignment(LINK, accepted.iter().map(|g| g.assignment.clone()).collect())
                .await
                .unwrap();
            assert_eq!(outcome.accepted, 2);
            let unsent = a.kme.pool().reserve_keys(LINK, &master, &[slave], 1, 256).await.unwrap();
            assert_eq!(a.kme.pool().pending_local_keys(LINK, 10).await.unwrap().len(), 3);

            // Restart A over the same pool, on the same addresses.
            let pool = a.kme.pool().clone();
            let (etsi_addr, peer_addr) = (a.etsi_addr, a.peer_addr);
            a.shutdown().await;
            let etsi_l = tokio::net::TcpListener::bind(etsi_addr).await.unwrap();
            let peer_l = tokio::net::TcpListener::bind(peer_addr).await.unwrap();
            let a = start_site("a", settings(&pki, "a", b.peer_addr), pool, &pki, etsi_l, peer_l).await;

            let t = Instant::now();
            while !a.kme.pool().pending_local_keys(LINK, 10).await.unwrap().is_empty()
                || a.kme.pending_discards(LINK) != Some(0)
            {
                assert!(t.elapsed() < Duration::from_secs(10), "undelivered keys never discarded");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let b_mail = pki.client("B-mail", b.etsi_addr);
            for grant in accepted.iter().chain(&unsent) {
                match b_mail.dec_keys("A-mail", &[grant.key_id()]).await {
                    Err(Etsi014Error::BadRequest { error, .. }) => {
                        assert_eq!(error.message, messages::KEYS_NOT_FOUND)
                    }
                    other => panic!("undelivered key served at B: {other:?}"),
                }
            }
            // And the restarted KME serves new keys.
            let a_mail = pki.client("A-mail", a.etsi_addr);
            let keys = a_mail.enc_keys("B-mail", 1, None).await.unwrap();
            let got = b_mail.dec_keys("A-mail", &[keys.keys[0].key_id.as_str()]).await.unwrap();
            assert_eq!(got.keys[0].key.as_bytes(), keys.keys[0].key.as_bytes());
            a.shutdown().await;
            b.shutdown().await;
        });
    });
}
