//! Assembly on generated event streams with known ground truth.

use std::collections::BTreeMap;

use custody_context::api::v1::{self, FlowEvent, HopEvent};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;

const SERVICES: [&str; 6] = ["web", "orders", "payments", "ledger", "search", "mcp-tools"];

fn wl(sa: &str) -> v1::WorkloadId {
    v1::WorkloadId {
        trust_domain: "td".into(),
        namespace: "shop".into(),
        service_account: sa.into(),
        pod: String::new(),
    }
}

fn hex_id(rng: &mut StdRng, bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rng.r#gen::<u8>() | 1))
        .collect()
}

/// What the generator knows about the chain it produced.
#[derive(Debug, Default)]
struct Truth {
    root_chain: String,
    /// event id -> parent event id in the true tree.
    parent: BTreeMap<String, Option<String>>,
    coverage: Option<Coverage>,
}

/// How a call lost its context, if it did.
#[derive(Clone, Copy, PartialEq)]
enum Loss {
    None,
    /// The callee's sidecar saw no token: its inbound hop (and subtree) is contextless.
    CalleeMissing,
    /// The caller's application did not forward context: its outbound hop is contextless.
    CallerNotForwarded,
}

struct Gen {
    rng: StdRng,
    seq: u64,
    hops: Vec<HopEvent>,
}

