//! Counting: the global `STATS` by [`Stat`], and per-service / per-backend [`Counters`].
//!
//! All per-CPU, so the fast path adds without atomics; the daemon sums the CPUs' slots.

use lb_common::{Counters, Stat};

use crate::maps::{BACKEND_STATS, SERVICE_STATS, STATS};

/// Adds one to `stat` on this CPU.
#[inline(always)]
pub fn increment(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the pointer is this CPU's slot of a live map entry, and BPF programs do not
        // preempt each other on one CPU, so nothing else writes it during the add.
        unsafe { *counter += 1 };
    }
}

/// Counts one forwarded packet of `bytes` (the frame as it arrived) for `service` and
/// `backend`, and a new flow on both when `new_flow`.
#[inline(always)]
pub fn forwarded(service: u32, backend: u32, bytes: u64, new_flow: bool) {
    let new = new_flow as u64;
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service) {
        // SAFETY: as in `increment`: this CPU's slot, no concurrent writer.
        unsafe { add(c, bytes, new) };
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: as above.
        unsafe { add(c, bytes, new) };
    }
}

#[inline(always)]
unsafe fn add(c: *mut Counters, bytes: u64, new: u64) {
    unsafe {
        (*c).packets += 1;
        (*c).bytes += bytes;
        (*c).new_flows += new;
    }
}
