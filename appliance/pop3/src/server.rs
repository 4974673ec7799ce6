//! The tokio driver: listeners on 110 (plain, STLS) and 995 (implicit TLS, RFC 8314), one
//! task per connection, each feeding a [`Session`] and doing the I/O, store and vault work it
//! asks for.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qutemail_store::{
    AuthError, ExpungeScope, LoginGate, LoginThrottle, LoginThrottleSettings, MailboxId, NumberSet,
    Selection, Store,
};
use qutemail_vault::MailVault;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;
use zeroize::Zeroizing;

use crate::command::MAX_LINE;
use crate::guard::{MaildropLock, MaildropLocks};
use crate::message::render;
use crate::session::{Action, Login, LoginRefusal, Maildrop, Session};

/// How the POP3 server runs.
#[derive(Debug, Clone)]
pub struct Pop3Config {
    /// The TLS configuration for STLS and port 995 (certificate and key of the site).
    pub tls: Arc<rustls::ServerConfig>,
    /// How long a client may stay silent (and how long one reply may take to be written)
    /// before the server closes the connection without entering UPDATE. RFC 1939 § 3: at
    /// least 10 minutes.
    pub idle_timeout: Duration,
    /// Failed-login throttle: progressive delays per account and per client address, refusal
    /// only for an address beyond its cap. Share one with the gateway's other login front
    /// ends (IMAP), so that a guessing run is counted once whichever protocol it uses.
    pub login_throttle: Arc<LoginThrottle>,
    /// CAPA's IMPLEMENTATION argument.
    pub implementation: String,
}

impl Pop3Config {
    /// The defaults: 10 minutes idle, a login throttle of its own with
    /// [`LoginThrottleSettings::default`].
    pub fn new(tls: Arc<rustls::ServerConfig>) -> Pop3Config {
        Pop3Config {
            tls,
            idle_timeout: Duration::from_secs(10 * 60),
            login_throttle: Arc::new(LoginThrottle::new(LoginThrottleSettings::default())),
            implementation: format!("QuteMail-{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Why one connection ended abnormally (logged, never shown to the client).
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("client idle for longer than {0:?}")]
    Idle(Duration),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("client sent data after STLS before the TLS handshake (command injection attempt)")]
    DataAfterStls,
}

/// The POP3 server. Cheap to clone; clones share locks, limits and the shutdown signal.
#[derive(Clone)]
pub struct Pop3Server {
    inner: Arc<Inner>,
}

struct Inner {
    config: Pop3Config,
    acceptor: TlsAcceptor,
    store: Store,
    vault: MailVault,
    locks: MaildropLocks,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Pop3Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pop3Server").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

/// How a conversation on one transport ended.
enum Exit {
    /// The session is over (QUIT, hang-up by the server after too many errors, shutdown).
    Closed,
    /// The client disconnected without QUIT: nothing is applied.
    Dropped,
    /// STLS was accepted: run the handshake and go on over TLS.
    StartTls,
}

/// What one connection holds beyond the protocol state.
struct Connection {
    peer: SocketAddr,
    lock: Option<MaildropLock>,
    inbox: Option<MailboxId>,
    shutdown: watch::Receiver<bool>,
}

impl Pop3Server {
    /// A server over `store` (the account's INBOX is its maildrop) and `vault` (which opens
    /// each message as the client sees it).
    pub fn new(config: Pop3Config, store: Store, vault: MailVault) -> Pop3Server {
        let acceptor = TlsAcceptor::from(config.tls.clone());
        Pop3Server {
            inner: Arc::new(Inner {
                config,
                acceptor,
                store,
                vault,
                locks: MaildropLocks::default(),
                shutdown: watch::Sender::new(false),
            }),
        }
    }

    /// Serves port 110 (plain, STLS required before login) until [`Pop3Server::shutdown`];
    /// then waits for the open sessions to end (they are told to close, without UPDATE).
    pub async fn serve_plain(&self, listener: TcpListener) {
        self.serve(listener, false).await;
    }

    /// Serves port 995 (TLS from the first byte, RFC 8314) until [`Pop3Server::shutdown`].
    pub async fn serve_tls(&self, listener: TcpListener) {
        self.serve(listener, true).await;
    }

