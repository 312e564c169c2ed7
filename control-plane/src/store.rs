//! Storage behind a trait: hops, flows, assembled chains, policy state and
//! versions, the audit log, client applied-versions and issued keys.
//!
//! The trait is synchronous and object-safe; the server calls it from
//! blocking tasks. Every write method is one transaction: when it returns
//! `Ok`, the data is durable (that is what an ingest acknowledgement means).
//! [`SqliteStore`] is the embedded default; [`PostgresStore`] implements
//! the same trait on an external PostgreSQL server and passes the same
//! tests (`store/tests.rs` is written against `&dyn Store` and runs every
//! shared test on both).

use custody_context::api::v1::{FlowEvent, HopEvent};
use custody_context::policy::{EgressPolicy, Revocations, Verdict};
use serde::{Deserialize, Serialize};

use crate::assembly::{ChainSummary, ChainTree, Coverage};

mod common;
mod compact;
mod postgres;
mod sqlite;

/// Entry points for `cargo fuzz` (`control-plane/fuzz`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::compact;

    /// Decodes `bytes` as a stored summary and as a stored tree shape,
    /// which must never panic; a record that decodes encodes again to
    /// bytes that decode to the same record.
    pub fn stored_records(bytes: &[u8]) {
        if let Ok(summary) = compact::decode_summary(bytes) {
            let again = compact::encode_summary(&summary);
            let decoded = compact::decode_summary(&again);
            // Compared as records: a NaN confidence is not equal to itself.
            assert_eq!(decoded.map(|s| compact::encode_summary(&s)), Ok(again));
        }
        if let Ok(shape) = compact::decode_shape(bytes) {
            let again = compact::encode_shape(&shape);
            let decoded = compact::decode_shape(&again);
            assert_eq!(decoded.map(|s| compact::encode_shape(&s)), Ok(again));
        }
        // JSON of older stores goes through serde: no panic either.
        let _ = compact::stored_summary(bytes);
        let _ = compact::stored_shape(bytes);
    }
}

pub(crate) use postgres::tls_config;
pub use postgres::{PostgresOptions, PostgresStore};
pub use sqlite::{SqliteOptions, SqliteStore};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    /// PostgreSQL refused or failed, or could not be reached.
    #[error("postgres: {0}")]
    Postgres(String),
    /// A stored event did not decode.
    #[error("stored event does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A stored document did not decode.
    #[error("stored document does not decode: {0}")]
    Json(#[from] serde_json::Error),
    /// The data directory could not be prepared.
    #[error("data directory: {0}")]
    Io(#[from] std::io::Error),
    /// A stored chain record (summary or tree shape) did not decode.
    #[error("stored chain record does not decode: {0}")]
    Compact(&'static str),
    /// A stored value is out of range.
    #[error("stored value out of range: {0}")]
    Range(&'static str),
    /// The transaction that also held this write failed (group commit).
    #[error("group commit failed: {0}")]
    Group(String),
}

/// What a batch write did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutOutcome {
    /// Events stored for the first time.
    pub accepted: u32,
    /// Events already stored (same event id), ignored.
    pub duplicates: u32,
    /// Distinct chain ids of the accepted events.
    pub chains: Vec<String>,
    /// For each event of the batch, in order: whether it was new.
    pub fresh: Vec<bool>,
}

/// Filters for listing chains; unset fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainQuery {
    /// The initiator's subject, or any actor in its delegation history.
    pub initiator: Option<String>,
    /// A workload URI the chain crossed.
    pub service: Option<String>,
    /// A data class the chain touched.
    pub data_class: Option<String>,
    /// An egress destination host.
    pub destination: Option<String>,
    /// An egress verdict (`allow`, `audit`, `block`).
    pub verdict: Option<String>,
    /// An identity used: workload URI, `system/database/user`, or key id.
    pub identity: Option<String>,
    /// The coverage class.
    pub coverage: Option<Coverage>,
    /// Chains active at or after this time (Unix nanoseconds).
    pub since: Option<u64>,
    /// Chains active at or before this time (Unix nanoseconds).
    pub until: Option<u64>,
    /// At most this many, newest first.
    pub limit: u32,
}

/// The policy in force: every egress policy, revocations, one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    /// Increases with every change.
    pub version: u64,
    /// Policies in order.
    pub policies: Vec<EgressPolicy>,
    /// The verdict for destinations no rule matches.
    pub default_verdict: Verdict,
    /// What is revoked or quarantined.
    pub revocations: Revocations,
    /// When this version was committed, Unix nanoseconds.
    pub changed_unix_nanos: u64,
}

