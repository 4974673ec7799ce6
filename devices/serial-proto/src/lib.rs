//! The QuteMail QKD device serial protocol, without I/O.
//!
//! A QKD device (or the `qkd-sim` simulator) talks to its host (the key management daemon)
//! over a serial line. This crate is the whole protocol as specified in
//! `docs/serial-protocol.md`:
//!
//! - [`frame`]: COBS-stuffed frames delimited by `0x00`, a 12-byte header (version, type,
//!   session epoch, sequence number, body length) and a CRC-32C trailer; a streaming
//!   [`FrameDecoder`] that resynchronises after line noise.
//! - [`message`]: the message types and their big-endian bodies, including key blocks with a
//!   key check value.
//! - [`HostSession`] and [`DeviceSession`]: the two state machines (handshake with a random
//!   epoch, sequence numbers with ACK/NAK and go-back-N retransmission, credit-based flow
//!   control, ping and liveness). They take bytes and the current time and hand back bytes and
//!   events, so they are tested deterministically and fuzzed without sockets or ptys.
//!
//! ```
//! use std::time::Instant;
//! use qkd_serial_proto::{DeviceConfig, DeviceRole, DeviceSession, HostConfig, HostEvent, HostSession, KeyBlock};
//!
//! let now = Instant::now();
//! let mut host = HostSession::new(HostConfig::default(), now);
//! let mut device = DeviceSession::new(DeviceConfig {
//!     device_id: "SIM-A".into(), link_id: "link-1".into(), firmware: "1.0".into(),
//!     role: DeviceRole::Transmitter, window: 8, max_key_len: 1024,
//!     retransmit_timeout: std::time::Duration::from_millis(300), max_buffered_blocks: 64,
//! }, 1);
//! device.push_key_block(KeyBlock::new(1, 0, 12_000, 64, vec![0xAB; 32])).unwrap();
//! host.request_blocks(1);
//! // Shuttle bytes both ways until the block arrives.
//! let mut got = None;
//! for _ in 0..10 {
//!     host.handle_timeout(now);
//!     while let Some(b) = host.poll_transmit() { device.handle_bytes(now, &b); }
//!     while let Some(b) = device.poll_transmit(now) { host.handle_bytes(now, &b); }
//!     while let Some(e) = host.poll_event() {
//!         if let HostEvent::KeyBlock(k) = e { got = Some(k); }
//!     }
//! }
//! assert_eq!(got.unwrap().block_id, 1);
//! ```

#![warn(missing_docs)]

pub mod cobs;
mod device;
pub mod frame;
mod host;
pub mod message;
mod stats;

pub use device::{DeviceConfig, DeviceSession, PushError};
pub use frame::{FrameDecoder, FrameError, RawFrame};
pub use host::{DeviceInfo, HostConfig, HostEvent, HostSession, RENEW_AFTER_SEQ, Rejection, SessionLoss};
pub use message::{
    Alarm, BodyError, DeviceRole, ErrorReport, Hello, HelloAck, KeyBlock, LinkState, MAX_KEY_LEN, Message,
    MessageType, Severity, Telemetry, alarm_code, error_code, key_check_value,
};
pub use stats::SessionStats;
