//! `/api/qkd/*`: whether QKD keys for a recipient's site are ready (ETSI 014 `status` at the
//! site's kmd; no key is taken), and what became of a sent message: per recipient its delivery
//! state and, for a delivery sealed for a peer site, the QKD key IDs, link and signed
//! certificate it went out with (the queue's delivery records, `qutemail-store`).

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use qutemail_store::{DeliveryState, RecipientDelivery, SentRecord};
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

/// A sent message's delivery and the QKD keys it consumed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Confirmation {
    /// `queued|deferred|bounced|unknown|delivered`: the least advanced recipient's state, in
    /// that order.
    pub state: String,
    /// The mode asked for or chosen at submission (what each delivery actually used is
    /// `recipients[].mode`).
    pub mode: String,
    /// The QKD key IDs of every delivered recipient, each once, in recipient order (the union
    /// of `recipients[].key_ids`); empty until a QKD-sealed delivery is done.
    pub key_ids: Vec<String>,
    /// The signed certificate, when exactly one certificate covers the delivered recipients
    /// (one delivery to one peer site); null when none does, or when deliveries to several
    /// sites each carried their own (see `recipients[].certificate`).
    #[schema(value_type = Option<Object>)]
    pub certificate: Option<serde_json::Value>,
    /// Per recipient: state and, once delivered, how.
    pub recipients: Vec<RecipientState>,
    /// Human explanation.
    pub detail: String,
}

/// One recipient's delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecipientState {
    /// Recipient.
    pub recipient: String,
    /// `queued` (not tried yet), `deferred` (tried, will retry), `delivered`, `bounced`
    /// (refused, given up, or removed from the queue by an operator), or `unknown` (the
    /// queue's record of it is gone: older than 30 days, or sent before this gateway kept them).
    pub state: String,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// The last reply or diagnosis while not delivered (`deferred`, `bounced`), else null.
    pub last_error: Option<String>,
    /// The last reply (for `delivered`, the next hop's acceptance) or our diagnosis.
    pub last_reply: Option<String>,
    /// Enhanced status code of the last reply (`2.0.0` once delivered).
    pub status: Option<String>,
    /// When the gateway was done with this recipient (RFC 3339), null while queued.
    pub completed_at: Option<String>,
    /// How it went out: `hybrid`, `qaes`, `otp` or `pqc` (sealed for a peer site), `normal`
    /// (relayed over TLS only), or `local` (a mailbox on this site); null while queued, when
    /// nothing was sent, or unknown.
    pub mode: Option<String>,
    /// The envelope's `X-QKD-Algorithm` (sealed deliveries).
    pub algorithm: Option<String>,
    /// The ETSI GS QKD 014 key IDs that sealed the delivered copy, in order: what the recipient
    /// sees in `X-QKD-Key-ID`. Empty unless `delivered` in a QKD mode.
    pub key_ids: Vec<String>,
    /// The QKD link the keys came from (delivered, QKD modes).
    pub link_id: Option<String>,
    /// The sending site's KME (delivered, QKD modes).
    pub source_kme_id: Option<String>,
    /// The receiving site's KME (delivered, QKD modes).
    pub target_kme_id: Option<String>,
    /// The "Quantum Secured" certificate the delivered envelope carried, exactly as this site
    /// signed it (`{certificate, signature}`, docs/envelope-format.md): verifiable with this
    /// site's card. Null unless `delivered` sealed (`hybrid`, `qaes`, `otp`, `pqc`).
    #[schema(value_type = Option<Object>)]
    pub certificate: Option<serde_json::Value>,
}

/// Reports the delivery of a sent message and the QKD keys each delivery consumed.
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
    let mut queues: HashMap<String, Vec<RecipientDelivery>> = HashMap::new();
    for (_, queue_id) in &record.recipients {
        if queue_id != LOCAL && !queues.contains_key(queue_id) {
            let status = state.deps.store.delivery_status(queue_id).await?;
            queues.insert(queue_id.clone(), status);
        }
    }
    Ok(Json(confirmation(record, &queues)))
}

/// The queue ID compose records for a recipient on this site (delivered at once).
const LOCAL: &str = "local";

