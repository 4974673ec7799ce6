//! One task per `[[link]]`: opens the QKD device with its driver, keeps it supplied with credit
//! between the pool's water marks, hands key blocks to the key service (`Kme::accept_block`,
//! which stores them HSM-wrapped and unconfirmed until the peer kmd confirms them), and turns
//! telemetry, alarms and connection changes into logs and metrics.
//!
//! Credit: while fewer than `low_water` blocks are stored (the pool's counts: unconfirmed and
//! confirmed blocks of either owner, i.e. those still holding key material — but at most twice
//! the blocks this side owns, since its SAEs are served from its own half only:
//! `KeyStore::credit_blocks`), the device is asked for enough blocks to reach `high_water`
//! (counting blocks asked for and not yet delivered). Besides, when the peer kmd asked to
//! confirm blocks not held here (`Kme::take_blocks_behind_peer`: its end of the link has read
//! further), the device is asked for that many more whatever the water marks say, so that the
//! two ends keep reading the same blocks. Blocks beyond `max_blocks` stored (either owner) are
//! rejected (`pool_full`), and credit never asks beyond it. No credit is given before the device
//! has said who it is (`Connected`); a serial device that reports another link ID than the
//! configured one gets none, and any block it still sends is rejected (`link_mismatch`), until it
//! reconnects as the right link. A device that cannot be opened, or whose driver stops, is reopened after a
//! pause; the link shows `disconnected` meanwhile.

use std::sync::Arc;
use std::time::Duration;

use qkd_device::kme::KmeDevice;
use qkd_device::serial::SerialDevice;
use qkd_device::{AnyDevice, DeviceError, DeviceEvent, QkdDevice, Severity};
use tokio::sync::watch;

use crate::config::{DeviceConfig, LinkConfig};
use crate::metrics::{DeviceLinkState, Metrics, RejectReason};
use crate::pool::KeyStore;
use kmd_keypool::InsertOutcome;
use kmd_kme::{Kme, LinkTelemetry};

/// How often the credit is re-evaluated without an event (the pool drains as keys are served).
const CREDIT_TICK: Duration = Duration::from_secs(1);

/// Runs the link until `stop` turns true.
pub async fn run(
    link: LinkConfig,
    kme: Kme,
    store: KeyStore,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let retry = match &link.device {
        DeviceConfig::Serial(s) => Duration::from_millis(s.reopen_interval_ms.max(100)),
        DeviceConfig::Kme(_) => Duration::from_secs(1),
    };
    let mut last_open_error: Option<String> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        match open(&link) {
            Ok(device) => {
                last_open_error = None;
                tracing::info!(link = %link.id, device = %device.describe(), "device driver started");
                let mut session = Session::new(&link, &kme, &store, &metrics, device);
                match session.drive(&mut stop).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::error!(link = %link.id, error = %e, "device driver stopped; reopening")
                    }
                }
            }
            Err(e) => {
                let text = e.to_string();
                // Log a failing device once, not at every retry.
                if last_open_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(link = %link.id, error = %text, "cannot open the QKD device; retrying");
                    last_open_error = Some(text);
                }
            }
        }
        metrics.set_link_state(&link.id, DeviceLinkState::Disconnected);
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(retry) => {}
        }
    }
}

fn open(link: &LinkConfig) -> Result<AnyDevice, DeviceError> {
    // A serial device resumes after the configured block; blocks it delivers again are
    // recognised by the pool (same ID and KCV: `AlreadyPresent`) and counted as duplicates.
    match &link.device {
        DeviceConfig::Serial(config) => SerialDevice::open(config.clone()).map(AnyDevice::from),
        DeviceConfig::Kme(config) => KmeDevice::open(config.clone()).map(AnyDevice::from),
    }
}

struct Session<'a> {
    link: &'a LinkConfig,
    kme: &'a Kme,
    store: &'a KeyStore,
    metrics: &'a Metrics,
    device: AnyDevice,
    /// Blocks asked for and not yet delivered.
    outstanding: u64,
    /// True once the device said who it is and it is on this link (a serial device reporting
    /// another link ID stays false). No credit is given before.
    right_link: bool,
}

impl<'a> Session<'a> {
    fn new(
        link: &'a LinkConfig,
        kme: &'a Kme,
        store: &'a KeyStore,
        metrics: &'a Metrics,
        device: AnyDevice,
    ) -> Self {
        Self { link, kme, store, metrics, device, outstanding: 0, right_link: false }
    }

