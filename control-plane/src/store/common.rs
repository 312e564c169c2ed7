//! What every backend derives the same way: the facts a chain is found
//! by, and the shape a stored tree is kept as.

use std::collections::{BTreeSet, HashMap};

use crate::assembly::{ChainSummary, ChainTree, Evidence};

/// The shape of one node of a stored tree: event id, position of the
/// parent node (`-1` for the root), depth, and how the hop is tied in.
pub(crate) type NodeShape = (String, i64, u32, Evidence, f32);

/// The shape of `tree`, node by node in its order.
pub(crate) fn shape(tree: &ChainTree) -> Vec<NodeShape> {
    let mut position: HashMap<&str, i64> = HashMap::with_capacity(tree.hops.len());
    let mut out = Vec::with_capacity(tree.hops.len());
    for (i, n) in (0_i64..).zip(&tree.hops) {
        position.insert(n.event_id.as_str(), i);
        let parent = n
            .parent_event_id
            .as_deref()
            .and_then(|p| position.get(p).copied())
            .unwrap_or(-1);
        out.push((
            n.event_id.clone(),
            parent,
            n.depth,
            n.join.evidence,
            n.join.confidence,
        ));
    }
    out
}

/// The facts a chain is found by. They are derived from its summary alone,
/// so the facts of a stored chain are recomputed from its stored summary
/// to delete them: the fact table needs no second index by chain id.
pub(crate) fn facts(s: &ChainSummary) -> BTreeSet<(&'static str, String)> {
    let mut out = BTreeSet::new();
    if let Some(i) = &s.initiator {
        out.insert(("principal", i.subject.clone()));
        for a in &i.actors {
            out.insert(("principal", a.clone()));
        }
    }
    for w in &s.services {
        out.insert(("service", w.clone()));
    }
    for c in &s.data_classes {
        out.insert(("class", c.class.clone()));
    }
    for d in &s.destinations {
        if !d.host.is_empty() {
            out.insert(("destination", d.host.clone()));
        }
        if !d.ip.is_empty() {
            out.insert(("destination", d.ip.clone()));
        }
        out.insert(("verdict", d.verdict.clone()));
    }
    // Workload identities are the services crossed: searched as `service`.
    for i in s.identities.iter().filter(|i| i.kind != "workload") {
        out.insert(("identity", i.value.clone()));
    }
    for j in &s.joined_chains {
        out.insert(("joined", j.clone()));
    }
    out
}
