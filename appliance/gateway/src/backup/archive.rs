//! The backup archive's outer format: a small plaintext header, then one at-rest blob of the
//! envelope crate (`docs/envelope-format.md` § 8: AES-256-GCM in STREAM chunks) whose
//! plaintext is a sequence of records.
//!
//! ```text
//! archive = header || at-rest blob
//! header  = "QMBACKUP" || version (0x01) || kdf (0x01 = argon2id v1.3)
//!           || memory KiB (u32 BE) || passes (u32 BE) || lanes (u32 BE) || salt (16 bytes)
//!           || passphrase check (16 bytes)
//! record  = tag (1 byte) || length (u64 BE) || body
//! ```
//!
//! The operator's passphrase gives, through argon2id with the header's parameters and salt, a
//! 256-bit master secret; HKDF-SHA256 (salt: the whole header) expands it into the archive key
//! (the at-rest blob's data key) and the key-wrapping key (each stored message key and site key
//! is wrapped under it on its own, so no key appears unwrapped even in the decrypted record
//! stream), and a 16-byte passphrase check kept in the header, so that a wrong passphrase is
//! told apart from a damaged archive (it lets an attacker test a guess no faster than
//! decrypting the first chunk would). The header bytes before the check feed the key
//! derivation, so a changed header gives other keys: it reads as a wrong passphrase.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use zeroize::Zeroizing;

use super::BackupError;

/// Magic bytes that open every archive.
pub const MAGIC: [u8; 8] = *b"QMBACKUP";
/// Archive format version.
pub const VERSION: u8 = 1;
/// The one key derivation function: argon2id, version 0x13.
const KDF_ARGON2ID: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 54;
/// The header bytes the keys are bound to (all but the check).
const BOUND_LEN: usize = 38;
const SALT_LEN: usize = 16;
const CHECK_LEN: usize = 16;

/// The associated data of every individually wrapped key.
const KEY_WRAP_AAD: &[u8] = b"qutemail backup wrapped key v1";

/// Record tags.
pub mod tag {
    /// JSON [`super::super::ArchiveInfo`]: who made the archive, first.
    pub const INFO: u8 = b'I';
    /// A key file (JSON `{name, text}`) with its wrapped secrets re-wrapped for the archive.
    pub const KEY_FILE: u8 = b'K';
    /// A blob: its 32-character id, then its bytes, exactly as stored (sealed).
    pub const BLOB: u8 = b'B';
    /// The store dump (JSON), key columns re-wrapped for the archive.
    pub const STORE: u8 = b'S';
    /// JSON manifest: counts and SHA-256 of every part.
    pub const MANIFEST: u8 = b'M';
    /// End of the archive (empty body).
    pub const END: u8 = b'E';
}

/// Length of a record's tag and length fields.
pub const RECORD_HEAD_LEN: usize = 9;

/// argon2id cost of the passphrase derivation, as recorded in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub passes: u32,
    /// Lanes.
    pub lanes: u32,
}

impl KdfParams {
    /// 64 MiB, 3 passes, 1 lane: the second recommended option of RFC 9106 § 4 with one lane
    /// (the appliance has two cores and keeps serving mail during a backup); a second or so
    /// per derivation, once per backup or restore.
    pub const DEFAULT: KdfParams = KdfParams { memory_kib: 64 * 1024, passes: 3, lanes: 1 };

    /// Bounds a restore accepts from a header (a damaged header must not make the restore
    /// allocate gigabytes before it can say the archive is bad).
    fn check(self) -> Result<(), BackupError> {
        let ok = (8 * 1024..=1024 * 1024).contains(&self.memory_kib)
            && (1..=64).contains(&self.passes)
            && (1..=16).contains(&self.lanes);
        if ok {
            Ok(())
        } else {
            Err(BackupError::NotAnArchive(format!(
                "implausible key derivation parameters ({} KiB, {} passes, {} lanes)",
                self.memory_kib, self.passes, self.lanes
            )))
        }
    }
}

