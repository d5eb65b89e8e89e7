//! The kernel's run-time statistics of lb's programs in traffic: how long they ran and how
//! many times, read before and after a test to give its CPU time in the program and its cost
//! per run (per packet at XDP, per socket buffer at tc, where a GSO super-packet is one run).
//!
//! The kernel counts only while statistics are enabled ([`StatsOn`], held by the harness for
//! a path's cost round only).

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;

/// The kernel's BPF run-time statistics, on while this is held (`BPF_ENABLE_STATS`: the
/// kernel counts the holders and turns the statistics off when the last one goes).
///
/// They cost every run of every program two reads of the scheduler clock, which no user's
/// host pays (`kernel.bpf_stats_enabled` is 0 by default): on this KVM guest
/// `kvm_sched_clock_read` had 0.6% of all samples in a profile of `lb-tc-dsr-bridge`, where
/// `lb_tc`'s own code had 1.4% (BENCHMARKS.md). So the harness holds them only while it
/// measures a path's costs, apart from the rounds that give its rates and latencies.
pub struct StatsOn {
    _fd: OwnedFd,
}

impl StatsOn {
    /// Turns the statistics on. `Err(reason)` when the kernel refuses (no root, too old).
    pub fn enable() -> Result<StatsOn, String> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(|fd| StatsOn { _fd: fd })
            .map_err(|e| format!("BPF run-time statistics cannot be enabled: {e}"))
    }
}

/// The summed `run_time_ns` and `run_cnt` of a set of programs at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProgramTime {
    /// Seconds the programs have run since they were loaded (while statistics were on).
    pub seconds: f64,
    /// Runs counted over the same time.
    pub runs: u64,
}

impl ProgramTime {
    /// The programs with ids in `ids`, as the kernel counts them now. Programs that are gone
    /// add nothing.
    pub fn of(ids: &BTreeSet<u32>) -> ProgramTime {
        let mut total = ProgramTime::default();
        for info in aya::programs::loaded_programs().flatten() {
            if ids.contains(&info.id()) {
                total.seconds += info.run_time().as_secs_f64();
                total.runs += info.run_count();
            }
        }
        total
    }

    /// Nanoseconds per run between `earlier` and `self`; `None` when nothing ran.
    pub fn ns_per_run_since(self, earlier: ProgramTime) -> Option<f64> {
        let runs = self.runs.checked_sub(earlier.runs).filter(|&n| n > 0)?;
        Some((self.seconds - earlier.seconds) * 1e9 / runs as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_per_run_is_the_time_over_the_runs_between_two_readings() {
        let a = ProgramTime {
            seconds: 1.0,
            runs: 1_000,
        };
        let b = ProgramTime {
            seconds: 1.5,
            runs: 1_001_000,
        };
        let ns = b.ns_per_run_since(a).expect("runs happened");
        assert!((ns - 500.0).abs() < 1e-6, "{ns}");
        assert_eq!(a.ns_per_run_since(a), None, "no run, no figure");
        assert_eq!(
            a.ns_per_run_since(b),
            None,
            "a reading from before, no figure"
        );
    }
}
