//! What became of each recipient of an outbound message (`delivery_records`, schema v5): the
//! queue's final outcome per recipient (delivered or bounced), kept after the message has left
//! the queue, with how the delivery went out — the protection mode and, for an envelope sealed
//! for a peer site, the ETSI key IDs, link, KMEs and the signed "Quantum Secured" certificate it
//! carried. [`Store::delivery_status`] joins these records with the recipients still queued, so
//! a sender can follow a message from submission to delivery (`POST /api/qkd/confirm/`).
//!
//! The records are written in the transaction that records the outcome
//! ([`Store::record_delivery_outcomes`]), so a recipient is never done without its record.
//! None of it is secret: key IDs name keys that are spent, and the certificate holds IDs,
//! hashes and a signature. Records older than [`DELIVERY_RECORD_RETENTION`] are pruned.

use std::time::{Duration, SystemTime};

use sqlx::Row as _;

use super::{Store, WriteTx, now_ms, time_of};
use crate::db::DbResult as _;
use crate::error::StoreError;

/// How long a recipient's delivery record is kept after the queue was done with it: as long as
/// a receiving site remembers peer deliveries ([`crate::PEER_DELIVERY_WINDOW`], 30 days). A
/// sender asking about an older message learns that its outcome is no longer known.
pub const DELIVERY_RECORD_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// How a delivery attempt went out on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeliveryProtection {
    /// The protection actually applied: `hybrid`, `qaes`, `otp` or `pqc` for an envelope sealed
    /// for a peer site, `normal` for mail relayed in the clear over (opportunistic) TLS.
    pub mode: String,
    /// The envelope's `X-QKD-Algorithm` (`None` for `normal`).
    pub algorithm: Option<String>,
    /// The ETSI GS QKD 014 key IDs that sealed it, in order (empty for `pqc` and `normal`).
    pub key_ids: Vec<String>,
    /// The QKD link the keys came from.
    pub link_id: Option<String>,
    /// The sending side's KME.
    pub source_kme_id: Option<String>,
    /// The receiving side's KME.
    pub target_kme_id: Option<String>,
    /// The signed certificate's JSON exactly as the envelope carried it (no key material).
    pub certificate: Option<Vec<u8>>,
}

/// Where a recipient of a queued message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its first attempt.
    Queued,
    /// Tried, waiting for a retry (e.g. for QKD keys, or a peer that did not answer).
    Deferred,
    /// Handed to the next hop, which accepted it.
    Delivered,
    /// Failed for good (refused, given up, or removed from the queue by an operator).
    Bounced,
}

impl DeliveryState {
    /// The name the REST API uses: `queued`, `deferred`, `delivered` or `bounced`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Queued => "queued",
            DeliveryState::Deferred => "deferred",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Bounced => "bounced",
        }
    }
}

/// One recipient of a queued message: its state and, once done, its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientDelivery {
    /// The forward path, as queued.
    pub recipient: String,
    /// Where it stands.
    pub state: DeliveryState,
    /// Delivery attempts made.
    pub attempts: u32,
    /// Enhanced status code of the last reply (or our diagnosis).
    pub status: Option<String>,
    /// The last reply, or our diagnosis.
    pub reply: Option<String>,
    /// The server that answered last, if any.
    pub remote: Option<String>,
    /// When the queue was done with it (`None` while queued).
    pub completed_at: Option<SystemTime>,
    /// How the attempt that finished it went out (`None` while queued, when nothing was sent,
    /// or for a recipient finished before schema v5).
    pub sent_as: Option<DeliveryProtection>,
}

/// A final outcome to record for a recipient, inside an outcome transaction.
pub(super) struct FinalOutcome<'a> {
    pub message_id: i64,
    pub recipient: &'a str,
    pub attempts: i64,
    pub delivered: bool,
    pub status: Option<&'a str>,
    pub reply: &'a str,
    pub remote: Option<&'a str>,
    pub sent_as: Option<&'a DeliveryProtection>,
}

fn check_protection(p: &DeliveryProtection) -> Result<(), StoreError> {
    let invalid = |reason: String| StoreError::Invalid { what: "delivery protection", reason };
    if !matches!(p.mode.as_str(), "hybrid" | "qaes" | "otp" | "pqc" | "normal") {
        return Err(invalid(format!("{:?} is not a protection mode", p.mode)));
    }
    if let Some(id) = p.key_ids.iter().find(|id| id.is_empty() || id.contains('\n')) {
        return Err(invalid(format!("{id:?} is not a key ID")));
    }
    Ok(())
}

impl Store {
    /// Records a recipient's final outcome (its queue row was just marked done in `tx`), and
    /// prunes records past [`DELIVERY_RECORD_RETENTION`].
    pub(super) async fn record_final_outcome(
        &self,
        tx: &mut WriteTx,
        outcome: &FinalOutcome<'_>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let retention = i64::try_from(DELIVERY_RECORD_RETENTION.as_millis()).unwrap_or(i64::MAX);
        sqlx::query("DELETE FROM delivery_records WHERE recorded_at < $1")
            .bind(now.saturating_sub(retention))
            .execute(&mut ***tx)
            .await
            .db(self.b())?;
        let queue_id: String =
            sqlx::query_scalar::<_, String>("SELECT queue_id FROM queue_messages WHERE id = $1")
                .bind(outcome.message_id)
                .fetch_one(&mut ***tx)
                .await
                .db(self.b())?;
        let p = outcome.sent_as;
        // A recipient named twice in one message is recorded once, by its first outcome.
        sqlx::query(
            "INSERT INTO delivery_records (queue_id, recipient, outcome, attempts, status, reply, remote, \
             protection, algorithm, key_ids, link_id, source_kme_id, target_kme_id, certificate, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             ON CONFLICT (queue_id, recipient) DO NOTHING",
        )
        .bind(queue_id)
        .bind(outcome.recipient)
        .bind(if outcome.delivered { "delivered" } else { "bounced" })
        .bind(outcome.attempts)
        .bind(outcome.status.map(str::to_owned))
        .bind(outcome.reply)
        .bind(outcome.remote.map(str::to_owned))
        .bind(p.map(|p| p.mode.clone()))
        .bind(p.and_then(|p| p.algorithm.clone()))
        .bind(p.map(|p| p.key_ids.join("\n")).unwrap_or_default())
        .bind(p.and_then(|p| p.link_id.clone()))
        .bind(p.and_then(|p| p.source_kme_id.clone()))
        .bind(p.and_then(|p| p.target_kme_id.clone()))
        .bind(p.and_then(|p| p.certificate.clone()))
        .bind(now)
        .execute(&mut ***tx)
        .await
        .db(self.b())?;
        Ok(())
    }

