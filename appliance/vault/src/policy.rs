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

/// The site's rules for choosing a protection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectionPolicy {
    /// Protection for mail to a site sharing a QKD link, unless the sender asks for another
    /// QKD mode (default `hybrid`).
    #[serde(default = "default_linked")]
    pub linked_default: Protection,
    /// Whether a message may fall back to `pqc` when kmd has no keys (default false: the
    /// message waits in the queue instead).
    #[serde(default)]
    pub allow_pqc_fallback: bool,
    /// Largest message (inner MIME bytes) sent with a one-time pad (default 64 KiB).
    #[serde(default = "default_otp_max")]
    pub otp_max_bytes: usize,
}

fn default_linked() -> Protection {
    Protection::Hybrid
}

fn default_otp_max() -> usize {
    64 * 1024
}

impl Default for ProtectionPolicy {
    fn default() -> Self {
        Self { linked_default: default_linked(), allow_pqc_fallback: false, otp_max_bytes: default_otp_max() }
    }
}

impl ProtectionPolicy {
    /// The protection for a message to `peer` (`None`: a domain with no QKD link), given what
    /// the sender asked for (`None`: the site default).
    pub fn choose(
        &self,
        peer_linked: bool,
        requested: Option<Protection>,
    ) -> Result<Protection, PolicyRefusal> {
        match (peer_linked, requested) {
            (false, None | Some(Protection::Normal)) => Ok(Protection::Normal),
            (false, Some(p)) => Err(PolicyRefusal::NoLink(p)),
            (true, None) => Ok(self.linked_default),
            (true, Some(Protection::Pqc)) if !self.allow_pqc_fallback => Err(PolicyRefusal::PqcNotAllowed),
            (true, Some(p)) => Ok(p),
        }
    }
}

/// Why the policy refuses a requested protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    /// The recipient's domain shares no QKD link with this site.
    #[error("{0} protection needs a QKD link to the recipient's site, and there is none")]
    NoLink(Protection),
    /// `pqc` was asked for but the site does not allow it.
    #[error("this site's policy does not allow ML-KEM-only (pqc) protection")]
    PqcNotAllowed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linked_peers_get_the_default_and_others_normal() {
        let p = ProtectionPolicy::default();
        assert_eq!(p.choose(true, None), Ok(Protection::Hybrid));
        assert_eq!(p.choose(false, None), Ok(Protection::Normal));
        assert_eq!(p.choose(true, Some(Protection::Otp)), Ok(Protection::Otp));
        assert_eq!(p.choose(false, Some(Protection::Qaes)), Err(PolicyRefusal::NoLink(Protection::Qaes)));
        assert_eq!(p.choose(true, Some(Protection::Pqc)), Err(PolicyRefusal::PqcNotAllowed));
        let lenient = ProtectionPolicy { allow_pqc_fallback: true, ..p };
        assert_eq!(lenient.choose(true, Some(Protection::Pqc)), Ok(Protection::Pqc));
    }
}
