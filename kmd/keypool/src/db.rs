//! Opening the SQLite database: connection settings and embedded schema migrations.

use std::path::Path;
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::PoolError;

/// `PRAGMA application_id` of a key pool database: "QKPL".
pub(crate) const APPLICATION_ID: i64 = 0x514B_504C;

/// Embedded migrations: (version, SQL, statement that records the version). Applied in order,
/// each database file moves forward only, all pending steps in one transaction.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, include_str!("../migrations/0001_initial.sql"), "PRAGMA user_version = 1")];

/// Newest schema version this build writes.
pub const SCHEMA_VERSION: i64 = 1;

/// Maps sqlx errors to [`PoolError::Database`] naming the file.
pub(crate) trait DbResult<T> {
    fn db(self, path: &Path) -> Result<T, PoolError>;
}

impl<T> DbResult<T> for Result<T, sqlx::Error> {
    fn db(self, path: &Path) -> Result<T, PoolError> {
        self.map_err(|source| PoolError::Database { path: path.to_path_buf(), source })
    }
}

/// Creates the file (mode 0600) if needed and opens a connection pool with the crash-safety
/// settings: WAL, `synchronous=FULL`, foreign keys, `secure_delete`.
pub(crate) async fn connect(
    path: &Path,
    busy_timeout: Duration,
    connections: u32,
) -> Result<SqlitePool, PoolError> {
    create_private(path)?;
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(busy_timeout)
        // Freed and overwritten content is zeroed in the file (erased material leaves no trace
        // in free pages); the WAL is truncated by explicit checkpoints.
        .pragma("secure_delete", "ON")
        .pragma("trusted_schema", "OFF");
    let pool = SqlitePoolOptions::new()
        .max_connections(connections.max(2))
        .min_connections(1)
        .connect_with(options)
        .await
        .db(path)?;
    // SQLite silently keeps another journal mode where WAL is impossible (some network file
    // systems); the crash-safety argument needs exactly these settings, so check them.
    let mut conn = pool.acquire().await.db(path)?;
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut *conn).await.db(path)?;
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut *conn).await.db(path)?;
    let secure_delete: i64 =
        sqlx::query_scalar("PRAGMA secure_delete").fetch_one(&mut *conn).await.db(path)?;
    let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys").fetch_one(&mut *conn).await.db(path)?;
    drop(conn);
    if !journal.eq_ignore_ascii_case("wal") || synchronous != 2 || secure_delete != 1 || foreign_keys != 1 {
        pool.close().await;
        return Err(PoolError::Database {
            path: path.to_path_buf(),
            source: sqlx::Error::Configuration(
                format!(
                    "SQLite refused the required settings (journal_mode={journal}, synchronous={synchronous}, \
                     secure_delete={secure_delete}, foreign_keys={foreign_keys}; need wal, 2 (FULL), 1, 1); \
                     is the database on a local file system?"
                )
                .into(),
            ),
        });
    }
    Ok(pool)
}

/// Creates the database file readable by its owner only; SQLite gives the WAL and SHM files the
/// same permissions.
fn create_private(path: &Path) -> Result<(), PoolError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(PoolError::Database { path: path.to_path_buf(), source: sqlx::Error::Io(e) }),
    }
}

/// Brings the schema up to [`SCHEMA_VERSION`] (or refuses a foreign or newer file).
pub(crate) async fn migrate(pool: &SqlitePool, path: &Path) -> Result<(), PoolError> {
    let mut conn = pool.acquire().await.db(path)?;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.db(path)?;
    let app_id: i64 = sqlx::query_scalar("PRAGMA application_id").fetch_one(&mut *tx).await.db(path)?;
    let version: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut *tx).await.db(path)?;
    if app_id == 0 {
        let objects: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sqlite_schema").fetch_one(&mut *tx).await.db(path)?;
        if objects != 0 || version != 0 {
            return Err(PoolError::NotAKeyPool(path.to_path_buf()));
        }
        sqlx::raw_sql("PRAGMA application_id = 1363890252").execute(&mut *tx).await.db(path)?;
    } else if app_id != APPLICATION_ID {
        return Err(PoolError::NotAKeyPool(path.to_path_buf()));
    }
    if version > SCHEMA_VERSION {
        return Err(PoolError::SchemaTooNew {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (step, sql, record) in MIGRATIONS {
        if *step > version {
            sqlx::raw_sql(*sql).execute(&mut *tx).await.db(path)?;
            sqlx::raw_sql(*record).execute(&mut *tx).await.db(path)?;
            tracing::info!(db = %path.display(), version = step, "key pool schema migrated");
        }
    }
    tx.commit().await.db(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn application_id_literal_matches() {
        assert_eq!(super::APPLICATION_ID, 1_363_890_252);
    }
}
