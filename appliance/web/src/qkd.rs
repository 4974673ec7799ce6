//! `/api/qkd/*`: whether QKD keys for a recipient's site are ready (ETSI 014 `status` at the
//! site's kmd; no key is taken), and what became of a sent message.

use axum::Json;
use axum::extract::State;
use qutemail_vault::Protection;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Shared;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, AuthUser};
use crate::mail::load;

/// `{"recipient"}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct KeyRequest {
    /// The recipient's address.
    pub recipient: String,
}

/// Key readiness for a recipient's site.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyStatus {
    /// The recipient's domain.
    pub peer_domain: String,
    /// The QKD link (from kmd's status, when it says).
    pub link_id: Option<String>,
    /// The peer gateway's SAE ID (null: no QKD link to that domain).
    pub sae_id: Option<String>,
    /// Keys kmd holds for the pair.
    pub available_keys: u64,
    /// Default key size, bits.
    pub key_size: u32,
    /// Whether a QKD-protected message could take its keys now.
    pub ready: bool,
    /// The mode a message sent now with the site's default would get.
    pub mode_if_sent_now: String,
    /// Why not ready, when it is not.
    pub detail: Option<String>,
}

/// Asks kmd whether keys for the recipient's site are ready; takes none.
#[utoipa::path(post, path = "/api/qkd/request_key/", tag = "qkd", security(("bearer" = [])), request_body = KeyRequest,
    responses((status = 200, body = KeyStatus), (status = 401, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 400, body = ErrorBody)))]
pub(crate) async fn request_key(
    State(state): State<Shared>,
    _user: AuthUser,
    ApiJson(req): ApiJson<KeyRequest>,
) -> ApiResult<Json<KeyStatus>> {
    let address = qutemail_smtp::Address::parse(req.recipient.trim(), true)
        .map_err(|e| ApiError::validation(format!("{:?} is not a mail address: {e}", req.recipient)))?;
    let domain = address.domain().to_ascii_lowercase();
    let chosen = state.deps.vault.choose(&domain, None).unwrap_or(Protection::Normal);
    let peer = state.deps.peers.iter().find(|p| p.domain.eq_ignore_ascii_case(&domain));
    let (Some(peer), Some(kmd)) = (peer, state.deps.kmd.as_ref()) else {
        return Ok(Json(KeyStatus {
            peer_domain: domain,
            link_id: None,
            sae_id: None,
            available_keys: 0,
            key_size: 0,
            ready: false,
            mode_if_sent_now: chosen.as_str().into(),
            detail: Some(
                "no QKD link to this domain: mail goes with normal protection (TLS, sealed at rest)".into(),
            ),
        }));
    };
    let rule = state.deps.policy.keys_exhausted_for(&peer.domain);
    let fallback = if rule == qutemail_vault::KeysExhausted::Pqc { Protection::Pqc } else { chosen };
    let without_keys = match rule {
        qutemail_vault::KeysExhausted::Defer => "a message waits in the queue until keys return",
        qutemail_vault::KeysExhausted::Pqc => "a message goes sealed with ML-KEM-768 alone (pqc)",
        qutemail_vault::KeysExhausted::Refuse => "a message is refused and returned to its sender",
    };
    match kmd.status(&peer.sae_id).await {
        Ok(status) => {
            let ready = status.stored_key_count > 0;
            let link_id = status
                .status_extension
                .as_ref()
                .and_then(|e| e.get("qutemail_link"))
                .and_then(|l| l.get("link_id"))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned);
            Ok(Json(KeyStatus {
                peer_domain: domain,
                link_id,
                sae_id: Some(peer.sae_id.clone()),
                available_keys: status.stored_key_count,
                key_size: status.key_size,
                ready,
                mode_if_sent_now: if ready { chosen } else { fallback }.as_str().into(),
                detail: (!ready)
                    .then(|| format!("kmd holds no keys for this peer right now: {without_keys}")),
            }))
        }
        Err(e) => {
            tracing::warn!(peer = %peer.domain, error = %e, "kmd status failed");
            Ok(Json(KeyStatus {
                peer_domain: domain,
                link_id: None,
                sae_id: Some(peer.sae_id.clone()),
                available_keys: 0,
                key_size: 0,
                ready: false,
                mode_if_sent_now: fallback.as_str().into(),
                detail: Some(format!("the site's key management service did not answer: {without_keys}")),
            }))
        }
    }
}

