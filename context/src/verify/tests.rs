use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use super::*;
use crate::issue::{Extension, IssueError, Issuer, Mint};
use crate::keys::{KeySet, SigningKey};
use crate::token::{AttributionMethod, HopAttribution, InitiatorKind};
use crate::traceparent::TraceId;

const NOW: u64 = 1_700_000_000;
const TD: &str = "cluster.local";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const DB: &str = "spiffe://cluster.local/ns/data/sa/postgres";

struct Mesh {
    web: Issuer,
    orders: Issuer,
    db: Issuer,
    keys: KeySet,
}

fn key(kid: &str, seed: u8) -> SigningKey {
    SigningKey::from_seed(kid, &[seed; 32])
}

fn mesh() -> Mesh {
    let mut keys = KeySet::new();
    let mut issuer = |kid: &str, seed: u8, wl: &str| {
        let k = key(kid, seed);
        keys.insert(k.public_key().bound_to(wl)).unwrap();
        Issuer::new(k, wl, TD, 300)
    };
    let web = issuer("web-1", 1, WEB);
    let orders = issuer("orders-1", 2, ORDERS);
    let db = issuer("db-1", 3, DB);
    Mesh {
        web,
        orders,
        db,
        keys,
    }
}

fn verifier(keys: &KeySet) -> Verifier {
    Verifier::new(VerifierConfig::new(TD), keys.clone())
}

