//! `custody-e2e`: a real Custody mesh on one machine.
//!
//! Each pod is a network namespace on a private bridge, with an application,
//! a `custody-proxy` sidecar running as its own user and the iptables
//! redirect a mesh's init container installs ([`mesh`]). The reference
//! topology ([`topology`]) adds the control plane, sample applications, AI
//! agents, real PostgreSQL and MariaDB servers and fake third parties; the demo (`custody-demo`) and the scenarios
//! (`tests/scenarios.rs`) run on it. [`accuracy`] builds chains of services
//! of its own to measure attribution against known chains
//! (`custody-accuracy`). No traffic leaves the machine: only loopback and the
//! namespaces the harness created.

pub mod accuracy;
pub mod cmd;
pub mod mesh;
pub mod topology;
