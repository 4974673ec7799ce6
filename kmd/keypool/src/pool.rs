//! The key pool: every operation is one SQLite transaction.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qutemail_hsm::{HsmKeyWrapper, WrappedKey};
use sqlx::sqlite::{Sqlite, SqlitePool};
use sqlx::{Row, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};
use zeroize::Zeroizing;

use crate::db::{self, DbResult};
use crate::error::{PoolError, Refusal};
use crate::types::*;

/// Settings of a [`KeyPool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// The SQLite database file (created, mode 0600, if missing). Its `-wal` and `-shm`
    /// companions live beside it.
    pub path: PathBuf,
    /// Most keys one [`KeyPool::reserve_keys`] call may cut (default 1024).
    pub max_keys_per_call: u32,
    /// After this many erasures (spent blocks and keys) the WAL is checkpointed and truncated
    /// (default 256). [`KeyPool::checkpoint`] does it on demand, e.g. from a timer.
    pub checkpoint_after_erasures: u64,
    /// How long a transaction waits for another process's write lock (default 10 s).
    pub busy_timeout: Duration,
    /// SQLite connections (one writes at a time, the others serve counts; default 4).
    pub connections: u32,
}

impl PoolConfig {
    /// Defaults for the database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        PoolConfig {
            path: path.into(),
            max_keys_per_call: 1024,
            checkpoint_after_erasures: 256,
            busy_timeout: Duration::from_secs(10),
            connections: 4,
        }
    }
}

/// kmd's durable, HSM-wrapped key pool. Cheap to clone (clones share the database and HSM).
///
/// See the [crate documentation](crate) for the lifecycle. Every method that changes state runs
/// as one `BEGIN IMMEDIATE` transaction in a task of its own, so dropping the returned future
/// never leaves an operation half done: it either commits completely or not at all.
#[derive(Clone)]
pub struct KeyPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPool").field("path", &self.inner.cfg.path).field("hsm", &self.inner.hsm).finish()
    }
}

struct Inner {
    db: SqlitePool,
    hsm: HsmKeyWrapper,
    cfg: PoolConfig,
    /// One writer at a time in this process (SQLite allows one anyway; queuing here instead of
    /// on SQLite's busy handler is fair and cheap). Holds erasures not yet checkpointed.
    writer: Arc<Mutex<WriterState>>,
}

#[derive(Default)]
struct WriterState {
    erased_since_checkpoint: u64,
}

type Tx = Transaction<'static, Sqlite>;

/// A write transaction holding the in-process writer lock. [`WriteTx::commit`] commits it;
/// dropped without commit (an error path) it rolls back *before* the writer lock is released,
/// so the next writer never waits on a rollback still in flight.
struct WriteTx<'a> {
    inner: &'a Inner,
    guard: Option<OwnedMutexGuard<WriterState>>,
    tx: Option<Tx>,
}

impl Deref for WriteTx<'_> {
    type Target = Tx;
    fn deref(&self) -> &Tx {
        match &self.tx {
            Some(tx) => tx,
            None => unreachable!("write transaction used after it ended"),
        }
    }
}

impl DerefMut for WriteTx<'_> {
    fn deref_mut(&mut self) -> &mut Tx {
        match &mut self.tx {
            Some(tx) => tx,
            None => unreachable!("write transaction used after it ended"),
        }
    }
}

impl Drop for WriteTx<'_> {
    fn drop(&mut self) {
        let (Some(tx), Some(guard)) = (self.tx.take(), self.guard.take()) else { return };
        let path = self.inner.cfg.path.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = tx.rollback().await {
                        tracing::warn!(db = %path.display(), error = %e, "rollback failed");
                    }
                    drop(guard);
                });
            }
            // No runtime (shutting down): sqlx rolls back when the connection is next used.
            Err(_) => drop((tx, guard)),
        }
    }
}

impl WriteTx<'_> {
    /// Commits (durable when this returns: WAL, `synchronous=FULL`), then counts `erased`
    /// materials and checkpoints the WAL when enough have accumulated.
    async fn commit(mut self, erased: u64) -> Result<(), PoolError> {
        let (Some(tx), Some(mut guard)) = (self.tx.take(), self.guard.take()) else {
            return Err(PoolError::Internal("write transaction committed twice".into()));
        };
        let inner = self.inner;
        tx.commit().await.db(inner.path())?;
        if erased > 0 {
            guard.erased_since_checkpoint += erased;
            if guard.erased_since_checkpoint >= inner.cfg.checkpoint_after_erasures {
                // The commit stands whatever the checkpoint does.
                if let Err(e) = inner.checkpoint_locked(&mut guard).await {
                    tracing::warn!(error = %e, "WAL checkpoint after erasures failed; retried later");
                }
            }
        }
        Ok(())
    }

    /// Rolls back, then releases the writer lock.
    async fn rollback(mut self) -> Result<(), PoolError> {
        let (Some(tx), Some(guard)) = (self.tx.take(), self.guard.take()) else { return Ok(()) };
        let result = tx.rollback().await.db(self.inner.path());
        drop(guard);
        result
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn int(v: u64, what: &str) -> Result<i64, PoolError> {
    i64::try_from(v)
        .map_err(|_| PoolError::Invalid { what: "number", reason: format!("{what} {v} is too large") })
}

fn u32_of(v: i64, what: &str) -> Result<u32, PoolError> {
    u32::try_from(v).map_err(|_| PoolError::Corrupt(format!("{what} {v} out of range")))
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn new_key_id() -> Result<String, PoolError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| PoolError::Internal(format!("the operating system's random generator failed: {e}")))?;
    Ok(uuid::Builder::from_random_bytes(bytes).into_uuid().hyphenated().to_string())
}

fn check_slaves(slaves: &[SaeId]) -> Result<(), PoolError> {
    if slaves.is_empty() {
        return Err(PoolError::Invalid {
            what: "slave SAEs",
            reason: "a key needs at least one slave SAE".into(),
        });
    }
    let mut seen = HashSet::new();
    for s in slaves {
        if !seen.insert(s.as_str()) {
            return Err(PoolError::Invalid { what: "slave SAEs", reason: format!("{s} is listed twice") });
        }
    }
    Ok(())
}

/// A block row loaded for cutting.
struct LiveBlock {
    row: i64,
    block_id: String,
    len: usize,
    consumed: usize,
    material: Vec<u8>,
}

impl KeyPool {
    /// Opens (creating and migrating as needed) the pool at `config.path`, wrapping with `hsm`.
    pub async fn open(config: PoolConfig, hsm: HsmKeyWrapper) -> Result<KeyPool, PoolError> {
        let db = db::connect(&config.path, config.busy_timeout, config.connections).await?;
        db::migrate(&db, &config.path).await?;
        tracing::info!(db = %config.path.display(), "key pool open");
        Ok(KeyPool {
            inner: Arc::new(Inner {
                db,
                hsm,
                cfg: config,
                writer: Arc::new(Mutex::new(WriterState::default())),
            }),
        })
    }

    /// Checkpoints, truncates the WAL and closes all connections.
    pub async fn close(self) -> Result<(), PoolError> {
        let result = self.checkpoint().await;
        self.inner.db.close().await;
        result.map(|_| ())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.cfg.path
    }

