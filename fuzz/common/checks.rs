// The checks behind the fuzz targets, shared by two users:
//
// - the cargo-fuzz targets in `fuzz/fuzz_targets/` (libFuzzer, sanitizers, needs
//   RUSTC_BOOTSTRAP=1 or nightly), and
// - the stable test `devices/serial-proto/tests/fuzz_corpus.rs`, which replays the seed corpus
//   and ~20,000 pseudo-random inputs on every CI run.
//
// Both `include!` this file inside a `mod checks { ... }`, so it must stay a plain list of items
// that needs nothing but `std` and `qkd_serial_proto` (no libfuzzer-sys, no rand): that is what
// lets CI run the very same assertions on stable without the fuzzing toolchain. It has no `//!`
// comments because an included file cannot carry inner attributes.
//
// Each check panics (and so fails the fuzz run or the test) when the code under test breaks a
// property; inputs that are merely invalid must be handled without panicking.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use qkd_serial_proto::frame::{MAX_BODY_LEN, MAX_ENCODED_LEN, PROTOCOL_VERSION};
use qkd_serial_proto::{
    Alarm, DeviceConfig, DeviceRole, DeviceSession, ErrorReport, FrameDecoder, FrameError, Hello, HelloAck,
    HostConfig, HostEvent, HostSession, KeyBlock, LinkState, Message, RawFrame, Severity, Telemetry, cobs,
};

/// Upper bound on operations per session input, so one input cannot run for long.
pub const MAX_OPS: usize = 4096;

/// How far a session program got: sessions opened and key blocks delivered (host), or
/// HELLO_ACKs and distinct key blocks sent (device). The fuzz targets ignore it; the replay test uses it to make sure the seeds still
/// reach deep states after the harness changes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reached {
    pub sessions: u32,
    pub blocks: u32,
}

/// Reads fuzz input as a stream of small values; past the end it yields zeros, so every input
/// is a valid program for the session harnesses.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }
    pub fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    pub fn u16(&mut self) -> u16 {
        u16::from(self.byte()) << 8 | u16::from(self.byte())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) << 16 | u32::from(self.u16())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) << 32 | u64::from(self.u32())
    }
    pub fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }
    /// A short printable string (texts and identifiers must be UTF-8 to encode).
    pub fn text(&mut self, max: usize) -> String {
        let n = usize::from(self.byte()) % (max + 1);
        self.take(n).iter().map(|b| char::from(b' ' + b % 95)).collect()
    }
}

/// A small deterministic generator (xorshift64*) for chunk sizes, so the checks need no crate.
struct Chunker(u64);

impl Chunker {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    fn next(&mut self, max: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        1 + (r % max as u64) as usize
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn count_zeros(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == 0).count()
}

/// Feeds `bytes` to a fresh decoder in the given chunk sizes and returns everything it reported.
fn decode_chunked(bytes: &[u8], mut chunk: impl FnMut() -> usize) -> Vec<Result<RawFrame, FrameError>> {
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (c, tail) = rest.split_at(chunk().min(rest.len()));
        dec.push(c, |r| out.push(r));
        // The decoder holds at most one stuffed frame, whatever the input.
        assert!(dec.pending_len() <= MAX_ENCODED_LEN, "decoder holds {} bytes", dec.pending_len());
        rest = tail;
    }
    out
}