impl Default for PolicyState {
    fn default() -> Self {
        PolicyState {
            version: 0,
            policies: Vec::new(),
            default_verdict: Verdict::Allow,
            revocations: Revocations::default(),
            changed_unix_nanos: 0,
        }
    }
}

/// One entry of the audit log: who changed what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Assigned by the store.
    pub id: u64,
    /// Unix nanoseconds.
    pub at_unix_nanos: u64,
    /// The caller's identity (the name of its token).
    pub actor: String,
    /// e.g. `policy.apply`, `policy.delete`, `contain.revoke`.
    pub action: String,
    /// What was changed (a policy name, a principal, a chain id).
    pub target: String,
    /// The policy version the change produced.
    pub version: u64,
    /// Details of the change.
    pub detail: serde_json::Value,
}

/// The policy version a client last applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientVersion {
    /// The client's workload URI (with `#pod` when known).
    pub client: String,
    /// `proxy` or `agent`.
    pub kind: String,
    /// The version applied (or refused, when `error` is set).
    pub version: u64,
    /// How long the client took from receipt to enforcement.
    pub apply_nanos: u64,
    /// When the acknowledgement arrived, Unix nanoseconds.
    pub acked_unix_nanos: u64,
    /// From the version's commit to the acknowledgement.
    pub change_to_applied_nanos: u64,
    /// Why the client kept its previous version; empty on success.
    pub error: String,
}

/// A signing key issued to a sidecar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedKey {
    /// The key id.
    pub key_id: String,
    /// The raw Ed25519 public key.
    pub public: Vec<u8>,
    /// The workload URI it may sign for.
    pub workload: String,
    /// Validity start, Unix seconds.
    pub not_before_unix: u64,
    /// Validity end, Unix seconds.
    pub not_after_unix: u64,
}

/// How long and how much to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Events older than this many seconds are deleted.
    pub max_age_secs: u64,
    /// The oldest events are deleted while the store is larger than this.
    pub max_bytes: u64,
}

/// What a retention pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Hops deleted.
    pub hops: u64,
    /// Flows deleted.
    pub flows: u64,
    /// Chain summaries deleted.
    pub chains: u64,
}

