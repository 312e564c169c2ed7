//! Whole-system benchmark of the control plane, in one process over real
//! sockets: gRPC ingest with assembly (hops/s), then chain lookup latency
//! over HTTP with everything stored.
//!
//! ```text
//! CUSTODY_BENCH_HOPS=1000000 cargo bench -p custody-control --bench ingest
//! CUSTODY_BENCH_HOPS=10000000 CUSTODY_BENCH_INGEST_HOPS=1000000 cargo bench -p custody-control --bench ingest
//! CUSTODY_BENCH_STORE=both CUSTODY_BENCH_HOPS=300000 cargo bench -p custody-control --bench ingest
//! ```
//!
//! `CUSTODY_BENCH_STORE` picks the store: `sqlite` (default), `postgres`
//! (a throwaway PostgreSQL cluster started through `custody-testkit`, with
//! `fsync`, `synchronous_commit` and `full_page_writes` on, so an
//! acknowledgement means what it means on SQLite with `sync: full`), or
//! `both` (SQLite, then PostgreSQL, in one invocation, with the ratios).
//! On PostgreSQL the server's own CPU time (postmaster and backends, from
//! `/proc`) is printed apart from the process's; `CUSTODY_BENCH_PG_POOL`
//! sets the store's `pool_size` (default 4).
//!
//! Chains of 5 hops (one in 10 with a call that lost its context, joined by
//! time containment), with random-looking 128-bit chain and event ids as
//! the sidecars send (sequential ids would flatter the store's indexes). `CUSTODY_BENCH_HOPS` hops end up stored: the first
//! `CUSTODY_BENCH_HOPS - CUSTODY_BENCH_INGEST_HOPS` are loaded straight
//! through the store API in batches of 50,000 (and assembled by the
//! server's assembler), the last `CUSTODY_BENCH_INGEST_HOPS` (default: all
//! of them, at most 1,000,000) are sent over gRPC in batches of 1,000 hops
//! from 4 concurrent clients (`CUSTODY_BENCH_CLIENTS` to change: a mesh
//! has a connection per sidecar; the batches are made before the clock
//! starts, as sidecars on other machines would make them) and timed, `sync: full`
//! (`CUSTODY_BENCH_SYNC=normal` to compare). Prints ingest-only and
//! ingest-with-assembly rates, how long batches waited for their
//! acknowledgement (p50 to the longest), the process CPU time (user + system, the
//! benchmark's clients included) per hop over that timed part, then p50/p99
//! of `GET /v1/chains/{id}` and of a filtered `GET /v1/chains` over every
//! stored chain. CPU per hop is the figure to compare on a shared machine:
//! hops/s follow whatever CPU the process gets.

#![allow(clippy::print_stdout, clippy::unwrap_used)] // a benchmark's report; failures abort it

use std::time::{Duration, Instant};

use custody_context::api::v1;
use custody_control::client::Client;
use custody_control::config::Config;

// The allocator of the `custody-control` binary, so the figures are its own.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ADMIN: &str = "admin-token-0123456789";
const NODE: &str = "node-token-0123456789";
const HOPS_PER_CHAIN: u64 = 5;
const BATCH: u64 = 1_000;
/// Concurrent gRPC clients unless `CUSTODY_BENCH_CLIENTS` says otherwise.
const CLIENTS: u64 = 4;

fn wl(sa: &str) -> v1::WorkloadId {
    v1::WorkloadId {
        trust_domain: "td".into(),
        namespace: "shop".into(),
        service_account: sa.into(),
        pod: String::new(),
    }
}

/// A fixed permutation of `u64` (splitmix64's finalizer): ids look random,
/// as the sidecars' are, and stay the same from run to run.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// 128 random-looking bits in hex, like the sidecars' chain and event ids.
fn id128(kind: u64, n: u64) -> String {
    format!("{:016x}{:016x}", mix(n ^ kind << 56), mix(!n ^ kind << 56))
}

