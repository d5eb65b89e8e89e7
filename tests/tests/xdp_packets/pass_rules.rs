//! What the balancer does with packets it cannot or need not balance: fragments and extension
//! headers for a VIP are dropped, other traffic passes untouched, IP options and VLAN tags are
//! kept, and frames that cannot be forwarded get the documented action; each is counted.

use super::*;

/// An address no service has (IPv4, IPv6).
const NOT_VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 99);
const NOT_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x99);

/// A client's IPv4 fragment (`frag`: flags and offset) of `seg` for `dst`.
fn fragment(dst: Ipv4Addr, frag: u16, seg: &[u8]) -> Vec<u8> {
    let h = packet::V4 {
        frag,
        ..packet::V4_CLIENT
    };
    packet::frame(
        VC_MAC,
        CLIENT_MAC,
        &packet::ipv4(CLIENT4, dst, 6, h, &[], seg),
    )
}

/// A client's IPv6 packet for `dst` with hop-by-hop options (8 bytes: next header TCP, length
/// 0, PadN) before the TCP segment `seg`.
fn hop_by_hop(dst: Ipv6Addr, seg: &[u8]) -> Vec<u8> {
    let mut hbh = vec![6, 0, 1, 4, 0, 0, 0, 0];
    hbh.extend_from_slice(seg);
    packet::frame(
        VC_MAC,
        CLIENT_MAC,
        &packet::ipv6(CLIENT6, dst, 0, 0x6000_0000, 64, &hbh),
    )
}

/// b1 on IPv4 (id 0) and IPv6 (id 1); services 0 and 1 are TCP NAT on VIP4:80 and VIP6:80.
fn two_vips(test: &str) -> Option<Lab> {
    let mut lab = lab(test)?;
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B1_6.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    lab.service(1, VIP6.into(), 80, IPPROTO_TCP, MODE_NAT, &[1]);
    Some(lab)
}

#[test]
fn fragments_and_extension_headers_for_a_vip_are_dropped() {
    let Some(lab) = two_vips("vip_fragments") else {
        return;
    };
    let (client, vip, client6, vip6): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), CLIENT6.into(), VIP6.into());
    let seg = packet::tcp(client, 40000, vip, 80, TCP_SYN, b"");
    let seg6 = packet::tcp(client6, 40000, vip6, 80, TCP_SYN, b"");
    // The kernel would route them onward (the VIP is not the balancer's address): dropped,
    // whatever their port, and counted.
    let cases = [
        (
            "a first fragment (MF set) for the VIP",
            fragment(VIP4, 0x2000, &seg),
            Stat::DropFragment,
        ),
        (
            "a later fragment for the VIP",
            fragment(VIP4, 0x00b9, &seg),
            Stat::DropFragment,
        ),
        (
            "an IPv6 packet with a hop-by-hop header for the VIP",
            hop_by_hop(VIP6, &seg6),
            Stat::DropIpv6ExtHeaders,
        ),
    ];
    for (what, frame, stat) in cases {
        let before = lab.stat(stat);
        lab.expect(lab.vc, &frame, XDP_DROP, what);
        assert_eq!(
            lab.stat(stat),
            before + 1,
            "{what}: not counted as {stat:?}"
        );
    }
    assert_eq!(
        lab.stat(Stat::Forwarded),
        0,
        "a fragment or extension-header packet was forwarded"
    );
}

