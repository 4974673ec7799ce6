//! An async ETSI GS QKD 014 client for SAEs: HTTPS with a client certificate.
//!
//! ```no_run
//! # async fn demo() -> Result<(), etsi014::client::Etsi014Error> {
//! use etsi014::client::{ClientTlsConfig, Etsi014Client};
//! let tls = ClientTlsConfig::from_files("ca.pem".as_ref(), "sae.pem".as_ref(), "sae.key".as_ref())?;
//! let kme = Etsi014Client::new("https://kme-a.example:8443", tls)?;
//! let keys = kme.enc_keys("B-mail", 2, Some(256)).await?;
//! for key in &keys.keys {
//!     println!("{} ({} bits)", key.key_id, key.key.bits()); // never the key itself
//! }
//! # Ok(()) }
//! ```
//!
//! One [`Etsi014Client`] keeps a pool of connections to its KME (keep-alive) and may be cloned
//! freely; HTTP/2 is used when the KME offers it through ALPN, HTTP/1.1 otherwise. Every error
//! names the URL it concerns. Key bytes are only ever held as
//! [`KeyMaterial`](crate::types::KeyMaterial); note that the HTTP layer's own receive buffers
//! are not wiped.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rustls_pki_types::ServerName;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::tls::{self, TlsConfigError, TlsPem};
use crate::types::{API_PREFIX, ErrorBody, KeyContainer, KeyIds, KeyRequest, Status};

/// The client's TLS material: the CA of the KME's server certificate, and the SAE's own
/// certificate and key (the KME derives the caller's SAE ID from that certificate).
pub type ClientTlsConfig = TlsPem;

/// Which HTTP versions the client offers through ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpVersionPolicy {
    /// Offer `h2` and `http/1.1`; the KME picks.
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1Only,
    /// HTTP/2 only (the handshake fails against a KME without `h2`).
    Http2Only,
}

/// Tuning of an [`Etsi014Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Limit for one request, from sending it to the end of the answer's body.
    pub timeout: Duration,
    /// Limit for the TCP connection and TLS handshake.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// HTTP versions offered.
    pub http: HttpVersionPolicy,
    /// Largest answer body accepted.
    pub max_response_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            // Below common server idle timeouts, so the pool rarely reuses a connection the
            // server is closing.
            pool_idle_timeout: Duration::from_secs(30),
            http: HttpVersionPolicy::Auto,
            max_response_bytes: 16 << 20,
        }
    }
}

/// What can go wrong talking to a KME. Every variant that concerns a request names its URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Etsi014Error {
    /// The base URL is not an `https://host[:port][/prefix]` URL.
    #[error("invalid KME base URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS material could not be loaded or was refused.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// 400: the KME refused the request; the spec's error body says why.
    #[error("KME {url}: bad request (400): {error}")]
    BadRequest {
        /// The request's URL.
        url: String,
        /// The KME's error body (a synthetic one if it sent none).
        error: ErrorBody,
    },
    /// 401: the KME does not authorize this SAE for the request.
    #[error("KME {url}: unauthorized (401){}", fmt_body(.error))]
    Unauthorized {
        /// The request's URL.
        url: String,
        /// The KME's error body, if it sent one.
        error: Option<ErrorBody>,
    },
    /// 503: the KME cannot serve now (typically: not enough key).
    #[error("KME {url}: service unavailable (503){}", fmt_body(.error))]
    ServiceUnavailable {
        /// The request's URL.
        url: String,
        /// The KME's error body, if it sent one.
        error: Option<ErrorBody>,
    },
    /// Any other non-200 status.
    #[error("KME {url}: unexpected HTTP status {status}{}", fmt_body(.error))]
    UnexpectedStatus {
        /// The request's URL.
        url: String,
        /// The status code.
        status: u16,
        /// The error body, if it was one in the spec's format.
        error: Option<ErrorBody>,
    },
    /// The connection, the TLS handshake or the HTTP exchange failed.
    #[error("KME {url}: {reason}")]
    Transport {
        /// The request's URL.
        url: String,
        /// The whole chain of causes, outermost first.
        reason: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No complete answer within [`ClientOptions::timeout`].
    #[error("KME {url}: no answer within {timeout:?}")]
    Timeout {
        /// The request's URL.
        url: String,
        /// The limit that passed.
        timeout: Duration,
    },
    /// A 200 answer whose body is not what the specification says.
    #[error("KME {url}: invalid response: {reason}")]
    InvalidResponse {
        /// The request's URL.
        url: String,
        /// What is wrong with it (never key material).
        reason: String,
    },
}

