//! The real `custody-control` binary on a real PostgreSQL server (a
//! throwaway cluster from `custody-testkit`): ingest over gRPC, assembly,
//! a restart, and everything is still there.

#[path = "support/server.rs"]
mod support;

use std::collections::BTreeSet;

use custody_context::api::v1;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_ingested_on_postgres_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pg =
        custody_testkit::Postgres::start().expect("PostgreSQL (scripts/install-deps installs it)");
    let store = postgres_store(dir.path(), &pg);
    let base_time = custody_control::unix_nanos() - 3_600_000_000_000;
    let hops: Vec<v1::HopEvent> = (0..20u64)
        .flat_map(|n| chain(n, &format!("r{n}"), 4, base_time + n * 1_000_000_000))
        .collect();
    let chain_ids: BTreeSet<String> = hops.iter().map(|h| h.chain_id.clone()).collect();

    let mut server = Binary::start_with(dir.path(), &store);
    let mut client = ingest(server.grpc, Some(NODE)).await;
    // Two concurrent batches and a repeat: each hop is stored once.
    let (first, second) = hops.split_at(hops.len() / 2);
    let mut other = client.clone();
    let (a, b) = tokio::join!(
        client.report_hops(v1::HopBatch {
            hops: first.to_vec()
        }),
        other.report_hops(v1::HopBatch {
            hops: second.to_vec()
        }),
    );
    assert_eq!(
        (a.unwrap().into_inner().accepted + b.unwrap().into_inner().accepted) as usize,
        hops.len()
    );
    let again = client
        .report_hops(v1::HopBatch {
            hops: first.to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.accepted, again.duplicates as usize),
        (0, first.len())
    );
    let assembled = |base: String| async move {
        let list = get_json(&base, "/v1/chains?initiator=alice@example.com&limit=100")
            .await
            .ok()?;
        let ids: BTreeSet<String> = list["chains"]
            .as_array()?
            .iter()
            .filter_map(|c| c["chain_id"].as_str().map(str::to_owned))
            .collect();
        (ids.len() == 20).then_some(ids)
    };
    let before = eventually("every chain to be assembled", || assembled(server.base())).await;
    assert_eq!(before, chain_ids);
    server.kill();
    assert!(
        ["custody.db", "chains.db", "ids.db"]
            .iter()
            .all(|f| !dir.path().join(f).exists()),
        "nothing stored in SQLite"
    );

    let server = Binary::start_with(dir.path(), &store);
    let after = eventually("the chains after the restart", || assembled(server.base())).await;
    assert_eq!(after, chain_ids);
    for id in &chain_ids {
        let tree = get_json(&server.base(), &format!("/v1/chains/{id}"))
            .await
            .unwrap();
        assert_eq!(tree["hops"].as_array().map(Vec::len), Some(4), "{id}");
        assert_eq!(tree["summary"]["coverage"], "propagated");
    }
    // Counted in PostgreSQL directly: every hop once, nothing left to assemble.
    use custody_control::store::Store as _;
    let direct = open_postgres(dir.path(), &pg);
    assert_eq!(direct.hop_count().unwrap() as usize, hops.len());
    assert!(direct.pending_chains(100).unwrap().is_empty());
}
