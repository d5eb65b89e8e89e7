//! ICMP errors about NAT'ed flows, translated back to the client, so path MTU discovery (and
//! "port unreachable") works through the balancer.
//!
//! A backend, or a router between the balancer and a backend, that cannot deliver a packet
//! of a translated flow (`local_addr`:SNAT port → backend) sends its ICMP error to
//! `local_addr`, quoting the packet's headers. When the quote matches a `NAT_REVERSE` entry
//! (the quote's 5-tuple reversed is the reply key), the error is rewritten as if the VIP had
//! sent it about the client's own packet: outer VIP → client, quoted client:port → VIP:port.
//! The quoted IP header checksum, the quoted TCP / UDP checksum when the quote holds it (an
//! IPv4 UDP checksum of 0 stays 0), and the ICMP checksum are updated incrementally; the
//! rest of the message (the MTU of a "fragmentation needed" / "packet too big") is kept,
//! which is right because NAT does not change a packet's size.
//!
//! Translated: ICMPv4 destination unreachable (type 3, every code, including 4,
//! fragmentation needed) and ICMPv6 destination unreachable (1) and packet too big (2).
//! Everything else (echo, an error about an unknown flow, a quote of something other than TCP
//! or UDP, a quoted IPv4 header with a bad IHL) passes untouched as `Stat::PassNotVip`, as
//! ICMP always did. Errors about `dsr` flows never reach the balancer (the backend answers
//! the client directly).
//!
//! Not translated yet: errors about the server → client direction. A router on the client's
//! side that cannot forward a NAT reply (source the VIP) sends its error to the VIP; the
//! quote's reversed 5-tuple is then a `CONNTRACK` key, not a `NAT_REVERSE` one, so the error
//! passes to the balancer's kernel, which drops it, and the backend does not learn that path's
//! MTU (large replies to such a client stall unless the backend clamps its MSS). Translating it
//! towards the backend (local_addr:SNAT port → backend) is the next step.

use lb_common::{
    flow::{IPPROTO_TCP, IPPROTO_UDP},
    maps::FAMILY_V4,
    FlowKey, Stat,
};

use aya_ebpf::programs::XdpContext;

use crate::{
    csum,
    fib::{self, Out},
    nat,
    parse::{
        addr6, groups6, halves, ptr_at, word, Ipv4Hdr, Ipv6Hdr, Parsed, IPPROTO_ICMP,
        IPPROTO_ICMPV6, TCP_CHECK_OFF, UDP_CHECK_OFF,
    },
    stats,
};

/// Length of the ICMP / ICMPv6 header before the quoted packet.
const ICMP_HDR: usize = 8;
/// Offset of the checksum in the ICMP / ICMPv6 header.
const ICMP_CHECK_OFF: usize = 2;

/// Whether an ICMP message of `kind` (type) in `family` is an error this module translates.
#[inline(always)]
fn translated(family: u8, kind: u8) -> bool {
    if family == FAMILY_V4 {
        kind == 3
    } else {
        kind == 1 || kind == 2
    }
}

