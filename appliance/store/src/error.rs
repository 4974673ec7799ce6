//! Errors, in the terms of whoever operates or calls the store.

use std::path::PathBuf;

/// Everything that can go wrong in the mail store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error("mail store database ({backend}): {source}")]
    Database {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// What the driver said.
        #[source]
        source: sqlx::Error,
    },
    /// The database was written by a newer version of this crate.
    #[error("mail store database has schema version {found}; this build supports up to {supported}")]
    SchemaTooNew {
        /// Version found.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// The database URL names no supported backend.
    #[error("unsupported mail store database URL {0:?}: expected sqlite:// or postgres://")]
    UnsupportedUrl(String),
    /// Reading or writing a message blob failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// An argument was malformed (an address, a mailbox name, a keyword ...).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// An account with this address already exists.
    #[error("an account for {0} already exists")]
    AccountExists(String),
    /// No account with this address.
    #[error("no account for {0}")]
    NoSuchAccount(String),
    /// The account has no mailbox with this name.
    #[error("mailbox {0:?} does not exist")]
    NoSuchMailbox(String),
    /// The account already has a mailbox with this name.
    #[error("mailbox {0:?} already exists")]
    MailboxExists(String),
    /// INBOX cannot be renamed or deleted here (see [`crate::Store::rename_mailbox`]).
    #[error("INBOX cannot be {0}")]
    InboxProtected(&'static str),
    /// Storing the message would exceed the account's quota; nothing was stored.
    #[error("quota exceeded: {used} of {quota} bytes used, {requested} more requested")]
    QuotaExceeded {
        /// Bytes the account's messages use now.
        used: u64,
        /// The account's quota.
        quota: u64,
        /// Size of what was to be stored.
        requested: u64,
    },
    /// The mailbox has used up the 32-bit UID space (IMAP UIDs are 32-bit); create a new one.
    #[error("mailbox {0:?} has no UIDs left")]
    UidsExhausted(String),
    /// Stored data contradicts itself.
    #[error("mail store is inconsistent: {0}")]
    Corrupt(String),
    /// A restore (or dump load) needs a store without mail, and this one holds some.
    #[error("the mail store is not empty (table {table} has rows); restore only into a new store")]
    NotEmpty {
        /// The first table found with rows.
        table: &'static str,
    },
    /// A dump follows another schema version than this build's.
    #[error(
        "the dump has mail store schema version {found} but this build has {expected}; restore it with the \
         release that made it"
    )]
    SchemaMismatch {
        /// The dump's version.
        found: i64,
        /// This build's version.
        expected: i64,
    },
    /// The database (or a dump) has a table this build does not know how to dump or load.
    #[error("the mail store has a table {0:?} that backup does not cover (a newer schema?)")]
    UnknownTable(String),
    /// The password hashing task failed (a bug, or the runtime shut down).
    #[error("password hashing failed: {0}")]
    PasswordHash(String),
}

/// Why [`crate::Store::authenticate`] refused. Wrong password, unknown address and disabled
/// account are deliberately one variant: a client must not learn which addresses exist.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The address or password is wrong, or the account is disabled.
    #[error("authentication failed: invalid address or password")]
    Rejected,
    /// The store itself failed (database unreachable ...); the credentials were not judged.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Errors of a [`crate::BlobStore`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// No blob with this id (never stored, or deleted).
    #[error("blob {0} not found")]
    NotFound(String),
    /// The blob id is not one this store hands out (it could name a path outside the store).
    #[error("malformed blob id {0:?}")]
    BadId(String),
    /// A file system operation failed.
    #[error("blob store {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The random generator or a blocking task failed (a bug, or the runtime shut down).
    #[error("blob store internal failure: {0}")]
    Internal(String),
    /// Reading the caller's message stream failed; nothing was stored.
    #[error("reading the message to store: {0}")]
    Source(#[source] std::io::Error),
    /// The S3-compatible object store refused a request or could not be reached (HTTP
    /// status and S3 error code inside).
    #[cfg(feature = "s3")]
    #[error(transparent)]
    S3(#[from] crate::s3::S3Error),
}
