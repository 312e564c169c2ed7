//! The gRPC API (`custody.v1`): Ingest, PolicyDistribution and Trust, every
//! call authenticated by a bearer token (node or admin role), or by a
//! projected service-account token (workload role).
//!
//! A workload caller acts for its own workload only: a signing key is issued
//! only for the namespace, service account (and pod, when the token names
//! one) the token proves, policy subscriptions and acknowledgements must name
//! that workload, and reported hops whose reporting workload is another one
//! are rejected. When workload authentication is configured, signing keys
//! are issued to workload callers (and admins) only: the shared node token
//! can no longer claim a workload.

use std::pin::Pin;
use std::sync::Arc;

use custody_context::api::v1::{
    self, AckReceipt, BatchAck, FlowBatch, HopBatch, KeySet, KeySetRequest, PolicyAck,
    PolicyUpdate, SigningKeyGrant, SigningKeyRequest, SubscribeRequest,
    ingest_server::{Ingest, IngestServer},
    policy_distribution_server::{PolicyDistribution, PolicyDistributionServer},
    trust_server::{Trust as TrustApi, TrustServer},
};
use custody_context::hop;
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::assembly::workload_uri;
use crate::auth::Caller;
use crate::config::Role;
use crate::metrics::{AttributionLabel, KindLabel, ReasonLabel, client_kind};
use crate::server::Shared;
use crate::store::ClientVersion;
use crate::unix_nanos;

/// The authentication interceptor: refuses calls without a known token or
/// a verified workload token.
#[derive(Clone, Debug)]
pub struct Auth(Arc<Shared>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .map(tonic::metadata::MetadataValue::as_bytes);
        match self.0.authenticate(header, "grpc") {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Ok(req)
            }
            Err(e) => Err(Status::unauthenticated(e.to_string())),
        }
    }
}

/// Refuses a workload caller acting for another workload: logged, counted,
/// `PERMISSION_DENIED` naming the field.
fn check_workload(
    shared: &Shared,
    caller: Option<&Caller>,
    claimed: Option<&v1::WorkloadId>,
    what: &'static str,
) -> Result<(), Status> {
    let Some(proven) = caller.and_then(|c| c.workload.as_ref()) else {
        return Ok(());
    };
    let trust_domain = shared.auth.workload_auth().and_then(|w| w.trust_domain());
    let empty = v1::WorkloadId::default();
    let result = proven.permits(claimed.unwrap_or(&empty), trust_domain);
    result.map_err(|mismatch| {
        shared.refused("grpc", "workload_mismatch");
        tracing::warn!(
            caller = %proven.subject(),
            field = mismatch.field,
            proven = %mismatch.proven,
            claimed = %mismatch.claimed,
            what,
            "workload token used for another workload"
        );
        Status::permission_denied(format!("{what}: {mismatch}"))
    })
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "request failed");
    Status::internal("internal error")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

/// `custody.v1.Ingest`.
#[derive(Clone, Debug)]
pub struct IngestService(Arc<Shared>);

