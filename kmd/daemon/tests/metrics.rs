//! Metrics: every family, updated, passes the real `promtool check metrics`; and the real `kmd`
//! with a simulated QKD device (qkd-sim, in this process) counts blocks and telemetry, keeps the
//! device's credit between the water marks, serves it all on `/metrics`, and never logs a key.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, Site, sample};
use kmd::metrics::{
    DeviceLinkState, EtsiEndpoint, HsmOp, KeyStock, Metrics, PairStock, PeerSyncState, RejectReason,
};
use qkd_device::serial::{SerialConfig, SerialDevice};
use qkd_device::{Alarm, DeviceEvent, LinkState, LinkTelemetry, QkdDevice, Severity};

const FAMILIES: [(&str, &str); 18] = [
    ("kmd_build_info", "gauge"),
    ("process_start_time_seconds", "gauge"),
    ("kmd_keys_available", "gauge"),
    ("kmd_keys_assigned", "gauge"),
    ("kmd_keys_delivered", "gauge"),
    ("kmd_key_blocks", "gauge"),
    ("kmd_key_blocks_received_total", "counter"),
    ("kmd_key_blocks_rejected_total", "counter"),
    ("kmd_device_link_state", "gauge"),
    ("kmd_device_alarms_total", "counter"),
    ("kmd_link_qber_ratio", "gauge"),
    ("kmd_link_secret_key_rate_bytes_per_second", "gauge"),
    ("kmd_hsm_operation_duration_seconds", "histogram"),
    ("kmd_hsm_operation_errors_total", "counter"),
    ("kmd_hsm_healthy", "gauge"),
    ("kmd_etsi014_requests_total", "counter"),
    ("kmd_etsi014_request_duration_seconds", "histogram"),
    ("kmd_peer_sync_state", "gauge"),
];

