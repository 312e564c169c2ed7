//! `custody-agent`: Custody's node agent.
//!
//! Sidecars see the traffic that goes through them; a process that bypasses
//! its sidecar (a raw TCP client, a binary run as the proxy's user, a pod
//! without injection) is invisible to them. The node agent closes that gap
//! from the kernel: an eBPF program on the cgroup v2 `connect4`/`connect6`
//! hooks sees every outbound `connect()` of every process below the cgroup it
//! is attached to, reports each with pid, user, cgroup and destination, and
//! refuses with `EPERM` the destinations the egress policy blocks outright.
//!
//! Data flow: policy bundle → [`deny::compile`] (destination-only blocking
//! rules, host names resolved) → [`guard::ConnectGuard::apply`] (kernel LPM
//! tries) → kernel verdict per `connect()` → ring buffer →
//! [`event::ConnectEvent`] → [`flow`] (process lineage from `/proc`) →
//! `custody.v1.FlowEvent` records.
//!
//! The kernel program is C (`bpf/connect.bpf.c`), compiled by `build.rs` with
//! clang and embedded in the binary.

pub mod agent;
pub mod config;
pub mod deny;
pub mod event;
pub mod flow;
pub mod guard;
pub mod lineage;
