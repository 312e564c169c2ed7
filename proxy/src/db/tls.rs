//! TLS termination for database sessions (`databases[].tls: terminate`).
//!
//! PostgreSQL: when the client sends `SSLRequest`, the sidecar asks the server the same;
//! if the server agrees, the sidecar opens TLS toward the server (verifying
//! it against the configured CA) and answers the client `S` itself, then
//! accepts the client's TLS with its own certificate. The session between
//! the two TLS ends is decoded like a plaintext one. If the server refuses
//! TLS, the client gets the same refusal and the session goes on in
//! plaintext, as it would have without the sidecar.
//!
//! MySQL negotiates TLS inside its handshake ([`negotiate_mysql`]): the
//! greeting and the client's `SSLRequest` pass through unchanged, then the
//! sidecar opens TLS to the server and accepts the client's.
//!
//! Every step of the negotiation is bounded by the database's
//! `tls.handshake_timeout_ms`: a server that never answers `SSLRequest` (or
//! a peer that stalls its handshake) costs the client a closed connection,
//! a hop `tls termination failed: <reason>` and a count in
//! `custody_proxy_db_tls_failures_total`, never a connection held forever.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::sign::SingleCertAndKey;
use tokio_rustls::rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::reload::{Checked, File, Reloader};

/// The `SSLRequest` packet.
pub(crate) const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Both TLS ends of a terminating sidecar, from one set of files.
pub struct Ends {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

/// A terminating sidecar's TLS: the certificate and key shown to clients
/// and the CA the server's certificate must chain to, re-read on change
/// (each session takes the set in force when it starts).
pub struct Terminator {
    sets: Arc<Reloader<Ends>>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("server_name", &self.server_name)
            .field("sets", &self.sets)
            .finish_non_exhaustive()
    }
}

impl Terminator {
    /// Loads the certificate and key shown to clients and the CA that the
    /// server's certificate must chain to. `block` (`databases[0].tls`)
    /// prefixes errors and is the `material` label of its reloads.
    pub fn load(
        cert_file: &Path,
        key_file: &Path,
        upstream_ca_file: &Path,
        upstream_server_name: Option<&str>,
        block: &str,
    ) -> Result<Self, String> {
        let server_name = upstream_server_name
            .map(|n| {
                ServerName::try_from(n.to_owned())
                    .map_err(|e| format!("{block}.upstream_server_name: {e}"))
            })
            .transpose()?;
        let files = vec![
            File::new(format!("{block}.cert_file"), cert_file),
            File::new(format!("{block}.key_file"), key_file),
            File::new(format!("{block}.upstream_ca_file"), upstream_ca_file),
        ];
        let named = files.clone();
        let sets = Reloader::load(block, files, move |contents| {
            let (certified, leaf) =
                crate::reload::certified_key(&contents[0], &contents[1], &named[0], &named[1])?;
            let roots = crate::reload::parse_roots(&contents[2], &named[2].named())?;
            let provider = Arc::new(ring::default_provider());
            let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("{}: {e}", named[0].field))?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
            let client = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("{}: {e}", named[2].field))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Checked {
                material: Ends {
                    acceptor: TlsAcceptor::from(Arc::new(server)),
                    connector: TlsConnector::from(Arc::new(client)),
                },
                leaf: Some(leaf),
            })
        })?;
        Ok(Terminator {
            sets: Arc::new(sets),
            server_name,
        })
    }

    /// The files, re-read on change ([`Reloader::watch`]).
    pub fn reloader(&self) -> &Arc<Reloader<Ends>> {
        &self.sets
    }
}

/// Anything a session's server side can be.
pub(crate) trait ServerIo:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ServerIo for T {}

/// The server side of a session: plain TCP to the database, or mesh mTLS
/// to the sidecar of a mesh peer in front of it.
pub(crate) type TcpStream = Box<dyn ServerIo>;

/// What came of a client's `SSLRequest`.
pub(crate) enum Negotiated<C, S> {
    /// TLS on both sides.
    Tls(C, S),
    /// The server refused TLS; the client was told so.
    Plain(pingora::protocols::Stream, TcpStream),
}

/// Why a terminated TLS negotiation failed. The connection is closed on
/// both sides.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The server did not answer `SSLRequest`, or finish its TLS
    /// handshake, within the configured time.
    ServerTimeout,
    /// The server's connection failed while negotiating.
    ServerIo(std::io::Error),
    /// The server's TLS handshake failed (certificate not trusted, ...).
    ServerTls(std::io::Error),
    /// The client did not finish its TLS handshake in time.
    ClientTimeout,
    /// The client's connection failed while negotiating.
    ClientIo(std::io::Error),
    /// The client's TLS handshake failed.
    ClientTls(std::io::Error),
}

