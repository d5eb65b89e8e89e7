//! `lb_decap`: which tunnels a backend host unwraps, which it leaves alone or drops (how
//! `lb-daemon decap` learns its own addresses: `decap_daemon`).

use super::*;
use lb_common::maps::DecapAddr;

/// The packet the tunnels carry: a client's SYN to VIP4:80.
fn inner() -> Vec<u8> {
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    Packet::tcp(client, 41000, vip, 80, TCP_SYN).ip()
}

/// An IPIP frame on `vb` from `src` to `dst` (outer header as a balancer writes it, DS field
/// 0) carrying [`inner`].
fn ipip(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let outer = packet::V4 {
        tos: 0,
        id: 0,
        frag: 0x4000,
        ttl: 64,
    };
    packet::frame(
        B1_MAC,
        VB_MAC,
        &packet::ipv4(src, dst, 4, outer, &[], &inner()),
    )
}

#[test]
fn lb_decap_leaves_tunnels_for_other_hosts_alone_and_counts_them() {
    let Some(mut lab) = lab("decap_not_local") else {
        return;
    };
    let to = |dst: Ipv4Addr| ipip(LOCAL4, dst);
    let (action, out) = lab.run(PROG_DECAP, lab.vb, &to(B2_4));
    assert_eq!(action_name(action), "XDP_PASS");
    assert_same(
        &out,
        &to(B2_4),
        "an IPIP packet for another host through lb_decap",
    );
    let (c6, v6): (IpAddr, IpAddr) = (CLIENT6.into(), VIP6.into());
    let inner6 = Packet::udp(c6, 6000, v6, 53).payload(b"q").ip();
    let other6 = packet::frame(
        B1_MAC,
        VB_MAC,
        &packet::ipv6(LOCAL6, LOCAL6, 41, 0x6000_0000, 64, &inner6),
    );
    let (action, out) = lab.run(PROG_DECAP, lab.vb, &other6);
    assert_eq!(action_name(action), "XDP_PASS");
    assert_same(
        &out,
        &other6,
        "an IP6IP6 packet for another host through lb_decap",
    );
    assert_eq!(
        lab.stat(Stat::DecapNotLocal),
        2,
        "tunnels for other hosts were not counted as such"
    );
    assert_eq!(
        lab.stat(Stat::Decapsulated),
        0,
        "lb_decap stripped a tunnel for another host"
    );

    // b1's own address is decapsulated until it leaves the map (IPv4 and IPv6 keys differ
    // even where their words are alike).
    let (_, out) = lab.run(PROG_DECAP, lab.vb, &to(B1_4));
    assert_same(
        &out,
        &packet::frame(B1_MAC, VB_MAC, &inner()),
        "decapsulated for b1",
    );
    lab.decap_addrs
        .remove(&DecapAddr::new(B1_4.into()))
        .expect("remove b1 from DECAP_ADDRS");
    let v6_alike = IpAddr::V6(Ipv6Addr::new(
        u16::from_be_bytes([10, 0]),
        u16::from_be_bytes([2, 11]),
        0,
        0,
        0,
        0,
        0,
        0,
    ));
    lab.decap_addrs
        .insert(DecapAddr::new(v6_alike), 1, 0)
        .expect("write DECAP_ADDRS");
    let (_, out) = lab.run(PROG_DECAP, lab.vb, &to(B1_4));
    assert_same(&out, &to(B1_4), "an address removed from DECAP_ADDRS");
    assert_eq!(lab.stat(Stat::DecapNotLocal), 3);
    assert_eq!(lab.stat(Stat::Decapsulated), 1);
}

