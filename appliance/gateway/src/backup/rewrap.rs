//! Moving keys between the site's HSM and the archive's key-wrapping key: stored key records
//! (the `wrapped_key` columns) and key files (`site-keys.json`, the web token key).
//!
//! A key is unwrapped only in memory (in `Zeroizing` buffers), for the moment it takes to wrap
//! it again: by the archive key on backup, by the new site's HSM on restore.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use qutemail_hsm::{HsmKeyWrapper, WrappedKey};
use qutemail_vault::{KeyWrapping, VaultError, join_key_record, split_key_record};

use super::BackupError;
use super::archive::ArchiveKeys;

/// A malformed key record, in the backup's terms.
fn record_error(e: VaultError) -> BackupError {
    BackupError::KeyRecord(e.to_string())
}

/// A stored key record (HSM) → the archive's form (archive key; see `qutemail_vault::KeyWrapping`).
pub async fn record_to_archive(
    hsm: &HsmKeyWrapper,
    keys: &ArchiveKeys,
    record: &[u8],
) -> Result<Vec<u8>, BackupError> {
    let (wrapped, rest) = split_key_record(record, KeyWrapping::Hsm).map_err(record_error)?;
    let wrapped = WrappedKey::from_bytes(wrapped).map_err(|e| BackupError::KeyRecord(e.to_string()))?;
    let key = hsm.unwrap_async(&wrapped).await.map_err(BackupError::Hsm)?;
    join_key_record(KeyWrapping::Backup, &keys.wrap(&key)?, rest).map_err(record_error)
}

/// The archive's form of a key record → a record wrapped by this site's HSM.
pub async fn record_from_archive(
    hsm: &HsmKeyWrapper,
    keys: &ArchiveKeys,
    record: &[u8],
) -> Result<Vec<u8>, BackupError> {
    let (wrapped, rest) = split_key_record(record, KeyWrapping::Backup).map_err(record_error)?;
    let key = keys.unwrap(wrapped)?;
    let rewrapped = hsm.wrap_async(&key).await.map_err(BackupError::Hsm)?;
    join_key_record(KeyWrapping::Hsm, rewrapped.as_bytes(), rest).map_err(record_error)
}

/// Which way a key file is being converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// HSM-wrapped secrets → archive-wrapped (backup).
    ToArchive,
    /// Archive-wrapped secrets → wrapped by this site's HSM (restore).
    FromArchive,
}

/// Re-wraps every secret of a key file. Key files (`site-keys.json`, `web-token-key.json`) are
/// JSON objects whose secrets are the top-level string fields named `wrapped_*`, each a base64
/// HSM-wrapped key; everything else (public keys, ids, versions) is copied as it is. Returns the
/// new text and how many secrets it re-wrapped (a key file with none is refused).
pub async fn key_file(
    hsm: &HsmKeyWrapper,
    keys: &ArchiveKeys,
    name: &str,
    text: &[u8],
    direction: Direction,
) -> Result<Vec<u8>, BackupError> {
    let bad = |reason: String| BackupError::KeyFile { name: name.to_owned(), reason };
    let mut value: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let object = value.as_object_mut().ok_or_else(|| bad("not a JSON object".into()))?;
    let mut rewrapped = 0;
    for (field, v) in object.iter_mut() {
        if !field.starts_with("wrapped_") {
            continue;
        }
        let text = v.as_str().ok_or_else(|| bad(format!("{field} is not a string")))?;
        let raw = B64.decode(text).map_err(|e| bad(format!("{field}: {e}")))?;
        let new = match direction {
            Direction::ToArchive => {
                let wrapped = WrappedKey::from_bytes(&raw).map_err(|e| bad(format!("{field}: {e}")))?;
                let key = hsm.unwrap_async(&wrapped).await.map_err(BackupError::Hsm)?;
                keys.wrap(&key)?
            }
            Direction::FromArchive => {
                let key = keys.unwrap(&raw)?;
                hsm.wrap_async(&key).await.map_err(BackupError::Hsm)?.as_bytes().to_vec()
            }
        };
        *v = serde_json::Value::String(B64.encode(new));
        rewrapped += 1;
    }
    if rewrapped == 0 {
        return Err(bad("it holds no wrapped_* secret".into()));
    }
    serde_json::to_vec_pretty(&value).map_err(|e| bad(e.to_string()))
}
