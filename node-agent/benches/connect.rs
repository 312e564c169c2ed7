//! The cost the agent adds to each `connect()`: loopback TCP connects from
//! this process in a cgroup of its own, first with nothing attached, then
//! with the agent's program attached (a deny entry present, events read and
//! discarded). The port has no listener, so each connect is refused at once
//! by the loopback stack: what is measured is the system call and the hook,
//! not a handshake or an accept queue. Needs root and cgroup v2 at
//! /sys/fs/cgroup/unified.
//!
//! Run: `cargo bench -p custody-agent --bench connect`.

// A benchmark fixture that fails should stop loudly.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use custody_agent::deny::{DenyEntry, KernelPolicy};
use custody_agent::guard::ConnectGuard;

const ROOT: &str = "/sys/fs/cgroup/unified";

fn bench(c: &mut Criterion) {
    let cgroup = Path::new(ROOT).join(format!("custody-bench-{}", std::process::id()));
    std::fs::create_dir(&cgroup).unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string()).unwrap();

    // A port nobody listens on.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    let mut group = c.benchmark_group("connect");
    group.bench_function("loopback_without_agent", |b| {
        b.iter(|| black_box(TcpStream::connect(addr).unwrap_err()))
    });

    let mut guard = ConnectGuard::attach(&cgroup).unwrap();
    let policy = KernelPolicy {
        version: 1,
        entries: vec![DenyEntry {
            addr: "192.0.2.0".parse().unwrap(),
            prefix: 24,
            port: 443,
            rule_id: 1,
        }],
        ..KernelPolicy::default()
    };
    guard.apply(&policy).unwrap();
    let mut ring = guard.take_events().unwrap();
    group.bench_function("loopback_with_agent", |b| {
        b.iter(|| {
            let refused = TcpStream::connect(addr).unwrap_err();
            while ring.next().is_some() {}
            black_box(refused)
        })
    });
    // The in-kernel share alone: the ring is drained between batches, outside
    // the measured time.
    group.bench_function("loopback_with_agent_kernel_only", |b| {
        b.iter_batched(
            || while ring.next().is_some() {},
            |()| black_box(TcpStream::connect(addr).unwrap_err()),
            BatchSize::SmallInput,
        )
    });
    group.finish();

    drop(ring);
    drop(guard);
    std::fs::write(
        Path::new(ROOT).join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap();
    std::fs::remove_dir(&cgroup).unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
