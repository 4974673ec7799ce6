//! The host side of a session: what kmd runs against a device.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::frame::{FrameDecoder, FrameError, MAX_BODY_LEN, PROTOCOL_VERSION, RawFrame};
use crate::message::{
    Alarm, BodyError, DeviceRole, ErrorReport, Hello, HelloAck, KeyBlock, Message, MessageType, Telemetry,
    error_code,
};
use crate::stats::SessionStats;

/// Timing of the host side. The defaults suit both a 115200-baud UART and a fast pty.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// How often HELLO is repeated while no HELLO_ACK has come.
    pub hello_interval: Duration,
    /// How often the host pings (and refreshes its credit) in a session.
    pub ping_interval: Duration,
    /// Silence after which the device is considered gone and the host re-handshakes.
    pub dead_after: Duration,
    /// Least time between two NAKs for the same sequence number.
    pub nak_holdoff: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            hello_interval: Duration::from_millis(500),
            ping_interval: Duration::from_millis(1000),
            dead_after: Duration::from_millis(3500),
            nak_holdoff: Duration::from_millis(100),
        }
    }
}

/// What the device said about itself when the session opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device serial number or identifier.
    pub device_id: String,
    /// QKD link identifier, the same at both ends.
    pub link_id: String,
    /// Firmware version.
    pub firmware: String,
    /// Transmitter or receiver.
    pub role: DeviceRole,
    /// The device's send window.
    pub window: u8,
    /// Largest key block the device sends, in bytes.
    pub max_key_len: u16,
    /// The session epoch.
    pub epoch: u32,
}

impl DeviceInfo {
    fn from_ack(ack: &HelloAck, epoch: u32) -> Self {
        Self {
            device_id: ack.device_id.clone(),
            link_id: ack.link_id.clone(),
            firmware: ack.firmware.clone(),
            role: ack.role,
            window: ack.window,
            max_key_len: ack.max_key_len,
            epoch,
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionLoss {
    /// No valid frame from the device within `dead_after`.
    DeviceSilent,
    /// The device announced that it rebooted.
    DeviceRebooted,
    /// The device said it has no session with our epoch.
    NoSession,
    /// The host renewed the session because its sequence numbers were half used up.
    Renewed,
}

/// Past this sequence number the host opens a new session (new epoch, sequence numbers from 1).
pub const RENEW_AFTER_SEQ: u32 = 1 << 31;

/// A frame or block the host threw away, for logs and metrics. The session recovers by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Line damage or a framing fault.
    Frame(FrameError),
    /// A well-framed message whose body is malformed or whose type is unknown.
    Body(BodyError),
    /// A key block whose key does not match its check value.
    KcvMismatch {
        /// The block's identifier.
        block_id: u64,
    },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Frame(e) => write!(f, "frame dropped: {e}"),
            Self::Body(e) => write!(f, "message dropped: {e}"),
            Self::KcvMismatch { block_id } => {
                write!(f, "key block {block_id} dropped: key does not match its check value")
            }
        }
    }
}

/// What the host session reports to its owner.
#[derive(Debug)]
pub enum HostEvent {
    /// A session with the device is open.
    SessionUp(DeviceInfo),
    /// The session ended; the host is re-handshaking.
    SessionLost(SessionLoss),
    /// A verified key block, delivered exactly once and in order.
    KeyBlock(KeyBlock),
    /// Link telemetry.
    Telemetry(Telemetry),
    /// An alarm raised or cleared.
    Alarm(Alarm),
    /// The device reported an error.
    DeviceError(ErrorReport),
    /// Something was dropped (already recovered from).
    Rejected(Rejection),
}

enum State {
    Handshaking { nonce: u64, next_hello_at: Instant },
    Established { epoch: u32, nonce: u64, info: DeviceInfo },
}

