//! The sidecar's Prometheus metrics (names and labels in `docs/metrics.md`).
//!
//! Every label value comes from a bounded set: directions, protocols, status
//! classes, outcome and refusal-reason labels, verdicts, and policy names
//! (bounded by the policy bundle).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of `custody_proxy_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `http1`, `http2` or `grpc`.
    pub protocol: &'static str,
    /// `1xx` .. `5xx`, or `none` when no response was written.
    pub status_class: &'static str,
}

/// Labels of `custody_proxy_context_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ContextLabels {
    /// `propagated`, `extended`, `minted`, `stitched`, `missing`, `refused`.
    pub outcome: &'static str,
    /// The refusal reason for `refused`, else empty.
    pub reason: &'static str,
}

/// Labels of `custody_proxy_egress_verdicts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    /// `allow`, `audit` or `block`.
    pub verdict: &'static str,
    /// The deciding policy, or `default`.
    pub policy: String,
}

/// Labels of `custody_proxy_db_connections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbConnectionLabels {
    /// `postgresql` or `mysql`.
    pub system: &'static str,
    /// `decoded`, `encrypted` (TLS, not inspected), `unparsed` (a decoder
    /// gave up; forwarded untouched), `blocked` (egress policy) or
    /// `tls_failed` (TLS termination failed; closed).
    pub inspection: &'static str,
}

/// Labels of `custody_proxy_db_queries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbQueryLabels {
    /// `postgresql` or `mysql`.
    pub system: &'static str,
    /// `select`, `insert`, `update`, `delete`, `merge`, `ddl`, `copy`,
    /// `transaction` or `other`.
    pub kind: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

/// Labels of `custody_proxy_db_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbBytesLabels {
    /// `postgresql` or `mysql`.
    pub system: &'static str,
    /// `client` (sent by the client) or `server`.
    pub direction: &'static str,
}

/// Labels of `custody_proxy_db_decode_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbDecodeLabels {
    /// `postgresql` or `mysql`.
    pub system: &'static str,
    /// `client` or `server`: whose bytes the decoder gave up on.
    pub side: &'static str,
}

/// Labels of `custody_proxy_db_tls_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbTlsFailureLabels {
    /// `postgresql` or `mysql`.
    pub system: &'static str,
    /// `server_timeout`, `server_io`, `server_tls`, `client_timeout`,
    /// `client_io` or `client_tls`.
    pub reason: &'static str,
}

/// Labels of metrics counted per database system only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbSystemLabels {
    /// `postgresql` or `mysql`.
    pub system: &'static str,
}

/// Labels of `custody_proxy_data_classes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// The data class (`pii.email`, ...): the built-in classes.
    pub class: String,
}

/// Labels of `custody_proxy_mesh_tls_connections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MeshTlsLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Inbound: `mtls`, `plaintext` (served, permissive mode),
    /// `plaintext_refused` (strict mode), `tls_passthrough` and
    /// `tls_refused` (TLS that is not mesh mTLS), `handshake_failed` (including a
    /// client certificate from another CA), `identity_refused` (no SPIFFE
    /// ID of the trust domain). Outbound: `mtls`,
    /// `peer_certificate_untrusted`, `peer_identity_mismatch`,
    /// `peer_identity_missing`, `handshake_failed`, `connect_failed`.
    pub result: &'static str,
}

/// Labels of `custody_proxy_tls_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsReloadLabels {
    /// The configuration block whose files changed: `mesh_tls`,
    /// `listeners.inbound_tls`, `databases[<i>].tls`,
    /// `tls_origination[<i>]` or `outbound.upstreams.<name>.tls` (bounded
    /// by the configuration).
    pub material: String,
    /// `applied` (a new set in force for new handshakes) or `refused`
    /// (the files changed but failed a check; the set in force stays).
    pub result: &'static str,
}

/// Labels of `custody_proxy_tls_cert_expiry_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsMaterialLabels {
    /// The configuration block of the certificate, as in
    /// [`TlsReloadLabels::material`].
    pub material: String,
}

/// Labels of `custody_proxy_tls_origination_connections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginationLabels {
    /// `tls`, `peer_certificate_untrusted`, `handshake_failed` or
    /// `connect_failed`.
    pub result: &'static str,
}

