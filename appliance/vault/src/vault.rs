//! [`MailVault`]: sealing outbound mail with QKD keys, accepting inbound sealed mail, sealing
//! everything at rest, and opening stored messages.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use qutemail_envelope::at_rest::{self, AtRestParams, DataKey};
use qutemail_envelope::{
    CertificateCheck, LinkInfo, Mode, OpenKeys, QkdKey, RoutingHeaders, SealRandomness, SealRequest,
    SealSummary, SealedMessage,
};
use qutemail_hsm::{HsmKeyWrapper, WrappedKey};
use zeroize::Zeroizing;

use crate::VaultError;
use crate::directory::SiteDirectory;
use crate::key_record::{KeyWrapping, join_key_record, split_key_record};
use crate::kmd::{KmdKeySource, LinkContext};
use crate::policy::{KeysExhausted, Protection, ProtectionPolicy};
use crate::site_keys::SiteKeys;

/// Largest one-time-pad message opened from the store (far above any site's sending limit).
const STORED_OTP_MAX: usize = 16 * 1024 * 1024;

/// How a stored message's bytes are sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredKind {
    /// The envelope as it arrived from the peer site; its QKD keys are in the key record.
    QkdEnvelope,
    /// An at-rest blob under a per-message data key (local and normal mail, Sent copies).
    AtRest,
}

impl StoredKind {
    /// The name kept in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            StoredKind::QkdEnvelope => "qkd-envelope",
            StoredKind::AtRest => "at-rest",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Result<Self, VaultError> {
        match text {
            "qkd-envelope" => Ok(StoredKind::QkdEnvelope),
            "at-rest" => Ok(StoredKind::AtRest),
            other => Err(VaultError::CorruptRecord(format!("unknown protection kind {other:?}"))),
        }
    }
}

/// What the store keeps next to a message's sealed bytes. Nothing in it is secret in clear: the
/// keys in `key_record` are sealed under a data key that only the HSM can unwrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredProtection {
    /// How the bytes are sealed.
    pub kind: StoredKind,
    /// The protection the message had in transit (`normal` for at-rest only mail).
    pub protection: Protection,
    /// The key record: the HSM-wrapped data key and, for envelopes, the QKD keys sealed under it.
    pub key_record: Vec<u8>,
    /// The QKD key IDs (envelopes only), for audit.
    pub key_ids: Vec<uuid::Uuid>,
    /// The sender's certificate as verified on arrival, JSON (envelopes only; the signed
    /// original stays in the stored envelope).
    pub certificate: Option<Vec<u8>>,
}

/// What to seal for whom ([`MailVault::seal_outbound`]).
#[derive(Debug, Clone)]
pub struct SealOrder {
    /// The recipient's mail domain (a peer site).
    pub recipient_domain: String,
    /// The protection, from [`MailVault::choose`].
    pub protection: Protection,
    /// Whether the protection was the policy's choice (so `pqc` may replace it when kmd has no
    /// keys, if the policy allows) rather than the sender's explicit request.
    pub may_fall_back: bool,
    /// The outer routing headers (see [`crate::routing_headers`]).
    pub routing: RoutingHeaders,
    /// Length of the inner message.
    pub inner_len: u64,
}

/// The outcome of sealing an outbound message.
#[derive(Debug)]
pub struct Outbound<W> {
    /// The protection actually applied (a `pqc` fallback shows here).
    pub protection: Protection,
    /// Keys, lengths and the signed certificate.
    pub summary: SealSummary,
    /// The output, back to the caller.
    pub output: W,
}

/// The outcome of accepting an inbound sealed message: verified (AEAD and certificate), its
/// keys fetched from kmd once and kept only wrapped.
#[derive(Debug)]
pub struct Inbound {
    /// What to store next to the message's bytes (which are stored as they came).
    pub stored: StoredProtection,
    /// Plaintext length (what clients see as the message size).
    pub plaintext_len: u64,
    /// The certificate's state.
    pub certificate: CertificateCheck,
    /// The sending site's domain.
    pub sender_domain: String,
    /// Names this delivery so a repeat of it is stored once (SHA-256 of the sender domain and the bound Message-ID); `None`
    /// when the envelope carries no Message-ID.
    pub delivery: Option<qutemail_store::PeerDeliveryId>,
}

