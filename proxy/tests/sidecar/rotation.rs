//! Mesh certificate rotation without a restart: the sidecar re-reads
//! `mesh_tls.cert_file`, `key_file` and `ca_file`, puts a valid new set in
//! force for new handshakes (inbound and outbound) while established
//! connections carry on, and refuses a bad set (another workload's
//! certificate, a key that does not match) keeping the old one. The peers
//! are real rustls clients and servers that look at the serial number of
//! the certificate they were shown.

use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::mesh::ChainOnly;
use crate::support::*;

/// The serial number (as the sidecar logs it) of a DER certificate.
fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.tbs_certificate.raw_serial_as_string()
}

/// The serial number of the leaf of a PEM file.
fn file_serial(path: &Path) -> String {
    let cert = leaf_of(path);
    serial_of(cert.as_ref())
}

fn roots_of(ca_file: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

/// Certificates: CAs `mesh` and `mesh2` (the next one), `bundle.crt` with
/// both; `server`, `client`, `intruder` (another workload) from `mesh`;
/// `server-next` from `mesh`, `server2` and `client2` from `mesh2`.
fn certificates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mesh_ca(d, "mesh");
    mesh_ca(d, "mesh2");
    for (ca, name, uri) in [
        ("mesh", "server", "server"),
        ("mesh", "server-next", "server"),
        ("mesh", "client", "client"),
        ("mesh", "intruder", "intruder"),
        ("mesh2", "server2", "server"),
        ("mesh2", "client2", "client"),
    ] {
        mesh_cert(d, ca, name, Some(&uri_of(uri)));
    }
    let mut bundle = std::fs::read(d.join("mesh.crt")).unwrap();
    bundle.extend(std::fs::read(d.join("mesh2.crt")).unwrap());
    std::fs::write(d.join("bundle.crt"), bundle).unwrap();
    dir
}

