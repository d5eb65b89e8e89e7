//! Ctrl-C and SIGTERM: a flag every loop checks, so a run stops early and its guards clean up
//! (balancers killed, servers joined, namespaces deleted).

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Installs the SIGINT and SIGTERM handlers that set the flag.
pub fn install() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Whether the run was asked to stop.
pub fn requested() -> bool {
    STOP.load(Ordering::Relaxed)
}
