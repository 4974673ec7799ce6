-- Mail store schema v5 (PostgreSQL): what became of each recipient of an outbound message once
-- the queue was done with it. Kept in step with migrations/sqlite/0005_delivery_records.sql
-- (reasons there).
CREATE TABLE delivery_records (
    queue_id      TEXT    NOT NULL,
    recipient     TEXT    NOT NULL,
    outcome       TEXT    NOT NULL CHECK (outcome IN ('delivered', 'bounced')),
    attempts      BIGINT  NOT NULL,
    status        TEXT,
    reply         TEXT,
    remote        TEXT,
    protection    TEXT,
    algorithm     TEXT,
    key_ids       TEXT    NOT NULL DEFAULT '',
    link_id       TEXT,
    source_kme_id TEXT,
    target_kme_id TEXT,
    certificate   BYTEA,
    recorded_at   BIGINT  NOT NULL,
    PRIMARY KEY (queue_id, recipient)
);
CREATE INDEX delivery_records_age ON delivery_records (recorded_at);