fn mint_request() -> Mint {
    Mint {
        txn: "4bf92f3577b34da6a3ce929d0e0e4736".parse().unwrap(),
        sub: "alice@example.com".into(),
        kind: InitiatorKind::Human,
        scope: "orders.read".into(),
        act: None,
        tctx: Some(json!({"tenant": "acme"}).as_object().unwrap().clone()),
        rctx: Some(crate::token::RequestContext {
            req_ip: Some("203.0.113.7".into()),
            authn: Some("jwt".into()),
        }),
        taint: vec![],
    }
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// Signs arbitrary header and claims with `key`: tokens a verifier must
/// judge on their content, not on their signature.
fn forge(header: serde_json::Value, claims: serde_json::Value, key: &SigningKey) -> String {
    let input = format!("{}.{}", b64(&header), b64(&claims));
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn header(kid: &str) -> serde_json::Value {
    json!({"alg": "EdDSA", "typ": "txntoken+jwt", "kid": kid})
}

fn claims() -> serde_json::Value {
    json!({
        "iat": NOW, "exp": NOW + 300, "aud": TD,
        "txn": "4bf92f3577b34da6a3ce929d0e0e4736",
        "sub": "alice@example.com", "scope": "orders.read",
        "req_wl": WEB,
        "custody": {"v": 1, "ini": "human", "att": [{"method": "minted", "confidence": 1.0}]}
    })
}

fn refused(verifier: &Verifier, token: &str, now: u64) -> VerifyError {
    verifier
        .verify(token, now)
        .expect_err("token must be refused")
}

#[test]
fn minted_token_round_trips() {
    let m = mesh();
    let minted = m.web.mint(mint_request(), NOW).unwrap();
    let verified = verifier(&m.keys).verify(&minted.encoded, NOW).unwrap();
    assert_eq!(verified.claims, minted.claims);
    assert_eq!(verified.kid, "web-1");
    assert_eq!(verified.digest, minted.digest());
    assert_eq!(verified.claims.req_wl, vec![WEB]);
    assert_eq!(verified.claims.custody.att, vec![HopAttribution::MINTED]);
    assert_eq!(verified.claims.exp, NOW + 300);
    assert_eq!(verified.claims.iss.as_deref(), Some(WEB));
}

#[test]
fn forged_claims_with_a_valid_layout_verify() {
    // The forge helper itself is sound: a well-formed token passes.
    let m = mesh();
    let token = forge(header("web-1"), claims(), &key("web-1", 1));
    assert!(verifier(&m.keys).verify(&token, NOW).is_ok());
}

#[test]
fn refuses_malformed_tokens_with_the_exact_defect() {
    let m = mesh();
    let v = verifier(&m.keys);
    let k = key("web-1", 1);
    let good = forge(header("web-1"), claims(), &k);
    let (h, rest) = good.split_once('.').unwrap();
    let (c, s) = rest.split_once('.').unwrap();
    let cases: Vec<(String, Malformed)> = vec![
        (String::new(), Malformed::Structure),
        ("a.b".into(), Malformed::Structure),
        (format!("{h}.{c}.{s}.x"), Malformed::Structure),
        (format!("{h}..{s}"), Malformed::Structure),
        (format!("{h}.{c}."), Malformed::Structure),
        (format!("!!.{c}.{s}"), Malformed::Base64),
        (
            format!("{}.{c}.{s}", URL_SAFE_NO_PAD.encode("not json")),
            Malformed::Header,
        ),
        (
            forge(json!({"alg": "EdDSA", "typ": "txntoken+jwt"}), claims(), &k),
            Malformed::MissingKeyId,
        ),
        (
            forge(
                json!({"alg": "EdDSA", "typ": "txntoken+jwt", "kid": "web-1", "crit": ["exp"]}),
                claims(),
                &k,
            ),
            Malformed::CriticalHeader,
        ),
        (
            format!("{h}.{c}.{}", URL_SAFE_NO_PAD.encode([1u8; 10])),
            Malformed::SignatureLength,
        ),
        (format!("{h}.{c}.%%%"), Malformed::SignatureLength),
        (forge(header("web-1"), json!({}), &k), Malformed::Claims),
        (
            forge(header("web-1"), json!("claims"), &k),
            Malformed::Claims,
        ),
        (
            forge(
                header("web-1"),
                {
                    let mut c = claims();
                    c["txn"] = json!("00000000000000000000000000000000");
                    c
                },
                &k,
            ),
            Malformed::Claims,
        ),
        (
            forge(
                header("web-1"),
                {
                    let mut c = claims();
                    c["custody"]["v"] = json!(2);
                    c
                },
                &k,
            ),
            Malformed::ClaimsVersion,
        ),
        (
            forge(
                header("web-1"),
                {
                    let mut c = claims();
                    c["req_wl"] = json!(format!("{WEB},{ORDERS}"));
                    c
                },
                &k,
            ),
            Malformed::Workloads,
        ),
        (
            forge(
                header("web-1"),
                {
                    let mut c = claims();
                    c["req_wl"] = json!("");
                    c["custody"]["att"] = json!([]);
                    c
                },
                &k,
            ),
            Malformed::Workloads,
        ),
        (
            forge(
                header("web-1"),
                {
                    let mut c = claims();
                    c["exp"] = json!(NOW - 1);
                    c
                },
                &k,
            ),
            Malformed::Lifetime,
        ),
    ];
    for (token, expected) in cases {
        assert_eq!(
            refused(&v, &token, NOW),
            VerifyError::Malformed(expected),
            "token {token:?}"
        );
    }
}

#[test]
fn refuses_oversized_tokens_before_parsing() {
    let m = mesh();
    let v = verifier(&m.keys);
    let huge = "a".repeat(DEFAULT_MAX_TOKEN_BYTES + 1);
    assert_eq!(refused(&v, &huge, NOW), VerifyError::Oversized);
    // A genuine token over a tighter limit is refused too.
    let minted = m.web.mint(mint_request(), NOW).unwrap();
    let mut config = VerifierConfig::new(TD);
    config.max_token_bytes = minted.encoded.len() - 1;
    let tight = Verifier::new(config, m.keys.clone());
    assert_eq!(
        refused(&tight, &minted.encoded, NOW),
        VerifyError::Oversized
    );
}

#[test]
fn refuses_any_algorithm_but_the_configured_one() {
    let m = mesh();
    let v = verifier(&m.keys);
    let k = key("web-1", 1);
    for alg in ["none", "HS256", "RS256", "ES256", "eddsa", "Ed25519", ""] {
        let token = forge(
            json!({"alg": alg, "typ": "txntoken+jwt", "kid": "web-1"}),
            claims(),
            &k,
        );
        assert_eq!(
            refused(&v, &token, NOW),
            VerifyError::DisallowedAlgorithm,
            "{alg}"
        );
    }
    // `alg: none` with an empty signature: refused before any key is used.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "txntoken+jwt", "kid": "web-1"})),
        b64(&claims())
    );
    assert!(v.verify(&none, NOW).is_err());
}

#[test]
fn refuses_tokens_of_another_type() {
    let m = mesh();
    let v = verifier(&m.keys);
    let k = key("web-1", 1);
    for typ in [json!("JWT"), json!("at+jwt"), json!(null)] {
        let token = forge(
            json!({"alg": "EdDSA", "typ": typ, "kid": "web-1"}),
            claims(),
            &k,
        );
        assert_eq!(refused(&v, &token, NOW), VerifyError::WrongType, "{typ}");
    }
    for typ in ["TxnToken+JWT", "application/txntoken+jwt"] {
        let token = forge(
            json!({"alg": "EdDSA", "typ": typ, "kid": "web-1"}),
            claims(),
            &k,
        );
        assert!(v.verify(&token, NOW).is_ok(), "{typ}");
    }
}

#[test]
fn refuses_unknown_and_revoked_keys() {
    let m = mesh();
    let v = verifier(&m.keys);
    let stranger = Issuer::new(key("stranger", 9), WEB, TD, 300);
    let token = stranger.mint(mint_request(), NOW).unwrap();
    assert_eq!(refused(&v, &token.encoded, NOW), VerifyError::UnknownKeyId);

    let minted = m.web.mint(mint_request(), NOW).unwrap();
    assert!(v.verify(&minted.encoded, NOW).is_ok());
    let mut revoked = m.keys.clone();
    revoked.revoke("web-1");
    v.set_keys(revoked);
    // Revocation holds even for a token that was verified and cached before.
    assert_eq!(refused(&v, &minted.encoded, NOW), VerifyError::RevokedKey);
}

#[test]
fn refuses_bad_signatures() {
    let m = mesh();
    let v = verifier(&m.keys);
    let minted = m.web.mint(mint_request(), NOW).unwrap();

    // Claims changed after signing: the initiator swapped for another user.
    let parts: Vec<&str> = minted.encoded.split('.').collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = json!("mallory@example.com");
    let tampered = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]);
    assert_eq!(refused(&v, &tampered, NOW), VerifyError::BadSignature);

    // Signed by a key that claims another key's id.
    let impostor = forge(header("web-1"), self::claims(), &key("web-1", 42));
    assert_eq!(refused(&v, &impostor, NOW), VerifyError::BadSignature);

    // One bit of the signature flipped.
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 1;
    let flipped = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
    assert_eq!(refused(&v, &flipped, NOW), VerifyError::BadSignature);
}

