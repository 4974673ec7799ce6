//! `kmd status`: what a running kmd is doing, read from its metrics listener and shown for an
//! operator (links, pool, SAE pairs, HSM, ETSI 014 traffic) or as JSON for scripts.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub use qutemail_promtext::{Sample, parse};
use qutemail_promtext::{find, value};

/// Fetching or reading the metrics failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// kmd did not answer.
    #[error(
        "cannot reach kmd's metrics listener at {addr}: {source} (is kmd running, with [metrics] enabled?)"
    )]
    Connect {
        /// The listener.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not a metrics page.
    #[error("kmd's metrics listener at {addr} answered unexpectedly: {reason}")]
    Answer {
        /// The listener.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
}

/// Fetches `GET /metrics` from `addr` (plain HTTP on the metrics listener).
pub fn fetch(addr: SocketAddr) -> Result<String, StatusError> {
    let connect = |source| StatusError::Connect { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(connect)?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(connect)?;
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(connect)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(connect)?;
    let text = String::from_utf8_lossy(&raw);
    let answer = |reason: String| StatusError::Answer { addr, reason };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| answer("no HTTP header".into()))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        return Err(answer(format!("status line {status:?}")));
    }
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// The human summary `kmd status` prints.
pub fn render(samples: &[Sample]) -> String {
    let mut out = String::new();
    let version = find(samples, "kmd_build_info").next().map_or("?", |s| s.label("version"));
    out.push_str(&format!("kmd {version}\n"));
    let hsm = match value(samples, "kmd_hsm_healthy", &[]) {
        Some(v) if v >= 1.0 => "healthy",
        Some(_) => "NOT HEALTHY (no key is served)",
        None => "unknown",
    };
    out.push_str(&format!("HSM: {hsm}\n"));

    let mut links: Vec<&str> = find(samples, "kmd_keys_available").map(|s| s.label("link")).collect();
    links.sort_unstable();
    links.dedup();
    out.push_str(&format!("\nLinks ({}):\n", links.len()));
    for link in &links {
        let state = find(samples, "kmd_device_link_state")
            .find(|s| s.label("link") == *link && s.value >= 1.0)
            .map_or("unknown", |s| s.label("state"));
        let peer = find(samples, "kmd_peer_sync_state")
            .find(|s| s.label("link") == *link && s.value >= 1.0)
            .map_or("unknown", |s| s.label("state"));
        let qber = value(samples, "kmd_link_qber_ratio", &[("link", link)])
            .map_or("-".to_owned(), |q| format!("{:.2} %", q * 100.0));
        let rate = value(samples, "kmd_link_secret_key_rate_bytes_per_second", &[("link", link)])
            .map_or("-".to_owned(), |r| format!("{:.1} kbit/s", r * 8.0 / 1000.0));
        let available = value(samples, "kmd_keys_available", &[("link", link)]).unwrap_or(0.0);
        out.push_str(&format!(
            "  {link}: device {state}, peer {peer}, QBER {qber}, secret key rate {rate}, {available:.0} keys available\n"
        ));
        let mut blocks: Vec<String> = find(samples, "kmd_key_blocks")
            .filter(|s| s.label("link") == *link && s.value > 0.0)
            .map(|s| format!("{} {}", s.value, s.label("state")))
            .collect();
        blocks.sort();
        let received = value(samples, "kmd_key_blocks_received_total", &[("link", link)]).unwrap_or(0.0);
        let rejected: f64 = find(samples, "kmd_key_blocks_rejected_total")
            .filter(|s| s.label("link") == *link)
            .fold(0.0, |sum, s| sum + s.value);
        out.push_str(&format!(
            "    blocks: {}; received {received}, rejected {rejected}\n",
            if blocks.is_empty() { "none stored".to_owned() } else { blocks.join(", ") }
        ));
    }

    let mut pairs: BTreeMap<(String, String, String), (f64, f64)> = BTreeMap::new();
    for (name, slot) in [("kmd_keys_assigned", 0), ("kmd_keys_delivered", 1)] {
        for s in find(samples, name) {
            let key = (
                s.label("link").to_owned(),
                s.label("master_sae").to_owned(),
                s.label("slave_sae").to_owned(),
            );
            let e = pairs.entry(key).or_default();
            if slot == 0 { e.0 += s.value } else { e.1 += s.value }
        }
    }
    out.push_str(&format!("\nSAE pairs ({}):\n", pairs.len()));
    for ((link, master, slave), (assigned, delivered)) in &pairs {
        out.push_str(&format!("  {link}: {master} -> {slave}: {assigned} assigned (waiting for the slave), {delivered} delivered\n"));
    }

    let mut requests: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in find(samples, "kmd_etsi014_requests_total") {
        requests.entry(s.label("endpoint").to_owned()).or_default().push(format!(
            "{} × {}",
            s.label("status"),
            s.value
        ));
    }
    out.push_str("\nETSI 014 requests:\n");
    if requests.is_empty() {
        out.push_str("  none yet\n");
    }
    for (endpoint, counts) in requests {
        out.push_str(&format!("  {endpoint}: {}\n", counts.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP kmd_build_info x
# TYPE kmd_build_info gauge
kmd_build_info{version="0.1.0"} 1
kmd_hsm_healthy 1
kmd_keys_available{link="l1"} 42
kmd_device_link_state{link="l1",state="up"} 1
kmd_device_link_state{link="l1",state="down"} 0
kmd_peer_sync_state{link="l1",state="up"} 1
kmd_link_qber_ratio{link="l1"} 0.021
kmd_link_secret_key_rate_bytes_per_second{link="l1"} 12500
kmd_key_blocks{link="l1",state="confirmed"} 7
kmd_key_blocks_received_total{link="l1"} 9
kmd_keys_delivered{link="l1",master_sae="A-mail",slave_sae="B-mail"} 3
kmd_etsi014_requests_total{endpoint="enc_keys",status="200"} 3
"#;

    #[test]
    fn the_summary_names_links_pairs_and_requests() {
        let samples = parse(PAGE);
        assert_eq!(samples.len(), 12);
        let text = render(&samples);
        assert!(text.contains("HSM: healthy"), "{text}");
        assert!(
            text.contains(
                "l1: device up, peer up, QBER 2.10 %, secret key rate 100.0 kbit/s, 42 keys available"
            ),
            "{text}"
        );
        assert!(text.contains("7 confirmed; received 9, rejected 0"), "{text}");
        assert!(text.contains("A-mail -> B-mail: 0 assigned"), "{text}");
        assert!(text.contains("enc_keys: 200 × 3"), "{text}");
    }

    #[test]
    fn labels_with_escapes_parse() {
        let s = parse(r#"m{a="x\"y",b="z"} 2"#);
        assert_eq!(s[0].labels["a"], "x\"y");
        assert_eq!(s[0].labels["b"], "z");
        assert_eq!(dechunk("5\r\nhello\r\n0\r\n\r\n"), "hello");
    }
}
