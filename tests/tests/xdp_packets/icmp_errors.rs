//!
//! ICMP errors about NAT'ed flows, translated back to the client, and errors about NAT
//! replies, translated towards the backend (lb-ebpf's `icmp.rs`).

use super::*;

/// A router between the balancer and the backends.
const ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 99);

/// An ICMP(v6) message: type, code, the 4 bytes after the checksum, the quote; its
/// checksum over `pseudo` (empty for ICMPv4) and the message.
fn icmp(kind: u8, code: u8, rest: u32, quote: &[u8], pseudo: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest.to_be_bytes());
    m.extend_from_slice(quote);
    let c = packet::checksum(&[pseudo, &m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// The outer IPv4 header fields of the errors the router sends.
const ROUTER_V4: packet::V4 = packet::V4 {
    tos: 0xc0,
    id: 0x4321,
    frag: 0,
    ttl: 63,
};

fn error4(quote: &[u8], to: Ipv4Addr) -> Vec<u8> {
    packet::frame(
        VB_MAC,
        B1_MAC,
        &packet::ipv4(
            ROUTER4,
            to,
            1,
            ROUTER_V4,
            &[],
            &icmp(3, 4, 1400, quote, &[]),
        ),
    )
}

#[test]
fn a_fragmentation_needed_about_a_nat_flow_reaches_its_client_as_if_from_the_vip() {
    let Some(mut lab) = lab("icmp4") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let sent = Packet::tcp(client, 40000, vip, 80, TCP_SYN)
        .payload(&[7; 64])
        .ip();
    let out = lab.expect(
        lab.vc,
        &packet::frame(VC_MAC, CLIENT_MAC, &sent),
        XDP_REDIRECT,
        "a client's segment",
    );
    let translated = &out[14..];

    // The router quotes the whole translated packet, or its headers and 8 bytes.
    for len in [translated.len(), 20 + 8] {
        let out = lab.expect(
            lab.vb,
            &error4(&translated[..len], LOCAL4),
            XDP_REDIRECT,
            "a fragmentation-needed error about the flow",
        );
        let want = packet::frame(
            CLIENT_MAC,
            VC_MAC,
            &packet::ipv4(
                VIP4,
                CLIENT4,
                1,
                ROUTER_V4,
                &[],
                &icmp(3, 4, 1400, &packet::forwarded(&sent)[..len], &[]),
            ),
        );
        assert_same(
            &out,
            &want,
            &format!("the error sent to the client (a quote of {len} bytes)"),
        );
    }
    assert_eq!(
        lab.stat(Stat::IcmpTranslated),
        2,
        "translated errors not counted"
    );

    // An error about a flow the balancer does not know, or not an error: untouched.
    let mut other = translated.to_vec();
    other[20..22].copy_from_slice(&(SNAT_MAX + 1).to_be_bytes());
    let unknown = error4(&other, LOCAL4);
    let (action, same) = lab.run(PROG_BALANCER, lab.vb, &unknown);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "an error about no known flow"
    );
    assert_same(&same, &unknown, "an error about no known flow");
    let echo = packet::frame(
        VB_MAC,
        B1_MAC,
        &packet::ipv4(
            ROUTER4,
            LOCAL4,
            1,
            ROUTER_V4,
            &[],
            &icmp(8, 0, 1, translated, &[]),
        ),
    );
    let (action, same) = lab.run(PROG_BALANCER, lab.vb, &echo);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "an echo request quoting a flow"
    );
    assert_same(&same, &echo, "an echo request quoting a flow");
    assert_eq!(lab.stat(Stat::PassNotVip), 2);
    assert_eq!(lab.stat(Stat::IcmpTranslated), 2);
}

