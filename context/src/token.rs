//! The `Txn-Token`: claims, as they travel between workloads.
//!
//! A Custody token is a JWS-signed JWT (`typ` = `txntoken+jwt`) following the
//! OAuth Transaction Tokens draft, with RFC 8693 `act` for delegation and one
//! namespaced claim, `custody`, for what Custody adds: the initiator's kind,
//! the chain's taint, and how each workload in `req_wl` was attributed.
//! `docs/context-format.md` shows complete examples.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::traceparent::TraceId;

/// The `typ` header of a transaction token.
pub const TOKEN_TYPE: &str = "txntoken+jwt";

/// The HTTP header that carries the token.
pub const TOKEN_HEADER: &str = "txn-token";

/// The version of the `custody` claim this crate writes and accepts.
pub const CUSTODY_CLAIMS_VERSION: u32 = 1;

/// Who started a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitiatorKind {
    /// A person, authenticated at the edge.
    Human,
    /// A service acting on its own behalf.
    Service,
    /// An AI agent or tool caller.
    Agent,
    /// The platform itself: a scheduled job, a controller.
    System,
}

impl InitiatorKind {
    /// The name used in claims, policy and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            InitiatorKind::Human => "human",
            InitiatorKind::Service => "service",
            InitiatorKind::Agent => "agent",
            InitiatorKind::System => "system",
        }
    }
}

/// How a workload tied a hop to its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttributionMethod {
    /// The application forwarded a verified token.
    Propagated,
    /// No token arrived; this workload started the chain.
    Minted,
    /// No token was forwarded; tied to an inbound request in flight.
    Stitched,
    /// Context read from a sqlcommenter comment.
    SqlComment,
    /// Context read from a database connection attribute.
    ConnectionAttribute,
    /// Nothing tied the hop to a chain; attributed to the peer only.
    PeerOnly,
}

impl AttributionMethod {
    /// The name used in claims and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            AttributionMethod::Propagated => "propagated",
            AttributionMethod::Minted => "minted",
            AttributionMethod::Stitched => "stitched",
            AttributionMethod::SqlComment => "sql_comment",
            AttributionMethod::ConnectionAttribute => "connection_attribute",
            AttributionMethod::PeerOnly => "peer_only",
        }
    }
}

/// How one workload of `req_wl` was attributed, and how sure it was.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HopAttribution {
    /// The method.
    pub method: AttributionMethod,
    /// In `[0, 1]`.
    pub confidence: f32,
}

impl HopAttribution {
    /// Attribution by a forwarded, verified token: certain.
    pub const PROPAGATED: HopAttribution = HopAttribution {
        method: AttributionMethod::Propagated,
        confidence: 1.0,
    };

    /// This workload started the chain: certain.
    pub const MINTED: HopAttribution = HopAttribution {
        method: AttributionMethod::Minted,
        confidence: 1.0,
    };

    /// Local stitching, with the confidence the stitcher computed (clamped to `[0, 1]`).
    pub fn stitched(confidence: f32) -> Self {
        HopAttribution {
            method: AttributionMethod::Stitched,
            confidence: confidence.clamp(0.0, 1.0),
        }
    }
}

/// An RFC 8693 actor: the party acting for the subject. Earlier actors nest
/// in `act`; only the outermost is the current actor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's identity, e.g. `agent:assistant`.
    pub sub: String,
    /// The issuer that vouches for the actor, when not the token's issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The previous actor, if this one was delegated to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// An actor with no history.
    pub fn new(sub: impl Into<String>) -> Self {
        Actor {
            sub: sub.into(),
            iss: None,
            act: None,
        }
    }

    /// How deep the delegation history goes (1 for a single actor).
    pub fn depth(&self) -> usize {
        1 + self.act.as_ref().map_or(0, |a| a.depth())
    }
}

/// The requester context (`rctx`): where the chain came in, and how.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestContext {
    /// The address the initiating request came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req_ip: Option<String>,
    /// How the initiator was authenticated: `jwt`, `edge_header`, `mtls`, `mcp`, `agent_header`, `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authn: Option<String>,
}

/// Custody's own claims, under the `custody` claim.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CustodyClaims {
    /// The version of this claim's layout.
    pub v: u32,
    /// The kind of initiator named by `sub`.
    pub ini: InitiatorKind,
    /// The data classes the chain has touched so far (e.g. `pii.ssn`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub taint: BTreeSet<String>,
    /// One entry per workload of `req_wl`, in the same order.
    pub att: Vec<HopAttribution>,
}

/// The claims of a `Txn-Token`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TxnClaims {
    /// The issuer: the workload URI of the signing sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// The trust domain.
    #[serde(with = "audience")]
    pub aud: Vec<String>,
    /// The chain id; the W3C trace id of the chain.
    pub txn: TraceId,
    /// The initiator, unique within the trust domain.
    pub sub: String,
    /// The purpose of the chain.
    pub scope: String,
    /// The workloads that carried the chain, first to last.
    #[serde(with = "comma_list")]
    pub req_wl: Vec<String>,
    /// Immutable authorization context, copied unchanged into replacements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tctx: Option<serde_json::Map<String, serde_json::Value>>,
    /// Requester context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rctx: Option<RequestContext>,
    /// The current actor and its delegation history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// Custody's claims.
    pub custody: CustodyClaims,
}

impl TxnClaims {
    /// The delegation history, current actor first.
    pub fn actors(&self) -> Vec<&str> {
        let mut out = Vec::new();
        let mut next = self.act.as_ref();
        while let Some(actor) = next {
            out.push(actor.sub.as_str());
            next = actor.act.as_deref();
        }
        out
    }

    /// The workload that last carried the chain (the signer of this token).
    pub fn last_workload(&self) -> Option<&str> {
        self.req_wl.last().map(String::as_str)
    }

    /// Whether the chain has touched `class`.
    pub fn is_tainted_by(&self, class: &str) -> bool {
        self.custody.taint.contains(class)
    }
}

/// `aud` is a string or an array of strings (RFC 7519); written as a string
/// when there is one.
mod audience {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(aud: &[String], s: S) -> Result<S::Ok, S::Error> {
        match aud {
            [one] => s.serialize_str(one),
            many => s.collect_seq(many),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        })
    }
}

/// `req_wl` is a comma-separated list (the draft appends with `,`).
mod comma_list {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(list: &[String], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&list.join(","))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.is_empty() {
            return Ok(Vec::new());
        }
        Ok(s.split(',').map(|w| w.trim().to_owned()).collect())
    }
}