/// What must hold for every frame a decoder accepts, and for the message in it.
fn check_accepted_frame(frame: &RawFrame) {
    assert_eq!(frame.version, PROTOCOL_VERSION);
    assert!(frame.body.len() <= MAX_BODY_LEN);
    // Re-encoding gives a frame that decodes to the same frame, alone.
    let wire = frame.to_wire();
    assert!(wire.len() <= MAX_ENCODED_LEN + 1);
    assert_eq!(wire.last(), Some(&0));
    assert!(!wire[..wire.len() - 1].contains(&0), "zero inside a stuffed frame");
    let mut again = Vec::new();
    FrameDecoder::new().push(&wire, |r| again.push(r));
    assert_eq!(again, vec![Ok(frame.clone())], "frame does not survive re-encoding");

    if let Ok(msg) = Message::decode(frame.msg_type, &frame.body) {
        assert_eq!(msg.msg_type() as u8, frame.msg_type);
        let body = msg.encode_body();
        // Every message has exactly one encoding: the decoder is strict, so re-encoding a
        // decoded body must give the same bytes (and therefore the same message).
        assert_eq!(body, frame.body, "{:?} body is not canonical", msg.msg_type());
        assert_eq!(Message::decode(frame.msg_type, &body).as_ref(), Ok(&msg));
    }
}

/// Target `frame_decoder`: arbitrary bytes, in three chunkings, through [`FrameDecoder`] and
/// `Message::decode`. No panic; the same results whatever the chunking; at most one result per
/// delimiter (plus one oversize report); accepted frames and messages round-trip.
pub fn frame_decoder(data: &[u8]) {
    let whole = decode_chunked(data, || usize::MAX);
    assert!(whole.len() <= count_zeros(data) + 1, "more results than delimiters");
    let bytewise = decode_chunked(data, || 1);
    assert_eq!(bytewise, whole, "results depend on chunking (1-byte chunks)");
    let mut chunker = Chunker::new(fnv1a(data));
    let max = 1 + data.first().map_or(0, |&b| usize::from(b));
    let random = decode_chunked(data, || chunker.next(max));
    assert_eq!(random, whole, "results depend on chunking (random chunks up to {max})");
    for frame in whole.iter().flatten() {
        check_accepted_frame(frame);
    }
    // COBS itself: any byte string round-trips and never contains the delimiter.
    let mut enc = Vec::new();
    cobs::encode_into(data, &mut enc);
    assert!(!enc.contains(&0));
    assert!(enc.len() <= cobs::max_encoded_len(data.len()));
    let mut dec = Vec::new();
    cobs::decode_into(&enc, &mut dec).expect("own encoding decodes");
    assert_eq!(dec, data);
}

// ---------------------------------------------------------------------------------------------
// Session harnesses. The input is a program: each operation is chosen by one byte and reads its
// arguments from the following bytes. Besides raw line bytes, operations build well-formed
// frames (valid CRC) in the session's current epoch with plausible sequence numbers, because a
// fuzzer cannot guess a CRC-32C, a random epoch or a 64-bit nonce: without them it would never
// get past the handshake.

fn wire(msg_type: u8, epoch: u32, seq: u32, body: Vec<u8>) -> Vec<u8> {
    RawFrame { version: PROTOCOL_VERSION, msg_type, epoch, seq, body }.to_wire()
}

fn message_wire(msg: &Message, epoch: u32, seq: u32) -> Vec<u8> {
    wire(msg.msg_type() as u8, epoch, seq, msg.encode_body())
}

/// Damages a frame the way a line does: flip, drop, truncate or duplicate bytes.
fn mutate(inp: &mut Input, mut bytes: Vec<u8>) -> Vec<u8> {
    let at = usize::from(inp.u16()) % bytes.len().max(1);
    match inp.byte() % 4 {
        0 => {
            if let Some(b) = bytes.get_mut(at) {
                *b ^= 1 << (inp.byte() % 8);
            }
        }
        1 => {
            if at < bytes.len() {
                bytes.remove(at);
            }
        }
        2 => bytes.truncate(at),
        _ => {
            let tail = bytes[at..].to_vec();
            bytes.extend_from_slice(&tail);
        }
    }
    bytes
}

