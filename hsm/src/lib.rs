//! Key wrapping through a PKCS#11 HSM for QuteMail.
//!
//! The key management daemon (`kmd`) stores QKD key blocks, and the mail
//! gateway stores per-message keys, only in wrapped form. This crate is the
//! one place that talks to the HSM: it owns a non-extractable, sensitive
//! AES-256 *wrapping key* inside a PKCS#11 token and turns key material into
//! an opaque [`WrappedKey`] blob and back. Nothing outside this crate ever
//! sees the wrapping key, and it never leaves the token.
//!
//! ```no_run
//! use qutemail_hsm::{HsmConfig, HsmKeyWrapper, PinSource, TokenSelector};
//!
//! # fn main() -> Result<(), qutemail_hsm::HsmError> {
//! let config = HsmConfig::new(
//!     "/usr/lib/softhsm/libsofthsm2.so",
//!     TokenSelector::Label("qutemail".into()),
//!     PinSource::File("/run/credentials/kmd.service/hsm-pin".into()),
//!     "qutemail-kek-v1",
//! );
//! let hsm = HsmKeyWrapper::open(config)?;
//! let blob = hsm.wrap(&[0x42; 32])?;            // store blob.to_bytes()
//! let key = hsm.unwrap(&blob)?;                  // Zeroizing<Vec<u8>>
//! assert_eq!(&key[..], &[0x42; 32]);
//! hsm.health_check()?;                           // call periodically
//! # Ok(()) }
//! ```
//!
//! # Mechanisms
//!
//! * `aes-key-wrap-pad` (default): RFC 5649 via `C_WrapKey`. The key is
//!   imported as a *session* generic-secret object (never written to the
//!   token's storage), wrapped, and the object destroyed. To unwrap, the blob
//!   is `C_UnwrapKey`ed into a session object that is non-sensitive and
//!   extractable, its `CKA_VALUE` is read straight into a wiped buffer, and
//!   the object is destroyed at once (also on error). An empty or
//!   "unavailable" value is an error, never an empty key. The mechanism id
//!   is configurable: SoftHSM 2.6.1 offers RFC 5649 as 0x210A (pre-v3.0
//!   `CKM_AES_KEY_WRAP_PAD`), PKCS#11 v3.0 tokens as 0x210B.
//! * `aes-gcm`: `C_Encrypt`/`C_Decrypt` inside the token with a random
//!   96-bit IV from the token's RNG, stored in the blob; the blob header is
//!   the associated data.
//!
//! # Concurrency
//!
//! A PKCS#11 session must not be used by two threads at once, so the wrapper
//! runs `pool_size` dedicated worker threads, each owning one logged-in
//! session, fed by a bounded queue. Blocking and async callers share it: the
//! `*_async` methods never block a runtime thread and do not depend on a
//! particular runtime (they work on tokio). Dedicated threads were chosen
//! over `spawn_blocking` because a session then stays on one OS thread for
//! its whole life (some vendor modules require that), no session checkout
//! lock is needed, and a slow HSM cannot exhaust the runtime's blocking pool
//! that file I/O also relies on.
//!
//! # Failure
//!
//! Every failure is an [`HsmError`] naming the module path and token; no
//! operation returns data it could not protect or verify. A worker whose
//! session breaks (token removed, `CKR_SESSION_HANDLE_INVALID`,
//! `CKR_DEVICE_REMOVED`, ...) reconnects on its next request, but never
//! re-creates a wrapping key that has disappeared. Key bytes and the PIN are
//! never logged, and every buffer that holds them is wiped ([`zeroize`]).

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod blob;
mod config;
mod error;
mod module;
mod raw;
mod token;
mod wrapper;

#[cfg(feature = "testing")]
pub mod testing;

pub use blob::{BlobMechanism, WrappedKey};
pub use config::{
    CKM_AES_KEY_WRAP_KWP_V3, CKM_AES_KEY_WRAP_PAD_PRE_V3, CKM_VENDOR_DEFINED_BASE, HsmConfig, MAX_KEY_LEN,
    MAX_POOL_SIZE, PinSource, TokenSelector, WrapMechanism,
};
pub use error::{HsmError, HsmTarget};
pub use token::HealthReport;
pub use wrapper::HsmKeyWrapper;
pub use zeroize::Zeroizing;
