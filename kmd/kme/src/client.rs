//! The HTTPS client of the peer channel: mutual TLS, pooled keep-alive connections, HTTP/2 by
//! ALPN (HTTP/1.1 otherwise), JSON in and out, one time limit per request.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etsi014::ErrorBody;
use etsi014::client::{ClientOptions, MtlsHttp};
use etsi014::tls::{TlsConfigError, TlsPem};
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;
use serde::de::DeserializeOwned;

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
    http: MtlsHttp,
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
        let options = ClientOptions {
            timeout,
            connect_timeout: timeout,
            pool_idle_timeout: Duration::from_secs(30),
            ..ClientOptions::default()
        };
        let http = MtlsHttp::new(pem, &options).map_err(ClientBuildError::Tls)?;
        Ok(Self { base: base.into(), http, timeout })
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
