//! The tokio side: listeners (plain with STARTTLS, implicit TLS), per-connection tasks, the
//! login throttle, mailbox change notification and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use qutemail_store::{LoginThrottle, LoginThrottleSettings, Store};
use qutemail_vault::MailVault;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::ImapError;
use crate::session::{Exit, Session};

/// How the IMAP server behaves. [`ImapConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ImapConfig {
    /// The server certificate and key (STARTTLS and implicit TLS).
    pub tls: Arc<rustls::ServerConfig>,
    /// Largest message APPEND accepts (and largest literal of any command), in bytes.
    pub max_message_bytes: u64,
    /// An authenticated client silent for this long is logged out (RFC 3501: at least 30 min).
    pub idle_timeout: Duration,
    /// A client that has not logged in within this long of its last command is disconnected.
    pub preauth_timeout: Duration,
    /// How often an idling session looks for changes made by other nodes or processes (changes
    /// in this process wake it at once through [`MailboxEvents`]).
    pub idle_poll: Duration,
    /// Failed-login throttle: progressive delays per account and per client address, refusal
    /// only for an address beyond its cap. Share one with the gateway's other login front
    /// ends (POP3), so that a guessing run is counted once whichever protocol it uses.
    pub login_throttle: Arc<LoginThrottle>,
    /// Most connections at once; more are greeted with BYE.
    pub max_connections: usize,
}

impl ImapConfig {
    /// Defaults: 25 MiB messages, 30 min idle timeout, 60 s to log in, 300 ms IDLE polling,
    /// a login throttle of its own with [`LoginThrottleSettings::default`], 4096 connections.
    pub fn new(tls: Arc<rustls::ServerConfig>) -> Self {
        Self {
            tls,
            max_message_bytes: 25 * 1024 * 1024,
            idle_timeout: Duration::from_secs(30 * 60),
            preauth_timeout: Duration::from_secs(60),
            idle_poll: Duration::from_millis(300),
            login_throttle: Arc::new(LoginThrottle::new(LoginThrottleSettings::default())),
            max_connections: 4096,
        }
    }
}

/// Wakes idling sessions when mail changes. Sessions signal it themselves after APPEND, STORE,
/// EXPUNGE, COPY and MOVE; the gateway signals it after each delivery. Without a signal an
/// idling session still finds changes by polling every [`ImapConfig::idle_poll`]. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct MailboxEvents {
    tx: Arc<watch::Sender<u64>>,
}

impl Default for MailboxEvents {
    fn default() -> Self {
        Self { tx: Arc::new(watch::channel(0).0) }
    }
}

impl MailboxEvents {
    /// Some mailbox changed (e.g. a message was delivered): idling sessions look now.
    pub fn mailbox_changed(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

/// Stops the server: listeners stop accepting, sessions say BYE at their next wait.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<bool>>,
}

impl ShutdownHandle {
    /// Begins the shutdown.
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }
}

/// What every session shares.
pub(crate) struct Shared {
    pub(crate) config: ImapConfig,
    pub(crate) store: Store,
    pub(crate) vault: MailVault,
    pub(crate) events: MailboxEvents,
    pub(crate) shutdown: Arc<watch::Sender<bool>>,
    connections: Arc<Semaphore>,
}

/// The IMAP server of a gateway. Cheap to clone; all clones serve the same sessions state
/// (rate limiter, events, shutdown).
#[derive(Clone)]
pub struct ImapServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ImapServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapServer")
            .field("max_message_bytes", &self.shared.config.max_message_bytes)
            .finish()
    }
}

/// How a connection starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionMode {
    /// Plain text; STARTTLS required before login (port 143).
    Plain,
    /// TLS from the first byte (port 993).
    ImplicitTls,
}

impl ImapServer {
    /// A server over the gateway's store and vault.
    pub fn new(config: ImapConfig, store: Store, vault: MailVault) -> Self {
        let connections = Arc::new(Semaphore::new(config.max_connections));
        Self {
            shared: Arc::new(Shared {
                config,
                store,
                vault,
                events: MailboxEvents::default(),
                shutdown: Arc::new(watch::channel(false).0),
                connections,
            }),
        }
    }

    /// The handle to signal after deliveries, so that idling clients see new mail at once.
    pub fn events(&self) -> MailboxEvents {
        self.shared.events.clone()
    }

    /// The handle that stops [`ImapServer::serve_plain`], [`ImapServer::serve_tls`] and all
    /// sessions.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle { tx: self.shared.shutdown.clone() }
    }

    /// Serves port 143 (STARTTLS) until shutdown.
    pub async fn serve_plain(&self, listener: TcpListener) -> Result<(), ImapError> {
        self.serve(listener, ConnectionMode::Plain).await
    }

    /// Serves port 993 (implicit TLS) until shutdown.
    pub async fn serve_tls(&self, listener: TcpListener) -> Result<(), ImapError> {
        self.serve(listener, ConnectionMode::ImplicitTls).await
    }

    async fn serve(&self, listener: TcpListener, mode: ConnectionMode) -> Result<(), ImapError> {
        let local = listener.local_addr().map_err(ImapError::Listen)?;
        tracing::info!(%local, ?mode, "IMAP listening");
        let mut shutdown = self.shared.shutdown.subscribe();
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: log, back off, keep serving.
                        tracing::warn!(error = %e, "accepting an IMAP connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return Ok(()),
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            tokio::spawn(async move { server.serve_connection(stream, peer, mode).await });
        }
    }

    /// Serves one accepted connection over any stream (a TCP socket, or anything else that
    /// reads and writes) until the client logs out or leaves.
    pub async fn serve_connection<S>(&self, mut stream: S, peer: SocketAddr, mode: ConnectionMode)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Ok(_permit) = self.shared.connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many IMAP connections; refusing one");
            let _ = stream.write_all(b"* BYE Too many connections, try again later\r\n").await;
            return;
        };
        let acceptor = TlsAcceptor::from(self.shared.config.tls.clone());
        let mut session = Session::new(self.shared.clone(), peer.ip(), mode == ConnectionMode::ImplicitTls);
        let result = match mode {
            ConnectionMode::ImplicitTls => {
                let handshake =
                    tokio::time::timeout(self.shared.config.preauth_timeout, acceptor.accept(stream));
                match handshake.await {
                    Ok(Ok(mut tls)) => greet_and_run(&mut session, &mut tls).await.map(|_| ()),
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake failed");
                        Ok(())
                    }
                    Err(_) => Ok(()),
                }
            }
            ConnectionMode::Plain => match greet_and_run(&mut session, &mut stream).await {
                Ok(Exit::StartTls) => {
                    let handshake =
                        tokio::time::timeout(self.shared.config.preauth_timeout, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(mut tls)) => {
                            session.set_tls();
                            session.run(&mut tls).await.map(|_| ())
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "STARTTLS handshake failed");
                            Ok(())
                        }
                        Err(_) => Ok(()),
                    }
                }
                Ok(Exit::Closed) => Ok(()),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "IMAP connection ended with an I/O error");
        }
    }
}

async fn greet_and_run<S>(session: &mut Session, io: &mut S) -> std::io::Result<Exit>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    io.write_all(session.greeting().as_bytes()).await?;
    io.flush().await?;
    let exit = session.run(io).await?;
    if exit == Exit::Closed {
        let _ = io.shutdown().await;
    }
    Ok(exit)
}
