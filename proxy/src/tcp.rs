//! Connections that are not HTTP: sniffed, passed through as TCP, recorded.
//!
//! Each new connection on the inbound and outbound listeners is classified
//! by its first bytes: an HTTP/1 method or the HTTP/2 preface goes to the
//! HTTP proxy; anything else is copied both ways to its destination (the
//! local application inbound; the original destination outbound) and becomes
//! a hop with protocol `TCP`. Protocols where the server speaks first
//! (MySQL, SMTP) send nothing to sniff: their ports are listed in
//! `tcp_ports` and skip sniffing. Outbound TCP is subject to egress policy by
//! address and port, with the chain of the inbound request in flight. TLS is
//! recognised by its ClientHello, whose server name (SNI) is the host the
//! egress policy matches; the hop's protocol is then `TLS_OPAQUE`. With
//! `mesh_tls`, outbound TCP to a mesh peer is wrapped in mesh mTLS, and
//! inbound mesh mTLS carrying TCP (ALPN `custody-mesh-tcp`) is ended here
//! and relayed to the application.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use custody_context::api::{SCHEMA_VERSION, v1};
use custody_context::hop::HopEvent;
use custody_context::policy::{ChainFacts, Decision, DestinationFacts, Verdict};
use custody_context::token::InitiatorKind;
use custody_context::traceparent::SpanId;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;

use crate::config::{DatabaseConfig, DatabaseProtocol, MeshTlsMode, OutboundMode};
use crate::inflight::Stitch;
use crate::metrics::{RequestLabels, VerdictLabels};
use crate::proxy::{Direction, DirectionProxy, Shared};

/// How long a new connection may stay silent before it is dropped (the
/// HTTP keep-alive idle time).
const IDLE: Duration = Duration::from_secs(60);

/// The first bytes of an HTTP/1 request or of the HTTP/2 preface.
fn looks_like_http(head: &[u8; 4]) -> bool {
    const STARTS: [&[u8; 4]; 10] = [
        b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"PATC", b"OPTI", b"CONN", b"TRAC", b"PRI ",
    ];
    STARTS.contains(&head)
}

/// Longest TLS ClientHello record read for its server name.
const MAX_HELLO: usize = 16 * 1024 + 5;

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Some(head)
}

