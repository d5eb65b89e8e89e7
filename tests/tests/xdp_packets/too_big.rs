//! DSR packets that would not fit the backend link once encapsulated, and NAT packets that
//! would not fit it as they are (vb's MTU is 1500): answered with ICMP "fragmentation needed" /
//! ICMPv6 "packet too big" from the VIP, so the client lowers its path MTU, instead of
//! vanishing; TCP NAT replies too big for the client's link (vc's, 1500) likewise, back to
//! the backend; at most `TOO_BIG_PER_SECOND` a second per CPU.

use super::*;
use lb_common::maps::TOO_BIG_PER_SECOND;

/// A TCP segment from the client to the DSR service (VIP:86) of `ip_len` bytes of IP.
fn segment(client: IpAddr, vip: IpAddr, ip_len: usize) -> Vec<u8> {
    let hdr = if vip.is_ipv4() { 20 } else { 40 };
    let payload = vec![0x55; ip_len - hdr - 20];
    packet::ip(
        client,
        vip,
        6,
        &packet::tcp(client, 40000, vip, 86, TCP_ACK, &payload),
    )
}

fn dsr_lab(test: &str, backend: IpAddr, vip: IpAddr) -> Option<Lab> {
    let mut lab = lab(test)?;
    lab.backend(0, backend, 8080);
    lab.service(0, vip, 86, IPPROTO_TCP, MODE_DSR, &[0]);
    Some(lab)
}

#[test]
fn an_ipv4_packet_too_big_once_encapsulated_gets_fragmentation_needed() {
    let Some(lab) = dsr_lab("too_big_v4", B1_4.into(), VIP4.into()) else {
        return;
    };
    let ip = segment(CLIENT4.into(), VIP4.into(), 1490);
    let fits = segment(CLIENT4.into(), VIP4.into(), 1480);
    let before = lab.stat(Stat::Forwarded);
    lab.expect(
        lab.vc,
        &packet::frame(VC_MAC, CLIENT_MAC, &fits),
        XDP_REDIRECT,
        "1480 bytes, 1500 with IPIP",
    );
    assert_eq!(lab.stat(Stat::Forwarded), before + 1, "1480 bytes fit");
    let out = lab.expect(
        lab.vc,
        &packet::frame(VC_MAC, CLIENT_MAC, &ip),
        XDP_TX,
        "1490 bytes, 1510 with IPIP",
    );
    assert_eq!(lab.stat(Stat::TooBigSent), 1, "the answer is counted");
    assert_eq!(
        &out[..6],
        &CLIENT_MAC,
        "the answer goes back to the client's MAC"
    );
    assert_eq!(&out[6..12], &VC_MAC, "from the interface it came in on");
    let answer = &out[14..];
    assert_eq!(
        answer.len(),
        20 + 8 + 128,
        "IP + ICMP headers + a 128-byte quote"
    );
    assert_eq!(
        packet::checksum(&[&answer[..20]]),
        0,
        "IPv4 header checksum"
    );
    assert_eq!(answer[9], 1, "ICMP");
    assert_eq!(&answer[12..16], &VIP4.octets(), "from the VIP");
    assert_eq!(&answer[16..20], &CLIENT4.octets(), "to the client");
    let icmp = &answer[20..];
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 4),
        "type 3 code 4: fragmentation needed"
    );
    packet::assert_checksums(&out, "fragmentation needed");
    assert_eq!(packet::checksum(&[icmp]), 0, "ICMP checksum");
    assert_eq!(
        u16::from_be_bytes([icmp[6], icmp[7]]),
        1480,
        "the next-hop MTU is vb's 1500 less the 20 bytes of IPIP"
    );
    assert_eq!(
        &icmp[8..],
        &ip[..128],
        "the quote is the client's packet as it came"
    );

    // Without DF the client does no path MTU discovery, and XDP cannot fragment.
    let mut no_df = ip.clone();
    no_df[6] &= !0x40;
    no_df[10..12].copy_from_slice(&[0, 0]);
    let c = packet::checksum(&[&no_df[..20]]);
    no_df[10..12].copy_from_slice(&c.to_be_bytes());
    let dropped = lab.stat(Stat::DropMtu);
    lab.expect(
        lab.vc,
        &packet::frame(VC_MAC, CLIENT_MAC, &no_df),
        XDP_DROP,
        "too big without DF",
    );
    assert_eq!(lab.stat(Stat::DropMtu), dropped + 1, "counted as drop_mtu");
    assert_eq!(lab.stat(Stat::TooBigSent), 1, "and not answered");
}

