//! Chain assembly: from hop events (in any order, duplicated, late) to chain
//! trees with a confidence per join and a coverage class per chain.
//!
//! Data flow: hops are deduplicated by `event_id`, grouped by `chain_id`,
//! and each group is ordered into a tree by span parentage
//! (`parent_span_id` → `span_id`). A group in which no hop carried context
//! (every hop `PEER_ONLY` or outcome `MISSING`) is joined under a hop of a
//! chain that did, by evidence:
//!
//! 1. the same connection 5-tuple on a contextful outbound hop (0.95);
//! 2. a node-agent flow with the same 5-tuple naming the calling workload,
//!    and an inbound hop of that workload whose interval contains this hop
//!    (0.85);
//! 3. time containment within the same workload: an outbound hop whose
//!    `[start, end]` lies within an inbound hop of the same workload (0.9).
//!
//! Several candidates divide the confidence among them (the tightest
//! interval wins, ties broken by event id), so an ambiguous join is never
//! confident. Everything here is pure and deterministic: the same set of
//! events gives the same trees whatever their order.

use std::collections::{BTreeMap, BTreeSet};

use custody_context::api::v1::{self, FlowEvent, HopEvent};
use serde::{Deserialize, Serialize};

/// Keyed by ids and spans that sidecars report; seeded per process.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Confidence at or above which a join counts as confident.
pub const CONFIDENT: f32 = 0.8;
/// Confidence of a hop whose parent span never arrived.
pub const GAP_CONFIDENCE: f32 = 0.5;
/// Confidence of a join by a shared connection 5-tuple.
pub const FIVE_TUPLE_CONFIDENCE: f32 = 0.95;
/// Confidence of a join by time containment within one workload.
pub const CONTAINMENT_CONFIDENCE: f32 = 0.9;
/// Confidence of a join by a node-agent flow, then time containment.
pub const FLOW_CONFIDENCE: f32 = 0.85;

/// How completely a chain was tied together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Coverage {
    /// Every hop carried context (propagated or minted).
    Propagated,
    /// Some hops were tied by evidence, all of them confidently.
    Stitched,
    /// Some hops are missing or tied with low confidence.
    Partial,
    /// Nothing ties the chain to an initiator.
    Orphan,
}

impl Coverage {
    /// Every class, in order.
    pub const ALL: [Coverage; 4] = [
        Coverage::Propagated,
        Coverage::Stitched,
        Coverage::Partial,
        Coverage::Orphan,
    ];

    /// The name used in the API and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Coverage::Propagated => "propagated",
            Coverage::Stitched => "stitched",
            Coverage::Partial => "partial",
            Coverage::Orphan => "orphan",
        }
    }

    /// The class named `name`, if any.
    pub fn parse(name: &str) -> Option<Coverage> {
        Coverage::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

/// What tied a hop to its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Evidence {
    /// The chain's root: nothing above it.
    Root,
    /// The hop's `parent_span_id` names its parent.
    SpanParent,
    /// The sidecar stitched the hop itself (confidence as reported).
    SidecarStitched,
    /// The same connection 5-tuple as a contextful outbound hop.
    FiveTuple,
    /// A node-agent flow named the caller, then time containment.
    FlowContainment,
    /// Time containment within the same workload.
    TimeContainment,
    /// The parent span never arrived; attached to the root.
    Gap,
}

/// How a hop is tied into its chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Join {
    /// The evidence.
    pub evidence: Evidence,
    /// In `[0, 1]`.
    pub confidence: f32,
}

/// An egress destination as a hop saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationView {
    /// Host name, when known.
    pub host: String,
    /// Address dialled, when known.
    pub ip: String,
    /// Port.
    pub port: u32,
    /// `allow`, `audit`, `block`, or `unspecified`.
    pub verdict: String,
    /// The deciding policy, empty for the default.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub policy: String,
    /// The deciding rule.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule: String,
}

/// What a database hop did, without values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseView {
    /// `postgresql` or `mysql`.
    pub system: String,
    /// The database.
    pub database: String,
    /// The database user: the identity used downstream.
    pub user: String,
    /// select, insert, ...
    pub statement_kind: String,
    /// Tables read.
    pub tables_read: Vec<String>,
    /// Tables written.
    pub tables_written: Vec<String>,
}

