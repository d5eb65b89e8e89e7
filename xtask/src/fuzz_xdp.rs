//! `cargo xtask fuzz-xdp --frames N [--seed S]`: the XDP fuzz test (`xdp_packets::fuzz`) for
//! longer than CI's 100,000 frames, or from another seed.

use std::process::{Command, ExitCode};

use anyhow::Result;

use crate::{build_ebpf, util};

/// Builds the BPF object, then runs the fuzz test with `frames` frames from `seed` (the
/// test's default seed when `None`). Needs root (BPF_PROG_TEST_RUN). Returns the test's exit
/// status; `Err` when the object cannot be built.
pub fn run(frames: u64, seed: Option<u64>) -> Result<ExitCode> {
    let object = util::step("build-ebpf --release", || build_ebpf::run(true))?;
    let mut test = Command::new("cargo");
    test.args([
        "test",
        "-p",
        "lb-tests",
        "--test",
        "xdp_packets",
        "fuzz",
        "--",
        "--nocapture",
    ])
    .current_dir(util::workspace_root())
    .env("LB_EBPF_OBJ", &object)
    .env("LB_REQUIRE_PRIVILEGED", "1")
    .env("LB_FUZZ_FRAMES", frames.to_string());
    if let Some(seed) = seed {
        test.env("LB_FUZZ_SEED", seed.to_string());
    }
    Ok(match util::run(&mut test) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    })
}
