//! Helpers shared by the server tests.
#![allow(dead_code, reason = "each test binary uses part of it")]

use std::process::Command;

use custody_testkit::fixtures::Shop;

/// Runs `cmd`, panicking with its stderr when it fails; returns stdout.
pub(crate) fn output(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The sum of all order amounts in the standard shop, as `1234.56`.
pub(crate) fn total_amount() -> String {
    let cents: i64 = Shop::standard().orders.iter().map(|o| o.amount_cents).sum();
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// A network namespace with loopback up, removed on drop.
pub(crate) struct Netns(pub(crate) String);

impl Netns {
    pub(crate) fn new(tag: &str) -> Netns {
        remove_stale_namespaces();
        let name = format!("ctk-{}-{tag}", std::process::id());
        output(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns(name);
        output(Command::new("ip").args(["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"]));
        ns
    }

    pub(crate) fn prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.0].map(str::to_owned).to_vec()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Removes namespaces left by test runs that were killed.
fn remove_stale_namespaces() {
    let list = output(Command::new("ip").args(["netns", "list"]));
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let mut parts = ns.split('-');
        if parts.next() != Some("ctk") {
            continue;
        }
        let Some(pid) = parts.next() else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
