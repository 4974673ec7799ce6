-- Mail store schema v4 (PostgreSQL): which sealed peer-site messages each account already
-- received. Kept in step with migrations/sqlite/0004_peer_deliveries.sql (reasons there).
CREATE TABLE peer_deliveries (
    account_id    BIGINT  NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    delivery      BYTEA   NOT NULL,
    received_at   BIGINT  NOT NULL,
    PRIMARY KEY (account_id, delivery)
);
CREATE INDEX peer_deliveries_age ON peer_deliveries (received_at);
-- Until when a runner holds a queued recipient (see the SQLite migration). 0: not held.
ALTER TABLE queue_recipients ADD COLUMN claimed_until BIGINT NOT NULL DEFAULT 0;
