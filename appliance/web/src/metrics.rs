//! The admin console's QKD link data: kmd's Prometheus text (`kmd_metrics_url`, plain HTTP on
//! kmd's metrics listener) sampled every 5 s, the latest snapshot and one hour of history kept
//! in memory.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use utoipa::ToSchema;

/// How often kmd is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How much history is kept (one hour of samples).
const HISTORY_SAMPLES: usize = 3600 / 5;
/// Largest metrics page read.
const MAX_PAGE: usize = 4 * 1024 * 1024;

pub use qutemail_promtext::Sample;
/// Parses Prometheus text exposition (0.0.4); lines that do not parse are skipped.
pub use qutemail_promtext::parse as parse_exposition;

/// A QKD link as the console shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LinkView {
    /// Link ID.
    pub link_id: String,
    /// Peer channel state (kmd_peer_sync_state).
    pub peer: String,
    /// Device link state (kmd_device_link_state).
    pub state: String,
    /// Keys kmd can still hand out.
    pub keys_available: f64,
    /// Secret key rate, bit/s.
    pub key_rate_bps: Option<f64>,
    /// QBER (0..1).
    pub qber: Option<f64>,
    /// Alarms raised by the device since kmd started, by severity ("major: 2").
    pub alarms: Vec<String>,
}

/// One history point.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HistoryPoint {
    /// Unix milliseconds.
    pub t: u64,
    /// Link ID.
    pub link_id: String,
    /// Keys available.
    pub keys_available: f64,
    /// Secret key rate, bit/s.
    pub key_rate_bps: Option<f64>,
    /// QBER.
    pub qber: Option<f64>,
}

/// An SAE pair kmd serves.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SaePair {
    /// Link ID.
    pub link_id: String,
    /// Master (sending) SAE.
    pub master_sae: String,
    /// Slave (receiving) SAE.
    pub slave_sae: String,
    /// Keys assigned to the pair, not yet delivered.
    pub keys_assigned: f64,
    /// Keys delivered to the pair.
    pub keys_delivered: f64,
}

fn value_of(samples: &[Sample], name: &str, link: &str) -> Option<f64> {
    samples.iter().find(|s| s.name == name && s.label("link") == link).map(|s| s.value)
}

fn state_of(samples: &[Sample], name: &str, link: &str) -> String {
    samples
        .iter()
        .find(|s| s.name == name && s.label("link") == link && s.value >= 1.0)
        .map_or_else(|| "unknown".to_owned(), |s| s.label("state").to_owned())
}

/// The links in a set of samples.
pub fn links_of(samples: &[Sample]) -> Vec<LinkView> {
    let mut ids: Vec<&str> =
        samples.iter().filter(|s| s.name == "kmd_keys_available").map(|s| s.label("link")).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .map(|link| {
            let alarms = samples
                .iter()
                .filter(|s| s.name == "kmd_device_alarms_total" && s.label("link") == link && s.value > 0.0)
                .map(|s| format!("{}: {}", s.label("severity"), s.value))
                .collect();
            LinkView {
                link_id: link.to_owned(),
                peer: state_of(samples, "kmd_peer_sync_state", link),
                state: state_of(samples, "kmd_device_link_state", link),
                keys_available: value_of(samples, "kmd_keys_available", link).unwrap_or(0.0),
                key_rate_bps: value_of(samples, "kmd_link_secret_key_rate_bytes_per_second", link)
                    .map(|b| b * 8.0),
                qber: value_of(samples, "kmd_link_qber_ratio", link),
                alarms,
            }
        })
        .collect()
}

/// The SAE pairs in a set of samples.
pub fn saes_of(samples: &[Sample]) -> Vec<SaePair> {
    let mut pairs: BTreeMap<(String, String, String), (f64, f64)> = BTreeMap::new();
    for s in samples {
        let slot = match s.name.as_str() {
            "kmd_keys_assigned" => 0,
            "kmd_keys_delivered" => 1,
            _ => continue,
        };
        let key =
            (s.label("link").to_owned(), s.label("master_sae").to_owned(), s.label("slave_sae").to_owned());
        let e = pairs.entry(key).or_default();
        if slot == 0 { e.0 += s.value } else { e.1 += s.value }
    }
    pairs
        .into_iter()
        .map(|((link_id, master_sae, slave_sae), (keys_assigned, keys_delivered))| SaePair {
            link_id,
            master_sae,
            slave_sae,
            keys_assigned,
            keys_delivered,
        })
        .collect()
}

#[derive(Debug, Default)]
struct State {
    latest: Vec<Sample>,
    history: VecDeque<Vec<HistoryPoint>>,
    last_error: Option<String>,
}

