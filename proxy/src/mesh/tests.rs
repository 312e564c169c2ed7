use super::*;

/// A self-signed certificate made by openssl with the given extension.
fn certificate(ext: Option<&str>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=t",
        "-keyout",
        "k.pem",
        "-outform",
        "DER",
        "-out",
        "c.der",
    ];
    if let Some(ext) = ext {
        args.extend(["-addext", ext]);
    }
    let out = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(dir.path().join("c.der")).unwrap()
}

#[test]
fn the_spiffe_id_is_the_first_spiffe_uri_san() {
    let check = |ext: Option<&str>, expected: Option<&str>| {
        assert_eq!(spiffe_id(&certificate(ext)).as_deref(), expected, "{ext:?}");
    };
    check(
        Some("subjectAltName=URI:spiffe://td/ns/a/sa/b"),
        Some("spiffe://td/ns/a/sa/b"),
    );
    check(
        Some("subjectAltName=DNS:a.example,URI:https://x.example,URI:spiffe://td/ns/a/sa/c"),
        Some("spiffe://td/ns/a/sa/c"),
    );
    check(Some("subjectAltName=DNS:a.example"), None);
    check(None, None);
    assert_eq!(spiffe_id(b"not a certificate"), None);
}

#[test]
fn tls_settings_ask_the_tunnel_with_headers_of_their_own() {
    let mesh = |expected: Option<&str>| UpstreamTls::Mesh {
        expected: expected.map(str::to_owned),
    };
    let a = mesh(None).connect_headers(false);
    assert_eq!(a[TLS_HEADER], b"mesh");
    assert_eq!(a[ALPN_HEADER], b"http/1.1");
    assert!(!a.contains_key(EXPECT_HEADER));
    assert_ne!(a, mesh(None).connect_headers(true));
    let b = mesh(Some("spiffe://td/ns/a/sa/b")).connect_headers(false);
    assert_eq!(b[EXPECT_HEADER], b"spiffe://td/ns/a/sa/b");
    let originate = UpstreamTls::originate(
        &crate::config::OriginateTls {
            server_name: None,
            ca_file: "/ca".into(),
            reload_interval_ms: 5000,
        },
        "tls_origination:0".into(),
        "api.example",
    )
    .unwrap()
    .connect_headers(false);
    assert_eq!(originate[TLS_HEADER], b"originate");
    assert_eq!(originate[SERVER_NAME_HEADER], b"api.example");
    assert_eq!(originate[ROUTE_HEADER], b"tls_origination:0");
}

#[test]
fn connect_requests_are_parsed_and_errors_are_bounded() {
    let (target, headers) = parse_connect(
        b"CONNECT 10.0.0.5:8080 HTTP/1.1\r\nHost: 10.0.0.5:8080\r\nX-Custody-TLS: mesh\r\n\r\n",
    )
    .unwrap();
    assert_eq!(target, "10.0.0.5:8080".parse().unwrap());
    assert_eq!(headers[TLS_HEADER], "mesh");
    assert!(parse_connect(b"GET / HTTP/1.1\r\n\r\n").is_none());
    assert!(parse_connect(b"CONNECT nowhere HTTP/1.1\r\n\r\n").is_none());
    assert_eq!(
        transport_error("peer_identity_mismatch"),
        Some("peer_identity_mismatch")
    );
    assert_eq!(transport_error("anything else"), None);
}

#[test]
fn a_raw_tcp_stream_is_marked_by_both_mesh_protocols() {
    let alpn =
        |protocols: &[&[u8]]| -> Vec<Vec<u8>> { protocols.iter().map(|p| p.to_vec()).collect() };
    let tcp = alpn(&[MESH_TCP_ALPN, MESH_ALPN]);
    assert!(offers_mesh(&tcp));
    assert!(offers_mesh_tcp(&tcp));
    let http = alpn(&[b"h2", MESH_ALPN]);
    assert!(offers_mesh(&http));
    assert!(!offers_mesh_tcp(&http));
    // The TCP marker alone is not mesh mTLS.
    assert!(!offers_mesh_tcp(&alpn(&[MESH_TCP_ALPN])));
    assert!(!offers_mesh_tcp(&alpn(&[b"http/1.1"])));
}
