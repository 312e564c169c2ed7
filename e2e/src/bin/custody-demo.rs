//! `custody-demo`: the reference topology with live traffic, on this machine.
//!
//! Builds the mesh (network namespaces, sidecars, PostgreSQL and MariaDB in
//! pods of their own, the control plane on its embedded store), drives a mix
//! of traffic for a few seconds — propagated chains, a legacy service that
//! drops headers, services reading customers from the databases, an AI agent
//! delegating to a sub-agent, a background job with no user behind it, a
//! live egress block applied with the CLI, and a
//! data-aware block (no partner calls from chains that read SSNs) — prints
//! assembled chains with the data classes they touched and the coverage
//! figures, then keeps the control plane running for exploration until
//! interrupted (Ctrl-C tears everything down). `--once` stops after printing
//! instead of waiting.

// The demo talks to its user on stdout.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::Context as _;
use custody_e2e::topology::{
    ADMIN_TOKEN, ASSISTANT_AGENT, HTTP_PORT, ISSUER, JOB, TRUST_DOMAIN, Topology, binary,
};

const BLOCK_PASTE: &str = "apiVersion: custody.dev/v1
kind: EgressPolicy
metadata: { name: contain-paste }
spec:
  rules:
    - name: no-paste-sites
      destination: { hosts: [\"paste.risky.example\"] }
      verdict: block
";

const NO_SSN_TO_PARTNERS: &str = "apiVersion: custody.dev/v1
kind: EgressPolicy
metadata: { name: no-ssn-to-partners }
spec:
  rules:
    - name: partner-ssn
      destination: { hosts: [\"api.partner.example\"] }
      chain: { taintAny: [pii.ssn] }
      verdict: block
";

/// Applies a policy file with the CLI and waits until `path` is refused for
/// `user`; returns how long after the CLI call the first refusal came.
fn apply_and_wait(
    topo: &Topology,
    file: &str,
    policy: &str,
    path: &str,
    user: &str,
) -> anyhow::Result<Duration> {
    let file = topo.mesh.dir().join(file);
    std::fs::write(&file, policy)?;
    let applied = Instant::now();
    let out = topo.custody(&["policy", "apply", "-f", file.to_str().context("path")?])?;
    anyhow::ensure!(
        out.status.success(),
        "policy apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    loop {
        let (status, _) = topo.request(path, user)?;
        if status == 403 {
            return Ok(applied.elapsed());
        }
        anyhow::ensure!(
            applied.elapsed() < Duration::from_secs(10),
            "the block did not hold"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The id of the newest chain `custody chains <filter>` lists.
fn newest_chain(topo: &Topology, filter: &[&str]) -> anyhow::Result<Option<String>> {
    let mut args = vec!["chains"];
    args.extend_from_slice(filter);
    let listed = topo.custody_json(&args)?;
    Ok(listed
        .get("chains")
        .cloned()
        .unwrap_or(listed)
        .as_array()
        .and_then(|c| c.first().cloned())
        .and_then(|c| {
            c.get("chain_id")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        }))
}

fn main() -> anyhow::Result<()> {
    println!(
        "building the mesh: control plane, web, orders, reports, PostgreSQL, MariaDB, two AI agents, a background job, two third parties ..."
    );
    let started = Instant::now();
    let topo = Topology::start("demo")?;
    println!("mesh up in {:.1}s", started.elapsed().as_secs_f64());

    println!("\ntraffic (users sign in with a JWT from {ISSUER}):");
    for (path, user) in [
        ("/checkout", "alice@example.com"),
        ("/checkout", "bob@example.com"),
        ("/report", "carol@example.com"),
        ("/export", "alice@example.com"),
        ("/order", "bob@example.com"),
        ("/ssn-check", "erin@example.com"),
    ] {
        let (status, _) = topo.request(path, user)?;
        println!("  {user:<20} GET web{path:<11} -> {status}");
    }
    let (status, _) = topo.mcp_request("alice@example.com", ASSISTANT_AGENT, "research")?;
    println!("  alice@example.com    MCP assistant tools/call research -> {status}");
    let (status, _) = topo.run_job()?;
    println!("  (no user)            job: nightly PlaceOrder on orders -> {status}");

    let refused_after = apply_and_wait(
        &topo,
        "contain-paste.yaml",
        BLOCK_PASTE,
        "/export",
        "alice@example.com",
    )?;
    println!(
        "  custody policy apply -f contain-paste.yaml: first refusal {:.0} ms after the CLI call",
        refused_after.as_secs_f64() * 1000.0
    );
    let refused_after = apply_and_wait(
        &topo,
        "no-ssn-to-partners.yaml",
        NO_SSN_TO_PARTNERS,
        "/ssn-check",
        "frank@example.com",
    )?;
    println!(
        "  custody policy apply -f no-ssn-to-partners.yaml: first refusal {:.0} ms after the CLI call",
        refused_after.as_secs_f64() * 1000.0
    );
    for (path, user) in [
        ("/ssn-check", "frank@example.com"),
        ("/order", "grace@example.com"),
    ] {
        let (status, _) = topo.request(path, user)?;
        println!("  {user:<20} GET web{path:<11} -> {status}");
    }

    std::thread::sleep(Duration::from_millis(800));
    let job = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{JOB}");
    println!("\nassembled chains (custody chains):");
    let out = topo.custody(&["chains"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    for (what, filter) in [
        (
            "a legacy service stitched",
            ["--initiator", "carol@example.com"],
        ),
        (
            "a database read on the way to the partner",
            ["--initiator", "bob@example.com"],
        ),
        (
            "an agent delegating to a sub-agent",
            ["--initiator", "researcher"],
        ),
        (
            "SSNs read, the partner call refused",
            ["--initiator", "frank@example.com"],
        ),
        ("background work, no user behind it", ["--initiator", &job]),
    ] {
        if let Some(id) = newest_chain(&topo, &filter)? {
            println!("\n{what} (custody chain {id}):");
            let out = topo.custody(&["chain", &id])?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
    }

    let control = topo.pod("control")?;
    let metrics = topo.control_metrics()?;
    println!("\ncoverage (/metrics):");
    for line in metrics.lines() {
        if line.starts_with("custody_chains_total") || line.starts_with("custody_hops_total") {
            println!("  {line}");
        }
    }
    println!(
        "\nsidecar authentication (each sidecar presents its own service-account token; hops are stored only for the workload it proves):"
    );
    let refusals: Vec<&str> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("custody_control_auth_refused_total")
                || line.starts_with("custody_ingest_rejected_total")
        })
        .collect();
    if refusals.is_empty() {
        println!("  no call refused, no hop rejected");
    }
    for line in refusals {
        println!("  {line}");
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
        wait_for_interrupt(&topo);
    }
    println!("\ntearing down ...");
    drop(topo);
    Ok(())
}

/// Runs until Ctrl-C or SIGTERM, writing the sidecars' service-account
/// tokens again before they expire (as the kubelet does).
fn wait_for_interrupt(topo: &Topology) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    if let Ok(runtime) = runtime {
        runtime.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let refresh = async {
                let every = Duration::from_secs(custody_e2e::topology::SA_TOKEN_REFRESH_SECS);
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(error) = topo.refresh_workload_tokens() {
                        println!("refreshing the sidecars' service-account tokens: {error:#}");
                    }
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                () = refresh => {}
            }
        });
    }
}
