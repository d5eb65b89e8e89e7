//! The `least_conn` scheduler: the backend with the fewest active connections relative
//! to its weight.

use lb_common::FlowKey;

use super::{eligible, less_loaded, was_tried, Candidate, Scheduler, SchedulerError, Turn};
use crate::backend_stats::BackendId;

/// Picks the candidate with the smallest `active / weight`, where `active` is its open
/// connections or sessions ([`crate::backend_stats::BackendStats::active`]).
///
/// Loads are compared cross-multiplied (`a.active * b.weight` against
/// `b.active * a.weight`), exact in integers. Among equally loaded candidates the scan
/// starts at a rotating position (the service's [`Turn`], kept across rebuilds), so with
/// equal loads picks spread evenly instead of piling onto the first, also on a quiet service
/// whose scheduler is rebuilt often (a slow-start ramp). Each pick scans all N candidates:
/// O(N).
pub struct LeastConn {
    candidates: Vec<Candidate>,
    start: Turn,
}

impl LeastConn {
    /// A least-connections scheduler over `candidates` (weight 0 dropped), its scans
    /// starting at the turns of `start`.
    ///
    /// Returns `Err(SchedulerError::NoCandidates)` when no candidate has a weight above 0.
    pub fn new(candidates: Vec<Candidate>, start: Turn) -> Result<Self, SchedulerError> {
        Ok(LeastConn {
            candidates: eligible(candidates)?,
            start,
        })
    }
}

impl Scheduler for LeastConn {
    fn pick(&self, _flow: &FlowKey, tried: &[BackendId]) -> Option<BackendId> {
        let n = self.candidates.len();
        let start = self.start.next() % n;
        let mut best: Option<&Candidate> = None;
        for i in 0..n {
            let c = &self.candidates[(start + i) % n];
            if was_tried(tried, c.id) {
                continue;
            }
            // Strictly less: the first of equals, counted from the rotating start, wins.
            if best.is_none_or(|b| less_loaded(c, b)) {
                best = Some(c);
            }
        }
        best.map(|c| c.id)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn picks_the_least_loaded_per_weight() {
        let set = candidates(&[1, 4, 1]);
        // active/weight: 2/1, 5/4, 2/1; backend 11 is the least loaded though it has most.
        for (c, active) in set.iter().zip([2u64, 5, 2]) {
            c.stats
                .active
                .store(active, std::sync::atomic::Ordering::Relaxed);
        }
        let s = LeastConn::new(set, Turn::default()).expect("valid set");
        for port in 1..=10 {
            assert_eq!(
                s.pick(&flow(1, port), &[]),
                Some(11),
                "a new flow did not go to the backend with the fewest connections per weight"
            );
        }
        // With 11 failed, 10 and 12 tie; the rotating start shares the retries between
        // them (a third to two thirds each, as the start skips over the failed one).
        let retries: Vec<_> = (1..=30)
            .filter_map(|p| s.pick(&flow(1, p), &[11]))
            .collect();
        for id in [10, 12] {
            let n = retries.iter().filter(|&&r| r == id).count();
            assert!(n >= 10, "backend {id} got {n} of 30 retries between equals");
        }
    }

    #[test]
    fn equal_loads_spread_evenly() {
        let s = LeastConn::new(candidates(&[3, 3, 3]), Turn::default()).expect("valid set");
        assert_eq!(spread(&s, 3, 3000), vec![1000, 1000, 1000]);
    }

    #[test]
    fn held_connections_follow_weights() {
        // Connections that stay open: after 600 picks the open counts match the weights.
        let weights = [1, 2, 3];
        let set = candidates(&weights);
        let s = LeastConn::new(set.clone(), Turn::default()).expect("valid set");
        for port in 1..=600 {
            let id = s.pick(&flow(1, port), &[]).expect("a candidate");
            set[id - 10].stats.opened();
        }
        let active: Vec<u64> = set.iter().map(|c| c.stats.active()).collect();
        assert_eq!(
            active,
            vec![100, 200, 300],
            "open connections do not follow weights"
        );
    }

    #[test]
    fn retries_skip_failed_backends() {
        let s = LeastConn::new(candidates(&[1, 2, 3]), Turn::default()).expect("valid set");
        assert_respects_tried("least_conn", &s, 3);
    }
}
