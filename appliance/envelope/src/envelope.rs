//! Sealing and opening the MIME envelope (`docs/envelope-format.md` §§ 3–8).

use std::io::{BufRead, BufReader, BufWriter, Read, Write};

use hkdf::Hkdf;
use poly1305::Poly1305;
use poly1305::universal_hash::KeyInit as _;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::certificate::{CERTIFICATE_VERSION, Certificate, MAX_CERTIFICATE_LEN, SignedCertificate};
use crate::error::{CertificateProblem, EnvelopeError, Result};
use crate::keys::{CertificateSigner, CertificateVerifyingKey, KemPublicKey, QkdKey, SiteKemSecretKey};
use crate::mime::{
    self, Base64BodyReader, Base64LineWriter, BodyEnd, HashingReader, HashingWriter, HeaderField,
};
use crate::stream::{
    self, AeadKey, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, NONCE_PREFIX_LEN, StreamStats, TAG_LEN,
};

/// Envelope format version (`X-QKD-Version`).
pub const ENVELOPE_VERSION: u32 = 1;
/// Default largest message sealed in one-time-pad mode: 64 KiB.
pub const DEFAULT_OTP_MAX_SIZE: usize = 64 * 1024;
/// One-time-pad bytes spent on the Poly1305 one-time MAC key before the message pad.
pub const OTP_MAC_KEY_LEN: usize = 32;
/// Fewest QKD key bytes `qaes` and `hybrid` accept (256 bits, one kmd key).
pub const MIN_QKD_KEY_LEN: usize = 32;
/// Salt length of the HKDF modes.
pub const SALT_LEN: usize = 32;
/// HKDF `info` prefix.
pub const HKDF_INFO_PREFIX: &[u8] = b"QuteMail-Envelope/1\0";
/// First line of the canonical bound headers (the associated data).
pub const AAD_PREFIX: &[u8] = b"QuteMail-Envelope-AAD/1\r\n";
/// `protocol` parameter of the outer `multipart/encrypted`, and media type of the control part.
pub const CONTROL_MEDIA_TYPE: &str = "application/x-qkd-envelope";
/// Media type of the certificate part.
pub const CERTIFICATE_MEDIA_TYPE: &str = "application/x-qkd-certificate+json";
/// The neutral outer subject.
pub const NEUTRAL_SUBJECT: &str = "Quantum-secured message";

/// Bound headers, in canonical order (lowercase names). Anything else is not bound.
const BOUND: [&str; 17] = [
    "from",
    "to",
    "cc",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "x-qkd-secure",
    "x-qkd-version",
    "x-qkd-algorithm",
    "x-qkd-key-id",
    "x-qkd-link-id",
    "x-qkd-source-kme",
    "x-qkd-target-kme",
    "x-qkd-salt",
    "x-qkd-chunk-size",
    "x-qkd-kem-key",
];
const KEM_CIPHERTEXT_HEADER: &str = "x-qkd-kem-ciphertext";

/// Protection modes of the envelope. (`normal` mail is not an envelope: see [`crate::at_rest`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// HKDF-SHA256 from the QKD key → AES-256-GCM STREAM.
    Qaes,
    /// HKDF-SHA256 from QKD key || ML-KEM-768 shared secret → AES-256-GCM STREAM.
    Hybrid,
    /// One-time pad from QKD key material plus a Poly1305 one-time MAC.
    Otp,
    /// HKDF-SHA256 from the ML-KEM-768 shared secret alone → AES-256-GCM STREAM.
    Pqc,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 4] = [Mode::Qaes, Mode::Hybrid, Mode::Otp, Mode::Pqc];

    /// The short name used in policy and certificates.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Qaes => "qaes",
            Mode::Hybrid => "hybrid",
            Mode::Otp => "otp",
            Mode::Pqc => "pqc",
        }
    }

    /// The `X-QKD-Algorithm` value.
    pub fn algorithm(self) -> &'static str {
        match self {
            Mode::Qaes => "QKD-HKDF-SHA256-AES256GCM-STREAM",
            Mode::Hybrid => "QKD-MLKEM768-HKDF-SHA256-AES256GCM-STREAM",
            Mode::Otp => "QKD-OTP-POLY1305",
            Mode::Pqc => "MLKEM768-HKDF-SHA256-AES256GCM-STREAM",
        }
    }

    /// The mode an `X-QKD-Algorithm` value names.
    pub fn from_algorithm(value: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.algorithm().eq_ignore_ascii_case(value))
            .ok_or_else(|| EnvelopeError::UnknownAlgorithm(value.to_string()))
    }

    /// Whether the mode consumes QKD keys (and names a link).
    pub fn uses_qkd(self) -> bool {
        !matches!(self, Mode::Pqc)
    }

    /// Whether the mode encapsulates to the recipient site's ML-KEM key.
    pub fn uses_kem(self) -> bool {
        matches!(self, Mode::Hybrid | Mode::Pqc)
    }

    fn is_chunked(self) -> bool {
        !matches!(self, Mode::Otp)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// QKD key bytes an `otp` message of `message_len` bytes consumes: the 32-byte MAC key plus one
/// pad byte per message byte. Request `otp_keys_needed` kmd keys to cover it.
pub fn otp_key_bytes_needed(message_len: usize) -> usize {
    message_len.saturating_add(OTP_MAC_KEY_LEN)
}

/// Number of kmd keys of `key_size_bytes` each (e.g. 32 for 256-bit keys) that cover an `otp`
/// message of `message_len` bytes. The unused tail of the last key is discarded, never reused.
pub fn otp_keys_needed(message_len: usize, key_size_bytes: usize) -> usize {
    otp_key_bytes_needed(message_len).div_ceil(key_size_bytes.max(1))
}

/// The routing headers copied to the outer message (they are bound, except `Subject`, which is
/// always the neutral [`NEUTRAL_SUBJECT`]). Values are as they appear in a header (addresses
/// with display names, an RFC 5322 date, `<id@host>`); they must not contain line breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingHeaders {
    /// `From`.
    pub from: String,
    /// `To` (comma-separated).
    pub to: String,
    /// `Cc` (comma-separated), if any.
    pub cc: Option<String>,
    /// `Date`.
    pub date: String,
    /// `Message-ID`.
    pub message_id: String,
}

