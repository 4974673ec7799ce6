//! The site's long-term keys (ML-KEM-768 for peers to seal to, Ed25519 for certificates),
//! kept on disk only wrapped by the HSM, and the public "site card" peers exchange.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use qutemail_envelope::{
    CertificateVerifyingKey, InMemorySigner, KEM_SEED_LEN, KemPublicKey, SiteKemSecretKey, SiteKeySet,
};
use qutemail_hsm::{HsmKeyWrapper, WrappedKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::VaultError;

const KEY_FILE_VERSION: u32 = 1;

/// The site key file: public keys in clear, secrets as HSM-wrapped blobs (base64).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    version: u32,
    domain: String,
    signing_key_id: String,
    kem_public_key: String,
    certificate_public_key: String,
    wrapped_kem_seed: String,
    wrapped_signing_seed: String,
}

/// The public half of a site, given to its peers (JSON): what they seal to and what verifies
/// the certificates the site signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteCard {
    /// The site's mail domain.
    pub domain: String,
    /// ID of the certificate signing key.
    pub signing_key_id: String,
    /// ML-KEM-768 encapsulation key, base64.
    pub kem_public_key: String,
    /// Ed25519 certificate verifying key, base64.
    pub certificate_public_key: String,
}

impl SiteCard {
    /// Reads a site card file.
    pub fn read(path: &Path) -> Result<Self, VaultError> {
        let bytes = std::fs::read(path).map_err(|e| VaultError::io(path, "reading the site card", e))?;
        serde_json::from_slice(&bytes).map_err(|e| VaultError::SiteKeys {
            path: path.to_owned(),
            reason: format!("not a site card: {e}"),
        })
    }

    /// The ML-KEM public key.
    pub fn kem_public_key(&self) -> Result<KemPublicKey, VaultError> {
        KemPublicKey::from_base64(&self.kem_public_key)
            .map_err(|e| VaultError::BadSiteCard { domain: self.domain.clone(), reason: e.to_string() })
    }

    /// The certificate verifying key.
    pub fn certificate_key(&self) -> Result<CertificateVerifyingKey, VaultError> {
        CertificateVerifyingKey::from_base64(&self.certificate_public_key)
            .map_err(|e| VaultError::BadSiteCard { domain: self.domain.clone(), reason: e.to_string() })
    }
}

/// The site's keys, unwrapped in memory (zeroized on drop), loaded from or created in a key
/// file whose secrets only the HSM can unwrap.
#[derive(Debug)]
pub struct SiteKeys {
    domain: String,
    keys: SiteKeySet,
    path: PathBuf,
}

