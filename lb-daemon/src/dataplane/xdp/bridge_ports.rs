//! Keeps `BRIDGE_FDB` and `BRIDGE_PORTS` equal to the forwarding databases of the bridges
//! `lb_tc` is attached to (see `bridge_fdb.rs` and the map contract), so that a packet routed
//! into a bridge goes straight to the port its next hop is behind, and a DSR tunnel
//! super-packet is not segmented in software by the bridge device, which has no tunnel
//! offloads. It also keeps `BRIDGES`' bit set for each bridge that has entries, and clear
//! for the others, so that `lb_tc` looks up `BRIDGE_FDB` only for a packet out of a bridge
//! it could find an entry for.
//!
//! The sync thread reads the bridges about every [`REFRESH`]. In between, an address the
//! bridge learns goes through the bridge (correct, slower); a port that is deleted leaves
//! `BRIDGE_PORTS` at once (the kernel removes it) and its addresses go through the bridge;
//! but an address that moves to another port, or a port that leaves the bridge or stops
//! forwarding (STP, carrier), is still followed to its old port until the next read, up to a
//! second. A netlink subscription (`RTNLGRP_NEIGH`, `RTNLGRP_LINK`) would close that window.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use aya::maps::{DevMapHash, HashMap as BpfHashMap, MapData};
use aya::Ebpf;
use lb_common::maps::{self as contract, bridge_bit, BridgeFdbKey};
use tracing::{info, warn};

use super::bit_map::BitMap;
use super::bpf_map::{io, removed, take, MapsError};
use super::bridge_fdb;
use super::peer;

/// How often the bridges' forwarding databases are read again.
pub const REFRESH: Duration = Duration::from_secs(1);

/// `BRIDGE_FDB`, `BRIDGE_PORTS` and `BRIDGES`, and what the daemon wrote into them.
pub struct BridgeMaps {
    fdb: BpfHashMap<MapData, BridgeFdbKey, u32>,
    ports: DevMapHash<MapData>,
    /// `BRIDGES`: a bit for each bridge `BRIDGE_FDB` has entries of.
    bridges: BitMap,
    /// What `BRIDGE_FDB` holds.
    fdb_written: HashMap<BridgeFdbKey, u32>,
    /// What `BRIDGE_PORTS` holds (less what the kernel removed since). The ports written into
    /// `VETH_PEERS` are not removed by this module: the kernel does when a port goes away,
    /// and a veth with its peer elsewhere takes a peer redirect whichever way the packet was
    /// routed to it.
    ports_written: HashSet<u32>,
}

/// What one refresh wants in the maps: every (bridge, address) → port, and of the ports,
/// those that are veths with their peer in another namespace.
#[derive(Default)]
pub struct Wanted {
    /// (bridge, address) → port.
    pub fdb: HashMap<BridgeFdbKey, u32>,
    /// Ports that take a peer redirect (`VETH_PEERS`).
    pub peers: HashSet<u32>,
}

impl BridgeMaps {
    /// Takes the three maps out of `ebpf` (new ones: none of them is pinned).
    ///
    /// Returns `Err(MapsError::Missing)` when the object lacks one, `Err(MapsError::Io)`
    /// when `BRIDGES` cannot be read.
    pub fn take(ebpf: &mut Ebpf) -> Result<BridgeMaps, MapsError> {
        Ok(BridgeMaps {
            fdb: take(ebpf, contract::BRIDGE_FDB)?,
            ports: take(ebpf, contract::BRIDGE_PORTS)?,
            bridges: BitMap::take(ebpf, contract::BRIDGES, contract::BRIDGES_LEN)?,
            fdb_written: HashMap::new(),
            ports_written: HashSet::new(),
        })
    }

