//! A backend that proves what reached it and from whom: the hash server's protocol (read to
//! the client's half-close, answer `"{sha256} {len}\n"`), plus the peer address of every
//! connection, so a DSR test can see the client's real address.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::TcpServer;
use crate::data::Hasher;

/// How long the server waits for the next byte.
const IDLE: Duration = Duration::from_secs(30);

/// A hash server that records its clients' addresses.
pub struct PeerServer {
    server: TcpServer,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl PeerServer {
    /// Starts `name` on `addr` (call inside the backend's namespace).
    pub fn start_on(name: &str, addr: SocketAddr) -> io::Result<PeerServer> {
        let peers = Arc::new(Mutex::new(Vec::new()));
        let p = peers.clone();
        let server = TcpServer::start_on(
            name,
            addr,
            Arc::new(move |s: TcpStream| {
                if let Ok(peer) = s.peer_addr() {
                    p.lock().expect("peers lock").push(peer);
                }
                serve(s);
            }),
        )?;
        Ok(PeerServer { server, peers })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.server.name()
    }

    /// The source address of every connection accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers lock").clone()
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }

    /// Connections accepted since start (health checks included).
    pub fn accepted(&self) -> u64 {
        self.server.accepted()
    }

    /// Closes the listener (new connections are refused; open ones go on).
    pub fn stop(&mut self) {
        self.server.stop();
    }
}

fn serve(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(IDLE));
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
    let receipt = hasher.finish();
    let _ = stream.write_all(format!("{receipt}\n").as_bytes());
    let _ = stream.shutdown(Shutdown::Both);
}

/// From a new UDP socket (a new client port) connected to `vip`, sends each of `payloads`
/// and waits up to `timeout` for each reply; returns the replies. Call inside the client's
/// namespace. `Err` on a socket error or a missing reply.
pub fn udp_exchange(
    vip: SocketAddr,
    payloads: &[Vec<u8>],
    timeout: Duration,
) -> io::Result<Vec<Vec<u8>>> {
    let any: SocketAddr = if vip.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any)?;
    socket.connect(vip)?;
    socket.set_read_timeout(Some(timeout))?;
    let mut replies = Vec::with_capacity(payloads.len());
    let mut buf = vec![0u8; 65536];
    for p in payloads {
        socket.send(p)?;
        let n = socket.recv(&mut buf)?;
        replies.push(buf[..n].to_vec());
    }
    Ok(replies)
}