/// The QKD link a key came from, as kmd reports it when the key is handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Link ID.
    pub link_id: String,
    /// The sender site's KME ID.
    pub source_kme_id: String,
    /// The receiver site's KME ID.
    pub target_kme_id: String,
    /// QBER at key time, parts per million.
    pub qber_ppm: u32,
    /// Secret key rate at key time, bits per second.
    pub key_rate_bps: u64,
}

/// The randomness of one seal. Production uses [`SealRandomness::generate`]; tests and the
/// spec's vectors pass explicit values.
pub struct SealRandomness {
    /// HKDF salt (also names the MIME boundary).
    pub salt: [u8; SALT_LEN],
    /// ML-KEM encapsulation randomness `m` (FIPS 203 ML-KEM.Encaps_internal). Secret: whoever
    /// knows it knows the shared secret.
    pub kem_seed: Zeroizing<[u8; 32]>,
}

impl SealRandomness {
    /// Fresh values from the operating system's random number generator.
    pub fn generate() -> Result<Self> {
        let mut salt = [0u8; SALT_LEN];
        let mut kem_seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut salt).map_err(|e| EnvelopeError::Random(e.to_string()))?;
        getrandom::fill(kem_seed.as_mut()).map_err(|e| EnvelopeError::Random(e.to_string()))?;
        Ok(Self { salt, kem_seed })
    }
}

/// Everything a seal needs besides the plaintext, the signer and the randomness.
#[derive(Debug)]
pub struct SealRequest<'a> {
    /// Protection mode.
    pub mode: Mode,
    /// Outer routing headers.
    pub routing: &'a RoutingHeaders,
    /// The QKD link (required for `qaes`, `hybrid`, `otp`; must be `None` for `pqc`).
    pub link: Option<&'a LinkInfo>,
    /// QKD keys from kmd, in order. `qaes`/`hybrid` use all of them; `otp` consumes them in
    /// order until the pad is long enough and reports which it used.
    pub qkd_keys: &'a [QkdKey],
    /// The recipient site's ML-KEM-768 public key (`hybrid`, `pqc`).
    pub recipient_kem_key: Option<&'a KemPublicKey>,
    /// Plaintext bytes per chunk ([`DEFAULT_CHUNK_SIZE`]).
    pub chunk_size: usize,
    /// Largest `otp` message ([`DEFAULT_OTP_MAX_SIZE`]).
    pub otp_max_size: usize,
    /// The sending site's mail domain (certificate).
    pub sender_domain: &'a str,
    /// Seal time, seconds since the Unix epoch (certificate).
    pub sealed_at: u64,
}

impl<'a> SealRequest<'a> {
    /// A request with the default chunk size and OTP limit and no keys yet.
    pub fn new(mode: Mode, routing: &'a RoutingHeaders, sender_domain: &'a str, sealed_at: u64) -> Self {
        Self {
            mode,
            routing,
            link: None,
            qkd_keys: &[],
            recipient_kem_key: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            otp_max_size: DEFAULT_OTP_MAX_SIZE,
            sender_domain,
            sealed_at,
        }
    }
}

/// What a seal produced.
#[derive(Debug, Clone)]
pub struct SealSummary {
    /// The QKD key IDs the message consumed, in order (for `otp`, possibly fewer than supplied:
    /// the rest were not touched and may be used for another message).
    pub key_ids_used: Vec<Uuid>,
    /// Plaintext length.
    pub plaintext_len: u64,
    /// Length of the ciphertext part (decoded).
    pub ciphertext_len: u64,
    /// The signed certificate written into the message.
    pub certificate: SignedCertificate,
}

/// The parsed outer headers of a sealed message: what the receiver needs to fetch the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// Protection mode.
    pub mode: Mode,
    /// QKD key IDs, in order (empty for `pqc`).
    pub key_ids: Vec<Uuid>,
    /// Link ID.
    pub link_id: Option<String>,
    /// Source KME ID.
    pub source_kme_id: Option<String>,
    /// Target KME ID.
    pub target_kme_id: Option<String>,
    /// HKDF salt (not in `otp`).
    pub salt: Option<[u8; SALT_LEN]>,
    /// Chunk size (not in `otp`).
    pub chunk_size: Option<usize>,
    /// Fingerprint of the ML-KEM key sealed to (`hybrid`, `pqc`).
    pub kem_key_fingerprint: Option<[u8; 16]>,
    /// ML-KEM-768 ciphertext (`hybrid`, `pqc`).
    pub kem_ciphertext: Option<Vec<u8>>,
    /// Outer `From`.
    pub from: Option<String>,
    /// Outer `To`.
    pub to: Option<String>,
    /// Outer `Cc`.
    pub cc: Option<String>,
    /// Outer `Date`.
    pub date: Option<String>,
    /// Outer `Message-ID`.
    pub message_id: Option<String>,
    boundary: String,
    aad: Vec<u8>,
}

impl EnvelopeHeader {
    /// The canonical bound headers (the associated data, spec § 5).
    pub fn bound_headers(&self) -> &[u8] {
        &self.aad
    }

    /// SHA-256 of [`Self::bound_headers`] (the AEAD associated data of every chunk).
    pub fn bound_headers_sha256(&self) -> [u8; 32] {
        Sha256::digest(&self.aad).into()
    }
}

/// Keys for opening. Only those the mode needs must be present.
#[derive(Debug, Clone, Copy)]
pub struct OpenKeys<'a> {
    /// The QKD keys fetched from kmd by the IDs in [`EnvelopeHeader::key_ids`], in that order.
    pub qkd_keys: &'a [QkdKey],
    /// This site's ML-KEM-768 secret key (`hybrid`, `pqc`).
    pub kem_secret_key: Option<&'a SiteKemSecretKey>,
    /// The sender site's certificate key; without it the certificate's digests are checked but
    /// not its signature ([`CertificateCheck::Unsigned`]).
    pub sender_certificate_key: Option<&'a CertificateVerifyingKey>,
    /// Largest `otp` message this receiver accepts.
    pub otp_max_size: usize,
}

