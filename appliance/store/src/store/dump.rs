//! A logical copy of the whole database for backup and restore: every row of every table, read
//! in one consistent snapshot ([`Store::dump`]) and written back into an empty store in one
//! transaction ([`Store::load_dump`]).
//!
//! The same SQL runs on SQLite and PostgreSQL (as everywhere in this crate), so a dump taken on
//! one backend loads into the other. The caller (the gateway's backup) treats the cells as
//! opaque except for two kinds of column it must rewrite: `wrapped_key` (its HSM-wrapped key
//! record) and `blob_id` (blob ids are re-issued when the blobs are written again). Blobs are not
//! part of the dump: they are write-once, so the caller copies those the snapshot references
//! after taking it.

use std::collections::HashSet;

use sqlx::any::AnyTypeInfoKind;
use sqlx::{Row as _, TypeInfo as _, ValueRef as _};

use super::Store;
use crate::db::{DbResult as _, SCHEMA_VERSION};
use crate::error::StoreError;
use crate::types::Backend;

/// Every table of the schema, parents before children (the order rows are loaded in). A table
/// in the database that is not listed here makes [`Store::dump`] fail rather than leave it out
/// of a backup; `tests/dump.rs` checks the list against a freshly migrated schema.
pub const DUMP_TABLES: &[&str] = &[
    "accounts",
    "mailboxes",
    "messages",
    "vanished",
    "queue_messages",
    "queue_recipients",
    "web_sessions",
    "web_refresh_tokens",
    "web_reset_tokens",
    "web_settings",
    "web_uploads",
    "web_sent",
    "peer_deliveries",
    "delivery_records",
];

/// Tables that hold mail (or its traces): a store with a row in any of them is not replaced by
/// a dump.
const MAIL_TABLES: &[&str] = &["messages", "queue_messages", "web_uploads", "web_sent", "delivery_records"];

/// Tables whose `id` column is generated (PostgreSQL identity): their sequences are moved past
/// the loaded ids so that new rows do not collide with restored ones.
const IDENTITY_TABLES: &[&str] =
    &["accounts", "mailboxes", "messages", "queue_messages", "queue_recipients", "web_sessions"];

/// One cell of a dumped row.
#[derive(Clone, PartialEq)]
pub enum DumpValue {
    /// SQL NULL.
    Null,
    /// An integer (every number column of the schema).
    Integer(i64),
    /// Text.
    Text(String),
    /// Bytes (sealed or wrapped data, hashes).
    Bytes(Vec<u8>),
}

impl std::fmt::Debug for DumpValue {
    // Cells hold password hashes and sealed data: show their shape, not their content.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DumpValue::Null => f.write_str("Null"),
            DumpValue::Integer(i) => write!(f, "Integer({i})"),
            DumpValue::Text(t) => write!(f, "Text(<{} bytes>)", t.len()),
            DumpValue::Bytes(b) => write!(f, "Bytes(<{} bytes>)", b.len()),
        }
    }
}

/// The rows of one table.
#[derive(Debug, Clone, PartialEq)]
pub struct DumpTable {
    /// The table's name (one of [`DUMP_TABLES`]).
    pub name: String,
    /// Column names, in the order of each row's cells.
    pub columns: Vec<String>,
    /// The rows.
    pub rows: Vec<Vec<DumpValue>>,
}

impl DumpTable {
    /// The position of column `name` in each row.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

/// Every table of a store at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreDump {
    /// The schema version the rows follow.
    pub schema_version: i64,
    /// The tables, in [`DUMP_TABLES`] order.
    pub tables: Vec<DumpTable>,
}

impl StoreDump {
    /// The table `name`.
    pub fn table(&self, name: &str) -> Option<&DumpTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// The table `name`, to rewrite cells.
    pub fn table_mut(&mut self, name: &str) -> Option<&mut DumpTable> {
        self.tables.iter_mut().find(|t| t.name == name)
    }

    /// Rows in the table `name` (0 if absent).
    pub fn count(&self, name: &str) -> usize {
        self.table(name).map_or(0, |t| t.rows.len())
    }
}

