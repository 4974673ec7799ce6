//! The fuzz targets' checks on stable Rust, on every CI run.
//!
//! cargo-fuzz needs sanitizer flags that stable CI does not build with, so the properties the
//! fuzz targets assert live in `fuzz/common/checks.rs` and are `include!`d both by the targets
//! and by this test. Here they run over
//!
//! - every file of the committed seed corpus `fuzz/seeds/<target>/` (which includes the wire
//!   bytes of the specification's test vectors, and any crash reproducer worth keeping), and
//! - about 20,000 deterministic pseudo-random inputs: damaged frames (bit flips, truncation,
//!   extension, two frames spliced, bytes dropped) for the decoder, and random programs for the
//!   host and device session harnesses.
//!
//! `QKD_WRITE_SEEDS=1 cargo test -p qkd-serial-proto --test fuzz_corpus -- write_seeds` rewrites
//! the generated part of the seed corpus (see [`write_seeds_when_asked`]).

use std::path::{Path, PathBuf};

use qkd_serial_proto::frame::MAX_BODY_LEN;
use qkd_serial_proto::{
    Alarm, DeviceRole, ErrorReport, Hello, HelloAck, KeyBlock, LinkState, Message, RawFrame, Severity,
    Telemetry,
};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

mod checks {
    include!("../../../fuzz/common/checks.rs");
}

const TARGETS: [&str; 3] = ["frame_decoder", "host_session", "device_session"];

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds")
}

