//! UDP request/reply through a VIP.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use super::ClientError;

/// Sends `payload` from a new socket (a new client, so a new session at the balancer) and
/// returns the first reply within `timeout`.
pub fn udp_request(
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    UdpClient::new(addr)?.request(payload, timeout)
}

/// One UDP client socket on 127.0.0.1, connected to a VIP: all its datagrams share one
/// source port, so the balancer sees one client.
pub struct UdpClient {
    socket: UdpSocket,
}

impl UdpClient {
    /// A socket bound to `127.0.0.1:0` and connected to `addr`.
    pub fn new(addr: SocketAddr) -> Result<UdpClient, ClientError> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(ClientError::Connect)?;
        socket.connect(addr).map_err(ClientError::Connect)?;
        Ok(UdpClient { socket })
    }

    /// The client's own address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends one datagram.
    pub fn send(&self, payload: &[u8]) -> Result<(), ClientError> {
        self.socket.send(payload)?;
        Ok(())
    }

    /// Waits up to `timeout` for one datagram; `Ok(None)` when none came in time.
    /// An ICMP error queued on the socket (port unreachable) is `Err(ClientError::Io)`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>, ClientError> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buf = vec![0u8; 65_536];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `payload` and returns the first reply within `timeout`;
    /// `ClientError::BadResponse` when none came.
    pub fn request(&self, payload: &[u8], timeout: Duration) -> Result<Vec<u8>, ClientError> {
        self.send(payload)?;
        self.recv(timeout)?
            .ok_or_else(|| ClientError::BadResponse(format!("no UDP reply within {timeout:?}")))
    }
}
