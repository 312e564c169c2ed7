//! Kill the real server (SIGKILL) during ingest and restart it: every
//! acknowledged event is present, none twice, and assembly resumes.

#[path = "support/server.rs"]
mod support;

use std::collections::BTreeSet;

use custody_context::api::v1;
use support::*;

const HOPS_PER_CHAIN: usize = 5;
const CHAINS_PER_BATCH: u64 = 40;

fn batch(n: u64) -> Vec<v1::HopEvent> {
    // Recent events: retention (7 days by default) keeps them.
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| custody_control::unix_nanos() - 3_600_000_000_000);
    (0..CHAINS_PER_BATCH)
        .flat_map(|c| {
            let seed = n * CHAINS_PER_BATCH + c;
            chain(
                seed,
                &format!("b{n}c{c}"),
                HOPS_PER_CHAIN,
                base + seed * 1_000_000_000,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let count = survive_sigkill(dir.path(), "").await;
    let store = custody_control::store::SqliteStore::open(&custody_control::store::SqliteOptions {
        data_dir: dir.path().to_path_buf(),
        sync_full: true,
    })
    .unwrap();
    use custody_control::store::Store as _;
    assert_eq!(
        store.hop_count().unwrap() as usize,
        count,
        "none twice, none lost"
    );
}

/// The same on PostgreSQL: the server is killed, PostgreSQL keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigkill_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let pg =
        custody_testkit::Postgres::start().expect("PostgreSQL (scripts/install-deps installs it)");
    let count = survive_sigkill(dir.path(), &postgres_store(dir.path(), &pg)).await;
    assert!(
        ["custody.db", "chains.db", "ids.db"]
            .iter()
            .all(|f| !dir.path().join(f).exists()),
        "nothing stored in SQLite"
    );
    let store = open_postgres(dir.path(), &pg);
    use custody_control::store::Store as _;
    assert_eq!(
        store.hop_count().unwrap() as usize,
        count,
        "none twice, none lost"
    );
}

/// Ingests, kills the server, restarts it, checks every acknowledged hop
/// is in its chain once; returns how many hops must be stored.
#[allow(clippy::unwrap_used)] // a test's body: a failure is a test failure
async fn survive_sigkill(dir: &std::path::Path, store: &str) -> usize {
    let mut server = Binary::start_with(dir, store);
    let mut client = ingest(server.grpc, Some(NODE)).await;

    // Ingest from a task; kill the server while batches are in flight.
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(u64, Result<v1::BatchAck, tonic::Status>)>();
    let sender = tokio::spawn(async move {
        for n in 0.. {
            let r = client
                .report_hops(v1::HopBatch { hops: batch(n) })
                .await
                .map(tonic::Response::into_inner);
            let failed = r.is_err();
            if tx.send((n, r)).is_err() || failed {
                break;
            }
        }
    });
    let mut acked = Vec::new();
    while let Some((n, r)) = rx.recv().await {
        let ack = r.expect("acknowledged before the kill");
        assert_eq!(ack.accepted as usize, batch(n).len());
        acked.push(n);
        if acked.len() == 15 {
            server.kill();
            break;
        }
    }
    // Batches acknowledged before the sender saw the failure also count.
    let mut unacked = Vec::new();
    while let Some((n, r)) = rx.recv().await {
        match r {
            Ok(_) => acked.push(n),
            Err(_) => unacked.push(n),
        }
    }
    sender.await.unwrap();
    assert!(!unacked.is_empty(), "the kill interrupted ingest");

    let server = Binary::start_with(dir, store);
    let mut client = ingest(server.grpc, Some(NODE)).await;
    // Retrying the interrupted batch is safe: whatever was committed counts as a duplicate.
    for n in &unacked {
        let ack = client
            .report_hops(v1::HopBatch { hops: batch(*n) })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((ack.accepted + ack.duplicates) as usize, batch(*n).len());
    }
    // Re-sending an acknowledged batch stores nothing new.
    let ack = client
        .report_hops(v1::HopBatch {
            hops: batch(acked[0]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ack.accepted, ack.duplicates as usize),
        (0, batch(acked[0]).len())
    );

    // Every acknowledged hop is in its assembled chain, exactly once.
    let base = server.base();
    for n in acked.iter().chain(&unacked) {
        let hops = batch(*n);
        let chain_ids: BTreeSet<String> = hops.iter().map(|h| h.chain_id.clone()).collect();
        for id in chain_ids {
            let tree = eventually("the chain to be assembled", || {
                let base = base.clone();
                let id = id.clone();
                async move {
                    get_json(&base, &format!("/v1/chains/{id}"))
                        .await
                        .ok()
                        .filter(|t| t["hops"].as_array().map(Vec::len) == Some(HOPS_PER_CHAIN))
                }
            })
            .await;
            let ids: Vec<&str> = tree["hops"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["event_id"].as_str().unwrap())
                .collect();
            let unique: BTreeSet<&str> = ids.iter().copied().collect();
            assert_eq!(unique.len(), ids.len(), "no event twice in {id}");
            assert_eq!(tree["summary"]["coverage"], "propagated");
        }
    }
    (acked.len() + unacked.len()) * CHAINS_PER_BATCH as usize * HOPS_PER_CHAIN
}