/// A message of any type, with field values drawn from the input. `seq_base` steers ACK and NAK
/// values near the sequence numbers in use; `nonce` is the nonce a HELLO_ACK should echo.
fn any_message(inp: &mut Input, seq_base: u32, nonce: u64, next_block_id: &mut u64) -> Message {
    let near = |inp: &mut Input| seq_base.wrapping_add(u32::from(inp.byte() % 8)).wrapping_sub(2);
    match inp.byte() % 12 {
        0 => Message::Hello(Hello {
            protocol_version: u16::from(inp.byte() % 3),
            host_nonce: u64::from(inp.byte() % 4),
            max_body_len: inp.u16(),
        }),
        1 => Message::HelloAck(HelloAck {
            host_nonce: if inp.flag() { nonce } else { inp.u64() },
            protocol_version: 1,
            window: inp.byte(),
            max_key_len: inp.u16(),
            role: if inp.flag() { DeviceRole::Receiver } else { DeviceRole::Transmitter },
            device_id: inp.text(12),
            link_id: inp.text(12),
            firmware: inp.text(8),
        }),
        2 => Message::Announce { boot_count: inp.u32() },
        3 => Message::Credit { block_limit: u32::from(inp.byte()) },
        4 => Message::Ack { next_seq: near(inp) },
        5 => Message::Nak { from_seq: near(inp) },
        6 => {
            // Mostly the next block, sometimes a repeat or a jump, sometimes a bad check value.
            let id = match inp.byte() % 8 {
                0 => next_block_id.saturating_sub(1),
                1 => *next_block_id + u64::from(inp.byte()),
                _ => *next_block_id,
            };
            *next_block_id = (*next_block_id).max(id + 1);
            let len = 1 + usize::from(inp.byte() % 64);
            let key = inp.take(len).to_vec();
            let key = if key.is_empty() { vec![0x42] } else { key };
            let mut block = KeyBlock::new(id, inp.u64(), inp.u32() % 1_000_001, inp.u16(), key);
            if inp.byte().is_multiple_of(16) {
                block.kcv[0] ^= 1;
            }
            Message::KeyBlock(block)
        }
        7 => Message::Telemetry(Telemetry {
            unix_ms: inp.u64(),
            link_state: [
                LinkState::Down,
                LinkState::Aligning,
                LinkState::Up,
                LinkState::SecurityAbort,
                LinkState::Fault,
            ][usize::from(inp.byte() % 5)],
            qber_ppm: inp.u32() % 1_000_001,
            raw_rate_mbps: inp.u64(),
            sifted_rate_mbps: inp.u64(),
            secret_rate_mbps: inp.u64(),
            channel_loss_cdb: inp.u32(),
            buffered_blocks: inp.u32(),
        }),
        8 => Message::Alarm(any_alarm(inp)),
        9 => Message::Ping { nonce: inp.u64() },
        10 => Message::Pong { nonce: inp.u64() },
        _ => Message::Error(ErrorReport { code: u16::from(inp.byte() % 7), text: inp.text(16) }),
    }
}

fn any_alarm(inp: &mut Input) -> Alarm {
    Alarm {
        code: if inp.flag() { u16::from(inp.byte() % 6) } else { inp.u16() },
        severity: [Severity::Info, Severity::Warning, Severity::Critical][usize::from(inp.byte() % 3)],
        raised: inp.flag(),
        text: inp.text(24),
    }
}

/// Epoch for a built frame: usually the session's, sometimes 0 or a stale one.
fn pick_epoch(inp: &mut Input, current: u32) -> u32 {
    match inp.byte() % 8 {
        0 => 0,
        1 => current ^ 1,
        2 => inp.u32(),
        _ => current,
    }
}

/// Decodes every frame a session emitted; a session must never put a damaged frame or an
/// undecodable message on the line.
fn decode_output(bytes: &[u8]) -> Vec<(RawFrame, Message)> {
    let mut out = Vec::new();
    FrameDecoder::new().push(bytes, |r| {
        let frame = r.expect("a session emitted a bad frame");
        let msg = Message::decode(frame.msg_type, &frame.body).expect("a session emitted a bad body");
        out.push((frame, msg));
    });
    out
}

