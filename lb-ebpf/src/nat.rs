//! Full NAT: client → VIP becomes balancer (`local_addr`:SNAT port) → backend on the way in,
//! and the backend's reply becomes VIP → client on the way back, found through `NAT_REVERSE`.
//! Checksums are updated incrementally (RFC 1624), never recomputed over the payload.
//!
//! A SNAT port is taken for a flow, given back when the flow ends, and reused by another flow
//! after a hold time; the rules and their reasons are "SNAT ports" in `lb_common::maps`. The
//! ports of a new flow are probed in the service's range starting from the flow's hash, so the
//! same flow finds its port again after its conntrack entry is lost, and flows spread over the
//! range. A freed port is taken first (the one free the longest), a port without entry only
//! when no probed port is free, so `NAT_REVERSE` holds about as many entries as there are
//! flows and held ports, not one per port ever used; but a freed port whose backend may still
//! hold the old flow's TIME_WAIT (`SNAT_TIME_WAIT_S`) comes after a port without entry.

use core::{
    intrinsics::{atomic_cxchg, atomic_or, AtomicOrdering::Relaxed},
    num::NonZeroU32,
};

use lb_common::{
    flow::{IPPROTO_TCP, IPPROTO_UDP},
    flow_hash,
    maps::{
        ct_age, local_addr_index, nat_flags, nat_seen, nat_state, snat_addr_index, NatReverse,
        Service, CT_REFRESH_SECS, FAMILY_V4, NAT_F_ANSWERED, NAT_F_CLAIMED, NAT_F_ENDED,
        NAT_F_FIN_BACKEND, NAT_F_FIN_CLIENT, NAT_F_TIME_WAIT, SNAT_QUIET_S, SNAT_TIME_WAIT_S,
    },
    FlowKey, Stat,
};

use crate::{
    csum,
    frame::{Frame, L4Check},
    maps::{NatScratch, LIMITS, LOCAL_ADDRS, NAT_REVERSE, NAT_SCRATCH},
    parse::{
        copy_addr, groups6, halves, ptr_at, Ipv4Hdr, Ipv6Hdr, Parsed, IPV4_CHECK_OFF,
        TCP_CHECK_OFF, TCP_FIN, TCP_RST, TCP_SYN, UDP_CHECK_OFF,
    },
};

/// SNAT ports tried for a new flow before it is refused as `Stat::DropNatPortsExhausted`.
/// With a share `f` of a backend's ports held (taken, or ended less than the hold ago), a new
/// flow is refused with probability about `f^SNAT_PROBES`: at 8 probes the benchmark's 24,000
/// connections/s over three backends refused a few SYNs in every 50,000 though most ports
/// were free. Every probe is looked at, also once a free port has been seen: the flow's own
/// port (after its conntrack entry was lost) may be any of them. 32 probes went past the
/// verifier's million instructions; 16 load at once.
const SNAT_PROBES: u32 = 16;

/// `BPF_NOEXIST`, `BPF_EXIST`: insert only if the key is absent, only if it is present.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// The SNAT source address of the client flow `key` of service `service_id` (`service`): its
/// `local_addr`, or with several local addresses the one [`snat_addr_index`] of the flow's
/// hash names (the same for every packet of the flow). `None` when that `LOCAL_ADDRS` entry
/// cannot be read.
#[inline(always)]
pub fn flow_local<'a>(
    service_id: u32,
    service: &'a Service,
    key: &FlowKey,
) -> Option<&'a [u32; 4]> {
    if service.local_addrs <= 1 {
        return Some(&service.local_addr);
    }
    match snat_addr_index(flow_hash(key), service.local_addrs as u32) {
        0 => Some(&service.local_addr),
        i => LOCAL_ADDRS.get(local_addr_index(service_id, i)),
    }
}

/// Writes into `rkey` the key a reply of the translated flow will carry:
/// backend → `local`:`port`, of `family`.
#[inline(always)]
fn set_reply_key(
    rkey: &mut FlowKey,
    key: &FlowKey,
    backend_addr: &[u32; 4],
    backend_port: u16,
    local: &[u32; 4],
    family: u8,
    port: u16,
) {
    rkey.src_addr = *backend_addr;
    rkey.dst_addr = copy_addr(local);
    rkey.src_port = backend_port;
    rkey.dst_port = port;
    rkey.protocol = key.protocol;
    rkey.family = family;
    rkey._pad = [0; 2];
}

