//! This host's own addresses, and whether a backend address is one of the daemon's own
//! listen addresses (a backend that would send every flow back into the balancer).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

/// Every IPv4 and IPv6 address of the network namespace (`getifaddrs`, all interfaces).
///
/// Returns `Err` with the OS's reason when the list cannot be read.
pub fn local_addresses() -> Result<BTreeSet<IpAddr>, String> {
    let all = nix::ifaddrs::getifaddrs().map_err(|e| format!("getifaddrs: {e}"))?;
    Ok(all
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

/// Whether a connect to `backend` would reach the listener bound to `listen` on this host:
/// the same address, or the same port on a wildcard `listen` (`0.0.0.0` or `[::]`, which
/// takes both families) with `backend` on a loopback, wildcard or `local` address (`local`:
/// this host's addresses, [`local_addresses`]).
pub fn reaches_listener(backend: SocketAddr, listen: SocketAddr, local: &BTreeSet<IpAddr>) -> bool {
    if backend == listen {
        return true;
    }
    if backend.port() != listen.port() || !listen.ip().is_unspecified() {
        return false;
    }
    let ip = match backend.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback() || ip.is_unspecified() || local.contains(&ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("literal")
    }

    #[test]
    fn a_backend_reaches_a_listener_at_its_address_or_under_its_wildcard() {
        let local: BTreeSet<IpAddr> = ["192.0.2.7".parse().expect("literal")].into();
        assert!(reaches_listener(a("10.0.0.1:80"), a("10.0.0.1:80"), &local));
        assert!(!reaches_listener(
            a("10.0.0.1:81"),
            a("10.0.0.1:80"),
            &local
        ));
        assert!(!reaches_listener(
            a("10.0.0.2:80"),
            a("10.0.0.1:80"),
            &local
        ));
        for b in [
            "127.0.0.1:80",
            "192.0.2.7:80",
            "[::1]:80",
            "[::ffff:192.0.2.7]:80",
        ] {
            assert!(reaches_listener(a(b), a("0.0.0.0:80"), &local), "{b}");
            assert!(reaches_listener(a(b), a("[::]:80"), &local), "{b}");
        }
        assert!(!reaches_listener(
            a("192.0.2.8:80"),
            a("0.0.0.0:80"),
            &local
        ));
        assert!(!reaches_listener(
            a("127.0.0.1:8080"),
            a("0.0.0.0:80"),
            &local
        ));
    }

    #[test]
    fn loopback_is_among_the_local_addresses() {
        let local = local_addresses().expect("getifaddrs");
        assert!(local.contains(&IpAddr::from([127, 0, 0, 1])), "{local:?}");
    }
}
