//! The answer to a client's packet that would not fit the backend link (`nat`: as it is,
//! `dsr`: once encapsulated), and to a backend's TCP NAT reply that would not fit the route
//! to the client: ICMP
//! "fragmentation needed" (type 3 code 4, RFC 1191) for IPv4 with DF, ICMPv6 "packet too big"
//! (type 2, RFC 8201) for IPv6, back to the sender (from the VIP to the client; from the SNAT
//! address to the backend), so the sender lowers its path MTU and resends smaller instead of
//! its packets vanishing (a path-MTU black hole). Katran answers the same way.
//!
//! The packet is turned into the answer in place: the frame grows at the front by
//! the new IP and ICMP headers, the Ethernet header (and VLAN tag) moves to the new start with
//! its addresses swapped, and the packet stays behind the ICMP header as the quote,
//! cut to [`QUOTE_V4`] / [`QUOTE_V6`] bytes. The announced MTU is the route's less the outer
//! header. At most `TOO_BIG_PER_SECOND` answers a second per CPU (a flood of big packets must
//! not turn into a flood of answers); over it, and for IPv4 without DF (the balancer does not
//! fragment), the packet is dropped (`Stat::DropMtu`). On tc a GSO super-packet is not
//! checked, nor answered (see `Frame::mtu_len`). At tc the packet may have
//! arrived `CHECKSUM_PARTIAL`, and then the device rewrites the quoted transport checksum at
//! transmit: the ICMP checksum is built to hold either way (see `write_head`).

use aya_ebpf::helpers::{bpf_csum_diff, bpf_ktime_get_ns};
use lb_common::{
    flow::IPPROTO_UDP,
    maps::{FAMILY_V4, TOO_BIG_PER_SECOND},
    Stat,
};

use crate::{
    csum,
    frame::{Frame, L4Check, Room},
    maps::TOO_BIG_BUDGET,
    parse::{
        ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Parsed, IPPROTO_ICMP, IPPROTO_ICMPV6, TCP_CHECK_OFF,
        UDP_CHECK_OFF,
    },
};

/// Bytes of the sender's IPv4 packet quoted: its header (options included) and well over the
/// 8 bytes of transport header RFC 792 asks for.
pub const QUOTE_V4: usize = 128;
/// Bytes of the sender's IPv6 packet quoted (RFC 4443 asks for as much as fits in 1280; the
/// checksum helper takes at most 512 bytes a call, and the transport header is at the start).
pub const QUOTE_V6: usize = 512;
/// The ICMP / ICMPv6 header: type, code, checksum and the 4 bytes that carry the MTU.
const ICMP_HDR_LEN: usize = 8;
/// IPv4 "don't fragment", network order.
const IP_DF: u16 = 0x4000_u16.to_be();

/// Answers the packet in `ctx` (parsed as `p`, a client's or a backend's NAT reply, not yet
/// changed) that the route lookup found too big once `outer_hdr` bytes of encapsulation are
/// added (0 but for DSR). Returns the hook's turn-around action with the answer in the frame,
/// or `Err(Stat::DropMtu)` when it is not answered (IPv4 without DF, over the rate limit, a
/// packet shorter than the quote) and the packet is to be dropped.
#[inline(always)]
pub fn answer<C: Frame>(ctx: &C, p: &Parsed, outer_hdr: u16) -> Result<u32, Stat> {
    let mtu = crate::fib::path_mtu()
        .ok_or(Stat::DropMtu)?
        .saturating_sub(outer_hdr);
    if p.family == FAMILY_V4 {
        v4(ctx, p, mtu)
    } else {
        v6(ctx, p, mtu)
    }
}

/// Takes one answer from this CPU's budget; `false` when the second's is spent.
#[inline(always)]
fn allowed() -> bool {
    let Some(budget) = TOO_BIG_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of a live map entry; BPF programs do not preempt each other on
    // one CPU.
    let budget = unsafe { &mut *budget };
    // SAFETY: a helper without arguments.
    let second = unsafe { bpf_ktime_get_ns() } / 1_000_000_000;
    if budget.second != second {
        budget.second = second;
        budget.sent = 0;
    }
    if budget.sent >= TOO_BIG_PER_SECOND as u64 {
        return false;
    }
    budget.sent += 1;
    true
}