fn cell(row: &sqlx::any::AnyRow, i: usize, table: &str) -> Result<DumpValue, StoreError> {
    let d = |e: sqlx::Error| StoreError::Corrupt(format!("{table} row: {e}"));
    let raw = row.try_get_raw(i).map_err(d)?;
    if raw.is_null() {
        return Ok(DumpValue::Null);
    }
    let kind = raw.type_info().kind();
    match kind {
        k if k.is_integer() => Ok(DumpValue::Integer(row.try_get(i).map_err(d)?)),
        AnyTypeInfoKind::Bool => Ok(DumpValue::Integer(i64::from(row.try_get::<bool, _>(i).map_err(d)?))),
        AnyTypeInfoKind::Text => Ok(DumpValue::Text(row.try_get(i).map_err(d)?)),
        AnyTypeInfoKind::Blob => Ok(DumpValue::Bytes(row.try_get(i).map_err(d)?)),
        other => Err(StoreError::Corrupt(format!(
            "{table} column {i} has type {}, which a dump does not carry",
            sqlx::any::AnyTypeInfo { kind: other }.name()
        ))),
    }
}

/// A column name from a dump is spliced into SQL: only plain lower-case identifiers pass.
fn check_identifier(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid { what: "dump column name", reason: format!("{name:?}") })
    }
}

