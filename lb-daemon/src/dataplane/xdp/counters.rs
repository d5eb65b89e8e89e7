//! Reading the program's counters: global (`STATS`), per service and per backend.

use std::net::SocketAddr;
use std::sync::Arc;

use lb_common::Counters;
use tracing::info;

use super::{Maps, MapsError, ServiceSlot};
use crate::service::ServiceRuntime;

/// Names of the `STATS` counters, indexed like `lb_common::Stat`; an index past the list
/// (a newer program) is shown as `stat_N`.
const STAT_NAMES: &[&str] = &[
    "packets",
    "pass_not_vip",
    "pass_fragment",
    "pass_malformed",
    "pass_ipv6_ext_headers",
    "forwarded",
    "nat_replies",
    "ct_miss_non_syn",
    "fib_pass",
    "drop_no_backend",
    "drop_nat_ports_exhausted",
    "drop_no_route",
    "drop_mtu",
    "drop_no_devmap_entry",
    "drop_adjust_head",
    "drop_bad_service",
    "decapsulated",
    "decap_passed",
    "drop_forwarding_disabled",
    "refused_client_rate",
    "refused_client_connections",
    "decap_not_local",
    "icmp_translated",
];

/// The log name of `STATS` index `i`.
pub fn stat_name(i: usize) -> String {
    STAT_NAMES
        .get(i)
        .map_or_else(|| format!("stat_{i}"), |n| (*n).to_string())
}

/// A backend's counters: client packets forwarded to it.
#[derive(Debug, Clone)]
pub struct BackendCounters {
    /// The backend.
    pub address: SocketAddr,
    /// Packets, bytes (frames as received) and new flows, summed over CPUs.
    pub counters: Counters,
}

/// A service's counters and its backends'.
#[derive(Debug, Clone)]
pub struct ServiceCounters {
    /// The service's name.
    pub name: String,
    /// Client packets forwarded for the service, summed over CPUs.
    pub counters: Counters,
    /// Per backend, in config order.
    pub backends: Vec<BackendCounters>,
}

/// Every counter of the XDP data plane at one moment.
#[derive(Debug, Clone)]
pub struct XdpCounters {
    /// `(name, value)` of each global counter, in `lb_common::Stat` order.
    pub global: Vec<(String, u64)>,
    /// Per XDP service.
    pub services: Vec<ServiceCounters>,
}

impl XdpCounters {
    /// Logs the counters, one line for the global ones and one per service and backend:
    /// `xdp counters: service web: packets=.. bytes=.. new_flows=..`.
    pub fn log(&self) {
        let global: Vec<String> = self
            .global
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        info!("xdp counters: global: {}", global.join(" "));
        for s in &self.services {
            info!("xdp counters: service {}: {}", s.name, fmt(&s.counters));
            for b in &s.backends {
                info!(
                    "xdp counters: service {} backend {}: {}",
                    s.name,
                    b.address,
                    fmt(&b.counters)
                );
            }
        }
    }
}

fn fmt(c: &Counters) -> String {
    format!(
        "packets={} bytes={} new_flows={}",
        c.packets, c.bytes, c.new_flows
    )
}

/// Reads every counter of `services` from `maps`.
pub(super) fn read(
    maps: &Maps,
    services: &[(Arc<ServiceRuntime>, ServiceSlot)],
) -> Result<XdpCounters, MapsError> {
    let global = maps
        .stats()?
        .into_iter()
        .enumerate()
        .map(|(i, v)| (stat_name(i), v))
        .collect();
    let mut out = Vec::with_capacity(services.len());
    for (rt, slot) in services {
        let mut backends = Vec::with_capacity(slot.backend_ids.len());
        for (b, &id) in rt.config().backends.iter().zip(&slot.backend_ids) {
            backends.push(BackendCounters {
                address: b.address,
                counters: maps.backend_counters(id)?,
            });
        }
        out.push(ServiceCounters {
            name: rt.config().name.clone(),
            counters: maps.service_counters(slot.id)?,
            backends,
        });
    }
    Ok(XdpCounters {
        global,
        services: out,
    })
}