/// Grows the frame's front by `hdr` bytes for the answer's IP and ICMP headers, moves the
/// link-layer header there with its addresses swapped, and cuts the tail after `quote` bytes
/// of the packet.
#[inline(always)]
fn make_room<C: Frame>(ctx: &C, p: &Parsed, hdr: usize, quote: usize) -> Result<(), Stat> {
    ctx.insert_room(p.l3_off, hdr, Room::Answer)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Stat::DropMtu)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        let src = (*eth).src;
        (*eth).src = (*eth).dst;
        (*eth).dst = src;
    }
    let want = p.l3_off + hdr + quote;
    if ctx.len() < want || !ctx.truncate(want) {
        return Err(Stat::DropMtu);
    }
    Ok(())
}

/// The one's-complement sum of `QUOTE` bytes at `offset` plus `seed`, by the kernel's helper.
#[inline(always)]
fn sum_quote<const QUOTE: usize>(ctx: &impl Frame, offset: usize, seed: u32) -> Result<u32, Stat> {
    let quote: *mut [u8; QUOTE] = ptr_at(ctx, offset).ok_or(Stat::DropMtu)?;
    // SAFETY: `QUOTE` bytes at `quote` lie within the packet (checked by `ptr_at`); the helper
    // only reads them.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            quote as *mut u32,
            QUOTE as u32,
            seed,
        )
    };
    if sum < 0 {
        return Err(Stat::DropMtu);
    }
    Ok(sum as u32)
}

/// The one's-complement sum of the quoted IP header: `len` bytes at `offset` (a multiple of 4,
/// at most 60, as an IPv4 header's length is; 40 for IPv6), by the kernel's helper.
#[inline(always)]
fn sum_quoted_header(ctx: &impl Frame, offset: usize, len: usize) -> Result<u32, Stat> {
    let hdr: *mut [u8; 60] = ptr_at(ctx, offset).ok_or(Stat::DropMtu)?;
    // SAFETY: 60 bytes at `hdr` lie within the packet (checked by `ptr_at`; the quote is
    // longer), and the mask keeps the length within them; the helper only reads.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            hdr as *mut u32,
            (len & 0x3c) as u32,
            0,
        )
    };
    if sum < 0 {
        return Err(Stat::DropMtu);
    }
    Ok(sum as u32)
}

/// Writes the ICMP header `head` (its checksum field 0) at `icmp_off`, with the checksum of
/// the message: `head`, the quote of `QUOTE` bytes behind it, and `seed` (the sum of `head`,
/// and for ICMPv6 of the pseudo-header).
///
/// On tc the packet may have arrived `CHECKSUM_PARTIAL`, and the answer still is:
/// at transmit the device (or the kernel, for one that offloads nothing) sums the socket
/// buffer from its checksum start, the quoted transport header, to the end and writes the
/// result into the quoted transport checksum. That changes the quote under the ICMP
/// checksum. Summed together, what the device writes and the bytes it sums come to the
/// complement of the field's value before (`Q`): so the checksum is first written for that
/// case (covering `head`, the quoted IP header, and `~Q` for the quote's transport part), and
/// the difference to the checksum of a packet that stays as written (the transport part's
/// sum, `Q` included, and `Q` again) goes in through the hook's checksum helper with
/// `pseudo` false, which a `CHECKSUM_PARTIAL` packet ignores and any other takes (XDP
/// always).
#[inline(always)]
fn write_head<C: Frame, const QUOTE: usize>(
    ctx: &C,
    p: &Parsed,
    icmp_off: usize,
    head: [u16; 4],
    seed: u32,
) -> Result<(), Stat> {
    let quote_off = icmp_off + ICMP_HDR_LEN;
    let quoted_ip = p.l4_off - p.l3_off;
    let check_off = if p.key.protocol == IPPROTO_UDP {
        UDP_CHECK_OFF
    } else {
        TCP_CHECK_OFF
    };
    let quoted_check: *const u16 =
        ptr_at(ctx, quote_off + quoted_ip + check_off).ok_or(Stat::DropMtu)?;
    // SAFETY: bounds checked by `ptr_at`.
    let q = unsafe { *quoted_check } as u32;
    let ip = csum::fold(sum_quoted_header(ctx, quote_off, quoted_ip)?) as u32;
    let whole = csum::fold(sum_quote::<QUOTE>(ctx, quote_off, 0)?) as u32;
    let transport = csum::sub(whole, ip);
    let mut head = head;
    head[1] = !csum::fold(csum::sub(csum::sum(csum::fold(seed) as u32, ip), q));
    let at: *mut [u16; 4] = ptr_at(ctx, icmp_off).ok_or(Stat::DropMtu)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe { *at = head };
    let whole_packet = L4Check {
        pseudo: false,
        udp: false,
        v6: p.family != FAMILY_V4,
    };
    ctx.l4_csum_add(icmp_off + 2, csum::sum(transport, q), whole_packet)
        .map_err(|_| Stat::DropMtu)
}

