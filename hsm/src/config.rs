//! Configuration of the HSM key wrapper (deserialised with serde, e.g. from
//! the `[hsm]` table of a daemon's TOML file).

use std::fmt;
use std::io::Read;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::HsmError;

/// `CKM_AES_KEY_WRAP_PAD` as numbered before PKCS#11 v3.0 (0x210A). This is
/// the id under which SoftHSM 2.6.1 offers RFC 5649 AES key wrap with padding.
pub const CKM_AES_KEY_WRAP_PAD_PRE_V3: u64 = 0x210A;
/// `CKM_AES_KEY_WRAP_KWP` (0x210B), the PKCS#11 v3.0 id of RFC 5649.
pub const CKM_AES_KEY_WRAP_KWP_V3: u64 = 0x210B;

/// First vendor-defined mechanism id (`CKM_VENDOR_DEFINED`).
pub const CKM_VENDOR_DEFINED_BASE: u64 = 0x8000_0000;

/// Largest key (in bytes) accepted by `wrap`.
pub const MAX_KEY_LEN: usize = 64 * 1024;

/// Largest supported worker pool.
pub const MAX_POOL_SIZE: usize = 64;

/// Configuration of an [`crate::HsmKeyWrapper`].
///
/// Example (TOML):
///
/// ```toml
/// module_path = "/usr/lib/softhsm/libsofthsm2.so"
/// token = { label = "qutemail" }
/// pin = { file = "/run/credentials/kmd.service/hsm-pin" }
/// wrapping_key_label = "qutemail-kek-v1"
/// mechanism = { kind = "aes-key-wrap-pad", mechanism_id = 0x210A }
/// pool_size = 4
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// Absolute path of the vendor's PKCS#11 module (shared library),
    /// e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module_path: PathBuf,
    /// Which token to use: `{ label = "..." }` or `{ serial = "..." }`.
    /// Selecting by serial is unambiguous; a label that matches several
    /// tokens is an error.
    pub token: TokenSelector,
    /// Where the token's user PIN comes from: `{ file = "/path" }` (the
    /// whole file, one trailing newline removed) or `{ env = "VAR_NAME" }`.
    /// The PIN itself never appears in the configuration or on a command line.
    pub pin: PinSource,
    /// `CKA_LABEL` of the AES-256 wrapping key inside the token. Created
    /// (non-extractable, sensitive) when absent; it is an error if several
    /// secret keys carry this label.
    pub wrapping_key_label: String,
    /// How key material is protected; defaults to
    /// `{ kind = "aes-key-wrap-pad", mechanism_id = 0x210A }`.
    #[serde(default)]
    pub mechanism: WrapMechanism,
    /// Number of PKCS#11 sessions, each owned by one worker thread
    /// (1..=64, default 4). This many wrap/unwrap calls run in parallel.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

fn default_pool_size() -> usize {
    4
}

/// Selects the token inside the PKCS#11 module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenSelector {
    /// The token label (`CKA_LABEL` of the token, trailing blanks ignored).
    Label(String),
    /// The token serial number (trailing blanks ignored).
    Serial(String),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "token labelled {l:?}"),
            TokenSelector::Serial(s) => write!(f, "token with serial {s:?}"),
        }
    }
}

/// Where the user PIN is read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PinSource {
    /// Path of a file holding the PIN (e.g. a systemd credential). One
    /// trailing `\n` or `\r\n` is removed. A warning is logged when the file
    /// is readable by group or others.
    File(PathBuf),
    /// Name of an environment variable holding the PIN.
    Env(String),
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "file {}", p.display()),
            PinSource::Env(v) => write!(f, "environment variable {v}"),
        }
    }
}

