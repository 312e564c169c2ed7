//! Mutual TLS between sidecars (`mesh_tls`) and TLS origination to external
//! servers (`tls_origination`, explicit upstreams with `tls`).
//!
//! Every sidecar holds a certificate from the mesh CA whose URI SAN is its
//! workload's SPIFFE ID (`spiffe://<trust_domain>/ns/<ns>/sa/<sa>`); at
//! start the sidecar checks that it names its own workload.
//!
//! Inbound, on the same port as plaintext: the listener looks at each new
//! connection's first bytes. A TLS ClientHello that offers the ALPN marker
//! [`MESH_ALPN`] (next to `h2` or `http/1.1`) is mesh mTLS, ended here with
//! the sidecar's certificate; the client must show a
//! certificate that chains to the mesh CA and carries a SPIFFE ID in the
//! trust domain. That ID travels with the connection (the TLS digest's
//! extension, [`MeshPeerCert`]) to the HTTP proxy, which records it on each
//! hop as the verified peer. Anything else (plaintext, or TLS of the
//! application's own) is served as without `mesh_tls` in `permissive` mode
//! and closed in `strict` mode.
//!
//! Outbound: a request to a mesh peer gets a pingora peer whose L4
//! connector (`TlsConnect`) opens TCP, then TLS 1.3 with the sidecar's
//! client certificate, verifying that the server's chain ends at the mesh CA
//! and that its SPIFFE ID is in the trust domain (and is the expected one,
//! when configured). HTTP runs over it: HTTP/1.1, or HTTP/2 named by ALPN.
//! TLS origination uses the same connector with the usual server-name check
//! against its own CA. A failed handshake fails the request (502) and is
//! recorded; nothing is sent in plaintext instead.
//!
//! Why an L4 connector rather than pingora's own upstream TLS: with the
//! rustls backend, pingora checks a server certificate against DNS or IP
//! names only (or not at all), keeps no SAN in its TLS digest, and its
//! post-handshake hook exists for OpenSSL only, so a SPIFFE ID (a URI SAN)
//! cannot be checked there.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use custody_context::workload::WorkloadId;
use pingora::connectors::L4Connect;
use pingora::listeners::TlsAccept;
use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::protocols::l4::socket::SocketAddr as AnyAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora::protocols::tls::TlsRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{
    self, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use x509_parser::extensions::GeneralName;

use crate::config::{MeshTlsConfig, MeshTlsMode, OriginateTls};
use crate::metrics::{MeshTlsLabels, Metrics, OriginationLabels};

/// The ALPN protocol a sidecar offers, next to the HTTP one, when it opens
/// mesh mTLS: how the inbound side tells mesh mTLS from other TLS on one
/// port. It is never selected.
pub const MESH_ALPN: &[u8] = b"custody-mesh";

/// Whether a ClientHello's ALPN offer marks it as mesh mTLS.
pub fn offers_mesh(alpn: &[Vec<u8>]) -> bool {
    alpn.iter().any(|p| p == MESH_ALPN)
}

/// Longest wait for TCP and the TLS handshake to an upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The SPIFFE ID of a DER certificate: its first URI SAN starting with
/// `spiffe://`.
pub fn spiffe_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_owned()),
        _ => None,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read(path: &Path, field: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))
}

/// The certificates of a PEM file, at least one.
fn load_chain(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, field)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{field}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{field}: no certificate in {}", path.display()));
    }
    Ok(chain)
}

/// A root store of the CA certificates in a PEM file.
pub fn load_roots(path: &Path, field: &str) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_chain(path, field)? {
        roots.add(cert).map_err(|e| format!("{field}: {e}"))?;
    }
    Ok(Arc::new(roots))
}

/// What mesh mTLS verified of an inbound connection's client: stored in
/// the connection's TLS digest, read by the HTTP proxy.
#[derive(Debug)]
pub struct MeshPeerCert {
    /// The client's SPIFFE ID when it is in the trust domain.
    pub spiffe_id: Option<String>,
}

/// Reads the client's SPIFFE ID once the inbound handshake is done.
struct PeerIdentity {
    prefix: String,
}