#[test]
fn packets_the_balancer_cannot_or_need_not_handle_pass_untouched_and_are_counted() {
    let Some(lab) = two_vips("pass_rules") else {
        return;
    };
    let (client, vip, client6, vip6): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), CLIENT6.into(), VIP6.into());
    let seg = packet::tcp(client, 40000, vip, 80, TCP_SYN, b"");
    let seg6 = packet::tcp(client6, 40000, vip6, 80, TCP_SYN, b"");
    let good = packet::frame(VC_MAC, CLIENT_MAC, &packet::ip(client, vip, 6, &seg));

    let mut cases: Vec<(&str, Vec<u8>, Stat)> = Vec::new();
    cases.push((
        "a frame cut inside the IPv4 header",
        good[..14 + 12].to_vec(),
        Stat::PassMalformed,
    ));
    cases.push((
        "a frame shorter than its IPv4 total length",
        good[..good.len() - 4].to_vec(),
        Stat::PassMalformed,
    ));
    cases.push((
        "an IPv4 packet whose TCP header is cut short",
        packet::frame(VC_MAC, CLIENT_MAC, &packet::ip(client, vip, 6, &seg[..10])),
        Stat::PassMalformed,
    ));
    // The same, padded to Ethernet's 60-byte minimum with the rest of a TCP header: bytes after
    // the IP packet's end are padding, never part of its TCP header.
    let mut padded = packet::frame(VC_MAC, CLIENT_MAC, &packet::ip(client, vip, 6, &seg[..10]));
    padded.extend_from_slice(&seg[10..20]);
    padded.resize(60, 0);
    cases.push((
        "a short IPv4 packet whose Ethernet padding would complete a TCP header",
        padded,
        Stat::PassMalformed,
    ));
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    cases.push(("an IPv4 header with IHL 4", bad_ihl, Stat::PassMalformed));
    cases.push((
        "a bare Ethernet header",
        good[..14].to_vec(),
        Stat::PassMalformed,
    ));
    // Fragments and extension headers for another host pass (for a VIP they are dropped:
    // `fragments_and_extension_headers_for_a_vip_are_dropped`).
    for (what, frag) in [
        ("a first fragment (MF set) for another host", 0x2000),
        ("a later fragment for another host", 0x00b9),
    ] {
        cases.push((what, fragment(NOT_VIP4, frag, &seg), Stat::PassFragment));
    }
    cases.push((
        "an IPv6 packet with a hop-by-hop header for another host",
        hop_by_hop(NOT_VIP6, &seg6),
        Stat::PassIpv6ExtHeaders,
    ));
    let other: IpAddr = Ipv4Addr::new(10, 0, 0, 99).into();
    cases.push((
        "TCP to an address that is no VIP",
        Packet::tcp(client, 40000, other, 80, TCP_SYN).frame(VC_MAC, CLIENT_MAC),
        Stat::PassNotVip,
    ));
    cases.push((
        "TCP to the VIP on a port no service uses",
        Packet::tcp(client, 40000, vip, 81, TCP_SYN).frame(VC_MAC, CLIENT_MAC),
        Stat::PassNotVip,
    ));
    cases.push((
        "UDP to a TCP VIP's port",
        Packet::udp(client, 40000, vip, 80)
            .payload(b"x")
            .frame(VC_MAC, CLIENT_MAC),
        Stat::PassNotVip,
    ));
    cases.push((
        "an ICMP echo request to the VIP",
        packet::frame(
            VC_MAC,
            CLIENT_MAC,
            &packet::ip(client, vip, 1, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]),
        ),
        Stat::PassNotVip,
    ));
    cases.push((
        "an ARP request",
        packet::eth([0xff; 6], CLIENT_MAC, None, 0x0806, &[0; 28]),
        Stat::PassNotVip,
    ));

    // BPF_PROG_TEST_RUN builds no socket buffer from an IPv4 frame without a whole IPv4
    // header (EINVAL), so the tc lab cannot run that case.
    if lab.hook == Hook::Tc {
        cases.retain(|(_, frame, _)| frame.len() >= 14 + 20 || frame[12..14] != [0x08, 0x00]);
    }
    for (what, frame, stat) in &cases {
        let before = lab.stat(*stat);
        let out = lab.expect(lab.vc, frame, XDP_PASS, what);
        assert_same(&out, frame, what);
        assert_eq!(
            lab.stat(*stat),
            before + 1,
            "{what} was not counted as {stat:?}"
        );
    }
    assert_eq!(
        lab.stat(Stat::Packets),
        cases.len() as u64,
        "every packet is counted once"
    );
    assert_eq!(lab.stat(Stat::Forwarded), 0, "nothing may be forwarded");
    assert_eq!(
        lab.conntrack.keys().count(),
        0,
        "nothing may enter conntrack"
    );
}

