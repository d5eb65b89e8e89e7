//! DSR: the client's packet goes to the backend inside an IPIP / IP6IP6 header, and `lb_decap`
//! unwraps it there.

use super::*;

#[test]
fn dsr_ipv4_tcp_is_encapsulated_in_ipip_and_decapsulated_on_the_backend() {
    let Some(mut lab) = lab("dsr_ipv4_tcp") else {
        return;
    };
    lab.backend(0, B1_4.into(), 0);
    lab.service(1, VIP4.into(), 80, IPPROTO_TCP, MODE_DSR, &[0, 0, 0]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let tos = packet::V4 {
        tos: 0x28,
        ..packet::V4_CLIENT
    };
    let inner = packet::ipv4(
        CLIENT4,
        VIP4,
        6,
        tos,
        &[],
        &packet::tcp(client, 41000, vip, 80, TCP_SYN, b""),
    );
    let syn = packet::frame(VC_MAC, CLIENT_MAC, &inner);
    let out = lab.expect(lab.vc, &syn, XDP_REDIRECT, "a SYN to the DSR VIP");
    let outer = packet::V4 {
        tos: 0x28,
        id: 0,
        frag: 0x4000,
        ttl: 64,
    };
    let want = packet::frame(
        B1_MAC,
        VB_MAC,
        &packet::ipv4(LOCAL4, B1_4, 4, outer, &[], &inner),
    );
    packet::assert_checksums(&out, "the IPIP packet sent to the backend");
    assert_same(&out, &want, "the IPIP packet sent to the backend");

    // The backend host's lb_decap hands the client's own packet to its stack.
    let (action, decapped) = lab.run(PROG_DECAP, lab.vb, &out);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "lb_decap must pass the inner packet up"
    );
    assert_same(
        &decapped,
        &packet::frame(B1_MAC, VB_MAC, &inner),
        "the decapsulated packet",
    );
    assert_eq!(lab.stat(Stat::Decapsulated), 1, "one packet decapsulated");

    // A client packet arriving on the interface the backend is behind leaves by XDP_TX.
    let out = lab.expect(lab.vb, &syn, XDP_TX, "a SYN arriving on the backend side");
    assert_same(
        &out,
        &want,
        "the IPIP packet sent back out of the same interface",
    );

    // lb_decap leaves packets that are not encapsulated alone.
    let (action, same) = lab.run(PROG_DECAP, lab.vb, &syn);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "lb_decap passes plain packets"
    );
    assert_same(&same, &syn, "a plain packet through lb_decap");
    assert_eq!(
        lab.stat(Stat::DecapPassed),
        1,
        "one plain packet passed by lb_decap"
    );
    assert_eq!(lab.stat(Stat::Forwarded), 2, "two client packets forwarded");
    assert_eq!(
        lab.service_counters(1),
        Counters {
            packets: 2,
            bytes: 2 * syn.len() as u64,
            new_flows: 1
        },
        "service counters after two packets of one flow"
    );
}