impl Gen {
    fn new(seed: u64) -> Self {
        Gen {
            rng: StdRng::seed_from_u64(seed),
            seq: 0,
            hops: Vec::new(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn hop(
        &mut self,
        chain: &str,
        parent_span: &str,
        sa: &str,
        dir: v1::Direction,
        start: u64,
        dur: u64,
        context: bool,
        conn: Option<v1::FiveTuple>,
    ) -> HopEvent {
        self.seq += 1;
        let span = hex_id(&mut self.rng, 8);
        let (method, outcome) = if context {
            (
                v1::AttributionMethod::Propagated,
                v1::ContextOutcome::Propagated,
            )
        } else {
            (v1::AttributionMethod::PeerOnly, v1::ContextOutcome::Missing)
        };
        let hop = HopEvent {
            schema_version: 1,
            event_id: format!("e{:06}", self.seq),
            chain_id: chain.into(),
            span_id: span,
            parent_span_id: parent_span.into(),
            workload: Some(wl(sa)),
            direction: dir as i32,
            protocol: v1::Protocol::Http1 as i32,
            operation: format!("GET /{sa}"),
            initiator: context.then(|| v1::Initiator {
                subject: "alice@example.com".into(),
                kind: v1::InitiatorKind::Human as i32,
                actors: vec![],
                scope: "orders.read".into(),
            }),
            attribution: Some(v1::Attribution {
                method: method as i32,
                confidence: if context { 1.0 } else { 0.0 },
            }),
            context_outcome: outcome as i32,
            start_unix_nanos: start,
            duration_nanos: dur,
            connection: conn,
            ..Default::default()
        };
        self.hops.push(hop.clone());
        hop
    }

    /// One chain in `[t0, t0 + 100 ms)` with `calls` calls, losing context as told.
    fn chain(&mut self, t0: u64, calls: usize, loss: Loss) -> Truth {
        let chain = hex_id(&mut self.rng, 16);
        let mut truth = Truth {
            root_chain: chain.clone(),
            ..Default::default()
        };
        let root = self.hop(
            &chain,
            "",
            "web",
            v1::Direction::Inbound,
            t0,
            100_000_000,
            true,
            None,
        );
        truth.parent.insert(root.event_id.clone(), None);
        let lossy = if loss == Loss::None {
            usize::MAX
        } else {
            self.rng.gen_range(0..calls)
        };
        // Callers: (inbound hop, service, interval).
        let mut callers = vec![(root, "web".to_owned())];
        let mut coverage = Coverage::Propagated;
        let mut truth_services: Vec<&str> = Vec::new();
        for call in 0..calls {
            let (caller, caller_sa) = callers[self.rng.gen_range(0..callers.len())].clone();
            // Each service is called once per chain, so intervals on one workload never nest.
            let unused: Vec<&str> = SERVICES[1..]
                .iter()
                .copied()
                .filter(|s| !truth_services.contains(s))
                .collect();
            let callee = unused[self.rng.gen_range(0..unused.len())];
            truth_services.push(callee);
            // Nested strictly within the caller's interval.
            let slot = caller.duration_nanos / (calls as u64 + 2);
            let start = caller.start_unix_nanos + slot * (call as u64 + 1) / 2 + 1;
            let dur = slot / 2;
            let port = 40_000 + (self.seq % 20_000) as u32;
            let conn = v1::FiveTuple {
                src_ip: "10.0.0.1".into(),
                src_port: port,
                dst_ip: "10.0.0.2".into(),
                dst_port: 8080,
                transport: "tcp".into(),
            };
            let lost = call == lossy;
            let (out_chain, out_parent, out_ctx) = if lost && loss == Loss::CallerNotForwarded {
                (hex_id(&mut self.rng, 16), String::new(), false)
            } else {
                (chain.clone(), caller.span_id.clone(), true)
            };
            let out = self.hop(
                &out_chain,
                &out_parent,
                &caller_sa,
                v1::Direction::Outbound,
                start,
                dur,
                out_ctx,
                (loss != Loss::CallerNotForwarded).then(|| conn.clone()),
            );
            let (in_chain, in_parent, in_ctx) = if lost && loss == Loss::CalleeMissing {
                (hex_id(&mut self.rng, 16), String::new(), false)
            } else {
                (out_chain.clone(), out.span_id.clone(), out_ctx)
            };
            let inb = self.hop(
                &in_chain,
                &in_parent,
                callee,
                v1::Direction::Inbound,
                start + 1,
                dur - 2,
                in_ctx,
                (loss != Loss::CallerNotForwarded).then_some(conn),
            );
            truth
                .parent
                .insert(out.event_id.clone(), Some(caller.event_id.clone()));
            truth
                .parent
                .insert(inb.event_id.clone(), Some(out.event_id.clone()));
            if lost {
                coverage = Coverage::Stitched;
            }
            if !lost {
                callers.push((inb, callee.to_owned()));
            }
        }
        truth.coverage = Some(coverage);
        truth
    }
}

fn check_against(trees: &[ChainTree], truths: &[Truth]) {
    let by_chain: BTreeMap<&str, &ChainTree> = trees
        .iter()
        .map(|t| (t.summary.chain_id.as_str(), t))
        .collect();
    for truth in truths {
        let tree = by_chain
            .get(truth.root_chain.as_str())
            .unwrap_or_else(|| panic!("chain {} not assembled", truth.root_chain));
        let got: BTreeMap<String, Option<String>> = tree
            .hops
            .iter()
            .map(|h| (h.event_id.clone(), h.parent_event_id.clone()))
            .collect();
        assert_eq!(got, truth.parent, "tree of {}", truth.root_chain);
        assert_eq!(Some(tree.summary.coverage), truth.coverage);
        // Pre-order: every parent comes before its children.
        let mut seen = BTreeSet::new();
        for h in &tree.hops {
            if let Some(p) = &h.parent_event_id {
                assert!(seen.contains(p), "{} before its parent", h.event_id);
            }
            seen.insert(h.event_id.clone());
        }
    }
    assert_eq!(trees.len(), truths.len(), "no extra chains");
}

fn generate(seed: u64, chains: usize) -> (Vec<HopEvent>, Vec<Truth>) {
    let mut g = Gen::new(seed);
    let mut truths = Vec::new();
    for k in 0..chains {
        let loss = match k % 4 {
            0 | 1 => Loss::None,
            2 => Loss::CalleeMissing,
            _ => Loss::CallerNotForwarded,
        };
        let calls = 1 + k % 5;
        truths.push(g.chain(1_000_000_000_000 + k as u64 * 1_000_000_000, calls, loss));
    }
    (g.hops, truths)
}

#[test]
fn assembles_generated_streams_whatever_the_order() {
    for seed in 0..5 {
        let (mut hops, truths) = generate(seed, 40);
        let mut rng = StdRng::seed_from_u64(seed + 100);
        // Duplicates: a fifth of the events arrive twice.
        let dups: Vec<HopEvent> = hops.iter().filter(|_| rng.gen_bool(0.2)).cloned().collect();
        hops.extend(dups);
        hops.shuffle(&mut rng);
        let trees = assemble(&hops, &[]);
        check_against(&trees, &truths);
        hops.shuffle(&mut rng);
        assert_eq!(assemble(&hops, &[]), trees, "order does not matter");
    }
}

#[test]
fn late_arrivals_leave_a_gap_then_complete_the_chain() {
    let mut g = Gen::new(7);
    let truth = g.chain(1_000_000_000_000, 4, Loss::None);
    let mut hops = g.hops.clone();
    // Hold back the first call's callee inbound hop: its children lose their parent.
    let held = hops
        .iter()
        .position(|h| {
            h.direction == v1::Direction::Inbound as i32
                && !h.parent_span_id.is_empty()
                && hops.iter().any(|c| c.parent_span_id == h.span_id)
        })
        .map(|i| hops.remove(i))
        .expect("the generated chain has a callee with children");
    let trees = assemble(&hops, &[]);
    assert_eq!(trees.len(), 1);
    assert_eq!(trees[0].summary.coverage, Coverage::Partial);
    assert!(
        trees[0]
            .hops
            .iter()
            .any(|h| h.join.evidence == Evidence::Gap)
    );
    assert!(trees[0].summary.confidence <= GAP_CONFIDENCE);
    hops.push(held);
    check_against(&assemble(&hops, &[]), &[truth]);
}

#[test]
fn a_lost_callee_context_is_joined_by_five_tuple() {
    let mut g = Gen::new(11);
    let truth = g.chain(1_000_000_000_000, 1, Loss::CalleeMissing);
    let trees = assemble(&g.hops, &[]);
    check_against(&trees, &[truth]);
    let joined = &trees[0].hops[2];
    assert_eq!(joined.join.evidence, Evidence::FiveTuple);
    assert_eq!(joined.join.confidence, FIVE_TUPLE_CONFIDENCE);
    assert_eq!(trees[0].summary.joined_chains.len(), 1);
}

#[test]
fn a_caller_that_drops_context_is_joined_by_time_containment() {
    let mut g = Gen::new(12);
    let truth = g.chain(1_000_000_000_000, 1, Loss::CallerNotForwarded);
    let trees = assemble(&g.hops, &[]);
    check_against(&trees, &[truth]);
    assert_eq!(trees[0].hops[1].join.evidence, Evidence::TimeContainment);
    assert_eq!(trees[0].summary.coverage, Coverage::Stitched);
}

#[test]
fn overlapping_requests_make_a_containment_join_ambiguous() {
    let mut g = Gen::new(13);
    let a = g.chain(1_000_000_000_000, 1, Loss::None);
    let b = g.chain(1_000_000_000_000, 1, Loss::None);
    // An outbound call from `web` without context, inside both requests.
    let orphan = g.hop(
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab",
        "",
        "web",
        v1::Direction::Outbound,
        1_000_050_000_000,
        1_000,
        false,
        None,
    );
    let trees = assemble(&g.hops, &[]);
    assert_eq!(trees.len(), 2);
    let host = trees
        .iter()
        .find(|t| t.hops.iter().any(|h| h.event_id == orphan.event_id))
        .expect("joined somewhere");
    assert_eq!(host.summary.coverage, Coverage::Partial);
    assert!(host.summary.confidence < CONFIDENT);
    assert!([&a.root_chain, &b.root_chain].contains(&&host.summary.chain_id));
}

#[test]
fn a_flow_names_the_caller_of_a_contextless_inbound_hop() {
    let mut g = Gen::new(14);
    let truth = g.chain(1_000_000_000_000, 0, Loss::None);
    let root = g.hops[0].clone();
    let conn = v1::FiveTuple {
        src_ip: "10.0.0.9".into(),
        src_port: 5555,
        dst_ip: "10.0.0.3".into(),
        dst_port: 5432,
        transport: "tcp".into(),
    };
    // The caller's outbound went around the sidecar: only the callee's sidecar saw it.
    let inb = g.hop(
        "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        "",
        "ledger",
        v1::Direction::Inbound,
        root.start_unix_nanos + 10,
        100,
        false,
        Some(conn.clone()),
    );
    let flow = FlowEvent {
        schema_version: 1,
        event_id: "f1".into(),
        workload: Some(wl("web")),
        connection: Some(conn),
        ..Default::default()
    };
    let without = assemble(&g.hops, &[]);
    assert_eq!(without.len(), 2, "no evidence, no join");
    let orphan = without
        .iter()
        .find(|t| t.summary.chain_id == inb.chain_id)
        .unwrap();
    assert_eq!(orphan.summary.coverage, Coverage::Orphan);

    let trees = assemble(&g.hops, &[flow]);
    assert_eq!(trees.len(), 1);
    assert_eq!(trees[0].summary.chain_id, truth.root_chain);
    assert_eq!(trees[0].hops[1].join.evidence, Evidence::FlowContainment);
    assert_eq!(trees[0].summary.coverage, Coverage::Stitched);
}

#[test]
fn summaries_keep_identities_data_and_destinations() {
    let mut g = Gen::new(15);
    g.chain(1_000_000_000_000, 2, Loss::None);
    let last = g.hops.len() - 1;
    g.hops[last].data = vec![v1::DataTouch {
        class: "pii.email".into(),
        count: 3,
        confidence: 1.0,
    }];
    g.hops[last].database = Some(v1::DatabaseAccess {
        system: "postgresql".into(),
        database: "shop".into(),
        user: "orders_rw".into(),
        ..Default::default()
    });
    g.hops[last].key_id = "kid-1".into();
    g.hops[1].egress = Some(v1::EgressDecision {
        destination: Some(v1::Destination {
            host: "api.partner.example".into(),
            ip: String::new(),
            port: 443,
        }),
        verdict: v1::Verdict::Block as i32,
        policy: "partner".into(),
        rule: "no-pii".into(),
    });
    let trees = assemble(&g.hops, &[]);
    let s = &trees[0].summary;
    assert_eq!(s.services[0], "spiffe://td/ns/shop/sa/web");
    assert_eq!(
        s.data_classes,
        vec![ClassCount {
            class: "pii.email".into(),
            count: 3
        }]
    );
    assert_eq!(s.destinations[0].host, "api.partner.example");
    assert_eq!(s.destinations[0].verdict, "block");
    assert!(s.identities.contains(&IdentityUse {
        kind: "database_user".into(),
        value: "postgresql/shop/orders_rw".into()
    }));
    assert!(
        s.identities
            .iter()
            .any(|i| i.kind == "key_id" && i.value == "kid-1")
    );
    assert_eq!(s.initiator.as_ref().unwrap().kind, "human");
    let json = serde_json::to_string(&trees[0]).unwrap();
    let back: ChainTree = serde_json::from_str(&json).unwrap();
    assert_eq!(back, trees[0]);
}

#[test]
fn a_delegation_further_down_the_chain_is_the_chains_actor_history() {
    let mut g = Gen::new(16);
    g.chain(1_000_000_000_000, 2, Loss::None);
    let actors = |list: &[&str]| list.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    g.hops[0].initiator.as_mut().unwrap().actors = actors(&["assistant"]);
    let last = g.hops.len() - 1;
    g.hops[last].initiator.as_mut().unwrap().actors = actors(&["researcher", "assistant"]);
    let trees = assemble(&g.hops, &[]);
    assert_eq!(trees.len(), 1);
    let initiator = trees[0].summary.initiator.as_ref().unwrap();
    assert_eq!(initiator.subject, "alice@example.com");
    assert_eq!(initiator.actors, actors(&["researcher", "assistant"]));

    // A history that does not extend the root's is not taken for it.
    let mut g = Gen::new(17);
    g.chain(1_000_000_000_000, 2, Loss::None);
    g.hops[0].initiator.as_mut().unwrap().actors = actors(&["assistant"]);
    let last = g.hops.len() - 1;
    g.hops[last].initiator.as_mut().unwrap().actors = actors(&["mallory", "someone-else"]);
    let trees = assemble(&g.hops, &[]);
    assert_eq!(
        trees[0].summary.initiator.as_ref().unwrap().actors,
        actors(&["assistant"])
    );
}

#[test]
fn api_names_are_the_variant_names_in_snake_case() {
    fn snake(debug: String) -> String {
        let mut out = String::new();
        for (i, c) in debug.chars().enumerate() {
            if c.is_ascii_uppercase() {
                if i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_lowercase());
            } else {
                out.push(c);
            }
        }
        out
    }
    fn check<T: ApiName + std::fmt::Debug + TryFrom<i32>>() -> usize {
        let values: Vec<T> = (0..32).filter_map(|n| T::try_from(n).ok()).collect();
        for v in &values {
            assert_eq!(name_of(Some(*v)), snake(format!("{v:?}")), "{v:?}");
        }
        values.len()
    }
    let named = check::<v1::Direction>()
        + check::<v1::Protocol>()
        + check::<v1::AttributionMethod>()
        + check::<v1::ContextOutcome>()
        + check::<v1::Verdict>()
        + check::<v1::InitiatorKind>()
        + check::<v1::TransportSecurity>();
    assert!(named >= 35, "every value checked: {named}");
    assert_eq!(name_of::<v1::Direction>(None), "unspecified");
    assert_eq!(name_of(Some(v1::AttributionMethod::PeerOnly)), "peer_only");
}

#[test]
fn inbound_hops_containing_an_interval_are_those_a_scan_finds() {
    let mut rng = StdRng::seed_from_u64(7);
    let hops: Vec<HopEvent> = (0..400)
        .map(|i| HopEvent {
            event_id: format!("e{i}"),
            start_unix_nanos: rng.gen_range(0..10_000),
            // Mostly short requests, a few very long ones.
            duration_nanos: if i % 50 == 0 {
                rng.gen_range(0..9_000)
            } else {
                rng.gen_range(0..200)
            },
            ..HopEvent::default()
        })
        .collect();
    let refs: Vec<&HopEvent> = hops.iter().collect();
    let mut inbound = Inbound::default();
    for (i, h) in refs.iter().enumerate().skip(100) {
        inbound.by_start.push(i);
        inbound.longest = inbound.longest.max(h.duration_nanos);
    }
    inbound
        .by_start
        .sort_unstable_by_key(|&j| refs[j].start_unix_nanos);
    let mut found_some = 0;
    for h in &refs[..100] {
        let mut fast: Vec<usize> = inbound.containing(&refs, h).collect();
        let mut scan: Vec<usize> = (100..refs.len())
            .filter(|&j| refs[j].start_unix_nanos <= h.start_unix_nanos && end(refs[j]) >= end(h))
            .collect();
        fast.sort_unstable();
        scan.sort_unstable();
        assert_eq!(fast, scan, "{h:?}");
        found_some += usize::from(!scan.is_empty());
    }
    assert!(
        found_some > 10,
        "the intervals overlap enough to test: {found_some}"
    );
}