impl Default for OpenKeys<'_> {
    fn default() -> Self {
        Self {
            qkd_keys: &[],
            kem_secret_key: None,
            sender_certificate_key: None,
            otp_max_size: DEFAULT_OTP_MAX_SIZE,
        }
    }
}

/// The state of the message's certificate after opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateCheck {
    /// Signature verified under the sender's key; digests and fields match the message.
    Verified(Certificate),
    /// Digests and fields match the message, but no sender key was supplied to check the
    /// signature.
    Unsigned(Certificate),
    /// The certificate is missing, malformed, forged or belongs to other bytes.
    NotVerifiable(CertificateProblem),
}

/// The outcome of a successful open (the plaintext is authentic).
#[derive(Debug, Clone)]
pub struct OpenReport {
    /// Plaintext bytes written.
    pub plaintext_len: u64,
    /// The certificate's state. The plaintext is authentic even when this is `NotVerifiable`
    /// (the AEAD proved it); the badge must not be shown then.
    pub certificate: CertificateCheck,
}

/// The certificate of a sealed message, verified without any decryption key.
#[derive(Debug, Clone)]
pub struct CertificateReport {
    /// The verified record.
    pub certificate: Certificate,
    /// The message's outer headers.
    pub header: EnvelopeHeader,
}

// ---------------------------------------------------------------------------------------------
// Key schedule

struct MessageKey {
    key: AeadKey,
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
}

fn hkdf_info(mode: Mode, key_ids: &[Uuid], kem_ciphertext: &[u8]) -> Vec<u8> {
    let mut info = HKDF_INFO_PREFIX.to_vec();
    info.extend_from_slice(mode.algorithm().as_bytes());
    info.push(0);
    info.extend_from_slice(key_ids_text(key_ids, ",").as_bytes());
    info.push(0);
    info.extend_from_slice(kem_ciphertext);
    info
}

fn derive(mode: Mode, salt: &[u8; SALT_LEN], ikm_parts: &[&[u8]], info: &[u8]) -> MessageKey {
    let mut extract = hkdf::HkdfExtract::<Sha256>::new(Some(salt));
    for part in ikm_parts {
        extract.input_ikm(part);
    }
    let (_, hkdf): (_, Hkdf<Sha256>) = extract.finalize();
    let mut okm = Zeroizing::new([0u8; 32 + NONCE_PREFIX_LEN]);
    // 39 bytes is far below HKDF-SHA256's limit of 255 * 32, so expand cannot fail.
    if hkdf.expand(info, okm.as_mut()).is_err() {
        unreachable!("HKDF-SHA256 expands 39 bytes");
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&okm[..32]);
    let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
    nonce_prefix.copy_from_slice(&okm[32..]);
    tracing::trace!(mode = mode.name(), "derived message key");
    MessageKey { key: AeadKey::new(&key), nonce_prefix }
}

fn key_ids_text(ids: &[Uuid], sep: &str) -> String {
    ids.iter().map(|id| id.hyphenated().to_string()).collect::<Vec<_>>().join(sep)
}

fn qkd_material(mode: Mode, keys: &[QkdKey]) -> Result<()> {
    if keys.is_empty() {
        return Err(EnvelopeError::MissingKey { mode: mode.name(), what: "a QKD key" });
    }
    let total: usize = keys.iter().map(|k| k.bytes().len()).sum();
    if total < MIN_QKD_KEY_LEN {
        return Err(EnvelopeError::NotEnoughKeyMaterial {
            needed: MIN_QKD_KEY_LEN as u64,
            available: total as u64,
        });
    }
    Ok(())
}

/// The canonical bound headers from a lookup of canonical values by lowercase name.
fn canonical_aad<'v>(lookup: impl Fn(&str) -> Option<&'v str>, kem_ct: Option<&'v str>) -> Vec<u8> {
    let mut aad = AAD_PREFIX.to_vec();
    let names = BOUND.iter().copied().chain(std::iter::once(KEM_CIPHERTEXT_HEADER));
    for name in names {
        let value = if name == KEM_CIPHERTEXT_HEADER { kem_ct } else { lookup(name) };
        if let Some(value) = value {
            aad.extend_from_slice(name.as_bytes());
            aad.push(b':');
            aad.extend_from_slice(value.as_bytes());
            aad.extend_from_slice(b"\r\n");
        }
    }
    aad
}

fn otp_mac(mac_key: &[u8], aad: &[u8], ciphertext: &[u8]) -> [u8; 16] {
    let mut input = Vec::with_capacity(aad.len() + ciphertext.len() + 48);
    for part in [aad, ciphertext] {
        input.extend_from_slice(part);
        input.resize(input.len().next_multiple_of(16), 0);
    }
    input.extend_from_slice(&(aad.len() as u64).to_le_bytes());
    input.extend_from_slice(&(ciphertext.len() as u64).to_le_bytes());
    let mut key = poly1305::Key::default();
    key.copy_from_slice(mac_key);
    Poly1305::new(&key).compute_unpadded(&input).into()
}

/// The pad: the supplied keys concatenated in order, `needed` bytes of it, and how many keys
/// contributed. The rest of the last key is dropped (and zeroized with the copy).
fn otp_pad(keys: &[QkdKey], needed: usize) -> Result<(Zeroizing<Vec<u8>>, usize)> {
    let mut pad = Zeroizing::new(Vec::with_capacity(needed));
    let mut used = 0;
    for key in keys {
        if pad.len() >= needed {
            break;
        }
        let take = (needed - pad.len()).min(key.bytes().len());
        pad.extend_from_slice(&key.bytes()[..take]);
        used += 1;
    }
    if pad.len() < needed {
        return Err(EnvelopeError::NotEnoughKeyMaterial {
            needed: needed as u64,
            available: pad.len() as u64,
        });
    }
    Ok((pad, used))
}

// ---------------------------------------------------------------------------------------------
// Sealing

