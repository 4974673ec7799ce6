//! The peer router (`/peer/v1/…`, docs/kmd-peer-protocol.md) and the protocol's wire types.

use std::time::Instant;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use etsi014::server::{ApiError, JsonBody, JsonResponse, PeerCertificate};
use http::StatusCode;
use kmd_keypool::{BlockCheck, PeerKey, PoolError, Refusal, SaeId, Segment, Verdict};
use serde::{Deserialize, Serialize};

use crate::{Endpoint, Inner, Kme, Link};

/// The protocol version this crate speaks (`GET /peer/v1/status` → `protocol`).
pub const PROTOCOL_VERSION: u32 = 1;

/// `POST /peer/v1/links/{link_id}/block-checks` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockCheckRequest {
    /// The caller's unconfirmed blocks.
    pub checks: Vec<BlockCheck>,
}

/// One verdict of a [`BlockCheckReply`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireVerdict {
    /// Block ID.
    pub block_id: String,
    /// `match`, `mismatch` or `unknown`.
    pub verdict: Verdict,
}

/// The answer to a [`BlockCheckRequest`]: one verdict per check, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockCheckReply {
    /// Verdicts.
    pub verdicts: Vec<WireVerdict>,
}

/// A key assignment on the wire (§ 5): ETSI 014 member names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireKey {
    /// Key ID (UUID).
    #[serde(rename = "key_ID")]
    pub key_id: String,
    /// Master SAE.
    #[serde(rename = "master_SAE_ID")]
    pub master_sae_id: String,
    /// Slave SAEs.
    #[serde(rename = "slave_SAE_IDs")]
    pub slave_sae_ids: Vec<String>,
    /// Size in bits (the sum of the segments' lengths × 8).
    pub size: u64,
    /// Where the bytes are.
    pub segments: Vec<Segment>,
}

impl From<&PeerKey> for WireKey {
    fn from(k: &PeerKey) -> Self {
        WireKey {
            key_id: k.key_id.clone(),
            master_sae_id: k.master.as_str().to_owned(),
            slave_sae_ids: k.slaves.iter().map(|s| s.as_str().to_owned()).collect(),
            size: k.size_bits(),
            segments: k.segments.clone(),
        }
    }
}

impl TryFrom<WireKey> for PeerKey {
    type Error = PoolError;
    fn try_from(k: WireKey) -> Result<Self, PoolError> {
        let key = PeerKey {
            master: SaeId::new(k.master_sae_id)?,
            slaves: k.slave_sae_ids.into_iter().map(SaeId::new).collect::<Result<_, _>>()?,
            key_id: k.key_id,
            segments: k.segments,
        };
        if key.size_bits() != k.size {
            return Err(PoolError::Invalid {
                what: "peer key",
                reason: format!(
                    "key {}: size {} is not the segments' {} bits",
                    key.key_id,
                    k.size,
                    key.size_bits()
                ),
            });
        }
        Ok(key)
    }
}

/// `POST /peer/v1/links/{link_id}/assignments` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssignmentRequest {
    /// The keys.
    pub keys: Vec<WireKey>,
}

/// 200 answer to an [`AssignmentRequest`], sent after the transaction committed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct AcceptReply {
    /// Keys stored now.
    pub accepted: u64,
    /// Keys already stored with the same assignment (a retry).
    pub already_present: u64,
}

/// A detail of a 409 "assignment refused".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusalDetail {
    /// The refused key.
    #[serde(rename = "key_ID")]
    pub key_id: String,
    /// `block_not_held`, `block_not_confirmed`, `block_unusable`, `block_owned_here`,
    /// `out_of_range`, `overlap`, `conflicting`, `sae_pair_not_allowed`.
    pub reason: String,
    /// Whether the caller should retry (after the next block-check exchange).
    pub retryable: bool,
}

/// `POST /peer/v1/links/{link_id}/discards` body (§ 6).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiscardRequest {
    /// Keys to withdraw.
    #[serde(rename = "key_IDs", default)]
    pub key_ids: Vec<String>,
    /// Blocks to discard.
    #[serde(default)]
    pub block_ids: Vec<String>,
    /// Why (logged).
    #[serde(default)]
    pub reason: String,
}

