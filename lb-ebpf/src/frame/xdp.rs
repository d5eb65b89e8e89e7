//! [`Frame`] for XDP: the frame lies whole in one buffer, and nothing but the program has
//! computed or will compute its checksums, so they are updated in place (RFC 1624).

use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::Stat;

use super::{Frame, L4Check, Room};
use crate::{csum, encap, maps::DEVMAP, parse::ptr_at};

impl Frame for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;
    const TAG_IN_PACKET: bool = true;
    const SENDS_DSR_REPLIES: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn mtu_len(&self, ip_len: u16) -> u16 {
        ip_len
    }

    #[inline(always)]
    fn l3_csum_add(&self, off: usize, diff: u32) -> Result<(), Stat> {
        let at: *mut u16 = ptr_at(self, off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { *at = csum::add_diff(*at, diff) };
        Ok(())
    }

    #[inline(always)]
    fn l4_csum_add(&self, off: usize, diff: u32, how: L4Check) -> Result<(), Stat> {
        let at: *mut u16 = ptr_at(self, off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let check = *at;
            if how.udp && !how.v6 && check == 0 {
                return Ok(());
            }
            let c = csum::add_diff(check, diff);
            *at = if how.udp { csum::udp_nonzero(c) } else { c };
        }
        Ok(())
    }

    #[inline(always)]
    fn insert_room(&self, l3_off: usize, bytes: usize, _room: Room) -> Result<(), Stat> {
        let link = encap::save_link(self, l3_off)?;
        // SAFETY: the helper only moves `data`; every later access re-checks bounds.
        if unsafe { bpf_xdp_adjust_head(self.ctx, -(bytes as i32)) } != 0 {
            return Err(Stat::DropAdjustHead);
        }
        encap::restore_link(self, &link)
    }

    #[inline(always)]
    fn remove_room(&self, l3_off: usize, bytes: usize, _v6: bool) -> bool {
        let Ok(link) = encap::save_link(self, l3_off) else {
            return false;
        };
        // SAFETY: the helper only moves `data`; every later access re-checks bounds.
        if unsafe { bpf_xdp_adjust_head(self.ctx, bytes as i32) } != 0 {
            return false;
        }
        // It cannot fail (the frame only got shorter); were it to, the packet still goes up.
        let _ = encap::restore_link(self, &link);
        true
    }

    #[inline(always)]
    fn complete_sum_add(&self, _diff: u32) {
        // An XDP frame carries no sum of the kernel's.
    }

    #[inline(always)]
    fn truncate(&self, len: usize) -> bool {
        let now = Frame::len(self);
        // SAFETY: the helper only moves `data_end` within the frame (the kernel checks).
        now <= len || unsafe { bpf_xdp_adjust_tail(self.ctx, -((now - len) as i32)) } == 0
    }

    #[inline(always)]
    fn turn_around(&self) -> u32 {
        xdp_action::XDP_TX
    }

    #[inline(always)]
    fn redirect(&self, ifindex: u32, _dmac: &[u8; 6], _to_peer: bool) -> Result<u32, Stat> {
        if ifindex == Frame::ingress_ifindex(self) {
            return Ok(xdp_action::XDP_TX);
        }
        if DEVMAP.get_ifindex(ifindex).is_none() {
            return Err(Stat::DropNoDevmapEntry);
        }
        // The entry was just there; should it vanish in between, the packet is dropped.
        Ok(DEVMAP
            .redirect(ifindex, xdp_action::XDP_DROP as u64)
            .unwrap_or(xdp_action::XDP_DROP))
    }

    #[inline(always)]
    fn redirect_neigh(&self, _ifindex: u32) -> Option<u32> {
        None
    }

    #[inline(always)]
    fn routed_here(&self) -> bool {
        false
    }

    #[inline(always)]
    fn segments_fit(&self, _ifindex: u32) -> bool {
        true
    }
}