/// NAT: the route is looked up before the packet takes a SNAT port and is translated, so the
/// answer quotes the client's packet as it came, and the flow holds nothing; a packet that
/// fits goes on as usual afterwards.
#[test]
fn a_nat_packet_too_big_for_the_backend_link_gets_fragmentation_needed_and_takes_no_port() {
    let Some(mut lab) = lab("too_big_nat") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 86, IPPROTO_TCP, MODE_NAT, &[0]);
    let big = segment(CLIENT4.into(), VIP4.into(), 1510);
    let out = lab.expect(
        lab.vc,
        &packet::frame(VC_MAC, CLIENT_MAC, &big),
        XDP_TX,
        "1510 bytes over vb's 1500",
    );
    assert_eq!(lab.stat(Stat::TooBigSent), 1, "the answer is counted");
    packet::assert_checksums(&out, "fragmentation needed");
    let answer = &out[14..];
    assert_eq!(&answer[12..16], &VIP4.octets(), "from the VIP");
    assert_eq!(&answer[16..20], &CLIENT4.octets(), "to the client");
    let icmp = &answer[20..];
    assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
    assert_eq!(packet::checksum(&[icmp]), 0, "ICMP checksum");
    assert_eq!(
        u16::from_be_bytes([icmp[6], icmp[7]]),
        1500,
        "the next-hop MTU is vb's: NAT adds no header"
    );
    assert_eq!(
        &icmp[8..],
        &big[..128],
        "the quote is the client's packet as it came, not translated"
    );
    assert_eq!(
        lab.nat_reverse.keys().count(),
        0,
        "the refused packet took a SNAT port"
    );
    assert_eq!(
        lab.conntrack.keys().count(),
        0,
        "the refused packet left a conntrack entry"
    );

    // A SYN: a segment without one that finds no port of its own is reset on NAT.
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let fits = Packet::tcp(client, 40000, vip, 86, TCP_SYN)
        .payload(&[0x55; 1460])
        .frame(VC_MAC, CLIENT_MAC);
    let before = lab.stat(Stat::Forwarded);
    lab.expect(lab.vc, &fits, XDP_REDIRECT, "a 1500-byte SYN");
    assert_eq!(lab.stat(Stat::Forwarded), before + 1, "1500 bytes fit");
}

/// A NAT reply too big for the client's link (vc's MTU is 1500): the route is looked up
/// before the reply is translated, so the answer goes back to the backend from the
/// balancer's NAT address and quotes the reply as the backend sent it (its kernel finds its
/// socket by that); the flow stays as it was, and a reply that fits goes on.
#[test]
fn a_nat_reply_too_big_for_the_client_link_gets_fragmentation_needed_to_the_backend() {
    let Some(mut lab) = lab("too_big_nat_reply") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 86, IPPROTO_TCP, MODE_NAT, &[0]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let syn = Packet::tcp(client, 40000, vip, 86, TCP_SYN).frame(VC_MAC, CLIENT_MAC);
    let out = lab.expect(lab.vc, &syn, XDP_REDIRECT, "a SYN to the VIP");
    let snat = l4_source_port(&out);
    let (local, backend): (IpAddr, IpAddr) = (LOCAL4.into(), B1_4.into());
    let reverse_before: Vec<_> = lab.nat_reverse.keys().filter_map(Result::ok).collect();

    let big = Packet::tcp(backend, 8080, local, snat, TCP_ACK).payload(&[0x66; 1470]);
    let out = lab.expect(
        lab.vb,
        &big.frame(VB_MAC, B1_MAC),
        XDP_TX,
        "a 1510-byte reply over vc's 1500",
    );
    assert_eq!(lab.stat(Stat::TooBigSent), 1, "the answer is counted");
    assert_eq!(lab.stat(Stat::NatReplies), 0, "nothing went to the client");
    packet::assert_checksums(&out, "fragmentation needed");
    assert_eq!(
        &out[..6],
        &B1_MAC,
        "the answer goes back to the backend's MAC"
    );
    let answer = &out[14..];
    assert_eq!(&answer[12..16], &LOCAL4.octets(), "from the NAT address");
    assert_eq!(&answer[16..20], &B1_4.octets(), "to the backend");
    let icmp = &answer[20..];
    assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
    assert_eq!(
        u16::from_be_bytes([icmp[6], icmp[7]]),
        1500,
        "the next-hop MTU is vc's"
    );
    assert_eq!(
        &icmp[8..],
        &big.ip()[..128],
        "the quote is the backend's reply as it came, not translated"
    );
    let reverse_after: Vec<_> = lab.nat_reverse.keys().filter_map(Result::ok).collect();
    assert_eq!(
        reverse_after, reverse_before,
        "the flow keeps its NAT entries, and no other is made"
    );

    let fits = Packet::tcp(backend, 8080, local, snat, TCP_ACK).payload(&[0x66; 1460]);
    lab.expect(
        lab.vb,
        &fits.frame(VB_MAC, B1_MAC),
        XDP_REDIRECT,
        "a 1500-byte reply",
    );
    assert_eq!(lab.stat(Stat::NatReplies), 1, "1500 bytes fit");
}

