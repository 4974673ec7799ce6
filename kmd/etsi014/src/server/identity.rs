//! Who is calling: the peer's client certificate and the SAE ID it maps to.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use http::request::Parts;
use rustls_pki_types::CertificateDer;

use super::ApiError;

/// The client certificate the peer authenticated with (the leaf), inserted by the server into
/// every request's extensions. It has been verified against the configured client CA.
#[derive(Clone)]
pub struct PeerCertificate {
    der: Arc<CertificateDer<'static>>,
    fingerprint: [u8; 32],
}

impl PeerCertificate {
    /// Wraps a DER certificate.
    pub fn new(der: CertificateDer<'static>) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(digest.as_ref());
        Self { der: Arc::new(der), fingerprint }
    }

    /// The certificate, DER.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// SHA-256 over the DER certificate.
    pub fn sha256_fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The SHA-256 fingerprint as lower-case hex without separators (`openssl x509 -noout
    /// -fingerprint -sha256` prints the same digits, upper-case with colons).
    pub fn fingerprint_hex(&self) -> String {
        self.fingerprint.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The subject's common name (OID 2.5.4.3), if the subject has exactly one, as a
    /// UTF8String, PrintableString or IA5String.
    pub fn subject_common_name(&self) -> Option<String> {
        subject_common_name(self.der.as_ref())
    }
}

impl fmt::Debug for PeerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCertificate")
            .field("subject_cn", &self.subject_common_name())
            .field("sha256", &self.fingerprint_hex())
            .finish()
    }
}

/// The TCP peer address of the connection, inserted into every request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// A fingerprint given to [`SaeIdentityMap::pin`] is not 64 hex digits.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid SHA-256 certificate fingerprint {0:?} (want 64 hex digits, colons allowed)")]
pub struct InvalidFingerprint(pub String);

/// Maps an authenticated client certificate to the SAE ID it speaks for.
///
/// Two sources, looked up in this order:
/// 1. **Pinned fingerprints**: the certificate's SHA-256 fingerprint maps to an SAE ID given in
///    the configuration. Use it for certificates whose subject you do not control.
/// 2. **Subject CN** (when enabled): the certificate's subject common name *is* the SAE ID.
///    The client CA vouches for it, so enable this only for a CA that issues SAE certificates
///    (not a general-purpose CA). A subject with no CN, or with several, maps to nothing.
///
/// A certificate that maps to nothing is answered 401. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct SaeIdentityMap {
    pinned: Arc<HashMap<[u8; 32], String>>,
    subject_cn: bool,
}

impl SaeIdentityMap {
    /// SAE ID = the certificate's subject CN (plus any pins added later).
    pub fn subject_cn() -> Self {
        Self { pinned: Arc::default(), subject_cn: true }
    }

    /// Only pinned fingerprints are recognised.
    pub fn pinned_only() -> Self {
        Self::default()
    }

    /// Adds a pin: the certificate with this SHA-256 fingerprint (hex, any case, colons
    /// allowed) speaks for `sae_id`.
    pub fn pin(
        mut self,
        fingerprint_hex: &str,
        sae_id: impl Into<String>,
    ) -> Result<Self, InvalidFingerprint> {
        let digits: Vec<u8> = fingerprint_hex.bytes().filter(|b| *b != b':').collect();
        let invalid = || InvalidFingerprint(fingerprint_hex.to_owned());
        if digits.len() != 64 {
            return Err(invalid());
        }
        let mut fingerprint = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| invalid())?;
            fingerprint[i] = u8::from_str_radix(text, 16).map_err(|_| invalid())?;
        }
        Arc::make_mut(&mut self.pinned).insert(fingerprint, sae_id.into());
        Ok(self)
    }

    /// The SAE ID the certificate speaks for, if any.
    pub fn resolve(&self, cert: &PeerCertificate) -> Option<String> {
        if let Some(sae) = self.pinned.get(&cert.fingerprint) {
            return Some(sae.clone());
        }
        if self.subject_cn { cert.subject_common_name().filter(|cn| !cn.is_empty()) } else { None }
    }
}

/// Extractor: the calling SAE's ID, from its client certificate through the state's
/// [`SaeIdentityMap`]. Rejects with 401 (in the spec's error format) when there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerSae(pub String);

impl<S> FromRequestParts<S> for CallerSae
where
    SaeIdentityMap: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Some(cert) = parts.extensions.get::<PeerCertificate>() else {
            tracing::warn!("request without a client certificate reached an SAE handler");
            return Err(ApiError::unauthorized());
        };
        match SaeIdentityMap::from_ref(state).resolve(cert) {
            Some(sae) => Ok(Self(sae)),
            None => {
                tracing::info!(?cert, "client certificate speaks for no known SAE");
                Err(ApiError::unauthorized())
            }
        }
    }
}

/// One DER TLV: (tag, contents, rest). Single-byte tags, definite lengths up to 4 bytes.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, contents, rest) = tlv(input)?;
    (t == tag).then_some((contents, rest))
}

/// The subject CN of an X.509 certificate (RFC 5280 §4.1): a deliberately small DER walk over
/// a certificate that rustls has already verified.
fn subject_common_name(der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const CN: [u8; 3] = [0x55, 0x04, 0x03];
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2; // [0] EXPLICIT version
    }
    rest = expect(rest, 0x02)?.1; // serialNumber
    rest = expect(rest, SEQUENCE)?.1; // signature
    rest = expect(rest, SEQUENCE)?.1; // issuer
    rest = expect(rest, SEQUENCE)?.1; // validity
    let (mut rdns, _) = expect(rest, SEQUENCE)?; // subject
    let mut found = None;
    while !rdns.is_empty() {
        let (set, after) = expect(rdns, SET)?;
        rdns = after;
        let mut atvs = set;
        while !atvs.is_empty() {
            let (atv, after) = expect(atvs, SEQUENCE)?;
            atvs = after;
            let (oid, value) = expect(atv, 0x06)?;
            if oid != CN {
                continue;
            }
            if found.is_some() {
                return None; // several CNs: ambiguous
            }
            let (tag, text, _) = tlv(value)?;
            // UTF8String, PrintableString, IA5String.
            if !matches!(tag, 0x0c | 0x13 | 0x16) {
                return None;
            }
            found = Some(String::from_utf8(text.to_vec()).ok()?);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_bounds() {
        assert_eq!(tlv(&[0x02, 0x01, 0x05, 0xff]), Some((0x02, &[0x05][..], &[0xff][..])));
        assert_eq!(tlv(&[0x02, 0x02, 0x05]), None);
        assert_eq!(tlv(&[0x30, 0x81, 0x01, 0x00]), Some((0x30, &[0x00][..], &[][..])));
        assert_eq!(tlv(&[0x30, 0x80]), None); // indefinite length
        assert_eq!(tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(tlv(&[0x1f, 0x01, 0x00]), None);
        assert_eq!(tlv(&[]), None);
    }

    #[test]
    fn garbage_has_no_cn() {
        assert_eq!(subject_common_name(b""), None);
        assert_eq!(subject_common_name(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }

    #[test]
    fn pins_parse() {
        let hex = "AB:".repeat(31) + "AB";
        let map = SaeIdentityMap::pinned_only().pin(&hex, "x").expect("valid");
        assert_eq!(map.pinned.get(&[0xab; 32]).map(String::as_str), Some("x"));
        assert!(SaeIdentityMap::pinned_only().pin("abcd", "x").is_err());
        assert!(SaeIdentityMap::pinned_only().pin(&"zz".repeat(32), "x").is_err());
    }
}
