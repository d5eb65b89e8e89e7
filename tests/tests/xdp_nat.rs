//! The XDP fast path in `nat` mode, end to end: a client namespace, the balancer namespace
//! with `lb-daemon` and XDP on its veths, three (or four) backend namespaces with real
//! servers. See `lb_tests::xdp`.
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use lb_tests::xdp::scenarios;
use lb_tests::xdp::{Mode, Path, Plane};

const PATH: Path = Path {
    plane: Plane::Xdp,
    mode: Mode::Nat,
};

#[test]
fn http_requests_spread_evenly_over_three_backends() {
    if lb_tests::require_root("xdp_nat::http_requests_spread_evenly_over_three_backends") {
        scenarios::requests_spread_evenly(PATH);
    }
}

#[test]
fn a_100_mib_upload_arrives_intact_and_udp_gets_replies() {
    if lb_tests::require_root("xdp_nat::a_100_mib_upload_arrives_intact_and_udp_gets_replies") {
        scenarios::transfer_and_udp(PATH);
    }
}

#[test]
fn new_flows_avoid_a_down_backend_while_a_long_upload_completes() {
    if lb_tests::require_root(
        "xdp_nat::new_flows_avoid_a_down_backend_while_a_long_upload_completes",
    ) {
        scenarios::backend_down(PATH);
    }
}

#[test]
fn a_backend_that_comes_up_takes_new_flows_and_existing_ones_stay() {
    if lb_tests::require_root(
        "xdp_nat::a_backend_that_comes_up_takes_new_flows_and_existing_ones_stay",
    ) {
        scenarios::backend_added(PATH);
    }
}

#[test]
fn xdp_counters_match_the_traffic_sent() {
    if lb_tests::require_root("xdp_nat::xdp_counters_match_the_traffic_sent") {
        scenarios::counters_match(PATH);
    }
}

#[test]
fn a_packet_too_big_for_the_backend_link_is_answered_and_the_client_learns_the_mtu() {
    if lb_tests::require_root("xdp_nat::a_packet_too_big_for_the_backend_link_is_answered") {
        scenarios::nat_packet_too_big(PATH);
    }
}

#[test]
fn a_download_behind_a_smaller_route_to_the_client_completes() {
    if lb_tests::require_root("xdp_nat::a_download_behind_a_smaller_route_to_the_client") {
        scenarios::nat_reply_too_big(PATH);
    }
}

#[test]
fn replies_routed_to_the_client_by_another_interface_reach_it() {
    if lb_tests::require_root("xdp_nat::replies_routed_to_the_client_by_another_interface") {
        scenarios::nat_reply_by_another_interface(PATH);
    }
}
