//! Group commit of `enc_keys` (peer protocol § 5).
//!
//! Every `enc_keys` costs three synced transactions (reserve here, accept at the peer, mark
//! delivered here) and one peer round trip, and SQLite has a single writer: answered one by one,
//! hundreds of concurrent requests queue behind each other until the peer's assignment POSTs
//! exceed the peer request timeout. So the requests of one SAE pair (master → slaves) on one
//! link that arrive while a batch of that pair is in flight wait, and then go together: one
//! reservation transaction ([`KeyPool::reserve_key_batch`]), one assignment POST carrying all
//! their keys, one transaction marking them delivered; then each request is answered with its
//! own keys. The cost per request falls with the batch size instead of the queue growing.
//!
//! The invariant stays: no SAE gets a key its peer has not durably accepted. A batch is
//! accepted by the peer as a whole or not at all; if it is not (refusal, timeout, unreachable
//! peer), every key of the batch is discarded at both ends and every request in it gets 503.
//! A request the pool cannot cover on its own (`Exhausted`) fails alone: the pool serves the
//! requests of a batch in arrival order, each all or nothing.
//!
//! [`KeyPool::reserve_key_batch`]: kmd_keypool::KeyPool::reserve_key_batch

use std::collections::HashMap;
use std::sync::Arc;

use etsi014::server::ApiError;
use kmd_keypool::{KeyGrant, PoolError, ReserveRequest, SaeId};
use tokio::sync::oneshot;

use crate::etsi::{EXHAUSTED, PEER_UNREACHABLE, internal};
use crate::{Endpoint, Inner, Link, PendingDiscard};

/// One SAE pair: the requests that may share a batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Pair {
    master: SaeId,
    slaves: Vec<SaeId>,
}

/// One waiting `enc_keys`.
struct Waiting {
    count: u32,
    size_bits: u32,
    reply: oneshot::Sender<Result<Vec<KeyGrant>, ApiError>>,
}

#[derive(Default)]
struct PairQueue {
    waiting: std::collections::VecDeque<Waiting>,
    /// A task is draining this queue (a batch is in flight).
    draining: bool,
}

/// The `enc_keys` queues of one link, one per SAE pair.
#[derive(Default)]
pub(crate) struct EncBatcher {
    queues: std::sync::Mutex<HashMap<Pair, PairQueue>>,
}

impl Inner {
    /// Reserves `count` keys of `size_bits` for `master` → `slaves` on `link`, has the peer
    /// accept them and marks them delivered, batched with the concurrent requests of the same
    /// pair; answers this request's keys, or the error for the SAE.
    pub(crate) async fn enc_keys_batched(
        self: &Arc<Self>,
        link: &Link,
        master: SaeId,
        slaves: Vec<SaeId>,
        count: u32,
        size_bits: u32,
    ) -> Result<Vec<KeyGrant>, ApiError> {
        let pair = Pair { master, slaves };
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queues = link.batcher.queues.lock().map_err(|_| internal(&"enc_keys queue poisoned"))?;
            let queue = queues.entry(pair.clone()).or_default();
            queue.waiting.push_back(Waiting { count, size_bits, reply });
            !std::mem::replace(&mut queue.draining, true)
        };
        if start {
            tokio::spawn(drain(self.clone(), link.id.clone(), pair));
        }
        answer.await.map_err(|_| internal(&"the enc_keys batch ended without an answer"))?
    }
}

/// Clears the queue's `draining` flag when the draining task ends, however it ends; requests
/// still waiting then (only if the task panicked) are dropped, so their callers get 500 rather
/// than waiting forever.
struct DrainGuard {
    inner: Arc<Inner>,
    link_id: String,
    pair: Pair,
    /// The queue was found empty and removed: it may already belong to a new drainer.
    finished: bool,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if !self.finished
            && let Some(link) = self.inner.link(&self.link_id)
            && let Ok(mut queues) = link.batcher.queues.lock()
        {
            queues.remove(&self.pair);
        }
    }
}

