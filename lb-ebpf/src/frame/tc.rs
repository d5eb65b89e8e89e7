//! [`Frame`] for tc: a socket buffer at the ingress hook. The transport checksum follows a
//! rewrite through the kernel's helpers, which know the buffer's checksum state: a
//! `CHECKSUM_PARTIAL` packet (from a local sender or a veth, its transport checksum still to
//! be computed at transmit) keeps only the pseudo-header's sum in the field, and a
//! `CHECKSUM_COMPLETE` one carries the sum of its bytes beside them. The IPv4 header checksum
//! is updated in place (`l3_csum_add`). Room is made after the Ethernet header with
//! `bpf_skb_adjust_room`, which keeps GSO super-packets whole and segmentable.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS,
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_MARK_ENFORCE,
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    cty::c_void,
    helpers::{
        bpf_check_mtu, bpf_csum_update, bpf_l4_csum_replace, bpf_redirect, bpf_redirect_neigh,
        bpf_redirect_peer, bpf_skb_adjust_room, bpf_skb_change_tail, bpf_skb_pull_data,
    },
    programs::TcContext,
};
use lb_common::{
    flow::{IPPROTO_TCP, IPPROTO_UDP},
    maps::{bridge_bit, BridgeFdbKey},
    Stat,
};

use super::{Frame, L4Check, Room};
use crate::{
    csum,
    maps::{BRIDGES, BRIDGE_FDB, BRIDGE_PORTS, VETH_PEERS},
    parse::{
        ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, TcpHdr, UdpHdr, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP,
        IPPROTO_IPV6,
    },
};

/// `BPF_F_IPV6` for `bpf_l4_csum_replace` (Linux 6.16+; not in the bindings): the packet is
/// IPv6, whose header has no checksum, so a `CHECKSUM_COMPLETE` sum must not follow a
/// pseudo-header change (the address bytes and the transport checksum change by opposite
/// amounts). Older kernels refuse the flag with `-EINVAL`; the update is then made without
/// it, and the sum the kernel moved is moved back with `bpf_csum_update`.
const BPF_F_IPV6: u64 = 1 << 7;
/// `-EINVAL`.
const EINVAL: i64 = -22;
/// `skb->pkt_type` of a frame addressed to this host (`PACKET_HOST`, linux/if_packet.h).
const PACKET_HOST: u32 = 0;

/// Bytes from the packet's start the balancer may read directly: Ethernet, a VLAN tag, an
/// IPv6 header, ICMPv6 and the quoted IPv6 and TCP headers up to the quoted checksum (122
/// bytes). The most [`pull_headers`] makes directly readable.
const HEADERS: u32 = 128;

/// Makes the bytes the programs read in place directly readable ([`headers_len`]; all of a
/// shorter packet): a GRO'd or paged buffer may hold less in its linear part. A packet that
/// cannot be pulled is left as it is; the parser then passes what it cannot read.
///
/// Only what is read is pulled, because a pull beyond the linear part is a copy: a TCP
/// segment from a local sender or a veth keeps its headers in the linear part and its payload
/// in pages, and is a clone (the sender keeps the original for retransmission), so pulling
/// payload bytes in makes the kernel copy the head and take new references on the pages
/// (`__pskb_pull_tail`, `pskb_expand_head`). Its headers need no pull to be written: the
/// unclone the verifier puts in front of a tc program that writes packets directly, and the
/// checksum helpers, copy a clone's head only when another holder still uses its header part
/// (`skb_header_cloned`, `skb_clone_writable`), and a TCP sender gives that part up in the
/// original it keeps for retransmission.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext) {
    let need = headers_len(ctx);
    let want = if ctx.len() < need { ctx.len() } else { need };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // SAFETY: the helper only makes more of the buffer linear; pointers are taken after.
        unsafe { bpf_skb_pull_data(ctx.skb.skb, want) };
    }
}

/// The bytes from the packet's start that lb's tc programs read or write in place, as far as
/// the linear part tells: for TCP and UDP over IPv4 (any IHL) or IPv6, the Ethernet, IP and
/// fixed transport headers (`parse`, NAT, DSR encapsulation; an answer built from the packet,
/// a RST or "too big", pulls what it quotes itself); for an IPIP or IP6IP6 tunnel
/// (`lb_decap_tc`), the outer and the inner IP headers. For anything else (ICMP and its quote,
/// extension headers, a second VLAN tag, an IP header not in the linear part), [`HEADERS`].
#[inline(always)]
fn headers_len(ctx: &TcContext) -> u32 {
    let l3_off = core::mem::size_of::<EthHdr>();
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return HEADERS;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let proto = unsafe { (*eth).proto };
    let (ip_len, next, tunnel) = if proto == ETH_P_IP {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
            return HEADERS;
        };
        // SAFETY: as above.
        let (version_ihl, protocol) = unsafe { ((*ip).version_ihl, (*ip).protocol) };
        // An IHL below 5 is malformed; the parser reads the 20 bytes to find out.
        let ihl = (version_ihl & 0x0f).max(5);
        (u32::from(ihl) * 4, protocol, IPPROTO_IPIP)
    } else if proto == ETH_P_IPV6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3_off) else {
            return HEADERS;
        };
        // SAFETY: as above.
        let nexthdr = unsafe { (*ip).nexthdr };
        (
            core::mem::size_of::<Ipv6Hdr>() as u32,
            nexthdr,
            IPPROTO_IPV6,
        )
    } else {
        return HEADERS;
    };
    let inner = if next == IPPROTO_TCP {
        core::mem::size_of::<TcpHdr>()
    } else if next == IPPROTO_UDP {
        core::mem::size_of::<UdpHdr>()
    } else if next == tunnel && proto == ETH_P_IP {
        core::mem::size_of::<Ipv4Hdr>()
    } else if next == tunnel {
        core::mem::size_of::<Ipv6Hdr>()
    } else {
        return HEADERS;
    };
    l3_off as u32 + ip_len + inner as u32
}

