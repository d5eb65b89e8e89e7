//! `cargo xtask package`: the Debian package `lb_<version>_<arch>.deb`, built with dpkg-deb
//! from a staged tree (no packaging tool to install):
//!
//! | file | from |
//! | --- | --- |
//! | `/usr/bin/lb-daemon` | `cargo build --release -p lb-daemon`, debug info stripped |
//! | `/usr/lib/lb/lb-ebpf` | `cargo xtask build-ebpf --release` (where the daemon looks for it) |
//! | `/lib/systemd/system/lb-daemon.service` | `config/lb-daemon.service` |
//! | `/etc/lb/lb.toml` (a conffile) | `config/lb.toml` |
//! | `/usr/share/doc/lb/` | README.md, the example configs (lb.toml, demo.toml, bird.conf) |
//!
//! The control file and maintainer scripts are `packaging/debian/`; `postinst` creates the
//! `lb` system user.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{build_ebpf, util};

/// Files of the package: (source in the workspace, path in the package, mode).
const FILES: &[(&str, &str, u32)] = &[
    (
        "config/lb-daemon.service",
        "lib/systemd/system/lb-daemon.service",
        0o644,
    ),
    ("config/lb.toml", "etc/lb/lb.toml", 0o644),
    ("README.md", "usr/share/doc/lb/README.md", 0o644),
    ("config/lb.toml", "usr/share/doc/lb/examples/lb.toml", 0o644),
    (
        "config/demo.toml",
        "usr/share/doc/lb/examples/demo.toml",
        0o644,
    ),
    (
        "config/bird.conf",
        "usr/share/doc/lb/examples/bird.conf",
        0o644,
    ),
];

/// Maintainer scripts and control files in `packaging/debian/`, copied into `DEBIAN/`.
const CONTROL_FILES: &[(&str, u32)] = &[
    ("conffiles", 0o644),
    ("postinst", 0o755),
    ("prerm", 0o755),
    ("postrm", 0o755),
];

/// Builds the package and returns its path (`target/package/lb_<version>_<arch>.deb`).
///
/// Returns `Err` when a build step fails, `dpkg-deb` or `dpkg` is missing (not a Debian
/// machine), or the staged tree cannot be written.
pub fn run() -> Result<PathBuf> {
    let object = util::step("build-ebpf --release", || build_ebpf::run(true))?;
    let root = util::workspace_root();
    util::step("build lb-daemon (release)", || {
        util::run(
            Command::new("cargo")
                .args([
                    "build",
                    "--release",
                    "-p",
                    "lb-daemon",
                    "--bin",
                    "lb-daemon",
                ])
                .current_dir(&root),
        )
    })?;
    let daemon = util::target_dir()?.join("release").join("lb-daemon");
    let version = daemon_version(&root)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg --print-architecture (packages are built on Debian)")?;
    let out_dir = util::target_dir()?.join("package");
    let stage = out_dir.join("root");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("remove {}", stage.display()))?;
    }

    install(&daemon, &stage.join("usr/bin/lb-daemon"), 0o755)?;
    strip_debug(&stage.join("usr/bin/lb-daemon"));
    install(&object, &stage.join("usr/lib/lb/lb-ebpf"), 0o644)?;
    for (from, to, mode) in FILES {
        install(&root.join(from), &stage.join(to), *mode)?;
    }
    let debian = root.join("packaging/debian");
    for (name, mode) in CONTROL_FILES {
        install(&debian.join(name), &stage.join("DEBIAN").join(name), *mode)?;
    }
    let control = fs::read_to_string(debian.join("control"))
        .with_context(|| format!("read {}", debian.join("control").display()))?
        .replace("@VERSION@", &version)
        .replace("@ARCH@", &arch)
        .replace(
            "@INSTALLED_SIZE@",
            &(tree_bytes(&stage)? / 1024).to_string(),
        );
    fs::write(stage.join("DEBIAN/control"), control).context("write DEBIAN/control")?;

    let deb = out_dir.join(format!("lb_{version}_{arch}.deb"));
    util::step("dpkg-deb --build", || {
        util::run(
            Command::new("dpkg-deb")
                .args(["--build", "--root-owner-group"])
                .arg(&stage)
                .arg(&deb),
        )
    })?;
    Ok(deb)
}

/// lb-daemon's `version` from its Cargo.toml's `[package]` table.
fn daemon_version(root: &Path) -> Result<String> {
    let manifest = root.join("lb-daemon/Cargo.toml");
    let text =
        fs::read_to_string(&manifest).with_context(|| format!("read {}", manifest.display()))?;
    let in_package = text
        .split("\n[")
        .find(|table| table.starts_with("[package]") || table.starts_with("package]"));
    let version = in_package.and_then(|table| {
        table.lines().find_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == "version").then(|| value.trim().trim_matches('"').to_string())
        })
    });
    match version {
        Some(v) if !v.is_empty() => Ok(v),
        _ => bail!("no version in {}'s [package]", manifest.display()),
    }
}

/// Copies `from` to `to` (creating its directories) with `mode`.
fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))
}

/// Drops the binary's debug info (about nine tenths of a release build) when `strip` is
/// there; without it the package only gets bigger.
fn strip_debug(binary: &Path) {
    if util::on_path("strip").is_none() {
        util::say("strip not found: the package keeps lb-daemon's debug info");
        return;
    }
    if let Err(e) = util::run(Command::new("strip").arg("--strip-debug").arg(binary)) {
        util::say(format!(
            "strip failed ({e:#}); the package keeps the debug info"
        ));
    }
}

/// Bytes of the regular files under `dir`, for the control file's `Installed-Size`.
fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += tree_bytes(&entry.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

/// `command`'s standard output, trimmed; `Err` when it cannot run or fails.
fn output(command: &mut Command) -> Result<String> {
    let out = command.output().with_context(|| util::describe(command))?;
    if !out.status.success() {
        bail!("{} failed: {}", util::describe(command), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
