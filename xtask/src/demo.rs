//! `cargo xtask demo`: two sites joined by a simulated QKD link.
//!
//! Today the demo runs `qkd-sim` and, for each site, a host that reads key blocks from that
//! site's device over the serial protocol and checks that both sites hold the same blocks.
//! Later parts (kmd, the mail gateway) join it; `state.json` keeps its names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use qkd_device::serial::{SerialConfig, SerialDevice};
use qkd_device::{DeviceEvent, QkdDevice};
use serde::Serialize;

use crate::system;

const SIM_CONFIG: &str = include_str!("../demo/qkd-sim.toml");

/// Kills the demo's child processes however the demo ends.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (name, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("demo: stopped {name}");
        }
    }
}

/// What `state.json` says about the demo. Field names are a contract (see README.md).
#[derive(Serialize)]
struct DemoState {
    version: u32,
    state_dir: PathBuf,
    link: LinkState,
    sites: HashMap<&'static str, SiteState>,
}

#[derive(Serialize)]
struct LinkState {
    id: String,
    simulator_pid: u32,
    control_socket: PathBuf,
    simulator_config: PathBuf,
}

#[derive(Serialize)]
struct SiteState {
    name: &'static str,
    qkd_device: DeviceState,
}

#[derive(Serialize)]
struct DeviceState {
    pty: String,
    device_id: String,
    role: &'static str,
    baud_rate: u32,
}

#[derive(Default)]
struct SiteCounters {
    connected: bool,
    blocks: u64,
    key_bytes: u64,
    kcvs: HashMap<u64, [u8; 16]>,
    last_telemetry: Option<qkd_device::LinkTelemetry>,
}

