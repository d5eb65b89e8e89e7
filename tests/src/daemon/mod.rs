//! A running `lb-daemon`, owned by a test: started from a config string, its log captured
//! for assertions, killed and reaped on drop (also when the test panics, after printing the
//! end of its log).

mod binary;
mod log;
mod successor;

pub use binary::daemon_binary;
pub use log::LogWaitError;
pub use successor::Successor;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use log::LogBuffer;

/// How long [`Daemon::start`] waits for the `ready` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Daemon::terminate`] waits for the daemon to exit after SIGTERM.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `lb-daemon check` may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a daemon could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No binary: `LB_DAEMON_BIN` is wrong or the build failed.
    #[error("no lb-daemon binary: {0}")]
    Binary(String),
    /// The config could not be written to a temporary file.
    #[error("cannot write the config file: {0}")]
    Config(#[source] std::io::Error),
    /// The process could not be started.
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why not.
        source: std::io::Error,
    },
    /// The daemon exited before it logged `ready`.
    #[error("lb-daemon exited ({status}) before it logged `ready`; its log:\n{log}")]
    ExitedEarly {
        /// How it exited.
        status: ExitStatus,
        /// Its last log lines.
        log: String,
    },
    /// No `ready` line in time.
    #[error("lb-daemon did not log `ready` within {timeout:?}; its log:\n{log}")]
    NotReady {
        /// How long it waited.
        timeout: Duration,
        /// Its last log lines.
        log: String,
    },
}

/// A running `lb-daemon run -c FILE`.
///
/// The daemon gets its own process group (a Ctrl-C at the terminal reaches the test, not the
/// daemon) and is killed by the kernel if the thread that started it ends without dropping it
/// (`PR_SET_PDEATHSIG`), so start it on the thread that owns it.
pub struct Daemon {
    child: Child,
    log: Arc<LogBuffer>,
    readers: Vec<JoinHandle<()>>,
    config_path: PathBuf,
    _config_file: Option<tempfile::TempPath>,
    exited: Option<ExitStatus>,
    /// The pin directory this helper chose for the daemon (see [`test_pin_dir`]), removed on
    /// drop; `None` when the caller chose one.
    own_pin_dir: Option<PathBuf>,
}

/// The environment variable that gives a daemon its pin directory when its config sets none
/// (`lb_daemon::config::BPF_PIN_DIR_ENV`).
pub const BPF_PIN_DIR_ENV: &str = "LB_BPF_PIN_DIR";

/// A pin directory of its own for one test daemon, under `/sys/fs/bpf`: daemons of tests
/// that run at once must not adopt each other's pinned eBPF state.
pub fn test_pin_dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    PathBuf::from(format!("/sys/fs/bpf/lb-test-{}-{n}", std::process::id()))
}

impl Daemon {
    /// Writes `config_toml` to a temporary file, runs the daemon on it and waits (up to
    /// [`READY_TIMEOUT`]) for its `ready` line.
    ///
    /// Panics, with the daemon's log, when it cannot be started or does not get ready: a
    /// test cannot go on without it.
    pub fn start(config_toml: &str) -> Daemon {
        Self::try_start(config_toml).unwrap_or_else(|e| panic!("lb-daemon did not start: {e}"))
    }

    /// Like [`start`](Self::start), returning the error instead of panicking.
    pub fn try_start(config_toml: &str) -> Result<Daemon, DaemonError> {
        Self::try_start_with_env(config_toml, &[])
    }

    /// Like [`try_start`](Self::try_start), with `env` (name, value) added to the daemon's
    /// environment (e.g. `LB_FAULT` for a debug build's fault injection).
    pub fn try_start_with_env(
        config_toml: &str,
        env: &[(&str, &str)],
    ) -> Result<Daemon, DaemonError> {
        Self::start_on_text("run", config_toml, env, None)
    }

    /// `lb-daemon upgrade -c FILE` with `config_toml` in FILE and `env` added to its
    /// environment: a daemon that takes the sockets of the one serving the config's
    /// `[global] upgrade_socket` and replaces it. Waits for its `ready`.
    pub fn try_upgrade(config_toml: &str, env: &[(&str, &str)]) -> Result<Daemon, DaemonError> {
        Self::start_on_text("upgrade", config_toml, env, None)
    }