    async fn run<T, F, Fut>(&self, op: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = Result<T, PoolError>> + Send + 'static,
    {
        let task = tokio::spawn(op(self.inner.clone()));
        task.await.map_err(|e| PoolError::Internal(format!("key pool task failed: {e}")))?
    }

    /// Registers `link_id` with this kmd's side on it (idempotent). Refuses to change the side
    /// of a registered link: the ownership split would no longer be disjoint.
    pub async fn register_link(&self, link_id: &str, side: Side) -> Result<(), PoolError> {
        check_id("link ID", link_id)?;
        let link_id = link_id.to_owned();
        self.run(move |inner| async move { inner.register_link(link_id, side).await }).await
    }

    /// Stores one block from the device, HSM-wrapped and unconfirmed (idempotent on
    /// `(link_id, block_id)`).
    pub async fn insert_block(
        &self,
        link_id: &str,
        block_id: String,
        kcv: [u8; 16],
        key: Zeroizing<Vec<u8>>,
        meta: BlockMeta,
    ) -> Result<InsertOutcome, PoolError> {
        let mut out = self.insert_blocks(link_id, vec![NewBlock { block_id, kcv, key, meta }]).await?;
        out.pop().ok_or_else(|| PoolError::Internal("no outcome for an inserted block".into()))
    }

    /// Stores several blocks in one transaction (one disk sync); see [`Self::insert_block`].
    /// All or nothing: one malformed or conflicting block refuses the batch.
    pub async fn insert_blocks(
        &self,
        link_id: &str,
        blocks: Vec<NewBlock>,
    ) -> Result<Vec<InsertOutcome>, PoolError> {
        check_id("link ID", link_id)?;
        for b in &blocks {
            check_id("block ID", &b.block_id)?;
            if b.key.is_empty() || b.key.len() > MAX_MATERIAL_BYTES {
                return Err(PoolError::Invalid {
                    what: "key block",
                    reason: format!(
                        "block {} has {} bytes; blocks of 1 to {MAX_MATERIAL_BYTES} bytes are accepted",
                        b.block_id,
                        b.key.len()
                    ),
                });
            }
        }
        let link_id = link_id.to_owned();
        self.run(move |inner| async move { inner.insert_blocks(link_id, blocks).await }).await
    }

    /// Blocks awaiting confirmation by the peer (oldest first, at most `limit`), to send to the
    /// peer kmd for [`Self::check_peer_blocks`].
    pub async fn unconfirmed_blocks(&self, link_id: &str, limit: u32) -> Result<Vec<BlockCheck>, PoolError> {
        let inner = &self.inner;
        let path = &inner.cfg.path;
        let rows = sqlx::query(
            "SELECT block_id, kcv FROM blocks WHERE link_id = ?1 AND state = 'unconfirmed' ORDER BY id LIMIT ?2",
        )
        .bind(link_id)
        .bind(i64::from(limit))
        .fetch_all(&inner.db)
        .await
        .db(path)?;
        rows.iter()
            .map(|r| {
                let kcv: Vec<u8> = r.try_get(1).db(path)?;
                let kcv: [u8; 16] =
                    kcv.try_into().map_err(|_| PoolError::Corrupt("a stored KCV is not 16 bytes".into()))?;
                Ok(BlockCheck { block_id: r.try_get(0).db(path)?, kcv })
            })
            .collect()
    }

    /// Answers the peer's [`BlockCheck`]s from the local copies, and applies the same verdict
    /// here: a match confirms the local block (both sites now know they hold the same bytes),
    /// a mismatch discards it. Blocks not held here are [`Verdict::Unknown`]; blocks discarded
    /// here are [`Verdict::Mismatch`] so the peer drops them too.
    pub async fn check_peer_blocks(
        &self,
        link_id: &str,
        checks: Vec<BlockCheck>,
    ) -> Result<Vec<(String, Verdict)>, PoolError> {
        let link_id = link_id.to_owned();
        self.run(move |inner| async move { inner.check_peer_blocks(link_id, checks).await }).await
    }

    /// Applies the peer's verdicts on our unconfirmed blocks: `Match` → confirmed, `Mismatch` →
    /// discarded (material erased), `Unknown` → left unconfirmed (see [`Self::discard_stale`]).
    /// Verdicts about blocks that are not unconfirmed here change nothing.
    pub async fn apply_peer_verdicts(
        &self,
        link_id: &str,
        verdicts: Vec<(String, Verdict)>,
    ) -> Result<VerdictOutcome, PoolError> {
        let link_id = link_id.to_owned();
        self.run(move |inner| async move { inner.apply_peer_verdicts(link_id, verdicts).await }).await
    }

    /// Discards blocks that have stayed unconfirmed for longer than `grace` since they arrived
    /// here (the peer never confirmed them). Returns how many.
    pub async fn discard_stale(&self, link_id: &str, grace: Duration) -> Result<u64, PoolError> {
        let link_id = link_id.to_owned();
        let cutoff = now_ms().saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
        self.run(move |inner| async move { inner.discard_stale(link_id, cutoff).await }).await
    }

    /// Discards blocks (unconfirmed or confirmed) by ID, erasing their remaining material —
    /// e.g. when the peer refused an assignment because it does not hold a block. Bytes already
    /// cut into keys stay with those keys. Returns how many blocks changed.
    pub async fn discard_blocks(
        &self,
        link_id: &str,
        block_ids: Vec<String>,
        reason: &str,
    ) -> Result<u64, PoolError> {
        let link_id = link_id.to_owned();
        let reason = reason.to_owned();
        self.run(move |inner| async move { inner.discard_blocks(link_id, block_ids, reason).await }).await
    }

    /// Cuts `count` keys of `size_bits` each for `master` → `slaves` from the oldest confirmed
    /// blocks this side owns, in one transaction: all or nothing.
    ///
    /// Each key gets a random UUIDv4 ID and is stored `assigned` with its segments, its SAEs and
    /// its bytes wrapped by the HSM; consumed bytes are zeroed in the blocks' stored material
    /// and a fully consumed block's material is erased. The returned [`KeyGrant`]s carry the
    /// assignment for the peer kmd ([`Self::accept_peer_assignment`]) and the key bytes.
    ///
    /// Errors: [`PoolError::InvalidKeySize`] unless `size_bits` is a positive multiple of 8 (at
    /// most [`MAX_KEY_BITS`]); [`PoolError::Exhausted`] when the owned confirmed material does
    /// not cover the whole request.
    pub async fn reserve_keys(
        &self,
        link_id: &str,
        master: &SaeId,
        slaves: &[SaeId],
        count: u32,
        size_bits: u32,
    ) -> Result<Vec<KeyGrant>, PoolError> {
        let request = ReserveRequest { master: master.clone(), slaves: slaves.to_vec(), count, size_bits };
        let mut out = self.reserve_key_batch(link_id, vec![request]).await?;
        out.pop().ok_or_else(|| PoolError::Internal("no outcome for a reservation".into()))?
    }

    /// [`Self::reserve_keys`] for several SAE requests at once, in one transaction (one disk
    /// sync): the group commit of concurrent `enc_keys`. The requests are served in order, each
    /// all or nothing; the answer has one entry per request: its keys, or why it got none
    /// ([`PoolError::InvalidKeySize`], [`PoolError::Invalid`], or [`PoolError::Exhausted`] when
    /// the material left after the requests before it cannot cover it). The outer error is a
    /// failure of the whole batch (database, HSM): then nothing was reserved.
    pub async fn reserve_key_batch(
        &self,
        link_id: &str,
        requests: Vec<ReserveRequest>,
    ) -> Result<Vec<Result<Vec<KeyGrant>, PoolError>>, PoolError> {
        let max = self.inner.cfg.max_keys_per_call;
        let checked: Vec<Result<ReserveRequest, PoolError>> = requests
            .into_iter()
            .map(|r| {
                if r.size_bits == 0 || !r.size_bits.is_multiple_of(8) || r.size_bits > MAX_KEY_BITS {
                    return Err(PoolError::InvalidKeySize { size_bits: r.size_bits, max_bits: MAX_KEY_BITS });
                }
                if r.count == 0 || r.count > max {
                    return Err(PoolError::Invalid {
                        what: "key count",
                        reason: format!("{} keys asked; 1 to {max} per request", r.count),
                    });
                }
                check_slaves(&r.slaves)?;
                Ok(r)
            })
            .collect();
        if checked.iter().all(Result::is_err) {
            return Ok(checked.into_iter().map(|r| r.map(|_| Vec::new())).collect());
        }
        let link_id = link_id.to_owned();
        self.run(move |inner| async move { inner.reserve(link_id, checked).await }).await
    }

    /// Stores keys that the peer kmd cut from blocks it owns: cuts the same bytes from the local
    /// copies, marks them consumed, stores the keys `assigned` (wrapped) for
    /// [`Self::take_for_decryption`]. One transaction, all or nothing.
    ///
    /// Idempotent on `key_id`: a key already stored with the identical assignment (same link,
    /// master, slave set and segments) is skipped, so a retried sync neither fails nor
    /// duplicates. Refused, naming the key and block ([`PoolError::AssignmentRefused`]), when a
    /// segment lies in a block that is not held, not confirmed, spent, or owned by this side,
    /// lies outside the block, or overlaps bytes of another key.
    pub async fn accept_peer_assignment(
        &self,
        link_id: &str,
        keys: Vec<PeerKey>,
    ) -> Result<AcceptOutcome, PoolError> {
        for k in &keys {
            check_key_id(&k.key_id)?;
            check_slaves(&k.slaves)?;
            if k.segments.is_empty() || k.segments.iter().any(|s| s.len == 0) {
                return Err(PoolError::Invalid {
                    what: "peer key",
                    reason: format!("key {} has no bytes or an empty segment", k.key_id),
                });
            }
            let bytes = k.size_bits() / 8;
            if bytes > MAX_MATERIAL_BYTES as u64 {
                return Err(PoolError::Invalid {
                    what: "peer key",
                    reason: format!("key {} has {bytes} bytes; at most {MAX_MATERIAL_BYTES}", k.key_id),
                });
            }
        }
        let link_id = link_id.to_owned();
        self.run(move |inner| async move { inner.accept_peer(link_id, keys).await }).await
    }

    /// Records that keys this site cut were handed to their master SAE (after the peer kmd
    /// acknowledged them): `assigned` → `delivered`, material erased. All or nothing: every key
    /// must be a local key of `master` still `assigned`.
    pub async fn mark_delivered_for_encryption(
        &self,
        master: &SaeId,
        key_ids: Vec<String>,
    ) -> Result<(), PoolError> {
        let master = master.clone();
        self.run(move |inner| async move { inner.mark_delivered(master, key_ids).await }).await
    }

    /// Hands keys to slave SAE `caller` for decryption (`dec_keys`): atomically, every key must
    /// exist here as a key assigned by the peer for `master` → `caller` (among its slaves) and
    /// not yet delivered to `caller`. Each is then marked delivered for `caller`, and its
    /// material erased once every slave got it. Delivery is committed before the bytes are
    /// returned, so a crash can lose a delivery but never repeat one.
    ///
    /// Errors: [`PoolError::NotAuthorised`] if `caller` is not a slave of some key or `master`
    /// did not assign it (checked first); [`PoolError::NotFound`] listing the keys that do not
    /// exist here or were already delivered to `caller`.
    pub async fn take_for_decryption(
        &self,
        caller: &SaeId,
        master: &SaeId,
        key_ids: Vec<String>,
    ) -> Result<Vec<DeliveredKey>, PoolError> {
        if key_ids.is_empty() {
            return Err(PoolError::Invalid { what: "key IDs", reason: "no key IDs given".into() });
        }
        let mut seen = HashSet::new();
        for k in &key_ids {
            if !seen.insert(k.as_str()) {
                return Err(PoolError::Invalid {
                    what: "key IDs",
                    reason: format!("key {k} is listed twice"),
                });
            }
        }
        let (caller, master) = (caller.clone(), master.clone());
        self.run(move |inner| async move { inner.take(caller, master, key_ids).await }).await
    }

    /// Withdraws `assigned` keys without delivering them (e.g. the peer refused the assignment,
    /// or the SAE's request failed before it got them): `discarded`, material erased. Their
    /// bytes are never cut again. Keys in other states are left alone. Returns how many changed.
    pub async fn discard_keys(&self, link_id: &str, key_ids: Vec<String>) -> Result<u64, PoolError> {
        let link_id = link_id.to_owned();
        self.run(move |inner| async move { inner.discard_keys(link_id, key_ids).await }).await
    }

    /// Deletes history older than `older_than` on the link, in batches of at most 1000 rows per
    /// transaction: delivered or discarded keys whose blocks are all spent (so a retried peer
    /// assignment of a pruned key is still refused, never re-cut), then spent blocks that no
    /// remaining key refers to. Returns `(keys, blocks)` deleted.
    ///
    /// A pruned block's ID is forgotten: if the device delivered the same block ID again it
    /// would be stored as new. Keep `older_than` far beyond any device's redelivery window
    /// (days, not minutes).
    pub async fn prune_history(&self, link_id: &str, older_than: Duration) -> Result<(u64, u64), PoolError> {
        let link_id = link_id.to_owned();
        let cutoff = now_ms().saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
        self.run(move |inner| async move { inner.prune(link_id, cutoff).await }).await
    }

    /// Discards the keys the peer assigned on `link_id` (origin `peer`, waiting for a local
    /// slave SAE's `dec_keys`) that were accepted more than `ttl` ago and never fetched: their
    /// material is erased, so an abandoned key does not stay decryptable forever. Returns how many.
    pub async fn expire_unfetched(&self, link_id: &str, ttl: Duration) -> Result<u64, PoolError> {
        let cutoff = now_ms().saturating_sub(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        let mut total = 0;
        loop {
            let ids: Vec<String> = {
                let mut conn = self.inner.db.acquire().await.db(&self.inner.cfg.path)?;
                sqlx::query_scalar(
                    "SELECT key_id FROM keys WHERE link_id = ?1 AND origin = 'peer' AND state = 'assigned' \
                     AND assigned_unix_ms < ?2 ORDER BY id LIMIT 1000",
                )
                .bind(link_id)
                .bind(cutoff)
                .fetch_all(&mut *conn)
                .await
                .db(&self.inner.cfg.path)?
            };
            if ids.is_empty() {
                break;
            }
            let batch = ids.len();
            let done = self.discard_keys(link_id, ids).await?;
            total += done;
            if batch < 1000 || done == 0 {
                break;
            }
        }
        if total > 0 {
            tracing::warn!(link = %link_id, keys = total, ttl_s = ttl.as_secs(), "assigned keys expired unfetched");
        }
        Ok(total)
    }

    /// Keys this site cut that are still `assigned` (not yet marked delivered), oldest first:
    /// after a restart the peer-sync re-sends or discards them.
    pub async fn pending_local_keys(&self, link_id: &str, limit: u32) -> Result<Vec<PeerKey>, PoolError> {
        let inner = &self.inner;
        let path = &inner.cfg.path;
        let mut conn = inner.db.acquire().await.db(path)?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT key_id FROM keys WHERE link_id = ?1 AND origin = 'local' AND state = 'assigned' ORDER BY id LIMIT ?2",
        )
        .bind(link_id)
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await
        .db(path)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(info) = load_key(&mut conn, path, &id).await? {
                out.push(info.assignment);
            }
        }
        Ok(out)
    }

