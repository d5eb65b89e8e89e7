//! Per-client limits on new flows (nginx's `limit_req` and `limit_conn`, per service): a token
//! bucket of new flows per client address, and a count of its open TCP flows. The behaviour,
//! the races and their bounds are documented with the map contract (`lb_common::maps`,
//! "Per-client limits"); this module only implements it.
//!
//! Called for flows a client starts (see `conntrack::Placement::fresh`), for the first FIN
//! or RST of a tracked TCP flow, when an aged conntrack entry is replaced or met again, and
//! when a draining backend's entry is reused. Nothing here runs for the other packets of a
//! flow.

use core::intrinsics::{atomic_and, atomic_or, atomic_xadd, atomic_xsub, AtomicOrdering::Relaxed};

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    flow::IPPROTO_TCP,
    maps::{ct_age, ClientKey, ClientState, CtEntry, CT_F_CLOSED, CT_F_COUNTED},
    FlowKey, Stat,
};

use crate::maps::{CLIENTS, CONNTRACK, LIMITS};

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// Decides whether the client of `key` may start a flow of service `service_id`. `Ok` holds
/// the conntrack flags the admitted flow starts with ([`CT_F_COUNTED`] when it took one of
/// the client's connection slots); `Err` is the refusal counter.
///
/// The connection limit is checked before the bucket, so a client refused for its
/// connections keeps its tokens (as in the proxy). When `CLIENTS` cannot give the client an
/// entry (no memory) the flow is admitted: the limits never refuse for want of state.
#[inline(always)]
pub fn admit(key: &FlowKey, service_id: u32) -> Result<u16, Stat> {
    let Some(limits) = LIMITS.get(service_id) else {
        return Ok(0);
    };
    let interval = limits.interval_ns;
    let max = if key.protocol == IPPROTO_TCP {
        limits.max_connections
    } else {
        0
    };
    if interval == 0 && max == 0 {
        return Ok(0);
    }
    let Some(state) = client(service_id, &key.src_addr) else {
        return Ok(0);
    };
    // SAFETY: `state` points into a live map value; the fields are read and written one by
    // one (the races this allows are the documented ones), `connections` only atomically.
    unsafe {
        let connections = &raw mut (*state).connections;
        // Read as signed: two CPUs releasing this client's last slot at once can both pass
        // `release`'s check and wrap the count to u64::MAX, which must read as -1 (admit;
        // the next admission brings it back to 0), not as a count far over any limit.
        if max != 0 && (connections.read_volatile() as i64) >= i64::from(max) {
            return Err(Stat::RefusedClientConnections);
        }
        if interval != 0 {
            let now = bpf_ktime_get_ns();
            let full_at = (*state).full_at_ns;
            let next = if full_at > now { full_at } else { now } + interval;
            if next - now > limits.burst_ns {
                return Err(Stat::RefusedClientRate);
            }
            (*state).full_at_ns = next;
        }
        if max != 0 {
            atomic_xadd::<u64, u64, { Relaxed }>(connections, 1);
            return Ok(CT_F_COUNTED);
        }
    }
    Ok(0)
}

/// A FIN or RST of the tracked TCP flow `key` (client → VIP) of service `service_id`: marks
/// its conntrack entry [`CT_F_CLOSED`] and, the first time and if the flow was
/// [`CT_F_COUNTED`], gives its client's connection slot back.
///
/// At `now` ([`lb_common::maps::ct_seconds`]): an entry whose slot expired (idle past its
/// service's timeout and the grace) is taken off the count first ([`uncount`]): the daemon's
/// sweep gives that slot back, and the end of a flow not seen since (a backend's FIN after a
/// long idle) must not give it back again.
#[inline(always)]
pub fn closed(key: &FlowKey, service_id: u32, now: u32) {
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a live map value; `seen_s` is written by single aligned stores.
        let seen = unsafe { (&raw const (*entry).seen_s).read_volatile() };
        if slot_expired(ct_age(now, seen), service_id) {
            uncount(entry);
        }
        release(entry, &key.src_addr, service_id);
    }
}

/// Whether a counted flow of service `service_id` idle for `idle` seconds no longer holds its
/// client's connection slot (`lb_common::maps::slot_expired` of the service's
/// `Limits::idle_timeout_s`).
#[inline(always)]
pub fn slot_expired(idle: u32, service_id: u32) -> bool {
    LIMITS
        .get(service_id)
        .is_some_and(|l| lb_common::maps::slot_expired(idle, l.idle_timeout_s))
}

