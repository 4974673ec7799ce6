//! `qkd-sim conformance`: a conformance kit for device firmware.
//!
//! Plays the host side of the serial protocol at the raw-frame level against a device (a real
//! UART or a pseudo-terminal) and reports, check by check, which parts of the specification
//! (`docs/serial-protocol.md`) the device gets right. Frames are built by hand so that the kit
//! can also send deliberately wrong ones: unknown types, malformed bodies, damaged CRCs,
//! stale epochs and unsupported versions.
//!
//! Every wait is bounded by the options (scaled for slow lines), and nothing the device sends
//! can panic the kit: a device that sends garbage or nothing gets FAILs, never a hang.
//!
//! ```no_run
//! # async fn demo() -> Result<(), qkd_sim::conformance::ConformanceError> {
//! use qkd_sim::conformance::{ConformanceOptions, run};
//! let report = run(ConformanceOptions::new("/dev/ttyUSB0")).await?;
//! print!("{}", report.to_table());
//! std::process::exit(if report.all_passed() { 0 } else { 1 });
//! # }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qkd_serial_proto::frame::{CRC_LEN, MAX_BODY_LEN, MAX_ENCODED_LEN, PROTOCOL_VERSION};
use qkd_serial_proto::{
    FrameDecoder, Hello, HelloAck, KeyBlock, MAX_KEY_LEN, Message, MessageType, RawFrame, Telemetry, cobs,
    error_code,
};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// What to test and how patient to be.
#[derive(Debug, Clone)]
pub struct ConformanceOptions {
    /// The device's serial port (a UART such as `/dev/ttyUSB0`, or a pseudo-terminal).
    pub device: PathBuf,
    /// Line speed in baud (8N1, no flow control). Every wait below is lengthened by the time
    /// the line needs to carry the frames that may be queued ahead of an answer.
    pub baud_rate: u32,
    /// How long the device may take to answer a frame (HELLO, PING, a bad frame).
    pub timeout: Duration,
    /// How long the device must stay quiet: no KEY_BLOCK without credit, none beyond it.
    pub quiet_period: Duration,
    /// How long the device may take to deliver key blocks once it has credit (it may have to
    /// distil them first).
    pub block_wait: Duration,
    /// How long the device may take to resend an unacknowledged frame (its retransmission
    /// timeout, plus margin).
    pub retransmit_wait: Duration,
    /// How long after the handshake the first TELEMETRY may take.
    pub telemetry_wait: Duration,
}

impl ConformanceOptions {
    /// Defaults for a device at 115200 baud: 2 s to answer, 2 s quiet periods, 30 s for key
    /// blocks, 10 s for a retransmission, 5 s for telemetry.
    pub fn new(device: impl Into<PathBuf>) -> Self {
        Self {
            device: device.into(),
            baud_rate: 115_200,
            timeout: Duration::from_millis(2000),
            quiet_period: Duration::from_millis(2000),
            block_wait: Duration::from_secs(30),
            retransmit_wait: Duration::from_secs(10),
            telemetry_wait: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<(), ConformanceError> {
        if self.baud_rate < 50 {
            return Err(ConformanceError::Options(format!("baud rate {} is below 50", self.baud_rate)));
        }
        let limit = Duration::from_secs(3600);
        for (name, d) in [
            ("timeout", self.timeout),
            ("quiet period", self.quiet_period),
            ("block wait", self.block_wait),
            ("retransmit wait", self.retransmit_wait),
            ("telemetry wait", self.telemetry_wait),
        ] {
            if d.is_zero() || d > limit {
                return Err(ConformanceError::Options(format!("{name} must be between 1 ms and 1 hour")));
            }
        }
        Ok(())
    }
}

/// Why the kit could not test the device at all (a device that misbehaves is a report, not
/// an error).
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// The serial port could not be opened.
    #[error("cannot open serial port {path}: {source}")]
    Open {
        /// The port.
        path: String,
        /// The cause.
        #[source]
        source: tokio_serial::Error,
    },
    /// The options are out of range.
    #[error("invalid options: {0}")]
    Options(String),
    /// The report could not be written.
    #[error("cannot write the report: {0}")]
    Output(#[from] std::io::Error),
}

/// The result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Outcome {
    /// The device behaved as specified.
    Pass,
    /// The device did not.
    Fail,
    /// The check could not run (an earlier check it depends on failed).
    Skip,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Skip => "SKIP",
        }
    }
}

/// The checks, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    /// HELLO → HELLO_ACK echoing the nonce, with a nonzero epoch and sane parameters.
    Handshake,
    /// A repeated HELLO with the same nonce keeps the epoch.
    HelloIdempotent,
    /// PING → PONG with the nonce, in the session epoch.
    Ping,
    /// No KEY_BLOCK without credit; CREDIT k → at most k valid blocks, seq from 1, no gaps.
    Credit,
    /// An unacknowledged frame is resent unchanged after the device's timeout.
    RetransmitTimeout,
    /// NAK → resend from the NAKed sequence number.
    Nak,
    /// A cumulative ACK releases the frames: the next frame has the next seq, no resends.
    CumulativeAck,
    /// An unknown message type → ERROR UNKNOWN_TYPE, session alive.
    UnknownType,
    /// A malformed body → ERROR MALFORMED_BODY, session alive.
    MalformedBody,
    /// Bad CRC, garbage and over-long runs are ignored, session alive.
    LineNoise,
    /// A frame of a stale epoch → ERROR NO_SESSION.
    StaleEpoch,
    /// Header version 2 is dropped; HELLO for version 0 → ERROR UNSUPPORTED_VERSION.
    Version,
    /// A new HELLO opens a new epoch; unacknowledged blocks are delivered again from seq 1.
    NewSession,
    /// TELEMETRY arrives, with fields in range.
    Telemetry,
}

impl Check {
    /// Every check, in report order.
    pub const ALL: [Check; 14] = [
        Self::Handshake,
        Self::HelloIdempotent,
        Self::Ping,
        Self::Credit,
        Self::RetransmitTimeout,
        Self::Nak,
        Self::CumulativeAck,
        Self::UnknownType,
        Self::MalformedBody,
        Self::LineNoise,
        Self::StaleEpoch,
        Self::Version,
        Self::NewSession,
        Self::Telemetry,
    ];

    /// Number in the report (1–14).
    pub fn number(self) -> u8 {
        match self {
            Self::Handshake => 1,
            Self::HelloIdempotent => 2,
            Self::Ping => 3,
            Self::Credit => 4,
            Self::RetransmitTimeout => 5,
            Self::Nak => 6,
            Self::CumulativeAck => 7,
            Self::UnknownType => 8,
            Self::MalformedBody => 9,
            Self::LineNoise => 10,
            Self::StaleEpoch => 11,
            Self::Version => 12,
            Self::NewSession => 13,
            Self::Telemetry => 14,
        }
    }

    /// Short name, stable for scripts (`--json`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::HelloIdempotent => "hello-idempotent",
            Self::Ping => "ping",
            Self::Credit => "credit",
            Self::RetransmitTimeout => "retransmit-timeout",
            Self::Nak => "nak",
            Self::CumulativeAck => "cumulative-ack",
            Self::UnknownType => "unknown-type",
            Self::MalformedBody => "malformed-body",
            Self::LineNoise => "line-noise",
            Self::StaleEpoch => "stale-epoch",
            Self::Version => "version",
            Self::NewSession => "new-session",
            Self::Telemetry => "telemetry",
        }
    }

    /// The sections of the specification (`docs/serial-protocol.md`) the check tests.
    pub fn spec_section(self) -> &'static str {
        match self {
            Self::Handshake => "§ 8.1 Handshake",
            Self::HelloIdempotent => "§ 8.1 Handshake (repeated HELLO)",
            Self::Ping => "§ 6.10 PING/PONG, § 11",
            Self::Credit => "§ 10 CREDIT, § 9.1, § 7 KCV",
            Self::RetransmitTimeout => "§ 9.4 Retransmission",
            Self::Nak => "§ 9.3 NAK",
            Self::CumulativeAck => "§ 9.2 ACK",
            Self::UnknownType => "§ 6, § 13.5 Errors",
            Self::MalformedBody => "§ 6, § 13.5 Errors",
            Self::LineNoise => "§ 3 Framing",
            Self::StaleEpoch => "§ 8.2 Stale epochs",
            Self::Version => "§ 4.1 Versioning",
            Self::NewSession => "§ 8.1, § 9.6 New session",
            Self::Telemetry => "§ 6.8 TELEMETRY",
        }
    }

    /// What the check verifies, in one line.
    pub fn description(self) -> &'static str {
        match self {
            Self::Handshake => {
                "HELLO is answered by a HELLO_ACK echoing the nonce, nonzero epoch, sane window, max_key_len and IDs"
            }
            Self::HelloIdempotent => "a repeated HELLO with the same nonce keeps the epoch",
            Self::Ping => "PING is answered by a PONG with the same nonce in the session epoch",
            Self::Credit => {
                "no KEY_BLOCK without credit; CREDIT k gives at most k blocks, seq 1.. without gaps, IDs increasing, KCVs valid"
            }
            Self::RetransmitTimeout => {
                "an unacknowledged frame is resent, byte for byte, after the device's timeout"
            }
            Self::Nak => "NAK n makes the device resend from seq n (go-back-N)",
            Self::CumulativeAck => {
                "a cumulative ACK releases the frames: the next has the next seq, none is resent"
            }
            Self::UnknownType => "an unknown message type gets ERROR UNKNOWN_TYPE and the session survives",
            Self::MalformedBody => "a malformed body gets ERROR MALFORMED_BODY and the session survives",
            Self::LineNoise => "bad CRCs, garbage and over-long runs are ignored and the session survives",
            Self::StaleEpoch => "a frame of a stale epoch gets ERROR NO_SESSION and no answer",
            Self::Version => {
                "header version 2 is dropped; HELLO for version 0 gets ERROR UNSUPPORTED_VERSION"
            }
            Self::NewSession => {
                "a new HELLO opens a new epoch; unacknowledged blocks come again (same IDs, KCVs) from seq 1"
            }
            Self::Telemetry => "TELEMETRY arrives in the session epoch with its fields in range",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// Number in the report (1–14).
    pub number: u8,
    /// Short name (see [`Check::name`]).
    pub name: &'static str,
    /// PASS, FAIL or SKIP.
    pub outcome: Outcome,
    /// What the device did, in one line.
    pub detail: String,
    /// The part of the specification tested.
    pub spec_section: &'static str,
    /// What the check verifies.
    pub description: &'static str,
    /// Wall-clock time the check took.
    pub elapsed_ms: u64,
    #[serde(skip)]
    check: Option<Check>,
}

