-- Mail store schema v5 (SQLite): what became of each recipient of an outbound message once the
-- queue was done with it. Kept in step with migrations/postgres/0005_delivery_records.sql.
-- A queued message leaves queue_messages/queue_recipients when every recipient is done; this
-- row outlives it, so a sender can still ask how (and whether) a recipient got the message:
-- delivered or bounced, when, and for a delivery sealed for a peer site the QKD key IDs, link,
-- KMEs and the signed "Quantum Secured" certificate the envelope carried. Nothing here is
-- secret: key IDs name keys (the keys themselves are gone), the certificate holds IDs, hashes
-- and a signature. Written in the transaction that records the outcome; rows older than the
-- retention (30 days, as peer_deliveries) are pruned when new outcomes are recorded.
CREATE TABLE delivery_records (
    queue_id      TEXT    NOT NULL,             -- the queue ID the message had
    recipient     TEXT    NOT NULL,             -- the forward path, as queued
    outcome       TEXT    NOT NULL CHECK (outcome IN ('delivered', 'bounced')),
    attempts      INTEGER NOT NULL,
    status        TEXT,                         -- enhanced status code of the last reply
    reply         TEXT,                         -- the last reply or our diagnosis
    remote        TEXT,                         -- the server that answered, if any
    protection    TEXT,                         -- hybrid|qaes|otp|pqc|normal; NULL: nothing was sent
    algorithm     TEXT,                         -- X-QKD-Algorithm of a sealed envelope
    key_ids       TEXT    NOT NULL DEFAULT '',  -- ETSI key IDs, newline-separated, in order
    link_id       TEXT,
    source_kme_id TEXT,
    target_kme_id TEXT,
    certificate   BLOB,                         -- the signed certificate's JSON, as sealed
    recorded_at   INTEGER NOT NULL,             -- unix ms
    PRIMARY KEY (queue_id, recipient)
);
CREATE INDEX delivery_records_age ON delivery_records (recorded_at);