fn u16_at(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

/// The extensions (type, data) of a TLS ClientHello record; `None` when the
/// record is not a whole ClientHello.
fn client_hello_extensions(record: &[u8]) -> Option<Vec<(usize, &[u8])>> {
    let mut buf = record;
    let header = take(&mut buf, 5)?;
    if header[0] != 0x16 {
        return None;
    }
    let mut hs = take(&mut buf, u16_at(&header[3..5]))?;
    let hs_header = take(&mut hs, 4)?;
    if hs_header[0] != 0x01 {
        return None;
    }
    take(&mut hs, 2 + 32)?; // version, random
    let n = usize::from(take(&mut hs, 1)?[0]);
    take(&mut hs, n)?; // session id
    let n = u16_at(take(&mut hs, 2)?);
    take(&mut hs, n)?; // cipher suites
    let n = usize::from(take(&mut hs, 1)?[0]);
    take(&mut hs, n)?; // compression methods
    let n = u16_at(take(&mut hs, 2)?);
    let mut exts = take(&mut hs, n)?;
    let mut found = Vec::new();
    while !exts.is_empty() {
        let kind = u16_at(take(&mut exts, 2)?);
        let n = u16_at(take(&mut exts, 2)?);
        found.push((kind, take(&mut exts, n)?));
    }
    Some(found)
}

/// The server name (SNI) of a TLS ClientHello record, lowercased; `None`
/// when the record is not a ClientHello or names no server.
pub fn client_hello_sni(record: &[u8]) -> Option<String> {
    let (_, mut data) = client_hello_extensions(record)?
        .into_iter()
        .find(|(kind, _)| *kind == 0)?;
    let n = u16_at(take(&mut data, 2)?);
    let mut list = take(&mut data, n)?;
    while !list.is_empty() {
        let name_type = take(&mut list, 1)?[0];
        let n = u16_at(take(&mut list, 2)?);
        let name = take(&mut list, n)?;
        if name_type == 0 {
            let name = std::str::from_utf8(name).ok()?;
            return Some(name.to_ascii_lowercase());
        }
    }
    None
}

/// The protocols a TLS ClientHello record offers by ALPN, in its order;
/// empty when it offers none or is not a ClientHello.
pub fn client_hello_alpn(record: &[u8]) -> Vec<Vec<u8>> {
    let parse = || {
        let (_, mut data) = client_hello_extensions(record)?
            .into_iter()
            .find(|(kind, _)| *kind == 16)?;
        let n = u16_at(take(&mut data, 2)?);
        let mut list = take(&mut data, n)?;
        let mut protocols = Vec::new();
        while !list.is_empty() {
            let n = usize::from(take(&mut list, 1)?[0]);
            protocols.push(take(&mut list, n)?.to_vec());
        }
        Some(protocols)
    };
    parse().unwrap_or_default()
}

/// Evaluates egress policy for a connection to `dest` (named `host` by SNI,
/// when known) made by the chain of `stitch`, and counts the verdict. The
/// chain's taint includes what it touched in this pod.
pub(crate) fn egress_decision(
    shared: &Shared,
    dest: SocketAddr,
    host: Option<&str>,
    stitch: Option<&Stitch>,
) -> (Decision, v1::Destination) {
    let claims = stitch.map(|s| &s.request.token.claims);
    let mut taint = claims.map(|c| c.custody.taint.clone());
    if let (Some(c), Some(taint)) = (claims, taint.as_mut()) {
        taint.extend(shared.taint.missing_from(c.txn, &c.custody.taint));
    }
    let decision = shared.policy.current().evaluate(
        &DestinationFacts {
            host,
            ip: Some(dest.ip()),
            port: dest.port(),
        },
        &ChainFacts {
            initiator_kind: Some(claims.map_or(InitiatorKind::Service, |c| c.custody.ini)),
            principal: Some(claims.map_or(shared.workload_uri.as_str(), |c| c.sub.as_str())),
            service: Some(&shared.workload_uri),
            taint: taint.as_ref(),
        },
    );
    shared
        .metrics
        .egress_verdicts
        .get_or_create(&VerdictLabels {
            verdict: decision.verdict.as_str(),
            policy: decision.policy.clone().unwrap_or_else(|| "default".into()),
        })
        .inc();
    let destination = v1::Destination {
        host: host.unwrap_or_default().to_owned(),
        ip: dest.ip().to_string(),
        port: u32::from(dest.port()),
    };
    (decision, destination)
}

/// A listener app: HTTP to the proxy, everything else through as TCP.
pub struct Sniffing {
    http: Arc<HttpProxy<DirectionProxy>>,
    shared: Arc<Shared>,
    direction: Direction,
}

impl std::fmt::Debug for Sniffing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sniffing")
            .field("direction", &self.direction)
            .finish_non_exhaustive()
    }
}

impl Sniffing {
    /// Wraps the HTTP proxy of `direction`.
    pub fn new(http: HttpProxy<DirectionProxy>, shared: Arc<Shared>, direction: Direction) -> Self {
        Sniffing {
            http: Arc::new(http),
            shared,
            direction,
        }
    }

    /// Peeks a whole TLS record (left in the stream).
    async fn peek_record(stream: &mut Stream) -> Option<Vec<u8>> {
        let mut header = [0u8; 5];
        tokio::time::timeout(IDLE, stream.try_peek(&mut header))
            .await
            .ok()?
            .ok()?;
        let len = 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_HELLO {
            return None;
        }
        let mut record = vec![0u8; len];
        tokio::time::timeout(IDLE, stream.try_peek(&mut record))
            .await
            .ok()?
            .ok()?;
        Some(record)
    }

    /// Peeks a whole TLS ClientHello record (left in the stream) for its SNI.
    async fn peek_sni(stream: &mut Stream) -> Option<String> {
        client_hello_sni(&Self::peek_record(stream).await?)
    }

