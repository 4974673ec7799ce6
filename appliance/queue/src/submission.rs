//! Submission of a message by a local user, whatever the front end (SMTP submission on 587/465,
//! the web API's compose): recipients on this site get it in their INBOX sealed at rest, the
//! sender keeps a sealed copy in Sent, and mail for other domains goes to the outbound queue,
//! which seals it per policy (QKD modes for peer sites) when it delivers.

use qutemail_smtp::{Address, MailParams, Recipient, ReversePath};
use qutemail_store::{Appended, Flags, Store, StoreError};
use qutemail_vault::{AppendRequest, MailVault, Protection, VaultError};
use zeroize::Zeroizing;

use crate::{OutboundQueue, QueueError};

/// A message a local user submits.
#[derive(Debug)]
pub struct Submission<'a> {
    /// The envelope sender.
    pub from: &'a ReversePath,
    /// MAIL parameters (DSN ENVID, RET ...).
    pub params: &'a MailParams,
    /// The envelope recipients.
    pub recipients: &'a [Recipient],
    /// The authenticated account that keeps a copy in its Sent folder (`None`: no copy).
    pub sent_by: Option<&'a str>,
    /// The protection the sender asked for (`None`: the policy's choice per destination).
    pub requested: Option<Protection>,
    /// The RFC 5322 message, as submitted.
    pub message: Zeroizing<Vec<u8>>,
}

/// What became of a submission.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The sealed copy in the sender's Sent folder.
    pub sent: Option<Appended>,
    /// Recipients on this site, delivered to their INBOX.
    pub delivered_locally: Vec<String>,
    /// The queue ID of the copy for the other recipients, if any.
    pub queue_id: Option<String>,
}

/// Why a submission was not (fully) taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A recipient at this site has no (enabled) account.
    #[error("no mailbox here for <{0}>")]
    NoSuchRecipient(String),
    /// The mail store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sealing failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// Queueing failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// No random bytes for a Message-ID.
    #[error("cannot make a Message-ID: the system's random number generator failed: {0}")]
    Random(getrandom::Error),
}

/// Submits a message from a local user of the site `domain`: a `Message-ID` and `Date` added
/// where the client gave none ([`crate::msa`]), then local recipients (sealed at rest in their
/// INBOX), the Sent copy, and the outbound queue for everyone else. Returns once every part is
/// durable.
pub async fn submit(
    store: &Store,
    vault: &MailVault,
    queue: &OutboundQueue,
    domain: &str,
    mut submission: Submission<'_>,
) -> Result<Submitted, SubmitError> {
    if let Some(completed) =
        crate::msa::complete_headers(&submission.message, domain).map_err(SubmitError::Random)?
    {
        submission.message = Zeroizing::new(completed);
    }
    let is_local = |a: &Address| a.domain().eq_ignore_ascii_case(domain);
    let local: Vec<&Address> =
        submission.recipients.iter().map(|r| &r.address).filter(|a| is_local(a)).collect();
    let remote: Vec<Recipient> =
        submission.recipients.iter().filter(|r| !is_local(&r.address)).cloned().collect();
    let mut delivered_locally = Vec::with_capacity(local.len());
    for rcpt in local {
        let address = rcpt.to_string();
        let account = match store.account(&address).await {
            Ok(a) if !a.disabled => a,
            Ok(_) | Err(StoreError::NoSuchAccount(_)) => return Err(SubmitError::NoSuchRecipient(address)),
            Err(e) => return Err(e.into()),
        };
        let inbox = store.mailbox(account.id, "INBOX").await?;
        vault
            .append_plain(
                store,
                inbox.id,
                Protection::Normal,
                &AppendRequest::default(),
                Zeroizing::new(submission.message.to_vec()),
            )
            .await?;
        delivered_locally.push(address);
    }
    let sent = match submission.sent_by {
        Some(user) => {
            let account = store.account(user).await?;
            let sent = store.mailbox(account.id, "Sent").await?;
            let request = AppendRequest { flags: Flags::SEEN, ..AppendRequest::default() };
            Some(
                vault
                    .append_plain(
                        store,
                        sent.id,
                        Protection::Normal,
                        &request,
                        Zeroizing::new(submission.message.to_vec()),
                    )
                    .await?,
            )
        }
        None => None,
    };
    let queue_id = if remote.is_empty() {
        None
    } else {
        Some(
            queue
                .submit(submission.from, submission.params, &remote, submission.requested, submission.message)
                .await?,
        )
    };
    Ok(Submitted { sent, delivered_locally, queue_id })
}