/// The host's half of the protocol, free of I/O: feed it bytes and time, take out bytes and events.
pub struct HostSession {
    config: HostConfig,
    state: State,
    decoder: FrameDecoder,
    outbox: VecDeque<Vec<u8>>,
    events: VecDeque<HostEvent>,
    rng: StdRng,
    /// Next reliable sequence number expected in this epoch.
    next_seq: u32,
    /// KEY_BLOCK frames accepted in order in this epoch (what the device counts against credit).
    blocks_in_epoch: u32,
    /// Blocks the owner asked for and has not received yet.
    wanted: u32,
    last_block_id: Option<u64>,
    last_rx: Instant,
    next_ping_at: Instant,
    last_nak: Option<(u32, Instant)>,
    ack_due: bool,
    stats: SessionStats,
}

impl HostSession {
    /// A session that starts handshaking at `now`.
    pub fn new(config: HostConfig, now: Instant) -> Self {
        Self::with_rng(config, now, rand::make_rng())
    }

    /// As [`HostSession::new`] with a seeded random source (for reproducible tests).
    pub fn with_seed(config: HostConfig, now: Instant, seed: u64) -> Self {
        Self::with_rng(config, now, StdRng::seed_from_u64(seed))
    }

    fn with_rng(config: HostConfig, now: Instant, rng: StdRng) -> Self {
        let mut s = Self {
            state: State::Handshaking { nonce: 0, next_hello_at: now },
            config,
            decoder: FrameDecoder::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            rng,
            next_seq: 1,
            blocks_in_epoch: 0,
            wanted: 0,
            last_block_id: None,
            last_rx: now,
            next_ping_at: now,
            last_nak: None,
            ack_due: false,
            stats: SessionStats::default(),
        };
        s.start_handshake(now);
        s
    }

    /// Blocks with identifiers at or below `block_id` are duplicates (e.g. already stored before
    /// a host restart) and will not be delivered again.
    pub fn resume_after(&mut self, block_id: u64) {
        self.last_block_id = Some(block_id);
    }

    /// Asks the device for `n` more key blocks.
    pub fn request_blocks(&mut self, n: u32) {
        self.wanted = self.wanted.saturating_add(n);
        if matches!(self.state, State::Established { .. }) {
            self.send_credit();
        }
    }

    /// Blocks requested and not yet delivered.
    pub fn outstanding_request(&self) -> u32 {
        self.wanted
    }

    /// The device, while a session is open.
    pub fn device_info(&self) -> Option<&DeviceInfo> {
        match &self.state {
            State::Established { info, .. } => Some(info),
            State::Handshaking { .. } => None,
        }
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Next event for the owner.
    pub fn poll_event(&mut self) -> Option<HostEvent> {
        self.events.pop_front()
    }

    /// Next bytes to write to the line.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.outbox.pop_front()
    }

