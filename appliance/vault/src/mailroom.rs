//! Mail in and out of the store, sealed: what every front end (SMTP delivery, IMAP APPEND,
//! POP3 and IMAP reads, the web) calls, so that no path stores plaintext or shows a message
//! without saying how it was protected.

use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use qutemail_envelope::Certificate;
use qutemail_store::{Appended, Flags, MailboxId, MessageMeta, NewMessage, Store};
use tokio::io::AsyncReadExt as _;
use zeroize::Zeroizing;

use crate::vault::{Inbound, MailVault, StoredKind, StoredProtection};
use crate::{Protection, VaultError};

/// A stored message as a client sees it.
#[derive(Debug)]
pub struct Presented {
    /// The message: the gateway's `X-QKD-*` header lines, then the exact bytes that were sent.
    /// For a message that cannot be opened, an explanation with the sealed original attached.
    pub message: Zeroizing<Vec<u8>>,
    /// Whether the message opened and verified.
    pub verified: bool,
}

/// How a message to append was protected and what it is.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    /// Initial flags.
    pub flags: Flags,
    /// Initial keywords.
    pub keywords: Vec<String>,
    /// INTERNALDATE.
    pub internal_date: SystemTime,
}

impl Default for AppendRequest {
    fn default() -> Self {
        Self { flags: Flags::default(), keywords: Vec::new(), internal_date: SystemTime::now() }
    }
}

impl MailVault {
    /// Seals `message` (plaintext RFC 5322) at rest under a fresh HSM-wrapped data key and
    /// appends it to `mailbox`: IMAP APPEND, local delivery, Sent copies, reports. `protection`
    /// records how it travelled (`normal` for local and plain mail).
    pub async fn append_plain(
        &self,
        store: &Store,
        mailbox: MailboxId,
        protection: Protection,
        request: &AppendRequest,
        message: Zeroizing<Vec<u8>>,
    ) -> Result<Appended, VaultError> {
        let len = message.len() as u64;
        let plain = std::io::Cursor::new(message);
        let (stored, _, sealed) = self.seal_at_rest(protection, plain, Vec::new()).await?;
        let size = presentation_headers(&stored).len() as u64 + len;
        self.append_sealed(store, mailbox, &stored, request, size, sealed).await
    }

    /// Appends an accepted inbound envelope (`sealed`, as it arrived) to `mailbox`, once per
    /// account and delivery: `None` when the account already has it (the sending site repeated
    /// a delivery it could not record), and then nothing is stored.
    pub async fn append_inbound(
        &self,
        store: &Store,
        mailbox: MailboxId,
        inbound: &Inbound,
        request: &AppendRequest,
        sealed: &[u8],
    ) -> Result<Option<Appended>, VaultError> {
        let size = presentation_headers(&inbound.stored).len() as u64 + inbound.plaintext_len;
        let new = new_message(&inbound.stored, request, size);
        let mut reader = std::io::Cursor::new(sealed);
        match &inbound.delivery {
            Some(delivery) => store.append_peer_delivery(mailbox, &new, delivery, &mut reader).await,
            None => store.append(mailbox, &new, &mut reader).await.map(Some),
        }
        .map_err(VaultError::Store)
    }

    async fn append_sealed(
        &self,
        store: &Store,
        mailbox: MailboxId,
        stored: &StoredProtection,
        request: &AppendRequest,
        size: u64,
        sealed: Vec<u8>,
    ) -> Result<Appended, VaultError> {
        let new = new_message(stored, request, size);
        let mut reader = std::io::Cursor::new(sealed);
        store.append(mailbox, &new, &mut reader).await.map_err(VaultError::Store)
    }

