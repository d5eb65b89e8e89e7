//! Which port of a Linux bridge each Ethernet address is behind: the bridge's forwarding
//! database (FDB), read from the kernel, so that `lb_tc` can send a packet routed into the
//! bridge straight to that port (`BRIDGE_FDB`, see `bridge_ports.rs`).
//!
//! Only what the bridge itself would do is taken: entries the bridge learned or was given
//! (they name it in `NDA_MASTER`), not its own local addresses (`NUD_PERMANENT`, frames the bridge delivers up
//! to the host), not multicast addresses, and only on ports in the forwarding state. A bridge
//! with VLAN filtering on is not read at all: its ports may tag or untag frames on the way
//! out, which a redirect would skip.
//!
//! Everything comes from netlink in the daemon's own network namespace (sysfs may show another
//! namespace's devices when the mount namespace was not made for this one): the bridge's kind
//! and VLAN setting and its ports' states from an `RTM_GETLINK` dump, the entries from an
//! `RTM_GETNEIGH` dump of the `AF_BRIDGE` family.

use std::collections::HashMap;
use std::io;

use rtnetlink::packet_route::link::{
    BridgePortState, InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData, LinkAttribute,
    LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

/// Why a bridge's forwarding database was not taken.
#[derive(Debug, thiserror::Error)]
pub enum FdbError {
    /// No device of that index is a bridge in this network namespace.
    #[error("interface {0} is not a bridge in this network namespace")]
    NotABridge(u32),
    /// The bridge filters by VLAN: a port may tag or untag what it sends.
    #[error(
        "it has VLAN filtering on (its ports may tag frames, which a redirect to them would skip)"
    )]
    VlanFiltering,
    /// A netlink dump failed.
    #[error("the kernel could not be asked: {0}")]
    Netlink(#[from] io::Error),
}

/// Whether interface `ifindex` is a Linux bridge in the daemon's network namespace.
///
/// Returns `Err` when the kernel cannot be asked.
pub fn is_bridge(ifindex: u32) -> io::Result<bool> {
    Ok(links()?
        .iter()
        .any(|link| link.header.index == ifindex && bridge_info(link).is_some()))
}

/// The unicast addresses behind the forwarding ports of the bridge of index `bridge`:
/// Ethernet address → port ifindex.
///
/// Returns `Err(FdbError::VlanFiltering)` for a bridge with VLAN filtering on,
/// `Err(FdbError::NotABridge)` for another device, `Err(FdbError::Netlink)` when the kernel
/// cannot be asked.
pub fn forwarding_entries(bridge: u32) -> Result<HashMap<[u8; 6], u32>, FdbError> {
    let links = links()?;
    let info = links
        .iter()
        .find(|link| link.header.index == bridge)
        .and_then(bridge_info)
        .ok_or(FdbError::NotABridge(bridge))?;
    if info.contains(&InfoBridge::VlanFiltering(true)) {
        return Err(FdbError::VlanFiltering);
    }
    let ports: Vec<u32> = links
        .iter()
        .filter(|link| forwarding_port_of(link) == Some(bridge))
        .map(|link| link.header.index)
        .collect();
    let mut out = HashMap::new();
    for entry in fdb_dump()? {
        if let Some((mac, port)) = bridge_entry(&entry, bridge) {
            if ports.contains(&port) {
                out.insert(mac, port);
            }
        }
    }
    Ok(out)
}

/// The bridge attributes of a link that is a bridge, `None` for any other link.
fn bridge_info(link: &LinkMessage) -> Option<&[InfoBridge]> {
    let infos = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => Some(infos),
        _ => None,
    })?;
    if !infos
        .iter()
        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)))
    {
        return None;
    }
    Some(
        infos
            .iter()
            .find_map(|i| match i {
                LinkInfo::Data(InfoData::Bridge(data)) => Some(data.as_slice()),
                _ => None,
            })
            .unwrap_or(&[]),
    )
}