    /// `lb-daemon upgrade -c FILE` like [`try_upgrade`](Self::try_upgrade), without waiting
    /// for its `ready` (a test that stops it before).
    pub fn launch_upgrade(config_toml: &str, env: &[(&str, &str)]) -> Result<Daemon, DaemonError> {
        let binary = daemon_binary().map_err(DaemonError::Binary)?;
        let file = write_config(config_toml)?;
        let path = file.to_path_buf();
        Self::launch_as("upgrade", &binary, &path, Some(file), env, None)
    }

    /// Like [`start`](Self::start), with the daemon's pin directory `pin_dir` (see
    /// [`test_pin_dir`]), which the caller removes: a second daemon given the same directory
    /// adopts what the first one pinned.
    pub fn start_pinned(config_toml: &str, pin_dir: &Path) -> Daemon {
        let dir = pin_dir.to_string_lossy().into_owned();
        Self::try_start_with_env(config_toml, &[(BPF_PIN_DIR_ENV, &dir)])
            .unwrap_or_else(|e| panic!("lb-daemon did not start: {e}"))
    }

    /// Like [`try_start`](Self::try_start), with the daemon's open file limit (soft and hard,
    /// so the daemon cannot raise it) set to `nofile` descriptors.
    pub fn try_start_with_nofile(config_toml: &str, nofile: u64) -> Result<Daemon, DaemonError> {
        Self::start_on_text("run", config_toml, &[], Some(nofile))
    }

    /// `lb-daemon {subcommand} -c FILE` with `config_toml` in FILE, `env` and the open file
    /// limit `nofile`, waited for until ready.
    fn start_on_text(
        subcommand: &str,
        config_toml: &str,
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Result<Daemon, DaemonError> {
        let binary = daemon_binary().map_err(DaemonError::Binary)?;
        let file = write_config(config_toml)?;
        let path = file.to_path_buf();
        let mut d = Self::launch_as(subcommand, &binary, &path, Some(file), env, nofile)?;
        d.wait_ready(READY_TIMEOUT)?;
        Ok(d)
    }

    /// Runs `binary run -c config` on an existing config file and waits up to `ready_timeout`
    /// for its `ready` line (the demo's entry point).
    pub fn spawn(
        binary: &Path,
        config: &Path,
        ready_timeout: Duration,
    ) -> Result<Daemon, DaemonError> {
        let mut d = Self::launch_as("run", binary, config, None, &[], None)?;
        d.wait_ready(ready_timeout)?;
        Ok(d)
    }

    fn launch_as(
        subcommand: &str,
        binary: &Path,
        config: &Path,
        file: Option<tempfile::TempPath>,
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Result<Daemon, DaemonError> {
        let mut cmd = command(binary, subcommand, config);
        let own_pin_dir = if env.iter().any(|(k, _)| *k == BPF_PIN_DIR_ENV) {
            None
        } else {
            let dir = test_pin_dir();
            cmd.env(BPF_PIN_DIR_ENV, &dir);
            Some(dir)
        };
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| DaemonError::Spawn {
                binary: binary.to_path_buf(),
                source,
            })?;
        let log = Arc::new(LogBuffer::default());
        let echo = std::env::var_os("LB_TEST_ECHO_DAEMON").is_some_and(|v| v == "1");
        let mut readers = Vec::new();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        for (name, stream) in [
            ("stdout", Box::new(stdout) as Box<dyn std::io::Read + Send>),
            ("stderr", Box::new(stderr)),
        ] {
            log.expect_stream();
            let log = log.clone();
            readers.push(
                std::thread::Builder::new()
                    .name(format!("lb-daemon-{name}"))
                    .spawn(move || log.pump(stream, echo))
                    .expect("a thread for the daemon's output"),
            );
        }
        Ok(Daemon {
            child,
            log,
            readers,
            config_path: config.to_path_buf(),
            _config_file: file,
            exited: None,
            own_pin_dir,
        })
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), DaemonError> {
        match self.log.wait_for(0, "ready", is_ready_line, timeout) {
            Ok(_) => Ok(()),
            Err(LogWaitError::Exited { .. }) => {
                let status = self
                    .wait_exit(Duration::from_secs(5))
                    .unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(-1));
                Err(DaemonError::ExitedEarly {
                    status,
                    log: self.log.tail(40),
                })
            }
            Err(LogWaitError::Timeout { .. }) => Err(DaemonError::NotReady {
                timeout,
                log: self.log.tail(40),
            }),
        }
    }