/// One data class with a count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCount {
    /// e.g. `pii.email`.
    pub class: String,
    /// How many values were seen.
    pub count: u64,
}

/// One hop in a chain tree (pre-order, with its depth).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HopNode {
    /// The event id.
    pub event_id: String,
    /// The chain id the sidecar reported (differs from the tree's for joined hops).
    pub chain_id: String,
    /// Span id.
    pub span_id: String,
    /// Parent span id as reported.
    pub parent_span_id: String,
    /// The parent hop in the tree; `None` for the root.
    pub parent_event_id: Option<String>,
    /// Depth in the tree (root 0).
    pub depth: u32,
    /// The reporting workload's URI.
    pub workload: String,
    /// The pod, when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    /// The peer's workload URI, when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// The protocol.
    pub protocol: String,
    /// Method and path, RPC, tool, or statement kind.
    pub operation: String,
    /// Status code.
    pub status: u32,
    /// How the sidecar attributed the hop.
    pub attribution: String,
    /// What happened to the identity context.
    pub context_outcome: String,
    /// How the hop is tied into this tree.
    pub join: Join,
    /// Start, Unix nanoseconds.
    pub start_unix_nanos: u64,
    /// Duration in nanoseconds.
    pub duration_nanos: u64,
    /// Egress destination and verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<DestinationView>,
    /// Data classes touched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<ClassCount>,
    /// Database access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseView>,
    /// The signing key id of the token carried (never the token).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_id: String,
    /// Why a token was refused.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub refusal_reason: String,
    /// How the connection to or from the peer was secured: `plaintext`,
    /// `mesh_mtls`, `tls` (the sidecar's own server certificate) or
    /// `tls_originated`; empty when the sidecar did not say.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transport_security: String,
    /// The peer's SPIFFE ID as mesh mTLS verified it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_identity: String,
    /// Why TLS toward the peer failed (a bounded label).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transport_error: String,
    /// Why the chain disagrees with the mTLS-verified peer (a bounded
    /// label, e.g. `token_workload_mismatch`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity_mismatch: String,
}

/// Who started a chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitiatorView {
    /// The `sub` claim.
    pub subject: String,
    /// human, service, agent, system or unspecified.
    pub kind: String,
    /// Delegation history, current actor first: the deepest any hop of the
    /// chain carried (a sub-agent's hops nest the agent that delegated).
    pub actors: Vec<String>,
    /// The chain's scope.
    pub scope: String,
}

/// An identity a chain used.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdentityUse {
    /// `workload`, `database_user` or `key_id`.
    pub kind: String,
    /// The identity (never a secret).
    pub value: String,
}

/// The summary of one assembled chain: what the list and search APIs return.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChainSummary {
    /// The chain id (the root hop's `chain_id`).
    pub chain_id: String,
    /// The coverage class.
    pub coverage: Coverage,
    /// The lowest join confidence in the chain.
    pub confidence: f32,
    /// The initiator, when any hop carried one.
    pub initiator: Option<InitiatorView>,
    /// Workloads crossed, in order of first appearance.
    pub services: Vec<String>,
    /// Operations (routes, RPCs, tools, statements) served, in order.
    pub tools: Vec<String>,
    /// Identities used.
    pub identities: Vec<IdentityUse>,
    /// Data classes touched, with counts.
    pub data_classes: Vec<ClassCount>,
    /// Egress destinations, with verdicts.
    pub destinations: Vec<DestinationView>,
    /// Other reported chain ids joined into this one by evidence.
    pub joined_chains: Vec<String>,
    /// Number of hops.
    pub hop_count: usize,
    /// Earliest hop start, Unix nanoseconds.
    pub first_unix_nanos: u64,
    /// Latest hop end, Unix nanoseconds.
    pub last_unix_nanos: u64,
}

/// One chain with every hop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChainTree {
    /// The summary.
    pub summary: ChainSummary,
    /// Hops in pre-order (parents before children), with depths.
    pub hops: Vec<HopNode>,
}

/// The workload URI of a protobuf workload id (without the pod).
pub fn workload_uri(id: Option<&v1::WorkloadId>) -> String {
    let mut out = String::new();
    write_workload_uri(&mut out, id);
    out
}

