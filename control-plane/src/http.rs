//! The investigation and policy API (HTTP/JSON, documented in
//! `control-plane/openapi.yaml`), and `/metrics`.
//!
//! Every `/v1` route requires an admin bearer token (node and workload
//! callers are refused with 403); `/metrics` and
//! `/healthz` are open (counts only, no chain data), and so is `/inject`
//! when injection is configured (it answers with a patch for the pod it is
//! sent, nothing else).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use custody_context::policy::{EgressPolicy, PolicyError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_stream::StreamExt as _;

use crate::assembly::{ChainSummary, ClassCount, Coverage, DestinationView};
use crate::auth::Caller;
use crate::config::Role;
use crate::distribution::{BlockDestination, Change, ChangeError, Revoke};
use crate::server::Shared;
use crate::store::{ChainQuery, StoreError};
use crate::unix_nanos;

/// The most chains one list returns.
pub const MAX_LIMIT: u32 = 1_000;

/// An API error: a status and a JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: serde_json::Value,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: json!({ "error": message.into() }),
        }
    }

    fn field(field: &str, message: &str) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "field": field, "message": message }),
        }
    }
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        ApiError::field(&e.field, &e.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Invalid(e) => e.into(),
            ChangeError::NotFound(name) => {
                ApiError::new(StatusCode::NOT_FOUND, format!("no policy named {name}"))
            }
            ChangeError::Store(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "blocking task failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    })?
}

async fn require_admin(
    State(shared): State<Arc<Shared>>,
    mut req: Request,
    next: Next,
) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(axum::http::HeaderValue::as_bytes);
    match shared.authenticate(header, "http") {
        Ok(caller) if caller.role == Role::Admin => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Ok(caller) => {
            shared.refused("http", "role");
            tracing::warn!(caller = %caller.name, role = ?caller.role, "admin API refused");
            closing(
                ApiError::new(StatusCode::FORBIDDEN, "an admin token is required").into_response(),
            )
        }
        Err(e) => {
            let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()).into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            closing(resp)
        }
    }
}

/// A refusal is sent before the request's body is read, so the connection
/// cannot carry another request: saying so keeps a client from reusing it
/// (and failing on a connection the server has closed).
fn closing(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

/// The router.
pub fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/v1/chains", get(list_chains))
        .route("/v1/chains/stream", get(stream_chains))
        .route("/v1/chains/{id}", get(get_chain))
        .route("/v1/blast-radius", get(blast_radius))
        .route("/v1/policies", get(list_policies).post(apply_policy))
        .route("/v1/policies/status", get(policy_status))
        .route("/v1/policies/{name}", get(get_policy).delete(delete_policy))
        .route("/v1/audit", get(audit))
        .route("/v1/contain/block-destination", post(contain_block))
        .route("/v1/contain/revoke", post(contain_revoke))
        .route("/v1/contain/quarantine", post(contain_quarantine))
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            require_admin,
        ));
    Router::new()
        .merge(api)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared)
}

/// `POST /inject`: the sidecar injection webhook ([`crate::inject`]).
pub fn inject_router(config: Arc<crate::inject::InjectConfig>) -> Router {
    Router::new()
        .route("/inject", post(inject))
        .with_state(config)
}

async fn inject(
    State(config): State<Arc<crate::inject::InjectConfig>>,
    body: axum::body::Bytes,
) -> Response {
    match crate::inject::review(&config, &body) {
        Ok(reviewed) => {
            let outcome = reviewed
                .skipped
                .map_or("injected", crate::inject::Skip::as_str);
            tracing::info!(outcome, "admission review");
            Json(reviewed.response).into_response()
        }
        Err(e) => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    // The assembly backlog as of now, not as of the last pass.
    let (pending, waited) = shared.dirty.backlog();
    let m = &shared.metrics;
    m.assembly_pending
        .set(i64::try_from(pending).unwrap_or(i64::MAX));
    m.assembly_wait.set(waited.as_secs_f64());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
}

/// Query parameters of `GET /v1/chains` and `/v1/chains/stream`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainParams {
    initiator: Option<String>,
    service: Option<String>,
    data_class: Option<String>,
    destination: Option<String>,
    verdict: Option<String>,
    identity: Option<String>,
    coverage: Option<String>,
    /// Unix nanoseconds.
    since: Option<u64>,
    /// Unix nanoseconds.
    until: Option<u64>,
    limit: Option<u32>,
}

