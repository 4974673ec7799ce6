//! Everything that talks to the token: finding it, logging in, finding or
//! creating the wrapping key, and the wrap / unwrap / health operations on
//! one session.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::RawAuthPin;
use cryptoki_sys::{
    CK_MECHANISM, CK_MECHANISM_TYPE, CK_OBJECT_HANDLE, CKF_DECRYPT, CKF_ENCRYPT, CKF_UNWRAP, CKF_WRAP,
};
use zeroize::Zeroizing;

use crate::blob::{self, BlobMechanism, GCM_IV_LEN, GCM_TAG_LEN, WrappedKey};
use crate::config::{HsmConfig, MAX_KEY_LEN, TokenSelector, WrapMechanism};
use crate::error::{HsmError, HsmTarget};
use crate::module::ModuleLease;
use crate::raw::{SecretValue, plain_mechanism};

/// AES-256.
const WRAPPING_KEY_LEN: usize = 32;

/// Serialises wrapping-key creation inside this process, so that two
/// wrappers opened at the same time cannot both create a key with the label.
static PROVISIONING: Mutex<()> = Mutex::new(());

/// The mechanism as used on the wire.
#[derive(Debug, Clone, Copy)]
enum Mode {
    KeyWrap { id: CK_MECHANISM_TYPE },
    Gcm,
}

impl Mode {
    fn blob(self) -> BlobMechanism {
        match self {
            Mode::KeyWrap { .. } => BlobMechanism::AesKeyWrapPad,
            Mode::Gcm => BlobMechanism::AesGcm,
        }
    }
}

/// State shared (read-only) by all workers of one wrapper.
pub(crate) struct Shared {
    pub(crate) config: HsmConfig,
    pub(crate) target: HsmTarget,
    mode: Mode,
    pin: RawAuthPin,
    /// Set once the token rejected the PIN: later reconnects do not retry
    /// it, so that a changed PIN cannot get the user PIN locked by a stream
    /// of automatic log-in attempts.
    pin_rejected: AtomicBool,
    // Declared last: dropped after everything that may still use the module.
    pub(crate) module: ModuleLease,
}

/// Status returned by a successful health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// Token label as reported by the token.
    pub token_label: String,
    /// Token serial as reported by the token.
    pub token_serial: String,
    /// Label of the wrapping key that was exercised.
    pub wrapping_key_label: String,
    /// `aes-key-wrap-pad` or `aes-gcm`.
    pub mechanism: &'static str,
    /// How long the whole check took (token queries, key check, and the
    /// wrap + unwrap round trip).
    pub elapsed: Duration,
}

/// One logged-in session with the wrapping key located; owned by one worker.
pub(crate) struct Conn {
    slot: Slot,
    key: ObjectHandle,
    session: Session,
}

/// Errors after which a worker should drop its session and reconnect.
pub(crate) fn is_connection_lost(e: &HsmError) -> bool {
    matches!(
        e,
        HsmError::TokenUnavailable { .. } | HsmError::Pkcs11 { .. } | HsmError::WrappingKeyMissing { .. }
    )
}

fn rv_of(e: &Error) -> Option<RvError> {
    match e {
        Error::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Return values meaning the token, the session or the objects in it are gone.
fn is_gone(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::UserNotLoggedIn
            | RvError::CryptokiNotInitialized
            | RvError::SlotIdInvalid
            | RvError::KeyHandleInvalid
            | RvError::ObjectHandleInvalid
            | RvError::WrappingKeyHandleInvalid
            | RvError::UnwrappingKeyHandleInvalid
    )
}

/// Return values of unwrap / decrypt meaning "this blob does not open".
fn is_rejected_blob(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange
            // SoftHSM 2.6.1 reports a failed RFC 5649 integrity check as
            // CKR_GENERAL_ERROR.
            | RvError::GeneralError
    )
}