    fn original_dst(stream: &Stream) -> Option<SocketAddr> {
        stream
            .get_socket_digest()
            .and_then(|d| d.original_dst().and_then(|a| a.as_inet()).copied())
    }

    fn destination(&self, stream: &Stream) -> Option<SocketAddr> {
        match self.direction {
            Direction::Inbound => Some(self.shared.config.inbound.upstream),
            Direction::Outbound => match &self.shared.config.outbound {
                OutboundMode::Transparent => Self::original_dst(stream),
                OutboundMode::Explicit { .. } => None,
            },
        }
    }

    /// Whether the connection's first 8 bytes are a PostgreSQL startup packet.
    async fn peeks_postgres(&self, stream: &mut Stream) -> bool {
        let mut head = [0u8; 8];
        matches!(
            tokio::time::timeout(IDLE, stream.try_peek(&mut head)).await,
            Ok(Ok(true)) if crate::db::looks_like_postgres(&head)
        )
    }

    /// A database session to `dest`, with the chain in flight for its
    /// egress check.
    async fn database(&self, stream: Stream, dest: SocketAddr, database: DatabaseConfig) {
        let stitch = self.shared.inflight.stitch();
        let egress = egress_decision(&self.shared, dest, None, stitch.as_ref());
        crate::db::serve(
            Arc::clone(&self.shared),
            &database,
            stream,
            dest,
            Some(egress),
            stitch,
        )
        .await;
    }

    async fn pass_through(&self, stream: Stream, dest: Option<SocketAddr>, sni: Option<String>) {
        let src = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        self.relay(stream, src, dest, sni, None).await;
    }

