//! The sidecar's configuration: one typed YAML document.
//!
//! Every field is documented here; unknown fields are refused, and a parse
//! error names the field at fault (`inbound.upstream: invalid socket address`).
//!
//! ```yaml
//! workload: { trust_domain: td, namespace: shop, service_account: web, pod: web-0 }
//! listeners: { inbound: "127.0.0.1:15006", outbound: "127.0.0.1:15001", admin: "127.0.0.1:15020" }
//! inbound:
//!   upstream: "127.0.0.1:8080"
//!   refuse_invalid_tokens: true
//!   strip_headers: [x-custody-user]
//!   identity_sources:
//!     - type: edge_header
//!       header: x-custody-user
//!       kind: human
//! outbound:
//!   mode: explicit
//!   upstreams: { orders: "127.0.0.1:9090" }
//! signing: { seed_file: /var/run/custody/seed }
//! trust: { key_set_file: /etc/custody/keys.json }
//! policy: { file: /etc/custody/policy.yaml, state_dir: /var/lib/custody }
//! exporter: { jsonl_file: /var/log/custody/hops.jsonl, queue_size: 4096 }
//! shutdown: { grace_period_secs: 5 }
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use custody_context::token::InitiatorKind;
use custody_context::workload::WorkloadId;
use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A field has the wrong shape or value.
    #[error("{field}: {message}")]
    Field {
        /// The path of the field, e.g. `inbound.upstream`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Field {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration of one sidecar.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who this sidecar speaks for.
    pub workload: WorkloadConfig,
    /// Where it listens.
    pub listeners: ListenersConfig,
    /// Traffic into the local application.
    pub inbound: InboundConfig,
    /// Traffic from the local application: where it goes.
    pub outbound: OutboundMode,
    /// The key this sidecar signs tokens with.
    #[serde(default)]
    pub signing: SigningConfig,
    /// The keys it trusts.
    #[serde(default)]
    pub trust: TrustConfig,
    /// How this sidecar authenticates to the control plane.
    #[serde(default)]
    pub control_plane: ControlPlaneConfig,
    /// Where egress policy comes from and is kept.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Where hop events go.
    #[serde(default)]
    pub exporter: ExporterConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Worker threads per listener (default 1).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Destination ports whose protocol has the server speak first (MySQL
    /// 3306, SMTP 25): passed through as TCP without waiting to sniff.
    #[serde(default)]
    pub tcp_ports: Vec<u16>,
    /// Database sessions decoded, attributed and classified. When unset,
    /// PostgreSQL on port 5432 and MySQL on port 3306 are recognised on the
    /// outbound listener, and PostgreSQL on any port by its first bytes.
    #[serde(default = "default_databases")]
    pub databases: Vec<DatabaseConfig>,
    /// How database results are classified.
    #[serde(default)]
    pub classification: ClassificationConfig,
    /// Mutual TLS between sidecars, with SPIFFE IDs in the certificates
    /// (off when unset).
    #[serde(default)]
    pub mesh_tls: Option<MeshTlsConfig>,
    /// External destinations the application calls in plain HTTP that the
    /// sidecar calls over TLS (TLS origination), by host.
    #[serde(default)]
    pub tls_origination: Vec<OriginationConfig>,
}

/// Mutual TLS between sidecars.
///
/// Every sidecar holds a certificate whose URI SAN is its workload's SPIFFE
/// ID (`spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`),
/// issued by the mesh CA in `ca_file`. Inbound, a connection whose first
/// byte opens a TLS handshake (0x16) is mesh mTLS on the same port as
/// plaintext; outbound, calls to the destinations in `peers` (and to
/// explicit upstreams with `mesh: true`) go out over mTLS.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshTlsConfig {
    /// This sidecar's certificate chain (PEM); the leaf carries its SPIFFE ID.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The mesh CA (PEM): peers' certificates must chain to it.
    pub ca_file: PathBuf,
    /// Whether plaintext is still accepted inbound (default `permissive`).
    #[serde(default)]
    pub mode: MeshTlsMode,
    /// How often `cert_file`, `key_file` and `ca_file` are read for a new
    /// set (certificate rotation without a restart), in milliseconds
    /// (default 5000, between 10 and 86400000).
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
    /// Outbound destinations that are mesh peers: a host (`orders`, an
    /// explicit upstream name), a host suffix (`*.svc.cluster.local` or
    /// `.svc.cluster.local`), an address or a CIDR (`10.0.0.0/8`); or
    /// `{ destination, identity }` to also require the server's SPIFFE ID.
    #[serde(default)]
    pub peers: Vec<MeshPeer>,
}

