//! Token costs on the request path: sign (mint), verify cold, verify cached,
//! replacement issue, against raw Ed25519 sign and verify as the baseline.
//!
//! Run: `cargo bench -p custody-context --bench token`.

// A benchmark fixture that fails should stop loudly.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use custody_context::issue::{Extension, Issuer, Mint};
use custody_context::keys::{KeySet, SigningKey};
use custody_context::token::{Actor, HopAttribution, InitiatorKind};
use custody_context::traceparent::TraceId;
use custody_context::verify::{Verifier, VerifierConfig};
use ed25519_dalek::{Signer as _, Verifier as _};

const NOW: u64 = 1_700_000_000;
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

fn mint() -> Mint {
    Mint {
        txn: TraceId::random(),
        sub: "alice@example.com".into(),
        kind: InitiatorKind::Human,
        scope: "orders.read".into(),
        act: Some(Actor::new("agent:assistant")),
        tctx: None,
        rctx: None,
        taint: vec!["pii.email".into()],
    }
}

fn bench(c: &mut Criterion) {
    let web_key = SigningKey::from_seed("web-1", &[1; 32]);
    let orders_key = SigningKey::from_seed("orders-1", &[2; 32]);
    let mut keys = KeySet::new();
    keys.insert(web_key.public_key().bound_to(WEB)).unwrap();
    keys.insert(orders_key.public_key().bound_to(ORDERS))
        .unwrap();
    let web = Issuer::new(web_key, WEB, "cluster.local", 300);
    let orders = Issuer::new(orders_key, ORDERS, "cluster.local", 300);
    let token = web.mint(mint(), NOW).unwrap();
    let signing_input_len = token.encoded.rfind('.').unwrap();
    let signing_input = token.encoded.as_bytes()[..signing_input_len].to_vec();

    let mut group = c.benchmark_group("token");

    // Baseline: raw Ed25519 over the same signing input.
    let raw = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let raw_public = raw.verifying_key();
    let raw_signature = raw.sign(&signing_input);
    group.bench_function("raw_ed25519_sign", |b| {
        b.iter(|| raw.sign(black_box(&signing_input)))
    });
    group.bench_function("raw_ed25519_verify", |b| {
        b.iter(|| raw_public.verify_strict(black_box(&signing_input), &raw_signature))
    });
    group.bench_function("raw_ed25519_verify_nonstrict", |b| {
        b.iter(|| raw_public.verify(black_box(&signing_input), &raw_signature))
    });

    group.bench_function("sign_mint", |b| b.iter(|| web.mint(black_box(mint()), NOW)));

    // Cold: a verifier with no cache room for this token on each iteration.
    let mut cold_config = VerifierConfig::new("cluster.local");
    cold_config.cache_capacity = 1;
    let cold = Verifier::new(cold_config, keys.clone());
    let other = web.mint(mint(), NOW).unwrap();
    group.bench_function("verify_cold", |b| {
        let mut flip = false;
        b.iter(|| {
            flip = !flip;
            let t = if flip { &token.encoded } else { &other.encoded };
            cold.verify(black_box(t), NOW)
        })
    });

    let warm = Verifier::new(VerifierConfig::new("cluster.local"), keys.clone());
    warm.verify(&token.encoded, NOW).unwrap();
    group.bench_function("verify_cached", |b| {
        b.iter(|| warm.verify(black_box(&token.encoded), NOW))
    });

    let prior = warm.verify(&token.encoded, NOW).unwrap();
    group.bench_function("replacement_issue", |b| {
        b.iter(|| {
            let mut ext = Extension::new(HopAttribution::PROPAGATED);
            ext.taint = vec!["pii.ssn".into()];
            orders.extend(black_box(&prior), ext, NOW + 1)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
