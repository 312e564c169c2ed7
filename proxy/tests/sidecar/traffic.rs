//! Traffic through the sidecar: HTTP/2 by prior knowledge, large streamed
//! bodies, the admin endpoints.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use sha2::{Digest, Sha256};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_passes_through_with_context() {
    let trust = Trust::new(&["svc"]);
    let app = App::ok().await;
    let sc = start(Spec::new("svc", app.addr), &trust).await;
    let resp = h2_client()
        .request(
            Request::get(format!("http://{}/h2", sc.inbound))
                .header("x-custody-agent", "planner-agent")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(body_string(resp).await, (200, "ok".to_owned()));
    let seen = &app.seen()[0];
    assert_eq!(seen.version, hyper::Version::HTTP_2);
    let claims = seen.token().unwrap();
    assert_eq!(claims["sub"], "planner-agent");
    assert_eq!(claims["custody"]["ini"], "agent");
    let hop = &sc.hops(1).await[0];
    assert_eq!(hop["protocol"], "PROTOCOL_HTTP2");
    assert_eq!(hop["operation"], "GET /h2");
    assert_eq!(
        sc.metric("custody_proxy_requests_total{direction=\"inbound\",protocol=\"http2\",status_class=\"2xx\"}")
            .await,
        1.0
    );
}

const MIB: usize = 1024 * 1024;

fn pattern_stream(
    total: usize,
) -> impl tokio_stream::Stream<Item = Result<Frame<Bytes>, hyper::Error>> + Send {
    let chunk: Bytes = (0..64 * 1024)
        .map(|i| (i * 31 % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    tokio_stream::iter((0..total / chunk.len()).map(move |i| {
        let mut c = chunk.to_vec();
        c[0] = i as u8;
        Ok(Frame::data(Bytes::from(c)))
    }))
}

fn pattern_digest(total: usize) -> String {
    let mut h = Sha256::new();
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    for i in 0..total / chunk.len() {
        let mut c = chunk.clone();
        c[0] = i as u8;
        h.update(&c);
    }
    hex::encode(h.finalize())
}

/// 64 MiB up and 64 MiB down through the sidecar, streamed, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_streamed_bodies_are_intact() {
    let total = 64 * MIB;
    let trust = Trust::new(&["svc"]);
    let app = App::start(Arc::new(move |req: Request<hyper::body::Incoming>| {
        Box::pin(async move {
            if req.uri().path() == "/upload" {
                let mut h = Sha256::new();
                let mut body = req.into_body();
                let mut n = 0usize;
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        n += data.len();
                        h.update(&data);
                    }
                }
                Response::new(full(format!("{n} {}", hex::encode(h.finalize()))))
            } else {
                Response::new(StreamBody::new(pattern_stream(total)).boxed())
            }
        })
    }))
    .await;
    let sc = start(Spec::new("svc", app.addr), &trust).await;

    let upload = Request::post(format!("http://{}/upload", sc.inbound))
        .body(StreamBody::new(pattern_stream(total)).boxed())
        .unwrap();
    let resp = client().request(upload).await.unwrap();
    let (status, body) = body_string(resp).await;
    assert_eq!(status, 200);
    assert_eq!(body, format!("{total} {}", pattern_digest(total)));

    let resp = client()
        .request(
            Request::get(format!("http://{}/download", sc.inbound))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut h = Sha256::new();
    let mut n = 0usize;
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len();
            h.update(&data);
        }
    }
    assert_eq!(n, total);
    assert_eq!(hex::encode(h.finalize()), pattern_digest(total));

    let hops = sc.hops(2).await;
    assert_eq!(hops[0]["bytes_in"], total as u64);
    assert_eq!(hops[1]["bytes_out"], total as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_serves_health_metrics_policy_and_keys() {
    let trust = Trust::new(&["svc"]);
    let app = App::ok().await;
    let sc = start(Spec::new("svc", app.addr), &trust).await;
    assert_eq!(sc.admin_get("/live").await.0, 200);
    assert_eq!(sc.admin_get("/ready").await.0, 200);
    assert_eq!(sc.admin_get("/nope").await.0, 404);
    let (_, metrics) = sc.admin_get("/metrics").await;
    for name in [
        "custody_proxy_chains_started_total",
        "custody_proxy_exporter_queue_depth",
        "custody_proxy_exporter_dropped_total",
        "custody_proxy_policy_version",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let (_, keys) = sc.admin_get("/keys").await;
    let keys: serde_json::Value = serde_json::from_str(&keys).unwrap();
    assert_eq!(keys["keys"][0]["kid"], trust.key("svc").kid());
    assert_eq!(keys["keys"][0]["workload"], uri_of("svc"));
    let (_, policy) = sc.admin_get("/policy").await;
    let policy: serde_json::Value = serde_json::from_str(&policy).unwrap();
    assert_eq!(policy["version"], 0);
    assert_eq!(policy["defaultVerdict"], "allow");
}

/// An HTTP/1.1 upgrade (WebSocket handshake) passes through, and the
/// upgraded stream carries bytes both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_pass_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let trust = Trust::new(&["svc"]);
    let app = App::start(Arc::new(|mut req: Request<hyper::body::Incoming>| {
        Box::pin(async move {
            tokio::spawn(async move {
                let upgraded = hyper::upgrade::on(&mut req).await.unwrap();
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let mut buf = [0u8; 4];
                io.read_exact(&mut buf).await.unwrap();
                io.write_all(&buf).await.unwrap();
                io.write_all(b"!").await.unwrap();
                io.shutdown().await.unwrap();
            });
            Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(full(""))
                .unwrap()
        })
    }))
    .await;
    let sc = start(Spec::new("svc", app.addr), &trust).await;

    let stream = tokio::net::TcpStream::connect(sc.inbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn.with_upgrades());
    let resp = sender
        .send_request(
            Request::get("/ws")
                .header("host", "svc")
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .header("x-custody-user", "kim")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    io.write_all(b"ping").await.unwrap();
    let mut back = Vec::new();
    io.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"ping!");
    assert_eq!(app.seen()[0].token().unwrap()["sub"], "kim");
}
