//! Walking the program's big hash maps (`CONNTRACK`, `CLIENTS`) from the daemon, outside the
//! plane's `State` lock, and in a bounded number of keys.
//!
//! A walk is one `bpf_map_get_next_key` and one lookup per entry, some 260,000 syscalls for
//! both maps full. Done under the `State` lock it would stall every other user of the plane
//! (a reload adding a service, `/status` reading counters) for as long. The two maps are
//! therefore not in `State` at all: the sync thread owns them ([`MapWalk`]) and walks them
//! between two holds of the lock. Nothing else in the daemon reads or writes them; the
//! program's own writes race with a walk the same way whether the daemon holds a lock or
//! not. (The alternative, walking in chunks under the lock, means more lock traffic and a
//! walk that must resume from a key that may be gone by then.)
//!
//! `bpf_map_get_next_key` on a key that was deleted meanwhile (an LRU eviction under churn,
//! a flow's entry replaced) restarts from the first key, so a walk of a busy map may never
//! end: [`keys`] stops after a number of keys, twice the map's capacity by default, and logs
//! when it does.

use aya::maps::{HashMap, MapData};
use aya::Ebpf;
use lb_common::maps::{self as contract, ClientKey, ClientState, CtEntry, NatReverse};
use lb_common::FlowKey;
use tracing::warn;

use super::bpf_map::{io, removed, take, MapsError};

/// `CONNTRACK`, `CLIENTS` and `NAT_REVERSE`, owned by the sync thread and walked without the
/// `State` lock.
///
/// Only the sync thread touches them from the daemon: it removes released ids from them and
/// sweeps leaked connection counts, one after the other, so those never race each other.
pub struct MapWalk {
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    clients: HashMap<MapData, ClientKey, ClientState>,
    nat_reverse: HashMap<MapData, FlowKey, NatReverse>,
}

impl MapWalk {
    /// Takes `CONNTRACK`, `CLIENTS` and `NAT_REVERSE` out of `ebpf`.
    ///
    /// Returns `Err(MapsError::Missing)` when one is absent or has another layout.
    pub fn take(ebpf: &mut Ebpf) -> Result<MapWalk, MapsError> {
        Ok(MapWalk {
            conntrack: take(ebpf, contract::CONNTRACK)?,
            clients: take(ebpf, contract::CLIENTS)?,
            nat_reverse: take(ebpf, contract::NAT_REVERSE)?,
        })
    }

    /// The entries of `NAT_REVERSE` (one per SNAT port ever taken and not evicted), walked
    /// with the bound [`bound`]`(NAT_REVERSE_SIZE)`, one at a time (see [`Entries`]).
    pub fn nat_entries(&self) -> Entries<'_, FlowKey, NatReverse> {
        Entries::new(
            &self.nat_reverse,
            contract::NAT_REVERSE,
            bound(contract::NAT_REVERSE_SIZE),
        )
    }

    /// The entries of `CONNTRACK`, walked with the bound [`bound`]`(CONNTRACK_SIZE)`, one at a
    /// time (see [`Entries`]).
    pub fn conntrack_entries(&self) -> Entries<'_, FlowKey, CtEntry> {
        Entries::new(
            &self.conntrack,
            contract::CONNTRACK,
            bound(contract::CONNTRACK_SIZE),
        )
    }

    /// The keys of `CLIENTS`, walked with the bound [`bound`]`(CLIENTS_SIZE)`, and whether
    /// the walk reached the end (see [`keys`]).
    pub fn client_keys(&self) -> (Vec<ClientKey>, bool) {
        keys(
            &self.clients,
            contract::CLIENTS,
            bound(contract::CLIENTS_SIZE),
        )
    }

    /// Client `key`'s state; `None` when it has no entry (any more).
    pub fn client(&self, key: &ClientKey) -> Option<ClientState> {
        self.clients.get(key, 0).ok()
    }

    /// Lowers client `key`'s connection count by `by` (not below 0), reading it just before
    /// the write to keep the window for a lost update short (see `limits.rs`). The update
    /// only replaces an existing entry: one deleted meanwhile is not brought back. `Ok(false)`
    /// when there was no entry.
    ///
    /// Returns `Err` when the update fails for another reason.
    pub fn lower_client(&mut self, key: &ClientKey, by: u64) -> Result<bool, aya::maps::MapError> {
        let Ok(mut state) = self.clients.get(key, 0) else {
            return Ok(false);
        };
        state.connections = state.connections.saturating_sub(by);
        match self.clients.insert(key, state, BPF_EXIST) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes the `CONNTRACK` entries pinned to any of backend `ids`, whose `BACKENDS`
    /// entries the caller cleared first (a packet placed meanwhile is placed by a table
    /// that names none of them, so no new entry for them appears during the walk). Returns
    /// how many it deleted.
    ///
    /// Returns `Err(MapsError::Io)` when a delete fails (other than on an entry already
    /// gone), `Err(MapsError::WalkIncomplete)` when the walk stopped at its bound: either
    /// way some entries may still name the ids, which must not be reused yet.
    pub fn forget_flows_of(&mut self, ids: &[u32]) -> Result<usize, MapsError> {
        if ids.is_empty() {
            return Ok(0);
        }
        // The keys first, the deletes after: a delete during the walk would restart it.
        let mut entries = self.conntrack_entries();
        let stale: Vec<FlowKey> = entries
            .by_ref()
            .filter(|(_, entry)| ids.contains(&entry.backend))
            .map(|(key, _)| key)
            .collect();
        let complete = entries.complete();
        let mut forgot = 0;
        for key in &stale {
            if removed(self.conntrack.remove(key)).map_err(io(contract::CONNTRACK))? {
                forgot += 1;
            }
        }
        if !complete {
            return Err(MapsError::WalkIncomplete {
                map: contract::CONNTRACK,
            });
        }
        Ok(forgot)
    }

    /// Deletes the `CLIENTS` entries of service `ids` (released services: a later service
    /// given one of the ids starts with no client counted). Returns how many it deleted.
    ///
    /// Returns `Err(MapsError::Io)` when a delete fails (other than on an entry already
    /// gone).
    pub fn forget_clients_of(&mut self, ids: &[u32]) -> Result<usize, MapsError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut forgot = 0;
        let (keys, complete) = self.client_keys();
        for key in keys {
            if !ids.contains(&key.service) {
                continue;
            }
            if removed(self.clients.remove(&key)).map_err(io(contract::CLIENTS))? {
                forgot += 1;
            }
        }
        if !complete {
            return Err(MapsError::WalkIncomplete {
                map: contract::CLIENTS,
            });
        }
        Ok(forgot)
    }
}

