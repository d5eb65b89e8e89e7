//! `cargo xtask fuzz --minutes N [--target T]`: runs the cargo-fuzz targets of `fuzz/` (the
//! bodies are `lb_daemon::fuzzing`) for N minutes each with libFuzzer, installing the nightly
//! and cargo-fuzz when missing.
//!
//! The seeds in `fuzz/corpus/<target>/` are read, never written: what a run finds goes to
//! `target/fuzz-corpus/<target>/`. A crash stops the run; libFuzzer saves the input under
//! `fuzz/artifacts/<target>/`, and once the bug is fixed the input belongs in
//! `fuzz/regressions/<target>/`, which `cargo test` runs (`lb-daemon/tests/fuzz_corpus.rs`).

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

use crate::{
    build_ebpf,
    util::{self, say},
};

/// Every target, in the order they run.
pub const TARGETS: [&str; 3] = ["config", "admin_request", "relay"];
/// The cargo-fuzz release installed when none is.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Runs `targets` (all when empty) for `minutes` each. Returns failure when one crashed (the
/// rest still run), `Err` when a tool cannot be installed or a target does not build.
pub fn run(minutes: u64, target: Option<&str>) -> Result<ExitCode> {
    let chosen: Vec<&str> = match target {
        None => TARGETS.to_vec(),
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!(
            "no fuzz target `{t}`; the targets are {}",
            TARGETS.join(", ")
        ),
    };
    build_ebpf::ensure_nightly()?;
    ensure_cargo_fuzz()?;
    let root = util::workspace_root();
    let fuzz_dir = root.join("fuzz");
    let found = util::target_dir()?.join("fuzz-corpus");
    let seconds = (minutes * 60).max(1);
    let mut crashed = Vec::new();
    for t in chosen {
        let work = found.join(t);
        std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
        let mut fuzz = Command::new("cargo");
        fuzz.args(["+nightly", "fuzz", "run", t])
            .arg(&work)
            .arg(fuzz_dir.join("corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .current_dir(&fuzz_dir)
            .env("PATH", util::path_with_cargo_bin()?);
        for key in ["RUSTC", "RUSTC_WRAPPER", "RUSTUP_TOOLCHAIN", "RUSTFLAGS"] {
            fuzz.env_remove(key);
        }
        if util::step(&format!("fuzz {t} for {minutes} min"), || {
            util::run(&mut fuzz)
        })
        .is_err()
        {
            crashed.push(t);
        }
    }
    if crashed.is_empty() {
        say("no target crashed");
        Ok(ExitCode::SUCCESS)
    } else {
        say(format!(
            "crashed: {} (inputs in fuzz/artifacts/; fix, then keep them in fuzz/regressions/)",
            crashed.join(", ")
        ));
        Ok(ExitCode::FAILURE)
    }
}

/// Installs cargo-fuzz with `cargo install` when `cargo fuzz` is not there.
fn ensure_cargo_fuzz() -> Result<()> {
    let path = util::path_with_cargo_bin()?;
    if util::find_in_path("cargo-fuzz", &path).is_some() {
        return Ok(());
    }
    say(format!("installing cargo-fuzz {CARGO_FUZZ_VERSION}"));
    util::run(Command::new("cargo").args([
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context("cannot install cargo-fuzz")
}