/// Everything the control plane keeps.
pub trait Store: Send + Sync {
    /// Stores hop events, ignoring those already stored (the same event id
    /// and start time: a resent event keeps both), and marks the chains of new ones as pending assembly (durably, in the
    /// same transaction).
    fn put_hops(&self, hops: &[HopEvent]) -> Result<PutOutcome, StoreError>;
    /// Stores flow events, ignoring those whose event id is already stored.
    fn put_flows(&self, flows: &[FlowEvent]) -> Result<PutOutcome, StoreError>;
    /// Every hop reported under these chain ids.
    fn hops_of_chains(&self, chain_ids: &[String]) -> Result<Vec<HopEvent>, StoreError>;
    /// How many hops are stored under each of these chain ids, in order.
    /// The default reads the hops; a backend may count an index instead.
    fn chain_hop_counts(&self, chain_ids: &[String]) -> Result<Vec<u64>, StoreError> {
        chain_ids
            .iter()
            .map(|id| {
                self.hops_of_chains(std::slice::from_ref(id))
                    .map(|h| h.len() as u64)
            })
            .collect()
    }
    /// Hops with identity context of these workloads that started in
    /// `[earliest, latest]` and ended at or after `ended_by` (Unix
    /// nanoseconds): the candidate parents of contextless hops.
    fn hops_in_window(
        &self,
        workloads: &[String],
        earliest: u64,
        latest: u64,
        ended_by: u64,
    ) -> Result<Vec<HopEvent>, StoreError>;
    /// Hops with identity context of `workload` whose interval contains one
    /// of `spans` (`(start, end)`, Unix nanoseconds, sorted by start), that
    /// started at most `max_request_nanos` before the first span and ended
    /// at most that long after the last one started (a request lasts at
    /// most that long): the candidate parents of contextless hops. The
    /// default filters [`Store::hops_in_window`]; a backend may filter
    /// before decoding.
    fn hops_containing(
        &self,
        workload: &str,
        spans: &[(u64, u64)],
        max_request_nanos: u64,
    ) -> Result<Vec<HopEvent>, StoreError> {
        let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
            return Ok(Vec::new());
        };
        let ended_by = spans.iter().map(|s| s.1).min().unwrap_or(0);
        let mut hops = self.hops_in_window(
            &[workload.to_owned()],
            first.0.saturating_sub(max_request_nanos),
            last.0,
            ended_by,
        )?;
        let ended_at_most = last.0.saturating_add(max_request_nanos);
        hops.retain(|h| {
            let end = h.start_unix_nanos.saturating_add(h.duration_nanos);
            end <= ended_at_most && contains_any(spans, h.start_unix_nanos, end)
        });
        Ok(hops)
    }
    /// Hops without identity context that started in `[from, to]`.
    fn contextless_in_window(&self, from: u64, to: u64) -> Result<Vec<HopEvent>, StoreError>;
    /// Hops whose connection has one of these keys ([`crate::assembly::connection_key`]).
    fn hops_by_connection(&self, keys: &[String]) -> Result<Vec<HopEvent>, StoreError>;
    /// Flows whose connection has one of these keys.
    fn flows_by_connection(&self, keys: &[String]) -> Result<Vec<FlowEvent>, StoreError>;
    /// Flows seen in `[from, to]`.
    fn flows_in_window(&self, from: u64, to: u64) -> Result<Vec<FlowEvent>, StoreError>;
    /// Replaces the assembled chains (by chain id), deletes `superseded`
    /// ones (joined into another chain since), and clears `assembled` from
    /// the chains pending assembly, each only if its pending generation is
    /// still the one given (no hop arrived since it was read). Returns, for
    /// each tree in order, the coverage class its chain was stored with
    /// before (`None` for a chain stored for the first time), read in the
    /// same transaction.
    fn put_chains(
        &self,
        trees: &[ChainTree],
        superseded: &[String],
        assembled: &[(String, u64)],
    ) -> Result<Vec<Option<Coverage>>, StoreError>;
    /// Work the store keeps off the paths of ingest and of storing trees
    /// (SQLite: writing new chain ids to their index). The assembler calls
    /// it before each pass, on its own thread; a failure is logged there
    /// and the work is tried again before the next pass.
    fn upkeep(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Chains with hops stored since their last assembly (at most `limit`).
    fn pending_chains(&self, limit: u32) -> Result<Vec<String>, StoreError>;
    /// The pending generation of these chains (it grows with every batch
    /// that adds hops to a chain); chains not pending are left out. Read it
    /// before the chain's hops.
    fn pending_generations(&self, chain_ids: &[String]) -> Result<Vec<(String, u64)>, StoreError>;
    /// Chain summaries matching the query, newest first.
    fn chains(&self, query: &ChainQuery) -> Result<Vec<ChainSummary>, StoreError>;
    /// One chain with every hop, by its id or by an id joined into it.
    fn chain(&self, chain_id: &str) -> Result<Option<ChainTree>, StoreError>;
    /// The policy in force.
    fn policy_state(&self) -> Result<PolicyState, StoreError>;
    /// Commits a new policy state, its version record and the audit entry
    /// that explains it, in one transaction. Returns the audit entry's id.
    fn commit_policy(&self, state: &PolicyState, audit: &AuditEntry) -> Result<u64, StoreError>;
    /// The policy state at a past version, if it is kept.
    fn policy_version(&self, version: u64) -> Result<Option<PolicyState>, StoreError>;
    /// The newest audit entries, newest first.
    fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;
    /// Records the version a client applied.
    fn record_ack(&self, ack: &ClientVersion) -> Result<(), StoreError>;
    /// The last version each client applied.
    fn client_versions(&self) -> Result<Vec<ClientVersion>, StoreError>;
    /// Registers an issued signing key.
    fn put_signing_key(&self, key: &IssuedKey) -> Result<(), StoreError>;
    /// Issued keys still valid at `now` (Unix seconds).
    fn signing_keys(&self, now: u64) -> Result<Vec<IssuedKey>, StoreError>;
    /// Deletes what is older than the retention age, then the oldest events
    /// while the store is over its size.
    fn retain(&self, retention: Retention, now_nanos: u64) -> Result<RetentionOutcome, StoreError>;
    /// Bytes in use.
    fn size_bytes(&self) -> Result<u64, StoreError>;
    /// Hops stored.
    fn hop_count(&self) -> Result<u64, StoreError>;
}

/// Whether `[start, end]` contains one of `spans` (sorted by start).
pub(crate) fn contains_any(spans: &[(u64, u64)], start: u64, end: u64) -> bool {
    let from = spans.partition_point(|s| s.0 < start);
    spans[from..]
        .iter()
        .take_while(|s| s.0 <= end)
        .any(|s| s.1 <= end)
}

#[cfg(test)]
mod tests;
