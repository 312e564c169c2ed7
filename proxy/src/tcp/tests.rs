use super::*;

/// A ClientHello as `openssl s_client -servername api.partner.example`
/// would start it: record header, handshake header, version, random,
/// session id, cipher suites, compression, extensions (SNI and another).
fn hello(sni: Option<&str>) -> Vec<u8> {
    let mut exts = Vec::new();
    exts.extend_from_slice(&[0x00, 0x17, 0x00, 0x00]); // extended master secret, empty
    if let Some(name) = sni {
        let n = name.len() as u16;
        exts.extend_from_slice(&[0x00, 0x00]);
        exts.extend_from_slice(&(n + 5).to_be_bytes());
        exts.extend_from_slice(&(n + 3).to_be_bytes());
        exts.push(0);
        exts.extend_from_slice(&n.to_be_bytes());
        exts.extend_from_slice(name.as_bytes());
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x42; 32]);
    body.push(32);
    body.extend_from_slice(&[0x07; 32]);
    body.extend_from_slice(&[0x00, 0x04, 0x13, 0x01, 0x13, 0x02]);
    body.extend_from_slice(&[0x01, 0x00]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01, 0x00];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

#[test]
fn sni_is_read_from_a_client_hello() {
    assert_eq!(
        client_hello_sni(&hello(Some("API.Partner.example"))).as_deref(),
        Some("api.partner.example")
    );
    assert_eq!(client_hello_sni(&hello(None)), None);
}

#[test]
fn truncated_or_foreign_records_give_no_name() {
    let full = hello(Some("api.partner.example"));
    for cut in 0..full.len() {
        assert_eq!(
            client_hello_sni(&full[..cut]),
            None,
            "prefix of {cut} bytes"
        );
    }
    let mut not_handshake = full.clone();
    not_handshake[0] = 0x17;
    assert_eq!(client_hello_sni(&not_handshake), None);
    let mut not_hello = full;
    not_hello[5] = 0x02;
    assert_eq!(client_hello_sni(&not_hello), None);
}

#[test]
fn http_starts_are_recognised() {
    for start in [b"GET ", b"POST", b"PRI ", b"HEAD"] {
        assert!(looks_like_http(start));
    }
    for other in [b"\x16\x03\x01\x02", b"SSH-", b"\0\0\0\x08"] {
        assert!(!looks_like_http(other));
    }
}

/// The first record a rustls client sends, offering `alpn`.
fn rustls_hello(alpn: &[&[u8]]) -> Vec<u8> {
    use tokio_rustls::rustls;
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("orders.shop").unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[test]
fn alpn_is_read_from_a_client_hello_and_marks_mesh_mtls() {
    let marked = rustls_hello(&[b"h2", b"custody-mesh"]);
    assert_eq!(
        client_hello_alpn(&marked),
        vec![b"h2".to_vec(), b"custody-mesh".to_vec()]
    );
    assert!(crate::mesh::offers_mesh(&client_hello_alpn(&marked)));
    assert_eq!(client_hello_sni(&marked).as_deref(), Some("orders.shop"));
    let plain = rustls_hello(&[b"http/1.1"]);
    assert!(!crate::mesh::offers_mesh(&client_hello_alpn(&plain)));
    assert!(client_hello_alpn(&rustls_hello(&[])).is_empty());
    assert!(client_hello_alpn(&hello(Some("a.example"))).is_empty());
    // A record cut short offers nothing (the whole record is peeked first).
    for cut in 0..marked.len() {
        assert!(
            client_hello_alpn(&marked[..cut]).is_empty(),
            "prefix of {cut} bytes"
        );
    }
}
