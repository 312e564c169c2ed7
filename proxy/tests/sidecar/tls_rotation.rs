//! Rotation of the TLS material other than the mesh's: the certificate of
//! the inbound TLS listener (`listeners.inbound_tls`), the termination
//! certificate and upstream CA of a database (`databases[].tls`), and the
//! CA of TLS origination (`tls_origination[]`). Files are replaced the way
//! Kubernetes does it (written aside, renamed over); real rustls clients
//! look at the certificate they are shown, a real PostgreSQL server sits
//! behind the database listener, and a real TLS server behind origination.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use custody_testkit::Postgres;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::postgres::enable_tls;
use crate::support::*;

/// The serial number (as the sidecar logs it) and the subject's common
/// name of a DER certificate.
fn serial_and_name(der: &[u8]) -> (String, String) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    (cert.tbs_certificate.raw_serial_as_string(), name)
}

/// The serial number and common name of the leaf of a PEM file.
fn file_identity(path: &Path) -> (String, String) {
    let cert = leaf_of(path);
    serial_and_name(cert.as_ref())
}

/// Replaces `to` with `bytes` in one step: written aside, renamed over.
fn replace_with(to: &Path, bytes: &[u8]) {
    let tmp = to.with_extension("next");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// Replaces `to` with a copy of `from` in one step.
fn replace(from: &Path, to: &Path) {
    replace_with(to, &std::fs::read(from).unwrap());
}

/// The first half of a PEM file: what a reader sees of a file written in
/// place, midway.
fn half_of(path: &Path) -> Vec<u8> {
    let whole = std::fs::read(path).unwrap();
    whole[..whole.len() / 2].to_vec()
}

/// A client trusting the CA of `ca_file`, offering `alpn`.
fn connector(ca_file: &Path, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).unwrap() {
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

/// `ca` and two certificates it signed for `dns`, `first` and `second`
/// (their common names), in a new directory.
fn two_certificates(dns: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    mesh_ca(dir.path(), "ca");
    dns_cert(dir.path(), "ca", "first", dns);
    dns_cert(dir.path(), "ca", "second", dns);
    dir
}

/// An HTTP/1.1 connection over TLS to the inbound TLS listener: the
/// request sender and the serial and common name the listener showed.
async fn https(
    ca_file: &Path,
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Body>,
    (String, String),
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector(ca_file, &[b"http/1.1"])
        .connect(ServerName::try_from("orders.test").unwrap(), tcp)
        .await
        .unwrap();
    let shown = serial_and_name(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref());
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    (sender, shown)
}

async fn get(sender: &mut hyper::client::conn::http1::SendRequest<Body>) -> u16 {
    get_rotation(sender, "orders.test").await
}

fn reloads(material: &str, result: &str) -> String {
    format!("custody_proxy_tls_reloads_total{{material=\"{material}\",result=\"{result}\"}}")
}

fn expiry(material: &str) -> String {
    format!("custody_proxy_tls_cert_expiry_seconds{{material=\"{material}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_tls_listener_takes_a_replaced_certificate_and_refuses_a_half_written_one() {
    capture_warnings();
    let certs = two_certificates("orders.test");
    let d = certs.path();
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("tls.crt"), live.path().join("tls.key"));
    std::fs::copy(d.join("first.crt"), &cert).unwrap();
    std::fs::copy(d.join("first.key"), &key).unwrap();
    let trust = Trust::new(&["orders"]);
    let app = App::ok().await;
    let tls_addr = free_port();
    let listeners = format!(
        "inbound_tls: {{ address: \"{tls_addr}\", cert_file: \"{}\", key_file: \"{}\", reload_interval_ms: 50 }}",
        cert.display(),
        key.display()
    );
    let mut spec = Spec::new("orders", app.addr);
    spec.listeners = &listeners;
    let sc = start(spec, &trust).await;
    wait_listening(tls_addr).await;
    let ca = d.join("ca.crt");
    let first = file_identity(&d.join("first.crt"));
    let second = file_identity(&d.join("second.crt"));
    assert_ne!(first.0, second.0);
    let material = "listeners.inbound_tls";

    let (mut established, shown) = https(&ca, tls_addr).await;
    assert_eq!(shown, first);
    assert_eq!(get(&mut established).await, 200);
    assert_eq!(
        sc.metric(&expiry(material)).await,
        file_not_after(&d.join("first.crt")) as f64
    );

    // A certificate caught half written: refused, named, the old one stays.
    replace_with(&cert, &half_of(&d.join("second.crt")));
    wait_metric(&sc, &reloads(material, "refused"), 1.0).await;
    let warning = wait_warning(&[
        "new TLS material refused",
        &format!("listeners.inbound_tls.cert_file ({})", cert.display()),
    ])
    .await;
    assert!(warning.contains("WARN"), "{warning}");
    let (mut sender, shown) = https(&ca, tls_addr).await;
    assert_eq!(shown, first);
    assert_eq!(get(&mut sender).await, 200);
    assert_eq!(sc.metric(&reloads(material, "applied")).await, 0.0);

    // The whole set, key then certificate: new handshakes show it.
    replace(&d.join("second.key"), &key);
    replace(&d.join("second.crt"), &cert);
    wait_metric(&sc, &reloads(material, "applied"), 1.0).await;
    let (mut sender, shown) = https(&ca, tls_addr).await;
    assert_eq!(shown, second);
    assert_eq!(get(&mut sender).await, 200);
    assert_eq!(
        sc.metric(&expiry(material)).await,
        file_not_after(&d.join("second.crt")) as f64
    );
    // The connection opened before keeps its certificate and goes on.
    assert_eq!(get(&mut established).await, 200);
    assert_eq!(app.seen().len(), 4);
}

/// A PostgreSQL session over TLS ended by the sidecar at `addr`: the
/// client, and the serial and common name the sidecar showed. The
/// `SSLRequest` is sent by hand so the client can look at the certificate;
/// tokio-postgres speaks the protocol over the TLS stream.
async fn pg_over_tls(
    pg: &Postgres,
    ca_file: &Path,
    addr: SocketAddr,
) -> Result<(tokio_postgres::Client, (String, String)), String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| format!("no answer to SSLRequest: {e}"))?;
    if answer[0] != b'S' {
        return Err(format!("SSLRequest answered {:?}", answer[0] as char));
    }
    let tls = connector(ca_file, &[])
        .connect(ServerName::try_from("orders-db.test").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let shown = serial_and_name(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref());
    let mut config = tokio_postgres::Config::new();
    config
        .user(pg.user())
        .password(pg.password())
        .dbname(pg.database())
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, conn) = config
        .connect_raw(tls, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("startup: {e}"))?;
    tokio::spawn(conn);
    Ok((client, shown))
}

