//! Mutual TLS between sidecars (`mesh_tls`) and TLS origination to external
//! servers (`tls_origination`, explicit upstreams with `tls`).
//!
//! Every sidecar holds a certificate from the mesh CA whose URI SAN is its
//! workload's SPIFFE ID (`spiffe://<trust_domain>/ns/<ns>/sa/<sa>`); at
//! start the sidecar checks that it names its own workload. The
//! certificate, key and CAs are re-read while running ([`crate::reload::Reloader::watch`]):
//! a new set that passes the same checks is used by every new handshake,
//! connections already open keep theirs, and a set that fails stays out.
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
//! Outbound: a request to a mesh peer goes through the sidecar's
//! [`Tunnel`], which pingora uses as an HTTP CONNECT proxy on a Unix socket.
//! The tunnel opens TCP, then TLS 1.3 with the sidecar's client
//! certificate, verifying that the server's chain ends at the mesh CA and
//! that its SPIFFE ID is in the trust domain (and is the expected one, when
//! configured), answers with that ID, and relays. HTTP runs over it:
//! HTTP/1.1, or HTTP/2 named by ALPN. TLS origination goes the same way
//! with the usual server-name check against its own CA. A failed handshake
//! is answered with the reason and fails the request (502, recorded);
//! nothing is sent in plaintext instead.
//!
//! Streams that are not HTTP (TCP pass-through, database sessions) to a
//! mesh peer do not go through pingora: [`MeshTls::connect_tcp`] opens the
//! same verified mTLS with ALPN [`MESH_TCP_ALPN`] next to [`MESH_ALPN`], and
//! the peer's sidecar ends it with a second acceptor of the set (ALPN
//! [`MESH_TCP_ALPN`] only; [`MeshTls::accept_tcp`]) and relays the stream
//! to its application as TCP.
//!
//! Why a tunnel rather than pingora's own upstream TLS: with the rustls
//! backend, pingora checks a server certificate against DNS or IP names
//! only (or not at all), keeps no SAN in its TLS digest, and its
//! post-handshake hook exists for OpenSSL only, so a SPIFFE ID (a URI SAN)
//! cannot be checked there. Why not a custom L4 connector returning the TLS
//! stream as a "virtual" socket: pingora only reuses a pooled connection
//! whose file descriptor matches the peer's address, which a virtual socket
//! has not, so every request would pay a handshake. Through the tunnel the
//! connection pingora holds is a Unix socket it can match and pool.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use custody_context::workload::WorkloadId;
use pingora::listeners::TlsAccept;
use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::TlsRef;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::sign::{CertifiedKey, SingleCertAndKey};
use tokio_rustls::rustls::{
    self, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use x509_parser::extensions::GeneralName;

use crate::config::{MeshTlsConfig, MeshTlsMode, OriginateTls};
use crate::metrics::{MeshTlsLabels, Metrics, OriginationLabels};
use crate::reload::{Checked, File, Reloader, parse_chain};

/// The ALPN protocol a sidecar offers, next to the HTTP one, when it opens
/// mesh mTLS: how the inbound side tells mesh mTLS from other TLS on one
/// port. It is never selected.
pub const MESH_ALPN: &[u8] = b"custody-mesh";

/// The ALPN protocol a sidecar offers (next to [`MESH_ALPN`]) when mesh
/// mTLS carries a raw TCP stream (TCP pass-through, a database session)
/// rather than HTTP; the peer's sidecar selects it and relays the stream to
/// its application as TCP.
pub const MESH_TCP_ALPN: &[u8] = b"custody-mesh-tcp";

/// Whether a ClientHello's ALPN offer marks it as mesh mTLS.
pub fn offers_mesh(alpn: &[Vec<u8>]) -> bool {
    alpn.iter().any(|p| p == MESH_ALPN)
}

/// Whether a ClientHello's ALPN offer marks it as mesh mTLS carrying a raw
/// TCP stream.
pub fn offers_mesh_tcp(alpn: &[Vec<u8>]) -> bool {
    offers_mesh(alpn) && alpn.iter().any(|p| p == MESH_TCP_ALPN)
}

/// A mesh mTLS connection to a peer's sidecar carrying a raw TCP stream.
pub type MeshTcpStream = tokio_rustls::client::TlsStream<TcpStream>;

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

/// What mesh mTLS verified of an inbound connection's client: stored in
/// the connection's TLS digest, read by the HTTP proxy.
#[derive(Debug)]
pub struct MeshPeerCert {
    /// The client's SPIFFE ID when it is in the trust domain.
    pub spiffe_id: Option<String>,
}

pub use crate::reload::{RefusedSet, Reload};

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

/// One checked set of the sidecar's certificate, key and mesh CAs, with
/// what every new handshake needs (the inbound acceptor, the roots and the
/// certified key for outbound).
pub(crate) struct Material {
    acceptor: Acceptor,
    /// Ends mesh mTLS that carries a raw TCP stream ([`MESH_TCP_ALPN`]).
    tcp_acceptor: tokio_rustls::TlsAcceptor,
    roots: Arc<RootCertStore>,
    certified: Arc<CertifiedKey>,
}

impl Material {
    /// Checks a set: the leaf names `own`, the key matches it, it chains
    /// to one of the CAs (a bundle of several is accepted, as during a CA
    /// roll). `contents` are those of `files` (certificate, key, CA).
    /// Errors name the file at fault.
    fn check(
        contents: &[Vec<u8>],
        files: &[File],
        own: &str,
        prefix: &str,
    ) -> Result<Checked<Self>, String> {
        let cert_field = files[0].named();
        let ca_field = files[2].named();
        let chain = parse_chain(&contents[0], &cert_field)?;
        match spiffe_id(chain[0].as_ref()) {
            Some(id) if id == own => {}
            Some(id) => {
                return Err(format!(
                    "{cert_field}: the certificate's SPIFFE ID {id} is not this workload's ({own})"
                ));
            }
            None => {
                return Err(format!(
                    "{cert_field}: the certificate carries no SPIFFE ID (URI SAN); expected {own}"
                ));
            }
        }
        let (certified, leaf) =
            crate::reload::certified_key(&contents[0], &contents[1], &files[0], &files[1])?;
        let roots = Arc::new(crate::reload::parse_roots(&contents[2], &ca_field)?);
        // The own certificate must be one the peers accept.
        let own_check = WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), provider())
            .build()
            .map_err(|e| format!("{ca_field}: {e}"))?;
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
                return Err(format!("{cert_field}: not valid under {ca_field}: {e}"));
            }
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
            .build()
            .map_err(|e| format!("{ca_field}: {e}"))?;
        let certified = Arc::new(certified);
        let mut tcp = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("mesh_tls: {e}"))?
            .with_client_cert_verifier(Arc::clone(&verifier) as _)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(Arc::clone(&certified))));
        tcp.alpn_protocols = vec![MESH_TCP_ALPN.to_vec()];
        let mut settings = TlsSettings::with_callbacks(Box::new(PeerIdentity {
            prefix: prefix.to_owned(),
        }))
        .map_err(|e| format!("mesh_tls: {e}"))?;
        settings.set_cert_resolver(Arc::new(SingleCertAndKey::from(Arc::clone(&certified))));
        settings.set_client_cert_verifier(verifier);
        settings.enable_h2();
        Ok(Checked {
            material: Material {
                acceptor: settings.build(),
                tcp_acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tcp)),
                roots,
                certified,
            },
            leaf: Some(leaf),
        })
    }
}

