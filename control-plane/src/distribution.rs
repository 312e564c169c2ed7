//! Policy distribution: the policy in force, its changes (each one a new
//! version, committed with its audit entry), and the update every connected
//! client receives.
//!
//! Changes are serialized by one lock: compute the new state, commit it to
//! the store (with the audit entry), then publish it on a watch channel that
//! every `Subscribe` stream follows. A client that falls behind skips to the
//! newest version: each update carries the whole bundle.

use std::sync::{Arc, Mutex};

use custody_context::api::v1;
use custody_context::policy::{
    self, ChainMatch, DestinationMatch, EgressPolicy, HostPattern, Metadata, PolicyError,
    PolicySpec, Rule, Verdict,
};
use custody_context::token::InitiatorKind;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{AuditEntry, PolicyState, Store, StoreError};

/// A change to the policy in force.
#[derive(Clone, Debug)]
pub enum Change {
    /// Creates or replaces a policy (by name).
    Apply(EgressPolicy),
    /// Deletes a policy.
    Delete(String),
    /// Blocks a destination, optionally only for some chains.
    BlockDestination(BlockDestination),
    /// Revokes a principal, key or credential mesh-wide.
    Revoke(Revoke),
    /// Flags a chain for investigation.
    Quarantine {
        /// The chain id.
        chain: String,
    },
}

/// `POST /v1/contain/block-destination`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDestination {
    /// Host or `*.suffix`.
    pub host: String,
    /// Only chains whose taint holds one of these classes.
    #[serde(default)]
    pub taint_any: Vec<String>,
    /// Only chains started by these kinds of initiator.
    #[serde(default)]
    pub initiator_kinds: Vec<InitiatorKind>,
}

/// `POST /v1/contain/revoke`: exactly one field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    /// An initiator (`sub`).
    #[serde(default)]
    pub principal: Option<String>,
    /// A signing key id.
    #[serde(default)]
    pub key_id: Option<String>,
    /// SHA-256 hex of a credential.
    #[serde(default)]
    pub credential_hash: Option<String>,
}

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The change is invalid; the field is named.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
    /// The policy to delete does not exist.
    #[error("no policy named {0}")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: &str, message: &str) -> ChangeError {
    ChangeError::Invalid(PolicyError {
        field: field.to_owned(),
        message: message.to_owned(),
    })
}

/// The name of the policy that blocks `host`.
pub fn containment_policy_name(host: &str) -> String {
    let mut name: String = host
        .to_ascii_lowercase()
        .replace("*.", "any.")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(54);
    format!("contain-{}", name.trim_end_matches(['-', '.']))
}

/// The policy in force and its subscribers.
pub struct PolicyCenter {
    store: Arc<dyn Store>,
    state: Mutex<PolicyState>,
    keys: Mutex<v1::KeySet>,
    tx: watch::Sender<Arc<v1::PolicyUpdate>>,
}

impl std::fmt::Debug for PolicyCenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyCenter").finish_non_exhaustive()
    }
}

