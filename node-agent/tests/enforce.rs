//! The real agent binary, attached to a cgroup of this test's own making:
//! processes in the cgroup are refused the blocked destination with EPERM,
//! every connect is reported with its process, a policy change applies live,
//! and processes outside the cgroup are untouched.
//!
//! Needs root and cgroup v2 at /sys/fs/cgroup/unified (as on CI).

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

struct Fixture {
    dir: PathBuf,
    cgroup: PathBuf,
    agent: Option<Child>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
    let port = l.local_addr().expect("bound address").port();
    l.set_nonblocking(true).expect("non-blocking listener");
    (l, port)
}

fn bundle(version: u64, port: u16) -> String {
    serde_json::json!({
        "version": version,
        "defaultVerdict": "allow",
        "policies": [{
            "apiVersion": "custody.dev/v1",
            "kind": "EgressPolicy",
            "metadata": {"name": "contain"},
            "spec": {"rules": [
                {"name": "loopback-port", "destination": {"cidrs": ["127.0.0.1/32"], "ports": [port]}, "verdict": "block"},
                {"name": "tainted-only", "destination": {"cidrs": ["127.0.0.0/8"]}, "chain": {"taintAny": ["pii.ssn"]}, "verdict": "block"}
            ]}
        }]
    })
    .to_string()
}

/// Connects from a shell moved into `cgroup`; the shell's exit status says
/// whether `connect()` succeeded. The shell lingers a moment so the agent
/// can read its lineage from /proc.
fn connect_in_cgroup(cgroup: &Path, port: u16) -> (bool, String) {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec 3<>/dev/tcp/127.0.0.1/{port} && {{ sleep 0.3; true; }}",
        cgroup.display()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The complete records written so far.
fn flows(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).expect("each record is one JSON object"))
        .collect()
}

#[test]
fn blocks_reports_and_updates_live() {
    assert!(
        Path::new(CGROUP_ROOT).join("cgroup.procs").exists(),
        "cgroup v2 must be mounted at {CGROUP_ROOT}"
    );
    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("custody-agent-test-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let cgroup = Path::new(CGROUP_ROOT).join(format!("custody-agent-test-{id}"));
    std::fs::create_dir(&cgroup).unwrap();
    let mut fx = Fixture {
        dir: dir.clone(),
        cgroup: cgroup.clone(),
        agent: None,
    };

    let (_open, open_port) = listener();
    let (_blocked, blocked_port) = listener();
    let policy = dir.join("policy.json");
    let flows_file = dir.join("flows.jsonl");
    std::fs::write(&policy, bundle(1, blocked_port)).unwrap();
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "node: test-node\ncgroup: {}\npolicyFile: {}\nflowsFile: {}\npolicyPollMs: 50\n",
            cgroup.display(),
            policy.display(),
            flows_file.display()
        ),
    )
    .unwrap();

    let mut agent = Command::new(env!("CARGO_BIN_EXE_custody-agent"))
        .args(["--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(agent.stderr.take().unwrap());
    fx.agent = Some(agent);
    let mut lines = stderr.lines();
    let mut log = String::new();
    let (mut applied, mut attached) = (false, false);
    while !(applied && attached) {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("agent exited before attaching:\n{log}"))
            .unwrap();
        applied |= line.contains("policy applied");
        attached |= line.contains("attached");
        log.push_str(&line);
        log.push('\n');
    }
    std::thread::spawn(move || for _ in lines {});

    // In the cgroup: the open port connects, the blocked one is refused.
    let (ok, err) = connect_in_cgroup(&cgroup, open_port);
    assert!(ok, "open port refused: {err}");
    let (ok, err) = connect_in_cgroup(&cgroup, blocked_port);
    assert!(!ok, "blocked port connected");
    assert!(err.contains("Operation not permitted"), "{err}");

    // Outside the cgroup, nothing changes.
    TcpStream::connect(("127.0.0.1", blocked_port)).expect("outside the cgroup");

    // Both attempts were reported, with the process and the rule.
    wait_for("two flow records", || flows(&flows_file).len() >= 2);
    let records = flows(&flows_file);
    let of_port = |port: u16| {
        records
            .iter()
            .find(|r| r["dst_port"] == port)
            .unwrap_or_else(|| panic!("no flow to port {port}: {records:?}"))
            .clone()
    };
    let allowed = of_port(open_port);
    assert_eq!(allowed["verdict"], "allow");
    assert_eq!(allowed["dst_ip"], "127.0.0.1");
    assert_eq!(allowed["node"], "test-node");
    assert!(
        allowed["executable"].as_str().unwrap().ends_with("bash"),
        "{allowed}"
    );
    assert!(!allowed["lineage"].as_array().unwrap().is_empty());
    let blocked = of_port(blocked_port);
    assert_eq!(blocked["verdict"], "block");
    assert_eq!(blocked["policy"], "contain/loopback-port");
    assert_eq!(blocked["transport"], "tcp");

    // A new policy swaps the ports, without restarting the agent.
    std::fs::write(&policy, bundle(2, open_port)).unwrap();
    wait_for("the new policy to hold", || {
        !connect_in_cgroup(&cgroup, open_port).0
    });
    let (ok, err) = connect_in_cgroup(&cgroup, blocked_port);
    assert!(ok, "previously blocked port still refused: {err}");

    // An invalid policy keeps the last good one in force.
    std::fs::write(&policy, "{ not a bundle").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!connect_in_cgroup(&cgroup, open_port).0);

    // SIGTERM stops it.
    let mut agent = fx.agent.take().unwrap();
    let pid = agent.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = agent.try_wait().unwrap() {
            assert!(status.success(), "agent exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "agent ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Detached with the agent gone: the once-blocked port connects again.
    assert!(connect_in_cgroup(&cgroup, open_port).0);
}
