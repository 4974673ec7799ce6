//! The key store, as the rest of kmd sees it: the durable, HSM-wrapped key pool
//! (`kmd-keypool`) in the SQLite database named by `[store] path`.
//!
//! [`KeyStore::open`] takes the store's lock file (so two daemons never share a database) and
//! opens the [`KeyPool`] (`PoolConfig::max_keys_per_call` = `[etsi014] max_key_per_request`).
//! The links are registered in the pool by `kmd_kme::Kme` (which stores the device blocks,
//! [`crate::links`]); this module reads the pool's counts for device credit and the metrics.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kmd_keypool::{BlockState, KeyPool, KeyState, PoolConfig, PoolError};
use qutemail_hsm::HsmKeyWrapper;

use crate::config::Config;
use crate::metrics::{KeyStock, PairStock};

/// The store could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database's directory is missing.
    #[error("[store] path: directory {} does not exist", .0.display())]
    NoDirectory(PathBuf),
    /// The lock file could not be created or opened.
    #[error("[store] path: cannot open lock file {}: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another kmd holds the store.
    #[error("[store] path: {} is in use by another kmd (lock file {} is locked)", db.display(), lock.display())]
    InUse {
        /// The database.
        db: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// The key pool failed.
    #[error("[store] path: {0}")]
    Pool(#[from] PoolError),
}

struct Inner {
    db: PathBuf,
    _lock: File,
    pool: KeyPool,
}

/// The key store of all links. Cheap to clone.
#[derive(Clone)]
pub struct KeyStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").field("db", &self.inner.db).finish_non_exhaustive()
    }
}

/// `<db>.lock`: held exclusively (`flock`) while kmd runs, so two daemons never share a store.
pub fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    db.with_file_name(name)
}

impl KeyStore {
    /// Opens the store named by `[store] path`.
    pub async fn open(config: &Config, hsm: HsmKeyWrapper) -> Result<Self, StoreError> {
        let db = config.store.path.clone();
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            return Err(StoreError::NoDirectory(dir.to_path_buf()));
        }
        let lock = lock_path(&db);
        let file = {
            let mut options = std::fs::OpenOptions::new();
            options.read(true).write(true).create(true).truncate(false);
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            options.open(&lock).map_err(|source| StoreError::Lock { path: lock.clone(), source })?
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::InUse { db, lock }),
            Err(std::fs::TryLockError::Error(source)) => return Err(StoreError::Lock { path: lock, source }),
        }
        let mut pool_config = PoolConfig::new(&db);
        pool_config.max_keys_per_call = config.etsi014.max_key_per_request.max(1);
        let pool = KeyPool::open(pool_config, hsm).await?;
        tracing::info!(db = %db.display(), "key pool opened");
        Ok(Self { inner: Arc::new(Inner { db, _lock: file, pool }) })
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        &self.inner.db
    }

    /// The key pool.
    pub fn pool(&self) -> &KeyPool {
        &self.inner.pool
    }

    /// Blocks stored for the link that still hold key material (unconfirmed or confirmed, of
    /// either owner): bounded by `max_blocks`.
    pub async fn stored_blocks(&self, link: &str) -> Result<u64, StoreError> {
        let counts = self.inner.pool.counts(link).await?;
        Ok(counts
            .blocks
            .iter()
            .filter(|b| matches!(b.state, BlockState::Unconfirmed | BlockState::Confirmed))
            .map(|b| b.blocks)
            .sum())
    }

    /// The link's stock as device credit sees it: the blocks that still hold key material, but
    /// of the confirmed ones at most twice those this side owns. This side cuts keys for its
    /// SAEs only from its own half of the blocks (the ownership split); when its SAEs drain that
    /// half while the peer's SAEs leave theirs untouched, the stored blocks stay high and would
    /// never earn credit, although this side has nothing left to serve. Unconfirmed blocks count
    /// in full: they are not usable yet by either side.
    pub async fn credit_blocks(&self, link: &str) -> Result<u64, StoreError> {
        let counts = self.inner.pool.counts(link).await?;
        let (mut unconfirmed, mut confirmed, mut owned) = (0u64, 0u64, 0u64);
        for b in &counts.blocks {
            match b.state {
                BlockState::Unconfirmed => unconfirmed += b.blocks,
                BlockState::Confirmed => {
                    confirmed += b.blocks;
                    if b.owned_here {
                        owned += b.blocks;
                    }
                }
                _ => {}
            }
        }
        Ok(unconfirmed + confirmed.min(owned.saturating_mul(2)))
    }

    /// The link's key stock for the metrics: `available_keys` = the bits this kmd can still cut
    /// (confirmed blocks it owns) / the default key size.
    pub async fn stock(&self, link: &str, key_size: u32) -> Result<KeyStock, StoreError> {
        let counts = self.inner.pool.counts(link).await?;
        let mut blocks: Vec<(String, u64)> = Vec::new();
        for b in &counts.blocks {
            let state = b.state.as_str();
            match blocks.iter_mut().find(|(s, _)| s == state) {
                Some((_, n)) => *n += b.blocks,
                None => blocks.push((state.to_owned(), b.blocks)),
            }
        }
        let mut pairs: Vec<PairStock> = Vec::new();
        for p in &counts.pairs {
            let entry = match pairs
                .iter_mut()
                .position(|s| s.master_sae == p.master.as_str() && s.slave_sae == p.slave.as_str())
            {
                Some(i) => &mut pairs[i],
                None => {
                    pairs.push(PairStock {
                        master_sae: p.master.as_str().to_owned(),
                        slave_sae: p.slave.as_str().to_owned(),
                        assigned: 0,
                        delivered: 0,
                    });
                    let last = pairs.len() - 1;
                    &mut pairs[last]
                }
            };
            match p.state {
                KeyState::Assigned => entry.assigned += p.keys,
                KeyState::Delivered => entry.delivered += p.keys,
                KeyState::Discarded => {}
            }
        }
        Ok(KeyStock {
            available_keys: counts.available_bits_owned / u64::from(key_size.max(1)),
            blocks,
            pairs,
        })
    }

    /// Closes the store (the pool, then the lock).
    pub async fn close(self) {
        let db = self.inner.db.clone();
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => {
                if let Err(e) = inner.pool.close().await {
                    tracing::warn!(db = %db.display(), error = %e, "closing the key pool failed");
                }
            }
            Err(_) => tracing::debug!(db = %db.display(), "key pool still shared at close; dropped with it"),
        }
        tracing::info!(db = %db.display(), "key store closed");
    }
}
