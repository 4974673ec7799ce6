//! `/api/auth/*`, `/api/account/*` and the admin's reset token: sign-up, login, refresh,
//! logout, password change and reset, settings.

use std::time::{Duration, Instant, SystemTime};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use qutemail_store::{AuthError, LoginGate, NewAccount, RefreshOutcome, StoreError, WebSettingsUpdate};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use zeroize::Zeroizing;

use crate::Shared;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{AdminUser, ApiJson, AuthUser, ClientIp};
use crate::token::{ACCESS_TOKEN_SECONDS, random_token, token_hash};

/// How long a refresh token lives (each refresh issues a new one).
const REFRESH_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a reset token lives.
const RESET_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// Shortest password accepted.
const MIN_PASSWORD: usize = 10;
/// Longest password accepted (argon2 input stays cheap to read).
const MAX_PASSWORD: usize = 1024;

/// `{"username","password","display_name","recovery_address"?}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SignupRequest {
    /// Local part of the new address (`carol` becomes `carol@<site domain>`).
    pub username: String,
    /// At least 10 characters.
    pub password: String,
    /// Display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Where password reset tokens are mailed.
    #[serde(default)]
    pub recovery_address: Option<String>,
}

/// `{"address","password"}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    /// Address, or a bare user name of this site.
    pub address: String,
    /// Password.
    pub password: String,
}

/// `{"refresh_token"}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshRequest {
    /// The refresh token from the last [`Tokens`].
    pub refresh_token: String,
}

/// `{"current_password","new_password"}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PasswordChange {
    /// The password now.
    pub current_password: String,
    /// The new one (at least 10 characters).
    pub new_password: String,
}

/// `{"address"}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ResetRequest {
    /// The account's address.
    pub address: String,
}

/// `{"token","new_password"}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ResetConfirm {
    /// The reset token from the mail (or from an admin).
    pub token: String,
    /// The new password (at least 10 characters).
    pub new_password: String,
}

fn double_option<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `{"display_name"?,"default_mode"?,"recovery_address"?}`; `null` clears a field.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SettingsRequest {
    /// New display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// `hybrid|qaes|otp|normal`, or null for the site policy.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub default_mode: Option<Option<String>>,
    /// Recovery address, or null to remove it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub recovery_address: Option<Option<String>>,
}

/// An account as the client sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountView {
    /// Address.
    pub address: String,
    /// Display name.
    pub display_name: String,
    /// Whether the account has the admin role.
    pub is_admin: bool,
    /// Default protection mode (null: the site policy).
    pub default_mode: Option<String>,
    /// Recovery address.
    pub recovery_address: Option<String>,
}

/// Tokens after sign-up, login or refresh.
#[derive(Debug, Serialize, ToSchema)]
pub struct Tokens {
    /// Access token (JWT, EdDSA), for `Authorization: Bearer`.
    pub access_token: String,
    /// Refresh token (single use).
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Access token lifetime, seconds.
    pub expires_in: u64,
    /// The account.
    pub account: AccountView,
}

/// `{"token","expires_at"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResetToken {
    /// The reset token.
    pub token: String,
    /// RFC 3339.
    pub expires_at: String,
}

pub(crate) async fn account_view(
    state: &Shared,
    account: &qutemail_store::Account,
) -> ApiResult<AccountView> {
    let settings = state.deps.store.web_settings(account.id).await?;
    Ok(AccountView {
        address: account.address.clone(),
        display_name: account.display_name.clone(),
        is_admin: state.admins.iter().any(|a| a == &account.address),
        default_mode: settings.default_mode,
        recovery_address: settings.recovery_address,
    })
}

fn check_new_password(p: &str) -> ApiResult<()> {
    let n = p.chars().count();
    if n < MIN_PASSWORD {
        return Err(ApiError::validation(format!("the password needs at least {MIN_PASSWORD} characters")));
    }
    if n > MAX_PASSWORD {
        return Err(ApiError::validation(format!("the password may have at most {MAX_PASSWORD} characters")));
    }
    Ok(())
}

fn check_username(u: &str) -> ApiResult<String> {
    let u = u.trim().to_ascii_lowercase();
    let ok = !u.is_empty()
        && u.len() <= 64
        && u.starts_with(|c: char| c.is_ascii_alphanumeric())
        && u.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !u.ends_with('.')
        && !u.contains("..");
    if !ok {
        return Err(ApiError::validation(
            "the user name must be 1 to 64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit",
        ));
    }
    Ok(u)
}

pub(crate) fn check_mode(mode: &str) -> ApiResult<qutemail_vault::Protection> {
    use qutemail_vault::Protection as P;
    match mode {
        "hybrid" => Ok(P::Hybrid),
        "qaes" => Ok(P::Qaes),
        "otp" => Ok(P::Otp),
        "pqc" => Ok(P::Pqc),
        "normal" => Ok(P::Normal),
        other => Err(ApiError::validation(format!(
            "unknown protection mode {other:?}: use hybrid, qaes, otp or normal"
        ))),
    }
}