fn describe_gone(rv: RvError) -> &'static str {
    match rv {
        RvError::TokenNotPresent => "the token is not present (CKR_TOKEN_NOT_PRESENT)",
        RvError::TokenNotRecognized => "the token is not recognised (CKR_TOKEN_NOT_RECOGNIZED)",
        RvError::DeviceRemoved => "the token was removed (CKR_DEVICE_REMOVED)",
        RvError::DeviceError => "the device reported an error (CKR_DEVICE_ERROR)",
        RvError::DeviceMemory => "the device is out of memory (CKR_DEVICE_MEMORY)",
        RvError::SessionHandleInvalid | RvError::SessionClosed => {
            "the session was closed by the module (token removed or module reset)"
        }
        RvError::UserNotLoggedIn => "the session is no longer logged in",
        RvError::CryptokiNotInitialized => "the module was finalised",
        RvError::SlotIdInvalid => "the slot no longer exists",
        _ => "the wrapping key object vanished from the token (token removed or its storage deleted?)",
    }
}

impl Shared {
    pub(crate) fn new(config: HsmConfig, module: ModuleLease, mut pin: Zeroizing<Vec<u8>>) -> Self {
        let target = HsmTarget { module: config.module_path.clone(), token: config.token.to_string() };
        let mode = match config.mechanism {
            WrapMechanism::AesKeyWrapPad { mechanism_id } => Mode::KeyWrap { id: mechanism_id },
            WrapMechanism::AesGcm => Mode::Gcm,
        };
        // Moves the allocation (no copy) into a secret box that wipes it.
        let pin = RawAuthPin::new(Box::new(std::mem::take(&mut *pin)));
        Shared { config, target, mode, pin, pin_rejected: AtomicBool::new(false), module }
    }

    fn target(&self) -> HsmTarget {
        self.target.clone()
    }

    /// Maps a `cryptoki` error to an operator-level error.
    fn err(&self, operation: &'static str, e: Error) -> HsmError {
        match rv_of(&e) {
            Some(rv) if is_gone(rv) => HsmError::TokenUnavailable {
                target: self.target(),
                operation,
                detail: describe_gone(rv).to_string(),
            },
            _ => HsmError::Pkcs11 { target: self.target(), operation, detail: e.to_string() },
        }
    }

    /// Finds the slot holding the configured token.
    fn find_slot(&self) -> Result<(Slot, String, String), HsmError> {
        let ctx = &self.module.ctx;
        let slots = ctx.get_slots_with_token().map_err(|e| self.err("listing slots", e))?;
        let mut matches = Vec::new();
        let mut present = Vec::new();
        for slot in slots {
            let info = match ctx.get_token_info(slot) {
                Ok(info) => info,
                Err(e) => {
                    tracing::debug!(slot = slot.id(), error = %e, "skipping slot whose token info is unreadable");
                    continue;
                }
            };
            if !info.token_initialized() {
                continue;
            }
            let label = info.label().trim_end().to_string();
            let serial = info.serial_number().trim_end().to_string();
            let hit = match &self.config.token {
                TokenSelector::Label(l) => l.trim_end() == label,
                TokenSelector::Serial(s) => s.trim_end() == serial,
            };
            present.push(format!("{label:?} (serial {serial})"));
            if hit {
                matches.push((slot, label, serial));
            }
        }
        match matches.len() {
            1 => Ok(matches.remove(0)),
            0 => Err(HsmError::TokenNotFound {
                target: self.target(),
                available: if present.is_empty() { "none".into() } else { present.join(", ") },
            }),
            count => Err(HsmError::TokenAmbiguous { target: self.target(), count }),
        }
    }

