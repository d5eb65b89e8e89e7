//! Placing a client flow on a backend: conntrack first, the service's live Maglev table half
//! for flows conntrack does not know.
//!
//! A flow pinned in `CONNTRACK` stays on its backend whatever the table says, so a table flip
//! moves only new flows. New TCP flows start on SYN. A TCP packet without SYN that finds no
//! entry (the entry was evicted, or the balancer restarted) is placed the same way a SYN would
//! be, by `flow_hash` into the live table, recorded, and counted in `Stat::CtMissNonSyn`:
//! while the table has not changed that is the backend the flow began on (Katran does the
//! same). UDP has no SYN: its first packet without an entry starts the flow.
//!
//! A TCP flow whose FIN or RST was seen is marked `CT_F_CLOSED` (see `limits::closed`); a SYN
//! (without ACK) that finds such an entry starts a new flow on the same 5-tuple (a client
//! reusing its port), placed by the live table like any new flow.
//!
//! Entries carry no timestamp and never expire by age: a flow (TCP or UDP) stays pinned until
//! the LRU evicts it to make room, or its backend is marked down. A lone SYN that meets an
//! entry pinned to a draining backend starts a new connection on a reused 4-tuple: it is
//! placed by the table. Katran ages UDP entries;
//! this program does not yet, so a UDP client that reuses its source port keeps its backend.

use core::num::NonZeroU32;

use lb_common::{
    flow::IPPROTO_TCP,
    flow_hash,
    maps::{
        table_index, Backend, CtEntry, Service, BACKEND_F_DOWN, BACKEND_F_DRAINING, CT_F_CLOSED,
        MAX_SERVICES, MAX_TABLE_SIZE,
    },
    FlowKey, Stat,
};

use crate::{
    maps::{BACKENDS, CONNTRACK, TABLES},
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
    /// packet, that found no entry (or, for the SYN, an entry of a closed flow). The per-client
    /// limits apply to these only; not to TCP misses without SYN nor to flows re-placed
    /// because their backend went down.
    pub fresh: bool,
}

/// The backend for the flow `key` of `service` (id `service_id`). `Err` is the drop counter
/// when the service has no eligible backend.
#[inline(always)]
pub fn place(
    key: &FlowKey,
    tcp_flags: u8,
    service_id: u32,
    service: &Service,
) -> Result<Placement, Stat> {
    let syn = key.protocol != IPPROTO_TCP || tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // Flags a re-placed flow keeps (its connection slot, if it holds one).
    let mut flags = 0;
    let fresh;
    if let Some(entry) = CONNTRACK.get_ptr(key) {
        // SAFETY: a live map value; a concurrent update replaces it whole (LRU hash elements
        // are swapped, not written in place; `limits::closed` only sets a bit), and it is
        // copied out at once.
        let entry = unsafe { *entry };
        fresh = syn && key.protocol == IPPROTO_TCP && entry.flags & CT_F_CLOSED != 0;
        if !fresh {
            if let Some(backend) = BACKENDS.get(entry.backend) {
                // A backend that went down cannot serve the flow: place it anew. A draining
                // one (weight 0 or removed, not down) keeps its flows, but not a new
                // connection that reuses a 4-tuple pinned to it (a lone SYN).
                let reused =
                    syn && key.protocol == IPPROTO_TCP && backend.flags & BACKEND_F_DRAINING != 0;
                if backend.family == service.family
                    && backend.flags & BACKEND_F_DOWN == 0
                    && !reused
                {
                    return Ok(Placement {
                        backend_id: entry.backend,
                        backend: *backend,
                        entry,
                        new_flow: false,
                        fresh: false,
                    });
                }
            }
            flags = entry.flags;
        }
    } else {
        if !syn {
            stats::increment(Stat::CtMissNonSyn);
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
        },
        new_flow: true,
        fresh,
    })
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
