//! Header layouts and the parser: Ethernet with at most one 802.1Q tag, IPv4 with any IHL,
//! IPv6 without extension headers, then TCP or UDP.
//!
//! # The rule for what cannot be balanced
//!
//! A packet the parser cannot classify goes to the kernel untouched (`XDP_PASS`, tc's
//! `TC_ACT_UNSPEC`) and is
//! counted by reason: the balancer only forwards what it fully understood, and the kernel stack
//! remains the authority on broken packets (it drops them with its own counters).
//! - truncated or malformed headers (frame shorter than a header, IP version wrong, IHL < 5,
//!   an IP length beyond the frame, a TCP / UDP header beyond the IP length, TCP data offset
//!   < 5): `Stat::PassMalformed`;
//! - IPv4 fragments, first or later (later ones carry no ports): `Stat::PassFragment`, but
//!   `Stat::DropFragment` (dropped) when addressed to a VIP, which the kernel would route on;
//! - IPv6 extension headers before the transport header: `Stat::PassIpv6ExtHeaders`, or
//!   `Stat::DropIpv6ExtHeaders` (dropped) when addressed to a VIP;
//! - anything else that is not TCP or UDP over IP (ARP, a second VLAN tag...):
//!   `Stat::PassNotVip`, like TCP/UDP packets for no VIP. At tc ingress the kernel has taken
//!   the outer tag out of the packet already, so a tag the program sees there is a second one
//!   (see `Frame::TAG_IN_PACKET`).
//!
//! ICMP (over IPv4) and ICMPv6 (over IPv6 without extension headers) are parsed with ports 0,
//! for `icmp` to translate the errors about NAT'ed flows; it passes the rest as
//! `Stat::PassNotVip`.
//!
//! Every header struct is `#[repr(C)]` with fields no wider than 16 bits, so its alignment is 2:
//! Ethernet (14 bytes), a VLAN tag (4) and IP headers (multiples of 4) keep every header on an
//! even offset, so reading through these pointers is always aligned.

use lb_common::{
    flow::{IPPROTO_TCP, IPPROTO_UDP},
    maps::{DecapAddr, FAMILY_V4, FAMILY_V6},
    FlowKey, Stat,
};

use crate::{frame::Frame, maps::VIP_ADDRS};

/// EtherType of IPv4, as the 16-bit field reads in memory order (network order bytes 08 00).
pub const ETH_P_IP: u16 = 0x0800_u16.to_be();
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd_u16.to_be();
/// EtherType of an 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100_u16.to_be();

/// IPv4 protocol number of IPIP (an IPv4 packet inside IPv4).
pub const IPPROTO_IPIP: u8 = 4;
/// IPv6 next-header number of IPv6-in-IPv6.
pub const IPPROTO_IPV6: u8 = 41;
/// IPv4 protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IPv6 next-header number of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// Ethernet header.
#[repr(C)]
pub struct EthHdr {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// EtherType, network order.
    pub proto: u16,
}

/// 802.1Q tag, after the Ethernet addresses.
#[repr(C)]
pub struct VlanHdr {
    /// Priority, DEI and VLAN id, network order.
    pub tci: u16,
    /// The inner EtherType, network order.
    pub proto: u16,
}

/// IPv4 header without options.
#[repr(C)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and IHL in 32-bit words (low nibble).
    pub version_ihl: u8,
    /// DSCP and ECN.
    pub tos: u8,
    /// Total length in bytes, network order.
    pub tot_len: u16,
    /// Identification.
    pub id: u16,
    /// Flags and fragment offset, network order.
    pub frag_off: u16,
    /// Time to live.
    pub ttl: u8,
    /// Protocol of the payload.
    pub protocol: u8,
    /// Header checksum.
    pub check: u16,
    /// Source address (two memory-order halves).
    pub src: [u16; 2],
    /// Destination address.
    pub dst: [u16; 2],
}

/// IPv6 fixed header.
#[repr(C)]
pub struct Ipv6Hdr {
    /// Version, traffic class and flow label, network order in two halves.
    pub vtc_flow: [u16; 2],
    /// Payload length in bytes (after this header), network order.
    pub payload_len: u16,
    /// Next header.
    pub nexthdr: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source address (eight memory-order 16-bit groups).
    pub src: [u16; 8],
    /// Destination address.
    pub dst: [u16; 8],
}

