//! The ETSI GS QKD 014 V1.1.1 router (clause 5) over the key pool and the peer channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRef, RawQuery, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use etsi014::server::{ApiError, CallerSae, JsonBody, JsonResponse, SaeIdPath, SaeIdentityMap, query_pairs};
use etsi014::types::messages;
use etsi014::{Key, KeyContainer, KeyIds, KeyMaterial, KeyRequest, Status};
use http::StatusCode;
use kmd_keypool::{KeyGrant, PoolError, SaeId};

use crate::client::PeerError;
use crate::peer::{AcceptReply, AssignmentRequest, WireKey};
use crate::{Endpoint, Inner, Kme, Link};

/// The 503 message when the peer kmd did not durably accept the keys (doc § 5).
pub(crate) const PEER_UNREACHABLE: &str = "peer KME unreachable";
/// The 503 message when this side's share of the link's key material is too small.
pub(crate) const EXHAUSTED: &str = "not enough key material on KME";

#[derive(Clone)]
struct EtsiState {
    kme: Kme,
    ids: SaeIdentityMap,
}

impl FromRef<EtsiState> for SaeIdentityMap {
    fn from_ref(s: &EtsiState) -> SaeIdentityMap {
        s.ids.clone()
    }
}

pub(crate) fn internal(e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "ETSI 014 request failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, etsi014::ErrorBody::new("internal error"))
}

fn sae(id: &str) -> Result<SaeId, ApiError> {
    SaeId::new(id).map_err(|_| ApiError::unauthorized())
}

impl Inner {
    /// The link on which `local` (an SAE here) may exchange keys with `remote`; 401 otherwise.
    fn pair_link(&self, local: &str, remote: &str) -> Result<&Link, ApiError> {
        self.links.iter().find(|l| l.has_pair(local, remote)).ok_or_else(ApiError::unauthorized)
    }

    async fn status(&self, master: &str, slave: &str) -> Result<Status, ApiError> {
        let link = self.pair_link(master, slave)?;
        let size = self.key_size_default;
        let stored = self.pool.stored_key_count(&link.id, size).await.map_err(|e| internal(&e))?;
        let counts = self.pool.counts(&link.id).await.map_err(|e| internal(&e))?;
        Ok(Status {
            source_kme_id: self.kme_id.clone(),
            target_kme_id: link.peer_kme_id.clone(),
            master_sae_id: master.to_owned(),
            slave_sae_id: slave.to_owned(),
            key_size: size,
            stored_key_count: stored,
            max_key_count: (counts.available_bits_confirmed / u64::from(size)).max(stored),
            max_key_per_request: self.max_keys_per_request,
            max_key_size: self.max_key_size,
            min_key_size: self.min_key_size,
            max_sae_id_count: self.max_sae_id_count,
            status_extension: None,
        })
    }

