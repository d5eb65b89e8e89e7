//! The tc data plane over IPv6, end to end, in `nat` and `dsr` mode: a client namespace, the
//! balancer namespace with `lb-daemon` (`dataplane = "tc"`), two backend namespaces with real
//! servers, every link IPv6 only. Nothing on the neighbours is changed (tx checksum offload on,
//! no XDP program on the veth peers); DSR backends run `lb-daemon decap` and hold the VIP on
//! their loopback.
//!
//! ```text
//!  client ns               balancer ns                         backend ns i (1..=2)
//!  c0 fd00:200::2 ── l0 fd00:200::1   (lb_tc)
//!                     li fd00:200:i::1 (lb_tc) ─────────────── b0 fd00:200:i::2
//! ```
//!
//! Each run checks what a user would: HTTP requests on new connections are answered by both
//! backends, a 100 MiB upload and a 100 MiB download arrive byte for byte (the download's
//! replies sent on by `lb_tc`, none by the balancer's kernel), and UDP requests get their
//! replies.
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use lb_tests::client::{download, http_get, upload};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::data::Receipt;
use lb_tests::load::run;
use lb_tests::netns::{veth, Netns};
use lb_tests::xdp::{bpf_object, in_netns, udp_exchange, Decap, Mode, PeerServer};
use lb_tests::{Daemon, HttpNameServer, SourceServer, UdpEcho};

/// The VIP, on no interface of the balancer.
const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0x100, 0, 0, 0, 0, 1);
/// The client.
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
/// The balancer's client-side address: its `local_address` (NAT source, DSR outer source).
const BALANCER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
/// Backends.
const BACKENDS: usize = 2;
/// Service ports.
const WEB: u16 = 80;
const UP: u16 = 81;
const DOWN: u16 = 82;
const DNS: u16 = 53;
/// Each transfer.
const BIG: u64 = 100 * 1024 * 1024;

fn backend_ip(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x200, i as u16, 0, 0, 0, 0, 2)
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(VIP), port)
}

/// The servers of one backend namespace.
struct Servers {
    web: HttpNameServer,
    _up: PeerServer,
    _down: SourceServer,
    _dns: UdpEcho,
}

/// One run's namespaces, servers and daemon; the daemon goes first on drop, the namespaces
/// (and their veths) last.
struct World6 {
    daemon: Daemon,
    _servers: Vec<Servers>,
    _decaps: Vec<Decap>,
    client: Netns,
    balancer: Netns,
    backends: Vec<Netns>,
}

