//! Passive health: the data planes' connect outcomes, carried to the services' health state.
//!
//! - A data plane reports through [`PassiveFeedback`] (a [`FlowEvents`]), which never blocks.
//! - [`PassiveFeedback::apply`], a control plane task, hands each report to its service.
//! - [`ServiceRuntime::passive_failure`] and [`ServiceRuntime::passive_success`] apply it to
//!   the backend's [`HealthState`](crate::health::HealthState); a transition republishes the
//!   service's snapshot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::{lock, ServiceRuntime, ServiceSet};
use crate::dataplane::FlowEvents;

/// Carries the data planes' connect outcomes to the services' health state.
///
/// The data plane reports every failed connect, and only the first success after failures
/// (it keeps the "failing" mark in the backend's
/// [`BackendStats`](crate::snapshot::BackendStats), so the common case, a
/// success after a success, never calls here). That first success resets the failure streak
/// that failed connects started, but successful connects do not cancel failed active checks
/// (two failed checks and one failed connect reach `fall = 3`). Unlike HAProxy's
/// `observe layer4`, which needs `error-limit` (10) errors to count one failed check, every
/// failed connect counts as one failure here. Both go through a bounded channel to a control
/// plane task, so a data plane thread never waits on a health lock or a table rebuild; under
/// a flood of failures, excess reports are dropped (they would only repeat what the health
/// state already knows). A dropped recovery is not lost: [`FlowEvents::connect_succeeded`]
/// says it was not delivered, the backend stays marked failing, and the next success
/// reports again.
pub struct PassiveFeedback {
    tx: tokio::sync::mpsc::Sender<PassiveEvent>,
}

/// A connect outcome queued for the control plane.
#[derive(Debug)]
pub enum PassiveEvent {
    /// A connect from service `service` to `backend` failed with `error`.
    Failed {
        /// Service number.
        service: usize,
        /// The backend.
        backend: SocketAddr,
        /// Why, for the log.
        error: String,
    },
    /// A connect from service `service` to `backend` succeeded after a failure.
    Recovered {
        /// Service number.
        service: usize,
        /// The backend.
        backend: SocketAddr,
    },
}

impl PassiveFeedback {
    /// Creates the feedback path and the receiver that [`PassiveFeedback::apply`] drains.
    /// `capacity`: queued events before drops.
    pub fn new(capacity: usize) -> (Arc<Self>, tokio::sync::mpsc::Receiver<PassiveEvent>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (Arc::new(PassiveFeedback { tx }), rx)
    }

    /// Applies queued events to the services' health state until every sender is gone.
    pub async fn apply(
        services: Arc<ServiceSet>,
        mut rx: tokio::sync::mpsc::Receiver<PassiveEvent>,
    ) {
        while let Some(ev) = rx.recv().await {
            match ev {
                PassiveEvent::Failed {
                    service,
                    backend,
                    error,
                } => {
                    if let Some(s) = services.get(service) {
                        s.passive_failure(backend, &error);
                    }
                }
                PassiveEvent::Recovered { service, backend } => {
                    if let Some(s) = services.get(service) {
                        s.passive_success(backend);
                    }
                }
            }
        }
    }
}

impl FlowEvents for PassiveFeedback {
    fn connect_failed(&self, service: usize, backend: SocketAddr, error: &std::io::Error) {
        let _dropped_when_full = self.tx.try_send(PassiveEvent::Failed {
            service,
            backend,
            error: error.to_string(),
        });
    }

    fn connect_succeeded(&self, service: usize, backend: SocketAddr) -> bool {
        self.tx
            .try_send(PassiveEvent::Recovered { service, backend })
            .is_ok()
    }
}

impl ServiceRuntime {
    /// Records a failed connect to `backend` seen by a data plane. It counts towards the
    /// backend's `fall` like a failed check; with `kind = "none"`, `fall` of them take the
    /// backend out for `passive_timeout` (see [`HealthState`](crate::health::HealthState)).
    pub fn passive_failure(&self, backend: SocketAddr, error: &str) {
        let Some(b) = self.by_address.load().get(&backend).cloned() else {
            return;
        };
        let t = lock(&b.health).record_passive_failure(error, Instant::now());
        if let Some(t) = t {
            self.transitioned(backend, &b.health, &t);
        }
    }

