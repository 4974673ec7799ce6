//! The ETSI GS QKD 014 API for local SAEs, served over mutual TLS by `etsi014::server`.
//!
//! The handlers (status, enc_keys, dec_keys) are `kmd_kme::Kme::etsi_router()`; this module
//! puts kmd's [`SaeDirectory`] in front of it as a gate: the calling SAE is recognised from its
//! certificate per `[[sae]]` (pinned SHA-256 fingerprint and/or subject CN) and a certificate
//! that speaks for no configured SAE gets 401 before reaching the key service. Request metrics
//! (`kmd_etsi014_requests_total`, `kmd_etsi014_request_duration_seconds`) are counted by the
//! key service's observer ([`crate::kme::Observer`]) and, for the gate's 401s, here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use etsi014::server::{ApiError, PeerCertificate};

use crate::config::{Config, SaeConfig, parse_fingerprint};
use crate::metrics::{EtsiEndpoint, Metrics};

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

/// Shared state of the SAE gate.
#[derive(Clone)]
pub struct EtsiState {
    /// Who may call.
    pub saes: Arc<SaeDirectory>,
    /// Where refused requests are counted.
    pub metrics: Arc<Metrics>,
}

impl EtsiState {
    /// From the configuration.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        Self { saes: Arc::new(SaeDirectory::new(&config.saes)), metrics }
    }
}

/// The ETSI 014 router: `kme` (`kmd_kme::Kme::etsi_router()`, which answers and counts every
/// request it sees) behind the [`SaeDirectory`] gate, which answers 401 (and counts it) for a
/// certificate that speaks for no configured `[[sae]]`.
pub fn router(state: EtsiState, kme: Router) -> Router {
    kme.layer(axum::middleware::from_fn_with_state(state, gate))
}

async fn gate(State(state): State<EtsiState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let known = match request.extensions().get::<PeerCertificate>() {
        Some(cert) => match state.saes.resolve(cert) {
            Some(sae) => Some(sae.sae_id.clone()),
            None => {
                tracing::info!(?cert, path = %request.uri().path(), "client certificate speaks for no configured [[sae]]");
                None
            }
        },
        None => {
            tracing::warn!("ETSI 014 request without a client certificate");
            None
        }
    };
    match known {
        Some(sae) => {
            tracing::debug!(%sae, path = %request.uri().path(), "ETSI 014 request");
            next.run(request).await
        }
        None => {
            let endpoint = EtsiEndpoint::of_path(request.uri().path());
            let response = ApiError::unauthorized().into_response();
            state.metrics.observe_etsi(endpoint, response.status().as_u16(), started.elapsed());
            response
        }
    }
}