    /// Asks every listener and session of this server to stop. Sessions in TRANSACTION end
    /// without UPDATE: their deletions are not applied (the client did not QUIT).
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    async fn serve(&self, listener: TcpListener, implicit_tls: bool) {
        let mut shutdown = self.inner.shutdown.subscribe();
        let mut sessions = JoinSet::new();
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        tracing::info!(port, implicit_tls, "pop3 listening");
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            while sessions.try_join_next().is_some() {}
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let server = self.clone();
                        let _ = stream.set_nodelay(true);
                        sessions.spawn(async move { server.serve_connection(stream, peer, implicit_tls).await });
                    }
                    Err(e) => {
                        // Out of descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %e, "pop3 accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.changed() => {}
            }
        }
        tracing::info!(port, sessions = sessions.len(), "pop3 listener stopping");
        while sessions.join_next().await.is_some() {}
    }

    /// Serves one accepted connection of any stream type: `implicit_tls` runs the TLS
    /// handshake first (port 995); otherwise the client may upgrade with STLS. Returns when the
    /// connection is over; never panics on what the client sends.
    pub async fn serve_connection<S>(&self, stream: S, peer: SocketAddr, implicit_tls: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let span = tracing::info_span!("pop3", %peer, tls = implicit_tls);
        async {
            match self.connection(stream, peer, implicit_tls).await {
                Ok(()) => tracing::debug!("pop3 connection closed"),
                Err(e) => tracing::info!(error = %e, "pop3 connection ended"),
            }
        }
        .instrument(span)
        .await;
    }

