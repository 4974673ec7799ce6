//! The ETSI GS QKD 014 driver: a vendor device that exposes a KME, pulled over HTTPS with a
//! client certificate for a configured SAE pair.
//!
//! kmd is an SAE of the vendor's KME pair: at one site as the **master** SAE, at the other as
//! the **slave**. The master's driver obtains keys with *Get key* (`enc_keys`) when asked for
//! blocks ([`QkdDevice::request_blocks`]); kmd then tells its peer kmd the key IDs, and the
//! slave's driver fetches exactly those with *Get key with key IDs* (`dec_keys`,
//! [`QkdDevice::fetch_blocks`]). Both ends thus hand up the same blocks: same
//! [`BlockId::KeyId`], same bytes, same key check value.
//!
//! # Key check value
//! ETSI 014 keys have a UUID, not a block number, so the serial protocol's
//! [`qkd_serial_proto::key_check_value`] is computed over a number derived from the UUID:
//! `n = u64 big-endian of the first 8 bytes of SHA-256("QKD-KME-KEY-ID-v1" ‖ the UUID's 16 bytes)`,
//! `kcv = key_check_value(n, key)` — see [`key_id_number`] and [`key_id_kcv`]. Both ends
//! compute it from what they received, so a key damaged on either side shows as a mismatch
//! when the peers compare check values.
//!
//! # Events
//! One task per device polls *Get status* every `poll_interval_ms`: the first answer after
//! start or after a failure gives `Connected` (device ID = the KME ID), every answer gives
//! `Telemetry` (`buffered_blocks` = `stored_key_count`, link `Up`). A KME that cannot be reached
//! or that refuses the status call gives `Disconnected` once, and the driver retries with an
//! exponential back-off up to `max_backoff_ms`; outstanding requests and fetches wait and are
//! retried, never dropped. A KME without enough key (503) is asked again at the next poll. A
//! request the KME refuses (400, 401) cannot succeed by retrying: it is reported as
//! `Err(DeviceError::Kme)` from [`QkdDevice::next_event`] and dropped.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etsi014::client::{ClientOptions, ClientTlsConfig, Etsi014Client, Etsi014Error};
use etsi014::types::{KeyContainer, messages};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{
    BlockId, DeviceError, DeviceEvent, DeviceIdentity, DeviceKeyBlock, LinkState, LinkTelemetry, QkdDevice,
};

/// Which side of the SAE pair this kmd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KmeRole {
    /// Obtains new keys (`enc_keys`) for the peer SAE.
    Master,
    /// Fetches the keys the master obtained (`dec_keys`), by ID.
    Slave,
}

/// Configuration of one ETSI 014 device (the `[device.kme]` table of kmd's config). Unknown
/// keys are rejected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmeDeviceConfig {
    /// Base URL of the vendor KME, `https://host[:port]` (a path prefix before `/api/v1/keys`
    /// is allowed).
    pub base_url: String,
    /// CA certificate(s) that issued the KME's server certificate, PEM file.
    pub ca_cert: PathBuf,
    /// This SAE's client certificate, PEM file; the KME derives the SAE ID from it.
    pub client_cert: PathBuf,
    /// This SAE's private key, PEM file.
    pub client_key: PathBuf,
    /// This SAE's ID, as the KME knows it.
    pub sae_id: String,
    /// The peer kmd's SAE ID at the other KME.
    pub peer_sae_id: String,
    /// `"master"` (obtains keys) or `"slave"` (fetches them by ID).
    pub role: KmeRole,
    /// Key size in bits, a positive multiple of 8. Default 256.
    #[serde(default = "default_key_size_bits")]
    pub key_size_bits: u32,
    /// Most keys per `enc_keys` / `dec_keys` call (further capped by the KME's
    /// `max_key_per_request`). Default 32.
    #[serde(default = "default_keys_per_request")]
    pub keys_per_request: u32,
    /// Milliseconds between status polls (telemetry, reachability), and before asking again
    /// a KME that had too little key. Default 5000.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Milliseconds one HTTPS request may take. Default 10000.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Longest wait, in milliseconds, between attempts to reach a KME that failed (the back-off
    /// starts at 500 ms and doubles). Default 30000.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_key_size_bits() -> u32 {
    256
}
fn default_keys_per_request() -> u32 {
    32
}
fn default_poll_interval_ms() -> u64 {
    5000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_max_backoff_ms() -> u64 {
    30_000
}

/// First wait after a failure.
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);

