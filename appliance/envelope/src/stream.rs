//! AES-256-GCM (one of two backends) and the chunked STREAM construction on top of it.
//!
//! STREAM (Hoang, Reyhanitabar, Rogaway, Vizár, "Online Authenticated-Encryption and its
//! Nonce-Reuse Misuse-Resistance", CRYPTO 2015) seals a message as a sequence of chunks, each an
//! AEAD ciphertext under one key, with the 96-bit nonce
//!
//! ```text
//! nonce = prefix (7 bytes) || chunk counter (u32, big-endian, from 0) || last flag (0x00 or 0x01)
//! ```
//!
//! Every chunk but the last holds exactly `chunk_size` plaintext bytes; the last holds fewer
//! (0 ..= chunk_size - 1). A message whose length is a multiple of the chunk size therefore ends
//! with an empty last chunk: both sides know where a chunk ends without reading ahead, and a
//! reader that meets the end of input after a full chunk knows the message was truncated.
//! Because the counter and the last flag are in the nonce, dropping, reordering, duplicating or
//! truncating chunks makes a tag fail (or the input end early), and only one buffer of
//! `chunk_size + 16` bytes is ever held.

use std::io::{self, Read, Write};

use zeroize::Zeroizing;

use crate::error::{EnvelopeError, Result};

/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// STREAM nonce prefix length (12-byte nonce = 7 prefix + 4 counter + 1 flag).
pub const NONCE_PREFIX_LEN: usize = 7;
/// Default chunk size: 64 KiB of plaintext per chunk.
pub const DEFAULT_CHUNK_SIZE: usize = 64 * 1024;
/// Largest chunk size a reader accepts (it bounds the buffer an input can make us allocate).
pub const MAX_CHUNK_SIZE: usize = 1024 * 1024;

/// The AES-256-GCM backend this build uses (`"ring"` or `"rustcrypto"`).
pub const AES_GCM_BACKEND: &str = if cfg!(feature = "rustcrypto") { "rustcrypto" } else { "ring" };

#[cfg(not(any(feature = "ring", feature = "rustcrypto")))]
compile_error!("qutemail-envelope needs an AES-GCM backend: enable feature `ring` or `rustcrypto`");

/// An AES-256-GCM key schedule of the selected backend.
pub(crate) struct AeadKey {
    #[cfg(not(feature = "rustcrypto"))]
    inner: ring::aead::LessSafeKey,
    #[cfg(feature = "rustcrypto")]
    inner: aes_gcm::Aes256Gcm,
}

impl AeadKey {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        #[cfg(not(feature = "rustcrypto"))]
        {
            // ring only rejects keys of the wrong length, which the array type rules out.
            let unbound = match ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key) {
                Ok(k) => k,
                Err(_) => unreachable!("a 32-byte key is always a valid AES-256 key"),
            };
            Self { inner: ring::aead::LessSafeKey::new(unbound) }
        }
        #[cfg(feature = "rustcrypto")]
        {
            use aes_gcm::KeyInit;
            Self { inner: aes_gcm::Aes256Gcm::new(key.into()) }
        }
    }

    /// Encrypts `buf` in place and appends the tag.
    pub(crate) fn seal_in_place(&self, nonce: [u8; 12], aad: &[u8], buf: &mut Vec<u8>) -> Result<()> {
        #[cfg(not(feature = "rustcrypto"))]
        {
            let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
            self.inner
                .seal_in_place_append_tag(nonce, ring::aead::Aad::from(aad), buf)
                .map_err(|_| EnvelopeError::InvalidParameter("chunk too large for AES-GCM".into()))
        }
        #[cfg(feature = "rustcrypto")]
        {
            use aes_gcm::AeadInOut;
            let tag = self
                .inner
                .encrypt_inout_detached(&nonce.into(), aad, buf.as_mut_slice().into())
                .map_err(|_| EnvelopeError::InvalidParameter("chunk too large for AES-GCM".into()))?;
            buf.extend_from_slice(&tag);
            Ok(())
        }
    }

    /// Decrypts `buf` (ciphertext || tag) in place and removes the tag.
    pub(crate) fn open_in_place(&self, nonce: [u8; 12], aad: &[u8], buf: &mut Vec<u8>) -> Result<()> {
        let Some(body_len) = buf.len().checked_sub(TAG_LEN) else {
            return Err(EnvelopeError::AuthenticationFailed);
        };
        #[cfg(not(feature = "rustcrypto"))]
        {
            let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
            self.inner
                .open_in_place(nonce, ring::aead::Aad::from(aad), buf)
                .map_err(|_| EnvelopeError::AuthenticationFailed)?;
        }
        #[cfg(feature = "rustcrypto")]
        {
            use aes_gcm::AeadInOut;
            let (body, tag) = buf.split_at_mut(body_len);
            let tag = aes_gcm::Tag::try_from(&*tag).map_err(|_| EnvelopeError::AuthenticationFailed)?;
            self.inner
                .decrypt_inout_detached(&nonce.into(), aad, body.into(), &tag)
                .map_err(|_| EnvelopeError::AuthenticationFailed)?;
        }
        buf.truncate(body_len);
        Ok(())
    }
}

