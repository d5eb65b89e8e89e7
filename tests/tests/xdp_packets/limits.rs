//!
//! Per-client limits on crafted packets: service 0 is TCP NAT on VIP4:80 with one backend,
//! service 1 UDP NAT on VIP4:53; `limits` sets service `id`'s `LIMITS` entry.

use super::*;

const CLIENT_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 101);

fn limited(lab: &mut Lab, id: u32, limits: Limits) {
    lab.limits.set(id, limits, 0).expect("write LIMITS");
}

/// A TCP segment from `client`:`sport` to VIP4:80 with `flags`.
fn tcp(client: Ipv4Addr, sport: u16, flags: u8) -> Vec<u8> {
    let (c, v): (IpAddr, IpAddr) = (client.into(), VIP4.into());
    Packet::tcp(c, sport, v, 80, flags).frame(VC_MAC, CLIENT_MAC)
}

fn udp(client: Ipv4Addr, sport: u16) -> Vec<u8> {
    let (c, v): (IpAddr, IpAddr) = (client.into(), VIP4.into());
    Packet::udp(c, sport, v, 53)
        .payload(b"q")
        .frame(VC_MAC, CLIENT_MAC)
}

/// The RST+ACK the balancer answers a refused SYN from `client`:`sport` to `vip`:80
/// with: addresses, ports and MACs swapped, sequence 0, acknowledging `ack`.
fn rst(client: IpAddr, sport: u16, vip: IpAddr, ack: u32) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend_from_slice(&80u16.to_be_bytes());
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&0u32.to_be_bytes());
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.extend_from_slice(&[5 << 4, TCP_RST | TCP_ACK, 0, 0, 0, 0, 0, 0]);
    let c = packet::checksum(&[&packet::pseudo(vip, client, 6, seg.len()), &seg]);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    let ip = match (vip, client) {
        (IpAddr::V4(v), IpAddr::V4(c)) => {
            let h = packet::V4 {
                tos: 0,
                id: 0,
                frag: 0x4000,
                ttl: 64,
            };
            packet::ipv4(v, c, 6, h, &[], &seg)
        }
        (IpAddr::V6(v), IpAddr::V6(c)) => packet::ipv6(v, c, 6, 0x6000_0000, 64, &seg),
        _ => panic!("mixed address families"),
    };
    packet::frame(CLIENT_MAC, VC_MAC, &ip)
}

#[test]
fn a_refused_ipv6_syn_with_data_is_answered_and_one_with_ipv4_options_dropped() {
    let Some(mut lab) = setup("limits_rst") else {
        return;
    };
    lab.backend(3, B1_6.into(), 8080);
    lab.service(2, VIP6.into(), 80, IPPROTO_TCP, MODE_NAT, &[3]);
    let one = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    limited(&mut lab, 2, one);
    limited(&mut lab, 0, one);
    let (c6, v6): (IpAddr, IpAddr) = (CLIENT6.into(), VIP6.into());
    let syn6 = |sport: u16, data: &[u8]| {
        Packet::tcp(c6, sport, v6, 80, TCP_SYN)
            .payload(data)
            .frame(VC_MAC, CLIENT_MAC)
    };
    lab.expect(
        lab.vc,
        &syn6(43000, b""),
        XDP_REDIRECT,
        "an IPv6 SYN within the limit",
    );
    let out = lab.expect(
        lab.vc,
        &syn6(43001, b"hello"),
        XDP_TX,
        "an IPv6 SYN over it",
    );
    packet::assert_checksums(&out, "the IPv6 RST");
    // The SYN's sequence + 1 + its 5 bytes of data.
    assert_same(&out, &rst(c6, 43001, v6, 0x1122_3344 + 6), "the IPv6 RST");

    lab.expect(
        lab.vc,
        &tcp(CLIENT4, 43000, TCP_SYN),
        XDP_REDIRECT,
        "an IPv4 SYN",
    );
    let (c4, v4): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let with_options = Packet::tcp(c4, 43001, v4, 80, TCP_SYN)
        .options(&[1, 1, 1, 0])
        .frame(VC_MAC, CLIENT_MAC);
    lab.expect(
        lab.vc,
        &with_options,
        XDP_DROP,
        "a refused SYN with IPv4 options",
    );
    assert_eq!(lab.stat(Stat::RefusedClientConnections), 2);
}