impl ChainParams {
    fn query(self) -> ApiResult<ChainQuery> {
        let coverage = match self.coverage.as_deref() {
            None | Some("") => None,
            Some(c) => Some(Coverage::parse(c).ok_or_else(|| {
                ApiError::field("coverage", "one of propagated, stitched, partial, orphan")
            })?),
        };
        if let Some(v) = self.verdict.as_deref()
            && !["allow", "audit", "block", "unspecified"].contains(&v)
        {
            return Err(ApiError::field("verdict", "one of allow, audit, block"));
        }
        let limit = self.limit.unwrap_or(100);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(ApiError::field("limit", "between 1 and 1000"));
        }
        let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
        Ok(ChainQuery {
            initiator: nonempty(self.initiator),
            service: nonempty(self.service),
            data_class: nonempty(self.data_class),
            destination: nonempty(self.destination),
            verdict: nonempty(self.verdict),
            identity: nonempty(self.identity),
            coverage,
            since: self.since,
            until: self.until,
            limit,
        })
    }
}

fn bad_query(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
}

async fn list_chains(
    State(shared): State<Arc<Shared>>,
    params: Result<Query<ChainParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let q = params.map_err(bad_query)?.0.query()?;
    let store = shared.store.clone();
    let chains = blocking(move || Ok(store.chains(&q)?)).await?;
    Ok(Json(json!({ "chains": chains })))
}

async fn get_chain(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let store = shared.store.clone();
    let lookup = id.clone();
    match blocking(move || Ok(store.chain(&lookup)?)).await? {
        Some(tree) => Ok(Json(serde_json::to_value(tree).map_err(StoreError::from)?)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no chain {id}"),
        )),
    }
}

/// Whether a summary matches a stream filter (the same filters as the list).
pub fn matches(s: &ChainSummary, q: &ChainQuery) -> bool {
    let has = |list: &[String], v: &Option<String>| v.as_ref().is_none_or(|v| list.contains(v));
    let principal = q.initiator.as_ref().is_none_or(|p| {
        s.initiator
            .as_ref()
            .is_some_and(|i| &i.subject == p || i.actors.contains(p))
    });
    let classes: Vec<String> = s.data_classes.iter().map(|c| c.class.clone()).collect();
    let hosts: Vec<String> = s
        .destinations
        .iter()
        .flat_map(|d| [d.host.clone(), d.ip.clone()])
        .collect();
    let verdicts: Vec<String> = s.destinations.iter().map(|d| d.verdict.clone()).collect();
    let identities: Vec<String> = s.identities.iter().map(|i| i.value.clone()).collect();
    principal
        && has(&s.services, &q.service)
        && has(&classes, &q.data_class)
        && has(&hosts, &q.destination)
        && has(&verdicts, &q.verdict)
        && has(&identities, &q.identity)
        && q.coverage.is_none_or(|c| c == s.coverage)
        && q.since.is_none_or(|t| s.last_unix_nanos >= t)
        && q.until.is_none_or(|t| s.first_unix_nanos <= t)
}

