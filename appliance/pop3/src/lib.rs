//! `qutemail-pop3`: QuteMail's POP3 server (RFC 1939, with RFC 2449 CAPA and response codes,
//! RFC 2595 STLS, RFC 5034 AUTH PLAIN, RFC 8314 implicit TLS on 995).
//!
//! The maildrop is the account's INBOX in the mail store; every message is opened through
//! the [`MailVault`](qutemail_vault::MailVault) on request, so the client receives exactly what
//! [`MailVault::present`](qutemail_vault::MailVault::present) returns: the gateway's `X-QKD-*`
//! header lines, then the bytes that were sent. No plaintext is written anywhere by this crate.
//!
//! * [`command`] parses command lines, [`session`] is the protocol as a state machine without
//!   I/O (AUTHORIZATION → TRANSACTION → UPDATE), [`message`] puts a message on the wire
//!   (CRLF lines, byte-stuffing, TOP). They are pure and fuzzable.
//! * [`Pop3Server`] is the tokio driver: [`Pop3Server::serve_plain`] (110, STLS) and
//!   [`Pop3Server::serve_tls`] (995), generic [`Pop3Server::serve_connection`] for any stream,
//!   [`Pop3Server::shutdown`].
//!
//! Logins (USER/PASS, AUTH PLAIN) are accepted only over TLS. The maildrop is locked per
//! account while a session is in TRANSACTION (`[IN-USE]`); the lock is held in this process.
//! Numbers and sizes are a snapshot taken at login; deletions are applied only at QUIT, in one
//! store transaction. Failed logins are slowed per account and per client address by
//! the gateway's shared [`LoginThrottle`](qutemail_store::LoginThrottle) (an address beyond its
//! cap gets `[SYS/TEMP]`). Logs carry commands' keywords and account addresses, never
//! arguments that could be passwords, nor message content.
//!
//! ```no_run
//! # async fn wire(tls: std::sync::Arc<rustls::ServerConfig>, store: qutemail_store::Store,
//! #               vault: qutemail_vault::MailVault) -> std::io::Result<()> {
//! use qutemail_pop3::{Pop3Config, Pop3Server};
//! let server = Pop3Server::new(Pop3Config::new(tls), store, vault);
//! let plain = tokio::net::TcpListener::bind("0.0.0.0:110").await?;
//! let implicit = tokio::net::TcpListener::bind("0.0.0.0:995").await?;
//! let (a, b) = (server.clone(), server.clone());
//! let tasks = (tokio::spawn(async move { a.serve_plain(plain).await }),
//!              tokio::spawn(async move { b.serve_tls(implicit).await }));
//! // ... on SIGTERM:
//! server.shutdown();
//! let _ = tasks.0.await;
//! let _ = tasks.1.await;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod command;
mod guard;
pub mod message;
mod server;
pub mod session;

pub use server::{Pop3Config, Pop3Server};
