//! Full NAT: client → VIP becomes balancer (`local_addr`:SNAT port) → backend on the way in,
//! and the backend's reply becomes VIP → client on the way back, found through `NAT_REVERSE`.
//!
//! The SNAT port of a new flow is probed in the service's range starting from the flow's hash,
//! so the same flow picks the same port again after its conntrack entry is lost (e.g. a
//! restart), and different flows spread over the range. Checksums are updated incrementally
//! (RFC 1624), never recomputed over the payload.

use core::num::NonZeroU32;

use aya_ebpf::programs::XdpContext;
use lb_common::{
    flow::IPPROTO_UDP,
    flow_hash,
    maps::{NatReverse, Service, FAMILY_V4},
    FlowKey, Stat,
};

use crate::{
    csum,
    maps::NAT_REVERSE,
    parse::{groups6, halves, ptr_at, Ipv4Hdr, Ipv6Hdr, Parsed, TCP_CHECK_OFF, UDP_CHECK_OFF},
};

/// SNAT ports tried for a new flow before it is dropped as `Stat::DropNatPortsExhausted`.
const SNAT_PROBES: u32 = 8;

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// The key a reply of the translated flow will carry: backend → local_addr:snat_port.
#[inline(always)]
fn reply_key(
    key: &FlowKey,
    backend_addr: &[u32; 4],
    backend_port: u16,
    service: &Service,
    port: u16,
) -> FlowKey {
    FlowKey {
        src_addr: *backend_addr,
        dst_addr: service.local_addr,
        src_port: backend_port,
        dst_port: port,
        protocol: key.protocol,
        _pad: [0; 3],
    }
}

/// The SNAT port for the client flow `key` placed on the backend at `backend_addr`:
/// `current` when the flow already has one (its `NAT_REVERSE` entry is re-created if it was
/// evicted), else a free one from the service's range, recorded in `NAT_REVERSE`.
/// `Err(Stat::DropNatPortsExhausted)` when the probed ports are all taken,
/// `Err(Stat::DropBadService)` when the range is empty.
#[inline(always)]
pub fn snat_port(
    key: &FlowKey,
    backend_addr: &[u32; 4],
    backend_port: u16,
    service_id: u32,
    service: &Service,
    current: u16,
) -> Result<u16, Stat> {
    let reverse = NatReverse {
        client_addr: key.src_addr,
        vip_addr: key.dst_addr,
        client_port: key.src_port,
        vip_port: key.dst_port,
        service: service_id,
    };
    if current != 0 {
        let rkey = reply_key(key, backend_addr, backend_port, service, current);
        if NAT_REVERSE.get_ptr(&rkey).is_none() {
            let _ = NAT_REVERSE.insert(&rkey, &reverse, 0);
        }
        return Ok(current);
    }
    let min = service.snat_port_min as u32;
    let max = service.snat_port_max as u32;
    if min == 0 || max < min {
        return Err(Stat::DropBadService);
    }
    // Non-zero by construction (max >= min); the type removes the division-by-zero panic.
    let span = NonZeroU32::new(max - min + 1).ok_or(Stat::DropBadService)?;
    let start = flow_hash(key);
    let mut i = 0;
    while i < SNAT_PROBES {
        let port = (min + start.wrapping_add(i) % span) as u16;
        let rkey = reply_key(key, backend_addr, backend_port, service, port);
        if NAT_REVERSE.insert(&rkey, &reverse, BPF_NOEXIST).is_ok() {
            return Ok(port);
        }
        if let Some(existing) = NAT_REVERSE.get_ptr(&rkey) {
            // SAFETY: a live map value, read in place (a copy would cost stack the balancer
            // does not have).
            let existing = unsafe { &*existing };
            // Our own entry, left from before this flow's conntrack entry was lost.
            if existing.client_addr == reverse.client_addr
                && existing.client_port == reverse.client_port
                && existing.vip_addr == reverse.vip_addr
                && existing.vip_port == reverse.vip_port
            {
                return Ok(port);
            }
        }
        i += 1;
    }
    Err(Stat::DropNatPortsExhausted)
}

/// The translation of a reply `key` back to VIP → client, if it belongs to a NAT'ed flow.
#[inline(always)]
pub fn reverse(key: &FlowKey) -> Option<NatReverse> {
    // SAFETY: a live map value, copied out at once.
    NAT_REVERSE.get_ptr(key).map(|r| unsafe { *r })
}

/// Rewrites the parsed packet's addresses and ports to `src`:`sport` → `dst`:`dport` (ports
/// in host order) and updates the IP (IPv4) and TCP/UDP checksums incrementally. An IPv4 UDP
/// checksum of 0 (none) stays 0. `Err(Stat::PassMalformed)` cannot happen for a packet `parse`
/// accepted; it only satisfies the verifier's bounds checks.
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    p: &Parsed,
    src: &[u32; 4],
    sport: u16,
    dst: &[u32; 4],
    dport: u16,
) -> Result<(), Stat> {
    let old = &p.key;
    if p.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            let mut check = (*ip).check;
            check = csum::replace_addr(check, &old.src_addr, src);
            check = csum::replace_addr(check, &old.dst_addr, dst);
            (*ip).check = check;
            (*ip).src = halves(src[0]);
            (*ip).dst = halves(dst[0]);
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, p.l3_off).ok_or(Stat::PassMalformed)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe {
            (*ip).src = groups6(src);
            (*ip).dst = groups6(dst);
        }
    }

    // Source and destination port are the first two 16-bit words of both TCP and UDP.
    let ports: *mut [u16; 2] = ptr_at(ctx, p.l4_off).ok_or(Stat::PassMalformed)?;
    let check_off = if p.key.protocol == IPPROTO_UDP {
        UDP_CHECK_OFF
    } else {
        TCP_CHECK_OFF
    };
    let check_ptr: *mut u16 = ptr_at(ctx, p.l4_off + check_off).ok_or(Stat::PassMalformed)?;
    let (new_sport, new_dport) = (sport.to_be(), dport.to_be());
    // SAFETY: both pointers bounds checked by `ptr_at`.
    unsafe {
        let old_ports = *ports;
        let check = *check_ptr;
        let udp_without_checksum =
            p.key.protocol == IPPROTO_UDP && p.family == FAMILY_V4 && check == 0;
        if !udp_without_checksum {
            // The pseudo-header holds both addresses, so they change the L4 checksum too.
            let mut c = csum::replace_addr(check, &old.src_addr, src);
            c = csum::replace_addr(c, &old.dst_addr, dst);
            c = csum::replace16(c, old_ports[0], new_sport);
            c = csum::replace16(c, old_ports[1], new_dport);
            if p.key.protocol == IPPROTO_UDP {
                c = csum::udp_nonzero(c);
            }
            *check_ptr = c;
        }
        *ports = [new_sport, new_dport];
    }
    Ok(())
}
