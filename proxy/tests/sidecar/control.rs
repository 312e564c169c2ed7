//! The control plane's side: policy and keys pushed over
//! `PolicyDistribution.Subscribe`, acknowledged, persisted; hops reported to
//! `Ingest.ReportHops`. The control plane is a small tonic server here.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use custody_context::api::v1;
use custody_context::issue::{Issuer, Mint};
use custody_context::keys::KeySet;
use custody_context::token::InitiatorKind;
use custody_context::traceparent::TraceId;
use hyper::Request;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status};
use v1::ingest_server::{Ingest, IngestServer};
use v1::policy_distribution_server::{PolicyDistribution, PolicyDistributionServer};

use crate::support::*;

type Updates = mpsc::Sender<Result<v1::PolicyUpdate, Status>>;

#[derive(Clone, Default)]
struct Fake {
    subscriptions: Arc<Mutex<Vec<(v1::SubscribeRequest, Updates)>>>,
    acks: Arc<Mutex<Vec<v1::PolicyAck>>>,
    hops: Arc<Mutex<Vec<v1::HopEvent>>>,
}

#[tonic::async_trait]
impl PolicyDistribution for Fake {
    type SubscribeStream = ReceiverStream<Result<v1::PolicyUpdate, Status>>;

    async fn subscribe(
        &self,
        request: tonic::Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        self.subscriptions
            .lock()
            .unwrap()
            .push((request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn acknowledge(
        &self,
        request: tonic::Request<v1::PolicyAck>,
    ) -> Result<Response<v1::AckReceipt>, Status> {
        self.acks.lock().unwrap().push(request.into_inner());
        Ok(Response::new(v1::AckReceipt {}))
    }
}

#[tonic::async_trait]
impl Ingest for Fake {
    async fn report_hops(
        &self,
        request: tonic::Request<v1::HopBatch>,
    ) -> Result<Response<v1::BatchAck>, Status> {
        let hops = request.into_inner().hops;
        let accepted = hops.len() as u32;
        self.hops.lock().unwrap().extend(hops);
        Ok(Response::new(v1::BatchAck {
            accepted,
            duplicates: 0,
            rejected: 0,
        }))
    }

    async fn report_flows(
        &self,
        _request: tonic::Request<v1::FlowBatch>,
    ) -> Result<Response<v1::BatchAck>, Status> {
        Ok(Response::new(v1::BatchAck::default()))
    }
}

async fn serve<S>(service: S) -> SocketAddr
where
    S: tonic::codegen::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
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

async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn block_exfil(version: u64) -> v1::PolicyBundle {
    v1::PolicyBundle {
        version,
        policies: vec![v1::EgressPolicy {
            name: "no-exfil".into(),
            rules: vec![v1::Rule {
                name: "exfil-hosts".into(),
                destination: Some(v1::DestinationMatch {
                    hosts: vec!["*.exfil.example".into()],
                    cidrs: vec![],
                    ports: vec![],
                }),
                chain: None,
                verdict: v1::Verdict::Block as i32,
            }],
        }],
        default_verdict: v1::Verdict::Allow as i32,
        revocations: None,
    }
}

fn sidecar_yaml(
    trust: &Trust,
    dir: &std::path::Path,
    app: SocketAddr,
    exfil: SocketAddr,
    policy_cp: SocketAddr,
    ingest_cp: SocketAddr,
    ports: [SocketAddr; 3],
) -> String {
    let mut spec = Spec::new("svc", app);
    spec.upstreams = vec![("data.exfil.example".into(), exfil)];
    spec.extra_inbound = "  refuse_invalid_tokens: true";
    let state = dir.join("state");
    let policy = format!(
        "policy: {{ control_plane: \"http://{policy_cp}\", state_dir: \"{}\" }}",
        state.display()
    );
    spec.extra = &policy;
    config_yaml(&spec, trust, dir, ports)
        .lines()
        .map(|l| {
            if l.starts_with("exporter:") {
                format!(
                    "exporter: {{ control_plane: \"http://{ingest_cp}\", flush_interval_ms: 20 }}"
                )
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn get(addr: SocketAddr, host: &str, token: Option<&str>) -> (u16, String) {
    let mut req = Request::get(format!("http://{addr}/x")).header("host", host);
    if let Some(token) = token {
        req = req.header("txn-token", token);
    }
    let resp = client().request(req.body(full("")).unwrap()).await.unwrap();
    body_string(resp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_keys_stream_from_the_control_plane() {
    let trust = Trust::new(&["svc", "edge"]);
    let fake = Fake::default();
    let policy_cp = serve(PolicyDistributionServer::new(fake.clone())).await;
    let ingest_cp = serve(IngestServer::new(fake.clone())).await;
    let app = App::ok().await;
    let exfil = App::ok().await;
    let dir = tempfile::tempdir().unwrap();

    // The sidecar trusts only its own key at first: the key-set file comes
    // from the control plane in this deployment.
    let ports = [free_port(), free_port(), free_port()];
    let yaml = sidecar_yaml(
        &trust,
        dir.path(),
        app.addr,
        exfil.addr,
        policy_cp,
        ingest_cp,
        ports,
    )
    .lines()
    .filter(|l| !l.starts_with("trust:"))
    .collect::<Vec<_>>()
    .join("\n");
    let config = custody_proxy::Config::from_yaml(&yaml).unwrap();
    let running = custody_proxy::Sidecar::build(config).unwrap().spawn();
    let (inbound, outbound) = (ports[0], ports[1]);

    let tx = eventually("a subscription", || {
        let subs = fake.subscriptions.lock().unwrap();
        subs.first().map(|(req, tx)| {
            assert_eq!(req.client_kind, "proxy");
            assert_eq!(req.have_version, 0);
            assert_eq!(req.workload.as_ref().unwrap().service_account, "svc");
            tx.clone()
        })
    })
    .await;
    while tokio::net::TcpStream::connect(outbound).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let edge = Issuer::new(trust.key("edge"), uri_of("edge"), TD, 300);
    let token = edge
        .mint(
            Mint {
                txn: TraceId::random(),
                sub: "frank".into(),
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
    let (status, body) = get(inbound, "svc", Some(&token)).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unknown_key_id"));
    assert_eq!(get(outbound, "data.exfil.example", None).await.0, 200);

    // Version 5: a block, and a key set naming the edge's key.
    let mut keys = KeySet::new();
    keys.set_version(2);
    keys.insert(trust.key("edge").public_key().bound_to(uri_of("edge")))
        .unwrap();
    tx.send(Ok(v1::PolicyUpdate {
        policy: Some(block_exfil(5)),
        keys: Some(v1::KeySet::from(&keys)),
        sent_unix_nanos: 0,
    }))
    .await
    .unwrap();
    let ack = eventually("ack of version 5", || {
        fake.acks
            .lock()
            .unwrap()
            .iter()
            .find(|a| a.version == 5)
            .cloned()
    })
    .await;
    assert_eq!(ack.error, "");
    assert_eq!(ack.workload.unwrap().service_account, "svc");

    let (status, body) = get(outbound, "data.exfil.example", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no-exfil"));
    assert_eq!(get(inbound, "svc", Some(&token)).await.0, 200);
    assert_eq!(app.seen().last().unwrap().token().unwrap()["sub"], "frank");

    // An invalid update is refused with its reason; version 5 stays.
    let mut bad = block_exfil(6);
    bad.default_verdict = v1::Verdict::Unspecified as i32;
    tx.send(Ok(v1::PolicyUpdate {
        policy: Some(bad),
        keys: None,
        sent_unix_nanos: 0,
    }))
    .await
    .unwrap();
    let nack = eventually("ack of version 6", || {
        fake.acks
            .lock()
            .unwrap()
            .iter()
            .find(|a| a.version == 6)
            .cloned()
    })
    .await;
    assert!(nack.error.contains("defaultVerdict"), "{}", nack.error);
    assert_eq!(get(outbound, "data.exfil.example", None).await.0, 403);

    // Hops reach the control plane, the block among them.
    eventually("the block hop at the control plane", || {
        fake.hops
            .lock()
            .unwrap()
            .iter()
            .find(|h| h.egress.as_ref().is_some_and(|e| e.policy == "no-exfil"))
            .cloned()
    })
    .await;
    running.stop();

    // Restarted with the control plane gone, the persisted policy holds.
    let ports = [free_port(), free_port(), free_port()];
    let yaml = sidecar_yaml(
        &trust,
        dir.path(),
        app.addr,
        exfil.addr,
        free_port(),
        free_port(),
        ports,
    );
    let config = custody_proxy::Config::from_yaml(&yaml).unwrap();
    let running = custody_proxy::Sidecar::build(config).unwrap().spawn();
    while tokio::net::TcpStream::connect(ports[1]).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = get(ports[1], "data.exfil.example", None).await;
    assert_eq!(status, 403, "{body}");
    running.stop();
}