/// The mesh's certificates: loaded and checked at start, then replaced
/// while running when the files change (see [`crate::reload::Reloader::watch`]). Every new
/// handshake, inbound or outbound, uses the set in force when it starts.
pub struct MeshTls {
    /// Whether inbound connections that are not mesh mTLS are still served.
    pub mode: MeshTlsMode,
    /// `spiffe://<trust_domain>/`.
    prefix: String,
    /// The set in force, re-read from the files.
    sets: Arc<Reloader<Material>>,
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshTls")
            .field("mode", &self.mode)
            .field("prefix", &self.prefix)
            .field("serial", &self.serial())
            .finish_non_exhaustive()
    }
}

impl MeshTls {
    /// Loads `mesh_tls` and checks that the certificate names `workload`,
    /// of `trust_domain`. Errors name the field at fault.
    pub fn load(
        config: &MeshTlsConfig,
        workload: &WorkloadId,
        trust_domain: &str,
    ) -> Result<Self, String> {
        let own = workload.uri();
        let prefix = format!("spiffe://{trust_domain}/");
        let files = vec![
            File::new("mesh_tls.cert_file", &config.cert_file),
            File::new("mesh_tls.key_file", &config.key_file),
            File::new("mesh_tls.ca_file", &config.ca_file),
        ];
        let check_files = files.clone();
        let check_prefix = prefix.clone();
        let sets = Reloader::load("mesh_tls", files, move |contents| {
            Material::check(contents, &check_files, &own, &check_prefix)
        })?;
        Ok(MeshTls {
            mode: config.mode,
            prefix,
            sets: Arc::new(sets),
        })
    }

