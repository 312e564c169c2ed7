//! Tokens that must never be trusted: forged, tampered, expired, for another
//! audience, signed by a revoked key; and revoked principals.

use custody_context::issue::{Issuer, Mint};
use custody_context::keys::SigningKey;
use custody_context::token::InitiatorKind;
use custody_context::traceparent::TraceId;

use crate::support::*;

fn mint(issuer: &Issuer, now: u64) -> String {
    issuer
        .mint(
            Mint {
                txn: TraceId::random(),
                sub: "mallory".into(),
                kind: InitiatorKind::Human,
                scope: "s".into(),
                act: None,
                tctx: None,
                rctx: None,
                taint: vec![],
            },
            now,
        )
        .unwrap()
        .encoded
}

async fn send(addr: std::net::SocketAddr, token: &str) -> (u16, String) {
    let resp = client()
        .request(
            hyper::Request::get(format!("http://{addr}/x"))
                .header("txn-token", token)
                .header("x-custody-user", "mallory")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    body_string(resp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tokens_are_refused_with_their_reason() {
    let trust = Trust::new(&["edge", "svc"]);
    let app = App::ok().await;
    let mut spec = Spec::new("svc", app.addr);
    spec.extra_inbound = "  refuse_invalid_tokens: true";
    let sc = start(spec, &trust).await;
    let now = custody_context::unix_now();
    let edge_uri = uri_of("edge");

    let trusted = Issuer::new(trust.key("edge"), edge_uri.clone(), TD, 300);
    let forged = Issuer::new(SigningKey::generate(), edge_uri.clone(), TD, 300);
    let other_audience = Issuer::new(trust.key("edge"), edge_uri.clone(), "elsewhere", 300);
    let good = mint(&trusted, now);
    // Flip one character in the middle of the signature.
    let at = good.rfind('.').unwrap() + 20;
    let mut tampered = good.clone().into_bytes();
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();

    let cases = [
        (mint(&forged, now), "unknown_key_id"),
        (tampered, "bad_signature"),
        (mint(&trusted, now - 3600), "expired"),
        (mint(&other_audience, now), "wrong_audience"),
        ("not-a-token".to_owned(), "malformed"),
    ];
    for (token, reason) in &cases {
        let (status, body) = send(sc.inbound, token).await;
        assert_eq!(status, 401, "{reason}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["reason"], *reason);
    }
    // None reached the app; a valid token does.
    assert!(app.seen().is_empty());
    let (status, _) = send(sc.inbound, &good).await;
    assert_eq!(status, 200);
    let seen = app.seen()[0].token().unwrap();
    assert_eq!(seen["sub"], "mallory");

    let hops = sc.hops(cases.len() + 1).await;
    for (_, reason) in &cases {
        assert!(
            hops.iter().any(|h| h["refusal_reason"] == *reason
                && h["context_outcome"] == "CONTEXT_OUTCOME_REFUSED"
                && h["status"] == 401),
            "no hop refused for {reason}: {hops:#?}"
        );
        let sample =
            format!("custody_proxy_context_total{{outcome=\"refused\",reason=\"{reason}\"}}");
        assert_eq!(sc.metric(&sample).await, 1.0, "{sample}");
    }
}

/// Not refusing: the invalid token is dropped, never forwarded, and the
/// request is attributed to its peer in a new chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_token_passed_is_replaced_and_recorded() {
    let trust = Trust::new(&["svc"]);
    let app = App::ok().await;
    let sc = start(Spec::new("svc", app.addr), &trust).await;
    let forged = Issuer::new(SigningKey::generate(), uri_of("svc"), TD, 300);
    let token = mint(&forged, custody_context::unix_now());
    let resp = client()
        .request(
            hyper::Request::get(format!("http://{}/x", sc.inbound))
                .header("txn-token", &token)
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = app.seen()[0].clone();
    assert_ne!(seen.header("txn-token").unwrap(), token);
    let claims = seen.token().unwrap();
    assert_eq!(claims["sub"], "peer:127.0.0.1");
    let hop = &sc.hops(1).await[0];
    assert_eq!(hop["context_outcome"], "CONTEXT_OUTCOME_REFUSED");
    assert_eq!(hop["refusal_reason"], "unknown_key_id");
    assert_eq!(hop["attribution"]["method"], "ATTRIBUTION_METHOD_PEER_ONLY");
}