pub fn run(state_dir: Option<PathBuf>, release: bool, check: bool) -> anyhow::Result<()> {
    let profile = if release { "release" } else { "debug" };
    let mut build = system::cargo();
    build.args(["build", "--quiet", "-p", "qkd-sim"]);
    if release {
        build.arg("--release");
    }
    if !build.status().context("running cargo build")?.success() {
        bail!("building the demo's binaries failed");
    }
    let bin = system::target_dir(profile);
    let dir = match state_dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("qutemail-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let _ = std::fs::remove_file(dir.join("state.json"));

    let sim_config = dir.join("qkd-sim.toml");
    std::fs::write(&sim_config, SIM_CONFIG)?;
    let control_socket = dir.join("qkd-sim.sock");
    let sim_state = dir.join("qkd-sim.json");
    let _ = std::fs::remove_file(&sim_state);
    let log = std::fs::File::create(dir.join("logs/qkd-sim.log"))?;
    let sim = std::process::Command::new(bin.join("qkd-sim"))
        .arg("run")
        .arg("--config")
        .arg(&sim_config)
        .arg("--control-socket")
        .arg(&control_socket)
        .arg("--state-file")
        .arg(&sim_state)
        .args(["--print-every", "0"])
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .context("starting qkd-sim")?;
    let simulator_pid = sim.id();
    let _children = Children(vec![("qkd-sim".into(), sim)]);

    let sim_info: serde_json::Value = wait_for_json(&sim_state, Duration::from_secs(30))?;
    let pty = |end: &str| sim_info[end]["pty"].as_str().unwrap_or_default().to_string();
    let device_id = |end: &str| sim_info[end]["device_id"].as_str().unwrap_or_default().to_string();
    let baud_rate = 4_000_000;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let sites: [(&'static str, String); 2] = [("A", pty("alice")), ("B", pty("bob"))];
        let counters: Vec<Arc<Mutex<SiteCounters>>> =
            (0..2).map(|_| Arc::new(Mutex::new(SiteCounters::default()))).collect();
        for ((name, path), counters) in sites.iter().zip(&counters) {
            let device = SerialDevice::open(SerialConfig::new(path, baud_rate))
                .with_context(|| format!("site {name}: opening {path}"))?;
            tokio::spawn(read_site(device, counters.clone()));
        }
        let started = Instant::now();
        loop {
            let ready = counters.iter().all(|c| c.lock().map(|c| c.connected && c.blocks > 0).unwrap_or(false));
            if ready {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the sites received no key blocks within 60 s; see {}/logs", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let state = DemoState {
            version: 1,
            state_dir: dir.clone(),
            link: LinkState {
                id: sim_info["link_id"].as_str().unwrap_or_default().to_string(),
                simulator_pid,
                control_socket: control_socket.clone(),
                simulator_config: sim_config.clone(),
            },
            sites: HashMap::from([
                (
                    "A",
                    SiteState {
                        name: "A",
                        qkd_device: DeviceState { pty: pty("alice"), device_id: device_id("alice"), role: "transmitter", baud_rate },
                    },
                ),
                (
                    "B",
                    SiteState {
                        name: "B",
                        qkd_device: DeviceState { pty: pty("bob"), device_id: device_id("bob"), role: "receiver", baud_rate },
                    },
                ),
            ]),
        };
        write_atomically(&dir.join("state.json"), &serde_json::to_vec_pretty(&state)?)?;
        println!("QuteMail demo is up. State: {}", dir.join("state.json").display());
        println!("  QKD link {}: site A on {}, site B on {}", state.link.id, pty("alice"), pty("bob"));
        println!("  Faults: {} ctl --socket {} fibre-cut on|off | eavesdrop 0.2 | noise both --flip-rate 0.001 | reboot alice",
            bin.join("qkd-sim").display(), control_socket.display());
        if check {
            return Ok(());
        }
        println!("Press Ctrl-C to stop.");
        let printer = async {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                print_line(&counters);
            }
        };
        tokio::select! {
            () = printer => Ok(()),
            r = tokio::signal::ctrl_c() => r.map_err(Into::into),
        }
    })
}

async fn read_site(mut device: SerialDevice, counters: Arc<Mutex<SiteCounters>>) {
    // Keep a modest amount of credit outstanding; this stands in for kmd's pool refill.
    const BATCH: u32 = 32;
    if device.request_blocks(BATCH).await.is_err() {
        return;
    }
    let mut owed = BATCH;
    while let Ok(event) = device.next_event().await {
        let was_block = matches!(event, DeviceEvent::KeyBlock(_));
        if let Ok(mut c) = counters.lock() {
            record(&mut c, event);
        }
        if was_block {
            owed -= 1;
            if owed == 0 {
                owed = BATCH;
                if device.request_blocks(BATCH).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn record(c: &mut SiteCounters, event: DeviceEvent) {
    match event {
        DeviceEvent::Connected(_) => c.connected = true,
        DeviceEvent::Disconnected { .. } => c.connected = false,
        DeviceEvent::Telemetry(t) => c.last_telemetry = Some(t),
        DeviceEvent::Alarm(a) => {
            println!("alarm: {} ({})", a.text, if a.raised { "raised" } else { "cleared" })
        }
        DeviceEvent::KeyBlock(b) => {
            c.blocks += 1;
            c.key_bytes += b.key.len() as u64;
            if let qkd_device::BlockId::Sequence(id) = b.block_id {
                c.kcvs.insert(id, b.kcv);
            }
        }
    }
}

fn print_line(counters: &[Arc<Mutex<SiteCounters>>]) {
    let (Ok(a), Ok(b)) = (counters[0].lock(), counters[1].lock()) else { return };
    let matched = a.kcvs.iter().filter(|(id, kcv)| b.kcvs.get(id) == Some(kcv)).count();
    let mismatched = a.kcvs.iter().filter(|(id, kcv)| b.kcvs.get(id).is_some_and(|k| k != *kcv)).count();
    let t = a.last_telemetry.as_ref();
    println!(
        "link {:<14} QBER {:>5.2}%  secret {:>8.1} kbit/s | site A {:>6} blocks {:>9} B | site B {:>6} blocks {:>9} B | same at both sites {} (mismatched {})",
        t.map_or("?", |t| t.link_state.as_str()),
        t.and_then(|t| t.qber).unwrap_or(0.0) * 100.0,
        t.and_then(|t| t.secret_rate_bps).unwrap_or(0.0) / 1e3,
        a.blocks,
        a.key_bytes,
        b.blocks,
        b.key_bytes,
        matched,
        mismatched
    );
}

fn wait_for_json(path: &Path, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(path)
            && let Ok(v) = serde_json::from_slice(&bytes)
        {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("{} did not appear within {:?}", path.display(), timeout);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
