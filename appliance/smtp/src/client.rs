//! The outbound SMTP client (relay to a peer site's gateway or any MX).
//!
//! [`SmtpClient::connect`] opens a connection, reads the greeting, says EHLO, upgrades with
//! STARTTLS (required or opportunistic, verifying the server certificate against the given
//! rustls roots), and authenticates with AUTH PLAIN if credentials are configured.
//! [`SmtpClient::send`] runs one transaction (pipelined when the server offers PIPELINING) and
//! returns a [`DeliveryReport`] with the decisive reply per recipient, so the queue can retry
//! 4xx and bounce 5xx. Connection-level failures are [`ClientError`]s (all worth a retry
//! later, except where the variant says otherwise).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use crate::address::{Address, ReversePath};
use crate::params::{MailParams, RcptParams};
use crate::proto::client::{Extensions, dot_stuff, mail_command, rcpt_command};
use crate::proto::server::{Recipient, TlsInfo};
use crate::reply::{Reply, ReplyClass, ReplyError, ReplyParser};

/// Whether to use STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Fail with [`ClientError::TlsUnavailable`] unless STARTTLS succeeds (peer sites).
    Required,
    /// Use STARTTLS when offered, else continue in plain text (public MX, RFC 3207 § 4).
    Opportunistic,
    /// Never (tests, a local relay over a trusted link).
    Disabled,
}

/// Client timeouts, defaults from RFC 5321 § 4.5.3.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// TCP connect.
    pub connect: Duration,
    /// The 220 greeting (5 min).
    pub greeting: Duration,
    /// EHLO, STARTTLS, AUTH, RSET and QUIT replies (5 min).
    pub command: Duration,
    /// The TLS handshake.
    pub tls_handshake: Duration,
    /// MAIL reply (5 min).
    pub mail: Duration,
    /// Each RCPT reply (5 min).
    pub rcpt: Duration,
    /// The 354 reply to DATA (2 min).
    pub data_init: Duration,
    /// Sending the message data (3 min per block; applied to the whole write).
    pub data_block: Duration,
    /// The reply after the final dot (10 min).
    pub data_end: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(300),
            command: Duration::from_secs(300),
            tls_handshake: Duration::from_secs(60),
            mail: Duration::from_secs(300),
            rcpt: Duration::from_secs(300),
            data_init: Duration::from_secs(120),
            data_block: Duration::from_secs(180),
            data_end: Duration::from_secs(600),
        }
    }
}

/// Username and password for AUTH PLAIN (sent only inside TLS).
#[derive(Clone)]
pub struct ClientCredentials {
    /// The user.
    pub username: String,
    /// The password, zeroized on drop.
    pub password: Zeroizing<String>,
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials").field("username", &self.username).finish_non_exhaustive()
    }
}

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Our name in EHLO.
    pub helo_name: String,
    /// STARTTLS policy.
    pub tls: TlsMode,
    /// Roots that verify the server certificate (see [`crate::tls::client_config`]); needed
    /// unless `tls` is [`TlsMode::Disabled`].
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    /// AUTH PLAIN credentials, if the server wants them.
    pub auth: Option<ClientCredentials>,
    /// Timeouts.
    pub timeouts: ClientTimeouts,
}

impl ClientConfig {
    /// STARTTLS required with these roots, no AUTH, default timeouts.
    pub fn new(helo_name: impl Into<String>, tls_config: Arc<rustls::ClientConfig>) -> Self {
        Self {
            helo_name: helo_name.into(),
            tls: TlsMode::Required,
            tls_config: Some(tls_config),
            auth: None,
            timeouts: ClientTimeouts::default(),
        }
    }
}

/// The step of the conversation where something failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// TCP connect.
    Connect,
    /// The 220 greeting.
    Greeting,
    /// EHLO/HELO.
    Ehlo,
    /// STARTTLS and the handshake.
    StartTls,
    /// AUTH.
    Auth,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// DATA and the message.
    Data,
    /// RSET.
    Reset,
    /// QUIT.
    Quit,
}