fn fmt_body(error: &Option<ErrorBody>) -> String {
    error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
}

impl Etsi014Error {
    /// The HTTP status, for errors that are answers from the KME.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::BadRequest { .. } => Some(400),
            Self::Unauthorized { .. } => Some(401),
            Self::ServiceUnavailable { .. } => Some(503),
            Self::UnexpectedStatus { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The error body's message, if the KME sent one.
    pub fn message(&self) -> Option<&str> {
        match self {
            Self::BadRequest { error, .. } => Some(&error.message),
            Self::Unauthorized { error, .. }
            | Self::ServiceUnavailable { error, .. }
            | Self::UnexpectedStatus { error, .. } => error.as_ref().map(|e| e.message.as_str()),
            _ => None,
        }
    }

    /// Whether the KME could not be reached or did not answer (retrying later may help), as
    /// opposed to an answer that refused the request.
    pub fn is_transport(&self) -> bool {
        matches!(self, Self::Transport { .. } | Self::Timeout { .. })
    }
}

/// Characters left as they are in a path segment: RFC 3986 unreserved.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// An ETSI GS QKD 014 client bound to one KME. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct Etsi014Client {
    base: Arc<str>,
    http: MtlsHttp,
    options: ClientOptions,
}

impl fmt::Debug for Etsi014Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Etsi014Client").field("base", &self.base).field("options", &self.options).finish()
    }
}

impl Etsi014Client {
    /// A client for the KME at `base_url` (`https://host[:port]`, optionally with a path prefix
    /// before `/api/v1/keys`), with default [`ClientOptions`].
    pub fn new(base_url: &str, tls: ClientTlsConfig) -> Result<Self, Etsi014Error> {
        Self::with_options(base_url, tls, ClientOptions::default())
    }

    /// A client with explicit options.
    pub fn with_options(
        base_url: &str,
        tls: ClientTlsConfig,
        options: ClientOptions,
    ) -> Result<Self, Etsi014Error> {
        let base = base_url.trim_end_matches('/');
        let invalid =
            |reason: &str| Etsi014Error::InvalidUrl { url: base_url.to_owned(), reason: reason.to_owned() };
        let uri: Uri = base.parse().map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(invalid("the scheme must be https"));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(invalid("no host"));
        }
        if uri.query().is_some() {
            return Err(invalid("a query is not allowed"));
        }

