//! The data classes each chain has touched in this pod.
//!
//! A database hop learns that a chain read, say, `pii.ssn`; the token the
//! application holds does not know it yet. The pod remembers it here, keyed
//! by chain id, so the next outbound call of the same chain is checked
//! against egress policy with that taint and carries it downstream in the
//! extended token. Entries live as long as a token can (the longest chain a
//! pod serves is bounded by token lifetime) and the table is bounded: when
//! full, the entries that have lived longest go first.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use custody_context::traceparent::TraceId;

#[derive(Debug)]
struct Entry {
    classes: BTreeSet<String>,
    touched: Instant,
    /// Order of the last change, to break ties between equal instants.
    seq: u64,
}

/// Chain id → data classes touched in this pod.
#[derive(Debug)]
pub struct TaintTable {
    entries: Mutex<(HashMap<TraceId, Entry>, u64)>,
    capacity: usize,
    ttl: Duration,
}

impl TaintTable {
    /// A table of at most `capacity` chains, each kept for `ttl` after its
    /// last new class.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        TaintTable {
            entries: Mutex::new((HashMap::new(), 0)),
            capacity: capacity.max(1),
            ttl,
        }
    }

    /// Adds classes to a chain's taint.
    pub fn add<'a>(&self, chain: TraceId, classes: impl IntoIterator<Item = &'a str>) {
        let mut classes = classes.into_iter().peekable();
        if classes.peek().is_none() {
            return;
        }
        let now = Instant::now();
        let mut guard = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let (entries, seq) = &mut *guard;
        *seq += 1;
        if !entries.contains_key(&chain) && entries.len() >= self.capacity {
            entries.retain(|_, e| now.duration_since(e.touched) < self.ttl);
            if entries.len() >= self.capacity {
                // Evict the oldest tenth at once so eviction stays rare.
                let mut ages: Vec<_> = entries.iter().map(|(k, e)| (e.seq, *k)).collect();
                ages.sort_unstable_by_key(|(s, _)| *s);
                for (_, k) in ages.into_iter().take((self.capacity / 10).max(1)) {
                    entries.remove(&k);
                }
            }
        }
        let entry = entries.entry(chain).or_insert_with(|| Entry {
            classes: BTreeSet::new(),
            touched: now,
            seq: *seq,
        });
        for class in classes {
            if !entry.classes.contains(class) {
                entry.classes.insert(class.to_owned());
                entry.touched = now;
                entry.seq = *seq;
            }
        }
    }

    /// The classes a chain touched here that `known` does not hold yet.
    pub fn missing_from(&self, chain: TraceId, known: &BTreeSet<String>) -> Vec<String> {
        let guard = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.0.get(&chain) {
            Some(e) if Instant::now().duration_since(e.touched) < self.ttl => e
                .classes
                .iter()
                .filter(|c| !known.contains(*c))
                .cloned()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// How many chains are held.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .len()
    }

    /// Whether no chain is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u8) -> TraceId {
        TraceId::from_bytes([n + 1; 16]).unwrap()
    }

    #[test]
    fn classes_accumulate_per_chain_and_known_ones_are_not_repeated() {
        let table = TaintTable::new(16, Duration::from_secs(60));
        table.add(chain(1), ["pii.ssn"]);
        table.add(chain(1), ["pii.email", "pii.ssn"]);
        table.add(chain(2), ["financial.card"]);
        assert_eq!(
            table.missing_from(chain(1), &BTreeSet::from(["pii.email".to_owned()])),
            vec!["pii.ssn".to_owned()]
        );
        assert_eq!(
            table.missing_from(chain(2), &BTreeSet::new()),
            vec!["financial.card".to_owned()]
        );
        assert!(table.missing_from(chain(3), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn the_table_stays_bounded_and_evicts_the_oldest() {
        let table = TaintTable::new(10, Duration::from_secs(60));
        for n in 0..50 {
            table.add(chain(n), ["pii.email"]);
        }
        assert!(table.len() <= 10);
        assert_eq!(table.missing_from(chain(49), &BTreeSet::new()).len(), 1);
        assert!(table.missing_from(chain(0), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn entries_expire() {
        let table = TaintTable::new(10, Duration::ZERO);
        table.add(chain(1), ["pii.email"]);
        assert!(table.missing_from(chain(1), &BTreeSet::new()).is_empty());
    }
}
