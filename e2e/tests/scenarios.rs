//! End-to-end scenarios on the reference topology: real sidecars in network
//! namespaces behind iptables redirects, real PostgreSQL and MariaDB servers
//! in pods of their own, the real control plane, the real CLI. Users reach
//! `web` with a JWT from the shop's login service (the harness is the
//! issuer). Each scenario asserts on the control plane's answers. Needs root.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use custody_e2e::topology::{
    ASSISTANT_AGENT, AUDIENCE, ISSUER, ISSUER_KID, JOB, MARIADB_DATABASE, MARIADB_USER,
    PG_DATABASE, PG_USER, PLACE_ORDER, RESEARCH_AGENT, RESEARCH_TOOL, Topology, sign_jwt,
};
use serde_json::Value;

/// One mesh at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

const WITHIN: Duration = Duration::from_secs(20);

fn strings(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn workload(name: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{name}")
}

fn destination<'a>(chain: &'a Value, host: &str) -> Option<&'a Value> {
    chain["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["host"] == host)
}

fn classes(chain: &Value) -> Vec<String> {
    chain["data_classes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["class"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn has_identity(chain: &Value, kind: &str, value: &str) -> bool {
    chain["identities"]
        .as_array()
        .is_some_and(|ids| ids.iter().any(|i| i["kind"] == kind && i["value"] == value))
}

/// The chains `custody chains <filter>` lists.
fn chains(topo: &Topology, filter: &[&str]) -> Vec<Value> {
    let mut args = vec!["chains"];
    args.extend_from_slice(filter);
    let listed = topo.custody_json(&args).expect("custody chains");
    let listed = listed.get("chains").cloned().unwrap_or(listed);
    listed.as_array().cloned().unwrap_or_default()
}

/// The index of the first hop of `tree` that satisfies `want`.
fn hop_index(tree: &Value, want: impl Fn(&Value) -> bool) -> Option<usize> {
    tree["hops"].as_array()?.iter().position(want)
}

#[test]
fn a_user_request_is_one_chain_across_services_and_the_database_to_the_partner() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::start("one").unwrap();
    // web -> orders over gRPC; orders reads customers from PostgreSQL, then
    // calls the partner.
    let (status, body) = topo.request("/order", "alice@example.com").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["calls"][0]["body"]["queries"][0]["rows"], 5,
        "{body:#}"
    );

    let pg_user = format!("postgresql/{PG_DATABASE}/{PG_USER}");
    let chain = topo
        .wait_chain(&["--initiator", "alice@example.com"], WITHIN, |c| {
            // Each sidecar reports on its own schedule: orders' own request
            // (an inbound operation, listed in tools) may come after its calls.
            destination(c, "api.partner.example").is_some()
                && has_identity(c, "database_user", &pg_user)
                && strings(c, "tools").iter().any(|t| t == PLACE_ORDER)
        })
        .unwrap();
    // The user came from the login service's JWT, verified at web's sidecar.
    assert_eq!(chain["initiator"]["subject"], "alice@example.com");
    assert_eq!(chain["initiator"]["kind"], "human");
    assert_eq!(chain["initiator"]["actors"], serde_json::json!([]));
    assert_eq!(chain["coverage"], "propagated", "{chain:#}");
    assert_eq!(
        strings(&chain, "services"),
        vec![workload("web"), workload("orders")],
        "{chain:#}"
    );
    for (kind, value) in [
        ("workload", workload("web")),
        ("workload", workload("orders")),
        ("database_user", pg_user.clone()),
        ("key_id", "web-1".to_owned()),
        ("key_id", "orders-1".to_owned()),
    ] {
        assert!(
            has_identity(&chain, kind, &value),
            "{kind} {value}: {chain:#}"
        );
    }
    let read = classes(&chain);
    assert!(read.iter().any(|c| c == "pii.email"), "{read:?}");
    assert!(!read.iter().any(|c| c == "pii.ssn"), "{read:?}");
    let partner = destination(&chain, "api.partner.example").unwrap();
    assert_eq!(partner["verdict"], "allow");

    // In order: web's request, orders' request, its query, then its call out.
    let id = chain["chain_id"].as_str().unwrap();
    let tree = topo.custody_json(&["chain", id]).unwrap();
    let inbound = |name: &str| {
        let name = workload(name);
        hop_index(&tree, move |h| {
            h["workload"] == name && h["direction"] == "inbound"
        })
    };
    let (web_in, orders_in) = (inbound("web").unwrap(), inbound("orders").unwrap());
    let query = hop_index(&tree, |h| h["database"]["system"] == "postgresql").unwrap();
    let call = hop_index(&tree, |h| h["egress"]["host"] == "api.partner.example").unwrap();
    assert!(
        web_in < orders_in && orders_in < query && query < call,
        "{tree:#}"
    );
    let hops = tree["hops"].as_array().unwrap();
    assert_eq!(hops[web_in]["context_outcome"], "minted", "{tree:#}");
    assert_eq!(hops[orders_in]["protocol"], "grpc", "{tree:#}");
    assert_eq!(hops[orders_in]["operation"], PLACE_ORDER);
    let (query, call) = (&hops[query], &hops[call]);
    assert_eq!(query["workload"], workload("orders"));
    assert_eq!(
        query["parent_event_id"], hops[orders_in]["event_id"],
        "{tree:#}"
    );
    assert_eq!(
        call["parent_event_id"], hops[orders_in]["event_id"],
        "{tree:#}"
    );
    // The statement carried the request's traceparent (sqlcommenter).
    assert_eq!(query["attribution"], "sql_comment", "{query:#}");
    let db = &query["database"];
    assert_eq!(db["user"], PG_USER);
    assert_eq!(db["database"], PG_DATABASE);
    assert_eq!(db["statement_kind"], "select");
    assert_eq!(db["tables_read"], serde_json::json!(["customers"]));
    assert!(
        query["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|c| c["class"] == "pii.email")),
        "{query:#}"
    );

    // Only a JWT the login service signed, for web, names a user at the
    // edge. A token signed by another key, one from another issuer, one for
    // another audience, and a bare `x-custody-user` header name nobody: each
    // request goes on, as a chain of the client's address, never mallory's.
    let exp = custody_context::unix_now() + 300;
    let claims = |iss: &str, aud: &str| serde_json::json!({"iss": iss, "aud": aud, "sub": "mallory@example.com", "exp": exp});
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let bearer = |jwt: String| format!("authorization: Bearer {jwt}");
    let untrusted = [
        bearer(sign_jwt(&stranger, ISSUER_KID, &claims(ISSUER, AUDIENCE))),
        bearer(topo.login_jwt(&claims("https://login.evil.example", AUDIENCE))),
        bearer(topo.login_jwt(&claims(ISSUER, "admin"))),
        "x-custody-user: mallory@example.com".to_owned(),
    ];
    for header in &untrusted {
        let (status, body) = topo.request_with("/checkout", header).unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let peer = format!("peer:{}", topo.pod("client").unwrap().ip);
    let deadline = Instant::now() + WITHIN;
    let anonymous = loop {
        let found: Vec<Value> = chains(&topo, &["--initiator", &peer])
            .into_iter()
            .filter(|c| destination(c, "api.partner.example").is_some())
            .collect();
        if found.len() == untrusted.len() {
            break found;
        }
        assert!(found.len() < untrusted.len(), "{found:#?}");
        assert!(
            Instant::now() < deadline,
            "{} of 4 chains: {found:#?}",
            found.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for chain in &anonymous {
        assert_eq!(chain["initiator"]["kind"], "service", "{chain:#}");
        let id = chain["chain_id"].as_str().unwrap();
        let tree = topo.custody_json(&["chain", id]).unwrap();
        let web_in = hop_index(&tree, |h| {
            h["workload"] == workload("web") && h["direction"] == "inbound"
        })
        .unwrap();
        assert_eq!(
            tree["hops"][web_in]["context_outcome"], "missing",
            "{tree:#}"
        );
    }
    assert!(
        chains(&topo, &["--initiator", "mallory@example.com"]).is_empty(),
        "an untrusted credential named a user"
    );
}

#[test]
fn a_legacy_service_that_drops_headers_is_stitched_with_its_confidence() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::start("two").unwrap();
    let (status, body) = topo.request("/report", "carol@example.com").unwrap();
    assert_eq!(status, 200, "{body}");

    // Each sidecar reports on its own schedule: wait for all three.
    let summary = topo
        .wait_chain(&["--initiator", "carol@example.com"], WITHIN, |c| {
            destination(c, "api.partner.example").is_some() && strings(c, "services").len() >= 3
        })
        .unwrap();
    let services = strings(&summary, "services");
    for name in ["web", "reports", "orders"] {
        assert!(
            services.contains(&workload(name)),
            "{name} missing: {services:?}"
        );
    }
    assert_eq!(summary["coverage"], "stitched", "{summary:#}");

    let id = summary["chain_id"].as_str().unwrap();
    let tree = topo.custody_json(&["chain", id]).unwrap();
    let hops = tree["hops"].as_array().unwrap();
    let stitched: Vec<&Value> = hops
        .iter()
        .filter(|h| h["attribution"] == "stitched")
        .collect();
    assert!(!stitched.is_empty(), "no stitched hop in {tree:#}");
    for hop in stitched {
        assert_eq!(hop["workload"], workload("reports"), "{hop:#}");
        assert_eq!(hop["join"]["evidence"], "sidecar_stitched", "{hop:#}");
        let confidence = hop["join"]["confidence"].as_f64().unwrap();
        assert!(confidence > 0.0 && confidence <= 1.0, "{hop:#}");
    }
}

#[test]
fn a_block_applied_with_the_cli_holds_on_the_next_request() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::start("four").unwrap();
    let (status, _) = topo.request("/export", "alice@example.com").unwrap();
    assert_eq!(status, 200);

    let policy = topo.mesh.dir().join("block.yaml");
    std::fs::write(
        &policy,
        "apiVersion: custody.dev/v1\nkind: EgressPolicy\nmetadata: { name: contain-paste }\nspec:\n  rules:\n    - name: no-paste\n      destination: { hosts: [paste.risky.example] }\n      verdict: block\n",
    )
    .unwrap();
    let applied = Instant::now();
    let out = topo
        .custody(&["policy", "apply", "-f", policy.to_str().unwrap()])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = loop {
        let (status, body) = topo.request("/export", "alice@example.com").unwrap();
        if status == 403 {
            break body;
        }
        assert!(applied.elapsed() < WITHIN, "the block never held");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "CLI call to first refusal: {:.0} ms",
        applied.elapsed().as_secs_f64() * 1000.0
    );
    let refusal = &body["calls"][0]["body"];
    assert_eq!(refusal["error"], "egress_blocked", "{body:#}");
    assert_eq!(refusal["policy"], "contain-paste");

    let chain = topo
        .wait_chain(&["--verdict", "block"], WITHIN, |c| {
            destination(c, "paste.risky.example").is_some_and(|d| d["verdict"] == "block")
        })
        .unwrap();
    assert_eq!(chain["initiator"]["subject"], "alice@example.com");
    assert_eq!(refusal["chain"], chain["chain_id"]);
    // Other destinations stay open.
    let (status, _) = topo.request("/checkout", "alice@example.com").unwrap();
    assert_eq!(status, 200);
}

#[test]
fn a_forged_token_is_refused_and_the_hop_stays_with_the_real_user() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::start("six").unwrap();
    // orders, compromised, sends a token naming mallory on its outbound call.
    let (status, body) = topo.request("/forge", "alice@example.com").unwrap();
    assert_eq!(status, 200, "{body}");

    let summary = topo
        .wait_chain(&["--initiator", "alice@example.com"], WITHIN, |c| {
            destination(c, "api.partner.example").is_some()
        })
        .unwrap();
    let id = summary["chain_id"].as_str().unwrap();
    let tree = topo.custody_json(&["chain", id]).unwrap();
    let hops = tree["hops"].as_array().unwrap();
    let refused: Vec<&Value> = hops
        .iter()
        .filter(|h| h["context_outcome"] == "refused")
        .collect();
    assert_eq!(refused.len(), 1, "one refused hop expected in {tree:#}");
    assert_eq!(refused[0]["workload"], workload("orders"));
    assert_eq!(refused[0]["direction"], "outbound");
    assert_eq!(
        refused[0]["refusal_reason"], "unknown_key_id",
        "{:#}",
        refused[0]
    );
    // The forged identity started nothing.
    let forged = topo
        .custody_json(&["chains", "--initiator", "mallory@example.com"])
        .unwrap();
    let forged = forged.get("chains").cloned().unwrap_or(forged);
    assert_eq!(forged.as_array().map(Vec::len), Some(0), "{forged:#}");
}

