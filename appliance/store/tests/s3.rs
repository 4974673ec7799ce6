//! `S3BlobStore` against a real S3-compatible server: moto in server mode, started once per
//! test process from the Python interpreter in `QUTEMAIL_PYTHON` (the venv that `cargo xtask
//! test` makes from tests/python-requirements.txt), on 127.0.0.1 and a free port, and stopped
//! when the process exits.
//!
//! moto checks Signature V4 only when IAM authentication is on. The harness therefore creates
//! an IAM user with an access key and an `s3:*` policy (boto3, while moto still accepts
//! everything), then turns authentication on: from then on every request of these tests is
//! verified by moto's own (botocore's) SigV4 code against that user's secret key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use qutemail_store::*;
use tokio::io::AsyncReadExt;
use zeroize::Zeroizing;

const INSTALL_HINT: &str = "set QUTEMAIL_PYTHON to a Python interpreter with moto's server installed: \
                            `python -m venv venv && venv/bin/pip install -r tests/python-requirements.txt` \
                            (it pins moto[server]), or run the tests with `cargo xtask test`, which does \
                            that";

/// The moto server of this test process.
struct Moto {
    endpoint: String,
    access_key_id: String,
    secret_access_key: Zeroizing<String>,
    python: String,
    _watchdog: Mutex<Child>,
}

static MOTO: OnceLock<Result<Moto, String>> = OnceLock::new();

fn moto() -> &'static Moto {
    match MOTO.get_or_init(start_moto) {
        Ok(m) => m,
        Err(e) => {
            panic!("the moto S3 server for the tests could not be started: {e}\nTo fix: {INSTALL_HINT}")
        }
    }
}

fn start_moto() -> Result<Moto, String> {
    let python = std::env::var("QUTEMAIL_PYTHON").map_err(|_| "QUTEMAIL_PYTHON is not set".to_owned())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))?;
    let log = tempfile::Builder::new()
        .prefix("qutemail-moto-")
        .suffix(".log")
        .tempfile()
        .map_err(|e| format!("creating the log file: {e}"))?
        .into_temp_path()
        .keep()
        .map_err(|e| format!("keeping the log file: {e}"))?;
    // The watchdog's stdin is a pipe from this process: when the process exits (however), the
    // pipe closes and the watchdog stops moto and removes the log.
    const WATCHDOG: &str = r#"
"$1" -m moto.server -H 127.0.0.1 -p "$2" >"$3" 2>&1 </dev/null &
server=$!
read -r _ignored || true
kill "$server" 2>/dev/null
wait "$server"
rm -f "$3"
"#;
    let mut watchdog = Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("qutemail-moto-watchdog")
        .arg(&python)
        .arg(port.to_string())
        .arg(&log)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting sh: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let log = || std::fs::read_to_string(&log).unwrap_or_default();
        if matches!(watchdog.try_wait(), Ok(Some(_))) {
            return Err(format!("moto exited at start:\n{}", log()));
        }
        if Instant::now() > deadline {
            let log = log();
            stop(watchdog);
            return Err(format!("moto did not listen within 60 s:\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = match python_script(&python, &endpoint, SETUP_IAM, &[]) {
        Ok(out) => out,
        Err(e) => {
            stop(watchdog);
            return Err(e);
        }
    };
    let mut words = out.split_whitespace();
    let (Some(access_key_id), Some(secret)) = (words.next(), words.next()) else {
        stop(watchdog);
        return Err(format!("the IAM setup printed no access key: {out:?}"));
    };
    Ok(Moto {
        access_key_id: access_key_id.to_owned(),
        secret_access_key: Zeroizing::new(secret.to_owned()),
        endpoint,
        python,
        _watchdog: Mutex::new(watchdog),
    })
}

/// Stops moto through its watchdog (closing the pipe; killing the watchdog would orphan moto).
fn stop(mut watchdog: Child) {
    drop(watchdog.stdin.take());
    let _ = watchdog.wait();
}

/// Runs `script` with `python -c`, moto's endpoint in `MOTO_ENDPOINT`; returns its stdout.
fn python_script(python: &str, endpoint: &str, script: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .env("MOTO_ENDPOINT", endpoint)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .map_err(|e| format!("running {python}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "python script failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates an IAM user allowed `s3:*`, prints its access key, then turns moto's request
/// authentication on (`/moto-api/reset-auth` with 0 free requests).
const SETUP_IAM: &str = r#"
import json, os, urllib.request, boto3
endpoint = os.environ["MOTO_ENDPOINT"]
iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup")
iam.create_user(UserName="qutemail-store")
iam.put_user_policy(UserName="qutemail-store", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="qutemail-store")["AccessKey"]
# text/plain: moto reads the raw body (a form content type would hide it).
urllib.request.urlopen(urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                              headers={"Content-Type": "text/plain"})).read()
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;

/// Prints the ETag of object argv[2] in bucket argv[1] (a multipart upload's ends in `-<parts>`).
const HEAD_ETAG: &str = r#"
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["MOTO_ENDPOINT"], aws_access_key_id=sys.argv[3],
                  aws_secret_access_key=sys.argv[4])
print(s3.head_object(Bucket=sys.argv[1], Key=sys.argv[2])["ETag"])
"#;

/// Puts an object with key argv[2] in bucket argv[1].
const PUT_FOREIGN: &str = r#"
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["MOTO_ENDPOINT"], aws_access_key_id=sys.argv[3],
                  aws_secret_access_key=sys.argv[4])
s3.put_object(Bucket=sys.argv[1], Key=sys.argv[2], Body=b"not a blob")
"#;

/// Starts a multipart upload of key argv[2] in bucket argv[1] with one part and leaves it
/// unfinished (as a gateway that died mid-upload would).
const START_UPLOAD: &str = r#"
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["MOTO_ENDPOINT"], aws_access_key_id=sys.argv[3],
                  aws_secret_access_key=sys.argv[4])