/// All metrics of one sidecar.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests by direction, protocol and status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Chains this sidecar started.
    pub chains_started: Counter,
    /// Context outcomes.
    pub context: Family<ContextLabels, Counter>,
    /// Egress verdicts.
    pub egress_verdicts: Family<VerdictLabels, Counter>,
    /// Hop events waiting in the exporter queue.
    pub exporter_queue_depth: Gauge,
    /// Hop events dropped because the queue was full.
    pub exporter_dropped: Counter,
    /// Hop events the exporter failed to deliver.
    pub exporter_failed: Counter,
    /// The version of the policy bundle in force.
    pub policy_version: Gauge<u64, AtomicU64>,
    /// Database connections ended, by how far they were inspected.
    pub db_connections: Family<DbConnectionLabels, Counter>,
    /// Database statements completed.
    pub db_queries: Family<DbQueryLabels, Counter>,
    /// Database bytes relayed.
    pub db_bytes: Family<DbBytesLabels, Counter>,
    /// Database sessions a decoder gave up on (forwarded untouched).
    pub db_decode_errors: Family<DbDecodeLabels, Counter>,
    /// Terminated TLS negotiations that failed (the connection was closed).
    pub db_tls_failures: Family<DbTlsFailureLabels, Counter>,
    /// Statements sent with a sqlcommenter comment the sidecar appended.
    pub db_annotated: Family<DbSystemLabels, Counter>,
    /// Statements whose results held a data class.
    pub data_classes: Family<ClassLabels, Counter>,
    /// Mesh mTLS connections, by direction and result.
    pub mesh_tls_connections: Family<MeshTlsLabels, Counter>,
    /// Changes of TLS material files seen while running, by material and
    /// result.
    pub tls_reloads: Family<TlsReloadLabels, Counter>,
    /// When each certificate in force expires, in Unix seconds.
    pub tls_cert_expiry: Family<TlsMaterialLabels, Gauge>,
    /// TLS connections opened to external servers, by result.
    pub tls_origination_connections: Family<OriginationLabels, Counter>,
}

impl Metrics {
    /// Registers every metric under `custody_proxy_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("custody_proxy");
        r.register(
            "requests",
            "Requests by direction, protocol and status class",
            self.requests.clone(),
        );
        r.register(
            "chains_started",
            "Chains started by this sidecar",
            self.chains_started.clone(),
        );
        r.register(
            "context",
            "Identity-context outcomes, with the refusal reason",
            self.context.clone(),
        );
        r.register(
            "egress_verdicts",
            "Egress verdicts by deciding policy",
            self.egress_verdicts.clone(),
        );
        r.register(
            "exporter_queue_depth",
            "Hop events waiting in the exporter queue",
            self.exporter_queue_depth.clone(),
        );
        r.register(
            "exporter_dropped",
            "Hop events dropped because the exporter queue was full",
            self.exporter_dropped.clone(),
        );
        r.register(
            "exporter_failed",
            "Hop events the exporter could not deliver",
            self.exporter_failed.clone(),
        );
        r.register(
            "policy_version",
            "Version of the policy bundle in force",
            self.policy_version.clone(),
        );
        r.register(
            "db_connections",
            "Database connections ended, by how far they were inspected",
            self.db_connections.clone(),
        );
        r.register(
            "db_queries",
            "Database statements completed, by kind and outcome",
            self.db_queries.clone(),
        );
        r.register(
            "db_bytes",
            "Database bytes relayed, by sender",
            self.db_bytes.clone(),
        );
        r.register(
            "db_decode_errors",
            "Database sessions a decoder gave up on (then forwarded untouched)",
            self.db_decode_errors.clone(),
        );
        r.register(
            "db_tls_failures",
            "Terminated database TLS negotiations that failed, by reason (connection closed)",
            self.db_tls_failures.clone(),
        );
        r.register(
            "db_annotated",
            "Database statements sent with a sqlcommenter comment the sidecar appended",
            self.db_annotated.clone(),
        );
        r.register(
            "data_classes",
            "Database statements whose results held a data class",
            self.data_classes.clone(),
        );
        r.register(
            "mesh_tls_connections",
            "Mesh mTLS connections between sidecars, by direction and result",
            self.mesh_tls_connections.clone(),
        );
        r.register(
            "tls_reloads",
            "Changes of certificate, key and CA files seen while running, by material and result",
            self.tls_reloads.clone(),
        );
        r.register_with_unit(
            "tls_cert_expiry",
            "When each certificate in force expires, in Unix seconds, by material",
            prometheus_client::registry::Unit::Seconds,
            self.tls_cert_expiry.clone(),
        );
        r.register(
            "tls_origination_connections",
            "TLS connections the sidecar opened to external servers, by result",
            self.tls_origination_connections.clone(),
        );
    }
}

/// The status-class label of an HTTP status.
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "none",
    }
}
