//! What a device's driver says it can do with XDP (`xdp-features`, Linux 6.3): run a program
//! natively (`basic`), redirect frames away (`redirect`), and take frames other devices
//! redirect to it (`ndo-xmit`). `auto` puts a service on native XDP only when every one of its
//! interfaces can do all three, since a frame redirected to a device without `ndo-xmit` is
//! dropped where no one sees it (the black hole the bridge set-up showed).
//!
//! Read with one generic netlink request to the kernel's `netdev` family
//! (`NETDEV_CMD_DEV_GET`, Documentation/netlink/specs/netdev.yaml), in the daemon's own network
//! namespace; the family's id is looked up first through `nlctrl`.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The driver can run an XDP program natively (`NETDEV_XDP_ACT_BASIC`).
pub const BASIC: u64 = 1 << 0;
/// A native program may return `XDP_REDIRECT` (`NETDEV_XDP_ACT_REDIRECT`).
pub const REDIRECT: u64 = 1 << 1;
/// The device takes frames redirected to it (`NETDEV_XDP_ACT_NDO_XMIT`).
pub const NDO_XMIT: u64 = 1 << 2;
/// What the XDP data plane needs of every interface it redirects between.
pub const NEEDED: u64 = BASIC | REDIRECT | NDO_XMIT;

/// A device's `xdp-features` bits (`NETDEV_XDP_ACT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpFeatures(pub u64);

impl XdpFeatures {
    /// Whether the device can take part in native XDP forwarding: [`NEEDED`] is all set.
    pub fn forwards(self) -> bool {
        self.0 & NEEDED == NEEDED
    }
}

/// Reads as the kernel names them, the needed ones that are missing marked: `basic,
/// redirect, no ndo-xmit`.
impl fmt::Display for XdpFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<String> = [
            (BASIC, "basic"),
            (REDIRECT, "redirect"),
            (NDO_XMIT, "ndo-xmit"),
        ]
        .iter()
        .map(|&(bit, name)| {
            if self.0 & bit != 0 {
                name.to_string()
            } else {
                format!("no {name}")
            }
        })
        .collect();
        f.write_str(&words.join(", "))
    }
}

/// Netlink's own message types and flags (linux/netlink.h).
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
/// Generic netlink's controller (linux/genetlink.h).
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// The `netdev` family (linux/netdev.h).
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// Header sizes: `nlmsghdr`, `genlmsghdr`, `nlattr`.
const NLMSG_HDR: usize = 16;
const GENL_HDR: usize = 4;
const ATTR_HDR: usize = 4;

/// The `xdp-features` of the device with index `ifindex`.
///
/// Returns `Ok(None)` when the kernel cannot tell (no `netdev` netlink family: before Linux
/// 6.3), `Err` when the socket cannot be used or the kernel refuses the request (e.g.
/// `ENODEV` for an index no device has).
pub fn of(ifindex: u32) -> io::Result<Option<XdpFeatures>> {
    let socket = GenlSocket::open()?;
    let Some(family) = socket.family_id("netdev")? else {
        return Ok(None);
    };
    let reply = socket.request(
        family,
        NETDEV_CMD_DEV_GET,
        &attr(NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes()),
    )?;
    Ok(find_attr(&reply, NETDEV_A_DEV_XDP_FEATURES)
        .and_then(|v| v.get(..8))
        .and_then(|v| v.try_into().ok())
        .map(|b: [u8; 8]| XdpFeatures(u64::from_ne_bytes(b))))
}

