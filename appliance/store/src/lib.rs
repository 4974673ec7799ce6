//! QuteMail's mail store: accounts, mailboxes, message metadata for IMAP/POP3/web, and the
//! sealed message blobs, on SQLite (one appliance) or PostgreSQL (several gateway nodes).
//!
//! The store does no message cryptography. The caller (envelope crate + HSM) seals each
//! message and hands over: the sealed bytes (streamed into a [`BlobStore`]), the protection
//! record ([`Protection`]: kind, HSM-wrapped key, key IDs, certificate) and optionally a small
//! sealed summary for listings. Besides those opaque bytes the store keeps only what IMAP and
//! POP3 need: flags, keywords, dates, sizes, UIDs and MODSEQs. No subject, body or address of
//! a message is ever given to it, so none can reach its disk.
//!
//! # Model
//!
//! * [`Account`]: address (validated, case-insensitive), display name, argon2id password hash
//!   (PHC string, [`PasswordParams`]), disabled flag, quota. [`Store::create_account`] makes
//!   INBOX, Sent, Drafts, Trash and Junk (RFC 6154 attributes) in the same transaction.
//!   [`Store::authenticate`] answers one [`AuthError::Rejected`] for a wrong password, an
//!   unknown address and a disabled account, after one argon2 verification in every case.
//! * [`Mailbox`]: `/`-hierarchical name, random UIDVALIDITY kept across renames, UIDNEXT,
//!   HIGHESTMODSEQ, subscribed flag.
//! * [`MessageMeta`]: UID (allocated by one `UPDATE … RETURNING` on the mailbox row, so
//!   strictly increasing and never reused, also under concurrent appends and after expunge),
//!   MODSEQ (RFC 7162: every change takes a new mailbox MODSEQ, one per operation), flags,
//!   keywords, INTERNALDATE, size, a unique id for POP3 UIDL, the protection record, the
//!   summary, and its blob. Expunged and moved-away UIDs are remembered with their MODSEQ for
//!   QRESYNC ([`Store::changes_since`]).
//!
//! # Durability
//!
//! SQLite runs in WAL mode with `synchronous=FULL` (checked at open) and `secure_delete`;
//! PostgreSQL with its defaults (`synchronous_commit=on`). [`Store::append`] first streams the
//! blob into a temporary file, `fsync`s it, renames it into place and `fsync`s the directory
//! ([`FsBlobStore`]); only then it commits the row. So a message is visible only once its blob
//! is complete on disk, and one reported stored survives `kill -9` and power loss. Deletion runs
//! the other way round (row first, blob after the commit). A crash between the two steps leaves
//! at worst a blob without a row, which [`Store::open`] deletes once it is older than
//! [`StoreConfig::orphan_grace`]. Each blob belongs to one row: COPY gives the copy its own blob
//! ([`BlobStore::copy`], a hard link on the file system), so no reference counting is needed.
//!
//! One SQL text serves both databases through sqlx's `Any` driver; the few dialect differences
//! (row locks, `BEGIN IMMEDIATE`, column types in the migrations) sit in `db.rs`. Write
//! transactions lock the account row before mailbox rows (in id order) on PostgreSQL, and are
//! serialised per process on SQLite, so they cannot deadlock.
//!
//! ```no_run
//! # async fn demo() -> Result<(), qutemail_store::StoreError> {
//! use qutemail_store::*;
//! let store = Store::open(StoreConfig::sqlite("/var/lib/qutemail/store.sqlite", "/var/lib/qutemail/blobs")).await?;
//! let alice = store
//!     .create_account(NewAccount { address: "alice@a.example", display_name: "Alice", password: "pw", quota_bytes: None })
//!     .await?;
//! let inbox = store.mailbox(alice.id, "INBOX").await?;
//! # let (meta, sealed): (NewMessage, Vec<u8>) = todo!();
//! let appended = store.append(inbox.id, &meta, &mut sealed.as_slice()).await?;
//! let messages = store.fetch(inbox.id, &Selection::Uids(NumberSet::range(appended.uid..=appended.uid))).await?;
//! let reader = store.read_blob(&messages[0]).await?; // stream the sealed bytes to the envelope crate
//! # Ok(()) }
//! ```
//!
//! # Outbound queue and delivery records
//!
//! The queue's tables hold each queued message (sealed at rest) and its recipients' state
//! ([`Store::enqueue`], [`Store::claim_due`], [`Store::record_delivery_outcomes`]). When a
//! recipient is done, the same transaction writes its delivery record ([`RecipientDelivery`]):
//! delivered or bounced, and how it went out ([`DeliveryProtection`]: mode, and for a sealed
//! envelope the QKD key IDs, link, KMEs and signed certificate). The record outlives the queue
//! entry for [`DELIVERY_RECORD_RETENTION`]; [`Store::delivery_status`] answers for a queue ID.
//!
//! Cargo feature `s3` adds `S3BlobStore` (blobs in an S3-compatible object store, for
//! [`Store::open_with_blobs`]); see its docs for layout and durability.
//!
//! Cargo feature `testing` (which implies `s3`) adds the module `testing`: a throw-away
//! PostgreSQL server per test process and ready-made stores on either backend, for this and
//! later crates' tests.

#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod blob;
mod db;
mod error;
mod login_throttle;
mod password;
#[cfg(feature = "s3")]
mod s3;
mod store;
mod types;

#[cfg(feature = "testing")]
pub mod testing;

pub use blob::{BlobFuture, BlobId, BlobReader, BlobStore, FsBlobStore, StoredBlob};
pub use db::{SCHEMA_VERSION, sqlite_url};
pub use error::{AuthError, BlobError, StoreError};
pub use login_throttle::{LoginGate, LoginThrottle, LoginThrottleSettings};
pub use password::PasswordParams;
#[cfg(feature = "s3")]
pub use s3::{S3BlobStore, S3Config, S3Error};
pub use store::{
    DEFAULT_MAILBOXES, NewQueueRecipient, NewQueuedMessage, QueueListing, QueueOutcome, QueuedDelivery,
    QueuedMessage, QueuedRecipient, Store, StoreConfig, normalize_address, normalize_mailbox_name,
};
// What became of each recipient of an outbound message (schema v5), with its QKD keys.
pub use store::{
    DELETED_BY_OPERATOR, DELIVERY_RECORD_RETENTION, DeliveryProtection, DeliveryState, RecipientDelivery,
};
// Backup and restore: a logical copy of every table.
pub use store::{DUMP_TABLES, DumpTable, DumpValue, StoreDump};
// Web API state (schema v3): sessions, reset tokens, settings, uploads, submissions.
pub use store::{NewUpload, RefreshOutcome, SentRecord, Upload, WebSettings, WebSettingsUpdate};
pub use types::{
    Account, AccountId, Appended, Backend, Changes, Copied, ExpungeScope, FlagChange, FlagOp, FlagState,
    Flags, FlagsUpdated, Mailbox, MailboxId, MailboxStatus, MessageMeta, NewAccount, NewMessage, NumberSet,
    PEER_DELIVERY_WINDOW, PeerDeliveryId, Protection, SearchQuery, Selection, SpecialUse,
};
