//! Start-up and shutdown: the order in which kmd's parts come up, when it tells systemd it is
//! ready, when it pets the watchdog, and how it stops.
//!
//! Start-up (each step fails closed: an error ends the process with a non-zero status before
//! `READY=1`):
//! 1. check the files the configuration names (certificates, keys, PKCS#11 module, PIN file);
//! 2. open the HSM (`HsmKeyWrapper::open_async`: module, token, PIN, wrapping key);
//! 3. open the key store ([`crate::pool::KeyStore`]: its lock, the `kmd-keypool` database) and
//!    build the key management entity on it (`kmd_kme::Kme`, settings from [`crate::kme`]; it
//!    registers every link in the pool);
//! 4. bind every listener (ETSI 014, peer channel, metrics);
//! 5. start serving (the ETSI router behind the SAE gate, the peer router), start the KME's
//!    background sync (`Kme::spawn_sync`), one task per link ([`crate::links`]);
//! 6. `READY=1` with a `STATUS=` line naming the bound addresses.
//!
//! Running: the main loop pets the watchdog (`WATCHDOG=1` at half of `WATCHDOG_USEC`) only while
//! the last HSM health check (run on its own task, at the same pace, at most every 30 s) passed
//! recently and every task it supervises is still running. An HSM that fails or hangs stops the
//! pets, so systemd restarts kmd (`WatchdogSec=`); `STATUS=` says why.
//!
//! Stopping (SIGTERM or SIGINT): `STOPPING=1`, stop accepting, let open requests finish (the
//! servers' grace period), stop the link tasks, wait for the KME's sync tasks (they flush
//! queued discards), close the store, close the HSM, exit 0.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etsi014::server::ServeOptions;
use qutemail_hsm::{HsmError, HsmKeyWrapper};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, Problem};
use crate::metrics::{HsmOp, Metrics, PeerSyncState};
use crate::pool::{KeyStore, StoreError};
use crate::{etsi, links};
use kmd_kme::{Kme, KmeError};
use qutemail_service_notify::{Notifier, watchdog_interval};

/// How often the HSM is checked when systemd's watchdog is off (or slower than this).
pub const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// How often the key stock is read into the metrics.
const STOCK_INTERVAL: Duration = Duration::from_secs(5);
/// How long link tasks get to stop.
const LINK_STOP_GRACE: Duration = Duration::from_secs(5);

