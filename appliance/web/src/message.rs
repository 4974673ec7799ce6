//! Stored messages as the API shows them: opened through the vault (the store holds only
//! sealed bytes), parsed with `mail-parser`, summarised, with the protection and certificate.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use mail_parser::{Address, MessageParser, MimeHeaders as _};
use qutemail_store::{Flags, Mailbox, MessageMeta, SpecialUse};
use qutemail_vault::{Presented, Protection, StoredKind, StoredProtection};
use serde::Serialize;
use utoipa::ToSchema;

use crate::part_stream::content_type_text;

/// Longest snippet, characters.
const SNIPPET_CHARS: usize = 120;

/// RFC 3339 (UTC) of a time.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    mail_parser::DateTime::from_timestamp(secs).to_rfc3339()
}

/// Whether `id` has the shape of a message id (the store's 32-hex unique id).
pub(crate) fn is_message_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A mail address with its display name.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Addr {
    /// Display name.
    pub name: Option<String>,
    /// Address.
    pub address: String,
}

/// How a message was protected and whether it verified.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProtectionView {
    /// `hybrid|qaes|otp|pqc|normal`.
    pub mode: String,
    /// Whether QKD keys protected it in transit and it verified.
    pub quantum_secured: bool,
    /// Whether it opened and verified.
    pub verified: bool,
}

/// A message in a list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Summary {
    /// Message id.
    pub id: String,
    /// Folder.
    pub folder: String,
    /// Sender.
    pub from: Option<Addr>,
    /// Recipients.
    pub to: Vec<Addr>,
    /// Subject.
    pub subject: String,
    /// Up to 120 characters of the text body.
    pub snippet: String,
    /// RFC 3339.
    pub date: String,
    /// Read.
    pub seen: bool,
    /// Flagged.
    pub flagged: bool,
    /// Has attachments.
    pub has_attachments: bool,
    /// Size, bytes.
    pub size: u64,
    /// Protection.
    pub protection: ProtectionView,
}

/// An attachment's description.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AttachmentView {
    /// Index for `/attachments/{index}/`.
    pub index: usize,
    /// File name.
    pub filename: String,
    /// Content type.
    pub content_type: String,
    /// Size, bytes.
    pub size: u64,
}

/// The per-message certificate.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CertificateView {
    /// Mode.
    pub mode: String,
    /// Algorithm (`X-QKD-Algorithm`).
    pub algorithm: String,
    /// QKD key IDs.
    pub key_ids: Vec<String>,
    /// QKD link.
    pub link_id: Option<String>,
    /// Sender's KME.
    pub source_kme_id: Option<String>,
    /// Receiver's KME.
    pub target_kme_id: Option<String>,
    /// QBER at key time (0..1).
    pub qber: Option<f64>,
    /// Secret key rate at key time, bit/s.
    pub secret_key_rate_bps: Option<f64>,
    /// RFC 3339.
    pub sealed_at: String,
    /// `valid|invalid|absent`.
    pub signature: String,
    /// The signing site.
    pub signer: String,
}

/// A message opened for reading.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessageView {
    /// The summary fields.
    #[serde(flatten)]
    pub summary: Summary,
    /// Cc.
    pub cc: Vec<Addr>,
    /// Plain text body (HTML bodies converted to text).
    pub text: String,
    /// The HTML body as sent, if any (show it sanitised).
    pub html: Option<String>,
    /// Attachments.
    pub attachments: Vec<AttachmentView>,
    /// `message-id`, `in-reply-to`, `references`.
    pub headers: BTreeMap<String, Option<String>>,
    /// Certificate, for mail protected in transit.
    pub certificate: Option<CertificateView>,
    /// Explanation when something failed verification.
    pub warning: Option<String>,
}

/// The folder role the UI shows.
pub(crate) fn role_of(mailbox: &Mailbox) -> Option<&'static str> {
    if mailbox.name == "INBOX" {
        return Some("inbox");
    }
    match mailbox.special_use {
        Some(SpecialUse::Sent) => Some("sent"),
        Some(SpecialUse::Drafts) => Some("drafts"),
        Some(SpecialUse::Trash) => Some("trash"),
        Some(SpecialUse::Junk) => Some("junk"),
        _ => None,
    }
}

fn addrs(a: Option<&Address<'_>>) -> Vec<Addr> {
    let Some(a) = a else { return Vec::new() };
    a.iter()
        .filter_map(|x| {
            x.address().map(|address| Addr { name: x.name().map(str::to_owned), address: address.to_owned() })
        })
        .collect()
}

fn header_text(v: &mail_parser::HeaderValue<'_>) -> Option<String> {
    match v {
        mail_parser::HeaderValue::Text(t) => Some(format!("<{t}>")),
        mail_parser::HeaderValue::TextList(l) => {
            Some(l.iter().map(|t| format!("<{t}>")).collect::<Vec<_>>().join(" "))
        }
        _ => None,
    }
}

/// A stored message opened: the parsed parts the API shows.
pub(crate) struct OpenedMessage {
    pub(crate) view: MessageView,
    /// The bytes as the client sees them (X-QKD-* headers, then the message).
    pub(crate) presented: Presented,
}