/// Whether the `NAT_REVERSE` entry `r` (a live map value) translates the client flow `key`.
#[inline(always)]
pub fn owned_by(r: *const NatReverse, key: &FlowKey) -> bool {
    // SAFETY: a live map value, read in place (a copy would cost stack the balancer does not
    // have); a flow taking the port over replaces the element whole.
    unsafe {
        (*r).client_port == key.src_port
            && (*r).vip_port == key.dst_port
            && (*r).client_addr == key.src_addr
            && (*r).vip_addr == key.dst_addr
    }
}

/// The state word of the live `NAT_REVERSE` entry `r`.
#[inline(always)]
fn state_of(r: *mut NatReverse) -> *mut u64 {
    // SAFETY: only forms the field's address; `NatReverse::state` is 8-byte aligned.
    unsafe { &raw mut (*r).state }
}

/// Notes a packet of the flow whose port entry is `r`, sent by the client (`FIN` bit
/// [`NAT_F_FIN_CLIENT`]) or the backend ([`NAT_F_FIN_BACKEND`]): an RST, or the FIN that
/// completes both, ends the flow now (the hold starts; [`NAT_F_TIME_WAIT`] when the
/// completing FIN is the client's, so the backend closed first); other packets refresh the
/// time once it is `refresh_after` seconds old or more. An ended flow's time is left alone,
/// so a late ACK or a retransmitted FIN does not restart the hold.
#[inline(always)]
fn track(r: *mut NatReverse, tcp_flags: u8, fin_bit: u32, now: u32, refresh_after: u32) {
    let state = state_of(r);
    // SAFETY: `state` is the aligned state word of a live map value; it is written only by
    // single aligned stores and atomic operations, so every read sees a whole word.
    unsafe {
        let current = state.read_volatile();
        let flags = nat_flags(current);
        if flags & NAT_F_ENDED != 0 {
            return;
        }
        if tcp_flags & TCP_RST != 0 {
            state.write_volatile(nat_state(now, flags | NAT_F_ENDED));
        } else if tcp_flags & TCP_FIN != 0 {
            let before = atomic_or::<u64, u64, { Relaxed }>(state, nat_state(0, fin_bit));
            let fins = nat_flags(before) | fin_bit;
            if fins & (NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND) == NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND
                && nat_flags(before) & fin_bit == 0
            {
                // This FIN completed the pair. If it is the client's, the backend's came
                // first: the backend closed actively and holds TIME_WAIT on the 4-tuple.
                let time_wait = if fin_bit == NAT_F_FIN_CLIENT {
                    NAT_F_TIME_WAIT
                } else {
                    0
                };
                state.write_volatile(nat_state(now, fins | NAT_F_ENDED | time_wait));
            }
        } else if ct_age(now, nat_seen(current)) >= refresh_after {
            // Only the time half: a FIN bit ORed in meanwhile stays.
            (state as *mut u32).write_volatile(now);
        }
    }
}

/// How old, in seconds, the port's time may be before a client packet of the established
/// flow `key` renews it in [`snat_port`]. A UDP flow's every packet comes here, so every
/// [`CT_REFRESH_SECS`] is enough. An established TCP flow's segments skip it between two
/// renewals of their conntrack time (`balancer::keeps_port`): the one that renews that time
/// renews this one too unless it is this second's, which keeps it as fresh as conntrack's.
#[inline(always)]
fn client_refresh(key: &FlowKey) -> u32 {
    if key.protocol == IPPROTO_TCP {
        1
    } else {
        CT_REFRESH_SECS
    }
}

