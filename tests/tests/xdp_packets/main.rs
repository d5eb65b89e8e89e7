//! The XDP balancer (`lb_xdp`) and decapsulator (`lb_decap`) on crafted packets, through
//! BPF_PROG_TEST_RUN (aya's `TestRun`), one module per feature.
//!
//! Each test builds a [`Lab`](lb_tests::xdp::testrun::Lab): it loads the lb-ebpf object named
//! by `LB_EBPF_OBJ` (set by `cargo xtask test`), so the kernel's verifier checks both
//! programs, makes a namespace for `bpf_fib_lookup` to route in, fills the maps the way
//! `lb_common::maps` tells the daemon to, runs packets, and compares each output frame byte for
//! byte with the frame built from scratch by `lb_tests::packet`, whose checksums are computed
//! there from nothing (and checked once more on the output on their own). `decap_daemon`
//! runs `lb-daemon decap` instead, in this binary only.

mod ageing;
mod conntrack;
mod decap;
mod decap_daemon;
mod dsr;
mod dsr_replies;
mod fuzz;
mod icmp_errors;
mod limits;
mod local_addrs;
mod nat;
mod next_hop;
mod pass_rules;
mod snat_ports;
mod too_big;

include!("prelude.rs");

/// This binary's lab: the balancer at XDP (`lb_xdp`).
fn lab(test: &str) -> Option<Lab> {
    lab_at(Hook::Xdp, test)
}