/// The plaintext header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// argon2id parameters.
    pub kdf: KdfParams,
    /// argon2id salt (random per archive, so every archive has its own keys).
    pub salt: [u8; SALT_LEN],
    /// Passphrase check value ([`ArchiveKeys::check`]).
    pub check: [u8; CHECK_LEN],
}

impl Header {
    /// A header with fresh random salt.
    pub fn generate(kdf: KdfParams) -> Result<Header, BackupError> {
        let mut salt = [0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(|e| BackupError::Internal(format!("random generator: {e}")))?;
        Ok(Header { kdf, salt, check: [0; CHECK_LEN] })
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8] = VERSION;
        out[9] = KDF_ARGON2ID;
        out[10..14].copy_from_slice(&self.kdf.memory_kib.to_be_bytes());
        out[14..18].copy_from_slice(&self.kdf.passes.to_be_bytes());
        out[18..22].copy_from_slice(&self.kdf.lanes.to_be_bytes());
        out[22..BOUND_LEN].copy_from_slice(&self.salt);
        out[BOUND_LEN..].copy_from_slice(&self.check);
        out
    }

    /// Parses a header.
    pub fn parse(bytes: &[u8]) -> Result<Header, BackupError> {
        if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
            return Err(BackupError::NotAnArchive("it does not start with a QuteMail backup header".into()));
        }
        if bytes[8] != VERSION {
            return Err(BackupError::NotAnArchive(format!(
                "archive format version {} (this build reads version {VERSION})",
                bytes[8]
            )));
        }
        if bytes[9] != KDF_ARGON2ID {
            return Err(BackupError::NotAnArchive(format!("unknown key derivation {}", bytes[9])));
        }
        let u32_at = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let kdf = KdfParams { memory_kib: u32_at(10), passes: u32_at(14), lanes: u32_at(18) };
        kdf.check()?;
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&bytes[22..BOUND_LEN]);
        let mut check = [0u8; CHECK_LEN];
        check.copy_from_slice(&bytes[BOUND_LEN..HEADER_LEN]);
        Ok(Header { kdf, salt, check })
    }
}

/// The two keys of one archive, derived from the passphrase; wiped on drop.
pub struct ArchiveKeys {
    archive: Zeroizing<[u8; 32]>,
    wrapping: LessSafeKey,
    /// The passphrase check value for the header.
    pub check: [u8; CHECK_LEN],
}

impl std::fmt::Debug for ArchiveKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ArchiveKeys(..)")
    }
}

/// Derives the archive's keys from `passphrase` (argon2id, then HKDF-SHA256 bound to the
/// header). Takes about a second: run it off the async runtime's threads.
pub fn derive_keys(passphrase: &[u8], header: &Header) -> Result<ArchiveKeys, BackupError> {
    let params = argon2::Params::new(header.kdf.memory_kib, header.kdf.passes, header.kdf.lanes, Some(32))
        .map_err(|e| BackupError::NotAnArchive(format!("key derivation parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut master = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, &header.salt, master.as_mut_slice())
        .map_err(|e| BackupError::Internal(format!("argon2id: {e}")))?;
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &header.to_bytes()[..BOUND_LEN]).extract(master.as_slice());
    let expand = |info: &'static [u8]| -> Result<Zeroizing<[u8; 32]>, BackupError> {
        let mut out = Zeroizing::new([0u8; 32]);
        prk.expand(&[info], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(out.as_mut_slice()))
            .map_err(|_| BackupError::Internal("HKDF expansion failed".into()))?;
        Ok(out)
    };
    let archive = expand(b"qutemail backup v1 archive key")?;
    let wrap = expand(b"qutemail backup v1 key wrapping key")?;
    let wrapping = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, wrap.as_slice())
            .map_err(|_| BackupError::Internal("AES-256-GCM key setup failed".into()))?,
    );
    let check_key = expand(b"qutemail backup v1 passphrase check")?;
    let mut check = [0u8; CHECK_LEN];
    check.copy_from_slice(&check_key[..CHECK_LEN]);
    Ok(ArchiveKeys { archive, wrapping, check })
}

