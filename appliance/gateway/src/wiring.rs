//! Builds the site's parts from the configuration.

use anyhow::Context as _;
use qutemail_hsm::HsmKeyWrapper;
use qutemail_vault::{KmdKeySource, MailVault, PeerSite, SiteCard, SiteDirectory, SiteKeys, VaultSettings};

use crate::config::GatewayConfig;

/// The HSM and the site keys (created on first use).
pub async fn site_keys(config: &GatewayConfig) -> anyhow::Result<(HsmKeyWrapper, SiteKeys)> {
    let hsm = HsmKeyWrapper::open_async(config.hsm.clone()).await.context("opening the HSM ([hsm])")?;
    let keys = SiteKeys::load_or_create(&config.site.site_keys, &config.site.domain, &hsm).await?;
    Ok((hsm, keys))
}

/// The vault: kmd client, HSM, site keys, peers and policy.
pub async fn vault(config: &GatewayConfig) -> anyhow::Result<MailVault> {
    let (hsm, keys) = site_keys(config).await?;
    let mut settings = VaultSettings::new(config.kmd.as_ref().map_or("", |k| k.sae_id.as_str()));
    settings.policy = config.policy.clone();
    let kmd = match &config.kmd {
        None => None,
        Some(k) => {
            settings.key_bits = k.key_bits;
            settings.otp_key_bits = k.otp_key_bits;
            let tls = etsi014::client::ClientTlsConfig::from_files(&k.ca_cert, &k.client_cert, &k.client_key)
                .context("[kmd] TLS files")?;
            Some(KmdKeySource::new(&k.etsi014_url, tls)?)
        }
    };
    let mut peers = Vec::with_capacity(config.peers.len());
    for p in &config.peers {
        let card = SiteCard::read(&p.site_card)?;
        if !card.domain.eq_ignore_ascii_case(&p.domain) {
            anyhow::bail!(
                "[[peer]] {}: the site card {} is for {:?}",
                p.domain,
                p.site_card.display(),
                card.domain
            );
        }
        peers.push(PeerSite::from_card(&card, &p.sae_id, &p.kme_id)?);
    }
    Ok(MailVault::new(settings, kmd, hsm, keys, SiteDirectory::new(peers)?))
}

/// The mail store from `[store]`.
pub async fn store(config: &GatewayConfig) -> anyhow::Result<qutemail_store::Store> {
    let s = config.store.as_ref().context("the configuration has no [store] section")?;
    let url = match (&s.database_url, &s.database_url_file, &s.sqlite) {
        (Some(u), None, None) => u.clone(),
        (None, Some(f), None) => std::fs::read_to_string(f)
            .with_context(|| format!("[store] database_url_file {}", f.display()))?
            .trim()
            .to_owned(),
        (None, None, Some(p)) => qutemail_store::sqlite_url(p),
        _ => anyhow::bail!("[store] needs exactly one of database_url, database_url_file, sqlite"),
    };
    let store = qutemail_store::Store::open(qutemail_store::StoreConfig::new(url, s.blob_dir.clone()))
        .await
        .context("opening the mail store ([store])")?;
    Ok(store)
}

/// The site's resolver from `[dns]` (shared by MX routing and sender authentication).
pub fn dns(config: &GatewayConfig) -> anyhow::Result<qutemail_queue::dns::MailDns> {
    let d = &config.dns;
    let settings = qutemail_queue::dns::DnsSettings {
        servers: d.servers.clone(),
        port: d.port,
        timeout: std::time::Duration::from_secs(d.timeout_s.max(1)),
    };
    qutemail_queue::dns::MailDns::new(&settings).context("[dns]")
}

/// The DKIM signing keys from `[dkim]` (read once; the keys stay in memory only).
pub fn dkim(config: &GatewayConfig) -> anyhow::Result<Option<qutemail_queue::dkim::DkimSigning>> {
    let Some(d) = &config.dkim else { return Ok(None) };
    let files: Vec<qutemail_queue::dkim::DkimKeyFile> = std::iter::once((&d.selector, &d.private_key))
        .chain(d.additional_keys.iter().map(|k| (&k.selector, &k.private_key)))
        .map(|(selector, private_key)| qutemail_queue::dkim::DkimKeyFile {
            selector: selector.clone(),
            private_key: private_key.clone(),
        })
        .collect();
    Ok(Some(qutemail_queue::dkim::DkimSigning::load(&config.site.domain, &files).context("[dkim]")?))
}

