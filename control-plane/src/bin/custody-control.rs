//! `custody-control`: the control-plane server.
//!
//! ```text
//! custody-control --config /etc/custody/control.yaml
//! ```
//!
//! Prints one line `listening grpc=ADDR http=ADDR` on stdout once both
//! listeners are bound (useful with port 0), then logs to stderr. Stops on
//! SIGTERM or SIGINT, letting requests in flight finish.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use custody_control::{config::Config, server};

// Ingest and assembly allocate and free many small strings per event;
// glibc's allocator took an eighth of the server's CPU time there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Custody control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The configuration file (YAML).
    #[arg(long, env = "CUSTODY_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let config = Config::load(&args.config)
        .with_context(|| format!("configuration {}", args.config.display()))?;
    let running = server::start(&config).await.context("starting")?;
    #[allow(clippy::print_stdout)] // the one line a supervisor or test reads
    {
        println!(
            "listening grpc={} http={}",
            running.grpc_addr, running.http_addr
        );
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
