//! Per-client limits in the proxy: a client address over its concurrent-connection or
//! new-connection-rate limit is refused (accepted, then reset, never reaching a backend) and
//! counted; another client address is not affected. UDP sessions likewise.

mod proxy_support;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::Duration;

use lb_daemon::config::ClientLimits;
use lb_tests::UdpEcho;
use proxy_support::{wait_until, Harness, ServiceSpec, TcpBackend, SERVICE};
use socket2::{Domain, Socket, Type};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A TCP connection to `vip` from the loopback address `from` (127.0.0.0/8 is all local).
fn try_connect_from(from: &str, vip: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let local: SocketAddr = format!("{from}:0").parse().expect("literal address");
    socket.bind(&local.into()).expect("bind the client address");
    socket.connect_timeout(&vip.into(), Duration::from_secs(5))?;
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    Ok(s)
}

fn connect_from(from: &str, vip: SocketAddr) -> TcpStream {
    try_connect_from(from, vip).expect("connect to the VIP")
}

/// Whether a round trip through the proxy works on `s`.
fn served(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut back = [0u8; 4];
    matches!(s.read_exact(&mut back), Ok(()) if &back == b"ping")
}

/// Asserts that the connection was closed by the proxy without a byte (the reset may even
/// arrive while the client's connect is still being confirmed).
fn assert_refused(s: io::Result<TcpStream>, what: &str) {
    let mut s = match s {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("{what}: the connect itself failed: {e}"),
    };
    let mut buf = [0u8; 8];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{what} should have been refused, got {other:?}"),
    }
}

#[test]
fn a_client_over_its_connection_limit_is_refused_and_others_are_not() {
    let backend = TcpBackend::echo();
    let mut spec = ServiceSpec::tcp(vec![backend.addr]);
    spec.limits = ClientLimits {
        max_connections: Some(2),
        rate: None,
        burst: 0,
    };
    let h = Harness::start(spec);
    let mut first = connect_from("127.0.0.1", h.vip);
    let mut second = connect_from("127.0.0.1", h.vip);
    assert!(served(&mut first), "the first connection is served");
    assert!(served(&mut second), "the second connection is served");
    assert_refused(
        try_connect_from("127.0.0.1", h.vip),
        "a third connection from 127.0.0.1",
    );
    let mut other = connect_from("127.0.0.2", h.vip);
    assert!(
        served(&mut other),
        "a client at another address is not affected by 127.0.0.1's limit"
    );
    assert_eq!(h.proxy().counters().limited, 1, "the refusal is counted");
    assert_eq!(
        h.proxy().limited(SERVICE),
        Some(1),
        "and counted for the service"
    );
    assert_eq!(
        h.stats(0).total.load(Ordering::Relaxed),
        3,
        "the refused connection never reached the backend"
    );

    drop(first);
    // The place is given back when the proxy has closed the connection.
    assert!(
        wait_until(Duration::from_secs(10), || h.stats(0).active() == 2),
        "the closed connection is counted closed"
    );
    let mut again = connect_from("127.0.0.1", h.vip);
    assert!(
        served(&mut again),
        "a closed connection frees a place for its client"
    );
}

#[test]
fn a_client_over_its_rate_is_refused_after_its_burst_and_others_are_not() {
    let backend = TcpBackend::echo();
    let mut spec = ServiceSpec::tcp(vec![backend.addr]);
    // One new connection per 100 s after a burst of 3: no refill during the test.
    spec.limits = ClientLimits {
        max_connections: None,
        rate: Some(0.01),
        burst: 3,
    };
    let h = Harness::start(spec);
    for k in 0..3 {
        let mut s = connect_from("127.0.0.1", h.vip);
        assert!(served(&mut s), "connection {k} of the burst is served");
    }
    assert_refused(
        try_connect_from("127.0.0.1", h.vip),
        "a fourth connection in a burst of 3",
    );
    let mut other = connect_from("127.0.0.3", h.vip);
    assert!(
        served(&mut other),
        "a client at another address has its own bucket"
    );
    assert_eq!(h.proxy().limited(SERVICE), Some(1));
}

fn udp_from(from: &str, vip: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind(format!("{from}:0")).expect("bind a UDP client");
    socket.connect(vip).expect("connect to the VIP");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    socket
}

#[test]
fn a_udp_client_address_over_its_session_limit_is_dropped_and_others_are_not() {
    let backend = UdpEcho::start("b").expect("start a UDP echo backend");
    let mut spec = ServiceSpec::udp(vec![backend.addr()]);
    spec.limits = ClientLimits {
        max_connections: Some(1),
        rate: None,
        burst: 0,
    };
    let h = Harness::start(spec);
    let mut buf = [0u8; 64];
    let first = udp_from("127.0.0.1", h.vip);
    first.send(b"one").expect("send");
    let n = first.recv(&mut buf).expect("the first session is answered");
    assert_eq!(&buf[..n], b"b:one");

    // Another port of the same address would be a second session: over the limit.
    let second = udp_from("127.0.0.1", h.vip);
    second.send(b"two").expect("send");
    assert!(
        wait_until(Duration::from_secs(10), || h.proxy().limited(SERVICE)
            == Some(1)),
        "the second session of 127.0.0.1 was not refused"
    );
    let dropped = h.proxy().counters().dropped_datagrams;
    assert!(dropped >= 1, "the refused datagram is counted as dropped");

    let other = udp_from("127.0.0.2", h.vip);
    other.send(b"three").expect("send");
    let n = other.recv(&mut buf).expect("another address is answered");
    assert_eq!(&buf[..n], b"b:three");

    first.send(b"four").expect("send");
    let n = first.recv(&mut buf).expect("the first session still works");
    assert_eq!(&buf[..n], b"b:four");
    assert_eq!(
        h.proxy().limited(SERVICE),
        Some(1),
        "nothing else was refused"
    );
}