upload = s3.create_multipart_upload(Bucket=sys.argv[1], Key=sys.argv[2])["UploadId"]
s3.upload_part(Bucket=sys.argv[1], Key=sys.argv[2], UploadId=upload, PartNumber=1, Body=b"x" * 1000)
"#;

/// Prints the keys of the unfinished multipart uploads in bucket argv[1].
const LIST_UPLOADS: &str = r#"
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["MOTO_ENDPOINT"], aws_access_key_id=sys.argv[2],
                  aws_secret_access_key=sys.argv[3])
print(" ".join(u["Key"] for u in s3.list_multipart_uploads(Bucket=sys.argv[1]).get("Uploads", [])))
"#;

fn config(bucket: &str) -> S3Config {
    let m = moto();
    S3Config::new(&m.endpoint, bucket, "us-east-1", &m.access_key_id, m.secret_access_key.clone())
}

/// A store on a fresh bucket of its own.
async fn fresh_store() -> S3BlobStore {
    let bucket = format!("qutemail-test-{}", BlobId::random().unwrap().as_str());
    let store = S3BlobStore::new(config(&bucket)).unwrap();
    store.create_bucket().await.unwrap();
    store
}

fn python_with_keys(script: &str, args: &[&str]) -> String {
    let m = moto();
    let mut all = args.to_vec();
    all.push(&m.access_key_id);
    all.push(&m.secret_access_key);
    python_script(&m.python, &m.endpoint, script, &all).unwrap()
}

/// Deterministic bytes that differ at every offset's neighbourhood (so a misplaced part shows).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn get_all(store: &dyn BlobStore, id: &BlobId) -> Vec<u8> {
    let mut reader = store.get(id).await.unwrap();
    let mut out = Vec::new();
    reader.read_to_end(&mut out).await.unwrap();
    out
}