    /// The set in force.
    pub(crate) fn current(&self) -> Arc<Material> {
        self.sets.current()
    }

    /// The certificates, re-read from the files ([`Reloader::watch`]
    /// keeps them current).
    pub(crate) fn reloader(&self) -> &Arc<Reloader<Material>> {
        &self.sets
    }

    /// The serial number of the certificate in force (hex, colon-separated).
    pub fn serial(&self) -> String {
        self.sets.leaf().map(|l| l.serial).unwrap_or_default()
    }

    /// When the certificate in force expires, in Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.sets.leaf().map_or(0, |l| l.not_after)
    }

    /// Reads the files once and puts a new, valid set in force
    /// ([`Reloader::reload`]).
    pub fn reload(&self, metrics: &Metrics, last_refused: &mut Option<RefusedSet>) -> Reload {
        self.sets.reload(metrics, last_refused)
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
        // The set in force when the handshake starts.
        let material = self.current();
        let tls =
            match tokio::time::timeout(CONNECT_TIMEOUT, material.acceptor.tls_handshake(stream))
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

    /// Ends mesh mTLS that carries a raw TCP stream ([`MESH_TCP_ALPN`]) on
    /// an inbound connection: the stream and the client's verified SPIFFE
    /// ID; `None` when the handshake fails or the client shows no SPIFFE ID
    /// in the trust domain (counted as [`MeshTls::accept`] counts).
    pub async fn accept_tcp<S>(
        &self,
        stream: S,
        metrics: &Metrics,
    ) -> Option<(tokio_rustls::server::TlsStream<S>, String)>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        // The set in force when the handshake starts.
        let material = self.current();
        let tls = match tokio::time::timeout(CONNECT_TIMEOUT, material.tcp_acceptor.accept(stream))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::info!(message = "mesh mTLS handshake refused", %error, stream = "tcp");
                self.count_inbound(metrics, "handshake_failed");
                return None;
            }
            Err(_) => {
                self.count_inbound(metrics, "handshake_failed");
                return None;
            }
        };
        let id = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| spiffe_id(leaf.as_ref()))
            .filter(|id| id.starts_with(&self.prefix));
        let Some(id) = id else {
            tracing::info!(message = "mesh mTLS client without a SPIFFE ID of the trust domain");
            self.count_inbound(metrics, "identity_refused");
            return None;
        };
        self.count_inbound(metrics, "mtls");
        Some((tls, id))
    }

    /// Opens mesh mTLS carrying a raw TCP stream to the peer's sidecar at
    /// `addr`, with the set in force (so a rotated certificate is used):
    /// TLS 1.3, the sidecar's client certificate, the server's chain
    /// checked against the mesh CA and its SPIFFE ID against `expected`
    /// (any in the trust domain when `None`), ALPN [`MESH_TCP_ALPN`] and
    /// [`MESH_ALPN`]. The stream and the peer's SPIFFE ID, or the reason
    /// label (one of the hop's `transport_error` values); counted either way as
    /// `custody_proxy_mesh_tls_connections_total{direction="outbound"}`.
    pub async fn connect_tcp(
        &self,
        addr: SocketAddr,
        expected: Option<String>,
        metrics: &Metrics,
    ) -> Result<(MeshTcpStream, Option<String>), &'static str> {
        let material = self.current();
        let connect = TlsConnect {
            tls: UpstreamTls::Mesh { expected },
            roots: Arc::clone(&material.roots),
            mesh: Some((self.prefix.as_str(), material)),
            h2: false,
            tcp: true,
            slot: Slot::default(),
            metrics,
        };
        connect.open(addr).await
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
        /// Where its CA is configured: `upstream:<name>` or
        /// `tls_origination:<index>`.
        route: String,
        /// The name sent and checked.
        server_name: ServerName<'static>,
    },
}