/// Datagrams a flood sends back to back before it waits for the proxy: small enough that the
/// VIP socket's receive buffer holds them all even at the kernel's default size, so none is
/// lost while the worker is descheduled (a lost one would never be counted).
const FLOOD_BURST: u64 = 50;

/// Sends `count` datagrams from `socket` in bursts of [`FLOOD_BURST`], waiting after each
/// burst until `counted()` (the proxy's count of what it did with them) reaches what was sent.
/// Returns `Err` with the count when a burst is not counted in full within 10 s; the caller
/// still checks the exact total, so over-counting fails too.
fn flood(socket: &UdpSocket, count: u64, counted: impl Fn() -> u64) -> Result<(), u64> {
    let mut sent = 0;
    while sent < count {
        let burst = FLOOD_BURST.min(count - sent);
        for _ in 0..burst {
            socket.send(b"flood").expect("send");
        }
        sent += burst;
        if !wait_until(Duration::from_secs(10), || counted() >= sent) {
            return Err(counted());
        }
    }
    Ok(())
}

#[test]
fn a_flooding_refused_udp_client_is_counted_per_datagram_and_logged_once_a_second() {
    let backend = UdpEcho::start("b").expect("start a UDP echo backend");
    let mut spec = ServiceSpec::udp(vec![backend.addr()]);
    spec.limits = ClientLimits {
        max_connections: Some(1),
        rate: None,
        burst: 0,
    };
    spec.access_log = true;
    spec.workers = 1;
    let h = Harness::start(spec);
    let mut buf = [0u8; 64];
    let holder = udp_from("127.0.0.3", h.vip);
    holder.send(b"one").expect("send");
    holder
        .recv(&mut buf)
        .expect("the first session is answered");

    let flooder = udp_from("127.0.0.3", h.vip);
    let me = flooder.local_addr().expect("the flooder's address");
    let started = std::time::Instant::now();
    let counted = || h.proxy().limited(SERVICE).unwrap_or(0);
    if let Err(n) = flood(&flooder, 500, counted) {
        panic!("each of the 500 refused datagrams is counted; {n} were");
    }
    assert_eq!(
        h.proxy().limited(SERVICE),
        Some(500),
        "500 refused datagrams were sent"
    );
    let seconds = started.elapsed().as_secs() as usize;
    assert_eq!(h.proxy().counters().limited, 500);
    assert!(h.proxy().counters().dropped_datagrams >= 500);
    let lines = proxy_support::logged_lines(&[&format!("client={me} "), "end=limit_refused"]);
    assert!(!lines.is_empty(), "the refused client is in the access log");
    assert!(
        lines.len() <= seconds + 1,
        "{} access log lines for one refused client in {seconds} s:\n{}",
        lines.len(),
        lines.join("\n")
    );
}

#[test]
fn a_refused_udp_client_is_admitted_soon_after_a_place_frees_up() {
    let backend = UdpEcho::start("b").expect("start a UDP echo backend");
    let mut spec = ServiceSpec::udp(vec![backend.addr()]);
    spec.limits = ClientLimits {
        max_connections: Some(1),
        rate: None,
        burst: 0,
    };
    spec.idle_timeout = Duration::from_millis(300);
    spec.workers = 1;
    let h = Harness::start(spec);
    let mut buf = [0u8; 64];
    let holder = udp_from("127.0.0.4", h.vip);
    holder.send(b"one").expect("send");
    holder
        .recv(&mut buf)
        .expect("the first session is answered");
    let second = udp_from("127.0.0.4", h.vip);
    second
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    second.send(b"two").expect("send");
    assert!(
        wait_until(Duration::from_secs(10), || h.proxy().limited(SERVICE)
            >= Some(1)),
        "the second session of 127.0.0.4 was not refused"
    );
    // The holder goes quiet: its session expires after 300 ms, and the second client,
    // refused a moment ago, gets in within about a second of that.
    h.wait_idle();
    let freed = std::time::Instant::now();
    let answered = wait_until(Duration::from_secs(5), || {
        second.send(b"again").expect("send");
        matches!(second.recv(&mut buf), Ok(n) if &buf[..n] == b"b:again")
    });
    assert!(answered, "the second client was never admitted");
    assert!(
        freed.elapsed() < Duration::from_secs(3),
        "admitted {:?} after the place freed up",
        freed.elapsed()
    );
}

#[test]
fn udp_datagrams_with_no_backend_are_logged_once_a_second() {
    let mut spec = ServiceSpec::udp(Vec::new());
    spec.access_log = true;
    spec.workers = 1;
    let h = Harness::start(spec);
    let client = udp_from("127.0.0.5", h.vip);
    let me = client.local_addr().expect("the client's address");
    let started = std::time::Instant::now();
    if let Err(n) = flood(&client, 500, || h.proxy().counters().no_backend) {
        panic!("each datagram is counted as finding no backend; {n} of 500 were");
    }
    assert_eq!(
        h.proxy().counters().no_backend,
        500,
        "500 datagrams found no backend"
    );
    let seconds = started.elapsed().as_secs() as usize;
    let lines = proxy_support::logged_lines(&[&format!("client={me} "), "end=no_backend"]);
    assert!(
        !lines.is_empty(),
        "the dropped datagrams are in the access log"
    );
    assert!(
        lines.len() <= seconds + 1,
        "{} access log lines for one client in {seconds} s:\n{}",
        lines.len(),
        lines.join("\n")
    );
}
