//! Integration tests of the sidecar with real peers on 127.0.0.1: hyper
//! HTTP/1.1 and h2c apps and clients, tonic gRPC, sidecars in-process on
//! ephemeral ports, and the built binary for graceful shutdown.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

mod support;

mod bearer;
mod chain;
mod control;
mod egress;
mod grpc;
mod mcp;
mod mesh;
mod mesh_tcp;
mod mysql;
mod postgres;
mod refusal;
mod registration;
mod rotation;
mod shutdown;
mod tls;
mod tls_rotation;
mod traffic;
mod transparent;