/// A NAT segment without SYN that finds no flow is reset; when it has no ACK either, the
/// reset acknowledges the segment's length as RFC 9293 counts it (§3.10.7.1: its data, one
/// for a FIN), not one more. A segment whose data offset lies beyond it is not answered.
#[test]
fn a_segment_without_ack_is_reset_acknowledging_its_length_and_a_bad_data_offset_is_not() {
    let Some(lab) = setup("limits_rst_ack") else {
        return;
    };
    let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    const SEQ: u32 = 0x1122_3344; // `Packet::tcp`'s sequence number
    const TCP_PSH: u8 = 0x08;
    for (flags, what, ack) in [
        (TCP_PSH, "10 bytes of data", SEQ + 10),
        (TCP_FIN, "10 bytes and a FIN", SEQ + 11),
    ] {
        let segment = Packet::tcp(c, 42100, v, 80, flags)
            .payload(&[0x42; 10])
            .frame(VC_MAC, CLIENT_MAC);
        let out = lab.expect(lab.vc, &segment, XDP_TX, what);
        assert_eq!(
            out,
            rst(c, 42100, v, ack),
            "{what} without ACK: the reset must acknowledge {ack:#x}"
        );
    }

    // Data offset 15 (60 bytes of header) on a segment of 20.
    let mut bad = Packet::tcp(c, 42101, v, 80, TCP_PSH).frame(VC_MAC, CLIENT_MAC);
    bad[14 + 20 + 12] = 15 << 4;
    let reset = lab.stat(Stat::ResetNatNoFlow);
    lab.expect(lab.vc, &bad, XDP_DROP, "a data offset beyond the segment");
    assert_eq!(
        lab.stat(Stat::ResetNatNoFlow),
        reset + 1,
        "counted as the segment it would have been reset for"
    );
}

/// A new flow whose backend has no route takes no connection slot: its SYN is dropped for the
/// route and the client resends it, and each resent SYN would otherwise count once more until
/// the client is refused (here at once: a limit of 1).
#[test]
fn a_syn_dropped_for_want_of_a_route_gives_its_connection_slot_back() {
    let Some(mut lab) = setup("limits_no_route") else {
        return;
    };
    limited(
        &mut lab,
        0,
        Limits {
            max_connections: 1,
            ..Limits::default()
        },
    );
    let blackhole = ["route", "add", "blackhole", &format!("{B1_4}/32")];
    lab.ns.ip(&blackhole).expect("a blackhole route to b1");
    for what in ["a SYN", "the same SYN resent"] {
        lab.expect(lab.vc, &tcp(CLIENT4, 42200, TCP_SYN), XDP_DROP, what);
        assert_eq!(
            connections(&lab, CLIENT4),
            0,
            "{what}, dropped for want of a route, holds a connection slot"
        );
    }
    assert_eq!(lab.stat(Stat::DropNoRoute), 2);
    lab.ns
        .ip(&["route", "del", "blackhole", &format!("{B1_4}/32")])
        .expect("remove the blackhole route");
    lab.expect(
        lab.vc,
        &tcp(CLIENT4, 42200, TCP_SYN),
        XDP_REDIRECT,
        "the SYN once the route is back",
    );
    assert_eq!(connections(&lab, CLIENT4), 1);
}

/// A counted flow the balancer ends with a RST (its backend went down and its segment
/// cannot be carried on another: NAT) gives its client's slot back, as its FIN would have:
/// the client will send no FIN or RST of its own to free it.
#[test]
fn a_flow_the_balancer_resets_gives_its_connection_slot_back() {
    let Some(mut lab) = setup("limits_reset_flow") else {
        return;
    };
    lab.backend(1, B2_4.into(), 8080);
    limited(
        &mut lab,
        0,
        Limits {
            max_connections: 1,
            ..Limits::default()
        },
    );
    lab.expect(
        lab.vc,
        &tcp(CLIENT4, 42000, TCP_SYN),
        XDP_REDIRECT,
        "the client's one connection",
    );
    assert_eq!(connections(&lab, CLIENT4), 1);
    // b1 goes down; the table has b2 only.
    lab.set_backend_flags(0, BACKEND_F_DOWN);
    lab.publish(0, &[1]);
    let out = lab.expect(
        lab.vc,
        &tcp(CLIENT4, 42000, TCP_ACK),
        XDP_TX,
        "the connection's next segment, its backend down",
    );
    assert_eq!(tcp_flags_of(&out), TCP_RST, "the segment is not reset");
    assert_eq!(lab.stat(Stat::ResetNatNoFlow), 1);
    assert_eq!(
        connections(&lab, CLIENT4),
        0,
        "the reset connection still holds its client's slot"
    );
    lab.expect(
        lab.vc,
        &tcp(CLIENT4, 42001, TCP_SYN),
        XDP_REDIRECT,
        "a new connection of the client after the reset",
    );
}

