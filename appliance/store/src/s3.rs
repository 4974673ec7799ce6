//! Message blobs in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...): cargo
//! feature `s3`.
//!
//! Each blob is one object `<prefix><id>` in one bucket, addressed path-style
//! (`<endpoint>/<bucket>/<prefix><id>`, so any host name or IP works without wildcard DNS). Ids
//! are the same 128-bit random ids as [`crate::FsBlobStore`]'s.
//!
//! Requests are signed with AWS Signature Version 4 (implemented here: HMAC-SHA256 from `ring`,
//! SHA-256 of every payload in `x-amz-content-sha256`, so a body altered in transit is refused
//! also over plain http). They go over hyper's pooled HTTP/1.1 client, with rustls for `https`
//! endpoints (Mozilla's roots, or a private CA from [`S3Config::ca_pem`]); plain `http` is
//! accepted for an endpoint on the appliance itself. The secret key is held in [`Zeroizing`]
//! and never logged or printed (also not by `Debug`).
//!
//! # Operations
//!
//! * `put`: up to [`S3BlobStore::PART_SIZE`] (8 MiB) is buffered and sent as one `PutObject`; a longer
//!   stream becomes a multipart upload of 8 MiB parts (`CreateMultipartUpload`, `UploadPart`,
//!   `CompleteMultipartUpload`), so at most one part is in memory. Any failure aborts the
//!   upload (`AbortMultipartUpload`).
//! * `get`: `GetObject`, its body streamed as it arrives.
//! * `copy`: a server-side `CopyObject` under a new id (the bytes never travel through the
//!   gateway), then `HeadObject` of the copy for its length.
//! * `delete`: one `DeleteObject` per id (a missing object is no error in S3; a missing
//!   bucket is). `NotFound` is reported only for S3's `NoSuchKey`, never `NoSuchBucket`.
//! * `list_older_than`: `ListObjectsV2` under the prefix, page by page, by `LastModified`; it
//!   also aborts multipart uploads under the prefix started more than that age ago (left by a
//!   gateway that died mid-upload; they are invisible but are billed).
//!
//! # Durability
//!
//! S3 makes an object visible only when `PutObject` or `CompleteMultipartUpload` answered
//! 200, and then whole (objects are never partially visible): that is this store's "complete
//! or absent" rule, which the file-system store gets from `rename`. A `put` or `copy` returns
//! only after that 200, so [`crate::Store`] commits a message row only over a stored object.
//! How durable a 200 is depends on the service (AWS S3 stores across several devices before
//! answering; a single-node MinIO with `fsync` is as durable as its disk).
//!
//! The orphan sweep compares `LastModified` (the service's clock) with this host's clock.
//! Signature V4 already refuses requests from a clock more than 15 minutes off, far inside the
//! store's one-hour grace, so a young object is never taken for an orphan.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, ETAG, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use quick_xml::events::Event;
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use crate::blob::{BlobFuture, BlobId, BlobReader, BlobStore, StoredBlob};
use crate::error::BlobError;

/// See [`S3BlobStore::PART_SIZE`].
const PART_SIZE: usize = 8 * 1024 * 1024;

/// S3 allows at most this many parts per upload (so blobs up to 80 GiB here).
const MAX_PARTS: u32 = 10_000;

/// The most of an answer other than `GetObject` that is read (listings of 1000 keys are
/// about 300 KB).
const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// Where and as whom to store blobs. `Debug` shows everything but the secret key.
#[derive(Clone)]
pub struct S3Config {
    /// `https://s3.eu-central-1.amazonaws.com`, `http://127.0.0.1:9000`, ... (no path).
    pub endpoint: String,
    /// The bucket; it must exist (see [`S3BlobStore::create_bucket`]).
    pub bucket: String,
    /// The region the signature is scoped to (`us-east-1` for most non-AWS services).
    pub region: String,
    /// Access key id (not secret; appears in every request).
    pub access_key_id: String,
    /// Secret access key: only ever used as HMAC key, never sent or logged.
    pub secret_access_key: Zeroizing<String>,
    /// Prepended to every blob id to form its key; a `/` is added when missing (so `"blobs"`
    /// and `"blobs/"` both give `blobs/<id>`). Empty: ids at the bucket's top level. Keys
    /// under the prefix that are not blob ids are left alone.
    pub prefix: String,
    /// PEM certificates to trust for an `https` endpoint instead of Mozilla's roots (a private
    /// MinIO or Ceph).
    pub ca_pem: Option<Vec<u8>>,
    /// Keys per `ListObjectsV2` page (`max-keys`; S3 gives at most 1000).
    pub list_page_size: u32,
    /// Time limit for connecting (TCP and TLS).
    pub connect_timeout: Duration,
    /// Time limit for each request other than reading a `GetObject` body (one part upload
    /// included).
    pub request_timeout: Duration,
}

