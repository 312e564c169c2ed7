//! `custody-demo`: the reference topology with live traffic, on this machine.
//!
//! Builds the mesh (network namespaces, sidecars, the control plane on its
//! embedded store), drives a mix of traffic for a few seconds — propagated
//! chains, a legacy service that drops headers, a live egress block applied
//! with the CLI — prints assembled chains and the coverage figures, then keeps
//! the control plane running for exploration until interrupted (Ctrl-C tears
//! everything down). `--once` stops after printing instead of waiting.

// The demo talks to its user on stdout.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::Context as _;
use custody_e2e::topology::{ADMIN_TOKEN, HTTP_PORT, Topology, binary};

const BLOCK_PASTE: &str = "apiVersion: custody.dev/v1
kind: EgressPolicy
metadata: { name: contain-paste }
spec:
  rules:
    - name: no-paste-sites
      destination: { hosts: [\"paste.risky.example\"] }
      verdict: block
";

fn main() -> anyhow::Result<()> {
    println!("building the mesh: control plane, web, orders, reports, two third parties ...");
    let started = Instant::now();
    let topo = Topology::start("demo")?;
    println!("mesh up in {:.1}s", started.elapsed().as_secs_f64());

    println!("\ntraffic:");
    for (path, user) in [
        ("/checkout", "alice@example.com"),
        ("/checkout", "bob@example.com"),
        ("/report", "carol@example.com"),
        ("/export", "alice@example.com"),
    ] {
        let (status, _) = topo.request(path, user)?;
        println!("  {user:<20} GET web{path:<10} -> {status}");
    }

    let policy = topo.mesh.dir().join("contain-paste.yaml");
    std::fs::write(&policy, BLOCK_PASTE)?;
    let applied = Instant::now();
    let out = topo.custody(&["policy", "apply", "-f", policy.to_str().context("path")?])?;
    anyhow::ensure!(
        out.status.success(),
        "policy apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused_after = loop {
        let (status, _) = topo.request("/export", "alice@example.com")?;
        if status == 403 {
            break applied.elapsed();
        }
        anyhow::ensure!(
            applied.elapsed() < Duration::from_secs(10),
            "the block did not hold"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "  custody policy apply -f contain-paste.yaml: first refusal {:.0} ms after the CLI call",
        refused_after.as_secs_f64() * 1000.0
    );

    std::thread::sleep(Duration::from_millis(800));
    println!("\nassembled chains (custody chains):");
    let out = topo.custody(&["chains"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let listed = topo.custody_json(&["chains", "--initiator", "carol@example.com"])?;
    let chain_id = listed
        .get("chains")
        .cloned()
        .unwrap_or(listed)
        .as_array()
        .and_then(|c| c.first().cloned())
        .and_then(|c| {
            c.get("chain_id")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        });
    if let Some(id) = chain_id {
        println!("\none chain in full (custody chain {id}):");
        let out = topo.custody(&["chain", &id])?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }

    let control = topo.pod("control")?;
    let metrics = topo.mesh.exec(
        &control,
        &[
            "curl",
            "-s",
            &format!("http://127.0.0.1:{HTTP_PORT}/metrics"),
        ],
    )?;
    println!("\ncoverage (/metrics):");
    for line in String::from_utf8_lossy(&metrics.stdout).lines() {
        if line.starts_with("custody_chains_total") || line.starts_with("custody_hops_total") {
            println!("  {line}");
        }
    }

    let cli = binary("custody")?;
    let wrapper = topo.mesh.dir().join("custody");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {ns} {cli} --server http://127.0.0.1:{HTTP_PORT} --token {ADMIN_TOKEN} \"$@\"\n",
            ns = control.ns,
            cli = cli.display()
        ),
    )?;
    custody_e2e::cmd::run(&["chmod", "755", wrapper.to_str().context("path")?])?;
    println!(
        "\nthe control plane keeps running; in another shell:\n  \
         export PATH={dir}:$PATH\n  custody chains\n  custody chain <id>\n  custody blast-radius alice@example.com\n  \
         ip netns exec {ns} curl -s http://127.0.0.1:{HTTP_PORT}/metrics\n\nCtrl-C stops and removes everything.",
        dir = topo.mesh.dir().display(),
        ns = control.ns
    );
    if std::env::args().any(|a| a == "--once") {
        println!("(--once: stopping now)");
    } else {
        wait_for_interrupt();
    }
    println!("\ntearing down ...");
    drop(topo);
    Ok(())
}

fn wait_for_interrupt() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    if let Ok(runtime) = runtime {
        runtime.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        });
    }
}
