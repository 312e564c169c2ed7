//! The pod's inbound requests in flight, for local stitching.
//!
//! When the application makes an outbound call without forwarding the
//! `Txn-Token`, the sidecar ties the call to an inbound request of the same
//! pod that is still in flight. The estimator picks the most recently
//! started one: a handler usually calls out soon after it starts, so under
//! concurrency the newest request is the likeliest cause. The confidence is
//! `1 / n` for `n` requests in flight: certain when alone, and falling as
//! the choice becomes a guess among more candidates.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use custody_context::traceparent::TraceParent;
use custody_context::verify::VerifiedToken;

/// An inbound request in flight.
#[derive(Clone, Debug)]
pub struct InFlightRequest {
    /// The token forwarded to the application (received or minted).
    pub token: Arc<VerifiedToken>,
    /// Its encoded form.
    pub encoded: Arc<str>,
    /// The inbound hop's span (its `parent_id` is this hop's span id).
    pub span: TraceParent,
}

/// The result of stitching: the request chosen and how sure the choice is.
#[derive(Clone, Debug)]
pub struct Stitch {
    /// The inbound request the outbound call is attributed to.
    pub request: InFlightRequest,
    /// In `(0, 1]`.
    pub confidence: f32,
    /// How many inbound requests were in flight.
    pub in_flight: usize,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    requests: BTreeMap<u64, InFlightRequest>,
}

/// The table of inbound requests in flight for one pod.
#[derive(Debug, Default)]
pub struct InFlightTable {
    inner: Mutex<Inner>,
}

/// Removes its request from the table when dropped (the request finished).
#[derive(Debug)]
pub struct InFlightGuard {
    table: Arc<InFlightTable>,
    id: u64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut inner = self
            .table
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        inner.requests.remove(&self.id);
    }
}

impl InFlightTable {
    /// An empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(InFlightTable::default())
    }

    /// Registers an inbound request until the guard is dropped.
    pub fn register(self: &Arc<Self>, request: InFlightRequest) -> InFlightGuard {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let id = inner.next;
        inner.next += 1;
        inner.requests.insert(id, request);
        InFlightGuard {
            table: Arc::clone(self),
            id,
        }
    }

    /// How many inbound requests are in flight.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .requests
            .len()
    }

    /// Whether none is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The request in flight of chain `txn`, the newest if several.
    pub fn find(&self, txn: custody_context::traceparent::TraceId) -> Option<InFlightRequest> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .requests
            .values()
            .rev()
            .find(|r| r.token.claims.txn == txn)
            .cloned()
    }

    /// Attributes an outbound call: the most recently started request, with
    /// confidence `1 / n`. `None` when nothing is in flight.
    pub fn stitch(&self) -> Option<Stitch> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let n = inner.requests.len();
        let (_, newest) = inner.requests.last_key_value()?;
        Some(Stitch {
            request: newest.clone(),
            confidence: 1.0 / n as f32,
            in_flight: n,
        })
    }
}

#[cfg(test)]
mod tests;
