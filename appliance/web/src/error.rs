//! The API's one error shape, `{"error":{"code","message","details"}}`, for every 4xx/5xx.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code (see docs/rest-api.md).
    pub code: String,
    /// What went wrong, in the user's terms.
    pub message: String,
    /// Machine-readable details, when there are any.
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

/// An API error: status, code, message, details; and for 429 the seconds to wait.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// Message for the user.
    pub message: String,
    /// Details.
    pub details: Option<serde_json::Value>,
    /// Retry-After seconds (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error without details.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), details: None, retry_after: None }
    }

    /// Adds details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// 400 `validation_failed`-style input errors are 422 here (the JSON parsed but a value is
    /// unusable).
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", message)
    }

    /// 401: no, bad, expired or revoked token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 500: the cause is logged, the client learns nothing internal.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "web API request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the server could not complete the request")
    }

    /// 429 with Retry-After.
    pub fn rate_limited(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many failed attempts; try again in {retry_after} s"),
        )
        .with_details(serde_json::json!({ "retry_after_seconds": retry_after }));
        e.retry_after = Some(retry_after);
        e
    }

    /// The standard error for a bare status (unknown route, wrong method ...).
    pub fn for_status(status: StatusCode) -> Self {
        let (code, message) = match status {
            StatusCode::NOT_FOUND => ("not_found", "no such resource"),
            StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this method is not allowed here"),
            StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                ("unsupported_media_type", "the request body has an unsupported content type")
            }
            StatusCode::UNAUTHORIZED => ("unauthorized", "authentication required"),
            StatusCode::FORBIDDEN => ("forbidden", "not allowed"),
            StatusCode::UNPROCESSABLE_ENTITY => ("validation_failed", "the request is not valid"),
            s if s.is_client_error() => ("bad_request", "the request is not valid"),
            _ => ("internal", "the server could not complete the request"),
        };
        Self::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail { code: self.code.to_owned(), message: self.message, details: self.details },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<qutemail_store::StoreError> for ApiError {
    fn from(e: qutemail_store::StoreError) -> Self {
        match e {
            qutemail_store::StoreError::Invalid { what, reason } => {
                ApiError::validation(format!("invalid {what}: {reason}"))
            }
            qutemail_store::StoreError::NoSuchMailbox(name) => {
                ApiError::not_found(format!("there is no folder {name:?}"))
            }
            qutemail_store::StoreError::NoSuchAccount(_) => ApiError::not_found("no such account"),
            qutemail_store::StoreError::AccountExists(a) => {
                ApiError::conflict(format!("an account for {a} already exists"))
            }
            qutemail_store::StoreError::QuotaExceeded { used, quota, requested } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "quota_exceeded", "the mailbox is full")
                    .with_details(serde_json::json!({"used": used, "quota": quota, "requested": requested}))
            }
            e => ApiError::internal(e),
        }
    }
}

impl From<qutemail_vault::VaultError> for ApiError {
    fn from(e: qutemail_vault::VaultError) -> Self {
        ApiError::internal(e)
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