#[test]
fn vip_packets_with_ip_options_or_a_vlan_tag_are_forwarded_intact() {
    let Some(mut lab) = lab("options_and_vlan") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    let (client, vip, local, backend): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), LOCAL4.into(), B1_4.into());

    // IHL 7: a timestamp-free option block of NOPs ending in EOL.
    let options = [1, 1, 1, 1, 1, 1, 1, 0];
    let with_options = Packet::tcp(client, 42000, vip, 80, TCP_SYN)
        .options(&options)
        .frame(VC_MAC, CLIENT_MAC);
    let out = lab.expect(
        lab.vc,
        &with_options,
        XDP_REDIRECT,
        "a SYN with IPv4 options (IHL 7)",
    );
    let l4 = 14 + 28;
    let snat = u16::from_be_bytes([out[l4], out[l4 + 1]]);
    let want = Packet::tcp(local, snat, backend, 8080, TCP_SYN)
        .options(&options)
        .forwarded()
        .frame(B1_MAC, VB_MAC);
    packet::assert_checksums(&out, "the SYN with options sent to the backend");
    assert_same(&out, &want, "the SYN with options sent to the backend");

    let ip = Packet::tcp(client, 42001, vip, 80, TCP_SYN).ip();
    let tagged = packet::eth(VC_MAC, CLIENT_MAC, Some(100), packet::ETH_IP, &ip);
    if lab.hook == Hook::Tc {
        // At tc ingress the kernel has already moved a frame's tag into the socket buffer's
        // metadata (which goes with the packet where it is sent); a tag still in the packet is
        // a second one, passed like any other (see `parse`). BPF_PROG_TEST_RUN does not untag.
        let out = lab.expect(lab.vc, &tagged, XDP_PASS, "a frame with a second VLAN tag");
        assert_same(
            &out,
            &tagged,
            "a frame with a second VLAN tag passes untouched",
        );
        assert_eq!(
            lab.stat(Stat::Forwarded),
            1,
            "only the SYN with options forwarded"
        );
        return;
    }
    let out = lab.expect(
        lab.vc,
        &tagged,
        XDP_REDIRECT,
        "a VLAN-tagged SYN to the VIP",
    );
    let snat = u16::from_be_bytes([out[18 + 20], out[18 + 21]]);
    let want = packet::eth(
        B1_MAC,
        VB_MAC,
        Some(100),
        packet::ETH_IP,
        &Packet::tcp(local, snat, backend, 8080, TCP_SYN)
            .forwarded()
            .ip(),
    );
    packet::assert_checksums(&out, "the VLAN-tagged SYN sent to the backend");
    assert_same(
        &out,
        &want,
        "the VLAN-tagged SYN sent to the backend (tag kept)",
    );

    // DSR puts the outer header after the tag, and lb_decap takes it out from there.
    lab.service(1, vip, 8443, IPPROTO_TCP, MODE_DSR, &[0]);
    let inner = Packet::tcp(client, 42002, vip, 8443, TCP_SYN).ip();
    let tagged = packet::eth(VC_MAC, CLIENT_MAC, Some(100), packet::ETH_IP, &inner);
    let out = lab.expect(
        lab.vc,
        &tagged,
        XDP_REDIRECT,
        "a VLAN-tagged SYN to a DSR VIP",
    );
    let outer = packet::V4 {
        id: 0,
        ..packet::V4_CLIENT
    };
    let want = packet::eth(
        B1_MAC,
        VB_MAC,
        Some(100),
        packet::ETH_IP,
        &packet::ipv4(LOCAL4, B1_4, 4, outer, &[], &inner),
    );
    packet::assert_checksums(&out, "the VLAN-tagged IPIP packet");
    assert_same(
        &out,
        &want,
        "the VLAN-tagged IPIP packet (tag before the outer header)",
    );
    let (action, decapped) = lab.run(PROG_DECAP, lab.vb, &out);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "lb_decap passes the inner packet up"
    );
    assert_same(
        &decapped,
        &packet::eth(B1_MAC, VB_MAC, Some(100), packet::ETH_IP, &inner),
        "the decapsulated VLAN-tagged packet",
    );
    assert_eq!(lab.stat(Stat::Forwarded), 3, "all three packets forwarded");
}