fn start(mode: Mode) -> World6 {
    let client = Netns::new("c6").expect("client namespace");
    let balancer = Netns::new("lb6").expect("balancer namespace");
    veth(
        &balancer,
        "l0",
        &format!("{BALANCER}/64"),
        &client,
        "c0",
        &format!("{CLIENT}/64"),
    )
    .expect("client veth");
    client
        .ip(&[
            "-6",
            "route",
            "add",
            &format!("{VIP}/128"),
            "via",
            &BALANCER.to_string(),
        ])
        .expect("client route to the VIP");
    balancer
        .sysctl("net.ipv6.conf.all.forwarding", "1")
        .expect("IPv6 forwarding in the balancer");
    let object = bpf_object();
    let mut backends = Vec::new();
    let mut decaps = Vec::new();
    let mut servers = Vec::new();
    for i in 1..=BACKENDS {
        let ns = Netns::new(&format!("b6{i}")).expect("backend namespace");
        let gateway = Ipv6Addr::new(0xfd00, 0x200, i as u16, 0, 0, 0, 0, 1);
        veth(
            &balancer,
            &format!("l{i}"),
            &format!("{gateway}/64"),
            &ns,
            "b0",
            &format!("{}/64", backend_ip(i)),
        )
        .expect("backend veth");
        ns.ip(&["-6", "route", "add", "default", "via", &gateway.to_string()])
            .expect("backend default route");
        if mode == Mode::Dsr {
            ns.ip(&["-6", "addr", "add", &format!("{VIP}/128"), "dev", "lo"])
                .expect("VIP on the backend's loopback");
            // Room for the 40-byte outer header on a full-size client packet.
            for (n, dev) in [(&balancer, format!("l{i}")), (&ns, "b0".to_string())] {
                n.ip(&["link", "set", &dev, "mtu", "1600"])
                    .expect("MTU of a backend link");
            }
            decaps.push(Decap::start_at(
                "tc",
                &ns,
                "b0",
                &object,
                &[IpAddr::V6(BALANCER)],
            ));
        }
        let name = format!("b{i}");
        let any = |port| SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        // A DSR backend answers UDP from the VIP: bound there, not to the wildcard.
        let dns_at = match mode {
            Mode::Nat => SocketAddr::new(IpAddr::V6(backend_ip(i)), DNS),
            Mode::Dsr => vip(DNS),
        };
        servers.push(
            ns.enter(|| Servers {
                web: HttpNameServer::start_on(&name, any(WEB)).expect("web server starts"),
                _up: PeerServer::start_on(&name, any(UP)).expect("upload server starts"),
                _down: SourceServer::start_on(&name, any(DOWN)).expect("download server starts"),
                _dns: UdpEcho::start_on(&name, dns_at).expect("udp echo starts"),
            })
            .expect("enter the backend namespace"),
        );
        backends.push(ns);
    }

    let mut config = DaemonConfig::new().global("bpf_object", object.display().to_string());
    for (name, port, udp, health) in [
        ("web", WEB, false, "http"),
        ("up", UP, false, "tcp"),
        ("down", DOWN, false, "tcp"),
        ("dns", DNS, true, "udp"),
    ] {
        let mut svc = if udp {
            ServiceConfig::udp(name, vip(port))
        } else {
            ServiceConfig::tcp(name, vip(port))
        };
        // A DSR backend answers from the VIP only: a UDP probe to its own address gets a reply
        // from an address the checker does not expect.
        svc = if udp && mode == Mode::Dsr {
            svc.health("kind", "none")
        } else {
            svc.fast_health(health).health("timeout", "2s")
        };
        let forwarding = mode.forwarding();
        let ifs: Vec<toml::Value> = (1..=BACKENDS)
            .map(|i| toml::Value::from(format!("l{i}")))
            .collect();
        svc = svc
            .set("dataplane", "tc")
            .set("interface", "l0")
            .set("backend_interfaces", toml::Value::Array(ifs))
            .set("local_address", BALANCER.to_string())
            .set("forwarding", forwarding);
        for i in 1..=BACKENDS {
            svc = svc.backend(SocketAddr::new(IpAddr::V6(backend_ip(i)), port), 1);
        }
        config = config.service(svc);
    }
    let toml = config.to_toml();
    let daemon =
        in_netns(&balancer, || Daemon::start(&toml)).expect("enter the balancer namespace");
    for (i, s) in servers.iter().enumerate() {
        assert!(
            s.web.wait_for_health_checks(2, Duration::from_secs(15)),
            "the daemon did not health-check b{} within 15 s",
            i + 1
        );
    }
    World6 {
        daemon,
        _servers: servers,
        _decaps: decaps,
        client,
        balancer,
        backends,
    }
}