    /// Makes the maps hold exactly `wanted.fdb` and its ports, and adds the ports of
    /// `wanted.peers` to `veth_peers` (`VETH_PEERS`). Ports go in before the entries naming
    /// them and leave after, so the program never follows an entry to a port that was not
    /// allowed; a bridge's bit in `BRIDGES` is set after its entries go in and cleared after
    /// they leave. Returns how many entries and ports the maps had no room for (their packets
    /// go through the bridge, or through the veth's transmit).
    ///
    /// Returns `Err(MapsError::Io)` when a removal or a `BRIDGES` write fails (an update of
    /// the other maps that fails is counted).
    pub fn write(
        &mut self,
        wanted: &Wanted,
        veth_peers: &mut DevMapHash<MapData>,
    ) -> Result<usize, MapsError> {
        let mut left_out = 0;
        let ports: HashSet<u32> = wanted.fdb.values().copied().collect();
        let mut allowed = HashSet::new();
        // Ports are written every time (an update of an entry that is there changes
        // nothing): an index the kernel pruned can come back (a device moved into the
        // namespace keeps its index), and must be allowed again.
        for &port in &ports {
            if self.ports.insert(port, port, None, 0).is_ok() {
                allowed.insert(port);
            } else {
                left_out += 1;
            }
        }
        for &port in &wanted.peers {
            if veth_peers.insert(port, port, None, 0).is_err() {
                left_out += 1;
            }
        }
        // Stale entries leave before new ones go in, so a full map makes room first.
        let stale: Vec<BridgeFdbKey> = self
            .fdb_written
            .iter()
            .filter(|(key, port)| wanted.fdb.get(key) != Some(port) || !allowed.contains(port))
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            removed(self.fdb.remove(&key)).map_err(io(contract::BRIDGE_FDB))?;
            self.fdb_written.remove(&key);
        }
        for (key, &port) in &wanted.fdb {
            if !allowed.contains(&port) || self.fdb_written.get(key) == Some(&port) {
                continue;
            }
            if self.fdb.insert(key, port, 0).is_ok() {
                self.fdb_written.insert(*key, port);
            } else {
                left_out += 1;
            }
        }
        let gone: Vec<u32> = self.ports_written.difference(&allowed).copied().collect();
        for port in gone {
            removed(self.ports.remove(port)).map_err(io(contract::BRIDGE_PORTS))?;
        }
        self.ports_written = allowed;
        self.bridges
            .write(self.fdb_written.keys().map(|key| bridge_bit(key.bridge)))?;
        Ok(left_out)
    }
}

/// The sync thread's watch of the bridges: when they were last read, and what was last
/// logged of each, so that a bridge's state is logged when it changes, not every second.
#[derive(Default)]
pub struct BridgeWatch {
    last: Option<Instant>,
    /// The bridges of the last refresh, by name: `Ok(addresses)` or why not.
    said: BTreeMap<String, Result<usize, String>>,
    /// Whether each port seen takes a peer redirect (asked once per port, not every refresh).
    peer_of: HashMap<u32, bool>,
}

impl BridgeWatch {
    /// Whether `bridges` (name → ifindex, those `lb_tc` is attached to) are due to be read:
    /// every [`REFRESH`], and at once when the set changed.
    pub fn due(&self, bridges: &BTreeMap<String, u32>, now: Instant) -> bool {
        if bridges.is_empty() && self.said.is_empty() {
            return false;
        }
        let changed = !bridges.keys().eq(self.said.keys());
        changed || self.last.is_none_or(|t| now.duration_since(t) >= REFRESH)
    }

    /// Reads each of `bridges` (name → ifindex) from the kernel and says what the maps should
    /// hold. Logs a bridge whose state changed: how many addresses go straight to their port,
    /// or why none does.
    pub fn read(&mut self, bridges: &BTreeMap<String, u32>, now: Instant) -> Wanted {
        self.last = Some(now);
        let mut wanted = Wanted::default();
        let mut said = BTreeMap::new();
        for (name, &ifindex) in bridges {
            let state = match bridge_fdb::forwarding_entries(ifindex) {
                Ok(entries) => {
                    for (mac, port) in &entries {
                        let key = BridgeFdbKey {
                            bridge: ifindex,
                            mac: *mac,
                            _pad: [0; 2],
                        };
                        wanted.fdb.insert(key, *port);
                    }
                    Ok(entries.len())
                }
                Err(e) => Err(e.to_string()),
            };
            self.log_change(name, &state);
            said.insert(name.clone(), state);
        }
        self.said = said;
        let ports: HashSet<u32> = wanted.fdb.values().copied().collect();
        self.peer_of.retain(|port, _| ports.contains(port));
        for port in ports {
            let peer = match self.peer_of.get(&port) {
                Some(&known) => known,
                // An error is not remembered: the port is asked again at the next copy.
                None => match peer::peer_elsewhere(port) {
                    Ok(known) => *self.peer_of.entry(port).or_insert(known),
                    Err(e) => {
                        warn!(
                            "eBPF: cannot tell whether bridge port {port} is a veth with a \
                             peer elsewhere ({e}); its packets take its transmit"
                        );
                        false
                    }
                },
            };
            if peer {
                wanted.peers.insert(port);
            }
        }
        wanted
    }

    fn log_change(&self, name: &str, state: &Result<usize, String>) {
        let before = self.said.get(name);
        match state {
            Ok(n) if before.is_none_or(|b| b.is_err()) => info!(
                "eBPF: {name} is a bridge: lb_tc sends what is routed into it straight to the \
                 port of its next hop ({n} addresses known now, read every {}s)",
                REFRESH.as_secs()
            ),
            Err(why) if before.is_none_or(|b| b.as_ref().err() != Some(why)) => {
                warn!("eBPF: packets into bridge {name} go through the bridge: {why}");
            }
            _ => {}
        }
    }
}
