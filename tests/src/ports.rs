//! Free loopback ports for test servers and VIPs.
//!
//! Ports come from below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), so an
//! outgoing connection of this or another test can never be handed a port a test is about to
//! listen on; a server stopped and restarted on its port gets it back. Each process starts at
//! its own offset (from its pid) and walks forward, checking that TCP and UDP can both bind.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The lowest port handed out.
const FIRST: u16 = 20_000;
/// How many candidates [`free_port`] tries before it gives up.
const ATTEMPTS: u32 = 2_000;

/// Why no port was found.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Every candidate was taken.
    #[error("no free loopback port for TCP and UDP among {0} candidates")]
    Exhausted(u32),
}

/// A port on 127.0.0.1 that TCP and UDP could both bind at the time of the call, below the
/// ephemeral range. Never returns the same port twice within a process (until the range wraps).
///
/// Panics when none is free after 2,000 candidates; use [`try_free_port`] to handle that.
pub fn free_port() -> u16 {
    try_free_port().expect("the loopback port range below the ephemeral ports is exhausted")
}

/// `127.0.0.1:{free_port()}`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, free_port()))
}

/// Like [`free_port`]; returns `Err(PortError::Exhausted)` instead of panicking.
pub fn try_free_port() -> Result<u16, PortError> {
    static CURSOR: OnceLock<AtomicU32> = OnceLock::new();
    let (first, span) = range();
    let cursor =
        CURSOR.get_or_init(|| AtomicU32::new(std::process::id().wrapping_mul(7_919) % span));
    for _ in 0..ATTEMPTS {
        let port = first + (cursor.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if bindable(port) {
            return Ok(port);
        }
    }
    Err(PortError::Exhausted(ATTEMPTS))
}

/// `(first port, number of ports)` below the ephemeral range.
fn range() -> (u16, u32) {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if low > FIRST + 1_000 {
        (FIRST, u32::from(low - FIRST))
    } else {
        // A host with a wide ephemeral range: use the top of the port space instead.
        (61_000, 4_000)
    }
}

fn bindable(port: u16) -> bool {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b, "free_port handed out {a} twice in a row");
        let (first, span) = range();
        for p in [a, b] {
            assert!(
                u32::from(p) >= u32::from(first) && u32::from(p) < u32::from(first) + span,
                "port {p} is outside the range below the ephemeral ports"
            );
            TcpListener::bind(("127.0.0.1", p)).expect("a free port binds for TCP");
        }
    }
}
