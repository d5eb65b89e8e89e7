//! The XDP fast path in `dsr` mode, end to end: a client namespace, the balancer namespace
//! with `lb-daemon` and XDP on its veths, three (or four) backend namespaces with real
//! servers that decapsulate with `lb-daemon decap` and answer the client directly. See `lb_tests::xdp`.
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use lb_tests::xdp::scenarios;
use lb_tests::xdp::{Mode, Path, Plane};

const PATH: Path = Path {
    plane: Plane::Xdp,
    mode: Mode::Dsr,
};

#[test]
fn http_requests_spread_evenly_over_three_backends() {
    if lb_tests::require_root("xdp_dsr::http_requests_spread_evenly_over_three_backends") {
        scenarios::requests_spread_evenly(PATH);
    }
}

#[test]
fn a_100_mib_upload_arrives_intact_and_udp_gets_replies() {
    if lb_tests::require_root("xdp_dsr::a_100_mib_upload_arrives_intact_and_udp_gets_replies") {
        scenarios::transfer_and_udp(PATH);
    }
}

#[test]
fn new_flows_avoid_a_down_backend_while_a_long_upload_completes() {
    if lb_tests::require_root(
        "xdp_dsr::new_flows_avoid_a_down_backend_while_a_long_upload_completes",
    ) {
        scenarios::backend_down(PATH);
    }
}

#[test]
fn a_backend_that_comes_up_takes_new_flows_and_existing_ones_stay() {
    if lb_tests::require_root(
        "xdp_dsr::a_backend_that_comes_up_takes_new_flows_and_existing_ones_stay",
    ) {
        scenarios::backend_added(PATH);
    }
}

#[test]
fn xdp_counters_match_the_traffic_sent() {
    if lb_tests::require_root("xdp_dsr::xdp_counters_match_the_traffic_sent") {
        scenarios::counters_match(PATH);
    }
}

/// A backend link of 1500 bytes, a user's default, has no room for the 20 bytes of IPIP on a
/// full-size client segment: the balancer answers "fragmentation needed" (MTU 1480) from the
/// VIP, the client's kernel lowers its path MTU, and a 10 MiB upload arrives intact instead of
/// stalling on its first full-size segment.
#[test]
fn an_upload_over_a_1500_byte_backend_link_adapts_its_path_mtu_and_arrives_intact() {
    if !lb_tests::require_root("xdp_dsr::an_upload_over_a_1500_byte_backend_link") {
        return;
    }
    let world = lb_tests::xdp::world::World::start(PATH, 1, 1);
    let t = &world.topology;
    t.set_backend_link_mtu(0, 1500);
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
    let api = world.daemon.admin_addr();
    let status = lb_tests::xdp::in_netns(&t.balancer, || lb_tests::admin::status(api))
        .expect("enter the balancer namespace");
    let answered = status["xdp"]["packets"]["too_big_sent"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        answered >= 1,
        "the client's full-size segments should have been answered with fragmentation \
         needed; the XDP counters: {}",
        status["xdp"]["packets"]
    );
}
