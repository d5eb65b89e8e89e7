//! The end-to-end checks `xdp_nat.rs`, `xdp_dsr.rs`, `tc_nat.rs` and `tc_dsr.rs` all run, each
//! in its own [`World`], on the [`Path`] (hook and forwarding) the test gives.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::world::{World, BULK, DNS, WEB};
use super::{backend_ip, in_netns, udp_exchange, Mode, Path, Plane, Topology, BALANCER, CLIENT};
use crate::client::{http_get, HttpConnection, Upload};
use crate::config::{DaemonConfig, ServiceConfig};
use crate::data::Receipt;
use crate::load::run;
use crate::Daemon;

/// New connections in the distribution check.
pub const CONNECTIONS: usize = 3_000;
/// The share tolerance: each of 3 equal backends within 33.3% ± 5 points.
pub const TOLERANCE: f64 = 0.05;
/// The big transfer.
pub const BIG: u64 = 100 * 1024 * 1024;
/// How long a health transition and its table may take to show in the log.
const TRANSITION: Duration = Duration::from_secs(15);

fn web() -> SocketAddr {
    Topology::vip(WEB)
}

fn bulk() -> SocketAddr {
    Topology::vip(BULK)
}

/// HTTP requests through the VIP, each on a new connection, are answered by all three
/// backends within ±5 points of a third each.
pub fn requests_spread_evenly(path: Path) {
    let world = World::start(path, 3, 3);
    let report = world.client(|| {
        run(CONNECTIONS, 4, Duration::from_secs(180), |_| {
            http_get(web(), "/")
        })
    });
    report.assert_all_answered(&format!("{path:?}: HTTP through the VIP"));
    if let Err(e) = report.tally.check_shares(
        &[("b1", 1), ("b2", 1), ("b3", 1)],
        TOLERANCE,
        &format!("{path:?} XDP, maglev"),
    ) {
        panic!("{e}");
    }
}

