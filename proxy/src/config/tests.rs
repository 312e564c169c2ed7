use super::*;

const MINIMAL: &str = r#"
workload: { trust_domain: td, namespace: shop, service_account: web, pod: web-0 }
listeners: { inbound: "127.0.0.1:1", outbound: "127.0.0.1:2", admin: "127.0.0.1:3" }
inbound: { upstream: "127.0.0.1:4" }
outbound: { mode: transparent }
"#;

fn err(text: &str) -> String {
    Config::from_yaml(text).unwrap_err().to_string()
}

#[test]
fn minimal_config_takes_defaults() {
    let config = Config::from_yaml(MINIMAL).unwrap();
    assert_eq!(
        config.workload_id().unwrap().uri(),
        "spiffe://td/ns/shop/sa/web"
    );
    assert!(matches!(config.outbound, OutboundMode::Transparent));
    assert_eq!(config.exporter.queue_size, 4096);
    assert_eq!(config.shutdown.grace_period_secs, 5);
    assert!(!config.inbound.refuse_invalid_tokens);
}

#[test]
fn explicit_mode_with_sources() {
    let text = MINIMAL.replace(
        "outbound: { mode: transparent }",
        r#"outbound: { mode: explicit, upstreams: { orders: "127.0.0.1:9" } }"#,
    ) + "\n"
        + r#"
"#;
    let text = text.replace(
        r#"inbound: { upstream: "127.0.0.1:4" }"#,
        r#"inbound:
  upstream: "127.0.0.1:4"
  identity_sources:
    - { type: edge_header, header: x-custody-user, kind: human }
    - { type: agent_header, header: x-custody-agent }
    - { type: mcp }"#,
    );
    let config = Config::from_yaml(&text).unwrap();
    match &config.outbound {
        OutboundMode::Explicit { upstreams, default } => {
            assert_eq!(upstreams["orders"].address.port(), 9);
            assert!(default.is_none());
        }
        OutboundMode::Transparent => panic!("expected explicit"),
    }
    assert_eq!(config.inbound.identity_sources.len(), 3);
    assert!(matches!(
        &config.inbound.identity_sources[2],
        IdentitySource::Mcp { agent_key } if agent_key == "agent"
    ));
}

#[test]
fn errors_name_the_field() {
    let bad_addr = MINIMAL.replace("127.0.0.1:4", "nowhere");
    assert!(
        err(&bad_addr).starts_with("inbound.upstream"),
        "{}",
        err(&bad_addr)
    );

    let unknown = MINIMAL.to_string() + "bogus: 1\n";
    assert!(err(&unknown).contains("bogus"), "{}", err(&unknown));

    let bad_kind = MINIMAL.replace(
        r#"inbound: { upstream: "127.0.0.1:4" }"#,
        r#"inbound: { upstream: "127.0.0.1:4", identity_sources: [{ type: edge_header, header: x-u, kind: robot }] }"#,
    );
    assert!(
        err(&bad_kind).starts_with("inbound.identity_sources[0]"),
        "{}",
        err(&bad_kind)
    );

    let bad_header = MINIMAL.replace(
        r#"inbound: { upstream: "127.0.0.1:4" }"#,
        r#"inbound: { upstream: "127.0.0.1:4", strip_headers: ["bad header"] }"#,
    );
    assert_eq!(
        err(&bad_header),
        r#"inbound.strip_headers[0]: "bad header" is not a header name"#
    );

    let zero = MINIMAL.to_string() + "exporter: { queue_size: 0 }\n";
    assert_eq!(err(&zero), "exporter.queue_size: must be at least 1");

    let bad_ns = MINIMAL.replace("namespace: shop", "namespace: \"Shop/x\"");
    assert!(err(&bad_ns).starts_with("workload"), "{}", err(&bad_ns));
}

#[test]
fn the_workload_comes_from_the_environment_when_set() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let config = Config::from_yaml_with_env(
        MINIMAL,
        env(&[
            ("CUSTODY_WORKLOAD_NAMESPACE", "billing"),
            ("CUSTODY_WORKLOAD_SERVICE_ACCOUNT", "ledger"),
            ("CUSTODY_WORKLOAD_POD", "ledger-7c9d8b6f5-x2x9q"),
        ]),
    )
    .unwrap();
    let id = config.workload_id().unwrap();
    assert_eq!(id.uri(), "spiffe://td/ns/billing/sa/ledger");
    assert_eq!(
        config.workload.pod.as_deref(),
        Some("ledger-7c9d8b6f5-x2x9q")
    );
    // Empty variables are ignored; the file's values stay.
    let config =
        Config::from_yaml_with_env(MINIMAL, env(&[("CUSTODY_WORKLOAD_NAMESPACE", "")])).unwrap();
    assert_eq!(config.workload.namespace, "shop");
    // Overridden values are checked like the file's.
    let error = Config::from_yaml_with_env(
        MINIMAL,
        env(&[("CUSTODY_WORKLOAD_SERVICE_ACCOUNT", "no/slashes")]),
    )
    .unwrap_err()
    .to_string();
    assert!(error.starts_with("workload"), "{error}");
}