    /// Checks that the token offers the configured mechanism.
    fn check_mechanism(&self, slot: Slot) -> Result<(), HsmError> {
        let (id, needed, name) = match self.mode {
            Mode::KeyWrap { id } => (id, CKF_WRAP | CKF_UNWRAP, "RFC 5649 AES key wrap with padding"),
            Mode::Gcm => (cryptoki_sys::CKM_AES_GCM, CKF_ENCRYPT | CKF_DECRYPT, "AES-GCM"),
        };
        let mechanism = format!("{name} (mechanism {id:#x})");
        let unsupported = |detail: String| HsmError::MechanismUnsupported {
            target: self.target(),
            mechanism: mechanism.clone(),
            detail,
        };
        let (flags, min, max) = match self.module.raw.mechanism_info(slot.id(), id) {
            Ok(info) => info,
            Err(Error::Pkcs11(RvError::MechanismInvalid, _)) => {
                return Err(unsupported(
                    "the token does not offer this mechanism id (SoftHSM 2.6.1 offers RFC 5649 as 0x210A, \
                     PKCS#11 v3.0 tokens as 0x210B)"
                        .into(),
                ));
            }
            Err(e) => return Err(self.err("querying mechanism info", e)),
        };
        if flags & needed != needed {
            return Err(unsupported(match self.mode {
                Mode::KeyWrap { .. } => "it is not offered for C_WrapKey/C_UnwrapKey".into(),
                Mode::Gcm => "it is not offered for C_Encrypt/C_Decrypt".into(),
            }));
        }
        // AES key sizes are given in bytes; some modules report 0 for "no limit".
        let len = WRAPPING_KEY_LEN as cryptoki_sys::CK_ULONG;
        if (min != 0 && min > len) || (max != 0 && max < len) {
            return Err(unsupported(format!(
                "AES-256 keys are outside the supported size range {min}..{max}"
            )));
        }
        Ok(())
    }

    fn login(&self, session: &Session) -> Result<(), HsmError> {
        if self.pin_rejected.load(Ordering::Relaxed) {
            return Err(HsmError::PinIncorrect { target: self.target() });
        }
        match session.login_with_raw(UserType::User, &self.pin) {
            Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(Error::Pkcs11(RvError::PinIncorrect, _)) => {
                self.pin_rejected.store(true, Ordering::Relaxed);
                Err(HsmError::PinIncorrect { target: self.target() })
            }
            Err(Error::Pkcs11(RvError::PinLocked, _)) => Err(HsmError::PinLocked { target: self.target() }),
            Err(e @ Error::Pkcs11(rv, _)) if !is_gone(rv) => Err(HsmError::LoginFailed {
                target: self.target(),
                detail: match rv {
                    RvError::PinExpired => "the user PIN has expired".into(),
                    RvError::UserPinNotInitialized => "the token's user PIN is not initialised".into(),
                    RvError::PinLenRange | RvError::PinInvalid => {
                        "the PIN has an invalid length or characters".into()
                    }
                    _ => e.to_string(),
                },
            }),
            Err(e) => Err(self.err("login", e)),
        }
    }

    /// Opens and logs in a session and locates the wrapping key; creates the
    /// key if it is absent and `provision` is set (only at start-up).
    pub(crate) fn connect(&self, provision: bool) -> Result<Conn, HsmError> {
        let (slot, label, serial) = self.find_slot()?;
        self.check_mechanism(slot)?;
        let session = self.module.ctx.open_rw_session(slot).map_err(|e| self.err("opening a session", e))?;
        self.login(&session)?;
        let key = self.locate_wrapping_key(&session, provision)?;
        tracing::debug!(token_label = %label, token_serial = %serial, slot = slot.id(), "HSM session ready");
        Ok(Conn { slot, key, session })
    }

    fn key_usage(&self) -> [Attribute; 6] {
        let kw = matches!(self.mode, Mode::KeyWrap { .. });
        [
            Attribute::Wrap(kw),
            Attribute::Unwrap(kw),
            Attribute::Encrypt(!kw),
            Attribute::Decrypt(!kw),
            Attribute::Sign(false),
            Attribute::Verify(false),
        ]
    }

