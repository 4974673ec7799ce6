//! The outbound queue's durable part: queued messages (SMTP envelope + sealed bytes) and their
//! recipients' delivery state. The queue runner (`qutemail-queue`) claims due recipients,
//! delivers, and records outcomes here; a message leaves the queue when every recipient is done.

use std::time::{Duration, SystemTime};

use sqlx::Row as _;
use tokio::io::AsyncRead;

use super::delivery::{DeliveryProtection, FinalOutcome};
use super::{Store, int, ms_of, now_ms, random_hex, time_of, u64_of};
use crate::db::DbResult as _;
use crate::error::StoreError;
use crate::types::Protection;
use crate::{BlobId, BlobReader};

/// A message to queue.
#[derive(Debug, Clone)]
pub struct NewQueuedMessage {
    /// Reverse path (`""` for the null path `<>`).
    pub sender: String,
    /// DSN `ENVID`.
    pub envid: Option<String>,
    /// DSN `RET=FULL`.
    pub ret_full: bool,
    /// The protection the sender asked for (`None`: the site's policy decides).
    pub requested: Option<String>,
    /// Size of the message as submitted.
    pub size: u64,
    /// How the queued bytes are sealed (opaque, as for mailbox messages).
    pub protection: Protection,
    /// The recipients.
    pub recipients: Vec<NewQueueRecipient>,
}

/// A recipient to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewQueueRecipient {
    /// The forward path.
    pub address: String,
    /// DSN `NOTIFY` as given (`""`: default).
    pub notify: String,
    /// DSN `ORCPT`.
    pub orcpt: Option<String>,
}

/// A queued message (without its bytes: see [`Store::read_queued_blob`]).
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// Row id.
    pub id: i64,
    /// The queue ID operators see.
    pub queue_id: String,
    /// Reverse path (`""`: null).
    pub sender: String,
    /// DSN `ENVID`.
    pub envid: Option<String>,
    /// DSN `RET=FULL`.
    pub ret_full: bool,
    /// Requested protection.
    pub requested: Option<String>,
    /// Size as submitted.
    pub size: u64,
    /// The sealed bytes.
    pub blob_id: BlobId,
    /// How they are sealed.
    pub protection: Protection,
    /// When the message was queued.
    pub created_at: SystemTime,
}

/// A recipient waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRecipient {
    /// Row id (for [`Store::record_delivery_outcomes`]).
    pub id: i64,
    /// The forward path.
    pub address: String,
    /// DSN `NOTIFY`.
    pub notify: String,
    /// DSN `ORCPT`.
    pub orcpt: Option<String>,
    /// Attempts made so far.
    pub attempts: u32,
    /// Whether a delay notification was sent.
    pub warned: bool,
}

/// Work for one delivery attempt: a message and its due recipients in one domain.
#[derive(Debug, Clone)]
pub struct QueuedDelivery {
    /// The message.
    pub message: QueuedMessage,
    /// The recipients' domain.
    pub domain: String,
    /// The due recipients of that domain.
    pub recipients: Vec<QueuedRecipient>,
}

/// What happened to a recipient in an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueOutcome {
    /// Delivered: the recipient is done.
    Delivered {
        /// The server that took it.
        remote: String,
        /// Its reply.
        reply: String,
    },
    /// Not yet: try again at `at`.
    Retry {
        /// When.
        at: SystemTime,
        /// Enhanced status code (`4.x.x`).
        status: String,
        /// The reply or our diagnosis.
        reply: String,
        /// The server that answered, if any.
        remote: Option<String>,
        /// Whether a delay notification has now been sent.
        warned: bool,
    },
    /// Failed for good (bounced): the recipient is done.
    Failed {
        /// Enhanced status code (`5.x.x`).
        status: String,
        /// The reply or our diagnosis.
        reply: String,
        /// The server that answered, if any.
        remote: Option<String>,
    },
}

/// One line of the queue listing (what `qutemailctl queue list` shows).
#[derive(Debug, Clone)]
pub struct QueueListing {
    /// Queue ID.
    pub queue_id: String,
    /// Sender.
    pub sender: String,
    /// Size.
    pub size: u64,
    /// Queued at.
    pub created_at: SystemTime,
    /// Recipients: address, state, attempts, next attempt, last reply.
    pub recipients: Vec<(String, String, u32, SystemTime, Option<String>)>,
}

/// The last reply recorded for a recipient whose message an operator removed from the queue.
pub const DELETED_BY_OPERATOR: &str = "removed from the queue by the operator before delivery";

