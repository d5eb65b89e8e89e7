//! What a backend's counters and id are, shared by the snapshots, the schedulers and the
//! data planes: the live counters outlive every snapshot, so a rebuild does not reset a
//! backend's active connection count.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Index of a backend in [`crate::snapshot::ServiceSnapshot::backends`]; only meaningful within one snapshot.
pub type BackendId = usize;

/// Live counters of one backend, shared by every snapshot and data plane thread.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Connections (TCP, counted from the pick, so connects in flight included) or sessions
    /// (UDP) open right now: what `least_conn` and `random_two` balance on.
    pub active: AtomicU64,
    /// Connections or sessions ever opened to this backend: TCP counts a connection once its
    /// connect succeeded, UDP a session when it opens (before any reply).
    pub total: AtomicU64,
    /// Connect attempts that failed (refused, timed out, unreachable).
    pub connect_failures: AtomicU64,
    /// Bytes from clients to this backend.
    pub bytes_to_backend: AtomicU64,
    /// Bytes from this backend to clients.
    pub bytes_from_backend: AtomicU64,
    /// Set by a failed connect, cleared by the next successful one: the data plane reports
    /// a success to the control plane only when it clears this, so the common path (a
    /// connect that works after one that worked) costs one relaxed load and no call out.
    ///
    /// Invariant: whenever the control plane has been sent a failure and no later success,
    /// this is set. [`BackendStats::connect_failed`] and [`BackendStats::connect_succeeded`]
    /// keep it by their order of report and store, so data plane threads can race freely.
    /// [`BackendStats::report_next_success`] sets it too (a trial after a passive hold-off):
    /// one report more never breaks the invariant.
    failing: AtomicBool,
}

impl BackendStats {
    /// Counts a connection or session opened; pair with [`BackendStats::closed`].
    pub fn opened(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection or session closed.
    pub fn closed(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Connections or sessions open right now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a connect attempt that failed because of the backend (refused, timed out,
    /// unreachable; not a local shortage), calls `report` to tell the control plane, then
    /// marks the backend as failing until the next [`BackendStats::connect_succeeded`].
    ///
    /// Report first, mark second: a success on another thread that clears the mark in between
    /// either saw no mark (and this store sets it, so the next success reports) or saw an
    /// older one and queues its success after this failure. Marking first would let that
    /// success queue its report before this failure and clear the mark, leaving the control
    /// plane with a streak of 1 that no later success resets.
    pub fn connect_failed(&self, report: impl FnOnce()) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        report();
        // Release pairs with the Acquire swap in `connect_succeeded`: a thread that clears
        // this mark sees the report already queued, so its own report queues after it.
        self.failing.store(true, Ordering::Release);
    }

    /// Asks for the next successful connect to be reported, as after a failure: the control
    /// plane puts a backend on trial after its passive hold-off, and only that report ends
    /// the trial. A success during the hold-off (a connect already under way) cleared the
    /// mark of the failures before it, and was ignored then: the backend is down.
    pub fn report_next_success(&self) {
        self.failing.store(true, Ordering::Release);
    }

    /// Notes a successful connect (TCP) or a first reply (UDP). When it ends a run of
    /// failures, calls `report` to tell the control plane (it resets the passive failure
    /// streak); `report` returns whether the news was delivered, and when it was not (a full
    /// queue) the backend stays marked failing so that a later success tries again. `report`
    /// runs once per run of failures even when data plane threads race; the common case, a
    /// success after a success, is one relaxed load.
    pub fn connect_succeeded(&self, report: impl FnOnce() -> bool) {
        let ends_a_run =
            self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::AcqRel);
        if ends_a_run && !report() {
            self.failing.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// What the control plane's health state keeps of passive events: the failure streak,
    /// which a failure extends and a recovery resets.
    #[derive(Default)]
    struct ControlPlane {
        streak: RefCell<u32>,
    }

    impl ControlPlane {
        fn failed(&self) {
            *self.streak.borrow_mut() += 1;
        }
        fn recovered(&self) -> bool {
            *self.streak.borrow_mut() = 0;
            true
        }
        fn streak(&self) -> u32 {
            *self.streak.borrow()
        }
    }

    #[test]
    fn a_success_racing_a_failure_cannot_strand_the_failure_streak() {
        let stats = BackendStats::default();
        let cp = ControlPlane::default();
        // Worker A's connect fails; worker B's connect to the same backend succeeds while A
        // is between its report and its mark.
        stats.connect_failed(|| {
            stats.connect_succeeded(|| cp.recovered());
            cp.failed();
        });
        // Later connects work: one of them must reset the streak A started.
        stats.connect_succeeded(|| cp.recovered());
        stats.connect_succeeded(|| cp.recovered());
        assert_eq!(
            cp.streak(),
            0,
            "after a failure and then successes, the control plane still counts a failure \
             streak, so fewer than fall new failures would take the backend down"
        );
    }

    #[test]
    fn a_recovery_lost_to_a_full_queue_is_reported_by_the_next_success() {
        let stats = BackendStats::default();
        let cp = ControlPlane::default();
        stats.connect_failed(|| cp.failed());
        let mut calls = 0;
        stats.connect_succeeded(|| {
            calls += 1;
            false
        });
        assert_eq!(calls, 1, "the first success after a failure must report");
        stats.connect_succeeded(|| cp.recovered());
        assert_eq!(
            cp.streak(),
            0,
            "a recovery dropped by a full queue was never retried"
        );
        let mut again = 0;
        stats.connect_succeeded(|| {
            again += 1;
            true
        });
        assert_eq!(
            again, 0,
            "a success after a delivered recovery must not report"
        );
    }
}
