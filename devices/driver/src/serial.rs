//! The serial-protocol driver: a [`HostSession`] driven over a tokio-serial port.
//!
//! One task per device owns the port. It feeds line bytes and timer ticks into the session,
//! writes what the session wants sent, and turns session events into [`DeviceEvent`]s. If the
//! port fails (device unplugged, simulator restarted) the task reports `Disconnected`, reopens
//! the port with a fixed back-off and resumes after the last block it delivered, so no block is
//! handed up twice.

use std::path::PathBuf;
use std::time::Duration;

use qkd_serial_proto::{HostConfig, HostEvent, HostSession, SessionLoss, SessionStats};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_serial::{SerialPortBuilderExt, SerialStream};

use crate::{BlockId, DeviceError, DeviceEvent, DeviceIdentity, DeviceKeyBlock, LinkTelemetry, QkdDevice};

/// Configuration of one serial device (the `[device.serial]` table of kmd's config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Device path: a UART such as `/dev/ttyUSB0`, or a pseudo-terminal from `qkd-sim`.
    pub path: PathBuf,
    /// Line speed in baud (8 data bits, no parity, 1 stop bit, no flow control).
    #[serde(default = "default_baud_rate")]
    pub baud_rate: u32,
    /// Milliseconds between HELLO retries while no session is open.
    #[serde(default = "default_hello_interval_ms")]
    pub hello_interval_ms: u64,
    /// Milliseconds between pings (and credit refreshes) in a session.
    #[serde(default = "default_ping_interval_ms")]
    pub ping_interval_ms: u64,
    /// Milliseconds of silence after which the device counts as gone and the host re-handshakes.
    /// Raised automatically on slow lines to three maximal frames' time plus one second.
    #[serde(default = "default_dead_after_ms")]
    pub dead_after_ms: u64,
    /// Least milliseconds between two NAKs for the same sequence number.
    #[serde(default = "default_nak_holdoff_ms")]
    pub nak_holdoff_ms: u64,
    /// Milliseconds between attempts to reopen a port that failed.
    #[serde(default = "default_reopen_interval_ms")]
    pub reopen_interval_ms: u64,
    /// Blocks with numbers at or below this were already stored; they are not delivered again.
    #[serde(default)]
    pub resume_after_block: Option<u64>,
}

fn default_baud_rate() -> u32 {
    115_200
}
fn default_hello_interval_ms() -> u64 {
    500
}
fn default_ping_interval_ms() -> u64 {
    1000
}
fn default_dead_after_ms() -> u64 {
    3500
}
fn default_nak_holdoff_ms() -> u64 {
    100
}
fn default_reopen_interval_ms() -> u64 {
    1000
}

impl SerialConfig {
    /// A configuration with every timing at its default.
    pub fn new(path: impl Into<PathBuf>, baud_rate: u32) -> Self {
        Self {
            path: path.into(),
            baud_rate,
            hello_interval_ms: default_hello_interval_ms(),
            ping_interval_ms: default_ping_interval_ms(),
            dead_after_ms: default_dead_after_ms(),
            nak_holdoff_ms: default_nak_holdoff_ms(),
            reopen_interval_ms: default_reopen_interval_ms(),
            resume_after_block: None,
        }
    }

    fn host_config(&self) -> HostConfig {
        // A slow line can take seconds to carry one maximal frame; the device is not silent
        // while it does. Never judge it dead in less than three such frames plus a second.
        let frame_ms =
            (qkd_serial_proto::frame::MAX_ENCODED_LEN as u64 + 1) * 10 * 1000 / u64::from(self.baud_rate);
        HostConfig {
            hello_interval: Duration::from_millis(self.hello_interval_ms),
            ping_interval: Duration::from_millis(self.ping_interval_ms),
            dead_after: Duration::from_millis(self.dead_after_ms.max(3 * frame_ms + 1000)),
            nak_holdoff: Duration::from_millis(self.nak_holdoff_ms),
        }
    }

