//! The background assembler: re-assembles the chains that ingest touched,
//! with their neighbours in time, and stores the trees.
//!
//! Ingest marks chain ids dirty; every `interval` the assembler takes them
//! (at most [`BATCH`] at a time, in the order they were marked) and loads their hops, then the neighbours
//! that evidence may join: contextless hops in the same time window (which
//! a loaded chain may adopt), and for each contextless group the hops that
//! may be its parent (an inbound hop of the same workload around it, an
//! outbound hop with the same connection, a hop of the caller a node-agent
//! flow names), each with its whole chain. It runs [`assembly::assemble`]
//! and stores the trees that involve a dirty chain. The common case (every
//! hop carried context) costs one indexed query for the window's few
//! contextless hops.
//! Chains joined into another are deleted as chains of their own.
//!
//! The dirty set is mirrored durably by the store's pending chains (written
//! with the hops, cleared with the trees), so a restart resumes assembly of
//! everything acknowledged before a crash.
//!
//! Ingest hands the hops it just stored to the dirty set as well (up to
//! [`MAX_HANDED_HOPS`] waiting at a time), so the assembler does not read
//! them back: when the store holds exactly as many hops of a chain as were
//! handed over (one index count), the handed hops are the whole chain;
//! otherwise (hops stored before, or a restart) the chain is read from the
//! store.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, broadcast};

use custody_context::api::v1::HopEvent;

use crate::assembly::{self, ChainSummary, ChainTree, workload_uri};
use crate::metrics::{CoverageLabel, Metrics};
use crate::store::{Store, StoreError};

/// Keyed by ids that sidecars report; seeded per process.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Chains assembled per pass at most. Larger passes share a pass's fixed
/// costs (a synced commit of trees, the neighbour searches) among more
/// chains: 4,000 against 2,000 took 5% less CPU per ingested hop; 500
/// took more.
pub const BATCH: usize = 4_000;
/// Neighbour windows wider than this are not searched (nanoseconds).
pub const MAX_WINDOW_NANOS: u64 = 600_000_000_000;
/// Slack around a chain's interval when looking for neighbours.
pub const SLACK_NANOS: u64 = 1_000_000_000;
/// Stored hops kept in memory for the assembler at most; beyond that,
/// chains are marked without their hops and read back from the store.
pub const MAX_HANDED_HOPS: usize = 200_000;

/// Chain ids waiting for assembly, with the hops ingest stored for them
/// since they were last taken.
#[derive(Debug, Default)]
pub struct Dirty {
    inner: Mutex<DirtyInner>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct DirtyInner {
    /// In the order they were marked: a pass takes chains that arrived
    /// together, so its neighbour windows stay narrow (chain ids are
    /// random, so their own order would spread a pass over all of time),
    /// with when they were marked.
    order: VecDeque<(String, Instant)>,
    ids: HashSet<String>,
    hops: HashMap<String, Vec<HopEvent>>,
    handed: usize,
}

impl DirtyInner {
    fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back((id, Instant::now()));
        }
    }
}

impl Dirty {
    fn lock(&self) -> std::sync::MutexGuard<'_, DirtyInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks chains dirty.
    pub fn mark(&self, ids: impl IntoIterator<Item = String>) {
        let mut inner = self.lock();
        for id in ids {
            inner.insert(id);
        }
        drop(inner);
        self.notify.notify_one();
    }

    /// Marks the chains of hops just stored (each stored for the first
    /// time) dirty, and keeps the hops for the assembler while there is room.
    pub fn mark_stored(&self, hops: Vec<HopEvent>) {
        let mut inner = self.lock();
        let room = inner.handed + hops.len() <= MAX_HANDED_HOPS;
        for h in hops {
            if !inner.ids.contains(&h.chain_id) {
                inner.insert(h.chain_id.clone());
            }
            if room {
                inner.handed += 1;
                // Looked up by `&str` first: a chain's id is copied once, not per hop.
                match inner.hops.get_mut(h.chain_id.as_str()) {
                    Some(kept) => kept.push(h),
                    None => {
                        let mut kept = Vec::with_capacity(8);
                        let id = h.chain_id.clone();
                        kept.push(h);
                        inner.hops.insert(id, kept);
                    }
                }
            }
        }
        drop(inner);
        self.notify.notify_one();
    }