fn domain_of(address: &str) -> Result<String, StoreError> {
    address.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).filter(|d| !d.is_empty()).ok_or_else(|| {
        StoreError::Invalid { what: "recipient", reason: format!("{address:?} has no domain") }
    })
}

impl Store {
    /// Queues a message: streams `sealed` into a durable blob, then commits the message and its
    /// recipients (due now) in one transaction. When this returns `Ok` the message survives a
    /// crash; the SMTP server may then answer 250. Returns the queue ID.
    pub async fn enqueue(
        &self,
        message: &NewQueuedMessage,
        sealed: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<String, StoreError> {
        if message.recipients.is_empty() {
            return Err(StoreError::Invalid { what: "queued message", reason: "no recipient".into() });
        }
        let domains =
            message.recipients.iter().map(|r| domain_of(&r.address)).collect::<Result<Vec<_>, _>>()?;
        super::check_protection(&message.protection)?;
        let size = int(message.size, "message size")?;
        let blob = self.inner.blobs.put(sealed).await?;
        let queue_id = random_hex()?;
        let result = async {
            let now = now_ms();
            let mut tx = self.write().await?;
            let row = sqlx::query(
                "INSERT INTO queue_messages (queue_id, sender, envid, ret_full, requested, size, blob_id, blob_len, \
                 protection, wrapped_key, key_ids, certificate, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id",
            )
            .bind(&queue_id)
            .bind(&message.sender)
            .bind(message.envid.clone())
            .bind(i64::from(message.ret_full))
            .bind(message.requested.clone())
            .bind(size)
            .bind(blob.id.as_str().to_owned())
            .bind(int(blob.len, "blob length")?)
            .bind(&message.protection.kind)
            .bind(message.protection.wrapped_key.clone())
            .bind(message.protection.key_ids.join("\n"))
            .bind(message.protection.certificate.clone())
            .bind(now)
            .fetch_one(&mut **tx)
            .await
            .db(self.b())?;
            let id: i64 = row.try_get("id").db(self.b())?;
            for (r, domain) in message.recipients.iter().zip(&domains) {
                sqlx::query(
                    "INSERT INTO queue_recipients (message_id, address, domain, notify, orcpt, state, attempts, \
                     next_attempt_at, warned, changed_at) VALUES ($1, $2, $3, $4, $5, 'queued', 0, $6, 0, $6)",
                )
                .bind(id)
                .bind(&r.address)
                .bind(domain)
                .bind(&r.notify)
                .bind(r.orcpt.clone())
                .bind(now)
                .execute(&mut **tx)
                .await
                .db(self.b())?;
            }
            self.commit(tx).await
        }
        .await;
        match result {
            Ok(()) => Ok(queue_id),
            Err(e) => {
                self.drop_blobs(std::slice::from_ref(&blob.id)).await;
                Err(e)
            }
        }
    }

    /// Claims the recipients due at `now` (at most `limit`), grouped by message and domain, and
    /// pushes their next attempt `lease` ahead so no other runner (another node) takes them
    /// meanwhile; [`Store::record_delivery_outcomes`] then sets their real state. A runner that dies
    /// mid-delivery leaves them to be retried once the lease runs out.
    pub async fn claim_due(
        &self,
        now: SystemTime,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<QueuedDelivery>, StoreError> {
        let now_ms_ = ms_of(now);
        let until = now_ms_.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let mut tx = self.write().await?;
        let sql = format!(
            "SELECT r.id, r.message_id, r.address, r.domain, r.notify, r.orcpt, r.attempts, r.warned, \
             m.queue_id, m.sender, m.envid, m.ret_full, m.requested, m.size, m.blob_id, m.protection, \
             m.wrapped_key, m.key_ids, m.certificate, m.created_at \
             FROM queue_recipients r JOIN queue_messages m ON m.id = r.message_id \
             WHERE r.state = 'queued' AND r.next_attempt_at <= $1 ORDER BY r.next_attempt_at, r.id LIMIT $2{}",
            self.b().for_update()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now_ms_)
            .bind(i64::from(limit))
            .fetch_all(&mut **tx)
            .await
            .db(self.b())?;
        let mut out: Vec<QueuedDelivery> = Vec::new();
        for row in &rows {
            let d = |e: sqlx::Error| StoreError::Database { backend: self.b().name(), source: e };
            let rid: i64 = row.try_get("id").map_err(d)?;
            sqlx::query("UPDATE queue_recipients SET next_attempt_at = $1, claimed_until = $1 WHERE id = $2")
                .bind(until)
                .bind(rid)
                .execute(&mut **tx)
                .await
                .db(self.b())?;
            let message_id: i64 = row.try_get("message_id").map_err(d)?;
            let domain: String = row.try_get("domain").map_err(d)?;
            let recipient = self.queued_recipient_of(row, rid)?;
            if let Some(group) = out.iter_mut().find(|g| g.message.id == message_id && g.domain == domain) {
                group.recipients.push(recipient);
                continue;
            }
            let message = self.queued_message_of(row, message_id)?;
            out.push(QueuedDelivery { message, domain, recipients: vec![recipient] });
        }
        self.commit(tx).await?;
        Ok(out)
    }

    /// The sealed bytes of a queued message.
    pub async fn read_queued_blob(&self, message: &QueuedMessage) -> Result<BlobReader, StoreError> {
        Ok(self.inner.blobs.get(&message.blob_id).await?)
    }

    /// Records what happened to recipients (by [`QueuedRecipient::id`]) in one delivery attempt
    /// that went out as `sent_as` (`None`: nothing was sent, e.g. no route or a policy refusal).
    /// A recipient that is now done (delivered or failed) gets its delivery record
    /// ([`Store::delivery_status`]) in the same transaction. A message whose recipients are all
    /// done is removed with its blob; its records stay.
    pub async fn record_delivery_outcomes(
        &self,
        outcomes: &[(i64, QueueOutcome)],
        sent_as: Option<&DeliveryProtection>,
    ) -> Result<(), StoreError> {
        self.check_delivery_protection(sent_as)?;
        let now = now_ms();
        let mut tx = self.write().await?;
        let mut messages = Vec::new();
        for (id, outcome) in outcomes {
            let (state, next, status, reply, remote, warned) = match outcome {
                QueueOutcome::Delivered { remote, reply } => {
                    ("delivered", now, Some("2.0.0".to_owned()), reply.clone(), Some(remote.clone()), None)
                }
                QueueOutcome::Retry { at, status, reply, remote, warned } => {
                    ("queued", ms_of(*at), Some(status.clone()), reply.clone(), remote.clone(), Some(*warned))
                }
                QueueOutcome::Failed { status, reply, remote } => {
                    ("failed", now, Some(status.clone()), reply.clone(), remote.clone(), None)
                }
            };
            let row = sqlx::query(
                "UPDATE queue_recipients SET state = $1, next_attempt_at = $2, last_status = $3, last_reply = $4, \
                 remote = $5, attempts = attempts + 1, warned = CASE WHEN $6 < 0 THEN warned ELSE $6 END, \
                 changed_at = $7, claimed_until = 0 WHERE id = $8 AND state = 'queued' \
                 RETURNING message_id, address, attempts",
            )
            .bind(state)
            .bind(next)
            .bind(status)
            .bind(reply.clone())
            .bind(remote)
            .bind(warned.map_or(-1_i64, i64::from))
            .bind(now)
            .bind(*id)
            .fetch_optional(&mut **tx)
            .await
            .db(self.b())?;
            if let Some(row) = row {
                let m: i64 = row.try_get("message_id").db(self.b())?;
                let done = match outcome {
                    QueueOutcome::Delivered { remote, reply } => {
                        Some((true, Some("2.0.0"), reply, Some(remote.as_str())))
                    }
                    QueueOutcome::Failed { status, reply, remote } => {
                        Some((false, Some(status.as_str()), reply, remote.as_deref()))
                    }
                    QueueOutcome::Retry { .. } => None,
                };
                if let Some((delivered, status, reply, remote)) = done {
                    let address: String = row.try_get("address").db(self.b())?;
                    let final_outcome = FinalOutcome {
                        message_id: m,
                        recipient: &address,
                        attempts: row.try_get("attempts").db(self.b())?,
                        delivered,
                        status,
                        reply,
                        remote,
                        sent_as,
                    };
                    self.record_final_outcome(&mut tx, &final_outcome).await?;
                }
                if !messages.contains(&m) {
                    messages.push(m);
                }
            }
        }
        let mut done_blobs = Vec::new();
        for m in messages {
            let left: i64 = sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM queue_recipients WHERE message_id = $1 AND state = 'queued'",
            )
            .bind(m)
            .fetch_one(&mut **tx)
            .await
            .db(self.b())?;
            if left == 0 {
                let blob: Option<String> = sqlx::query_scalar::<_, String>(
                    "DELETE FROM queue_messages WHERE id = $1 RETURNING blob_id",
                )
                .bind(m)
                .fetch_optional(&mut **tx)
                .await
                .db(self.b())?;
                if let Some(b) = blob.and_then(|b| BlobId::parse(&b).ok()) {
                    done_blobs.push(b);
                }
            }
        }
        self.commit(tx).await?;
        self.drop_blobs(&done_blobs).await;
        Ok(())
    }

    /// A queued message and its recipients still waiting for delivery, by queue ID (`None`: no
    /// such message, e.g. it has left the queue).
    pub async fn queued_message(
        &self,
        queue_id: &str,
    ) -> Result<Option<(QueuedMessage, Vec<QueuedRecipient>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT m.id AS message_id, m.queue_id, m.sender, m.envid, m.ret_full, m.requested, m.size, \
             m.blob_id, m.protection, m.wrapped_key, m.key_ids, m.certificate, m.created_at, r.id AS rid, \
             r.address, r.notify, r.orcpt, r.attempts, r.warned, r.state \
             FROM queue_messages m LEFT JOIN queue_recipients r ON r.message_id = m.id \
             WHERE m.queue_id = $1 ORDER BY r.id",
        )
        .bind(queue_id)
        .fetch_all(&self.inner.pool)
        .await
        .db(self.b())?;
        let Some(first) = rows.first() else { return Ok(None) };
        let d = |e: sqlx::Error| StoreError::Database { backend: self.b().name(), source: e };
        let message = self.queued_message_of(first, first.try_get("message_id").map_err(d)?)?;
        let mut waiting = Vec::new();
        for row in &rows {
            if row.try_get::<Option<String>, _>("state").map_err(d)?.as_deref() == Some("queued") {
                waiting.push(self.queued_recipient_of(row, row.try_get("rid").map_err(d)?)?);
            }
        }
        Ok(Some((message, waiting)))
    }

