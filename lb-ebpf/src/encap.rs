//! DSR encapsulation (IPIP for IPv4, IP6IP6 for IPv6) on the balancer, and its removal on the
//! backend host by `lb_decap`, for the outer destinations `DECAP_ADDRS` names.
//!
//! The outer header goes between the Ethernet header (and its VLAN tag, kept) and the client's
//! IP packet, which stays byte for byte as it arrived: the backend sees the client's address
//! and the VIP, and answers the client directly. Outer header: source the service's
//! `local_addr`, destination the backend, TTL / hop limit 64, IPv4 with DF set and the inner
//! TOS copied, IPv6 with the flow's hash as flow label (so ECMP spreads flows, not packets).

use lb_common::{
    flow::IPPROTO_UDP,
    maps::{FAMILY_V4, FAMILY_V6},
    Stat,
};

use crate::{
    csum,
    frame::{Frame, Room},
    maps::{DECAP_ADDRS, DECAP_SOURCES},
    parse::{
        addr6, addr_key, groups6, halves, ptr_at, word, EthHdr, Ipv4Hdr, Ipv6Hdr, Parsed, ETH_P_IP,
        ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_CHECK_OFF,
    },
};

/// Outer TTL / hop limit of encapsulated packets.
const OUTER_TTL: u8 = 64;
/// IPv4 "don't fragment" flag, network order.
const IP_DF: u16 = 0x4000_u16.to_be();

/// The link-layer header (Ethernet, and the VLAN tag when there is one) saved before the
/// packet's head moves.
#[derive(Clone, Copy)]
pub struct LinkHdr {
    eth: [u16; 7],
    vlan: [u16; 2],
    tagged: bool,
}

/// Reads the link-layer header in front of the IP header at `l3_off`.
#[inline(always)]
pub fn save_link<C: Frame>(ctx: &C, l3_off: usize) -> Result<LinkHdr, Stat> {
    let eth: *const [u16; 7] = ptr_at(ctx, 0).ok_or(Stat::PassMalformed)?;
    let tagged = l3_off > core::mem::size_of::<EthHdr>();
    let mut link = LinkHdr {
        // SAFETY: bounds checked by `ptr_at`.
        eth: unsafe { *eth },
        vlan: [0; 2],
        tagged,
    };
    if tagged {
        let vlan: *const [u16; 2] =
            ptr_at(ctx, core::mem::size_of::<EthHdr>()).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        link.vlan = unsafe { *vlan };
    }
    Ok(link)
}

/// Writes `link` at the packet's (new) start.
#[inline(always)]
pub fn restore_link<C: Frame>(ctx: &C, link: &LinkHdr) -> Result<(), Stat> {
    let eth: *mut [u16; 7] = ptr_at(ctx, 0).ok_or(Stat::PassMalformed)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe { *eth = link.eth };
    if link.tagged {
        let vlan: *mut [u16; 2] =
            ptr_at(ctx, core::mem::size_of::<EthHdr>()).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { *vlan = link.vlan };
    }
    Ok(())
}

