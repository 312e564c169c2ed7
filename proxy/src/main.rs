//! `custody-proxy`: runs the sidecar from a YAML configuration file.
//!
//! ```text
//! custody-proxy --config /etc/custody/proxy.yaml
//! ```

use std::path::PathBuf;

use anyhow::Context as _;
use custody_proxy::Sidecar;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let mut args = std::env::args().skip(1);
    let mut config = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => config = args.next().map(PathBuf::from),
            other => {
                anyhow::bail!("unknown argument {other:?}; usage: custody-proxy --config FILE")
            }
        }
    }
    let path = config
        .or_else(|| std::env::var_os("CUSTODY_PROXY_CONFIG").map(PathBuf::from))
        .context("no configuration: pass --config FILE or set CUSTODY_PROXY_CONFIG")?;
    let sidecar = Sidecar::from_file(&path)
        .with_context(|| format!("cannot start from {}", path.display()))?;
    tracing::info!(message = "custody-proxy starting", config = %path.display());
    sidecar.run();
    tracing::info!(message = "custody-proxy stopped");
    Ok(())
}