    fn locate_wrapping_key(&self, session: &Session, provision: bool) -> Result<ObjectHandle, HsmError> {
        let label = &self.config.wrapping_key_label;
        let _guard = provision.then(|| PROVISIONING.lock().unwrap_or_else(|p| p.into_inner()));
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| self.err("searching for the wrapping key", e))?;
        match found.len() {
            1 => {
                self.check_wrapping_key(session, found[0])?;
                Ok(found[0])
            }
            0 if provision => {
                let mut template = vec![
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Derive(false),
                    Attribute::ValueLen((WRAPPING_KEY_LEN as u64).into()),
                    Attribute::Label(label.as_bytes().to_vec()),
                ];
                template.extend(self.key_usage());
                let key = session
                    .generate_key(&Mechanism::AesKeyGen, &template)
                    .map_err(|e| self.err("creating the wrapping key", e))?;
                tracing::info!(
                    wrapping_key_label = %label,
                    token = %self.target.token,
                    mechanism = self.mode.blob().name(),
                    "created a new non-extractable AES-256 wrapping key in the HSM"
                );
                self.check_wrapping_key(session, key)?;
                Ok(key)
            }
            0 => Err(HsmError::WrappingKeyMissing { target: self.target(), label: label.clone() }),
            count => {
                Err(HsmError::WrappingKeyAmbiguous { target: self.target(), label: label.clone(), count })
            }
        }
    }

    /// Refuses a wrapping key that is not a sensitive, non-extractable
    /// AES-256 token key allowed to do what the configured mode needs.
    fn check_wrapping_key(&self, session: &Session, key: ObjectHandle) -> Result<(), HsmError> {
        let unsuitable = |reason: String| HsmError::WrappingKeyUnsuitable {
            target: self.target(),
            label: self.config.wrapping_key_label.clone(),
            reason,
        };
        let attrs = session
            .get_attributes(
                key,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Token,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Wrap,
                    AttributeType::Unwrap,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                ],
            )
            .map_err(|e| self.err("reading the wrapping key's attributes", e))?;
        let mut key_type = None;
        let mut value_len = None;
        let (mut token, mut sensitive, mut extractable, mut never_extractable) = (false, false, true, false);
        let (mut wrap, mut unwrap, mut encrypt, mut decrypt) = (false, false, false, false);
        for a in attrs {
            match a {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::ValueLen(l) => value_len = Some(u64::from(l)),
                Attribute::Token(b) => token = b,
                Attribute::Sensitive(b) => sensitive = b,
                Attribute::Extractable(b) => extractable = b,
                Attribute::NeverExtractable(b) => never_extractable = b,
                Attribute::Wrap(b) => wrap = b,
                Attribute::Unwrap(b) => unwrap = b,
                Attribute::Encrypt(b) => encrypt = b,
                Attribute::Decrypt(b) => decrypt = b,
                _ => {}
            }
        }
        if key_type != Some(KeyType::AES) {
            return Err(unsuitable("it is not an AES key".into()));
        }
        if value_len != Some(WRAPPING_KEY_LEN as u64) {
            return Err(unsuitable(format!(
                "it is not 256 bits long ({} bytes)",
                value_len.map_or_else(|| "unknown".into(), |l| l.to_string())
            )));
        }
        if !token {
            return Err(unsuitable("it is a session object, not stored in the token".into()));
        }
        if !sensitive || extractable {
            return Err(unsuitable("it is extractable or not sensitive, so it could leave the HSM".into()));
        }
        match self.mode {
            Mode::KeyWrap { .. } if !(wrap && unwrap) => {
                return Err(unsuitable(
                    "it does not allow C_WrapKey/C_UnwrapKey (CKA_WRAP/CKA_UNWRAP); was it created for aes-gcm?".into(),
                ));
            }
            Mode::Gcm if !(encrypt && decrypt) => {
                return Err(unsuitable(
                    "it does not allow C_Encrypt/C_Decrypt (CKA_ENCRYPT/CKA_DECRYPT); was it created for aes-key-wrap-pad?"
                        .into(),
                ));
            }
            _ => {}
        }
        if !never_extractable {
            tracing::warn!(
                wrapping_key_label = %self.config.wrapping_key_label,
                "the wrapping key was extractable at some point (imported or backed up); copies may exist outside this HSM"
            );
        }
        Ok(())
    }
}

