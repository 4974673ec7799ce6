-- kmd-keypool schema, version 1.
--
-- Invariants enforced here (the code keeps the rest, and `KeyPool::verify_integrity` checks them):
--   * material columns hold only HSM-wrapped blobs, and are NULL exactly when the row is spent;
--   * a block's `consumed` never exceeds its length, unconfirmed blocks are untouched;
--   * two key segments never start at the same byte of a block (unique index), and the code
--     refuses any overlap;
--   * the *_counts tables are maintained by triggers in the same transaction as the rows they
--     count, so metrics and ETSI status are O(1) and always consistent with the data.

-- One row per QKD link this kmd serves, with the side this kmd plays on it.
CREATE TABLE links (
    link_id         TEXT PRIMARY KEY NOT NULL,
    side            TEXT NOT NULL CHECK (side IN ('lower', 'upper')),
    created_unix_ms INTEGER NOT NULL
) STRICT;

-- Key blocks from the QKD device. Rows are kept after the block is spent (material NULL) so that a
-- block re-delivered by the device is recognised and never enters the pool twice.
CREATE TABLE blocks (
    id               INTEGER PRIMARY KEY,          -- local arrival order: oldest first
    link_id          TEXT NOT NULL REFERENCES links (link_id),
    block_id         TEXT NOT NULL,                -- the ID both ends of the link use
    owner            TEXT NOT NULL CHECK (owner IN ('lower', 'upper')),
    state            TEXT NOT NULL CHECK (state IN ('unconfirmed', 'confirmed', 'consumed', 'discarded')),
    kcv              BLOB NOT NULL CHECK (length(kcv) = 16),
    len              INTEGER NOT NULL CHECK (len > 0),
    consumed         INTEGER NOT NULL DEFAULT 0,   -- bytes already cut into keys
    material         BLOB,                         -- HSM-wrapped block, consumed bytes zeroed
    created_unix_ms  INTEGER NOT NULL,             -- as the device reported it (0 = unknown)
    qber_ppm         INTEGER,
    security_bits    INTEGER,
    received_unix_ms INTEGER NOT NULL,
    changed_unix_ms  INTEGER NOT NULL,
    discard_reason   TEXT,
    UNIQUE (link_id, block_id),
    CHECK (consumed >= 0 AND consumed <= len),
    CHECK (state <> 'unconfirmed' OR consumed = 0),
    CHECK (state <> 'confirmed' OR consumed < len),
    CHECK (state <> 'consumed' OR consumed = len),
    CHECK ((state IN ('unconfirmed', 'confirmed')) = (material IS NOT NULL))
) STRICT;

-- Serving: oldest confirmed blocks of one owner. Partial, so spent blocks never slow it down.
CREATE INDEX blocks_serving ON blocks (link_id, owner, id) WHERE state = 'confirmed';
-- Peer confirmation and stale discard.
CREATE INDEX blocks_pending ON blocks (link_id, id) WHERE state = 'unconfirmed';
-- History pruning.
CREATE INDEX blocks_spent ON blocks (link_id, changed_unix_ms) WHERE state IN ('consumed', 'discarded');

-- Keys cut from blocks: by this kmd (origin 'local', this site's master SAE) or by the peer
-- (origin 'peer', accepted from the peer kmd; served here for decryption).
CREATE TABLE keys (
    id               INTEGER PRIMARY KEY,
    key_id           TEXT NOT NULL UNIQUE,         -- UUID, lower-case hyphenated
    link_id          TEXT NOT NULL REFERENCES links (link_id),
    origin           TEXT NOT NULL CHECK (origin IN ('local', 'peer')),
    master_sae       TEXT NOT NULL,
    size_bits        INTEGER NOT NULL CHECK (size_bits > 0 AND size_bits % 8 = 0),
    state            TEXT NOT NULL CHECK (state IN ('assigned', 'delivered', 'discarded')),
    material         BLOB,                         -- HSM-wrapped key bytes
    assigned_unix_ms INTEGER NOT NULL,
    changed_unix_ms  INTEGER NOT NULL,
    CHECK ((state = 'assigned') = (material IS NOT NULL))
) STRICT;

-- Keys not yet delivered or discarded (re-sync after a restart, housekeeping).
CREATE INDEX keys_assigned ON keys (link_id, origin, id) WHERE state = 'assigned';
CREATE INDEX keys_spent ON keys (link_id, changed_unix_ms) WHERE state <> 'assigned';

-- The slave SAEs of each key and, per slave, whether it got the key.
-- state: 'assigned' (not yet delivered), 'delivered', 'discarded' (the key was discarded).
-- For keys of origin 'local' the rows follow the key (delivered = given to the master).
CREATE TABLE key_slaves (
    key_row           INTEGER NOT NULL REFERENCES keys (id) ON DELETE CASCADE,
    slave_sae         TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('assigned', 'delivered', 'discarded')),
    changed_unix_ms   INTEGER NOT NULL,
    PRIMARY KEY (key_row, slave_sae)
) STRICT, WITHOUT ROWID;

