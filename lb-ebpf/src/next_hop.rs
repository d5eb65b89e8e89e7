//! The next-hop cache: what `bpf_fib_lookup` answered for a route, kept per CPU for
//! [`NEXT_HOP_TTL_NS`], so that the packets of a flow do not each pay a full FIB and neighbour
//! lookup (about a fifth of `lb_tc`'s time per packet in a profile of the 64-byte UDP benchmark:
//! `fib_table_lookup`, `bpf_ipv4_fib_lookup`, `fib_lookup_good_nhc`, `dev_get_by_index_rcu`).
//!
//! Only a resolved answer is kept (a next hop with its Ethernet address); a missing
//! neighbour, a local destination, a blackhole or an MTU refusal are looked up every time, and
//! such an answer also drops what the slot held for that route. An entry answers a lookup of
//! the same family, protocol, ingress interface, source and destination, and only for packets
//! no longer than one the kernel has passed on that route (`ok_len`). A GSO super-packet
//! (length 0) is answered by any fresh entry of its route: the kernel's lookup checks no MTU
//! for it either (the segments are checked where they are made).
//!
//! What this costs, for up to [`NEXT_HOP_TTL_NS`] after a change of routes, neighbours, MTUs,
//! interfaces or `forwarding`, on each CPU: packets follow the old answer. Those the kernel
//! would now refuse (a shrunk MTU, a neighbour gone, an egress interface deleted or down) are
//! counted as forwarded and lost further on, and the client gets no "too big" answer in that
//! window. A neighbour the kernel would mark stale is not confirmed by forwarded traffic
//! either way (`bpf_fib_lookup` does not do it).
//!
//! Slots are direct-mapped by a hash of the route's key ([`SLOTS`] per CPU); a collision
//! replaces the slot, and costs one lookup more.

use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use lb_common::maps::NEXT_HOP_TTL_NS;

use crate::{fib::copy_mac, maps::NEXT_HOPS, parse::copy_addr};

/// Entries per CPU (a power of two).
pub const SLOTS: u32 = 256;

/// One cached route answer. `#[repr(C)]`, 64 bytes; the Ethernet addresses at even offsets
/// (44 and 50) so that [`copy_mac`] can move them as 16-bit words.
#[repr(C)]
pub struct NextHop {
    /// The lookup's destination, in `FlowKey`'s layout.
    pub dst: [u32; 4],
    /// The lookup's source.
    pub src: [u32; 4],
    /// The interface the packet came in on.
    pub ingress: u32,
    /// The interface the route leads out of.
    pub egress: u32,
    /// `AF_INET` or `AF_INET6`, as the lookup's `family`.
    pub family: u8,
    /// The L4 protocol of the lookup (policy routing may select on it).
    pub protocol: u8,
    /// The longest IP packet, in bytes, the kernel has let through this route.
    pub ok_len: u16,
    /// The egress interface's Ethernet address.
    pub smac: [u8; 6],
    /// The next hop's Ethernet address.
    pub dmac: [u8; 6],
    /// Until when the entry answers, [`crate::clock::now_ns`] time; 0: empty.
    pub until_ns: u64,
}

const _: () = assert!(
    core::mem::offset_of!(NextHop, smac) == 44
        && core::mem::offset_of!(NextHop, dmac) == 50
        && core::mem::size_of::<NextHop>() == 64
);

/// What a route lookup is asked: the cache's key and the packet's length.
pub struct Query<'a> {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// The L4 protocol.
    pub protocol: u8,
    /// The ingress interface's index.
    pub ingress: u32,
    /// The source address.
    pub src: &'a [u32; 4],
    /// The destination address.
    pub dst: &'a [u32; 4],
    /// The lookup's `tot_len`: the IP packet's length in bytes, 0 for a GSO super-packet (no
    /// MTU check).
    pub tot_len: u16,
    /// The packet's time, [`crate::clock::now_ns`].
    pub now: u64,
}

