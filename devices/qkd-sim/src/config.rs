//! The simulator's TOML configuration. Every key is documented in `docs/qkd-sim.md`; unknown
//! keys are refused with the file, line and key named.

use std::path::{Path, PathBuf};

use qkd_physics::LinkParameters;
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Identifier of the simulated link, reported by both devices.
    #[serde(default = "default_link_id")]
    pub link_id: String,
    /// Simulated seconds per wall-clock second (1 = real time). Tests speed the link up.
    #[serde(default = "default_time_scale")]
    pub time_scale: f64,
    /// Seed for the simulator's statistics (not for key bytes, which always come from the OS).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Physics of the link (the published decoy-state BB84 model).
    #[serde(default)]
    pub physics: LinkParameters,
    /// How key blocks are cut and buffered.
    #[serde(default)]
    pub blocks: BlockConfig,
    /// The serial lines to the two hosts.
    #[serde(default)]
    pub serial: SerialLineConfig,
    /// The transmitter (Alice) end.
    #[serde(default = "default_alice")]
    pub alice: EndConfig,
    /// The receiver (Bob) end.
    #[serde(default = "default_bob")]
    pub bob: EndConfig,
    /// Where the control socket listens (fault injection and status).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Seconds between telemetry reports to the hosts.
    #[serde(default = "default_telemetry_interval_s")]
    pub telemetry_interval_s: f64,
    /// KME mode: the pair is exposed as two ETSI GS QKD 014 KMEs instead of two serial devices
    /// (see `docs/qkd-sim.md`). Key blocks then go only to the KMEs, never to the ptys.
    #[serde(default)]
    pub kme: Option<crate::kme::KmeConfig>,
}

/// Key-block settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlockConfig {
    /// Sifted bits that make one privacy-amplification block.
    pub sifted_bits_per_block: u64,
    /// Largest key block sent to a host, in bytes; a larger distilled block is split.
    pub max_key_bytes: u16,
    /// Key blocks each device holds for its host before it discards new ones.
    pub buffer_blocks: usize,
    /// Security parameter reported with every block (ε = 2^-security_bits).
    pub security_bits: u16,
}

impl Default for BlockConfig {
    fn default() -> Self {
        Self { sifted_bits_per_block: 16_384, max_key_bytes: 1024, buffer_blocks: 4096, security_bits: 64 }
    }
}

/// Serial-line settings shared by both ends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SerialLineConfig {
    /// Line speed the device paces its output to (10 bits per byte: 8N1).
    pub baud_rate: u32,
    /// Reliable frames in flight before the device waits for an ACK.
    pub window: u8,
    /// Milliseconds without ACK progress before the device resends; by default derived from the
    /// baud rate (twice the time a full window takes, plus 200 ms).
    pub retransmit_timeout_ms: Option<u64>,
    /// Fraction of bytes flipped on the line at start (both directions).
    pub flip_rate: f64,
    /// Fraction of bytes dropped on the line at start (both directions).
    pub drop_rate: f64,
    /// Milliseconds a rebooting device stays silent.
    pub reboot_downtime_ms: u64,
}

impl Default for SerialLineConfig {
    fn default() -> Self {
        Self {
            baud_rate: 115_200,
            window: 8,
            retransmit_timeout_ms: None,
            flip_rate: 0.0,
            drop_rate: 0.0,
            reboot_downtime_ms: 1500,
        }
    }
}

impl SerialLineConfig {
    /// The retransmission timeout in force.
    pub fn retransmit_timeout(&self, max_key_bytes: u16) -> std::time::Duration {
        let ms = self.retransmit_timeout_ms.unwrap_or_else(|| {
            let frame_bytes = f64::from(max_key_bytes) + 80.0;
            let window_s = frame_bytes * f64::from(self.window) * 10.0 / f64::from(self.baud_rate.max(1));
            (2.0 * window_s * 1000.0) as u64 + 200
        });
        std::time::Duration::from_millis(ms)
    }
}

/// One end of the link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndConfig {
    /// Serial number the device reports.
    pub device_id: String,
    /// Optional stable path: a symbolic link to the end's pseudo-terminal is made here.
    #[serde(default)]
    pub link_path: Option<PathBuf>,
}

