//! Errors reported by the HSM key wrapper, phrased for the operator.

use std::fmt;
use std::path::PathBuf;

/// Which HSM an error is about: the PKCS#11 module and the token within it.
///
/// Carried by most [`HsmError`] variants so that a log line names the
/// module path and the token label or serial the operator configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmTarget {
    /// Path of the PKCS#11 module (shared library) as configured.
    pub module: PathBuf,
    /// The configured token, e.g. `token labelled "qutemail"`.
    pub token: String,
}

impl fmt::Display for HsmTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (PKCS#11 module {})", self.token, self.module.display())
    }
}

/// Everything that can go wrong while wrapping or unwrapping keys.
///
/// Every failure is closed: when an operation returns an error, no key
/// material (wrapped or not) has been handed back to the caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The configuration is inconsistent (e.g. pool size 0, empty label).
    #[error("invalid HSM configuration: {0}")]
    InvalidConfig(String),

    /// The user PIN could not be obtained from the configured file or
    /// environment variable.
    #[error("cannot read the HSM user PIN from {source_desc}: {reason}")]
    PinUnavailable {
        /// e.g. `file /run/credentials/kmd/hsm-pin` or `environment variable QUTEMAIL_HSM_PIN`.
        source_desc: String,
        /// Why it could not be read (never contains the PIN).
        reason: String,
    },

    /// The PKCS#11 module could not be loaded (missing file, wrong
    /// architecture, missing symbols).
    #[error(
        "cannot load PKCS#11 module {}: {detail} (is the HSM client library installed? \
         for SoftHSM2: apt-get install softhsm2)",
        module.display()
    )]
    ModuleLoad {
        /// The configured module path.
        module: PathBuf,
        /// Loader message.
        detail: String,
    },

    /// The PKCS#11 module loaded but `C_Initialize` failed (for SoftHSM2
    /// this usually means an unreadable `SOFTHSM2_CONF` or token directory).
    #[error("PKCS#11 module {} failed to initialise: {detail}", module.display())]
    ModuleInit {
        /// The configured module path.
        module: PathBuf,
        /// What the module reported.
        detail: String,
    },

    /// No token with the configured label or serial is present.
    #[error("no {} is present in any slot of PKCS#11 module {}; tokens present: {available}",
        target.token, target.module.display())]
    TokenNotFound {
        /// Module and token that were looked for.
        target: HsmTarget,
        /// Labels and serials of the tokens that are present (or `none`).
        available: String,
    },

    /// More than one token matches the configured label.
    #[error("{count} tokens match the {}: select the token by serial instead", target)]
    TokenAmbiguous {
        /// Module and token that were looked for.
        target: HsmTarget,
        /// How many tokens matched.
        count: usize,
    },

    /// The token rejected the user PIN.
    #[error("the {target} rejected the user PIN (wrong PIN)")]
    PinIncorrect {
        /// Module and token.
        target: HsmTarget,
    },

    /// The user PIN is locked after too many failures.
    #[error("the user PIN of the {target} is locked; unlock it with the SO PIN")]
    PinLocked {
        /// Module and token.
        target: HsmTarget,
    },

    /// Log-in failed for another reason (PIN expired, not initialised, ...).
    #[error("cannot log in to the {target}: {detail}")]
    LoginFailed {
        /// Module and token.
        target: HsmTarget,
        /// What the token reported.
        detail: String,
    },

    /// The token does not offer the configured mechanism for wrapping.
    #[error("the {target} does not support {mechanism}: {detail}")]
    MechanismUnsupported {
        /// Module and token.
        target: HsmTarget,
        /// Mechanism name and id.
        mechanism: String,
        /// What is missing.
        detail: String,
    },

    /// Several secret keys share the wrapping-key label; the wrapper refuses
    /// to guess which one protects the stored keys.
    #[error(
        "{count} secret keys labelled {label:?} exist on the {target}: refusing to guess \
             which one protects the stored keys; remove or relabel the duplicates"
    )]
    WrappingKeyAmbiguous {
        /// Module and token.
        target: HsmTarget,
        /// The configured wrapping-key label.
        label: String,
        /// How many keys carry it.
        count: usize,
    },

    /// A key with the wrapping-key label exists but is not fit for purpose
    /// (extractable, not sensitive, wrong type or size, usage not allowed).
    #[error("the key labelled {label:?} on the {target} cannot be used as wrapping key: {reason}")]
    WrappingKeyUnsuitable {
        /// Module and token.
        target: HsmTarget,
        /// The configured wrapping-key label.
        label: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The wrapping key was present at start-up but has disappeared (token
    /// replaced or re-initialised). It is never re-created silently.
    #[error(
        "the wrapping key labelled {label:?} is no longer on the {target} \
             (token replaced or re-initialised?); it is not re-created automatically"
    )]
    WrappingKeyMissing {
        /// Module and token.
        target: HsmTarget,
        /// The configured wrapping-key label.
        label: String,
    },

    /// The token went away (removed, device error, session or key handles
    /// invalidated) while an operation ran. Nothing was returned.
    #[error("the {target} became unavailable during {operation}: {detail}")]
    TokenUnavailable {
        /// Module and token.
        target: HsmTarget,
        /// What was being done, e.g. `wrap` or `unwrap`.
        operation: &'static str,
        /// What the module reported.
        detail: String,
    },

    /// The key handed to `wrap` is not acceptable (empty or too long).
    #[error("key material rejected: {0}")]
    InvalidKey(String),

    /// A wrapped-key blob could not be parsed.
    #[error("malformed wrapped-key blob: {0}")]
    MalformedBlob(String),

    /// The blob was produced with another mechanism than the one configured.
    #[error("the wrapped key was produced with {blob} but this wrapper is configured for {configured}")]
    MechanismMismatch {
        /// Mechanism recorded in the blob.
        blob: &'static str,
        /// Mechanism of this wrapper.
        configured: &'static str,
    },

    /// The token refused to unwrap/decrypt: the blob was altered, truncated,
    /// or wrapped under a different wrapping key.
    #[error(
        "the {target} refused to unwrap the key: the blob was altered, truncated or wrapped \
             under a different wrapping key ({detail})"
    )]
    UnwrapRejected {
        /// Module and token.
        target: HsmTarget,
        /// What the token reported.
        detail: String,
    },

    /// After unwrapping, the token did not hand back the key value (the
    /// unwrapped object came back sensitive, empty, or badly padded).
    #[error(
        "the {target} returned no usable key value after unwrapping ({detail}); \
             refusing to return anything"
    )]
    KeyValueUnavailable {
        /// Module and token.
        target: HsmTarget,
        /// What was observed.
        detail: String,
    },

    /// Any other PKCS#11 failure.
    #[error("PKCS#11 {operation} failed on the {target}: {detail}")]
    Pkcs11 {
        /// Module and token.
        target: HsmTarget,
        /// What was being done.
        operation: &'static str,
        /// What the module reported.
        detail: String,
    },

    /// The health check ran but the result was wrong.
    #[error("health check of the {target} failed: {detail}")]
    HealthCheckFailed {
        /// Module and token.
        target: HsmTarget,
        /// What did not match.
        detail: String,
    },

    /// A worker thread could not be started.
    #[error("cannot start an HSM worker thread: {0}")]
    WorkerSpawn(String),

    /// The worker pool has shut down (or a worker died); the request was not
    /// processed.
    #[error("the HSM worker pool is not running; the request was not processed")]
    PoolClosed,
}
