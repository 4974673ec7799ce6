//! `qutemail-vault`: how a QuteMail site protects mail, for every protocol front end (SMTP,
//! IMAP, POP3, REST and webmail) to share.
//!
//! A [`MailVault`] ties together:
//! - the site's kmd, reached over ETSI GS QKD 014 with mutual TLS as the gateway's SAE
//!   ([`KmdKeySource`]): `enc_keys` for outbound mail, `dec_keys` (once per message) inbound;
//! - the HSM ([`qutemail_hsm::HsmKeyWrapper`]), which wraps every key the vault keeps: the
//!   site's long-term keys ([`SiteKeys`]: ML-KEM-768 and the Ed25519 certificate key) and each
//!   stored message's data key;
//! - the peer directory ([`SiteDirectory`]: domain, SAE ID, KME ID and public keys of each peer
//!   site, from its [`SiteCard`]) and the site's [`ProtectionPolicy`];
//! - the envelope format (`qutemail-envelope`, `docs/envelope-format.md`).
//!
//! Outbound: [`MailVault::choose`] picks the protection, [`MailVault::seal_outbound`] takes the
//! keys and seals. Inbound: [`MailVault::accept_inbound`] fetches the keys named in the
//! envelope, verifies the message and its certificate, and returns a [`StoredProtection`] (the
//! keys sealed under an HSM-wrapped data key) to keep next to the bytes as they arrived. Local
//! and normal mail, and Sent copies: [`MailVault::seal_at_rest`]. Reading:
//! [`MailVault::open_stored`]. No plaintext and no unwrapped key is ever written by the vault;
//! sealing and opening stream with memory bounded by the chunk size.

#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod directory;
mod key_record;
mod kmd;
mod mailroom;
mod policy;
mod routing;
mod site_keys;
mod vault;

use std::path::{Path, PathBuf};

pub use directory::{PeerSite, SiteDirectory};
pub use key_record::{KeyWrapping, join_key_record, split_key_record};
pub use kmd::{KmdKeySource, LinkContext};
pub use mailroom::{AppendRequest, Presented, presentation_headers};
pub use policy::{KeysExhausted, PolicyRefusal, Protection, ProtectionPolicy};
pub use routing::routing_headers;
pub use site_keys::{SiteCard, SiteKeys, write_private_atomically};
pub use vault::{
    Inbound, MailVault, Opened, Outbound, SealOrder, StoredKind, StoredProtection, VaultSettings,
};

/// What went wrong protecting or opening a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// kmd could not be asked, or answered something unusable.
    #[error("kmd at {url}: {reason}")]
    Kmd {
        /// kmd's ETSI 014 URL.
        url: String,
        /// What happened.
        reason: String,
    },
    /// kmd has no keys for the peer right now (503): the message waits, or falls back to `pqc`
    /// where the policy allows.
    #[error("kmd at {url} has no QKD keys available: {reason}")]
    KeysUnavailable {
        /// kmd's ETSI 014 URL.
        url: String,
        /// kmd's answer.
        reason: String,
    },
    /// kmd has no QKD keys for the peer and the policy's rule for it is `refuse`: the message
    /// is bounced rather than sent weaker or kept waiting.
    #[error("no QKD keys for {peer} ({reason}) and this site's policy refuses such mail rather than waiting")]
    KeysExhaustedRefused {
        /// The peer's domain.
        peer: String,
        /// kmd's answer.
        reason: String,
    },
    /// The site has no kmd configured, so QKD protection is impossible.
    #[error("this site has no kmd configured: QKD protection is unavailable")]
    NoKmd,
    /// The recipient's domain is not a peer site.
    #[error("{0} is not a peer site sharing a QKD link with this site")]
    UnknownPeer(String),
    /// An inbound envelope names a sender this site does not know.
    #[error("sealed message from an unknown site (KME {kme_id:?}, From {from:?})")]
    UnknownSender {
        /// The envelope's source KME.
        kme_id: Option<String>,
        /// The envelope's From.
        from: Option<String>,
    },
    /// A certificate names another site than the peer that sent the message.
    #[error("the certificate claims the message comes from {claimed}, but it came from {peer}")]
    CertificateMismatch {
        /// The certificate's sender domain.
        claimed: String,
        /// The peer the keys belong to.
        peer: String,
    },
    /// The policy refuses the requested protection.
    #[error(transparent)]
    Policy(#[from] PolicyRefusal),
    /// `normal` mail is not sealed in transit.
    #[error("{0} protection does not seal a message in transit")]
    NotSealable(Protection),
    /// The message is too large for a one-time pad.
    #[error("a one-time pad protects messages up to {max} bytes; this one has {size}")]
    OtpTooLarge {
        /// Message size.
        size: u64,
        /// The site's limit.
        max: usize,
    },
    /// Sealing or opening failed, e.g. the message is not verifiable.
    #[error(transparent)]
    Envelope(qutemail_envelope::EnvelopeError),
    /// The HSM refused or failed.
    #[error("HSM: {0}")]
    Hsm(qutemail_hsm::HsmError),
    /// The site key file is unusable.
    #[error("site key file {}: {reason}", path.display())]
    SiteKeys {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A peer's site card is unusable.
    #[error("site card of {domain}: {reason}")]
    BadSiteCard {
        /// The peer.
        domain: String,
        /// What is wrong.
        reason: String,
    },
    /// The peer directory is inconsistent.
    #[error("peer directory: {0}")]
    Directory(String),
    /// The message to seal is not a usable RFC 5322 message.
    #[error("the message cannot be sealed: {0}")]
    BadMessage(String),
    /// A stored protection record is damaged.
    #[error("stored protection record: {0}")]
    CorruptRecord(String),
    /// A file could not be read or written.
    #[error("{what} ({}): {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The mail store failed.
    #[error(transparent)]
    Store(qutemail_store::StoreError),
    /// A worker task failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl VaultError {
    pub(crate) fn io(path: &Path, what: &'static str, source: std::io::Error) -> Self {
        VaultError::Io { path: path.to_owned(), what, source }
    }

    /// Whether the message itself failed verification (tampered, forged, wrong key): it must
    /// be refused and never shown as valid.
    pub fn is_not_verifiable(&self) -> bool {
        matches!(self, VaultError::Envelope(e) if e.is_not_verifiable())
    }
}
