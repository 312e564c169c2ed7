//! Decode throughput of result-heavy MySQL server streams.
//!
//! `cargo bench -p custody-protocols --bench mysql_decode`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use custody_protocols::mysql::{Event, Session, Value, capabilities as cap};

const ROWS: usize = 100_000;
const CHUNK: usize = 64 * 1024;

fn packet(seq: &mut u8, payload: &[u8], out: &mut Vec<u8>) {
    let n = payload.len();
    out.extend_from_slice(&[n as u8, (n >> 8) as u8, (n >> 16) as u8, *seq]);
    out.extend_from_slice(payload);
    *seq = seq.wrapping_add(1);
}

fn lenenc_str(s: &[u8], out: &mut Vec<u8>) {
    assert!(s.len() < 251);
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

fn column(seq: &mut u8, name: &str, ty: u8, out: &mut Vec<u8>) {
    let mut p = Vec::new();
    for s in ["def", "shop", "customers", "customers", name, name] {
        lenenc_str(s.as_bytes(), &mut p);
    }
    p.extend_from_slice(&[0x0c, 33, 0, 255, 0, 0, 0, ty, 0, 0, 0, 0, 0]);
    packet(seq, &p, out);
}

const CAPS: u32 = cap::LONG_PASSWORD
    | cap::PROTOCOL_41
    | cap::SECURE_CONNECTION
    | cap::PLUGIN_AUTH
    | cap::PLUGIN_AUTH_LENENC_CLIENT_DATA
    | cap::DEPRECATE_EOF;

/// Greeting, login and OK, then a command: (server prologue, client bytes).
fn prologue(command: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut server = Vec::new();
    let mut g = vec![10];
    g.extend_from_slice(b"8.0.36\0");
    g.extend_from_slice(&[1, 0, 0, 0]);
    g.extend_from_slice(b"abcdefgh\0");
    g.extend_from_slice(&(CAPS as u16).to_le_bytes());
    g.extend_from_slice(&[45, 2, 0]);
    g.extend_from_slice(&((CAPS >> 16) as u16).to_le_bytes());
    g.push(21);
    g.extend_from_slice(&[0; 10]);
    g.extend_from_slice(b"ijklmnopqrst\0mysql_native_password\0");
    packet(&mut 0, &g, &mut server);
    packet(&mut 2, &[0, 0, 0, 2, 0, 0, 0], &mut server);
    let mut client = Vec::new();
    let mut l = CAPS.to_le_bytes().to_vec();
    l.extend_from_slice(&[0, 0, 0, 1, 45]);
    l.extend_from_slice(&[0; 23]);
    l.extend_from_slice(b"bench\0");
    lenenc_str(&[7; 20], &mut l);
    l.extend_from_slice(b"mysql_native_password\0");
    packet(&mut 1, &l, &mut client);
    packet(&mut 0, command, &mut client);
    (server, client)
}

/// 100,000 rows x 5 columns, text protocol.
fn text_result() -> Vec<u8> {
    let mut out = Vec::new();
    let mut seq = 1;
    packet(&mut seq, &[5], &mut out);
    for (name, ty) in [
        ("id", 3),
        ("name", 253),
        ("email", 253),
        ("phone", 253),
        ("created", 12),
    ] {
        column(&mut seq, name, ty, &mut out);
    }
    let mut row = Vec::new();
    for i in 0..ROWS {
        row.clear();
        lenenc_str(i.to_string().as_bytes(), &mut row);
        lenenc_str(format!("Customer Number {i}").as_bytes(), &mut row);
        lenenc_str(format!("customer{i}@example.com").as_bytes(), &mut row);
        if i % 7 == 0 {
            row.push(0xfb);
        } else {
            lenenc_str(format!("+1 555 {:07}", i).as_bytes(), &mut row);
        }
        lenenc_str(b"2024-01-02 03:04:05", &mut row);
        packet(&mut seq, &row, &mut out);
    }
    packet(&mut seq, &[0xfe, 0, 0, 2, 0, 0, 0], &mut out);
    out
}

/// 100,000 rows x 5 columns, binary protocol (`COM_STMT_EXECUTE`).
fn binary_result() -> Vec<u8> {
    let mut out = Vec::new();
    let mut seq = 1;
    packet(&mut seq, &[5], &mut out);
    for (name, ty) in [
        ("id", 8),
        ("name", 253),
        ("email", 253),
        ("balance", 5),
        ("created", 12),
    ] {
        column(&mut seq, name, ty, &mut out);
    }
    let mut row = Vec::new();
    for i in 0..ROWS {
        row.clear();
        row.extend_from_slice(&[0, 0]);
        row.extend_from_slice(&(i as u64).to_le_bytes());
        lenenc_str(format!("Customer Number {i}").as_bytes(), &mut row);
        lenenc_str(format!("customer{i}@example.com").as_bytes(), &mut row);
        row.extend_from_slice(&(i as f64 * 1.5).to_le_bytes());
        row.extend_from_slice(&[7, 0xe8, 7, 1, 2, 3, 4, 5]);
        packet(&mut seq, &row, &mut out);
    }
    packet(&mut seq, &[0xfe, 0, 0, 2, 0, 0, 0], &mut out);
    out
}

fn decode(server_prologue: &[u8], client: &[u8], result: &[u8], sample: bool) -> u64 {
    let mut session = Session::default();
    let mut rows = 0u64;
    let mut sampled = 0usize;
    let mut obs = |event: Event<'_>| {
        if let Event::Row(row) = event {
            rows += 1;
            if sample && rows <= 100 {
                for v in row.values() {
                    if let Value::Bytes(b) = v {
                        sampled += b.len();
                    }
                }
            }
        }
    };
    let (greeting, ok) = server_prologue.split_at(server_prologue.len() - 11);
    let (login, command) = client.split_at(client.len() - command_len(client));
    let _ = session.feed_server(greeting, &mut obs);
    let _ = session.feed_client(login, &mut obs);
    let _ = session.feed_server(ok, &mut obs);
    let _ = session.feed_client(command, &mut obs);
    for chunk in result.chunks(CHUNK) {
        let _ = session.feed_server(black_box(chunk), &mut obs);
    }
    black_box(sampled);
    rows
}

/// Length of the last packet of a stream (the command).
fn command_len(client: &[u8]) -> usize {
    let mut at = 0;
    let mut last = 0;
    while at + 4 <= client.len() {
        let n = usize::from(client[at])
            | usize::from(client[at + 1]) << 8
            | usize::from(client[at + 2]) << 16;
        last = 4 + n;
        at += last;
    }
    last
}

fn bench(c: &mut Criterion) {
    let text = text_result();
    let binary = binary_result();
    let (ts, tc) = prologue(b"\x03SELECT id, name, email, phone, created FROM customers");
    let (bs, bc) = prologue(&[0x17, 1, 0, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(decode(&ts, &tc, &text, false), ROWS as u64);
    assert_eq!(decode(&bs, &bc, &binary, false), ROWS as u64);
    let mut group = c.benchmark_group("mysql_decode");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("text_100k_rows_x5", |b| {
        b.iter(|| decode(&ts, &tc, &text, false))
    });
    group.bench_function("text_100k_rows_x5_sample_100", |b| {
        b.iter(|| decode(&ts, &tc, &text, true))
    });
    group.throughput(Throughput::Bytes(binary.len() as u64));
    group.bench_function("binary_100k_rows_x5", |b| {
        b.iter(|| decode(&bs, &bc, &binary, false))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