async fn ids_in_bucket(store: &S3BlobStore) -> Vec<BlobId> {
    let mut ids: Vec<BlobId> = store.list_blobs().await.unwrap().into_iter().map(|(id, _)| id).collect();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<BlobId>) -> Vec<BlobId> {
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_and_large_blobs_round_trip_byte_exact() {
    let s3 = fresh_store().await;
    // Empty, small, exactly one part (still a single PutObject), one byte over (two parts),
    // and a 25 MB message (three parts).
    let part = S3BlobStore::PART_SIZE;
    let sizes = [0, 1000, part, part + 1, 25_000_000];
    let mut stored = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let bytes = pattern(len, i as u64);
        let blob = s3.put(&mut bytes.as_slice()).await.unwrap();
        assert_eq!(blob.len, len as u64);
        stored.push((blob, bytes));
    }
    for (blob, bytes) in &stored {
        let got = get_all(&s3, &blob.id).await;
        assert_eq!(got.len(), bytes.len());
        assert!(got == *bytes, "blob of {} bytes differs after the round trip", bytes.len());
    }
    let bucket = &s3.config().bucket;
    let etag = |id: &BlobId| python_with_keys(HEAD_ETAG, &[bucket, &s3.key_of(id)]).trim().to_owned();
    // The two larger blobs went up as multipart uploads of 2 and 3 parts (the last one
    // short), the others as single PutObjects.
    assert!(!etag(&stored[2].0.id).contains('-'), "{}", etag(&stored[2].0.id));
    assert!(etag(&stored[3].0.id).ends_with("-2\""), "{}", etag(&stored[3].0.id));
    assert!(etag(&stored[4].0.id).ends_with("-3\""), "{}", etag(&stored[4].0.id));
    assert_eq!(ids_in_bucket(&s3).await, sorted(stored.iter().map(|(b, _)| b.id.clone()).collect()));
    assert!(s3.key_of(&stored[0].0.id).starts_with("blobs/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_is_independent_and_delete_removes() {
    let s3 = fresh_store().await;
    let bytes = pattern(50_000, 7);
    let original = s3.put(&mut bytes.as_slice()).await.unwrap();
    let copy = s3.copy(&original.id).await.unwrap();
    assert_ne!(copy.id, original.id);
    assert_eq!(copy.len, original.len);
    assert_eq!(get_all(&s3, &copy.id).await, bytes);
    assert_eq!(ids_in_bucket(&s3).await, sorted(vec![original.id.clone(), copy.id.clone()]));

    s3.delete(std::slice::from_ref(&original.id)).await.unwrap();
    assert_eq!(ids_in_bucket(&s3).await, vec![copy.id.clone()]);
    assert_eq!(get_all(&s3, &copy.id).await, bytes, "the copy survives the original's deletion");
    let missing = s3.get(&original.id).await.err().expect("a deleted blob cannot be read");
    assert!(matches!(missing, BlobError::NotFound(ref id) if id == original.id.as_str()), "{missing}");
    let missing = s3.copy(&original.id).await.unwrap_err();
    assert!(matches!(missing, BlobError::NotFound(_)), "{missing}");
    // Deleting ids that are gone (or never were) is no error.
    s3.delete(&[original.id.clone(), BlobId::random().unwrap(), copy.id.clone()]).await.unwrap();
    assert!(ids_in_bucket(&s3).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_older_than_follows_last_modified_across_pages() {
    let bucket = format!("qutemail-test-{}", BlobId::random().unwrap().as_str());
    // Two keys per ListObjectsV2 page, so that five blobs need three pages.
    let s3 = S3BlobStore::new(S3Config { list_page_size: 2, ..config(&bucket) }).unwrap();
    s3.create_bucket().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(s3.put(&mut pattern(10, i).as_slice()).await.unwrap().id);
    }
    // Objects that are not blobs: one under the prefix, one outside it.
    python_with_keys(PUT_FOREIGN, &[&bucket, "blobs/README"]);
    python_with_keys(PUT_FOREIGN, &[&bucket, &format!("other/{}", BlobId::random().unwrap())]);
    // An upload interrupted before CompleteMultipartUpload: invisible, but billed until aborted.
    let interrupted = format!("blobs/{}", BlobId::random().unwrap());
    python_with_keys(START_UPLOAD, &[&bucket, &interrupted]);
    assert_eq!(python_with_keys(LIST_UPLOADS, &[&bucket]).trim(), interrupted);

    assert!(s3.list_older_than(Duration::from_secs(3600)).await.unwrap().is_empty(), "all are young");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let young = s3.put(&mut &b"young"[..]).await.unwrap().id;
    let old = s3.list_older_than(Duration::from_secs(1)).await.unwrap();
    assert_eq!(sorted(old), sorted(ids.clone()), "exactly the five older blobs, no foreign object");
    assert_eq!(python_with_keys(LIST_UPLOADS, &[&bucket]).trim(), "", "the interrupted upload was aborted");
    let mut all = ids.clone();
    all.push(young);
    assert_eq!(ids_in_bucket(&s3).await, sorted(all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_key_is_refused_with_signature_does_not_match() {
    let s3 = fresh_store().await;
    let good = s3.put(&mut &b"sealed"[..]).await.unwrap();
    let wrong = S3BlobStore::new(S3Config {
        secret_access_key: Zeroizing::new("not-the-secret-key".into()),
        ..s3.config().clone()
    })
    .unwrap();
    let err = wrong.put(&mut &b"sealed"[..]).await.unwrap_err();
    let BlobError::S3(s3_err) = &err else { panic!("not an S3 error: {err:?}") };
    assert_eq!(s3_err.status(), Some(403), "{err}");
    assert_eq!(s3_err.code(), Some("SignatureDoesNotMatch"), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("PutObject") && text.contains("403") && text.contains("SignatureDoesNotMatch"),
        "{text}"
    );
    assert!(!text.contains("not-the-secret-key") && !format!("{err:?}").contains("not-the-secret-key"));
    // Reads are refused the same way, not reported as a missing blob.
    let err = wrong.get(&good.id).await.err().expect("refused");
    assert!(matches!(&err, BlobError::S3(e) if e.code() == Some("SignatureDoesNotMatch")), "{err}");
    // An unknown access key id is its own error.
    let unknown =
        S3BlobStore::new(S3Config { access_key_id: "AKIAUNKNOWNKEY000000".into(), ..s3.config().clone() })
            .unwrap();
    let err = unknown.list_blobs().await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(403), Some("InvalidAccessKeyId")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_an_error_not_a_missing_blob() {
    // The store skips blobs reported missing (COPY) and treats deleting a missing blob as
    // done: a wrong bucket name must not pass for either.
    let s3 = S3BlobStore::new(config("qutemail-no-such-bucket")).unwrap();
    let id = BlobId::random().unwrap();
    let errors = [
        s3.get(&id).await.err().expect("no bucket to read from"),
        s3.copy(&id).await.unwrap_err(),
        s3.delete(std::slice::from_ref(&id)).await.unwrap_err(),
        s3.put(&mut &b"sealed"[..]).await.unwrap_err(),
    ];
    for err in errors {
        assert!(
            matches!(&err, BlobError::S3(e) if e.status() == Some(404) && e.code() == Some("NoSuchBucket")),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_a_transport_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = S3Config::new(
        format!("http://127.0.0.1:{port}"),
        "b",
        "us-east-1",
        "AKID",
        Zeroizing::new("s".into()),
    );
    let err = S3BlobStore::new(cfg).unwrap().list_blobs().await.unwrap_err();
    assert!(matches!(err, S3Error::Transport { op: "ListObjectsV2", .. }), "{err}");
}

/// The mail store's own behaviour with its blobs on S3 (metadata on SQLite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_keeps_its_blobs_in_the_bucket() {
    let s3 = fresh_store().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        password: qutemail_store::testing::test_password_params(),
        ..StoreConfig::sqlite(dir.path().join("store.sqlite"), dir.path().join("unused-blob-dir"))
    };
    let store = Store::open_with_blobs(cfg.clone(), Arc::new(s3.clone())).await.unwrap();
    let a = create(&store, "erin@site.example").await;
    let inbox = store.mailbox(a.id, "INBOX").await.unwrap();
    let archive = store.create_mailbox(a.id, "Archive").await.unwrap();
    let small = pattern(3000, 1);
    let large = pattern(S3BlobStore::PART_SIZE + 1024 * 1024, 2); // a multipart upload through the store
    append(&store, inbox.id, &small).await;
    append(&store, inbox.id, &large).await;
    let messages = store.fetch(inbox.id, &Selection::All).await.unwrap();
    assert_eq!(read_all(&store, &messages[0]).await, small);
    assert!(read_all(&store, &messages[1]).await == large, "the 9 MiB message differs");
    let mut expected: Vec<BlobId> = messages.iter().map(|m| m.blob_id.clone()).collect();
    assert_eq!(ids_in_bucket(&s3).await, sorted(expected.clone()));

    // COPY: a server-side copy under a new id per message.
    store.copy_messages(inbox.id, &NumberSet::range(1..=2), archive.id).await.unwrap();
    let copies = store.fetch(archive.id, &Selection::All).await.unwrap();
    assert_eq!(read_all(&store, &copies[0]).await, small);
    assert!(copies.iter().all(|c| !expected.contains(&c.blob_id)));
    expected.extend(copies.iter().map(|c| c.blob_id.clone()));
    assert_eq!(ids_in_bucket(&s3).await, sorted(expected.clone()));

    // EXPUNGE removes exactly the expunged message's object; its copy stays readable.
    store.expunge(inbox.id, &ExpungeScope::Uids(NumberSet::range(1..=1))).await.unwrap();
    expected.retain(|id| *id != messages[0].blob_id);
    assert_eq!(ids_in_bucket(&s3).await, sorted(expected.clone()));
    assert_eq!(read_all(&store, &copies[0]).await, small);

    // An object without a row (an append that died before its commit) is swept on open once
    // older than the grace period; objects of messages are kept.
    let orphan = s3.put(&mut &b"orphan"[..]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reopened = Store::open_with_blobs(
        StoreConfig { orphan_grace: Duration::from_secs(1), ..cfg },
        Arc::new(s3.clone()),
    )
    .await
    .unwrap();
    assert!(!ids_in_bucket(&s3).await.contains(&orphan.id), "the orphan was swept");
    assert_eq!(ids_in_bucket(&s3).await, sorted(expected.clone()));

    // Deleting the account deletes every object of its messages.
    reopened.delete_account("erin@site.example").await.unwrap();
    assert!(ids_in_bucket(&s3).await.is_empty(), "objects left: {:?}", ids_in_bucket(&s3).await);
}
