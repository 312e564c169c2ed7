//! Chain numbers given since the chain-id index was last written.
//!
//! Hops name their chain by a number given in order of first sight; the
//! index from chain id to number (`chain_ids`) is what lookups by id go
//! through. Chain ids are random, so writing each new id as it is numbered
//! lands every new chain on a random page of that index: at millions of
//! chains, one page written to the log per new chain and commit, more than
//! the chain's hops cost. New numbers are kept here instead and written to
//! the index in one sorted batch every [`FLUSH_AT`] chains, so each page is
//! written about once per batch. Every lookup by id asks here first.
//!
//! The index has a file of its own (`ids.db`) and a writer of its own, and
//! the batch is written on the assembler's thread before a pass
//! (`Store::upkeep`): at millions of chains it takes up to a second, which
//! neither an acknowledgement of hops nor a store of trees waits for. Only
//! if twice as many wait (assembly stalled) does a commit of hops write
//! them.
//!
//! Nothing is lost in a crash: a hop's row carries its chain's number and
//! its body the chain's id, so numbers above the highest one in the index
//! are read back from the hops when the store is opened
//! ([`recover`]).

use std::collections::{BTreeMap, HashMap};

use custody_context::api::v1::HopEvent;
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension as _};

use crate::store::StoreError;

/// Keyed by chain ids that sidecars report; seeded per process.
type IdMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// New chains numbered between two writes of the index. Each costs about
/// 100 bytes of memory, and at most twice this many chains' hops are read
/// back when the store is opened after a crash.
pub(super) const FLUSH_AT: usize = 100_000;

/// Numbers given and not yet in the index, and the next number to give.
#[derive(Debug)]
pub(super) struct ChainNumbers {
    unflushed: IdMap<String, i64>,
    next: i64,
    flush_at: usize,
}

impl ChainNumbers {
    /// Numbers continue after `highest`, the highest one in use.
    pub(super) fn after(highest: i64) -> Self {
        ChainNumbers {
            unflushed: IdMap::default(),
            next: highest.saturating_add(1),
            flush_at: FLUSH_AT,
        }
    }

    /// The number of `chain_id` if it was given since the last flush.
    pub(super) fn get(&self, chain_id: &str) -> Option<i64> {
        self.unflushed.get(chain_id).copied()
    }

    /// Chain ids by number, of every number given since the last flush.
    pub(super) fn by_seq(&self) -> HashMap<i64, String> {
        self.unflushed
            .iter()
            .map(|(id, seq)| (*seq, id.clone()))
            .collect()
    }

    /// The next number, not yet given to anything.
    pub(super) fn take_next(&mut self) -> i64 {
        let seq = self.next;
        self.next = self.next.saturating_add(1);
        seq
    }

    /// Remembers numbers given by a transaction about to commit.
    pub(super) fn extend<'a>(&mut self, given: impl IntoIterator<Item = (&'a str, i64)>) {
        self.unflushed
            .extend(given.into_iter().map(|(id, seq)| (id.to_owned(), seq)));
    }

    /// Forgets numbers given by a transaction that did not commit.
    pub(super) fn forget<'a>(&mut self, given: impl IntoIterator<Item = &'a str>) {
        for id in given {
            self.unflushed.remove(id);
        }
    }

    /// Whether the index should be written: by the upkeep before the next
    /// pass of assembly, so that no commit of hops waits for it.
    pub(super) fn due(&self) -> bool {
        self.unflushed.len() >= self.flush_at
    }

    /// Whether the index is so far behind (no pass wrote it: assembly
    /// stalled) that the next commit of hops writes it, so that memory
    /// stays bounded.
    pub(super) fn overdue(&self) -> bool {
        self.unflushed.len() >= self.flush_at.saturating_mul(2)
    }

    /// Every unflushed number, sorted by chain id: what [`write`] takes.
    /// A copy, so that lookups go on while it is written.
    pub(super) fn sorted(&self) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = self
            .unflushed
            .iter()
            .map(|(id, seq)| (id.clone(), *seq))
            .collect();
        out.sort_unstable();
        out
    }

    /// The numbers [`write`] wrote are committed: lookups find them in
    /// the index from now on. Numbers given since [`ChainNumbers::sorted`]
    /// stay.
    pub(super) fn flushed(&mut self, written: &[(String, i64)]) {
        for (id, _) in written {
            self.unflushed.remove(id);
        }
        if self.unflushed.is_empty() {
            // Give back the memory of a large batch.
            self.unflushed = IdMap::default();
        }
    }

    /// Flushes after `n` new chains instead of [`FLUSH_AT`].
    #[cfg(test)]
    pub(super) fn flush_every(&mut self, n: usize) {
        self.flush_at = n.max(1);
    }
}

/// Writes `sorted` numbers to the index in the caller's transaction; a
/// number already written (by the other writer, from the same memory) is
/// left as it is.
pub(super) fn write(tx: &Connection, sorted: &[(String, i64)]) -> Result<(), StoreError> {
    let mut add =
        tx.prepare_cached("INSERT OR IGNORE INTO chain_ids (seq, chain_id) VALUES (?1, ?2)")?;
    for (id, seq) in sorted {
        add.execute(rusqlite::params![seq, id])?;
    }
    Ok(())
}

/// Puts back into the index the numbers of chains whose hops were stored
/// and whose id was not yet written when the process stopped, then gives
/// the numbers to continue from. Runs when the store is opened, before
/// anything else writes.
pub(super) fn recover(conn: &mut Connection) -> Result<ChainNumbers, StoreError> {
    let started = std::time::Instant::now();
    let indexed: i64 = conn.query_row("SELECT coalesce(max(seq), 0) FROM chain_ids", [], |r| {
        r.get(0)
    })?;
    let lost: BTreeMap<String, i64> = {
        let mut stmt = conn.prepare(
            "SELECT chain_seq, body FROM hops WHERE chain_seq > ?1 ORDER BY chain_seq, rowid",
        )?;
        let mut rows = stmt.query([indexed])?;
        let mut lost = BTreeMap::new();
        let mut last = None;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            // One hop names the chain: the others carry the same id.
            if last == Some(seq) {
                continue;
            }
            let body = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
            match HopEvent::decode(body) {
                Ok(hop) => {
                    lost.insert(hop.chain_id, seq);
                    last = Some(seq);
                }
                // The chain's next hop may still name it; the store opens either way.
                Err(error) => tracing::warn!(%error, seq, "store: a stored hop does not decode"),
            }
        }
        lost
    };
    if !lost.is_empty() {
        let tx = conn.transaction()?;
        {
            let mut add =
                tx.prepare("INSERT OR IGNORE INTO chain_ids (seq, chain_id) VALUES (?1, ?2)")?;
            for (id, seq) in &lost {
                add.execute(rusqlite::params![seq, id])?;
            }
        }
        tx.commit()?;
        tracing::info!(
            chains = lost.len(),
            took_ms = started.elapsed().as_millis(),
            "store: wrote the ids of chains numbered before the last stop"
        );
    }
    // Numbers are never given twice, whatever still uses them.
    let highest: i64 = conn
        .query_row(
            "SELECT max(coalesce((SELECT max(seq) FROM chain_ids), 0),
                        coalesce((SELECT max(chain_seq) FROM hops), 0),
                        coalesce((SELECT max(chain_seq) FROM chains), 0),
                        coalesce((SELECT max(chain_seq) FROM pending), 0))",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    Ok(ChainNumbers::after(highest))
}
