//! The real `custody` binary against the real `custody-control` binary:
//! investigations, policy and containment, output and exit codes. Also the
//! investigation API's stream and metrics.

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

#[path = "support/server.rs"]
mod support;

use std::io::BufRead as _;
use std::process::Command;

use custody_context::api::v1;
use support::*;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn custody(server: &str, token: Option<&str>, args: &[&str]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_custody"));
    cmd.arg("--server")
        .arg(server)
        .args(args)
        .env_remove("CUSTODY_TOKEN");
    if let Some(t) = token {
        cmd.env("CUSTODY_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    Out {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn ok(server: &str, args: &[&str]) -> String {
    let out = custody(server, Some(ADMIN), args);
    assert_eq!(out.code, 0, "custody {args:?}: {}", out.stderr);
    out.stdout
}

struct Scenario {
    alice: String,
    bob: String,
    stitched: String,
}

/// Alice's chain reads SSNs through the orders database user and tries the
/// partner API (blocked); one of its calls lost context and is joined by time
/// containment. Bob's chain is plain.
async fn ingest_scenario(grpc: std::net::SocketAddr) -> Scenario {
    let now = custody_control::unix_nanos() - 60_000_000_000;
    let mut alice = chain(101, "alice", 5, now);
    alice[2].data = vec![v1::DataTouch {
        class: "pii.ssn".into(),
        count: 2,
        confidence: 1.0,
    }];
    alice[2].database = Some(v1::DatabaseAccess {
        system: "postgresql".into(),
        database: "shop".into(),
        user: "orders_rw".into(),
        statement_kind: "select".into(),
        ..Default::default()
    });
    alice[2].key_id = "wl-kid-1".into();
    alice[3].egress = Some(v1::EgressDecision {
        destination: Some(v1::Destination {
            host: "api.partner.example".into(),
            ip: String::new(),
            port: 443,
        }),
        verdict: v1::Verdict::Block as i32,
        policy: "partner-data".into(),
        rule: "no-ssn".into(),
    });
    let mut bob = chain(202, "bob", 3, now + 10_000_000_000);
    for h in &mut bob {
        h.initiator.as_mut().unwrap().subject = "bob@example.com".into();
    }
    // An outbound call from web that carried no context, during Alice's request.
    let lost = v1::HopEvent {
        schema_version: 1,
        event_id: "lost-0".into(),
        chain_id: "cccccccccccccccccccccccccccccccc".into(),
        span_id: "cccccccccccccccc".into(),
        workload: Some(workload("web")),
        direction: v1::Direction::Outbound as i32,
        operation: "GET /search".into(),
        attribution: Some(v1::Attribution {
            method: v1::AttributionMethod::PeerOnly as i32,
            confidence: 0.0,
        }),
        context_outcome: v1::ContextOutcome::Missing as i32,
        start_unix_nanos: now + 100,
        duration_nanos: 50,
        ..Default::default()
    };
    let mut invalid = bob[0].clone();
    invalid.event_id = "bad".into();
    invalid.chain_id = "not-hex".into();
    let mut client = ingest(grpc, Some(NODE)).await;
    let mut hops = alice.clone();
    hops.push(lost.clone());
    hops.extend(bob.clone());
    hops.push(invalid);
    hops.reverse();
    let ack = client
        .report_hops(v1::HopBatch { hops })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.accepted, ack.duplicates, ack.rejected), (9, 0, 1));
    Scenario {
        alice: alice[0].chain_id.clone(),
        bob: bob[0].chain_id.clone(),
        stitched: lost.chain_id,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_investigates_and_contains() {
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::start(dir.path());
    let base = server.base();
    let s = ingest_scenario(server.grpc).await;
    eventually("both chains assembled", || {
        let base = base.clone();
        async move {
            let v = get_json(&base, "/v1/chains").await.ok()?;
            (v["chains"].as_array()?.len() == 2).then_some(())
        }
    })
    .await;
    let b = base.clone();
    tokio::task::spawn_blocking(move || run_cli(&b, &s))
        .await
        .unwrap();
}

fn run_cli(base: &str, s: &Scenario) {
    // chains: a table, newest first, with filters.
    let out = ok(base, &["chains"]);
    assert!(out.starts_with("CHAIN"), "{out}");
    let bob_at = out.find(&s.bob).unwrap();
    let alice_at = out.find(&s.alice).unwrap();
    assert!(bob_at < alice_at, "newest first:\n{out}");
    assert!(
        out.contains("stitched") && out.contains("propagated"),
        "{out}"
    );
    assert!(
        !out.contains(&s.stitched),
        "joined chains are not listed on their own"
    );
    let only = |args: &[&str]| -> Vec<String> {
        let mut full = vec!["chains", "--output", "json"];
        full.extend_from_slice(args);
        let v: serde_json::Value = serde_json::from_str(&ok(base, &full)).unwrap();
        v["chains"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["chain_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        only(&["--initiator", "alice@example.com"]),
        vec![s.alice.clone()]
    );
    assert_eq!(
        only(&["--initiator", "spiffe://td/ns/shop/sa/agent"]).len(),
        2
    );
    assert_eq!(only(&["--data-class", "pii.ssn"]), vec![s.alice.clone()]);
    assert_eq!(
        only(&["--destination", "api.partner.example"]),
        vec![s.alice.clone()]
    );
    assert_eq!(only(&["--verdict", "block"]), vec![s.alice.clone()]);
    assert_eq!(only(&["--coverage", "stitched"]), vec![s.alice.clone()]);
    assert_eq!(only(&["--coverage", "propagated"]), vec![s.bob.clone()]);
    assert_eq!(
        only(&["--service", "spiffe://td/ns/shop/sa/ledger"]),
        vec![s.alice.clone()]
    );
    assert_eq!(
        only(&["--since", "30m", "--limit", "1"]),
        vec![s.bob.clone()]
    );
    assert!(only(&["--until", "2h"]).is_empty());

    // chain: who, through what, which identity, touching what, going where, how sure.
    let tree = ok(base, &["chain", &s.alice]);
    for want in [
        "coverage stitched",
        "initiator alice@example.com (human) acting through spiffe://td/ns/shop/sa/agent",
        "* shop/web <- GET /web",
        "  └─ shop/orders -> GET /orders",
        "as postgresql/shop user orders_rw: select",
        "touches pii.ssnx2",
        "to api.partner.example:443 BLOCK by partner-data/no-ssn",
        "(time_containment, confidence 0.90)",
        "key wl-kid-1",
        "joined by evidence: cccccccccccccccccccccccccccccccc",
    ] {
        assert!(tree.contains(want), "missing {want:?} in\n{tree}");
    }
    // A joined chain's id leads to the chain it was joined into.
    assert!(ok(base, &["chain", &s.stitched]).contains(&format!("chain {}", s.alice)));
    let json: serde_json::Value =
        serde_json::from_str(&ok(base, &["chain", &s.alice, "-o", "json"])).unwrap();
    assert_eq!(json["hops"].as_array().unwrap().len(), 6);
    let missing = custody(
        base,
        Some(ADMIN),
        &["chain", "0123456789abcdef0123456789abcdef"],
    );
    assert_eq!(missing.code, 3, "{}", missing.stderr);

    // blast radius of a principal and of a credential.
    let radius = ok(base, &["blast-radius", "alice@example.com"]);
    assert!(radius.contains("1 chains"), "{radius}");
    assert!(
        radius.contains("pii.ssn (2)") && radius.contains("api.partner.example:443 block"),
        "{radius}"
    );
    assert!(radius.contains("shop/ledger"), "{radius}");
    let radius = ok(
        base,
        &["blast-radius", "--credential", "postgresql/shop/orders_rw"],
    );
    assert!(radius.contains(&s.alice), "{radius}");
    let both = ok(
        base,
        &["blast-radius", "spiffe://td/ns/shop/sa/agent", "-o", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&both).unwrap();
    assert_eq!(v["chains"].as_array().unwrap().len(), 2);

    // policy: apply, refuse with the field, list, delete.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("p.yaml");
    std::fs::write(
        &good,
        "apiVersion: custody.dev/v1\nkind: EgressPolicy\nmetadata: { name: partner-data }\nspec:\n  rules:\n    - { name: no-ssn, destination: { hosts: [api.partner.example] }, chain: { taintAny: [pii.ssn] }, verdict: block }\n",
    )
    .unwrap();
    assert_eq!(
        ok(base, &["policy", "apply", "-f", good.to_str().unwrap()]),
        "applied policy partner-data (version 1)\n"
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&good)
            .unwrap()
            .replace("pii.ssn", "PII SSN"),
    )
    .unwrap();
    let out = custody(
        base,
        Some(ADMIN),
        &["policy", "apply", "-f", bad.to_str().unwrap()],
    );
    assert_eq!(out.code, 4);
    assert!(
        out.stderr.contains("spec.rules[0].chain.taintAny[0]"),
        "{}",
        out.stderr
    );
    let list = ok(base, &["policy", "list"]);
    assert!(
        list.contains("policy partner-data")
            && list.contains("rule no-ssn: block api.partner.example when tainted by pii.ssn"),
        "{list}"
    );

    // contain: block, revoke, quarantine; each a new version.
    assert!(
        ok(
            base,
            &[
                "contain",
                "block",
                "*.paste.example",
                "--taint-any",
                "pii.ssn",
                "--initiator-kind",
                "agent"
            ]
        )
        .contains("contain-any.paste.example (version 2)")
    );
    assert_eq!(
        ok(
            base,
            &["contain", "revoke", "--principal", "mallory@example.com"]
        ),
        "revoked mallory@example.com (version 3)\n"
    );
    assert_eq!(
        ok(base, &["contain", "quarantine", &s.alice]),
        format!("quarantined chain {} (version 4)\n", s.alice)
    );
    let list = ok(base, &["policy", "list"]);
    assert!(
        list.contains("revoked principal mallory@example.com"),
        "{list}"
    );
    assert!(
        list.contains(&format!("revoked quarantined chain {}", s.alice)),
        "{list}"
    );
    assert!(
        list.contains("rule block: block *.paste.example when tainted by pii.ssn for agent"),
        "{list}"
    );
    assert_eq!(
        ok(base, &["policy", "delete", "partner-data"]),
        "deleted policy partner-data (version 5)\n"
    );
    assert_eq!(
        custody(base, Some(ADMIN), &["policy", "delete", "partner-data"]).code,
        3
    );
    let audit = ok(base, &["audit"]);
    assert!(
        audit.starts_with("#5 v5 oncall policy.delete partner-data"),
        "{audit}"
    );

    // Exit codes: refused, usage, unreachable.
    let out = custody(base, None, &["chains"]);
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(out.stderr.contains("401"), "{}", out.stderr);
    assert_eq!(custody(base, Some(NODE), &["chains"]).code, 4);
    assert_eq!(
        custody(base, Some(ADMIN), &["chains", "--coverage", "most"]).code,
        2
    );
    assert_eq!(custody(base, Some(ADMIN), &["frobnicate"]).code, 2);
    assert_eq!(custody(base, Some(ADMIN), &["contain", "revoke"]).code, 2);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    assert_eq!(custody(&dead, Some(ADMIN), &["chains"]).code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_chains_stream_and_metrics_count_coverage() {
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::start(dir.path());
    let base = server.base();
    // Follow new chains of bob only.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let b = base.clone();
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        let resp = agent
            .get(format!("{b}/v1/chains/stream"))
            .query("initiator", "bob@example.com")
            .header("authorization", format!("Bearer {ADMIN}"))
            .call()
            .unwrap();
        let _ = ready_tx.send(());
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if let Some(data) = line.strip_prefix("data: ")
                && tx.send(data.to_owned()).is_err()
            {
                break;
            }
        }
    });
    ready_rx.await.unwrap();
    let s = ingest_scenario(server.grpc).await;
    let got =
        tokio::task::spawn_blocking(move || rx.recv_timeout(std::time::Duration::from_secs(60)))
            .await
            .unwrap()
            .expect("a streamed chain");
    let summary: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(summary["chain_id"], s.bob.as_str());

    let metrics = eventually("metrics", || {
        let base = base.clone();
        async move {
            let text = tokio::task::spawn_blocking(move || {
                custody_control::client::Client::new(&base, None).get("/metrics", &[])
            })
            .await
            .ok()?
            .ok()?;
            let text = text.as_str()?.to_owned();
            text.contains("custody_chains_total{coverage=\"stitched\"} 1")
                .then_some(text)
        }
    })
    .await;
    for want in [
        "custody_chains_total{coverage=\"propagated\"} 1",
        "custody_hops_total{attribution=\"propagated\"} 8",
        "custody_hops_total{attribution=\"peer_only\"} 1",
        "custody_ingest_hops_total 9",
        "custody_ingest_rejected_total{reason=\"chain_id_bad_id\"} 1",
        "custody_store_bytes ",
        // Every chain assembled: nothing waits.
        "custody_assembly_pending_chains 0",
        "custody_assembly_wait_seconds 0.0",
        "custody_assembly_pass_seconds_count{stage=\"assemble\"}",
        "custody_assembly_pass_seconds_count{stage=\"store\"}",
    ] {
        assert!(metrics.contains(want), "missing {want:?} in\n{metrics}");
    }
}

/// How each hop was secured (fields 27–30 of the hop event) goes from
/// ingest to `GET /v1/chains/{id}` and to `custody chain`, human and JSON;
/// a failed TLS check and a token that disagrees with the mTLS peer are
/// warned about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_hops_show_their_transport_and_its_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::start(dir.path());
    let base = server.base();
    let now = custody_control::unix_nanos() - 60_000_000_000;
    // web <- client, orders -> payments, payments <- orders, ledger ->
    // (failed TLS), search (the sidecar said nothing about transport).
    let mut hops = chain(303, "tls", 5, now);
    let payments = "spiffe://td/ns/shop/sa/payments";
    let orders = "spiffe://td/ns/shop/sa/orders";
    hops[0].transport_security = v1::TransportSecurity::Plaintext as i32;
    hops[1].transport_security = v1::TransportSecurity::MeshMtls as i32;
    hops[1].peer_identity = payments.into();
    hops[2].transport_security = v1::TransportSecurity::MeshMtls as i32;
    hops[2].peer_identity = orders.into();
    hops[2].identity_mismatch = "token_workload_mismatch".into();
    hops[3].transport_security = v1::TransportSecurity::MeshMtls as i32;
    hops[3].transport_error = "peer_identity_mismatch".into();
    let id = hops[0].chain_id.clone();
    let ack = ingest(server.grpc, Some(NODE))
        .await
        .report_hops(v1::HopBatch { hops })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.accepted, ack.rejected), (5, 0));

    let path = format!("/v1/chains/{id}");
    let tree = eventually("the chain assembled", || {
        let (base, path) = (base.clone(), path.clone());
        async move {
            let tree = get_json(&base, &path).await.ok()?;
            (tree["hops"].as_array()?.len() == 5).then_some(tree)
        }
    })
    .await;
    let transport = |tree: &serde_json::Value, event: &str| {
        let hop = tree["hops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["event_id"] == event)
            .unwrap_or_else(|| panic!("no {event} in {tree:#}"))
            .clone();
        [
            "transport_security",
            "peer_identity",
            "transport_error",
            "identity_mismatch",
        ]
        .map(|field| hop.get(field).and_then(|v| v.as_str()).map(str::to_owned))
    };
    let s = |v: &str| Some(v.to_owned());
    let expected = [
        ("tls-0", [s("plaintext"), None, None, None]),
        ("tls-1", [s("mesh_mtls"), s(payments), None, None]),
        (
            "tls-2",
            [
                s("mesh_mtls"),
                s(orders),
                None,
                s("token_workload_mismatch"),
            ],
        ),
        (
            "tls-3",
            [s("mesh_mtls"), None, s("peer_identity_mismatch"), None],
        ),
        ("tls-4", [None, None, None, None]),
    ];
    for (event, want) in &expected {
        assert_eq!(&transport(&tree, event), want, "{event}: {tree:#}");
    }

    let b = base.clone();
    let (human, json) = tokio::task::spawn_blocking(move || {
        (
            ok(&b, &["chain", &id]),
            ok(&b, &["chain", &id, "--output", "json"]),
        )
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    for (event, want) in &expected {
        assert_eq!(&transport(&json, event), want, "{event}: {json:#}");
    }
    let line = |needle: &str| {
        human
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in\n{human}"))
    };
    assert!(
        human
            .lines()
            .nth(line("shop/web <-"))
            .unwrap()
            .ends_with("  plaintext"),
        "{human}"
    );
    assert!(
        human
            .lines()
            .nth(line("shop/orders ->"))
            .unwrap()
            .ends_with(&format!("  mTLS to {payments}")),
        "{human}"
    );
    let mismatch = line("WARNING identity mismatch: token_workload_mismatch");
    assert_eq!(mismatch, line("shop/payments <-") + 1, "{human}");
    assert!(
        human
            .lines()
            .nth(mismatch - 1)
            .unwrap()
            .ends_with(&format!("  mTLS from {orders}"))
    );
    let failed = line("WARNING transport error: peer_identity_mismatch");
    assert_eq!(failed, line("shop/ledger ->") + 1, "{human}");
    assert!(
        human.contains("WARNING: 2 hop(s) with a transport error or an identity mismatch"),
        "{human}"
    );
}

/// Waits up to a minute for `child` to exit by itself; kills it and fails
/// otherwise.
fn exits(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `custody chains --follow`: the chains matching its filters as they are
/// assembled, as JSON lines or as table rows, until `--limit` of them;
/// refused without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_follows_new_chains() {
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::start(dir.path());
    let base = server.base();
    let refused = custody(&base, None, &["chains", "--follow"]);
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    let zero = custody(&base, Some(ADMIN), &["chains", "-f", "--limit", "0"]);
    assert_eq!(zero.code, 2, "{}", zero.stderr);

    let follow = |args: &[&str]| -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_custody"))
            .arg("--server")
            .arg(&base)
            .args(args)
            .env("CUSTODY_TOKEN", ADMIN)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut bob = follow(&[
        "chains",
        "-f",
        "--initiator",
        "bob@example.com",
        "--limit",
        "1",
        "-o",
        "json",
    ]);
    let mut ssn = follow(&[
        "chains",
        "--follow",
        "--data-class",
        "pii.ssn",
        "--limit",
        "1",
    ]);
    // Each says so on stderr once it follows: from then on no chain is missed.
    let mut stderrs = Vec::new();
    for child in [&mut bob, &mut ssn] {
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "custody: following new chains (Ctrl-C to stop)"
        );
        stderrs.push(stderr);
    }
    let s = ingest_scenario(server.grpc).await;
    let (bob_out, ssn_out) = tokio::task::spawn_blocking(move || {
        let read = |child: &mut std::process::Child, what: &str| {
            assert!(exits(child, what).success(), "{what} failed");
            std::io::read_to_string(child.stdout.take().unwrap()).unwrap()
        };
        (
            read(&mut bob, "follow bob"),
            read(&mut ssn, "follow pii.ssn"),
        )
    })
    .await
    .unwrap();
    // JSON: one object per line, bob's chain only.
    let lines: Vec<&str> = bob_out.lines().collect();
    assert_eq!(lines.len(), 1, "{bob_out}");
    let summary: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(summary["chain_id"], s.bob.as_str());
    // Table: the header, then the one chain that touched SSNs (Alice's).
    let rows: Vec<&str> = ssn_out.lines().collect();
    assert_eq!(rows.len(), 2, "{ssn_out}");
    assert!(rows[0].starts_with("CHAIN"), "{ssn_out}");
    assert!(rows[1].starts_with(&s.alice), "{ssn_out}");
    assert!(!ssn_out.contains(&s.bob), "{ssn_out}");
}
