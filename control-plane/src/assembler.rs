//! The background assembler: re-assembles the chains that ingest touched,
//! with their neighbours in time, and stores the trees.
//!
//! Ingest marks chain ids dirty; every `interval` the assembler takes them
//! (at most [`BATCH`] at a time), loads their hops, the hops of the same
//! workloads in the same time window (whose chains may adopt them or be
//! adopted by them) and the node-agent flows of that window, runs
//! [`assembly::assemble`], and stores the trees that involve a dirty chain.
//! Chains joined into another are deleted as chains of their own.
//!
//! The dirty set is mirrored durably by the store's pending chains (written
//! with the hops, cleared with the trees), so a restart resumes assembly of
//! everything acknowledged before a crash.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, broadcast};

use crate::assembly::{self, ChainSummary, ChainTree, Coverage, workload_uri};
use crate::metrics::{CoverageLabel, Metrics};
use crate::store::{Store, StoreError};

/// Chains assembled per pass at most.
pub const BATCH: usize = 2_000;
/// Neighbour windows wider than this are not searched (nanoseconds).
pub const MAX_WINDOW_NANOS: u64 = 600_000_000_000;
/// Slack around a chain's interval when looking for neighbours.
pub const SLACK_NANOS: u64 = 1_000_000_000;

/// Chain ids waiting for assembly.
#[derive(Debug, Default)]
pub struct Dirty {
    ids: Mutex<BTreeSet<String>>,
    notify: Notify,
}

impl Dirty {
    /// Marks chains dirty.
    pub fn mark(&self, ids: impl IntoIterator<Item = String>) {
        let mut set = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        set.extend(ids);
        drop(set);
        self.notify.notify_one();
    }

    fn take(&self, max: usize) -> Vec<String> {
        let mut set = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = Vec::new();
        while out.len() < max {
            match set.pop_first() {
                Some(id) => out.push(id),
                None => break,
            }
        }
        out
    }

    /// Waits until something is marked.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }
}

/// Assembles and stores; remembers each chain's last class for the metric.
pub struct Assembler {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    dirty: Arc<Dirty>,
    classes: Mutex<HashMap<String, Coverage>>,
    updates: broadcast::Sender<Arc<ChainSummary>>,
}

impl std::fmt::Debug for Assembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembler").finish_non_exhaustive()
    }
}

impl Assembler {
    /// An assembler reading `dirty` and announcing chains on `updates`.
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        dirty: Arc<Dirty>,
        updates: broadcast::Sender<Arc<ChainSummary>>,
    ) -> Self {
        Assembler {
            store,
            metrics,
            dirty,
            classes: Mutex::new(HashMap::new()),
            updates,
        }
    }

    /// One pass over at most [`BATCH`] dirty chains; returns how many were taken.
    pub fn pass(&self) -> Result<usize, StoreError> {
        let ids = self.dirty.take(BATCH);
        if ids.is_empty() {
            return Ok(0);
        }
        match self.assemble(&ids) {
            Ok(()) => Ok(ids.len()),
            Err(e) => {
                // Still pending in the store; try again on the next pass.
                self.dirty.mark(ids);
                Err(e)
            }
        }
    }

    fn assemble(&self, ids: &[String]) -> Result<(), StoreError> {
        let dirty: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        let mut hops = self.store.hops_of_chains(ids)?;
        let mut loaded: BTreeSet<String> = ids.iter().cloned().collect();
        // Two rounds: neighbours of the dirty chains, then the rest of the
        // neighbours' own chains, so every stored tree is whole.
        for _ in 0..2 {
            let Some((from, to)) = window(&hops) else {
                break;
            };
            if to - from > MAX_WINDOW_NANOS {
                break;
            }
            let workloads: Vec<String> = hops
                .iter()
                .map(|h| workload_uri(h.workload.as_ref()))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let near = self.store.hops_in_window(&workloads, from, to)?;
            let new: Vec<String> = near
                .iter()
                .map(|h| h.chain_id.clone())
                .filter(|c| !loaded.contains(c))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if new.is_empty() {
                break;
            }
            hops.extend(self.store.hops_of_chains(&new)?);
            loaded.extend(new);
        }
        let flows = match window(&hops) {
            Some((from, to)) if to - from <= MAX_WINDOW_NANOS => {
                self.store.flows_in_window(from, to)?
            }
            _ => Vec::new(),
        };
        let trees: Vec<ChainTree> = assembly::assemble(&hops, &flows)
            .into_iter()
            .filter(|t| {
                dirty.contains(t.summary.chain_id.as_str())
                    || t.summary
                        .joined_chains
                        .iter()
                        .any(|j| dirty.contains(j.as_str()))
            })
            .collect();
        let superseded: Vec<String> = trees
            .iter()
            .flat_map(|t| t.summary.joined_chains.iter().cloned())
            .collect();
        self.store.put_chains(&trees, &superseded, ids)?;
        let mut classes = self
            .classes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if classes.len() > 1_000_000 {
            classes.clear();
        }
        for t in &trees {
            let s = &t.summary;
            if classes.insert(s.chain_id.clone(), s.coverage) != Some(s.coverage) {
                self.metrics
                    .chains
                    .get_or_create(&CoverageLabel {
                        coverage: s.coverage.as_str(),
                    })
                    .inc();
            }
            // Nobody listening is fine.
            let _ = self.updates.send(Arc::new(s.clone()));
        }
        Ok(())
    }
}

fn window(hops: &[custody_context::api::v1::HopEvent]) -> Option<(u64, u64)> {
    let from = hops.iter().map(|h| h.start_unix_nanos).min()?;
    let to = hops
        .iter()
        .map(|h| h.start_unix_nanos.saturating_add(h.duration_nanos))
        .max()?;
    Some((
        from.saturating_sub(SLACK_NANOS),
        to.saturating_add(SLACK_NANOS),
    ))
}
