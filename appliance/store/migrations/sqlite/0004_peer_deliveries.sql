-- Mail store schema v4 (SQLite): which sealed peer-site messages each account already received.
-- Kept in step with migrations/postgres/0004_peer_deliveries.sql.
-- A sending site re-seals a message with fresh QKD keys at every attempt; when it could not
-- record a delivery that did happen (a crash right after the 250), it sends it again. The
-- receiving gateway keeps one row per account and delivery (a SHA-256 the vault computes over
-- the verified sender domain and the bound Message-ID: no address or Message-ID in clear) and
-- accepts the repeat without storing it twice.
CREATE TABLE peer_deliveries (
    account_id    INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    delivery      BLOB    NOT NULL,             -- 32 bytes
    received_at   INTEGER NOT NULL,             -- unix ms; rows older than the window are pruned
    PRIMARY KEY (account_id, delivery)
);
CREATE INDEX peer_deliveries_age ON peer_deliveries (received_at);
-- Until when a runner holds a queued recipient (its delivery attempt is under way): an
-- operator's "retry now" must not hand it to a second runner meanwhile. 0: not held.
ALTER TABLE queue_recipients ADD COLUMN claimed_until INTEGER NOT NULL DEFAULT 0;