fn attribution_label(hop: &v1::HopEvent) -> &'static str {
    hop.attribution
        .as_ref()
        .and_then(|a| v1::AttributionMethod::try_from(a.method).ok())
        .and_then(v1::AttributionMethod::to_domain)
        .map_or("unspecified", |m| m.as_str())
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn report_hops(&self, request: Request<HopBatch>) -> Result<Response<BatchAck>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let batch = request.into_inner();
        let shared = self.0.clone();
        // With workload authentication on, a hop names the workload that
        // reported it only if a workload token proved it: the shared node
        // token (for node agents' flows) would let its holder speak for any pod.
        if shared.auth.workload_auth().is_some()
            && caller.as_ref().is_some_and(|c| c.role == Role::Node)
        {
            shared.refused("grpc", "role");
            tracing::warn!(
                caller = caller.as_ref().map(|c| c.name.as_str()).unwrap_or_default(),
                hops = batch.hops.len(),
                "hops refused from a node token: workload authentication is on"
            );
            return Err(Status::permission_denied(
                "hops are accepted from workload tokens only (workload_auth is configured)",
            ));
        }
        let mut valid = Vec::with_capacity(batch.hops.len());
        let mut rejected = 0u32;
        let trust_domain = shared.auth.workload_auth().and_then(|w| w.trust_domain());
        let proven = caller.as_ref().and_then(|c| c.workload.as_ref());
        let mut foreign = 0u32;
        for h in batch.hops {
            // A workload reports its own hops only.
            if let Some(proven) = proven {
                let empty = v1::WorkloadId::default();
                if proven
                    .permits(h.workload.as_ref().unwrap_or(&empty), trust_domain)
                    .is_err()
                {
                    foreign += 1;
                    rejected += 1;
                    shared
                        .metrics
                        .ingest_rejected
                        .get_or_create(&ReasonLabel {
                            reason: "workload_mismatch".into(),
                        })
                        .inc();
                    continue;
                }
            }
            match hop::validate(&h) {
                Ok(()) => valid.push(h),
                Err(e) => {
                    rejected += 1;
                    shared
                        .metrics
                        .ingest_rejected
                        .get_or_create(&ReasonLabel { reason: e.reason() })
                        .inc();
                }
            }
        }
        if let (Some(proven), true) = (proven, foreign > 0) {
            tracing::warn!(
                caller = %proven.subject(),
                hops = foreign,
                "hops reported for another workload rejected"
            );
        }
        let store = shared.store.clone();
        let (outcome, valid) = blocking(move || {
            let out = store.put_hops(&valid).map_err(internal)?;
            Ok((out, valid))
        })
        .await?;
        // One metric update per attribution method, not per hop.
        let mut by_attribution: Vec<(&'static str, u64)> = Vec::new();
        for (h, fresh) in valid.iter().zip(&outcome.fresh) {
            if *fresh {
                let label = attribution_label(h);
                match by_attribution.iter_mut().find(|(l, _)| *l == label) {
                    Some((_, n)) => *n += 1,
                    None => by_attribution.push((label, 1)),
                }
            }
        }
        for (attribution, n) in by_attribution {
            shared
                .metrics
                .hops
                .get_or_create(&AttributionLabel { attribution })
                .inc_by(n);
        }
        shared
            .metrics
            .ingest_hops
            .inc_by(u64::from(outcome.accepted));
        shared
            .metrics
            .ingest_duplicates
            .inc_by(u64::from(outcome.duplicates));
        // The assembler gets the new hops in memory rather than reading them back.
        let stored: Vec<v1::HopEvent> = valid
            .into_iter()
            .zip(&outcome.fresh)
            .filter_map(|(h, fresh)| fresh.then_some(h))
            .collect();
        shared.dirty.mark_stored(stored);
        Ok(Response::new(BatchAck {
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
            rejected,
        }))
    }

    async fn report_flows(
        &self,
        request: Request<FlowBatch>,
    ) -> Result<Response<BatchAck>, Status> {
        let batch = request.into_inner();
        let mut valid = Vec::with_capacity(batch.flows.len());
        let mut rejected = 0u32;
        for f in batch.flows {
            if f.event_id.is_empty() || f.event_id.len() > 64 || f.schema_version != 1 {
                rejected += 1;
                let reason = if f.schema_version != 1 {
                    "flow_schema_version"
                } else {
                    "flow_event_id"
                };
                self.0
                    .metrics
                    .ingest_rejected
                    .get_or_create(&ReasonLabel {
                        reason: reason.into(),
                    })
                    .inc();
            } else {
                valid.push(f);
            }
        }
        let store = self.0.store.clone();
        let (out, touched) = blocking(move || {
            let out = store.put_flows(&valid).map_err(internal)?;
            // A flow is evidence for hops already stored on the same connection:
            // their chains are assembled again.
            let keys: Vec<String> = valid
                .iter()
                .filter_map(|f| f.connection.as_ref())
                .map(crate::assembly::connection_key)
                .filter(|k| !k.is_empty())
                .collect();
            let hops = store.hops_by_connection(&keys).map_err(internal)?;
            let chains: Vec<String> = hops.into_iter().map(|h| h.chain_id).collect();
            Ok((out, chains))
        })
        .await?;
        self.0.dirty.mark(touched);
        Ok(Response::new(BatchAck {
            accepted: out.accepted,
            duplicates: out.duplicates,
            rejected,
        }))
    }
}

/// `custody.v1.PolicyDistribution`.
#[derive(Clone, Debug)]
pub struct DistributionService(Arc<Shared>);

