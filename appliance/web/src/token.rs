//! Access tokens: compact JWS (JWT) signed with Ed25519 (`alg` EdDSA, RFC 8037), by a key the
//! appliance generates once and keeps on disk only wrapped by the HSM, like the site keys.
//!
//! Verification accepts exactly one algorithm, EdDSA with this site's key: a token whose header
//! names `none`, `HS256` (the classic confusion, signing with the public key as an HMAC
//! secret) or anything else is refused before any signature is looked at. Then the signature,
//! the issuer, the audience, `nbf` and `exp` are checked; revocation (logout) is checked by the
//! caller against the session in the store.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use qutemail_hsm::{HsmKeyWrapper, WrappedKey};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Audience of every access token.
pub const AUDIENCE: &str = "qutemail-web";
/// Lifetime of an access token, seconds.
pub const ACCESS_TOKEN_SECONDS: u64 = 900;
const KEY_FILE_VERSION: u32 = 1;

/// Why the token key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    /// The key file could not be read or written.
    #[error("web token key file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The key file is damaged or belongs to another site.
    #[error("web token key file {}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The HSM refused to wrap or unwrap the key.
    #[error("HSM (web token key): {0}")]
    Hsm(qutemail_hsm::HsmError),
}

/// Why an access token is refused (all are 401 to the client; the reason is for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts with JSON header and claims.
    #[error("the token is malformed")]
    Malformed,
    /// The header names another algorithm than EdDSA (e.g. `none`, `HS256`).
    #[error("the token's algorithm {0:?} is not accepted")]
    Algorithm(String),
    /// The signature does not verify with this site's key.
    #[error("the token's signature is not valid")]
    Signature,
    /// Issued by another site or for another audience.
    #[error("the token was not issued for this service")]
    WrongIssuer,
    /// Past `exp`.
    #[error("the token has expired")]
    Expired,
    /// Before `nbf`.
    #[error("the token is not valid yet")]
    NotYetValid,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    version: u32,
    issuer: String,
    public_key: String,
    wrapped_seed: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer: `qutemail:<site domain>`.
    pub iss: String,
    /// Audience: [`AUDIENCE`].
    pub aud: String,
    /// The account's address.
    pub sub: String,
    /// The session (refresh-token family) the token belongs to.
    pub sid: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Not before.
    pub nbf: u64,
    /// Expires at.
    pub exp: u64,
}

