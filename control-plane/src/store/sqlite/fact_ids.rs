//! Numbers for fact values.
//!
//! A chain is found by its facts: `(kind, value)` pairs such as
//! `("service", "spiffe://td/ns/shop/sa/orders")`, a handful per chain. Each
//! fact row was keyed by the pair itself, so every insert compared long
//! strings that share their first 30 bytes at each level of the B-tree, and
//! an index page held few rows. Each distinct pair is now numbered once
//! (`fact_values`) and fact rows are three integers: `(fact, last_ns,
//! chain_seq)`. The writer keeps the numbers it has used in memory.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension as _};

use crate::store::StoreError;

/// Keyed by values that sidecars report; seeded per process.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Fact numbers remembered at most; the map is emptied when full (the
/// values of recent chains are what new chains repeat).
const REMEMBERED: usize = 100_000;

/// Fact numbers known to be committed, by kind and value; used and changed
/// with the writer held.
#[derive(Debug, Default)]
pub(super) struct FactIds {
    known: Map<&'static str, Map<String, i64>>,
    len: usize,
}

impl FactIds {
    fn get(&self, kind: &str, value: &str) -> Option<i64> {
        self.known.get(kind)?.get(value).copied()
    }

    /// Remembers the numbers given by a transaction that committed.
    pub(super) fn extend(&mut self, given: Given) {
        if self.len + given.0.len() > REMEMBERED {
            self.clear();
        }
        for ((kind, value), id) in given.0 {
            if self
                .known
                .entry(kind)
                .or_default()
                .insert(value, id)
                .is_none()
            {
                self.len += 1;
            }
        }
    }

    /// Forgets every number (after retention deleted unused values).
    pub(super) fn clear(&mut self) {
        self.known.clear();
        self.len = 0;
    }
}

/// Numbers given by a transaction not yet committed: remembered only once
/// it is (a rolled-back number may be given again to another value).
#[derive(Debug, Default)]
pub(super) struct Given(Map<(&'static str, String), i64>);

/// The number of fact `(kind, value)`: remembered, given earlier in this
/// transaction, or read from `fact_values`; a new value is numbered when
/// `create`, and `None` otherwise.
pub(super) fn fact_id(
    conn: &Connection,
    known: &FactIds,
    given: &mut Given,
    (kind, value): (&'static str, &str),
    create: bool,
) -> Result<Option<i64>, StoreError> {
    if let Some(id) = known.get(kind, value) {
        return Ok(Some(id));
    }
    if let Some(id) = given.0.get(&(kind, value.to_owned())) {
        return Ok(Some(*id));
    }
    let stored: Option<i64> = conn
        .prepare_cached("SELECT id FROM fact_values WHERE kind = ?1 AND value = ?2")?
        .query_row([kind, value], |r| r.get(0))
        .optional()?;
    let id = match stored {
        Some(id) => id,
        None if create => {
            conn.prepare_cached("INSERT INTO fact_values (kind, value) VALUES (?1, ?2)")?
                .execute([kind, value])?;
            conn.last_insert_rowid()
        }
        None => return Ok(None),
    };
    given.0.insert((kind, value.to_owned()), id);
    Ok(Some(id))
}

/// Moves fact rows keyed by `(kind, value, last_ns, chain_seq)` to numbered
/// values; nothing to do on a store that has them already.
pub(super) fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let by_value: i64 = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('chain_facts') WHERE name = 'kind'",
        [],
        |r| r.get(0),
    )?;
    if by_value == 0 {
        return Ok(());
    }
    tracing::info!("store: numbering fact values (one-time migration)");
    conn.execute_batch(&format!(
        "BEGIN;
         {VALUES_TABLE}
         INSERT OR IGNORE INTO fact_values (kind, value)
             SELECT DISTINCT kind, value FROM chain_facts;
         CREATE TABLE chain_facts_numbered (
             fact INTEGER NOT NULL,
             last_ns INTEGER NOT NULL,
             chain_seq INTEGER NOT NULL,
             PRIMARY KEY (fact, last_ns, chain_seq)
         ) WITHOUT ROWID;
         INSERT OR IGNORE INTO chain_facts_numbered (fact, last_ns, chain_seq)
             SELECT v.id, f.last_ns, f.chain_seq
             FROM chain_facts f JOIN fact_values v ON v.kind = f.kind AND v.value = f.value;
         DROP TABLE chain_facts;
         ALTER TABLE chain_facts_numbered RENAME TO chain_facts;
         COMMIT;"
    ))?;
    Ok(())
}

/// The table of numbered fact values (also part of the store's schema).
pub(super) const VALUES_TABLE: &str = "
CREATE TABLE IF NOT EXISTS fact_values (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    UNIQUE (kind, value)
);";

/// Deletes the values no fact row uses any more (after retention): chains
/// joined into others are each a value of their own.
pub(super) fn delete_unused(conn: &Connection) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "DELETE FROM fact_values
         WHERE NOT EXISTS (SELECT 1 FROM chain_facts WHERE fact = fact_values.id)",
        [],
    )?)
}
