//! Whatever arrives on the wire, the contract's parsers answer: accept or
//! refuse with a reason, never panic.

use custody_context::keys::{KeySet, SigningKey};
use custody_context::policy::EgressPolicy;
use custody_context::traceparent::TraceParent;
use custody_context::verify::{Verifier, VerifierConfig};
use proptest::prelude::*;

fn verifier() -> Verifier {
    let mut keys = KeySet::new();
    keys.insert(SigningKey::from_seed("k", &[1; 32]).public_key())
        .expect("a valid key");
    Verifier::new(VerifierConfig::new("td"), keys)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_text_is_refused_as_a_token(text in ".{0,600}") {
        prop_assert!(verifier().verify(&text, 1_700_000_000).is_err());
    }

    #[test]
    fn token_shaped_text_is_refused(
        header in "[A-Za-z0-9_-]{0,80}",
        claims in "[A-Za-z0-9_-]{0,200}",
        signature in "[A-Za-z0-9_-]{0,100}",
    ) {
        let token = format!("{header}.{claims}.{signature}");
        prop_assert!(verifier().verify(&token, 1_700_000_000).is_err());
    }

    #[test]
    fn traceparent_parse_is_total(text in ".{0,80}") {
        if let Ok(tp) = TraceParent::parse(&text) {
            prop_assert_eq!(TraceParent::parse(&tp.to_string()), Ok(tp));
        }
    }

    #[test]
    fn traceparent_shaped_text_round_trips_or_is_refused(
        version in "[0-9a-f]{2}",
        trace in "[0-9a-f]{32}",
        span in "[0-9a-f]{16}",
        flags in "[0-9a-f]{2}",
    ) {
        let text = format!("{version}-{trace}-{span}-{flags}");
        match TraceParent::parse(&text) {
            Ok(tp) => {
                prop_assert_eq!(tp.trace_id.to_string(), trace);
                prop_assert_eq!(tp.parent_id.to_string(), span);
            }
            Err(_) => prop_assert!(
                version == "ff" || trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0')
            ),
        }
    }

    #[test]
    fn policy_parse_is_total(text in ".{0,400}") {
        let _ = EgressPolicy::parse(&text);
    }
}