#[test]
fn databases_default_to_the_standard_ports_and_are_checked() {
    let config = Config::from_yaml(MINIMAL).unwrap();
    assert_eq!(
        config.database_on_port(5432).map(|d| d.protocol),
        Some(DatabaseProtocol::Postgres)
    );
    assert_eq!(
        config.database_on_port(3306).map(|d| d.protocol),
        Some(DatabaseProtocol::Mysql)
    );
    assert!(config.database_on_port(80).is_none());

    let listen_only =
        MINIMAL.to_string() + "databases: [{ protocol: postgres, listen: \"127.0.0.1:9\" }]\n";
    assert_eq!(
        err(&listen_only),
        "databases[0].upstream: is required with listen"
    );
    let twice = MINIMAL.to_string()
        + "databases: [{ protocol: postgres, ports: [5432] }, { protocol: mysql, ports: [5432] }]\n";
    assert_eq!(
        err(&twice),
        "databases[1].ports[0]: port 5432 is listed twice"
    );
    let clash = MINIMAL.to_string()
        + "databases: [{ protocol: mysql, listen: \"127.0.0.1:3\", upstream: \"127.0.0.1:3306\" }]\n";
    assert!(
        err(&clash).starts_with("databases[0].listen"),
        "{}",
        err(&clash)
    );
    let unknown = MINIMAL.to_string() + "databases: [{ protocol: oracle }]\n";
    assert!(
        err(&unknown).starts_with("databases[0].protocol"),
        "{}",
        err(&unknown)
    );
    let terminate = |extra: &str| {
        MINIMAL.to_string()
            + "databases: [{ protocol: postgres, ports: [5433], tls: { mode: terminate, \
               cert_file: c, key_file: k, upstream_ca_file: a"
            + extra
            + " } }]\n"
    };
    let config = Config::from_yaml(&terminate("")).unwrap();
    assert_eq!(
        config.databases[0].tls.handshake_timeout(),
        std::time::Duration::from_secs(10)
    );
    let config = Config::from_yaml(&terminate(", handshake_timeout_ms: 250")).unwrap();
    assert_eq!(
        config.databases[0].tls.handshake_timeout(),
        std::time::Duration::from_millis(250)
    );
    assert_eq!(
        err(&terminate(", handshake_timeout_ms: 0")),
        "databases[0].tls.handshake_timeout_ms: must be between 1 and 600000"
    );
    let confidence = MINIMAL.to_string() + "classification: { taint_min_confidence: 2 }\n";
    assert_eq!(
        err(&confidence),
        "classification.taint_min_confidence: must be between 0 and 1"
    );
}

#[test]
fn key_registration_needs_a_control_plane() {
    let text = MINIMAL.to_string() + "signing: { register: true }\n";
    assert!(err(&text).starts_with("signing.register"), "{}", err(&text));
    let text = MINIMAL.to_string()
        + "signing: { register: true }\npolicy: { control_plane: \"http://127.0.0.1:7070\" }\n";
    let config = Config::from_yaml(&text).unwrap();
    assert!(config.signing.register);
    assert_eq!(config.signing.register_timeout_secs, 30);
}