/// The default `reload_interval_ms` of every block with certificate files.
fn default_reload_interval_ms() -> u64 {
    5000
}

/// The bounds of every `reload_interval_ms`, in milliseconds.
const RELOAD_INTERVAL_MS: std::ops::RangeInclusive<u64> = 10..=86_400_000;

/// Whether inbound plaintext is accepted next to mesh mTLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeshTlsMode {
    /// mTLS and plaintext both accepted; hops say which.
    #[default]
    Permissive,
    /// Only mTLS: plaintext connections are closed.
    Strict,
}

/// An outbound destination that is a mesh peer.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "MeshPeerEntry")]
pub struct MeshPeer {
    /// Host, host suffix, address or CIDR.
    pub destination: String,
    /// The SPIFFE ID the server must show; any in the trust domain when unset.
    pub identity: Option<String>,
}

#[derive(Deserialize)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "a host, host suffix, address or CIDR, or { destination, identity }"
)]
enum MeshPeerEntry {
    Pattern(String),
    Detailed {
        destination: String,
        #[serde(default)]
        identity: Option<String>,
    },
}

impl From<MeshPeerEntry> for MeshPeer {
    fn from(entry: MeshPeerEntry) -> Self {
        match entry {
            MeshPeerEntry::Pattern(destination) => MeshPeer {
                destination,
                identity: None,
            },
            MeshPeerEntry::Detailed {
                destination,
                identity,
            } => MeshPeer {
                destination,
                identity,
            },
        }
    }
}

/// Parses `a.b.c.d/n` or `x::y/n`.
fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (ip, bits) = text.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((ip, bits))
}

fn in_cidr(ip: IpAddr, (net, bits): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl MeshPeer {
    /// Whether a destination named `host` (lowercase) at `ip` is this peer.
    pub fn matches(&self, host: Option<&str>, ip: Option<IpAddr>) -> bool {
        let pattern = self.destination.as_str();
        if let Some(cidr) = parse_cidr(pattern) {
            return ip.is_some_and(|ip| in_cidr(ip, cidr));
        }
        if let Ok(addr) = pattern.parse::<IpAddr>() {
            return ip == Some(addr);
        }
        let Some(host) = host else {
            return false;
        };
        match pattern
            .strip_prefix("*.")
            .or_else(|| pattern.strip_prefix('.'))
        {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.')),
            None => host.eq_ignore_ascii_case(pattern),
        }
    }
}

/// An explicit upstream: an address, or an address with how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "UpstreamEntry")]
pub struct Upstream {
    /// Where it listens.
    pub address: SocketAddr,
    /// A mesh peer: called over mesh mTLS (needs `mesh_tls`).
    pub mesh: bool,
    /// With `mesh`: the SPIFFE ID the server must show.
    pub identity: Option<String>,
    /// An external server called over TLS (TLS origination).
    pub tls: Option<OriginateTls>,
}

#[derive(Deserialize)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "an address (\"ip:port\"), or { address, mesh, identity, tls: { server_name, ca_file } }"
)]
enum UpstreamEntry {
    Address(SocketAddr),
    Detailed {
        address: SocketAddr,
        #[serde(default)]
        mesh: bool,
        #[serde(default)]
        identity: Option<String>,
        #[serde(default)]
        tls: Option<OriginateTls>,
    },
}

impl From<UpstreamEntry> for Upstream {
    fn from(entry: UpstreamEntry) -> Self {
        match entry {
            UpstreamEntry::Address(address) => Upstream::plain(address),
            UpstreamEntry::Detailed {
                address,
                mesh,
                identity,
                tls,
            } => Upstream {
                address,
                mesh,
                identity,
                tls,
            },
        }
    }
}

impl Upstream {
    /// An upstream reached in plaintext.
    pub fn plain(address: SocketAddr) -> Self {
        Upstream {
            address,
            mesh: false,
            identity: None,
            tls: None,
        }
    }
}

/// TLS the sidecar opens to an external server.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginateTls {
    /// The name sent (SNI) and checked in the server's certificate; the
    /// request's host when unset.
    #[serde(default)]
    pub server_name: Option<String>,
    /// The CA the server's certificate must chain to (PEM).
    pub ca_file: PathBuf,
    /// How often `ca_file` is read for a new CA, in milliseconds (default
    /// 5000, between 10 and 86400000).
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

