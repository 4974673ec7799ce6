//! The gateway as the SMTP server's host: who may log in, which recipients are accepted, and
//! where accepted mail goes — local mailboxes (sealed), the outbound queue, or, for a sealed
//! envelope from a peer site, verification with its QKD keys and then the recipients' INBOXes.

use std::sync::Arc;
use std::time::Instant;

use qutemail_queue::OutboundQueue;
use qutemail_smtp::{
    Address, AuthOutcome, Credentials, DeliveryReceipt, EnhancedCode, MailEnvelope, MailParams, RcptParams,
    Refusal, ReversePath, SessionInfo, server::SmtpHandler,
};
use qutemail_store::{AuthError, LoginGate, LoginThrottle, LoginThrottleSettings, Store};
use qutemail_vault::{AppendRequest, MailVault, Protection, VaultError};
use zeroize::Zeroizing;

use crate::inbound_auth::{Disposition, InboundAuth};

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
    /// MX only: SPF/DKIM/DMARC evaluation of mail from non-peer senders.
    inbound_auth: Option<InboundAuth>,
    /// Received messages, session durations and verification failures are counted here.
    metrics: qutemail_telemetry::GatewayMetrics,
    /// Failed AUTH attempts, counted with IMAP's and POP3's (one guessing run, one count).
    login_throttle: Arc<LoginThrottle>,
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
        Arc::new(Self {
            role,
            domain: domain.to_ascii_lowercase(),
            store,
            vault,
            queue,
            events,
            inbound_auth: None,
            metrics: qutemail_telemetry::GatewayMetrics::new(),
            login_throttle: Arc::new(LoginThrottle::new(LoginThrottleSettings::default())),
        })
    }

    /// The host counting failed AUTH attempts in `throttle` (shared with IMAP and POP3).
    pub fn with_login_throttle(mut self: Arc<Self>, throttle: Arc<LoginThrottle>) -> Arc<Self> {
        Arc::make_mut(&mut self).login_throttle = throttle;
        self
    }

    /// The host counting in `metrics` (the registry `/metrics` serves).
    pub fn with_metrics(mut self: Arc<Self>, metrics: qutemail_telemetry::GatewayMetrics) -> Arc<Self> {
        Arc::make_mut(&mut self).metrics = metrics;
        self
    }

    fn listener(&self) -> qutemail_telemetry::Listener {
        match self.role {
            Role::Mx => qutemail_telemetry::Listener::Mx,
            Role::Submission => qutemail_telemetry::Listener::Submission,
        }
    }

    /// The MX host with sender authentication (SPF, DKIM, DMARC) of internet mail.
    pub fn with_inbound_auth(mut self: Arc<Self>, auth: InboundAuth) -> Arc<Self> {
        Arc::make_mut(&mut self).inbound_auth = Some(auth);
        self
    }

    /// MX: evaluates a message from the internet (a sealed envelope from a peer site is
    /// authenticated by its certificate instead, in `deliver_local`). Returns the message to
    /// store, with its Authentication-Results field, and the folder it goes to.
    async fn check_inbound(
        &self,
        envelope: &MailEnvelope,
        message: Zeroizing<Vec<u8>>,
    ) -> Result<(Zeroizing<Vec<u8>>, &'static str), Refusal> {
        let Some(auth) = &self.inbound_auth else { return Ok((message, "INBOX")) };
        let message = Zeroizing::new(crate::inbound_auth::strip_forged_results(&message, auth.hostname()));
        if is_sealed_envelope(&message) {
            return Ok((message, "INBOX"));
        }
        let mail_from = match &envelope.from {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(a) => a.to_string(),
        };
        let ip =
            envelope.session.peer.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |p| p.ip().to_canonical());
        let helo = envelope.session.helo.as_deref().unwrap_or_default();
        let connection = crate::inbound_auth::Connection { ip, helo, mail_from: &mail_from };
        let verdict = auth.evaluate(connection, &message).await?;
        let folder = match verdict.disposition {
            Disposition::Refuse(r) => return Err(r),
            Disposition::Junk => "Junk",
            Disposition::Inbox => "INBOX",
        };
        let mut stored = Zeroizing::new(Vec::with_capacity(verdict.header.len() + message.len()));
        stored.extend_from_slice(verdict.header.as_bytes());
        stored.extend_from_slice(&message);
        Ok((stored, folder))
    }

    fn is_local(&self, a: &Address) -> bool {
        a.domain().eq_ignore_ascii_case(&self.domain)
    }

    async fn deliver_local(
        &self,
        recipients: &[&Address],
        message: &[u8],
        folder: &str,
    ) -> Result<(), Refusal> {
        let sealed_envelope = is_sealed_envelope(message);
        let inbound = if sealed_envelope {
            match self.vault.accept_inbound(std::io::Cursor::new(message.to_vec())).await {
                Ok(i) => Some(i),
                Err(e) => {
                    self.metrics.verify_failed(qutemail_telemetry::VerifyStage::Inbound, failure_kind(&e));
                    return Err(refusal_for(&e));
                }
            }
        } else {
            None
        };
        // A verified envelope's sender is its peer site: say so to the reader's client.
        let with_results;
        let message = match (&inbound, &self.inbound_auth) {
            (Some(i), Some(auth)) => {
                with_results = [auth.peer_site_results(&i.sender_domain).as_bytes(), message].concat();
                &with_results[..]
            }
            _ => message,
        };
        let mut repeats = 0u64;
        for rcpt in recipients {
            let account = self.store.account(&rcpt.to_string()).await.map_err(|_| {
                Refusal::new(550, EnhancedCode::new(5, 1, 1), format!("no mailbox here for <{rcpt}>"))
            })?;
            let inbox = self.store.mailbox(account.id, folder).await.map_err(temporary)?;
            let request = AppendRequest::default();
            let result = match &inbound {
                Some(i) => self.vault.append_inbound(&self.store, inbox.id, i, &request, message).await,
                None => self
                    .vault
                    .append_plain(
                        &self.store,
                        inbox.id,
                        Protection::Normal,
                        &request,
                        Zeroizing::new(message.to_vec()),
                    )
                    .await
                    .map(Some),
            };
            if let Ok(None) = result {
                // The peer repeated a delivery it could not record (it crashed after our 250):
                // accepted again, stored once.
                tracing::info!(rcpt = %rcpt, "repeated peer-site delivery: already in the mailbox, not stored again");
                repeats += 1;
            }
            result.map_err(|e| {
                tracing::error!(error = %e, "cannot store a message");
                Refusal::new(451, EnhancedCode::new(4, 3, 0), "cannot store the message now; try again later")
            })?;
        }
        if let Some(i) = &inbound
            && repeats > 0
        {
            self.metrics.peer_repeated_delivery(&i.sender_domain, repeats);
        }
        if repeats == recipients.len() as u64 {
            // Only repeats (of a peer's sealed delivery): nothing new was stored.
            return Ok(());
        }
        if let Some(e) = &self.events {
            e.mailbox_changed();
        }
        if let Some(i) = &inbound {
            tracing::info!(from = %i.sender_domain, protection = %i.stored.protection, recipients = recipients.len(),
                "quantum-secured message delivered");
        }
        match &inbound {
            Some(i) => {
                self.metrics.message_received(self.listener(), i.stored.protection.as_str(), &i.sender_domain)
            }
            None => self.metrics.message_received(self.listener(), Protection::Normal.as_str(), "internet"),
        }
        Ok(())
    }
}

