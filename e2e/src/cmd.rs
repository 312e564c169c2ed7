//! Running system commands with errors that say which command failed.

use std::process::{Command, Output};

use anyhow::{Context as _, bail};

/// Runs `args`, failing with its stderr when it exits non-zero.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = output(args)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `args` and returns its output whatever its status.
pub fn output(args: &[&str]) -> anyhow::Result<Output> {
    let (program, rest) = args.split_first().context("empty command")?;
    Command::new(program)
        .args(rest)
        .output()
        .with_context(|| format!("running `{}`", args.join(" ")))
}

/// Runs `args`, ignoring failure (teardown of things that may be gone).
pub fn quietly(args: &[&str]) {
    let _ = output(args);
}