#[test]
fn sidecars_keep_enforcing_and_chains_complete_across_a_control_plane_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::start("seven").unwrap();
    let policy = topo.mesh.dir().join("block.yaml");
    std::fs::write(
        &policy,
        "apiVersion: custody.dev/v1\nkind: EgressPolicy\nmetadata: { name: contain-paste }\nspec:\n  rules:\n    - name: no-paste\n      destination: { hosts: [paste.risky.example] }\n      verdict: block\n",
    )
    .unwrap();
    let out = topo
        .custody(&["policy", "apply", "-f", policy.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success());
    let deadline = Instant::now() + WITHIN;
    while topo.request("/export", "alice@example.com").unwrap().0 != 403 {
        assert!(Instant::now() < deadline, "the block never held");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The control plane dies; traffic goes on and the block still holds.
    topo.kill_control().unwrap();
    assert_eq!(topo.request("/export", "dave@example.com").unwrap().0, 403);
    assert_eq!(
        topo.request("/checkout", "dave@example.com").unwrap().0,
        200
    );
    std::thread::sleep(Duration::from_millis(500));
    topo.start_control_again().unwrap();

    // The hops of the outage arrive once it is back. Each sidecar reports
    // on its own schedule, so the chain may be listed partial until the
    // last of them has: propagated is what it must become.
    topo.wait_chain(&["--initiator", "dave@example.com"], WITHIN, |c| {
        destination(c, "api.partner.example").is_some()
            && strings(c, "services").len() >= 2
            && c["coverage"] == "propagated"
    })
    .unwrap();
    topo.wait_chain(&["--initiator", "dave@example.com"], WITHIN, |c| {
        destination(c, "paste.risky.example").is_some_and(|d| d["verdict"] == "block")
    })
    .unwrap();
}

#[test]
fn an_agent_delegating_to_a_sub_agent_keeps_the_user_and_the_delegation_on_the_chain() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::start("three").unwrap();
    // alice asks the assistant (MCP tools/call, the assistant acting); it
    // hands the task to the researcher, which reads customers from MariaDB.
    let (status, body) = topo
        .mcp_request("alice@example.com", ASSISTANT_AGENT, "research")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["calls"][0]["body"]["queries"][0]["rows"], 5,
        "{body:#}"
    );

    let db_user = format!("mysql/{MARIADB_DATABASE}/{MARIADB_USER}");
    let chain = topo
        .wait_chain(&["--initiator", "alice@example.com"], WITHIN, |c| {
            has_identity(c, "database_user", &db_user)
                && c["initiator"]["actors"].as_array().map(Vec::len) == Some(2)
        })
        .unwrap();
    let initiator = &chain["initiator"];
    assert_eq!(initiator["subject"], "alice@example.com");
    assert_eq!(initiator["kind"], "human");
    assert_eq!(chain["coverage"], "propagated", "{chain:#}");
    // RFC 8693 nesting: the current actor first, the agent that delegated inside.
    assert_eq!(
        initiator["actors"],
        serde_json::json!([RESEARCH_AGENT, ASSISTANT_AGENT]),
        "{chain:#}"
    );
    assert_eq!(
        strings(&chain, "services"),
        vec![workload("assistant"), workload("researcher")],
        "{chain:#}"
    );
    let tools = strings(&chain, "tools");
    assert!(tools.iter().any(|t| t == "research"), "{tools:?}");
    assert!(tools.iter().any(|t| t == RESEARCH_TOOL), "{tools:?}");
    let read = classes(&chain);
    assert!(read.iter().any(|c| c == "pii.email"), "{read:?}");

    let id = chain["chain_id"].as_str().unwrap();
    let tree = topo.custody_json(&["chain", id]).unwrap();
    let hops = tree["hops"].as_array().unwrap();
    let delegated = hops
        .iter()
        .find(|h| h["workload"] == workload("researcher") && h["direction"] == "inbound")
        .unwrap();
    assert_eq!(delegated["operation"], RESEARCH_TOOL);
    assert_eq!(delegated["context_outcome"], "extended", "{delegated:#}");
    let query = hops
        .iter()
        .find(|h| h["database"]["tables_read"] == serde_json::json!(["customers"]))
        .unwrap();
    assert_eq!(query["workload"], workload("researcher"));
    assert_eq!(query["parent_event_id"], delegated["event_id"], "{tree:#}");
    assert_eq!(query["database"]["system"], "mysql");
    assert_eq!(query["database"]["user"], MARIADB_USER);
    assert_eq!(query["attribution"], "sql_comment", "{query:#}");
    // Every statement of the session, the driver's own too, is in the chain
    // under the sub-agent's request, attributed by what the connection carried.
    for hop in hops.iter().filter(|h| h["database"]["system"] == "mysql") {
        assert_eq!(hop["parent_event_id"], delegated["event_id"], "{tree:#}");
        assert_ne!(hop["attribution"], "stitched", "{hop:#}");
    }

    // Each actor finds the chain it acted in.
    for actor in [ASSISTANT_AGENT, RESEARCH_AGENT] {
        let found = topo
            .custody_json(&["chains", "--initiator", actor])
            .unwrap();
        let found = found.get("chains").cloned().unwrap_or(found);
        assert!(
            found
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["chain_id"] == id)),
            "{actor}: {found:#}"
        );
    }
}

