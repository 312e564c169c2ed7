//! The inbound and outbound HTTP proxies: pingora `ProxyHttp` phases.
//!
//! | phase | inbound | outbound |
//! | --- | --- | --- |
//! | `request_filter` | strip untrusted identity headers; verify `Txn-Token` or mint from the identity sources; refuse invalid tokens if configured; refuse revoked principals; `traceparent` (new span); register in the in-flight table | verify and extend the app's token, or stitch to an inbound request in flight, or mint; refuse revoked principals; resolve the destination; evaluate egress policy; block with 403 / gRPC `PERMISSION_DENIED` |
//! | `upstream_peer` | the local application | the configured upstream or the original destination |
//! | `upstream_request_filter` | inject `Txn-Token` and `traceparent` | inject `Txn-Token` and `traceparent` |
//! | body filters, `upstream_response_trailer_filter` | count bytes; read `grpc-status` | same |
//! | `logging` | hop event (never waits), metrics; the in-flight entry ends with the request | same |

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use custody_context::api::{SCHEMA_VERSION, v1};
use custody_context::hop::HopEvent;
use custody_context::issue::{Extension, Issuer, Mint, SignedToken};
use custody_context::policy::{ChainFacts, Decision, DestinationFacts, Verdict};
use custody_context::token::{Actor, HopAttribution, InitiatorKind, RequestContext, TOKEN_HEADER};
use custody_context::traceparent::{SpanId, TraceId, TraceParent};
use custody_context::verify::{VerifiedToken, Verifier, VerifyError};
use custody_context::workload::WorkloadId;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use sha2::{Digest, Sha256};

use crate::config::{Config, IdentitySource, OutboundMode, Upstream};
use crate::export::HopSink;
use crate::inflight::{InFlightGuard, InFlightRequest, InFlightTable};
use crate::mesh::{MeshPeerCert, UpstreamTls};
use crate::metrics::{ContextLabels, Metrics, RequestLabels, VerdictLabels, status_class};
use crate::policy_store::PolicyStore;

/// The `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";

/// State shared by the inbound proxy, the outbound proxy and the admin listener.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// This sidecar's workload.
    pub workload: WorkloadId,
    /// Its URI, as it appears in `req_wl`.
    pub workload_uri: String,
    /// Signs minted and replacement tokens (swapped when the key is renewed).
    pub issuer: arc_swap::ArcSwap<Issuer>,
    /// Verifies arriving tokens (cached).
    pub verifier: Verifier,
    /// The keys trusted whatever the control plane says: this sidecar's own
    /// (every one it signed with that is still valid) and those of the
    /// configured key-set file.
    pub anchor_keys: arc_swap::ArcSwap<custody_context::keys::KeySet>,
    /// The egress policy in force.
    pub policy: Arc<PolicyStore>,
    /// Inbound requests in flight, for stitching.
    pub inflight: Arc<InFlightTable>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Hop export queue.
    pub hops: HopSink,
    /// Bearer-JWT verifiers, by index in `inbound.identity_sources`.
    pub bearer: Vec<Option<crate::bearer::BearerVerifier>>,
    /// Data classes each chain touched in this pod.
    pub taint: crate::taint::TaintTable,
    /// SQL analysis and classification for database sessions.
    pub db: crate::db::Engines,
    /// Mesh mTLS, when configured.
    pub mesh: Option<Arc<crate::mesh::MeshTls>>,
    /// The certificate of `listeners.inbound_tls`, re-read on change.
    pub inbound_tls: Option<Arc<crate::reload::Reloader<tokio_rustls::rustls::sign::CertifiedKey>>>,
    /// The CAs of TLS origination.
    pub origination: crate::mesh::OriginationRoots,
    /// The Unix socket of the TLS tunnel (with mesh mTLS or TLS origination).
    pub tunnel: Option<std::path::PathBuf>,
}

/// Which side of the application a proxy serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// In front of the application.
    Inbound,
    /// Between the application and the rest of the world.
    Outbound,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// One direction of the sidecar.
#[derive(Debug)]
pub struct DirectionProxy {
    shared: Arc<Shared>,
    direction: Direction,
}

impl DirectionProxy {
    /// The proxy for `direction`.
    pub fn new(shared: Arc<Shared>, direction: Direction) -> Self {
        DirectionProxy { shared, direction }
    }
}

/// What one request learned on its way through, for the hop event.
#[derive(Debug)]
pub struct HopCtx {
    start: Instant,
    start_unix_nanos: u64,
    protocol: v1::Protocol,
    operation: String,
    /// The token after this hop (forwarded or extended or minted).
    token: Option<Arc<VerifiedToken>>,
    /// Its encoded form, for the upstream request.
    encoded: Option<String>,
    /// This hop's span: `parent_id` is this hop's span id.
    span: Option<TraceParent>,
    parent_span: Option<SpanId>,
    outcome: v1::ContextOutcome,
    reason: &'static str,
    attribution: HopAttribution,
    peer: Option<WorkloadId>,
    egress: Option<(Decision, v1::Destination)>,
    upstream: Option<SocketAddr>,
    grpc_status: Option<u32>,
    bytes_in: u64,
    bytes_out: u64,
    inflight: Option<InFlightGuard>,
    /// How the connection to or from the peer is secured.
    transport: v1::TransportSecurity,
    /// The peer's SPIFFE ID as verified by mesh mTLS.
    peer_identity: Option<String>,
    /// Why TLS toward the upstream failed, if it did.
    transport_error: &'static str,
    /// Why the chain disagrees with the verified peer, if it does.
    identity_mismatch: &'static str,
    /// How the upstream is reached over TLS (outbound), if it is.
    upstream_tls: Option<UpstreamTls>,
}

