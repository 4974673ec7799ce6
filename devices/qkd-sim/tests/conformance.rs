//! The conformance kit against real pseudo-terminals: the simulator's own device passes every
//! check; deliberately broken devices fail the checks they break, in bounded time.

use std::time::{Duration, Instant};

use qkd_serial_proto::frame::PROTOCOL_VERSION;
use qkd_serial_proto::{
    DeviceConfig, DeviceRole, DeviceSession, FrameDecoder, HelloAck, KeyBlock, LinkState, Message,
    MessageType, RawFrame, Telemetry,
};
use qkd_sim::conformance::{Check, ConformanceOptions, ConformanceReport, Outcome, run};
use qkd_sim::pty::Pty;
use qkd_sim::{End, SimConfig, Simulator};

/// A simulator that has key blocks within a second and resends after 300 ms.
fn fast_sim() -> Simulator {
    let mut config = SimConfig::default();
    config.physics.distance_km = 10.0;
    config.physics.pulse_rate_hz = 1e9;
    config.serial.retransmit_timeout_ms = Some(300);
    config.blocks.buffer_blocks = 1_000_000;
    config.telemetry_interval_s = 0.5;
    Simulator::start(config, None).expect("simulator starts")
}

fn sim_options(path: &str) -> ConformanceOptions {
    ConformanceOptions {
        timeout: Duration::from_millis(1000),
        quiet_period: Duration::from_millis(600),
        block_wait: Duration::from_secs(5),
        retransmit_wait: Duration::from_secs(3),
        telemetry_wait: Duration::from_secs(3),
        ..ConformanceOptions::new(path)
    }
}

/// Short waits for the broken devices, so failing checks fail fast.
fn quick_options(path: &std::path::Path) -> ConformanceOptions {
    ConformanceOptions {
        timeout: Duration::from_millis(300),
        quiet_period: Duration::from_millis(300),
        block_wait: Duration::from_millis(800),
        retransmit_wait: Duration::from_millis(800),
        telemetry_wait: Duration::from_millis(800),
        ..ConformanceOptions::new(path)
    }
}

fn outcome(report: &ConformanceReport, check: Check) -> Outcome {
    report.get(check).map(|c| c.outcome).expect("every check is in the report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_device_passes_every_check() {
    let sim = fast_sim();
    // Let the link distil a few blocks first, so "no block without credit" means something.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = run(sim_options(sim.pty_path(End::Alice))).await.expect("the kit runs");
    let table = report.to_table();
    println!("{table}");
    assert_eq!(report.checks.len(), 14, "{table}");
    assert!(report.all_passed(), "{table}");
    assert_eq!(report.passed, 14, "{table}");
    assert!(report.notes.is_empty(), "{table}");
    let info = report.device_info.as_ref().expect("device info");
    assert_eq!(info.device_id, "QSIM-A-0001");
    assert_eq!(info.role, "transmitter");
    // The JSON form has every check with its outcome.
    let json: serde_json::Value = serde_json::to_value(&report).expect("serialises");
    assert_eq!(json["checks"][3]["name"], "credit");
    assert_eq!(json["checks"][3]["outcome"], "PASS");
    // The receiver end passes too.
    let report = run(sim_options(sim.pty_path(End::Bob))).await.expect("the kit runs");
    assert!(report.all_passed(), "{}", report.to_table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_zero_and_prints_json() {
    let sim = fast_sim();
    let path = sim.pty_path(End::Alice).to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_qkd-sim"))
            .args(["conformance", "--device", &path, "--json", "--timeout-ms", "1000", "--quiet-ms", "600"])
            .args(["--block-wait-ms", "5000", "--retransmit-wait-ms", "3000", "--telemetry-wait-ms", "3000"])
            .output()
            .expect("qkd-sim runs")
    })
    .await
    .expect("joined");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(json["failed"], 0, "{stdout}");
    assert_eq!(json["passed"], 14, "{stdout}");
    assert_eq!(json["checks"].as_array().map(Vec::len), Some(14));
    assert_eq!(json["device_info"]["link_id"], "qkd-link-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_nonzero_against_a_silent_device() {
    let pty = Pty::open().expect("pty");
    let path = pty.path().display().to_string();
    let task = tokio::spawn(fake_device(pty, Fault::Silent));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_qkd-sim"))
            .args(["conformance", "--device", &path, "--timeout-ms", "300"])
            .output()
            .expect("qkd-sim runs")
    })
    .await
    .expect("joined");
    task.abort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(" 1  FAIL    handshake"), "{stdout}");
    assert!(stdout.contains("1 failed, 13 skipped"), "{stdout}");
}

#[test]
fn the_binary_exits_two_when_it_cannot_test() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qkd-sim"))
        .args(["conformance", "--device", "/nonexistent/ttyQKD0"])
        .output()
        .expect("qkd-sim runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot open serial port /nonexistent/ttyQKD0"), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// What the broken devices get wrong.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Reads everything, answers nothing.
    Silent,
    /// Sends line garbage without end and never a frame.
    Garbage,
    /// Answers HELLO with a HELLO_ACK carrying another nonce.
    WrongNonce,
    /// A working session, but key blocks flow without credit and are never resent.
    IgnoresCredit,
}

