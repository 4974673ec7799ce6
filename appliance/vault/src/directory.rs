//! The peer sites this site exchanges quantum-secured mail with.

use qutemail_envelope::{CertificateVerifyingKey, KemPublicKey};

use crate::VaultError;
use crate::site_keys::SiteCard;

/// A peer site: its mail domain, its gateway's SAE ID at its kmd, its KME ID, and its public
/// keys (from its [`SiteCard`]).
#[derive(Debug, Clone)]
pub struct PeerSite {
    /// The peer's mail domain (lower case).
    pub domain: String,
    /// The peer gateway's SAE ID (e.g. `B-mail`): the slave of our `enc_keys`, the master of our
    /// `dec_keys`.
    pub sae_id: String,
    /// The peer's KME ID, as kmd names it in the `qutemail_link` extension and the envelope's
    /// `X-QKD-Source-KME`.
    pub kme_id: String,
    /// What the peer's messages are sealed to.
    pub kem_public_key: KemPublicKey,
    /// What verifies the peer's certificates.
    pub certificate_key: CertificateVerifyingKey,
}

impl PeerSite {
    /// A peer from its card and the IDs the site's configuration gives it.
    pub fn from_card(card: &SiteCard, sae_id: &str, kme_id: &str) -> Result<Self, VaultError> {
        Ok(Self {
            domain: card.domain.to_ascii_lowercase(),
            sae_id: sae_id.to_owned(),
            kme_id: kme_id.to_owned(),
            kem_public_key: card.kem_public_key()?,
            certificate_key: card.certificate_key()?,
        })
    }
}

/// The peers, looked up by mail domain (outbound) or by KME ID (inbound).
#[derive(Debug, Clone, Default)]
pub struct SiteDirectory {
    peers: Vec<PeerSite>,
}

impl SiteDirectory {
    /// A directory of `peers`; a domain or KME ID listed twice is an error.
    pub fn new(peers: Vec<PeerSite>) -> Result<Self, VaultError> {
        for (i, p) in peers.iter().enumerate() {
            if peers[..i].iter().any(|q| q.domain == p.domain || q.kme_id == p.kme_id) {
                return Err(VaultError::Directory(format!(
                    "peer {} (KME {}) is listed twice",
                    p.domain, p.kme_id
                )));
            }
        }
        Ok(Self { peers })
    }

    /// The peer serving mail `domain`, if it shares a QKD link with this site.
    pub fn by_domain(&self, domain: &str) -> Option<&PeerSite> {
        self.peers.iter().find(|p| p.domain.eq_ignore_ascii_case(domain))
    }

    /// The peer whose KME is `kme_id`.
    pub fn by_kme(&self, kme_id: &str) -> Option<&PeerSite> {
        self.peers.iter().find(|p| p.kme_id == kme_id)
    }

    /// Every peer.
    pub fn peers(&self) -> &[PeerSite] {
        &self.peers
    }
}