impl HopCtx {
    fn new() -> Self {
        HopCtx {
            start: Instant::now(),
            start_unix_nanos: unix_nanos(),
            protocol: v1::Protocol::Http1,
            operation: String::new(),
            token: None,
            encoded: None,
            span: None,
            parent_span: None,
            outcome: v1::ContextOutcome::Unspecified,
            reason: "",
            attribution: HopAttribution {
                method: custody_context::token::AttributionMethod::PeerOnly,
                confidence: 1.0,
            },
            peer: None,
            egress: None,
            upstream: None,
            grpc_status: None,
            bytes_in: 0,
            bytes_out: 0,
            inflight: None,
            transport: v1::TransportSecurity::Plaintext,
            peer_identity: None,
            transport_error: "",
            identity_mismatch: "",
            upstream_tls: None,
        }
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn header_str<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn is_grpc(req: &RequestHeader) -> bool {
    header_str(req, "content-type").is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The host and port a request names (`Host` or `:authority`), lowercased.
fn authority(req: &RequestHeader) -> Option<(String, Option<u16>)> {
    let raw = header_str(req, "host")
        .map(str::to_owned)
        .or_else(|| req.uri.authority().map(|a| a.as_str().to_owned()))?;
    let auth: http::uri::Authority = raw.parse().ok()?;
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    Some((host.to_ascii_lowercase(), auth.port_u16()))
}

fn verified_from_signed(signed: SignedToken, kid: &str) -> Arc<VerifiedToken> {
    let digest: [u8; 32] = Sha256::digest(signed.encoded.as_bytes()).into();
    Arc::new(VerifiedToken {
        claims: signed.claims,
        kid: kid.to_owned(),
        digest,
    })
}

impl Shared {
    pub(crate) fn verify(&self, token: &str) -> Result<Arc<VerifiedToken>, VerifyError> {
        let verified = self.verifier.verify_now(token)?;
        if self
            .policy
            .current()
            .revocations
            .key_ids
            .contains(&verified.kid)
        {
            return Err(VerifyError::RevokedKey);
        }
        Ok(verified)
    }

    fn count_context(&self, outcome: v1::ContextOutcome, reason: &'static str) {
        let outcome = match outcome {
            v1::ContextOutcome::Propagated => "propagated",
            v1::ContextOutcome::Extended => "extended",
            v1::ContextOutcome::Minted => "minted",
            v1::ContextOutcome::Stitched => "stitched",
            v1::ContextOutcome::Missing => "missing",
            v1::ContextOutcome::Refused => "refused",
            v1::ContextOutcome::Unspecified => "unspecified",
        };
        self.metrics
            .context
            .get_or_create(&ContextLabels { outcome, reason })
            .inc();
    }

    /// The initiator from the configured sources, in order, and the MCP
    /// agent acting for it when that is someone else.
    fn initiator(
        &self,
        req: &RequestHeader,
        mcp_agent: Option<&str>,
    ) -> Option<(String, InitiatorKind, Option<Actor>)> {
        let (sub, kind) = self
            .config
            .inbound
            .identity_sources
            .iter()
            .enumerate()
            .find_map(|(i, source)| match source {
                IdentitySource::BearerJwt { .. } => {
                    let verifier = self.bearer.get(i)?.as_ref()?;
                    let value = header_str(req, "authorization")?;
                    let (scheme, token) = value.split_once(' ')?;
                    if !scheme.eq_ignore_ascii_case("bearer") {
                        return None;
                    }
                    verifier
                        .verify(token.trim())
                        .map(|sub| (sub, verifier.kind()))
                }
                IdentitySource::EdgeHeader { header, kind } => {
                    header_str(req, header).map(|v| (v.to_owned(), *kind))
                }
                IdentitySource::AgentHeader { header } => {
                    header_str(req, header).map(|v| (v.to_owned(), InitiatorKind::Agent))
                }
                IdentitySource::Mcp { .. } => {
                    mcp_agent.map(|a| (a.to_owned(), InitiatorKind::Agent))
                }
            })?;
        let act = mcp_agent.filter(|agent| *agent != sub).map(Actor::new);
        Some((sub, kind, act))
    }

    fn mcp_agent_key(&self) -> Option<&str> {
        self.config
            .inbound
            .identity_sources
            .iter()
            .find_map(|source| match source {
                IdentitySource::Mcp { agent_key } => Some(agent_key.as_str()),
                _ => None,
            })
    }

    fn mint(
        &self,
        txn: TraceId,
        (sub, kind, act): (String, InitiatorKind, Option<Actor>),
        peer_ip: Option<IpAddr>,
        authn: Option<&str>,
    ) -> Option<(Arc<VerifiedToken>, String)> {
        let rctx = RequestContext {
            req_ip: peer_ip.map(|ip| ip.to_string()),
            authn: authn.map(str::to_owned),
        };
        let mint = Mint {
            txn,
            sub,
            kind,
            scope: self.config.inbound.scope.clone(),
            act,
            tctx: None,
            rctx: Some(rctx),
            taint: vec![],
        };
        let issuer = self.issuer.load();
        match issuer.mint(mint, custody_context::unix_now()) {
            Ok(signed) => {
                self.metrics.chains_started.inc();
                let encoded = signed.encoded.clone();
                Some((verified_from_signed(signed, issuer.kid()), encoded))
            }
            Err(error) => {
                tracing::warn!(message = "cannot mint token", %error);
                None
            }
        }
    }

    /// A token this workload issued, with the taint the chain has gained
    /// here since; the same token when there is none.
    fn with_pod_taint(
        &self,
        token: Arc<VerifiedToken>,
        encoded: String,
    ) -> (Arc<VerifiedToken>, String) {
        let missing = self
            .taint
            .missing_from(token.claims.txn, &token.claims.custody.taint);
        if missing.is_empty() {
            return (token, encoded);
        }
        let issuer = self.issuer.load();
        match issuer.retaint(&token, missing, custody_context::unix_now()) {
            Ok(signed) => {
                let encoded = signed.encoded.clone();
                (verified_from_signed(signed, issuer.kid()), encoded)
            }
            Err(error) => {
                tracing::warn!(message = "cannot add taint to token", %error);
                (token, encoded)
            }
        }
    }

    /// Extends a chain with a delegation to `agent`.
    fn delegate(
        &self,
        prior: &VerifiedToken,
        agent: &str,
        attribution: HopAttribution,
    ) -> Option<(Arc<VerifiedToken>, String)> {
        let mut extension = Extension::new(attribution);
        extension.delegate_to = Some(agent.to_owned());
        let issuer = self.issuer.load();
        match issuer.extend(prior, extension, custody_context::unix_now()) {
            Ok(signed) => {
                let encoded = signed.encoded.clone();
                Some((verified_from_signed(signed, issuer.kid()), encoded))
            }
            Err(error) => {
                tracing::warn!(message = "cannot extend token with a delegation", %error);
                None
            }
        }
    }

    pub(crate) fn extend(
        &self,
        prior: &VerifiedToken,
        attribution: HopAttribution,
    ) -> Option<(Arc<VerifiedToken>, String)> {
        let mut extension = Extension::new(attribution);
        // What the chain touched in this pod travels on with it.
        extension.taint = self
            .taint
            .missing_from(prior.claims.txn, &prior.claims.custody.taint);
        let issuer = self.issuer.load();
        match issuer.extend(prior, extension, custody_context::unix_now()) {
            Ok(signed) => {
                let encoded = signed.encoded.clone();
                Some((verified_from_signed(signed, issuer.kid()), encoded))
            }
            Err(error) => {
                tracing::warn!(message = "cannot extend token", %error);
                None
            }
        }
    }
}

/// How an inbound connection is secured, and the client's SPIFFE ID when
/// mesh mTLS verified it.
fn inbound_transport(session: &Session) -> (v1::TransportSecurity, Option<String>) {
    match session.digest().and_then(|d| d.ssl_digest.as_ref()) {
        Some(ssl) => match ssl.extension.get::<MeshPeerCert>() {
            Some(peer) => (v1::TransportSecurity::MeshMtls, peer.spiffe_id.clone()),
            None => (v1::TransportSecurity::Tls, None),
        },
        None => (v1::TransportSecurity::Plaintext, None),
    }
}

fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// SHA-256 (hex) of the credential in `Authorization` (after the scheme),
/// as revocations name it.
fn credential_hash(req: &RequestHeader) -> Option<String> {
    let value = header_str(req, "authorization")?;
    let credential = value.split_once(' ').map_or(value, |(_, c)| c.trim());
    Some(hex::encode(Sha256::digest(credential.as_bytes())))
}

/// Largest MCP request body read for its identity (pingora's replay buffer).
const MCP_BODY_LIMIT: usize = 64 * 1024;

/// An MCP `tools/call` request.
#[derive(Debug)]
struct McpCall {
    tool: String,
    agent: Option<String>,
}

/// Reads a JSON-RPC body of known, small length and returns the `tools/call`
/// it carries. The body stays buffered and is replayed to the upstream.
async fn read_mcp_call(session: &mut Session, agent_key: &str) -> pingora::Result<Option<McpCall>> {
    let req = session.req_header();
    let small = header_str(req, "content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > 0 && n <= MCP_BODY_LIMIT);
    let json = header_str(req, "content-type").is_some_and(|ct| ct.contains("json"));
    if req.method != http::Method::POST || !small || !json {
        return Ok(None);
    }
    session.as_downstream_mut().enable_retry_buffering();
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        body.extend_from_slice(&chunk);
        if body.len() > MCP_BODY_LIMIT {
            return Ok(None);
        }
    }
    let Ok(message) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Ok(None);
    };
    if message["method"] != "tools/call" {
        return Ok(None);
    }
    let params = &message["params"];
    let Some(tool) = params["name"].as_str() else {
        return Ok(None);
    };
    Ok(Some(McpCall {
        tool: tool.to_owned(),
        agent: params["_meta"][agent_key]
            .as_str()
            .filter(|a| !a.is_empty())
            .map(str::to_owned),
    }))
}

/// Writes a locally generated refusal: JSON for HTTP, trailers-only for gRPC.
async fn refuse(
    session: &mut Session,
    ctx: &mut HopCtx,
    status: u16,
    grpc_code: u32,
    body: serde_json::Value,
    grpc_message: &str,
) -> pingora::Result<()> {
    if ctx.protocol == v1::Protocol::Grpc {
        let mut resp = ResponseHeader::build(200, Some(3))?;
        resp.insert_header("content-type", "application/grpc")?;
        resp.insert_header("grpc-status", grpc_code.to_string())?;
        resp.insert_header("grpc-message", grpc_message)?;
        ctx.grpc_status = Some(grpc_code);
        session.write_response_header(Box::new(resp), true).await?;
    } else {
        let body = Bytes::from(body.to_string());
        let mut resp = ResponseHeader::build(status, Some(2))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        session.write_response_header(Box::new(resp), false).await?;
        ctx.bytes_out += body.len() as u64;
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Keeps or creates the W3C span for this hop within chain `txn`.
fn hop_span(incoming: Option<TraceParent>, txn: TraceId) -> (TraceParent, Option<SpanId>) {
    match incoming {
        Some(tp) if tp.trace_id == txn => (tp.new_span(), Some(tp.parent_id)),
        Some(tp) => (
            TraceParent {
                trace_id: txn,
                parent_id: SpanId::random(),
                flags: tp.flags,
            },
            None,
        ),
        None => (
            TraceParent {
                trace_id: txn,
                parent_id: SpanId::random(),
                flags: custody_context::traceparent::FLAG_SAMPLED,
            },
            None,
        ),
    }
}

impl DirectionProxy {
    async fn inbound_request(
        &self,
        session: &mut Session,
        ctx: &mut HopCtx,
    ) -> pingora::Result<bool> {
        let shared = &self.shared;
        for name in &shared.config.inbound.strip_headers {
            session.req_header_mut().remove_header(name.as_str());
        }
        let mcp_agent = match shared.mcp_agent_key() {
            Some(key) => {
                let key = key.to_owned();
                let call = read_mcp_call(session, &key).await?;
                if let Some(call) = &call {
                    ctx.operation.clone_from(&call.tool);
                }
                call.and_then(|c| c.agent)
            }
            None => None,
        };
        let req = session.req_header();
        let incoming_tp = header_str(req, TRACEPARENT).and_then(|v| TraceParent::parse(v).ok());
        let token = header_str(req, TOKEN_HEADER).map(str::to_owned);
        let peer_ip = peer_ip(session);
        let (transport, mtls_peer) = inbound_transport(session);
        ctx.transport = transport;
        ctx.peer_identity.clone_from(&mtls_peer);
        // The mTLS-verified peer outranks what a token says of it.
        ctx.peer = mtls_peer
            .as_deref()
            .and_then(|id| WorkloadId::parse_uri(id).ok());

        let mut verified = None;
        if let Some(token) = token {
            match shared.verify(&token) {
                Ok(v) => {
                    ctx.outcome = v1::ContextOutcome::Propagated;
                    ctx.attribution = HopAttribution::PROPAGATED;
                    let last = v.claims.last_workload();
                    match mtls_peer.as_deref() {
                        Some(id) if last != Some(id) => {
                            ctx.identity_mismatch = "token_workload_mismatch";
                            tracing::info!(
                                message = "txn-token last workload is not the mTLS peer",
                                peer_identity = %id,
                                token_workload = ?last,
                            );
                            if shared.config.inbound.refuse_invalid_tokens {
                                ctx.outcome = v1::ContextOutcome::Refused;
                                ctx.reason = "peer_mismatch";
                                let body = serde_json::json!({
                                    "error": "invalid_txn_token",
                                    "reason": "peer_mismatch",
                                });
                                let msg = "invalid txn-token: peer_mismatch";
                                refuse(session, ctx, 401, 16, body, msg).await?;
                                return Ok(true);
                            }
                        }
                        Some(_) => {}
                        None => {
                            ctx.peer = last.and_then(|w| WorkloadId::parse_uri(w).ok());
                        }
                    }
                    verified = Some((v, token));
                }
                Err(error) => {
                    ctx.outcome = v1::ContextOutcome::Refused;
                    ctx.reason = error.reason();
                    tracing::info!(message = "txn-token refused", reason = error.reason(), peer = ?peer_ip);
                    if shared.config.inbound.refuse_invalid_tokens {
                        let body = serde_json::json!({
                            "error": "invalid_txn_token",
                            "reason": error.reason(),
                        });
                        let msg = format!("invalid txn-token: {}", error.reason());
                        refuse(session, ctx, 401, 16, body, &msg).await?;
                        return Ok(true);
                    }
                }
            }
        }

        let (token, encoded) = match verified {
            Some((token, encoded)) => match mcp_agent.as_deref() {
                // An agent acting within a chain hands the call to another
                // agent: the callee becomes the current actor, the caller
                // nests inside it (RFC 8693 `act`).
                Some(agent)
                    if token.claims.sub != agent
                        && token.claims.actors().first().copied() != Some(agent) =>
                {
                    match shared.delegate(&token, agent, ctx.attribution) {
                        Some(pair) => {
                            ctx.outcome = v1::ContextOutcome::Extended;
                            pair
                        }
                        None => (token, encoded),
                    }
                }
                _ => (token, encoded),
            },
            None => {
                let txn = incoming_tp.map_or_else(TraceId::random, |tp| tp.trace_id);
                let found = shared.initiator(session.req_header(), mcp_agent.as_deref());
                let (initiator, authn) = match found {
                    Some(initiator) => {
                        if ctx.outcome != v1::ContextOutcome::Refused {
                            ctx.outcome = v1::ContextOutcome::Minted;
                            ctx.attribution = HopAttribution::MINTED;
                        }
                        (initiator, "header")
                    }
                    None => {
                        if ctx.outcome != v1::ContextOutcome::Refused {
                            ctx.outcome = v1::ContextOutcome::Missing;
                        }
                        // Attributed to the peer: its verified workload
                        // identity when mesh mTLS proved one, else its address.
                        match &mtls_peer {
                            Some(id) => ((id.clone(), InitiatorKind::Service, None), "mtls"),
                            None => {
                                let sub = peer_ip.map_or_else(
                                    || "peer:unknown".to_owned(),
                                    |ip| format!("peer:{ip}"),
                                );
                                ((sub, InitiatorKind::Service, None), "peer")
                            }
                        }
                    }
                };
                match shared.mint(txn, initiator, peer_ip, Some(authn)) {
                    Some(pair) => pair,
                    None => return Ok(false),
                }
            }
        };

        if let Some(refused) = self.refuse_revoked(session, ctx, &token).await? {
            return Ok(refused);
        }
        let (span, parent) = hop_span(incoming_tp, token.claims.txn);
        ctx.inflight = Some(shared.inflight.register(InFlightRequest {
            token: Arc::clone(&token),
            encoded: Arc::from(encoded.as_str()),
            span,
        }));
        ctx.span = Some(span);
        ctx.parent_span = parent;
        ctx.token = Some(token);
        ctx.encoded = Some(encoded);
        ctx.upstream = Some(shared.config.inbound.upstream);
        Ok(false)
    }

    /// Refuses a request whose initiator is revoked; `Some(true)` if it did.
    async fn refuse_revoked(
        &self,
        session: &mut Session,
        ctx: &mut HopCtx,
        token: &VerifiedToken,
    ) -> pingora::Result<Option<bool>> {
        let bundle = self.shared.policy.current();
        let revoked = &bundle.revocations;
        let (reason, error) = if revoked.principals.contains(&token.claims.sub) {
            ("revoked_principal", "principal_revoked")
        } else if !revoked.credential_hashes.is_empty()
            && credential_hash(session.req_header())
                .is_some_and(|h| revoked.credential_hashes.contains(&h))
        {
            ("revoked_credential", "credential_revoked")
        } else {
            return Ok(None);
        };
        ctx.outcome = v1::ContextOutcome::Refused;
        ctx.reason = reason;
        ctx.token = None;
        let body = serde_json::json!({
            "error": error,
            "chain": token.claims.txn.to_string(),
        });
        refuse(session, ctx, 403, 7, body, &error.replace('_', " ")).await?;
        Ok(Some(true))
    }

    async fn outbound_request(
        &self,
        session: &mut Session,
        ctx: &mut HopCtx,
    ) -> pingora::Result<bool> {
        let shared = &self.shared;
        let req = session.req_header();
        let incoming_tp = header_str(req, TRACEPARENT).and_then(|v| TraceParent::parse(v).ok());
        let forwarded = header_str(req, TOKEN_HEADER).map(str::to_owned);

        let mut chosen: Option<(Arc<VerifiedToken>, String)> = None;
        let mut stitched_span = None;
        if let Some(token) = forwarded {
            match shared.verify(&token) {
                Ok(v) => {
                    ctx.attribution = HopAttribution::PROPAGATED;
                    if v.claims.last_workload() == Some(shared.workload_uri.as_str()) {
                        // Issued by this workload's own sidecar: already names it.
                        ctx.outcome = v1::ContextOutcome::Propagated;
                        chosen = Some(shared.with_pod_taint(v, token));
                    } else {
                        ctx.outcome = v1::ContextOutcome::Extended;
                        chosen = shared.extend(&v, HopAttribution::PROPAGATED);
                    }
                }
                Err(error) => {
                    ctx.outcome = v1::ContextOutcome::Refused;
                    ctx.reason = error.reason();
                }
            }
        }
        if chosen.is_none()
            && let Some(stitch) = shared.inflight.stitch()
        {
            let attribution = HopAttribution::stitched(stitch.confidence);
            ctx.attribution = attribution;
            if ctx.outcome != v1::ContextOutcome::Refused {
                ctx.outcome = v1::ContextOutcome::Stitched;
            }
            stitched_span = Some(stitch.request.span);
            let prior = &stitch.request.token;
            chosen = if prior.claims.last_workload() == Some(shared.workload_uri.as_str()) {
                // The inbound token was minted here and already names this workload.
                Some(shared.with_pod_taint(Arc::clone(prior), stitch.request.encoded.to_string()))
            } else {
                shared.extend(prior, attribution)
            };
        }
        if chosen.is_none() {
            if ctx.outcome != v1::ContextOutcome::Refused {
                ctx.outcome = v1::ContextOutcome::Minted;
            }
            ctx.attribution = HopAttribution::MINTED;
            let txn = incoming_tp.map_or_else(TraceId::random, |tp| tp.trace_id);
            chosen = shared.mint(
                txn,
                (shared.workload_uri.clone(), InitiatorKind::Service, None),
                None,
                Some("workload"),
            );
        }
        let Some((token, encoded)) = chosen else {
            return Err(pingora::Error::explain(
                pingora::ErrorType::InternalError,
                "no token could be issued",
            ));
        };
        if let Some(refused) = self.refuse_revoked(session, ctx, &token).await? {
            return Ok(refused);
        }
        let parent_tp = incoming_tp
            .filter(|tp| tp.trace_id == token.claims.txn)
            .or(stitched_span);
        let (span, parent) = hop_span(parent_tp, token.claims.txn);
        ctx.span = Some(span);
        ctx.parent_span = parent;

        // Destination.
        let req = session.req_header();
        let named = authority(req);
        let original_dst = session
            .digest()
            .and_then(|d| d.socket_digest.as_ref())
            .and_then(|s| s.original_dst())
            .and_then(|a| a.as_inet())
            .copied();
        let (upstream, entry) = match &shared.config.outbound {
            OutboundMode::Explicit { upstreams, default } => {
                let found = named.as_ref().and_then(|(host, port)| {
                    port.and_then(|p| upstreams.get_key_value(&format!("{host}:{p}")))
                        .or_else(|| upstreams.get_key_value(host.as_str()))
                });
                match found {
                    Some((name, u)) => (Some(u.address), Some((name.as_str(), u))),
                    None => (*default, None),
                }
            }
            OutboundMode::Transparent => (original_dst, None),
        };
        // The port the application asked for: the authority's, else the one
        // it dialled (transparent), else the cleartext HTTP default.
        let port = named
            .as_ref()
            .and_then(|(_, p)| *p)
            .or(original_dst.map(|a| a.port()))
            .unwrap_or(80);
        let host = named.as_ref().map(|(h, _)| h.as_str());
        let ip = upstream.map(|u| u.ip());
        let bundle = shared.policy.current();
        let mut decision = bundle.evaluate(
            &DestinationFacts { host, ip, port },
            &ChainFacts {
                initiator_kind: Some(token.claims.custody.ini),
                principal: Some(&token.claims.sub),
                service: Some(&shared.workload_uri),
                taint: Some(&token.claims.custody.taint),
            },
        );
        let chain_id = token.claims.txn.to_string();
        if decision.verdict == Verdict::Allow
            && bundle.revocations.quarantined_chains.contains(&chain_id)
        {
            // Everything derived from a quarantined chain is flagged.
            decision = Decision {
                verdict: Verdict::Audit,
                policy: Some("quarantine".into()),
                rule: Some("quarantined-chain".into()),
            };
        }
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
            ip: ip.map(|i| i.to_string()).unwrap_or_default(),
            port: u32::from(port),
        };
        let blocked = decision.verdict == Verdict::Block;
        let chain = token.claims.txn.to_string();
        ctx.egress = Some((decision.clone(), destination));
        ctx.token = Some(token);
        ctx.encoded = Some(encoded);
        if blocked {
            let policy = decision.policy.unwrap_or_else(|| "default".into());
            let rule = decision.rule.unwrap_or_default();
            let body = serde_json::json!({
                "error": "egress_blocked",
                "policy": policy,
                "rule": rule,
                "chain": chain,
            });
            let msg = format!("egress blocked by policy {policy} rule {rule} chain {chain}");
            refuse(session, ctx, 403, 7, body, &msg).await?;
            return Ok(true);
        }
        match upstream {
            Some(addr) => match self.upstream_tls(addr, host, entry) {
                Some((addr, tls)) => {
                    ctx.transport = match tls {
                        Some(UpstreamTls::Mesh { .. }) => v1::TransportSecurity::MeshMtls,
                        Some(UpstreamTls::Originate { .. }) => v1::TransportSecurity::TlsOriginated,
                        None => v1::TransportSecurity::Plaintext,
                    };
                    ctx.upstream_tls = tls;
                    ctx.upstream = Some(addr);
                    Ok(false)
                }
                None => {
                    ctx.transport = v1::TransportSecurity::TlsOriginated;
                    ctx.transport_error = "handshake_failed";
                    let body = serde_json::json!({ "error": "upstream_tls", "chain": chain });
                    refuse(session, ctx, 502, 14, body, "no TLS to the upstream").await?;
                    Ok(true)
                }
            },
            None => {
                let body = serde_json::json!({ "error": "no_upstream", "chain": chain });
                refuse(session, ctx, 502, 14, body, "no upstream for destination").await?;
                Ok(true)
            }
        }
    }

    /// Whether and how `addr` (named `host`, an explicit upstream `entry`)
    /// is reached over TLS: mesh mTLS for mesh peers, TLS origination for
    /// the external hosts configured; the address may change to the TLS
    /// port. `None` when TLS is due but cannot be set up (a host that is no
    /// server name).
    fn upstream_tls(
        &self,
        addr: SocketAddr,
        host: Option<&str>,
        entry: Option<(&str, &Upstream)>,
    ) -> Option<(SocketAddr, Option<UpstreamTls>)> {
        let shared = &self.shared;
        if let Some((name, upstream)) = entry {
            if upstream.mesh {
                let expected = upstream.identity.clone();
                return Some((addr, Some(UpstreamTls::Mesh { expected })));
            }
            if let Some(tls) = &upstream.tls {
                let route = format!("upstream:{name}");
                let tls = UpstreamTls::originate(tls, route, host.unwrap_or(name))?;
                return Some((addr, Some(tls)));
            }
        }
        if let Some(mesh) = &shared.config.mesh_tls
            && let Some(peer) = mesh.peers.iter().find(|p| p.matches(host, Some(addr.ip())))
        {
            let expected = peer.identity.clone();
            return Some((addr, Some(UpstreamTls::Mesh { expected })));
        }
        if let Some(host) = host
            && let Some((index, entry)) = shared
                .config
                .tls_origination
                .iter()
                .enumerate()
                .find(|(_, e)| e.host.eq_ignore_ascii_case(host))
        {
            let route = format!("tls_origination:{index}");
            let tls = UpstreamTls::originate(&entry.tls(), route, host)?;
            let addr = entry
                .port
                .map_or(addr, |port| SocketAddr::new(addr.ip(), port));
            return Some((addr, Some(tls)));
        }
        Some((addr, None))
    }

    fn hop_event(&self, session: &Session, ctx: &HopCtx, status: u32) -> HopEvent {
        let shared = &self.shared;
        let token = ctx.token.as_deref();
        let claims = token.map(|t| &t.claims);
        let now = Instant::now();
        let (src, dst) = match self.direction {
            Direction::Inbound => (
                session.client_addr().and_then(|a| a.as_inet()).copied(),
                session.server_addr().and_then(|a| a.as_inet()).copied(),
            ),
            Direction::Outbound => (
                session.client_addr().and_then(|a| a.as_inet()).copied(),
                ctx.upstream,
            ),
        };
        HopEvent {
            schema_version: SCHEMA_VERSION,
            event_id: custody_context::traceparent::random_event_id(),
            chain_id: claims.map(|c| c.txn.to_string()).unwrap_or_default(),
            span_id: ctx
                .span
                .map(|s| s.parent_id.to_string())
                .unwrap_or_default(),
            parent_span_id: ctx.parent_span.map(|s| s.to_string()).unwrap_or_default(),
            workload: Some((&shared.workload).into()),
            peer: ctx.peer.as_ref().map(Into::into),
            direction: match self.direction {
                Direction::Inbound => v1::Direction::Inbound,
                Direction::Outbound => v1::Direction::Outbound,
            } as i32,
            protocol: ctx.protocol as i32,
            operation: ctx.operation.clone(),
            status,
            initiator: claims.map(|c| v1::Initiator {
                subject: c.sub.clone(),
                kind: v1::InitiatorKind::from(c.custody.ini) as i32,
                actors: c.actors().into_iter().map(str::to_owned).collect(),
                scope: c.scope.clone(),
            }),
            workloads: claims.map(|c| c.req_wl.clone()).unwrap_or_default(),
            attribution: Some((&ctx.attribution).into()),
            context_outcome: ctx.outcome as i32,
            refusal_reason: ctx.reason.to_owned(),
            bytes_in: ctx.bytes_in,
            bytes_out: ctx.bytes_out,
            start_unix_nanos: ctx.start_unix_nanos,
            duration_nanos: u64::try_from(now.duration_since(ctx.start).as_nanos())
                .unwrap_or(u64::MAX),
            egress: ctx.egress.as_ref().map(|(d, dest)| v1::EgressDecision {
                destination: Some(dest.clone()),
                verdict: v1::Verdict::from(d.verdict) as i32,
                policy: d.policy.clone().unwrap_or_default(),
                rule: d.rule.clone().unwrap_or_default(),
            }),
            data: vec![],
            database: None,
            connection: tcp_five_tuple(src, dst),
            taint: claims
                .map(|c| c.custody.taint.iter().cloned().collect())
                .unwrap_or_default(),
            key_id: token.map(|t| t.kid.clone()).unwrap_or_default(),
            transport_security: ctx.transport as i32,
            peer_identity: ctx.peer_identity.clone().unwrap_or_default(),
            transport_error: ctx.transport_error.to_owned(),
            identity_mismatch: ctx.identity_mismatch.to_owned(),
        }
    }
}

/// The tunnel's refusal in a failed connection's error chain. (Walked by
/// hand: pingora stores causes boxed once more, which `root_cause` misses.)
fn tunnel_answer(e: &pingora::Error) -> Option<&ResponseHeader> {
    use pingora::protocols::raw_connect::ConnectProxyError;
    let mut cause = e.cause.as_deref();
    while let Some(c) = cause {
        if let Some(refused) = c
            .downcast_ref::<ConnectProxyError>()
            .or_else(|| c.downcast_ref::<Box<ConnectProxyError>>().map(|b| &**b))
        {
            return Some(&refused.response);
        }
        cause = c
            .downcast_ref::<pingora::Error>()
            .or_else(|| c.downcast_ref::<Box<pingora::Error>>().map(|b| &**b))
            .and_then(|inner| inner.cause.as_deref());
    }
    None
}

/// The connection 5-tuple of a TCP hop, when both ends are known: what the
/// control plane joins with node-agent flows.
pub(crate) fn tcp_five_tuple(
    src: Option<std::net::SocketAddr>,
    dst: Option<std::net::SocketAddr>,
) -> Option<v1::FiveTuple> {
    let (s, d) = (src?, dst?);
    Some(v1::FiveTuple {
        src_ip: s.ip().to_string(),
        src_port: u32::from(s.port()),
        dst_ip: d.ip().to_string(),
        dst_port: u32::from(d.port()),
        transport: "tcp".into(),
    })
}

#[async_trait]
impl ProxyHttp for DirectionProxy {
    type CTX = HopCtx;

    fn new_ctx(&self) -> HopCtx {
        HopCtx::new()
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut HopCtx,
    ) -> pingora::Result<bool> {
        let req = session.req_header();
        ctx.protocol = if is_grpc(req) {
            v1::Protocol::Grpc
        } else if session.is_http2() {
            v1::Protocol::Http2
        } else {
            v1::Protocol::Http1
        };
        ctx.operation = if ctx.protocol == v1::Protocol::Grpc {
            req.uri.path().to_owned()
        } else {
            format!("{} {}", req.method, req.uri.path())
        };
        match self.direction {
            Direction::Inbound => self.inbound_request(session, ctx).await,
            Direction::Outbound => self.outbound_request(session, ctx).await,
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut HopCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let addr = ctx.upstream.ok_or_else(|| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "no upstream chosen")
        })?;
        let h2 = session.is_http2();
        let mut peer = match (&ctx.upstream_tls, &self.shared.tunnel) {
            // TLS through the sidecar's tunnel, as through a CONNECT proxy:
            // pooled apart from plaintext (the tunnel and its headers are
            // part of the pool key).
            (Some(tls), Some(tunnel)) => HttpPeer::new_proxy(
                &tunnel.to_string_lossy(),
                addr.ip(),
                addr.port(),
                false,
                "",
                tls.connect_headers(h2),
            ),
            (Some(_), None) => {
                return Err(pingora::Error::explain(
                    pingora::ErrorType::InternalError,
                    "no TLS tunnel",
                ));
            }
            (None, _) => HttpPeer::new(addr, false, String::new()),
        };
        if h2 {
            peer.options.set_http_version(2, 2);
        }
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        digest: Option<&pingora::protocols::Digest>,
        ctx: &mut HopCtx,
    ) -> pingora::Result<()> {
        // The tunnel's answer stays with the connection, pooled or new.
        if ctx.upstream_tls.is_some() {
            ctx.peer_identity = digest
                .and_then(|d| d.proxy_digest.as_ref())
                .and_then(|p| p.response.headers.get(crate::mesh::PEER_IDENTITY_HEADER))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if self.direction == Direction::Outbound {
                ctx.peer = ctx
                    .peer_identity
                    .as_deref()
                    .and_then(|id| WorkloadId::parse_uri(id).ok());
            }
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut HopCtx,
        e: Box<pingora::Error>,
    ) -> Box<pingora::Error> {
        if ctx.upstream_tls.is_some() {
            ctx.transport_error = tunnel_answer(&e)
                .and_then(|r| r.headers.get(crate::mesh::TRANSPORT_ERROR_HEADER))
                .and_then(|v| v.to_str().ok())
                .and_then(crate::mesh::transport_error)
                .unwrap_or("connect_failed");
        }
        // The upstream could not be reached (or failed its TLS check): 502.
        e.into_up()
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut HopCtx,
    ) -> pingora::Result<()> {
        if let Some(encoded) = ctx.encoded.as_deref().filter(|e| !e.is_empty()) {
            upstream_request.insert_header(TOKEN_HEADER, encoded)?;
        }
        if let Some(span) = ctx.span {
            upstream_request.insert_header(TRACEPARENT, span.to_string())?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut HopCtx,
    ) -> pingora::Result<()> {
        if let Some(b) = body {
            ctx.bytes_in += b.len() as u64;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut HopCtx,
    ) -> pingora::Result<()> {
        if let Some(code) = upstream_response
            .headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            ctx.grpc_status = Some(code);
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut HopCtx,
    ) -> pingora::Result<Option<std::time::Duration>> {
        if let Some(b) = body {
            ctx.bytes_out += b.len() as u64;
        }
        if end_of_stream {
            // The request is over for stitching once its last byte is on the
            // way out, before the caller can see it and call again.
            ctx.inflight = None;
        }
        Ok(None)
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut HopCtx,
    ) -> pingora::Result<()> {
        if let Some(code) = trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            ctx.grpc_status = Some(code);
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, _e: Option<&pingora::Error>, ctx: &mut HopCtx) {
        let http_status = session.response_written().map(|r| r.status.as_u16());
        let status = match (ctx.protocol, ctx.grpc_status) {
            (v1::Protocol::Grpc, Some(code)) => code,
            _ => u32::from(http_status.unwrap_or(0)),
        };
        let shared = &self.shared;
        shared
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                direction: self.direction.label(),
                protocol: match ctx.protocol {
                    v1::Protocol::Grpc => "grpc",
                    v1::Protocol::Http2 => "http2",
                    _ => "http1",
                },
                status_class: status_class(http_status),
            })
            .inc();
        shared.count_context(ctx.outcome, ctx.reason);
        let hop = self.hop_event(session, ctx, status);
        shared.hops.emit(hop);
    }
}
