//! The device side of a session: what firmware (or `qkd-sim`) runs.
//!
//! Written for clarity rather than for a microcontroller, but it allocates only per frame and
//! keeps bounded state, so it doubles as a reference for vendors porting the protocol.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::frame::{FrameDecoder, PROTOCOL_VERSION, RawFrame};
use crate::message::{Alarm, DeviceRole, ErrorReport, HelloAck, KeyBlock, Message, Telemetry, error_code};
use crate::stats::SessionStats;

/// How a device presents itself and paces its sending.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Serial number.
    pub device_id: String,
    /// QKD link identifier (the same at both ends).
    pub link_id: String,
    /// Firmware version string.
    pub firmware: String,
    /// Transmitter or receiver.
    pub role: DeviceRole,
    /// Reliable frames in flight before waiting for an ACK.
    pub window: u8,
    /// Largest key block sent, in bytes.
    pub max_key_len: u16,
    /// Time without ACK progress after which all frames in flight are sent again. Must exceed
    /// the time the line needs to carry a full window plus the host's answer.
    pub retransmit_timeout: Duration,
    /// Key blocks the device holds for the host at most (queued and in flight).
    pub max_buffered_blocks: usize,
}

/// Why the device refused a key block. Each case is a block the host would reject (so it would
/// be retransmitted forever and stall every block behind it) or one the device cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The key buffer is full.
    #[error("the device key buffer is full ({capacity} blocks)")]
    BufferFull {
        /// Buffer capacity in blocks.
        capacity: usize,
    },
    /// The key is empty or longer than the device announces (or a frame can carry).
    #[error("key block {block_id} has {len} key bytes; allowed 1..={max}")]
    BadLength {
        /// The block.
        block_id: u64,
        /// Its key length.
        len: usize,
        /// The largest allowed.
        max: usize,
    },
    /// The QBER field is above 100 %.
    #[error("key block {block_id} reports a QBER of {qber_ppm} ppm, above 1,000,000")]
    BadQber {
        /// The block.
        block_id: u64,
        /// The reported value.
        qber_ppm: u32,
    },
    /// The key check value does not match the key.
    #[error("key block {block_id} does not match its key check value")]
    BadKcv {
        /// The block.
        block_id: u64,
    },
    /// Block identifiers must increase; the host drops a lower one as a duplicate.
    #[error("key block {block_id} does not follow block {last}: identifiers must increase")]
    NotIncreasing {
        /// The block.
        block_id: u64,
        /// The last block accepted.
        last: u64,
    },
}

struct InFlight {
    seq: u32,
    msg: Message,
    /// When the frame last went out; `None` until it has been sent once.
    sent_at: Option<Instant>,
}

/// The device's half of the protocol, free of I/O.
pub struct DeviceSession {
    config: DeviceConfig,
    rng: StdRng,
    /// Current epoch; 0 when no session is open.
    epoch: u32,
    session_nonce: Option<u64>,
    boot_count: u32,
    decoder: FrameDecoder,
    outbox: VecDeque<Vec<u8>>,
    next_seq: u32,
    in_flight: VecDeque<InFlight>,
    /// Index into `in_flight` of the next frame to (re)send.
    send_cursor: usize,
    alarms: VecDeque<Alarm>,
    blocks: VecDeque<KeyBlock>,
    credit_limit: u32,
    blocks_sent_in_epoch: u32,
    last_rewind: Option<(u32, Instant)>,
    last_no_session_reply: Option<Instant>,
    last_block_id: Option<u64>,
    stats: SessionStats,
}

impl DeviceSession {
    /// A freshly booted device: no session, an ANNOUNCE queued.
    pub fn new(config: DeviceConfig, boot_count: u32) -> Self {
        Self::with_rng(config, boot_count, rand::make_rng())
    }

    /// As [`DeviceSession::new`] with a seeded random source.
    pub fn with_seed(config: DeviceConfig, boot_count: u32, seed: u64) -> Self {
        Self::with_rng(config, boot_count, StdRng::seed_from_u64(seed))
    }

    fn with_rng(config: DeviceConfig, boot_count: u32, rng: StdRng) -> Self {
        let mut s = Self {
            config,
            rng,
            epoch: 0,
            session_nonce: None,
            boot_count,
            decoder: FrameDecoder::new(),
            outbox: VecDeque::new(),
            next_seq: 1,
            in_flight: VecDeque::new(),
            send_cursor: 0,
            alarms: VecDeque::new(),
            blocks: VecDeque::new(),
            credit_limit: 0,
            blocks_sent_in_epoch: 0,
            last_rewind: None,
            last_no_session_reply: None,
            last_block_id: None,
            stats: SessionStats::default(),
        };
        s.announce();
        s
    }

    /// Simulates a power cycle: the session is gone, the key buffer survives (it is
    /// non-volatile on real devices), and the device announces itself.
    pub fn reboot(&mut self) {
        self.requeue_in_flight();
        self.epoch = 0;
        self.session_nonce = None;
        self.decoder = FrameDecoder::new();
        self.outbox.clear();
        self.boot_count = self.boot_count.wrapping_add(1);
        self.announce();
    }

