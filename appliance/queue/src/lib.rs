//! `qutemail-queue`: the outbound mail queue.
//!
//! [`OutboundQueue::submit`] seals a message at rest (HSM-wrapped data key) and stores it with
//! its SMTP envelope in the mail store's queue tables (`qutemail-store`), durably, before the
//! SMTP server answers 250. [`OutboundQueue::run`] claims due recipients (a lease keeps other
//! gateway nodes off them) and attempts them concurrently, bounded per next hop and overall
//! ([`Parallelism`]), and per message and destination domain: for a peer site, takes
//! fresh QKD keys and seals the message (`qutemail-vault`, the site's policy picks the mode) and
//! relays it over STARTTLS to the peer's gateway (`qutemail-smtp` client); for other domains,
//! relays it through the configured smarthost or, without one, to the domain's mail exchangers
//! found by MX lookup ([`dns`], `normal` mode only, opportunistic STARTTLS). Every message is
//! DKIM-signed ([`dkim`]) over the bytes that go on the wire. Temporary failures (4xx,
//! connection problems, no QKD keys yet) are retried on the [`RetryPolicy`] schedule;
//! permanent ones (5xx) and the give-up age bounce: the local sender receives an RFC 3464
//! delivery status notification in their INBOX ([`dsn`]), and a delay warning once a message
//! has waited long. Each recipient's final outcome is recorded in the store with how the
//! delivery went out — the mode actually used and, for an envelope sealed for a peer site, its
//! QKD key IDs, link, KMEs and signed certificate — in the transaction that finishes it, so a
//! sender can still learn which keys protected which delivery after the message has left the
//! queue (`qutemail_store::Store::delivery_status`, `POST /api/qkd/confirm/`).

#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod dkim;
pub mod dns;
pub mod dsn;
pub mod msa;
pub mod retry;
mod runner;
pub mod submission;

pub use dsn::{DsnAction, DsnRequest, RecipientReport, build_dsn};
/// The `mail-auth` crate the queue signs and resolves with (one version for the whole gateway).
pub use mail_auth;
pub use qutemail_telemetry::{GatewayMetrics, WaitReason};
pub use retry::{NextStep, RetryPolicy};
pub use runner::{MxRouting, OutboundQueue, Parallelism, QueueError, QueueSettings, Route, wait_reason};
pub use submission::{Submission, SubmitError, Submitted, submit};
