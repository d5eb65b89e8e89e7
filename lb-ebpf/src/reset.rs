//! Turning a TCP segment around into a RST to its sender, in place: a refused SYN (limits, no
//! SNAT port), so the client fails at once (as the proxy's reset makes it) instead of resending
//! its SYN until its connect times out; and a NAT segment of a flow the balancer cannot carry
//! on, so the client learns the connection is gone instead of retransmitting into a drop.
//!
//! The answer keeps the frame's Ethernet header (MACs swapped, a VLAN tag kept) and IP header
//! (addresses swapped; IPv4: no options, TTL 64, DF, new checksum; IPv6: hop limit 64), and
//! carries a bare 20-byte TCP header: ports swapped, and either the segment's acknowledgement
//! number as its sequence (a segment with ACK) or sequence 0 acknowledging the segment (its
//! sequence + its length: data, and one each for SYN and FIN; RFC 9293 §3.10.7.1), window 0. The frame's tail is cut to
//! that length. At tc the checksum is made through the kernel's helpers, so that a segment
//! that arrived `CHECKSUM_PARTIAL` (a local sender's, a virtual card's) leaves with the field
//! its device expects (see `answer`).

use lb_common::maps::FAMILY_V4;

use crate::{
    csum,
    frame::{Frame, L4Check},
    parse::{
        ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Parsed, TcpHdr, TCP_ACK, TCP_CHECK_OFF, TCP_FIN, TCP_RST,
        TCP_SYN,
    },
};

/// Length of the IPv4 header the answer can keep (no options).
const IPV4_HDR_LEN: usize = 20;
/// Length of the answer's TCP header.
const TCP_HDR_LEN: usize = 20;

/// Rewrites the TCP segment in `ctx` (parsed as `p`) into the RST answering it (RFC 9293
/// §3.10.7.1): a segment without ACK (a SYN) gets a RST+ACK acknowledging it, one with ACK a
/// bare RST whose sequence number is the segment's acknowledgement number, so the sender
/// takes it. Returns the hook's turn-around action (`XDP_TX`, or tc's redirect back out of the
/// interface the segment came in on), or `None` when it cannot (IPv4 options, a data offset
/// below 20 bytes or beyond the segment, or the tail cannot shrink) and the segment should be
/// dropped.
#[inline(always)]
pub fn answer<C: Frame>(ctx: &C, p: &Parsed) -> Option<u32> {
    let ip_hdr_len = p.l4_off - p.l3_off;
    if p.family == FAMILY_V4 && ip_hdr_len != IPV4_HDR_LEN {
        return None;
    }
    let tcp: *const TcpHdr = ptr_at(ctx, p.l4_off)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (seq, acked, data_off) = unsafe {
        let s = (*tcp).seq;
        let a = (*tcp).ack_seq;
        (
            u32::from_be(crate::parse::word(s[0], s[1])),
            (p.tcp_flags & TCP_ACK != 0).then_some(a),
            ((*tcp).off_flags[0] >> 4) as u32 * 4,
        )
    };
    // The segment's length as RFC 9293 counts it (SEG.LEN): its data, and one each for SYN
    // and FIN. A data offset outside the segment is a malformed header: not answered.
    let segment = (p.ip_len as u32).wrapping_sub(ip_hdr_len as u32);
    if data_off < TCP_HDR_LEN as u32 || data_off > segment {
        return None;
    }
    let seg_len = (segment - data_off)
        + (p.tcp_flags & TCP_SYN != 0) as u32
        + (p.tcp_flags & TCP_FIN != 0) as u32;
    let ack = seq.wrapping_add(seg_len);

    let end = p.l4_off + TCP_HDR_LEN;
    if !ctx.truncate(end) {
        return None;
    }

    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: every pointer below is bounds checked by `ptr_at` after the tail moved.
    unsafe {
        let src = (*eth).src;
        (*eth).src = (*eth).dst;
        (*eth).dst = src;
    }
    if p.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, p.l3_off)?;
        unsafe {
            let src = (*ip).src;
            (*ip).src = (*ip).dst;
            (*ip).dst = src;
            (*ip).version_ihl = 0x45;
            (*ip).tos = 0;
            (*ip).tot_len = ((IPV4_HDR_LEN + TCP_HDR_LEN) as u16).to_be();
            (*ip).id = 0;
            (*ip).frag_off = 0x4000u16.to_be();
            (*ip).ttl = 64;
            (*ip).check = 0;
            (*ip).check = csum::ipv4_header(&*(ip as *const [u16; 10]));
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, p.l3_off)?;
        unsafe {
            let src = (*ip).src;
            (*ip).src = (*ip).dst;
            (*ip).dst = src;
            (*ip).payload_len = (TCP_HDR_LEN as u16).to_be();
            (*ip).hop_limit = 64;
        }
    }
    let tcp: *mut TcpHdr = ptr_at(ctx, p.l4_off)?;
    unsafe {
        let sport = (*tcp).source;
        (*tcp).source = (*tcp).dest;
        (*tcp).dest = sport;
        match acked {
            // Their acknowledgement number, as it came (network order).
            Some(a) => {
                (*tcp).seq = a;
                (*tcp).ack_seq = [0, 0];
                (*tcp).off_flags = [5 << 4, TCP_RST];
            }
            None => {
                (*tcp).seq = [0, 0];
                (*tcp).ack_seq = crate::parse::halves(ack.to_be());
                (*tcp).off_flags = [5 << 4, TCP_RST | TCP_ACK];
            }
        }
        (*tcp).window = 0;
        (*tcp).urg_ptr = 0;
        (*tcp).check = 0;
    }
    // The checksum in two parts, through the hook's helpers, from a field of 0: a tc packet
    // that arrived CHECKSUM_PARTIAL still is, and the device (or the kernel, for one that
    // offloads nothing) will sum the TCP header into the field at transmit; the field must
    // then hold the pseudo-header's sum alone, which is what the helpers leave. A full
    // checksum there would be summed again and reach the client wrong.
    // SAFETY: bounds checked by `ptr_at`; read before the helpers move the packet.
    let header = csum::tcp_bare_header(unsafe { &*(tcp as *const [u16; 10]) });
    let how = |pseudo| L4Check {
        pseudo,
        udp: false,
        v6: p.family != FAMILY_V4,
    };
    let check = p.l4_off + TCP_CHECK_OFF;
    let pseudo = csum::tcp_bare_pseudo(&p.key.dst_addr, &p.key.src_addr);
    ctx.l4_csum_add(check, pseudo, how(true)).ok()?;
    ctx.l4_csum_add(check, header, how(false)).ok()?;
    Some(ctx.turn_around())
}
