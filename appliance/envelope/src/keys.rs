//! Keys: QKD keys handed out by kmd, the site's ML-KEM-768 key pair and its Ed25519
//! certificate-signing key, with the encodings used for configuration and directory exchange.
//!
//! Public keys are exchanged as PEM `PUBLIC KEY` (an X.509 SubjectPublicKeyInfo, the form
//! OpenSSL 3.5 and other tools read: ML-KEM-768 under OID 2.16.840.1.101.3.4.4.2, Ed25519
//! under 1.3.101.112) or as base64 of the raw key. Secret keys leave this crate only as seeds in
//! [`Zeroizing`] buffers, for the caller to wrap with the HSM.

use ml_kem::{DecapsulationKey768, EncapsulationKey768, KeyExport as _};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{EnvelopeError, Result};
use crate::mime::{b64, unb64};

/// Length of an ML-KEM-768 encapsulation (public) key.
pub const KEM_PUBLIC_KEY_LEN: usize = 1184;
/// Length of an ML-KEM-768 ciphertext.
pub const KEM_CIPHERTEXT_LEN: usize = 1088;
/// Length of an ML-KEM-768 secret key seed (d || z, FIPS 203 § 6.1).
pub const KEM_SEED_LEN: usize = 64;

/// A QKD key as delivered by kmd over ETSI GS QKD 014: its key ID (a UUID) and its bytes.
pub struct QkdKey {
    id: uuid::Uuid,
    bytes: Zeroizing<Vec<u8>>,
}

impl QkdKey {
    /// Wraps a key from kmd. The bytes are zeroized when the key is dropped.
    pub fn new(id: uuid::Uuid, bytes: Zeroizing<Vec<u8>>) -> Self {
        Self { id, bytes }
    }

    /// The ETSI key ID.
    pub fn id(&self) -> uuid::Uuid {
        self.id
    }

    /// The key bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::fmt::Debug for QkdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QkdKey").field("id", &self.id).field("len", &self.bytes.len()).finish_non_exhaustive()
    }
}

// SubjectPublicKeyInfo prefixes: SEQUENCE { SEQUENCE { OID }, BIT STRING (0 unused bits) }.
const MLKEM768_SPKI_PREFIX: [u8; 22] = [
    0x30, 0x82, 0x04, 0xb2, 0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x04, 0x02,
    0x03, 0x82, 0x04, 0xa1, 0x00,
];
const ED25519_SPKI_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

fn pem_encode(der: &[u8]) -> String {
    let body = b64(der);
    let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END PUBLIC KEY-----\n");
    out
}

fn pem_decode(pem: &str) -> Result<Vec<u8>> {
    let body = pem
        .trim()
        .strip_prefix("-----BEGIN PUBLIC KEY-----")
        .and_then(|r| r.strip_suffix("-----END PUBLIC KEY-----"))
        .ok_or_else(|| EnvelopeError::InvalidKey("not a PEM PUBLIC KEY block".into()))?;
    unb64(body).ok_or_else(|| EnvelopeError::InvalidKey("the PEM body is not base64".into()))
}

fn spki_key<'a>(der: &'a [u8], prefix: &[u8], what: &str) -> Result<&'a [u8]> {
    der.strip_prefix(prefix)
        .ok_or_else(|| EnvelopeError::InvalidKey(format!("not an {what} SubjectPublicKeyInfo")))
}

/// A site's ML-KEM-768 public (encapsulation) key, to which peers seal `hybrid` and `pqc` mail.
#[derive(Clone)]
pub struct KemPublicKey {
    key: EncapsulationKey768,
    bytes: Vec<u8>,
}

