//! The per-message "Quantum Secured" certificate: a small signed record of what protected a
//! message (mode, algorithm, QKD key IDs, link and KMEs, the link's QBER and key rate when the
//! key was made), bound to the exact ciphertext and outer headers by their SHA-256 digests and
//! signed with the sender site's Ed25519 key.
//!
//! Canonical encoding (`docs/envelope-format.md` § 9): compact JSON, the fields in the order of
//! [`Certificate`], integers in decimal, `null` for an absent value, every string printable
//! ASCII without `"` or `\` (so no escaping exists). The signature is Ed25519 over
//! `"QuteMail-Certificate/1" || 0x00 || canonical JSON`. A verifier re-encodes the parsed
//! record canonically and checks the signature over that, so whitespace a transport might add
//! changes nothing, while any change of a value breaks the signature.

use serde::{Deserialize, Serialize};

use crate::error::{CertificateProblem, EnvelopeError, Result};
use crate::keys::{CertificateSigner, CertificateVerifyingKey};
use crate::mime::{b64, unb64};

/// Domain separation of certificate signatures.
pub const CERTIFICATE_SIGNATURE_CONTEXT: &[u8] = b"QuteMail-Certificate/1\0";
/// Certificate format version.
pub const CERTIFICATE_VERSION: u32 = 1;
/// Largest certificate part a reader accepts.
pub(crate) const MAX_CERTIFICATE_LEN: usize = 16 * 1024;

/// The signed record. Field order is the canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// Certificate format version ([`CERTIFICATE_VERSION`]).
    pub version: u32,
    /// Mode name: `qaes`, `hybrid`, `otp` or `pqc`.
    pub mode: String,
    /// The `X-QKD-Algorithm` value.
    pub algorithm: String,
    /// QKD key IDs used, in order (empty for `pqc`).
    pub key_ids: Vec<String>,
    /// QKD link ID (`null` for `pqc`).
    pub link_id: Option<String>,
    /// Source KME ID (sender's side of the link).
    pub source_kme_id: Option<String>,
    /// Target KME ID (receiver's side of the link).
    pub target_kme_id: Option<String>,
    /// The link's quantum bit error rate when the key was made, in parts per million.
    pub qber_ppm: Option<u32>,
    /// The link's secret key rate when the key was made, in bits per second.
    pub key_rate_bps: Option<u64>,
    /// Lowercase hex SHA-256 of the ciphertext part's decoded bytes.
    pub ciphertext_sha256: String,
    /// Length of the ciphertext part's decoded bytes.
    pub ciphertext_len: u64,
    /// Lowercase hex SHA-256 of the canonical bound headers (the AAD, § 5).
    pub headers_sha256: String,
    /// The sending site's mail domain.
    pub sender_domain: String,
    /// The ID of the key that signed this certificate.
    pub signing_key_id: String,
    /// When the message was sealed, seconds since the Unix epoch (UTC).
    pub sealed_at: u64,
}

/// A certificate with its signature, as carried in the certificate part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCertificate {
    /// The record.
    pub certificate: Certificate,
    /// Base64 of the 64-byte Ed25519 signature.
    pub signature: String,
}

fn check_text(field: &str, value: &str) -> Result<(), String> {
    if value.bytes().all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\') {
        Ok(())
    } else {
        Err(format!("certificate field {field} must be printable ASCII without quotes or backslashes"))
    }
}

impl Certificate {
    fn check_fields(&self) -> Result<(), String> {
        for (name, value) in [
            ("mode", Some(&self.mode)),
            ("algorithm", Some(&self.algorithm)),
            ("link_id", self.link_id.as_ref()),
            ("source_kme_id", self.source_kme_id.as_ref()),
            ("target_kme_id", self.target_kme_id.as_ref()),
            ("ciphertext_sha256", Some(&self.ciphertext_sha256)),
            ("headers_sha256", Some(&self.headers_sha256)),
            ("sender_domain", Some(&self.sender_domain)),
            ("signing_key_id", Some(&self.signing_key_id)),
        ] {
            if let Some(v) = value {
                check_text(name, v)?;
            }
        }
        for id in &self.key_ids {
            check_text("key_ids", id)?;
        }
        Ok(())
    }

    /// The canonical encoding that is signed.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>> {
        self.check_fields().map_err(EnvelopeError::InvalidParameter)?;
        serde_json::to_vec(self).map_err(|e| EnvelopeError::InvalidParameter(e.to_string()))
    }

    /// Signs the record.
    pub fn sign(self, signer: &dyn CertificateSigner) -> Result<SignedCertificate> {
        if self.signing_key_id != signer.key_id() {
            return Err(EnvelopeError::InvalidParameter(
                "signing_key_id differs from the signer's key ID".into(),
            ));
        }
        let mut message = CERTIFICATE_SIGNATURE_CONTEXT.to_vec();
        message.extend_from_slice(&self.canonical_bytes()?);
        let signature = signer.sign(&message).map_err(|e| EnvelopeError::Signing(e.0))?;
        Ok(SignedCertificate { certificate: self, signature: b64(&signature) })
    }
}

impl SignedCertificate {
    /// The JSON carried in the certificate part.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        self.certificate.check_fields().map_err(EnvelopeError::InvalidParameter)?;
        serde_json::to_vec(self).map_err(|e| EnvelopeError::InvalidParameter(e.to_string()))
    }

    /// Parses the JSON of a certificate part (without verifying it).
    pub fn from_json(bytes: &[u8]) -> Result<Self, CertificateProblem> {
        let parsed: Self =
            serde_json::from_slice(bytes).map_err(|e| CertificateProblem::Malformed(e.to_string()))?;
        parsed.certificate.check_fields().map_err(CertificateProblem::Malformed)?;
        if parsed.certificate.version != CERTIFICATE_VERSION {
            return Err(CertificateProblem::Malformed(format!(
                "certificate version {} is not supported",
                parsed.certificate.version
            )));
        }
        Ok(parsed)
    }

    /// Checks the signature under the sender site's public key.
    pub fn verify_signature(&self, key: &CertificateVerifyingKey) -> Result<(), CertificateProblem> {
        let signature: [u8; 64] = unb64(&self.signature)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| CertificateProblem::Malformed("the signature is not 64 bytes of base64".into()))?;
        let canonical =
            self.certificate.canonical_bytes().map_err(|e| CertificateProblem::Malformed(e.to_string()))?;
        let mut message = CERTIFICATE_SIGNATURE_CONTEXT.to_vec();
        message.extend_from_slice(&canonical);
        if key.verify(&message, &signature) { Ok(()) } else { Err(CertificateProblem::BadSignature) }
    }
}
