//! A third-party client — the real `curl` binary (OpenSSL) — against the simulated KME pair.

mod kme_support;

use std::process::Command;

use kme_support::{Fixture, Limits, SAE_A, SAE_B};

/// Runs curl with SAE `stem`'s certificate; returns (HTTP status, HTTP version, body).
async fn curl(fx: &Fixture, stem: &str, extra: &[&str], url: String) -> (u16, String, serde_json::Value) {
    let mut command = Command::new("curl");
    command
        .args(["--silent", "--show-error", "--max-time", "10"])
        .arg("--cacert")
        .arg(fx.path("ca.pem"))
        .arg("--cert")
        .arg(fx.path(&format!("{stem}.pem")))
        .arg("--key")
        .arg(fx.path(&format!("{stem}.key")))
        .args(["--write-out", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(&url);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("curl runs (apt-get install curl)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "curl {url}: {}{stdout}", String::from_utf8_lossy(&output.stderr));
    let (body, trailer) = stdout.rsplit_once('\n').expect("write-out line");
    let (code, version) = trailer.split_once(' ').expect("code and version");
    let json =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("curl {url}: body {body:?} is not JSON: {e}"));
    (code.parse().expect("status code"), version.to_owned(), json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_status_and_keys() {
    let mut fx = Fixture::start(Limits::default()).await;
    let stream = fx.feed_random(2, 64).await;
    let (a, b) = (fx.url_a(), fx.url_b());

    let (code, version, status) =
        curl(&fx, "sae-a", &["--http2"], format!("{a}/api/v1/keys/{SAE_B}/status")).await;
    assert_eq!((code, version.as_str()), (200, "2"));
    assert_eq!(status["source_KME_ID"], "KME-A");
    assert_eq!(status["slave_SAE_ID"], SAE_B);
    assert_eq!(status["master_SAE_ID"], SAE_A);
    assert_eq!(status["stored_key_count"], 4);
    assert_eq!(status["max_SAE_ID_count"], 0);

    let (code, version, keys) =
        curl(&fx, "sae-a", &["--http1.1"], format!("{a}/api/v1/keys/{SAE_B}/enc_keys?number=2&size=256"))
            .await;
    assert_eq!((code, version.as_str()), (200, "1.1"));
    let keys = keys["keys"].as_array().expect("keys array").clone();
    assert_eq!(keys.len(), 2);
    let first =
        etsi014::types::KeyMaterial::from_base64(keys[0]["key"].as_str().expect("key")).expect("base64");
    assert_eq!(first.as_bytes(), &stream[..32]);

    // POST with a body and no Content-Type header (curl -d sends a form type).
    let (code, _, more) = curl(
        &fx,
        "sae-a",
        &["--data", r#"{"number":1,"size":512}"#],
        format!("{a}/api/v1/keys/{SAE_B}/enc_keys"),
    )
    .await;
    assert_eq!(code, 200);
    let third = more["keys"][0]["key_ID"].as_str().expect("id").to_owned();

    // The slave side fetches the first two with POST, the third with GET.
    let ids = serde_json::json!({"key_IDs": [{"key_ID": keys[0]["key_ID"]}, {"key_ID": keys[1]["key_ID"]}]})
        .to_string();
    let (code, _, dec) = curl(
        &fx,
        "sae-b",
        &["--header", "Content-Type: application/json", "--data", &ids],
        format!("{b}/api/v1/keys/{SAE_A}/dec_keys"),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(dec["keys"][0]["key"], keys[0]["key"]);
    assert_eq!(dec["keys"][1]["key_ID"], keys[1]["key_ID"]);
    let (code, _, dec) =
        curl(&fx, "sae-b", &[], format!("{b}/api/v1/keys/{SAE_A}/dec_keys?key_ID={third}")).await;
    assert_eq!(code, 200);
    assert_eq!(dec["keys"][0]["key"], more["keys"][0]["key"]);

    // Errors are JSON in the spec's format, for curl too.
    let (code, _, err) =
        curl(&fx, "sae-b", &[], format!("{b}/api/v1/keys/{SAE_A}/dec_keys?key_ID={third}")).await;
    assert_eq!(code, 400);
    assert_eq!(err["message"], "one or more keys specified are not found on KME");
    let (code, _, err) = curl(&fx, "sae-b", &[], format!("{a}/api/v1/keys/{SAE_A}/status")).await;
    assert_eq!(code, 401);
    assert_eq!(err["message"], "unauthorized");
    let (code, _, err) = curl(&fx, "sae-a", &[], format!("{a}/no/such/path")).await;
    assert_eq!(code, 404);
    assert!(err["message"].is_string());
}
