//! The next hop: `bpf_fib_lookup` in the balancer's namespace, the Ethernet addresses it
//! gives, then the hook's way out (see `frame`): on XDP, `XDP_TX` when the packet leaves by
//! the interface it came in on, else `XDP_REDIRECT` through `DEVMAP`; on tc, `bpf_redirect`
//! (`bpf_redirect_peer` for a translated packet towards a veth in `VETH_PEERS`; into a
//! bridge, to the port `BRIDGE_FDB` names), or `bpf_redirect_neigh` when the next hop's
//! Ethernet address is not known yet.
//!
//! A resolved answer is kept per CPU for the packets that follow on the same route (see
//! `next_hop`): most packets skip the kernel's lookup.
//!
//! The lookup is an input-route lookup from the ingress interface (as if the kernel forwarded
//! the packet), so the ingress interface must have forwarding enabled
//! (`net.ipv4.conf.<if>.forwarding`, `net.ipv6.conf.all.forwarding`), and the routes decide the
//! egress. A VLAN tag, if any, stays in the frame: the lookup does not consult VLAN
//! sub-interfaces, so on XDP tagged traffic is forwarded only when the route leads out of a
//! physical interface in `DEVMAP` (or back out of the ingress one). At tc ingress the kernel
//! has taken the tag into the socket buffer's metadata, and it goes with the packet.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED,
        BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::bpf_fib_lookup,
};
use lb_common::{maps::FAMILY_V4, Stat};

use crate::{
    frame::Frame,
    maps::FIB_SCRATCH,
    next_hop::{self, Query},
    parse::{ptr_at, EthHdr},
};

/// `AF_INET` for the lookup's `family`.
const AF_INET: u8 = 2;
/// `AF_INET6`.
const AF_INET6: u8 = 10;

/// How a rewritten packet leaves.
pub enum Out {
    /// Sent on: the hook's redirect or turn-around, the program's return value.
    Sent(u32),
    /// Handed to the kernel: no route to forward by (none at all, or a local destination;
    /// the kernel's own lookup answers `NOT_FWDED` for both), or, on XDP, no neighbour entry
    /// for the next hop yet. Counted as `Stat::FibPass`.
    Pass,
}

/// What a route lookup found.
#[derive(Clone, Copy)]
pub enum Hop {
    /// A next hop with its Ethernet address: [`send`] writes it and redirects.
    Resolved,
    /// A next hop whose neighbour entry is missing or not valid yet.
    Unresolved,
    /// Nothing to forward by: the packet is the kernel's.
    Local,
}

impl Hop {
    /// The hop as a word to keep in a map value; [`Hop::from_word`] reads it back.
    #[inline(always)]
    fn word(self) -> u32 {
        match self {
            Hop::Resolved => 0,
            Hop::Unresolved => 1,
            Hop::Local => 2,
        }
    }

    /// The hop [`Hop::word`] gave `word`; any other word reads as [`Hop::Local`] (the packet
    /// goes to the kernel).
    #[inline(always)]
    fn from_word(word: u32) -> Hop {
        match word {
            0 => Hop::Resolved,
            1 => Hop::Unresolved,
            _ => Hop::Local,
        }
    }
}

/// Looks up the route from `src` to `dst` (`family`, L4 `protocol`; `ip_len` bytes of IP
/// packet, checked against the egress MTU; `now_ns`: the packet's time, from
/// [`crate::clock::now_ns`], read once per packet), and sends the packet by it ([`send`]).
/// `Err` is the drop counter: a blackhole / unreachable / prohibit route, MTU, forwarding
/// disabled, not in `DEVMAP`.
#[inline(always)]
pub fn forward<C: Frame>(
    ctx: &C,
    family: u8,
    protocol: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
    ip_len: u16,
    now_ns: u64,
) -> Result<Out, Stat> {
    lookup(ctx, family, protocol, src, dst, ip_len, now_ns)?;
    send(ctx, Peer::Allowed)
}