#[test]
fn a_packet_too_big_about_a_nat_ipv6_udp_flow_reaches_its_client() {
    let Some(mut lab) = lab("icmp6") else {
        return;
    };
    lab.backend(1, B1_6.into(), 5353);
    lab.service(1, VIP6.into(), 53, IPPROTO_UDP, MODE_NAT, &[1]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT6.into(), VIP6.into());
    let sent = Packet::udp(client, 6000, vip, 53).payload(&[9; 100]).ip();
    let out = lab.expect(
        lab.vc,
        &packet::frame(VC_MAC, CLIENT_MAC, &sent),
        XDP_REDIRECT,
        "a client's datagram",
    );
    let translated = &out[14..];
    let (b1, local): (IpAddr, IpAddr) = (B1_6.into(), LOCAL6.into());
    let message = icmp(
        2,
        0,
        1280,
        translated,
        &packet::pseudo(b1, local, 58, 8 + translated.len()),
    );
    let error = packet::frame(
        VB_MAC,
        B1_MAC,
        &packet::ipv6(B1_6, LOCAL6, 58, 0x6000_0000, 64, &message),
    );
    let out = lab.expect(
        lab.vb,
        &error,
        XDP_REDIRECT,
        "a packet-too-big about the flow",
    );
    let message = icmp(
        2,
        0,
        1280,
        &packet::forwarded(&sent),
        &packet::pseudo(vip, client, 58, 8 + sent.len()),
    );
    let want = packet::frame(
        CLIENT_MAC,
        VC_MAC,
        &packet::ipv6(VIP6, CLIENT6, 58, 0x6000_0000, 64, &message),
    );
    assert_same(&out, &want, "the packet-too-big sent to the client");
    assert_eq!(lab.stat(Stat::IcmpTranslated), 1);
}

/// A router on the clients' side, which cannot forward the balancer's replies.
const CLIENT_ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 254);
const CLIENT_ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0xfe);
const CLIENT_ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xfe];

/// A fragmentation-needed (MTU 1400) from the client-side router to `to`, quoting `quote`.
fn error4_from_client_side(quote: &[u8], to: Ipv4Addr) -> Vec<u8> {
    packet::frame(
        VC_MAC,
        CLIENT_ROUTER_MAC,
        &packet::ipv4(
            CLIENT_ROUTER4,
            to,
            1,
            ROUTER_V4,
            &[],
            &icmp(3, 4, 1400, quote, &[]),
        ),
    )
}

/// Sends a client's first packet `request` (an IP packet) and the backend's answer
/// through the balancer: the SNAT port, and the answer as the backend sent it (an IP
/// packet, `answer(snat)`) and as the client gets it (the IP packet sent on).
fn exchange(lab: &Lab, request: &[u8], answer: impl Fn(u16) -> Vec<u8>) -> (u16, Vec<u8>, Vec<u8>) {
    let out = lab.expect(
        lab.vc,
        &packet::frame(VC_MAC, CLIENT_MAC, request),
        XDP_REDIRECT,
        "a client's first packet",
    );
    let snat = l4_source_port(&out);
    let sent = answer(snat);
    let out = lab.expect(
        lab.vb,
        &packet::frame(VB_MAC, B1_MAC, &sent),
        XDP_REDIRECT,
        "the backend's answer",
    );
    (snat, sent, out[14..].to_vec())
}

/// A NAT TCP service on b1 with one flow whose backend sent a full-size segment back: the
/// segment as the backend sent it and as the client got it (IP packets).
fn big_tcp_reply4(lab: &mut Lab) -> (Vec<u8>, Vec<u8>) {
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    let (client, vip, local, b1): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), LOCAL4.into(), B1_4.into());
    let request = Packet::tcp(client, 40000, vip, 80, TCP_SYN)
        .payload(b"GET /big")
        .ip();
    let (_, answer, reply) = exchange(lab, &request, |snat| {
        Packet::tcp(b1, 8080, local, snat, TCP_ACK)
            .payload(&[5; 1460])
            .ip()
    });
    (answer, reply)
}

#[test]
fn a_fragmentation_needed_about_a_nat_reply_reaches_its_backend_as_if_from_the_balancer() {
    let Some(mut lab) = lab("icmp4_reply") else {
        return;
    };
    let (answer, reply) = big_tcp_reply4(&mut lab);

    // The router quotes as much of the reply as fits in 576 bytes (RFC 1812 §4.3.2.3),
    // or (RFC 792) its IP header and 8 bytes, which leave out the TCP checksum. The short
    // one comes with an Ethernet trailer where the checksum would be: no part of the
    // message, it must leave as it came.
    for (len, trailer) in [(576 - 20 - 8, &[][..]), (20 + 8, &[0xaa; 18][..])] {
        let mut error = error4_from_client_side(&reply[..len], VIP4);
        error.extend_from_slice(trailer);
        let out = lab.expect(
            lab.vc,
            &error,
            XDP_REDIRECT,
            "a fragmentation-needed error about a reply",
        );
        let mut want = packet::frame(
            B1_MAC,
            VB_MAC,
            &packet::ipv4(
                LOCAL4,
                B1_4,
                1,
                ROUTER_V4,
                &[],
                &icmp(3, 4, 1400, &packet::forwarded(&answer)[..len], &[]),
            ),
        );
        want.extend_from_slice(trailer);
        assert_same(
            &out,
            &want,
            &format!("the error sent to the backend (a quote of {len} bytes)"),
        );
    }
    assert_eq!(
        lab.stat(Stat::IcmpToBackend),
        2,
        "errors translated towards the backend not counted"
    );
    assert_eq!(
        lab.stat(Stat::IcmpTranslated),
        0,
        "errors towards the backend counted as towards the client"
    );
}