/// TCP header without options.
#[repr(C)]
pub struct TcpHdr {
    /// Source port, network order.
    pub source: u16,
    /// Destination port, network order.
    pub dest: u16,
    /// Sequence number.
    pub seq: [u16; 2],
    /// Acknowledgement number.
    pub ack_seq: [u16; 2],
    /// Data offset (high nibble of the first byte) and flags (second byte).
    pub off_flags: [u8; 2],
    /// Window.
    pub window: u16,
    /// Checksum.
    pub check: u16,
    /// Urgent pointer.
    pub urg_ptr: u16,
}

/// UDP header.
#[repr(C)]
pub struct UdpHdr {
    /// Source port, network order.
    pub source: u16,
    /// Destination port, network order.
    pub dest: u16,
    /// Length of header and payload, network order.
    pub len: u16,
    /// Checksum (0 over IPv4: none).
    pub check: u16,
}

/// TCP flag bits in `TcpHdr::off_flags[1]`.
pub const TCP_SYN: u8 = 0x02;
/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// Offset of the checksum within the IPv4 header.
pub const IPV4_CHECK_OFF: usize = 10;
/// Offset of the checksum within the TCP header.
pub const TCP_CHECK_OFF: usize = 16;
/// Offset of the checksum within the UDP header.
pub const UDP_CHECK_OFF: usize = 6;

/// A pointer to a `T` at `offset` bytes into the packet, if the whole `T` lies in it.
///
/// The comparison against `data_end` is what the verifier needs to see before any access
/// through the pointer.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// What the parser found in a packet it can balance.
#[derive(Clone, Copy)]
pub struct Parsed {
    /// The 5-tuple as the packet carries it (source = sender).
    pub key: FlowKey,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Offset of the IP header: 14, or 18 after a VLAN tag.
    pub l3_off: usize,
    /// Offset of the TCP / UDP header.
    pub l4_off: usize,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// The IP packet's length: IPv4 total length, or IPv6 payload length + 40.
    pub ip_len: u16,
}

/// Offset of the IP header and its EtherType, after at most one VLAN tag.
#[inline(always)]
pub fn l3<C: Frame>(ctx: &C) -> Result<(usize, u16), Stat> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Stat::PassMalformed)?;
    // SAFETY: `ptr_at` checked that the header lies within the packet.
    let proto = unsafe { (*eth).proto };
    if proto != ETH_P_8021Q {
        return Ok((core::mem::size_of::<EthHdr>(), proto));
    }
    if !C::TAG_IN_PACKET {
        return Err(Stat::PassNotVip);
    }
    let vlan: *const VlanHdr =
        ptr_at(ctx, core::mem::size_of::<EthHdr>()).ok_or(Stat::PassMalformed)?;
    // SAFETY: as above.
    let inner = unsafe { (*vlan).proto };
    Ok((
        core::mem::size_of::<EthHdr>() + core::mem::size_of::<VlanHdr>(),
        inner,
    ))
}

/// Whether the packet in `ctx` is ICMP over IPv4 or ICMPv6 over IPv6, by the IP header's
/// protocol / next-header field after at most one VLAN tag: exactly the packets [`parse`]
/// returns with protocol `IPPROTO_ICMP` / `IPPROTO_ICMPV6` when it accepts them. Looks at
/// nothing else; a truncated header reads as not ICMP.
#[inline(always)]
pub fn is_icmp<C: Frame>(ctx: &C) -> bool {
    let Ok((l3_off, proto)) = l3(ctx) else {
        return false;
    };
    if proto == ETH_P_IP {
        ptr_at::<Ipv4Hdr>(ctx, l3_off)
            // SAFETY: bounds checked by `ptr_at`.
            .is_some_and(|ip| unsafe { (*ip).protocol } == IPPROTO_ICMP)
    } else if proto == ETH_P_IPV6 {
        ptr_at::<Ipv6Hdr>(ctx, l3_off)
            // SAFETY: as above.
            .is_some_and(|ip| unsafe { (*ip).nexthdr } == IPPROTO_ICMPV6)
    } else {
        false
    }
}