/// Destroys a session object when dropped (also on error paths).
struct SessionObject<'a> {
    shared: &'a Shared,
    session: &'a Session,
    handle: CK_OBJECT_HANDLE,
}

impl Drop for SessionObject<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.shared.module.raw.destroy_object(self.session.handle(), self.handle) {
            tracing::warn!(error = %e, "could not destroy a temporary key object in the HSM session");
        }
    }
}

impl Conn {
    /// Wraps `key` under the wrapping key.
    pub(crate) fn wrap(&self, shared: &Shared, key: &[u8]) -> Result<WrappedKey, HsmError> {
        check_key_len(key)?;
        match shared.mode {
            Mode::KeyWrap { id } => self.wrap_kw(shared, &plain_mechanism(id), key),
            Mode::Gcm => self.wrap_gcm(shared, key),
        }
    }

    fn wrap_kw(&self, shared: &Shared, mechanism: &CK_MECHANISM, key: &[u8]) -> Result<WrappedKey, HsmError> {
        let raw = &shared.module.raw;
        let padded = blob::pad_for_key_wrap(key);
        // The key enters the token as a short-lived session object: importing
        // it as a token object would write it to the token's storage and
        // run at a fraction of the speed.
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Derive(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
        ];
        let handle = raw
            .create_object_with_value(self.session.handle(), &template, &padded)
            .map_err(|e| shared.err("importing the key into a session object", e))?;
        let object = SessionObject { shared, session: &self.session, handle };
        let wrapped = raw
            .wrap_key(self.session.handle(), mechanism, self.key.handle(), object.handle, padded.len() + 8)
            .map_err(|e| shared.err("C_WrapKey", e))?;
        drop(object);
        if wrapped.len() < padded.len() + 8 || wrapped.len() % 8 != 0 {
            return Err(HsmError::Pkcs11 {
                target: shared.target(),
                operation: "C_WrapKey",
                detail: format!(
                    "the token returned {} bytes for a {}-byte input; is mechanism {:#x} really RFC 5649?",
                    wrapped.len(),
                    padded.len(),
                    mechanism.mechanism
                ),
            });
        }
        Ok(WrappedKey::new_key_wrap(&wrapped))
    }

