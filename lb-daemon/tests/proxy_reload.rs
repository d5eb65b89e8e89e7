//! Services added to and removed from a running proxy (the hot-reload API): a new service
//! is carried at once, a bind error is reported, a removed service takes no new flows while
//! its open ones finish or are cut at the drain deadline, and its address can be taken over.

mod proxy_support;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use lb_daemon::dataplane::proxy::ProxyError;
use lb_daemon::dataplane::ServiceHandle;
use lb_tests::UdpEcho;
use proxy_support::{
    republish_snapshot, udp_client, wait_until, Harness, ServiceSpec, TcpBackend, SERVICE,
};

const TIMEOUT: Duration = Duration::from_secs(30);

fn connect(vip: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&vip, Duration::from_secs(5)).expect("connect to the VIP");
    s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    s
}

/// Sends `msg` and reads the echo back.
fn echo(s: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}

/// A backend that answers every connection with its `name`, then closes.
fn named(name: &'static str) -> TcpBackend {
    TcpBackend::start(move |mut s| {
        let _ = s.write_all(name.as_bytes());
    })
}

fn read_name(vip: SocketAddr) -> String {
    let mut s = connect(vip);
    let mut name = String::new();
    s.read_to_string(&mut name)
        .expect("read the backend's name");
    name
}

#[test]
fn an_added_service_is_carried_on_its_own_port() {
    let first = TcpBackend::echo();
    let h = Harness::start(ServiceSpec::tcp(vec![first.addr]));
    let second = named("second");
    let spec = ServiceSpec::tcp(vec![second.addr]);
    h.proxy()
        .add_service(ServiceHandle {
            index: 8,
            snapshot: spec.snapshot("added"),
        })
        .expect("a service on a free port can be added");
    let vip = h
        .proxy()
        .listen_addr(8)
        .expect("the proxy knows where the added service listens");
    assert_ne!(vip, h.vip, "the added service got a port of its own");
    assert_eq!(
        read_name(vip),
        "second",
        "the added service reaches its backend"
    );
    let mut old = connect(h.vip);
    assert_eq!(
        echo(&mut old, b"still here").expect("echo"),
        b"still here",
        "the service that was there before is not disturbed"
    );
}

#[test]
fn adding_a_service_on_a_taken_address_reports_the_bind_error() {
    let backend = TcpBackend::echo();
    let h = Harness::start(ServiceSpec::tcp(vec![backend.addr]));
    // Bound without SO_REUSEPORT: the proxy's listeners cannot share it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("its address");
    let mut spec = ServiceSpec::tcp(vec![backend.addr]);
    spec.listen = addr;
    match h.proxy().add_service(ServiceHandle {
        index: 8,
        snapshot: spec.snapshot("taken"),
    }) {
        Err(ProxyError::Bind { addr: a, source }) => {
            assert_eq!(a, addr, "the error names the service's address");
            assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
        }
        Err(e) => panic!("expected a bind error, got {e}"),
        Ok(()) => panic!("a port held without SO_REUSEPORT must not be shared"),
    }
    assert_eq!(
        h.proxy().listen_addr(8),
        None,
        "a service that failed to start is not listed"
    );
    let mut c = connect(h.vip);
    assert_eq!(echo(&mut c, b"ok").expect("echo"), b"ok");
}

#[test]
fn adding_a_service_number_twice_is_refused() {
    let backend = TcpBackend::echo();
    let h = Harness::start(ServiceSpec::tcp(vec![backend.addr]));
    let spec = ServiceSpec::tcp(vec![backend.addr]);
    match h.proxy().add_service(ServiceHandle {
        index: SERVICE,
        snapshot: spec.snapshot("again"),
    }) {
        Err(ProxyError::DuplicateService(i)) => assert_eq!(i, SERVICE),
        Err(e) => panic!("expected a duplicate-service error, got {e}"),
        Ok(()) => panic!("a service number must be unique"),
    }
}

#[test]
fn a_removed_service_refuses_new_connections_and_lets_open_ones_finish() {
    let backend = TcpBackend::echo();
    let h = Harness::start(ServiceSpec::tcp(vec![backend.addr]));
    let mut open = connect(h.vip);
    assert_eq!(echo(&mut open, b"before").expect("echo"), b"before");
    h.proxy().remove_service(SERVICE, Duration::from_secs(60));
    assert_eq!(h.proxy().listen_addr(SERVICE), None, "the service is gone");
    match TcpStream::connect_timeout(&h.vip, Duration::from_secs(5)) {
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionRefused,
            "the listener is closed when remove_service returns"
        ),
        Ok(_) => panic!("a new connection to a removed service was accepted"),
    }
    assert_eq!(
        echo(&mut open, b"after").expect("the open connection still works"),
        b"after",
        "a connection opened before the removal carries on"
    );
    drop(open);
    h.wait_idle();
}

#[test]
fn a_removed_service_cuts_its_connections_at_the_drain_deadline() {
    let backend = TcpBackend::echo();
    let h = Harness::start(ServiceSpec::tcp(vec![backend.addr]));
    let mut open = connect(h.vip);
    assert_eq!(echo(&mut open, b"x").expect("echo"), b"x");
    h.proxy()
        .remove_service(SERVICE, Duration::from_millis(200));
    let mut buf = [0u8; 8];
    match open.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection should be cut at the drain deadline, got {other:?}"),
    }
    h.wait_idle();
}

