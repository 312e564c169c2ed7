//! MCP tool calls: the agent named in `params._meta` starts the chain or acts
//! for the person the edge named, and the tool name is the hop's operation.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::{Request, Response};

use crate::support::*;

const CALL: &str = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search_orders","arguments":{"q":"late"},"_meta":{"agent":"research-agent"}}}"#;

async fn echo_app() -> App {
    App::start(Arc::new(|req: Request<hyper::body::Incoming>| {
        Box::pin(async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(full(body))
        })
    }))
    .await
}

async fn post(addr: std::net::SocketAddr, user: Option<&str>) -> (u16, String) {
    let mut req = Request::post(format!("http://{addr}/mcp"))
        .header("content-type", "application/json")
        .header("content-length", CALL.len());
    if let Some(user) = user {
        req = req.header("x-custody-user", user);
    }
    let resp = client()
        .request(req.body(full(CALL)).unwrap())
        .await
        .unwrap();
    body_string(resp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_tool_call_names_the_agent_and_the_operation() {
    let trust = Trust::new(&["tools"]);
    let app = echo_app().await;
    let sc = start(Spec::new("tools", app.addr), &trust).await;

    // The agent alone starts the chain; the body reaches the app intact.
    assert_eq!(post(sc.inbound, None).await, (200, CALL.to_owned()));
    let claims = app.seen()[0].token().unwrap();
    assert_eq!(claims["sub"], "research-agent");
    assert_eq!(claims["custody"]["ini"], "agent");
    assert!(claims.get("act").is_none());

    // A person named at the edge, and the agent acting for her.
    assert_eq!(
        post(sc.inbound, Some("alice@example.com")).await,
        (200, CALL.to_owned())
    );
    let claims = app.seen()[1].token().unwrap();
    assert_eq!(claims["sub"], "alice@example.com");
    assert_eq!(claims["custody"]["ini"], "human");
    assert_eq!(claims["act"]["sub"], "research-agent");

    let hops = sc.hops(2).await;
    for hop in &hops {
        assert_eq!(hop["operation"], "search_orders");
        assert_eq!(hop["bytes_in"], CALL.len());
    }
    assert_eq!(
        hops[1]["initiator"]["actors"],
        serde_json::json!(["research-agent"])
    );
}

/// An assistant acting for alice calls a sub-agent's tool, forwarding the
/// chain: the sub-agent becomes the current actor, the assistant nests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_within_a_chain_records_the_delegation() {
    let trust = Trust::new(&["assistant", "tools"]);
    let tools_app = echo_app().await;
    let tools = start(Spec::new("tools", tools_app.addr), &trust).await;

    // The assistant's sidecar starts alice's chain with the assistant acting.
    let assistant_app = echo_app().await;
    let assistant = start(Spec::new("assistant", assistant_app.addr), &trust).await;
    let first = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"plan","_meta":{"agent":"assistant-agent"}}}"#;
    let resp = client()
        .request(
            Request::post(format!("http://{}/mcp", assistant.inbound))
                .header("content-type", "application/json")
                .header("content-length", first.len())
                .header("x-custody-user", "alice@example.com")
                .body(full(first))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = &assistant_app.seen()[0];
    let token = seen.header("txn-token").unwrap();
    assert_eq!(seen.token().unwrap()["act"]["sub"], "assistant-agent");

    // It delegates to the research agent, forwarding the chain.
    let resp = client()
        .request(
            Request::post(format!("http://{}/mcp", tools.inbound))
                .header("content-type", "application/json")
                .header("content-length", CALL.len())
                .header("txn-token", token)
                .body(full(CALL))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(body_string(resp).await, (200, CALL.to_owned()));
    let claims = tools_app.seen()[0].token().unwrap();
    assert_eq!(claims["sub"], "alice@example.com");
    assert_eq!(claims["act"]["sub"], "research-agent");
    assert_eq!(claims["act"]["act"]["sub"], "assistant-agent");
    let hop = tools.wait_hop(|h| h["operation"] == "search_orders").await;
    assert_eq!(
        hop["initiator"]["actors"],
        serde_json::json!(["research-agent", "assistant-agent"])
    );
    assert_eq!(hop["context_outcome"], "CONTEXT_OUTCOME_EXTENDED");

    // The same agent calling again within its own delegation changes nothing.
    let delegated = tools_app.seen()[0].header("txn-token").unwrap();
    let resp = client()
        .request(
            Request::post(format!("http://{}/mcp", tools.inbound))
                .header("content-type", "application/json")
                .header("content-length", CALL.len())
                .header("txn-token", delegated)
                .body(full(CALL))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let again = tools_app.seen()[1].token().unwrap();
    assert_eq!(again["act"]["act"]["sub"], "assistant-agent");
    assert!(again["act"]["act"].get("act").is_none());
}