/// The SNAT port for the client flow `key` placed on the backend at `backend_addr`, and the
/// bookkeeping of the packet (`tcp_flags`, 0 for UDP) on it.
///
/// - `current != 0` (the flow has a port): that port, if its `NAT_REVERSE` entry still
///   translates this flow (re-created if the LRU evicted it). A port another flow took over
///   (this flow ended or idled past the timeout) is `Err(Stat::ResetNatPortReclaimed)`, unless
///   `may_take` (a SYN starting the flow anew), which then takes a new port.
/// - else a port of the service's range: one whose entry already translates this flow (lost
///   conntrack entry), else, if `may_take`, the free one (ended and held for
///   [`Service::snat_hold_s`], or idle past the service's idle timeout) that has been free
///   the longest, claimed with a compare-and-swap so two CPUs never take one port, or when
///   none is free (or the claim is lost), a port without entry (never used, or evicted); a
///   free port whose flow left a TIME_WAIT on the backend less than `SNAT_TIME_WAIT_S` ago
///   comes after a port without entry.
///   `Err(Stat::ResetNatNoFlow)` when `!may_take` and no port translates the flow,
///   `Err(Stat::DropNatPortsExhausted)` when every probed port is in use or held,
///   `Err(Stat::DropBadService)` when the range is empty.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn snat_port(
    key: &FlowKey,
    backend_addr: &[u32; 4],
    backend_port: u16,
    service_id: u32,
    service: &Service,
    current: u16,
    tcp_flags: u8,
    may_take: bool,
    now: u32,
) -> Result<u16, Stat> {
    let scratch = NAT_SCRATCH
        .get_ptr_mut(0)
        .ok_or(Stat::DropNatPortsExhausted)?;
    // SAFETY: this CPU's slot of a live map entry; BPF programs do not preempt each other on
    // one CPU, so nothing else uses it until this packet is done with it.
    let NatScratch {
        rkey,
        owner,
        best_port,
        best_age,
        best_state,
        empty_port,
    } = unsafe { &mut *scratch };
    // Everything of the reply key but the port, written once: the probes change the port.
    let local = flow_local(service_id, service, key).ok_or(Stat::DropBadService)?;
    set_reply_key(
        rkey,
        key,
        backend_addr,
        backend_port,
        local,
        service.family,
        current,
    );
    if current != 0 {
        // The established path: one lookup (as before this lifecycle existed, to re-create an
        // evicted entry) and the ownership compares.
        if let Some(r) = NAT_REVERSE.get_ptr_mut(&*rkey) {
            if owned_by(r, key) {
                // Only a SYN reads the word here: the flow's other packets (UDP's included,
                // whose ports never end) go straight to `track`.
                // SAFETY: the aligned state word of a live map value (see `track`).
                let anew = may_take
                    && tcp_flags & TCP_SYN != 0
                    && nat_flags(unsafe { state_of(r).read_volatile() }) & NAT_F_ENDED != 0;
                if !anew {
                    track(r, tcp_flags, NAT_F_FIN_CLIENT, now, client_refresh(key));
                    return Ok(current);
                }
                // A SYN starting the flow anew on its own ended port: its conntrack entry
                // lost the closed mark (evicted during the close, then re-made by a late
                // segment). `track` leaves an ended port alone, so the port would stay free
                // under the new connection, for the next flow to take.
                if in_use_again(r, now) {
                    return Ok(current);
                }
            }
        } else {
            set_owner(owner, key, service_id, now);
            if tcp_flags & TCP_SYN == 0 {
                // Re-made under a flow past its SYN: the backend has answered it, and its RST
                // now ends the connection rather than refusing a SYN (`reverse`). (A UDP
                // packet sets it too; `reverse` reads it for TCP only.)
                owner.state = nat_state(now, NAT_F_ANSWERED);
            }
            if NAT_REVERSE.insert(&*rkey, &*owner, BPF_NOEXIST).is_ok() {
                return Ok(current);
            }
        }
        if !may_take {
            return Err(Stat::ResetNatPortReclaimed);
        }
    }
    let min = service.snat_port_min as u32;
    let max = service.snat_port_max as u32;
    if min == 0 || max < min {
        return Err(Stat::DropBadService);
    }
    // Non-zero by construction (max >= min); the type removes the division-by-zero panic.
    let span = NonZeroU32::new(max - min + 1).ok_or(Stat::DropBadService)?;
    set_owner(owner, key, service_id, now);
    let hold = service.snat_hold_s;
    let idle = match LIMITS.get(service_id) {
        Some(l) if l.idle_timeout_s != 0 => l.idle_timeout_s.saturating_add(CT_REFRESH_SECS + 1),
        _ => u32::MAX,
    };
    let start = flow_hash(key);
    // The free port seen longest ago, its age and state word, live in the scratch slot and
    // are read and written there at every probe (volatile: never kept in registers). The
    // verifier tracks the values a program holds, not what it reads back from a map, so each
    // probe's paths meet again at the next one instead of multiplying: with them in registers
    // 16 probes kept the verifier busy for over 20 seconds.
    // SAFETY (all volatile accesses below): fields of this CPU's scratch slot.
    unsafe {
        (best_port as *mut u32).write_volatile(0);
        (best_age as *mut u32).write_volatile(0);
        (best_state as *mut u64).write_volatile(0);
        (empty_port as *mut u32).write_volatile(0);
    }
    // Probe offsets 0, 1, 3, 6, 10... (triangular numbers) rather than 0, 1, 2...: with
    // consecutive probes the taken ports form runs that every flow hashing into one extends
    // (primary clustering). Simulated with `flow_hash` over a 1,024-port range and 8 probes,
    // the first SYN refused for want of a port came after a median of 438 flows with
    // consecutive probes and 532 with these (1% of runs: 255 and 336). Ranges of at most SNAT_PROBES ports are
    // probed one by one, so that every port of them is reached.
    let mut i = 0;
    while i < SNAT_PROBES {
        // Computed from `i` alone, not carried between probes: the balancer's stack has no
        // room for one more live value here.
        let offset = if span.get() > SNAT_PROBES {
            i * (i + 1) / 2
        } else {
            i
        };
        let port = (min + start.wrapping_add(offset) % span) as u16;
        i += 1;
        rkey.dst_port = port;
        // A port without entry is remembered, not taken: free ports go first, so that
        // `NAT_REVERSE` holds the flows of the moment, not every port ever used (past its
        // size the LRU would evict idle live flows' entries; see "SNAT ports").
        let Some(r) = NAT_REVERSE.get_ptr_mut(&*rkey) else {
            // SAFETY: a field of this CPU's scratch slot.
            unsafe {
                if (empty_port as *mut u32).read_volatile() == 0 {
                    (empty_port as *mut u32).write_volatile(port as u32);
                }
            }
            continue;
        };
        if owned_by(r, key) {
            // This flow's own port, from before its conntrack entry was lost (or a SYN
            // reusing its 5-tuple): in use again.
            if may_take {
                if !in_use_again(r, now) {
                    continue;
                }
            } else {
                track(r, tcp_flags, NAT_F_FIN_CLIENT, now, CT_REFRESH_SECS);
            }
            return Ok(port);
        }
        // SAFETY: as above.
        let state = unsafe { state_of(r).read_volatile() };
        let flags = nat_flags(state);
        // `ct_age`, written out: its floor at 0 is a max LLVM turns into a branch, and one
        // branch more per probe multiplies the paths the verifier walks past its limit. The
        // volatile read keeps the mask an opaque value, so the floor stays arithmetic.
        let age = now.wrapping_sub(nat_seen(state));
        let ahead = ((age as i32) >> 31) as u32;
        // SAFETY: a read of a local.
        let age = age & !unsafe { (&raw const ahead).read_volatile() };
        let free = if flags & NAT_F_CLAIMED != 0 {
            false
        } else if flags & NAT_F_ENDED != 0 {
            age >= if flags & NAT_F_TIME_WAIT != 0 {
                hold
            } else {
                hold.min(SNAT_QUIET_S)
            }
        } else {
            // Idle: a TCP backend may have closed it itself, into TIME_WAIT.
            age > idle && (key.protocol == IPPROTO_UDP || age >= hold)
        };
        if free {
            // SAFETY: see above.
            unsafe {
                let have = (best_port as *mut u32).read_volatile();
                if have == 0 || age > (best_age as *mut u32).read_volatile() {
                    (best_port as *mut u32).write_volatile(port as u32);
                    (best_age as *mut u32).write_volatile(age);
                    (best_state as *mut u64).write_volatile(state);
                }
            }
        }
    }
    if !may_take {
        return Err(Stat::ResetNatNoFlow);
    }
    // SAFETY: see above.
    let best = unsafe {
        (
            (best_port as *mut u32).read_volatile() as u16,
            (best_state as *mut u64).read_volatile(),
            (best_age as *mut u32).read_volatile(),
        )
    };
    // SAFETY: a field of this CPU's scratch slot.
    let empty = unsafe { (empty_port as *mut u32).read_volatile() } as u16;
    // A free port first, but not one whose backend may still hold the old flow's TIME_WAIT
    // while a port without entry is there: that costs an entry, not a stalled SYN.
    let young_time_wait =
        nat_flags(best.1) & NAT_F_TIME_WAIT != 0 && best.2 < SNAT_TIME_WAIT_S && empty != 0;
    if best.0 != 0 && !young_time_wait && claim(rkey, owner, best.0, best.1) {
        return Ok(best.0);
    }
    // No free port (or only a young TIME_WAIT one), or another CPU claimed it first: a port
    // without entry. Inserted only now, after every probe was looked up: an LRU insert takes
    // a free element first (evicting another flow's entry when the map is full) even when
    // it then fails on the key.
    if empty != 0 {
        rkey.dst_port = empty;
        if NAT_REVERSE.insert(&*rkey, &*owner, BPF_NOEXIST).is_ok() {
            return Ok(empty);
        }
    }
    if best.0 != 0 && young_time_wait && claim(rkey, owner, best.0, best.1) {
        return Ok(best.0);
    }
    Err(Stat::DropNatPortsExhausted)
}

