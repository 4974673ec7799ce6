//! The HTTPS client of the peer channel: mutual TLS, pooled keep-alive connections, HTTP/2 by
//! ALPN (HTTP/1.1 otherwise), JSON in and out, one time limit per request.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use etsi014::ErrorBody;
use etsi014::tls::{self, TlsConfigError, TlsPem};
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// A failed call to the peer kmd.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// No connection, or it broke.
    #[error("peer kmd {url}: {reason}")]
    Transport {
        /// The URL.
        url: String,
        /// What happened.
        reason: String,
    },
    /// No complete answer within the request timeout.
    #[error("peer kmd {url}: no answer within {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// The peer answered with an error status.
    #[error("peer kmd {url}: HTTP {status}{}", .body.as_ref().map(|b| format!(": {}", b.message)).unwrap_or_default())]
    Status {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Its error body, if it sent one.
        body: Option<ErrorBody>,
    },
    /// The answer was not the expected JSON.
    #[error("peer kmd {url}: malformed answer: {reason}")]
    InvalidResponse {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

pub(crate) enum ClientBuildError {
    Tls(TlsConfigError),
    Url(String),
}

#[derive(Clone)]
pub(crate) struct PeerClient {
    base: Arc<str>,
    http: Client<Connector, Full<Bytes>>,
    timeout: Duration,
}

impl PeerClient {
    pub(crate) fn new(base_url: &str, pem: &TlsPem, timeout: Duration) -> Result<Self, ClientBuildError> {
        let base = base_url.trim_end_matches('/');
        let uri: Uri =
            base.parse().map_err(|e: http::uri::InvalidUri| ClientBuildError::Url(e.to_string()))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
            return Err(ClientBuildError::Url(format!("{base_url:?} is not https://host[:port]")));
        }
        let roots = tls::root_store(&pem.ca_pem).map_err(ClientBuildError::Tls)?;
        let chain =
            tls::parse_certs(&pem.cert_pem, "peer-channel certificate").map_err(ClientBuildError::Tls)?;
        let key = tls::parse_key(&pem.key_pem).map_err(ClientBuildError::Tls)?;
        let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientBuildError::Tls(e.into()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| ClientBuildError::Tls(e.into()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let connector =
            Connector { tls: tokio_rustls::TlsConnector::from(Arc::new(config)), connect_timeout: timeout };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30));
        Ok(Self { base: base.into(), http: builder.build(connector), timeout })
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, PeerError> {
        self.request(Method::GET, path, None).await
    }

    pub(crate) async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, PeerError> {
        let url = format!("{}{path}", self.base);
        let bytes = serde_json::to_vec(body)
            .map_err(|e| PeerError::InvalidResponse { url, reason: format!("cannot encode request: {e}") })?;
        self.request(Method::POST, path, Some(Bytes::from(bytes))).await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<T, PeerError> {
        let url = format!("{}{path}", self.base);
        let mut builder =
            Request::builder().method(method).uri(url.as_str()).header(ACCEPT, "application/json");
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| PeerError::Transport { url: url.clone(), reason: e.to_string() })?;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| transport(&url, &e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| PeerError::Transport { url: url.clone(), reason: e.to_string() })?
                .to_bytes();
            Ok::<_, PeerError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| PeerError::Timeout { url: url.clone(), timeout: self.timeout })??;
        if status == StatusCode::OK {
            return serde_json::from_slice(&body)
                .map_err(|e| PeerError::InvalidResponse { url, reason: e.to_string() });
        }
        Err(PeerError::Status { url, status: status.as_u16(), body: serde_json::from_slice(&body).ok() })
    }
}

fn transport(url: &str, error: &(dyn std::error::Error + 'static)) -> PeerError {
    let mut reason = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        cause = c.source();
    }
    PeerError::Transport { url: url.to_owned(), reason }
}

#[derive(Clone)]
struct Connector {
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TlsConnection;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsConnection>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let limit = self.connect_timeout;
        Box::pin(async move {
            let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
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
            Ok(TlsConnection { io: TokioIo::new(stream) })
        })
    }
}

struct TlsConnection {
    io: TokioIo<TlsStream<TcpStream>>,
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
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsConnection {
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
