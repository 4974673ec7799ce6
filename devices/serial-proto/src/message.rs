//! Message types and their bodies. All integers are big-endian.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::frame::MAX_BODY_LEN;

/// Type codes, as carried in the frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Host opens a session.
    Hello = 0x01,
    /// Device accepts a session and names its epoch.
    HelloAck = 0x02,
    /// Device announces that it (re)booted and has no session.
    Announce = 0x03,
    /// Host grants credit for key blocks.
    Credit = 0x10,
    /// Host acknowledges reliable frames cumulatively.
    Ack = 0x11,
    /// Host asks for retransmission from a sequence number.
    Nak = 0x12,
    /// Device delivers a key block (reliable).
    KeyBlock = 0x20,
    /// Device reports link telemetry (unreliable).
    Telemetry = 0x21,
    /// Device raises or clears an alarm (reliable).
    Alarm = 0x22,
    /// Liveness probe (either side).
    Ping = 0x30,
    /// Answer to a ping (either side).
    Pong = 0x31,
    /// Error report (either side).
    Error = 0x3F,
}

impl MessageType {
    /// The type for a code, if the code is defined.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x01 => Self::Hello,
            0x02 => Self::HelloAck,
            0x03 => Self::Announce,
            0x10 => Self::Credit,
            0x11 => Self::Ack,
            0x12 => Self::Nak,
            0x20 => Self::KeyBlock,
            0x21 => Self::Telemetry,
            0x22 => Self::Alarm,
            0x30 => Self::Ping,
            0x31 => Self::Pong,
            0x3F => Self::Error,
            _ => return None,
        })
    }

    /// Whether frames of this type are sequenced, acknowledged and retransmitted.
    pub fn is_reliable(self) -> bool {
        matches!(self, Self::KeyBlock | Self::Alarm)
    }
}

/// Which end of the quantum channel a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRole {
    /// The transmitter (Alice).
    Transmitter,
    /// The receiver (Bob).
    Receiver,
}

/// Host → device: open a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Highest protocol version the host speaks.
    pub protocol_version: u16,
    /// Random value the device echoes, so a stale HELLO_ACK is never taken for a fresh one.
    pub host_nonce: u64,
    /// Largest frame body the host accepts.
    pub max_body_len: u16,
}

/// Device → host: the session is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// The host's nonce, echoed.
    pub host_nonce: u64,
    /// Protocol version the device speaks in this session.
    pub protocol_version: u16,
    /// Reliable frames the device keeps in flight before it waits for an ACK.
    pub window: u8,
    /// Largest key block, in bytes, the device will send.
    pub max_key_len: u16,
    /// Transmitter or receiver.
    pub role: DeviceRole,
    /// Device serial number or other unique identifier.
    pub device_id: String,
    /// Identifier of the QKD link, the same at both ends.
    pub link_id: String,
    /// Firmware version string.
    pub firmware: String,
}

/// A key block as the device delivers it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyBlock {
    /// Block identifier, the same at both ends of the link and increasing.
    pub block_id: u64,
    /// When the block was distilled, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// QBER measured for this block, in parts per million.
    pub qber_ppm: u32,
    /// Security parameter: the key is ε-secure with ε = 2^-security_bits.
    pub security_bits: u16,
    /// Key check value: see [`key_check_value`].
    pub kcv: [u8; 16],
    /// The secret key bytes.
    pub key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for KeyBlock {
    // Never print key bytes, not even in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyBlock")
            .field("block_id", &self.block_id)
            .field("created_unix_ms", &self.created_unix_ms)
            .field("qber_ppm", &self.qber_ppm)
            .field("security_bits", &self.security_bits)
            .field("kcv", &format_args!("{}", hex_string(&self.kcv)))
            .field("key_len", &self.key.len())
            .finish()
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key check value of a block: the first 16 bytes of
/// SHA-256("QKD-KCV-v1" ‖ block_id as u64 big-endian ‖ key).
///
/// Both hosts compute it; equal values mean they hold the same key, and it reveals nothing
/// usable about the key (a preimage search over the key space).
pub fn key_check_value(block_id: u64, key: &[u8]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"QKD-KCV-v1");
    h.update(block_id.to_be_bytes());
    h.update(key);
    let digest = h.finalize();
    let mut kcv = [0u8; 16];
    kcv.copy_from_slice(&digest[..16]);
    kcv
}