/// Target `host_session`: a [`HostSession`] fed by an input program (see the ops below) with
/// simulated time. Asserts: no panic; every emitted frame decodes, carries sequence number 0
/// (hosts send nothing reliable) and HELLO goes out with epoch 0; each operation adds a bounded
/// number of frames and events (at most two per frame fed, plus a few for timers), so nothing
/// piles up; key blocks are delivered only with a matching check value and with strictly
/// increasing block IDs (exactly once, in order); a session is never up with epoch 0.
pub fn host_session(data: &[u8]) -> Reached {
    let mut inp = Input::new(data);
    let start = Instant::now();
    let mut now = start;
    let mut host = HostSession::with_seed(HostConfig::default(), now, fnv1a(data.get(..8).unwrap_or(data)));
    let mut hello_nonce = 0u64;
    let mut expect_seq = 1u32;
    let mut next_block_id = 1u64;
    let mut last_delivered: Option<u64> = None;
    let mut requested = 0u64;
    let mut reached = Reached::default();

    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        let epoch = host.device_info().map_or(0, |i| i.epoch);
        // Frames this operation feeds, to bound what the host may answer.
        let mut fed: Vec<u8> = Vec::new();
        match inp.byte() % 12 {
            0 => {
                // Raw line bytes.
                let n = usize::from(inp.byte());
                fed = inp.take(n).to_vec();
            }
            1 => {
                // A long run without delimiter (oversize handling), then maybe a delimiter.
                fed = vec![inp.byte() | 1; 64 * usize::from(inp.byte() % 80)];
                if inp.flag() {
                    fed.push(0);
                }
            }
            2 => {
                now += Duration::from_millis(u64::from(inp.u16() % 5000));
                host.handle_timeout(now);
            }
            3 => host.handle_timeout(now),
            4 => {
                let n = u32::from(inp.byte());
                requested += u64::from(n);
                host.request_blocks(n);
            }
            5 | 6 => {
                // The device's answer to the last HELLO (what opens a session).
                let ack = HelloAck {
                    host_nonce: hello_nonce,
                    protocol_version: 1,
                    window: 1 + inp.byte() % 16,
                    max_key_len: 1024,
                    role: DeviceRole::Receiver,
                    device_id: inp.text(8),
                    link_id: "fuzz".into(),
                    firmware: "0".into(),
                };
                let new_epoch =
                    if inp.flag() { 0x0101_0101u32.wrapping_mul(u32::from(inp.byte())) } else { inp.u32() };
                fed = message_wire(&Message::HelloAck(ack), new_epoch, 0);
            }
            7 | 8 => {
                // A well-formed frame, usually in the session, with a plausible sequence number.
                let msg = any_message(&mut inp, expect_seq, hello_nonce, &mut next_block_id);
                let seq = if msg.msg_type().is_reliable() {
                    match inp.byte() % 8 {
                        0 => expect_seq.wrapping_sub(1),
                        1 => expect_seq.wrapping_add(1),
                        2 => 0,
                        _ => expect_seq,
                    }
                } else {
                    0
                };
                fed = message_wire(&msg, pick_epoch(&mut inp, epoch), seq);
            }
            9 => {
                let msg = any_message(&mut inp, expect_seq, hello_nonce, &mut next_block_id);
                let bytes = message_wire(&msg, pick_epoch(&mut inp, epoch), expect_seq);
                fed = mutate(&mut inp, bytes);
            }
            10 => {
                // Valid CRC, arbitrary type and body: the message decoder's error paths in session.
                let msg_type = inp.byte();
                let n = usize::from(inp.byte());
                let body = inp.take(n).to_vec();
                fed = wire(msg_type, pick_epoch(&mut inp, epoch), u32::from(inp.byte() % 4), body);
            }
            _ => host.resume_after(u64::from(inp.byte())),
        }
        if !fed.is_empty() {
            // Split in two, as a serial read would.
            let cut = usize::from(inp.u16()) % (fed.len() + 1);
            host.handle_bytes(now, &fed[..cut]);
            host.handle_bytes(now, &fed[cut..]);
        }
        let fed_frames = if fed.is_empty() { 0 } else { count_zeros(&fed) + 1 };
        let bound = 2 * fed_frames + 4;

        // Drain what the host wants to send, as its I/O loop would.
        let mut frames = 0;
        let mut out = Vec::new();
        while let Some(bytes) = host.poll_transmit() {
            frames += 1;
            out.extend_from_slice(&bytes);
        }
        assert!(frames <= bound, "host queued {frames} frames after feeding {fed_frames}");
        if host.device_info().map_or(0, |i| i.epoch) != epoch {
            // A new session (or none): reliable frames start again from 1.
            expect_seq = 1;
        }
        for (frame, msg) in decode_output(&out) {
            assert_eq!(frame.seq, 0, "host sent a sequenced {msg:?}");
            match msg {
                Message::Hello(h) => {
                    assert_eq!(frame.epoch, 0, "HELLO outside epoch 0");
                    hello_nonce = h.host_nonce;
                }
                Message::Ack { next_seq } | Message::Nak { from_seq: next_seq }
                    if frame.epoch == host.device_info().map_or(0, |i| i.epoch) =>
                {
                    expect_seq = next_seq;
                }
                _ => {}
            }
        }

        let mut events = 0;
        while let Some(event) = host.poll_event() {
            events += 1;
            match event {
                HostEvent::KeyBlock(block) => {
                    assert!(block.kcv_matches(), "block {} delivered with a bad check value", block.block_id);
                    assert!(
                        last_delivered.is_none_or(|last| block.block_id > last),
                        "block {} delivered after {last_delivered:?}",
                        block.block_id
                    );
                    last_delivered = Some(block.block_id);
                    reached.blocks += 1;
                }
                HostEvent::SessionUp(info) => {
                    assert_ne!(info.epoch, 0, "session up with epoch 0");
                    reached.sessions += 1;
                }
                _ => {}
            }
        }
        assert!(events <= bound, "host queued {events} events after feeding {fed_frames} frames");
        assert!(u64::from(host.outstanding_request()) <= requested);
    }
    reached
}

