//! Writing a service's snapshot into the BPF maps, in the order the map contract
//! (`lb_common::maps`) prescribes: backends, the inactive table half, its size, the flip,
//! and the VIP last (first time only).

use std::net::{IpAddr, SocketAddr};

use aya::maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray};
use aya::Ebpf;
use lb_common::maps::{
    self as contract, addr_words, family_of, table_index, Backend, VipKey, VipValue,
    BACKEND_F_DOWN, MODE_DSR, MODE_NAT,
};
use lb_common::{Counters, STATS_LEN};

use crate::config::{Forwarding, Protocol};
use crate::maglev::{MaglevBackend, MaglevTable};
use crate::snapshot::{BackendView, ServiceSnapshot};

/// Why a map could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The object has no map of this name, or one of another type or layout.
    #[error("the BPF object has no usable map `{name}` ({reason}); it is not the lb-ebpf this daemon was built with")]
    Missing {
        /// The map's name.
        name: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A map update or lookup failed.
    #[error("BPF map {map}: {source}")]
    Io {
        /// The map's name.
        map: &'static str,
        /// What the kernel said.
        source: Box<aya::maps::MapError>,
    },
    /// DEVMAP refused an interface.
    #[error("BPF map DEVMAP: interface index {ifindex}: {reason}")]
    Devmap {
        /// The interface index.
        ifindex: u32,
        /// What went wrong.
        reason: String,
    },
    /// The table could not be built (a bug: validation checks its inputs).
    #[error("Maglev table: {0}")]
    Maglev(#[from] crate::maglev::MaglevError),
}

fn io(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapsError {
    move |e| MapsError::Io {
        map,
        source: Box::new(e),
    }
}

/// The maps the daemon writes and reads, taken out of the loaded object.
pub struct Maps {
    vips: HashMap<MapData, VipKey, VipValue>,
    services: Array<MapData, contract::Service>,
    backends: Array<MapData, Backend>,
    tables: Array<MapData, u32>,
    devmap: DevMapHash<MapData>,
    stats: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    /// `LIMITS`, `CLIENTS` and `CONNTRACK`: see `limits.rs`.
    pub(super) limits: super::limits::LimitMaps,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapsError::Missing {
        name,
        reason: "not in the object".into(),
    })?;
    T::try_from(map).map_err(|e| MapsError::Missing {
        name,
        reason: e.to_string(),
    })
}

impl Maps {
    /// Takes the balancer's maps out of `ebpf` (the programs stay in it).
    ///
    /// Returns `Err(MapsError::Missing)` when a map is absent or has another type or
    /// key/value size than `lb_common::maps` says.
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps, MapsError> {
        Ok(Maps {
            vips: take(ebpf, contract::VIPS)?,
            services: take(ebpf, contract::SERVICES)?,
            backends: take(ebpf, contract::BACKENDS)?,
            tables: take(ebpf, contract::TABLES)?,
            devmap: take(ebpf, contract::DEVMAP)?,
            stats: take(ebpf, contract::STATS)?,
            service_stats: take(ebpf, contract::SERVICE_STATS)?,
            backend_stats: take(ebpf, contract::BACKEND_STATS)?,
            limits: super::limits::LimitMaps::take(ebpf)?,
        })
    }

    /// Lets the program redirect packets out of interface `ifindex` (`DEVMAP`).
    pub fn allow_redirect(&mut self, ifindex: u32) -> Result<(), MapsError> {
        self.devmap
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| MapsError::Devmap {
                ifindex,
                reason: e.to_string(),
            })
    }

    /// Writes `snap` into the maps for `slot` and flips its table (steps 1-5 of the map
    /// contract). Returns how many table slots it wrote.
    ///
    /// Costs one map update per backend and per table slot that differs from what the
    /// inactive half already holds: all M (65537 by default) the first time, tens of
    /// milliseconds; afterwards only the slots that moved, which Maglev keeps few.
    pub fn publish(
        &mut self,
        slot: &mut ServiceSlot,
        snap: &ServiceSnapshot,
    ) -> Result<usize, MapsError> {
        for (b, &id) in snap.backends.iter().zip(&slot.backend_ids) {
            let value = Backend {
                flags: if b.up { 0 } else { BACKEND_F_DOWN },
                ..Backend::new(b.address)
            };
            self.backends
                .set(id, value, 0)
                .map_err(io(contract::BACKENDS))?;
        }
        let table = table_entries(&snap.backends, &slot.backend_ids, slot.table_size)?;
        let inactive = 1 - slot.active_half;
        let mut written = 0;
        let size = match table {
            Some(entries) => {
                // Unknown until every write below has succeeded.
                let old = slot.halves[inactive as usize].take();
                for s in changed_slots(old.as_deref(), &entries) {
                    // `s` < M <= MAX_TABLE_SIZE, checked when the slot was made.
                    let index = table_index(slot.id, inactive, s as u32);
                    self.tables
                        .set(index, entries[s], 0)
                        .map_err(io(contract::TABLES))?;
                    written += 1;
                }
                let size = entries.len() as u32;
                slot.halves[inactive as usize] = Some(entries.into());
                size
            }
            None => 0,
        };
        let mut service = slot.service_value();
        service.table_size[inactive as usize] = size;
        self.services
            .set(slot.id, service, 0)
            .map_err(io(contract::SERVICES))?;
        service.active_half = inactive;
        self.services
            .set(slot.id, service, 0)
            .map_err(io(contract::SERVICES))?;
        slot.active_half = inactive;
        slot.table_size_live = size;
        self.limits.write(slot, &snap.limits, snap.idle_timeout)?;
        if !slot.vip_published {
            self.vips
                .insert(slot.vip_key(), VipValue { service: slot.id }, 0)
                .map_err(io(contract::VIPS))?;
            slot.vip_published = true;
        }
        slot.generation = snap.generation;
        Ok(written)
    }

    /// The global counters (`STATS`), summed over CPUs, indexed like `lb_common::Stat`.
    pub fn stats(&self) -> Result<Vec<u64>, MapsError> {
        (0..STATS_LEN)
            .map(|i| {
                self.stats
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .map_err(io(contract::STATS))
            })
            .collect()
    }

    /// Service `id`'s counters, summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<Counters, MapsError> {
        sum(&self.service_stats, id).map_err(io(contract::SERVICE_STATS))
    }

    /// Backend `id`'s counters, summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<Counters, MapsError> {
        sum(&self.backend_stats, id).map_err(io(contract::BACKEND_STATS))
    }
}

