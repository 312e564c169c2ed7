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

#[test]
fn the_store_defaults_to_sqlite_and_postgres_is_checked() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.store.backend, Backend::Sqlite);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret-value\n").unwrap();
    let c = Config::parse(&format!(
        "{GOOD}store: {{ backend: postgres, postgres: {{ host: db, user: custody, dbname: custody, password_file: {} }} }}\n",
        pw.display()
    ))
    .unwrap();
    assert_eq!(c.store.backend, Backend::Postgres);
    let options = c.store.postgres.as_ref().unwrap().options().unwrap();
    assert_eq!(options.password.as_deref(), Some("s3cret-value"));
    assert_eq!((options.port, options.pool_size), (5432, 4));
    assert!(
        !format!("{options:?}").contains("s3cret"),
        "no password in Debug"
    );
    let check = |text: &str, want: &str| match Config::parse(&format!("{GOOD}{text}\n")) {
        Err(ConfigError::Field { field, .. }) => assert_eq!(field, want),
        other => panic!("{other:?}"),
    };
    check("store: { backend: postgres }", "store.postgres");
    check("store: { backend: mysql }", "store.backend");
    check(
        "store: { backend: postgres, postgres: { host: db, user: u, dbname: d, password: x } }",
        "store.postgres.password",
    );
    check(
        "store: { backend: postgres, postgres: { host: db, user: u, dbname: d, pool_size: 0 } }",
        "store.postgres.pool_size",
    );
    check(
        "store: { backend: postgres, postgres: { host: \"\", user: u, dbname: d } }",
        "store.postgres.host",
    );
    check(
        "store: { backend: postgres, postgres: { host: db, user: u, dbname: d, sslmode: verify-full } }",
        "store.postgres.ca_file",
    );
    check(
        "store: { backend: postgres, postgres: { host: db, user: u, dbname: d, sslmode: require } }",
        "store.postgres.sslmode",
    );
    let missing = Config::parse(&format!(
        "{GOOD}store: {{ backend: postgres, postgres: {{ host: db, user: u, dbname: d, password_file: /nonexistent/pw }} }}\n"
    ))
    .unwrap();
    match missing.store.postgres.unwrap().options() {
        Err(ConfigError::Field { field, .. }) => assert_eq!(field, "store.postgres.password_file"),
        other => panic!("{other:?}"),
    }
}
