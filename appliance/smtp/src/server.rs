//! The tokio SMTP server: a listener runner per port, and a connection driver generic over the
//! stream, both around the sans-I/O [`ServerSession`].
//!
//! The host plugs in through [`SmtpHandler`]. The driver owns the timeouts (RFC 5321
//! § 4.5.3.2), the TLS handshakes (STARTTLS, RFC 3207, and implicit TLS, RFC 8314) and the
//! connection limit; it logs commands' verbs, addresses and outcomes, never message content or
//! credentials.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;
use zeroize::Zeroizing;

use crate::address::{Address, ReversePath};
use crate::params::{MailParams, RcptParams};
use crate::proto::server::{
    Action, AuthOutcome, Credentials, DeliveryReceipt, MailEnvelope, Refusal, ServerSession, SessionConfig,
    SessionInfo, SessionPolicy, UnexpectedAnswer, WaitingFor,
};
use crate::reply::{Reply, codes};

/// The host side of the server: accounts, routing policy, and the queue or mail store.
///
/// Every method may take its time (the session waits); none is called concurrently for one
/// connection. Refusals are sent to the client as given.
pub trait SmtpHandler: Send + Sync + 'static {
    /// Checks credentials from AUTH PLAIN or LOGIN (only ever offered over TLS here).
    fn authenticate(
        &self,
        session: &SessionInfo,
        credentials: &Credentials,
    ) -> impl Future<Output = AuthOutcome> + Send;

    /// Decides on `MAIL FROM`. On submission, `session.authenticated_as` is set and the host
    /// checks that the sender belongs to that user (553 5.7.1 otherwise, say).
    fn check_sender(
        &self,
        session: &SessionInfo,
        from: &ReversePath,
        params: &MailParams,
    ) -> impl Future<Output = Result<(), Refusal>> + Send;

    /// Decides on `RCPT TO`. On MX, a recipient outside the local domains is the host's to
    /// refuse (550 5.7.1 relaying denied); an unknown local user 550 5.1.1.
    fn check_recipient(
        &self,
        session: &SessionInfo,
        to: &Address,
        params: &RcptParams,
    ) -> impl Future<Output = Result<(), Refusal>> + Send;

    /// Takes responsibility for a message: `message` is the Received: header the server
    /// prepended followed by the message as received (dot-unstuffed, CRLF line endings, at
    /// most `max_message_size` octets after the header). Only return `Ok` once the message is
    /// safely stored: the client then forgets it.
    fn deliver(
        &self,
        envelope: MailEnvelope,
        message: Vec<u8>,
    ) -> impl Future<Output = Result<DeliveryReceipt, Refusal>> + Send;

    /// Told once a connection accepted by [`SmtpServer::run`] has closed, with how long it
    /// lasted (for the host's metrics). The default does nothing.
    fn session_ended(&self, duration: Duration) {
        let _ = duration;
    }
}

/// What a listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerMode {
    /// Port 25, mail from other servers: STARTTLS offered (if configured), no AUTH, the host's
    /// recipient check decides what is local.
    Mx,
    /// Port 587 (RFC 6409): STARTTLS required before AUTH, AUTH required before MAIL.
    Submission,
    /// Port 465 (RFC 8314 § 3.3): TLS from the first byte, AUTH required before MAIL.
    SubmissionImplicitTls,
}

impl ListenerMode {
    fn policy(self, has_tls: bool) -> SessionPolicy {
        match self {
            Self::Mx => SessionPolicy {
                offer_starttls: has_tls,
                offer_auth: false,
                auth_requires_tls: true,
                mail_requires_auth: false,
                mail_requires_tls: false,
            },
            Self::Submission => SessionPolicy {
                offer_starttls: true,
                offer_auth: true,
                auth_requires_tls: true,
                mail_requires_auth: true,
                mail_requires_tls: true,
            },
            Self::SubmissionImplicitTls => SessionPolicy {
                offer_starttls: false,
                offer_auth: true,
                auth_requires_tls: true,
                mail_requires_auth: true,
                mail_requires_tls: true,
            },
        }
    }
}

