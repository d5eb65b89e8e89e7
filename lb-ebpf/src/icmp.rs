//! ICMP errors about NAT'ed flows, translated for the host on the other side of the NAT, so
//! path MTU discovery (and "port unreachable") works through the balancer in both directions.
//!
//! Towards the client. A backend, or a router between the balancer and a backend, that
//! cannot deliver a packet of a translated flow (`local_addr`:SNAT port → backend) sends its
//! ICMP error to `local_addr`, quoting the packet's headers. When the quote matches a
//! `NAT_REVERSE` entry (the quote's 5-tuple reversed is the reply key), the error is
//! rewritten as if the VIP had sent it about the client's own packet: outer VIP → client,
//! quoted client:port → VIP:port. Counted as `Stat::IcmpTranslated`.
//!
//! Towards the backend. A router on the client's side that cannot forward a NAT reply (VIP:port
//! → client:port; "fragmentation needed" / "packet too big" when the client's path has a
//! smaller MTU) sends its error to the VIP. When the quote's source is a `nat` service's VIP
//! and port (`VIPS`, the outer destination being that VIP) and the client flow (the quote's
//! 5-tuple reversed, client → VIP) is in `CONNTRACK` with a SNAT port, the error is rewritten
//! as if `local_addr` had sent it about the backend's own reply: outer `local_addr` → backend,
//! quoted backend:port → `local_addr`:SNAT port. Counted as `Stat::IcmpToBackend`. The outer
//! source becomes `local_addr`, not the router's address: the backend has a route back to
//! `local_addr` (its replies go there) over the interface the error arrives on, so a
//! reverse-path filter on the backend lets it in, while a client-side router's address may
//! have no route there at all; the backend's stack matches the error to its socket by the
//! quote, not by who sent it. It is also what the client direction does (the error comes from
//! the address the quoted packet was sent to). The router's address is lost to the backend.
//! An error that claims a path MTU below `MIN_REPLY_PATH_MTU` (1280) is dropped instead
//! (`Stat::DropIcmpLowMtu`): the backend caches one path MTU towards `local_addr` for all its
//! NAT'ed flows, so a forged or odd error would shrink every client's segments.
//!
//! In both directions the quoted IP header checksum, the quoted TCP / UDP checksum when the
//! quote holds it (an IPv4 UDP checksum of 0 stays 0), the outer IPv4 header checksum and the
//! ICMP checksum (ICMPv6: with its pseudo-header of the outer addresses) are updated
//! incrementally; the rest of the message (the MTU of a "fragmentation needed" / "packet too
//! big") is kept, which is right because NAT does not change a packet's size. Every access to
//! the quote is bounded by the ICMP message's IP length, not only by the frame.
//!
//! Translated: ICMPv4 destination unreachable (type 3, every code, including 4,
//! fragmentation needed) and ICMPv6 destination unreachable (1) and packet too big (2).
//! Everything else (echo, an error about an unknown flow, a quote of something other than TCP
//! or UDP, a quoted IPv4 header with a bad IHL) passes untouched as `Stat::PassNotVip`, as
//! ICMP always did. Errors about `dsr` flows pass too: towards the client they never reach the
//! balancer (the backend answers the client directly), and errors sent to a `dsr` VIP are
//! about replies (the backends send them with the VIP as source), which the balancer did not
//! translate even where it routed them (`dsr_reply`); the balancer's kernel drops them, as
//! before.

use lb_common::{
    flow::{IPPROTO_TCP, IPPROTO_UDP},
    maps::{VipKey, FAMILY_V4, MIN_REPLY_PATH_MTU, MODE_NAT},
    FlowKey, Stat,
};

