//! Starts a throwaway PostgreSQL or MariaDB server for scripts (benchmarks,
//! manual runs), prints how to reach it as shell variable assignments, and
//! keeps it up until its standard input closes or it gets SIGTERM/SIGINT.
//!
//! ```sh
//! custody-testdb postgres --shop > pg.env   # DB_HOST=… DB_PORT=… DB_USER=…
//! ```

use std::io::{Read as _, Write as _};
use std::net::IpAddr;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use custody_testkit::{MariaDb, Options, Postgres, SqlServer, fixtures};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    Postgres,
    Mariadb,
}

/// Start a throwaway database server and keep it up until stdin closes or a signal arrives.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Which server.
    kind: Kind,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1")]
    listen: IpAddr,
    /// Port (default: a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Database user.
    #[arg(long, default_value = "custody")]
    user: String,
    /// Database name.
    #[arg(long, default_value = "custody")]
    database: String,
    /// Server setting `name=value` (repeatable).
    #[arg(long = "setting", value_name = "NAME=VALUE")]
    settings: Vec<String>,
    /// Load the shop fixtures.
    #[arg(long)]
    shop: bool,
    /// Create the 100,000-row table `big`.
    #[arg(long)]
    big_table: bool,
    /// Keep running when stdin closes (stop on a signal only), for `cmd &` in scripts.
    #[arg(long)]
    ignore_stdin: bool,
}

/// The running server, kept until the end.
enum Server {
    Postgres(#[allow(dead_code, reason = "held to keep the server up")] Postgres),
    MariaDb(#[allow(dead_code, reason = "held to keep the server up")] MariaDb),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut opts = Options::default().listen(args.listen);
    opts.port = args.port;
    opts.user = args.user.clone();
    opts.database = args.database.clone();
    for s in &args.settings {
        let (name, value) = s
            .split_once('=')
            .with_context(|| format!("--setting `{s}` is not NAME=VALUE"))?;
        opts = opts.setting(name, value);
    }
    let (server, lines) = match args.kind {
        Kind::Postgres => {
            let pg = Postgres::start_with(opts).context("starting PostgreSQL")?;
            prepare(&pg, &args)?;
            let lines = vec![
                ("DB_KIND", "postgres".to_owned()),
                ("DB_HOST", pg.host()),
                ("DB_PORT", pg.port().to_string()),
                ("DB_USER", pg.user().to_owned()),
                ("DB_PASSWORD", pg.password().to_owned()),
                ("DB_NAME", pg.database().to_owned()),
                ("DB_URL", pg.url()),
                ("DB_SOCKET", pg.socket_dir().display().to_string()),
                ("DB_BIN", pg.bin_dir().display().to_string()),
            ];
            (Server::Postgres(pg), lines)
        }
        Kind::Mariadb => {
            let db = MariaDb::start_with(opts).context("starting MariaDB")?;
            prepare(&db, &args)?;
            let lines = vec![
                ("DB_KIND", "mariadb".to_owned()),
                ("DB_HOST", db.host()),
                ("DB_PORT", db.port().to_string()),
                ("DB_USER", db.user().to_owned()),
                ("DB_PASSWORD", db.password().to_owned()),
                ("DB_NAME", db.database().to_owned()),
                ("DB_URL", db.url()),
                ("DB_SOCKET", db.socket().display().to_string()),
            ];
            (Server::MariaDb(db), lines)
        }
    };
    let mut out = std::io::stdout().lock();
    for (name, value) in lines {
        writeln!(out, "{name}='{value}'")?;
    }
    writeln!(out, "DB_READY=1")?;
    out.flush()?;
    drop(out);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(wait(args.ignore_stdin))?;
    drop(server);
    Ok(())
}

fn prepare(db: &impl SqlServer, args: &Args) -> anyhow::Result<()> {
    if args.shop {
        fixtures::load_shop(db).context("loading the shop fixtures")?;
    }
    if args.big_table {
        fixtures::create_big_table(db, "big").context("creating the big table")?;
    }
    Ok(())
}

/// Returns when stdin reaches its end (unless ignored), or on SIGTERM/SIGINT.
async fn wait(ignore_stdin: bool) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // A plain thread reads stdin: it stays blocked in read() when a signal
    // ends the process, which nothing needs to wait for.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    if !ignore_stdin {
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            let _ = closed_tx.send(());
        });
    }
    let stdin_closed = async {
        // Without a reader the sender is dropped: wait forever then.
        if closed_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        () = stdin_closed => {}
    }
    Ok(())
}