/// Runs batches of `pair` on the link until its queue is empty.
async fn drain(inner: Arc<Inner>, link_id: String, pair: Pair) {
    let mut guard =
        DrainGuard { inner: inner.clone(), link_id: link_id.clone(), pair: pair.clone(), finished: false };
    let Some(link) = inner.link(&link_id) else { return };
    // A batch carries at most one request's worth of keys (beyond its first request): the
    // pool's per-call limit and the peer's body limit hold for a batch as for one request.
    let max_keys = u64::from(inner.max_keys_per_request);
    loop {
        let batch: Vec<Waiting> = {
            let Ok(mut queues) = link.batcher.queues.lock() else { return };
            let Some(queue) = queues.get_mut(&pair) else { return };
            let mut batch = Vec::new();
            let mut keys = 0u64;
            while let Some(next) = queue.waiting.front() {
                if !batch.is_empty() && keys + u64::from(next.count) > max_keys {
                    break;
                }
                keys += u64::from(next.count);
                batch.extend(queue.waiting.pop_front());
            }
            if batch.is_empty() {
                // Under the same lock as the check: a request queued after this finds no
                // drainer and starts one.
                queues.remove(&pair);
                guard.finished = true;
                return;
            }
            batch
        };
        run_batch(&inner, link, &pair, batch).await;
    }
}

/// The pool's refusal of one request, as the SAE sees it.
fn reserve_error(e: PoolError) -> ApiError {
    match e {
        PoolError::Exhausted { requested_bits, available_bits } => ApiError::service_unavailable(EXHAUSTED)
            .with_detail("requested_bits", requested_bits)
            .with_detail("available_bits", available_bits),
        PoolError::InvalidKeySize { .. } => ApiError::size_not_multiple_of_8(),
        PoolError::Invalid { .. } => ApiError::parameters_not_adhering(),
        e => internal(&e),
    }
}

/// One batch: reserve, have the peer accept, mark delivered, answer each request.
async fn run_batch(inner: &Inner, link: &Link, pair: &Pair, batch: Vec<Waiting>) {
    let requests = batch
        .iter()
        .map(|w| ReserveRequest {
            master: pair.master.clone(),
            slaves: pair.slaves.clone(),
            count: w.count,
            size_bits: w.size_bits,
        })
        .collect();
    let outcomes = match inner.pool.reserve_key_batch(&link.id, requests).await {
        Ok(outcomes) => outcomes,
        Err(e) => {
            tracing::error!(link = %link.id, requests = batch.len(), error = %e, "cannot reserve keys");
            for w in batch {
                let _ = w.reply.send(Err(internal(&e)));
            }
            return;
        }
    };
    let mut served: Vec<(Waiting, Vec<KeyGrant>)> = Vec::with_capacity(batch.len());
    for (w, outcome) in batch.into_iter().zip(outcomes) {
        match outcome {
            Ok(grants) => served.push((w, grants)),
            Err(e) => {
                let _ = w.reply.send(Err(reserve_error(e)));
            }
        }
    }
    if served.is_empty() {
        return;
    }
    let grants: Vec<&KeyGrant> = served.iter().flat_map(|(_, g)| g).collect();
    let key_ids: Vec<String> = grants.iter().map(|g| g.key_id().to_owned()).collect();
    let failure = match inner.push_assignment(link, &grants).await {
        Err(e) => {
            tracing::warn!(link = %link.id, requests = served.len(), keys = key_ids.len(), error = %e,
                "peer kmd did not accept an assignment; discarding the keys at both ends");
            Some((
                ApiError::service_unavailable(PEER_UNREACHABLE),
                "assignment not accepted before the master's request ended",
            ))
        }
        Ok(_) => match inner.pool.mark_delivered_for_encryption(&pair.master, key_ids.clone()).await {
            // The peer holds the keys but the SAEs will not get them: withdraw them at both ends.
            Err(e) => Some((internal(&e), "master could not record the delivery")),
            Ok(()) => None,
        },
    };
    if let Some((error, reason)) = failure {
        // Wipe the bytes before anything else: no SAE of this batch will get them.
        let replies: Vec<_> = served.into_iter().map(|(w, _)| w.reply).collect();
        if let Err(e) = inner.pool.discard_keys(&link.id, key_ids.clone()).await {
            tracing::error!(link = %link.id, error = %e, "cannot discard abandoned keys locally");
        }
        link.queue_discard(PendingDiscard { key_ids, block_ids: Vec::new(), reason: reason.into() });
        for reply in replies {
            let _ = reply.send(Err(error.clone()));
        }
        return;
    }
    inner.observer.keys_served(&link.id, Endpoint::EncKeys, key_ids.len());
    for (w, grants) in served {
        // A caller that hung up lost its keys: they are delivered (erased here) and expire
        // unfetched at the peer; the grants are wiped as they drop.
        let _ = w.reply.send(Ok(grants));
    }
}
