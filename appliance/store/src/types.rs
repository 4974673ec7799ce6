//! The values the store takes and returns.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::RangeInclusive;
use std::time::SystemTime;

use crate::blob::BlobId;
use crate::error::StoreError;

/// Which database a [`crate::Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite (bundled), WAL, `synchronous=FULL`: one appliance.
    Sqlite,
    /// PostgreSQL: several gateway nodes of one site.
    Postgres,
}

impl Backend {
    /// `sqlite` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// An account's database id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(pub(crate) i64);

/// A mailbox's database id (stable across renames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailboxId(pub(crate) i64);

/// A user account. The password hash never leaves the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its id.
    pub id: AccountId,
    /// The address, lower-cased (addresses are matched case-insensitively).
    pub address: String,
    /// Display name.
    pub display_name: String,
    /// A disabled account cannot authenticate (its mail is kept).
    pub disabled: bool,
    /// Most bytes (sum of message sizes) the account may hold; `None`: unlimited.
    pub quota_bytes: Option<u64>,
    /// Bytes its messages use now (sum of their sizes).
    pub used_bytes: u64,
    /// When it was created.
    pub created_at: SystemTime,
}

/// What [`crate::Store::create_account`] needs.
#[derive(Debug, Clone)]
pub struct NewAccount<'a> {
    /// The address (validated, stored lower-cased).
    pub address: &'a str,
    /// Display name (at most 200 characters, no control characters).
    pub display_name: &'a str,
    /// The password (hashed with argon2id; the plaintext is never stored).
    pub password: &'a str,
    /// Quota in bytes; `None` for unlimited.
    pub quota_bytes: Option<u64>,
}

/// RFC 6154 special-use attributes of the mailboxes every account gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialUse {
    /// `\Sent`.
    Sent,
    /// `\Drafts`.
    Drafts,
    /// `\Trash`.
    Trash,
    /// `\Junk`.
    Junk,
    /// `\Archive`.
    Archive,
}

impl SpecialUse {
    /// The IMAP attribute, e.g. `\Sent`.
    pub fn as_imap(self) -> &'static str {
        match self {
            SpecialUse::Sent => "\\Sent",
            SpecialUse::Drafts => "\\Drafts",
            SpecialUse::Trash => "\\Trash",
            SpecialUse::Junk => "\\Junk",
            SpecialUse::Archive => "\\Archive",
        }
    }

    pub(crate) fn from_imap(s: &str) -> Option<SpecialUse> {
        [SpecialUse::Sent, SpecialUse::Drafts, SpecialUse::Trash, SpecialUse::Junk, SpecialUse::Archive]
            .into_iter()
            .find(|u| u.as_imap() == s)
    }
}

/// A mailbox of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// Its id.
    pub id: MailboxId,
    /// The owning account.
    pub account_id: AccountId,
    /// Full hierarchical name, `/` as delimiter; `INBOX` is always spelled so.
    pub name: String,
    /// RFC 6154 attribute, if any.
    pub special_use: Option<SpecialUse>,
    /// UIDVALIDITY: random at creation, never changed (also not by rename).
    pub uidvalidity: u32,
    /// The UID the next message will get.
    pub uidnext: u32,
    /// HIGHESTMODSEQ (RFC 7162).
    pub highestmodseq: u64,
    /// Subscribed (IMAP LSUB).
    pub subscribed: bool,
}

/// STATUS of a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxStatus {
    /// Number of messages.
    pub messages: u32,
    /// Messages without `\Seen`.
    pub unseen: u32,
    /// UIDNEXT.
    pub uidnext: u32,
    /// UIDVALIDITY.
    pub uidvalidity: u32,
    /// HIGHESTMODSEQ.
    pub highestmodseq: u64,
    /// Sum of the messages' sizes.
    pub total_size: u64,
}

/// IMAP system flags as a bit set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u8);