    /// The message as a client sees it: the gateway's header lines saying how it was protected,
    /// then the exact bytes sent. A message that does not open or verify is not dropped: the
    /// client gets an explanation with the sealed original attached.
    pub async fn present(&self, store: &Store, meta: &MessageMeta) -> Result<Presented, VaultError> {
        let mut blob = store.read_blob(meta).await.map_err(VaultError::Store)?;
        let mut sealed = Vec::with_capacity(usize::try_from(meta.blob_len).unwrap_or(0));
        blob.read_to_end(&mut sealed)
            .await
            .map_err(|e| VaultError::Internal(format!("reading a blob: {e}")))?;
        let stored = match StoredProtection::from_store(&meta.protection) {
            Ok(s) => s,
            Err(e) => return Ok(unreadable(&e.to_string(), &sealed)),
        };
        match self.open_stored(&stored, std::io::Cursor::new(sealed.clone()), SecretBuf::default()).await {
            Ok(opened) => {
                let headers = presentation_headers(&stored);
                let mut message = Zeroizing::new(Vec::with_capacity(headers.len() + opened.output.0.len()));
                message.extend_from_slice(headers.as_bytes());
                message.extend_from_slice(&opened.output.0);
                Ok(Presented { message, verified: true })
            }
            Err(e)
                if e.is_not_verifiable()
                    || matches!(e, VaultError::CorruptRecord(_) | VaultError::Hsm(_)) =>
            {
                tracing::warn!(uid = meta.uid, error = %e, "a stored message cannot be opened; showing the explanation");
                Ok(unreadable(&e.to_string(), &sealed))
            }
            Err(e) => Err(e),
        }
    }

    /// The message as a client sees it, streamed into `output` with bounded memory: the
    /// presentation header lines of [`MailVault::present`], then the plaintext as each
    /// authenticated chunk of the sealed blob verifies. The blob is read from the store as a
    /// stream, not into memory. `output` is written from a blocking thread, so it may block
    /// (e.g. a bounded channel's `blocking_send`); an error from it stops the opening.
    ///
    /// The message is authentic only if this returns `Ok` (the final chunk proves nothing was
    /// cut off): on an error `output` may have received a prefix, which the caller must discard
    /// or report as failed. Unlike [`MailVault::present`] this produces no explanation for a
    /// message that does not open; a caller that has not yet shown anything falls back to it.
    pub async fn present_streamed<W>(
        &self,
        store: &Store,
        meta: &MessageMeta,
        output: W,
    ) -> Result<W, VaultError>
    where
        W: std::io::Write + Send + 'static,
    {
        let stored = StoredProtection::from_store(&meta.protection)?;
        let blob = store.read_blob(meta).await.map_err(VaultError::Store)?;
        let blob = BlockingBlob { runtime: tokio::runtime::Handle::current(), blob };
        let output = HeadersFirst { headers: Some(presentation_headers(&stored).into_bytes()), output };
        let opened = self.open_stored(&stored, blob, output).await?;
        Ok(opened.output.output)
    }
}

/// A store blob read from a blocking thread (the opening runs in `spawn_blocking`), chunk by
/// chunk as the decryption asks for it.
struct BlockingBlob {
    runtime: tokio::runtime::Handle,
    blob: qutemail_store::BlobReader,
}

impl std::io::Read for BlockingBlob {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.runtime.block_on(self.blob.read(buf))
    }
}

/// Writes the presentation header lines before the first plaintext (or at the final flush of
/// an empty message), from the blocking thread like the plaintext itself.
struct HeadersFirst<W> {
    headers: Option<Vec<u8>>,
    output: W,
}

impl<W: std::io::Write> HeadersFirst<W> {
    fn headers_out(&mut self) -> std::io::Result<()> {
        match self.headers.take() {
            Some(h) => self.output.write_all(&h),
            None => Ok(()),
        }
    }
}

impl<W: std::io::Write> std::io::Write for HeadersFirst<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.headers_out()?;
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.headers_out()?;
        self.output.flush()
    }
}

/// A plaintext buffer that is wiped when dropped.
#[derive(Default)]
struct SecretBuf(Zeroizing<Vec<u8>>);

