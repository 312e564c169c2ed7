//! A chain crossing three workloads, as the sidecars would carry it: minted at
//! the edge for a user and her agent, replaced at each hop, delegated to a
//! sub-agent, tainted by a database read, then judged by an egress policy.
//!
//! Run: `cargo run -p custody-context --example chain`.

// An example speaks to its reader on stdout.
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;

use custody_context::issue::{Extension, Issuer, Mint};
use custody_context::keys::{KeySet, SigningKey};
use custody_context::policy::{ChainFacts, DestinationFacts, EgressPolicy, PolicyBundle, Verdict};
use custody_context::token::{Actor, HopAttribution, InitiatorKind};
use custody_context::traceparent::TraceParent;
use custody_context::verify::{Verifier, VerifierConfig};
use custody_context::workload::WorkloadId;

const POLICY: &str = r#"
apiVersion: custody.dev/v1
kind: EgressPolicy
metadata: { name: partner-data }
spec:
  rules:
    - name: no-ssn-to-partner
      destination: { hosts: ["api.partner.example"] }
      chain: { taintAny: ["pii.ssn"] }
      verdict: block
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let td = "cluster.local";
    let now = custody_context::unix_now();
    let workloads = [("shop", "web"), ("ai", "assistant"), ("shop", "reports")];
    let mut keys = KeySet::new();
    let mut issuers = Vec::new();
    for (ns, sa) in workloads {
        let id = WorkloadId::new(td, ns, sa)?;
        let key = SigningKey::generate();
        keys.insert(
            key.public_key()
                .bound_to(id.uri())
                .valid_between(now - 60, now + 3600),
        )?;
        issuers.push(Issuer::new(key, id.uri(), td, 300));
    }
    let verifier = Verifier::new(VerifierConfig::new(td), keys);

    let trace = TraceParent::new_root();
    let mut token = issuers[0].mint(
        Mint {
            txn: trace.trace_id,
            sub: "alice@example.com".into(),
            kind: InitiatorKind::Human,
            scope: "reports.generate".into(),
            act: Some(Actor::new("agent:assistant")),
            tctx: None,
            rctx: None,
            taint: vec![],
        },
        now,
    )?;
    let hops = [
        (HopAttribution::PROPAGATED, vec![], Some("agent:researcher")),
        (
            HopAttribution::stitched(0.5),
            vec!["pii.ssn", "pii.email"],
            None,
        ),
    ];
    for (issuer, (attribution, taint, delegate)) in issuers[1..].iter().zip(hops) {
        let prior = verifier.verify(&token.encoded, now)?;
        let mut ext = Extension::new(attribution);
        ext.taint = taint.into_iter().map(str::to_owned).collect();
        ext.delegate_to = delegate.map(str::to_owned);
        token = issuer.extend(&prior, ext, now)?;
    }

    let end = verifier.verify(&token.encoded, now)?;
    let c = &end.claims;
    println!(
        "chain {} ({} bytes, signed by key {})",
        c.txn,
        token.encoded.len(),
        end.kid
    );
    println!("  initiator  {} ({})", c.sub, c.custody.ini.as_str());
    println!("  actors     {}", c.actors().join(" <- "));
    for (wl, att) in c.req_wl.iter().zip(&c.custody.att) {
        println!(
            "  hop        {wl}  [{} {:.2}]",
            att.method.as_str(),
            att.confidence
        );
    }
    let taint: Vec<_> = c.custody.taint.iter().map(String::as_str).collect();
    println!("  taint      {}", taint.join(", "));

    let bundle = PolicyBundle {
        version: 1,
        policies: vec![EgressPolicy::from_yaml(POLICY)?],
        default_verdict: Verdict::Allow,
        revocations: Default::default(),
    };
    let clean = BTreeSet::new();
    for (label, taint) in [("this chain", &c.custody.taint), ("a clean chain", &clean)] {
        let decision = bundle.evaluate(
            &DestinationFacts {
                host: Some("api.partner.example"),
                ip: None,
                port: 443,
            },
            &ChainFacts {
                taint: Some(taint),
                ..Default::default()
            },
        );
        println!(
            "  egress     {label} -> api.partner.example: {} ({})",
            decision.verdict.as_str(),
            decision.rule.as_deref().unwrap_or("default")
        );
    }
    Ok(())
}