/// Parses the packet in `ctx`; `Err` is the counter of the pass rule it falls under (see the
/// module docs), and the packet must then be passed untouched.
#[inline(always)]
pub fn parse<C: Frame>(ctx: &C) -> Result<Parsed, Stat> {
    let (l3_off, proto) = l3(ctx)?;
    let frame_len = ctx.len();
    let (mut key, family, l4_off, ip_len) = if proto == ETH_P_IP {
        parse_ipv4(ctx, l3_off, frame_len)?
    } else if proto == ETH_P_IPV6 {
        parse_ipv6(ctx, l3_off, frame_len)?
    } else {
        return Err(Stat::PassNotVip);
    };
    // The transport header must lie within the IP packet, not merely within the frame: a short
    // packet's Ethernet padding is not a TCP or UDP header.
    let ip_end = l3_off + ip_len as usize;
    let l4_min = if key.protocol == IPPROTO_TCP {
        core::mem::size_of::<TcpHdr>()
    } else {
        core::mem::size_of::<UdpHdr>()
    };
    if (key.protocol == IPPROTO_TCP || key.protocol == IPPROTO_UDP) && l4_off + l4_min > ip_end {
        return Err(Stat::PassMalformed);
    }
    let mut tcp_flags = 0;
    if key.protocol == IPPROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(ctx, l4_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        let (source, dest, off_flags) = unsafe { ((*tcp).source, (*tcp).dest, (*tcp).off_flags) };
        if off_flags[0] >> 4 < 5 {
            return Err(Stat::PassMalformed);
        }
        key.src_port = u16::from_be(source);
        key.dst_port = u16::from_be(dest);
        tcp_flags = off_flags[1];
    } else if key.protocol == IPPROTO_UDP {
        let udp: *const UdpHdr = ptr_at(ctx, l4_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        let (source, dest) = unsafe { ((*udp).source, (*udp).dest) };
        key.src_port = u16::from_be(source);
        key.dst_port = u16::from_be(dest);
    } else if !(key.protocol == IPPROTO_ICMP && family == FAMILY_V4
        || key.protocol == IPPROTO_ICMPV6 && family == FAMILY_V6)
    {
        return Err(Stat::PassNotVip);
    }
    Ok(Parsed {
        key,
        family,
        l3_off,
        l4_off,
        tcp_flags,
        ip_len,
    })
}

#[inline(always)]
fn parse_ipv4<C: Frame>(
    ctx: &C,
    l3_off: usize,
    frame_len: usize,
) -> Result<(FlowKey, u8, usize, u16), Stat> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(Stat::PassMalformed)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (version_ihl, tot_len, frag_off, protocol, src, dst) = unsafe {
        (
            (*ip).version_ihl,
            u16::from_be((*ip).tot_len),
            u16::from_be((*ip).frag_off),
            (*ip).protocol,
            (*ip).src,
            (*ip).dst,
        )
    };
    // Masked, so the verifier knows the header length is at most 60 bytes.
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return Err(Stat::PassMalformed);
    }
    if (tot_len as usize) < ihl || l3_off + tot_len as usize > frame_len {
        return Err(Stat::PassMalformed);
    }
    // More-fragments flag or a non-zero offset.
    if frag_off & 0x3fff != 0 {
        return Err(for_vip(
            [word(dst[0], dst[1]), 0, 0, 0],
            FAMILY_V4,
            Stat::DropFragment,
            Stat::PassFragment,
        ));
    }
    let key = FlowKey {
        src_addr: [word(src[0], src[1]), 0, 0, 0],
        dst_addr: [word(dst[0], dst[1]), 0, 0, 0],
        protocol,
        family: FAMILY_V4,
        ..FlowKey::default()
    };
    Ok((key, FAMILY_V4, l3_off + ihl, tot_len))
}

/// The TTL (IPv4) or hop limit (IPv6) of the packet `parse` accepted as `p`; 0 when the header
/// cannot be read, which `parse` already ruled out.
#[inline(always)]
pub fn hop_limit<C: Frame>(ctx: &C, p: &Parsed) -> u8 {
    if p.family == FAMILY_V4 {
        // SAFETY: bounds checked by `ptr_at`.
        ptr_at::<Ipv4Hdr>(ctx, p.l3_off).map_or(0, |ip| unsafe { (*ip).ttl })
    } else {
        // SAFETY: as above.
        ptr_at::<Ipv6Hdr>(ctx, p.l3_off).map_or(0, |ip| unsafe { (*ip).hop_limit })
    }
}

