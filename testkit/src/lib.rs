//! Throwaway real database servers for Custody's tests and benchmarks.
//!
//! [`Postgres`] starts a PostgreSQL cluster and [`MariaDb`] a MariaDB server,
//! each in a temporary directory of its own, on a free port, with a password
//! user and a database made for the test. Dropping the handle stops the
//! server and removes its directory; [`remove_stale`] removes what a killed
//! test run left behind. [`fixtures`] holds the "shop" schema with
//! deterministic fake customers (emails, phone numbers, SSNs, card numbers)
//! and a large table for result-set tests. [`service_account`] stands in
//! for a Kubernetes service-account issuer: an RSA or P-256 key made with
//! `openssl`, its JWKS, and projected service-account tokens signed with it.
//!
//! Servers refuse to run as root, so when the tests run as root the servers
//! run as the system user [`DEFAULT_OS_USER`] (created if missing); otherwise
//! they run as the current user. An [`Options::command_prefix`] such as
//! `ip netns exec <ns>` runs a server inside a network namespace.
//!
//! ```no_run
//! use custody_testkit::{Postgres, SqlServer, fixtures};
//!
//! let pg = Postgres::start()?;
//! fixtures::load_shop(&pg)?;
//! let count = pg.execute("SELECT count(*) FROM customers")?;
//! assert_eq!(count.trim(), "50");
//! // A client connects with `pg.conninfo()` (key=value) or `pg.url()`.
//! # Ok::<(), custody_testkit::Error>(())
//! ```

pub mod fixtures;
mod mariadb;
mod postgres;
pub mod service_account;
mod sys;

use std::net::{IpAddr, Ipv4Addr};

pub use fixtures::Dialect;
pub use mariadb::MariaDb;
pub use postgres::Postgres;
pub use sys::remove_stale;

/// The system user servers run as when the tests run as root.
pub const DEFAULT_OS_USER: &str = "custody-test";

/// What can go wrong starting or driving a server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program could not be started at all.
    #[error("running `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        source: std::io::Error,
    },
    /// A program exited with a failure status.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line (passwords are not on it).
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// File-system work in the server's directory failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The server did not come up; the end of its log says why.
    #[error("{server} did not start: {log}")]
    NotReady {
        /// Which server.
        server: &'static str,
        /// The end of its log.
        log: String,
    },
    /// A server program is not installed.
    #[error("{0} not found: install it with scripts/install-deps")]
    Missing(String),
    /// An option is not acceptable.
    #[error("invalid option: {0}")]
    InvalidOption(String),
}

/// How to start a server. [`Options::default`] is a loopback server on a free
/// port with user and database `custody` and a random password.
#[derive(Clone, Debug)]
pub struct Options {
    /// The address the server listens on (default `127.0.0.1`).
    pub listen: IpAddr,
    /// The port; `None` picks a free one on the host's loopback.
    pub port: Option<u16>,
    /// Words run before the server program, e.g. `["ip", "netns", "exec", "ns1"]`.
    pub command_prefix: Vec<String>,
    /// The system user the server runs as when we are root.
    pub os_user: String,
    /// The database user clients log in as (password authentication over TCP).
    pub user: String,
    /// The database created for that user.
    pub database: String,
    /// The user's password; `None` generates a random one.
    pub password: Option<String>,
    /// Server settings: `-c name=value` for PostgreSQL, `--name=value` for MariaDB.
    pub settings: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: None,
            command_prefix: Vec::new(),
            os_user: DEFAULT_OS_USER.to_owned(),
            user: "custody".to_owned(),
            database: "custody".to_owned(),
            password: None,
            settings: Vec::new(),
        }
    }
}

impl Options {
    /// Listen on `addr` instead of loopback.
    pub fn listen(mut self, addr: IpAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Listen on `port` instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Run the server behind `prefix` (e.g. `ip netns exec ns1`).
    pub fn command_prefix<S: AsRef<str>>(mut self, prefix: &[S]) -> Self {
        self.command_prefix = prefix.iter().map(|s| s.as_ref().to_owned()).collect();
        self
    }

    /// Add a server setting.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Checks names that end up in SQL and command lines.
    fn validate(&self) -> Result<(), Error> {
        let ident = |what: &str, s: &str| {
            let ok = !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if ok {
                Ok(())
            } else {
                Err(Error::InvalidOption(format!(
                    "{what} `{s}` must be a lowercase identifier"
                )))
            }
        };
        ident("user", &self.user)?;
        ident("database", &self.database)?;
        if let Some(pw) = &self.password
            && (pw.is_empty() || !pw.bytes().all(|b| b.is_ascii_alphanumeric()))
        {
            return Err(Error::InvalidOption(
                "password must be non-empty and alphanumeric".to_owned(),
            ));
        }
        for (name, value) in &self.settings {
            let fine = |s: &str| {
                s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b))
            };
            if name.is_empty() || !fine(name) || !fine(value) {
                return Err(Error::InvalidOption(format!("setting `{name}`")));
            }
        }
        Ok(())
    }
}

/// A running server the fixtures can load SQL into.
pub trait SqlServer {
    /// The server's SQL dialect.
    fn dialect(&self) -> Dialect;

    /// Runs `sql` (one or more statements) as the test user in the test
    /// database, through the command-line client on the server's Unix
    /// socket, and returns what it printed: rows tab-separated, one a line,
    /// no headers.
    fn execute(&self, sql: &str) -> Result<String, Error>;
}
