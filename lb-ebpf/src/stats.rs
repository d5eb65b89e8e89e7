//! Packet counters: one per-CPU array map, `STATS`, indexed by [`Stat`].
//!
//! Per-CPU so the fast path increments without atomics; the daemon sums the CPUs' slots when it
//! reads a counter.

use aya_ebpf::{macros::map, maps::PerCpuArray};

/// The counters `STATS` holds, by index. Values are `u64` counts since the program was loaded.
// The daemon reads these indexes too: they move to lb-common with the first counter it shows.
#[repr(u32)]
#[derive(Clone, Copy)]
pub enum Stat {
    /// Packets the XDP program saw, whatever it did with them.
    Packets = 0,
}

/// Number of entries in `STATS`: one past the highest [`Stat`].
pub const STATS_LEN: u32 = 1;

/// Per-CPU `u64` counters indexed by [`Stat`].
#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// Adds one to `stat` on this CPU.
#[inline(always)]
pub fn increment(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the pointer is this CPU's slot of a live map entry, and BPF programs do not
        // preempt each other on one CPU, so nothing else writes it during the add.
        unsafe { *counter += 1 };
    }
}