impl KemPublicKey {
    /// Decodes the raw 1184-byte encapsulation key.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let array = ml_kem::Key::<EncapsulationKey768>::try_from(bytes).map_err(|_| {
            EnvelopeError::InvalidKey(format!("an ML-KEM-768 public key has {KEM_PUBLIC_KEY_LEN} bytes"))
        })?;
        let key = EncapsulationKey768::new(&array)
            .map_err(|_| EnvelopeError::InvalidKey("the ML-KEM-768 public key fails validation".into()))?;
        Ok(Self { key, bytes: bytes.to_vec() })
    }

    /// The raw 1184-byte encapsulation key.
    pub fn to_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The key fingerprint: the first 16 bytes of SHA-256 of the raw key, which the envelope
    /// names in `X-QKD-KEM-Key` so that the receiver picks (or rejects) the right secret key.
    pub fn fingerprint(&self) -> [u8; 16] {
        let digest = Sha256::digest(&self.bytes);
        let mut fp = [0u8; 16];
        fp.copy_from_slice(&digest[..16]);
        fp
    }

    /// Base64 of the raw key.
    pub fn to_base64(&self) -> String {
        b64(&self.bytes)
    }

    /// Decodes base64 of the raw key.
    pub fn from_base64(text: &str) -> Result<Self> {
        Self::from_bytes(&unb64(text).ok_or_else(|| EnvelopeError::InvalidKey("not base64".into()))?)
    }

    /// PEM `PUBLIC KEY` (SubjectPublicKeyInfo, id-alg-ml-kem-768).
    pub fn to_pem(&self) -> String {
        pem_encode(&[&MLKEM768_SPKI_PREFIX[..], &self.bytes].concat())
    }

    /// Decodes PEM `PUBLIC KEY`.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let der = pem_decode(pem)?;
        Self::from_bytes(spki_key(&der, &MLKEM768_SPKI_PREFIX, "ML-KEM-768")?)
    }

    pub(crate) fn encapsulate(&self, m: &[u8; 32]) -> (Vec<u8>, Zeroizing<[u8; 32]>) {
        let (ct, shared) = self.key.encapsulate_deterministic(&(*m).into());
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&shared);
        (ct.to_vec(), secret)
    }
}

impl std::fmt::Debug for KemPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KemPublicKey({})", hex::encode(self.fingerprint()))
    }
}

/// A site's ML-KEM-768 secret (decapsulation) key. Zeroized on drop.
pub struct SiteKemSecretKey {
    key: DecapsulationKey768,
    public: KemPublicKey,
}

impl SiteKemSecretKey {
    /// Generates a key pair from the operating system's random number generator.
    pub fn generate() -> Result<Self> {
        let mut seed = Zeroizing::new([0u8; KEM_SEED_LEN]);
        getrandom::fill(seed.as_mut()).map_err(|e| EnvelopeError::Random(e.to_string()))?;
        Self::from_seed(&seed)
    }

    /// Rebuilds the key pair from its 64-byte seed (d || z of FIPS 203), e.g. after the HSM
    /// unwrapped it.
    pub fn from_seed(seed: &Zeroizing<[u8; KEM_SEED_LEN]>) -> Result<Self> {
        let key = DecapsulationKey768::from_seed((**seed).into());
        let public = KemPublicKey::from_bytes(&key.encapsulation_key().to_bytes())?;
        Ok(Self { key, public })
    }

    /// The 64-byte seed, for the caller to wrap with the HSM. Never write it unwrapped.
    pub fn to_seed(&self) -> Result<Zeroizing<[u8; KEM_SEED_LEN]>> {
        let seed = self
            .key
            .to_seed()
            .ok_or_else(|| EnvelopeError::InvalidKey("this ML-KEM key was not made from a seed".into()))?;
        let mut out = Zeroizing::new([0u8; KEM_SEED_LEN]);
        out.copy_from_slice(&seed);
        Ok(out)
    }

    /// The matching public key.
    pub fn public_key(&self) -> &KemPublicKey {
        &self.public
    }

    pub(crate) fn decapsulate(&self, ciphertext: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        use ml_kem::Decapsulate as _;
        let ct = ml_kem::Ciphertext::<ml_kem::MlKem768>::try_from(ciphertext).map_err(|_| {
            EnvelopeError::Malformed(format!("the KEM ciphertext must have {KEM_CIPHERTEXT_LEN} bytes"))
        })?;
        let shared = self.key.decapsulate(&ct);
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&shared);
        Ok(secret)
    }
}

impl std::fmt::Debug for SiteKemSecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SiteKemSecretKey({})", hex::encode(self.public.fingerprint()))
    }
}

/// A site's Ed25519 public key that verifies its certificates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CertificateVerifyingKey {
    key: ed25519_dalek::VerifyingKey,
}