/// Target `device_session`: a [`DeviceSession`] fed by an input program with simulated time,
/// key blocks and alarms pushed in between, the line polled only when the program says so.
/// Asserts: no panic; every emitted frame decodes; reliable frames (KEY_BLOCK, ALARM) carry the
/// current epoch and a sequence number from 1, unreliable ones 0, ANNOUNCE epoch 0; key blocks
/// go out unchanged and with a valid check value; a retransmission repeats the same block
/// under the same sequence number; the device never sends more distinct key blocks in an
/// epoch than the highest CREDIT it was given for that epoch, nor a frame beyond the window
/// above the highest ACK/NAK; each operation adds a bounded number of frames; the key buffer
/// never exceeds its capacity.
pub fn device_session(data: &[u8]) -> Reached {
    const WINDOW: u8 = 4;
    const CAPACITY: usize = 16;
    let mut inp = Input::new(data);
    let start = Instant::now();
    let mut now = start;
    let config = DeviceConfig {
        device_id: "FUZZ-1".into(),
        link_id: "fuzz".into(),
        firmware: "0".into(),
        role: DeviceRole::Transmitter,
        window: WINDOW,
        max_key_len: 64,
        retransmit_timeout: Duration::from_millis(300),
        max_buffered_blocks: CAPACITY,
    };
    let mut device = DeviceSession::with_seed(config, 1, fnv1a(data.get(..8).unwrap_or(data)));
    // A decoder that sees exactly what the device's decoder sees, to know which CREDIT, ACK and
    // NAK values reached it (however they were built).
    let mut shadow = FrameDecoder::new();
    let mut max_credit: BTreeMap<u32, u32> = BTreeMap::new();
    let mut max_ack: BTreeMap<u32, u32> = BTreeMap::new();
    let mut sent_blocks: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    let mut pushed: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut next_block_id = 1u64;
    let mut highest_seq = 0u32;
    let mut nonces: BTreeSet<u64> = BTreeSet::new();
    // Frames the device may have queued since the line was last polled (see the bound below).
    let mut since_poll = 0usize;
    let mut reached = Reached::default();

    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        let epoch = device.epoch();
        let mut fed: Vec<u8> = Vec::new();
        let mut poll = false;
        match inp.byte() % 13 {
            0 => {
                let n = usize::from(inp.byte());
                fed = inp.take(n).to_vec();
            }
            1 => {
                fed = vec![inp.byte() | 1; 64 * usize::from(inp.byte() % 80)];
                if inp.flag() {
                    fed.push(0);
                }
            }
            2 => {
                now += Duration::from_millis(u64::from(inp.u16() % 2000));
                device.handle_timeout(now);
            }
            3 => {
                let id = next_block_id;
                next_block_id += 1;
                let len = 1 + usize::from(inp.byte() % 64);
                let key: Vec<u8> =
                    (0..len).map(|i| (id as u8).wrapping_mul(31).wrapping_add(i as u8)).collect();
                if device
                    .push_key_block(KeyBlock::new(id, inp.u64(), inp.u32() % 1_000_001, 64, key.clone()))
                    .is_ok()
                {
                    pushed.insert(id, key);
                }
            }
            4 => device.push_alarm(any_alarm(&mut inp)),
            5 => device.send_telemetry(Telemetry {
                unix_ms: inp.u64(),
                link_state: LinkState::Up,
                qber_ppm: inp.u32() % 1_000_001,
                raw_rate_mbps: inp.u64(),
                sifted_rate_mbps: inp.u64(),
                secret_rate_mbps: inp.u64(),
                channel_loss_cdb: inp.u32(),
                buffered_blocks: inp.u32(),
            }),
            6 => {
                // HELLO from a small set of nonces, so repeats (idempotence) and new sessions mix.
                let nonce = u64::from(inp.byte() % 4);
                let hello = Hello {
                    protocol_version: u16::from(inp.byte() % 3),
                    host_nonce: nonce,
                    max_body_len: 4096,
                };
                fed = message_wire(&Message::Hello(hello), 0, 0);
            }
            7 | 8 => {
                // Host traffic in the session: CREDIT, ACK, NAK and PING most of the time.
                let msg = match inp.byte() % 6 {
                    0 => Message::Credit { block_limit: u32::from(inp.byte() % 32) },
                    1 | 2 => Message::Ack {
                        next_seq: highest_seq.wrapping_add(2).wrapping_sub(u32::from(inp.byte() % 4)),
                    },
                    3 => Message::Nak {
                        from_seq: highest_seq.wrapping_add(1).wrapping_sub(u32::from(inp.byte() % 4)),
                    },
                    4 => Message::Ping { nonce: inp.u64() },
                    _ => any_message(&mut inp, highest_seq, 0, &mut 1),
                };
                fed = message_wire(&msg, pick_epoch(&mut inp, epoch), 0);
            }
            9 => {
                let msg = any_message(&mut inp, highest_seq, 0, &mut 1);
                let bytes = message_wire(&msg, pick_epoch(&mut inp, epoch), u32::from(inp.byte() % 3));
                fed = mutate(&mut inp, bytes);
            }
            10 => {
                let msg_type = inp.byte();
                let n = usize::from(inp.byte());
                let body = inp.take(n).to_vec();
                fed = wire(msg_type, pick_epoch(&mut inp, epoch), 0, body);
            }
            11 => {
                device.reboot();
                shadow = FrameDecoder::new();
            }
            _ => poll = true,
        }
        if !fed.is_empty() {
            let cut = usize::from(inp.u16()) % (fed.len() + 1);
            for part in [&fed[..cut], &fed[cut..]] {
                device.handle_bytes(now, part);
                shadow.push(part, |r| {
                    let Ok(f) = r else { return };
                    match Message::decode(f.msg_type, &f.body) {
                        Ok(Message::Credit { block_limit }) => {
                            let c = max_credit.entry(f.epoch).or_default();
                            *c = (*c).max(block_limit);
                        }
                        Ok(Message::Ack { next_seq: s } | Message::Nak { from_seq: s }) => {
                            let a = max_ack.entry(f.epoch).or_insert(1);
                            *a = (*a).max(s);
                        }
                        Ok(Message::Hello(h)) => {
                            nonces.insert(h.host_nonce);
                        }
                        _ => {}
                    }
                });
            }
        }
        let fed_frames = if fed.is_empty() { 0 } else { count_zeros(&fed) + 1 };
        // Control answers are at most one per frame fed, plus one for the operation itself
        // (telemetry, the ANNOUNCE after a reboot); they wait in the device until the line is
        // polled, so the bound accumulates until then.
        since_poll += fed_frames + 1;
        if device.epoch() != epoch {
            highest_seq = 0;
        }
        if !poll {
            assert!(device.buffered_blocks() <= CAPACITY, "buffer holds {} blocks", device.buffered_blocks());
            continue;
        }
        // The line is idle: take everything the device wants to send now. Besides the queued
        // control answers that is at most one window of reliable frames (new or retransmitted).
        let bound = since_poll + usize::from(WINDOW);
        since_poll = 0;
        let mut out = Vec::new();
        let mut frames = 0;
        while let Some(bytes) = device.poll_transmit(now) {
            frames += 1;
            out.extend_from_slice(&bytes);
            assert!(frames <= bound, "device emitted more than {bound} frames at one poll");
        }
        let epoch = device.epoch();
        for (frame, msg) in decode_output(&out) {
            let t = msg.msg_type();
            if t.is_reliable() {
                assert_ne!(frame.seq, 0, "reliable {t:?} without sequence number");
                assert_eq!(frame.epoch, epoch, "reliable {t:?} outside the session epoch");
                assert_ne!(epoch, 0, "reliable {t:?} without a session");
                let acked = max_ack.get(&epoch).copied().unwrap_or(1);
                assert!(
                    u64::from(frame.seq) < u64::from(acked) + u64::from(WINDOW),
                    "seq {} beyond the window above ACK {acked}",
                    frame.seq
                );
                highest_seq = highest_seq.max(frame.seq);
            } else {
                assert_eq!(frame.seq, 0, "unreliable {t:?} with a sequence number");
            }
            match msg {
                Message::KeyBlock(block) => {
                    assert!(
                        block.kcv_matches(),
                        "device sent block {} with a bad check value",
                        block.block_id
                    );
                    assert_eq!(
                        pushed.get(&block.block_id),
                        Some(&*block.key),
                        "block {} altered",
                        block.block_id
                    );
                    let prev = sent_blocks.insert((frame.epoch, frame.seq), block.block_id);
                    if prev.is_none() {
                        reached.blocks += 1;
                    }
                    assert!(
                        prev.is_none_or(|p| p == block.block_id),
                        "seq {} reused for another block",
                        frame.seq
                    );
                    let distinct = sent_blocks.range((frame.epoch, 0)..=(frame.epoch, u32::MAX)).count();
                    let credit = max_credit.get(&frame.epoch).copied().unwrap_or(0);
                    assert!(
                        distinct as u64 <= u64::from(credit),
                        "{distinct} blocks sent in epoch with credit {credit}"
                    );
                }
                Message::Announce { .. } => assert_eq!(frame.epoch, 0, "ANNOUNCE inside a session"),
                Message::HelloAck(ack) => {
                    // Not necessarily the current epoch: an answer queued before a later HELLO
                    // opened another session goes out late, and the host ignores it by nonce.
                    assert_ne!(frame.epoch, 0, "HELLO_ACK with epoch 0");
                    assert!(nonces.contains(&ack.host_nonce), "HELLO_ACK for a nonce never sent");
                    reached.sessions += 1;
                }
                _ => {}
            }
        }
        assert!(device.buffered_blocks() <= CAPACITY, "buffer holds {} blocks", device.buffered_blocks());
    }
    reached
}