#[test]
fn a_packet_too_big_about_a_nat_ipv6_udp_reply_reaches_its_backend() {
    let Some(mut lab) = lab("icmp6_reply") else {
        return;
    };
    lab.backend(1, B1_6.into(), 5353);
    lab.service(1, VIP6.into(), 53, IPPROTO_UDP, MODE_NAT, &[1]);
    let (client, vip, local, b1): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT6.into(), VIP6.into(), LOCAL6.into(), B1_6.into());
    let request = Packet::udp(client, 6000, vip, 53).payload(b"query").ip();
    let (_, answer, reply) = exchange(&lab, &request, |snat| {
        Packet::udp(b1, 5353, local, snat).payload(&[3; 1300]).ip()
    });

    // An IPv6 error quotes as much as fits in 1280 bytes (RFC 4443 §2.4).
    let len = 1280 - 40 - 8;
    let router: IpAddr = CLIENT_ROUTER6.into();
    let message = icmp(
        2,
        0,
        1280,
        &reply[..len],
        &packet::pseudo(router, vip, 58, 8 + len),
    );
    let error = packet::frame(
        VC_MAC,
        CLIENT_ROUTER_MAC,
        &packet::ipv6(CLIENT_ROUTER6, VIP6, 58, 0x6000_0000, 64, &message),
    );
    let out = lab.expect(
        lab.vc,
        &error,
        XDP_REDIRECT,
        "a packet-too-big about a reply",
    );
    let message = icmp(
        2,
        0,
        1280,
        &packet::forwarded(&answer)[..len],
        &packet::pseudo(local, b1, 58, 8 + len),
    );
    let want = packet::frame(
        B1_MAC,
        VB_MAC,
        &packet::ipv6(LOCAL6, B1_6, 58, 0x6000_0000, 64, &message),
    );
    assert_same(&out, &want, "the packet-too-big sent to the backend");
    assert_eq!(lab.stat(Stat::IcmpToBackend), 1);
}

#[test]
fn an_error_about_a_reply_claiming_a_tiny_path_mtu_is_dropped_not_sent_to_the_backend() {
    let Some(mut lab) = lab("icmp4_reply_low_mtu") else {
        return;
    };
    let (_, reply) = big_tcp_reply4(&mut lab);
    // The backend caches one path MTU towards local_addr for all its NAT'ed flows: an
    // error claiming 552 bytes (forged by a client, or a client's own tiny tunnel) would
    // shrink every client's segments.
    for mtu in [552, MIN_REPLY_PATH_MTU - 1] {
        let error = packet::frame(
            VC_MAC,
            CLIENT_ROUTER_MAC,
            &packet::ipv4(
                CLIENT_ROUTER4,
                VIP4,
                1,
                ROUTER_V4,
                &[],
                &icmp(3, 4, mtu, &reply[..548], &[]),
            ),
        );
        let (action, _) = lab.run(PROG_BALANCER, lab.vc, &error);
        assert_eq!(
            action_name(action),
            "XDP_DROP",
            "a fragmentation-needed claiming MTU {mtu} about a reply"
        );
    }
    assert_eq!(lab.stat(Stat::DropIcmpLowMtu), 2);
    assert_eq!(lab.stat(Stat::IcmpToBackend), 0);
    // The floor itself is translated.
    let error = packet::frame(
        VC_MAC,
        CLIENT_ROUTER_MAC,
        &packet::ipv4(
            CLIENT_ROUTER4,
            VIP4,
            1,
            ROUTER_V4,
            &[],
            &icmp(3, 4, MIN_REPLY_PATH_MTU, &reply[..548], &[]),
        ),
    );
    lab.expect(
        lab.vc,
        &error,
        XDP_REDIRECT,
        "a fragmentation-needed claiming the floor MTU",
    );
    assert_eq!(lab.stat(Stat::IcmpToBackend), 1);
}