impl SiteKeys {
    /// Loads the key file at `path`, or, when there is none, generates the keys, wraps their
    /// secrets with `hsm` and writes the file (mode 0600, atomically).
    pub async fn load_or_create(path: &Path, domain: &str, hsm: &HsmKeyWrapper) -> Result<Self, VaultError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::load(path, &bytes, domain, hsm).await,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path, domain, hsm).await,
            Err(e) => Err(VaultError::io(path, "reading the site key file", e)),
        }
    }

    async fn create(path: &Path, domain: &str, hsm: &HsmKeyWrapper) -> Result<Self, VaultError> {
        let signing_key_id = format!("{domain}/{}", uuid::Uuid::new_v4());
        let keys = SiteKeySet::generate(signing_key_id.clone()).map_err(VaultError::Envelope)?;
        let kem_seed = keys.kem.to_seed().map_err(VaultError::Envelope)?;
        let signing_seed = keys.signer.to_seed();
        let wrapped_kem = hsm.wrap_async(kem_seed.as_slice()).await.map_err(VaultError::Hsm)?;
        let wrapped_signing = hsm.wrap_async(signing_seed.as_slice()).await.map_err(VaultError::Hsm)?;
        let file = KeyFile {
            version: KEY_FILE_VERSION,
            domain: domain.to_owned(),
            signing_key_id,
            kem_public_key: keys.kem.public_key().to_base64(),
            certificate_public_key: keys.signer.verifying_key().to_base64(),
            wrapped_kem_seed: B64.encode(wrapped_kem.as_bytes()),
            wrapped_signing_seed: B64.encode(wrapped_signing.as_bytes()),
        };
        let text = serde_json::to_vec_pretty(&file)
            .map_err(|e| VaultError::SiteKeys { path: path.to_owned(), reason: e.to_string() })?;
        write_private_atomically(path, &text)?;
        tracing::info!(path = %path.display(), domain, "site keys created (secrets wrapped by the HSM)");
        Ok(Self { domain: domain.to_owned(), keys, path: path.to_owned() })
    }

    async fn load(path: &Path, bytes: &[u8], domain: &str, hsm: &HsmKeyWrapper) -> Result<Self, VaultError> {
        let bad = |reason: String| VaultError::SiteKeys { path: path.to_owned(), reason };
        let file: KeyFile =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a site key file: {e}")))?;
        if file.version != KEY_FILE_VERSION {
            return Err(bad(format!("version {} (this build reads {KEY_FILE_VERSION})", file.version)));
        }
        if file.domain != domain {
            return Err(bad(format!("the keys belong to {:?}, not to this site ({domain:?})", file.domain)));
        }
        let unwrap = |text: &str, what: &str| -> Result<WrappedKey, VaultError> {
            let raw = B64.decode(text).map_err(|e| bad(format!("{what}: {e}")))?;
            WrappedKey::from_bytes(&raw).map_err(|e| bad(format!("{what}: {e}")))
        };
        let kem_wrapped = unwrap(&file.wrapped_kem_seed, "wrapped_kem_seed")?;
        let signing_wrapped = unwrap(&file.wrapped_signing_seed, "wrapped_signing_seed")?;
        let kem_raw = hsm.unwrap_async(&kem_wrapped).await.map_err(VaultError::Hsm)?;
        let signing_raw = hsm.unwrap_async(&signing_wrapped).await.map_err(VaultError::Hsm)?;
        let mut kem_seed = Zeroizing::new([0u8; KEM_SEED_LEN]);
        let mut signing_seed = Zeroizing::new([0u8; 32]);
        if kem_raw.len() != KEM_SEED_LEN || signing_raw.len() != 32 {
            return Err(bad("a wrapped seed has the wrong length".into()));
        }
        kem_seed.copy_from_slice(&kem_raw);
        signing_seed.copy_from_slice(&signing_raw);
        let kem = SiteKemSecretKey::from_seed(&kem_seed).map_err(VaultError::Envelope)?;
        let signer = InMemorySigner::from_seed(file.signing_key_id.clone(), &signing_seed);
        // The clear public keys must be the ones the wrapped secrets give: a swapped file is refused.
        if kem.public_key().to_base64() != file.kem_public_key
            || signer.verifying_key().to_base64() != file.certificate_public_key
        {
            return Err(bad("the public keys do not match the wrapped secret keys".into()));
        }
        Ok(Self { domain: domain.to_owned(), keys: SiteKeySet { kem, signer }, path: path.to_owned() })
    }

    /// The public card to give to peer sites.
    pub fn card(&self) -> SiteCard {
        SiteCard {
            domain: self.domain.clone(),
            signing_key_id: qutemail_envelope::CertificateSigner::key_id(&self.keys.signer).to_owned(),
            kem_public_key: self.keys.kem.public_key().to_base64(),
            certificate_public_key: self.keys.signer.verifying_key().to_base64(),
        }
    }

    /// The key file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The site's mail domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub(crate) fn set(&self) -> &SiteKeySet {
        &self.keys
    }
}

/// Writes `bytes` to `path` readable by the owner only (mode 0600), through a synced temporary
/// file renamed into place, then syncs the directory: a crash leaves the old file or the new.
pub fn write_private_atomically(path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| VaultError::io(path, "writing the site key file", e))
}
