//! Counting which backend answered, and checking the shares against what the weights say.

use std::collections::BTreeMap;
use std::fmt;

/// How many answers came from each backend (by name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    counts: BTreeMap<String, u64>,
}

impl Tally {
    /// An empty tally.
    pub fn new() -> Tally {
        Tally::default()
    }

    /// Counts one answer from `backend`.
    pub fn add(&mut self, backend: &str) {
        *self.counts.entry(backend.to_string()).or_default() += 1;
    }

    /// Adds another tally's counts.
    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.counts {
            *self.counts.entry(k.clone()).or_default() += v;
        }
    }

    /// Answers from `backend`.
    pub fn get(&self, backend: &str) -> u64 {
        self.counts.get(backend).copied().unwrap_or(0)
    }

    /// All answers.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// `(backend, count)` in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.counts.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Checks that each backend's share of the total is within `tolerance` (a fraction: 0.01
    /// = one percentage point) of `weight / sum of weights`, and that no other backend
    /// answered. `what` names the run in the message, e.g. "round_robin".
    ///
    /// Returns `Err(message)` in a user's words, listing every backend that is off.
    pub fn check_shares(
        &self,
        expected: &[(&str, u32)],
        tolerance: f64,
        what: &str,
    ) -> Result<(), String> {
        let total = self.total();
        let weight_sum: u32 = expected.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return Err(format!("{what}: no connection was answered at all"));
        }
        let mut problems = Vec::new();
        for (name, count) in self.iter() {
            if !expected.iter().any(|(n, _)| *n == name) {
                problems.push(format!(
                    "{name} answered {count} but is not a backend of this service"
                ));
            }
        }
        for (name, weight) in expected {
            let want = f64::from(*weight) / f64::from(weight_sum.max(1));
            let got = self.get(name) as f64 / total as f64;
            if *weight == 0 && self.get(name) > 0 {
                problems.push(format!(
                    "{name} (weight 0, draining) got {} new connections; it should get none",
                    self.get(name)
                ));
            } else if (got - want).abs() > tolerance {
                problems.push(format!(
                    "{name} (weight {weight}) got {:.1}% of the connections, expected {:.1}% ± {:.1}%",
                    got * 100.0,
                    want * 100.0,
                    tolerance * 100.0
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{what} over {total} connections ({self}): {}",
                problems.join("; ")
            ))
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        write!(f, "{}", parts.join(", "))
    }
}

/// A plain-text table of several tallies side by side: one row per backend in `backends`
/// order, one column per `(heading, tally)`, counts with their percentage.
pub fn render_table(backends: &[&str], columns: &[(&str, &Tally)]) -> String {
    let name_w = backends.iter().map(|b| b.len()).max().unwrap_or(7).max(7);
    let col_w = columns
        .iter()
        .map(|(h, _)| h.len())
        .max()
        .unwrap_or(0)
        .max(14);
    let mut out = format!("{:<name_w$}", "backend");
    for (h, _) in columns {
        out.push_str(&format!("  {h:>col_w$}"));
    }
    out.push('\n');
    let rows = backends
        .iter()
        .copied()
        .chain(std::iter::once("(failed)"))
        .collect::<Vec<_>>();
    for b in rows {
        if b == "(failed)" && columns.iter().all(|(_, t)| t.get(b) == 0) {
            continue;
        }
        out.push_str(&format!("{b:<name_w$}"));
        for (_, t) in columns {
            let n = t.get(b);
            let pct = if t.total() == 0 {
                0.0
            } else {
                n as f64 * 100.0 / t.total() as f64
            };
            out.push_str(&format!("  {:>col_w$}", format!("{n} ({pct:.0}%)")));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(counts: &[(&str, u64)]) -> Tally {
        let mut t = Tally::new();
        for (n, c) in counts {
            for _ in 0..*c {
                t.add(n);
            }
        }
        t
    }

    #[test]
    fn shares_within_tolerance_pass_and_outside_fail() {
        let t = tally(&[("b1", 500), ("b2", 1000), ("b3", 1500)]);
        assert!(t
            .check_shares(&[("b1", 1), ("b2", 2), ("b3", 3)], 0.01, "wrr")
            .is_ok());
        let err = t
            .check_shares(&[("b1", 1), ("b2", 1), ("b3", 1)], 0.05, "rr")
            .expect_err("a 1:2:3 split passed as even");
        assert!(err.contains("b1 (weight 1) got 16.7%"), "{err}");
        assert!(err.contains("b3 (weight 1) got 50.0%"), "{err}");
    }

    #[test]
    fn an_unexpected_or_zero_weight_backend_fails() {
        let t = tally(&[("b1", 10), ("b2", 10), ("b3", 1)]);
        let err = t
            .check_shares(&[("b1", 1), ("b2", 1), ("b3", 0)], 0.05, "maglev")
            .expect_err("weight 0 with answers passed");
        assert!(
            err.contains("b3 (weight 0, draining) got 1 new connections"),
            "{err}"
        );
        let err = t
            .check_shares(&[("b1", 1), ("b2", 1)], 0.5, "maglev")
            .expect_err("an unknown backend passed");
        assert!(err.contains("b3 answered 1 but is not a backend"), "{err}");
    }

    #[test]
    fn table_lists_every_backend() {
        let a = tally(&[("web-1", 2), ("web-2", 2)]);
        let b = tally(&[("web-1", 4)]);
        let s = render_table(&["web-1", "web-2"], &[("before", &a), ("after", &b)]);
        assert!(s.contains("web-2"), "{s}");
        assert!(s.contains("4 (100%)"), "{s}");
    }
}
