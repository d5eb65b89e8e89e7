//! Turning off a veth's transmit checksum offload, or its segmentation offloads.
//!
//! A packet a local socket sends over a veth carries only a partial TCP/UDP checksum (the
//! pseudo-header sum) and a note for the receiver that the rest is "to be done". XDP sees the
//! bare frame: once it rewrites and redirects it, that note is gone and the receiver finds a
//! wrong checksum (`TcpInCsumErrors`). Packets from a real wire always carry full checksums,
//! so the tests make their senders compute them in software, as Katran's test set-up does.

use std::io;

use crate::netns::Netns;

/// `ETHTOOL_STXCSUM` from `<linux/ethtool.h>`: set transmit checksum offload.
const ETHTOOL_STXCSUM: u32 = 0x17;
/// `ETHTOOL_STSO`: set TCP segmentation offload.
const ETHTOOL_STSO: u32 = 0x1f;
/// `ETHTOOL_SGSO`: set generic segmentation offload.
const ETHTOOL_SGSO: u32 = 0x24;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Turns off transmit checksum offload on `interface` in `ns` (`ethtool -K IF tx off`).
///
/// Returns `Err` when the namespace cannot be entered or the ioctl fails.
pub fn disable_tx_checksum(ns: &Netns, interface: &str) -> io::Result<()> {
    set_tx_checksum(ns, interface, false)
}

/// Turns transmit checksum offload on `interface` in `ns` on (`on`) or off
/// (`ethtool -K IF tx on|off`); the benchmark turns it back on after its XDP paths.
///
/// Returns `Err` when the namespace cannot be entered or the ioctl fails.
pub fn set_tx_checksum(ns: &Netns, interface: &str, on: bool) -> io::Result<()> {
    set_feature(ns, interface, ETHTOOL_STXCSUM, on)
}

/// Turns off TCP and generic segmentation offload on `interface` in `ns` (`ethtool -K IF tso
/// off gso off`): a local TCP sender's segments then cross the link one by one, each of its
/// MSS, as on a wire, instead of as one super-packet.
///
/// Returns `Err` when the namespace cannot be entered or an ioctl fails.
pub fn disable_segmentation_offload(ns: &Netns, interface: &str) -> io::Result<()> {
    set_feature(ns, interface, ETHTOOL_STSO, false)?;
    set_feature(ns, interface, ETHTOOL_SGSO, false)
}

/// Sets the ethtool feature `cmd` (an `ETHTOOL_S*` command taking an `ethtool_value`) of
/// `interface` in `ns`.
fn set_feature(ns: &Netns, interface: &str, cmd: u32, on: bool) -> io::Result<()> {
    let name = interface.to_string();
    ns.enter(move || -> io::Result<()> {
        // SAFETY: plain socket(2) call; the descriptor is owned and closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut value = EthtoolValue {
            cmd,
            data: u32::from(on),
        };
        // SAFETY: ifreq is plain data; zeroed is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= ifr.ifr_name.len() {
            // SAFETY: fd is ours.
            unsafe { libc::close(fd) };
            return Err(io::Error::other(format!(
                "interface name {name} is too long"
            )));
        }
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        // SAFETY: SIOCETHTOOL reads `ifr` and the ethtool_value it points at, both live here.
        let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL as _, &mut ifr) };
        let err = io::Error::last_os_error();
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        if rc < 0 {
            Err(err)
        } else {
            Ok(())
        }
    })?
}