    /// Copies `stream` both ways to `dest` and records the hop. Inbound,
    /// `mesh_peer` is the SPIFFE ID mesh mTLS verified of the client.
    /// Outbound, a destination that is a mesh peer is reached over mesh
    /// mTLS ([`crate::mesh::MeshTls::connect_tcp`]), never in plaintext.
    async fn relay<S>(
        &self,
        mut stream: S,
        src: Option<SocketAddr>,
        dest: Option<SocketAddr>,
        sni: Option<String>,
        mesh_peer: Option<String>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let shared = &self.shared;
        let started = Instant::now();
        let start_unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        // The chain this connection belongs to, when an inbound request is in flight.
        let stitch = match self.direction {
            Direction::Outbound => shared.inflight.stitch(),
            Direction::Inbound => None,
        };
        let claims = stitch.as_ref().map(|s| &s.request.token.claims);
        let egress = match (self.direction, dest) {
            (Direction::Outbound, Some(dest)) => Some(egress_decision(
                shared,
                dest,
                sni.as_deref(),
                stitch.as_ref(),
            )),
            _ => None,
        };
        let blocked = egress
            .as_ref()
            .is_some_and(|(d, _)| d.verdict == Verdict::Block);
        let (mut bytes_in, mut bytes_out) = (0, 0);
        let mut transport = match mesh_peer {
            Some(_) => v1::TransportSecurity::MeshMtls,
            None => v1::TransportSecurity::Plaintext,
        };
        let mut peer_identity = mesh_peer;
        let mut transport_error = "";
        if !blocked && let Some(dest) = dest {
            let mesh = match self.direction {
                Direction::Outbound => mesh_peer_of(shared, dest, sni.as_deref()),
                Direction::Inbound => None,
            };
            let copied = match mesh {
                Some((mesh, expected)) => {
                    match mesh.connect_tcp(dest, expected, &shared.metrics).await {
                        Ok((mut upstream, id)) => {
                            transport = v1::TransportSecurity::MeshMtls;
                            peer_identity = id;
                            copy_both(&mut stream, &mut upstream).await
                        }
                        Err(label) => {
                            transport_error = label;
                            tracing::info!(
                                message = "tcp to a mesh peer refused: mesh mTLS failed",
                                %dest,
                                reason = label
                            );
                            None
                        }
                    }
                }
                None => match tokio::net::TcpStream::connect(dest).await {
                    Ok(mut upstream) => copy_both(&mut stream, &mut upstream).await,
                    Err(error) => {
                        tracing::info!(message = "tcp upstream unreachable", %dest, %error);
                        None
                    }
                },
            };
            if let Some((up, down)) = copied {
                (bytes_in, bytes_out) = (up, down);
            }
        }
        shared
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                direction: match self.direction {
                    Direction::Inbound => "inbound",
                    Direction::Outbound => "outbound",
                },
                protocol: if sni.is_some() { "tls" } else { "tcp" },
                status_class: "none",
            })
            .inc();
        let hop = HopEvent {
            schema_version: SCHEMA_VERSION,
            event_id: custody_context::traceparent::random_event_id(),
            chain_id: claims.map(|c| c.txn.to_string()).unwrap_or_default(),
            span_id: SpanId::random().to_string(),
            parent_span_id: stitch
                .as_ref()
                .map(|s| s.request.span.parent_id.to_string())
                .unwrap_or_default(),
            workload: Some((&shared.workload).into()),
            direction: match self.direction {
                Direction::Inbound => v1::Direction::Inbound,
                Direction::Outbound => v1::Direction::Outbound,
            } as i32,
            protocol: if sni.is_some() {
                v1::Protocol::TlsOpaque
            } else {
                v1::Protocol::Tcp
            } as i32,
            operation: if sni.is_some() { "tls" } else { "tcp" }.into(),
            initiator: claims.map(|c| v1::Initiator {
                subject: c.sub.clone(),
                kind: v1::InitiatorKind::from(c.custody.ini) as i32,
                actors: c.actors().into_iter().map(str::to_owned).collect(),
                scope: c.scope.clone(),
            }),
            workloads: claims.map(|c| c.req_wl.clone()).unwrap_or_default(),
            attribution: Some(match &stitch {
                Some(s) => (&custody_context::token::HopAttribution::stitched(s.confidence)).into(),
                None => v1::Attribution {
                    method: v1::AttributionMethod::PeerOnly as i32,
                    confidence: 1.0,
                },
            }),
            context_outcome: if stitch.is_some() {
                v1::ContextOutcome::Stitched
            } else {
                v1::ContextOutcome::Missing
            } as i32,
            bytes_in,
            bytes_out,
            start_unix_nanos,
            duration_nanos: u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            egress: egress.map(|(d, destination)| v1::EgressDecision {
                destination: Some(destination),
                verdict: v1::Verdict::from(d.verdict) as i32,
                policy: d.policy.unwrap_or_default(),
                rule: d.rule.unwrap_or_default(),
            }),
            connection: crate::proxy::tcp_five_tuple(src, dest),
            taint: claims
                .map(|c| c.custody.taint.iter().cloned().collect())
                .unwrap_or_default(),
            transport_security: transport as i32,
            peer_identity: peer_identity.unwrap_or_default(),
            transport_error: transport_error.to_owned(),
            ..HopEvent::default()
        };
        shared.hops.emit(hop);
    }
}

/// Copies both ways until both sides are done: bytes (client to server,
/// server to client), or `None` when a side failed.
async fn copy_both<A, B>(a: &mut A, b: &mut B) -> Option<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(a, b).await.ok()
}

/// When `dest` (named `host` by SNI, when known) is a mesh peer
/// (`mesh_tls.peers`, matched as for HTTP): the mesh and the SPIFFE ID the
/// peer must show (any in the trust domain when `None`).
pub(crate) fn mesh_peer_of<'a>(
    shared: &'a Shared,
    dest: SocketAddr,
    host: Option<&str>,
) -> Option<(&'a crate::mesh::MeshTls, Option<String>)> {
    let mesh = shared.mesh.as_deref()?;
    let peer = shared
        .config
        .mesh_tls
        .as_ref()?
        .peers
        .iter()
        .find(|p| p.matches(host, Some(dest.ip())))?;
    Some((mesh, peer.identity.clone()))
}

