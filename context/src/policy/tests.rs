use std::collections::BTreeSet;
use std::net::IpAddr;

use super::*;

const PARTNER: &str = r#"
apiVersion: custody.dev/v1
kind: EgressPolicy
metadata:
  name: partner-data
spec:
  rules:
    - name: no-ssn-to-partner
      destination: { hosts: ["api.partner.example"], ports: [443, 80] }
      chain: { taintAny: ["pii.ssn"] }
      verdict: block
    - name: partner-allowed
      destination: { hosts: ["api.partner.example"] }
      verdict: allow
    - name: agents-audited
      destination: { hosts: ["*.partner.example"], cidrs: ["198.51.100.0/24"] }
      chain: { initiatorKinds: [agent] }
      verdict: audit
"#;

fn bundle(yaml: &[&str], default: Verdict) -> PolicyBundle {
    PolicyBundle {
        version: 1,
        policies: yaml
            .iter()
            .map(|y| EgressPolicy::from_yaml(y).unwrap())
            .collect(),
        default_verdict: default,
        revocations: Revocations::default(),
    }
}

fn dest(host: &str, port: u16) -> DestinationFacts<'_> {
    DestinationFacts {
        host: Some(host),
        ip: None,
        port,
    }
}

#[test]
fn parses_a_policy_document() {
    let p = EgressPolicy::from_yaml(PARTNER).unwrap();
    assert_eq!(p.name(), "partner-data");
    assert_eq!(p.spec.rules.len(), 3);
    assert_eq!(p.spec.rules[0].chain.taint_any, vec!["pii.ssn"]);
    assert_eq!(
        p.spec.rules[2].chain.initiator_kinds,
        vec![InitiatorKind::Agent]
    );
    // JSON round trip.
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(EgressPolicy::parse(&json).unwrap(), p);
}

#[test]
fn data_aware_egress_same_service_same_destination() {
    let b = bundle(&[PARTNER], Verdict::Allow);
    let ssn: BTreeSet<String> = ["pii.ssn".to_owned()].into();
    let email: BTreeSet<String> = ["pii.email".to_owned()].into();
    let tainted = ChainFacts {
        taint: Some(&ssn),
        ..Default::default()
    };
    let clean = ChainFacts {
        taint: Some(&email),
        ..Default::default()
    };
    let d = b.evaluate(&dest("api.partner.example", 443), &tainted);
    assert_eq!(d.verdict, Verdict::Block);
    assert_eq!(d.policy.as_deref(), Some("partner-data"));
    assert_eq!(d.rule.as_deref(), Some("no-ssn-to-partner"));
    let d = b.evaluate(&dest("api.partner.example", 443), &clean);
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.rule.as_deref(), Some("partner-allowed"));
    // Port not listed on the block rule: the allow rule decides.
    let d = b.evaluate(&dest("api.partner.example", 8443), &tainted);
    assert_eq!(d.verdict, Verdict::Allow);
}

#[test]
fn the_most_restrictive_match_wins_and_default_covers_the_rest() {
    let block = r#"
apiVersion: custody.dev/v1
kind: EgressPolicy
metadata: { name: contain-paste }
spec:
  rules:
    - name: paste
      destination: { hosts: ["*.risky.example"] }
      verdict: block
"#;
    let allow_all = r#"
apiVersion: custody.dev/v1
kind: EgressPolicy
metadata: { name: allow-all }
spec:
  rules:
    - name: everything
      verdict: allow
"#;
    let b = bundle(&[allow_all, block], Verdict::Block);
    let chain = ChainFacts::default();
    let d = b.evaluate(&dest("paste.risky.example", 443), &chain);
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Block, Some("paste"))
    );
    let d = b.evaluate(&dest("example.org", 443), &chain);
    assert_eq!(
        (d.verdict, d.rule.as_deref()),
        (Verdict::Allow, Some("everything"))
    );
    let only_block = bundle(&[block], Verdict::Audit);
    let d = only_block.evaluate(&dest("example.org", 443), &chain);
    assert_eq!(
        d,
        Decision {
            verdict: Verdict::Audit,
            policy: None,
            rule: None
        }
    );
}

#[test]
fn chain_conditions_must_all_hold() {
    let doc = r#"
apiVersion: custody.dev/v1
kind: EgressPolicy
metadata: { name: agents }
spec:
  rules:
    - name: agent-from-assistant
      chain:
        initiatorKinds: [agent, system]
        principals: ["agent:assistant"]
        services: ["spiffe://td/ns/ai/sa/assistant"]
      verdict: block
"#;
    let b = bundle(&[doc], Verdict::Allow);
    let all = ChainFacts {
        initiator_kind: Some(InitiatorKind::Agent),
        principal: Some("agent:assistant"),
        service: Some("spiffe://td/ns/ai/sa/assistant"),
        taint: None,
    };
    assert_eq!(
        b.evaluate(&dest("x.example", 1), &all).verdict,
        Verdict::Block
    );
    let human = ChainFacts {
        initiator_kind: Some(InitiatorKind::Human),
        ..all
    };
    assert_eq!(
        b.evaluate(&dest("x.example", 1), &human).verdict,
        Verdict::Allow
    );
    let unknown = ChainFacts::default();
    assert_eq!(
        b.evaluate(&dest("x.example", 1), &unknown).verdict,
        Verdict::Allow
    );
}

