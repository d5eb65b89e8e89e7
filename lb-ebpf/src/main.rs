//! lb's XDP fast path.
//!
//! This file holds only the program entry points; each concern lives in its own module
//! (`stats` today; `parse`, `conntrack`, `nat`, `encap` and `csum` as the balancer grows).
//! The shared map key and value types come from `lb-common`, so the daemon reads the same
//! layouts this program writes.
#![no_std]
#![no_main]

mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::stats::Stat;

/// The balancer's XDP entry point, attached to a service's interface by the daemon.
///
/// For now it counts every packet in `STATS` and passes it to the kernel stack unchanged
/// (`XDP_PASS`); header parsing and the VIP lookup come next.
#[xdp]
pub fn lb_xdp(_ctx: XdpContext) -> u32 {
    stats::increment(Stat::Packets);
    xdp_action::XDP_PASS
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