    /// Everything stored about one key except its material.
    pub async fn key_info(&self, key_id: &str) -> Result<Option<KeyInfo>, PoolError> {
        let path = &self.inner.cfg.path;
        let mut conn = self.inner.db.acquire().await.db(path)?;
        load_key(&mut conn, path, key_id).await
    }

    /// Counts of one link (one consistent snapshot; O(1) in the pool size).
    pub async fn counts(&self, link_id: &str) -> Result<LinkCounts, PoolError> {
        let inner = &self.inner;
        let path = &inner.cfg.path;
        let mut tx = inner.db.begin().await.db(path)?;
        let side = link_side(&mut tx, path, link_id).await?;
        let mut counts = LinkCounts {
            link_id: link_id.to_owned(),
            side,
            blocks: Vec::new(),
            available_bits_owned: 0,
            available_bits_confirmed: 0,
            keys: Vec::new(),
            pairs: Vec::new(),
        };
        let rows = sqlx::query(
            "SELECT owner, state, blocks, remaining_bytes FROM block_counts WHERE link_id = ?1 AND blocks > 0 ORDER BY owner, state",
        )
        .bind(link_id)
        .fetch_all(&mut *tx)
        .await
        .db(path)?;
        for r in rows {
            let owner = Side::parse(&r.try_get::<String, _>(0).db(path)?)?;
            let state = BlockState::parse(&r.try_get::<String, _>(1).db(path)?)?;
            let remaining_bits = u64_of(r.try_get(3).db(path)?) * 8;
            if state == BlockState::Confirmed {
                counts.available_bits_confirmed += remaining_bits;
                if owner == side {
                    counts.available_bits_owned += remaining_bits;
                }
            }
            counts.blocks.push(BlockCount {
                owner,
                owned_here: owner == side,
                state,
                blocks: u64_of(r.try_get(2).db(path)?),
                remaining_bits,
            });
        }
        let rows = sqlx::query(
            "SELECT origin, state, keys, bits FROM key_counts WHERE link_id = ?1 AND keys > 0 ORDER BY origin, state",
        )
        .bind(link_id)
        .fetch_all(&mut *tx)
        .await
        .db(path)?;
        for r in rows {
            counts.keys.push(KeyCount {
                origin: KeyOrigin::parse(&r.try_get::<String, _>(0).db(path)?)?,
                state: KeyState::parse(&r.try_get::<String, _>(1).db(path)?)?,
                keys: u64_of(r.try_get(2).db(path)?),
                bits: u64_of(r.try_get(3).db(path)?),
            });
        }
        let rows = sqlx::query(
            "SELECT origin, master_sae, slave_sae, state, keys FROM pair_counts WHERE link_id = ?1 AND keys > 0 \
             ORDER BY origin, master_sae, slave_sae, state",
        )
        .bind(link_id)
        .fetch_all(&mut *tx)
        .await
        .db(path)?;
        for r in rows {
            counts.pairs.push(PairCount {
                origin: KeyOrigin::parse(&r.try_get::<String, _>(0).db(path)?)?,
                master: SaeId::new(r.try_get::<String, _>(1).db(path)?)?,
                slave: SaeId::new(r.try_get::<String, _>(2).db(path)?)?,
                state: KeyState::parse(&r.try_get::<String, _>(3).db(path)?)?,
                keys: u64_of(r.try_get(4).db(path)?),
            });
        }
        tx.rollback().await.db(path)?;
        Ok(counts)
    }

    /// How many keys of `size_bits` this side can still cut on the link (ETSI status
    /// `stored_key_count`): owned confirmed bits / size (keys may span blocks, so this is exact).
    pub async fn stored_key_count(&self, link_id: &str, size_bits: u32) -> Result<u64, PoolError> {
        if size_bits == 0 || !size_bits.is_multiple_of(8) || size_bits > MAX_KEY_BITS {
            return Err(PoolError::InvalidKeySize { size_bits, max_bits: MAX_KEY_BITS });
        }
        let inner = &self.inner;
        let path = &inner.cfg.path;
        let mut tx = inner.db.begin().await.db(path)?;
        let side = link_side(&mut tx, path, link_id).await?;
        let bytes = owned_available(&mut tx, path, link_id, side).await?;
        tx.rollback().await.db(path)?;
        Ok(bytes * 8 / u64::from(size_bits))
    }

