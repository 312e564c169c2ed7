//! Hop export: a bounded queue between the request path and an exporter task.
//!
//! The request path calls [`HopSink::emit`], which never waits: a full queue
//! drops the event and counts it (`custody_proxy_exporter_dropped_total`).
//! The exporter task batches events (by size or after the flush interval)
//! and sends them to the control plane (`custody.v1.Ingest/ReportHops`) or
//! appends them to a JSON-lines file in standalone mode. Undelivered events
//! are retried, within a second bound of the queue's size.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_context::api::v1;
use custody_context::hop::HopEvent;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// How often the exporter collects queued events (at most the flush interval).
const COLLECT_INTERVAL: Duration = Duration::from_millis(10);

/// Where the exporter sends batches.
#[derive(Clone, Debug)]
pub enum ExportTarget {
    /// The control plane's `Ingest` service, and the credentials to present.
    ControlPlane(String, crate::control_auth::ControlPlaneAuth),
    /// A JSON-lines file, one event per line.
    JsonlFile(PathBuf),
    /// Nowhere: events are counted and dropped.
    Discard,
}

/// The request path's end of the queue.
#[derive(Clone, Debug)]
pub struct HopSink {
    tx: mpsc::Sender<HopEvent>,
    metrics: Arc<Metrics>,
}

/// The exporter's end of the queue.
#[derive(Debug)]
pub struct HopQueue {
    rx: mpsc::Receiver<HopEvent>,
    metrics: Arc<Metrics>,
}

/// A queue of `capacity` events.
pub fn queue(capacity: usize, metrics: Arc<Metrics>) -> (HopSink, HopQueue) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        HopSink {
            tx,
            metrics: Arc::clone(&metrics),
        },
        HopQueue { rx, metrics },
    )
}

impl HopSink {
    /// Queues an event without waiting; a full queue drops and counts it.
    pub fn emit(&self, hop: HopEvent) {
        match self.tx.try_send(hop) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.exporter_dropped.inc();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.exporter_dropped.inc();
            }
        }
        self.update_depth();
    }

    fn update_depth(&self) {
        let depth = self.tx.max_capacity() - self.tx.capacity();
        self.metrics
            .exporter_queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }
}

impl HopQueue {
    /// Runs the exporter until every sink is dropped. Once `stop` turns true
    /// (shutdown began), what is queued is written at once and every later
    /// event (requests draining in the grace period) is written as it comes.
    ///
    /// Events that could not be delivered (the control plane is away) are
    /// kept, up to the queue's capacity again, and retried with a capped
    /// backoff; past that the oldest are dropped and counted. The control
    /// plane drops duplicates by event id, so a retried batch that did
    /// arrive is harmless.
    pub async fn run(
        mut self,
        target: ExportTarget,
        batch_size: usize,
        flush_interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut writer = Writer::new(target);
        let mut retry = Retry::new(self.rx.max_capacity(), batch_size.max(1));
        let mut batch = Vec::with_capacity(batch_size);
        // The exporter collects on a short tick rather than waiting on the
        // queue: a waiting receiver would be woken by every event, a
        // cross-thread wake-up per request on the request path.
        let mut tick = tokio::time::interval(flush_interval.min(COLLECT_INTERVAL));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_flush = Instant::now();
        let mut draining = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let mut closed = false;
                    loop {
                        match self.rx.try_recv() {
                            Ok(hop) => {
                                batch.push(hop);
                                if batch.len() >= batch_size {
                                    self.flush(&mut writer, &mut retry, &mut batch).await;
                                    last_flush = Instant::now();
                                }
                            }
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    if draining || closed || last_flush.elapsed() >= flush_interval {
                        self.flush(&mut writer, &mut retry, &mut batch).await;
                        last_flush = Instant::now();
                    }
                    if closed {
                        break;
                    }
                }
                changed = stop.changed(), if !draining => {
                    if changed.is_err() || *stop.borrow() {
                        draining = true;
                        while let Ok(hop) = self.rx.try_recv() {
                            batch.push(hop);
                        }
                        self.flush(&mut writer, &mut retry, &mut batch).await;
                    }
                }
            }
        }
        retry.next_attempt = Instant::now();
        self.flush(&mut writer, &mut retry, &mut batch).await;
    }

    async fn flush(&self, writer: &mut Writer, retry: &mut Retry, batch: &mut Vec<HopEvent>) {
        let depth = self.rx.len();
        self.metrics
            .exporter_queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        let dropped = retry.push(std::mem::take(batch));
        if dropped > 0 {
            self.metrics.exporter_dropped.inc_by(dropped);
        }
        if retry.pending.is_empty() || Instant::now() < retry.next_attempt {
            return;
        }
        while !retry.pending.is_empty() {
            let n = retry.pending.len().min(retry.batch_size);
            let chunk: Vec<HopEvent> = retry.pending.drain(..n).collect();
            match writer.write(chunk).await {
                Ok(()) => {
                    if retry.failing {
                        tracing::info!(
                            message = "hop export recovered",
                            pending = retry.pending.len()
                        );
                    }
                    retry.succeeded();
                }
                Err((error, chunk)) => {
                    // Back in front, in order, for the next attempt.
                    for hop in chunk.into_iter().rev() {
                        retry.pending.push_front(hop);
                    }
                    self.metrics.exporter_failed.inc_by(n as u64);
                    if !retry.failing {
                        tracing::warn!(message = "hop export failed; keeping events to retry", %error, pending = retry.pending.len());
                    }
                    retry.failed();
                    return;
                }
            }
        }
    }
}