    fn take(&self, max: usize) -> (Vec<String>, HashMap<String, Vec<HopEvent>>) {
        let mut inner = self.lock();
        let mut ids = Vec::new();
        let mut hops = HashMap::default();
        while ids.len() < max {
            match inner.order.pop_front() {
                Some((id, _)) => {
                    inner.ids.remove(&id);
                    if let Some(h) = inner.hops.remove(&id) {
                        inner.handed -= h.len();
                        hops.insert(id.clone(), h);
                    }
                    ids.push(id);
                }
                None => break,
            }
        }
        (ids, hops)
    }

    /// Waits until something is marked.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// How many chains wait, and how long the oldest has waited.
    pub fn backlog(&self) -> (usize, Duration) {
        let inner = self.lock();
        let oldest = inner
            .order
            .front()
            .map_or(Duration::ZERO, |(_, since)| since.elapsed());
        (inner.order.len(), oldest)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.lock().ids.is_empty()
    }
}

/// Assembles and stores; counts chains entering a coverage class.
pub struct Assembler {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    dirty: Arc<Dirty>,
    updates: broadcast::Sender<Arc<ChainSummary>>,
    max_request_nanos: u64,
}

impl std::fmt::Debug for Assembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembler").finish_non_exhaustive()
    }
}

impl Assembler {
    /// An assembler reading `dirty` and announcing chains on `updates`; a
    /// contextless hop is searched a parent among requests that started at
    /// most `max_request_secs` before it.
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        dirty: Arc<Dirty>,
        updates: broadcast::Sender<Arc<ChainSummary>>,
        max_request_secs: u64,
    ) -> Self {
        Assembler {
            store,
            metrics,
            dirty,
            updates,
            max_request_nanos: max_request_secs.saturating_mul(1_000_000_000),
        }
    }

    /// One pass over at most [`BATCH`] dirty chains, assembled and stored;
    /// returns how many were taken.
    pub fn pass(&self) -> Result<usize, StoreError> {
        match self.prepare()? {
            Some(p) => self.store(p),
            None => Ok(0),
        }
    }

    /// The first half of a pass: takes at most [`BATCH`] dirty chains and
    /// assembles them; `None` when nothing waits. The trees are stored by
    /// [`Assembler::store`], which may run while the next pass is prepared:
    /// assembly reads only hops, which ingest alone writes, and the stores
    /// of successive passes run in order.
    pub fn prepare(&self) -> Result<Option<Prepared>, StoreError> {
        if let Err(error) = self.store.upkeep() {
            tracing::warn!(%error, "store upkeep failed; tried again before the next pass");
        }
        let (ids, handed) = self.dirty.take(BATCH);
        if ids.is_empty() {
            return Ok(None);
        }
        match self.assemble(&ids, handed) {
            Ok(Assembled { trees, generations }) => Ok(Some(Prepared {
                ids,
                trees,
                generations,
            })),
            Err(e) => {
                // Still pending in the store; try again on the next pass.
                self.dirty.mark(ids);
                Err(e)
            }
        }
    }

    /// Records how long a stage of a pass took (`custody_assembly_pass_seconds`).
    pub fn observe_stage(&self, stage: &'static str, took: Duration) {
        self.metrics
            .assembly_pass
            .get_or_create(&crate::metrics::StageLabel { stage })
            .observe(took.as_secs_f64());
    }

    /// The second half of a pass: stores the trees and counts and announces
    /// them; returns how many chains the pass took.
    pub fn store(&self, prepared: Prepared) -> Result<usize, StoreError> {
        let Prepared {
            ids,
            trees,
            generations,
        } = prepared;
        let superseded: Vec<String> = trees
            .iter()
            .flat_map(|t| t.summary.joined_chains.iter().cloned())
            .collect();
        let before = match self.store.put_chains(&trees, &superseded, &generations) {
            Ok(before) => before,
            Err(e) => {
                self.dirty.mark(ids);
                return Err(e);
            }
        };
        for (t, before) in trees.iter().zip(before) {
            let s = &t.summary;
            // Counted when the chain enters a class: once when first stored,
            // again only when re-assembly moves it to another class. The
            // previous class comes from the store, so neither new hops for
            // the same chain nor a restart count it again.
            if before != Some(s.coverage) {
                self.metrics
                    .chains
                    .get_or_create(&CoverageLabel {
                        coverage: s.coverage.as_str(),
                    })
                    .inc();
            }
            if self.updates.receiver_count() > 0 {
                // A listener gone since is fine.
                let _ = self.updates.send(Arc::new(s.clone()));
            }
        }
        Ok(ids.len())
    }

    /// The trees that involve a dirty chain, and the generations of the
    /// dirty chains read before their hops.
    fn assemble(
        &self,
        ids: &[String],
        mut handed: HashMap<String, Vec<HopEvent>>,
    ) -> Result<Assembled, StoreError> {
        let dirty: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        // The generations first: hops stored after this read keep their chain pending.
        let generations = self.store.pending_generations(ids)?;
        // Handed hops are the whole chain when the store holds no other
        // (handed hops are stored, each once, so equal counts mean equal sets).
        let (with_hops, mut read): (Vec<String>, Vec<String>) =
            ids.iter().cloned().partition(|id| handed.contains_key(id));
        let counts = self.store.chain_hop_counts(&with_hops)?;
        // Kept in the batches they came in: one vector of every hop would
        // be reallocated and copied as it grows, megabytes per pass.
        let mut hops = Loaded::default();
        for (id, count) in with_hops.into_iter().zip(counts) {
            match handed.remove(&id) {
                Some(h) if h.len() as u64 == count => hops.0.push(h),
                _ => read.push(id),
            }
        }
        hops.0.push(self.store.hops_of_chains(&read)?);
        let mut loaded: BTreeSet<String> = ids.iter().cloned().collect();
        let mut searched: BTreeSet<String> = BTreeSet::new();
        let mut flows = Vec::new();
        // A few rounds: neighbours of the dirty chains, then the neighbours'
        // whole chains (and their own adopted hops), so every stored tree is whole.
        for _ in 0..3 {
            let mut found = Vec::new();
            // Contextless hops a loaded chain may adopt: every kind of
            // evidence needs a loaded hop that contains the adopted one in
            // time or shares its connection, so the others are left out.
            if let Some((from, to)) = window(hops.iter())
                && to - from <= MAX_WINDOW_NANOS
            {
                let near = Near::new(hops.iter());
                found.extend(
                    self.store
                        .contextless_in_window(from, to)?
                        .into_iter()
                        .filter(|h| near.may_adopt(h)),
                );
            }
            // Parents for contextless groups: same workload in time, same
            // connection, or the caller a node-agent flow names.
            let mut by_chain: HashMap<&str, Vec<&HopEvent>> = HashMap::default();
            for h in hops.iter() {
                by_chain.entry(h.chain_id.as_str()).or_default().push(h);
            }
            // Roots of unsearched contextless groups, by the workload whose
            // inbound hops may contain them.
            let mut roots: HashMap<String, Vec<(u64, u64)>> = HashMap::default();
            let mut keys = Vec::new();
            let mut keyed = Vec::new();
            for (chain, members) in &by_chain {
                if searched.contains(*chain) || members.iter().any(|h| assembly::has_context(h)) {
                    continue;
                }
                searched.insert((*chain).to_owned());
                for h in members.iter().filter(|h| h.parent_span_id.is_empty()) {
                    let span = (
                        h.start_unix_nanos,
                        h.start_unix_nanos.saturating_add(h.duration_nanos),
                    );
                    roots
                        .entry(workload_uri(h.workload.as_ref()))
                        .or_default()
                        .push(span);
                    if let Some(c) = &h.connection {
                        let key = assembly::connection_key(c);
                        if !key.is_empty() {
                            keys.push(key.clone());
                            keyed.push((key, span));
                        }
                    }
                }
            }
            if !keys.is_empty() {
                found.extend(self.store.hops_by_connection(&keys)?);
                let seen = self.store.flows_by_connection(&keys)?;
                for (key, span) in &keyed {
                    for f in &seen {
                        if f.connection.as_ref().map(assembly::connection_key).as_ref() == Some(key)
                        {
                            let w = workload_uri(f.workload.as_ref());
                            if !w.is_empty() {
                                roots.entry(w).or_default().push(*span);
                            }
                        }
                    }
                }
                flows.extend(seen);
            }
            for (workload, spans) in &mut roots {
                spans.sort_unstable();
                // Only the hops that contain one of the roots.
                found.extend(self.store.hops_containing(
                    workload,
                    spans,
                    self.max_request_nanos,
                )?);
            }
            let new: Vec<String> = found
                .iter()
                .map(|h| h.chain_id.clone())
                .filter(|c| !loaded.contains(c))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if new.is_empty() {
                break;
            }
            hops.0.push(self.store.hops_of_chains(&new)?);
            loaded.extend(new);
        }
        let trees: Vec<ChainTree> = assembly::assemble(hops.iter(), &flows)
            .into_iter()
            .filter(|t| {
                dirty.contains(t.summary.chain_id.as_str())
                    || t.summary
                        .joined_chains
                        .iter()
                        .any(|j| dirty.contains(j.as_str()))
            })
            .collect();
        Ok(Assembled { trees, generations })
    }
}

