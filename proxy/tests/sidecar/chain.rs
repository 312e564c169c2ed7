//! Chains across sidecars: propagation, extension, stitching.

use std::sync::Arc;

use hyper::Response;
use serde_json::Value;
use tokio::sync::Barrier;

use crate::support::*;

/// An app that calls `host` through `outbound`, forwarding the identity
/// headers or not, and answers with the downstream status.
async fn caller(outbound: std::net::SocketAddr, host: &'static str, forward: bool) -> App {
    App::start(Arc::new(move |req| {
        Box::pin(async move {
            let headers = req.headers().clone();
            let resp = call_out(outbound, host, forward.then_some(&headers)).await;
            Response::builder()
                .status(resp.status())
                .body(full("called"))
                .unwrap()
        })
    }))
    .await
}

fn by_direction<'a>(hops: &'a [Value], direction: &str) -> Vec<&'a Value> {
    hops.iter()
        .filter(|h| h["direction"] == format!("DIRECTION_{}", direction.to_uppercase()))
        .collect()
}

/// A → B → C; the apps forward `Txn-Token` and `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hops_share_one_txn_and_carry_req_wl() {
    let trust = Trust::new(&["a", "b", "c"]);
    let app_c = App::ok().await;
    let sc_c = start(Spec::new("c", app_c.addr), &trust).await;
    // B's app is created first with a placeholder outbound; its sidecar is built next.
    let mut spec_b = Spec::new("b", free_port());
    spec_b.upstreams = vec![("svc-c".into(), sc_c.inbound)];
    // Start B's sidecar knowing its outbound port before the app exists.
    let sc_b_pre = start_with_app_later(spec_b, &trust).await;
    let app_b = caller(sc_b_pre.1.outbound, "svc-c", true).await;
    let sc_b = sc_b_pre.0(app_b.addr).await;

    let mut spec_a = Spec::new("a", free_port());
    spec_a.upstreams = vec![("svc-b".into(), sc_b.inbound)];
    let sc_a_pre = start_with_app_later(spec_a, &trust).await;
    let app_a = caller(sc_a_pre.1.outbound, "svc-b", true).await;
    let sc_a = sc_a_pre.0(app_a.addr).await;

    let resp = client()
        .request(
            hyper::Request::get(format!("http://{}/start", sc_a.inbound))
                .header("x-custody-user", "alice@example.com")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let (ta, tb, tc) = (
        app_a.seen()[0].token().unwrap(),
        app_b.seen()[0].token().unwrap(),
        app_c.seen()[0].token().unwrap(),
    );
    assert_eq!(ta["sub"], "alice@example.com");
    assert_eq!(ta["custody"]["ini"], "human");
    assert_eq!(ta["txn"], tb["txn"]);
    assert_eq!(tb["txn"], tc["txn"]);
    assert_eq!(ta["req_wl"], uri_of("a"));
    assert_eq!(tb["req_wl"], uri_of("a"));
    assert_eq!(tc["req_wl"], format!("{},{}", uri_of("a"), uri_of("b")));
    // The W3C trace is the chain, and each hop is a new span.
    let txn = ta["txn"].as_str().unwrap().to_owned();
    let spans: Vec<String> = [&app_a, &app_b, &app_c]
        .iter()
        .map(|app| {
            let tp = app.seen()[0].header("traceparent").unwrap();
            assert_eq!(tp.split('-').nth(1).unwrap(), txn, "{tp}");
            tp.split('-').nth(2).unwrap().to_owned()
        })
        .collect();
    assert_ne!(spans[0], spans[1]);
    assert_ne!(spans[1], spans[2]);

    let hops_a = sc_a.hops(2).await;
    let hops_b = sc_b.hops(2).await;
    let hops_c = sc_c.hops(1).await;
    assert_eq!(
        by_direction(&hops_a, "inbound")[0]["context_outcome"],
        "CONTEXT_OUTCOME_MINTED"
    );
    assert_eq!(
        by_direction(&hops_a, "outbound")[0]["context_outcome"],
        "CONTEXT_OUTCOME_PROPAGATED"
    );
    assert_eq!(
        by_direction(&hops_b, "inbound")[0]["context_outcome"],
        "CONTEXT_OUTCOME_PROPAGATED"
    );
    let out_b = by_direction(&hops_b, "outbound")[0];
    assert_eq!(out_b["context_outcome"], "CONTEXT_OUTCOME_EXTENDED");
    assert_eq!(
        out_b["workloads"],
        serde_json::json!([uri_of("a"), uri_of("b")])
    );
    assert_eq!(out_b["egress"]["destination"]["host"], "svc-c");
    assert_eq!(out_b["egress"]["verdict"], "VERDICT_ALLOW");
    let in_c = by_direction(&hops_c, "inbound")[0];
    assert_eq!(in_c["peer"]["service_account"], "b");
    for hop in hops_a.iter().chain(&hops_b).chain(&hops_c) {
        assert_eq!(hop["chain_id"], txn.as_str());
        assert_eq!(hop["initiator"]["subject"], "alice@example.com");
    }
    // The outbound span of B is the parent of C's inbound span.
    assert_eq!(in_c["parent_span_id"], out_b["span_id"]);
    assert_eq!(sc_a.metric("custody_proxy_chains_started_total").await, 1.0);
}