/// One netlink attribute: header, payload, padding to 4 bytes.
fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = ATTR_HDR + payload.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// The payload of the first attribute of type `kind` in `attrs`; `None` when absent or when
/// the attributes are malformed.
fn find_attr(attrs: &[u8], kind: u16) -> Option<&[u8]> {
    let mut rest = attrs;
    while rest.len() >= ATTR_HDR {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        // The top bits are flags (nested, byte order).
        let t = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < ATTR_HDR || len > rest.len() {
            return None;
        }
        if t == kind {
            return Some(&rest[ATTR_HDR..len]);
        }
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    None
}

/// A generic netlink socket of the current network namespace.
struct GenlSocket {
    fd: OwnedFd,
}

impl GenlSocket {
    fn open() -> io::Result<GenlSocket> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A kernel that never answers must not hang the placement.
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: a valid timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(GenlSocket { fd })
    }

    /// The id of the generic netlink family `name`; `None` when the kernel has no such family.
    fn family_id(&self, name: &str) -> io::Result<Option<u16>> {
        let mut cname = name.as_bytes().to_vec();
        cname.push(0);
        match self.request(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            &attr(CTRL_ATTR_FAMILY_NAME, &cname),
        ) {
            Ok(reply) => Ok(find_attr(&reply, CTRL_ATTR_FAMILY_ID)
                .and_then(|v| v.get(..2))
                .map(|v| u16::from_ne_bytes([v[0], v[1]]))),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one request (`family`, `cmd`, `attrs`) and returns the attributes of its answer.
    fn request(&self, family: u16, cmd: u8, attrs: &[u8]) -> io::Result<Vec<u8>> {
        let len = NLMSG_HDR + GENL_HDR + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns it
        msg.extend_from_slice(&[cmd, 1, 0, 0]); // command, version 1, reserved
        msg.extend_from_slice(attrs);
        // SAFETY: a buffer of `msg.len()` bytes; the kernel is the default destination.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 16 * 1024];
        // SAFETY: writes at most `buf.len()` bytes into `buf`.
        let got = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        parse_reply(&buf[..got as usize])
    }
}

/// The attributes of a generic netlink answer, or the error the kernel sent instead.
fn parse_reply(reply: &[u8]) -> io::Result<Vec<u8>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer");
    let header = reply.get(..NLMSG_HDR).ok_or_else(bad)?;
    let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let kind = u16::from_ne_bytes([header[4], header[5]]);
    let body = reply.get(NLMSG_HDR..len.min(reply.len())).ok_or_else(bad)?;
    if kind == NLMSG_ERROR {
        let code = body.get(..4).ok_or_else(bad)?;
        let errno = -i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
        return Err(if errno == 0 {
            // An acknowledgement where an answer was expected.
            bad()
        } else {
            io::Error::from_raw_os_error(errno)
        });
    }
    Ok(body.get(GENL_HDR..).ok_or_else(bad)?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_their_padding() {
        let mut attrs = attr(7, b"abc");
        assert_eq!(attrs.len(), 8, "4 header bytes, 3 payload, 1 padding");
        attrs.extend(attr(NETDEV_A_DEV_XDP_FEATURES, &NEEDED.to_ne_bytes()));
        assert_eq!(find_attr(&attrs, 7), Some(&b"abc"[..]));
        assert_eq!(
            find_attr(&attrs, NETDEV_A_DEV_XDP_FEATURES),
            Some(&NEEDED.to_ne_bytes()[..])
        );
        assert_eq!(find_attr(&attrs, 9), None);
        // A length past the end is malformed, not a panic.
        assert_eq!(find_attr(&[200, 0, 3, 0, 1], 3), None);
    }

    #[test]
    fn features_read_as_the_kernel_names_them() {
        assert!(XdpFeatures(NEEDED | 1 << 5).forwards());
        let no_xmit = XdpFeatures(BASIC | REDIRECT);
        assert!(!no_xmit.forwards());
        assert_eq!(no_xmit.to_string(), "basic, redirect, no ndo-xmit");
    }

    #[test]
    fn the_loopback_device_does_not_forward_xdp() {
        // Index 1 is `lo` in every network namespace.
        match of(1) {
            Ok(Some(features)) => assert!(!features.forwards(), "lo: {features}"),
            Ok(None) => eprintln!("this kernel has no netdev netlink family (before 6.3)"),
            Err(e) => panic!("xdp-features of lo: {e}"),
        }
    }

    #[test]
    fn a_missing_device_is_an_error() {
        let e = of(u32::MAX - 7).expect_err("no device has that index");
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
    }
}
