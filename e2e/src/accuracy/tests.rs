use serde_json::json;

use super::*;

fn scenario(services: usize, no_forward: f64, requests: usize) -> Scenario {
    Scenario {
        services,
        concurrency: 1,
        no_forward,
        requests,
        delay_ms: 0.0,
        jitter_ms: 0.0,
    }
}

/// The true chain of request `i`, as the control plane would return it.
fn true_chain(s: &Scenario, i: usize) -> Chain {
    let hops = (0..s.hops_per_request())
        .map(|p| Hop {
            event_id: format!("{i}-{p}"),
            parent: p.checked_sub(1).map(|q| format!("{i}-{q}")),
            position: Some(p),
            truth: Some(i),
            confidence: 1.0,
            evidence: if p == 0 { "root" } else { "span_parent" }.to_owned(),
        })
        .collect();
    Chain {
        initiator: Some(i),
        hops,
    }
}

#[test]
fn services_and_who_drops_headers() {
    let s = scenario(5, 0.5, 1);
    assert_eq!(s.service_names(), ["edge", "hopa", "hopb", "hopc", "hopd"]);
    assert_eq!(s.drops_headers(), [false, true, false, true, false]);
    assert_eq!(scenario(5, 0.0, 1).drops_headers(), [false; 5]);
    assert_eq!(
        scenario(5, 1.0, 1).drops_headers(),
        [true, true, true, true, false]
    );
    assert_eq!(letters(25), "z");
    assert_eq!(letters(26), "ba");
    let apps = s.apps();
    assert!(apps[0].edge && !apps[1].edge);
    assert!(apps[0].args.contains(&"--forward".to_owned()));
    assert!(!apps[1].args.contains(&"--forward".to_owned()));
    assert!(
        apps[3]
            .args
            .contains(&"*=http://hopd:8080{path}".to_owned())
    );
    assert!(!apps[4].args.contains(&"--route".to_owned()));
}

#[test]
fn true_chains_measure_perfect() {
    let s = scenario(4, 0.0, 3);
    let chains: Vec<Chain> = (0..3).map(|i| true_chain(&s, i)).collect();
    let m = measure(&s, 3, &chains);
    assert_eq!(m.true_edges, 3 * 6);
    assert_eq!(m.assembled_edges, 18);
    assert_eq!(m.correct_edges, 18);
    assert_eq!(m.exact_chains, 3);
    assert_eq!(m.precision(), 1.0);
    assert_eq!(m.recall(), 1.0);
    assert_eq!(m.right_chain_share(), 1.0);
    assert_eq!(m.calibration_error(), 0.0);
}

#[test]
fn a_wrong_stitch_costs_one_edge_and_both_chains() {
    let s = scenario(3, 0.5, 2);
    let mut a = true_chain(&s, 0);
    let mut b = true_chain(&s, 1);
    // Service 1's outbound call of request 1 was stitched to request 0: it
    // and everything below it land in request 0's chain.
    let moved: Vec<Hop> = b.hops.drain(3..).collect();
    for mut hop in moved {
        if hop.position == Some(3) {
            hop.parent = Some("0-2".into());
            hop.evidence = "sidecar_stitched".into();
            hop.confidence = 0.5;
        }
        a.hops.push(hop);
    }
    let m = measure(&s, 2, &[a, b]);
    assert_eq!(m.true_edges, 8);
    assert_eq!(m.assembled_edges, 8);
    assert_eq!(m.correct_edges, 7);
    assert_eq!(m.stitched_edges, 1);
    assert_eq!(m.stitched_correct, 0);
    assert_eq!(m.exact_chains, 0);
    assert_eq!(m.hops, 10);
    assert_eq!(m.hops_in_right_chain, 8);
    let half = m.buckets.iter().find(|b| b.low == 0.5).unwrap();
    assert_eq!((half.edges, half.correct), (1, 0));
}

#[test]
fn a_request_split_over_two_chains_is_not_exact() {
    let s = scenario(2, 0.0, 1);
    let whole = true_chain(&s, 0);
    let mut stray = true_chain(&s, 0);
    stray.hops.truncate(1);
    stray.hops[0].event_id = "other".into();
    let m = measure(&s, 1, &[whole, stray]);
    assert_eq!(m.exact_chains, 0);
    assert_eq!(m.recall(), 1.0);
}

#[test]
fn reads_a_chain_tree_from_the_api() {
    let services = scenario(2, 0.0, 1).service_names();
    let tree = json!({
        "summary": {"initiator": {"subject": "u7", "kind": "human"}},
        "hops": [
            {"event_id": "a", "parent_event_id": null, "workload": "spiffe://cluster.local/ns/shop/sa/edge",
             "direction": "inbound", "operation": "GET /t/7", "join": {"evidence": "root", "confidence": 1.0}},
            {"event_id": "b", "parent_event_id": "a", "workload": "spiffe://cluster.local/ns/shop/sa/edge",
             "direction": "outbound", "operation": "GET /t/7", "join": {"evidence": "sidecar_stitched", "confidence": 0.25}},
            {"event_id": "c", "parent_event_id": "b", "workload": "spiffe://cluster.local/ns/shop/sa/other",
             "direction": "inbound", "operation": "GET /healthz", "join": {"evidence": "span_parent", "confidence": 1.0}}
        ]
    });
    let chain = parse_chain(&tree, &services);
    assert_eq!(chain.initiator, Some(7));
    assert_eq!(chain.hops[0].position, Some(0));
    assert_eq!(chain.hops[1].position, Some(1));
    assert_eq!(chain.hops[1].parent.as_deref(), Some("a"));
    assert_eq!(chain.hops[1].confidence, 0.25);
    assert_eq!(chain.hops[1].evidence, "sidecar_stitched");
    assert_eq!(chain.hops[2].position, None);
    assert_eq!(chain.hops[2].truth, None);
}