    /// The pin directory this helper gave the daemon (see [`test_pin_dir`]); `None` when the
    /// caller chose it ([`Daemon::start_pinned`]).
    pub fn pin_dir(&self) -> Option<&Path> {
        self.own_pin_dir.as_deref()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The admin API's TCP address, from the daemon's `admin API listening on` line (the
    /// real port when the config says 0). Panics when the daemon never logged it.
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        const PREFIX: &str = "admin API listening on http://";
        let line = self
            .wait_for_log(PREFIX, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("the daemon did not say where its admin API is: {e}"));
        let (_, rest) = line.split_once(PREFIX).expect("the line has the prefix");
        rest.split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in the admin API line: {line}"))
    }

    /// Replaces the config file the daemon runs on with `config_toml`, written in place (the
    /// same file, as an editor saving it would), ready for a reload.
    pub fn rewrite_config(&self, config_toml: &str) {
        std::fs::write(&self.config_path, config_toml)
            .unwrap_or_else(|e| panic!("cannot rewrite {}: {e}", self.config_path.display()));
    }

    /// The config file it runs on.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Stops reading the daemon's output (`true`), as a log reader that stalls would (a
    /// journald under load): once the pipe is full, the daemon's writes to it would block.
    /// `false` reads on.
    pub fn pause_log_reader(&self, paused: bool) {
        self.log.pause(paused);
    }

    /// Every log line so far (stderr and stdout, colour codes removed).
    pub fn logs(&self) -> Vec<String> {
        self.log.lines()
    }

    /// The number of log lines so far: a mark for [`wait_for_log_after`](Self::wait_for_log_after)
    /// and for "no such line after this point" checks on [`logs`](Self::logs).
    pub fn log_mark(&self) -> usize {
        self.log.len()
    }

    /// Waits up to `timeout` for a log line containing `needle` (anywhere in the log so far or
    /// to come); returns the line.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String, LogWaitError> {
        self.wait_for_log_after(0, needle, timeout).map(|(_, l)| l)
    }

    /// Waits up to `timeout` for a line containing `needle` at index `mark` or later; returns
    /// its index and text. `Err(LogWaitError::Exited)` as soon as the daemon's output closes.
    pub fn wait_for_log_after(
        &self,
        mark: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<(usize, String), LogWaitError> {
        self.log
            .wait_for(mark, needle, |l| l.contains(needle), timeout)
    }

    /// Sends `signal` to the daemon. Returns the `kill(2)` error (e.g. it already exited).
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        kill(self.nix_pid(), signal)
    }

    /// Sends SIGTERM and waits up to [`EXIT_TIMEOUT`] for the daemon to exit; returns how it
    /// exited. Panics if it is still running after that.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let _ = self.signal(Signal::SIGTERM);
        self.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "lb-daemon was still running {EXIT_TIMEOUT:?} after SIGTERM; last log lines:\n{}",
                self.log.tail(30)
            )
        })
    }

    /// Waits up to `timeout` for the daemon to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exit_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How the daemon exited, or `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    fn nix_pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("a pid fits in i32"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A daemon killed leaves its eBPF state pinned (as a crash would); the test's is freed.
        if let Some(dir) = &self.own_pin_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        // The pipes close with the process; a reader still running after that has a
        // grandchild holding them, and is left behind rather than waited on.
        let deadline = Instant::now() + Duration::from_secs(2);
        for r in self.readers.drain(..) {
            while !r.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- lb-daemon log (last 60 lines) ----\n{}\n---- end of lb-daemon log ----",
                self.log.tail(60)
            );
        }
    }
}

/// What a daemon run to its end (`check`, or `run` that is expected to fail) did.
#[derive(Debug)]
pub struct Outcome {
    /// How it exited; `None` if it was still running at the deadline (it was then killed).
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// The config file it was given (deleted by now): error messages name it.
    pub config_path: PathBuf,
}

