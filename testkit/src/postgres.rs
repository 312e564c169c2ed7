//! A throwaway PostgreSQL cluster.

use std::fmt;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::sys::{self, command, run};
use crate::{Dialect, Error, Options, SqlServer};

/// The superuser, reachable only through the Unix socket in the cluster's
/// directory (which only the server's user and root can enter).
const SUPERUSER: &str = "postgres";

/// A running PostgreSQL cluster in a temporary directory. Clients log in over
/// TCP with SCRAM-SHA-256 as [`Postgres::user`]; dropping it stops the server
/// (fast shutdown, then kill) and removes the directory.
pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    os_user: Option<String>,
    listen: IpAddr,
    port: u16,
    user: String,
    password: String,
    database: String,
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("dir", &self.dir.path())
            .field("addr", &self.addr())
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// The directory of the newest installed PostgreSQL's programs
/// (`CUSTODY_PG_BIN` overrides).
pub(crate) fn bin_dir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os("CUSTODY_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| Error::Missing("PostgreSQL server (/usr/lib/postgresql/*/bin)".to_owned()))
}

impl Postgres {
    /// Starts a cluster with [`Options::default`].
    pub fn start() -> Result<Postgres, Error> {
        Postgres::start_with(Options::default())
    }

    /// Starts a cluster: `initdb`, `pg_hba.conf` (trust on the socket,
    /// `scram-sha-256` over TCP), `pg_ctl start -w`, then the user and its
    /// database. Retries on another port if the chosen one was taken.
    pub fn start_with(opts: Options) -> Result<Postgres, Error> {
        opts.validate()?;
        sys::remove_stale();
        let bin = bin_dir()?;
        let owner = sys::server_user(&opts.os_user)?;
        let dir = sys::server_dir("pg", owner.as_ref())?;
        let os_user = owner.map(|(name, _, _)| name);
        let mut pg = Postgres {
            dir,
            bin,
            os_user,
            listen: opts.listen,
            port: 0,
            user: opts.user.clone(),
            password: opts.password.clone().unwrap_or_else(sys::random_password),
            database: opts.database.clone(),
        };
        pg.initdb(&opts)?;
        let mut attempts = if opts.port.is_some() { 1 } else { 3 };
        loop {
            pg.port = match opts.port {
                Some(p) => p,
                None => sys::free_port()?,
            };
            match pg.pg_ctl_start(&opts) {
                Ok(()) => break,
                Err(e) => {
                    attempts -= 1;
                    let taken = sys::log_tail(&pg.log_file()).contains("already in use");
                    if attempts == 0 || !taken {
                        return Err(e);
                    }
                }
            }
        }
        pg.superuser_sql(&format!(
            "CREATE ROLE {user} LOGIN PASSWORD '{pw}';\n\
             CREATE DATABASE {db} OWNER {user};",
            user = pg.user,
            pw = pg.password,
            db = pg.database,
        ))?;
        Ok(pg)
    }

    fn initdb(&self, opts: &Options) -> Result<(), Error> {
        let data = self.data_dir();
        run(
            self.as_server(Vec::new(), "initdb").args([
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-locale".as_ref(),
                "--no-sync".as_ref(),
            ]),
            None,
        )?;
        write(
            &data.join("pg_hba.conf"),
            "# custody-testkit: the superuser on the socket, everyone else with a password\n\
             local all all trust\n\
             host all all 0.0.0.0/0 scram-sha-256\n\
             host all all ::/0 scram-sha-256\n",
        )?;
        let mut conf = fs::read_to_string(data.join("postgresql.conf")).unwrap_or_default();
        conf.push_str("\n# custody-testkit\n");
        let socket = self.dir.path().display();
        let fixed = [
            ("listen_addresses", format!("'{}'", self.listen)),
            ("unix_socket_directories", format!("'{socket}'")),
            ("password_encryption", "'scram-sha-256'".to_owned()),
            ("ssl", "off".to_owned()),
            // Throwaway data: durability buys nothing and costs the disk.
            ("fsync", "off".to_owned()),
            ("synchronous_commit", "off".to_owned()),
            ("full_page_writes", "off".to_owned()),
            ("logging_collector", "off".to_owned()),
        ];
        for (name, value) in fixed {
            conf.push_str(&format!("{name} = {value}\n"));
        }
        for (name, value) in &opts.settings {
            conf.push_str(&format!("{name} = '{value}'\n"));
        }
        write(&data.join("postgresql.conf"), &conf)
    }

    fn pg_ctl_start(&self, opts: &Options) -> Result<(), Error> {
        let data = self.data_dir();
        let log = self.log_file();
        let port = format!("-p {}", self.port);
        run(
            self.as_server(opts.command_prefix.clone(), "pg_ctl").args([
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                port.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ]),
            None,
        )
        .map_err(|e| Error::NotReady {
            server: "PostgreSQL",
            log: format!("{e}\n{}", sys::log_tail(&log)),
        })
        .map(drop)
    }

    /// A command running one of the server's programs as the server's user.
    fn as_server(&self, prefix: Vec<String>, program: &str) -> Command {
        command(
            &prefix,
            self.os_user.as_deref(),
            &self.bin.join(program).to_string_lossy(),
            self.dir.path(),
        )
    }

    /// `psql` on the Unix socket as `user` in `database`, reading `sql`.
    fn psql(&self, user: &str, database: &str, sql: &str) -> Result<String, Error> {
        let psql = self.bin.join("psql");
        let mut cmd = Command::new(psql);
        cmd.current_dir(self.dir.path())
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", user, "-d", database])
            .args(["-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1"]);
        run(&mut cmd, Some(sql))
    }

    /// Runs `sql` as the superuser in the `postgres` database.
    pub fn superuser_sql(&self, sql: &str) -> Result<String, Error> {
        self.psql(SUPERUSER, "postgres", sql)
    }

    /// The host clients connect to (the listen address).
    pub fn host(&self) -> String {
        self.listen.to_string()
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Listen address and port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen, self.port)
    }

    /// The password user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Its password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Its database.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// A libpq key/value connection string (also what `tokio_postgres::connect` takes).
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user={} password={} dbname={} sslmode=disable",
            self.host(),
            self.port,
            self.user,
            self.password,
            self.database
        )
    }

    /// A `postgres://` URL.
    pub fn url(&self) -> String {
        let host = match self.listen {
            IpAddr::V6(a) => format!("[{a}]"),
            IpAddr::V4(a) => a.to_string(),
        };
        format!(
            "postgres://{}:{}@{host}:{}/{}?sslmode=disable",
            self.user, self.password, self.port, self.database
        )
    }

    /// The directory holding the data directory, the socket and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The Unix socket directory (`psql -h <this>`).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server log.
    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The directory of the PostgreSQL programs used (`pgbench`, `psql`).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Stops the server: fast shutdown, then kill. Idempotent.
    pub fn stop(&mut self) {
        let data = self.data_dir();
        let pid_file = data.join("postmaster.pid");
        let Some(pid) = sys::read_pid(&pid_file) else {
            return;
        };
        let stopped = run(
            self.as_server(Vec::new(), "pg_ctl").args([
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "10".as_ref(),
                "stop".as_ref(),
            ]),
            None,
        );
        if stopped.is_err() && sys::alive(pid) {
            sys::kill(pid, "KILL");
        }
        let _ = fs::remove_file(pid_file);
    }
}

impl SqlServer for Postgres {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&self, sql: &str) -> Result<String, Error> {
        self.psql(&self.user, &self.database, sql)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    fs::write(path, text).map_err(|source| Error::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}