impl Flags {
    /// No flag.
    pub const NONE: Flags = Flags(0);
    /// `\Seen`.
    pub const SEEN: Flags = Flags(1);
    /// `\Answered`.
    pub const ANSWERED: Flags = Flags(2);
    /// `\Flagged`.
    pub const FLAGGED: Flags = Flags(4);
    /// `\Deleted`.
    pub const DELETED: Flags = Flags(8);
    /// `\Draft`.
    pub const DRAFT: Flags = Flags(16);
    const ALL: u8 = 31;
    const NAMES: [(Flags, &'static str); 5] = [
        (Flags::SEEN, "\\Seen"),
        (Flags::ANSWERED, "\\Answered"),
        (Flags::FLAGGED, "\\Flagged"),
        (Flags::DELETED, "\\Deleted"),
        (Flags::DRAFT, "\\Draft"),
    ];

    /// Whether every flag of `other` is set here.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no flag is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The IMAP spellings of the flags set, in a fixed order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Flags::NAMES.into_iter().filter(move |(f, _)| self.contains(*f)).map(|(_, n)| n)
    }

    /// Parses one IMAP system flag name (case-insensitive), e.g. `\Seen`.
    pub fn from_name(name: &str) -> Option<Flags> {
        Flags::NAMES.into_iter().find(|(_, n)| n.eq_ignore_ascii_case(name)).map(|(f, _)| f)
    }

    pub(crate) fn bits(self) -> i64 {
        i64::from(self.0)
    }

    pub(crate) fn from_bits(bits: i64) -> Flags {
        Flags((bits & i64::from(Flags::ALL)) as u8)
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for Flags {
    type Output = Flags;
    fn bitand(self, rhs: Flags) -> Flags {
        Flags(self.0 & rhs.0)
    }
}

impl std::ops::Not for Flags {
    type Output = Flags;
    fn not(self) -> Flags {
        Flags(!self.0 & Flags::ALL)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}

/// How a message is protected, exactly as the caller (envelope + HSM) gives it. Opaque to the
/// store: kept and returned byte for byte.
#[derive(Clone, PartialEq, Eq)]
pub struct Protection {
    /// The kind, e.g. `qkd-envelope` or `at-rest` (1..=64 characters `[a-z0-9._-]`).
    pub kind: String,
    /// The message key wrapped by the HSM.
    pub wrapped_key: Vec<u8>,
    /// IDs of the keys involved (QKD key IDs, HSM key label ...); none may contain a newline.
    pub key_ids: Vec<String>,
    /// The signed per-message certificate, if any.
    pub certificate: Option<Vec<u8>>,
}

impl fmt::Debug for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Protection")
            .field("kind", &self.kind)
            .field("wrapped_key", &format_args!("<{} bytes>", self.wrapped_key.len()))
            .field("key_ids", &self.key_ids)
            .field("certificate", &self.certificate.as_ref().map(Vec::len))
            .finish()
    }
}

/// The metadata of a message to append; its sealed bytes are streamed separately.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Initial system flags.
    pub flags: Flags,
    /// Initial keywords (IMAP atoms, not starting with `\`).
    pub keywords: Vec<String>,
    /// INTERNALDATE (stored with millisecond precision).
    pub internal_date: SystemTime,
    /// The size of the message as a client sees it (RFC822.SIZE, POP3 LIST); counts against
    /// the quota.
    pub size: u64,
    /// The protection record.
    pub protection: Protection,
    /// Optional small sealed summary (subject/from for listings), opaque to the store.
    pub summary: Option<Vec<u8>>,
}

/// Names one delivery of a sealed message from a peer site, so a repeat of it (the sender
/// re-seals and resends when it could not record a delivery that happened) is stored once per
/// account. The vault derives it from the verified sender domain and the bound Message-ID; the
/// store keeps only these 32 bytes, for [`PEER_DELIVERY_WINDOW`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PeerDeliveryId(pub [u8; 32]);

impl std::fmt::Debug for PeerDeliveryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerDeliveryId({})", hex::encode(&self.0[..8]))
    }
}

