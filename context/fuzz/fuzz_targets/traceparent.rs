//! Arbitrary text as a `traceparent`: parsing never panics, and what parses
//! formats back to a header that parses to the same value.
#![no_main]

use custody_context::traceparent::TraceParent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = TraceParent::parse(text) {
        let formatted = parsed.to_string();
        assert_eq!(TraceParent::parse(&formatted), Ok(parsed));
        assert_eq!(formatted.len(), TraceParent::LEN);
    }
});