/// On `dsr` a segment without SYN that misses conntrack is recorded (the flow goes on where
/// the table puts it). A client at its connection limit that sends a bare ACK first and then
/// its SYN on the same port must still be refused: the SYN starts a flow the limits never
/// admitted, not a retransmission.
#[test]
fn a_dsr_client_at_its_limit_cannot_slip_a_syn_in_behind_a_bare_ack() {
    let Some(mut lab) = lab("limits_dsr_ack") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_DSR, &[0]);
    limited(
        &mut lab,
        0,
        Limits {
            max_connections: 1,
            ..Limits::default()
        },
    );
    let send = |lab: &Lab, port, flags, action, what| {
        lab.expect(lab.vc, &tcp(CLIENT4, port, flags), action, what)
    };
    send(&lab, 42000, TCP_SYN, XDP_REDIRECT, "the first connection");
    send(
        &lab,
        42001,
        TCP_SYN,
        XDP_TX,
        "a second connection; the limit is 1",
    );
    send(
        &lab,
        42002,
        TCP_ACK,
        XDP_REDIRECT,
        "a bare ACK, met in mid-stream",
    );
    let key = flow(CLIENT4.into(), 42002, VIP4.into(), 80, IPPROTO_TCP);
    let entry = lab
        .conntrack
        .get(&key, 0)
        .expect("the mid-stream flow's entry");
    assert_eq!(
        entry.flags, CT_F_MIDSTREAM,
        "conntrack flags of a mid-stream entry"
    );
    send(
        &lab,
        42002,
        TCP_SYN,
        XDP_TX,
        "a SYN behind the bare ACK, over the limit",
    );
    assert_eq!(
        lab.stat(Stat::RefusedClientConnections),
        2,
        "the SYN behind the bare ACK was not refused by the limits"
    );
    assert_eq!(connections(&lab, CLIENT4), 1);
    // Once the first flow ends (on dsr the client's FIN is all the balancer sees), a SYN on
    // the mid-stream entry's port is admitted as a new flow.
    send(
        &lab,
        42000,
        TCP_FIN | TCP_ACK,
        XDP_REDIRECT,
        "the first flow's FIN",
    );
    send(
        &lab,
        42002,
        TCP_SYN,
        XDP_REDIRECT,
        "the SYN, now under the limit",
    );
    let entry = lab
        .conntrack
        .get(&key, 0)
        .expect("the admitted flow's entry");
    assert_eq!(
        entry.flags, CT_F_COUNTED,
        "conntrack flags of the admitted flow"
    );
    assert_eq!(connections(&lab, CLIENT4), 1);
}

fn setup(test: &str) -> Option<Lab> {
    let mut lab = lab(test)?;
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    lab.service(1, VIP4.into(), 53, IPPROTO_UDP, MODE_NAT, &[0]);
    Some(lab)
}

fn connections(lab: &Lab, client: Ipv4Addr) -> u64 {
    let key = ClientKey {
        service: 0,
        addr: words(client.into()),
    };
    lab.clients.get(&key, 0).map_or(0, |s| s.connections)
}

