//! Policy changes reach every connected client; each client's
//! change-to-applied time is recorded; key issuing pushes the key set.

#[path = "support/server.rs"]
mod support;

use std::time::Duration;

use custody_context::api::v1;
use custody_control::client::Client;
use support::*;
use tokio_stream::StreamExt as _;

const CLIENTS: usize = 5;

const POLICY: &str = "apiVersion: custody.dev/v1
kind: EgressPolicy
metadata: { name: partner-data }
spec:
  rules:
    - name: no-ssn
      destination: { hosts: [api.partner.example], ports: [443] }
      chain: { taintAny: [pii.ssn] }
      verdict: block
";

async fn next(stream: &mut tonic::Streaming<v1::PolicyUpdate>) -> v1::PolicyUpdate {
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("an update within the guard time")
        .expect("the stream is open")
        .expect("an update, not an error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_applies_each_change_and_acknowledges_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = custody_control::server::start(&config(dir.path()))
        .await
        .unwrap();
    let base = format!("http://{}", server.http_addr);

    // Several subscribers, each with its own connection.
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut dist = distribution(server.grpc_addr, Some(NODE)).await;
        let mut w = workload("web");
        w.pod = format!("web-{i}");
        let mut stream = dist
            .subscribe(v1::SubscribeRequest {
                workload: Some(w.clone()),
                client_kind: if i == 0 { "agent" } else { "proxy" }.into(),
                have_version: 0,
            })
            .await
            .unwrap()
            .into_inner();
        // The first message is the current state, with the key set.
        let first = next(&mut stream).await;
        assert_eq!(first.policy.as_ref().unwrap().version, 0);
        let keys = first.keys.as_ref().unwrap();
        assert!(
            keys.keys
                .iter()
                .any(|k| k.key_id.starts_with("root-") && k.ed25519.len() == 32)
        );
        clients.push((dist, stream, w));
    }
    let metrics = tokio::task::spawn_blocking({
        let base = base.clone();
        move || Client::new(&base, None).get("/metrics", &[])
    });
    let text = metrics.await.unwrap().unwrap();
    let text = text.as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains("custody_connected_clients{kind=\"proxy\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("custody_connected_clients{kind=\"agent\"} 1"),
        "{text}"
    );

    // Change the policy over HTTP.
    let applied = tokio::task::spawn_blocking({
        let base = base.clone();
        move || {
            Client::new(&base, Some(ADMIN.to_owned())).post(
                "/v1/policies",
                "application/yaml",
                POLICY,
            )
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(applied["version"], 1);
    assert_eq!(applied["name"], "partner-data");

    // Every client receives version 1 and acknowledges it as a real client would:
    // parse the bundle into the enforced type, then report the apply time.
    let apply = |dist: &mut v1::policy_distribution_client::PolicyDistributionClient<Authed>,
                 w: &v1::WorkloadId,
                 update: v1::PolicyUpdate| {
        let received = std::time::Instant::now();
        let bundle =
            custody_context::policy::PolicyBundle::try_from(update.policy.as_ref().unwrap())
                .expect("a valid bundle");
        let ack = v1::PolicyAck {
            workload: Some(w.clone()),
            version: bundle.version,
            apply_nanos: received.elapsed().as_nanos() as u64,
            error: String::new(),
        };
        let mut dist = dist.clone();
        async move {
            dist.acknowledge(ack).await.unwrap();
            bundle
        }
    };
    for (dist, stream, w) in &mut clients {
        let update = next(stream).await;
        assert!(update.sent_unix_nanos > 0);
        let bundle = apply(dist, w, update).await;
        assert_eq!(bundle.version, 1);
        assert_eq!(bundle.policies[0].name(), "partner-data");
    }
    let status = get_json(&base, "/v1/policies/status").await.unwrap();
    let acks = status["clients"].as_array().unwrap();
    assert_eq!(acks.len(), CLIENTS);
    for a in acks {
        assert_eq!(a["version"], 1);
        assert!(a["change_to_applied_nanos"].as_u64().unwrap() > 0, "{a}");
        assert!(a["client"].as_str().unwrap().contains("#web-"));
    }
    assert!(acks.iter().any(|a| a["kind"] == "agent"));

    // Containment verbs are policy changes too: each one reaches everyone.
    let admin = Client::new(&base, Some(ADMIN.to_owned()));
    let a2 = admin.clone();
    tokio::task::spawn_blocking(move || {
        a2.post(
            "/v1/contain/revoke",
            "application/json",
            r#"{"principal":"mallory@example.com"}"#,
        )
    })
    .await
    .unwrap()
    .unwrap();
    for (dist, stream, w) in &mut clients {
        let update = next(stream).await;
        let bundle = apply(dist, w, update).await;
        assert_eq!(bundle.version, 2);
        assert!(
            bundle
                .revocations
                .principals
                .contains("mallory@example.com")
        );
    }

    // A signing key issued to a sidecar is published to every subscriber.
    let mut trust = trust(server.grpc_addr, Some(NODE)).await;
    let key = custody_context::keys::SigningKey::generate();
    let public = key.public_key();
    let grant = trust
        .issue_signing_key(v1::SigningKeyRequest {
            workload: Some(workload("orders")),
            ed25519: public.bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(grant.not_after_unix > grant.not_before_unix);
    for (_, stream, _) in &mut clients {
        let update = next(stream).await;
        let keys = custody_context::keys::KeySet::try_from(update.keys.as_ref().unwrap()).unwrap();
        let issued = keys
            .keys()
            .find(|k| k.kid() == grant.key_id)
            .expect("the new key");
        assert_eq!(
            issued.workload.as_deref(),
            Some("spiffe://td/ns/shop/sa/orders")
        );
        assert_eq!(update.policy.unwrap().version, 2, "the policy is unchanged");
    }

    // The audit log says who did what.
    let audit = get_json(&base, "/v1/audit").await.unwrap();
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries[0]["action"], "contain.revoke");
    assert_eq!(entries[1]["action"], "policy.apply");
    assert!(entries.iter().all(|e| e["actor"] == "oncall"));

    // The latency histogram counted every acknowledgement.
    let text = tokio::task::spawn_blocking(move || Client::new(&base, None).get("/metrics", &[]))
        .await
        .unwrap()
        .unwrap();
    let text = text.as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains(&format!(
            "custody_policy_push_latency_seconds_count {}",
            2 * CLIENTS
        )),
        "{text}"
    );
    drop(clients);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policies_are_refused_with_the_field_and_nothing_is_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let server = custody_control::server::start(&config(dir.path()))
        .await
        .unwrap();
    let base = format!("http://{}", server.http_addr);
    tokio::task::spawn_blocking(move || {
        let admin = Client::new(&base, Some(ADMIN.to_owned()));
        let bad = POLICY.replace("verdict: block", "verdict: maybe");
        match admin.post("/v1/policies", "application/yaml", &bad) {
            Err(custody_control::client::ClientError::Status { status, body, .. }) => {
                assert_eq!(status, 400);
                assert_eq!(body["field"], "spec.rules[0].verdict");
            }
            other => panic!("{other:?}"),
        }
        let json_bad = r#"{"apiVersion":"custody.dev/v1","kind":"EgressPolicy","metadata":{"name":"x"},"spec":{"rules":[{"name":"r","destination":{"hosts":["bad host"]},"verdict":"block"}]}}"#;
        match admin.post("/v1/policies", "application/json", json_bad) {
            Err(custody_control::client::ClientError::Status { status, body, .. }) => {
                assert_eq!(status, 400);
                assert_eq!(body["field"], "spec.rules[0].destination.hosts[0]");
            }
            other => panic!("{other:?}"),
        }
        match admin.post("/v1/contain/revoke", "application/json", r#"{"credential_hash":"abc"}"#) {
            Err(custody_control::client::ClientError::Status { status, body, .. }) => {
                assert_eq!(status, 400);
                assert_eq!(body["field"], "credential_hash");
            }
            other => panic!("{other:?}"),
        }
        match admin.delete("/v1/policies/nope") {
            Err(custody_control::client::ClientError::Status { status, .. }) => assert_eq!(status, 404),
            other => panic!("{other:?}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(server.shared.policy.current().version, 0);
    // A connected subscriber does not hold the server up when it stops.
    let mut dist = distribution(server.grpc_addr, Some(NODE)).await;
    let mut stream = dist
        .subscribe(v1::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    next(&mut stream).await;
    tokio::time::timeout(Duration::from_secs(30), server.shutdown())
        .await
        .expect("the server stops with a subscriber connected");
    assert!(
        stream.next().await.is_none_or(|r| r.is_err()),
        "the stream ended"
    );
}
