//! The assembler against the real store: `custody_chains_total` counts a
//! chain when it enters a class, not every time it is re-assembled.

use custody_context::api::v1;

use super::*;
use crate::assembly::Coverage;
use crate::metrics::Metrics;
use crate::store::{SqliteOptions, SqliteStore};

const CHAIN: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn hop(id: &str, span: &str, parent: &str, start: u64) -> HopEvent {
    HopEvent {
        schema_version: 1,
        event_id: id.into(),
        chain_id: CHAIN.into(),
        span_id: span.into(),
        parent_span_id: parent.into(),
        workload: Some(v1::WorkloadId {
            trust_domain: "td".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            pod: String::new(),
        }),
        direction: v1::Direction::Inbound as i32,
        initiator: Some(v1::Initiator {
            subject: "alice".into(),
            kind: v1::InitiatorKind::Human as i32,
            actors: vec![],
            scope: String::new(),
        }),
        attribution: Some(v1::Attribution {
            method: v1::AttributionMethod::Propagated as i32,
            confidence: 1.0,
        }),
        context_outcome: v1::ContextOutcome::Propagated as i32,
        start_unix_nanos: start,
        duration_nanos: 1_000,
        ..Default::default()
    }
}

struct Fixture {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    dirty: Arc<Dirty>,
}

impl Fixture {
    /// A new assembler over the same store, as after a restart.
    fn assembler(&self) -> Assembler {
        let (updates, _) = broadcast::channel(16);
        Assembler::new(
            self.store.clone(),
            self.metrics.clone(),
            self.dirty.clone(),
            updates,
            10,
        )
    }

    /// Stores and hands the new hops to the assembler, as gRPC ingest does.
    fn ingest(&self, assembler: &Assembler, hops: &[HopEvent]) {
        let out = self.store.put_hops(hops).unwrap();
        let fresh = hops
            .iter()
            .zip(&out.fresh)
            .filter(|(_, f)| **f)
            .map(|(h, _)| h.clone())
            .collect();
        self.dirty.mark_stored(fresh);
        while assembler.pass().unwrap() > 0 {}
    }

    /// Stores and marks the chains only, as after a restart.
    fn ingest_unhanded(&self, assembler: &Assembler, hops: &[HopEvent]) {
        let out = self.store.put_hops(hops).unwrap();
        self.dirty.mark(out.chains);
        while assembler.pass().unwrap() > 0 {}
    }

    fn counted(&self, coverage: Coverage) -> u64 {
        self.metrics
            .chains
            .get_or_create(&CoverageLabel {
                coverage: coverage.as_str(),
            })
            .get()
    }
}

#[test]
fn a_chain_counts_once_per_class_it_enters() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&SqliteOptions {
        data_dir: dir.path().to_path_buf(),
        sync_full: false,
    })
    .unwrap();
    let f = Fixture {
        store: Arc::new(store),
        metrics: Arc::new(Metrics::new()),
        dirty: Arc::new(Dirty::default()),
    };
    let assembler = f.assembler();
    f.ingest(&assembler, &[hop("a", "1111111111111111", "", 100)]);
    assert_eq!(f.counted(Coverage::Propagated), 1);
    // New hops of the same chain, same class: not counted again.
    f.ingest(
        &assembler,
        &[hop("b", "2222222222222222", "1111111111111111", 200)],
    );
    f.ingest(
        &assembler,
        &[hop("c", "3333333333333333", "2222222222222222", 300)],
    );
    assert_eq!(f.counted(Coverage::Propagated), 1);
    // Nor after a restart (a new assembler knows nothing in memory).
    let restarted = f.assembler();
    f.ingest(
        &restarted,
        &[hop("d", "4444444444444444", "3333333333333333", 400)],
    );
    assert_eq!(f.counted(Coverage::Propagated), 1);
    // A hop whose parent never arrived: the chain moves to partial, once.
    f.ingest(
        &restarted,
        &[hop("e", "5555555555555555", "9999999999999999", 500)],
    );
    f.ingest(
        &restarted,
        &[hop("f", "6666666666666666", "5555555555555555", 600)],
    );
    assert_eq!(f.counted(Coverage::Partial), 1);
    assert_eq!(f.counted(Coverage::Propagated), 1);
    // The parent arrives: back to propagated, counted as a new entry.
    f.ingest(
        &restarted,
        &[hop("g", "9999999999999999", "4444444444444444", 450)],
    );
    assert_eq!(f.counted(Coverage::Propagated), 2);
    assert_eq!(f.counted(Coverage::Partial), 1);
    assert_eq!(f.store.chain(CHAIN).unwrap().unwrap().hops.len(), 7);
}

