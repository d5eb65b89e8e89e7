//! What kind of network device an interface is: the fact `dataplane = "auto"` chooses its
//! hook by (native XDP only where every interface is a NIC, tc on veth, bridges and the other
//! virtual devices that carry Ethernet frames, the proxy on devices that carry none, such as
//! tun, WireGuard and IP tunnels; see `crate::placement`).
//!
//! The kind is read from the kernel through a socket of the daemon's own network namespace:
//! the device type (`SIOCGIFHWADDR`, for the loopback) and ethtool's driver information
//! (`SIOCETHTOOL` / `ETHTOOL_GDRVINFO`: the driver's name, and for a NIC the address of the
//! bus device it sits on). Not from sysfs: `/sys/class/net` lists the devices of the
//! namespace sysfs was mounted in, which is not the daemon's when it was moved into a
//! namespace with `setns` (as the tests start it), so a `veth` there would be looked up
//! among the host's devices.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What kind of device an interface is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceKind {
    /// A network card on a bus (PCI, virtio, VMBus...): the kind whose driver may run XDP
    /// in native mode. `driver`: its ethtool driver name (`ixgbe`, `virtio_net`...).
    Nic {
        /// The driver's name.
        driver: String,
    },
    /// One end of a veth pair.
    Veth,
    /// A Linux bridge.
    Bridge,
    /// A bond.
    Bond,
    /// An 802.1Q VLAN device.
    Vlan,
    /// A macvlan or macvtap device.
    Macvlan,
    /// A dummy device.
    Dummy,
    /// The loopback device.
    Loopback,
    /// A device whose packets carry no Ethernet header (tun, WireGuard, ipip, GRE, PPP...):
    /// the eBPF programs read Ethernet frames, so neither hook can balance on it.
    NotEthernet {
        /// Its link type (`ARPHRD_*`, the kernel's `dev->type`), e.g. 65534 (`none`: tun,
        /// WireGuard) or 768 (`ipip`).
        link_type: u16,
        /// Its ethtool driver name, empty when it reports none.
        driver: String,
    },
    /// Another virtual device that carries Ethernet frames (a tap, vxlan, ipvlan...): its
    /// driver's name, or empty when it reports none.
    OtherVirtual(String),
}

impl InterfaceKind {
    /// Whether the device is a network card, the only kind `auto` tries native XDP on.
    pub fn is_nic(&self) -> bool {
        matches!(self, InterfaceKind::Nic { .. })
    }
}

/// As a log line names it: `a veth`, `a bridge`, `a NIC (driver ixgbe)`...
impl fmt::Display for InterfaceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterfaceKind::Nic { driver } => write!(f, "a NIC (driver {driver})"),
            InterfaceKind::Veth => f.write_str("a veth"),
            InterfaceKind::Bridge => f.write_str("a bridge"),
            InterfaceKind::Bond => f.write_str("a bond"),
            InterfaceKind::Vlan => f.write_str("a VLAN"),
            InterfaceKind::Macvlan => f.write_str("a macvlan"),
            InterfaceKind::Dummy => f.write_str("a dummy"),
            InterfaceKind::Loopback => f.write_str("the loopback device"),
            InterfaceKind::NotEthernet { link_type, driver } => {
                write!(
                    f,
                    "a device without Ethernet frames (link type {}",
                    link_name(*link_type)
                )?;
                if !driver.is_empty() {
                    write!(f, ", driver {driver}")?;
                }
                f.write_str(")")
            }
            InterfaceKind::OtherVirtual(d) if d.is_empty() => f.write_str("a virtual device"),
            InterfaceKind::OtherVirtual(d) => write!(f, "a virtual device ({d})"),
        }
    }
}

/// Why the kind of an interface could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KindError {
    /// No interface of that name in the daemon's network namespace.
    #[error("there is no interface {0}")]
    NoInterface(String),
    /// The kernel refused the query (no socket, a permission).
    #[error("cannot read what kind of device {interface} is: {source}")]
    Io {
        /// The interface.
        interface: String,
        /// What the kernel said.
        source: io::Error,
    },
}

