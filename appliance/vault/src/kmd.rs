//! QKD keys from the site's kmd over ETSI GS QKD 014, as the gateway's SAE.

use etsi014::client::{ClientTlsConfig, Etsi014Client, Etsi014Error};
use etsi014::{KeyContainer, KeyRequest};
use qutemail_envelope::QkdKey;

use crate::VaultError;

/// Name of kmd's key container extension describing the link (see `kmd/kme/README.md`).
const LINK_EXTENSION: &str = "qutemail_link";

/// Which link made a set of keys and what it looked like then, from kmd's `qutemail_link`
/// extension; what the per-message certificate records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkContext {
    /// The QKD link.
    pub link_id: String,
    /// The KME of the sending (master) side.
    pub source_kme_id: String,
    /// The KME of the receiving (slave) side.
    pub target_kme_id: String,
    /// Quantum bit error rate at the link's last telemetry (0..1).
    pub qber: Option<f64>,
    /// Secret key rate then, bits per second.
    pub secret_key_rate_bps: Option<f64>,
}

impl LinkContext {
    fn from_container(container: &KeyContainer, url: &str) -> Result<Self, VaultError> {
        let missing = || VaultError::Kmd {
            url: url.to_owned(),
            reason: format!("the answer lacks the {LINK_EXTENSION} extension (is the KME a QuteMail kmd?)"),
        };
        let ext = container
            .key_container_extension
            .as_ref()
            .and_then(|e| e.get(LINK_EXTENSION))
            .ok_or_else(missing)?;
        let text = |name: &str| ext.get(name).and_then(serde_json::Value::as_str).map(str::to_owned);
        Ok(Self {
            link_id: text("link_id").ok_or_else(missing)?,
            source_kme_id: text("source_KME_ID").ok_or_else(missing)?,
            target_kme_id: text("target_KME_ID").ok_or_else(missing)?,
            qber: ext.get("qber").and_then(serde_json::Value::as_f64),
            secret_key_rate_bps: ext.get("secret_key_rate_bps").and_then(serde_json::Value::as_f64),
        })
    }
}

/// The gateway's ETSI 014 client to its kmd, authenticated as the gateway's SAE (e.g. `A-mail`)
/// by its client certificate.
#[derive(Debug)]
pub struct KmdKeySource {
    client: Etsi014Client,
}

impl KmdKeySource {
    /// A client of the kmd at `etsi014_url` (https) with the SAE's mutual-TLS material.
    pub fn new(etsi014_url: &str, tls: ClientTlsConfig) -> Result<Self, VaultError> {
        let client = Etsi014Client::new(etsi014_url, tls).map_err(|e| kmd_error(etsi014_url, e))?;
        Ok(Self { client })
    }

    /// kmd's ETSI 014 base URL.
    pub fn url(&self) -> &str {
        self.client.base_url()
    }

    /// Takes `number` fresh keys of `size_bits` shared with `peer_sae_id` (the recipient site's
    /// gateway SAE), for encryption. Each is handed out once; the peer's kmd will hand the same
    /// keys to the peer SAE once, by ID.
    pub async fn encryption_keys(
        &self,
        peer_sae_id: &str,
        number: u32,
        size_bits: u32,
    ) -> Result<(Vec<QkdKey>, LinkContext), VaultError> {
        let container = self
            .client
            .enc_keys_with(peer_sae_id, &KeyRequest::new(number, Some(size_bits)))
            .await
            .map_err(|e| kmd_error(self.client.base_url(), e))?;
        self.unpack(container, number as usize)
    }

    /// The largest key (bits) and the most keys per request that kmd serves for `peer_sae_id`
    /// (ETSI 014 `status`): what sizes a one-time pad's key requests.
    pub async fn limits(&self, peer_sae_id: &str) -> Result<(u32, u32), VaultError> {
        let status =
            self.client.status(peer_sae_id).await.map_err(|e| kmd_error(self.client.base_url(), e))?;
        Ok((status.max_key_size, status.max_key_per_request))
    }

    /// Fetches the keys with `key_ids` that `peer_sae_id` (the sending site's gateway SAE) took
    /// for encryption. kmd gives each key once: call this once per received message.
    pub async fn decryption_keys(
        &self,
        peer_sae_id: &str,
        key_ids: &[uuid::Uuid],
    ) -> Result<(Vec<QkdKey>, LinkContext), VaultError> {
        let container = self
            .client
            .dec_keys(peer_sae_id, &key_ids.iter().map(uuid::Uuid::to_string).collect::<Vec<_>>())
            .await
            .map_err(|e| kmd_error(self.client.base_url(), e))?;
        let (keys, link) = self.unpack(container, key_ids.len())?;
        // kmd answers in request order; insist on it, so a key can never be used under another ID.
        if keys.iter().map(QkdKey::id).ne(key_ids.iter().copied()) {
            return Err(VaultError::Kmd {
                url: self.client.base_url().to_owned(),
                reason: "the keys returned are not the key IDs asked for".into(),
            });
        }
        Ok((keys, link))
    }

    fn unpack(
        &self,
        container: KeyContainer,
        expected: usize,
    ) -> Result<(Vec<QkdKey>, LinkContext), VaultError> {
        let url = self.client.base_url();
        let link = LinkContext::from_container(&container, url)?;
        if container.keys.len() != expected {
            return Err(VaultError::Kmd {
                url: url.to_owned(),
                reason: format!("asked for {expected} keys, got {}", container.keys.len()),
            });
        }
        let mut keys = Vec::with_capacity(container.keys.len());
        for k in container.keys {
            let id = uuid::Uuid::try_parse(&k.key_id).map_err(|_| VaultError::Kmd {
                url: url.to_owned(),
                reason: format!("key ID {:?} is not a UUID", k.key_id),
            })?;
            keys.push(QkdKey::new(id, k.key.into_inner()));
        }
        Ok((keys, link))
    }
}

fn kmd_error(url: &str, e: Etsi014Error) -> VaultError {
    match e {
        Etsi014Error::ServiceUnavailable { .. } => {
            VaultError::KeysUnavailable { url: url.to_owned(), reason: e.to_string() }
        }
        e => VaultError::Kmd { url: url.to_owned(), reason: e.to_string() },
    }
}