/// Replaces `to` with a copy of `from` in one step (write, then rename).
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// A test client showing certificate `name` of `dir`, trusting the CAs of
/// `ca_file`, offering the mesh's ALPN marker.
fn client_tls(dir: &Path, name: &str, ca_file: &Path) -> TlsConnector {
    let provider = Arc::new(ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(roots_of(ca_file), provider.clone())
        .build()
        .unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join(format!("{name}.crt")))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec(), b"custody-mesh".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// An HTTP/1.1 connection over mesh mTLS to `addr`: the request sender and
/// the serial of the certificate the sidecar showed.
async fn connect(
    dir: &Path,
    name: &str,
    ca_file: &Path,
    addr: SocketAddr,
) -> (hyper::client::conn::http1::SendRequest<Body>, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = client_tls(dir, name, ca_file)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap();
    let serial = serial_of(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref());
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    (sender, serial)
}

async fn get(sender: &mut hyper::client::conn::http1::SendRequest<Body>) -> u16 {
    get_rotation(sender, "server").await
}

const APPLIED: &str = "custody_proxy_tls_reloads_total{material=\"mesh_tls\",result=\"applied\"}";
const REFUSED: &str = "custody_proxy_tls_reloads_total{material=\"mesh_tls\",result=\"refused\"}";
const EXPIRY: &str = "custody_proxy_tls_cert_expiry_seconds{material=\"mesh_tls\"}";

/// A Kubernetes secret volume: `tls.crt`, `tls.key`, `ca.crt` are links
/// through `..data` to a versioned directory, swapped in one rename.
fn secret_version(volume: &Path, version: &str, cert: &Path, key: &Path, ca: &Path) {
    let dir = volume.join(version);
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(cert, dir.join("tls.crt")).unwrap();
    std::fs::copy(key, dir.join("tls.key")).unwrap();
    std::fs::copy(ca, dir.join("ca.crt")).unwrap();
    let tmp = volume.join("..data_tmp");
    symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, volume.join("..data")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_handshakes_take_a_rotated_certificate_and_ca_bundle_while_connections_stay() {
    let certs = certificates();
    let d = certs.path();
    let volume = tempfile::tempdir().unwrap();
    let v = volume.path();
    secret_version(
        v,
        "..v1",
        &d.join("server.crt"),
        &d.join("server.key"),
        &d.join("mesh.crt"),
    );
    for file in ["tls.crt", "tls.key", "ca.crt"] {
        symlink(format!("..data/{file}"), v.join(file)).unwrap();
    }
    let trust = Trust::new(&["server"]);
    let app = App::ok().await;
    let yaml = format!(
        "mesh_tls: {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", mode: strict, reload_interval_ms: 50 }}",
        v.join("tls.crt").display(),
        v.join("tls.key").display(),
        v.join("ca.crt").display(),
    );
    let mut spec = Spec::new("server", app.addr);
    spec.extra = &yaml;
    let server = start(spec, &trust).await;
    let bundle = d.join("bundle.crt");

    let old = file_serial(&d.join("server.crt"));
    let (mut established, serial) = connect(d, "client", &bundle, server.inbound).await;
    assert_eq!(serial, old);
    assert_eq!(get(&mut established).await, 200);
    assert_eq!(
        server.metric(EXPIRY).await,
        file_not_after(&d.join("server.crt")) as f64
    );
    // A client of the next CA is not accepted yet.
    let tcp = tokio::net::TcpStream::connect(server.inbound)
        .await
        .unwrap();
    let refused = async {
        let mut tls = client_tls(d, "client2", &bundle)
            .connect(ServerName::IpAddress(server.inbound.ip().into()), tcp)
            .await
            .ok()?;
        // TLS 1.3: the server's verdict on the client certificate comes
        // after the client's handshake ends, with the first read.
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        tls.write_all(b"GET / HTTP/1.1\r\nhost: server\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 1];
        match tls.read(&mut buf).await {
            Ok(n) if n > 0 => Some(()),
            _ => None,
        }
    };
    assert!(refused.await.is_none(), "a client of mesh2 was served");

    // The secret is updated: a certificate of the next CA and a bundle of
    // both CAs (a CA roll), swapped in one rename as the kubelet does.
    secret_version(
        v,
        "..v2",
        &d.join("server2.crt"),
        &d.join("server2.key"),
        &bundle,
    );
    wait_metric(&server, APPLIED, 1.0).await;
    let new = file_serial(&d.join("server2.crt"));
    assert_ne!(new, old);
    assert_eq!(
        server.metric(EXPIRY).await,
        file_not_after(&d.join("server2.crt")) as f64
    );
    // New connections see the new certificate; clients of either CA are
    // accepted during the roll.
    for client in ["client", "client2"] {
        let (mut sender, serial) = connect(d, client, &bundle, server.inbound).await;
        assert_eq!(serial, new, "{client}");
        assert_eq!(get(&mut sender).await, 200, "{client}");
    }
    // The connection opened before goes on.
    assert_eq!(get(&mut established).await, 200);
    assert_eq!(server.metric(REFUSED).await, 0.0);
    let seen: Vec<_> = server
        .hops_where(4, |h| h["direction"] == "DIRECTION_INBOUND")
        .await
        .into_iter()
        .map(|h| h["peer_identity"].as_str().unwrap().to_owned())
        .collect();
    assert!(seen.iter().all(|id| *id == uri_of("client")), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_replacement_is_refused_and_a_two_step_write_converges() {
    let certs = certificates();
    let d = certs.path();
    let volume = tempfile::tempdir().unwrap();
    let v = volume.path();
    let ca = d.join("mesh.crt");
    secret_version(v, "..v1", &d.join("server.crt"), &d.join("server.key"), &ca);
    for file in ["tls.crt", "tls.key", "ca.crt"] {
        symlink(format!("..data/{file}"), v.join(file)).unwrap();
    }
    let trust = Trust::new(&["server"]);
    let app = App::ok().await;
    let yaml = format!(
        "mesh_tls: {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", mode: strict, reload_interval_ms: 50 }}",
        v.join("tls.crt").display(),
        v.join("tls.key").display(),
        v.join("ca.crt").display(),
    );
    let mut spec = Spec::new("server", app.addr);
    spec.extra = &yaml;
    let server = start(spec, &trust).await;
    let old = file_serial(&d.join("server.crt"));
    let next = file_serial(&d.join("server-next.crt"));
    let expiry = server.metric(EXPIRY).await;
    let serial_now = || async {
        let (mut sender, serial) = connect(d, "client", &ca, server.inbound).await;
        assert_eq!(get(&mut sender).await, 200);
        serial
    };
    assert_eq!(serial_now().await, old);

    // The certificate is written first: it does not match the key.
    secret_version(
        v,
        "..v2",
        &d.join("server-next.crt"),
        &d.join("server.key"),
        &ca,
    );
    wait_metric(&server, REFUSED, 1.0).await;
    assert_eq!(serial_now().await, old);
    assert_eq!(server.metric(EXPIRY).await, expiry);
    assert_eq!(server.metric(APPLIED).await, 0.0);
    // Then the key: the set is whole and goes in force.
    secret_version(
        v,
        "..v3",
        &d.join("server-next.crt"),
        &d.join("server-next.key"),
        &ca,
    );
    wait_metric(&server, APPLIED, 1.0).await;
    assert_eq!(serial_now().await, next);

    // Another workload's certificate and key: refused, the one in force
    // stays.
    secret_version(
        v,
        "..v4",
        &d.join("intruder.crt"),
        &d.join("intruder.key"),
        &ca,
    );
    wait_metric(&server, REFUSED, 2.0).await;
    assert_eq!(serial_now().await, next);
    // A refused set is counted once, however often it is looked at.
    assert_eq!(server.metric(REFUSED).await, 2.0);
    assert_eq!(server.metric(APPLIED).await, 1.0);
    assert_eq!(
        server.metric(EXPIRY).await,
        file_not_after(&d.join("server-next.crt")) as f64
    );
}

/// A mesh peer that is not a sidecar: an mTLS server (certificate `server`
/// of `dir`, clients verified against `ca_file`) recording, per request,
/// its path and the serial of the client certificate of its connection.
/// `/hold` answers once `release` is notified.
async fn recording_peer(
    dir: &Path,
    ca_file: &Path,
    release: Arc<Notify>,
) -> (SocketAddr, Arc<Mutex<Vec<(String, String)>>>) {
    let provider = Arc::new(ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots_of(ca_file), provider.clone())
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let seen2 = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = Arc::clone(&seen2);
            let release = Arc::clone(&release);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let serial = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| serial_of(c[0].as_ref()))
                    .unwrap_or_default();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let path = req.uri().path().to_owned();
                    seen.lock().unwrap().push((path.clone(), serial.clone()));
                    let release = Arc::clone(&release);
                    async move {
                        if path == "/hold" {
                            release.notified().await;
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(full("peer")))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

async fn call_path(outbound: SocketAddr, path: &str) -> u16 {
    let resp = client()
        .request(
            Request::get(format!("http://{outbound}{path}"))
                .header("host", "server")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    body_string(resp).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_handshakes_take_a_rotated_client_certificate_while_a_pooled_connection_stays() {
    let certs = certificates();
    let d = certs.path();
    let bundle = d.join("bundle.crt");
    let release = Arc::new(Notify::new());
    let (peer, seen) = recording_peer(d, &bundle, Arc::clone(&release)).await;
    let live = tempfile::tempdir().unwrap();
    let l = live.path();
    for (from, to) in [
        ("client.crt", "tls.crt"),
        ("client.key", "tls.key"),
        ("mesh.crt", "ca.crt"),
    ] {
        std::fs::copy(d.join(from), l.join(to)).unwrap();
    }
    let trust = Trust::new(&["client"]);
    let app = App::ok().await;
    let yaml = format!(
        "mesh_tls: {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", peers: [server], reload_interval_ms: 50 }}",
        l.join("tls.crt").display(),
        l.join("tls.key").display(),
        l.join("ca.crt").display(),
    );
    let mut spec = Spec::new("client", app.addr);
    spec.upstreams = vec![("server".into(), peer)];
    spec.extra = &yaml;
    let client = start(spec, &trust).await;

    assert_eq!(call_path(client.outbound, "/first").await, 200);
    // Rotation: a certificate of the next CA; the bundle still trusts the
    // peer's CA. Key first, then certificate, then CA: refused until whole.
    replace(&d.join("client2.key"), &l.join("tls.key"));
    replace(&d.join("client2.crt"), &l.join("tls.crt"));
    replace(&bundle, &l.join("ca.crt"));
    wait_metric(&client, APPLIED, 1.0).await;

    // The pooled connection carries the next request (held open by the
    // peer), so the one after needs a new connection: it shows the new
    // certificate.
    let outbound = client.outbound;
    let held = tokio::spawn(async move { call_path(outbound, "/hold").await });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.lock().unwrap().iter().any(|(p, _)| p == "/hold") {
        assert!(Instant::now() < deadline, "/hold did not arrive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(call_path(client.outbound, "/third").await, 200);
    release.notify_one();
    assert_eq!(held.await.unwrap(), 200);

    let old = file_serial(&d.join("client.crt"));
    let new = file_serial(&d.join("client2.crt"));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            ("/first".to_owned(), old.clone()),
            ("/hold".to_owned(), old),
            ("/third".to_owned(), new),
        ]
    );
    assert_eq!(
        client
            .metric(
                "custody_proxy_mesh_tls_connections_total{direction=\"outbound\",result=\"mtls\"}"
            )
            .await,
        2.0
    );
}
