//! The gateway as the SMTP server's host: who may log in, which recipients are accepted, and
//! where accepted mail goes — local mailboxes (sealed), the outbound queue, or, for a sealed
//! envelope from a peer site, verification with its QKD keys and then the recipients' INBOXes.

use std::sync::Arc;

use qutemail_queue::OutboundQueue;
use qutemail_smtp::{
    Address, AuthOutcome, Credentials, DeliveryReceipt, EnhancedCode, MailEnvelope, MailParams, RcptParams,
    Refusal, ReversePath, SessionInfo, server::SmtpHandler,
};
use qutemail_store::{AuthError, Store};
use qutemail_vault::{AppendRequest, MailVault, Protection, VaultError};
use zeroize::Zeroizing;

/// Which listener a handler serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Mail from other sites and the Internet: local recipients only.
    Mx,
    /// Authenticated users sending mail anywhere.
    Submission,
}

/// The site's mail handling behind one SMTP listener.
#[derive(Clone)]
pub struct SiteMailHost {
    role: Role,
    domain: String,
    store: Store,
    vault: MailVault,
    queue: OutboundQueue,
    events: Option<qutemail_imap::MailboxEvents>,
}

impl SiteMailHost {
    /// A host for `role`; `events` wakes idling IMAP sessions after deliveries.
    pub fn new(
        role: Role,
        domain: &str,
        store: Store,
        vault: MailVault,
        queue: OutboundQueue,
        events: Option<qutemail_imap::MailboxEvents>,
    ) -> Arc<Self> {
        Arc::new(Self { role, domain: domain.to_ascii_lowercase(), store, vault, queue, events })
    }

    fn is_local(&self, a: &Address) -> bool {
        a.domain().eq_ignore_ascii_case(&self.domain)
    }

    async fn deliver_local(&self, recipients: &[&Address], message: &[u8]) -> Result<(), Refusal> {
        let sealed_envelope = is_sealed_envelope(message);
        let inbound = if sealed_envelope {
            match self.vault.accept_inbound(std::io::Cursor::new(message.to_vec())).await {
                Ok(i) => Some(i),
                Err(e) => return Err(refusal_for(&e)),
            }
        } else {
            None
        };
        for rcpt in recipients {
            let account = self.store.account(&rcpt.to_string()).await.map_err(|_| {
                Refusal::new(550, EnhancedCode::new(5, 1, 1), format!("no mailbox here for <{rcpt}>"))
            })?;
            let inbox = self.store.mailbox(account.id, "INBOX").await.map_err(temporary)?;
            let request = AppendRequest::default();
            let result = match &inbound {
                Some(i) => self.vault.append_inbound(&self.store, inbox.id, i, &request, message).await,
                None => {
                    self.vault
                        .append_plain(
                            &self.store,
                            inbox.id,
                            Protection::Normal,
                            &request,
                            Zeroizing::new(message.to_vec()),
                        )
                        .await
                }
            };
            result.map_err(|e| {
                tracing::error!(error = %e, "cannot store a message");
                Refusal::new(451, EnhancedCode::new(4, 3, 0), "cannot store the message now; try again later")
            })?;
        }
        if let Some(e) = &self.events {
            e.mailbox_changed();
        }
        if let Some(i) = &inbound {
            tracing::info!(from = %i.sender_domain, protection = %i.stored.protection, recipients = recipients.len(),
                "quantum-secured message delivered");
        }
        Ok(())
    }
}

impl SiteMailHost {
    /// Submitted mail is kept in the sender's Sent folder, sealed at rest, before the 250.
    async fn keep_in_sent(&self, envelope: &MailEnvelope, message: &[u8]) -> Result<(), Refusal> {
        let Some(user) = envelope.session.authenticated_as.as_deref() else { return Ok(()) };
        let account = self.store.account(user).await.map_err(temporary)?;
        let sent = self.store.mailbox(account.id, "Sent").await.map_err(temporary)?;
        let request = AppendRequest { flags: qutemail_store::Flags::SEEN, ..AppendRequest::default() };
        self.vault
            .append_plain(
                &self.store,
                sent.id,
                Protection::Normal,
                &request,
                Zeroizing::new(message.to_vec()),
            )
            .await
            .map_err(temporary)?;
        Ok(())
    }
}