/// 200 answer to a [`DiscardRequest`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiscardReply {
    /// Keys that changed state here.
    pub discarded_keys: u64,
    /// Blocks that changed state here.
    pub discarded_blocks: u64,
}

/// One link in [`PeerStatus`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerLinkStatus {
    /// Link ID.
    pub link_id: String,
    /// `lower` or `upper`.
    pub side: String,
    /// Confirmed blocks (any owner).
    pub confirmed_blocks: u64,
    /// Bits this side can still cut.
    pub available_bits_owned: u64,
}

/// `GET /peer/v1/status` answer (§ 8).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    /// The answering kmd's KME ID.
    #[serde(rename = "kme_ID")]
    pub kme_id: String,
    /// Protocol version.
    pub protocol: u32,
    /// The links shared with the caller.
    pub links: Vec<PeerLinkStatus>,
}

pub(crate) fn refusal_reason(r: &Refusal) -> &'static str {
    match r {
        Refusal::BlockNotHeld { .. } => "block_not_held",
        Refusal::BlockNotConfirmed { .. } => "block_not_confirmed",
        Refusal::BlockUnusable { .. } => "block_unusable",
        Refusal::BlockOwnedHere { .. } => "block_owned_here",
        Refusal::OutOfRange { .. } => "out_of_range",
        Refusal::Overlap { .. } => "overlap",
        Refusal::Conflicting => "conflicting",
        _ => "refused",
    }
}

type St = Kme;

/// Whether the request's client certificate is the peer kmd of `link`.
fn is_peer(link: &Link, cert: Option<&PeerCertificate>) -> bool {
    let Some(cert) = cert else { return false };
    match &link.peer_fingerprint {
        Some(fp) => cert.sha256_fingerprint() == *fp,
        None => cert.subject_common_name().as_deref() == Some(link.peer_kme_id.as_str()),
    }
}

fn authorised_link<'a>(
    inner: &'a Inner,
    link_id: &str,
    cert: Option<&PeerCertificate>,
) -> Result<&'a Link, ApiError> {
    // An unknown link and a wrong caller get the same answer: nothing is revealed to a
    // certificate that is not a peer.
    match inner.link(link_id) {
        Some(link) if is_peer(link, cert) => Ok(link),
        Some(_) => Err(ApiError::unauthorized()),
        None if inner.links.iter().any(|l| is_peer(l, cert)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            etsi014::ErrorBody::new(format!("unknown link {link_id}")),
        )),
        None => Err(ApiError::unauthorized()),
    }
}

fn internal(e: &PoolError) -> ApiError {
    tracing::error!(error = %e, "key pool failed on a peer request");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, etsi014::ErrorBody::new("internal error"))
}

async fn block_checks(
    State(kme): State<St>,
    Path(link_id): Path<String>,
    cert: Option<axum::Extension<PeerCertificate>>,
    JsonBody(body): JsonBody<BlockCheckRequest>,
) -> Result<JsonResponse<BlockCheckReply>, ApiError> {
    let inner = &kme.inner;
    let link = authorised_link(inner, &link_id, cert.as_ref().map(|c| &c.0))?;
    if body.checks.len() > 1000 {
        return Err(ApiError::bad_request("at most 1000 checks per call"));
    }
    let verdicts = inner.pool.check_peer_blocks(&link.id, body.checks).await.map_err(|e| match e {
        PoolError::Invalid { .. } | PoolError::BlockConflict { .. } => ApiError::bad_request(e.to_string()),
        e => internal(&e),
    })?;
    // Blocks the peer holds and this side has not read from its device yet: the device credit
    // here must catch up, or neither side can ever confirm them (see `Kme::take_blocks_behind_peer`).
    let unknown = verdicts.iter().filter(|(_, v)| *v == Verdict::Unknown).count() as u64;
    link.blocks_behind_peer.store(unknown, std::sync::atomic::Ordering::SeqCst);
    Ok(JsonResponse(BlockCheckReply {
        verdicts: verdicts.into_iter().map(|(block_id, verdict)| WireVerdict { block_id, verdict }).collect(),
    }))
}