/// What [`Assembler::assemble`] found.
struct Assembled {
    trees: Vec<ChainTree>,
    generations: Vec<(String, u64)>,
}

/// A pass assembled and not stored yet.
#[derive(Debug)]
pub struct Prepared {
    ids: Vec<String>,
    trees: Vec<ChainTree>,
    generations: Vec<(String, u64)>,
}

/// The hops loaded for one pass, in the batches they came in.
#[derive(Default)]
struct Loaded(Vec<Vec<HopEvent>>);

impl Loaded {
    fn iter(&self) -> impl Iterator<Item = &HopEvent> + Clone {
        self.0.iter().flatten()
    }
}

/// The intervals and connections of loaded hops, to tell which contextless
/// hops one of them may adopt.
struct Near {
    /// `(start, end)` sorted by start, with the greatest end so far.
    spans: Vec<(u64, u64)>,
    connections: HashSet<String>,
}

impl Near {
    fn new<'a>(hops: impl Iterator<Item = &'a HopEvent> + Clone) -> Self {
        let mut spans: Vec<(u64, u64)> = hops
            .clone()
            .map(|h| {
                (
                    h.start_unix_nanos,
                    h.start_unix_nanos.saturating_add(h.duration_nanos),
                )
            })
            .collect();
        spans.sort_unstable();
        let mut furthest = 0;
        for s in &mut spans {
            furthest = furthest.max(s.1);
            s.1 = furthest;
        }
        let connections = hops
            .filter_map(|h| h.connection.as_ref())
            .map(assembly::connection_key)
            .filter(|k| !k.is_empty())
            .collect();
        Near { spans, connections }
    }

    fn may_adopt(&self, h: &HopEvent) -> bool {
        let end = h.start_unix_nanos.saturating_add(h.duration_nanos);
        // The last loaded hop starting at or before `h`, and the furthest
        // end of those: some loaded hop contains `h` exactly when it is
        // at least `h`'s end.
        let before = self.spans.partition_point(|s| s.0 <= h.start_unix_nanos);
        if before > 0 && self.spans[before - 1].1 >= end {
            return true;
        }
        h.connection
            .as_ref()
            .is_some_and(|c| self.connections.contains(&assembly::connection_key(c)))
    }
}

fn window<'a>(hops: impl Iterator<Item = &'a HopEvent> + Clone) -> Option<(u64, u64)> {
    let from = hops.clone().map(|h| h.start_unix_nanos).min()?;
    let to = hops
        .map(|h| h.start_unix_nanos.saturating_add(h.duration_nanos))
        .max()?;
    Some((
        from.saturating_sub(SLACK_NANOS),
        to.saturating_add(SLACK_NANOS),
    ))
}

mod background;
pub(crate) use background::{ASSEMBLY_NICE, Background};

#[cfg(test)]
mod tests;
