//! lb's eBPF fast path: the balancer at two hooks, `lb_xdp` (XDP) and `lb_tc` (tc ingress),
//! built from the same code and sharing every map, and the DSR decapsulator `lb_decap`.
//!
//! This file holds only the entry points. Each concern has its own module, as in Katran's
//! `lib/bpf`: `frame` (what differs between the XDP and the tc hook), `parse` (headers and the
//! pass rule), `maps` (declarations), `conntrack` (placement), `limits` (per-client limits on
//! new flows) and `reset` (the RST answering a refused SYN), `nat`, `icmp` (errors about
//! NAT'ed flows, both directions), `encap` (DSR), `dsr_reply` (DSR replies the host routes,
//! tc only), `too_big` (the answer to a client's packet that would not fit the backend link),
//! `csum`, `fib` (next hop), `next_hop` (its cache), `clock`, `stats`, and `balancer`, which
//! strings them together for one packet. The map layouts and how the daemon fills them are
//! the contract in `lb_common::maps`.
#![no_std]
#![no_main]
// BPF's atomic add / or (used by `limits`): the target's `AtomicU64` has no read-modify-write
// methods, the intrinsics lower to BPF_ATOMIC instructions.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map keys and values are passed by reference on purpose: passing them by value (as this lint
// suggests) makes LLVM copy them onto the stack again, and the balancer then exceeds the
// verifier's 512-byte stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod balancer;
mod clock;
mod conntrack;
mod csum;
mod dsr_reply;
mod encap;
mod fib;
mod frame;
mod icmp;
mod limits;
mod maps;
mod nat;
mod next_hop;
mod parse;
mod reset;
mod stats;
mod too_big;

use aya_ebpf::{
    bindings::{self, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::Stat;

/// The balancer, attached by the daemon to the interfaces clients and backends reach it on.
///
/// Packets for a VIP are placed on a backend (conntrack, else the live Maglev table half) and
/// sent on translated (`nat`) or encapsulated (`dsr`) with `XDP_TX` / `XDP_REDIRECT`; NAT
/// replies are translated back to the client. Everything else passes untouched (`XDP_PASS`),
/// and what cannot be parsed follows the rule in `parse`. Every outcome is counted in `STATS`.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    stats::increment(Stat::Packets);
    match balancer::handle(&ctx) {
        Ok(action) => action,
        Err(stat) => {
            stats::increment(stat);
            balancer::action_for::<XdpContext>(stat)
        }
    }
}

/// The balancer at the tc ingress hook, for interfaces where XDP cannot deliver or costs more
/// than it saves (veth, bridges, bonds, VLANs): the same placement, NAT, DSR, limits and ICMP
/// as `lb_xdp`, on socket buffers, so GSO/GRO super-packets stay whole and checksums are kept
/// right for `CHECKSUM_PARTIAL` packets; it forwards with `bpf_redirect` /
/// `bpf_redirect_neigh` (any device, a bridge included), or `bpf_redirect_peer` for a
/// translated packet towards a veth whose peer is in another namespace, and needs nothing
/// from the neighbours. Unlike `lb_xdp` it also sends on the DSR replies the host routes
/// (`dsr_reply`).
/// Returns `TC_ACT_UNSPEC` (pass: on to the hook's next program, or the stack),
/// `TC_ACT_SHOT` (drop) or `TC_ACT_REDIRECT`.
#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    stats::increment(Stat::Packets);
    frame::pull_headers(&ctx);
    let action = match balancer::handle(&ctx) {
        Ok(action) => action,
        Err(stat) => {
            stats::increment(stat);
            balancer::action_for::<TcContext>(stat)
        }
    };
    action as i32
}

/// The DSR decapsulator, attached on a backend host: strips the outer IPIP / IP6IP6 header of
/// packets from a balancer (`DECAP_SOURCES`) addressed to one of the host's addresses
/// (`DECAP_ADDRS`) and passes the client's packet to the stack (the VIP is configured on the
/// backend's loopback). Tunnels for this host from anyone else are dropped; every other
/// packet, encapsulated ones for other hosts included, passes untouched.
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let (stat, action) = match encap::decapsulate(&ctx) {
        encap::Decap::Stripped => (Stat::Decapsulated, xdp_action::XDP_PASS),
        encap::Decap::Plain => (Stat::DecapPassed, xdp_action::XDP_PASS),
        encap::Decap::NotLocal => (Stat::DecapNotLocal, xdp_action::XDP_PASS),
        encap::Decap::BadSource => (Stat::DecapBadSource, xdp_action::XDP_DROP),
    };
    stats::increment(stat);
    action
}

/// The DSR decapsulator at the tc ingress hook: `lb_decap`'s work on socket buffers, for a
/// backend host whose interface is a veth or a bridge port (a container), where an XDP program
/// would take GSO from the interface's peer and every encapsulated segment would cost a pass
/// of its own. Returns `TC_ACT_UNSPEC` (on to the hook's next program, or the stack), or
/// `TC_ACT_SHOT` for a tunnel from no balancer.
#[classifier]
pub fn lb_decap_tc(ctx: TcContext) -> i32 {
    frame::pull_headers(&ctx);
    let (stat, action) = match encap::decapsulate(&ctx) {
        encap::Decap::Stripped => (Stat::Decapsulated, bindings::TC_ACT_UNSPEC),
        encap::Decap::Plain => (Stat::DecapPassed, bindings::TC_ACT_UNSPEC),
        encap::Decap::NotLocal => (Stat::DecapNotLocal, bindings::TC_ACT_UNSPEC),
        encap::Decap::BadSource => (Stat::DecapBadSource, bindings::TC_ACT_SHOT),
    };
    stats::increment(stat);
    action
}

/// The kernel refuses GPL-only helpers (`bpf_fib_lookup` among them) to programs whose license
/// is not GPL-compatible; "Dual MIT/GPL" is one of the strings it accepts.
#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// BPF has no unwinding and the verifier rejects unbounded loops, so no path may reach here:
/// with `panic = "abort"` and no panicking code left after optimisation, the linker drops it.
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