/// Seals the inner RFC 5322 message read from `plaintext` into a sealed MIME message written to
/// `output`, streaming with memory bounded by the chunk size (`otp` holds its message, which is
/// at most `otp_max_size`; a longer one is read to its end in bounded memory, to report its
/// size, and refused with [`EnvelopeError::OtpTooLarge`] before anything is written).
///
/// On any other error `output` may hold part of a message: discard it. The QKD keys passed in
/// are spent once this is called (whatever the outcome, except for unused `otp` keys, see
/// [`SealSummary::key_ids_used`]); never seal another message with them.
pub fn seal(
    request: &SealRequest<'_>,
    signer: &dyn CertificateSigner,
    randomness: &SealRandomness,
    mut plaintext: impl Read,
    output: impl Write,
) -> Result<SealSummary> {
    let mode = request.mode;
    stream::check_chunk_size(request.chunk_size)?;
    let link = match (mode.uses_qkd(), request.link) {
        (true, None) => {
            return Err(EnvelopeError::InvalidParameter(format!("mode {mode} needs the QKD link")));
        }
        (false, Some(_)) => {
            return Err(EnvelopeError::InvalidParameter(format!("mode {mode} uses no QKD link")));
        }
        (_, link) => link,
    };
    // The link and site IDs go into headers and the certificate: check them before any work, in
    // their canonical form, which is what both carry.
    let link_ids = link
        .map(|l| -> Result<(String, String, String)> {
            Ok((
                certificate_text("link ID", &l.link_id)?,
                certificate_text("source KME ID", &l.source_kme_id)?,
                certificate_text("target KME ID", &l.target_kme_id)?,
            ))
        })
        .transpose()?;
    let sender_domain = certificate_text("sender domain", request.sender_domain)?;
    certificate_text("signing key ID", signer.key_id())?;
    if !mode.uses_qkd() && !request.qkd_keys.is_empty() {
        return Err(EnvelopeError::InvalidParameter(format!("mode {mode} uses no QKD keys")));
    }
    let kem_key = match (mode.uses_kem(), request.recipient_kem_key) {
        (true, None) => {
            return Err(EnvelopeError::MissingKey {
                mode: mode.name(),
                what: "the recipient site's ML-KEM key",
            });
        }
        (true, Some(k)) => Some(k),
        (false, _) => None,
    };

    // One-time pad: read the (small) message first, so that its size picks the keys.
    let mut otp_message = None;
    let key_ids_used: Vec<Uuid> = match mode {
        Mode::Otp => {
            let message = read_bounded(&mut plaintext, request.otp_max_size)?;
            let (_, used) = otp_pad(request.qkd_keys, otp_key_bytes_needed(message.len()))?;
            otp_message = Some(message);
            request.qkd_keys[..used].iter().map(QkdKey::id).collect()
        }
        Mode::Qaes | Mode::Hybrid => {
            qkd_material(mode, request.qkd_keys)?;
            request.qkd_keys.iter().map(QkdKey::id).collect()
        }
        Mode::Pqc => Vec::new(),
    };
    let (kem_ct, kem_secret) = match kem_key {
        Some(k) => {
            let (ct, ss) = k.encapsulate(&randomness.kem_seed);
            (Some(ct), Some(ss))
        }
        None => (None, None),
    };

    // Outer headers, in the order they are written; values canonical.
    let boundary = format!("qkd-{}", hex::encode(&randomness.salt[..12]));
    let mut headers: Vec<(&str, String)> = vec![
        ("From", mime::checked_value("From", &request.routing.from)?),
        ("To", mime::checked_value("To", &request.routing.to)?),
    ];
    if let Some(cc) = &request.routing.cc {
        headers.push(("Cc", mime::checked_value("Cc", cc)?));
    }
    headers.push(("Date", mime::checked_value("Date", &request.routing.date)?));
    headers.push(("Message-ID", mime::checked_value("Message-ID", &request.routing.message_id)?));
    headers.push(("Subject", NEUTRAL_SUBJECT.to_string()));
    headers.push(("MIME-Version", "1.0".to_string()));
    headers.push((
        "Content-Type",
        format!("multipart/encrypted; protocol=\"{CONTROL_MEDIA_TYPE}\"; boundary=\"{boundary}\""),
    ));
    headers.push(("X-QKD-Secure", "True".to_string()));
    headers.push(("X-QKD-Version", ENVELOPE_VERSION.to_string()));
    headers.push(("X-QKD-Algorithm", mode.algorithm().to_string()));
    if mode.uses_qkd() {
        headers.push(("X-QKD-Key-ID", key_ids_text(&key_ids_used, ", ")));
    }
    if let Some(ids) = &link_ids {
        headers.push(("X-QKD-Link-ID", ids.0.clone()));
        headers.push(("X-QKD-Source-KME", ids.1.clone()));
        headers.push(("X-QKD-Target-KME", ids.2.clone()));
    }
    if mode.is_chunked() {
        headers.push(("X-QKD-Salt", mime::b64(&randomness.salt)));
        headers.push(("X-QKD-Chunk-Size", request.chunk_size.to_string()));
    }
    if let (Some(k), Some(ct)) = (kem_key, &kem_ct) {
        headers.push(("X-QKD-KEM-Key", hex::encode(k.fingerprint())));
        headers.push(("X-QKD-KEM-Ciphertext", mime::spaced_b64(ct)));
    }
    for (name, value) in &headers {
        if *name != "Subject" && value.is_empty() {
            return Err(EnvelopeError::InvalidParameter(format!("header {name} is empty")));
        }
    }
    let lookup =
        |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    let aad = canonical_aad(lookup, lookup(KEM_CIPHERTEXT_HEADER));
    let aad_digest: [u8; 32] = Sha256::digest(&aad).into();

    let mut out = BufWriter::with_capacity(64 * 1024, output);
    let io = EnvelopeError::io("writing the sealed message");
    write_preamble(&mut out, &headers, &boundary).map_err(io)?;

    let mut body = HashingWriter { inner: Base64LineWriter::new(&mut out), hasher: Sha256::new() };
    let plaintext_len = match mode {
        Mode::Otp => {
            let message = otp_message.unwrap_or_default();
            let (pad, _) = otp_pad(request.qkd_keys, otp_key_bytes_needed(message.len()))?;
            let (mac_key, pad) = pad.split_at(OTP_MAC_KEY_LEN);
            let ciphertext: Vec<u8> = message.iter().zip(pad).map(|(m, p)| m ^ p).collect();
            let tag = otp_mac(mac_key, &aad, &ciphertext);
            body.write_all(&ciphertext).map_err(EnvelopeError::io("writing the sealed message"))?;
            body.write_all(&tag).map_err(EnvelopeError::io("writing the sealed message"))?;
            message.len() as u64
        }
        _ => {
            let qkd: Vec<&[u8]> = request.qkd_keys.iter().map(QkdKey::bytes).collect();
            let mut ikm: Vec<&[u8]> = if mode.uses_qkd() { qkd } else { Vec::new() };
            if let Some(ss) = &kem_secret {
                ikm.push(ss.as_ref());
            }
            let info = hkdf_info(mode, &key_ids_used, kem_ct.as_deref().unwrap_or_default());
            let mk = derive(mode, &randomness.salt, &ikm, &info);
            let StreamStats { plaintext_len, .. } = stream::seal_stream(
                &mk.key,
                &mk.nonce_prefix,
                request.chunk_size,
                &aad_digest,
                &mut plaintext,
                &mut body,
            )?;
            plaintext_len
        }
    };
    let ciphertext_sha256: [u8; 32] = body.hasher.finalize_reset().into();
    let ciphertext_len = match mode {
        Mode::Otp => plaintext_len + TAG_LEN as u64,
        _ => stream::stream_ciphertext_len(plaintext_len, request.chunk_size),
    };
    body.inner.finish().map_err(EnvelopeError::io("writing the sealed message"))?;

    let certificate = Certificate {
        version: CERTIFICATE_VERSION,
        mode: mode.name().to_string(),
        algorithm: mode.algorithm().to_string(),
        key_ids: key_ids_used.iter().map(|id| id.hyphenated().to_string()).collect(),
        link_id: link_ids.as_ref().map(|ids| ids.0.clone()),
        source_kme_id: link_ids.as_ref().map(|ids| ids.1.clone()),
        target_kme_id: link_ids.as_ref().map(|ids| ids.2.clone()),
        qber_ppm: link.map(|l| l.qber_ppm),
        key_rate_bps: link.map(|l| l.key_rate_bps),
        ciphertext_sha256: hex::encode(ciphertext_sha256),
        ciphertext_len,
        headers_sha256: hex::encode(aad_digest),
        sender_domain,
        signing_key_id: signer.key_id().to_string(),
        sealed_at: request.sealed_at,
    }
    .sign(signer)?;
    write_certificate_part(&mut out, &boundary, &certificate.to_json()?)
        .map_err(EnvelopeError::io("writing the sealed message"))?;
    out.flush().map_err(EnvelopeError::io("writing the sealed message"))?;
    tracing::debug!(mode = mode.name(), plaintext_len, keys = key_ids_used.len(), "sealed message");
    Ok(SealSummary { key_ids_used, plaintext_len, ciphertext_len, certificate })
}

