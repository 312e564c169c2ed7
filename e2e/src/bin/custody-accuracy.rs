//! The attribution-accuracy benchmark (see `custody_e2e::accuracy`).
//!
//! ```sh
//! custody-accuracy [--requests N] [--services K] [--concurrency 1,8,32]
//!                  [--no-forward 0,0.5,1] [--delay-ms D] [--jitter-ms J]
//! ```
//!
//! Runs every combination of concurrency and no-forward fraction, each on a
//! mesh of its own (root: network namespaces), and prints the results as
//! Markdown tables. `drive` and `collect` are the parts it runs inside the
//! client pod.

// The benchmark reports to its user on stdout.
#![allow(clippy::print_stdout)]

use anyhow::{Context as _, bail};
use custody_e2e::accuracy::{self, Scenario};

fn list<T: std::str::FromStr>(value: Option<String>, flag: &str) -> anyhow::Result<Vec<T>> {
    let value = value.with_context(|| format!("{flag} needs a value"))?;
    value
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{flag}: cannot read {v:?}"))
        })
        .collect()
}

fn one<T: std::str::FromStr>(value: Option<String>, flag: &str) -> anyhow::Result<T> {
    let mut values = list(value, flag)?;
    match (values.pop(), values.is_empty()) {
        (Some(v), true) => Ok(v),
        _ => bail!("{flag} takes one value"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn helper(mode: &str, mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut url = String::new();
    let mut server = String::new();
    let mut token = String::new();
    let mut requests = 0;
    let mut concurrency = 1;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--url" => url = one(args.next(), "--url")?,
            "--server" => server = one(args.next(), "--server")?,
            "--token" => token = one(args.next(), "--token")?,
            "--requests" => requests = one(args.next(), "--requests")?,
            "--concurrency" => concurrency = one(args.next(), "--concurrency")?,
            other => bail!("unknown argument {other}"),
        }
    }
    if mode == "drive" {
        let ok = accuracy::drive(&url, requests, concurrency).await?;
        println!("{ok}");
    } else {
        let trees = accuracy::collect(&server, &token, requests).await?;
        println!("{}", serde_json::Value::Array(trees));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if let Some(mode) = args.peek().cloned()
        && (mode == "drive" || mode == "collect")
    {
        args.next();
        return helper(&mode, args);
    }
    let mut requests = 200;
    let mut services = 5;
    let mut concurrency = vec![1, 8, 32];
    let mut no_forward = vec![0.0, 0.5, 1.0];
    let mut delay_ms = 4.0;
    let mut jitter_ms = 2.0;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--requests" => requests = one(args.next(), "--requests")?,
            "--services" => services = one(args.next(), "--services")?,
            "--concurrency" => concurrency = list(args.next(), "--concurrency")?,
            "--no-forward" => no_forward = list(args.next(), "--no-forward")?,
            "--delay-ms" => delay_ms = one(args.next(), "--delay-ms")?,
            "--jitter-ms" => jitter_ms = one(args.next(), "--jitter-ms")?,
            other => bail!("unknown argument {other}"),
        }
    }
    println!(
        "attribution accuracy: {services} services, {requests} requests per run, hold {delay_ms} ± {jitter_ms} ms before and after each call"
    );
    let mut rows = Vec::new();
    for &f in &no_forward {
        for &c in &concurrency {
            let scenario = Scenario {
                services,
                concurrency: c,
                no_forward: f,
                requests,
                delay_ms,
                jitter_ms,
            };
            let started = std::time::Instant::now();
            let m = accuracy::run(&scenario, "acc")?;
            println!(
                "c={c} f={f}: edges {:.1}% precision, {:.1}% recall, {:.1}% exact chains ({:.0} s)",
                100.0 * m.precision(),
                100.0 * m.recall(),
                100.0 * m.exact_share(),
                started.elapsed().as_secs_f64()
            );
            rows.push((scenario, m));
        }
    }
    println!("\n{}", accuracy::table(&rows));
    println!("{}", accuracy::calibration_table(&rows));
    Ok(())
}
