//! Processes, users, ports and directories shared by both servers.

use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng as _;
use tempfile::TempDir;

use crate::Error;

/// Where server directories live; short, so Unix socket paths fit.
const TMP: &str = "/tmp";
/// The prefix of every server directory: `custody-testkit-<pid>-<kind>-`.
const DIR_PREFIX: &str = "custody-testkit-";

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The system user servers run as, created if missing; `None` when we are
/// not root (servers then run as the current user).
pub(crate) fn server_user(name: &str) -> Result<Option<(String, u32, u32)>, Error> {
    if !is_root() {
        return Ok(None);
    }
    let ids = |name: &str| -> Option<(u32, u32)> {
        let id = |flag: &str| {
            let out = Command::new("id").args([flag, name]).output().ok()?;
            out.status.success().then_some(())?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        Some((id("-u")?, id("-g")?))
    };
    // Tests start servers concurrently: one creation at a time in this
    // process, and another process may hold the passwd lock for a moment.
    static CREATING: Mutex<()> = Mutex::new(());
    let _one = CREATING.lock().unwrap_or_else(|e| e.into_inner());
    let mut attempts = 0;
    while ids(name).is_none() {
        let created = run(
            Command::new("useradd").args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ]),
            None,
        );
        attempts += 1;
        match created {
            Ok(_) => {}
            Err(e) if attempts >= 5 => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let (uid, gid) = ids(name).ok_or_else(|| Error::Missing(format!("system user {name}")))?;
    Ok(Some((name.to_owned(), uid, gid)))
}

/// A fresh directory for one server, owned by the user it runs as.
pub(crate) fn server_dir(kind: &str, owner: Option<&(String, u32, u32)>) -> Result<TempDir, Error> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-{kind}-", std::process::id()))
        .tempdir_in(TMP)
        .map_err(|source| Error::Io {
            what: format!("creating a directory in {TMP}"),
            source,
        })?;
    if let Some((_, uid, gid)) = owner {
        chown(dir.path(), *uid, *gid)?;
    }
    Ok(dir)
}

/// Gives `path` to `uid:gid`.
pub(crate) fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| Error::Io {
        what: format!("chown {}", path.display()),
        source,
    })
}

/// A port nobody listens on right now on the host's loopback. Another
/// process may take it before the server binds it: callers retry.
pub(crate) fn free_port() -> Result<u16, Error> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| Error::Io {
            what: "finding a free port".to_owned(),
            source,
        })
}

/// A random alphanumeric password.
pub(crate) fn random_password() -> String {
    let mut rng = rand::thread_rng();
    (0..24)
        .map(|_| char::from(rng.sample(rand::distributions::Alphanumeric)))
        .collect()
}

/// `prefix… [runuser -u user --] program`, working in `cwd`.
pub(crate) fn command(prefix: &[String], user: Option<&str>, program: &str, cwd: &Path) -> Command {
    let mut words: Vec<&str> = prefix.iter().map(String::as_str).collect();
    if let Some(user) = user {
        words.extend(["runuser", "-u", user, "--"]);
    }
    words.push(program);
    let mut cmd = Command::new(words[0]);
    cmd.args(&words[1..]).current_dir(cwd);
    cmd
}

/// Runs `cmd` to completion with `stdin`, returning its stdout, or an error
/// with its stderr when it fails.
pub(crate) fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String, Error> {
    let command = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A program that exits early closes the pipe: its status tells why.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line of `cmd`, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sends `signal` (`TERM`, `KILL`, …) to `pid`; gone processes are fine.
pub(crate) fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Whether `pid` is a live process (not a zombie).
pub(crate) fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesised command name.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

/// The pid on the first line of a pid file.
pub(crate) fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The last lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// Server pid files inside a server directory, as this crate lays them out.
const PID_FILES: [&str; 2] = ["data/postmaster.pid", "mariadbd.pid"];

/// Stops servers and removes directories left by test runs that were killed
/// (their process is gone). Safe to call at any time; every start calls it.
pub fn remove_stale() {
    let Ok(entries) = fs::read_dir(TMP) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if alive(owner) {
            continue;
        }
        let dir = entry.path();
        for file in PID_FILES {
            if let Some(pid) = read_pid(&dir.join(file))
                && is_server(pid)
            {
                kill(pid, "KILL");
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Whether `pid` runs a database server (so a recycled pid is left alone).
fn is_server(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| matches!(comm.trim(), "postgres" | "mariadbd" | "mysqld"))
}
