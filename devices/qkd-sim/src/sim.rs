//! The running simulator: one link engine and two device ends.
//!
//! The engine draws privacy-amplification blocks from the physics model in simulated time and
//! hands every distilled key block, byte for byte and with the same block ID, to both ends.
//! Each end is a [`DeviceSession`] on its own pseudo-terminal, paced to the configured baud
//! rate, with line noise applied to the bytes it sends and receives.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qkd_physics::{BlockStatistics, Conditions, LinkParameters, draw_block, evaluate_with};
use qkd_serial_proto::{
    Alarm, DeviceConfig, DeviceRole, DeviceSession, KeyBlock, LinkState, SessionStats, Severity, Telemetry,
    alarm_code,
};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::SimConfig;
use crate::pty::{Pty, PtyError};

/// Which end of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum End {
    /// The transmitter.
    Alice,
    /// The receiver.
    Bob,
}

impl End {
    fn index(self) -> usize {
        match self {
            Self::Alice => 0,
            Self::Bob => 1,
        }
    }
}

/// Noise on one serial line, applied independently to each byte in both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LineNoise {
    /// Probability that a byte has one bit flipped.
    pub flip_rate: f64,
    /// Probability that a byte is lost.
    pub drop_rate: f64,
}

/// What one end reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndStatus {
    /// Device serial number.
    pub device_id: String,
    /// The pseudo-terminal a host opens.
    pub pty: String,
    /// Whether a host session is open.
    pub in_session: bool,
    /// Current session epoch (0 without a session).
    pub epoch: u32,
    /// Key blocks waiting for the host.
    pub buffered_blocks: usize,
    /// Key blocks discarded because the buffer was full.
    pub discarded_blocks: u64,
    /// Boots since the simulator started (1 = never rebooted).
    pub boot_count: u32,
    /// Whether the device is rebooting now.
    pub rebooting: bool,
    /// Line noise in force.
    pub noise: LineNoise,
    /// Bytes flipped so far.
    pub bytes_flipped: u64,
    /// Bytes dropped so far.
    pub bytes_dropped: u64,
    /// Protocol counters.
    #[serde(serialize_with = "serialize_stats")]
    pub stats: SessionStats,
}

fn serialize_link_state<S: serde::Serializer>(state: &LinkState, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(state.as_str())
}

fn serialize_stats<S: serde::Serializer>(s: &SessionStats, ser: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = ser.serialize_map(None)?;
    m.serialize_entry("frames_received", &s.frames_received)?;
    m.serialize_entry("frames_sent", &s.frames_sent)?;
    m.serialize_entry("frame_errors", &s.frame_errors)?;
    m.serialize_entry("body_errors", &s.body_errors)?;
    m.serialize_entry("stale_frames", &s.stale_frames)?;
    m.serialize_entry("retransmissions", &s.retransmissions)?;
    m.serialize_entry("naks_honoured", &s.naks_sent)?;
    m.serialize_entry("sessions_opened", &s.sessions_opened)?;
    m.end()
}

/// What the link reports.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    /// Link identifier.
    pub link_id: String,
    /// State of the quantum channel (`up`, `down`, `aligning`, `security_abort`, `fault`).
    #[serde(serialize_with = "serialize_link_state")]
    pub state: LinkState,
    /// Fibre length, km.
    pub distance_km: f64,
    /// Faults in force.
    pub fibre_cut: bool,
    /// Fraction of pulses intercepted and resent by an eavesdropper.
    pub eavesdrop_fraction: f64,
    /// QBER of the last block (or the model's while none has finished).
    pub qber: f64,
    /// Model rates at the current conditions, bits per second.
    pub raw_rate_bps: f64,
    /// Sifted key rate, bits per second.
    pub sifted_rate_bps: f64,
    /// Secret key rate, bits per second.
    pub secret_rate_bps: f64,
    /// Channel loss, dB (null when the fibre is cut).
    pub channel_loss_db: Option<f64>,
    /// Blocks distilled (key delivered to both ends).
    pub blocks_distilled: u64,
    /// Blocks aborted for security (QBER too high) or for lack of signal.
    pub blocks_aborted: u64,
    /// Key bytes distilled.
    pub key_bytes: u64,
    /// Next block identifier.
    pub next_block_id: u64,
    /// Simulated seconds since start.
    pub simulated_s: f64,
}

