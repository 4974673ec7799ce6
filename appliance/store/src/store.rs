//! The store: accounts, mailboxes and messages over one database and one blob store.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::Row;
use sqlx::any::AnyRow;
use tokio::io::AsyncRead;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::blob::{BlobId, BlobReader, BlobStore, FsBlobStore, StoredBlob};
use crate::db::{self, AnyPool, DbResult, Tx};
use crate::error::{AuthError, StoreError};
use crate::password::{self, PasswordParams};
use crate::types::*;

mod delivery;
mod dump;
mod queue;
mod web;

pub use delivery::{DELIVERY_RECORD_RETENTION, DeliveryProtection, DeliveryState, RecipientDelivery};
pub use dump::{DUMP_TABLES, DumpTable, DumpValue, StoreDump};
pub use queue::{
    DELETED_BY_OPERATOR, NewQueueRecipient, NewQueuedMessage, QueueListing, QueueOutcome, QueuedDelivery,
    QueuedMessage, QueuedRecipient,
};
pub use web::{NewUpload, RefreshOutcome, SentRecord, Upload, WebSettings, WebSettingsUpdate};
/// Settings of a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `sqlite:///var/lib/qutemail/store.sqlite?mode=rwc` (see [`crate::sqlite_url`]) or
    /// `postgres://user@host/db` (`?host=/run/postgresql` for a unix socket).
    pub database_url: String,
    /// Directory of the file-system blob store (used by [`Store::open`]).
    pub blob_dir: PathBuf,
    /// Database connections (default 8).
    pub max_connections: u32,
    /// How long an SQLite write waits for another process's lock (default 10 s).
    pub busy_timeout: Duration,
    /// Blobs without a message row and older than this are deleted by [`Store::open`] (and
    /// [`Store::sweep_orphan_blobs`]). Must exceed the longest append (default 1 h).
    pub orphan_grace: Duration,
    /// argon2id parameters for new password hashes.
    pub password: PasswordParams,
}

impl StoreConfig {
    /// Defaults for `database_url` and `blob_dir`.
    pub fn new(database_url: impl Into<String>, blob_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            database_url: database_url.into(),
            blob_dir: blob_dir.into(),
            max_connections: 8,
            busy_timeout: Duration::from_secs(10),
            orphan_grace: Duration::from_secs(3600),
            password: PasswordParams::default(),
        }
    }

    /// Defaults for an SQLite file and a blob directory.
    pub fn sqlite(db_path: impl AsRef<std::path::Path>, blob_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig::new(db::sqlite_url(db_path.as_ref()), blob_dir)
    }
}

/// The mail store. Cheap to clone (clones share the pool and blob store).
///
/// Every method that changes state is one database transaction; blobs are written (durably)
/// before the transaction that makes them visible, and deleted only after the transaction
/// that made them invisible has committed. Dropping a future half way therefore leaves at
/// worst an orphan blob, which the next sweep removes.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.inner.backend)
            .field("blobs", &self.inner.blobs)
            .finish_non_exhaustive()
    }
}

struct Inner {
    pool: AnyPool,
    backend: Backend,
    blobs: Arc<dyn BlobStore>,
    cfg: StoreConfig,
    /// SQLite only: one writer at a time in this process. SQLite serialises writers anyway;
    /// queueing here is fair and spares the busy-wait of its lock handler.
    writer: Option<Arc<Mutex<()>>>,
    /// A hash of a random password with the current parameters: authentication of an unknown
    /// address verifies against it, so it costs what a known one costs.
    dummy_hash: String,
}

/// A write transaction; for SQLite it also holds the writer lock. Dropped without commit it
/// rolls back (sqlx queues the rollback before the lock is released: `tx` drops first).
struct WriteTx {
    tx: Tx,
    _guard: Option<OwnedMutexGuard<()>>,
}

impl std::ops::Deref for WriteTx {
    type Target = Tx;
    fn deref(&self) -> &Tx {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Tx {
        &mut self.tx
    }
}

pub(crate) fn now_ms() -> i64 {
    ms_of(SystemTime::now())
}

fn ms_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

fn time_of(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

fn int(v: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invalid { what, reason: format!("{v} is too large") })
}

fn u64_of(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} is negative")))
}

fn u32_of(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} is out of range")))
}

fn random_hex() -> Result<String, StoreError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Corrupt(format!("random generator failed: {e}")))?;
    Ok(hex::encode(bytes))
}

fn random_uidvalidity() -> Result<i64, StoreError> {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Corrupt(format!("random generator failed: {e}")))?;
    // Nonzero (RFC 3501) and below 2^31 so that clients storing it signed are safe too.
    Ok(i64::from(u32::from_be_bytes(bytes) % 0x7FFF_FFFF) + 1)
}

/// Lower-cases and checks an address: `local@domain`, ASCII, local part of dot-atom
/// characters (at most 64), domain of LDH labels (at most 253).
pub fn normalize_address(address: &str) -> Result<String, StoreError> {
    let bad =
        |reason: &str| StoreError::Invalid { what: "address", reason: format!("{address:?}: {reason}") };
    let lower = address.trim().to_ascii_lowercase();
    let (local, domain) = lower.rsplit_once('@').ok_or_else(|| bad("no @"))?;
    if local.is_empty() || local.len() > 64 {
        return Err(bad("local part must be 1 to 64 characters"));
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(bad("misplaced dot in the local part"));
    }
    if !local.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b)) {
        return Err(bad("character not allowed in the local part"));
    }
    if domain.is_empty() || domain.len() > 253 {
        return Err(bad("domain must be 1 to 253 characters"));
    }
    for label in domain.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad("malformed domain"));
        }
    }
    Ok(lower)
}

fn check_display_name(name: &str) -> Result<(), StoreError> {
    if name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(StoreError::Invalid {
            what: "display name",
            reason: "at most 200 characters, no control characters".into(),
        });
    }
    Ok(())
}

fn check_password(password: &str) -> Result<(), StoreError> {
    if password.is_empty() || password.len() > 1024 {
        return Err(StoreError::Invalid { what: "password", reason: "must be 1 to 1024 bytes".into() });
    }
    Ok(())
}

/// Normalises a mailbox name: `/`-separated, no empty level, no control characters, at most
/// 1000 bytes; a first level equal to `INBOX` in any case is spelled `INBOX`.
pub fn normalize_mailbox_name(name: &str) -> Result<String, StoreError> {
    let bad =
        |reason: &str| StoreError::Invalid { what: "mailbox name", reason: format!("{name:?}: {reason}") };
    if name.is_empty() || name.len() > 1000 {
        return Err(bad("must be 1 to 1000 bytes"));
    }
    if name.chars().any(|c| c.is_control() || c == '*' || c == '%') {
        return Err(bad("control characters, * and % are not allowed"));
    }
    let mut levels: Vec<&str> = name.split('/').collect();
    if levels.iter().any(|l| l.is_empty()) {
        return Err(bad("empty hierarchy level"));
    }
    if levels[0].eq_ignore_ascii_case("INBOX") {
        levels[0] = "INBOX";
    }
    Ok(levels.join("/"))
}

fn check_keyword(k: &str) -> Result<(), StoreError> {
    let ok = !k.is_empty()
        && k.len() <= 100
        && !k.starts_with('\\')
        && k.bytes().all(|b| b.is_ascii_graphic() && !b"(){%*\"\\]".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid { what: "keyword", reason: format!("{k:?} is not an IMAP atom") })
    }
}

fn keywords_text(keywords: &BTreeSet<String>) -> String {
    keywords.iter().map(String::as_str).collect::<Vec<_>>().join(" ")
}

fn check_protection(p: &Protection) -> Result<(), StoreError> {
    let kind_ok = !p.kind.is_empty()
        && p.kind.len() <= 64
        && p.kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !kind_ok {
        return Err(StoreError::Invalid {
            what: "protection kind",
            reason: format!("{:?}: 1 to 64 characters [a-z0-9._-]", p.kind),
        });
    }
    if p.key_ids.iter().any(|k| k.is_empty() || k.contains(['\n', '\r'])) {
        return Err(StoreError::Invalid { what: "key id", reason: "empty or contains a line break".into() });
    }
    Ok(())
}

const MSG_COLS: &str = "uid, modseq, flags, keywords, internal_date, size, unique_id, blob_id, blob_len, \
                        protection, wrapped_key, key_ids, certificate, summary";
