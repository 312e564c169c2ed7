//! The injection webhook as the Kubernetes API server reaches it: an
//! `AdmissionReview` posted over HTTPS to the real server, with a certificate
//! made by `openssl`; and the certificate re-read after a rotation.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

#[path = "support/server.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine as _;
use custody_control::tls::ReloadingCert;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

const REVIEW: &str = include_str!("../src/inject/testdata/deployment-pod.json");
const HOST: &str = "custody-control.custody.svc";

fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (scripts/install-deps installs it)");
    assert!(status.success(), "openssl {args:?}");
}

/// A P-256 CA and a serving certificate it signed for `HOST` and
/// 127.0.0.1, as cert-manager or the chart would make them. Returns the
/// CA, the certificate and the key.
fn make_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let file = |ext: &str| dir.join(format!("{name}.{ext}"));
    let (ca, ca_key, cert, key) = (file("ca"), file("ca-key"), file("crt"), file("key"));
    let text = |p: &Path| p.to_str().unwrap().to_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    let (ca_t, ca_key_t, cert_t, key_t) = (text(&ca), text(&ca_key), text(&cert), text(&key));
    args.extend([
        "-subj",
        "/CN=custody-test-ca",
        "-keyout",
        &ca_key_t,
        "-out",
        &ca_t,
    ]);
    openssl(&args);
    let san = format!("subjectAltName=DNS:{HOST},IP:127.0.0.1");
    let subj = format!("/CN={HOST}");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend(["-CA", &ca_t, "-CAkey", &ca_key_t, "-subj", &subj]);
    args.extend([
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-addext",
        &san,
    ]);
    args.extend(["-keyout", &key_t, "-out", &cert_t]);
    openssl(&args);
    (ca, cert, key)
}

fn config_with_webhook(dir: &Path, cert: &Path, key: &Path) -> custody_control::config::Config {
    let text = format!(
        "{}https: {{ listen: 127.0.0.1:0, cert_file: {}, key_file: {} }}\n\
         inject:\n  proxy_image: registry.example/custody-proxy:0.1.0\n  init_image: registry.example/custody-init:0.1.0\n  \
         trust_domain: cluster.local\n  control_plane_url: http://{HOST}:7070\n",
        config_text(dir),
        cert.display(),
        key.display()
    );
    custody_control::config::Config::parse(&text).unwrap()
}

/// One HTTP/1.1 request; returns the status and the body.
async fn exchange(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    path: &str,
    body: &str,
) -> (u16, String) {
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    io.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    // A TLS peer may close without close_notify after `connection: close`.
    let _ = io.read_to_end(&mut response).await;
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

fn client_config(cert: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(der.unwrap()).unwrap();
    }
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn patched_container_names(body: &str) -> Vec<String> {
    let review: Value = serde_json::from_str(body).unwrap();
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(
        review["response"]["uid"],
        "0df28fbd-5f5f-11e8-b7d5-0a1c2c1b3f4e"
    );
    let patch = base64::engine::general_purpose::STANDARD
        .decode(review["response"]["patch"].as_str().unwrap())
        .unwrap();
    let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
    ops.iter()
        .filter(|op| op["path"] == "/spec/initContainers")
        .flat_map(|op| op["value"].as_array().unwrap().iter())
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_answers_an_admission_review_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_cert(dir.path(), "webhook");
    let server = custody_control::server::start(&config_with_webhook(dir.path(), &cert, &key))
        .await
        .unwrap();
    let https = server.https_addr.unwrap();

    let connector = tokio_rustls::TlsConnector::from(client_config(&ca));
    let tcp = TcpStream::connect(https).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await
        .unwrap();
    let (status, body) = exchange(tls, "/inject", REVIEW).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        patched_container_names(&body),
        ["custody-init", "custody-proxy"]
    );

    // The same route on the plain listener; a malformed review is a 400.
    let tcp = TcpStream::connect(server.http_addr).await.unwrap();
    let (status, body) = exchange(tcp, "/inject", REVIEW).await;
    assert_eq!(status, 200, "{body}");
    let tcp = TcpStream::connect(server.http_addr).await.unwrap();
    let (status, _) = exchange(tcp, "/inject", "{\"apiVersion\": \"v1\"}").await;
    assert_eq!(status, 400);

    // A client that does not trust the certificate gets no answer.
    let (other, _, _) = make_cert(dir.path(), "other");
    let connector = tokio_rustls::TlsConnector::from(client_config(&other));
    let tcp = TcpStream::connect(https).await.unwrap();
    assert!(
        connector
            .connect(ServerName::try_from(HOST).unwrap(), tcp)
            .await
            .is_err()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_injection_configured_there_is_no_inject_route() {
    let dir = tempfile::tempdir().unwrap();
    let server = custody_control::server::start(&config(dir.path()))
        .await
        .unwrap();
    assert_eq!(server.https_addr, None);
    let tcp = TcpStream::connect(server.http_addr).await.unwrap();
    let (status, _) = exchange(tcp, "/inject", REVIEW).await;
    assert_eq!(status, 404);
    server.shutdown().await;
}

#[test]
fn a_rotated_certificate_is_served_and_a_broken_rotation_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = make_cert(dir.path(), "live");
    let reloading = ReloadingCert::new(&cert, &key).unwrap();
    let first = reloading.current().cert[0].clone();

    // cert-manager writes a new pair (mtimes move forward).
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (_, new_cert, new_key) = make_cert(dir.path(), "next");
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    reloading.check_now();
    let second = reloading.current().cert[0].clone();
    assert_ne!(first, second);
    let on_disk: Vec<_> = CertificateDer::pem_file_iter(&new_cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(second, on_disk[0]);

    // A half-written file: the previous certificate stays.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    reloading.check_now();
    assert_eq!(reloading.current().cert[0], second);

    // A missing file at start is an error that names it.
    let missing = dir.path().join("missing.crt");
    let error = ReloadingCert::new(&missing, &key).unwrap_err().to_string();
    assert!(error.contains("missing.crt"), "{error}");
}
