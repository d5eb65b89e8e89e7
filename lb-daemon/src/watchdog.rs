//! The threads the daemon cannot run without (the proxy's workers, the eBPF plane's sync
//! thread) end only when the daemon stops them. One that ends otherwise (a panic, a worker
//! that gives up on its io_uring) is reported here, and the daemon logs which thread and why,
//! drains what is left as SIGTERM would, and exits non-zero so the service manager starts it
//! again (`Restart=on-failure` in `config/lb-daemon.service`).
//!
//! Exiting was chosen over restarting the thread in place: a dead worker takes its ring, its
//! connections and its share of the per-client admissions and `active` counts with it, and a
//! dead sync thread leaves tables and drains unwritten; none of that can be repaired from
//! outside the thread with certainty, while a restarted process starts whole. Until a data
//! plane outlives the process, the restart cuts the flows the dead thread had not already lost.
//!
//! Fault injection for tests: a debug build reads `LB_FAULT` (see [`fault`]); a release build
//! ignores it.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

/// A thread that ended when nobody asked it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// The thread's name (`lb-proxy-0`, `lb-xdp-sync`).
    pub thread: String,
    /// Why: the panic's message, or the thread's own account of giving up.
    pub why: String,
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "thread {} ended unexpectedly: {}", self.thread, self.why)
    }
}

/// Deaths reported and not yet taken, and the wake-up of whoever waits for one.
struct Board {
    deaths: Mutex<Vec<Death>>,
    notify: tokio::sync::Notify,
}

fn board() -> &'static Board {
    static BOARD: OnceLock<Board> = OnceLock::new();
    BOARD.get_or_init(|| Board {
        deaths: Mutex::new(Vec::new()),
        notify: tokio::sync::Notify::new(),
    })
}

/// Reports that thread `thread` ended unexpectedly, for `why`. Never blocks for long and never
/// panics (it runs on dying threads).
pub fn report(thread: &str, why: impl Into<String>) {
    let b = board();
    let death = Death {
        thread: thread.to_string(),
        why: why.into(),
    };
    tracing::error!("{death}");
    b.deaths
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(death);
    // Stores a permit when nobody waits yet, so a death before `died` is called is not missed.
    b.notify.notify_one();
}

/// The first death reported so far, if any; does not wait.
pub fn dead() -> Option<Death> {
    (board().deaths.lock())
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .first()
        .cloned()
}

/// Waits for the first death reported (also one reported before the call) and returns it.
pub async fn died() -> Death {
    let b = board();
    loop {
        if let Some(d) = b
            .deaths
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .first()
            .cloned()
        {
            return d;
        }
        b.notify.notified().await;
    }
}

/// Spawns thread `name` running `body`. A panic in it is reported (with its message) before
/// it unwinds on, so joining the thread still sees the panic. An early end that is no panic is
/// the body's to [`report`].
///
/// Returns the spawn error when the thread cannot start.
pub fn spawn<T, F>(name: String, body: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let thread = name.clone();
    std::thread::Builder::new().name(name).spawn(move || {
        match catch_unwind(AssertUnwindSafe(body)) {
            Ok(value) => value,
            Err(payload) => {
                report(&thread, format!("panicked: {}", panic_message(&*payload)));
                resume_unwind(payload)
            }
        }
    })
}

/// The text of a panic's payload (`panic!` with a literal or a formatted message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

/// Whether the fault `point` is to be injected: a debug build with `LB_FAULT` naming it in
/// its comma-separated list (`panic-proxy-worker`, `panic-sync-thread`, `pause-before-ready`,
/// `release-walk-incomplete`, `xdp-counters-unreadable`) and, when `LB_FAULT_ARMED_BY` names
/// a file, while that file exists (so that a test can set the scene first, or end the
/// fault). Always `false` in a
/// release build, so no environment can make a production daemon fail on purpose.
pub fn fault(point: &str) -> bool {
    if !cfg!(debug_assertions) {
        return false;
    }
    static FAULTS: OnceLock<Vec<String>> = OnceLock::new();
    let named = FAULTS
        .get_or_init(|| {
            std::env::var("LB_FAULT")
                .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
                .unwrap_or_default()
        })
        .iter()
        .any(|f| f == point);
    named
        && std::env::var_os("LB_FAULT_ARMED_BY")
            .is_none_or(|file| std::path::Path::new(&file).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_is_reported_with_its_message_and_still_panics_for_join() {
        let handle = spawn("lb-test-panics".into(), || -> u32 {
            panic!("the ring is gone");
        })
        .expect("spawn");
        assert!(handle.join().is_err(), "the join must still see the panic");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let d = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), died())
                .await
                .expect("the death is reported")
        });
        assert_eq!(d.thread, "lb-test-panics");
        assert_eq!(d.why, "panicked: the ring is gone");
    }

    #[test]
    fn a_thread_that_returns_is_no_death() {
        let handle = spawn("lb-test-returns".into(), || 7).expect("spawn");
        assert_eq!(handle.join().ok(), Some(7));
        let deaths = board()
            .deaths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        assert!(
            deaths.iter().all(|d| d.thread != "lb-test-returns"),
            "a thread that returned was reported: {deaths:?}"
        );
    }
}