#[test]
fn new_flows_over_a_clients_burst_are_refused_and_counted_and_another_client_is_not() {
    let Some(mut lab) = setup("limits_rate") else {
        return;
    };
    // One token per 100 s after a burst of 3: nothing refills during the test.
    let slow = Limits {
        interval_ns: 100_000_000_000,
        burst_ns: 300_000_000_000,
        max_connections: 0,
        idle_timeout_s: 0,
    };
    limited(&mut lab, 0, slow);
    limited(
        &mut lab,
        1,
        Limits {
            burst_ns: 200_000_000_000,
            ..slow
        },
    );
    for port in 41000..41003 {
        lab.expect(
            lab.vc,
            &tcp(CLIENT4, port, TCP_SYN),
            XDP_REDIRECT,
            "a SYN within the burst",
        );
    }
    let out = lab.expect(
        lab.vc,
        &tcp(CLIENT4, 41003, TCP_SYN),
        XDP_TX,
        "a 4th SYN; the burst is 3",
    );
    packet::assert_checksums(&out, "the RST answering a refused SYN");
    assert_same(
        &out,
        &rst(CLIENT4.into(), 41003, VIP4.into(), 0x1122_3345),
        "the RST answering a refused SYN",
    );
    assert_eq!(
        lab.stat(Stat::RefusedClientRate),
        1,
        "the refused SYN is not counted"
    );
    assert!(
        lab.conntrack
            .get(
                &flow(CLIENT4.into(), 41003, VIP4.into(), 80, IPPROTO_TCP),
                0
            )
            .is_err(),
        "a refused SYN left a conntrack entry"
    );
    assert_eq!(
        lab.service_counters(0).new_flows,
        3,
        "the refused SYN counted as a new flow of the service"
    );
    lab.expect(
        lab.vc,
        &tcp(CLIENT_B, 41003, TCP_SYN),
        XDP_REDIRECT,
        "another client's SYN while the first is over its rate",
    );
    // Packets of admitted flows and TCP misses without SYN are never limited.
    for _ in 0..5 {
        lab.expect(
            lab.vc,
            &tcp(CLIENT4, 41000, TCP_ACK),
            XDP_REDIRECT,
            "an ACK of an admitted flow of a client over its rate",
        );
    }
    // On NAT it takes no port (its backend never saw it): reset, but not for the limits.
    lab.expect(
        lab.vc,
        &tcp(CLIENT4, 41100, TCP_ACK),
        XDP_TX,
        "an ACK that misses conntrack (an evicted flow) from a client over its rate",
    );
    assert_eq!(
        (
            lab.stat(Stat::RefusedClientRate),
            lab.stat(Stat::ResetNatNoFlow)
        ),
        (1, 1),
        "packets of flows were refused by the limits, or the miss was not reset for NAT"
    );

    // UDP: each new source port is a new flow; a flow's later datagrams pass.
    for (client, sport, action, what) in [
        (CLIENT4, 5000, XDP_REDIRECT, "a first UDP flow"),
        (CLIENT4, 5001, XDP_REDIRECT, "a second UDP flow"),
        (CLIENT4, 5002, XDP_DROP, "a third UDP flow; the burst is 2"),
        (
            CLIENT4,
            5000,
            XDP_REDIRECT,
            "a datagram of an admitted flow",
        ),
        (CLIENT_B, 5002, XDP_REDIRECT, "another client's UDP flow"),
    ] {
        lab.expect(lab.vc, &udp(client, sport), action, what);
    }
    assert_eq!(
        lab.stat(Stat::RefusedClientRate),
        2,
        "the refused datagram is not counted"
    );
}

