//! The `maglev` scheduler: weighted Maglev consistent hashing of the flow's 5-tuple.
//!
//! The same table the XDP program reads, so both data planes send a flow to the same
//! backend, and every balancer host agrees on it.

use lb_common::{flow_hash, FlowKey};

use super::{eligible, was_tried, Candidate, Scheduler, SchedulerError};
use crate::backend_stats::BackendId;
use crate::maglev::{MaglevBackend, MaglevTable, TableDigest};

/// Picks the backend of `flow_hash(flow) % M` in a weighted Maglev table.
///
/// A retry (the first choice is in `tried`) walks forward from that slot to the first
/// slot whose backend is not in `tried`, so a flow's retries are deterministic too and go
/// to backends in proportion to their weights.
pub struct MaglevScheduler {
    candidates: Vec<Candidate>,
    table: MaglevTable,
    key: fn(&FlowKey) -> u32,
    digest: TableDigest,
}

impl MaglevScheduler {
    /// Builds the table over `candidates` (weight 0 dropped), with `table_size` slots.
    ///
    /// Returns `Err(SchedulerError::NoCandidates)` when no candidate has a weight above 0,
    /// `Err(SchedulerError::Maglev(_))` when `table_size` is not a prime or there are more
    /// candidates than a table can index. A table smaller than the number of candidates is
    /// built all the same: some candidates get no slot (see `MaglevTable::build`). Costs what [`MaglevTable::build`] costs.
    pub fn new(candidates: Vec<Candidate>, table_size: u32) -> Result<Self, SchedulerError> {
        Self::with_key(candidates, table_size, flow_hash)
    }

    /// Like [`MaglevScheduler::new`], but slots are chosen by `key(flow) % M`.
    pub(super) fn with_key(
        candidates: Vec<Candidate>,
        table_size: u32,
        key: fn(&FlowKey) -> u32,
    ) -> Result<Self, SchedulerError> {
        let candidates = eligible(candidates)?;
        let backends: Vec<MaglevBackend> = candidates
            .iter()
            .map(|c| MaglevBackend {
                address: c.address,
                weight: c.weight,
            })
            .collect();
        let table = MaglevTable::build(&backends, table_size)?;
        let digest = table.digest(&backends);
        Ok(MaglevScheduler {
            candidates,
            table,
            key,
            digest,
        })
    }

    /// The Maglev table; its entries index [`MaglevScheduler::candidates`].
    pub fn table(&self) -> &MaglevTable {
        &self.table
    }

    /// The candidates the table was built over (draining ones dropped), in the order
    /// given; entry `e` of [`MaglevScheduler::table`] is `candidates()[e]`.
    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }
}

impl Scheduler for MaglevScheduler {
    fn table_digest(&self) -> Option<TableDigest> {
        Some(self.digest)
    }

    fn pick(&self, flow: &FlowKey, tried: &[BackendId]) -> Option<BackendId> {
        let id_at = |slot: u32| self.candidates[self.table.entries()[slot as usize] as usize].id;
        let m = self.table.size();
        let start = (self.key)(flow) % m;
        let first = id_at(start);
        if !was_tried(tried, first) {
            return Some(first);
        }
        // Rare path (a failed connect): first make sure some candidate is left, so the walk
        // below cannot run the whole table for nothing.
        let untried = self.candidates.iter().find(|c| !was_tried(tried, c.id))?;
        for step in 1..m {
            let slot = start + step;
            let id = id_at(if slot >= m { slot - m } else { slot });
            if !was_tried(tried, id) {
                return Some(id);
            }
        }
        // Only candidates whose weight share is under one slot are left; they hold none.
        Some(untried.id)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn flows_spread_by_weight() {
        let weights = [1, 2, 3, 4];
        let s = MaglevScheduler::new(candidates(&weights), 65537).expect("valid set");
        let got = spread(&s, weights.len(), 40000);
        assert_share("maglev", &got, &weights, 0.05);
    }

    #[test]
    fn a_flow_always_gets_the_same_backend() {
        let s = MaglevScheduler::new(candidates(&[1, 1, 1]), 65537).expect("valid set");
        let other = MaglevScheduler::new(candidates(&[1, 1, 1]), 65537).expect("valid set");
        for port in 1..=200 {
            let f = flow(7, port);
            let first = s.pick(&f, &[]);
            assert_eq!(s.pick(&f, &[]), first, "flow {port} changed backend");
            assert_eq!(
                other.pick(&f, &[]),
                first,
                "another build disagrees on flow {port}"
            );
            let retry = s.pick(&f, &[first.expect("a candidate")]);
            assert_eq!(
                s.pick(&f, &[first.expect("a candidate")]),
                retry,
                "retry of flow {port} is not deterministic"
            );
        }
    }

    #[test]
    fn retries_skip_failed_backends() {
        let s = MaglevScheduler::new(candidates(&[5, 1, 2]), 65537).expect("valid set");
        assert_respects_tried("maglev", &s, 3);
        // Retries still spread: after each flow's first choice failed, the second choices
        // cover every other backend.
        let mut seen = std::collections::HashSet::new();
        for port in 1..=300 {
            let f = flow(2, port);
            let first = s.pick(&f, &[]).expect("a candidate");
            seen.insert((first, s.pick(&f, &[first]).expect("two candidates left")));
        }
        assert_eq!(
            seen.len(),
            6,
            "retries do not reach every other backend: {seen:?}"
        );
    }

    #[test]
    fn table_indexes_candidates() {
        let s = MaglevScheduler::new(candidates(&[1, 0, 1]), 13).expect("valid set");
        assert_eq!(s.table().size(), 13);
        assert_eq!(s.candidates().len(), 2, "draining candidate kept");
        assert!(s
            .table()
            .entries()
            .iter()
            .all(|&e| (e as usize) < s.candidates().len()));
    }

    #[test]
    fn a_candidate_without_slot_is_still_reached_on_retry() {
        // In a 3-slot table, weight 1 against 100 and 100 has a share of 0.015 slots: none.
        let s = MaglevScheduler::new(candidates(&[100, 1, 100]), 3).expect("valid set");
        assert!(!s.table().entries().contains(&1), "tiny share got a slot");
        assert_eq!(s.pick(&flow(1, 1), &[10, 12]), Some(11));
        assert_eq!(s.pick(&flow(1, 1), &[10, 11, 12]), None);
    }
}