#[test]
fn handed_hops_are_completed_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&SqliteOptions {
        data_dir: dir.path().to_path_buf(),
        sync_full: false,
    })
    .unwrap();
    let f = Fixture {
        store: Arc::new(store),
        metrics: Arc::new(Metrics::new()),
        dirty: Arc::new(Dirty::default()),
    };
    let assembler = f.assembler();
    // Stored but not handed over (as before a restart), then one hop handed.
    let a = hop("a", "1111111111111111", "", 100);
    f.store.put_hops(std::slice::from_ref(&a)).unwrap();
    f.ingest(
        &assembler,
        &[hop("b", "2222222222222222", "1111111111111111", 200)],
    );
    let tree = f.store.chain(CHAIN).unwrap().unwrap();
    assert_eq!(tree.hops.len(), 2, "the stored hop is read back");
    assert_eq!(tree.summary.hop_count, 2);
    // Only handed hops: the tree is the same as from the store.
    f.ingest(
        &assembler,
        &[hop("c", "3333333333333333", "2222222222222222", 300)],
    );
    f.ingest_unhanded(
        &assembler,
        &[hop("d", "4444444444444444", "3333333333333333", 400)],
    );
    let tree = f.store.chain(CHAIN).unwrap().unwrap();
    assert_eq!(tree.hops.len(), 4);
    assert!(f.store.pending_chains(10).unwrap().is_empty());
    assert!(f.dirty.is_empty());
    // A duplicate is not handed over a second time.
    f.ingest(
        &assembler,
        &[hop("d", "4444444444444444", "3333333333333333", 400)],
    );
    assert_eq!(f.store.chain(CHAIN).unwrap().unwrap().hops.len(), 4);
}

#[test]
fn dirty_chains_are_taken_in_the_order_they_arrived() {
    let dirty = Dirty::default();
    dirty.mark(["c".to_owned(), "a".to_owned()]);
    dirty.mark(["b".to_owned(), "c".to_owned()]);
    let (first, _) = dirty.take(2);
    assert_eq!(first, vec!["c".to_owned(), "a".to_owned()]);
    // Taken chains may be marked again; they queue behind the others.
    dirty.mark(["a".to_owned()]);
    let (rest, _) = dirty.take(10);
    assert_eq!(rest, vec!["b".to_owned(), "a".to_owned()]);
    assert!(dirty.is_empty());
}

#[test]
fn the_backlog_counts_waiting_chains_and_the_oldest_wait() {
    let dirty = Dirty::default();
    assert_eq!(dirty.backlog(), (0, Duration::ZERO));
    dirty.mark(["a".to_owned()]);
    std::thread::sleep(Duration::from_millis(30));
    dirty.mark(["b".to_owned(), "a".to_owned()]);
    let (waiting, oldest) = dirty.backlog();
    assert_eq!(waiting, 2);
    // `a`, marked first, sets the wait; marking it again does not reset it.
    assert!(oldest >= Duration::from_millis(30), "{oldest:?}");
    let (taken, _) = dirty.take(1);
    assert_eq!(taken, vec!["a".to_owned()]);
    assert_eq!(dirty.backlog().0, 1);
    let _ = dirty.take(1);
    assert_eq!(dirty.backlog(), (0, Duration::ZERO));
}