/// The site's token signing key (Ed25519), unwrapped in memory.
pub struct TokenKey {
    pair: Ed25519KeyPair,
    issuer: String,
    kid: String,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl TokenKey {
    /// Loads the key file at `path`, or creates it: a random Ed25519 seed, wrapped by `hsm`,
    /// written with mode 0600 through a synced temporary file. The seed never reaches the disk
    /// unwrapped.
    pub async fn load_or_create(
        path: &Path,
        domain: &str,
        hsm: &HsmKeyWrapper,
    ) -> Result<Self, TokenKeyError> {
        let issuer = format!("qutemail:{}", domain.to_ascii_lowercase());
        let io = |source| TokenKeyError::Io { path: path.to_owned(), source };
        let bad = |reason: String| TokenKeyError::Invalid { path: path.to_owned(), reason };
        match std::fs::read(path) {
            Ok(bytes) => {
                let file: KeyFile =
                    serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a token key file: {e}")))?;
                if file.version != KEY_FILE_VERSION {
                    return Err(bad(format!(
                        "version {} (this build reads {KEY_FILE_VERSION})",
                        file.version
                    )));
                }
                if file.issuer != issuer {
                    return Err(bad(format!("the key belongs to {:?}, not {issuer:?}", file.issuer)));
                }
                let raw = B64.decode(&file.wrapped_seed).map_err(|e| bad(format!("wrapped_seed: {e}")))?;
                let wrapped = WrappedKey::from_bytes(&raw).map_err(|e| bad(format!("wrapped_seed: {e}")))?;
                let seed = hsm.unwrap_async(&wrapped).await.map_err(TokenKeyError::Hsm)?;
                let key = Self::from_seed(&seed, issuer).map_err(bad)?;
                if B64.encode(key.pair.public_key().as_ref()) != file.public_key {
                    return Err(bad("the public key does not match the wrapped seed".into()));
                }
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = Zeroizing::new([0u8; 32]);
                getrandom::fill(seed.as_mut_slice()).map_err(|e| bad(format!("random generator: {e}")))?;
                let wrapped = hsm.wrap_async(seed.as_slice()).await.map_err(TokenKeyError::Hsm)?;
                let key = Self::from_seed(seed.as_slice(), issuer.clone()).map_err(bad)?;
                let file = KeyFile {
                    version: KEY_FILE_VERSION,
                    issuer,
                    public_key: B64.encode(key.pair.public_key().as_ref()),
                    wrapped_seed: B64.encode(wrapped.as_bytes()),
                };
                let text = serde_json::to_vec_pretty(&file).map_err(|e| bad(e.to_string()))?;
                write_private(path, &text).map_err(io)?;
                tracing::info!(path = %path.display(), "web token signing key created (seed wrapped by the HSM)");
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    fn from_seed(seed: &[u8], issuer: String) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|e| format!("unusable seed: {e}"))?;
        let kid = hex::encode(
            &ring::digest::digest(&ring::digest::SHA256, pair.public_key().as_ref()).as_ref()[..8],
        );
        Ok(Self { pair, issuer, kid })
    }

    /// The issuer this key signs as.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The raw Ed25519 public key.
    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// Signs an access token for `address` in session `sid`, valid [`ACCESS_TOKEN_SECONDS`].
    pub fn issue(&self, address: &str, sid: &str) -> String {
        let now = unix_now();
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: AUDIENCE.into(),
            sub: address.to_owned(),
            sid: sid.to_owned(),
            iat: now,
            nbf: now,
            exp: now + ACCESS_TOKEN_SECONDS,
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims (also used by tests to make expired or foreign tokens).
    pub fn sign(&self, claims: &Claims) -> String {
        let header = Header { alg: "EdDSA".into(), typ: Some("JWT".into()), kid: Some(self.kid.clone()) };
        // Serialising these plain structs cannot fail.
        let h = B64URL.encode(serde_json::to_vec(&header).unwrap_or_default());
        let c = B64URL.encode(serde_json::to_vec(claims).unwrap_or_default());
        let input = format!("{h}.{c}");
        let sig = self.pair.sign(input.as_bytes());
        format!("{input}.{}", B64URL.encode(sig.as_ref()))
    }

    /// Verifies a token at time `now` (Unix seconds): algorithm, signature, issuer, audience,
    /// validity window. Revocation is the caller's check.
    pub fn verify_at(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Header = B64URL
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        // The algorithm is fixed by this server, never chosen by the token.
        if header.alg != "EdDSA" {
            return Err(TokenError::Algorithm(header.alg));
        }
        let sig = B64URL.decode(s).map_err(|_| TokenError::Malformed)?;
        let signed = &token[..h.len() + 1 + c.len()];
        UnparsedPublicKey::new(&ED25519, self.pair.public_key().as_ref())
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| TokenError::Signature)?;
        let claims: Claims = B64URL
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        if claims.iss != self.issuer || claims.aud != AUDIENCE {
            return Err(TokenError::WrongIssuer);
        }
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        if now < claims.nbf {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }

    /// [`Self::verify_at`] now.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        self.verify_at(token, unix_now())
    }
}

/// A random opaque token (refresh, reset): 32 random bytes, base64url.
pub(crate) fn random_token() -> Result<Zeroizing<String>, getrandom::Error> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut_slice())?;
    Ok(Zeroizing::new(B64URL.encode(bytes.as_slice())))
}

/// How opaque tokens are kept in the store: hex SHA-256.
pub(crate) fn token_hash(token: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