impl Frame for TcContext {
    /// `TC_ACT_UNSPEC` (TCX's `TCX_NEXT`): the packet goes on to the next program on the
    /// hook (another tool's), or to the stack when there is none. `TC_ACT_OK` would end the
    /// hook's programs here for every packet that is not the balancer's.
    const PASS: u32 = TC_ACT_UNSPEC as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;
    const TAG_IN_PACKET: bool = false;
    const SENDS_DSR_REPLIES: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: a field of the context the kernel passed.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.skb.skb as *mut c_void
    }

    #[inline(always)]
    fn mtu_len(&self, ip_len: u16) -> u16 {
        // SAFETY: a field of the context the kernel passed.
        if unsafe { (*self.skb.skb).gso_size } != 0 {
            0
        } else {
            ip_len
        }
    }

    /// Written in place, as at XDP, not through `bpf_l3_csum_replace` (which does the same
    /// and costs a helper call): the header checksum changes by exactly what the header's
    /// other words changed, so the sum of the header's bytes, and with it a
    /// `CHECKSUM_COMPLETE` packet's sum, stays as it was; `CHECKSUM_PARTIAL` concerns only
    /// the transport checksum. The header is directly writable: the program writes its
    /// addresses in place too. (The trait still lets an implementation move the packet here,
    /// so callers take their pointers anew.)
    #[inline(always)]
    fn l3_csum_add(&self, off: usize, diff: u32) -> Result<(), Stat> {
        let at: *mut u16 = ptr_at(self, off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { *at = csum::add_diff(*at, diff) };
        Ok(())
    }

    #[inline(always)]
    fn l4_csum_add(&self, off: usize, diff: u32, how: L4Check) -> Result<(), Stat> {
        let mut flags = 0u64;
        if how.pseudo {
            flags |= BPF_F_PSEUDO_HDR as u64;
        }
        if how.udp {
            // A zero result goes out as 0xffff; over IPv4 a zero field (no checksum) stays.
            flags |= BPF_F_MARK_MANGLED_0 as u64;
            if how.v6 {
                flags |= BPF_F_MARK_ENFORCE as u64;
            }
        }
        let ipv6 = if how.v6 && how.pseudo { BPF_F_IPV6 } else { 0 };
        // SAFETY: the helper checks `off` against the buffer.
        let mut rc =
            unsafe { bpf_l4_csum_replace(self.skb.skb, off as u32, 0, diff as u64, flags | ipv6) };
        if rc == EINVAL && ipv6 != 0 {
            // SAFETY: as above; the refused call changed nothing.
            rc = unsafe { bpf_l4_csum_replace(self.skb.skb, off as u32, 0, diff as u64, flags) };
            if rc == 0 {
                // Without the flag the kernel took `diff` off a CHECKSUM_COMPLETE sum, as if
                // an IPv4 header checksum had absorbed the addresses' change: put it back.
                self.complete_sum_add(diff);
            }
        }
        if rc != 0 {
            return Err(Stat::PassMalformed);
        }
        Ok(())
    }

    #[inline(always)]
    fn insert_room(&self, _l3_off: usize, bytes: usize, room: Room) -> Result<(), Stat> {
        let flags = match room {
            Room::Answer => 0,
            Room::Tunnel { v6, udp } => {
                let outer = if v6 {
                    BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
                } else {
                    BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
                };
                // Without FIXED_GSO the kernel shrinks the segment size by the header, which
                // for UDP GSO would cut the datagrams at other boundaries.
                if udp {
                    outer | BPF_F_ADJ_ROOM_FIXED_GSO
                } else {
                    outer
                }
            }
        };
        // SAFETY: the helper checks the buffer; pointers are taken anew after it.
        let rc = unsafe {
            bpf_skb_adjust_room(self.skb.skb, bytes as i32, BPF_ADJ_ROOM_MAC, flags as u64)
        };
        if rc != 0 {
            return Err(Stat::DropAdjustHead);
        }
        Ok(())
    }

    #[inline(always)]
    fn remove_room(&self, _l3_off: usize, bytes: usize, v6: bool) -> bool {
        // FIXED_GSO: the inner packet's segments carry as much payload as the tunnelled ones
        // did (the kernel would otherwise grow them by the header). DECAP_L3_*: the super-packet
        // is no longer a tunnelled one (Linux 6.3+; refused with EINVAL before, then tried
        // without it).
        let decap = if v6 {
            BPF_F_ADJ_ROOM_DECAP_L3_IPV6
        } else {
            BPF_F_ADJ_ROOM_DECAP_L3_IPV4
        };
        let fixed = BPF_F_ADJ_ROOM_FIXED_GSO as u64;
        let shrink = -(bytes as i32);
        // SAFETY: the helper checks the buffer; pointers are taken anew after it.
        let mut rc = unsafe {
            bpf_skb_adjust_room(self.skb.skb, shrink, BPF_ADJ_ROOM_MAC, fixed | decap as u64)
        };
        if rc == EINVAL {
            // SAFETY: as above; the refused call changed nothing.
            rc = unsafe { bpf_skb_adjust_room(self.skb.skb, shrink, BPF_ADJ_ROOM_MAC, fixed) };
        }
        rc == 0
    }

    #[inline(always)]
    fn complete_sum_add(&self, diff: u32) {
        // SAFETY: the helper changes only `skb->csum`, and only for a CHECKSUM_COMPLETE packet
        // (it answers an error otherwise, which leaves nothing to do).
        unsafe { bpf_csum_update(self.skb.skb, diff) };
    }

    #[inline(always)]
    fn truncate(&self, len: usize) -> bool {
        // SAFETY: the helpers check the buffer; pointers are taken anew after them.
        unsafe {
            bpf_skb_change_tail(self.skb.skb, len as u32, 0) == 0
                && bpf_skb_pull_data(self.skb.skb, len as u32) == 0
        }
    }

    #[inline(always)]
    fn turn_around(&self) -> u32 {
        // SAFETY: a helper taking plain values.
        unsafe { bpf_redirect(Frame::ingress_ifindex(self), 0) as u32 }
    }

    #[inline(always)]
    fn redirect(&self, ifindex: u32, dmac: &[u8; 6], to_peer: bool) -> Result<u32, Stat> {
        // A veth whose peer is in another namespace: straight into the peer's ingress, in
        // this pass (no veth transmit, no backlog queue and second softirq pass between the
        // two ends). The daemon lists only veths the kernel takes a peer redirect to.
        // SAFETY (all): helpers taking plain values, and `BRIDGE_FDB` read by value (its
        // `get` is unsafe; the devmap lookups are not).
        if to_peer && VETH_PEERS.get(ifindex).is_some() {
            return Ok(unsafe { bpf_redirect_peer(ifindex, 0) } as u32);
        }
        // Into a bridge: to the port the bridge would forward the frame to, while the port
        // is registered. The bridge device has no tunnel offloads (a DSR super-packet would be
        // cut into segments in software there); its port takes it whole.
        // `BRIDGES` first: one array word, where the `BRIDGE_FDB` lookup it spares hashes a
        // 12-byte key for every packet sent out of anything else.
        let (word, bit) = bridge_bit(ifindex);
        let mut out = ifindex;
        if BRIDGES.get(word).is_some_and(|w| *w & bit != 0) {
            let key = BridgeFdbKey {
                bridge: ifindex,
                mac: *dmac,
                _pad: [0; 2],
            };
            if let Some(&port) = unsafe { BRIDGE_FDB.get(&key) } {
                if BRIDGE_PORTS.get(port).is_some() {
                    if to_peer && VETH_PEERS.get(port).is_some() {
                        return Ok(unsafe { bpf_redirect_peer(port, 0) } as u32);
                    }
                    out = port;
                }
            }
        }
        Ok(unsafe { bpf_redirect(out, 0) } as u32)
    }

    #[inline(always)]
    fn redirect_neigh(&self, ifindex: u32) -> Option<u32> {
        // SAFETY: without parameters the kernel looks the next hop up itself.
        Some(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as u32 })
    }

    #[inline(always)]
    fn routed_here(&self) -> bool {
        // SAFETY: fields of the context the kernel passed.
        unsafe { (*self.skb.skb).pkt_type == PACKET_HOST && (*self.skb.skb).vlan_present == 0 }
    }

    #[inline(always)]
    fn segments_fit(&self, ifindex: u32) -> bool {
        // SAFETY: a field of the context the kernel passed.
        if unsafe { (*self.skb.skb).gso_size } == 0 {
            return true;
        }
        // In: 0, the packet's own length (the flag takes no other); out: the MTU.
        let mut mtu_len = 0u32;
        // SAFETY: the helper reads the socket buffer and writes `mtu_len`, a live local.
        unsafe {
            bpf_check_mtu(
                self.skb.skb as *mut c_void,
                ifindex,
                &mut mtu_len,
                0,
                BPF_MTU_CHK_SEGS as u64,
            ) == 0
        }
    }
}