/// The connection or session failed; no recipient has a definite outcome.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed (refused, unreachable, DNS).
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// What we tried.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No answer in time.
    #[error("timed out after {limit:?} during {stage:?}")]
    Timeout {
        /// Where.
        stage: Stage,
        /// The limit.
        limit: Duration,
    },
    /// The socket failed.
    #[error("connection failed during {stage:?}: {source}")]
    Io {
        /// Where.
        stage: Stage,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server closed the connection.
    #[error("the server closed the connection during {stage:?}")]
    Closed {
        /// Where.
        stage: Stage,
    },
    /// The TLS handshake failed, including certificate verification.
    #[error("TLS handshake with {server_name} failed: {source}")]
    Tls {
        /// The name the certificate was checked against.
        server_name: String,
        /// Why (rustls' error inside).
        #[source]
        source: io::Error,
    },
    /// TLS is required but the server does not offer STARTTLS or refused it.
    #[error("TLS is required but the server {reason}")]
    TlsUnavailable {
        /// What the server did.
        reason: String,
    },
    /// TLS or AUTH is configured inconsistently (e.g. TLS wanted without roots).
    #[error("client configuration: {0}")]
    Config(&'static str),
    /// The name to verify the certificate against is not a valid DNS name or IP address.
    #[error("invalid server name {0:?} for certificate verification")]
    InvalidServerName(String),
    /// A command outside the transaction got an unexpected reply (greeting 554, EHLO and HELO
    /// refused, STARTTLS refused while optional...).
    #[error("unexpected reply during {stage:?}: {reply}")]
    Rejected {
        /// Where.
        stage: Stage,
        /// The server's reply.
        reply: Reply,
    },
    /// AUTH was configured but the server does not offer PLAIN (after TLS).
    #[error("the server does not offer AUTH PLAIN")]
    AuthUnavailable,
    /// The server refused our credentials (5xx: do not retry with the same ones).
    #[error("authentication refused: {reply}")]
    AuthFailed {
        /// The server's reply.
        reply: Reply,
    },
    /// The server's bytes were not SMTP replies.
    #[error("malformed reply during {stage:?}: {source}")]
    Protocol {
        /// Where.
        stage: Stage,
        /// What was wrong.
        #[source]
        source: ReplyError,
    },
}

/// The decisive reply for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientResult {
    /// The recipient.
    pub recipient: Address,
    /// Its RCPT reply if that failed, else the MAIL reply if that failed, else the reply to
    /// the end of data.
    pub reply: Reply,
}

impl RecipientResult {
    /// What the queue should do.
    pub fn outcome(&self) -> RecipientOutcome {
        match self.reply.class() {
            ReplyClass::Positive => RecipientOutcome::Delivered,
            ReplyClass::TransientFailure => RecipientOutcome::Retry,
            // A 3xx here would be a server bug; treat as permanent like any 5xx.
            ReplyClass::Intermediate | ReplyClass::PermanentFailure => RecipientOutcome::Bounce,
        }
    }
}

/// The queue's decision for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientOutcome {
    /// The server took responsibility (2xx).
    Delivered,
    /// Try again later (4xx).
    Retry,
    /// Give up and send a DSN (5xx).
    Bounce,
}

/// The outcome of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// One entry per recipient, in the order given.
    pub recipients: Vec<RecipientResult>,
}

impl DeliveryReport {
    /// The recipients with this outcome.
    pub fn with_outcome(&self, outcome: RecipientOutcome) -> impl Iterator<Item = &RecipientResult> {
        self.recipients.iter().filter(move |r| r.outcome() == outcome)
    }
}

enum MaybeTls<S> {
    Plain(S),
    Tls(Box<tokio_rustls::client::TlsStream<S>>),
    /// Only during the STARTTLS swap; an error there leaves it (the client is then dropped).
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection lost during the TLS upgrade")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Self::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Self::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s).poll_flush(cx),
            Self::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Self::Gone => Poll::Ready(Err(gone())),
        }
    }
}

/// An open SMTP client connection, ready for transactions.
pub struct SmtpClient<S> {
    stream: MaybeTls<S>,
    parser: ReplyParser,
    buf: Vec<u8>,
    extensions: Extensions,
    tls: Option<TlsInfo>,
    timeouts: ClientTimeouts,
}