fn checks(mode: Mode) {
    let world = start(mode);
    let on_client = |f: &(dyn Fn() + Sync)| world.client.enter(f).expect("client namespace");

    on_client(&|| {
        let report = run(200, 4, Duration::from_secs(60), |_| http_get(vip(WEB), "/"));
        report.assert_all_answered(&format!("{mode:?} over IPv6: HTTP through the VIP"));
        for b in ["b1", "b2"] {
            assert!(
                report.tally.get(b) > 0,
                "{mode:?} over IPv6: {b} answered none of 200 new connections: {}",
                report.tally
            );
        }
    });
    on_client(&|| {
        let receipt = upload(vip(UP), BIG, 61)
            .unwrap_or_else(|e| panic!("{mode:?} over IPv6: the 100 MiB upload failed: {e}"));
        assert_eq!(
            receipt,
            Receipt::of_stream(BIG, 61),
            "{mode:?} over IPv6: the backend did not receive the 100 MiB sent, byte for byte"
        );
    });
    let forwarded = || {
        world
            .balancer
            .forwarded_datagrams()
            .unwrap_or_else(|e| panic!("read the forwarding counters: {e}"))
            .1
    };
    let before = forwarded();
    on_client(&|| {
        let receipt = download(vip(DOWN), BIG, 62)
            .unwrap_or_else(|e| panic!("{mode:?} over IPv6: the 100 MiB download failed: {e}"));
        assert_eq!(
            receipt,
            Receipt::of_stream(BIG, 62),
            "{mode:?} over IPv6: the client did not receive the 100 MiB sent, byte for byte"
        );
    });
    // The download's replies are GSO super-packets whose segments fit the client's link: lb_tc
    // sends them on (a NAT reply, or a DSR reply by `Frame::segments_fit`), and the
    // balancer's kernel forwards none.
    let by_kernel = forwarded() - before;
    assert_eq!(
        by_kernel, 0,
        "{mode:?} over IPv6: the balancer's kernel forwarded {by_kernel} packets of the download"
    );
    on_client(&|| {
        let payloads: Vec<Vec<u8>> = (0..50u8).map(|n| vec![n; 100]).collect();
        let replies = udp_exchange(vip(DNS), &payloads, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{mode:?} over IPv6: UDP through the VIP failed: {e}"));
        assert_eq!(
            replies.len(),
            payloads.len(),
            "{mode:?} over IPv6: not every UDP request got its reply"
        );
    });
    drop(world.daemon);
}

#[test]
fn nat_over_ipv6_serves_http_both_transfers_and_udp() {
    if lb_tests::require_root("tc_ipv6::nat_over_ipv6") {
        checks(Mode::Nat);
    }
}

#[test]
fn dsr_over_ipv6_serves_http_both_transfers_and_udp() {
    if lb_tests::require_root("tc_ipv6::dsr_over_ipv6") {
        checks(Mode::Dsr);
    }
}

/// IPv6's "packet too big", built by `lb_tc` from a `CHECKSUM_PARTIAL` datagram, reaches the
/// client intact through a link whose transmit checksums the kernel computes (see
/// `tc_dsr::fragmentation_needed_built_from_a_partial_checksum_packet_survives_a_checksumming_link`):
/// with 1,500-byte backend links, a 1,500-byte packet has no room for the 40-byte outer
/// header, and the client's path MTU towards the VIP must drop to 1,460.
#[test]
fn dsr_packet_too_big_built_from_a_partial_checksum_packet_survives_a_checksumming_link() {
    if !lb_tests::require_root("tc_ipv6::dsr_packet_too_big_built_from_a_partial_checksum") {
        return;
    }
    let world = start(Mode::Dsr);
    for (i, ns) in world.backends.iter().enumerate() {
        for (n, dev) in [
            (&world.balancer, format!("l{}", i + 1)),
            (ns, "b0".to_string()),
        ] {
            n.ip(&["link", "set", &dev, "mtu", "1500"])
                .expect("MTU of a backend link");
        }
    }
    lb_tests::xdp::disable_tx_checksum(&world.balancer, "l0")
        .expect("tx checksum offload off on l0");
    let mtu = world
        .client
        .enter(|| lb_tests::client::learnt_path_mtu(vip(DNS), 1500))
        .expect("client namespace")
        .unwrap_or_else(|e| panic!("sending the 1,452-byte datagram failed: {e}"));
    assert_eq!(
        mtu, 1460,
        "the client's path MTU towards the VIP stayed {mtu}: the balancer's \"packet too big\" \
         did not arrive intact"
    );
}