#[test]
fn a_chain_that_read_ssns_is_blocked_from_the_partner_and_one_that_read_emails_is_not() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::start("five").unwrap();
    let policy = topo.mesh.dir().join("no-ssn.yaml");
    std::fs::write(
        &policy,
        "apiVersion: custody.dev/v1\nkind: EgressPolicy\nmetadata: { name: no-ssn-to-partners }\nspec:\n  rules:\n    - name: partner-ssn\n      destination: { hosts: [api.partner.example] }\n      chain: { taintAny: [pii.ssn] }\n      verdict: block\n",
    )
    .unwrap();
    let out = topo
        .custody(&["policy", "apply", "-f", policy.to_str().unwrap()])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Same service, same destination: orders reads SSNs, then calls the partner.
    let deadline = Instant::now() + WITHIN;
    let body = loop {
        let (status, body) = topo.request("/ssn-check", "alice@example.com").unwrap();
        if status == 403 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "the block never held");
        std::thread::sleep(Duration::from_millis(50));
    };
    let orders = &body["calls"][0]["body"];
    assert_eq!(orders["queries"][0]["rows"], 5, "{body:#}");
    let refusal = &orders["calls"][0]["body"];
    assert_eq!(refusal["error"], "egress_blocked", "{body:#}");
    assert_eq!(refusal["policy"], "no-ssn-to-partners");
    // orders reads emails only: the partner call goes through.
    let (status, body) = topo.request("/order", "bob@example.com").unwrap();
    assert_eq!(status, 200, "{body:#}");

    let blocked = topo
        .wait_chain(&["--verdict", "block"], WITHIN, |c| {
            destination(c, "api.partner.example").is_some_and(|d| d["verdict"] == "block")
        })
        .unwrap();
    assert_eq!(blocked["initiator"]["subject"], "alice@example.com");
    assert_eq!(refusal["chain"], blocked["chain_id"]);
    let partner = destination(&blocked, "api.partner.example").unwrap();
    assert_eq!(partner["policy"], "no-ssn-to-partners");
    assert_eq!(partner["rule"], "partner-ssn");
    assert!(
        classes(&blocked).iter().any(|c| c == "pii.ssn"),
        "{blocked:#}"
    );
    let pg_user = format!("postgresql/{PG_DATABASE}/{PG_USER}");
    assert!(
        has_identity(&blocked, "database_user", &pg_user),
        "{blocked:#}"
    );

    let allowed = topo
        .wait_chain(&["--initiator", "bob@example.com"], WITHIN, |c| {
            destination(c, "api.partner.example").is_some() && !classes(c).is_empty()
        })
        .unwrap();
    let partner = destination(&allowed, "api.partner.example").unwrap();
    assert_eq!(partner["verdict"], "allow", "{allowed:#}");
    let read = classes(&allowed);
    assert!(read.iter().any(|c| c == "pii.email"), "{read:?}");
    assert!(!read.iter().any(|c| c == "pii.ssn"), "{read:?}");
}