/// The kind of device `interface` is, in the daemon's network namespace.
///
/// Returns `Err(KindError::NoInterface)` when there is no such interface (or the name is
/// not one Linux takes), `Err(KindError::Io)` when the kernel refuses the query.
pub fn kind_of(interface: &str) -> Result<InterfaceKind, KindError> {
    let io = |source: io::Error| {
        if source.raw_os_error() == Some(libc::ENODEV) {
            KindError::NoInterface(interface.to_string())
        } else {
            KindError::Io {
                interface: interface.to_string(),
                source,
            }
        }
    };
    let mut req = ifreq_for(interface).ok_or_else(|| KindError::NoInterface(interface.into()))?;
    // SAFETY: plain socket(2); the descriptor is owned (closed on drop) from here on.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: SIOCGIFHWADDR reads the name from `req` and writes `ifr_hwaddr`, within it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(io(io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled `ifr_hwaddr` (above); it is plain data.
    let device_type = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
    if device_type == ARPHRD_LOOPBACK {
        return Ok(InterfaceKind::Loopback);
    }
    let mut info = EthtoolDrvinfo::query();
    req.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: SIOCETHTOOL reads `cmd` through `ifru_data` and writes at most the struct's
    // size (the kernel's `struct ethtool_drvinfo`, which `EthtoolDrvinfo` mirrors) there;
    // `info` outlives the call.
    let driver = if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) } < 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // No ethtool driver information: a virtual device (a tunnel) with no parent.
            Some(libc::EOPNOTSUPP) => None,
            _ => return Err(io(e)),
        }
    } else {
        Some((text(&info.driver), text(&info.bus_info)))
    };
    if device_type != ARPHRD_ETHER {
        // Checked before the driver: a tun device and a tap device share the driver `tun`,
        // and only the tap carries Ethernet frames.
        return Ok(InterfaceKind::NotEthernet {
            link_type: device_type,
            driver: driver.map(|(d, _)| d).unwrap_or_default(),
        });
    }
    Ok(match driver {
        Some((driver, bus_info)) => classify(&driver, &bus_info),
        None => InterfaceKind::OtherVirtual(String::new()),
    })
}

/// The `ip link` name of a link type (`ARPHRD_*`), or its number.
fn link_name(link_type: u16) -> String {
    match link_type {
        0xfffe => "none".into(),
        768 => "ipip".into(),
        769 => "tunnel6".into(),
        776 => "sit".into(),
        778 => "gre".into(),
        823 => "ip6gre".into(),
        512 => "ppp".into(),
        519 => "rawip".into(),
        n => n.to_string(),
    }
}

/// The kind of a device whose ethtool driver name is `driver` and bus address `bus_info`
/// (empty or `N/A` for a device on no bus).
pub fn classify(driver: &str, bus_info: &str) -> InterfaceKind {
    match driver {
        "veth" => InterfaceKind::Veth,
        "bridge" => InterfaceKind::Bridge,
        "bonding" => InterfaceKind::Bond,
        "802.1Q VLAN Driver" => InterfaceKind::Vlan,
        "macvlan" | "macvtap" => InterfaceKind::Macvlan,
        "dummy" => InterfaceKind::Dummy,
        // Virtual devices that report a bus-like word (tun says `tap`/`tun`), or none.
        d if VIRTUAL_DRIVERS.contains(&d) || bus_info.is_empty() || bus_info == "N/A" => {
            InterfaceKind::OtherVirtual(d.to_string())
        }
        d => InterfaceKind::Nic {
            driver: d.to_string(),
        },
    }
}

/// Drivers of virtual devices, whatever their bus information says.
const VIRTUAL_DRIVERS: &[&str] = &[
    "tun",
    "vxlan",
    "geneve",
    "ipvlan",
    "ipvtap",
    "wireguard",
    "vrf",
    "team",
    "openvswitch",
    "ifb",
    "nlmon",
    "netkit",
    "vcan",
];

const ARPHRD_ETHER: libc::sa_family_t = 1;
const ARPHRD_LOOPBACK: libc::sa_family_t = 772;
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// The kernel's `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h).
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

impl EthtoolDrvinfo {
    /// A zeroed request for the driver information.
    fn query() -> EthtoolDrvinfo {
        EthtoolDrvinfo {
            cmd: ETHTOOL_GDRVINFO,
            driver: [0; 32],
            version: [0; 32],
            fw_version: [0; 32],
            bus_info: [0; 32],
            erom_version: [0; 32],
            reserved2: [0; 12],
            n_priv_flags: 0,
            n_stats: 0,
            testinfo_len: 0,
            eedump_len: 0,
            regdump_len: 0,
        }
    }
}

/// A zeroed `ifreq` naming `interface`; `None` when the name does not fit (15 bytes) or
/// holds a NUL.
fn ifreq_for(interface: &str) -> Option<libc::ifreq> {
    let bytes = interface.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    // SAFETY: `ifreq` is plain data (a name and a union of plain data); all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, b) in req.ifr_name.iter_mut().zip(bytes) {
        *slot = *b as libc::c_char;
    }
    Some(req)
}