impl SiteMailHost {
    /// Submission: the role-independent submission (`qutemail_queue::submit`, shared with the
    /// web API's compose): local recipients, the sealed Sent copy, then the outbound queue.
    async fn submit(
        &self,
        envelope: &MailEnvelope,
        message: Zeroizing<Vec<u8>>,
    ) -> Result<DeliveryReceipt, Refusal> {
        let submission = qutemail_queue::Submission {
            from: &envelope.from,
            params: &envelope.params,
            recipients: &envelope.recipients,
            sent_by: envelope.session.authenticated_as.as_deref(),
            requested: None,
            message,
        };
        let done = qutemail_queue::submit(&self.store, &self.vault, &self.queue, &self.domain, submission)
            .await
            .map_err(|e| match e {
                qutemail_queue::SubmitError::NoSuchRecipient(a) => {
                    Refusal::new(550, EnhancedCode::new(5, 1, 1), format!("no mailbox here for <{a}>"))
                }
                e => temporary(e),
            })?;
        if !done.delivered_locally.is_empty()
            && let Some(e) = &self.events
        {
            e.mailbox_changed();
        }
        Ok(DeliveryReceipt { id: done.queue_id.unwrap_or_else(|| "local".into()) })
    }
}

/// The `kind` label of a sealed message that could not be accepted.
fn failure_kind(e: &VaultError) -> &'static str {
    match e {
        VaultError::CertificateMismatch { .. } => "certificate",
        VaultError::UnknownSender { .. } => "unknown_sender",
        e if e.is_not_verifiable() => "integrity",
        VaultError::Kmd { .. } | VaultError::KeysUnavailable { .. } | VaultError::NoKmd => "key_unavailable",
        _ => "other",
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
    fn session_ended(&self, duration: std::time::Duration) {
        self.metrics.smtp_session_ended(self.listener(), duration);
    }

    async fn authenticate(&self, session: &SessionInfo, credentials: &Credentials) -> AuthOutcome {
        let user = &credentials.username;
        let peer = session.peer.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |p| p.ip().to_canonical());
        match self.login_throttle.gate(user, peer, Instant::now()) {
            LoginGate::AddressRefused { retry_after } => {
                tracing::warn!(%peer, retry_after_s = retry_after.as_secs(),
                    "AUTH refused: too many failed logins from this address");
                return AuthOutcome::TemporaryFailure;
            }
            // Slows guessing without locking the account's owner out (see LoginThrottle).
            LoginGate::Proceed { delay } => tokio::time::sleep(delay).await,
        }
        match self.store.authenticate(user, &credentials.password).await {
            Ok(_) => {
                self.login_throttle.succeeded(user, peer);
                AuthOutcome::Accepted
            }
            Err(AuthError::Rejected) => {
                self.login_throttle.failed(user, peer, Instant::now());
                tracing::warn!(%peer, "AUTH failed");
                AuthOutcome::Rejected
            }
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
        if self.role == Role::Submission {
            let receipt = self.submit(&envelope, message).await?;
            // Submitted mail arrives in plaintext over TLS: `normal` until the queue seals it.
            self.metrics.message_received(self.listener(), Protection::Normal.as_str(), "local");
            return Ok(receipt);
        }
        let (message, folder) = match self.role {
            Role::Mx => self.check_inbound(&envelope, message).await?,
            Role::Submission => (message, "INBOX"),
        };
        let local: Vec<&Address> =
            envelope.recipients.iter().map(|r| &r.address).filter(|a| self.is_local(a)).collect();
        let remote: Vec<qutemail_smtp::Recipient> =
            envelope.recipients.iter().filter(|r| !self.is_local(&r.address)).cloned().collect();
        if !local.is_empty() {
            self.deliver_local(&local, &message, folder).await?;
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
