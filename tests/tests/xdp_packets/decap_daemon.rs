//! `lb-daemon decap`: how it learns the addresses it decapsulates for. It runs no crafted
//! packet, so only the XDP binary builds it (the tc one would run it a second time).

use lb_tests::{
    netns::Netns,
    require_root,
    xdp::{bpf_object, Decap},
};

use super::*;

#[test]
fn lb_daemon_decap_accepts_its_interfaces_addresses_and_follows_their_changes() {
    if !require_root("decap_addresses") {
        return;
    }
    let ns = Netns::new("dcp").expect("create a namespace");
    for args in [
        &["link", "add", "d0", "type", "veth", "peer", "name", "d1"][..],
        &["addr", "add", "10.9.0.1/24", "dev", "d0"],
        &["-6", "addr", "add", "fd09::1/64", "dev", "d0", "nodad"],
        &["link", "set", "d0", "up"],
        &["link", "set", "d1", "up"],
    ] {
        ns.ip(args).expect("set up the interface");
    }
    let decap = Decap::start(&ns, "d0", &bpf_object(), &[LOCAL4.into()]);
    assert!(
        decap.ready_line().contains(&LOCAL4.to_string()),
        "lb-daemon decap does not say it takes tunnels from the balancer {LOCAL4}: {}",
        decap.ready_line()
    );
    for addr in ["10.9.0.1", "fd09::1"] {
        assert!(
            decap.ready_line().contains(addr),
            "lb-daemon decap does not say it decapsulates for {addr}: {}",
            decap.ready_line()
        );
    }
    // It reads them every 2 s.
    let within = std::time::Duration::from_secs(10);
    ns.ip(&["addr", "add", "10.9.0.2/24", "dev", "d0"])
        .expect("add an address");
    decap
        .wait_for("decapsulating for 10.9.0.2 too", within)
        .unwrap_or_else(|seen| panic!("an address added to d0 was not taken up: {seen:?}"));
    ns.ip(&["addr", "del", "10.9.0.1/24", "dev", "d0"])
        .expect("remove an address");
    decap
        .wait_for("no longer decapsulating for 10.9.0.1", within)
        .unwrap_or_else(|seen| panic!("an address removed from d0 was kept: {seen:?}"));
}
