//! Background tasks of the peer channel (§§ 4, 6, 8): block confirmation, discard retries,
//! status polling, and the start-up discard of keys reserved but never delivered.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kmd_keypool::Verdict;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::peer::{BlockCheckReply, BlockCheckRequest, DiscardReply, DiscardRequest, PeerStatus};
use crate::{Inner, Kme, KmeError, Link, PendingDiscard};

const CHECK_BATCH: u32 = 1000;

pub(crate) async fn exchange_block_checks(inner: &Inner, link: &Link) -> Result<u64, KmeError> {
    link.inserted_since_check.store(0, Ordering::SeqCst);
    let path = format!("/peer/v1/links/{}/block-checks", link.id);
    let mut confirmed = 0;
    loop {
        let checks = inner.pool.unconfirmed_blocks(&link.id, CHECK_BATCH).await?;
        if checks.is_empty() {
            return Ok(confirmed);
        }
        let sent = checks.len();
        let expected: Vec<String> = checks.iter().map(|c| c.block_id.clone()).collect();
        let reply: BlockCheckReply = link.client.post(&path, &BlockCheckRequest { checks }).await?;
        // Only verdicts about blocks we asked about count.
        let verdicts: Vec<(String, Verdict)> = reply
            .verdicts
            .into_iter()
            .filter(|v| expected.contains(&v.block_id))
            .map(|v| (v.block_id, v.verdict))
            .collect();
        let outcome = inner.pool.apply_peer_verdicts(&link.id, verdicts).await?;
        confirmed += outcome.confirmed;
        if outcome.discarded > 0 {
            tracing::warn!(link = %link.id, blocks = outcome.discarded, "blocks discarded: KCV differs at the peer");
        }
        // A full batch that changed nothing here would come back unchanged: stop there.
        if sent < CHECK_BATCH as usize || outcome.confirmed + outcome.discarded == 0 {
            return Ok(confirmed);
        }
    }
}

/// Sends queued discards until the queue is empty or one fails (it is put back first in line).
pub(crate) async fn flush_discards(link: &Link) -> Result<(), KmeError> {
    let path = format!("/peer/v1/links/{}/discards", link.id);
    loop {
        // Peek, not pop: the discard stays counted as pending until the peer has applied it, so
        // `pending_discards() == 0` means the peer really dropped the keys.
        let next = link.discards.lock().ok().and_then(|q| q.front().cloned());
        let Some(d) = next else { return Ok(()) };
        let body = DiscardRequest {
            key_ids: d.key_ids.clone(),
            block_ids: d.block_ids.clone(),
            reason: d.reason.clone(),
        };
        let reply = link.client.post::<_, DiscardReply>(&path, &body).await?;
        tracing::debug!(link = %link.id, keys = reply.discarded_keys, blocks = reply.discarded_blocks,
            "peer applied a discard");
        if let Ok(mut q) = link.discards.lock() {
            // Only this task (or an explicit flush) sends discards; the front is still `d`
            // unless a concurrent flush already removed it.
            if q.front().is_some_and(|f| f.key_ids == d.key_ids && f.block_ids == d.block_ids) {
                q.pop_front();
            }
        }
    }
}

/// Keys this side reserved before a restart and never marked delivered: the SAE never got them,
/// so both ends drop them (§ 6).
pub(crate) async fn discard_pending_local(inner: &Inner, link: &Link) -> Result<u64, KmeError> {
    let mut total = 0;
    loop {
        let pending = inner.pool.pending_local_keys(&link.id, 1000).await?;
        if pending.is_empty() {
            return Ok(total);
        }
        let ids: Vec<String> = pending.into_iter().map(|k| k.key_id).collect();
        let changed = inner.pool.discard_keys(&link.id, ids.clone()).await?;
        total += ids.len() as u64;
        link.queue_discard(PendingDiscard {
            key_ids: ids,
            block_ids: Vec::new(),
            reason: "master restarted before answering".into(),
        });
        if changed == 0 {
            // Nothing changed (should not happen): avoid spinning on the same keys.
            return Ok(total);
        }
    }
}