/// Everything the simulator reports.
#[derive(Debug, Clone, Serialize)]
pub struct SimStatus {
    /// The link.
    pub link: LinkStatus,
    /// Alice's end.
    pub alice: EndStatus,
    /// Bob's end.
    pub bob: EndStatus,
}

struct Shared {
    conditions: Conditions,
    physics: LinkParameters,
    noise: [LineNoise; 2],
    reboot_until: [Option<Instant>; 2],
    status: SimStatus,
}

/// A running simulator. Dropping it stops every task.
pub struct Simulator {
    shared: Arc<Mutex<Shared>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    paths: [String; 2],
    reboot_downtime: Duration,
    key_tap: Option<mpsc::Sender<KeyBlock>>,
}

impl Drop for Simulator {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A pseudo-terminal could not be opened.
    #[error("cannot open a pseudo-terminal: {0}")]
    Pty(#[from] PtyError),
    /// The stable link path could not be made.
    #[error("cannot link {link} to {target}: {source}")]
    Link {
        /// Symlink path.
        link: String,
        /// The pty.
        target: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panicked task cannot leave the status half-written in a way that matters; keep going.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Simulator {
    /// Opens both pseudo-terminals and starts the link. Key blocks also go to `key_tap` if
    /// given (the KME interface uses this).
    pub fn start(config: SimConfig, key_tap: Option<mpsc::Sender<KeyBlock>>) -> Result<Self, SimError> {
        config.validate().map_err(SimError::Config)?;
        let ptys = [Pty::open()?, Pty::open()?];
        let paths = [ptys[0].path().display().to_string(), ptys[1].path().display().to_string()];
        for (end, pty) in [&config.alice, &config.bob].into_iter().zip(&ptys) {
            if let Some(link) = &end.link_path {
                let _ = std::fs::remove_file(link);
                std::os::unix::fs::symlink(pty.path(), link).map_err(|source| SimError::Link {
                    link: link.display().to_string(),
                    target: pty.path().display().to_string(),
                    source,
                })?;
            }
        }
        let initial_noise =
            LineNoise { flip_rate: config.serial.flip_rate, drop_rate: config.serial.drop_rate };
        let model = evaluate_with(&config.physics, &Conditions::default());
        let end_status = |end: &crate::config::EndConfig, path: &str| EndStatus {
            device_id: end.device_id.clone(),
            pty: path.to_string(),
            boot_count: 1,
            noise: initial_noise,
            ..EndStatus::default()
        };
        let shared = Arc::new(Mutex::new(Shared {
            conditions: Conditions::default(),
            physics: config.physics.clone(),
            noise: [initial_noise; 2],
            reboot_until: [None; 2],
            status: SimStatus {
                link: LinkStatus {
                    link_id: config.link_id.clone(),
                    state: LinkState::Aligning,
                    distance_km: config.physics.distance_km,
                    fibre_cut: false,
                    eavesdrop_fraction: 0.0,
                    qber: model.qber_signal,
                    raw_rate_bps: model.raw_rate_bps,
                    sifted_rate_bps: model.sifted_rate_bps,
                    secret_rate_bps: model.secret_rate_bps,
                    channel_loss_db: Some(model.channel_loss_db),
                    blocks_distilled: 0,
                    blocks_aborted: 0,
                    key_bytes: 0,
                    next_block_id: 1,
                    simulated_s: 0.0,
                },
                alice: end_status(&config.alice, &paths[0]),
                bob: end_status(&config.bob, &paths[1]),
            },
        }));
        let mut tasks = Vec::new();
        let mut inputs = Vec::new();
        let seed = config.seed.unwrap_or_else(|| rand::rng().next_u64());
        for (i, (pty, end)) in ptys.into_iter().zip([&config.alice, &config.bob]).enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            inputs.push(tx);
            let device = DeviceConfig {
                device_id: end.device_id.clone(),
                link_id: config.link_id.clone(),
                firmware: concat!("qkd-sim ", env!("CARGO_PKG_VERSION")).to_string(),
                role: if i == 0 { DeviceRole::Transmitter } else { DeviceRole::Receiver },
                window: config.serial.window,
                max_key_len: config.blocks.max_key_bytes,
                retransmit_timeout: config.serial.retransmit_timeout(config.blocks.max_key_bytes),
                max_buffered_blocks: config.blocks.buffer_blocks,
            };
            let end_task = DeviceEnd {
                index: i,
                session: DeviceSession::with_seed(device, 1, seed.wrapping_add(i as u64 + 1)),
                pty,
                baud: config.serial.baud_rate,
                shared: shared.clone(),
                rng: StdRng::seed_from_u64(seed.wrapping_add(i as u64 + 11)),
                buffer_full_alarm: false,
            };
            tasks.push(tokio::spawn(end_task.run(rx)));
        }
        let engine = LinkEngine {
            config: config.clone(),
            shared: shared.clone(),
            ends: [inputs[0].clone(), inputs[1].clone()],
            key_tap: key_tap.clone(),
            rng: StdRng::seed_from_u64(seed),
        };
        tasks.push(tokio::spawn(engine.run()));
        Ok(Self {
            shared,
            tasks,
            paths,
            reboot_downtime: Duration::from_millis(config.serial.reboot_downtime_ms),
            key_tap,
        })
    }

    /// The pseudo-terminal path of an end.
    pub fn pty_path(&self, end: End) -> &str {
        &self.paths[end.index()]
    }

    /// A snapshot of the link and both ends.
    pub fn status(&self) -> SimStatus {
        lock(&self.shared).status.clone()
    }

    /// Cuts or mends the fibre.
    pub fn set_fibre_cut(&self, cut: bool) {
        lock(&self.shared).conditions.fibre_cut = cut;
    }

    /// Puts an intercept-resend eavesdropper on `fraction` of the pulses (0 removes her).
    pub fn set_eavesdropper(&self, fraction: f64) -> Result<(), SimError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(SimError::Config(format!("eavesdrop fraction {fraction} must be in [0, 1]")));
        }
        lock(&self.shared).conditions.eavesdrop_fraction = fraction;
        Ok(())
    }