    /// Records a successful connect to `backend` after a passive failure: the failed connects
    /// leave the failure streak (its failed checks stay), and a backend on trial after a
    /// hold-off is trusted again. Only active
    /// checks, or the end of a hold-off without them, bring a down backend back up.
    pub fn passive_success(&self, backend: SocketAddr) {
        if let Some(b) = self.by_address.load().get(&backend) {
            lock(&b.health).record_passive_success();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::service::testing::service;
    use crate::snapshot::BackendStats;

    fn refused() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    }

    #[test]
    fn passive_failures_take_a_backend_down_and_republish() {
        let rt = ServiceRuntime::new(0, service("tcp")).expect("builds");
        let before = rt.snapshot().load().generation;
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let set = ServiceSet::new();
        set.set(vec![Arc::clone(&rt)]);
        let (feedback, rx) = PassiveFeedback::new(16);
        feedback.connect_failed(0, b1, &refused());
        feedback.connect_failed(0, b1, &refused());
        drop(feedback);
        let tokio_rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        tokio_rt.block_on(PassiveFeedback::apply(set, rx));
        let snap = rt.snapshot().load_full();
        assert!(
            snap.generation > before,
            "a DOWN transition must publish a new snapshot"
        );
        assert!(
            !snap.backends[0].up,
            "two refused connects with fall = 2 must mark 9001 DOWN"
        );
        let key = lb_common::FlowKey::default();
        for _ in 0..10 {
            let id = snap.pick(&key, &[]).expect("9002 is still up");
            assert_eq!(
                snap.backends[id].address.port(),
                9002,
                "a DOWN backend got a new flow"
            );
        }
    }

    #[test]
    fn a_recovery_dropped_by_a_full_queue_still_resets_the_failure_streak() {
        let rt = ServiceRuntime::new(0, service("tcp")).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let set = ServiceSet::new();
        set.set(vec![Arc::clone(&rt)]);
        let stats = BackendStats::default();
        let (feedback, mut rx) = PassiveFeedback::new(1);
        let tokio_rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let drain = |rx: &mut tokio::sync::mpsc::Receiver<PassiveEvent>| {
            while let Ok(ev) = rx.try_recv() {
                let (tx, one) = tokio::sync::mpsc::channel(1);
                tx.try_send(ev).expect("room for one");
                drop(tx);
                tokio_rt.block_on(PassiveFeedback::apply(set.clone(), one));
            }
        };
        // One failure (fall = 2) fills the queue, so the success after it is dropped.
        stats.connect_failed(|| feedback.connect_failed(0, b1, &refused()));
        stats.connect_succeeded(|| feedback.connect_succeeded(0, b1));
        drain(&mut rx);
        // The next success must report the recovery the full queue lost.
        stats.connect_succeeded(|| feedback.connect_succeeded(0, b1));
        drain(&mut rx);
        stats.connect_failed(|| feedback.connect_failed(0, b1, &refused()));
        drain(&mut rx);
        assert!(
            rt.snapshot().load().backends[0].up,
            "9001 went DOWN after one new failure (fall = 2): the recovery between the two \
             failures was lost"
        );
    }

    #[test]
    fn without_checks_passive_failures_hold_a_backend_off_then_it_is_tried_again() {
        const HOLD_OFF: Duration = Duration::from_millis(300);
        let mut svc = service("none");
        svc.health.passive_timeout = HOLD_OFF;
        let rt = ServiceRuntime::new(0, svc).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let before = rt.snapshot().load().generation;
        rt.passive_failure(b1, "connection refused");
        assert!(
            rt.snapshot().load().backends[0].up,
            "1 failure of fall = 2 must not take 9001 out"
        );
        let note = rt.status().backends[0].last_check.clone();
        assert_eq!(
            note.as_deref(),
            Some("passive: 1 failure of 2, last: proxied connect failed: connection refused")
        );
        rt.passive_failure(b1, "connection refused");
        let snap = rt.snapshot().load_full();
        assert!(
            snap.generation > before && !snap.backends[0].up,
            "2 refused connects with fall = 2 and kind = none must take 9001 out of a new table"
        );
        let status = rt.status().backends[0].clone();
        assert_eq!(status.health, "down");
        let note = status.last_check.expect("the status says why 9001 is down");
        assert!(
            note.starts_with("passive: 2 consecutive failures, last: proxied connect failed")
                && note.ends_with("retry in 1s"),
            "unexpected status text {note:?}"
        );

        rt.tick();
        assert!(
            !rt.snapshot().load().backends[0].up,
            "9001 came back before its hold-off ran out"
        );
        std::thread::sleep(HOLD_OFF + Duration::from_millis(20));
        rt.tick();
        assert!(
            rt.snapshot().load().backends[0].up,
            "9001 must get its share again once the hold-off ran out"
        );
        assert_eq!(
            rt.status().backends[0].last_check.as_deref(),
            Some("passive: on trial after a 300ms hold-off")
        );
        rt.passive_failure(b1, "connection refused");
        assert!(
            !rt.snapshot().load().backends[0].up,
            "on trial, one more failure must take 9001 out again"
        );
    }

    #[test]
    fn a_backend_that_works_on_trial_needs_fall_failures_again() {
        let mut svc = service("none");
        svc.health.passive_timeout = Duration::from_millis(1);
        let rt = ServiceRuntime::new(0, svc).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        rt.passive_failure(b1, "connection refused");
        rt.passive_failure(b1, "connection refused");
        std::thread::sleep(Duration::from_millis(5));
        rt.tick();
        assert!(rt.snapshot().load().backends[0].up, "tried again");
        rt.passive_success(b1);
        rt.passive_failure(b1, "connection refused");
        assert!(
            rt.snapshot().load().backends[0].up,
            "after a success on trial, one failure of fall = 2 must not take 9001 out"
        );
        let note = rt.status().backends[0].last_check.clone();
        assert!(
            note.as_deref()
                .is_some_and(|n| n.starts_with("passive: 1 failure of 2")),
            "the status should show the new streak: {note:?}"
        );
    }

    #[test]
    fn a_reload_keeps_a_held_off_backend_down_for_the_new_hold_off() {
        let mut svc = service("none");
        svc.health.passive_timeout = Duration::from_secs(600);
        let rt = ServiceRuntime::new(0, svc.clone()).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        rt.passive_failure(b1, "connection refused");
        rt.passive_failure(b1, "connection refused");
        assert!(!rt.snapshot().load().backends[0].up, "held off");
        svc.health.passive_timeout = Duration::from_millis(50);
        rt.update(svc);
        assert!(
            !rt.snapshot().load().backends[0].up,
            "a reload must not bring a held-off backend back"
        );
        std::thread::sleep(Duration::from_millis(60));
        rt.tick();
        assert!(
            rt.snapshot().load().backends[0].up,
            "after the reload the new 50ms hold-off applies"
        );
    }

    #[test]
    fn success_after_failure_resets_the_streak() {
        let rt = ServiceRuntime::new(0, service("tcp")).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        rt.passive_failure(b1, "connection refused");
        rt.passive_success(b1);
        rt.passive_failure(b1, "connection refused");
        assert!(
            rt.snapshot().load().backends[0].up,
            "failures separated by a success are not consecutive"
        );
    }
}
