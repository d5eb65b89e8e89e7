//! NAT: a client's packet goes to the backend from the balancer's address and port, the reply back
//! to the client from the VIP; the TTL goes down by one on the way.

use super::*;

#[test]
fn nat_ipv4_tcp_goes_to_the_backend_from_the_balancer_and_the_reply_back_to_the_client() {
    let Some(mut lab) = lab("nat_ipv4_tcp") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B2_4.into(), 8080);
    let slots = [0, 1, 0, 1, 0, 1, 1];
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &slots);

    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let syn = Packet::tcp(client, 40000, vip, 80, TCP_SYN).frame(VC_MAC, CLIENT_MAC);
    let out = lab.expect(lab.vc, &syn, XDP_REDIRECT, "a SYN to the VIP");

    let key = flow(client, 40000, vip, 80, IPPROTO_TCP);
    let backend_id = slots[(flow_hash(&key) % slots.len() as u32) as usize];
    let (b_addr, b_mac) = if backend_id == 0 {
        (B1_4, B1_MAC)
    } else {
        (B2_4, B2_MAC)
    };
    let snat = l4_source_port(&out);
    assert!(
        (SNAT_MIN..=SNAT_MAX).contains(&snat),
        "the SNAT port {snat} is outside the service's range {SNAT_MIN}..={SNAT_MAX}"
    );
    let (local, backend): (IpAddr, IpAddr) = (LOCAL4.into(), b_addr.into());
    let want = Packet::tcp(local, snat, backend, 8080, TCP_SYN)
        .forwarded()
        .frame(b_mac, VB_MAC);
    packet::assert_checksums(&out, "the SYN sent to the backend");
    assert_same(&out, &want, "the SYN sent to the backend");
    let entry = lab
        .conntrack
        .get(&key, 0)
        .expect("conntrack has the new flow");
    assert_eq!(
        (entry.backend, entry.snat_port),
        (backend_id, snat),
        "conntrack does not record the backend and SNAT port the packet went out with"
    );

    // The backend's SYN-ACK comes back on the backend side.
    let reply = Packet::tcp(backend, 8080, local, snat, TCP_SYN | TCP_ACK)
        .payload(b"hi")
        .frame(VB_MAC, b_mac);
    let out = lab.expect(lab.vb, &reply, XDP_REDIRECT, "the backend's SYN-ACK");
    let want = Packet::tcp(vip, 80, client, 40000, TCP_SYN | TCP_ACK)
        .payload(b"hi")
        .forwarded()
        .frame(CLIENT_MAC, VC_MAC);
    packet::assert_checksums(&out, "the SYN-ACK sent to the client");
    assert_same(&out, &want, "the SYN-ACK sent to the client");

    assert_eq!(lab.stat(Stat::Packets), 2, "the balancer saw 2 packets");
    assert_eq!(lab.stat(Stat::Forwarded), 1, "1 client packet forwarded");
    assert_eq!(lab.stat(Stat::NatReplies), 1, "1 reply translated back");
    let want = Counters {
        packets: 1,
        bytes: syn.len() as u64,
        new_flows: 1,
    };
    assert_eq!(
        lab.service_counters(0),
        want,
        "service counters after one SYN"
    );
    assert_eq!(
        lab.backend_counters(backend_id),
        want,
        "backend counters after one SYN"
    );
    assert_eq!(
        lab.backend_counters(1 - backend_id),
        Counters::default(),
        "the other backend counted traffic it never got"
    );
}

#[test]
fn nat_ipv6_udp_request_and_reply_are_translated() {
    let Some(mut lab) = lab("nat_ipv6_udp") else {
        return;
    };
    lab.backend(3, B1_6.into(), 5300);
    lab.service(2, VIP6.into(), 53, IPPROTO_UDP, MODE_NAT, &[3, 3, 3, 3, 3]);
    let (client, vip, local, backend): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT6.into(), VIP6.into(), LOCAL6.into(), B1_6.into());

    let request = Packet::udp(client, 5353, vip, 53)
        .payload(b"query")
        .frame(VC_MAC, CLIENT_MAC);
    let out = lab.expect(
        lab.vc,
        &request,
        XDP_REDIRECT,
        "a UDP request to the IPv6 VIP",
    );
    let snat = l4_source_port(&out);
    assert!(
        (SNAT_MIN..=SNAT_MAX).contains(&snat),
        "SNAT port {snat} out of range"
    );
    let want = Packet::udp(local, snat, backend, 5300)
        .payload(b"query")
        .forwarded()
        .frame(B1_MAC, VB_MAC);
    packet::assert_checksums(&out, "the request sent to the backend");
    assert_same(&out, &want, "the request sent to the backend");

    let reply_key = flow(backend, 5300, local, snat, IPPROTO_UDP);
    let reverse = lab
        .nat_reverse
        .get(&reply_key, 0)
        .expect("NAT_REVERSE has the flow");
    assert_eq!(
        (reverse.client_port, reverse.vip_port, reverse.service),
        (5353, 53, 2),
        "NAT_REVERSE records the wrong client, VIP port or service"
    );

    let reply = Packet::udp(backend, 5300, local, snat)
        .payload(b"answer")
        .frame(VB_MAC, B1_MAC);
    let out = lab.expect(lab.vb, &reply, XDP_REDIRECT, "the backend's UDP reply");
    let want = Packet::udp(vip, 53, client, 5353)
        .payload(b"answer")
        .forwarded()
        .frame(CLIENT_MAC, VC_MAC);
    packet::assert_checksums(&out, "the reply sent to the client");
    assert_same(&out, &want, "the reply sent to the client");
    assert_eq!(lab.stat(Stat::NatReplies), 1, "1 reply translated back");
    assert_eq!(
        lab.backend_counters(3).new_flows,
        1,
        "one new UDP flow on the backend"
    );
}