#[test]
fn lb_decap_drops_tunnels_for_this_host_from_a_source_that_is_not_a_balancer() {
    let Some(lab) = lab("decap_bad_source") else {
        return;
    };
    let from = |src: Ipv4Addr| ipip(src, B1_4);
    // Anyone who reaches the backend: a spoofed inner source must not get past it.
    let (action, _) = lab.run(PROG_DECAP, lab.vb, &from(CLIENT4));
    assert_eq!(
        action_name(action),
        "XDP_DROP",
        "a tunnel from a host that is not a balancer was not dropped"
    );
    let (c6, v6): (IpAddr, IpAddr) = (CLIENT6.into(), VIP6.into());
    let inner6 = Packet::udp(c6, 6000, v6, 53).payload(b"q").ip();
    let spoofed6 = packet::frame(
        B1_MAC,
        VB_MAC,
        &packet::ipv6(CLIENT6, B1_6, 41, 0x6000_0000, 64, &inner6),
    );
    let (action, _) = lab.run(PROG_DECAP, lab.vb, &spoofed6);
    assert_eq!(action_name(action), "XDP_DROP", "the same over IPv6");
    assert_eq!(
        (lab.stat(Stat::DecapBadSource), lab.stat(Stat::Decapsulated)),
        (2, 0),
        "tunnels from a non-balancer were stripped or not counted"
    );
    let (action, out) = lab.run(PROG_DECAP, lab.vb, &from(LOCAL4));
    assert_eq!(action_name(action), "XDP_PASS");
    assert_same(
        &out,
        &packet::frame(B1_MAC, VB_MAC, &inner()),
        "a tunnel from the balancer, decapsulated",
    );
}

/// A router between balancer and backend that marks congestion marks the outer header
/// (encapsulation copies the inner ECN field out): the decapsulator carries "congestion
/// experienced" into an ECN-capable inner packet (RFC 6040, 4.2), IPv4 (its header checksum
/// updated) and IPv6, and leaves a packet that is not ECN-capable as it is.
#[test]
fn lb_decap_carries_a_congestion_mark_of_the_outer_header_in() {
    let Some(lab) = lab("decap_ecn") else {
        return;
    };
    let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let inner4 = |tos: u8| {
        let h = packet::V4 {
            tos,
            id: 0,
            frag: 0x4000,
            ttl: 64,
        };
        packet::ipv4(
            CLIENT4,
            VIP4,
            6,
            h,
            &[],
            &packet::tcp(c, 41000, v, 80, TCP_ACK, b"data"),
        )
    };
    let outer = packet::V4 {
        tos: 0x03,
        id: 0,
        frag: 0x4000,
        ttl: 64,
    };
    for (inner, want, what) in [
        (0x02, 0x03, "ECT(0) under an outer CE"),
        (0x01, 0x03, "ECT(1) under an outer CE"),
        (
            0xba,
            0xbb,
            "EF and ECT(0) under an outer CE: the DSCP stays",
        ),
        (0x00, 0x00, "not ECN-capable: left alone"),
    ] {
        let frame = packet::frame(
            B1_MAC,
            VB_MAC,
            &packet::ipv4(LOCAL4, B1_4, 4, outer, &[], &inner4(inner)),
        );
        let (action, out) = lab.run(PROG_DECAP, lab.vb, &frame);
        assert_eq!(action_name(action), "XDP_PASS", "{what}");
        assert_same(&out, &packet::frame(B1_MAC, VB_MAC, &inner4(want)), what);
    }

    let (c6, v6): (IpAddr, IpAddr) = (CLIENT6.into(), VIP6.into());
    let udp6 = packet::udp(c6, 6000, v6, 53, b"q");
    let inner6 = |class: u32| packet::ipv6(CLIENT6, VIP6, 17, 0x6000_0000 | class << 20, 64, &udp6);
    for (inner, want, what) in [
        (0x02, 0x03, "IPv6 ECT(0) under an outer CE"),
        (0x00, 0x00, "IPv6 not ECN-capable: left alone"),
    ] {
        let frame = packet::frame(
            B1_MAC,
            VB_MAC,
            &packet::ipv6(
                LOCAL6,
                B1_6,
                41,
                0x6000_0000 | 0x03 << 20,
                64,
                &inner6(inner),
            ),
        );
        let (action, out) = lab.run(PROG_DECAP, lab.vb, &frame);
        assert_eq!(action_name(action), "XDP_PASS", "{what}");
        assert_same(&out, &packet::frame(B1_MAC, VB_MAC, &inner6(want)), what);
    }
}