    /// Runs `PRAGMA wal_checkpoint(TRUNCATE)`: copies the WAL into the database and truncates
    /// it, so that erased material no longer lingers in old WAL frames. Returns false if a
    /// reader kept it from completing (it is retried after the next erasures).
    pub async fn checkpoint(&self) -> Result<bool, PoolError> {
        self.run(move |inner| async move {
            let mut w = inner.writer.lock().await;
            inner.checkpoint_locked(&mut w).await
        })
        .await
    }

    /// Checks every invariant over the whole database (counters against the rows, segments
    /// disjoint and within their blocks, consumed bytes equal to the bytes cut, keys sized by
    /// their segments, ownership respected). Meant for tests and an operator's `check` command;
    /// it reads every row.
    pub async fn verify_integrity(&self) -> Result<IntegrityReport, PoolError> {
        let path = &self.inner.cfg.path;
        let mut tx = self.inner.db.begin().await.db(path)?;
        let report = crate::integrity::verify(&mut tx, path).await?;
        tx.rollback().await.db(path)?;
        Ok(report)
    }
}

/// Writes back the blocks a cut used: a block used up loses its material; a block partly used
/// takes its re-wrapped remainder (`rewrapped`, by index into `blocks`). Returns how many blocks
/// were erased.
async fn store_cut_blocks(
    tx: &mut Tx,
    path: &Path,
    blocks: &[LiveBlock],
    mut rewrapped: HashMap<usize, Vec<u8>>,
) -> Result<u64, PoolError> {
    let now = now_ms();
    let mut erased = 0u64;
    for (i, b) in blocks.iter().enumerate() {
        if b.consumed == b.len {
            sqlx::query(
                "UPDATE blocks SET state = 'consumed', consumed = len, material = NULL, changed_unix_ms = ?2 WHERE id = ?1",
            )
            .bind(b.row)
            .bind(now)
            .execute(&mut **tx)
            .await
            .db(path)?;
            erased += 1;
        } else {
            let blob = rewrapped
                .remove(&i)
                .ok_or_else(|| PoolError::Internal("a partly used block was not re-wrapped".into()))?;
            sqlx::query("UPDATE blocks SET consumed = ?2, material = ?3, changed_unix_ms = ?4 WHERE id = ?1")
                .bind(b.row)
                .bind(int(b.consumed as u64, "consumed")?)
                .bind(blob)
                .bind(now)
                .execute(&mut **tx)
                .await
                .db(path)?;
        }
    }
    Ok(erased)
}

async fn link_side(tx: &mut Tx, path: &Path, link_id: &str) -> Result<Side, PoolError> {
    let side: Option<String> = sqlx::query_scalar("SELECT side FROM links WHERE link_id = ?1")
        .bind(link_id)
        .fetch_optional(&mut **tx)
        .await
        .db(path)?;
    match side {
        Some(s) => Side::parse(&s),
        None => Err(PoolError::UnknownLink(link_id.to_owned())),
    }
}

async fn owned_available(tx: &mut Tx, path: &Path, link_id: &str, side: Side) -> Result<u64, PoolError> {
    let bytes: Option<i64> = sqlx::query_scalar(
        "SELECT remaining_bytes FROM block_counts WHERE link_id = ?1 AND owner = ?2 AND state = 'confirmed'",
    )
    .bind(link_id)
    .bind(side.as_str())
    .fetch_optional(&mut **tx)
    .await
    .db(path)?;
    Ok(u64_of(bytes.unwrap_or(0)))
}

/// Loads a key's description (no material).
async fn load_key(
    conn: &mut sqlx::SqliteConnection,
    path: &Path,
    key_id: &str,
) -> Result<Option<KeyInfo>, PoolError> {
    let Some(row) =
        sqlx::query("SELECT id, link_id, origin, master_sae, size_bits, state FROM keys WHERE key_id = ?1")
            .bind(key_id)
            .fetch_optional(&mut *conn)
            .await
            .db(path)?
    else {
        return Ok(None);
    };
    let key_row: i64 = row.try_get(0).db(path)?;
    let slaves = sqlx::query("SELECT slave_sae, state FROM key_slaves WHERE key_row = ?1 ORDER BY slave_sae")
        .bind(key_row)
        .fetch_all(&mut *conn)
        .await
        .db(path)?;
    let mut slave_states = Vec::with_capacity(slaves.len());
    for s in &slaves {
        slave_states.push((
            SaeId::new(s.try_get::<String, _>(0).db(path)?)?,
            KeyState::parse(&s.try_get::<String, _>(1).db(path)?)?,
        ));
    }
    let segs = sqlx::query(
        "SELECT b.block_id, s.byte_offset, s.len FROM key_segments s JOIN blocks b ON b.id = s.block_row \
         WHERE s.key_row = ?1 ORDER BY s.seq",
    )
    .bind(key_row)
    .fetch_all(&mut *conn)
    .await
    .db(path)?;
    let mut segments = Vec::with_capacity(segs.len());
    for s in &segs {
        segments.push(Segment {
            block_id: s.try_get(0).db(path)?,
            offset: u32_of(s.try_get(1).db(path)?, "segment offset")?,
            len: u32_of(s.try_get(2).db(path)?, "segment length")?,
        });
    }
    Ok(Some(KeyInfo {
        link_id: row.try_get(1).db(path)?,
        origin: KeyOrigin::parse(&row.try_get::<String, _>(2).db(path)?)?,
        state: KeyState::parse(&row.try_get::<String, _>(5).db(path)?)?,
        size_bits: u32_of(row.try_get(4).db(path)?, "key size")?,
        assignment: PeerKey {
            key_id: key_id.to_owned(),
            master: SaeId::new(row.try_get::<String, _>(3).db(path)?)?,
            slaves: slave_states.iter().map(|(s, _)| s.clone()).collect(),
            segments,
        },
        slave_states,
    }))
}

impl Inner {
    fn path(&self) -> &Path {
        &self.cfg.path
    }

