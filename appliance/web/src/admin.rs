//! `/api/admin/*` (admin role): users, the outbound queue, QKD links and SAEs.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use qutemail_store::NewAccount;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zeroize::Zeroizing;

use crate::Shared;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{AdminUser, ApiJson};
use crate::message::rfc3339;
use crate::metrics::{HistoryPoint, LinkView, SaePair, links_of, saes_of};

/// A user as operators see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    /// Address.
    pub address: String,
    /// Display name.
    pub display_name: String,
    /// Disabled accounts cannot log in.
    pub disabled: bool,
    /// Admin role.
    pub is_admin: bool,
    /// Bytes used.
    pub quota_used: u64,
}

/// `{"users":[...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Users {
    /// Every account.
    pub users: Vec<UserView>,
}

/// `{"address","password","display_name"?}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewUser {
    /// Address at this site.
    pub address: String,
    /// Initial password (at least 10 characters).
    pub password: String,
    /// Display name.
    #[serde(default)]
    pub display_name: Option<String>,
}

/// `{"disabled"?}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UserPatch {
    /// Disable or enable.
    pub disabled: Option<bool>,
}

fn user_view(state: &Shared, a: qutemail_store::Account) -> UserView {
    UserView {
        is_admin: state.admins.iter().any(|x| x == &a.address),
        address: a.address,
        display_name: a.display_name,
        disabled: a.disabled,
        quota_used: a.used_bytes,
    }
}

/// Every account.
#[utoipa::path(get, path = "/api/admin/users/", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = Users), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn users(State(state): State<Shared>, _admin: AdminUser) -> ApiResult<Json<Users>> {
    let users = state.deps.store.list_accounts().await?.into_iter().map(|a| user_view(&state, a)).collect();
    Ok(Json(Users { users }))
}

/// Creates an account at this site.
#[utoipa::path(post, path = "/api/admin/users/", tag = "admin", security(("bearer" = [])), request_body = NewUser,
    responses((status = 201, body = UserView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody), (status = 400, body = ErrorBody)))]
pub(crate) async fn create_user(
    State(state): State<Shared>,
    AdminUser(admin): AdminUser,
    ApiJson(req): ApiJson<NewUser>,
) -> ApiResult<impl IntoResponse> {
    let address = req.address.trim().to_ascii_lowercase();
    let in_site = address.rsplit_once('@').is_some_and(|(l, d)| !l.is_empty() && d == state.deps.domain);
    if !in_site {
        return Err(ApiError::validation(format!(
            "the address must be at this site (@{})",
            state.deps.domain
        )));
    }
    let password = Zeroizing::new(req.password);
    if password.chars().count() < 10 {
        return Err(ApiError::validation("the password needs at least 10 characters"));
    }
    let local = address.split('@').next().unwrap_or_default().to_owned();
    let display_name = req.display_name.as_deref().map(str::trim).filter(|d| !d.is_empty()).unwrap_or(&local);
    let account = state
        .deps
        .store
        .create_account(NewAccount {
            address: &address,
            display_name,
            password: &password,
            quota_bytes: None,
        })
        .await?;
    tracing::info!(admin = %admin.account.address, account = %account.address, "account created by an admin");
    Ok((StatusCode::CREATED, Json(user_view(&state, account))))
}

/// Disables or enables an account.
#[utoipa::path(patch, path = "/api/admin/users/{address}", tag = "admin", security(("bearer" = [])),
    params(("address" = String, Path, description = "the account's address")), request_body = UserPatch,
    responses((status = 200, body = UserView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody), (status = 400, body = ErrorBody)))]
pub(crate) async fn patch_user(
    State(state): State<Shared>,
    AdminUser(admin): AdminUser,
    Path(address): Path<String>,
    ApiJson(req): ApiJson<UserPatch>,
) -> ApiResult<Json<UserView>> {
    let not_found = |e: qutemail_store::StoreError| match e {
        qutemail_store::StoreError::Invalid { .. } | qutemail_store::StoreError::NoSuchAccount(_) => {
            ApiError::not_found("no such account")
        }
        e => e.into(),
    };
    let account = state.deps.store.account(&address).await.map_err(not_found)?;
    if let Some(disabled) = req.disabled {
        if disabled && account.address == admin.account.address {
            return Err(ApiError::validation("you cannot disable your own account"));
        }
        state.deps.store.set_disabled(&account.address, disabled).await.map_err(not_found)?;
        if disabled {
            state.deps.store.web_revoke_account_sessions(account.id, None).await?;
        }
        tracing::info!(admin = %admin.account.address, account = %account.address, disabled, "account changed by an admin");
    }
    let account = state.deps.store.account(&account.address).await?;
    Ok(Json(user_view(&state, account)))
}

/// QKD links now and over the last hour.
#[derive(Debug, Serialize, ToSchema)]
pub struct Links {
    /// The links.
    pub links: Vec<LinkView>,
    /// Samples every 5 s, oldest first.
    pub history: Vec<HistoryPoint>,
    /// Why kmd's metrics are unavailable, if they are.
    pub error: Option<String>,
}

/// QKD links, key pools, QBER and key rate (from kmd's metrics).
#[utoipa::path(get, path = "/api/admin/links/", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = Links), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn links(State(state): State<Shared>, _admin: AdminUser) -> ApiResult<Json<Links>> {
    let view = state.monitor.view();
    let error = if state.config.kmd_metrics_url.is_none() {
        Some("no kmd_metrics_url is configured in [web]".to_owned())
    } else {
        view.last_error
    };
    Ok(Json(Links { links: links_of(&view.latest), history: view.history, error }))
}

/// `{"saes":[...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Saes {
    /// SAE pairs kmd serves, with key counts.
    pub saes: Vec<SaePair>,
}

/// SAEs enrolled at kmd (from its metrics).
#[utoipa::path(get, path = "/api/admin/saes/", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = Saes), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn saes(State(state): State<Shared>, _admin: AdminUser) -> ApiResult<Json<Saes>> {
    Ok(Json(Saes { saes: saes_of(&state.monitor.view().latest) }))
}

/// A queue entry (one recipient).
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueEntry {
    /// Queue ID.
    pub queue_id: String,
    /// Recipient.
    pub recipient: String,
    /// `queued|delivered|failed`.
    pub state: String,
    /// Attempts so far.
    pub attempts: u32,
    /// RFC 3339.
    pub next_attempt: String,
    /// The last reply or diagnosis.
    pub last_error: Option<String>,
}

/// `{"entries":[...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Queue {
    /// Entries, oldest first.
    pub entries: Vec<QueueEntry>,
}

/// The outbound queue.
#[utoipa::path(get, path = "/api/admin/queue/", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = Queue), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn queue(State(state): State<Shared>, _admin: AdminUser) -> ApiResult<Json<Queue>> {
    let mut entries = Vec::new();
    for m in state.deps.store.queue_listing().await? {
        for (recipient, s, attempts, next, last) in m.recipients {
            entries.push(QueueEntry {
                queue_id: m.queue_id.clone(),
                recipient,
                state: s,
                attempts,
                next_attempt: rfc3339(next),
                last_error: last,
            });
        }
    }
    Ok(Json(Queue { entries }))
}
