//! Errors, in the operator's terms.

use std::fmt;
use std::path::PathBuf;

use qutemail_hsm::HsmError;

/// Why a peer's key assignment was refused (see [`PoolError::AssignmentRefused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// This kmd has no block with that ID on the link (never received, or pruned).
    BlockNotHeld {
        /// The block.
        block_id: String,
    },
    /// The block is held but not yet confirmed here. Retry after the next confirmation
    /// exchange.
    BlockNotConfirmed {
        /// The block.
        block_id: String,
    },
    /// The block is spent or discarded here; its bytes cannot be cut again.
    BlockUnusable {
        /// The block.
        block_id: String,
        /// Its state here.
        state: crate::BlockState,
    },
    /// The block belongs to this kmd's side: the peer must not cut it.
    BlockOwnedHere {
        /// The block.
        block_id: String,
    },
    /// The segment does not lie within the block.
    OutOfRange {
        /// The block.
        block_id: String,
        /// Segment start.
        offset: u32,
        /// Segment length.
        len: u32,
        /// Block length.
        block_len: u32,
    },
    /// The bytes are already part of another key.
    Overlap {
        /// The block.
        block_id: String,
        /// The key that holds (some of) these bytes.
        other_key_id: String,
    },
    /// A key with this ID is already stored with a different master, slaves, segments or link.
    Conflicting,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BlockNotHeld { block_id } => write!(f, "block {block_id} is not held here"),
            Refusal::BlockNotConfirmed { block_id } => {
                write!(f, "block {block_id} is not confirmed here yet (retry after the next confirmation)")
            }
            Refusal::BlockUnusable { block_id, state } => write!(f, "block {block_id} is {state} here"),
            Refusal::BlockOwnedHere { block_id } => {
                write!(f, "block {block_id} belongs to this side; the peer may not cut it")
            }
            Refusal::OutOfRange { block_id, offset, len, block_len } => write!(
                f,
                "bytes {offset}..{} lie outside block {block_id} of {block_len} bytes",
                u64::from(*offset) + u64::from(*len)
            ),
            Refusal::Overlap { block_id, other_key_id } => {
                write!(f, "bytes of block {block_id} already belong to key {other_key_id}")
            }
            Refusal::Conflicting => {
                f.write_str("a key with this ID is already stored with a different assignment")
            }
        }
    }
}

/// Everything that can go wrong in the key pool.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The SQLite database could not be opened, read or written.
    #[error("key pool database {path}: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What SQLite / sqlx said.
        #[source]
        source: sqlx::Error,
    },
    /// The file is not a key pool database (another application's SQLite file).
    #[error("{0} is not a kmd key pool database (wrong SQLite application_id)")]
    NotAKeyPool(PathBuf),
    /// The database was written by a newer kmd-keypool.
    #[error("key pool database {path} has schema version {found}; this kmd supports up to {supported}")]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// Version found.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// Wrapping or unwrapping through the HSM failed.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// An argument was malformed.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The requested key size is not a positive multiple of 8 bits within the limit.
    #[error("key size {size_bits} bits is not a positive multiple of 8 of at most {max_bits} bits")]
    InvalidKeySize {
        /// Requested size.
        size_bits: u32,
        /// Largest size allowed.
        max_bits: u32,
    },
    /// The link was never registered with [`crate::KeyPool::register_link`].
    #[error("link {0:?} is not registered in this key pool")]
    UnknownLink(String),
    /// The link is registered with the other side.
    #[error(
        "link {link_id:?} is registered as side {stored} but configured as {configured}; changing \
         sides would let both sites cut the same blocks"
    )]
    SideChanged {
        /// The link.
        link_id: String,
        /// Side in the database.
        stored: crate::Side,
        /// Side asked for.
        configured: crate::Side,
    },
    /// The device delivered a block whose ID is already stored with another KCV or length.
    #[error(
        "block {block_id} on link {link_id:?} was already stored with a different KCV or length; the new copy is ignored"
    )]
    BlockConflict {
        /// The link.
        link_id: String,
        /// The block.
        block_id: String,
    },
    /// Not enough confirmed key material owned by this side; nothing was reserved.
    #[error("key pool exhausted: {requested_bits} bits requested, {available_bits} available")]
    Exhausted {
        /// Bits requested (count × size).
        requested_bits: u64,
        /// Bits this side can still cut.
        available_bits: u64,
    },
    /// One or more keys do not exist here, or were already delivered to the caller
    /// (ETSI GS QKD 014: 400 "one or more keys specified are not found on KME").
    #[error("keys not found on this KME: {}", .0.join(", "))]
    NotFound(Vec<String>),
    /// The caller is not a slave SAE of these keys, or the keys were not assigned by the named
    /// master (ETSI GS QKD 014: 401).
    #[error("SAE {sae} is not authorised for keys {}", .key_ids.join(", "))]
    NotAuthorised {
        /// The caller.
        sae: String,
        /// The keys it may not have.
        key_ids: Vec<String>,
    },
    /// Keys were already delivered for encryption (or discarded).
    #[error("keys already delivered or discarded: {}", .0.join(", "))]
    AlreadyDelivered(Vec<String>),
    /// A key assignment from the peer kmd was refused; nothing of the batch was stored.
    #[error("peer assignment of key {key_id} refused: {reason}")]
    AssignmentRefused {
        /// The key.
        key_id: String,
        /// Why.
        reason: Refusal,
    },
    /// Stored data contradicts itself (e.g. an unwrapped block of the wrong length).
    #[error("key pool database is inconsistent: {0}")]
    Corrupt(String),
    /// An internal task failed (a bug); the operation's transaction was rolled back.
    #[error("internal error in the key pool: {0}")]
    Internal(String),
}

impl PoolError {
    /// True for refusals the peer-sync should retry later — the block may have arrived and been
    /// confirmed here by then — as opposed to assignments that will never be accepted. A block
    /// that is "not held" because it was pruned never comes back: bound the retries.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            PoolError::AssignmentRefused {
                reason: Refusal::BlockNotConfirmed { .. } | Refusal::BlockNotHeld { .. },
                ..
            }
        )
    }
}