/// Server timeouts (RFC 5321 § 4.5.3.2.7: at least 5 minutes awaiting a command).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerTimeouts {
    /// Waiting for the next command.
    pub command: Duration,
    /// Waiting for the next piece of message data.
    pub data: Duration,
    /// A TLS handshake (STARTTLS or implicit).
    pub tls_handshake: Duration,
    /// Writing replies to a client that does not read.
    pub write: Duration,
}

impl Default for ServerTimeouts {
    fn default() -> Self {
        Self {
            command: Duration::from_secs(300),
            data: Duration::from_secs(300),
            tls_handshake: Duration::from_secs(60),
            write: Duration::from_secs(300),
        }
    }
}

/// A listener configuration is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenerConfigError {
    /// Submission and implicit TLS cannot work without a certificate.
    #[error("the {mode:?} listener needs a TLS certificate (STARTTLS or implicit TLS is mandatory there)")]
    TlsRequired {
        /// The mode.
        mode: ListenerMode,
    },
    /// A limit of zero would refuse everything.
    #[error("{what} must be at least 1")]
    ZeroLimit {
        /// Which limit.
        what: &'static str,
    },
}

/// One listener: its mode, session limits, TLS, timeouts and connection limit.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    mode: ListenerMode,
    session: SessionConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    timeouts: ServerTimeouts,
    max_connections: usize,
}

impl ListenerConfig {
    /// A listener of `mode` named `hostname`, with default limits (25 MiB, 100 recipients,
    /// 20 errors, 100 connections) and timeouts.
    pub fn new(
        mode: ListenerMode,
        hostname: impl Into<String>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self, ListenerConfigError> {
        if tls.is_none() && mode != ListenerMode::Mx {
            return Err(ListenerConfigError::TlsRequired { mode });
        }
        Ok(Self {
            mode,
            session: SessionConfig::new(hostname, mode.policy(tls.is_some())),
            tls,
            timeouts: ServerTimeouts::default(),
            max_connections: 100,
        })
    }

    /// Largest message in octets (advertised as SIZE).
    pub fn max_message_size(mut self, octets: u64) -> Result<Self, ListenerConfigError> {
        if octets == 0 {
            return Err(ListenerConfigError::ZeroLimit { what: "max_message_size" });
        }
        self.session.max_message_size = octets;
        Ok(self)
    }

    /// Most recipients per message.
    pub fn max_recipients(mut self, recipients: usize) -> Result<Self, ListenerConfigError> {
        if recipients == 0 {
            return Err(ListenerConfigError::ZeroLimit { what: "max_recipients" });
        }
        self.session.max_recipients = recipients;
        Ok(self)
    }

    /// Most 5xx-causing commands before 421 and disconnect.
    pub fn max_errors(mut self, errors: u32) -> Result<Self, ListenerConfigError> {
        if errors == 0 {
            return Err(ListenerConfigError::ZeroLimit { what: "max_errors" });
        }
        self.session.max_errors = errors;
        Ok(self)
    }

    /// Most simultaneous connections; more get 421 4.3.2 and are closed.
    pub fn max_connections(mut self, connections: usize) -> Result<Self, ListenerConfigError> {
        if connections == 0 {
            return Err(ListenerConfigError::ZeroLimit { what: "max_connections" });
        }
        self.max_connections = connections;
        Ok(self)
    }

    /// Timeouts.
    pub fn timeouts(mut self, timeouts: ServerTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The mode.
    pub fn mode(&self) -> ListenerMode {
        self.mode
    }

    /// The session configuration derived from the mode and limits.
    pub fn session(&self) -> &SessionConfig {
        &self.session
    }
}

/// A connection ended abnormally (a normal QUIT, timeout or hang-up is `Ok`).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Reading or writing the socket failed.
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The client did not read our replies in time.
    #[error("the client did not accept our reply within {0:?}")]
    WriteTimeout(Duration),
    /// The TLS handshake failed (bad ClientHello, no common cipher, ...).
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(std::io::Error),
    /// The TLS handshake did not finish in time.
    #[error("TLS handshake did not finish within {0:?}")]
    TlsHandshakeTimeout(Duration),
    /// The driver and the session disagree (a bug).
    #[error("internal protocol error: {0}")]
    Internal(#[from] UnexpectedAnswer),
}

enum Ended<S> {
    Closed,
    StartTls(S),
}

/// An SMTP server for one listener, sharing the host `handler`.
#[derive(Debug)]
pub struct SmtpServer<H> {
    handler: Arc<H>,
    config: Arc<ListenerConfig>,
    connections: Arc<Semaphore>,
    /// Set to true when the listener stops: idle sessions then answer 421 4.3.2 and close.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl<H> Clone for SmtpServer<H> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
            config: self.config.clone(),
            connections: self.connections.clone(),
            stopping: self.stopping.clone(),
        }
    }
}