#[async_trait]
impl ServerApp for Sniffing {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // (Connections of the `inbound_tls` listener arrive with TLS ended.)
        if self.direction == Direction::Inbound
            && let Some(mesh) = &self.shared.mesh
            && stream.get_ssl_digest().is_none()
        {
            // Mesh mTLS and plaintext share the inbound port: a TLS
            // ClientHello offering the mesh's ALPN marker is mesh mTLS.
            // Other TLS (clients of an application's own TLS) is not.
            let mut first = [0u8; 1];
            let tls = match tokio::time::timeout(IDLE, stream.try_peek(&mut first)).await {
                Ok(Ok(peeked)) => peeked && first[0] == 0x16,
                Ok(Err(_)) | Err(_) => return None,
            };
            let alpn = if tls {
                Self::peek_record(&mut stream)
                    .await
                    .map(|r| client_hello_alpn(&r))
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            if crate::mesh::offers_mesh_tcp(&alpn) {
                // Mesh mTLS carrying a raw TCP stream: ended here, relayed
                // to the application as TCP.
                let src = stream
                    .get_socket_digest()
                    .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
                let l4 = stream.into_any().downcast::<L4Stream>().ok()?;
                let (tls, id) = mesh.accept_tcp(*l4, &self.shared.metrics).await?;
                let dest = Some(self.shared.config.inbound.upstream);
                self.relay(tls, src, dest, None, Some(id)).await;
                return None;
            }
            if crate::mesh::offers_mesh(&alpn) {
                let l4 = stream.into_any().downcast::<L4Stream>().ok()?;
                let tls = mesh.accept(*l4, &self.shared.metrics).await?;
                return ServerApp::process_new(&self.http, Box::new(tls), shutdown).await;
            }
            let strict = mesh.mode == MeshTlsMode::Strict;
            mesh.count_inbound(
                &self.shared.metrics,
                match (tls, strict) {
                    (false, false) => "plaintext",
                    (false, true) => "plaintext_refused",
                    (true, false) => "tls_passthrough",
                    (true, true) => "tls_refused",
                },
            );
            if strict {
                tracing::info!(
                    message = "connection without mesh mTLS refused (strict)",
                    tls
                );
                return None;
            }
        }
        let dest = self.destination(&stream);
        let config = &self.shared.config;
        if self.direction == Direction::Outbound
            && let Some(dest) = dest
            && let Some(database) = config.database_on_port(dest.port())
        {
            self.database(stream, dest, database.clone()).await;
            return None;
        }
        let server_first = dest.is_some_and(|d| config.tcp_ports.contains(&d.port()));
        let mut sni = None;
        if !server_first {
            let mut head = [0u8; 4];
            match tokio::time::timeout(IDLE, stream.try_peek(&mut head)).await {
                Ok(Ok(true)) if looks_like_http(&head) => {
                    return ServerApp::process_new(&self.http, stream, shutdown).await;
                }
                // A length prefix below 64 KiB: perhaps a PostgreSQL startup
                // packet, which is at least 8 bytes and sent whole.
                Ok(Ok(true))
                    if self.direction == Direction::Outbound
                        && head[..2] == [0, 0]
                        && let Some(dest) = dest
                        && self.peeks_postgres(&mut stream).await =>
                {
                    let database = config
                        .databases
                        .iter()
                        .find(|d| d.protocol == DatabaseProtocol::Postgres && d.listen.is_none())
                        .cloned()
                        .unwrap_or_else(|| {
                            DatabaseConfig::recognised(DatabaseProtocol::Postgres, dest.port())
                        });
                    self.database(stream, dest, database).await;
                    return None;
                }
                Ok(Ok(true)) if head[0] == 0x16 && head[1] == 0x03 => {
                    sni = Self::peek_sni(&mut stream).await;
                }
                Ok(Ok(true)) => {}
                // Not peekable: leave it to the HTTP proxy.
                Ok(Ok(false)) => return ServerApp::process_new(&self.http, stream, shutdown).await,
                Ok(Err(_)) | Err(_) => return None,
            }
        }
        self.pass_through(stream, dest, sni).await;
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.http).await;
    }
}

#[cfg(test)]
mod tests;
