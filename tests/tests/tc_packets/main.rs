//! The crafted-packet tests of `xdp_packets`, run against the balancer at the tc hook
//! (`lb_tc`): the same modules, built a second time with a lab whose balancer is `lb_tc`, so
//! both hooks are held to the same frames byte for byte (`Lab::run_tc` reports tc's actions as
//! the XDP actions of the same meaning); `decap` runs `lb_decap_tc` where it runs `lb_decap`.
//! In BPF_PROG_TEST_RUN a socket buffer carries no checksum offload state, so these tests see
//! the checksum helpers' plain path; `tc_nat` and `tc_dsr` cover `CHECKSUM_PARTIAL` end to
//! end through veth pairs. One module is this binary's own: `gso`, GSO super-packets, which
//! only socket buffers have.

#[path = "../xdp_packets/ageing.rs"]
mod ageing;
#[path = "../xdp_packets/conntrack.rs"]
mod conntrack;
#[path = "../xdp_packets/decap.rs"]
mod decap;
#[path = "../xdp_packets/dsr.rs"]
mod dsr;
#[path = "../xdp_packets/dsr_replies.rs"]
mod dsr_replies;
#[path = "../xdp_packets/fuzz.rs"]
mod fuzz;
mod gso;
#[path = "../xdp_packets/icmp_errors.rs"]
mod icmp_errors;
#[path = "../xdp_packets/limits.rs"]
mod limits;
#[path = "../xdp_packets/local_addrs.rs"]
mod local_addrs;
#[path = "../xdp_packets/nat.rs"]
mod nat;
#[path = "../xdp_packets/next_hop.rs"]
mod next_hop;
#[path = "../xdp_packets/pass_rules.rs"]
mod pass_rules;
#[path = "../xdp_packets/snat_ports.rs"]
mod snat_ports;
#[path = "../xdp_packets/too_big.rs"]
mod too_big;

include!("../xdp_packets/prelude.rs");

/// This binary's lab: the balancer at tc ingress (`lb_tc`).
fn lab(test: &str) -> Option<Lab> {
    lab_at(Hook::Tc, test)
}
