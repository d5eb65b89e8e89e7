//! Placing a client flow on a backend: conntrack first, the service's live Maglev table half
//! for flows conntrack does not know.
//!
//! A flow pinned in `CONNTRACK` stays on its backend whatever the table says, so a table flip
//! moves only new flows. New TCP flows start on SYN. A TCP packet without SYN that finds no
//! entry (the entry was evicted, or the balancer restarted) is placed the same way a SYN would
//! be, by `flow_hash` into the live table, and counted in `Stat::CtMissNonSyn`: while the
//! table has not changed that is the backend the flow began on (Katran does the same). On
//! `dsr` it is recorded; on `nat` it takes no SNAT port (`nat::snat_port`: only a port whose
//! entry still names the flow) and is otherwise reset, since that backend never saw the flow
//! through this SNAT port. UDP has no SYN: its first packet without an entry starts the flow.
//!
//! A TCP flow whose FIN or RST was seen is marked `CT_F_CLOSED` (see `limits::closed`); a SYN
//! (without ACK) that finds such an entry starts a new flow on the same 5-tuple (a client
//! reusing its port), placed by the live table like any new flow.
//!
//! # Ageing
//!
//! Entries remember when their flow was last seen (`CtEntry::seen_s`, seconds), and an entry
//! idle longer than its service's idle timeout no longer pins a flow that starts again (the
//! contract is "Conntrack ageing" in `lb_common::maps`):
//!
//! - UDP: every packet may start a session, so a datagram on an aged entry is placed anew by
//!   the live table. A client that reuses its source port an hour later gets today's backend.
//! - TCP: only a SYN without ACK on an aged entry is placed anew. A packet without SYN keeps
//!   its backend however old the entry is: the connection may well be alive (idle, no
//!   keepalives), and it exists only on that backend, which would answer nothing else but a
//!   RST from another one. A TCP flow that ended without a FIN or RST the balancer saw leaves
//!   an entry that only a SYN reusing the 5-tuple can tell is dead.
//!
//! As we read it, Katran handles TCP differently: a SYN never consults its LRU at all and is
//! always placed by the current ring, and only UDP entries carry an access time. We keep the
//! entry for a SYN whose entry is fresh (not closed, not aged): that SYN is most likely a
//! retransmission, and after a table flip placing it anew would send it to another backend
//! than its first copy, whose SYN-ACK the client may already have answered. The timestamp
//! that ageing UDP needs makes this distinction free for TCP.
//!
//! The timestamp is refreshed in place, and only when it is `CT_REFRESH_SECS` or more old: a
//! flow's entry is written once every two seconds or so, not per packet (a per-packet store
//! would bounce the entry's cache line between the CPUs a flow's packets arrive on). The
//! service's timeout (`LIMITS`) is read only then, and for SYNs and UDP.
//!
//! An aged entry that held one of its client's connection slots gives it back when a SYN
//! replaces it, through the same once-only step as a FIN (`limits::release`). Past a grace
//! after the idle timeout (`lb_common::maps::slot_expired`) the daemon's sweep gives it back
//! instead, as it does for a flow that ended unseen and is never met again; the program then
//! only takes the mark off the entry when it meets it (a SYN replacing it, or a packet of a
//! flow that was only idle, which goes on uncounted), so that no FIN gives the slot back
//! twice (`limits::uncount`).
//!
//! # Draining backends
//!
//! A flow pinned to a draining backend (weight 0, or removed by a reload or DNS) stays on it.
//! A lone SYN that meets such an entry is a new connection reusing the 4-tuple (a client's
//! ports wrap): it is placed by the table like any new flow, counts against the per-client
//! limits, and the old entry's connection slot, if it held one, goes back.
//!
//! # Entries made in mid-stream
//!
//! An entry a segment without SYN made is marked `CT_F_MIDSTREAM`: no SYN of that flow was
//! admitted by the limits. A lone SYN that meets one is placed as a new flow (by the table,
//! which gives the same backend while it is unchanged) and admitted, as for a draining
//! backend: a client could otherwise send a bare ACK first (recorded on `dsr`) and its SYN,
//! taken for a retransmission, would never meet the limits.

use core::num::NonZeroU32;

use lb_common::{
    flow::IPPROTO_TCP,
    flow_hash,
    maps::{
        ct_age, ct_seconds, table_index, Backend, CtEntry, Service, BACKEND_F_DOWN,
        BACKEND_F_DRAINING, CT_F_CLOSED, CT_F_COUNTED, CT_F_MIDSTREAM, CT_REFRESH_SECS,
        MAX_SERVICES, MAX_TABLE_SIZE,
    },
    FlowKey, Stat,
};

use crate::{
    limits,
    maps::{BACKENDS, CONNTRACK, LIMITS, TABLES},
    parse::{TCP_ACK, TCP_SYN},
    stats,
};