async fn poll_status(inner: &Inner, link: &Link) {
    let ok = match link.client.get::<PeerStatus>("/peer/v1/status").await {
        Ok(status)
            if status.kme_id == link.peer_kme_id && status.links.iter().any(|l| l.link_id == link.id) =>
        {
            true
        }
        Ok(status) => {
            tracing::warn!(link = %link.id, answered = %status.kme_id, "peer status does not list this link");
            false
        }
        Err(e) => {
            tracing::debug!(link = %link.id, error = %e, "peer status poll failed");
            false
        }
    };
    if ok {
        link.failures.store(0, Ordering::SeqCst);
        link.set_up(true, inner.observer.as_ref());
    } else {
        let failures = link.failures.fetch_add(1, Ordering::SeqCst).saturating_add(1);
        if failures >= inner.sync.down_after_failures {
            link.set_up(false, inner.observer.as_ref());
        }
    }
}

async fn link_tasks(inner: Arc<Inner>, index: usize, mut stop: watch::Receiver<bool>) {
    let Some(link) = inner.links.get(index) else { return };
    let sync = inner.sync.clone();
    let checks = async {
        loop {
            tokio::select! {
                () = tokio::time::sleep(sync.block_check_interval) => {}
                () = link.check_wakeup.notified() => {}
            }
            if let Err(e) = exchange_block_checks(&inner, link).await {
                tracing::debug!(link = %link.id, error = %e, "block-check exchange failed");
            }
            match inner.pool.discard_stale(&link.id, link.retention.unconfirmed_grace).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(link = %link.id, blocks = n, "discarded blocks the peer never confirmed")
                }
                Err(e) => tracing::error!(link = %link.id, error = %e, "cannot discard stale blocks"),
            }
        }
    };
    let discards = async {
        let mut delay = sync.discard_retry_min;
        loop {
            match flush_discards(link).await {
                Ok(()) => {
                    delay = sync.discard_retry_min;
                    link.discard_wakeup.notified().await;
                }
                Err(e) => {
                    tracing::debug!(link = %link.id, error = %e, retry_in = ?delay, "discard not delivered");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(sync.discard_retry_max);
                }
            }
        }
    };
    let status = async {
        loop {
            poll_status(&inner, link).await;
            tokio::time::sleep(sync.status_interval).await;
        }
    };
    let prune = async {
        loop {
            tokio::time::sleep(sync.prune_interval).await;
            if let Err(e) = inner.pool.expire_unfetched(&link.id, link.retention.assigned_key_ttl).await {
                tracing::error!(link = %link.id, error = %e, "cannot expire unfetched keys");
            }
            match inner.pool.prune_history(&link.id, link.retention.history_retention).await {
                Ok((0, 0)) => {}
                Ok((keys, blocks)) => tracing::info!(link = %link.id, keys, blocks, "pruned spent history"),
                Err(e) => tracing::error!(link = %link.id, error = %e, "cannot prune history"),
            }
        }
    };
    tokio::select! {
        () = checks => {}
        () = prune => {}
        () = discards => {}
        () = status => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

impl Kme {
    /// Starts the peer-channel background tasks of every link and returns at once; they stop
    /// when `shutdown` completes (await the handle to know they have).
    ///
    /// The discards of keys reserved but never marked delivered before a restart were queued by
    /// [`Kme::new`]; they go out with the other queued discards. Per link:
    /// a block-check exchange every `block_check_interval` (sooner once `block_check_trigger`
    /// blocks arrived) followed by `discard_stale`; queued discards retried with back-off; the
    /// peer's status polled every `status_interval`, `down_after_failures` failures in a row
    /// marking it down (`enc_keys` then answers 503 without trying) and one success up; spent
    /// every `prune_interval`, the peer's keys left unfetched longer than the link's
    /// `assigned_key_ttl` erased and spent history older than its `history_retention` pruned.
    pub fn spawn_sync(&self, shutdown: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let (stop_tx, stop_rx) = watch::channel(false);
            let mut tasks = Vec::new();
            for index in 0..inner.links.len() {
                tasks.push(tokio::spawn(link_tasks(inner.clone(), index, stop_rx.clone())));
            }
            shutdown.await;
            let _ = stop_tx.send(true);
            for t in tasks {
                let _ = t.await;
            }
            // A last attempt to deliver queued discards, bounded by the request timeout.
            for link in &inner.links {
                let _ = tokio::time::timeout(Duration::from_secs(5), flush_discards(link)).await;
            }
        })
    }
}