/// Appends the workload URI of `id` to `out` (nothing for no workload).
pub fn write_workload_uri(out: &mut String, id: Option<&v1::WorkloadId>) {
    if let Some(w) = id
        && !w.trust_domain.is_empty()
    {
        for part in [
            "spiffe://",
            &w.trust_domain,
            "/ns/",
            &w.namespace,
            "/sa/",
            &w.service_account,
        ] {
            out.push_str(part);
        }
    }
}

/// The key a connection is stored and joined by.
pub fn connection_key(t: &v1::FiveTuple) -> String {
    if t.src_ip.is_empty() && t.dst_ip.is_empty() {
        return String::new();
    }
    format!(
        "{}:{}>{}:{}/{}",
        t.src_ip, t.src_port, t.dst_ip, t.dst_port, t.transport
    )
}

fn method(hop: &HopEvent) -> v1::AttributionMethod {
    hop.attribution
        .as_ref()
        .and_then(|a| v1::AttributionMethod::try_from(a.method).ok())
        .unwrap_or(v1::AttributionMethod::Unspecified)
}

fn outcome(hop: &HopEvent) -> v1::ContextOutcome {
    v1::ContextOutcome::try_from(hop.context_outcome).unwrap_or(v1::ContextOutcome::Unspecified)
}

/// Whether the hop carried identity context of its own.
pub fn has_context(hop: &HopEvent) -> bool {
    !matches!(
        method(hop),
        v1::AttributionMethod::PeerOnly | v1::AttributionMethod::Unspecified
    ) && outcome(hop) != v1::ContextOutcome::Missing
}

fn direction(hop: &HopEvent) -> v1::Direction {
    v1::Direction::try_from(hop.direction).unwrap_or(v1::Direction::Unspecified)
}

fn end(hop: &HopEvent) -> u64 {
    hop.start_unix_nanos.saturating_add(hop.duration_nanos)
}

fn pod_compatible(a: Option<&v1::WorkloadId>, b: Option<&v1::WorkloadId>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.pod.is_empty() || b.pod.is_empty() || a.pod == b.pod,
        _ => true,
    }
}

type TupleKey<'a> = (&'a str, u32, &'a str, u32, &'a str);

fn tuple_key(t: &v1::FiveTuple) -> TupleKey<'_> {
    (
        t.src_ip.as_str(),
        t.src_port,
        t.dst_ip.as_str(),
        t.dst_port,
        t.transport.as_str(),
    )
}

/// A chosen evidence join: parent hop index, evidence, confidence.
type Link = (usize, Evidence, f32);

/// A workload as hops name it: trust domain, namespace, service account
/// (no pod). Compared in place, so that looking hops up by workload
/// allocates nothing; every id without a trust domain is the same
/// (empty) workload, as its URI is empty.
type WorkloadKey<'a> = (&'a str, &'a str, &'a str);

fn workload_key(id: Option<&v1::WorkloadId>) -> WorkloadKey<'_> {
    match id {
        Some(w) if !w.trust_domain.is_empty() => (
            w.trust_domain.as_str(),
            w.namespace.as_str(),
            w.service_account.as_str(),
        ),
        _ => ("", "", ""),
    }
}

/// The contextful inbound hops of one workload, by start time, with the
/// longest of them: the hops that contain an interval are found without
/// looking at every hop of the workload.
#[derive(Default)]
struct Inbound {
    /// Hop positions, sorted by start.
    by_start: Vec<usize>,
    /// The longest duration among them.
    longest: u64,
}

impl Inbound {
    /// The hops whose `[start, end]` contains `h`'s.
    fn containing<'h>(
        &'h self,
        hops: &'h [&HopEvent],
        h: &'h HopEvent,
    ) -> impl Iterator<Item = usize> + 'h {
        // Only hops that start at or before `h` and at most `longest`
        // before it can contain it.
        let upto = self
            .by_start
            .partition_point(|&j| hops[j].start_unix_nanos <= h.start_unix_nanos);
        let earliest = h.start_unix_nanos.saturating_sub(self.longest);
        let from = self.by_start[..upto].partition_point(|&j| hops[j].start_unix_nanos < earliest);
        self.by_start[from..upto]
            .iter()
            .copied()
            .filter(move |&j| end(hops[j]) >= end(h))
    }
}