/// Why kmd could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Files named by the configuration are missing or unusable.
    #[error("{}", .0.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("\n"))]
    Files(Vec<Problem>),
    /// The HSM could not be opened.
    #[error("cannot open the HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The key store could not be opened.
    #[error("cannot open the key store: {0}")]
    Store(#[from] StoreError),
    /// The configuration cannot be turned into key service settings.
    #[error("cannot configure the key service: {0}")]
    Settings(#[from] crate::kme::SettingsError),
    /// The key service could not be built.
    #[error("cannot start the key service: {0}")]
    Kme(#[from] KmeError),
    /// A listener could not be bound.
    #[error("[{section}] listen {addr}: cannot bind: {source}")]
    Bind {
        /// `etsi014`, `peer` or `metrics`.
        section: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// A task that must run for kmd's whole life ended.
    #[error("{0} stopped unexpectedly")]
    TaskEnded(String),
}

/// The addresses kmd ended up listening on (port 0 in the configuration picks a free port).
#[derive(Debug, Clone)]
pub struct Bound {
    /// ETSI 014 server.
    pub etsi014: SocketAddr,
    /// Peer channel, if configured.
    pub peer: Option<SocketAddr>,
    /// Metrics, if enabled.
    pub metrics: Option<SocketAddr>,
}

impl Bound {
    /// The `STATUS=` text sent with `READY=1`.
    pub fn status_line(&self, links: usize) -> String {
        let mut s = format!("ready; etsi014={}", self.etsi014);
        if let Some(a) = self.peer {
            s.push_str(&format!(" peer={a}"));
        }
        if let Some(a) = self.metrics {
            s.push_str(&format!(" metrics={a}"));
        }
        s.push_str(&format!(" links={links}"));
        s
    }
}

async fn bind(section: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).await.map_err(|source| AppError::Bind { section, addr, source })
}

/// The last HSM health check's outcome.
#[derive(Debug, Clone)]
struct Health {
    at: Instant,
    error: Option<String>,
}

/// Runs kmd until SIGTERM/SIGINT (Ok) or a failure (Err).
pub async fn run(config: Config, notifier: Notifier, metrics: Arc<Metrics>) -> Result<(), AppError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AppError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(AppError::Signals)?;

    // 1. Files.
    notifier.status("starting: checking files");
    let problems = config.check_files();
    if !problems.is_empty() {
        return Err(AppError::Files(problems));
    }
    let etsi_tls = config.etsi014_tls().map_err(|p| AppError::Files(vec![p]))?;
    let peer_tls = config.peer_tls().transpose().map_err(|p| AppError::Files(vec![p]))?;
    // Expiry of the certificates kmd presents, for the alert rules (image/monitoring/alerts.yml).
    let mut certificates = vec![("etsi014_server", config.etsi014.server_cert.as_path())];
    if let Some(p) = &config.peer {
        certificates
            .extend([("peer_server", p.server_cert.as_path()), ("peer_client", p.client_cert.as_path())]);
    }
    metrics.set_certificate_expiry(&certificates);

    // 2. HSM.
    notifier.status("starting: opening the HSM");
    let started = Instant::now();
    let opened = HsmKeyWrapper::open_async(config.hsm.clone()).await;
    metrics.observe_hsm(HsmOp::Open, started.elapsed(), opened.is_ok());
    let hsm = opened?;
    metrics.set_hsm_healthy(true);

    // 3. Store.
    notifier.status("starting: opening the key store");
    let store = KeyStore::open(&config, hsm.clone()).await?;
    let settings = crate::kme::settings(&config)?;
    let kme =
        Kme::with_observer(settings, store.pool().clone(), Arc::new(crate::kme::Observer(metrics.clone())))
            .await?;

    // 4. Listeners.
    let etsi_listener = bind("etsi014", config.etsi014.listen).await?;
    let peer_listener = match &config.peer {
        Some(p) => Some(bind("peer", p.listen).await?),
        None => None,
    };
    let metrics_listener =
        if config.metrics.enabled { Some(bind("metrics", config.metrics.listen).await?) } else { None };
    let bound = Bound {
        etsi014: etsi_listener.local_addr().unwrap_or(config.etsi014.listen),
        peer: peer_listener.as_ref().and_then(|l| l.local_addr().ok()),
        metrics: metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
    };

    // 5. Serve, and start the links.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut supervised: Vec<(String, JoinHandle<()>)> = Vec::new();
    let options = ServeOptions { max_connections: config.etsi014.max_connections, ..ServeOptions::default() };
    let etsi_router = etsi::router(etsi::EtsiState::new(&config, metrics.clone()), kme.etsi_router());
    supervised.push((
        "the ETSI 014 server".into(),
        spawn_server(etsi014::server::serve(
            etsi_listener,
            etsi_tls,
            etsi_router,
            options,
            stopped(stop_rx.clone()),
        )),
    ));
    if let (Some(listener), Some(tls)) = (peer_listener, peer_tls) {
        let router = kme.peer_router();
        supervised.push((
            "the peer channel server".into(),
            spawn_server(etsi014::server::serve(
                listener,
                tls,
                router,
                ServeOptions::default(),
                stopped(stop_rx.clone()),
            )),
        ));
    }
    if let Some(listener) = metrics_listener {
        supervised.push((
            "the metrics server".into(),
            spawn_server(crate::metrics::serve(listener, metrics.clone(), stopped(stop_rx.clone()))),
        ));
    }
    let mut link_tasks = Vec::new();
    for link in &config.links {
        metrics.register_link(&link.id);
        link_tasks.push((
            format!("the task of link {:?}", link.id),
            tokio::spawn(links::run(
                link.clone(),
                kme.clone(),
                store.clone(),
                metrics.clone(),
                stop_rx.clone(),
            )),
        ));
    }
    let sync = kme.spawn_sync(stopped(stop_rx.clone()));
    supervised.push((
        "the key stock reader".into(),
        tokio::spawn(read_stock(
            config.clone(),
            store.clone(),
            kme.clone(),
            metrics.clone(),
            stop_rx.clone(),
        )),
    ));

    // The HSM health monitor.
    let pet_every = watchdog_interval();
    let health_every =
        pet_every.map_or(MAX_HEALTH_INTERVAL, |p| p.clamp(Duration::from_millis(100), MAX_HEALTH_INTERVAL));
    let health = Arc::new(Mutex::new(Health { at: Instant::now(), error: None }));
    supervised.push((
        "the HSM health monitor".into(),
        tokio::spawn(monitor_hsm(
            hsm.clone(),
            health.clone(),
            health_every,
            metrics.clone(),
            notifier.clone(),
            stop_rx.clone(),
        )),
    ));

    if config.links.is_empty() {
        tracing::warn!("no [[link]] is configured: kmd receives no key material and serves no keys");
    }

    // 6. Ready.
    let status = bound.status_line(config.links.len());
    notifier.ready(&status);
    tracing::info!(
        site = %config.site.display_name(),
        kme_id = %config.site.kme_id,
        etsi014 = %bound.etsi014,
        peer = ?bound.peer,
        metrics = ?bound.metrics,
        links = config.links.len(),
        saes = config.saes.len(),
        watchdog = ?pet_every,
        "kmd ready"
    );

    // The main loop.
    let mut tick = tokio::time::interval(pet_every.unwrap_or(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A health result older than this no longer counts (the check hangs).
    let stale_after = health_every * 2 + Duration::from_secs(1).min(health_every);
    let outcome = loop {
        tokio::select! {
            _ = sigterm.recv() => break Ok("SIGTERM"),
            _ = sigint.recv() => break Ok("SIGINT"),
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: configuration reload is not supported; restart kmd to apply changes");
            }
            _ = tick.tick() => {
                if let Some((name, _)) = supervised.iter().chain(link_tasks.iter()).find(|(_, t)| t.is_finished()) {
                    break Err(AppError::TaskEnded(name.clone()));
                }
                let healthy = {
                    let h = health.lock().unwrap_or_else(|p| p.into_inner());
                    h.error.is_none() && h.at.elapsed() <= stale_after
                };
                if pet_every.is_some() {
                    if healthy {
                        notifier.watchdog();
                    } else {
                        tracing::debug!("not petting the watchdog: the HSM health check is failing or overdue");
                    }
                }
            }
        }
    };

    // Stopping.
    let reason = match &outcome {
        Ok(signal) => format!("stopping ({signal})"),
        Err(e) => format!("stopping: {e}"),
    };
    notifier.stopping(&reason);
    tracing::info!("{reason}");
    let _ = stop_tx.send(true);
    for (name, task) in supervised {
        match task.await {
            Ok(()) => {}
            Err(e) => tracing::error!(task = %name, error = %e, "task failed"),
        }
    }
    for (name, mut task) in link_tasks {
        if tokio::time::timeout(LINK_STOP_GRACE, &mut task).await.is_err() {
            tracing::warn!(task = %name, "did not stop in time; aborting it");
            task.abort();
        }
    }
    if tokio::time::timeout(LINK_STOP_GRACE * 2, sync).await.is_err() {
        tracing::warn!("the key service's sync tasks did not stop in time");
    }
    drop(kme);
    store.close().await;
    drop(hsm);
    tracing::info!("kmd stopped");
    outcome.map(drop)
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn spawn_server(
    server: impl std::future::Future<Output = std::io::Result<()>> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "server failed");
        }
    })
}