/// `{"id"}`: a Sent message's id.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ConfirmRequest {
    /// The Sent copy's id (from compose).
    pub id: String,
}

/// A sent message's delivery and keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct Confirmation {
    /// `queued|deferred|delivered|bounced` (the least advanced recipient's).
    pub state: String,
    /// The mode asked for or chosen at submission.
    pub mode: String,
    /// QKD key IDs consumed (known once sealed for delivery; see detail).
    pub key_ids: Vec<String>,
    /// The certificate, when known.
    #[schema(value_type = Option<Object>)]
    pub certificate: Option<serde_json::Value>,
    /// Per recipient: state.
    pub recipients: Vec<RecipientState>,
    /// Human explanation.
    pub detail: String,
}

/// One recipient's state.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecipientState {
    /// Recipient.
    pub recipient: String,
    /// `queued|deferred|delivered|bounced`.
    pub state: String,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// The last reply or diagnosis.
    pub last_error: Option<String>,
}

/// Reports the delivery of a sent message.
#[utoipa::path(post, path = "/api/qkd/confirm/", tag = "qkd", security(("bearer" = [])), request_body = ConfirmRequest,
    responses((status = 200, body = Confirmation), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn confirm(
    State(state): State<Shared>,
    user: AuthUser,
    ApiJson(req): ApiJson<ConfirmRequest>,
) -> ApiResult<Json<Confirmation>> {
    // The id must be one of the account's messages (404 otherwise, also for other accounts').
    load(&state, &user, &req.id).await?;
    let record = state
        .deps
        .store
        .web_sent(user.account.id, &req.id)
        .await?
        .ok_or_else(|| ApiError::not_found("this message was not sent through the web API"))?;
    let listing = state.deps.store.queue_listing().await?;
    let mut recipients = Vec::new();
    for (recipient, queue_id) in &record.recipients {
        let entry = listing
            .iter()
            .find(|l| &l.queue_id == queue_id)
            .and_then(|l| l.recipients.iter().find(|r| r.0.eq_ignore_ascii_case(recipient)));
        let (state_name, attempts, last_error) = match entry {
            _ if queue_id == "local" => ("delivered", 0, None),
            // Recipients leave the queue listing once their whole message is done.
            None => ("delivered", 0, None),
            Some((_, s, attempts, _, reply)) => {
                let name = match s.as_str() {
                    "delivered" => "delivered",
                    "failed" => "bounced",
                    _ if *attempts > 0 => "deferred",
                    _ => "queued",
                };
                (name, *attempts, reply.clone())
            }
        };
        recipients.push(RecipientState {
            recipient: recipient.clone(),
            state: state_name.into(),
            attempts,
            last_error,
        });
    }
    let rank = |s: &str| match s {
        "queued" => 0,
        "deferred" => 1,
        "bounced" => 2,
        _ => 3,
    };
    let overall =
        recipients.iter().map(|r| r.state.as_str()).min_by_key(|s| rank(s)).unwrap_or("delivered").to_owned();
    Ok(Json(Confirmation {
        detail: match overall.as_str() {
            "queued" => {
                "waiting in the outbound queue; QKD keys are taken when it is sealed for delivery".into()
            }
            "deferred" => "delivery was tried and will be retried (e.g. waiting for QKD keys)".into(),
            "bounced" => "delivery failed; a report was sent to your INBOX".into(),
            _ => {
                "delivered (or handed to the recipient's site). The key IDs are recorded in the recipient's \
                  certificate; this gateway does not keep them for sent mail yet."
                    .into()
            }
        },
        state: overall,
        mode: record.mode,
        key_ids: Vec::new(),
        certificate: None,
        recipients,
    }))
}
