use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use custody_testkit::service_account::{Issuer, KeyKind, Pod};
use serde_json::json;

use super::*;

const ISS: &str = "https://kubernetes.default.svc.cluster.local";

fn verifier(jwks: &Path) -> WorkloadVerifier {
    WorkloadVerifier::load(WorkloadAuthConfig {
        issuer: ISS.into(),
        jwks_file: jwks.to_owned(),
        audience: "custody".into(),
        leeway_secs: 5,
        trust_domain: None,
    })
    .unwrap()
}

fn now() -> u64 {
    custody_context::unix_now()
}

fn with_header(token: &str, header: &serde_json::Value) -> String {
    let mut parts = token.splitn(2, '.');
    let _ = parts.next();
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        parts.next().unwrap()
    )
}

#[test]
fn rs256_and_es256_tokens_prove_their_workload_and_nothing_else_does() {
    for kind in [KeyKind::Rsa, KeyKind::P256] {
        let issuer = Issuer::new(kind, ISS).unwrap();
        let v = verifier(&issuer.jwks_file());
        let web = Pod::new("shop", "web", "web-0");
        let id = v.verify(&issuer.token(&web, "custody", 600)).unwrap();
        assert_eq!(
            id,
            WorkloadIdentity {
                namespace: "shop".into(),
                service_account: "web".into(),
                pod: Some("web-0".into()),
            }
        );
        assert_eq!(id.subject(), "system:serviceaccount:shop:web");
        let claims = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = web.claims(ISS, "custody", now(), 600);
            f(&mut c);
            issuer.sign(&c)
        };
        let refused = |token: &str| v.verify(token).unwrap_err();
        assert_eq!(
            refused(&issuer.token(&web, "kubernetes", 600)),
            Refusal::WrongAudience
        );
        assert_eq!(
            refused(&claims(&|c| c["exp"] = json!(now() - 60))),
            Refusal::Expired
        );
        assert_eq!(
            refused(&claims(&|c| c["nbf"] = json!(now() + 600))),
            Refusal::NotYetValid
        );
        assert_eq!(
            refused(&claims(&|c| c["iss"] = json!("https://other.example"))),
            Refusal::WrongIssuer
        );
        assert_eq!(
            refused(&claims(
                &|c| c["sub"] = json!("system:serviceaccount:shop:admin")
            )),
            Refusal::Claims
        );
        assert_eq!(
            refused(&claims(&|c| {
                c.as_object_mut().unwrap().remove("kubernetes.io");
            })),
            Refusal::Claims
        );
        assert_eq!(
            refused(&claims(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
            Refusal::Claims
        );
        // Signed by another key under the same key id, or by a key not in
        // the set.
        let forger = Issuer::with_kid(kind, ISS, issuer.kid()).unwrap();
        assert_eq!(
            refused(&forger.token(&web, "custody", 600)),
            Refusal::BadSignature
        );
        let stranger = Issuer::new(kind, ISS).unwrap();
        assert_eq!(
            refused(&stranger.token(&web, "custody", 600)),
            Refusal::UnknownKeyId
        );
        // Unsigned, HMAC, or an algorithm the key is not for.
        let good = issuer.token(&web, "custody", 600);
        let body = good.rsplit_once('.').unwrap().0;
        let none = with_header(
            &format!("{body}."),
            &json!({"alg": "none", "typ": "JWT", "kid": issuer.kid()}),
        );
        assert_eq!(refused(&none), Refusal::DisallowedAlgorithm);
        let hs = with_header(&good, &json!({"alg": "HS256", "kid": issuer.kid()}));
        assert_eq!(refused(&hs), Refusal::DisallowedAlgorithm);
        let other_alg = if kind == KeyKind::Rsa {
            "ES256"
        } else {
            "RS256"
        };
        let swapped = with_header(&good, &json!({"alg": other_alg, "kid": issuer.kid()}));
        assert_eq!(refused(&swapped), Refusal::DisallowedAlgorithm);
        assert_eq!(refused("not-a-jwt"), Refusal::Malformed);
        assert_eq!(refused("a.b.c"), Refusal::Malformed);
    }
}

#[test]
fn a_token_permits_only_its_own_namespace_service_account_and_pod() {
    let id = WorkloadIdentity {
        namespace: "ns-a".into(),
        service_account: "sa-a".into(),
        pod: Some("pod-a".into()),
    };
    let w = |td: &str, ns: &str, sa: &str, pod: &str| v1::WorkloadId {
        trust_domain: td.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        pod: pod.into(),
    };
    assert!(id.permits(&w("td", "ns-a", "sa-a", "pod-a"), None).is_ok());
    assert!(
        id.permits(&w("td", "ns-a", "sa-a", "pod-a"), Some("td"))
            .is_ok()
    );
    let field =
        |claimed: v1::WorkloadId, td: Option<&str>| id.permits(&claimed, td).unwrap_err().field;
    assert_eq!(
        field(w("td", "ns-b", "sa-b", "pod-a"), None),
        "workload.namespace"
    );
    assert_eq!(
        field(w("td", "ns-a", "sa-b", "pod-a"), None),
        "workload.service_account"
    );
    assert_eq!(
        field(w("td", "ns-a", "sa-a", "pod-b"), None),
        "workload.pod"
    );
    assert_eq!(field(w("td", "ns-a", "sa-a", ""), None), "workload.pod");
    assert_eq!(
        field(w("other", "ns-a", "sa-a", "pod-a"), Some("td")),
        "workload.trust_domain"
    );
    // A token not bound to a pod permits any pod of its service account.
    let unbound = WorkloadIdentity { pod: None, ..id };
    assert!(
        unbound
            .permits(&w("td", "ns-a", "sa-a", "pod-z"), None)
            .is_ok()
    );
}

#[test]
fn unknown_key_ids_reload_the_jwks_at_most_every_interval() {
    let first = Issuer::new(KeyKind::P256, ISS).unwrap();
    let second = Issuer::new(KeyKind::P256, ISS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::copy(first.jwks_file(), &jwks).unwrap();
    let v = verifier(&jwks);
    let pod = Pod::new("shop", "web", "web-0");
    // The issuer rotated its key: the file changes.
    std::fs::copy(second.jwks_file(), &jwks).unwrap();
    assert_eq!(
        v.verify(&second.token(&pod, "custody", 600)),
        Err(Refusal::UnknownKeyId),
        "read less than an interval ago"
    );
    v.keys.mark_stale(); // as if RELOAD_INTERVAL had passed
    assert!(v.verify(&second.token(&pod, "custody", 600)).is_ok());
    assert_eq!(
        v.verify(&first.token(&pod, "custody", 600)),
        Err(Refusal::UnknownKeyId)
    );
}

#[test]
fn configuration_errors_name_the_field() {
    let base = WorkloadAuthConfig {
        issuer: ISS.into(),
        jwks_file: "/nonexistent".into(),
        audience: "custody".into(),
        leeway_secs: 60,
        trust_domain: None,
    };
    let field = |c: WorkloadAuthConfig| c.validate().unwrap_err().0;
    assert_eq!(
        field(WorkloadAuthConfig {
            issuer: String::new(),
            ..base.clone()
        }),
        "workload_auth.issuer"
    );
    assert_eq!(
        field(WorkloadAuthConfig {
            audience: String::new(),
            ..base.clone()
        }),
        "workload_auth.audience"
    );
    assert_eq!(
        field(WorkloadAuthConfig {
            trust_domain: Some(String::new()),
            ..base.clone()
        }),
        "workload_auth.trust_domain"
    );
    assert!(matches!(
        WorkloadVerifier::load(base),
        Err(JwksError::Read { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("jwks.json");
    std::fs::write(&empty, r#"{"keys": []}"#).unwrap();
    assert!(matches!(
        WorkloadVerifier::load(WorkloadAuthConfig {
            issuer: ISS.into(),
            jwks_file: empty,
            audience: "custody".into(),
            leeway_secs: 60,
            trust_domain: None,
        }),
        Err(JwksError::Parse { .. })
    ));
}
