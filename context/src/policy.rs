//! Egress policy: the documents operators write, and their evaluation.
//!
//! A policy is a YAML or JSON document of rules. A rule matches a destination
//! (host pattern, address or CIDR, port) and optionally the chain (initiator
//! kind, principal, calling service, taint) and gives a verdict. When several
//! rules match, the most restrictive verdict wins (block over audit over
//! allow), so a containment block can never be undone by a broader allow; a
//! destination no rule matches gets the bundle's default verdict.
//!
//! ```yaml
//! apiVersion: custody.dev/v1
//! kind: EgressPolicy
//! metadata:
//!   name: partner-data
//! spec:
//!   rules:
//!     - name: no-ssn-to-partner
//!       destination: { hosts: ["api.partner.example"], ports: [443] }
//!       chain: { taintAny: ["pii.ssn"] }
//!       verdict: block
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::token::InitiatorKind;

/// The `apiVersion` of policy documents.
pub const API_VERSION: &str = "custody.dev/v1";
/// The `kind` of egress policy documents.
pub const KIND: &str = "EgressPolicy";

/// What happens to a matching request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Let it through and flag it.
    Audit,
    /// Refuse it (HTTP 403, gRPC `PERMISSION_DENIED`).
    Block,
}

impl Verdict {
    /// The name used in documents and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Audit => "audit",
            Verdict::Block => "block",
        }
    }
}

/// A policy refused, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// The path of the field, e.g. `spec.rules[0].destination.hosts[1]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl PolicyError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A host pattern: an exact name, or `*.suffix` for any name below `suffix`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPattern {
    pattern: String,
}

impl HostPattern {
    /// Whether `host` (already lowercased, without port or trailing dot) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self.pattern.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            None => self.pattern == host,
        }
    }
}

impl TryFrom<String> for HostPattern {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        let pattern = value.trim_end_matches('.').to_ascii_lowercase();
        let name = pattern.strip_prefix("*.").unwrap_or(&pattern);
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if valid {
            Ok(HostPattern { pattern })
        } else {
            Err(format!(
                "invalid host pattern {value:?}: expected a DNS name or *.suffix"
            ))
        }
    }
}

impl From<HostPattern> for String {
    fn from(value: HostPattern) -> Self {
        value.pattern
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

/// An IP network: an address and a prefix length (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network address, host bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from((u32::from(v4) & mask).to_be_bytes())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from((u128::from(v6) & mask).to_be_bytes())
            }
        }
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The whole network of `addr`'s family with `prefix` bits.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            (IpAddr::V6(_), IpAddr::V4(v4)) => self.contains(IpAddr::V6(v4.to_ipv6_mapped())),
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
        }
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        let bad = || format!("invalid address or CIDR {value:?}");
        let (addr, prefix) = match value.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (value.as_str(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl From<Cidr> for String {
    fn from(value: Cidr) -> Self {
        value.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Which destinations a rule covers. Hosts and CIDRs are alternatives (a
/// destination named by either matches); ports, when listed, must match too.
/// An empty match covers every destination.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationMatch {
    /// Host patterns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostPattern>,
    /// Networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<Cidr>,
    /// Ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// Which chains a rule covers; every list given must match. An empty match
/// covers every chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ChainMatch {
    /// Initiator kinds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub initiator_kinds: Vec<InitiatorKind>,
    /// Initiators (`sub`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Calling services, as workload URIs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// The chain has touched any of these data classes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taint_any: Vec<String>,
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    /// Unique within its policy; named in block answers and records.
    pub name: String,
    /// The destinations covered.
    #[serde(default)]
    pub destination: DestinationMatch,
    /// The chains covered.
    #[serde(default)]
    pub chain: ChainMatch,
    /// The verdict.
    pub verdict: Verdict,
}

/// Policy metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// The policy's name, unique in the mesh.
    pub name: String,
}

/// The rules of a policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// The rules, at least one.
    pub rules: Vec<Rule>,
}

/// An egress policy document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressPolicy {
    /// Always `custody.dev/v1`.
    pub api_version: String,
    /// Always `EgressPolicy`.
    pub kind: String,
    /// Name.
    pub metadata: Metadata,
    /// Rules.
    pub spec: PolicySpec,
}

fn check_name(field: &str, name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(PolicyError::new(
            field,
            format!("{name:?} is not a name of 1-63 lowercase letters, digits, '-' or '.'"),
        ))
    }
}

