//! `qutemail-queue`: the outbound mail queue.
//!
//! [`OutboundQueue::submit`] seals a message at rest (HSM-wrapped data key) and stores it with
//! its SMTP envelope in the mail store's queue tables (`qutemail-store`), durably, before the
//! SMTP server answers 250. [`OutboundQueue::run`] claims due recipients (a lease keeps other
//! gateway nodes off them), and per message and destination domain: for a peer site, takes
//! fresh QKD keys and seals the message (`qutemail-vault`, the site's policy picks the mode) and
//! relays it over STARTTLS to the peer's gateway (`qutemail-smtp` client); for other domains,
//! relays it through the configured smarthost. Temporary failures (4xx, connection problems, no
//! QKD keys yet) are retried on the [`RetryPolicy`] schedule; permanent ones (5xx) and the
//! give-up age bounce: the local sender receives an RFC 3464 delivery status notification in
//! their INBOX ([`dsn`]), and a delay warning once a message has waited long.

#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod dsn;
pub mod retry;
mod runner;

pub use dsn::{DsnAction, DsnRequest, RecipientReport, build_dsn};
pub use retry::{NextStep, RetryPolicy};
pub use runner::{OutboundQueue, QueueError, QueueSettings, Route};