/// Marks the live conntrack entry `entry` of a flow of `client` (its address) in service
/// `service_id` [`CT_F_CLOSED`] and, if this call set the bit and the flow was
/// [`CT_F_COUNTED`], gives the client's connection slot back: whichever CPUs call this for
/// one entry, and however often, the slot goes back once.
#[inline(always)]
pub fn release(entry: *mut CtEntry, client: &[u32; 4], service_id: u32) {
    // SAFETY: a live map value; the kernel places hash map values on 8-byte boundaries, and
    // the entry's first 8 bytes have `flags` as their top 16 bits (little-endian), so an
    // atomic OR on them sets the bit and tells which call set it first: one flow gives its
    // slot back once, whichever CPUs see its FIN and RST or replace it aged. (BPF has 64-bit
    // atomics only.)
    let before = unsafe {
        atomic_or::<u64, u64, { Relaxed }>(entry as *mut u64, u64::from(CT_F_CLOSED) << 48)
    };
    let flags = (before >> 48) as u16;
    if flags & CT_F_CLOSED != 0 {
        return;
    }
    unadmit(client, service_id, flags);
}

/// Takes the live conntrack entry `entry` off its client's count for good, without giving
/// the slot back: a counted TCP flow idle past its service's idle timeout, whose slot the
/// daemon's sweep gives back (it counts only the flows seen within the timeout). Clears
/// [`CT_F_COUNTED`] atomically, so a FIN or RST on another CPU ([`release`]) either sees it
/// and gives the slot back before, or does not and gives nothing.
#[inline(always)]
pub fn uncount(entry: *mut CtEntry) {
    // SAFETY: as in `release`: the first 8 bytes of a live map value, `flags` their top bits.
    unsafe {
        atomic_and::<u64, u64, { Relaxed }>(entry as *mut u64, !(u64::from(CT_F_COUNTED) << 48))
    };
}

/// Gives back the connection slot of a flow of `client` (its address) in service
/// `service_id` whose conntrack flags are `flags`, if it holds one ([`CT_F_COUNTED`]): for a
/// flow admitted and then refused (no SNAT port), and, through [`release`], once per flow
/// that ends.
#[inline(always)]
pub fn unadmit(client: &[u32; 4], service_id: u32, flags: u16) {
    if flags & CT_F_COUNTED == 0 {
        return;
    }
    let ckey = ClientKey {
        service: service_id,
        addr: *client,
    };
    if let Some(state) = CLIENTS.get_ptr_mut(&ckey) {
        // SAFETY: a live map value, its counter changed atomically. Never below zero: a
        // client entry the LRU evicted and re-created holds fewer than its open flows.
        unsafe {
            let connections = &raw mut (*state).connections;
            if connections.read_volatile() > 0 {
                atomic_xsub::<u64, u64, { Relaxed }>(connections, 1);
            }
        }
    }
}

/// The `CLIENTS` entry of `addr` in `service_id`, created (full bucket, no flows) if absent.
#[inline(always)]
fn client(service_id: u32, addr: &[u32; 4]) -> Option<*mut ClientState> {
    let ckey = ClientKey {
        service: service_id,
        addr: *addr,
    };
    if let Some(state) = CLIENTS.get_ptr_mut(&ckey) {
        return Some(state);
    }
    // Zeroed field by field with volatile stores, and handed to the helper in place:
    // `ClientState::default()`, or a copy of the zeroed value, compiles to a call of the
    // object's byte-at-a-time `memset`.
    let mut fresh = core::mem::MaybeUninit::<ClientState>::uninit();
    let p = fresh.as_mut_ptr();
    // SAFETY: both fields of a local (the type has no others, nor padding), written before
    // the reference to it is made.
    let fresh = unsafe {
        (&raw mut (*p).full_at_ns).write_volatile(0);
        (&raw mut (*p).connections).write_volatile(0);
        &*p
    };
    // NOEXIST: a CPU that created it first keeps its (newer) state.
    let _ = CLIENTS.insert(&ckey, fresh, BPF_NOEXIST);
    CLIENTS.get_ptr_mut(&ckey)
}