impl S3Config {
    /// A configuration with prefix `blobs/`, Mozilla's roots, 1000 keys per listing page, a
    /// 10 s connect and a 120 s request limit.
    pub fn new(
        endpoint: impl Into<String>,
        bucket: impl Into<String>,
        region: impl Into<String>,
        access_key_id: impl Into<String>,
        secret_access_key: Zeroizing<String>,
    ) -> S3Config {
        S3Config {
            endpoint: endpoint.into(),
            bucket: bucket.into(),
            region: region.into(),
            access_key_id: access_key_id.into(),
            secret_access_key,
            prefix: "blobs/".to_owned(),
            ca_pem: None,
            list_page_size: 1000,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
        }
    }
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("prefix", &self.prefix)
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| format!("{} bytes", p.len())))
            .field("list_page_size", &self.list_page_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// What went wrong talking to the object store. `target` is `bucket` or `bucket/key`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S3Error {
    /// The configuration cannot work (bad endpoint URL, unreadable CA certificates ...).
    #[error("S3 configuration: {what}: {reason}")]
    Config {
        /// The setting at fault.
        what: &'static str,
        /// Why it cannot be used.
        reason: String,
    },
    /// The service answered with an error: for instance 403 `SignatureDoesNotMatch` (wrong
    /// secret key), 403 `InvalidAccessKeyId`, 404 `NoSuchBucket`, 403 `RequestTimeTooSkewed`.
    #[error("S3 {op} of {target} refused: HTTP {status} {code}: {message}")]
    Refused {
        /// The S3 operation (`PutObject`, ...).
        op: &'static str,
        /// Bucket or bucket/key.
        target: String,
        /// HTTP status (200 for the errors S3 sends inside a 200 answer).
        status: u16,
        /// S3's error code (`<Code>` of the XML body), or the HTTP reason when there was no
        /// body (answers to HEAD).
        code: String,
        /// S3's `<Message>`, empty if none.
        message: String,
    },
    /// The endpoint could not be reached or the connection broke.
    #[error("S3 {op} of {target}: the endpoint could not be reached: {reason}")]
    Transport {
        /// The S3 operation.
        op: &'static str,
        /// Bucket or bucket/key.
        target: String,
        /// The cause chain as text.
        reason: String,
    },
    /// No complete answer within [`S3Config::request_timeout`].
    #[error("S3 {op} of {target}: no answer within {after:?}")]
    Timeout {
        /// The S3 operation.
        op: &'static str,
        /// Bucket or bucket/key.
        target: String,
        /// The limit.
        after: Duration,
    },
    /// The answer was not what S3 sends (malformed XML, a missing upload id or ETag ...).
    #[error("S3 {op} of {target}: unexpected answer: {reason}")]
    BadAnswer {
        /// The S3 operation.
        op: &'static str,
        /// Bucket or bucket/key.
        target: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The blob needs more than S3's 10,000 parts of [`S3BlobStore::PART_SIZE`]; nothing was
    /// stored.
    #[error("blob too large for the S3 store: more than {max_bytes} bytes")]
    TooLarge {
        /// The largest blob that fits.
        max_bytes: u64,
    },
}

impl S3Error {
    /// The HTTP status the service answered, for [`S3Error::Refused`].
    pub fn status(&self) -> Option<u16> {
        match self {
            S3Error::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// S3's error code (`SignatureDoesNotMatch`, `NoSuchBucket`, ...), for [`S3Error::Refused`].
    pub fn code(&self) -> Option<&str> {
        match self {
            S3Error::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// An S3-compatible object store holding message blobs. Cheap to clone (one connection pool).
#[derive(Clone)]
pub struct S3BlobStore {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: S3Config,
    /// `scheme://authority` of the endpoint, for request URLs.
    base: String,
    /// The `Host` header, as signed.
    host: String,
    /// `prefix` with its trailing `/` (or empty).
    prefix: String,
    client: Client<S3Connector, Full<Bytes>>,
}

impl fmt::Debug for S3BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3BlobStore").field("config", &self.inner.cfg).finish_non_exhaustive()
    }
}

/// One request before signing.
struct S3Request<'a> {
    op: &'static str,
    method: Method,
    key: Option<&'a str>,
    query: Vec<(&'static str, String)>,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
}

impl<'a> S3Request<'a> {
    fn new(op: &'static str, method: Method, key: Option<&'a str>) -> S3Request<'a> {
        S3Request { op, method, key, query: Vec::new(), headers: Vec::new(), body: Bytes::new() }
    }
}

impl S3BlobStore {
    /// Blobs up to this size (8 MiB) go up in one `PutObject`; longer ones in parts of this
    /// size (S3 wants parts of at least 5 MiB, except the last). Also about the most a `put`
    /// holds in memory.
    pub const PART_SIZE: usize = PART_SIZE;

    /// A store for `cfg`. Does not contact the endpoint (the first request does).
    pub fn new(cfg: S3Config) -> Result<S3BlobStore, S3Error> {
        let bad_endpoint = |reason: String| S3Error::Config { what: "endpoint", reason };
        let uri: Uri = cfg.endpoint.parse().map_err(|e| bad_endpoint(format!("{:?}: {e}", cfg.endpoint)))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad_endpoint(format!("{:?} is not an http:// or https:// URL", cfg.endpoint))),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| bad_endpoint(format!("{:?} names no host", cfg.endpoint)))?
            .as_str()
            .to_owned();
        if authority.contains('@') {
            return Err(bad_endpoint("credentials belong in access_key_id/secret_access_key".into()));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad_endpoint(format!("{:?} must have no path (URLs are path-style)", cfg.endpoint)));
        }
        if cfg.bucket.is_empty() || cfg.bucket.contains('/') {
            return Err(S3Error::Config {
                what: "bucket",
                reason: format!("{:?} is not a bucket name", cfg.bucket),
            });
        }
        if cfg.region.is_empty() {
            return Err(S3Error::Config { what: "region", reason: "empty".into() });
        }
        let tls = if https { Some(tls_connector(cfg.ca_pem.as_deref())?) } else { None };
        let connector = S3Connector { tls, connect_timeout: cfg.connect_timeout };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30));
        let prefix = if cfg.prefix.is_empty() || cfg.prefix.ends_with('/') {
            cfg.prefix.clone()
        } else {
            format!("{}/", cfg.prefix)
        };
        let scheme = if https { "https" } else { "http" };
        Ok(S3BlobStore {
            inner: Arc::new(Inner {
                base: format!("{scheme}://{authority}"),
                host: authority,
                prefix,
                client: builder.build(connector),
                cfg,
            }),
        })
    }

    /// The configuration this store was made with.
    pub fn config(&self) -> &S3Config {
        &self.inner.cfg
    }

    /// The object key of blob `id`.
    pub fn key_of(&self, id: &BlobId) -> String {
        format!("{}{}", self.inner.prefix, id.as_str())
    }

    /// Creates the bucket (`CreateBucket`, with a location constraint outside `us-east-1`);
    /// a bucket this account already owns is fine. For setup tools and tests: production
    /// buckets are usually made by the operator with their lifecycle rules.
    pub async fn create_bucket(&self) -> Result<(), S3Error> {
        let mut req = S3Request::new("CreateBucket", Method::PUT, None);
        if self.inner.cfg.region != "us-east-1" {
            req.body = Bytes::from(format!(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                 <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                xml_escape(&self.inner.cfg.region)
            ));
        }
        match self.call(req).await {
            Ok(_) => Ok(()),
            Err(S3Error::Refused { code, .. }) if code == "BucketAlreadyOwnedByYou" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every blob under the prefix with its `LastModified` (`ListObjectsV2`, all pages).
    /// Keys under the prefix that are not blob ids are skipped with a warning.
    pub async fn list_blobs(&self) -> Result<Vec<(BlobId, SystemTime)>, S3Error> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = S3Request::new("ListObjectsV2", Method::GET, None);
            req.query.push(("list-type", "2".into()));
            req.query.push(("prefix", self.inner.prefix.clone()));
            req.query.push(("max-keys", self.inner.cfg.list_page_size.to_string()));
            if let Some(t) = token.take() {
                req.query.push(("continuation-token", t));
            }
            let (_, _, body) = self.call(req).await?;
            let doc = self.parse_answer("ListObjectsV2", None, &body)?;
            for object in doc.children_named("Contents") {
                let key = object.child_text("Key").unwrap_or_default();
                let Some(name) = key.strip_prefix(self.inner.prefix.as_str()) else { continue };
                let Ok(id) = BlobId::parse(name) else {
                    tracing::warn!(key, "object under the blob prefix that is not a blob left alone");
                    continue;
                };
                let modified = object.child_text("LastModified").unwrap_or_default();
                let modified = parse_timestamp(modified).ok_or_else(|| S3Error::BadAnswer {
                    op: "ListObjectsV2",
                    target: self.target(Some(key)),
                    reason: format!("LastModified {modified:?} is not an ISO 8601 UTC time"),
                })?;
                out.push((id, modified));
            }
            if doc.child_text("IsTruncated") != Some("true") {
                return Ok(out);
            }
            match doc.child_text("NextContinuationToken") {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => {
                    return Err(S3Error::BadAnswer {
                        op: "ListObjectsV2",
                        target: self.target(None),
                        reason: "a truncated listing without NextContinuationToken".into(),
                    });
                }
            }
        }
    }

    /// Aborts multipart uploads under the prefix initiated before `cutoff` (left by a
    /// gateway that stopped mid-upload).
    async fn abort_stale_uploads(&self, cutoff: SystemTime) -> Result<usize, S3Error> {
        let mut aborted = 0;
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut req = S3Request::new("ListMultipartUploads", Method::GET, None);
            req.query.push(("uploads", String::new()));
            req.query.push(("prefix", self.inner.prefix.clone()));
            if let Some((key, upload)) = markers.take() {
                req.query.push(("key-marker", key));
                req.query.push(("upload-id-marker", upload));
            }
            let (_, _, body) = self.call(req).await?;
            let doc = self.parse_answer("ListMultipartUploads", None, &body)?;
            for upload in doc.children_named("Upload") {
                let (Some(key), Some(upload_id)) = (upload.child_text("Key"), upload.child_text("UploadId"))
                else {
                    continue;
                };
                let stale =
                    upload.child_text("Initiated").and_then(parse_timestamp).is_some_and(|t| t < cutoff);
                if stale && BlobId::parse(key.strip_prefix(self.inner.prefix.as_str()).unwrap_or(key)).is_ok()
                {
                    tracing::info!(key, "aborting an interrupted multipart upload");
                    self.abort_upload(key, upload_id).await?;
                    aborted += 1;
                }
            }
            if doc.child_text("IsTruncated") != Some("true") {
                return Ok(aborted);
            }
            match (doc.child_text("NextKeyMarker"), doc.child_text("NextUploadIdMarker")) {
                (Some(k), Some(u)) if !k.is_empty() => markers = Some((k.to_owned(), u.to_owned())),
                _ => return Ok(aborted),
            }
        }
    }

    fn target(&self, key: Option<&str>) -> String {
        match key {
            Some(k) => format!("{}/{k}", self.inner.cfg.bucket),
            None => self.inner.cfg.bucket.clone(),
        }
    }

    /// Signs and sends `req`; returns the answer with its body unread. Only the wait for the
    /// answer's head is under the request timeout (a `GetObject` body may take longer).
    async fn send(&self, req: S3Request<'_>) -> Result<Response<Incoming>, S3Error> {
        let (op, target) = (req.op, self.target(req.key));
        // Only a configured value that is not valid in an HTTP header can fail here.
        let request = self.sign(req, SystemTime::now()).map_err(|reason| S3Error::Config {
            what: "access_key_id, region or bucket",
            reason: format!("cannot form a request for {target}: {reason}"),
        })?;
        let limit = self.inner.cfg.request_timeout;
        match tokio::time::timeout(limit, self.inner.client.request(request)).await {
            Err(_) => Err(S3Error::Timeout { op, target, after: limit }),
            Ok(Err(e)) => Err(S3Error::Transport { op, target, reason: error_chain(&e) }),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Sends `req` and reads the whole answer; a status other than 2xx becomes
    /// [`S3Error::Refused`] with the code from the XML body.
    async fn call(&self, req: S3Request<'_>) -> Result<(StatusCode, HeaderMap, Bytes), S3Error> {
        let (op, key) = (req.op, req.key);
        let response = self.send(req).await?;
        let (parts, body) = response.into_parts();
        let limit = self.inner.cfg.request_timeout;
        let body = match tokio::time::timeout(limit, Limited::new(body, MAX_ANSWER).collect()).await {
            Err(_) => return Err(S3Error::Timeout { op, target: self.target(key), after: limit }),
            Ok(Err(e)) => {
                return Err(S3Error::Transport { op, target: self.target(key), reason: error_chain(&*e) });
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        if !parts.status.is_success() {
            return Err(self.refused(op, key, parts.status, &body));
        }
        Ok((parts.status, parts.headers, body))
    }

    /// The error for an answer with a non-2xx status (or an `<Error>` inside a 200).
    fn refused(&self, op: &'static str, key: Option<&str>, status: StatusCode, body: &[u8]) -> S3Error {
        let parsed = XmlElement::parse(body).ok().filter(|doc| doc.name == "Error");
        let (code, message) = match &parsed {
            Some(doc) => (
                doc.child_text("Code").unwrap_or_default().to_owned(),
                doc.child_text("Message").unwrap_or_default().to_owned(),
            ),
            None => (status.canonical_reason().unwrap_or("error").replace(' ', ""), String::new()),
        };
        S3Error::Refused { op, target: self.target(key), status: status.as_u16(), code, message }
    }

    /// Parses a 2xx answer's XML; an `<Error>` document (S3 sends some inside a 200) becomes
    /// [`S3Error::Refused`].
    fn parse_answer(&self, op: &'static str, key: Option<&str>, body: &[u8]) -> Result<XmlElement, S3Error> {
        let doc = XmlElement::parse(body).map_err(|reason| S3Error::BadAnswer {
            op,
            target: self.target(key),
            reason: format!("malformed XML: {reason}"),
        })?;
        if doc.name == "Error" {
            return Err(self.refused(op, key, StatusCode::OK, body));
        }
        Ok(doc)
    }

    /// The request with its Signature Version 4 `Authorization` header.
    fn sign(&self, req: S3Request<'_>, now: SystemTime) -> Result<Request<Full<Bytes>>, String> {
        let cfg = &self.inner.cfg;
        let mut path = format!("/{}", uri_encode(&cfg.bucket, false));
        if let Some(key) = req.key {
            path.push('/');
            path.push_str(&uri_encode(key, true));
        }
        let mut query: Vec<(String, String)> =
            req.query.iter().map(|(k, v)| (uri_encode(k, false), uri_encode(v, false))).collect();
        query.sort();
        let query = query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
        let (amz_date, date) = amz_timestamps(now);
        let payload_hash = hex::encode(Sha256::digest(&req.body));
        let mut headers: Vec<(&str, String)> = vec![
            ("host", self.inner.host.clone()),
            ("x-amz-content-sha256", payload_hash.clone()),
            ("x-amz-date", amz_date.clone()),
        ];
        headers.extend(req.headers.iter().map(|(k, v)| (*k, v.trim().to_owned())));
        headers.sort();
        let signed_headers = headers.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(";");
        let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let canonical_request = format!(
            "{}\n{path}\n{query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}",
            req.method.as_str()
        );
        let scope = format!("{date}/{}/s3/aws4_request", cfg.region);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical_request.as_bytes()))
        );
        let signature =
            hex::encode(signing_key(&cfg.secret_access_key, &date, &cfg.region).sign(string_to_sign));
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            cfg.access_key_id
        );
        let url = if query.is_empty() {
            format!("{}{path}", self.inner.base)
        } else {
            format!("{}{path}?{query}", self.inner.base)
        };
        let mut builder =
            Request::builder().method(req.method).uri(url).header("authorization", authorization);
        for (k, v) in headers {
            // hyper sets Host from the URI unless given; give exactly the signed value.
            let name = if k == "host" { HOST.as_str() } else { k };
            builder = builder.header(name, v);
        }
        builder.body(Full::new(req.body)).map_err(|e| e.to_string())
    }

    async fn put_object(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        let mut req = S3Request::new("PutObject", Method::PUT, Some(key));
        req.headers.push(("content-type", "application/octet-stream".into()));
        req.body = body;
        self.call(req).await.map(drop)
    }

    async fn create_upload(&self, key: &str) -> Result<String, S3Error> {
        let mut req = S3Request::new("CreateMultipartUpload", Method::POST, Some(key));
        req.query.push(("uploads", String::new()));
        req.headers.push(("content-type", "application/octet-stream".into()));
        let (_, _, body) = self.call(req).await?;
        let doc = self.parse_answer("CreateMultipartUpload", Some(key), &body)?;
        match doc.child_text("UploadId") {
            Some(id) if !id.is_empty() => Ok(id.to_owned()),
            _ => Err(S3Error::BadAnswer {
                op: "CreateMultipartUpload",
                target: self.target(Some(key)),
                reason: "no UploadId".into(),
            }),
        }
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        body: Bytes,
    ) -> Result<String, S3Error> {
        let mut req = S3Request::new("UploadPart", Method::PUT, Some(key));
        req.query.push(("partNumber", number.to_string()));
        req.query.push(("uploadId", upload_id.to_owned()));
        req.body = body;
        let (_, headers, _) = self.call(req).await?;
        match headers.get(ETAG).and_then(|v| v.to_str().ok()) {
            Some(etag) if !etag.is_empty() => Ok(etag.to_owned()),
            _ => Err(S3Error::BadAnswer {
                op: "UploadPart",
                target: self.target(Some(key)),
                reason: format!("no ETag for part {number}"),
            }),
        }
    }

    async fn complete_upload(&self, key: &str, upload_id: &str, etags: &[String]) -> Result<(), S3Error> {
        let mut xml =
            String::from("<CompleteMultipartUpload xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">");
        for (i, etag) in etags.iter().enumerate() {
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                xml_escape(etag)
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let mut req = S3Request::new("CompleteMultipartUpload", Method::POST, Some(key));
        req.query.push(("uploadId", upload_id.to_owned()));
        req.headers.push(("content-type", "application/xml".into()));
        req.body = Bytes::from(xml);
        let (_, _, body) = self.call(req).await?;
        // S3 may answer 200 and report a failure in the body (it sends the 200 early).
        self.parse_answer("CompleteMultipartUpload", Some(key), &body).map(drop)
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        let mut req = S3Request::new("AbortMultipartUpload", Method::DELETE, Some(key));
        req.query.push(("uploadId", upload_id.to_owned()));
        match self.call(req).await {
            Ok(_) => Ok(()),
            // Already completed or aborted (by another node's sweep, say).
            Err(S3Error::Refused { code, .. }) if code == "NoSuchUpload" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Uploads the rest of `data` as parts after `first` (a full part) and the byte read
    /// beyond it; returns the blob's length.
    async fn put_multipart(
        &self,
        key: &str,
        upload_id: &str,
        first: Vec<u8>,
        next_byte: u8,
        data: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64, BlobError> {
        let mut etags = Vec::new();
        let mut len = first.len() as u64;
        etags.push(self.upload_part(key, upload_id, 1, Bytes::from(first)).await?);
        let mut carry = Some(next_byte);
        loop {
            let mut part = Vec::with_capacity(PART_SIZE);
            if let Some(b) = carry.take() {
                part.push(b);
            }
            read_part(data, &mut part).await?;
            if part.is_empty() {
                break;
            }
            let number = etags.len() as u32 + 1;
            if number > MAX_PARTS {
                return Err(S3Error::TooLarge { max_bytes: PART_SIZE as u64 * u64::from(MAX_PARTS) }.into());
            }
            let full = part.len() == PART_SIZE;
            len += part.len() as u64;
            etags.push(self.upload_part(key, upload_id, number, Bytes::from(part)).await?);
            if !full {
                break;
            }
        }
        self.complete_upload(key, upload_id, &etags).await?;
        Ok(len)
    }

    async fn put_blob(&self, data: &mut (dyn AsyncRead + Send + Unpin)) -> Result<StoredBlob, BlobError> {
        let id = BlobId::random()?;
        let key = self.key_of(&id);
        // Grows by doubling from 64 KiB, so a small message does not cost a whole part.
        let mut first = Vec::with_capacity(64 * 1024);
        read_part(data, &mut first).await?;
        let mut probe = [0u8; 1];
        let more = first.len() == PART_SIZE && data.read(&mut probe).await.map_err(BlobError::Source)? == 1;
        if !more {
            let len = first.len() as u64;
            self.put_object(&key, Bytes::from(first)).await?;
            return Ok(StoredBlob { id, len });
        }
        let upload_id = self.create_upload(&key).await?;
        match self.put_multipart(&key, &upload_id, first, probe[0], data).await {
            Ok(len) => Ok(StoredBlob { id, len }),
            Err(e) => {
                // Parts of an unfinished upload are invisible but kept (and billed) until
                // aborted; the orphan sweep retries what fails here.
                if let Err(abort) = self.abort_upload(&key, &upload_id).await {
                    tracing::warn!(key, error = %abort, "aborting a failed multipart upload failed");
                }
                Err(e)
            }
        }
    }

    async fn get_blob(&self, id: &BlobId) -> Result<BlobReader, BlobError> {
        let key = self.key_of(id);
        let response = self.send(S3Request::new("GetObject", Method::GET, Some(&key))).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(Box::pin(BodyReader { body: response.into_body(), pending: Bytes::new() }));
        }
        let body = Limited::new(response.into_body(), MAX_ANSWER).collect().await.map(|c| c.to_bytes());
        match self.refused("GetObject", Some(&key), status, body.as_deref().unwrap_or_default()) {
            // Only a missing key is a missing blob; a missing bucket (NoSuchBucket) is not.
            S3Error::Refused { code, .. } if code == "NoSuchKey" => {
                Err(BlobError::NotFound(id.as_str().to_owned()))
            }
            error => Err(error.into()),
        }
    }

    async fn copy_blob(&self, id: &BlobId) -> Result<StoredBlob, BlobError> {
        let source = self.key_of(id);
        let new = BlobId::random()?;
        let key = self.key_of(&new);
        let mut req = S3Request::new("CopyObject", Method::PUT, Some(&key));
        let copy_source =
            format!("/{}/{}", uri_encode(&self.inner.cfg.bucket, false), uri_encode(&source, true));
        req.headers.push(("x-amz-copy-source", copy_source));
        // CopyObject first: its error body tells a missing source (NoSuchKey, which the store
        // skips) from a missing bucket; a HEAD's 404 has no body to tell them apart.
        match self.call(req).await {
            // Like CompleteMultipartUpload, CopyObject can fail inside a 200.
            Ok((_, _, body)) => self.parse_answer("CopyObject", Some(&key), &body).map(drop)?,
            Err(S3Error::Refused { code, .. }) if code == "NoSuchKey" => {
                return Err(BlobError::NotFound(id.as_str().to_owned()));
            }
            Err(e) => return Err(e.into()),
        }
        // CopyObjectResult has no size; the copy's own HEAD gives it.
        match self.object_len(&key).await {
            Ok(len) => Ok(StoredBlob { id: new, len }),
            Err(e) => {
                // Without a row the copy is an orphan; the sweep would remove it anyway.
                if let Err(delete) = self.delete_blobs(std::slice::from_ref(&new)).await {
                    tracing::warn!(key, error = %delete, "removing a copy whose size is unknown failed");
                }
                Err(e.into())
            }
        }
    }

    /// `HeadObject`'s `Content-Length`.
    async fn object_len(&self, key: &str) -> Result<u64, S3Error> {
        let (_, headers, _) = self.call(S3Request::new("HeadObject", Method::HEAD, Some(key))).await?;
        headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| S3Error::BadAnswer {
                op: "HeadObject",
                target: self.target(Some(key)),
                reason: "no Content-Length".into(),
            })
    }

    async fn delete_blobs(&self, ids: &[BlobId]) -> Result<(), BlobError> {
        for id in ids {
            let key = self.key_of(id);
            // S3 answers 204 for a key that does not exist; a 404 means a missing bucket
            // (NoSuchBucket), which must not pass for a successful delete. Some services do
            // answer NoSuchKey, which is fine.
            match self.call(S3Request::new("DeleteObject", Method::DELETE, Some(&key))).await {
                Ok(_) => {}
                Err(S3Error::Refused { code, .. }) if code == "NoSuchKey" => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn old_blobs(&self, age: Duration) -> Result<Vec<BlobId>, BlobError> {
        let cutoff = SystemTime::now().checked_sub(age).unwrap_or(UNIX_EPOCH);
        // Housekeeping only: a service without ListMultipartUploads must not stop the sweep.
        if let Err(e) = self.abort_stale_uploads(cutoff).await {
            tracing::warn!(error = %e, "could not clean up interrupted multipart uploads");
        }
        let blobs = self.list_blobs().await?;
        Ok(blobs.into_iter().filter(|(_, modified)| *modified < cutoff).map(|(id, _)| id).collect())
    }
}

impl BlobStore for S3BlobStore {
    fn put<'a>(&'a self, data: &'a mut (dyn AsyncRead + Send + Unpin)) -> BlobFuture<'a, StoredBlob> {
        Box::pin(self.put_blob(data))
    }

    fn get<'a>(&'a self, id: &'a BlobId) -> BlobFuture<'a, BlobReader> {
        Box::pin(self.get_blob(id))
    }

    fn copy<'a>(&'a self, id: &'a BlobId) -> BlobFuture<'a, StoredBlob> {
        Box::pin(self.copy_blob(id))
    }

    fn delete<'a>(&'a self, ids: &'a [BlobId]) -> BlobFuture<'a, ()> {
        Box::pin(self.delete_blobs(ids))
    }

    fn list_older_than(&self, age: Duration) -> BlobFuture<'_, Vec<BlobId>> {
        Box::pin(self.old_blobs(age))
    }
}

/// Fills `part` from `data` up to [`PART_SIZE`] bytes or the end of `data`. Never lets the
/// buffer grow beyond `PART_SIZE` (as `read_to_end` would, to probe for the end).
async fn read_part(data: &mut (dyn AsyncRead + Send + Unpin), part: &mut Vec<u8>) -> Result<(), BlobError> {
    while part.len() < PART_SIZE {
        let room = (PART_SIZE - part.len()) as u64;
        if (&mut *data).take(room).read_buf(part).await.map_err(BlobError::Source)? == 0 {
            break;
        }
    }
    Ok(())
}

/// `kSigning` of Signature V4: HMAC chain over date, region and service from the secret.
fn signing_key(secret: &str, date: &str, region: &str) -> SigningKey {
    let hmac = |key: &[u8], data: &str| {
        ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), data.as_bytes())
    };
    let first = Zeroizing::new(format!("AWS4{secret}"));
    let k_date = hmac(first.as_bytes(), date);
    let k_region = hmac(k_date.as_ref(), region);
    let k_service = hmac(k_region.as_ref(), "s3");
    let k_signing = hmac(k_service.as_ref(), "aws4_request");
    SigningKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k_signing.as_ref()))
}

