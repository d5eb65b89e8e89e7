//! [`Frame`] for tc: a socket buffer at the ingress hook. Checksums follow a rewrite through
//! the kernel's helpers, which know the buffer's checksum state: a `CHECKSUM_PARTIAL` packet
//! (from a local sender or a veth, its transport checksum still to be computed at transmit)
//! keeps only the pseudo-header's sum in the field, and a `CHECKSUM_COMPLETE` one carries the
//! sum of its bytes beside them. Room is made after the Ethernet header with
//! `bpf_skb_adjust_room`, which keeps GSO super-packets whole and segmentable.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_MARK_ENFORCE, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR,
        TC_ACT_OK, TC_ACT_SHOT,
    },
    cty::c_void,
    helpers::{
        bpf_l3_csum_replace, bpf_l4_csum_replace, bpf_redirect, bpf_redirect_neigh,
        bpf_skb_adjust_room, bpf_skb_change_tail, bpf_skb_pull_data,
    },
    programs::TcContext,
};
use lb_common::Stat;

use super::{Frame, L4Check};

/// `BPF_F_IPV6` for `bpf_l4_csum_replace` (Linux 6.16+; not in the bindings): the packet is
/// IPv6, whose header has no checksum, so a `CHECKSUM_COMPLETE` sum must not follow a
/// pseudo-header change (the address bytes and the transport checksum change by opposite
/// amounts). Older kernels refuse the flag with `-EINVAL`; the update is then made without it.
const BPF_F_IPV6: u64 = 1 << 7;
/// `-EINVAL`.
const EINVAL: i64 = -22;

/// Bytes from the packet's start the balancer reads directly: Ethernet, a VLAN tag, an IPv6
/// header, ICMPv6 and the quoted IPv6 and TCP headers up to the quoted checksum (122 bytes).
/// A socket buffer whose linear part is shorter is pulled this far first ([`pull_headers`]).
const HEADERS: u32 = 128;

/// Makes the first [`HEADERS`] bytes of the packet (or all of a shorter one) directly
/// readable: a GRO'd or paged buffer may hold less in its linear part. A packet that cannot be
/// pulled is left as it is; the parser then passes what it cannot read.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext) {
    let want = if ctx.len() < HEADERS {
        ctx.len()
    } else {
        HEADERS
    };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // SAFETY: the helper only makes more of the buffer linear; pointers are taken after.
        unsafe { bpf_skb_pull_data(ctx.skb.skb, want) };
    }
}

impl Frame for TcContext {
    const PASS: u32 = TC_ACT_OK as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;
    const TAG_IN_PACKET: bool = false;

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

    #[inline(always)]
    fn l3_csum_add(&self, off: usize, diff: u32) -> Result<(), Stat> {
        // SAFETY: the helper checks `off` against the buffer. Size 0 in the flags: `to` is a
        // checksum difference (`from` must be 0).
        let rc = unsafe { bpf_l3_csum_replace(self.skb.skb, off as u32, 0, diff as u64, 0) };
        if rc != 0 {
            return Err(Stat::PassMalformed);
        }
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
        }
        if rc != 0 {
            return Err(Stat::PassMalformed);
        }
        Ok(())
    }

    #[inline(always)]
    fn insert_room(&self, _l3_off: usize, bytes: usize, encap: bool, v6: bool) -> Result<(), Stat> {
        let flags = match (encap, v6) {
            (false, _) => 0,
            (true, false) => BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
            (true, true) => BPF_F_ADJ_ROOM_ENCAP_L3_IPV6,
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
    fn remove_room(&self, _l3_off: usize, bytes: usize) -> bool {
        // SAFETY: the helper checks the buffer; pointers are taken anew after it. A GSO
        // super-packet keeps its segments (the kernel marks it for a header re-check).
        unsafe { bpf_skb_adjust_room(self.skb.skb, -(bytes as i32), BPF_ADJ_ROOM_MAC, 0) == 0 }
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
    fn redirect(&self, ifindex: u32) -> Result<u32, Stat> {
        // SAFETY: a helper taking plain values.
        Ok(unsafe { bpf_redirect(ifindex, 0) as u32 })
    }

    #[inline(always)]
    fn redirect_neigh(&self, ifindex: u32) -> Option<u32> {
        // SAFETY: without parameters the kernel looks the next hop up itself.
        Some(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as u32 })
    }
}