        let http = MtlsHttp::new(&tls, &options)?;
        Ok(Self { base: base.into(), http, options })
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, sae_id: &str, method: &str) -> String {
        format!("{}{API_PREFIX}/{}/{method}", self.base, utf8_percent_encode(sae_id, SEGMENT))
    }

    /// *Get status* (`GET …/{slave_SAE_ID}/status`): the key available for this SAE (as
    /// master) towards `slave_sae_id`.
    pub async fn status(&self, slave_sae_id: &str) -> Result<Status, Etsi014Error> {
        let url = self.url(slave_sae_id, "status");
        self.request(Method::GET, url, None, false).await
    }

    /// *Get key* (`GET …/{slave_SAE_ID}/enc_keys?number=&size=`): `number` new keys shared
    /// with `slave_sae_id`, of `size` bits (`None`: the KME's default).
    pub async fn enc_keys(
        &self,
        slave_sae_id: &str,
        number: u32,
        size: Option<u32>,
    ) -> Result<KeyContainer, Etsi014Error> {
        let query = {
            // The serializer is not `Send`: keep it out of the future's state.
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("number", &number.to_string());
            if let Some(size) = size {
                query.append_pair("size", &size.to_string());
            }
            query.finish()
        };
        let url = format!("{}?{query}", self.url(slave_sae_id, "enc_keys"));
        self.request(Method::GET, url, None, true).await
    }

    /// *Get key* with a full request body (`POST …/{slave_SAE_ID}/enc_keys`).
    pub async fn enc_keys_with(
        &self,
        slave_sae_id: &str,
        request: &KeyRequest,
    ) -> Result<KeyContainer, Etsi014Error> {
        let url = self.url(slave_sae_id, "enc_keys");
        let body = self.encode(&url, request)?;
        self.request(Method::POST, url, Some(body), true).await
    }

    /// *Get key with key IDs* (`POST …/{master_SAE_ID}/dec_keys`): the keys `master_sae_id`
    /// obtained for this SAE. Each key is delivered once.
    pub async fn dec_keys<S: AsRef<str>>(
        &self,
        master_sae_id: &str,
        key_ids: &[S],
    ) -> Result<KeyContainer, Etsi014Error> {
        self.dec_keys_with(master_sae_id, &KeyIds::new(key_ids.iter().map(|id| id.as_ref().to_owned()))).await
    }

    /// *Get key with key IDs* with a full request body, extensions included.
    pub async fn dec_keys_with(
        &self,
        master_sae_id: &str,
        request: &KeyIds,
    ) -> Result<KeyContainer, Etsi014Error> {
        let url = self.url(master_sae_id, "dec_keys");
        let body = self.encode(&url, request)?;
        self.request(Method::POST, url, Some(body), true).await
    }

    /// *Get key with key IDs* through `GET …/{master_SAE_ID}/dec_keys?key_ID=`: one key.
    pub async fn dec_key_get(&self, master_sae_id: &str, key_id: &str) -> Result<KeyContainer, Etsi014Error> {
        let query = form_urlencoded::Serializer::new(String::new()).append_pair("key_ID", key_id).finish();
        let url = format!("{}?{query}", self.url(master_sae_id, "dec_keys"));
        self.request(Method::GET, url, None, true).await
    }

    fn encode<T: serde::Serialize>(&self, url: &str, body: &T) -> Result<Bytes, Etsi014Error> {
        serde_json::to_vec(body).map(Bytes::from).map_err(|e| Etsi014Error::InvalidResponse {
            url: url.to_owned(),
            reason: format!("cannot encode request: {e}"),
        })
    }

    /// Sends one request and reads the whole answer within the timeout. `secret` marks answers
    /// that carry key material: their parse errors give a position only.
    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        url: String,
        body: Option<Bytes>,
        secret: bool,
    ) -> Result<T, Etsi014Error> {
        tracing::debug!(%method, %url, "ETSI 014 request");
        let mut builder =
            Request::builder().method(method).uri(url.as_str()).header(ACCEPT, "application/json");
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Etsi014Error::InvalidUrl { url: url.clone(), reason: e.to_string() })?;
        let timeout = self.options.timeout;
        let started = Instant::now();
        let exchange = async {
            let response = self.http.client.request(request).await.map_err(|e| {
                let mut error = transport(&url, e);
                self.add_connection_cause(&mut error, started);
                error
            })?;
            let status = response.status();
            let version = response.version();
            let body = Limited::new(response.into_body(), self.options.max_response_bytes)
                .collect()
                .await
                .map_err(|e| transport(&url, e))?
                .to_bytes();
            Ok::<_, Etsi014Error>((status, version, body))
        };
        let (status, version, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Etsi014Error::Timeout { url: url.clone(), timeout })??;
        tracing::debug!(%url, status = status.as_u16(), ?version, "ETSI 014 answer");
        if status == StatusCode::OK {
            return serde_json::from_slice(&body).map_err(|e| Etsi014Error::InvalidResponse {
                reason: if secret {
                    format!(
                        "malformed key container ({:?} error at line {} column {})",
                        e.classify(),
                        e.line(),
                        e.column()
                    )
                } else {
                    e.to_string()
                },
                url,
            });
        }
        let error = serde_json::from_slice::<ErrorBody>(&body).ok();
        Err(match status {
            StatusCode::BAD_REQUEST => Etsi014Error::BadRequest {
                error: error.unwrap_or_else(|| {
                    ErrorBody::new(snippet(&body).unwrap_or_else(|| "Bad Request".into()))
                }),
                url,
            },
            StatusCode::UNAUTHORIZED => Etsi014Error::Unauthorized { url, error },
            StatusCode::SERVICE_UNAVAILABLE => Etsi014Error::ServiceUnavailable { url, error },
            other => Etsi014Error::UnexpectedStatus { url, status: other.as_u16(), error },
        })
    }
}