impl UpstreamTls {
    /// TLS origination as configured at `route`, naming `host` unless a
    /// server name is set.
    pub(crate) fn originate(tls: &OriginateTls, route: String, host: &str) -> Option<Self> {
        let name = tls.server_name.as_deref().unwrap_or(host).to_owned();
        let server_name = ServerName::try_from(name).ok()?;
        Some(UpstreamTls::Originate { route, server_name })
    }
}

/// What the TLS connection of one request came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// No handshake (yet).
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

/// Response header of the tunnel: the SPIFFE ID the mesh peer proved.
pub const PEER_IDENTITY_HEADER: &str = "x-custody-peer-identity";
/// Response header of the tunnel: why TLS to the upstream failed.
pub const TRANSPORT_ERROR_HEADER: &str = "x-custody-transport-error";
const TLS_HEADER: &str = "x-custody-tls";
const EXPECT_HEADER: &str = "x-custody-expect";
const ROUTE_HEADER: &str = "x-custody-route";
const SERVER_NAME_HEADER: &str = "x-custody-server-name";
const ALPN_HEADER: &str = "x-custody-alpn";

/// The bounded labels of `transport_error`.
const TRANSPORT_ERRORS: [&str; 5] = [
    "peer_certificate_untrusted",
    "peer_identity_mismatch",
    "peer_identity_missing",
    "handshake_failed",
    "connect_failed",
];

/// The transport error label a tunnel answer names, if it is a known one.
pub(crate) fn transport_error(value: &str) -> Option<&'static str> {
    TRANSPORT_ERRORS.iter().copied().find(|l| *l == value)
}

impl UpstreamTls {
    /// The headers of the CONNECT request that asks the tunnel for this TLS
    /// (they are part of pingora's pool key, so pools never mix).
    pub(crate) fn connect_headers(&self, h2: bool) -> std::collections::BTreeMap<String, Vec<u8>> {
        let mut headers = std::collections::BTreeMap::new();
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        headers.insert(ALPN_HEADER.to_owned(), alpn.to_vec());
        match self {
            UpstreamTls::Mesh { expected } => {
                headers.insert(TLS_HEADER.to_owned(), b"mesh".to_vec());
                if let Some(id) = expected {
                    headers.insert(EXPECT_HEADER.to_owned(), id.as_bytes().to_vec());
                }
            }
            UpstreamTls::Originate { route, server_name } => {
                headers.insert(TLS_HEADER.to_owned(), b"originate".to_vec());
                headers.insert(ROUTE_HEADER.to_owned(), route.as_bytes().to_vec());
                headers.insert(
                    SERVER_NAME_HEADER.to_owned(),
                    server_name.to_str().as_bytes().to_vec(),
                );
            }
        }
        headers
    }
}

/// Opens TCP and then TLS to one upstream, verified as [`UpstreamTls`] says.
struct TlsConnect<'a> {
    tls: UpstreamTls,
    roots: Arc<RootCertStore>,
    /// With mesh mTLS: the trust domain's prefix and the set in force.
    mesh: Option<(&'a str, Arc<Material>)>,
    h2: bool,
    /// A raw TCP stream rather than HTTP ([`MESH_TCP_ALPN`]).
    tcp: bool,
    slot: Slot,
    metrics: &'a Metrics,
}