#[test]
fn mesh_peers_match_hosts_suffixes_addresses_and_cidrs() {
    let check = |pattern: &str, host: Option<&str>, ip: &str, expected: bool| {
        let peer = MeshPeer {
            destination: pattern.into(),
            identity: None,
        };
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(
            peer.matches(host, Some(ip)),
            expected,
            "{pattern} vs {host:?} {ip}"
        );
    };
    check("orders", Some("orders"), "10.0.0.1", true);
    check("orders", Some("orders.shop"), "10.0.0.1", false);
    check(
        "*.svc.cluster.local",
        Some("a.shop.svc.cluster.local"),
        "10.0.0.1",
        true,
    );
    check(
        ".svc.cluster.local",
        Some("a.svc.cluster.local"),
        "10.0.0.1",
        true,
    );
    check(
        "*.svc.cluster.local",
        Some("svc.cluster.local"),
        "10.0.0.1",
        false,
    );
    check(
        "*.svc.cluster.local",
        Some("evilsvc.cluster.local"),
        "10.0.0.1",
        false,
    );
    check("*.svc.cluster.local", None, "10.0.0.1", false);
    check("10.0.0.0/8", None, "10.200.3.4", true);
    check("10.0.0.0/8", Some("orders"), "11.0.0.1", false);
    check("0.0.0.0/0", None, "192.0.2.1", true);
    check("10.1.2.3", None, "10.1.2.3", true);
    check("10.1.2.3/32", None, "10.1.2.4", false);
    check("fd00::/8", None, "fd12::1", true);
    check("fd00::/8", None, "10.0.0.1", false);
}

