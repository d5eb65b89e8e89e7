//! The tc data plane (`dataplane = "tc"`, `lb_tc` at tc ingress) in `dsr` mode, end to end:
//! the same checks as `xdp_dsr.rs` in the same namespaces, with nothing changed on the
//! neighbours (tx checksum offload stays on, so the client's and the backends' packets arrive
//! `CHECKSUM_PARTIAL` and as GSO super-packets; no XDP program on the veth peers, and only the backends run `lb-daemon decap`). See `lb_tests::xdp`.
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use lb_tests::xdp::scenarios;
use lb_tests::xdp::{Mode, Path, Plane};

const PATH: Path = Path {
    plane: Plane::Tc,
    mode: Mode::Dsr,
};

#[test]
fn http_requests_spread_evenly_over_three_backends() {
    if lb_tests::require_root("tc_dsr::http_requests_spread_evenly_over_three_backends") {
        scenarios::requests_spread_evenly(PATH);
    }
}

#[test]
fn a_100_mib_upload_arrives_intact_and_udp_gets_replies() {
    if lb_tests::require_root("tc_dsr::a_100_mib_upload_arrives_intact_and_udp_gets_replies") {
        scenarios::transfer_and_udp(PATH);
    }
}

#[test]
fn new_flows_avoid_a_down_backend_while_a_long_upload_completes() {
    if lb_tests::require_root(
        "tc_dsr::new_flows_avoid_a_down_backend_while_a_long_upload_completes",
    ) {
        scenarios::backend_down(PATH);
    }
}

#[test]
fn a_backend_that_comes_up_takes_new_flows_and_existing_ones_stay() {
    if lb_tests::require_root(
        "tc_dsr::a_backend_that_comes_up_takes_new_flows_and_existing_ones_stay",
    ) {
        scenarios::backend_added(PATH);
    }
}

#[test]
fn counters_match_the_traffic_sent() {
    if lb_tests::require_root("tc_dsr::counters_match_the_traffic_sent") {
        scenarios::counters_match(PATH);
    }
}

/// A backend link of 1500 bytes has no room for the 20 bytes of IPIP on a full-size segment.
/// On tc the client's GSO super-packets are encapsulated whole and segmented to fit (the
/// segment size shrinks by the outer header), and segments that would not fit are answered
/// with "fragmentation needed": either way a 10 MiB upload arrives intact.
#[test]
fn an_upload_over_a_1500_byte_backend_link_arrives_intact() {
    if !lb_tests::require_root("tc_dsr::an_upload_over_a_1500_byte_backend_link") {
        return;
    }
    let world = lb_tests::xdp::world::World::start(PATH, 1, 1);
    let t = &world.topology;
    t.balancer
        .ip(&["link", "set", "l1", "mtu", "1500"])
        .expect("MTU of the balancer's backend veth");
    t.backends[0]
        .ip(&["link", "set", "b0", "mtu", "1500"])
        .expect("MTU of the backend's veth");
    const LEN: u64 = 10 * 1024 * 1024;
    let vip = lb_tests::xdp::Topology::vip(lb_tests::xdp::world::BULK);
    let receipt = world
        .client(|| lb_tests::client::upload(vip, LEN, 11))
        .unwrap_or_else(|e| panic!("the upload over a 1500-byte backend link failed: {e}"));
    assert_eq!(
        receipt,
        lb_tests::data::Receipt::of_stream(LEN, 11),
        "the backend did not receive the 10 MiB the client sent, byte for byte"
    );
}
