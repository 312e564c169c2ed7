//! Which chain a query belongs to.
//!
//! Tried in order, as the contract says:
//! 1. a sqlcommenter comment in the statement: a `txn_token` that verifies,
//!    or a `traceparent` naming a chain with an inbound request in flight
//!    in this pod;
//! 2. the connection's carrier: PostgreSQL `application_name` holding a
//!    `traceparent`, or MySQL connection attributes `traceparent` /
//!    `txn_token`, under the same conditions;
//! 3. local stitching: the inbound request of this pod in flight when the
//!    query was sent, with confidence `1 / n`.
//!
//! A bare `traceparent` is a correlation id anyone can write: it never
//! names an initiator by itself. It only joins a chain that this pod holds a
//! verified token for, so a stale pooled connection or a forged comment
//! cannot pull a query into a chain that is not live here.

use std::sync::Arc;

use custody_context::api::v1;
use custody_context::token::{AttributionMethod, HopAttribution};
use custody_context::traceparent::{SpanId, TraceId, TraceParent};
use custody_context::verify::VerifiedToken;
use custody_protocols::sql::Dialect;
use custody_protocols::sqlcommenter;

use crate::inflight::Stitch;
use crate::proxy::Shared;

/// Context a connection carries for all its queries.
#[derive(Debug, Default, Clone)]
pub(crate) struct Carrier {
    /// A `traceparent` from `application_name` or a connection attribute.
    pub traceparent: Option<TraceParent>,
    /// A transaction token from a connection attribute (never logged).
    pub token: Option<String>,
}

impl Carrier {
    /// From a PostgreSQL `application_name`: the whole value, or its last
    /// word after a space, a colon or a slash, when that is a `traceparent`.
    pub(crate) fn from_application_name(name: &str) -> Carrier {
        let last = name.rsplit([' ', ':', '/']).next().unwrap_or(name);
        Carrier {
            traceparent: TraceParent::parse(name)
                .or_else(|_| TraceParent::parse(last))
                .ok(),
            token: None,
        }
    }

    /// From MySQL connection attributes.
    pub(crate) fn from_attributes(attributes: &[(String, String)]) -> Carrier {
        let mut carrier = Carrier::default();
        for (key, value) in attributes {
            if key.eq_ignore_ascii_case("traceparent") {
                carrier.traceparent = TraceParent::parse(value).ok();
            } else if key.eq_ignore_ascii_case("txn_token") || key.eq_ignore_ascii_case("txn-token")
            {
                carrier.token = Some(value.clone());
            }
        }
        carrier
    }
}

/// How a query was tied to its chain.
#[derive(Debug, Clone)]
pub(crate) struct Attributed {
    /// The chain's token (verified here or earlier), when a chain was found.
    pub token: Option<Arc<VerifiedToken>>,
    /// The span this query's hop hangs under.
    pub parent_span: Option<SpanId>,
    pub attribution: HopAttribution,
    pub outcome: v1::ContextOutcome,
    /// Why a presented token was refused, when one was.
    pub refusal_reason: &'static str,
}

impl Attributed {
    fn new(method: AttributionMethod, token: Arc<VerifiedToken>, parent: Option<SpanId>) -> Self {
        Attributed {
            token: Some(token),
            parent_span: parent,
            attribution: HopAttribution {
                method,
                confidence: 1.0,
            },
            outcome: v1::ContextOutcome::Propagated,
            refusal_reason: "",
        }
    }
}

fn from_context(
    shared: &Shared,
    method: AttributionMethod,
    token: Option<&str>,
    traceparent: Option<TraceParent>,
    refusal: &mut &'static str,
) -> Option<Attributed> {
    if let Some(token) = token {
        match shared.verify(token) {
            Ok(verified) => {
                let parent = traceparent
                    .filter(|tp| tp.trace_id == verified.claims.txn)
                    .map(|tp| tp.parent_id);
                return Some(Attributed::new(method, verified, parent));
            }
            Err(error) => *refusal = error.reason(),
        }
    }
    let tp = traceparent?;
    let request = shared.inflight.find(tp.trace_id)?;
    Some(Attributed::new(method, request.token, Some(tp.parent_id)))
}

/// Attributes one query. `stitch` is the pod's inbound request in flight
/// when the query was sent.
pub(crate) fn attribute(
    shared: &Shared,
    sql: Option<&str>,
    dialect: Dialect,
    carrier: &Carrier,
    stitch: Option<&Stitch>,
) -> Attributed {
    let mut refusal = "";
    if let Some(comment) = sql.and_then(|sql| sqlcommenter::extract(sql, dialect)) {
        let traceparent = comment.traceparent().and_then(|tp| {
            let trace_id = TraceId::from_bytes(tp.trace_id)?;
            let parent_id = SpanId::from_bytes(tp.parent_id)?;
            Some(TraceParent {
                trace_id,
                parent_id,
                flags: tp.flags,
            })
        });
        if let Some(found) = from_context(
            shared,
            AttributionMethod::SqlComment,
            comment.txn_token(),
            traceparent,
            &mut refusal,
        ) {
            return found;
        }
    }
    if let Some(found) = from_context(
        shared,
        AttributionMethod::ConnectionAttribute,
        carrier.token.as_deref(),
        carrier.traceparent,
        &mut refusal,
    ) {
        return found;
    }
    let refused = |outcome| {
        if refusal.is_empty() {
            outcome
        } else {
            v1::ContextOutcome::Refused
        }
    };
    match stitch {
        Some(stitch) => Attributed {
            token: Some(Arc::clone(&stitch.request.token)),
            parent_span: Some(stitch.request.span.parent_id),
            attribution: HopAttribution::stitched(stitch.confidence),
            outcome: refused(v1::ContextOutcome::Stitched),
            refusal_reason: refusal,
        },
        None => Attributed {
            token: None,
            parent_span: None,
            attribution: HopAttribution {
                method: AttributionMethod::PeerOnly,
                confidence: 1.0,
            },
            outcome: refused(v1::ContextOutcome::Missing),
            refusal_reason: refusal,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_name_carries_a_traceparent_alone_or_after_a_prefix() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for name in [
            tp.to_owned(),
            format!("orders:{tp}"),
            format!("orders {tp}"),
        ] {
            let carrier = Carrier::from_application_name(&name);
            assert_eq!(
                carrier
                    .traceparent
                    .map(|t| t.trace_id.to_string())
                    .as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736"),
                "{name}"
            );
        }
        assert!(Carrier::from_application_name("psql").traceparent.is_none());
    }

    #[test]
    fn mysql_attributes_carry_traceparent_and_token() {
        let carrier = Carrier::from_attributes(&[
            ("_client_name".into(), "libmariadb".into()),
            (
                "traceparent".into(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            ),
            ("txn_token".into(), "abc".into()),
        ]);
        assert!(carrier.traceparent.is_some());
        assert_eq!(carrier.token.as_deref(), Some("abc"));
    }
}