impl KeyBlock {
    /// A block whose check value is computed from its key.
    pub fn new(block_id: u64, created_unix_ms: u64, qber_ppm: u32, security_bits: u16, key: Vec<u8>) -> Self {
        let kcv = key_check_value(block_id, &key);
        Self { block_id, created_unix_ms, qber_ppm, security_bits, kcv, key: Zeroizing::new(key) }
    }

    /// Whether the key matches its check value (it was not damaged on the way).
    pub fn kcv_matches(&self) -> bool {
        key_check_value(self.block_id, &self.key) == self.kcv
    }
}

/// State of the quantum link as the device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No quantum signal (fibre cut, laser off).
    Down,
    /// Starting up or realigning.
    Aligning,
    /// Distilling key.
    Up,
    /// Key distillation aborted for security: QBER above the threshold.
    SecurityAbort,
    /// Hardware fault.
    Fault,
}

impl LinkState {
    fn code(self) -> u8 {
        match self {
            Self::Down => 0,
            Self::Aligning => 1,
            Self::Up => 2,
            Self::SecurityAbort => 3,
            Self::Fault => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Down,
            1 => Self::Aligning,
            2 => Self::Up,
            3 => Self::SecurityAbort,
            4 => Self::Fault,
            _ => return None,
        })
    }

    /// Lower-case name, as used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Down => "down",
            Self::Aligning => "aligning",
            Self::Up => "up",
            Self::SecurityAbort => "security_abort",
            Self::Fault => "fault",
        }
    }
}

/// Periodic link telemetry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    /// Time of the reading, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Link state.
    pub link_state: LinkState,
    /// Current QBER in parts per million.
    pub qber_ppm: u32,
    /// Detection (raw key) rate, millibits per second.
    pub raw_rate_mbps: u64,
    /// Sifted key rate, millibits per second.
    pub sifted_rate_mbps: u64,
    /// Secret key rate, millibits per second.
    pub secret_rate_mbps: u64,
    /// Channel loss in hundredths of a dB.
    pub channel_loss_cdb: u32,
    /// Key blocks waiting in the device for the host.
    pub buffered_blocks: u32,
}

/// Alarm codes defined by this protocol; vendors use 0x8000 and above.
pub mod alarm_code {
    /// No quantum signal: fibre cut or transmitter dark.
    pub const LOSS_OF_SIGNAL: u16 = 0x0001;
    /// QBER above the security threshold: key distillation aborted (possible eavesdropper).
    pub const QBER_THRESHOLD: u16 = 0x0002;
    /// The device restarted.
    pub const REBOOTED: u16 = 0x0003;
    /// The device's key buffer is full and new blocks are being discarded.
    pub const KEY_BUFFER_FULL: u16 = 0x0004;
}

/// How serious an alarm is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// For the record.
    Info,
    /// Needs attention.
    Warning,
    /// Key delivery is affected.
    Critical,
}

impl Severity {
    fn code(self) -> u8 {
        match self {
            Self::Info => 1,
            Self::Warning => 2,
            Self::Critical => 3,
        }
    }
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Info,
            2 => Self::Warning,
            3 => Self::Critical,
            _ => return None,
        })
    }
}

/// An alarm raised or cleared by the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alarm {
    /// See [`alarm_code`].
    pub code: u16,
    /// Severity.
    pub severity: Severity,
    /// True when raised, false when cleared.
    pub raised: bool,
    /// Human-readable detail.
    pub text: String,
}

/// Error codes carried by ERROR messages.
pub mod error_code {
    /// The frame's epoch is not the current session's: the receiver has no such session.
    pub const NO_SESSION: u16 = 0x0001;
    /// The HELLO asked for a protocol version the device cannot speak.
    pub const UNSUPPORTED_VERSION: u16 = 0x0002;
    /// The message type is not known to the receiver.
    pub const UNKNOWN_TYPE: u16 = 0x0003;
    /// The body could not be parsed.
    pub const MALFORMED_BODY: u16 = 0x0004;
    /// The message is not valid in the receiver's current state.
    pub const UNEXPECTED: u16 = 0x0005;
}