use crate::{
    csum,
    fib::{self, Out},
    frame::Frame,
    maps::{BACKENDS, CONNTRACK, SERVICES, VIPS},
    nat,
    parse::{
        self, addr6, groups6, halves, ptr_at, word, Ipv4Hdr, Ipv6Hdr, Parsed, IPPROTO_ICMP,
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

/// What the quoted packet becomes: `src`:`sport` → `dst`:`dport` (addresses in `FlowKey`'s
/// layout, ports in host order). The outer header becomes `dst` → `src`: the error comes
/// from the host the quoted packet was sent to, and goes to the one that sent it.
struct Translation {
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    /// The counter of a translated error sent on.
    stat: Stat,
}

/// Whether the ICMP error at `l4_off` is a "fragmentation needed" (IPv4 type 3 code 4) or
/// "packet too big" (ICMPv6 type 2) claiming a path MTU below `MIN_REPLY_PATH_MTU`. Such an
/// error about a reply is not passed on to the backend: see `Stat::DropIcmpLowMtu`.
#[inline(always)]
fn claims_low_mtu<C: Frame>(ctx: &C, family: u8, l4_off: usize) -> bool {
    let Some(head) = ptr_at::<[u8; 8]>(ctx, l4_off) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let h = unsafe { *head };
    let mtu = if family == FAMILY_V4 {
        if h[0] != 3 || h[1] != 4 {
            return false;
        }
        u32::from(u16::from_be_bytes([h[6], h[7]]))
    } else {
        if h[0] != 2 {
            return false;
        }
        u32::from_be_bytes([h[4], h[5], h[6], h[7]])
    };
    mtu < MIN_REPLY_PATH_MTU
}

/// The quote is a NAT reply VIP:vport → client:cport (`src`:`sport` → `dst`:`dport`, ports
/// in host order) of a `nat` service, sent to the VIP (`outer_dst`): its translation as the
/// backend's own reply, backend:bport → `local_addr`:SNAT port, found through the client's
/// `CONNTRACK` entry, while `NAT_REVERSE` says the port is still the flow's. `None` for
/// anything else (not a VIP, a `dsr` service, an unknown flow, a port taken over).
#[inline(always)]
fn to_backend(
    family: u8,
    outer_dst: &[u32; 4],
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    protocol: u8,
) -> Option<Translation> {
    // A router sends its error to the source of the packet it could not forward.
    if src != outer_dst {
        return None;
    }
    let vip = VipKey {
        addr: *src,
        port: sport,
        protocol,
        family,
    };
    // SAFETY: a live map value, copied out at once.
    let service_id = unsafe { (*VIPS.get_ptr(&vip)?).service };
    // Read in place: the balancer's stack is tight (see `balancer::to_backend`).
    let service = SERVICES.get(service_id)?;
    if service.mode != MODE_NAT || service.family != family {
        return None;
    }
    let client = FlowKey {
        src_addr: *dst,
        dst_addr: *src,
        src_port: dport,
        dst_port: sport,
        protocol,
        family,
        _pad: [0; 2],
    };
    // SAFETY: a live map value; the two fields are copied out at once.
    let (backend_id, snat_port) = unsafe {
        let entry = CONNTRACK.get_ptr(&client)?;
        ((*entry).backend, (*entry).snat_port)
    };
    if snat_port == 0 {
        return None;
    }
    let backend = BACKENDS.get(backend_id)?;
    if backend.family != family {
        return None;
    }
    let local = *nat::flow_local(service_id, service, &client)?;
    // The port must still be this flow's: a client's entry outlives its port, which another
    // flow to the same backend may have taken since (an idle UDP flow's). The error would
    // then reach the backend as one about that other flow.
    let reply = FlowKey {
        src_addr: backend.addr,
        dst_addr: local,
        src_port: backend.port,
        dst_port: snat_port,
        protocol,
        family,
        _pad: [0; 2],
    };
    if !nat::owned_by(nat::find(&reply)?, &client) {
        return None;
    }
    Some(Translation {
        src: backend.addr,
        dst: local,
        sport: backend.port,
        dport: snat_port,
        stat: Stat::IcmpToBackend,
    })
}

/// The quote is a translated packet `local_addr`:SNAT port → backend (`src`:`sport` →
/// `dst`:`dport`): its translation as the client's own packet client:cport → VIP:vport,
/// found through `NAT_REVERSE`. `None` for an unknown flow.
#[inline(always)]
fn to_client(
    family: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    protocol: u8,
) -> Option<Translation> {
    // The quote's reply, the `NAT_REVERSE` key, is the quote reversed.
    let reply = FlowKey {
        src_addr: *dst,
        dst_addr: *src,
        src_port: dport,
        dst_port: sport,
        protocol,
        family,
        _pad: [0; 2],
    };
    let r = nat::find(&reply)?;
    // SAFETY: a live map value, its fields read in place (this subprogram's stack is full).
    unsafe {
        Some(Translation {
            src: (*r).client_addr,
            dst: (*r).vip_addr,
            sport: (*r).client_port,
            dport: (*r).vip_port,
            stat: Stat::IcmpTranslated,
        })
    }
}

/// An ICMP / ICMPv6 packet ([`parse::is_icmp`]): parsed, then translated if it is an error
/// about a NAT'ed flow, else passed. A BPF subprogram of its own, beside the balancing path
/// (see `balancer::handle`); `Ok` / `Err` as for [`translate`].
#[inline(never)]
pub fn handle<C: Frame>(ctx: &C) -> Result<u32, Stat> {
    let p = parse::parse(ctx)?;
    if p.key.protocol != IPPROTO_ICMP && p.key.protocol != IPPROTO_ICMPV6 {
        // `is_icmp` and `parse` read the same field; this only keeps the two honest.
        return Err(Stat::PassNotVip);
    }
    translate(ctx, &p)
}

/// Translates the ICMP error `p` (parsed with its ICMP header at `p.l4_off`) for the other
/// side of the NAT'ed flow it quotes and sends it on; `Ok` is the action. `Err` is the
/// counter: `PassNotVip` for ICMP this module leaves alone (untouched), or a forwarding
/// counter after the rewrite (as for a NAT reply).
#[inline(always)]
fn translate<C: Frame>(ctx: &C, p: &Parsed) -> Result<u32, Stat> {
    let icmp: *mut [u16; 2] = ptr_at(ctx, p.l4_off).ok_or(Stat::PassNotVip)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (kind, icmp_check) = unsafe { (((*icmp)[0] & 0xff) as u8, (*icmp)[1]) };
    if !translated(p.family, kind) {
        return Err(Stat::PassNotVip);
    }
    // The quote ends where the ICMP message does, not at the frame's end: bytes after it
    // (an Ethernet trailer) are no part of the message and must not be rewritten.
    let ip_end = p.l3_off + p.ip_len as usize;
    let inner_l3 = p.l4_off + ICMP_HDR;
    // The quoted packet's addresses, protocol and the offset of its ports.
    let (src, dst, protocol, inner_l4) = if p.family == FAMILY_V4 {
        if inner_l3 + core::mem::size_of::<Ipv4Hdr>() > ip_end {
            return Err(Stat::PassNotVip);
        }
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
        if inner_l3 + core::mem::size_of::<Ipv6Hdr>() > ip_end {
            return Err(Stat::PassNotVip);
        }
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
    // Every error quotes at least 8 bytes of the transport header: the ports are there.
    if inner_l4 + 4 > ip_end {
        return Err(Stat::PassNotVip);
    }
    let ports: *mut [u16; 2] = ptr_at(ctx, inner_l4).ok_or(Stat::PassNotVip)?;
    // SAFETY: bounds checked by `ptr_at`.
    let old_ports = unsafe { *ports };
    let (sport, dport) = (u16::from_be(old_ports[0]), u16::from_be(old_ports[1]));
    let t = match to_backend(
        p.family,
        &p.key.dst_addr,
        &src,
        &dst,
        sport,
        dport,
        protocol,
    ) {
        Some(_) if claims_low_mtu(ctx, p.family, p.l4_off) => {
            return Err(Stat::DropIcmpLowMtu);
        }
        Some(t) => t,
        None => to_client(p.family, &src, &dst, sport, dport, protocol).ok_or(Stat::PassNotVip)?,
    };
    let new_ports = [t.sport.to_be(), t.dport.to_be()];

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
            let mut c = csum::replace_addr(old, &src, &t.src);
            c = csum::replace_addr(c, &dst, &t.dst);
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
    check = csum::replace_addr(check, &src, &t.src);
    check = csum::replace_addr(check, &dst, &t.dst);

    if p.family == FAMILY_V4 {
        let inner: *mut Ipv4Hdr = ptr_at(ctx, inner_l3).ok_or(Stat::PassNotVip)?;
        let outer: *mut Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassNotVip)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let old = (*inner).check;
            let mut c = csum::replace_addr(old, &src, &t.src);
            c = csum::replace_addr(c, &dst, &t.dst);
            check = csum::replace16(check, old, c);
            (*inner).check = c;
            (*inner).src = halves(t.src[0]);
            (*inner).dst = halves(t.dst[0]);
            // The outer header: from the quote's new destination to its new source.
            // ICMPv4's checksum has no pseudo-header.
            let mut c = csum::replace_addr((*outer).check, &p.key.src_addr, &t.dst);
            c = csum::replace_addr(c, &p.key.dst_addr, &t.src);
            (*outer).check = c;
            (*outer).src = halves(t.dst[0]);
            (*outer).dst = halves(t.src[0]);
        }
    } else {
        let inner: *mut Ipv6Hdr = ptr_at(ctx, inner_l3).ok_or(Stat::PassNotVip)?;
        let outer: *mut Ipv6Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassNotVip)?;
        // ICMPv6's checksum covers a pseudo-header with the outer addresses.
        check = csum::replace_addr(check, &p.key.src_addr, &t.dst);
        check = csum::replace_addr(check, &p.key.dst_addr, &t.src);
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            (*inner).src = groups6(&t.src);
            (*inner).dst = groups6(&t.dst);
            (*outer).src = groups6(&t.dst);
            (*outer).dst = groups6(&t.src);
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
    let now_ns = crate::clock::now_ns();
    match fib::forward(ctx, p.family, protocol, &t.dst, &t.src, p.ip_len, now_ns) {
        Ok(Out::Sent(action)) => {
            stats::increment(t.stat);
            Ok(action)
        }
        // As a NAT reply (`balancer::from_backend`): an error translated for a client whose
        // route leaves by an interface XDP cannot send to is forwarded by the kernel. One
        // for a backend goes out by an attached interface (placement sees to it).
        Ok(Out::Pass) | Err(Stat::DropNoDevmapEntry) => Err(Stat::FibPass),
        Err(stat) => Err(stat),
    }
}
