//! Signing keys issued by the real control plane: two sidecars register
//! their keys, verify each other's tokens through the pushed key set alone,
//! and keep doing so across a key renewal; with workload authentication, a
//! sidecar's projected service-account token decides which workload it may
//! register a key for.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Response;

use crate::support::*;

const NODE_TOKEN: &str = "node-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_keys_verify_mesh_wide_and_are_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let config = custody_control::config::Config::parse(&format!(
        "data_dir: {}\ngrpc_listen: 127.0.0.1:0\nhttp_listen: 127.0.0.1:0\n\
         tokens:\n  - {{ name: nodes, role: node, secret: {NODE_TOKEN} }}\n\
         trust: {{ signing_key_ttl_secs: 6 }}\n",
        dir.path().display()
    ))
    .unwrap();
    let control = custody_control::server::start(&config).await.unwrap();
    let token_file = dir.path().join("node-token");
    std::fs::write(&token_file, NODE_TOKEN).unwrap();
    let extra = format!(
        "control_plane: {{ token_file: \"{}\" }}\n\
         policy: {{ control_plane: \"http://{}\" }}\n",
        token_file.display(),
        control.grpc_addr
    );
    // The key-set file of the test harness is left out of it: sidecars trust
    // each other only through what the control plane publishes.
    let trust = Trust::new(&["front", "back"]);
    std::fs::write(&trust.key_set, r#"{"keys": []}"#).unwrap();

    let back_app = App::ok().await;
    let mut spec = Spec::new("back", back_app.addr);
    spec.extra = &extra;
    spec.signing = "register: true";
    let back = start(spec, &trust).await;

    let ports = [free_port(), free_port(), free_port()];
    let outbound = ports[1];
    let front_app = App::start(Arc::new(move |req| {
        Box::pin(async move {
            let headers = req.headers().clone();
            let resp = call_out(outbound, "back", Some(&headers)).await;
            Response::builder()
                .status(resp.status())
                .body(full(""))
                .unwrap()
        })
    }))
    .await;
    let mut spec = Spec::new("front", front_app.addr);
    spec.upstreams = vec![("back".into(), back.inbound)];
    spec.extra = &extra;
    spec.signing = "register: true";
    let front = start_on(spec, &trust, ports).await;

    let call = |user: &'static str| {
        let inbound = front.inbound;
        async move {
            let resp = client()
                .request(
                    hyper::Request::get(format!("http://{inbound}/"))
                        .header("x-custody-user", user)
                        .body(full(""))
                        .unwrap(),
                )
                .await
                .unwrap();
            resp.status().as_u16()
        }
    };
    // The push of front's key may trail its registration by a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first_kid = loop {
        assert_eq!(call("alice@example.com").await, 200);
        let hop = back
            .wait_hop(|h| h["direction"] == "DIRECTION_INBOUND")
            .await;
        let hops = back.hops(1).await;
        let last = hops
            .iter()
            .rev()
            .find(|h| h["direction"] == "DIRECTION_INBOUND")
            .unwrap_or(&hop);
        if last["context_outcome"] == "CONTEXT_OUTCOME_PROPAGATED" {
            break last["key_id"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "front's token never verified at back: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        first_kid.starts_with("wl-"),
        "issued by the control plane: {first_kid}"
    );
    let token = back_app.seen().last().unwrap().token().unwrap();
    assert_eq!(token["sub"], "alice@example.com");

    // Keys live 6 s and are renewed at two thirds: within a few seconds
    // front signs with a new key, which back verifies too.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(call("bob@example.com").await, 200);
        let hops = back.hops(1).await;
        let last = hops
            .iter()
            .rev()
            .find(|h| h["direction"] == "DIRECTION_INBOUND")
            .unwrap();
        let kid = last["key_id"].as_str().unwrap();
        if kid != first_kid && last["context_outcome"] == "CONTEXT_OUTCOME_PROPAGATED" {
            break;
        }
        assert!(Instant::now() < deadline, "no renewed key verified: {last}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(front);
    drop(back);
    control.shutdown().await;
}

/// The workload authentication of a Kubernetes mesh: the sidecar presents
/// its projected service-account token (re-read on every call, as the
/// kubelet rotates it), and the control plane issues keys only for the
/// workload the token proves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_token_registers_its_own_workload_and_no_other() {
    use custody_testkit::service_account::{Issuer, KeyKind, Pod};

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    let issuer = Issuer::new(KeyKind::P256, ISS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = custody_control::config::Config::parse(&format!(
        "data_dir: {}\ngrpc_listen: 127.0.0.1:0\nhttp_listen: 127.0.0.1:0\n\
         tokens:\n  - {{ name: nodes, role: node, secret: {NODE_TOKEN} }}\n\
         trust: {{ signing_key_ttl_secs: 6 }}\n\
         workload_auth: {{ issuer: \"{ISS}\", jwks_file: \"{}\", audience: custody, trust_domain: {TD} }}\n",
        dir.path().display(),
        issuer.jwks_file().display(),
    ))
    .unwrap();
    let control = custody_control::server::start(&config).await.unwrap();
    let keys_for = |sa: &str| {
        control
            .shared
            .store
            .signing_keys(0)
            .unwrap()
            .into_iter()
            .filter(|k| k.workload == format!("spiffe://{TD}/ns/test/sa/{sa}"))
            .collect::<Vec<_>>()
    };
    let refused = || {
        control
            .shared
            .metrics
            .encode()
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    "custody_control_auth_refused_total{api=\"grpc\",reason=\"workload_mismatch\"}",
                )
                .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let token_file = dir.path().join("token");
    std::fs::write(
        &token_file,
        issuer.token(&Pod::new("test", "back", "back-0"), "custody", 3600),
    )
    .unwrap();
    let extra = format!(
        "control_plane: {{ service_account_token_file: \"{}\" }}\n\
         policy: {{ control_plane: \"http://{}\" }}\n",
        token_file.display(),
        control.grpc_addr
    );
    let trust = Trust::new(&["back", "front"]);

    // A sidecar whose token is for another workload does not start: the
    // refusal names the field.
    let app = App::ok().await;
    let mut spec = Spec::new("front", app.addr);
    spec.extra = &extra;
    spec.signing = "register: true";
    let yaml = config_yaml(
        &spec,
        &trust,
        dir.path(),
        [free_port(), free_port(), free_port()],
    );
    let front = custody_proxy::Config::from_yaml(&yaml).unwrap();
    let error = tokio::task::spawn_blocking(move || custody_proxy::Sidecar::build(front))
        .await
        .unwrap()
        .expect_err("a token for back registers no key for front")
        .to_string();
    assert!(error.contains("workload.service_account"), "{error}");
    assert!(keys_for("front").is_empty());
    assert_eq!(refused(), 1.0);

    // With its own token it registers and gets a key bound to it.
    let mut spec = Spec::new("back", app.addr);
    spec.extra = &extra;
    spec.signing = "register: true";
    let back = start(spec, &trust).await;
    assert_eq!(keys_for("back").len(), 1, "one key issued to back");

    // The file now holds a token for another workload: the next renewal
    // presents it, and is refused.
    let replaced = custody_context::unix_now();
    std::fs::write(
        &token_file,
        issuer.token(&Pod::new("test", "other", "other-0"), "custody", 3600),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Every key back held before the swap has expired: its renewal,
        // due at two thirds of its lifetime, came after the swap.
        let now = custody_context::unix_now();
        let held = keys_for("back");
        let renewed = held.iter().any(|k| k.not_before_unix > replaced);
        assert!(!renewed, "a key was issued with the other workload's token");
        if refused() >= 2.0 && held.iter().all(|k| k.not_after_unix < now) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "renewal with the other workload's token was never refused"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(keys_for("other").is_empty());
    drop(back);
    control.shutdown().await;
}