/// Whether the message's header block says it is a QuteMail envelope.
fn is_sealed_envelope(message: &[u8]) -> bool {
    let head = qutemail_queue::dsn::header_block(message);
    String::from_utf8_lossy(head).lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(n, v)| n.trim().eq_ignore_ascii_case("x-qkd-secure") && v.trim() == "True")
    })
}

fn refusal_for(e: &VaultError) -> Refusal {
    if e.is_not_verifiable()
        || matches!(e, VaultError::CertificateMismatch { .. } | VaultError::UnknownSender { .. })
    {
        tracing::warn!(error = %e, "sealed message refused");
        Refusal::new(550, EnhancedCode::new(5, 7, 1), format!("message not verifiable: {e}"))
    } else {
        tracing::error!(error = %e, "sealed message cannot be accepted now");
        Refusal::new(
            451,
            EnhancedCode::new(4, 7, 0),
            "the quantum key service is unavailable; try again later",
        )
    }
}

fn temporary(e: impl std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "mail store error");
    Refusal::new(451, EnhancedCode::new(4, 3, 0), "local error; try again later")
}

impl SmtpHandler for SiteMailHost {
    async fn authenticate(&self, _session: &SessionInfo, credentials: &Credentials) -> AuthOutcome {
        match self.store.authenticate(&credentials.username, &credentials.password).await {
            Ok(_) => AuthOutcome::Accepted,
            Err(AuthError::Rejected) => AuthOutcome::Rejected,
            Err(e) => {
                tracing::error!(error = %e, "authentication failed for a local reason");
                AuthOutcome::TemporaryFailure
            }
        }
    }

    async fn check_sender(
        &self,
        session: &SessionInfo,
        from: &ReversePath,
        _params: &MailParams,
    ) -> Result<(), Refusal> {
        if self.role == Role::Mx {
            return Ok(());
        }
        let user = session.authenticated_as.as_deref().unwrap_or_default();
        match from {
            ReversePath::Mailbox(a) if a.to_string().eq_ignore_ascii_case(user) => Ok(()),
            _ => Err(Refusal::new(
                553,
                EnhancedCode::new(5, 7, 1),
                format!("{user} may only send as <{user}>"),
            )),
        }
    }

    async fn check_recipient(
        &self,
        _session: &SessionInfo,
        to: &Address,
        _params: &RcptParams,
    ) -> Result<(), Refusal> {
        if self.is_local(to) {
            return match self.store.account(&to.to_string()).await {
                Ok(a) if !a.disabled => Ok(()),
                Ok(_) | Err(qutemail_store::StoreError::NoSuchAccount(_)) => {
                    Err(Refusal::new(550, EnhancedCode::new(5, 1, 1), format!("no mailbox here for <{to}>")))
                }
                Err(e) => Err(temporary(e)),
            };
        }
        match self.role {
            Role::Submission => Ok(()),
            Role::Mx => Err(Refusal::new(550, EnhancedCode::new(5, 7, 1), "relaying denied")),
        }
    }

    async fn deliver(&self, envelope: MailEnvelope, message: Vec<u8>) -> Result<DeliveryReceipt, Refusal> {
        let message = Zeroizing::new(message);
        let local: Vec<&Address> =
            envelope.recipients.iter().map(|r| &r.address).filter(|a| self.is_local(a)).collect();
        let remote: Vec<qutemail_smtp::Recipient> =
            envelope.recipients.iter().filter(|r| !self.is_local(&r.address)).cloned().collect();
        if !local.is_empty() {
            self.deliver_local(&local, &message).await?;
        }
        if self.role == Role::Submission {
            self.keep_in_sent(&envelope, &message).await?;
        }
        let mut id = String::from("local");
        if !remote.is_empty() {
            id = self
                .queue
                .submit(&envelope.from, &envelope.params, &remote, None, Zeroizing::new(message.to_vec()))
                .await
                .map_err(temporary)?;
        }
        Ok(DeliveryReceipt { id })
    }
}