    async fn connection<S>(
        &self,
        stream: S,
        peer: SocketAddr,
        implicit_tls: bool,
    ) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let idle = self.inner.config.idle_timeout;
        let mut session = Session::new(implicit_tls, self.inner.config.implementation.clone());
        let mut reader = LineReader::default();
        let mut stream = if implicit_tls {
            Transport::Tls(Box::new(self.handshake(stream, idle).await?))
        } else {
            Transport::Plain(stream)
        };
        // Declared after the stream so that it is dropped first: the maildrop lock is free by
        // the time the client sees the connection close.
        let mut conn =
            Connection { peer, lock: None, inbox: None, shutdown: self.inner.shutdown.subscribe() };
        let greeting = session.greeting().to_wire();
        match &mut stream {
            Transport::Plain(s) => write(s, &greeting, idle).await?,
            Transport::Tls(s) => write(s.as_mut(), &greeting, idle).await?,
        }
        loop {
            let exit = match &mut stream {
                Transport::Plain(s) => self.converse(s, &mut reader, &mut session, &mut conn).await?,
                Transport::Tls(s) => self.converse(s.as_mut(), &mut reader, &mut session, &mut conn).await?,
            };
            match exit {
                Exit::Closed => {
                    // A clean close (TLS close_notify, then FIN), so clients see an orderly end.
                    let close = async {
                        match &mut stream {
                            Transport::Plain(s) => s.shutdown().await,
                            Transport::Tls(s) => s.shutdown().await,
                        }
                    };
                    let _ = tokio::time::timeout(idle, close).await;
                    return Ok(());
                }
                Exit::Dropped => {
                    if session.is_logged_in() {
                        tracing::info!("client disconnected without QUIT; no deletions applied");
                    }
                    return Ok(());
                }
                Exit::StartTls => {
                    // RFC 2595 § 4 / CVE-2011-0411: anything pipelined behind STLS was sent in
                    // the clear and must not be executed inside TLS.
                    if !reader.is_empty() {
                        return Err(ConnectionError::DataAfterStls);
                    }
                    let Transport::Plain(plain) = stream else {
                        return Ok(());
                    };
                    stream = Transport::Tls(Box::new(self.handshake(plain, idle).await?));
                    session.tls_established();
                    tracing::debug!("pop3 STLS completed");
                }
            }
        }
    }

    async fn handshake<S>(
        &self,
        stream: S,
        idle: Duration,
    ) -> Result<tokio_rustls::server::TlsStream<S>, ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(idle, self.inner.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(e)) => Err(ConnectionError::Handshake(e)),
            Err(_) => Err(ConnectionError::Idle(idle)),
        }
    }

    /// Reads lines and answers them on one transport until the session ends or upgrades.
    async fn converse<T>(
        &self,
        io: &mut T,
        reader: &mut LineReader,
        session: &mut Session,
        conn: &mut Connection,
    ) -> Result<Exit, ConnectionError>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let idle = self.inner.config.idle_timeout;
        loop {
            let event = tokio::select! {
                read = tokio::time::timeout(idle, reader.read_line(io)) => match read {
                    Ok(event) => event?,
                    Err(_) => {
                        // RFC 1939 § 3: an autologout timer closes without entering UPDATE.
                        let _ = write(io, b"-ERR autologout: idle for too long\r\n", idle).await;
                        return Err(ConnectionError::Idle(idle));
                    }
                },
                _ = stopped(&mut conn.shutdown) => {
                    let _ = write(io, b"-ERR [SYS/TEMP] server shutting down\r\n", idle).await;
                    return Ok(Exit::Closed);
                }
            };
            let mut action = match event {
                LineEvent::Line(line) => session.handle_line(&line),
                LineEvent::TooLong => session.line_too_long(),
                LineEvent::Eof => return Ok(Exit::Dropped),
            };
            // A login's outcome is itself an action (a reply, or a hang-up).
            if let Action::Login(login) = action {
                action = match self.login(login, conn).await {
                    Ok(maildrop) => Action::Reply(session.login_succeeded(maildrop)),
                    Err(refusal) => session.login_refused(refusal),
                };
            }
            match action {
                Action::Reply(reply) => write(io, &reply.to_wire(), idle).await?,
                Action::Continue => write(io, b"+ \r\n", idle).await?,
                Action::StartTls(reply) => {
                    write(io, &reply.to_wire(), idle).await?;
                    return Ok(Exit::StartTls);
                }
                Action::Close(reply) => {
                    write(io, &reply.to_wire(), idle).await?;
                    return Ok(Exit::Closed);
                }
                Action::Login(_) => {
                    write(io, b"-ERR [SYS/TEMP] internal error\r\n", idle).await?;
                    return Ok(Exit::Closed);
                }
                Action::Retrieve { number, top } => {
                    let presented = match session.message(number) {
                        Some(meta) => self.inner.vault.present(&self.inner.store, meta).await,
                        None => {
                            write(io, b"-ERR no such message\r\n", idle).await?;
                            continue;
                        }
                    };
                    match presented {
                        Ok(presented) => {
                            let rendered = render(&presented.message, top);
                            let status = session.retrieved(number, top, &rendered).to_wire();
                            write_two(io, &status, &rendered.wire, idle).await?;
                        }
                        Err(e) => {
                            tracing::warn!(number, error = %e, "pop3 message cannot be presented");
                            write(io, &session.retrieve_failed().to_wire(), idle).await?;
                        }
                    }
                }
                Action::Update { delete } => {
                    let outcome = self.update(conn, delete).await;
                    let reply = session.updated(outcome);
                    conn.lock = None;
                    write(io, &reply.to_wire(), idle).await?;
                    return Ok(Exit::Closed);
                }
            }
        }
    }

    /// Checks the limits and the credentials, locks the maildrop and takes its snapshot.
    async fn login(&self, login: Login, conn: &mut Connection) -> Result<Maildrop, LoginRefusal> {
        let inner = &self.inner;
        let address: IpAddr = conn.peer.ip();
        // Count failures under the address as the store matches it, so that spelling variants
        // of one address share one limit.
        let user = qutemail_store::normalize_address(&login.user).unwrap_or_else(|_| login.user.clone());
        let throttle = &inner.config.login_throttle;
        match throttle.gate(&user, address, Instant::now()) {
            LoginGate::AddressRefused { .. } => {
                tracing::warn!(%address, "pop3 login refused: too many failed logins from this address");
                return Err(LoginRefusal::RateLimited);
            }
            // Slows guessing without locking the account's owner out (see LoginThrottle).
            LoginGate::Proceed { delay } => tokio::time::sleep(delay).await,
        }
        let account = match inner.store.authenticate(&login.user, &login.password).await {
            Ok(account) => account,
            Err(AuthError::Rejected) => {
                throttle.failed(&user, address, Instant::now());
                // Debug formatting: the name is the client's, escape anything it smuggles in.
                tracing::info!(user = ?user, "pop3 login failed");
                return Err(LoginRefusal::BadCredentials);
            }
            Err(e) => {
                tracing::warn!(error = %e, "pop3 login: the store cannot check credentials");
                return Err(LoginRefusal::Unavailable);
            }
        };
        drop(login);
        throttle.succeeded(&account.address, address);
        let Some(lock) = inner.locks.try_lock(&account.address) else {
            tracing::info!(user = %account.address, "pop3 login refused: maildrop in use");
            return Err(LoginRefusal::InUse);
        };
        let snapshot = async {
            let inbox = inner.store.mailbox(account.id, "INBOX").await?;
            let messages = inner.store.fetch(inbox.id, &Selection::All).await?;
            Ok::<_, qutemail_store::StoreError>((inbox.id, messages))
        };
        match snapshot.await {
            Ok((inbox, messages)) => {
                tracing::info!(user = %account.address, messages = messages.len(), "pop3 login");
                conn.lock = Some(lock);
                conn.inbox = Some(inbox);
                Ok(Maildrop::new(messages))
            }
            Err(e) => {
                tracing::warn!(error = %e, "pop3 login: the maildrop cannot be listed");
                Err(LoginRefusal::Unavailable)
            }
        }
    }

    /// UPDATE state: removes the messages marked deleted, in one store transaction.
    async fn update(&self, conn: &Connection, delete: Vec<u32>) -> Result<usize, ()> {
        let Some(inbox) = conn.inbox else {
            return Ok(0);
        };
        if delete.is_empty() {
            return Ok(0);
        }
        let scope = ExpungeScope::Uids(NumberSet::from_numbers(delete));
        match self.inner.store.expunge(inbox, &scope).await {
            Ok(removed) => {
                tracing::info!(removed = removed.len(), "pop3 update: messages removed");
                Ok(removed.len())
            }
            Err(e) => {
                tracing::warn!(error = %e, "pop3 update: messages could not be removed");
                Err(())
            }
        }
    }
}