#[test]
fn nat_ipv4_udp_without_checksum_and_ipv6_tcp_are_translated() {
    let Some(mut lab) = lab("nat_ipv4_udp_ipv6_tcp") else {
        return;
    };
    lab.backend(0, B1_4.into(), 5300);
    lab.backend(1, B1_6.into(), 8443);
    lab.service(0, VIP4.into(), 53, IPPROTO_UDP, MODE_NAT, &[0]);
    lab.service(1, VIP6.into(), 443, IPPROTO_TCP, MODE_NAT, &[1]);
    let (client, vip, local, backend): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), LOCAL4.into(), B1_4.into());

    // IPv4 UDP may go without a checksum (0); the translation must not invent one.
    let mut datagram = packet::udp(client, 7000, vip, 53, b"no checksum");
    datagram[6..8].copy_from_slice(&[0, 0]);
    let request = packet::frame(VC_MAC, CLIENT_MAC, &packet::ip(client, vip, 17, &datagram));
    let out = lab.expect(
        lab.vc,
        &request,
        XDP_REDIRECT,
        "a UDP request without checksum",
    );
    let snat = l4_source_port(&out);
    let mut want_udp = packet::udp(local, snat, backend, 5300, b"no checksum");
    want_udp[6..8].copy_from_slice(&[0, 0]);
    let want = packet::frame(
        B1_MAC,
        VB_MAC,
        &packet::forwarded(&packet::ip(local, backend, 17, &want_udp)),
    );
    packet::assert_checksums(&out, "the UDP request without checksum");
    assert_same(&out, &want, "the UDP request without checksum (still 0)");

    let (client, vip, local, backend): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT6.into(), VIP6.into(), LOCAL6.into(), B1_6.into());
    let syn = Packet::tcp(client, 50000, vip, 443, TCP_SYN).frame(VC_MAC, CLIENT_MAC);
    let out = lab.expect(lab.vc, &syn, XDP_REDIRECT, "a SYN to the IPv6 VIP");
    let snat = l4_source_port(&out);
    let want = Packet::tcp(local, snat, backend, 8443, TCP_SYN)
        .forwarded()
        .frame(B1_MAC, VB_MAC);
    packet::assert_checksums(&out, "the IPv6 SYN sent to the backend");
    assert_same(&out, &want, "the IPv6 SYN sent to the backend");
    let reply = Packet::tcp(backend, 8443, local, snat, TCP_SYN | TCP_ACK).frame(VB_MAC, B1_MAC);
    let out = lab.expect(lab.vb, &reply, XDP_REDIRECT, "the backend's IPv6 SYN-ACK");
    let want = Packet::tcp(vip, 443, client, 50000, TCP_SYN | TCP_ACK)
        .forwarded()
        .frame(CLIENT_MAC, VC_MAC);
    packet::assert_checksums(&out, "the IPv6 SYN-ACK sent to the client");
    assert_same(&out, &want, "the IPv6 SYN-ACK sent to the client");
}

/// NAT forwards like a router: the TTL goes down by one (see the NAT tests' expected frames),
/// and a packet at TTL 1 is dropped and counted before it takes anything; DSR leaves the
/// client's packet as it is inside the new header, and other traffic passes.
#[test]
fn nat_drops_a_packet_whose_ttl_would_run_out_and_takes_nothing_for_it() {
    let Some(mut lab) = lab("nat_ttl") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B1_4.into(), 443);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    lab.service(1, VIP4.into(), 443, IPPROTO_TCP, MODE_DSR, &[1]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let syn = |port: u16, ttl: u8| {
        let h = packet::V4 {
            ttl,
            ..packet::V4_CLIENT
        };
        Packet::tcp(client, 42000, vip, port, TCP_SYN)
            .v4(h)
            .frame(VC_MAC, CLIENT_MAC)
    };
    lab.expect(lab.vc, &syn(80, 1), XDP_DROP, "a NAT SYN at TTL 1");
    assert_eq!(
        lab.stat(Stat::DropTtlExpired),
        1,
        "the expired TTL was not counted"
    );
    assert!(
        lab.conntrack
            .get(&flow(client, 42000, vip, 80, IPPROTO_TCP), 0)
            .is_err(),
        "a packet dropped for its TTL opened a flow"
    );
    let out = lab.expect(lab.vc, &syn(80, 2), XDP_REDIRECT, "a NAT SYN at TTL 2");
    assert_eq!(out[14 + 8], 1, "NAT did not decrement the TTL");
    packet::assert_checksums(&out, "the SYN at TTL 2");
    let out = lab.expect(lab.vc, &syn(443, 1), XDP_REDIRECT, "a DSR SYN at TTL 1");
    assert_eq!(
        out[14 + 20 + 8],
        1,
        "DSR changed the client's packet inside the tunnel"
    );
    // The reply of the TTL-2 flow, at TTL 1: dropped, counted.
    let snat = l4_source_port(&lab.expect(lab.vc, &syn(80, 64), XDP_REDIRECT, "a retransmission"));
    let (b, l): (IpAddr, IpAddr) = (B1_4.into(), LOCAL4.into());
    let h = packet::V4 {
        ttl: 1,
        ..packet::V4_CLIENT
    };
    let reply = Packet::tcp(b, 8080, l, snat, TCP_SYN | TCP_ACK)
        .v4(h)
        .frame(VB_MAC, B1_MAC);
    lab.expect(lab.vb, &reply, XDP_DROP, "a NAT reply at TTL 1");
    assert_eq!(
        lab.stat(Stat::DropTtlExpired),
        2,
        "the reply's TTL was not counted"
    );
}
