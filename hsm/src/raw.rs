//! The few PKCS#11 calls that `cryptoki`'s safe API cannot make the way this
//! crate needs them, made directly through the module's function list.
//!
//! Why they exist:
//! * reading `CKA_VALUE`: `Session::get_attributes` copies the value out of
//!   an internal buffer that it frees without wiping, so a copy of the key
//!   would stay behind in freed heap memory. Here the token writes straight
//!   into a [`Zeroizing`] buffer;
//! * `C_CreateObject` with the key value: the value is passed by pointer to
//!   the caller's wiped buffer instead of being copied into an `Attribute`;
//! * `C_Decrypt`: the plaintext lands directly in a [`Zeroizing`] buffer;
//! * `C_WrapKey` / `C_UnwrapKey` / `C_GetMechanismInfo` with an arbitrary
//!   mechanism id: `cryptoki` only builds mechanism types it knows, and
//!   PKCS#11 v3.0's `CKM_AES_KEY_WRAP_KWP` (0x210B) is not among them.
//!
//! The function list is obtained from a second `dlopen` of the same module
//! file; the dynamic loader returns the already-loaded instance, so the
//! session and object handles created through `cryptoki` are valid here.
//! A handle passed to these functions must belong to a session that only the
//! calling thread uses (each worker owns its session).

use std::ffi::c_void;
use std::path::Path;
use std::ptr;

use cryptoki::context::Function;
use cryptoki::error::{Error, Rv, RvError};
use cryptoki::object::Attribute;
use cryptoki_sys::{
    CK_ATTRIBUTE, CK_FLAGS, CK_FUNCTION_LIST, CK_MECHANISM, CK_MECHANISM_INFO, CK_MECHANISM_TYPE,
    CK_OBJECT_HANDLE, CK_SESSION_HANDLE, CK_SLOT_ID, CK_ULONG, CK_UNAVAILABLE_INFORMATION, CKA_VALUE,
};
use zeroize::Zeroizing;

/// Result of reading a secret value.
pub(crate) enum SecretValue {
    /// The value, in a buffer wiped on drop.
    Value(Zeroizing<Vec<u8>>),
    /// The token did not reveal the value (why, for the operator).
    Unavailable(&'static str),
}

/// Direct access to a module's PKCS#11 function list.
pub(crate) struct RawModule {
    fns: CK_FUNCTION_LIST,
    // Keeps the module mapped for as long as `fns` may be called.
    _lib: cryptoki_sys::Pkcs11,
}

impl std::fmt::Debug for RawModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawModule")
    }
}

macro_rules! func {
    ($self:expr, $name:ident) => {
        $self.fns.$name.ok_or(Error::NullFunctionPointer)?
    };
}

fn check(rv: cryptoki_sys::CK_RV, function: Function) -> Result<(), Error> {
    Rv::from(rv).into_result(function)
}

fn ulong(len: usize) -> Result<CK_ULONG, Error> {
    CK_ULONG::try_from(len).map_err(Error::TryFromInt)
}

fn usize_of(len: CK_ULONG) -> Result<usize, Error> {
    usize::try_from(len).map_err(Error::TryFromInt)
}

impl RawModule {
    /// Maps the module (already loaded by `cryptoki`) a second time and
    /// copies its function list.
    pub(crate) fn load(path: &Path) -> Result<Self, Error> {
        // SAFETY: loading a PKCS#11 module runs its initialisers; the same
        // file has just been loaded by `cryptoki::Pkcs11::new`, so this only
        // bumps the loader's reference count.
        let lib = unsafe { cryptoki_sys::Pkcs11::new(path) }.map_err(Error::LibraryLoading)?;
        let get_list =
            *lib.C_GetFunctionList.as_ref().map_err(|_| Error::MissingSymbol("C_GetFunctionList"))?;
        let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
        // SAFETY: `list` is a valid out-pointer; the module fills it with a
        // pointer to its static function table.
        check(unsafe { get_list(&mut list) }, Function::GetFunctionList)?;
        if list.is_null() {
            return Err(Error::NullFunctionPointer);
        }
        // SAFETY: non-null pointer to the module's function table, which
        // lives as long as the module stays mapped (we hold `lib`).
        let fns = unsafe { ptr::read_unaligned(list) };
        Ok(RawModule { fns, _lib: lib })
    }

    /// `C_GetMechanismInfo` for any mechanism id; returns its flags and the
    /// key size range.
    pub(crate) fn mechanism_info(
        &self,
        slot: CK_SLOT_ID,
        mechanism: CK_MECHANISM_TYPE,
    ) -> Result<(CK_FLAGS, CK_ULONG, CK_ULONG), Error> {
        let f = func!(self, C_GetMechanismInfo);
        let mut info = CK_MECHANISM_INFO::default();
        // SAFETY: plain out-parameter call.
        check(unsafe { f(slot, mechanism, &mut info) }, Function::GetMechanismInfo)?;
        Ok((info.flags, info.ulMinKeySize, info.ulMaxKeySize))
    }