    async fn drive(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), DeviceError> {
        let mut tick = tokio::time::interval(CREDIT_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                _ = tick.tick() => self.top_up().await?,
                event = self.device.next_event() => self.handle(event?).await?,
            }
        }
    }

    async fn top_up(&mut self) -> Result<(), DeviceError> {
        if !self.right_link {
            return Ok(());
        }
        let limits = self.link.pool;
        let config = |e: crate::pool::StoreError| DeviceError::Config(e.to_string());
        // The peer holds blocks this end has not read: read them (up to `max_blocks`) whatever
        // the water marks say, or neither end can confirm them.
        let behind = self.kme.take_blocks_behind_peer(&self.link.id).unwrap_or(0);
        let all = self.store.stored_blocks(&self.link.id).await.map_err(config)?;
        if behind > self.outstanding {
            let room = limits.max_blocks.saturating_sub(all + self.outstanding);
            let want = (behind - self.outstanding).min(room).min(u64::from(u32::MAX));
            if want > 0 {
                tracing::debug!(link = %self.link.id, behind, outstanding = self.outstanding, want,
                    "the peer holds blocks not read here; asking the device for them");
                self.device.request_blocks(want as u32).await?;
                self.outstanding += want;
            }
        }
        let stored = self.store.credit_blocks(&self.link.id).await.map_err(config)?;
        if stored >= limits.low_water || stored + self.outstanding >= limits.high_water {
            return Ok(());
        }
        let room = limits.max_blocks.saturating_sub(all + self.outstanding);
        let want = (limits.high_water - stored - self.outstanding).min(room).min(u64::from(u32::MAX));
        if want == 0 {
            return Ok(());
        }
        tracing::debug!(link = %self.link.id, stored, outstanding = self.outstanding, want, "asking the device for key blocks");
        self.device.request_blocks(want as u32).await?;
        self.outstanding += want;
        Ok(())
    }

    /// Stores a block unless the link holds `max_blocks` already (`None`).
    async fn insert(&self, block: qkd_device::DeviceKeyBlock) -> Result<Option<InsertOutcome>, String> {
        let stored = self.store.stored_blocks(&self.link.id).await.map_err(|e| e.to_string())?;
        if stored >= self.link.pool.max_blocks {
            return Ok(None);
        }
        self.kme.accept_block(&self.link.id, block).await.map(Some).map_err(|e| e.to_string())
    }

    async fn handle(&mut self, event: DeviceEvent) -> Result<(), DeviceError> {
        let link = self.link.id.as_str();
        match event {
            DeviceEvent::Connected(identity) => {
                self.right_link = match &self.link.device {
                    DeviceConfig::Serial(_) => identity.link_id == link,
                    // A KME reports its KME pair, not our link ID.
                    DeviceConfig::Kme(_) => true,
                };
                if self.right_link {
                    tracing::info!(
                        link,
                        device_id = %identity.device_id,
                        device_link = %identity.link_id,
                        firmware = %identity.firmware,
                        role = ?identity.role,
                        "QKD device connected"
                    );
                } else {
                    tracing::error!(
                        link,
                        device_id = %identity.device_id,
                        device_link = %identity.link_id,
                        "QKD device belongs to another link; its key blocks are rejected (check [[link]] device)"
                    );
                }
                self.metrics.set_link_state(link, DeviceLinkState::Connected);
                self.top_up().await?;
            }
            DeviceEvent::Disconnected { reason } => {
                tracing::warn!(link, %reason, "QKD device disconnected");
                self.metrics.set_link_state(link, DeviceLinkState::Disconnected);
            }
            DeviceEvent::KeyBlock(block) => {
                self.outstanding = self.outstanding.saturating_sub(1);
                self.metrics.key_block_received(link);
                let block_id = block.block_id.clone();
                let rejected = if !self.right_link {
                    Some(RejectReason::LinkMismatch)
                } else if block.key.is_empty() {
                    Some(RejectReason::Invalid)
                } else {
                    match self.insert(block).await {
                        Ok(Some(InsertOutcome::Inserted)) => None,
                        Ok(Some(InsertOutcome::AlreadyPresent)) => Some(RejectReason::Duplicate),
                        Ok(None) => Some(RejectReason::PoolFull),
                        Err(e) => {
                            tracing::error!(link, %block_id, error = %e, "cannot store a key block");
                            Some(RejectReason::StoreError)
                        }
                    }
                };
                match rejected {
                    Some(reason) => {
                        tracing::debug!(link, %block_id, reason = reason.as_str(), "key block rejected");
                        self.metrics.key_block_rejected(link, reason);
                    }
                    None => tracing::trace!(link, %block_id, "key block stored"),
                }
                self.top_up().await?;
            }
            DeviceEvent::Telemetry(t) => {
                tracing::trace!(link, state = ?t.link_state, qber = ?t.qber, secret_rate_bps = ?t.secret_rate_bps, "telemetry");
                self.metrics.telemetry(link, &t);
                self.kme.record_telemetry(
                    link,
                    LinkTelemetry {
                        qber: t.qber,
                        secret_key_rate_bps: t.secret_rate_bps,
                        observed_unix_ms: t.unix_ms,
                    },
                );
            }
            DeviceEvent::Alarm(alarm) => {
                let state = if alarm.raised { "raised" } else { "cleared" };
                match (alarm.severity, alarm.raised) {
                    (Severity::Critical, true) => {
                        tracing::error!(link, code = alarm.code, text = %alarm.text, state, "device alarm")
                    }
                    (Severity::Warning, true) => {
                        tracing::warn!(link, code = alarm.code, text = %alarm.text, state, "device alarm")
                    }
                    _ => tracing::info!(link, code = alarm.code, text = %alarm.text, state, "device alarm"),
                }
                self.metrics.alarm(link, &alarm);
            }
        }
        Ok(())
    }
}
