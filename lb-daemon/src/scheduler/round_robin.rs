//! The `round_robin` scheduler: each backend in turn, ignoring weights.

use lb_common::FlowKey;

use super::{eligible, was_tried, Candidate, Scheduler, SchedulerError, Turn};
use crate::backend_stats::BackendId;

/// Hands new flows to the candidates in turn, whatever their weights.
///
/// One shared atomic counter picks the turn, so picks from any number of threads are
/// exactly even: over `k * N` picks with no retries, each of the N candidates gets `k`.
/// The counter is the service's ([`Turn`]): a rebuilt scheduler goes on from the last
/// turn, not from the first candidate.
/// A retry takes the next candidate in order that the flow has not tried.
pub struct RoundRobin {
    candidates: Vec<Candidate>,
    turn: Turn,
}

impl RoundRobin {
    /// A round robin over `candidates` (weight 0 dropped), taking its turns from `turn`: a
    /// new counter starts with the first candidate.
    ///
    /// Returns `Err(SchedulerError::NoCandidates)` when no candidate has a weight above 0.
    pub fn new(candidates: Vec<Candidate>, turn: Turn) -> Result<Self, SchedulerError> {
        Ok(RoundRobin {
            candidates: eligible(candidates)?,
            turn,
        })
    }
}

impl Scheduler for RoundRobin {
    fn pick(&self, _flow: &FlowKey, tried: &[BackendId]) -> Option<BackendId> {
        let n = self.candidates.len();
        let start = self.turn.next() % n;
        (0..n)
            .map(|i| &self.candidates[(start + i) % n])
            .find(|c| !was_tried(tried, c.id))
            .map(|c| c.id)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn picks_are_exactly_even_across_threads() {
        // Weights differ, but round robin ignores them.
        let s = RoundRobin::new(candidates(&[1, 5, 10]), Turn::default()).expect("valid set");
        let per_thread: Vec<Vec<u64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let s = &s;
                    scope.spawn(move || spread(s, 3, 3000 + t))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("picking thread panicked"))
                .collect()
        });
        // 3000 + 3001 + 3002 + 3003 = 12006 picks: exactly 4002 each.
        let mut got = [0u64; 3];
        for counts in per_thread {
            for (g, c) in got.iter_mut().zip(counts) {
                *g += c;
            }
        }
        assert_eq!(
            got,
            [4002, 4002, 4002],
            "round robin is uneven across threads"
        );
    }

    #[test]
    fn retries_skip_failed_backends() {
        let s = RoundRobin::new(candidates(&[1, 1, 1, 1]), Turn::default()).expect("valid set");
        assert_respects_tried("round_robin", &s, 4);
        assert_eq!(s.pick(&flow(1, 1), &[10, 11, 13]), Some(12));
    }
}