/// Takes the free `port` (its reply key is `rkey` but for the port), whose state word the
/// probe read as `seen`, for the flow whose entry is `owner`. The claim: only the CPU whose
/// compare-and-swap moves the word on from what the probe saw takes the port (a packet of
/// the old flow refreshing it meanwhile makes every claim fail, as it should). The claimed
/// word carries NAT_F_CLAIMED, which no free word has, so a second CPU that read the same
/// word cannot succeed after the first (even within the same second). `false` when the
/// claim is lost or the entry cannot be replaced.
#[inline(always)]
fn claim(rkey: &mut FlowKey, owner: &NatReverse, port: u16, seen: u64) -> bool {
    rkey.dst_port = port;
    let Some(r) = NAT_REVERSE.get_ptr_mut(&*rkey) else {
        return false;
    };
    let claimed_word = seen | nat_state(0, NAT_F_CLAIMED);
    // SAFETY: the aligned state word of a live map value.
    let (_, claimed) =
        unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(state_of(r), seen, claimed_word) };
    if !claimed {
        return false;
    }
    if NAT_REVERSE.insert(&*rkey, owner, BPF_EXIST).is_ok() {
        return true;
    }
    // No memory for the new element: the port goes back as it was.
    // SAFETY: as above.
    unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(state_of(r), claimed_word, seen) };
    false
}