impl Etsi014Client {
    /// Appends the I/O error a connection met since `started`, if hyper's error lacks it.
    fn add_connection_cause(&self, error: &mut Etsi014Error, started: Instant) {
        let Etsi014Error::Transport { reason, .. } = error else { return };
        let Ok(slot) = self.http.last_io_error.lock() else { return };
        if let Some((at, cause)) = slot.as_ref()
            && *at >= started
            && !reason.contains(cause.as_str())
        {
            reason.push_str(": connection failed: ");
            reason.push_str(cause);
        }
    }
}

/// The start of a non-JSON error body, as text.
fn snippet(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn transport(url: &str, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Etsi014Error {
    let source = error.into();
    let mut reason = source.to_string();
    let mut cause = source.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        cause = c.source();
    }
    Etsi014Error::Transport { url: url.to_owned(), reason, source }
}

/// The last I/O error a pooled connection met after its handshake, and when. hyper reports
/// such failures only as "connection closed"; this keeps the cause (for instance the KME's
/// TLS alert refusing our client certificate, which TLS 1.3 delivers after the handshake).
type LastIoError = Arc<Mutex<Option<(Instant, String)>>>;

/// A pooled HTTPS client that presents a client certificate (mutual TLS) and speaks HTTP/2 or
/// HTTP/1.1 as ALPN settles: what the ETSI 014 client and kmd's peer channel both send over.
#[derive(Clone)]
pub struct MtlsHttp {
    client: Client<TlsConnector, Full<Bytes>>,
    last_io_error: LastIoError,
}

impl MtlsHttp {
    /// Builds the client: trusts `tls.ca_pem`, presents `tls.cert_pem`/`tls.key_pem`, and takes
    /// timeouts and HTTP versions from `options`.
    pub fn new(tls: &ClientTlsConfig, options: &ClientOptions) -> Result<Self, TlsConfigError> {
        let roots = tls::root_store(&tls.ca_pem)?;
        let chain = tls::parse_certs(&tls.cert_pem, "client certificate")?;
        let key = tls::parse_key(&tls.key_pem)?;
        let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsConfigError::from)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(TlsConfigError::from)?;
        config.alpn_protocols = match options.http {
            HttpVersionPolicy::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            HttpVersionPolicy::Http1Only => vec![b"http/1.1".to_vec()],
            HttpVersionPolicy::Http2Only => vec![b"h2".to_vec()],
        };
        let last_io_error = LastIoError::default();
        let connector = TlsConnector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            connect_timeout: options.connect_timeout,
            last_error: last_io_error.clone(),
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(options.pool_idle_timeout);
        if options.http == HttpVersionPolicy::Http2Only {
            builder.http2_only(true);
        }
        Ok(Self { client: builder.build(connector), last_io_error })
    }

    /// Sends a request over a pooled connection (or a new one).
    pub fn request(&self, request: http::Request<Full<Bytes>>) -> hyper_util::client::legacy::ResponseFuture {
        self.client.request(request)
    }
}