/// An error report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReport {
    /// See [`error_code`].
    pub code: u16,
    /// Human-readable detail.
    pub text: String,
}

/// A decoded message body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// Device (re)booted; carries its boot counter.
    Announce {
        /// Number of boots since manufacture.
        boot_count: u32,
    },
    /// Highest key-block ordinal (1-based, counted per session) the device may send.
    Credit {
        /// The cumulative limit.
        block_limit: u32,
    },
    /// All reliable frames below `next_seq` arrived.
    Ack {
        /// Next sequence number the host expects.
        next_seq: u32,
    },
    /// Resend every reliable frame from `from_seq` on.
    Nak {
        /// First sequence number to resend.
        from_seq: u32,
    },
    /// See [`KeyBlock`].
    KeyBlock(KeyBlock),
    /// See [`Telemetry`].
    Telemetry(Telemetry),
    /// See [`Alarm`].
    Alarm(Alarm),
    /// Liveness probe.
    Ping {
        /// Echoed in the PONG.
        nonce: u64,
    },
    /// Answer to a PING.
    Pong {
        /// The PING's nonce.
        nonce: u64,
    },
    /// See [`ErrorReport`].
    Error(ErrorReport),
}

/// Why a frame body could not be decoded as its message type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The type code is not defined by this protocol version.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// The body ended before all fields were read.
    #[error("{msg_type:?} body truncated at byte {at}")]
    Truncated {
        /// Message type.
        msg_type: MessageType,
        /// Offset where more bytes were needed.
        at: usize,
    },
    /// Bytes remained after the last field.
    #[error("{msg_type:?} body has {extra} trailing bytes")]
    Trailing {
        /// Message type.
        msg_type: MessageType,
        /// Number of unread bytes.
        extra: usize,
    },
    /// A field holds a value the protocol does not allow.
    #[error("{msg_type:?} field {field} is invalid: {reason}")]
    InvalidField {
        /// Message type.
        msg_type: MessageType,
        /// Field name.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

impl BodyError {
    /// The ERROR code a receiver answers this with.
    pub fn error_code(&self) -> u16 {
        match self {
            Self::UnknownType(_) => error_code::UNKNOWN_TYPE,
            _ => error_code::MALFORMED_BODY,
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    msg_type: MessageType,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BodyError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(BodyError::Truncated { msg_type: self.msg_type, at: self.pos }),
        }
    }
    fn u8(&mut self) -> Result<u8, BodyError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, BodyError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, BodyError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, BodyError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn string8(&mut self, field: &'static str) -> Result<String, BodyError> {
        let len = self.u8()? as usize;
        self.utf8(len, field)
    }
    fn string16(&mut self, field: &'static str) -> Result<String, BodyError> {
        let len = self.u16()? as usize;
        self.utf8(len, field)
    }
    fn utf8(&mut self, len: usize, field: &'static str) -> Result<String, BodyError> {
        let msg_type = self.msg_type;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| BodyError::InvalidField {
            msg_type,
            field,
            reason: "not UTF-8",
        })
    }
    fn invalid(&self, field: &'static str, reason: &'static str) -> BodyError {
        BodyError::InvalidField { msg_type: self.msg_type, field, reason }
    }
    fn finish(self) -> Result<(), BodyError> {
        let extra = self.buf.len() - self.pos;
        if extra == 0 { Ok(()) } else { Err(BodyError::Trailing { msg_type: self.msg_type, extra }) }
    }
}