/// Undelivered events and when to try again.
struct Retry {
    pending: VecDeque<HopEvent>,
    capacity: usize,
    batch_size: usize,
    failing: bool,
    backoff: Duration,
    next_attempt: Instant,
}

impl Retry {
    const MAX_BACKOFF: Duration = Duration::from_secs(2);

    fn new(capacity: usize, batch_size: usize) -> Self {
        Retry {
            pending: VecDeque::new(),
            capacity: capacity.max(batch_size),
            batch_size,
            failing: false,
            backoff: Duration::from_millis(100),
            next_attempt: Instant::now(),
        }
    }

    /// Adds events; returns how many of the oldest were dropped to stay
    /// within capacity.
    fn push(&mut self, events: Vec<HopEvent>) -> u64 {
        self.pending.extend(events);
        let over = self.pending.len().saturating_sub(self.capacity);
        self.pending.drain(..over);
        over as u64
    }

    fn failed(&mut self) {
        self.failing = true;
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Self::MAX_BACKOFF);
    }

    fn succeeded(&mut self) {
        self.failing = false;
        self.backoff = Duration::from_millis(100);
    }
}

struct Writer {
    target: ExportTarget,
    file: Option<tokio::fs::File>,
    client: Option<
        v1::ingest_client::IngestClient<
            tonic::service::interceptor::InterceptedService<
                tonic::transport::Channel,
                crate::control_auth::ControlPlaneAuth,
            >,
        >,
    >,
}

impl Writer {
    fn new(target: ExportTarget) -> Self {
        Writer {
            target,
            file: None,
            client: None,
        }
    }

