//! Opening the database (SQLite or PostgreSQL through sqlx's Any driver) and the embedded,
//! versioned schema migrations.

use std::time::Duration;

use sqlx::pool::PoolOptions;
use sqlx::{Any, Pool, Transaction};

use crate::error::StoreError;
use crate::types::Backend;

/// Newest schema version this build writes.
pub const SCHEMA_VERSION: i64 = 5;

/// (version, SQLite script, PostgreSQL script); applied in order, all pending ones in one
/// transaction, so a database moves forward only and never stops half way.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        include_str!("../migrations/sqlite/0001_initial.sql"),
        include_str!("../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        include_str!("../migrations/sqlite/0002_queue.sql"),
        include_str!("../migrations/postgres/0002_queue.sql"),
    ),
    (
        3,
        include_str!("../migrations/sqlite/0003_web.sql"),
        include_str!("../migrations/postgres/0003_web.sql"),
    ),
    (
        4,
        include_str!("../migrations/sqlite/0004_peer_deliveries.sql"),
        include_str!("../migrations/postgres/0004_peer_deliveries.sql"),
    ),
    (
        5,
        include_str!("../migrations/sqlite/0005_delivery_records.sql"),
        include_str!("../migrations/postgres/0005_delivery_records.sql"),
    ),
];

/// Key of the PostgreSQL advisory lock that serialises migrations of several nodes ("QMST").
const MIGRATION_LOCK: i64 = 0x514D_5354;

pub(crate) type Tx = Transaction<'static, Any>;
pub(crate) type AnyPool = Pool<Any>;

/// Maps sqlx errors to [`StoreError::Database`].
pub(crate) trait DbResult<T> {
    fn db(self, backend: Backend) -> Result<T, StoreError>;
}

impl<T> DbResult<T> for Result<T, sqlx::Error> {
    fn db(self, backend: Backend) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Database { backend: backend.name(), source })
    }
}

/// The few statements where the dialects differ.
impl Backend {
    pub(crate) fn from_url(url: &str) -> Result<Backend, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl(url.to_owned()))
        }
    }

    /// Row lock suffix for a `SELECT` that precedes an update of the same row. SQLite needs
    /// none: its write transactions (`BEGIN IMMEDIATE`) are serialised as a whole.
    pub(crate) fn for_update(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// How read-only snapshots begin: SQLite's deferred transaction reads one snapshot;
    /// PostgreSQL needs REPEATABLE READ for that (READ COMMITTED re-snapshots per statement).
    pub(crate) fn begin_read(self) -> &'static str {
        match self {
            Backend::Sqlite => "BEGIN",
            Backend::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        }
    }

    /// How write transactions begin: SQLite takes the write lock at once, so two writers
    /// never deadlock upgrading a read lock; PostgreSQL runs READ COMMITTED with row locks.
    pub(crate) fn begin_write(self) -> &'static str {
        match self {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        }
    }
}

/// Builds an sqlite URL for a file path (percent-encoding everything but safe characters).
pub fn sqlite_url(path: &std::path::Path) -> String {
    let mut url = String::from("sqlite://");
    for b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/._-".contains(b) {
            url.push(char::from(*b));
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url.push_str("?mode=rwc");
    url
}

/// Opens a pool with the crash-safety settings and checks that they took effect.
pub(crate) async fn connect(
    url: &str,
    backend: Backend,
    max_connections: u32,
    busy_timeout: Duration,
) -> Result<AnyPool, StoreError> {
    sqlx::any::install_default_drivers();
    let mut options = PoolOptions::<Any>::new().max_connections(max_connections.max(2)).min_connections(1);
    if backend == Backend::Sqlite {
        let busy_ms = busy_timeout.as_millis();
        options = options.after_connect(move |conn, _meta| {
            Box::pin(async move {
                // synchronous=FULL with WAL: a COMMIT returns after the WAL is fsynced, so a
                // message reported stored survives kill -9 and power loss. secure_delete: freed
                // pages (expunged rows) are zeroed.
                let sql = format!(
                    "PRAGMA busy_timeout = {busy_ms}; PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL; \
                     PRAGMA secure_delete = ON; PRAGMA trusted_schema = OFF;"
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(conn).await?;
                Ok(())
            })
        });
    }
    let pool = options.connect(url).await.db(backend)?;
    if backend == Backend::Sqlite {
        let mut conn = pool.acquire().await.db(backend)?;
        let journal: String =
            sqlx::query_scalar("PRAGMA journal_mode = WAL").fetch_one(&mut *conn).await.db(backend)?;
        let synchronous: i64 =
            sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut *conn).await.db(backend)?;
        let foreign_keys: i64 =
            sqlx::query_scalar("PRAGMA foreign_keys").fetch_one(&mut *conn).await.db(backend)?;
        drop(conn);
        // SQLite silently keeps another journal mode where WAL is impossible (some network file
        // systems); the durability argument needs exactly these settings.
        if !journal.eq_ignore_ascii_case("wal") || synchronous != 2 || foreign_keys != 1 {
            pool.close().await;
            return Err(StoreError::Database {
                backend: backend.name(),
                source: sqlx::Error::Configuration(
                    format!(
                        "SQLite refused the required settings (journal_mode={journal}, \
                         synchronous={synchronous}, foreign_keys={foreign_keys}; need wal, 2 (FULL), 1); \
                         is the database on a local file system?"
                    )
                    .into(),
                ),
            });
        }
    }
    Ok(pool)
}

/// Brings the schema up to [`SCHEMA_VERSION`], or refuses a newer one.
pub(crate) async fn migrate(pool: &AnyPool, backend: Backend) -> Result<(), StoreError> {
    let mut tx = pool.begin_with(backend.begin_write()).await.db(backend)?;
    if backend == Backend::Postgres {
        // Several gateway nodes may start at once; one migrates, the others then see it done.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .db(backend)?;
    }
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await
    .db(backend)?;
    let version: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        .fetch_one(&mut *tx)
        .await
        .db(backend)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found: version, supported: SCHEMA_VERSION });
    }
    for (step, sqlite, postgres) in MIGRATIONS {
        if *step > version {
            let script = if backend == Backend::Sqlite { *sqlite } else { *postgres };
            sqlx::raw_sql(script).execute(&mut *tx).await.db(backend)?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(*step)
                .bind(crate::store::now_ms())
                .execute(&mut *tx)
                .await
                .db(backend)?;
            tracing::info!(backend = backend.name(), version = step, "mail store schema migrated");
        }
    }
    tx.commit().await.db(backend)?;
    Ok(())
}