/// Whether the server sees the session's own connection (the sidecar's)
/// as TLS, asked through `client`.
async fn server_side_ssl(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_termination_takes_a_replaced_certificate_and_upstream_ca_while_sessions_stay() {
    capture_warnings();
    let pg = Postgres::start().unwrap();
    let server_certs = tempfile::tempdir().unwrap();
    enable_tls(&pg, server_certs.path());
    let certs = two_certificates("orders-db.test");
    let d = certs.path();
    // Another CA, which did not sign the server's certificate.
    mesh_ca(d, "other");
    let live = tempfile::tempdir().unwrap();
    let l = live.path();
    let (cert, key, upstream_ca) = (l.join("tls.crt"), l.join("tls.key"), l.join("ca.crt"));
    std::fs::copy(d.join("first.crt"), &cert).unwrap();
    std::fs::copy(d.join("first.key"), &key).unwrap();
    std::fs::copy(server_certs.path().join("ca.crt"), &upstream_ca).unwrap();

    let trust = Trust::new(&["orders"]);
    let listen = free_port();
    let extra = format!(
        "databases:\n  - protocol: postgres\n    listen: \"{listen}\"\n    upstream: \"{}\"\n    \
         tls: {{ mode: terminate, cert_file: \"{}\", key_file: \"{}\", upstream_ca_file: \"{}\", \
         upstream_server_name: db.test, reload_interval_ms: 50 }}\n",
        pg.addr(),
        cert.display(),
        key.display(),
        upstream_ca.display(),
    );
    let mut spec = Spec::new("orders", free_port());
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    wait_listening(listen).await;
    let ca = d.join("ca.crt");
    let first = file_identity(&d.join("first.crt"));
    let second = file_identity(&d.join("second.crt"));
    let material = "databases[0].tls";

    // The server turns TLS on asynchronously (its configuration reload).
    let mut opened = Err(String::new());
    for _ in 0..50 {
        opened = pg_over_tls(&pg, &ca, listen).await;
        if let Ok((client, _)) = &opened
            && server_side_ssl(client).await
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (established, shown) = opened.unwrap();
    assert_eq!(shown, first);
    assert!(server_side_ssl(&established).await);
    assert_eq!(
        sc.metric(&expiry(material)).await,
        file_not_after(&d.join("first.crt")) as f64
    );

    // A half-written key: refused, named, the old set stays.
    replace_with(&key, &half_of(&d.join("second.key")));
    wait_metric(&sc, &reloads(material, "refused"), 1.0).await;
    wait_warning(&[
        "new TLS material refused",
        &format!("databases[0].tls.key_file ({})", key.display()),
    ])
    .await;
    let (client, shown) = pg_over_tls(&pg, &ca, listen).await.unwrap();
    assert_eq!(shown, first);
    assert!(server_side_ssl(&client).await);

    // The whole new certificate and key.
    replace(&d.join("second.crt"), &cert);
    replace(&d.join("second.key"), &key);
    wait_metric(&sc, &reloads(material, "applied"), 1.0).await;
    let (client, shown) = pg_over_tls(&pg, &ca, listen).await.unwrap();
    assert_eq!(shown, second);
    assert!(server_side_ssl(&client).await);
    assert_eq!(
        sc.metric(&expiry(material)).await,
        file_not_after(&d.join("second.crt")) as f64
    );
    // The session opened before goes on.
    assert!(server_side_ssl(&established).await);

    // The upstream CA is replaced by one that did not sign the server's
    // certificate: new sessions fail the server's handshake, the
    // established one goes on.
    replace(&d.join("other.crt"), &upstream_ca);
    wait_metric(&sc, &reloads(material, "applied"), 2.0).await;
    let failures =
        "custody_proxy_db_tls_failures_total{system=\"postgresql\",reason=\"server_tls\"}";
    assert!(pg_over_tls(&pg, &ca, listen).await.is_err());
    wait_metric(&sc, failures, 1.0).await;
    assert!(server_side_ssl(&established).await);
    // And back: sessions open again.
    replace(&server_certs.path().join("ca.crt"), &upstream_ca);
    wait_metric(&sc, &reloads(material, "applied"), 3.0).await;
    let (client, shown) = pg_over_tls(&pg, &ca, listen).await.unwrap();
    assert_eq!(shown, second);
    assert!(server_side_ssl(&client).await);
    assert_eq!(sc.metric(failures).await, 1.0);
}

/// A TLS server with certificate `name` of `dir`, answering every
/// connection `HTTP/1.1 200` with body `tls`.
async fn tls_server(dir: &Path, name: &str) -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join(format!("{name}.crt")))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(full("tls")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origination_ca_is_reread_and_a_bad_one_is_refused() {
    capture_warnings();
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    mesh_ca(d, "ca");
    mesh_ca(d, "next");
    dns_cert(d, "ca", "api", "api.partner.test");
    dns_cert(d, "next", "api2", "api.partner.test");
    let old_server = tls_server(d, "api").await;
    let new_server = tls_server(d, "api2").await;
    let live = tempfile::tempdir().unwrap();
    let ca_file = live.path().join("ca.crt");
    std::fs::copy(d.join("ca.crt"), &ca_file).unwrap();

    let trust = Trust::new(&["orders"]);
    let upstreams = format!(
        "partner: {{ address: \"{old_server}\", tls: {{ server_name: api.partner.test, ca_file: \"{}\", reload_interval_ms: 50 }} }}, \
         partner2: {{ address: \"{new_server}\", tls: {{ server_name: api.partner.test, ca_file: \"{}\", reload_interval_ms: 50 }} }}",
        ca_file.display(),
        ca_file.display(),
    );
    let mut spec = Spec::new("orders", free_port());
    spec.upstreams_yaml = &upstreams;
    let sc = start(spec, &trust).await;
    let call = |host: &'static str| async move {
        call_out(sc.outbound, host, None).await.status().as_u16()
    };
    assert_eq!(call("partner").await, 200);
    assert_eq!(call("partner2").await, 502, "not signed by the CA in force");

    // Half written: refused for both upstreams, each named.
    replace_with(&ca_file, &half_of(&d.join("next.crt")));
    for material in [
        "outbound.upstreams.partner.tls",
        "outbound.upstreams.partner2.tls",
    ] {
        wait_metric(&sc, &reloads(material, "refused"), 1.0).await;
        wait_warning(&[
            "new TLS material refused",
            &format!("{material}.ca_file ({})", ca_file.display()),
        ])
        .await;
    }
    // A bundle of both CAs, then the new one only.
    let mut bundle = std::fs::read(d.join("ca.crt")).unwrap();
    bundle.extend(std::fs::read(d.join("next.crt")).unwrap());
    replace_with(&ca_file, &bundle);
    for material in [
        "outbound.upstreams.partner.tls",
        "outbound.upstreams.partner2.tls",
    ] {
        wait_metric(&sc, &reloads(material, "applied"), 1.0).await;
    }
    assert_eq!(call("partner2").await, 200);
    replace(&d.join("next.crt"), &ca_file);
    wait_metric(
        &sc,
        &reloads("outbound.upstreams.partner.tls", "applied"),
        2.0,
    )
    .await;
    assert_eq!(
        sc.metric(
            "custody_proxy_tls_origination_connections_total{result=\"peer_certificate_untrusted\"}"
        )
        .await,
        1.0
    );
    // No expiry gauge for a CA-only material.
    assert_eq!(
        sc.metric(&expiry("outbound.upstreams.partner.tls")).await,
        0.0
    );
}