    async fn enc_keys(
        self: &Arc<Self>,
        master: &str,
        slave: &str,
        request: KeyRequest,
    ) -> Result<KeyContainer, ApiError> {
        // Who may ask comes first: an unknown SAE learns nothing about the KME's rules.
        let link = self.pair_link(master, slave)?;
        if request.extension_mandatory.iter().any(|e| !e.is_empty()) {
            return Err(ApiError::bad_request(messages::EXTENSION_MANDATORY_UNSUPPORTED));
        }
        let number = request.number.unwrap_or(1);
        let size = request.size.unwrap_or(self.key_size_default);
        if !size.is_multiple_of(8) {
            return Err(ApiError::size_not_multiple_of_8());
        }
        if size < self.min_key_size || size > self.max_key_size {
            return Err(ApiError::parameters_not_adhering()
                .with_detail("min_key_size", self.min_key_size)
                .with_detail("max_key_size", self.max_key_size));
        }
        if number == 0 || number > self.max_keys_per_request {
            return Err(ApiError::parameters_not_adhering()
                .with_detail("max_key_per_request", self.max_keys_per_request));
        }
        let mut slaves = vec![sae(slave)?];
        if !request.additional_slave_sae_ids.is_empty() {
            if request.additional_slave_sae_ids.len() > self.max_sae_id_count as usize {
                return Err(ApiError::parameters_not_adhering()
                    .with_detail("max_SAE_ID_count", self.max_sae_id_count));
            }
            for extra in &request.additional_slave_sae_ids {
                // Every slave must be reachable through the same peer kmd (doc § 9).
                if !link.has_pair(master, extra) {
                    return Err(ApiError::unauthorized());
                }
                let extra = sae(extra)?;
                if slaves.contains(&extra) {
                    return Err(
                        ApiError::parameters_not_adhering().with_detail("duplicate_SAE_ID", extra.as_str())
                    );
                }
                slaves.push(extra);
            }
        }
        if !link.up.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::service_unavailable(PEER_UNREACHABLE));
        }
        let grants = self.enc_keys_batched(link, sae(master)?, slaves, number, size).await?;
        Ok(KeyContainer {
            keys: grants
                .into_iter()
                .map(|g| {
                    let KeyGrant { assignment, key } = g;
                    Key::new(assignment.key_id, KeyMaterial::new(key))
                })
                .collect(),
            key_container_extension: Some(link_extension(link, &self.kme_id, &link.peer_kme_id)),
        })
    }

    /// § 5 steps 2 and 4: POST the assignment (every key of a batch, [`crate::batch`]); one
    /// retry after 100 ms on a retryable refusal.
    pub(crate) async fn push_assignment(
        &self,
        link: &Link,
        grants: &[&KeyGrant],
    ) -> Result<AcceptReply, PeerError> {
        let body = AssignmentRequest { keys: grants.iter().map(|g| WireKey::from(&g.assignment)).collect() };
        let path = format!("/peer/v1/links/{}/assignments", link.id);
        match link.client.post::<_, AcceptReply>(&path, &body).await {
            Err(PeerError::Status { status: 409, body: Some(b), .. })
                if b.details
                    .iter()
                    .any(|d| d.get("retryable").and_then(serde_json::Value::as_bool) == Some(true)) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
                link.client.post(&path, &body).await
            }
            other => other,
        }
    }

    async fn dec_keys(&self, slave: &str, master: &str, ids: Vec<String>) -> Result<KeyContainer, ApiError> {
        let link = self.pair_link(slave, master)?;
        if ids.is_empty() {
            return Err(ApiError::parameters_not_adhering().with_detail("key_IDs", "no key ID given"));
        }
        if ids.len() > self.max_keys_per_request as usize {
            return Err(ApiError::parameters_not_adhering()
                .with_detail("max_key_per_request", self.max_keys_per_request));
        }
        let (slave_id, master_id) = (sae(slave)?, sae(master)?);
        let keys = self.pool.take_for_decryption(&slave_id, &master_id, ids).await.map_err(|e| match e {
            PoolError::NotAuthorised { .. } => ApiError::unauthorized(),
            PoolError::NotFound(_) => ApiError::keys_not_found(),
            PoolError::Invalid { .. } => {
                ApiError::parameters_not_adhering().with_detail("key_IDs", e.to_string())
            }
            e => internal(&e),
        })?;
        self.observer.keys_served(&link.id, Endpoint::DecKeys, keys.len());
        Ok(KeyContainer {
            keys: keys.into_iter().map(|k| Key::new(k.key_id, KeyMaterial::new(k.key))).collect(),
            key_container_extension: Some(link_extension(link, &link.peer_kme_id, &self.kme_id)),
        })
    }
}

async fn status(
    State(s): State<EtsiState>,
    CallerSae(caller): CallerSae,
    SaeIdPath(slave): SaeIdPath,
) -> Result<JsonResponse<Status>, ApiError> {
    s.kme.inner.status(&caller, &slave).await.map(JsonResponse)
}

fn parse_u32(name: &str, value: &str) -> Result<u32, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::parameters_not_adhering().with_detail(name.to_owned(), value.to_owned()))
}

async fn enc_keys_get(
    State(s): State<EtsiState>,
    CallerSae(caller): CallerSae,
    SaeIdPath(slave): SaeIdPath,
    RawQuery(query): RawQuery,
) -> Result<JsonResponse<KeyContainer>, ApiError> {
    let mut request = KeyRequest::default();
    for (name, value) in query_pairs(query.as_deref()) {
        match name.as_str() {
            "number" => request.number = Some(parse_u32(&name, &value)?),
            "size" => request.size = Some(parse_u32(&name, &value)?),
            _ => {}
        }
    }
    enc_keys_for_caller(&s.kme, caller, slave, request).await
}