/// Lookups over the contextful hops, built once per assembly.
struct Index<'a> {
    /// Contextful inbound hops by workload.
    inbound: HashMap<WorkloadKey<'a>, Inbound>,
    /// Contextful outbound hops by connection.
    outbound: HashMap<TupleKey<'a>, Vec<usize>>,
    /// Workloads named by node-agent flows, by connection.
    flows: HashMap<TupleKey<'a>, BTreeSet<WorkloadKey<'a>>>,
}

impl<'a> Index<'a> {
    fn new(hops: &[&'a HopEvent], flows: &'a [FlowEvent], contextful: &BTreeSet<&str>) -> Self {
        let mut inbound: HashMap<WorkloadKey<'a>, Inbound> = HashMap::default();
        let mut outbound: HashMap<TupleKey<'a>, Vec<usize>> = HashMap::default();
        for (i, h) in hops.iter().enumerate() {
            if !contextful.contains(h.chain_id.as_str()) {
                continue;
            }
            match direction(h) {
                v1::Direction::Inbound => {
                    let of = inbound
                        .entry(workload_key(h.workload.as_ref()))
                        .or_default();
                    of.by_start.push(i);
                    of.longest = of.longest.max(h.duration_nanos);
                }
                v1::Direction::Outbound => {
                    if let Some(c) = &h.connection {
                        outbound.entry(tuple_key(c)).or_default().push(i);
                    }
                }
                v1::Direction::Unspecified => {}
            }
        }
        for of in inbound.values_mut() {
            of.by_start
                .sort_unstable_by_key(|&j| hops[j].start_unix_nanos);
        }
        let mut flow_map: HashMap<TupleKey<'a>, BTreeSet<WorkloadKey<'a>>> = HashMap::default();
        for f in flows {
            if let Some(c) = &f.connection {
                let w = workload_key(f.workload.as_ref());
                if !w.0.is_empty() {
                    flow_map.entry(tuple_key(c)).or_default().insert(w);
                }
            }
        }
        Index {
            inbound,
            outbound,
            flows: flow_map,
        }
    }
}

fn find_link(hops: &[&HopEvent], index: &Index<'_>, root: usize) -> Option<Link> {
    let h = hops[root];
    if let Some(conn) = &h.connection {
        let key = tuple_key(conn);
        if let Some(c) = index.outbound.get(&key)
            && let Some(link) = choose(hops, c, Evidence::FiveTuple, FIVE_TUPLE_CONFIDENCE)
        {
            return Some(link);
        }
        if direction(h) == v1::Direction::Inbound
            && let Some(callers) = index.flows.get(&key)
        {
            let c: Vec<usize> = callers
                .iter()
                .filter_map(|w| index.inbound.get(w))
                .flat_map(|of| of.containing(hops, h))
                .collect();
            if let Some(link) = choose(hops, &c, Evidence::FlowContainment, FLOW_CONFIDENCE) {
                return Some(link);
            }
        }
    }
    if direction(h) == v1::Direction::Outbound {
        let c: Vec<usize> = index
            .inbound
            .get(&workload_key(h.workload.as_ref()))
            .into_iter()
            .flat_map(|of| of.containing(hops, h))
            .filter(|&j| pod_compatible(hops[j].workload.as_ref(), h.workload.as_ref()))
            .collect();
        return choose(hops, &c, Evidence::TimeContainment, CONTAINMENT_CONFIDENCE);
    }
    None
}

/// Assembles every chain the hops and flows describe.
///
/// Returns one tree per chain, ordered by chain id. Hops joined by evidence
/// appear in the tree they were joined into, not in one of their own.
pub fn assemble<'a>(
    hops: impl IntoIterator<Item = &'a HopEvent>,
    flows: &[FlowEvent],
) -> Vec<ChainTree> {
    // Deduplicate by event id, deterministically: the first of each id
    // (a stable sort keeps them in the order given).
    let mut hops: Vec<&HopEvent> = hops.into_iter().collect();
    hops.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    hops.dedup_by(|later, first| later.event_id == first.event_id);

    // Sorted once, then built in bulk: cheaper than an insert per hop.
    let mut by_chain: Vec<usize> = (0..hops.len()).collect();
    by_chain.sort_by(|&a, &b| hops[a].chain_id.cmp(&hops[b].chain_id));
    let groups: BTreeMap<&str, Vec<usize>> = by_chain
        .chunk_by(|&a, &b| hops[a].chain_id == hops[b].chain_id)
        .map(|members| (hops[members[0]].chain_id.as_str(), members.to_vec()))
        .collect();
    let contextful: BTreeSet<&str> = groups
        .iter()
        .filter(|(_, members)| members.iter().any(|&i| has_context(hops[i])))
        .map(|(id, _)| *id)
        .collect();

    // Join each contextless group under a contextful hop, by evidence.
    let mut joined: BTreeMap<&str, Link> = BTreeMap::new();
    if groups.len() > contextful.len() {
        let index = Index::new(&hops, flows, &contextful);
        for (id, members) in &groups {
            if contextful.contains(id) {
                continue;
            }
            let root = group_root(&hops, members);
            if let Some(link) = find_link(&hops, &index, root) {
                joined.insert(id, link);
            }
        }
    }

    // The groups joined under each chain, in chain id order.
    let mut adopted: HashMap<&str, Vec<(&str, Link)>> = HashMap::default();
    for (other, link) in &joined {
        adopted
            .entry(hops[link.0].chain_id.as_str())
            .or_default()
            .push((other, *link));
    }
    let mut out = Vec::with_capacity(groups.len() - joined.len());
    for (id, members) in &groups {
        if joined.contains_key(id) {
            continue;
        }
        let mut all: Vec<usize> = members.clone();
        let mut links: HashMap<usize, Link> = HashMap::default();
        let mut joined_chains = Vec::new();
        for (other, link) in adopted.get(id).map_or(&[][..], Vec::as_slice) {
            let other_members = &groups[other];
            links.insert(group_root(&hops, other_members), *link);
            all.extend(other_members);
            joined_chains.push((*other).to_owned());
        }
        out.push(build_tree(
            &hops,
            id,
            &all,
            &links,
            joined_chains,
            contextful.contains(id),
        ));
    }
    out
}

