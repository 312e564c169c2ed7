//! What every backend derives the same way: the columns a hop is stored
//! with, the facts a chain is found by, and the shape a stored tree is
//! kept as.

use std::collections::{BTreeSet, HashMap};

use custody_context::api::v1::HopEvent;
use prost::Message as _;

use super::ChainQuery;
use crate::assembly::{
    ChainSummary, ChainTree, Evidence, connection_key, has_context, write_workload_uri,
};

/// A time or count as the databases' signed 64-bit integer (saturating).
pub(crate) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored signed integer back as unsigned (negative reads as 0).
pub(crate) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// One hop, encoded for its row: the columns queries filter on and the
/// protobuf body.
pub(crate) struct HopRow {
    pub(crate) event_id: String,
    pub(crate) chain_id: String,
    pub(crate) workload: String,
    pub(crate) start: i64,
    pub(crate) end: i64,
    pub(crate) context: bool,
    pub(crate) conn: String,
    pub(crate) body: Vec<u8>,
}

impl HopRow {
    pub(crate) fn of(hop: &HopEvent) -> Self {
        let mut workload = String::with_capacity(96);
        write_workload_uri(&mut workload, hop.workload.as_ref());
        HopRow {
            event_id: hop.event_id.clone(),
            chain_id: hop.chain_id.clone(),
            workload,
            start: i64_of(hop.start_unix_nanos),
            end: i64_of(hop.start_unix_nanos.saturating_add(hop.duration_nanos)),
            context: has_context(hop),
            conn: hop
                .connection
                .as_ref()
                .map(connection_key)
                .unwrap_or_default(),
            body: hop.encode_to_vec(),
        }
    }
}

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

/// The query's filters as `(fact kind, value)`, in the order a backend
/// tries them. Workload identities are stored once, as `service` facts (a
/// workload URI is the only identity that starts with `spiffe://`).
pub(crate) fn fact_filters(q: &ChainQuery) -> [(&'static str, &Option<String>); 6] {
    let identity_kind = match &q.identity {
        Some(v) if v.starts_with("spiffe://") => "service",
        _ => "identity",
    };
    [
        ("principal", &q.initiator),
        ("service", &q.service),
        ("class", &q.data_class),
        ("destination", &q.destination),
        ("verdict", &q.verdict),
        (identity_kind, &q.identity),
    ]
}
