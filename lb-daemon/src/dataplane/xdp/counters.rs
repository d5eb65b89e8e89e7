//! Reading the program's counters: global (`STATS`), per service and per backend.

use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use lb_common::Counters;
use tracing::info;

use super::sync::State;
use super::MapsError;

/// The log name of `STATS` index `i` ([`lb_common::Stat::name`]); an index past the
/// program's counters (a newer program) is shown as `stat_N`.
pub fn stat_name(i: usize) -> String {
    lb_common::Stat::from_index(i).map_or_else(|| format!("stat_{i}"), |s| s.name().to_string())
}

/// A backend's counters: client packets forwarded to it.
#[derive(Debug, Clone)]
pub struct BackendCounters {
    /// The backend.
    pub address: SocketAddr,
    /// Packets, bytes (frames as received) and new flows, summed over CPUs.
    pub counters: Counters,
    /// Whether the backend left the service (a reload or DNS removed it) and still holds
    /// its id for the flows pinned to it, until `drain_timeout` has passed.
    pub draining: bool,
    /// Flows conntrack holds open on it, as last counted (every few seconds, see
    /// `open_flows.rs`); `None` before the first count.
    pub open_flows: Option<u64>,
    /// `nat`: why the service's table gives the backend no slot whatever its health, as a
    /// sentence ([`super::routes::Miss`]: its replies would miss the program); `None` when it
    /// takes its share.
    pub left_out: Option<String>,
    /// `nat`: SNAT ports towards it taken (in use, or held after their flow ended) on each of
    /// the service's local addresses, in their order, as last counted (every 10 s or so,
    /// `sync.rs`); `None` for `dsr` or before the first count.
    pub snat_ports_taken: Option<Vec<(IpAddr, u64)>>,
    /// When the walk behind `snat_ports_taken` began: a port taken before it is counted, one
    /// taken since may not be. `None` when `snat_ports_taken` is.
    pub snat_counted_at: Option<SystemTime>,
}

/// A service's counters and its backends'.
#[derive(Debug, Clone)]
pub struct ServiceCounters {
    /// The service's index ([`ServiceHandle::index`](crate::dataplane::ServiceHandle::index)).
    pub index: usize,
    /// The service's name.
    pub name: String,
    /// Client packets forwarded for the service, summed over CPUs.
    pub counters: Counters,
    /// Per backend: the snapshot's, in its order, then the draining ones.
    pub backends: Vec<BackendCounters>,
    /// `nat`: the SNAT ports of the range, which each backend has on every local address;
    /// `None` for `dsr`.
    pub snat_ports: Option<u64>,
    /// The digest of the Maglev table the program places new flows by
    /// ([`super::ServiceSlot::table_digest`]); `None` before the first write, while no backend
    /// is eligible, and once the table was emptied (the service drains).
    pub table_digest: Option<crate::maglev::TableDigest>,
}

/// Every counter of the XDP data plane at one moment.
#[derive(Debug, Clone)]
pub struct XdpCounters {
    /// `(name, value)` of each global counter, in `lb_common::Stat` order.
    pub global: Vec<(String, u64)>,
    /// Per service running on XDP (not the removed ones still draining).
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
                    "xdp counters: service {} backend {}: {}{}",
                    s.name,
                    b.address,
                    fmt(&b.counters),
                    if b.draining { " (draining)" } else { "" }
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

/// Reads every counter of the running services in `state`.
pub(super) fn read(state: &State) -> Result<XdpCounters, MapsError> {
    let maps = &state.maps;
    let global = maps
        .stats()?
        .into_iter()
        .enumerate()
        .map(|(i, v)| (stat_name(i), v))
        .collect();
    let open = |id: u32| {
        state
            .open_flows
            .as_ref()
            .map(|o| o.get(&id).copied().unwrap_or(0))
    };
    let mut out = Vec::with_capacity(state.running.len());
    for r in &state.running {
        let nat = r.slot.forwarding == crate::config::Forwarding::Nat;
        let taken = |address: SocketAddr| {
            state.snat_in_use.as_ref().filter(|_| nat).map(|u| {
                r.slot
                    .local_addresses
                    .iter()
                    .map(|&local| {
                        let n = u.get(&(r.slot.id, local, address)).copied().unwrap_or(0);
                        (local, n)
                    })
                    .collect()
            })
        };
        let counted_at = state.snat_counted_at.filter(|_| nat);
        let ids = r.slot.backend_ids();
        let mut backends = Vec::new();
        // The snapshot's backends that the maps know (a newer snapshot's new backends get
        // their ids at the next write).
        let snap = r.service.snapshot.load();
        for b in &snap.backends {
            if let Some(id) = ids.live_id(&b.address) {
                backends.push(BackendCounters {
                    address: b.address,
                    counters: maps.backend_counters(id)?,
                    draining: false,
                    open_flows: open(id),
                    left_out: r.slot.left_out(&b.address).map(ToString::to_string),
                    snat_ports_taken: taken(b.address),
                    snat_counted_at: counted_at,
                });
            }
        }
        for (address, id) in ids.leaving() {
            backends.push(BackendCounters {
                address,
                counters: maps.backend_counters(id)?,
                draining: true,
                open_flows: open(id),
                left_out: None,
                snat_ports_taken: taken(address),
                snat_counted_at: counted_at,
            });
        }
        out.push(ServiceCounters {
            index: r.service.index,
            name: snap.name.to_string(),
            counters: maps.service_counters(r.slot.id)?,
            backends,
            snat_ports: nat.then(|| {
                let (lo, hi) = r.slot.snat_ports;
                u64::from(hi.saturating_sub(lo)) + 1
            }),
            table_digest: r.slot.table_digest(),
        });
    }
    Ok(XdpCounters {
        global,
        services: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stat_has_a_name() {
        // A counter the program has must show by name in the log, /status and /metrics;
        // one past them (a newer program's) as `stat_N`.
        let len = lb_common::STATS_LEN as usize;
        for i in 0..len {
            assert!(
                !stat_name(i).starts_with("stat_"),
                "counter {i} has no name"
            );
        }
        assert_eq!(stat_name(len), format!("stat_{len}"));
    }
}