/// The earliest hop of a group without a parent inside the group.
fn group_root(hops: &[&HopEvent], members: &[usize]) -> usize {
    let spans: BTreeSet<&str> = members.iter().map(|&i| hops[i].span_id.as_str()).collect();
    let key = |&&i: &&usize| {
        let h = hops[i];
        let has_parent = !h.parent_span_id.is_empty() && spans.contains(h.parent_span_id.as_str());
        (has_parent, h.start_unix_nanos, h.event_id.as_str())
    };
    members
        .iter()
        .min_by_key(key)
        .copied()
        .unwrap_or(members[0])
}

/// Picks the tightest candidate; several candidates divide the confidence.
fn choose(hops: &[&HopEvent], c: &[usize], evidence: Evidence, confidence: f32) -> Option<Link> {
    let best = c
        .iter()
        .min_by_key(|&&j| (hops[j].duration_nanos, hops[j].event_id.as_str()))?;
    #[allow(clippy::cast_precision_loss)] // candidate counts are small
    let confidence = confidence / c.len() as f32;
    Some((*best, evidence, confidence))
}

fn build_tree(
    hops: &[&HopEvent],
    chain_id: &str,
    members: &[usize],
    links: &HashMap<usize, Link>,
    joined_chains: Vec<String>,
    contextful: bool,
) -> ChainTree {
    // Parent of each member: evidence link, else span parentage within the
    // hop's own reported chain, else a gap (attached to the root).
    let mut by_span: HashMap<(&str, &str), Vec<usize>> = HashMap::default();
    for &i in members {
        by_span
            .entry((hops[i].chain_id.as_str(), hops[i].span_id.as_str()))
            .or_default()
            .push(i);
    }
    let order = |i: &usize| (hops[*i].start_unix_nanos, hops[*i].event_id.as_str());
    let group_confidence: HashMap<&str, f32> = links
        .iter()
        .map(|(&i, &(_, _, c))| (hops[i].chain_id.as_str(), c))
        .collect();
    // Tree parent and join of each member; `None` parent means "no parent found".
    let mut parent: HashMap<usize, (Option<usize>, Join)> = HashMap::default();
    let mut roots = Vec::new();
    for &i in members {
        let h = hops[i];
        if let Some(&(p, evidence, confidence)) = links.get(&i) {
            parent.insert(
                i,
                (
                    Some(p),
                    Join {
                        evidence,
                        confidence,
                    },
                ),
            );
            continue;
        }
        let found = if h.parent_span_id.is_empty() {
            None
        } else {
            by_span
                .get(&(h.chain_id.as_str(), h.parent_span_id.as_str()))
                .and_then(|c| {
                    c.iter().copied().filter(|&p| p != i).min_by_key(|&p| {
                        let same = hops[p].workload == h.workload;
                        (!same, hops[p].start_unix_nanos, hops[p].event_id.as_str())
                    })
                })
        };
        let mut own = own_join(h);
        if !has_context(h)
            && let Some(c) = group_confidence.get(h.chain_id.as_str())
        {
            // A contextless hop inside a joined group is as sure as the group's join.
            own.confidence = *c;
        }
        if found.is_none() && h.parent_span_id.is_empty() {
            roots.push(i);
        }
        let join = if found.is_some() || h.parent_span_id.is_empty() {
            own
        } else {
            Join {
                evidence: Evidence::Gap,
                confidence: GAP_CONFIDENCE.min(own.confidence),
            }
        };
        parent.insert(i, (found, join));
    }
    roots.sort_by_key(order);
    let mut sorted = members.to_vec();
    sorted.sort_by_key(order);
    // The root: the earliest hop without a parent span; failing that (the
    // root never arrived), the earliest hop without a parent in the tree.
    let root = roots.first().copied().or_else(|| {
        sorted
            .iter()
            .copied()
            .find(|i| parent.get(i).is_some_and(|(p, _)| p.is_none()))
    });
    let mut children: HashMap<usize, Vec<usize>> = HashMap::default();
    for &i in &sorted {
        if Some(i) == root {
            continue;
        }
        if let Some((p, join)) = parent.get_mut(&i) {
            let under = match p {
                Some(p) => *p,
                None => {
                    // A second root, or a hop whose parent never arrived.
                    *join = Join {
                        evidence: Evidence::Gap,
                        confidence: GAP_CONFIDENCE.min(join.confidence),
                    };
                    match root {
                        Some(r) => r,
                        None => continue,
                    }
                }
            };
            children.entry(under).or_default().push(i);
        }
    }
    let mut nodes = Vec::with_capacity(members.len());
    // The hop of each node, in the same order.
    let mut order = Vec::with_capacity(members.len());
    let mut seen = BTreeSet::new();
    let walk = |start: usize,
                up: Option<usize>,
                depth: u32,
                nodes: &mut Vec<HopNode>,
                order: &mut Vec<usize>,
                seen: &mut BTreeSet<usize>| {
        let mut stack = vec![(start, up, depth)];
        while let Some((i, p, depth)) = stack.pop() {
            if !seen.insert(i) {
                continue;
            }
            let mut join = parent
                .get(&i)
                .map_or_else(|| own_join(hops[i]), |(_, j)| j.clone());
            if p.is_none() {
                join.evidence = if join.evidence == Evidence::Gap {
                    Evidence::Gap
                } else {
                    Evidence::Root
                };
            } else if p != parent.get(&i).and_then(|(q, _)| *q) && join.evidence != Evidence::Gap {
                join = Join {
                    evidence: Evidence::Gap,
                    confidence: GAP_CONFIDENCE,
                };
            }
            nodes.push(node(
                hops[i],
                p.map(|p| hops[p].event_id.clone()),
                depth,
                join,
            ));
            order.push(i);
            if let Some(kids) = children.get(&i) {
                for &k in kids.iter().rev() {
                    stack.push((k, Some(i), depth + 1));
                }
            }
        }
    };
    if let Some(r) = root {
        walk(r, None, 0, &mut nodes, &mut order, &mut seen);
    }
    // Members caught in a parent cycle hang under the root as gaps.
    for &i in &sorted {
        if !seen.contains(&i) {
            let depth = u32::from(root.is_some());
            walk(i, root, depth, &mut nodes, &mut order, &mut seen);
        }
    }
    let summary = summarize(hops, chain_id, &nodes, &order, joined_chains, contextful);
    ChainTree {
        summary,
        hops: nodes,
    }
}

