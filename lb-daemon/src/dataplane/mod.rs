//! The data planes: the XDP fast path and the userspace io_uring proxy.
//!
//! A data plane sees a service only as a [`ServiceHandle`] (its number and its snapshot) plus
//! the plane's own settings, given once when the service is added; it never reads the config
//! or the control plane's service state. `crate::placement` decides which plane carries a
//! service; both planes implement [`Dataplane`], so a third one plugs in there.

use std::net::SocketAddr;
use std::time::Duration;

use crate::snapshot::SharedSnapshot;

pub mod proxy;
pub mod xdp;

/// A service as a data plane sees it.
#[derive(Clone)]
pub struct ServiceHandle {
    /// The service's number, unique for the daemon's life: a service a reload replaces gets
    /// a new one.
    pub index: usize,
    /// Its snapshot, swapped whole by the control plane on every change (health, weights,
    /// a reload, a DNS answer); the plane reads the current one when it needs it.
    pub snapshot: SharedSnapshot,
}

/// What every data plane offers the control plane.
///
/// Implemented by [`proxy::Proxy`] and [`xdp::XdpPlane`]. Snapshots need no call: a plane
/// reads each service's current snapshot through its [`ServiceHandle`].
pub trait Dataplane: Sized {
    /// What starting the plane takes.
    type Options;
    /// What the plane needs of a service beyond its snapshot, fixed while it runs there.
    type Settings: ?Sized;
    /// What adding a service gives back: where the plane carries it (XDP: the interfaces
    /// and attach modes; the proxy: the address it is bound to).
    type Added;
    /// Why the plane could not start or take a service.
    type Error: std::error::Error;
    /// The plane's counters.
    type Counters;

    /// Starts the plane with no service on it.
    fn start(options: Self::Options) -> Result<Self, Self::Error>;

    /// Starts carrying `service`'s new flows, from its current snapshot. On `Err` nothing of
    /// the service is left in the plane.
    fn add(
        &mut self,
        service: &ServiceHandle,
        settings: &Self::Settings,
    ) -> Result<Self::Added, Self::Error>;

    /// Stops new flows of service `index` (no-op for an index the plane does not carry);
    /// the open ones go on for at most `drain_timeout`. `address_moves`: another service
    /// takes the service's address now: XDP lets go of the VIP at once (the new service runs
    /// on the proxy); the proxy keeps its TCP listeners open for the new service to take.
    fn remove(&mut self, index: usize, drain_timeout: Duration, address_moves: bool);

    /// The plane's counters now.
    fn counters(&self) -> Self::Counters;
}

/// What a data plane tells the control plane about connect attempts, so that passive
/// failures count towards a backend's `fall` (HAProxy's `observe layer4`).
///
/// Called from data plane threads: implementations must not block.
pub trait FlowEvents: Send + Sync {
    /// A connect attempt from service number `service` to `backend` failed with `error`
    /// (refused, timed out, unreachable). Called for every such failure; the data plane has
    /// already counted it in the backend's [`crate::snapshot::BackendStats`].
    fn connect_failed(&self, service: usize, backend: SocketAddr, error: &std::io::Error);
    /// A connect attempt from service number `service` to `backend` succeeded (TCP), or the
    /// backend answered a new session (UDP), after one or more failed ones: the backend has
    /// recovered. Called once per run of failures, not for every success: a success after a
    /// success is only a relaxed load in the data plane
    /// ([`crate::snapshot::BackendStats::connect_succeeded`]). Returns whether the news was
    /// delivered; `false` (e.g. a full queue) keeps the backend marked failing, so the next
    /// success reports again.
    fn connect_succeeded(&self, service: usize, backend: SocketAddr) -> bool;
}