/// Marks the port entry `r`, which its own flow starts anew on (a SYN, or a UDP packet), in
/// use since `now`, through a compare-and-swap: a CPU claiming the (free) port at this moment
/// wins or loses the port whole, never shares it with this flow. `false` when the port is
/// being claimed, or was changed meanwhile: the flow then looks for another.
#[inline(always)]
fn in_use_again(r: *mut NatReverse, now: u32) -> bool {
    // SAFETY: the aligned state word of a live map value.
    unsafe {
        let seen = state_of(r).read_volatile();
        nat_flags(seen) & NAT_F_CLAIMED == 0
            && atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(state_of(r), seen, nat_state(now, 0)).1
    }
}

/// Writes into `owner` the `NAT_REVERSE` entry of the client flow `key` of service
/// `service_id`, in use since `now`.
#[inline(always)]
fn set_owner(owner: &mut NatReverse, key: &FlowKey, service_id: u32, now: u32) {
    owner.client_addr = key.src_addr;
    owner.vip_addr = key.dst_addr;
    owner.client_port = key.src_port;
    owner.vip_port = key.dst_port;
    owner.service = service_id;
    owner.state = nat_state(now, 0);
}

/// The `NAT_REVERSE` entry of the reply 5-tuple `key`, if it belongs to a NAT'ed flow, with
/// no bookkeeping (an ICMP error about the flow is not a packet of it).
#[inline(always)]
pub fn find(key: &FlowKey) -> Option<*const NatReverse> {
    NAT_REVERSE.get_ptr(key)
}

/// The translation of a reply `key` back to VIP → client, if it belongs to a NAT'ed flow;
/// notes the reply's `tcp_flags` (the backend's FIN or RST ends the flow's port, see
/// [`snat_port`]) at time `now` (`ct_seconds`).
///
/// A TCP reply that is the backend's first is noted as its answer ([`NAT_F_ANSWERED`]),
/// unless it is an RST: the backend refused the connection, and
/// `Err(Stat::DropRefusedSyn)` says to drop it, leaving the port and the flow as they are, so
/// that the client's next SYN finds them and is placed again (on another backend once the
/// daemon took this one out of the table).
#[inline(always)]
pub fn reverse(key: &FlowKey, tcp_flags: u8, now: u32) -> Option<Result<NatReverse, Stat>> {
    let r = NAT_REVERSE.get_ptr_mut(key)?;
    if key.protocol == IPPROTO_TCP {
        let state = state_of(r);
        // SAFETY: the aligned state word of a live map value (see `track`).
        let flags = nat_flags(unsafe { state.read_volatile() });
        if flags & (NAT_F_ANSWERED | NAT_F_ENDED) == 0 {
            if tcp_flags & TCP_RST != 0 {
                return Some(Err(Stat::DropRefusedSyn));
            }
            // SAFETY: as above; an atomic OR keeps the bits another CPU sets meanwhile.
            unsafe { atomic_or::<u64, u64, { Relaxed }>(state, nat_state(0, NAT_F_ANSWERED)) };
        }
    }
    track(r, tcp_flags, NAT_F_FIN_BACKEND, now, CT_REFRESH_SECS);
    // SAFETY: a live map value, copied out at once.
    Some(Ok(unsafe { *r }))
}