#[test]
fn a_client_at_its_connection_limit_is_refused_until_a_fin_or_rst_of_one_of_its_flows() {
    let Some(mut lab) = setup("limits_connections") else {
        return;
    };
    limited(
        &mut lab,
        0,
        Limits {
            max_connections: 2,
            ..Limits::default()
        },
    );
    let syn = |lab: &Lab, client, port, action, what| {
        lab.expect(lab.vc, &tcp(client, port, TCP_SYN), action, what)
    };
    let out = syn(&lab, CLIENT4, 42000, XDP_REDIRECT, "the first connection");
    let snat_42000 = l4_source_port(&out);
    let out = syn(&lab, CLIENT4, 42001, XDP_REDIRECT, "the second connection");
    let snat_42001 = l4_source_port(&out);
    // A segment from the backend to the balancer (the NAT reply path).
    let (b, local): (IpAddr, IpAddr) = (B1_4.into(), LOCAL4.into());
    let reply =
        |snat: u16, flags: u8| Packet::tcp(b, 8080, local, snat, flags).frame(VB_MAC, B1_MAC);
    syn(
        &lab,
        CLIENT4,
        42002,
        XDP_TX,
        "a third connection; the limit is 2",
    );
    assert_eq!(
        lab.stat(Stat::RefusedClientConnections),
        1,
        "the refusal is not counted"
    );
    syn(
        &lab,
        CLIENT_B,
        42002,
        XDP_REDIRECT,
        "another client's connection",
    );
    assert_eq!(connections(&lab, CLIENT4), 2);

    // The client half-closes its first flow: on NAT that frees nothing (the backend may
    // go on sending, and a client could free its slots by half-closing them all)...
    for _ in 0..3 {
        lab.expect(
            lab.vc,
            &tcp(CLIENT4, 42000, TCP_FIN | TCP_ACK),
            XDP_REDIRECT,
            "the client's FIN",
        );
    }
    assert_eq!(
        connections(&lab, CLIENT4),
        2,
        "the client's FIN gave its slot back on NAT"
    );
    // ...the backend's FIN ends the flow and gives its slot back, once.
    for _ in 0..2 {
        lab.expect(
            lab.vb,
            &reply(snat_42000, TCP_FIN | TCP_ACK),
            XDP_REDIRECT,
            "the backend's FIN",
        );
    }
    let key = flow(CLIENT4.into(), 42000, VIP4.into(), 80, IPPROTO_TCP);
    let entry = lab.conntrack.get(&key, 0).expect("the closed flow's entry");
    assert_eq!(
        entry.flags,
        CT_F_COUNTED | CT_F_CLOSED,
        "conntrack flags after the FIN"
    );
    assert_eq!(
        connections(&lab, CLIENT4),
        1,
        "two FINs of one flow from its backend gave back other than one slot"
    );
    let out = syn(
        &lab,
        CLIENT4,
        42002,
        XDP_REDIRECT,
        "a connection after a FIN",
    );
    let snat_42002 = l4_source_port(&out);
    syn(
        &lab,
        CLIENT4,
        42003,
        XDP_TX,
        "a third open connection again",
    );

    // The backend resets the second flow (NAT reply path), which it had answered (an RST
    // before any answer is a refused SYN, dropped so that the client retries): its slot goes
    // back too.
    lab.expect(
        lab.vb,
        &reply(snat_42001, TCP_SYN | TCP_ACK),
        XDP_REDIRECT,
        "the backend's SYN-ACK",
    );
    lab.expect(
        lab.vb,
        &reply(snat_42001, TCP_RST | TCP_ACK),
        XDP_REDIRECT,
        "the backend's RST",
    );
    assert_eq!(
        connections(&lab, CLIENT4),
        1,
        "the backend's RST gave no slot back"
    );
    syn(
        &lab,
        CLIENT4,
        42003,
        XDP_REDIRECT,
        "a connection after the backend's RST",
    );
    lab.expect(
        lab.vc,
        &tcp(CLIENT4, 42001, TCP_RST),
        XDP_REDIRECT,
        "the client's RST of a flow the backend already reset",
    );
    syn(
        &lab,
        CLIENT4,
        42004,
        XDP_TX,
        "a third open connection once more",
    );
    assert_eq!(lab.stat(Stat::RefusedClientConnections), 3);

    // A new SYN on the 5-tuple of a closed flow is a new flow: it counts again.
    syn(
        &lab,
        CLIENT4,
        42000,
        XDP_TX,
        "a SYN reusing a closed flow's port at the limit",
    );
    lab.expect(
        lab.vb,
        &reply(snat_42002, TCP_FIN | TCP_ACK),
        XDP_REDIRECT,
        "the backend's FIN of a third flow",
    );
    syn(
        &lab,
        CLIENT4,
        42000,
        XDP_REDIRECT,
        "a SYN reusing a closed flow's port below the limit",
    );
    let entry = lab
        .conntrack
        .get(&key, 0)
        .expect("the reopened flow's entry");
    assert_eq!(
        entry.flags, CT_F_COUNTED,
        "the reopened flow's conntrack flags"
    );
    assert_eq!(connections(&lab, CLIENT4), 2);
    lab.expect(
        lab.vc,
        &tcp(CLIENT4, 42000, TCP_ACK),
        XDP_REDIRECT,
        "an ACK of a flow at the limit",
    );
}
