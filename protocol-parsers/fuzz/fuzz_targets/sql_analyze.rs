//! Arbitrary bytes into the SQL analyzer, both dialects, cached and not.
#![no_main]

use std::sync::OnceLock;

use custody_protocols::sql::{Analyzer, AnalyzerConfig, Dialect, analyze, fingerprint};
use libfuzzer_sys::fuzz_target;

static ANALYZER: OnceLock<Analyzer> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let sql = String::from_utf8_lossy(data);
    let analyzer = ANALYZER.get_or_init(|| {
        Analyzer::new(&AnalyzerConfig {
            cache_entries: 1_000,
            cache_bytes: 4 << 20,
        })
        .expect("valid config")
    });
    for dialect in [Dialect::Postgres, Dialect::MySql] {
        let a = analyze(&sql, dialect);
        let f = fingerprint(&sql, dialect);
        assert_eq!(a.fingerprint, f.hash);
        assert_eq!(a.normalized, f.normalized);
        let cached = analyzer.analyze(&sql, dialect);
        assert_eq!(cached.fingerprint, a.fingerprint);
        // Normalizing is idempotent on the shape's statement count.
        assert_eq!(a.parsed, a.unparsed.is_none());
    }
});
