-- Mail store schema v1 (SQLite). Kept in step with migrations/postgres/0001_initial.sql: same
-- tables, columns and meanings; only the type names and id generation differ.
CREATE TABLE accounts (
    id            INTEGER PRIMARY KEY,
    address       TEXT    NOT NULL UNIQUE,      -- lower-cased
    display_name  TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,             -- argon2id PHC string
    disabled      INTEGER NOT NULL DEFAULT 0,
    quota_bytes   INTEGER,                      -- NULL: unlimited
    used_bytes    INTEGER NOT NULL DEFAULT 0,   -- sum of messages.size, kept in the same transactions
    created_at    INTEGER NOT NULL              -- unix ms
);
CREATE TABLE mailboxes (
    id            INTEGER PRIMARY KEY,
    account_id    INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name          TEXT    NOT NULL,
    special_use   TEXT,
    uidvalidity   INTEGER NOT NULL,
    uidnext       INTEGER NOT NULL DEFAULT 1,
    highestmodseq INTEGER NOT NULL DEFAULT 1,
    subscribed    INTEGER NOT NULL DEFAULT 1,
    created_at    INTEGER NOT NULL,
    UNIQUE (account_id, name)
);
CREATE TABLE messages (
    id            INTEGER PRIMARY KEY,
    mailbox_id    INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid           INTEGER NOT NULL,
    modseq        INTEGER NOT NULL,
    flags         INTEGER NOT NULL,
    keywords      TEXT    NOT NULL,             -- space-separated, sorted
    internal_date INTEGER NOT NULL,             -- unix ms
    size          INTEGER NOT NULL,
    unique_id     TEXT    NOT NULL UNIQUE,
    blob_id       TEXT    NOT NULL UNIQUE,
    blob_len      INTEGER NOT NULL,
    protection    TEXT    NOT NULL,
    wrapped_key   BLOB    NOT NULL,
    key_ids       TEXT    NOT NULL,             -- newline-separated
    certificate   BLOB,
    summary       BLOB,
    UNIQUE (mailbox_id, uid)
);
CREATE INDEX messages_by_modseq ON messages (mailbox_id, modseq);
-- Expunged (or moved away) UIDs with the MODSEQ of their removal, for QRESYNC VANISHED.
CREATE TABLE vanished (
    mailbox_id    INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid           INTEGER NOT NULL,
    modseq        INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, uid)
);
