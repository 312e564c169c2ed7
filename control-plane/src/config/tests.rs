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
}
