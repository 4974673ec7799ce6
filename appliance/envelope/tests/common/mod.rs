//! Fixtures shared by the integration tests: fixed keys, headers and randomness, so that every
//! test is deterministic, and helpers to seal and open in memory.
#![allow(dead_code)] // each test binary uses a different subset

use qutemail_envelope::*;
use uuid::Uuid;
use zeroize::Zeroizing;

pub const SUBJECT_CANARY: &str = "CANARY-SUBJECT-7f3a9c";
pub const BODY_CANARY: &str = "CANARY-BODY-1b2c3d";
pub const ATTACHMENT_CANARY: &str = "CANARY-ATTACHMENT-e5f6a7";

pub fn routing() -> RoutingHeaders {
    RoutingHeaders {
        from: "Alice <alice@a.example>".into(),
        to: "Bob <bob@b.example>, Carol <carol@b.example>".into(),
        cc: Some("dave@b.example".into()),
        date: "Wed, 25 Nov 2026 12:00:00 +0000".into(),
        message_id: "<20261125120000.1@a.example>".into(),
    }
}

pub fn link() -> LinkInfo {
    LinkInfo {
        link_id: "link-a-b".into(),
        source_kme_id: "KME-A".into(),
        target_kme_id: "KME-B".into(),
        qber_ppm: 21_500,
        key_rate_bps: 12_000,
    }
}

/// A 256-bit QKD key with a recognisable ID and pattern.
pub fn qkd_key(n: u8) -> QkdKey {
    let id = Uuid::from_bytes([n; 16]);
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(7).wrapping_add(n.wrapping_mul(31))).collect();
    QkdKey::new(id, Zeroizing::new(bytes))
}

/// Enough 256-bit keys to cover an OTP message of `len` bytes.
pub fn otp_keys(len: usize) -> Vec<QkdKey> {
    (0..otp_keys_needed(len, 32)).map(|i| qkd_key(100u8.wrapping_add(i as u8))).collect()
}

pub fn site_b_kem() -> SiteKemSecretKey {
    SiteKemSecretKey::from_seed(&Zeroizing::new([0x42; 64])).expect("seed gives a key")
}

pub fn other_kem() -> SiteKemSecretKey {
    SiteKemSecretKey::from_seed(&Zeroizing::new([0x43; 64])).expect("seed gives a key")
}

pub fn signer() -> InMemorySigner {
    InMemorySigner::from_seed("a.example/cert-1", &Zeroizing::new([0x11; 32]))
}

pub fn randomness() -> SealRandomness {
    SealRandomness { salt: [0x5a; 32], kem_seed: Zeroizing::new([0x6b; 32]) }
}

/// An inner RFC 5322 message carrying the three canaries, about `len` bytes.
pub fn inner_message(extra: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Alice <alice@a.example>\r\nTo: Bob <bob@b.example>\r\nSubject: {SUBJECT_CANARY}\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n\
         Content-Type: text/plain\r\n\r\n{BODY_CANARY}\r\n--b1\r\nContent-Type: application/pdf\r\n\r\n\
         {ATTACHMENT_CANARY}\r\n"
    )
    .into_bytes();
    m.extend((0..extra).map(|i| b'a' + (i % 26) as u8));
    m.extend_from_slice(b"\r\n--b1--\r\n");
    m
}

/// The keys a mode needs for a message of `len` bytes (sealer side).
pub struct Keys {
    pub qkd: Vec<QkdKey>,
    pub kem: SiteKemSecretKey,
}

pub fn keys_for(mode: Mode, len: usize) -> Keys {
    let qkd = match mode {
        Mode::Qaes | Mode::Hybrid => vec![qkd_key(1)],
        Mode::Otp => otp_keys(len),
        Mode::Pqc => Vec::new(),
    };
    Keys { qkd, kem: site_b_kem() }
}

pub fn seal_with(mode: Mode, plaintext: &[u8], chunk_size: usize, keys: &Keys) -> (Vec<u8>, SealSummary) {
    let routing = routing();
    let link = link();
    let mut request = SealRequest::new(mode, &routing, "a.example", 1_795_000_000);
    request.chunk_size = chunk_size;
    request.qkd_keys = &keys.qkd;
    if mode.uses_qkd() {
        request.link = Some(&link);
    }
    request.recipient_kem_key = Some(keys.kem.public_key());
    let mut out = Vec::new();
    let summary = seal(&request, &signer(), &randomness(), plaintext, &mut out).expect("seal");
    (out, summary)
}

pub fn open_with(sealed: &[u8], keys: &Keys) -> Result<(Zeroizing<Vec<u8>>, OpenReport)> {
    let verifying = signer().verifying_key();
    let message = SealedMessage::read_header(sealed)?;
    let open_keys = OpenKeys {
        qkd_keys: &keys.qkd,
        kem_secret_key: Some(&keys.kem),
        sender_certificate_key: Some(&verifying),
        ..OpenKeys::default()
    };
    message.open_to_vec(&open_keys)
}

/// Finds `needle` in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