impl Outcome {
    /// The exit code, if it exited normally.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

/// Runs `lb-daemon check -c FILE` with `config_toml` in FILE, bounded to 30 s.
///
/// Panics when the binary cannot be found or started.
pub fn check_config(config_toml: &str) -> Outcome {
    run_to_end("check", config_toml, CHECK_TIMEOUT)
}

/// Runs `lb-daemon {subcommand} -c FILE` with `config_toml` in FILE and waits up to
/// `timeout` for it to exit (killing it after that); for `run` with a config that must be
/// refused.
///
/// Panics when the binary cannot be found or started.
pub fn run_to_end(subcommand: &str, config_toml: &str, timeout: Duration) -> Outcome {
    let file = write_config(config_toml).unwrap_or_else(|e| panic!("{e}"));
    run_on_file(subcommand, &file, timeout)
}

/// Runs `lb-daemon {subcommand} -c {config}` on an existing (or deliberately missing) file
/// and waits up to `timeout` for it to exit, killing it after that.
///
/// Panics when the binary cannot be found or started.
pub fn run_on_file(subcommand: &str, config: &Path, timeout: Duration) -> Outcome {
    let binary = daemon_binary().unwrap_or_else(|e| panic!("no lb-daemon binary: {e}"));
    let pin_dir = test_pin_dir();
    let mut child = command(&binary, subcommand, config)
        .env(BPF_PIN_DIR_ENV, &pin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let read = |s: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut s) = s {
                let _ = s.read_to_end(&mut out);
            }
            log::strip_ansi(&String::from_utf8_lossy(&out))
        })
    };
    let out = read(child.stdout.take().map(|s| Box::new(s) as _));
    let err = read(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let _ = std::fs::remove_dir_all(&pin_dir);
    Outcome {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        config_path: config.to_path_buf(),
    }
}

/// Writes, in `dir`, a wrapper that runs the daemon binary in a mount namespace of its own
/// where `/etc/hosts` is `hosts` (a bind mount of it: rewriting `hosts` in place changes the
/// daemon's DNS answers), and returns its path, for [`Daemon::spawn`].
///
/// Panics when there is no daemon binary or the wrapper cannot be written.
pub fn private_hosts_wrapper(dir: &Path, hosts: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let real = daemon_binary().unwrap_or_else(|e| panic!("no lb-daemon binary: {e}"));
    let wrapper = dir.join("lb-daemon-private-hosts");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec unshare --mount --propagation private sh -c 'mount --bind \"$0\" /etc/hosts && exec \"$@\"' '{}' '{}' \"$@\"\n",
            hosts.display(),
            real.display()
        ),
    )
    .expect("wrapper written");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .expect("wrapper made executable");
    wrapper
}

/// Whether a log line (colour codes stripped) is the daemon's readiness line, whose message
/// begins `ready: ` (`INFO lb_daemon::daemon: ready: 3 services, 2 proxy workers`; `lb-daemon
/// decap` says `ready: ` too): not "address already in use", nor a warning that it cannot
/// say ready on `$NOTIFY_SOCKET`, nor `LB_FAULT=pause-before-ready`, which come before an
/// upgrade is ready.
pub fn is_ready_line(line: &str) -> bool {
    line.contains(": ready: ")
}

fn write_config(config_toml: &str) -> Result<tempfile::TempPath, DaemonError> {
    let mut f = tempfile::Builder::new()
        .prefix("lb-test-")
        .suffix(".toml")
        .tempfile()
        .map_err(DaemonError::Config)?;
    f.write_all(config_toml.as_bytes())
        .and_then(|()| f.flush())
        .map_err(DaemonError::Config)?;
    Ok(f.into_temp_path())
}

fn command(binary: &Path, subcommand: &str, config: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg(subcommand)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        // Plain text logs: assertions match on words, not on colour codes.
        .env("NO_COLOR", "1")
        .env(
            "RUST_LOG",
            std::env::var("LB_DAEMON_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .process_group(0);
    // SAFETY: the closure only makes async-signal-safe system calls (prctl, sigprocmask)
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Dies with its parent, so a killed test run leaves no daemon holding ports.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            // A parent that blocks SIGINT/SIGTERM (the demo in --serve) must not pass that on.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::is_ready_line;

    #[test]
    fn only_the_readiness_line_is_ready() {
        let at = "2026-12-07T00:49:28.447971Z  INFO";
        assert!(is_ready_line(&format!(
            "{at} lb_daemon::daemon: ready: 3 services, 2 proxy workers"
        )));
        assert!(is_ready_line(&format!(
            "{at} lb_daemon::dataplane::xdp::decap: ready: lb-decap decapsulating IPIP"
        )));
        for not in [
            "ERROR lb_daemon: bind 127.0.0.1:80: Address already in use (os error 98)",
            "WARN lb_daemon::notify: cannot say ready on $NOTIFY_SOCKET: no such file",
            "INFO lb_daemon::daemon: LB_FAULT=pause-before-ready: READY in 10 s",
            "INFO lb_daemon::daemon: SIGINT before this daemon was ready: the old daemon goes on",
        ] {
            assert!(!is_ready_line(not), "{not}");
        }
    }
}
