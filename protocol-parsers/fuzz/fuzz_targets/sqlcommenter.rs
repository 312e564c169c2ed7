//! Arbitrary text into the sqlcommenter reader, and the emitter's round trip.
#![no_main]

use custody_protocols::sql::Dialect;
use custody_protocols::sqlcommenter::{annotate, extract, parse_pairs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_pairs(&text);
    for dialect in [Dialect::Postgres, Dialect::MySql] {
        let _ = extract(&text, dialect);
        // Any value survives annotate -> extract on a comment-free statement.
        let value: String = text.chars().take(256).collect();
        let sql = annotate("SELECT 1", dialect, &[("k", value.as_str()), ("traceparent", "x")]);
        let c = extract(&sql, dialect).expect("annotated statement has pairs");
        assert_eq!(c.get("k"), Some(value.as_str()));
        // Annotating arbitrary SQL keeps the statement in front.
        let out = annotate(&text, dialect, &[("a", "b")]);
        assert!(out.starts_with(text.trim_end().trim_end_matches(';').trim_end()));
    }
});
