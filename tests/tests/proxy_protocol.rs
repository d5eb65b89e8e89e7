//! PROXY protocol through the daemon: a backend that parses the header sees the real client
//! address and port (and the VIP), over TCP with v1 and v2, and on every UDP datagram with v2.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use lb_tests::backend::TcpServer;
use lb_tests::client::connect;
use lb_tests::client::UdpClient;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::ports::free_addr;
use lb_tests::Daemon;

/// The client and VIP addresses a v2 header names.
fn v2_addresses(header: &ppp::v2::Header<'_>) -> Option<(SocketAddr, SocketAddr)> {
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        ppp::v2::Addresses::IPv6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        _ => None,
    }
}

/// Reads a PROXY header of either version from `s`; returns (client, VIP) and a reader
/// positioned after it.
fn read_header(s: TcpStream) -> Option<(SocketAddr, SocketAddr, BufReader<TcpStream>)> {
    let mut reader = BufReader::new(s);
    let first = reader.fill_buf().ok()?.first().copied()?;
    if first == b'P' {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let header = ppp::v1::Header::try_from(line.as_str()).ok()?;
        let (client, vip) = match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => (
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            ppp::v1::Addresses::Tcp6(a) => (
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            ppp::v1::Addresses::Unknown => return None,
        };
        Some((client, vip, reader))
    } else {
        let mut fixed = [0u8; 16];
        reader.read_exact(&mut fixed).ok()?;
        let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let mut whole = fixed.to_vec();
        whole.resize(16 + len, 0);
        reader.read_exact(&mut whole[16..]).ok()?;
        let header = ppp::v2::Header::try_from(&whole[..]).ok()?;
        let (client, vip) = v2_addresses(&header)?;
        Some((client, vip, reader))
    }
}

/// A backend that answers `client=ADDR vip=ADDR first=BYTES` from the header and the first
/// four bytes after it, or `no header`.
fn header_reporter() -> TcpServer {
    TcpServer::start(
        "pp",
        Arc::new(|s: TcpStream| {
            let mut out = s.try_clone().expect("clone the stream");
            let answer = match read_header(s) {
                Some((client, vip, mut rest)) => {
                    let mut first = [0u8; 4];
                    match rest.read_exact(&mut first) {
                        Ok(()) => format!(
                            "client={client} vip={vip} first={}",
                            String::from_utf8_lossy(&first)
                        ),
                        Err(e) => format!("no client bytes after the header: {e}"),
                    }
                }
                None => "no header".to_string(),
            };
            let _ = out.write_all(answer.as_bytes());
        }),
    )
    .expect("the backend starts")
}

fn tcp_case(version: &str) {
    let backend = header_reporter();
    let vip = free_addr();
    let svc = ServiceConfig::tcp("web", vip)
        .set("proxy_protocol", version)
        .backend(backend.addr(), 1);
    let _daemon = Daemon::start(&DaemonConfig::new().service(svc).to_toml());
    for _ in 0..3 {
        let mut c = connect(vip).expect("connect to the VIP");
        let me = c.local_addr().expect("client address");
        c.write_all(b"ping").expect("send");
        let mut answer = String::new();
        c.read_to_string(&mut answer).expect("the backend's answer");
        assert_eq!(
            answer,
            format!("client={me} vip={vip} first=ping"),
            "with proxy_protocol = {version:?} the backend must see the client's own address \
             and port, the VIP, then the client's bytes"
        );
    }
}

/// A backend that, like nginx's `listen ... proxy_protocol`, closes a connection that does not
/// start with a PROXY header (of either version, addresses or not), and answers one that
/// does with `HTTP/1.1 200` and `ok`.
fn header_requiring_http() -> TcpServer {
    TcpServer::start(
        "pp-http",
        Arc::new(|s: TcpStream| {
            let mut out = s.try_clone().expect("clone the stream");
            let mut reader = BufReader::new(s);
            let Ok(first) = reader.fill_buf().map(|b| b.first().copied()) else {
                return;
            };
            match first {
                Some(b'P') => {
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() || !line.starts_with("PROXY ") {
                        return;
                    }
                }
                Some(b'\r') => {
                    let mut fixed = [0u8; 16];
                    if reader.read_exact(&mut fixed).is_err() || fixed[..12] != V2_SIGNATURE {
                        return;
                    }
                    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
                    let mut rest = vec![0u8; len];
                    if reader.read_exact(&mut rest).is_err() {
                        return;
                    }
                }
                _ => return,
            }
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let _ = out
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }),
    )
    .expect("the backend starts")
}

/// The first 12 bytes of every PROXY protocol v2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// HTTP health checks of a service with `proxy_protocol` send the header too (HAProxy does for
/// a `send-proxy` server): a backend that requires it stays up, and serves the clients.
fn checks_case(version: &str) {
    let backend = header_requiring_http();
    let vip = free_addr();
    let svc = ServiceConfig::tcp("web", vip)
        .set("proxy_protocol", version)
        .fast_health("http")
        .backend(backend.addr(), 1);
    let daemon = Daemon::start(&DaemonConfig::new().service(svc).to_toml());
    // Checks every 200 ms, down after 2 failures: a backend whose checks fail is down well
    // within this.
    std::thread::sleep(Duration::from_millis(1500));
    for _ in 0..3 {
        let body = lb_tests::client::http_get(vip, "/").unwrap_or_else(|e| {
            panic!(
                "with proxy_protocol = {version:?} and HTTP checks the backend must stay up and \
                 answer: {e}. Daemon log:\n{}",
                daemon.logs().join("\n")
            )
        });
        assert_eq!(body, "ok");
    }
}

#[test]
fn http_health_checks_send_the_v1_header_and_the_backend_stays_up() {
    checks_case("v1");
}

#[test]
fn http_health_checks_send_the_v2_header_and_the_backend_stays_up() {
    checks_case("v2");
}

#[test]
fn a_tcp_backend_sees_the_real_client_address_with_v1() {
    tcp_case("v1");
}

#[test]
fn a_tcp_backend_sees_the_real_client_address_with_v2() {
    tcp_case("v2");
}

/// A UDP backend answering each datagram with the client address its v2 header names and
/// the payload after it, or `no header`.
struct UdpReporter {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpReporter {
    fn start() -> UdpReporter {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the backend");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("backend address");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::SeqCst) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let reply = match ppp::v2::Header::try_from(&buf[..n]) {
                        Ok(h) if h.protocol == ppp::v2::Protocol::Datagram => {
                            match v2_addresses(&h) {
                                Some((client, vip)) => {
                                    let mut r = format!("client={client} vip={vip} ").into_bytes();
                                    r.extend_from_slice(&buf[h.len()..n]);
                                    r
                                }
                                None => b"no addresses".to_vec(),
                            }
                        }
                        _ => b"no header".to_vec(),
                    };
                    let _ = socket.send_to(&reply, from);
                }
            })
        };
        UdpReporter {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpReporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn every_udp_datagram_tells_the_backend_the_real_client_address_with_v2() {
    let backend = UdpReporter::start();
    let vip = free_addr();
    let svc = ServiceConfig::udp("dns", vip)
        .set("proxy_protocol", "v2")
        .backend(backend.addr, 1);
    let _daemon = Daemon::start(&DaemonConfig::new().service(svc).to_toml());
    let c = UdpClient::new(vip).expect("a UDP client");
    let me = c.local_addr().expect("client address");
    for k in 0..5 {
        let payload = format!("query {k}");
        let reply = c
            .request(payload.as_bytes(), Duration::from_secs(5))
            .expect("the backend answers through the VIP");
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("client={me} vip={vip} {payload}"),
            "datagram {k} did not carry a v2 header naming the client"
        );
    }
}