/// TLS origination for one external host (any outbound mode).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginationConfig {
    /// The host the application names (`Host` / `:authority`), lowercase.
    pub host: String,
    /// The server's TLS port, replacing the port the application called
    /// (default 443); explicit upstreams keep their address when unset.
    #[serde(default)]
    pub port: Option<u16>,
    /// The name sent (SNI) and checked in the server's certificate; `host`
    /// when unset.
    #[serde(default)]
    pub server_name: Option<String>,
    /// The CA the server's certificate must chain to (PEM).
    pub ca_file: PathBuf,
    /// How often `ca_file` is read for a new CA, in milliseconds (default
    /// 5000, between 10 and 86400000).
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

impl OriginationConfig {
    /// Its server name and CA.
    pub fn tls(&self) -> OriginateTls {
        OriginateTls {
            server_name: self.server_name.clone(),
            ca_file: self.ca_file.clone(),
            reload_interval_ms: self.reload_interval_ms,
        }
    }
}

fn default_databases() -> Vec<DatabaseConfig> {
    vec![
        DatabaseConfig::recognised(DatabaseProtocol::Postgres, 5432),
        DatabaseConfig::recognised(DatabaseProtocol::Mysql, 3306),
    ]
}

/// A database wire protocol the sidecar decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatabaseProtocol {
    /// PostgreSQL (frontend/backend protocol 3.0).
    Postgres,
    /// MySQL and MariaDB (client/server protocol 4.1).
    Mysql,
}

impl DatabaseProtocol {
    /// The name used in metrics and in hop events (`postgresql`, `mysql`).
    pub fn system(self) -> &'static str {
        match self {
            DatabaseProtocol::Postgres => "postgresql",
            DatabaseProtocol::Mysql => "mysql",
        }
    }
}

/// What the sidecar does when a database client asks for TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum DatabaseTls {
    /// The session passes through encrypted, end to end between client and
    /// server; it is recorded as `encrypted, not inspected`.
    #[default]
    Passthrough,
    /// The sidecar ends the client's TLS with its own certificate and opens
    /// TLS to the server, verified against `upstream_ca_file`; the session in
    /// between is decoded (PostgreSQL `SSLRequest`, MySQL `CLIENT_SSL` in the
    /// handshake).
    Terminate {
        /// The certificate chain shown to clients (PEM).
        cert_file: PathBuf,
        /// Its private key (PEM).
        key_file: PathBuf,
        /// The CA the server's certificate must chain to (PEM).
        upstream_ca_file: PathBuf,
        /// The name the server's certificate must carry; its IP address
        /// when unset.
        #[serde(default)]
        upstream_server_name: Option<String>,
        /// How long the server may take to answer `SSLRequest`
        /// (PostgreSQL) or to send its greeting (MySQL), the MySQL client
        /// its first packet, and each TLS handshake (server side, client
        /// side), in milliseconds (default 10000). On expiry the client's
        /// connection is closed and the failure recorded.
        #[serde(default = "default_tls_handshake_timeout_ms")]
        handshake_timeout_ms: u64,
        /// How often `cert_file`, `key_file` and `upstream_ca_file` are
        /// read for a new set (rotation without a restart), in
        /// milliseconds (default 5000, between 10 and 86400000).
        #[serde(default = "default_reload_interval_ms")]
        reload_interval_ms: u64,
    },
}

fn default_tls_handshake_timeout_ms() -> u64 {
    10_000
}

impl DatabaseTls {
    /// The bound on each step of a terminated TLS negotiation.
    pub fn handshake_timeout(&self) -> std::time::Duration {
        match self {
            DatabaseTls::Terminate {
                handshake_timeout_ms,
                ..
            } => std::time::Duration::from_millis(*handshake_timeout_ms),
            DatabaseTls::Passthrough => {
                std::time::Duration::from_millis(default_tls_handshake_timeout_ms())
            }
        }
    }
}

/// One database the sidecar decodes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The wire protocol.
    pub protocol: DatabaseProtocol,
    /// Destination ports recognised on the outbound listener (transparent mode).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// A listener of its own that forwards to `upstream` (explicit mode:
    /// local runs, benchmarks, applications configured with a proxy address).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The server behind `listen`.
    #[serde(default)]
    pub upstream: Option<SocketAddr>,
    /// Sessions that ask for TLS.
    #[serde(default)]
    pub tls: DatabaseTls,
    /// Append a sqlcommenter comment naming the chain
    /// (`/*custody_chain='…',traceparent='…'*/`) to the simple-protocol
    /// statements (PostgreSQL `Query`, MySQL `COM_QUERY`) of attributed
    /// chains, so the server's own views show it (default false: bytes are
    /// forwarded unchanged). Prepared statements are never annotated.
    #[serde(default)]
    pub annotate: bool,
}

