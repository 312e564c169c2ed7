//! Workload authentication with projected service-account tokens, against
//! the real server: a token registers a signing key for its own workload
//! only, reports its own hops only, and opens no investigation or policy
//! API; forged, foreign, stale or unsigned tokens open nothing.

#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

#[path = "support/server.rs"]
mod support;

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use custody_context::api::v1;
use custody_control::client::{Client, ClientError};
use custody_testkit::service_account::{Issuer, KeyKind, Pod};
use serde_json::json;
use support::*;

const ISS: &str = "https://kubernetes.default.svc.cluster.local";

/// One JWKS with the keys of every issuer, as an API server publishes
/// during a key rotation.
fn jwks(dir: &Path, issuers: &[&Issuer]) -> std::path::PathBuf {
    let mut keys = Vec::new();
    for i in issuers {
        let set: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(i.jwks_file()).unwrap()).unwrap();
        keys.extend(set["keys"].as_array().unwrap().iter().cloned());
    }
    let path = dir.join("jwks.json");
    std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
    path
}

async fn start(dir: &Path, jwks: &Path) -> custody_control::server::Running {
    let text = format!(
        "{}workload_auth: {{ issuer: \"{ISS}\", jwks_file: \"{}\", audience: custody, leeway_secs: 5, trust_domain: td }}\n",
        config_text(dir),
        jwks.display()
    );
    let config = custody_control::config::Config::parse(&text).unwrap();
    custody_control::server::start(&config).await.unwrap()
}

fn wl(ns: &str, sa: &str, pod: &str) -> v1::WorkloadId {
    v1::WorkloadId {
        trust_domain: "td".into(),
        namespace: ns.into(),
        service_account: sa.into(),
        pod: pod.into(),
    }
}

fn key_request(w: v1::WorkloadId) -> v1::SigningKeyRequest {
    let key = custody_context::keys::SigningKey::generate();
    v1::SigningKeyRequest {
        workload: Some(w),
        ed25519: key.public_key().bytes().to_vec(),
    }
}

