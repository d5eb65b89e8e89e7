//! Adopting a pinned set (see `pins.rs`): what the maps a daemon found pinned say about the
//! services and backends of the daemon before it, so that the config's services continue
//! under the same service and backend ids (conntrack pins flows to backend ids) and the rest
//! drains as a reload would drain it.
//!
//! The maps are the truth: `VIPS` names each service's id, `SERVICES` its live table half,
//! the ids in that half are its backends (addresses from `BACKENDS`). A backend id in
//! `BACKENDS` that no table names (a backend down or draining when the daemon stopped) is an
//! orphan: the first adopted service whose config has its address takes it back; the others
//! drain. A service id with a `SERVICES` entry that no `VIPS` key names is a service that was
//! draining when the daemon stopped, its VIP passed to the service placed after it (or to no
//! one): its id stays reserved and drains, so the `CLIENTS` entries it left are deleted
//! before another service is given the id.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use lb_common::maps::{self as contract, VipKey, MAX_BACKENDS, MAX_SERVICES};

use super::ids::IdPool;
use super::{Maps, MapsError, XdpPlaneError};
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
    /// The orphan ids [`Adopted::claim`] added to `backends`: they are orphans again if the
    /// claim is given back ([`Adopted::give_back`]).
    orphans_taken: Vec<u32>,
}

/// What an adopted pinned set holds that no service of the config has claimed yet.
#[derive(Debug, Default)]
pub struct Adopted {
    services: HashMap<VipKey, AdoptedService>,
    /// Backend ids no table names, with their addresses.
    orphans: BTreeMap<u32, SocketAddr>,
    /// Service ids with a `SERVICES` entry but no VIP: services that were draining.
    without_vip: BTreeSet<u32>,
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
                orphans_taken: Vec::new(),
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
        let mut entries = Vec::new();
        for id in (0..MAX_SERVICES).filter(|id| !adopted.service_ids.contains(id)) {
            entries.push((id, maps.service_entry(id)?));
        }
        adopted.reserve_without_vip(&entries);
        Ok(adopted)
    }

    /// Reserves the ids of `entries` (id and `SERVICES` entry, of the ids no `VIPS` key
    /// names) that describe a service: ones that were draining when the daemon stopped, their
    /// VIP passed on. An entry a release cleared (or never written) has no family.
    fn reserve_without_vip(&mut self, entries: &[(u32, contract::Service)]) {
        self.without_vip = (entries.iter())
            .filter(|(_, e)| e.family != 0)
            .map(|&(id, _)| id)
            .collect();
        self.service_ids.extend(&self.without_vip);
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

    /// Whether a config service at `key` with `forwarding` would continue a service of the
    /// set ([`Adopted::claim`] would take one): it needs no new service id.
    pub fn continues(&self, key: &VipKey, forwarding: Forwarding) -> bool {
        let mode = match forwarding {
            Forwarding::Nat => contract::MODE_NAT,
            Forwarding::Dsr => contract::MODE_DSR,
        };
        self.services.get(key).is_some_and(|s| s.entry.mode == mode)
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
        if !self.continues(key, forwarding) {
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
                service.orphans_taken.push(id);
            }
        }
        Some(service)
    }

    /// Puts back `service`, which [`Adopted::claim`] took at `key` for a service that could
    /// not be placed after all: it is the set's again (and drains at
    /// [`XdpPlane::settle_adoption`](super::XdpPlane::settle_adoption) unless another
    /// service claims it), and so are the orphans the claim took.
    pub fn give_back(&mut self, key: VipKey, mut service: AdoptedService) {
        for id in std::mem::take(&mut service.orphans_taken) {
            let address = service
                .backends
                .iter()
                .find(|(_, &b)| b == id)
                .map(|(&a, _)| a);
            if let Some(address) = address {
                service.backends.remove(&address);
                self.orphans.insert(id, address);
            }
        }
        self.services.insert(key, service);
    }

    /// What no config service claimed, to drain.
    pub fn unclaimed(self) -> Unclaimed {
        let mut backend_ids: Vec<u32> = self.orphans.into_keys().collect();
        let mut services = Vec::new();
        for (key, service) in self.services {
            backend_ids.extend(service.backends.values().copied());
            services.push((key, service));
        }
        backend_ids.sort_unstable();
        backend_ids.dedup();
        Unclaimed {
            services,
            backend_ids,
            without_vip: self.without_vip.into_iter().collect(),
        }
    }
}

