//! The peer channel: mutual TLS between the two kmds of a link.
//!
//! **Placeholder.** The listener is real (bound before `READY=1`, TLS with the client
//! certificate required from `[peer] ca_cert`), and a caller is recognised as the peer kmd of a
//! link by the link's `peer_certificate_sha256` if set, else by its certificate's subject CN
//! being the link's `peer_kme_id` (`docs/kmd-peer-protocol.md` § 2); anyone else gets 401.
//! Every request from a peer is answered `503 {"message":"peer synchronisation not yet
//! available"}` and `kmd_peer_sync_state` stays `down`.
//!
//! The peer-sync integration (`kmd_kme::Kme::peer_router()` and `Kme::spawn_sync`) replaces
//! [`router`]'s fallback with the sync endpoints (block
//! confirmation: `unconfirmed_blocks`/`check_peer_blocks`/`apply_peer_verdicts`; key assignment:
//! `accept_peer_assignment`), adds the client side (one task per link dialling `peer_url` with
//! `[peer] cert`/`key`), and sets `kmd_peer_sync_state` per link.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use etsi014::server::{ApiError, PeerCertificate};

use crate::config::{Config, parse_fingerprint};

/// The answer of every peer request until peer synchronisation is wired in.
pub const NOT_YET_AVAILABLE: &str = "peer synchronisation not yet available";

#[derive(Debug, Default)]
struct Peers {
    /// Peer KME ID → the links shared with it.
    links: HashMap<String, Vec<String>>,
    /// Pinned certificate → peer KME ID.
    pinned: HashMap<[u8; 32], String>,
    /// Peer KME IDs recognised by CN (those of links without a pin).
    by_cn: HashSet<String>,
}

/// Recognises the peer kmds of the configured links by their client certificates.
#[derive(Debug, Clone, Default)]
pub struct PeerDirectory {
    peers: Arc<Peers>,
}

impl PeerDirectory {
    /// From the `[[link]]` tables.
    pub fn new(config: &Config) -> Self {
        let mut peers = Peers::default();
        for link in &config.links {
            peers.links.entry(link.peer_kme_id.clone()).or_default().push(link.id.clone());
            match link.peer_certificate_sha256.as_deref().and_then(parse_fingerprint) {
                Some(fp) => {
                    peers.pinned.insert(fp, link.peer_kme_id.clone());
                }
                None => {
                    peers.by_cn.insert(link.peer_kme_id.clone());
                }
            }
        }
        Self { peers: Arc::new(peers) }
    }

    /// The peer KME ID and its links, if the certificate is a configured peer's.
    pub fn resolve(&self, cert: &PeerCertificate) -> Option<(String, &[String])> {
        let peer = match self.peers.pinned.get(&cert.sha256_fingerprint()) {
            Some(peer) => peer.clone(),
            None => cert.subject_common_name().filter(|cn| self.peers.by_cn.contains(cn))?,
        };
        let links = self.peers.links.get(&peer)?;
        Some((peer, links.as_slice()))
    }
}

/// The peer channel's router (placeholder: 401 for strangers, 503 for peers).
pub fn router(peers: PeerDirectory) -> Router {
    Router::new().fallback(peer_stub).with_state(peers)
}

async fn peer_stub(State(peers): State<PeerDirectory>, request: Request) -> ApiError {
    let Some(cert) = request.extensions().get::<PeerCertificate>() else {
        return ApiError::unauthorized();
    };
    match peers.resolve(cert) {
        Some((peer, links)) => {
            tracing::debug!(%peer, ?links, path = %request.uri().path(), "peer request answered 503 (not wired in)");
            ApiError::service_unavailable(NOT_YET_AVAILABLE)
        }
        None => {
            tracing::info!(?cert, "peer channel: certificate names no configured peer_kme_id");
            ApiError::unauthorized()
        }
    }
}
