//! The next hop: `bpf_fib_lookup` in the balancer's namespace, the Ethernet addresses it
//! gives, then `XDP_TX` when the packet leaves by the interface it came in on, else
//! `XDP_REDIRECT` through `DEVMAP`.
//!
//! The lookup is an input-route lookup from the ingress interface (as if the kernel forwarded
//! the packet), so the ingress interface must have forwarding enabled
//! (`net.ipv4.conf.<if>.forwarding`, `net.ipv6.conf.all.forwarding`), and the routes decide the
//! egress. A VLAN tag, if any, stays in the frame: the lookup does not consult VLAN
//! sub-interfaces, so tagged traffic is forwarded only when the route leads out of a physical
//! interface in `DEVMAP` (or back out of the ingress one).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{maps::FAMILY_V4, Stat};

use crate::{
    maps::{DEVMAP, FIB_SCRATCH},
    parse::{ptr_at, EthHdr},
};

/// `AF_INET` for the lookup's `family`.
const AF_INET: u8 = 2;
/// `AF_INET6`.
const AF_INET6: u8 = 10;

/// How a rewritten packet leaves.
pub enum Out {
    /// Sent on: `XDP_TX` or `XDP_REDIRECT`, the program's return value.
    Sent(u32),
    /// Handed to the kernel (`XDP_PASS`): no neighbour entry for the next hop yet, or no
    /// route to forward by (none at all, or a local destination; the kernel's own lookup
    /// answers `NOT_FWDED` for both). Counted as `Stat::FibPass`.
    Pass,
}

/// Looks up the route from `src` to `dst` (`family`, L4 `protocol`; `ip_len` bytes of IP
/// packet, checked against the egress MTU), writes the next hop's Ethernet addresses and picks
/// the action. `Err` is the drop counter: a blackhole / unreachable / prohibit route, MTU,
/// forwarding disabled, not in `DEVMAP`.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    family: u8,
    protocol: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
    ip_len: u16,
) -> Result<Out, Stat> {
    if lookup(ctx, family, protocol, src, dst, ip_len)? {
        Ok(Out::Sent(send(ctx)?))
    } else {
        Ok(Out::Pass)
    }
}

/// The route lookup of [`forward`] alone, so the packet can be changed between the lookup and
/// [`send`] (DSR encapsulates only a packet that fits). `Ok(true)`: a next hop, for
/// [`send`]; `Ok(false)`: hand the packet to the kernel ([`Out::Pass`]). `Err(Stat::DropMtu)`
/// when `ip_len` exceeds the route's MTU, which [`path_mtu`] then tells; other `Err`s as
/// [`forward`]'s.
#[inline(always)]
pub fn lookup(
    ctx: &XdpContext,
    family: u8,
    protocol: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
    ip_len: u16,
) -> Result<bool, Stat> {
    // The 64-byte parameter block lives in a per-CPU scratch slot, not on the stack: the
    // balancer is close to the verifier's 512-byte stack limit.
    let params: *mut FibParams = FIB_SCRATCH.get_ptr_mut(0).ok_or(Stat::DropNoRoute)?;
    // SAFETY: this CPU's slot of a live map entry; BPF programs do not preempt each other on
    // one CPU, so nothing else uses it until this packet is done with it. All-zero is a valid
    // `bpf_fib_lookup` (plain integers and unions of them).
    let params = unsafe {
        core::ptr::write_bytes(params, 0, 1);
        &mut *params
    };
    params.l4_protocol = protocol;
    params.__bindgen_anon_1.tot_len = ip_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    if family == FAMILY_V4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = src[0];
        params.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = *src;
        params.__bindgen_anon_4.ipv6_dst = *dst;
    }
    // SAFETY: `params` is a valid, writable `bpf_fib_lookup` of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc < 0 {
        return Err(Stat::DropNoRoute);
    }
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(true),
        BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_NOT_FWDED => Ok(false),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Stat::DropMtu),
        BPF_FIB_LKUP_RET_FWD_DISABLED => Err(Stat::DropForwardingDisabled),
        _ => Err(Stat::DropNoRoute),
    }
}

/// The route's MTU after a [`lookup`] on this CPU answered `Err(Stat::DropMtu)`.
#[inline(always)]
pub fn path_mtu() -> Option<u16> {
    let params: *const FibParams = FIB_SCRATCH.get_ptr(0)?;
    // SAFETY: this CPU's slot, written by the lookup of the packet being handled; on
    // FRAG_NEEDED the kernel stores the MTU in the union that held `tot_len`.
    Some(unsafe { (*params).__bindgen_anon_1.mtu_result })
}

/// Sends the packet to the next hop the last successful [`lookup`] on this CPU found: writes
/// its Ethernet addresses and returns `XDP_TX` (out of the ingress interface) or
/// `XDP_REDIRECT` through `DEVMAP`. `Err(Stat::DropNoDevmapEntry)` when the egress interface
/// is not in `DEVMAP`.
#[inline(always)]
pub fn send(ctx: &XdpContext) -> Result<u32, Stat> {
    let params: *const FibParams = FIB_SCRATCH.get_ptr(0).ok_or(Stat::DropNoRoute)?;
    // SAFETY: this CPU's slot, written by the lookup of the packet being handled.
    let params = unsafe { &*params };
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Stat::PassMalformed)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        (*eth).dst = params.dmac;
        (*eth).src = params.smac;
    }
    if params.ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(xdp_action::XDP_TX);
    }
    if DEVMAP.get_ifindex(params.ifindex).is_none() {
        return Err(Stat::DropNoDevmapEntry);
    }
    // The lookup just succeeded; should the entry vanish in between, the packet is dropped.
    Ok(DEVMAP
        .redirect(params.ifindex, xdp_action::XDP_DROP as u64)
        .unwrap_or(xdp_action::XDP_DROP))
}
