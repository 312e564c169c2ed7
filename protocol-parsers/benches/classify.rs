//! Classification throughput over realistic row values (MB/s of value
//! bytes), with the whole result set inside the sampling budget.
//!
//! Run: `cargo bench -p custody-protocols --bench classify`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use custody_protocols::classify::{Classifier, ClassifierConfig};

const COLUMNS: &[&str] = &[
    "id",
    "email",
    "full_name",
    "created_at",
    "status",
    "phone",
    "street",
    "last_login_ip",
    "notes",
    "total",
    "sku",
    "api_token",
];

fn rows(n: usize) -> Vec<Vec<Vec<u8>>> {
    let statuses = ["active", "pending", "shipped", "cancelled"];
    let notes = [
        "Customer asked for express delivery, call before noon",
        "",
        "Gift wrap; no invoice in the parcel",
        "Returned item: wrong size (M instead of L)",
    ];
    (0..n)
        .map(|i| {
            vec![
                format!("{}", 100_000 + i).into_bytes(),
                format!("user{i}.name@example.com").into_bytes(),
                format!("Jane Q. Public {i}").into_bytes(),
                format!(
                    "2024-{:02}-{:02} 12:{:02}:{:02}.123456+00",
                    1 + i % 12,
                    1 + i % 28,
                    i % 60,
                    (i * 7) % 60
                )
                .into_bytes(),
                statuses[i % statuses.len()].as_bytes().to_vec(),
                format!("+1415555{:04}", i % 10_000).into_bytes(),
                format!("{} Market Street", 1 + i % 999).into_bytes(),
                format!("10.{}.{}.{}", i % 256, (i / 256) % 256, 1 + i % 250).into_bytes(),
                notes[i % notes.len()].as_bytes().to_vec(),
                format!("{}.{:02}", 10 + i % 990, i % 100).into_bytes(),
                format!("SKU-{:06}-XL", i % 1_000_000).into_bytes(),
                format!(
                    "tok_{:032x}",
                    (i as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
                )
                .into_bytes(),
            ]
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let classifier = Classifier::new(&ClassifierConfig {
        max_rows: 1_000_000,
        max_bytes: 256 << 20,
        ..ClassifierConfig::default()
    })
    .expect("valid config");
    let data = rows(1_000);
    let bytes: usize = data.iter().flatten().map(Vec::len).sum();
    let mut group = c.benchmark_group("classify");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("rows_1000", |b| {
        b.iter(|| {
            let mut acc = classifier.start(COLUMNS);
            for row in &data {
                let values: Vec<Option<&[u8]>> = row.iter().map(|v| Some(v.as_slice())).collect();
                acc.observe_row(&values);
            }
            black_box(acc.finish())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