/// The join a hop brings by itself (before any evidence join).
fn own_join(h: &HopEvent) -> Join {
    let confidence = h.attribution.as_ref().map_or(0.0, |a| a.confidence);
    match method(h) {
        v1::AttributionMethod::Stitched => Join {
            evidence: Evidence::SidecarStitched,
            confidence,
        },
        v1::AttributionMethod::PeerOnly | v1::AttributionMethod::Unspecified => Join {
            evidence: Evidence::SpanParent,
            confidence: 0.0,
        },
        _ => Join {
            evidence: Evidence::SpanParent,
            confidence: 1.0,
        },
    }
}

/// A protobuf enum named in the API: its proto name without the enum's
/// prefix, in lower case (`DIRECTION_INBOUND` is `inbound`).
trait ApiName: Copy {
    /// The prefix every value's proto name starts with.
    const PREFIX: &'static str;
    /// The value's proto name.
    fn proto_name(self) -> &'static str;
}

macro_rules! api_names {
    ($($enum:ident => $prefix:literal),* $(,)?) => {$(
        impl ApiName for v1::$enum {
            const PREFIX: &'static str = $prefix;
            fn proto_name(self) -> &'static str {
                self.as_str_name()
            }
        }
    )*};
}

api_names! {
    Direction => "DIRECTION_",
    Protocol => "PROTOCOL_",
    AttributionMethod => "ATTRIBUTION_METHOD_",
    ContextOutcome => "CONTEXT_OUTCOME_",
    Verdict => "VERDICT_",
    InitiatorKind => "INITIATOR_KIND_",
    TransportSecurity => "TRANSPORT_SECURITY_",
}

