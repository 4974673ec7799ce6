//! `qutemail serve`: the gateway's services (SMTP MX and submission, the outbound queue) until
//! SIGTERM or SIGINT.
//!
//! Under systemd (`image/systemd/qutemail-gateway.service`) it reports `READY=1` once every
//! listener is up, pets the watchdog, and serves the sockets its `.socket` units pass in
//! (see `systemd.rs`) instead of binding the configured addresses.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use qutemail_smtp::server::{ListenerConfig, ListenerMode, SmtpServer};
use tokio::net::TcpListener;

use crate::config::GatewayConfig;
use crate::smtp_host::{Role, SiteMailHost};
use crate::systemd::InheritedListeners;
use crate::wiring;
use qutemail_service_notify::{Notifier, watchdog_interval};

/// Runs the gateway; `inherited` holds the sockets systemd passed in (none outside systemd).
pub async fn serve(config_path: &Path, mut inherited: InheritedListeners) -> anyhow::Result<ExitCode> {
    let notifier = Notifier::from_env();
    let config = GatewayConfig::load(config_path)?;
    let store = wiring::store(&config).await?;
    let vault = wiring::vault(&config).await?;
    let dns = wiring::dns(&config)?;
    let metrics = qutemail_telemetry::GatewayMetrics::new();
    let queue = wiring::queue(&config, store.clone(), vault.clone(), &dns)?.with_metrics(metrics.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut listening = Vec::new();
    let server_tls = match &config.tls {
        Some(t) => {
            let cert = std::fs::read(&t.cert).with_context(|| format!("[tls] cert {}", t.cert.display()))?;
            let key = std::fs::read(&t.key).with_context(|| format!("[tls] key {}", t.key.display()))?;
            Some(qutemail_smtp::tls::server_config(&cert, &key).context("[tls]")?)
        }
        None => None,
    };
    // One failed-login count for IMAP, POP3 and SMTP AUTH: a guessing run is slowed whichever
    // it uses.
    let login_throttle =
        std::sync::Arc::new(qutemail_store::LoginThrottle::new(config.login_throttle.settings()));
    // IMAP first: SMTP deliveries signal its idling sessions.
    let mut imap_server = None;
    if let Some(imap) = &config.imap {
        let tls = server_tls.clone().context("[imap] needs [tls]: IMAP logins happen only over TLS")?;
        let mut imap_config = qutemail_imap::ImapConfig::new(tls);
        imap_config.login_throttle = login_throttle.clone();
        if let Some(smtp) = &config.smtp {
            imap_config.max_message_bytes = smtp.max_message_bytes;
        }
        let server = qutemail_imap::ImapServer::new(imap_config, store.clone(), vault.clone());
        for (addr, implicit, name) in [(imap.listen, false, "imap"), (imap.tls_listen, true, "imaps")] {
            for listener in listeners_for(&mut inherited, "[imap]", name, addr).await? {
                listening.push(format!("{name}={}", listener.local_addr()?));
                let server = server.clone();
                tasks.spawn(async move {
                    let result = if implicit {
                        server.serve_tls(listener).await
                    } else {
                        server.serve_plain(listener).await
                    };
                    if let Err(e) = result {
                        tracing::error!(listener = name, error = %e, "IMAP listener failed");
                    }
                });
            }
        }
        imap_server = Some(server);
    }
    let events = imap_server.as_ref().map(qutemail_imap::ImapServer::events);
    if let Some(smtp) = &config.smtp {
        let tls = server_tls.clone();
        let listeners = [
            (smtp.mx_listen, ListenerMode::Mx, Role::Mx, "smtp-mx"),
            (smtp.submission_listen, ListenerMode::Submission, Role::Submission, "smtp-submission"),
            (
                smtp.submissions_listen,
                ListenerMode::SubmissionImplicitTls,
                Role::Submission,
                "smtp-submissions",
            ),
        ];
        for (addr, mode, role, name) in listeners {
            let sockets = listeners_for(&mut inherited, "[smtp]", name, addr).await?;
            if sockets.is_empty() {
                continue;
            }
            let listener_config = ListenerConfig::new(mode, smtp.hostname.clone(), tls.clone())
                .with_context(|| format!("[smtp] {name}"))?
                .max_message_size(smtp.max_message_bytes)
                .with_context(|| format!("[smtp] max_message_bytes for {name}"))?;
            let host = SiteMailHost::new(
                role,
                &config.site.domain,
                store.clone(),
                vault.clone(),
                queue.clone(),
                events.clone(),
            );
            let host = match role {
                Role::Mx if config.mail_auth.check => {
                    host.with_inbound_auth(crate::inbound_auth::InboundAuth::new(
                        dns.clone(),
                        &smtp.hostname,
                        config.mail_auth.dmarc,
                    ))
                }
                _ => host,
            };
            let host = host.with_metrics(metrics.clone()).with_login_throttle(login_throttle.clone());
            // Sockets of one listener share its server (and so its connection limit).
            let server = SmtpServer::new(listener_config, host);
            for listener in sockets {
                listening.push(format!("{name}={}", listener.local_addr()?));
                let server = server.clone();
                let stop = stopped();
                tasks.spawn(async move {
                    if let Err(e) = server.run(listener, stop).await {
                        tracing::error!(listener = name, error = %e, "SMTP listener failed");
                    }
                });
            }
        }
    }
    let mut pop3_server = None;
    if let Some(pop3) = &config.pop3 {
        let tls = server_tls.clone().context("[pop3] needs [tls]: POP3 logins happen only over TLS")?;
        let mut pop3_config = qutemail_pop3::Pop3Config::new(tls);
        pop3_config.login_throttle = login_throttle.clone();
        let server = qutemail_pop3::Pop3Server::new(pop3_config, store.clone(), vault.clone());
        for (addr, implicit, name) in [(pop3.listen, false, "pop3"), (pop3.tls_listen, true, "pop3s")] {
            for listener in listeners_for(&mut inherited, "[pop3]", name, addr).await? {
                listening.push(format!("{name}={}", listener.local_addr()?));
                let server = server.clone();
                tasks.spawn(async move {
                    if implicit {
                        server.serve_tls(listener).await
                    } else {
                        server.serve_plain(listener).await
                    }
                });
            }
        }
        pop3_server = Some(server);
    }
    {
        let queue = queue.clone();
        let stop = stopped();
        tasks.spawn(async move { queue.run(stop).await });
    }
    if let Some(m) = &config.metrics {
        let listener = TcpListener::bind(m.listen)
            .await
            .with_context(|| format!("[metrics] cannot listen on {}", m.listen))?;
        listening.push(format!("metrics={}", listener.local_addr()?));
        let queue = queue.clone();
        // The queue gauges come from the durable queue, counted afresh for each scrape.
        let census = move || {
            let queue = queue.clone();
            async move {
                if let Err(e) = queue.update_queue_metrics().await {
                    tracing::warn!(error = %e, "cannot count the queue for /metrics");
                }
            }
        };
        let (metrics, stop) = (metrics.clone(), stopped());
        tasks.spawn(async move {
            if let Err(e) = qutemail_telemetry::serve(listener, metrics, census, stop).await {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
    }
    if let Some(web) = &config.web {
        let tls = server_tls.clone().context("[web] needs [tls]: the web API is served over HTTPS only")?;
        let deps = wiring::web_deps(
            &config,
            store.clone(),
            vault.clone(),
            queue.clone(),
            events.clone(),
            login_throttle.clone(),
        )
        .await?;
        let mut listeners = listeners_for(&mut inherited, "[web]", "web", Some(web.listen)).await?;
        let listener = listeners.pop().context("[web] no listener")?;
        if !listeners.is_empty() {
            anyhow::bail!("[web] systemd passed several \"web\" sockets; the web server serves one");
        }
        let server = qutemail_web::WebServer::with_listener(web.clone(), deps, tls, listener)?;
        listening.push(format!("web={}", server.local_addr()?));
        let stop = stopped();
        tasks.spawn(async move { server.run(stop).await });
    }
    // A passed socket that no listener took would accept connections nobody answers.
    inherited.finish()?;
    tracing::info!(domain = %config.site.domain, listeners = %listening.join(" "), "QuteMail gateway ready");
    println!("READY {}", listening.join(" "));
    let _ = std::io::Write::flush(&mut std::io::stdout());
    notifier.ready(&format!("serving {} as {}", listening.join(" "), config.site.domain));
    // The watchdog is petted from the runtime that serves mail: if its workers wedge, the pets
    // stop and systemd restarts the gateway (WatchdogSec=). A service task that ends stops the
    // gateway below, so "healthy" here means every service is still running.
    let watchdog = watchdog_interval().map(|every| {
        let notifier = notifier.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                notifier.watchdog();
            }
        })
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        Some(_) = tasks.join_next() => tracing::error!("a service stopped on its own; shutting down"),
    }
    tracing::info!("stopping");
    notifier.stopping("stopping: finishing sessions and deliveries in progress");
    if let Some(w) = &watchdog {
        w.abort();
    }
    let _ = stop_tx.send(true);
    if let Some(p) = &pop3_server {
        p.shutdown();
    }
    if let Some(i) = &imap_server {
        i.shutdown_handle().shutdown();
    }
    while tasks.join_next().await.is_some() {}
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

/// The sockets of listener `name`: those systemd passed in (socket activation) when there are
/// any, else the configured address bound here, else none.
async fn listeners_for(
    inherited: &mut InheritedListeners,
    section: &str,
    name: &'static str,
    configured: Option<SocketAddr>,
) -> anyhow::Result<Vec<TcpListener>> {
    let passed =
        inherited.take(name).with_context(|| format!("{section} the socket {name:?} from systemd"))?;
    if !passed.is_empty() {
        if let Some(addr) = configured {
            tracing::info!(
                listener = name,
                configured = %addr,
                "serving the socket systemd passed in, not the configured address"
            );
        }
        return Ok(passed);
    }
    let Some(addr) = configured else { return Ok(Vec::new()) };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("{section} cannot listen on {addr} ({name})"))?;
    Ok(vec![listener])
}
