//! `cargo xtask test`: the whole suite, as CI runs it, on a machine that may lack its tools.

use std::{
    process::{Command, ExitCode},
    sync::Once,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{
    build_ebpf, package,
    util::{self, say},
};

/// Commands the tests run, with the Debian package that provides each.
const SYSTEM_COMMANDS: &[(&str, &str)] = &[
    // `ip netns`, `ip link add ... type veth`: the end-to-end tests' namespaces.
    ("ip", "iproute2"),
    // HTTP checks against the daemon's admin endpoint and the demo backends.
    ("curl", "curl"),
    // The Debian package's postinst creates the `lb` user with it (tests/tests/package.rs).
    ("adduser", "adduser"),
    // The cluster test's router and nodes announce the VIP with it (tests/tests/cluster.rs).
    ("bird", "bird2"),
];

/// Runs every step; `cargo_test_args` are appended to `cargo test --workspace`.
///
/// Set-up steps (packages, toolchain components, build-ebpf) stop the run when they fail; fmt and
/// clippy failures are reported at the end so one run shows all of them; a failed daemon build
/// skips the tests, which need it. Returns `ExitCode::FAILURE` after a line naming the failed
/// steps, `Err` when a set-up step fails.
pub fn run(cargo_test_args: &[String]) -> Result<ExitCode> {
    let started = Instant::now();
    util::step("system packages", ensure_system_packages)?;
    util::step("rustfmt and clippy", ensure_lint_components)?;
    let object = util::step("build-ebpf --release", || build_ebpf::run(true))?;
    let daemon = util::target_dir()?.join("debug").join("lb-daemon");

    let mut failed = Vec::new();
    for (name, command) in [
        ("fmt", cargo(&["fmt", "--all", "--", "--check"])),
        // lb-ebpf is outside the workspace, so `--all` does not reach it.
        (
            "fmt lb-ebpf",
            cargo(&[
                "fmt",
                "--manifest-path",
                "lb-ebpf/Cargo.toml",
                "--",
                "--check",
            ]),
        ),
        (
            "clippy",
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        ),
        ("build lb-daemon", cargo(&["build", "-p", "lb-daemon"])),
    ] {
        if !check(name, command) {
            failed.push(name);
        }
    }
    // tests/tests/package.rs installs it; without it that test fails (and says why).
    let deb = match util::step("package", package::run) {
        Ok(deb) => Some(deb),
        Err(_) => {
            failed.push("package");
            None
        }
    };
    if failed.contains(&"build lb-daemon") {
        say("skipping cargo test: lb-daemon did not build");
    } else {
        let mut test = cargo(&["test", "--workspace"]);
        test.args(cargo_test_args)
            .env("LB_DAEMON_BIN", &daemon)
            .env("LB_EBPF_OBJ", &object);
        if let Some(deb) = &deb {
            test.env("LB_DEB", deb);
            say(format!("LB_DEB={}", deb.display()));
        }
        say(format!("LB_DAEMON_BIN={}", daemon.display()));
        say(format!("LB_EBPF_OBJ={}", object.display()));
        if !check("cargo test", test) {
            failed.push("cargo test");
        }
        // The foundation's end-to-end suites once more through `dataplane = "auto"`: on
        // loopback VIPs the daemon must fall back to the proxy by itself and pass them all.
        if cargo_test_args.is_empty() {
            // `--workspace` keeps the feature set of the run above, so nothing is rebuilt.
            let mut auto = cargo(&["test", "--workspace"]);
            for suite in FOUNDATION_SUITES {
                auto.args(["--test", suite]);
            }
            auto.env("LB_DAEMON_BIN", &daemon)
                .env("LB_EBPF_OBJ", &object)
                .env("LB_TEST_DATAPLANE", "auto");
            if !check("cargo test (dataplane = auto)", auto) {
                failed.push("cargo test (dataplane = auto)");
            }
        }
    }

    let took = started.elapsed().as_secs_f64();
    if failed.is_empty() {
        say(format!("all steps passed ({took:.0}s)"));
        Ok(ExitCode::SUCCESS)
    } else {
        say(format!(
            "FAILED step(s): {} ({took:.0}s)",
            failed.join(", ")
        ));
        Ok(ExitCode::FAILURE)
    }
}

/// The end-to-end suites of the foundation issue, re-run with `dataplane = "auto"`.
const FOUNDATION_SUITES: [&str; 6] = [
    "distribution",
    "transfer",
    "failover",
    "udp",
    "shutdown",
    "bad_config",
];

/// Runs `command` as the step `name`; whether it passed (the step prints how it failed).
fn check(name: &str, mut command: Command) -> bool {
    util::step(name, || util::run(&mut command)).is_ok()
}

/// `cargo <args>` run from the workspace root.
fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new("cargo");
    command.args(args).current_dir(util::workspace_root());
    command
}

/// Installs the Debian packages of `SYSTEM_COMMANDS` whose command is not on PATH.
pub(crate) fn ensure_system_packages() -> Result<()> {
    let missing: Vec<(&str, &str)> = SYSTEM_COMMANDS
        .iter()
        .copied()
        .filter(|(command, _)| util::on_path(command).is_none())
        .collect();
    if missing.is_empty() {
        let all: Vec<String> = SYSTEM_COMMANDS
            .iter()
            .map(|(command, package)| format!("{command} ({package})"))
            .collect();
        say(format!("all present: {}", all.join(", ")));
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    let listed = missing
        .iter()
        .map(|(command, package)| format!("{package} (for `{command}`)"))
        .collect::<Vec<_>>()
        .join(", ");
    if util::on_path("apt-get").is_none() {
        bail!("missing {listed}, and there is no apt-get to install them: install them yourself");
    }
    if !util::is_root() {
        bail!("missing {listed}; installing them needs root: run as root or install them yourself");
    }
    say(format!("installing {listed} with apt-get"));
    apt_update()?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    util::run(&mut install)?;
    if let Some((command, package)) = missing
        .iter()
        .find(|(command, _)| util::on_path(command).is_none())
    {
        bail!("installed {package} but `{command}` is still not on PATH");
    }
    Ok(())
}

/// `apt-get update`, at most once per run: package lists on a fresh machine may be empty.
fn apt_update() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        let mut update = Command::new("apt-get");
        update
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive");
        result = util::run(&mut update);
    });
    result
}

/// Adds rustfmt and clippy to the active toolchain when `cargo fmt` / `cargo clippy` are missing.
fn ensure_lint_components() -> Result<()> {
    let works = |tool: &str| util::output(&mut cargo(&[tool, "--version"])).is_ok();
    let missing: Vec<&str> = [("fmt", "rustfmt"), ("clippy", "clippy")]
        .into_iter()
        .filter(|(tool, _)| !works(tool))
        .map(|(_, component)| component)
        .collect();
    if missing.is_empty() {
        say("all present: cargo fmt, cargo clippy");
        return Ok(());
    }
    say(format!(
        "adding rustup component(s) {} (missing)",
        missing.join(", ")
    ));
    let mut add = Command::new("rustup");
    add.args(["component", "add"])
        .args(&missing)
        .current_dir(util::workspace_root());
    util::run(&mut add)
        .context("cannot add the lint components (does this machine reach rustup's server?)")
}
