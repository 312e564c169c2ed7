//! Arbitrary bytes as a token: the verifier refuses or accepts, never panics.
//! Half the inputs are spliced into a genuine token's parts, so the fuzzer
//! reaches the claims parser behind a valid header.
#![no_main]

use std::sync::OnceLock;

use custody_context::issue::{Issuer, Mint};
use custody_context::keys::{KeySet, SigningKey};
use custody_context::token::InitiatorKind;
use custody_context::traceparent::TraceId;
use custody_context::verify::{Verifier, VerifierConfig};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_700_000_000;

fn fixture() -> &'static (Verifier, String) {
    static FIXTURE: OnceLock<(Verifier, String)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = SigningKey::from_seed("k", &[3; 32]);
        let mut keys = KeySet::new();
        keys.insert(key.public_key()).expect("valid key");
        let issuer = Issuer::new(key, "spiffe://td/ns/a/sa/b", "td", 300);
        let token = issuer
            .mint(
                Mint {
                    txn: TraceId::from_bytes([1; 16]).expect("non-zero"),
                    sub: "alice".into(),
                    kind: InitiatorKind::Human,
                    scope: "s".into(),
                    act: None,
                    tctx: None,
                    rctx: None,
                    taint: vec![],
                },
                NOW,
            )
            .expect("mint");
        (Verifier::new(VerifierConfig::new("td"), keys), token.encoded)
    })
}

fuzz_target!(|data: &[u8]| {
    let (verifier, genuine) = fixture();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = verifier.verify(text, NOW);
    // Replace the claims part of a genuine token with the input.
    let mut parts = genuine.split('.');
    if let (Some(header), Some(_), Some(signature)) = (parts.next(), parts.next(), parts.next()) {
        let spliced = format!("{header}.{text}.{signature}");
        assert!(verifier.verify(&spliced, NOW).is_err() || text == genuine.split('.').nth(1).unwrap_or(""));
    }
});