#[test]
fn refuses_tokens_outside_their_lifetime() {
    let m = mesh();
    let v = verifier(&m.keys);
    let minted = m.web.mint(mint_request(), NOW).unwrap();
    let leeway = v.config().leeway_secs;
    assert!(v.verify(&minted.encoded, NOW + 300 + leeway - 1).is_ok());
    assert_eq!(
        refused(&v, &minted.encoded, NOW + 300 + leeway),
        VerifyError::Expired
    );
    // Issued in the future, beyond the leeway.
    assert_eq!(
        refused(&v, &minted.encoded, NOW - leeway - 1),
        VerifyError::NotYetValid
    );
    assert!(v.verify(&minted.encoded, NOW - leeway).is_ok());
}

#[test]
fn refuses_tokens_for_another_audience() {
    let m = mesh();
    let other = Issuer::new(key("web-1", 1), WEB, "other.domain", 300);
    let token = other.mint(mint_request(), NOW).unwrap();
    assert_eq!(
        refused(&verifier(&m.keys), &token.encoded, NOW),
        VerifyError::WrongAudience
    );
    // An array audience naming this domain is accepted.
    let mut c = claims();
    c["aud"] = json!(["elsewhere", TD]);
    let token = forge(header("web-1"), c, &key("web-1", 1));
    assert!(verifier(&m.keys).verify(&token, NOW).is_ok());
}

#[test]
fn refuses_keys_used_outside_their_window_or_binding() {
    let k = key("short", 5);
    let mut keys = KeySet::new();
    keys.insert(
        k.public_key()
            .bound_to(WEB)
            .valid_between(NOW - 100, NOW + 100),
    )
    .unwrap();
    let v = verifier(&keys);
    let issuer = Issuer::new(key("short", 5), WEB, TD, 300);
    assert!(
        v.verify(&issuer.mint(mint_request(), NOW).unwrap().encoded, NOW)
            .is_ok()
    );
    let late = issuer.mint(mint_request(), NOW + 200).unwrap();
    assert_eq!(
        refused(&v, &late.encoded, NOW + 200),
        VerifyError::KeyOutOfWindow
    );

    // A sidecar's key signing a token that names another workload last:
    // a compromised orders sidecar cannot speak as web.
    let m = mesh();
    let rogue = Issuer::new(key("orders-1", 2), WEB, TD, 300);
    let token = rogue.mint(mint_request(), NOW).unwrap();
    assert_eq!(
        refused(&verifier(&m.keys), &token.encoded, NOW),
        VerifyError::KeyWorkloadMismatch
    );
}

