//! Whether `lb_tc` may hand packets for an interface straight to its peer
//! (`bpf_redirect_peer`): the interface is one end of a veth (or netkit) pair whose other end
//! is in another network namespace, a container's or a backend's. The kernel drops a peer
//! redirect to any other device, or to a peer in the sender's own namespace, so the answer
//! must be exact: it is read from the kernel with one `RTM_GETLINK` request in the daemon's
//! own namespace, the link's kind from `IFLA_LINKINFO` and the peer's namespace from
//! `IFLA_LINK_NETNSID`, which the kernel reports only for a peer in another namespace.

use std::io;

use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;

/// Whether interface `ifindex` is a veth or netkit device whose peer is in another network
/// namespace.
///
/// Returns `Err` when the kernel cannot be asked or answers an error (`ENODEV` for an
/// interface that is gone).
pub fn peer_elsewhere(ifindex: u32) -> io::Result<bool> {
    let link = get_link(ifindex)?;
    Ok(is_pair(&link) && peer_namespace(&link).is_some())
}

/// One `RTM_GETLINK` for `ifindex`, the kernel's `RTM_NEWLINK` answer.
pub(super) fn get_link(ifindex: u32) -> io::Result<LinkMessage> {
    let mut message = LinkMessage::default();
    message.header.index = ifindex;
    match super::rtnl::request(RouteNetlinkMessage::GetLink(message))? {
        RouteNetlinkMessage::NewLink(link) => Ok(link),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("RTM_GETLINK answered {other:?}"),
        )),
    }
}

/// Whether the link is a veth or a netkit device, the kinds with a peer device.
fn is_pair(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth | InfoKind::Netkit))),
        _ => false,
    })
}

/// The id (in this namespace) of the namespace the link's peer is in, present only when that
/// is not this namespace.
fn peer_namespace(link: &LinkMessage) -> Option<i32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkNetNsId(id) => Some(*id),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loopback device (index 1 in every namespace) has no peer.
    #[test]
    fn the_loopback_has_no_peer() {
        assert!(!peer_elsewhere(1).expect("RTM_GETLINK for lo"));
    }

    #[test]
    fn a_missing_interface_is_an_error() {
        // The kernel's index is a signed int: a positive one that no interface has.
        let e = peer_elsewhere(0x7fff_fff0).expect_err("no such interface");
        assert_eq!(e.raw_os_error(), Some(19), "ENODEV expected, got {e}");
    }
}