    /// `C_CreateObject` with `attributes` plus `CKA_VALUE = value`; `value`
    /// is passed by pointer and never copied on this side.
    pub(crate) fn create_object_with_value(
        &self,
        session: CK_SESSION_HANDLE,
        attributes: &[Attribute],
        value: &[u8],
    ) -> Result<CK_OBJECT_HANDLE, Error> {
        let f = func!(self, C_CreateObject);
        let mut template: Vec<CK_ATTRIBUTE> = attributes.iter().map(CK_ATTRIBUTE::from).collect();
        template.push(CK_ATTRIBUTE {
            type_: CKA_VALUE,
            pValue: value.as_ptr() as *mut c_void,
            ulValueLen: ulong(value.len())?,
        });
        let mut handle: CK_OBJECT_HANDLE = 0;
        // SAFETY: every template entry points into `attributes` or `value`,
        // both borrowed for the duration of the call; the module only reads
        // them.
        check(
            unsafe { f(session, template.as_mut_ptr(), ulong(template.len())?, &mut handle) },
            Function::CreateObject,
        )?;
        Ok(handle)
    }

    /// `C_DestroyObject`.
    pub(crate) fn destroy_object(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
    ) -> Result<(), Error> {
        let f = func!(self, C_DestroyObject);
        // SAFETY: plain call with handles.
        check(unsafe { f(session, object) }, Function::DestroyObject)
    }

    /// `C_WrapKey`, returning the wrapped bytes (not secret). `size_hint`
    /// is the expected output length: a correct hint saves the size query,
    /// which SoftHSM answers by performing the whole wrap.
    pub(crate) fn wrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        wrapping_key: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
        size_hint: usize,
    ) -> Result<Vec<u8>, Error> {
        let f = func!(self, C_WrapKey);
        let mut mech = *mechanism;
        let mut out = vec![0u8; size_hint];
        let mut len = ulong(out.len())?;
        // SAFETY: `out` has room for `len` bytes; `mech` outlives the call.
        let rv = Rv::from(unsafe { f(session, &mut mech, wrapping_key, key, out.as_mut_ptr(), &mut len) });
        if matches!(rv, Rv::Error(RvError::BufferTooSmall)) {
            // The module has set `len` to the size it needs.
            out.resize(usize_of(len)?, 0);
            // SAFETY: as above, with the size the module asked for.
            check(
                unsafe { f(session, &mut mech, wrapping_key, key, out.as_mut_ptr(), &mut len) },
                Function::WrapKey,
            )?;
        } else {
            rv.into_result(Function::WrapKey)?;
        }
        out.truncate(usize_of(len)?);
        Ok(out)
    }

    /// `C_UnwrapKey` into a new object described by `template`.
    pub(crate) fn unwrap_key(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        unwrapping_key: CK_OBJECT_HANDLE,
        wrapped: &[u8],
        template: &[Attribute],
    ) -> Result<CK_OBJECT_HANDLE, Error> {
        let f = func!(self, C_UnwrapKey);
        let mut mech = *mechanism;
        let mut template: Vec<CK_ATTRIBUTE> = template.iter().map(CK_ATTRIBUTE::from).collect();
        let mut handle: CK_OBJECT_HANDLE = 0;
        // SAFETY: `wrapped` and the template are borrowed for the call and
        // only read by the module (the C prototype is not const-correct).
        check(
            unsafe {
                f(
                    session,
                    &mut mech,
                    unwrapping_key,
                    wrapped.as_ptr() as *mut u8,
                    ulong(wrapped.len())?,
                    template.as_mut_ptr(),
                    ulong(template.len())?,
                    &mut handle,
                )
            },
            Function::UnwrapKey,
        )?;
        Ok(handle)
    }

    /// Reads `CKA_VALUE` of `object` straight into a wiped buffer.
    ///
    /// A sensitive or unextractable object does not fail the call on every
    /// module (SoftHSM 2.6.1 reports `CK_UNAVAILABLE_INFORMATION`, which
    /// `cryptoki` turns into an empty attribute list); both that and an
    /// empty value come back as [`SecretValue::Unavailable`]. The value may
    /// be at most `max_len` bytes; a buffer of that size is offered at once
    /// (no separate size query).
    pub(crate) fn read_secret_value(
        &self,
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        max_len: usize,
    ) -> Result<SecretValue, Error> {
        let f = func!(self, C_GetAttributeValue);
        let mut buf = Zeroizing::new(vec![0u8; max_len]);
        let mut attr = CK_ATTRIBUTE {
            type_: CKA_VALUE,
            pValue: buf.as_mut_ptr() as *mut c_void,
            ulValueLen: ulong(max_len)?,
        };
        // SAFETY: one template entry pointing at `buf`, which has room for
        // `max_len` bytes; the module writes at most `ulValueLen` bytes.
        let rv = Rv::from(unsafe { f(session, object, &mut attr, 1) });
        if let Some(why) = unavailable(&rv, attr.ulValueLen) {
            return Ok(SecretValue::Unavailable(why));
        }
        rv.into_result(Function::GetAttributeValue)?;
        let got = usize_of(attr.ulValueLen)?;
        if got > max_len {
            return Ok(SecretValue::Unavailable("the token returned an inconsistent value length"));
        }
        buf.truncate(got);
        Ok(SecretValue::Value(buf))
    }

    /// One-shot `C_DecryptInit` + `C_Decrypt`, with the plaintext written
    /// straight into a wiped buffer.
    pub(crate) fn decrypt(
        &self,
        session: CK_SESSION_HANDLE,
        mechanism: &CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let init = func!(self, C_DecryptInit);
        let decrypt = func!(self, C_Decrypt);
        let mut mech = *mechanism;
        // SAFETY: `mech` (and any parameter block it points to, owned by the
        // caller) outlives the call.
        check(unsafe { init(session, &mut mech, key) }, Function::DecryptInit)?;
        let ct_len = ulong(ciphertext.len())?;
        // The plaintext is never longer than the ciphertext for the
        // mechanisms used here, so one call usually suffices.
        let mut out = Zeroizing::new(vec![0u8; ciphertext.len()]);
        let mut len = ct_len;
        // SAFETY: `out` has room for `len` bytes; `ciphertext` is only read.
        let rv = Rv::from(unsafe {
            decrypt(session, ciphertext.as_ptr() as *mut u8, ct_len, out.as_mut_ptr(), &mut len)
        });
        if matches!(rv, Rv::Error(RvError::BufferTooSmall)) {
            // The operation stays active and `len` holds the size needed.
            let mut bigger = Zeroizing::new(vec![0u8; usize_of(len)?]);
            // SAFETY: as above, with the size the module asked for.
            check(
                unsafe {
                    decrypt(session, ciphertext.as_ptr() as *mut u8, ct_len, bigger.as_mut_ptr(), &mut len)
                },
                Function::Decrypt,
            )?;
            out = bigger;
        } else {
            rv.into_result(Function::Decrypt)?;
        }
        out.truncate(usize_of(len)?);
        Ok(out)
    }
}