#[test]
fn background_work_is_attributed_to_the_jobs_workload_not_to_a_user() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::start("eight").unwrap();
    // A user's order and the nightly job's, side by side.
    let (status, body) = topo.request("/order", "alice@example.com").unwrap();
    assert_eq!(status, 200, "{body}");
    // The job: a process with no request behind it places an order with
    // orders over gRPC; orders reads customers, then calls the partner.
    let (status, body) = topo.run_job().unwrap();
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(
        body["calls"][0]["body"]["queries"][0]["rows"], 5,
        "{body:#}"
    );

    let job = workload(JOB);
    let pg_user = format!("postgresql/{PG_DATABASE}/{PG_USER}");
    let chain = topo
        .wait_chain(&["--initiator", &job], WITHIN, |c| {
            destination(c, "api.partner.example").is_some()
                && has_identity(c, "database_user", &pg_user)
        })
        .unwrap();
    assert_eq!(chain["initiator"]["subject"], job.as_str(), "{chain:#}");
    assert_eq!(chain["initiator"]["kind"], "service", "{chain:#}");
    assert_eq!(chain["initiator"]["actors"], serde_json::json!([]));
    assert_eq!(chain["coverage"], "propagated", "{chain:#}");
    assert_eq!(
        strings(&chain, "services"),
        vec![job.clone(), workload("orders")],
        "{chain:#}"
    );
    assert!(has_identity(&chain, "key_id", "job-1"), "{chain:#}");
    assert!(
        !has_identity(&chain, "workload", &workload("web")),
        "{chain:#}"
    );
    let read = classes(&chain);
    assert!(read.iter().any(|c| c == "pii.email"), "{read:?}");

    // The chain starts at the job's sidecar, on the way out: no inbound hop
    // there, a token minted for the workload and taken up by orders.
    let id = chain["chain_id"].as_str().unwrap();
    let tree = topo.custody_json(&["chain", id]).unwrap();
    let hops = tree["hops"].as_array().unwrap();
    let at_job: Vec<&Value> = hops.iter().filter(|h| h["workload"] == job).collect();
    assert_eq!(at_job.len(), 1, "{tree:#}");
    assert_eq!(at_job[0]["direction"], "outbound", "{tree:#}");
    assert_eq!(at_job[0]["context_outcome"], "minted", "{tree:#}");
    let orders_in = hop_index(&tree, |h| {
        h["workload"] == workload("orders") && h["direction"] == "inbound"
    })
    .unwrap();
    assert_eq!(hops[orders_in]["operation"], PLACE_ORDER, "{tree:#}");
    assert_eq!(hops[orders_in]["context_outcome"], "propagated", "{tree:#}");
    assert_eq!(
        hops[orders_in]["parent_event_id"], at_job[0]["event_id"],
        "{tree:#}"
    );

    // The user's order is hers alone, and the job's is no user's.
    let alice = topo
        .wait_chain(&["--initiator", "alice@example.com"], WITHIN, |c| {
            destination(c, "api.partner.example").is_some()
        })
        .unwrap();
    assert_ne!(alice["chain_id"], chain["chain_id"]);
    assert!(!strings(&alice, "services").contains(&job), "{alice:#}");
    let listed = chains(&topo, &["--initiator", &job]);
    assert!(
        listed.iter().all(|c| c["chain_id"] != alice["chain_id"]),
        "{listed:#?}"
    );
}

