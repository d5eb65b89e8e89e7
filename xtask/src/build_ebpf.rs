//! `cargo xtask build-ebpf`: the nightly, its `rust-src` and bpf-linker, then the BPF build.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    bpf_object,
    util::{self, say},
};

/// The bpf-linker release that links with the nightly's own LLVM (22); newer ones default to a
/// system LLVM 23 that Debian here lacks.
const BPF_LINKER_VERSION: &str = "0.10.4";
/// The toolchain that builds lb-ebpf (`-Z build-std` is nightly-only).
const NIGHTLY: &str = "nightly";
/// The BPF target, little-endian like every host we run on.
const BPF_TARGET: &str = "bpfel-unknown-none";

/// Installs what is missing, builds lb-ebpf into `<target>/bpf` and checks the object.
///
/// `release` picks the release profile (both profiles are optimised; see lb-ebpf/Cargo.toml).
/// Returns the object's absolute path, `<target>/bpf/bpfel-unknown-none/<profile>/lb-ebpf`.
/// Returns `Err` when a tool is missing and cannot be installed, the build fails, or the object
/// is not a BPF ELF with the `xdp` program and the `STATS` map.
pub fn run(release: bool) -> Result<PathBuf> {
    ensure_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;

    let root = util::workspace_root();
    let target_dir = util::target_dir()?.join("bpf");
    let mut cargo = Command::new("cargo");
    cargo
        .arg(format!("+{NIGHTLY}"))
        .args(["build", "-Z", "build-std=core", "--target", BPF_TARGET])
        .current_dir(root.join("lb-ebpf"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("PATH", util::path_with_cargo_bin()?)
        // BTF (from full debug info) lets the loader check map types and makes verifier logs
        // show source lines. Encoded flags replace any host RUSTFLAGS, which would not fit BPF.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    // A RUSTC or toolchain inherited from the outer `cargo run` would be the stable one.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
    ] {
        cargo.env_remove(key);
    }
    if release {
        cargo.arg("--release");
    }
    util::run(&mut cargo).context("building lb-ebpf")?;

    let profile = if release { "release" } else { "debug" };
    let object = target_dir.join(BPF_TARGET).join(profile).join("lb-ebpf");
    let summary = bpf_object::verify(&object)?;
    say(format!("BPF object ok: {summary}"));
    Ok(object)
}

/// Installed rustup toolchains, one name a line (`nightly-x86_64-unknown-linux-gnu (default)`).
fn toolchains() -> Result<String> {
    util::output(Command::new("rustup").args(["toolchain", "list"])).context(
        "listing rustup toolchains: the BPF build needs rustup's nightly toolchain, \
         and rustup is missing or broken",
    )
}

/// Installs rustup's nightly toolchain when it is missing (lb-ebpf and the fuzz targets need
/// it). `Err` when rustup cannot install it.
pub fn ensure_nightly() -> Result<()> {
    let has_nightly = |list: &str| list.lines().any(|l| l.starts_with("nightly-"));
    if has_nightly(&toolchains()?) {
        return Ok(());
    }
    say("installing the nightly toolchain with rust-src (not installed; lb-ebpf needs it)");
    util::run(Command::new("rustup").args([
        "toolchain",
        "install",
        NIGHTLY,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
    .context("cannot install the nightly toolchain (does this machine reach rustup's server?)")?;
    if !has_nightly(&toolchains()?) {
        bail!("rustup reported success but lists no nightly toolchain");
    }
    Ok(())
}

fn ensure_rust_src() -> Result<()> {
    let installed = || -> Result<bool> {
        let list = util::output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            NIGHTLY,
        ]))?;
        Ok(list.lines().any(|l| l.trim() == "rust-src"))
    };
    if installed()? {
        return Ok(());
    }
    say("adding rust-src to the nightly (missing; -Z build-std=core compiles core from it)");
    util::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        NIGHTLY,
    ]))
    .context("cannot add rust-src to the nightly (does this machine reach rustup's server?)")?;
    if !installed()? {
        bail!("rustup reported success but rust-src is still not installed");
    }
    Ok(())
}

/// The version of the `bpf-linker` found first on `$PATH` with cargo's `bin/` first, or why none.
fn bpf_linker_version() -> Result<String, String> {
    let path = util::path_with_cargo_bin().map_err(|e| format!("{e:#}"))?;
    let linker = util::find_in_path("bpf-linker", &path).ok_or("not on PATH")?;
    let out = util::output(Command::new(&linker).arg("--version")).map_err(|e| format!("{e:#}"))?;
    // Prints "bpf-linker 0.10.4".
    out.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| format!("{} --version printed {out:?}", linker.display()))
}

fn ensure_bpf_linker() -> Result<()> {
    let why = match bpf_linker_version() {
        Ok(version) if version == BPF_LINKER_VERSION => return Ok(()),
        Ok(version) => format!("found {version}, need {BPF_LINKER_VERSION}"),
        Err(why) => why,
    };
    say(format!(
        "installing bpf-linker {BPF_LINKER_VERSION} ({why}); this compiles it, a few minutes"
    ));
    let mut install = Command::new("cargo");
    install.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
    ]);
    util::run(&mut install)
        .context("cannot install bpf-linker (does this machine reach crates.io?)")?;
    match bpf_linker_version() {
        Ok(version) if version == BPF_LINKER_VERSION => Ok(()),
        Ok(version) => bail!("after installing, the bpf-linker found first on PATH is {version}"),
        Err(why) => bail!("after installing, bpf-linker is still unusable: {why}"),
    }
}
