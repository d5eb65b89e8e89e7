//! The weighted Maglev lookup table: M slots, each naming the backend that new flows hashing
//! to it go to.
//!
//! The table follows Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, §3.4: every backend has its own permutation of the slots (an
//! `offset` and a `skip`, both from hashes of the backend's address), and backends take
//! turns claiming their next preferred slot that is still empty until the table is full.
//! Because a backend's preferences depend only on its own address, adding or removing one
//! backend moves few slots between the others.
//!
//! Weights follow the idea of Katran's `MaglevHashV2` (facebookincubator/katran): a heavier
//! backend takes turns more often. Two refinements make the shares exact:
//! - Turns are spread evenly in time: the k-th turn of a backend of weight w falls at time
//!   (2k - 1) / 2w (Webster's divisor sequence), earlier times first, ties to the backend that
//!   sorts first. With equal weights this is the paper's plain round of turns.
//! - Each backend's number of slots is fixed up front by largest-remainder apportionment of M
//!   over the weights, so every backend holds its weight share of M to within one slot.
//!
//! Every balancer host must build the same table from the same set of backends, whatever
//! the order of its config and whichever build of the daemon it runs. So the permutation
//! comes only from fixed hashes of the address bytes (see [`address_hash`]), backends are
//! sorted by address before the table is filled, and no step uses std's random hasher.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::net::SocketAddr;

use crate::config::is_prime;

/// Seed of the hash that gives a backend's first preferred slot (its `offset`).
pub const OFFSET_SEED: u64 = 0x6d61_676c_6576_5f6f; // "maglev_o"
/// Seed of the hash that gives the stride of a backend's preferences (its `skip`).
pub const SKIP_SEED: u64 = 0x6d61_676c_6576_5f73; // "maglev_s"

/// The default table size M: a prime well above 100 times the number of backends a
/// service is expected to have, as the paper advises.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// A Maglev table in brief: its size M and a 64-bit FNV-1a hash of the backend address in
/// every slot, in slot order. Equal digests: the same backend in every slot (to a hash
/// collision), whatever the order of the config, DNS answers or ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TableDigest {
    /// Slots, M.
    pub size: u32,
    /// FNV-1a (64 bits) of the slots' backend addresses; written as 16 hex digits in JSON
    /// (a JSON number loses a u64's low bits in many readers).
    #[serde(serialize_with = "hex64")]
    pub fnv1a: u64,
}

fn hex64<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:016x}"))
}

/// A backend as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend {
    /// The backend's address: its identity in the table. Its IP octets and port decide
    /// which slots it prefers, so every host that lists it gives it the same preferences.
    pub address: SocketAddr,
    /// Relative share of slots; 0 means draining and gets no slot.
    pub weight: u32,
}

/// Why a table could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    /// The size M must be a prime, so that every `skip` in `1..M` visits every slot.
    #[error("Maglev table size {0} is not a prime (65537 is the usual choice)")]
    NotPrime(u32),
    /// No backend has a weight above 0.
    #[error("no backend with a weight above 0: nothing to put in the Maglev table")]
    NoBackends,
    /// More backends than a table's `u32` slots can index.
    #[error("{0} backends are more than a Maglev table can index")]
    TooMany(usize),
}

/// A built Maglev table: M slots, each an index into the backend slice it was built from.
///
/// Immutable once built: a change of backends or weights builds a new table, which the
/// data planes swap in whole.
#[derive(Clone, PartialEq, Eq)]
pub struct MaglevTable {
    entries: Vec<u32>,
}