fn name_of<T: ApiName>(value: Option<T>) -> String {
    value.map_or_else(
        || "unspecified".to_owned(),
        |v| {
            let name = v.proto_name();
            name.strip_prefix(T::PREFIX)
                .unwrap_or(name)
                .to_ascii_lowercase()
        },
    )
}

/// The tree node of hop `h` under the hop `parent` (an event id), at
/// `depth`, tied in by `join`. Stores keep only the tree's shape (parent,
/// depth, join per event id) and rebuild the nodes from the stored hops
/// with this function.
pub fn node(h: &HopEvent, parent: Option<String>, depth: u32, join: Join) -> HopNode {
    HopNode {
        event_id: h.event_id.clone(),
        chain_id: h.chain_id.clone(),
        span_id: h.span_id.clone(),
        parent_span_id: h.parent_span_id.clone(),
        parent_event_id: parent,
        depth,
        workload: workload_uri(h.workload.as_ref()),
        pod: h
            .workload
            .as_ref()
            .map(|w| w.pod.clone())
            .unwrap_or_default(),
        peer: workload_uri(h.peer.as_ref()),
        direction: name_of(v1::Direction::try_from(h.direction).ok()),
        protocol: name_of(v1::Protocol::try_from(h.protocol).ok()),
        operation: h.operation.clone(),
        status: h.status,
        attribution: name_of(Some(method(h))),
        context_outcome: name_of(Some(outcome(h))),
        join,
        start_unix_nanos: h.start_unix_nanos,
        duration_nanos: h.duration_nanos,
        egress: h.egress.as_ref().map(|e| {
            let d = e.destination.clone().unwrap_or_default();
            DestinationView {
                host: d.host,
                ip: d.ip,
                port: d.port,
                verdict: name_of(v1::Verdict::try_from(e.verdict).ok()),
                policy: e.policy.clone(),
                rule: e.rule.clone(),
            }
        }),
        data: h
            .data
            .iter()
            .map(|d| ClassCount {
                class: d.class.clone(),
                count: d.count,
            })
            .collect(),
        database: h.database.as_ref().map(|d| DatabaseView {
            system: d.system.clone(),
            database: d.database.clone(),
            user: d.user.clone(),
            statement_kind: d.statement_kind.clone(),
            tables_read: d.tables_read.clone(),
            tables_written: d.tables_written.clone(),
        }),
        key_id: h.key_id.clone(),
        refusal_reason: h.refusal_reason.clone(),
        transport_security: match v1::TransportSecurity::try_from(h.transport_security) {
            Ok(v1::TransportSecurity::Unspecified) | Err(_) => String::new(),
            Ok(security) => name_of(Some(security)),
        },
        peer_identity: h.peer_identity.clone(),
        transport_error: h.transport_error.clone(),
        identity_mismatch: h.identity_mismatch.clone(),
    }
}

