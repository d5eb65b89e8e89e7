//! The immutable per-service view that the data planes read.
//!
//! The control plane builds a new [`ServiceSnapshot`] whenever a backend's health or weight
//! changes and swaps it in whole (`ArcSwap`), so a data plane thread sees either the old
//! view or the new one, never a half-built one. Counters live in [`BackendStats`], which
//! outlive snapshots: a rebuild does not reset a backend's active connection count.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use lb_common::FlowKey;

use crate::config::{ClientLimits, Protocol, ProxyProtocol, SchedulerKind};
use crate::scheduler::Scheduler;

/// Index of a backend in [`ServiceSnapshot::backends`]; only meaningful within one snapshot.
pub type BackendId = usize;

/// A service's snapshot, shared between the control plane (writer) and data planes (readers).
pub type SharedSnapshot = Arc<ArcSwap<ServiceSnapshot>>;

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

/// One backend as a snapshot sees it.
#[derive(Debug, Clone)]
pub struct BackendView {
    /// Where flows go.
    pub address: SocketAddr,
    /// Configured weight, `0..=MAX_WEIGHT`; 0 is draining.
    pub weight: u32,
    /// The health checker's verdict when the snapshot was built.
    pub up: bool,
    /// Live counters, shared across snapshots.
    pub stats: Arc<BackendStats>,
}

impl BackendView {
    /// Whether new flows may go to this backend: up and not draining.
    pub fn eligible(&self) -> bool {
        self.up && self.weight > 0
    }
}

/// Everything a data plane needs to place and carry a service's flows.
pub struct ServiceSnapshot {
    /// The service's name, for logs.
    pub name: Arc<str>,
    /// The VIP and port.
    pub listen: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Which scheduler `scheduler` is.
    pub scheduler_kind: SchedulerKind,
    /// TCP: the limit on one connect attempt.
    pub connect_timeout: Duration,
    /// Idle limit of a TCP connection or UDP session.
    pub idle_timeout: Duration,
    /// TCP: further backends to try after a failed connect.
    pub retries: u32,
    /// All configured backends, eligible or not, in config order.
    pub backends: Vec<BackendView>,
    /// Picks among the eligible backends; `None` when no backend is eligible.
    pub scheduler: Option<Box<dyn Scheduler>>,
    /// Counts rebuilds of this service, starting at 1; for logs and tests.
    pub generation: u64,
    /// The PROXY protocol header sent to backends, if any.
    pub proxy_protocol: ProxyProtocol,
    /// Per-client-address limits on new connections or sessions.
    pub limits: ClientLimits,
    /// Whether to write one access log line per connection or session.
    pub access_log: bool,
}

impl ServiceSnapshot {
    /// Picks the backend for a new flow, skipping the ones in `tried` (failed attempts of
    /// this flow). `None` when no eligible backend is left.
    pub fn pick(&self, flow: &FlowKey, tried: &[BackendId]) -> Option<BackendId> {
        self.scheduler.as_ref()?.pick(flow, tried)
    }

    /// How many backends are eligible for new flows.
    pub fn eligible_count(&self) -> usize {
        self.backends.iter().filter(|b| b.eligible()).count()
    }
}

impl std::fmt::Debug for ServiceSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSnapshot")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("protocol", &self.protocol)
            .field("scheduler", &self.scheduler_kind)
            .field("backends", &self.backends)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Builds the [`FlowKey`] of a proxied connection or datagram from the client's address and
/// the VIP, so the proxy hashes flows exactly as the XDP program does.
pub fn flow_key(client: SocketAddr, vip: SocketAddr, protocol: Protocol) -> FlowKey {
    FlowKey {
        src_addr: addr_words(client),
        dst_addr: addr_words(vip),
        src_port: client.port(),
        dst_port: vip.port(),
        protocol: match protocol {
            Protocol::Tcp => lb_common::flow::IPPROTO_TCP,
            Protocol::Udp => lb_common::flow::IPPROTO_UDP,
        },
        family: lb_common::maps::family_of(vip.ip()),
        _pad: [0; 2],
    }
}

fn addr_words(addr: SocketAddr) -> [u32; 4] {
    let ip = match addr.ip() {
        // An IPv4-mapped IPv6 client (dual-stack listener) hashes as the IPv4 address it is.
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(v6),
        },
        v4 => v4,
    };
    match ip {
        std::net::IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        std::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
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