/// How long a [`PeerDeliveryId`] is remembered: longer than any sending queue keeps retrying
/// (the default queue gives up after 5 days).
pub const PEER_DELIVERY_WINDOW: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// What [`crate::Store::append`] assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The new UID.
    pub uid: u32,
    /// The message's MODSEQ (the mailbox's new HIGHESTMODSEQ).
    pub modseq: u64,
    /// The mailbox's UIDVALIDITY (for APPENDUID, RFC 4315).
    pub uidvalidity: u32,
    /// The stable unique id (POP3 UIDL).
    pub unique_id: String,
}

/// A message's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    /// UID.
    pub uid: u32,
    /// MODSEQ.
    pub modseq: u64,
    /// System flags.
    pub flags: Flags,
    /// Keywords.
    pub keywords: BTreeSet<String>,
    /// INTERNALDATE.
    pub internal_date: SystemTime,
    /// Size as a client sees it (given at append).
    pub size: u64,
    /// Stable unique id: 32 hex digits, unique across the store, kept by MOVE, new for COPY
    /// (POP3 UIDL).
    pub unique_id: String,
    /// The blob with the sealed bytes.
    pub blob_id: BlobId,
    /// The blob's length in bytes.
    pub blob_len: u64,
    /// The protection record.
    pub protection: Protection,
    /// The sealed summary.
    pub summary: Option<Vec<u8>>,
}

/// A set of UIDs or of message sequence numbers, as ranges (IMAP sequence-set). `*` is
/// represented by `u32::MAX`, so `5:*` is `5..=u32::MAX`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NumberSet {
    ranges: Vec<RangeInclusive<u32>>,
}

impl NumberSet {
    /// The empty set.
    pub fn new() -> NumberSet {
        NumberSet::default()
    }

    /// Every number (`1:*`).
    pub fn all() -> NumberSet {
        NumberSet { ranges: vec![1..=u32::MAX] }
    }

    /// One range.
    pub fn range(r: RangeInclusive<u32>) -> NumberSet {
        let mut s = NumberSet::new();
        s.push(r);
        s
    }

    /// Exactly these numbers.
    pub fn from_numbers(numbers: impl IntoIterator<Item = u32>) -> NumberSet {
        let mut s = NumberSet::new();
        for n in numbers {
            s.push(n..=n);
        }
        s
    }

    /// Adds a range (given either way round, as IMAP allows `7:3`).
    pub fn push(&mut self, r: RangeInclusive<u32>) {
        let (a, b) = (*r.start(), *r.end());
        self.ranges.push(a.min(b)..=a.max(b));
    }

    /// Parses an IMAP sequence-set such as `1:3,5,9:*`.
    pub fn parse_imap(s: &str) -> Result<NumberSet, StoreError> {
        let bad = || StoreError::Invalid { what: "sequence set", reason: format!("{s:?} is malformed") };
        let num = |t: &str| -> Result<u32, StoreError> {
            if t == "*" {
                return Ok(u32::MAX);
            }
            match t.parse::<u32>() {
                Ok(n) if n > 0 && !t.starts_with('+') => Ok(n),
                _ => Err(bad()),
            }
        };
        let mut set = NumberSet::new();
        for part in s.split(',') {
            match part.split_once(':') {
                Some((a, b)) => set.push(num(a)?..=num(b)?),
                None => {
                    let n = num(part)?;
                    set.push(n..=n);
                }
            }
        }
        Ok(set)
    }

    /// Whether `n` is in the set.
    pub fn contains(&self, n: u32) -> bool {
        self.ranges.iter().any(|r| r.contains(&n))
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The smallest and largest number, if any.
    pub fn bounds(&self) -> Option<(u32, u32)> {
        let lo = self.ranges.iter().map(|r| *r.start()).min()?;
        let hi = self.ranges.iter().map(|r| *r.end()).max()?;
        Some((lo, hi))
    }

    /// The ranges.
    pub fn ranges(&self) -> &[RangeInclusive<u32>] {
        &self.ranges
    }
}

/// Which messages of a mailbox an operation addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every message.
    All,
    /// By UID (IMAP `UID FETCH` etc.).
    Uids(NumberSet),
    /// By message sequence number: the n-th message in UID order, 1-based, as of the call
    /// (IMAP `FETCH` without `UID`, POP3 message numbers).
    Sequence(NumberSet),
}

