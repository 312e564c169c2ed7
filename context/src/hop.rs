//! Hop events: one record per request or query crossing a sidecar.
//!
//! The event type is the protobuf message [`v1::HopEvent`], so what a sidecar
//! builds is exactly what the control plane stores. This module adds the
//! checks the control plane applies before accepting one, with the field at
//! fault, and the bounded reason label it counts rejections by.

use crate::api::{SCHEMA_VERSION, v1};
use crate::traceparent::{SpanId, TraceId};

pub use v1::HopEvent;

/// Longest string accepted in a hop field (operation, names, codes).
pub const MAX_FIELD_BYTES: usize = 1024;
/// Most entries accepted in a hop's lists (workloads, tables, classes).
pub const MAX_LIST_LEN: usize = 256;

/// Why a hop event was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct HopError {
    /// The field at fault.
    pub field: &'static str,
    /// What is wrong.
    pub problem: HopProblem,
}

/// What is wrong with a hop field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HopProblem {
    /// The schema version is not one this build understands.
    #[error("unsupported schema version")]
    SchemaVersion,
    /// A required field is empty.
    #[error("required")]
    Missing,
    /// An id is not lowercase hex of the right length, or is all zeros.
    #[error("not a valid id")]
    BadId,
    /// A string or list is over its size limit.
    #[error("too large")]
    TooLarge,
    /// A confidence is outside `[0, 1]`.
    #[error("confidence outside [0, 1]")]
    Confidence,
}

impl HopError {
    /// A bounded label for metrics: `<field>_<problem>`.
    pub fn reason(&self) -> String {
        let problem = match self.problem {
            HopProblem::SchemaVersion => "schema_version",
            HopProblem::Missing => "missing",
            HopProblem::BadId => "bad_id",
            HopProblem::TooLarge => "too_large",
            HopProblem::Confidence => "confidence",
        };
        format!("{}_{problem}", self.field.replace('.', "_"))
    }
}

fn err(field: &'static str, problem: HopProblem) -> HopError {
    HopError { field, problem }
}

fn bounded(field: &'static str, value: &str) -> Result<(), HopError> {
    if value.len() > MAX_FIELD_BYTES {
        return Err(err(field, HopProblem::TooLarge));
    }
    Ok(())
}

fn bounded_list(field: &'static str, values: &[String]) -> Result<(), HopError> {
    if values.len() > MAX_LIST_LEN {
        return Err(err(field, HopProblem::TooLarge));
    }
    values.iter().try_for_each(|v| bounded(field, v))
}

/// Checks a hop event before it is accepted.
pub fn validate(hop: &HopEvent) -> Result<(), HopError> {
    if hop.schema_version != SCHEMA_VERSION {
        return Err(err("schema_version", HopProblem::SchemaVersion));
    }
    if hop.event_id.is_empty() {
        return Err(err("event_id", HopProblem::Missing));
    }
    if hop.event_id.len() > 64 {
        return Err(err("event_id", HopProblem::TooLarge));
    }
    hop.chain_id
        .parse::<TraceId>()
        .map_err(|_| err("chain_id", HopProblem::BadId))?;
    hop.span_id
        .parse::<SpanId>()
        .map_err(|_| err("span_id", HopProblem::BadId))?;
    if !hop.parent_span_id.is_empty() {
        hop.parent_span_id
            .parse::<SpanId>()
            .map_err(|_| err("parent_span_id", HopProblem::BadId))?;
    }
    if hop.workload.is_none() {
        return Err(err("workload", HopProblem::Missing));
    }
    bounded("operation", &hop.operation)?;
    bounded("refusal_reason", &hop.refusal_reason)?;
    bounded("key_id", &hop.key_id)?;
    bounded("peer_identity", &hop.peer_identity)?;
    bounded("transport_error", &hop.transport_error)?;
    bounded("identity_mismatch", &hop.identity_mismatch)?;
    bounded_list("workloads", &hop.workloads)?;
    bounded_list("taint", &hop.taint)?;
    if let Some(initiator) = &hop.initiator {
        bounded("initiator.subject", &initiator.subject)?;
        bounded_list("initiator.actors", &initiator.actors)?;
    }
    if let Some(att) = &hop.attribution
        && !(0.0..=1.0).contains(&att.confidence)
    {
        return Err(err("attribution.confidence", HopProblem::Confidence));
    }
    if hop.data.len() > MAX_LIST_LEN {
        return Err(err("data", HopProblem::TooLarge));
    }
    for touch in &hop.data {
        bounded("data.class", &touch.class)?;
        if !(0.0..=1.0).contains(&touch.confidence) {
            return Err(err("data.confidence", HopProblem::Confidence));
        }
    }
    if let Some(db) = &hop.database {
        bounded_list("database.tables_read", &db.tables_read)?;
        bounded_list("database.tables_written", &db.tables_written)?;
        bounded_list("database.columns", &db.columns)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> HopEvent {
        HopEvent {
            schema_version: SCHEMA_VERSION,
            event_id: "e1".into(),
            chain_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            workload: Some(v1::WorkloadId {
                trust_domain: "td".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
                pod: String::new(),
            }),
            attribution: Some(v1::Attribution {
                method: v1::AttributionMethod::Propagated as i32,
                confidence: 1.0,
            }),
            ..Default::default()
        }
    }

    fn check(edit: impl FnOnce(&mut HopEvent), expected: Result<(), (&str, HopProblem)>) {
        let mut hop = valid();
        edit(&mut hop);
        let got = validate(&hop).map_err(|e| (e.field, e.problem));
        assert_eq!(got, expected);
    }

    #[test]
    fn accepts_a_valid_hop() {
        check(|_| {}, Ok(()));
    }

    #[test]
    fn names_the_field_at_fault() {
        use HopProblem::*;
        check(
            |h| h.schema_version = 2,
            Err(("schema_version", SchemaVersion)),
        );
        check(|h| h.event_id.clear(), Err(("event_id", Missing)));
        check(|h| h.chain_id = "0".repeat(32), Err(("chain_id", BadId)));
        check(|h| h.span_id = "xyz".into(), Err(("span_id", BadId)));
        check(
            |h| h.parent_span_id = "0".repeat(16),
            Err(("parent_span_id", BadId)),
        );
        check(|h| h.workload = None, Err(("workload", Missing)));
        check(
            |h| h.operation = "x".repeat(MAX_FIELD_BYTES + 1),
            Err(("operation", TooLarge)),
        );
        check(
            |h| h.workloads = vec![String::new(); MAX_LIST_LEN + 1],
            Err(("workloads", TooLarge)),
        );
        check(
            |h| h.attribution.as_mut().unwrap().confidence = 1.5,
            Err(("attribution.confidence", Confidence)),
        );
        check(
            |h| h.attribution.as_mut().unwrap().confidence = f32::NAN,
            Err(("attribution.confidence", Confidence)),
        );
    }

    #[test]
    fn reasons_are_bounded_labels() {
        let e = err("attribution.confidence", HopProblem::Confidence);
        assert_eq!(e.reason(), "attribution_confidence_confidence");
    }
}