/// A UDP NAT reply too big for the client's link is dropped, not answered: the backend keeps
/// the path MTU per destination, the NAT address every client shares, and would fragment its
/// large datagrams to all of them, fragments that are not translated back.
#[test]
fn a_udp_nat_reply_too_big_for_the_client_link_is_dropped_not_answered() {
    let Some(mut lab) = lab("too_big_nat_udp_reply") else {
        return;
    };
    lab.backend(0, B1_4.into(), 5300);
    lab.service(0, VIP4.into(), 53, IPPROTO_UDP, MODE_NAT, &[0]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let request = Packet::udp(client, 40000, vip, 53).frame(VC_MAC, CLIENT_MAC);
    let out = lab.expect(lab.vc, &request, XDP_REDIRECT, "a datagram to the VIP");
    let snat = l4_source_port(&out);
    let (local, backend): (IpAddr, IpAddr) = (LOCAL4.into(), B1_4.into());
    let big = Packet::udp(backend, 5300, local, snat).payload(&[0x66; 1482]);
    lab.expect(
        lab.vb,
        &big.frame(VB_MAC, B1_MAC),
        XDP_DROP,
        "a 1510-byte UDP reply over vc's 1500",
    );
    assert_eq!(lab.stat(Stat::DropMtu), 1, "counted as drop_mtu");
    assert_eq!(lab.stat(Stat::TooBigSent), 0, "and not answered");
}

#[test]
fn an_ipv6_packet_too_big_once_encapsulated_gets_packet_too_big() {
    let Some(lab) = dsr_lab("too_big_v6", B1_6.into(), VIP6.into()) else {
        return;
    };
    // 1480 bytes of IPv6 and 40 of IP6IP6 make 1520.
    let ip = segment(CLIENT6.into(), VIP6.into(), 1480);
    let out = lab.expect(
        lab.vc,
        &packet::frame(VC_MAC, CLIENT_MAC, &ip),
        XDP_TX,
        "1480 bytes, 1520 with IP6IP6",
    );
    assert_eq!(lab.stat(Stat::TooBigSent), 1, "the answer is counted");
    assert_eq!(
        &out[..6],
        &CLIENT_MAC,
        "the answer goes back to the client's MAC"
    );
    let answer = &out[14..];
    assert_eq!(
        answer.len(),
        40 + 8 + 512,
        "IPv6 + ICMPv6 headers + a 512-byte quote"
    );
    assert_eq!(
        u16::from_be_bytes([answer[4], answer[5]]),
        8 + 512,
        "payload length"
    );
    assert_eq!(answer[6], 58, "ICMPv6");
    assert_eq!(&answer[8..24], &VIP6.octets(), "from the VIP");
    assert_eq!(&answer[24..40], &CLIENT6.octets(), "to the client");
    let icmp = &answer[40..];
    assert_eq!((icmp[0], icmp[1]), (2, 0), "type 2: packet too big");
    let pseudo = packet::pseudo(VIP6.into(), CLIENT6.into(), 58, icmp.len());
    assert_eq!(packet::checksum(&[&pseudo, icmp]), 0, "ICMPv6 checksum");
    assert_eq!(
        u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
        1460,
        "the MTU is vb's 1500 less the 40 bytes of IP6IP6"
    );
    assert_eq!(
        &icmp[8..],
        &ip[..512],
        "the quote is the client's packet as it came"
    );
}

#[test]
fn answers_are_rate_limited_and_the_rest_dropped_and_counted() {
    let Some(lab) = dsr_lab("too_big_rate", B1_4.into(), VIP4.into()) else {
        return;
    };
    let frame = packet::frame(
        VC_MAC,
        CLIENT_MAC,
        &segment(CLIENT4.into(), VIP4.into(), 1490),
    );
    // Per CPU and second: this thread may run on either of two CPUs, and a second may
    // turn during the run, so at most 4 budgets are spent.
    let budget = TOO_BIG_PER_SECOND as u64;
    let runs = 4 * budget + 1000;
    let mut answered = 0;
    for _ in 0..runs {
        let (action, _) = lab.run(PROG_BALANCER, lab.vc, &frame);
        if action == XDP_TX {
            answered += 1;
        } else {
            assert_eq!(action_name(action), "XDP_DROP", "an answer or a drop");
        }
    }
    assert_eq!(
        lab.stat(Stat::TooBigSent),
        answered,
        "every answer is counted"
    );
    assert_eq!(
        lab.stat(Stat::DropMtu),
        runs - answered,
        "every packet not answered is counted as drop_mtu"
    );
    assert!(
        answered >= budget && answered <= 4 * budget,
        "{answered} answers to {runs} packets: the budget is {budget} a second per CPU"
    );
}
