//! DSR replies that the balancer's host routes: a backend's answer from the VIP to the client,
//! when the balancer is also the backends' gateway (a Docker host for its containers on a
//! bridge, or any host that routes for its backends' subnet).
//!
//! The kernel would forward such a reply as any routed packet: a pass through its input
//! route, the forward path and the egress device's queue. At tc the balancer sends it itself
//! as it sends a NAT reply (route lookup, next hop, redirect, into a veth peer's ingress where
//! it can), with the addresses and ports left as they are and the TTL / hop limit decremented
//! as a router does. Only a reply of a flow the balancer placed is taken: from a `dsr`
//! service's VIP and port, to a client whose flow is in `CONNTRACK`, in a frame addressed to
//! this host with no VLAN tag outside it, an IPv4 header without options. Any other packet,
//! and one the route lookup does not answer with a next hop (a local destination, no route,
//! too big for the egress, a GSO super-packet whose segments are too big for the egress
//! device), goes to the kernel untouched, which does what it did before.
//!
//! What the kernel's forward path would have done and these replies skip, as NAT replies
//! and the client's packets of the same flows (sent on from the hook) do: netfilter
//! (`PREROUTING`, `FORWARD`, `POSTROUTING`), the reverse-path filter, IPsec (xfrm) policies,
//! policy routing by mark, TOS or ports (the lookup gives only the addresses, the protocol
//! and the ingress), a route's own `mtu` for a GSO super-packet (its segments are checked
//! against the egress device's), and any later program on the hook. The conntrack gate
//! keeps that to the 5-tuples of flows the balancer placed. It does not prove who sent the
//! client's packet: the balancer places a flow from any source address at its hook, before
//! the reverse-path filter, so a sender that forges a source address X places a flow whose
//! replies then go to X, and a host on a backend's side can send packets from the VIP and
//! port to X past the host's firewall.

use lb_common::{
    maps::{FAMILY_V4, MODE_DSR},
    FlowKey, Stat,
};

use crate::{
    balancer, csum,
    fib::{self, Out},
    frame::Frame,
    maps::{CONNTRACK, SERVICES},
    parse::{ptr_at, Ipv4Hdr, Ipv6Hdr, Parsed, IPV4_CHECK_OFF},
    stats,
};

/// An IPv4 header without options, in bytes.
const IPV4_HDR_LEN: usize = 20;

/// Sends on the parsed packet `p` (TCP or UDP, TTL / hop limit above 1, no NAT reply) if it is
/// a reply of a `dsr` flow the balancer placed (see the module docs) and the route to its
/// destination has a next hop; `now_ns` is the packet's time ([`crate::clock::now_ns`]).
/// Returns the hook's action. `Err(Stat::PassNotVip)` for every packet it leaves to the
/// kernel, untouched; `Err(Stat::PassMalformed)` only satisfies the verifier (`parse` proved
/// the headers it reads).
#[inline(always)]
pub fn send<C: Frame>(ctx: &C, p: &Parsed, now_ns: u64) -> Result<u32, Stat> {
    // IPv4 options need the kernel (source routes refused, record route written); replies
    // do not carry them.
    let options = p.family == FAMILY_V4 && p.l4_off != p.l3_off + IPV4_HDR_LEN;
    if !C::SENDS_DSR_REPLIES || options || !ctx.routed_here() || !from_dsr_vip(p) || !placed(p) {
        return Err(Stat::PassNotVip);
    }
    let routed = fib::lookup(
        ctx,
        p.family,
        p.key.protocol,
        &p.key.src_addr,
        &p.key.dst_addr,
        p.ip_len,
        now_ns,
    );
    if routed.is_err() || !fib::egress().is_some_and(|out| ctx.segments_fit(out)) {
        return Err(Stat::PassNotVip);
    }
    // The redirect takes effect when the program returns: the hop limit is decremented after
    // `send`, once it is known that the packet leaves by it (a local destination passes
    // unchanged). `send` writes the Ethernet addresses only for a next hop it then sends to,
    // which at tc cannot fail.
    match fib::send(ctx, fib::Peer::Allowed) {
        Ok(Out::Sent(action)) => {
            decrement_hop(ctx, p)?;
            stats::increment(Stat::DsrReplies);
            Ok(action)
        }
        Ok(Out::Pass) | Err(_) => Err(Stat::PassNotVip),
    }
}

/// Whether the client flow `p` answers (its 5-tuple turned around) is in `CONNTRACK`: a
/// flow the balancer placed. The entry is only looked at, not renewed: the client's packets
/// keep it.
#[inline(always)]
fn placed(p: &Parsed) -> bool {
    let client = FlowKey {
        src_addr: p.key.dst_addr,
        dst_addr: p.key.src_addr,
        src_port: p.key.dst_port,
        dst_port: p.key.src_port,
        protocol: p.key.protocol,
        family: p.family,
        _pad: [0; 2],
    };
    // SAFETY: the key lives on the stack for the call; the value is not read.
    unsafe { CONNTRACK.get(&client) }.is_some()
}

/// Whether `p`'s source address and port are a VIP of a `dsr` service (of `p`'s family).
#[inline(always)]
fn from_dsr_vip(p: &Parsed) -> bool {
    balancer::service_at(&p.key.src_addr, p.key.src_port, p.key.protocol, p.family)
        .and_then(|service| SERVICES.get(service))
        .is_some_and(|s| s.mode == MODE_DSR && s.family == p.family)
}

/// Decrements the TTL (IPv4, its header checksum with it) or hop limit (IPv6) of `p`, which
/// the caller found above 1. `Err(Stat::PassMalformed)` only satisfies the verifier.
#[inline(always)]
fn decrement_hop<C: Frame>(ctx: &C, p: &Parsed) -> Result<(), Stat> {
    if p.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        let (ttl, proto) = unsafe { ((*ip).ttl, (*ip).protocol) };
        // TTL and protocol share one 16-bit word of the header checksum (memory order).
        ctx.l3_csum_add(
            p.l3_off + IPV4_CHECK_OFF,
            csum::diff16(
                u16::from_ne_bytes([ttl, proto]),
                u16::from_ne_bytes([ttl.wrapping_sub(1), proto]),
            ),
        )?;
        // Taken anew after a `Frame` checksum method, as the trait asks.
        let ip: *mut Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { (*ip).ttl = ttl.wrapping_sub(1) };
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        let (next, hop) = unsafe { ((*ip).nexthdr, (*ip).hop_limit) };
        // SAFETY: as above.
        unsafe { (*ip).hop_limit = hop.wrapping_sub(1) };
        // No header checksum covers the hop limit: a tc packet's sum of its bytes follows it.
        ctx.complete_sum_add(csum::diff16(
            u16::from_ne_bytes([next, hop]),
            u16::from_ne_bytes([next, hop.wrapping_sub(1)]),
        ));
    }
    Ok(())
}
