//! The inbound TLS listener: TLS ended with the sidecar's certificate,
//! HTTP/1.1 or HTTP/2 chosen by ALPN, then served like plaintext inbound.

use std::sync::Arc;

use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::support::*;

fn connector(dir: &std::path::Path, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    let pem = std::fs::read(dir.join("ca.crt")).unwrap();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_tls_is_ended_and_alpn_chooses_http1_or_h2() {
    let certs = tempfile::tempdir().unwrap();
    tls_certificates(certs.path(), "orders.test");
    let trust = Trust::new(&["orders"]);
    let app = App::ok().await;
    let tls_addr = free_port();
    let listeners = format!(
        "inbound_tls: {{ address: \"{tls_addr}\", cert_file: \"{}\", key_file: \"{}\" }}",
        certs.path().join("tls.crt").display(),
        certs.path().join("tls.key").display()
    );
    let mut spec = Spec::new("orders", app.addr);
    spec.listeners = &listeners;
    let sc = start(spec, &trust).await;
    let mut ready = false;
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(tls_addr).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ready, "the TLS listener never opened");
    let name = ServerName::try_from("orders.test").unwrap();

    // HTTP/1.1.
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let tls = connector(certs.path(), &[b"http/1.1"])
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("/one")
                .header("host", "orders.test")
                .header("x-custody-user", "alice@example.com")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(app.seen()[0].token().unwrap()["sub"], "alice@example.com");

    // HTTP/2, chosen by ALPN.
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let tls = connector(certs.path(), &[b"h2"])
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("https://orders.test/two")
                .header("x-custody-user", "bob@example.com")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(app.seen()[1].token().unwrap()["sub"], "bob@example.com");
    let hop = sc
        .wait_hop(|h| h["initiator"]["subject"] == "bob@example.com")
        .await;
    assert_eq!(hop["protocol"], "PROTOCOL_HTTP2");
    assert_eq!(hop["direction"], "DIRECTION_INBOUND");

    // Plaintext on the TLS port is not served.
    let plain = client()
        .request(
            Request::get(format!("http://{tls_addr}/three"))
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    assert_eq!(app.seen().len(), 2);
}
