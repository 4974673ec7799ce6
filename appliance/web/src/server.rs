//! The HTTPS server: routes, security headers, the error shape for everything the router
//! itself refuses (unknown route, wrong method, body too large), and the TLS accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower_service::Service as _;

use crate::error::ApiError;
use crate::extract::ClientAddr;
use crate::{AppState, Shared, WebConfig, WebDeps, WebError, admin, auth, mail, metrics, qkd, ui};

const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";
/// Time a client has for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request's header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

async fn security_headers(req: Request, next: Next) -> Response {
    let api = req.uri().path().starts_with("/api/");
    let mut response = next.run(req).await;
    // Anything the router refused by itself (no route, wrong method, body limit) gets the
    // API's error shape too.
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let allow = response.headers().get(header::ALLOW).cloned();
        response = ApiError::for_status(status).into_response();
        if let Some(allow) = allow {
            response.headers_mut().insert(header::ALLOW, allow);
        }
    }
    let h = response.headers_mut();
    if status.is_client_error() || status.is_server_error() {
        // A refused request's body may be unread; the connection cannot be reused safely, so
        // the client is told it closes (instead of finding out on its next request).
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if api {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such resource")
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], crate::openapi_json())
        .into_response()
}

pub(crate) fn router(state: Shared) -> Router {
    let upload_limit =
        usize::try_from(state.config.max_upload_bytes.saturating_add(1024 * 1024)).unwrap_or(usize::MAX);
    Router::new()
        .route("/", get(ui::index))
        .route("/admin", get(ui::index))
        .route("/assets/{file}", get(ui::asset))
        .route("/api/openapi.json", get(openapi))
        .route("/api/auth/signup/", post(auth::signup))
        .route("/api/auth/login/", post(auth::login))
        .route("/api/auth/refresh/", post(auth::refresh))
        .route("/api/auth/logout/", post(auth::logout))
        .route("/api/auth/password/", post(auth::change_password))
        .route("/api/auth/reset/request/", post(auth::reset_request))
        .route("/api/auth/reset/confirm/", post(auth::reset_confirm))
        .route("/api/account/", get(auth::account))
        .route("/api/account/settings/", put(auth::update_settings))
        .route("/api/mail/folders/", get(mail::folders))
        .route("/api/mail/inbox/", get(mail::inbox))
        .route("/api/mail/folders/{name}/messages/", get(mail::folder_messages))
        .route("/api/mail/search/", get(mail::search))
        .route("/api/mail/attachments/", post(mail::upload).layer(DefaultBodyLimit::max(upload_limit)))
        .route("/api/mail/compose/", post(mail::compose))
        .route("/api/mail/drafts/", post(mail::create_draft))
        .route("/api/mail/drafts/{id}", put(mail::update_draft))
        .route("/api/mail/{id}/decrypt/", get(mail::decrypt))
        .route("/api/mail/{id}/raw/", get(mail::raw))
        .route("/api/mail/{id}/attachments/{index}/", get(mail::attachment))
        .route("/api/mail/{id}/", patch(mail::patch_message).delete(mail::delete_message))
        .route("/api/modes/", get(mail::modes))
        .route("/api/qkd/request_key/", post(qkd::request_key))
        .route("/api/qkd/confirm/", post(qkd::confirm))
        .route("/api/admin/users/", get(admin::users).post(admin::create_user))
        .route("/api/admin/users/{address}", patch(admin::patch_user))
        .route("/api/admin/users/{address}/reset-token", post(auth::admin_reset_token))
        .route("/api/admin/links/", get(admin::links))
        .route("/api/admin/queue/", get(admin::queue))
        .route("/api/admin/saes/", get(admin::saes))
        .fallback(not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// The web server, bound and ready to run.
pub struct WebServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Shared,
}

impl std::fmt::Debug for WebServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebServer")
            .field("listener", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl WebServer {
    /// Binds `config.listen` and prepares TLS with `tls` (the gateway's certificate; HTTP/1.1
    /// is announced by ALPN).
    pub async fn bind(
        config: WebConfig,
        deps: WebDeps,
        tls: Arc<rustls::ServerConfig>,
    ) -> Result<WebServer, WebError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| WebError::Listen { addr: config.listen, source })?;
        Self::with_listener(config, deps, tls, listener)
    }

    /// Serves on `listener`, already bound (e.g. the socket systemd passed in for port 443, so
    /// the gateway needs no capability), instead of `config.listen`.
    pub fn with_listener(
        config: WebConfig,
        deps: WebDeps,
        tls: Arc<rustls::ServerConfig>,
        listener: TcpListener,
    ) -> Result<WebServer, WebError> {
        if config.max_upload_bytes == 0 {
            return Err(WebError::Config("max_upload_bytes must be above 0".into()));
        }
        let mut admins = Vec::with_capacity(config.admins.len());
        for a in &config.admins {
            admins.push(
                qutemail_store::normalize_address(a)
                    .map_err(|e| WebError::Config(format!("admins: {a:?}: {e}")))?,
            );
        }
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let state = Arc::new(AppState { deps, config, monitor: metrics::LinkMonitor::default(), admins });
        Ok(WebServer { listener, acceptor: TlsAcceptor::from(Arc::new(tls)), state })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes (also samples kmd's metrics and removes expired
    /// uploads meanwhile).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let WebServer { listener, acceptor, state } = self;
        let mut background = tokio::task::JoinSet::new();
        if let Some(url) = state.config.kmd_metrics_url.clone() {
            background.spawn(state.monitor.clone().run(url));
        }
        {
            let store = state.deps.store.clone();
            background.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(3600));
                loop {
                    tick.tick().await;
                    match store.web_delete_expired_uploads().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(removed = n, "expired uploads removed"),
                        Err(e) => tracing::warn!(error = %e, "removing expired uploads failed"),
                    }
                }
            });
        }
        let app = router(state);
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little instead of spinning.
                        tracing::warn!(error = %e, "web listener accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ClientAddr(peer));
                    let mut app = app.clone();
                    async move { app.call(req.map(Body::new)).await }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(client = %peer, error = %e, "web connection ended with an error");
                }
            });
        }
        background.abort_all();
    }
}