fn sum(map: &PerCpuArray<MapData, Counters>, id: u32) -> Result<Counters, aya::maps::MapError> {
    let per_cpu = map.get(&id, 0)?;
    Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
        new_flows: a.new_flows + c.new_flows,
    }))
}

/// One XDP service's place in the maps: its ids and which table half is live.
#[derive(Debug, Clone)]
pub struct ServiceSlot {
    /// Service id: index into `SERVICES`, `TABLES` and `SERVICE_STATS`.
    pub id: u32,
    /// Backend id of each of the service's backends, in config (and snapshot) order. Fixed
    /// for the daemon's life, so conntrack entries always name the same address.
    pub backend_ids: Vec<u32>,
    /// The Maglev table size M, `<= lb_common::maps::MAX_TABLE_SIZE`.
    pub table_size: u32,
    /// The VIP and port.
    pub vip: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// NAT or DSR.
    pub forwarding: Forwarding,
    /// The balancer's address on the backends' side.
    pub local_address: IpAddr,
    /// SNAT ports, inclusive (NAT only).
    pub snat_ports: (u16, u16),
    /// The half packets read now, 0 or 1.
    pub active_half: u32,
    /// Slots in the live half; 0 while no backend is eligible.
    pub table_size_live: u32,
    /// Whether the VIP is in `VIPS` yet.
    pub vip_published: bool,
    /// What each table half holds in the kernel, when known: later writes skip the slots
    /// that already hold the right backend.
    pub halves: [Option<std::sync::Arc<[u32]>>; 2],
    /// The generation of the snapshot last written.
    pub generation: u64,
    /// The last generation whose write failed and was logged, so a persistent error is
    /// logged once per generation, not on every poll.
    pub failed_generation: Option<u64>,
}

impl ServiceSlot {
    fn service_value(&self) -> contract::Service {
        let mut table_size = [0; 2];
        table_size[self.active_half as usize] = self.table_size_live;
        let nat = self.forwarding == Forwarding::Nat;
        contract::Service {
            mode: if nat { MODE_NAT } else { MODE_DSR },
            family: family_of(self.vip.ip()),
            _pad: [0; 2],
            active_half: self.active_half,
            table_size,
            local_addr: addr_words(self.local_address),
            snat_port_min: if nat { self.snat_ports.0 } else { 0 },
            snat_port_max: if nat { self.snat_ports.1 } else { 0 },
        }
    }

