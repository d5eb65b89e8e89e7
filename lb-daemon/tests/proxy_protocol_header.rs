//! PROXY protocol towards backends: a backend that parses the header sees the real client
//! address and port and the VIP, before any byte of the client (TCP v1 and v2), and at the
//! start of every datagram (UDP v2).

mod proxy_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use lb_daemon::config::ProxyProtocol;
use proxy_support::{in_private_network, udp_client, udp_socket, Harness, ServiceSpec, TcpBackend};

const TIMEOUT: Duration = Duration::from_secs(30);

/// What a backend learnt from a connection's header, and the bytes that followed it.
#[derive(Debug)]
struct Seen {
    client: SocketAddr,
    vip: SocketAddr,
    after: Vec<u8>,
}

fn v2_addresses(header: &ppp::v2::Header<'_>) -> (SocketAddr, SocketAddr) {
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => (
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ),
        ppp::v2::Addresses::IPv6(a) => (
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ),
        ref other => panic!("the header carries no IP addresses: {other:?}"),
    }
}

/// A TCP backend that parses a PROXY header of `version`, then reads 5 bytes of the client,
/// reports both, and answers "ok".
fn parsing_backend(version: ProxyProtocol, seen: mpsc::Sender<Seen>) -> TcpBackend {
    let seen = Mutex::new(seen);
    TcpBackend::start(move |mut s| {
        let (client, vip) = match version {
            ProxyProtocol::V1 => {
                let mut reader = BufReader::new(s.try_clone().expect("clone stream"));
                let mut line = String::new();
                reader.read_line(&mut line).expect("read the v1 header");
                let header = ppp::v1::Header::try_from(line.as_str()).expect("a valid v1 header");
                let (client, vip) = match header.addresses {
                    ppp::v1::Addresses::Tcp4(a) => (
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port)),
                    ),
                    other => panic!("unexpected v1 addresses {other:?}"),
                };
                // The client's bytes may already sit in the reader's buffer.
                let mut after = vec![0u8; 5];
                reader.read_exact(&mut after).expect("the client's bytes");
                let _ = seen.lock().expect("lock").send(Seen { client, vip, after });
                let _ = s.write_all(b"ok");
                return;
            }
            _ => {
                let mut fixed = [0u8; 16];
                s.read_exact(&mut fixed).expect("read the v2 header");
                let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
                let mut whole = fixed.to_vec();
                whole.resize(16 + len, 0);
                s.read_exact(&mut whole[16..])
                    .expect("read the v2 addresses");
                let header = ppp::v2::Header::try_from(&whole[..]).expect("a valid v2 header");
                assert_eq!(header.protocol, ppp::v2::Protocol::Stream);
                v2_addresses(&header)
            }
        };
        let mut after = vec![0u8; 5];
        s.read_exact(&mut after).expect("the client's bytes");
        let _ = seen.lock().expect("lock").send(Seen { client, vip, after });
        let _ = s.write_all(b"ok");
    })
}

fn tcp_case(version: ProxyProtocol) {
    let (tx, rx) = mpsc::channel();
    let backend = parsing_backend(version, tx);
    let mut spec = ServiceSpec::tcp(vec![backend.addr]);
    spec.proxy_protocol = version;
    let h = Harness::start(spec);
    let mut client = TcpStream::connect_timeout(&h.vip, Duration::from_secs(5)).expect("connect");
    client.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    // Written at once, before the proxy has connected to the backend: the header must still
    // come first.
    client.write_all(b"hello").expect("send");
    let mut reply = Vec::new();
    client
        .read_to_end(&mut reply)
        .expect("the backend's answer");
    assert_eq!(reply, b"ok");
    let seen = rx
        .recv_timeout(TIMEOUT)
        .expect("the backend parsed a header");
    assert_eq!(
        seen.client,
        client.local_addr().expect("client address"),
        "the backend sees the real client address and port"
    );
    assert_eq!(
        seen.vip, h.vip,
        "the backend sees the VIP the client connected to"
    );
    assert_eq!(
        seen.after, b"hello",
        "the client's bytes follow the header intact"
    );
    drop(client);
    h.wait_idle();
    assert_eq!(
        h.stats(0).bytes_to_backend.load(Ordering::Relaxed),
        5,
        "the header is not counted as client bytes"
    );
}

