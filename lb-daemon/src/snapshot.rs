//! The immutable per-service view that the data planes read.
//!
//! The control plane builds a new [`ServiceSnapshot`] whenever a backend's health or weight
//! changes and swaps it in whole (`ArcSwap`), so a data plane thread sees either the old
//! view or the new one, never a half-built one. Counters live in [`BackendStats`], which
//! outlive snapshots: a rebuild does not reset a backend's active connection count.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use lb_common::FlowKey;

pub use crate::backend_stats::{BackendId, BackendStats};
use crate::config::{ClientLimits, Protocol, ProxyProtocol, SchedulerKind};
use crate::scheduler::Scheduler;

/// A service's snapshot, shared between the control plane (writer) and data planes (readers).
pub type SharedSnapshot = Arc<ArcSwap<ServiceSnapshot>>;

/// One backend as a snapshot sees it.
#[derive(Debug, Clone)]
pub struct BackendView {
    /// Where flows go.
    pub address: SocketAddr,
    /// Effective weight, in 16ths of a configured unit (`service::WEIGHT_SCALE`): 16 × the
    /// configured (or admin) weight, less during slow start; 0 is draining. Schedulers and
    /// the Maglev table go by its ratios.
    pub weight: u32,
    /// The health checker's verdict when the snapshot was built.
    pub up: bool,
    /// Down only until its first health check, sent at once, which has not failed (a
    /// backend a DNS answer or a reload adds or gives back to a running service): it takes
    /// no new flow, but flows already on it stay there, as on a draining backend. A
    /// backend a reload removed and gives back keeps the eBPF flows conntrack pinned to it;
    /// its server did not change, and re-placing them would cut them.
    pub awaiting_check: bool,
    /// Live counters, shared across snapshots.
    pub stats: Arc<BackendStats>,
}

impl BackendView {
    /// Whether new flows may go to this backend: up and not draining.
    pub fn eligible(&self) -> bool {
        self.up && self.weight > 0
    }

    /// Whether flows already on this backend stay on it: up, or only
    /// [awaiting its first check](Self::awaiting_check). A down backend's are re-placed.
    pub fn keeps_flows(&self) -> bool {
        self.up || self.awaiting_check
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
    /// The most connections or sessions the proxy holds open for the service at once (the
    /// config's `max_connections` / `max_sessions`, or its default).
    pub max_flows: u32,
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