#[test]
fn a_service_added_on_a_removed_services_address_takes_it_over() {
    let old = named("old");
    let h = Harness::start(ServiceSpec::tcp(vec![old.addr]));
    assert_eq!(read_name(h.vip), "old");
    h.proxy().remove_service(SERVICE, Duration::from_secs(60));
    let new = named("new");
    let mut spec = ServiceSpec::tcp(vec![new.addr]);
    spec.listen = h.vip;
    h.proxy()
        .add_service(ServiceHandle {
            index: 8,
            snapshot: spec.snapshot("new"),
        })
        .expect("the removed service's address is free again");
    for _ in 0..10 {
        assert_eq!(
            read_name(h.vip),
            "new",
            "a new connection reached the removed service's backend"
        );
    }
}

#[test]
fn a_removed_udp_service_keeps_its_sessions_and_a_successor_takes_new_clients() {
    let old = UdpEcho::start("old").expect("start a UDP echo backend");
    let h = Harness::start(ServiceSpec::udp(vec![old.addr()]));
    let before = udp_client(h.vip);
    let mut buf = [0u8; 64];
    before.send(b"a").expect("send");
    let n = before.recv(&mut buf).expect("the session is answered");
    assert_eq!(&buf[..n], b"old:a");

    h.proxy().remove_service(SERVICE, Duration::from_secs(60));
    // A new client of a removed service gets nothing: its datagrams are dropped.
    let stranger = udp_client(h.vip);
    stranger
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("read timeout");
    stranger.send(b"b").expect("send");
    assert!(
        stranger.recv(&mut buf).is_err(),
        "a removed service started a session for a new client"
    );
    before.send(b"c").expect("send");
    let n = before
        .recv(&mut buf)
        .expect("the open session is still answered");
    assert_eq!(&buf[..n], b"old:c", "the open session stays on its backend");

    let new = UdpEcho::start("new").expect("start a UDP echo backend");
    let mut spec = ServiceSpec::udp(vec![new.addr()]);
    spec.listen = h.vip;
    h.proxy()
        .add_service(ServiceHandle {
            index: 8,
            snapshot: spec.snapshot("new"),
        })
        .expect("a UDP service can be added on the draining service's address");
    let (tx, rx) = mpsc::channel();
    for k in 0..8u8 {
        let c = udp_client(h.vip);
        c.send(&[b'0' + k]).expect("send");
        let n = c.recv(&mut buf).expect("a new client is answered");
        tx.send(buf[..n].to_vec()).expect("collect");
    }
    drop(tx);
    for reply in rx {
        assert!(
            reply.starts_with(b"new:"),
            "a new client was served by the removed service: {}",
            String::from_utf8_lossy(&reply)
        );
    }
    // No check of `before` here: the SO_REUSEPORT group grew, so the kernel may now hash
    // its datagrams to a new socket, where they start a session on the new service.
    assert!(
        wait_until(Duration::from_secs(5), || h
            .proxy()
            .listen_addr(8)
            .is_some()),
        "the new service is listed"
    );
}

#[test]
fn a_successors_sessions_leave_a_backend_that_went_down_whichever_socket_they_reach() {
    // One worker, two sockets in the address's SO_REUSEPORT group: the removed service's
    // (kept open by a session) and its successor's. The kernel hashes some clients to the
    // old one; their sessions live on the successor all the same, and must be subject to
    // the same checks.
    let old = UdpEcho::start("old").expect("start a UDP echo backend");
    let mut spec = ServiceSpec::udp(vec![old.addr()]);
    spec.workers = 1;
    let h = Harness::start(spec);
    let holder = udp_client(h.vip);
    let mut buf = [0u8; 64];
    holder.send(b"a").expect("send");
    holder.recv(&mut buf).expect("the old service answers");
    h.proxy().remove_service(SERVICE, Duration::from_secs(60));

    let (b0, b1) = (
        UdpEcho::start("b0").expect("start a UDP echo backend"),
        UdpEcho::start("b1").expect("start a UDP echo backend"),
    );
    let mut spec = ServiceSpec::udp(vec![b0.addr(), b1.addr()]);
    spec.listen = h.vip;
    let snapshot = spec.snapshot("successor");
    republish_snapshot(&snapshot, 0, |_| {});
    h.proxy()
        .add_service(ServiceHandle {
            index: 8,
            snapshot: snapshot.clone(),
        })
        .expect("a UDP service can be added on the removed service's address");
    let clients: Vec<_> = (0..16).map(|_| udp_client(h.vip)).collect();
    for (k, c) in clients.iter().enumerate() {
        c.send(b"x").expect("send");
        let n = c.recv(&mut buf).expect("a new client is answered");
        assert_eq!(&buf[..n], b"b0:x", "client {k} is on b0, the only choice");
    }

    // b0 goes DOWN; new flows go to b1. Every client's next datagram must leave b0.
    republish_snapshot(&snapshot, 1, |b| b.up = false);
    for (k, c) in clients.iter().enumerate() {
        c.send(b"y").expect("send");
        let n = c.recv(&mut buf).expect("the client is answered");
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]),
            "b1:y",
            "client {k} was still sent to b0 after it went DOWN"
        );
    }
    assert!(
        wait_until(Duration::from_secs(5), || snapshot.load().backends[0]
            .stats
            .active()
            == 0),
        "b0 still has {} session(s)",
        snapshot.load().backends[0].stats.active()
    );
}
