//! A mesh of pods on one machine.
//!
//! Each pod is a network namespace with its own address on a bridge that
//! lives in a namespace of its own, so nothing is added to the host's network:
//! traffic stays on loopback and inside the namespaces this mesh created.
//! Host names (`api.partner.example`) come from `/etc/netns/<ns>/hosts`, which
//! `ip netns exec` mounts over `/etc/hosts`.
//!
//! A pod with a sidecar gets the iptables rules a mesh's init container would
//! install: the pod's inbound TCP goes to the sidecar's inbound listener, its
//! outbound TCP to the sidecar's outbound listener, except the sidecar's own
//! traffic (matched by its user) and loopback.
//!
//! Teardown happens on drop, after a failed assertion too; namespaces and
//! directories left by an interrupted run (whose process is gone) are removed
//! by the next run.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::cmd::{output, quietly, run};

/// The prefix of every namespace this harness creates.
pub const NS_PREFIX: &str = "ce2e";
/// The user sidecars run as.
pub const SIDECAR_USER: &str = "custody-proxy";
/// Sidecar inbound listener port (the redirect target of inbound traffic).
pub const INBOUND_PORT: u16 = 15006;
/// Sidecar outbound listener port (the redirect target of outbound traffic).
pub const OUTBOUND_PORT: u16 = 15001;
/// Sidecar admin port (not redirected).
pub const ADMIN_PORT: u16 = 15020;

/// One pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// The pod's short name (`web`).
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its address on the mesh bridge.
    pub ip: Ipv4Addr,
}

/// A mesh being built or running; dropping it tears everything down.
pub struct Mesh {
    id: String,
    bridge_ns: String,
    pods: Vec<Pod>,
    aliases: Vec<(String, Ipv4Addr)>,
    children: Vec<(String, Child)>,
    dir: PathBuf,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("id", &self.id)
            .field("pods", &self.pods)
            .finish_non_exhaustive()
    }
}

