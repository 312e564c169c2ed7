//! End-to-end scenarios on the reference topology: real sidecars in network
//! namespaces behind iptables redirects, the real control plane, the real
//! CLI. Each scenario asserts on the control plane's answers. Needs root.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use custody_e2e::topology::Topology;
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

#[test]
fn a_user_request_is_one_chain_across_services_to_the_partner() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::start("one").unwrap();
    let (status, body) = topo.request("/checkout", "alice@example.com").unwrap();
    assert_eq!(status, 200, "{body}");

    let chain = topo
        .wait_chain(&["--initiator", "alice@example.com"], WITHIN, |c| {
            destination(c, "api.partner.example").is_some()
        })
        .unwrap();
    assert_eq!(chain["initiator"]["subject"], "alice@example.com");
    assert_eq!(chain["initiator"]["kind"], "human");
    assert_eq!(chain["coverage"], "propagated", "{chain:#}");
    let services = strings(&chain, "services");
    let web = services.iter().position(|s| *s == workload("web"));
    let orders = services.iter().position(|s| *s == workload("orders"));
    assert!(
        web.is_some() && orders.is_some() && web < orders,
        "{services:?}"
    );
    let partner = destination(&chain, "api.partner.example").unwrap();
    assert_eq!(partner["verdict"], "allow");
}

#[test]
fn a_legacy_service_that_drops_headers_is_stitched_with_its_confidence() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut topo = Topology::start("two").unwrap();
    let (status, body) = topo.request("/report", "carol@example.com").unwrap();
    assert_eq!(status, 200, "{body}");

    let summary = topo
        .wait_chain(&["--initiator", "carol@example.com"], WITHIN, |c| {
            destination(c, "api.partner.example").is_some()
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

    // The hops of the outage arrive once it is back.
    let chain = topo
        .wait_chain(&["--initiator", "dave@example.com"], WITHIN, |c| {
            destination(c, "api.partner.example").is_some()
        })
        .unwrap();
    assert_eq!(chain["coverage"], "propagated", "{chain:#}");
    topo.wait_chain(&["--initiator", "dave@example.com"], WITHIN, |c| {
        destination(c, "paste.risky.example").is_some_and(|d| d["verdict"] == "block")
    })
    .unwrap();
}