fn refused(key_id: &str, reason: &str, retryable: bool) -> ApiError {
    let mut detail = serde_json::Map::new();
    detail.insert("key_ID".into(), key_id.into());
    detail.insert("reason".into(), reason.into());
    detail.insert("retryable".into(), retryable.into());
    let mut body = etsi014::ErrorBody::new("assignment refused");
    body.details.push(detail);
    ApiError::new(StatusCode::CONFLICT, body)
}

async fn assignments(
    State(kme): State<St>,
    Path(link_id): Path<String>,
    cert: Option<axum::Extension<PeerCertificate>>,
    JsonBody(body): JsonBody<AssignmentRequest>,
) -> Result<JsonResponse<AcceptReply>, ApiError> {
    let inner = &kme.inner;
    let link = authorised_link(inner, &link_id, cert.as_ref().map(|c| &c.0))?;
    if body.keys.is_empty() {
        return Err(ApiError::bad_request("no keys"));
    }
    let mut keys = Vec::with_capacity(body.keys.len());
    for k in body.keys {
        // The master must be an SAE at the peer's site, every slave one here, paired on this link.
        if k.slave_sae_ids.is_empty() || !k.slave_sae_ids.iter().all(|s| link.has_pair(s, &k.master_sae_id)) {
            return Err(refused(&k.key_id, "sae_pair_not_allowed", false));
        }
        keys.push(PeerKey::try_from(k).map_err(|e| ApiError::bad_request(e.to_string()))?);
    }
    match inner.pool.accept_peer_assignment(&link.id, keys).await {
        Ok(outcome) => Ok(JsonResponse(AcceptReply {
            accepted: outcome.accepted,
            already_present: outcome.already_present,
        })),
        Err(e @ PoolError::AssignmentRefused { .. }) => {
            let retryable = e.is_retryable();
            let PoolError::AssignmentRefused { key_id, reason } = &e else {
                return Err(internal(&e));
            };
            tracing::warn!(link = %link.id, key_id = %key_id, reason = %reason, "refused a peer assignment");
            Err(refused(key_id, refusal_reason(reason), retryable))
        }
        Err(e @ PoolError::Invalid { .. }) => Err(ApiError::bad_request(e.to_string())),
        Err(e) => Err(internal(&e)),
    }
}

async fn discards(
    State(kme): State<St>,
    Path(link_id): Path<String>,
    cert: Option<axum::Extension<PeerCertificate>>,
    JsonBody(body): JsonBody<DiscardRequest>,
) -> Result<JsonResponse<DiscardReply>, ApiError> {
    let inner = &kme.inner;
    let link = authorised_link(inner, &link_id, cert.as_ref().map(|c| &c.0))?;
    let reason = if body.reason.is_empty() { "discarded by the peer kmd".to_owned() } else { body.reason };
    let mut reply = DiscardReply { discarded_keys: 0, discarded_blocks: 0 };
    if !body.key_ids.is_empty() {
        reply.discarded_keys =
            inner.pool.discard_keys(&link.id, body.key_ids).await.map_err(|e| internal(&e))?;
    }
    if !body.block_ids.is_empty() {
        reply.discarded_blocks = inner
            .pool
            .discard_blocks(&link.id, body.block_ids, &format!("peer: {reason}"))
            .await
            .map_err(|e| internal(&e))?;
    }
    tracing::info!(link = %link.id, keys = reply.discarded_keys, blocks = reply.discarded_blocks, %reason,
        "applied a peer discard");
    Ok(JsonResponse(reply))
}

async fn status(
    State(kme): State<St>,
    cert: Option<axum::Extension<PeerCertificate>>,
) -> Result<JsonResponse<PeerStatus>, ApiError> {
    let inner = &kme.inner;
    let cert = cert.as_ref().map(|c| &c.0);
    let mine: Vec<&Link> = inner.links.iter().filter(|l| is_peer(l, cert)).collect();
    if mine.is_empty() {
        return Err(ApiError::unauthorized());
    }
    let mut links = Vec::with_capacity(mine.len());
    for link in mine {
        let counts = inner.pool.counts(&link.id).await.map_err(|e| internal(&e))?;
        links.push(PeerLinkStatus {
            link_id: link.id.clone(),
            side: link.side.as_str().to_owned(),
            confirmed_blocks: counts
                .blocks
                .iter()
                .filter(|b| b.state == kmd_keypool::BlockState::Confirmed)
                .map(|b| b.blocks)
                .sum(),
            available_bits_owned: counts.available_bits_owned,
        });
    }
    Ok(JsonResponse(PeerStatus { kme_id: inner.kme_id.clone(), protocol: PROTOCOL_VERSION, links }))
}