#[async_trait]
impl TlsAccept for PeerIdentity {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let spiffe_id = tls
            .peer_certificate_der()
            .and_then(spiffe_id)
            .filter(|id| id.starts_with(&self.prefix));
        Some(Arc::new(MeshPeerCert { spiffe_id }))
    }
}

/// The mesh's certificates, loaded and checked at start.
pub struct MeshTls {
    /// Whether inbound connections that are not mesh mTLS are still served.
    pub mode: MeshTlsMode,
    acceptor: Acceptor,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// `spiffe://<trust_domain>/`.
    prefix: String,
    /// The SPIFFE ID each upstream address last proved, for requests on a
    /// pooled connection (which make no handshake of their own).
    verified: Mutex<HashMap<SocketAddr, String>>,
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshTls")
            .field("mode", &self.mode)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Upstream addresses whose proven identity is remembered at most.
const MAX_REMEMBERED: usize = 4096;

impl MeshTls {
    /// Loads `mesh_tls` and checks that the certificate names `workload`,
    /// of `trust_domain`. Errors name the field at fault.
    pub fn load(
        config: &MeshTlsConfig,
        workload: &WorkloadId,
        trust_domain: &str,
    ) -> Result<Self, String> {
        let chain = load_chain(&config.cert_file, "mesh_tls.cert_file")?;
        let own = workload.uri();
        match spiffe_id(chain[0].as_ref()) {
            Some(id) if id == own => {}
            Some(id) => {
                return Err(format!(
                    "mesh_tls.cert_file: the certificate's SPIFFE ID {id} is not this workload's ({own})"
                ));
            }
            None => {
                return Err(format!(
                    "mesh_tls.cert_file: the certificate carries no SPIFFE ID (URI SAN); expected {own}"
                ));
            }
        }
        let key_pem = read(&config.key_file, "mesh_tls.key_file")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("mesh_tls.key_file: {e}"))?;
        crate::db::check_certificate(&config.cert_file, &config.key_file, "mesh_tls")?;
        let roots = load_roots(&config.ca_file, "mesh_tls.ca_file")?;
        let prefix = format!("spiffe://{trust_domain}/");
        // The own certificate must be one the peers accept.
        let own_check = WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), provider())
            .build()
            .map_err(|e| format!("mesh_tls.ca_file: {e}"))?;
        match own_check.verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            &[],
            UnixTime::now(),
        ) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => {
                return Err(format!(
                    "mesh_tls.cert_file: not valid under mesh_tls.ca_file: {e}"
                ));
            }
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
            .build()
            .map_err(|e| format!("mesh_tls.ca_file: {e}"))?;
        let mut settings = TlsSettings::with_callbacks(Box::new(PeerIdentity {
            prefix: prefix.clone(),
        }))
        .map_err(|e| format!("mesh_tls: {e}"))?;
        settings
            .set_certificate_chain_file(&config.cert_file.to_string_lossy())
            .map_err(|e| format!("mesh_tls.cert_file: {e}"))?;
        settings
            .set_private_key_file(&config.key_file.to_string_lossy())
            .map_err(|e| format!("mesh_tls.key_file: {e}"))?;
        settings.set_client_cert_verifier(verifier);
        settings.enable_h2();
        Ok(MeshTls {
            mode: config.mode,
            acceptor: settings.build(),
            roots,
            chain,
            key,
            prefix,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Ends mesh mTLS on an inbound connection; `None` when the handshake
    /// fails or the client shows no SPIFFE ID in the trust domain (counted).
    pub async fn accept(
        &self,
        stream: L4Stream,
        metrics: &Metrics,
    ) -> Option<pingora::protocols::tls::TlsStream<L4Stream>> {
        let count = |result| {
            metrics
                .mesh_tls_connections
                .get_or_create(&MeshTlsLabels {
                    direction: "inbound",
                    result,
                })
                .inc();
        };
        let tls = match tokio::time::timeout(CONNECT_TIMEOUT, self.acceptor.tls_handshake(stream))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::info!(message = "mesh mTLS handshake refused", %error);
                count("handshake_failed");
                return None;
            }
            Err(_) => {
                count("handshake_failed");
                return None;
            }
        };
        let verified = tls
            .ssl_digest()
            .and_then(|d| {
                d.extension
                    .get::<MeshPeerCert>()
                    .map(|p| p.spiffe_id.is_some())
            })
            .unwrap_or(false);
        if !verified {
            tracing::info!(message = "mesh mTLS client without a SPIFFE ID of the trust domain");
            count("identity_refused");
            return None;
        }
        count("mtls");
        Some(tls)
    }

    /// Counts an inbound connection that is not mesh mTLS: `plaintext`,
    /// `plaintext_refused`, `tls_passthrough` or `tls_refused`.
    pub fn count_inbound(&self, metrics: &Metrics, result: &'static str) {
        metrics
            .mesh_tls_connections
            .get_or_create(&MeshTlsLabels {
                direction: "inbound",
                result,
            })
            .inc();
    }

    fn remember(&self, addr: SocketAddr, id: &str) {
        if let Ok(mut map) = self.verified.lock() {
            if map.len() >= MAX_REMEMBERED && !map.contains_key(&addr) {
                map.clear();
            }
            map.insert(addr, id.to_owned());
        }
    }

    /// The SPIFFE ID `addr` proved on its last mesh connection.
    pub(crate) fn proven(&self, addr: SocketAddr) -> Option<String> {
        self.verified.lock().ok()?.get(&addr).cloned()
    }
}

