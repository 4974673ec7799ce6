//! The reusable mTLS serving piece of a KME: rustls requiring client certificates from a CA,
//! hyper-util serving HTTP/1.1 and HTTP/2 (ALPN, keep-alive) to an axum [`Router`], the peer's
//! certificate handed to handlers, graceful shutdown, and errors in the specification's format.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{Router, routing::get};
//! use etsi014::server::{self, CallerSae, SaeIdentityMap, ServeOptions, ServerTlsConfig};
//!
//! async fn whoami(CallerSae(sae): CallerSae) -> String { sae }
//!
//! let tls = ServerTlsConfig::from_files("client-ca.pem".as_ref(), "kme.pem".as_ref(), "kme.key".as_ref())?;
//! let router = Router::new().route("/whoami", get(whoami)).with_state(SaeIdentityMap::subject_cn());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
//! let handle = server::spawn(listener, server::server_config(&tls)?, router, ServeOptions::default())?;
//! // … later
//! handle.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Every request a handler sees carries, in its extensions, the [`PeerCertificate`] the client
//! authenticated with and the [`PeerAddr`]. [`CallerSae`] turns the certificate into an SAE ID
//! through the [`SaeIdentityMap`] in the router's state (subject CN, or pinned SHA-256
//! fingerprints) and answers 401 itself when there is none.

mod api;
mod identity;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tower_service::Service as _;

pub use api::{ApiError, JsonBody, JsonResponse, SaeIdPath, query_pairs};
pub use identity::{CallerSae, InvalidFingerprint, PeerAddr, PeerCertificate, SaeIdentityMap};

use crate::tls::{self, TlsConfigError, TlsPem};

/// The server's TLS material: the CA that issues SAE client certificates, and the KME's own
/// certificate chain and key.
pub type ServerTlsConfig = TlsPem;

/// A rustls server configuration that requires a client certificate issued by `tls.ca_pem`,
/// offers `h2` and `http/1.1` through ALPN, and speaks TLS 1.2 and 1.3 on *ring*.
pub fn server_config(tls: &ServerTlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let roots = Arc::new(tls::root_store(&tls.ca_pem)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, tls::provider())
        .build()
        .map_err(|e| TlsConfigError::ClientVerifier(e.to_string()))?;
    let chain = tls::parse_certs(&tls.cert_pem, "server certificate")?;
    let key = tls::parse_key(&tls.key_pem)?;
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Limits of the server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time an HTTP/1.1 client has to send a request's headers (also closes idle keep-alive
    /// connections).
    pub header_read_timeout: Duration,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// On shutdown, how long open requests may take before connections are dropped.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(60),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `router` over mutual TLS on `listener` until `shutdown` completes, then stops
/// accepting, lets open requests finish (up to [`ServeOptions::shutdown_grace`]) and returns.
///
/// A client whose certificate the CA did not issue fails the handshake and never reaches the
/// router. Errors of single connections are logged, never returned.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .keep_alive(true);
    // Pings find dead HTTP/2 peers, whose connections would otherwise hold a slot forever.
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(30)));
    let local = listener.local_addr()?;
    tracing::info!(%local, "ETSI 014 server listening");
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // the semaphore is never closed
            },
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off a little, keep serving.
                    tracing::warn!(%local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = options.handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let stream =
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp).into_fallible()).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err((e, tcp))) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                        linger(tcp).await;
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            // With a verifier that requires client authentication there is always a certificate.
            let Some(leaf) = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned() else {
                tracing::warn!(%peer, "TLS session without a client certificate");
                return;
            };
            let cert = PeerCertificate::new(leaf.into_owned());
            tracing::debug!(%peer, ?cert, "client connected");
            let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
                request.extensions_mut().insert(cert.clone());
                request.extensions_mut().insert(PeerAddr(peer));
                let mut router = router.clone();
                async move { router.call(request).await }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    tracing::info!(%local, "ETSI 014 server stopping");
    if tokio::time::timeout(options.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(%local, "connections still open after the shutdown grace period; dropping them");
    }
    Ok(())
}

/// Closes a connection whose handshake failed without resetting it: the client may already have
/// sent data (a TLS 1.3 client sends its request right after its Finished message), and closing
/// with unread data would reset the connection and destroy the alert that says what was wrong
/// (for instance `UnknownCA` for a client certificate from another CA) before the client reads it.
async fn linger(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total < 1 << 20 {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// A server running on its own task; see [`spawn`].
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Shuts down gracefully and waits until the server has stopped.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

impl Drop for ServerHandle {
    /// Dropping the handle starts a graceful shutdown without waiting for it.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Runs [`serve`] on a new task; the returned handle stops it (explicitly, or when dropped).
/// Must be called within a Tokio runtime.
pub fn spawn(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    options: ServeOptions,
) -> io::Result<ServerHandle> {
    let local_addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, tls, router, options, async move {
        let _ = stopped.await;
    }));
    Ok(ServerHandle { local_addr, stop: Some(stop), task })
}