/// Whether two addresses are equal, word by word (an array compare may become a `bcmp` call,
/// which BPF does not have).
#[inline(always)]
fn same_addr(a: &[u32; 4], b: &[u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// Whether the slot `e` is for the route `q` asks about (fresh or not).
///
/// # Safety
/// `e` is this CPU's slot of `NEXT_HOPS`.
#[inline(always)]
unsafe fn for_route(e: *const NextHop, q: &Query) -> bool {
    // SAFETY: as the caller promises; nothing else writes this CPU's slot meanwhile.
    unsafe {
        same_addr(&(*e).dst, q.dst)
            && same_addr(&(*e).src, q.src)
            && (*e).ingress == q.ingress
            && (*e).family == q.family
            && (*e).protocol == q.protocol
    }
}

/// This CPU's slot for the route `q` asks about. Every address word goes into the hash: IPv6
/// addresses of one subnet often differ only in the middle words, and IPv4 ones use the first.
#[inline(always)]
fn slot(q: &Query) -> Option<*mut NextHop> {
    let (d, s) = (q.dst, q.src);
    let mut h =
        (d[0] ^ d[1] ^ d[2] ^ d[3]) ^ (s[0] ^ s[1] ^ s[2] ^ s[3]).rotate_left(16) ^ q.ingress;
    h ^= h >> 16;
    h ^= h >> 8;
    NEXT_HOPS.get_ptr_mut(h & (SLOTS - 1))
}

/// Whether the slot `e` holds the route `q` asks about, fresh and proven for its length.
///
/// # Safety
/// `e` is this CPU's slot of `NEXT_HOPS`.
#[inline(always)]
unsafe fn matches(e: *const NextHop, q: &Query) -> bool {
    // SAFETY: as the caller promises; nothing else writes this CPU's slot meanwhile.
    unsafe {
        q.now < (*e).until_ns && for_route(e, q) && (q.tot_len == 0 || q.tot_len <= (*e).ok_len)
    }
}

/// Answers `q` from the cache: on a hit, writes the egress interface and both Ethernet
/// addresses into `params` (the fields `fib::send` reads) and returns `true`.
#[inline(always)]
pub fn answer(q: &Query, params: &mut FibParams) -> bool {
    let Some(e) = slot(q) else {
        return false;
    };
    // SAFETY: this CPU's slot of a live map entry (BPF programs do not preempt each other on
    // one CPU).
    unsafe {
        if !matches(e, q) {
            return false;
        }
        params.ifindex = (*e).egress;
        copy_mac(&raw mut params.smac, &(*e).smac);
        copy_mac(&raw mut params.dmac, &(*e).dmac);
    }
    true
}

/// Keeps the kernel's resolved answer `params` to `q` for [`NEXT_HOP_TTL_NS`], for packets up
/// to `q`'s length. (A fresh entry of the same route missed only for a longer packet, so the
/// new length is always the longer one.)
#[inline(always)]
pub fn remember(q: &Query, params: &FibParams) {
    let Some(e) = slot(q) else {
        return;
    };
    // SAFETY: as in `answer`.
    unsafe {
        (*e).dst = copy_addr(q.dst);
        (*e).src = copy_addr(q.src);
        (*e).ingress = q.ingress;
        (*e).egress = params.ifindex;
        (*e).family = q.family;
        (*e).protocol = q.protocol;
        (*e).ok_len = q.tot_len;
        copy_mac(&raw mut (*e).smac, &params.smac);
        copy_mac(&raw mut (*e).dmac, &params.dmac);
        (*e).until_ns = q.now.wrapping_add(NEXT_HOP_TTL_NS);
    }
}

/// Drops the slot's entry if it is for the route `q` asks about: the kernel just refused or
/// could not resolve the route (a longer packet than the entry's, or a route that changed), and
/// the shorter packets that follow must not keep the old answer.
#[inline(always)]
pub fn forget(q: &Query) {
    let Some(e) = slot(q) else {
        return;
    };
    // SAFETY: as in `answer`.
    unsafe {
        if for_route(e, q) {
            (*e).until_ns = 0;
        }
    }
}
