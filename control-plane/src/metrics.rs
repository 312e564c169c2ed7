//! Prometheus metrics of the control plane (served on `/metrics`).
//!
//! | name | type | labels |
//! |---|---|---|
//! | `custody_chains_total` | counter | `coverage`: chains entering a class: once when first assembled, again only when re-assembly moves the chain to another class (the previous class is read from the store, so new hops or a restart do not count it again) |
//! | `custody_hops_total` | counter | `attribution`: accepted hops by attribution method (the coverage dashboard's ratio) |
//! | `custody_ingest_hops_total` | counter | accepted hops |
//! | `custody_ingest_duplicates_total` | counter | hops ignored as already stored |
//! | `custody_ingest_rejected_total` | counter | `reason`: `<field>_<problem>` from hop validation, or `workload_mismatch` (a hop naming another workload than the caller's token proves) |
//! | `custody_policy_push_latency_seconds` | histogram | from a policy commit to a client's acknowledgement |
//! | `custody_connected_clients` | gauge | `kind`: `proxy`, `agent`, `other` |
//! | `custody_store_bytes` | gauge | bytes in use in the store |
//! | `custody_assembly_pending_chains` | gauge | chains with new hops waiting for assembly (read at scrape time) |
//! | `custody_assembly_wait_seconds` | gauge | how long the oldest of them has waited (0 when none waits): how far chains lag behind ingest |
//! | `custody_assembly_pass_seconds` | histogram | `stage`: `assemble` (load and assemble a pass of chains), `store` (write its trees) |
//! | `custody_control_auth_refused_total` | counter | `api`: `grpc`, `http`; `reason`: `missing`, `unknown_token`, a workload-token refusal (`malformed`, `disallowed_algorithm`, `unknown_key_id`, `bad_signature`, `expired`, `not_yet_valid`, `wrong_issuer`, `wrong_audience`, `claims`), `role` (authenticated, not allowed there), `workload_mismatch` (a workload token claiming another workload) |

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label set with one label `coverage`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CoverageLabel {
    /// propagated, stitched, partial, orphan.
    pub coverage: &'static str,
}

/// A label set with one label `attribution`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttributionLabel {
    /// The attribution method.
    pub attribution: &'static str,
}

/// A label set with one label `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A bounded reason.
    pub reason: String,
}

/// The labels of `custody_control_auth_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthRefusedLabels {
    /// `grpc` or `http`.
    pub api: &'static str,
    /// A bounded reason.
    pub reason: &'static str,
}

/// Buckets of `custody_assembly_pass_seconds`.
fn pass_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

/// A label set with one label `stage`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// `assemble` or `store`.
    pub stage: &'static str,
}

/// A label set with one label `kind`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// proxy, agent or other.
    pub kind: &'static str,
}

/// Every metric, registered.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Chains by coverage class.
    pub chains: Family<CoverageLabel, Counter>,
    /// Hops by attribution method.
    pub hops: Family<AttributionLabel, Counter>,
    /// Accepted hops.
    pub ingest_hops: Counter,
    /// Duplicate hops.
    pub ingest_duplicates: Counter,
    /// Rejected hops by reason.
    pub ingest_rejected: Family<ReasonLabel, Counter>,
    /// Policy push latency.
    pub policy_push_latency: Histogram,
    /// Connected policy subscribers.
    pub connected_clients: Family<KindLabel, Gauge>,
    /// Store size.
    pub store_bytes: Gauge,
    /// Callers refused, by API and reason.
    pub auth_refused: Family<AuthRefusedLabels, Counter>,
    /// Chains waiting for assembly.
    pub assembly_pending: Gauge,
    /// How long the oldest chain waiting for assembly has waited.
    pub assembly_wait: Gauge<f64, AtomicU64>,
    /// Duration of assembly passes, by stage.
    pub assembly_pass: Family<StageLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The bounded `kind` label of a subscriber.
pub fn client_kind(kind: &str) -> &'static str {
    match kind {
        "proxy" => "proxy",
        "agent" => "agent",
        _ => "other",
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let chains = Family::<CoverageLabel, Counter>::default();
        let hops = Family::<AttributionLabel, Counter>::default();
        let ingest_hops = Counter::default();
        let ingest_duplicates = Counter::default();
        let ingest_rejected = Family::<ReasonLabel, Counter>::default();
        let policy_push_latency = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let connected_clients = Family::<KindLabel, Gauge>::default();
        let store_bytes = Gauge::default();
        let auth_refused = Family::<AuthRefusedLabels, Counter>::default();
        let assembly_pending = Gauge::default();
        let assembly_wait = Gauge::<f64, AtomicU64>::default();
        let assembly_pass =
            Family::<StageLabel, Histogram>::new_with_constructor(pass_histogram as fn() -> _);
        registry.register(
            "custody_chains",
            "Chains assembled, by coverage class",
            chains.clone(),
        );
        registry.register(
            "custody_hops",
            "Accepted hops, by attribution method",
            hops.clone(),
        );
        registry.register("custody_ingest_hops", "Accepted hops", ingest_hops.clone());
        registry.register(
            "custody_ingest_duplicates",
            "Hops ignored as already stored",
            ingest_duplicates.clone(),
        );
        registry.register(
            "custody_ingest_rejected",
            "Rejected hops, by reason",
            ingest_rejected.clone(),
        );
        registry.register(
            "custody_policy_push_latency_seconds",
            "From a policy commit to a client's acknowledgement",
            policy_push_latency.clone(),
        );
        registry.register(
            "custody_connected_clients",
            "Connected policy subscribers, by kind",
            connected_clients.clone(),
        );
        registry.register(
            "custody_store_bytes",
            "Bytes in use in the store",
            store_bytes.clone(),
        );
        registry.register(
            "custody_control_auth_refused",
            "Callers refused: not authenticated, or not allowed what they asked",
            auth_refused.clone(),
        );
        registry.register(
            "custody_assembly_pending_chains",
            "Chains with new hops waiting for assembly",
            assembly_pending.clone(),
        );
        registry.register(
            "custody_assembly_wait_seconds",
            "How long the oldest chain waiting for assembly has waited",
            assembly_wait.clone(),
        );
        registry.register(
            "custody_assembly_pass_seconds",
            "Duration of assembly passes, by stage",
            assembly_pass.clone(),
        );
        Metrics {
            registry,
            assembly_pending,
            assembly_wait,
            assembly_pass,
            chains,
            hops,
            ingest_hops,
            ingest_duplicates,
            ingest_rejected,
            policy_push_latency,
            connected_clients,
            store_bytes,
            auth_refused,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::warn!(message = "metrics encoding failed");
        }
        out
    }
}
