//! The key management entity (`kmd-kme`) built from the configuration: settings, SAE pairs,
//! and the metrics observer.
//!
//! - `KmeSettings`: `[site] kme_id`; key sizes and limits from `[etsi014]`; SAE identities:
//!   pinned `certificate_sha256` → `sae_id`, otherwise the certificate's subject CN (the
//!   configuration requires a CN-only `[[sae]]` to have `common_name = sae_id`). kmd's own
//!   [`crate::etsi::SaeDirectory`] stays in front of the ETSI router as a gate, so only
//!   certificates that speak for a configured `[[sae]]` reach it.
//! - One `LinkSettings` per `[[link]]`: the peer (`peer_kme_id`, `peer_url`,
//!   `peer_certificate_sha256`, `[peer] ca_cert`/`client_cert`/`client_key`,
//!   `request_timeout_ms`) and its SAE pairs: every `[[sae]]` that lists the link × every
//!   `peer_sae_ids` entry (an empty `peer_sae_ids` gives no pair: no key is served on it).
//! - Each link's `LinkRetention` from its own `[[link]]`: `unconfirmed_grace_s`,
//!   `assigned_key_ttl_s` and `history_retention_days`.

use std::sync::Arc;
use std::time::Duration;

use etsi014::server::SaeIdentityMap;
use etsi014::tls::TlsPem;
use kmd_keypool::Side;
use kmd_kme::{Endpoint, KmeObserver, KmeSettings, LinkRetention, LinkSettings, PeerSettings, SaePair};

use crate::config::Config;
use crate::metrics::{EtsiEndpoint, Metrics, PeerSyncState};

/// The configuration cannot be turned into KME settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A link needs `[peer]`.
    #[error("[peer] is required when a [[link]] is configured")]
    NoPeer,
    /// The KME IDs give no side.
    #[error("[[link]] {link:?}: {message}")]
    Link {
        /// The link.
        link: String,
        /// What is wrong.
        message: String,
    },
    /// A fingerprint is malformed.
    #[error("[[sae]] {sae:?}: {message}")]
    Sae {
        /// The SAE.
        sae: String,
        /// What is wrong.
        message: String,
    },
}

/// `kmd-kme` settings from the (validated) configuration.
pub fn settings(config: &Config) -> Result<KmeSettings, SettingsError> {
    let mut links = Vec::with_capacity(config.links.len());
    for link in &config.links {
        let peer = config.peer.as_ref().ok_or(SettingsError::NoPeer)?;
        let err = |message: String| SettingsError::Link { link: link.id.clone(), message };
        let side =
            Side::from_kme_ids(&config.site.kme_id, &link.peer_kme_id).map_err(|e| err(e.to_string()))?;
        let tls = TlsPem::from_files(&peer.ca_cert, &peer.client_cert, &peer.client_key)
            .map_err(|e| err(format!("[peer] TLS files: {e}")))?;
        let sae_pairs = config
            .saes
            .iter()
            .filter(|s| s.links.contains(&link.id))
            .flat_map(|s| {
                link.peer_sae_ids.iter().map(|remote| SaePair::new(s.sae_id.clone(), remote.clone()))
            })
            .collect::<Vec<_>>();
        if sae_pairs.is_empty() {
            tracing::warn!(
                link = %link.id,
                "no SAE pair on this link (no [[sae]] lists it, or peer_sae_ids is empty): it serves no keys"
            );
        }
        links.push(LinkSettings {
            link_id: link.id.clone(),
            side,
            peer: PeerSettings {
                kme_id: link.peer_kme_id.clone(),
                base_url: link.peer_url.trim_end_matches('/').to_owned(),
                tls,
                request_timeout: Duration::from_millis(peer.request_timeout_ms),
                fingerprint: link.peer_certificate_sha256.clone(),
            },
            sae_pairs,
            retention: LinkRetention {
                unconfirmed_grace: Duration::from_secs(link.unconfirmed_grace_s),
                assigned_key_ttl: Duration::from_secs(link.assigned_key_ttl_s),
                history_retention: Duration::from_secs(u64::from(link.history_retention_days) * 86_400),
            },
        });
    }
    let mut ids = SaeIdentityMap::subject_cn();
    for sae in &config.saes {
        if let Some(fp) = &sae.certificate_sha256 {
            ids = ids
                .pin(fp, sae.sae_id.clone())
                .map_err(|e| SettingsError::Sae { sae: sae.sae_id.clone(), message: e.to_string() })?;
        }
    }
    let e = &config.etsi014;
    let mut s = KmeSettings::new(config.site.kme_id.clone(), links);
    s.key_size_default = e.key_size;
    s.min_key_size = e.min_key_size;
    s.max_key_size = e.max_key_size;
    s.max_keys_per_request = e.max_key_per_request;
    s.max_sae_id_count = e.max_sae_id_count;
    s.sae_identities = ids;
    Ok(s)
}

/// Reports the KME's requests and peer state to the metrics.
#[derive(Debug, Clone)]
pub struct Observer(pub Arc<Metrics>);

impl KmeObserver for Observer {
    fn request(&self, endpoint: Endpoint, status: u16, elapsed: Duration) {
        let endpoint = match endpoint {
            Endpoint::Status => EtsiEndpoint::Status,
            Endpoint::EncKeys => EtsiEndpoint::EncKeys,
            Endpoint::DecKeys => EtsiEndpoint::DecKeys,
            Endpoint::EtsiOther => EtsiEndpoint::Other,
            // Peer-channel requests have no metric family of their own.
            _ => return,
        };
        self.0.observe_etsi(endpoint, status, elapsed);
    }

    fn peer_up(&self, link_id: &str, up: bool) {
        self.0.set_peer_sync(link_id, if up { PeerSyncState::Up } else { PeerSyncState::Down });
    }
}