-- Where a key's bytes came from, in key order.
CREATE TABLE key_segments (
    key_row     INTEGER NOT NULL REFERENCES keys (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    block_row   INTEGER NOT NULL REFERENCES blocks (id),
    byte_offset INTEGER NOT NULL CHECK (byte_offset >= 0),
    len         INTEGER NOT NULL CHECK (len > 0),
    PRIMARY KEY (key_row, seq)
) STRICT, WITHOUT ROWID;

CREATE UNIQUE INDEX key_segments_by_block ON key_segments (block_row, byte_offset);

-- Counters (maintained by the triggers below).
CREATE TABLE block_counts (
    link_id         TEXT NOT NULL,
    owner           TEXT NOT NULL,
    state           TEXT NOT NULL,
    blocks          INTEGER NOT NULL,
    remaining_bytes INTEGER NOT NULL,
    PRIMARY KEY (link_id, owner, state)
) STRICT, WITHOUT ROWID;

CREATE TABLE key_counts (
    link_id TEXT NOT NULL,
    origin  TEXT NOT NULL,
    state   TEXT NOT NULL,
    keys    INTEGER NOT NULL,
    bits    INTEGER NOT NULL,
    PRIMARY KEY (link_id, origin, state)
) STRICT, WITHOUT ROWID;

CREATE TABLE pair_counts (
    link_id    TEXT NOT NULL,
    origin     TEXT NOT NULL,
    master_sae TEXT NOT NULL,
    slave_sae  TEXT NOT NULL,
    state      TEXT NOT NULL,
    keys       INTEGER NOT NULL,
    PRIMARY KEY (link_id, origin, master_sae, slave_sae, state)
) STRICT, WITHOUT ROWID;

CREATE TRIGGER block_counts_insert AFTER INSERT ON blocks BEGIN
    INSERT INTO block_counts (link_id, owner, state, blocks, remaining_bytes)
    VALUES (NEW.link_id, NEW.owner, NEW.state, 1, NEW.len - NEW.consumed)
    ON CONFLICT (link_id, owner, state) DO UPDATE
    SET blocks = blocks + 1, remaining_bytes = remaining_bytes + excluded.remaining_bytes;
END;

CREATE TRIGGER block_counts_update AFTER UPDATE OF state, consumed, owner ON blocks BEGIN
    UPDATE block_counts
    SET blocks = blocks - 1, remaining_bytes = remaining_bytes - (OLD.len - OLD.consumed)
    WHERE link_id = OLD.link_id AND owner = OLD.owner AND state = OLD.state;
    INSERT INTO block_counts (link_id, owner, state, blocks, remaining_bytes)
    VALUES (NEW.link_id, NEW.owner, NEW.state, 1, NEW.len - NEW.consumed)
    ON CONFLICT (link_id, owner, state) DO UPDATE
    SET blocks = blocks + 1, remaining_bytes = remaining_bytes + excluded.remaining_bytes;
END;

CREATE TRIGGER block_counts_delete AFTER DELETE ON blocks BEGIN
    UPDATE block_counts
    SET blocks = blocks - 1, remaining_bytes = remaining_bytes - (OLD.len - OLD.consumed)
    WHERE link_id = OLD.link_id AND owner = OLD.owner AND state = OLD.state;
END;

CREATE TRIGGER key_counts_insert AFTER INSERT ON keys BEGIN
    INSERT INTO key_counts (link_id, origin, state, keys, bits)
    VALUES (NEW.link_id, NEW.origin, NEW.state, 1, NEW.size_bits)
    ON CONFLICT (link_id, origin, state) DO UPDATE
    SET keys = keys + 1, bits = bits + excluded.bits;
END;

CREATE TRIGGER key_counts_update AFTER UPDATE OF state ON keys BEGIN
    UPDATE key_counts SET keys = keys - 1, bits = bits - OLD.size_bits
    WHERE link_id = OLD.link_id AND origin = OLD.origin AND state = OLD.state;
    INSERT INTO key_counts (link_id, origin, state, keys, bits)
    VALUES (NEW.link_id, NEW.origin, NEW.state, 1, NEW.size_bits)
    ON CONFLICT (link_id, origin, state) DO UPDATE
    SET keys = keys + 1, bits = bits + excluded.bits;
END;

CREATE TRIGGER key_counts_delete AFTER DELETE ON keys BEGIN
    UPDATE key_counts SET keys = keys - 1, bits = bits - OLD.size_bits
    WHERE link_id = OLD.link_id AND origin = OLD.origin AND state = OLD.state;
END;

CREATE TRIGGER pair_counts_insert AFTER INSERT ON key_slaves BEGIN
    INSERT INTO pair_counts (link_id, origin, master_sae, slave_sae, state, keys)
    VALUES ((SELECT link_id FROM keys WHERE id = NEW.key_row),
            (SELECT origin FROM keys WHERE id = NEW.key_row),
            (SELECT master_sae FROM keys WHERE id = NEW.key_row),
            NEW.slave_sae, NEW.state, 1)
    ON CONFLICT (link_id, origin, master_sae, slave_sae, state) DO UPDATE SET keys = keys + 1;
END;

CREATE TRIGGER pair_counts_update AFTER UPDATE OF state ON key_slaves BEGIN
    UPDATE pair_counts SET keys = keys - 1
    WHERE link_id = (SELECT link_id FROM keys WHERE id = OLD.key_row)
      AND origin = (SELECT origin FROM keys WHERE id = OLD.key_row)
      AND master_sae = (SELECT master_sae FROM keys WHERE id = OLD.key_row)
      AND slave_sae = OLD.slave_sae AND state = OLD.state;
    INSERT INTO pair_counts (link_id, origin, master_sae, slave_sae, state, keys)
    VALUES ((SELECT link_id FROM keys WHERE id = NEW.key_row),
            (SELECT origin FROM keys WHERE id = NEW.key_row),
            (SELECT master_sae FROM keys WHERE id = NEW.key_row),
            NEW.slave_sae, NEW.state, 1)
    ON CONFLICT (link_id, origin, master_sae, slave_sae, state) DO UPDATE SET keys = keys + 1;
END;

-- BEFORE DELETE: the key row still exists when a cascade removes its slaves.
CREATE TRIGGER pair_counts_delete BEFORE DELETE ON key_slaves BEGIN
    UPDATE pair_counts SET keys = keys - 1
    WHERE link_id = (SELECT link_id FROM keys WHERE id = OLD.key_row)
      AND origin = (SELECT origin FROM keys WHERE id = OLD.key_row)
      AND master_sae = (SELECT master_sae FROM keys WHERE id = OLD.key_row)
      AND slave_sae = OLD.slave_sae AND state = OLD.state;
END;

-- Identity columns never change once written.
CREATE TRIGGER blocks_identity_frozen BEFORE UPDATE OF link_id, block_id, kcv, len ON blocks BEGIN
    SELECT RAISE(ABORT, 'a block''s link, ID, KCV and length never change');
END;

CREATE TRIGGER keys_identity_frozen BEFORE UPDATE OF key_id, link_id, origin, master_sae, size_bits ON keys BEGIN
    SELECT RAISE(ABORT, 'a key''s ID, link, origin, master and size never change');
END;