impl Header {
    /// Whether `keys` were derived from the passphrase this archive was made with.
    pub fn passphrase_matches(&self, keys: &ArchiveKeys) -> bool {
        self.check.iter().zip(keys.check.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl ArchiveKeys {
    /// The at-rest blob's data key (a copy, for the sealing thread; wiped on drop).
    pub fn data_key(&self) -> qutemail_envelope::at_rest::DataKey {
        qutemail_envelope::at_rest::DataKey::from_bytes(self.archive.clone())
    }

    /// Wraps one key for the archive: random nonce || AES-256-GCM(key) || tag.
    pub fn wrap(&self, key: &[u8]) -> Result<Vec<u8>, BackupError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| BackupError::Internal(format!("random generator: {e}")))?;
        let mut sealed = Zeroizing::new(key.to_vec());
        self.wrapping
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(KEY_WRAP_AAD),
                &mut *sealed,
            )
            .map_err(|_| BackupError::Internal("AES-256-GCM sealing failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Unwraps a key wrapped by [`Self::wrap`] with the same passphrase and header.
    pub fn unwrap(&self, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, BackupError> {
        let damaged = || BackupError::Damaged("a key in the archive does not authenticate".into());
        if wrapped.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(damaged());
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| damaged())?;
        let mut buf = Zeroizing::new(sealed.to_vec());
        let len = self
            .wrapping
            .open_in_place(nonce, Aad::from(KEY_WRAP_AAD), &mut buf)
            .map_err(|_| damaged())?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// The head of a record.
pub fn record_head(tag: u8, len: u64) -> [u8; RECORD_HEAD_LEN] {
    let mut head = [0u8; RECORD_HEAD_LEN];
    head[0] = tag;
    head[1..].copy_from_slice(&len.to_be_bytes());
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: KdfParams = KdfParams { memory_kib: 8 * 1024, passes: 1, lanes: 1 };

    #[test]
    fn the_header_round_trips_and_refuses_foreign_files() {
        let h = Header::generate(KdfParams::DEFAULT).unwrap();
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
        assert!(matches!(Header::parse(b"QMAR\x01"), Err(BackupError::NotAnArchive(_))));
        let mut v2 = h.to_bytes();
        v2[8] = 2;
        let e = Header::parse(&v2).unwrap_err().to_string();
        assert!(e.contains("version 2"), "{e}");
        let mut huge = h.to_bytes();
        huge[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Header::parse(&huge), Err(BackupError::NotAnArchive(_))));
    }

    #[test]
    fn a_wrapped_key_opens_only_with_the_same_passphrase_and_header() {
        let h = Header::generate(CHEAP).unwrap();
        let keys = derive_keys(b"correct horse battery", &h).unwrap();
        let mut h = h;
        h.check = keys.check;
        assert!(h.passphrase_matches(&keys));
        let wrapped = keys.wrap(&[7u8; 32]).unwrap();
        assert!(!wrapped.windows(32).any(|w| w == [7u8; 32]));
        assert_eq!(&keys.unwrap(&wrapped).unwrap()[..], &[7u8; 32]);
        let other = derive_keys(b"correct horse battery!", &h).unwrap();
        assert!(!h.passphrase_matches(&other));
        assert!(matches!(other.unwrap(&wrapped), Err(BackupError::Damaged(_))));
        let mut h2 = h.clone();
        h2.salt[0] ^= 1;
        let moved = derive_keys(b"correct horse battery", &h2).unwrap();
        assert!(moved.unwrap(&wrapped).is_err());
        let mut flipped = wrapped.clone();
        flipped[20] ^= 1;
        assert!(keys.unwrap(&flipped).is_err());
    }
}
