//! The attribution-accuracy benchmark's own machinery, on real meshes with a
//! few requests: what must hold whatever the machine's timing. Needs root.

use std::sync::Mutex;

use custody_e2e::accuracy::{Scenario, run};

/// One mesh at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

const REQUESTS: usize = 12;
const SERVICES: usize = 3;

fn scenario(concurrency: usize, no_forward: f64) -> Scenario {
    Scenario {
        services: SERVICES,
        concurrency,
        no_forward,
        requests: REQUESTS,
        delay_ms: 2.0,
        jitter_ms: 1.0,
    }
}

#[test]
fn propagated_chains_and_stitching_alone_are_reconstructed_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Headers forwarded everywhere: nothing to guess, at any concurrency.
    // Headers dropped with one request at a time: one candidate per stitch.
    for (label, s) in [("accp", scenario(8, 0.0)), ("accs", scenario(1, 0.5))] {
        let m = run(&s, label).unwrap();
        assert_eq!(m.answered, REQUESTS, "{s:?}: {m:?}");
        assert_eq!(m.true_edges, REQUESTS * (2 * SERVICES - 2), "{m:?}");
        assert_eq!(m.assembled_edges, m.true_edges, "{s:?}: {m:?}");
        assert_eq!(m.correct_edges, m.true_edges, "{s:?}: {m:?}");
        assert_eq!(m.exact_chains, REQUESTS, "{s:?}: {m:?}");
        assert_eq!(m.hops_in_right_chain, m.hops, "{s:?}: {m:?}");
        let stitched = if s.no_forward > 0.0 { REQUESTS } else { 0 };
        assert_eq!(m.stitched_edges, stitched, "{s:?}: {m:?}");
        // Every link was reported certain, and was right.
        assert_eq!(m.buckets[0].edges, m.assembled_edges, "{m:?}");
        assert_eq!(m.calibration_error(), 0.0, "{m:?}");
    }
}

#[test]
fn under_concurrency_every_hop_is_placed_and_only_stitched_links_can_be_wrong() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = scenario(8, 0.5);
    let m = run(&s, "accc").unwrap();
    assert_eq!(m.answered, REQUESTS, "{m:?}");
    // Every hop arrived and hangs under a parent (rightly or not).
    assert_eq!(m.hops, REQUESTS * s.hops_per_request(), "{m:?}");
    assert_eq!(m.assembled_edges, m.true_edges, "{m:?}");
    // One service of the two that call drops the headers: one stitch per request.
    assert_eq!(m.stitched_edges, REQUESTS, "{m:?}");
    // Links carried by a token are right; only stitches can err.
    assert_eq!(
        m.correct_edges - m.stitched_correct,
        m.assembled_edges - m.stitched_edges,
        "{m:?}"
    );
    let buckets: usize = m.buckets.iter().map(|b| b.edges).sum();
    assert_eq!(buckets, m.assembled_edges, "{m:?}");
}
