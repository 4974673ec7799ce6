//! The QuteMail message envelope: how mail between two sites is sealed with QKD keys, how mail
//! is kept at rest, and the signed "Quantum Secured" certificate of each message.
//!
//! The crate is sans-I/O crypto and format: no network, no HSM, no kmd calls. Callers fetch QKD
//! keys from kmd (ETSI GS QKD 014), unwrap site keys with the HSM, and pass the bytes in. The
//! normative description, with test vectors, is `docs/envelope-format.md`; this crate is its
//! reference implementation and `tests/spec_vectors.rs` replays the vectors.
//!
//! # Modes
//! | mode | key material | cipher |
//! | --- | --- | --- |
//! | [`Mode::Qaes`] | QKD key(s) | HKDF-SHA256 → AES-256-GCM STREAM |
//! | [`Mode::Hybrid`] | QKD key(s) ‖ ML-KEM-768 shared secret | HKDF-SHA256 → AES-256-GCM STREAM |
//! | [`Mode::Otp`] | QKD pad, as long as the message + 32 | XOR + Poly1305 one-time MAC |
//! | [`Mode::Pqc`] | ML-KEM-768 shared secret | HKDF-SHA256 → AES-256-GCM STREAM |
//! | `normal` | a random data key (HSM-wrapped by the caller) | [`at_rest`] blob |
//!
//! # Streaming and when plaintext is authentic
//! [`seal`] reads `impl Read` and writes `impl Write` holding one chunk (64 KiB by default) at a
//! time, so a 25 MB attachment is never buffered whole. Opening is two-phase:
//! [`SealedMessage::read_header`] parses the outer headers (mode, key IDs, link and KME IDs,
//! salt, KEM ciphertext) so that the caller can fetch the keys, then [`SealedMessage::open`]
//! decrypts. Plaintext is released chunk by chunk as each chunk verifies; **it is authentic as a
//! whole only once `open` returns `Ok`**, because only the final chunk proves that nothing was
//! cut off. Callers that cannot retract released data use [`SealedMessage::open_to_vec`].
//!
//! # Randomness
//! [`SealRandomness`] (salt, ML-KEM encapsulation seed) and [`at_rest::AtRestParams`] (nonce
//! prefix) are explicit values; production builds them with `generate()` from the operating
//! system's RNG, tests and vectors pass fixed values.
//!
//! # Key material
//! QKD keys, KEM seeds and shared secrets, HKDF output, OTP pads and plaintext buffers live in
//! [`zeroize::Zeroizing`] or zeroize-on-drop types. One limit: `ring`'s expanded AES key
//! schedule is not zeroized on drop (ring offers no hook); the `rustcrypto` backend zeroizes it.
//!
//! # AES-GCM backend
//! Feature `ring` (default) or `rustcrypto` (wins if both are on); [`AES_GCM_BACKEND`] names
//! the one compiled in. Both pass the same tests and vectors.

pub mod at_rest;
pub mod certificate;
mod envelope;
mod error;
mod keys;
mod mime;
mod stream;

pub use certificate::{Certificate, SignedCertificate};
pub use envelope::{
    AAD_PREFIX, CERTIFICATE_MEDIA_TYPE, CONTROL_MEDIA_TYPE, CertificateCheck, CertificateReport,
    DEFAULT_OTP_MAX_SIZE, ENVELOPE_VERSION, EnvelopeHeader, HKDF_INFO_PREFIX, LinkInfo, MIN_QKD_KEY_LEN,
    Mode, NEUTRAL_SUBJECT, OTP_MAC_KEY_LEN, OpenKeys, OpenReport, RoutingHeaders, SALT_LEN, SealRandomness,
    SealRequest, SealSummary, SealedMessage, otp_key_bytes_needed, otp_keys_needed, seal,
    verify_sealed_message,
};
pub use error::{CertificateProblem, EnvelopeError, Result};
pub use keys::{
    CertificateSigner, CertificateVerifyingKey, InMemorySigner, KEM_CIPHERTEXT_LEN, KEM_PUBLIC_KEY_LEN,
    KEM_SEED_LEN, KemPublicKey, QkdKey, SignerError, SiteKemSecretKey, SiteKeySet,
};
pub use stream::{
    AES_GCM_BACKEND, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, NONCE_PREFIX_LEN, TAG_LEN, stream_ciphertext_len,
};
