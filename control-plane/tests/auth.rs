//! A client without valid credentials is refused on every API.

#[path = "support/server.rs"]
mod support;

use custody_context::api::v1;
use custody_control::client::{Client, ClientError};
use support::*;

fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) {
    match r {
        Err(s) => assert_eq!(s.code(), tonic::Code::Unauthenticated, "{what}: {s:?}"),
        Ok(v) => panic!("{what} accepted without credentials: {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_method_refuses_missing_or_wrong_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = custody_control::server::start(&config(dir.path()))
        .await
        .unwrap();
    for token in [
        None,
        Some("wrong-token-0123456789"),
        Some(ADMIN.get(..10).unwrap()),
    ] {
        let mut ingest = ingest(server.grpc_addr, token).await;
        let hops = chain(1, "x", 1, custody_control::unix_nanos());
        refused(
            "ReportHops",
            ingest.report_hops(v1::HopBatch { hops }).await,
        );
        refused(
            "ReportFlows",
            ingest.report_flows(v1::FlowBatch::default()).await,
        );
        let mut dist = distribution(server.grpc_addr, token).await;
        refused(
            "Subscribe",
            dist.subscribe(v1::SubscribeRequest::default())
                .await
                .map(|_| ()),
        );
        refused(
            "Acknowledge",
            dist.acknowledge(v1::PolicyAck::default()).await,
        );
        let mut trust = trust(server.grpc_addr, token).await;
        refused(
            "IssueSigningKey",
            trust
                .issue_signing_key(v1::SigningKeyRequest::default())
                .await,
        );
        refused("GetKeySet", trust.get_key_set(v1::KeySetRequest {}).await);
    }
    // Nothing was stored.
    assert_eq!(server.shared.store.hop_count().unwrap(), 0);

    // With the node token, the same calls go through.
    let mut ingest = ingest(server.grpc_addr, Some(NODE)).await;
    let hops = chain(1, "x", 1, custody_control::unix_nanos());
    let ack = ingest
        .report_hops(v1::HopBatch { hops })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 1);
    let mut trust = trust(server.grpc_addr, Some(NODE)).await;
    assert!(
        !trust
            .get_key_set(v1::KeySetRequest {})
            .await
            .unwrap()
            .into_inner()
            .keys
            .is_empty()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_route_refuses_missing_or_wrong_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = custody_control::server::start(&config(dir.path()))
        .await
        .unwrap();
    let base = format!("http://{}", server.http_addr);
    let chain_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    tokio::task::spawn_blocking(move || {
        let routes_get = [
            "/v1/chains".to_owned(),
            "/v1/chains/stream".to_owned(),
            format!("/v1/chains/{chain_id}"),
            "/v1/blast-radius?principal=alice".to_owned(),
            "/v1/policies".to_owned(),
            "/v1/policies/status".to_owned(),
            "/v1/policies/p".to_owned(),
            "/v1/audit".to_owned(),
        ];
        let routes_post = [
            "/v1/policies",
            "/v1/contain/block-destination",
            "/v1/contain/revoke",
            "/v1/contain/quarantine",
        ];
        for (token, status) in [
            (None, 401),
            (Some("wrong-token-0123456789"), 401),
            (Some(NODE), 403),
        ] {
            let client = Client::new(&base, token.map(str::to_owned));
            let expect = |what: &str, r: Result<serde_json::Value, ClientError>| match r {
                Err(ClientError::Status { status: s, .. }) => assert_eq!(s, status, "{what}"),
                other => panic!("{what}: {other:?}"),
            };
            for path in &routes_get {
                expect(path, client.get(path, &[]));
            }
            for path in routes_post {
                expect(path, client.post(path, "application/json", "{}"));
            }
            expect("DELETE /v1/policies/p", client.delete("/v1/policies/p"));
        }
        // Metrics and health are open; they carry counts only.
        let open = Client::new(&base, None);
        assert!(open.get("/healthz", &[]).is_ok());
        assert!(open.get("/metrics", &[]).is_ok());
        // The admin token passes.
        let admin = Client::new(&base, Some(ADMIN.to_owned()));
        assert!(admin.get("/v1/chains", &[]).is_ok());
    })
    .await
    .unwrap();
    // Nothing changed.
    assert_eq!(server.shared.policy.current().version, 0);
    server.shutdown().await;
}

/// A refusal comes before the body is read: the server says it closes the
/// connection, so a keep-alive client does not send its next request on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_with_a_body_closes_its_connection() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let server = custody_control::server::start(&config(dir.path()))
        .await
        .unwrap();
    for token in [NODE, "wrong-token-0123456789"] {
        let mut conn = tokio::net::TcpStream::connect(server.http_addr)
            .await
            .unwrap();
        let body = "name: p\nrules: []\n";
        let request = format!(
            "POST /v1/policies HTTP/1.1\r\nhost: custody\r\nauthorization: Bearer {token}\r\n\
             content-type: application/yaml\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes()).await.unwrap();
        // The server closes after its answer, so reading to the end ends
        // (a connection kept open would stall here until the bound).
        let mut answer = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            conn.read_to_string(&mut answer),
        )
        .await
        .expect("the connection stays open after a refusal")
        .unwrap();
        let head = answer.to_ascii_lowercase();
        assert!(
            head.starts_with("http/1.1 401") || head.starts_with("http/1.1 403"),
            "{answer}"
        );
        assert!(head.contains("\r\nconnection: close\r\n"), "{answer}");
    }
    assert_eq!(server.shared.policy.current().version, 0);
    server.shutdown().await;
}