    /// Takes the in-process writer lock and opens a `BEGIN IMMEDIATE` transaction (which also
    /// excludes writers in other processes).
    async fn write_tx(&self) -> Result<WriteTx<'_>, PoolError> {
        let guard = self.writer.clone().lock_owned().await;
        let tx = self.db.begin_with("BEGIN IMMEDIATE").await.db(self.path())?;
        Ok(WriteTx { inner: self, guard: Some(guard), tx: Some(tx) })
    }

    async fn checkpoint_locked(&self, w: &mut WriterState) -> Result<bool, PoolError> {
        let row = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").fetch_one(&self.db).await.db(self.path())?;
        let busy: i64 = row.try_get(0).db(self.path())?;
        if busy == 0 {
            w.erased_since_checkpoint = 0;
            tracing::debug!(db = %self.path().display(), "WAL checkpointed and truncated");
            Ok(true)
        } else {
            tracing::debug!(db = %self.path().display(), "WAL checkpoint incomplete: a reader is active");
            Ok(false)
        }
    }

    async fn wrap_all(&self, items: Vec<Zeroizing<Vec<u8>>>) -> Result<Vec<Vec<u8>>, PoolError> {
        let tasks: Vec<_> = items.iter().map(|k| tokio::spawn(self.hsm.wrap_async(k))).collect();
        drop(items);
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            let blob = t.await.map_err(|e| PoolError::Internal(format!("HSM wrap task failed: {e}")))??;
            out.push(blob.into_bytes());
        }
        Ok(out)
    }

    async fn unwrap_all(&self, blobs: &[&[u8]]) -> Result<Vec<Zeroizing<Vec<u8>>>, PoolError> {
        let mut tasks = Vec::with_capacity(blobs.len());
        for b in blobs {
            let wrapped = WrappedKey::from_bytes(b)?;
            tasks.push(tokio::spawn(self.hsm.unwrap_async(&wrapped)));
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.map_err(|e| PoolError::Internal(format!("HSM unwrap task failed: {e}")))??);
        }
        Ok(out)
    }

    async fn register_link(&self, link_id: String, side: Side) -> Result<(), PoolError> {
        let mut tx = self.write_tx().await?;
        match link_side(&mut tx, self.path(), &link_id).await {
            Ok(stored) if stored == side => Ok(()),
            Ok(stored) => Err(PoolError::SideChanged { link_id, stored, configured: side }),
            Err(PoolError::UnknownLink(_)) => {
                sqlx::query("INSERT INTO links (link_id, side, created_unix_ms) VALUES (?1, ?2, ?3)")
                    .bind(&link_id)
                    .bind(side.as_str())
                    .bind(now_ms())
                    .execute(&mut **tx)
                    .await
                    .db(self.path())?;
                tx.commit(0).await?;
                tracing::info!(link = %link_id, %side, "link registered in the key pool");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn insert_blocks(
        &self,
        link_id: String,
        blocks: Vec<NewBlock>,
    ) -> Result<Vec<InsertOutcome>, PoolError> {
        let path = self.path();
        // Wrap outside the transaction: it does not depend on the database.
        let plain: Vec<Zeroizing<Vec<u8>>> = blocks.iter().map(|b| b.key.clone()).collect();
        let wrapped = self.wrap_all(plain).await?;
        let mut tx = self.write_tx().await?;
        link_side(&mut tx, path, &link_id).await?;
        let now = now_ms();
        let mut outcomes = Vec::with_capacity(blocks.len());
        let mut inserted = 0u64;
        for (b, material) in blocks.iter().zip(wrapped) {
            let existing = sqlx::query("SELECT kcv, len FROM blocks WHERE link_id = ?1 AND block_id = ?2")
                .bind(&link_id)
                .bind(&b.block_id)
                .fetch_optional(&mut **tx)
                .await
                .db(path)?;
            if let Some(row) = existing {
                let kcv: Vec<u8> = row.try_get(0).db(path)?;
                let len: i64 = row.try_get(1).db(path)?;
                if kcv[..] != b.kcv[..] || usize::try_from(len).ok() != Some(b.key.len()) {
                    return Err(PoolError::BlockConflict { link_id, block_id: b.block_id.clone() });
                }
                outcomes.push(InsertOutcome::AlreadyPresent);
                continue;
            }
            let len = int(b.key.len() as u64, "block length")?;
            sqlx::query(
                "INSERT INTO blocks (link_id, block_id, owner, state, kcv, len, consumed, material, created_unix_ms, \
                 qber_ppm, security_bits, received_unix_ms, changed_unix_ms) \
                 VALUES (?1, ?2, ?3, 'unconfirmed', ?4, ?5, 0, ?6, ?7, ?8, ?9, ?10, ?10)",
            )
            .bind(&link_id)
            .bind(&b.block_id)
            .bind(block_owner(&b.block_id).as_str())
            .bind(&b.kcv[..])
            .bind(len)
            .bind(material)
            .bind(int(b.meta.created_unix_ms, "creation time")?)
            .bind(b.meta.qber_ppm.map(i64::from))
            .bind(b.meta.security_bits.map(i64::from))
            .bind(now)
            .execute(&mut **tx)
            .await
            .db(path)?;
            outcomes.push(InsertOutcome::Inserted);
            inserted += 1;
        }
        tx.commit(0).await?;
        tracing::debug!(link = %link_id, inserted, duplicates = blocks.len() as u64 - inserted, "key blocks stored");
        Ok(outcomes)
    }

    /// Sets a live block to a terminal state and erases its material.
    async fn retire_block(
        tx: &mut Tx,
        path: &Path,
        row: i64,
        state: BlockState,
        reason: Option<&str>,
    ) -> Result<(), PoolError> {
        sqlx::query(
            "UPDATE blocks SET state = ?2, material = NULL, discard_reason = ?3, changed_unix_ms = ?4 WHERE id = ?1",
        )
        .bind(row)
        .bind(state.as_str())
        .bind(reason)
        .bind(now_ms())
        .execute(&mut **tx)
        .await
        .db(path)?;
        Ok(())
    }

    async fn check_peer_blocks(
        &self,
        link_id: String,
        checks: Vec<BlockCheck>,
    ) -> Result<Vec<(String, Verdict)>, PoolError> {
        let path = self.path();
        let mut tx = self.write_tx().await?;
        link_side(&mut tx, path, &link_id).await?;
        let mut answers = Vec::with_capacity(checks.len());
        let mut outcome = VerdictOutcome::default();
        for c in checks {
            let row = sqlx::query("SELECT id, state, kcv FROM blocks WHERE link_id = ?1 AND block_id = ?2")
                .bind(&link_id)
                .bind(&c.block_id)
                .fetch_optional(&mut **tx)
                .await
                .db(path)?;
            let Some(row) = row else {
                answers.push((c.block_id, Verdict::Unknown));
                outcome.ignored += 1;
                continue;
            };
            let id: i64 = row.try_get(0).db(path)?;
            let state = BlockState::parse(&row.try_get::<String, _>(1).db(path)?)?;
            let kcv: Vec<u8> = row.try_get(2).db(path)?;
            let same = kcv[..] == c.kcv[..];
            let verdict = match (state, same) {
                (BlockState::Discarded, _) => Verdict::Mismatch,
                (_, false) => Verdict::Mismatch,
                (_, true) => Verdict::Match,
            };
            match (state, verdict) {
                (BlockState::Unconfirmed, Verdict::Match) => {
                    set_confirmed(&mut tx, path, id).await?;
                    outcome.confirmed += 1;
                }
                (BlockState::Unconfirmed, Verdict::Mismatch) => {
                    Self::retire_block(
                        &mut tx,
                        path,
                        id,
                        BlockState::Discarded,
                        Some("KCV differs from the peer's"),
                    )
                    .await?;
                    outcome.discarded += 1;
                }
                (BlockState::Confirmed | BlockState::Consumed, Verdict::Mismatch) => {
                    tracing::error!(link = %link_id, block = %c.block_id, %state,
                        "the peer reports another KCV for a block confirmed here; it is not discarded here");
                    outcome.ignored += 1;
                }
                _ => outcome.ignored += 1,
            }
            answers.push((c.block_id, verdict));
        }
        tx.commit(outcome.discarded).await?;
        log_outcome(&link_id, "answered peer block checks", &outcome);
        Ok(answers)
    }

    async fn apply_peer_verdicts(
        &self,
        link_id: String,
        verdicts: Vec<(String, Verdict)>,
    ) -> Result<VerdictOutcome, PoolError> {
        let path = self.path();
        let mut tx = self.write_tx().await?;
        link_side(&mut tx, path, &link_id).await?;
        let mut outcome = VerdictOutcome::default();
        for (block_id, verdict) in verdicts {
            let row = sqlx::query(
                "SELECT id FROM blocks WHERE link_id = ?1 AND block_id = ?2 AND state = 'unconfirmed'",
            )
            .bind(&link_id)
            .bind(&block_id)
            .fetch_optional(&mut **tx)
            .await
            .db(path)?;
            let Some(row) = row else {
                outcome.ignored += 1;
                continue;
            };
            let id: i64 = row.try_get(0).db(path)?;
            match verdict {
                Verdict::Match => {
                    set_confirmed(&mut tx, path, id).await?;
                    outcome.confirmed += 1;
                }
                Verdict::Mismatch => {
                    Self::retire_block(
                        &mut tx,
                        path,
                        id,
                        BlockState::Discarded,
                        Some("the peer's KCV differs"),
                    )
                    .await?;
                    outcome.discarded += 1;
                }
                Verdict::Unknown => outcome.still_unconfirmed += 1,
            }
        }
        tx.commit(outcome.discarded).await?;
        log_outcome(&link_id, "applied peer verdicts", &outcome);
        Ok(outcome)
    }

    async fn discard_stale(&self, link_id: String, cutoff_ms: i64) -> Result<u64, PoolError> {
        let path = self.path();
        let mut tx = self.write_tx().await?;
        link_side(&mut tx, path, &link_id).await?;
        let done = sqlx::query(
            "UPDATE blocks SET state = 'discarded', material = NULL, changed_unix_ms = ?3, \
             discard_reason = 'not confirmed by the peer in time' \
             WHERE link_id = ?1 AND state = 'unconfirmed' AND received_unix_ms < ?2",
        )
        .bind(&link_id)
        .bind(cutoff_ms)
        .bind(now_ms())
        .execute(&mut **tx)
        .await
        .db(path)?
        .rows_affected();
        tx.commit(done).await?;
        if done > 0 {
            tracing::warn!(link = %link_id, blocks = done, "discarded key blocks the peer never confirmed");
        }
        Ok(done)
    }

    async fn discard_blocks(
        &self,
        link_id: String,
        block_ids: Vec<String>,
        reason: String,
    ) -> Result<u64, PoolError> {
        let path = self.path();
        let mut tx = self.write_tx().await?;
        link_side(&mut tx, path, &link_id).await?;
        let mut done = 0;
        for block_id in &block_ids {
            let row = sqlx::query(
                "SELECT id FROM blocks WHERE link_id = ?1 AND block_id = ?2 AND state IN ('unconfirmed', 'confirmed')",
            )
            .bind(&link_id)
            .bind(block_id)
            .fetch_optional(&mut **tx)
            .await
            .db(path)?;
            if let Some(row) = row {
                Self::retire_block(
                    &mut tx,
                    path,
                    row.try_get(0).db(path)?,
                    BlockState::Discarded,
                    Some(&reason),
                )
                .await?;
                done += 1;
            }
        }
        tx.commit(done).await?;
        if done > 0 {
            tracing::warn!(link = %link_id, blocks = done, %reason, "key blocks discarded");
        }
        Ok(done)
    }

    /// Cuts keys for every request that fits, in order, in one transaction (see
    /// [`KeyPool::reserve_key_batch`]). `requests` already failed validation are passed through.
    async fn reserve(
        &self,
        link_id: String,
        requests: Vec<Result<ReserveRequest, PoolError>>,
    ) -> Result<Vec<Result<Vec<KeyGrant>, PoolError>>, PoolError> {
        let path = self.path();
        let mut tx = self.write_tx().await?;
        let side = link_side(&mut tx, path, &link_id).await?;
        let available = owned_available(&mut tx, path, &link_id, side).await?;

        // Which requests the owned material covers, in arrival order; each is all or nothing.
        let mut remaining = available;
        let mut plan: Vec<Result<ReserveRequest, PoolError>> = Vec::with_capacity(requests.len());
        for r in requests {
            plan.push(r.and_then(|req| {
                let needed = u64::from(req.count) * u64::from(req.size_bits / 8);
                if needed > remaining {
                    return Err(PoolError::Exhausted {
                        requested_bits: needed * 8,
                        available_bits: remaining * 8,
                    });
                }
                remaining -= needed;
                Ok(req)
            }));
        }
        let needed = available - remaining;
        if needed == 0 {
            tx.rollback().await?;
            return Ok(plan.into_iter().map(|r| r.map(|_| Vec::new())).collect());
        }

        // The oldest owned confirmed blocks that together cover the requests.
        let mut blocks: Vec<LiveBlock> = Vec::new();
        let mut got = 0u64;
        let mut after = 0i64;
        while got < needed {
            let rows = sqlx::query(
                "SELECT id, block_id, len, consumed, material FROM blocks \
                 WHERE link_id = ?1 AND owner = ?2 AND state = 'confirmed' AND id > ?3 ORDER BY id LIMIT 64",
            )
            .bind(&link_id)
            .bind(side.as_str())
            .bind(after)
            .fetch_all(&mut **tx)
            .await
            .db(path)?;
            if rows.is_empty() {
                return Err(PoolError::Corrupt(format!(
                    "the counters show {available} bytes available on link {link_id} but the blocks hold {got}"
                )));
            }
            for r in rows {
                let b = live_block(&r, path)?;
                after = b.row;
                got += (b.len - b.consumed) as u64;
                blocks.push(b);
                if got >= needed {
                    break;
                }
            }
        }
        let mut plain = self.unwrap_all(&blocks.iter().map(|b| &b.material[..]).collect::<Vec<_>>()).await?;
        for (b, p) in blocks.iter().zip(&plain) {
            if p.len() != b.len {
                return Err(PoolError::Corrupt(format!(
                    "block {} unwrapped to {} bytes, not {}",
                    b.block_id,
                    p.len(),
                    b.len
                )));
            }
        }

        // Cut the keys of every planned request in order, zeroing what is taken from the
        // blocks' plaintext.
        let mut keys: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut key_segments: Vec<Vec<(usize, usize, usize)>> = Vec::new(); // (block idx, offset, len)
        let mut bi = 0usize;
        for req in plan.iter().flatten() {
            let size = (req.size_bits / 8) as usize;
            for _ in 0..req.count {
                let mut key = Zeroizing::new(Vec::with_capacity(size));
                let mut segs = Vec::new();
                while key.len() < size {
                    let Some(b) = blocks.get_mut(bi) else {
                        return Err(PoolError::Internal("ran out of loaded blocks while cutting".into()));
                    };
                    let avail = b.len - b.consumed;
                    if avail == 0 {
                        bi += 1;
                        continue;
                    }
                    let take = avail.min(size - key.len());
                    let range = b.consumed..b.consumed + take;
                    key.extend_from_slice(&plain[bi][range.clone()]);
                    plain[bi][range].fill(0);
                    segs.push((bi, b.consumed, take));
                    b.consumed += take;
                }
                keys.push(key);
                key_segments.push(segs);
            }
        }

        // Wrap keys and the zeroed remainders of partly used blocks in one go.
        let partial: Vec<usize> = (0..blocks.len()).filter(|&i| blocks[i].consumed < blocks[i].len).collect();
        let mut to_wrap = keys.clone();
        to_wrap.extend(partial.iter().map(|&i| plain[i].clone()));
        drop(plain);
        let mut wrapped = self.wrap_all(to_wrap).await?;
        let block_blobs = wrapped.split_off(keys.len());

        let partial_blobs = partial.iter().copied().zip(block_blobs).collect::<HashMap<_, _>>();
        let erased = store_cut_blocks(&mut tx, path, &blocks, partial_blobs).await?;
        let now = now_ms();

        let mut cut = keys.into_iter().zip(key_segments).zip(wrapped);
        let mut out = Vec::with_capacity(plan.len());
        for r in plan {
            let req = match r {
                Ok(req) => req,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            let mut grants = Vec::with_capacity(req.count as usize);
            for _ in 0..req.count {
                let Some(((key, segs), blob)) = cut.next() else {
                    return Err(PoolError::Internal("fewer keys cut than planned".into()));
                };
                let key_id = new_key_id()?;
                let key_row = insert_key(
                    &mut tx,
                    path,
                    &link_id,
                    KeyOrigin::Local,
                    &key_id,
                    &req.master,
                    &req.slaves,
                    req.size_bits,
                    blob,
                    now,
                )
                .await?;
                let mut segments = Vec::with_capacity(segs.len());
                for (seq, (bi, offset, len)) in segs.into_iter().enumerate() {
                    let b = &blocks[bi];
                    insert_segment(&mut tx, path, key_row, seq, b.row, offset, len).await?;
                    segments.push(Segment {
                        block_id: b.block_id.clone(),
                        offset: offset as u32,
                        len: len as u32,
                    });
                }
                grants.push(KeyGrant {
                    assignment: PeerKey {
                        key_id,
                        master: req.master.clone(),
                        slaves: req.slaves.clone(),
                        segments,
                    },
                    key,
                });
            }
            out.push(Ok(grants));
        }
        tx.commit(erased).await?;
        tracing::debug!(link = %link_id, requests = out.len(), bytes = needed, blocks = blocks.len(),
            "keys reserved");
        Ok(out)
    }

    async fn accept_peer(&self, link_id: String, keys: Vec<PeerKey>) -> Result<AcceptOutcome, PoolError> {
        let path = self.path();
        let mut tx = self.write_tx().await?;
        let side = link_side(&mut tx, path, &link_id).await?;
        let mut outcome = AcceptOutcome::default();
        let mut fresh: Vec<&PeerKey> = Vec::new();
        let mut batch_ids: HashMap<&str, &PeerKey> = HashMap::new();
        for k in &keys {
            if let Some(prev) = batch_ids.get(k.key_id.as_str()) {
                if !same_assignment(prev, k) {
                    return Err(PoolError::AssignmentRefused {
                        key_id: k.key_id.clone(),
                        reason: Refusal::Conflicting,
                    });
                }
                outcome.already_present += 1;
                continue;
            }
            batch_ids.insert(&k.key_id, k);
            match load_key(&mut tx, path, &k.key_id).await? {
                Some(existing) => {
                    if existing.link_id != link_id
                        || existing.origin != KeyOrigin::Peer
                        || !same_assignment(&existing.assignment, k)
                    {
                        return Err(PoolError::AssignmentRefused {
                            key_id: k.key_id.clone(),
                            reason: Refusal::Conflicting,
                        });
                    }
                    outcome.already_present += 1;
                }
                None => fresh.push(k),
            }
        }

        // Check every segment and load each touched block once.
        let mut blocks: Vec<LiveBlock> = Vec::new();
        let mut by_block_id: HashMap<String, usize> = HashMap::new();
        let mut claimed: HashMap<usize, Vec<(u32, u32, String)>> = HashMap::new(); // new ranges this batch
        let mut placements: Vec<Vec<(usize, u32, u32)>> = Vec::with_capacity(fresh.len());
        for k in &fresh {
            let refuse = |reason| PoolError::AssignmentRefused { key_id: k.key_id.clone(), reason };
            let mut place = Vec::with_capacity(k.segments.len());
            for s in &k.segments {
                let idx = match by_block_id.get(&s.block_id) {
                    Some(&i) => i,
                    None => {
                        let row = sqlx::query(
                            "SELECT id, block_id, len, consumed, material, state, owner FROM blocks \
                             WHERE link_id = ?1 AND block_id = ?2",
                        )
                        .bind(&link_id)
                        .bind(&s.block_id)
                        .fetch_optional(&mut **tx)
                        .await
                        .db(path)?;
                        let Some(row) = row else {
                            return Err(refuse(Refusal::BlockNotHeld { block_id: s.block_id.clone() }));
                        };
                        let state = BlockState::parse(&row.try_get::<String, _>(5).db(path)?)?;
                        match state {
                            BlockState::Confirmed => {}
                            BlockState::Unconfirmed => {
                                return Err(refuse(Refusal::BlockNotConfirmed {
                                    block_id: s.block_id.clone(),
                                }));
                            }
                            state => {
                                return Err(refuse(Refusal::BlockUnusable {
                                    block_id: s.block_id.clone(),
                                    state,
                                }));
                            }
                        }
                        if Side::parse(&row.try_get::<String, _>(6).db(path)?)? == side {
                            return Err(refuse(Refusal::BlockOwnedHere { block_id: s.block_id.clone() }));
                        }
                        blocks.push(live_block(&row, path)?);
                        by_block_id.insert(s.block_id.clone(), blocks.len() - 1);
                        blocks.len() - 1
                    }
                };
                let b = &blocks[idx];
                let end = u64::from(s.offset) + u64::from(s.len);
                if end > b.len as u64 {
                    return Err(refuse(Refusal::OutOfRange {
                        block_id: s.block_id.clone(),
                        offset: s.offset,
                        len: s.len,
                        block_len: b.len as u32,
                    }));
                }
                // Stored segments never overlap, so only the one starting last before `end`
                // can reach into [offset, end).
                let nearest = sqlx::query(
                    "SELECT k.key_id, s.byte_offset + s.len FROM key_segments s JOIN keys k ON k.id = s.key_row \
                     WHERE s.block_row = ?1 AND s.byte_offset < ?2 ORDER BY s.byte_offset DESC LIMIT 1",
                )
                .bind(b.row)
                .bind(int(end, "segment end")?)
                .fetch_optional(&mut **tx)
                .await
                .db(path)?;
                let mut other = None;
                if let Some(row) = nearest {
                    let nearest_end: i64 = row.try_get(1).db(path)?;
                    if nearest_end > i64::from(s.offset) {
                        other = Some(row.try_get::<String, _>(0).db(path)?);
                    }
                }
                let other = other.or_else(|| {
                    claimed.get(&idx).and_then(|ranges| {
                        ranges
                            .iter()
                            .find(|(o, l, _)| {
                                u64::from(*o) < end && u64::from(*o) + u64::from(*l) > u64::from(s.offset)
                            })
                            .map(|(_, _, id)| id.clone())
                    })
                });
                if let Some(other_key_id) = other {
                    return Err(refuse(Refusal::Overlap { block_id: s.block_id.clone(), other_key_id }));
                }
                claimed.entry(idx).or_default().push((s.offset, s.len, k.key_id.clone()));
                place.push((idx, s.offset, s.len));
            }
            placements.push(place);
        }

        if !fresh.is_empty() {
            let mut plain =
                self.unwrap_all(&blocks.iter().map(|b| &b.material[..]).collect::<Vec<_>>()).await?;
            for (b, p) in blocks.iter().zip(&plain) {
                if p.len() != b.len {
                    return Err(PoolError::Corrupt(format!(
                        "block {} unwrapped to {} bytes, not {}",
                        b.block_id,
                        p.len(),
                        b.len
                    )));
                }
            }
            let mut key_bytes: Vec<Zeroizing<Vec<u8>>> = Vec::with_capacity(fresh.len());
            for (k, place) in fresh.iter().zip(&placements) {
                let mut key = Zeroizing::new(Vec::with_capacity((k.size_bits() / 8) as usize));
                for &(idx, offset, len) in place {
                    let range = offset as usize..offset as usize + len as usize;
                    key.extend_from_slice(&plain[idx][range.clone()]);
                    plain[idx][range].fill(0);
                    blocks[idx].consumed += len as usize;
                }
                key_bytes.push(key);
            }
            let partial: Vec<usize> =
                (0..blocks.len()).filter(|&i| blocks[i].consumed < blocks[i].len).collect();
            let n_keys = key_bytes.len();
            let mut to_wrap = key_bytes;
            to_wrap.extend(partial.iter().map(|&i| plain[i].clone()));
            drop(plain);
            let mut wrapped = self.wrap_all(to_wrap).await?;
            let block_blobs = wrapped.split_off(n_keys);
            let partial_blobs = partial.iter().copied().zip(block_blobs).collect::<HashMap<_, _>>();
            let erased = store_cut_blocks(&mut tx, path, &blocks, partial_blobs).await?;
            let now = now_ms();
            for ((k, place), blob) in fresh.iter().zip(&placements).zip(wrapped) {
                let size_bits = u32::try_from(k.size_bits())
                    .map_err(|_| PoolError::Invalid { what: "peer key", reason: "too large".into() })?;
                let key_row = insert_key(
                    &mut tx,
                    path,
                    &link_id,
                    KeyOrigin::Peer,
                    &k.key_id,
                    &k.master,
                    &k.slaves,
                    size_bits,
                    blob,
                    now,
                )
                .await?;
                for (seq, &(idx, offset, len)) in place.iter().enumerate() {
                    insert_segment(
                        &mut tx,
                        path,
                        key_row,
                        seq,
                        blocks[idx].row,
                        offset as usize,
                        len as usize,
                    )
                    .await?;
                }
            }
            outcome.accepted = fresh.len() as u64;
            tx.commit(erased).await?;
        } else {
            tx.rollback().await?;
        }
        tracing::debug!(link = %link_id, accepted = outcome.accepted, already_present = outcome.already_present,
            "peer key assignments applied");
        Ok(outcome)
    }

    async fn mark_delivered(&self, master: SaeId, key_ids: Vec<String>) -> Result<(), PoolError> {
        let path = self.path();
        let mut tx = self.write_tx().await?;
        let (mut missing, mut foreign, mut spent, mut rows) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for key_id in &key_ids {
            let row = sqlx::query("SELECT id, origin, master_sae, state FROM keys WHERE key_id = ?1")
                .bind(key_id)
                .fetch_optional(&mut **tx)
                .await
                .db(path)?;
            let Some(row) = row else {
                missing.push(key_id.clone());
                continue;
            };
            let origin: String = row.try_get(1).db(path)?;
            let key_master: String = row.try_get(2).db(path)?;
            let state: String = row.try_get(3).db(path)?;
            if origin != KeyOrigin::Local.as_str() {
                missing.push(key_id.clone());
            } else if key_master != master.as_str() {
                foreign.push(key_id.clone());
            } else if state != KeyState::Assigned.as_str() {
                spent.push(key_id.clone());
            } else {
                rows.push(row.try_get::<i64, _>(0).db(path)?);
            }
        }
        if !foreign.is_empty() {
            return Err(PoolError::NotAuthorised { sae: master.to_string(), key_ids: foreign });
        }
        if !missing.is_empty() {
            return Err(PoolError::NotFound(missing));
        }
        if !spent.is_empty() {
            return Err(PoolError::AlreadyDelivered(spent));
        }
        let mut seen = HashSet::new();
        let now = now_ms();
        for row in &rows {
            if !seen.insert(*row) {
                return Err(PoolError::Invalid { what: "key IDs", reason: "a key is listed twice".into() });
            }
            finish_key(&mut tx, path, *row, KeyState::Delivered, now).await?;
        }
        tx.commit(rows.len() as u64).await?;
        Ok(())
    }

    async fn take(
        &self,
        caller: SaeId,
        master: SaeId,
        key_ids: Vec<String>,
    ) -> Result<Vec<DeliveredKey>, PoolError> {
        let path = self.path();
        let mut tx = self.write_tx().await?;
        let (mut missing, mut unauthorised) = (Vec::new(), Vec::new());
        let mut found: Vec<(i64, String, usize, Vec<u8>)> = Vec::new();
        for key_id in &key_ids {
            let row = sqlx::query(
                "SELECT k.id, k.origin, k.master_sae, k.state, k.material, k.size_bits, ks.state \
                 FROM keys k LEFT JOIN key_slaves ks ON ks.key_row = k.id AND ks.slave_sae = ?2 WHERE k.key_id = ?1",
            )
            .bind(key_id)
            .bind(caller.as_str())
            .fetch_optional(&mut **tx)
            .await
            .db(path)?;
            let Some(row) = row else {
                missing.push(key_id.clone());
                continue;
            };
            let origin: String = row.try_get(1).db(path)?;
            let key_master: String = row.try_get(2).db(path)?;
            let state: String = row.try_get(3).db(path)?;
            let slave_state: Option<String> = row.try_get(6).db(path)?;
            if origin != KeyOrigin::Peer.as_str() {
                // Keys cut here are served for encryption here, never for decryption.
                missing.push(key_id.clone());
            } else if key_master != master.as_str() || slave_state.is_none() {
                unauthorised.push(key_id.clone());
            } else if state != KeyState::Assigned.as_str()
                || slave_state.as_deref() != Some(KeyState::Assigned.as_str())
            {
                missing.push(key_id.clone());
            } else {
                let material: Option<Vec<u8>> = row.try_get(4).db(path)?;
                let material = material
                    .ok_or_else(|| PoolError::Corrupt(format!("assigned key {key_id} has no material")))?;
                let size_bits: i64 = row.try_get(5).db(path)?;
                found.push((row.try_get(0).db(path)?, key_id.clone(), (size_bits / 8) as usize, material));
            }
        }
        if !unauthorised.is_empty() {
            tracing::warn!(sae = %caller, master = %master, keys = unauthorised.len(), "SAE asked for keys it may not have");
            return Err(PoolError::NotAuthorised { sae: caller.to_string(), key_ids: unauthorised });
        }
        if !missing.is_empty() {
            return Err(PoolError::NotFound(missing));
        }
        let plain = self.unwrap_all(&found.iter().map(|f| &f.3[..]).collect::<Vec<_>>()).await?;
        let now = now_ms();
        let mut erased = 0u64;
        let mut out = Vec::with_capacity(found.len());
        for ((row, key_id, size, _), key) in found.into_iter().zip(plain) {
            if key.len() != size {
                return Err(PoolError::Corrupt(format!(
                    "key {key_id} unwrapped to {} bytes, not {size}",
                    key.len()
                )));
            }
            sqlx::query("UPDATE key_slaves SET state = 'delivered', changed_unix_ms = ?3 WHERE key_row = ?1 AND slave_sae = ?2")
                .bind(row)
                .bind(caller.as_str())
                .bind(now)
                .execute(&mut **tx)
                .await
                .db(path)?;
            let pending: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM key_slaves WHERE key_row = ?1 AND state = 'assigned'",
            )
            .bind(row)
            .fetch_one(&mut **tx)
            .await
            .db(path)?;
            if pending == 0 {
                sqlx::query("UPDATE keys SET state = 'delivered', material = NULL, changed_unix_ms = ?2 WHERE id = ?1")
                    .bind(row)
                    .bind(now)
                    .execute(&mut **tx)
                    .await
                    .db(path)?;
                erased += 1;
            }
            out.push(DeliveredKey { key_id, key });
        }
        tx.commit(erased).await?;
        tracing::debug!(sae = %caller, master = %master, keys = out.len(), "keys delivered for decryption");
        Ok(out)
    }

    async fn prune(&self, link_id: String, cutoff_ms: i64) -> Result<(u64, u64), PoolError> {
        let path = self.path();
        let (mut keys, mut blocks) = (0u64, 0u64);
        loop {
            let mut tx = self.write_tx().await?;
            link_side(&mut tx, path, &link_id).await?;
            let rows: Vec<i64> = sqlx::query_scalar(
                "SELECT id FROM keys k WHERE link_id = ?1 AND state <> 'assigned' AND changed_unix_ms < ?2 \
                 AND NOT EXISTS (SELECT 1 FROM key_segments s JOIN blocks b ON b.id = s.block_row \
                                 WHERE s.key_row = k.id AND b.state IN ('unconfirmed', 'confirmed')) \
                 LIMIT 1000",
            )
            .bind(&link_id)
            .bind(cutoff_ms)
            .fetch_all(&mut **tx)
            .await
            .db(path)?;
            for row in &rows {
                for sql in [
                    "DELETE FROM key_segments WHERE key_row = ?1",
                    "DELETE FROM key_slaves WHERE key_row = ?1",
                    "DELETE FROM keys WHERE id = ?1",
                ] {
                    sqlx::query(sql).bind(row).execute(&mut **tx).await.db(path)?;
                }
            }
            let done = sqlx::query(
                "DELETE FROM blocks WHERE id IN (SELECT id FROM blocks b WHERE link_id = ?1 \
                 AND state IN ('consumed', 'discarded') AND changed_unix_ms < ?2 \
                 AND NOT EXISTS (SELECT 1 FROM key_segments s WHERE s.block_row = b.id) LIMIT 1000)",
            )
            .bind(&link_id)
            .bind(cutoff_ms)
            .execute(&mut **tx)
            .await
            .db(path)?
            .rows_affected();
            tx.commit(0).await?;
            keys += rows.len() as u64;
            blocks += done;
            if rows.len() < 1000 && done < 1000 {
                break;
            }
        }
        if keys + blocks > 0 {
            tracing::info!(link = %link_id, keys, blocks, "key pool history pruned");
        }
        Ok((keys, blocks))
    }

    async fn discard_keys(&self, link_id: String, key_ids: Vec<String>) -> Result<u64, PoolError> {
        let path = self.path();
        let mut tx = self.write_tx().await?;
        link_side(&mut tx, path, &link_id).await?;
        let now = now_ms();
        let mut done = 0;
        for key_id in &key_ids {
            let row: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM keys WHERE key_id = ?1 AND link_id = ?2 AND state = 'assigned'",
            )
            .bind(key_id)
            .bind(&link_id)
            .fetch_optional(&mut **tx)
            .await
            .db(path)?;
            if let Some(row) = row {
                finish_key(&mut tx, path, row, KeyState::Discarded, now).await?;
                done += 1;
            }
        }
        tx.commit(done).await?;
        if done > 0 {
            tracing::info!(link = %link_id, keys = done, "assigned keys discarded without delivery");
        }
        Ok(done)
    }
}

fn log_outcome(link_id: &str, what: &str, o: &VerdictOutcome) {
    if o.discarded > 0 {
        tracing::warn!(link = %link_id, confirmed = o.confirmed, discarded = o.discarded,
            still_unconfirmed = o.still_unconfirmed, "{what}: blocks discarded for KCV mismatch");
    } else {
        tracing::debug!(link = %link_id, confirmed = o.confirmed, still_unconfirmed = o.still_unconfirmed,
            ignored = o.ignored, "{what}");
    }
}

async fn set_confirmed(tx: &mut Tx, path: &Path, row: i64) -> Result<(), PoolError> {
    sqlx::query("UPDATE blocks SET state = 'confirmed', changed_unix_ms = ?2 WHERE id = ?1")
        .bind(row)
        .bind(now_ms())
        .execute(&mut **tx)
        .await
        .db(path)?;
    Ok(())
}

/// Moves an assigned key (and its slave rows) to `state`, erasing its material.
async fn finish_key(tx: &mut Tx, path: &Path, row: i64, state: KeyState, now: i64) -> Result<(), PoolError> {
    sqlx::query("UPDATE keys SET state = ?2, material = NULL, changed_unix_ms = ?3 WHERE id = ?1")
        .bind(row)
        .bind(state.as_str())
        .bind(now)
        .execute(&mut **tx)
        .await
        .db(path)?;
    sqlx::query(
        "UPDATE key_slaves SET state = ?2, changed_unix_ms = ?3 WHERE key_row = ?1 AND state = 'assigned'",
    )
    .bind(row)
    .bind(state.as_str())
    .bind(now)
    .execute(&mut **tx)
    .await
    .db(path)?;
    Ok(())
}

fn live_block(r: &sqlx::sqlite::SqliteRow, path: &Path) -> Result<LiveBlock, PoolError> {
    let len: i64 = r.try_get(2).db(path)?;
    let consumed: i64 = r.try_get(3).db(path)?;
    let material: Option<Vec<u8>> = r.try_get(4).db(path)?;
    let block_id: String = r.try_get(1).db(path)?;
    let material =
        material.ok_or_else(|| PoolError::Corrupt(format!("live block {block_id} has no material")))?;
    let len = usize::try_from(len).map_err(|_| PoolError::Corrupt("negative block length".into()))?;
    let consumed =
        usize::try_from(consumed).map_err(|_| PoolError::Corrupt("negative consumed count".into()))?;
    Ok(LiveBlock { row: r.try_get(0).db(path)?, block_id, len, consumed, material })
}

#[allow(clippy::too_many_arguments)]
async fn insert_key(
    tx: &mut Tx,
    path: &Path,
    link_id: &str,
    origin: KeyOrigin,
    key_id: &str,
    master: &SaeId,
    slaves: &[SaeId],
    size_bits: u32,
    material: Vec<u8>,
    now: i64,
) -> Result<i64, PoolError> {
    let key_row: i64 = sqlx::query_scalar(
        "INSERT INTO keys (key_id, link_id, origin, master_sae, size_bits, state, material, assigned_unix_ms, changed_unix_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, 'assigned', ?6, ?7, ?7) RETURNING id",
    )
    .bind(key_id)
    .bind(link_id)
    .bind(origin.as_str())
    .bind(master.as_str())
    .bind(i64::from(size_bits))
    .bind(material)
    .bind(now)
    .fetch_one(&mut **tx)
    .await
    .db(path)?;
    for s in slaves {
        sqlx::query("INSERT INTO key_slaves (key_row, slave_sae, state, changed_unix_ms) VALUES (?1, ?2, 'assigned', ?3)")
            .bind(key_row)
            .bind(s.as_str())
            .bind(now)
            .execute(&mut **tx)
            .await
            .db(path)?;
    }
    Ok(key_row)
}

async fn insert_segment(
    tx: &mut Tx,
    path: &Path,
    key_row: i64,
    seq: usize,
    block_row: i64,
    offset: usize,
    len: usize,
) -> Result<(), PoolError> {
    sqlx::query(
        "INSERT INTO key_segments (key_row, seq, block_row, byte_offset, len) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(key_row)
    .bind(int(seq as u64, "segment number")?)
    .bind(block_row)
    .bind(int(offset as u64, "segment offset")?)
    .bind(int(len as u64, "segment length")?)
    .execute(&mut **tx)
    .await
    .db(path)?;
    Ok(())
}

/// Equal assignments: same master, same slave set, same segments in order.
fn same_assignment(a: &PeerKey, b: &PeerKey) -> bool {
    let set = |s: &[SaeId]| s.iter().map(|x| x.as_str().to_owned()).collect::<BTreeSet<_>>();
    a.key_id == b.key_id
        && a.master == b.master
        && set(&a.slaves) == set(&b.slaves)
        && a.segments == b.segments
}