async fn read_stock(
    config: Config,
    store: KeyStore,
    kme: Kme,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(STOCK_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        for link in &config.links {
            if let Some(up) = kme.peer_up(&link.id) {
                metrics.set_peer_sync(&link.id, if up { PeerSyncState::Up } else { PeerSyncState::Down });
            }
            match store.stock(&link.id, config.etsi014.key_size).await {
                Ok(stock) => metrics.set_key_stock(&link.id, &stock),
                Err(e) => tracing::warn!(link = %link.id, error = %e, "cannot read the key stock"),
            }
        }
    }
}

async fn monitor_hsm(
    hsm: HsmKeyWrapper,
    health: Arc<Mutex<Health>>,
    every: Duration,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    mut stop: watch::Receiver<bool>,
) {
    let timeout = every.max(Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = tokio::time::timeout(timeout, hsm.health_check_async()) => r,
        };
        let error = match result {
            Ok(Ok(_report)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("the HSM health check did not answer within {timeout:?}")),
        };
        metrics.observe_hsm(HsmOp::HealthCheck, started.elapsed(), error.is_none());
        metrics.set_hsm_healthy(error.is_none());
        match (&error, failing) {
            (Some(e), false) => {
                tracing::error!(error = %e, "HSM health check failed; not petting the watchdog until it passes");
                notifier.status(&format!("degraded: HSM health check failed: {e}"));
                failing = true;
            }
            (None, true) => {
                tracing::info!("HSM health check passes again");
                notifier.status("ready; HSM healthy again");
                failing = false;
            }
            _ => {}
        }
        *health.lock().unwrap_or_else(|p| p.into_inner()) = Health { at: Instant::now(), error };
    }
}