/// How an upstream is reached over TLS.
#[derive(Clone, Debug)]
pub(crate) enum UpstreamTls {
    /// Mesh mTLS, with the SPIFFE ID the server must show (any in the trust
    /// domain when `None`).
    Mesh {
        /// The expected SPIFFE ID.
        expected: Option<String>,
    },
    /// TLS origination to an external server.
    Originate {
        /// Its CA.
        roots: Arc<RootCertStore>,
        /// The name sent and checked.
        server_name: ServerName<'static>,
    },
}

impl UpstreamTls {
    /// TLS origination as configured, naming `host` unless a server name is set.
    pub(crate) fn originate(
        tls: &OriginateTls,
        roots: &Arc<RootCertStore>,
        host: &str,
    ) -> Option<Self> {
        let name = tls.server_name.as_deref().unwrap_or(host).to_owned();
        let server_name = ServerName::try_from(name).ok()?;
        Some(UpstreamTls::Originate {
            roots: Arc::clone(roots),
            server_name,
        })
    }

    /// A pool key for pingora's connection reuse: connections of different
    /// TLS settings (and plaintext ones, key 0) never mix.
    pub(crate) fn group_key(&self, h2: bool) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        h2.hash(&mut hasher);
        match self {
            UpstreamTls::Mesh { expected } => ("mesh", expected).hash(&mut hasher),
            UpstreamTls::Originate { server_name, .. } => {
                ("originate", server_name.to_str()).hash(&mut hasher);
            }
        }
        hasher.finish() | 1
    }
}

/// What the TLS connection of one request came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// No handshake (yet): a pooled connection was reused, or none was made.
    #[default]
    Pending,
    /// Handshake done; the server's SPIFFE ID for mesh peers.
    Verified(Option<String>),
    /// Failed, with the bounded reason label.
    Failed(&'static str),
}

/// Records what the verifier concluded.
type Slot = Arc<Mutex<Outcome>>;

fn set(slot: &Slot, outcome: Outcome) {
    if let Ok(mut s) = slot.lock() {
        *s = outcome;
    }
}

