//! Schedulers: how a new flow picks its backend. One file per algorithm.
//!
//! [`build`] makes the scheduler a service's snapshot carries; it is rebuilt whole, with
//! the new candidates, whenever a backend's health or weight changes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lb_common::FlowKey;

use crate::backend_stats::{BackendId, BackendStats};
use crate::config::SchedulerKind;
use crate::maglev::MaglevError;

pub mod least_conn;
pub mod maglev;
pub mod random_two;
pub mod round_robin;
pub mod source_hash;
pub mod weighted_round_robin;

pub use least_conn::LeastConn;
pub use maglev::MaglevScheduler;
pub use random_two::RandomTwo;
pub use round_robin::RoundRobin;
pub use source_hash::SourceHash;
pub use weighted_round_robin::WeightedRoundRobin;

/// Chooses the backend for a new flow. Called once per new connection or session (proxy);
/// XDP uses the Maglev table directly.
pub trait Scheduler: Send + Sync {
    /// Picks an eligible backend for `flow` that is not in `tried` (backends this flow
    /// already failed to connect to). `None` when every eligible backend is in `tried`.
    fn pick(&self, flow: &FlowKey, tried: &[BackendId]) -> Option<BackendId>;

    /// The scheduler's Maglev table as every balancer node must build it (see
    /// [`crate::maglev::TableDigest`]); `None` for schedulers without one.
    fn table_digest(&self) -> Option<crate::maglev::TableDigest> {
        None
    }
}

/// The turn counter of the `round_robin` and `weighted_round_robin` schedulers (and where
/// `least_conn` starts its scan among equals), kept by the service across rebuilds. A
/// scheduler is rebuilt whole at every change of health, weight or slow-start step (at most
/// once a second during a ramp); a counter of its own would start each new one at the first
/// backend, and a service with fewer new flows per rebuild than backends would send every
/// one of them to its first backends. Shared, the turns go on where the last scheduler left
/// them, as nginx's counters do across a reload.
#[derive(Debug, Clone, Default)]
pub struct Turn(Arc<AtomicUsize>);

impl Turn {
    /// The next turn: 0, 1, 2... across every scheduler built with this counter (wrapping
    /// at `usize::MAX`), distinct for each caller whatever the threads.
    pub fn next(&self) -> usize {
        // Relaxed is enough: the counter only has to hand out distinct turns.
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// A backend that may receive new flows (up, weight > 0), as handed to a scheduler.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its id in the snapshot.
    pub id: BackendId,
    /// Its address: the identity Maglev hashes, so every balancer host builds the same table.
    pub address: SocketAddr,
    /// Its effective weight, in sixteenths of a configured unit (`service::WEIGHT_SCALE`):
    /// `1..=MAX_WEIGHT × 16`. Schedulers go by ratios of weights.
    pub weight: u32,
    /// Its live counters (active connections, for `least_conn` and `random_two`).
    pub stats: Arc<BackendStats>,
}

/// Why a scheduler could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// No candidate with a weight above 0: every backend is down or draining.
    #[error("no eligible backend: every backend is down or draining")]
    NoCandidates,
    /// The Maglev table of a `maglev` or `source_hash` scheduler could not be built.
    #[error("cannot build the Maglev table: {0}")]
    Maglev(#[from] MaglevError),
}

/// Builds the scheduler `kind` over `candidates`.
///
/// `candidates`: only eligible backends (up, weight > 0), in snapshot order; their ids are
/// the snapshot's [`BackendId`]s, which `pick` returns. A candidate with weight 0 is
/// dropped (it is draining). `table_size`: the Maglev table size M, a prime, used only by
/// [`SchedulerKind::Maglev`] and [`SchedulerKind::SourceHash`]. `turn`: the service's turn
/// counter, used only by [`SchedulerKind::RoundRobin`],
/// [`SchedulerKind::WeightedRoundRobin`] and [`SchedulerKind::LeastConn`] (see [`Turn`]).
///
/// Returns `Err(SchedulerError::NoCandidates)` when no candidate has a weight above 0, and
/// `Err(SchedulerError::Maglev(_))` when a Maglev table cannot be built (size not a prime;
/// a table with fewer slots than candidates is built, see `MaglevTable::build`).
pub fn build(
    kind: SchedulerKind,
    candidates: Vec<Candidate>,
    table_size: u32,
    turn: &Turn,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(match kind {
        SchedulerKind::Maglev => Box::new(MaglevScheduler::new(candidates, table_size)?),
        SchedulerKind::SourceHash => Box::new(SourceHash::new(candidates, table_size)?),
        SchedulerKind::RoundRobin => Box::new(RoundRobin::new(candidates, turn.clone())?),
        SchedulerKind::WeightedRoundRobin => {
            Box::new(WeightedRoundRobin::new(candidates, turn.clone())?)
        }
        SchedulerKind::LeastConn => Box::new(LeastConn::new(candidates, turn.clone())?),
        SchedulerKind::RandomTwo => Box::new(RandomTwo::new(candidates)?),
    })
}

/// Drops draining candidates (weight 0); `Err(SchedulerError::NoCandidates)` when none is left.
fn eligible(candidates: Vec<Candidate>) -> Result<Vec<Candidate>, SchedulerError> {
    let candidates: Vec<Candidate> = candidates.into_iter().filter(|c| c.weight > 0).collect();
    if candidates.is_empty() {
        return Err(SchedulerError::NoCandidates);
    }
    Ok(candidates)
}

/// Whether `id` is among the backends this flow already tried (a handful at most).
fn was_tried(tried: &[BackendId], id: BackendId) -> bool {
    tried.contains(&id)
}

/// `true` when `a` has fewer active connections per unit of weight than `b`:
/// `a.active / a.weight < b.active / b.weight`, compared cross-multiplied (no floats).
fn less_loaded(a: &Candidate, b: &Candidate) -> bool {
    load_cmp(a, b) == std::cmp::Ordering::Less
}

/// Orders two candidates by active connections per unit of weight.
fn load_cmp(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    // u64 * u32 fits u128, so the products are exact.
    let lhs = u128::from(a.stats.active()) * u128::from(b.weight);
    let rhs = u128::from(b.stats.active()) * u128::from(a.weight);
    lhs.cmp(&rhs)
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Candidates and flows for the schedulers' tests.

    use super::*;
    use lb_common::flow::IPPROTO_TCP;

    /// Candidates with ids 10, 11, ... (so ids differ from positions), addresses on
    /// 127.0.0.x, and the given weights.
    pub fn candidates(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Candidate {
                id: 10 + i,
                address: SocketAddr::from(([127, 0, 0, 1 + i as u8], 9000)),
                weight,
                stats: Arc::new(BackendStats::default()),
            })
            .collect()
    }

