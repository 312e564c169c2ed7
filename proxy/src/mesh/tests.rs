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
fn tls_settings_have_pool_keys_of_their_own() {
    let mesh = |expected: Option<&str>| UpstreamTls::Mesh {
        expected: expected.map(str::to_owned),
    };
    let a = mesh(None).group_key(false);
    assert_ne!(a, 0, "0 is the plaintext pool");
    assert_eq!(a, mesh(None).group_key(false));
    assert_ne!(a, mesh(None).group_key(true));
    assert_ne!(a, mesh(Some("spiffe://td/ns/a/sa/b")).group_key(false));
    let originate = UpstreamTls::Originate {
        roots: Arc::new(RootCertStore::empty()),
        server_name: ServerName::try_from("api.example").unwrap(),
    };
    assert_ne!(originate.group_key(false), a);
}
