//! The key store, as the rest of kmd sees it.
//!
//! **Placeholder.** The durable, HSM-wrapped key pool (`kmd-keypool`) is being written; until it
//! is wired in here, [`KeyStore`] takes the store's lock, counts the key blocks the devices
//! deliver (so that device credit, the water marks and the metrics already work end to end) and
//! drops their bytes at once (they are `Zeroizing`, so wiped). Nothing is written to disk and no
//! key can be handed out.
//!
//! Wiring the key pool in is this module only: `open` becomes `KeyPool::open(PoolConfig::new(path),
//! hsm)` plus `register_link(link, Side::from_kme_ids(site, peer))` per link; `insert_block`
//! calls `KeyPool::insert_block` (mapping `InsertOutcome`/`BlockConflict` to [`Insert`]);
//! `stored_blocks` and `stock` read `KeyPool::counts`; `resume_after_block` returns the highest
//! stored serial block number; `close` calls `KeyPool::close`. The signatures here are already
//! async and fallible for that reason.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use qkd_device::{BlockId, DeviceKeyBlock};
use qutemail_hsm::HsmKeyWrapper;

use crate::config::{Config, PoolLimits};
use crate::metrics::KeyStock;

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
    /// The link is not configured.
    #[error("unknown link {0:?}")]
    UnknownLink(String),
}

/// What became of a block handed to [`KeyStore::insert_block`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Stored (placeholder: counted, bytes wiped).
    Stored,
    /// Already stored.
    Duplicate,
    /// The link holds `max_blocks` already.
    Full,
}

#[derive(Default)]
struct LinkBlocks {
    limits: PoolLimits,
    seen: HashSet<BlockId>,
    last_sequence: Option<u64>,
}

struct Inner {
    db: PathBuf,
    _lock: File,
    _hsm: HsmKeyWrapper,
    links: Mutex<HashMap<String, LinkBlocks>>,
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
    /// Opens the store named by `[store] path` for the configured links.
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
        let links = config
            .links
            .iter()
            .map(|l| (l.id.clone(), LinkBlocks { limits: l.pool, ..LinkBlocks::default() }))
            .collect();
        tracing::warn!(
            db = %db.display(),
            "the durable key pool is not wired in yet: key blocks are counted and wiped, no key can be served"
        );
        Ok(Self { inner: Arc::new(Inner { db, _lock: file, _hsm: hsm, links: Mutex::new(links) }) })
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        &self.inner.db
    }

    fn with_link<T>(&self, link: &str, f: impl FnOnce(&mut LinkBlocks) -> T) -> Result<T, StoreError> {
        let mut links = self.inner.links.lock().unwrap_or_else(|p| p.into_inner());
        links.get_mut(link).map(f).ok_or_else(|| StoreError::UnknownLink(link.to_owned()))
    }

    /// Stores a block the device delivered.
    pub async fn insert_block(&self, link: &str, block: DeviceKeyBlock) -> Result<Insert, StoreError> {
        self.with_link(link, |l| {
            if l.seen.contains(&block.block_id) {
                return Insert::Duplicate;
            }
            if l.seen.len() as u64 >= l.limits.max_blocks {
                return Insert::Full;
            }
            if let BlockId::Sequence(n) = block.block_id {
                l.last_sequence = Some(l.last_sequence.map_or(n, |m| m.max(n)));
            }
            l.seen.insert(block.block_id.clone());
            Insert::Stored
        })
        // `block` (and its `Zeroizing` key) is dropped, and so wiped, here.
    }

    /// Blocks stored for the link that still hold key material (drives device credit).
    pub async fn stored_blocks(&self, link: &str) -> Result<u64, StoreError> {
        self.with_link(link, |l| l.seen.len() as u64)
    }

    /// The highest serial block number stored for the link (the serial driver resumes after it).
    pub async fn resume_after_block(&self, link: &str) -> Result<Option<u64>, StoreError> {
        self.with_link(link, |l| l.last_sequence)
    }

    /// The link's key stock for the metrics (placeholder: nothing can be served).
    pub async fn stock(&self, link: &str) -> Result<KeyStock, StoreError> {
        self.with_link(link, |_| KeyStock::default())
    }

    /// Closes the store (releases the lock).
    pub async fn close(self) {
        tracing::info!(db = %self.inner.db.display(), "key store closed");
    }
}