/// A 100 MiB upload arrives byte-identical; the backend saw the client's real address (DSR)
/// or the balancer's (NAT); UDP requests get their replies, from more than one backend.
pub fn transfer_and_udp(path: Path) {
    let mode = path.mode;
    let world = World::start(path, 3, 3);
    let sent_before = backend_links_tx(&world);
    let receipt = world
        .client(|| crate::client::upload(bulk(), BIG, 7))
        .unwrap_or_else(|e| panic!("{path:?}: the 100 MiB upload through the VIP failed: {e}"));
    let upload_tx = backend_links_tx(&world) - sent_before;
    assert_eq!(
        receipt,
        Receipt::of_stream(BIG, 7),
        "{path:?}: the backend did not receive the 100 MiB the client sent, byte for byte"
    );
    let expected_peer: IpAddr = match mode {
        Mode::Nat => BALANCER.into(),
        Mode::Dsr => CLIENT.into(),
    };
    // Health checks come from the balancer's own address on each backend veth, 10.200.i.1.
    let checker = |ip: IpAddr| (1..=3).any(|i| ip == IpAddr::from([10, 200, i as u8, 1]));
    let seen: Vec<SocketAddr> = world
        .servers
        .iter()
        .flatten()
        .flat_map(|s| s.peer.peers())
        .filter(|p| !checker(p.ip()))
        .collect();
    assert!(
        !seen.is_empty() && seen.iter().all(|p| p.ip() == expected_peer),
        "{path:?}: the upload's backend should see the connection come from {expected_peer} \
         ({}); it saw {seen:?}",
        match mode {
            Mode::Nat => "the balancer's local_address",
            Mode::Dsr => "the client's real address",
        }
    );

    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    for k in 0..30u32 {
        let payloads: Vec<Vec<u8>> = (0..3).map(|j| format!("q{k}.{j}").into_bytes()).collect();
        let replies = world
            .client(|| udp_exchange(Topology::vip(DNS), &payloads, Duration::from_secs(5)))
            .unwrap_or_else(|e| {
                panic!("{path:?}: UDP client {k} got no reply through the VIP: {e}")
            });
        let mut names = Vec::new();
        for (p, r) in payloads.iter().zip(&replies) {
            let text = String::from_utf8_lossy(r);
            let (name, echoed) = text
                .split_once(':')
                .unwrap_or_else(|| panic!("{path:?}: UDP reply `{text}` is not `name:payload`"));
            assert_eq!(
                echoed.as_bytes(),
                &p[..],
                "{path:?}: the UDP reply does not echo what was sent"
            );
            names.push(name.to_string());
        }
        assert!(
            names.windows(2).all(|w| w[0] == w[1]),
            "{path:?}: one UDP client's datagrams were answered by different backends: {names:?}"
        );
        *by_backend.entry(names[0].clone()).or_default() += 1;
    }
    assert!(
        by_backend.len() >= 2,
        "{path:?}: 30 UDP clients were all answered by one backend: {by_backend:?}"
    );
    // The DSR `dns` service runs with no active checks, which the eBPF plane cannot replace
    // with failed connects: the daemon must say so, the NAT one (checked) must not. A UDP
    // check of a DSR backend needs it to answer on its own address too: the advice says so.
    let warning = (world.daemon.logs().into_iter())
        .find(|l| l.contains("service dns: no active health checks"));
    assert_eq!(
        warning.is_some(),
        mode == Mode::Dsr,
        "{path:?}: the warning that dead backends of an unchecked eBPF service stay in"
    );
    assert!(
        (warning.as_ref()).is_none_or(|l| l.contains("answer the check on its own address")),
        "{path:?}: the advice for a DSR UDP service must say what its backends need: {warning:?}"
    );
    if path.plane == Plane::Tc {
        // The upload's packets went to the backend's namespace through peer redirects (NAT),
        // which skip the balancer's veth transmit and so its tx counters; DSR tunnel packets
        // take the transmit. Bytes, not packets: the health checks (every 200 ms, three
        // services) send about 10 KiB a second whatever the upload's speed.
        eprintln!("{path:?}: the backend veths transmitted {upload_tx} bytes in the upload");
        match mode {
            Mode::Nat => assert!(
                upload_tx < BIG / 10,
                "{path:?}: the balancer's backend veths transmitted {upload_tx} bytes during \
                 the 100 MiB upload: NAT packets were not handed to the veths' peers"
            ),
            Mode::Dsr => assert!(
                upload_tx >= BIG,
                "{path:?}: the balancer's backend veths transmitted only {upload_tx} bytes \
                 during the 100 MiB upload: DSR tunnel packets must take the veth's transmit"
            ),
        }
        // Every interface here is a veth with its peer in another namespace: the transfers
        // above went through lb_tc's peer redirects, both ways.
        let logs = world.daemon.logs();
        for name in ["l0", "l1", "l2", "l3"] {
            let said = format!("eBPF: {name} is a veth with its peer in another namespace");
            assert!(
                logs.iter().any(|l| l.contains(&said)),
                "{path:?}: the daemon did not say it hands packets for {name} to the peer"
            );
        }
    }
}

/// Bytes the balancer's veths towards the backends (`l1`..`l3`) have transmitted, summed
/// (their `tx_bytes`).
fn backend_links_tx(world: &World) -> u64 {
    (1..=3)
        .map(|i| {
            let file = format!("/sys/class/net/l{i}/statistics/tx_bytes");
            let out = world
                .topology
                .balancer
                .run("cat", &[&file])
                .unwrap_or_else(|e| panic!("read {file} in the balancer's namespace: {e}"));
            let text = String::from_utf8_lossy(&out.stdout);
            text.trim()
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("{file} holds `{}`: {e}", text.trim()))
        })
        .sum()
}

