//! Per-client limits through the daemon (`[service.limits]`): a client address over its
//! concurrent-connection limit or its new-connection rate is refused, and a client at another
//! address is served as before.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use lb_tests::backend::TcpServer;
use lb_tests::client::{connect_from, ClientError};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::ports::free_addr;
use lb_tests::Daemon;
use toml::{Table, Value};

fn echo_server() -> TcpServer {
    TcpServer::start(
        "echo",
        Arc::new(|mut s: TcpStream| {
            let mut r = s.try_clone().expect("clone the stream");
            let _ = io::copy(&mut r, &mut s);
        }),
    )
    .expect("the echo backend starts")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

/// A limited echo service; `limits` are `[service.limits]` keys.
fn start(limits: &[(&str, Value)]) -> (Daemon, SocketAddr, TcpServer) {
    let backend = echo_server();
    let vip = free_addr();
    let mut table = Table::new();
    for (k, v) in limits {
        table.insert((*k).into(), v.clone());
    }
    let svc = ServiceConfig::tcp("web", vip)
        .set("limits", Value::Table(table))
        .health("kind", "none")
        .backend(backend.addr(), 1);
    let daemon = Daemon::start(&DaemonConfig::new().service(svc).to_toml());
    (daemon, vip, backend)
}

/// Whether an echo round trip works on `s`.
fn served(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut back = [0u8; 4];
    matches!(s.read_exact(&mut back), Ok(()) if &back == b"ping")
}

/// Whether a connection from `from` is refused: reset at connect, or closed before any byte
/// comes back.
fn refused(from: &str, vip: SocketAddr) -> bool {
    match connect_from(Some(ip(from)), vip) {
        Err(ClientError::Connect(e)) => e.kind() == io::ErrorKind::ConnectionReset,
        Err(_) => false,
        Ok(mut s) => {
            let _ = s.write_all(b"ping");
            let mut buf = [0u8; 4];
            match s.read(&mut buf) {
                Ok(0) => true,
                Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        }
    }
}

#[test]
fn a_client_over_its_connection_limit_is_refused_and_another_is_not() {
    let (daemon, vip, backend) = start(&[("max_connections_per_client", Value::Integer(2))]);
    let mut held: Vec<TcpStream> = (0..2)
        .map(|k| {
            let mut s = connect_from(Some(ip("127.0.0.1")), vip)
                .unwrap_or_else(|e| panic!("connection {k} from 127.0.0.1: {e}"));
            assert!(served(&mut s), "connection {k} within the limit is served");
            s
        })
        .collect();
    assert!(
        refused("127.0.0.1", vip),
        "a third concurrent connection from 127.0.0.1 was served; the limit is 2"
    );
    let mut other = connect_from(Some(ip("127.0.0.2")), vip).expect("connect from 127.0.0.2");
    assert!(
        served(&mut other),
        "127.0.0.2 was refused because of 127.0.0.1's connections"
    );
    assert_eq!(
        backend.accepted(),
        3,
        "the refused connection must not reach the backend"
    );
    held.clear();
    // Once the proxy has closed them, 127.0.0.1 is under its limit again.
    let mut again = None;
    for _ in 0..100 {
        let mut s = connect_from(Some(ip("127.0.0.1")), vip).ok();
        if s.as_mut().is_some_and(served) {
            again = s;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        again.is_some(),
        "127.0.0.1 stayed refused after closing its connections; daemon log:\n{}",
        daemon.logs().join("\n")
    );
}

#[test]
fn a_client_over_its_rate_is_refused_after_its_burst_and_another_is_not() {
    // One new connection per 100 s after a burst of 3: nothing refills during the test.
    let (_daemon, vip, _backend) = start(&[
        ("new_connections_per_second", Value::Float(0.01)),
        ("burst", Value::Integer(3)),
    ]);
    for k in 0..3 {
        let mut s = connect_from(Some(ip("127.0.0.1")), vip)
            .unwrap_or_else(|e| panic!("connection {k} of the burst: {e}"));
        assert!(served(&mut s), "connection {k} of the burst is served");
    }
    assert!(
        refused("127.0.0.1", vip),
        "a fourth new connection from 127.0.0.1 was served; the burst is 3"
    );
    let mut other = connect_from(Some(ip("127.0.0.3")), vip).expect("connect from 127.0.0.3");
    assert!(
        served(&mut other),
        "127.0.0.3 was refused because of 127.0.0.1's rate"
    );
}

/// `max_connections` caps the service's open connections whoever opens them: over it every
/// client is refused with a reset, and a closed connection makes room again.
#[test]
fn a_service_at_its_max_connections_refuses_every_client_until_one_closes() {
    let backend = echo_server();
    let vip = free_addr();
    let svc = ServiceConfig::tcp("web", vip)
        .set("max_connections", 3)
        .health("kind", "none")
        .backend(backend.addr(), 1);
    let daemon = Daemon::start(&DaemonConfig::new().service(svc).to_toml());
    let mut held: Vec<TcpStream> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|from| {
            let mut s = connect_from(Some(ip(from)), vip)
                .unwrap_or_else(|e| panic!("connection from {from} under the cap: {e}"));
            assert!(served(&mut s), "a connection under the cap is served");
            s
        })
        .collect();
    for from in ["127.0.0.4", "127.0.0.1"] {
        assert!(
            refused(from, vip),
            "a fourth connection (from {from}) was served; the service's cap is 3. Log:\n{}",
            daemon.logs().join("\n")
        );
    }
    drop(held.pop());
    // The backend sees the close a moment after the client does.
    let mut again = None;
    for _ in 0..50 {
        if let Ok(mut s) = connect_from(Some(ip("127.0.0.4")), vip) {
            if served(&mut s) {
                again = Some(s);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        again.is_some(),
        "no connection was served within 5 s after one of the 3 closed"
    );
}

/// `max_sessions` caps a UDP service's sessions: a client over it gets no session (its
/// datagrams are dropped), the ones under it are answered.
#[test]
fn a_udp_service_at_its_max_sessions_drops_a_new_clients_datagrams() {
    let echo = lb_tests::UdpEcho::start("u1").expect("a UDP echo backend starts");
    let vip = free_addr();
    let svc = ServiceConfig::udp("dns", vip)
        .set("max_sessions", 2)
        .health("kind", "none")
        .backend(echo.addr(), 1);
    let _daemon = Daemon::start(&DaemonConfig::new().service(svc).to_toml());
    let ask = |socket: &std::net::UdpSocket| -> bool {
        let mut buf = [0u8; 512];
        (0..3).any(|_| {
            socket.send_to(b"q", vip).is_ok()
                && socket
                    .recv_from(&mut buf)
                    .is_ok_and(|(n, from)| from == vip && n > 0)
        })
    };
    let clients: Vec<std::net::UdpSocket> = (0..3)
        .map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a client");
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .expect("read timeout");
            s
        })
        .collect();
    assert!(ask(&clients[0]), "the first session is answered");
    assert!(ask(&clients[1]), "the second session is answered");
    assert!(
        !ask(&clients[2]),
        "a third client got a session; the service's cap is 2"
    );
    assert!(
        ask(&clients[0]),
        "a client with a session is still answered at the cap"
    );
}