impl CheckResult {
    /// Which check this is.
    pub fn check(&self) -> Option<Check> {
        self.check
    }
}

/// What the device said about itself in its HELLO_ACK.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceSummary {
    /// Device identifier.
    pub device_id: String,
    /// Link identifier.
    pub link_id: String,
    /// Firmware version.
    pub firmware: String,
    /// `transmitter` or `receiver`.
    pub role: &'static str,
    /// Protocol version the device speaks.
    pub protocol_version: u16,
    /// Reliable frames in flight.
    pub window: u8,
    /// Largest key block, bytes.
    pub max_key_len: u16,
    /// The first session's epoch.
    pub epoch: u32,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct ConformanceReport {
    /// The port tested.
    pub device: String,
    /// Line speed used.
    pub baud_rate: u32,
    /// The device's HELLO_ACK, if the handshake got that far.
    pub device_info: Option<DeviceSummary>,
    /// One result per check, in order.
    pub checks: Vec<CheckResult>,
    /// Checks passed.
    pub passed: usize,
    /// Checks failed.
    pub failed: usize,
    /// Checks skipped.
    pub skipped: usize,
    /// Things the kit noticed outside the checks (reboots, unexpected errors).
    pub notes: Vec<String>,
    /// Wall-clock time of the run.
    pub elapsed_ms: u64,
}

impl ConformanceReport {
    /// Whether no check failed (the command's exit status).
    pub fn all_passed(&self) -> bool {
        self.failed == 0
    }

    /// The result of one check.
    pub fn get(&self, check: Check) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.check == Some(check))
    }

    /// The report as a human-readable table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ =
            writeln!(out, "QuteMail serial protocol conformance: {} at {} baud", self.device, self.baud_rate);
        if let Some(d) = &self.device_info {
            let _ = writeln!(
                out,
                "device {}  link {}  firmware {}  role {}  protocol v{}  window {}  max key {} B",
                d.device_id, d.link_id, d.firmware, d.role, d.protocol_version, d.window, d.max_key_len
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "{:>2}  {:<6}  {:<18}  {:<34}  detail", "#", "result", "check", "spec section");
        for c in &self.checks {
            let _ = writeln!(
                out,
                "{:>2}  {:<6}  {:<18}  {:<34}  {}",
                c.number,
                c.outcome.as_str(),
                c.name,
                c.spec_section,
                c.detail
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out);
            for n in &self.notes {
                let _ = writeln!(out, "note: {n}");
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{} passed, {} failed, {} skipped in {:.1} s",
            self.passed,
            self.failed,
            self.skipped,
            self.elapsed_ms as f64 / 1000.0
        );
        out
    }
}

/// Opens the port, runs every check and returns the report.
pub async fn run(opts: ConformanceOptions) -> Result<ConformanceReport, ConformanceError> {
    use tokio_serial::SerialPortBuilderExt;
    opts.validate()?;
    let path = opts.device.display().to_string();
    let port = tokio_serial::new(&path, opts.baud_rate)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(tokio_serial::Parity::None)
        .stop_bits(tokio_serial::StopBits::One)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(|source| ConformanceError::Open { path: path.clone(), source })?;
    run_on(port, opts).await
}

/// Runs every check over an already open byte stream (`opts.device` only names it in the report).
pub async fn run_on<S>(stream: S, opts: ConformanceOptions) -> Result<ConformanceReport, ConformanceError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    opts.validate()?;
    let mut runner = Runner::new(stream, opts);
    runner.run_all().await;
    Ok(runner.finish())
}

/// Runs the checks and prints the report (JSON or a table) on stdout; returns whether every
/// check passed. This is `qkd-sim conformance`.
pub async fn cli(opts: ConformanceOptions, json: bool) -> Result<bool, ConformanceError> {
    use std::io::Write;
    let report = run(opts).await?;
    let mut stdout = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?;
        writeln!(stdout, "{text}")?;
    } else {
        write!(stdout, "{}", report.to_table())?;
    }
    stdout.flush()?;
    Ok(report.all_passed())
}

// ---------------------------------------------------------------------------------------------
// The line.

/// A frame as received, with its arrival time.
#[derive(Debug, Clone)]
struct Rx {
    at: Instant,
    frame: RawFrame,
}

/// The byte stream with a frame decoder; every read is bounded by a deadline.
struct Link<S> {
    stream: S,
    decoder: FrameDecoder,
    queue: VecDeque<Rx>,
    buf: Vec<u8>,
    baud: u32,
    failed: Option<String>,
    bytes_in: u64,
    frames_in: u64,
    frame_errors: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    fn new(stream: S, baud: u32) -> Self {
        Self {
            stream,
            decoder: FrameDecoder::new(),
            queue: VecDeque::new(),
            buf: vec![0; 4096],
            baud,
            failed: None,
            bytes_in: 0,
            frames_in: 0,
            frame_errors: 0,
        }
    }

    /// Time the line needs for `bytes` (10 bits a byte).
    fn line_time(&self, bytes: usize) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 10.0 / f64::from(self.baud.max(1)))
    }

    /// Writes `bytes`, giving up (and marking the line failed) if the write stalls.
    async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), String> {
        if let Some(why) = &self.failed {
            return Err(why.clone());
        }
        let limit = self.line_time(bytes.len()) * 4 + Duration::from_secs(2);
        let result = tokio::time::timeout(limit, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await;
        let why = match result {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => format!("write failed: {e}"),
            Err(_) => format!("write of {} bytes stalled for {} ms", bytes.len(), limit.as_millis()),
        };
        self.failed = Some(why.clone());
        Err(why)
    }

    /// The next frame, or `None` once `deadline` has passed (or the line has failed).
    async fn recv(&mut self, deadline: Instant) -> Option<Rx> {
        loop {
            if Instant::now() >= deadline {
                return None;
            }
            if let Some(rx) = self.queue.pop_front() {
                return Some(rx);
            }
            if self.failed.is_some() {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut self.buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) => {
                    self.failed = Some("end of file on the serial line".into());
                    return None;
                }
                Ok(Ok(n)) => {
                    let at = Instant::now();
                    self.bytes_in += n as u64;
                    let Self { decoder, queue, buf, frames_in, frame_errors, .. } = self;
                    let chunk = buf.get(..n).unwrap_or_default();
                    decoder.push(chunk, |f| match f {
                        Ok(frame) => {
                            *frames_in += 1;
                            queue.push_back(Rx { at, frame });
                        }
                        Err(_) => *frame_errors += 1,
                    });
                }
                Ok(Err(e)) => {
                    self.failed = Some(format!("read failed: {e}"));
                    return None;
                }
            }
        }
    }
}

/// Wire bytes of a frame with any header version and optionally a damaged CRC.
fn wire(version: u8, msg_type: u8, epoch: u32, seq: u32, body: &[u8], damage_crc: bool) -> Vec<u8> {
    let mut raw = Vec::with_capacity(12 + body.len() + CRC_LEN);
    raw.push(version);
    raw.push(msg_type);
    raw.extend_from_slice(&epoch.to_be_bytes());
    raw.extend_from_slice(&seq.to_be_bytes());
    raw.extend_from_slice(&(body.len() as u16).to_be_bytes());
    raw.extend_from_slice(body);
    let mut crc = crc32c(&raw);
    if damage_crc {
        crc ^= 0x0000_0100;
    }
    raw.extend_from_slice(&crc.to_be_bytes());
    let mut out = Vec::new();
    cobs::encode_into(&raw, &mut out);
    out.push(0);
    out
}

/// CRC-32C (Castagnoli), reflected, as in the frame trailer.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

// ---------------------------------------------------------------------------------------------
// Session bookkeeping.

/// Reliable frames of the current epoch, as the host sees them.
#[derive(Default)]
struct Delivery {
    /// First transmission of each sequence number.
    first_tx: BTreeMap<u32, Rx>,
    /// Key blocks in order of first arrival: (seq, block, arrival).
    key_blocks: Vec<(u32, KeyBlock, Instant)>,
    /// Every arrival of a sequence number seen before: (seq, arrival, byte-identical).
    retransmissions: Vec<(u32, Instant, bool)>,
    /// Next sequence number we acknowledged (1: nothing acknowledged).
    acked: u32,
    /// Arrivals of frames below `acked`: (seq, arrival).
    after_ack: Vec<(u32, Instant)>,
    /// Cumulative credit granted in this epoch.
    credit: u32,
    /// Protocol violations seen in reliable frames (bad blocks, credit overruns), with arrival.
    violations: Vec<(Instant, String)>,
}

/// Arrivals kept at most, so a flooding device cannot exhaust memory.
const MAX_TRACKED: usize = 20_000;

impl Delivery {
    fn new() -> Self {
        Self { acked: 1, ..Self::default() }
    }

