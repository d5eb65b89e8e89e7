//! Adopting a pinned set (see `pins.rs`): what the maps a daemon found pinned say about the
//! services and backends of the daemon before it, so that the config's services continue
//! under the same service and backend ids (conntrack pins flows to backend ids) and the rest
//! drains as a reload would drain it.
//!
//! The maps are the truth: `VIPS` names each service's id, `SERVICES` its live table half,
//! the ids in that half are its backends (addresses from `BACKENDS`). A backend id in
//! `BACKENDS` that no table names (a backend down or draining when the daemon stopped) is an
//! orphan: the first adopted service whose config has its address takes it back; the others
//! drain.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use lb_common::maps::{self as contract, VipKey, MAX_BACKENDS, MAX_SERVICES};

use super::ids::IdPool;
use super::{Maps, MapsError};
use crate::config::Forwarding;

/// A service of the adopted set.
#[derive(Debug, Clone)]
pub struct AdoptedService {
    /// Its service id.
    pub id: u32,
    /// Its `SERVICES` entry.
    pub entry: contract::Service,
    /// Its backends (the ids its live table half names), by address.
    pub backends: BTreeMap<SocketAddr, u32>,
}

/// What an adopted pinned set holds that no service of the config has claimed yet.
#[derive(Debug, Default)]
pub struct Adopted {
    services: HashMap<VipKey, AdoptedService>,
    /// Backend ids no table names, with their addresses.
    orphans: BTreeMap<u32, SocketAddr>,
    service_ids: BTreeSet<u32>,
    backend_ids: BTreeSet<u32>,
}

impl Adopted {
    /// Reads the adopted set's services and backends from `maps`.
    ///
    /// Returns `Err(MapsError::Io)` when a map cannot be read.
    pub fn read(maps: &Maps) -> Result<Adopted, MapsError> {
        let mut adopted = Adopted::default();
        let backends: BTreeMap<u32, SocketAddr> = maps
            .backend_entries()?
            .into_iter()
            .filter_map(|(id, b)| b.address().map(|a| (id, a)))
            .collect();
        adopted.backend_ids = backends.keys().copied().collect();
        let mut named = BTreeSet::new();
        for (key, id) in maps.vip_entries()? {
            if id >= MAX_SERVICES {
                continue;
            }
            let entry = maps.service_entry(id)?;
            let half = entry.active_half & 1;
            let size = entry.table_size[half as usize];
            let mut service = AdoptedService {
                id,
                entry,
                backends: BTreeMap::new(),
            };
            for b in maps.table_ids(id, half, size)? {
                if let Some(&address) = backends.get(&b) {
                    service.backends.insert(address, b);
                    named.insert(b);
                }
            }
            adopted.service_ids.insert(id);
            adopted.services.insert(key, service);
        }
        adopted.orphans = backends
            .into_iter()
            .filter(|(id, _)| !named.contains(id) && *id < MAX_BACKENDS)
            .collect();
        Ok(adopted)
    }

    /// The pools of free ids around the adopted ones: (services, backends).
    pub fn pools(&self) -> (IdPool, IdPool) {
        (
            IdPool::without(MAX_SERVICES, &self.service_ids),
            IdPool::without(MAX_BACKENDS, &self.backend_ids),
        )
    }

    /// How many services and backend ids the set holds: for the log.
    pub fn counts(&self) -> (usize, usize) {
        (self.service_ids.len(), self.backend_ids.len())
    }

    /// Takes the adopted service at `key` for a config service with `forwarding` and
    /// backends `addresses`: the service and its backend ids by address, the orphans with
    /// one of `addresses` included. `None` when the set has no service there, or one that
    /// forwards otherwise (it drains, and the config's service starts anew).
    pub fn claim(
        &mut self,
        key: &VipKey,
        forwarding: Forwarding,
        addresses: &[SocketAddr],
    ) -> Option<AdoptedService> {
        let mode = match forwarding {
            Forwarding::Nat => contract::MODE_NAT,
            Forwarding::Dsr => contract::MODE_DSR,
        };
        if self.services.get(key)?.entry.mode != mode {
            return None;
        }
        let mut service = self.services.remove(key)?;
        for a in addresses {
            if service.backends.contains_key(a) {
                continue;
            }
            let orphan = self
                .orphans
                .iter()
                .find(|(_, o)| *o == a)
                .map(|(&id, _)| id);
            if let Some(id) = orphan {
                self.orphans.remove(&id);
                service.backends.insert(*a, id);
            }
        }
        Some(service)
    }

    /// What no config service claimed: the services (VIP key and service) and the backend
    /// ids of theirs and the orphans, to drain.
    pub fn unclaimed(self) -> (Vec<(VipKey, AdoptedService)>, Vec<u32>) {
        let mut ids: Vec<u32> = self.orphans.into_keys().collect();
        let mut services = Vec::new();
        for (key, service) in self.services {
            ids.extend(service.backends.values().copied());
            services.push((key, service));
        }
        ids.sort_unstable();
        ids.dedup();
        (services, ids)
    }
}