/// The `qutemail_link` key container extension: which link and KMEs made the keys, and the
/// link's last telemetry (QBER, secret key rate) — what a per-message certificate records.
fn link_extension(link: &Link, source_kme_id: &str, target_kme_id: &str) -> etsi014::types::Extension {
    let telemetry = link.telemetry.lock().ok().and_then(|t| *t);
    let mut fields = serde_json::Map::new();
    fields.insert("link_id".into(), link.id.clone().into());
    fields.insert("source_KME_ID".into(), source_kme_id.into());
    fields.insert("target_KME_ID".into(), target_kme_id.into());
    fields.insert("qber".into(), telemetry.and_then(|t| t.qber).into());
    fields.insert("secret_key_rate_bps".into(), telemetry.and_then(|t| t.secret_key_rate_bps).into());
    fields.insert("telemetry_unix_ms".into(), telemetry.map(|t| t.observed_unix_ms).into());
    let mut extension = serde_json::Map::new();
    extension.insert(LINK_EXTENSION.into(), fields.into());
    extension
}

/// Name of kmd's key container extension.
pub const LINK_EXTENSION: &str = "qutemail_link";

/// `enc_keys` for `caller`. An SAE that hangs up mid-request cannot leave keys reserved (or
/// accepted by the peer) but neither delivered nor discarded: once queued, its request is
/// carried through by the batch's own task ([`crate::batch`]).
async fn enc_keys_for_caller(
    kme: &Kme,
    caller: String,
    slave: String,
    request: KeyRequest,
) -> Result<JsonResponse<KeyContainer>, ApiError> {
    kme.inner.enc_keys(&caller, &slave, request).await.map(JsonResponse)
}

async fn enc_keys_post(
    State(s): State<EtsiState>,
    CallerSae(caller): CallerSae,
    SaeIdPath(slave): SaeIdPath,
    JsonBody(request): JsonBody<KeyRequest>,
) -> Result<JsonResponse<KeyContainer>, ApiError> {
    enc_keys_for_caller(&s.kme, caller, slave, request).await
}

async fn dec_keys_get(
    State(s): State<EtsiState>,
    CallerSae(caller): CallerSae,
    SaeIdPath(master): SaeIdPath,
    RawQuery(query): RawQuery,
) -> Result<JsonResponse<KeyContainer>, ApiError> {
    let ids: Vec<String> =
        query_pairs(query.as_deref()).into_iter().filter(|(n, _)| n == "key_ID").map(|(_, v)| v).collect();
    s.kme.inner.dec_keys(&caller, &master, ids).await.map(JsonResponse)
}

async fn dec_keys_post(
    State(s): State<EtsiState>,
    CallerSae(caller): CallerSae,
    SaeIdPath(master): SaeIdPath,
    JsonBody(body): JsonBody<KeyIds>,
) -> Result<JsonResponse<KeyContainer>, ApiError> {
    let ids = body.key_ids.into_iter().map(|e| e.key_id).collect();
    s.kme.inner.dec_keys(&caller, &master, ids).await.map(JsonResponse)
}

async fn observe(State(s): State<EtsiState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = request.uri().path();
    let endpoint = if path.ends_with("/status") {
        Endpoint::Status
    } else if path.ends_with("/enc_keys") {
        Endpoint::EncKeys
    } else if path.ends_with("/dec_keys") {
        Endpoint::DecKeys
    } else {
        Endpoint::EtsiOther
    };
    let response = next.run(request).await;
    s.kme.inner.observer.request(endpoint, response.status().as_u16(), started.elapsed());
    response
}

pub(crate) fn router(kme: Kme) -> Router {
    let state = EtsiState { ids: kme.inner.sae_identities.clone(), kme };
    Router::new()
        .route("/api/v1/keys/{sae_id}/status", get(status))
        .route("/api/v1/keys/{sae_id}/enc_keys", get(enc_keys_get).post(enc_keys_post))
        .route("/api/v1/keys/{sae_id}/dec_keys", get(dec_keys_get).post(dec_keys_post))
        .fallback(|| async { ApiError::not_found().into_response() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed().into_response() })
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

impl Kme {
    /// The ETSI GS QKD 014 router (`/api/v1/keys/{SAE_ID}/status|enc_keys|dec_keys`), to serve
    /// over mutual TLS with [`etsi014::server::serve`] (client CA = the SAEs' CA).
    pub fn etsi_router(&self) -> Router {
        router(self.clone())
    }

    /// The peer-protocol router (`/peer/v1/…`), to serve over mutual TLS with
    /// [`etsi014::server::serve`] (client CA = the peer site's CA).
    pub fn peer_router(&self) -> Router {
        crate::peer::router(self.clone())
    }
}
