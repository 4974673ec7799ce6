//! The at-rest blob: how the store keeps local mail, `normal` mail and anything else that is not
//! (or no longer) in an envelope (`docs/envelope-format.md` § 8).
//!
//! ```text
//! blob   = header || STREAM ciphertext
//! header = "QMAR" || version (0x01) || chunk size (u32 big-endian) || nonce prefix (7 bytes)
//! ```
//!
//! Sixteen header bytes, which are also the associated data of every chunk, so a changed chunk
//! size or prefix fails authentication. The data key is a fresh random 256-bit key per blob,
//! supplied by the caller, who wraps it with the HSM and stores the wrapped key beside the blob.
//! Never encrypt two blobs under one data key.

use std::io::{Read, Write};

use zeroize::Zeroizing;

use crate::error::{EnvelopeError, Result};
use crate::stream::{self, AeadKey, DEFAULT_CHUNK_SIZE, NONCE_PREFIX_LEN, read_full};

/// Magic bytes that open every at-rest blob.
pub const AT_REST_MAGIC: [u8; 4] = *b"QMAR";
/// At-rest blob format version.
pub const AT_REST_VERSION: u8 = 1;
/// Header length.
pub const AT_REST_HEADER_LEN: usize = 16;

/// A per-blob data key (256 bits), zeroized on drop.
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Self> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut()).map_err(|e| EnvelopeError::Random(e.to_string()))?;
        Ok(Self(key))
    }

    /// Wraps key bytes (e.g. unwrapped by the HSM).
    pub fn from_bytes(key: Zeroizing<[u8; 32]>) -> Self {
        Self(key)
    }

    /// The key bytes, for the caller to wrap with the HSM.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// The parameters of one seal: chunk size and nonce prefix (random in production).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtRestParams {
    /// Plaintext bytes per chunk.
    pub chunk_size: usize,
    /// STREAM nonce prefix.
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
}

impl AtRestParams {
    /// The default chunk size and a fresh random nonce prefix.
    pub fn generate() -> Result<Self> {
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        getrandom::fill(&mut nonce_prefix).map_err(|e| EnvelopeError::Random(e.to_string()))?;
        Ok(Self { chunk_size: DEFAULT_CHUNK_SIZE, nonce_prefix })
    }

    fn header(&self) -> Result<[u8; AT_REST_HEADER_LEN]> {
        stream::check_chunk_size(self.chunk_size)?;
        let chunk = u32::try_from(self.chunk_size)
            .map_err(|_| EnvelopeError::InvalidParameter("chunk size exceeds u32".into()))?;
        let mut header = [0u8; AT_REST_HEADER_LEN];
        header[..4].copy_from_slice(&AT_REST_MAGIC);
        header[4] = AT_REST_VERSION;
        header[5..9].copy_from_slice(&chunk.to_be_bytes());
        header[9..].copy_from_slice(&self.nonce_prefix);
        Ok(header)
    }
}

/// Seals `plaintext` into an at-rest blob written to `output`; returns the plaintext length.
pub fn seal_at_rest(
    key: &DataKey,
    params: &AtRestParams,
    mut plaintext: impl Read,
    mut output: impl Write,
) -> Result<u64> {
    let header = params.header()?;
    output.write_all(&header).map_err(EnvelopeError::io("writing the at-rest blob"))?;
    let aead = AeadKey::new(key.as_bytes());
    let stats = stream::seal_stream(
        &aead,
        &params.nonce_prefix,
        params.chunk_size,
        &header,
        &mut plaintext,
        &mut output,
    )?;
    output.flush().map_err(EnvelopeError::io("writing the at-rest blob"))?;
    Ok(stats.plaintext_len)
}

/// Opens an at-rest blob into `output`; returns the plaintext length. As with envelopes,
/// plaintext is released chunk by chunk and is authentic only once this returns `Ok`.
pub fn open_at_rest(key: &DataKey, mut blob: impl Read, mut output: impl Write) -> Result<u64> {
    let mut header = [0u8; AT_REST_HEADER_LEN];
    let n = read_full(&mut blob, &mut header).map_err(EnvelopeError::io("reading the at-rest blob"))?;
    if n < AT_REST_HEADER_LEN || header[..4] != AT_REST_MAGIC {
        return Err(EnvelopeError::NotAnEnvelope("not an at-rest blob (bad magic)".into()));
    }
    if header[4] != AT_REST_VERSION {
        return Err(EnvelopeError::UnsupportedVersion { found: header[4].to_string(), supported: 1 });
    }
    let chunk_size = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) as usize;
    let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
    nonce_prefix.copy_from_slice(&header[9..]);
    let aead = AeadKey::new(key.as_bytes());
    let stats = stream::open_stream(&aead, &nonce_prefix, chunk_size, &header, &mut blob, &mut output)
        .map_err(|e| match e {
            EnvelopeError::InvalidParameter(m) => EnvelopeError::Malformed(m),
            other => other,
        })?;
    output.flush().map_err(EnvelopeError::io("writing the plaintext"))?;
    Ok(stats.plaintext_len)
}

/// Opens an at-rest blob into memory; the plaintext is returned only if it all verified.
pub fn open_at_rest_to_vec(key: &DataKey, blob: impl Read) -> Result<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(Vec::new());
    open_at_rest(key, blob, &mut *out)?;
    Ok(out)
}