/// Address for a login name: a bare user name belongs to this site.
fn full_address(state: &Shared, name: &str) -> String {
    let name = name.trim();
    if name.contains('@') {
        name.to_ascii_lowercase()
    } else {
        format!("{}@{}", name.to_ascii_lowercase(), state.deps.domain)
    }
}

async fn start_session(state: &Shared, account: &qutemail_store::Account) -> ApiResult<Tokens> {
    let refresh = random_token().map_err(ApiError::internal)?;
    let sid = state
        .deps
        .store
        .web_create_session(account.id, &token_hash(&refresh), SystemTime::now() + REFRESH_LIFETIME)
        .await?;
    tracing::info!(account = %account.address, "web session started");
    Ok(Tokens {
        access_token: state.deps.token_key.issue(&account.address, &sid),
        refresh_token: refresh.to_string(),
        token_type: "Bearer",
        expires_in: ACCESS_TOKEN_SECONDS,
        account: account_view(state, account).await?,
    })
}

/// Creates an account (when the site allows sign-up) and logs it in.
#[utoipa::path(post, path = "/api/auth/signup/", tag = "auth", request_body = SignupRequest,
    responses((status = 201, body = Tokens), (status = 403, body = ErrorBody, description = "sign-up is off"),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody), (status = 400, body = ErrorBody)))]
pub(crate) async fn signup(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<SignupRequest>,
) -> ApiResult<impl IntoResponse> {
    if !state.config.signup {
        return Err(ApiError::forbidden("sign-up is not open on this site; ask an administrator"));
    }
    let username = check_username(&req.username)?;
    check_new_password(&req.password)?;
    let address = format!("{username}@{}", state.deps.domain);
    let display_name =
        req.display_name.as_deref().map(str::trim).filter(|d| !d.is_empty()).unwrap_or(&username);
    let recovery = match req.recovery_address.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
        Some(r) => Some(
            qutemail_store::normalize_address(r)
                .map_err(|_| ApiError::validation("the recovery address is not a valid mail address"))?,
        ),
        None => None,
    };
    let password = Zeroizing::new(req.password);
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
    if recovery.is_some() {
        let update = WebSettingsUpdate { recovery_address: Some(recovery), ..Default::default() };
        state.deps.store.web_update_settings(account.id, &update).await?;
    }
    Ok((StatusCode::CREATED, Json(start_session(&state, &account).await?)))
}

/// Logs in with address (or user name) and password.
#[utoipa::path(post, path = "/api/auth/login/", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = Tokens), (status = 401, body = ErrorBody, description = "invalid_credentials"),
        (status = 429, body = ErrorBody, description = "rate_limited, with Retry-After"),
        (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn login(
    State(state): State<Shared>,
    ClientIp(ip): ClientIp,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<Json<Tokens>> {
    let address = full_address(&state, &req.address);
    let password = Zeroizing::new(req.password);
    let throttle = &state.deps.login_throttle;
    match throttle.gate(&address, ip, Instant::now()) {
        LoginGate::AddressRefused { retry_after } => {
            tracing::warn!(client = %ip, "login refused: too many failed logins from this address");
            return Err(ApiError::rate_limited(retry_after.as_secs().max(1)));
        }
        // Slows guessing as IMAP and POP3 do; the account's owner is never locked out.
        LoginGate::Proceed { delay } => tokio::time::sleep(delay).await,
    }
    match state.deps.store.authenticate(&address, &password).await {
        Ok(account) => {
            throttle.succeeded(&address, ip);
            Ok(Json(start_session(&state, &account).await?))
        }
        Err(AuthError::Rejected) => {
            throttle.failed(&address, ip, Instant::now());
            tracing::info!(client = %ip, "login failed");
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", "wrong address or password"))
        }
        Err(AuthError::Store(e)) => Err(e.into()),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Swaps a refresh token for new tokens; a spent one presented again ends the session.
#[utoipa::path(post, path = "/api/auth/refresh/", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = Tokens), (status = 401, body = ErrorBody), (status = 400, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub(crate) async fn refresh(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> ApiResult<Json<Tokens>> {
    let old = Zeroizing::new(req.refresh_token);
    let new = random_token().map_err(ApiError::internal)?;
    let outcome = state
        .deps
        .store
        .web_rotate_refresh(&token_hash(&old), &token_hash(&new), SystemTime::now() + REFRESH_LIFETIME)
        .await?;
    match outcome {
        RefreshOutcome::Rotated { session_id, address } => {
            let account = state.deps.store.account(&address).await?;
            Ok(Json(Tokens {
                access_token: state.deps.token_key.issue(&account.address, &session_id),
                refresh_token: new.to_string(),
                token_type: "Bearer",
                expires_in: ACCESS_TOKEN_SECONDS,
                account: account_view(&state, &account).await?,
            }))
        }
        RefreshOutcome::Reused { .. } => Err(ApiError::unauthorized(
            "this refresh token was already used; the session has been ended for safety: log in again",
        )),
        _ => Err(ApiError::unauthorized("the refresh token is not valid: log in again")),
    }
}

/// Ends the session: its access and refresh tokens stop working.
#[utoipa::path(post, path = "/api/auth/logout/", tag = "auth", security(("bearer" = [])),
    responses((status = 204, description = "logged out"), (status = 401, body = ErrorBody)))]
pub(crate) async fn logout(State(state): State<Shared>, user: AuthUser) -> ApiResult<StatusCode> {
    state.deps.store.web_revoke_session(&user.session_id).await?;
    tracing::info!(account = %user.account.address, "web session ended");
    Ok(StatusCode::NO_CONTENT)
}

/// Changes the password; the account's other sessions end.
#[utoipa::path(post, path = "/api/auth/password/", tag = "auth", security(("bearer" = [])),
    request_body = PasswordChange,
    responses((status = 204, description = "changed"), (status = 401, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 400, body = ErrorBody)))]
