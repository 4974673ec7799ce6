//! `qutemail-queue`: the outbound mail queue (work in progress: the retry schedule and delivery
//! status notifications; the durable entries and the delivery runner follow).

#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod dsn;
pub mod retry;

pub use dsn::{DsnAction, DsnRequest, RecipientReport, build_dsn};
pub use retry::{NextStep, RetryPolicy};
