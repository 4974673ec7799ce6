//! Request extractors whose refusals use the API's error shape: JSON bodies, query strings,
//! the client's address, and the authenticated user.

use std::net::{IpAddr, SocketAddr};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::Shared;
use crate::error::ApiError;

/// A JSON body; malformed JSON is 400 `invalid_json`, a wrong shape 422 `validation_failed`.
pub(crate) struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Parsed as a JSON value first: every body of this API is an object, and serde would
        // otherwise also accept a struct written as an array.
        match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) if v.is_object() => serde_json::from_value(v)
                .map(ApiJson)
                .map_err(|e| ApiError::validation(format!("the request body is not valid: {e}"))),
            Ok(_) => Err(ApiError::validation("the request body must be a JSON object")),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::validation(e.body_text())),
            Err(JsonRejection::JsonSyntaxError(e)) => {
                Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.body_text()))
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            )),
            Err(JsonRejection::BytesRejection(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::for_status(StatusCode::PAYLOAD_TOO_LARGE))
            }
            Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.body_text())),
        }
    }
}

/// A query string; a wrong one is 422 `validation_failed`.
pub(crate) struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                Err(ApiError::validation(e.body_text()))
            }
            Err(e) => Err(ApiError::validation(e.body_text())),
        }
    }
}

/// The TCP peer of the connection (set by the server for each connection).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub SocketAddr);

/// The client's IP address.
pub(crate) struct ClientIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Ok(ClientIp(parts.extensions.get::<ClientAddr>().map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())))
    }
}

/// The account a valid, unrevoked access token names.
#[derive(Debug, Clone)]
pub(crate) struct AuthUser {
    pub(crate) account: qutemail_store::Account,
    pub(crate) session_id: String,
    pub(crate) is_admin: bool,
}

impl FromRequestParts<Shared> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("log in first: no access token was sent"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <token>`"))?
            .trim();
        let claims = state.deps.token_key.verify(token).map_err(|e| {
            tracing::debug!(reason = %e, "access token refused");
            ApiError::unauthorized(format!("access token refused: {e}"))
        })?;
        // Revocation: the session must still be live and belong to the token's subject.
        let live = state.deps.store.web_session_account(&claims.sid).await.map_err(ApiError::from)?;
        if live.as_deref() != Some(claims.sub.as_str()) {
            return Err(ApiError::unauthorized("access token refused: the session has ended"));
        }
        let account = state
            .deps
            .store
            .account(&claims.sub)
            .await
            .map_err(|_| ApiError::unauthorized("access token refused: the account no longer exists"))?;
        let is_admin = state.admins.iter().any(|a| a == &account.address);
        Ok(AuthUser { account, session_id: claims.sid, is_admin })
    }
}

/// An [`AuthUser`] with the admin role (403 otherwise).
pub(crate) struct AdminUser(pub AuthUser);

impl FromRequestParts<Shared> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        if !user.is_admin {
            return Err(ApiError::forbidden("this needs the admin role"));
        }
        Ok(AdminUser(user))
    }
}
