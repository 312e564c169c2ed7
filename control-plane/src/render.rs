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
    let mut out = format!(
        "{:<32}  {:<10}  {:>4}  {:<20}  {:<24}  {}\n",
        "CHAIN", "COVERAGE", "HOPS", "LAST SEEN", "INITIATOR", "SERVICES"
    );
    for c in list {
        let who = c
            .initiator
            .as_ref()
            .map_or_else(|| "-".to_owned(), |i| format!("{} ({})", i.subject, i.kind));
        let services: Vec<String> = c.services.iter().map(|s| short_workload(s)).collect();
        let _ = writeln!(
            out,
            "{:<32}  {:<10}  {:>4}  {:<20}  {:<24}  {}",
            c.chain_id,
            c.coverage.as_str(),
            c.hop_count,
            when(c.last_unix_nanos),
            who,
            services.join(" > ")
        );
    }
    out
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
    line
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
    for h in &tree.hops {
        let indent = "  ".repeat(h.depth as usize);
        let _ = writeln!(
            out,
            "{indent}{} {}",
            if h.depth == 0 { "*" } else { "└─" },
            hop_line(h)
        );
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
    #[test]
    fn dates_are_utc_civil_time() {
        assert_eq!(super::when(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            super::when(1_700_000_000_000_000_000),
            "2023-11-14T22:13:20Z"
        );
    }
}
