//! Password hashing: argon2id, PHC strings.

use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use zeroize::Zeroizing;

use crate::error::StoreError;

/// argon2id cost parameters for new password hashes. Each stored hash (a PHC string) carries
/// its own parameters, so changing these affects only hashes made afterwards.
///
/// The default is OWASP's recommendation for argon2id: 19 MiB of memory, 2 passes, 1 lane
/// (about 20–40 ms per hash on one core of the appliance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for PasswordParams {
    fn default() -> Self {
        PasswordParams {
            memory_kib: Params::DEFAULT_M_COST,
            iterations: Params::DEFAULT_T_COST,
            parallelism: Params::DEFAULT_P_COST,
        }
    }
}

impl PasswordParams {
    fn hasher(&self) -> Result<Argon2<'static>, StoreError> {
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|e| StoreError::Invalid { what: "argon2 parameters", reason: e.to_string() })?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// Hashes `password` with a fresh 16-byte random salt; returns the PHC string.
pub(crate) fn hash(params: &PasswordParams, password: &[u8]) -> Result<String, StoreError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt)
        .map_err(|e| StoreError::PasswordHash(format!("the random generator failed: {e}")))?;
    let hash = params
        .hasher()?
        .hash_password_with_salt(password, &salt)
        .map_err(|e| StoreError::PasswordHash(e.to_string()))?;
    Ok(hash.to_string())
}

/// Whether `password` matches the PHC string (with the parameters recorded in it). A
/// malformed stored hash counts as a mismatch (and is logged: it means a damaged row).
pub(crate) fn verify(phc: &str, password: &[u8]) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "stored password hash is malformed; authentication refused");
            false
        }
    }
}

/// Runs [`hash`] on the blocking pool (argon2 takes tens of milliseconds of CPU).
pub(crate) async fn hash_blocking(params: PasswordParams, password: &str) -> Result<String, StoreError> {
    let password = Zeroizing::new(password.as_bytes().to_vec());
    tokio::task::spawn_blocking(move || hash(&params, &password))
        .await
        .map_err(|e| StoreError::PasswordHash(e.to_string()))?
}

/// Runs [`verify`] on the blocking pool.
pub(crate) async fn verify_blocking(phc: String, password: &str) -> Result<bool, StoreError> {
    let password = Zeroizing::new(password.as_bytes().to_vec());
    tokio::task::spawn_blocking(move || verify(&phc, &password))
        .await
        .map_err(|e| StoreError::PasswordHash(e.to_string()))
}
