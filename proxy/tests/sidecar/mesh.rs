//! Mesh mutual TLS between sidecars (SPIFFE IDs in certificates, on the
//! same inbound port as plaintext) and TLS origination to external servers.
//! Certificates come from throwaway CAs made with openssl.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use custody_context::issue::{Issuer, Mint};
use custody_context::token::InitiatorKind;
use custody_context::traceparent::TraceId;
use custody_proxy::{Config, Sidecar};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    self, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::support::*;

/// Two CAs: `mesh` (the sidecars') and `rogue`; workload certificates
/// `client`, `server`, `intruder` and `nameless` (no SPIFFE ID) from
/// `mesh`, `rogue-client` and `rogue-server` from `rogue`.
pub(crate) fn mesh_certificates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mesh_ca(d, "mesh");
    mesh_ca(d, "rogue");
    for name in ["client", "server", "intruder"] {
        mesh_cert(d, "mesh", name, Some(&uri_of(name)));
    }
    mesh_cert(d, "mesh", "nameless", None);
    mesh_cert(d, "rogue", "rogue-client", Some(&uri_of("client")));
    mesh_cert(d, "rogue", "rogue-server", Some(&uri_of("server")));
    dir
}

pub(crate) fn roots(dir: &Path, ca: &str) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let pem = std::fs::read(dir.join(format!("{ca}.crt"))).unwrap();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

/// Accepts a server certificate that chains to the CA, whatever names it
/// carries (mesh certificates name a SPIFFE ID, not a host).
#[derive(Debug)]
pub(crate) struct ChainOnly(pub(crate) Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A test client showing certificate `name`, trusting the `mesh` CA, and
/// offering the mesh's ALPN marker as sidecars do.
fn mtls_client(dir: &Path, name: &str) -> TlsConnector {
    mtls_client_with(dir, name, true)
}

fn mtls_client_with(dir: &Path, name: &str, marker: bool) -> TlsConnector {
    let provider = Arc::new(ring::default_provider());
    let verifier =
        WebPkiServerVerifier::builder_with_provider(roots(dir, "mesh"), provider.clone())
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
    // Offered by sidecars next to the HTTP protocol: marks mesh mTLS.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if marker {
        config.alpn_protocols.push(b"custody-mesh".to_vec());
    }
    TlsConnector::from(Arc::new(config))
}

/// One HTTP/1.1 request over mTLS with certificate `name`; `Err` when the
/// connection was refused at any point.
async fn mtls_get(
    dir: &Path,
    name: &str,
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = mtls_client(dir, name)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::get("/mtls").header("host", "server");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(full("")).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    Ok(body_string(resp).await)
}

fn mint_as(trust: &Trust, name: &str) -> String {
    Issuer::new(trust.key(name), uri_of(name), TD, 300)
        .mint(
            Mint {
                txn: TraceId::random(),
                sub: "alice@example.com".into(),
                kind: InitiatorKind::Human,
                scope: "s".into(),
                act: None,
                tctx: None,
                rctx: None,
                taint: vec![],
            },
            custody_context::unix_now(),
        )
        .unwrap()
        .encoded
}