impl TlsConnect<'_> {
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

    fn client_config(&self) -> Result<(ClientConfig, Option<ServerName<'static>>), String> {
        let (spiffe, name) = match (&self.tls, &self.mesh) {
            (UpstreamTls::Mesh { expected }, Some((prefix, _))) => {
                (Some(((*prefix).to_owned(), expected.clone())), None)
            }
            (UpstreamTls::Mesh { .. }, None) => return Err("mesh_tls is not configured".into()),
            (UpstreamTls::Originate { server_name, .. }, _) => (None, Some(server_name.clone())),
        };
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::clone(&self.roots), provider())
                .build()
                .map_err(|e| e.to_string())?;
        let verifier = Arc::new(Verifier {
            webpki,
            spiffe,
            slot: Arc::clone(&self.slot),
        });
        let builder = ClientConfig::builder_with_provider(provider());
        let mut config = match (&self.tls, &self.mesh) {
            (UpstreamTls::Mesh { .. }, Some((_, material))) => builder
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(Arc::clone(
                    &material.certified,
                )))),
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
            UpstreamTls::Mesh { .. } if self.tcp => {
                vec![MESH_TCP_ALPN.to_vec(), MESH_ALPN.to_vec()]
            }
            UpstreamTls::Mesh { .. } => vec![http, MESH_ALPN.to_vec()],
            UpstreamTls::Originate { .. } => vec![http],
        };
        Ok((config, name))
    }

    async fn handshake(
        &self,
        addr: SocketAddr,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, (&'static str, String)> {
        let (config, name) = self.client_config().map_err(|e| ("handshake_failed", e))?;
        // Mesh peers are named by address (no SNI): the SPIFFE ID is checked.
        let name = name.unwrap_or(ServerName::IpAddress(addr.ip().into()));
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| ("connect_failed", e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                let label = match self.slot.lock().map_or(Outcome::Pending, |s| s.clone()) {
                    Outcome::Failed(label) => label,
                    _ => "handshake_failed",
                };
                (label, e.to_string())
            })
    }

    /// The TLS connection and the peer's SPIFFE ID (mesh), or the reason
    /// label; counted either way.
    async fn open(
        &self,
        addr: SocketAddr,
    ) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Option<String>), &'static str> {
        let result = match tokio::time::timeout(CONNECT_TIMEOUT, self.handshake(addr)).await {
            Ok(result) => result,
            Err(_) => Err(("connect_failed", "timed out".to_owned())),
        };
        match result {
            Ok(tls) => {
                self.count(match self.tls {
                    UpstreamTls::Mesh { .. } => "mtls",
                    UpstreamTls::Originate { .. } => "tls",
                });
                let id = match self.slot.lock().map_or(Outcome::Pending, |s| s.clone()) {
                    Outcome::Verified(id) => id,
                    _ => None,
                };
                Ok((tls, id))
            }
            Err((label, error)) => {
                self.count(label);
                tracing::info!(message = "upstream TLS refused", %addr, reason = label, %error);
                Err(label)
            }
        }
    }
}

/// Longest CONNECT request head the tunnel reads.
const MAX_CONNECT_HEAD: usize = 8 * 1024;

/// The sidecar's TLS tunnel, on a Unix socket only pingora's connector
/// (the sidecar itself) uses: pingora reaches a TLS upstream through it as
/// through an HTTP CONNECT proxy, the tunnel opens and verifies the TLS
/// connection and relays. pingora pools these connections (keyed by the
/// socket and the CONNECT headers) and keeps the tunnel's answer, with the
/// verified SPIFFE ID, as the connection's proxy digest, so a request on a
/// pooled connection knows its peer too.
pub struct Tunnel {
    shared: Arc<crate::proxy::Shared>,
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel").finish_non_exhaustive()
    }
}

