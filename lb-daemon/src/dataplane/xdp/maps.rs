//! Writing a service's snapshot into the BPF maps, in the order the map contract
//! (`lb_common::maps`) prescribes: backends, the inactive table half, its size, the flip,
//! and the VIP last (first time only); and taking a service or a backend id out again.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use aya::maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::Ebpf;
use lb_common::maps::{
    self as contract, addr_words, family_of, local_addr_index, table_index, vip_port_bit, Backend,
    DecapAddr, VipKey, VipValue, BACKEND_F_DOWN, BACKEND_F_DRAINING, MODE_DSR, MODE_NAT,
};
use lb_common::{Counters, STATS_LEN};

use super::bit_map::BitMap;
use super::bpf_map::{io, removed, take, MapsError};
use super::ids::{BackendIds, IdPool};
use crate::config::{Forwarding, Protocol};
use crate::maglev::{MaglevBackend, MaglevTable};
use crate::snapshot::{BackendView, ServiceSnapshot};

/// How often a `nat` service's backends are asked about their routes again (by the sync
/// thread, `ServiceSlot::ask_replies_again`): a route changed so that a backend's replies
/// would miss the program takes it out of the table within this time, and one changed back
/// returns it.
pub const REPLIES_EVERY: Duration = Duration::from_secs(10);

/// Most backends of one service asked about again per poll of the sync thread (every 50 ms):
/// each costs two or three netlink requests under the plane's lock, so a service of 4,096
/// backends is asked about over 64 polls (3.2 s), not in one hold of the lock.
pub const REPLIES_PER_POLL: usize = 64;

/// After an interface of the plane was made again, the rounds of asking come this often
/// (instead of every [`REPLIES_EVERY`]) for [`REPLIES_SOON_FOR`]: the new device's address
/// and routes may come a moment after the device itself (Docker adds them next).
const REPLIES_SOON_EVERY: Duration = Duration::from_secs(1);
/// How long the rounds come every [`REPLIES_SOON_EVERY`] after an interface was made again.
const REPLIES_SOON_FOR: Duration = Duration::from_secs(5);

/// The maps the daemon writes and reads, taken out of the loaded object.
pub struct Maps {
    vips: HashMap<MapData, VipKey, VipValue>,
    /// `VIP_ADDRS`, kept equal to the addresses of `VIPS`' keys ([`Maps::sync_vip_keys`]).
    vip_addrs: HashMap<MapData, DecapAddr, u32>,
    /// What `VIP_ADDRS` holds.
    vip_addrs_written: std::collections::HashSet<DecapAddr>,
    /// `VIP_PORTS`, a bit for each port of `VIPS`' keys ([`Maps::sync_vip_ports`]).
    vip_ports: BitMap,
    services: Array<MapData, contract::Service>,
    backends: Array<MapData, Backend>,
    tables: Array<MapData, u32>,
    devmap: DevMapHash<MapData>,
    /// `VETH_PEERS`: the veths `lb_tc` sends to with `bpf_redirect_peer`.
    veth_peers: DevMapHash<MapData>,
    stats: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    /// `LOCAL_ADDRS`: the SNAT addresses past the first of `nat` services with several.
    local_addrs: Array<MapData, [u32; 4]>,
    /// `BRIDGE_FDB`, `BRIDGE_PORTS` and `BRIDGES`: see `bridge_ports.rs`.
    bridges: super::bridge_ports::BridgeMaps,
    /// `LIMITS`: see `limits.rs`. (`CONNTRACK` and `CLIENTS` are not here: the sync thread
    /// owns them, see `map_walk.rs`.)
    pub(super) limits: super::limits::LimitMaps,
}

impl Maps {
    /// Takes the balancer's maps out of `ebpf` (the programs stay in it), and gives
    /// `VIP_PORTS` the ports of the VIPs an adopted `VIPS` holds: that map is not pinned, and
    /// the program must find them there from its first packet.
    ///
    /// Returns `Err(MapsError::Missing)` when a map is absent or has another type or
    /// key/value size than `lb_common::maps` says, `Err(MapsError::Io)` when `VIPS` or
    /// `VIP_PORTS` cannot be read or written.
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps, MapsError> {
        let vip_addrs: HashMap<MapData, DecapAddr, u32> = take(ebpf, contract::VIP_ADDRS)?;
        // What an adopted (pinned) map holds already; empty for a new one.
        let vip_addrs_written = vip_addrs.keys().filter_map(Result::ok).collect();
        let vip_ports = BitMap::take(ebpf, contract::VIP_PORTS, contract::VIP_PORTS_LEN)?;
        let mut maps = Maps {
            vips: take(ebpf, contract::VIPS)?,
            vip_addrs,
            vip_addrs_written,
            vip_ports,
            services: take(ebpf, contract::SERVICES)?,
            backends: take(ebpf, contract::BACKENDS)?,
            tables: take(ebpf, contract::TABLES)?,
            devmap: take(ebpf, contract::DEVMAP)?,
            veth_peers: take(ebpf, contract::VETH_PEERS)?,
            stats: take(ebpf, contract::STATS)?,
            service_stats: take(ebpf, contract::SERVICE_STATS)?,
            backend_stats: take(ebpf, contract::BACKEND_STATS)?,
            local_addrs: take(ebpf, contract::LOCAL_ADDRS)?,
            bridges: super::bridge_ports::BridgeMaps::take(ebpf)?,
            limits: super::limits::LimitMaps::take(ebpf)?,
        };
        maps.sync_vip_ports()?;
        Ok(maps)
    }

    /// The `VIPS` entries: each VIP key and its service id (what an adopted pinned set
    /// serves).
    ///
    /// Returns `Err(MapsError::Io)` when the map cannot be read.
    pub fn vip_entries(&self) -> Result<Vec<(VipKey, u32)>, MapsError> {
        let mut out = Vec::new();
        for entry in self.vips.iter() {
            let (key, value) = entry.map_err(io(contract::VIPS))?;
            out.push((key, value.service));
        }
        Ok(out)
    }

    /// Service `id`'s `SERVICES` entry.
    ///
    /// Returns `Err(MapsError::Io)` when the map cannot be read.
    pub fn service_entry(&self, id: u32) -> Result<contract::Service, MapsError> {
        self.services.get(&id, 0).map_err(io(contract::SERVICES))
    }

