//! A running `lb-daemon decap --iface IF --from ADDR...` inside a namespace, stopped on drop.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::netns::Netns;

/// How long the decapsulator may take to attach.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `lb-daemon decap` on one interface; SIGTERM and reaped on drop.
pub struct Decap {
    child: Child,
    what: String,
    /// Its `ready` line.
    ready: String,
    /// Its log lines after `ready`.
    lines: mpsc::Receiver<String>,
}

impl Decap {
    /// Starts `lb-daemon decap --iface interface --from <each of from> --bpf-object object`
    /// in `ns` and waits for its `ready` line. `from`: the balancers whose tunnels it strips.
    /// Panics with its output when it does not get ready.
    pub fn start(ns: &Netns, interface: &str, object: &Path, from: &[IpAddr]) -> Decap {
        Decap::start_at("xdp", ns, interface, object, from)
    }

    /// [`Decap::start`] at `hook`: `"xdp"` (`lb_decap`) or `"tc"` (`lb_decap_tc`, for a
    /// veth whose peer must keep GSO).
    pub fn start_at(
        hook: &str,
        ns: &Netns,
        interface: &str,
        object: &Path,
        from: &[IpAddr],
    ) -> Decap {
        let binary =
            crate::daemon::daemon_binary().unwrap_or_else(|e| panic!("no lb-daemon binary: {e}"));
        let what = format!("lb-daemon decap on {interface} in {}", ns.name());
        let mut child = super::in_netns(ns, || {
            let mut cmd = Command::new(&binary);
            // SAFETY: only prctl, async-signal-safe, runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    // Dies with the test, so a killed run leaves no program attached.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                    Ok(())
                });
            }
            cmd.args(["decap", "--iface", interface, "--hook", hook]);
            for addr in from {
                cmd.arg("--from").arg(addr.to_string());
            }
            cmd.arg("--bpf-object")
                .arg(object)
                .env("NO_COLOR", "1")
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })
        .and_then(|r| r)
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut seen = Vec::new();
        let ready = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if crate::daemon::is_ready_line(&line) => break line,
                Ok(line) => seen.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{what} did not get ready; its output:\n{}", seen.join("\n"));
                }
            }
        };
        Decap {
            child,
            what,
            ready,
            lines: rx,
        }
    }

    /// Its `ready` line (it names the addresses it decapsulates for).
    pub fn ready_line(&self) -> &str {
        &self.ready
    }

    /// Waits up to `timeout` for a log line containing `needle` and returns it; `Err` holds
    /// the lines seen meanwhile.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => return Err(seen),
            }
        }
    }
}

impl Drop for Decap {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
