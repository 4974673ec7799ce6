//! The simulator and the serial driver together, over real pseudo-terminals.
//!
//! These are the properties the device layer promises kmd: both ends of a link receive the
//! same blocks with the same IDs in the same order; line noise and device reboots lose and
//! corrupt nothing; faults show up as alarms, telemetry and an end to key delivery.

use std::time::Duration;

use qkd_device::serial::{SerialConfig, SerialDevice};
use qkd_device::{BlockId, DeviceEvent, QkdDevice};
use qkd_serial_proto::{LinkState, alarm_code};
use qkd_sim::{End, LineNoise, SimConfig, Simulator};

fn fast_link() -> SimConfig {
    let mut c = SimConfig::default();
    c.physics.distance_km = 10.0;
    c.physics.pulse_rate_hz = 1e9;
    c.blocks.sifted_bits_per_block = 4096;
    c.blocks.max_key_bytes = 256;
    c.serial.baud_rate = 921_600;
    c.telemetry_interval_s = 0.2;
    c.seed = Some(7);
    c
}

fn open(sim: &Simulator, end: End) -> SerialDevice {
    SerialDevice::open(SerialConfig::new(sim.pty_path(end), 921_600)).expect("open pty")
}

struct Block {
    id: u64,
    kcv: [u8; 16],
    key: Vec<u8>,
    created_unix_ms: u64,
}

#[derive(Default)]
struct Seen {
    blocks: Vec<Block>,
    connects: usize,
    disconnects: Vec<String>,
    alarms: Vec<(u16, bool)>,
    states: Vec<LinkState>,
}

/// Collects events until `want` blocks arrived or `limit` passed; asks for blocks as it goes.
/// A block the simulator was distilling when a fault began is stamped when it completes, within
/// one simulation step of the change.
const IN_FLIGHT_MS: u64 = 250;