#[test]
fn mesh_tls_and_tls_origination_are_checked_with_the_field_named() {
    let mesh = r#"
mesh_tls:
  cert_file: /c
  key_file: /k
  ca_file: /ca
  mode: strict
  peers: [orders, "10.0.0.0/8", { destination: "*.shop.svc", identity: "spiffe://td/ns/shop/sa/orders" }]
"#;
    let config = Config::from_yaml(&(MINIMAL.to_string() + mesh)).unwrap();
    let m = config.mesh_tls.unwrap();
    assert_eq!(m.mode, MeshTlsMode::Strict);
    assert_eq!(m.peers.len(), 3);
    assert_eq!(
        m.peers[2].identity.as_deref(),
        Some("spiffe://td/ns/shop/sa/orders")
    );

    let foreign = MINIMAL.to_string()
        + &mesh.replace(
            "spiffe://td/ns/shop/sa/orders",
            "spiffe://other/ns/shop/sa/orders",
        );
    assert!(
        err(&foreign).starts_with("mesh_tls.peers[2].identity"),
        "{}",
        err(&foreign)
    );
    let bad_cidr = MINIMAL.to_string() + &mesh.replace("10.0.0.0/8", "10.0.0.0/99");
    assert!(
        err(&bad_cidr).starts_with("mesh_tls.peers[1].destination"),
        "{}",
        err(&bad_cidr)
    );
    let bad_mode = MINIMAL.to_string() + &mesh.replace("strict", "sometimes");
    assert!(
        err(&bad_mode).starts_with("mesh_tls.mode"),
        "{}",
        err(&bad_mode)
    );

    let explicit = |upstream: &str| {
        MINIMAL.replace(
            "outbound: { mode: transparent }",
            &format!("outbound: {{ mode: explicit, upstreams: {{ orders: {upstream} }} }}"),
        )
    };
    let no_mesh = explicit(r#"{ address: "127.0.0.1:9", mesh: true }"#);
    assert!(
        err(&no_mesh).starts_with("outbound.upstreams.orders.mesh"),
        "{}",
        err(&no_mesh)
    );
    let identity_without_mesh =
        explicit(r#"{ address: "127.0.0.1:9", identity: "spiffe://td/ns/a/sa/b" }"#);
    assert!(
        err(&identity_without_mesh).starts_with("outbound.upstreams.orders.identity"),
        "{}",
        err(&identity_without_mesh)
    );
    let tls = explicit(
        r#"{ address: "127.0.0.1:9", tls: { server_name: "api.example", ca_file: /ca } }"#,
    );
    let config = Config::from_yaml(&tls).unwrap();
    let OutboundMode::Explicit { upstreams, .. } = &config.outbound else {
        panic!("explicit");
    };
    assert_eq!(
        upstreams["orders"]
            .tls
            .as_ref()
            .unwrap()
            .server_name
            .as_deref(),
        Some("api.example")
    );
    let origination =
        MINIMAL.to_string() + "tls_origination: [{ host: api.example, port: 0, ca_file: /ca }]\n";
    assert_eq!(err(&origination), "tls_origination[0].port: must not be 0");
    let unknown =
        MINIMAL.to_string() + "tls_origination: [{ host: api.example, ca_file: /ca, bogus: 1 }]\n";
    assert!(
        err(&unknown).starts_with("tls_origination[0]"),
        "{}",
        err(&unknown)
    );
    assert!(err(&unknown).contains("bogus"), "{}", err(&unknown));
    // (Inside the tagged `outbound`, the path stops at `outbound`.)
    let unknown = explicit(r#"{ address: "127.0.0.1:9", bogus: true }"#);
    assert!(err(&unknown).starts_with("outbound"), "{}", err(&unknown));
    assert!(err(&unknown).contains("an address"), "{}", err(&unknown));
    let bad_address = explicit(r#""nowhere""#);
    assert!(
        err(&bad_address).contains("an address"),
        "{}",
        err(&bad_address)
    );
    let bad_peer = MINIMAL.to_string() + &mesh.replace("orders,", "{ dest: orders },");
    assert!(
        err(&bad_peer).starts_with("mesh_tls.peers[0]"),
        "{}",
        err(&bad_peer)
    );
}

#[test]
fn every_listener_has_an_address_of_its_own() {
    let same = MINIMAL.replace(r#"admin: "127.0.0.1:3""#, r#"admin: "127.0.0.1:1""#);
    assert_eq!(
        err(&same),
        "listeners.admin: 127.0.0.1:1 is already the address of listeners.inbound"
    );
    let tls = MINIMAL.replace(
        r#"admin: "127.0.0.1:3" }"#,
        r#"admin: "127.0.0.1:3", inbound_tls: { address: "127.0.0.1:2", cert_file: c, key_file: k } }"#,
    );
    assert_eq!(
        err(&tls),
        "listeners.inbound_tls.address: 127.0.0.1:2 is already the address of listeners.outbound"
    );
    let db = MINIMAL.to_string()
        + "databases: [{ protocol: mysql, listen: \"127.0.0.1:7\", upstream: \"127.0.0.1:3306\" }, { protocol: postgres, listen: \"127.0.0.1:7\", upstream: \"127.0.0.1:5432\" }]\n";
    assert_eq!(
        err(&db),
        "databases[1].listen: 127.0.0.1:7 is already the address of databases[0].listen"
    );
    // The same port on another address is another listener.
    let other_ip = MINIMAL.replace(r#"admin: "127.0.0.1:3""#, r#"admin: "127.0.0.2:1""#);
    assert!(Config::from_yaml(&other_ip).is_ok());
}

#[test]
fn every_reload_interval_defaults_to_5000_and_is_checked_with_the_field_named() {
    let blocks = r#"
mesh_tls: { cert_file: /c, key_file: /k, ca_file: /ca }
databases:
  - protocol: postgres
    ports: [5432]
    tls: { mode: terminate, cert_file: /c, key_file: /k, upstream_ca_file: /ca }
tls_origination:
  - { host: api.partner.example, ca_file: /ca }
"#;
    let text = MINIMAL.replace(
        r#"admin: "127.0.0.1:3" }"#,
        r#"admin: "127.0.0.1:3", inbound_tls: { address: "127.0.0.1:5", cert_file: /c, key_file: /k } }"#,
    ) + blocks;
    let config = Config::from_yaml(&text).unwrap();
    assert_eq!(config.mesh_tls.unwrap().reload_interval_ms, 5000);
    assert_eq!(
        config.listeners.inbound_tls.unwrap().reload_interval_ms,
        5000
    );
    assert!(matches!(
        config.databases[0].tls,
        DatabaseTls::Terminate {
            reload_interval_ms: 5000,
            ..
        }
    ));
    assert_eq!(config.tls_origination[0].reload_interval_ms, 5000);

    for (from, to, field) in [
        (
            "ca_file: /ca }\ndatabases",
            "ca_file: /ca, reload_interval_ms: 0 }\ndatabases",
            "mesh_tls.reload_interval_ms",
        ),
        (
            "key_file: /k } }",
            "key_file: /k, reload_interval_ms: 5 } }",
            "listeners.inbound_tls.reload_interval_ms",
        ),
        (
            "upstream_ca_file: /ca }",
            "upstream_ca_file: /ca, reload_interval_ms: 86400001 }",
            "databases[0].tls.reload_interval_ms",
        ),
        (
            "example, ca_file: /ca }",
            "example, ca_file: /ca, reload_interval_ms: 9 }",
            "tls_origination[0].reload_interval_ms",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let error = err(&text.replace(from, to));
        assert_eq!(
            error,
            format!("{field}: must be between 10 and 86400000"),
            "{to}"
        );
    }
    let upstream = MINIMAL.replace(
        "outbound: { mode: transparent }",
        r#"outbound: { mode: explicit, upstreams: { partner: { address: "127.0.0.1:9", tls: { ca_file: /ca, reload_interval_ms: 0 } } } }"#,
    );
    assert_eq!(
        err(&upstream),
        "outbound.upstreams.partner.tls.reload_interval_ms: must be between 10 and 86400000"
    );
}