impl DatabaseConfig {
    /// A database recognised on one port, with the defaults.
    pub fn recognised(protocol: DatabaseProtocol, port: u16) -> Self {
        DatabaseConfig {
            protocol,
            ports: vec![port],
            listen: None,
            upstream: None,
            tls: DatabaseTls::Passthrough,
            annotate: false,
        }
    }
}

/// Classification of database results.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassificationConfig {
    /// Rows of each result set whose values are examined (default 64).
    #[serde(default = "default_sample_rows")]
    pub sample_rows: u64,
    /// Value bytes of each result set examined (default 64 KiB).
    #[serde(default = "default_sample_bytes")]
    pub sample_bytes: u64,
    /// Findings below this confidence are not reported (default 0.3).
    #[serde(default = "default_min_confidence")]
    pub min_confidence: f32,
    /// Findings at or above this confidence join the chain's taint (default 0.5).
    #[serde(default = "default_taint_confidence")]
    pub taint_min_confidence: f32,
}

fn default_sample_rows() -> u64 {
    64
}
fn default_sample_bytes() -> u64 {
    64 << 10
}
fn default_min_confidence() -> f32 {
    0.3
}
fn default_taint_confidence() -> f32 {
    0.5
}

impl Default for ClassificationConfig {
    fn default() -> Self {
        ClassificationConfig {
            sample_rows: default_sample_rows(),
            sample_bytes: default_sample_bytes(),
            min_confidence: default_min_confidence(),
            taint_min_confidence: default_taint_confidence(),
        }
    }
}

fn default_threads() -> usize {
    1
}

/// Environment variables that override `workload.namespace`,
/// `workload.service_account` and `workload.pod` when set and not empty: the
/// Helm chart's injector sets them from the pod's metadata (downward API),
/// since a pod's name is not known when its configuration is rendered.
pub const WORKLOAD_ENV: [&str; 3] = [
    "CUSTODY_WORKLOAD_NAMESPACE",
    "CUSTODY_WORKLOAD_SERVICE_ACCOUNT",
    "CUSTODY_WORKLOAD_POD",
];

/// The workload identity: the Helm chart fills it from the pod's metadata
/// (see [`WORKLOAD_ENV`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// The trust domain, also the tokens' audience.
    pub trust_domain: String,
    /// The namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The pod name.
    #[serde(default)]
    pub pod: Option<String>,
}

/// Listening addresses.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenersConfig {
    /// In front of the local application.
    pub inbound: SocketAddr,
    /// Where the application's outbound traffic arrives.
    pub outbound: SocketAddr,
    /// `/metrics`, `/ready`, `/live`, `/policy`, `/keys`.
    pub admin: SocketAddr,
    /// A second inbound listener that ends TLS (HTTP/1.1 and HTTP/2 by
    /// ALPN) and then serves like `inbound`.
    #[serde(default)]
    pub inbound_tls: Option<InboundTlsConfig>,
}

/// An inbound listener ending TLS with the sidecar's certificate.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundTlsConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// The certificate chain shown to callers (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// How often `cert_file` and `key_file` are read for a new certificate
    /// (rotation without a restart), in milliseconds (default 5000,
    /// between 10 and 86400000).
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

/// Inbound traffic.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// The local application.
    pub upstream: SocketAddr,
    /// Refuse a request whose `Txn-Token` is not valid (401), rather than
    /// passing it with a chain attributed to the peer.
    #[serde(default)]
    pub refuse_invalid_tokens: bool,
    /// Headers removed from every inbound request before anything reads
    /// them: identity headers that must not be trusted from outside the edge.
    #[serde(default)]
    pub strip_headers: Vec<String>,
    /// Where the initiator of a new chain comes from, tried in order.
    #[serde(default)]
    pub identity_sources: Vec<IdentitySource>,
    /// The `scope` of chains this sidecar starts.
    #[serde(default = "default_scope")]
    pub scope: String,
}

fn default_scope() -> String {
    "default".into()
}

