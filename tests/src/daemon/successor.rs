//! The daemon an upgrade in place started: the running daemon's child, not the test's, so
//! no [`super::Daemon`] owns it. Killed when the guard drops.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{Daemon, LogWaitError};

/// A daemon the test did not start (the one SIGUSR2 made the running daemon start), killed
/// with SIGKILL when this guard drops.
pub struct Successor(Pid);

impl Successor {
    /// A guard for process `pid`.
    pub fn from_pid(pid: i32) -> Successor {
        Successor(Pid::from_raw(pid))
    }

    /// Its process id.
    pub fn pid(&self) -> Pid {
        self.0
    }

    /// Whether it still runs (a zombie waiting for its new parent to reap it has ended).
    pub fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.0)).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGKILL);
    }
}

impl Daemon {
    /// Sends SIGUSR2 (the upgrade in place) and waits up to 10 s for the daemon to say it
    /// started the new one (`upgrade: started ... (pid N) to take over`); returns a guard for
    /// it. Returns the wait's error when no such line comes; panics on a line without a pid.
    pub fn upgrade_in_place(&self) -> Result<Successor, LogWaitError> {
        let mark = self.log_mark();
        // A daemon already gone shows as no line.
        let _ = self.signal(Signal::SIGUSR2);
        let (_, line) = self.wait_for_log_after(mark, "to take over", Duration::from_secs(10))?;
        let pid: i32 = line
            .split("(pid ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line}"));
        Ok(Successor::from_pid(pid))
    }
}