    fn wrap_gcm(&self, shared: &Shared, key: &[u8]) -> Result<WrappedKey, HsmError> {
        let mut iv = [0u8; GCM_IV_LEN];
        self.session.generate_random_slice(&mut iv).map_err(|e| shared.err("generating an IV", e))?;
        let aad = blob::header(BlobMechanism::AesGcm);
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, &aad, ((GCM_TAG_LEN * 8) as u64).into())
            .map_err(|e| shared.err("preparing AES-GCM parameters", e))?;
        let ciphertext = self
            .session
            .encrypt(&Mechanism::AesGcm(params), self.key, key)
            .map_err(|e| shared.err("C_Encrypt (AES-GCM)", e))?;
        if ciphertext.len() != key.len() + GCM_TAG_LEN {
            return Err(HsmError::Pkcs11 {
                target: shared.target(),
                operation: "C_Encrypt (AES-GCM)",
                detail: format!("unexpected output length {} for a {}-byte key", ciphertext.len(), key.len()),
            });
        }
        Ok(WrappedKey::new_gcm(&iv, &ciphertext))
    }

    /// Unwraps `wrapped`; the bytes only ever live in wiped buffers.
    pub(crate) fn unwrap(
        &self,
        shared: &Shared,
        wrapped: &WrappedKey,
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let configured = shared.mode.blob();
        if wrapped.mechanism() != configured {
            return Err(HsmError::MechanismMismatch {
                blob: wrapped.mechanism().name(),
                configured: configured.name(),
            });
        }
        match shared.mode {
            Mode::KeyWrap { id } => self.unwrap_kw(shared, &plain_mechanism(id), wrapped.payload()),
            Mode::Gcm => self.unwrap_gcm(shared, wrapped),
        }
    }

    fn rejected_or(&self, shared: &Shared, operation: &'static str, e: Error) -> HsmError {
        match rv_of(&e) {
            Some(rv) if is_rejected_blob(rv) => {
                HsmError::UnwrapRejected { target: shared.target(), detail: e.to_string() }
            }
            _ => shared.err(operation, e),
        }
    }

    fn unwrap_kw(
        &self,
        shared: &Shared,
        mechanism: &CK_MECHANISM,
        payload: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let raw = &shared.module.raw;
        // Class and key type are always pinned: without them the module
        // would have to guess what the unwrapped bytes are. The object is a
        // non-sensitive, extractable session object only so that its value
        // can be read once; it is destroyed right after (also on errors).
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::Derive(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
        ];
        let handle = raw
            .unwrap_key(self.session.handle(), mechanism, self.key.handle(), payload, &template)
            .map_err(|e| self.rejected_or(shared, "C_UnwrapKey", e))?;
        let object = SessionObject { shared, session: &self.session, handle };
        let value = raw
            .read_secret_value(self.session.handle(), object.handle, payload.len().saturating_sub(8))
            .map_err(|e| shared.err("reading the unwrapped key value", e))?;
        drop(object);
        let value = match value {
            SecretValue::Value(v) => v,
            SecretValue::Unavailable(why) => {
                return Err(HsmError::KeyValueUnavailable { target: shared.target(), detail: why.into() });
            }
        };
        blob::unpad_key_wrap(value)
            .map_err(|why| HsmError::UnwrapRejected { target: shared.target(), detail: why })
    }

    fn unwrap_gcm(&self, shared: &Shared, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let (iv, ciphertext) = wrapped.payload().split_at(GCM_IV_LEN);
        let mut iv_param = [0u8; GCM_IV_LEN];
        iv_param.copy_from_slice(iv);
        let aad = wrapped.header();
        let params = GcmParams::new(&mut iv_param, aad, ((GCM_TAG_LEN * 8) as u64).into())
            .map_err(|e| shared.err("preparing AES-GCM parameters", e))?;
        let mechanism = Mechanism::AesGcm(params);
        let ck_mechanism = CK_MECHANISM::from(&mechanism);
        let plain = shared
            .module
            .raw
            .decrypt(self.session.handle(), &ck_mechanism, self.key.handle(), ciphertext)
            .map_err(|e| self.rejected_or(shared, "C_Decrypt (AES-GCM)", e))?;
        if plain.is_empty() || plain.len() + GCM_TAG_LEN != ciphertext.len() {
            return Err(HsmError::KeyValueUnavailable {
                target: shared.target(),
                detail: format!(
                    "AES-GCM returned {} bytes for {} bytes of ciphertext",
                    plain.len(),
                    ciphertext.len()
                ),
            });
        }
        Ok(plain)
    }

    /// Verifies the token, session and key, then round-trips a random key.
    pub(crate) fn health(&self, shared: &Shared) -> Result<HealthReport, HsmError> {
        let started = Instant::now();
        let info = shared.module.ctx.get_token_info(self.slot).map_err(|e| match rv_of(&e) {
            // SoftHSM answers CKR_GENERAL_ERROR when the token's storage vanished.
            Some(RvError::GeneralError) => HsmError::TokenUnavailable {
                target: shared.target(),
                operation: "health check",
                detail: "the token information can no longer be read (token removed or its storage deleted?)"
                    .into(),
            },
            _ => shared.err("health check", e),
        })?;
        let label = info.label().trim_end().to_string();
        let serial = info.serial_number().trim_end().to_string();
        let still_ours = match &shared.config.token {
            TokenSelector::Label(l) => l.trim_end() == label,
            TokenSelector::Serial(s) => s.trim_end() == serial,
        };
        if !still_ours {
            return Err(HsmError::TokenUnavailable {
                target: shared.target(),
                operation: "health check",
                detail: format!("the slot now holds another token ({label:?}, serial {serial})"),
            });
        }
        let state =
            self.session.get_session_info().map_err(|e| shared.err("health check", e))?.session_state();
        if !matches!(state, SessionState::RwUser) {
            return Err(HsmError::TokenUnavailable {
                target: shared.target(),
                operation: "health check",
                detail: format!("the session is no longer logged in ({state:?})"),
            });
        }
        shared.check_wrapping_key(&self.session, self.key)?;

        let mut canary = Zeroizing::new([0u8; 32]);
        self.session.generate_random_slice(&mut canary[..]).map_err(|e| shared.err("health check", e))?;
        let wrapped = self.wrap(shared, &canary[..])?;
        let back = self.unwrap(shared, &wrapped)?;
        if back[..] != canary[..] || wrapped.payload().windows(canary.len()).any(|w| w == &canary[..]) {
            return Err(HsmError::HealthCheckFailed {
                target: shared.target(),
                detail: "a test key did not survive a wrap/unwrap round trip".into(),
            });
        }
        Ok(HealthReport {
            token_label: label,
            token_serial: serial,
            wrapping_key_label: shared.config.wrapping_key_label.clone(),
            mechanism: shared.mode.blob().name(),
            elapsed: started.elapsed(),
        })
    }
}