struct SigningKey(ring::hmac::Key);

impl SigningKey {
    fn sign(&self, string_to_sign: String) -> ring::hmac::Tag {
        ring::hmac::sign(&self.0, string_to_sign.as_bytes())
    }
}

/// Signature V4's URI encoding: everything but `A-Za-z0-9-_.~` as `%XX` (and `/` kept in
/// object keys).
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// (`YYYYMMDDTHHMMSSZ`, `YYYYMMDD`) of `now` in UTC.
fn amz_timestamps(now: SystemTime) -> (String, String) {
    let secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let date = format!("{y:04}{m:02}{d:02}");
    (format!("{date}T{:02}{:02}{:02}Z", rem / 3600, rem / 60 % 60, rem % 60), date)
}

/// Year, month, day of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-26T01:08:00.000Z` (S3's `LastModified`; fraction optional) as a time.
fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let rest = &s[19..];
    let rest =
        rest.strip_prefix('.').map(|f| f.trim_start_matches(|c: char| c.is_ascii_digit())).unwrap_or(rest);
    if rest != "Z" || !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(y), mo, d);
    let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + sec);
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// An error and its causes as one line (hyper's top-level message alone says little).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// A minimal element tree of an S3 answer (names without namespace, text unescaped).
#[derive(Debug, Default)]
struct XmlElement {
    name: String,
    text: String,
    children: Vec<XmlElement>,
}

