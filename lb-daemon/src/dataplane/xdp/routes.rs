//! Where the kernel's routes send a packet: one `RTM_GETROUTE` (what `ip route get DST from
//! SRC` asks) in the daemon's own network namespace. A `nat` service's translated packets
//! leave by the interface the route to their backend names, and the backend's replies come
//! back in on it: when that is not an interface the program is on, the replies meet the
//! host's stack instead of the program ([`ReplyPaths`]; `placement.rs` asks before it
//! places a service on the eBPF plane, `maps.rs` when a backend address first comes and
//! again every `REPLIES_EVERY`).

use std::io;
use std::net::IpAddr;

use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

/// Why a `nat` backend's replies would not reach the program ([`ReplyPaths::verdict`]).
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
    /// The service runs at the XDP hook, and the route to the backend leaves by this device
    /// (its name), which `lb_xdp` cannot send to ([`off_xdp`]).
    #[error(
        "is routed out of {0}, where the XDP program cannot send (it sends only out of the \
         service's interfaces; a service on tc can)"
    )]
    OffXdp(String),
}

/// What the routes say of a `nat` backend's replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// They come in where the program is.
    Reach,
    /// They would not.
    Miss(Miss),
    /// It cannot be told now: the service has no local address of the backend's family,
    /// the kernel has no route to it, or cannot be asked.
    Unknown,
}

/// Where a service's backends' replies may come in and be seen by the program: its
/// `interface` and `backend_interfaces` (by index) and the bridges or bonds they are ports
/// of. Read once, then asked about any number of backends.
#[derive(Debug, Clone)]
pub struct ReplyPaths {
    listed: Vec<u32>,
    masters: Vec<u32>,
}

impl ReplyPaths {
    /// Reads the links of the interfaces `names`. `None` when it cannot be told where
    /// replies come in: one of them does not exist or cannot be read, or is in a VRF (its
    /// routes are not the main table's, which [`egress`] reads).
    pub fn of<'a>(names: impl IntoIterator<Item = &'a String>) -> Option<ReplyPaths> {
        let listed: Vec<u32> = names
            .into_iter()
            .map(|name| super::loader::if_index(name))
            .collect::<Option<_>>()?;
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
        Some(ReplyPaths { listed, masters })
    }

    /// Whether the replies of a backend at `backend` come in where the program sees them:
    /// the route from the first of `sources` (the service's local addresses) of the
    /// backend's family leaves by a listed interface, by the bridge or bond one of them is a
    /// port of (its replies come in on the port), or by a VLAN or macvlan device on one;
    /// [`Miss::Local`] for an address of this host. Of a multipath route the kernel answers
    /// with the path its hash picks for this source and destination.
    pub fn verdict(&self, backend: IpAddr, sources: &[IpAddr]) -> Verdict {
        let Some(source) = sources.iter().find(|a| a.is_ipv4() == backend.is_ipv4()) else {
            return Verdict::Unknown;
        };
        match egress(backend, *source) {
            Ok(Egress::Local) => Verdict::Miss(Miss::Local),
            Ok(Egress::Interface(index)) => match self.reaches(index) {
                Some(true) => Verdict::Reach,
                Some(false) => Verdict::Miss(Miss::Elsewhere(
                    nix::net::if_::if_indextoname(index)
                        .map(|name| name.to_string_lossy().into_owned())
                        .unwrap_or_else(|_| format!("interface index {index}")),
                )),
                None => Verdict::Unknown,
            },
            Err(_) => Verdict::Unknown,
        }
    }

    /// [`off_xdp`] for a service at the XDP hook whose interfaces these are.
    pub fn off_xdp(&self, backend: IpAddr, sources: &[IpAddr]) -> Option<String> {
        off_xdp(&self.listed, backend, sources)
    }

    /// Whether packets routed out of `egress` come back in where the program sees them;
    /// `None` when the kernel cannot say what `egress` is.
    fn reaches(&self, egress: u32) -> Option<bool> {
        if self.listed.contains(&egress) || self.masters.contains(&egress) {
            return Some(true);
        }
        let out = super::peer::get_link(egress).ok()?;
        Some(lower(&out).is_some_and(|l| self.listed.contains(&l)))
    }
}

/// The interface by which the route to `backend`, from the first of `sources` (the
/// service's local addresses) of its family, leaves, when it is none of `attached` (the
/// indexes of the service's interfaces): `lb_xdp` sends a packet out only by `XDP_TX` or a
/// redirect to an interface it is attached to (its `DEVMAP`), and drops one routed out of
/// any other device, a VLAN, bond or bridge over one of them included, where `lb_tc`
/// delivers it. `None` when the route leaves by one of them, is local, or cannot be told.
pub fn off_xdp(attached: &[u32], backend: IpAddr, sources: &[IpAddr]) -> Option<String> {
    let source = sources.iter().find(|a| a.is_ipv4() == backend.is_ipv4())?;
    match egress(backend, *source) {
        Ok(Egress::Interface(index)) if !attached.contains(&index) => Some(
            nix::net::if_::if_indextoname(index)
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|_| format!("interface index {index}")),
        ),
        _ => None,
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

    #[test]
    fn a_backend_routed_out_of_a_macvlan_or_an_unlisted_device_is_off_xdp() {
        if !lb_tests::require_root("routes::a_backend_routed_out_of_a_macvlan") {
            return;
        }
        let ns = lb_tests::netns::Netns::new("offxdp").expect("a namespace");
        let run = |args: &[&str]| ns.ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
        run(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        run(&["link", "add", "w0", "type", "veth", "peer", "name", "w1"]);
        // A macvlan, as a VLAN would be (this kernel has no 8021q): a device over v0.
        run(&[
            "link", "add", "link", "v0", "name", "mv0", "type", "macvlan",
        ]);
        for (dev, addr) in [
            ("v0", "10.9.0.1/24"),
            ("mv0", "10.9.5.1/24"),
            ("w0", "10.9.7.1/24"),
        ] {
            run(&["addr", "add", addr, "dev", dev]);
        }
        for dev in ["v0", "v1", "mv0", "w0", "w1"] {
            run(&["link", "set", dev, "up"]);
        }
        let answers = ns
            .enter(|| {
                let v0 = crate::dataplane::xdp::loader::if_index("v0").expect("v0");
                let local = [IpAddr::from([10, 9, 0, 1])];
                ["10.9.0.2", "10.9.5.2", "10.9.7.2", "10.9.0.1"]
                    .map(|b| off_xdp(&[v0], b.parse().expect("literal"), &local))
            })
            .expect("enter the namespace");
        assert_eq!(
            answers,
            [None, Some("mv0".into()), Some("w0".into()), None],
            "by v0 itself, by a macvlan on it, by another device, and a local address"
        );
    }

    /// `lo` and its address exist in every namespace: a backend there is this host's own.
    #[test]
    fn a_backend_at_an_address_of_this_host_misses() {
        let lo = IpAddr::from([127, 0, 0, 1]);
        let paths = ReplyPaths::of(&["lo".to_string()]).expect("lo's link");
        assert_eq!(paths.verdict(lo, &[lo]), Verdict::Miss(Miss::Local));
        assert_eq!(paths.reaches(1), Some(true), "lo is listed");
        let v6 = IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
        assert_eq!(paths.verdict(v6, &[lo]), Verdict::Unknown, "no IPv6 source");
        assert!(ReplyPaths::of(&["lbt-none0".to_string()]).is_none());
    }
}
