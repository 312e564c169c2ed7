//! TLS termination for PostgreSQL sessions (`databases[].tls: terminate`).
//!
//! When the client sends `SSLRequest`, the sidecar asks the server the same;
//! if the server agrees, the sidecar opens TLS toward the server (verifying
//! it against the configured CA) and answers the client `S` itself, then
//! accepts the client's TLS with its own certificate. The session between
//! the two TLS ends is decoded like a plaintext one. If the server refuses
//! TLS, the client gets the same refusal and the session goes on in
//! plaintext, as it would have without the sidecar.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The `SSLRequest` packet.
pub(crate) const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Both TLS ends of a terminating sidecar.
pub struct Terminator {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path, field: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))
}

/// Checks that a certificate chain and its key load and match.
pub fn check_certificate(cert_file: &Path, key_file: &Path, field: &str) -> Result<(), String> {
    server_config(cert_file, key_file, field).map(|_| ())
}

fn server_config(cert_file: &Path, key_file: &Path, field: &str) -> Result<ServerConfig, String> {
    let cert_pem = read(cert_file, &format!("{field}.cert_file"))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{field}.cert_file: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{field}.cert_file: no certificate"));
    }
    let key_pem = read(key_file, &format!("{field}.key_file"))?;
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| format!("{field}.key_file: {e}"))?;
    ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{field}: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{field}.key_file: {e}"))
}

impl Terminator {
    /// Loads the certificate and key shown to clients and the CA that the
    /// server's certificate must chain to. `field` prefixes errors.
    pub fn load(
        cert_file: &Path,
        key_file: &Path,
        upstream_ca_file: &Path,
        upstream_server_name: Option<&str>,
        field: &str,
    ) -> Result<Self, String> {
        let server = server_config(cert_file, key_file, field)?;
        let provider = Arc::new(ring::default_provider());
        let ca_pem = read(upstream_ca_file, &format!("{field}.upstream_ca_file"))?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(|e| format!("{field}.upstream_ca_file: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("{field}.upstream_ca_file: {e}"))?;
        }
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{field}: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = upstream_server_name
            .map(|n| {
                ServerName::try_from(n.to_owned())
                    .map_err(|e| format!("{field}.upstream_server_name: {e}"))
            })
            .transpose()?;
        Ok(Terminator {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }
}

/// What came of a client's `SSLRequest`.
pub(crate) enum Negotiated<C, S> {
    /// TLS on both sides.
    Tls(C, S),
    /// The server refused TLS; the client was told so.
    Plain(pingora::protocols::Stream, TcpStream),
}

/// Answers the client's `SSLRequest` (already read) on the server's behalf.
pub(crate) async fn negotiate(
    terminator: &Terminator,
    mut client: pingora::protocols::Stream,
    mut server: TcpStream,
    dest: SocketAddr,
) -> Result<
    Negotiated<
        tokio_rustls::server::TlsStream<pingora::protocols::Stream>,
        tokio_rustls::client::TlsStream<TcpStream>,
    >,
    String,
> {
    server
        .write_all(&SSL_REQUEST)
        .await
        .map_err(|e| format!("server: {e}"))?;
    let mut answer = [0u8; 1];
    server
        .read_exact(&mut answer)
        .await
        .map_err(|e| format!("server: {e}"))?;
    if answer[0] != b'S' {
        client
            .write_all(&answer)
            .await
            .map_err(|e| format!("client: {e}"))?;
        client.flush().await.map_err(|e| format!("client: {e}"))?;
        return Ok(Negotiated::Plain(client, server));
    }
    let name = terminator
        .server_name
        .clone()
        .unwrap_or_else(|| ServerName::IpAddress(dest.ip().into()));
    let server = terminator
        .connector
        .connect(name, server)
        .await
        .map_err(|e| format!("server TLS: {e}"))?;
    client
        .write_all(b"S")
        .await
        .map_err(|e| format!("client: {e}"))?;
    client.flush().await.map_err(|e| format!("client: {e}"))?;
    let client = terminator
        .acceptor
        .accept(client)
        .await
        .map_err(|e| format!("client TLS: {e}"))?;
    Ok(Negotiated::Tls(client, server))
}