/// A value that appears in a header and in the certificate: canonical, non-empty, printable
/// ASCII without `"` or `\\` (the certificate's encoding has no escapes).
fn certificate_text(what: &str, value: &str) -> Result<String> {
    let canonical = mime::checked_value(what, value)?;
    if canonical.is_empty()
        || !canonical.bytes().all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\')
    {
        return Err(EnvelopeError::InvalidParameter(format!(
            "{what} {value:?} must be non-empty printable ASCII without quotes or backslashes"
        )));
    }
    Ok(canonical)
}

/// Reads at most `max` bytes; a longer input is drained (to report its size) and refused.
fn read_bounded(input: &mut impl Read, max: usize) -> Result<Zeroizing<Vec<u8>>> {
    let mut message = Zeroizing::new(Vec::new());
    let read = input
        .take(max as u64 + 1)
        .read_to_end(&mut message)
        .map_err(EnvelopeError::io("reading the plaintext"))?;
    if read > max {
        let rest =
            std::io::copy(input, &mut std::io::sink()).map_err(EnvelopeError::io("reading the plaintext"))?;
        return Err(EnvelopeError::OtpTooLarge { size: read as u64 + rest, max: max as u64 });
    }
    Ok(message)
}

fn write_preamble(out: &mut impl Write, headers: &[(&str, String)], boundary: &str) -> std::io::Result<()> {
    for (name, value) in headers {
        mime::write_header(out, name, value)?;
    }
    write!(
        out,
        "\r\nThis is a QuteMail quantum-secured message (RFC 1847 multipart/encrypted).\r\n\
         The receiving QuteMail gateway decrypts it; other readers see only this text.\r\n\
         \r\n--{boundary}\r\nContent-Type: {CONTROL_MEDIA_TYPE}\r\n\r\nVersion: 1\r\n\r\n\
         --{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
}

fn write_certificate_part(out: &mut impl Write, boundary: &str, json: &[u8]) -> std::io::Result<()> {
    write!(
        out,
        "--{boundary}\r\nContent-Type: {CERTIFICATE_MEDIA_TYPE}\r\nContent-Transfer-Encoding: base64\r\n\
         Content-Description: Quantum Secured certificate\r\n\r\n"
    )?;
    let mut lines = Base64LineWriter::new(&mut *out);
    lines.write_all(json)?;
    lines.finish()?;
    write!(out, "--{boundary}--\r\n")
}

// ---------------------------------------------------------------------------------------------
// Opening

/// A sealed message whose outer headers have been read (phase one of opening). The reader is
/// positioned at the start of the ciphertext.
#[derive(Debug)]
pub struct SealedMessage<R> {
    header: EnvelopeHeader,
    input: R,
}

fn malformed(text: impl Into<String>) -> EnvelopeError {
    EnvelopeError::Malformed(text.into())
}

fn expect_part_headers(input: &mut impl BufRead, media_type: &str, base64: bool) -> Result<()> {
    let fields = mime::read_header_block(input, "MIME part")?;
    let get =
        |name: &str| fields.iter().find(|f| f.name.eq_ignore_ascii_case(name)).map(|f| f.value.as_str());
    let found = get("Content-Type").map(mime::media_type).unwrap_or_default();
    if found != media_type {
        return Err(malformed(format!("expected a {media_type} part, found {found:?}")));
    }
    if base64 && !get("Content-Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("base64")) {
        return Err(malformed(format!("the {media_type} part is not base64-encoded")));
    }
    Ok(())
}

fn parse_header(fields: &[HeaderField]) -> Result<EnvelopeHeader> {
    let get = |name: &str| -> Result<Option<&str>> {
        let mut found = fields.iter().filter(|f| f.name.eq_ignore_ascii_case(name));
        let first = found.next().map(|f| f.value.as_str());
        if found.next().is_some() {
            return Err(malformed(format!("header {name} appears more than once")));
        }
        Ok(first)
    };
    match get("x-qkd-secure")? {
        Some("True") => {}
        Some(other) => {
            return Err(EnvelopeError::NotAnEnvelope(format!("X-QKD-Secure is {other:?}, not True")));
        }
        None => return Err(EnvelopeError::NotAnEnvelope("no X-QKD-Secure header".into())),
    }
    for field in fields {
        let lower = field.name.to_ascii_lowercase();
        if lower.starts_with("x-qkd-") && !BOUND.contains(&lower.as_str()) && lower != KEM_CIPHERTEXT_HEADER {
            return Err(malformed(format!(
                "unknown header {}: it cannot be bound to the ciphertext",
                field.name
            )));
        }
    }
    let version = get("x-qkd-version")?.ok_or_else(|| malformed("no X-QKD-Version header"))?;
    if version != ENVELOPE_VERSION.to_string() {
        return Err(EnvelopeError::UnsupportedVersion {
            found: version.to_string(),
            supported: ENVELOPE_VERSION,
        });
    }
    let mode =
        Mode::from_algorithm(get("x-qkd-algorithm")?.ok_or_else(|| malformed("no X-QKD-Algorithm header"))?)?;
    let content_type = get("content-type")?.ok_or_else(|| malformed("no Content-Type header"))?;
    if mime::media_type(content_type) != "multipart/encrypted"
        || mime::content_type_param(content_type, "protocol").as_deref() != Some(CONTROL_MEDIA_TYPE)
    {
        return Err(EnvelopeError::NotAnEnvelope(format!("Content-Type is {content_type:?}")));
    }
    let boundary = mime::content_type_param(content_type, "boundary").unwrap_or_default();
    if boundary.is_empty() || boundary.len() > 70 {
        return Err(malformed("missing or invalid MIME boundary"));
    }
    // Headers a mode must have, and must not have.
    let presence = |name: &str, wanted: bool| -> Result<()> {
        match (get(name)?.is_some(), wanted) {
            (true, false) => Err(malformed(format!("header {name} does not belong to mode {mode}"))),
            (false, true) => Err(malformed(format!("mode {mode} needs header {name}"))),
            _ => Ok(()),
        }
    };
    for name in ["x-qkd-key-id", "x-qkd-link-id", "x-qkd-source-kme", "x-qkd-target-kme"] {
        presence(name, mode.uses_qkd())?;
    }
    for name in ["x-qkd-salt", "x-qkd-chunk-size"] {
        presence(name, mode.is_chunked())?;
    }
    for name in ["x-qkd-kem-key", KEM_CIPHERTEXT_HEADER] {
        presence(name, mode.uses_kem())?;
    }
    let key_ids = match get("x-qkd-key-id")? {
        Some(v) => v
            .split(',')
            .map(|id| {
                Uuid::parse_str(id.trim())
                    .map_err(|_| malformed(format!("X-QKD-Key-ID {id:?} is not a UUID")))
            })
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let salt = get("x-qkd-salt")?
        .map(|v| mime::unb64(v).and_then(|s| <[u8; SALT_LEN]>::try_from(s).ok()))
        .map(|s| s.ok_or_else(|| malformed("X-QKD-Salt is not 32 bytes of base64")))
        .transpose()?;
    let chunk_size = get("x-qkd-chunk-size")?
        .map(|v| match v.parse::<usize>() {
            Ok(n) if (1..=MAX_CHUNK_SIZE).contains(&n) => Ok(n),
            _ => Err(malformed(format!("X-QKD-Chunk-Size {v:?} is not in 1..={MAX_CHUNK_SIZE}"))),
        })
        .transpose()?;
    let kem_key_fingerprint = get("x-qkd-kem-key")?
        .map(|v| hex::decode(v).ok().and_then(|b| <[u8; 16]>::try_from(b).ok()))
        .map(|f| f.ok_or_else(|| malformed("X-QKD-KEM-Key is not 16 bytes of hex")))
        .transpose()?;
    let kem_ciphertext = get(KEM_CIPHERTEXT_HEADER)?
        .map(|v| mime::unb64(v).ok_or_else(|| malformed("X-QKD-KEM-Ciphertext is not base64")))
        .transpose()?;
    let mut bound_values = Vec::new();
    for name in BOUND.iter().chain(std::iter::once(&KEM_CIPHERTEXT_HEADER)) {
        bound_values.push((*name, get(name)?));
    }
    let lookup = |name: &str| bound_values.iter().find(|(n, _)| *n == name).and_then(|(_, v)| *v);
    let aad = canonical_aad(lookup, lookup(KEM_CIPHERTEXT_HEADER));
    let owned = |name: &str| -> Result<Option<String>> { Ok(get(name)?.map(str::to_string)) };
    Ok(EnvelopeHeader {
        mode,
        key_ids,
        link_id: owned("x-qkd-link-id")?,
        source_kme_id: owned("x-qkd-source-kme")?,
        target_kme_id: owned("x-qkd-target-kme")?,
        salt,
        chunk_size,
        kem_key_fingerprint,
        kem_ciphertext,
        from: owned("from")?,
        to: owned("to")?,
        cc: owned("cc")?,
        date: owned("date")?,
        message_id: owned("message-id")?,
        boundary,
        aad,
    })
}

/// Maps an error raised inside a base64 body (reported through `io::Error`) to its meaning.
fn classify(e: EnvelopeError) -> EnvelopeError {
    match e {
        EnvelopeError::Io { source, context } => match source.kind() {
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => mime::body_error(source),
            _ => EnvelopeError::Io { context, source },
        },
        other => other,
    }
}

impl<R: Read> SealedMessage<BufReader<R>> {
    /// Phase one: reads and checks the outer headers (and the MIME structure up to the
    /// ciphertext), so the caller can fetch the keys named in [`Self::header`].
    pub fn read_header(input: R) -> Result<Self> {
        Self::read_header_buffered(BufReader::with_capacity(16 * 1024, input))
    }
}

impl<R: BufRead> SealedMessage<R> {
    /// [`SealedMessage::read_header`] for an input that is already buffered.
    pub fn read_header_buffered(mut input: R) -> Result<Self> {
        let fields = mime::read_header_block(&mut input, "outer").map_err(|e| match e {
            EnvelopeError::Malformed(m) => EnvelopeError::NotAnEnvelope(m),
            other => other,
        })?;
        let header = parse_header(&fields)?;
        let boundary = header.boundary.clone();
        let (end, _) = mime::read_until_boundary(&mut input, &boundary, 32)?;
        if end != BodyEnd::NextPart {
            return Err(malformed("the multipart ends before its parts"));
        }
        expect_part_headers(&mut input, CONTROL_MEDIA_TYPE, false)?;
        let (end, lines) = mime::read_until_boundary(&mut input, &boundary, 8)?;
        if end != BodyEnd::NextPart || !lines.iter().any(|l| mime::canonical_value(l) == "Version: 1") {
            return Err(malformed("the control part is not \"Version: 1\" followed by the ciphertext part"));
        }
        expect_part_headers(&mut input, "application/octet-stream", true)?;
        Ok(Self { header, input })
    }

    /// The outer headers.
    pub fn header(&self) -> &EnvelopeHeader {
        &self.header
    }

    /// Phase two: decrypts into `output`, chunk by chunk, and checks the certificate.
    ///
    /// In the chunked modes plaintext is written as each chunk verifies, so `output` may hold
    /// a prefix of the message when an error occurs: the message is authentic only if this
    /// returns `Ok` (the final chunk proves nothing was cut off). Discard `output` on error, or
    /// use [`Self::open_to_vec`]. `otp` verifies its MAC before writing anything.
    pub fn open(mut self, keys: &OpenKeys<'_>, output: impl Write) -> Result<OpenReport> {
        let header = &self.header;
        let mode = header.mode;
        if mode.uses_qkd() {
            if keys.qkd_keys.len() != header.key_ids.len() {
                return Err(EnvelopeError::KeyCountMismatch {
                    expected: header.key_ids.len(),
                    given: keys.qkd_keys.len(),
                });
            }
            for (position, (expected, key)) in header.key_ids.iter().zip(keys.qkd_keys).enumerate() {
                if *expected != key.id() {
                    return Err(EnvelopeError::WrongKey {
                        position,
                        expected: expected.to_string(),
                        given: key.id().to_string(),
                    });
                }
            }
        }
        let kem_secret = if mode.uses_kem() {
            let sk = keys.kem_secret_key.ok_or(EnvelopeError::MissingKey {
                mode: mode.name(),
                what: "this site's ML-KEM secret key",
            })?;
            let given = sk.public_key().fingerprint();
            if header.kem_key_fingerprint != Some(given) {
                return Err(EnvelopeError::WrongKemKey {
                    expected: header.kem_key_fingerprint.map(hex::encode).unwrap_or_default(),
                    given: hex::encode(given),
                });
            }
            Some(sk.decapsulate(header.kem_ciphertext.as_deref().unwrap_or_default())?)
        } else {
            None
        };

        let boundary = header.boundary.clone();
        let aad_digest = header.bound_headers_sha256();
        let mut body =
            HashingReader { inner: Base64BodyReader::new(&mut self.input, &boundary), hasher: Sha256::new() };
        let mut output = output;
        let plaintext_len = match (mode, header.salt, header.chunk_size) {
            (Mode::Otp, _, _) => {
                let limit = keys.otp_max_size.saturating_add(TAG_LEN);
                let sealed = read_bounded(&mut body, limit).map_err(|e| match e {
                    EnvelopeError::OtpTooLarge { size, .. } => EnvelopeError::OtpTooLarge {
                        size: size.saturating_sub(TAG_LEN as u64),
                        max: keys.otp_max_size as u64,
                    },
                    other => classify(other),
                })?;
                let Some(ct_len) = sealed.len().checked_sub(TAG_LEN) else {
                    return Err(EnvelopeError::Truncated { chunks: 0 });
                };
                let (ciphertext, tag) = sealed.split_at(ct_len);
                let (pad, _) = otp_pad(keys.qkd_keys, otp_key_bytes_needed(ct_len))?;
                let (mac_key, pad) = pad.split_at(OTP_MAC_KEY_LEN);
                if !tags_equal(&otp_mac(mac_key, &header.aad, ciphertext), tag) {
                    return Err(EnvelopeError::AuthenticationFailed);
                }
                let plaintext: Zeroizing<Vec<u8>> =
                    Zeroizing::new(ciphertext.iter().zip(pad).map(|(c, p)| c ^ p).collect());
                output.write_all(&plaintext).map_err(EnvelopeError::io("writing the plaintext"))?;
                plaintext.len() as u64
            }
            (_, Some(salt), Some(chunk_size)) => {
                let qkd: Vec<&[u8]> = if mode.uses_qkd() {
                    keys.qkd_keys.iter().map(QkdKey::bytes).collect()
                } else {
                    Vec::new()
                };
                if mode.uses_qkd() {
                    qkd_material(mode, keys.qkd_keys)?;
                }
                let mut ikm = qkd;
                if let Some(ss) = &kem_secret {
                    ikm.push(ss.as_ref());
                }
                let info =
                    hkdf_info(mode, &header.key_ids, header.kem_ciphertext.as_deref().unwrap_or_default());
                let mk = derive(mode, &salt, &ikm, &info);
                stream::open_stream(
                    &mk.key,
                    &mk.nonce_prefix,
                    chunk_size,
                    &aad_digest,
                    &mut body,
                    &mut output,
                )
                .map_err(classify)?
                .plaintext_len
            }
            _ => return Err(malformed("salt or chunk size missing")),
        };
        output.flush().map_err(EnvelopeError::io("writing the plaintext"))?;
        let end = body.inner.end();
        let ciphertext_sha256: [u8; 32] = body.hasher.finalize().into();
        let certificate = match end {
            Some(BodyEnd::NextPart) => match read_certificate(&mut self.input, &boundary) {
                Ok(signed) => {
                    check_certificate(signed, &self.header, &ciphertext_sha256, keys.sender_certificate_key)
                }
                Err(problem) => CertificateCheck::NotVerifiable(problem),
            },
            _ => CertificateCheck::NotVerifiable(CertificateProblem::Missing),
        };
        tracing::debug!(mode = mode.name(), plaintext_len, "opened message");
        Ok(OpenReport { plaintext_len, certificate })
    }

    /// Opens into memory; the plaintext is returned only if the whole message verified.
    pub fn open_to_vec(self, keys: &OpenKeys<'_>) -> Result<(Zeroizing<Vec<u8>>, OpenReport)> {
        let mut plaintext = Zeroizing::new(Vec::new());
        let report = self.open(keys, &mut *plaintext)?;
        Ok((plaintext, report))
    }

    /// Verifies the certificate against the ciphertext and headers, without any decryption key
    /// (what `qutemailctl cert verify` does).
    pub fn verify_certificate(mut self, sender_key: &CertificateVerifyingKey) -> Result<CertificateReport> {
        let boundary = self.header.boundary.clone();
        let mut body =
            HashingReader { inner: Base64BodyReader::new(&mut self.input, &boundary), hasher: Sha256::new() };
        std::io::copy(&mut body, &mut std::io::sink()).map_err(mime::body_error)?;
        let end = body.inner.end();
        let digest: [u8; 32] = body.hasher.finalize().into();
        if end != Some(BodyEnd::NextPart) {
            return Err(CertificateProblem::Missing.into());
        }
        let signed = read_certificate(&mut self.input, &boundary)?;
        match check_certificate(signed, &self.header, &digest, Some(sender_key)) {
            CertificateCheck::Verified(certificate) => {
                Ok(CertificateReport { certificate, header: self.header })
            }
            CertificateCheck::NotVerifiable(problem) => Err(problem.into()),
            CertificateCheck::Unsigned(_) => Err(CertificateProblem::BadSignature.into()),
        }
    }
}

fn read_certificate(
    input: &mut impl BufRead,
    boundary: &str,
) -> Result<SignedCertificate, CertificateProblem> {
    expect_part_headers(input, CERTIFICATE_MEDIA_TYPE, true).map_err(|e| match e {
        EnvelopeError::Malformed(m) => CertificateProblem::Malformed(m),
        other => CertificateProblem::Malformed(other.to_string()),
    })?;
    let mut reader = Base64BodyReader::new(input, boundary);
    let mut json = Vec::new();
    (&mut reader)
        .take(MAX_CERTIFICATE_LEN as u64 + 1)
        .read_to_end(&mut json)
        .map_err(|e| CertificateProblem::Malformed(e.to_string()))?;
    if json.len() > MAX_CERTIFICATE_LEN {
        return Err(CertificateProblem::Malformed("the certificate part is too large".into()));
    }
    if reader.end() != Some(BodyEnd::Close) {
        return Err(CertificateProblem::Malformed("the certificate is not the last part".into()));
    }
    SignedCertificate::from_json(&json)
}

fn check_certificate(
    signed: SignedCertificate,
    header: &EnvelopeHeader,
    ciphertext_sha256: &[u8; 32],
    key: Option<&CertificateVerifyingKey>,
) -> CertificateCheck {
    let cert = &signed.certificate;
    let problem = if cert.ciphertext_sha256 != hex::encode(ciphertext_sha256) {
        Some(CertificateProblem::CiphertextDigestMismatch)
    } else if cert.headers_sha256 != hex::encode(header.bound_headers_sha256()) {
        Some(CertificateProblem::HeaderDigestMismatch)
    } else if cert.mode != header.mode.name() || cert.algorithm != header.mode.algorithm() {
        Some(CertificateProblem::FieldMismatch { field: "mode" })
    } else if cert.key_ids != header.key_ids.iter().map(|id| id.hyphenated().to_string()).collect::<Vec<_>>()
    {
        Some(CertificateProblem::FieldMismatch { field: "key_ids" })
    } else if cert.link_id != header.link_id
        || cert.source_kme_id != header.source_kme_id
        || cert.target_kme_id != header.target_kme_id
    {
        Some(CertificateProblem::FieldMismatch { field: "link" })
    } else {
        None
    };
    if let Some(problem) = problem {
        return CertificateCheck::NotVerifiable(problem);
    }
    match key {
        Some(key) => match signed.verify_signature(key) {
            Ok(()) => CertificateCheck::Verified(signed.certificate),
            Err(problem) => CertificateCheck::NotVerifiable(problem),
        },
        None => CertificateCheck::Unsigned(signed.certificate),
    }
}

/// Verifies a sealed message's certificate offline, without any key material but the sender
/// site's public certificate key: recomputes the ciphertext and header digests, checks the
/// signature and that the certificate describes this message.
pub fn verify_sealed_message(
    input: impl Read,
    sender_key: &CertificateVerifyingKey,
) -> Result<CertificateReport> {
    SealedMessage::read_header(input)?.verify_certificate(sender_key)
}

/// Compares two MAC tags without an early exit, so the time taken does not tell a forger how
/// many leading bytes were right (the lengths are public).
fn tags_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