async fn observe(State(kme): State<St>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = request.uri().path();
    let endpoint = if path.ends_with("/block-checks") {
        Endpoint::PeerBlockChecks
    } else if path.ends_with("/assignments") {
        Endpoint::PeerAssignments
    } else if path.ends_with("/discards") {
        Endpoint::PeerDiscards
    } else if path == "/peer/v1/status" {
        Endpoint::PeerStatus
    } else {
        Endpoint::PeerOther
    };
    let response = next.run(request).await;
    kme.inner.observer.request(endpoint, response.status().as_u16(), started.elapsed());
    response
}

pub(crate) fn router(kme: Kme) -> Router {
    Router::new()
        .route("/peer/v1/links/{link_id}/block-checks", post(block_checks))
        .route("/peer/v1/links/{link_id}/assignments", post(assignments))
        .route("/peer/v1/links/{link_id}/discards", post(discards))
        .route("/peer/v1/status", get(status))
        .fallback(|| async { ApiError::not_found().into_response() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed().into_response() })
        .layer(axum::middleware::from_fn_with_state(kme.clone(), observe))
        .with_state(kme)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_formats_match_the_protocol_document() {
        let checks: BlockCheckRequest = serde_json::from_str(
            r#"{"checks": [{"block_id": "42", "kcv": "9f86d081884c7d659a2feaa0c55ad015"}]}"#,
        )
        .unwrap();
        assert_eq!(checks.checks[0].block_id, "42");
        let reply = BlockCheckReply {
            verdicts: vec![WireVerdict { block_id: "42".into(), verdict: Verdict::Match }],
        };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"verdicts":[{"block_id":"42","verdict":"match"}]}"#
        );

        let doc = r#"{"keys": [{"key_ID": "0b4e", "master_SAE_ID": "A-mail", "slave_SAE_IDs": ["B-mail"],
              "size": 256, "segments": [{"block_id": "42", "offset": 96, "len": 32}]}]}"#;
        let req: AssignmentRequest = serde_json::from_str(doc).unwrap();
        let key = PeerKey::try_from(req.keys[0].clone()).unwrap();
        assert_eq!(key.master.as_str(), "A-mail");
        assert_eq!(key.size_bits(), 256);
        assert_eq!(WireKey::from(&key), req.keys[0]);
        let mut wrong = req.keys[0].clone();
        wrong.size = 128;
        assert!(PeerKey::try_from(wrong).is_err(), "size must match the segments");

        let refusal = refused("0b4e", "block_not_held", true);
        assert_eq!(refusal.status(), StatusCode::CONFLICT);
        assert_eq!(
            serde_json::to_string(refusal.body()).unwrap(),
            r#"{"message":"assignment refused","details":[{"key_ID":"0b4e","reason":"block_not_held","retryable":true}]}"#
        );

        let discard: DiscardRequest = serde_json::from_str(
            r#"{"key_IDs": ["0b4e"], "block_ids": [], "reason": "master restarted before answering"}"#,
        )
        .unwrap();
        assert_eq!(discard.key_ids, ["0b4e"]);
        let status = PeerStatus {
            kme_id: "kme-A".into(),
            protocol: 1,
            links: vec![PeerLinkStatus {
                link_id: "l".into(),
                side: "lower".into(),
                confirmed_blocks: 1,
                available_bits_owned: 8,
            }],
        };
        assert_eq!(
            serde_json::to_string(&status).unwrap(),
            r#"{"kme_ID":"kme-A","protocol":1,"links":[{"link_id":"l","side":"lower","confirmed_blocks":1,"available_bits_owned":8}]}"#
        );
    }
}