/// Resolves once shutdown is requested (never, if the server is gone without asking).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    loop {
        let stop = *shutdown.borrow_and_update();
        if stop {
            return;
        }
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The connection's byte stream before and after STLS.
enum Transport<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

async fn write<T: AsyncWrite + Unpin>(
    io: &mut T,
    bytes: &[u8],
    idle: Duration,
) -> Result<(), ConnectionError> {
    write_two(io, bytes, &[], idle).await
}

/// Writes and flushes, within the idle timeout (a client that stops reading is dropped).
async fn write_two<T: AsyncWrite + Unpin>(
    io: &mut T,
    first: &[u8],
    second: &[u8],
    idle: Duration,
) -> Result<(), ConnectionError> {
    let work = async {
        io.write_all(first).await?;
        if !second.is_empty() {
            io.write_all(second).await?;
        }
        io.flush().await
    };
    match tokio::time::timeout(idle, work).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ConnectionError::Idle(idle)),
    }
}

enum LineEvent {
    /// One line without its CRLF (or bare LF). Wiped when dropped: it may be a password.
    Line(Zeroizing<Vec<u8>>),
    /// A line longer than [`MAX_LINE`] arrived and was discarded up to its end.
    TooLong,
    Eof,
}

/// Splits the client's bytes into lines, with a bounded buffer.
#[derive(Default)]
struct LineReader {
    buf: Zeroizing<Vec<u8>>,
    discarding: bool,
}

impl LineReader {
    /// Whether bytes beyond the last line read are waiting.
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    async fn read_line<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> std::io::Result<LineEvent> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line = Zeroizing::new(self.buf[..end].to_vec());
                self.buf.drain(..=end);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if std::mem::take(&mut self.discarding) || line.len() > MAX_LINE {
                    return Ok(LineEvent::TooLong);
                }
                return Ok(LineEvent::Line(line));
            }
            if self.buf.len() > MAX_LINE {
                // Keep reading to the line's end, but not its bytes.
                self.discarding = true;
                self.buf.clear();
            }
            let mut chunk = Zeroizing::new([0u8; 4096]);
            let n = io.read(chunk.as_mut()).await?;
            if n == 0 {
                return Ok(LineEvent::Eof);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