    /// The backend ids in use in `BACKENDS` (family set) with their entries.
    ///
    /// Returns `Err(MapsError::Io)` when the map cannot be read.
    pub fn backend_entries(&self) -> Result<Vec<(u32, Backend)>, MapsError> {
        let mut out = Vec::new();
        for id in 0..contract::MAX_BACKENDS {
            let b = self.backends.get(&id, 0).map_err(io(contract::BACKENDS))?;
            if b.family != 0 {
                out.push((id, b));
            }
        }
        Ok(out)
    }

    /// The distinct backend ids of service `id`'s table half `half` (its first `size`
    /// slots).
    ///
    /// Returns `Err(MapsError::Io)` when the map cannot be read.
    pub fn table_ids(
        &self,
        id: u32,
        half: u32,
        size: u32,
    ) -> Result<std::collections::BTreeSet<u32>, MapsError> {
        let mut ids = std::collections::BTreeSet::new();
        for s in 0..size.min(contract::MAX_TABLE_SIZE) {
            let b = self
                .tables
                .get(&table_index(id, half, s), 0)
                .map_err(io(contract::TABLES))?;
            ids.insert(b);
        }
        Ok(ids)
    }

    /// Lets the program redirect packets out of interface `ifindex` (`DEVMAP`).
    pub fn allow_redirect(&mut self, ifindex: u32) -> Result<(), MapsError> {
        self.devmap
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| MapsError::Devmap {
                map: contract::DEVMAP,
                ifindex,
                reason: e.to_string(),
            })
    }

    /// Lets `lb_tc` send packets out of interface `ifindex`, a veth whose peer is in another
    /// namespace, straight to the peer (`VETH_PEERS`). `Err(MapsError::Devmap)` when the
    /// map is full ([`contract::VETH_PEERS_SIZE`] interfaces) or cannot be written.
    pub fn allow_peer_redirect(&mut self, ifindex: u32) -> Result<(), MapsError> {
        self.veth_peers
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| MapsError::Devmap {
                map: contract::VETH_PEERS,
                ifindex,
                reason: e.to_string(),
            })
    }

    /// Makes `BRIDGE_FDB` and `BRIDGE_PORTS` hold `wanted`, sets the `BRIDGES` bit of each
    /// bridge with entries (clears the others') and lets its veth ports take peer redirects
    /// (see `bridge_ports.rs`). Returns how many entries or ports had no room.
    ///
    /// Returns `Err(MapsError::Io)` when an entry cannot be removed or a `BRIDGES` word
    /// cannot be written.
    pub fn write_bridges(
        &mut self,
        wanted: &super::bridge_ports::Wanted,
    ) -> Result<usize, MapsError> {
        self.bridges.write(wanted, &mut self.veth_peers)
    }

    /// Writes `snap` into the maps for `slot` and flips its table (steps 1-5 of the map
    /// contract). Returns how many table slots it wrote.
    ///
    /// Backends get their ids from `slot` (new addresses take one from `pool`, their
    /// counters zeroed); backends that left the snapshot leave the table now and keep their
    /// id and `BACKENDS` entry, so pinned flows go on, until `drain_deadline` (see
    /// [`super::ids`]). Costs one map update per backend and per table slot that differs from
    /// what the inactive half already holds: all M (65537 by default) the first time, tens of
    /// milliseconds; afterwards only the slots that moved, which Maglev keeps few.
    ///
    /// New backends that find no free id are left out: no `BACKENDS` entry, no table slot,
    /// as if down ([`ServiceSlot::missing_ids`] says how many); health changes of the others
    /// are published all the same, and the next publish tries again.
    ///
    /// Returns `Err(MapsError::Io)` when a write fails; the previous table stays live.
    pub fn publish(
        &mut self,
        slot: &mut ServiceSlot,
        snap: &ServiceSnapshot,
        pool: &mut IdPool,
        drain_deadline: Instant,
    ) -> Result<usize, MapsError> {
        let addresses: Vec<SocketAddr> = snap.backends.iter().map(|b| b.address).collect();
        slot.check_replies(&snap.name, &addresses);
        let assigned = slot.backends.assign(&addresses, pool, drain_deadline);
        slot.missing_ids = assigned.missing;
        for &id in &assigned.fresh {
            self.reset_backend_counters(id)?;
        }
        for (b, id) in snap.backends.iter().zip(&assigned.ids) {
            // A backend with no id has no BACKENDS entry and no table slot (below).
            let Some(id) = *id else { continue };
            slot.backends.set_down(id, !b.keeps_flows());
            let value = Backend {
                flags: backend_flags(b),
                ..Backend::new(b.address)
            };
            self.backends
                .set(id, value, 0)
                .map_err(io(contract::BACKENDS))?;
        }
        self.mark_draining(slot.backend_ids())?;
        // DNS may answer with both families; XDP forwards within the VIP's, so the others
        // take no table slot (they count as not eligible), nor do backends with no id, nor
        // NAT backends whose replies would miss the program.
        let v4 = slot.vip.is_ipv4();
        // Never in the table: a backend without an id is never eligible.
        let ids: Vec<u32> = assigned
            .ids
            .iter()
            .map(|id| id.unwrap_or(u32::MAX))
            .collect();
        let placeable = |(b, id): (&BackendView, &Option<u32>)| {
            b.address.is_ipv4() == v4 && id.is_some() && slot.replies_reach(&b.address)
        };
        let table = if snap.backends.iter().zip(&assigned.ids).all(placeable) {
            table_entries(&snap.backends, &ids, slot.table_size)?
        } else {
            let view: Vec<BackendView> = snap
                .backends
                .iter()
                .zip(&assigned.ids)
                .map(|(b, id)| BackendView {
                    up: b.up && placeable((b, id)),
                    ..b.clone()
                })
                .collect();
            table_entries(&view, &ids, slot.table_size)?
        };
        let (table, digest) = table.unzip();
        // Before the flip, which publishes the VIP the first time: the limits hold from the
        // service's first packet.
        self.limits
            .write(slot.id, slot.protocol, &snap.limits, snap.idle_timeout)?;
        let written = self.flip(slot, table)?;
        slot.table_digest = digest;
        slot.generation = snap.generation;
        slot.replies_changed = false;
        Ok(written)
    }

    /// Flags every leaving backend of `ids` draining: their pinned flows go on, a new
    /// connection that reuses one of their 4-tuples is placed by the table. A backend that
    /// was down when it left stays flagged down as well ([`leaving_flags`]): its pinned flows
    /// are re-placed, not sent into a dead backend until the drain ends.
    pub fn mark_draining(&mut self, ids: &BackendIds) -> Result<(), MapsError> {
        for (address, id, down) in ids.leaving_with_state() {
            let value = Backend {
                flags: leaving_flags(down),
                ..Backend::new(address)
            };
            self.backends
                .set(id, value, 0)
                .map_err(io(contract::BACKENDS))?;
        }
        Ok(())
    }

    /// Flags backend ids `ids` draining in `BACKENDS`, keeping their address and whether they
    /// are down: ids an adopted set left that no service claimed (see `adopt.rs`).
    ///
    /// Returns `Err(MapsError::Io)` when the map cannot be read or written.
    pub fn flag_draining(&mut self, ids: &[u32]) -> Result<(), MapsError> {
        for &id in ids {
            let mut b = self.backends.get(&id, 0).map_err(io(contract::BACKENDS))?;
            b.flags = leaving_flags(b.flags & BACKEND_F_DOWN != 0);
            self.backends
                .set(id, b, 0)
                .map_err(io(contract::BACKENDS))?;
        }
        Ok(())
    }

    /// The SNAT addresses past the first of adopted service `id`, whose `SERVICES` entry is
    /// `found`, as `LOCAL_ADDRS` holds them (for [`ServiceSlot::leftover`]); none for `dsr`
    /// or a single address. Stops at the first entry it cannot read or make out (logged):
    /// the flows translated from the addresses after it would then break.
    pub fn adopted_local_addrs(&self, id: u32, found: &contract::Service) -> Vec<IpAddr> {
        if found.mode != MODE_NAT {
            return Vec::new();
        }
        let n = u32::from(found.local_addrs).min(contract::MAX_LOCAL_ADDRS);
        let mut more = Vec::new();
        for i in 1..n {
            let read = self.local_addrs.get(&local_addr_index(id, i), 0);
            match read.map(|words| contract::words_addr(found.family, &words)) {
                Ok(Some(addr)) => more.push(addr),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(
                        "eBPF: adopted service id {id}: its local address {i} cannot be read \
                         ({e}); flows translated from it break"
                    );
                    break;
                }
            }
        }
        more
    }

    /// Empties `slot`'s table (steps 2-4 with no backend): new flows of the service find no
    /// backend, flows conntrack pinned go on. The first step of removing a service.
    pub fn empty_table(&mut self, slot: &mut ServiceSlot) -> Result<(), MapsError> {
        self.flip(slot, None)?;
        slot.table_digest = None;
        Ok(())
    }

    /// Steps 2-5: writes `table` into the inactive half, flips to it, and inserts the VIP the
    /// first time. `None` publishes size 0 (no eligible backend).
    fn flip(
        &mut self,
        slot: &mut ServiceSlot,
        table: Option<Vec<u32>>,
    ) -> Result<usize, MapsError> {
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
        // Before the service entry that counts them, also for a slot that continues an
        // adopted service (its VIP is published, but `local_address` may have gained an
        // address across the restart): the program never reads a count past what is written.
        for (index, words) in slot.local_addrs_due() {
            self.local_addrs
                .set(index, words, 0)
                .map_err(io(contract::LOCAL_ADDRS))?;
        }
        slot.local_addrs_written = true;
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
        if !slot.vip_published {
            self.vips
                .insert(slot.vip_key(), VipValue { service: slot.id }, 0)
                .map_err(io(contract::VIPS))?;
            slot.vip_published = true;
            self.sync_vip_keys()?;
        }
        Ok(written)
    }

    /// Makes `VIP_ADDRS` and `VIP_PORTS` follow `VIPS`' keys after a key was added or
    /// removed ([`Maps::sync_vip_addrs`], [`Maps::sync_vip_ports`]).
    ///
    /// Returns `Err(MapsError::Io)` when a map cannot be read or written.
    fn sync_vip_keys(&mut self) -> Result<(), MapsError> {
        self.sync_vip_addrs()?;
        self.sync_vip_ports()
    }

    /// Makes `VIP_PORTS` hold exactly the ports of `VIPS`' keys, a bit each, so the program
    /// looks `VIPS` up only for packets to those ports (see `lb_common::maps::VIP_PORTS`).
    /// Called after `VIPS` changed: a new VIP's bit is set after its key is in `VIPS`, a
    /// removed one's cleared after its key is gone.
    ///
    /// Returns `Err(MapsError::Io)` when a map cannot be read or written.
    fn sync_vip_ports(&mut self) -> Result<(), MapsError> {
        let ports = self
            .vips
            .keys()
            .map(|key| key.map(|key| vip_port_bit(key.port)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io(contract::VIPS))?;
        self.vip_ports.write(ports)
    }

    /// Makes `VIP_ADDRS` hold exactly the addresses of `VIPS`' keys, so the program drops the
    /// fragments and IPv6 extension-header packets sent to a VIP (see `lb_common::maps`).
    /// Added before removed; a VIP's address leaves only when no `VIPS` key has it.
    ///
    /// Returns `Err(MapsError::Io)` when a map cannot be read or written.
    fn sync_vip_addrs(&mut self) -> Result<(), MapsError> {
        let mut wanted = std::collections::HashSet::new();
        for key in self.vips.keys() {
            let key = key.map_err(io(contract::VIPS))?;
            wanted.insert(DecapAddr {
                addr: key.addr,
                family: key.family,
                _pad: [0; 3],
            });
        }
        for addr in wanted.difference(&self.vip_addrs_written) {
            self.vip_addrs
                .insert(addr, 0, 0)
                .map_err(io(contract::VIP_ADDRS))?;
        }
        for addr in self.vip_addrs_written.difference(&wanted) {
            removed(self.vip_addrs.remove(addr)).map_err(io(contract::VIP_ADDRS))?;
        }
        self.vip_addrs_written = wanted;
        Ok(())
    }

    /// Writes `entry` back as service `id`'s `SERVICES` entry: an adopted service's, after a
    /// first write for the config's service that continued it failed.
    ///
    /// Returns `Err(MapsError::Io)` when the map cannot be written.
    pub fn restore_service(&mut self, id: u32, entry: contract::Service) -> Result<(), MapsError> {
        self.services
            .set(id, entry, 0)
            .map_err(io(contract::SERVICES))
    }

    /// Takes a drained service out: hands its VIP on (see [`Maps::hand_over_vip`], to no
    /// one) and clears its `SERVICES` entry. Its backend ids are released separately
    /// ([`Maps::clear_backends`]).
    ///
    /// Returns `Err(MapsError::Io)` when a map cannot be read or written.
    pub fn remove_service(&mut self, slot: &ServiceSlot) -> Result<(), MapsError> {
        self.hand_over_vip(slot, None)?;
        self.clear_service(slot.id)
    }

    /// Clears service `id`'s `SERVICES` entry (its VIP is gone already).
    ///
    /// Returns `Err(MapsError::Io)` when the map cannot be written.
    pub fn clear_service(&mut self, id: u32) -> Result<(), MapsError> {
        self.services
            .set(id, contract::Service::default(), 0)
            .map_err(io(contract::SERVICES))
    }

    /// Gives `slot`'s VIP to service id `to`, or deletes it from `VIPS` when `to` is `None`,
    /// if `VIPS` still names `slot`'s service: a service placed since at the same VIP owns
    /// the entry, and its VIP must not be taken from it. Returns whether `VIPS` changed.
    ///
    /// Returns `Err(MapsError::Io)` when `VIPS` cannot be read or written.
    pub fn hand_over_vip(
        &mut self,
        slot: &ServiceSlot,
        to: Option<u32>,
    ) -> Result<bool, MapsError> {
        if !slot.vip_published {
            return Ok(false);
        }
        let key = slot.vip_key();
        match self.vips.get(&key, 0) {
            Ok(v) if v.service == slot.id => {}
            Ok(_) | Err(aya::maps::MapError::KeyNotFound) => return Ok(false),
            Err(e) => return Err(io(contract::VIPS)(e)),
        }
        match to {
            Some(service) => self
                .vips
                .insert(key, VipValue { service }, 0)
                .map_err(io(contract::VIPS))?,
            None => {
                removed(self.vips.remove(&key)).map_err(io(contract::VIPS))?;
                self.sync_vip_keys()?;
            }
        }
        Ok(true)
    }

    /// Marks backends `ids` unused (`family` 0, so the program re-places flows still pinned
    /// to them). The first step of releasing ids: the conntrack entries still naming them
    /// are forgotten next, outside the `State` lock (`map_walk::MapWalk::forget_flows_of`), and
    /// only then may the ids be reused.
    ///
    /// Returns `Err(MapsError::Io)` when a write fails: some of them cleared, none safe to
    /// reuse.
    pub fn clear_backends(&mut self, ids: &[u32]) -> Result<(), MapsError> {
        for &id in ids {
            self.backends
                .set(id, Backend::default(), 0)
                .map_err(io(contract::BACKENDS))?;
        }
        Ok(())
    }

    /// Zeroes service `id`'s counters (a reused id starts from zero).
    pub fn reset_service_counters(&mut self, id: u32) -> Result<(), MapsError> {
        let zero = zeroes()?;
        self.service_stats
            .set(id, zero, 0)
            .map_err(io(contract::SERVICE_STATS))
    }

    /// Zeroes backend `id`'s counters (a reused id starts from zero).
    pub fn reset_backend_counters(&mut self, id: u32) -> Result<(), MapsError> {
        let zero = zeroes()?;
        self.backend_stats
            .set(id, zero, 0)
            .map_err(io(contract::BACKEND_STATS))
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

/// The `BACKENDS` flags of a backend of the service: none while it takes new flows; DRAINING
/// while its pinned flows stay but new ones go elsewhere (weight 0, or
/// [awaiting its first check](BackendView::awaiting_check)); DOWN when it is down, so its
/// pinned flows are re-placed.
pub fn backend_flags(b: &BackendView) -> u8 {
    if !b.keeps_flows() {
        BACKEND_F_DOWN
    } else if b.eligible() {
        0
    } else {
        BACKEND_F_DRAINING
    }
}

/// The `BACKENDS` flags of a backend that left its service: DRAINING, and DOWN too when it
/// was down when it left (DOWN in [`backend_flags`]' sense: not one that waited for its
/// first check).
pub fn leaving_flags(down: bool) -> u8 {
    if down {
        BACKEND_F_DOWN | BACKEND_F_DRAINING
    } else {
        BACKEND_F_DRAINING
    }
}

fn zeroes() -> Result<PerCpuValues<Counters>, MapsError> {
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| MapsError::Cpus(format!("{what}: {e}")))?;
    PerCpuValues::try_from(vec![Counters::default(); cpus])
        .map_err(|e| MapsError::Cpus(e.to_string()))
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
    /// The Maglev table size M, `<= lb_common::maps::MAX_TABLE_SIZE`.
    pub table_size: u32,
    /// The VIP and port.
    pub vip: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// NAT or DSR.
    pub forwarding: Forwarding,
    /// The balancer's addresses on the backends' side: the first is the DSR outer source and
    /// NAT's `local_addr`, all of them NAT's SNAT sources (at most
    /// `lb_common::maps::MAX_LOCAL_ADDRS`).
    pub local_addresses: Vec<IpAddr>,
    /// SNAT ports, inclusive (NAT only).
    pub snat_ports: (u16, u16),
    /// Seconds an ended flow's SNAT port is held before reuse (NAT only).
    pub snat_hold_s: u32,
    /// The node announces the VIP among others (`contract::SERVICE_F_ANNOUNCED`).
    announced: bool,
    /// Backend address → id, live and leaving.
    backends: BackendIds,
    /// The half packets read now, 0 or 1.
    active_half: u32,
    /// Slots in the live half; 0 while no backend is eligible.
    table_size_live: u32,
    /// Whether the VIP is in `VIPS` yet.
    vip_published: bool,
    /// Whether this slot wrote its `LOCAL_ADDRS` entries yet. Apart from `vip_published`: a
    /// slot that continues an adopted service finds its VIP published, but its local
    /// addresses may have changed across the restart.
    local_addrs_written: bool,
    /// What each table half holds in the kernel, when known: later writes skip the slots
    /// that already hold the right backend.
    halves: [Option<std::sync::Arc<[u32]>>; 2],
    /// The generation of the snapshot last written; 0 before the first.
    generation: u64,
    /// The digest of the table written last (`None`: none yet, none eligible, or emptied):
    /// what the program places new flows by, which leaves out backends the snapshot's own
    /// table has (no id, another family, replies that would miss the program).
    table_digest: Option<crate::maglev::TableDigest>,
    /// The last generation whose write failed and was logged, so a persistent error is
    /// logged once per generation, not on every poll.
    pub failed_generation: Option<u64>,
    /// How many of the last written snapshot's backends got no backend id (the pool was
    /// empty) and were left out of the table.
    pub missing_ids: usize,
    /// The service's `interface` and `backend_interfaces`, by which the routes to its
    /// backends are checked: NAT replies must come in there, and at the XDP hook the program
    /// sends only out of them. Empty for DSR at tc, where there is nothing to check.
    reply_interfaces: Vec<String>,
    /// Whether the service runs at the XDP hook, where the program sends only out of those
    /// interfaces: a backend (NAT or DSR) routed out of another device is left out too.
    xdp_hook: bool,
    /// NAT: per backend address, why its replies would miss the program (`None`: they reach
    /// it), asked when the address first comes and again every [`REPLIES_EVERY`]
    /// ([`super::routes::ReplyPaths::verdict`]). One whose would miss (a DNS name answered
    /// with an address behind another interface, a route changed since) is left out of the
    /// table: every flow placed on it would fail.
    replies_miss: std::collections::HashMap<SocketAddr, Option<super::routes::Miss>>,
    /// When the last round of asking every backend again began.
    replies_asked_at: Option<Instant>,
    /// The index of the next backend to ask about while a round is under way, and the
    /// generation of the snapshot whose backend list it indexes.
    replies_cursor: Option<(usize, u64)>,
    /// Until when rounds come every [`REPLIES_SOON_EVERY`] ([`ServiceSlot::ask_replies_soon`]).
    replies_soon_until: Option<Instant>,
    /// A backend left the table or came back to it by a verdict since the last successful
    /// write: the table is written again even when the snapshot is the same.
    replies_changed: bool,
}

impl ServiceSlot {
    /// The slot of the service at `vip`/`protocol` with service id `id` and `settings`,
    /// nothing written yet. `local_addresses` are the service's (`local_address`), at least one, which the caller
    /// checked is set; `snat_ports` the range [`super::snat::range`] chose (NAT).
    pub fn new(
        id: u32,
        vip: SocketAddr,
        protocol: Protocol,
        settings: &super::XdpService,
        local_addresses: Vec<IpAddr>,
        snat_ports: (u16, u16),
    ) -> ServiceSlot {
        let hold = settings.xdp.snat_port_hold;
        let xdp_hook = matches!(settings.hook, super::HookRequest::Xdp { .. });
        ServiceSlot {
            id,
            table_size: settings.table_size,
            vip,
            protocol,
            forwarding: settings.xdp.forwarding,
            local_addresses,
            snat_ports,
            // Rounded up: a hold of 1.5 s must not end after 1 s.
            snat_hold_s: u32::try_from(hold.as_secs())
                .unwrap_or(u32::MAX)
                .saturating_add(u32::from(hold.subsec_nanos() != 0)),
            announced: settings.announced,
            backends: BackendIds::default(),
            active_half: 0,
            table_size_live: 0,
            vip_published: false,
            local_addrs_written: false,
            halves: [None, None],
            generation: 0,
            table_digest: None,
            failed_generation: None,
            missing_ids: 0,
            xdp_hook,
            reply_interfaces: match settings.xdp.forwarding {
                // DSR replies bypass the balancer; only the way out is checked, at XDP.
                Forwarding::Dsr if !xdp_hook => Vec::new(),
                _ => (settings.xdp.interface.iter())
                    .chain(settings.xdp.backend_interfaces.iter())
                    .cloned()
                    .collect(),
            },
            replies_miss: std::collections::HashMap::new(),
            replies_asked_at: None,
            replies_cursor: None,
            replies_soon_until: None,
            replies_changed: false,
        }
    }

    /// Asks, for each of `addresses` not asked about yet (NAT, and DSR at the XDP hook),
    /// whether its replies reach the program (NAT) and the program can send to it (at XDP),
    /// and logs each of `service`'s backends for which not: it is left out of the table. Addresses that left are forgotten (asked again if they come back).
    /// One that cannot be told about now (no route, the kernel cannot be asked, one of the
    /// service's interfaces missing) counts as reaching until [`ServiceSlot::ask_replies_again`]
    /// can tell.
    fn check_replies(&mut self, service: &str, addresses: &[SocketAddr]) {
        if self.reply_interfaces.is_empty() {
            return;
        }
        let now: std::collections::HashSet<&SocketAddr> = addresses.iter().collect();
        self.replies_miss.retain(|a, _| now.contains(a));
        let fresh: Vec<SocketAddr> = (addresses.iter())
            .filter(|a| !self.replies_miss.contains_key(a))
            .copied()
            .collect();
        // The first ask covers every address: the next full one is due in REPLIES_EVERY.
        self.replies_asked_at.get_or_insert_with(Instant::now);
        self.ask_replies(service, &fresh);
    }

    /// Asks again about every backend of `snap` (as [`ServiceSlot::check_replies`]), in a round that begins
    /// once [`REPLIES_EVERY`] has passed since the last began and asks about
    /// [`REPLIES_PER_POLL`] backends per call at `now`, so that a route changed since, or
    /// one that could not be told about, is followed; each backend that leaves the table or
    /// comes back is logged. Returns whether one did since the table was last written (it
    /// must be written again): true until [`Maps::publish`] succeeds.
    pub(super) fn ask_replies_again(&mut self, snap: &ServiceSnapshot, now: Instant) -> bool {
        if self.reply_interfaces.is_empty() {
            return false;
        }
        let every = match self.replies_soon_until {
            Some(until) if now < until => REPLIES_SOON_EVERY,
            _ => REPLIES_EVERY,
        };
        let start = match self.replies_cursor {
            // The round goes on over the list it began with; a new list (a DNS answer, a
            // reload) starts it again, so no backend is skipped.
            Some((next, generation)) if generation == snap.generation => next,
            Some(_) => {
                self.replies_asked_at = Some(now);
                0
            }
            None if self
                .replies_asked_at
                .is_none_or(|at| now.saturating_duration_since(at) >= every) =>
            {
                self.replies_asked_at = Some(now);
                0
            }
            None => return self.replies_changed,
        };
        let all = snap.backends.len();
        let end = start.saturating_add(REPLIES_PER_POLL).min(all);
        let addresses: Vec<SocketAddr> = (snap.backends.get(start..end).unwrap_or_default())
            .iter()
            .map(|b| b.address)
            .collect();
        self.replies_cursor = (end < all).then_some((end, snap.generation));
        let before: Vec<bool> = addresses.iter().map(|a| self.replies_reach(a)).collect();
        self.ask_replies(&snap.name, &addresses);
        self.replies_changed |=
            (addresses.iter().zip(before)).any(|(a, reached)| self.replies_reach(a) != reached);
        self.replies_changed
    }

    /// Makes [`ServiceSlot::ask_replies_again`] begin a round at once, and then every
    /// [`REPLIES_SOON_EVERY`] for [`REPLIES_SOON_FOR`] from `now`: an interface of the plane
    /// was made again, and the routes to backends behind it with it (or a moment later).
    pub(super) fn ask_replies_soon(&mut self, now: Instant) {
        self.replies_asked_at = None;
        self.replies_cursor = None;
        self.replies_soon_until = Some(now + REPLIES_SOON_FOR);
    }

    /// Asks the routes about each of `addresses` and records the verdicts, logging a
    /// backend of `service` that leaves the table or comes back to it. A verdict that
    /// cannot be told now leaves the last one in place. Two or three netlink requests per
    /// address, under the plane's lock: hundreds of addresses hold it for tens of
    /// milliseconds.
    fn ask_replies(&mut self, service: &str, addresses: &[SocketAddr]) {
        use super::routes::{ReplyPaths, Verdict};
        if addresses.is_empty() {
            return;
        }
        let Some(paths) = ReplyPaths::of(&self.reply_interfaces) else {
            return;
        };
        for &address in addresses {
            let was = self.replies_miss.get(&address);
            let replies = match self.forwarding {
                Forwarding::Nat => paths.verdict(address.ip(), &self.local_addresses),
                Forwarding::Dsr => Verdict::Reach,
            };
            let verdict = match replies {
                Verdict::Reach if self.xdp_hook => {
                    match paths.off_xdp(address.ip(), &self.local_addresses) {
                        Some(via) => Verdict::Miss(super::routes::Miss::OffXdp(via)),
                        None => Verdict::Reach,
                    }
                }
                verdict => verdict,
            };
            match verdict {
                Verdict::Reach => {
                    if was.is_some_and(Option::is_some) && self.forwarding == Forwarding::Nat {
                        tracing::info!(
                            "service {service}: backend {address}'s replies reach the eBPF \
                             program again: back in the eBPF table"
                        );
                    } else if was.is_some_and(Option::is_some) {
                        tracing::info!(
                            "service {service}: backend {address} is routed out of an interface \
                             of the service again: back in the eBPF table"
                        );
                    }
                    self.replies_miss.insert(address, None);
                }
                Verdict::Miss(why) => {
                    if was.and_then(Option::as_ref) != Some(&why) {
                        tracing::warn!(
                            "service {service}: backend {address} {why}: left out of the eBPF \
                             table"
                        );
                    }
                    self.replies_miss.insert(address, Some(why));
                }
                Verdict::Unknown => {}
            }
        }
    }

    /// Whether the replies of the backend at `address` reach the program, as far as known
    /// ([`ServiceSlot::check_replies`]).
    pub(super) fn replies_reach(&self, address: &SocketAddr) -> bool {
        self.left_out(address).is_none()
    }

    /// Why the backend at `address` is left out of the table: its replies would miss the
    /// program ([`ServiceSlot::check_replies`]); `None` when it is not (or not known to be).
    pub(super) fn left_out(&self, address: &SocketAddr) -> Option<&super::routes::Miss> {
        self.replies_miss.get(address).and_then(Option::as_ref)
    }

    /// Makes this new slot continue a service of an adopted pinned set, whose `SERVICES`
    /// entry is `found`: the VIP is published already (under this slot's id), packets read
    /// `found`'s active half, so the first write goes to the other one; `live` are its
    /// backend ids by address (see [`BackendIds::resume`]).
    pub fn resume(&mut self, found: &contract::Service, live: BTreeMap<SocketAddr, u32>) {
        self.active_half = found.active_half & 1;
        self.table_size_live = found.table_size[self.active_half as usize];
        self.vip_published = true;
        self.backends = BackendIds::resume(live);
    }

    /// The slot of a service of an adopted pinned set that the config no longer has, to drain
    /// it as a removed one: service id `id` at `vip`, its `SERVICES` entry `found`, and for
    /// `nat` its SNAT addresses past the first (`more_local`, see
    /// [`Maps::adopted_local_addrs`]): the entry the drain writes back counts them all, so
    /// the flows translated from each go on. `None` when the entry does not describe a
    /// service (another protocol, no address).
    pub fn leftover(
        id: u32,
        vip: &VipKey,
        found: &contract::Service,
        more_local: Vec<IpAddr>,
    ) -> Option<ServiceSlot> {
        let protocol = match vip.protocol {
            lb_common::flow::IPPROTO_TCP => Protocol::Tcp,
            lb_common::flow::IPPROTO_UDP => Protocol::Udp,
            _ => return None,
        };
        let local = contract::words_addr(found.family, &found.local_addr)?;
        let active_half = found.active_half & 1;
        Some(ServiceSlot {
            id,
            table_size: contract::MAX_TABLE_SIZE,
            vip: vip.address()?,
            protocol,
            forwarding: if found.mode == MODE_NAT {
                Forwarding::Nat
            } else {
                Forwarding::Dsr
            },
            local_addresses: std::iter::once(local).chain(more_local).collect(),
            snat_ports: (found.snat_port_min, found.snat_port_max),
            snat_hold_s: found.snat_hold_s,
            announced: found.flags & contract::SERVICE_F_ANNOUNCED != 0,
            backends: BackendIds::default(),
            active_half,
            table_size_live: found.table_size[active_half as usize],
            vip_published: true,
            // Its addresses past the first are in `LOCAL_ADDRS` already.
            local_addrs_written: true,
            halves: [None, None],
            generation: 0,
            table_digest: None,
            failed_generation: None,
            missing_ids: 0,
            // Drained, never given backends: nothing to ask.
            xdp_hook: false,
            reply_interfaces: Vec::new(),
            replies_miss: std::collections::HashMap::new(),
            replies_asked_at: None,
            replies_cursor: None,
            replies_soon_until: None,
            replies_changed: false,
        })
    }

    /// The `LOCAL_ADDRS` entries (index, address words) the next flip writes before the
    /// `SERVICES` entry that counts them: the addresses past the first, until the slot's
    /// first flip wrote them.
    fn local_addrs_due(&self) -> Vec<(u32, [u32; 4])> {
        if self.local_addrs_written {
            return Vec::new();
        }
        (self.local_addresses.iter().enumerate().skip(1))
            .map(|(i, addr)| (local_addr_index(self.id, i as u32), addr_words(*addr)))
            .collect()
    }

    /// The generation of the snapshot last written; 0 before the first.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The digest of the table the program places new flows by (the last one written);
    /// `None` before the first write, while no backend is eligible, and once the table was
    /// emptied ([`Maps::empty_table`]).
    pub fn table_digest(&self) -> Option<crate::maglev::TableDigest> {
        self.table_digest
    }

    /// The half packets read now, 0 or 1.
    pub fn active_half(&self) -> u32 {
        self.active_half
    }

    /// The service's backend ids.
    pub fn backend_ids(&self) -> &BackendIds {
        &self.backends
    }

    /// The service's backend ids, to start them leaving or take them out.
    pub fn backend_ids_mut(&mut self) -> &mut BackendIds {
        &mut self.backends
    }

    /// The key of the service's VIP in `VIPS`.
    pub fn vip_key(&self) -> VipKey {
        ServiceSlot::vip_key_of(self.vip, self.protocol)
    }

    /// The `VIPS` key of a service at `vip` over `protocol`.
    pub fn vip_key_of(vip: SocketAddr, protocol: Protocol) -> VipKey {
        VipKey::new(
            vip,
            match protocol {
                Protocol::Tcp => lb_common::flow::IPPROTO_TCP,
                Protocol::Udp => lb_common::flow::IPPROTO_UDP,
            },
        )
    }

    /// `nat`: the SNAT ports each backend has, over every local address (the range's ports
    /// times the addresses); 0 for `dsr`.
    pub fn snat_capacity(&self) -> u64 {
        if self.forwarding != Forwarding::Nat {
            return 0;
        }
        let (lo, hi) = self.snat_ports;
        (u64::from(hi.saturating_sub(lo)) + 1) * self.local_addresses.len() as u64
    }

    fn service_value(&self) -> contract::Service {
        let mut table_size = [0; 2];
        table_size[self.active_half as usize] = self.table_size_live;
        let nat = self.forwarding == Forwarding::Nat;
        contract::Service {
            mode: if nat { MODE_NAT } else { MODE_DSR },
            family: family_of(self.vip.ip()),
            // Bounded by `MAX_LOCAL_ADDRS` (16) at validation.
            local_addrs: if nat {
                self.local_addresses.len() as u8
            } else {
                1
            },
            flags: if self.announced {
                contract::SERVICE_F_ANNOUNCED
            } else {
                0
            },
            active_half: self.active_half,
            table_size,
            local_addr: addr_words(self.local_addresses[0]),
            snat_port_min: if nat { self.snat_ports.0 } else { 0 },
            snat_port_max: if nat { self.snat_ports.1 } else { 0 },
            snat_hold_s: if nat { self.snat_hold_s } else { 0 },
        }
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
/// eligible, else the slots with the table's digest (by address, as `/status` shows it).
/// `ids[j]` is the backend id of `backends[j]`.
pub fn table_entries(
    backends: &[BackendView],
    ids: &[u32],
    size: u32,
) -> Result<Option<(Vec<u32>, crate::maglev::TableDigest)>, crate::maglev::MaglevError> {
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
    let slots = (table.entries().iter())
        .map(|&e| eligible[e as usize].0)
        .collect();
    Ok(Some((slots, table.digest(&input))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{self, Candidate};
    use crate::snapshot::{BackendView, ServiceSnapshot};

    /// Three backends (weights 1, 2 and 0) behind a `maglev` service with M = 65537, as the
    /// control plane would build it.
    fn snapshot() -> ServiceSnapshot {
        let backends: Vec<BackendView> = [
            ("10.200.1.2:80", 1),
            ("10.200.2.2:80", 2),
            ("10.200.3.2:80", 0),
        ]
        .into_iter()
        .map(|(address, weight)| BackendView {
            address: address.parse().expect("literal"),
            weight,
            up: true,
            awaiting_check: false,
            stats: Default::default(),
        })
        .collect();
        let candidates = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.eligible())
            .map(|(id, b)| Candidate {
                id,
                address: b.address,
                weight: b.weight,
                stats: b.stats.clone(),
            })
            .collect();
        let maglev = scheduler::build(
            crate::config::SchedulerKind::Maglev,
            candidates,
            65537,
            &scheduler::Turn::default(),
        )
        .expect("builds");
        ServiceSnapshot {
            name: "web".into(),
            listen: "10.200.100.1:80".parse().expect("literal"),
            protocol: Protocol::Tcp,
            scheduler_kind: crate::config::SchedulerKind::Maglev,
            connect_timeout: std::time::Duration::from_secs(1),
            idle_timeout: std::time::Duration::from_secs(60),
            retries: 0,
            backends,
            scheduler: Some(maglev),
            generation: 1,
            proxy_protocol: Default::default(),
            limits: Default::default(),
            max_flows: u32::MAX,
            access_log: false,
        }
    }

    /// A route change (here: a backend at an address of this host, which `lo` always has) is
    /// noticed when the re-ask is due, and stays to be written until a write succeeds.
    #[test]
    fn a_backend_whose_replies_miss_is_noticed_when_due_and_until_written() {
        let settings = super::super::XdpService {
            table_size: 65537,
            xdp: crate::config::XdpSettings {
                interface: Some("lo".into()),
                ..Default::default()
            },
            hook: super::super::HookRequest::Tc,
            announced: false,
            configured: Vec::new(),
        };
        let lo = IpAddr::from([127, 0, 0, 1]);
        let vip = "10.200.100.1:80".parse().expect("literal");
        let mut slot = ServiceSlot::new(0, vip, Protocol::Tcp, &settings, vec![lo], (1024, 2047));
        let mut snap = snapshot();
        snap.backends.truncate(1);
        let local = SocketAddr::new(lo, 80);
        snap.backends[0].address = local;
        let t0 = Instant::now();
        assert!(slot.ask_replies_again(&snap, t0), "the first ask finds it");
        assert!(matches!(
            slot.left_out(&local),
            Some(super::super::routes::Miss::Local)
        ));
        assert!(
            slot.ask_replies_again(&snap, t0 + Duration::from_secs(1)),
            "not written yet: still to be written"
        );
        slot.replies_changed = false;
        assert!(
            !slot.ask_replies_again(&snap, t0 + Duration::from_secs(2)),
            "written, and the next ask not due"
        );
        assert!(
            !slot.ask_replies_again(&snap, t0 + REPLIES_EVERY + Duration::from_secs(1)),
            "asked again: nothing changed"
        );
        assert!(!slot.replies_reach(&local));

        // A round over many backends asks REPLIES_PER_POLL of them per call.
        let many = REPLIES_PER_POLL + 36;
        let template = snap.backends[0].clone();
        snap.backends = (0..many)
            .map(|i| BackendView {
                address: SocketAddr::new(lo, 1000 + i as u16),
                ..template.clone()
            })
            .collect();
        let next_round = t0 + 2 * REPLIES_EVERY + Duration::from_secs(2);
        assert!(slot.ask_replies_again(&snap, next_round));
        let asked = |slot: &ServiceSlot| {
            (snap.backends.iter())
                .filter(|b| slot.left_out(&b.address).is_some())
                .count()
        };
        assert_eq!(
            asked(&slot),
            REPLIES_PER_POLL,
            "the first part of the round"
        );
        slot.ask_replies_again(&snap, next_round + Duration::from_millis(50));
        assert_eq!(
            asked(&slot),
            many,
            "the round goes on before the next is due"
        );
        assert!(
            slot.replies_cursor.is_none(),
            "the round is over after {many} backends"
        );

        // A new backend list mid-round starts the round again: none is skipped.
        let later = next_round + 2 * REPLIES_EVERY;
        slot.ask_replies_again(&snap, later);
        assert_eq!(
            slot.replies_cursor,
            Some((REPLIES_PER_POLL, snap.generation))
        );
        snap.generation += 1;
        slot.ask_replies_again(&snap, later + Duration::from_millis(50));
        assert_eq!(
            slot.replies_cursor,
            Some((REPLIES_PER_POLL, snap.generation)),
            "the new list is asked from its first backend"
        );
        slot.ask_replies_again(&snap, later + Duration::from_millis(100));
        assert_eq!(slot.replies_cursor, None);

        // After an interface was made again, rounds come every second for a while.
        let soon = later + Duration::from_secs(1);
        slot.ask_replies_soon(soon);
        for k in 0..2 {
            let at = soon + Duration::from_secs(k);
            slot.ask_replies_again(&snap, at);
            slot.ask_replies_again(&snap, at + Duration::from_millis(50));
            assert_eq!(
                slot.replies_cursor, None,
                "round {k} after the interface came back"
            );
            assert_eq!(slot.replies_asked_at, Some(at));
        }
        let quiet = soon + REPLIES_SOON_FOR + Duration::from_secs(1);
        slot.ask_replies_again(&snap, quiet);
        slot.ask_replies_again(&snap, quiet + Duration::from_millis(50));
        let began = slot.replies_asked_at;
        slot.ask_replies_again(&snap, quiet + Duration::from_secs(2));
        assert_eq!(
            slot.replies_asked_at, began,
            "rounds are every REPLIES_EVERY again once the burst is over"
        );
        let dsr = super::super::XdpService {
            xdp: crate::config::XdpSettings {
                forwarding: Forwarding::Dsr,
                ..settings.xdp.clone()
            },
            ..settings
        };
        let mut slot = ServiceSlot::new(1, vip, Protocol::Tcp, &dsr, vec![lo], (1024, 2047));
        assert!(
            !slot.ask_replies_again(&snap, t0),
            "DSR replies bypass the balancer"
        );
        assert!(slot.replies_reach(&local));
    }

    /// A `nat` service continued from a pinned set with a second local address (added across
    /// the restart: a reload refuses the change) writes it before its first flip counts it.
    #[test]
    fn a_resumed_service_writes_its_local_addresses_before_counting_them() {
        let settings = super::super::XdpService {
            table_size: 65537,
            xdp: crate::config::XdpSettings::default(),
            hook: super::super::HookRequest::Tc,
            announced: true,
            configured: Vec::new(),
        };
        let first: IpAddr = [10, 200, 0, 1].into();
        let second: IpAddr = [10, 200, 0, 3].into();
        let vip = "10.200.100.1:80".parse().expect("literal");
        let mut slot = ServiceSlot::new(
            5,
            vip,
            Protocol::Tcp,
            &settings,
            vec![first, second],
            (1024, 2047),
        );
        let found = contract::Service {
            mode: MODE_NAT,
            local_addrs: 1,
            active_half: 1,
            ..slot.service_value()
        };
        slot.resume(&found, BTreeMap::new());
        assert_eq!(slot.service_value().local_addrs, 2);
        assert_eq!(
            slot.service_value().flags,
            contract::SERVICE_F_ANNOUNCED,
            "an announced service says so to the program"
        );
        assert_eq!(
            slot.local_addrs_due(),
            vec![(local_addr_index(5, 1), addr_words(second))],
            "the first write would count a second local address LOCAL_ADDRS does not hold"
        );
        slot.local_addrs_written = true;
        assert_eq!(slot.local_addrs_due(), vec![], "written once per slot");
    }

    #[test]
    fn the_xdp_table_places_every_flow_where_the_maglev_scheduler_does() {
        let snap = snapshot();
        let ids = [100, 101, 102];
        let (table, _) = table_entries(&snap.backends, &ids, 65537)
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

    /// A backend a reload removes keeps its pinned eBPF flows; given back, it awaits its
    /// first check, and those flows must stay on it, not be re-placed as a down backend's.
    #[test]
    fn a_backend_awaiting_its_first_check_keeps_its_flows_and_takes_no_new_one() {
        let view = |up, weight, awaiting_check| BackendView {
            address: "10.200.1.2:80".parse().expect("literal"),
            weight,
            up,
            awaiting_check,
            stats: Default::default(),
        };
        assert_eq!(backend_flags(&view(true, 16, false)), 0);
        assert_eq!(backend_flags(&view(true, 0, false)), BACKEND_F_DRAINING);
        assert_eq!(backend_flags(&view(false, 16, false)), BACKEND_F_DOWN);
        assert_eq!(
            backend_flags(&view(false, 16, true)),
            BACKEND_F_DRAINING,
            "a backend awaiting its first check would have its pinned flows re-placed"
        );
        assert!(!view(false, 16, true).eligible(), "it takes no new flow");
    }

    #[test]
    fn a_backend_that_left_while_down_stays_down() {
        assert_eq!(leaving_flags(false), BACKEND_F_DRAINING);
        assert_eq!(
            leaving_flags(true),
            BACKEND_F_DOWN | BACKEND_F_DRAINING,
            "flows pinned to a dead removed backend must be re-placed, not sent into it"
        );
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
        let mut backends = snapshot().backends;
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