/// The 96-bit STREAM nonce of chunk `counter`.
pub(crate) fn stream_nonce(prefix: &[u8; NONCE_PREFIX_LEN], counter: u32, last: bool) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[..NONCE_PREFIX_LEN].copy_from_slice(prefix);
    nonce[NONCE_PREFIX_LEN..11].copy_from_slice(&counter.to_be_bytes());
    nonce[11] = u8::from(last);
    nonce
}

pub(crate) fn check_chunk_size(chunk_size: usize) -> Result<()> {
    if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
        return Err(EnvelopeError::InvalidParameter(format!(
            "chunk size {chunk_size} is outside 1 ..= {MAX_CHUNK_SIZE} bytes"
        )));
    }
    Ok(())
}

/// Reads until `buf` is full or the input ends; returns the number of bytes read.
pub(crate) fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// What a STREAM pass processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamStats {
    pub plaintext_len: u64,
    pub chunks: u64,
}

/// Seals `input` chunk by chunk into `output`.
pub(crate) fn seal_stream(
    key: &AeadKey,
    prefix: &[u8; NONCE_PREFIX_LEN],
    chunk_size: usize,
    aad: &[u8],
    input: &mut impl Read,
    output: &mut impl Write,
) -> Result<StreamStats> {
    check_chunk_size(chunk_size)?;
    let mut buf = Zeroizing::new(Vec::with_capacity(chunk_size + TAG_LEN));
    let mut counter: u32 = 0;
    let mut plaintext_len = 0u64;
    loop {
        buf.clear();
        buf.resize(chunk_size, 0);
        let n = read_full(input, &mut buf).map_err(EnvelopeError::io("reading the plaintext"))?;
        buf.truncate(n);
        plaintext_len += n as u64;
        let last = n < chunk_size;
        key.seal_in_place(stream_nonce(prefix, counter, last), aad, &mut buf)?;
        output.write_all(&buf).map_err(EnvelopeError::io("writing the ciphertext"))?;
        if last {
            return Ok(StreamStats { plaintext_len, chunks: u64::from(counter) + 1 });
        }
        counter = counter.checked_add(1).ok_or_else(|| {
            EnvelopeError::InvalidParameter("message exceeds 2^32 chunks; use a larger chunk size".into())
        })?;
    }
}

/// Opens a STREAM ciphertext chunk by chunk. Plaintext of each chunk is written as soon as its
/// tag verifies; the whole is authentic only when this returns `Ok` (see the crate docs).
pub(crate) fn open_stream(
    key: &AeadKey,
    prefix: &[u8; NONCE_PREFIX_LEN],
    chunk_size: usize,
    aad: &[u8],
    input: &mut impl Read,
    output: &mut impl Write,
) -> Result<StreamStats> {
    check_chunk_size(chunk_size)?;
    let sealed_chunk = chunk_size + TAG_LEN;
    let mut buf = Zeroizing::new(Vec::with_capacity(sealed_chunk));
    let mut counter: u32 = 0;
    let mut plaintext_len = 0u64;
    loop {
        buf.clear();
        buf.resize(sealed_chunk, 0);
        let n = read_full(input, &mut buf).map_err(EnvelopeError::io("reading the ciphertext"))?;
        buf.truncate(n);
        if n < TAG_LEN {
            // The input ended where a chunk should start (or inside a tag): the final chunk,
            // which alone proves the end of the message, is missing.
            return Err(EnvelopeError::Truncated { chunks: u64::from(counter) });
        }
        let last = n < sealed_chunk;
        key.open_in_place(stream_nonce(prefix, counter, last), aad, &mut buf)?;
        output.write_all(&buf).map_err(EnvelopeError::io("writing the plaintext"))?;
        plaintext_len += buf.len() as u64;
        if last {
            // A short read means the input ended (read_full reads until full or end), so bytes
            // after the final chunk cannot exist: they would have joined it and broken its tag.
            return Ok(StreamStats { plaintext_len, chunks: u64::from(counter) + 1 });
        }
        counter = counter.checked_add(1).ok_or(EnvelopeError::AuthenticationFailed)?;
    }
}

/// Length of the STREAM ciphertext of a `plaintext_len`-byte message.
pub fn stream_ciphertext_len(plaintext_len: u64, chunk_size: usize) -> u64 {
    let chunks = plaintext_len / chunk_size as u64 + 1;
    plaintext_len + chunks * TAG_LEN as u64
}