/// The answer for a web-sent message from the queue's view of each of its queue IDs.
fn confirmation(record: SentRecord, queues: &HashMap<String, Vec<RecipientDelivery>>) -> Confirmation {
    let recipients: Vec<RecipientState> = record
        .recipients
        .iter()
        .map(|(recipient, queue_id)| {
            if queue_id == LOCAL {
                return local_recipient(recipient, record.created_at);
            }
            let found = queues
                .get(queue_id)
                .and_then(|q| q.iter().find(|r| r.recipient.eq_ignore_ascii_case(recipient)));
            match found {
                Some(delivery) => recipient_state(recipient, delivery),
                None => unknown_recipient(recipient),
            }
        })
        .collect();
    let rank = |s: &str| match s {
        "queued" => 0,
        "deferred" => 1,
        "bounced" => 2,
        "unknown" => 3,
        _ => 4,
    };
    let overall =
        recipients.iter().map(|r| r.state.as_str()).min_by_key(|s| rank(s)).unwrap_or("delivered").to_owned();
    let delivered = || recipients.iter().filter(|r| r.state == "delivered");
    let mut key_ids: Vec<String> = Vec::new();
    for id in delivered().flat_map(|r| &r.key_ids) {
        if !key_ids.contains(id) {
            key_ids.push(id.clone());
        }
    }
    let mut certificates: Vec<&serde_json::Value> = Vec::new();
    for c in delivered().filter_map(|r| r.certificate.as_ref()) {
        if !certificates.contains(&c) {
            certificates.push(c);
        }
    }
    let certificate = match certificates.as_slice() {
        [one] => Some((*one).clone()),
        _ => None,
    };
    Confirmation {
        detail: match overall.as_str() {
            "queued" => {
                "waiting in the outbound queue; QKD keys are taken when it is sealed for delivery".into()
            }
            "deferred" => "delivery was tried and will be retried (e.g. waiting for QKD keys)".into(),
            "bounced" => "delivery failed for at least one recipient; a report was sent to your INBOX".into(),
            "unknown" => "the outcome of at least one recipient is no longer recorded (kept 30 days)".into(),
            _ => "delivered to every recipient; each delivery sealed for a peer site lists the QKD key IDs \
                  and the signed certificate it carried"
                .into(),
        },
        state: overall,
        mode: record.mode,
        key_ids,
        certificate,
        recipients,
    }
}

fn local_recipient(recipient: &str, at: std::time::SystemTime) -> RecipientState {
    RecipientState {
        state: DeliveryState::Delivered.as_str().into(),
        completed_at: Some(crate::message::rfc3339(at)),
        mode: Some(LOCAL.into()),
        ..unknown_recipient(recipient)
    }
}

fn unknown_recipient(recipient: &str) -> RecipientState {
    RecipientState {
        recipient: recipient.to_owned(),
        state: "unknown".into(),
        attempts: 0,
        last_error: None,
        last_reply: None,
        status: None,
        completed_at: None,
        mode: None,
        algorithm: None,
        key_ids: Vec::new(),
        link_id: None,
        source_kme_id: None,
        target_kme_id: None,
        certificate: None,
    }
}

fn recipient_state(recipient: &str, d: &RecipientDelivery) -> RecipientState {
    let delivered = d.state == DeliveryState::Delivered;
    let mut out = RecipientState {
        state: d.state.as_str().into(),
        attempts: d.attempts,
        last_error: if delivered { None } else { d.reply.clone() },
        last_reply: d.reply.clone(),
        status: d.status.clone(),
        completed_at: d.completed_at.map(crate::message::rfc3339),
        mode: d.sent_as.as_ref().map(|p| p.mode.clone()),
        ..unknown_recipient(recipient)
    };
    // What sealed a copy is reported for a delivered copy only: a refused attempt's keys
    // protect nothing anyone holds.
    if let (true, Some(p)) = (delivered, &d.sent_as) {
        out.algorithm = p.algorithm.clone();
        out.key_ids = p.key_ids.clone();
        out.link_id = p.link_id.clone();
        out.source_kme_id = p.source_kme_id.clone();
        out.target_kme_id = p.target_kme_id.clone();
        out.certificate = p.certificate.as_deref().and_then(|json| {
            serde_json::from_slice(json)
                .inspect_err(
                    |e| tracing::warn!(recipient, error = %e, "a delivery record's certificate is not JSON"),
                )
                .ok()
        });
    }
    out
}