    fn record(&mut self, rx: &Rx, max_key_len: u16) {
        let f = &rx.frame;
        let seq = f.seq;
        if seq == 0 {
            self.violate(rx.at, format!("reliable frame type {:#04x} with seq 0", f.msg_type));
            return;
        }
        if let Some(first) = self.first_tx.get(&seq) {
            let identical = first.frame == *f;
            if self.retransmissions.len() < MAX_TRACKED {
                self.retransmissions.push((seq, rx.at, identical));
            }
            if seq < self.acked && self.after_ack.len() < MAX_TRACKED {
                self.after_ack.push((seq, rx.at));
            }
            return;
        }
        if self.first_tx.len() >= MAX_TRACKED {
            return;
        }
        self.first_tx.insert(seq, rx.clone());
        if f.msg_type != MessageType::KeyBlock as u8 {
            if let Err(e) = Message::decode(f.msg_type, &f.body) {
                self.violate(rx.at, format!("seq {seq}: {e}"));
            }
            return;
        }
        match Message::decode(f.msg_type, &f.body) {
            Ok(Message::KeyBlock(kb)) => {
                if !kb.kcv_matches() {
                    self.violate(
                        rx.at,
                        format!("KEY_BLOCK seq {seq} (block {}): KCV does not match", kb.block_id),
                    );
                }
                if kb.key.len() > usize::from(max_key_len) {
                    self.violate(
                        rx.at,
                        format!(
                            "KEY_BLOCK seq {seq}: {}-byte key exceeds max_key_len {max_key_len}",
                            kb.key.len()
                        ),
                    );
                }
                let n = self.key_blocks.len() as u64 + 1;
                if n > u64::from(self.credit) {
                    self.violate(
                        rx.at,
                        format!(
                            "KEY_BLOCK seq {seq} is block {n} of the session, credit was {}",
                            self.credit
                        ),
                    );
                }
                self.key_blocks.push((seq, kb, rx.at));
            }
            Ok(_) => {}
            Err(e) => self.violate(rx.at, format!("KEY_BLOCK seq {seq}: {e}")),
        }
    }

    fn violate(&mut self, at: Instant, what: String) {
        if self.violations.len() < 64 {
            self.violations.push((at, what));
        }
    }

    fn max_seq(&self) -> u32 {
        self.first_tx.keys().next_back().copied().unwrap_or(0)
    }

    /// Whether the sequence numbers seen are exactly 1..=max.
    fn contiguous_from_one(&self) -> Result<(), String> {
        let mut expected = 1u32;
        for &seq in self.first_tx.keys() {
            if seq != expected {
                return Err(if expected == 1 {
                    format!("first reliable frame has seq {seq}, not 1")
                } else {
                    format!("seq {} missing (next was {seq})", expected)
                });
            }
            expected = expected.saturating_add(1);
        }
        Ok(())
    }

    /// First arrival of `seq` again at or after `since`.
    fn resent_since(&self, seq: u32, since: Instant) -> Option<(Instant, bool)> {
        self.retransmissions
            .iter()
            .find(|(s, at, _)| *s == seq && *at >= since)
            .map(|&(_, at, same)| (at, same))
    }
}

struct Session {
    epoch: u32,
    nonce: u64,
    ack: HelloAck,
    delivery: Delivery,
}

struct TelemetrySeen {
    at: Instant,
    epoch: u32,
    session_epoch: Option<u32>,
    seq: u32,
    body: Result<Telemetry, String>,
}

// ---------------------------------------------------------------------------------------------
// The runner.