    /// Whether a host session is open.
    pub fn in_session(&self) -> bool {
        self.epoch != 0
    }

    /// The current epoch (0 without a session).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Boots since manufacture (as announced).
    pub fn boot_count(&self) -> u32 {
        self.boot_count
    }

    /// Key blocks the device holds at most.
    pub fn buffer_capacity(&self) -> usize {
        self.config.max_buffered_blocks
    }

    /// Counters.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Key blocks held for the host (queued and in flight).
    pub fn buffered_blocks(&self) -> usize {
        self.blocks.len() + self.in_flight.iter().filter(|f| matches!(f.msg, Message::KeyBlock(_))).count()
    }

    /// Blocks the host has granted credit for and not yet received a first transmission of.
    pub fn available_credit(&self) -> u32 {
        if self.in_session() { self.credit_limit.saturating_sub(self.blocks_sent_in_epoch) } else { 0 }
    }

    /// Queues a distilled key block for the host, after checking that the host can accept it.
    pub fn push_key_block(&mut self, block: KeyBlock) -> Result<(), PushError> {
        let block_id = block.block_id;
        let max = usize::from(self.config.max_key_len).min(crate::MAX_KEY_LEN);
        if block.key.is_empty() || block.key.len() > max {
            return Err(PushError::BadLength { block_id, len: block.key.len(), max });
        }
        if block.qber_ppm > 1_000_000 {
            return Err(PushError::BadQber { block_id, qber_ppm: block.qber_ppm });
        }
        if !block.kcv_matches() {
            return Err(PushError::BadKcv { block_id });
        }
        if let Some(last) = self.last_block_id
            && block_id <= last
        {
            return Err(PushError::NotIncreasing { block_id, last });
        }
        if self.buffered_blocks() >= self.config.max_buffered_blocks {
            return Err(PushError::BufferFull { capacity: self.config.max_buffered_blocks });
        }
        self.last_block_id = Some(block_id);
        self.blocks.push_back(block);
        Ok(())
    }

    /// Queues an alarm; alarms overtake key blocks that wait for credit.
    pub fn push_alarm(&mut self, alarm: Alarm) {
        self.alarms.push_back(alarm);
    }

    /// Sends telemetry now if a session is open (telemetry is not retransmitted).
    pub fn send_telemetry(&mut self, telemetry: Telemetry) {
        if self.in_session() {
            self.send_unreliable(self.epoch, &Message::Telemetry(telemetry));
        }
    }

