//! The control-plane API (`custody.v1`), generated from
//! `proto/custody/v1/custody.proto`, and conversions to the domain types.
//!
//! The package name is the schema version: fields are only added within v1.

use std::collections::BTreeSet;

use crate::keys::{KeySet, KeySetError, PublicKey};
use crate::policy::{
    ChainMatch, DestinationMatch, EgressPolicy, Metadata, PolicyBundle, PolicyError, PolicySpec,
    Revocations, Rule,
};
use crate::token::{AttributionMethod, InitiatorKind};
use crate::workload::{WorkloadId, WorkloadIdError};
use crate::{policy, token};

/// Generated messages, clients and servers of `custody.v1`.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms
)]
pub mod v1 {
    tonic::include_proto!("custody.v1");
}

/// The schema version of events this crate writes.
pub const SCHEMA_VERSION: u32 = 1;

impl From<&WorkloadId> for v1::WorkloadId {
    fn from(id: &WorkloadId) -> Self {
        v1::WorkloadId {
            trust_domain: id.trust_domain().to_owned(),
            namespace: id.namespace().to_owned(),
            service_account: id.service_account().to_owned(),
            pod: id.pod().unwrap_or_default().to_owned(),
        }
    }
}

impl TryFrom<&v1::WorkloadId> for WorkloadId {
    type Error = WorkloadIdError;
    fn try_from(id: &v1::WorkloadId) -> Result<Self, Self::Error> {
        let out = WorkloadId::new(&id.trust_domain, &id.namespace, &id.service_account)?;
        if id.pod.is_empty() {
            Ok(out)
        } else {
            out.with_pod(&id.pod)
        }
    }
}

impl From<InitiatorKind> for v1::InitiatorKind {
    fn from(kind: InitiatorKind) -> Self {
        match kind {
            InitiatorKind::Human => v1::InitiatorKind::Human,
            InitiatorKind::Service => v1::InitiatorKind::Service,
            InitiatorKind::Agent => v1::InitiatorKind::Agent,
            InitiatorKind::System => v1::InitiatorKind::System,
        }
    }
}

impl v1::InitiatorKind {
    /// The domain kind; `None` for unspecified.
    pub fn to_domain(self) -> Option<InitiatorKind> {
        match self {
            v1::InitiatorKind::Unspecified => None,
            v1::InitiatorKind::Human => Some(InitiatorKind::Human),
            v1::InitiatorKind::Service => Some(InitiatorKind::Service),
            v1::InitiatorKind::Agent => Some(InitiatorKind::Agent),
            v1::InitiatorKind::System => Some(InitiatorKind::System),
        }
    }
}

impl From<AttributionMethod> for v1::AttributionMethod {
    fn from(method: AttributionMethod) -> Self {
        match method {
            AttributionMethod::Propagated => v1::AttributionMethod::Propagated,
            AttributionMethod::Minted => v1::AttributionMethod::Minted,
            AttributionMethod::Stitched => v1::AttributionMethod::Stitched,
            AttributionMethod::SqlComment => v1::AttributionMethod::SqlComment,
            AttributionMethod::ConnectionAttribute => v1::AttributionMethod::ConnectionAttribute,
            AttributionMethod::PeerOnly => v1::AttributionMethod::PeerOnly,
        }
    }
}

impl v1::AttributionMethod {
    /// The domain method; `None` for unspecified.
    pub fn to_domain(self) -> Option<AttributionMethod> {
        match self {
            v1::AttributionMethod::Unspecified => None,
            v1::AttributionMethod::Propagated => Some(AttributionMethod::Propagated),
            v1::AttributionMethod::Minted => Some(AttributionMethod::Minted),
            v1::AttributionMethod::Stitched => Some(AttributionMethod::Stitched),
            v1::AttributionMethod::SqlComment => Some(AttributionMethod::SqlComment),
            v1::AttributionMethod::ConnectionAttribute => {
                Some(AttributionMethod::ConnectionAttribute)
            }
            v1::AttributionMethod::PeerOnly => Some(AttributionMethod::PeerOnly),
        }
    }
}

impl From<policy::Verdict> for v1::Verdict {
    fn from(verdict: policy::Verdict) -> Self {
        match verdict {
            policy::Verdict::Allow => v1::Verdict::Allow,
            policy::Verdict::Audit => v1::Verdict::Audit,
            policy::Verdict::Block => v1::Verdict::Block,
        }
    }
}

