//! Process lineage from `/proc`: the executable of a process and of its
//! ancestors, for attributing a connection to what started it.

use std::fs;
use std::path::Path;

/// The most ancestors followed.
pub const MAX_DEPTH: usize = 8;

/// A process and its executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: u32,
    /// Path of the executable, or the command name when it cannot be read.
    pub executable: String,
}

/// The parent pid from the text of `/proc/<pid>/stat`. The command name in
/// parentheses may itself contain spaces and parentheses, so parse after the
/// last `)`.
pub fn parent_from_stat(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

fn process(proc_root: &Path, pid: u32) -> Option<(ProcessInfo, u32)> {
    let dir = proc_root.join(pid.to_string());
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    let parent = parent_from_stat(&stat)?;
    let executable = fs::read_link(dir.join("exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .or_else(|_| fs::read_to_string(dir.join("comm")).map(|c| c.trim().to_owned()))
        .unwrap_or_default();
    Some((ProcessInfo { pid, executable }, parent))
}

/// The process and its ancestors, nearest first, up to [`MAX_DEPTH`]
/// ancestors; stops at pid 1 or when a process has gone.
pub fn lineage(proc_root: &Path, pid: u32) -> Vec<ProcessInfo> {
    let mut out = Vec::new();
    let mut next = pid;
    while next > 0 && out.len() <= MAX_DEPTH {
        let Some((info, parent)) = process(proc_root, next) else {
            break;
        };
        out.push(info);
        if next == 1 {
            break;
        }
        next = parent;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        assert_eq!(parent_from_stat("42 (bash) S 7 42 42 0"), Some(7));
        assert_eq!(parent_from_stat("42 (a b) c)) R 9 1"), Some(9));
        assert_eq!(parent_from_stat("42 (x"), None);
        assert_eq!(parent_from_stat(""), None);
    }

    #[test]
    fn follows_this_process_to_its_parent() {
        let me = std::process::id();
        let chain = lineage(Path::new("/proc"), me);
        assert_eq!(chain[0].pid, me);
        assert!(chain[0].executable.contains('/'), "{:?}", chain[0]);
        assert!(chain.len() >= 2, "a test process has a parent: {chain:?}");
        assert!(chain.len() <= MAX_DEPTH + 1);
    }

    #[test]
    fn a_gone_process_has_no_lineage() {
        assert!(lineage(Path::new("/proc"), u32::MAX - 1).is_empty());
    }
}
