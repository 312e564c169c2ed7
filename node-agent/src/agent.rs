//! The agent's run loop: attach, keep the kernel's deny entries in step with
//! the policy file, and turn connect events into flow records.

use std::io::Write;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use custody_context::policy::PolicyBundle;
use tokio::io::unix::AsyncFd;

use crate::config::Config;
use crate::deny::{self, KernelPolicy};
use crate::event::ConnectEvent;
use crate::flow::{self, NodeContext};
use crate::guard::ConnectGuard;

/// Reads a policy bundle file (JSON or YAML).
pub fn read_bundle(path: &std::path::Path) -> anyhow::Result<PolicyBundle> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading policy file {}", path.display()))?;
    let bundle: PolicyBundle = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).context("policy file is not a policy bundle")?
    } else {
        serde_norway::from_str(&text).context("policy file is not a policy bundle")?
    };
    bundle
        .validate()
        .map_err(|e| anyhow::anyhow!("policy file: {e}"))?;
    Ok(bundle)
}

fn resolve(host: &str) -> Vec<IpAddr> {
    (host, 0)
        .to_socket_addrs()
        .map(|addrs| addrs.map(|a| a.ip()).collect())
        .unwrap_or_default()
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut guard = ConnectGuard::attach(&config.cgroup)
        .with_context(|| format!("attaching to {}", config.cgroup.display()))?;
    let ring = guard.take_events().context("event ring buffer")?;
    let guard = Arc::new(Mutex::new(guard));
    let policy = Arc::new(Mutex::new(KernelPolicy::default()));

    if let Some(path) = config.policy_file.clone() {
        apply_file(&path, &guard, &policy).await;
        let (guard, policy) = (Arc::clone(&guard), Arc::clone(&policy));
        let every = Duration::from_millis(config.policy_poll_ms);
        tokio::spawn(async move {
            let mut seen = modified(&path);
            loop {
                tokio::time::sleep(every).await;
                let now = modified(&path);
                if now != seen {
                    seen = now;
                    apply_file(&path, &guard, &policy).await;
                }
            }
        });
    }

    let node = NodeContext {
        node: config.node.clone(),
        sidecar_uids: config.sidecar_uids.clone(),
        proc_root: PathBuf::from("/proc"),
    };
    let mut out: Box<dyn Write + Send> = match &config.flows_file {
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening flows file {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    tracing::info!(cgroup = %config.cgroup.display(), node = %config.node, "attached");

    let mut ring = register(ring).context("polling the ring buffer")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sequence = 0u64;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            ready = ring.readable_mut() => {
                let mut ready = ready?;
                let kernel_policy = policy.lock().map(|p| p.clone()).unwrap_or_default();
                let buffer = ready.get_inner_mut();
                while let Some(record) = buffer.next() {
                    match ConnectEvent::parse(&record) {
                        Ok(event) => {
                            sequence += 1;
                            let flow = flow::flow_event(&node, &kernel_policy, &event, unix_nanos(), sequence);
                            // One write per record, so a reader never sees half a line.
                            let mut line = flow_json(&flow).to_string().into_bytes();
                            line.push(b'\n');
                            out.write_all(&line)?;
                        }
                        Err(error) => tracing::warn!(%error, "undecodable connect event"),
                    }
                }
                out.flush()?;
                ready.clear_ready();
            }
        }
    }
    let dropped = guard.lock().map(|g| g.dropped_events()).unwrap_or(0);
    tracing::info!(dropped_events = dropped, "stopping");
    Ok(())
}

/// Registers the ring buffer with tokio's reactor.
#[allow(unsafe_code)]
fn register(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
) -> std::io::Result<AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>> {
    // SAFETY: the `AsyncFd` takes ownership of the ring buffer, which owns its
    // file descriptor and returns the same one from every `as_raw_fd` call;
    // nothing else can close it while it is registered.
    unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)
}

async fn apply_file(
    path: &std::path::Path,
    guard: &Arc<Mutex<ConnectGuard>>,
    policy: &Arc<Mutex<KernelPolicy>>,
) {
    let bundle = match read_bundle(path) {
        Ok(bundle) => bundle,
        Err(error) => {
            // Keep enforcing the last good policy.
            tracing::warn!(error = %format!("{error:#}"), "policy not applied");
            return;
        }
    };
    let compiled = match tokio::task::spawn_blocking(move || deny::compile(&bundle, &resolve)).await
    {
        Ok(compiled) => compiled,
        Err(error) => {
            tracing::warn!(%error, "policy compilation failed");
            return;
        }
    };
    let applied = guard.lock().map_err(|_| ()).and_then(|mut g| {
        g.apply(&compiled).map_err(|e| {
            tracing::warn!(error = %e, "policy not applied to the kernel");
        })
    });
    if let Ok(entries) = applied {
        for host in &compiled.unenforceable_hosts {
            tracing::warn!(host = %host, "host not enforceable in the kernel (left to sidecars)");
        }
        tracing::info!(version = compiled.version, entries, "policy applied");
        if let Ok(mut slot) = policy.lock() {
            *slot = compiled;
        }
    }
}

/// The JSON form of a flow record (the field names of `custody.v1.FlowEvent`).
pub fn flow_json(flow: &custody_context::api::v1::FlowEvent) -> serde_json::Value {
    let conn = flow.connection.clone().unwrap_or_default();
    let verdict = custody_context::api::v1::Verdict::try_from(flow.verdict)
        .ok()
        .and_then(|v| v.to_domain())
        .map_or("unspecified", |v| v.as_str());
    serde_json::json!({
        "schema_version": flow.schema_version,
        "event_id": flow.event_id,
        "node": flow.node,
        "pid": flow.pid,
        "executable": flow.executable,
        "lineage": flow.lineage,
        "dst_ip": conn.dst_ip,
        "dst_port": conn.dst_port,
        "transport": conn.transport,
        "via_sidecar": flow.via_sidecar,
        "verdict": verdict,
        "policy": flow.policy,
        "unix_nanos": flow.unix_nanos,
    })
}