impl KmeDeviceConfig {
    /// A configuration with the defaults for everything optional.
    pub fn new(
        base_url: impl Into<String>,
        ca_cert: impl Into<PathBuf>,
        client_cert: impl Into<PathBuf>,
        client_key: impl Into<PathBuf>,
        sae_id: impl Into<String>,
        peer_sae_id: impl Into<String>,
        role: KmeRole,
    ) -> Self {
        Self {
            base_url: base_url.into(),
            ca_cert: ca_cert.into(),
            client_cert: client_cert.into(),
            client_key: client_key.into(),
            sae_id: sae_id.into(),
            peer_sae_id: peer_sae_id.into(),
            role,
            key_size_bits: default_key_size_bits(),
            keys_per_request: default_keys_per_request(),
            poll_interval_ms: default_poll_interval_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }

    fn validate(&self) -> Result<(), DeviceError> {
        let bad = |what: String| Err(DeviceError::Config(what));
        if self.key_size_bits == 0 || !self.key_size_bits.is_multiple_of(8) {
            return bad(format!("key_size_bits = {} must be a positive multiple of 8", self.key_size_bits));
        }
        if self.keys_per_request == 0 {
            return bad("keys_per_request must be at least 1".into());
        }
        if self.poll_interval_ms == 0 || self.request_timeout_ms == 0 || self.max_backoff_ms == 0 {
            return bad("poll_interval_ms, request_timeout_ms and max_backoff_ms must be positive".into());
        }
        if self.sae_id.is_empty() || self.peer_sae_id.is_empty() {
            return bad("sae_id and peer_sae_id must not be empty".into());
        }
        Ok(())
    }
}

/// The number standing in for a block number in the key check value of the ETSI 014 key with
/// this ID: the first 8 bytes (big-endian) of SHA-256("QKD-KME-KEY-ID-v1" ‖ UUID bytes). `None`
/// if the ID is not a UUID.
pub fn key_id_number(key_id: &str) -> Option<u64> {
    let uuid = uuid::Uuid::parse_str(key_id).ok()?;
    let digest = Sha256::new().chain_update(b"QKD-KME-KEY-ID-v1").chain_update(uuid.as_bytes()).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Some(u64::from_be_bytes(first))
}

/// The key check value of an ETSI 014 key: `key_check_value(key_id_number(key_id), key)`.
/// `None` if the ID is not a UUID.
pub fn key_id_kcv(key_id: &str, key: &[u8]) -> Option<[u8; 16]> {
    key_id_number(key_id).map(|n| qkd_serial_proto::key_check_value(n, key))
}

enum Command {
    Request(u32),
    Fetch(Vec<String>),
}

/// A vendor KME as a QKD device. Dropping it stops its task.
pub struct KmeDevice {
    describe: String,
    base_url: String,
    role: KmeRole,
    events: mpsc::Receiver<Result<DeviceEvent, DeviceError>>,
    commands: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KmeDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for KmeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmeDevice").field("describe", &self.describe).finish_non_exhaustive()
    }
}