/// Samples kmd's metrics and keeps an hour of history. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct LinkMonitor {
    state: Arc<Mutex<State>>,
}

/// What the console gets.
#[derive(Debug, Clone, Default)]
pub struct MonitorView {
    /// Latest samples.
    pub latest: Vec<Sample>,
    /// History, oldest first.
    pub history: Vec<HistoryPoint>,
    /// Why the last sample failed, if it did.
    pub last_error: Option<String>,
}

impl LinkMonitor {
    /// Records one page of metrics taken at `t_ms`.
    pub fn record(&self, t_ms: u64, samples: Vec<Sample>) {
        let points = links_of(&samples)
            .into_iter()
            .map(|l| HistoryPoint {
                t: t_ms,
                link_id: l.link_id,
                keys_available: l.keys_available,
                key_rate_bps: l.key_rate_bps,
                qber: l.qber,
            })
            .collect();
        if let Ok(mut s) = self.state.lock() {
            s.latest = samples;
            s.last_error = None;
            if s.history.len() >= HISTORY_SAMPLES {
                s.history.pop_front();
            }
            s.history.push_back(points);
        }
    }

    fn failed(&self, error: String) {
        if let Ok(mut s) = self.state.lock() {
            s.last_error = Some(error);
        }
    }

    /// The current view.
    pub fn view(&self) -> MonitorView {
        match self.state.lock() {
            Ok(s) => MonitorView {
                latest: s.latest.clone(),
                history: s.history.iter().flatten().cloned().collect(),
                last_error: s.last_error.clone(),
            },
            Err(_) => MonitorView::default(),
        }
    }

    /// Samples `url` (`http://host:port/path`) every [`SAMPLE_EVERY`] until the task is dropped.
    pub async fn run(self, url: String) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match fetch(&url).await {
                Ok(text) => self.record(crate::token::unix_now() * 1000, parse_exposition(&text)),
                Err(e) => {
                    tracing::debug!(%url, error = %e, "kmd metrics not available");
                    self.failed(e);
                }
            }
        }
    }
}

/// Fetches kmd's metrics page at `url` with a GET over plain HTTP/1.0 (kmd's metrics listener
/// is plain HTTP on the loopback or a management network); the error says what went wrong.
pub async fn fetch(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// is supported"))?;
    let (authority, path) =
        rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let connect = tokio::net::TcpStream::connect(authority);
    let mut stream = tokio::time::timeout(Duration::from_secs(3), connect)
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: text/plain\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), (&mut stream).take(MAX_PAGE as u64).read_to_end(&mut body))
        .await
        .map_err(|_| "read timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&body);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    if head.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmd_exposition_gives_links_and_sae_pairs() {
        let text = "# HELP kmd_keys_available x\n# TYPE kmd_keys_available gauge\n\
            kmd_keys_available{link=\"ab\"} 42\n\
            kmd_link_qber_ratio{link=\"ab\"} 0.0125\n\
            kmd_link_secret_key_rate_bytes_per_second{link=\"ab\"} 1000\n\
            kmd_device_link_state{link=\"ab\",state=\"up\"} 1\n\
            kmd_device_link_state{link=\"ab\",state=\"down\"} 0\n\
            kmd_device_alarms_total{link=\"ab\",severity=\"major\"} 2\n\
            kmd_keys_assigned{link=\"ab\",master_sae=\"A-mail\",slave_sae=\"B-mail\"} 3\n\
            kmd_keys_delivered{link=\"ab\",master_sae=\"A-mail\",slave_sae=\"B-mail\"} 7\n\
            garbage line\n";
        let samples = parse_exposition(text);
        let links = links_of(&samples);
        assert_eq!(links.len(), 1);
        let l = &links[0];
        assert_eq!((l.link_id.as_str(), l.state.as_str(), l.keys_available), ("ab", "up", 42.0));
        assert_eq!((l.qber, l.key_rate_bps), (Some(0.0125), Some(8000.0)));
        assert_eq!(l.alarms, vec!["major: 2".to_string()]);
        let saes = saes_of(&samples);
        assert_eq!(
            (saes[0].master_sae.as_str(), saes[0].keys_assigned, saes[0].keys_delivered),
            ("A-mail", 3.0, 7.0)
        );
        let m = LinkMonitor::default();
        for t in 0..(HISTORY_SAMPLES as u64 + 10) {
            m.record(t, samples.clone());
        }
        let v = m.view();
        assert_eq!(v.history.len(), HISTORY_SAMPLES, "one hour is kept");
        assert_eq!(v.history[0].t, 10);
    }
}
