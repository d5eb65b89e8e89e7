//! `lb_tc` hands packets for a veth whose peer is in another namespace straight to the peer
//! (`bpf_redirect_peer`); the kernel drops such a redirect to any other device or to a peer in
//! the balancer's own namespace, so the daemon's check (`peer::peer_elsewhere`) must tell the
//! two apart exactly. Asked here, in namespaces the test makes, about a veth pair with both
//! ends in one namespace, one across two, a bridge and the loopback. The end-to-end tc tests
//! (tc_nat.rs, tc_dsr.rs) send their traffic through such peer redirects and check the
//! daemon said it uses them (`scenarios::transfer_and_udp`).
//!
//! Needs root.

use lb_daemon::dataplane::xdp::loader::if_index;
use lb_daemon::dataplane::xdp::peer::peer_elsewhere;
use lb_tests::netns::{veth, Netns};

/// What the check says of `name` inside `ns`.
fn asked(ns: &Netns, name: &str) -> bool {
    ns.enter(|| {
        let ifindex = if_index(name).unwrap_or_else(|| panic!("{name} has no index"));
        peer_elsewhere(ifindex).unwrap_or_else(|e| panic!("asking about {name}: {e}"))
    })
    .expect("entering the namespace")
}

#[test]
fn only_a_veth_whose_peer_is_in_another_namespace_takes_peer_redirects() {
    if !lb_tests::require_root(
        "veth_peer::only_a_veth_whose_peer_is_in_another_namespace_takes_peer_redirects",
    ) {
        return;
    }
    let lb = Netns::new("vpl").expect("namespace");
    let other = Netns::new("vpo").expect("namespace");
    veth(&lb, "out0", "10.231.0.1/24", &other, "in0", "10.231.0.2/24").expect("veth across");
    lb.ip(&[
        "link", "add", "here0", "type", "veth", "peer", "name", "here1",
    ])
    .expect("veth within one namespace");
    lb.ip(&["link", "add", "br0", "type", "bridge"])
        .expect("bridge");

    assert!(asked(&lb, "out0"), "out0's peer is in another namespace");
    assert!(asked(&other, "in0"), "in0's peer is in another namespace");
    assert!(
        !asked(&lb, "here0"),
        "here0's peer is in the same namespace: a peer redirect to it would be dropped"
    );
    assert!(
        !asked(&lb, "here1"),
        "here1's peer is in the same namespace"
    );
    assert!(!asked(&lb, "br0"), "a bridge has no peer");
    assert!(!asked(&lb, "lo"), "the loopback has no peer");
}