/// Wraps the parsed client packet in an outer header from `src` to `dst` (the service's
/// family). Returns the outer IP packet's length, for the MTU check. `Err(Stat::DropAdjustHead)`
/// when the room for the outer header cannot be made (XDP: no headroom in the frame; tc: the
/// kernel refused to grow the buffer).
#[inline(always)]
pub fn encapsulate<C: Frame>(
    ctx: &C,
    p: &Parsed,
    src: &[u32; 4],
    dst: &[u32; 4],
    flow_label: u32,
) -> Result<u16, Stat> {
    if p.family == FAMILY_V4 {
        let inner: *const Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        let tos = unsafe { (*inner).tos };
        let hdr = core::mem::size_of::<Ipv4Hdr>();
        let udp = p.key.protocol == IPPROTO_UDP;
        ctx.insert_room(p.l3_off, hdr, Room::Tunnel { v6: false, udp })?;
        let outer_len = p.ip_len.wrapping_add(hdr as u16);
        let mut outer = Ipv4Hdr {
            version_ihl: 0x45,
            tos,
            tot_len: outer_len.to_be(),
            id: 0,
            frag_off: IP_DF,
            ttl: OUTER_TTL,
            protocol: IPPROTO_IPIP,
            check: 0,
            src: halves(src[0]),
            dst: halves(dst[0]),
        };
        // SAFETY: `Ipv4Hdr` is 20 bytes of plain integers, `#[repr(C)]` with alignment 2 and
        // no padding: viewing it as ten `u16`s reads exactly its bytes.
        let words: [u16; 10] = unsafe { core::mem::transmute_copy(&outer) };
        outer.check = csum::ipv4_header(&words);
        let at: *mut Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { *at = outer };
        Ok(outer_len)
    } else {
        let inner: *const Ipv6Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        let first = u16::from_be(unsafe { (*inner).vtc_flow[0] });
        // The inner traffic class (DSCP and ECN) is copied out, as IPv4's TOS is: routers on
        // the way see the packet's class, and mark congestion where the backend's
        // decapsulator carries it in (RFC 6040).
        let class = u32::from((first >> 4) & 0xff);
        let hdr = core::mem::size_of::<Ipv6Hdr>();
        let udp = p.key.protocol == IPPROTO_UDP;
        ctx.insert_room(p.l3_off, hdr, Room::Tunnel { v6: true, udp })?;
        let vtc_flow = (6u32 << 28) | (class << 20) | (flow_label & 0x000f_ffff);
        let outer = Ipv6Hdr {
            vtc_flow: [((vtc_flow >> 16) as u16).to_be(), (vtc_flow as u16).to_be()],
            payload_len: p.ip_len.to_be(),
            nexthdr: IPPROTO_IPV6,
            hop_limit: OUTER_TTL,
            src: groups6(src),
            dst: groups6(dst),
        };
        // SAFETY: `Ipv6Hdr` is 40 bytes of plain integers, `#[repr(C)]` with alignment 2 and
        // no padding: viewing it as twenty `u16`s reads exactly its bytes.
        let words: [u16; 20] = unsafe { core::mem::transmute_copy(&outer) };
        let at: *mut Ipv6Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { *at = outer };
        // The kernel summed the inserted room as zeros; unlike an IPv4 header, whose checksum
        // makes its bytes sum to zero, an IPv6 header's bytes add to a tc packet's sum.
        let mut total = 0u32;
        let mut i = 0;
        while i < words.len() {
            total += words[i] as u32;
            i += 1;
        }
        ctx.complete_sum_add(csum::fold(total) as u32);
        Ok(p.ip_len.wrapping_add(hdr as u16))
    }
}

/// What `lb_decap` did with a packet.
pub enum Decap {
    /// An IPIP / IP6IP6 packet for a local address: its outer header stripped.
    Stripped,
    /// Not encapsulated (or an outer fragment, or malformed): untouched.
    Plain,
    /// Encapsulated, but the outer destination is not in `DECAP_ADDRS`: untouched.
    NotLocal,
    /// Encapsulated for a local address, but the outer source is not in `DECAP_SOURCES` (not
    /// a balancer): to be dropped.
    BadSource,
}