fn metric(server: &custody_control::server::Running, sample: &str) -> f64 {
    server
        .shared
        .metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn denied<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>, field: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{what}: {s:?}");
            assert!(s.message().contains(field), "{what}: {}", s.message());
        }
        Ok(v) => panic!("{what} accepted: {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_token_registers_and_reports_for_its_own_workload_only() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = Issuer::new(KeyKind::Rsa, ISS).unwrap();
    let ec = Issuer::new(KeyKind::P256, ISS).unwrap();
    let server = start(dir.path(), &jwks(dir.path(), &[&rsa, &ec])).await;
    let a = rsa.token(&Pod::new("ns-a", "sa-a", "pod-a"), "custody", 600);
    let orders = ec.token(&Pod::new("shop", "orders", "orders-0"), "custody", 600);

    // Valid tokens (RS256 and ES256) register keys for their own workload.
    for (token, w) in [
        (&a, wl("ns-a", "sa-a", "pod-a")),
        (&orders, wl("shop", "orders", "orders-0")),
    ] {
        let mut trust = trust(server.grpc_addr, Some(token)).await;
        let grant = trust
            .issue_signing_key(key_request(w.clone()))
            .await
            .unwrap()
            .into_inner();
        let set = trust
            .get_key_set(v1::KeySetRequest {})
            .await
            .unwrap()
            .into_inner();
        let key = set.keys.iter().find(|k| k.key_id == grant.key_id).unwrap();
        let bound = key.workload.as_ref().unwrap();
        assert_eq!(
            (bound.namespace.as_str(), bound.service_account.as_str()),
            (w.namespace.as_str(), w.service_account.as_str())
        );
    }

    // The token for ns-a/sa-a cannot register anything else.
    let mut trust_a = trust(server.grpc_addr, Some(&a)).await;
    for (claimed, field) in [
        (wl("ns-b", "sa-b", "pod-a"), "workload.namespace"),
        (wl("ns-a", "sa-b", "pod-a"), "workload.service_account"),
        (wl("ns-a", "sa-a", "pod-b"), "workload.pod"),
        (
            v1::WorkloadId {
                trust_domain: "elsewhere".into(),
                ..wl("ns-a", "sa-a", "pod-a")
            },
            "workload.trust_domain",
        ),
    ] {
        denied(
            field,
            trust_a.issue_signing_key(key_request(claimed)).await,
            field,
        );
    }
    assert_eq!(
        metric(
            &server,
            "custody_control_auth_refused_total{api=\"grpc\",reason=\"workload_mismatch\"}"
        ),
        4.0
    );
    let published = server
        .shared
        .trust
        .key_set(custody_context::unix_now())
        .unwrap();
    assert!(
        published
            .keys
            .iter()
            .filter_map(|k| k.workload.as_ref())
            .all(|w| w.namespace != "ns-b" && w.service_account != "sa-b"),
        "{published:?}"
    );

    // With workload authentication on, the shared node token issues no key.
    let mut trust_node = trust(server.grpc_addr, Some(NODE)).await;
    denied(
        "node token",
        trust_node
            .issue_signing_key(key_request(wl("ns-b", "sa-b", "")))
            .await,
        "workload tokens only",
    );

    // ... and its hops are refused: only a workload token names a workload.
    let mut ingest_node = ingest(server.grpc_addr, Some(NODE)).await;
    let mut node_hops = chain(8, "wl", 1, custody_control::unix_nanos());
    node_hops[0].workload = Some(wl("ns-b", "sa-b", "pod-b"));
    denied(
        "node token hops",
        ingest_node
            .report_hops(v1::HopBatch { hops: node_hops })
            .await,
        "workload tokens only",
    );
    assert_eq!(server.shared.store.hop_count().unwrap(), 0);

    // Hops: its own are stored, another workload's are rejected and counted.
    let mut ingest_a = ingest(server.grpc_addr, Some(&a)).await;
    let mut hops = chain(7, "wl", 2, custody_control::unix_nanos());
    hops[0].workload = Some(wl("ns-a", "sa-a", "pod-a"));
    hops[1].workload = Some(wl("ns-b", "sa-b", "pod-b"));
    let ack = ingest_a
        .report_hops(v1::HopBatch { hops })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.accepted, ack.rejected), (1, 1));
    assert_eq!(server.shared.store.hop_count().unwrap(), 1);
    assert_eq!(
        metric(
            &server,
            "custody_ingest_rejected_total{reason=\"workload_mismatch\"}"
        ),
        1.0
    );
    ingest_a
        .report_flows(v1::FlowBatch::default())
        .await
        .unwrap();

    // Policy: received for its own workload, not for another.
    let mut dist_a = distribution(server.grpc_addr, Some(&a)).await;
    let mut stream = dist_a
        .subscribe(v1::SubscribeRequest {
            workload: Some(wl("ns-a", "sa-a", "pod-a")),
            client_kind: "proxy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    dist_a
        .acknowledge(v1::PolicyAck {
            workload: Some(wl("ns-a", "sa-a", "pod-a")),
            version: first.policy.map_or(0, |p| p.version),
            ..Default::default()
        })
        .await
        .unwrap();
    denied(
        "subscribe for another workload",
        dist_a
            .subscribe(v1::SubscribeRequest {
                workload: Some(wl("ns-b", "sa-b", "pod-b")),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "workload.namespace",
    );
    denied(
        "acknowledge for another workload",
        dist_a
            .acknowledge(v1::PolicyAck {
                workload: Some(wl("ns-a", "sa-b", "pod-a")),
                ..Default::default()
            })
            .await,
        "workload.service_account",
    );

    // No investigation or policy API for a workload: 403.
    let base = format!("http://{}", server.http_addr);
    let token = a.clone();
    tokio::task::spawn_blocking(move || {
        let client = Client::new(&base, Some(token));
        let forbidden = |what: &str, r: Result<serde_json::Value, ClientError>| match r {
            Err(ClientError::Status { status, .. }) => assert_eq!(status, 403, "{what}"),
            other => panic!("{what}: {other:?}"),
        };
        forbidden("list chains", client.get("/v1/chains", &[]));
        forbidden("audit", client.get("/v1/audit", &[]));
        forbidden(
            "apply policy",
            client.post("/v1/policies", "application/yaml", "name: p\nrules: []\n"),
        );
        forbidden(
            "contain",
            client.post("/v1/contain/quarantine", "application/json", "{}"),
        );
    })
    .await
    .unwrap();
    assert_eq!(server.shared.policy.current().version, 0);
    assert!(
        metric(
            &server,
            "custody_control_auth_refused_total{api=\"http\",reason=\"role\"}"
        ) >= 4.0
    );
    server.shutdown().await;
}

/// Replaces a token's header, keeping its claims and signature.
fn with_header(token: &str, header: &serde_json::Value) -> String {
    let (_, rest) = token.split_once('.').unwrap();
    format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_foreign_stale_and_unsigned_workload_tokens_open_no_api() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Issuer::new(KeyKind::Rsa, ISS).unwrap();
    let server = start(dir.path(), &jwks(dir.path(), &[&issuer])).await;
    let pod = Pod::new("shop", "web", "web-0");
    let now = custody_context::unix_now();
    let with = |key: &str, value: serde_json::Value| {
        let mut c = pod.claims(ISS, "custody", now, 600);
        c[key] = value;
        issuer.sign(&c)
    };
    let good = issuer.token(&pod, "custody", 600);
    let forger = Issuer::with_kid(KeyKind::Rsa, ISS, issuer.kid()).unwrap();
    let stranger = Issuer::new(KeyKind::P256, ISS).unwrap();
    let unsigned = format!(
        "{}.",
        with_header(
            good.rsplit_once('.').unwrap().0,
            &json!({ "alg": "none", "typ": "JWT" })
        )
    );
    let cases: Vec<(&str, String)> = vec![
        ("wrong_audience", issuer.token(&pod, "kubernetes", 600)),
        ("expired", with("exp", json!(now - 3600))),
        ("bad_signature", forger.token(&pod, "custody", 600)),
        ("unknown_key_id", stranger.token(&pod, "custody", 600)),
        ("wrong_issuer", with("iss", json!("https://other.example"))),
        ("disallowed_algorithm", unsigned),
    ];
    for (reason, token) in &cases {
        let token = token.as_str();
        let refused = |what: &str, r: Result<(), tonic::Status>| match r {
            Err(s) => {
                assert_eq!(
                    s.code(),
                    tonic::Code::Unauthenticated,
                    "{reason} {what}: {s:?}"
                );
                assert!(
                    s.message().contains(reason),
                    "{reason} {what}: {}",
                    s.message()
                );
            }
            Ok(()) => panic!("{reason}: {what} accepted"),
        };
        let mut ingest = ingest(server.grpc_addr, Some(token)).await;
        let hops = chain(1, "x", 1, custody_control::unix_nanos());
        refused(
            "ReportHops",
            ingest.report_hops(v1::HopBatch { hops }).await.map(|_| ()),
        );
        refused(
            "ReportFlows",
            ingest
                .report_flows(v1::FlowBatch::default())
                .await
                .map(|_| ()),
        );
        let mut dist = distribution(server.grpc_addr, Some(token)).await;
        refused(
            "Subscribe",
            dist.subscribe(v1::SubscribeRequest::default())
                .await
                .map(|_| ()),
        );
        refused(
            "Acknowledge",
            dist.acknowledge(v1::PolicyAck::default()).await.map(|_| ()),
        );
        let mut trust = trust(server.grpc_addr, Some(token)).await;
        refused(
            "IssueSigningKey",
            trust
                .issue_signing_key(key_request(wl("shop", "web", "web-0")))
                .await
                .map(|_| ()),
        );
        refused(
            "GetKeySet",
            trust.get_key_set(v1::KeySetRequest {}).await.map(|_| ()),
        );
        let base = format!("http://{}", server.http_addr);
        let owned = token.to_owned();
        tokio::task::spawn_blocking(move || {
            let client = Client::new(&base, Some(owned));
            for r in [
                client.get("/v1/chains", &[]),
                client.post("/v1/policies", "application/yaml", "name: p\n"),
            ] {
                match r {
                    Err(ClientError::Status { status, .. }) => assert_eq!(status, 401),
                    other => panic!("{other:?}"),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(
            metric(
                &server,
                &format!("custody_control_auth_refused_total{{api=\"grpc\",reason=\"{reason}\"}}")
            ),
            6.0,
            "{reason}"
        );
    }
    assert_eq!(server.shared.store.hop_count().unwrap(), 0);
    assert_eq!(server.shared.policy.current().version, 0);
    assert!(server.shared.store.signing_keys(0).unwrap().is_empty());
    // The genuine token still works.
    let mut trust = trust(server.grpc_addr, Some(&good)).await;
    trust
        .issue_signing_key(key_request(wl("shop", "web", "web-0")))
        .await
        .unwrap();
    server.shutdown().await;
}
