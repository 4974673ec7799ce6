//! One type for whichever driver the configuration names.

use crate::kme::KmeDevice;
use crate::serial::SerialDevice;
use crate::{BlockId, DeviceError, DeviceEvent, QkdDevice};

/// A QKD device of either kind, dispatching to its driver.
pub enum AnyDevice {
    /// A device speaking the QuteMail serial protocol.
    Serial(SerialDevice),
    /// A vendor device exposing an ETSI GS QKD 014 KME.
    Kme(KmeDevice),
}

impl From<SerialDevice> for AnyDevice {
    fn from(device: SerialDevice) -> Self {
        Self::Serial(device)
    }
}

impl From<KmeDevice> for AnyDevice {
    fn from(device: KmeDevice) -> Self {
        Self::Kme(device)
    }
}

impl QkdDevice for AnyDevice {
    async fn next_event(&mut self) -> Result<DeviceEvent, DeviceError> {
        match self {
            Self::Serial(device) => device.next_event().await,
            Self::Kme(device) => device.next_event().await,
        }
    }

    async fn request_blocks(&mut self, n: u32) -> Result<(), DeviceError> {
        match self {
            Self::Serial(device) => device.request_blocks(n).await,
            Self::Kme(device) => device.request_blocks(n).await,
        }
    }

    async fn fetch_blocks(&mut self, ids: Vec<BlockId>) -> Result<(), DeviceError> {
        match self {
            Self::Serial(device) => device.fetch_blocks(ids).await,
            Self::Kme(device) => device.fetch_blocks(ids).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Serial(device) => device.describe(),
            Self::Kme(device) => device.describe(),
        }
    }
}
