-- Mail store schema v3 (SQLite): state of the web API (qutemail-web). Kept in step with
-- migrations/postgres/0003_web.sql. No token is stored in clear: only SHA-256 hashes.

-- A login session (one refresh-token family). Revoking it ends its access and refresh tokens.
CREATE TABLE web_sessions (
    id          INTEGER PRIMARY KEY,
    session_id  TEXT    NOT NULL UNIQUE,          -- 32 random hex digits (the access token's `sid`)
    account_id  INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,                 -- unix ms
    revoked_at  INTEGER                           -- unix ms; NULL while the session lives
);
CREATE INDEX web_sessions_by_account ON web_sessions (account_id);

-- Refresh tokens by hash; a spent one presented again revokes its session (reuse detection).
CREATE TABLE web_refresh_tokens (
    token_hash  TEXT    PRIMARY KEY,              -- hex SHA-256 of the token
    session_id  TEXT    NOT NULL REFERENCES web_sessions(session_id) ON DELETE CASCADE,
    spent       INTEGER NOT NULL DEFAULT 0,
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX web_refresh_by_session ON web_refresh_tokens (session_id);

-- Password reset tokens by hash: single use, short-lived.
CREATE TABLE web_reset_tokens (
    token_hash  TEXT    PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    created_at  INTEGER NOT NULL
);

-- Per-account web settings (the display name lives in accounts).
CREATE TABLE web_settings (
    account_id        INTEGER PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    default_mode      TEXT,
    recovery_address  TEXT
);

-- Uploaded attachments awaiting a compose, sealed at rest (opaque bytes and key record).
CREATE TABLE web_uploads (
    upload_id     TEXT    PRIMARY KEY,            -- 32 random hex digits
    account_id    INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    filename      TEXT    NOT NULL,
    content_type  TEXT    NOT NULL,
    size          INTEGER NOT NULL,               -- plaintext bytes
    sealed        BLOB    NOT NULL,
    protection    TEXT    NOT NULL,
    wrapped_key   BLOB    NOT NULL,
    expires_at    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE INDEX web_uploads_by_account ON web_uploads (account_id);

-- What the web API submitted: the Sent copy's unique id and the queue entries per recipient.
CREATE TABLE web_sent (
    unique_id     TEXT    PRIMARY KEY,            -- the Sent copy (messages.unique_id)
    account_id    INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    mode          TEXT    NOT NULL,
    recipients    TEXT    NOT NULL,               -- lines "recipient<TAB>queue_id or 'local'"
    created_at    INTEGER NOT NULL
);