/// Why a `C_GetAttributeValue(CKA_VALUE)` result holds no usable value, if
/// it does not. Kept separate so that the rules are unit-tested.
fn unavailable(rv: &Rv, value_len: CK_ULONG) -> Option<&'static str> {
    match rv {
        Rv::Error(RvError::AttributeSensitive) => Some("the token reports the value as sensitive"),
        Rv::Error(RvError::BufferTooSmall) => Some("the token returned a value longer than any wrapped key"),
        _ if value_len == CK_UNAVAILABLE_INFORMATION => {
            Some("the token did not reveal the value (sensitive or unextractable object)")
        }
        Rv::Ok if value_len == 0 => Some("the token returned an empty value"),
        _ => None,
    }
}

/// A mechanism without parameters, for any id.
pub(crate) fn plain_mechanism(id: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    CK_MECHANISM { mechanism: id, pParameter: ptr::null_mut(), ulParameterLen: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_values_are_recognised() {
        // SoftHSM 2.6.1 on a sensitive key: CKR_ATTRIBUTE_SENSITIVE with
        // ulValueLen = CK_UNAVAILABLE_INFORMATION.
        assert!(unavailable(&Rv::Error(RvError::AttributeSensitive), CK_UNAVAILABLE_INFORMATION).is_some());
        // A module that returns OK but marks the value unavailable.
        assert!(unavailable(&Rv::Ok, CK_UNAVAILABLE_INFORMATION).is_some());
        // An empty value is not a key.
        assert!(unavailable(&Rv::Ok, 0).is_some());
        assert!(unavailable(&Rv::Error(RvError::BufferTooSmall), CK_UNAVAILABLE_INFORMATION).is_some());
        assert!(unavailable(&Rv::Ok, 32).is_none());
        // Other errors are reported as errors, not as "unavailable".
        assert!(unavailable(&Rv::Error(RvError::SessionHandleInvalid), 0).is_none());
    }
}
