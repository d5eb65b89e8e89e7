//! `cargo xtask demo`: builds the daemon and the demo driver, then runs the demo.

use std::{
    os::unix::process::ExitStatusExt,
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

use crate::util::{self, say};

/// Builds `lb-daemon` and `lb-demo` (from lb-tests), then runs
/// `lb-demo --daemon <lb-daemon> --config config/demo.toml [--serve] [--cluster]`.
///
/// `serve`: keep the demo running until Ctrl-C. `cluster`: the cluster demo (lb nodes behind
/// an ECMP router in network namespaces; root), after installing BIRD and building the BPF
/// object. Returns the demo's exit code (128 + signal if a
/// signal ended it), or `Err` when the build fails or the config is missing.
pub fn run(serve: bool, cluster: bool) -> Result<ExitCode> {
    let root = util::workspace_root();
    if cluster {
        // BIRD for the router and the nodes, the BPF object for the nodes' eBPF plane.
        crate::test::ensure_system_packages()?;
        let object = crate::build_ebpf::run(true)?;
        std::env::set_var("LB_EBPF_OBJ", object);
    }
    let config = root.join("config").join("demo.toml");
    if !config.is_file() {
        bail!("the demo's config {} is missing", config.display());
    }
    let mut build = Command::new("cargo");
    build
        .args(["build", "-p", "lb-daemon", "-p", "lb-tests"])
        .args(["--bin", "lb-daemon", "--bin", "lb-demo"])
        .current_dir(&root);
    util::run(&mut build).context("building lb-daemon and lb-demo")?;

    let bin = util::target_dir()?.join("debug");
    let mut demo = Command::new(bin.join("lb-demo"));
    demo.arg("--daemon")
        .arg(bin.join("lb-daemon"))
        .arg("--config")
        .arg(&config)
        .current_dir(&root);
    if serve {
        demo.arg("--serve");
    }
    if cluster {
        demo.arg("--cluster");
    }
    // Ctrl-C reaches the demo too (same process group); we stay alive to hand on its exit code.
    ignore_interrupts_in_this_process();
    let status = util::run_status(&mut demo)?;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    say(format!("lb-demo exited with {code}"));
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// Makes SIGINT and SIGTERM do nothing in xtask but keep their default in the demo: a handler,
/// unlike SIG_IGN, is reset to the default by exec.
fn ignore_interrupts_in_this_process() {
    extern "C" fn nothing(_signal: libc::c_int) {}
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler does nothing, so it is async-signal-safe; installing it races
        // with nothing since xtask is single-threaded here.
        unsafe { libc::signal(signal, nothing as *const () as libc::sighandler_t) };
    }
}