pub(crate) async fn change_password(
    State(state): State<Shared>,
    user: AuthUser,
    ApiJson(req): ApiJson<PasswordChange>,
) -> ApiResult<StatusCode> {
    let current = Zeroizing::new(req.current_password);
    let new = Zeroizing::new(req.new_password);
    check_new_password(&new)?;
    match state.deps.store.authenticate(&user.account.address, &current).await {
        Ok(_) => {}
        Err(AuthError::Rejected) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "the current password is wrong",
            ));
        }
        Err(e) => return Err(ApiError::internal(e)),
    }
    state.deps.store.set_password(&user.account.address, &new).await?;
    state.deps.store.web_revoke_account_sessions(user.account.id, Some(&user.session_id)).await?;
    tracing::info!(account = %user.account.address, "password changed; other sessions ended");
    Ok(StatusCode::NO_CONTENT)
}

/// Mails a reset token to the account's recovery address. Always 202, whether or not the
/// account exists (no account enumeration); the work happens after the answer.
#[utoipa::path(post, path = "/api/auth/reset/request/", tag = "auth", request_body = ResetRequest,
    responses((status = 202, description = "accepted (always)"), (status = 400, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub(crate) async fn reset_request(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<ResetRequest>,
) -> ApiResult<StatusCode> {
    let address = full_address(&state, &req.address);
    tokio::spawn(async move {
        if let Err(e) = send_reset_mail(&state, &address).await {
            tracing::error!(error = %e.message, "password reset mail not sent");
        }
    });
    Ok(StatusCode::ACCEPTED)
}

async fn new_reset_token(
    state: &Shared,
    account: &qutemail_store::Account,
) -> ApiResult<(Zeroizing<String>, SystemTime)> {
    let token = random_token().map_err(ApiError::internal)?;
    let expires = SystemTime::now() + RESET_LIFETIME;
    state.deps.store.web_create_reset_token(account.id, &token_hash(&token), expires).await?;
    Ok((token, expires))
}

async fn send_reset_mail(state: &Shared, address: &str) -> ApiResult<()> {
    let account = match state.deps.store.account(address).await {
        Ok(a) if !a.disabled => a,
        _ => return Ok(()),
    };
    let Some(recovery) = state.deps.store.web_settings(account.id).await?.recovery_address else {
        tracing::info!(account = %account.address, "password reset asked, but the account has no recovery address");
        return Ok(());
    };
    let (token, _) = new_reset_token(state, &account).await?;
    let body = Zeroizing::new(format!(
        "Someone asked to reset the password of {addr}.\r\n\r\nReset token: {token}\r\n\r\n\
         Open the webmail, choose \"Forgot password\", and enter this token with a new password.\r\n\
         The token works once and expires in 30 minutes. If you did not ask for this, ignore this\r\n\
         message: the password stays as it is.\r\n",
        addr = account.address,
        token = token.as_str()
    ));
    let from = format!("postmaster@{}", state.deps.domain);
    let message = mail_builder::MessageBuilder::new()
        .from(("QuteMail", from.as_str()))
        .to(recovery.as_str())
        .subject(format!("Password reset for {}", account.address))
        .message_id(format!("{}@{}", uuid::Uuid::new_v4(), state.deps.domain))
        .text_body(body.as_str())
        .write_to_vec()
        .map_err(ApiError::internal)?;
    let rcpt = qutemail_smtp::Address::parse(&recovery, true)
        .map_err(|e| ApiError::internal(format!("recovery address {recovery:?}: {e}")))?;
    let recipients =
        [qutemail_smtp::Recipient { address: rcpt, params: qutemail_smtp::RcptParams::default() }];
    // The null reverse path: a reset mail that cannot be delivered bounces to nobody.
    let submission = qutemail_queue::Submission {
        from: &qutemail_smtp::ReversePath::Null,
        params: &qutemail_smtp::MailParams::default(),
        recipients: &recipients,
        sent_by: None,
        requested: None,
        message: Zeroizing::new(message),
    };
    let done = qutemail_queue::submit(
        &state.deps.store,
        &state.deps.vault,
        &state.deps.queue,
        &state.deps.domain,
        submission,
    )
    .await
    .map_err(ApiError::internal)?;
    if !done.delivered_locally.is_empty()
        && let Some(wake) = &state.deps.on_delivery
    {
        wake();
    }
    tracing::info!(account = %account.address, "password reset token mailed to the recovery address");
    Ok(())
}

/// Sets a new password with a reset token (single use); the account's sessions end.
#[utoipa::path(post, path = "/api/auth/reset/confirm/", tag = "auth", request_body = ResetConfirm,
    responses((status = 204, description = "password set"), (status = 400, body = ErrorBody, description = "invalid_token"),
        (status = 422, body = ErrorBody)))]