impl XmlElement {
    fn parse(xml: &[u8]) -> Result<XmlElement, String> {
        let mut reader = quick_xml::Reader::from_reader(xml);
        reader.config_mut().trim_text(true);
        let mut stack: Vec<XmlElement> = Vec::new();
        loop {
            let event = reader.read_event().map_err(|e| e.to_string())?;
            match event {
                Event::Start(start) => stack.push(XmlElement {
                    name: String::from_utf8_lossy(start.local_name().as_ref()).into_owned(),
                    ..XmlElement::default()
                }),
                Event::Empty(empty) => {
                    let element = XmlElement {
                        name: String::from_utf8_lossy(empty.local_name().as_ref()).into_owned(),
                        ..XmlElement::default()
                    };
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(element),
                        None => return Ok(element),
                    }
                }
                Event::Text(text) => {
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&text.unescape().map_err(|e| e.to_string())?);
                    }
                }
                Event::CData(data) => {
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                Event::End(_) => {
                    let element = stack.pop().ok_or("closing tag without an opening one")?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(element),
                        None => return Ok(element),
                    }
                }
                Event::Eof => return Err("document ends before its root element does".into()),
                _ => {}
            }
        }
    }

    fn children_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s XmlElement> + 's {
        self.children.iter().filter(move |c| c.name == name)
    }

    fn child_text(&self, name: &str) -> Option<&str> {
        self.children.iter().find(|c| c.name == name).map(|c| c.text.as_str())
    }
}

