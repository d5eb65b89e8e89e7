//! The settings of a service that only the proxy data plane runs ([`ProxyOnly`]): read by
//! the config (which refuses them under `dataplane = "xdp"` or `"tc"`, at their line) and by
//! the placement (which runs an `auto` service that has one on the proxy).

use std::net::IpAddr;

use lb_common::maps::MAX_TABLE_SIZE;

use super::{Protocol, ProxyProtocol, SchedulerKind, Service};

/// A setting of a service that only the proxy data plane runs: the eBPF data plane cannot
/// carry a service that has one, whatever the kernel offers ([`Service::proxy_only`]). The
/// config refuses it with `dataplane = "xdp"` or `"tc"`; `auto` runs such a service on the
/// proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyOnly {
    /// A scheduler other than `maglev` (the program looks flows up in a Maglev table).
    #[error("the eBPF data plane runs only the `maglev` scheduler, and this service uses {0}")]
    Scheduler(SchedulerKind),
    /// A loopback VIP: its packets never cross an interface's XDP or tc hook.
    #[error(
        "the VIP {0} is a loopback address: its packets never cross an interface's XDP or tc hook"
    )]
    LoopbackVip(IpAddr),
    /// A wildcard VIP (`0.0.0.0`, `::`).
    #[error("the VIP {0} is a wildcard: the eBPF data plane balances packets for one address")]
    WildcardVip(IpAddr),
    /// `table_size` larger than the maps hold.
    #[error("table_size {0} is larger than the {MAX_TABLE_SIZE} slots the eBPF maps hold")]
    TableTooLarge(u32),
    /// `proxy_protocol` or `access_log`: on the eBPF plane they would silently vanish (a
    /// backend expecting a PROXY header would reject every connection).
    #[error("proxy_protocol and access_log run only in the proxy data plane")]
    ProxyOnlySettings,
    /// `max_connections_per_client` on a UDP service: on the eBPF plane a UDP flow shows no
    /// end, so a client's sessions would never be given back.
    #[error(
        "max_connections_per_client of a UDP service runs only in the proxy data plane: on the \
         eBPF data plane a UDP flow shows no end, so a client's sessions would never be given \
         back (new_connections_per_second alone works there)"
    )]
    UdpSessionLimit,
    /// `max_connections` / `max_sessions`: the eBPF programs do not count a service's open
    /// flows (their conntrack table has a fixed size instead).
    #[error(
        "max_connections and max_sessions run only in the proxy data plane (on eBPF the \
         conntrack table's size bounds the flows)"
    )]
    FlowCap,
}

impl Service {
    /// The first of this service's settings that only the proxy runs, in this order:
    /// scheduler, loopback VIP, wildcard VIP, `table_size`, `proxy_protocol` / `access_log`,
    /// a UDP `max_connections_per_client`, `max_connections` / `max_sessions`; `None` when
    /// the eBPF data plane may carry it.
    pub fn proxy_only(&self) -> Option<ProxyOnly> {
        let vip = self.listen.ip();
        if self.scheduler != SchedulerKind::Maglev {
            Some(ProxyOnly::Scheduler(self.scheduler))
        } else if vip.is_loopback() {
            Some(ProxyOnly::LoopbackVip(vip))
        } else if vip.is_unspecified() {
            Some(ProxyOnly::WildcardVip(vip))
        } else if self.table_size > MAX_TABLE_SIZE {
            Some(ProxyOnly::TableTooLarge(self.table_size))
        } else if self.proxy_protocol != ProxyProtocol::Off || self.access_log {
            Some(ProxyOnly::ProxyOnlySettings)
        } else if self.protocol == Protocol::Udp && self.limits.max_connections.is_some() {
            Some(ProxyOnly::UdpSessionLimit)
        } else if self.max_flows.is_some() {
            Some(ProxyOnly::FlowCap)
        } else {
            None
        }
    }
}