/// `drop` when `addr` (of `family`) is a VIP's address (`VIP_ADDRS`), else `pass`: the verdict
/// on a packet the balancer cannot place (see the module docs).
#[inline(always)]
fn for_vip(addr: [u32; 4], family: u8, drop: Stat, pass: Stat) -> Stat {
    let key = addr_key(addr, family);
    // SAFETY: the key lives on the stack for the call; the value is not read.
    if unsafe { VIP_ADDRS.get(&key) }.is_some() {
        drop
    } else {
        pass
    }
}

/// The `DecapAddr` key of `addr` (of `family`), padding zeroed. Written as two stores, the
/// address and one 32-bit word holding `family` and the three padding bytes: a `[0; 3]`
/// field compiles to a call of the object's byte-at-a-time `memset`.
#[inline(always)]
pub fn addr_key(addr: [u32; 4], family: u8) -> DecapAddr {
    const _: () = assert!(
        core::mem::offset_of!(DecapAddr, family) == 16
            && core::mem::size_of::<DecapAddr>() == 20
            && cfg!(target_endian = "little")
    );
    let mut key = core::mem::MaybeUninit::<DecapAddr>::uninit();
    let p = key.as_mut_ptr();
    // SAFETY: both stores lie within `key` and are aligned (offset 16 of a 4-aligned struct);
    // together they write all 20 bytes, so the key is initialised. Little-endian (asserted):
    // `family` is the word's first byte, the padding its other three.
    unsafe {
        (&raw mut (*p).addr).write(addr);
        ((&raw mut (*p).family) as *mut u32).write(family as u32);
        key.assume_init()
    }
}

/// IPv6 next-header values that are extension headers (RFC 8200 §4, and AH, ESP is not one
/// we can look past either).
#[inline(always)]
fn is_ipv6_ext(nexthdr: u8) -> bool {
    matches!(nexthdr, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140)
}

#[inline(always)]
fn parse_ipv6<C: Frame>(
    ctx: &C,
    l3_off: usize,
    frame_len: usize,
) -> Result<(FlowKey, u8, usize, u16), Stat> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3_off).ok_or(Stat::PassMalformed)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (first, payload_len, nexthdr, src, dst) = unsafe {
        (
            (*ip).vtc_flow[0],
            u16::from_be((*ip).payload_len),
            (*ip).nexthdr,
            (*ip).src,
            (*ip).dst,
        )
    };
    let hdr = core::mem::size_of::<Ipv6Hdr>();
    if u16::from_be(first) >> 12 != 6 || l3_off + hdr + payload_len as usize > frame_len {
        return Err(Stat::PassMalformed);
    }
    if is_ipv6_ext(nexthdr) {
        return Err(for_vip(
            addr6(&dst),
            FAMILY_V6,
            Stat::DropIpv6ExtHeaders,
            Stat::PassIpv6ExtHeaders,
        ));
    }
    let key = FlowKey {
        src_addr: addr6(&src),
        dst_addr: addr6(&dst),
        protocol: nexthdr,
        family: FAMILY_V6,
        ..FlowKey::default()
    };
    Ok((
        key,
        FAMILY_V6,
        l3_off + hdr,
        payload_len.wrapping_add(hdr as u16),
    ))
}

/// A copy of the `FlowKey` address `a`, made word by word: a whole-array copy compiles to a
/// call of the object's byte-at-a-time `memmove` when the compiler cannot tell source and
/// destination apart (one of them in a map value).
#[inline(always)]
pub fn copy_addr(a: &[u32; 4]) -> [u32; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// The `FlowKey` address word made of two memory-order 16-bit halves.
#[inline(always)]
pub fn word(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// The two memory-order 16-bit halves of a `FlowKey` address word.
#[inline(always)]
pub fn halves(w: u32) -> [u16; 2] {
    [w as u16, (w >> 16) as u16]
}

/// The `FlowKey` address of the eight memory-order groups of an IPv6 header's address.
#[inline(always)]
pub fn addr6(groups: &[u16; 8]) -> [u32; 4] {
    [
        word(groups[0], groups[1]),
        word(groups[2], groups[3]),
        word(groups[4], groups[5]),
        word(groups[6], groups[7]),
    ]
}

/// The eight memory-order groups of a `FlowKey` IPv6 address.
#[inline(always)]
pub fn groups6(a: &[u32; 4]) -> [u16; 8] {
    let [g0, g1] = halves(a[0]);
    let [g2, g3] = halves(a[1]);
    let [g4, g5] = halves(a[2]);
    let [g6, g7] = halves(a[3]);
    [g0, g1, g2, g3, g4, g5, g6, g7]
}
