//! Assembly through the server: events arriving in separate batches, in
//! the wrong order, joined by evidence once the evidence arrives.

#[path = "support/server.rs"]
mod support;

use custody_context::api::v1;
use support::*;

fn contextless(id: &str, chain: &str, sa: &str, dir: v1::Direction, start: u64) -> v1::HopEvent {
    v1::HopEvent {
        schema_version: 1,
        event_id: id.into(),
        chain_id: chain.into(),
        span_id: "dddddddddddddddd".into(),
        workload: Some(workload(sa)),
        direction: dir as i32,
        operation: "POST /x".into(),
        attribution: Some(v1::Attribution {
            method: v1::AttributionMethod::PeerOnly as i32,
            confidence: 0.0,
        }),
        context_outcome: v1::ContextOutcome::Missing as i32,
        start_unix_nanos: start,
        duration_nanos: 50,
        ..Default::default()
    }
}

async fn chain_of(base: &str, id: &str, want_hops: usize) -> serde_json::Value {
    eventually(
        &format!("chain {id} with {want_hops} hops"),
        || async move {
            get_json(base, &format!("/v1/chains/{id}"))
                .await
                .ok()
                .filter(|t| t["hops"].as_array().map(Vec::len) == Some(want_hops))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_that_arrives_late_still_joins() {
    let dir = tempfile::tempdir().unwrap();
    let server = custody_control::server::start(&config(dir.path()))
        .await
        .unwrap();
    let base = format!("http://{}", server.http_addr);
    let mut ingest = ingest(server.grpc_addr, Some(NODE)).await;
    let now = custody_control::unix_nanos() - 60_000_000_000;

    // 1. An orphan outbound call arrives first: an orphan chain of its own.
    let orphan_id = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeee1";
    let orphan = contextless("o1", orphan_id, "web", v1::Direction::Outbound, now + 100);
    ingest
        .report_hops(v1::HopBatch { hops: vec![orphan] })
        .await
        .unwrap();
    let alone = chain_of(&base, orphan_id, 1).await;
    assert_eq!(alone["summary"]["coverage"], "orphan");
    // Then the request it was made for: the orphan is adopted.
    let parent = chain(301, "p", 3, now);
    let parent_id = parent[0].chain_id.clone();
    ingest
        .report_hops(v1::HopBatch { hops: parent })
        .await
        .unwrap();
    let tree = chain_of(&base, &parent_id, 4).await;
    assert_eq!(tree["summary"]["coverage"], "stitched");
    assert_eq!(tree["summary"]["joined_chains"][0], orphan_id);
    // The orphan's id now leads to the chain that adopted it, and it is not listed alone.
    let via = get_json(&base, &format!("/v1/chains/{orphan_id}"))
        .await
        .unwrap();
    assert_eq!(via["summary"]["chain_id"], parent_id.as_str());
    let list = get_json(&base, "/v1/chains?coverage=orphan").await.unwrap();
    assert!(list["chains"].as_array().unwrap().is_empty(), "{list}");

    // 2. A callee's sidecar saw a call without context; a node agent's flow
    //    names the calling pod's workload; the flow arrives after the hop.
    let t2 = now + 10_000_000_000;
    let caller = chain(302, "c", 1, t2);
    let caller_id = caller[0].chain_id.clone();
    let conn = v1::FiveTuple {
        src_ip: "10.1.0.5".into(),
        src_port: 51_000,
        dst_ip: "10.1.0.9".into(),
        dst_port: 5432,
        transport: "tcp".into(),
    };
    let mut callee = contextless(
        "i1",
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeee2",
        "ledger",
        v1::Direction::Inbound,
        t2 + 100,
    );
    callee.connection = Some(conn.clone());
    ingest
        .report_hops(v1::HopBatch {
            hops: vec![caller[0].clone(), callee],
        })
        .await
        .unwrap();
    chain_of(&base, &caller_id, 1).await;
    let ack = ingest
        .report_flows(v1::FlowBatch {
            flows: vec![v1::FlowEvent {
                schema_version: 1,
                event_id: "flow-1".into(),
                node: "node-a".into(),
                pid: 4242,
                executable: "/usr/bin/web".into(),
                workload: Some(workload("web")),
                connection: Some(conn),
                unix_nanos: t2 + 100,
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 1);
    // The flow is evidence for the hops already stored on its connection.
    let tree = chain_of(&base, &caller_id, 2).await;
    assert_eq!(tree["hops"][1]["join"]["evidence"], "flow_containment");
    assert_eq!(tree["summary"]["coverage"], "stitched");
    server.shutdown().await;
}