/// Opens TCP + TLS connections for the pool, reporting the ALPN outcome to hyper.
#[derive(Clone)]
struct TlsConnector {
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
    last_error: LastIoError,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TlsConnection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsConnection>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let limit = self.connect_timeout;
        let last_error = self.last_error.clone();
        Box::pin(async move {
            let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
            if uri.scheme_str() != Some("https") {
                return Err(invalid("only https is supported"));
            }
            let host = uri.host().ok_or_else(|| invalid("no host in URL"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.to_owned()).map_err(|e| invalid(&e.to_string()))?;
            let connect = async {
                let tcp = TcpStream::connect((host, port)).await?;
                tcp.set_nodelay(true)?;
                tls.connect(name, tcp).await
            };
            let stream = tokio::time::timeout(limit, connect).await.map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "connect and TLS handshake timed out")
            })??;
            Ok(TlsConnection { io: TokioIo::new(stream), last_error })
        })
    }
}

/// A client TLS connection as hyper sees it.
struct TlsConnection {
    io: TokioIo<TlsStream<TcpStream>>,
    last_error: LastIoError,
}

impl TlsConnection {
    fn record<T>(&self, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &poll
            && let Ok(mut slot) = self.last_error.lock()
        {
            *slot = Some((Instant::now(), e.to_string()));
        }
        poll
    }
}

impl Connection for TlsConnection {
    fn connected(&self) -> Connected {
        let (tcp, session) = self.io.inner().get_ref();
        let connected = tcp.connected();
        if session.alpn_protocol() == Some(b"h2") { connected.negotiated_h2() } else { connected }
    }
}

impl hyper::rt::Read for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        self.record(poll)
    }
}

impl hyper::rt::Write for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.record(poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.record(poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_must_be_https() {
        let tls = TlsPem::new(Vec::new(), Vec::new(), Vec::new());
        let err = Etsi014Client::new("http://kme", tls.clone()).expect_err("http refused");
        assert!(matches!(err, Etsi014Error::InvalidUrl { .. }), "{err}");
        let err = Etsi014Client::new("https://kme?x=1", tls.clone()).expect_err("query refused");
        assert!(matches!(err, Etsi014Error::InvalidUrl { .. }), "{err}");
        // A well-formed URL gets as far as the (empty) CA.
        let err = Etsi014Client::new("https://kme:8443/", tls).expect_err("no CA");
        assert!(matches!(err, Etsi014Error::Tls(TlsConfigError::NoCertificate { .. })), "{err}");
    }

    #[test]
    fn sae_ids_are_percent_encoded_in_paths() {
        assert_eq!(utf8_percent_encode("A-mail_1.x~", SEGMENT).to_string(), "A-mail_1.x~");
        assert_eq!(utf8_percent_encode("a/b c?d", SEGMENT).to_string(), "a%2Fb%20c%3Fd");
    }

    /// Every request future can move between threads (kmd and the driver spawn them).
    #[allow(dead_code, clippy::let_underscore_future)]
    fn futures_are_send(client: &Etsi014Client, request: &KeyRequest, ids: &KeyIds) {
        fn send<T: Send>(_: T) {}
        send(client.status("x"));
        send(client.enc_keys("x", 1, None));
        send(client.enc_keys_with("x", request));
        send(client.dec_keys("x", &["a"]));
        send(client.dec_keys_with("x", ids));
        send(client.dec_key_get("x", "a"));
    }

    #[test]
    fn error_accessors() {
        let e = Etsi014Error::BadRequest { url: "u".into(), error: ErrorBody::new("m") };
        assert_eq!((e.status(), e.message(), e.is_transport()), (Some(400), Some("m"), false));
        assert_eq!(e.to_string(), "KME u: bad request (400): m");
        let e = Etsi014Error::Unauthorized { url: "u".into(), error: None };
        assert_eq!(e.to_string(), "KME u: unauthorized (401)");
        let e = Etsi014Error::Timeout { url: "u".into(), timeout: Duration::from_secs(1) };
        assert!(e.is_transport());
    }
}
