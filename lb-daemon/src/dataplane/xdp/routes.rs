//! Where the kernel's routes send a packet: one `RTM_GETROUTE` (what `ip route get DST from
//! SRC` asks) in the daemon's own network namespace. A `nat` service's translated packets
//! leave by the interface the route to their backend names, and the backend's replies come
//! back in on it: when that is not an interface the program is on, the replies meet the
//! host's stack instead of the program (`placement.rs` checks this before it places a
//! service on the eBPF plane, [`reaches_the_program`]).

use std::io;
use std::net::IpAddr;

use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

/// Why a `nat` backend's replies would not reach the program ([`replies_miss`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Miss {
    /// The backend is an address of this host: the program forwards packets out of
    /// interfaces, and this host's sockets are behind none.
    #[error("is an address of this host")]
    Local,
    /// The route to the backend leaves by this interface (its name), where the program
    /// would not see the replies.
    #[error("is reached through {0}, where the eBPF program would not see its replies (add {0} to backend_interfaces)")]
    Elsewhere(String),
}

/// The indexes of the interfaces `names`, in order; `None` when one does not exist.
pub fn indexes<'a>(names: impl IntoIterator<Item = &'a String>) -> Option<Vec<u32>> {
    names
        .into_iter()
        .map(|name| super::loader::if_index(name))
        .collect()
}

/// Whether the replies of a `nat` backend at `backend` would miss a program on `listed`
/// (interface indexes; the service's `interface` and `backend_interfaces`): the route from the
/// first of `sources` (the service's local addresses) of the backend's family leaves where
/// [`reaches_the_program`] says they would not come in, or the backend is an address of this
/// host. `None` when they would reach it, and when it cannot be told (no source of the
/// family, no route, the kernel cannot be asked, a VRF).
pub fn replies_miss(backend: IpAddr, sources: &[IpAddr], listed: &[u32]) -> Option<Miss> {
    let source = sources.iter().find(|a| a.is_ipv4() == backend.is_ipv4())?;
    match egress(backend, *source) {
        Ok(Egress::Local) => Some(Miss::Local),
        Ok(Egress::Interface(index)) if reaches_the_program(index, listed) == Some(false) => {
            let via = nix::net::if_::if_indextoname(index)
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|_| format!("interface index {index}"));
            Some(Miss::Elsewhere(via))
        }
        Ok(Egress::Interface(_)) | Err(_) => None,
    }
}

/// Where a packet to an address goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Out of the interface with this index.
    Interface(u32),
    /// Nowhere: the address is this host's own (a `local` route), its packets are received
    /// here.
    Local,
}

/// The route the kernel picks for a packet from `source` to `destination` (`ip route get
/// destination from source`; `source` must be an address of this host, of the same family).
///
/// Returns `Err` when the kernel has no route (`ENETUNREACH`, `EHOSTUNREACH`), refuses the
/// question (IPv4 answers `EINVAL` for a `source` that is not local), or answers something
/// that is not a route to an interface. Of a multipath route the answer names the path the
/// kernel's hash picks for this source and destination.
pub fn egress(destination: IpAddr, source: IpAddr) -> io::Result<Egress> {
    let mut message = RouteMessage::default();
    let (family, bits) = match destination {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    message.header.address_family = family;
    message.header.destination_prefix_length = bits;
    message.header.source_prefix_length = bits;
    message.header.table = RouteHeader::RT_TABLE_UNSPEC;
    message
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(destination)));
    message
        .attributes
        .push(RouteAttribute::Source(RouteAddress::from(source)));
    let answer = match super::rtnl::request(RouteNetlinkMessage::GetRoute(message))? {
        RouteNetlinkMessage::NewRoute(route) => route,
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("RTM_GETROUTE answered {other:?}"),
            ))
        }
    };
    if answer.header.kind == RouteType::Local {
        return Ok(Egress::Local);
    }
    answer
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(index) => Some(Egress::Interface(*index)),
            _ => None,
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the route to {destination} ({:?}) names no interface",
                    answer.header.kind
                ),
            )
        })
}

/// Whether packets routed out of interface `egress` come back in where a program on each of
/// `listed` (the service's interfaces, by index) sees them: `egress` is one of them, or the
/// bridge or bond one of them is a port of (its replies come in on the port), or the VLAN or
/// macvlan device on top of one of them. `None` when it cannot be told: a listed interface is
/// in a VRF (its routes are not the main table's, which [`egress`] reads), or the kernel
/// cannot be asked.
pub fn reaches_the_program(egress: u32, listed: &[u32]) -> Option<bool> {
    let links: Vec<LinkMessage> = listed
        .iter()
        .map(|&index| super::peer::get_link(index))
        .collect::<io::Result<_>>()
        .ok()?;
    let masters: Vec<u32> = links.iter().filter_map(master).collect();
    for &m in &masters {
        if is_vrf(&super::peer::get_link(m).ok()?) {
            return None;
        }
    }
    if listed.contains(&egress) || masters.contains(&egress) {
        return Some(true);
    }
    let out = super::peer::get_link(egress).ok()?;
    Some(lower(&out).is_some_and(|l| listed.contains(&l)))
}

/// `IFLA_MASTER`: the bridge, bond or VRF the link is enslaved to.
fn master(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(index) => Some(*index),
        _ => None,
    })
}

/// `IFLA_LINK` of a link whose lower device is in this namespace (a VLAN, a macvlan); a veth's
/// names its peer, in another namespace when `IFLA_LINK_NETNSID` is there, and is left out.
fn lower(link: &LinkMessage) -> Option<u32> {
    if link
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)))
    {
        return None;
    }
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(index) => Some(*index),
        _ => None,
    })
}

/// Whether the link is a VRF device.
fn is_vrf(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vrf))),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every namespace has the loopback device: its address is local.
    #[test]
    fn the_loopback_address_is_local() {
        let lo = IpAddr::from([127, 0, 0, 1]);
        assert_eq!(egress(lo, lo).expect("RTM_GETROUTE"), Egress::Local);
    }

    /// The loopback device (index 1) is its own listed interface, and reaches nothing else.
    #[test]
    fn an_egress_among_the_listed_interfaces_reaches_the_program() {
        assert_eq!(reaches_the_program(1, &[1]), Some(true));
    }
}