/// Decrements the connected-clients gauge when a stream ends.
struct Connected {
    shared: Arc<Shared>,
    kind: &'static str,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.shared
            .metrics
            .connected_clients
            .get_or_create(&KindLabel { kind: self.kind })
            .dec();
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<PolicyUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyDistribution for DistributionService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let req = request.into_inner();
        if req.workload.is_some() {
            check_workload(&self.0, caller.as_ref(), req.workload.as_ref(), "subscribe")?;
        }
        let kind = client_kind(&req.client_kind);
        self.0
            .metrics
            .connected_clients
            .get_or_create(&KindLabel { kind })
            .inc();
        let guard = Connected {
            shared: self.0.clone(),
            kind,
        };
        tracing::info!(
            client = %workload_uri(req.workload.as_ref()),
            kind,
            have = req.have_version,
            "policy subscriber connected"
        );
        if let Some(w) = req.workload.as_ref() {
            let mut client = workload_uri(Some(w));
            if !w.pod.is_empty() {
                client = format!("{client}#{}", w.pod);
            }
            self.0.remember_client(client, kind);
        }
        // One task per subscriber: the current state first, then every
        // change, until the client goes away or the server stops.
        let mut rx = self.0.policy.subscribe();
        let mut stopping = self.0.stopping.clone();
        let (tx, out) = tokio::sync::mpsc::channel::<Result<PolicyUpdate, Status>>(4);
        tokio::spawn(async move {
            let _held = guard;
            loop {
                let mut update = (**rx.borrow_and_update()).clone();
                update.sent_unix_nanos = unix_nanos();
                if tx.send(Ok(update)).await.is_err() {
                    break;
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    _ = stopping.wait_for(|s| *s) => break,
                    () = tx.closed() => break,
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(out);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn acknowledge(
        &self,
        request: Request<PolicyAck>,
    ) -> Result<Response<AckReceipt>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let ack = request.into_inner();
        check_workload(
            &self.0,
            caller.as_ref(),
            ack.workload.as_ref(),
            "acknowledge",
        )?;
        let now = unix_nanos();
        let shared = self.0.clone();
        let mut client = workload_uri(ack.workload.as_ref());
        if let Some(pod) = ack
            .workload
            .as_ref()
            .map(|w| w.pod.as_str())
            .filter(|p| !p.is_empty())
        {
            client = format!("{client}#{pod}");
        }
        if client.is_empty() {
            return Err(Status::invalid_argument("workload: required"));
        }
        let kind = shared.client_kind(&client);
        let store = shared.store.clone();
        let version = ack.version;
        let latency = blocking(move || {
            let changed = store
                .policy_version(version)
                .map_err(internal)?
                .map(|s| s.changed_unix_nanos);
            let latency = changed.map_or(0, |c| now.saturating_sub(c));
            store
                .record_ack(&ClientVersion {
                    client,
                    kind,
                    version,
                    apply_nanos: ack.apply_nanos,
                    acked_unix_nanos: now,
                    change_to_applied_nanos: latency,
                    error: ack.error,
                })
                .map_err(internal)?;
            Ok(changed.map(|_| latency))
        })
        .await?;
        if let Some(latency) = latency {
            #[allow(clippy::cast_precision_loss)] // nanoseconds to seconds for a histogram
            shared
                .metrics
                .policy_push_latency
                .observe(latency as f64 / 1e9);
        }
        Ok(Response::new(AckReceipt {}))
    }
}

/// `custody.v1.Trust`.
#[derive(Clone, Debug)]
pub struct TrustService(Arc<Shared>);

#[tonic::async_trait]
impl TrustApi for TrustService {
    async fn issue_signing_key(
        &self,
        request: Request<SigningKeyRequest>,
    ) -> Result<Response<SigningKeyGrant>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let req = request.into_inner();
        let shared = self.0.clone();
        if shared.auth.workload_auth().is_some()
            && caller.as_ref().is_some_and(|c| c.role == Role::Node)
        {
            shared.refused("grpc", "role");
            tracing::warn!(
                caller = caller.as_ref().map(|c| c.name.as_str()).unwrap_or_default(),
                "signing key refused to a node token: workload authentication is on"
            );
            return Err(Status::permission_denied(
                "signing keys are issued to workload tokens only (workload_auth is configured)",
            ));
        }
        check_workload(
            &shared,
            caller.as_ref(),
            req.workload.as_ref(),
            "issue_signing_key",
        )?;
        let grant = blocking(move || {
            let now = custody_context::unix_now();
            let key = shared
                .trust
                .issue(req.workload.as_ref(), &req.ed25519, now)
                .map_err(|e| match e {
                    crate::trust::TrustError::Workload(_) | crate::trust::TrustError::PublicKey => {
                        Status::invalid_argument(e.to_string())
                    }
                    other => internal(other),
                })?;
            tracing::info!(
                key_id = %key.key_id,
                workload = %key.workload,
                caller = caller.map(|c| c.name).unwrap_or_default(),
                "signing key issued"
            );
            let keys = shared.trust.key_set(now).map_err(internal)?;
            shared.policy.set_keys(keys);
            Ok(SigningKeyGrant {
                key_id: key.key_id,
                not_before_unix: key.not_before_unix,
                not_after_unix: key.not_after_unix,
            })
        })
        .await?;
        Ok(Response::new(grant))
    }

    async fn get_key_set(
        &self,
        _request: Request<KeySetRequest>,
    ) -> Result<Response<KeySet>, Status> {
        let shared = self.0.clone();
        let set = blocking(move || {
            shared
                .trust
                .key_set(custody_context::unix_now())
                .map_err(internal)
        })
        .await?;
        Ok(Response::new(set))
    }
}

/// The three services, each behind the authentication interceptor.
#[allow(clippy::type_complexity)] // the tonic service types, spelled out once
pub fn services(
    shared: &Arc<Shared>,
) -> (
    InterceptedService<IngestServer<IngestService>, Auth>,
    InterceptedService<PolicyDistributionServer<DistributionService>, Auth>,
    InterceptedService<TrustServer<TrustService>, Auth>,
) {
    let auth = Auth(shared.clone());
    (
        IngestServer::with_interceptor(IngestService(shared.clone()), auth.clone()),
        PolicyDistributionServer::with_interceptor(
            DistributionService(shared.clone()),
            auth.clone(),
        ),
        TrustServer::with_interceptor(TrustService(shared.clone()), auth),
    )
}