/// Where a sidecar's tunnel socket goes: `tls-tunnel-<pid>-<random>.sock`
/// in `<tmp>/custody-<uid>/`, a directory of this user only (created 0700,
/// refused when it is anything else). Sockets left there by sidecars that
/// were killed (SIGKILL leaves no chance to remove them) are removed first:
/// a socket file of a process that no longer runs, which nobody answers on.
pub(crate) fn tunnel_socket_path() -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _};
    // /proc/self belongs to the process's effective user.
    let uid = std::fs::metadata("/proc/self")
        .map_err(|e| format!("tls tunnel: cannot read /proc/self: {e}"))?
        .uid();
    let dir = std::env::temp_dir().join(format!("custody-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("tls tunnel: cannot create {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(&dir)
        .map_err(|e| format!("tls tunnel: {}: {e}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "tls tunnel: {} is not a directory of this user only (mode 0700)",
            dir.display()
        ));
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.ends_with(".sock"))
                .and_then(|n| n.strip_prefix("tls-tunnel-"))
                .and_then(|n| n.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            let running = Path::new(&format!("/proc/{pid}")).exists();
            let socket = entry.file_type().is_ok_and(|t| t.is_socket());
            if !running
                && socket
                && std::os::unix::net::UnixStream::connect(&path)
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
            {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::info!(
                        message = "stale tls tunnel socket removed",
                        path = %path.display()
                    ),
                    Err(error) => tracing::warn!(
                        message = "stale tls tunnel socket not removed",
                        path = %path.display(),
                        %error
                    ),
                }
            }
        }
    }
    Ok(dir.join(format!(
        "tls-tunnel-{}-{:016x}.sock",
        std::process::id(),
        rand::random::<u64>()
    )))
}

/// A parsed CONNECT request head: the target and the headers.
fn parse_connect(head: &[u8]) -> Option<(SocketAddr, HashMap<String, String>)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    if first.next()? != "CONNECT" {
        return None;
    }
    let authority = first.next()?;
    let target: SocketAddr = authority.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((target, headers))
}

impl Tunnel {
    /// The tunnel of a sidecar.
    pub fn new(shared: Arc<crate::proxy::Shared>) -> Self {
        Tunnel { shared }
    }

    /// What TLS a CONNECT request asks for: (how, CA, h2); for mesh mTLS,
    /// the CA of `material`, the set in force.
    fn plan(
        &self,
        headers: &HashMap<String, String>,
        material: Option<&Material>,
    ) -> Option<(UpstreamTls, Arc<RootCertStore>, bool)> {
        let h2 = headers.get(ALPN_HEADER).is_some_and(|a| a == "h2");
        match headers.get(TLS_HEADER)?.as_str() {
            "mesh" => {
                let expected = headers.get(EXPECT_HEADER).cloned();
                Some((
                    UpstreamTls::Mesh { expected },
                    Arc::clone(&material?.roots),
                    h2,
                ))
            }
            "originate" => {
                let route = headers.get(ROUTE_HEADER)?;
                let roots = self.shared.origination.route(route)?;
                let server_name =
                    ServerName::try_from(headers.get(SERVER_NAME_HEADER)?.clone()).ok()?;
                Some((
                    UpstreamTls::Originate {
                        route: route.clone(),
                        server_name,
                    },
                    roots,
                    h2,
                ))
            }
            _ => None,
        }
    }

    async fn serve(&self, mut stream: pingora::protocols::Stream) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut head = Vec::with_capacity(512);
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= MAX_CONNECT_HEAD || !matches!(stream.read(&mut byte).await, Ok(1)) {
                return;
            }
            head.push(byte[0]);
        }
        let Some((target, headers)) = parse_connect(&head) else {
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        };
        // The set in force when this connection opens: its certificate and
        // CA for the whole handshake, whatever rotates meanwhile.
        let mesh = self
            .shared
            .mesh
            .as_ref()
            .map(|m| (m.prefix.as_str(), m.current()));
        let Some((tls, roots, h2)) = self.plan(&headers, mesh.as_ref().map(|(_, m)| &**m)) else {
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        };
        let connect = TlsConnect {
            tls,
            roots,
            mesh,
            h2,
            tcp: false,
            slot: Slot::default(),
            metrics: &self.shared.metrics,
        };
        match connect.open(target).await {
            Ok((mut upstream, id)) => {
                let answer = match id {
                    Some(id) => format!("HTTP/1.1 200 OK\r\n{PEER_IDENTITY_HEADER}: {id}\r\n\r\n"),
                    None => "HTTP/1.1 200 OK\r\n\r\n".to_owned(),
                };
                if stream.write_all(answer.as_bytes()).await.is_err()
                    || stream.flush().await.is_err()
                {
                    return;
                }
                // Nothing from the server is relayed before pingora's first
                // bytes: pingora reads this answer with a buffered read and
                // would drop whatever came with it (an HTTP/2 server's
                // SETTINGS, sent at once).
                let mut first = vec![0u8; 16 * 1024];
                let n = match stream.read(&mut first).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if upstream.write_all(&first[..n]).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
            }
            Err(label) => {
                let answer = format!(
                    "HTTP/1.1 502 Bad Gateway\r\n{TRANSPORT_ERROR_HEADER}: {label}\r\ncontent-length: 0\r\n\r\n"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.flush().await;
            }
        }
    }
}

