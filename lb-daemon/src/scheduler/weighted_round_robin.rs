//! The `weighted_round_robin` scheduler: nginx's smooth weighted round robin, precomputed.

use std::collections::BTreeMap;

use lb_common::FlowKey;

use super::{eligible, was_tried, Candidate, Scheduler, SchedulerError, Turn};
use crate::backend_stats::BackendId;
use crate::config::MAX_WEIGHT;
use crate::service::WEIGHT_SCALE;

/// Hands new flows to each candidate as often as its weight, interleaved smoothly: nginx's
/// smooth weighted round robin (nginx commit 52327e0627f4, `ngx_http_upstream_round_robin.c`).
///
/// The whole cycle is computed when the scheduler is built: S = sum(weights) / gcd(weights)
/// turns, in which candidate i appears exactly `weight_i / gcd` times; weights 5, 1, 1
/// give `a a b a c a a`. A pick reads the turn at an atomic counter modulo S, so it is
/// lock-free and, with no retries, exact: over `k * S` picks from any threads, candidate i
/// gets `k * weight_i / gcd`. The counter is the service's ([`Turn`]): a rebuilt scheduler
/// goes on from the last turn, not from the start of its cycle. A retry walks forward through the cycle to the first
/// candidate the flow has not tried.
///
/// Weights count in sixteenths ([`WEIGHT_SCALE`]); above [`MAX_WEIGHT`] × 16 they are
/// treated as that. The 16 cancel out in the gcd while no backend ramps under slow start;
/// a ramp can make the cycle up to 16 times longer, so a cycle past [`MAX_CYCLE`] turns is
/// built from the weights divided down together (each at least 1): shares then hold to
/// within about one turn in `MAX_CYCLE / 2N`, and a weight divided below 1 (a ramp's first
/// steps) gets more than its share. Building costs O(S × D) time, D the number of
/// distinct weights, and 4·S bytes: at most about 1 MiB.
pub struct WeightedRoundRobin {
    candidates: Vec<Candidate>,
    /// Indexes into `candidates`, one per turn of the cycle.
    cycle: Vec<u32>,
    turn: Turn,
}

impl WeightedRoundRobin {
    /// A smooth weighted round robin over `candidates` (weight 0 dropped), taking its turns
    /// from `turn` (modulo the cycle's length): a new counter starts at the cycle's start.
    ///
    /// Returns `Err(SchedulerError::NoCandidates)` when no candidate has a weight above 0.
    pub fn new(candidates: Vec<Candidate>, turn: Turn) -> Result<Self, SchedulerError> {
        let candidates = eligible(candidates)?;
        let weights: Vec<u32> = candidates
            .iter()
            .map(|c| c.weight.min(MAX_WEIGHT * WEIGHT_SCALE))
            .collect();
        Ok(WeightedRoundRobin {
            cycle: smooth_cycle(&bounded(weights)),
            candidates,
            turn,
        })
    }

    /// The precomputed cycle: indexes into the candidates given to
    /// [`WeightedRoundRobin::new`] (draining ones dropped), one per turn.
    pub fn cycle(&self) -> &[u32] {
        &self.cycle
    }
}

impl Scheduler for WeightedRoundRobin {
    fn pick(&self, _flow: &FlowKey, tried: &[BackendId]) -> Option<BackendId> {
        let len = self.cycle.len();
        let start = self.turn.next() % len;
        let id_at = |turn: usize| self.candidates[self.cycle[turn] as usize].id;
        let first = id_at(start);
        if !was_tried(tried, first) {
            return Some(first);
        }
        // Every candidate appears in the cycle, so the walk finds one if any is untried.
        self.candidates.iter().find(|c| !was_tried(tried, c.id))?;
        (1..len)
            .map(|step| id_at((start + step) % len))
            .find(|&id| !was_tried(tried, id))
    }
}

/// Candidates that share a weight, in index order.
struct Group {
    weight: u64,
    members: Vec<u32>,
    /// Turns the group has had so far.
    picks: u64,
}

/// One cycle of nginx's smooth weighted round robin over `weights` (all > 0).
///
/// nginx, at each turn t: every candidate's `current += weight`; the largest `current`
/// wins (the first in order on ties) and loses `total`. So after t turns a candidate's
/// `current` is `t * w - total * p`, with p its wins so far. Candidates of equal weight
/// therefore win in index order, one after the other; only the group's next member can be
/// the group's best. So each turn compares one candidate per distinct weight, not all N.
fn smooth_cycle(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().fold(0, |a, &w| gcd(a, w));
    let mut by_weight: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (i, &w) in weights.iter().enumerate() {
        // Indexes fit u32: MAX_WEIGHT bounds weights, memory bounds the slice.
        by_weight.entry(w / g).or_default().push(i as u32);
    }
    let mut groups: Vec<Group> = by_weight
        .into_iter()
        .map(|(weight, members)| Group {
            weight: u64::from(weight),
            members,
            picks: 0,
        })
        .collect();
    let total: u64 = weights.iter().map(|&w| u64::from(w / g)).sum();
    let mut cycle = Vec::with_capacity(total as usize);
    for t in 1..=total {
        let mut best: Option<(i128, u32, usize)> = None;
        for (gi, group) in groups.iter().enumerate() {
            let n = group.members.len() as u64;
            let member = group.members[(group.picks % n) as usize];
            let wins = group.picks / n;
            let current = i128::from(t * group.weight) - i128::from(total) * i128::from(wins);
            let better = match best {
                None => true,
                Some((c, m, _)) => current > c || (current == c && member < m),
            };
            if better {
                best = Some((current, member, gi));
            }
        }
        let (_, member, gi) = best.expect("there is at least one group");
        groups[gi].picks += 1;
        cycle.push(member);
    }
    cycle
}

