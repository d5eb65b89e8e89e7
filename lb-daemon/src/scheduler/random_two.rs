//! The `random_two` scheduler: the power of two random choices, weighted.

use lb_common::FlowKey;

use super::{eligible, less_loaded, was_tried, Candidate, Scheduler, SchedulerError};
use crate::backend_stats::BackendId;

/// Draws two distinct candidates at random, each with probability proportional to its
/// weight, and picks the one with fewer active connections per unit of weight (the first
/// drawn on a tie). Mitzenmacher's "power of two choices": nearly the balance of
/// `least_conn` without scanning every backend or sharing a counter.
///
/// Draws use `fastrand`'s per-thread generator. A pick costs O(log N) (binary search in
/// the cumulative weights); a retry (some candidates tried) costs O(N).
pub struct RandomTwo {
    candidates: Vec<Candidate>,
    /// `cumulative[i]` = sum of the weights of candidates `0..=i`.
    cumulative: Vec<u64>,
}

impl RandomTwo {
    /// A power-of-two-choices scheduler over `candidates` (weight 0 dropped).
    ///
    /// Returns `Err(SchedulerError::NoCandidates)` when no candidate has a weight above 0.
    pub fn new(candidates: Vec<Candidate>) -> Result<Self, SchedulerError> {
        let candidates = eligible(candidates)?;
        let cumulative = candidates
            .iter()
            .scan(0u64, |sum, c| {
                *sum += u64::from(c.weight);
                Some(*sum)
            })
            .collect();
        Ok(RandomTwo {
            candidates,
            cumulative,
        })
    }

    /// The candidate whose weight range holds `r`, with `r < total weight`.
    fn at(&self, r: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= r)
    }

    /// The winner of two distinct weighted draws over all candidates.
    fn pick_untried(&self) -> &Candidate {
        let n = self.candidates.len();
        if n == 1 {
            return &self.candidates[0];
        }
        let total = self.cumulative[n - 1];
        let a = self.at(fastrand::u64(..total));
        // Draw the second from the weight outside `a`'s range, then step over that range.
        let wa = u64::from(self.candidates[a].weight);
        let a_start = self.cumulative[a] - wa;
        let mut r = fastrand::u64(..total - wa);
        if r >= a_start {
            r += wa;
        }
        let b = self.at(r);
        self.better(a, b)
    }

    /// The winner of two distinct weighted draws over the candidates not in `tried`.
    fn pick_among(&self, tried: &[BackendId]) -> Option<&Candidate> {
        let left: Vec<usize> = (0..self.candidates.len())
            .filter(|&i| !was_tried(tried, self.candidates[i].id))
            .collect();
        let draw = |skip: Option<usize>| -> Option<usize> {
            let weight = |i: usize| u64::from(self.candidates[i].weight);
            let pool = || left.iter().copied().filter(|&i| Some(i) != skip);
            let total: u64 = pool().map(weight).sum();
            if total == 0 {
                return None;
            }
            let mut r = fastrand::u64(..total);
            pool().find(|&i| {
                if r < weight(i) {
                    true
                } else {
                    r -= weight(i);
                    false
                }
            })
        };
        let a = draw(None)?;
        Some(match draw(Some(a)) {
            Some(b) => self.better(a, b),
            None => &self.candidates[a],
        })
    }

    fn better(&self, a: usize, b: usize) -> &Candidate {
        let (a, b) = (&self.candidates[a], &self.candidates[b]);
        if less_loaded(b, a) {
            b
        } else {
            a
        }
    }
}

impl Scheduler for RandomTwo {
    fn pick(&self, _flow: &FlowKey, tried: &[BackendId]) -> Option<BackendId> {
        if tried.is_empty() {
            Some(self.pick_untried().id)
        } else {
            self.pick_among(tried).map(|c| c.id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn idle_backends_are_drawn_by_weight() {
        // No connection stays open, so every pair ties and the first draw wins: picks
        // follow the weights.
        fastrand::seed(11);
        let weights = [1, 2, 3, 4];
        let s = RandomTwo::new(candidates(&weights)).expect("valid set");
        let got = spread(&s, weights.len(), 50000);
        assert_share("random_two", &got, &weights, 0.05);
    }

    #[test]
    fn held_connections_follow_weights() {
        fastrand::seed(12);
        let weights = [1, 2, 3];
        let set = candidates(&weights);
        let s = RandomTwo::new(set.clone()).expect("valid set");
        for port in 1..=6000 {
            let id = s.pick(&flow(1, port), &[]).expect("a candidate");
            set[id - 10].stats.opened();
        }
        let active: Vec<u64> = set.iter().map(|c| c.stats.active()).collect();
        assert_share("random_two with open connections", &active, &weights, 0.02);
    }

    #[test]
    fn the_two_draws_are_distinct() {
        // Two equal backends: if both draws are always different, the less loaded one
        // always wins, so open connections never differ by more than one.
        fastrand::seed(13);
        let set = candidates(&[7, 7]);
        let s = RandomTwo::new(set.clone()).expect("valid set");
        for port in 1..=2000 {
            let id = s.pick(&flow(1, port), &[]).expect("a candidate");
            set[id - 10].stats.opened();
            let (a, b) = (set[0].stats.active(), set[1].stats.active());
            assert!(a.abs_diff(b) <= 1, "after {port} flows: {a} and {b} open");
        }
    }

    #[test]
    fn retries_skip_failed_backends() {
        fastrand::seed(14);
        let s = RandomTwo::new(candidates(&[1, 2, 3, 4])).expect("valid set");
        assert_respects_tried("random_two", &s, 4);
        // Retries still draw by weight among what is left.
        let mut got = [0u64; 4];
        for port in 1..=20000 {
            got[s.pick(&flow(1, port), &[13]).expect("three left") - 10] += 1;
        }
        assert_eq!(got[3], 0, "a failed backend was picked again");
        assert_share("random_two retries", &got[..3], &[1, 2, 3], 0.05);
    }
}