fn push_unique(list: &mut Vec<String>, value: &str) {
    if !value.is_empty() && !list.iter().any(|v| v == value) {
        list.push(value.to_owned());
    }
}

/// The summary of the tree `nodes`, whose hops are `hops[order[k]]`.
fn summarize(
    hops: &[&HopEvent],
    chain_id: &str,
    nodes: &[HopNode],
    order: &[usize],
    joined_chains: Vec<String>,
    contextful: bool,
) -> ChainSummary {
    let mut services = Vec::new();
    let mut tools = Vec::new();
    let mut identities = BTreeSet::new();
    let mut classes: BTreeMap<String, u64> = BTreeMap::new();
    let mut destinations: Vec<DestinationView> = Vec::new();
    let mut initiator = None;
    let mut confidence: f32 = 1.0;
    let mut coverage_joined = false;
    let mut coverage_gap = false;
    for (n, &h) in nodes.iter().zip(order) {
        push_unique(&mut services, &n.workload);
        if n.direction == "inbound" {
            push_unique(&mut tools, &n.operation);
        }
        if let Some(db) = &n.database
            && !db.user.is_empty()
        {
            identities.insert(IdentityUse {
                kind: "database_user".into(),
                value: format!("{}/{}/{}", db.system, db.database, db.user),
            });
        }
        if !n.key_id.is_empty() {
            identities.insert(IdentityUse {
                kind: "key_id".into(),
                value: n.key_id.clone(),
            });
        }
        for d in &n.data {
            *classes.entry(d.class.clone()).or_default() += d.count;
        }
        if let Some(e) = &n.egress
            && !destinations.contains(e)
        {
            destinations.push(e.clone());
        }
        if let Some(i) = hops[h].initiator.as_ref()
            && !i.subject.is_empty()
        {
            match &mut initiator {
                None => {
                    initiator = Some(InitiatorView {
                        subject: i.subject.clone(),
                        kind: name_of(v1::InitiatorKind::try_from(i.kind).ok()),
                        actors: i.actors.clone(),
                        scope: i.scope.clone(),
                    });
                }
                // A delegation further down the chain (an agent handing the
                // task to a sub-agent) nests the earlier actors: the chain's
                // history is the deepest one any of its hops carried.
                Some(view)
                    if view.subject == i.subject
                        && i.actors.len() > view.actors.len()
                        && i.actors.ends_with(&view.actors) =>
                {
                    view.actors.clone_from(&i.actors);
                }
                Some(_) => {}
            }
        }
        confidence = confidence.min(n.join.confidence);
        match n.join.evidence {
            Evidence::Root | Evidence::SpanParent => {}
            Evidence::Gap => coverage_gap = true,
            _ => coverage_joined = true,
        }
    }
    // The workloads crossed are the services, each once.
    identities.extend(services.iter().map(|w| IdentityUse {
        kind: "workload".into(),
        value: w.clone(),
    }));
    let coverage = if !contextful || initiator.is_none() {
        Coverage::Orphan
    } else if coverage_gap || confidence < CONFIDENT {
        Coverage::Partial
    } else if coverage_joined {
        Coverage::Stitched
    } else {
        Coverage::Propagated
    };
    ChainSummary {
        chain_id: chain_id.to_owned(),
        coverage,
        confidence,
        initiator,
        services,
        tools,
        identities: identities.into_iter().collect(),
        data_classes: classes
            .into_iter()
            .map(|(class, count)| ClassCount { class, count })
            .collect(),
        destinations,
        joined_chains,
        hop_count: nodes.len(),
        first_unix_nanos: nodes.iter().map(|n| n.start_unix_nanos).min().unwrap_or(0),
        last_unix_nanos: nodes
            .iter()
            .map(|n| n.start_unix_nanos.saturating_add(n.duration_nanos))
            .max()
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests;