    /// Changes the fibre length (re-evaluates the model).
    pub fn set_distance_km(&self, km: f64) -> Result<(), SimError> {
        let mut s = lock(&self.shared);
        let mut physics = s.physics.clone();
        physics.distance_km = km;
        physics.validate().map_err(|e| SimError::Config(e.to_string()))?;
        s.physics = physics;
        Ok(())
    }

    /// Sets line noise on one end's serial line.
    pub fn set_noise(&self, end: End, noise: LineNoise) -> Result<(), SimError> {
        for (name, v) in [("flip_rate", noise.flip_rate), ("drop_rate", noise.drop_rate)] {
            if !(0.0..=0.5).contains(&v) {
                return Err(SimError::Config(format!("{name} {v} must be in [0, 0.5]")));
            }
        }
        lock(&self.shared).noise[end.index()] = noise;
        Ok(())
    }

    /// Power-cycles one device: it goes silent for the configured downtime, the quantum link
    /// stops meanwhile, then it boots and announces itself. Its key buffer survives.
    pub fn reboot(&self, end: End) {
        lock(&self.shared).reboot_until[end.index()] = Some(Instant::now() + self.reboot_downtime);
    }

    /// Whether key blocks also go to a tap (KME mode).
    pub fn has_key_tap(&self) -> bool {
        self.key_tap.is_some()
    }
}

enum EndInput {
    Block(KeyBlock),
    Alarm(Alarm),
    Telemetry(Telemetry),
}