/// One place the initiator of a new chain can come from.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum IdentitySource {
    /// A verified bearer JWT (`Authorization: Bearer`) from an issuer whose
    /// keys are in a JWKS file; its `sub` is the initiator.
    BearerJwt {
        /// The expected `iss`.
        issuer: String,
        /// The issuer's JWKS file.
        jwks_file: PathBuf,
        /// The expected `aud`, when checked.
        #[serde(default)]
        audience: Option<String>,
        /// The initiator kind of its subjects (default `human`).
        #[serde(default = "default_human")]
        kind: InitiatorKind,
    },
    /// A header set by a trusted edge (ingress gateway, auth proxy).
    EdgeHeader {
        /// The header name, e.g. `x-custody-user`.
        header: String,
        /// The initiator kind it names.
        kind: InitiatorKind,
    },
    /// A header naming the calling agent; the initiator kind is `agent`.
    AgentHeader {
        /// The header name, e.g. `x-custody-agent`.
        header: String,
    },
    /// The agent named in an MCP `tools/call` JSON-RPC request, at
    /// `params._meta.<agent_key>`; the tool name becomes the hop's operation.
    /// Bodies up to 64 KiB with a `Content-Length` are read for it; when an
    /// earlier source named someone else (a person at the edge), the agent
    /// becomes the token's actor (`act`).
    Mcp {
        /// The `_meta` key naming the agent (default `agent`).
        #[serde(default = "default_agent_key")]
        agent_key: String,
    },
}

fn default_human() -> InitiatorKind {
    InitiatorKind::Human
}

fn default_agent_key() -> String {
    "agent".into()
}

/// Outbound destination mode.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum OutboundMode {
    /// Destinations by `Host` / `:authority` (with or without port) for
    /// local runs and tests.
    Explicit {
        /// Host (or `host:port`) to address: `"127.0.0.1:9090"`, or
        /// `{ address, mesh: true, identity }` for a mesh peer, or
        /// `{ address, tls: { server_name, ca_file } }` for TLS origination.
        #[serde(default)]
        upstreams: BTreeMap<String, Upstream>,
        /// Where hosts not in the map go; unset refuses them (502).
        #[serde(default)]
        default: Option<SocketAddr>,
    },
    /// Connections redirected by iptables go to their original destination
    /// (`SO_ORIGINAL_DST`).
    Transparent,
}

/// The signing key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// A file holding the 32-byte Ed25519 seed as 64 hex digits; a fresh key
    /// is generated when unset.
    #[serde(default)]
    pub seed_file: Option<PathBuf>,
    /// The key id; derived from the public key when unset.
    #[serde(default)]
    pub kid: Option<String>,
    /// Lifetime of the tokens this sidecar issues (default 300 s).
    #[serde(default)]
    pub token_ttl_secs: Option<u64>,
    /// Have the control plane (`policy.control_plane`) issue the signing
    /// key: the public half is registered with this workload's identity,
    /// the control plane assigns the key id, binds the key to the workload
    /// for a bounded lifetime and publishes it to every sidecar; the key is
    /// renewed at two thirds of its lifetime. The sidecar does not start
    /// without it.
    #[serde(default)]
    pub register: bool,
    /// How long to wait for the control plane at start (default 30 s).
    #[serde(default = "default_register_timeout")]
    pub register_timeout_secs: u64,
}

fn default_register_timeout() -> u64 {
    30
}

impl Default for SigningConfig {
    fn default() -> Self {
        SigningConfig {
            seed_file: None,
            kid: None,
            token_ttl_secs: None,
            register: false,
            register_timeout_secs: default_register_timeout(),
        }
    }
}

/// Credentials for the control plane (used by the policy stream, the hop
/// exporter and key registration).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// A file holding the bearer token to present (a mounted secret).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A Kubernetes projected service-account token (audience `custody`),
    /// presented instead of `token_file` when set. Read again on every call,
    /// since the kubelet rotates it.
    #[serde(default)]
    pub service_account_token_file: Option<PathBuf>,
}

/// The keys trusted to verify tokens.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// A key-set file (standalone mode): see [`crate::trust::KeySetFile`].
    /// The sidecar's own key is always trusted.
    #[serde(default)]
    pub key_set_file: Option<PathBuf>,
    /// Verified tokens remembered, so a token presented again (retries,
    /// several calls of one hop) costs a hash, not a signature check
    /// (default 1024).
    #[serde(default = "default_verify_cache")]
    pub verify_cache_size: usize,
    /// Clock leeway when checking `iat` and `exp`, in seconds (default 30).
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

fn default_verify_cache() -> usize {
    1024
}

fn default_leeway() -> u64 {
    30
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            key_set_file: None,
            verify_cache_size: default_verify_cache(),
            leeway_secs: default_leeway(),
        }
    }
}