fn default_link_id() -> String {
    "qkd-link-1".into()
}
fn default_time_scale() -> f64 {
    1.0
}
fn default_telemetry_interval_s() -> f64 {
    1.0
}
fn default_alice() -> EndConfig {
    EndConfig { device_id: "QSIM-A-0001".into(), link_path: None }
}
fn default_bob() -> EndConfig {
    EndConfig { device_id: "QSIM-B-0001".into(), link_path: None }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            link_id: default_link_id(),
            time_scale: default_time_scale(),
            seed: None,
            physics: LinkParameters::default(),
            blocks: BlockConfig::default(),
            serial: SerialLineConfig::default(),
            alice: default_alice(),
            bob: default_bob(),
            control_socket: None,
            telemetry_interval_s: default_telemetry_interval_s(),
            kme: None,
        }
    }
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown or mistyped key.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
}

impl SimConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses configuration text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: SimConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse { path: path.into(), line, column, message: e.message().to_string() }
        })?;
        config.validate().map_err(|message| ConfigError::Invalid { path: path.into(), message })?;
        Ok(config)
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.physics.validate().map_err(|e| format!("[physics] {e}"))?;
        if !(self.time_scale.is_finite() && self.time_scale > 0.0 && self.time_scale <= 1e6) {
            return Err(format!("time_scale = {} must be in (0, 1e6]", self.time_scale));
        }
        if !(self.telemetry_interval_s.is_finite() && self.telemetry_interval_s >= 0.05) {
            return Err("telemetry_interval_s must be at least 0.05".into());
        }
        let b = &self.blocks;
        if b.sifted_bits_per_block < 64 {
            return Err("[blocks] sifted_bits_per_block must be at least 64".into());
        }
        if b.max_key_bytes == 0 || usize::from(b.max_key_bytes) > qkd_serial_proto::MAX_KEY_LEN {
            return Err(format!("[blocks] max_key_bytes must be in 1..={}", qkd_serial_proto::MAX_KEY_LEN));
        }
        if b.buffer_blocks == 0 {
            return Err("[blocks] buffer_blocks must be at least 1".into());
        }
        let s = &self.serial;
        if s.baud_rate < 300 {
            return Err("[serial] baud_rate must be at least 300".into());
        }
        if s.window == 0 {
            return Err("[serial] window must be at least 1".into());
        }
        for (key, v) in [("flip_rate", s.flip_rate), ("drop_rate", s.drop_rate)] {
            if !(0.0..=0.5).contains(&v) {
                return Err(format!("[serial] {key} = {v} must be in [0, 0.5]"));
            }
        }
        Ok(())
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "link_id = \"x\"\n\n[serial]\nbaud_rate = 9600\nbaud = 3\n";
        let err = SimConfig::parse(text, Path::new("/etc/qkd-sim.toml")).unwrap_err().to_string();
        assert!(err.starts_with("/etc/qkd-sim.toml:5:"), "{err}");
        assert!(err.contains("baud"), "{err}");
    }

    #[test]
    fn physics_range_errors_name_the_field() {
        let text = "[physics]\ndistance_km = -4\n";
        let err = SimConfig::parse(text, Path::new("sim.toml")).unwrap_err().to_string();
        assert!(err.contains("distance_km"), "{err}");
    }

    #[test]
    fn kme_mode_is_configured_in_its_own_table() {
        let text = r#"
[kme]
listen_a = "127.0.0.1:0"
listen_b = "127.0.0.1:0"
kme_id_a = "KME-A"
kme_id_b = "KME-B"
sae_id_a = "A-app"
sae_id_b = "B-app"
server_cert_a = "a.crt"
server_key_a = "a.key"
server_cert_b = "b.crt"
server_key_b = "b.key"
client_ca = "ca.crt"
"#;
        let c = SimConfig::parse(text, Path::new("sim.toml")).unwrap();
        assert_eq!(c.kme.unwrap().kme_id_b, "KME-B");
        let err = SimConfig::parse(&format!("{text}bogus = 1\n"), Path::new("sim.toml")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn empty_file_is_the_default_link() {
        let c = SimConfig::parse("", Path::new("x")).unwrap();
        assert_eq!(c.serial.baud_rate, 115_200);
        assert!(c.serial.retransmit_timeout(1024).as_millis() > 1000);
    }
}
