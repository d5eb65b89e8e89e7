//! Running commands, finding the workspace and its target directory, and timing steps.

use std::{
    env,
    ffi::OsString,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// Prints one progress line on stderr, prefixed so it stands out among cargo's output.
pub fn say(message: impl AsRef<str>) {
    eprintln!("xtask: {}", message.as_ref());
}

/// The workspace root: the parent of this crate's directory, fixed when xtask was compiled.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest dir is a subdirectory of the workspace")
        .to_path_buf()
}

/// The workspace's cargo target directory: `$CARGO_TARGET_DIR` (relative to the current
/// directory, as cargo reads it) if set, else `<root>/target`. Always absolute.
pub fn target_dir() -> Result<PathBuf> {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                Ok(dir)
            } else {
                Ok(env::current_dir()
                    .context("reading the current directory")?
                    .join(dir))
            }
        }
        _ => Ok(workspace_root().join("target")),
    }
}

/// Cargo's home (`$CARGO_HOME`, else `~/.cargo`), where `cargo install` puts binaries in `bin/`.
pub fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// `$PATH` with cargo's `bin/` first, so binaries that `cargo install` just put there win over
/// older copies elsewhere.
pub fn path_with_cargo_bin() -> Result<OsString> {
    let mut dirs = vec![cargo_home()?.join("bin")];
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).context("joining PATH entries")
}

/// Finds the executable `name` in the directories of `path` (a `$PATH`-style list).
pub fn find_in_path(name: &str, path: &OsString) -> Option<PathBuf> {
    env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Finds the executable `name` on `$PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    find_in_path(name, &env::var_os("PATH").unwrap_or_default())
}

/// The command line as a shell user would type it, for progress and error lines.
pub fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
}

/// Runs `command` with inherited stdio after printing it; returns `Err` naming the command when
/// it cannot start or exits non-zero.
pub fn run(command: &mut Command) -> Result<()> {
    let status = run_status(command)?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(command));
    }
    Ok(())
}

/// Runs `command` with inherited stdio after printing it and returns its exit status; `Err` only
/// when it cannot start.
pub fn run_status(command: &mut Command) -> Result<ExitStatus> {
    say(format!("$ {}", describe(command)));
    command
        .status()
        .with_context(|| format!("starting `{}`", describe(command)))
}

/// Runs `command` quietly and returns its stdout when it exits zero; `Err` when it cannot start
/// or fails (with its stderr).
pub fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("starting `{}`", describe(command)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(command),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process runs as root (needed for `apt-get install`).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `body` as the named step: prints its start, then its result and wall time.
pub fn step<T>(name: &str, body: impl FnOnce() -> Result<T>) -> Result<T> {
    say(format!("==> {name}"));
    let started = Instant::now();
    let result = body();
    let took = started.elapsed().as_secs_f64();
    match &result {
        Ok(_) => say(format!("<== {name}: ok ({took:.1}s)")),
        Err(error) => say(format!("<== {name}: FAILED ({took:.1}s): {error:#}")),
    }
    result.with_context(|| format!("step `{name}` failed"))
}