fn chain_id(n: u64) -> String {
    id128(1, n)
}

/// Chain `n`: 5 hops, nested in time, 1 ms apart from chain `n - 1`.
fn chain(n: u64, base: u64) -> Vec<v1::HopEvent> {
    let start = base + n * 1_000_000;
    let id = chain_id(n);
    let lost = n.is_multiple_of(10);
    (0..HOPS_PER_CHAIN)
        .map(|i| {
            let sa = ["web", "orders", "payments", "ledger", "search"][i as usize];
            let context = !(lost && i == 4);
            v1::HopEvent {
                schema_version: 1,
                event_id: id128(2, n * HOPS_PER_CHAIN + i),
                chain_id: if context {
                    id.clone()
                } else {
                    chain_id(n + (1 << 40))
                },
                span_id: format!("{:016x}", mix((n << 4) + i + 1)),
                parent_span_id: if i == 0 || !context {
                    String::new()
                } else {
                    format!("{:016x}", mix((n << 4) + i))
                },
                workload: Some(wl(if context { sa } else { "payments" })),
                direction: if i % 2 == 0 && context {
                    v1::Direction::Inbound
                } else {
                    v1::Direction::Outbound
                } as i32,
                protocol: v1::Protocol::Http1 as i32,
                operation: format!("GET /{sa}"),
                status: 200,
                initiator: context.then(|| v1::Initiator {
                    subject: format!("user{}@example.com", n % 1_000),
                    kind: v1::InitiatorKind::Human as i32,
                    actors: vec![],
                    scope: "orders.read".into(),
                }),
                attribution: Some(v1::Attribution {
                    method: if context {
                        v1::AttributionMethod::Propagated
                    } else {
                        v1::AttributionMethod::PeerOnly
                    } as i32,
                    confidence: if context { 1.0 } else { 0.0 },
                }),
                context_outcome: if context {
                    v1::ContextOutcome::Propagated
                } else {
                    v1::ContextOutcome::Missing
                } as i32,
                start_unix_nanos: start + i * 10_000,
                duration_nanos: 500_000 - i * 20_000,
                data: if i == 2 && n.is_multiple_of(7) {
                    vec![v1::DataTouch {
                        class: "pii.email".into(),
                        count: 1,
                        confidence: 1.0,
                    }]
                } else {
                    vec![]
                },
                ..Default::default()
            }
        })
        .collect()
}

#[derive(Clone)]
struct Bearer;

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {NODE}").parse().unwrap());
        Ok(req)
    }
}

/// This process's CPU time so far (user + system), from `/proc/self/stat`
/// (clock ticks of 10 ms, the Linux default `CLK_TCK` of 100).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces): state is the
    // first, utime the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Waits until at most `left` chains are pending assembly (pending chains
/// are cleared in the transaction that stores their trees).
async fn wait_assembled(server: &custody_control::server::Running, left: usize) {
    loop {
        let store = server.shared.store.clone();
        let pending = tokio::task::spawn_blocking(move || {
            store.pending_chains(left as u32 + 1).unwrap().len()
        })
        .await
        .unwrap();
        if pending <= left {
            break;
        }
        let pause = if left == 0 { 20 } else { 200 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// CPU time (user + system) of a PostgreSQL server: the postmaster, the
/// backends it reaped, and the ones alive, from `/proc`.
fn postgres_cpu(pg: &custody_testkit::Postgres) -> Duration {
    let pid_file = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).unwrap();
    let postmaster: u32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    let stat = |pid: u32| -> Option<Vec<u64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        // ppid is the 2nd field after the name; utime, stime, cutime, cstime the 12th to 15th.
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(
            [1, 11, 12, 13, 14]
                .iter()
                .map(|i| f[*i].parse().unwrap_or(0))
                .collect(),
        )
    };
    let own = stat(postmaster).unwrap();
    let mut ticks = own[1] + own[2] + own[3] + own[4];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = stat(pid)
            && f[0] == u64::from(postmaster)
        {
            ticks += f[1] + f[2];
        }
    }
    Duration::from_millis(ticks * 10)
}