#[test]
fn an_error_about_a_reply_of_no_known_flow_passes_untouched() {
    let Some(mut lab) = lab("icmp4_reply_unknown") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    let (client, vip, local, b1): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), LOCAL4.into(), B1_4.into());
    let request = Packet::tcp(client, 40000, vip, 80, TCP_SYN)
        .payload(b"GET /")
        .ip();
    let (_, _, reply) = exchange(&lab, &request, |snat| {
        Packet::tcp(b1, 8080, local, snat, TCP_ACK)
            .payload(&[5; 100])
            .ip()
    });
    // The same reply to another client port: conntrack has no such flow.
    let mut other = reply.clone();
    other[22..24].copy_from_slice(&40001u16.to_be_bytes());
    // And a reply from a port that is no VIP's.
    let mut no_vip = reply.clone();
    no_vip[20..22].copy_from_slice(&81u16.to_be_bytes());
    for (quote, what) in [
        (&other, "an error about a flow conntrack does not know"),
        (&no_vip, "an error about a packet from no VIP"),
    ] {
        let error = error4_from_client_side(quote, VIP4);
        let (action, same) = lab.run(PROG_BALANCER, lab.vc, &error);
        assert_eq!(action_name(action), "XDP_PASS", "{what}");
        assert_same(&same, &error, what);
    }
    assert_eq!(lab.stat(Stat::PassNotVip), 2);
    assert_eq!(lab.stat(Stat::IcmpToBackend), 0);
}

/// A client's conntrack entry outlives its SNAT port: once another flow to the same backend
/// took the port over (here written into `NAT_REVERSE` as the takeover leaves it), an error
/// quoting the old flow's reply must not reach the backend as one about the new flow.
#[test]
fn an_error_about_a_flow_whose_port_was_taken_over_passes_untouched() {
    let Some(mut lab) = lab("icmp4_reply_taken_over") else {
        return;
    };
    let (answer, reply) = big_tcp_reply4(&mut lab);
    let error = error4_from_client_side(&reply[..576 - 20 - 8], VIP4);
    // The port's entry, keyed by the backend's reply, now names another client.
    let (b1, local): (IpAddr, IpAddr) = (B1_4.into(), LOCAL4.into());
    let snat = u16::from_be_bytes([answer[22], answer[23]]);
    let key = flow(b1, 8080, local, snat, IPPROTO_TCP);
    let mut owner = lab
        .nat_reverse
        .get(&key, 0)
        .expect("the flow's NAT_REVERSE entry");
    owner.client_port = 40001;
    lab.nat_reverse
        .insert(key, owner, 0)
        .expect("write NAT_REVERSE");
    let (action, same) = lab.run(PROG_BALANCER, lab.vc, &error);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "an error about a flow whose port another flow took over"
    );
    assert_same(&same, &error, "the error passed untouched");
    assert_eq!(lab.stat(Stat::IcmpToBackend), 0);
}

#[test]
fn an_error_about_a_dsr_reply_passes_untouched() {
    let Some(mut lab) = lab("icmp4_reply_dsr") else {
        return;
    };
    lab.backend(0, B1_4.into(), 0);
    lab.service(1, VIP4.into(), 80, IPPROTO_TCP, MODE_DSR, &[0]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let request = Packet::tcp(client, 40000, vip, 80, TCP_SYN)
        .payload(b"GET /")
        .ip();
    lab.expect(
        lab.vc,
        &packet::frame(VC_MAC, CLIENT_MAC, &request),
        XDP_REDIRECT,
        "a client's segment to a DSR VIP",
    );
    // The backend answered the client directly, from the VIP.
    let reply = Packet::tcp(vip, 80, client, 40000, TCP_ACK)
        .payload(&[5; 100])
        .ip();
    let error = error4_from_client_side(&reply, VIP4);
    let (action, same) = lab.run(PROG_BALANCER, lab.vc, &error);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "an error about a DSR reply"
    );
    assert_same(&same, &error, "an error about a DSR reply");
    assert_eq!(lab.stat(Stat::PassNotVip), 1);
    assert_eq!(lab.stat(Stat::IcmpToBackend), 0);
}
