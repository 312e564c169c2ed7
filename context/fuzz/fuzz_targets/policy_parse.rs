//! Arbitrary text as a policy document: refused with a field or accepted,
//! never a panic; accepted policies survive a JSON round trip.
#![no_main]

use custody_context::policy::EgressPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.len() > 64 * 1024 {
        return;
    }
    if let Ok(policy) = EgressPolicy::parse(text) {
        let json = serde_json::to_string(&policy).expect("serializable");
        assert_eq!(EgressPolicy::from_json(&json).as_ref(), Ok(&policy));
    }
});
