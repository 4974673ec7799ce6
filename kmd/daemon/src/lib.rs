//! `kmd`, QuteMail's key management daemon: its operational shell.
//!
//! One kmd runs per QKD device pair end. It reads key blocks from the device, keeps them
//! HSM-wrapped in its key pool, serves ETSI GS QKD 014 to local applications (SAEs) over
//! mutual TLS, keeps the peer site's kmd in step, exports Prometheus metrics and talks to
//! systemd. This crate is the daemon around those parts:
//!
//! | module | what |
//! | --- | --- |
//! | [`config`] | `kmd.toml`: schema, errors naming file/line/column/key, validation, file checks |
//! | [`metrics`] | the metric families, the [`metrics::Metrics`] handle, the `/metrics` listener |
//! | [`systemd`] | `READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1` |
//! | [`logging`] | `tracing` to stderr as journald, text or JSON |
//! | [`app`] | start-up order, readiness, watchdog, graceful shutdown |
//! | [`links`] | one task per QKD link: device driver, credit, blocks, telemetry |
//! | [`pool`] | the key store: the `kmd-keypool` database, its counts for credit and metrics |
//! | [`kme`] | the `kmd-kme` key management entity built from the configuration; its metrics observer |
//! | [`etsi`] | the SAE gate in front of the key service's ETSI 014 router |
//! | [`enrol`] | `kmd enrol-sae`: SAE client certificates from the site CA |
//!
//! The binary (`src/main.rs`) only parses the command line and calls into these.
//!
//! Fail closed: a missing or wrong HSM (module, token, PIN), a missing certificate or key, an
//! unusable store or a listener that cannot be bound ends the process with a non-zero status
//! before systemd is told it is ready; an HSM that fails later stops the watchdog pets.

#![warn(missing_docs)]

pub mod app;
pub mod config;
pub mod enrol;
pub mod etsi;
pub mod kme;
pub mod links;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod status;