fn run(target: &str, data: &[u8]) -> checks::Reached {
    match target {
        "frame_decoder" => {
            checks::frame_decoder(data);
            checks::Reached::default()
        }
        "host_session" => checks::host_session(data),
        "device_session" => checks::device_session(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// Runs one input and names it if a check fails, so a failure here is reproducible with
/// `cargo fuzz run <target> <file>` after writing the input out.
fn run_named(target: &str, name: &str, data: &[u8]) -> checks::Reached {
    match std::panic::catch_unwind(|| run(target, data)) {
        Ok(reached) => reached,
        Err(panic) => {
            eprintln!("{target} failed on {name}: {}", hex::encode(data));
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn seed_corpus_replays_cleanly() {
    for target in TARGETS {
        let dir = seeds_dir().join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        // Seeds must not silently vanish.
        assert!(files.len() >= 10, "{target}: only {} seeds", files.len());
        for file in files {
            let data = std::fs::read(&file).unwrap();
            run_named(target, &file.display().to_string(), &data);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Valid frames and ways to damage them.

fn sample_messages(rng: &mut StdRng) -> Vec<Message> {
    let key_len = rng.random_range(1..=600);
    let mut key = vec![0u8; key_len];
    rng.fill_bytes(&mut key);
    vec![
        Message::Hello(Hello { protocol_version: 1, host_nonce: rng.random(), max_body_len: 4096 }),
        Message::HelloAck(HelloAck {
            host_nonce: rng.random(),
            protocol_version: 1,
            window: rng.random_range(1..=16),
            max_key_len: 1024,
            role: DeviceRole::Transmitter,
            device_id: "QX-1".into(),
            link_id: "link".into(),
            firmware: "1.0".into(),
        }),
        Message::Announce { boot_count: rng.random() },
        Message::Credit { block_limit: rng.random_range(0..100) },
        Message::Ack { next_seq: rng.random_range(0..100) },
        Message::Nak { from_seq: rng.random_range(0..100) },
        Message::KeyBlock(KeyBlock::new(
            rng.random(),
            rng.random(),
            rng.random_range(0..=1_000_000),
            64,
            key,
        )),
        Message::Telemetry(Telemetry {
            unix_ms: rng.random(),
            link_state: LinkState::Aligning,
            qber_ppm: rng.random_range(0..=1_000_000),
            raw_rate_mbps: rng.random(),
            sifted_rate_mbps: rng.random(),
            secret_rate_mbps: rng.random(),
            channel_loss_cdb: rng.random(),
            buffered_blocks: rng.random(),
        }),
        Message::Alarm(Alarm {
            code: 0x8000,
            severity: Severity::Info,
            raised: true,
            text: "ünïcode ✓".into(),
        }),
        Message::Ping { nonce: rng.random() },
        Message::Pong { nonce: 0 },
        Message::Error(ErrorReport { code: 4, text: "x".repeat(rng.random_range(0..300)) }),
    ]
}

fn valid_frame(rng: &mut StdRng) -> Vec<u8> {
    let msgs = sample_messages(rng);
    let msg = &msgs[rng.random_range(0..msgs.len())];
    let seq = if msg.msg_type().is_reliable() { rng.random_range(1..10) } else { 0 };
    let epoch = if rng.random_bool(0.2) { 0 } else { rng.random() };
    RawFrame { version: 1, msg_type: msg.msg_type() as u8, epoch, seq, body: msg.encode_body() }.to_wire()
}

/// A damaged or combined stream of frames, as a bad line or a hostile peer might produce.
fn hostile_stream(rng: &mut StdRng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.random_range(1..4) {
        let mut f = valid_frame(rng);
        match rng.random_range(0..8) {
            0 => {} // intact
            1 => {
                let i = rng.random_range(0..f.len());
                f[i] ^= 1 << rng.random_range(0..8);
            }
            2 => f.truncate(rng.random_range(0..f.len())),
            3 => {
                let n = rng.random_range(1..64);
                f.extend((0..n).map(|_| rng.random::<u8>()));
            }
            4 => {
                // Splice: the head of this frame, the tail of another.
                let g = valid_frame(rng);
                let cut_f = rng.random_range(0..f.len());
                let cut_g = rng.random_range(0..g.len());
                f.truncate(cut_f);
                f.extend_from_slice(&g[cut_g..]);
            }
            5 => {
                let i = rng.random_range(0..f.len());
                f.remove(i);
            }
            6 => {
                let i = rng.random_range(0..f.len());
                f.insert(i, 0);
            }
            _ => {
                // Pure noise, sometimes long enough to overflow the decoder.
                let n = if rng.random_bool(0.1) { MAX_BODY_LEN + 100 } else { rng.random_range(0..40) };
                f = (0..n).map(|_| rng.random_range(1..=255u8)).collect();
            }
        }
        out.extend_from_slice(&f);
    }
    out
}

#[test]
fn hostile_frames_through_the_decoder() {
    let mut rng = StdRng::seed_from_u64(0xF0_22);
    for i in 0..8_000 {
        let data = hostile_stream(&mut rng);
        run_named("frame_decoder", &format!("case {i}"), &data);
    }
}

/// Random bytes appended to a program: an operation with random arguments, or line noise and
/// damaged frames as a raw-bytes operation (operation 0: length byte, bytes, split point).
fn random_tail(rng: &mut StdRng, out: &mut Vec<u8>) {
    if rng.random_bool(0.5) {
        let f = hostile_stream(rng);
        let f = &f[..f.len().min(255)];
        out.push(0);
        out.push(f.len() as u8);
        out.extend_from_slice(f);
        out.extend_from_slice(&rng.random::<u16>().to_be_bytes());
    } else {
        out.extend((0..rng.random_range(1..12)).map(|_| rng.random::<u8>()));
    }
}

/// Flips a few bytes of a program, so arguments and operations get values the builders never use.
fn perturb(rng: &mut StdRng, mut program: Vec<u8>) -> Vec<u8> {
    if !program.is_empty() && rng.random_bool(0.3) {
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..program.len());
            program[i] = rng.random();
        }
    }
    program
}

/// A random host program: mostly meaningful steps (handshake, blocks, alarms, timers) mixed
/// with random operations and hostile bytes, so that many programs get deep into a session.
fn random_host_program(rng: &mut StdRng) -> Vec<u8> {
    let mut p = HostProgram::default();
    if rng.random_bool(0.8) {
        p = p.session();
    }
    for _ in 0..rng.random_range(1..24) {
        p = match rng.random_range(0..10) {
            0 => p.timeout(),
            1 => p.advance(rng.random_range(0..4000)),
            2 => p.request(rng.random()),
            3 => p.hello_ack(rng.random()),
            4 | 5 => p.key_block(rng.random_range(1..=64), rng.random_bool(0.1)),
            6 => p.alarm(),
            7 => p.unreliable(9, &rng.random::<u64>().to_be_bytes()),
            8 => p.garbage_run(),
            _ => {
                random_tail(rng, &mut p.0);
                p
            }
        };
    }
    perturb(rng, p.0)
}

/// A random device program, built the same way.
fn random_device_program(rng: &mut StdRng) -> Vec<u8> {
    let mut p = DeviceProgram::default();
    if rng.random_bool(0.8) {
        p = p.session_with_blocks(rng.random_range(1..6));
    }
    for _ in 0..rng.random_range(1..24) {
        p = match rng.random_range(0..12) {
            0 | 1 => p.poll(),
            2 => p.advance(rng.random_range(0..1000)),
            3 => p.push_block(rng.random_range(1..=64)),
            4 => p.alarm(),
            5 => p.telemetry(),
            6 => p.hello(rng.random_range(0..4)),
            7 => p.host(0, rng.random_range(0..32)),
            8 => p.host(1, rng.random_range(0..4)),
            9 => p.host(3, rng.random_range(0..4)),
            10 => p.reboot(),
            _ => {
                random_tail(rng, &mut p.0);
                p
            }
        };
    }
    perturb(rng, p.0)
}

#[test]
fn random_host_session_programs() {
    let mut rng = StdRng::seed_from_u64(0x4057);
    let (mut with_session, mut with_blocks) = (0, 0);
    for i in 0..6_000 {
        let data = random_host_program(&mut rng);
        let reached = run_named("host_session", &format!("case {i}"), &data);
        with_session += usize::from(reached.sessions > 0);
        with_blocks += usize::from(reached.blocks > 0);
    }
    eprintln!("host: {with_session} programs opened a session, {with_blocks} moved key blocks");
    // Random programs must get past the handshake often enough to test the session itself.
    assert!(
        with_session >= 3_000 && with_blocks >= 1_500,
        "{with_session} sessions, {with_blocks} with blocks"
    );
}

#[test]
fn random_device_session_programs() {
    let mut rng = StdRng::seed_from_u64(0xDE71CE);
    let (mut with_session, mut with_blocks) = (0, 0);
    for i in 0..6_000 {
        let data = random_device_program(&mut rng);
        let reached = run_named("device_session", &format!("case {i}"), &data);
        with_session += usize::from(reached.sessions > 0);
        with_blocks += usize::from(reached.blocks > 0);
    }
    eprintln!("device: {with_session} programs opened a session, {with_blocks} moved key blocks");
    // Random programs must get past the handshake often enough to test the session itself.
    assert!(
        with_session >= 3_000 && with_blocks >= 1_500,
        "{with_session} sessions, {with_blocks} with blocks"
    );
}

// ---------------------------------------------------------------------------------------------
// The generated seed corpus. Session seeds are programs for the harnesses in checks.rs: they
// follow its operation layout (first byte of an operation picks it, arguments follow), so a
// change of that layout makes them less useful, never invalid. Regenerate them when it changes.

/// Builds programs for the host harness.
#[derive(Default)]
struct HostProgram(Vec<u8>);

impl HostProgram {
    fn timeout(mut self) -> Self {
        self.0.push(3);
        self
    }
    fn advance(mut self, ms: u16) -> Self {
        self.0.push(2);
        self.0.extend_from_slice(&ms.to_be_bytes());
        self
    }
    fn request(mut self, n: u8) -> Self {
        self.0.extend_from_slice(&[4, n]);
        self
    }
    /// HELLO_ACK echoing the last HELLO, window 8, empty device ID, the given epoch.
    fn hello_ack(mut self, epoch: u32) -> Self {
        self.0.extend_from_slice(&[5, 7, 0, 0]);
        self.0.extend_from_slice(&epoch.to_be_bytes());
        self.0.extend_from_slice(&[0, 0]);
        self
    }
    /// KEY_BLOCK with the next block ID and the expected sequence number, in the session.
    fn key_block(mut self, key_len: u8, corrupt: bool) -> Self {
        self.0.extend_from_slice(&[7, 6, 2, key_len - 1]);
        self.0.extend((0..key_len).map(|i| i.wrapping_mul(7)));
        self.0.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
        self.0.extend_from_slice(&21_000u32.to_be_bytes());
        self.0.extend_from_slice(&64u16.to_be_bytes());
        self.0.push(if corrupt { 0 } else { 1 });
        self.0.extend_from_slice(&[3, 3, 0, 0]); // seq: expected; epoch: current; no split
        self
    }
    /// ALARM in the session with the expected sequence number.
    fn alarm(mut self) -> Self {
        self.0.extend_from_slice(&[7, 8, 1, 2, 2, 1, 4, b'h', b'o', b't', b'!', 3, 3, 0, 0]);
        self
    }
    /// An unreliable message (`kind` is the message selector of checks.rs) in the session.
    fn unreliable(mut self, kind: u8, args: &[u8]) -> Self {
        self.0.extend_from_slice(&[7, kind]);
        self.0.extend_from_slice(args);
        self.0.extend_from_slice(&[3, 0, 0]);
        self
    }
    fn raw(mut self, bytes: &[u8]) -> Self {
        for chunk in bytes.chunks(255) {
            self.0.extend_from_slice(&[0, chunk.len() as u8]);
            self.0.extend_from_slice(chunk);
            self.0.extend_from_slice(&[0, 0]);
        }
        self
    }
    fn garbage_run(mut self) -> Self {
        self.0.extend_from_slice(&[1, 0x55, 70, 1, 0, 0]);
        self
    }
    fn session(self) -> Self {
        self.timeout().hello_ack(0x5A17_C0DE).request(10)
    }
}

/// Builds programs for the device harness.
#[derive(Default)]
struct DeviceProgram(Vec<u8>);

impl DeviceProgram {
    fn hello(mut self, nonce: u8) -> Self {
        self.0.extend_from_slice(&[6, nonce, 1, 0, 0]);
        self
    }
    fn poll(mut self) -> Self {
        self.0.push(12);
        self
    }
    fn advance(mut self, ms: u16) -> Self {
        self.0.push(2);
        self.0.extend_from_slice(&ms.to_be_bytes());
        self
    }
    fn push_block(mut self, key_len: u8) -> Self {
        self.0.extend_from_slice(&[3, key_len - 1]);
        self.0.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
        self.0.extend_from_slice(&21_000u32.to_be_bytes());
        self
    }
    fn alarm(mut self) -> Self {
        self.0.extend_from_slice(&[4, 1, 3, 2, 1, 3, b'l', b'o', b's']);
        self
    }
    fn telemetry(mut self) -> Self {
        self.0.push(5);
        self.0.extend_from_slice(&[1; 44]);
        self
    }
    /// PING from the host in the current epoch.
    fn ping(mut self) -> Self {
        self.0.extend_from_slice(&[7, 4, 1, 2, 3, 4, 5, 6, 7, 8, 3, 0, 0]);
        self
    }
    /// Host traffic in the current epoch: selector 0 CREDIT (`arg` blocks), 1 ACK (`arg` 1 is
    /// the highest sequence number sent + 1, i.e. everything), 3 NAK (`arg` 0 from the highest
    /// sent, 3 from three below it).
    fn host(mut self, selector: u8, arg: u8) -> Self {
        self.0.extend_from_slice(&[7, selector, arg, 3, 0, 0]);
        self
    }
    fn reboot(mut self) -> Self {
        self.0.push(11);
        self
    }
    fn raw(mut self, bytes: &[u8]) -> Self {
        for chunk in bytes.chunks(255) {
            self.0.extend_from_slice(&[0, chunk.len() as u8]);
            self.0.extend_from_slice(chunk);
            self.0.extend_from_slice(&[0, 0]);
        }
        self
    }
    fn session_with_blocks(self, n: u8) -> Self {
        let mut p = self.hello(1).poll();
        for _ in 0..n {
            p = p.push_block(32);
        }
        p.host(0, n).poll()
    }
}

/// The `wire:` bytes of every vector in the specification (the `xx*n` run shorthand expanded).
fn spec_wires() -> Vec<(String, Vec<u8>)> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/serial-protocol.md"))
            .expect("the specification");
    let mut out = Vec::new();
    let mut name = String::new();
    let mut wire: Option<String> = None;
    for line in doc.lines() {
        if let Some(n) = line.strip_prefix("vector: ") {
            name = n.trim().to_string();
        } else if let Some(w) = line.strip_prefix("wire: ") {
            wire = Some(w.to_string());
        } else if let Some(w) = wire.as_mut().filter(|_| line.starts_with("  ")) {
            w.push(' ');
            w.push_str(line.trim());
        } else if let Some(w) = wire.take() {
            let mut bytes = Vec::new();
            for token in w.split_whitespace() {
                let (b, n) = token.split_once('*').map_or((token, 1), |(b, n)| (b, n.parse().unwrap()));
                bytes.extend(std::iter::repeat_n(u8::from_str_radix(b, 16).unwrap(), n));
            }
            out.push((name.clone(), bytes));
        }
    }
    out
}

fn generated_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let wires = spec_wires();
    assert!(wires.len() >= 20, "too few vectors in the specification");
    for (name, wire) in &wires {
        seeds.push(("frame_decoder", format!("spec-{name}"), wire.clone()));
    }
    // All message vectors back to back, one stream.
    let stream: Vec<u8> = wires
        .iter()
        .filter(|(n, w)| w.len() < 1000 && !n.starts_with("corrupt"))
        .flat_map(|(_, w)| w.clone())
        .collect();
    seeds.push(("frame_decoder", "spec-all-in-one-stream".into(), stream));

    let device_to_host = [
        "hello-ack",
        "announce",
        "key-block-32",
        "telemetry",
        "alarm-raised",
        "pong",
        "error-no-session",
        "corrupt-bit-flip",
        "noise-then-frame",
    ];
    for name in device_to_host {
        let wire = &wires.iter().find(|(n, _)| n == name).unwrap().1;
        seeds.push(("host_session", format!("spec-{name}"), HostProgram::default().session().raw(wire).0));
    }
    let host = |p: HostProgram| p.0;
    seeds.push(("host_session", "handshake".into(), host(HostProgram::default().session())));
    seeds.push((
        "host_session",
        "three-blocks".into(),
        host(HostProgram::default().session().key_block(32, false).key_block(32, false).key_block(64, false)),
    ));
    seeds.push((
        "host_session",
        "bad-kcv-then-good".into(),
        host(HostProgram::default().session().key_block(16, true).key_block(16, false)),
    ));
    seeds.push((
        "host_session",
        "alarm-between-blocks".into(),
        host(HostProgram::default().session().key_block(16, false).alarm().key_block(16, false)),
    ));
    seeds.push((
        "host_session",
        "ping-and-telemetry".into(),
        host(HostProgram::default().session().unreliable(9, &[1; 8]).unreliable(7, &[2; 45])),
    ));
    seeds.push((
        "host_session",
        "device-goes-silent".into(),
        host(HostProgram::default().session().advance(1500).advance(1500).advance(1500).timeout()),
    ));
    seeds.push((
        "host_session",
        "no-session-error".into(),
        host(HostProgram::default().session().unreliable(11, &[1, 0])),
    ));
    seeds.push((
        "host_session",
        "announce-mid-session".into(),
        host(
            HostProgram::default()
                .session()
                .key_block(8, false)
                .unreliable(2, &[0, 0, 0, 9])
                .hello_ack(0x1234_5678)
                .key_block(8, false),
        ),
    ));
    seeds.push((
        "host_session",
        "garbage-run".into(),
        host(HostProgram::default().session().garbage_run().key_block(8, false)),
    ));

    let host_to_device =
        ["hello", "credit", "ack", "nak", "ping", "ping-zero-body", "corrupt-dropped-byte", "unknown-type"];
    for name in host_to_device {
        let wire = &wires.iter().find(|(n, _)| n == name).unwrap().1;
        seeds.push((
            "device_session",
            format!("spec-{name}"),
            DeviceProgram::default().session_with_blocks(2).raw(wire).poll().0,
        ));
    }
    let dev = |p: DeviceProgram| p.0;
    seeds.push(("device_session", "handshake".into(), dev(DeviceProgram::default().hello(1).poll())));
    seeds.push((
        "device_session",
        "blocks-acked".into(),
        dev(DeviceProgram::default().session_with_blocks(5).host(1, 1).poll().host(1, 1).poll()),
    ));
    seeds.push((
        "device_session",
        "nak-rewind".into(),
        dev(DeviceProgram::default().session_with_blocks(4).host(3, 3).poll()),
    ));
    seeds.push((
        "device_session",
        "timeout-retransmit".into(),
        dev(DeviceProgram::default().session_with_blocks(3).advance(400).poll()),
    ));
    seeds.push((
        "device_session",
        "alarm-overtakes".into(),
        dev(DeviceProgram::default().session_with_blocks(3).alarm().poll()),
    ));
    seeds.push((
        "device_session",
        "reboot-resends".into(),
        dev(DeviceProgram::default()
            .session_with_blocks(3)
            .reboot()
            .poll()
            .hello(2)
            .poll()
            .host(0, 3)
            .poll()),
    ));
    seeds.push((
        "device_session",
        "new-hello-requeues".into(),
        dev(DeviceProgram::default().session_with_blocks(3).hello(2).poll().host(0, 3).poll()),
    ));
    seeds.push((
        "device_session",
        "repeated-hello".into(),
        dev(DeviceProgram::default().hello(1).poll().hello(1).poll()),
    ));
    seeds.push((
        "device_session",
        "telemetry-and-ping".into(),
        dev(DeviceProgram::default().hello(1).poll().telemetry().ping().poll()),
    ));
    seeds.push((
        "device_session",
        "stale-epoch".into(),
        dev(DeviceProgram::default().hello(1).poll().reboot().poll().host(0, 3).poll()),
    ));
    seeds
}

/// What a generated session seed must at least reach (sessions, blocks), so that a change of
/// the harness's operation layout that turns the seeds into noise is noticed.
fn seed_must_reach(target: &str, name: &str) -> (u32, u32) {
    match (target, name) {
        ("frame_decoder", _) => (0, 0),
        ("host_session", "three-blocks") => (1, 3),
        (
            "host_session",
            "bad-kcv-then-good" | "alarm-between-blocks" | "garbage-run" | "spec-key-block-32",
        ) => (1, 1),
        ("host_session", "announce-mid-session") => (2, 2),
        ("device_session", "blocks-acked") => (1, 5),
        ("device_session", "reboot-resends" | "new-hello-requeues") => (2, 6),
        ("device_session", "nak-rewind" | "timeout-retransmit" | "alarm-overtakes") => (1, 3),
        (_, n) if n.starts_with("spec-") && target == "device_session" => (1, 2),
        _ => (1, 0),
    }
}

#[test]
fn generated_seeds_pass_the_checks_and_reach_deep_states() {
    for (target, name, data) in generated_seeds() {
        let reached = run_named(target, &name, &data);
        let (sessions, blocks) = seed_must_reach(target, &name);
        assert!(
            reached.sessions >= sessions && reached.blocks >= blocks,
            "{target} seed {name} reached {reached:?}, needs {sessions} sessions and {blocks} blocks"
        );
    }
}

#[test]
fn write_seeds_when_asked() {
    // Not a check: rewrites fuzz/seeds/<target>/<name> when QKD_WRITE_SEEDS=1 is set. Files
    // not written by the generator (crash reproducers kept as regression seeds) are left alone.
    if std::env::var_os("QKD_WRITE_SEEDS").is_none() {
        return;
    }
    for (target, name, data) in generated_seeds() {
        let dir = seeds_dir().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Defects found while writing the harnesses, kept as regression tests: a device must refuse
// blocks the host can never accept (an empty or over-long key, a QBER above 100 %, a KCV that does
// not match, an identifier that does not increase), since one such block would be retransmitted
// forever and stall every block queued behind it.

/// Blocks the host can never accept, or that break the protocol's rules for the device.
fn undeliverable_blocks() -> Vec<(&'static str, KeyBlock)> {
    let mut bad_kcv = KeyBlock::new(1, 0, 0, 64, vec![1; 8]);
    bad_kcv.kcv[0] ^= 1;
    vec![
        ("empty key", KeyBlock::new(1, 0, 0, 64, Vec::new())),
        ("qber above 1,000,000 ppm", KeyBlock::new(1, 0, 2_000_000, 64, vec![1; 8])),
        ("KCV does not match", bad_kcv),
        ("key longer than the announced max_key_len", KeyBlock::new(1, 0, 0, 64, vec![1; 100])),
        ("key longer than a frame holds", KeyBlock::new(1, 0, 0, 64, vec![1; 5000])),
    ]
}

fn small_device() -> qkd_serial_proto::DeviceSession {
    let config = qkd_serial_proto::DeviceConfig {
        device_id: "D".into(),
        link_id: "L".into(),
        firmware: "1".into(),
        role: DeviceRole::Transmitter,
        window: 4,
        max_key_len: 64,
        retransmit_timeout: std::time::Duration::from_millis(300),
        max_buffered_blocks: 16,
    };
    qkd_serial_proto::DeviceSession::with_seed(config, 1, 2)
}

#[test]
fn device_refuses_blocks_the_host_cannot_accept() {
    for (what, block) in undeliverable_blocks() {
        assert!(small_device().push_key_block(block).is_err(), "accepted a block with {what}");
    }
    // Block IDs must increase: the host silently drops a lower one as a duplicate, so the two
    // ends of the link would disagree about which keys exist.
    let mut device = small_device();
    device.push_key_block(KeyBlock::new(5, 0, 0, 64, vec![1; 8])).unwrap();
    assert!(device.push_key_block(KeyBlock::new(3, 0, 0, 64, vec![1; 8])).is_err(), "accepted ID 3 after 5");
}

#[test]
fn one_bad_block_does_not_stall_the_link() {
    use qkd_serial_proto::{HostConfig, HostEvent, HostSession};
    use std::time::{Duration, Instant};
    for (what, bad) in undeliverable_blocks() {
        let start = Instant::now();
        let mut host = HostSession::with_seed(HostConfig::default(), start, 1);
        let mut device = small_device();
        let _ = device.push_key_block(bad); // refused once fixed
        device.push_key_block(KeyBlock::new(2, 0, 0, 64, vec![7; 32])).unwrap();
        host.request_blocks(2);
        let mut got = Vec::new();
        for ms in (0..20_000).step_by(50) {
            let now = start + Duration::from_millis(ms);
            host.handle_timeout(now);
            device.handle_timeout(now);
            while let Some(b) = host.poll_transmit() {
                device.handle_bytes(now, &b);
            }
            while let Some(b) = device.poll_transmit(now) {
                host.handle_bytes(now, &b);
            }
            while let Some(e) = host.poll_event() {
                if let HostEvent::KeyBlock(k) = e {
                    got.push(k.block_id);
                }
            }
        }
        assert!(got.contains(&2), "block 2 never arrived behind a block with {what}");
    }
}