fn put_string8(out: &mut Vec<u8>, s: &str) {
    // Strings are identifiers and short texts; longer ones are cut at a character boundary.
    let s = truncate_utf8(s, u8::MAX as usize);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn put_string16(out: &mut Vec<u8>, s: &str, room: usize) {
    let s = truncate_utf8(s, room.min(u16::MAX as usize));
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Largest key a KEY_BLOCK can carry: the body limit less the fixed fields.
pub const MAX_KEY_LEN: usize = MAX_BODY_LEN - KEY_BLOCK_FIXED_LEN;
const KEY_BLOCK_FIXED_LEN: usize = 8 + 8 + 4 + 2 + 16 + 2;

impl Message {
    /// The message's type code.
    pub fn msg_type(&self) -> MessageType {
        match self {
            Self::Hello(_) => MessageType::Hello,
            Self::HelloAck(_) => MessageType::HelloAck,
            Self::Announce { .. } => MessageType::Announce,
            Self::Credit { .. } => MessageType::Credit,
            Self::Ack { .. } => MessageType::Ack,
            Self::Nak { .. } => MessageType::Nak,
            Self::KeyBlock(_) => MessageType::KeyBlock,
            Self::Telemetry(_) => MessageType::Telemetry,
            Self::Alarm(_) => MessageType::Alarm,
            Self::Ping { .. } => MessageType::Ping,
            Self::Pong { .. } => MessageType::Pong,
            Self::Error(_) => MessageType::Error,
        }
    }

    /// Encodes the body. Key blocks longer than [`MAX_KEY_LEN`] must be split by the device
    /// before they get here; texts are cut to fit the frame.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Self::Hello(h) => {
                out.extend_from_slice(&h.protocol_version.to_be_bytes());
                out.extend_from_slice(&h.host_nonce.to_be_bytes());
                out.extend_from_slice(&h.max_body_len.to_be_bytes());
            }
            Self::HelloAck(a) => {
                out.extend_from_slice(&a.host_nonce.to_be_bytes());
                out.extend_from_slice(&a.protocol_version.to_be_bytes());
                out.push(a.window);
                out.extend_from_slice(&a.max_key_len.to_be_bytes());
                out.push(match a.role {
                    DeviceRole::Transmitter => 0,
                    DeviceRole::Receiver => 1,
                });
                put_string8(&mut out, &a.device_id);
                put_string8(&mut out, &a.link_id);
                put_string8(&mut out, &a.firmware);
            }
            Self::Announce { boot_count } => out.extend_from_slice(&boot_count.to_be_bytes()),
            Self::Credit { block_limit } => out.extend_from_slice(&block_limit.to_be_bytes()),
            Self::Ack { next_seq } => out.extend_from_slice(&next_seq.to_be_bytes()),
            Self::Nak { from_seq } => out.extend_from_slice(&from_seq.to_be_bytes()),
            Self::KeyBlock(k) => {
                debug_assert!(k.key.len() <= MAX_KEY_LEN);
                out.reserve(KEY_BLOCK_FIXED_LEN + k.key.len());
                out.extend_from_slice(&k.block_id.to_be_bytes());
                out.extend_from_slice(&k.created_unix_ms.to_be_bytes());
                out.extend_from_slice(&k.qber_ppm.to_be_bytes());
                out.extend_from_slice(&k.security_bits.to_be_bytes());
                out.extend_from_slice(&k.kcv);
                out.extend_from_slice(&(k.key.len() as u16).to_be_bytes());
                out.extend_from_slice(&k.key);
            }
            Self::Telemetry(t) => {
                out.extend_from_slice(&t.unix_ms.to_be_bytes());
                out.push(t.link_state.code());
                out.extend_from_slice(&t.qber_ppm.to_be_bytes());
                out.extend_from_slice(&t.raw_rate_mbps.to_be_bytes());
                out.extend_from_slice(&t.sifted_rate_mbps.to_be_bytes());
                out.extend_from_slice(&t.secret_rate_mbps.to_be_bytes());
                out.extend_from_slice(&t.channel_loss_cdb.to_be_bytes());
                out.extend_from_slice(&t.buffered_blocks.to_be_bytes());
            }
            Self::Alarm(a) => {
                out.extend_from_slice(&a.code.to_be_bytes());
                out.push(a.severity.code());
                out.push(u8::from(a.raised));
                put_string16(&mut out, &a.text, MAX_BODY_LEN - 6);
            }
            Self::Ping { nonce } | Self::Pong { nonce } => out.extend_from_slice(&nonce.to_be_bytes()),
            Self::Error(e) => {
                out.extend_from_slice(&e.code.to_be_bytes());
                put_string16(&mut out, &e.text, MAX_BODY_LEN - 4);
            }
        }
        out
    }

    /// Decodes a body of type `code`.
    pub fn decode(code: u8, body: &[u8]) -> Result<Message, BodyError> {
        let msg_type = MessageType::from_code(code).ok_or(BodyError::UnknownType(code))?;
        let mut r = Reader { buf: body, pos: 0, msg_type };
        let msg = match msg_type {
            MessageType::Hello => Self::Hello(Hello {
                protocol_version: r.u16()?,
                host_nonce: r.u64()?,
                max_body_len: r.u16()?,
            }),
            MessageType::HelloAck => {
                let host_nonce = r.u64()?;
                let protocol_version = r.u16()?;
                let window = r.u8()?;
                if window == 0 {
                    return Err(r.invalid("window", "must be at least 1"));
                }
                let max_key_len = r.u16()?;
                let role = match r.u8()? {
                    0 => DeviceRole::Transmitter,
                    1 => DeviceRole::Receiver,
                    _ => return Err(r.invalid("role", "must be 0 (transmitter) or 1 (receiver)")),
                };
                Self::HelloAck(HelloAck {
                    host_nonce,
                    protocol_version,
                    window,
                    max_key_len,
                    role,
                    device_id: r.string8("device_id")?,
                    link_id: r.string8("link_id")?,
                    firmware: r.string8("firmware")?,
                })
            }
            MessageType::Announce => Self::Announce { boot_count: r.u32()? },
            MessageType::Credit => Self::Credit { block_limit: r.u32()? },
            MessageType::Ack => Self::Ack { next_seq: r.u32()? },
            MessageType::Nak => Self::Nak { from_seq: r.u32()? },
            MessageType::KeyBlock => {
                let block_id = r.u64()?;
                let created_unix_ms = r.u64()?;
                let qber_ppm = r.u32()?;
                if qber_ppm > 1_000_000 {
                    return Err(r.invalid("qber_ppm", "above 1,000,000 ppm"));
                }
                let security_bits = r.u16()?;
                let mut kcv = [0u8; 16];
                kcv.copy_from_slice(r.take(16)?);
                let len = r.u16()? as usize;
                if len == 0 {
                    return Err(r.invalid("key_len", "a key block cannot be empty"));
                }
                let key = Zeroizing::new(r.take(len)?.to_vec());
                Self::KeyBlock(KeyBlock { block_id, created_unix_ms, qber_ppm, security_bits, kcv, key })
            }
            MessageType::Telemetry => {
                let unix_ms = r.u64()?;
                let link_state = LinkState::from_code(r.u8()?)
                    .ok_or_else(|| r.invalid("link_state", "unknown state code"))?;
                let qber_ppm = r.u32()?;
                if qber_ppm > 1_000_000 {
                    return Err(r.invalid("qber_ppm", "above 1,000,000 ppm"));
                }
                Self::Telemetry(Telemetry {
                    unix_ms,
                    link_state,
                    qber_ppm,
                    raw_rate_mbps: r.u64()?,
                    sifted_rate_mbps: r.u64()?,
                    secret_rate_mbps: r.u64()?,
                    channel_loss_cdb: r.u32()?,
                    buffered_blocks: r.u32()?,
                })
            }
            MessageType::Alarm => {
                let code = r.u16()?;
                let severity =
                    Severity::from_code(r.u8()?).ok_or_else(|| r.invalid("severity", "must be 1, 2 or 3"))?;
                let raised = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(r.invalid("raised", "must be 0 or 1")),
                };
                Self::Alarm(Alarm { code, severity, raised, text: r.string16("text")? })
            }
            MessageType::Ping => Self::Ping { nonce: r.u64()? },
            MessageType::Pong => Self::Pong { nonce: r.u64()? },
            MessageType::Error => Self::Error(ErrorReport { code: r.u16()?, text: r.string16("text")? }),
        };
        r.finish()?;
        Ok(msg)
    }
}