/// What an adopted set holds that no config service claimed ([`Adopted::unclaimed`]).
#[derive(Debug)]
pub struct Unclaimed {
    /// The services at a VIP: VIP key and service.
    pub services: Vec<(VipKey, AdoptedService)>,
    /// The backend ids of those services and the orphans.
    pub backend_ids: Vec<u32>,
    /// The ids of services that were draining, their VIP passed on: only their `SERVICES`,
    /// `LIMITS` and `CLIENTS` entries are left to release.
    pub without_vip: Vec<u32>,
}

/// Takes what `adopted` holds for a config service at `key` with `forwarding` and backends
/// `addresses` (distinct; see [`Adopted::claim`]) if the service can be placed with the ids
/// free in the pools: a new service id unless it continues an adopted service
/// (`free_services`), a backend id for each address of `required` (its configured backends,
/// among `addresses`) the claim does not bring (`free_backends`). The others (a DNS name's
/// answers) are left out of the table for want of ids, as a later answer's would be. A
/// refusal leaves `adopted` as it was, so that what the service would have continued drains
/// as any service of the set no config service continued.
///
/// Returns `Err(XdpPlaneError::ServiceIdsFull)` or `Err(XdpPlaneError::BackendIdsFull)`.
pub fn claim_if_placeable(
    adopted: Option<&mut Adopted>,
    key: &VipKey,
    forwarding: Forwarding,
    (addresses, required): (&[SocketAddr], &[SocketAddr]),
    free_services: usize,
    free_backends: usize,
) -> Result<Option<AdoptedService>, XdpPlaneError> {
    let Some(adopted) = adopted else {
        return check_ids(None, required, free_services, free_backends).map(|()| None);
    };
    let claimed = adopted.claim(key, forwarding, addresses);
    match check_ids(claimed.as_ref(), required, free_services, free_backends) {
        Ok(()) => Ok(claimed),
        Err(e) => {
            if let Some(service) = claimed {
                adopted.give_back(*key, service);
            }
            Err(e)
        }
    }
}

