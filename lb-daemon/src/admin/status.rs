//! The admin API's response types: `GET /status` as JSON, for the daemon, each service and
//! each backend.
//!
//! - The service fills in its part ([`ServiceStatus`], [`BackendStatus`]) from its own state.
//! - [`crate::control::Control::status`] adds what only the daemon knows: the data plane
//!   carrying each service and the XDP program's counters.
//! - Plain data, no behaviour: this file imports nothing of the control plane, so any part of
//!   the daemon can build or read these types without an import cycle.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use lb_common::Counters;

use crate::dataplane::proxy::ProxyCounters;

/// `GET /status`: the daemon and every service.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The config file.
    pub config: PathBuf,
    /// The data planes carrying the services: `"proxy"`, `"xdp"`, `"tc"`, `"tc+proxy"`...; each
    /// service's own is in its `dataplane`.
    pub dataplane: String,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// Connections and sessions open in the data plane.
    pub active: u64,
    /// Proxy-wide counters.
    pub proxy: ProxyCountersView,
    /// Reloads so far.
    pub reloads: ReloadHistory,
    /// The services, in config order.
    pub services: Vec<ServiceStatus>,
    /// Services a reload removed that still have open connections or sessions (listed until
    /// the last one closes or `drain_timeout` passes).
    pub removed_services: Vec<ServiceStatus>,
    /// The XDP program's own counters; `None` when no service runs on XDP.
    pub xdp: Option<XdpStatus>,
    /// The VIPs announced for ECMP and why others are not; `None` without `[announce]`.
    pub announce: Option<crate::announce::AnnounceStatus>,
}

/// A service in the admin API's `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceStatus {
    /// The service's name.
    pub name: String,
    /// The VIP and port.
    pub listen: SocketAddr,
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    /// The scheduler, as written in the config (`"maglev"`...).
    pub scheduler: String,
    /// The Maglev table new flows are placed by (`maglev` and `source_hash`), in brief: two
    /// balancer nodes with equal digests place every flow on the same backend. On the eBPF
    /// plane, the table the program holds, which leaves out the backends it cannot carry
    /// (see `left_out`). `None` for other schedulers, or while no backend is eligible.
    pub maglev_table: Option<crate::maglev::TableDigest>,
    /// The data plane carrying the service and why, e.g. `"eBPF data plane (nat) on l0 (tc):
    /// auto chose tc because l0 is a veth"` or `"proxy data plane (no interface is
    /// configured)"`. The daemon knows it,
    /// not the service: [`crate::control::Control::status`] fills it in.
    pub dataplane: String,
    /// The snapshot generation (counts rebuilds).
    pub generation: u64,
    /// Every backend, in config order, then discovered ones.
    pub backends: Vec<BackendStatus>,
    /// What the XDP program counted for the service, when it runs on XDP. Filled in by
    /// [`crate::control::Control::status`].
    pub xdp: Option<XdpTraffic>,
}

/// One backend in a [`ServiceStatus`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    /// `ip:port`.
    pub address: SocketAddr,
    /// `"static"`, or the `name:port` it was resolved from; several joined by `,` (static
    /// first) when more than one asks for it. While it is removing: its last ones.
    pub origin: String,
    /// `"up"` or `"down"`, the health checks' verdict.
    pub health: &'static str,
    /// Seconds since the health verdict last changed.
    pub health_for_seconds: f64,
    /// `"active"`, `"draining"` (drained through the admin API), `"removing"` (left the
    /// config or DNS; forgotten when its last connection closes) or `"slow_start"`.
    pub state: &'static str,
    /// The weight from the config (or set through the admin API, which wins until a reload
    /// changes the configured one).
    pub weight: u32,
    /// The weight from the config file.
    pub configured_weight: u32,
    /// The weight the scheduler uses now: 0 when draining, down or removing, ramping up
    /// during slow start.
    pub effective_weight: u32,
    /// Connections (TCP) or sessions (UDP) open now.
    pub active: u64,
    /// Connections or sessions opened since the daemon started.
    pub total: u64,
    /// Failed connect attempts since the daemon started.
    pub connect_failures: u64,
    /// Active health checks since the daemon started that could not run for want of this
    /// host's resources (ports, descriptors, memory); they left the backend's state alone.
    pub checks_unknown: u64,
    /// Bytes from clients to this backend.
    pub bytes_to_backend: u64,
    /// Bytes from this backend to clients.
    pub bytes_from_backend: u64,
    /// The last active check: `"ok"`, the error, or `None` before the first one; `"ok; down:
    /// <why>"` when the backend is down although it passed (failed connects took it down,
    /// or it has not passed `rise` checks yet). With
    /// `kind = "none"`, what passive failures did: `"passive: 3 consecutive failures, last:
    /// proxied connect failed: ...; retry in 7s"` while held off, `"passive: on trial after a
    /// 10s hold-off"` once tried again, `"passive: 1 failure of 3, last: ..."` during a
    /// streak, else `None`.
    pub last_check: Option<String>,
    /// What the XDP program counted for this backend, when the service runs on XDP (its
    /// flows started, bytes and open flows are also in `total`, `bytes_to_backend` and
    /// `active`). Filled in by [`crate::control::Control::status`].
    pub xdp: Option<XdpTraffic>,
}