/// How [`crate::Store::store_flags`] changes flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagOp {
    /// `+FLAGS`.
    Add,
    /// `-FLAGS`.
    Remove,
    /// `FLAGS`.
    Replace,
}

/// A flag change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagChange {
    /// Add, remove or replace.
    pub op: FlagOp,
    /// System flags.
    pub flags: Flags,
    /// Keywords.
    pub keywords: Vec<String>,
}

/// A message's flags after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagState {
    /// UID.
    pub uid: u32,
    /// MODSEQ.
    pub modseq: u64,
    /// System flags.
    pub flags: Flags,
    /// Keywords.
    pub keywords: BTreeSet<String>,
}

/// Outcome of [`crate::Store::store_flags`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlagsUpdated {
    /// Messages whose flags changed, with their new state and the (one, shared) new MODSEQ.
    pub changed: Vec<FlagState>,
    /// UIDs not changed because their MODSEQ was above UNCHANGEDSINCE (RFC 7162 `MODIFIED`).
    pub modified: Vec<u32>,
}

/// Which messages [`crate::Store::expunge`] removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpungeScope {
    /// Every message flagged `\Deleted` (IMAP `EXPUNGE`, `CLOSE`; POP3 `QUIT`).
    Deleted,
    /// Messages flagged `\Deleted` among these UIDs (`UID EXPUNGE`, RFC 4315).
    DeletedIn(NumberSet),
    /// These UIDs whatever their flags.
    Uids(NumberSet),
}

/// Outcome of [`crate::Store::copy_messages`] and [`crate::Store::move_messages`] (for
/// COPYUID, RFC 4315).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Copied {
    /// The target's UIDVALIDITY.
    pub uidvalidity: u32,
    /// (source UID, new target UID) pairs, in source UID order.
    pub uids: Vec<(u32, u32)>,
}

/// Changes since a MODSEQ (CONDSTORE `CHANGEDSINCE`, QRESYNC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The mailbox's HIGHESTMODSEQ now.
    pub highestmodseq: u64,
    /// Messages changed or added since, in UID order.
    pub changed: Vec<MessageMeta>,
    /// UIDs expunged (or moved away) since, ascending.
    pub vanished: Vec<u32>,
}

/// Criteria for [`crate::Store::search`]; all given criteria must hold. Text search is the
/// caller's (bodies and headers are sealed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SearchQuery {
    /// Only these UIDs.
    pub uids: Option<NumberSet>,
    /// Flags that must be set.
    pub flags_set: Flags,
    /// Flags that must not be set.
    pub flags_unset: Flags,
    /// Keywords that must be present.
    pub keywords: Vec<String>,
    /// Keywords that must be absent.
    pub without_keywords: Vec<String>,
    /// INTERNALDATE at or after.
    pub since: Option<SystemTime>,
    /// INTERNALDATE before.
    pub before: Option<SystemTime>,
    /// Size strictly larger than.
    pub larger: Option<u64>,
    /// Size strictly smaller than.
    pub smaller: Option<u64>,
    /// MODSEQ at least (RFC 7162 `SEARCH MODSEQ`).
    pub modseq_at_least: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_sets_parse_like_imap() {
        let s = NumberSet::parse_imap("1:3,7,9:*,12:10").unwrap();
        assert!(s.contains(2) && s.contains(7) && s.contains(11) && s.contains(4_000_000_000));
        assert!(!s.contains(5) && !s.contains(8));
        for bad in ["", "0", "1:", ":2", "a", "1,,2", "+1", "-1"] {
            assert!(NumberSet::parse_imap(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_round_trip_their_names() {
        let f = Flags::SEEN | Flags::DRAFT;
        assert_eq!(f.names().collect::<Vec<_>>(), vec!["\\Seen", "\\Draft"]);
        assert_eq!(Flags::from_name("\\seen"), Some(Flags::SEEN));
        assert_eq!(Flags::from_bits(f.bits()), f);
        assert_eq!(!Flags::SEEN & f, Flags::DRAFT);
    }
}
