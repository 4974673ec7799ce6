//! The ETSI GS QKD 014 API for local SAEs, served over mutual TLS by `etsi014::server`.
//!
//! What is real already: the listener, TLS (client certificate required from
//! `[etsi014] client_ca`), recognising the calling SAE from its certificate ([`SaeDirectory`],
//! per `[[sae]]`: pinned SHA-256 fingerprint and/or subject CN), 401 for a certificate that
//! speaks for no configured SAE, 404/405 in the specification's error format, and the request
//! metrics (`kmd_etsi014_requests_total`, `kmd_etsi014_request_duration_seconds`).
//!
//! **Stub:** every request under `/api/v1/keys/` from a known SAE is answered
//! `503 {"message":"key management not yet available"}`. The key pool integration replaces
//! `keys_stub` with the three handlers (status, enc_keys, dec_keys) — for instance by merging
//! `kmd_kme::Kme::etsi_router()` behind this module's [`SaeDirectory`] gate — which get the
//! caller from the [`Caller`] extractor (its `links` say which links it may draw keys from) and
//! the limits from [`EtsiState::limits`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use etsi014::server::{ApiError, PeerCertificate};
use http::request::Parts;

use crate::config::{Config, Etsi014Config, SaeConfig, parse_fingerprint};
use crate::metrics::{EtsiEndpoint, Metrics};

/// The answer of every key request until the key pool is wired in.
pub const NOT_YET_AVAILABLE: &str = "key management not yet available";

/// A configured local SAE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaeEntry {
    /// The SAE ID.
    pub sae_id: String,
    /// Links whose keys it may obtain.
    pub links: Vec<String>,
    /// If set (together with a pin), the certificate's CN must also match.
    common_name: Option<String>,
}

/// Recognises local SAEs by their client certificates, per `[[sae]]`:
///
/// - an SAE with `certificate_sha256` is recognised by exactly that certificate (and, if
///   `common_name` is also set, only if the certificate's CN matches too);
/// - an SAE with only `common_name` is recognised by any certificate from the client CA whose
///   subject has exactly that CN.
///
/// A certificate that matches neither speaks for no SAE (401).
#[derive(Debug, Default)]
pub struct SaeDirectory {
    saes: Vec<SaeEntry>,
    by_fingerprint: HashMap<[u8; 32], usize>,
    by_cn: HashMap<String, usize>,
}

impl SaeDirectory {
    /// From the validated `[[sae]]` tables.
    pub fn new(saes: &[SaeConfig]) -> Self {
        let mut dir = Self::default();
        for sae in saes {
            let index = dir.saes.len();
            dir.saes.push(SaeEntry {
                sae_id: sae.sae_id.clone(),
                links: sae.links.clone(),
                common_name: sae.common_name.clone(),
            });
            match sae.certificate_sha256.as_deref().and_then(parse_fingerprint) {
                Some(fp) => {
                    dir.by_fingerprint.insert(fp, index);
                }
                None => {
                    if let Some(cn) = &sae.common_name {
                        dir.by_cn.insert(cn.clone(), index);
                    }
                }
            }
        }
        dir
    }

    /// The SAE this (already CA-verified) certificate speaks for, if any.
    pub fn resolve(&self, cert: &PeerCertificate) -> Option<&SaeEntry> {
        if let Some(&i) = self.by_fingerprint.get(&cert.sha256_fingerprint()) {
            let entry = &self.saes[i];
            return match &entry.common_name {
                Some(cn) if cert.subject_common_name().as_deref() != Some(cn.as_str()) => None,
                _ => Some(entry),
            };
        }
        let cn = cert.subject_common_name()?;
        self.by_cn.get(&cn).map(|&i| &self.saes[i])
    }

    /// Number of configured SAEs.
    pub fn len(&self) -> usize {
        self.saes.len()
    }

    /// True if no SAE is configured.
    pub fn is_empty(&self) -> bool {
        self.saes.is_empty()
    }
}

/// Shared state of the ETSI 014 router.
#[derive(Clone)]
pub struct EtsiState {
    /// Who may call.
    pub saes: Arc<SaeDirectory>,
    /// Key size defaults and limits (`[etsi014]`).
    pub limits: Arc<Etsi014Config>,
    /// Where requests are counted.
    pub metrics: Arc<Metrics>,
}

impl EtsiState {
    /// From the configuration.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        Self {
            saes: Arc::new(SaeDirectory::new(&config.saes)),
            limits: Arc::new(config.etsi014.clone()),
            metrics,
        }
    }
}

/// Extractor: the configured SAE the caller's certificate speaks for; 401 in the specification's
/// format otherwise.
#[derive(Debug, Clone)]
pub struct Caller(pub SaeEntry);

impl FromRequestParts<EtsiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &EtsiState) -> Result<Self, ApiError> {
        let Some(cert) = parts.extensions.get::<PeerCertificate>() else {
            tracing::warn!("ETSI 014 request without a client certificate");
            return Err(ApiError::unauthorized());
        };
        match state.saes.resolve(cert) {
            Some(sae) => Ok(Self(sae.clone())),
            None => {
                tracing::info!(?cert, path = %parts.uri.path(), "client certificate speaks for no configured [[sae]]");
                Err(ApiError::unauthorized())
            }
        }
    }
}

/// The router: `/api/v1/keys/*` (GET and POST) for known SAEs; 404 elsewhere, 405 for other
/// methods; every answer counted in the metrics.
pub fn router(state: EtsiState) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route(
            "/api/v1/keys/{*rest}",
            get(keys_stub).post(keys_stub).fallback(|| async { ApiError::method_not_allowed() }),
        )
        .fallback(|| async { ApiError::not_found() })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(metrics, track))
}

/// Placeholder for status / enc_keys / dec_keys.
async fn keys_stub(Caller(sae): Caller, request: Request) -> ApiError {
    tracing::debug!(sae = %sae.sae_id, path = %request.uri().path(), "ETSI 014 request answered 503 (key pool not wired in)");
    ApiError::service_unavailable(NOT_YET_AVAILABLE)
}

async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let endpoint = EtsiEndpoint::of_path(request.uri().path());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.observe_etsi(endpoint, response.status().as_u16(), started.elapsed());
    response
}