fn update(state: &PolicyState, keys: &v1::KeySet) -> v1::PolicyUpdate {
    let bundle = policy::PolicyBundle {
        version: state.version,
        policies: state.policies.clone(),
        default_verdict: state.default_verdict,
        revocations: state.revocations.clone(),
    };
    v1::PolicyUpdate {
        policy: Some(v1::PolicyBundle::from(&bundle)),
        keys: Some(keys.clone()),
        sent_unix_nanos: 0,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PolicyCenter {
    /// Loads the policy in force from the store.
    pub fn load(store: Arc<dyn Store>, keys: v1::KeySet) -> Result<Self, StoreError> {
        let state = store.policy_state()?;
        let (tx, _) = watch::channel(Arc::new(update(&state, &keys)));
        Ok(PolicyCenter {
            store,
            state: Mutex::new(state),
            keys: Mutex::new(keys),
            tx,
        })
    }

    /// The policy in force.
    pub fn current(&self) -> PolicyState {
        lock(&self.state).clone()
    }

    /// Follows every update, starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<v1::PolicyUpdate>> {
        self.tx.subscribe()
    }

    /// Publishes a new key set with the policy in force.
    pub fn set_keys(&self, keys: v1::KeySet) {
        let state = lock(&self.state);
        let mut held = lock(&self.keys);
        *held = keys;
        self.tx.send_replace(Arc::new(update(&state, &held)));
    }

    /// Applies a change on behalf of `actor`, commits it, and pushes it.
    pub fn change(
        &self,
        change: Change,
        actor: &str,
        now_nanos: u64,
    ) -> Result<PolicyState, ChangeError> {
        let mut state = lock(&self.state);
        let mut next = state.clone();
        let (action, target, detail) = match change {
            Change::Apply(p) => {
                p.validate()?;
                let name = p.name().to_owned();
                let detail = serde_json::to_value(&p).map_err(StoreError::from)?;
                match next.policies.iter_mut().find(|q| q.name() == name) {
                    Some(q) => *q = p,
                    None => next.policies.push(p),
                }
                ("policy.apply", name, detail)
            }
            Change::Delete(name) => {
                let before = next.policies.len();
                next.policies.retain(|p| p.name() != name);
                if next.policies.len() == before {
                    return Err(ChangeError::NotFound(name));
                }
                ("policy.delete", name, serde_json::Value::Null)
            }
            Change::BlockDestination(b) => {
                let host =
                    HostPattern::try_from(b.host.clone()).map_err(|m| invalid("host", &m))?;
                let p = EgressPolicy {
                    api_version: policy::API_VERSION.to_owned(),
                    kind: policy::KIND.to_owned(),
                    metadata: Metadata {
                        name: containment_policy_name(&b.host),
                    },
                    spec: PolicySpec {
                        rules: vec![Rule {
                            name: "block".into(),
                            destination: DestinationMatch {
                                hosts: vec![host],
                                ..Default::default()
                            },
                            chain: ChainMatch {
                                initiator_kinds: b.initiator_kinds.clone(),
                                taint_any: b.taint_any.clone(),
                                ..Default::default()
                            },
                            verdict: Verdict::Block,
                        }],
                    },
                };
                p.validate().map_err(|e| {
                    // Name the request's field, not the generated document's.
                    let field = if e.field.contains("taintAny") {
                        "taint_any"
                    } else {
                        "host"
                    };
                    invalid(field, &e.message)
                })?;
                let name = p.name().to_owned();
                match next.policies.iter_mut().find(|q| q.name() == name) {
                    Some(q) => *q = p,
                    None => next.policies.push(p),
                }
                let detail = serde_json::to_value(&b).map_err(StoreError::from)?;
                ("contain.block_destination", name, detail)
            }
            Change::Revoke(r) => {
                let given = [&r.principal, &r.key_id, &r.credential_hash]
                    .iter()
                    .filter(|v| v.is_some())
                    .count();
                if given != 1 {
                    return Err(invalid(
                        "principal",
                        "exactly one of principal, key_id and credential_hash is required",
                    ));
                }
                let detail = serde_json::to_value(&r).map_err(StoreError::from)?;
                let revs = &mut next.revocations;
                let target = if let Some(p) = r.principal {
                    if p.is_empty() {
                        return Err(invalid("principal", "must not be empty"));
                    }
                    revs.principals.insert(p.clone());
                    p
                } else if let Some(k) = r.key_id {
                    if k.is_empty() {
                        return Err(invalid("key_id", "must not be empty"));
                    }
                    revs.key_ids.insert(k.clone());
                    k
                } else {
                    let h = r.credential_hash.unwrap_or_default().to_ascii_lowercase();
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(invalid(
                            "credential_hash",
                            "must be SHA-256 in hex (64 digits)",
                        ));
                    }
                    revs.credential_hashes.insert(h.clone());
                    h
                };
                ("contain.revoke", target, detail)
            }
            Change::Quarantine { chain } => {
                if chain
                    .parse::<custody_context::traceparent::TraceId>()
                    .is_err()
                {
                    return Err(invalid("chain", "not a chain id (32 lowercase hex digits)"));
                }
                next.revocations.quarantined_chains.insert(chain.clone());
                ("contain.quarantine", chain, serde_json::Value::Null)
            }
        };
        next.version = state.version + 1;
        next.changed_unix_nanos = now_nanos;
        let entry = AuditEntry {
            id: 0,
            at_unix_nanos: now_nanos,
            actor: actor.to_owned(),
            action: action.to_owned(),
            target,
            version: next.version,
            detail,
        };
        self.store.commit_policy(&next, &entry)?;
        *state = next.clone();
        let keys = lock(&self.keys);
        self.tx.send_replace(Arc::new(update(&state, &keys)));
        tracing::info!(version = next.version, action, actor, "policy changed");
        Ok(next)
    }
}