#[async_trait]
impl pingora::apps::ServerApp for Tunnel {
    async fn process_new(
        self: &Arc<Self>,
        stream: pingora::protocols::Stream,
        _shutdown: &pingora::server::ShutdownWatch,
    ) -> Option<pingora::protocols::Stream> {
        self.serve(stream).await;
        None
    }
}

/// The CAs of TLS origination: loaded at start, re-read on change.
#[derive(Debug, Default)]
pub struct OriginationRoots {
    /// For `tls_origination[i]`.
    entries: Vec<Arc<Reloader<RootCertStore>>>,
    /// For explicit upstreams with `tls`, by name.
    upstreams: HashMap<String, Arc<Reloader<RootCertStore>>>,
}

/// A CA file (`<block>.ca_file`), re-read on change.
fn rotating_roots(block: String, ca_file: &Path) -> Result<Reloader<RootCertStore>, String> {
    let file = File::new(format!("{block}.ca_file"), ca_file);
    let named = file.named();
    Reloader::load(block, vec![file], move |contents| {
        Ok(Checked {
            material: crate::reload::parse_roots(&contents[0], &named)?,
            leaf: None,
        })
    })
}

impl OriginationRoots {
    /// Loads every `ca_file` of `config`; errors name the field.
    pub fn load(config: &crate::Config) -> Result<Self, String> {
        let mut roots = OriginationRoots::default();
        for (i, entry) in config.tls_origination.iter().enumerate() {
            roots.entries.push(Arc::new(rotating_roots(
                format!("tls_origination[{i}]"),
                &entry.ca_file,
            )?));
        }
        if let crate::config::OutboundMode::Explicit { upstreams, .. } = &config.outbound {
            for (name, upstream) in upstreams {
                if let Some(tls) = &upstream.tls {
                    let block = format!("outbound.upstreams.{name}.tls");
                    roots
                        .upstreams
                        .insert(name.clone(), Arc::new(rotating_roots(block, &tls.ca_file)?));
                }
            }
        }
        Ok(roots)
    }

    /// The CA in force at `route` (`upstream:<name>` or
    /// `tls_origination:<index>`).
    pub(crate) fn route(&self, route: &str) -> Option<Arc<RootCertStore>> {
        if let Some(name) = route.strip_prefix("upstream:") {
            return self.upstreams.get(name).map(|r| r.current());
        }
        let index: usize = route.strip_prefix("tls_origination:")?.parse().ok()?;
        self.entries.get(index).map(|r| r.current())
    }

    /// Every CA file, with its `reload_interval_ms` in `config`, for
    /// [`Reloader::watch`].
    pub(crate) fn reloaders(
        &self,
        config: &crate::Config,
    ) -> Vec<(Arc<Reloader<RootCertStore>>, u64)> {
        let mut all: Vec<_> = self
            .entries
            .iter()
            .zip(&config.tls_origination)
            .map(|(r, c)| (Arc::clone(r), c.reload_interval_ms))
            .collect();
        if let crate::config::OutboundMode::Explicit { upstreams, .. } = &config.outbound {
            for (name, reloader) in &self.upstreams {
                if let Some(tls) = upstreams.get(name).and_then(|u| u.tls.as_ref()) {
                    all.push((Arc::clone(reloader), tls.reload_interval_ms));
                }
            }
        }
        all
    }
}

#[cfg(test)]
mod tests;