#[test]
fn dsr_ipv6_udp_is_encapsulated_in_ip6ip6_and_decapsulated_on_the_backend() {
    let Some(mut lab) = lab("dsr_ipv6_udp") else {
        return;
    };
    lab.backend(7, B1_6.into(), 0);
    lab.service(5, VIP6.into(), 53, IPPROTO_UDP, MODE_DSR, &[7]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT6.into(), VIP6.into());
    let inner = Packet::udp(client, 6000, vip, 53).payload(b"query").ip();
    let request = packet::frame(VC_MAC, CLIENT_MAC, &inner);
    let out = lab.expect(
        lab.vc,
        &request,
        XDP_REDIRECT,
        "a request to the DSR IPv6 VIP",
    );
    let label = flow_hash(&flow(client, 6000, vip, 53, IPPROTO_UDP)) & 0x000f_ffff;
    let want = packet::frame(
        B1_MAC,
        VB_MAC,
        &packet::ipv6(LOCAL6, B1_6, 41, 0x6000_0000 | label, 64, &inner),
    );
    packet::assert_checksums(&out, "the IP6IP6 packet sent to the backend");
    assert_same(&out, &want, "the IP6IP6 packet sent to the backend");

    let (action, decapped) = lab.run(PROG_DECAP, lab.vb, &out);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "lb_decap must pass the inner packet up"
    );
    assert_same(
        &decapped,
        &packet::frame(B1_MAC, VB_MAC, &inner),
        "the decapsulated packet",
    );
    assert_eq!(
        lab.backend_counters(7).packets,
        1,
        "one packet counted on the backend"
    );

    // The inner traffic class (DSCP and ECN) is copied out, as IPv4's TOS is.
    let udp = packet::udp(client, 6001, vip, 53, b"query");
    let classed = packet::ipv6(CLIENT6, VIP6, 17, 0x6000_0000 | 0xba << 20, 64, &udp);
    let out = lab.expect(
        lab.vc,
        &packet::frame(VC_MAC, CLIENT_MAC, &classed),
        XDP_REDIRECT,
        "a request with traffic class EF and ECT(0)",
    );
    let label = flow_hash(&flow(client, 6001, vip, 53, IPPROTO_UDP)) & 0x000f_ffff;
    let want = packet::frame(
        B1_MAC,
        VB_MAC,
        &packet::ipv6(
            LOCAL6,
            B1_6,
            41,
            0x6000_0000 | 0xba << 20 | label,
            64,
            &classed,
        ),
    );
    assert_same(&out, &want, "the outer header's traffic class");
}

/// Several balancers behind ECMP: a flow another node started arrives here mid-way (an ACK,
/// no conntrack entry). In DSR mode it is placed by the table, as its SYN was on the other
/// node with the same table, and goes on: Katran's way (issue 14). Its conntrack entry then
/// keeps it there when the table changes.
#[test]
fn dsr_a_mid_flow_packet_without_conntrack_is_placed_by_the_table_and_kept() {
    let Some(mut lab) = lab("dsr_mid_flow") else {
        return;
    };
    lab.backend(0, B1_4.into(), 0);
    lab.backend(1, B2_4.into(), 0);
    lab.service(
        1,
        VIP4.into(),
        80,
        IPPROTO_TCP,
        MODE_DSR,
        &[0, 1, 0, 1, 1, 0, 1],
    );
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let segment = |sport: u16, flags: u8| {
        Packet::tcp(client, sport, vip, 80, flags)
            .payload(b"x")
            .frame(VC_MAC, CLIENT_MAC)
    };
    // The outer (IPIP) destination of an untagged frame without IP options.
    let outer_dst = |f: &[u8]| Ipv4Addr::new(f[30], f[31], f[32], f[33]);
    let mut placed = Vec::new();
    for sport in 46_000..46_030u16 {
        let out = lab.expect(
            lab.vc,
            &segment(sport, TCP_ACK),
            XDP_REDIRECT,
            &format!("flow {sport}'s ACK with no conntrack entry"),
        );
        placed.push((sport, outer_dst(&out)));
    }
    let on_b2 = placed.iter().filter(|(_, b)| *b == B2_4).count();
    assert!(
        on_b2 > 0 && on_b2 < placed.len(),
        "mid-flow packets all went to one backend: {placed:?}"
    );
    // Where the table puts the flow: its SYN, with the entry gone, goes to the same backend.
    for &(sport, backend) in &placed[..10] {
        let key = flow(client, sport, vip, 80, IPPROTO_TCP);
        lab.conntrack
            .remove(&key)
            .expect("the ACK made a conntrack entry");
        let out = lab.expect(
            lab.vc,
            &segment(sport, TCP_SYN),
            XDP_REDIRECT,
            "the flow's SYN",
        );
        assert_eq!(
            outer_dst(&out),
            backend,
            "flow {sport}: the mid-flow packet was not placed where the table puts its SYN"
        );
    }
    // The table changes (every slot b1): flows placed mid-way stay on their backend.
    lab.service(1, VIP4.into(), 80, IPPROTO_TCP, MODE_DSR, &[0; 7]);
    for &(sport, backend) in &placed[10..] {
        let out = lab.expect(
            lab.vc,
            &segment(sport, TCP_ACK),
            XDP_REDIRECT,
            "the flow's next ACK after the table changed",
        );
        assert_eq!(
            outer_dst(&out),
            backend,
            "flow {sport} left its backend when the table changed"
        );
    }
}