/// Egress policy sources.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// A policy-bundle file (YAML or JSON), watched and applied on change.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// The control plane's `PolicyDistribution` address (`http://host:port`).
    #[serde(default)]
    pub control_plane: Option<String>,
    /// Where the applied bundle is kept, so a restart enforces it.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// How often the policy file is checked, in milliseconds (default 200).
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
}

fn default_poll_ms() -> u64 {
    200
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            file: None,
            control_plane: None,
            state_dir: None,
            poll_interval_ms: default_poll_ms(),
        }
    }
}

/// Hop export.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExporterConfig {
    /// The control plane's `Ingest` address (`http://host:port`).
    #[serde(default)]
    pub control_plane: Option<String>,
    /// A JSON-lines file (standalone mode).
    #[serde(default)]
    pub jsonl_file: Option<PathBuf>,
    /// Events held at most; more are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue_size: usize,
    /// Events per batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Longest wait before a partial batch is sent, in milliseconds.
    #[serde(default = "default_flush_ms")]
    pub flush_interval_ms: u64,
}

fn default_queue() -> usize {
    4096
}
fn default_batch() -> usize {
    256
}
fn default_flush_ms() -> u64 {
    200
}

impl Default for ExporterConfig {
    fn default() -> Self {
        ExporterConfig {
            control_plane: None,
            jsonl_file: None,
            queue_size: default_queue(),
            batch_size: default_batch(),
            flush_interval_ms: default_flush_ms(),
        }
    }
}

/// Graceful shutdown.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM: listeners close at once, requests in flight get this
    /// long to finish (default 5 s).
    #[serde(default = "default_grace")]
    pub grace_period_secs: u64,
    /// Then the runtimes get this long to stop (default 1 s).
    #[serde(default = "default_final")]
    pub final_timeout_secs: u64,
}

fn default_grace() -> u64 {
    5
}
fn default_final() -> u64 {
    1
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period_secs: default_grace(),
            final_timeout_secs: default_final(),
        }
    }
}