    /// Makes recipients waiting for a retry due now: those of message `queue_id`, or with `None`
    /// every waiting recipient (an operator's "flush", e.g. once a link is back). A recipient a
    /// runner is attempting right now is left alone (its outcome sets its next attempt). Returns
    /// how many recipients were made due; `Ok(0)` for an unknown queue ID.
    pub async fn retry_queued_now(&self, queue_id: Option<&str>) -> Result<u64, StoreError> {
        let now = now_ms();
        let result = match queue_id {
            Some(id) => sqlx::query(
                "UPDATE queue_recipients SET next_attempt_at = $1 WHERE state = 'queued' AND next_attempt_at > $1 \
                 AND claimed_until <= $1 AND message_id IN (SELECT id FROM queue_messages WHERE queue_id = $2)",
            )
            .bind(now)
            .bind(id)
            .execute(&self.inner.pool)
            .await
            .db(self.b())?,
            None => sqlx::query(
                "UPDATE queue_recipients SET next_attempt_at = $1 WHERE state = 'queued' AND next_attempt_at > $1 \
                 AND claimed_until <= $1",
            )
            .bind(now)
            .execute(&self.inner.pool)
            .await
            .db(self.b())?,
        };
        Ok(result.rows_affected())
    }

    /// Removes message `queue_id` from the queue with its blob, whatever its recipients' state.
    /// The recipients still waiting get a `bounced` delivery record ([`DELETED_BY_OPERATOR`]).
    /// Returns the recipients that were still waiting (whom a bounce should name), or `None`
    /// when there is no such message. A delivery attempt already under way is not interrupted:
    /// its outcome finds no row and is dropped.
    pub async fn delete_queued(&self, queue_id: &str) -> Result<Option<Vec<QueuedRecipient>>, StoreError> {
        let mut tx = self.write().await?;
        let d = |e: sqlx::Error| StoreError::Database { backend: self.b().name(), source: e };
        let Some(row) = sqlx::query("SELECT id, blob_id FROM queue_messages WHERE queue_id = $1")
            .bind(queue_id)
            .fetch_optional(&mut **tx)
            .await
            .db(self.b())?
        else {
            return Ok(None);
        };
        let id: i64 = row.try_get("id").map_err(d)?;
        let blob: String = row.try_get("blob_id").map_err(d)?;
        let rows = sqlx::query(
            "SELECT id AS rid, address, notify, orcpt, attempts, warned FROM queue_recipients \
             WHERE message_id = $1 AND state = 'queued' ORDER BY id",
        )
        .bind(id)
        .fetch_all(&mut **tx)
        .await
        .db(self.b())?;
        let mut waiting = Vec::new();
        for row in &rows {
            waiting.push(self.queued_recipient_of(row, row.try_get("rid").map_err(d)?)?);
        }
        // Whoever was still waiting will not get it: bounced, as far as the sender can tell.
        for r in &waiting {
            let removed = FinalOutcome {
                message_id: id,
                recipient: &r.address,
                attempts: i64::from(r.attempts),
                delivered: false,
                status: Some("5.0.0"),
                reply: DELETED_BY_OPERATOR,
                remote: None,
                sent_as: None,
            };
            self.record_final_outcome(&mut tx, &removed).await?;
        }
        sqlx::query("DELETE FROM queue_recipients WHERE message_id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await
            .db(self.b())?;
        sqlx::query("DELETE FROM queue_messages WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await
            .db(self.b())?;
        self.commit(tx).await?;
        if let Ok(b) = BlobId::parse(&blob) {
            self.drop_blobs(&[b]).await;
        }
        Ok(Some(waiting))
    }

    fn queued_message_of(&self, row: &sqlx::any::AnyRow, id: i64) -> Result<QueuedMessage, StoreError> {
        let d = |e: sqlx::Error| StoreError::Database { backend: self.b().name(), source: e };
        let key_ids: String = row.try_get("key_ids").map_err(d)?;
        let blob_id: String = row.try_get("blob_id").map_err(d)?;
        Ok(QueuedMessage {
            id,
            queue_id: row.try_get("queue_id").map_err(d)?,
            sender: row.try_get("sender").map_err(d)?,
            envid: row.try_get("envid").map_err(d)?,
            ret_full: row.try_get::<i64, _>("ret_full").map_err(d)? != 0,
            requested: row.try_get("requested").map_err(d)?,
            size: u64_of(row.try_get("size").map_err(d)?, "queued size")?,
            blob_id: BlobId::parse(&blob_id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            protection: Protection {
                kind: row.try_get("protection").map_err(d)?,
                wrapped_key: row.try_get("wrapped_key").map_err(d)?,
                key_ids: key_ids.split('\n').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
                certificate: row.try_get("certificate").map_err(d)?,
            },
            created_at: time_of(row.try_get("created_at").map_err(d)?),
        })
    }

    fn queued_recipient_of(&self, row: &sqlx::any::AnyRow, id: i64) -> Result<QueuedRecipient, StoreError> {
        let d = |e: sqlx::Error| StoreError::Database { backend: self.b().name(), source: e };
        Ok(QueuedRecipient {
            id,
            address: row.try_get("address").map_err(d)?,
            notify: row.try_get("notify").map_err(d)?,
            orcpt: row.try_get("orcpt").map_err(d)?,
            attempts: u32::try_from(row.try_get::<i64, _>("attempts").map_err(d)?).unwrap_or(u32::MAX),
            warned: row.try_get::<i64, _>("warned").map_err(d)? != 0,
        })
    }

    /// Everything in the queue, oldest first (for operators).
    pub async fn queue_listing(&self) -> Result<Vec<QueueListing>, StoreError> {
        let rows = sqlx::query(
            "SELECT m.queue_id, m.sender, m.size, m.created_at, r.address, r.state, r.attempts, \
             r.next_attempt_at, r.last_reply FROM queue_messages m JOIN queue_recipients r ON r.message_id = m.id \
             ORDER BY m.id, r.id",
        )
        .fetch_all(&self.inner.pool)
        .await
        .db(self.b())?;
        let mut out: Vec<QueueListing> = Vec::new();
        for row in &rows {
            let d = |e: sqlx::Error| StoreError::Database { backend: self.b().name(), source: e };
            let queue_id: String = row.try_get("queue_id").map_err(d)?;
            let recipient = (
                row.try_get::<String, _>("address").map_err(d)?,
                row.try_get::<String, _>("state").map_err(d)?,
                u32::try_from(row.try_get::<i64, _>("attempts").map_err(d)?).unwrap_or(u32::MAX),
                time_of(row.try_get("next_attempt_at").map_err(d)?),
                row.try_get::<Option<String>, _>("last_reply").map_err(d)?,
            );
            match out.last_mut() {
                Some(l) if l.queue_id == queue_id => l.recipients.push(recipient),
                _ => out.push(QueueListing {
                    queue_id,
                    sender: row.try_get("sender").map_err(d)?,
                    size: u64_of(row.try_get("size").map_err(d)?, "queued size")?,
                    created_at: time_of(row.try_get("created_at").map_err(d)?),
                    recipients: vec![recipient],
                }),
            }
        }
        Ok(out)
    }
}
