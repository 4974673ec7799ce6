//! Key delivery through the serial driver over a pseudo-terminal, and the simulator's CPU cost.
//!
//! Each figure is reported with a reference measured in the same run:
//! - key bytes/s and frames/s through the protocol at 115200 baud and 4 Mbaud, against raw
//!   bytes/s pushed through the same pty with the same pacing (no protocol at all);
//! - the simulator's CPU time per simulated second, against the CPU time the physics model's
//!   block draws alone take for the same blocks.
//!
//! Run: `cargo bench -p qkd-sim --bench serial_link` (a few seconds per case).

use std::time::{Duration, Instant};

use qkd_device::serial::{SerialConfig, SerialDevice};
use qkd_device::{DeviceEvent, QkdDevice};
use qkd_sim::pty::Pty;
use qkd_sim::{End, SimConfig, Simulator};
use tokio::io::AsyncReadExt;
use tokio_serial::SerialPortBuilderExt;

fn cpu_time() -> Duration {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000);
    t(u.user_time()) + t(u.system_time())
}

/// Raw bytes through a pty, paced like the simulator's UART model: the reference.
async fn raw_pty(baud: u32, total: usize) -> f64 {
    let pty = Pty::open().expect("pty");
    let mut port =
        tokio_serial::new(pty.path().display().to_string(), baud).open_native_async().expect("open");
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        let mut got = 0;
        let start = Instant::now();
        while got < total {
            got += port.read(&mut buf).await.expect("read");
        }
        start.elapsed()
    });
    let chunk = vec![0x55u8; 1100];
    let mut sent = 0;
    let mut free_at = tokio::time::Instant::now();
    while sent < total {
        tokio::time::sleep_until(free_at).await;
        let n = chunk.len().min(total - sent);
        pty.write_all(&chunk[..n]).await.expect("write");
        free_at += Duration::from_secs_f64(n as f64 * 10.0 / f64::from(baud));
        sent += n;
    }
    total as f64 / reader.await.expect("reader").as_secs_f64()
}

fn link_config(baud: u32) -> SimConfig {
    let mut c = SimConfig::default();
    c.physics.distance_km = 10.0;
    c.physics.pulse_rate_hz = 1e9;
    c.blocks.max_key_bytes = 1024;
    c.blocks.buffer_blocks = 100_000;
    c.serial.baud_rate = baud;
    if let Ok(w) = std::env::var("QKD_BENCH_WINDOW") {
        c.serial.window = w.parse().unwrap();
    }
    c
}

/// Key bytes/s and frames/s through the protocol, with the device's buffer already full.
async fn protocol(baud: u32, blocks: u32) -> (f64, f64) {
    let sim = Simulator::start(link_config(baud), None).expect("simulator");
    while sim.status().alice.buffered_blocks < blocks as usize {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut dev = SerialDevice::open(SerialConfig::new(sim.pty_path(End::Alice), baud)).expect("open");
    // Wait for the session so the handshake is not part of the measurement.
    loop {
        if let DeviceEvent::Connected(_) = dev.next_event().await.expect("event") {
            break;
        }
    }
    let start = Instant::now();
    dev.request_blocks(blocks).await.expect("request");
    let (mut got, mut bytes) = (0u32, 0usize);
    while got < blocks {
        if let DeviceEvent::KeyBlock(b) = dev.next_event().await.expect("event") {
            got += 1;
            bytes += b.key.len();
        }
    }
    let s = start.elapsed().as_secs_f64();
    (bytes as f64 / s, f64::from(blocks) / s)
}

async fn simulator_cpu(time_scale: f64, wall: Duration) -> (f64, f64) {
    let mut config = link_config(4_000_000);
    config.time_scale = time_scale;
    config.physics.distance_km = 50.0;
    let sim = Simulator::start(config.clone(), None).expect("simulator");
    let mut a = SerialDevice::open(SerialConfig::new(sim.pty_path(End::Alice), 4_000_000)).expect("open");
    let mut b = SerialDevice::open(SerialConfig::new(sim.pty_path(End::Bob), 4_000_000)).expect("open");
    a.request_blocks(u32::MAX / 2).await.expect("request");
    b.request_blocks(u32::MAX / 2).await.expect("request");
    let drain = |mut d: SerialDevice| tokio::spawn(async move { while d.next_event().await.is_ok() {} });
    let (ta, tb) = (drain(a), drain(b));
    let (cpu0, sim0) = (cpu_time(), sim.status().link.simulated_s);
    tokio::time::sleep(wall).await;
    let (cpu1, status) = (cpu_time(), sim.status());
    ta.abort();
    tb.abort();
    let simulated = status.link.simulated_s - sim0;
    let blocks = status.link.blocks_distilled + status.link.blocks_aborted;
    // Reference: the physics alone for the same number of blocks, in this process.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let start = cpu_time();
    for _ in 0..blocks {
        std::hint::black_box(qkd_physics::draw_block(
            &config.physics,
            &qkd_physics::Conditions::default(),
            config.blocks.sifted_bits_per_block,
            &mut rng,
        ));
    }
    let physics = (cpu_time() - start).as_secs_f64();
    let whole = (cpu1 - cpu0).as_secs_f64();
    (whole / simulated * 1e3, physics / simulated * 1e3)
}

fn main() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        println!("serial link over a pty (key blocks of up to 1024 bytes)");
        println!(
            "{:>10} {:>16} {:>16} {:>12} {:>18}",
            "baud", "raw pty B/s", "key B/s", "frames/s", "key B/s ÷ raw"
        );
        for (baud, blocks) in [(115_200u32, 40u32), (4_000_000, 800)] {
            let raw = raw_pty(baud, (blocks as usize) * 600).await;
            let (key, frames) = protocol(baud, blocks).await;
            println!("{baud:>10} {raw:>16.0} {key:>16.0} {frames:>12.1} {:>18.3}", key / raw);
        }
        println!();
        println!("simulator CPU cost (50 km, 1 GHz, both ends drained at 4 Mbaud)");
        println!(
            "{:>10} {:>22} {:>22} {:>10}",
            "time scale", "CPU ms / simulated s", "physics ms / sim s", "ratio"
        );
        for scale in [1.0, 10.0] {
            let (total, physics) = simulator_cpu(scale, Duration::from_secs(4)).await;
            println!("{scale:>10} {total:>22.3} {physics:>22.4} {:>10.0}", total / physics.max(1e-9));
        }
    });
}
