use super::*;
use crate::keys::SigningKey;
use crate::policy::Verdict;

const POLICY: &str = r#"
apiVersion: custody.dev/v1
kind: EgressPolicy
metadata: { name: partner-data }
spec:
  rules:
    - name: no-ssn
      destination: { hosts: ["api.partner.example", "*.risky.example"], cidrs: ["198.51.100.0/24"], ports: [443] }
      chain: { initiatorKinds: [agent, human], principals: [alice], services: ["spiffe://td/ns/shop/sa/orders"], taintAny: [pii.ssn] }
      verdict: block
    - name: rest
      verdict: audit
"#;

#[test]
fn policy_bundles_round_trip_through_the_wire() {
    let mut bundle = PolicyBundle {
        version: 42,
        policies: vec![EgressPolicy::from_yaml(POLICY).unwrap()],
        default_verdict: Verdict::Block,
        revocations: Revocations::default(),
    };
    bundle.revocations.principals.insert("mallory".into());
    bundle.revocations.key_ids.insert("k9".into());
    let wire = v1::PolicyBundle::from(&bundle);
    let encoded = prost::Message::encode_to_vec(&wire);
    let decoded: v1::PolicyBundle = prost::Message::decode(encoded.as_slice()).unwrap();
    assert_eq!(PolicyBundle::try_from(&decoded).unwrap(), bundle);
}

#[test]
fn invalid_wire_policies_name_the_field() {
    let bundle = PolicyBundle {
        version: 1,
        policies: vec![EgressPolicy::from_yaml(POLICY).unwrap()],
        default_verdict: Verdict::Allow,
        revocations: Revocations::default(),
    };
    let mut wire = v1::PolicyBundle::from(&bundle);
    wire.policies[0].rules[0]
        .destination
        .as_mut()
        .unwrap()
        .hosts[1] = "not a host".into();
    let e = PolicyBundle::try_from(&wire).unwrap_err();
    assert_eq!(e.field, "policies[0].spec.rules[0].destination.hosts[1]");

    let mut wire = v1::PolicyBundle::from(&bundle);
    wire.policies[0].rules[1].verdict = 99;
    let e = PolicyBundle::try_from(&wire).unwrap_err();
    assert_eq!(e.field, "policies[0].spec.rules[1].verdict");

    let mut wire = v1::PolicyBundle::from(&bundle);
    wire.default_verdict = 0;
    assert_eq!(
        PolicyBundle::try_from(&wire).unwrap_err().field,
        "defaultVerdict"
    );

    let mut wire = v1::PolicyBundle::from(&bundle);
    wire.policies[0].rules[0]
        .destination
        .as_mut()
        .unwrap()
        .ports[0] = 70_000;
    assert_eq!(
        PolicyBundle::try_from(&wire).unwrap_err().field,
        "policies[0].spec.rules[0].destination.ports[0]"
    );
}

#[test]
fn key_sets_round_trip_with_bindings_and_windows() {
    let mut set = KeySet::new();
    set.set_version(7);
    set.insert(
        SigningKey::from_seed("a", &[1; 32])
            .public_key()
            .bound_to("spiffe://td/ns/shop/sa/web")
            .valid_between(10, 20),
    )
    .unwrap();
    set.insert(SigningKey::from_seed("root", &[2; 32]).public_key())
        .unwrap();
    let wire = v1::KeySet::from(&set);
    assert_eq!(wire.version, 7);
    let back = KeySet::try_from(&wire).unwrap();
    let mut keys: Vec<_> = back.keys().cloned().collect();
    keys.sort_by(|a, b| a.kid().cmp(b.kid()));
    let mut expected: Vec<_> = set.keys().cloned().collect();
    expected.sort_by(|a, b| a.kid().cmp(b.kid()));
    assert_eq!(keys, expected);

    let mut bad = wire.clone();
    bad.keys[0].ed25519.pop();
    assert!(matches!(
        KeySet::try_from(&bad),
        Err(WireKeyError::Length(_))
    ));
}

#[test]
fn enums_map_both_ways() {
    for kind in [
        InitiatorKind::Human,
        InitiatorKind::Service,
        InitiatorKind::Agent,
        InitiatorKind::System,
    ] {
        assert_eq!(v1::InitiatorKind::from(kind).to_domain(), Some(kind));
    }
    for method in [
        AttributionMethod::Propagated,
        AttributionMethod::Minted,
        AttributionMethod::Stitched,
        AttributionMethod::SqlComment,
        AttributionMethod::ConnectionAttribute,
        AttributionMethod::PeerOnly,
    ] {
        assert_eq!(
            v1::AttributionMethod::from(method).to_domain(),
            Some(method)
        );
    }
    assert_eq!(v1::Verdict::Unspecified.to_domain(), None);
}

#[test]
fn workload_ids_convert_and_are_checked() {
    let id = WorkloadId::new("td", "shop", "web")
        .unwrap()
        .with_pod("web-1")
        .unwrap();
    let wire = v1::WorkloadId::from(&id);
    assert_eq!(WorkloadId::try_from(&wire).unwrap(), id);
    let bad = v1::WorkloadId {
        namespace: "Shop".into(),
        ..wire
    };
    assert!(WorkloadId::try_from(&bad).is_err());
}