impl KmeDevice {
    /// Reads the certificates and starts the driver's task (call within a Tokio runtime). Fails
    /// on a bad configuration or unreadable TLS files; an unreachable KME is reported as
    /// `Disconnected` events and retried.
    pub fn open(config: KmeDeviceConfig) -> Result<Self, DeviceError> {
        config.validate()?;
        let kme_error = |reason: String| DeviceError::Kme { kme: config.base_url.clone(), reason };
        let tls = ClientTlsConfig::from_files(&config.ca_cert, &config.client_cert, &config.client_key)
            .map_err(|e| kme_error(e.to_string()))?;
        let options = ClientOptions {
            timeout: Duration::from_millis(config.request_timeout_ms),
            ..ClientOptions::default()
        };
        let client = Etsi014Client::with_options(&config.base_url, tls, options)
            .map_err(|e| kme_error(e.to_string()))?;
        let role = match config.role {
            KmeRole::Master => "master",
            KmeRole::Slave => "slave",
        };
        let describe = format!(
            "ETSI 014 KME {} ({role} SAE {} with {})",
            config.base_url, config.sae_id, config.peer_sae_id
        );
        let (event_tx, events) = mpsc::channel(256);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let base_url = config.base_url.clone();
        let role = config.role;
        let task = tokio::spawn(Driver::new(config, client, event_tx).run(command_rx));
        Ok(Self { describe, base_url, role, events, commands, task })
    }

    fn send(&self, command: Command) -> Result<(), DeviceError> {
        self.commands.send(command).map_err(|_| DeviceError::Stopped(self.describe.clone()))
    }
}

impl QkdDevice for KmeDevice {
    async fn next_event(&mut self) -> Result<DeviceEvent, DeviceError> {
        match self.events.recv().await {
            Some(event) => event,
            None => Err(DeviceError::Stopped(self.describe.clone())),
        }
    }

    /// Master role: obtains `n` more keys. Slave role: nothing to do (the peer's master picks
    /// the keys; see [`QkdDevice::fetch_blocks`]).
    async fn request_blocks(&mut self, n: u32) -> Result<(), DeviceError> {
        match self.role {
            KmeRole::Master if n > 0 => self.send(Command::Request(n)),
            _ => Ok(()),
        }
    }

    /// Slave role: fetches these keys (IDs the peer's master obtained). Refused in the master
    /// role, and for IDs that are not ETSI 014 key IDs.
    async fn fetch_blocks(&mut self, ids: Vec<BlockId>) -> Result<(), DeviceError> {
        if self.role != KmeRole::Slave {
            return Err(DeviceError::Config(format!(
                "{}: fetch_blocks needs role = \"slave\"",
                self.describe
            )));
        }
        let mut key_ids = Vec::with_capacity(ids.len());
        for id in ids {
            match id {
                BlockId::KeyId(key_id) => key_ids.push(key_id),
                BlockId::Sequence(n) => {
                    return Err(DeviceError::Kme {
                        kme: self.base_url.clone(),
                        reason: format!(
                            "block {n} is a serial-protocol block number, not an ETSI 014 key ID"
                        ),
                    });
                }
            }
        }
        if key_ids.is_empty() { Ok(()) } else { self.send(Command::Fetch(key_ids)) }
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Unknown,
    Up,
    Down,
}

/// What a failed call means for the driver.
enum Failure {
    /// The KME is unreachable or failing: mark the link down and back off.
    Link(String),
    /// Not enough key now: try again at the next poll.
    Later,
    /// Refused; retrying will not help: report and drop.
    Refused(String),
}

fn classify(e: &Etsi014Error) -> Failure {
    match e.status() {
        None => Failure::Link(e.to_string()),
        Some(503) => Failure::Later,
        Some(400 | 401) => Failure::Refused(e.to_string()),
        Some(_) => Failure::Link(e.to_string()),
    }
}

/// The driver's task state.
struct Driver {
    config: KmeDeviceConfig,
    client: Etsi014Client,
    events: mpsc::Sender<Result<DeviceEvent, DeviceError>>,
    link: Link,
    backoff: Duration,
    /// Cap from the KME's status (`max_key_per_request`).
    kme_max_per_request: u32,
    /// Master: keys still to obtain.
    credit: u64,
    /// Slave: key IDs still to fetch.
    pending: VecDeque<String>,
    /// Slave: fetch this many IDs one at a time (after a 400 for a batch, to save the good ones).
    singles: usize,
    next_poll: Instant,
    /// No work before this (503, or back-off after a failure).
    work_after: Instant,
}

impl Driver {
    fn new(
        config: KmeDeviceConfig,
        client: Etsi014Client,
        events: mpsc::Sender<Result<DeviceEvent, DeviceError>>,
    ) -> Self {
        let now = Instant::now();
        Self {
            kme_max_per_request: config.keys_per_request,
            config,
            client,
            events,
            link: Link::Unknown,
            backoff: INITIAL_BACKOFF,
            credit: 0,
            pending: VecDeque::new(),
            singles: 0,
            next_poll: now,
            work_after: now,
        }
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.config.poll_interval_ms)
    }

