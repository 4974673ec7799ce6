//! The persisted form of a wrapped key and the in-band padding of key-wrap
//! payloads.
//!
//! Layout of version 1 (all fields fixed size, no length prefixes):
//!
//! ```text
//! offset 0  "QK"           magic
//! offset 2  0x01           format version
//! offset 3  mechanism tag  0x01 = aes-key-wrap-pad, 0x02 = aes-gcm
//! aes-key-wrap-pad:  offset 4  RFC 5649 output of key || 0x80 || 0x00*  (multiple of 8, >= 16)
//! aes-gcm:           offset 4  IV (12 bytes), offset 16  ciphertext || 16-byte tag,
//!                    the 4 header bytes are the GCM additional authenticated data
//! ```
//!
//! Why the key-wrap payload carries its own padding: SoftHSM 2.6.1 does not
//! strip the RFC 5649 padding when it unwraps a generic secret whose length
//! is not a multiple of 8 (a 17-byte key comes back as 24 bytes). Padding the
//! key to a multiple of 8 with ISO/IEC 7816-4 padding before wrapping means
//! the token never pads, and the true length is recovered from data that the
//! key-wrap integrity check covers — never from an unauthenticated header.

use std::fmt;

use zeroize::Zeroizing;

use crate::config::MAX_KEY_LEN;
use crate::error::HsmError;

const MAGIC: [u8; 2] = *b"QK";
const VERSION_1: u8 = 1;
const HEADER_LEN: usize = 4;
/// Length of the AES-GCM IV stored in blobs (96 bits).
pub(crate) const GCM_IV_LEN: usize = 12;
/// Length of the AES-GCM tag (128 bits).
pub(crate) const GCM_TAG_LEN: usize = 16;
const KW_BLOCK: usize = 8;

/// Mechanism recorded in a [`WrappedKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlobMechanism {
    /// RFC 5649 AES key wrap with padding (`C_WrapKey`).
    AesKeyWrapPad,
    /// AES-256-GCM (`C_Encrypt`) with a 96-bit IV.
    AesGcm,
}

impl BlobMechanism {
    fn tag(self) -> u8 {
        match self {
            BlobMechanism::AesKeyWrapPad => 1,
            BlobMechanism::AesGcm => 2,
        }
    }

    /// Name as used in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            BlobMechanism::AesKeyWrapPad => "aes-key-wrap-pad",
            BlobMechanism::AesGcm => "aes-gcm",
        }
    }
}

/// A key wrapped by the HSM: an opaque, versioned byte blob that stores can
/// persist with [`WrappedKey::to_bytes`] and load with
/// [`WrappedKey::from_bytes`]. It reveals nothing about the key but its
/// approximate length, and it can only be opened by the token's wrapping key.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    bytes: Vec<u8>,
    mechanism: BlobMechanism,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("mechanism", &self.mechanism.name())
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl WrappedKey {
    /// Serialised form, to be stored as is.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    /// Serialised form, borrowed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Consumes the blob and returns its serialised form.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Parses a stored blob. Only the structure is checked here; whether it
    /// is authentic is decided by the HSM at unwrap time.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HsmError> {
        let malformed = |m: String| Err(HsmError::MalformedBlob(m));
        if bytes.len() < HEADER_LEN {
            return malformed(format!("{} bytes is shorter than the header", bytes.len()));
        }
        if bytes[..2] != MAGIC {
            return malformed("not a QuteMail wrapped key (bad magic)".into());
        }
        if bytes[2] != VERSION_1 {
            return malformed(format!("unsupported format version {}", bytes[2]));
        }
        let payload_len = bytes.len() - HEADER_LEN;
        let mechanism = match bytes[3] {
            1 => {
                if payload_len < 2 * KW_BLOCK
                    || !payload_len.is_multiple_of(KW_BLOCK)
                    || payload_len > padded_len(MAX_KEY_LEN) + KW_BLOCK
                {
                    return malformed(format!("key-wrap payload of {payload_len} bytes is impossible"));
                }
                BlobMechanism::AesKeyWrapPad
            }
            2 => {
                if !(GCM_IV_LEN + GCM_TAG_LEN + 1..=GCM_IV_LEN + GCM_TAG_LEN + MAX_KEY_LEN)
                    .contains(&payload_len)
                {
                    return malformed(format!("AES-GCM payload of {payload_len} bytes is impossible"));
                }
                BlobMechanism::AesGcm
            }
            t => return malformed(format!("unknown mechanism tag {t}")),
        };
        Ok(WrappedKey { bytes: bytes.to_vec(), mechanism })
    }

    /// Mechanism that produced this blob.
    pub fn mechanism(&self) -> BlobMechanism {
        self.mechanism
    }

    pub(crate) fn new_key_wrap(wrapped: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(HEADER_LEN + wrapped.len());
        bytes.extend_from_slice(&header(BlobMechanism::AesKeyWrapPad));
        bytes.extend_from_slice(wrapped);
        WrappedKey { bytes, mechanism: BlobMechanism::AesKeyWrapPad }
    }

    pub(crate) fn new_gcm(iv: &[u8; GCM_IV_LEN], ciphertext_and_tag: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(HEADER_LEN + GCM_IV_LEN + ciphertext_and_tag.len());
        bytes.extend_from_slice(&header(BlobMechanism::AesGcm));
        bytes.extend_from_slice(iv);
        bytes.extend_from_slice(ciphertext_and_tag);
        WrappedKey { bytes, mechanism: BlobMechanism::AesGcm }
    }

    /// The header bytes, used as GCM associated data.
    pub(crate) fn header(&self) -> &[u8] {
        &self.bytes[..HEADER_LEN]
    }

    /// Everything after the header (key-wrap output, or IV || ciphertext || tag).
    pub(crate) fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }
}