/// The bridge (its index) a link is a port of, when the port is in the forwarding state (a
/// port that is down is `disabled`, one that STP holds back `blocking`, `listening` or
/// `learning`).
fn forwarding_port_of(link: &LinkMessage) -> Option<u32> {
    let master = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(index) => Some(*index),
        _ => None,
    })?;
    let forwarding = link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| match i {
            LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                port.contains(&InfoBridgePort::State(BridgePortState::Forwarding))
            }
            _ => false,
        }),
        _ => false,
    });
    forwarding.then_some(master)
}

/// The address and port of a bridge FDB entry of bridge `bridge_ifindex` that a frame may be
/// sent to directly, `None` for any other entry (another bridge's, a device's own address
/// list, a local or multicast address, one on a VLAN).
fn bridge_entry(entry: &NeighbourMessage, bridge_ifindex: u32) -> Option<([u8; 6], u32)> {
    let header = &entry.header;
    // The bridge's own entries carry `NDA_MASTER` (the flags say `NTF_MASTER` only in
    // requests); a device's own address list says `NTF_SELF`.
    if header.flags.contains(NeighbourFlags::Own)
        || header.state == NeighbourState::Permanent
        || header.ifindex == bridge_ifindex
    {
        return None;
    }
    let mut master = None;
    let mut mac = None;
    for attribute in &entry.attributes {
        match attribute {
            NeighbourAttribute::Controller(index) => master = Some(*index),
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                mac = <[u8; 6]>::try_from(bytes.as_slice()).ok();
            }
            NeighbourAttribute::Vlan(vid) if *vid != 0 => return None,
            _ => {}
        }
    }
    let mac = mac?;
    // The group bit: multicast and broadcast go to several ports.
    if master != Some(bridge_ifindex) || mac[0] & 1 != 0 {
        return None;
    }
    Some((mac, header.ifindex))
}

/// Every link of the namespace, with its link info (`RTM_GETLINK` dump).
fn links() -> io::Result<Vec<LinkMessage>> {
    let answers = super::rtnl::dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
    Ok(answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(link),
            _ => None,
        })
        .collect())
}

/// Every `AF_BRIDGE` neighbour entry of the namespace (the kernel filters a dump by bridge
/// only on sockets in strict mode, so the entries are filtered here, by `NDA_MASTER`).
fn fdb_dump() -> io::Result<Vec<NeighbourMessage>> {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    let answers = super::rtnl::dump(RouteNetlinkMessage::GetNeighbour(message))?;
    Ok(answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(entry) => Some(entry),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_is_not_a_bridge() {
        assert!(!is_bridge(1).expect("RTM_GETLINK dump"));
        let e = forwarding_entries(1).expect_err("lo has no FDB");
        assert!(matches!(e, FdbError::NotABridge(1)), "{e}");
    }

    /// An entry as the kernel sends it for a learned address on port 7 of bridge 5.
    fn learned(mac: [u8; 6]) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = 7;
        m.header.state = NeighbourState::Reachable;
        m.attributes = vec![
            NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
            NeighbourAttribute::Controller(5),
        ];
        m
    }

    #[test]
    fn only_unicast_entries_the_bridge_learned_on_a_port_are_taken() {
        let mac = [0x02, 0x42, 0xac, 0x11, 0, 2];
        assert_eq!(bridge_entry(&learned(mac), 5), Some((mac, 7)));
        // Another bridge's.
        assert_eq!(bridge_entry(&learned(mac), 6), None);
        // The bridge's own address on a port (delivered up to the host).
        let mut local = learned(mac);
        local.header.state = NeighbourState::Permanent;
        assert_eq!(bridge_entry(&local, 5), None);
        // A device's own address list (`self`), not the bridge's.
        let mut own = learned(mac);
        own.header.flags = NeighbourFlags::Own;
        assert_eq!(bridge_entry(&own, 5), None);
        // Multicast.
        assert_eq!(bridge_entry(&learned([0x33, 0x33, 0, 0, 0, 1]), 5), None);
        // On a VLAN.
        let mut tagged = learned(mac);
        tagged.attributes.push(NeighbourAttribute::Vlan(10));
        assert_eq!(bridge_entry(&tagged, 5), None);
    }
}