impl CertificateVerifyingKey {
    /// Decodes the raw 32-byte Ed25519 public key.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| EnvelopeError::InvalidKey("an Ed25519 public key has 32 bytes".into()))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&array)
            .map_err(|_| EnvelopeError::InvalidKey("not a valid Ed25519 public key".into()))?;
        Ok(Self { key })
    }

    /// The raw 32-byte public key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Base64 of the raw key.
    pub fn to_base64(&self) -> String {
        b64(&self.to_bytes())
    }

    /// Decodes base64 of the raw key.
    pub fn from_base64(text: &str) -> Result<Self> {
        Self::from_bytes(&unb64(text).ok_or_else(|| EnvelopeError::InvalidKey("not base64".into()))?)
    }

    /// PEM `PUBLIC KEY` (SubjectPublicKeyInfo, id-Ed25519).
    pub fn to_pem(&self) -> String {
        pem_encode(&[&ED25519_SPKI_PREFIX[..], &self.to_bytes()].concat())
    }

    /// Decodes PEM `PUBLIC KEY`.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let der = pem_decode(pem)?;
        Self::from_bytes(spki_key(&der, &ED25519_SPKI_PREFIX, "Ed25519")?)
    }

    /// Strict Ed25519 verification (rejects small-order keys and non-canonical signatures).
    pub(crate) fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        self.key.verify_strict(message, &sig).is_ok()
    }
}

impl std::fmt::Debug for CertificateVerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertificateVerifyingKey({})", self.to_base64())
    }
}

/// The error a [`CertificateSigner`] returns (an HSM session failure, for instance).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SignerError(pub String);

/// Signs certificates. The in-memory [`InMemorySigner`] implements it today; a PKCS#11 HSM
/// signer can implement it later without touching the envelope code.
pub trait CertificateSigner {
    /// The signing key's ID, written into every certificate (e.g. `"a.example/2026-11"`).
    fn key_id(&self) -> &str;
    /// An Ed25519 signature of `message`.
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignerError>;
}

/// An Ed25519 signing key held in memory (zeroized on drop).
pub struct InMemorySigner {
    key_id: String,
    key: ed25519_dalek::SigningKey,
}

impl InMemorySigner {
    /// Builds the signer from a 32-byte Ed25519 seed (RFC 8032 secret key).
    pub fn from_seed(key_id: impl Into<String>, seed: &Zeroizing<[u8; 32]>) -> Self {
        Self { key_id: key_id.into(), key: ed25519_dalek::SigningKey::from_bytes(seed) }
    }

    /// Generates a new key from the operating system's random number generator.
    pub fn generate(key_id: impl Into<String>) -> Result<Self> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| EnvelopeError::Random(e.to_string()))?;
        Ok(Self::from_seed(key_id, &seed))
    }

    /// The 32-byte seed, for the caller to wrap with the HSM. Never write it unwrapped.
    pub fn to_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.key.to_bytes())
    }

    /// The public key that verifies this signer's certificates.
    pub fn verifying_key(&self) -> CertificateVerifyingKey {
        CertificateVerifyingKey { key: self.key.verifying_key() }
    }
}

impl CertificateSigner for InMemorySigner {
    fn key_id(&self) -> &str {
        &self.key_id
    }
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignerError> {
        use ed25519_dalek::Signer as _;
        Ok(self.key.sign(message).to_bytes())
    }
}

impl std::fmt::Debug for InMemorySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InMemorySigner({})", self.key_id)
    }
}

/// A site's long-term keys: the ML-KEM-768 key pair peers seal to, and the Ed25519 key that
/// signs the site's certificates.
#[derive(Debug)]
pub struct SiteKeySet {
    /// The ML-KEM-768 key pair.
    pub kem: SiteKemSecretKey,
    /// The certificate signing key.
    pub signer: InMemorySigner,
}

impl SiteKeySet {
    /// Generates both keys from the operating system's random number generator.
    pub fn generate(signing_key_id: impl Into<String>) -> Result<Self> {
        Ok(Self { kem: SiteKemSecretKey::generate()?, signer: InMemorySigner::generate(signing_key_id)? })
    }
}