/// Removes namespaces (with their processes, database servers included) and
/// directories of earlier runs whose process no longer exists; directories
/// stay when `CUSTODY_E2E_KEEP` is set.
pub fn remove_stale() {
    if std::env::var_os("CUSTODY_E2E_KEEP").is_none()
        && let Ok(entries) = fs::read_dir(std::env::temp_dir())
    {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let mut parts = name.to_str().unwrap_or_default().split('-');
            if parts.next() != Some(NS_PREFIX) {
                continue;
            }
            let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let Ok(list) = run(&["ip", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let mut parts = ns.split('-');
        if parts.next() != Some(NS_PREFIX) {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_namespace(ns);
    }
    // The database pods' server directories.
    custody_testkit::remove_stale();
}

fn kill_namespace(ns: &str) {
    if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            quietly(&["kill", "-9", pid]);
        }
    }
    quietly(&["ip", "netns", "del", ns]);
    let _ = fs::remove_dir_all(format!("/etc/netns/{ns}"));
}

/// The uid of the sidecar user, created if missing.
pub fn sidecar_uid() -> anyhow::Result<u32> {
    if output(&["id", "-u", SIDECAR_USER])?.status.success() {
        return Ok(run(&["id", "-u", SIDECAR_USER])?.trim().parse()?);
    }
    run(&[
        "useradd",
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        SIDECAR_USER,
    ])?;
    Ok(run(&["id", "-u", SIDECAR_USER])?.trim().parse()?)
}

impl Mesh {
    /// A new, empty mesh. `label` (a few letters) tells concurrent meshes
    /// apart in namespace names.
    pub fn new(label: &str) -> anyhow::Result<Mesh> {
        ensure!(
            run(&["id", "-u"])?.trim() == "0",
            "the end-to-end mesh needs root (network namespaces, iptables)"
        );
        ensure!(
            label.len() <= 6 && label.bytes().all(|b| b.is_ascii_lowercase()),
            "mesh label must be at most 6 lowercase letters"
        );
        remove_stale();
        let id = format!("{NS_PREFIX}-{}-{label}", std::process::id());
        let dir = std::env::temp_dir().join(&id);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        // World-readable: sidecars run as their own user and read their configs here.
        run(&["chmod", "755", dir.to_str().context("temp dir path")?])?;
        let bridge_ns = format!("{id}-net");
        let mesh = Mesh {
            id,
            bridge_ns: bridge_ns.clone(),
            pods: Vec::new(),
            aliases: Vec::new(),
            children: Vec::new(),
            dir,
        };
        run(&["ip", "netns", "add", &bridge_ns])?;
        run(&[
            "ip", "-n", &bridge_ns, "link", "add", "br0", "type", "bridge",
        ])?;
        run(&["ip", "-n", &bridge_ns, "link", "set", "br0", "up"])?;
        run(&["ip", "-n", &bridge_ns, "link", "set", "lo", "up"])?;
        Ok(mesh)
    }

    /// The directory holding configs, data and logs of this mesh.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pods so far.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> anyhow::Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))
    }

    /// Adds a pod: a namespace with loopback up and an address on the bridge.
    pub fn add_pod(&mut self, name: &str) -> anyhow::Result<Pod> {
        ensure!(
            !name.is_empty() && name.len() <= 10 && name.bytes().all(|b| b.is_ascii_lowercase()),
            "pod name must be 1-10 lowercase letters"
        );
        let index = u8::try_from(self.pods.len() + 2).context("too many pods")?;
        let ip = Ipv4Addr::new(10, 77, 0, index);
        let ns = format!("{}-{name}", self.id);
        run(&["ip", "netns", "add", &ns])?;
        let peer = format!("v{index}");
        run(&[
            "ip",
            "-n",
            &ns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.bridge_ns,
        ])?;
        run(&[
            "ip",
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &peer,
            "master",
            "br0",
        ])?;
        run(&["ip", "-n", &self.bridge_ns, "link", "set", &peer, "up"])?;
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        let pod = Pod {
            name: name.to_owned(),
            ns,
            ip,
        };
        self.pods.push(pod.clone());
        self.write_hosts()?;
        Ok(pod)
    }

    /// Gives `pod` another name in every pod's `/etc/hosts` (a fake third
    /// party's public name).
    pub fn alias(&mut self, host: &str, pod: &Pod) -> anyhow::Result<()> {
        self.aliases.push((host.to_owned(), pod.ip));
        self.write_hosts()
    }

    fn write_hosts(&self) -> anyhow::Result<()> {
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for pod in &self.pods {
            hosts.push_str(&format!("{} {}\n", pod.ip, pod.name));
        }
        for (host, ip) in &self.aliases {
            hosts.push_str(&format!("{ip} {host}\n"));
        }
        for pod in &self.pods {
            let dir = PathBuf::from(format!("/etc/netns/{}", pod.ns));
            fs::create_dir_all(&dir)?;
            fs::write(dir.join("hosts"), &hosts)?;
        }
        Ok(())
    }

    /// Installs the sidecar redirect in `pod` (as a mesh's init container).
    pub fn redirect(&self, pod: &Pod, sidecar_uid: u32) -> anyhow::Result<()> {
        let uid = sidecar_uid.to_string();
        let inbound = INBOUND_PORT.to_string();
        let outbound = OUTBOUND_PORT.to_string();
        let admin = ADMIN_PORT.to_string();
        let rules: [&[&str]; 8] = [
            &["-t", "nat", "-N", "CUSTODY_OUT"],
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-j",
                "CUSTODY_OUT",
            ],
            &[
                "-t",
                "nat",
                "-A",
                "CUSTODY_OUT",
                "-m",
                "owner",
                "--uid-owner",
                &uid,
                "-j",
                "RETURN",
            ],
            &[
                "-t",
                "nat",
                "-A",
                "CUSTODY_OUT",
                "-d",
                "127.0.0.0/8",
                "-j",
                "RETURN",
            ],
            &[
                "-t",
                "nat",
                "-A",
                "CUSTODY_OUT",
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &outbound,
            ],
            &["-t", "nat", "-N", "CUSTODY_IN"],
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "-j",
                "CUSTODY_IN",
            ],
            &[
                "-t",
                "nat",
                "-A",
                "CUSTODY_IN",
                "-p",
                "tcp",
                "--dport",
                &admin,
                "-j",
                "RETURN",
            ],
        ];
        for rule in rules {
            let mut args = vec!["ip", "netns", "exec", &pod.ns, "iptables"];
            args.extend_from_slice(rule);
            run(&args)?;
        }
        run(&[
            "ip",
            "netns",
            "exec",
            &pod.ns,
            "iptables",
            "-t",
            "nat",
            "-A",
            "CUSTODY_IN",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &inbound,
        ])?;
        Ok(())
    }

    /// Starts `args` in `pod`, as `uid` when given; output goes to
    /// `<dir>/<log>.log`.
    pub fn spawn(
        &mut self,
        pod: &Pod,
        uid: Option<u32>,
        log: &str,
        args: &[&str],
    ) -> anyhow::Result<()> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{log}.log")))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.ns]);
        if let Some(uid) = uid {
            // setpriv execs in place (no forked parent left behind on kill).
            cmd.arg("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg("--");
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {log}: {}", args.join(" ")))?;
        self.children.push((log.to_owned(), child));
        Ok(())
    }

    /// Stops the process started under `log` (SIGTERM, then SIGKILL after
    /// `grace`; SIGKILL at once when `grace` is zero), and says whether it
    /// exited by itself.
    pub fn stop(&mut self, log: &str, grace: Duration) -> anyhow::Result<bool> {
        let index = self
            .children
            .iter()
            .position(|(name, _)| name == log)
            .with_context(|| format!("no process {log}"))?;
        let (_, mut child) = self.children.remove(index);
        if grace.is_zero() {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(false);
        }
        quietly(&["kill", "-TERM", &child.id().to_string()]);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Ok(false)
    }

    /// Checks every process is still running; names the first that is not,
    /// with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (log, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let text =
                    fs::read_to_string(self.dir.join(format!("{log}.log"))).unwrap_or_default();
                let tail: Vec<_> = text.lines().rev().take(15).collect();
                let tail: Vec<_> = tail.into_iter().rev().collect();
                bail!("{log} exited ({status}):\n{}", tail.join("\n"));
            }
        }
        Ok(())
    }

    /// Runs `args` in `pod` and returns its output.
    pub fn exec(&self, pod: &Pod, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let mut full = vec!["ip", "netns", "exec", &pod.ns];
        full.extend_from_slice(args);
        output(&full)
    }

    /// Waits until `url` answers 2xx from inside `pod`.
    pub fn wait_http(&mut self, pod: &Pod, url: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let out = self.exec(
                pod,
                &["curl", "-sf", "-o", "/dev/null", "--max-time", "2", url],
            )?;
            if out.status.success() {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("{url} did not answer from {} within {within:?}", pod.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pod in &self.pods {
            kill_namespace(&pod.ns);
        }
        kill_namespace(&self.bridge_ns);
        if std::env::var_os("CUSTODY_E2E_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