impl EgressPolicy {
    /// Parses and validates a YAML document.
    pub fn from_yaml(text: &str) -> Result<Self, PolicyError> {
        let de = serde_norway::Deserializer::from_str(text);
        let policy: EgressPolicy = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            PolicyError::new(field, e.into_inner().to_string())
        })?;
        policy.validate()?;
        Ok(policy)
    }

    /// Parses and validates a JSON document.
    pub fn from_json(text: &str) -> Result<Self, PolicyError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let policy: EgressPolicy = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            PolicyError::new(field, e.into_inner().to_string())
        })?;
        policy.validate()?;
        Ok(policy)
    }

    /// Parses YAML or JSON (JSON is YAML, but its errors read better).
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        if text.trim_start().starts_with('{') {
            EgressPolicy::from_json(text)
        } else {
            EgressPolicy::from_yaml(text)
        }
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.api_version != API_VERSION {
            return Err(PolicyError::new(
                "apiVersion",
                format!("must be {API_VERSION:?}"),
            ));
        }
        if self.kind != KIND {
            return Err(PolicyError::new("kind", format!("must be {KIND:?}")));
        }
        check_name("metadata.name", &self.metadata.name)?;
        if self.spec.rules.is_empty() {
            return Err(PolicyError::new(
                "spec.rules",
                "at least one rule is required",
            ));
        }
        let mut names = BTreeSet::new();
        for (i, rule) in self.spec.rules.iter().enumerate() {
            let at = |field: &str| format!("spec.rules[{i}].{field}");
            check_name(&at("name"), &rule.name)?;
            if !names.insert(rule.name.as_str()) {
                return Err(PolicyError::new(at("name"), "duplicate rule name"));
            }
            if let Some(j) = rule.destination.ports.iter().position(|p| *p == 0) {
                return Err(PolicyError::new(
                    at(&format!("destination.ports[{j}]")),
                    "port 0 is not a destination",
                ));
            }
            if let Some(j) = rule.chain.taint_any.iter().position(|c| !is_class_name(c)) {
                return Err(PolicyError::new(
                    at(&format!("chain.taintAny[{j}]")),
                    "not a data class name such as pii.ssn",
                ));
            }
            if let Some(j) = rule.chain.principals.iter().position(String::is_empty) {
                return Err(PolicyError::new(
                    at(&format!("chain.principals[{j}]")),
                    "empty principal",
                ));
            }
            if let Some(j) = rule
                .chain
                .services
                .iter()
                .position(|s| crate::workload::WorkloadId::parse_uri(s).is_err())
            {
                return Err(PolicyError::new(
                    at(&format!("chain.services[{j}]")),
                    "not a workload URI spiffe://<trust domain>/ns/<namespace>/sa/<service account>",
                ));
            }
        }
        Ok(())
    }
}

fn is_class_name(class: &str) -> bool {
    !class.is_empty()
        && class.len() <= 64
        && class.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// Principals, keys, credentials and chains refused mesh-wide.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocations {
    /// Initiators (`sub`) whose chains are refused.
    #[serde(default)]
    pub principals: BTreeSet<String>,
    /// Signing key ids whose tokens are refused.
    #[serde(default)]
    pub key_ids: BTreeSet<String>,
    /// SHA-256 (hex) of revoked credentials: bearer tokens, passwords.
    #[serde(default)]
    pub credential_hashes: BTreeSet<String>,
    /// Chains flagged for investigation: everything derived from them is audited.
    #[serde(default)]
    pub quarantined_chains: BTreeSet<String>,
}

/// The destination of an outbound request, as the enforcer knows it.
#[derive(Clone, Copy, Debug, Default)]
pub struct DestinationFacts<'a> {
    /// The host name (from `Host`, `:authority` or SNI), lowercased, no port.
    pub host: Option<&'a str>,
    /// The address dialled.
    pub ip: Option<IpAddr>,
    /// The port.
    pub port: u16,
}