/// Where a client packet goes.
#[derive(Clone, Copy)]
pub struct Placement {
    /// The backend id.
    pub backend_id: u32,
    /// The backend.
    pub backend: Backend,
    /// The flow's conntrack entry (its SNAT port is 0 until NAT chooses one).
    pub entry: CtEntry,
    /// Whether this packet started the flow (no usable conntrack entry).
    pub new_flow: bool,
    /// Whether the client starts a flow with this packet: a TCP SYN without ACK, or a UDP
    /// packet, that found no entry, or an aged one (see the module docs), or, for the SYN, an
    /// entry of a closed flow. The per-client limits apply to these only; not to TCP misses
    /// without SYN nor to flows re-placed because their backend went down.
    pub fresh: bool,
    /// The packet's time, [`ct_seconds`] of [`crate::clock::now_ns`].
    pub now: u32,
    /// Whether this packet renewed the entry's time (it was [`CT_REFRESH_SECS`] or more
    /// old: at most once per that many seconds of a busy flow, and on the first packet after
    /// an idle), or the flow is new. An established TCP flow proves its SNAT port on these
    /// packets (and on its SYNs, FINs and RSTs) only: see `balancer::keeps_port`.
    pub refreshed: bool,
}

/// The backend for the flow `key` of `service` (id `service_id`), for a packet that arrived
/// at `now_ns` ([`crate::clock::now_ns`]). `Err` is the drop counter when the service has no
/// eligible backend.
#[inline(always)]
pub fn place(
    key: &FlowKey,
    tcp_flags: u8,
    service_id: u32,
    service: &Service,
    now_ns: u64,
) -> Result<Placement, Stat> {
    let tcp = key.protocol == IPPROTO_TCP;
    // A packet that may start a flow.
    let syn = !tcp || tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let now = ct_seconds(now_ns);
    // Flags a re-placed flow keeps (its connection slot, if it holds one).
    let mut flags = 0;
    let fresh;
    if let Some(ptr) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a live map value; a concurrent update replaces it whole (LRU hash elements
        // are swapped, not written in place; `limits::release` only sets a bit and the
        // refresh below only stores `seen_s`), and it is copied out at once.
        let mut entry = unsafe { *ptr };
        let idle = ct_age(now, entry.seen_s);
        let due = idle >= CT_REFRESH_SECS;
        let aged = syn && due && past_idle_timeout(idle, service_id);
        let closed = syn && tcp && entry.flags & CT_F_CLOSED != 0;
        // A lone SYN on an entry pinned to a draining backend (weight 0, removed, or waiting
        // for its first health check) is a new
        // connection reusing the 4-tuple: the draining backend takes no new connections. On
        // an entry made in mid-stream it starts the flow the limits have not seen.
        let reused = syn
            && tcp
            && !closed
            && (entry.flags & CT_F_MIDSTREAM != 0
                || BACKENDS
                    .get(entry.backend)
                    .is_some_and(|b| b.flags & BACKEND_F_DRAINING != 0));
        fresh = aged || closed || reused;
        if (aged || reused) && entry.flags & (CT_F_COUNTED | CT_F_CLOSED) == CT_F_COUNTED {
            if aged && limits::slot_expired(idle, service_id) {
                // Its slot goes back through the daemon's sweep, which no longer counts it:
                // only taken off the entry, so that no FIN gives it back again.
                limits::uncount(ptr);
            } else {
                // The flow it pinned is over: its slot goes back (once, even if CPUs race).
                limits::release(ptr, &key.src_addr, service_id);
            }
        }
        if !fresh {
            if let Some(backend) = BACKENDS.get(entry.backend) {
                // A backend that went down cannot serve the flow: place it anew. A draining
                // one (weight 0, removed, or awaiting its first check; not down) keeps its
                // flows.
                if backend.family == service.family && backend.flags & BACKEND_F_DOWN == 0 {
                    if due {
                        // A counted flow back from an idle that expired its slot: the sweep
                        // gave the slot back (or will); the flow goes on uncounted. Before
                        // the time is refreshed: a FIN on another CPU that sees the fresh
                        // time must find the mark gone (`limits::closed`).
                        if tcp && holds_expired_slot(&entry, idle, service_id) {
                            limits::uncount(ptr);
                            entry.flags &= !CT_F_COUNTED;
                        }
                        // SAFETY: a live map value; one aligned 32-bit store outside the
                        // 8 bytes `limits::release` changes atomically.
                        unsafe { (&raw mut (*ptr).seen_s).write_volatile(now) };
                        entry.seen_s = now;
                    }
                    return Ok(Placement {
                        backend_id: entry.backend,
                        backend: *backend,
                        entry,
                        new_flow: false,
                        fresh: false,
                        now,
                        refreshed: due,
                    });
                }
            }
            // A re-placed flow whose slot expired holds none: the sweep gave it back.
            if tcp && holds_expired_slot(&entry, idle, service_id) {
                limits::uncount(ptr);
            }
            // Read again, not from the copy: a FIN on another CPU may have closed the flow
            // (and given its slot back) since, and the re-placed entry must not count the
            // slot a second time.
            // SAFETY: a live map value; `flags` is changed only by atomic operations
            // (`limits::release`, `limits::uncount`).
            flags = unsafe { (&raw const (*ptr).flags).read_volatile() };
        }
    } else {
        if !syn {
            stats::increment(Stat::CtMissNonSyn);
            flags = CT_F_MIDSTREAM;
        }
        fresh = syn;
    }
    let (backend_id, backend) = from_table(key, service_id, service)?;
    Ok(Placement {
        backend_id,
        backend,
        entry: CtEntry {
            backend: backend_id,
            snat_port: 0,
            flags,
            seen_s: now,
        },
        new_flow: true,
        fresh,
        now,
        refreshed: true,
    })
}