    /// Writes a batch; on failure, hands it back with the reason.
    async fn write(&mut self, hops: Vec<HopEvent>) -> Result<(), (String, Vec<HopEvent>)> {
        match &self.target {
            ExportTarget::Discard => Ok(()),
            ExportTarget::JsonlFile(path) => {
                if self.file.is_none() {
                    match tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .await
                    {
                        Ok(file) => self.file = Some(file),
                        Err(e) => return Err((format!("open {}: {e}", path.display()), hops)),
                    }
                }
                let mut out = Vec::with_capacity(hops.len() * 512);
                for hop in &hops {
                    // Serializing into memory cannot fail.
                    serde_json::to_writer(&mut out, &HopJson::new(hop)).unwrap_or_default();
                    out.push(b'\n');
                }
                let Some(file) = self.file.as_mut() else {
                    return Err(("file closed".into(), hops));
                };
                let written = match file.write_all(&out).await {
                    Ok(()) => file.flush().await,
                    Err(e) => Err(e),
                };
                written.map_err(|e| (e.to_string(), hops))
            }
            ExportTarget::ControlPlane(address, auth) => {
                if self.client.is_none() {
                    match tonic::transport::Endpoint::from_shared(address.clone()) {
                        Ok(endpoint) => {
                            self.client = Some(v1::ingest_client::IngestClient::with_interceptor(
                                endpoint.connect_lazy(),
                                auth.clone(),
                            ));
                        }
                        Err(e) => return Err((e.to_string(), hops)),
                    }
                }
                let Some(client) = self.client.as_mut() else {
                    return Err(("no client".into(), hops));
                };
                // The request consumes its batch: a copy stays for a retry.
                client
                    .report_hops(v1::HopBatch { hops: hops.clone() })
                    .await
                    .map(|_| ())
                    .map_err(|status| (status.to_string(), hops))
            }
        }
    }
}

fn enum_name<E: TryFrom<i32>>(raw: i32, name: impl Fn(E) -> &'static str) -> &'static str {
    E::try_from(raw).map_or("UNKNOWN", name)
}

/// A hop event as JSON, borrowed from the event: serialized straight to
/// the output, without building a value tree per event.
#[derive(serde::Serialize)]
struct HopJson<'a> {
    schema_version: u32,
    event_id: &'a str,
    chain_id: &'a str,
    span_id: &'a str,
    parent_span_id: &'a str,
    workload: Option<WorkloadJson<'a>>,
    peer: Option<WorkloadJson<'a>>,
    direction: &'static str,
    protocol: &'static str,
    operation: &'a str,
    status: u32,
    initiator: Option<InitiatorJson<'a>>,
    workloads: &'a [String],
    attribution: Option<AttributionJson>,
    context_outcome: &'static str,
    refusal_reason: &'a str,
    bytes_in: u64,
    bytes_out: u64,
    start_unix_nanos: u64,
    duration_nanos: u64,
    egress: Option<EgressJson<'a>>,
    connection: Option<FiveTupleJson<'a>>,
    data: Vec<DataJson<'a>>,
    database: Option<DatabaseJson<'a>>,
    taint: &'a [String],
    key_id: &'a str,
    transport_security: &'static str,
    peer_identity: &'a str,
    transport_error: &'a str,
    identity_mismatch: &'a str,
}

#[derive(serde::Serialize)]
struct WorkloadJson<'a> {
    trust_domain: &'a str,
    namespace: &'a str,
    service_account: &'a str,
    pod: &'a str,
}

#[derive(serde::Serialize)]
struct InitiatorJson<'a> {
    subject: &'a str,
    kind: &'static str,
    actors: &'a [String],
    scope: &'a str,
}

#[derive(serde::Serialize)]
struct AttributionJson {
    method: &'static str,
    confidence: f32,
}

#[derive(serde::Serialize)]
struct EgressJson<'a> {
    destination: Option<DestinationJson<'a>>,
    verdict: &'static str,
    policy: &'a str,
    rule: &'a str,
}

#[derive(serde::Serialize)]
struct DestinationJson<'a> {
    host: &'a str,
    ip: &'a str,
    port: u32,
}

#[derive(serde::Serialize)]
struct FiveTupleJson<'a> {
    src_ip: &'a str,
    src_port: u32,
    dst_ip: &'a str,
    dst_port: u32,
    transport: &'a str,
}

#[derive(serde::Serialize)]
struct DatabaseJson<'a> {
    system: &'a str,
    database: &'a str,
    user: &'a str,
    statement_kind: &'a str,
    fingerprint: &'a str,
    tables_read: &'a [String],
    tables_written: &'a [String],
    columns: &'a [String],
    rows_returned: u64,
    rows_affected: u64,
    error_code: &'a str,
    parsed: bool,
    transport: &'a str,
}