    /// When [`HostSession::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Instant {
        match &self.state {
            State::Handshaking { next_hello_at, .. } => *next_hello_at,
            State::Established { .. } => self.next_ping_at.min(self.last_rx + self.config.dead_after),
        }
    }

    /// Runs timers: HELLO retries, pings, credit refresh and the dead-device check.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Handshaking { nonce, next_hello_at } => {
                if now >= *next_hello_at {
                    let nonce = *nonce;
                    *next_hello_at = now + self.config.hello_interval;
                    self.send_hello(nonce);
                }
            }
            State::Established { .. } => {
                if now >= self.last_rx + self.config.dead_after {
                    self.lose_session(SessionLoss::DeviceSilent, now);
                } else if now >= self.next_ping_at {
                    self.next_ping_at = now + self.config.ping_interval;
                    let nonce = self.rng.next_u64();
                    self.send(&Message::Ping { nonce });
                    // Credit frames can be lost on the line; repeating the absolute limit is harmless.
                    self.send_credit();
                }
            }
        }
    }

    /// Feeds bytes read from the line.
    pub fn handle_bytes(&mut self, now: Instant, bytes: &[u8]) {
        let mut frames = Vec::new();
        self.decoder.push(bytes, |f| frames.push(f));
        for frame in frames {
            match frame {
                Ok(frame) => self.handle_frame(now, frame),
                Err(e) => {
                    self.stats.frame_errors += 1;
                    self.events.push_back(HostEvent::Rejected(Rejection::Frame(e)));
                    self.nak(now);
                }
            }
        }
        if self.ack_due {
            self.ack_due = false;
            self.send(&Message::Ack { next_seq: self.next_seq });
        }
    }

    fn handle_frame(&mut self, now: Instant, frame: RawFrame) {
        let msg = match Message::decode(frame.msg_type, &frame.body) {
            Ok(m) => m,
            Err(e) => {
                self.stats.body_errors += 1;
                self.send_error(frame.epoch, e.error_code(), &e.to_string());
                self.events.push_back(HostEvent::Rejected(Rejection::Body(e)));
                if MessageType::from_code(frame.msg_type).is_some_and(MessageType::is_reliable) {
                    self.nak(now);
                }
                return;
            }
        };
        self.stats.frames_received += 1;
        match (&self.state, msg) {
            (_, Message::Announce { .. }) => {
                self.stats.announces += 1;
                match self.state {
                    State::Established { .. } => self.lose_session(SessionLoss::DeviceRebooted, now),
                    State::Handshaking { ref mut next_hello_at, .. } => *next_hello_at = now,
                }
                self.handle_timeout(now);
            }
            (State::Handshaking { nonce, .. }, Message::HelloAck(ack)) => {
                if ack.host_nonce != *nonce || frame.epoch == 0 {
                    self.stats.stale_frames += 1;
                    return;
                }
                let info = DeviceInfo::from_ack(&ack, frame.epoch);
                self.state =
                    State::Established { epoch: frame.epoch, nonce: ack.host_nonce, info: info.clone() };
                self.next_seq = 1;
                self.blocks_in_epoch = 0;
                self.last_rx = now;
                self.next_ping_at = now + self.config.ping_interval;
                self.last_nak = None;
                self.stats.sessions_opened += 1;
                self.events.push_back(HostEvent::SessionUp(info));
                self.send_credit();
            }
            (State::Handshaking { .. }, _) => self.stats.stale_frames += 1,
            (State::Established { epoch, nonce, .. }, msg) => {
                let (epoch, nonce) = (*epoch, *nonce);
                if let Message::Error(e) = &msg
                    && e.code == error_code::NO_SESSION
                    && frame.epoch == epoch
                {
                    self.events.push_back(HostEvent::DeviceError(e.clone()));
                    self.lose_session(SessionLoss::NoSession, now);
                    self.handle_timeout(now);
                    return;
                }
                if frame.epoch != epoch {
                    self.stats.stale_frames += 1;
                    return;
                }
                self.last_rx = now;
                self.handle_in_session(now, frame.seq, nonce, msg);
            }
        }
    }

    fn handle_in_session(&mut self, now: Instant, seq: u32, nonce: u64, msg: Message) {
        let msg_type = msg.msg_type();
        if msg_type.is_reliable() {
            if seq == 0 {
                self.stats.body_errors += 1;
                return;
            }
            if seq < self.next_seq {
                // Our ACK was lost and the device resent: acknowledge again.
                self.stats.duplicate_frames += 1;
                self.ack_due = true;
                return;
            }
            if seq > self.next_seq {
                self.stats.out_of_order_frames += 1;
                self.nak(now);
                return;
            }
        }
        match msg {
            Message::KeyBlock(block) => {
                if !block.kcv_matches() {
                    self.stats.kcv_mismatches += 1;
                    self.events
                        .push_back(HostEvent::Rejected(Rejection::KcvMismatch { block_id: block.block_id }));
                    self.nak(now);
                    return;
                }
                self.next_seq += 1;
                self.blocks_in_epoch += 1;
                self.ack_due = true;
                if self.last_block_id.is_some_and(|last| block.block_id <= last) {
                    // Resent after a reboot or re-handshake; the owner already has it. It used
                    // up credit, so raise the limit now rather than at the next ping.
                    self.stats.duplicate_blocks += 1;
                    self.send_credit();
                    return;
                }
                self.last_block_id = Some(block.block_id);
                self.wanted = self.wanted.saturating_sub(1);
                self.stats.blocks_delivered += 1;
                self.stats.key_bytes_delivered += block.key.len() as u64;
                self.events.push_back(HostEvent::KeyBlock(block));
                self.renew_if_worn(now);
            }
            Message::Alarm(alarm) => {
                self.next_seq += 1;
                self.ack_due = true;
                self.events.push_back(HostEvent::Alarm(alarm));
            }
            Message::Telemetry(t) => self.events.push_back(HostEvent::Telemetry(t)),
            Message::Ping { nonce } => self.send(&Message::Pong { nonce }),
            Message::Pong { .. } => {}
            Message::Error(e) => self.events.push_back(HostEvent::DeviceError(e)),
            Message::HelloAck(ack) if ack.host_nonce == nonce => {} // repeat of the one we took
            other => {
                let text = format!("{:?} is not sent by a device", other.msg_type());
                let epoch = self.current_epoch();
                self.send_error(epoch, error_code::UNEXPECTED, &text);
            }
        }
    }

    fn renew_if_worn(&mut self, now: Instant) {
        if self.next_seq >= RENEW_AFTER_SEQ {
            self.send(&Message::Ack { next_seq: self.next_seq });
            self.lose_session(SessionLoss::Renewed, now);
            self.handle_timeout(now);
        }
    }

    fn current_epoch(&self) -> u32 {
        match &self.state {
            State::Established { epoch, .. } => *epoch,
            State::Handshaking { .. } => 0,
        }
    }

    fn lose_session(&mut self, why: SessionLoss, now: Instant) {
        // An ACK still pending belongs to the old epoch; sent now it would only draw an error.
        self.ack_due = false;
        self.stats.sessions_lost += 1;
        self.events.push_back(HostEvent::SessionLost(why));
        self.start_handshake(now);
    }

    fn start_handshake(&mut self, now: Instant) {
        let nonce = self.rng.next_u64();
        self.state = State::Handshaking { nonce, next_hello_at: now };
        self.decoder = FrameDecoder::new();
    }

    fn send_hello(&mut self, nonce: u64) {
        let hello = Message::Hello(Hello {
            protocol_version: u16::from(PROTOCOL_VERSION),
            host_nonce: nonce,
            max_body_len: MAX_BODY_LEN as u16,
        });
        self.send(&hello);
    }

    fn send_credit(&mut self) {
        let block_limit = self.blocks_in_epoch.saturating_add(self.wanted);
        self.send(&Message::Credit { block_limit });
    }

    fn nak(&mut self, now: Instant) {
        if !matches!(self.state, State::Established { .. }) {
            return;
        }
        if let Some((seq, at)) = self.last_nak
            && seq == self.next_seq
            && now < at + self.config.nak_holdoff
        {
            return;
        }
        self.last_nak = Some((self.next_seq, now));
        self.stats.naks_sent += 1;
        self.send(&Message::Nak { from_seq: self.next_seq });
    }

    fn send_error(&mut self, epoch: u32, code: u16, text: &str) {
        let msg = Message::Error(ErrorReport { code, text: text.to_string() });
        self.send_with_epoch(epoch, &msg);
    }

    fn send(&mut self, msg: &Message) {
        let epoch = self.current_epoch();
        self.send_with_epoch(epoch, msg);
    }

    fn send_with_epoch(&mut self, epoch: u32, msg: &Message) {
        let frame = RawFrame {
            version: PROTOCOL_VERSION,
            msg_type: msg.msg_type() as u8,
            epoch,
            seq: 0,
            body: msg.encode_body(),
        };
        self.stats.frames_sent += 1;
        self.outbox.push_back(frame.to_wire());
    }
}
