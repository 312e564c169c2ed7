//! gRPC through the sidecar: unary, bidirectional streaming, status codes in
//! hop events, and an egress block answered as `PERMISSION_DENIED`.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::support::*;

#[allow(clippy::all, missing_docs, unreachable_pub)]
mod echo {
    tonic::include_proto!("echo");
}

use echo::Msg;
use echo::echo_client::EchoClient;
use echo::echo_server::{Echo, EchoServer};

#[derive(Default)]
struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<Msg>) -> Result<Response<Msg>, Status> {
        let token = request
            .metadata()
            .get("txn-token")
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        let text = request.into_inner().text;
        if text == "missing" {
            return Err(Status::not_found("no such thing"));
        }
        let sub = if token.is_empty() {
            String::new()
        } else {
            claims(&token)["sub"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        Ok(Response::new(Msg {
            text: format!("{text} for {sub}"),
        }))
    }

    type ChatStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

    async fn chat(
        &self,
        request: Request<Streaming<Msg>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let inbound = request.into_inner();
        let out = inbound.map(|m| {
            m.map(|m| Msg {
                text: format!("echo {}", m.text),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

async fn start_grpc_app() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service =
                    hyper_util::service::TowerToHyperService::new(EchoServer::new(EchoService));
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .http2_only()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    addr
}

async fn channel(addr: std::net::SocketAddr, authority: Option<&str>) -> tonic::transport::Channel {
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    if let Some(authority) = authority {
        endpoint = endpoint.origin(format!("http://{authority}").parse().unwrap());
    }
    endpoint.connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_bidi_streaming_through_the_sidecar() {
    let trust = Trust::new(&["svc"]);
    let app = start_grpc_app().await;
    let sc = start(Spec::new("svc", app), &trust).await;
    let mut client = EchoClient::new(channel(sc.inbound, None).await);

    let mut req = Request::new(Msg {
        text: "hello".into(),
    });
    req.metadata_mut()
        .insert("x-custody-user", "grace".parse().unwrap());
    let resp = client.unary(req).await.unwrap();
    assert_eq!(resp.into_inner().text, "hello for grace");

    let err = client
        .unary(Request::new(Msg {
            text: "missing".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let outgoing = tokio_stream::iter(["a", "b", "c"].map(|t| Msg { text: t.into() }));
    let mut replies = client.chat(outgoing).await.unwrap().into_inner();
    let mut texts = vec![];
    while let Some(m) = replies.next().await {
        texts.push(m.unwrap().text);
    }
    assert_eq!(texts, ["echo a", "echo b", "echo c"]);

    let hops = sc.hops(3).await;
    assert!(hops.iter().all(|h| h["protocol"] == "PROTOCOL_GRPC"));
    assert_eq!(hops[0]["operation"], "/echo.Echo/Unary");
    assert_eq!(hops[0]["status"], 0);
    assert_eq!(hops[0]["initiator"]["subject"], "grace");
    assert_eq!(hops[1]["status"], 5);
    assert_eq!(hops[2]["operation"], "/echo.Echo/Chat");
    assert_eq!(hops[2]["status"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_egress_block_is_permission_denied() {
    let trust = Trust::new(&["svc"]);
    let app = start_grpc_app().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        r#"
version: 7
defaultVerdict: allow
policies:
  - apiVersion: custody.dev/v1
    kind: EgressPolicy
    metadata: { name: no-grpc-partner }
    spec:
      rules:
        - name: partner-grpc
          destination: { hosts: ["grpc.partner.example"] }
          verdict: block
"#,
    )
    .unwrap();
    let extra = format!("policy: {{ file: \"{}\" }}", policy.display());
    let mut spec = Spec::new("svc", free_port());
    spec.upstreams = vec![
        ("grpc.partner.example".into(), app),
        ("grpc.allowed.example".into(), app),
    ];
    spec.extra = &extra;
    let sc = start(spec, &trust).await;

    let mut allowed = EchoClient::new(channel(sc.outbound, Some("grpc.allowed.example")).await);
    let ok = allowed
        .unary(Request::new(Msg { text: "hi".into() }))
        .await
        .unwrap();
    // The sidecar started the chain for its own workload.
    assert_eq!(ok.into_inner().text, format!("hi for {}", uri_of("svc")));

    let mut blocked = EchoClient::new(channel(sc.outbound, Some("grpc.partner.example")).await);
    let err = blocked
        .unary(Request::new(Msg {
            text: "secret".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("no-grpc-partner"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("partner-grpc"), "{}", err.message());
    let hops = sc.hops(2).await;
    assert_eq!(hops[1]["status"], 7);
    assert_eq!(hops[1]["egress"]["verdict"], "VERDICT_BLOCK");
}