/// Opens and parses a message (`folder` is its mailbox name).
pub(crate) fn build(folder: &str, meta: &MessageMeta, presented: Presented) -> OpenedMessage {
    let stored = StoredProtection::from_store(&meta.protection).ok();
    let mode = stored.as_ref().map_or(Protection::Normal, |s| s.protection);
    let envelope = stored.as_ref().is_some_and(|s| s.kind == StoredKind::QkdEnvelope);
    let verified = presented.verified;
    let protection = ProtectionView {
        mode: mode.as_str().to_owned(),
        quantum_secured: verified && envelope && mode.uses_qkd(),
        verified,
    };
    let parsed = MessageParser::default().parse(&presented.message[..]);
    let (mut subject, mut from, mut to, mut cc, mut text, mut html, mut date) =
        (String::new(), None, Vec::new(), Vec::new(), String::new(), None, None);
    let mut attachments = Vec::new();
    let mut headers = BTreeMap::new();
    if let Some(m) = &parsed {
        subject = m.subject().unwrap_or_default().to_owned();
        from = addrs(m.from()).into_iter().next();
        to = addrs(m.to());
        cc = addrs(m.cc());
        text = m.body_text(0).map(Cow::into_owned).unwrap_or_default();
        // mail-parser lists a text-only part as an HTML body too; only a real text/html part counts.
        html = m
            .html_part(0)
            .filter(|p| p.is_content_type("text", "html"))
            .and_then(|_| m.body_html(0))
            .map(Cow::into_owned);
        date = m.date().map(|d| d.to_rfc3339());
        for (index, part) in m.attachments().enumerate() {
            let content_type = content_type_text(part.content_type());
            attachments.push(AttachmentView {
                index,
                filename: part.attachment_name().unwrap_or("attachment").to_owned(),
                content_type,
                size: part.contents().len() as u64,
            });
        }
        headers.insert("message-id".to_owned(), m.message_id().map(|id| format!("<{id}>")));
        headers.insert("in-reply-to".to_owned(), header_text(m.in_reply_to()));
        headers.insert("references".to_owned(), header_text(m.references()));
    }
    let snippet: String =
        text.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(SNIPPET_CHARS).collect();
    let certificate = stored.as_ref().and_then(|s| certificate_view(s, verified));
    let warning = if !verified {
        Some(
            "This message could not be opened or its integrity could not be verified. It may have been \
             altered after it was sealed; it is shown as an explanation with the sealed original attached."
                .to_owned(),
        )
    } else if envelope && certificate.is_none() {
        Some("This message arrived sealed but its certificate could not be verified.".to_owned())
    } else {
        None
    };
    let summary = Summary {
        id: meta.unique_id.clone(),
        folder: folder.to_owned(),
        from,
        to,
        subject,
        snippet,
        date: date.unwrap_or_else(|| rfc3339(meta.internal_date)),
        seen: meta.flags.contains(Flags::SEEN),
        flagged: meta.flags.contains(Flags::FLAGGED),
        has_attachments: !attachments.is_empty(),
        size: meta.size,
        protection,
    };
    OpenedMessage {
        view: MessageView { summary, cc, text, html, attachments, headers, certificate, warning },
        presented,
    }
}

fn certificate_view(stored: &StoredProtection, verified: bool) -> Option<CertificateView> {
    let c: qutemail_envelope::Certificate = serde_json::from_slice(stored.certificate.as_deref()?).ok()?;
    Some(CertificateView {
        mode: c.mode,
        algorithm: c.algorithm,
        key_ids: c.key_ids,
        link_id: c.link_id,
        source_kme_id: c.source_kme_id,
        target_kme_id: c.target_kme_id,
        qber: c.qber_ppm.map(|p| f64::from(p) / 1_000_000.0),
        secret_key_rate_bps: c.key_rate_bps.map(|r| r as f64),
        sealed_at: rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(c.sealed_at)),
        // The stored record holds the certificate as verified on arrival; a message that no
        // longer opens cannot vouch for it.
        signature: if verified { "valid" } else { "invalid" }.to_owned(),
        signer: c.sender_domain,
    })
}

/// Attachment `index` of an opened message: (file name, content type, bytes), in memory.
/// Downloads stream instead ([`crate::part_stream`], which numbers attachments the same way);
/// this serves messages the stream cannot follow and is the reference its tests compare with.
pub(crate) fn attachment(presented: &Presented, index: usize) -> Option<(String, String, Vec<u8>)> {
    let m = MessageParser::default().parse(&presented.message[..])?;
    let part = m.attachments().nth(index)?;
    let content_type = content_type_text(part.content_type());
    Some((part.attachment_name().unwrap_or("attachment").to_owned(), content_type, part.contents().to_vec()))
}

/// Whether the opened message matches a search text (subject, addresses, body; case-insensitive).
pub(crate) fn matches(view: &MessageView, q: &str) -> bool {
    let q = q.to_lowercase();
    let s = &view.summary;
    let addr_hit = |a: &Addr| {
        a.address.to_lowercase().contains(&q)
            || a.name.as_deref().is_some_and(|n| n.to_lowercase().contains(&q))
    };
    s.subject.to_lowercase().contains(&q)
        || s.from.as_ref().is_some_and(addr_hit)
        || s.to.iter().any(addr_hit)
        || view.cc.iter().any(addr_hit)
        || view.text.to_lowercase().contains(&q)
        || view.attachments.iter().any(|a| a.filename.to_lowercase().contains(&q))
}