impl v1::Verdict {
    /// The domain verdict; `None` for unspecified.
    pub fn to_domain(self) -> Option<policy::Verdict> {
        match self {
            v1::Verdict::Unspecified => None,
            v1::Verdict::Allow => Some(policy::Verdict::Allow),
            v1::Verdict::Audit => Some(policy::Verdict::Audit),
            v1::Verdict::Block => Some(policy::Verdict::Block),
        }
    }
}

impl From<&token::HopAttribution> for v1::Attribution {
    fn from(att: &token::HopAttribution) -> Self {
        v1::Attribution {
            method: v1::AttributionMethod::from(att.method) as i32,
            confidence: att.confidence,
        }
    }
}

impl From<&Rule> for v1::Rule {
    fn from(rule: &Rule) -> Self {
        v1::Rule {
            name: rule.name.clone(),
            destination: Some(v1::DestinationMatch {
                hosts: rule
                    .destination
                    .hosts
                    .iter()
                    .map(|h| h.to_string())
                    .collect(),
                cidrs: rule
                    .destination
                    .cidrs
                    .iter()
                    .map(|c| c.to_string())
                    .collect(),
                ports: rule
                    .destination
                    .ports
                    .iter()
                    .map(|p| u32::from(*p))
                    .collect(),
            }),
            chain: Some(v1::ChainMatch {
                initiator_kinds: rule
                    .chain
                    .initiator_kinds
                    .iter()
                    .map(|k| v1::InitiatorKind::from(*k) as i32)
                    .collect(),
                principals: rule.chain.principals.clone(),
                services: rule.chain.services.clone(),
                taint_any: rule.chain.taint_any.clone(),
            }),
            verdict: v1::Verdict::from(rule.verdict) as i32,
        }
    }
}

impl From<&EgressPolicy> for v1::EgressPolicy {
    fn from(policy: &EgressPolicy) -> Self {
        v1::EgressPolicy {
            name: policy.metadata.name.clone(),
            rules: policy.spec.rules.iter().map(v1::Rule::from).collect(),
        }
    }
}

fn field_error(field: String, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field,
        message: message.into(),
    }
}

fn verdict_from_wire(field: String, raw: i32) -> Result<policy::Verdict, PolicyError> {
    v1::Verdict::try_from(raw)
        .ok()
        .and_then(v1::Verdict::to_domain)
        .ok_or_else(|| field_error(field, format!("unknown verdict {raw}")))
}

impl TryFrom<&v1::EgressPolicy> for EgressPolicy {
    type Error = PolicyError;
    fn try_from(wire: &v1::EgressPolicy) -> Result<Self, Self::Error> {
        let mut rules = Vec::with_capacity(wire.rules.len());
        for (i, rule) in wire.rules.iter().enumerate() {
            let at = |f: &str| format!("spec.rules[{i}].{f}");
            let dest = rule.destination.clone().unwrap_or_default();
            let chain = rule.chain.clone().unwrap_or_default();
            let mut destination = DestinationMatch::default();
            for (j, host) in dest.hosts.into_iter().enumerate() {
                destination.hosts.push(
                    host.try_into()
                        .map_err(|e| field_error(at(&format!("destination.hosts[{j}]")), e))?,
                );
            }
            for (j, cidr) in dest.cidrs.into_iter().enumerate() {
                destination.cidrs.push(
                    cidr.try_into()
                        .map_err(|e| field_error(at(&format!("destination.cidrs[{j}]")), e))?,
                );
            }
            for (j, port) in dest.ports.into_iter().enumerate() {
                destination.ports.push(u16::try_from(port).map_err(|_| {
                    field_error(at(&format!("destination.ports[{j}]")), "port above 65535")
                })?);
            }
            let mut initiator_kinds = Vec::new();
            for (j, raw) in chain.initiator_kinds.into_iter().enumerate() {
                let kind = v1::InitiatorKind::try_from(raw)
                    .ok()
                    .and_then(v1::InitiatorKind::to_domain)
                    .ok_or_else(|| {
                        field_error(
                            at(&format!("chain.initiatorKinds[{j}]")),
                            "unknown initiator kind",
                        )
                    })?;
                initiator_kinds.push(kind);
            }
            rules.push(Rule {
                name: rule.name.clone(),
                destination,
                chain: ChainMatch {
                    initiator_kinds,
                    principals: chain.principals,
                    services: chain.services,
                    taint_any: chain.taint_any,
                },
                verdict: verdict_from_wire(at("verdict"), rule.verdict)?,
            });
        }
        let policy = EgressPolicy {
            api_version: policy::API_VERSION.to_owned(),
            kind: policy::KIND.to_owned(),
            metadata: Metadata {
                name: wire.name.clone(),
            },
            spec: PolicySpec { rules },
        };
        policy.validate()?;
        Ok(policy)
    }
}