#[derive(serde::Serialize)]
struct DataJson<'a> {
    class: &'a str,
    count: u64,
    confidence: f32,
}

fn workload_json(w: Option<&v1::WorkloadId>) -> Option<WorkloadJson<'_>> {
    w.map(|w| WorkloadJson {
        trust_domain: &w.trust_domain,
        namespace: &w.namespace,
        service_account: &w.service_account,
        pod: &w.pod,
    })
}

impl<'a> HopJson<'a> {
    fn new(hop: &'a HopEvent) -> Self {
        HopJson {
            schema_version: hop.schema_version,
            event_id: &hop.event_id,
            chain_id: &hop.chain_id,
            span_id: &hop.span_id,
            parent_span_id: &hop.parent_span_id,
            workload: workload_json(hop.workload.as_ref()),
            peer: workload_json(hop.peer.as_ref()),
            direction: enum_name(hop.direction, |d: v1::Direction| d.as_str_name()),
            protocol: enum_name(hop.protocol, |p: v1::Protocol| p.as_str_name()),
            operation: &hop.operation,
            status: hop.status,
            initiator: hop.initiator.as_ref().map(|i| InitiatorJson {
                subject: &i.subject,
                kind: enum_name(i.kind, |k: v1::InitiatorKind| k.as_str_name()),
                actors: &i.actors,
                scope: &i.scope,
            }),
            workloads: &hop.workloads,
            attribution: hop.attribution.as_ref().map(|a| AttributionJson {
                method: enum_name(a.method, |m: v1::AttributionMethod| m.as_str_name()),
                confidence: a.confidence,
            }),
            context_outcome: enum_name(hop.context_outcome, |o: v1::ContextOutcome| {
                o.as_str_name()
            }),
            refusal_reason: &hop.refusal_reason,
            bytes_in: hop.bytes_in,
            bytes_out: hop.bytes_out,
            start_unix_nanos: hop.start_unix_nanos,
            duration_nanos: hop.duration_nanos,
            egress: hop.egress.as_ref().map(|e| EgressJson {
                destination: e.destination.as_ref().map(|d| DestinationJson {
                    host: &d.host,
                    ip: &d.ip,
                    port: d.port,
                }),
                verdict: enum_name(e.verdict, |v: v1::Verdict| v.as_str_name()),
                policy: &e.policy,
                rule: &e.rule,
            }),
            connection: hop.connection.as_ref().map(|c| FiveTupleJson {
                src_ip: &c.src_ip,
                src_port: c.src_port,
                dst_ip: &c.dst_ip,
                dst_port: c.dst_port,
                transport: &c.transport,
            }),
            data: hop
                .data
                .iter()
                .map(|d| DataJson {
                    class: &d.class,
                    count: d.count,
                    confidence: d.confidence,
                })
                .collect(),
            database: hop.database.as_ref().map(|d| DatabaseJson {
                system: &d.system,
                database: &d.database,
                user: &d.user,
                statement_kind: &d.statement_kind,
                fingerprint: &d.fingerprint,
                tables_read: &d.tables_read,
                tables_written: &d.tables_written,
                columns: &d.columns,
                rows_returned: d.rows_returned,
                rows_affected: d.rows_affected,
                error_code: &d.error_code,
                parsed: d.parsed,
                transport: &d.transport,
            }),
            taint: &hop.taint,
            key_id: &hop.key_id,
            transport_security: enum_name(hop.transport_security, |t: v1::TransportSecurity| {
                t.as_str_name()
            }),
            peer_identity: &hop.peer_identity,
            transport_error: &hop.transport_error,
            identity_mismatch: &hop.identity_mismatch,
        }
    }
}

/// The JSON form of a hop event (the JSON-lines export): proto field names,
/// enums by name.
pub fn hop_json(hop: &HopEvent) -> Value {
    serde_json::to_value(HopJson::new(hop)).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests;