#[test]
fn packets_that_cannot_be_forwarded_get_the_documented_action_and_are_counted() {
    let Some(mut lab) = lab("forwarding_failures") else {
        return;
    };
    // An interface the routes can choose but DEVMAP does not hold, and a blackhole route.
    for args in [
        &["link", "add", "vx", "type", "veth", "peer", "name", "vxp"][..],
        &["addr", "add", "10.0.3.1/24", "dev", "vx"],
        &["link", "set", "vx", "up"],
        &["link", "set", "vxp", "up"],
        &[
            "neigh",
            "add",
            "10.0.3.11",
            "lladdr",
            "02:00:00:00:03:11",
            "dev",
            "vx",
            "nud",
            "permanent",
        ],
        &["route", "add", "blackhole", "192.0.2.0/24"],
    ] {
        lab.ns.ip(args).expect("set up the extra routes");
    }
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, Ipv4Addr::new(10, 0, 2, 13).into(), 8080); // no neighbour entry
    lab.backend(2, Ipv4Addr::new(192, 0, 2, 1).into(), 8080); // blackholed
    lab.backend(3, Ipv4Addr::new(10, 0, 3, 11).into(), 8080); // out of an interface not in DEVMAP
    lab.service(0, vip, 80, IPPROTO_TCP, MODE_NAT, &[0]);
    lab.service(1, vip, 81, IPPROTO_TCP, MODE_NAT, &[]);
    lab.service(2, vip, 82, IPPROTO_TCP, MODE_NAT, &[0]);
    let mut one_port = lab.services.get(&2, 0).expect("read SERVICES");
    one_port.snat_port_max = one_port.snat_port_min;
    lab.services.set(2, one_port, 0).expect("write SERVICES");
    lab.service(3, vip, 83, IPPROTO_TCP, MODE_NAT, &[1]);
    lab.service(4, vip, 84, IPPROTO_TCP, MODE_NAT, &[2]);
    lab.service(5, vip, 85, IPPROTO_TCP, MODE_NAT, &[3]);
    lab.service(6, vip, 86, IPPROTO_TCP, MODE_DSR, &[0]);
    lab.service(7, vip, 87, IPPROTO_UDP, MODE_NAT, &[]);
    lab.service(8, vip, 88, IPPROTO_TCP, MODE_NAT, &[]);
    let mut announced = lab.services.get(&8, 0).expect("read SERVICES");
    announced.flags = lb_common::maps::SERVICE_F_ANNOUNCED;
    lab.services.set(8, announced, 0).expect("write SERVICES");
    let syn = |sport: u16, dport: u16, payload: &[u8]| {
        Packet::tcp(client, sport, vip, dport, TCP_SYN)
            .payload(payload)
            .frame(VC_MAC, CLIENT_MAC)
    };

    let check = |frame: &[u8], action: u32, stat: Stat, what: &str| {
        let before = lab.stat(stat);
        let out = lab.expect(lab.vc, frame, action, what);
        assert_eq!(
            lab.stat(stat),
            before + 1,
            "{what}: not counted as {stat:?}"
        );
        out
    };
    let out = check(
        &syn(1000, 81, b""),
        XDP_TX,
        Stat::RefusedNoBackend,
        "a SYN to a service with an empty table",
    );
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST | TCP_ACK,
        "a SYN to a service without a backend is answered with a RST+ACK, so the client fails \
         at once"
    );
    // A node that announces the VIP among others withdraws it as its last backend goes:
    // its SYNs are dropped meanwhile, so that the client's resent SYN reaches another node.
    check(
        &syn(1001, 88, b""),
        XDP_DROP,
        Stat::DropNoBackend,
        "a SYN to an announced service with an empty table",
    );
    check(
        &Packet::udp(client, 40000, vip, 87)
            .payload(b"x")
            .frame(VC_MAC, CLIENT_MAC),
        XDP_DROP,
        Stat::DropNoBackend,
        "a datagram to a UDP service with an empty table",
    );
    check(
        &syn(1001, 82, b""),
        XDP_REDIRECT,
        Stat::Forwarded,
        "the first flow of a one-port SNAT range",
    );
    let out = check(
        &syn(1002, 82, b""),
        XDP_TX,
        Stat::RefusedNatPortsExhausted,
        "a second flow when the SNAT range is used up",
    );
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST | TCP_ACK,
        "a SYN that finds no SNAT port is answered with a RST+ACK, so the client fails at once"
    );
    // XDP hands a packet whose next hop has no neighbour entry to the kernel, translated; tc
    // gives it to `bpf_redirect_neigh`, which resolves the next hop itself.
    let (action, stat) = match lab.hook {
        Hook::Xdp => (XDP_PASS, Stat::FibPass),
        Hook::Tc => (XDP_REDIRECT, Stat::Forwarded),
    };
    let out = check(
        &syn(1003, 83, b""),
        action,
        stat,
        "a SYN to a backend whose MAC is unknown",
    );
    assert_eq!(
        &out[30..34],
        &[10, 0, 2, 13],
        "the packet must leave already translated"
    );
    check(
        &syn(1004, 84, b""),
        XDP_DROP,
        Stat::DropNoRoute,
        "a SYN to a blackholed backend",
    );
    // tc redirects to any interface; XDP only to one the daemon put in DEVMAP.
    let (action, stat) = match lab.hook {
        Hook::Xdp => (XDP_DROP, Stat::DropNoDevmapEntry),
        Hook::Tc => (XDP_REDIRECT, Stat::Forwarded),
    };
    check(
        &syn(1005, 85, b""),
        action,
        stat,
        "a SYN routed out of an interface not in DEVMAP",
    );
    // 1490 bytes of IP fit vb's MTU of 1500, with the 20 bytes of IPIP they do not: the
    // client is told (see `too_big` for the answer itself).
    let big = syn(1006, 86, &[0x55; 1490 - 40]);
    check(
        &big,
        XDP_TX,
        Stat::TooBigSent,
        "a full-size packet that encapsulation makes too big",
    );
    check(
        &syn(1007, 80, &[0x55; 1490 - 40]),
        XDP_REDIRECT,
        Stat::Forwarded,
        "a full-size NAT packet (fits)",
    );
    lab.ns
        .sysctl("net.ipv4.conf.vc.forwarding", "0")
        .expect("disable forwarding on vc");
    // The program keeps route answers this long (`lb_common::maps::NEXT_HOP_TTL_NS`), and the
    // full-size NAT packet above was just routed from vc.
    std::thread::sleep(std::time::Duration::from_nanos(lb_common::maps::NEXT_HOP_TTL_NS) * 2);
    check(
        &syn(1008, 80, b""),
        XDP_DROP,
        Stat::DropForwardingDisabled,
        "a SYN arriving where forwarding is off",
    );
    assert_eq!(
        lab.service_counters(3).packets,
        1,
        "a packet handed to the kernel for neighbour resolution still counts as forwarded"
    );
}