/// A long upload keeps going to its backend while another backend goes DOWN and the table
/// changes; new flows avoid the DOWN backend.
pub fn backend_down(path: Path) {
    let mut world = World::start(path, 3, 3);
    let mut up = world
        .client(|| -> Result<Upload, crate::client::ClientError> {
            let mut u = Upload::start(bulk(), 11)?;
            u.send(8 * 1024 * 1024)?;
            Ok(u)
        })
        .unwrap_or_else(|e| panic!("{path:?}: the long upload could not start: {e}"));
    let holder = world.bulk_connection_holder(3);
    let victim = if holder == 1 { 2 } else { 1 };
    let victim_addr = SocketAddr::new(IpAddr::V4(backend_ip(victim)), BULK);
    let mark = world.daemon.log_mark();
    let victim_ns = &world.topology.backends[victim - 1];
    let servers = world.servers[victim - 1]
        .as_mut()
        .expect("victim has servers");
    victim_ns
        .enter(|| servers.peer.stop())
        .expect("enter the victim's namespace");
    world.wait_for_table_after(mark, "bulk", victim_addr, "DOWN", TRANSITION);

    up.send(BIG - 8 * 1024 * 1024).unwrap_or_else(|e| {
        panic!("{path:?}: the upload to b{holder} broke while b{victim} went DOWN: {e}")
    });
    let receipt = up
        .finish()
        .unwrap_or_else(|e| panic!("{path:?}: the upload to b{holder} did not complete: {e}"));
    assert_eq!(
        receipt,
        Receipt::of_stream(BIG, 11),
        "{path:?}: the upload to b{holder} arrived damaged while the table changed"
    );

    let report = world.client(|| {
        run(90, 3, Duration::from_secs(60), |i| {
            crate::client::upload(bulk(), 1024, i as u64).map(|_| "ok".to_string())
        })
    });
    report.assert_all_answered(&format!(
        "{path:?}: new uploads after b{victim} went DOWN (one placed on it would be refused)"
    ));
    // The program's own count: no flow of `bulk` was ever placed on the victim (the long
    // upload went to b{holder}, every later one came after the DOWN).
    world.daemon.terminate();
    let line = format!("xdp counters: service bulk backend {victim_addr}: ");
    let counted = world
        .daemon
        .logs()
        .into_iter()
        .find(|l| l.contains(&line))
        .unwrap_or_else(|| panic!("{path:?}: no `{line}` line in the daemon's exit log"));
    assert!(
        counted.contains("new_flows=0"),
        "{path:?}: XDP placed new flows on b{victim} after it was marked DOWN: {counted}"
    );
}

/// A backend that starts DOWN comes UP: kept-alive connections stay on their backends
/// (conntrack), and new connections spread over all four.
pub fn backend_added(path: Path) {
    let mut world = World::start(path, 4, 3);
    let b4 = SocketAddr::new(IpAddr::V4(backend_ip(4)), WEB);
    world.wait_for_table_after(0, "web", b4, "DOWN", TRANSITION);

    let mut kept: Vec<(HttpConnection, String)> = world.client(|| {
        (0..24)
            .map(|k| {
                let mut c = HttpConnection::open(web())
                    .unwrap_or_else(|e| panic!("{path:?}: kept-alive connection {k}: {e}"));
                let first = c
                    .get("/")
                    .unwrap_or_else(|e| panic!("{path:?}: first request on connection {k}: {e}"));
                (c, first)
            })
            .collect()
    });
    assert!(
        kept.iter().all(|(_, b)| b != "b4"),
        "{path:?}: a connection reached b4 while it was DOWN"
    );

    let mark = world.daemon.log_mark();
    world.start_backend(4);
    world.wait_for_table_after(mark, "web", b4, "UP", TRANSITION);

    for (k, (c, first)) in kept.iter_mut().enumerate() {
        let again = c.get("/").unwrap_or_else(|e| {
            panic!("{path:?}: kept-alive connection {k} broke when b4 came UP: {e}")
        });
        assert_eq!(
            &again, first,
            "{path:?}: kept-alive connection {k} moved from {first} to {again} when b4 came UP; \
             conntrack should keep it on its backend"
        );
    }
    let report = world.client(|| run(1_200, 4, Duration::from_secs(120), |_| http_get(web(), "/")));
    report.assert_all_answered(&format!("{path:?}: new connections after b4 came UP"));
    if let Err(e) = report.tally.check_shares(
        &[("b1", 1), ("b2", 1), ("b3", 1), ("b4", 1)],
        TOLERANCE,
        &format!("{path:?}: new connections after b4 came UP"),
    ) {
        panic!("{e}");
    }
}