    /// Next bytes for the line, chosen now: control frames first, then retransmissions, then
    /// new key blocks and alarms as the window and credit allow. Call it only when the line can
    /// take a frame, so that a slow line paces the device instead of piling up retransmissions.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if let Some(bytes) = self.outbox.pop_front() {
            return Some(bytes);
        }
        if !self.in_session() {
            return None;
        }
        if self.send_cursor >= self.in_flight.len() && !self.admit_next() {
            return None;
        }
        let entry = self.in_flight.get_mut(self.send_cursor)?;
        if entry.sent_at.is_some() {
            self.stats.retransmissions += 1;
        }
        entry.sent_at = Some(now);
        let frame = RawFrame {
            version: PROTOCOL_VERSION,
            msg_type: entry.msg.msg_type() as u8,
            epoch: self.epoch,
            seq: entry.seq,
            body: entry.msg.encode_body(),
        };
        self.send_cursor += 1;
        self.stats.frames_sent += 1;
        Some(frame.to_wire())
    }

    /// Moves the next alarm, or key block if credit allows, into the window.
    fn admit_next(&mut self) -> bool {
        if self.in_flight.len() >= usize::from(self.config.window) {
            return false;
        }
        let msg = if let Some(alarm) = self.alarms.pop_front() {
            Message::Alarm(alarm)
        } else if self.blocks_sent_in_epoch < self.credit_limit
            && let Some(block) = self.blocks.pop_front()
        {
            self.blocks_sent_in_epoch += 1;
            Message::KeyBlock(block)
        } else {
            return false;
        };
        let seq = self.next_seq;
        // Hosts renew the session long before this saturates (see HostSession).
        self.next_seq = self.next_seq.saturating_add(1);
        self.in_flight.push_back(InFlight { seq, msg, sent_at: None });
        true
    }

    /// When [`DeviceSession::handle_timeout`] must next run, if anything is waiting on time.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.in_flight.front().and_then(|f| f.sent_at).map(|t| t + self.config.retransmit_timeout)
    }

    /// Goes back to the oldest unacknowledged frame when ACKs stopped coming.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.poll_timeout()
            && now >= deadline
        {
            self.send_cursor = 0;
            // Restart the clock so the timer fires once per timeout, not on every call.
            if let Some(front) = self.in_flight.front_mut() {
                front.sent_at = Some(now);
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
                Err(_) => self.stats.frame_errors += 1,
            }
        }
    }

    fn handle_frame(&mut self, now: Instant, frame: RawFrame) {
        let msg = match Message::decode(frame.msg_type, &frame.body) {
            Ok(m) => m,
            Err(e) => {
                self.stats.body_errors += 1;
                self.send_unreliable(frame.epoch, &error(e.error_code(), e.to_string()));
                return;
            }
        };
        self.stats.frames_received += 1;
        if let Message::Hello(hello) = &msg {
            self.handle_hello(hello.protocol_version, hello.host_nonce);
            return;
        }
        if frame.epoch == 0 || frame.epoch != self.epoch {
            self.stats.stale_frames += 1;
            // Tell the host once in a while, so it re-handshakes instead of waiting for silence.
            let due = self.last_no_session_reply.is_none_or(|t| now >= t + Duration::from_millis(200));
            if due && !matches!(msg, Message::Error(_)) {
                self.last_no_session_reply = Some(now);
                self.send_unreliable(
                    frame.epoch,
                    &error(error_code::NO_SESSION, "no session with this epoch".into()),
                );
            }
            return;
        }
        match msg {
            Message::Credit { block_limit } => self.credit_limit = self.credit_limit.max(block_limit),
            Message::Ack { next_seq: n } | Message::Nak { from_seq: n } if n > self.next_seq => {
                // A host cannot have received what was never numbered: refuse rather than
                // release (and so lose) frames it never saw.
                let text =
                    format!("acknowledgement of {n} is beyond the next sequence number {}", self.next_seq);
                self.send_unreliable(self.epoch, &error(error_code::UNEXPECTED, text));
            }
            Message::Ack { next_seq } => self.acknowledge(next_seq),
            Message::Nak { from_seq } => {
                self.acknowledge(from_seq);
                let repeated = self.last_rewind.is_some_and(|(seq, at)| {
                    seq == from_seq && now < at + self.config.retransmit_timeout / 2
                });
                let position = self.in_flight.iter().position(|f| f.seq == from_seq);
                if let Some(position) = position
                    && !repeated
                {
                    self.last_rewind = Some((from_seq, now));
                    self.send_cursor = self.send_cursor.min(position);
                    self.stats.naks_sent += 1;
                }
            }
            Message::Ping { nonce } => self.send_unreliable(self.epoch, &Message::Pong { nonce }),
            Message::Pong { .. } | Message::Error(_) => {}
            other => {
                let text = format!("{:?} is not sent by a host", other.msg_type());
                self.send_unreliable(self.epoch, &error(error_code::UNEXPECTED, text));
            }
        }
    }

    fn handle_hello(&mut self, version: u16, nonce: u64) {
        if version < u16::from(PROTOCOL_VERSION) {
            let text =
                format!("protocol version {version} is not supported; this device speaks {PROTOCOL_VERSION}");
            self.send_unreliable(0, &error(error_code::UNSUPPORTED_VERSION, text));
            return;
        }
        if self.session_nonce != Some(nonce) || self.epoch == 0 {
            // A new session: frames in flight go back to the queues and get new sequence numbers.
            self.requeue_in_flight();
            let mut epoch = 0;
            while epoch == 0 || epoch == self.epoch {
                epoch = self.rng.next_u32();
            }
            self.epoch = epoch;
            self.session_nonce = Some(nonce);
            self.next_seq = 1;
            self.credit_limit = 0;
            self.blocks_sent_in_epoch = 0;
            self.last_rewind = None;
            self.stats.sessions_opened += 1;
        }
        // A repeated HELLO (same nonce) gets the same answer, so retries cannot fork the session.
        let ack = Message::HelloAck(HelloAck {
            host_nonce: nonce,
            protocol_version: u16::from(PROTOCOL_VERSION),
            window: self.config.window,
            max_key_len: self.config.max_key_len,
            role: self.config.role,
            device_id: self.config.device_id.clone(),
            link_id: self.config.link_id.clone(),
            firmware: self.config.firmware.clone(),
        });
        self.send_unreliable(self.epoch, &ack);
    }

    fn acknowledge(&mut self, next_seq: u32) {
        // Only frames that actually went out can have been received.
        while self.in_flight.front().is_some_and(|f| f.seq < next_seq && f.sent_at.is_some()) {
            self.in_flight.pop_front();
            self.send_cursor = self.send_cursor.saturating_sub(1);
        }
    }

    fn requeue_in_flight(&mut self) {
        while let Some(f) = self.in_flight.pop_back() {
            match f.msg {
                Message::KeyBlock(b) => self.blocks.push_front(b),
                Message::Alarm(a) => self.alarms.push_front(a),
                _ => {}
            }
        }
        self.send_cursor = 0;
    }

    fn announce(&mut self) {
        let msg = Message::Announce { boot_count: self.boot_count };
        self.send_unreliable(0, &msg);
    }

    fn send_unreliable(&mut self, epoch: u32, msg: &Message) {
        let frame = RawFrame {
            version: PROTOCOL_VERSION,
            msg_type: msg.msg_type() as u8,
            epoch,
            seq: 0,
            body: msg.encode_body(),
        };
        self.push_frame(&frame);
    }

    fn push_frame(&mut self, frame: &RawFrame) {
        self.stats.frames_sent += 1;
        self.outbox.push_back(frame.to_wire());
    }
}

fn error(code: u16, text: String) -> Message {
    Message::Error(ErrorReport { code, text })
}