struct LinkEngine {
    config: SimConfig,
    shared: Arc<Mutex<Shared>>,
    ends: [mpsc::UnboundedSender<EndInput>; 2],
    key_tap: Option<mpsc::Sender<KeyBlock>>,
    rng: StdRng,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Alarms the engine raises, so it clears each exactly once.
#[derive(Default)]
struct RaisedAlarms {
    loss_of_signal: bool,
    qber: bool,
}

impl LinkEngine {
    async fn run(mut self) {
        const TICK: Duration = Duration::from_millis(20);
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let telemetry_every = Duration::from_secs_f64(self.config.telemetry_interval_s);
        let mut next_telemetry = Instant::now();
        let (mut physics, mut conditions) = self.inputs();
        let mut block = self.draw(&physics, &conditions);
        let mut progress_s = 0.0;
        let mut next_block_id: u64 = 1;
        let mut alarms = RaisedAlarms::default();
        let mut last_tick = Instant::now();
        loop {
            ticker.tick().await;
            let now = Instant::now();
            let dt = (now - last_tick).as_secs_f64() * self.config.time_scale;
            last_tick = now;
            let rebooting = self.rebooting(now);
            let (p, c) = self.inputs();
            if p != physics || c != conditions || rebooting {
                // A change of conditions aborts the block in progress, as it would on a device.
                physics = p;
                conditions = c;
                block = self.draw(&physics, &conditions);
                progress_s = 0.0;
            }
            self.update_signal_alarm(&conditions, rebooting, &mut alarms);
            if !rebooting {
                progress_s += dt;
                let mut emitted = 0;
                while progress_s >= block.duration_s && emitted < 1000 {
                    progress_s -= block.duration_s;
                    emitted += 1;
                    self.finish_block(&block, &mut next_block_id, &mut alarms);
                    {
                        let mut s = lock(&self.shared);
                        s.status.link.simulated_s += block.duration_s;
                    }
                    block = self.draw(&physics, &conditions);
                }
                if emitted == 1000 {
                    progress_s = 0.0; // the host cannot take more than this anyway
                }
            }
            if now >= next_telemetry {
                next_telemetry = now + telemetry_every;
                self.send_telemetry(&physics, &conditions, rebooting);
            }
        }
    }

    fn inputs(&self) -> (LinkParameters, Conditions) {
        let s = lock(&self.shared);
        (s.physics.clone(), s.conditions)
    }

    fn rebooting(&self, now: Instant) -> bool {
        let s = lock(&self.shared);
        s.reboot_until.iter().flatten().any(|&t| now < t)
    }

    fn draw(&mut self, physics: &LinkParameters, conditions: &Conditions) -> BlockStatistics {
        let mut b = draw_block(physics, conditions, self.config.blocks.sifted_bits_per_block, &mut self.rng);
        // Guard against a zero-length block so the loop always advances in simulated time.
        if !(b.duration_s.is_finite() && b.duration_s > 0.0) {
            b.duration_s = 1.0;
        }
        b
    }

    fn update_signal_alarm(&self, conditions: &Conditions, rebooting: bool, alarms: &mut RaisedAlarms) {
        let no_signal = conditions.fibre_cut;
        if no_signal != alarms.loss_of_signal {
            alarms.loss_of_signal = no_signal;
            let text = if no_signal {
                "no photons detected: fibre cut or transmitter dark"
            } else {
                "signal restored"
            };
            self.alarm(alarm_code::LOSS_OF_SIGNAL, Severity::Critical, no_signal, text);
        }
        let state = if no_signal {
            LinkState::Down
        } else if rebooting {
            LinkState::Aligning
        } else if alarms.qber {
            LinkState::SecurityAbort
        } else {
            LinkState::Up
        };
        lock(&self.shared).status.link.state = state;
    }

    fn finish_block(&mut self, block: &BlockStatistics, next_block_id: &mut u64, alarms: &mut RaisedAlarms) {
        let mut s = lock(&self.shared);
        s.status.link.qber = block.qber;
        if block.aborted || block.secret_bits < 8 {
            s.status.link.blocks_aborted += 1;
            drop(s);
            if block.aborted && !alarms.qber && !alarms.loss_of_signal {
                alarms.qber = true;
                let text = format!(
                    "QBER {:.2}% leaves no secret key: distillation aborted (possible eavesdropper)",
                    block.qber * 100.0
                );
                self.alarm(alarm_code::QBER_THRESHOLD, Severity::Critical, true, &text);
            }
            return;
        }
        s.status.link.blocks_distilled += 1;
        drop(s);
        if alarms.qber {
            alarms.qber = false;
            self.alarm(
                alarm_code::QBER_THRESHOLD,
                Severity::Critical,
                false,
                "QBER back below the threshold",
            );
        }
        let qber_ppm = (block.qber * 1e6).round().clamp(0.0, 1e6) as u32;
        let created = unix_ms();
        let mut remaining = (block.secret_bits / 8) as usize;
        let max = usize::from(self.config.blocks.max_key_bytes);
        while remaining > 0 {
            let len = remaining.min(max);
            remaining -= len;
            let mut key = vec![0u8; len];
            // Key bytes come from the OS-seeded CSPRNG, never from the seeded statistics RNG.
            rand::rng().fill_bytes(&mut key);
            let id = *next_block_id;
            *next_block_id += 1;
            let kb = KeyBlock::new(id, created, qber_ppm, self.config.blocks.security_bits, key);
            {
                let mut s = lock(&self.shared);
                s.status.link.key_bytes += len as u64;
                s.status.link.next_block_id = *next_block_id;
            }
            if let Some(tap) = &self.key_tap {
                // KME mode: the tap is the only consumer, so keys are never served twice.
                if tap.try_send(kb).is_err() {
                    tracing::debug!(block_id = id, "KME key store full; block discarded");
                }
                continue;
            }
            for end in &self.ends {
                let _ = end.send(EndInput::Block(kb.clone()));
            }
        }
    }