#[test]
fn host_patterns() {
    let p = |s: &str| HostPattern::try_from(s.to_owned()).unwrap();
    assert!(p("api.example.com").matches("api.example.com"));
    assert!(!p("api.example.com").matches("xapi.example.com"));
    assert!(p("*.example.com").matches("a.example.com"));
    assert!(p("*.example.com").matches("a.b.example.com"));
    assert!(!p("*.example.com").matches("example.com"));
    assert!(!p("*.example.com").matches("badexample.com"));
    assert!(p("API.Example.COM.").matches("api.example.com"));
    for bad in [
        "",
        "*.",
        "a..b",
        "-a.com",
        "a b.com",
        "*",
        "a.*.com",
        "http://a.com",
    ] {
        assert!(HostPattern::try_from(bad.to_owned()).is_err(), "{bad}");
    }
}

#[test]
fn cidrs() {
    let c = |s: &str| Cidr::try_from(s.to_owned()).unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(c("10.0.0.0/8").contains(ip("10.200.1.1")));
    assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
    assert!(c("0.0.0.0/0").contains(ip("203.0.113.9")));
    assert!(c("192.0.2.7").contains(ip("192.0.2.7")));
    assert!(!c("192.0.2.7").contains(ip("192.0.2.8")));
    assert!(c("2001:db8::/32").contains(ip("2001:db8::1")));
    assert!(c("::/0").contains(ip("::1")));
    assert!(c("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
    assert!(c("::ffff:0:0/96").contains(ip("10.1.2.3")));
    assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
    for bad in [
        "10.0.0.0/33",
        "10.0.0/8",
        "abc",
        "::/129",
        "10.0.0.0/-1",
        "",
    ] {
        assert!(Cidr::try_from(bad.to_owned()).is_err(), "{bad}");
    }
}

fn refused_field(doc: &str) -> String {
    EgressPolicy::parse(doc)
        .expect_err("policy must be refused")
        .field
}

#[test]
fn invalid_policies_are_refused_with_the_field_named() {
    let base = |rules: &str| {
        format!(
            "apiVersion: custody.dev/v1\nkind: EgressPolicy\nmetadata: {{ name: p }}\nspec:\n  rules:\n{rules}"
        )
    };
    let cases = [
        (
            base("    - name: r\n      destination: { hosts: [\"ok.example\", \"bad host\"] }\n      verdict: block\n"),
            "spec.rules[0].destination.hosts[1]",
        ),
        (
            base("    - name: r\n      destination: { cidrs: [\"10.0.0.0/99\"] }\n      verdict: block\n"),
            "spec.rules[0].destination.cidrs[0]",
        ),
        (
            base("    - name: r\n      verdict: deny\n"),
            "spec.rules[0].verdict",
        ),
        (
            base("    - name: r\n      verdict: block\n    - name: r\n      verdict: allow\n"),
            "spec.rules[1].name",
        ),
        (
            base("    - name: r\n      destination: { ports: [0] }\n      verdict: block\n"),
            "spec.rules[0].destination.ports[0]",
        ),
        (
            base("    - name: r\n      destination: { ports: [70000] }\n      verdict: block\n"),
            "spec.rules[0].destination.ports[0]",
        ),
        (
            base("    - name: r\n      chain: { taintAny: [\"PII SSN\"] }\n      verdict: block\n"),
            "spec.rules[0].chain.taintAny[0]",
        ),
        (
            base("    - name: r\n      chain: { services: [\"orders\"] }\n      verdict: block\n"),
            "spec.rules[0].chain.services[0]",
        ),
        (
            base("    - name: r\n      chain: { initiatorKinds: [robot] }\n      verdict: block\n"),
            "spec.rules[0].chain.initiatorKinds[0]",
        ),
        (
            base("    - name: r\n      destinaton: { hosts: [a.example] }\n      verdict: block\n"),
            "spec.rules[0].destinaton",
        ),
        (
            base("    - name: Bad_Name\n      verdict: block\n"),
            "spec.rules[0].name",
        ),
        (
            "apiVersion: custody.dev/v2\nkind: EgressPolicy\nmetadata: { name: p }\nspec: { rules: [ { name: r, verdict: block } ] }".into(),
            "apiVersion",
        ),
        (
            "apiVersion: custody.dev/v1\nkind: Other\nmetadata: { name: p }\nspec: { rules: [ { name: r, verdict: block } ] }".into(),
            "kind",
        ),
        (
            "apiVersion: custody.dev/v1\nkind: EgressPolicy\nmetadata: { name: p }\nspec: { rules: [] }".into(),
            "spec.rules",
        ),
        (
            r#"{"apiVersion":"custody.dev/v1","kind":"EgressPolicy","metadata":{"name":"p"},"spec":{"rules":[{"name":"r","verdict":"block","destination":{"hosts":[7]}}]}}"#.into(),
            "spec.rules[0].destination.hosts[0]",
        ),
    ];
    for (doc, field) in cases {
        assert_eq!(refused_field(&doc), field, "document:\n{doc}");
    }
}

#[test]
fn bundles_refuse_duplicate_policy_names_with_the_index() {
    let b = bundle(&[PARTNER, PARTNER], Verdict::Allow);
    let e = b.validate().unwrap_err();
    assert_eq!(e.field, "policies[1].metadata.name");
}

#[test]
fn cidr_networks_clear_host_bits() {
    let c = |s: &str| Cidr::try_from(s.to_owned()).unwrap();
    assert_eq!(c("192.0.2.77/24").network().to_string(), "192.0.2.0");
    assert_eq!(c("192.0.2.77/24").prefix(), 24);
    assert_eq!(c("2001:db8::1/32").network().to_string(), "2001:db8::");
    assert_eq!(c("0.0.0.0/0").network().to_string(), "0.0.0.0");
    assert!(Cidr::new("10.0.0.1".parse().unwrap(), 33).is_none());
}