impl MaglevTable {
    /// Builds the weighted Maglev table of `backends`.
    ///
    /// `backends`: the service's backends in any order; addresses should be unique (two
    /// entries with one address would prefer the same slots). Weight 0 means draining: the
    /// backend gets no slot. Every other backend gets `M * weight / sum(weights)` slots,
    /// rounded up or down, so a backend whose share is under one slot may get none; with
    /// more weighted backends than slots, only M of them at most get one.
    /// `size`: the table length M, a prime; [`DEFAULT_TABLE_SIZE`] (65537) is the default.
    /// The paper advises M > 100 × the number of backends so that a removal moves few flows.
    ///
    /// The result maps each slot to the same *address* on every host that builds it from
    /// the same set of (address, weight) pairs, whatever the order of the slice.
    ///
    /// Returns `Err(MaglevError::NotPrime(size))` when `size` is not a prime,
    /// `Err(MaglevError::NoBackends)` when no backend has a weight above 0, and
    /// `Err(MaglevError::TooMany(n))` when the slice is longer than `u32::MAX`.
    ///
    /// Cost, with N weighted backends of G distinct weights: O(M log M + T log G + N log N)
    /// time expected, T <= M being the distinct turn times (the probing of the paper's fill
    /// is O(M log M) on average, over an M-bit bitmap; backends of one weight share a heap
    /// entry), and O(M + N) memory: the 4·M-byte table, the M / 8-byte bitmap and about
    /// 100 bytes per backend while building. About 2-4 ms for M = 65537 and 10 to 1,000
    /// backends on the machines in BENCHMARKS.md.
    pub fn build(backends: &[MaglevBackend], size: u32) -> Result<MaglevTable, MaglevError> {
        if !is_prime(size) {
            return Err(MaglevError::NotPrime(size));
        }
        let ranked = rank(backends);
        if ranked.is_empty() {
            return Err(MaglevError::NoBackends);
        }
        // Slots hold u32 indexes into `backends`; a longer slice cannot be represented.
        if u32::try_from(backends.len()).is_err() {
            return Err(MaglevError::TooMany(backends.len()));
        }
        let quotas = apportion(&ranked, size);
        Ok(MaglevTable {
            entries: fill(&ranked, &quotas, size),
        })
    }

    /// The table's digest, `backends` being the slice it was built from: what two balancer
    /// nodes compare to know they place every flow alike.
    pub fn digest(&self, backends: &[MaglevBackend]) -> TableDigest {
        // FNV-1a, 64 bits, over each slot's backend address (IP octets, then the port, big
        // endian): fixed, so that any two builds of the daemon agree.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for &e in &self.entries {
            let a = backends[e as usize].address;
            match a.ip() {
                std::net::IpAddr::V4(ip) => eat(&ip.octets()),
                std::net::IpAddr::V6(ip) => eat(&ip.octets()),
            }
            eat(&a.port().to_be_bytes());
        }
        TableDigest {
            size: self.size(),
            fnv1a: h,
        }
    }

    /// The index (into the slice given to [`MaglevTable::build`]) of the backend for a flow
    /// with this hash, e.g. `lb_common::flow::flow_hash`. Slot = `hash % M`.
    pub fn lookup(&self, hash: u32) -> usize {
        self.entries[(hash % self.size()) as usize] as usize
    }

    /// The M slots, each an index into the slice given to [`MaglevTable::build`]; slot `s`
    /// serves flows whose hash is `s` modulo M.
    pub fn entries(&self) -> &[u32] {
        &self.entries
    }

    /// The number of slots M (a prime).
    pub fn size(&self) -> u32 {
        // `build` refuses sizes that do not fit u32, so the length always does.
        self.entries.len() as u32
    }
}

impl std::fmt::Debug for MaglevTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // M entries are too many to print; the size identifies the table well enough in logs.
        f.debug_struct("MaglevTable")
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

/// The bytes of an address that its Maglev permutation is derived from: the IP octets
/// (4 for IPv4, 16 for IPv6) followed by the port, big-endian. IPv6 flow info and scope id
/// are not part of it.
#[derive(Clone, Copy)]
struct AddressBytes {
    bytes: [u8; 18],
    len: usize,
}