/// Whether an entry of service `service_id` whose stored time is `idle` seconds old is aged:
/// older than the service's `Limits::idle_timeout_s` (when that is not 0) plus the lag of the
/// stored time. The time is refreshed only once it is `CT_REFRESH_SECS` old and is truncated
/// to whole seconds, so it can trail the flow's last packet by up to `CT_REFRESH_SECS + 1`:
/// without that margin a flow sending every 1.5 s under a 2 s timeout would read as idle and
/// be moved mid-session. A flow idle for good ages between the timeout and 3 s after it.
#[inline(always)]
fn past_idle_timeout(idle: u32, service_id: u32) -> bool {
    match LIMITS.get(service_id) {
        Some(limits) => {
            limits.idle_timeout_s != 0
                && idle > limits.idle_timeout_s.saturating_add(CT_REFRESH_SECS + 1)
        }
        None => false,
    }
}

/// Whether `entry`, of a TCP flow of service `service_id` idle for `idle` seconds, is marked
/// as holding a connection slot ([`CT_F_COUNTED`], not [`CT_F_CLOSED`]) that has expired
/// (`limits::slot_expired`): the daemon's sweep gives that slot back, and the program only
/// takes the mark off (`limits::uncount`).
#[inline(always)]
fn holds_expired_slot(entry: &CtEntry, idle: u32, service_id: u32) -> bool {
    entry.flags & (CT_F_COUNTED | CT_F_CLOSED) == CT_F_COUNTED
        && limits::slot_expired(idle, service_id)
}

/// Makes the next packet of the flow `key`, whose time this packet renewed at `now`, renew it
/// again: its entry's time is set [`CT_REFRESH_SECS`] back. For a packet that renewed the time
/// and then went no further than the route lookup: the renewing packet is the one that checks
/// the flow's SNAT port (`balancer::keeps_port`). The flow reads at most that much idler,
/// inside every idle timeout's margin. A time another CPU renewed since (a later second) is
/// left alone: set back, it would trail the flow's last packet by more than that margin.
#[inline(always)]
pub fn renew_next(key: &FlowKey, now: u32) {
    if let Some(ptr) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a live map value; `seen_s` is written by single aligned 32-bit stores, as
        // `place`'s refresh. Another CPU's renewal between the read and the store is lost
        // (rare: a flow's time is renewed once per `CT_REFRESH_SECS`), and the flow then reads
        // up to 3 s idler than it is, at the edge of the ageing margin.
        unsafe {
            let seen = &raw mut (*ptr).seen_s;
            if seen.read_volatile() == now {
                seen.write_volatile(now.wrapping_sub(CT_REFRESH_SECS));
            }
        }
    }
}

/// Records `entry` for `key` (a new flow, or a new SNAT port).
#[inline(always)]
pub fn record(key: &FlowKey, entry: &CtEntry) {
    // An LRU map makes room by evicting; a failure here (no memory) only means the next packet
    // is placed again by the table, which gives the same backend while the table is unchanged.
    let _ = CONNTRACK.insert(key, entry, 0);
}

/// The backend the live table half gives `key`.
#[inline(always)]
fn from_table(key: &FlowKey, service_id: u32, service: &Service) -> Result<(u32, Backend), Stat> {
    let half = service.active_half & 1;
    let size = service.table_size[half as usize];
    if size > MAX_TABLE_SIZE || service_id >= MAX_SERVICES {
        return Err(Stat::DropNoBackend);
    }
    // `NonZeroU32`: the remainder then has no division-by-zero panic path for the verifier
    // to reject.
    let size = NonZeroU32::new(size).ok_or(Stat::DropNoBackend)?;
    let slot = flow_hash(key) % size;
    let backend_id = *TABLES
        .get(table_index(service_id, half, slot))
        .ok_or(Stat::DropNoBackend)?;
    let backend = BACKENDS.get(backend_id).ok_or(Stat::DropNoBackend)?;
    if backend.family != service.family {
        return Err(Stat::DropNoBackend);
    }
    Ok((backend_id, *backend))
}
