//! Whole-database consistency check ([`crate::KeyPool::verify_integrity`]).

use std::path::Path;

use sqlx::Row;
use sqlx::sqlite::Sqlite;

use crate::db::DbResult;
use crate::error::PoolError;
use crate::types::IntegrityReport;

/// Queries that must return no rows; each row found is described by the label and the row's
/// columns.
const MUST_BE_EMPTY: &[(&str, &str)] = &[
    (
        "block counters differ from the blocks",
        "SELECT link_id, owner, state, sum(n), sum(r) FROM ( \
           SELECT link_id, owner, state, count(*) AS n, sum(len - consumed) AS r FROM blocks GROUP BY 1, 2, 3 \
           UNION ALL SELECT link_id, owner, state, -blocks, -remaining_bytes FROM block_counts) \
         GROUP BY 1, 2, 3 HAVING sum(n) <> 0 OR sum(r) <> 0",
    ),
    (
        "key counters differ from the keys",
        "SELECT link_id, origin, state, sum(n), sum(b) FROM ( \
           SELECT link_id, origin, state, count(*) AS n, sum(size_bits) AS b FROM keys GROUP BY 1, 2, 3 \
           UNION ALL SELECT link_id, origin, state, -keys, -bits FROM key_counts) \
         GROUP BY 1, 2, 3 HAVING sum(n) <> 0 OR sum(b) <> 0",
    ),
    (
        "SAE pair counters differ from the keys",
        "SELECT link_id, origin, master_sae, slave_sae, state, sum(n) FROM ( \
           SELECT k.link_id, k.origin, k.master_sae, s.slave_sae, s.state, count(*) AS n \
             FROM key_slaves s JOIN keys k ON k.id = s.key_row GROUP BY 1, 2, 3, 4, 5 \
           UNION ALL SELECT link_id, origin, master_sae, slave_sae, state, -keys FROM pair_counts) \
         GROUP BY 1, 2, 3, 4, 5 HAVING sum(n) <> 0",
    ),
    (
        "key segments overlap",
        "SELECT block_row, byte_offset, prev_end FROM ( \
           SELECT block_row, byte_offset, \
                  lag(byte_offset + len) OVER (PARTITION BY block_row ORDER BY byte_offset) AS prev_end \
             FROM key_segments) \
         WHERE prev_end > byte_offset",
    ),
    (
        "key segment outside its block",
        "SELECT b.block_id, s.byte_offset, s.len, b.len FROM key_segments s JOIN blocks b ON b.id = s.block_row \
         WHERE s.byte_offset + s.len > b.len",
    ),
    (
        // Live blocks: exact (their keys are never pruned). Spent blocks: keys may be pruned.
        "block's consumed count differs from the bytes cut from it",
        "SELECT b.block_id, b.state, b.consumed, coalesce(sum(s.len), 0) FROM blocks b \
           LEFT JOIN key_segments s ON s.block_row = b.id \
         GROUP BY b.id HAVING b.consumed < coalesce(sum(s.len), 0) \
           OR (b.state IN ('unconfirmed', 'confirmed') AND b.consumed <> coalesce(sum(s.len), 0))",
    ),
    (
        "key size differs from its segments",
        "SELECT k.key_id, k.size_bits, 8 * coalesce(sum(s.len), 0) FROM keys k \
           LEFT JOIN key_segments s ON s.key_row = k.id \
         GROUP BY k.id HAVING k.size_bits <> 8 * coalesce(sum(s.len), 0)",
    ),
    (
        "key cut from a block of the wrong owner or link",
        "SELECT k.key_id, k.origin, b.block_id, b.owner FROM keys k \
           JOIN links l ON l.link_id = k.link_id \
           JOIN key_segments s ON s.key_row = k.id \
           JOIN blocks b ON b.id = s.block_row \
         WHERE ((k.origin = 'local') <> (b.owner = l.side)) OR b.link_id <> k.link_id",
    ),
    (
        "owned block not cut contiguously from its start",
        "SELECT b.block_id, b.consumed, max(s.byte_offset + s.len) FROM blocks b \
           JOIN links l ON l.link_id = b.link_id \
           JOIN key_segments s ON s.block_row = b.id \
         WHERE b.owner = l.side GROUP BY b.id \
         HAVING max(s.byte_offset + s.len) > b.consumed \
             OR (b.state = 'confirmed' AND max(s.byte_offset + s.len) <> b.consumed)",
    ),
    (
        "key without slave SAEs",
        "SELECT k.key_id FROM keys k WHERE NOT EXISTS (SELECT 1 FROM key_slaves s WHERE s.key_row = k.id)",
    ),
    (
        "key state disagrees with its slaves' states",
        "SELECT k.key_id, k.state FROM keys k WHERE \
           (k.state = 'assigned' AND NOT EXISTS \
              (SELECT 1 FROM key_slaves s WHERE s.key_row = k.id AND s.state = 'assigned')) \
           OR (k.state <> 'assigned' AND EXISTS \
              (SELECT 1 FROM key_slaves s WHERE s.key_row = k.id AND s.state = 'assigned'))",
    ),
];

pub(crate) async fn verify(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    path: &Path,
) -> Result<IntegrityReport, PoolError> {
    let mut report = IntegrityReport::default();
    let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql);
    report.blocks =
        u64::try_from(count("SELECT count(*) FROM blocks").fetch_one(&mut **tx).await.db(path)?).unwrap_or(0);
    report.keys =
        u64::try_from(count("SELECT count(*) FROM keys").fetch_one(&mut **tx).await.db(path)?).unwrap_or(0);
    report.segments =
        u64::try_from(count("SELECT count(*) FROM key_segments").fetch_one(&mut **tx).await.db(path)?)
            .unwrap_or(0);
    for (label, sql) in MUST_BE_EMPTY {
        let rows = sqlx::query(*sql).fetch_all(&mut **tx).await.db(path)?;
        for row in rows.iter().take(20) {
            let mut cols = Vec::new();
            for i in 0..row.len() {
                let v: Option<String> = row
                    .try_get::<Option<i64>, _>(i)
                    .map(|o| o.map(|n| n.to_string()))
                    .or_else(|_| row.try_get::<Option<String>, _>(i))
                    .unwrap_or(None);
                cols.push(v.unwrap_or_else(|| "NULL".into()));
            }
            report.problems.push(format!("{label}: {}", cols.join(" | ")));
        }
        if rows.len() > 20 {
            report.problems.push(format!("{label}: {} more", rows.len() - 20));
        }
    }
    let owners = sqlx::query("SELECT block_id, owner FROM blocks").fetch_all(&mut **tx).await.db(path)?;
    for row in owners {
        let block_id: String = row.try_get(0).db(path)?;
        let owner: String = row.try_get(1).db(path)?;
        if crate::types::block_owner(&block_id).as_str() != owner {
            report
                .problems
                .push(format!("block owner differs from the ownership rule: {block_id} stored as {owner}"));
        }
    }
    Ok(report)
}
