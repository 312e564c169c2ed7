//! The longest request stored for each workload.
//!
//! A contextless hop's parent is an inbound request of the same workload
//! that contains it, searched among requests that started at most the
//! configured longest request (`max_request_secs`, 10 s by default) before
//! it. At a few thousand requests a second per workload, that window holds
//! tens of thousands of hops, and every search walked them all. A parent
//! that contains the hop started no earlier than the hop's start minus the
//! parent's own duration, so the window only needs to be as wide as the
//! longest request of that workload actually stored, usually well under a
//! second. It is kept per workload here and in `workload_longest`, raised
//! before the commit that stores a longer request (a search never uses a
//! bound shorter than what is stored), and never lowered.

use std::collections::HashMap;

use rusqlite::Connection;

use super::IdMap;
use crate::store::StoreError;
use crate::store::common::HopRow;

/// The table, filled from the stored hops when it is new (a store written
/// by an earlier version).
pub(super) fn open(conn: &Connection) -> Result<IdMap<String, i64>, StoreError> {
    let exists: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE name = 'workload_longest'",
        [],
        |r| r.get(0),
    )?;
    if exists == 0 {
        conn.execute_batch(
            "BEGIN;
             CREATE TABLE workload_longest (
                 workload TEXT PRIMARY KEY,
                 longest_ns INTEGER NOT NULL
             ) WITHOUT ROWID;
             INSERT INTO workload_longest (workload, longest_ns)
                 SELECT workload, max(end_ns - start_ns) FROM hops WHERE context = 1
                 GROUP BY workload;
             COMMIT;",
        )?;
    }
    let mut stmt = conn.prepare("SELECT workload, longest_ns FROM workload_longest")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Raises the longest request of each workload that `rows` make longer, in
/// memory and in the table (in the caller's transaction, before it commits).
pub(super) fn raise<'a>(
    conn: &Connection,
    known: &mut IdMap<String, i64>,
    rows: impl Iterator<Item = &'a HopRow>,
) -> Result<(), StoreError> {
    let mut longer: HashMap<&str, i64> = HashMap::new();
    for row in rows.filter(|r| r.context) {
        let duration = row.end.saturating_sub(row.start);
        let stored = known.get(row.workload.as_str()).copied().unwrap_or(-1);
        if duration > stored {
            let d = longer.entry(row.workload.as_str()).or_insert(duration);
            *d = (*d).max(duration);
        }
    }
    if longer.is_empty() {
        return Ok(());
    }
    let mut upsert = conn.prepare_cached(
        "INSERT INTO workload_longest (workload, longest_ns) VALUES (?1, ?2)
         ON CONFLICT (workload) DO UPDATE SET longest_ns = max(longest_ns, excluded.longest_ns)",
    )?;
    for (workload, duration) in longer {
        upsert.execute(rusqlite::params![workload, duration])?;
        known.insert(workload.to_owned(), duration);
    }
    Ok(())
}