/// The id of a peer site's delivery: SHA-256 over the verified sender domain and the message's
/// bound `Message-ID`. The sender takes fresh QKD keys at every attempt, so nothing else in a
/// repeated delivery is the same; the Message-ID is bound to the ciphertext and the certificate,
/// and the domain is the peer whose keys opened it, so no other site can claim the id.
fn peer_delivery_id(sender_domain: &str, message_id: &str) -> qutemail_store::PeerDeliveryId {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"QuteMail-Peer-Delivery/1\0");
    h.update(sender_domain.to_ascii_lowercase().as_bytes());
    h.update(b"\0");
    h.update(message_id.trim().as_bytes());
    qutemail_store::PeerDeliveryId(h.finalize().into())
}

/// The outcome of opening a stored message.
#[derive(Debug)]
pub struct Opened<W> {
    /// Plaintext bytes written.
    pub plaintext_len: u64,
    /// For envelopes, the certificate's state (`None`: at-rest mail has no certificate).
    pub certificate: Option<CertificateCheck>,
    /// The output, back to the caller.
    pub output: W,
}

/// Site settings of a [`MailVault`].
#[derive(Debug, Clone)]
pub struct VaultSettings {
    /// This gateway's SAE ID at its kmd (e.g. `A-mail`).
    pub sae_id: String,
    /// Protection rules.
    pub policy: ProtectionPolicy,
    /// Size of QKD keys asked for in `qaes` and `hybrid` (bits; 256).
    pub key_bits: u32,
    /// Largest QKD key asked for to build a one-time pad (bits; 8192). The pad uses the smaller of
    /// this and kmd's `max_key_size`.
    pub otp_key_bits: u32,
}

impl VaultSettings {
    /// Defaults for the gateway SAE `sae_id`.
    pub fn new(sae_id: impl Into<String>) -> Self {
        Self { sae_id: sae_id.into(), policy: ProtectionPolicy::default(), key_bits: 256, otp_key_bits: 8192 }
    }
}

/// The site's message protection: QKD keys from kmd, site keys and key wrapping in the HSM,
/// the envelope format. Cheap to clone.
#[derive(Clone)]
pub struct MailVault {
    inner: Arc<Inner>,
}

struct Inner {
    settings: VaultSettings,
    kmd: Option<KmdKeySource>,
    hsm: HsmKeyWrapper,
    keys: SiteKeys,
    peers: SiteDirectory,
}

impl std::fmt::Debug for MailVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailVault")
            .field("domain", &self.inner.keys.domain())
            .field("sae_id", &self.inner.settings.sae_id)
            .field("peers", &self.inner.peers.peers().len())
            .finish_non_exhaustive()
    }
}

impl MailVault {
    /// A vault over its parts. `kmd` may be `None` on a site without QKD links (then only
    /// `normal` and at-rest sealing work).
    pub fn new(
        settings: VaultSettings,
        kmd: Option<KmdKeySource>,
        hsm: HsmKeyWrapper,
        keys: SiteKeys,
        peers: SiteDirectory,
    ) -> Self {
        Self { inner: Arc::new(Inner { settings, kmd, hsm, keys, peers }) }
    }

    /// This site's mail domain.
    pub fn domain(&self) -> &str {
        self.inner.keys.domain()
    }

    /// The peer directory.
    pub fn peers(&self) -> &SiteDirectory {
        &self.inner.peers
    }

    /// The protection a message to `recipient_domain` gets, given what the sender asked for.
    pub fn choose(
        &self,
        recipient_domain: &str,
        requested: Option<Protection>,
    ) -> Result<Protection, VaultError> {
        let linked = self.inner.peers.by_domain(recipient_domain).is_some() && self.inner.kmd.is_some();
        Ok(self.inner.settings.policy.choose(linked.then_some(recipient_domain), requested)?)
    }

