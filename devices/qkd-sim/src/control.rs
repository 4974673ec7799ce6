//! The control socket: newline-delimited JSON over a Unix socket, for fault injection at run
//! time and for status. `qkd-sim ctl` is its client; tests and the demo use it too.
//!
//! Requests (one JSON object per line), each answered by one line
//! `{"ok":true,...}` or `{"ok":false,"error":"..."}`:
//!
//! | request | effect |
//! | --- | --- |
//! | `{"cmd":"status"}` | answers `{"ok":true,"status":{...}}` |
//! | `{"cmd":"fibre_cut","cut":true}` | cuts (or with `false` mends) the fibre |
//! | `{"cmd":"eavesdrop","fraction":0.2}` | intercept-resend on 20 % of pulses (0 removes Eve) |
//! | `{"cmd":"noise","end":"alice","flip_rate":0.0005,"drop_rate":0.0005}` | line noise on one end (`"both"` for both) |
//! | `{"cmd":"reboot","end":"bob"}` | power-cycles one device |
//! | `{"cmd":"distance","km":50}` | changes the fibre length |

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::sim::{End, LineNoise, Simulator};

/// Which end a command applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EndSelector {
    /// Alice only.
    Alice,
    /// Bob only.
    Bob,
    /// Both ends.
    Both,
}

impl EndSelector {
    fn ends(self) -> &'static [End] {
        match self {
            Self::Alice => &[End::Alice],
            Self::Bob => &[End::Bob],
            Self::Both => &[End::Alice, End::Bob],
        }
    }
}

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Report status.
    Status,
    /// Cut or mend the fibre.
    FibreCut {
        /// True cuts, false mends.
        cut: bool,
    },
    /// Set the eavesdropper's intercept fraction.
    Eavesdrop {
        /// Fraction of pulses intercepted, 0..=1.
        fraction: f64,
    },
    /// Set line noise.
    Noise {
        /// Which line(s).
        end: EndSelector,
        /// Probability a byte is flipped.
        flip_rate: f64,
        /// Probability a byte is dropped.
        drop_rate: f64,
    },
    /// Power-cycle a device.
    Reboot {
        /// Which device(s).
        end: EndSelector,
    },
    /// Change the fibre length.
    Distance {
        /// Kilometres.
        km: f64,
    },
}

/// Applies a request to the simulator and returns the JSON answer.
pub fn apply(sim: &Simulator, request: &ControlRequest) -> serde_json::Value {
    let result = match request {
        ControlRequest::Status => {
            return serde_json::json!({ "ok": true, "status": sim.status() });
        }
        ControlRequest::FibreCut { cut } => {
            sim.set_fibre_cut(*cut);
            Ok(())
        }
        ControlRequest::Eavesdrop { fraction } => sim.set_eavesdropper(*fraction),
        ControlRequest::Noise { end, flip_rate, drop_rate } => end
            .ends()
            .iter()
            .try_for_each(|e| sim.set_noise(*e, LineNoise { flip_rate: *flip_rate, drop_rate: *drop_rate })),
        ControlRequest::Reboot { end } => {
            end.ends().iter().for_each(|e| sim.reboot(*e));
            Ok(())
        }
        ControlRequest::Distance { km } => sim.set_distance_km(*km),
    };
    match result {
        Ok(()) => serde_json::json!({ "ok": true }),
        Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
    }
}

/// Serves the control socket at `path` until the task is dropped.
pub async fn serve(path: &Path, sim: Arc<Simulator>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let sim = sim.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &sim).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn handle(stream: UnixStream, sim: &Simulator) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(1 << 20)).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<ControlRequest>(&line) {
            Ok(req) => {
                tracing::info!(request = %line, "control request");
                apply(sim, &req)
            }
            Err(e) => serde_json::json!({ "ok": false, "error": format!("bad request: {e}") }),
        };
        let mut out = answer.to_string();
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
    }
    Ok(())
}

/// Sends one request to a running simulator and returns its answer.
pub async fn request(path: &Path, request: &ControlRequest) -> std::io::Result<serde_json::Value> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).map_err(std::io::Error::other)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    let answer = lines.next_line().await?.ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "simulator closed the connection")
    })?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}
