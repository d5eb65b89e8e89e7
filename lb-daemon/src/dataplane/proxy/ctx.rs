//! What the TCP and UDP halves of a worker share: its ring, the proxy-wide counters and
//! options, the time of the current batch of completions, and the reports of a failed
//! backend connect or socket that both protocols make alike.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::connect_log::ConnectLog;
use super::ring::Ring;
use super::{sys, LogLimit, ProxyOptions, ServiceInfo, Shared};
use crate::dataplane::FlowEvents;
use crate::snapshot::BackendStats;

/// What the TCP and UDP halves of a worker share.
pub(super) struct Ctx {
    pub(super) ring: Ring,
    pub(super) events: Arc<dyn FlowEvents>,
    pub(super) shared: Arc<Shared>,
    pub(super) options: ProxyOptions,
    /// The time the current batch of completions was taken, for idle bookkeeping.
    pub(super) now: Instant,
    /// Set once shutdown began: no new connections or sessions.
    pub(super) draining: bool,
    /// The limits on failed-connect warnings, per backend, of both halves (a cell: the
    /// reports take `&self`, and a worker is one thread).
    pub(super) connect_log: RefCell<ConnectLog>,
}

impl Ctx {
    /// Reports a failed connect to backend `addr` of `service` (a TCP connect, or a UDP
    /// connect or ICMP port unreachable). A local shortage ([`sys::is_local_error`]: out of
    /// ports, memory or descriptors here) says nothing about the backend: counting it towards
    /// `fall` would take healthy backends down under load, so it counts as a proxy error;
    /// any other error counts against the backend (its stats and [`FlowEvents`]) and is
    /// warned of through `connect_log` (a line a second per backend at most, the first failure
    /// picked from each table generation at once), naming the table `generation` the backend
    /// was picked from. A shortage is warned of through `shortage_log`, so a flood of clients
    /// it turns away cannot flood the log.
    pub(super) fn connect_failed(
        &self,
        service: &ServiceInfo,
        addr: SocketAddr,
        stats: &BackendStats,
        err: &io::Error,
        generation: u64,
        shortage_log: &mut LogLimit,
    ) {
        if sys::is_local_error(err) {
            Shared::count(&self.shared.errors, 1);
            if let Some(also) = shortage_log.allow(self.now) {
                tracing::warn!(
                    "service {}: cannot connect to backend {addr}: {err} (a shortage on this \
                     host, not the backend's fault){also}",
                    service.name
                );
            }
            return;
        }
        stats.connect_failed(|| self.events.connect_failed(service.index, addr, err));
        let allowed =
            self.connect_log
                .borrow_mut()
                .allow(service.index, addr, generation, self.now);
        if let Some(also) = allowed {
            tracing::warn!(
                "service {}: connect to backend {addr} failed: {err}{also} (table generation \
                 {generation})",
                service.name
            );
        }
    }

    /// Reports that no socket could be opened for a connect to backend `addr` of `service`
    /// (a local shortage, not the backend's fault): counts a proxy error and warns through
    /// `log`, so that a shortage cannot flood the log.
    pub(super) fn no_socket(
        &self,
        log: &mut LogLimit,
        service: &ServiceInfo,
        addr: SocketAddr,
        err: &io::Error,
    ) {
        if let Some(also) = log.allow(self.now) {
            tracing::warn!(
                "service {}: cannot open a socket for backend {addr}: {err}{also}",
                service.name
            );
        }
        Shared::count(&self.shared.errors, 1);
    }
}