    /// Seals the inner RFC 5322 message (`order.inner_len` bytes from `inner`) for
    /// `order.recipient_domain` into `output` with `order.protection` (from [`Self::choose`];
    /// not `normal`). Takes the QKD keys from kmd; when kmd has none, the peer's
    /// [`KeysExhausted`](crate::KeysExhausted) rule decides: `defer` returns
    /// [`VaultError::KeysUnavailable`] (the message waits), `refuse` returns
    /// [`VaultError::KeysExhaustedRefused`], and `pqc` seals with ML-KEM only where
    /// `may_fall_back` is set (the protection was the policy's choice, not the sender's).
    /// Streams with memory bounded by the chunk size.
    pub async fn seal_outbound<R, W>(
        &self,
        order: SealOrder,
        inner: R,
        output: W,
    ) -> Result<Outbound<W>, VaultError>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let SealOrder { recipient_domain, protection, may_fall_back, routing, inner_len } = order;
        let recipient_domain = recipient_domain.as_str();
        let s = &self.inner.settings;
        let peer = self
            .inner
            .peers
            .by_domain(recipient_domain)
            .ok_or_else(|| VaultError::UnknownPeer(recipient_domain.to_owned()))?
            .clone();
        let (protection, keys, link) = match protection {
            Protection::Normal => return Err(VaultError::NotSealable(Protection::Normal)),
            Protection::Pqc => (Protection::Pqc, Vec::new(), None),
            p => {
                let kmd = self.inner.kmd.as_ref().ok_or(VaultError::NoKmd)?;
                let (number, bits, per_request) = if p == Protection::Otp {
                    let len = usize::try_from(inner_len).unwrap_or(usize::MAX);
                    if len > s.policy.otp_max_bytes {
                        return Err(VaultError::OtpTooLarge { size: inner_len, max: s.policy.otp_max_bytes });
                    }
                    // The pad is built from kmd's largest keys, in as few keys as kmd allows.
                    let (max_bits, max_keys) = kmd.limits(&peer.sae_id).await?;
                    let bits = s.otp_key_bits.min(max_bits) / 8 * 8;
                    let needed = qutemail_envelope::otp_keys_needed(len, (bits / 8).max(1) as usize);
                    if bits == 0 || max_keys == 0 {
                        return Err(VaultError::Kmd {
                            url: kmd.url().to_owned(),
                            reason: format!(
                                "kmd serves no keys usable for a pad ({max_bits} bits, {max_keys} per request)"
                            ),
                        });
                    }
                    (needed, bits, max_keys as usize)
                } else {
                    (1, s.key_bits, 1)
                };
                match take_keys(kmd, &peer.sae_id, number, bits, per_request).await {
                    Ok((keys, link)) => (p, keys, Some(link)),
                    Err(VaultError::KeysUnavailable { url, reason }) => {
                        match s.policy.keys_exhausted_for(&peer.domain) {
                            KeysExhausted::Pqc if may_fall_back => {
                                tracing::warn!(%url, %reason, peer = %peer.domain, wanted = %p,
                                    "no QKD keys: sealing with ML-KEM only (the policy's pqc fallback)");
                                (Protection::Pqc, Vec::new(), None)
                            }
                            KeysExhausted::Refuse => {
                                return Err(VaultError::KeysExhaustedRefused {
                                    peer: peer.domain.clone(),
                                    reason,
                                });
                            }
                            KeysExhausted::Defer | KeysExhausted::Pqc => {
                                return Err(VaultError::KeysUnavailable { url, reason });
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let mode = mode_of(protection).ok_or(VaultError::NotSealable(protection))?;
        let vault = self.clone();
        let sender_domain = self.domain().to_owned();
        let otp_max = s.policy.otp_max_bytes;
        let task = tokio::task::spawn_blocking(move || {
            let link_info = link.as_ref().map(link_info);
            let mut request = SealRequest::new(mode, &routing, &sender_domain, unix_now());
            request.link = link_info.as_ref();
            request.qkd_keys = &keys;
            request.recipient_kem_key = Some(&peer.kem_public_key);
            request.otp_max_size = otp_max;
            let randomness = SealRandomness::generate()?;
            let mut output = output;
            let summary = qutemail_envelope::seal(
                &request,
                &vault.inner.keys.set().signer,
                &randomness,
                inner,
                &mut output,
            )?;
            Ok::<_, qutemail_envelope::EnvelopeError>((summary, output))
        });
        let (summary, output) = task.await.map_err(join_error)?.map_err(VaultError::Envelope)?;
        tracing::info!(peer = %recipient_domain, protection = %protection, keys = summary.key_ids_used.len(),
            bytes = summary.plaintext_len, "message sealed for a peer site");
        Ok(Outbound { protection, summary, output })
    }

    /// Accepts a sealed message from a peer site: reads its outer headers, fetches its QKD keys
    /// from kmd (once: kmd erases them), verifies the whole message and its certificate, and
    /// returns what to store with the bytes (the keys sealed under an HSM-wrapped data key).
    ///
    /// `sealed` is read once, streaming. A message that does not verify is refused with
    /// [`VaultError::Envelope`] (the keys fetched for it are dropped).
    pub async fn accept_inbound<R>(&self, sealed: R) -> Result<Inbound, VaultError>
    where
        R: Read + Send + 'static,
    {
        let message = tokio::task::spawn_blocking(move || SealedMessage::read_header(sealed))
            .await
            .map_err(join_error)?
            .map_err(VaultError::Envelope)?;
        let header = message.header().clone();
        let peer = header
            .source_kme_id
            .as_deref()
            .and_then(|kme| self.inner.peers.by_kme(kme))
            .or_else(|| {
                // pqc messages name no KME: the sender is the peer whose certificate verifies.
                (header.mode == Mode::Pqc).then(|| self.peer_by_from(header.from.as_deref())).flatten()
            })
            .ok_or_else(|| VaultError::UnknownSender {
                kme_id: header.source_kme_id.clone(),
                from: header.from.clone(),
            })?
            .clone();
        let keys = if header.mode.uses_qkd() {
            let kmd = self.inner.kmd.as_ref().ok_or(VaultError::NoKmd)?;
            let per_request =
                if header.key_ids.len() > 1 { kmd.limits(&peer.sae_id).await?.1.max(1) } else { 1 };
            let mut keys = Vec::with_capacity(header.key_ids.len());
            for batch in header.key_ids.chunks(per_request as usize) {
                keys.extend(kmd.decryption_keys(&peer.sae_id, batch).await?.0);
            }
            keys
        } else {
            Vec::new()
        };
        let vault = self.clone();
        let certificate_key = peer.certificate_key;
        let otp_max = self.inner.settings.policy.otp_max_bytes;
        let (report, keys) = tokio::task::spawn_blocking(move || {
            let open_keys = OpenKeys {
                qkd_keys: &keys,
                kem_secret_key: Some(&vault.inner.keys.set().kem),
                sender_certificate_key: Some(&certificate_key),
                otp_max_size: otp_max,
            };
            let report = message.open(&open_keys, std::io::sink())?;
            Ok::<_, qutemail_envelope::EnvelopeError>((report, keys))
        })
        .await
        .map_err(join_error)?
        .map_err(VaultError::Envelope)?;
        // The signed certificate stays in the stored envelope (checkable offline); the record
        // keeps the verified fields for display.
        let certificate = match &report.certificate {
            CertificateCheck::Verified(c) => {
                if !c.sender_domain.eq_ignore_ascii_case(&peer.domain) {
                    return Err(VaultError::CertificateMismatch {
                        claimed: c.sender_domain.clone(),
                        peer: peer.domain.clone(),
                    });
                }
                Some(serde_json::to_vec(c).map_err(|e| VaultError::Internal(e.to_string()))?)
            }
            _ => None,
        };
        let key_record = self.seal_key_record(&keys).await?;
        let protection = protection_of(header.mode);
        tracing::info!(peer = %peer.domain, protection = %protection, keys = keys.len(),
            bytes = report.plaintext_len, "sealed message accepted");
        Ok(Inbound {
            stored: StoredProtection {
                kind: StoredKind::QkdEnvelope,
                protection,
                key_record,
                key_ids: header.key_ids.clone(),
                certificate,
            },
            plaintext_len: report.plaintext_len,
            certificate: report.certificate,
            delivery: header.message_id.as_deref().map(|id| peer_delivery_id(&peer.domain, id)),
            sender_domain: peer.domain,
        })
    }

    /// Seals `plaintext` at rest under a fresh per-message data key, wrapped by the HSM.
    /// `protection` records how the message travelled (`normal` for local and plain mail).
    pub async fn seal_at_rest<R, W>(
        &self,
        protection: Protection,
        plaintext: R,
        output: W,
    ) -> Result<(StoredProtection, u64, W), VaultError>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let key = DataKey::generate().map_err(VaultError::Envelope)?;
        let wrapped = self.inner.hsm.wrap_async(key.as_bytes()).await.map_err(VaultError::Hsm)?;
        let (len, output) = tokio::task::spawn_blocking(move || {
            let params = AtRestParams::generate()?;
            let mut output = output;
            let len = at_rest::seal_at_rest(&key, &params, plaintext, &mut output)?;
            Ok::<_, qutemail_envelope::EnvelopeError>((len, output))
        })
        .await
        .map_err(join_error)?
        .map_err(VaultError::Envelope)?;
        let record = encode_key_record(wrapped.as_bytes(), &[])?;
        let stored = StoredProtection {
            kind: StoredKind::AtRest,
            protection,
            key_record: record,
            key_ids: Vec::new(),
            certificate: None,
        };
        Ok((stored, len, output))
    }

    /// Opens a stored message into `output` (the inner RFC 5322 message). Plaintext is written
    /// chunk by chunk and is authentic only if this returns `Ok`.
    pub async fn open_stored<R, W>(
        &self,
        stored: &StoredProtection,
        blob: R,
        output: W,
    ) -> Result<Opened<W>, VaultError>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let (wrapped, sealed_keys) = decode_key_record(&stored.key_record)?;
        let data_key = self.unwrap_data_key(&wrapped).await?;
        let vault = self.clone();
        let kind = stored.kind;
        let task = tokio::task::spawn_blocking(move || -> Result<Opened<W>, VaultError> {
            let mut output = output;
            match kind {
                StoredKind::AtRest => {
                    let len =
                        at_rest::open_at_rest(&data_key, blob, &mut output).map_err(VaultError::Envelope)?;
                    Ok(Opened { plaintext_len: len, certificate: None, output })
                }
                StoredKind::QkdEnvelope => {
                    let keys = open_key_list(&data_key, &sealed_keys)?;
                    let message = SealedMessage::read_header(blob).map_err(VaultError::Envelope)?;
                    let peer =
                        message.header().source_kme_id.as_deref().and_then(|k| vault.inner.peers.by_kme(k));
                    let open_keys = OpenKeys {
                        qkd_keys: &keys,
                        kem_secret_key: Some(&vault.inner.keys.set().kem),
                        sender_certificate_key: peer.map(|p| &p.certificate_key),
                        // Stored mail was accepted under the limit of its day: open it even if
                        // the limit has been lowered since.
                        otp_max_size: STORED_OTP_MAX,
                    };
                    let report = message.open(&open_keys, &mut output).map_err(VaultError::Envelope)?;
                    Ok(Opened {
                        plaintext_len: report.plaintext_len,
                        certificate: Some(report.certificate),
                        output,
                    })
                }
            }
        });
        task.await.map_err(join_error)?
    }

    fn peer_by_from(&self, from: Option<&str>) -> Option<&crate::directory::PeerSite> {
        let from = from?;
        let domain = from.rsplit('@').next()?.trim_end_matches('>').trim();
        self.inner.peers.by_domain(domain)
    }

    async fn seal_key_record(&self, keys: &[QkdKey]) -> Result<Vec<u8>, VaultError> {
        let data_key = DataKey::generate().map_err(VaultError::Envelope)?;
        let wrapped = self.inner.hsm.wrap_async(data_key.as_bytes()).await.map_err(VaultError::Hsm)?;
        let mut list = Zeroizing::new(Vec::new());
        for k in keys {
            list.extend_from_slice(k.id().as_bytes());
            list.extend_from_slice(&(k.bytes().len() as u32).to_be_bytes());
            list.extend_from_slice(k.bytes());
        }
        let mut sealed = Vec::new();
        let params = AtRestParams::generate().map_err(VaultError::Envelope)?;
        at_rest::seal_at_rest(&data_key, &params, list.as_slice(), &mut sealed)
            .map_err(VaultError::Envelope)?;
        encode_key_record(wrapped.as_bytes(), &sealed)
    }

    async fn unwrap_data_key(&self, wrapped: &WrappedKey) -> Result<DataKey, VaultError> {
        let raw = self.inner.hsm.unwrap_async(wrapped).await.map_err(VaultError::Hsm)?;
        let bytes: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| VaultError::CorruptRecord("the wrapped data key is not 256 bits".into()))?;
        let key = DataKey::from_bytes(Zeroizing::new(bytes));
        Ok(key)
    }
}

/// `number` keys of `bits` in requests of at most `per_request` keys (one-time pads need many).
/// Every batch must come from the same link.
async fn take_keys(
    kmd: &KmdKeySource,
    peer_sae_id: &str,
    number: usize,
    bits: u32,
    per_request: usize,
) -> Result<(Vec<QkdKey>, LinkContext), VaultError> {
    let mut keys = Vec::with_capacity(number);
    let mut link: Option<LinkContext> = None;
    while keys.len() < number {
        let batch = (number - keys.len()).min(per_request);
        let batch = u32::try_from(batch).map_err(|_| VaultError::Internal("key batch too large".into()))?;
        let (got, this_link) = kmd.encryption_keys(peer_sae_id, batch, bits).await?;
        if link.as_ref().is_some_and(|l| l.link_id != this_link.link_id) {
            return Err(VaultError::Kmd {
                url: kmd.url().to_owned(),
                reason: "the keys of one message came from two links".into(),
            });
        }
        link = Some(this_link);
        keys.extend(got);
    }
    let link = link.ok_or_else(|| VaultError::Internal("no keys requested".into()))?;
    Ok((keys, link))
}

fn open_key_list(data_key: &DataKey, sealed: &[u8]) -> Result<Vec<QkdKey>, VaultError> {
    let list = at_rest::open_at_rest_to_vec(data_key, sealed).map_err(VaultError::Envelope)?;
    let corrupt = || VaultError::CorruptRecord("the sealed key list is malformed".into());
    let mut keys = Vec::new();
    let mut rest: &[u8] = &list;
    while !rest.is_empty() {
        let (id, tail) = rest.split_at_checked(16).ok_or_else(corrupt)?;
        let (len, tail) = tail.split_at_checked(4).ok_or_else(corrupt)?;
        let len = u32::from_be_bytes(len.try_into().map_err(|_| corrupt())?) as usize;
        let (bytes, tail) = tail.split_at_checked(len).ok_or_else(corrupt)?;
        let id = uuid::Uuid::from_slice(id).map_err(|_| corrupt())?;
        keys.push(QkdKey::new(id, Zeroizing::new(bytes.to_vec())));
        rest = tail;
    }
    Ok(keys)
}

fn encode_key_record(wrapped: &[u8], sealed_keys: &[u8]) -> Result<Vec<u8>, VaultError> {
    join_key_record(KeyWrapping::Hsm, wrapped, sealed_keys)
}

fn decode_key_record(record: &[u8]) -> Result<(WrappedKey, Vec<u8>), VaultError> {
    let (wrapped, rest) = split_key_record(record, KeyWrapping::Hsm)?;
    let wrapped = WrappedKey::from_bytes(wrapped).map_err(|e| VaultError::CorruptRecord(e.to_string()))?;
    Ok((wrapped, rest.to_vec()))
}

fn link_info(link: &LinkContext) -> LinkInfo {
    LinkInfo {
        link_id: link.link_id.clone(),
        source_kme_id: link.source_kme_id.clone(),
        target_kme_id: link.target_kme_id.clone(),
        qber_ppm: link.qber.map_or(0, |q| (q * 1e6).round().clamp(0.0, 1e6) as u32),
        key_rate_bps: link.secret_key_rate_bps.map_or(0, |r| r.max(0.0) as u64),
    }
}

/// The envelope mode of a protection (`normal` mail is not sealed in transit).
fn mode_of(p: Protection) -> Option<Mode> {
    match p {
        Protection::Hybrid => Some(Mode::Hybrid),
        Protection::Qaes => Some(Mode::Qaes),
        Protection::Otp => Some(Mode::Otp),
        Protection::Pqc => Some(Mode::Pqc),
        Protection::Normal => None,
    }
}

fn protection_of(m: Mode) -> Protection {
    match m {
        Mode::Hybrid => Protection::Hybrid,
        Mode::Qaes => Protection::Qaes,
        Mode::Otp => Protection::Otp,
        Mode::Pqc => Protection::Pqc,
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn join_error(e: tokio::task::JoinError) -> VaultError {
    VaultError::Internal(format!("a sealing task failed: {e}"))
}