/// A `GetObject` body as [`AsyncRead`], frame by frame as hyper receives them.
struct BodyReader {
    body: Incoming,
    pending: Bytes,
}

impl AsyncRead for BodyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                // hyper checks Content-Length: a connection closed early is an error here,
                // not a silently short blob.
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(io::Error::other(format!(
                        "S3 GetObject body: {}",
                        error_chain(&e)
                    ))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending = data;
                    }
                }
            }
        }
    }
}

fn tls_connector(ca_pem: Option<&[u8]>) -> Result<tokio_rustls::TlsConnector, S3Error> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            let bad = |reason: String| S3Error::Config { what: "ca_pem", reason };
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("no certificate in the PEM text".into()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| S3Error::Config { what: "tls", reason: e.to_string() })?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Opens TCP connections, with TLS for `https` endpoints, for hyper's pool.
#[derive(Clone)]
struct S3Connector {
    tls: Option<tokio_rustls::TlsConnector>,
    connect_timeout: Duration,
}

impl tower_service::Service<Uri> for S3Connector {
    type Response = S3Connection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<S3Connection>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let limit = self.connect_timeout;
        Box::pin(async move {
            let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
            let host = uri.host().ok_or_else(|| invalid("no host in the endpoint URL".into()))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let connect = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                match (&tls, https) {
                    (Some(tls), true) => {
                        let name = ServerName::try_from(host.clone()).map_err(|e| invalid(e.to_string()))?;
                        Ok(S3Stream::Tls(Box::new(tls.connect(name, tcp).await?)))
                    }
                    (None, false) => Ok(S3Stream::Plain(tcp)),
                    _ => Err(invalid(format!("scheme of {uri} differs from the configured endpoint's"))),
                }
            };
            let stream = tokio::time::timeout(limit, connect).await.map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {host}:{port} timed out"))
            })??;
            Ok(S3Connection { io: TokioIo::new(stream) })
        })
    }
}