impl Failure {
    /// A bounded label for metrics and hop events.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Failure::ServerTimeout => "server_timeout",
            Failure::ServerIo(_) => "server_io",
            Failure::ServerTls(_) => "server_tls",
            Failure::ClientTimeout => "client_timeout",
            Failure::ClientIo(_) => "client_io",
            Failure::ClientTls(_) => "client_tls",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::ServerTimeout => f.write_str("the server did not answer in time"),
            Failure::ClientTimeout => f.write_str("the client did not finish TLS in time"),
            Failure::ServerIo(e) => write!(f, "server: {e}"),
            Failure::ServerTls(e) => write!(f, "server TLS: {e}"),
            Failure::ClientIo(e) => write!(f, "client: {e}"),
            Failure::ClientTls(e) => write!(f, "client TLS: {e}"),
        }
    }
}

/// `fut` within `limit`, or `timeout`.
async fn bounded<T>(
    limit: Duration,
    timeout: Failure,
    fut: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(timeout))
}

/// Answers the client's PostgreSQL `SSLRequest` (already read) on the
/// server's behalf.
/// Each step (the server's one-byte answer, the server's TLS handshake, the
/// client's TLS handshake) is bounded by `limit`.
pub(crate) async fn negotiate(
    terminator: &Terminator,
    mut client: pingora::protocols::Stream,
    mut server: TcpStream,
    dest: SocketAddr,
    limit: Duration,
) -> Result<
    Negotiated<
        tokio_rustls::server::TlsStream<pingora::protocols::Stream>,
        tokio_rustls::client::TlsStream<TcpStream>,
    >,
    Failure,
> {
    let answer = bounded(limit, Failure::ServerTimeout, async {
        server
            .write_all(&SSL_REQUEST)
            .await
            .map_err(Failure::ServerIo)?;
        let mut answer = [0u8; 1];
        server
            .read_exact(&mut answer)
            .await
            .map_err(Failure::ServerIo)?;
        Ok(answer)
    })
    .await?;
    // The set in force when the negotiation starts, for both ends.
    let ends = terminator.sets.current();
    if answer[0] != b'S' {
        client.write_all(&answer).await.map_err(Failure::ClientIo)?;
        client.flush().await.map_err(Failure::ClientIo)?;
        return Ok(Negotiated::Plain(client, server));
    }
    let name = terminator
        .server_name
        .clone()
        .unwrap_or_else(|| ServerName::IpAddress(dest.ip().into()));
    let server = bounded(limit, Failure::ServerTimeout, async {
        ends.connector
            .connect(name, server)
            .await
            .map_err(Failure::ServerTls)
    })
    .await?;
    client.write_all(b"S").await.map_err(Failure::ClientIo)?;
    client.flush().await.map_err(Failure::ClientIo)?;
    let client = bounded(limit, Failure::ClientTimeout, async {
        ends.acceptor
            .accept(client)
            .await
            .map_err(Failure::ClientTls)
    })
    .await?;
    Ok(Negotiated::Tls(client, server))
}

/// Longest connection-phase packet read while negotiating MySQL TLS.
const MAX_HANDSHAKE_PACKET: usize = 64 * 1024;

/// Reads one MySQL packet (header included), refusing a long one; `None`
/// when the stream ends before its first byte.
async fn read_mysql_packet<R: tokio::io::AsyncRead + Unpin>(
    from: &mut R,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut packet = vec![0u8; 4];
    let mut read = 0;
    while read < 4 {
        match from.read(&mut packet[read..]).await? {
            0 if read == 0 => return Ok(None),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => read += n,
        }
    }
    let len = usize::from(packet[0]) | usize::from(packet[1]) << 8 | usize::from(packet[2]) << 16;
    if len > MAX_HANDSHAKE_PACKET {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "connection-phase packet too long",
        ));
    }
    packet.resize(4 + len, 0);
    from.read_exact(&mut packet[4..]).await?;
    Ok(Some(packet))
}

/// Whether a server greeting (a whole packet) offers TLS (`CLIENT_SSL`).
fn offers_tls(greeting: &[u8]) -> bool {
    let mut session = custody_protocols::mysql::Session::default();
    let mut ignore = |_: custody_protocols::mysql::Event<'_>| {};
    if session.feed_server(greeting, &mut ignore).is_err() {
        return false;
    }
    session
        .greeting()
        .is_some_and(|g| g.capabilities & custody_protocols::mysql::capabilities::SSL != 0)
}