/// The most turns a cycle has, before the candidates' own count: that of 1000 candidates at
/// the largest configured weight, as before weights counted in sixteenths.
const MAX_CYCLE: u64 = 1000 * MAX_WEIGHT as u64;

/// `weights` (all > 0), divided down together when their cycle (their sum over their gcd)
/// would pass [`MAX_CYCLE`]: each by the same factor, rounded down, at least 1.
fn bounded(weights: Vec<u32>) -> Vec<u32> {
    let g = weights.iter().fold(0, |a, &w| gcd(a, w)).max(1);
    let turns: u64 = weights.iter().map(|&w| u64::from(w / g)).sum();
    if turns <= MAX_CYCLE {
        return weights;
    }
    let factor = turns.div_ceil(MAX_CYCLE);
    // Each quotient is at most a weight, so it fits u32.
    (weights.iter())
        .map(|&w| (u64::from(w / g) / factor).max(1) as u32)
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    /// nginx's loop as written: O(N) per turn, the reference for `smooth_cycle`.
    fn nginx_cycle(weights: &[u32]) -> Vec<u32> {
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        let mut current = vec![0i64; weights.len()];
        let mut out = Vec::new();
        for _ in 0..total {
            let mut best = 0;
            for i in 0..weights.len() {
                current[i] += i64::from(weights[i]);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            out.push(best as u32);
        }
        out
    }

    #[test]
    fn cycle_is_nginx_smooth_round_robin() {
        // nginx's own example: weights 5, 1, 1 give a a b a c a a.
        assert_eq!(smooth_cycle(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        let mut rng = fastrand::Rng::with_seed(5);
        for round in 0..40 {
            let n = rng.usize(1..=12);
            let weights: Vec<u32> = (0..n).map(|_| rng.u32(1..=20)).collect();
            let g = weights.iter().fold(0, |a, &w| gcd(a, w));
            let reduced: Vec<u32> = weights.iter().map(|&w| w / g).collect();
            assert_eq!(
                smooth_cycle(&weights),
                nginx_cycle(&reduced),
                "round {round}: weights {weights:?} are not interleaved as nginx does"
            );
        }
    }

    /// Weights in sixteenths keep their ratios (1 : 100 configured is 16 : 1600, not capped
    /// at 256), and a ramp among many large weights keeps the cycle bounded.
    #[test]
    fn scaled_weights_keep_their_shares_and_a_ramp_keeps_the_cycle_bounded() {
        let s = WeightedRoundRobin::new(candidates(&[16, 1600]), Turn::default()).expect("valid");
        let count = |s: &WeightedRoundRobin, i: u32| s.cycle().iter().filter(|&&c| c == i).count();
        assert_eq!(
            (count(&s, 0), count(&s, 1)),
            (1, 100),
            "1 : 100 as configured"
        );
        // 199 at the largest weight and one ramping: 815,105 turns unbounded.
        let mut weights = vec![MAX_WEIGHT * WEIGHT_SCALE; 200];
        weights[0] = 1;
        let s = WeightedRoundRobin::new(candidates(&weights), Turn::default()).expect("valid");
        assert!(
            s.cycle().len() as u64 <= MAX_CYCLE + 200,
            "a cycle of {} turns",
            s.cycle().len()
        );
        assert_eq!(count(&s, 0), 1, "the ramping candidate keeps a turn");
        let (a, b) = (count(&s, 1), count(&s, 199));
        assert_eq!(a, b, "equal weights keep equal shares");
    }

    #[test]
    fn weight_shares_are_exact_across_threads() {
        let weights = [4, 2, 6, 2];
        let s = WeightedRoundRobin::new(candidates(&weights), Turn::default()).expect("valid set");
        // gcd 2: the cycle is 2 + 1 + 3 + 1 = 7 turns.
        assert_eq!(s.cycle().len(), 7);
        let per_thread: Vec<Vec<u64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3)
                .map(|_| {
                    let s = &s;
                    scope.spawn(move || spread(s, 4, 7000))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("picking thread panicked"))
                .collect()
        });
        let mut got = [0u64; 4];
        for counts in per_thread {
            for (g, c) in got.iter_mut().zip(counts) {
                *g += c;
            }
        }
        // 21000 picks = 3000 cycles.
        assert_eq!(
            got,
            [6000, 3000, 9000, 3000],
            "picks do not follow the weights exactly"
        );
    }

    #[test]
    fn a_cycle_of_1000_candidates_holds_each_weight_times() {
        let mut rng = fastrand::Rng::with_seed(8);
        let weights: Vec<u32> = (0..1000).map(|_| rng.u32(1..=256)).collect();
        let s =
            WeightedRoundRobin::new(candidates_many(&weights), Turn::default()).expect("valid set");
        let mut got = vec![0u32; weights.len()];
        for &i in s.cycle() {
            got[i as usize] += 1;
        }
        assert_eq!(
            got, weights,
            "a cycle does not hold each candidate weight times"
        );
    }

    /// Like `candidates`, for more than 255 backends.
    fn candidates_many(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Candidate {
                id: 10 + i,
                address: std::net::SocketAddr::from(([127, 0, (i >> 8) as u8, i as u8], 9000)),
                weight,
                stats: Default::default(),
            })
            .collect()
    }

    #[test]
    fn retries_skip_failed_backends() {
        let s =
            WeightedRoundRobin::new(candidates(&[5, 1, 1]), Turn::default()).expect("valid set");
        assert_respects_tried("weighted_round_robin", &s, 3);
    }
}
