//! Egress enforcement, applied live: a policy change reaches requests on an
//! already open keep-alive connection; revoked principals are refused.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::support::*;

fn bundle(version: u64, block_partner: bool, revoked: &str) -> String {
    let verdict = if block_partner { "block" } else { "audit" };
    format!(
        r#"
version: {version}
defaultVerdict: allow
revocations: {{ principals: [{revoked}] }}
policies:
  - apiVersion: custody.dev/v1
    kind: EgressPolicy
    metadata: {{ name: partner-data }}
    spec:
      rules:
        - name: partner-api
          destination: {{ hosts: ["*.partner.example"], ports: [80] }}
          verdict: {verdict}
"#
    )
}

fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_applies_live_to_an_open_connection() {
    let trust = Trust::new(&["svc"]);
    let partner = App::ok().await;
    let policy_dir = tempfile::tempdir().unwrap();
    let policy_file = policy_dir.path().join("policy.yaml");
    let state_dir = policy_dir.path().join("state");
    std::fs::write(&policy_file, bundle(1, false, "")).unwrap();
    let extra = format!(
        "policy: {{ file: \"{}\", state_dir: \"{}\", poll_interval_ms: 50 }}",
        policy_file.display(),
        state_dir.display()
    );
    let mut spec = Spec::new("svc", free_port());
    spec.upstreams = vec![("api.partner.example".into(), partner.addr)];
    spec.extra = &extra;
    let sc = start(spec, &trust).await;

    // One keep-alive connection, used for every request below.
    let stream = tokio::net::TcpStream::connect(sc.outbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut get = async || {
        sender
            .ready()
            .await
            .expect("the keep-alive connection stays open");
        let resp = sender
            .send_request(
                Request::get("/upload")
                    .header("host", "api.partner.example")
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    assert_eq!(get().await.0, 200);

    write_atomically(&policy_file, &bundle(2, true, ""));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        let (status, body) = get().await;
        if status != 200 {
            break (status, body);
        }
        assert!(Instant::now() < deadline, "policy change never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 403, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "egress_blocked");
    assert_eq!(body["policy"], "partner-data");
    assert_eq!(body["rule"], "partner-api");
    assert_eq!(body["chain"].as_str().unwrap().len(), 32);
    // Still the same connection, still blocked, and nothing reaches the partner.
    let reached = partner.seen().len();
    assert_eq!(get().await.0, 403);
    assert_eq!(partner.seen().len(), reached);

    assert_eq!(sc.metric("custody_proxy_policy_version").await, 2.0);
    assert_eq!(
        sc.metric("custody_proxy_egress_verdicts_total{verdict=\"block\",policy=\"partner-data\"}")
            .await,
        2.0
    );
    let (_, policy) = sc.admin_get("/policy").await;
    assert!(policy.contains("\"version\": 2"), "{policy}");
    // Persisted for a restart without the policy source.
    let persisted = std::fs::read_to_string(state_dir.join("policy.json")).unwrap();
    assert!(persisted.contains("partner-api"));
    sc.wait_hop(|h| {
        h["egress"]["verdict"] == "VERDICT_BLOCK"
            && h["egress"]["policy"] == "partner-data"
            && h["status"] == 403
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_principal_is_refused_on_its_next_request() {
    let trust = Trust::new(&["svc"]);
    let app = App::ok().await;
    let policy_dir = tempfile::tempdir().unwrap();
    let policy_file = policy_dir.path().join("policy.yaml");
    std::fs::write(&policy_file, bundle(1, false, "")).unwrap();
    let extra = format!(
        "policy: {{ file: \"{}\", poll_interval_ms: 50 }}",
        policy_file.display()
    );
    let mut spec = Spec::new("svc", app.addr);
    spec.extra = &extra;
    let sc = start(spec, &trust).await;
    let send = async || {
        let resp = client()
            .request(
                Request::get(format!("http://{}/x", sc.inbound))
                    .header("x-custody-user", "eve@example.com")
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        body_string(resp).await
    };
    assert_eq!(send().await.0, 200);
    write_atomically(&policy_file, &bundle(2, false, "\"eve@example.com\""));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = send().await;
        if status == 403 {
            assert!(body.contains("principal_revoked"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "revocation never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_keys_and_credentials_are_refused_and_quarantine_audits() {
    use custody_context::issue::{Issuer, Mint};
    use custody_context::token::InitiatorKind;
    use custody_context::traceparent::TraceId;
    use sha2::{Digest, Sha256};

    let trust = Trust::new(&["svc", "edge"]);
    let app = App::ok().await;
    let quarantined = TraceId::random().to_string();
    let dir = tempfile::tempdir().unwrap();
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(
        &policy_file,
        format!(
            r#"
version: 1
defaultVerdict: allow
revocations:
  keyIds: ["{kid}"]
  credentialHashes: ["{cred}"]
  quarantinedChains: ["{quarantined}"]
policies: []
"#,
            kid = trust.key("edge").kid(),
            cred = hex::encode(Sha256::digest(b"s3cr3t")),
        ),
    )
    .unwrap();
    let extra = format!("policy: {{ file: \"{}\" }}", policy_file.display());
    let mut spec = Spec::new("svc", app.addr);
    spec.upstreams = vec![("partner".into(), app.addr)];
    spec.extra_inbound = "  refuse_invalid_tokens: true";
    spec.extra = &extra;
    let sc = start(spec, &trust).await;

    let token = Issuer::new(trust.key("edge"), uri_of("edge"), TD, 300)
        .mint(
            Mint {
                txn: TraceId::random(),
                sub: "ivan".into(),
                kind: InitiatorKind::Human,
                scope: "s".into(),
                act: None,
                tctx: None,
                rctx: None,
                taint: vec![],
            },
            custody_context::unix_now(),
        )
        .unwrap()
        .encoded;
    let send = async |headers: &[(&str, &str)], addr: std::net::SocketAddr| {
        let mut req = Request::get(format!("http://{addr}/x"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        body_string(client().request(req.body(full("")).unwrap()).await.unwrap()).await
    };
    let (status, body) = send(&[("txn-token", &token)], sc.inbound).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("revoked_key"), "{body}");

    let (status, body) = send(
        &[
            ("x-custody-user", "judy"),
            ("authorization", "Bearer s3cr3t"),
        ],
        sc.inbound,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("credential_revoked"), "{body}");
    let (status, _) = send(
        &[
            ("x-custody-user", "judy"),
            ("authorization", "Bearer other"),
        ],
        sc.inbound,
    )
    .await;
    assert_eq!(status, 200);

    // A call in a quarantined chain passes, flagged.
    let traceparent = format!("00-{quarantined}-00f067aa0ba902b7-01");
    let (status, _) = send(
        &[("host", "partner"), ("traceparent", &traceparent)],
        sc.outbound,
    )
    .await;
    assert_eq!(status, 200);
    let hop = sc
        .wait_hop(|h| {
            h["chain_id"] == quarantined.as_str() && h["direction"] == "DIRECTION_OUTBOUND"
        })
        .await;
    assert_eq!(hop["egress"]["verdict"], "VERDICT_AUDIT");
    assert_eq!(hop["egress"]["policy"], "quarantine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_from_outside_the_edge_are_stripped() {
    let trust = Trust::new(&["svc"]);
    let app = App::ok().await;
    let mut spec = Spec::new("svc", app.addr);
    spec.extra_inbound = "  strip_headers: [x-custody-user]";
    let sc = start(spec, &trust).await;
    let resp = client()
        .request(
            Request::get(format!("http://{}/x", sc.inbound))
                .header("x-custody-user", "root@example.com")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = &app.seen()[0];
    assert!(seen.header("x-custody-user").is_none());
    assert_eq!(seen.token().unwrap()["sub"], "peer:127.0.0.1");
    let hop = &sc.hops(1).await[0];
    assert_eq!(hop["context_outcome"], "CONTEXT_OUTCOME_MISSING");
}