/// Rewrites the parsed packet's addresses and ports to `src`:`sport` → `dst`:`dport` (ports
/// in host order), decrements its TTL / hop limit (the caller dropped those at 1 or 0), and
/// updates the IP (IPv4) and TCP/UDP checksums by the hook's rules (`Frame::l3_csum_add`,
/// `Frame::l4_csum_add`): an IPv4 UDP checksum of 0 (none) stays 0, and on tc a
/// `CHECKSUM_PARTIAL` packet's field follows only the addresses. `Err(Stat::PassMalformed)`
/// cannot happen for a packet `parse` accepted; it only satisfies the verifier's bounds
/// checks.
#[inline(always)]
pub fn rewrite<C: Frame>(
    ctx: &C,
    p: &Parsed,
    src: &[u32; 4],
    sport: u16,
    dst: &[u32; 4],
    dport: u16,
) -> Result<(), Stat> {
    let old = &p.key;
    // The pseudo-header holds both addresses: their change goes into the IPv4 header's
    // checksum and the transport checksum alike.
    let addrs = csum::sum(
        csum::diff_addr(&old.src_addr, src),
        csum::diff_addr(&old.dst_addr, dst),
    );
    if p.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        let (ttl, proto) = unsafe { ((*ip).ttl, (*ip).protocol) };
        // TTL and protocol share one 16-bit word of the header checksum (memory order, as
        // the ports below).
        let hop = csum::diff16(
            u16::from_ne_bytes([ttl, proto]),
            u16::from_ne_bytes([ttl.wrapping_sub(1), proto]),
        );
        ctx.l3_csum_add(p.l3_off + IPV4_CHECK_OFF, csum::sum(addrs, hop))?;
        // Taken anew after a `Frame` checksum method, as the trait asks.
        let ip: *mut Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            (*ip).ttl = ttl.wrapping_sub(1);
            (*ip).src = halves(src[0]);
            (*ip).dst = halves(dst[0]);
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        let (hop, next) = unsafe { ((*ip).hop_limit, (*ip).nexthdr) };
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            (*ip).hop_limit = hop.wrapping_sub(1);
            (*ip).src = groups6(src);
            (*ip).dst = groups6(dst);
        }
        // No header checksum takes up the hop limit's change (the addresses' is taken up by
        // the transport checksum): a tc packet's sum of its bytes must follow it.
        ctx.complete_sum_add(csum::diff16(
            u16::from_ne_bytes([next, hop]),
            u16::from_ne_bytes([next, hop.wrapping_sub(1)]),
        ));
    }

    // Source and destination port are the first two 16-bit words of both TCP and UDP.
    let ports: *const [u16; 2] = ptr_at(ctx, p.l4_off).ok_or(Stat::PassMalformed)?;
    // SAFETY: bounds checked by `ptr_at`.
    let old_ports = unsafe { *ports };
    let new_ports = [sport.to_be(), dport.to_be()];
    let udp = p.key.protocol == IPPROTO_UDP;
    let check_off = p.l4_off + if udp { UDP_CHECK_OFF } else { TCP_CHECK_OFF };
    let v6 = p.family != FAMILY_V4;
    ctx.l4_csum_add(
        check_off,
        addrs,
        L4Check {
            pseudo: true,
            udp,
            v6,
        },
    )?;
    ctx.l4_csum_add(
        check_off,
        csum::sum(
            csum::diff16(old_ports[0], new_ports[0]),
            csum::diff16(old_ports[1], new_ports[1]),
        ),
        L4Check {
            pseudo: false,
            udp,
            v6,
        },
    )?;
    let ports: *mut [u16; 2] = ptr_at(ctx, p.l4_off).ok_or(Stat::PassMalformed)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe { *ports = new_ports };
    Ok(())
}
