//! The key record kept next to every stored message (the store's `wrapped_key` column):
//! `magic || version 1 || wrapped length (u32 BE) || wrapped data key || rest`, where the rest
//! is what is sealed under the data key (the QKD keys of an inbound envelope, or nothing).
//!
//! The data key is normally wrapped by the site's HSM ([`KeyWrapping::Hsm`], magic `QMKR`). A
//! backup archive carries the same record with the data key wrapped by the archive's key
//! instead ([`KeyWrapping::Backup`], magic `QMKB`), so that one can never be mistaken for the
//! other; restore turns it back into an HSM record of the new site.

use crate::VaultError;

const VERSION: u8 = 1;

/// What wraps a key record's data key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyWrapping {
    /// The site's HSM (every record in a store).
    Hsm,
    /// A backup archive's key-wrapping key (records inside an archive only).
    Backup,
}

impl KeyWrapping {
    fn magic(self) -> &'static [u8; 4] {
        match self {
            KeyWrapping::Hsm => b"QMKR",
            KeyWrapping::Backup => b"QMKB",
        }
    }
}

/// Splits a key record wrapped as `wrapping` into the wrapped data key and the rest.
pub fn split_key_record(record: &[u8], wrapping: KeyWrapping) -> Result<(&[u8], &[u8]), VaultError> {
    let corrupt = |m: String| VaultError::CorruptRecord(m);
    if record.len() < 9 || record[..4] != wrapping.magic()[..] {
        return Err(corrupt(format!("not a key record wrapped by the {wrapping:?} key")));
    }
    if record[4] != VERSION {
        return Err(corrupt(format!("key record version {} (this build reads {VERSION})", record[4])));
    }
    let len = u32::from_be_bytes([record[5], record[6], record[7], record[8]]) as usize;
    let wrapped = record.get(9..9 + len).ok_or_else(|| corrupt("truncated key record".into()))?;
    Ok((wrapped, &record[9 + len..]))
}

/// A key record of `wrapped` (the data key, wrapped as `wrapping`) and `rest`.
pub fn join_key_record(wrapping: KeyWrapping, wrapped: &[u8], rest: &[u8]) -> Result<Vec<u8>, VaultError> {
    let len = u32::try_from(wrapped.len())
        .map_err(|_| VaultError::CorruptRecord("a wrapped data key longer than 4 GiB".into()))?;
    let mut out = Vec::with_capacity(9 + wrapped.len() + rest.len());
    out.extend_from_slice(wrapping.magic());
    out.push(VERSION);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(wrapped);
    out.extend_from_slice(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_keep_their_wrapping_apart() {
        let r = join_key_record(KeyWrapping::Hsm, b"wrapped", b"rest").unwrap();
        assert_eq!(&r[..4], b"QMKR");
        assert_eq!(split_key_record(&r, KeyWrapping::Hsm).unwrap(), (&b"wrapped"[..], &b"rest"[..]));
        assert!(split_key_record(&r, KeyWrapping::Backup).is_err(), "an HSM record is not a backup record");
        assert!(split_key_record(&r[..12], KeyWrapping::Hsm).is_err(), "truncated");
        let mut v2 = r.clone();
        v2[4] = 2;
        assert!(split_key_record(&v2, KeyWrapping::Hsm).is_err(), "unknown version");
        let b = join_key_record(KeyWrapping::Backup, b"w", b"").unwrap();
        assert_eq!(split_key_record(&b, KeyWrapping::Backup).unwrap(), (&b"w"[..], &b""[..]));
    }
}
