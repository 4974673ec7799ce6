//! Which protection a message gets: the site's policy and the peer directory.

use serde::{Deserialize, Serialize};

/// How a message is protected in transit (at rest every message is sealed anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protection {
    /// QKD key and ML-KEM-768 shared secret through HKDF into AES-256-GCM: safe if either holds.
    Hybrid,
    /// QKD key alone through HKDF into AES-256-GCM.
    Qaes,
    /// One-time pad with a one-time MAC (small messages only).
    Otp,
    /// ML-KEM-768 alone: the fallback when QKD keys run out, where the policy allows it.
    Pqc,
    /// No QKD: TLS in transit, sealed at rest.
    Normal,
}

impl Protection {
    /// The name used in configuration, APIs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Protection::Hybrid => "hybrid",
            Protection::Qaes => "qaes",
            Protection::Otp => "otp",
            Protection::Pqc => "pqc",
            Protection::Normal => "normal",
        }
    }

    /// Whether the mode needs keys from kmd.
    pub fn uses_qkd(self) -> bool {
        matches!(self, Protection::Hybrid | Protection::Qaes | Protection::Otp)
    }
}

impl std::fmt::Display for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a message for a linked peer when kmd has no QKD keys for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeysExhausted {
    /// It waits in the queue (a temporary failure, retried) until keys return: never weaker.
    #[default]
    Defer,
    /// It is sealed with ML-KEM-768 alone (`pqc`) and sent now. Also lets senders ask for
    /// `pqc` explicitly. A sender's explicit QKD mode is never replaced: it waits.
    Pqc,
    /// It is refused: the sender gets a delivery status notification at once.
    Refuse,
}

/// The site's rules for choosing a protection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectionPolicy {
    /// Protection for mail to a site sharing a QKD link, unless the sender asks for another
    /// QKD mode (default `hybrid`).
    #[serde(default = "default_linked")]
    pub linked_default: Protection,
    /// What happens when kmd has no keys for a peer (default `defer`: the message waits in the
    /// queue). A peer's own rule ([`Self::per_peer`]) takes precedence.
    #[serde(default)]
    pub keys_exhausted: KeysExhausted,
    /// Largest message (inner MIME bytes) sent with a one-time pad (default 64 KiB).
    #[serde(default = "default_otp_max")]
    pub otp_max_bytes: usize,
    /// Per-peer `keys_exhausted` rules by lower-case domain (from each `[[peer]]` table, not
    /// from `[policy]`).
    #[serde(skip)]
    pub per_peer: std::collections::BTreeMap<String, KeysExhausted>,
}

fn default_linked() -> Protection {
    Protection::Hybrid
}

fn default_otp_max() -> usize {
    64 * 1024
}

impl Default for ProtectionPolicy {
    fn default() -> Self {
        Self {
            linked_default: default_linked(),
            keys_exhausted: KeysExhausted::Defer,
            otp_max_bytes: default_otp_max(),
            per_peer: Default::default(),
        }
    }
}

impl ProtectionPolicy {
    /// What happens to mail for the linked peer `domain` when kmd has no keys for it.
    pub fn keys_exhausted_for(&self, domain: &str) -> KeysExhausted {
        self.per_peer.get(&domain.to_ascii_lowercase()).copied().unwrap_or(self.keys_exhausted)
    }

    /// The protection for a message to `linked_peer` (`None`: a domain with no QKD link),
    /// given what the sender asked for (`None`: the site default). `pqc` may be asked for only
    /// where the peer's rule is the `pqc` fallback.
    pub fn choose(
        &self,
        linked_peer: Option<&str>,
        requested: Option<Protection>,
    ) -> Result<Protection, PolicyRefusal> {
        match (linked_peer, requested) {
            (None, None | Some(Protection::Normal)) => Ok(Protection::Normal),
            (None, Some(p)) => Err(PolicyRefusal::NoLink(p)),
            (Some(_), None) => Ok(self.linked_default),
            (Some(peer), Some(Protection::Pqc)) if self.keys_exhausted_for(peer) != KeysExhausted::Pqc => {
                Err(PolicyRefusal::PqcNotAllowed)
            }
            (Some(_), Some(p)) => Ok(p),
        }
    }
}

/// Why the policy refuses a requested protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    /// The recipient's domain shares no QKD link with this site.
    #[error("{0} protection needs a QKD link to the recipient's site, and there is none")]
    NoLink(Protection),
    /// `pqc` was asked for but the site's rule for this peer is not the `pqc` fallback.
    #[error("this site's policy does not allow ML-KEM-only (pqc) protection for this peer")]
    PqcNotAllowed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linked_peers_get_the_default_and_others_normal() {
        let p = ProtectionPolicy::default();
        let b = Some("b.test");
        assert_eq!(p.choose(b, None), Ok(Protection::Hybrid));
        assert_eq!(p.choose(None, None), Ok(Protection::Normal));
        assert_eq!(p.choose(b, Some(Protection::Otp)), Ok(Protection::Otp));
        assert_eq!(p.choose(None, Some(Protection::Qaes)), Err(PolicyRefusal::NoLink(Protection::Qaes)));
        assert_eq!(p.choose(b, Some(Protection::Pqc)), Err(PolicyRefusal::PqcNotAllowed));
        let lenient = ProtectionPolicy { keys_exhausted: KeysExhausted::Pqc, ..p.clone() };
        assert_eq!(lenient.choose(b, Some(Protection::Pqc)), Ok(Protection::Pqc));
    }

    #[test]
    fn a_peer_rule_overrides_the_site_default() {
        let mut p = ProtectionPolicy { keys_exhausted: KeysExhausted::Pqc, ..ProtectionPolicy::default() };
        p.per_peer.insert("c.test".into(), KeysExhausted::Refuse);
        assert_eq!(p.keys_exhausted_for("B.test"), KeysExhausted::Pqc);
        assert_eq!(p.keys_exhausted_for("C.TEST"), KeysExhausted::Refuse);
        assert_eq!(p.choose(Some("c.test"), Some(Protection::Pqc)), Err(PolicyRefusal::PqcNotAllowed));
        let parsed: ProtectionPolicy = toml::from_str("keys_exhausted = \"refuse\"").unwrap();
        assert_eq!(parsed.keys_exhausted, KeysExhausted::Refuse);
        assert!(toml::from_str::<ProtectionPolicy>("keys_exhausted = \"weaker\"").is_err());
        assert!(toml::from_str::<ProtectionPolicy>("allow_pqc_fallback = true").is_err());
    }
}