    fn validate(&self) -> Result<(), DeviceError> {
        if self.baud_rate == 0 {
            return Err(DeviceError::Config("baud_rate must be positive".into()));
        }
        if self.dead_after_ms <= self.ping_interval_ms {
            return Err(DeviceError::Config(format!(
                "dead_after_ms ({}) must exceed ping_interval_ms ({})",
                self.dead_after_ms, self.ping_interval_ms
            )));
        }
        Ok(())
    }
}

enum Command {
    RequestBlocks(u32),
}

/// A QKD device on a serial line. Dropping it stops its task and closes the port.
pub struct SerialDevice {
    path: String,
    events: mpsc::Receiver<DeviceEvent>,
    commands: mpsc::UnboundedSender<Command>,
    stats: watch::Receiver<SessionStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SerialDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SerialDevice {
    /// Opens the port and starts the session task. Fails if the port cannot be opened now; later
    /// failures are reported as `Disconnected` events and retried.
    pub fn open(config: SerialConfig) -> Result<Self, DeviceError> {
        config.validate()?;
        let port = open_port(&config)?;
        let path = config.path.display().to_string();
        let (event_tx, events) = mpsc::channel(256);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (stats_tx, stats) = watch::channel(SessionStats::default());
        let task = tokio::spawn(run(config, port, event_tx, command_rx, stats_tx));
        Ok(Self { path, events, commands, stats, task })
    }

    /// Protocol counters (frames, errors, retransmissions, blocks) so far.
    pub fn stats(&self) -> SessionStats {
        self.stats.borrow().clone()
    }
}

impl QkdDevice for SerialDevice {
    async fn next_event(&mut self) -> Result<DeviceEvent, DeviceError> {
        self.events.recv().await.ok_or_else(|| DeviceError::Stopped(self.path.clone()))
    }

    async fn request_blocks(&mut self, n: u32) -> Result<(), DeviceError> {
        self.commands.send(Command::RequestBlocks(n)).map_err(|_| DeviceError::Stopped(self.path.clone()))
    }

