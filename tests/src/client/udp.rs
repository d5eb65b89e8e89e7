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

/// The path MTU the kernel has learnt towards `vip` after datagrams that make `packet`-byte IP
/// packets with "don't fragment" (IPv4 DF, IPv6 never fragments at a router) are sent to it
/// from a new socket: asked after each send, every 200 ms, until it is below `packet` or 3 s
/// passed. A balancer's "fragmentation needed" / "packet too big" lowers it; `packet` (or the
/// link's MTU) when none arrived intact.
///
/// Returns `Err` when the socket cannot be made, connected or set up.
pub fn learnt_path_mtu(vip: SocketAddr, packet: usize) -> io::Result<i32> {
    use std::os::fd::AsRawFd;
    use std::time::Instant;
    let (any, level, discover_opt, discover, mtu_opt, headers): (SocketAddr, _, _, _, _, usize) =
        if vip.is_ipv4() {
            (
                (Ipv4Addr::UNSPECIFIED, 0).into(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DO,
                libc::IP_MTU,
                28,
            )
        } else {
            (
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DO,
                libc::IPV6_MTU,
                48,
            )
        };
    let socket = UdpSocket::bind(any)?;
    socket.connect(vip)?;
    let fd = socket.as_raw_fd();
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            discover_opt,
            (&discover as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mtu = || -> io::Result<i32> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a live c_int with its size.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                mtu_opt,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    };
    let datagram = vec![0x5a_u8; packet.saturating_sub(headers)];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = mtu()?;
        if (now as usize) < packet || Instant::now() >= deadline {
            return Ok(now);
        }
        // EMSGSIZE once a smaller MTU is known: the next round reads it.
        let _ = socket.send(&datagram);
        std::thread::sleep(Duration::from_millis(200));
    }
}