/// The header for `mechanism` (GCM associated data).
pub(crate) fn header(mechanism: BlobMechanism) -> [u8; HEADER_LEN] {
    [MAGIC[0], MAGIC[1], VERSION_1, mechanism.tag()]
}

fn padded_len(key_len: usize) -> usize {
    (key_len / KW_BLOCK + 1) * KW_BLOCK
}

/// `key || 0x80 || 0x00*` up to the next multiple of 8 (always adds 1..=8 bytes).
pub(crate) fn pad_for_key_wrap(key: &[u8]) -> Zeroizing<Vec<u8>> {
    let total = padded_len(key.len());
    let mut out = Zeroizing::new(Vec::with_capacity(total));
    out.extend_from_slice(key);
    out.push(0x80);
    out.resize(total, 0);
    out
}

/// Removes the padding added by [`pad_for_key_wrap`] in place (no copy).
pub(crate) fn unpad_key_wrap(mut value: Zeroizing<Vec<u8>>) -> Result<Zeroizing<Vec<u8>>, String> {
    if value.is_empty() || !value.len().is_multiple_of(KW_BLOCK) {
        return Err(format!("unwrapped value of {} bytes is not block aligned", value.len()));
    }
    let zeros = value.iter().rev().take_while(|b| **b == 0).count();
    if zeros >= KW_BLOCK || zeros == value.len() {
        return Err("unwrapped value has no padding marker".into());
    }
    let marker = value.len() - zeros - 1;
    if value[marker] != 0x80 {
        return Err("unwrapped value has an invalid padding marker".into());
    }
    value.truncate(marker);
    if value.is_empty() {
        return Err("unwrapped key is empty".into());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_round_trip_all_lengths() {
        for len in 1..=40usize {
            let key: Vec<u8> = (0..len).map(|i| if i % 3 == 0 { 0 } else { 0x80 }).collect();
            let padded = pad_for_key_wrap(&key);
            assert_eq!(padded.len() % 8, 0);
            assert!(padded.len() > key.len() && padded.len() <= key.len() + 8);
            let back = unpad_key_wrap(padded).expect("unpad");
            assert_eq!(&back[..], &key[..]);
        }
    }

    #[test]
    fn padding_rejects_garbage() {
        for bad in [vec![], vec![0u8; 8], vec![1u8; 8], vec![0x80, 0, 0, 0, 0, 0, 0, 0], {
            let mut v = vec![1u8; 16];
            v[7] = 0x80;
            v[8..].fill(0);
            v
        }] {
            assert!(unpad_key_wrap(Zeroizing::new(bad.clone())).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn blob_parsing() {
        let kw = WrappedKey::new_key_wrap(&[7u8; 24]);
        let parsed = WrappedKey::from_bytes(&kw.to_bytes()).expect("parse");
        assert_eq!(parsed, kw);
        assert_eq!(parsed.mechanism(), BlobMechanism::AesKeyWrapPad);

        let gcm = WrappedKey::new_gcm(&[1u8; 12], &[2u8; 48]);
        let parsed = WrappedKey::from_bytes(gcm.as_bytes()).expect("parse");
        assert_eq!(parsed.mechanism(), BlobMechanism::AesGcm);
        assert_eq!(parsed.header(), &header(BlobMechanism::AesGcm));
        assert_eq!(&parsed.payload()[..12], &[1u8; 12]);

        let mut b = kw.to_bytes();
        b[2] = 9;
        assert!(WrappedKey::from_bytes(&b).is_err());
        let mut b = kw.to_bytes();
        b[0] = b'X';
        assert!(WrappedKey::from_bytes(&b).is_err());
        let mut b = kw.to_bytes();
        b[3] = 7;
        assert!(WrappedKey::from_bytes(&b).is_err());
        let mut b = kw.to_bytes();
        b.pop();
        assert!(WrappedKey::from_bytes(&b).is_err());
        assert!(WrappedKey::from_bytes(&[]).is_err());
        assert!(WrappedKey::from_bytes(&gcm.as_bytes()[..4 + 12 + 16]).is_err());
        assert!(!format!("{kw:?}").contains("7, 7"));
    }
}
