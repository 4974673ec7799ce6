//! The QuteMail mail gateway's parts shared by its two binaries: `qutemail` (the daemon,
//! `src/main.rs`) and `qutemailctl` (the operator's tool, `src/bin/qutemailctl/`).
//!
//! [`config`] reads `qutemail.toml`; [`wiring`] builds the store, the vault (HSM, kmd, site
//! keys), the queue and the web server's dependencies from it; [`serve`] runs every listener and
//! the queue; [`operator`] holds `qutemailctl`'s commands and [`commands`] the daemon binary's
//! own (site card, seal, accept, open). The protocols themselves
//! live in their own crates (`qutemail-smtp`, `qutemail-imap`, ...); this crate only wires them.

pub mod backup;
pub mod commands;
pub mod config;
pub mod inbound_auth;
pub mod operator;
pub mod secret_input;
pub mod serve;
pub mod smtp_host;
pub mod systemd;
pub mod wiring;