/// How the wrapping key protects key material.
///
/// In configuration files: `{ kind = "aes-key-wrap-pad", mechanism_id = 0x210A }`
/// (`mechanism_id` optional, default 0x210A) or `{ kind = "aes-gcm" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "MechanismSpec", into = "MechanismSpec")]
pub enum WrapMechanism {
    /// RFC 5649 AES key wrap with padding through `C_WrapKey` /
    /// `C_UnwrapKey`: the key is imported as a session secret-key object
    /// and wrapped by the token. Integrity is built into the mechanism.
    AesKeyWrapPad {
        /// PKCS#11 mechanism id of RFC 5649 on this token: 0x210A
        /// (`CKM_AES_KEY_WRAP_PAD`, pre-v3.0 numbering, SoftHSM 2.6.1 and
        /// the default) or 0x210B (`CKM_AES_KEY_WRAP_KWP`, PKCS#11 v3.0),
        /// or a vendor-defined id (>= 0x80000000).
        mechanism_id: u64,
    },
    /// AES-256-GCM through `C_Encrypt` / `C_Decrypt` inside the token,
    /// with a fresh random 96-bit IV (from the token's RNG) per blob and a
    /// 128-bit tag; the IV is stored in the blob and the blob header is
    /// authenticated as associated data.
    AesGcm,
}

/// The on-disk shape of [`WrapMechanism`] (a flat table, so that unknown
/// keys are rejected for every kind).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MechanismSpec {
    /// `aes-key-wrap-pad` or `aes-gcm`.
    kind: MechanismKind,
    /// Only for `aes-key-wrap-pad`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mechanism_id: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum MechanismKind {
    AesKeyWrapPad,
    AesGcm,
}

impl TryFrom<MechanismSpec> for WrapMechanism {
    type Error = String;
    fn try_from(spec: MechanismSpec) -> Result<Self, String> {
        match (spec.kind, spec.mechanism_id) {
            (MechanismKind::AesKeyWrapPad, id) => {
                Ok(WrapMechanism::AesKeyWrapPad { mechanism_id: id.unwrap_or(CKM_AES_KEY_WRAP_PAD_PRE_V3) })
            }
            (MechanismKind::AesGcm, None) => Ok(WrapMechanism::AesGcm),
            (MechanismKind::AesGcm, Some(_)) => {
                Err("mechanism_id only applies to kind = \"aes-key-wrap-pad\"".into())
            }
        }
    }
}

impl From<WrapMechanism> for MechanismSpec {
    fn from(m: WrapMechanism) -> Self {
        match m {
            WrapMechanism::AesKeyWrapPad { mechanism_id } => {
                MechanismSpec { kind: MechanismKind::AesKeyWrapPad, mechanism_id: Some(mechanism_id) }
            }
            WrapMechanism::AesGcm => MechanismSpec { kind: MechanismKind::AesGcm, mechanism_id: None },
        }
    }
}

impl Default for WrapMechanism {
    fn default() -> Self {
        WrapMechanism::AesKeyWrapPad { mechanism_id: CKM_AES_KEY_WRAP_PAD_PRE_V3 }
    }
}

impl WrapMechanism {
    /// Short name as used in the configuration (`aes-key-wrap-pad` / `aes-gcm`).
    pub fn name(&self) -> &'static str {
        match self {
            WrapMechanism::AesKeyWrapPad { .. } => "aes-key-wrap-pad",
            WrapMechanism::AesGcm => "aes-gcm",
        }
    }
}

impl HsmConfig {
    /// A configuration with the defaults for mechanism and pool size.
    pub fn new(
        module_path: impl Into<PathBuf>,
        token: TokenSelector,
        pin: PinSource,
        wrapping_key_label: impl Into<String>,
    ) -> Self {
        HsmConfig {
            module_path: module_path.into(),
            token,
            pin,
            wrapping_key_label: wrapping_key_label.into(),
            mechanism: WrapMechanism::default(),
            pool_size: default_pool_size(),
        }
    }

