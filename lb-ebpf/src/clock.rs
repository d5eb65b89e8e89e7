//! The balancing path's clock, read once per packet.
//!
//! `CLOCK_MONOTONIC_COARSE` (`bpf_ktime_get_coarse_ns`): the monotonic clock as of the last
//! timer tick, never ahead of `CLOCK_MONOTONIC` and at most one tick behind it (4 ms at
//! `HZ=250`). Everything the balancing path times is coarser than that: conntrack and
//! NAT reverse entries keep whole seconds, the next-hop cache answers for 100 ms. The fine
//! clock (`bpf_ktime_get_ns`) reads the TSC, which on a VM cost about 25 ns per packet, a
//! tenth of an established flow's warm cost (BENCHMARKS.md, "Program cost, warm").
//!
//! Every writer and reader of those times uses this clock, lb-daemon included (it ages
//! entries with `CLOCK_MONOTONIC_COARSE`). A time an older lb-ebpf stamped with the fine
//! clock, while both programs share the maps during an upgrade, can lie up to a tick ahead
//! of a coarse "now"; ages are taken with `lb_common::maps::ct_age`, which reads such a time
//! as just now instead of wrapping it into years. The per-client rate limits
//! (`limits.rs`) and the ICMP rate (`too_big.rs`) keep the fine clock: their times are their
//! own, compared with nothing else, and they run per new flow, not per packet.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

/// Nanoseconds of `CLOCK_MONOTONIC_COARSE` (see the module docs).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}