impl Store {
    /// Every row of every table, read in one consistent snapshot (a deferred read transaction
    /// on SQLite's WAL, REPEATABLE READ on PostgreSQL) while the gateway keeps running. Fails
    /// with [`StoreError::UnknownTable`] if the database holds a table this build would not
    /// dump, so a backup never silently leaves data behind.
    pub async fn dump(&self) -> Result<StoreDump, StoreError> {
        let b = self.b();
        let mut tx = self.inner.pool.begin_with(b.begin_read()).await.db(b)?;
        let catalog = match b {
            Backend::Sqlite => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            }
            Backend::Postgres => {
                "SELECT table_name::TEXT AS name FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            }
        };
        let present: Vec<String> = sqlx::query_scalar(catalog).fetch_all(&mut *tx).await.db(b)?;
        if let Some(unknown) =
            present.iter().find(|t| *t != "schema_migrations" && !DUMP_TABLES.contains(&t.as_str()))
        {
            return Err(StoreError::UnknownTable(unknown.clone()));
        }
        let schema_version: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                .fetch_one(&mut *tx)
                .await
                .db(b)?;
        let mut tables = Vec::with_capacity(DUMP_TABLES.len());
        for name in DUMP_TABLES {
            // ORDER BY 1: a stable order (ids ascending), so a dump of the same data is the same.
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM {name} ORDER BY 1")))
                .fetch_all(&mut *tx)
                .await
                .db(b)?;
            let columns: Vec<String> = rows
                .first()
                .map(|r| r.columns().iter().map(|c| sqlx::Column::name(c).to_owned()).collect())
                .unwrap_or_default();
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push((0..columns.len()).map(|i| cell(row, i, name)).collect::<Result<Vec<_>, _>>()?);
            }
            tables.push(DumpTable { name: (*name).to_owned(), columns, rows: out });
        }
        tx.commit().await.db(b)?;
        Ok(StoreDump { schema_version, tables })
    }

    /// Whether the store holds no account and no queued message.
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        let b = self.b();
        let accounts: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM accounts").fetch_one(&self.inner.pool).await.db(b)?;
        Ok(accounts == 0 && !self.holds_mail().await?)
    }

    /// Whether the store holds any mail: a stored or queued message, an upload or a web
    /// submission record. A store that does not may still have accounts (a fresh appliance's
    /// first-boot admin account), which [`Store::load_dump`] replaces.
    pub async fn holds_mail(&self) -> Result<bool, StoreError> {
        let b = self.b();
        for table in MAIL_TABLES {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&self.inner.pool)
                .await
                .db(b)?;
            if n > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Writes a dump into this store in one transaction: all rows or none. The store must hold
    /// no mail ([`Store::holds_mail`]; [`StoreError::NotEmpty`] otherwise); accounts it has
    /// (with empty mailboxes, such as a fresh appliance's first-boot admin) are deleted first
    /// and their addresses returned. The dump must follow this build's schema version. Each
    /// account's used bytes are recomputed from its messages (the caller may have left out
    /// messages whose blobs were expunged while the dump was copied).
    pub async fn load_dump(&self, dump: &StoreDump) -> Result<Vec<String>, StoreError> {
        if dump.schema_version != SCHEMA_VERSION {
            return Err(StoreError::SchemaMismatch { found: dump.schema_version, expected: SCHEMA_VERSION });
        }
        let known: HashSet<&str> = DUMP_TABLES.iter().copied().collect();
        for t in &dump.tables {
            if !known.contains(t.name.as_str()) {
                return Err(StoreError::UnknownTable(t.name.clone()));
            }
            for c in &t.columns {
                check_identifier(c)?;
            }
            if t.rows.iter().any(|r| r.len() != t.columns.len()) {
                return Err(StoreError::Invalid {
                    what: "dump",
                    reason: format!("a row of {} does not have {} cells", t.name, t.columns.len()),
                });
            }
        }
        let b = self.b();
        let mut tx = self.write().await?;
        let count = |name: &str| format!("SELECT COUNT(*) FROM {name}");
        for name in MAIL_TABLES {
            let n: i64 =
                sqlx::query_scalar(sqlx::AssertSqlSafe(count(name))).fetch_one(&mut **tx).await.db(b)?;
            if n > 0 {
                return Err(StoreError::NotEmpty { table: name });
            }
        }
        // Accounts without mail go, with everything that cascades from them (mailboxes,
        // sessions, settings); then every table must be empty.
        let replaced: Vec<String> = sqlx::query_scalar("SELECT address FROM accounts ORDER BY address")
            .fetch_all(&mut **tx)
            .await
            .db(b)?;
        sqlx::query("DELETE FROM accounts").execute(&mut **tx).await.db(b)?;
        for name in DUMP_TABLES {
            let n: i64 =
                sqlx::query_scalar(sqlx::AssertSqlSafe(count(name))).fetch_one(&mut **tx).await.db(b)?;
            if n > 0 {
                return Err(StoreError::NotEmpty { table: name });
            }
        }
        for name in DUMP_TABLES {
            let Some(t) = dump.table(name) else { continue };
            if t.rows.is_empty() {
                continue;
            }
            let columns = t.columns.join(", ");
            for row in &t.rows {
                // NULL is written as a literal: a bound NULL needs a parameter type, and a dump
                // does not know the column's (PostgreSQL refuses an int8 NULL for a text column).
                let mut values = Vec::with_capacity(row.len());
                let mut n = 0;
                for v in row {
                    if *v == DumpValue::Null {
                        values.push("NULL".to_owned());
                    } else {
                        n += 1;
                        values.push(format!("${n}"));
                    }
                }
                let sql = format!("INSERT INTO {name} ({columns}) VALUES ({})", values.join(", "));
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for v in row {
                    q = match v {
                        DumpValue::Null => q,
                        DumpValue::Integer(i) => q.bind(*i),
                        DumpValue::Text(s) => q.bind(s.clone()),
                        DumpValue::Bytes(bytes) => q.bind(bytes.clone()),
                    };
                }
                q.execute(&mut **tx).await.db(b)?;
            }
        }
        sqlx::query(
            "UPDATE accounts SET used_bytes = (SELECT COALESCE(SUM(m.size), 0) FROM messages m \
             JOIN mailboxes x ON m.mailbox_id = x.id WHERE x.account_id = accounts.id)",
        )
        .execute(&mut **tx)
        .await
        .db(b)?;
        if b == Backend::Postgres {
            for name in IDENTITY_TABLES {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT setval(pg_get_serial_sequence('{name}', 'id'), \
                     (SELECT COALESCE(MAX(id), 0) + 1 FROM {name}), false)"
                )))
                .execute(&mut **tx)
                .await
                .db(b)?;
            }
        }
        self.commit(tx).await?;
        tracing::info!(
            accounts = dump.count("accounts"),
            messages = dump.count("messages"),
            queued = dump.count("queue_messages"),
            replaced = replaced.len(),
            "mail store loaded from a dump"
        );
        Ok(replaced)
    }
}
