//! `qutemailctl links`: each QKD link and its key pool as kmd reports them on its Prometheus
//! metrics listener (the gateway has no other view of kmd's links). Reading the page and
//! summarising links and SAE pairs is shared with the web admin console (`qutemail-web`'s
//! `metrics` module, parser from `qutemail-promtext`); this adds the key-block counts.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use qutemail_promtext::{Sample, find, value};
use qutemail_web::metrics::{LinkView, SaePair, fetch, links_of, parse_exposition, saes_of};
use serde::Serialize;

use super::{OperatorError, load, print_json};

/// What `links --json` prints.
#[derive(Debug, Serialize)]
pub struct LinksReport {
    /// Where the metrics were read.
    pub kmd_metrics_url: String,
    /// kmd's HSM health (`None`: not reported).
    pub hsm_healthy: Option<bool>,
    /// The links.
    pub links: Vec<LinkReport>,
    /// The SAE pairs kmd serves (whose keys come from the links' pools).
    pub sae_pairs: Vec<SaePair>,
}

/// A link with its key pool.
#[derive(Debug, Serialize)]
pub struct LinkReport {
    /// State, peer, QBER, key rate, keys available, alarms.
    #[serde(flatten)]
    pub link: LinkView,
    /// Stored key blocks by state (`confirmed`, `pending`, ...).
    pub blocks: BTreeMap<String, f64>,
    /// Key blocks received from the device since kmd started.
    pub blocks_received: f64,
    /// Key blocks rejected (CRC, confirmation mismatch, ...) since kmd started.
    pub blocks_rejected: f64,
}

/// The report for a page of kmd metrics.
pub fn report(url: &str, samples: &[Sample]) -> LinksReport {
    let links = links_of(samples)
        .into_iter()
        .map(|link| {
            let id = link.link_id.clone();
            let blocks = find(samples, "kmd_key_blocks")
                .filter(|s| s.label("link") == id)
                .map(|s| (s.label("state").to_owned(), s.value))
                .collect();
            LinkReport {
                blocks,
                blocks_received: value(samples, "kmd_key_blocks_received_total", &[("link", &id)])
                    .unwrap_or(0.0),
                blocks_rejected: find(samples, "kmd_key_blocks_rejected_total")
                    .filter(|s| s.label("link") == id)
                    .map(|s| s.value)
                    .sum(),
                link,
            }
        })
        .collect();
    LinksReport {
        kmd_metrics_url: url.to_owned(),
        hsm_healthy: value(samples, "kmd_hsm_healthy", &[]).map(|v| v >= 1.0),
        links,
        sae_pairs: saes_of(samples),
    }
}

/// The report as text for a person.
pub fn render(r: &LinksReport) -> String {
    let mut out = format!("kmd at {}\n", r.kmd_metrics_url);
    let hsm = match r.hsm_healthy {
        Some(true) => "healthy",
        Some(false) => "NOT HEALTHY (kmd serves no key)",
        None => "unknown",
    };
    out.push_str(&format!("HSM: {hsm}\n\nLinks ({}):\n", r.links.len()));
    if r.links.is_empty() {
        out.push_str("  none (kmd reports no link)\n");
    }
    for l in &r.links {
        let v = &l.link;
        let qber = v.qber.map_or("-".to_owned(), |q| format!("{:.2} %", q * 100.0));
        let rate = v.key_rate_bps.map_or("-".to_owned(), |r| format!("{:.1} kbit/s", r / 1000.0));
        out.push_str(&format!(
            "  {}: link {}, peer kmd {}, QBER {qber}, key rate {rate}, {:.0} keys available\n",
            v.link_id, v.state, v.peer, v.keys_available
        ));
        let blocks: Vec<String> =
            l.blocks.iter().filter(|(_, n)| **n > 0.0).map(|(state, n)| format!("{n} {state}")).collect();
        out.push_str(&format!(
            "    blocks: {}; received {}, rejected {}\n",
            if blocks.is_empty() { "none stored".to_owned() } else { blocks.join(", ") },
            l.blocks_received,
            l.blocks_rejected
        ));
        if !v.alarms.is_empty() {
            out.push_str(&format!("    device alarms: {}\n", v.alarms.join(", ")));
        }
    }
    out.push_str(&format!("\nSAE pairs ({}):\n", r.sae_pairs.len()));
    for p in &r.sae_pairs {
        out.push_str(&format!(
            "  {}: {} -> {}: {} assigned (waiting for the receiver), {} delivered\n",
            p.link_id, p.master_sae, p.slave_sae, p.keys_assigned, p.keys_delivered
        ));
    }
    out
}

/// `links [--kmd-metrics URL] [--json]`.
pub async fn links(config_path: &Path, kmd_metrics: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let url = match kmd_metrics {
        Some(url) => url.to_owned(),
        None => {
            let config = load(config_path)?;
            config
                .web
                .and_then(|w| w.kmd_metrics_url)
                .ok_or_else(|| OperatorError::NoKmdMetricsUrl { path: config_path.to_owned() })?
        }
    };
    let page = fetch(&url).await.map_err(|reason| OperatorError::KmdMetrics { url: url.clone(), reason })?;
    let samples = parse_exposition(&page);
    if !samples.iter().any(|s| s.name.starts_with("kmd_")) {
        return Err(OperatorError::KmdMetrics {
            url,
            reason: "the page has no kmd_* metric: is this kmd?".into(),
        }
        .into());
    }
    let report = report(&url, &samples);
    if json {
        print_json(&report)?;
    } else {
        print!("{}", render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_with_its_pool_and_blocks() {
        let samples = qutemail_promtext::parse(
            "kmd_hsm_healthy 1\n\
             kmd_keys_available{link=\"ab\"} 40\n\
             kmd_device_link_state{link=\"ab\",state=\"up\"} 1\n\
             kmd_peer_sync_state{link=\"ab\",state=\"up\"} 1\n\
             kmd_link_qber_ratio{link=\"ab\"} 0.02\n\
             kmd_link_secret_key_rate_bytes_per_second{link=\"ab\"} 1250\n\
             kmd_key_blocks{link=\"ab\",state=\"confirmed\"} 5\n\
             kmd_key_blocks_received_total{link=\"ab\"} 6\n\
             kmd_key_blocks_rejected_total{link=\"ab\",reason=\"crc\"} 1\n\
             kmd_keys_delivered{link=\"ab\",master_sae=\"A-mail\",slave_sae=\"B-mail\"} 3\n",
        );
        let r = report("http://127.0.0.1:9461/metrics", &samples);
        assert_eq!(r.hsm_healthy, Some(true));
        assert_eq!(
            (r.links.len(), r.links[0].blocks["confirmed"], r.links[0].blocks_rejected),
            (1, 5.0, 1.0)
        );
        let text = render(&r);
        assert!(
            text.contains("ab: link up, peer kmd up, QBER 2.00 %, key rate 10.0 kbit/s, 40 keys available"),
            "{text}"
        );
        assert!(text.contains("blocks: 5 confirmed; received 6, rejected 1"), "{text}");
        assert!(
            text.contains("A-mail -> B-mail: 0 assigned (waiting for the receiver), 3 delivered"),
            "{text}"
        );
    }
}