/// `BPF_EXIST`: update an existing element only.
const BPF_EXIST: u64 = 2;

/// The keys of `map` (named `name` in the log), at most `bound` of them, and whether the walk
/// reached the end: a walk restarted by deletions (see the module doc) stops at the bound, and
/// one the kernel ends with an error stops there, both logged as a warning; the keys already
/// seen are returned either way, with `false`. A key may appear twice after a restart;
/// callers must not mind.
pub fn keys<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &str,
    bound: usize,
) -> (Vec<K>, bool) {
    let mut walk = Keys::new(map, name, bound);
    let keys = walk.by_ref().collect();
    (keys, walk.complete())
}

/// The keys of a map, at most a bound of them, yielded as the kernel gives them (the rules of
/// [`keys`]); [`Keys::complete`] tells, once the iterator is spent, whether the walk reached
/// the end.
pub struct Keys<'a, K: aya::Pod> {
    keys: aya::maps::MapKeys<'a, K>,
    name: &'a str,
    bound: usize,
    walked: usize,
    complete: bool,
    done: bool,
}

impl<'a, K: aya::Pod> Keys<'a, K> {
    /// A walk of `map` (named `name` in the log) of at most `bound` keys.
    pub fn new<V: aya::Pod>(map: &'a HashMap<MapData, K, V>, name: &'a str, bound: usize) -> Self {
        Keys {
            keys: map.keys(),
            name,
            bound,
            walked: 0,
            complete: true,
            done: false,
        }
    }

    /// Whether the walk reached the end of the map: `false` when it stopped at its bound or
    /// on an error (both logged), or has not ended yet.
    pub fn complete(&self) -> bool {
        self.done && self.complete
    }
}

impl<K: aya::Pod> Iterator for Keys<'_, K> {
    type Item = K;

    fn next(&mut self) -> Option<K> {
        if self.done {
            return None;
        }
        let Some(key) = self.keys.next() else {
            self.done = true;
            return None;
        };
        self.walked += 1;
        if self.walked > self.bound {
            let (name, bound) = (self.name, self.bound);
            warn!(
                "XDP: the walk of {name} stopped after {bound} keys: entries deleted during it \
                 made it start over; the entries not reached wait for the next walk"
            );
            self.complete = false;
            self.done = true;
            return None;
        }
        match key {
            Ok(k) => Some(k),
            // The kernel's iterator ends after an error.
            Err(e) => {
                warn!("XDP: the walk of {} ended early: {e}", self.name);
                self.complete = false;
                self.done = true;
                None
            }
        }
    }
}

/// The entries of a map, walked as [`Keys`] does and looked up one by one (an entry deleted
/// between the two is skipped), yielded as they are read: a walk of a full `NAT_REVERSE` or
/// `CONNTRACK` holds one entry at a time, not the 10 MiB a collected walk took (it made the
/// daemon's footprint step up as the maps filled, and stay there: the soak run's memory
/// drift). [`Entries::complete`] tells, once the iterator is spent, whether the walk reached
/// the end.
///
/// Deleting from the map while iterating makes the walk start over (see the module doc):
/// collect the keys to delete and delete after.
pub struct Entries<'a, K: aya::Pod, V: aya::Pod> {
    map: &'a HashMap<MapData, K, V>,
    keys: Keys<'a, K>,
}

impl<'a, K: aya::Pod, V: aya::Pod> Entries<'a, K, V> {
    /// A walk of `map` (named `name` in the log) of at most `bound` keys.
    pub fn new(map: &'a HashMap<MapData, K, V>, name: &'a str, bound: usize) -> Self {
        Entries {
            map,
            keys: Keys::new(map, name, bound),
        }
    }

    /// Whether the walk reached the end of the map (see [`Keys::complete`]).
    pub fn complete(&self) -> bool {
        self.keys.complete()
    }
}

impl<K: aya::Pod, V: aya::Pod> Iterator for Entries<'_, K, V> {
    type Item = (K, V);

    fn next(&mut self) -> Option<(K, V)> {
        for key in self.keys.by_ref() {
            if let Ok(v) = self.map.get(&key, 0) {
                return Some((key, v));
            }
        }
        None
    }
}

/// The default bound of a walk of a map of `capacity` entries: twice the capacity, enough
/// for a full map walked once and most of it again after a restart.
pub const fn bound(capacity: u32) -> usize {
    2 * capacity as usize
}