impl Config {
    /// Parses and checks a YAML document.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Config::from_yaml_with_env(text, |_| None)
    }

    /// Parses a YAML document, lets the variables of [`WORKLOAD_ENV`] found
    /// by `env` override the workload fields, and checks the result.
    pub fn from_yaml_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::field(field, e.into_inner().to_string())
        })?;
        let value = |name: &str| env(name).filter(|v| !v.is_empty());
        if let Some(v) = value(WORKLOAD_ENV[0]) {
            config.workload.namespace = v;
        }
        if let Some(v) = value(WORKLOAD_ENV[1]) {
            config.workload.service_account = v;
        }
        if let Some(v) = value(WORKLOAD_ENV[2]) {
            config.workload.pod = Some(v);
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and checks a YAML file; the variables of
    /// [`WORKLOAD_ENV`], when set, override the workload fields.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_yaml_with_env(&text, |name| std::env::var(name).ok())
    }

    /// The workload identity.
    pub fn workload_id(&self) -> Result<WorkloadId, ConfigError> {
        let w = &self.workload;
        let id = WorkloadId::new(&w.trust_domain, &w.namespace, &w.service_account)
            .map_err(|e| ConfigError::field("workload", e.to_string()))?;
        match &w.pod {
            Some(pod) => id
                .with_pod(pod)
                .map_err(|e| ConfigError::field("workload.pod", e.to_string())),
            None => Ok(id),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.workload_id()?;
        self.validate_listeners()?;
        if self.threads == 0 {
            return Err(ConfigError::field("threads", "must be at least 1"));
        }
        if self.exporter.queue_size == 0 {
            return Err(ConfigError::field(
                "exporter.queue_size",
                "must be at least 1",
            ));
        }
        if self.exporter.batch_size == 0 {
            return Err(ConfigError::field(
                "exporter.batch_size",
                "must be at least 1",
            ));
        }
        if self.inbound.scope.is_empty() {
            return Err(ConfigError::field("inbound.scope", "must not be empty"));
        }
        for (i, name) in self.inbound.strip_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::field(
                    format!("inbound.strip_headers[{i}]"),
                    format!("{name:?} is not a header name"),
                ));
            }
        }
        for (i, source) in self.inbound.identity_sources.iter().enumerate() {
            let header = match source {
                IdentitySource::EdgeHeader { header, .. }
                | IdentitySource::AgentHeader { header } => header,
                IdentitySource::BearerJwt { issuer, .. } => {
                    if issuer.is_empty() {
                        return Err(ConfigError::field(
                            format!("inbound.identity_sources[{i}].issuer"),
                            "must not be empty",
                        ));
                    }
                    continue;
                }
                IdentitySource::Mcp { agent_key } => {
                    if agent_key.is_empty() {
                        return Err(ConfigError::field(
                            format!("inbound.identity_sources[{i}].agent_key"),
                            "must not be empty",
                        ));
                    }
                    continue;
                }
            };
            if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                return Err(ConfigError::field(
                    format!("inbound.identity_sources[{i}].header"),
                    format!("{header:?} is not a header name"),
                ));
            }
        }
        if self.signing.register && self.policy.control_plane.is_none() {
            return Err(ConfigError::field(
                "signing.register",
                "needs policy.control_plane, the control plane that issues the key",
            ));
        }
        self.validate_databases()?;
        self.validate_tls()?;
        self.validate_reload_intervals()?;
        if let Some(file) = &self.signing.seed_file
            && file.as_os_str().is_empty()
        {
            return Err(ConfigError::field("signing.seed_file", "must not be empty"));
        }
        Ok(())
    }

    /// Every listener on an address of its own. (Two listeners on one
    /// address would share one socket in pingora's listener table, which
    /// then closes it twice at shutdown.)
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let listeners = &self.listeners;
        let mut seen: Vec<(String, SocketAddr)> = vec![
            ("listeners.inbound".into(), listeners.inbound),
            ("listeners.outbound".into(), listeners.outbound),
            ("listeners.admin".into(), listeners.admin),
        ];
        let mut more: Vec<(String, SocketAddr)> = Vec::new();
        if let Some(tls) = &listeners.inbound_tls {
            more.push(("listeners.inbound_tls.address".into(), tls.address));
        }
        for (i, db) in self.databases.iter().enumerate() {
            if let Some(listen) = db.listen {
                more.push((format!("databases[{i}].listen"), listen));
            }
        }
        for (field, addr) in seen.split_off(1).into_iter().chain(more) {
            if let Some((other, _)) = seen.iter().find(|(_, a)| *a == addr) {
                return Err(ConfigError::field(
                    field,
                    format!("{addr} is already the address of {other}"),
                ));
            }
            seen.push((field, addr));
        }
        Ok(())
    }

    fn validate_databases(&self) -> Result<(), ConfigError> {
        let mut ports = std::collections::BTreeSet::new();
        for (i, db) in self.databases.iter().enumerate() {
            for (j, port) in db.ports.iter().enumerate() {
                if *port == 0 {
                    return Err(ConfigError::field(
                        format!("databases[{i}].ports[{j}]"),
                        "must not be 0",
                    ));
                }
                if !ports.insert(*port) {
                    return Err(ConfigError::field(
                        format!("databases[{i}].ports[{j}]"),
                        format!("port {port} is listed twice"),
                    ));
                }
            }
            if let DatabaseTls::Terminate {
                handshake_timeout_ms,
                ..
            } = db.tls
                && !(1..=600_000).contains(&handshake_timeout_ms)
            {
                return Err(ConfigError::field(
                    format!("databases[{i}].tls.handshake_timeout_ms"),
                    "must be between 1 and 600000",
                ));
            }
            match (db.listen, db.upstream) {
                // (Its address differs from the other listeners': see
                // `validate_listeners`.)
                (Some(_), Some(_)) => {}
                (Some(_), None) => {
                    return Err(ConfigError::field(
                        format!("databases[{i}].upstream"),
                        "is required with listen",
                    ));
                }
                (None, Some(_)) => {
                    return Err(ConfigError::field(
                        format!("databases[{i}].listen"),
                        "is required with upstream",
                    ));
                }
                (None, None) => {}
            }
        }
        let c = &self.classification;
        if c.sample_rows == 0 || c.sample_rows > 1_000_000 {
            return Err(ConfigError::field(
                "classification.sample_rows",
                "must be between 1 and 1000000",
            ));
        }
        if c.sample_bytes == 0 || c.sample_bytes > 256 << 20 {
            return Err(ConfigError::field(
                "classification.sample_bytes",
                "must be between 1 and 268435456",
            ));
        }
        for (name, value) in [
            ("classification.min_confidence", c.min_confidence),
            (
                "classification.taint_min_confidence",
                c.taint_min_confidence,
            ),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(ConfigError::field(name, "must be between 0 and 1"));
            }
        }
        Ok(())
    }

    /// Every `reload_interval_ms` within [`RELOAD_INTERVAL_MS`].
    fn validate_reload_intervals(&self) -> Result<(), ConfigError> {
        let mut intervals: Vec<(String, u64)> = Vec::new();
        if let Some(mesh) = &self.mesh_tls {
            intervals.push((
                "mesh_tls.reload_interval_ms".into(),
                mesh.reload_interval_ms,
            ));
        }
        if let Some(tls) = &self.listeners.inbound_tls {
            intervals.push((
                "listeners.inbound_tls.reload_interval_ms".into(),
                tls.reload_interval_ms,
            ));
        }
        for (i, db) in self.databases.iter().enumerate() {
            if let DatabaseTls::Terminate {
                reload_interval_ms, ..
            } = db.tls
            {
                intervals.push((
                    format!("databases[{i}].tls.reload_interval_ms"),
                    reload_interval_ms,
                ));
            }
        }
        for (i, entry) in self.tls_origination.iter().enumerate() {
            intervals.push((
                format!("tls_origination[{i}].reload_interval_ms"),
                entry.reload_interval_ms,
            ));
        }
        if let OutboundMode::Explicit { upstreams, .. } = &self.outbound {
            for (name, upstream) in upstreams {
                if let Some(tls) = &upstream.tls {
                    intervals.push((
                        format!("outbound.upstreams.{name}.tls.reload_interval_ms"),
                        tls.reload_interval_ms,
                    ));
                }
            }
        }
        for (field, value) in intervals {
            if !RELOAD_INTERVAL_MS.contains(&value) {
                return Err(ConfigError::field(
                    field,
                    format!(
                        "must be between {} and {}",
                        RELOAD_INTERVAL_MS.start(),
                        RELOAD_INTERVAL_MS.end()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        let domain = format!("spiffe://{}/", self.workload.trust_domain);
        let check_identity = |field: String, identity: &Option<String>| match identity {
            Some(id) if !id.starts_with(&domain) || WorkloadId::parse_uri(id).is_err() => {
                Err(ConfigError::field(
                    field,
                    format!(
                        "{id:?} is not a SPIFFE ID in trust domain {}",
                        self.workload.trust_domain
                    ),
                ))
            }
            _ => Ok(()),
        };
        if let Some(mesh) = &self.mesh_tls {
            for (i, peer) in mesh.peers.iter().enumerate() {
                if peer.destination.is_empty()
                    || (peer.destination.contains('/') && parse_cidr(&peer.destination).is_none())
                {
                    return Err(ConfigError::field(
                        format!("mesh_tls.peers[{i}].destination"),
                        format!(
                            "{:?} is not a host, suffix, address or CIDR",
                            peer.destination
                        ),
                    ));
                }
                check_identity(format!("mesh_tls.peers[{i}].identity"), &peer.identity)?;
            }
        }
        if let OutboundMode::Explicit { upstreams, .. } = &self.outbound {
            for (name, upstream) in upstreams {
                let field = format!("outbound.upstreams.{name}");
                if upstream.mesh && self.mesh_tls.is_none() {
                    return Err(ConfigError::field(
                        format!("{field}.mesh"),
                        "needs mesh_tls, the certificates of the mesh",
                    ));
                }
                if upstream.mesh && upstream.tls.is_some() {
                    return Err(ConfigError::field(
                        format!("{field}.tls"),
                        "a mesh peer is called over mesh mTLS, not tls",
                    ));
                }
                if upstream.identity.is_some() && !upstream.mesh {
                    return Err(ConfigError::field(
                        format!("{field}.identity"),
                        "needs mesh: true",
                    ));
                }
                check_identity(format!("{field}.identity"), &upstream.identity)?;
                if let Some(tls) = &upstream.tls {
                    check_server_name(&format!("{field}.tls.server_name"), tls)?;
                }
            }
        }
        for (i, entry) in self.tls_origination.iter().enumerate() {
            if entry.host.is_empty() {
                return Err(ConfigError::field(
                    format!("tls_origination[{i}].host"),
                    "must not be empty",
                ));
            }
            if entry.port == Some(0) {
                return Err(ConfigError::field(
                    format!("tls_origination[{i}].port"),
                    "must not be 0",
                ));
            }
            check_server_name(&format!("tls_origination[{i}].server_name"), &entry.tls())?;
        }
        Ok(())
    }

    /// The database protocol recognised on outbound connections to `port`.
    pub fn database_on_port(&self, port: u16) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.ports.contains(&port))
    }
}

fn check_server_name(field: &str, tls: &OriginateTls) -> Result<(), ConfigError> {
    match &tls.server_name {
        Some(name)
            if tokio_rustls::rustls::pki_types::ServerName::try_from(name.as_str()).is_err() =>
        {
            Err(ConfigError::field(
                field,
                format!("{name:?} is not a server name"),
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