    /// Checks the values that serde cannot check.
    pub fn validate(&self) -> Result<(), HsmError> {
        let bad = |m: String| Err(HsmError::InvalidConfig(m));
        if self.module_path.as_os_str().is_empty() {
            return bad("module_path is empty".into());
        }
        match &self.token {
            TokenSelector::Label(l) if l.trim().is_empty() => return bad("token label is empty".into()),
            TokenSelector::Serial(s) if s.trim().is_empty() => return bad("token serial is empty".into()),
            TokenSelector::Label(l) if l.len() > 32 => {
                return bad(format!("token label {l:?} is longer than the 32 bytes PKCS#11 allows"));
            }
            TokenSelector::Serial(s) if s.len() > 16 => {
                return bad(format!("token serial {s:?} is longer than the 16 bytes PKCS#11 allows"));
            }
            _ => {}
        }
        match &self.pin {
            PinSource::File(p) if p.as_os_str().is_empty() => return bad("pin file path is empty".into()),
            PinSource::Env(v) if v.is_empty() || v.contains('=') || v.contains('\0') => {
                return bad(format!("pin environment variable name {v:?} is not a valid name"));
            }
            _ => {}
        }
        if self.wrapping_key_label.is_empty() {
            return bad("wrapping_key_label is empty".into());
        }
        if self.pool_size == 0 || self.pool_size > MAX_POOL_SIZE {
            return bad(format!("pool_size must be between 1 and {MAX_POOL_SIZE}, not {}", self.pool_size));
        }
        if let WrapMechanism::AesKeyWrapPad { mechanism_id } = self.mechanism
            && mechanism_id != CKM_AES_KEY_WRAP_PAD_PRE_V3
            && mechanism_id != CKM_AES_KEY_WRAP_KWP_V3
            && mechanism_id < CKM_VENDOR_DEFINED_BASE
        {
            return bad(format!(
                "mechanism_id {mechanism_id:#x} is not an RFC 5649 key-wrap mechanism: use 0x210A \
                     (pre-v3.0 CKM_AES_KEY_WRAP_PAD), 0x210B (v3.0 CKM_AES_KEY_WRAP_KWP) or a \
                     vendor-defined id >= 0x80000000"
            ));
        }
        Ok(())
    }

    /// Reads the user PIN from the configured source. The returned buffer
    /// is wiped when dropped.
    pub(crate) fn read_pin(&self) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let unavailable =
            |reason: String| HsmError::PinUnavailable { source_desc: self.pin.to_string(), reason };
        let mut pin = Zeroizing::new(Vec::with_capacity(128));
        match &self.pin {
            PinSource::File(path) => {
                let mut file = std::fs::File::open(path).map_err(|e| unavailable(e.to_string()))?;
                warn_if_pin_file_is_shared(&file, path);
                // Read into a buffer that is wiped on drop; a read that
                // outgrows the capacity would leave a stale copy behind, so
                // refuse PIN files larger than that.
                let mut chunk = Zeroizing::new([0u8; 128]);
                loop {
                    let n = file.read(&mut chunk[..]).map_err(|e| unavailable(e.to_string()))?;
                    if n == 0 {
                        break;
                    }
                    if pin.len() + n > pin.capacity() {
                        return Err(unavailable("the file is larger than 128 bytes".into()));
                    }
                    pin.extend_from_slice(&chunk[..n]);
                }
            }
            PinSource::Env(var) => {
                let value =
                    std::env::var_os(var).ok_or_else(|| unavailable("the variable is not set".into()))?;
                let value = Zeroizing::new(value.into_encoded_bytes());
                if value.len() > pin.capacity() {
                    return Err(unavailable("the value is longer than 128 bytes".into()));
                }
                pin.extend_from_slice(&value);
            }
        }
        if pin.ends_with(b"\n") {
            pin.pop();
            if pin.ends_with(b"\r") {
                pin.pop();
            }
        }
        if pin.is_empty() {
            return Err(unavailable("the PIN is empty".into()));
        }
        Ok(pin)
    }
}

