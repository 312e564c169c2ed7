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
