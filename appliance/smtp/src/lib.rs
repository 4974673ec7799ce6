//! QuteMail's SMTP: the MX (port 25) and submission (587, 465) server and the outbound relay
//! client.
//!
//! The crate follows Stalwart's shape: protocol logic is sans-I/O ([`proto`]: feed bytes, get
//! replies and questions for the host), and thin tokio drivers run it over any
//! `AsyncRead + AsyncWrite` stream ([`server`], [`client`]), with TLS through rustls (ring).
//!
//! The host (queue, mail store, accounts) plugs into the server through
//! [`server::SmtpHandler`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use qutemail_smtp::server::{ListenerConfig, ListenerMode, SmtpHandler, SmtpServer};
//! use qutemail_smtp::{
//!     Address, AuthOutcome, Credentials, DeliveryReceipt, EnhancedCode, MailEnvelope, MailParams,
//!     RcptParams, Refusal, ReversePath, SessionInfo,
//! };
//!
//! struct Gateway;
//!
//! impl SmtpHandler for Gateway {
//!     async fn authenticate(&self, _: &SessionInfo, c: &Credentials) -> AuthOutcome {
//!         if c.username == "alice" && c.password.as_str() == "secret" { AuthOutcome::Accepted } else { AuthOutcome::Rejected }
//!     }
//!     async fn check_sender(&self, _: &SessionInfo, _: &ReversePath, _: &MailParams) -> Result<(), Refusal> {
//!         Ok(())
//!     }
//!     async fn check_recipient(&self, _: &SessionInfo, to: &Address, _: &RcptParams) -> Result<(), Refusal> {
//!         if to.domain() == "site-a.example" { Ok(()) } else {
//!             Err(Refusal::new(550, EnhancedCode::new(5, 7, 1), "Relaying denied"))
//!         }
//!     }
//!     async fn deliver(&self, _: MailEnvelope, message: Vec<u8>) -> Result<DeliveryReceipt, Refusal> {
//!         Ok(DeliveryReceipt { id: format!("{} octets", message.len()) })
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ListenerConfig::new(ListenerMode::Mx, "mx.site-a.example", None)?;
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:25").await?;
//! SmtpServer::new(config, Arc::new(Gateway)).run(listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```

pub mod address;
pub mod client;
pub mod params;
pub mod proto;
pub mod reply;
pub mod server;
pub mod tls;
mod trace;

pub use address::{Address, AddressError, ReversePath};
pub use params::{BodyType, DsnNotify, DsnReturn, MailParams, OriginalRecipient, RcptParams};
pub use proto::server::{
    AuthMechanism, AuthOutcome, Credentials, DeliveryReceipt, MailEnvelope, Recipient, Refusal, SessionInfo,
    TlsInfo,
};
pub use reply::{EnhancedCode, Reply, ReplyClass};
pub use trace::rfc5322_date;
