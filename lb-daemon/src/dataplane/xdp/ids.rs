//! Ids in the XDP maps: the pool of free service or backend ids, and each service's backend
//! address → id assignment with the ids of backends that left and still drain.
//!
//! A backend id names an address in `BACKENDS`, and conntrack pins flows to ids, so an id
//! must not name another address while flows may still be pinned to it. The lifecycle:
//! an address gets an id when it first appears in a service's snapshot; when it leaves the
//! snapshot (a reload removed it, DNS stopped returning it) it leaves the table at once but
//! keeps its id, and its `BACKENDS` entry stays, until `drain_timeout` has passed (its pinned
//! flows finish there); then the id is released: the daemon marks the entry unused, forgets
//! the conntrack entries still naming it, and returns it to the pool, which hands out ids
//! never used before first and then the least recently freed. An address that comes back
//! before its release gets its old id again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

/// Free ids of one kind (services or backends), `0..capacity`.
#[derive(Debug, Clone)]
pub struct IdPool {
    capacity: u32,
    /// Ids below this were handed out at least once.
    next: u32,
    /// Released ids, least recently freed first.
    free: VecDeque<u32>,
}

impl IdPool {
    /// A pool of the ids `0..capacity`, all free.
    pub fn new(capacity: u32) -> IdPool {
        IdPool {
            capacity,
            next: 0,
            free: VecDeque::new(),
        }
    }

    /// A pool of the ids `0..capacity` but `taken` (the ids of a pinned set the daemon
    /// adopts: they are in use until their owners release them). The free ids below the
    /// highest taken one are handed out before the ones never used.
    pub fn without(capacity: u32, taken: &BTreeSet<u32>) -> IdPool {
        let next = taken
            .iter()
            .next_back()
            .map_or(0, |&max| max.saturating_add(1).min(capacity));
        IdPool {
            capacity,
            next,
            free: (0..next).filter(|id| !taken.contains(id)).collect(),
        }
    }

    /// How many ids [`IdPool::take`] can still hand out.
    pub fn available(&self) -> usize {
        (self.capacity - self.next) as usize + self.free.len()
    }

    /// An id: one never used if any is left (the longest possible wait before an id is
    /// reused), else the least recently freed. `None` when every id is in use.
    pub fn take(&mut self) -> Option<u32> {
        if self.next < self.capacity {
            self.next += 1;
            return Some(self.next - 1);
        }
        self.free.pop_front()
    }

    /// Returns `id` (one [`IdPool::take`] gave) to the pool.
    pub fn give_back(&mut self, id: u32) {
        debug_assert!(
            id < self.next && !self.free.contains(&id),
            "id {id} given back twice"
        );
        self.free.push_back(id);
    }
}

/// What [`BackendIds::assign`] gave a snapshot's backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assigned {
    /// Per address, in order: its id, or `None` when the pool had none left for it.
    pub ids: Vec<Option<u32>>,
    /// Ids new to this service's addresses (their counters start from zero).
    pub fresh: Vec<u32>,
    /// How many distinct addresses got no id.
    pub missing: usize,
}

/// One service's backend ids: the addresses of its current snapshot, and the ones that left
/// and drain until their deadline.
#[derive(Debug, Clone, Default)]
pub struct BackendIds {
    live: BTreeMap<SocketAddr, u32>,
    leaving: BTreeMap<SocketAddr, (u32, Instant)>,
    /// Ids whose backend was down in the last snapshot that had it: a backend that leaves
    /// while down keeps its DOWN flag (no health check follows it any more).
    down: BTreeSet<u32>,
}

impl BackendIds {
    /// The ids of a service adopted from a pinned set: `live`, address → id, as its table
    /// there names them. The first [`BackendIds::assign`] keeps those the snapshot still has
    /// and starts the others leaving.
    pub fn resume(live: BTreeMap<SocketAddr, u32>) -> BackendIds {
        BackendIds {
            live,
            ..BackendIds::default()
        }
    }

    /// Assigns an id to each of `addresses` (a snapshot's backends, in order) and returns
    /// them in the same order, with the ids given to addresses new to the pool (their
    /// counters start from zero). Live addresses keep their ids; a leaving one gets its id
    /// back; others take one from `pool`, in order, while it has any: the rest get `None`
    /// (the caller leaves them out of the table, as if down) and try again at the next call.
    /// Live addresses missing from `addresses` start leaving, until `deadline`.
    pub fn assign(
        &mut self,
        addresses: &[SocketAddr],
        pool: &mut IdPool,
        deadline: Instant,
    ) -> Assigned {
        let mut out = Assigned::default();
        let mut live = BTreeMap::new();
        let mut without: Vec<SocketAddr> = Vec::new();
        for a in addresses {
            let id = match (live.get(a), self.live.remove(a), self.leaving.remove(a)) {
                (Some(&id), _, _) => Some(id),
                (None, Some(id), _) | (None, None, Some((id, _))) => Some(id),
                (None, None, None) => {
                    let id = pool.take();
                    match id {
                        Some(id) => out.fresh.push(id),
                        None if !without.contains(a) => without.push(*a),
                        None => {}
                    }
                    id
                }
            };
            if let Some(id) = id {
                live.insert(*a, id);
            }
            out.ids.push(id);
        }
        for (a, id) in std::mem::replace(&mut self.live, live) {
            self.leaving.insert(a, (id, deadline));
        }
        out.missing = without.len();
        out
    }