/// A NUL-padded C string field as text.
fn text(field: &[u8]) -> String {
    CStr::from_bytes_until_nul(field)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(field).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_tests::netns::Netns;

    #[test]
    fn drivers_name_their_kind() {
        assert_eq!(classify("veth", ""), InterfaceKind::Veth);
        assert_eq!(classify("bridge", "N/A"), InterfaceKind::Bridge);
        assert_eq!(classify("bonding", ""), InterfaceKind::Bond);
        assert_eq!(classify("802.1Q VLAN Driver", ""), InterfaceKind::Vlan);
        assert_eq!(classify("macvlan", ""), InterfaceKind::Macvlan);
        assert_eq!(classify("dummy", ""), InterfaceKind::Dummy);
        assert_eq!(
            classify("tun", "tap"),
            InterfaceKind::OtherVirtual("tun".into()),
            "tun reports a bus word but is virtual"
        );
        assert_eq!(
            classify("something", ""),
            InterfaceKind::OtherVirtual("something".into()),
            "no bus: virtual"
        );
        let nic = classify("ixgbe", "0000:03:00.0");
        assert!(nic.is_nic(), "{nic:?}");
        assert_eq!(nic.to_string(), "a NIC (driver ixgbe)");
        assert!(classify("virtio_net", "virtio2").is_nic());
    }

    #[test]
    fn a_missing_or_impossible_name_is_no_interface() {
        for name in ["lbt-nosuch0", "", "a-name-longer-than-15"] {
            match kind_of(name) {
                Err(KindError::NoInterface(n)) => assert_eq!(n, name),
                other => panic!("{name:?}: expected no interface, got {other:?}"),
            }
        }
    }

    #[test]
    fn lo_is_the_loopback_device() {
        assert_eq!(kind_of("lo").expect("lo exists"), InterfaceKind::Loopback);
    }

    #[test]
    fn real_devices_in_a_namespace_are_read_as_what_they_are() {
        if !lb_tests::require_root("iface_kind::real_devices_in_a_namespace") {
            return;
        }
        let ns = Netns::new("kind").expect("a namespace");
        ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
            .expect("a veth pair");
        ns.ip(&["link", "add", "br0", "type", "bridge"])
            .expect("a bridge");
        ns.ip(&[
            "link", "add", "link", "v0", "name", "mv0", "type", "macvlan",
        ])
        .expect("a macvlan");
        ns.ip(&["tuntap", "add", "mode", "tun", "name", "tun0"])
            .expect("a tun device");
        ns.ip(&["tuntap", "add", "mode", "tap", "name", "tap0"])
            .expect("a tap device");
        let mut want = vec![
            ("v0", InterfaceKind::Veth),
            ("br0", InterfaceKind::Bridge),
            ("mv0", InterfaceKind::Macvlan),
            ("lo", InterfaceKind::Loopback),
            (
                "tun0",
                InterfaceKind::NotEthernet {
                    link_type: 0xfffe,
                    driver: "tun".into(),
                },
            ),
            ("tap0", InterfaceKind::OtherVirtual("tun".into())),
        ];
        // Kinds whose driver this kernel may lack (the test machines have no dummy, bonding
        // or 8021q modules): read when they can be made.
        let optional: [(&[&str], &str, InterfaceKind); 3] = [
            (
                &["link", "add", "d0", "type", "dummy"],
                "d0",
                InterfaceKind::Dummy,
            ),
            (
                &["link", "add", "bo0", "type", "bond"],
                "bo0",
                InterfaceKind::Bond,
            ),
            (
                &[
                    "link", "add", "link", "v0", "name", "v0.7", "type", "vlan", "id", "7",
                ],
                "v0.7",
                InterfaceKind::Vlan,
            ),
        ];
        for (args, name, kind) in optional {
            match ns.ip(args) {
                Ok(()) => want.push((name, kind)),
                Err(e) => eprintln!("{name} ({kind}) not tried: {e}"),
            }
        }
        let names: Vec<&str> = want.iter().map(|(n, _)| *n).collect();
        let got = ns
            .enter(|| {
                names
                    .iter()
                    .map(|n| (*n, kind_of(n).unwrap_or_else(|e| panic!("{n}: {e}"))))
                    .collect::<Vec<_>>()
            })
            .expect("enter the namespace");
        assert_eq!(got, want, "each device read from inside the namespace");
    }
}