struct Runner<S> {
    link: Link<S>,
    opts: ConformanceOptions,
    started: Instant,
    results: BTreeMap<Check, CheckResult>,
    session: Option<Session>,
    device_info: Option<DeviceSummary>,
    session_opened_at: Option<Instant>,
    telemetry: Vec<TelemetrySeen>,
    notes: Vec<String>,
    /// While a check waits for an ERROR, ERRORs are its business, not a note.
    awaiting_error: bool,
    /// Observed retransmission timeout (first transmission to first resend).
    observed_rto: Option<Duration>,
    /// Violations already reported by the credit check.
    credit_violations_reported: usize,
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn kcv_hex(kcv: &[u8]) -> String {
    kcv.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

impl<S: AsyncRead + AsyncWrite + Unpin> Runner<S> {
    fn new(stream: S, opts: ConformanceOptions) -> Self {
        Self {
            link: Link::new(stream, opts.baud_rate),
            started: Instant::now(),
            opts,
            results: BTreeMap::new(),
            session: None,
            device_info: None,
            session_opened_at: None,
            telemetry: Vec::new(),
            notes: Vec::new(),
            awaiting_error: false,
            observed_rto: None,
            credit_violations_reported: 0,
        }
    }

    // --- timing -----------------------------------------------------------------------------

    /// Bytes the device may have queued ahead of an answer: a window of full key blocks.
    fn backlog_bytes(&self) -> usize {
        match &self.session {
            Some(s) => (usize::from(s.ack.window) + 1) * (usize::from(s.ack.max_key_len) + 80) + 256,
            None => 512,
        }
    }

    fn answer_wait(&self) -> Duration {
        self.opts.timeout + self.link.line_time(self.backlog_bytes())
    }

    fn block_wait(&self) -> Duration {
        self.opts.block_wait + self.link.line_time(self.backlog_bytes())
    }

    fn retransmit_wait(&self) -> Duration {
        self.opts.retransmit_wait + self.link.line_time(self.backlog_bytes())
    }

    /// Margin for frames already on the line when the device changed its mind.
    fn grace(&self) -> Duration {
        Duration::from_millis(100) + self.link.line_time(self.backlog_bytes())
    }

    // --- results ----------------------------------------------------------------------------

    fn record(&mut self, check: Check, outcome: Outcome, detail: impl Into<String>, since: Instant) {
        let elapsed = Instant::now().saturating_duration_since(since);
        self.results.insert(
            check,
            CheckResult {
                number: check.number(),
                name: check.name(),
                outcome,
                detail: detail.into(),
                spec_section: check.spec_section(),
                description: check.description(),
                elapsed_ms: elapsed.as_millis() as u64,
                check: Some(check),
            },
        );
    }

    fn pass(&mut self, check: Check, detail: impl Into<String>, since: Instant) {
        self.record(check, Outcome::Pass, detail, since);
    }

    fn fail(&mut self, check: Check, detail: impl Into<String>, since: Instant) {
        self.record(check, Outcome::Fail, detail, since);
    }

    fn skip(&mut self, check: Check, detail: impl Into<String>) {
        let now = Instant::now();
        self.record(check, Outcome::Skip, detail, now);
    }

    fn note(&mut self, text: String) {
        if self.notes.len() < 20 {
            self.notes.push(text);
        }
    }

    /// Turns an earlier PASS into a FAIL because of what happened later.
    fn amend_fail(&mut self, check: Check, why: &str) {
        if let Some(r) = self.results.get_mut(&check) {
            if r.outcome == Outcome::Pass {
                r.outcome = Outcome::Fail;
                r.detail = format!("later: {why} (before that: {})", r.detail);
            } else if r.outcome == Outcome::Fail && !r.detail.contains("later:") {
                r.detail = format!("{}; later: {why}", r.detail);
            }
        }
    }

    /// Why a check that needs a session cannot run, if it cannot.
    fn blocker(&self) -> Option<String> {
        if let Some(why) = &self.link.failed {
            return Some(format!("the serial line failed: {why}"));
        }
        if self.session.is_none() {
            return Some("no session: the handshake failed".into());
        }
        None
    }

    fn epoch(&self) -> u32 {
        self.session.as_ref().map_or(0, |s| s.epoch)
    }

    // --- I/O --------------------------------------------------------------------------------

    async fn send_frame(&mut self, epoch: u32, seq: u32, msg: &Message) -> Result<(), String> {
        let frame = RawFrame {
            version: PROTOCOL_VERSION,
            msg_type: msg.msg_type() as u8,
            epoch,
            seq,
            body: msg.encode_body(),
        };
        self.link.send_bytes(&frame.to_wire()).await
    }

    async fn send(&mut self, msg: &Message) -> Result<(), String> {
        let epoch = self.epoch();
        self.send_frame(epoch, 0, msg).await
    }

    /// The next frame before `deadline`, after bookkeeping.
    async fn next(&mut self, deadline: Instant) -> Option<Rx> {
        let rx = self.link.recv(deadline).await?;
        self.observe(&rx);
        Some(rx)
    }

    /// Reads frames until `done` holds or `deadline` passes; returns whether `done` held.
    async fn pump(&mut self, deadline: Instant, done: impl Fn(&Self) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            if self.next(deadline).await.is_none() {
                return done(self);
            }
        }
    }

    fn observe(&mut self, rx: &Rx) {
        let f = &rx.frame;
        match MessageType::from_code(f.msg_type) {
            // Kept up to a bound, so a flooding device cannot exhaust memory.
            Some(MessageType::Telemetry) if self.telemetry.len() < 256 => {
                let body = match Message::decode(f.msg_type, &f.body) {
                    Ok(Message::Telemetry(t)) => Ok(t),
                    Ok(_) => Err("not a telemetry body".into()),
                    Err(e) => Err(e.to_string()),
                };
                let session_epoch = self.session.as_ref().map(|s| s.epoch);
                self.telemetry.push(TelemetrySeen {
                    at: rx.at,
                    epoch: f.epoch,
                    session_epoch,
                    seq: f.seq,
                    body,
                });
            }
            Some(MessageType::Announce) => {
                let boots = match Message::decode(f.msg_type, &f.body) {
                    Ok(Message::Announce { boot_count }) => boot_count.to_string(),
                    _ => "?".into(),
                };
                if self.session.is_some() {
                    let t = rx.at.saturating_duration_since(self.started).as_secs_f64();
                    self.note(format!(
                        "the device announced a reboot (boot count {boots}) {t:.1} s into the run"
                    ));
                }
            }
            Some(MessageType::Error) if !self.awaiting_error && self.session.is_some() => {
                let what = match Message::decode(f.msg_type, &f.body) {
                    Ok(Message::Error(e)) => format!("code {:#06x} ({})", e.code, e.text),
                    Ok(_) | Err(_) => "with a malformed body".into(),
                };
                let t = rx.at.saturating_duration_since(self.started).as_secs_f64();
                self.note(format!("unsolicited ERROR {what} {t:.1} s into the run"));
            }
            Some(t) if t.is_reliable() => {
                if let Some(s) = &mut self.session
                    && f.epoch == s.epoch
                {
                    let max = s.ack.max_key_len;
                    s.delivery.record(rx, max);
                }
            }
            _ => {}
        }
    }

    /// PING in `epoch`; Ok(round trip) when the PONG comes in the session epoch.
    async fn ping(&mut self) -> Result<Duration, String> {
        let epoch = self.epoch();
        let nonce: u64 = rand::random();
        let sent = Instant::now();
        self.send_frame(epoch, 0, &Message::Ping { nonce }).await?;
        let deadline = sent + self.answer_wait();
        let mut wrong = None;
        while let Some(rx) = self.next(deadline).await {
            if let Some((n, e, seq)) = pong_of(&rx) {
                if n == nonce && e == epoch && seq == 0 {
                    return Ok(rx.at.saturating_duration_since(sent));
                }
                if n == nonce && e == epoch {
                    return Err(format!("PONG with seq {seq} (an unreliable frame has seq 0)"));
                }
                if n == nonce {
                    wrong = Some(format!("PONG came in epoch {e:#010x}, not the session's {epoch:#010x}"));
                } else if wrong.is_none() {
                    wrong = Some(format!("PONG carried nonce {n:#018x}, not {nonce:#018x}"));
                }
            }
        }
        Err(wrong.unwrap_or_else(|| self.silence("PONG", deadline - sent)))
    }

    /// "no X within N ms", with what did arrive.
    fn silence(&self, what: &str, waited: Duration) -> String {
        let mut s = format!("no {what} within {} ms", ms(waited));
        if let Some(why) = &self.link.failed {
            let _ = write!(s, " ({why})");
        } else if self.link.frames_in == 0 {
            let _ = write!(
                s,
                " (no valid frame at all: {} bytes, {} damaged frames)",
                self.link.bytes_in, self.link.frame_errors
            );
        }
        s
    }

    /// Waits for the next ERROR (any epoch); returns its code, text and epoch.
    async fn expect_error(&mut self, deadline: Instant) -> Option<ErrorSeen> {
        self.awaiting_error = true;
        let mut found = None;
        while let Some(rx) = self.next(deadline).await {
            if let Some(e) = error_of(&rx) {
                found = Some(e);
                break;
            }
        }
        self.awaiting_error = false;
        found
    }

    // --- the run ----------------------------------------------------------------------------

    async fn run_all(&mut self) {
        self.handshake().await;
        self.hello_idempotent().await;
        self.ping_check().await;
        self.key_delivery().await;
        self.unknown_type().await;
        self.malformed_body().await;
        self.line_noise().await;
        self.stale_epoch().await;
        self.version().await;
        self.new_session().await;
        self.telemetry_check().await;
        self.flush_violations();
    }

    /// Violations in key blocks after the credit check ran (e.g. in the NAK or re-handshake
    /// checks) still count against it. Called before the session's bookkeeping is replaced.
    fn flush_violations(&mut self) {
        let Some(s) = &self.session else { return };
        let total = s.delivery.violations.len();
        let first_new = s.delivery.violations.get(self.credit_violations_reported..).and_then(|v| v.first());
        let first_new = first_new.map(|(_, v)| v.clone());
        if let Some(first) = first_new {
            self.amend_fail(Check::Credit, &first);
        }
        self.credit_violations_reported = total;
    }

    /// Follows the device into another session (new epoch, fresh bookkeeping).
    fn switch_session(&mut self, epoch: u32, nonce: u64, ack: Option<HelloAck>) {
        self.flush_violations();
        self.credit_violations_reported = 0;
        if let Some(s) = &mut self.session {
            s.epoch = epoch;
            s.nonce = nonce;
            if let Some(ack) = ack {
                s.ack = ack;
            }
            s.delivery = Delivery::new();
        }
    }

    fn finish(mut self) -> ConformanceReport {
        for check in Check::ALL {
            if !self.results.contains_key(&check) {
                self.skip(check, "not run");
            }
        }
        let checks: Vec<CheckResult> = self.results.into_values().collect();
        let count = |o: Outcome| checks.iter().filter(|c| c.outcome == o).count();
        ConformanceReport {
            device: self.opts.device.display().to_string(),
            baud_rate: self.opts.baud_rate,
            device_info: self.device_info,
            passed: count(Outcome::Pass),
            failed: count(Outcome::Fail),
            skipped: count(Outcome::Skip),
            checks,
            notes: self.notes,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    // 1
    async fn handshake(&mut self) {
        let start = Instant::now();
        let nonce = loop {
            let n: u64 = rand::random();
            if n != 0 {
                break n;
            }
        };
        let hello = Message::Hello(Hello {
            protocol_version: 1,
            host_nonce: nonce,
            max_body_len: MAX_BODY_LEN as u16,
        });
        let deadline = start + self.answer_wait();
        // Repeat the HELLO (same nonce) a few times, as a host does, in case the device was busy.
        let resend_every = (self.opts.timeout / 4).max(Duration::from_millis(100));
        let mut next_hello = start;
        let mut wrong_nonce = None;
        let mut bad_body = None;
        let mut answer = None;
        while answer.is_none() && Instant::now() < deadline {
            if Instant::now() >= next_hello {
                if let Err(e) = self.send_frame(0, 0, &hello).await {
                    self.fail(Check::Handshake, format!("cannot send HELLO: {e}"), start);
                    return;
                }
                next_hello += resend_every;
            }
            let Some(rx) = self.next(deadline.min(next_hello)).await else {
                if self.link.failed.is_some() {
                    break;
                }
                continue;
            };
            if rx.frame.msg_type != MessageType::HelloAck as u8 {
                continue;
            }
            match Message::decode(rx.frame.msg_type, &rx.frame.body) {
                Ok(Message::HelloAck(ack)) if ack.host_nonce == nonce => answer = Some((rx, ack)),
                Ok(Message::HelloAck(ack)) => wrong_nonce = Some(ack.host_nonce),
                Ok(_) => {}
                Err(e) => bad_body = Some(e.to_string()),
            }
        }
        let Some((rx, ack)) = answer else {
            let detail = if let Some(got) = wrong_nonce {
                format!("HELLO_ACK echoed nonce {got:#018x}, not the HELLO's {nonce:#018x}")
            } else if let Some(e) = bad_body {
                format!("HELLO_ACK body is malformed: {e}")
            } else {
                self.silence("HELLO_ACK", deadline - start)
            };
            self.fail(Check::Handshake, detail, start);
            return;
        };
        let epoch = rx.frame.epoch;
        let mut problems = Vec::new();
        if epoch == 0 {
            problems.push("epoch is 0".to_string());
        }
        if rx.frame.seq != 0 {
            problems.push(format!("seq {} on an unreliable frame", rx.frame.seq));
        }
        if ack.protocol_version != u16::from(PROTOCOL_VERSION) {
            problems.push(format!("protocol_version {} (expected {PROTOCOL_VERSION})", ack.protocol_version));
        }
        if ack.max_key_len == 0 || usize::from(ack.max_key_len) > MAX_KEY_LEN {
            problems.push(format!("max_key_len {} outside 1..={MAX_KEY_LEN}", ack.max_key_len));
        }
        if ack.device_id.trim().is_empty() {
            problems.push("device_id is empty".into());
        }
        if ack.link_id.trim().is_empty() {
            problems.push("link_id is empty".into());
        }
        self.device_info = Some(DeviceSummary {
            device_id: ack.device_id.clone(),
            link_id: ack.link_id.clone(),
            firmware: ack.firmware.clone(),
            role: match ack.role {
                qkd_serial_proto::DeviceRole::Transmitter => "transmitter",
                qkd_serial_proto::DeviceRole::Receiver => "receiver",
            },
            protocol_version: ack.protocol_version,
            window: ack.window,
            max_key_len: ack.max_key_len,
            epoch,
        });
        let rtt = rx.at.saturating_duration_since(start);
        let summary = format!(
            "epoch {epoch:#010x}, window {}, max key {} B, device {:?}, link {:?}",
            ack.window, ack.max_key_len, ack.device_id, ack.link_id
        );
        if epoch != 0 {
            self.session = Some(Session { epoch, nonce, ack, delivery: Delivery::new() });
            self.session_opened_at = Some(rx.at);
        }
        if problems.is_empty() {
            self.pass(Check::Handshake, format!("HELLO_ACK after {} ms: {summary}", ms(rtt)), start);
        } else {
            self.fail(Check::Handshake, format!("HELLO_ACK: {} ({summary})", problems.join("; ")), start);
        }
    }

    // 2
    async fn hello_idempotent(&mut self) {
        if let Some(why) = self.blocker() {
            return self.skip(Check::HelloIdempotent, why);
        }
        let start = Instant::now();
        let (epoch, nonce) = self.session.as_ref().map_or((0, 0), |s| (s.epoch, s.nonce));
        let hello = Message::Hello(Hello {
            protocol_version: 1,
            host_nonce: nonce,
            max_body_len: MAX_BODY_LEN as u16,
        });
        if let Err(e) = self.send_frame(0, 0, &hello).await {
            return self.fail(Check::HelloIdempotent, format!("cannot send HELLO: {e}"), start);
        }
        let deadline = start + self.answer_wait();
        while let Some(rx) = self.next(deadline).await {
            if rx.frame.msg_type != MessageType::HelloAck as u8 {
                continue;
            }
            let Ok(Message::HelloAck(ack)) = Message::decode(rx.frame.msg_type, &rx.frame.body) else {
                continue;
            };
            if ack.host_nonce != nonce {
                continue;
            }
            let got = rx.frame.epoch;
            if got == epoch {
                return self.pass(
                    Check::HelloIdempotent,
                    format!("the same epoch {epoch:#010x} after a repeated HELLO"),
                    start,
                );
            }
            // Carry on in the device's new session, so later checks still test something.
            if got != 0 {
                self.switch_session(got, nonce, None);
            }
            return self.fail(
                Check::HelloIdempotent,
                format!(
                    "a repeated HELLO (same nonce) moved the session from epoch {epoch:#010x} to {got:#010x}"
                ),
                start,
            );
        }
        let detail = self.silence("HELLO_ACK to the repeated HELLO", deadline - start);
        self.fail(Check::HelloIdempotent, detail, start);
    }

    // 3
    async fn ping_check(&mut self) {
        if let Some(why) = self.blocker() {
            return self.skip(Check::Ping, why);
        }
        let start = Instant::now();
        match self.ping().await {
            Ok(rtt) => self.pass(
                Check::Ping,
                format!("PONG with the nonce in the session epoch after {} ms", ms(rtt)),
                start,
            ),
            Err(e) => self.fail(Check::Ping, e, start),
        }
    }

    fn delivery(&self) -> Option<&Delivery> {
        self.session.as_ref().map(|s| &s.delivery)
    }

    fn window(&self) -> u32 {
        self.session.as_ref().map_or(1, |s| u32::from(s.ack.window))
    }

    async fn grant(&mut self, limit: u32) -> Result<(), String> {
        if let Some(s) = &mut self.session {
            s.delivery.credit = limit;
        }
        self.send(&Message::Credit { block_limit: limit }).await
    }

    async fn ack(&mut self, next_seq: u32) -> Result<(), String> {
        if let Some(s) = &mut self.session {
            s.delivery.acked = s.delivery.acked.max(next_seq);
        }
        self.send(&Message::Ack { next_seq }).await
    }

    fn key_count(&self) -> usize {
        self.delivery().map_or(0, |d| d.key_blocks.len())
    }

    // 4, 5, 6 and 7: credit, retransmission, NAK, ACK.
    async fn key_delivery(&mut self) {
        if let Some(why) = self.blocker() {
            for c in [Check::Credit, Check::RetransmitTimeout, Check::Nak, Check::CumulativeAck] {
                self.skip(c, why.clone());
            }
            return;
        }
        let blocks_ok = self.credit_check().await;
        let no_blocks = "no key blocks were delivered (see check 4)";
        if !blocks_ok || self.key_count() == 0 {
            let why = self.blocker().unwrap_or_else(|| no_blocks.into());
            for c in [Check::RetransmitTimeout, Check::Nak, Check::CumulativeAck] {
                self.skip(c, why.clone());
            }
            return;
        }
        self.retransmit_check().await;
        self.ack_and_nak_checks().await;
    }

    /// Check 4. Returns whether any key block came (so 5–7 can run).
    async fn credit_check(&mut self) -> bool {
        let start = Instant::now();
        // No credit: nothing may come.
        let quiet_until = start + self.opts.quiet_period;
        self.pump(quiet_until, |_| false).await;
        let early: Vec<(u32, u64)> = self
            .delivery()
            .map(|d| d.key_blocks.iter().map(|(seq, kb, _)| (*seq, kb.block_id)).collect())
            .unwrap_or_default();
        let mut problems = Vec::new();
        if let Some((seq, id)) = early.first() {
            problems.push(format!(
                "{} KEY_BLOCK(s) without any credit (first: seq {seq}, block {id})",
                early.len()
            ));
        }
        // How meaningful the silence was: did the device say it had blocks waiting?
        let buffered =
            self.telemetry.iter().rev().find_map(|t| t.body.as_ref().ok().map(|t| t.buffered_blocks));
        // CREDIT k: k blocks, then nothing more.
        let k = self.window().clamp(1, 3);
        let limit = early.len() as u32 + k;
        let credit_sent = Instant::now();
        if let Err(e) = self.grant(limit).await {
            self.fail(Check::Credit, format!("cannot send CREDIT: {e}"), start);
            return false;
        }
        let want = limit as usize;
        let got_all = self.pump(credit_sent + self.block_wait(), |r| r.key_count() >= want).await;
        let after_k = Instant::now();
        self.pump(after_k + self.opts.quiet_period, |_| false).await;
        let Some(d) = self.delivery() else { return false };
        let n = d.key_blocks.len().saturating_sub(early.len());
        if n == 0 {
            problems.push(format!("no KEY_BLOCK within {} ms of CREDIT {limit}", ms(self.block_wait())));
        }
        if let Err(e) = d.contiguous_from_one() {
            problems.push(e);
        }
        let ids: Vec<u64> = d.key_blocks.iter().map(|(_, kb, _)| kb.block_id).collect();
        if let Some(w) = ids.windows(2).find(|w| w[1] <= w[0]) {
            problems.push(format!("block IDs not strictly increasing ({} then {})", w[0], w[1]));
        }
        // Credit overruns and bad blocks are collected as they arrive.
        problems.extend(d.violations.iter().filter(|(at, _)| *at >= credit_sent).map(|(_, v)| v.clone()));
        let violations = d.violations.len();
        let (first_seq, last_seq) = (d.first_tx.keys().next().copied(), d.max_seq());
        let key_lens = d.key_blocks.iter().map(|(_, kb, _)| kb.key.len()).max().unwrap_or(0);
        let any_blocks = !d.key_blocks.is_empty();
        let first_kcv = d.key_blocks.first().map(|(_, kb, _)| kcv_hex(&kb.kcv)).unwrap_or_default();
        self.credit_violations_reported = violations;
        let quiet_ms = ms(self.opts.quiet_period);
        if problems.is_empty() {
            let short = if got_all { String::new() } else { format!(" (the device had only {n} ready)") };
            let detail = format!(
                "no KEY_BLOCK in {quiet_ms} ms without credit{}; CREDIT {limit} → {n} block(s){short}, seq {}–{last_seq}, \
                 IDs {}–{} increasing, KCVs valid (first {first_kcv}…), keys ≤ {key_lens} B, none more in {quiet_ms} ms",
                buffered.map(|b| format!(" ({b} buffered per TELEMETRY)")).unwrap_or_default(),
                first_seq.unwrap_or(0),
                ids.first().copied().unwrap_or(0),
                ids.last().copied().unwrap_or(0),
            );
            self.pass(Check::Credit, detail, start);
        } else {
            problems.dedup();
            let more =
                if problems.len() > 3 { format!(" (+{} more)", problems.len() - 3) } else { String::new() };
            problems.truncate(3);
            self.fail(Check::Credit, format!("{}{more}", problems.join("; ")), start);
        }
        any_blocks
    }

    /// Check 5: the lowest unacknowledged frame comes again, unchanged.
    async fn retransmit_check(&mut self) {
        let start = Instant::now();
        let Some((seq, first_at)) = self
            .delivery()
            .and_then(|d| d.first_tx.iter().find(|(s, _)| **s >= d.acked).map(|(s, rx)| (*s, rx.at)))
        else {
            return self.skip(Check::RetransmitTimeout, "no unacknowledged frame to watch");
        };
        let deadline = first_at + self.retransmit_wait();
        let found = self
            .pump(deadline, move |r| r.delivery().is_some_and(|d| d.resent_since(seq, first_at).is_some()))
            .await;
        let resent = if found { self.delivery().and_then(|d| d.resent_since(seq, first_at)) } else { None };
        match resent {
            Some((at, identical)) => {
                let rto = at.saturating_duration_since(first_at);
                self.observed_rto = Some(rto);
                // § 9.4: the device goes back and resends every frame in flight, in order.
                let last = self.delivery().map_or(seq, Delivery::max_seq);
                let burst_deadline = at + self.answer_wait();
                self.pump(burst_deadline, move |r| {
                    r.delivery().is_some_and(|d| (seq..=last).all(|s| d.resent_since(s, at).is_some()))
                })
                .await;
                let mut order: Vec<(u32, bool)> = Vec::new();
                if let Some(d) = self.delivery() {
                    for &(s, when, same) in &d.retransmissions {
                        if when >= at && (seq..=last).contains(&s) && !order.iter().any(|(o, _)| *o == s) {
                            order.push((s, same));
                        }
                    }
                }
                let seqs: Vec<u32> = order.iter().map(|(s, _)| *s).collect();
                let expected: Vec<u32> = (seq..=last).collect();
                let changed: Vec<u32> = order.iter().filter(|(_, same)| !same).map(|(s, _)| *s).collect();
                if !identical || !changed.is_empty() {
                    let mut c = changed;
                    if !identical && !c.contains(&seq) {
                        c.insert(0, seq);
                    }
                    self.fail(
                        Check::RetransmitTimeout,
                        format!("seq {c:?} resent after {} ms with different bytes", ms(rto)),
                        start,
                    );
                } else if seqs != expected {
                    self.fail(
                        Check::RetransmitTimeout,
                        format!(
                            "after {} ms without an ACK the device resent seq {seqs:?}, not all of {seq}–{last} in order",
                            ms(rto)
                        ),
                        start,
                    );
                } else {
                    self.pass(
                        Check::RetransmitTimeout,
                        format!(
                            "{} ms without an ACK → seq {seq}–{last} resent in order, byte for byte",
                            ms(rto)
                        ),
                        start,
                    );
                }
            }
            None => {
                let detail = format!(
                    "seq {seq} not resent within {} ms without an ACK",
                    ms(deadline.saturating_duration_since(first_at))
                );
                self.fail(Check::RetransmitTimeout, detail, start);
            }
        }
    }

    /// Checks 7 and 6: ACK everything, grant more credit, NAK the fresh frames, ACK again.
    async fn ack_and_nak_checks(&mut self) {
        let start = Instant::now();
        let Some(max1) = self.delivery().map(Delivery::max_seq) else { return };
        let ack1 = max1.saturating_add(1);
        let ack1_at = Instant::now();
        if let Err(e) = self.ack(ack1).await {
            self.fail(Check::CumulativeAck, format!("cannot send ACK: {e}"), start);
            return self.skip(Check::Nak, "the serial line failed");
        }
        let k2 = self.window().clamp(1, 3);
        let limit = self.delivery().map_or(0, |d| d.credit).saturating_add(k2);
        if let Err(e) = self.grant(limit).await {
            self.fail(Check::CumulativeAck, format!("cannot send CREDIT: {e}"), start);
            return self.skip(Check::Nak, "the serial line failed");
        }
        // The next new frame must be seq max1 + 1.
        let want = limit as usize;
        let deadline = Instant::now() + self.block_wait();
        self.pump(deadline, |r| r.key_count() >= want).await;
        let Some(d) = self.delivery() else { return };
        let new: Vec<u32> = d.first_tx.range(ack1..).map(|(s, _)| *s).collect();
        let mut ack_problems = Vec::new();
        match new.first() {
            None => ack_problems.push(format!(
                "nothing new within {} ms of ACK {ack1} and CREDIT {limit}",
                ms(self.block_wait())
            )),
            Some(&s) if s != ack1 => ack_problems.push(format!("the frame after ACK {ack1} has seq {s}")),
            Some(_) => {}
        }
        let stale_before_nak = d
            .after_ack
            .iter()
            .find(|(_, at)| *at >= ack1_at + self.grace())
            .map(|(s, at)| (*s, at.saturating_duration_since(ack1_at)));

        // Check 6: NAK the second fresh frame (the first if only one came).
        let nak_start = Instant::now();
        if new.is_empty() {
            self.skip(Check::Nak, "no fresh frames to NAK (see check 7)");
        } else {
            let first = new.first().copied().unwrap_or(ack1);
            let from = new.get(1).copied().unwrap_or(first);
            let last = new.last().copied().unwrap_or(from);
            let nak_at = Instant::now();
            if let Err(e) = self.send(&Message::Nak { from_seq: from }).await {
                self.fail(Check::Nak, format!("cannot send NAK: {e}"), nak_start);
            } else {
                let deadline = nak_at + self.answer_wait();
                self.pump(deadline, move |r| {
                    r.delivery().is_some_and(|d| (from..=last).all(|s| d.resent_since(s, nak_at).is_some()))
                })
                .await;
                let d = self.delivery();
                let after: Vec<(u32, Instant, bool)> = d
                    .map(|d| d.retransmissions.iter().filter(|(_, at, _)| *at >= nak_at).copied().collect())
                    .unwrap_or_default();
                let missing: Vec<u32> =
                    (from..=last).filter(|s| !after.iter().any(|(seq, _, _)| seq == s)).collect();
                let changed: Vec<u32> =
                    after.iter().filter(|(_, _, same)| !same).map(|(s, _, _)| *s).collect();
                let detail = match after.first() {
                    None => Err(format!("nothing resent within {} ms of NAK {from}", ms(self.answer_wait()))),
                    Some(&(s, _, _)) if s != from => Err(format!(
                        "after NAK {from} the device resent seq {s} first{}",
                        if s < from { " (go-back from an older frame: NAK ignored?)" } else { "" }
                    )),
                    Some(&(_, at, _)) => {
                        if !missing.is_empty() {
                            Err(format!("after NAK {from} seq {missing:?} not resent"))
                        } else if !changed.is_empty() {
                            Err(format!("after NAK {from} seq {changed:?} resent with different bytes"))
                        } else {
                            Ok(format!(
                                "NAK {from} → seq {from}–{last} resent unchanged, the first after {} ms",
                                ms(at.saturating_duration_since(nak_at))
                            ))
                        }
                    }
                };
                match detail {
                    Ok(d) => self.pass(Check::Nak, d, nak_start),
                    Err(d) => self.fail(Check::Nak, d, nak_start),
                }
            }
        }

        // Back to check 7: acknowledge everything; nothing acknowledged may come again.
        let max2 = self.delivery().map_or(0, Delivery::max_seq);
        let ack2 = max2.saturating_add(1);
        let ack2_at = Instant::now();
        if let Err(e) = self.ack(ack2).await {
            return self.fail(Check::CumulativeAck, format!("cannot send ACK: {e}"), start);
        }
        let settle = match self.observed_rto {
            Some(rto) => (rto * 2 + self.grace()).min(self.retransmit_wait()),
            None => self.answer_wait(),
        };
        self.pump(ack2_at + settle, |_| false).await;
        let grace = self.grace();
        let stale_after = self.delivery().and_then(|d| {
            d.after_ack
                .iter()
                .find(|(s, at)| *s < ack2 && *at >= ack2_at + grace)
                .map(|(s, at)| (*s, at.saturating_duration_since(ack2_at)))
        });
        if let Some((s, after)) = stale_before_nak {
            ack_problems.push(format!("seq {s} resent {} ms after ACK {ack1} acknowledged it", ms(after)));
        }
        if let Some((s, after)) = stale_after {
            ack_problems.push(format!("seq {s} resent {} ms after ACK {ack2} acknowledged it", ms(after)));
        }
        if ack_problems.is_empty() {
            let next = new.first().copied().unwrap_or(ack1);
            self.pass(
                Check::CumulativeAck,
                format!(
                    "after ACK {ack1} the next frame was seq {next}; after ACK {ack2} nothing was resent in {} ms",
                    ms(settle)
                ),
                start,
            );
        } else {
            self.fail(Check::CumulativeAck, ack_problems.join("; "), start);
        }
    }

    /// Sends a bad frame, expects an ERROR with `code`, then a PING must still be answered.
    async fn expect_error_and_alive(&mut self, check: Check, bytes: Vec<u8>, what: &str, code: u16) {
        if let Some(why) = self.blocker() {
            return self.skip(check, why);
        }
        let start = Instant::now();
        if let Err(e) = self.link.send_bytes(&bytes).await {
            return self.fail(check, format!("cannot send {what}: {e}"), start);
        }
        let wait = self.answer_wait() + self.link.line_time(bytes.len());
        let error = self.expect_error(start + wait).await;
        let alive = self.ping().await;
        let name = code_name(code);
        let mut problems = Vec::new();
        let mut good = String::new();
        match error {
            Some(e) => {
                let p = e.problems(code, self.epoch());
                if p.is_empty() {
                    good = format!("ERROR {name} (offending epoch, seq 0) for {what}");
                }
                problems.extend(p.into_iter().map(|p| format!("{what}: {p}")));
            }
            None => problems.push(format!("no ERROR within {} ms of {what}", ms(wait))),
        }
        match alive {
            Ok(rtt) => {
                if problems.is_empty() {
                    let _ = write!(good, "; session alive (PONG after {} ms)", ms(rtt));
                }
            }
            Err(e) => problems.push(format!("session dead afterwards: {e}")),
        }
        if problems.is_empty() {
            self.pass(check, good, start)
        } else {
            self.fail(check, problems.join("; "), start)
        }
    }

    // 8
    async fn unknown_type(&mut self) {
        let bytes = wire(PROTOCOL_VERSION, 0x7E, self.epoch(), 0, &[0xAB, 0xCD, 0xEF, 0x01], false);
        self.expect_error_and_alive(Check::UnknownType, bytes, "type 0x7e", error_code::UNKNOWN_TYPE).await;
    }

    // 9
    async fn malformed_body(&mut self) {
        let bytes = wire(PROTOCOL_VERSION, MessageType::Credit as u8, self.epoch(), 0, &[0x00, 0x05], false);
        self.expect_error_and_alive(
            Check::MalformedBody,
            bytes,
            "a CREDIT with a 2-byte body",
            error_code::MALFORMED_BODY,
        )
        .await;
    }

    /// Sends frames that must be dropped without an answer, then a PING that must be answered;
    /// the device works in order, so anything it said about the bad frames comes first.
    /// Returns the PONG round trip or the problems.
    async fn dropped_then_alive(
        &mut self,
        bytes: &[u8],
        forbidden_nonce: u64,
    ) -> Result<Duration, Vec<String>> {
        let mut problems = Vec::new();
        if let Err(e) = self.link.send_bytes(bytes).await {
            return Err(vec![format!("cannot send: {e}")]);
        }
        let epoch = self.epoch();
        let nonce: u64 = rand::random();
        let sent = Instant::now();
        if let Err(e) = self.send_frame(epoch, 0, &Message::Ping { nonce }).await {
            return Err(vec![format!("cannot send PING: {e}")]);
        }
        let deadline = sent + self.answer_wait() + self.link.line_time(bytes.len());
        let mut rtt = None;
        self.awaiting_error = true;
        // After the PONG, a short grace for anything the device still says.
        let mut until = deadline;
        while let Some(rx) = self.next(until).await {
            if let Some((n, e, _)) = pong_of(&rx) {
                if n == forbidden_nonce {
                    problems.push("the damaged/unsupported PING was answered with a PONG".to_string());
                } else if n == nonce && e == epoch && rtt.is_none() {
                    rtt = Some(rx.at.saturating_duration_since(sent));
                    until = Instant::now() + Duration::from_millis(100);
                }
            } else if let Some(e) = error_of(&rx) {
                problems.push(format!(
                    "answered with ERROR {} ({:?}) instead of dropping it",
                    code_name(e.code),
                    e.text
                ));
            }
        }
        self.awaiting_error = false;
        match rtt {
            Some(rtt) if problems.is_empty() => Ok(rtt),
            Some(_) => Err(problems),
            None => {
                problems.push(format!("session dead afterwards: {}", self.silence("PONG", deadline - sent)));
                Err(problems)
            }
        }
    }

    // 10
    async fn line_noise(&mut self) {
        if let Some(why) = self.blocker() {
            return self.skip(Check::LineNoise, why);
        }
        let start = Instant::now();
        let epoch = self.epoch();
        let bad_nonce: u64 = rand::random();
        let cases: [(&str, Vec<u8>); 3] = [
            (
                "a PING with a bad CRC",
                wire(PROTOCOL_VERSION, MessageType::Ping as u8, epoch, 0, &bad_nonce.to_be_bytes(), true),
            ),
            ("64 garbage bytes", {
                let mut g: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) | 0x01).collect();
                g.push(0);
                g
            }),
            ("an over-long run without a delimiter", {
                let mut g = vec![0x55; MAX_ENCODED_LEN + 64];
                g.push(0);
                g
            }),
        ];
        let mut problems = Vec::new();
        let mut rtts = Vec::new();
        for (what, bytes) in cases {
            match self.dropped_then_alive(&bytes, bad_nonce).await {
                Ok(rtt) => rtts.push(ms(rtt)),
                Err(p) => problems.push(format!("{what}: {}", p.join(", "))),
            }
            if self.link.failed.is_some() {
                break;
            }
        }
        if problems.is_empty() {
            self.pass(
                Check::LineNoise,
                format!(
                    "bad CRC, 64 garbage bytes and a {}-byte run without delimiter ignored; PONG after each ({rtts:?} ms)",
                    MAX_ENCODED_LEN + 64
                ),
                start,
            );
        } else {
            self.fail(Check::LineNoise, problems.join("; "), start);
        }
    }

    // 11
    async fn stale_epoch(&mut self) {
        if let Some(why) = self.blocker() {
            return self.skip(Check::StaleEpoch, why);
        }
        let start = Instant::now();
        let epoch = self.epoch();
        let stale = match epoch.wrapping_add(1) {
            0 => 1,
            e => e,
        };
        let nonce: u64 = rand::random();
        if let Err(e) = self.send_frame(stale, 0, &Message::Ping { nonce }).await {
            return self.fail(Check::StaleEpoch, format!("cannot send PING: {e}"), start);
        }
        let deadline = start + self.answer_wait();
        self.awaiting_error = true;
        let mut error = None;
        let mut answered = false;
        while let Some(rx) = self.next(deadline).await {
            if let Some((n, _, _)) = pong_of(&rx)
                && n == nonce
            {
                answered = true;
            }
            if let Some(e) = error_of(&rx) {
                error = Some(e);
                break;
            }
        }
        self.awaiting_error = false;
        let alive = self.ping().await;
        let mut problems = Vec::new();
        if answered {
            problems.push(format!("a PING in stale epoch {stale:#010x} was answered with a PONG"));
        }
        match &error {
            Some(e) => problems.extend(e.problems(error_code::NO_SESSION, stale)),
            None => problems.push(format!(
                "no ERROR within {} ms of a PING in stale epoch {stale:#010x}",
                ms(self.answer_wait())
            )),
        }
        if let Err(e) = &alive {
            problems.push(format!("the real session is dead afterwards: {e}"));
        }
        // A well-formed ERROR is never answered with an ERROR, not even in a stale epoch. Wait
        // out the device's 200 ms NO_SESSION rate limit first, so silence means something.
        if problems.is_empty() {
            self.pump(Instant::now() + Duration::from_millis(250), |_| false).await;
            let report = Message::Error(qkd_serial_proto::ErrorReport {
                code: error_code::UNEXPECTED,
                text: "conformance kit: an ERROR must not be answered".into(),
            });
            let bytes =
                wire(PROTOCOL_VERSION, MessageType::Error as u8, stale, 0, &report.encode_body(), false);
            if let Err(p) = self.dropped_then_alive(&bytes, nonce).await {
                problems.push(format!("an ERROR in stale epoch {stale:#010x}: {}", p.join(", ")));
            }
        }
        if problems.is_empty() {
            self.pass(
                Check::StaleEpoch,
                format!(
                    "PING in epoch {stale:#010x} → ERROR NO_SESSION (that epoch, seq 0), no PONG; an ERROR there \
                     got no answer; session {epoch:#010x} still alive"
                ),
                start,
            );
        } else {
            self.fail(Check::StaleEpoch, problems.join("; "), start);
        }
    }

    // 12
    async fn version(&mut self) {
        if let Some(why) = self.blocker() {
            return self.skip(Check::Version, why);
        }
        let start = Instant::now();
        let epoch = self.epoch();
        let mut problems = Vec::new();
        // (a) a well-formed PING with header version 2 is dropped.
        let v2_nonce: u64 = rand::random();
        let v2 = wire(2, MessageType::Ping as u8, epoch, 0, &v2_nonce.to_be_bytes(), false);
        // § 4.1: dropped without answering (not even an ERROR).
        if let Err(p) = self.dropped_then_alive(&v2, v2_nonce).await {
            problems.push(format!("a PING with header version 2: {}", p.join(", ")));
        }
        // (b) HELLO asking for protocol version 0.
        let nonce: u64 = rand::random();
        let hello = Message::Hello(Hello {
            protocol_version: 0,
            host_nonce: nonce,
            max_body_len: MAX_BODY_LEN as u16,
        });
        let sent = Instant::now();
        if let Err(e) = self.send_frame(0, 0, &hello).await {
            return self.fail(Check::Version, format!("cannot send HELLO: {e}"), start);
        }
        let deadline = sent + self.answer_wait();
        self.awaiting_error = true;
        let mut error = None;
        let mut accepted = None;
        while let Some(rx) = self.next(deadline).await {
            if rx.frame.msg_type == MessageType::HelloAck as u8
                && let Ok(Message::HelloAck(ack)) = Message::decode(rx.frame.msg_type, &rx.frame.body)
                && ack.host_nonce == nonce
            {
                accepted = Some(rx.frame.epoch);
            }
            if let Some(e) = error_of(&rx) {
                error = Some(e);
                break;
            }
        }
        self.awaiting_error = false;
        if let Some(e) = accepted {
            problems.push(format!("HELLO for protocol version 0 was accepted (epoch {e:#010x})"));
            // The device now has another session; follow it so the remaining checks still run.
            if e != 0 {
                self.switch_session(e, nonce, None);
            }
        }
        match &error {
            Some(e) => problems.extend(
                e.problems(error_code::UNSUPPORTED_VERSION, 0)
                    .into_iter()
                    .map(|p| format!("HELLO for version 0: {p}")),
            ),
            None => problems
                .push(format!("no ERROR within {} ms of a HELLO for version 0", ms(self.answer_wait()))),
        }
        let alive = self.ping().await;
        if let Err(e) = &alive {
            problems.push(format!("session dead after the version-0 HELLO: {e}"));
        }
        if problems.is_empty() {
            self.pass(
                Check::Version,
                "header version 2 dropped without an answer; HELLO for version 0 → ERROR UNSUPPORTED_VERSION (epoch 0); \
                 session alive",
                start,
            );
        } else {
            self.fail(Check::Version, problems.join("; "), start);
        }
    }

    // 13
    async fn new_session(&mut self) {
        if let Some(why) = self.blocker() {
            return self.skip(Check::NewSession, why);
        }
        let start = Instant::now();
        let (old_epoch, mut credit, have) = self
            .session
            .as_ref()
            .map_or((0, 0, 0), |s| (s.epoch, s.delivery.credit, s.delivery.key_blocks.len()));
        // Leave a few fresh blocks unacknowledged.
        let k = self.window().clamp(1, 2);
        credit = credit.max(have as u32).saturating_add(k);
        let first_fresh = have;
        let old_acked = self.delivery().map_or(1, |d| d.acked);
        if let Err(e) = self.grant(credit).await {
            return self.fail(Check::NewSession, format!("cannot send CREDIT: {e}"), start);
        }
        let want = have + k as usize;
        self.pump(Instant::now() + self.block_wait(), |r| r.key_count() >= want).await;
        let pending: Vec<(u64, [u8; 16])> = self
            .delivery()
            .map(|d| {
                d.key_blocks
                    .iter()
                    .skip(first_fresh)
                    .filter(|(seq, _, _)| *seq >= old_acked)
                    .map(|(_, kb, _)| (kb.block_id, kb.kcv))
                    .collect()
            })
            .unwrap_or_default();
        if pending.is_empty() {
            return self.fail(
                Check::NewSession,
                format!(
                    "no KEY_BLOCK within {} ms of CREDIT {credit} to leave unacknowledged",
                    ms(self.block_wait())
                ),
                start,
            );
        }
        // New HELLO, new nonce.
        let nonce = loop {
            let n: u64 = rand::random();
            if n != 0 && Some(n) != self.session.as_ref().map(|s| s.nonce) {
                break n;
            }
        };
        let hello = Message::Hello(Hello {
            protocol_version: 1,
            host_nonce: nonce,
            max_body_len: MAX_BODY_LEN as u16,
        });
        let sent = Instant::now();
        if let Err(e) = self.send_frame(0, 0, &hello).await {
            return self.fail(Check::NewSession, format!("cannot send HELLO: {e}"), start);
        }
        let deadline = sent + self.answer_wait();
        let mut new_epoch = None;
        while let Some(rx) = self.next(deadline).await {
            if rx.frame.msg_type == MessageType::HelloAck as u8
                && let Ok(Message::HelloAck(ack)) = Message::decode(rx.frame.msg_type, &rx.frame.body)
                && ack.host_nonce == nonce
            {
                new_epoch = Some((rx.frame.epoch, ack));
                break;
            }
        }
        let Some((epoch, ack)) = new_epoch else {
            let detail = self.silence("HELLO_ACK to a HELLO with a new nonce", deadline - sent);
            // The device may still be in the old session; leave it so the telemetry check runs.
            return self.fail(Check::NewSession, detail, start);
        };
        if epoch == 0 || epoch == old_epoch {
            return self.fail(
                Check::NewSession,
                format!("a HELLO with a new nonce got epoch {epoch:#010x} (old {old_epoch:#010x})"),
                start,
            );
        }
        self.switch_session(epoch, nonce, Some(ack));
        // § 8.1, § 10: a new session starts with credit 0, so the requeued blocks must wait.
        let hello_ack_at = Instant::now();
        self.pump(hello_ack_at + self.opts.quiet_period, |_| false).await;
        let uncredited: Vec<u32> = self
            .delivery()
            .map(|d| d.key_blocks.iter().map(|(seq, _, _)| *seq).collect())
            .unwrap_or_default();
        let k_new = pending.len() as u32 + uncredited.len() as u32;
        if let Err(e) = self.grant(k_new).await {
            return self.fail(Check::NewSession, format!("cannot send CREDIT: {e}"), start);
        }
        let want = pending.len();
        self.pump(Instant::now() + self.block_wait(), |r| r.key_count() >= want).await;
        let Some(d) = self.delivery() else { return };
        let got: Vec<(u64, [u8; 16])> = d.key_blocks.iter().map(|(_, kb, _)| (kb.block_id, kb.kcv)).collect();
        let mut problems = Vec::new();
        if let Some(seq) = uncredited.first() {
            problems.push(format!(
                "KEY_BLOCK seq {seq} in the new epoch before any CREDIT (a new session starts with credit 0)"
            ));
        }
        if let Err(e) = d.contiguous_from_one() {
            problems.push(format!("in the new epoch: {e}"));
        }
        if got.len() < pending.len() {
            problems.push(format!(
                "{} of {} unacknowledged block(s) delivered again within {} ms of CREDIT {k_new}",
                got.len(),
                pending.len(),
                ms(self.block_wait())
            ));
        }
        for (i, ((old_id, old_kcv), (new_id, new_kcv))) in pending.iter().zip(&got).enumerate() {
            if old_id != new_id {
                problems.push(format!("block {} of the new epoch is ID {new_id}, expected {old_id}", i + 1));
                break;
            }
            if old_kcv != new_kcv {
                problems.push(format!("block {old_id} came again with a different KCV"));
                break;
            }
        }
        let seqs: Vec<u32> = d.key_blocks.iter().map(|(s, _, _)| *s).take(pending.len()).collect();
        let ack_to = d.max_seq().saturating_add(1);
        // Acknowledge, so the device can rest.
        let _ = self.ack(ack_to).await;
        if problems.is_empty() {
            let ids: Vec<u64> = pending.iter().map(|(id, _)| *id).collect();
            self.pass(
                Check::NewSession,
                format!(
                    "epoch {old_epoch:#010x} → {epoch:#010x}; nothing before CREDIT; unacknowledged block(s) {ids:?} \
                     delivered again as seq {seqs:?} with the same KCVs"
                ),
                start,
            );
        } else {
            self.fail(Check::NewSession, problems.join("; "), start);
        }
    }

    // 14
    async fn telemetry_check(&mut self) {
        if let Some(why) = self.blocker() {
            return self.skip(Check::Telemetry, why);
        }
        let start = Instant::now();
        let opened = self.session_opened_at.unwrap_or(start);
        let deadline =
            (opened + self.opts.telemetry_wait + self.link.line_time(self.backlog_bytes())).max(start);
        let seen = |r: &Self| r.telemetry.iter().any(|t| t.at >= opened && t.session_epoch.is_some());
        self.pump(deadline, seen).await;
        let Some(t) = self.telemetry.iter().find(|t| t.at >= opened && t.session_epoch.is_some()) else {
            let waited = deadline.saturating_duration_since(opened);
            let detail = self.silence("TELEMETRY", waited) + " of the handshake";
            return self.fail(Check::Telemetry, detail, start);
        };
        let after = t.at.saturating_duration_since(opened);
        let mut problems = Vec::new();
        if Some(t.epoch) != t.session_epoch {
            problems.push(format!(
                "TELEMETRY in epoch {:#010x}, the session's is {:#010x}",
                t.epoch,
                t.session_epoch.unwrap_or(0)
            ));
        }
        if t.seq != 0 {
            problems.push(format!("TELEMETRY with seq {} (it is unreliable: seq 0)", t.seq));
        }
        let summary = match &t.body {
            Err(e) => {
                problems.push(format!("malformed TELEMETRY: {e}"));
                String::new()
            }
            Ok(tel) => {
                problems.extend(telemetry_problems(tel));
                format!(
                    "link {}, QBER {:.2} %, secret {:.1} bit/s, buffered blocks {}",
                    tel.link_state.as_str(),
                    f64::from(tel.qber_ppm) / 1e4,
                    tel.secret_rate_mbps as f64 / 1000.0,
                    tel.buffered_blocks
                )
            }
        };
        // Every later report must be well-formed too.
        let later_bad =
            self.telemetry.iter().filter(|t| t.at >= opened && t.session_epoch.is_some()).skip(1).find_map(
                |t| match &t.body {
                    Err(e) => Some(format!("a later TELEMETRY is malformed: {e}")),
                    Ok(tel) => {
                        telemetry_problems(tel).into_iter().next().map(|p| format!("a later TELEMETRY: {p}"))
                    }
                },
            );
        problems.extend(later_bad);
        let count = self.telemetry.iter().filter(|t| t.at >= opened).count();
        if problems.is_empty() {
            self.pass(
                Check::Telemetry,
                format!("first TELEMETRY {} ms after the handshake ({count} in all): {summary}", ms(after)),
                start,
            );
        } else {
            self.fail(Check::Telemetry, problems.join("; "), start);
        }
    }
}

/// Range checks on one telemetry report.
fn telemetry_problems(t: &Telemetry) -> Vec<String> {
    let mut p = Vec::new();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    const DAY_MS: u64 = 86_400_000;
    if t.unix_ms.abs_diff(now_ms) > DAY_MS {
        p.push(format!("unix_ms {} is more than a day from the host clock ({now_ms})", t.unix_ms));
    }
    if t.qber_ppm > 1_000_000 {
        p.push(format!("qber_ppm {} above 1,000,000", t.qber_ppm));
    }
    if t.sifted_rate_mbps > t.raw_rate_mbps {
        p.push(format!("sifted rate {} above the raw rate {}", t.sifted_rate_mbps, t.raw_rate_mbps));
    }
    if t.secret_rate_mbps > t.sifted_rate_mbps {
        p.push(format!("secret rate {} above the sifted rate {}", t.secret_rate_mbps, t.sifted_rate_mbps));
    }
    // u32::MAX stands for "no signal" (infinite loss); anything else above 200 dB is nonsense.
    if t.channel_loss_cdb != u32::MAX && t.channel_loss_cdb > 20_000 {
        p.push(format!("channel loss {} cdB above 200 dB", t.channel_loss_cdb));
    }
    p
}

/// (nonce, epoch, seq) if the frame is a well-formed PONG.
fn pong_of(rx: &Rx) -> Option<(u64, u32, u32)> {
    if rx.frame.msg_type != MessageType::Pong as u8 {
        return None;
    }
    match Message::decode(rx.frame.msg_type, &rx.frame.body) {
        Ok(Message::Pong { nonce }) => Some((nonce, rx.frame.epoch, rx.frame.seq)),
        _ => None,
    }
}

/// An ERROR frame as received.
struct ErrorSeen {
    /// The code (`u16::MAX` if the body is malformed).
    code: u16,
    text: String,
    epoch: u32,
    seq: u32,
}

impl ErrorSeen {
    /// What is wrong with it, if it was to be `code` in `epoch` (§ 6.11: the offending frame's
    /// epoch, 0 for UNSUPPORTED_VERSION; seq 0).
    fn problems(&self, code: u16, epoch: u32) -> Vec<String> {
        let mut p = Vec::new();
        if self.code != code {
            p.push(format!("got ERROR {} ({:?}), not {}", code_name(self.code), self.text, code_name(code)));
        }
        if self.epoch != epoch {
            p.push(format!("ERROR in epoch {:#010x}, not the offending {epoch:#010x}", self.epoch));
        }
        if self.seq != 0 {
            p.push(format!("ERROR with seq {} (must be 0)", self.seq));
        }
        p
    }
}

fn error_of(rx: &Rx) -> Option<ErrorSeen> {
    if rx.frame.msg_type != MessageType::Error as u8 {
        return None;
    }
    let (code, text) = match Message::decode(rx.frame.msg_type, &rx.frame.body) {
        Ok(Message::Error(e)) => (e.code, e.text),
        Ok(_) | Err(_) => (u16::MAX, "malformed ERROR body".into()),
    };
    Some(ErrorSeen { code, text, epoch: rx.frame.epoch, seq: rx.frame.seq })
}

fn code_name(code: u16) -> String {
    match code {
        error_code::NO_SESSION => "NO_SESSION".into(),
        error_code::UNSUPPORTED_VERSION => "UNSUPPORTED_VERSION".into(),
        error_code::UNKNOWN_TYPE => "UNKNOWN_TYPE".into(),
        error_code::MALFORMED_BODY => "MALFORMED_BODY".into(),
        error_code::UNEXPECTED => "UNEXPECTED".into(),
        u16::MAX => "(malformed)".into(),
        c => format!("{c:#06x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qkd_serial_proto::LinkState;

    #[test]
    fn wire_matches_the_codec() {
        let frame =
            RawFrame { version: 1, msg_type: 0x30, epoch: 0xDEAD_BEEF, seq: 0, body: vec![0, 1, 2, 0, 3] };
        assert_eq!(wire(1, 0x30, 0xDEAD_BEEF, 0, &[0, 1, 2, 0, 3], false), frame.to_wire());
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        dec.push(&wire(1, 0x30, 7, 0, b"x", true), |f| got.push(f));
        assert!(matches!(got.as_slice(), [Err(qkd_serial_proto::FrameError::BadCrc { .. })]));
        got.clear();
        dec.push(&wire(2, 0x30, 7, 0, b"x", false), |f| got.push(f));
        assert!(matches!(
            got.as_slice(),
            [Err(qkd_serial_proto::FrameError::UnsupportedVersion { version: 2 })]
        ));
    }

    #[test]
    fn contiguity() {
        let mut d = Delivery::new();
        d.credit = 10;
        let at = Instant::now();
        for seq in [1, 2, 4] {
            let kb = KeyBlock::new(u64::from(seq), 0, 0, 64, vec![seq as u8; 8]);
            let frame = RawFrame {
                version: 1,
                msg_type: 0x20,
                epoch: 5,
                seq,
                body: Message::KeyBlock(kb).encode_body(),
            };
            d.record(&Rx { at, frame }, 1024);
        }
        assert_eq!(d.contiguous_from_one(), Err("seq 3 missing (next was 4)".into()));
        assert!(d.violations.is_empty());
        assert_eq!(d.max_seq(), 4);
    }

    #[test]
    fn telemetry_ranges() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut t = Telemetry {
            unix_ms: now,
            link_state: LinkState::Up,
            qber_ppm: 33_000,
            raw_rate_mbps: 10,
            sifted_rate_mbps: 5,
            secret_rate_mbps: 1,
            channel_loss_cdb: 525,
            buffered_blocks: 3,
        };
        assert!(telemetry_problems(&t).is_empty());
        t.secret_rate_mbps = 6;
        t.unix_ms = 0;
        assert_eq!(telemetry_problems(&t).len(), 2);
    }

    #[test]
    fn every_check_has_a_distinct_number_and_name() {
        let mut names: Vec<&str> = Check::ALL.iter().map(|c| c.name()).collect();
        names.dedup();
        assert_eq!(names.len(), 14);
        for (i, c) in Check::ALL.iter().enumerate() {
            assert_eq!(usize::from(c.number()), i + 1);
        }
    }
}