const MAILBOX_COLS: &str =
    "id, account_id, name, special_use, uidvalidity, uidnext, highestmodseq, subscribed";
const ACCOUNT_COLS: &str = "id, address, display_name, disabled, quota_bytes, used_bytes, created_at";

/// The mailboxes every account gets, with their RFC 6154 attributes.
pub const DEFAULT_MAILBOXES: [(&str, Option<SpecialUse>); 5] = [
    ("INBOX", None),
    ("Sent", Some(SpecialUse::Sent)),
    ("Drafts", Some(SpecialUse::Drafts)),
    ("Trash", Some(SpecialUse::Trash)),
    ("Junk", Some(SpecialUse::Junk)),
];

fn message_of(row: &AnyRow) -> Result<MessageMeta, StoreError> {
    let d = |e: sqlx::Error| StoreError::Corrupt(format!("message row: {e}"));
    let keywords: String = row.try_get("keywords").map_err(d)?;
    let key_ids: String = row.try_get("key_ids").map_err(d)?;
    let blob_id: String = row.try_get("blob_id").map_err(d)?;
    Ok(MessageMeta {
        uid: u32_of(row.try_get("uid").map_err(d)?, "uid")?,
        modseq: u64_of(row.try_get("modseq").map_err(d)?, "modseq")?,
        flags: Flags::from_bits(row.try_get("flags").map_err(d)?),
        keywords: keywords.split_whitespace().map(str::to_owned).collect(),
        internal_date: time_of(row.try_get("internal_date").map_err(d)?),
        size: u64_of(row.try_get("size").map_err(d)?, "size")?,
        unique_id: row.try_get("unique_id").map_err(d)?,
        blob_id: BlobId::parse(&blob_id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        blob_len: u64_of(row.try_get("blob_len").map_err(d)?, "blob length")?,
        protection: Protection {
            kind: row.try_get("protection").map_err(d)?,
            wrapped_key: row.try_get("wrapped_key").map_err(d)?,
            key_ids: if key_ids.is_empty() {
                Vec::new()
            } else {
                key_ids.split('\n').map(str::to_owned).collect()
            },
            certificate: row.try_get("certificate").map_err(d)?,
        },
        summary: row.try_get("summary").map_err(d)?,
    })
}

fn mailbox_of(row: &AnyRow) -> Result<Mailbox, StoreError> {
    let d = |e: sqlx::Error| StoreError::Corrupt(format!("mailbox row: {e}"));
    let special: Option<String> = row.try_get("special_use").map_err(d)?;
    let subscribed: i64 = row.try_get("subscribed").map_err(d)?;
    Ok(Mailbox {
        id: MailboxId(row.try_get("id").map_err(d)?),
        account_id: AccountId(row.try_get("account_id").map_err(d)?),
        name: row.try_get("name").map_err(d)?,
        special_use: special.as_deref().and_then(SpecialUse::from_imap),
        uidvalidity: u32_of(row.try_get("uidvalidity").map_err(d)?, "uidvalidity")?,
        uidnext: u32_of(row.try_get::<i64, _>("uidnext").map_err(d)?.min(i64::from(u32::MAX)), "uidnext")?,
        highestmodseq: u64_of(row.try_get("highestmodseq").map_err(d)?, "highestmodseq")?,
        subscribed: subscribed != 0,
    })
}

fn account_of(row: &AnyRow) -> Result<Account, StoreError> {
    let d = |e: sqlx::Error| StoreError::Corrupt(format!("account row: {e}"));
    let disabled: i64 = row.try_get("disabled").map_err(d)?;
    let quota: Option<i64> = row.try_get("quota_bytes").map_err(d)?;
    Ok(Account {
        id: AccountId(row.try_get("id").map_err(d)?),
        address: row.try_get("address").map_err(d)?,
        display_name: row.try_get("display_name").map_err(d)?,
        disabled: disabled != 0,
        quota_bytes: quota.map(|q| u64_of(q, "quota")).transpose()?,
        used_bytes: u64_of(row.try_get("used_bytes").map_err(d)?, "used bytes")?,
        created_at: time_of(row.try_get("created_at").map_err(d)?),
    })
}

fn flag_state_of(row: &AnyRow) -> Result<(i64, FlagState), StoreError> {
    let d = |e: sqlx::Error| StoreError::Corrupt(format!("message row: {e}"));
    let keywords: String = row.try_get("keywords").map_err(d)?;
    Ok((
        row.try_get("id").map_err(d)?,
        FlagState {
            uid: u32_of(row.try_get("uid").map_err(d)?, "uid")?,
            modseq: u64_of(row.try_get("modseq").map_err(d)?, "modseq")?,
            flags: Flags::from_bits(row.try_get("flags").map_err(d)?),
            keywords: keywords.split_whitespace().map(str::to_owned).collect(),
        },
    ))
}

/// A message row as needed by copy, move and expunge.
struct RowRef {
    row_id: i64,
    uid: u32,
    size: i64,
    blob_id: BlobId,
}

fn row_ref_of(row: &AnyRow) -> Result<RowRef, StoreError> {
    let d = |e: sqlx::Error| StoreError::Corrupt(format!("message row: {e}"));
    let blob_id: String = row.try_get("blob_id").map_err(d)?;
    Ok(RowRef {
        row_id: row.try_get("id").map_err(d)?,
        uid: u32_of(row.try_get("uid").map_err(d)?, "uid")?,
        size: row.try_get("size").map_err(d)?,
        blob_id: BlobId::parse(&blob_id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
    })
}

/// SQL bounds for a UID set (`uid BETWEEN lo AND hi`); the exact set is applied in Rust.
fn uid_bounds(set: &NumberSet) -> (i64, i64) {
    set.bounds().map(|(lo, hi)| (i64::from(lo), i64::from(hi))).unwrap_or((1, 0))
}

impl Store {
    /// Opens the store with a file-system blob store in `cfg.blob_dir`: connects, applies
    /// pending migrations, and sweeps orphan blobs older than `cfg.orphan_grace`.
    pub async fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        let blobs = FsBlobStore::open(cfg.blob_dir.clone()).await?;
        Store::open_with_blobs(cfg, Arc::new(blobs)).await
    }

    /// Like [`Store::open`] with another [`BlobStore`].
    pub async fn open_with_blobs(cfg: StoreConfig, blobs: Arc<dyn BlobStore>) -> Result<Store, StoreError> {
        let backend = Backend::from_url(&cfg.database_url)?;
        let pool = db::connect(&cfg.database_url, backend, cfg.max_connections, cfg.busy_timeout).await?;
        db::migrate(&pool, backend).await?;
        let dummy = random_hex()?;
        let dummy_hash = password::hash_blocking(cfg.password, &dummy).await?;
        let store = Store {
            inner: Arc::new(Inner {
                pool,
                backend,
                blobs,
                writer: (backend == Backend::Sqlite).then(|| Arc::new(Mutex::new(()))),
                cfg,
                dummy_hash,
            }),
        };
        let removed = store.sweep_orphan_blobs().await?;
        if removed > 0 {
            tracing::info!(removed, "orphan blobs removed (left by interrupted appends or deletions)");
        }
        Ok(store)
    }

    /// Which database this store runs on.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The blob store.
    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.inner.blobs
    }

    /// Closes the database connections.
    pub async fn close(&self) {
        self.inner.pool.close().await;
    }

    fn b(&self) -> Backend {
        self.inner.backend
    }

    async fn write(&self) -> Result<WriteTx, StoreError> {
        let guard = match &self.inner.writer {
            Some(m) => Some(m.clone().lock_owned().await),
            None => None,
        };
        let tx = self.inner.pool.begin_with(self.b().begin_write()).await.db(self.b())?;
        Ok(WriteTx { tx, _guard: guard })
    }

    async fn commit(&self, tx: WriteTx) -> Result<(), StoreError> {
        let WriteTx { tx, _guard } = tx;
        tx.commit().await.db(self.b())
    }

    /// Deletes blob files of rows that are gone (after their deletion committed). A failure
    /// only leaves orphans for the next sweep, so it is logged, not returned.
    async fn drop_blobs(&self, ids: &[BlobId]) {
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.inner.blobs.delete(ids).await {
            tracing::warn!(error = %e, count = ids.len(), "deleting blobs failed; the orphan sweep retries");
        }
    }

    /// Deletes blobs older than the configured grace period that no message row references.
    /// Returns how many were deleted. [`Store::open`] runs it; a daily timer may too.
    pub async fn sweep_orphan_blobs(&self) -> Result<usize, StoreError> {
        let candidates = self.inner.blobs.list_older_than(self.inner.cfg.orphan_grace).await?;
        let mut orphans = Vec::new();
        for chunk in candidates.chunks(200) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let list = placeholders.join(", ");
            // Queued messages hold blobs too.
            let sql = format!(
                "SELECT blob_id FROM messages WHERE blob_id IN ({list}) \
                 UNION SELECT blob_id FROM queue_messages WHERE blob_id IN ({list})"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(id.as_str().to_owned());
            }
            let rows = q.fetch_all(&self.inner.pool).await.db(self.b())?;
            let referenced: HashSet<String> =
                rows.iter().filter_map(|r| r.try_get::<String, _>("blob_id").ok()).collect();
            orphans.extend(chunk.iter().filter(|id| !referenced.contains(id.as_str())).cloned());
        }
        self.inner.blobs.delete(&orphans).await?;
        Ok(orphans.len())
    }

    // ----------------------------------------------------------------------------------------
    // Accounts
    // ----------------------------------------------------------------------------------------

    /// Creates an account together with its INBOX, Sent, Drafts, Trash and Junk mailboxes
    /// (one transaction: all or nothing).
    pub async fn create_account(&self, new: NewAccount<'_>) -> Result<Account, StoreError> {
        let address = normalize_address(new.address)?;
        check_display_name(new.display_name)?;
        check_password(new.password)?;
        let quota = new.quota_bytes.map(|q| int(q, "quota")).transpose()?;
        let hash = password::hash_blocking(self.inner.cfg.password, new.password).await?;
        let now = now_ms();
        let mut tx = self.write().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM accounts WHERE address = $1")
            .bind(&address)
            .fetch_optional(&mut **tx)
            .await
            .db(self.b())?;
        if exists.is_some() {
            return Err(StoreError::AccountExists(address));
        }
        let sql = format!(
            "INSERT INTO accounts (address, display_name, password_hash, disabled, quota_bytes, used_bytes, \
             created_at) VALUES ($1, $2, $3, 0, $4, 0, $5) RETURNING {ACCOUNT_COLS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&address)
            .bind(new.display_name)
            .bind(hash)
            .bind(quota)
            .bind(now)
            .fetch_one(&mut **tx)
            .await
            .db(self.b())?;
        let account = account_of(&row)?;
        for (name, special) in DEFAULT_MAILBOXES {
            self.insert_mailbox(&mut tx, account.id, name, special).await?;
        }
        self.commit(tx).await?;
        tracing::info!(account = %account.address, "account created");
        Ok(account)
    }

    async fn insert_mailbox(
        &self,
        tx: &mut WriteTx,
        account: AccountId,
        name: &str,
        special: Option<SpecialUse>,
    ) -> Result<Mailbox, StoreError> {
        let sql = format!(
            "INSERT INTO mailboxes (account_id, name, special_use, uidvalidity, uidnext, highestmodseq, \
             subscribed, created_at) VALUES ($1, $2, $3, $4, 1, 1, 1, $5) RETURNING {MAILBOX_COLS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(account.0)
            .bind(name)
            .bind(special.map(|s| s.as_imap()))
            .bind(random_uidvalidity()?)
            .bind(now_ms())
            .fetch_one(&mut ***tx)
            .await
            .db(self.b())?;
        mailbox_of(&row)
    }

    /// The account with this address (case-insensitive).
    pub async fn account(&self, address: &str) -> Result<Account, StoreError> {
        let address = normalize_address(address)?;
        let sql = format!("SELECT {ACCOUNT_COLS} FROM accounts WHERE address = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&address)
            .fetch_optional(&self.inner.pool)
            .await
            .db(self.b())?
            .ok_or(StoreError::NoSuchAccount(address))?;
        account_of(&row)
    }

    /// Every account, by address.
    pub async fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        let sql = format!("SELECT {ACCOUNT_COLS} FROM accounts ORDER BY address");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.inner.pool).await.db(self.b())?;
        rows.iter().map(account_of).collect()
    }

    /// Checks a password. Unknown address, wrong password and disabled account all give
    /// [`AuthError::Rejected`] after one argon2id verification each (an unknown address is
    /// verified against a dummy hash), so neither the answer nor its timing tells which
    /// addresses exist. (The dummy hash uses the current [`PasswordParams`]; hashes stored
    /// under other parameters cost accordingly until their passwords are next set.)
    pub async fn authenticate(&self, address: &str, password: &str) -> Result<Account, AuthError> {
        let found = match normalize_address(address) {
            Ok(address) => {
                let sql = format!("SELECT {ACCOUNT_COLS}, password_hash FROM accounts WHERE address = $1");
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(&address)
                    .fetch_optional(&self.inner.pool)
                    .await
                    .db(self.b())?
            }
            Err(_) => None,
        };
        let (account, hash) = match &found {
            Some(row) => {
                let hash: String = row
                    .try_get("password_hash")
                    .map_err(|e| StoreError::Corrupt(format!("account row: {e}")))?;
                (Some(account_of(row)?), hash)
            }
            None => (None, self.inner.dummy_hash.clone()),
        };
        let matches = password::verify_blocking(hash, password).await?;
        match account {
            Some(account) if matches && !account.disabled => Ok(account),
            Some(account) => {
                tracing::debug!(account = %account.address, disabled = account.disabled, "authentication refused");
                Err(AuthError::Rejected)
            }
            None => {
                tracing::debug!("authentication refused for an unknown address");
                Err(AuthError::Rejected)
            }
        }
    }

    /// Replaces the password (hashed with the current parameters).
    pub async fn set_password(&self, address: &str, password: &str) -> Result<(), StoreError> {
        let address = normalize_address(address)?;
        check_password(password)?;
        let hash = password::hash_blocking(self.inner.cfg.password, password).await?;
        self.update_account(
            address,
            sqlx::query("UPDATE accounts SET password_hash = $1 WHERE address = $2").bind(hash),
        )
        .await
    }

    /// Disables or re-enables an account.
    pub async fn set_disabled(&self, address: &str, disabled: bool) -> Result<(), StoreError> {
        let address = normalize_address(address)?;
        self.update_account(
            address,
            sqlx::query("UPDATE accounts SET disabled = $1 WHERE address = $2").bind(i64::from(disabled)),
        )
        .await
    }

    /// Sets the quota (`None`: unlimited). Existing mail is kept even if above it.
    pub async fn set_quota(&self, address: &str, quota_bytes: Option<u64>) -> Result<(), StoreError> {
        let address = normalize_address(address)?;
        let quota = quota_bytes.map(|q| int(q, "quota")).transpose()?;
        self.update_account(
            address,
            sqlx::query("UPDATE accounts SET quota_bytes = $1 WHERE address = $2").bind(quota),
        )
        .await
    }

    /// Runs `update` (one account column as `$1`) on the account `address` (bound as `$2`);
    /// an address with no account is [`StoreError::NoSuchAccount`].
    async fn update_account(
        &self,
        address: String,
        update: sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let n = update.bind(address.clone()).execute(&mut **tx).await.db(self.b())?.rows_affected();
        if n == 0 {
            return Err(StoreError::NoSuchAccount(address));
        }
        self.commit(tx).await
    }

    /// Deletes an account with its mailboxes and messages, then their blobs.
    pub async fn delete_account(&self, address: &str) -> Result<(), StoreError> {
        let address = normalize_address(address)?;
        let mut tx = self.write().await?;
        let id: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM accounts WHERE address = $1{}",
            self.b().for_update()
        )))
        .bind(&address)
        .fetch_optional(&mut **tx)
        .await
        .db(self.b())?;
        let Some(id) = id else { return Err(StoreError::NoSuchAccount(address)) };
        let blob_ids: Vec<String> = sqlx::query_scalar(
            "SELECT m.blob_id FROM messages m JOIN mailboxes b ON m.mailbox_id = b.id WHERE b.account_id = $1",
        )
        .bind(id)
        .fetch_all(&mut **tx)
        .await
        .db(self.b())?;
        sqlx::query("DELETE FROM accounts WHERE id = $1").bind(id).execute(&mut **tx).await.db(self.b())?;
        self.commit(tx).await?;
        let ids: Vec<BlobId> = blob_ids.iter().filter_map(|s| BlobId::parse(s).ok()).collect();
        self.drop_blobs(&ids).await;
        tracing::info!(account = %address, messages = ids.len(), "account deleted");
        Ok(())
    }

    // ----------------------------------------------------------------------------------------
    // Mailboxes
    // ----------------------------------------------------------------------------------------

    /// The account's mailboxes, by name.
    pub async fn list_mailboxes(&self, account: AccountId) -> Result<Vec<Mailbox>, StoreError> {
        let sql = format!("SELECT {MAILBOX_COLS} FROM mailboxes WHERE account_id = $1 ORDER BY name");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(account.0)
            .fetch_all(&self.inner.pool)
            .await
            .db(self.b())?;
        rows.iter().map(mailbox_of).collect()
    }

    /// The account's mailbox with this name.
    pub async fn mailbox(&self, account: AccountId, name: &str) -> Result<Mailbox, StoreError> {
        let name = normalize_mailbox_name(name)?;
        let sql = format!("SELECT {MAILBOX_COLS} FROM mailboxes WHERE account_id = $1 AND name = $2");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(account.0)
            .bind(&name)
            .fetch_optional(&self.inner.pool)
            .await
            .db(self.b())?
            .ok_or(StoreError::NoSuchMailbox(name))?;
        mailbox_of(&row)
    }

    async fn mailbox_by_id(&self, id: MailboxId) -> Result<Mailbox, StoreError> {
        let sql = format!("SELECT {MAILBOX_COLS} FROM mailboxes WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.inner.pool)
            .await
            .db(self.b())?
            .ok_or_else(|| StoreError::NoSuchMailbox(format!("#{}", id.0)))?;
        mailbox_of(&row)
    }

    /// Locks a mailbox row for the rest of the transaction (PostgreSQL) and reads it.
    async fn lock_mailbox(&self, tx: &mut WriteTx, id: MailboxId) -> Result<Mailbox, StoreError> {
        let sql = format!("SELECT {MAILBOX_COLS} FROM mailboxes WHERE id = $1{}", self.b().for_update());
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&mut ***tx)
            .await
            .db(self.b())?
            .ok_or_else(|| StoreError::NoSuchMailbox(format!("#{}", id.0)))?;
        mailbox_of(&row)
    }

    /// Takes the next MODSEQ of a locked mailbox.
    async fn bump_modseq(&self, tx: &mut WriteTx, id: MailboxId) -> Result<u64, StoreError> {
        let m: i64 = sqlx::query_scalar(
            "UPDATE mailboxes SET highestmodseq = highestmodseq + 1 WHERE id = $1 RETURNING highestmodseq",
        )
        .bind(id.0)
        .fetch_one(&mut ***tx)
        .await
        .db(self.b())?;
        u64_of(m, "highestmodseq")
    }

    /// Creates a mailbox (subscribed). Parents need not exist (IMAP allows gaps).
    pub async fn create_mailbox(&self, account: AccountId, name: &str) -> Result<Mailbox, StoreError> {
        let name = normalize_mailbox_name(name)?;
        let mut tx = self.write().await?;
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT id FROM mailboxes WHERE account_id = $1 AND name = $2")
                .bind(account.0)
                .bind(&name)
                .fetch_optional(&mut **tx)
                .await
                .db(self.b())?;
        if exists.is_some() {
            return Err(StoreError::MailboxExists(name));
        }
        let mailbox = self.insert_mailbox(&mut tx, account, &name, None).await?;
        self.commit(tx).await?;
        Ok(mailbox)
    }

    /// Renames a mailbox and its inferiors (`a` → `b` also renames `a/x` to `b/x`), keeping
    /// their ids, UIDVALIDITY, UIDs and messages (RFC 3501). Renaming INBOX (which RFC 3501
    /// defines as moving its messages into a new mailbox) is refused here with
    /// [`StoreError::InboxProtected`]; IMAP answers NO.
    pub async fn rename_mailbox(&self, account: AccountId, from: &str, to: &str) -> Result<(), StoreError> {
        let from = normalize_mailbox_name(from)?;
        let to = normalize_mailbox_name(to)?;
        if from == "INBOX" || to == "INBOX" || to.starts_with(&format!("{from}/")) {
            return Err(if from == "INBOX" || to == "INBOX" {
                StoreError::InboxProtected("renamed")
            } else {
                StoreError::Invalid {
                    what: "mailbox name",
                    reason: format!("cannot move {from:?} below itself"),
                }
            });
        }
        let mut tx = self.write().await?;
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT id FROM mailboxes WHERE account_id = $1 AND name = $2")
                .bind(account.0)
                .bind(&to)
                .fetch_optional(&mut **tx)
                .await
                .db(self.b())?;
        if exists.is_some() {
            return Err(StoreError::MailboxExists(to));
        }
        let n = sqlx::query("UPDATE mailboxes SET name = $1 WHERE account_id = $2 AND name = $3")
            .bind(&to)
            .bind(account.0)
            .bind(&from)
            .execute(&mut **tx)
            .await
            .db(self.b())?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NoSuchMailbox(from));
        }
        // Inferiors: compare the prefix with substr (not LIKE: names may contain % and _).
        let prefix = format!("{from}/");
        let prefix_len = i64::try_from(prefix.chars().count()).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE mailboxes SET name = $1 || substr(name, CAST($2 AS INTEGER)) \
             WHERE account_id = $3 AND substr(name, 1, CAST($4 AS INTEGER)) = $5",
        )
        .bind(format!("{to}/"))
        .bind(prefix_len + 1)
        .bind(account.0)
        .bind(prefix_len)
        .bind(&prefix)
        .execute(&mut **tx)
        .await
        .db(self.b())?;
        self.commit(tx).await
    }

    /// Deletes a mailbox with its messages (then their blobs). Inferior mailboxes are kept
    /// (their names simply have no existing parent). INBOX cannot be deleted (RFC 3501).
    pub async fn delete_mailbox(&self, account: AccountId, name: &str) -> Result<(), StoreError> {
        let name = normalize_mailbox_name(name)?;
        if name == "INBOX" {
            return Err(StoreError::InboxProtected("deleted"));
        }
        let mut tx = self.write().await?;
        self.lock_account(&mut tx, account).await?;
        let id: Option<i64> =
            sqlx::query_scalar("SELECT id FROM mailboxes WHERE account_id = $1 AND name = $2")
                .bind(account.0)
                .bind(&name)
                .fetch_optional(&mut **tx)
                .await
                .db(self.b())?;
        let Some(id) = id else { return Err(StoreError::NoSuchMailbox(name)) };
        self.lock_mailbox(&mut tx, MailboxId(id)).await?;
        let rows = sqlx::query("SELECT id, uid, size, blob_id FROM messages WHERE mailbox_id = $1")
            .bind(id)
            .fetch_all(&mut **tx)
            .await
            .db(self.b())?;
        let refs: Vec<RowRef> = rows.iter().map(row_ref_of).collect::<Result<_, _>>()?;
        let freed: i64 = refs.iter().map(|r| r.size).sum();
        sqlx::query("DELETE FROM mailboxes WHERE id = $1").bind(id).execute(&mut **tx).await.db(self.b())?;
        self.release_quota(&mut tx, account, freed).await?;
        self.commit(tx).await?;
        let ids: Vec<BlobId> = refs.into_iter().map(|r| r.blob_id).collect();
        self.drop_blobs(&ids).await;
        Ok(())
    }

    /// Subscribes or unsubscribes a mailbox.
    pub async fn set_subscribed(&self, mailbox: MailboxId, subscribed: bool) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let n = sqlx::query("UPDATE mailboxes SET subscribed = $1 WHERE id = $2")
            .bind(i64::from(subscribed))
            .bind(mailbox.0)
            .execute(&mut **tx)
            .await
            .db(self.b())?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::NoSuchMailbox(format!("#{}", mailbox.0)));
        }
        self.commit(tx).await
    }

    /// STATUS of a mailbox (one consistent snapshot).
    pub async fn status(&self, mailbox: MailboxId) -> Result<MailboxStatus, StoreError> {
        let row = sqlx::query(
            "SELECT b.uidnext, b.uidvalidity, b.highestmodseq, \
             (SELECT COUNT(*) FROM messages m WHERE m.mailbox_id = b.id) AS messages, \
             (SELECT COUNT(*) FROM messages m WHERE m.mailbox_id = b.id AND (m.flags & 1) = 0) AS unseen, \
             (SELECT CAST(COALESCE(SUM(m.size), 0) AS BIGINT) FROM messages m WHERE m.mailbox_id = b.id) AS total \
             FROM mailboxes b WHERE b.id = $1",
        )
        .bind(mailbox.0)
        .fetch_optional(&self.inner.pool)
        .await
        .db(self.b())?
        .ok_or_else(|| StoreError::NoSuchMailbox(format!("#{}", mailbox.0)))?;
        let d = |e: sqlx::Error| StoreError::Corrupt(format!("mailbox status: {e}"));
        Ok(MailboxStatus {
            messages: u32_of(row.try_get("messages").map_err(d)?, "message count")?,
            unseen: u32_of(row.try_get("unseen").map_err(d)?, "unseen count")?,
            uidnext: u32_of(
                row.try_get::<i64, _>("uidnext").map_err(d)?.min(i64::from(u32::MAX)),
                "uidnext",
            )?,
            uidvalidity: u32_of(row.try_get("uidvalidity").map_err(d)?, "uidvalidity")?,
            highestmodseq: u64_of(row.try_get("highestmodseq").map_err(d)?, "highestmodseq")?,
            total_size: u64_of(row.try_get("total").map_err(d)?, "total size")?,
        })
    }

    // ----------------------------------------------------------------------------------------
    // Messages
    // ----------------------------------------------------------------------------------------

    /// Locks the account row (PostgreSQL). Every transaction that changes an account's usage
    /// takes the account first, then mailboxes in id order: no lock-order deadlocks.
    async fn lock_account(&self, tx: &mut WriteTx, account: AccountId) -> Result<(), StoreError> {
        let sql = format!("SELECT id FROM accounts WHERE id = $1{}", self.b().for_update());
        let found: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(account.0)
            .fetch_optional(&mut ***tx)
            .await
            .db(self.b())?;
        found.map(|_| ()).ok_or_else(|| StoreError::NoSuchAccount(format!("#{}", account.0)))
    }

    /// Charges `bytes` to the account's usage, refusing beyond its quota.
    async fn charge_quota(&self, tx: &mut WriteTx, account: AccountId, bytes: i64) -> Result<(), StoreError> {
        let charged: Option<i64> = sqlx::query_scalar(
            "UPDATE accounts SET used_bytes = used_bytes + $1 \
             WHERE id = $2 AND (quota_bytes IS NULL OR used_bytes + $1 <= quota_bytes) RETURNING used_bytes",
        )
        .bind(bytes)
        .bind(account.0)
        .fetch_optional(&mut ***tx)
        .await
        .db(self.b())?;
        if charged.is_some() {
            return Ok(());
        }
        let row = sqlx::query("SELECT used_bytes, quota_bytes FROM accounts WHERE id = $1")
            .bind(account.0)
            .fetch_optional(&mut ***tx)
            .await
            .db(self.b())?
            .ok_or_else(|| StoreError::NoSuchAccount(format!("#{}", account.0)))?;
        let used: i64 = row.try_get("used_bytes").map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let quota: Option<i64> =
            row.try_get("quota_bytes").map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Err(StoreError::QuotaExceeded {
            used: u64::try_from(used).unwrap_or(0),
            quota: quota.and_then(|q| u64::try_from(q).ok()).unwrap_or(0),
            requested: u64::try_from(bytes).unwrap_or(0),
        })
    }

    async fn release_quota(
        &self,
        tx: &mut WriteTx,
        account: AccountId,
        bytes: i64,
    ) -> Result<(), StoreError> {
        if bytes == 0 {
            return Ok(());
        }
        sqlx::query("UPDATE accounts SET used_bytes = used_bytes - $1 WHERE id = $2")
            .bind(bytes)
            .bind(account.0)
            .execute(&mut ***tx)
            .await
            .db(self.b())?;
        Ok(())
    }

    /// Stores a message: streams `sealed` into a new blob (durable), then commits its row with
    /// the next UID and MODSEQ of the mailbox. When this returns `Ok` the message survives a
    /// crash; if it fails or the future is dropped, no message is visible.
    pub async fn append(
        &self,
        mailbox: MailboxId,
        message: &NewMessage,
        sealed: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<Appended, StoreError> {
        self.append_once(mailbox, message, None, sealed).await?.ok_or_else(|| {
            StoreError::Corrupt("an append without a delivery id was taken for a repeat".into())
        })
    }

    /// Appends a sealed message from a peer site once per account and `delivery`: `None` when
    /// the account already received this delivery (within [`PEER_DELIVERY_WINDOW`]), and then
    /// nothing is stored. The check and the append are one transaction, so a crash between
    /// them cannot leave the message stored but unrecorded (or the reverse).
    pub async fn append_peer_delivery(
        &self,
        mailbox: MailboxId,
        message: &NewMessage,
        delivery: &PeerDeliveryId,
        sealed: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<Option<Appended>, StoreError> {
        self.append_once(mailbox, message, Some(delivery), sealed).await
    }

    async fn append_once(
        &self,
        mailbox: MailboxId,
        message: &NewMessage,
        delivery: Option<&PeerDeliveryId>,
        sealed: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<Option<Appended>, StoreError> {
        let mut keywords = BTreeSet::new();
        for k in &message.keywords {
            check_keyword(k)?;
            keywords.insert(k.clone());
        }
        check_protection(&message.protection)?;
        let size = int(message.size, "message size")?;
        let target = self.mailbox_by_id(mailbox).await?;
        let blob = self.inner.blobs.put(sealed).await?;
        let result = self.append_row(&target, message, &keywords, size, &blob, delivery).await;
        if !matches!(result, Ok(Some(_))) {
            self.drop_blobs(std::slice::from_ref(&blob.id)).await;
        }
        result
    }

    async fn append_row(
        &self,
        target: &Mailbox,
        message: &NewMessage,
        keywords: &BTreeSet<String>,
        size: i64,
        blob: &StoredBlob,
        delivery: Option<&PeerDeliveryId>,
    ) -> Result<Option<Appended>, StoreError> {
        let unique_id = random_hex()?;
        let mut tx = self.write().await?;
        if let Some(delivery) = delivery {
            let now = now_ms();
            let window = i64::try_from(PEER_DELIVERY_WINDOW.as_millis()).unwrap_or(i64::MAX);
            sqlx::query("DELETE FROM peer_deliveries WHERE received_at < $1")
                .bind(now.saturating_sub(window))
                .execute(&mut **tx)
                .await
                .db(self.b())?;
            let recorded = sqlx::query(
                "INSERT INTO peer_deliveries (account_id, delivery, received_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (account_id, delivery) DO NOTHING",
            )
            .bind(target.account_id.0)
            .bind(&delivery.0[..])
            .bind(now)
            .execute(&mut **tx)
            .await
            .db(self.b())?;
            if recorded.rows_affected() == 0 {
                // Dropping the transaction rolls it back: nothing of this repeat is kept.
                return Ok(None);
            }
        }
        self.charge_quota(&mut tx, target.account_id, size).await?;
        // One statement allocates the UID and the MODSEQ: the row lock (PostgreSQL) or the
        // write lock (SQLite) makes it atomic under concurrent appends.
        let row = sqlx::query(
            "UPDATE mailboxes SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1 \
             WHERE id = $1 RETURNING uidnext - 1 AS uid, highestmodseq, uidvalidity, name",
        )
        .bind(target.id.0)
        .fetch_optional(&mut **tx)
        .await
        .db(self.b())?
        .ok_or_else(|| StoreError::NoSuchMailbox(target.name.clone()))?;
        let d = |e: sqlx::Error| StoreError::Corrupt(format!("mailbox row: {e}"));
        let uid: i64 = row.try_get("uid").map_err(d)?;
        let modseq: i64 = row.try_get("highestmodseq").map_err(d)?;
        let uidvalidity: i64 = row.try_get("uidvalidity").map_err(d)?;
        if uid >= i64::from(u32::MAX) {
            return Err(StoreError::UidsExhausted(target.name.clone()));
        }
        self.insert_message(&mut tx, target.id, uid, modseq, message, keywords, size, &unique_id, blob)
            .await?;
        self.commit(tx).await?;
        Ok(Some(Appended {
            uid: u32_of(uid, "uid")?,
            modseq: u64_of(modseq, "modseq")?,
            uidvalidity: u32_of(uidvalidity, "uidvalidity")?,
            unique_id,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert_message(
        &self,
        tx: &mut WriteTx,
        mailbox: MailboxId,
        uid: i64,
        modseq: i64,
        message: &NewMessage,
        keywords: &BTreeSet<String>,
        size: i64,
        unique_id: &str,
        blob: &StoredBlob,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO messages (mailbox_id, uid, modseq, flags, keywords, internal_date, size, unique_id, \
             blob_id, blob_len, protection, wrapped_key, key_ids, certificate, summary) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(mailbox.0)
        .bind(uid)
        .bind(modseq)
        .bind(message.flags.bits())
        .bind(keywords_text(keywords))
        .bind(ms_of(message.internal_date))
        .bind(size)
        .bind(unique_id)
        .bind(blob.id.as_str())
        .bind(int(blob.len, "blob length")?)
        .bind(&message.protection.kind)
        .bind(&message.protection.wrapped_key)
        .bind(message.protection.key_ids.join("\n"))
        .bind(message.protection.certificate.as_deref())
        .bind(message.summary.as_deref())
        .execute(&mut ***tx)
        .await
        .db(self.b())?;
        Ok(())
    }

    /// UIDs of the mailbox in ascending order (the sequence-number map).
    pub async fn uids(&self, mailbox: MailboxId) -> Result<Vec<u32>, StoreError> {
        let rows: Vec<i64> =
            sqlx::query_scalar("SELECT uid FROM messages WHERE mailbox_id = $1 ORDER BY uid")
                .bind(mailbox.0)
                .fetch_all(&self.inner.pool)
                .await
                .db(self.b())?;
        rows.into_iter().map(|u| u32_of(u, "uid")).collect()
    }

    /// Turns a selection into a UID set (sequence numbers resolved against [`Store::uids`]).
    pub async fn resolve(&self, mailbox: MailboxId, selection: &Selection) -> Result<NumberSet, StoreError> {
        match selection {
            Selection::All => Ok(NumberSet::all()),
            Selection::Uids(set) if set.ranges().iter().any(|r| *r.end() == u32::MAX) => {
                // `*` is the highest UID in use, so `559:*` includes the last message even when
                // 559 is above it (RFC 3501 6.4.8).
                let max: Option<i64> =
                    sqlx::query_scalar("SELECT MAX(uid) FROM messages WHERE mailbox_id = $1")
                        .bind(mailbox.0)
                        .fetch_one(&self.inner.pool)
                        .await
                        .db(self.b())?;
                let Some(max) = max else { return Ok(NumberSet::new()) };
                let max = u32_of(max, "uid")?;
                let mut out = NumberSet::new();
                for r in set.ranges() {
                    let star = |n: u32| if n == u32::MAX { max } else { n };
                    out.push(star(*r.start())..=star(*r.end()));
                }
                Ok(out)
            }
            Selection::Uids(set) => Ok(set.clone()),
            Selection::Sequence(seqs) => {
                let uids = self.uids(mailbox).await?;
                let last = u32::try_from(uids.len()).unwrap_or(u32::MAX);
                let mut out = NumberSet::new();
                for (i, uid) in uids.iter().enumerate() {
                    let seq = u32::try_from(i + 1).unwrap_or(u32::MAX);
                    // `*` is the last message (RFC 3501).
                    let hit = seqs.ranges().iter().any(|r| {
                        let hi = if *r.end() == u32::MAX { last } else { *r.end() };
                        let lo = if *r.start() == u32::MAX { last } else { *r.start() };
                        (lo.min(hi)..=lo.max(hi)).contains(&seq)
                    });
                    if hit {
                        out.push(*uid..=*uid);
                    }
                }
                Ok(out)
            }
        }
    }

    /// Metadata of the selected messages, in UID order.
    pub async fn fetch(
        &self,
        mailbox: MailboxId,
        selection: &Selection,
    ) -> Result<Vec<MessageMeta>, StoreError> {
        let set = self.resolve(mailbox, selection).await?;
        if set.is_empty() {
            return Ok(Vec::new());
        }
        let (lo, hi) = uid_bounds(&set);
        let sql = format!(
            "SELECT {MSG_COLS} FROM messages WHERE mailbox_id = $1 AND uid BETWEEN $2 AND $3 ORDER BY uid"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(mailbox.0)
            .bind(lo)
            .bind(hi)
            .fetch_all(&self.inner.pool)
            .await
            .db(self.b())?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let m = message_of(row)?;
            if set.contains(m.uid) {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// One message by UID, if present.
    pub async fn message(&self, mailbox: MailboxId, uid: u32) -> Result<Option<MessageMeta>, StoreError> {
        Ok(self.fetch(mailbox, &Selection::Uids(NumberSet::range(uid..=uid))).await?.pop())
    }

    /// A message by its unique id (POP3 UIDL), wherever it is.
    pub async fn message_by_unique_id(
        &self,
        unique_id: &str,
    ) -> Result<Option<(MailboxId, MessageMeta)>, StoreError> {
        let sql = format!("SELECT mailbox_id, {MSG_COLS} FROM messages WHERE unique_id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(unique_id)
            .fetch_optional(&self.inner.pool)
            .await
            .db(self.b())?;
        match row {
            Some(row) => {
                let mb: i64 = row.try_get("mailbox_id").map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(Some((MailboxId(mb), message_of(&row)?)))
            }
            None => Ok(None),
        }
    }

    /// Opens a message's sealed bytes for streaming reading.
    pub async fn read_blob(&self, message: &MessageMeta) -> Result<BlobReader, StoreError> {
        Ok(self.inner.blobs.get(&message.blob_id).await?)
    }

    /// Changes flags of the selected messages (IMAP STORE). All messages changed get one new
    /// MODSEQ; messages whose flags would not change keep theirs (RFC 7162). With
    /// `unchanged_since`, messages with a higher MODSEQ are left alone and reported in
    /// [`FlagsUpdated::modified`].
    pub async fn store_flags(
        &self,
        mailbox: MailboxId,
        selection: &Selection,
        change: &FlagChange,
        unchanged_since: Option<u64>,
    ) -> Result<FlagsUpdated, StoreError> {
        for k in &change.keywords {
            check_keyword(k)?;
        }
        let set = self.resolve(mailbox, selection).await?;
        let mut out = FlagsUpdated::default();
        if set.is_empty() {
            return Ok(out);
        }
        let (lo, hi) = uid_bounds(&set);
        let mut tx = self.write().await?;
        self.lock_mailbox(&mut tx, mailbox).await?;
        let rows = sqlx::query(
            "SELECT id, uid, modseq, flags, keywords FROM messages \
             WHERE mailbox_id = $1 AND uid BETWEEN $2 AND $3 ORDER BY uid",
        )
        .bind(mailbox.0)
        .bind(lo)
        .bind(hi)
        .fetch_all(&mut **tx)
        .await
        .db(self.b())?;
        let mut updates = Vec::new();
        for row in &rows {
            let (row_id, mut state) = flag_state_of(row)?;
            if !set.contains(state.uid) {
                continue;
            }
            if unchanged_since.is_some_and(|since| state.modseq > since) {
                out.modified.push(state.uid);
                continue;
            }
            let (flags, keywords) = match change.op {
                FlagOp::Add => {
                    let mut k = state.keywords.clone();
                    k.extend(change.keywords.iter().cloned());
                    (state.flags | change.flags, k)
                }
                FlagOp::Remove => {
                    let mut k = state.keywords.clone();
                    for r in &change.keywords {
                        k.remove(r);
                    }
                    (state.flags & !change.flags, k)
                }
                FlagOp::Replace => (change.flags, change.keywords.iter().cloned().collect()),
            };
            if flags != state.flags || keywords != state.keywords {
                state.flags = flags;
                state.keywords = keywords;
                updates.push((row_id, state));
            }
        }
        if !updates.is_empty() {
            let modseq = self.bump_modseq(&mut tx, mailbox).await?;
            for (row_id, state) in &mut updates {
                state.modseq = modseq;
                sqlx::query("UPDATE messages SET flags = $1, keywords = $2, modseq = $3 WHERE id = $4")
                    .bind(state.flags.bits())
                    .bind(keywords_text(&state.keywords))
                    .bind(int(modseq, "modseq")?)
                    .bind(*row_id)
                    .execute(&mut **tx)
                    .await
                    .db(self.b())?;
            }
            self.commit(tx).await?;
        }
        out.changed = updates.into_iter().map(|(_, s)| s).collect();
        Ok(out)
    }

    async fn row_refs(
        &self,
        tx: &mut WriteTx,
        mailbox: MailboxId,
        set: &NumberSet,
        deleted_only: bool,
    ) -> Result<Vec<RowRef>, StoreError> {
        let (lo, hi) = uid_bounds(set);
        let sql = format!(
            "SELECT id, uid, size, blob_id FROM messages WHERE mailbox_id = $1 AND uid BETWEEN $2 AND $3{} ORDER BY uid",
            if deleted_only { " AND (flags & 8) <> 0" } else { "" }
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(mailbox.0)
            .bind(lo)
            .bind(hi)
            .fetch_all(&mut ***tx)
            .await
            .db(self.b())?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let r = row_ref_of(row)?;
            if set.contains(r.uid) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Removes messages; returns their UIDs (ascending). They are recorded as vanished at a
    /// new MODSEQ (QRESYNC), their usage released, and their blobs deleted after the commit.
    pub async fn expunge(&self, mailbox: MailboxId, scope: &ExpungeScope) -> Result<Vec<u32>, StoreError> {
        let target = self.mailbox_by_id(mailbox).await?;
        let (set, deleted_only) = match scope {
            ExpungeScope::Deleted => (NumberSet::all(), true),
            ExpungeScope::DeletedIn(set) => {
                (self.resolve(mailbox, &Selection::Uids(set.clone())).await?, true)
            }
            ExpungeScope::Uids(set) => (self.resolve(mailbox, &Selection::Uids(set.clone())).await?, false),
        };
        let mut tx = self.write().await?;
        self.lock_account(&mut tx, target.account_id).await?;
        self.lock_mailbox(&mut tx, mailbox).await?;
        let refs = self.row_refs(&mut tx, mailbox, &set, deleted_only).await?;
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        let modseq = int(self.bump_modseq(&mut tx, mailbox).await?, "modseq")?;
        self.remove_rows(&mut tx, mailbox, &refs, modseq).await?;
        self.release_quota(&mut tx, target.account_id, refs.iter().map(|r| r.size).sum()).await?;
        self.commit(tx).await?;
        let blobs: Vec<BlobId> = refs.iter().map(|r| r.blob_id.clone()).collect();
        self.drop_blobs(&blobs).await;
        Ok(refs.iter().map(|r| r.uid).collect())
    }

    /// Deletes rows and records their UIDs as vanished at `modseq`.
    async fn remove_rows(
        &self,
        tx: &mut WriteTx,
        mailbox: MailboxId,
        refs: &[RowRef],
        modseq: i64,
    ) -> Result<(), StoreError> {
        for r in refs {
            sqlx::query("DELETE FROM messages WHERE id = $1")
                .bind(r.row_id)
                .execute(&mut ***tx)
                .await
                .db(self.b())?;
            sqlx::query(
                "INSERT INTO vanished (mailbox_id, uid, modseq) VALUES ($1, $2, $3) \
                 ON CONFLICT (mailbox_id, uid) DO UPDATE SET modseq = excluded.modseq",
            )
            .bind(mailbox.0)
            .bind(i64::from(r.uid))
            .bind(modseq)
            .execute(&mut ***tx)
            .await
            .db(self.b())?;
        }
        Ok(())
    }

    /// Allocates `n` UIDs and one MODSEQ in a locked target; returns (first uid, modseq).
    async fn allocate(&self, tx: &mut WriteTx, target: &Mailbox, n: usize) -> Result<(i64, i64), StoreError> {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let row = sqlx::query(
            "UPDATE mailboxes SET uidnext = uidnext + $1, highestmodseq = highestmodseq + 1 \
             WHERE id = $2 RETURNING uidnext - $1 AS first, highestmodseq",
        )
        .bind(n)
        .bind(target.id.0)
        .fetch_one(&mut ***tx)
        .await
        .db(self.b())?;
        let d = |e: sqlx::Error| StoreError::Corrupt(format!("mailbox row: {e}"));
        let first: i64 = row.try_get("first").map_err(d)?;
        if first + n > i64::from(u32::MAX) {
            return Err(StoreError::UidsExhausted(target.name.clone()));
        }
        Ok((first, row.try_get("highestmodseq").map_err(d)?))
    }

    async fn two_mailboxes(&self, from: MailboxId, to: MailboxId) -> Result<(Mailbox, Mailbox), StoreError> {
        let source = self.mailbox_by_id(from).await?;
        let target = self.mailbox_by_id(to).await?;
        if source.account_id != target.account_id {
            return Err(StoreError::Invalid {
                what: "copy",
                reason: "source and target mailboxes belong to different accounts".into(),
            });
        }
        if from == to {
            return Err(StoreError::Invalid {
                what: "copy",
                reason: "source and target are the same mailbox".into(),
            });
        }
        Ok((source, target))
    }

    /// Locks the account, then both mailboxes in id order.
    async fn lock_pair(
        &self,
        tx: &mut WriteTx,
        source: &Mailbox,
        target: &Mailbox,
    ) -> Result<(Mailbox, Mailbox), StoreError> {
        self.lock_account(tx, source.account_id).await?;
        if source.id < target.id {
            let s = self.lock_mailbox(tx, source.id).await?;
            Ok((s, self.lock_mailbox(tx, target.id).await?))
        } else {
            let t = self.lock_mailbox(tx, target.id).await?;
            Ok((self.lock_mailbox(tx, source.id).await?, t))
        }
    }

    /// Copies messages into another mailbox of the same account (new UIDs, new unique ids,
    /// flags and keywords kept, a blob of their own each). Counts against the quota.
    pub async fn copy_messages(
        &self,
        from: MailboxId,
        uids: &NumberSet,
        to: MailboxId,
    ) -> Result<Copied, StoreError> {
        let (source, target) = self.two_mailboxes(from, to).await?;
        let candidates = self.fetch(from, &Selection::Uids(uids.clone())).await?;
        // Blobs first (durable), rows after: a crash leaves orphans at worst.
        let mut copies = Vec::with_capacity(candidates.len());
        for m in candidates {
            match self.inner.blobs.copy(&m.blob_id).await {
                Ok(blob) => copies.push((m, blob)),
                // Expunged meanwhile: not copied (as if it had been expunged first).
                Err(crate::BlobError::NotFound(_)) => {}
                Err(e) => {
                    let made: Vec<BlobId> =
                        copies.iter().map(|(_, b): &(MessageMeta, StoredBlob)| b.id.clone()).collect();
                    self.drop_blobs(&made).await;
                    return Err(e.into());
                }
            }
        }
        let new_blobs: Vec<BlobId> = copies.iter().map(|(_, b)| b.id.clone()).collect();
        match self.copy_rows(&source, &target, copies).await {
            Ok((copied, unused)) => {
                self.drop_blobs(&unused).await;
                Ok(copied)
            }
            Err(e) => {
                self.drop_blobs(&new_blobs).await;
                Err(e)
            }
        }
    }

    async fn copy_rows(
        &self,
        source: &Mailbox,
        target: &Mailbox,
        copies: Vec<(MessageMeta, StoredBlob)>,
    ) -> Result<(Copied, Vec<BlobId>), StoreError> {
        let mut tx = self.write().await?;
        let (_, target) = self.lock_pair(&mut tx, source, target).await?;
        // Keep only messages still present with the same blob (not expunged since the read).
        let set = NumberSet::from_numbers(copies.iter().map(|(m, _)| m.uid));
        let present: HashSet<(u32, BlobId)> = if set.is_empty() {
            HashSet::new()
        } else {
            self.row_refs(&mut tx, source.id, &set, false)
                .await?
                .into_iter()
                .map(|r| (r.uid, r.blob_id))
                .collect()
        };
        let (keep, gone): (Vec<_>, Vec<_>) =
            copies.into_iter().partition(|(m, _)| present.contains(&(m.uid, m.blob_id.clone())));
        let unused: Vec<BlobId> = gone.into_iter().map(|(_, b)| b.id).collect();
        let mut copied = Copied { uidvalidity: target.uidvalidity, uids: Vec::new() };
        if keep.is_empty() {
            return Ok((copied, unused));
        }
        let total: i64 = keep.iter().map(|(m, _)| i64::try_from(m.size).unwrap_or(i64::MAX)).sum();
        self.charge_quota(&mut tx, target.account_id, total).await?;
        let (first, modseq) = self.allocate(&mut tx, &target, keep.len()).await?;
        for (i, (m, blob)) in keep.iter().enumerate() {
            let uid = first + i64::try_from(i).unwrap_or(i64::MAX);
            let new = NewMessage {
                flags: m.flags,
                keywords: Vec::new(),
                internal_date: m.internal_date,
                size: m.size,
                protection: m.protection.clone(),
                summary: m.summary.clone(),
            };
            let size = int(m.size, "message size")?;
            self.insert_message(
                &mut tx,
                target.id,
                uid,
                modseq,
                &new,
                &m.keywords,
                size,
                &random_hex()?,
                blob,
            )
            .await?;
            copied.uids.push((m.uid, u32_of(uid, "uid")?));
        }
        self.commit(tx).await?;
        Ok((copied, unused))
    }

    /// Moves messages into another mailbox of the same account (RFC 6851): new UIDs in the
    /// target, the same rows, blobs and unique ids; the source records them as vanished.
    pub async fn move_messages(
        &self,
        from: MailboxId,
        uids: &NumberSet,
        to: MailboxId,
    ) -> Result<Copied, StoreError> {
        let (source, target) = self.two_mailboxes(from, to).await?;
        let uids = self.resolve(from, &Selection::Uids(uids.clone())).await?;
        let mut tx = self.write().await?;
        let (_, target) = self.lock_pair(&mut tx, &source, &target).await?;
        let refs = self.row_refs(&mut tx, from, &uids, false).await?;
        let mut moved = Copied { uidvalidity: target.uidvalidity, uids: Vec::new() };
        if refs.is_empty() {
            return Ok(moved);
        }
        let (first, modseq) = self.allocate(&mut tx, &target, refs.len()).await?;
        let source_modseq = int(self.bump_modseq(&mut tx, from).await?, "modseq")?;
        for (i, r) in refs.iter().enumerate() {
            let uid = first + i64::try_from(i).unwrap_or(i64::MAX);
            sqlx::query("UPDATE messages SET mailbox_id = $1, uid = $2, modseq = $3 WHERE id = $4")
                .bind(to.0)
                .bind(uid)
                .bind(modseq)
                .bind(r.row_id)
                .execute(&mut **tx)
                .await
                .db(self.b())?;
            sqlx::query(
                "INSERT INTO vanished (mailbox_id, uid, modseq) VALUES ($1, $2, $3) \
                 ON CONFLICT (mailbox_id, uid) DO UPDATE SET modseq = excluded.modseq",
            )
            .bind(from.0)
            .bind(i64::from(r.uid))
            .bind(source_modseq)
            .execute(&mut **tx)
            .await
            .db(self.b())?;
            moved.uids.push((r.uid, u32_of(uid, "uid")?));
        }
        self.commit(tx).await?;
        Ok(moved)
    }

    /// Messages changed or added after `since`, and UIDs vanished after it (CONDSTORE
    /// `CHANGEDSINCE`, QRESYNC). One consistent snapshot.
    pub async fn changes_since(&self, mailbox: MailboxId, since: u64) -> Result<Changes, StoreError> {
        let since = int(since, "modseq")?;
        let mut tx = self.inner.pool.begin_with(self.b().begin_read()).await.db(self.b())?;
        let highest: Option<i64> = sqlx::query_scalar("SELECT highestmodseq FROM mailboxes WHERE id = $1")
            .bind(mailbox.0)
            .fetch_optional(&mut *tx)
            .await
            .db(self.b())?;
        let highest = highest.ok_or_else(|| StoreError::NoSuchMailbox(format!("#{}", mailbox.0)))?;
        let sql =
            format!("SELECT {MSG_COLS} FROM messages WHERE mailbox_id = $1 AND modseq > $2 ORDER BY uid");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(mailbox.0)
            .bind(since)
            .fetch_all(&mut *tx)
            .await
            .db(self.b())?;
        let vanished: Vec<i64> =
            sqlx::query_scalar("SELECT uid FROM vanished WHERE mailbox_id = $1 AND modseq > $2 ORDER BY uid")
                .bind(mailbox.0)
                .bind(since)
                .fetch_all(&mut *tx)
                .await
                .db(self.b())?;
        tx.commit().await.db(self.b())?;
        Ok(Changes {
            highestmodseq: u64_of(highest, "highestmodseq")?,
            changed: rows.iter().map(message_of).collect::<Result<_, _>>()?,
            vanished: vanished.into_iter().map(|u| u32_of(u, "uid")).collect::<Result<_, _>>()?,
        })
    }

    /// UIDs (ascending) of the messages matching every given criterion.
    pub async fn search(&self, mailbox: MailboxId, query: &SearchQuery) -> Result<Vec<u32>, StoreError> {
        let mut sql = String::from("SELECT uid, keywords FROM messages WHERE mailbox_id = $1");
        let mut args: Vec<i64> = Vec::new();
        let mut cond = |sql: &mut String, clause: &str, v: i64| {
            args.push(v);
            sql.push_str(&clause.replace('?', &format!("${}", args.len() + 1)));
        };
        if let Some((lo, hi)) = query.uids.as_ref().and_then(NumberSet::bounds) {
            cond(&mut sql, " AND uid >= ?", i64::from(lo));
            cond(&mut sql, " AND uid <= ?", i64::from(hi));
        }
        if !query.flags_set.is_empty() {
            // Every `?` of a clause is the same parameter.
            cond(&mut sql, " AND (flags & ?) = ?", query.flags_set.bits());
        }
        if !query.flags_unset.is_empty() {
            cond(&mut sql, " AND (flags & ?) = 0", query.flags_unset.bits());
        }
        if let Some(t) = query.since {
            cond(&mut sql, " AND internal_date >= ?", ms_of(t));
        }
        if let Some(t) = query.before {
            cond(&mut sql, " AND internal_date < ?", ms_of(t));
        }
        if let Some(n) = query.larger {
            cond(&mut sql, " AND size > ?", int(n, "size")?);
        }
        if let Some(n) = query.smaller {
            cond(&mut sql, " AND size < ?", int(n, "size")?);
        }
        if let Some(m) = query.modseq_at_least {
            cond(&mut sql, " AND modseq >= ?", int(m, "modseq")?);
        }
        sql.push_str(" ORDER BY uid");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(mailbox.0);
        for a in args {
            q = q.bind(a);
        }
        let rows = q.fetch_all(&self.inner.pool).await.db(self.b())?;
        let mut out = Vec::new();
        for row in &rows {
            let d = |e: sqlx::Error| StoreError::Corrupt(format!("message row: {e}"));
            let uid = u32_of(row.try_get("uid").map_err(d)?, "uid")?;
            let keywords: String = row.try_get("keywords").map_err(d)?;
            let have: HashSet<&str> = keywords.split_whitespace().collect();
            if query.uids.as_ref().is_some_and(|s| !s.contains(uid))
                || query.keywords.iter().any(|k| !have.contains(k.as_str()))
                || query.without_keywords.iter().any(|k| have.contains(k.as_str()))
            {
                continue;
            }
            out.push(uid);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_names_are_normalised() {
        assert_eq!(normalize_mailbox_name("inbox").unwrap(), "INBOX");
        assert_eq!(normalize_mailbox_name("Inbox/Sub").unwrap(), "INBOX/Sub");
        assert_eq!(normalize_mailbox_name("Work/Inbox").unwrap(), "Work/Inbox");
        for bad in ["", "/a", "a/", "a//b", "a\tb", "a*", "a%b"] {
            assert!(normalize_mailbox_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn addresses_are_lower_cased_and_checked() {
        assert_eq!(normalize_address(" Alice.B+tag@Site.Example ").unwrap(), "alice.b+tag@site.example");
        assert!(normalize_address(&format!("{}@x.example", "a".repeat(65))).is_err());
        assert!(normalize_address("a@b_c.example").is_err());
        assert!(normalize_address("ä@x.example").is_err());
    }

    #[test]
    fn keywords_must_be_atoms() {
        assert!(check_keyword("$Forwarded").is_ok());
        for bad in ["", "\\Seen", "a b", "a(b", "\u{e9}"] {
            assert!(check_keyword(bad).is_err(), "{bad:?}");
        }
    }
}
