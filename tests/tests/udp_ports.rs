//! A UDP service whose host runs out of ephemeral ports: each proxied session holds one
//! connected socket towards its backend, and the health checks need ports too. The host's
//! shortage is not the backends' fault: they stay UP, the sessions that get no port are
//! refused and counted, and service resumes when sessions end.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::netns::Netns;
use lb_tests::xdp::in_netns;
use lb_tests::{Daemon, UdpEcho};

/// The namespace's ephemeral port range: 100 ports.
const PORT_RANGE: &str = "40000 40099";
/// Clients, each from its own address (the proxy keeps a session per client address), on a
/// port outside the ephemeral range.
const CLIENTS: u16 = 300;
/// The service's session idle timeout.
const IDLE: Duration = Duration::from_secs(3);

/// Whether `socket` gets an answer to one datagram within 300 ms (three tries).
fn answered(socket: &UdpSocket, vip: SocketAddr) -> bool {
    let mut buf = [0u8; 512];
    (0..3).any(|_| {
        socket.send_to(b"q", vip).is_ok()
            && socket
                .recv_from(&mut buf)
                .is_ok_and(|(n, from)| from == vip && n > 0)
    })
}

/// The backends' states in `/status`.
fn states(ns: &Netns, daemon: &Daemon) -> Vec<String> {
    let api = daemon.admin_addr();
    let st = in_netns(ns, || lb_tests::admin::status(api)).expect("enter the namespace");
    st["services"][0]["backends"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .map(|b| b["health"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn three_hundred_clients_through_a_hundred_ports_leave_the_backends_up() {
    if !lb_tests::require_root("udp_ports::three_hundred_clients_through_a_hundred_ports") {
        return;
    }
    let ns = Netns::new("ports").expect("a namespace");
    in_netns(&ns, || {
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", PORT_RANGE)
            .expect("set the namespace's ephemeral port range")
    })
    .expect("enter the namespace");
    let echoes: Vec<UdpEcho> = in_netns(&ns, || {
        (1..=2)
            .map(|i| {
                let at: SocketAddr = format!("127.0.0.{i}:5300").parse().expect("literal");
                UdpEcho::start_on(&format!("u{i}"), at).expect("a UDP echo backend starts")
            })
            .collect()
    })
    .expect("enter the namespace");
    let vip: SocketAddr = "127.0.0.1:5353".parse().expect("literal");
    let mut svc = ServiceConfig::udp("dns", vip)
        .set("dataplane", "proxy")
        .set("idle_timeout", "3s")
        .fast_health("udp");
    for e in &echoes {
        svc = svc.backend(e.addr(), 1);
    }
    let daemon = in_netns(&ns, || {
        Daemon::start(&DaemonConfig::new().service(svc).to_toml())
    })
    .expect("enter the namespace");
    let deadline = Instant::now() + Duration::from_secs(10);
    while states(&ns, &daemon) != ["up", "up"] {
        assert!(Instant::now() < deadline, "the backends never came UP");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every client keeps its socket (and so its session) open while the others ask.
    let (clients, served) = in_netns(&ns, || {
        let clients: Vec<UdpSocket> = (0..CLIENTS)
            .map(|i| {
                // A session per client address: each client its own loopback address.
                let at = std::net::Ipv4Addr::new(127, 1, (i / 200) as u8, (i % 200 + 1) as u8);
                let s = UdpSocket::bind((at, 20_000)).expect("bind a client");
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("read timeout");
                s
            })
            .collect();
        let served = clients.iter().filter(|c| answered(c, vip)).count();
        (clients, served)
    })
    .expect("enter the namespace");
    assert!(
        served > 0 && served < CLIENTS as usize,
        "{served} of {CLIENTS} clients were answered through 100 ephemeral ports: expected \
         some, not all"
    );
    // Long enough for the health checks (every 200 ms, fall 2) to have met the shortage.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        states(&ns, &daemon),
        ["up", "up"],
        "the host ran out of ports, not the backends: they must stay UP"
    );
    let unknown: u64 = in_netns(&ns, || lb_tests::admin::status(daemon.admin_addr()))
        .expect("enter the namespace")["services"][0]["backends"]
        .as_array()
        .map(|bs| bs.iter().filter_map(|b| b["checks_unknown"].as_u64()).sum())
        .unwrap_or(0);
    assert!(
        unknown > 0,
        "no health check met the port shortage (checks_unknown is 0): the test proves nothing"
    );
    let api = daemon.admin_addr();
    let metrics = in_netns(&ns, || lb_tests::admin::request(api, "GET", "/metrics", ""))
        .expect("enter the namespace");
    let errors: f64 = metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("lb_proxy_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let refused = (CLIENTS as usize - served) as f64;
    assert!(
        errors >= refused,
        "{refused} clients got no session for want of a port, but lb_proxy_errors_total is \
         {errors}"
    );
    drop(clients);
    // Sessions end after their idle timeout; then new clients are served again.
    std::thread::sleep(IDLE + Duration::from_secs(2));
    let after = in_netns(&ns, || {
        (0..20u16)
            .filter(|i| {
                let at = std::net::Ipv4Addr::new(127, 2, 0, (i + 1) as u8);
                let s = UdpSocket::bind((at, 21_000)).expect("bind a client");
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("read timeout");
                answered(&s, vip)
            })
            .count()
    })
    .expect("enter the namespace");
    assert_eq!(after, 20, "service did not resume once the sessions ended");
    assert_eq!(
        states(&ns, &daemon),
        ["up", "up"],
        "the backends after the flood"
    );
}
