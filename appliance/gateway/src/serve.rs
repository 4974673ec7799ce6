//! `qutemail serve`: the gateway's services (SMTP MX and submission, the outbound queue) until
//! SIGTERM or SIGINT.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use qutemail_smtp::server::{ListenerConfig, ListenerMode, SmtpServer};
use tokio::net::TcpListener;

use crate::config::GatewayConfig;
use crate::smtp_host::{Role, SiteMailHost};
use crate::wiring;

pub async fn serve(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(config_path)?;
    let store = wiring::store(&config).await?;
    let vault = wiring::vault(&config).await?;
    let queue = wiring::queue(&config, store.clone(), vault.clone())?;
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
    // IMAP first: SMTP deliveries signal its idling sessions.
    let mut imap_server = None;
    if let Some(imap) = &config.imap {
        let tls = server_tls.clone().context("[imap] needs [tls]: IMAP logins happen only over TLS")?;
        let mut imap_config = qutemail_imap::ImapConfig::new(tls);
        if let Some(smtp) = &config.smtp {
            imap_config.max_message_bytes = smtp.max_message_bytes;
        }
        let server = qutemail_imap::ImapServer::new(imap_config, store.clone(), vault.clone());
        for (addr, implicit, name) in [(imap.listen, false, "imap"), (imap.tls_listen, true, "imaps")] {
            let Some(addr) = addr else { continue };
            let listener =
                TcpListener::bind(addr).await.with_context(|| format!("[imap] cannot listen on {addr}"))?;
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
            let Some(addr) = addr else { continue };
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
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("[smtp] cannot listen on {addr} ({name})"))?;
            listening.push(format!("{name}={}", listener.local_addr()?));
            let server = SmtpServer::new(listener_config, host);
            let stop = stopped();
            tasks.spawn(async move {
                if let Err(e) = server.run(listener, stop).await {
                    tracing::error!(listener = name, error = %e, "SMTP listener failed");
                }
            });
        }
    }
    let mut pop3_server = None;
    if let Some(pop3) = &config.pop3 {
        let tls = server_tls.clone().context("[pop3] needs [tls]: POP3 logins happen only over TLS")?;
        let server =
            qutemail_pop3::Pop3Server::new(qutemail_pop3::Pop3Config::new(tls), store.clone(), vault.clone());
        for (addr, implicit, name) in [(pop3.listen, false, "pop3"), (pop3.tls_listen, true, "pop3s")] {
            let Some(addr) = addr else { continue };
            let listener =
                TcpListener::bind(addr).await.with_context(|| format!("[pop3] cannot listen on {addr}"))?;
            listening.push(format!("{name}={}", listener.local_addr()?));
            let server = server.clone();
            tasks.spawn(async move {
                if implicit { server.serve_tls(listener).await } else { server.serve_plain(listener).await }
            });
        }
        pop3_server = Some(server);
    }
    {
        let queue = queue.clone();
        let stop = stopped();
        tasks.spawn(async move { queue.run(stop).await });
    }
    tracing::info!(domain = %config.site.domain, listeners = %listening.join(" "), "QuteMail gateway ready");
    println!("READY {}", listening.join(" "));
    let _ = std::io::Write::flush(&mut std::io::stdout());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        Some(_) = tasks.join_next() => tracing::error!("a service stopped on its own; shutting down"),
    }
    tracing::info!("stopping");
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