pub(crate) async fn reset_confirm(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<ResetConfirm>,
) -> ApiResult<StatusCode> {
    let token = Zeroizing::new(req.token);
    let new = Zeroizing::new(req.new_password);
    check_new_password(&new)?;
    let Some(address) = state.deps.store.web_consume_reset_token(&token_hash(&token)).await? else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_token",
            "the reset token is unknown, already used or expired",
        ));
    };
    state.deps.store.set_password(&address, &new).await?;
    let account = state.deps.store.account(&address).await?;
    state.deps.store.web_revoke_account_sessions(account.id, None).await?;
    tracing::info!(account = %address, "password reset; all sessions ended");
    Ok(StatusCode::NO_CONTENT)
}

/// An admin issues a reset token for an account (to hand over out of band).
#[utoipa::path(post, path = "/api/admin/users/{address}/reset-token", tag = "admin", security(("bearer" = [])),
    params(("address" = String, Path, description = "the account's address")),
    responses((status = 201, body = ResetToken), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn admin_reset_token(
    State(state): State<Shared>,
    AdminUser(admin): AdminUser,
    Path(address): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let account = state.deps.store.account(&address).await.map_err(|e| match e {
        StoreError::Invalid { .. } | StoreError::NoSuchAccount(_) => ApiError::not_found("no such account"),
        e => e.into(),
    })?;
    let (token, expires) = new_reset_token(&state, &account).await?;
    tracing::info!(admin = %admin.account.address, account = %account.address, "reset token issued by an admin");
    Ok((
        StatusCode::CREATED,
        Json(ResetToken { token: token.to_string(), expires_at: crate::message::rfc3339(expires) }),
    ))
}

/// The logged-in account.
#[utoipa::path(get, path = "/api/account/", tag = "account", security(("bearer" = [])),
    responses((status = 200, body = AccountView), (status = 401, body = ErrorBody)))]
pub(crate) async fn account(State(state): State<Shared>, user: AuthUser) -> ApiResult<Json<AccountView>> {
    Ok(Json(account_view(&state, &user.account).await?))
}

/// Changes display name, default mode or recovery address.
#[utoipa::path(put, path = "/api/account/settings/", tag = "account", security(("bearer" = [])),
    request_body = SettingsRequest,
    responses((status = 200, body = AccountView), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 400, body = ErrorBody)))]
pub(crate) async fn update_settings(
    State(state): State<Shared>,
    user: AuthUser,
    ApiJson(req): ApiJson<SettingsRequest>,
) -> ApiResult<Json<AccountView>> {
    if let Some(Some(m)) = &req.default_mode {
        let mode = check_mode(m)?;
        if mode == qutemail_vault::Protection::Pqc {
            return Err(ApiError::validation(
                "pqc is a fallback, not a default: use hybrid, qaes, otp or normal",
            ));
        }
    }
    let display_name = req.display_name.map(|d| d.trim().to_owned());
    if display_name.as_deref() == Some("") {
        return Err(ApiError::validation("the display name cannot be empty"));
    }
    let update = WebSettingsUpdate {
        display_name,
        default_mode: req.default_mode,
        recovery_address: req
            .recovery_address
            .map(|r| r.map(|a| a.trim().to_owned()).filter(|a| !a.is_empty())),
    };
    state.deps.store.web_update_settings(user.account.id, &update).await?;
    let account = state.deps.store.account(&user.account.address).await?;
    Ok(Json(account_view(&state, &account).await?))
}
