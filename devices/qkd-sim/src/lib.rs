//! `qkd-sim`: a simulated QKD device pair.
//!
//! One process simulates both ends of a QKD link (Alice and Bob over a fibre) and serves each
//! end on its own pseudo-terminal, speaking the QuteMail serial protocol
//! (`docs/serial-protocol.md`) exactly as a hardware device would. Key rate and QBER follow the
//! published asymptotic decoy-state BB84 model (crate `qkd-physics`); faults are injected at
//! run time through a control socket: fibre cut, an intercept-resend eavesdropper, line noise,
//! and device reboots. See `docs/qkd-sim.md`.
//!
//! The same binary plays the host side against a real device (`qkd-sim conformance`), so a
//! vendor can test firmware against the specification.

#![warn(missing_docs)]

pub mod config;
pub mod conformance;
pub mod control;
pub mod host;
pub mod kme;
pub mod pty;
pub mod sim;

pub use config::SimConfig;
pub use sim::{End, LineNoise, SimStatus, Simulator};