    fn alarm(&self, code: u16, severity: Severity, raised: bool, text: &str) {
        tracing::info!(code, raised, text, "link alarm");
        for end in &self.ends {
            let _ = end.send(EndInput::Alarm(Alarm { code, severity, raised, text: text.to_string() }));
        }
    }

    fn send_telemetry(&self, physics: &LinkParameters, conditions: &Conditions, rebooting: bool) {
        let model = evaluate_with(physics, conditions);
        let mut s = lock(&self.shared);
        let up = !(conditions.fibre_cut || rebooting || model.secret_rate_bps <= 0.0);
        let secret = if up { model.secret_rate_bps } else { 0.0 };
        let link = &mut s.status.link;
        link.distance_km = physics.distance_km;
        link.fibre_cut = conditions.fibre_cut;
        link.eavesdrop_fraction = conditions.eavesdrop_fraction;
        link.raw_rate_bps = model.raw_rate_bps;
        link.sifted_rate_bps = model.sifted_rate_bps;
        link.secret_rate_bps = secret;
        link.channel_loss_db = model.channel_loss_db.is_finite().then_some(model.channel_loss_db);

        let t = Telemetry {
            unix_ms: unix_ms(),
            link_state: link.state,
            qber_ppm: (link.qber * 1e6).round().clamp(0.0, 1e6) as u32,
            raw_rate_mbps: (model.raw_rate_bps * 1e3) as u64,
            sifted_rate_mbps: (model.sifted_rate_bps * 1e3) as u64,
            secret_rate_mbps: (secret * 1e3) as u64,
            channel_loss_cdb: if model.channel_loss_db.is_finite() {
                (model.channel_loss_db * 100.0).round().clamp(0.0, f64::from(u32::MAX)) as u32
            } else {
                u32::MAX
            },
            buffered_blocks: 0,
        };
        drop(s);
        for end in &self.ends {
            let _ = end.send(EndInput::Telemetry(t.clone()));
        }
    }
}

struct DeviceEnd {
    index: usize,
    session: DeviceSession,
    pty: Pty,
    baud: u32,
    shared: Arc<Mutex<Shared>>,
    rng: StdRng,
    buffer_full_alarm: bool,
}

impl DeviceEnd {
    async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<EndInput>) {
        let mut buf = vec![0u8; 4096];
        let mut line_free_at = Instant::now();
        let mut was_down = false;
        let mut flipped = 0u64;
        let mut dropped = 0u64;
        loop {
            let now = Instant::now();
            let (noise, down) = {
                let s = lock(&self.shared);
                (s.noise[self.index], s.reboot_until[self.index].is_some_and(|t| now < t))
            };
            if was_down && !down {
                // Power back on: the session is gone, the key buffer survived.
                self.pty.discard_input();
                self.session.reboot();
                lock(&self.shared).reboot_until[self.index] = None;
            }
            was_down = down;
            // Send while the (simulated) UART is idle.
            while !down && now >= line_free_at {
                let Some(mut frame) = self.session.poll_transmit(now.into_std()) else { break };
                let wire_len = frame.len();
                apply_noise(&mut frame, noise, &mut self.rng, &mut flipped, &mut dropped);
                if let Err(e) = self.pty.write_all(&frame).await {
                    tracing::warn!(end = self.index, error = %e, "pty write failed");
                }
                // Schedule from when the line really frees up, not from when this task woke:
                // timer wake-ups are coarse (1 ms), and a late wake must not idle the line.
                line_free_at = line_free_at.max(now - Duration::from_millis(2))
                    + Duration::from_secs_f64(wire_len as f64 * 10.0 / f64::from(self.baud));
            }
            self.publish(down, flipped, dropped);
            let mut wake =
                self.session.poll_timeout().map_or(now + Duration::from_millis(200), Instant::from_std);
            if line_free_at > now {
                wake = wake.min(line_free_at);
            }
            if down {
                wake = wake.min(now + Duration::from_millis(20));
            }
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(EndInput::Block(block)) => self.push_block(block),
                    Some(EndInput::Alarm(alarm)) => self.session.push_alarm(alarm),
                    Some(EndInput::Telemetry(mut t)) => {
                        t.buffered_blocks = self.session.buffered_blocks() as u32;
                        if !down {
                            self.session.send_telemetry(t);
                        }
                    }
                    None => return,
                },
                read = self.pty.read(&mut buf) => match read {
                    Ok(n) if !down => {
                        let mut bytes = buf[..n].to_vec();
                        apply_noise(&mut bytes, noise, &mut self.rng, &mut flipped, &mut dropped);
                        self.session.handle_bytes(Instant::now().into_std(), &bytes);
                    }
                    Ok(_) => {} // a rebooting device hears nothing
                    Err(e) => {
                        tracing::warn!(end = self.index, error = %e, "pty read failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = tokio::time::sleep_until(wake) => {
                    if !down {
                        self.session.handle_timeout(Instant::now().into_std());
                    }
                }
            }
        }
    }

