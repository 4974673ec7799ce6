//! QKD device drivers behind one trait.
//!
//! The key management daemon talks to every QKD device through [`QkdDevice`]: it asks for key
//! blocks ([`QkdDevice::request_blocks`]) and waits for [`DeviceEvent`]s — verified key blocks,
//! telemetry, alarms and link state changes. Two drivers implement it:
//!
//! - [`serial::SerialDevice`]: a device on a UART or pseudo-terminal speaking the QuteMail
//!   serial protocol (`docs/serial-protocol.md`, crate `qkd-serial-proto`), over tokio-serial.
//! - `kme::KmeDevice`: a vendor device that exposes an ETSI GS QKD 014 key management entity,
//!   pulled over HTTPS with a client certificate for a configured SAE pair.
//!
//! [`AnyDevice`] dispatches to whichever the configuration names.

#![warn(missing_docs)]

use std::fmt;
use std::future::Future;

use zeroize::Zeroizing;

pub use qkd_serial_proto::{Alarm, DeviceRole, LinkState, Severity};

mod any;
pub mod kme;
pub mod serial;
pub use any::AnyDevice;

/// Identifies a key block at both ends of a link.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockId {
    /// A serial-protocol device's block number (increasing).
    Sequence(u64),
    /// An ETSI GS QKD 014 key ID (a UUID, lower-case hyphenated).
    KeyId(String),
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sequence(n) => write!(f, "{n}"),
            Self::KeyId(id) => f.write_str(id),
        }
    }
}

/// A key block handed up by a driver: complete, integrity-checked, never delivered twice.
pub struct DeviceKeyBlock {
    /// The block's identity on the link.
    pub block_id: BlockId,
    /// The key. Zeroized when dropped.
    pub key: Zeroizing<Vec<u8>>,
    /// Key check value that both ends compute alike (see `qkd_serial_proto::key_check_value`).
    pub kcv: [u8; 16],
    /// Creation time, milliseconds since the Unix epoch (0 if the device does not say).
    pub created_unix_ms: u64,
    /// QBER the block was distilled at, parts per million, if the device reports it.
    pub qber_ppm: Option<u32>,
    /// Security parameter (ε = 2^-bits), if the device reports it.
    pub security_bits: Option<u16>,
}

impl fmt::Debug for DeviceKeyBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key bytes never reach a log.
        f.debug_struct("DeviceKeyBlock")
            .field("block_id", &self.block_id)
            .field("key_len", &self.key.len())
            .field("created_unix_ms", &self.created_unix_ms)
            .field("qber_ppm", &self.qber_ppm)
            .finish_non_exhaustive()
    }
}

/// Who the device says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// Serial number or KME ID.
    pub device_id: String,
    /// Link identifier, the same at both ends.
    pub link_id: String,
    /// Firmware or software version, if known.
    pub firmware: String,
    /// Transmitter or receiver, if the device says.
    pub role: Option<DeviceRole>,
}

/// Link telemetry in physical units.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkTelemetry {
    /// When it was measured, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// State of the quantum link.
    pub link_state: LinkState,
    /// Quantum bit error rate (0..=1), if reported.
    pub qber: Option<f64>,
    /// Detection rate, bits per second, if reported.
    pub raw_rate_bps: Option<f64>,
    /// Sifted key rate, bits per second, if reported.
    pub sifted_rate_bps: Option<f64>,
    /// Secret key rate, bits per second, if reported.
    pub secret_rate_bps: Option<f64>,
    /// Channel loss in dB, if reported.
    pub channel_loss_db: Option<f64>,
    /// Key blocks waiting in the device, if reported.
    pub buffered_blocks: Option<u32>,
}

impl From<&qkd_serial_proto::Telemetry> for LinkTelemetry {
    fn from(t: &qkd_serial_proto::Telemetry) -> Self {
        Self {
            unix_ms: t.unix_ms,
            link_state: t.link_state,
            qber: Some(f64::from(t.qber_ppm) / 1e6),
            raw_rate_bps: Some(t.raw_rate_mbps as f64 / 1e3),
            sifted_rate_bps: Some(t.sifted_rate_mbps as f64 / 1e3),
            secret_rate_bps: Some(t.secret_rate_mbps as f64 / 1e3),
            channel_loss_db: Some(f64::from(t.channel_loss_cdb) / 100.0),
            buffered_blocks: Some(t.buffered_blocks),
        }
    }
}

/// What a driver reports.
#[derive(Debug)]
pub enum DeviceEvent {
    /// The driver reached the device and a session is open.
    Connected(DeviceIdentity),
    /// The device went away; the driver keeps trying to reach it.
    Disconnected {
        /// Why, in an operator's words.
        reason: String,
    },
    /// A verified key block.
    KeyBlock(DeviceKeyBlock),
    /// Link telemetry.
    Telemetry(LinkTelemetry),
    /// An alarm raised or cleared.
    Alarm(Alarm),
}

/// Errors a driver cannot recover from by itself.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The serial port could not be opened or configured.
    #[error("cannot open serial device {path}: {source}")]
    OpenSerial {
        /// Device path.
        path: String,
        /// The cause.
        #[source]
        source: tokio_serial::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid device configuration: {0}")]
    Config(String),
    /// The driver's task ended (the device handle is unusable).
    #[error("the device driver for {0} has stopped")]
    Stopped(String),
    /// A KME request failed in a way retrying will not fix.
    #[error("KME {kme}: {reason}")]
    Kme {
        /// The KME's base URL.
        kme: String,
        /// What went wrong.
        reason: String,
    },
}

/// A QKD device as the key management daemon sees it.
pub trait QkdDevice: Send {
    /// Waits for the next event. Cancel-safe: no event is lost if the future is dropped.
    fn next_event(&mut self) -> impl Future<Output = Result<DeviceEvent, DeviceError>> + Send;

    /// Asks the device for `n` more key blocks (credit). Blocks arrive as events.
    fn request_blocks(&mut self, n: u32) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// For devices where the peer end picks the keys (an ETSI 014 KME in the slave role):
    /// fetches these blocks, which then arrive as events. Devices that deliver every block on
    /// their own (the serial protocol) need nothing and keep this default.
    fn fetch_blocks(&mut self, ids: Vec<BlockId>) -> impl Future<Output = Result<(), DeviceError>> + Send {
        let _ = ids;
        async { Ok(()) }
    }

    /// A short description for logs (driver kind and address).
    fn describe(&self) -> String;
}
