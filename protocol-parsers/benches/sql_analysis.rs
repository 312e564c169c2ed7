//! SQL analysis throughput: cold (every query parsed) and cached (a repeated
//! shape costs one normalization pass and a hash lookup).
//!
//! Run: `cargo bench -p custody-protocols --bench sql_analysis`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use custody_protocols::sql::{Analyzer, AnalyzerConfig, Dialect, analyze, fingerprint};

/// Typical OLTP statements: pgbench's TPC-B-like script, a point select, a
/// three-way join. `{}` is replaced by a varying literal.
const QUERIES: &[(&str, Dialect)] = &[
    (
        "UPDATE pgbench_accounts SET abalance = abalance + {} WHERE aid = 4711;",
        Dialect::Postgres,
    ),
    (
        "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
        Dialect::Postgres,
    ),
    (
        "UPDATE pgbench_tellers SET tbalance = tbalance + {} WHERE tid = 12;",
        Dialect::Postgres,
    ),
    (
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, {}, -1234, CURRENT_TIMESTAMP);",
        Dialect::Postgres,
    ),
    (
        "SELECT id, email, name, created_at FROM users WHERE id = {}",
        Dialect::MySql,
    ),
    (
        "SELECT c.name, o.id, o.total, p.title FROM customers c JOIN orders o ON o.customer_id = c.id \
         JOIN products p ON p.id = o.product_id WHERE c.id = {} AND o.status = 'paid' ORDER BY o.created_at DESC LIMIT 20",
        Dialect::Postgres,
    ),
];

fn with_literal(template: &str, i: u64) -> String {
    template.replace("{}", &i.to_string())
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("sql_analysis");
    group.throughput(Throughput::Elements(1));

    // Cold: a shape never seen, so every call parses and walks.
    let cold: Vec<(String, Dialect)> = (0..QUERIES.len() * 50)
        .map(|i| {
            let (q, d) = QUERIES[i % QUERIES.len()];
            (with_literal(q, i as u64), d)
        })
        .collect();
    let mut i = 0;
    group.bench_function("cold", |b| {
        b.iter(|| {
            let (q, d) = &cold[i % cold.len()];
            i += 1;
            black_box(analyze(black_box(q), *d))
        })
    });

    // Cached: same shapes, different literals, through a warm analyzer.
    let analyzer = Analyzer::new(&AnalyzerConfig::default()).expect("default config is valid");
    for (q, d) in &cold {
        analyzer.analyze(q, *d);
    }
    let mut i = 0;
    group.bench_function("cached", |b| {
        b.iter(|| {
            let (q, d) = &cold[i % cold.len()];
            i += 1;
            black_box(analyzer.analyze(black_box(q), *d))
        })
    });

    let mut i = 0;
    group.bench_function("fingerprint_only", |b| {
        b.iter(|| {
            let (q, d) = &cold[i % cold.len()];
            i += 1;
            black_box(fingerprint(black_box(q), *d))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