/// The route lookup of [`forward`] alone, so the packet can be changed (translated,
/// encapsulated) between the lookup and [`send`], and a packet too big for the route be
/// answered before. `Err(Stat::DropMtu)` when `ip_len` exceeds the route's MTU, which
/// [`path_mtu`] then tells (a tc GSO super-packet is not checked: see `Frame::mtu_len`);
/// other `Err`s as [`forward`]'s.
///
/// What it found (a [`Hop`]) is kept in this CPU's scratch slot for [`send`], not returned:
/// the verifier tracks the values a program holds, and each kind of hop held across the work
/// in between (NAT's port probes above all) would have it walk that work once more, where a
/// value read back from a map is one unknown.
#[inline(always)]
pub fn lookup<C: Frame>(
    ctx: &C,
    family: u8,
    protocol: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
    ip_len: u16,
    now_ns: u64,
) -> Result<(), Stat> {
    let hop = find(ctx, family, protocol, src, dst, ip_len, now_ns)?;
    let scratch = FIB_SCRATCH.get_ptr_mut(0).ok_or(Stat::DropNoRoute)?;
    // SAFETY: this CPU's slot of a live map entry; BPF programs do not preempt each other on
    // one CPU. Volatile: `send` reads it back as a value the verifier does not know.
    unsafe { (&raw mut (*scratch).hop).write_volatile(hop.word()) };
    Ok(())
}

/// The lookup itself, for [`lookup`].
#[inline(always)]
fn find<C: Frame>(
    ctx: &C,
    family: u8,
    protocol: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
    ip_len: u16,
    now_ns: u64,
) -> Result<Hop, Stat> {
    // The 64-byte parameter block lives in a per-CPU scratch slot, not on the stack: the
    // balancer is close to the verifier's 512-byte stack limit.
    let scratch = FIB_SCRATCH.get_ptr_mut(0).ok_or(Stat::DropNoRoute)?;
    // SAFETY: only forms the field's address.
    let params: *mut FibParams = unsafe { &raw mut (*scratch).params };
    let q = Query {
        family: if family == FAMILY_V4 {
            AF_INET
        } else {
            AF_INET6
        },
        protocol,
        ingress: ctx.ingress_ifindex(),
        src,
        dst,
        tot_len: ctx.mtu_len(ip_len),
        now: now_ns,
    };
    // SAFETY: this CPU's slot of a live map entry; BPF programs do not preempt each other on
    // one CPU, so nothing else uses it until this packet is done with it.
    if next_hop::answer(&q, unsafe { &mut *params }) {
        return Ok(Hop::Resolved);
    }
    // SAFETY: as above. All-zero is a valid `bpf_fib_lookup` (plain integers and unions of
    // them).
    let params = unsafe {
        zero(params);
        &mut *params
    };
    params.l4_protocol = protocol;
    params.__bindgen_anon_1.tot_len = q.tot_len;
    params.ifindex = q.ingress;
    params.family = q.family;
    if family == FAMILY_V4 {
        params.__bindgen_anon_3.ipv4_src = src[0];
        params.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        params.__bindgen_anon_3.ipv6_src = *src;
        params.__bindgen_anon_4.ipv6_dst = *dst;
    }
    // SAFETY: `params` is a valid, writable `bpf_fib_lookup` of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.raw(),
            params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        next_hop::remember(&q, params);
        return Ok(Hop::Resolved);
    }
    next_hop::forget(&q);
    if rc < 0 {
        return Err(Stat::DropNoRoute);
    }
    match rc as u32 {
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(Hop::Unresolved),
        BPF_FIB_LKUP_RET_NOT_FWDED => Ok(Hop::Local),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Stat::DropMtu),
        BPF_FIB_LKUP_RET_FWD_DISABLED => Err(Stat::DropForwardingDisabled),
        _ => Err(Stat::DropNoRoute),
    }
}

const _: () = assert!(
    core::mem::offset_of!(FibParams, smac) == 52
        && core::mem::offset_of!(FibParams, dmac) == 58
        && core::mem::size_of::<FibParams>() == 64
);