#[test]
fn a_tcp_backend_reads_the_client_address_from_a_v1_header() {
    tcp_case(ProxyProtocol::V1);
}

#[test]
fn a_tcp_backend_reads_the_client_address_from_a_v2_header() {
    tcp_case(ProxyProtocol::V2);
}

#[test]
fn behind_a_wildcard_listener_the_header_names_the_address_the_client_reached() {
    // On a TCP listener bound to 0.0.0.0 only the accepted socket knows which local address
    // the client reached (here 127.0.0.2, not 127.0.0.1 nor 0.0.0.0): that one is the VIP
    // the backend must see.
    in_private_network(|| {
        let (tx, rx) = mpsc::channel();
        let backend = parsing_backend(ProxyProtocol::V2, tx);
        let mut spec = ServiceSpec::tcp(vec![backend.addr]);
        spec.proxy_protocol = ProxyProtocol::V2;
        spec.listen = "0.0.0.0:0".parse().expect("literal address");
        let h = Harness::start(spec);
        let target = SocketAddr::from(([127, 0, 0, 2], h.vip.port()));
        let mut client = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .map_err(|e| format!("connect to {target}: {e}"))?;
        client
            .write_all(b"hello")
            .map_err(|e| format!("send: {e}"))?;
        let seen = rx
            .recv_timeout(TIMEOUT)
            .map_err(|e| format!("the backend parsed no header: {e}"))?;
        if seen.vip != target {
            return Err(format!(
                "the header names VIP {}, but the client connected to {target}",
                seen.vip
            ));
        }
        Ok(())
    })
    .expect("the backend sees the address the client reached");
}

#[test]
fn without_proxy_protocol_the_backend_gets_the_client_bytes_only() {
    let backend = TcpBackend::echo();
    let h = Harness::start(ServiceSpec::tcp(vec![backend.addr]));
    let mut client = TcpStream::connect_timeout(&h.vip, Duration::from_secs(5)).expect("connect");
    client.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    client.write_all(b"plain").expect("send");
    let mut back = [0u8; 5];
    client.read_exact(&mut back).expect("echo");
    assert_eq!(&back, b"plain", "nothing precedes the client's bytes");
}

/// A UDP backend that parses the v2 header at the start of each datagram and answers with
/// the client address it names, then the payload.
struct UdpParser {
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UdpParser {
    fn start() -> UdpParser {
        let socket: UdpSocket = udp_socket();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("address");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
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
                            let (client, vip) = v2_addresses(&h);
                            let mut r = format!("{client} {vip} ").into_bytes();
                            r.extend_from_slice(&buf[h.len()..n]);
                            r
                        }
                        Ok(_) => b"not a datagram header".to_vec(),
                        Err(_) => b"no header".to_vec(),
                    };
                    let _ = socket.send_to(&reply, from);
                }
            })
        };
        UdpParser {
            addr,
            thread: Some(thread),
            stop,
        }
    }
}

impl Drop for UdpParser {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn every_udp_datagram_carries_a_v2_header_with_the_client_address() {
    let backend = UdpParser::start();
    let mut spec = ServiceSpec::udp(vec![backend.addr]);
    spec.proxy_protocol = ProxyProtocol::V2;
    let h = Harness::start(spec);
    let client = udp_client(h.vip);
    let me = client.local_addr().expect("client address");
    let mut buf = vec![0u8; 2048];
    for k in 0..5 {
        let payload = format!("datagram {k}");
        client.send(payload.as_bytes()).expect("send");
        let n = client.recv(&mut buf).expect("the backend answers");
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]),
            format!("{me} {} {payload}", h.vip),
            "datagram {k}: the backend did not see the client's address in a v2 header"
        );
    }
    assert_eq!(
        h.stats(0).bytes_to_backend.load(Ordering::Relaxed),
        (0..5)
            .map(|k| format!("datagram {k}").len() as u64)
            .sum::<u64>(),
        "headers are not counted as client bytes"
    );
}