impl AddressBytes {
    fn of(address: SocketAddr) -> AddressBytes {
        let mut bytes = [0u8; 18];
        let len = match address {
            SocketAddr::V4(a) => {
                bytes[..4].copy_from_slice(&a.ip().octets());
                bytes[4..6].copy_from_slice(&a.port().to_be_bytes());
                6
            }
            SocketAddr::V6(a) => {
                bytes[..16].copy_from_slice(&a.ip().octets());
                bytes[16..18].copy_from_slice(&a.port().to_be_bytes());
                18
            }
        };
        AddressBytes { bytes, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The hash behind a backend's Maglev permutation: 64-bit FNV-1a over the 8 bytes of `seed`
/// (little-endian) followed by the address bytes (IP octets, then the port big-endian),
/// finished with MurmurHash3's `fmix64` so that every input bit moves every output bit.
///
/// `offset = address_hash(addr, OFFSET_SEED) % M` and
/// `skip = address_hash(addr, SKIP_SEED) % (M - 1) + 1`. A unit test pins its output: if
/// it changed, hosts running different builds would disagree on every table.
pub fn address_hash(address: SocketAddr, seed: u64) -> u64 {
    hash_bytes(&AddressBytes::of(address), seed)
}

fn hash_bytes(key: &AddressBytes, seed: u64) -> u64 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET_BASIS;
    for &b in seed.to_le_bytes().iter().chain(key.as_slice()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The backends of weight above 0 in fill order. Sorting by address makes the fill
/// independent of config order; weight, then input position, only break ties between
/// duplicate addresses.
fn rank(backends: &[MaglevBackend]) -> Vec<Ranked> {
    let mut ranked: Vec<Ranked> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight > 0)
        .map(|(index, b)| Ranked {
            key: AddressBytes::of(b.address),
            weight: b.weight,
            index,
        })
        .collect();
    ranked.sort_unstable_by(|a, b| {
        a.key
            .as_slice()
            .cmp(b.key.as_slice())
            .then(a.weight.cmp(&b.weight))
            .then(a.index.cmp(&b.index))
    });
    ranked
}

/// A weighted backend in fill order.
struct Ranked {
    key: AddressBytes,
    weight: u32,
    /// Position in the caller's slice: what the slots store.
    index: usize,
}

/// How many slots each backend (in `ranked` order) gets: `floor(M * w / W)`, plus one for
/// the backends with the largest remainders until the quotas sum to M (Hamilton's method).
/// Each quota is then within one slot of the exact share `M * w / W`.
fn apportion(ranked: &[Ranked], size: u32) -> Vec<u32> {
    let total: u64 = ranked.iter().map(|r| u64::from(r.weight)).sum();
    let m = u64::from(size);
    // M * w fits u64 (both are u32); the quotient is at most M, so it fits u32.
    let mut quotas: Vec<u32> = ranked
        .iter()
        .map(|r| (m * u64::from(r.weight) / total) as u32)
        .collect();
    let assigned: u64 = quotas.iter().map(|&q| u64::from(q)).sum();
    // Fewer than N slots are left over, one per largest remainder.
    let left = (m - assigned) as usize;
    let mut by_remainder: Vec<usize> = (0..ranked.len()).collect();
    // Remainders share the denominator W, so they compare as integers; ties go to the
    // backend that sorts first, which every host agrees on.
    by_remainder.sort_unstable_by_key(|&i| (Reverse(m * u64::from(ranked[i].weight) % total), i));
    for &i in &by_remainder[..left] {
        quotas[i] += 1;
    }
    quotas
}

/// The next turn of every backend of one weight: backends of equal weight take their k-th
/// turns at the same time (2k - 1) / 2w, one after the other in rank order.
#[derive(PartialEq, Eq)]
struct GroupTurn {
    /// 2k - 1.
    twice_k_minus_one: u64,
    weight: u32,
    /// Index into the groups.
    group: usize,
}

impl GroupTurn {
    /// Whether this turn's time is before `other`'s: a / 2wa < b / 2wb <=> a * wb < b * wa
    /// (u128 because a can reach 2M and w is any u32).
    fn time_cmp(&self, other: &GroupTurn) -> Ordering {
        let lhs = u128::from(self.twice_k_minus_one) * u128::from(other.weight);
        let rhs = u128::from(other.twice_k_minus_one) * u128::from(self.weight);
        lhs.cmp(&rhs)
    }
}

impl Ord for GroupTurn {
    fn cmp(&self, other: &GroupTurn) -> Ordering {
        self.time_cmp(other).then(self.group.cmp(&other.group))
    }
}

impl PartialOrd for GroupTurn {
    fn partial_cmp(&self, other: &GroupTurn) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Backends of one weight, in rank order.
struct Group {
    weight: u32,
    ranks: Vec<usize>,
}

/// The backends with a quota above 0, grouped by weight.
struct WeightGroups {
    /// In order of first appearance in rank order.
    groups: Vec<Group>,
    /// Per group, how many of its backends still want slots.
    wanting: Vec<usize>,
    /// Per rank, its group (`usize::MAX` for a quota of 0).
    group_of: Vec<usize>,
}

impl WeightGroups {
    /// Groups the backends of `ranked` whose quota is above 0.
    fn of(ranked: &[Ranked], quotas: &[u32]) -> WeightGroups {
        let mut groups: Vec<Group> = Vec::new();
        let mut wanting: Vec<usize> = Vec::new();
        let mut group_of = vec![usize::MAX; ranked.len()];
        let mut group_of_weight: std::collections::BTreeMap<u32, usize> = Default::default();
        for (rank, r) in ranked.iter().enumerate() {
            if quotas[rank] == 0 {
                continue;
            }
            let g = *group_of_weight.entry(r.weight).or_insert_with(|| {
                groups.push(Group {
                    weight: r.weight,
                    ranks: Vec::new(),
                });
                wanting.push(0);
                groups.len() - 1
            });
            // Ranks are visited in order, so each group's list is sorted.
            groups[g].ranks.push(rank);
            wanting[g] += 1;
            group_of[rank] = g;
        }
        WeightGroups {
            groups,
            wanting,
            group_of,
        }
    }
}

/// Every group's first turn (k = 1).
fn first_turns(groups: &[Group]) -> BinaryHeap<Reverse<GroupTurn>> {
    groups
        .iter()
        .enumerate()
        .map(|(group, g)| {
            Reverse(GroupTurn {
                twice_k_minus_one: 1,
                weight: g.weight,
                group,
            })
        })
        .collect()
}

/// Each backend's permutation as (offset, skip): it probes offset, offset + skip, ... mod M.
fn permutations(ranked: &[Ranked], m: u64) -> Vec<(u32, u32)> {
    ranked
        .iter()
        .map(|r| {
            let offset = hash_bytes(&r.key, OFFSET_SEED) % m;
            // M = 2 has a single stride; `max(1)` keeps the modulus non-zero there too.
            let skip = hash_bytes(&r.key, SKIP_SEED) % (m - 1).max(1) + 1;
            (offset as u32, skip as u32)
        })
        .collect()
}

/// Moves `first` and every turn in `turns` at the same time as it into `now`.
fn pop_same_time(
    turns: &mut BinaryHeap<Reverse<GroupTurn>>,
    first: GroupTurn,
    now: &mut Vec<GroupTurn>,
) {
    now.clear();
    now.push(first);
    while turns
        .peek()
        .is_some_and(|Reverse(t)| t.time_cmp(&now[0]) == Ordering::Equal)
    {
        if let Some(Reverse(t)) = turns.pop() {
            now.push(t);
        }
    }
}

/// The ranks that take a turn now, in rank order: one group's list as is, or several
/// groups' merged into `merged`.
fn turn_order<'a>(
    groups: &'a [Group],
    now: &[GroupTurn],
    merged: &'a mut Vec<usize>,
) -> &'a [usize] {
    if let [only] = now {
        return &groups[only.group].ranks;
    }
    merged.clear();
    for t in now {
        merged.extend_from_slice(&groups[t.group].ranks);
    }
    merged.sort_unstable();
    merged
}

/// Fills the M slots: in turn order, each backend claims the next slot of its permutation
/// that is still empty, until it holds its quota. The quotas sum to M, and every
/// permutation visits every slot (M prime, skip in 1..M), so the fill ends with every slot
/// taken and every backend at its quota.
///
/// Turn order: earlier times first, ties to the backend that ranks first. Backends of equal
/// weight share every turn time, so the heap holds one entry per distinct weight (usually a
/// handful), not one per backend; turns of several
/// weights that fall at the same time are merged by rank. Which slots are taken is kept in
/// a bitmap (M / 8 bytes, in L1 cache for the default M) that the probing reads instead
/// of the 4·M-byte table. Both only make the fill faster: the table is the one a heap of
/// single turns over the full table would build (a test keeps that reference).
fn fill(ranked: &[Ranked], quotas: &[u32], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    // Current probe position and stride of each backend's permutation.
    let mut cursors = permutations(ranked, m);
    let WeightGroups {
        groups,
        mut wanting,
        group_of,
    } = WeightGroups::of(ranked, quotas);
    let mut turns = first_turns(&groups);
    let mut placed = vec![0u32; ranked.len()];
    let mut entries = vec![0u32; size as usize];
    let mut taken = vec![0u64; (size as usize).div_ceil(64)];
    let advance = |pos: u32, skip: u32| -> u32 {
        // pos, skip < M <= u32::MAX, so the sum fits u64 and one subtraction reduces it.
        let next = u64::from(pos) + u64::from(skip);
        (if next >= m { next - m } else { next }) as u32
    };
    let mut now: Vec<GroupTurn> = Vec::new();
    let mut merged: Vec<usize> = Vec::new();
    while let Some(Reverse(first)) = turns.pop() {
        pop_same_time(&mut turns, first, &mut now);
        // The hot loop (M slot claims per build) stays inline; only the set-up moved out.
        for &rank in turn_order(&groups, &now, &mut merged) {
            if placed[rank] == quotas[rank] {
                continue;
            }
            let (mut pos, skip) = cursors[rank];
            while taken[pos as usize / 64] & (1 << (pos % 64)) != 0 {
                pos = advance(pos, skip);
            }
            taken[pos as usize / 64] |= 1 << (pos % 64);
            // `build` checked that every index fits u32.
            entries[pos as usize] = ranked[rank].index as u32;
            cursors[rank].0 = advance(pos, skip);
            placed[rank] += 1;
            if placed[rank] == quotas[rank] {
                wanting[group_of[rank]] -= 1;
            }
        }
        for t in now.drain(..) {
            if wanting[t.group] > 0 {
                turns.push(Reverse(GroupTurn {
                    twice_k_minus_one: t.twice_k_minus_one + 2,
                    ..t
                }));
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_depends_on_the_backends_and_weights_not_their_order() {
        let b = |i: u8, w: u32| MaglevBackend {
            address: SocketAddr::from(([10, 0, 0, i], 80)),
            weight: w,
        };
        let one = [b(1, 1), b(2, 2), b(3, 3)];
        let other = [b(3, 3), b(1, 1), b(2, 2)];
        let digest =
            |set: &[MaglevBackend]| MaglevTable::build(set, 65537).expect("a table").digest(set);
        assert_eq!(digest(&one), digest(&other));
        assert_eq!(digest(&one).size, 65537);
        assert_ne!(digest(&one), digest(&[b(1, 1), b(2, 2), b(3, 2)]));
    }
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const M: u32 = 65537;

    /// `n` backends on distinct loopback-style addresses, weights from `weight(i)`.
    fn backends(n: usize, weight: impl Fn(usize) -> u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                address: SocketAddr::from((
                    Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8),
                    8000 + (i % 7) as u16,
                )),
                weight: weight(i),
            })
            .collect()
    }

    /// Weights 1..=256 from a fixed seed, so every run checks the same mixed set.
    fn mixed(n: usize, seed: u64) -> Vec<MaglevBackend> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let weights: Vec<u32> = (0..n).map(|_| rng.u32(1..=256)).collect();
        backends(n, |i| weights[i])
    }

    fn counts(table: &MaglevTable, n: usize) -> Vec<u64> {
        let mut c = vec![0u64; n];
        for &e in table.entries() {
            c[e as usize] += 1;
        }
        c
    }

    fn by_address(table: &MaglevTable, set: &[MaglevBackend]) -> Vec<SocketAddr> {
        table
            .entries()
            .iter()
            .map(|&e| set[e as usize].address)
            .collect()
    }

    #[test]
    fn every_backend_gets_its_weight_share_within_one_slot() {
        // "Within 1% of its weight share": we assert the stronger bound the apportionment
        // gives, |slots - M * w / W| < 1 slot, which is within max(1% of the share, 1 slot)
        // for every backend. (A backend whose share is below one slot may hold 0 or 1.)
        let sets: Vec<(&str, Vec<MaglevBackend>)> = vec![
            ("3 equal", backends(3, |_| 1)),
            ("10 equal", backends(10, |_| 100)),
            ("100 equal", backends(100, |_| 7)),
            ("1000 equal", backends(1000, |_| 1)),
            ("3 mixed", mixed(3, 1)),
            ("10 mixed", mixed(10, 2)),
            ("100 mixed", mixed(100, 3)),
            ("1000 mixed", mixed(1000, 4)),
            ("1 and 256", backends(2, |i| if i == 0 { 1 } else { 256 })),
        ];
        for (name, set) in &sets {
            let table = MaglevTable::build(set, M).expect("valid set");
            assert_eq!(table.size(), M);
            assert_eq!(table.entries().len(), M as usize);
            let total: u64 = set.iter().map(|b| u64::from(b.weight)).sum();
            for (i, &got) in counts(&table, set.len()).iter().enumerate() {
                let expected = f64::from(M) * f64::from(set[i].weight) / total as f64;
                assert!(
                    (got as f64 - expected).abs() < 1.0,
                    "{name}: backend {} (weight {}) holds {got} slots, its share is {expected:.2}",
                    set[i].address,
                    set[i].weight
                );
            }
        }
    }

    #[test]
    fn removing_one_backend_moves_few_other_slots() {
        // Slots of the removed backend must move; of the others, at most (1/N + 1%) of M may.
        for n in [3usize, 10, 100, 1000] {
            for (kind, set) in [("equal", backends(n, |_| 1)), ("mixed", mixed(n, n as u64))] {
                let before = MaglevTable::build(&set, M).expect("valid set");
                let gone = n / 2;
                let mut rest = set.clone();
                let removed = rest.remove(gone).address;
                let after = MaglevTable::build(&rest, M).expect("valid set");
                let (a, b) = (by_address(&before, &set), by_address(&after, &rest));
                let moved = a
                    .iter()
                    .zip(&b)
                    .filter(|(x, y)| *x != &removed && x != y)
                    .count();
                let limit = (1.0 / n as f64 + 0.01) * f64::from(M);
                assert!(
                    (moved as f64) <= limit,
                    "{n} {kind} backends: removing {removed} moved {moved} other slots (limit {limit:.0})"
                );
            }
        }
    }

    #[test]
    fn same_set_in_any_order_builds_the_same_table() {
        let set = mixed(100, 7);
        let first = MaglevTable::build(&set, M).expect("valid set");
        let again = MaglevTable::build(&set, M).expect("valid set");
        assert_eq!(first, again, "two builds of one slice differ");
        let mut rng = fastrand::Rng::with_seed(99);
        for round in 0..3 {
            let mut shuffled = set.clone();
            rng.shuffle(&mut shuffled);
            let other = MaglevTable::build(&shuffled, M).expect("valid set");
            assert!(
                by_address(&first, &set) == by_address(&other, &shuffled),
                "shuffle {round}: a host listing the same backends in another order routes slots elsewhere"
            );
        }
    }

    #[test]
    fn draining_backend_gets_no_slot() {
        let set = backends(5, |i| if i == 2 { 0 } else { 10 });
        let table = MaglevTable::build(&set, M).expect("valid set");
        let c = counts(&table, set.len());
        assert_eq!(c[2], 0, "draining backend holds {} slots", c[2]);
        assert!(c.iter().enumerate().all(|(i, &n)| i == 2 || n > 0));
    }

    #[test]
    fn more_backends_than_slots_fill_every_slot_with_a_different_one() {
        let set = backends(5, |_| 1);
        let table = MaglevTable::build(&set, 3).expect("5 backends in 3 slots");
        let mut seen = table.entries().to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen.len(),
            3,
            "a backend holds two of 3 slots: {:?}",
            table.entries()
        );
        // The heavier backends are the ones that get a slot.
        let set = backends(5, |i| if i < 2 { 10 } else { 1 });
        let table = MaglevTable::build(&set, 2).expect("5 backends in 2 slots");
        let mut seen = table.entries().to_vec();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1]);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let set = backends(3, |_| 1);
        assert_eq!(
            MaglevTable::build(&set, 65536),
            Err(MaglevError::NotPrime(65536))
        );
        assert_eq!(MaglevTable::build(&set, 1), Err(MaglevError::NotPrime(1)));
        assert_eq!(MaglevTable::build(&[], M), Err(MaglevError::NoBackends));
        assert_eq!(
            MaglevTable::build(&backends(3, |_| 0), M),
            Err(MaglevError::NoBackends),
            "all draining"
        );
        // Exactly one slot per backend is allowed, and each gets it.
        let table = MaglevTable::build(&set, 3).expect("size 3 fits 3 backends");
        let mut seen = table.entries().to_vec();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1, 2]);
    }

    #[test]
    fn larger_prime_and_ipv6_work() {
        let mut set = mixed(50, 11);
        set.push(MaglevBackend {
            address: SocketAddr::from((Ipv6Addr::LOCALHOST, 9000)),
            weight: 256,
        });
        let size = 655_373;
        let table = MaglevTable::build(&set, size).expect("655373 is prime");
        assert_eq!(table.entries().len(), size as usize);
        let total: u64 = set.iter().map(|b| u64::from(b.weight)).sum();
        for (i, &got) in counts(&table, set.len()).iter().enumerate() {
            let expected = f64::from(size) * f64::from(set[i].weight) / total as f64;
            assert!(
                (got as f64 - expected).abs() < 1.0,
                "backend {} holds {got} slots of {size}, its share is {expected:.2}",
                set[i].address
            );
        }
    }

    #[test]
    fn lookup_reads_the_slot_of_the_hash() {
        let set = backends(4, |i| i as u32 + 1);
        let table = MaglevTable::build(&set, 13).expect("valid set");
        for hash in [0u32, 5, 12, 13, 1000, u32::MAX] {
            assert_eq!(
                table.lookup(hash),
                table.entries()[(hash % 13) as usize] as usize
            );
        }
        let single = MaglevTable::build(&backends(1, |_| 3), 7).expect("valid set");
        assert!(single.entries().iter().all(|&e| e == 0));
    }

    #[test]
    fn address_hash_and_small_table_are_pinned() {
        // The cross-host contract: balancer hosts on different builds must agree on these.
        let a = SocketAddr::from(([10, 0, 0, 1], 80));
        let b = SocketAddr::from((Ipv6Addr::LOCALHOST, 443));
        let hashes = [
            address_hash(a, OFFSET_SEED),
            address_hash(a, SKIP_SEED),
            address_hash(b, OFFSET_SEED),
        ];
        assert_eq!(
            hashes, PINNED_HASHES,
            "address_hash changed: {hashes:#018x?}"
        );
        let set = backends(3, |i| i as u32 + 1);
        let table = MaglevTable::build(&set, 13).expect("valid set");
        assert_eq!(table.entries(), PINNED_TABLE, "the fill changed");
    }

    /// The fill as first written: a heap of single turns, probing the table itself. The
    /// grouped fill must build exactly this table.
    fn reference_fill(ranked: &[Ranked], quotas: &[u32], size: u32) -> Vec<u32> {
        const EMPTY: u32 = u32::MAX;
        let m = u64::from(size);
        let mut cursors: Vec<(u64, u64)> = ranked
            .iter()
            .map(|r| {
                let offset = hash_bytes(&r.key, OFFSET_SEED) % m;
                let skip = hash_bytes(&r.key, SKIP_SEED) % (m - 1).max(1) + 1;
                (offset, skip)
            })
            .collect();
        // (time as a fraction a / 2w, rank): compared exactly by cross-multiplying.
        #[derive(PartialEq, Eq)]
        struct Turn(u64, u32, usize);
        impl Ord for Turn {
            fn cmp(&self, o: &Turn) -> Ordering {
                (u128::from(self.0) * u128::from(o.1))
                    .cmp(&(u128::from(o.0) * u128::from(self.1)))
                    .then(self.2.cmp(&o.2))
            }
        }
        impl PartialOrd for Turn {
            fn partial_cmp(&self, o: &Turn) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }
        let mut placed = vec![0u32; ranked.len()];
        let mut turns: BinaryHeap<Reverse<Turn>> = ranked
            .iter()
            .enumerate()
            .filter(|&(rank, _)| quotas[rank] > 0)
            .map(|(rank, r)| Reverse(Turn(1, r.weight, rank)))
            .collect();
        let mut entries = vec![EMPTY; size as usize];
        while let Some(Reverse(Turn(a, w, rank))) = turns.pop() {
            let (mut pos, skip) = cursors[rank];
            while entries[pos as usize] != EMPTY {
                pos = (pos + skip) % m;
            }
            entries[pos as usize] = ranked[rank].index as u32;
            cursors[rank].0 = (pos + skip) % m;
            placed[rank] += 1;
            if placed[rank] < quotas[rank] {
                turns.push(Reverse(Turn(a + 2, w, rank)));
            }
        }
        entries
    }

    #[test]
    fn the_grouped_fill_builds_the_reference_table() {
        let mut rng = fastrand::Rng::with_seed(11);
        for case in 0..60 {
            let n = rng.usize(1..=300);
            // Few distinct weights (many ties within and across groups), or many.
            let max_weight = if case % 2 == 0 { 4 } else { 256 };
            let weights: Vec<u32> = (0..n).map(|_| rng.u32(0..=max_weight)).collect();
            let set = backends(n, |i| weights[i]);
            let size = [13, 101, 997, 4093, 65537][case % 5];
            let ranked = rank(&set);
            if ranked.is_empty() || ranked.len() > size as usize {
                continue;
            }
            let quotas = apportion(&ranked, size);
            assert_eq!(
                fill(&ranked, &quotas, size),
                reference_fill(&ranked, &quotas, size),
                "case {case}: {n} backends, weights up to {max_weight}, M = {size}"
            );
        }
    }

    #[test]
    fn duplicate_addresses_do_not_break_the_build() {
        let mut set = backends(3, |_| 2);
        set.push(set[0]);
        let table = MaglevTable::build(&set, 101).expect("valid set");
        let mut per_address: HashMap<SocketAddr, u64> = HashMap::new();
        for &e in table.entries() {
            *per_address.entry(set[e as usize].address).or_default() += 1;
        }
        assert_eq!(per_address.values().sum::<u64>(), 101);
    }

    const PINNED_HASHES: [u64; 3] = [
        0x295b_a703_9e30_1037,
        0x01de_130b_7c4c_0f1d,
        0x2c0e_7f36_bc43_828e,
    ];
    const PINNED_TABLE: &[u32] = &[1, 2, 2, 1, 2, 0, 2, 2, 0, 2, 1, 1, 2];
}