    /// Records whether backend `id` is down in the snapshot being written, in the sense of
    /// `BACKEND_F_DOWN`: its pinned flows are re-placed (one waiting for its first health
    /// check is not).
    pub fn set_down(&mut self, id: u32, down: bool) {
        if down {
            self.down.insert(id);
        } else {
            self.down.remove(&id);
        }
    }

    /// The leaving backends: address, id, and whether it was down when it left, in address
    /// order.
    pub fn leaving_with_state(&self) -> impl Iterator<Item = (SocketAddr, u32, bool)> + '_ {
        self.leaving
            .iter()
            .map(|(&a, &(id, _))| (a, id, self.down.contains(&id)))
    }

    /// Every live address starts leaving, until `deadline` (the service is removed).
    pub fn leave_all(&mut self, deadline: Instant) {
        for (a, id) in std::mem::take(&mut self.live) {
            self.leaving.insert(a, (id, deadline));
        }
    }

    /// Takes out the leaving backends whose deadline is at or before `now`: their ids are
    /// the caller's to release.
    pub fn expired(&mut self, now: Instant) -> Vec<(SocketAddr, u32)> {
        let gone: Vec<(SocketAddr, u32)> = self
            .leaving
            .iter()
            .filter(|(_, &(_, deadline))| deadline <= now)
            .map(|(&a, &(id, _))| (a, id))
            .collect();
        for (a, id) in &gone {
            self.leaving.remove(a);
            self.down.remove(id);
        }
        gone
    }

    /// Takes out every id, live and leaving (the service is gone).
    pub fn take_all(&mut self) -> Vec<u32> {
        self.down.clear();
        let live = std::mem::take(&mut self.live).into_values();
        let leaving = std::mem::take(&mut self.leaving)
            .into_values()
            .map(|(id, _)| id);
        live.chain(leaving).collect()
    }

    /// The id of live backend `address`.
    pub fn live_id(&self, address: &SocketAddr) -> Option<u32> {
        self.live.get(address).copied()
    }

    /// Every id the service holds, live and leaving.
    pub fn all(&self) -> impl Iterator<Item = u32> + '_ {
        self.live
            .values()
            .copied()
            .chain(self.leaving.values().map(|&(id, _)| id))
    }

    /// The leaving backends: address and id, in address order.
    pub fn leaving(&self) -> impl Iterator<Item = (SocketAddr, u32)> + '_ {
        self.leaving.iter().map(|(&a, &(id, _))| (a, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_pool_resumed_around_adopted_ids_hands_out_only_the_others() {
        let taken: BTreeSet<u32> = [1, 3].into();
        let mut pool = IdPool::without(5, &taken);
        assert_eq!(pool.available(), 3);
        let ids: Vec<u32> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(ids, [4, 0, 2]);
        let mut empty = IdPool::without(4, &BTreeSet::new());
        assert_eq!(empty.take(), Some(0));
        let mut full = IdPool::without(2, &[0, 1].into());
        assert_eq!(full.take(), None);
    }

    fn full(got: Assigned) -> (Vec<u32>, Vec<u32>) {
        assert_eq!(got.missing, 0, "an address got no id: {got:?}");
        let ids = got.ids.into_iter().map(|i| i.expect("an id")).collect();
        (ids, got.fresh)
    }

    fn a(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    #[test]
    fn the_pool_hands_out_unused_ids_first_then_the_least_recently_freed() {
        let mut pool = IdPool::new(4);
        let got: Vec<u32> = (0..4).filter_map(|_| pool.take()).collect();
        assert_eq!(got, vec![0, 1, 2, 3]);
        assert_eq!(pool.take(), None, "a pool of 4 gave a fifth id");
        pool.give_back(2);
        pool.give_back(0);
        assert_eq!(pool.available(), 2);
        assert_eq!(
            (pool.take(), pool.take()),
            (Some(2), Some(0)),
            "the id freed first must be reused first"
        );
        let mut pool = IdPool::new(4);
        let first = pool.take().expect("free");
        pool.give_back(first);
        assert_eq!(
            pool.take(),
            Some(1),
            "a freed id was reused while never-used ones were left"
        );
    }

    #[test]
    fn backends_keep_their_ids_and_a_returning_one_gets_its_old_id() {
        let mut pool = IdPool::new(16);
        let mut ids = BackendIds::default();
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let (first, fresh) = full(ids.assign(&[a(1), a(2), a(3)], &mut pool, later));
        assert_eq!(first, vec![0, 1, 2]);
        assert_eq!(fresh, vec![0, 1, 2]);
        // a(2) leaves, a(4) arrives; the order changes.
        let (second, fresh) = full(ids.assign(&[a(3), a(4), a(1)], &mut pool, later));
        assert_eq!(second, vec![2, 3, 0], "staying backends changed ids");
        assert_eq!(fresh, vec![3]);
        assert_eq!(ids.leaving().collect::<Vec<_>>(), vec![(a(2), 1)]);
        assert_eq!(ids.live_id(&a(2)), None, "a removed backend is still live");
        // a(2) comes back before its release.
        let (third, fresh) = full(ids.assign(&[a(1), a(2)], &mut pool, later));
        assert_eq!(
            third,
            vec![0, 1],
            "a backend back before release got a new id"
        );
        assert!(fresh.is_empty());
        let mut leaving: Vec<_> = ids.leaving().collect();
        leaving.sort();
        assert_eq!(leaving, vec![(a(3), 2), (a(4), 3)]);
    }

    #[test]
    fn ids_are_released_only_after_the_deadline_and_then_reused() {
        let mut pool = IdPool::new(2);
        let mut ids = BackendIds::default();
        let now = Instant::now();
        let deadline = now + Duration::from_secs(10);
        full(ids.assign(&[a(1), a(2)], &mut pool, deadline));
        full(ids.assign(&[a(1)], &mut pool, deadline));
        let got = ids.assign(&[a(1), a(3)], &mut pool, deadline);
        assert_eq!(
            (got.ids, got.missing),
            (vec![Some(0), None], 1),
            "a draining backend's id was handed to another address before its release"
        );
        assert!(ids.expired(now).is_empty(), "released before the deadline");
        let gone = ids.expired(deadline);
        assert_eq!(gone, vec![(a(2), 1)]);
        pool.give_back(1);
        let (got, fresh) = full(ids.assign(&[a(1), a(3)], &mut pool, deadline));
        assert_eq!((got, fresh), (vec![0, 1], vec![1]));
    }

    #[test]
    fn addresses_the_pool_has_no_id_for_are_left_out_and_get_one_later() {
        let mut pool = IdPool::new(2);
        let mut ids = BackendIds::default();
        let t = Instant::now();
        full(ids.assign(&[a(1)], &mut pool, t));
        let got = ids.assign(&[a(1), a(2), a(3), a(3)], &mut pool, t);
        assert_eq!(
            got,
            Assigned {
                ids: vec![Some(0), Some(1), None, None],
                fresh: vec![1],
                missing: 1,
            },
            "the ids left go to the first new addresses, the others get none"
        );
        assert_eq!(ids.live_id(&a(3)), None);
        assert_eq!(ids.leaving().count(), 0);
        // a(2) leaves and is released: a(3) gets its id at the next assignment.
        ids.assign(&[a(1), a(3)], &mut pool, t);
        assert_eq!(ids.expired(t), vec![(a(2), 1)]);
        pool.give_back(1);
        let (got, fresh) = full(ids.assign(&[a(1), a(3)], &mut pool, t));
        assert_eq!((got, fresh), (vec![0, 1], vec![1]));
    }

    #[test]
    fn a_duplicate_address_needs_one_id() {
        let mut pool = IdPool::new(1);
        let mut ids = BackendIds::default();
        let (got, _) = full(ids.assign(&[a(1), a(1)], &mut pool, Instant::now()));
        assert_eq!(got, vec![0, 0]);
    }

    #[test]
    fn a_backend_that_leaves_while_down_is_remembered_down_until_its_release() {
        let mut pool = IdPool::new(8);
        let mut ids = BackendIds::default();
        let t = Instant::now();
        let later = t + Duration::from_secs(5);
        let (got, _) = full(ids.assign(&[a(1), a(2)], &mut pool, later));
        ids.set_down(got[0], true);
        ids.set_down(got[1], false);
        full(ids.assign(&[], &mut pool, later));
        let leaving: Vec<_> = ids.leaving_with_state().collect();
        assert_eq!(
            leaving,
            vec![(a(1), got[0], true), (a(2), got[1], false)],
            "a backend removed while down must stay down while it drains"
        );
        assert_eq!(ids.expired(later).len(), 2);
        let (again, _) = full(ids.assign(&[a(3)], &mut pool, later));
        full(ids.assign(&[], &mut pool, later));
        assert!(
            ids.leaving_with_state()
                .all(|(_, id, down)| id != again[0] || !down),
            "a released id must not carry the old backend's DOWN state"
        );
    }
}