#[test]
fn every_reason_has_a_distinct_label() {
    let all = [
        VerifyError::Malformed(Malformed::Structure),
        VerifyError::Oversized,
        VerifyError::DisallowedAlgorithm,
        VerifyError::WrongType,
        VerifyError::UnknownKeyId,
        VerifyError::RevokedKey,
        VerifyError::KeyOutOfWindow,
        VerifyError::KeyWorkloadMismatch,
        VerifyError::BadSignature,
        VerifyError::Expired,
        VerifyError::NotYetValid,
        VerifyError::WrongAudience,
    ];
    let labels: std::collections::BTreeSet<_> = all.iter().map(VerifyError::reason).collect();
    assert_eq!(labels.len(), all.len());
}

#[test]
fn a_delegation_chain_of_three_actors_survives_two_replacements() {
    let m = mesh();
    let v = verifier(&m.keys);
    // alice asks the assistant agent (the current actor) for something.
    let mut request = mint_request();
    request.act = Some(crate::token::Actor::new("agent:assistant"));
    let minted = m.web.mint(request, NOW).unwrap();

    // orders: the assistant delegates to a sub-agent; the app forwarded the token.
    let first = v.verify(&minted.encoded, NOW + 1).unwrap();
    let mut ext = Extension::new(HopAttribution::PROPAGATED);
    ext.delegate_to = Some("agent:researcher".into());
    ext.taint = vec!["pii.email".into()];
    let replaced = m.orders.extend(&first, ext, NOW + 1).unwrap();

    // db: the app dropped the token; stitched with confidence 0.5.
    let second = v.verify(&replaced.encoded, NOW + 2).unwrap();
    let mut ext = Extension::new(HopAttribution::stitched(0.5));
    ext.taint = vec!["pii.ssn".into(), "pii.email".into()];
    let last = m.db.extend(&second, ext, NOW + 2).unwrap();

    let end = v.verify(&last.encoded, NOW + 3).unwrap();
    let c = &end.claims;
    assert_eq!(c.sub, "alice@example.com");
    assert_eq!(c.custody.ini, InitiatorKind::Human);
    assert_eq!(c.actors(), vec!["agent:researcher", "agent:assistant"]);
    assert_eq!(c.req_wl, vec![WEB, ORDERS, DB]);
    let methods: Vec<_> = c.custody.att.iter().map(|a| a.method).collect();
    assert_eq!(
        methods,
        vec![
            AttributionMethod::Minted,
            AttributionMethod::Propagated,
            AttributionMethod::Stitched
        ]
    );
    assert_eq!(c.custody.att[2].confidence, 0.5);
    assert_eq!(
        c.custody.taint.iter().collect::<Vec<_>>(),
        vec!["pii.email", "pii.ssn"]
    );
    // What is immutable stayed so.
    assert_eq!(c.txn, minted.claims.txn);
    assert_eq!(c.scope, minted.claims.scope);
    assert_eq!(c.tctx, minted.claims.tctx);
    assert_eq!(c.rctx, minted.claims.rctx);
    assert_eq!(c.aud, minted.claims.aud);
    // Lifetime never grows; the signer is the last workload.
    assert!(c.exp <= minted.claims.exp);
    assert_eq!(c.iss.as_deref(), Some(DB));
    assert_eq!(end.kid, "db-1");
}

#[test]
fn rotation_keeps_chains_in_flight_verifying() {
    let m = mesh();
    let v = verifier(&m.keys);
    let old_token = m.web.mint(mint_request(), NOW).unwrap();

    // web rotates: a new key is published beside the old one.
    let new_key = key("web-2", 11);
    let mut rotated = m.keys.clone();
    rotated.insert(new_key.public_key().bound_to(WEB)).unwrap();
    v.set_keys(rotated.clone());
    let web2 = Issuer::new(new_key, WEB, TD, 300);
    let new_token = web2.mint(mint_request(), NOW + 10).unwrap();
    assert!(v.verify(&old_token.encoded, NOW + 10).is_ok());
    assert!(v.verify(&new_token.encoded, NOW + 10).is_ok());

    // A chain minted with the old key is extended after the rotation.
    let prior = v.verify(&old_token.encoded, NOW + 20).unwrap();
    let ext = m
        .orders
        .extend(&prior, Extension::new(HopAttribution::PROPAGATED), NOW + 20)
        .unwrap();
    assert!(v.verify(&ext.encoded, NOW + 20).is_ok());

    // Once the old key is retired, its tokens are unknown.
    rotated.remove("web-1");
    v.set_keys(rotated);
    assert_eq!(
        refused(&v, &old_token.encoded, NOW + 30),
        VerifyError::UnknownKeyId
    );
    assert!(v.verify(&new_token.encoded, NOW + 30).is_ok());
}

