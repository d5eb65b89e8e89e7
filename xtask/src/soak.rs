//! `cargo xtask soak --minutes N`: builds lb-daemon (release), the BPF object and lb-soak,
//! then runs lb-soak (see `tests/src/bin/lb-soak.rs`): one daemon on the tc data plane and the
//! proxy under mixed TCP/UDP load for N minutes, with reloads every 10 s and a backend stopped
//! every 30 s, printing failures, resident memory and descriptors over time. Needs root.

use std::process::{Command, ExitCode};

use anyhow::Result;

use crate::{build_ebpf, util};

/// Builds what the soak runs and runs it for `minutes`; returns lb-soak's verdict as the exit
/// code. `Err` when a build fails.
pub fn run(minutes: u64) -> Result<ExitCode> {
    let object = util::step("build-ebpf --release", || build_ebpf::run(true))?;
    let root = util::workspace_root();
    util::step("build lb-daemon and lb-soak (release)", || {
        util::run(
            Command::new("cargo")
                .args([
                    "build",
                    "--release",
                    "-p",
                    "lb-daemon",
                    "-p",
                    "lb-tests",
                    "--bin",
                    "lb-daemon",
                    "--bin",
                    "lb-soak",
                ])
                .current_dir(&root),
        )
    })?;
    let release = util::target_dir()?.join("release");
    let mut soak = Command::new(release.join("lb-soak"));
    soak.args(["--minutes", &minutes.to_string()])
        .current_dir(&root)
        .env("LB_EBPF_OBJ", &object)
        .env("LB_DAEMON_BIN", release.join("lb-daemon"));
    Ok(match util::run(&mut soak) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    })
}