enum S3Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for S3Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            S3Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            S3Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for S3Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            S3Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            S3Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            S3Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            S3Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            S3Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            S3Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connection as hyper sees it.
struct S3Connection {
    io: TokioIo<S3Stream>,
}

impl Connection for S3Connection {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for S3Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for S3Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of AWS's Signature V4 documentation ("GET Object" in "Signature
    /// Calculations for the Authorization Header: Transferring Payload in a Single Chunk"):
    /// the same canonical request must give the signature published there.
    #[test]
    fn signature_matches_the_aws_documentation_example() {
        let cfg = S3Config {
            prefix: String::new(),
            ..S3Config::new(
                "https://examplebucket.s3.amazonaws.com",
                "examplebucket",
                "us-east-1",
                "AKIAIOSFODNN7EXAMPLE",
                Zeroizing::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into()),
            )
        };
        let canonical_request = "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n\
             x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
             x-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n{}",
            hex::encode(Sha256::digest(canonical_request.as_bytes()))
        );
        let key = signing_key(&cfg.secret_access_key, "20130524", &cfg.region);
        assert_eq!(
            hex::encode(key.sign(string_to_sign)),
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn timestamps_round_trip_and_match_known_dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_369_353_600); // 2013-05-24T00:00:00Z
        assert_eq!(amz_timestamps(t), ("20130524T000000Z".into(), "20130524".into()));
        assert_eq!(parse_timestamp("2013-05-24T00:00:00.000Z"), Some(t));
        assert_eq!(parse_timestamp("2013-05-24T00:00:07Z"), Some(t + Duration::from_secs(7)));
        let leap = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29T12:34:56Z
        assert_eq!(amz_timestamps(leap).0, "20240229T123456Z");
        assert_eq!(parse_timestamp("2024-02-29T12:34:56.123456Z"), Some(leap));
        for bad in
            ["", "2013-05-24", "2013-05-24T00:00:00+01:00", "2013-13-24T00:00:00Z", "x013-05-24T00:00:00Z"]
        {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn uri_encoding_follows_signature_v4() {
        assert_eq!(uri_encode("blobs/ab~c-d_e.f", true), "blobs/ab~c-d_e.f");
        assert_eq!(uri_encode("a b/c+d=", false), "a%20b%2Fc%2Bd%3D");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let cfg = S3Config::new(
            "http://127.0.0.1:9000",
            "b",
            "us-east-1",
            "AKID",
            Zeroizing::new("s3cr3t-value".into()),
        );
        let store = S3BlobStore::new(cfg.clone()).unwrap();
        for text in [format!("{cfg:?}"), format!("{store:?}")] {
            assert!(!text.contains("s3cr3t-value"), "{text}");
            assert!(text.contains("AKID"), "{text}");
        }
    }

    #[test]
    fn bad_endpoints_are_refused_with_the_reason() {
        for endpoint in ["ftp://host", "127.0.0.1:9000", "http://host/some/path", "http://user:pw@host"] {
            let cfg = S3Config::new(endpoint, "b", "us-east-1", "AKID", Zeroizing::new("s".into()));
            let err = S3BlobStore::new(cfg).unwrap_err();
            assert!(matches!(err, S3Error::Config { what: "endpoint", .. }), "{endpoint}: {err}");
        }
    }

    #[test]
    fn s3_error_bodies_are_parsed() {
        let doc = XmlElement::parse(
            b"<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>\
              <Message>The request signature we calculated does not match &amp; so on</Message></Error>",
        )
        .unwrap();
        assert_eq!(doc.name, "Error");
        assert_eq!(doc.child_text("Code"), Some("SignatureDoesNotMatch"));
        assert_eq!(
            doc.child_text("Message"),
            Some("The request signature we calculated does not match & so on")
        );
        assert!(XmlElement::parse(b"<Error><Code>x</Code>").is_err());
    }
}
