//! A UDP echo server that signs its replies: each datagram comes back as
//! `"{name}:" + payload`, so a client can tell which backend answered.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The socket buffer size asked for, bytes.
const BUFFER: usize = 4 * 1024 * 1024;

/// The UDP echo server; stoppable (the port is closed, so datagrams to it draw an ICMP port
/// unreachable) and restartable on the same port.
pub struct UdpEcho {
    name: String,
    addr: SocketAddr,
    datagrams: Arc<AtomicU64>,
    running: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl UdpEcho {
    /// Starts `name` on a free loopback port. Returns the bind error if it cannot.
    pub fn start(name: &str) -> io::Result<UdpEcho> {
        super::on_free_port(|addr| Self::start_on(name, addr))
    }

    /// Starts `name` on `addr` (loopback).
    pub fn start_on(name: &str, addr: SocketAddr) -> io::Result<UdpEcho> {
        let mut echo = UdpEcho {
            name: name.to_string(),
            addr,
            datagrams: Arc::new(AtomicU64::new(0)),
            running: None,
        };
        echo.bind(Duration::ZERO)?;
        Ok(echo)
    }

    /// The name it signs replies with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams answered (replies sent) since start.
    pub fn datagrams(&self) -> u64 {
        self.datagrams.load(Ordering::Relaxed)
    }

    /// Whether its socket is open.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Closes the socket. Does nothing when already stopped.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }

    /// Opens the same port again; retries the bind for up to 3 s.
    pub fn restart(&mut self) -> io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        self.bind(Duration::from_secs(3))
    }

    fn bind(&mut self, retry_for: Duration) -> io::Result<()> {
        let deadline = Instant::now() + retry_for;
        let socket = loop {
            match UdpSocket::bind(self.addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        // Large buffers, so that a test's own bursts are not dropped at the server; best
        // effort (the kernel caps them at net.core.[rw]mem_max).
        let sock = socket2::SockRef::from(&socket);
        let _ = sock.set_recv_buffer_size(BUFFER);
        let _ = sock.set_send_buffer_size(BUFFER);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let count = self.datagrams.clone();
            let prefix = format!("{}:", self.name);
            std::thread::Builder::new()
                .name(format!("{}-udp", self.name))
                .spawn(move || echo_loop(&socket, prefix.as_bytes(), &stop, &count))?
        };
        self.running = Some((stop, thread));
        Ok(())
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop();
    }
}

fn echo_loop(socket: &UdpSocket, prefix: &[u8], stop: &AtomicBool, count: &AtomicU64) {
    let mut buf = vec![0u8; 65_536];
    let mut reply = Vec::with_capacity(65_536 + prefix.len());
    while !stop.load(Ordering::Relaxed) {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            // Timeouts let the loop see the stop flag; ICMP errors from a gone client are
            // reported on the next receive and mean nothing to the server.
            Err(_) => continue,
        };
        reply.clear();
        reply.extend_from_slice(prefix);
        reply.extend_from_slice(&buf[..n]);
        // Counted before the reply goes out, so a client that has its answer sees the count.
        count.fetch_add(1, Ordering::Relaxed);
        let _ = socket.send_to(&reply, peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::udp_request;

    #[test]
    fn replies_are_signed_with_the_name() {
        let mut echo = UdpEcho::start("u1").expect("starts");
        let reply = udp_request(echo.addr(), b"ping", Duration::from_secs(2)).expect("echoed");
        assert_eq!(reply, b"u1:ping");
        echo.stop();
        assert!(
            udp_request(echo.addr(), b"ping", Duration::from_millis(300)).is_err(),
            "a stopped UDP echo still answered"
        );
        echo.restart().expect("restarts on its port");
        let reply = udp_request(echo.addr(), b"again", Duration::from_secs(2)).expect("echoed");
        assert_eq!(reply, b"u1:again");
        assert_eq!(echo.datagrams(), 2);
    }
}