    fn vip_key(&self) -> VipKey {
        VipKey::new(
            self.vip,
            match self.protocol {
                Protocol::Tcp => lb_common::flow::IPPROTO_TCP,
                Protocol::Udp => lb_common::flow::IPPROTO_UDP,
            },
        )
    }
}

/// The slots of `new` to write over a half that holds `old`: those that differ, or all of
/// them when `old` is unknown or of another size.
pub fn changed_slots<'a>(
    old: Option<&'a [u32]>,
    new: &'a [u32],
) -> Box<dyn Iterator<Item = usize> + 'a> {
    match old {
        Some(old) if old.len() == new.len() => {
            Box::new((0..new.len()).filter(move |&i| old[i] != new[i]))
        }
        _ => Box::new(0..new.len()),
    }
}

/// The Maglev table of a snapshot's `backends` as the program reads it: M = `size` slots,
/// each a backend id.
///
/// Built over the eligible backends (up, weight > 0) exactly as the `maglev` scheduler builds
/// its own, so both data planes place a flow on the same backend. `None` when no backend is
/// eligible. `ids[j]` is the backend id of `backends[j]`.
pub fn table_entries(
    backends: &[BackendView],
    ids: &[u32],
    size: u32,
) -> Result<Option<Vec<u32>>, crate::maglev::MaglevError> {
    let eligible: Vec<(u32, MaglevBackend)> = backends
        .iter()
        .zip(ids)
        .filter(|(b, _)| b.eligible())
        .map(|(b, &id)| {
            (
                id,
                MaglevBackend {
                    address: b.address,
                    weight: b.weight,
                },
            )
        })
        .collect();
    if eligible.is_empty() {
        return Ok(None);
    }
    let input: Vec<MaglevBackend> = eligible.iter().map(|(_, b)| *b).collect();
    let table = MaglevTable::build(&input, size)?;
    Ok(Some(
        table
            .entries()
            .iter()
            .map(|&e| eligible[e as usize].0)
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ServiceRuntime;
    use std::path::Path;

    fn service() -> crate::config::Service {
        let text = r#"
[[service]]
name = "web"
listen = "10.200.100.1:80"
protocol = "tcp"
table_size = 65537
[[service.backend]]
address = "10.200.1.2:80"
[[service.backend]]
address = "10.200.2.2:80"
weight = 2
[[service.backend]]
address = "10.200.3.2:80"
weight = 0
"#;
        crate::config::parse(text, Path::new("t.toml"))
            .expect("valid")
            .services
            .remove(0)
    }

    #[test]
    fn the_xdp_table_places_every_flow_where_the_maglev_scheduler_does() {
        let rt = ServiceRuntime::new(0, service()).expect("builds");
        let snap = rt.snapshot().load_full();
        let ids = [100, 101, 102];
        let table = table_entries(&snap.backends, &ids, 65537)
            .expect("builds")
            .expect("two backends are eligible");
        assert_eq!(table.len(), 65537);
        assert!(
            !table.contains(&102),
            "the draining backend (weight 0) holds table slots"
        );
        for port in 0..2000u16 {
            let key = crate::snapshot::flow_key(
                SocketAddr::from(([10, 200, 0, 9], 30000 + port)),
                snap.listen,
                Protocol::Tcp,
            );
            let by_scheduler = snap.pick(&key, &[]).expect("eligible backends");
            let by_table = table[(lb_common::flow_hash(&key) % 65537) as usize];
            assert_eq!(
                by_table, ids[by_scheduler],
                "XDP and the proxy would send flow {key:?} to different backends"
            );
        }
    }

    #[test]
    fn only_changed_slots_are_rewritten() {
        let new = [1, 2, 3, 4];
        assert_eq!(
            changed_slots(Some(&[1, 9, 3, 9]), &new).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(
            changed_slots(None, &new).collect::<Vec<_>>(),
            vec![0, 1, 2, 3],
            "an unknown half is written whole"
        );
        assert_eq!(
            changed_slots(Some(&[1, 2]), &new).count(),
            4,
            "a half of another size is written whole"
        );
    }

    #[test]
    fn no_eligible_backend_gives_no_table() {
        let rt = ServiceRuntime::new(0, service()).expect("builds");
        let mut backends = rt.snapshot().load_full().backends.clone();
        for b in &mut backends {
            b.up = false;
        }
        assert_eq!(
            table_entries(&backends, &[0, 1, 2], 65537).expect("no error"),
            None,
            "a service with every backend down must get an empty table, not a stale one"
        );
    }
}
