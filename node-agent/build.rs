//! Compiles the eBPF program with clang (`apt-get install clang libbpf-dev`);
//! the object is embedded in the agent binary.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "bpf/connect.bpf.c";
    println!("cargo:rerun-if-changed={source}");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("connect.bpf.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    // The kernel headers' asm/ directory lives under the multiarch triple.
    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", source, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile {source}: {s}"),
        Err(e) => panic!(
            "cannot run {clang} to compile {source} ({e}); install it with `apt-get install clang libbpf-dev`"
        ),
    }
}
