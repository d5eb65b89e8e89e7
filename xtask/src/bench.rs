//! `cargo xtask bench`: the side-by-side throughput harness. Installs HAProxy and nginx (with
//! its stream module) when missing, builds lb-daemon and lb-bench in release, and runs
//! lb-bench, which writes target/bench/report.md, report.json and ratios.svg.

use std::{
    path::Path,
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

use crate::util::{self, say};

/// What the harness needs from Debian, and how to tell each is there. iperf3 and wrk are not
/// among them: lb-bench's Rust clients replace them (iperf3's separate control and data
/// connections would be spread over different backends by the balancers; wrk speaks only
/// HTTP).
/// Tells whether a package's files are in place.
type Present = fn() -> bool;

const PACKAGES: &[(&str, Present)] = &[
    ("haproxy", || on_path_or_sbin("haproxy")),
    ("nginx", || on_path_or_sbin("nginx")),
    ("libnginx-mod-stream", || {
        Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").is_file()
    }),
    ("iproute2", || util::on_path("ip").is_some()),
];

fn on_path_or_sbin(name: &str) -> bool {
    util::on_path(name).is_some()
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(name).is_file())
}

/// Runs the harness; `quick` for the short run, `paths` (comma-separated names) to measure
/// only those paths. Returns lb-bench's exit code.
///
/// `Err` when a package cannot be installed or the build fails.
pub fn run(quick: bool, paths: Option<&str>) -> Result<ExitCode> {
    if !util::is_root() {
        bail!("the benchmark creates network namespaces and installs packages: run it as root");
    }
    util::step("benchmark packages", ensure_packages)?;
    let root = util::workspace_root();
    let mut build = Command::new("cargo");
    build
        .args(["build", "--release", "-p", "lb-daemon", "-p", "lb-benches"])
        .args(["--bin", "lb-daemon", "--bin", "lb-bench"])
        .current_dir(&root);
    util::step("build lb-daemon and lb-bench (release)", || {
        util::run(&mut build)
    })?;

    let target = util::target_dir()?;
    let bin = target.join("release");
    let out = target.join("bench");
    let mut shown = String::from("cargo xtask bench");
    if quick {
        shown.push_str(" --quick");
    }
    if let Some(paths) = paths {
        shown.push_str(&format!(" --paths {paths}"));
    }
    let mut bench = Command::new(bin.join("lb-bench"));
    bench
        .arg("--daemon")
        .arg(bin.join("lb-daemon"))
        .arg("--out")
        .arg(&out)
        .args(["--command", &shown])
        .current_dir(&root);
    if quick {
        bench.arg("--quick");
    }
    if let Some(paths) = paths {
        bench.arg("--only").arg(paths);
    }
    // Ctrl-C reaches lb-bench too (same process group), which stops and cleans up; xtask
    // stays alive to hand on its exit code.
    ignore_interrupts_in_this_process();
    let status = util::run_status(&mut bench)?;
    let code = status.code().unwrap_or(1);
    if code == 0 {
        say(format!("report: {}", out.join("report.md").display()));
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, present)| !present())
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        say(format!(
            "all present: {}",
            PACKAGES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return Ok(());
    }
    if util::on_path("apt-get").is_none() {
        bail!(
            "missing {}, and there is no apt-get: install them yourself",
            missing.join(", ")
        );
    }
    say(format!("installing {} with apt-get", missing.join(", ")));
    let mut update = Command::new("apt-get");
    update
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive");
    util::run(&mut update).context("apt-get update")?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    util::run(&mut install)?;
    // The Debian packages start their services; the harness runs its own instances in a
    // namespace, so stop the host ones to keep them off the CPU (and off port 80).
    for service in ["nginx", "haproxy"] {
        if missing.contains(&service) {
            let _ = Command::new("service").args([service, "stop"]).output();
        }
    }
    if let Some((name, _)) = PACKAGES.iter().find(|(_, present)| !present()) {
        bail!("installed the packages but {name} is still missing");
    }
    say(format!("installed: {}", missing.join(", ")));
    Ok(())
}

/// Makes SIGINT and SIGTERM do nothing in xtask but keep their default in children: a
/// handler, unlike SIG_IGN, is reset to the default by exec.
fn ignore_interrupts_in_this_process() {
    extern "C" fn nothing(_signal: libc::c_int) {}
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler does nothing, so it is async-signal-safe; xtask is
        // single-threaded here.
        unsafe { libc::signal(signal, nothing as *const () as libc::sighandler_t) };
    }
}
