//! DSR replies the balancer's host routes (it is the backends' gateway): from the VIP and
//! port to the client of a flow the balancer placed. `lb_tc` sends them on as a router would
//! (TTL / hop limit one lower, nothing else changed); `lb_xdp` passes them to the kernel,
//! which forwards them itself.

use super::*;

/// What the hook under test does with a DSR reply: tc sends it on to the client, rewritten as
/// `forwarded` says; XDP passes it untouched.
fn expect_reply(lab: &Lab, reply: &[u8], forwarded: &[u8], what: &str) {
    if lab.hook == Hook::Tc {
        let out = lab.expect(lab.vb, reply, XDP_REDIRECT, what);
        packet::assert_checksums(&out, what);
        assert_same(&out, forwarded, what);
    } else {
        let out = lab.expect(lab.vb, reply, XDP_PASS, what);
        assert_same(&out, reply, what);
    }
}

#[test]
fn dsr_replies_go_to_the_client_with_one_hop_less_at_tc_and_to_the_kernel_at_xdp() {
    let Some(mut lab) = lab("dsr_replies") else {
        return;
    };
    lab.backend(0, B1_4.into(), 0);
    lab.backend(1, B1_6.into(), 0);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_DSR, &[0, 0, 0]);
    lab.service(1, VIP6.into(), 53, IPPROTO_UDP, MODE_DSR, &[1, 1, 1]);
    let (client4, vip4, client6, vip6): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), CLIENT6.into(), VIP6.into());
    // The clients' packets place the two flows.
    let syn = Packet::tcp(client4, 41000, vip4, 80, TCP_SYN).frame(VC_MAC, CLIENT_MAC);
    lab.expect(lab.vc, &syn, XDP_REDIRECT, "the client's SYN");
    let query = Packet::udp(client6, 5353, vip6, 53)
        .payload(b"query")
        .frame(VC_MAC, CLIENT_MAC);
    lab.expect(lab.vc, &query, XDP_REDIRECT, "the client's query");

    let reply = Packet::tcp(vip4, 80, client4, 41000, TCP_SYN | TCP_ACK).payload(b"hello");
    expect_reply(
        &lab,
        &reply.clone().frame(VB_MAC, B1_MAC),
        &reply.forwarded().frame(CLIENT_MAC, VC_MAC),
        "an IPv4 TCP reply from the DSR VIP",
    );
    let reply = Packet::udp(vip6, 53, client6, 5353).payload(b"answer");
    expect_reply(
        &lab,
        &reply.clone().frame(VB_MAC, B1_MAC),
        &reply.forwarded().frame(CLIENT_MAC, VC_MAC),
        "an IPv6 UDP reply from the DSR VIP",
    );

    let (sent, passed) = if lab.hook == Hook::Tc { (2, 0) } else { (0, 2) };
    assert_eq!(lab.stat(Stat::DsrReplies), sent, "DSR replies sent on");
    assert_eq!(lab.stat(Stat::PassNotVip), passed, "DSR replies passed");
    assert_eq!(
        lab.stat(Stat::Forwarded),
        2,
        "only the clients' packets are `forwarded`"
    );
    assert_eq!(
        lab.service_counters(0).packets,
        1,
        "a reply counted as the service's traffic"
    );
}

#[test]
fn only_replies_of_placed_dsr_flows_with_a_next_hop_are_sent_on() {
    let Some(mut lab) = lab("dsr_replies_not") else {
        return;
    };
    lab.backend(0, B1_4.into(), 0);
    lab.backend(1, B2_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_DSR, &[0, 0, 0]);
    lab.service(1, VIP4.into(), 443, IPPROTO_TCP, MODE_NAT, &[1, 1, 1]);
    let (client, vip, local): (IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), LOCAL4.into());
    // Flows for the replies below to answer, so that a case stops at the rule it names: a
    // case from a port or protocol no service has could not have one anyway.
    for (src, dport) in [(client, 80), (client, 443), (local, 80)] {
        let syn = Packet::tcp(src, 41000, vip, dport, TCP_SYN).frame(VC_MAC, CLIENT_MAC);
        lab.expect(lab.vc, &syn, XDP_REDIRECT, "a client's SYN");
    }
    let other_host: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x99];
    let cases = [
        (
            Packet::tcp(vip, 443, client, 41000, TCP_ACK),
            "from a NAT service's VIP and port",
        ),
        (
            Packet::tcp(vip, 81, client, 41000, TCP_ACK),
            "from the VIP, a port no service has",
        ),
        (
            Packet::udp(vip, 80, client, 41000),
            "from the VIP and port, but UDP where the service is TCP",
        ),
        (
            Packet::tcp(vip, 80, local, 41000, TCP_ACK),
            "from the DSR VIP to the balancer's own address",
        ),
        (
            Packet::tcp(vip, 80, client, 41001, TCP_ACK),
            "from the DSR VIP and port to a client port with no flow",
        ),
        (
            Packet::tcp(vip, 80, client, 41000, TCP_ACK).options(&[1, 1, 1, 1]),
            "from the DSR VIP and port with IPv4 options (the kernel's to process)",
        ),
        (
            Packet::tcp(vip, 80, client, 41000, TCP_ACK).v4(packet::V4 {
                ttl: 1,
                ..packet::V4_CLIENT
            }),
            "from the DSR VIP at TTL 1 (the kernel answers it)",
        ),
    ];
    let mut frames: Vec<(Vec<u8>, &str)> = cases
        .iter()
        .map(|(packet, what)| (packet.clone().frame(VB_MAC, B1_MAC), *what))
        .collect();
    frames.push((
        Packet::tcp(vip, 80, client, 41000, TCP_ACK).frame(other_host, B1_MAC),
        "a reply in a frame for another host's Ethernet address (a promiscuous interface)",
    ));
    for (frame, what) in &frames {
        let out = lab.expect(lab.vb, frame, XDP_PASS, what);
        assert_same(&out, frame, what);
    }
    assert_eq!(lab.stat(Stat::DsrReplies), 0, "a packet was sent on");
    assert_eq!(
        lab.stat(Stat::PassNotVip),
        frames.len() as u64,
        "every packet passed as not the balancer's"
    );
    // The same reply in a frame for this host is sent on at tc: the flow and route are there.
    let reply = Packet::tcp(vip, 80, client, 41000, TCP_ACK);
    expect_reply(
        &lab,
        &reply.clone().frame(VB_MAC, B1_MAC),
        &reply.forwarded().frame(CLIENT_MAC, VC_MAC),
        "the reply of the placed flow",
    );
}