/// `lb_decap`'s work: strips the outer header of an IPIP (IPv4 protocol 4) or IP6IP6 (IPv6
/// next header 41) packet whose outer destination is a local address (`DECAP_ADDRS`) and
/// whose outer source is a balancer (`DECAP_SOURCES`); the caller passes the inner packet to
/// the stack. A tunnel for a local address from another source is [`Decap::BadSource`], to
/// be dropped. Every other packet is left untouched and must pass.
#[inline(always)]
pub fn decapsulate<C: Frame>(ctx: &C) -> Decap {
    let Ok((l3_off, proto)) = crate::parse::l3(ctx) else {
        return Decap::Plain;
    };
    let (outer_len, src, dst, outer_ce) = if proto == ETH_P_IP {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
            return Decap::Plain;
        };
        // SAFETY: bounds checked by `ptr_at`.
        let (version_ihl, frag_off, protocol, src, dst) = unsafe {
            (
                (*ip).version_ihl,
                (*ip).frag_off,
                (*ip).protocol,
                (*ip).src,
                (*ip).dst,
            )
        };
        let ihl = ((version_ihl & 0x0f) as usize) * 4;
        if version_ihl >> 4 != 4 || ihl < 20 || protocol != IPPROTO_IPIP {
            return Decap::Plain;
        }
        // SAFETY: bounds checked by `ptr_at`.
        let outer_ce = unsafe { (*ip).tos } & ECN_MASK == ECN_CE;
        if u16::from_be(frag_off) & 0x3fff != 0 {
            return Decap::Plain;
        }
        // The inner IPv4 header must be there.
        if ptr_at::<Ipv4Hdr>(ctx, l3_off + ihl).is_none() {
            return Decap::Plain;
        }
        let dst = addr_key([word(dst[0], dst[1]), 0, 0, 0], FAMILY_V4);
        let src = addr_key([word(src[0], src[1]), 0, 0, 0], FAMILY_V4);
        (ihl, src, dst, outer_ce)
    } else if proto == ETH_P_IPV6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3_off) else {
            return Decap::Plain;
        };
        // SAFETY: bounds checked by `ptr_at`.
        let (nexthdr, src, dst, first) =
            unsafe { ((*ip).nexthdr, (*ip).src, (*ip).dst, (*ip).vtc_flow[0]) };
        if nexthdr != IPPROTO_IPV6 {
            return Decap::Plain;
        }
        let outer_ce = (u16::from_be(first) >> 4) as u8 & ECN_MASK == ECN_CE;
        let hdr = core::mem::size_of::<Ipv6Hdr>();
        if ptr_at::<Ipv6Hdr>(ctx, l3_off + hdr).is_none() {
            return Decap::Plain;
        }
        let dst = addr_key(addr6(&dst), FAMILY_V6);
        let src = addr_key(addr6(&src), FAMILY_V6);
        (hdr, src, dst, outer_ce)
    } else {
        return Decap::Plain;
    };
    // SAFETY: the key lives on the stack for the call; the value is not read.
    if unsafe { DECAP_ADDRS.get(&dst) }.is_none() {
        return Decap::NotLocal;
    }
    // SAFETY: as above.
    if unsafe { DECAP_SOURCES.get(&src) }.is_none() {
        return Decap::BadSource;
    }
    // Same family inside and out, so the EtherType stays right.
    if !ctx.remove_room(l3_off, outer_len, proto == ETH_P_IPV6) {
        return Decap::Plain;
    }
    if outer_ce {
        carry_ce(ctx, l3_off, proto == ETH_P_IPV6);
    }
    Decap::Stripped
}

/// The ECN field's bits in an IPv4 TOS byte or IPv6 traffic class, and its value for
/// "congestion experienced" (RFC 3168).
const ECN_MASK: u8 = 0x03;
const ECN_CE: u8 = 0x03;

/// Marks the packet whose IP header (IPv6 when `v6`) is at `l3_off` as having met congestion,
/// if it is ECN-capable: a router between balancer and backend marked the outer header, and
/// the decapsulator carries the mark in (RFC 6040, section 4.2), else it would vanish with
/// the outer header and the sender would never slow down. A packet that is not ECN-capable
/// is left as it is (the RFC would drop it; a router that marks instead of dropping saw the
/// outer header's ECN field, which encapsulation copies from this one, so it does not
/// happen with lb's encapsulation).
#[inline(always)]
fn carry_ce<C: Frame>(ctx: &C, l3_off: usize, v6: bool) {
    if v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3_off) else {
            return;
        };
        // SAFETY: bounds checked by `ptr_at`.
        let old = unsafe { (*ip).vtc_flow[0] };
        let host = u16::from_be(old);
        if (host >> 4) as u8 & ECN_MASK == 0 {
            return;
        }
        let new = (host | (u16::from(ECN_CE) << 4)).to_be();
        // SAFETY: bounds checked by `ptr_at`; an aligned 16-bit field.
        unsafe { (*ip).vtc_flow[0] = new };
        // No header checksum covers it: a tc packet's sum of its bytes must follow.
        ctx.complete_sum_add(csum::diff16(old, new));
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
            return;
        };
        // SAFETY: bounds checked by `ptr_at`.
        let (version_ihl, tos) = unsafe { ((*ip).version_ihl, (*ip).tos) };
        if tos & ECN_MASK == 0 {
            return;
        }
        let new_tos = tos | ECN_CE;
        let diff = csum::diff16(
            u16::from_ne_bytes([version_ihl, tos]),
            u16::from_ne_bytes([version_ihl, new_tos]),
        );
        if ctx.l3_csum_add(l3_off + IPV4_CHECK_OFF, diff).is_err() {
            return;
        }
        // Taken anew after a `Frame` checksum method, as the trait asks.
        if let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) {
            // SAFETY: bounds checked by `ptr_at`.
            unsafe { (*ip).tos = new_tos };
        }
    }
}
