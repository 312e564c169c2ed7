//! PostgreSQL decode throughput (MB/s).
//!
//! - `backend/*`: a result-heavy server stream (a `RowDescription`, 100,000
//!   five-column `DataRow`s, `CommandComplete`, `ReadyForQuery`), fed in
//!   64 KiB chunks as a socket would deliver it: framing only, framing plus
//!   message parsing, and the whole [`Connection`] with its session.
//! - `frontend/*`: a client stream of 10,000 extended-protocol queries
//!   (`Parse`/`Bind`/`Describe`/`Execute`/`Sync`, as `pgbench -M extended`
//!   sends them), framing only and through the [`Connection`].
//!
//! Run: `cargo bench -p custody-protocols --bench pg_decode`

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use custody_protocols::pg::{
    BackendDecoder, BackendMessage, Connection, FrontendDecoder, Limits, SessionLimits,
};

const CHUNK: usize = 64 * 1024;

fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn value(body: &mut Vec<u8>, v: &[u8]) {
    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
    body.extend_from_slice(v);
}

fn startup() -> Vec<u8> {
    let body = b"\x00\x03\x00\x00user\0bench\0database\0bench\0\0";
    let mut v = (body.len() as u32 + 4).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// Server stream: startup answer, then one query returning `rows` rows of
/// (id int4, email text, created timestamptz, balance numeric, active bool).
fn result_stream(rows: usize) -> Vec<u8> {
    let mut out = Vec::new();
    msg(&mut out, b'R', &0i32.to_be_bytes());
    msg(&mut out, b'Z', b"I");
    let mut rd = 5i16.to_be_bytes().to_vec();
    for (name, oid) in [
        ("id", 23u32),
        ("email", 25),
        ("created", 1184),
        ("balance", 1700),
        ("active", 16),
    ] {
        rd.extend_from_slice(name.as_bytes());
        rd.push(0);
        rd.extend_from_slice(&16384u32.to_be_bytes());
        rd.extend_from_slice(&1i16.to_be_bytes());
        rd.extend_from_slice(&oid.to_be_bytes());
        rd.extend_from_slice(&(-1i16).to_be_bytes());
        rd.extend_from_slice(&(-1i32).to_be_bytes());
        rd.extend_from_slice(&0i16.to_be_bytes());
    }
    msg(&mut out, b'T', &rd);
    let mut body = Vec::new();
    for i in 0..rows {
        body.clear();
        body.extend_from_slice(&5i16.to_be_bytes());
        value(&mut body, i.to_string().as_bytes());
        value(&mut body, format!("user{i}@example.com").as_bytes());
        value(&mut body, b"2024-05-17 10:21:33.123456+00");
        value(
            &mut body,
            format!("{}.{:02}", i * 7 % 100_000, i % 100).as_bytes(),
        );
        if i % 10 == 0 {
            body.extend_from_slice(&(-1i32).to_be_bytes());
        } else {
            value(&mut body, b"t");
        }
        msg(&mut out, b'D', &body);
    }
    msg(&mut out, b'C', format!("SELECT {rows}\0").as_bytes());
    msg(&mut out, b'Z', b"I");
    out
}

/// Client stream: startup, then `n` extended-protocol queries.
fn query_stream(n: usize) -> Vec<u8> {
    let mut out = startup();
    for i in 0..n {
        let sql = format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1 /* {} */\0",
            i % 10
        );
        let mut p = b"\0".to_vec();
        p.extend_from_slice(sql.as_bytes());
        p.extend_from_slice(&0i16.to_be_bytes());
        msg(&mut out, b'P', &p);
        let mut b = b"\0\0".to_vec();
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        value(&mut b, (i * 31 % 100_000).to_string().as_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        msg(&mut out, b'B', &b);
        msg(&mut out, b'D', b"P\0");
        msg(&mut out, b'E', b"\0\0\0\0\0");
        msg(&mut out, b'S', b"");
    }
    out
}

fn backend(c: &mut Criterion) {
    let stream = result_stream(100_000);
    let client = startup();
    let mut g = c.benchmark_group("backend");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("frames", |b| {
        b.iter(|| {
            let mut d = BackendDecoder::default();
            let mut n = 0u64;
            for chunk in stream.chunks(CHUNK) {
                d.feed(chunk, |f| n += u64::from(f.kind.tag())).unwrap();
            }
            black_box(n)
        })
    });
    g.bench_function("parse", |b| {
        b.iter(|| {
            let mut d = BackendDecoder::default();
            let mut cols = 0usize;
            for chunk in stream.chunks(CHUNK) {
                d.feed(chunk, |f| {
                    if let BackendMessage::DataRow(row) = BackendMessage::parse(&f) {
                        cols += row.len();
                    }
                })
                .unwrap();
            }
            black_box(cols)
        })
    });
    g.bench_function("parse_values", |b| {
        b.iter(|| {
            let mut d = BackendDecoder::default();
            let mut bytes = 0usize;
            for chunk in stream.chunks(CHUNK) {
                d.feed(chunk, |f| {
                    if let BackendMessage::DataRow(row) = BackendMessage::parse(&f) {
                        for v in row.values().flatten().flatten() {
                            bytes += v.len();
                        }
                    }
                })
                .unwrap();
            }
            black_box(bytes)
        })
    });
    g.bench_function("connection", |b| {
        b.iter(|| {
            let mut conn = Connection::default();
            conn.client_data(&client, |_| {}).unwrap();
            conn.client_data(b"Q\0\0\0\x15SELECT * FROM t\0\0", |_| {})
                .unwrap();
            let mut rows = 0;
            for chunk in stream.chunks(CHUNK) {
                conn.server_data(chunk, |_, ev| {
                    if let Some(ev) = ev {
                        rows += ev.rows_returned;
                    }
                })
                .unwrap();
            }
            assert_eq!(rows, 100_000);
            black_box(rows)
        })
    });
    g.finish();
}

fn frontend(c: &mut Criterion) {
    let stream = query_stream(10_000);
    let mut g = c.benchmark_group("frontend");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("frames", |b| {
        b.iter(|| {
            let mut d = FrontendDecoder::default();
            let mut n = 0u64;
            for chunk in stream.chunks(CHUNK) {
                d.feed(chunk, |f| n += u64::from(f.len)).unwrap();
            }
            black_box(n)
        })
    });
    g.bench_function("connection", |b| {
        b.iter(|| {
            // Room for every request: the session tracks all 50,000.
            let limits = SessionLimits {
                max_pending: 1 << 20,
                ..SessionLimits::default()
            };
            let mut conn = Connection::new(Limits::default(), limits);
            let mut n = 0usize;
            for chunk in stream.chunks(CHUNK) {
                conn.client_data(chunk, |_| n += 1).unwrap();
            }
            black_box((n, conn.session().pending_count()))
        })
    });
    g.finish();
}

criterion_group!(benches, backend, frontend);
criterion_main!(benches);
