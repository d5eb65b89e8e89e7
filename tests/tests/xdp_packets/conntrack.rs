//! Conntrack: flows stay on their backend when the table flips or the backend drains, and the
//! flow key tells the address families apart.

use super::*;

/// b1 (id 0) and b2 (id 1); service 0 is TCP NAT on VIP4:80 with a table naming only b1.
fn two_backends(test: &str) -> Option<Lab> {
    let mut lab = lab(test)?;
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B2_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0; 7]);
    Some(lab)
}

/// A client segment from CLIENT4:`sport` to VIP4:80 with `flags` and one byte of data.
fn packet(sport: u16, flags: u8) -> Vec<u8> {
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    Packet::tcp(client, sport, vip, 80, flags)
        .payload(b"x")
        .frame(VC_MAC, CLIENT_MAC)
}

/// The IPv4 destination of an untagged frame without IP options.
fn dst_of(frame: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33])
}

#[test]
fn a_draining_backend_keeps_its_flows_but_not_a_new_connection_on_an_old_4_tuple() {
    let Some(mut lab) = two_backends("conntrack_draining_backend") else {
        return;
    };
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_SYN),
        XDP_REDIRECT,
        "flow A's SYN",
    );
    assert_eq!(
        dst_of(&out),
        B1_4,
        "flow A starts on b1, the only backend in the table"
    );

    // b1 is removed by a reload: it leaves the table and drains.
    lab.publish(0, &[1; 7]);
    lab.set_backend_flags(0, BACKEND_F_DRAINING);
    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_ACK),
        XDP_REDIRECT,
        "flow A's ACK",
    );
    assert_eq!(dst_of(&out), B1_4, "flow A left its draining backend");
    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_SYN),
        XDP_REDIRECT,
        "a new connection on flow A's 4-tuple",
    );
    assert_eq!(
        dst_of(&out),
        B2_4,
        "a new connection reusing a 4-tuple pinned to a draining backend went to it"
    );
    assert_eq!(
        lab.conntrack
            .get(&flow(client, 40001, vip, 80, IPPROTO_TCP), 0)
            .expect("the new connection recorded")
            .backend,
        1,
        "the new connection's conntrack entry"
    );
}

#[test]
fn conntrack_keeps_flows_on_their_backend_when_the_table_flips() {
    let Some(mut lab) = two_backends("conntrack_table_flip") else {
        return;
    };
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());

    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_SYN),
        XDP_REDIRECT,
        "flow A's SYN",
    );
    assert_eq!(
        dst_of(&out),
        B1_4,
        "flow A starts on b1, the only backend in the table"
    );
    let snat_a = l4_source_port(&out);

    // The daemon publishes a table that names only b2.
    lab.publish(0, &[1; 7]);
    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_ACK),
        XDP_REDIRECT,
        "flow A's ACK",
    );
    assert_eq!(
        dst_of(&out),
        B1_4,
        "flow A moved off b1 when the table changed"
    );
    assert_eq!(
        l4_source_port(&out),
        snat_a,
        "flow A's SNAT port changed mid-flow"
    );
    let out = lab.expect(
        lab.vc,
        &packet(40002, TCP_SYN),
        XDP_REDIRECT,
        "flow B's SYN",
    );
    assert_eq!(
        dst_of(&out),
        B2_4,
        "a new flow after the flip must go to b2"
    );

    // A mid-flow packet nobody knows: on NAT its backend never saw the flow, so it takes no
    // SNAT port; the client gets a RST (counted), and nothing is recorded.
    assert_eq!(lab.stat(Stat::CtMissNonSyn), 0, "no conntrack miss yet");
    let out = lab.expect(lab.vc, &packet(40003, TCP_ACK), XDP_TX, "flow C's ACK");
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST,
        "an unknown mid-flow NAT packet is answered with a bare RST"
    );
    assert_eq!(
        (lab.stat(Stat::CtMissNonSyn), lab.stat(Stat::ResetNatNoFlow)),
        (1, 1),
        "the non-SYN conntrack miss and its reset were not counted"
    );
    let c = flow(client, 40003, vip, 80, IPPROTO_TCP);
    assert!(
        lab.conntrack.get(&c, 0).is_err(),
        "a NAT packet that took no port left a conntrack entry"
    );

    // b1 goes down: its flows cannot be served there any more, and on NAT another backend
    // never saw them: the client is reset instead of its segments going to b2.
    lab.set_backend_flags(0, BACKEND_F_DOWN);
    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_ACK),
        XDP_TX,
        "flow A after b1 died",
    );
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST,
        "flow A was not reset after b1 was marked down"
    );
    assert_eq!(lab.stat(Stat::ResetNatNoFlow), 2, "flow A's reset counted");

    assert_eq!(
        lab.backend_counters(0),
        Counters {
            packets: 2,
            bytes: 2 * packet(1, 0).len() as u64,
            new_flows: 1
        },
        "b1's counters"
    );
    let b2 = lab.backend_counters(1);
    assert_eq!(
        (b2.packets, b2.new_flows),
        (1, 1),
        "b2's packets and new flows"
    );
    let s = lab.service_counters(0);
    assert_eq!(
        (s.packets, s.new_flows),
        (3, 2),
        "the service's packets and new flows"
    );
    assert_eq!(lab.stat(Stat::Forwarded), 3, "3 packets forwarded");
}

/// An IPv4 flow and an IPv6 flow whose addresses hold the same words (the IPv6 ones with
/// their last 96 bits zero) are two flows: the conntrack key carries the family.
#[test]
fn an_ipv4_flow_and_an_ipv6_flow_with_the_same_address_words_are_apart() {
    let Some(mut lab) = lab("flow_family") else {
        return;
    };
    // The IPv6 addresses whose first 4 bytes are CLIENT4's and VIP4's, the rest zero.
    let alike = |v4: Ipv4Addr| {
        let o = v4.octets();
        Ipv6Addr::new(
            u16::from_be_bytes([o[0], o[1]]),
            u16::from_be_bytes([o[2], o[3]]),
            0,
            0,
            0,
            0,
            0,
            0,
        )
    };
    let (client6, vip6) = (alike(CLIENT4), alike(VIP4));
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B1_6.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_DSR, &[0]);
    lab.service(1, vip6.into(), 80, IPPROTO_TCP, MODE_DSR, &[1]);
    let syn =
        |c: IpAddr, v: IpAddr| Packet::tcp(c, 41000, v, 80, TCP_SYN).frame(VC_MAC, CLIENT_MAC);
    lab.expect(
        lab.vc,
        &syn(CLIENT4.into(), VIP4.into()),
        XDP_REDIRECT,
        "the IPv4 SYN",
    );
    lab.expect(
        lab.vc,
        &syn(client6.into(), vip6.into()),
        XDP_REDIRECT,
        "the IPv6 SYN",
    );
    let v4 = flow(CLIENT4.into(), 41000, VIP4.into(), 80, IPPROTO_TCP);
    let v6 = flow(client6.into(), 41000, vip6.into(), 80, IPPROTO_TCP);
    assert_eq!(
        v4.src_addr, v6.src_addr,
        "the test's addresses must hold the same words"
    );
    let backend = |k: &FlowKey| lab.conntrack.get(k, 0).map(|e| e.backend).ok();
    assert_eq!(
        (backend(&v4), backend(&v6)),
        (Some(0), Some(1)),
        "the IPv4 and IPv6 flows share a conntrack entry"
    );
}