    fn push_block(&mut self, block: KeyBlock) {
        match self.session.push_key_block(block) {
            Ok(()) => {
                if self.buffer_full_alarm
                    && self.session.buffered_blocks() * 10 < self.session.buffer_capacity() * 9
                {
                    self.buffer_full_alarm = false;
                    self.session.push_alarm(Alarm {
                        code: alarm_code::KEY_BUFFER_FULL,
                        severity: Severity::Warning,
                        raised: false,
                        text: "key buffer has room again".into(),
                    });
                }
            }
            Err(refused @ qkd_serial_proto::PushError::BufferFull { .. }) => {
                let full = refused;
                lock(&self.shared).status_end(self.index).discarded_blocks += 1;
                if !self.buffer_full_alarm {
                    self.buffer_full_alarm = true;
                    self.session.push_alarm(Alarm {
                        code: alarm_code::KEY_BUFFER_FULL,
                        severity: Severity::Warning,
                        raised: true,
                        text: format!("{full}; new blocks are discarded until the host reads"),
                    });
                }
            }
            Err(refused) => {
                // The engine only makes valid blocks; this would be a simulator bug.
                lock(&self.shared).status_end(self.index).discarded_blocks += 1;
                tracing::error!(error = %refused, "device refused a key block from the link engine");
            }
        }
    }

    fn publish(&self, down: bool, flipped: u64, dropped: u64) {
        let mut s = lock(&self.shared);
        let noise = s.noise[self.index];
        let e = s.status_end(self.index);
        e.in_session = self.session.in_session();
        e.epoch = self.session.epoch();
        e.buffered_blocks = self.session.buffered_blocks();
        e.boot_count = self.session.boot_count();
        e.rebooting = down;
        e.noise = noise;
        e.bytes_flipped = flipped;
        e.bytes_dropped = dropped;
        e.stats = self.session.stats().clone();
    }
}

impl Shared {
    fn status_end(&mut self, index: usize) -> &mut EndStatus {
        if index == 0 { &mut self.status.alice } else { &mut self.status.bob }
    }
}

fn apply_noise(
    bytes: &mut Vec<u8>,
    noise: LineNoise,
    rng: &mut StdRng,
    flipped: &mut u64,
    dropped: &mut u64,
) {
    if noise.flip_rate <= 0.0 && noise.drop_rate <= 0.0 {
        return;
    }
    bytes.retain_mut(|b| {
        if rng.random_bool(noise.drop_rate) {
            *dropped += 1;
            return false;
        }
        if rng.random_bool(noise.flip_rate) {
            *flipped += 1;
            *b ^= 1 << rng.random_range(0..8);
        }
        true
    });
}
