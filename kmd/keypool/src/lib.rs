//! kmd's durable, HSM-wrapped key pool.
//!
//! `kmd` (one per QKD device and site) stores the key blocks its device delivers here, agrees
//! with the peer site's kmd which blocks both hold, cuts them into keys for ETSI GS QKD 014
//! `enc_keys` / `dec_keys`, and hands every key out at most once for encryption and once per
//! slave SAE for decryption — under concurrent requests at both sites and across crashes. This
//! crate has no HTTP and no networking: kmd's ETSI 014 server and its peer-sync module call it,
//! and carry the values it returns between the sites.
//!
//! # Lifecycle
//!
//! ```text
//!  device ──insert_block──► unconfirmed ──(peer: same KCV)──► confirmed ──cut──► consumed
//!                                │ (other KCV / never confirmed in time)              (material erased)
//!                                └──────────────────────────────► discarded (material erased)
//!
//!  site A (owner of the blocks)              site B
//!  reserve_keys ─► key assigned ──PeerKey──► accept_peer_assignment ─► key assigned
//!  mark_delivered_for_encryption             take_for_decryption (per slave)
//!     └► delivered (erased)                     └► delivered (erased once every slave has it)
//! ```
//!
//! 1. **Blocks.** [`KeyPool::insert_block`] wraps a block with the HSM and stores it
//!    `unconfirmed`; a second delivery of the same `(link, block_id)` with the same KCV is a
//!    no-op (also after the block is spent), one with another KCV is refused.
//! 2. **Confirmation.** The peer-sync sends [`KeyPool::unconfirmed_blocks`] (ID + KCV) to the
//!    peer, whose [`KeyPool::check_peer_blocks`] compares them with its copies, confirms or
//!    discards its own copies, and answers a [`Verdict`] each; [`KeyPool::apply_peer_verdicts`]
//!    applies the answers here. One round trip confirms a block at both sites. Blocks the peer
//!    does not know stay unconfirmed until [`KeyPool::discard_stale`] drops them. Only confirmed
//!    blocks are ever cut.
//! 3. **Ownership split.** Every block belongs to exactly one [`Side`] of the link, computed
//!    alike at both ends from its ID alone ([`block_owner`]: a bit of SHA-256 of the ID); the
//!    kmd with the lower KME ID is [`Side::Lower`] ([`Side::from_kme_ids`]). A kmd cuts keys for
//!    its own master SAEs only from blocks its side owns, and accepts from the peer only keys
//!    cut from blocks the peer's side owns. So both sites serve `enc_keys` concurrently without
//!    coordination and no byte is ever assigned twice.
//! 4. **Cutting.** [`KeyPool::reserve_keys`] takes bytes sequentially from the oldest owned
//!    confirmed blocks (a key may span blocks; its [`Segment`]s record where), stores each key
//!    `assigned` under a random UUIDv4 with its SAEs and its bytes wrapped individually, and
//!    returns [`KeyGrant`]s: the [`PeerKey`] to send to the peer plus the bytes. All or nothing:
//!    [`PoolError::Exhausted`] if the owned material cannot cover the whole request.
//! 5. **Peer's keys.** [`KeyPool::accept_peer_assignment`] cuts the same bytes from the local
//!    copies; idempotent on the key ID, refused (naming key and block) for blocks not held,
//!    not confirmed, owned here, or bytes already cut for another key.
//! 6. **Delivery.** [`KeyPool::mark_delivered_for_encryption`] at the master's site, after the
//!    peer has accepted; [`KeyPool::take_for_decryption`] at the slave's site: atomically checks
//!    every key ([`PoolError::NotFound`] → ETSI 400, [`PoolError::NotAuthorised`] → ETSI 401),
//!    commits the delivery, then returns the bytes.
//!
//! # Storage and crash safety
//!
//! SQLite (through `sqlx`, no macros) in WAL mode with `synchronous=FULL`, `secure_delete=ON`,
//! foreign keys; schema migrations are embedded ([`SCHEMA_VERSION`]). Every operation that
//! changes state is one `BEGIN IMMEDIATE` transaction (writers are serialised, also across
//! processes) run in a task of its own (dropping a future cannot stop it half way), and
//! returns key bytes only after `COMMIT` has returned — i.e. after the WAL is synced. After a
//! `kill -9` the database holds either the whole effect of an operation or none of it; a key
//! whose delivery was not committed was never returned, a key whose delivery was committed is
//! never returned again.
//!
//! Only HSM-wrapped blobs ([`qutemail_hsm::WrappedKey`]) are written. When bytes are cut from a
//! block, its stored material is replaced by a re-wrapped copy with those bytes zeroed; a
//! spent block's or key's material is set to NULL, and after every
//! [`PoolConfig::checkpoint_after_erasures`] erasures the WAL is checkpointed and truncated
//! (`PRAGMA wal_checkpoint(TRUNCATE)`), so old wrapped material does not linger in WAL frames
//! or free pages. Key bytes live in memory only in [`zeroize::Zeroizing`] buffers and are never
//! shown by `Debug` or logged.
//!
//! Spent rows stay as tombstones (a re-delivered block is recognised, a retried peer assignment
//! is refused) until [`KeyPool::prune_history`] deletes those older than a retention period.
//!
//! Counts for metrics and ETSI status ([`KeyPool::counts`], [`KeyPool::stored_key_count`]) come
//! from counter tables kept by SQLite triggers in the same transactions, so they cost O(1)
//! whatever the pool size; [`KeyPool::verify_integrity`] rechecks everything from the rows.
//!
//! ```no_run
//! # async fn demo(hsm: qutemail_hsm::HsmKeyWrapper) -> Result<(), kmd_keypool::PoolError> {
//! use kmd_keypool::{KeyPool, PoolConfig, SaeId, Side};
//! let pool = KeyPool::open(PoolConfig::new("/var/lib/qutemail/kmd/pool.sqlite"), hsm).await?;
//! pool.register_link("link-ab", Side::from_kme_ids("KME-A", "KME-B")?).await?;
//! let grants = pool
//!     .reserve_keys("link-ab", &SaeId::new("A-mail")?, &[SaeId::new("B-mail")?], 1, 256)
//!     .await?;
//! // send grants[i].assignment to the peer kmd, then:
//! pool.mark_delivered_for_encryption(&SaeId::new("A-mail")?, vec![grants[0].key_id().to_owned()])
//!     .await?;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod db;
mod error;
mod integrity;
mod pool;
mod types;

pub use db::SCHEMA_VERSION;
pub use error::{PoolError, Refusal};
pub use pool::{KeyPool, PoolConfig};
pub use types::{
    AcceptOutcome, BlockCheck, BlockCount, BlockMeta, BlockState, DeliveredKey, InsertOutcome,
    IntegrityReport, KeyCount, KeyGrant, KeyInfo, KeyOrigin, KeyState, LinkCounts, MAX_ID_LEN, MAX_KEY_BITS,
    MAX_MATERIAL_BYTES, NewBlock, PairCount, PeerKey, ReserveRequest, SaeId, Segment, Side, Verdict,
    VerdictOutcome, block_owner,
};
pub use zeroize::Zeroizing;