#[test]
fn every_family_updated_passes_promtool() {
    let m = Metrics::new();
    for link in ["A-B", "A-C"] {
        m.register_link(link);
        m.key_block_received(link);
        m.key_block_rejected(link, RejectReason::Duplicate);
        m.set_link_state(link, DeviceLinkState::Aligning);
        m.telemetry(
            link,
            &LinkTelemetry {
                unix_ms: 1,
                link_state: LinkState::Up,
                qber: Some(0.021),
                raw_rate_bps: Some(1e6),
                sifted_rate_bps: Some(5e5),
                secret_rate_bps: Some(12_345.5),
                channel_loss_db: Some(5.0),
                buffered_blocks: Some(3),
            },
        );
        m.alarm(
            link,
            &Alarm { code: 0x0101, severity: Severity::Critical, raised: true, text: "fibre".into() },
        );
        m.set_peer_sync(link, PeerSyncState::Up);
        m.set_key_stock(
            link,
            &KeyStock {
                available_keys: 42,
                blocks: vec![("confirmed".into(), 7), ("unconfirmed".into(), 2)],
                pairs: vec![PairStock {
                    master_sae: "A-mail".into(),
                    slave_sae: "B-mail".into(),
                    assigned: 3,
                    delivered: 10,
                }],
            },
        );
    }
    for op in HsmOp::ALL {
        m.observe_hsm(op, Duration::from_micros(750), true);
        m.observe_hsm(op, Duration::from_millis(30), false);
    }
    m.set_hsm_healthy(true);
    for endpoint in [EtsiEndpoint::Status, EtsiEndpoint::EncKeys, EtsiEndpoint::DecKeys, EtsiEndpoint::Other]
    {
        m.observe_etsi(endpoint, 200, Duration::from_millis(3));
        m.observe_etsi(endpoint, 503, Duration::from_millis(1));
    }
    let text = m.encode();
    for (name, kind) in FAMILIES {
        assert!(
            text.contains(&format!("\n# TYPE {name} {kind}\n"))
                || text.starts_with(&format!("# HELP {name} ")),
            "{name}: {text}"
        );
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP: {text}");
    }
    assert_eq!(sample(&text, "kmd_device_link_state{link=\"A-B\",state=\"up\"}"), Some(1.0));
    assert_eq!(sample(&text, "kmd_device_link_state{link=\"A-B\",state=\"aligning\"}"), Some(0.0));
    assert_eq!(sample(&text, "kmd_link_qber_ratio{link=\"A-C\"}"), Some(0.021));
    assert_eq!(
        sample(&text, "kmd_keys_assigned{link=\"A-B\",master_sae=\"A-mail\",slave_sae=\"B-mail\"}"),
        Some(3.0)
    );
    assert_eq!(sample(&text, "kmd_key_blocks_rejected_total{link=\"A-B\",reason=\"duplicate\"}"), Some(1.0));
    assert_eq!(sample(&text, "kmd_key_blocks_rejected_total{link=\"A-B\",reason=\"pool_full\"}"), Some(0.0));
    assert_eq!(sample(&text, "kmd_hsm_operation_errors_total{op=\"wrap\"}"), Some(1.0));
    assert_eq!(
        sample(&text, "kmd_hsm_operation_duration_seconds_bucket{op=\"unwrap\",le=\"0.001\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "kmd_build_info{version=\"0.1.0\"}"), Some(1.0));
    assert!(sample(&text, "process_start_time_seconds").unwrap() > 1.7e9);
    common::promtool_check(&text);
}

#[test]
fn fresh_metrics_pass_promtool() {
    let m = Metrics::new();
    m.register_link("A-B");
    common::promtool_check(&m.encode());
}

fn fast_link() -> qkd_sim::SimConfig {
    let mut c = qkd_sim::SimConfig::default();
    c.physics.distance_km = 10.0;
    c.physics.pulse_rate_hz = 1e9;
    c.blocks.sifted_bits_per_block = 4096;
    c.blocks.max_key_bytes = 256;
    c.serial.baud_rate = 921_600;
    c.telemetry_interval_s = 0.2;
    c.seed = Some(11);
    c
}

fn link_config(site: &Site, link_id: &str, pty: &str) -> String {
    site.config(&format!(
        r#"
[[link]]
id = "{link_id}"
peer_kme_id = "KME-B"
peer_url = "https://127.0.0.1:1"
device = {{ serial = {{ path = "{pty}", baud_rate = 921600 }} }}

[link.pool]
max_blocks = 20
low_water = 4
high_water = 12

[peer]
listen = "127.0.0.1:0"
ca_cert = "ca.pem"
server_cert = "kmd.pem"
server_key = "kmd.key"
client_cert = "peer.pem"
client_key = "peer.key"
"#
    ))
    .replace("level = \"debug\"", "level = \"trace\"")
}

fn scrape_until(
    addr: std::net::SocketAddr,
    what: &str,
    limit: Duration,
    ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (status, _, body) = common::http_get(addr, "/metrics");
        assert_eq!(status, 200);
        if ok(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what} not seen within {limit:?}:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn live_device_link_blocks_telemetry_credit_and_no_key_in_logs() {
    let site = Site::new();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let _guard = runtime.enter();
    let sim = qkd_sim::Simulator::start(fast_link(), None).unwrap();

    // The other end of the link, read by this test: the same key blocks kmd receives.
    let keys: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let mut bob = SerialDevice::open(SerialConfig::new(sim.pty_path(qkd_sim::End::Bob), 921_600)).unwrap();
    let bob_keys = keys.clone();
    runtime.spawn(async move {
        bob.request_blocks(1000).await.unwrap();
        while let Ok(event) = bob.next_event().await {
            if let DeviceEvent::KeyBlock(b) = event {
                bob_keys.lock().unwrap().push(b.key.to_vec());
            }
        }
    });

    let config = site.write_config(&link_config(&site, "qkd-link-1", sim.pty_path(qkd_sim::End::Alice)));
    let mut kmd = Daemon::start(&site, &config, None);
    let ready = kmd.wait_ready();
    let metrics = ready.metrics.unwrap();

    let received = "kmd_key_blocks_received_total{link=\"qkd-link-1\"}";
    let body = scrape_until(metrics, "12 blocks, telemetry and link up", Duration::from_secs(60), |b| {
        sample(b, received) == Some(12.0)
            && sample(b, "kmd_link_qber_ratio{link=\"qkd-link-1\"}").is_some_and(|q| q > 0.0 && q < 0.11)
            && sample(b, "kmd_link_secret_key_rate_bytes_per_second{link=\"qkd-link-1\"}")
                .is_some_and(|r| r > 0.0)
            && sample(b, "kmd_device_link_state{link=\"qkd-link-1\",state=\"up\"}") == Some(1.0)
    });
    assert_eq!(sample(&body, "kmd_device_link_state{link=\"qkd-link-1\",state=\"disconnected\"}"), Some(0.0));
    common::promtool_check(&body);

    // Credit: nothing is consumed, so kmd stops at high_water (12) and asks for no more.
    std::thread::sleep(Duration::from_secs(2));
    let (_, _, body) = common::http_get(metrics, "/metrics");
    assert_eq!(sample(&body, received), Some(12.0), "credit beyond high_water:\n{body}");
    assert_eq!(
        sample(&body, "kmd_key_blocks_rejected_total{link=\"qkd-link-1\",reason=\"link_mismatch\"}"),
        Some(0.0)
    );

    // The peer (https://127.0.0.1:1) never answers: after three failed status polls it is down.
    scrape_until(metrics, "peer down", Duration::from_secs(60), |b| {
        sample(b, "kmd_peer_sync_state{link=\"qkd-link-1\",state=\"down\"}") == Some(1.0)
    });

    // The peer channel listens, answers the peer kmd (recognised by CN) with the peer
    // protocol's status, and refuses others.
    let peer_addr = ready.peer.expect("peer address in STATUS");
    let call = |cn: &str| {
        site.client(cn).write(site.path(), cn).unwrap();
        let out = std::process::Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&site.ca_cert)
            .arg("--cert")
            .arg(site.path().join(format!("{cn}.pem")))
            .arg("--key")
            .arg(site.path().join(format!("{cn}.key")))
            .arg(format!("https://localhost:{}/peer/v1/status", peer_addr.port()))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(call("KME-B"), "200");
    assert_eq!(call("KME-Z"), "401");

    assert!(kmd.stop().success());
    let log = kmd.stderr();
    assert!(log.contains("QKD device connected"), "{log}");
    assert!(log.contains("key block stored"), "trace logging was on: {log}");
    let keys = keys.lock().unwrap().clone();
    assert!(keys.len() >= 12, "the test's end saw {} blocks", keys.len());
    for key in &keys {
        let hex: String = key[..12].iter().map(|b| format!("{b:02x}")).collect();
        let upper = hex.to_uppercase();
        let list = format!("{}, {}, {}, {}", key[0], key[1], key[2], key[3]);
        assert!(
            !log.contains(&hex) && !log.contains(&upper) && !log.contains(&list),
            "key material in the log"
        );
    }
    drop(sim);
}

#[test]
fn a_device_on_another_link_gets_no_credit() {
    let site = Site::new();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let _guard = runtime.enter();
    let sim = qkd_sim::Simulator::start(fast_link(), None).unwrap();
    let config = site.write_config(&link_config(&site, "A-B", sim.pty_path(qkd_sim::End::Alice)));
    let mut kmd = Daemon::start(&site, &config, None);
    let metrics = kmd.wait_ready().metrics.unwrap();
    scrape_until(metrics, "connected", Duration::from_secs(60), |b| {
        sample(b, "kmd_device_link_state{link=\"A-B\",state=\"disconnected\"}") == Some(0.0)
    });
    // A device on another link gets no credit from kmd: no block is asked for, none stored.
    std::thread::sleep(Duration::from_secs(2));
    let (_, _, body) = common::http_get(metrics, "/metrics");
    assert_eq!(sample(&body, "kmd_key_blocks_received_total{link=\"A-B\"}"), Some(0.0), "{body}");
    assert!(kmd.stop().success());
    assert!(kmd.stderr().contains("QKD device belongs to another link"), "{}", kmd.stderr());
    drop(sim);
}