/// Rejects keys that cannot be wrapped (checked before any copy is made).
pub(crate) fn check_key_len(key: &[u8]) -> Result<(), HsmError> {
    if key.is_empty() {
        return Err(HsmError::InvalidKey("an empty key cannot be wrapped".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(HsmError::InvalidKey(format!(
            "{} bytes is more than the {MAX_KEY_LEN} bytes a wrapped key may hold",
            key.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vanished_token_return_values_are_classified() {
        for rv in [
            RvError::TokenNotPresent,
            RvError::DeviceRemoved,
            RvError::DeviceError,
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
            RvError::UserNotLoggedIn,
            RvError::WrappingKeyHandleInvalid,
            RvError::UnwrappingKeyHandleInvalid,
            RvError::ObjectHandleInvalid,
            RvError::KeyHandleInvalid,
        ] {
            assert!(is_gone(rv), "{rv:?}");
            assert!(!is_rejected_blob(rv), "{rv:?}");
        }
        assert!(describe_gone(RvError::TokenNotPresent).contains("CKR_TOKEN_NOT_PRESENT"));
        assert!(describe_gone(RvError::DeviceRemoved).contains("CKR_DEVICE_REMOVED"));
        for rv in [RvError::EncryptedDataInvalid, RvError::WrappedKeyInvalid, RvError::GeneralError] {
            assert!(is_rejected_blob(rv) && !is_gone(rv), "{rv:?}");
        }
        assert!(!is_gone(RvError::PinIncorrect));
    }

    #[test]
    fn lost_connections_are_recognised() {
        let target = HsmTarget { module: "/m.so".into(), token: "token labelled \"t\"".into() };
        assert!(is_connection_lost(&HsmError::TokenUnavailable {
            target: target.clone(),
            operation: "wrap",
            detail: String::new(),
        }));
        assert!(!is_connection_lost(&HsmError::UnwrapRejected { target, detail: String::new() }));
        assert!(!is_connection_lost(&HsmError::MalformedBlob(String::new())));
        assert!(check_key_len(&[]).is_err());
        assert!(check_key_len(&[0; MAX_KEY_LEN + 1]).is_err());
        assert!(check_key_len(&[0; MAX_KEY_LEN]).is_ok());
    }
}