async fn stream_chains(
    State(shared): State<Arc<Shared>>,
    params: Result<Query<ChainParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>>> {
    let q = params.map_err(bad_query)?.0.query()?;
    let rx = shared.chain_updates.subscribe();
    let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |item| {
        // A lagging reader skips what it missed.
        let summary = item.ok()?;
        if !matches(&summary, &q) {
            return None;
        }
        let data = serde_json::to_string(&*summary).ok()?;
        Some(Ok(Event::default().event("chain").data(data)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlastParams {
    principal: Option<String>,
    credential: Option<String>,
    since: Option<u64>,
    until: Option<u64>,
    limit: Option<u32>,
}

/// The answer of `GET /v1/blast-radius`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlastRadius {
    /// The principal or credential asked about.
    pub subject: String,
    /// Chains it appears in, newest first.
    pub chains: Vec<ChainSummary>,
    /// Workloads those chains crossed.
    pub services: Vec<String>,
    /// Data classes touched, summed.
    pub data_classes: Vec<ClassCount>,
    /// Egress destinations reached or attempted.
    pub destinations: Vec<DestinationView>,
}

async fn blast_radius(
    State(shared): State<Arc<Shared>>,
    params: Result<Query<BlastParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<BlastRadius>> {
    let p = params.map_err(bad_query)?.0;
    let subject = match (p.principal, p.credential) {
        (Some(s), None) | (None, Some(s)) if !s.is_empty() => s,
        _ => {
            return Err(ApiError::field(
                "principal",
                "exactly one of principal and credential is required",
            ));
        }
    };
    let limit = p.limit.unwrap_or(MAX_LIMIT).clamp(1, MAX_LIMIT);
    let store = shared.store.clone();
    let who = subject.clone();
    let chains = blocking(move || {
        let base = ChainQuery {
            since: p.since,
            until: p.until,
            limit,
            ..Default::default()
        };
        // As the initiator or an actor, or as an identity used on the way.
        let mut found = store.chains(&ChainQuery {
            initiator: Some(who.clone()),
            ..base.clone()
        })?;
        let seen: BTreeSet<String> = found.iter().map(|c| c.chain_id.clone()).collect();
        for c in store.chains(&ChainQuery {
            identity: Some(who),
            ..base
        })? {
            if !seen.contains(&c.chain_id) {
                found.push(c);
            }
        }
        found.sort_by_key(|c| std::cmp::Reverse(c.last_unix_nanos));
        found.truncate(limit as usize);
        Ok(found)
    })
    .await?;
    let mut services = Vec::new();
    let mut classes: BTreeMap<String, u64> = BTreeMap::new();
    let mut destinations: Vec<DestinationView> = Vec::new();
    for c in &chains {
        for s in &c.services {
            if !services.contains(s) {
                services.push(s.clone());
            }
        }
        for d in &c.data_classes {
            *classes.entry(d.class.clone()).or_default() += d.count;
        }
        for d in &c.destinations {
            if !destinations.contains(d) {
                destinations.push(d.clone());
            }
        }
    }
    Ok(Json(BlastRadius {
        subject,
        chains,
        services,
        data_classes: classes
            .into_iter()
            .map(|(class, count)| ClassCount { class, count })
            .collect(),
        destinations,
    }))
}

async fn list_policies(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(serde_json::to_value(shared.policy.current()).unwrap_or_default())
}

async fn get_policy(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> ApiResult<Json<EgressPolicy>> {
    shared
        .policy
        .current()
        .policies
        .into_iter()
        .find(|p| p.name() == name)
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no policy named {name}")))
}

async fn change(
    shared: Arc<Shared>,
    change: Change,
    caller: Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let state =
        blocking(move || Ok(shared.policy.change(change, &caller.name, unix_nanos())?)).await?;
    Ok(Json(json!({ "version": state.version })))
}

async fn apply_policy(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    _headers: HeaderMap,
    body: String,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let policy = EgressPolicy::parse(&body)?;
    let name = policy.name().to_owned();
    let Json(mut out) = change(shared, Change::Apply(policy), caller).await?;
    out["name"] = json!(name);
    Ok((StatusCode::OK, Json(out)))
}

async fn delete_policy(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    change(shared, Change::Delete(name), caller).await
}

async fn policy_status(State(shared): State<Arc<Shared>>) -> ApiResult<Json<serde_json::Value>> {
    let version = shared.policy.current().version;
    let store = shared.store.clone();
    let clients = blocking(move || Ok(store.client_versions()?)).await?;
    Ok(Json(json!({ "version": version, "clients": clients })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    limit: Option<u32>,
}

async fn audit(
    State(shared): State<Arc<Shared>>,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = params
        .map_err(bad_query)?
        .0
        .limit
        .unwrap_or(100)
        .clamp(1, MAX_LIMIT);
    let store = shared.store.clone();
    let entries = blocking(move || Ok(store.audit(limit)?)).await?;
    Ok(Json(json!({ "entries": entries })))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &str) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_str(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        ApiError::field(&field, &e.into_inner().to_string())
    })
}

async fn contain_block(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    body: String,
) -> ApiResult<Json<serde_json::Value>> {
    let req: BlockDestination = parse_json(&body)?;
    let name = crate::distribution::containment_policy_name(&req.host);
    let Json(mut out) = change(shared, Change::BlockDestination(req), caller).await?;
    out["policy"] = json!(name);
    Ok(Json(out))
}

async fn contain_revoke(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    body: String,
) -> ApiResult<Json<serde_json::Value>> {
    let req: Revoke = parse_json(&body)?;
    change(shared, Change::Revoke(req), caller).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Quarantine {
    chain: String,
}

async fn contain_quarantine(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    body: String,
) -> ApiResult<Json<serde_json::Value>> {
    let req: Quarantine = parse_json(&body)?;
    change(shared, Change::Quarantine { chain: req.chain }, caller).await
}

#[cfg(test)]
mod tests;
