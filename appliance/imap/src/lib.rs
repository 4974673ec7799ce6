//! `qutemail-imap`: the gateway's IMAP4rev1 server (RFC 3501) with the extensions Thunderbird,
//! Apple Mail and mbsync use (IDLE, UIDPLUS, MOVE, SPECIAL-USE, NAMESPACE, ID, ENABLE,
//! LITERAL+, UNSELECT, CHILDREN, CONDSTORE, SASL-IR).
//!
//! Mail is stored sealed (`qutemail-store` + `qutemail-vault`); this crate never keeps
//! plaintext beyond the answer it is writing: every content request (FETCH of a body,
//! ENVELOPE, BODYSTRUCTURE, SEARCH on headers or text) asks the vault to open the message
//! ([`qutemail_vault::MailVault::present`]), and APPEND seals through
//! [`qutemail_vault::MailVault::append_plain`]. Clients see the gateway's `X-QKD-*` header
//! lines followed by the exact bytes that were sent, and `RFC822.SIZE` is that length.
//!
//! Layers:
//! - [`parse`]: the sans-I/O input side: [`parse::Framer`] cuts a byte stream into commands
//!   (literals, with the size limit applied before a literal is read), [`parse::parse_command`]
//!   parses one. Neither does I/O; the fuzz target `imap_command` drives both.
//! - [`mime`]: structure of a presented message (ENVELOPE, BODYSTRUCTURE, sections).
//! - the session (state machine over the store, generic over the stream) and the tokio
//!   [`ImapServer`] with its plain (STARTTLS) and implicit-TLS listeners.
//!
//! LOGIN and AUTHENTICATE PLAIN are refused before TLS (`LOGINDISABLED`). Failed logins back
//! off per account and per client address. Logs name commands, accounts, UIDs and sizes,
//! never message content or passwords.

#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod mime;
pub mod parse;
mod response;
mod server;
mod session;

pub use server::{ConnectionMode, ImapConfig, ImapServer, MailboxEvents, ShutdownHandle};

/// What stopped a listener.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImapError {
    /// The listening socket is unusable.
    #[error("the IMAP listening socket is unusable: {0}")]
    Listen(#[source] std::io::Error),
}