impl<H: SmtpHandler> SmtpServer<H> {
    /// A server for `config` calling `handler`.
    pub fn new(config: ListenerConfig, handler: Arc<H>) -> Self {
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let (stopping, _) = tokio::sync::watch::channel(false);
        Self { handler, config: Arc::new(config), connections, stopping }
    }

    /// Accepts connections on `listener` until `shutdown` completes; each connection runs in
    /// its own task. At shutdown, sessions waiting for a command answer 421 4.3.2 and close;
    /// a message being received or handed to the host is finished first (its client gets its
    /// reply), then the session closes at its next wait for input.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => {
                    self.stopping.send_replace(true);
                    return Ok(());
                }
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            let span = tracing::info_span!("smtp", mode = ?self.config.mode, %peer);
            tokio::spawn(
                async move {
                    match server.connections.clone().try_acquire_owned() {
                        Ok(_permit) => {
                            let started = std::time::Instant::now();
                            if let Err(e) = server.serve_connection(stream, Some(peer)).await {
                                tracing::info!(error = %e, "connection ended with an error");
                            }
                            server.handler.session_ended(started.elapsed());
                        }
                        Err(_) => server.refuse_busy(stream).await,
                    }
                }
                .instrument(span),
            );
        }
    }

    async fn refuse_busy<S: AsyncWrite + Unpin>(&self, mut stream: S) {
        tracing::info!(limit = self.config.max_connections, "connection limit reached, refusing");
        let reply = Reply::new(421, codes::SHUTTING_DOWN, "Too many connections, try again later");
        let _ = tokio::time::timeout(self.config.timeouts.write, async {
            stream.write_all(&reply.to_bytes()).await?;
            stream.shutdown().await
        })
        .await;
    }

    /// Runs one SMTP session over `stream` (plain, or TLS for implicit-TLS listeners) to its
    /// end. Not subject to the connection limit (that is [`Self::run`]'s).
    pub async fn serve_connection<S>(
        &self,
        stream: S,
        peer: Option<SocketAddr>,
    ) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let config = &self.config;
        tracing::debug!("connection accepted");
        if config.mode == ListenerMode::SubmissionImplicitTls {
            let tls = self.handshake(stream).await?;
            let info = crate::tls::tls_info(tls.get_ref().1);
            let mut session = ServerSession::new(config.session.clone(), peer, Some(info));
            self.drive(&mut session, tls).await?;
            return Ok(());
        }
        let mut session = ServerSession::new(config.session.clone(), peer, None);
        let Ended::StartTls(plain) = self.drive(&mut session, stream).await? else {
            return Ok(());
        };
        let tls = self.handshake(plain).await?;
        let info = crate::tls::tls_info(tls.get_ref().1);
        tracing::debug!(version = %info.version, cipher = %info.cipher, "STARTTLS done");
        session.tls_established(info)?;
        // The session never asks for STARTTLS twice (it answers 503 inside TLS).
        self.drive(&mut session, tls).await?;
        Ok(())
    }

    async fn handshake<S>(&self, stream: S) -> Result<tokio_rustls::server::TlsStream<S>, ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Some(tls) = &self.config.tls else {
            // ListenerConfig::new refuses TLS modes without a certificate and STARTTLS is only
            // offered with one; reaching here means the two disagree.
            return Err(ConnectionError::Internal(UnexpectedAnswer {
                answer: "a TLS handshake",
                state: "configured without a certificate",
            }));
        };
        let limit = self.config.timeouts.tls_handshake;
        match tokio::time::timeout(limit, TlsAcceptor::from(tls.clone()).accept(stream)).await {
            Err(_) => Err(ConnectionError::TlsHandshakeTimeout(limit)),
            Ok(Err(e)) => Err(ConnectionError::TlsHandshake(e)),
            Ok(Ok(tls)) => Ok(tls),
        }
    }

    async fn write_out<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        out: &mut Vec<u8>,
    ) -> Result<(), ConnectionError> {
        if out.is_empty() {
            return Ok(());
        }
        let limit = self.config.timeouts.write;
        match tokio::time::timeout(limit, async {
            stream.write_all(out).await?;
            stream.flush().await
        })
        .await
        {
            Err(_) => Err(ConnectionError::WriteTimeout(limit)),
            Ok(result) => {
                out.clear();
                Ok(result?)
            }
        }
    }

    /// Pumps bytes and actions between `stream`, `session` and the handler.
    async fn drive<S>(&self, session: &mut ServerSession, mut stream: S) -> Result<Ended<S>, ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut out = Vec::with_capacity(1024);
        // The read buffer may hold an AUTH line: wiped on drop.
        let mut buf = Zeroizing::new(vec![0u8; 64 * 1024]);
        let mut stopping = self.stopping.subscribe();
        loop {
            while let Some(action) = session.next_action() {
                match action {
                    Action::Reply(reply) => reply.write_to(&mut out),
                    Action::Close => {
                        self.write_out(&mut stream, &mut out).await?;
                        let _ = stream.shutdown().await;
                        tracing::debug!("connection closed by the server");
                        return Ok(Ended::Closed);
                    }
                    Action::StartTls => {
                        self.write_out(&mut stream, &mut out).await?;
                        return Ok(Ended::StartTls(stream));
                    }
                    Action::Authenticate(credentials) => {
                        let outcome = self.handler.authenticate(session.info(), &credentials).await;
                        drop(credentials);
                        session.auth_outcome(outcome)?;
                    }
                    Action::CheckSender { from, params } => {
                        let outcome = self.handler.check_sender(session.info(), &from, &params).await;
                        if let Err(refusal) = &outcome {
                            tracing::info!(%from, code = refusal.code, "sender refused");
                        }
                        session.sender_outcome(outcome)?;
                    }
                    Action::CheckRecipient { to, params } => {
                        let outcome = self.handler.check_recipient(session.info(), &to, &params).await;
                        if let Err(refusal) = &outcome {
                            tracing::info!(%to, code = refusal.code, "recipient refused");
                        }
                        session.recipient_outcome(outcome)?;
                    }
                    Action::Deliver { envelope, message } => {
                        // The client waits for this reply; let it see the earlier ones now.
                        self.write_out(&mut stream, &mut out).await?;
                        let (from, recipients, size) =
                            (envelope.from.clone(), envelope.recipients.len(), message.len());
                        let outcome = self.handler.deliver(envelope, message).await;
                        match &outcome {
                            Ok(receipt) => {
                                tracing::info!(%from, recipients, size, id = %receipt.id, "message accepted")
                            }
                            Err(refusal) => {
                                tracing::info!(%from, recipients, size, code = refusal.code, "message refused")
                            }
                        }
                        session.delivery_outcome(outcome)?;
                    }
                }
            }
            // Input exhausted for now: send the batched replies (RFC 2920 § 3.2), then read.
            self.write_out(&mut stream, &mut out).await?;
            let limit = match session.waiting_for() {
                WaitingFor::Command => self.config.timeouts.command,
                WaitingFor::Data => self.config.timeouts.data,
            };
            // Only a session waiting for a command is stopped; one receiving data gets to
            // finish its message (and is stopped at its next command wait).
            let idle = session.waiting_for() == WaitingFor::Command;
            if idle && *stopping.borrow_and_update() {
                session.shutting_down();
                continue;
            }
            let read = if idle {
                tokio::select! {
                    read = tokio::time::timeout(limit, stream.read(&mut buf[..])) => read,
                    _ = stopping.changed() => continue,
                }
            } else {
                tokio::time::timeout(limit, stream.read(&mut buf[..])).await
            };
            match read {
                Err(_) => {
                    tracing::info!(?limit, "client idle, closing");
                    session.timed_out();
                }
                Ok(Ok(0)) => {
                    tracing::debug!("client closed the connection");
                    return Ok(Ended::Closed);
                }
                Ok(Ok(n)) => session.receive(&buf[..n]),
                Ok(Err(e)) => return Err(ConnectionError::Io(e)),
            }
        }
    }
}