#[test]
fn each_sidecar_reports_as_its_own_workload_and_a_borrowed_token_reports_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::start("eight").unwrap();
    let mismatched = r#"custody_ingest_rejected_total{reason="workload_mismatch"}"#;
    let services_of = |chain: &Value| strings(chain, "services");

    // web -> reports (legacy) -> orders -> partner: three sidecars, each
    // with its own projected service-account token; every hop is stored
    // under the workload whose sidecar reported it.
    let (status, body) = topo.request("/report", "heidi@example.com").unwrap();
    assert_eq!(status, 200, "{body}");
    let summary = topo
        .wait_chain(&["--initiator", "heidi@example.com"], WITHIN, |c| {
            destination(c, "api.partner.example").is_some()
                && services_of(c).contains(&workload("reports"))
        })
        .unwrap();
    let id = summary["chain_id"].as_str().unwrap();
    let tree = topo.custody_json(&["chain", id]).unwrap();
    let own = [workload("web"), workload("reports"), workload("orders")];
    for name in &own {
        assert!(
            tree["hops"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["workload"] == name.as_str() && h["direction"] == "inbound"),
            "no inbound hop of {name}: {tree:#}"
        );
    }
    for hop in tree["hops"].as_array().unwrap() {
        let stored = hop["workload"].as_str().unwrap_or_default();
        assert!(own.iter().any(|w| w == stored), "{hop:#}");
    }
    assert_eq!(topo.control_metric(mismatched).unwrap(), 0.0);

    // reports' token now names orders: its sidecar still claims reports, so
    // the control plane refuses every hop it reports, and counts them.
    topo.write_workload_token("reports", "orders").unwrap();
    let (status, body) = topo.request("/report", "ivan@example.com").unwrap();
    assert_eq!(
        status, 200,
        "traffic does not depend on the control plane: {body}"
    );
    let deadline = Instant::now() + WITHIN;
    while topo.control_metric(mismatched).unwrap() == 0.0 {
        topo.mesh.check_alive().unwrap();
        assert!(
            Instant::now() < deadline,
            "no hop rejected as workload_mismatch"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Waits for the hops of web and orders (each sidecar reports on its
    // own schedule), then checks that none of reports' was stored.
    let ivan = topo
        .wait_chain(&["--initiator", "ivan@example.com"], WITHIN, |c| {
            let services = services_of(c);
            destination(c, "api.partner.example").is_some()
                && services.contains(&workload("web"))
                && services.contains(&workload("orders"))
        })
        .unwrap();
    let services = services_of(&ivan);
    assert!(services.contains(&workload("web")), "{ivan:#}");
    assert!(services.contains(&workload("orders")), "{ivan:#}");
    assert!(
        !services.contains(&workload("reports")),
        "a hop reported with another workload's token was stored: {ivan:#}"
    );
    let tree = topo
        .custody_json(&["chain", ivan["chain_id"].as_str().unwrap()])
        .unwrap();
    assert!(
        !tree["hops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["workload"] == workload("reports")),
        "{tree:#}"
    );

    // The rest of the mesh keeps reporting.
    let (status, _) = topo.request("/checkout", "judy@example.com").unwrap();
    assert_eq!(status, 200);
    let judy = topo
        .wait_chain(&["--initiator", "judy@example.com"], WITHIN, |c| {
            destination(c, "api.partner.example").is_some() && services_of(c).len() >= 2
        })
        .unwrap();
    assert_eq!(
        services_of(&judy),
        vec![workload("web"), workload("orders")],
        "{judy:#}"
    );
    assert_eq!(judy["coverage"], "propagated", "{judy:#}");

    // Every sidecar's own token written again, as a long-running demo does
    // before they expire (read again on the next call): reports is stored
    // again, and the others go on.
    topo.refresh_workload_tokens().unwrap();
    let (status, _) = topo.request("/report", "kim@example.com").unwrap();
    assert_eq!(status, 200);
    topo.wait_chain(&["--initiator", "kim@example.com"], WITHIN, |c| {
        destination(c, "api.partner.example").is_some()
            && services_of(c).contains(&workload("reports"))
    })
    .unwrap();
}