/// Whether a client's first packet is an `SSLRequest`: the fixed 32-byte
/// head of a handshake response with `CLIENT_SSL`, and nothing after it.
fn is_ssl_request(packet: &[u8]) -> bool {
    packet.len() == 4 + 32
        && packet
            .get(4..8)
            .and_then(|caps| caps.try_into().ok())
            .map(u32::from_le_bytes)
            .is_some_and(|caps| caps & custody_protocols::mysql::capabilities::SSL != 0)
}

/// The start of a MySQL session negotiated by a terminating sidecar.
pub(crate) struct MysqlStart<C, S> {
    /// The server's greeting, forwarded to the client unchanged.
    pub greeting: Vec<u8>,
    /// The client's first packet, forwarded to the server: its `SSLRequest`
    /// (TLS) or its handshake response (plaintext).
    pub client_first: Vec<u8>,
    /// The streams the session goes on with.
    pub negotiated: Negotiated<C, S>,
}

/// MySQL negotiates TLS inside its handshake: the server's greeting offers
/// `CLIENT_SSL`, the client answers with an `SSLRequest` packet, then both
/// start TLS. The sidecar forwards the greeting and the `SSLRequest` as they
/// are, opens TLS to the server (verified against the configured CA), then
/// accepts the client's TLS with its own certificate. A greeting without
/// `CLIENT_SSL`, or a client that goes on without TLS, leaves the session in
/// plaintext. Each read and handshake is bounded by `limit`.
pub(crate) async fn negotiate_mysql(
    terminator: &Terminator,
    mut client: pingora::protocols::Stream,
    mut server: TcpStream,
    dest: SocketAddr,
    limit: Duration,
) -> Result<
    MysqlStart<
        tokio_rustls::server::TlsStream<pingora::protocols::Stream>,
        tokio_rustls::client::TlsStream<TcpStream>,
    >,
    Failure,
> {
    let greeting = bounded(limit, Failure::ServerTimeout, async {
        read_mysql_packet(&mut server)
            .await
            .map_err(Failure::ServerIo)?
            .ok_or_else(|| Failure::ServerIo(std::io::ErrorKind::UnexpectedEof.into()))
    })
    .await?;
    client
        .write_all(&greeting)
        .await
        .map_err(Failure::ClientIo)?;
    client.flush().await.map_err(Failure::ClientIo)?;
    if !offers_tls(&greeting) {
        return Ok(MysqlStart {
            greeting,
            client_first: Vec::new(),
            negotiated: Negotiated::Plain(client, server),
        });
    }
    let client_first = bounded(limit, Failure::ClientTimeout, async {
        read_mysql_packet(&mut client)
            .await
            .map_err(Failure::ClientIo)
    })
    .await?;
    let Some(client_first) = client_first else {
        // The client left without a word (a port probe): an ordinary
        // session that ends at once.
        return Ok(MysqlStart {
            greeting,
            client_first: Vec::new(),
            negotiated: Negotiated::Plain(client, server),
        });
    };
    server
        .write_all(&client_first)
        .await
        .map_err(Failure::ServerIo)?;
    if !is_ssl_request(&client_first) {
        return Ok(MysqlStart {
            greeting,
            client_first,
            negotiated: Negotiated::Plain(client, server),
        });
    }
    // The set in force when TLS starts, for both ends.
    let ends = terminator.sets.current();
    let name = terminator
        .server_name
        .clone()
        .unwrap_or_else(|| ServerName::IpAddress(dest.ip().into()));
    let server = bounded(limit, Failure::ServerTimeout, async {
        ends.connector
            .connect(name, server)
            .await
            .map_err(Failure::ServerTls)
    })
    .await?;
    let client = bounded(limit, Failure::ClientTimeout, async {
        ends.acceptor
            .accept(client)
            .await
            .map_err(Failure::ClientTls)
    })
    .await?;
    Ok(MysqlStart {
        greeting,
        client_first,
        negotiated: Negotiated::Tls(client, server),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ssl_request_is_the_short_handshake_response_with_client_ssl() {
        let mut packet = vec![32, 0, 0, 1];
        let caps: u32 = (1 << 9) | (1 << 11) | (1 << 15);
        packet.extend_from_slice(&caps.to_le_bytes());
        packet.resize(4 + 32, 0);
        assert!(is_ssl_request(&packet));
        let mut without_ssl = packet.clone();
        without_ssl[5] &= !(1 << 3);
        assert!(!is_ssl_request(&without_ssl));
        let mut longer = packet.clone();
        longer[0] = 40;
        longer.extend_from_slice(b"custody\0");
        assert!(!is_ssl_request(&longer));
    }
}
