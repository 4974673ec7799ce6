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
