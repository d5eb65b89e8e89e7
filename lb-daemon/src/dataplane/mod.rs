//! The data planes: the XDP fast path and the userspace io_uring proxy.

use std::net::SocketAddr;

pub mod proxy;
pub mod xdp;

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