    pub(super) fn check_delivery_protection(&self, p: Option<&DeliveryProtection>) -> Result<(), StoreError> {
        p.map_or(Ok(()), check_protection)
    }

    /// Every recipient of the message queued as `queue_id`, in the order queued: those still
    /// in the queue with their state, and those the queue is done with from their delivery
    /// records (kept [`DELIVERY_RECORD_RETENTION`] after the message left the queue). Empty
    /// when the queue ID is unknown, or its records have been pruned. Read in one snapshot, so
    /// a recipient finishing meanwhile is seen once, either queued or done.
    pub async fn delivery_status(&self, queue_id: &str) -> Result<Vec<RecipientDelivery>, StoreError> {
        let b = self.b();
        let d = |e: sqlx::Error| StoreError::Corrupt(format!("delivery record of {queue_id}: {e}"));
        let mut tx = self.inner.pool.begin_with(b.begin_read()).await.db(b)?;
        let queued = sqlx::query(
            "SELECT r.address, r.state, r.attempts, r.last_status, r.last_reply, r.remote, r.changed_at \
             FROM queue_recipients r JOIN queue_messages m ON m.id = r.message_id \
             WHERE m.queue_id = $1 ORDER BY r.id",
        )
        .bind(queue_id)
        .fetch_all(&mut *tx)
        .await
        .db(b)?;
        let records = sqlx::query(
            "SELECT recipient, outcome, attempts, status, reply, remote, protection, algorithm, key_ids, \
             link_id, source_kme_id, target_kme_id, certificate, recorded_at \
             FROM delivery_records WHERE queue_id = $1 ORDER BY recorded_at, recipient",
        )
        .bind(queue_id)
        .fetch_all(&mut *tx)
        .await
        .db(b)?;
        tx.commit().await.db(b)?;

        let mut out: Vec<RecipientDelivery> = Vec::with_capacity(queued.len().max(records.len()));
        for row in &records {
            let key_ids: String = row.try_get("key_ids").map_err(d)?;
            let sent_as = row.try_get::<Option<String>, _>("protection").map_err(d)?.map(|mode| {
                Ok::<_, StoreError>(DeliveryProtection {
                    mode,
                    algorithm: row.try_get("algorithm").map_err(d)?,
                    key_ids: key_ids.split('\n').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
                    link_id: row.try_get("link_id").map_err(d)?,
                    source_kme_id: row.try_get("source_kme_id").map_err(d)?,
                    target_kme_id: row.try_get("target_kme_id").map_err(d)?,
                    certificate: row.try_get("certificate").map_err(d)?,
                })
            });
            let state = match row.try_get::<String, _>("outcome").map_err(d)?.as_str() {
                "delivered" => DeliveryState::Delivered,
                "bounced" => DeliveryState::Bounced,
                other => return Err(StoreError::Corrupt(format!("delivery record outcome {other:?}"))),
            };
            out.push(RecipientDelivery {
                recipient: row.try_get("recipient").map_err(d)?,
                state,
                attempts: attempts_of(row.try_get("attempts").map_err(d)?),
                status: row.try_get("status").map_err(d)?,
                reply: row.try_get("reply").map_err(d)?,
                remote: row.try_get("remote").map_err(d)?,
                completed_at: Some(time_of(row.try_get("recorded_at").map_err(d)?)),
                sent_as: sent_as.transpose()?,
            });
        }
        // Queue rows in queue order; a done row with a record is already listed above. Done
        // rows without one were finished before schema v5.
        let mut queue_order = Vec::with_capacity(queued.len());
        for row in &queued {
            let recipient: String = row.try_get("address").map_err(d)?;
            if let Some(i) = out.iter().position(|r| r.recipient == recipient) {
                queue_order.push(out.remove(i));
                continue;
            }
            let attempts = attempts_of(row.try_get("attempts").map_err(d)?);
            let state = match row.try_get::<String, _>("state").map_err(d)?.as_str() {
                "queued" if attempts == 0 => DeliveryState::Queued,
                "queued" => DeliveryState::Deferred,
                "delivered" => DeliveryState::Delivered,
                _ => DeliveryState::Bounced,
            };
            queue_order.push(RecipientDelivery {
                recipient,
                state,
                attempts,
                status: row.try_get("last_status").map_err(d)?,
                reply: row.try_get("last_reply").map_err(d)?,
                remote: row.try_get("remote").map_err(d)?,
                completed_at: (!matches!(state, DeliveryState::Queued | DeliveryState::Deferred))
                    .then(|| row.try_get("changed_at").map(time_of))
                    .transpose()
                    .map_err(d)?,
                sent_as: None,
            });
        }
        queue_order.extend(out);
        Ok(queue_order)
    }
}

fn attempts_of(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}