impl<S> fmt::Debug for SmtpClient<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpClient")
            .field("extensions", &self.extensions)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl SmtpClient<TcpStream> {
    /// Connects to `target` and runs the greeting, EHLO, STARTTLS and AUTH.
    /// `server_name` is what the certificate must name (the MX host name, or an IP address).
    pub async fn connect(
        target: impl ToSocketAddrs + fmt::Display,
        server_name: &str,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let label = target.to_string();
        let limit = config.timeouts.connect;
        let stream = match tokio::time::timeout(limit, TcpStream::connect(target)).await {
            Err(_) => return Err(ClientError::Timeout { stage: Stage::Connect, limit }),
            Ok(Err(source)) => return Err(ClientError::Connect { target: label, source }),
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        Self::handshake(stream, server_name, config).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> SmtpClient<S> {
    /// Runs the greeting, EHLO, STARTTLS and AUTH over an already connected `stream`.
    pub async fn handshake(stream: S, server_name: &str, config: &ClientConfig) -> Result<Self, ClientError> {
        let mut client = Self {
            stream: MaybeTls::Plain(stream),
            parser: ReplyParser::new(),
            buf: vec![0; 16 * 1024],
            extensions: Extensions::default(),
            tls: None,
            timeouts: config.timeouts,
        };
        let greeting = client.read_reply(Stage::Greeting, config.timeouts.greeting).await?;
        if greeting.code != 220 {
            return Err(ClientError::Rejected { stage: Stage::Greeting, reply: greeting });
        }
        client.ehlo(&config.helo_name).await?;
        client.starttls(server_name, config).await?;
        if let Some(credentials) = &config.auth {
            client.auth_plain(credentials).await?;
        }
        Ok(client)
    }

    /// What the server announced (after STARTTLS, the second EHLO's).
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The TLS parameters, when STARTTLS succeeded.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    async fn write(&mut self, stage: Stage, bytes: &[u8], limit: Duration) -> Result<(), ClientError> {
        let stream = &mut self.stream;
        match tokio::time::timeout(limit, async {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await
        {
            Err(_) => Err(ClientError::Timeout { stage, limit }),
            Ok(Err(source)) => Err(ClientError::Io { stage, source }),
            Ok(Ok(())) => Ok(()),
        }
    }

    async fn read_reply(&mut self, stage: Stage, limit: Duration) -> Result<Reply, ClientError> {
        loop {
            if let Some(reply) =
                self.parser.next_reply().map_err(|source| ClientError::Protocol { stage, source })?
            {
                return Ok(reply);
            }
            let n = match tokio::time::timeout(limit, self.stream.read(&mut self.buf)).await {
                Err(_) => return Err(ClientError::Timeout { stage, limit }),
                Ok(Err(source)) => return Err(ClientError::Io { stage, source }),
                Ok(Ok(0)) => return Err(ClientError::Closed { stage }),
                Ok(Ok(n)) => n,
            };
            self.parser.feed(&self.buf[..n]);
        }
    }

    async fn command(&mut self, stage: Stage, line: &str, limit: Duration) -> Result<Reply, ClientError> {
        self.write(stage, line.as_bytes(), limit).await?;
        self.read_reply(stage, limit).await
    }

    async fn ehlo(&mut self, helo_name: &str) -> Result<(), ClientError> {
        let limit = self.timeouts.command;
        let reply = self.command(Stage::Ehlo, &format!("EHLO {helo_name}\r\n"), limit).await?;
        if reply.code == 250 {
            self.extensions = Extensions::from_ehlo(&reply);
            return Ok(());
        }
        // RFC 5321 § 3.2: fall back to HELO (no extensions) when EHLO is not understood.
        let reply = self.command(Stage::Ehlo, &format!("HELO {helo_name}\r\n"), limit).await?;
        if reply.code != 250 {
            return Err(ClientError::Rejected { stage: Stage::Ehlo, reply });
        }
        self.extensions = Extensions::default();
        Ok(())
    }

    async fn starttls(&mut self, server_name: &str, config: &ClientConfig) -> Result<(), ClientError> {
        if config.tls == TlsMode::Disabled {
            return Ok(());
        }
        let Some(tls_config) = &config.tls_config else {
            return Err(ClientError::Config("STARTTLS wanted but no root certificates were given"));
        };
        if !self.extensions.starttls {
            if config.tls == TlsMode::Required {
                return Err(ClientError::TlsUnavailable { reason: "does not offer STARTTLS".into() });
            }
            tracing::info!("STARTTLS not offered, continuing without TLS");
            return Ok(());
        }
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| ClientError::InvalidServerName(server_name.to_owned()))?;
        let reply = self.command(Stage::StartTls, "STARTTLS\r\n", self.timeouts.command).await?;
        if reply.code != 220 {
            if config.tls == TlsMode::Required {
                return Err(ClientError::TlsUnavailable { reason: format!("refused STARTTLS: {reply}") });
            }
            tracing::info!(%reply, "STARTTLS refused, continuing without TLS");
            return Ok(());
        }
        if self.parser.has_partial() {
            // Bytes after the 220 were sent before TLS: an injection attempt (RFC 3207 § 5).
            return Err(ClientError::TlsUnavailable { reason: "sent data after its STARTTLS reply".into() });
        }
        let MaybeTls::Plain(plain) = std::mem::replace(&mut self.stream, MaybeTls::Gone) else {
            return Err(ClientError::Config("STARTTLS on a connection that is already TLS"));
        };
        let limit = self.timeouts.tls_handshake;
        let connector = TlsConnector::from(tls_config.clone());
        let tls = match tokio::time::timeout(limit, connector.connect(name, plain)).await {
            Err(_) => return Err(ClientError::Timeout { stage: Stage::StartTls, limit }),
            Ok(Err(source)) => return Err(ClientError::Tls { server_name: server_name.to_owned(), source }),
            Ok(Ok(tls)) => tls,
        };
        self.tls = Some(crate::tls::tls_info(tls.get_ref().1));
        self.stream = MaybeTls::Tls(Box::new(tls));
        // RFC 3207 § 4.2: forget what we learnt and ask again.
        self.ehlo(&config.helo_name).await
    }

    async fn auth_plain(&mut self, credentials: &ClientCredentials) -> Result<(), ClientError> {
        if self.tls.is_none() {
            return Err(ClientError::Config("refusing to send AUTH credentials without TLS"));
        }
        if !self.extensions.offers_auth("PLAIN") {
            return Err(ClientError::AuthUnavailable);
        }
        let mut raw = Zeroizing::new(Vec::new());
        raw.push(0);
        raw.extend_from_slice(credentials.username.as_bytes());
        raw.push(0);
        raw.extend_from_slice(credentials.password.as_bytes());
        let line = Zeroizing::new(format!("AUTH PLAIN {}\r\n", B64.encode(&raw)));
        let reply = self.command(Stage::Auth, &line, self.timeouts.command).await?;
        match reply.code {
            235 => Ok(()),
            _ => Err(ClientError::AuthFailed { reply }),
        }
    }

    /// Sends one message to `recipients`. Recipient-level refusals are in the report; only
    /// connection and protocol failures are errors.
    pub async fn send(
        &mut self,
        from: &ReversePath,
        recipients: &[Address],
        message: &[u8],
    ) -> Result<DeliveryReport, ClientError> {
        let recipients: Vec<Recipient> = recipients
            .iter()
            .map(|a| Recipient { address: a.clone(), params: RcptParams::default() })
            .collect();
        self.send_with_dsn(from, &MailParams::default(), &recipients, message).await
    }

    /// [`Self::send`] passing on DSN requests (RFC 3461): RET and ENVID from `dsn`, NOTIFY and
    /// ORCPT per recipient, sent only when the server offers DSN (otherwise the relaying queue
    /// owes the "relayed" DSN itself, § 5.2.7). The other fields of `dsn` are ignored: SIZE,
    /// BODY and SMTPUTF8 follow the message and the server's extensions.
    pub async fn send_with_dsn(
        &mut self,
        from: &ReversePath,
        dsn: &MailParams,
        recipients: &[Recipient],
        message: &[u8],
    ) -> Result<DeliveryReport, ClientError> {
        let eight_bit = message.iter().any(|b| *b >= 0x80);
        let mail = mail_command(from, message.len(), eight_bit, dsn, &self.extensions);
        let t = self.timeouts;
        let pipelined = self.extensions.pipelining;

        let (mail_reply, rcpt_replies, data_reply) = if pipelined {
            // RFC 2920 § 3.1: MAIL, every RCPT and DATA in one flight, replies in order.
            let mut batch = mail;
            for r in recipients {
                batch.push_str(&rcpt_command(&r.address, &r.params, &self.extensions));
            }
            batch.push_str("DATA\r\n");
            self.write(Stage::Mail, batch.as_bytes(), t.mail).await?;
            let mail_reply = self.read_reply(Stage::Mail, t.mail).await?;
            let mut rcpt_replies = Vec::with_capacity(recipients.len());
            for _ in recipients {
                rcpt_replies.push(self.read_reply(Stage::Rcpt, t.rcpt).await?);
            }
            let data_reply = self.read_reply(Stage::Data, t.data_init).await?;
            (mail_reply, rcpt_replies, Some(data_reply))
        } else {
            let mail_reply = self.command(Stage::Mail, &mail, t.mail).await?;
            let mut rcpt_replies = Vec::with_capacity(recipients.len());
            if mail_reply.is_positive() {
                for r in recipients {
                    let command = rcpt_command(&r.address, &r.params, &self.extensions);
                    rcpt_replies.push(self.command(Stage::Rcpt, &command, t.rcpt).await?);
                }
            }
            let any_accepted = rcpt_replies.iter().any(Reply::is_positive);
            let data_reply = if any_accepted {
                Some(self.command(Stage::Data, "DATA\r\n", t.data_init).await?)
            } else {
                None
            };
            (mail_reply, rcpt_replies, data_reply)
        };

        let any_accepted = mail_reply.is_positive() && rcpt_replies.iter().any(Reply::is_positive);
        let final_reply = match data_reply {
            Some(reply) if reply.code == 354 && any_accepted => {
                let mut stuffed = Vec::new();
                dot_stuff(message, &mut stuffed);
                self.write(Stage::Data, &stuffed, t.data_block).await?;
                Some(self.read_reply(Stage::Data, t.data_end).await?)
            }
            Some(reply) if reply.code == 354 => {
                // Pipelined DATA accepted although no recipient was: send an empty message's
                // end so the server does not deliver anything (RFC 2920 § 3.1).
                self.write(Stage::Data, b".\r\n", t.data_block).await?;
                let _ = self.read_reply(Stage::Data, t.data_end).await?;
                None
            }
            Some(reply) => Some(reply),
            None => None,
        };
        if !any_accepted && mail_reply.is_positive() {
            // Leave no half-open transaction for the next message on this connection.
            let reply = self.command(Stage::Reset, "RSET\r\n", t.command).await?;
            if !reply.is_positive() {
                return Err(ClientError::Rejected { stage: Stage::Reset, reply });
            }
        }

        let results = recipients
            .iter()
            .enumerate()
            .map(|(i, recipient)| {
                let reply = if !mail_reply.is_positive() {
                    mail_reply.clone()
                } else {
                    match rcpt_replies.get(i) {
                        Some(r) if !r.is_positive() => r.clone(),
                        // Accepted recipient: the end-of-data reply decides (the DATA
                        // refusal when there was no 354).
                        _ => final_reply.clone().unwrap_or_else(|| mail_reply.clone()),
                    }
                };
                RecipientResult { recipient: recipient.address.clone(), reply }
            })
            .collect();
        Ok(DeliveryReport { recipients: results })
    }

    /// Ends the session politely (QUIT, then close).
    pub async fn quit(mut self) -> Result<(), ClientError> {
        let reply = self.command(Stage::Quit, "QUIT\r\n", self.timeouts.command).await?;
        let _ = self.stream.shutdown().await;
        if reply.code != 221 {
            return Err(ClientError::Rejected { stage: Stage::Quit, reply });
        }
        Ok(())
    }
}
