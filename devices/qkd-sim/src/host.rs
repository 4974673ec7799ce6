//! `qkd-sim host`: the host side of the serial protocol as a command-line monitor.
//!
//! Opens a device with the same driver kmd uses, asks for key blocks and prints what arrives:
//! block IDs, lengths and key check values (never key bytes), telemetry and alarms.

use std::path::PathBuf;

use qkd_device::serial::{SerialConfig, SerialDevice};
use qkd_device::{DeviceError, DeviceEvent, QkdDevice};

/// Runs until `blocks` blocks have arrived (0: forever), printing every event.
pub async fn run(device: PathBuf, baud_rate: u32, blocks: u32, json: bool) -> Result<(), DeviceError> {
    let mut dev = SerialDevice::open(SerialConfig::new(device, baud_rate))?;
    // Ask in batches so the device never sends more than this monitor will print.
    const BATCH: u32 = 64;
    let mut owed = if blocks == 0 { u32::MAX } else { blocks };
    let mut requested = BATCH.min(owed);
    dev.request_blocks(requested).await?;
    let mut received = 0u32;
    loop {
        let event = dev.next_event().await?;
        print_event(&event, json);
        if let DeviceEvent::KeyBlock(_) = event {
            received += 1;
            owed = owed.saturating_sub(1);
            requested -= 1;
            if blocks != 0 && received >= blocks {
                return Ok(());
            }
            if requested == 0 {
                requested = BATCH.min(owed);
                dev.request_blocks(requested).await?;
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn print_event(event: &DeviceEvent, json: bool) {
    let value = match event {
        DeviceEvent::Connected(id) => serde_json::json!({
            "event": "connected", "device_id": id.device_id, "link_id": id.link_id,
            "firmware": id.firmware, "role": id.role.map(|r| format!("{r:?}").to_lowercase()),
        }),
        DeviceEvent::Disconnected { reason } => {
            serde_json::json!({ "event": "disconnected", "reason": reason })
        }
        DeviceEvent::KeyBlock(b) => serde_json::json!({
            "event": "key_block", "block_id": b.block_id.to_string(), "bytes": b.key.len(),
            "kcv": hex(&b.kcv), "qber_ppm": b.qber_ppm, "created_unix_ms": b.created_unix_ms,
        }),
        DeviceEvent::Telemetry(t) => serde_json::json!({
            "event": "telemetry", "link_state": t.link_state.as_str(), "qber": t.qber,
            "secret_rate_bps": t.secret_rate_bps, "sifted_rate_bps": t.sifted_rate_bps,
            "channel_loss_db": t.channel_loss_db, "buffered_blocks": t.buffered_blocks,
        }),
        DeviceEvent::Alarm(a) => serde_json::json!({
            "event": "alarm", "code": a.code, "severity": format!("{:?}", a.severity).to_lowercase(),
            "raised": a.raised, "text": a.text,
        }),
    };
    if json {
        println!("{value}");
        return;
    }
    match event {
        DeviceEvent::KeyBlock(b) => {
            println!("key block {:>8}  {:>5} bytes  kcv {}", b.block_id, b.key.len(), hex(&b.kcv))
        }
        DeviceEvent::Telemetry(t) => println!(
            "telemetry: link {}  QBER {:.2}%  secret {:.1} bit/s  buffered {}",
            t.link_state.as_str(),
            t.qber.unwrap_or(0.0) * 100.0,
            t.secret_rate_bps.unwrap_or(0.0),
            t.buffered_blocks.unwrap_or(0)
        ),
        _ => println!("{value}"),
    }
}