    fn describe(&self) -> String {
        format!("serial device {}", self.path)
    }
}

fn open_port(config: &SerialConfig) -> Result<SerialStream, DeviceError> {
    let path = config.path.display().to_string();
    tokio_serial::new(&path, config.baud_rate)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(tokio_serial::Parity::None)
        .stop_bits(tokio_serial::StopBits::One)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(|source| DeviceError::OpenSerial { path, source })
}

/// Why the port loop stopped.
enum PortEnd {
    /// The handle was dropped: stop for good.
    HandleGone,
    /// The port failed: reopen it.
    Failed(String),
}

async fn run(
    config: SerialConfig,
    mut port: SerialStream,
    events: mpsc::Sender<DeviceEvent>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    stats: watch::Sender<SessionStats>,
) {
    let path = config.path.display().to_string();
    let mut session = HostSession::new(config.host_config(), Instant::now().into_std());
    if let Some(last) = config.resume_after_block {
        session.resume_after(last);
    }
    let mut last_block = config.resume_after_block;
    let mut log_limiter = LogLimiter::default();
    loop {
        let end =
            drive(&mut port, &mut session, &events, &mut commands, &stats, &mut last_block, &mut log_limiter)
                .await;
        let reason = match end {
            PortEnd::HandleGone => return,
            PortEnd::Failed(reason) => reason,
        };
        tracing::warn!(device = %path, %reason, "serial device lost; reopening");
        if events.send(DeviceEvent::Disconnected { reason: reason.clone() }).await.is_err() {
            return;
        }
        port = loop {
            tokio::time::sleep(Duration::from_millis(config.reopen_interval_ms)).await;
            if commands.is_closed() {
                return;
            }
            match open_port(&config) {
                Ok(p) => break p,
                Err(e) => tracing::debug!(device = %path, error = %e, "reopen failed"),
            }
        };
        // A fresh session on the reopened port; it carries on after the last delivered block and
        // keeps asking for what is still owed.
        let owed = session.outstanding_request();
        session = HostSession::new(config.host_config(), Instant::now().into_std());
        if let Some(last) = last_block {
            session.resume_after(last);
        }
        session.request_blocks(owed);
        tracing::info!(device = %path, "serial device reopened");
    }
}

async fn drive(
    port: &mut SerialStream,
    session: &mut HostSession,
    events: &mpsc::Sender<DeviceEvent>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    stats: &watch::Sender<SessionStats>,
    last_block: &mut Option<u64>,
    log_limiter: &mut LogLimiter,
) -> PortEnd {
    let mut buf = vec![0u8; 8192];
    loop {
        while let Some(bytes) = session.poll_transmit() {
            if let Err(e) = port.write_all(&bytes).await {
                return PortEnd::Failed(format!("write failed: {e}"));
            }
        }
        while let Some(event) = session.poll_event() {
            let Some(event) = translate(event, last_block, log_limiter) else { continue };
            if events.send(event).await.is_err() {
                return PortEnd::HandleGone;
            }
        }
        stats.send_if_modified(|s| {
            let changed = s != session.stats();
            if changed {
                *s = session.stats().clone();
            }
            changed
        });
        let deadline = Instant::from_std(session.poll_timeout());
        tokio::select! {
            read = port.read(&mut buf) => match read {
                Ok(0) => return PortEnd::Failed("end of file on the serial line".into()),
                Ok(n) => session.handle_bytes(Instant::now().into_std(), &buf[..n]),
                Err(e) => return PortEnd::Failed(format!("read failed: {e}")),
            },
            () = tokio::time::sleep_until(deadline) => session.handle_timeout(Instant::now().into_std()),
            command = commands.recv() => match command {
                Some(Command::RequestBlocks(n)) => session.request_blocks(n),
                None => return PortEnd::HandleGone,
            },
        }
    }
}

fn translate(event: HostEvent, last_block: &mut Option<u64>, log: &mut LogLimiter) -> Option<DeviceEvent> {
    Some(match event {
        HostEvent::SessionUp(info) => {
            tracing::info!(device_id = %info.device_id, link_id = %info.link_id, epoch = info.epoch, "QKD device session open");
            DeviceEvent::Connected(DeviceIdentity {
                device_id: info.device_id,
                link_id: info.link_id,
                firmware: info.firmware,
                role: Some(info.role),
            })
        }
        HostEvent::SessionLost(why) => {
            let reason = match why {
                SessionLoss::DeviceSilent => "the device stopped answering",
                SessionLoss::DeviceRebooted => "the device rebooted",
                SessionLoss::NoSession => "the device no longer knows the session",
                SessionLoss::Renewed => "session renewed before sequence numbers ran out",
            };
            tracing::warn!(reason, "QKD device session lost; re-handshaking");
            DeviceEvent::Disconnected { reason: reason.into() }
        }
        HostEvent::KeyBlock(block) => {
            *last_block = Some(block.block_id);
            DeviceEvent::KeyBlock(DeviceKeyBlock {
                block_id: BlockId::Sequence(block.block_id),
                kcv: block.kcv,
                created_unix_ms: block.created_unix_ms,
                qber_ppm: Some(block.qber_ppm),
                security_bits: Some(block.security_bits),
                key: block.key,
            })
        }
        HostEvent::Telemetry(t) => DeviceEvent::Telemetry(LinkTelemetry::from(&t)),
        HostEvent::Alarm(a) => {
            tracing::warn!(code = a.code, severity = ?a.severity, raised = a.raised, text = %a.text, "QKD device alarm");
            DeviceEvent::Alarm(a)
        }
        HostEvent::DeviceError(e) => {
            tracing::warn!(code = e.code, text = %e.text, "QKD device reported an error");
            return None;
        }
        HostEvent::Rejected(r) => {
            log.rejected(&r);
            return None;
        }
    })
}

/// Line noise can reject many frames a second; log the first of each burst and then a count.
#[derive(Default)]
struct LogLimiter {
    window_start: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    fn rejected(&mut self, r: &qkd_serial_proto::Rejection) {
        let now = Instant::now();
        match self.window_start {
            Some(start) if now < start + Duration::from_secs(10) => self.suppressed += 1,
            _ => {
                tracing::warn!(
                    rejected = %r,
                    suppressed_since_last = self.suppressed,
                    "dropped a damaged frame from the QKD device; it will be resent"
                );
                self.window_start = Some(now);
                self.suppressed = 0;
            }
        }
    }
}
