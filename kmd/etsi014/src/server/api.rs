//! Answers and extractors in the specification's formats.

use std::io;

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::request::Parts;
use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::types::{ErrorBody, messages};

/// An error answer: an HTTP status and the specification's error body (clause 6.5).
///
/// Use it as a handler's error type; it renders as `application/json` with
/// `Cache-Control: no-store`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {}", body.message)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    /// Any status with any body.
    pub fn new(status: StatusCode, body: ErrorBody) -> Self {
        Self { status, body }
    }

    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorBody::new(message))
    }

    /// 401 (the caller's certificate does not entitle it to this request).
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorBody::new(messages::UNAUTHORIZED))
    }

    /// 503 with a message (for instance: not enough key material).
    pub fn service_unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, ErrorBody::new(message))
    }

    /// 400 "one or more keys specified are not found on KME".
    pub fn keys_not_found() -> Self {
        Self::bad_request(messages::KEYS_NOT_FOUND)
    }

    /// 400 "size shall be a multiple of 8".
    pub fn size_not_multiple_of_8() -> Self {
        Self::bad_request(messages::SIZE_NOT_MULTIPLE_OF_8)
    }

    /// 400 "requested parameters do not adhere to KME rules".
    pub fn parameters_not_adhering() -> Self {
        Self::bad_request(messages::PARAMETERS_NOT_ADHERING)
    }

    /// 404, for paths outside the API (use as the router's fallback).
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorBody::new("not found"))
    }

    /// 405, for a method the path does not take (use as the router's method fallback).
    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, ErrorBody::new("method not allowed"))
    }

    /// Adds a detail object `{name: value}`.
    pub fn with_detail(mut self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.body = self.body.with_detail(name, value);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The error body.
    pub fn body(&self) -> &ErrorBody {
        &self.body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = JsonResponse(&self.body).into_response();
        *response.status_mut() = self.status;
        response
    }
}

/// A 200 answer with a JSON body. The body is serialized into one exactly-sized buffer that is
/// zeroized when the HTTP layer lets go of it, so key containers leave no stray copy of their
/// base64 text in freed memory (the TLS layer's own buffers aside).
#[derive(Debug)]
pub struct JsonResponse<T>(pub T);

struct Counter(usize);

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<T: Serialize> IntoResponse for JsonResponse<T> {
    fn into_response(self) -> Response {
        let mut counter = Counter(0);
        let encoded = serde_json::to_writer(&mut counter, &self.0).and_then(|()| {
            let mut buf = Zeroizing::new(Vec::with_capacity(counter.0));
            serde_json::to_writer(&mut *buf, &self.0).map(|()| buf)
        });
        match encoded {
            Ok(buf) => {
                let mut response = Response::new(axum::body::Body::from(Bytes::from_owner(buf)));
                let headers = response.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                response
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize a response");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

/// Extractor: a JSON request body, whatever its `Content-Type` says (`curl -d` sends
/// `application/x-www-form-urlencoded`); malformed bodies are answered 400 in the spec's
/// error format. The router's body limit applies (axum's default: 2 MiB).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                e.status()
            } else {
                StatusCode::BAD_REQUEST
            };
            ApiError::new(status, ErrorBody::new(format!("cannot read the request body: {}", e.body_text())))
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::parameters_not_adhering().with_detail("invalid_body", e.to_string()))
    }
}

/// Extractor: the SAE ID in the path (`/api/v1/keys/{SAE_ID}/…`), percent-decoded; a path
/// that is not UTF-8 is answered 400 in the spec's error format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaeIdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for SaeIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(sae)| Self(sae))
            .map_err(|e| ApiError::bad_request(format!("invalid SAE ID in path: {}", e.body_text())))
    }
}

/// The `name=value` pairs of a query string, percent-decoded, in order (repeated names kept:
/// `?key_ID=a&key_ID=b`).
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .map(|q| {
            form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(response: Response) -> (StatusCode, Option<String>, Bytes) {
        let status = response.status();
        let ct = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        (status, ct, bytes)
    }

    #[tokio::test]
    async fn errors_render_in_spec_format() {
        let (status, ct, body) = body_of(ApiError::keys_not_found().into_response()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(ct.as_deref(), Some("application/json"));
        assert_eq!(&body[..], br#"{"message":"one or more keys specified are not found on KME"}"#);
        let (status, _, body) = body_of(ApiError::unauthorized().into_response()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(&body[..], br#"{"message":"unauthorized"}"#);
        let (status, _, body) = body_of(
            ApiError::service_unavailable("no key").with_detail("stored_key_count", 0).into_response(),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(&body[..], br#"{"message":"no key","details":[{"stored_key_count":0}]}"#);
    }

    #[test]
    fn query_pairs_decode_and_keep_repeats() {
        assert_eq!(
            query_pairs(Some("key_ID=a%2Db&key_ID=c&number=2")),
            [("key_ID".into(), "a-b".into()), ("key_ID".into(), "c".into()), ("number".into(), "2".into())]
        );
        assert!(query_pairs(None).is_empty());
    }
}