/// Zeroes the parameter block `params` (a per-CPU map value, 8-byte aligned) with eight
/// 64-bit stores. `core::ptr::write_bytes` compiles to a call of the object's `memset`, which
/// on BPF is a loop storing one byte per turn: 64 turns, about 320 instructions, per packet.
/// Volatile, so that LLVM does not turn the stores back into that call.
///
/// # Safety
/// `params` points to a writable `bpf_fib_lookup` that is 8-byte aligned. The Rust type is
/// only 4-aligned; `FIB_SCRATCH`'s value is 8-aligned because the kernel rounds a per-CPU
/// array's values up to 8 bytes and allocates them 8-aligned.
#[inline(always)]
unsafe fn zero(params: *mut FibParams) {
    const WORDS: usize = core::mem::size_of::<FibParams>() / 8;
    const _: () = assert!(core::mem::size_of::<FibParams>() == WORDS * 8);
    let words = params as *mut u64;
    let mut i = 0;
    while i < WORDS {
        // SAFETY: word `i` of the block, within it and aligned (see the caller's promise).
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
}

/// Copies the Ethernet address `src` to `dst` as three 16-bit words. A plain array
/// assignment into the packet compiles to a call of the object's byte-at-a-time `memmove`
/// (the compiler cannot tell the two apart), twice per forwarded packet.
///
/// # Safety
/// Both point to 6 valid bytes at even addresses: the frame's Ethernet header starts at an
/// even offset (see `parse`), `bpf_fib_lookup`'s `smac` and `dmac` sit at bytes 52 and 58 and
/// `next_hop::NextHop`'s at 44 and 50 (asserted), both structs in 8-aligned map values.
#[inline(always)]
pub unsafe fn copy_mac(dst: *mut [u8; 6], src: *const [u8; 6]) {
    let (d, s) = (dst as *mut u16, src as *const u16);
    // SAFETY: as the caller promises.
    unsafe {
        d.write(s.read());
        d.add(1).write(s.add(1).read());
        d.add(2).write(s.add(2).read());
    }
}

/// The interface the route leads out of, after a [`lookup`] on this CPU found a next hop
/// (resolved or not); after any other answer, not an egress (the lookup's input, or what
/// the slot last held).
#[inline(always)]
pub fn egress() -> Option<u32> {
    let scratch = FIB_SCRATCH.get_ptr(0)?;
    // SAFETY: this CPU's slot, written by the lookup of the packet being handled.
    Some(unsafe { (*scratch).params.ifindex })
}

/// The route's MTU after a [`lookup`] on this CPU answered `Err(Stat::DropMtu)`.
#[inline(always)]
pub fn path_mtu() -> Option<u16> {
    let scratch = FIB_SCRATCH.get_ptr(0)?;
    // SAFETY: this CPU's slot, written by the lookup of the packet being handled; on
    // FRAG_NEEDED the kernel stores the MTU in the union that held `tot_len`.
    Some(unsafe { (*scratch).params.__bindgen_anon_1.mtu_result })
}

/// Whether a packet may go straight into a veth peer's ingress (tc, `VETH_PEERS`), skipping
/// the veth's transmit and with it any XDP program on the peer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A translated packet (NAT, NAT replies, ICMP errors) or a DSR reply: nothing on the other
    /// side needs the veth's transmit path.
    Allowed,
    /// A DSR tunnel packet: the backend's decapsulator may sit at the peer's XDP hook
    /// (`lb-daemon decap`'s default), which only the veth's transmit runs.
    Transmit,
}

/// Sends the packet by what the last [`lookup`] on this CPU found: to a resolved next
/// hop with its Ethernet addresses written (into a veth peer's ingress where `peer` allows
/// and the hook can); to an unresolved one by the kernel's neighbour resolution where the
/// hook has it (tc), else to the kernel. `Err(Stat::DropNoDevmapEntry)` when XDP may not
/// redirect to the egress interface; the packet's Ethernet addresses are then as they came,
/// so that the caller may still hand it to the kernel.
#[inline(always)]
pub fn send<C: Frame>(ctx: &C, peer: Peer) -> Result<Out, Stat> {
    let scratch = FIB_SCRATCH.get_ptr(0).ok_or(Stat::DropNoRoute)?;
    // SAFETY: this CPU's slot, written by the lookup of the packet being handled.
    let (params, hop) = unsafe {
        (
            &(*scratch).params,
            Hop::from_word((&raw const (*scratch).hop).read_volatile()),
        )
    };
    match hop {
        Hop::Resolved => {
            // The redirect takes effect when the program returns: asked for first, so that a
            // refusal leaves the frame untouched.
            let action = ctx.redirect(params.ifindex, &params.dmac, peer == Peer::Allowed)?;
            let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Stat::PassMalformed)?;
            // SAFETY: bounds checked by `ptr_at`.
            unsafe {
                copy_mac(&raw mut (*eth).dst, &params.dmac);
                copy_mac(&raw mut (*eth).src, &params.smac);
            }
            Ok(Out::Sent(action))
        }
        Hop::Unresolved => Ok(ctx
            .redirect_neigh(params.ifindex)
            .map_or(Out::Pass, Out::Sent)),
        Hop::Local => Ok(Out::Pass),
    }
}