    fn has_work(&self) -> bool {
        match self.config.role {
            KmeRole::Master => self.credit > 0,
            KmeRole::Slave => !self.pending.is_empty(),
        }
    }

    async fn emit(&self, event: Result<DeviceEvent, DeviceError>) -> Result<(), ()> {
        self.events.send(event).await.map_err(|_| ())
    }

    fn refused(&self, reason: String) -> Result<DeviceEvent, DeviceError> {
        Err(DeviceError::Kme { kme: self.config.base_url.clone(), reason })
    }

    /// Runs until the device handle is dropped.
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            while let Ok(command) = commands.try_recv() {
                self.apply(command);
            }
            let now = Instant::now();
            let step = if now >= self.next_poll {
                self.poll_status().await
            } else if self.link == Link::Up && self.has_work() && now >= self.work_after {
                self.work().await
            } else {
                let mut wake = self.next_poll;
                if self.link == Link::Up && self.has_work() {
                    wake = wake.min(self.work_after);
                }
                tokio::select! {
                    command = commands.recv() => match command {
                        Some(command) => self.apply(command),
                        None => return,
                    },
                    () = tokio::time::sleep_until(wake) => {}
                }
                Ok(())
            };
            if step.is_err() {
                return; // the device handle is gone
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Request(n) => self.credit += u64::from(n),
            Command::Fetch(ids) => self.pending.extend(ids),
        }
    }

    /// Records a failure to reach the KME; `Disconnected` on the way down.
    async fn link_failed(&mut self, reason: String) -> Result<(), ()> {
        let now = Instant::now();
        self.next_poll = now + self.backoff;
        self.work_after = self.next_poll;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(self.config.max_backoff_ms));
        if self.link != Link::Down {
            self.link = Link::Down;
            tracing::warn!(kme = %self.config.base_url, %reason, "KME unreachable");
            self.emit(Ok(DeviceEvent::Disconnected { reason })).await?;
        } else {
            tracing::debug!(kme = %self.config.base_url, %reason, "KME still unreachable");
        }
        Ok(())
    }

    async fn poll_status(&mut self) -> Result<(), ()> {
        let status = match self.client.status(&self.config.peer_sae_id).await {
            Ok(status) => status,
            Err(e) => return self.link_failed(e.to_string()).await,
        };
        self.next_poll = Instant::now() + self.poll_interval();
        self.backoff = INITIAL_BACKOFF;
        self.kme_max_per_request = status.max_key_per_request.max(1);
        if self.link != Link::Up {
            self.link = Link::Up;
            self.work_after = Instant::now();
            if status.master_sae_id != self.config.sae_id {
                tracing::warn!(
                    kme = %self.config.base_url,
                    configured = %self.config.sae_id,
                    reported = %status.master_sae_id,
                    "the KME knows this SAE by another ID (check the client certificate)"
                );
            }
            if self.config.key_size_bits < status.min_key_size
                || self.config.key_size_bits > status.max_key_size
            {
                tracing::warn!(
                    kme = %self.config.base_url,
                    key_size_bits = self.config.key_size_bits,
                    min = status.min_key_size,
                    max = status.max_key_size,
                    "configured key size is outside what the KME delivers"
                );
            }
            let mut ends = [status.source_kme_id.clone(), status.target_kme_id.clone()];
            ends.sort();
            let identity = DeviceIdentity {
                device_id: status.source_kme_id.clone(),
                link_id: ends.join("<->"),
                firmware: String::new(),
                role: None,
            };
            tracing::info!(kme = %self.config.base_url, ?identity, "KME reachable");
            self.emit(Ok(DeviceEvent::Connected(identity))).await?;
        }
        let telemetry = LinkTelemetry {
            unix_ms: unix_ms(),
            link_state: LinkState::Up,
            qber: None,
            raw_rate_bps: None,
            sifted_rate_bps: None,
            secret_rate_bps: None,
            channel_loss_db: None,
            buffered_blocks: Some(u32::try_from(status.stored_key_count).unwrap_or(u32::MAX)),
        };
        self.emit(Ok(DeviceEvent::Telemetry(telemetry))).await
    }

    fn batch(&self) -> u32 {
        self.config.keys_per_request.min(self.kme_max_per_request).max(1)
    }

    async fn work(&mut self) -> Result<(), ()> {
        match self.config.role {
            KmeRole::Master => self.obtain().await,
            KmeRole::Slave => self.fetch().await,
        }
    }

    /// Master: one `enc_keys` call.
    async fn obtain(&mut self) -> Result<(), ()> {
        let n = u32::try_from(self.credit.min(u64::from(self.batch()))).unwrap_or(1);
        let peer = self.config.peer_sae_id.clone();
        match self.client.enc_keys(&peer, n, Some(self.config.key_size_bits)).await {
            Ok(container) if container.keys.is_empty() => {
                self.work_after = Instant::now() + self.poll_interval();
                Ok(())
            }
            Ok(container) => {
                self.credit = self.credit.saturating_sub(container.keys.len() as u64);
                self.deliver(container, None).await
            }
            Err(e) => match classify(&e) {
                Failure::Link(reason) => self.link_failed(reason).await,
                Failure::Later => {
                    tracing::debug!(kme = %self.config.base_url, "KME has too little key; asking again later");
                    self.work_after = Instant::now() + self.poll_interval();
                    Ok(())
                }
                Failure::Refused(reason) => {
                    let dropped = std::mem::take(&mut self.credit);
                    tracing::warn!(kme = %self.config.base_url, %reason, dropped, "enc_keys refused");
                    self.emit(
                        self.refused(format!("enc_keys refused ({dropped} keys not obtained): {reason}")),
                    )
                    .await
                }
            },
        }
    }

    /// Slave: one `dec_keys` call.
    async fn fetch(&mut self) -> Result<(), ()> {
        let n = if self.singles > 0 { 1 } else { (self.batch() as usize).min(self.pending.len()) };
        let ids: Vec<String> = self.pending.iter().take(n).cloned().collect();
        let peer = self.config.peer_sae_id.clone();
        match self.client.dec_keys(&peer, &ids).await {
            Ok(container) => {
                self.pending.drain(..ids.len());
                self.singles = self.singles.saturating_sub(1);
                self.deliver(container, Some(&ids)).await
            }
            Err(e) => match classify(&e) {
                Failure::Link(reason) => self.link_failed(reason).await,
                Failure::Later => {
                    self.work_after = Instant::now() + self.poll_interval();
                    Ok(())
                }
                Failure::Refused(reason)
                    if ids.len() > 1 && e.message() == Some(messages::KEYS_NOT_FOUND) =>
                {
                    // Some of the batch are unknown: fetch its keys one by one to deliver the rest.
                    tracing::info!(kme = %self.config.base_url, %reason, "dec_keys batch refused; fetching one by one");
                    self.singles = ids.len();
                    Ok(())
                }
                Failure::Refused(reason) => {
                    self.pending.drain(..ids.len());
                    self.singles = self.singles.saturating_sub(1);
                    tracing::warn!(kme = %self.config.base_url, %reason, ?ids, "dec_keys refused");
                    self.emit(self.refused(format!("dec_keys refused for key IDs {ids:?}: {reason}"))).await
                }
            },
        }
    }

    /// Hands up the keys of a container. `asked`: the IDs a `dec_keys` asked for (each must
    /// come back, and nothing else).
    async fn deliver(&mut self, container: KeyContainer, asked: Option<&[String]>) -> Result<(), ()> {
        let expected_len = self.config.key_size_bits as usize / 8;
        let mut missing: Vec<String> = asked.map(<[String]>::to_vec).unwrap_or_default();
        for key in container.keys {
            let Ok(uuid) = uuid::Uuid::parse_str(&key.key_id) else {
                let event = self.refused(format!(
                    "the KME sent a key whose ID {:?} is not a UUID; discarded",
                    key.key_id
                ));
                self.emit(event).await?;
                continue;
            };
            let id = uuid.hyphenated().to_string();
            if let Some(asked) = asked {
                let Some(pos) = missing.iter().position(|m| m.eq_ignore_ascii_case(&id)) else {
                    let event = if asked.iter().any(|a| a.eq_ignore_ascii_case(&id)) {
                        format!("the KME sent key {id} twice; the copy is discarded")
                    } else {
                        format!("the KME sent key {id}, which was not asked for; discarded")
                    };
                    self.emit(self.refused(event)).await?;
                    continue;
                };
                missing.swap_remove(pos);
            }
            if key.key.len() != expected_len {
                let event = self.refused(format!(
                    "key {id} has {} bits, not {}; discarded",
                    key.key.bits(),
                    self.config.key_size_bits
                ));
                self.emit(event).await?;
                continue;
            }
            let bytes = key.key.into_inner();
            let Some(kcv) = key_id_kcv(&id, &bytes) else { continue };
            let block = DeviceKeyBlock {
                block_id: BlockId::KeyId(id),
                key: bytes,
                kcv,
                created_unix_ms: 0,
                qber_ppm: None,
                security_bits: None,
            };
            self.emit(Ok(DeviceEvent::KeyBlock(block))).await?;
        }
        if !missing.is_empty() {
            self.emit(self.refused(format!("the KME did not return key IDs {missing:?}"))).await?;
        }
        Ok(())
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_number_is_stable_and_case_blind() {
        let id = "bc490419-7d60-487f-adc1-4ddcc177c139";
        let n = key_id_number(id).expect("UUID");
        assert_eq!(key_id_number(&id.to_uppercase()), Some(n));
        assert_ne!(key_id_number("0a782fb5-3434-48fe-aa4d-14f41d46cf92"), Some(n));
        assert_eq!(key_id_number("not a uuid"), None);
        let digest = Sha256::digest(
            [&b"QKD-KME-KEY-ID-v1"[..], &uuid::Uuid::parse_str(id).expect("uuid").into_bytes()].concat(),
        );
        assert_eq!(n.to_be_bytes(), digest[..8]);
        assert_eq!(key_id_kcv(id, b"key"), Some(qkd_serial_proto::key_check_value(n, b"key")));
    }

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_keys() {
        let text = r#"{
            "base_url": "https://kme-a:8443", "ca_cert": "ca.pem", "client_cert": "c.pem", "client_key": "c.key",
            "sae_id": "A-kmd", "peer_sae_id": "B-kmd", "role": "master"
        }"#;
        let cfg: KmeDeviceConfig = serde_json::from_str(text).expect("parses");
        assert_eq!(cfg.role, KmeRole::Master);
        assert_eq!((cfg.key_size_bits, cfg.keys_per_request, cfg.poll_interval_ms), (256, 32, 5000));
        assert!(cfg.validate().is_ok());
        assert!(serde_json::from_str::<KmeDeviceConfig>(&text.replace("\"master\"", "\"boss\"")).is_err());
        assert!(serde_json::from_str::<KmeDeviceConfig>(&text.replace("}", ", \"extra\": 1}")).is_err());
        let mut odd = cfg;
        odd.key_size_bits = 12;
        assert!(matches!(odd.validate(), Err(DeviceError::Config(_))));
    }

    #[tokio::test]
    async fn open_fails_cleanly_on_missing_files() {
        let cfg = KmeDeviceConfig::new(
            "https://127.0.0.1:1",
            "/nonexistent/ca.pem",
            "c",
            "k",
            "A",
            "B",
            KmeRole::Slave,
        );
        let err = KmeDevice::open(cfg).expect_err("no files");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