/// Collects for 4 s after a fault that began at `fault_at` and fails if any block delivered
/// was made after it (beyond [`IN_FLIGHT_MS`]). Returns the two collection windows.
async fn watch_after_fault(dev: &mut SerialDevice, fault_at: u64, what: &str) -> (Seen, Seen) {
    let drained = collect(dev, 100_000, Duration::from_secs(2)).await;
    let during = collect(dev, 100_000, Duration::from_secs(2)).await;
    let made_after: Vec<u64> = drained
        .blocks
        .iter()
        .chain(&during.blocks)
        .map(|b| b.created_unix_ms)
        .filter(|t| *t > fault_at + IN_FLIGHT_MS)
        .collect();
    assert!(made_after.is_empty(), "keys made {what}: at {made_after:?}, fault from {fault_at}");
    (drained, during)
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn collect(dev: &mut SerialDevice, want: usize, limit: Duration) -> Seen {
    let mut seen = Seen::default();
    dev.request_blocks(want as u32).await.unwrap();
    let deadline = tokio::time::Instant::now() + limit;
    while seen.blocks.len() < want {
        let Ok(event) = tokio::time::timeout_at(deadline, dev.next_event()).await else { break };
        match event.expect("driver stopped") {
            DeviceEvent::KeyBlock(b) => {
                let BlockId::Sequence(id) = b.block_id else { panic!("serial blocks have sequence IDs") };
                seen.blocks.push(Block {
                    id,
                    kcv: b.kcv,
                    key: b.key.to_vec(),
                    created_unix_ms: b.created_unix_ms,
                });
            }
            DeviceEvent::Connected(_) => seen.connects += 1,
            DeviceEvent::Disconnected { reason } => seen.disconnects.push(reason),
            DeviceEvent::Alarm(a) => seen.alarms.push((a.code, a.raised)),
            DeviceEvent::Telemetry(t) => seen.states.push(t.link_state),
        }
    }
    seen
}

fn assert_consecutive(blocks: &[Block]) {
    for pair in blocks.windows(2) {
        assert_eq!(
            pair[1].id,
            pair[0].id + 1,
            "gap or reorder between blocks {} and {}",
            pair[0].id,
            pair[1].id
        );
    }
}

fn assert_same(a: &[Block], b: &[Block]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.id, y.id);
        assert_eq!(x.kcv, y.kcv, "block {} check values differ", x.id);
        assert_eq!(x.key, y.key, "block {} keys differ", x.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ends_receive_the_same_blocks_in_the_same_order() {
    let sim = Simulator::start(fast_link(), None).unwrap();
    let (mut a, mut b) = (open(&sim, End::Alice), open(&sim, End::Bob));
    let (sa, sb) = tokio::join!(
        collect(&mut a, 100, Duration::from_secs(60)),
        collect(&mut b, 100, Duration::from_secs(60))
    );
    assert_eq!(sa.blocks.len(), 100);
    assert_eq!(sa.blocks[0].id, 1);
    assert_consecutive(&sa.blocks);
    assert_same(&sa.blocks, &sb.blocks);
    assert!(sa.blocks.iter().all(|b| b.key.len() <= 256 && !b.key.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_of_one_byte_in_a_thousand_loses_and_corrupts_nothing() {
    let sim = Simulator::start(fast_link(), None).unwrap();
    // Alice's line is noisy, Bob's is clean: Bob's copy is the reference.
    sim.set_noise(End::Alice, LineNoise { flip_rate: 0.0005, drop_rate: 0.0005 }).unwrap();
    let (mut a, mut b) = (open(&sim, End::Alice), open(&sim, End::Bob));
    let (sa, sb) = tokio::join!(
        collect(&mut a, 300, Duration::from_secs(120)),
        collect(&mut b, 300, Duration::from_secs(120))
    );
    assert_eq!(sa.blocks.len(), 300, "noisy end stalled at {} blocks", sa.blocks.len());
    assert_consecutive(&sa.blocks);
    assert_same(&sa.blocks, &sb.blocks);
    let status = sim.status();
    assert!(status.alice.bytes_flipped > 0 && status.alice.bytes_dropped > 0, "no noise was applied");
    assert!(a.stats().frame_errors > 0, "the host saw no damaged frames: {:?}", a.stats());
    assert!(status.alice.stats.retransmissions > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reboot_is_survived_without_restarting_the_host() {
    let mut config = fast_link();
    config.serial.reboot_downtime_ms = 500;
    let sim = Simulator::start(config, None).unwrap();
    let mut a = open(&sim, End::Alice);
    let first = collect(&mut a, 20, Duration::from_secs(30)).await;
    assert_eq!(first.blocks.len(), 20);
    sim.reboot(End::Alice);
    let second = collect(&mut a, 40, Duration::from_secs(60)).await;
    assert_eq!(second.blocks.len(), 40);
    let mut all = first.blocks;
    all.extend(second.blocks);
    assert_consecutive(&all);
    assert!(
        second.disconnects.iter().any(|r| r.contains("rebooted")),
        "no reboot reported: {:?}",
        second.disconnects
    );
    assert!(second.connects >= 1, "no new session after the reboot");
    assert_eq!(sim.status().alice.boot_count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_is_detected_and_rejoined() {
    let mut config = fast_link();
    // Longer than the host's dead-device interval (3.5 s by default).
    config.serial.reboot_downtime_ms = 5000;
    let sim = Simulator::start(config, None).unwrap();
    let mut a = open(&sim, End::Alice);
    assert_eq!(collect(&mut a, 5, Duration::from_secs(30)).await.blocks.len(), 5);
    sim.reboot(End::Alice);
    let after = collect(&mut a, 5, Duration::from_secs(30)).await;
    assert_eq!(after.blocks.len(), 5, "key delivery did not resume");
    assert!(
        after.disconnects.iter().any(|r| r.contains("stopped answering")),
        "silence not reported: {:?}",
        after.disconnects
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fibre_cut_stops_keys_raises_an_alarm_and_mending_it_resumes() {
    let sim = Simulator::start(fast_link(), None).unwrap();
    let mut a = open(&sim, End::Alice);
    assert_eq!(collect(&mut a, 5, Duration::from_secs(30)).await.blocks.len(), 5);
    // Blocks distilled before the cut may still be on their way (the serial line is slow, and
    // slower on a loaded machine); none may have been made after it.
    let cut_at = now_unix_ms();
    sim.set_fibre_cut(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (drained, during) = watch_after_fault(&mut a, cut_at, "through a cut fibre").await;
    let alarms: Vec<_> = drained.alarms.iter().chain(&during.alarms).copied().collect();
    assert!(alarms.contains(&(alarm_code::LOSS_OF_SIGNAL, true)), "{alarms:?}");
    assert!(during.states.contains(&LinkState::Down) || drained.states.contains(&LinkState::Down));
    assert_eq!(sim.status().link.state, LinkState::Down);
    sim.set_fibre_cut(false);
    let after = collect(&mut a, 3, Duration::from_secs(30)).await;
    assert_eq!(after.blocks.len(), 3);
    assert!(after.alarms.contains(&(alarm_code::LOSS_OF_SIGNAL, false)), "{:?}", after.alarms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eavesdropper_raises_the_qber_and_the_device_aborts() {
    let sim = Simulator::start(fast_link(), None).unwrap();
    let mut a = open(&sim, End::Alice);
    assert_eq!(collect(&mut a, 3, Duration::from_secs(30)).await.blocks.len(), 3);
    let eve_at = now_unix_ms();
    sim.set_eavesdropper(0.5).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (drained, during) = watch_after_fault(&mut a, eve_at, "while Eve intercepts half the pulses").await;
    let alarms: Vec<_> = drained.alarms.iter().chain(&during.alarms).copied().collect();
    assert!(alarms.contains(&(alarm_code::QBER_THRESHOLD, true)), "{alarms:?}");
    let status = sim.status();
    assert!(status.link.qber > 0.10, "QBER {} with Eve on half the pulses", status.link.qber);
    assert_eq!(status.link.state, LinkState::SecurityAbort);
    assert!(status.link.blocks_aborted > 0);
}