#[cfg(unix)]
fn warn_if_pin_file_is_shared(file: &std::fs::File, path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = file.metadata() {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                pin_file = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "HSM PIN file is readable by group or others; restrict it to mode 0600 or 0400"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_pin_file_is_shared(_file: &std::fs::File, _path: &std::path::Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_defaults() {
        let text = r#"
            module_path = "/usr/lib/softhsm/libsofthsm2.so"
            token = { label = "qutemail" }
            pin = { env = "QUTEMAIL_HSM_PIN" }
            wrapping_key_label = "kek"
        "#;
        let cfg: HsmConfig = toml::from_str(text).expect("parse");
        assert_eq!(cfg.pool_size, 4);
        assert_eq!(cfg.mechanism, WrapMechanism::AesKeyWrapPad { mechanism_id: 0x210A });
        cfg.validate().expect("valid");

        let text = r#"
            module_path = "/m.so"
            token = { serial = "0123" }
            pin = { file = "/run/pin" }
            wrapping_key_label = "kek"
            mechanism = { kind = "aes-gcm" }
            pool_size = 2
        "#;
        let cfg: HsmConfig = toml::from_str(text).expect("parse");
        assert_eq!(cfg.mechanism, WrapMechanism::AesGcm);
        assert_eq!(cfg.token, TokenSelector::Serial("0123".into()));
        let again: HsmConfig = toml::from_str(&toml::to_string(&cfg).expect("serialise")).expect("reparse");
        assert_eq!(again, cfg);

        let text = r#"
            module_path = "/m.so"
            token = { label = "t" }
            pin = { file = "/run/pin" }
            wrapping_key_label = "kek"
            mechanism = { kind = "aes-key-wrap-pad", mechanism_id = 0x210B }
        "#;
        let cfg: HsmConfig = toml::from_str(text).expect("parse");
        assert_eq!(cfg.mechanism, WrapMechanism::AesKeyWrapPad { mechanism_id: 0x210B });
    }

    #[test]
    fn unknown_fields_are_rejected() {
        for text in [
            "module_path='/m'\ntoken={label='t'}\npin={env='P'}\nwrapping_key_label='k'\nextra=1",
            "module_path='/m'\ntoken={label='t', serial='s'}\npin={env='P'}\nwrapping_key_label='k'",
            "module_path='/m'\ntoken={label='t'}\npin={env='P', file='/x'}\nwrapping_key_label='k'",
            "module_path='/m'\ntoken={label='t'}\npin={env='P'}\nwrapping_key_label='k'\nmechanism={kind='aes-gcm', iv=1}",
            "module_path='/m'\ntoken={label='t'}\npin={argv='P'}\nwrapping_key_label='k'",
            "module_path='/m'\ntoken={label='t'}\npin={env='P'}\nwrapping_key_label='k'\nmechanism={kind='des'}",
            "module_path='/m'\ntoken={label='t'}\npin={env='P'}\nwrapping_key_label='k'\nmechanism={kind='aes-gcm', mechanism_id=1}",
        ] {
            assert!(toml::from_str::<HsmConfig>(text).is_err(), "accepted: {text}");
        }
    }

    #[test]
    fn validation() {
        let base =
            HsmConfig::new("/m.so", TokenSelector::Label("t".into()), PinSource::Env("P".into()), "kek");
        base.validate().expect("valid");
        let mut c = base.clone();
        c.pool_size = 0;
        assert!(matches!(c.validate(), Err(HsmError::InvalidConfig(_))));
        let mut c = base.clone();
        c.mechanism = WrapMechanism::AesKeyWrapPad { mechanism_id: 0x1082 };
        assert!(matches!(c.validate(), Err(HsmError::InvalidConfig(_))));
        let mut c = base.clone();
        c.wrapping_key_label.clear();
        assert!(matches!(c.validate(), Err(HsmError::InvalidConfig(_))));
        let mut c = base;
        c.token = TokenSelector::Label("x".repeat(33));
        assert!(matches!(c.validate(), Err(HsmError::InvalidConfig(_))));
    }

    #[test]
    fn pin_file_trailing_newline_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pin");
        std::fs::write(&path, b"12345\r\n").expect("write");
        let cfg =
            HsmConfig::new("/m.so", TokenSelector::Label("t".into()), PinSource::File(path.clone()), "kek");
        assert_eq!(&cfg.read_pin().expect("pin")[..], b"12345");
        std::fs::write(&path, b"").expect("write");
        assert!(matches!(cfg.read_pin(), Err(HsmError::PinUnavailable { .. })));
        std::fs::remove_file(&path).expect("rm");
        let err = cfg.read_pin().expect_err("missing file");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }
}
