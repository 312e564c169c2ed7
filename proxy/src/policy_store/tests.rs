use custody_context::policy::{ChainFacts, DestinationFacts, Verdict};

use super::*;

const BUNDLE: &str = r#"
version: 3
defaultVerdict: allow
policies:
  - apiVersion: custody.dev/v1
    kind: EgressPolicy
    metadata: { name: no-partner }
    spec:
      rules:
        - name: block-partner
          destination: { hosts: ["api.partner.example"] }
          verdict: block
"#;

#[test]
fn applied_bundle_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let store = PolicyStore::open(Some(dir.path().to_owned()), Arc::clone(&metrics));
    assert_eq!(store.current().version, 0);
    let bundle = parse_bundle(BUNDLE, Path::new("p.yaml")).unwrap();
    assert!(store.apply(bundle.clone()));
    assert!(!store.apply(bundle));
    assert_eq!(metrics.policy_version.get(), 3);

    let reopened = PolicyStore::open(Some(dir.path().to_owned()), Arc::new(Metrics::default()));
    let current = reopened.current();
    assert_eq!(current.version, 3);
    let dest = DestinationFacts {
        host: Some("api.partner.example"),
        ip: None,
        port: 443,
    };
    assert_eq!(
        current.evaluate(&dest, &ChainFacts::default()).verdict,
        Verdict::Block
    );
}

#[test]
fn invalid_bundle_names_the_field() {
    let bad = BUNDLE.replace("verdict: block", "verdict: maybe");
    let err = parse_bundle(&bad, Path::new("p.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("policies[0].spec.rules[0].verdict"), "{err}");
}