#[test]
fn verified_tokens_are_cached_and_rechecked_for_time() {
    let m = mesh();
    let v = verifier(&m.keys);
    let minted = m.web.mint(mint_request(), NOW).unwrap();
    let a = v.verify(&minted.encoded, NOW).unwrap();
    let b = v.verify(&minted.encoded, NOW + 1).unwrap();
    assert!(
        Arc::ptr_eq(&a, &b),
        "second verification must come from the cache"
    );
    assert_eq!(v.cached(), 1);
    // The cache never outlives the token.
    assert_eq!(
        refused(&v, &minted.encoded, NOW + 1000),
        VerifyError::Expired
    );
    // Refused tokens are not cached.
    let _ = v.verify("x.y.z", NOW);
    assert_eq!(v.cached(), 1);
}

#[test]
fn the_cache_is_bounded() {
    let m = mesh();
    let mut config = VerifierConfig::new(TD);
    config.cache_capacity = 16;
    let v = Verifier::new(config, m.keys.clone());
    for _ in 0..200 {
        let mut req = mint_request();
        req.txn = TraceId::random();
        let t = m.web.mint(req, NOW).unwrap();
        v.verify(&t.encoded, NOW).unwrap();
    }
    assert!(v.cached() <= 32, "cache holds {}", v.cached());
}

#[test]
fn issuing_refuses_what_verifiers_would() {
    let m = mesh();
    let v = verifier(&m.keys);
    let minted = m.web.mint(mint_request(), NOW).unwrap();
    let prior = v.verify(&minted.encoded, NOW).unwrap();
    assert_eq!(
        m.orders
            .extend(
                &prior,
                Extension::new(HopAttribution::PROPAGATED),
                NOW + 300
            )
            .unwrap_err(),
        IssueError::PriorExpired
    );
    let mut empty = mint_request();
    empty.sub.clear();
    assert_eq!(
        m.web.mint(empty, NOW).unwrap_err(),
        IssueError::Empty("sub")
    );

    // A chain that grows past the size limit is refused at issue, not sent.
    let mut token = minted;
    let mut grew = 0;
    loop {
        let prior = v.verify(&token.encoded, NOW).unwrap();
        let mut ext = Extension::new(HopAttribution::PROPAGATED);
        ext.taint = vec![format!("custom.class-{grew:04}-padding-padding-padding")];
        match m.orders.extend(&prior, ext, NOW) {
            Ok(next) => {
                assert!(next.encoded.len() <= DEFAULT_MAX_TOKEN_BYTES);
                token = next;
                grew += 1;
            }
            Err(IssueError::TooLarge(n)) => {
                assert!(n > DEFAULT_MAX_TOKEN_BYTES);
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(grew > 5);
}

#[test]
fn debug_output_never_shows_the_token() {
    let m = mesh();
    let minted = m.web.mint(mint_request(), NOW).unwrap();
    let shown = format!("{minted:?}");
    let signature = minted.encoded.rsplit('.').next().unwrap();
    assert!(!shown.contains(signature));
    assert!(!shown.contains(&minted.encoded));
}

#[test]
fn unbound_keys_verify_any_workload() {
    // The control plane's root key is unbound: it may mint for any workload.
    let root = key("root", 77);
    let mut keys = KeySet::new();
    keys.insert(root.public_key()).unwrap();
    let token = Issuer::new(root, ORDERS, TD, 60)
        .mint(mint_request(), NOW)
        .unwrap();
    assert!(verifier(&keys).verify(&token.encoded, NOW).is_ok());
}

#[test]
fn retainting_adds_classes_without_another_workload_hop() {
    let m = mesh();
    let v = verifier(&m.keys);
    let minted = m.web.mint(mint_request(), NOW).unwrap();
    let first = v.verify(&minted.encoded, NOW + 1).unwrap();
    let retainted = m
        .web
        .retaint(&first, ["pii.ssn".to_owned()], NOW + 1)
        .unwrap();
    let end = v.verify(&retainted.encoded, NOW + 2).unwrap();
    assert_eq!(end.claims.req_wl, vec![WEB]);
    assert_eq!(end.claims.custody.att, minted.claims.custody.att);
    assert_eq!(
        end.claims.custody.taint.iter().collect::<Vec<_>>(),
        vec!["pii.ssn"]
    );
    assert!(end.claims.exp <= minted.claims.exp);
    // An expired token is not brought back to life.
    assert!(m.web.retaint(&first, [], minted.claims.exp).is_err());
}