/// The chain an outbound request belongs to, as the enforcer knows it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChainFacts<'a> {
    /// The initiator's kind, when known.
    pub initiator_kind: Option<InitiatorKind>,
    /// The initiator.
    pub principal: Option<&'a str>,
    /// The calling workload's URI.
    pub service: Option<&'a str>,
    /// The data classes the chain has touched.
    pub taint: Option<&'a BTreeSet<String>>,
}

/// The outcome of evaluating a request against the policy in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The verdict.
    pub verdict: Verdict,
    /// The policy that decided; `None` when the default applied.
    pub policy: Option<String>,
    /// The rule that decided.
    pub rule: Option<String>,
}

/// Everything a sidecar or agent enforces, under one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyBundle {
    /// Increases with every change.
    pub version: u64,
    /// The policies.
    pub policies: Vec<EgressPolicy>,
    /// The verdict for destinations no rule matches.
    pub default_verdict: Verdict,
    /// What is revoked.
    #[serde(default)]
    pub revocations: Revocations,
}

impl Default for PolicyBundle {
    fn default() -> Self {
        PolicyBundle {
            version: 0,
            policies: Vec::new(),
            default_verdict: Verdict::Allow,
            revocations: Revocations::default(),
        }
    }
}

impl DestinationMatch {
    fn matches(&self, dest: &DestinationFacts<'_>) -> bool {
        let named = self.hosts.is_empty() && self.cidrs.is_empty()
            || dest
                .host
                .is_some_and(|h| self.hosts.iter().any(|p| p.matches(h)))
            || dest
                .ip
                .is_some_and(|ip| self.cidrs.iter().any(|c| c.contains(ip)));
        named && (self.ports.is_empty() || self.ports.contains(&dest.port))
    }
}

impl ChainMatch {
    fn matches(&self, chain: &ChainFacts<'_>) -> bool {
        (self.initiator_kinds.is_empty()
            || chain
                .initiator_kind
                .is_some_and(|k| self.initiator_kinds.contains(&k)))
            && (self.principals.is_empty()
                || chain
                    .principal
                    .is_some_and(|p| self.principals.iter().any(|x| x == p)))
            && (self.services.is_empty()
                || chain
                    .service
                    .is_some_and(|s| self.services.iter().any(|x| x == s)))
            && (self.taint_any.is_empty()
                || chain
                    .taint
                    .is_some_and(|t| self.taint_any.iter().any(|c| t.contains(c))))
    }
}

impl PolicyBundle {
    /// Validates every policy, naming the policy and field at fault.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let mut names = BTreeSet::new();
        for (i, policy) in self.policies.iter().enumerate() {
            policy.validate().map_err(|e| PolicyError {
                field: format!("policies[{i}].{}", e.field),
                message: e.message,
            })?;
            if !names.insert(policy.name()) {
                return Err(PolicyError::new(
                    format!("policies[{i}].metadata.name"),
                    "duplicate policy name",
                ));
            }
        }
        Ok(())
    }

    /// Decides an outbound request: the most restrictive matching rule wins;
    /// among equals, the first in order. No match gives the default.
    pub fn evaluate(&self, dest: &DestinationFacts<'_>, chain: &ChainFacts<'_>) -> Decision {
        let mut best: Option<(Verdict, &EgressPolicy, &Rule)> = None;
        for policy in &self.policies {
            for rule in &policy.spec.rules {
                if best.is_some_and(|(v, _, _)| v >= rule.verdict) {
                    continue;
                }
                if rule.destination.matches(dest) && rule.chain.matches(chain) {
                    best = Some((rule.verdict, policy, rule));
                    if rule.verdict == Verdict::Block {
                        break;
                    }
                }
            }
            if best.is_some_and(|(v, _, _)| v == Verdict::Block) {
                break;
            }
        }
        match best {
            Some((verdict, policy, rule)) => Decision {
                verdict,
                policy: Some(policy.metadata.name.clone()),
                rule: Some(rule.name.clone()),
            },
            None => Decision {
                verdict: self.default_verdict,
                policy: None,
                rule: None,
            },
        }
    }
}

#[cfg(test)]
mod tests;
