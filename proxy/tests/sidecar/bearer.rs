//! A verified bearer JWT (issuer and JWKS configured) starts the chain with
//! its `sub`; a forged, expired or foreign one is not an identity.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::Signer;
use hyper::Request;

use crate::support::*;

fn jwt(key: &ed25519_dalek::SigningKey, kid: &str, claims: serde_json::Value) -> String {
    let header = serde_json::json!({ "alg": "EdDSA", "typ": "JWT", "kid": kid });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = key.sign(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_bearer_jwt_names_the_initiator() {
    let trust = Trust::new(&["api"]);
    let idp = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({ "keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": "idp-1", "alg": "EdDSA", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(idp.verifying_key().to_bytes()),
        }]})
        .to_string(),
    )
    .unwrap();
    let app = App::ok().await;
    let extra = format!(
        "    - {{ type: bearer_jwt, issuer: \"https://idp.test\", audience: custody, jwks_file: \"{}\" }}",
        jwks.display()
    );
    let mut spec = Spec::new("api", app.addr);
    spec.extra_inbound = &extra;
    let sc = start(spec, &trust).await;

    let now = custody_context::unix_now();
    let claims = |iss: &str, exp: u64| serde_json::json!({ "iss": iss, "sub": "olivia@example.com", "aud": "custody", "exp": exp });
    let good = jwt(&idp, "idp-1", claims("https://idp.test", now + 300));
    let cases = [
        (good.clone(), "olivia@example.com"),
        (
            jwt(&stranger, "idp-1", claims("https://idp.test", now + 300)),
            "peer:127.0.0.1",
        ),
        (
            jwt(&idp, "idp-1", claims("https://idp.test", now - 3600)),
            "peer:127.0.0.1",
        ),
        (
            jwt(&idp, "idp-1", claims("https://other.test", now + 300)),
            "peer:127.0.0.1",
        ),
        (
            jwt(&idp, "idp-2", claims("https://idp.test", now + 300)),
            "peer:127.0.0.1",
        ),
    ];
    for (i, (token, sub)) in cases.iter().enumerate() {
        let resp = client()
            .request(
                Request::get(format!("http://{}/x", sc.inbound))
                    .header("authorization", format!("Bearer {token}"))
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let seen = app.seen()[i].token().unwrap();
        assert_eq!(seen["sub"], *sub, "case {i}");
    }
    assert_eq!(app.seen()[0].token().unwrap()["custody"]["ini"], "human");
}