/// Whether a service with backends `addresses` that continues `claimed` (if any) finds the
/// ids it needs besides among `free_services` and `free_backends`.
fn check_ids(
    claimed: Option<&AdoptedService>,
    addresses: &[SocketAddr],
    free_services: usize,
    free_backends: usize,
) -> Result<(), XdpPlaneError> {
    if claimed.is_none() && free_services == 0 {
        return Err(XdpPlaneError::ServiceIdsFull);
    }
    let needed = (addresses.iter())
        .filter(|a| !claimed.is_some_and(|c| c.backends.contains_key(a)))
        .count();
    if needed > free_backends {
        return Err(XdpPlaneError::BackendIdsFull {
            needed,
            free: free_backends,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(s: &str) -> SocketAddr {
        s.parse().expect("literal")
    }

    fn vip(port: u16) -> VipKey {
        VipKey::new(
            SocketAddr::from(([10, 200, 100, 1], port)),
            lb_common::flow::IPPROTO_TCP,
        )
    }

    /// A set whose `nat` service `id` at `vip(80)` names backend 10.200.1.2:80 (id 10), with
    /// 10.200.2.2:80 (id 11) an orphan; `others` more services at other ports hold the
    /// service ids after it.
    fn set_with(id: u32, others: u32) -> Adopted {
        let mut adopted = Adopted::default();
        let entry = contract::Service {
            mode: contract::MODE_NAT,
            ..Default::default()
        };
        for (i, port) in (0..=others).zip(80u16..) {
            let backends = match i {
                0 => BTreeMap::from([(address("10.200.1.2:80"), 10)]),
                _ => BTreeMap::new(),
            };
            let service = AdoptedService {
                id: id + i,
                entry,
                backends,
                orphans_taken: Vec::new(),
            };
            adopted.service_ids.insert(service.id);
            adopted.services.insert(vip(port), service);
        }
        adopted.orphans.insert(11, address("10.200.2.2:80"));
        adopted.backend_ids = BTreeSet::from([10, 11]);
        adopted
    }

    /// The service ids and backend ids the set would drain at settle.
    fn left_to_drain(adopted: Adopted) -> (Vec<u32>, Vec<u32>) {
        let unclaimed = adopted.unclaimed();
        let mut services: Vec<u32> = (unclaimed.services.iter())
            .map(|(_, s)| s.id)
            .chain(unclaimed.without_vip)
            .collect();
        services.sort_unstable();
        (services, unclaimed.backend_ids)
    }

    /// A service draining when the daemon stopped, its VIP given to the one that replaced
    /// it, keeps its id until it drains: its clients' counts must not pass to the next
    /// service given the id.
    #[test]
    fn a_draining_service_whose_vip_passed_on_keeps_its_id_until_it_drains() {
        let mut adopted = set_with(3, 0);
        let draining = contract::Service {
            mode: contract::MODE_NAT,
            family: contract::FAMILY_V4,
            ..Default::default()
        };
        let entries: Vec<(u32, contract::Service)> = (0..MAX_SERVICES)
            .filter(|&id| id != 3)
            .map(|id| match id {
                1 => (id, draining),
                _ => (id, contract::Service::default()),
            })
            .collect();
        adopted.reserve_without_vip(&entries);
        let (mut services, _) = adopted.pools();
        let handed: Vec<u32> = std::iter::from_fn(|| services.take()).collect();
        assert!(
            !handed.contains(&1),
            "service id 1, still draining, was free for a new service"
        );
        assert_eq!(handed.len(), MAX_SERVICES as usize - 2);
        assert_eq!(left_to_drain(adopted), (vec![1, 3], vec![10, 11]));
    }

    #[test]
    fn a_service_refused_for_backend_ids_leaves_the_adopted_one_to_drain() {
        let mut adopted = set_with(3, 0);
        let addresses = [
            address("10.200.1.2:80"),
            address("10.200.2.2:80"),
            address("10.200.3.2:80"),
        ];
        let refused = claim_if_placeable(
            Some(&mut adopted),
            &vip(80),
            Forwarding::Nat,
            (&addresses, &addresses),
            5,
            0,
        );
        assert!(
            matches!(
                refused,
                Err(XdpPlaneError::BackendIdsFull { needed: 1, free: 0 })
            ),
            "one new backend and no free id: {refused:?}"
        );
        assert_eq!(
            left_to_drain(adopted),
            (vec![3], vec![10, 11]),
            "a refused service took the adopted service and its ids with it: they would \
             never drain"
        );
    }

    #[test]
    fn a_claim_given_back_after_a_failed_write_drains_with_its_orphans() {
        let mut adopted = set_with(3, 0);
        let addresses = [address("10.200.1.2:80"), address("10.200.2.2:80")];
        let claimed = claim_if_placeable(
            Some(&mut adopted),
            &vip(80),
            Forwarding::Nat,
            (&addresses, &addresses),
            5,
            0,
        )
        .expect("every backend has an adopted id")
        .expect("the service at the VIP is claimed");
        assert_eq!(
            claimed.backends.values().copied().collect::<Vec<_>>(),
            vec![10, 11],
            "the orphan at one of its addresses comes with it"
        );
        assert_eq!(left_to_drain(adopted), (vec![], vec![]));

        let mut adopted = set_with(3, 0);
        let claimed = adopted
            .claim(&vip(80), Forwarding::Nat, &addresses)
            .expect("claimed");
        adopted.give_back(vip(80), claimed);
        assert_eq!(left_to_drain(adopted), (vec![3], vec![10, 11]));
    }

    #[test]
    fn with_every_service_id_adopted_only_a_service_needing_a_new_one_is_refused() {
        let mut adopted = set_with(0, MAX_SERVICES - 1);
        let (services, _) = adopted.pools();
        assert_eq!(services.available(), 0, "the set holds every service id");
        let addresses = [address("10.200.1.2:80")];
        assert!(adopted.continues(&vip(80), Forwarding::Nat));
        assert!(!adopted.continues(&vip(80), Forwarding::Dsr));
        let continued = claim_if_placeable(
            Some(&mut adopted),
            &vip(80),
            Forwarding::Nat,
            (&addresses, &addresses),
            0,
            0,
        );
        assert!(
            matches!(&continued, Ok(Some(s)) if s.id == 0),
            "the service continuing adopted id 0 was refused: {continued:?}"
        );
        let other = VipKey::new(
            SocketAddr::from(([10, 200, 100, 2], 80)),
            lb_common::flow::IPPROTO_TCP,
        );
        let new = claim_if_placeable(
            Some(&mut adopted),
            &other,
            Forwarding::Nat,
            (&[], &[]),
            0,
            9,
        );
        assert!(
            matches!(new, Err(XdpPlaneError::ServiceIdsFull)),
            "a service at a VIP the set lacks needs a new id: {new:?}"
        );
    }

    #[test]
    fn only_the_configured_backends_must_find_free_ids() {
        let addresses = [
            address("10.200.1.2:80"),
            address("10.200.2.2:80"),
            address("10.200.3.2:80"),
        ];
        let placed = claim_if_placeable(
            None,
            &vip(80),
            Forwarding::Nat,
            (&addresses, &addresses[..1]),
            5,
            1,
        );
        assert!(
            matches!(placed, Ok(None)),
            "two DNS answers without ids refused the service: {placed:?}"
        );
    }
}
