//! The program's next-hop cache (`lb-ebpf/src/next_hop.rs`): a route's answer is reused for
//! `NEXT_HOP_TTL_NS`, then asked again, so a next hop that changes its MAC address gets the
//! packets that follow. (That a longer packet than the route has passed is still checked
//! against the MTU is `too_big`'s first test: 1480 bytes fit, 1490 right after do not.)

use super::*;
use lb_common::maps::NEXT_HOP_TTL_NS;
use lb_tests::xdp::testrun::mac;

/// The MAC address the backend 10.0.2.11 takes over (a container restarted on the same IP).
const NEW_B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x77];

#[test]
fn a_backend_that_changes_its_mac_address_gets_the_next_packets_once_the_cache_ages() {
    let Some(mut lab) = lab("next_hop_mac") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let segment = |flags| Packet::tcp(client, 40000, vip, 80, flags).frame(VC_MAC, CLIENT_MAC);

    let out = lab.expect(lab.vc, &segment(TCP_SYN), XDP_REDIRECT, "the flow's SYN");
    assert_eq!(&out[..6], &B1_MAC, "the SYN goes to the backend's MAC");
    let out = lab.expect(lab.vc, &segment(TCP_ACK), XDP_REDIRECT, "the flow's ACK");
    assert_eq!(&out[..6], &B1_MAC, "the ACK goes to the backend's MAC");

    lab.ns
        .ip(&[
            "neigh",
            "replace",
            &B1_4.to_string(),
            "lladdr",
            &mac(NEW_B1_MAC),
            "dev",
            "vb",
            "nud",
            "permanent",
        ])
        .expect("give the backend a new MAC address");
    std::thread::sleep(std::time::Duration::from_nanos(NEXT_HOP_TTL_NS) * 2);
    for i in 0..4 {
        let out = lab.expect(lab.vc, &segment(TCP_ACK), XDP_REDIRECT, "an ACK after it");
        assert_eq!(
            &out[..6],
            &NEW_B1_MAC,
            "ACK {i} after the backend's MAC changed went to the old MAC"
        );
    }
}