fn is_inbound(h: &Value) -> bool {
    h["direction"] == "DIRECTION_INBOUND"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_speak_mtls_and_the_server_hop_records_the_verified_client() {
    let certs = mesh_certificates();
    let dir = certs.path();
    let trust = Trust::new(&["client", "server"]);
    let app = App::ok().await;
    let server_mesh = mesh_tls_yaml(dir, "mesh", "server", "mode: strict");
    let mut spec = Spec::new("server", app.addr);
    spec.extra = &server_mesh;
    let server = start(spec, &trust).await;
    let client_app = App::ok().await;
    let client_mesh = mesh_tls_yaml(dir, "mesh", "client", "peers: [server]");
    let mut spec = Spec::new("client", client_app.addr);
    spec.upstreams = vec![("server".into(), server.inbound)];
    spec.extra = &client_mesh;
    let client = start(spec, &trust).await;

    // HTTP/1.1: app → client sidecar (outbound) → mTLS → server sidecar → app.
    let resp = call_out(client.outbound, "server", None).await;
    assert_eq!(resp.status(), 200);
    let seen = app.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, hyper::Version::HTTP_11);
    let claims = seen[0].token().unwrap();
    assert_eq!(claims["req_wl"], uri_of("client"));
    let inbound = server.wait_hop(is_inbound).await;
    assert_eq!(
        inbound["transport_security"],
        "TRANSPORT_SECURITY_MESH_MTLS"
    );
    assert_eq!(inbound["peer_identity"], uri_of("client"));
    assert_eq!(inbound["peer"]["service_account"], "client");
    assert_eq!(inbound["identity_mismatch"], "");
    assert_eq!(inbound["context_outcome"], "CONTEXT_OUTCOME_PROPAGATED");
    let outbound = client.wait_hop(|h| !is_inbound(h)).await;
    assert_eq!(
        outbound["transport_security"],
        "TRANSPORT_SECURITY_MESH_MTLS"
    );
    assert_eq!(outbound["peer_identity"], uri_of("server"));
    assert_eq!(outbound["transport_error"], "");
    assert_eq!(outbound["chain_id"], inbound["chain_id"]);
    assert_eq!(inbound["chain_id"], claims["txn"]);
    // A second call on the pooled connection: no new handshake, the same
    // verified identity on its hop.
    let resp = call_out(client.outbound, "server", None).await;
    assert_eq!(resp.status(), 200);
    let hops = client.hops_where(2, |h| !is_inbound(h)).await;
    let second = hops.iter().filter(|h| !is_inbound(h)).nth(1).unwrap();
    assert_eq!(second["peer_identity"], uri_of("server"));
    assert_eq!(second["transport_security"], "TRANSPORT_SECURITY_MESH_MTLS");
    let hops = server.hops_where(2, is_inbound).await;
    let second = hops.iter().filter(|h| is_inbound(h)).nth(1).unwrap();
    assert_eq!(second["peer_identity"], uri_of("client"));

    // HTTP/2 from the app (h2c), HTTP/2 by ALPN between the sidecars.
    let tcp = tokio::net::TcpStream::connect(client.outbound)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(Request::get("http://server/h2").body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(body_string(resp).await, (200, "ok".to_owned()));
    let seen = app.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].version, hyper::Version::HTTP_2);
    let txn = seen[2].token().unwrap()["txn"].clone();
    let inbound = server
        .wait_hop(|h| is_inbound(h) && h["operation"] == "GET /h2")
        .await;
    assert_eq!(inbound["protocol"], "PROTOCOL_HTTP2");
    assert_eq!(
        inbound["transport_security"],
        "TRANSPORT_SECURITY_MESH_MTLS"
    );
    assert_eq!(inbound["peer_identity"], uri_of("client"));
    assert_eq!(inbound["chain_id"], txn);
    let outbound = client
        .wait_hop(|h| !is_inbound(h) && h["operation"] == "GET /h2")
        .await;
    assert_eq!(outbound["peer_identity"], uri_of("server"));
    assert_eq!(outbound["chain_id"], txn);

    // One HTTP/1.1 connection (pooled: it carried both HTTP/1.1 requests)
    // and one HTTP/2 connection, both mTLS.
    let inbound_mtls =
        "custody_proxy_mesh_tls_connections_total{direction=\"inbound\",result=\"mtls\"}";
    let outbound_mtls =
        "custody_proxy_mesh_tls_connections_total{direction=\"outbound\",result=\"mtls\"}";
    assert_eq!(server.metric(inbound_mtls).await, 2.0);
    assert_eq!(client.metric(outbound_mtls).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_refuses_plaintext_foreign_cas_and_certificates_without_identity() {
    let certs = mesh_certificates();
    let dir = certs.path();
    let trust = Trust::new(&["client", "server"]);
    let app = App::ok().await;
    let server_mesh = mesh_tls_yaml(dir, "mesh", "server", "mode: strict");
    // The `inbound_tls` listener (server TLS only) is not mesh traffic.
    let tls_dir = tempfile::tempdir().unwrap();
    tls_certificates(tls_dir.path(), "server.test");
    let tls_addr = free_port();
    let listeners = format!(
        "inbound_tls: {{ address: \"{tls_addr}\", cert_file: \"{}\", key_file: \"{}\" }}",
        tls_dir.path().join("tls.crt").display(),
        tls_dir.path().join("tls.key").display()
    );
    let mut spec = Spec::new("server", app.addr);
    spec.extra = &server_mesh;
    spec.listeners = &listeners;
    spec.extra_inbound = "  refuse_invalid_tokens: true";
    let server = start(spec, &trust).await;
    wait_listening(tls_addr).await;

    // Plaintext: the connection is closed unanswered.
    let plain = client()
        .request(
            Request::get(format!("http://{}/plain", server.inbound))
                .header("x-custody-user", "alice@example.com")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert!(plain.is_err(), "plaintext was answered: {plain:?}");
    // A client certificate from another CA, one without a SPIFFE ID.
    let rogue = mtls_get(dir, "rogue-client", server.inbound, &[]).await;
    assert!(rogue.is_err(), "a foreign CA was served: {rogue:?}");
    // The mesh's own certificate, without the ALPN marker: not mesh mTLS.
    let tcp = tokio::net::TcpStream::connect(server.inbound)
        .await
        .unwrap();
    let unmarked = mtls_client_with(dir, "client", false)
        .connect(ServerName::IpAddress(server.inbound.ip().into()), tcp)
        .await;
    assert!(unmarked.is_err(), "TLS without the mesh marker was served");
    let nameless = mtls_get(dir, "nameless", server.inbound, &[]).await;
    assert!(
        nameless.is_err(),
        "a certificate without identity was served: {nameless:?}"
    );
    assert!(app.seen().is_empty());

    // The mesh's own certificate is served, and a token whose last
    // workload is not the verified peer is refused (refuse_invalid_tokens).
    let token = mint_as(&trust, "client");
    let (status, _) = mtls_get(dir, "client", server.inbound, &[("txn-token", &token)])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, body) = mtls_get(dir, "intruder", server.inbound, &[("txn-token", &token)])
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert!(body.contains("peer_mismatch"), "{body}");
    assert_eq!(app.seen().len(), 1);
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(tls_dir.path(), "ca"))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("server.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("/edge")
                .header("host", "server.test")
                .header("x-custody-user", "alice@example.com")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let edge = server.wait_hop(|h| h["operation"] == "GET /edge").await;
    assert_eq!(edge["transport_security"], "TRANSPORT_SECURITY_TLS");
    assert_eq!(edge["peer_identity"], "");
    assert_eq!(app.seen().len(), 2);
    let refused = server
        .wait_hop(|h| h["peer_identity"] == uri_of("intruder"))
        .await;
    assert_eq!(refused["identity_mismatch"], "token_workload_mismatch");
    assert_eq!(refused["context_outcome"], "CONTEXT_OUTCOME_REFUSED");

    let metric = |result: &str| {
        format!(
            "custody_proxy_mesh_tls_connections_total{{direction=\"inbound\",result=\"{result}\"}}"
        )
    };
    assert!(server.metric(&metric("plaintext_refused")).await >= 1.0);
    assert!(server.metric(&metric("tls_refused")).await >= 1.0);
    assert!(server.metric(&metric("handshake_failed")).await >= 1.0);
    assert!(server.metric(&metric("identity_refused")).await >= 1.0);
    assert!(server.metric(&metric("mtls")).await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_mode_serves_plaintext_as_not_mtls_and_flags_a_token_from_another_peer() {
    let certs = mesh_certificates();
    let dir = certs.path();
    let trust = Trust::new(&["client", "server"]);
    let app = App::ok().await;
    let server_mesh = mesh_tls_yaml(dir, "mesh", "server", "mode: permissive");
    let mut spec = Spec::new("server", app.addr);
    spec.extra = &server_mesh;
    let server = start(spec, &trust).await;

    let resp = client()
        .request(
            Request::get(format!("http://{}/plain", server.inbound))
                .header("x-custody-user", "alice@example.com")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(body_string(resp).await, (200, "ok".to_owned()));
    let plain = server.wait_hop(|h| h["operation"] == "GET /plain").await;
    assert_eq!(plain["transport_security"], "TRANSPORT_SECURITY_PLAINTEXT");
    assert_eq!(plain["peer_identity"], "");

    // A valid token from `client`, presented by `intruder`: passed on
    // (refuse_invalid_tokens is off) and flagged.
    let token = mint_as(&trust, "client");
    let (status, _) = mtls_get(dir, "intruder", server.inbound, &[("txn-token", &token)])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let flagged = server
        .wait_hop(|h| h["peer_identity"] == uri_of("intruder"))
        .await;
    assert_eq!(
        flagged["transport_security"],
        "TRANSPORT_SECURITY_MESH_MTLS"
    );
    assert_eq!(flagged["identity_mismatch"], "token_workload_mismatch");
    assert_eq!(flagged["peer"]["service_account"], "intruder");

    // No token and no identity source: the chain is attributed to the
    // verified peer, not to its address.
    let (status, _) = mtls_get(dir, "intruder", server.inbound, &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let last = app.seen().last().unwrap().token().unwrap();
    assert_eq!(last["sub"], uri_of("intruder"));
    assert!(
        server
            .metric("custody_proxy_mesh_tls_connections_total{direction=\"inbound\",result=\"plaintext\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_mode_passes_the_applications_own_tls_through() {
    let certs = mesh_certificates();
    let dir = certs.path();
    let tls_dir = tempfile::tempdir().unwrap();
    tls_certificates(tls_dir.path(), "server.test");
    let app = https_server(tls_dir.path(), "tls").await;
    let trust = Trust::new(&["server"]);
    let server_mesh = mesh_tls_yaml(dir, "mesh", "server", "mode: permissive");
    let mut spec = Spec::new("server", app);
    spec.extra = &server_mesh;
    let server = start(spec, &trust).await;

    // A client of the application's own TLS (no mesh marker, no client
    // certificate): end to end with the application, through the sidecar.
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(tls_dir.path(), "ca"))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.inbound)
        .await
        .unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("server.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("/own-tls")
                .header("host", "server.test")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(body_string(resp).await, (200, "secure".to_owned()));
    drop(sender);
    let hop = server
        .wait_hop(|h| h["protocol"] == "PROTOCOL_TLS_OPAQUE")
        .await;
    assert_eq!(hop["direction"], "DIRECTION_INBOUND");
    assert_eq!(hop["egress"], Value::Null);
    assert_eq!(
        server
            .metric("custody_proxy_mesh_tls_connections_total{direction=\"inbound\",result=\"tls_passthrough\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refuses_wrong_or_missing_identities_foreign_cas_and_plaintext_peers() {
    let certs = mesh_certificates();
    let dir = certs.path();
    let trust = Trust::new(&["client", "server"]);
    let app = App::ok().await;
    let server_mesh = mesh_tls_yaml(dir, "mesh", "server", "");
    let mut spec = Spec::new("server", app.addr);
    spec.extra = &server_mesh;
    let server = start(spec, &trust).await;
    let rogue_app = App::ok().await;
    let rogue_mesh = mesh_tls_yaml(dir, "rogue", "rogue-server", "");
    let mut spec = Spec::new("server", rogue_app.addr);
    spec.extra = &rogue_mesh;
    let rogue = start(spec, &trust).await;
    // Not a sidecar: an app that would record any plaintext request.
    let plain = App::ok().await;
    // A TLS server with a mesh certificate that names no workload.
    let nameless = https_server(dir, "nameless").await;

    let client_app = App::ok().await;
    let peers = format!(
        "peers: [{{ destination: wrong-id, identity: \"{}\" }}, {{ destination: server, identity: \"{}\" }}, rogue, plain, nameless]",
        uri_of("other"),
        uri_of("server"),
    );
    let client_mesh = mesh_tls_yaml(dir, "mesh", "client", &peers);
    let mut spec = Spec::new("client", client_app.addr);
    spec.upstreams = vec![
        ("wrong-id".into(), server.inbound),
        ("server".into(), server.inbound),
        ("rogue".into(), rogue.inbound),
        ("plain".into(), plain.addr),
        ("nameless".into(), nameless),
    ];
    spec.extra = &client_mesh;
    let client = start(spec, &trust).await;

    for (host, error) in [
        ("wrong-id", "peer_identity_mismatch"),
        ("rogue", "peer_certificate_untrusted"),
        ("plain", "handshake_failed"),
        ("nameless", "peer_identity_missing"),
    ] {
        let resp = call_out(client.outbound, host, None).await;
        assert_eq!(resp.status(), 502, "{host}");
        let hop = client
            .wait_hop(|h| h["egress"]["destination"]["host"] == host)
            .await;
        assert_eq!(hop["status"], 502, "{host}");
        assert_eq!(hop["transport_security"], "TRANSPORT_SECURITY_MESH_MTLS");
        assert_eq!(hop["transport_error"], error, "{host}");
        assert_eq!(hop["peer_identity"], "", "{host}");
    }
    // Nothing reached an application, in plaintext or otherwise.
    assert!(app.seen().is_empty());
    assert!(rogue_app.seen().is_empty());
    assert!(plain.seen().is_empty());

    // The right identity goes through.
    let resp = call_out(client.outbound, "server", None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(app.seen().len(), 1);
    let metric = |result: &str| {
        format!(
            "custody_proxy_mesh_tls_connections_total{{direction=\"outbound\",result=\"{result}\"}}"
        )
    };
    assert_eq!(client.metric(&metric("peer_identity_mismatch")).await, 1.0);
    assert_eq!(
        client.metric(&metric("peer_certificate_untrusted")).await,
        1.0
    );
    assert_eq!(client.metric(&metric("mtls")).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_workload_is_refused_at_start() {
    let certs = mesh_certificates();
    let dir = certs.path();
    let trust = Trust::new(&["server"]);
    let sidecar_dir = tempfile::tempdir().unwrap();
    let app: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for (cert, ca, expected) in [
        ("intruder", "mesh", uri_of("intruder")),
        ("nameless", "mesh", "carries no SPIFFE ID".to_owned()),
        (
            "rogue-server",
            "mesh",
            "not valid under mesh_tls.ca_file".to_owned(),
        ),
    ] {
        let extra = mesh_tls_yaml(dir, ca, cert, "");
        let mut spec = Spec::new("server", app);
        spec.extra = &extra;
        let yaml = config_yaml(
            &spec,
            &trust,
            sidecar_dir.path(),
            [free_port(), free_port(), free_port()],
        );
        let error = Sidecar::build(Config::from_yaml(&yaml).unwrap())
            .err()
            .unwrap_or_else(|| panic!("{cert} was accepted"))
            .to_string();
        assert!(error.starts_with("mesh_tls.cert_file"), "{error}");
        assert!(error.contains(&expected), "{error}");
    }
}

/// An HTTPS server (HTTP/1.1) with certificate `<name>.crt` of `dir`,
/// answering `secure`.
async fn https_server(dir: &Path, name: &str) -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join(format!("{name}.crt")))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
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
                    Ok::<_, std::convert::Infallible>(Response::new(full("secure")))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_from_the_app_leaves_as_tls_to_an_external_server() {
    let certs = tempfile::tempdir().unwrap();
    tls_certificates(certs.path(), "api.partner.test");
    mesh_ca(certs.path(), "other");
    let https = https_server(certs.path(), "tls").await;
    let trust = Trust::new(&["client"]);
    let app = App::ok().await;
    let ca = certs.path().join("ca.crt");
    let other = certs.path().join("other.crt");
    // By host (any outbound mode), and as an explicit upstream.
    let extra = format!(
        "tls_origination:\n  - {{ host: api.partner.test, ca_file: \"{}\" }}\n  - {{ host: bad.partner.test, server_name: api.partner.test, ca_file: \"{}\" }}",
        ca.display(),
        other.display(),
    );
    let upstreams = format!(
        "\"partner\": {{ address: \"{https}\", tls: {{ server_name: api.partner.test, ca_file: \"{}\" }} }}",
        ca.display()
    );
    let mut spec = Spec::new("client", app.addr);
    spec.upstreams = vec![
        ("api.partner.test".into(), https),
        ("bad.partner.test".into(), https),
    ];
    spec.upstreams_yaml = &upstreams;
    spec.extra = &extra;
    let sc = start(spec, &trust).await;

    for host in ["api.partner.test", "partner"] {
        let resp = call_out(sc.outbound, host, None).await;
        assert_eq!(resp.status(), 200, "{host}");
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"secure");
        let hop = sc
            .wait_hop(|h| h["egress"]["destination"]["host"] == host)
            .await;
        assert_eq!(
            hop["transport_security"],
            "TRANSPORT_SECURITY_TLS_ORIGINATED"
        );
        assert_eq!(hop["transport_error"], "");
    }
    // A server whose certificate does not chain to the configured CA.
    let resp = call_out(sc.outbound, "bad.partner.test", None).await;
    assert_eq!(resp.status(), 502);
    let hop = sc
        .wait_hop(|h| h["egress"]["destination"]["host"] == "bad.partner.test")
        .await;
    assert_eq!(hop["transport_error"], "peer_certificate_untrusted");
    assert_eq!(
        sc.metric("custody_proxy_tls_origination_connections_total{result=\"tls\"}")
            .await,
        2.0
    );
    assert_eq!(
        sc.metric(
            "custody_proxy_tls_origination_connections_total{result=\"peer_certificate_untrusted\"}"
        )
        .await,
        1.0
    );
}

/// Reads the hop events of a JSON-lines file once at least `n` are there.
fn hops_in(path: &Path, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let hops: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if hops.len() >= n {
            return hops;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hop events missing in {}: {text}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Two pods' sidecars (the real binary) in a network namespace, with
/// iptables redirection as a mesh installs it: the client app's calls go
/// to its sidecar's outbound port, and everything for the server's pod
/// address goes to the server sidecar's one inbound port, where mesh mTLS
/// and plaintext meet.
#[test]
fn redirected_traffic_is_mesh_mtls_on_the_one_inbound_port() {
    use crate::transparent::{Netns, run};

    assert_eq!(
        run(&["id", "-u"]).trim(),
        "0",
        "this test creates a network namespace and needs root"
    );
    let certs = mesh_certificates();
    let c = certs.path();
    let trust = Trust::new(&["client", "server"]);
    let dir = tempfile::tempdir().unwrap();
    let name = format!("custody-mesh-{}", std::process::id());
    run(&["ip", "netns", "add", &name]);
    let mut ns = Netns {
        name,
        children: vec![],
    };
    let rules: [&[&str]; 4] = [
        &["ip", "link", "set", "lo", "up"],
        &["ip", "addr", "add", "10.98.0.2/32", "dev", "lo"],
        // The client app (source ports 20000-20100) → its sidecar's outbound.
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.98.0.0/24",
            "--sport",
            "20000:20100",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
        // Anything else for the server pod's app port → the server sidecar's inbound.
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.98.0.2",
            "--dport",
            "8080",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15006",
        ],
    ];
    for args in rules {
        let status = ns.exec(args).status().unwrap();
        assert!(status.success(), "{args:?}");
    }
    std::fs::write(dir.path().join("hello.txt"), "hello from the server pod\n").unwrap();
    let sidecar = |name: &str, ports: [u16; 3], app: u16, mesh: &str| {
        let hops = dir.path().join(format!("{name}.jsonl"));
        let config = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                r#"
workload: {{ trust_domain: {TD}, namespace: test, service_account: {name} }}
listeners: {{ inbound: "127.0.0.1:{}", outbound: "127.0.0.1:{}", admin: "127.0.0.1:{}" }}
inbound: {{ upstream: "127.0.0.1:{app}" }}
outbound: {{ mode: transparent }}
signing: {{ seed_file: "{}" }}
trust: {{ key_set_file: "{}" }}
exporter: {{ jsonl_file: "{}", flush_interval_ms: 20 }}
shutdown: {{ grace_period_secs: 0 }}
{}
"#,
                ports[0],
                ports[1],
                ports[2],
                trust.seed_file(name).display(),
                trust.key_set.display(),
                hops.display(),
                mesh_tls_yaml(c, "mesh", name, mesh),
            ),
        )
        .unwrap();
        (config, hops)
    };
    let (server_config, server_hops) =
        sidecar("server", [15006, 15101, 15020], 8080, "mode: strict");
    let (client_config, client_hops) = sidecar(
        "client",
        [15106, 15001, 15120],
        8081,
        "peers: [\"10.98.0.0/24\"]",
    );
    let served = dir.path().to_str().unwrap().to_owned();
    ns.spawn(&[
        "python3",
        "-m",
        "http.server",
        "8080",
        "--bind",
        "127.0.0.1",
        "--directory",
        &served,
    ]);
    for config in [&server_config, &client_config] {
        ns.spawn(&[
            env!("CARGO_BIN_EXE_custody-proxy"),
            "--config",
            config.to_str().unwrap(),
        ]);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for url in [
        "http://127.0.0.1:15020/ready",
        "http://127.0.0.1:15120/ready",
        "http://127.0.0.1:8080/hello.txt",
    ] {
        while !ns
            .exec(&["curl", "-sf", "--max-time", "2", url])
            .status()
            .unwrap()
            .success()
        {
            assert!(std::time::Instant::now() < deadline, "{url} did not answer");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let curl = |sport: &str| {
        ns.exec(&[
            "curl",
            "-s",
            "--max-time",
            "10",
            "--local-port",
            sport,
            "-w",
            "\n%{http_code}",
            "http://10.98.0.2:8080/hello.txt",
        ])
        .output()
        .unwrap()
    };
    // The client app's call: outbound sidecar → mTLS → redirected to the
    // server sidecar's inbound port → the server app.
    let out = curl("20000-20100");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the server pod\n\n200"
    );
    let inbound = hops_in(&server_hops, 1);
    assert_eq!(inbound[0]["direction"], "DIRECTION_INBOUND");
    assert_eq!(
        inbound[0]["transport_security"],
        "TRANSPORT_SECURITY_MESH_MTLS"
    );
    assert_eq!(inbound[0]["peer_identity"], uri_of("client"));
    assert_eq!(inbound[0]["context_outcome"], "CONTEXT_OUTCOME_PROPAGATED");
    let outbound = hops_in(&client_hops, 1);
    assert_eq!(outbound[0]["direction"], "DIRECTION_OUTBOUND");
    assert_eq!(outbound[0]["peer_identity"], uri_of("server"));
    assert_eq!(outbound[0]["egress"]["destination"]["ip"], "10.98.0.2");
    assert_eq!(outbound[0]["chain_id"], inbound[0]["chain_id"]);

    // Plaintext to the server pod from outside the mesh: strict mode closes it.
    let out = curl("30000-30100");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("000"));
    assert_eq!(hops_in(&server_hops, 1).len(), 1);
}
