//! Human output of the `custody` CLI: chain lists, chain trees (who, through
//! what, with which identity, touching what, going where, with what
//! confidence), blast radius, policies.

use std::fmt::Write as _;

use crate::assembly::{ChainSummary, ChainTree, Evidence, HopNode};
use crate::http::BlastRadius;
use crate::store::PolicyState;

fn short_workload(uri: &str) -> String {
    // spiffe://td/ns/NS/sa/SA -> NS/SA
    uri.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once("/ns/"))
        .and_then(|(_, rest)| rest.split_once("/sa/"))
        .map_or_else(|| uri.to_owned(), |(ns, sa)| format!("{ns}/{sa}"))
}

fn when(nanos: u64) -> String {
    let secs = nanos / 1_000_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A table of chains.
pub fn chains(list: &[ChainSummary]) -> String {
    if list.is_empty() {
        return "no chains\n".to_owned();
    }
    let mut out = chains_header();
    for c in list {
        out.push_str(&chain_row(c));
    }
    out
}

/// The header line of a table of chains.
pub fn chains_header() -> String {
    format!(
        "{:<32}  {:<10}  {:>4}  {:<20}  {:<24}  {}\n",
        "CHAIN", "COVERAGE", "HOPS", "LAST SEEN", "INITIATOR", "SERVICES"
    )
}

/// One line of a table of chains.
pub fn chain_row(c: &ChainSummary) -> String {
    let who = c
        .initiator
        .as_ref()
        .map_or_else(|| "-".to_owned(), |i| format!("{} ({})", i.subject, i.kind));
    let services: Vec<String> = c.services.iter().map(|s| short_workload(s)).collect();
    format!(
        "{:<32}  {:<10}  {:>4}  {:<20}  {:<24}  {}\n",
        c.chain_id,
        c.coverage.as_str(),
        c.hop_count,
        when(c.last_unix_nanos),
        who,
        services.join(" > ")
    )
}

fn hop_line(h: &HopNode) -> String {
    let mut line = format!(
        "{} {} {}",
        short_workload(&h.workload),
        if h.direction == "inbound" { "<-" } else { "->" },
        if h.operation.is_empty() {
            "?"
        } else {
            &h.operation
        }
    );
    if h.status != 0 {
        let _ = write!(line, " [{}]", h.status);
    }
    let _ = write!(line, "  via {}", h.attribution);
    if h.join.evidence != Evidence::Root && h.join.evidence != Evidence::SpanParent
        || h.join.confidence < 1.0
    {
        let evidence = serde_json::to_value(h.join.evidence)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = write!(line, " ({evidence}, confidence {:.2})", h.join.confidence);
    }
    if let Some(db) = &h.database {
        let _ = write!(
            line,
            "  as {}/{} user {}: {}",
            db.system, db.database, db.user, db.statement_kind
        );
    }
    if !h.key_id.is_empty() {
        let _ = write!(line, "  key {}", h.key_id);
    }
    if !h.data.is_empty() {
        let classes: Vec<String> = h
            .data
            .iter()
            .map(|d| format!("{}x{}", d.class, d.count))
            .collect();
        let _ = write!(line, "  touches {}", classes.join(", "));
    }
    if let Some(e) = &h.egress {
        let dest = if e.host.is_empty() { &e.ip } else { &e.host };
        let _ = write!(line, "  to {dest}:{} {}", e.port, e.verdict.to_uppercase());
        if !e.policy.is_empty() {
            let _ = write!(line, " by {}/{}", e.policy, e.rule);
        }
    }
    if !h.refusal_reason.is_empty() {
        let _ = write!(line, "  refused token: {}", h.refusal_reason);
    }
    if let Some(transport) = transport(h) {
        let _ = write!(line, "  {transport}");
    }
    line
}

/// How the hop's connection was secured, as a reader says it: `mTLS from
/// spiffe://…` (inbound) or `mTLS to spiffe://…` (outbound), `plaintext`,
/// `TLS`, `TLS originated`; `None` when the sidecar did not say.
fn transport(h: &HopNode) -> Option<String> {
    let toward = if h.direction == "inbound" {
        "from"
    } else {
        "to"
    };
    let peer = (!h.peer_identity.is_empty()).then_some(h.peer_identity.as_str());
    let said = match (h.transport_security.as_str(), peer) {
        ("", None) => return None,
        ("", Some(peer)) => format!("peer {peer}"),
        ("mesh_mtls", Some(peer)) => format!("mTLS {toward} {peer}"),
        ("mesh_mtls", None) => "mTLS".to_owned(),
        ("plaintext", _) => "plaintext".to_owned(),
        ("tls", _) => "TLS".to_owned(),
        ("tls_originated", _) => "TLS originated".to_owned(),
        (other, _) => other.to_owned(),
    };
    Some(said)
}

/// What a reader must not miss about the hop's transport: a failed TLS
/// check toward the peer, or a token that disagrees with the mTLS peer.
fn transport_warnings(h: &HopNode) -> Vec<String> {
    let mut warnings = Vec::new();
    if !h.transport_error.is_empty() {
        warnings.push(format!(
            "WARNING transport error: {} (TLS toward the peer failed; the call was not made in plaintext)",
            h.transport_error
        ));
    }
    if !h.identity_mismatch.is_empty() {
        let peer = if h.peer_identity.is_empty() {
            "the mTLS peer"
        } else {
            &h.peer_identity
        };
        warnings.push(format!(
            "WARNING identity mismatch: {} (the chain's token does not name {peer})",
            h.identity_mismatch
        ));
    }
    warnings
}

/// One chain as a readable tree.
pub fn chain(tree: &ChainTree) -> String {
    let s = &tree.summary;
    let mut out = format!(
        "chain {}  coverage {} (confidence {:.2})\n",
        s.chain_id,
        s.coverage.as_str(),
        s.confidence
    );
    match &s.initiator {
        Some(i) => {
            let _ = write!(out, "initiator {} ({})", i.subject, i.kind);
            if !i.actors.is_empty() {
                let _ = write!(out, " acting through {}", i.actors.join(" <- "));
            }
            if !i.scope.is_empty() {
                let _ = write!(out, " scope {}", i.scope);
            }
            out.push('\n');
        }
        None => out.push_str("initiator unknown\n"),
    }
    let _ = writeln!(
        out,
        "from {} to {}",
        when(s.first_unix_nanos),
        when(s.last_unix_nanos)
    );
    let mut warned = 0;
    for h in &tree.hops {
        let indent = "  ".repeat(h.depth as usize);
        let _ = writeln!(
            out,
            "{indent}{} {}",
            if h.depth == 0 { "*" } else { "└─" },
            hop_line(h)
        );
        let warnings = transport_warnings(h);
        warned += usize::from(!warnings.is_empty());
        for warning in warnings {
            let _ = writeln!(out, "{indent}   ! {warning}");
        }
    }
    if !s.data_classes.is_empty() {
        let classes: Vec<String> = s
            .data_classes
            .iter()
            .map(|d| format!("{} ({})", d.class, d.count))
            .collect();
        let _ = writeln!(out, "data: {}", classes.join(", "));
    }
    if !s.destinations.is_empty() {
        let dests: Vec<String> = s
            .destinations
            .iter()
            .map(|d| {
                format!(
                    "{}:{} {}",
                    if d.host.is_empty() { &d.ip } else { &d.host },
                    d.port,
                    d.verdict
                )
            })
            .collect();
        let _ = writeln!(out, "egress: {}", dests.join(", "));
    }
    if !s.identities.is_empty() {
        let ids: Vec<String> = s
            .identities
            .iter()
            .map(|i| format!("{} {}", i.kind, i.value))
            .collect();
        let _ = writeln!(out, "identities: {}", ids.join(", "));
    }
    if !s.joined_chains.is_empty() {
        let _ = writeln!(out, "joined by evidence: {}", s.joined_chains.join(", "));
    }
    if warned > 0 {
        let _ = writeln!(
            out,
            "WARNING: {warned} hop(s) with a transport error or an identity mismatch (marked !)"
        );
    }
    out
}

/// A blast radius.
pub fn blast_radius(b: &BlastRadius) -> String {
    let mut out = format!("blast radius of {}: {} chains\n", b.subject, b.chains.len());
    let services: Vec<String> = b.services.iter().map(|s| short_workload(s)).collect();
    let _ = writeln!(
        out,
        "services: {}",
        if services.is_empty() {
            "-".to_owned()
        } else {
            services.join(", ")
        }
    );
    let classes: Vec<String> = b
        .data_classes
        .iter()
        .map(|d| format!("{} ({})", d.class, d.count))
        .collect();
    let _ = writeln!(
        out,
        "data: {}",
        if classes.is_empty() {
            "-".to_owned()
        } else {
            classes.join(", ")
        }
    );
    let dests: Vec<String> = b
        .destinations
        .iter()
        .map(|d| {
            format!(
                "{}:{} {}",
                if d.host.is_empty() { &d.ip } else { &d.host },
                d.port,
                d.verdict
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "egress: {}",
        if dests.is_empty() {
            "-".to_owned()
        } else {
            dests.join(", ")
        }
    );
    if !b.chains.is_empty() {
        out.push('\n');
        out.push_str(&chains(&b.chains));
    }
    out
}

/// The policy in force.
pub fn policies(state: &PolicyState) -> String {
    let mut out = format!(
        "version {}  default {}\n",
        state.version,
        state.default_verdict.as_str()
    );
    for p in &state.policies {
        let _ = writeln!(out, "policy {}", p.name());
        for r in &p.spec.rules {
            let mut hosts: Vec<String> = r
                .destination
                .hosts
                .iter()
                .map(ToString::to_string)
                .collect();
            hosts.extend(r.destination.cidrs.iter().map(ToString::to_string));
            let _ = write!(
                out,
                "  rule {}: {} {}",
                r.name,
                r.verdict.as_str(),
                if hosts.is_empty() {
                    "any destination".to_owned()
                } else {
                    hosts.join(", ")
                }
            );
            if !r.chain.taint_any.is_empty() {
                let _ = write!(out, " when tainted by {}", r.chain.taint_any.join("|"));
            }
            if !r.chain.initiator_kinds.is_empty() {
                let kinds: Vec<&str> = r.chain.initiator_kinds.iter().map(|k| k.as_str()).collect();
                let _ = write!(out, " for {}", kinds.join("|"));
            }
            out.push('\n');
        }
    }
    let r = &state.revocations;
    for (what, set) in [
        ("principal", &r.principals),
        ("key", &r.key_ids),
        ("credential", &r.credential_hashes),
        ("quarantined chain", &r.quarantined_chains),
    ] {
        for v in set {
            let _ = writeln!(out, "revoked {what} {v}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use custody_context::api::v1;

    use crate::assembly::{ChainTree, Evidence, Join, node};

    /// A hop of `sa`, changed by `edit`.
    fn event(sa: &str, edit: impl FnOnce(&mut v1::HopEvent)) -> v1::HopEvent {
        let mut h = v1::HopEvent {
            schema_version: 1,
            event_id: format!("{sa}-1"),
            chain_id: "0af7651916cd43dd8448eb211c80319c".into(),
            span_id: "b7ad6b7169203331".into(),
            workload: Some(v1::WorkloadId {
                trust_domain: "td".into(),
                namespace: "shop".into(),
                service_account: sa.into(),
                pod: format!("{sa}-0"),
            }),
            direction: v1::Direction::Inbound as i32,
            protocol: v1::Protocol::Http1 as i32,
            operation: "GET /checkout".into(),
            status: 200,
            attribution: Some(v1::Attribution {
                method: v1::AttributionMethod::Propagated as i32,
                confidence: 1.0,
            }),
            context_outcome: v1::ContextOutcome::Propagated as i32,
            start_unix_nanos: 1_700_000_000_000_000_000,
            duration_nanos: 1_000_000,
            ..Default::default()
        };
        edit(&mut h);
        h
    }

    /// The hop of `sa`, changed by `edit`, as the investigation API shows it.
    fn hop(sa: &str, edit: impl FnOnce(&mut v1::HopEvent)) -> crate::assembly::HopNode {
        let join = Join {
            evidence: Evidence::Root,
            confidence: 1.0,
        };
        node(&event(sa, edit), None, 0, join)
    }

    const WEB: &str = "spiffe://td/ns/shop/sa/web";

    /// The hop's line and the warnings under it.
    fn check(edit: impl FnOnce(&mut v1::HopEvent), line: &str, warnings: &[&str]) {
        let h = hop("orders", edit);
        let shown = super::hop_line(&h);
        assert!(
            shown.ends_with(line),
            "{shown:?} does not end with {line:?}"
        );
        let warned = super::transport_warnings(&h);
        assert_eq!(warned.len(), warnings.len(), "{warned:?}");
        for (w, want) in warned.iter().zip(warnings) {
            assert!(w.starts_with(want), "{w:?} does not start with {want:?}");
        }
    }

    #[test]
    fn each_hop_says_how_its_connection_was_secured() {
        use v1::TransportSecurity as T;
        let secured = |t: T, peer: &str| {
            let peer = peer.to_owned();
            move |h: &mut v1::HopEvent| {
                h.transport_security = t as i32;
                h.peer_identity = peer;
            }
        };
        check(|_| {}, "via propagated", &[]);
        check(secured(T::MeshMtls, WEB), &format!("mTLS from {WEB}"), &[]);
        check(
            |h| {
                secured(T::MeshMtls, WEB)(h);
                h.direction = v1::Direction::Outbound as i32;
            },
            &format!("mTLS to {WEB}"),
            &[],
        );
        check(secured(T::MeshMtls, ""), "  mTLS", &[]);
        check(secured(T::Plaintext, ""), "  plaintext", &[]);
        check(secured(T::Tls, ""), "  TLS", &[]);
        check(secured(T::TlsOriginated, ""), "  TLS originated", &[]);
        check(secured(T::Unspecified, WEB), &format!("  peer {WEB}"), &[]);
    }

    #[test]
    fn transport_errors_and_identity_mismatches_are_warned_about() {
        check(
            |h| {
                h.direction = v1::Direction::Outbound as i32;
                h.transport_error = "peer_identity_mismatch".into();
            },
            "via propagated",
            &["WARNING transport error: peer_identity_mismatch"],
        );
        check(
            |h| {
                h.transport_security = v1::TransportSecurity::MeshMtls as i32;
                h.peer_identity = WEB.into();
                h.identity_mismatch = "token_workload_mismatch".into();
            },
            &format!("mTLS from {WEB}"),
            &[
                "WARNING identity mismatch: token_workload_mismatch (the chain's token does not name spiffe://td/ns/shop/sa/web)",
            ],
        );
        check(
            |h| {
                h.transport_error = "handshake_failed".into();
                h.identity_mismatch = "token_workload_mismatch".into();
            },
            "via propagated",
            &[
                "WARNING transport error: handshake_failed",
                "WARNING identity mismatch: token_workload_mismatch (the chain's token does not name the mTLS peer)",
            ],
        );
    }

    #[test]
    fn a_chain_with_a_transport_warning_says_so_under_the_hop_and_at_the_end() {
        let web = event("web", |h| {
            h.transport_security = v1::TransportSecurity::Plaintext as i32;
        });
        let orders = event("orders", |h| {
            h.span_id = "00f067aa0ba902b7".into();
            h.parent_span_id = web.span_id.clone();
            h.start_unix_nanos += 10;
            h.duration_nanos -= 20;
            h.transport_security = v1::TransportSecurity::MeshMtls as i32;
            h.peer_identity = WEB.into();
            h.identity_mismatch = "token_workload_mismatch".into();
        });
        let trees: Vec<ChainTree> = crate::assembly::assemble(&[web, orders], &[]);
        assert_eq!(trees.len(), 1);
        let tree = &trees[0];
        assert_eq!(tree.hops[1].depth, 1, "{tree:#?}");
        let text = super::chain(tree);
        let lines: Vec<&str> = text.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.contains("shop/orders <-"))
            .unwrap();
        assert!(lines[at - 1].ends_with("  plaintext"), "{text}");
        assert!(lines[at].ends_with(&format!("mTLS from {WEB}")), "{text}");
        assert_eq!(
            lines[at + 1],
            "     ! WARNING identity mismatch: token_workload_mismatch (the chain's token does not name spiffe://td/ns/shop/sa/web)",
            "{text}"
        );
        assert!(
            text.ends_with(
                "WARNING: 1 hop(s) with a transport error or an identity mismatch (marked !)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn dates_are_utc_civil_time() {
        assert_eq!(super::when(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            super::when(1_700_000_000_000_000_000),
            "2023-11-14T22:13:20Z"
        );
    }
}