/// The XDP counters match what the client sent, as `/status`, `/metrics` and the exit log show
/// them: UDP packets and bytes exactly, and one new flow per TCP connection.
pub fn counters_match(path: Path) {
    let mut world = World::start(path, 3, 3);
    const DATAGRAMS: usize = 100;
    const PAYLOAD: usize = 32;
    let payloads: Vec<Vec<u8>> = (0..DATAGRAMS)
        .map(|i| vec![b'a' + (i % 26) as u8; PAYLOAD])
        .collect();
    world
        .client(|| udp_exchange(Topology::vip(DNS), &payloads, Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{path:?}: UDP through the VIP failed: {e}"));
    const CONNS: usize = 50;
    let report = world.client(|| run(CONNS, 1, Duration::from_secs(60), |_| http_get(web(), "/")));
    report.assert_all_answered(&format!("{path:?}: HTTP for the counters"));
    // Ethernet 14 + IPv4 20 + UDP 8 + payload, as the frame arrived at the balancer.
    let frame = (14 + 20 + 8 + PAYLOAD) as u64;

    let api = world.daemon.admin_addr();
    let (status, metrics) = in_netns(&world.topology.balancer, || {
        let metrics = crate::admin::request(api, "GET", "/metrics", "");
        (crate::admin::status(api), metrics)
    })
    .expect("enter the balancer namespace");
    let service = |name: &str| -> &serde_json::Value {
        status["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .unwrap_or_else(|| panic!("{path:?}: no service {name} in /status: {status}"))
    };
    let dns = &service("dns")["xdp"];
    assert_eq!(
        (
            dns["packets"].as_u64(),
            dns["bytes"].as_u64(),
            dns["flows"].as_u64()
        ),
        (
            Some(DATAGRAMS as u64),
            Some(DATAGRAMS as u64 * frame),
            Some(1)
        ),
        "{path:?}: /status shows other XDP figures for dns than the {DATAGRAMS} datagrams of \
         {frame} bytes one client sent: {dns}"
    );
    let web_total: u64 = service("web")["backends"]
        .as_array()
        .map(|b| b.iter().filter_map(|b| b["total"].as_u64()).sum())
        .unwrap_or(0);
    assert_eq!(
        web_total, CONNS as u64,
        "{path:?}: /status counts {web_total} flows over web's backends for {CONNS} connections"
    );
    assert!(
        status["xdp"]["packets"]["forwarded"].as_u64() >= Some((DATAGRAMS + CONNS) as u64),
        "{path:?}: /status's XDP `forwarded` is below the packets sent: {}",
        status["xdp"]
    );
    assert_eq!(metrics.status, 200, "GET /metrics: {}", metrics.body);
    let scrape = prometheus_parse::Scrape::parse(metrics.body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text ({e}):\n{}", metrics.body));
    // The samples of metric `name`, summed; only those whose label `label.0` is `label.1`
    // when one is given.
    let sum = |name: &str, label: Option<(&str, &str)>| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(
        sum("lb_backend_connections_total", Some(("service", "web"))),
        CONNS as f64,
        "{path:?}: lb_backend_connections_total for web over XDP"
    );
    assert_eq!(
        sum("lb_xdp_backend_packets_total", Some(("service", "dns"))),
        DATAGRAMS as f64,
        "{path:?}: lb_xdp_backend_packets_total for dns"
    );
    // The backends answer by their default route, the balancer: at tc a DSR reply (from the
    // VIP) is sent on by the program, every datagram's and every connection's; at XDP, and
    // under NAT (whose replies are `nat_replies`), none is.
    let dsr_replies = sum(
        "lb_xdp_packet_outcomes_total",
        Some(("outcome", "dsr_replies")),
    );
    if path == Path::tc(Mode::Dsr) {
        assert!(
            dsr_replies >= (DATAGRAMS + CONNS) as f64,
            "{path:?}: lb_tc sent on {dsr_replies} DSR replies, fewer than the {DATAGRAMS} \
             datagrams and {CONNS} connections answered"
        );
    } else {
        assert_eq!(
            dsr_replies, 0.0,
            "{path:?}: DSR replies sent on by the program"
        );
    }
    let seen = sum("lb_xdp_packets_total", None);
    let outcomes = sum("lb_xdp_packet_outcomes_total", None);
    assert!(
        seen >= (DATAGRAMS + CONNS) as f64 && outcomes > 0.0,
        "{path:?}: lb_xdp_packets_total {seen} and lb_xdp_packet_outcomes_total {outcomes} \
         do not fit the traffic sent:\n{}",
        metrics.body
    );

    world.daemon.terminate();
    let logs = world.daemon.logs();
    let find = |prefix: &str| -> (u64, u64, u64) {
        let line = logs
            .iter()
            .find(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("{path:?}: no `{prefix}` line in the daemon's exit log"));
        let field = |k: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k}= in `{line}`"))
        };
        (field("packets"), field("bytes"), field("new_flows"))
    };
    assert_eq!(
        find("xdp counters: service dns: "),
        (DATAGRAMS as u64, DATAGRAMS as u64 * frame, 1),
        "{path:?}: the dns counters (packets, bytes, new flows) do not match the {DATAGRAMS} \
         datagrams of {frame} bytes one client sent"
    );
    let (_, _, new_flows) = find("xdp counters: service web: ");
    assert_eq!(
        new_flows, CONNS as u64,
        "{path:?}: the web service counted {new_flows} new flows for {CONNS} connections"
    );
}

/// The backend link's MTU in [`nat_packet_too_big`]: smaller than the client side's 1500, as
/// for a backend reached through a tunnel or an overlay.
const SMALL_MTU: i32 = 1400;

/// NAT to a backend over a link with a smaller MTU than the client's (1400): a 1,500-byte
/// datagram with DF is answered with "fragmentation needed" from the VIP, and the client's
/// path MTU towards the VIP drops to the link's. The balancer's client-facing veth computes
/// its transmit checksums in software, as a card would, so on tc an answer built from the
/// client's `CHECKSUM_PARTIAL` datagram must account for that to arrive.
pub fn nat_packet_too_big(path: Path) {
    let world = World::start(path, 1, 1);
    let t = &world.topology;
    t.set_backend_link_mtu(0, SMALL_MTU as u32);
    super::disable_tx_checksum(&t.balancer, "l0").expect("tx checksum offload off on l0");
    let vip = Topology::vip(DNS);
    let learnt = world
        .client(|| crate::client::learnt_path_mtu(vip, 1500))
        .unwrap_or_else(|e| panic!("{path:?}: sending the 1,472-byte datagram failed: {e}"));
    assert_eq!(
        learnt,
        SMALL_MTU,
        "{path:?}: the client's path MTU towards the VIP is {learnt}, not the backend link's \
         {SMALL_MTU}: the balancer's \"fragmentation needed\" did not arrive. Daemon log:\n{}",
        world.daemon.logs().join("\n")
    );
}

/// The port of the `down` service of [`nat_reply_too_big`]: a source server on b1.
const DOWN: u16 = 82;
/// The download of [`nat_reply_too_big`].
const DOWNLOAD: u64 = 4 * 1024 * 1024;

/// NAT replies towards a client reached by a route of a smaller MTU (1400, locked: a VPN or
/// an overlay on the client's side) than the backend link's 1500: the backend's full-sized
/// TCP segments are answered with "fragmentation needed" from the balancer's NAT address,
/// the backend lowers its segment size, and a 4 MiB download completes byte for byte
/// (without the answer it stalls). The backend sends its segments one by one (no
/// segmentation offload: a tc GSO super-packet is not checked against a route's MTU), and
/// the balancer's backend veth computes its transmit checksums in software, so on tc an
/// answer built from the backend's `CHECKSUM_PARTIAL` segment must account for that to
/// arrive.
pub fn nat_reply_too_big(path: Path) {
    let source_addr = SocketAddr::new(IpAddr::V4(backend_ip(1)), DOWN);
    let mut source = None;
    let world = World::start_custom(path, 1, 1, &[1], |t| {
        source = Some(
            t.backends[0]
                .enter(|| crate::SourceServer::start_on("b1", source_addr))
                .expect("enter b1's namespace")
                .expect("the source server starts"),
        );
        let mut down = ServiceConfig::tcp("down", Topology::vip(DOWN)).health("kind", "none");
        for (key, value) in t.xdp_keys(path.mode) {
            down = down.set(key, value);
        }
        let toml = DaemonConfig::new()
            .global("bpf_object", super::bpf_object().display().to_string())
            .service(super::world::service(t, path.mode, "web", &[(1, 1)]))
            .service(down.backend(source_addr, 1))
            .to_toml();
        in_netns(&t.balancer, || Daemon::start(&toml)).expect("enter the balancer namespace")
    });
    let t = &world.topology;
    let client_route = format!("{CLIENT}/32");
    let small = SMALL_MTU.to_string();
    t.balancer
        .ip(&[
            "route",
            "replace",
            &client_route,
            "dev",
            "l0",
            "mtu",
            "lock",
            &small,
        ])
        .expect("a route to the client with a smaller MTU");
    super::disable_tx_checksum(&t.balancer, &super::backend_interface(1))
        .expect("tx checksum offload off on the backend veth");
    // On tc the backend's segments must reach the balancer one by one, as from a wire: a
    // GSO super-packet is not checked against the route's MTU (`Frame::mtu_len`). (XDP on
    // the peer already takes the veth its segmentation offloads.)
    if path.plane == Plane::Tc {
        super::disable_segmentation_offload(&t.backends[0], "b0")
            .expect("segmentation offloads off on the backend's veth");
    }
    let receipt = world
        .client(|| crate::client::download(Topology::vip(DOWN), DOWNLOAD, 63))
        .unwrap_or_else(|e| {
            panic!(
                "{path:?}: the download behind a route of MTU {SMALL_MTU} failed (it stalls when \
                 no \"fragmentation needed\" reaches the backend): {e}. Daemon log:\n{}",
                world.daemon.logs().join("\n")
            )
        });
    assert_eq!(
        receipt,
        Receipt::of_stream(DOWNLOAD, 63),
        "{path:?}: the client did not receive the 4 MiB the backend sent, byte for byte"
    );
    drop(world);
    drop(source);
}

/// NAT replies whose route to the client leaves by an interface the program is not attached
/// to (a second uplink, `l9`, with the client's address routed over it, as on a host with two
/// uplinks) reach the client: every request is answered. At XDP, which cannot redirect to
/// `l9`, the program hands the rewritten replies to the kernel, which forwards them
/// (`fib_pass`, none dropped for want of a devmap entry); at tc it sends them itself.
pub fn nat_reply_by_another_interface(path: Path) {
    let world = World::start(path, 2, 2);
    let t = &world.topology;
    crate::netns::veth(
        &t.balancer,
        "l9",
        "10.201.9.1/24",
        &t.client,
        "c9",
        "10.201.9.2/24",
    )
    .expect("a second link between balancer and client");
    // The client takes replies on c9 for an address of c0, and the balancer forwards replies
    // from the VIP, to which it has no route (a namespace copies the host's rp_filter).
    for conf in ["all", "default", "c0", "c9"] {
        t.client
            .sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")
            .expect("rp_filter off in the client");
    }
    let mut ours = vec!["all".to_string(), "l0".into(), "l9".into()];
    ours.extend((1..=2).map(super::backend_interface));
    for conf in &ours {
        t.balancer
            .sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")
            .expect("rp_filter off in the balancer");
    }
    let route = format!("{CLIENT}/32");
    t.balancer
        .ip(&["route", "add", &route, "via", "10.201.9.2", "dev", "l9"])
        .expect("the client routed over l9");
    // Its next hop resolved, as on a busy uplink: the program finds it in the route lookup.
    let hop = SocketAddr::from(([10, 201, 9, 2], 9));
    let _refused = in_netns(&t.balancer, || {
        std::net::TcpStream::connect_timeout(&hop, Duration::from_secs(2))
    });
    let report = world.client(|| run(200, 2, Duration::from_secs(60), |_| http_get(web(), "/")));
    report.assert_all_answered(&format!("{path:?}: requests whose replies route out of l9"));
    if path.plane == Plane::Xdp {
        let api = world.daemon.admin_addr();
        let st = in_netns(&t.balancer, || crate::admin::status(api))
            .expect("enter the balancer namespace");
        let packets = &st["xdp"]["packets"];
        assert_eq!(
            packets["drop_no_devmap_entry"], 0,
            "{path:?}: replies were dropped: {packets}"
        );
        assert!(
            packets["fib_pass"].as_u64() >= Some(200),
            "{path:?}: the replies should have gone to the kernel: {packets}"
        );
    }
}