/// The outbound queue: peer routes from `[[peer]]`, the relay from `[queue]`, MX routing over
/// `dns`, DKIM signing from `[dkim]`.
pub fn queue(
    config: &GatewayConfig,
    store: qutemail_store::Store,
    vault: MailVault,
    dns: &qutemail_queue::dns::MailDns,
) -> anyhow::Result<qutemail_queue::OutboundQueue> {
    use qutemail_queue::{QueueSettings, Route};
    use qutemail_smtp::client::TlsMode;
    let hostname = config.smtp.as_ref().map_or_else(|| config.site.domain.clone(), |s| s.hostname.clone());
    let mut peer_routes = std::collections::HashMap::new();
    for p in &config.peers {
        let Some(target) = &p.smtp else { continue };
        let ca = p.ca_cert.as_ref().with_context(|| format!("[[peer]] {}: smtp needs ca_cert", p.domain))?;
        let roots =
            std::fs::read(ca).with_context(|| format!("[[peer]] {}: ca_cert {}", p.domain, ca.display()))?;
        let tls = qutemail_smtp::tls::client_config(&roots)
            .with_context(|| format!("[[peer]] {}: ca_cert", p.domain))?;
        peer_routes.insert(
            p.domain.to_ascii_lowercase(),
            Route {
                target: target.clone(),
                server_name: p.smtp_tls_name.clone().unwrap_or_else(|| p.domain.clone()),
                tls: TlsMode::Required,
                tls_config: Some(tls),
            },
        );
    }
    let q = &config.queue;
    let smarthost = match &q.smarthost {
        None => None,
        Some(target) => {
            let tls_config = match &q.smarthost_ca {
                Some(ca) => Some(qutemail_smtp::tls::client_config(
                    &std::fs::read(ca).with_context(|| format!("[queue] smarthost_ca {}", ca.display()))?,
                )?),
                None => None,
            };
            let host = target.rsplit_once(':').map_or(target.as_str(), |(h, _)| h).to_owned();
            Some(Route {
                target: target.clone(),
                server_name: q.smarthost_tls_name.clone().unwrap_or(host),
                tls: if tls_config.is_some() { TlsMode::Required } else { TlsMode::Disabled },
                tls_config,
            })
        }
    };
    q.retry.validate().map_err(|e| anyhow::anyhow!("[queue.retry] {e}"))?;
    let mx = if q.mx_routing {
        Some(qutemail_queue::MxRouting::new(dns.clone(), q.mx_port).context("[queue] MX routing TLS")?)
    } else {
        None
    };
    let dkim = dkim(config)?.map(std::sync::Arc::new);
    // On SQLite this process is the queue's only runner, so a claim only has to outlive a
    // crash of it: short, so that a restarted gateway resumes at once. PostgreSQL nodes share
    // the queue: there a claim must outlast a whole batch of attempts by another node.
    let lease = match store.backend() {
        qutemail_store::Backend::Sqlite => std::time::Duration::from_secs(20),
        _ => std::time::Duration::from_secs(600),
    };
    Ok(qutemail_queue::OutboundQueue::new(
        store,
        vault,
        QueueSettings {
            hostname,
            domain: config.site.domain.clone(),
            peer_routes,
            smarthost,
            mx,
            dkim,
            retry: q.retry.clone(),
            batch: 50,
            lease,
            poll: std::time::Duration::from_secs(5),
            key_wait_retry: std::time::Duration::from_secs(10),
        },
    )
    .with_parallelism(qutemail_queue::Parallelism {
        per_destination: q.parallel_per_destination,
        total: q.parallel_total,
    }))
}

/// What the web API needs besides the store, vault and queue: its token signing key
/// (HSM-wrapped, created on first start), the kmd client for key readiness, and the peers' SAEs.
pub async fn web_deps(
    config: &GatewayConfig,
    store: qutemail_store::Store,
    vault: MailVault,
    queue: qutemail_queue::OutboundQueue,
    events: Option<qutemail_imap::MailboxEvents>,
    login_throttle: std::sync::Arc<qutemail_store::LoginThrottle>,
) -> anyhow::Result<qutemail_web::WebDeps> {
    let web = config.web.as_ref().context("the configuration has no [web] section")?;
    let hsm = HsmKeyWrapper::open_async(config.hsm.clone()).await.context("opening the HSM ([hsm])")?;
    let key_path =
        web.token_key.clone().unwrap_or_else(|| config.site.site_keys.with_file_name("web-token-key.json"));
    let token_key = qutemail_web::TokenKey::load_or_create(&key_path, &config.site.domain, &hsm).await?;
    let kmd = match &config.kmd {
        None => None,
        Some(k) => {
            let tls = etsi014::client::ClientTlsConfig::from_files(&k.ca_cert, &k.client_cert, &k.client_key)
                .context("[kmd] TLS files")?;
            Some(std::sync::Arc::new(etsi014::client::Etsi014Client::new(&k.etsi014_url, tls)?))
        }
    };
    let on_delivery = events
        .map(|e| std::sync::Arc::new(move || e.mailbox_changed()) as std::sync::Arc<dyn Fn() + Send + Sync>);
    Ok(qutemail_web::WebDeps {
        domain: config.site.domain.to_ascii_lowercase(),
        store,
        vault,
        queue,
        policy: config.policy.clone(),
        token_key: std::sync::Arc::new(token_key),
        kmd,
        peers: config
            .peers
            .iter()
            .map(|p| qutemail_web::PeerSae {
                domain: p.domain.to_ascii_lowercase(),
                sae_id: p.sae_id.clone(),
            })
            .collect(),
        on_delivery,
        login_throttle,
    })
}