const FAKE_EPOCH: u32 = 0x0BAD_CAFE;

fn hello_ack(nonce: u64) -> Message {
    Message::HelloAck(HelloAck {
        host_nonce: nonce,
        protocol_version: 1,
        window: 4,
        max_key_len: 256,
        role: DeviceRole::Transmitter,
        device_id: "BROKEN-1".into(),
        link_id: "broken-link".into(),
        firmware: "0.0.1".into(),
    })
}

fn frame(epoch: u32, seq: u32, msg: &Message) -> Vec<u8> {
    RawFrame {
        version: PROTOCOL_VERSION,
        msg_type: msg.msg_type() as u8,
        epoch,
        seq,
        body: msg.encode_body(),
    }
    .to_wire()
}

/// A hand-written device on the master side of `pty` that gets one thing wrong.
async fn fake_device(pty: Pty, fault: Fault) {
    let mut buf = vec![0u8; 4096];
    let mut decoder = FrameDecoder::new();
    let mut session: Option<(u64, u32)> = None;
    let mut counter = 0u32;
    loop {
        if fault == Fault::Garbage {
            counter = counter.wrapping_add(1);
            let junk: Vec<u8> = (0..200u32)
                .map(|i| if (i + counter).is_multiple_of(97) { 0 } else { (i * 31 + counter) as u8 | 1 })
                .collect();
            if pty.write_all(&junk).await.is_err() {
                return;
            }
            tokio::select! {
                _ = pty.read(&mut buf) => {}
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
            continue;
        }
        let Ok(n) = pty.read(&mut buf).await else { return };
        if fault == Fault::Silent {
            continue;
        }
        let mut frames = Vec::new();
        decoder.push(&buf[..n], |f| frames.extend(f.ok()));
        let mut out = Vec::new();
        for f in frames {
            match Message::decode(f.msg_type, &f.body) {
                Ok(Message::Hello(h)) if fault == Fault::WrongNonce => {
                    out.extend(frame(FAKE_EPOCH, 0, &hello_ack(h.host_nonce ^ 1)));
                }
                Ok(Message::Hello(h)) if h.protocol_version >= 1 => {
                    let epoch = match session {
                        Some((nonce, epoch)) if nonce == h.host_nonce => epoch,
                        Some((_, epoch)) => epoch.wrapping_add(1),
                        None => FAKE_EPOCH,
                    };
                    let fresh = session.is_none_or(|(nonce, _)| nonce != h.host_nonce);
                    session = Some((h.host_nonce, epoch));
                    out.extend(frame(epoch, 0, &hello_ack(h.host_nonce)));
                    if fresh {
                        // Key blocks straight away: nobody granted credit for them.
                        for seq in 1..=3u32 {
                            let block =
                                KeyBlock::new(100 + u64::from(seq), 0, 20_000, 64, vec![seq as u8; 32]);
                            out.extend(frame(epoch, seq, &Message::KeyBlock(block)));
                        }
                    }
                }
                Ok(Message::Ping { nonce }) => {
                    if let Some((_, epoch)) = session {
                        out.extend(frame(epoch, 0, &Message::Pong { nonce }));
                    }
                }
                _ => {}
            }
        }
        if !out.is_empty() && pty.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn run_against(fault: Fault) -> (ConformanceReport, Duration) {
    let pty = Pty::open().expect("pty");
    let opts = quick_options(pty.path());
    let task = tokio::spawn(fake_device(pty, fault));
    let started = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(60), run(opts))
        .await
        .expect("the kit finishes in bounded time")
        .expect("the kit runs");
    task.abort();
    (report, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_fails_the_handshake_quickly() {
    let (report, took) = run_against(Fault::Silent).await;
    let table = report.to_table();
    assert_eq!(outcome(&report, Check::Handshake), Outcome::Fail, "{table}");
    let detail = &report.get(Check::Handshake).expect("handshake").detail;
    assert!(detail.contains("no HELLO_ACK within"), "{table}");
    assert!(detail.contains("no valid frame at all"), "{table}");
    assert_eq!((report.failed, report.skipped), (1, 13), "{table}");
    assert!(!report.all_passed());
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_sends_only_garbage_fails_without_hanging() {
    let (report, took) = run_against(Fault::Garbage).await;
    let table = report.to_table();
    assert_eq!(outcome(&report, Check::Handshake), Outcome::Fail, "{table}");
    assert!(report.get(Check::Handshake).expect("handshake").detail.contains("damaged frames"), "{table}");
    assert_eq!(report.failed, 1, "{table}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_nonce_fails_the_handshake() {
    let (report, _) = run_against(Fault::WrongNonce).await;
    let table = report.to_table();
    assert_eq!(outcome(&report, Check::Handshake), Outcome::Fail, "{table}");
    assert!(report.get(Check::Handshake).expect("handshake").detail.contains("echoed nonce"), "{table}");
    assert_eq!(outcome(&report, Check::Ping), Outcome::Skip, "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_ignores_credit_is_caught() {
    let (report, took) = run_against(Fault::IgnoresCredit).await;
    let table = report.to_table();
    println!("{table}");
    // What it does right passes...
    assert_eq!(outcome(&report, Check::Handshake), Outcome::Pass, "{table}");
    assert_eq!(outcome(&report, Check::HelloIdempotent), Outcome::Pass, "{table}");
    assert_eq!(outcome(&report, Check::Ping), Outcome::Pass, "{table}");
    // ...and what it gets wrong fails, with the reason.
    assert_eq!(outcome(&report, Check::Credit), Outcome::Fail, "{table}");
    assert!(report.get(Check::Credit).expect("credit").detail.contains("without any credit"), "{table}");
    assert_eq!(outcome(&report, Check::RetransmitTimeout), Outcome::Fail, "{table}");
    assert_eq!(outcome(&report, Check::UnknownType), Outcome::Fail, "{table}");
    assert_eq!(outcome(&report, Check::Telemetry), Outcome::Fail, "{table}");
    assert!(!report.all_passed());
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The reference device state machine (`DeviceSession`) on a pty, with 40 blocks ready;
/// frames of type `drop_type`, if given, never reach it.
async fn reference_device(pty: Pty, drop_type: Option<MessageType>) {
    let config = DeviceConfig {
        device_id: "REF-0001".into(),
        link_id: "ref-link".into(),
        firmware: "reference".into(),
        role: DeviceRole::Receiver,
        window: 4,
        max_key_len: 256,
        retransmit_timeout: Duration::from_millis(300),
        max_buffered_blocks: 100,
    };
    let mut device = DeviceSession::new(config, 1);
    for id in 1..=40u64 {
        let block = KeyBlock::new(5000 + id, unix_ms(), 25_000, 64, vec![id as u8; 200]);
        device.push_key_block(block).expect("room for 40 blocks");
    }
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 8192];
    let mut next_telemetry = Instant::now();
    loop {
        let now = Instant::now();
        device.handle_timeout(now);
        if now >= next_telemetry {
            next_telemetry = now + Duration::from_millis(400);
            device.send_telemetry(Telemetry {
                unix_ms: unix_ms(),
                link_state: LinkState::Up,
                qber_ppm: 25_000,
                raw_rate_mbps: 10_000_000,
                sifted_rate_mbps: 5_000_000,
                secret_rate_mbps: 1_000_000,
                channel_loss_cdb: 525,
                buffered_blocks: device.buffered_blocks() as u32,
            });
        }
        while let Some(bytes) = device.poll_transmit(now) {
            if pty.write_all(&bytes).await.is_err() {
                return;
            }
        }
        tokio::select! {
            read = pty.read(&mut buf) => {
                let Ok(n) = read else { return };
                let Some(drop) = drop_type else {
                    device.handle_bytes(Instant::now(), &buf[..n]);
                    continue;
                };
                let mut kept = Vec::new();
                decoder.push(&buf[..n], |f| {
                    if let Ok(f) = f && f.msg_type != drop as u8 {
                        f.encode_into(&mut kept);
                    }
                });
                device.handle_bytes(Instant::now(), &kept);
            }
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

async fn run_against_reference(drop_type: Option<MessageType>) -> ConformanceReport {
    let pty = Pty::open().expect("pty");
    let opts = ConformanceOptions {
        timeout: Duration::from_millis(500),
        quiet_period: Duration::from_millis(400),
        block_wait: Duration::from_secs(2),
        retransmit_wait: Duration::from_secs(2),
        telemetry_wait: Duration::from_secs(2),
        ..ConformanceOptions::new(pty.path())
    };
    let task = tokio::spawn(reference_device(pty, drop_type));
    let report = tokio::time::timeout(Duration::from_secs(60), run(opts))
        .await
        .expect("the kit finishes in bounded time")
        .expect("the kit runs");
    task.abort();
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_state_machine_passes_every_check() {
    let report = run_against_reference(None).await;
    let table = report.to_table();
    println!("{table}");
    assert!(report.all_passed(), "{table}");
    assert_eq!(report.passed, 14, "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_ignores_nak_fails_only_the_nak_check() {
    let report = run_against_reference(Some(MessageType::Nak)).await;
    let table = report.to_table();
    println!("{table}");
    assert_eq!(outcome(&report, Check::Nak), Outcome::Fail, "{table}");
    // Its timer resends from the oldest frame, not from the NAKed one.
    assert!(report.get(Check::Nak).expect("nak").detail.contains("NAK ignored?"), "{table}");
    assert_eq!((report.passed, report.failed), (13, 1), "{table}");
}
