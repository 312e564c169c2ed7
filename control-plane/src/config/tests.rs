use super::*;

const GOOD: &str = "
data_dir: /tmp/x
grpc_listen: 127.0.0.1:0
http_listen: 127.0.0.1:0
tokens:
  - { name: oncall, role: admin, secret: 0123456789abcdef }
";

#[test]
fn reads_a_minimal_config_with_defaults() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.sync, SyncMode::Full);
    assert_eq!(c.retention.max_age_secs, 7 * 24 * 3600);
    assert_eq!(c.trust.signing_key_ttl_secs, 3600);
    assert_eq!(c.tokens().unwrap()[0].role, Role::Admin);
}

#[test]
fn errors_name_the_field() {
    let check = |text: &str, want: &str| match Config::parse(text) {
        Err(ConfigError::Field { field, .. }) => assert_eq!(field, want),
        other => panic!("{other:?}"),
    };
    check(
        &GOOD.replace("127.0.0.1:0\nhttp", "nope\nhttp"),
        "grpc_listen",
    );
    check(&GOOD.replace("role: admin", "role: root"), "tokens[0].role");
    check(
        &GOOD.replace("0123456789abcdef", "short"),
        "tokens[0].secret",
    );
    check(
        &format!("{GOOD}retention: {{ interval_secs: 0 }}\n"),
        "retention.interval_secs",
    );
    check(&format!("{GOOD}colour: blue\n"), "colour");
    // The workload role is proven by a service-account token, never given
    // to a static one.
    check(
        &GOOD.replace("role: admin", "role: workload"),
        "tokens[0].role",
    );
    check(
        &format!("{GOOD}workload_auth: {{ issuer: \"\", jwks_file: /j }}\n"),
        "workload_auth.issuer",
    );
    check(
        &format!("{GOOD}workload_auth: {{ issuer: https://k, jwks_file: /j, audiences: [a] }}\n"),
        "workload_auth.audiences",
    );
}

#[test]
fn workload_auth_defaults_to_the_custody_audience() {
    let c = Config::parse(&format!(
        "{GOOD}workload_auth: {{ issuer: \"https://kubernetes.default.svc.cluster.local\", jwks_file: /etc/custody/jwks/jwks.json }}\n"
    ))
    .unwrap();
    let w = c.workload_auth.unwrap();
    assert_eq!((w.audience.as_str(), w.leeway_secs), ("custody", 60));
    assert_eq!(w.trust_domain, None);
}