#[test]
fn a_vip_is_taken_only_while_some_vip_has_its_port() {
    // The program reads `VIP_PORTS` before it hashes into `VIPS`: the bit the daemon sets
    // for a VIP's port is what makes the VIP live, and a clear one passes its packets.
    let Some(mut lab) = two_vips("vip_ports") else {
        return;
    };
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let syn = Packet::tcp(client, 40000, vip, 80, TCP_SYN).frame(VC_MAC, CLIENT_MAC);
    let (word, bit) = vip_port_bit(80);
    let words = lab.vip_ports.get(&word, 0).expect("read VIP_PORTS");
    assert_ne!(words & bit, 0, "placing the service at port 80 set its bit");
    for other in [79, 81, 8080] {
        let (w, b) = vip_port_bit(other);
        let set = lab.vip_ports.get(&w, 0).expect("read VIP_PORTS") & b;
        assert_eq!(set, 0, "port {other} has its bit set, and no VIP has it");
    }

    lab.vip_ports
        .set(word, words & !bit, 0)
        .expect("clear port 80's bit");
    lab.expect(
        lab.vc,
        &syn,
        XDP_PASS,
        "a SYN to the VIP while port 80's bit is clear",
    );
    assert_eq!(lab.stat(Stat::PassNotVip), 1, "not counted as PassNotVip");
    assert_eq!(lab.stat(Stat::Forwarded), 0, "forwarded without its bit");

    lab.vip_ports
        .set(word, words, 0)
        .expect("set port 80's bit again");
    let out = lab.expect(lab.vc, &syn, XDP_REDIRECT, "the same SYN with the bit set");
    assert_eq!(lab.stat(Stat::Forwarded), 1, "not forwarded with its bit");
    let port = l4_source_port(&out);
    assert!(
        (SNAT_MIN..=SNAT_MAX).contains(&port),
        "the forwarded SYN leaves from port {port}, not a SNAT port"
    );
}