/// Verifies a server's certificate: the chain against the CA, then either
/// the server name (origination) or the SPIFFE ID (mesh).
#[derive(Debug)]
struct Verifier {
    webpki: Arc<WebPkiServerVerifier>,
    /// For mesh peers: (`spiffe://<td>/`, the expected ID).
    spiffe: Option<(String, Option<String>)>,
    slot: Slot,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain =
            self.webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let Some((prefix, expected)) = &self.spiffe else {
            match &chain {
                Ok(_) => set(&self.slot, Outcome::Verified(None)),
                Err(_) => set(&self.slot, Outcome::Failed("peer_certificate_untrusted")),
            }
            return chain;
        };
        // The chain is checked before the name: a name error means the
        // chain is good. Mesh certificates name a SPIFFE ID, not a host.
        match chain {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => {
                set(&self.slot, Outcome::Failed("peer_certificate_untrusted"));
                return Err(e);
            }
        }
        let refuse = |label| {
            set(&self.slot, Outcome::Failed(label));
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        };
        let Some(id) = spiffe_id(end_entity.as_ref()) else {
            return refuse("peer_identity_missing");
        };
        if !id.starts_with(prefix.as_str()) || expected.as_ref().is_some_and(|e| *e != id) {
            tracing::info!(message = "mesh peer shows another identity", peer_identity = %id, expected = ?expected);
            return refuse("peer_identity_mismatch");
        }
        set(&self.slot, Outcome::Verified(Some(id)));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A TLS client connection as a pingora "virtual" socket, so HTTP/1.1 or
/// HTTP/2 run over it like over TCP.
#[derive(Debug)]
struct TlsSocket(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncRead for TlsSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl VirtualSocket for TlsSocket {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> std::io::Result<()> {
        match opt {
            VirtualSockOpt::NoDelay => self.0.get_ref().0.set_nodelay(true),
            _ => Ok(()),
        }
    }
}

/// The L4 connector of one request to a TLS upstream: TCP, then TLS
/// verified as [`UpstreamTls`] says.
pub(crate) struct TlsConnect {
    tls: UpstreamTls,
    mesh: Option<Arc<MeshTls>>,
    h2: bool,
    slot: Slot,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for TlsConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnect")
            .field("tls", &self.tls)
            .field("h2", &self.h2)
            .finish_non_exhaustive()
    }
}

impl TlsConnect {
    /// A connector for one request; `h2` when HTTP/2 will run over it.
    pub(crate) fn new(
        tls: UpstreamTls,
        mesh: Option<Arc<MeshTls>>,
        h2: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        TlsConnect {
            tls,
            mesh,
            h2,
            slot: Slot::default(),
            metrics,
        }
    }

    /// Where the outcome of the handshake is written.
    pub(crate) fn outcome(&self) -> Arc<Mutex<Outcome>> {
        Arc::clone(&self.slot)
    }

    fn count(&self, result: &'static str) {
        match self.tls {
            UpstreamTls::Mesh { .. } => self
                .metrics
                .mesh_tls_connections
                .get_or_create(&MeshTlsLabels {
                    direction: "outbound",
                    result,
                })
                .inc(),
            UpstreamTls::Originate { .. } => self
                .metrics
                .tls_origination_connections
                .get_or_create(&OriginationLabels { result })
                .inc(),
        };
    }

    fn client_config(&self) -> Result<(ClientConfig, ServerName<'static>), String> {
        let (roots, spiffe, name) = match (&self.tls, &self.mesh) {
            (UpstreamTls::Mesh { expected }, Some(mesh)) => (
                Arc::clone(&mesh.roots),
                Some((mesh.prefix.clone(), expected.clone())),
                None,
            ),
            (UpstreamTls::Mesh { .. }, None) => return Err("mesh_tls is not configured".into()),
            (UpstreamTls::Originate { roots, server_name }, _) => {
                (Arc::clone(roots), None, Some(server_name.clone()))
            }
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| e.to_string())?;
        let verifier = Arc::new(Verifier {
            webpki,
            spiffe,
            slot: Arc::clone(&self.slot),
        });
        let builder = ClientConfig::builder_with_provider(provider());
        let mut config = match (&self.tls, &self.mesh) {
            (UpstreamTls::Mesh { .. }, Some(mesh)) => builder
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_auth_cert(mesh.chain.clone(), mesh.key.clone_key())
                .map_err(|e| e.to_string())?,
            _ => builder
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth(),
        };
        let http = if self.h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        };
        config.alpn_protocols = match self.tls {
            UpstreamTls::Mesh { .. } => vec![http, MESH_ALPN.to_vec()],
            UpstreamTls::Originate { .. } => vec![http],
        };
        // Mesh peers are named by address: no SNI, the SPIFFE ID is checked.
        let name = name.unwrap_or(ServerName::IpAddress(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
        ));
        Ok((config, name))
    }

