//! A throwaway MariaDB server.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::sys::{self, command, run};
use crate::{Dialect, Error, Options, SqlServer};

/// How long a server gets to come up or to shut down.
const START_WITHIN: Duration = Duration::from_secs(60);
const STOP_WITHIN: Duration = Duration::from_secs(15);

/// A running MariaDB server in a temporary directory. Clients log in over TCP
/// with `mysql_native_password` as [`MariaDb::user`]; dropping it stops the
/// server (SIGTERM, then kill) and removes the directory.
pub struct MariaDb {
    dir: TempDir,
    child: Option<Child>,
    listen: IpAddr,
    port: u16,
    user: String,
    password: String,
    database: String,
}

impl fmt::Debug for MariaDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MariaDb")
            .field("dir", &self.dir.path())
            .field("addr", &self.addr())
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl MariaDb {
    /// Starts a server with [`Options::default`].
    pub fn start() -> Result<MariaDb, Error> {
        MariaDb::start_with(Options::default())
    }

    /// Starts a server: `mariadb-install-db` into the temporary directory,
    /// `mariadbd` on the chosen address and port with its socket in the
    /// directory, then the user (`mysql_native_password`, any host) and its
    /// database. Retries on another port if the chosen one was taken.
    pub fn start_with(opts: Options) -> Result<MariaDb, Error> {
        opts.validate()?;
        sys::remove_stale();
        let owner = sys::server_user(&opts.os_user)?;
        let dir = sys::server_dir("mariadb", owner.as_ref())?;
        let os_user = owner.as_ref().map(|(name, _, _)| name.clone());
        let mut db = MariaDb {
            dir,
            child: None,
            listen: opts.listen,
            port: 0,
            user: opts.user.clone(),
            password: opts.password.clone().unwrap_or_else(sys::random_password),
            database: opts.database.clone(),
        };
        // A temporary directory of its own: concurrent servers sharing /tmp
        // have collided on their temporary table names.
        let tmp = db.dir.path().join("tmp");
        std::fs::create_dir(&tmp).map_err(|source| Error::Io {
            what: format!("creating {}", tmp.display()),
            source,
        })?;
        if let Some((_, uid, gid)) = &owner {
            sys::chown(&tmp, *uid, *gid)?;
        }
        let datadir = format!("--datadir={}", db.data_dir().display());
        let tmpdir = format!("--tmpdir={}", tmp.display());
        let mut install = Command::new("mariadb-install-db");
        install.current_dir(db.dir.path()).args([
            "--no-defaults",
            &datadir,
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            &tmpdir,
        ]);
        if let Some(user) = &os_user {
            install.arg(format!("--user={user}"));
        }
        run(&mut install, None).map_err(|e| match e {
            Error::Spawn { .. } => Error::Missing("mariadb-install-db (mariadb-server)".to_owned()),
            e => e,
        })?;
        let mut attempts = if opts.port.is_some() { 1 } else { 3 };
        loop {
            db.port = match opts.port {
                Some(p) => p,
                None => sys::free_port()?,
            };
            match db.spawn(&opts, os_user.as_deref()) {
                Ok(()) => break,
                Err(e) => {
                    attempts -= 1;
                    let taken = sys::log_tail(&db.log_file()).contains("already in use");
                    if attempts == 0 || !taken {
                        return Err(e);
                    }
                }
            }
        }
        db.root_sql(&format!(
            "DELETE FROM mysql.global_priv WHERE User = '';\n\
             FLUSH PRIVILEGES;\n\
             CREATE DATABASE {db};\n\
             CREATE USER '{user}'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('{pw}');\n\
             GRANT ALL ON {db}.* TO '{user}'@'%';",
            db = db.database,
            user = db.user,
            pw = db.password,
        ))?;
        Ok(db)
    }

    /// Starts `mariadbd` and waits until it answers on its socket.
    fn spawn(&mut self, opts: &Options, os_user: Option<&str>) -> Result<(), Error> {
        let dir = self.dir.path();
        let mut cmd = command(&opts.command_prefix, None, "mariadbd", dir);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", self.data_dir().display()))
            .arg(format!("--port={}", self.port))
            .arg(format!("--bind-address={}", self.listen))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--pid-file={}", dir.join("mariadbd.pid").display()))
            .arg(format!("--log-error={}", self.log_file().display()))
            .arg(format!("--tmpdir={}", dir.join("tmp").display()))
            .arg("--skip-name-resolve")
            .arg("--skip-log-bin")
            .arg("--max-connections=500")
            // Throwaway data: durability buys nothing and costs the disk.
            .arg("--innodb-flush-log-at-trx-commit=0")
            .arg("--innodb-doublewrite=0");
        if let Some(user) = os_user {
            cmd.arg(format!("--user={user}"));
        }
        for (name, value) in &opts.settings {
            cmd.arg(format!("--{name}={value}"));
        }
        let command = sys::describe(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn { command, source })?;
        self.child = Some(child);
        let deadline = Instant::now() + START_WITHIN;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(Error::NotReady {
                    server: "MariaDB",
                    log: format!(
                        "mariadbd exited ({status})\n{}",
                        sys::log_tail(&self.log_file())
                    ),
                });
            }
            if self.socket().exists() && self.admin(&["ping"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(Error::NotReady {
                    server: "MariaDB",
                    log: sys::log_tail(&self.log_file()),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn admin(&self, args: &[&str]) -> Result<String, Error> {
        let mut cmd = Command::new("mariadb-admin");
        cmd.current_dir(self.dir.path())
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-u", "root", "--connect-timeout=2"])
            .args(args);
        run(&mut cmd, None)
    }

    /// The `mariadb` client on the socket as `user`, reading `sql`.
    fn client(
        &self,
        user: &str,
        password: Option<&str>,
        database: Option<&str>,
        sql: &str,
    ) -> Result<String, Error> {
        let mut cmd = Command::new("mariadb");
        cmd.current_dir(self.dir.path())
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-u", user, "--batch", "--skip-column-names"]);
        match password {
            Some(pw) => cmd.env("MYSQL_PWD", pw),
            None => cmd.env_remove("MYSQL_PWD"),
        };
        if let Some(db) = database {
            cmd.arg(db);
        }
        run(&mut cmd, Some(sql))
    }

    /// Runs `sql` as `root` (on the socket only).
    pub fn root_sql(&self, sql: &str) -> Result<String, Error> {
        self.client("root", None, None, sql)
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

    /// A `mysql://` URL (what `mysql_async::Opts::from_url` takes).
    pub fn url(&self) -> String {
        let host = match self.listen {
            IpAddr::V6(a) => format!("[{a}]"),
            IpAddr::V4(a) => a.to_string(),
        };
        format!(
            "mysql://{}:{}@{host}:{}/{}",
            self.user, self.password, self.port, self.database
        )
    }

    /// The directory holding the data directory, the socket and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mariadbd.sock")
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The error log.
    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("error.log")
    }

    /// Stops the server: SIGTERM, then kill after 15 s. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        sys::kill(child.id(), "TERM");
        let deadline = Instant::now() + STOP_WITHIN;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl SqlServer for MariaDb {
    fn dialect(&self) -> Dialect {
        Dialect::MySql
    }

    fn execute(&self, sql: &str) -> Result<String, Error> {
        self.client(&self.user, Some(&self.password), Some(&self.database), sql)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}