    /// A TCP flow from 127.0.0.`host`:`port` to the VIP 127.0.0.100:80.
    pub fn flow(host: u8, port: u16) -> FlowKey {
        FlowKey {
            src_addr: [u32::from_ne_bytes([127, 0, 0, host]), 0, 0, 0],
            dst_addr: [u32::from_ne_bytes([127, 0, 0, 100]), 0, 0, 0],
            src_port: port,
            dst_port: 80,
            protocol: IPPROTO_TCP,
            family: lb_common::maps::FAMILY_V4,
            _pad: [0; 2],
        }
    }

    /// How many of `picks` flows went to each candidate (by position), picking with
    /// source ports 1.. from one client.
    pub fn spread(s: &dyn Scheduler, n: usize, picks: u16) -> Vec<u64> {
        let mut got = vec![0u64; n];
        for port in 1..=picks {
            let id = s.pick(&flow(1, port), &[]).expect("a candidate is left");
            got[id - 10] += 1;
        }
        got
    }

    /// Asserts `got` is within `tolerance` (a fraction) of each weight's share of the total.
    pub fn assert_share(name: &str, got: &[u64], weights: &[u32], tolerance: f64) {
        let total: u64 = got.iter().sum();
        let wsum: u32 = weights.iter().sum();
        for (i, (&g, &w)) in got.iter().zip(weights).enumerate() {
            let expected = total as f64 * f64::from(w) / f64::from(wsum);
            assert!(
                (g as f64 - expected).abs() <= expected * tolerance,
                "{name}: backend {i} (weight {w}) got {g} of {total} flows, expected about {expected:.0}"
            );
        }
    }

    /// Asserts that the scheduler never returns a tried backend and returns `None` once
    /// every candidate is tried.
    pub fn assert_respects_tried(name: &str, s: &dyn Scheduler, n: usize) {
        for port in 1..=50u16 {
            let f = flow(3, port);
            let mut tried = Vec::new();
            while let Some(id) = s.pick(&f, &tried) {
                assert!(
                    !tried.contains(&id),
                    "{name}: flow {port} was sent again to backend {id} after it failed there"
                );
                tried.push(id);
                assert!(tried.len() <= n, "{name}: more picks than candidates");
            }
            assert_eq!(
                tried.len(),
                n,
                "{name}: gave up after {tried:?} with untried candidates left"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Maglev,
        SchedulerKind::SourceHash,
        SchedulerKind::RoundRobin,
        SchedulerKind::WeightedRoundRobin,
        SchedulerKind::LeastConn,
        SchedulerKind::RandomTwo,
    ];

    #[test]
    fn no_candidates_is_an_error_for_every_kind() {
        for kind in ALL {
            assert!(
                matches!(
                    build(kind, vec![], 65537, &Turn::default()),
                    Err(SchedulerError::NoCandidates)
                ),
                "{kind:?} accepted an empty backend set"
            );
            assert!(
                matches!(
                    build(kind, candidates(&[0, 0]), 65537, &Turn::default()),
                    Err(SchedulerError::NoCandidates)
                ),
                "{kind:?} accepted a set where every backend is draining"
            );
        }
    }

    #[test]
    fn every_kind_respects_tried_and_skips_draining() {
        for kind in ALL {
            let s =
                build(kind, candidates(&[3, 0, 1, 2]), 65537, &Turn::default()).expect("valid set");
            // Candidate 11 has weight 0: it must never be picked, so three remain.
            assert_respects_tried(&format!("{kind:?}"), s.as_ref(), 3);
        }
    }

    #[test]
    fn maglev_table_errors_are_reported() {
        let err = build(
            SchedulerKind::Maglev,
            candidates(&[1, 1]),
            65536,
            &Turn::default(),
        )
        .err();
        assert!(
            matches!(
                err,
                Some(SchedulerError::Maglev(MaglevError::NotPrime(65536)))
            ),
            "non-prime table size accepted: {err:?}"
        );
        // Other kinds do not use the table, so its size does not matter to them.
        assert!(build(
            SchedulerKind::RoundRobin,
            candidates(&[1, 1]),
            65536,
            &Turn::default()
        )
        .is_ok());
    }
}