/// Assembly passes so far and the seconds they took, for each stage
/// (`assemble`, then `store`), from `custody_assembly_pass_seconds`.
fn passes(server: &custody_control::server::Running) -> [(u64, f64); 2] {
    let text = server.shared.metrics.encode();
    let value = |name: &str, stage: &str| -> f64 {
        let prefix = format!("custody_assembly_pass_seconds_{name}{{stage=\"{stage}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    };
    ["assemble", "store"].map(|stage| (value("count", stage) as u64, value("sum", stage)))
}

/// What one run measured, for the ratios.
struct Figures {
    hops_per_sec: f64,
    cpu_us_per_hop: f64,
    lookup_p50_ms: f64,
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let which = std::env::var("CUSTODY_BENCH_STORE").unwrap_or_else(|_| "sqlite".into());
    let (sqlite, postgres) = match which.as_str() {
        "sqlite" => (true, false),
        "postgres" => (false, true),
        "both" => (true, true),
        other => panic!("CUSTODY_BENCH_STORE: sqlite, postgres or both, not {other}"),
    };
    let mut figures = Vec::new();
    if sqlite {
        println!("=== store: sqlite");
        figures.push(("sqlite", run("", None)));
    }
    if postgres {
        let pg = custody_testkit::Postgres::start_with(
            custody_testkit::Options::default()
                .setting("fsync", "on")
                .setting("synchronous_commit", "on")
                .setting("full_page_writes", "on"),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, pg.password()).unwrap();
        let pool: usize = std::env::var("CUSTODY_BENCH_PG_POOL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4);
        let store = format!(
            "store: {{ backend: postgres, postgres: {{ host: {}, port: {}, user: {}, dbname: {}, password_file: {}, pool_size: {pool} }} }}\n",
            pg.host(),
            pg.port(),
            pg.user(),
            pg.database(),
            password_file.display()
        );
        println!(
            "=== store: postgres ({}, pool_size {pool})",
            pg.bin_dir().display()
        );
        figures.push(("postgres", run(&store, Some(&|| postgres_cpu(&pg)))));
    }
    if let [(a, x), (b, y)] = figures.as_slice() {
        println!(
            "{b} / {a}: ingest with assembly {:.2}x the hops/s, {:.2}x the process CPU per hop, lookup p50 {:.2}x",
            y.hops_per_sec / x.hops_per_sec,
            y.cpu_us_per_hop / x.cpu_us_per_hop,
            y.lookup_p50_ms / x.lookup_p50_ms
        );
    }
}

/// One whole run on the store `store` (a `store:` config section, empty for
/// SQLite); `server_cpu` reads the database server's CPU time when it is
/// another process.
fn run(store: &str, server_cpu: Option<&dyn Fn() -> Duration>) -> Figures {
    let hops: u64 = std::env::var("CUSTODY_BENCH_HOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let chains = hops / HOPS_PER_CHAIN;
    let sync = std::env::var("CUSTODY_BENCH_SYNC").unwrap_or_else(|_| "full".into());
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&format!(
        "data_dir: {}\ngrpc_listen: 127.0.0.1:0\nhttp_listen: 127.0.0.1:0\nsync: {}\n\
         tokens:\n  - {{ name: bench, role: admin, secret: {ADMIN} }}\n  - {{ name: nodes, role: node, secret: {NODE} }}\n\
         assembly: {{ interval_millis: 50 }}\n{store}",
        dir.path().display(),
        sync
    ))
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ingest_hops: u64 = std::env::var("CUSTODY_BENCH_INGEST_HOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| hops.min(1_000_000))
        .min(hops);
    let preload_chains = (hops - ingest_hops) / HOPS_PER_CHAIN;
    let clients: u64 = std::env::var("CUSTODY_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(CLIENTS);
    rt.block_on(async move {
        let server = custody_control::server::start(&config).await.unwrap();
        let base_time = custody_control::unix_nanos() - chains * 1_000_000 - 3_600_000_000_000;

        // Stored data first, straight through the store, assembled by the server.
        if preload_chains > 0 {
            let started = Instant::now();
            let per_batch = 50_000 / HOPS_PER_CHAIN;
            let mut from = 0;
            while from < preload_chains {
                let to = (from + per_batch).min(preload_chains);
                let shared = server.shared.clone();
                let backlog = tokio::task::spawn_blocking(move || {
                    let hops: Vec<_> = (from..to).flat_map(|n| chain(n, base_time)).collect();
                    let out = shared.store.put_hops(&hops).unwrap();
                    shared.dirty.mark(out.chains);
                    shared.store.pending_chains(200_000).unwrap().len()
                })
                .await
                .unwrap();
                // Keep the assembler's backlog bounded, as ingest would.
                if backlog > 100_000 {
                    wait_assembled(&server, 50_000).await;
                }
                from = to;
            }
            wait_assembled(&server, 0).await;
            println!(
                "preloaded through the store: {} hops in {:.1} s ({:.0} hops/s with assembly)",
                preload_chains * HOPS_PER_CHAIN,
                started.elapsed().as_secs_f64(),
                (preload_chains * HOPS_PER_CHAIN) as f64 / started.elapsed().as_secs_f64()
            );
        }

        let chains_per_batch = BATCH / HOPS_PER_CHAIN;
        let batches = (chains - preload_chains).div_ceil(chains_per_batch);
        // The clients stand for sidecars on other machines: their events
        // are made before the clock starts, and only sending them (gRPC
        // encoding included) shares the server's cores.
        let mut sends: Vec<Vec<v1::HopBatch>> = (0..clients).map(|_| Vec::new()).collect();
        for b in 0..batches {
            let from = preload_chains + b * chains_per_batch;
            let to = (from + chains_per_batch).min(chains);
            let hops: Vec<_> = (from..to).flat_map(|n| chain(n, base_time)).collect();
            sends[(b % clients) as usize].push(v1::HopBatch { hops });
        }
        let passes_started = passes(&server);
        let started = Instant::now();
        let cpu_started = process_cpu();
        let server_cpu_started = server_cpu.map(|f| f());
        let mut tasks = Vec::new();
        for batches in sends {
            let addr = server.grpc_addr;
            tasks.push(tokio::spawn(async move {
                let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut client = v1::ingest_client::IngestClient::with_interceptor(channel, Bearer)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20);
                let mut waited = Vec::with_capacity(batches.len());
                for batch in batches {
                    let sent = batch.hops.len();
                    let asked = Instant::now();
                    let ack = client.report_hops(batch).await.unwrap().into_inner();
                    waited.push(asked.elapsed());
                    assert_eq!(ack.accepted as usize, sent);
                }
                waited
            }));
        }
        let mut acks = Vec::new();
        for t in tasks {
            acks.extend(t.await.unwrap());
        }
        acks.sort();
        let ingested = started.elapsed();
        wait_assembled(&server, 0).await;
        let assembled = started.elapsed();
        let cpu = process_cpu() - cpu_started;
        let server_cpu = server_cpu
            .zip(server_cpu_started)
            .map(|(f, started)| f() - started);
        let total = (chains - preload_chains) * HOPS_PER_CHAIN;
        println!(
            "stored hops: {} ({chains} chains), {total} of them over gRPC from {clients} clients",
            chains * HOPS_PER_CHAIN
        );
        println!(
            "ingest (acknowledged, durable): {:.1} s, {:.0} hops/s",
            ingested.as_secs_f64(),
            total as f64 / ingested.as_secs_f64()
        );
        println!(
            "acknowledgement of a batch: p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
            percentile(&acks, 0.5).as_secs_f64() * 1e3,
            percentile(&acks, 0.99).as_secs_f64() * 1e3,
            percentile(&acks, 0.999).as_secs_f64() * 1e3,
            acks.last().unwrap().as_secs_f64() * 1e3
        );
        println!(
            "ingest with assembly (all chains assembled): {:.1} s, {:.0} hops/s",
            assembled.as_secs_f64(),
            total as f64 / assembled.as_secs_f64()
        );
        println!(
            "process CPU during ingest with assembly (user+sys, clients included): {:.1} s, {:.1} us per hop, {:.2} cores",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / total as f64,
            cpu.as_secs_f64() / assembled.as_secs_f64()
        );
        let [(n, assemble), (_, store)] = {
            let [a, b] = passes(&server);
            let [a0, b0] = passes_started;
            [(a.0 - a0.0, a.1 - a0.1), (b.0 - b0.0, b.1 - b0.1)]
        };
        println!(
            "assembly passes: {n}, working out {assemble:.1} s ({:.1} ms each), storing trees {store:.1} s ({:.1} ms each)",
            assemble * 1e3 / n.max(1) as f64,
            store * 1e3 / n.max(1) as f64,
        );
        if let Some(pg) = server_cpu {
            println!(
                "PostgreSQL server CPU during ingest with assembly (postmaster and backends): {:.1} s, {:.1} us per hop, {:.2} cores",
                pg.as_secs_f64(),
                pg.as_secs_f64() * 1e6 / total as f64,
                pg.as_secs_f64() / assembled.as_secs_f64()
            );
        }
        let hops_per_sec = total as f64 / assembled.as_secs_f64();
        let cpu_us_per_hop = cpu.as_secs_f64() * 1e6 / total as f64;
        let size = { server.shared.store.size_bytes().unwrap() };
        println!("store size: {:.1} MiB", size as f64 / (1 << 20) as f64);

        let base = format!("http://{}", server.http_addr);
        let report = tokio::task::spawn_blocking(move || {
            let client = Client::new(&base, Some(ADMIN.to_owned()));
            let mut lookups = Vec::new();
            let mut lists = Vec::new();
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for i in 0..2_000u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let n = x % chains;
                let t = Instant::now();
                let tree = client
                    .get(&format!("/v1/chains/{}", chain_id(n)), &[])
                    .unwrap();
                lookups.push(t.elapsed());
                assert!(tree["hops"].as_array().unwrap().len() >= 4);
                if i % 4 == 0 {
                    let t = Instant::now();
                    client
                        .get(
                            "/v1/chains",
                            &[
                                ("initiator", format!("user{}@example.com", n % 1_000)),
                                ("limit", "20".into()),
                            ],
                        )
                        .unwrap();
                    lists.push(t.elapsed());
                }
            }
            lookups.sort();
            lists.sort();
            let p50 = percentile(&lookups, 0.5).as_secs_f64() * 1e3;
            let text = format!(
                "GET /v1/chains/{{id}} ({} random): p50 {:.2} ms, p99 {:.2} ms\n\
                 GET /v1/chains?initiator=..&limit=20 ({}): p50 {:.2} ms, p99 {:.2} ms",
                lookups.len(),
                percentile(&lookups, 0.5).as_secs_f64() * 1e3,
                percentile(&lookups, 0.99).as_secs_f64() * 1e3,
                lists.len(),
                percentile(&lists, 0.5).as_secs_f64() * 1e3,
                percentile(&lists, 0.99).as_secs_f64() * 1e3,
            );
            (text, p50)
        })
        .await
        .unwrap();
        println!("{}", report.0);
        server.shutdown().await;
        Figures {
            hops_per_sec,
            cpu_us_per_hop,
            lookup_p50_ms: report.1,
        }
    })
}
