//! PROXY protocol headers (HAProxy's spec, versions 1 and 2) that tell a backend the
//! client's address and the VIP it connected to, encoded with the `ppp` crate.
//!
//! TCP: the header is the first bytes the backend receives, before any byte of the client
//! (the relay puts it in the client-to-backend pipe before it reads the client, see
//! [`super::tcp`]). UDP (version 2 only): every datagram to the backend starts with a header,
//! as a backend cannot tell which datagram opened a session.

use std::net::SocketAddr;

use crate::config::ProxyProtocol;

/// The transport the header announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Transport {
    Stream,
    Datagram,
}

/// The header `version` announcing a flow from `client` to `vip` (the local address the
/// client reached). `None` with `ProxyProtocol::Off`. An IPv4 client of a dual-stack socket
/// (an IPv4-mapped address) is announced as IPv4; should the two addresses still be of
/// different families, v1 says `UNKNOWN` and v2 sends a `LOCAL` header without addresses,
/// which backends accept and treat as a connection of their own.
pub(super) fn header(
    version: ProxyProtocol,
    client: SocketAddr,
    vip: SocketAddr,
    transport: Transport,
) -> Option<Vec<u8>> {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (client, vip) = (canonical(client), canonical(vip));
    match version {
        ProxyProtocol::Off => None,
        ProxyProtocol::V1 => Some(
            ppp::v1::Addresses::from((client, vip))
                .to_string()
                .into_bytes(),
        ),
        ProxyProtocol::V2 => {
            use ppp::v2::{Builder, Command, Protocol, Version};
            let protocol = match transport {
                Transport::Stream => Protocol::Stream,
                Transport::Datagram => Protocol::Datagram,
            };
            let same_family = client.is_ipv4() == vip.is_ipv4();
            let command = if same_family {
                Command::Proxy
            } else {
                Command::Local
            };
            let builder = if same_family {
                Builder::with_addresses(Version::Two | command, protocol, (client, vip))
            } else {
                Builder::new(Version::Two | command, 0)
            };
            // Building into a Vec cannot fail: there is no I/O and no TLV.
            builder.build().ok()
        }
    }
}

/// The header of a connection (or datagram) of the balancer's own, such as a health check,
/// on a service with `version`: v1 `PROXY UNKNOWN`, v2 a `LOCAL` command without addresses.
/// The spec has backends accept both and take the connection's own addresses, as HAProxy's
/// health checks of a `send-proxy` server do. `None` with `ProxyProtocol::Off`.
pub(crate) fn local_header(version: ProxyProtocol) -> Option<Vec<u8>> {
    match version {
        ProxyProtocol::Off => None,
        ProxyProtocol::V1 => Some(ppp::v1::Addresses::Unknown.to_string().into_bytes()),
        ProxyProtocol::V2 => {
            use ppp::v2::{Builder, Command, Version};
            // Building into a Vec cannot fail: there is no I/O and no TLV.
            Builder::new(Version::Two | Command::Local, 0).build().ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("literal address")
    }

    #[test]
    fn a_local_header_is_unknown_in_v1_and_local_without_addresses_in_v2() {
        assert_eq!(local_header(ProxyProtocol::Off), None);
        assert_eq!(
            local_header(ProxyProtocol::V1).expect("a v1 header"),
            b"PROXY UNKNOWN\r\n"
        );
        let v2 = local_header(ProxyProtocol::V2).expect("a v2 header");
        let parsed = ppp::v2::Header::try_from(&v2[..]).expect("a valid v2 header");
        assert_eq!(parsed.command, ppp::v2::Command::Local);
        assert_eq!(parsed.addresses, ppp::v2::Addresses::Unspecified);
    }

    #[test]
    fn v1_names_client_then_vip() {
        let h = header(
            ProxyProtocol::V1,
            addr("192.0.2.7:51234"),
            addr("198.51.100.1:443"),
            Transport::Stream,
        )
        .expect("a header");
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 443\r\n");
    }

    #[test]
    fn v2_round_trips_through_a_parser() {
        for (client, vip, transport) in [
            ("192.0.2.7:51234", "198.51.100.1:443", Transport::Stream),
            (
                "[2001:db8::7]:51234",
                "[2001:db8::1]:53",
                Transport::Datagram,
            ),
        ] {
            let h =
                header(ProxyProtocol::V2, addr(client), addr(vip), transport).expect("a header");
            // Well under PIPE_BUF: the TCP relay queues it in one atomic pipe write.
            assert!(
                h.len() <= 52,
                "a v2 header with addresses is at most 52 bytes"
            );
            let parsed = ppp::v2::Header::try_from(&h[..]).expect("a valid v2 header");
            assert_eq!(
                parsed.len(),
                h.len(),
                "the header is exactly the bytes written"
            );
            assert_eq!(parsed.command, ppp::v2::Command::Proxy);
            let expected: ppp::v2::Addresses = (addr(client), addr(vip)).into();
            assert_eq!(parsed.addresses, expected);
            let protocol = match transport {
                Transport::Stream => ppp::v2::Protocol::Stream,
                Transport::Datagram => ppp::v2::Protocol::Datagram,
            };
            assert_eq!(parsed.protocol, protocol);
        }
    }

    #[test]
    fn an_ipv4_mapped_client_is_announced_as_ipv4() {
        let h = header(
            ProxyProtocol::V1,
            addr("[::ffff:192.0.2.7]:1000"),
            addr("[::ffff:198.51.100.1]:80"),
            Transport::Stream,
        )
        .expect("a header");
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 198.51.100.1 1000 80\r\n");
    }

    #[test]
    fn off_means_no_header() {
        assert_eq!(
            header(
                ProxyProtocol::Off,
                addr("192.0.2.7:1"),
                addr("198.51.100.1:2"),
                Transport::Stream
            ),
            None
        );
    }
}