#[inline(always)]
fn v4<C: Frame>(ctx: &C, p: &Parsed, mtu: u16) -> Result<u32, Stat> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::DropMtu)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (df, sender, to) = unsafe { ((*ip).frag_off & IP_DF != 0, (*ip).src, (*ip).dst) };
    if !df || (p.ip_len as usize) < QUOTE_V4 || !allowed() {
        return Err(Stat::DropMtu);
    }
    let ip_hdr = core::mem::size_of::<Ipv4Hdr>();
    make_room(ctx, p, ip_hdr + ICMP_HDR_LEN, QUOTE_V4)?;

    let icmp_off = p.l3_off + ip_hdr;
    // Type 3 ("destination unreachable"), code 4 ("fragmentation needed"), checksum, 16
    // unused bits, the next hop's MTU (RFC 1191).
    let head = [u16::from_ne_bytes([3, 4]), 0, 0, mtu.to_be()];
    let seed = head[0] as u32 + head[3] as u32;
    write_head::<_, QUOTE_V4>(ctx, p, icmp_off, head, seed)?;

    let mut out = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: ((ip_hdr + ICMP_HDR_LEN + QUOTE_V4) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        protocol: IPPROTO_ICMP,
        check: 0,
        src: to,
        dst: sender,
    };
    // SAFETY: `Ipv4Hdr` is 20 bytes of plain integers, `#[repr(C)]` with alignment 2 and no
    // padding: viewing it as ten `u16`s reads exactly its bytes.
    let words: [u16; 10] = unsafe { core::mem::transmute_copy(&out) };
    out.check = csum::ipv4_header(&words);
    let at: *mut Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::DropMtu)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe { *at = out };
    Ok(ctx.turn_around())
}

#[inline(always)]
fn v6<C: Frame>(ctx: &C, p: &Parsed, mtu: u16) -> Result<u32, Stat> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::DropMtu)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (sender, to) = unsafe { ((*ip).src, (*ip).dst) };
    if (p.ip_len as usize) < QUOTE_V6 || !allowed() {
        return Err(Stat::DropMtu);
    }
    let ip_hdr = core::mem::size_of::<Ipv6Hdr>();
    make_room(ctx, p, ip_hdr + ICMP_HDR_LEN, QUOTE_V6)?;

    let icmp_off = p.l3_off + ip_hdr;
    let upper_len = (ICMP_HDR_LEN + QUOTE_V6) as u16;
    // Type 2 ("packet too big"), code 0, checksum, the 32-bit MTU (RFC 4443 §3.2).
    let head = [u16::from_ne_bytes([2, 0]), 0, 0, mtu.to_be()];
    // The pseudo-header (RFC 8200 §8.1): addresses, upper-layer length, next header.
    let mut seed = head[0] as u32 + head[3] as u32;
    seed += upper_len.to_be() as u32 + (IPPROTO_ICMPV6 as u16).to_be() as u32;
    let mut i = 0;
    while i < 8 {
        seed += to[i] as u32 + sender[i] as u32;
        i += 1;
    }
    write_head::<_, QUOTE_V6>(ctx, p, icmp_off, head, seed)?;

    let out = Ipv6Hdr {
        vtc_flow: [0x6000_u16.to_be(), 0],
        payload_len: upper_len.to_be(),
        nexthdr: IPPROTO_ICMPV6,
        hop_limit: 64,
        src: to,
        dst: sender,
    };
    let at: *mut Ipv6Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::DropMtu)?;
    // SAFETY: bounds checked by `ptr_at`.
    unsafe { *at = out };
    Ok(ctx.turn_around())
}