    async fn handshake(&self, addr: SocketAddr) -> Result<L4Stream, (&'static str, String)> {
        let (config, name) = self.client_config().map_err(|e| ("handshake_failed", e))?;
        let name = match name {
            ServerName::IpAddress(_) => ServerName::IpAddress(addr.ip().into()),
            other => other,
        };
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| ("connect_failed", e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                let label = match self.slot.lock().map_or(Outcome::Pending, |s| s.clone()) {
                    Outcome::Failed(label) => label,
                    _ => "handshake_failed",
                };
                (label, e.to_string())
            })?;
        Ok(VirtualSocketStream::new(Box::new(TlsSocket(tls))).into())
    }
}

#[async_trait]
impl L4Connect for TlsConnect {
    async fn connect(&self, addr: &AnyAddr) -> pingora::Result<L4Stream> {
        let Some(addr) = addr.as_inet().copied() else {
            return Err(pingora::Error::explain(
                pingora::ErrorType::ConnectError,
                "TLS upstream is not an internet address",
            ));
        };
        let result = match tokio::time::timeout(CONNECT_TIMEOUT, self.handshake(addr)).await {
            Ok(result) => result,
            Err(_) => Err(("connect_failed", "timed out".to_owned())),
        };
        match result {
            Ok(stream) => {
                let outcome = self.slot.lock().map_or(Outcome::Pending, |s| s.clone());
                if let (Some(mesh), Outcome::Verified(Some(id))) = (&self.mesh, &outcome) {
                    mesh.remember(addr, id);
                }
                self.count(match self.tls {
                    UpstreamTls::Mesh { .. } => "mtls",
                    UpstreamTls::Originate { .. } => "tls",
                });
                Ok(stream)
            }
            Err((label, error)) => {
                set(&self.slot, Outcome::Failed(label));
                self.count(label);
                tracing::info!(message = "upstream TLS refused", %addr, reason = label, %error);
                let mut e = pingora::Error::explain(
                    if label == "connect_failed" {
                        pingora::ErrorType::ConnectError
                    } else {
                        pingora::ErrorType::TLSHandshakeFailure
                    },
                    format!("upstream TLS to {addr}: {label}"),
                );
                e.set_retry(false);
                Err(e)
            }
        }
    }
}

/// The CAs of TLS origination, loaded at start.
#[derive(Debug, Default)]
pub struct OriginationRoots {
    /// For `tls_origination[i]`.
    entries: Vec<Arc<RootCertStore>>,
    /// For explicit upstreams with `tls`, by name.
    upstreams: HashMap<String, Arc<RootCertStore>>,
}

impl OriginationRoots {
    /// Loads every `ca_file` of `config`; errors name the field.
    pub fn load(config: &crate::Config) -> Result<Self, String> {
        let mut roots = OriginationRoots::default();
        for (i, entry) in config.tls_origination.iter().enumerate() {
            roots.entries.push(load_roots(
                &entry.ca_file,
                &format!("tls_origination[{i}].ca_file"),
            )?);
        }
        if let crate::config::OutboundMode::Explicit { upstreams, .. } = &config.outbound {
            for (name, upstream) in upstreams {
                if let Some(tls) = &upstream.tls {
                    let field = format!("outbound.upstreams.{name}.tls.ca_file");
                    roots
                        .upstreams
                        .insert(name.clone(), load_roots(&tls.ca_file, &field)?);
                }
            }
        }
        Ok(roots)
    }

    /// The CA of `tls_origination[index]`.
    pub(crate) fn entry(&self, index: usize) -> Option<&Arc<RootCertStore>> {
        self.entries.get(index)
    }

    /// The CA of the explicit upstream `name`.
    pub(crate) fn upstream(&self, name: &str) -> Option<&Arc<RootCertStore>> {
        self.upstreams.get(name)
    }
}

#[cfg(test)]
mod tests;