impl std::io::Write for SecretBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The header lines the gateway puts before a message it shows: how it was protected. They
/// depend only on the stored record, so the size a client is told is the size it gets.
pub fn presentation_headers(stored: &StoredProtection) -> String {
    let mut h = String::new();
    let quantum = stored.kind == StoredKind::QkdEnvelope && stored.protection != Protection::Pqc;
    h.push_str(&format!("X-QKD-Secure: {}\r\n", if quantum { "True" } else { "False" }));
    h.push_str(&format!("X-QKD-Protection: {}\r\n", stored.protection));
    let certificate: Option<Certificate> =
        stored.certificate.as_deref().and_then(|c| serde_json::from_slice(c).ok());
    if let Some(c) = &certificate {
        h.push_str(&format!("X-QKD-Algorithm: {}\r\n", c.algorithm));
    }
    if !stored.key_ids.is_empty() {
        h.push_str("X-QKD-Key-ID:");
        for (i, id) in stored.key_ids.iter().enumerate() {
            h.push_str(if i == 0 { " " } else { ",\r\n " });
            h.push_str(&id.to_string());
        }
        h.push_str("\r\n");
    }
    match (&certificate, stored.kind) {
        (Some(c), _) => h.push_str(&format!(
            "X-QKD-Certificate: verified; signed by {} (key {}); link {}\r\n",
            c.sender_domain,
            c.signing_key_id,
            c.link_id.as_deref().unwrap_or("none")
        )),
        (None, StoredKind::QkdEnvelope) => h.push_str("X-QKD-Certificate: not verifiable\r\n"),
        (None, StoredKind::AtRest) => h.push_str("X-QKD-Certificate: none (sealed at rest by this site)\r\n"),
    }
    h
}

/// The message shown in place of one that cannot be opened: a clear explanation, with the
/// sealed form attached so nothing is lost.
fn unreadable(reason: &str, sealed: &[u8]) -> Presented {
    let boundary = "qutemail-unverifiable";
    let mut m = String::new();
    m.push_str("X-QKD-Secure: False\r\nX-QKD-Certificate: not verifiable\r\n");
    m.push_str("From: QuteMail gateway <postmaster@localhost>\r\n");
    m.push_str("Subject: [not verifiable] a message could not be opened\r\nMIME-Version: 1.0\r\n");
    m.push_str(&format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"));
    m.push_str(&format!("--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"));
    m.push_str("This message could not be opened or its integrity could not be verified, so it is\r\n");
    m.push_str("not shown. It may have been altered after it was sealed. The sealed original is\r\n");
    m.push_str("attached for your administrator.\r\n\r\n");
    m.push_str(&format!("Reason: {}\r\n\r\n", reason.replace(['\r', '\n'], " ")));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: application/octet-stream; name=\"sealed-message.eml\"\r\n\
         Content-Disposition: attachment; filename=\"sealed-message.eml\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ));
    let encoded = B64.encode(sealed);
    for line in encoded.as_bytes().chunks(76) {
        m.push_str(&String::from_utf8_lossy(line));
        m.push_str("\r\n");
    }
    m.push_str(&format!("--{boundary}--\r\n"));
    Presented { message: Zeroizing::new(m.into_bytes()), verified: false }
}

impl StoredProtection {
    /// The store's record of this protection (`kind` is `<kind>.<protection>`).
    pub fn to_store(&self) -> qutemail_store::Protection {
        qutemail_store::Protection {
            kind: format!("{}.{}", self.kind.as_str(), self.protection),
            wrapped_key: self.key_record.clone(),
            key_ids: self.key_ids.iter().map(ToString::to_string).collect(),
            certificate: self.certificate.clone(),
        }
    }

    /// Back from the store's record.
    pub fn from_store(p: &qutemail_store::Protection) -> Result<Self, VaultError> {
        let corrupt = |m: String| VaultError::CorruptRecord(m);
        let (kind, protection) =
            p.kind.split_once('.').ok_or_else(|| corrupt(format!("protection kind {:?}", p.kind)))?;
        let protection = match protection {
            "hybrid" => Protection::Hybrid,
            "qaes" => Protection::Qaes,
            "otp" => Protection::Otp,
            "pqc" => Protection::Pqc,
            "normal" => Protection::Normal,
            other => return Err(corrupt(format!("protection {other:?}"))),
        };
        let key_ids = p
            .key_ids
            .iter()
            .map(|k| uuid::Uuid::try_parse(k).map_err(|_| corrupt(format!("key ID {k:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            kind: StoredKind::parse(kind)?,
            protection,
            key_record: p.wrapped_key.clone(),
            key_ids,
            certificate: p.certificate.clone(),
        })
    }
}

/// The store's record of a sealed message about to be appended.
fn new_message(stored: &StoredProtection, request: &AppendRequest, size: u64) -> NewMessage {
    NewMessage {
        flags: request.flags,
        keywords: request.keywords.clone(),
        internal_date: request.internal_date,
        size,
        protection: stored.to_store(),
        summary: None,
    }
}
