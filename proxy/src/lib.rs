//! `custody-proxy`: the Custody sidecar on pingora.
//!
//! - [`config`]: the typed YAML configuration.
//! - [`bearer`]: verified bearer JWTs (issuer and JWKS) as an identity source.
//! - [`proxy`]: the inbound and outbound HTTP/1.1, HTTP/2 and gRPC proxies
//!   (the phase chart is there): token verification, minting and extension,
//!   local stitching, `traceparent`, egress enforcement, hop events.
//! - [`tcp`]: connections that are not HTTP, passed through as TCP.
//! - [`db`]: PostgreSQL and MySQL sessions, decoded on the side: each
//!   statement attributed, analysed and classified.
//! - [`mesh`]: mutual TLS between sidecars (SPIFFE IDs in certificates)
//!   and TLS origination to external servers.
//! - [`reload`]: certificate, key and CA files re-read while running
//!   (rotation without a restart), for every TLS the sidecar ends or opens.
//! - [`taint`]: the data classes each chain touched in this pod.
//! - [`inflight`]: the pod's inbound requests in flight, for stitching.
//! - [`policy_store`]: the policy in force, hot-swapped and persisted.
//! - [`control`]: the control plane's policy and key stream.
//! - [`export`]: the bounded hop queue and its exporter.
//! - [`trust`]: the signing key and key-set files.
//! - [`registration`]: signing keys issued and renewed by the control plane.
//! - [`metrics`], [`admin`]: Prometheus metrics and the admin listener.
//! - [`server`]: wiring into a pingora server, graceful shutdown.

pub mod admin;
pub mod bearer;
pub mod config;
pub mod control;
pub mod control_auth;
pub mod db;
pub mod export;
pub mod inflight;
pub mod mesh;
pub mod metrics;
pub mod policy_store;
pub mod proxy;
pub mod registration;
pub mod reload;
pub mod server;
pub mod taint;
pub mod tcp;
pub mod trust;

pub use config::Config;
pub use server::{Running, Sidecar};
