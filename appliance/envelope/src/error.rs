//! The one error type of the crate.
//!
//! Every way a sealed message can fail to open is "not verifiable" to the user: the variants
//! say why in words an operator can act on, but none of them releases a plaintext as authentic.

use std::io;

/// Why a certificate (the signed "Quantum Secured" record) cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateProblem {
    /// The sealed message has no certificate part.
    #[error("the message carries no certificate")]
    Missing,
    /// The certificate part is not the documented JSON record.
    #[error("the certificate is malformed: {0}")]
    Malformed(String),
    /// The Ed25519 signature does not verify under the sender site's public key.
    #[error("the signature does not verify under the sender's public key (forged or altered)")]
    BadSignature,
    /// The certificate was signed for other ciphertext bytes than the ones in the message.
    #[error("the certificate's ciphertext digest does not match the ciphertext in the message")]
    CiphertextDigestMismatch,
    /// The certificate was signed for other outer headers than the ones in the message.
    #[error("the certificate's header digest does not match the message's bound headers")]
    HeaderDigestMismatch,
    /// A field of the certificate contradicts the message's headers.
    #[error("the certificate's {field} does not match the message headers")]
    FieldMismatch {
        /// The certificate field name.
        field: &'static str,
    },
}

/// Everything that can go wrong while sealing or opening an envelope, an at-rest blob or a
/// certificate.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The input is not a QuteMail envelope at all (no `X-QKD-Secure: True`, or not MIME).
    #[error("not a QuteMail envelope: {0}")]
    NotAnEnvelope(String),
    /// The envelope or blob declares a format version this build does not read.
    #[error("format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version found in the input.
        found: String,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// `X-QKD-Algorithm` names an algorithm this build does not know.
    #[error("unknown envelope algorithm {0:?}")]
    UnknownAlgorithm(String),
    /// The envelope is structurally broken (missing header, bad base64, bad MIME layout...).
    #[error("message not verifiable: malformed envelope: {0}")]
    Malformed(String),
    /// An AEAD tag or the one-time MAC did not verify: the bound headers or the ciphertext were
    /// altered, chunks were reordered, or the key does not belong to this message.
    #[error(
        "message not verifiable: the bound headers or the ciphertext were altered, or the key does not \
         belong to this message"
    )]
    AuthenticationFailed,
    /// The ciphertext ends before its final chunk: it was truncated in transit or storage.
    #[error("message not verifiable: the ciphertext ends after {chunks} chunk(s), before its final chunk")]
    Truncated {
        /// Complete non-final chunks read before the end.
        chunks: u64,
    },
    /// A QKD key was supplied under another key ID than the envelope names at that position.
    #[error(
        "wrong key: the envelope names key {expected} at position {position}, but key {given} was supplied"
    )]
    WrongKey {
        /// Index in the envelope's key list (0-based).
        position: usize,
        /// The key ID the envelope names.
        expected: String,
        /// The key ID supplied by the caller.
        given: String,
    },
    /// The caller supplied another number of QKD keys than the envelope names.
    #[error("the envelope names {expected} QKD key(s), but {given} were supplied")]
    KeyCountMismatch {
        /// Keys named by the envelope.
        expected: usize,
        /// Keys supplied.
        given: usize,
    },
    /// The envelope was sealed to another ML-KEM public key than this site's.
    #[error("message sealed to ML-KEM key {expected}, but the supplied site key is {given}")]
    WrongKemKey {
        /// Fingerprint named by the envelope (hex).
        expected: String,
        /// Fingerprint of the supplied key (hex).
        given: String,
    },
    /// The mode needs a key the caller did not supply.
    #[error("mode {mode} needs {what}, which was not supplied")]
    MissingKey {
        /// The mode's name.
        mode: &'static str,
        /// What is missing.
        what: &'static str,
    },
    /// One-time-pad mode refuses messages above its configured maximum (it never switches mode
    /// silently: the caller picks another mode).
    #[error(
        "message of {size} bytes is too large for one-time-pad mode (maximum {max} bytes); choose another mode"
    )]
    OtpTooLarge {
        /// The message size in bytes.
        size: u64,
        /// The configured maximum.
        max: u64,
    },
    /// The supplied QKD keys hold fewer bytes than the mode needs.
    #[error("not enough QKD key material: {needed} bytes needed, {available} supplied")]
    NotEnoughKeyMaterial {
        /// Bytes needed.
        needed: u64,
        /// Bytes supplied.
        available: u64,
    },
    /// A caller-supplied parameter is out of range (chunk size, header value with a line break...).
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// A public or secret key could not be decoded.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The certificate cannot be trusted (the message as a whole is then not verifiable).
    #[error("certificate not verifiable: {0}")]
    CertificateNotVerifiable(#[from] CertificateProblem),
    /// The certificate signer (in memory or an HSM) failed.
    #[error("the certificate could not be signed: {0}")]
    Signing(String),
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    /// Reading the input or writing the output failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the crate was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl EnvelopeError {
    /// Whether this error means "the message (or blob) is not verifiable", as opposed to a
    /// caller mistake or an I/O failure. The UI shows these as a broken seal.
    pub fn is_not_verifiable(&self) -> bool {
        matches!(
            self,
            Self::Malformed(_)
                | Self::AuthenticationFailed
                | Self::Truncated { .. }
                | Self::CertificateNotVerifiable(_)
        )
    }

    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { context, source }
    }
}

/// Result alias of the crate.
pub type Result<T, E = EnvelopeError> = std::result::Result<T, E>;