/// Starts a sidecar whose app address is only known later: returns a
/// closure starting it, and the ports it will use.
pub(crate) async fn start_with_app_later<'a>(
    spec: Spec<'a>,
    trust: &'a Trust,
) -> (
    Box<
        dyn FnOnce(std::net::SocketAddr) -> std::pin::Pin<Box<dyn Future<Output = Proxy> + 'a>>
            + 'a,
    >,
    Ports,
) {
    let ports = [free_port(), free_port(), free_port()];
    let out = Ports { outbound: ports[1] };
    let starter = Box::new(move |app: std::net::SocketAddr| {
        let spec = Spec { app, ..spec };
        Box::pin(start_on(spec, trust, ports))
            as std::pin::Pin<Box<dyn Future<Output = Proxy> + 'a>>
    });
    (starter, out)
}

pub(crate) struct Ports {
    pub(crate) outbound: std::net::SocketAddr,
}

/// B does not forward headers: its outbound call is stitched to the inbound
/// request in flight, certain when alone, less sure under concurrency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_middle_service_is_stitched() {
    let trust = Trust::new(&["a", "b", "c"]);
    let app_c = App::ok().await;
    let sc_c = start(Spec::new("c", app_c.addr), &trust).await;
    let mut spec_b = Spec::new("b", free_port());
    spec_b.upstreams = vec![("svc-c".into(), sc_c.inbound)];
    let (start_b, ports_b) = start_with_app_later(spec_b, &trust).await;

    // Two barriers: both inbound requests are in flight before either calls
    // out, and both have called out before either answers.
    let before = Arc::new(Barrier::new(2));
    let after = Arc::new(Barrier::new(2));
    let concurrent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (b1, b2, conc) = (before.clone(), after.clone(), concurrent.clone());
    let outbound_b = ports_b.outbound;
    let app_b = App::start(Arc::new(move |_req| {
        let (b1, b2, conc) = (b1.clone(), b2.clone(), conc.clone());
        Box::pin(async move {
            let together = conc.load(std::sync::atomic::Ordering::SeqCst);
            if together {
                b1.wait().await;
            }
            let resp = call_out(outbound_b, "svc-c", None).await;
            if together {
                b2.wait().await;
            }
            Response::builder()
                .status(resp.status())
                .body(full(""))
                .unwrap()
        })
    }))
    .await;
    let sc_b = start_b(app_b.addr).await;

    // Alone: confidence 1, and C sees the chain the caller started.
    let resp = client()
        .request(
            hyper::Request::get(format!("http://{}/one", sc_b.inbound))
                .header("x-custody-user", "bob")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let tb = app_b.seen()[0].token().unwrap();
    let tc = app_c.seen()[0].token().unwrap();
    assert_eq!(tc["txn"], tb["txn"]);
    assert_eq!(tc["sub"], "bob");
    assert_eq!(tc["req_wl"], uri_of("b"));
    let hops = sc_b.hops(2).await;
    let out = by_direction(&hops, "outbound")[0];
    assert_eq!(out["context_outcome"], "CONTEXT_OUTCOME_STITCHED");
    assert_eq!(out["attribution"]["method"], "ATTRIBUTION_METHOD_STITCHED");
    assert_eq!(out["attribution"]["confidence"], 1.0);
    assert_eq!(out["chain_id"], tb["txn"]);

    // Two at once: each outbound call is a guess between two.
    concurrent.store(true, std::sync::atomic::Ordering::SeqCst);
    let send = |user: &'static str| {
        let inbound = sc_b.inbound;
        tokio::spawn(async move {
            client()
                .request(
                    hyper::Request::get(format!("http://{inbound}/two"))
                        .header("x-custody-user", user)
                        .body(full(""))
                        .unwrap(),
                )
                .await
                .unwrap()
                .status()
        })
    };
    let (r1, r2) = (send("carol"), send("dave"));
    assert_eq!(r1.await.unwrap(), 200);
    assert_eq!(r2.await.unwrap(), 200);
    let hops = sc_b.hops(6).await;
    let outs = by_direction(&hops, "outbound");
    assert_eq!(outs.len(), 3);
    for out in &outs[1..] {
        assert_eq!(out["context_outcome"], "CONTEXT_OUTCOME_STITCHED");
        let confidence = out["attribution"]["confidence"].as_f64().unwrap();
        assert!(confidence < 1.0, "{confidence}");
        assert_eq!(confidence, 0.5);
    }
    assert_eq!(
        sc_b.metric("custody_proxy_context_total{outcome=\"stitched\",reason=\"\"}")
            .await,
        3.0
    );
}
