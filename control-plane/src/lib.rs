//! `custody-control`: the Custody control plane.
//!
//! - [`assembly`]: hop events to chain trees with confidence and coverage (pure).
//! - [`store`]: the storage trait and its embedded SQLite implementation.
//! - [`assembler`]: the background job that assembles what ingest touched.
//! - [`distribution`]: the policy in force, its versions, and its push.
//! - [`trust`]: the root key and the signing keys issued to sidecars.
//! - [`auth`]: bearer tokens for every API.
//! - [`workload_auth`]: workloads proven by projected service-account tokens.
//! - [`grpc`]: the `custody.v1` services (Ingest, PolicyDistribution, Trust).
//! - [`http`]: the investigation and policy API and `/metrics`.
//! - [`inject`]: sidecar injection, the admission webhook's pure core.
//! - [`tls`]: the HTTPS listener (webhooks), with certificate reload.
//! - [`metrics`]: the Prometheus metrics.
//! - [`config`]: the typed configuration.
//! - [`server`]: the wiring.
//! - [`client`] and [`render`]: what the `custody` CLI uses.

pub mod assembler;
pub mod assembly;
pub mod auth;
pub mod client;
pub mod config;
pub mod distribution;
pub mod grpc;
pub mod http;
pub mod inject;
pub mod metrics;
pub mod render;
pub mod server;
pub mod store;
pub mod tls;
pub mod trust;
pub mod workload_auth;

/// The current Unix time in nanoseconds (0 before 1970).
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