/// Translates the ICMP error `p` (parsed with its ICMP header at `p.l4_off`) back to the
/// client of the NAT'ed flow it quotes and sends it on; `Ok` is the action. `Err` is the
/// counter: `PassNotVip` for ICMP this module leaves alone (untouched), or a forwarding
/// counter after the rewrite (as for a NAT reply).
#[inline(always)]
pub fn translate(ctx: &XdpContext, p: &Parsed) -> Result<u32, Stat> {
    let icmp: *mut [u16; 2] = ptr_at(ctx, p.l4_off).ok_or(Stat::PassNotVip)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (kind, icmp_check) = unsafe { (((*icmp)[0] & 0xff) as u8, (*icmp)[1]) };
    if !translated(p.family, kind) {
        return Err(Stat::PassNotVip);
    }
    let inner_l3 = p.l4_off + ICMP_HDR;
    // The quoted packet's addresses, protocol and the offset of its ports.
    let (src, dst, protocol, inner_l4) = if p.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, inner_l3).ok_or(Stat::PassNotVip)?;
        // SAFETY: bounds checked by `ptr_at`.
        let (version_ihl, protocol, s, d) =
            unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).src, (*ip).dst) };
        // Masked, so the verifier knows the header length is at most 60 bytes.
        let ihl = ((version_ihl & 0x0f) as usize) * 4;
        if version_ihl >> 4 != 4 || ihl < 20 {
            return Err(Stat::PassNotVip);
        }
        (
            [word(s[0], s[1]), 0, 0, 0],
            [word(d[0], d[1]), 0, 0, 0],
            protocol,
            inner_l3 + ihl,
        )
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, inner_l3).ok_or(Stat::PassNotVip)?;
        // SAFETY: bounds checked by `ptr_at`.
        let (nexthdr, s, d) = unsafe { ((*ip).nexthdr, (*ip).src, (*ip).dst) };
        (
            addr6(&s),
            addr6(&d),
            nexthdr,
            inner_l3 + core::mem::size_of::<Ipv6Hdr>(),
        )
    };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Err(Stat::PassNotVip);
    }
    // The quote ends where the ICMP message does, not at the frame's end: bytes after it
    // (an Ethernet trailer) are no part of the message and must not be rewritten.
    let ip_end = p.l3_off + p.ip_len as usize;
    // Every error quotes at least 8 bytes of the transport header: the ports are there.
    if inner_l4 + 4 > ip_end {
        return Err(Stat::PassNotVip);
    }
    let ports: *mut [u16; 2] = ptr_at(ctx, inner_l4).ok_or(Stat::PassNotVip)?;
    // SAFETY: bounds checked by `ptr_at`.
    let old_ports = unsafe { *ports };
    // The quote is balancer → backend; its reply, the `NAT_REVERSE` key, is the reverse.
    let reply = FlowKey {
        src_addr: dst,
        dst_addr: src,
        src_port: u16::from_be(old_ports[1]),
        dst_port: u16::from_be(old_ports[0]),
        protocol,
        _pad: [0; 3],
    };
    let r = nat::reverse(&reply).ok_or(Stat::PassNotVip)?;
    let new_ports = [r.client_port.to_be(), r.vip_port.to_be()];

    // The quoted transport checksum, when the quote holds it. Its pseudo-header holds the
    // quoted addresses.
    let mut check = icmp_check;
    let l4_check_off = if protocol == IPPROTO_UDP {
        UDP_CHECK_OFF
    } else {
        TCP_CHECK_OFF
    };
    let quoted_check = if inner_l4 + l4_check_off + 2 <= ip_end {
        ptr_at::<u16>(ctx, inner_l4 + l4_check_off)
    } else {
        None
    };
    if let Some(l4_check) = quoted_check {
        // SAFETY: bounds checked by `ptr_at`.
        let old = unsafe { *l4_check };
        if !(protocol == IPPROTO_UDP && p.family == FAMILY_V4 && old == 0) {
            let mut c = csum::replace_addr(old, &src, &r.client_addr);
            c = csum::replace_addr(c, &dst, &r.vip_addr);
            c = csum::replace16(c, old_ports[0], new_ports[0]);
            c = csum::replace16(c, old_ports[1], new_ports[1]);
            if protocol == IPPROTO_UDP {
                c = csum::udp_nonzero(c);
            }
            check = csum::replace16(check, old, c);
            // SAFETY: as above.
            unsafe { *l4_check = c };
        }
    }
    check = csum::replace16(check, old_ports[0], new_ports[0]);
    check = csum::replace16(check, old_ports[1], new_ports[1]);
    // SAFETY: bounds checked by `ptr_at` above; nothing moved the packet since.
    unsafe { *ports = new_ports };
    check = csum::replace_addr(check, &src, &r.client_addr);
    check = csum::replace_addr(check, &dst, &r.vip_addr);

    if p.family == FAMILY_V4 {
        let inner: *mut Ipv4Hdr = ptr_at(ctx, inner_l3).ok_or(Stat::PassNotVip)?;
        let outer: *mut Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassNotVip)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let old = (*inner).check;
            let mut c = csum::replace_addr(old, &src, &r.client_addr);
            c = csum::replace_addr(c, &dst, &r.vip_addr);
            check = csum::replace16(check, old, c);
            (*inner).check = c;
            (*inner).src = halves(r.client_addr[0]);
            (*inner).dst = halves(r.vip_addr[0]);
            // The outer header: VIP → client. ICMPv4's checksum has no pseudo-header.
            let mut c = csum::replace_addr((*outer).check, &p.key.src_addr, &r.vip_addr);
            c = csum::replace_addr(c, &p.key.dst_addr, &r.client_addr);
            (*outer).check = c;
            (*outer).src = halves(r.vip_addr[0]);
            (*outer).dst = halves(r.client_addr[0]);
        }
    } else {
        let inner: *mut Ipv6Hdr = ptr_at(ctx, inner_l3).ok_or(Stat::PassNotVip)?;
        let outer: *mut Ipv6Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassNotVip)?;
        // ICMPv6's checksum covers a pseudo-header with the outer addresses.
        check = csum::replace_addr(check, &p.key.src_addr, &r.vip_addr);
        check = csum::replace_addr(check, &p.key.dst_addr, &r.client_addr);
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            (*inner).src = groups6(&r.client_addr);
            (*inner).dst = groups6(&r.vip_addr);
            (*outer).src = groups6(&r.vip_addr);
            (*outer).dst = groups6(&r.client_addr);
        }
    }
    let at: *mut u16 = ptr_at(ctx, p.l4_off + ICMP_CHECK_OFF).ok_or(Stat::PassNotVip)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe { *at = check };

    let protocol = if p.family == FAMILY_V4 {
        IPPROTO_ICMP
    } else {
        IPPROTO_ICMPV6
    };
    match fib::forward(
        ctx,
        p.family,
        protocol,
        &r.vip_addr,
        &r.client_addr,
        p.ip_len,
    )? {
        Out::Sent(action) => {
            stats::increment(Stat::IcmpTranslated);
            Ok(action)
        }
        Out::Pass => Err(Stat::FibPass),
    }
}
