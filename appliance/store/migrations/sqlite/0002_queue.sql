-- Mail store schema v2 (SQLite): the outbound queue. Kept in step with
-- migrations/postgres/0002_queue.sql.
-- A queued message: its SMTP envelope and its bytes, sealed at rest like every stored message.
CREATE TABLE queue_messages (
    id            INTEGER PRIMARY KEY,
    queue_id      TEXT    NOT NULL UNIQUE,      -- 32 random hex digits, shown to operators
    sender        TEXT    NOT NULL,             -- reverse path; '' for the null path <>
    envid         TEXT,                         -- DSN ENVID (RFC 3461)
    ret_full      INTEGER NOT NULL DEFAULT 0,   -- DSN RET=FULL
    requested     TEXT,                         -- protection the sender asked for; NULL: policy
    size          INTEGER NOT NULL,
    blob_id       TEXT    NOT NULL UNIQUE,
    blob_len      INTEGER NOT NULL,
    protection    TEXT    NOT NULL,
    wrapped_key   BLOB    NOT NULL,
    key_ids       TEXT    NOT NULL,
    certificate   BLOB,
    created_at    INTEGER NOT NULL              -- unix ms
);
-- One row per recipient: delivered, failed, or queued until next_attempt_at.
CREATE TABLE queue_recipients (
    id              INTEGER PRIMARY KEY,
    message_id      INTEGER NOT NULL REFERENCES queue_messages(id) ON DELETE CASCADE,
    address         TEXT    NOT NULL,
    domain          TEXT    NOT NULL,
    notify          TEXT    NOT NULL DEFAULT '',  -- DSN NOTIFY as given; '' = default (FAILURE,DELAY)
    orcpt           TEXT,
    state           TEXT    NOT NULL CHECK (state IN ('queued', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,             -- unix ms; a claim pushes it by the lease
    last_status     TEXT,
    last_reply      TEXT,
    remote          TEXT,
    warned          INTEGER NOT NULL DEFAULT 0,
    changed_at      INTEGER NOT NULL
);
CREATE INDEX queue_due ON queue_recipients (state, next_attempt_at);
CREATE INDEX queue_by_message ON queue_recipients (message_id);