impl From<&Revocations> for v1::Revocations {
    fn from(r: &Revocations) -> Self {
        v1::Revocations {
            principals: r.principals.iter().cloned().collect(),
            key_ids: r.key_ids.iter().cloned().collect(),
            credential_hashes: r.credential_hashes.iter().cloned().collect(),
            quarantined_chains: r.quarantined_chains.iter().cloned().collect(),
        }
    }
}

impl From<&v1::Revocations> for Revocations {
    fn from(r: &v1::Revocations) -> Self {
        fn set(items: &[String]) -> BTreeSet<String> {
            items.iter().cloned().collect()
        }
        Revocations {
            principals: set(&r.principals),
            key_ids: set(&r.key_ids),
            credential_hashes: set(&r.credential_hashes),
            quarantined_chains: set(&r.quarantined_chains),
        }
    }
}

impl From<&PolicyBundle> for v1::PolicyBundle {
    fn from(bundle: &PolicyBundle) -> Self {
        v1::PolicyBundle {
            version: bundle.version,
            policies: bundle.policies.iter().map(v1::EgressPolicy::from).collect(),
            default_verdict: v1::Verdict::from(bundle.default_verdict) as i32,
            revocations: Some(v1::Revocations::from(&bundle.revocations)),
        }
    }
}

impl TryFrom<&v1::PolicyBundle> for PolicyBundle {
    type Error = PolicyError;
    fn try_from(wire: &v1::PolicyBundle) -> Result<Self, Self::Error> {
        let mut policies = Vec::with_capacity(wire.policies.len());
        for (i, policy) in wire.policies.iter().enumerate() {
            policies.push(EgressPolicy::try_from(policy).map_err(|e| PolicyError {
                field: format!("policies[{i}].{}", e.field),
                message: e.message,
            })?);
        }
        let bundle = PolicyBundle {
            version: wire.version,
            policies,
            default_verdict: verdict_from_wire("defaultVerdict".into(), wire.default_verdict)?,
            revocations: wire
                .revocations
                .as_ref()
                .map(Revocations::from)
                .unwrap_or_default(),
        };
        bundle.validate()?;
        Ok(bundle)
    }
}

impl From<&PublicKey> for v1::PublicKey {
    fn from(key: &PublicKey) -> Self {
        v1::PublicKey {
            key_id: key.kid().to_owned(),
            ed25519: key.bytes().to_vec(),
            workload: key.workload.as_deref().and_then(|uri| {
                WorkloadId::parse_uri(uri)
                    .ok()
                    .map(|w| v1::WorkloadId::from(&w))
            }),
            not_before_unix: key.not_before.unwrap_or(0),
            not_after_unix: key.not_after.unwrap_or(0),
        }
    }
}

impl From<&KeySet> for v1::KeySet {
    fn from(set: &KeySet) -> Self {
        let mut keys: Vec<_> = set.keys().map(v1::PublicKey::from).collect();
        keys.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        v1::KeySet {
            version: set.version(),
            keys,
        }
    }
}

/// Why a key set from the wire was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireKeyError {
    /// A key is not 32 bytes.
    #[error("key {0} is not 32 bytes")]
    Length(String),
    /// A key's workload binding is not a valid workload.
    #[error("key {0} is bound to an invalid workload: {1}")]
    Workload(String, WorkloadIdError),
    /// The key set refused a key.
    #[error(transparent)]
    KeySet(#[from] KeySetError),
}

impl TryFrom<&v1::KeySet> for KeySet {
    type Error = WireKeyError;
    fn try_from(wire: &v1::KeySet) -> Result<Self, Self::Error> {
        let mut set = KeySet::new();
        set.set_version(wire.version);
        for key in &wire.keys {
            let bytes: [u8; 32] = key
                .ed25519
                .as_slice()
                .try_into()
                .map_err(|_| WireKeyError::Length(key.key_id.clone()))?;
            let mut public = PublicKey::new(key.key_id.clone(), bytes);
            if let Some(workload) = &key.workload {
                let id = WorkloadId::try_from(workload)
                    .map_err(|e| WireKeyError::Workload(key.key_id.clone(), e))?;
                public = public.bound_to(id.uri());
            }
            if key.not_before_unix != 0 || key.not_after_unix != 0 {
                let not_after = if key.not_after_unix == 0 {
                    u64::MAX
                } else {
                    key.not_after_unix
                };
                public = public.valid_between(key.not_before_unix, not_after);
            }
            set.insert(public)?;
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests;
