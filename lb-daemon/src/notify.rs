//! What the daemon tells its service manager (systemd's `sd_notify` protocol, `Type=notify`):
//! ready once it serves, reloading while a SIGHUP reload runs, stopping when it drains, and,
//! after an upgrade in place (SIGUSR2, see [`crate::handover::spawn_successor`]), that the
//! service's main process is now the new daemon (`MAINPID=`), so that systemd follows it
//! while the old one drains and exits. Every message comes from the main process of the
//! moment (the unit keeps `NotifyAccess=main`): the old daemon names the new one, which says
//! nothing until it is the main process.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd, or a unit of another type) every call
//! does nothing. The variable is left in the environment, for the daemon an upgrade starts.

use tracing::{debug, warn};

use sd_notify::NotifyState;

/// Start-up is over: the daemon serves.
pub fn ready() {
    send(&[NotifyState::Ready], "ready");
}

/// The daemon that replaces this one (an upgrade in place) serves: `pid` is the service's
/// main process from now on, and it is ready (one message, so that a reload this daemon
/// announced is ended by the process allowed to). Sent before this daemon drains, so that
/// systemd never sees the service without its main process.
///
/// Returns `false` when `$NOTIFY_SOCKET` is set and the message could not be sent: systemd
/// still takes this process for the main one, and its exit for the service's end.
pub fn main_pid(pid: u32) -> bool {
    send(
        &[NotifyState::MainPid(pid), NotifyState::Ready],
        "the new main process",
    )
}

/// A reload starts (`RELOADING=1` with the monotonic time systemd asks for); [`ready`]
/// ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => {
            send(&[NotifyState::Reloading, now], "reloading");
        }
        Err(e) => debug!("service manager: no monotonic time for RELOADING=1: {e}"),
    }
}

/// The daemon drains and exits. Not sent by a daemon that handed over to a new one: the
/// service goes on.
pub fn stopping() {
    send(&[NotifyState::Stopping], "stopping");
}

/// Whether the daemon runs under a service manager that hears from it (`$NOTIFY_SOCKET` is
/// set: a systemd unit of `Type=notify`).
pub fn under_service_manager() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Sends `state`; `false` when `$NOTIFY_SOCKET` is set and the message could not be sent
/// (logged).
fn send(state: &[NotifyState], what: &str) -> bool {
    if !under_service_manager() {
        return true;
    }
    // A service manager that cannot be told is not a reason to stop serving.
    match sd_notify::notify(false, state) {
        Ok(()) => true,
        Err(e) => {
            warn!("service manager: cannot say {what} on $NOTIFY_SOCKET: {e}");
            false
        }
    }
}