/// The XDP program's global counters in `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct XdpStatus {
    /// Packets by outcome, summed over CPUs, named as `lb_common::Stat` in snake case
    /// (`packets` seen, `forwarded`, `nat_replies`, `pass_not_vip`, `drop_no_backend`...).
    pub packets: BTreeMap<String, u64>,
    /// Why the counters could not be read, when they could not: the counters shown are then
    /// those of the last good read (none before the first), so that none goes back.
    pub error: Option<String>,
}

/// The SNAT ports towards one backend on one local address (XDP `nat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SnatAddressUse {
    /// The local address (one of the service's `local_address`).
    pub address: std::net::IpAddr,
    /// Its ports towards the backend in use or held after their flow ended.
    pub in_use: u64,
    /// Its ports a new flow towards the backend may still take.
    pub free: u64,
}

/// What the XDP program counted for one service or one backend.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct XdpTraffic {
    /// Client packets forwarded.
    pub packets: u64,
    /// Bytes of those packets as the frames arrived (Ethernet header included).
    pub bytes: u64,
    /// Flows started (conntrack entries made).
    pub flows: u64,
    /// Flows open now (backends only): conntrack entries no FIN or RST closed and seen within
    /// the service's idle timeout, counted every few seconds by the sync thread while the counters are read (also added
    /// to the backend's `active`). `None` for a service, or before the first count.
    pub open_flows: Option<u64>,
    /// `nat` backends: SNAT ports towards the backend in use or held after their flow ended,
    /// counted every 10 s or so; `None` for `dsr`, a service, or before the first count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_ports_in_use: Option<u64>,
    /// `nat` backends: SNAT ports a new flow towards the backend may still take (the range's
    /// ports on every local address less those in use or held).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_ports_free: Option<u64>,
    /// `nat` backends: the same two counts per local address, in the service's order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_local_addresses: Option<Vec<SnatAddressUse>>,
    /// `nat` backends: when the count of the three fields above began, in Unix seconds. A
    /// port taken before it and still held is in the count; one taken or freed since may
    /// not be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_counted_unix_seconds: Option<f64>,
    /// Why the eBPF table gives the backend no slot although its health may be up (`nat`
    /// backends, and `dsr` ones at the XDP hook), e.g. `"is reached through eth1, where the eBPF program would not see its
    /// replies (add eth1 to backend_interfaces)"`; absent when it takes its share.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left_out: Option<String>,
}

impl From<Counters> for XdpTraffic {
    fn from(c: Counters) -> Self {
        XdpTraffic {
            packets: c.packets,
            bytes: c.bytes,
            flows: c.new_flows,
            open_flows: None,
            snat_ports_in_use: None,
            snat_ports_free: None,
            snat_local_addresses: None,
            snat_counted_unix_seconds: None,
            left_out: None,
        }
    }
}

/// [`ProxyCounters`] for JSON.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ProxyCountersView {
    /// Connections refused and datagrams dropped for want of a backend.
    pub no_backend: u64,
    /// UDP datagrams dropped.
    pub dropped_datagrams: u64,
    /// Connections and sessions ended by an error.
    pub errors: u64,
}

impl From<ProxyCounters> for ProxyCountersView {
    fn from(c: ProxyCounters) -> Self {
        ProxyCountersView {
            no_backend: c.no_backend,
            dropped_datagrams: c.dropped_datagrams,
            errors: c.errors,
        }
    }
}

/// Counts of reloads and the latest outcome.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadHistory {
    /// Reloads applied.
    pub succeeded: u64,
    /// Reloads refused (the running config stayed).
    pub failed: u64,
    /// The latest reload's outcome: what changed, or why it was refused.
    pub last: Option<String>,
    /// Unix time in seconds of the latest applied reload (or of start).
    pub last_success_unix_seconds: f64,
}
