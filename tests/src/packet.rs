//! Frames built from scratch for the XDP tests: every length and checksum computed here, so a
//! test can compare the balancer's output byte for byte with what it should be.
//!
//! The layers nest as on the wire: [`tcp`] or [`udp`] makes a segment, [`ip`] / [`ipv4`] /
//! [`ipv6`] an IP packet around it, [`frame`] / [`eth`] the Ethernet frame; [`forwarded`]
//! ages an IP packet by one hop, as a router (or the NAT) sends it on. [`Packet`] chains the
//! common case in one expression.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The EtherType of IPv4.
pub const ETH_IP: u16 = 0x0800;
/// The EtherType of IPv6.
pub const ETH_IPV6: u16 = 0x86dd;

/// The one's-complement sum of `data` as big-endian 16-bit words, folded.
pub fn sum(data: &[u8]) -> u32 {
    let mut acc: u32 = 0;
    for pair in data.chunks(2) {
        let hi = pair[0] as u32;
        let lo = pair.get(1).copied().unwrap_or(0) as u32;
        acc += hi << 8 | lo;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// The Internet checksum of the concatenation of `parts` (each of even length but the last).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut acc = 0u32;
    for p in parts {
        acc += sum(p);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The TCP/UDP pseudo-header for `len` bytes of `protocol` from `src` to `dst`.
pub fn pseudo(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, protocol]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, protocol]);
        }
        _ => panic!("mixed address families in one packet"),
    }
    p
}

/// A TCP segment (no options) with its checksum.
pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&0x1122_3344u32.to_be_bytes()); // sequence
    s.extend_from_slice(&(if flags & 0x10 != 0 { 0x5566_7788u32 } else { 0 }).to_be_bytes());
    s.extend_from_slice(&[5 << 4, flags]);
    s.extend_from_slice(&64240u16.to_be_bytes()); // window
    s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    s.extend_from_slice(payload);
    let c = checksum(&[&pseudo(src, dst, 6, s.len()), &s]);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// A UDP datagram with its checksum (0xffff when it computes to 0, RFC 768).
pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    let mut c = checksum(&[&pseudo(src, dst, 17, s.len()), &s]);
    if c == 0 {
        c = 0xffff;
    }
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
}

/// IPv4 header fields a test may vary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V4 {
    /// Type of service (DSCP and ECN).
    pub tos: u8,
    /// Identification.
    pub id: u16,
    /// Flags (0x4000 DF, 0x2000 MF) and fragment offset in 8-byte units.
    pub frag: u16,
    /// Time to live.
    pub ttl: u8,
}

/// What an ordinary client sends: id 0x1234, DF, TTL 64.
pub const V4_CLIENT: V4 = V4 {
    tos: 0,
    id: 0x1234,
    frag: 0x4000,
    ttl: 64,
};

/// An IPv4 packet with `options` (a multiple of 4 bytes) and its header checksum.
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    h: V4,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "IPv4 options pad to 32 bits");
    let ihl = 5 + options.len() / 4;
    let mut p = vec![0x40 | ihl as u8, h.tos];
    p.extend_from_slice(&((ihl * 4 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&h.id.to_be_bytes());
    p.extend_from_slice(&h.frag.to_be_bytes());
    p.extend_from_slice(&[h.ttl, protocol, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(options);
    let c = checksum(&[&p]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet: `vtc_flow` is the first 32-bit word (version, class, flow label).
pub fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    nexthdr: u8,
    vtc_flow: u32,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vtc_flow.to_be_bytes().to_vec();
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[nexthdr, hop_limit]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// An Ethernet frame, with an 802.1Q tag when `vlan` is set.
pub fn eth(
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    if let Some(tci) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `ip` as a router sends it on: TTL (IPv4, header checksum recomputed) or hop limit
/// (IPv6) one lower. What `nat` forwards.
pub fn forwarded(ip: &[u8]) -> Vec<u8> {
    let mut p = ip.to_vec();
    if p[0] >> 4 == 4 {
        let ihl = (p[0] & 0x0f) as usize * 4;
        p[8] -= 1;
        p[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&[&p[..ihl]]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        p[7] -= 1;
    }
    p
}

/// An IP packet (plain client header) carrying `l4` of `protocol`.
pub fn ip(src: IpAddr, dst: IpAddr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, protocol, V4_CLIENT, &[], l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, protocol, 0x6000_0000, 64, l4),
        _ => panic!("mixed address families in one packet"),
    }
}

/// An Ethernet frame carrying the IP packet `ip` (its EtherType from the version nibble).
pub fn frame(dst: [u8; 6], src: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let ethertype = if ip[0] >> 4 == 4 { ETH_IP } else { ETH_IPV6 };
    eth(dst, src, None, ethertype, ip)
}

/// Checks every checksum of `frame` from scratch: the IPv4 header checksum, the TCP/UDP
/// checksum, and those of an encapsulated packet. Panics with what is wrong.
pub fn assert_checksums(frame: &[u8], what: &str) {
    let mut at = 12;
    let mut ethertype = u16::from_be_bytes([frame[at], frame[at + 1]]);
    if ethertype == 0x8100 {
        at += 4;
        ethertype = u16::from_be_bytes([frame[at], frame[at + 1]]);
    }
    check_ip(&frame[at + 2..], ethertype, what);
}

fn check_ip(p: &[u8], ethertype: u16, what: &str) {
    let (src, dst, protocol, l4): (IpAddr, IpAddr, u8, &[u8]) = if ethertype == ETH_IP {
        let ihl = (p[0] & 0x0f) as usize * 4;
        let tot = u16::from_be_bytes([p[2], p[3]]) as usize;
        assert_eq!(
            checksum(&[&p[..ihl]]),
            0,
            "{what}: the IPv4 header checksum is wrong"
        );
        let s: [u8; 4] = p[12..16].try_into().expect("4 bytes");
        let d: [u8; 4] = p[16..20].try_into().expect("4 bytes");
        (s.into(), d.into(), p[9], &p[ihl..tot])
    } else {
        let len = u16::from_be_bytes([p[4], p[5]]) as usize;
        let s: [u8; 16] = p[8..24].try_into().expect("16 bytes");
        let d: [u8; 16] = p[24..40].try_into().expect("16 bytes");
        (s.into(), d.into(), p[6], &p[40..40 + len])
    };
    match protocol {
        4 => check_ip(l4, ETH_IP, what),
        41 => check_ip(l4, ETH_IPV6, what),
        6 | 17 => {
            let no_udp_sum = protocol == 17 && src.is_ipv4() && l4[6..8] == [0, 0];
            if !no_udp_sum {
                assert_eq!(
                    checksum(&[&pseudo(src, dst, protocol, l4.len()), l4]),
                    0,
                    "{what}: the {} checksum is wrong",
                    if protocol == 6 { "TCP" } else { "UDP" }
                );
            }
        }
        1 => assert_eq!(checksum(&[l4]), 0, "{what}: the ICMP checksum is wrong"),
        58 => assert_eq!(
            checksum(&[&pseudo(src, dst, 58, l4.len()), l4]),
            0,
            "{what}: the ICMPv6 checksum is wrong"
        ),
        _ => {}
    }
}

/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// The source port of the TCP/UDP header of an untagged frame without IP options.
pub fn l4_source_port(frame: &[u8]) -> u16 {
    let l4 = if frame[12..14] == [0x08, 0x00] {
        14 + 20
    } else {
        14 + 40
    };
    u16::from_be_bytes([frame[l4], frame[l4 + 1]])
}

/// The TCP flags byte of an IPv4 frame without options (no VLAN tag).
pub fn tcp_flags_of(frame: &[u8]) -> u8 {
    frame[14 + 20 + 13]
}

/// Panics, naming `what` and the first byte that differs, unless `got` is `want`.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: the output frame differs from the expected one at byte {first} \
             (lengths {} and {})\n got: {got:02x?}\nwant: {want:02x?}",
            got.len(),
            want.len()
        );
    }
}

/// The transport of a [`Packet`].
#[derive(Clone, Copy, Debug)]
enum Transport {
    /// TCP with these flags.
    Tcp(u8),
    Udp,
}

/// A TCP segment or UDP datagram in a plain IP packet (client header: IPv4 id 0x1234, DF,
/// TTL 64; IPv6 hop limit 64), built in one chain:
///
/// ```
/// # use lb_tests::packet::{Packet, TCP_SYN};
/// # use std::net::Ipv4Addr;
/// let (client, vip) = (Ipv4Addr::new(10, 0, 1, 100).into(), Ipv4Addr::new(10, 0, 0, 10).into());
/// let syn = Packet::tcp(client, 40000, vip, 80, TCP_SYN).frame([2, 0, 0, 0, 1, 1], [2, 0, 0, 0, 1, 0x64]);
/// assert_eq!(syn.len(), 14 + 20 + 20);
/// ```
/// Lengths and checksums are computed when the bytes are asked for ([`Packet::ip`],
/// [`Packet::frame`]); panics there when `src` and `dst` are of different families.
#[derive(Clone, Debug)]
pub struct Packet {
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    transport: Transport,
    payload: Vec<u8>,
    /// The IPv4 header fields ([`V4_CLIENT`] unless set).
    v4: V4,
    /// IPv4 options, a multiple of 4 bytes (none unless set).
    options: Vec<u8>,
    /// How many routers sent it on: each takes one off the TTL / hop limit.
    hops: u8,
}

impl Packet {
    /// A TCP segment (no options) from `src`:`sport` to `dst`:`dport` with `flags`; the
    /// acknowledgement number is set when `flags` has ACK.
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Packet {
        Packet::new(src, sport, dst, dport, Transport::Tcp(flags))
    }

    /// A UDP datagram from `src`:`sport` to `dst`:`dport`, with its checksum.
    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Packet {
        Packet::new(src, sport, dst, dport, Transport::Udp)
    }

    fn new(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, transport: Transport) -> Packet {
        Packet {
            src,
            sport,
            dst,
            dport,
            transport,
            payload: Vec::new(),
            v4: V4_CLIENT,
            options: Vec::new(),
            hops: 0,
        }
    }

    /// The same packet carrying `payload` (empty unless set).
    pub fn payload(mut self, payload: &[u8]) -> Packet {
        self.payload = payload.to_vec();
        self
    }

    /// The same packet with IPv4 header fields `v4` (an IPv4 packet only).
    pub fn v4(mut self, v4: V4) -> Packet {
        self.v4 = v4;
        self
    }

    /// The same packet with IPv4 `options`, a multiple of 4 bytes (an IPv4 packet only).
    pub fn options(mut self, options: &[u8]) -> Packet {
        self.options = options.to_vec();
        self
    }

    /// The same packet as a router sends it on: one hop further, its TTL / hop limit one lower
    /// (what `nat` forwards).
    pub fn forwarded(mut self) -> Packet {
        self.hops += 1;
        self
    }

    /// The TCP segment or UDP datagram alone, with its checksum.
    pub fn segment(&self) -> Vec<u8> {
        let (src, dst) = (self.src, self.dst);
        match self.transport {
            Transport::Tcp(flags) => tcp(src, self.sport, dst, self.dport, flags, &self.payload),
            Transport::Udp => udp(src, self.sport, dst, self.dport, &self.payload),
        }
    }

    /// The IP packet: header (checksum included) and segment. Panics when IPv4 header fields
    /// or options were set on an IPv6 packet.
    pub fn ip(&self) -> Vec<u8> {
        let protocol = match self.transport {
            Transport::Tcp(_) => 6,
            Transport::Udp => 17,
        };
        let segment = self.segment();
        let mut p = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                ipv4(s, d, protocol, self.v4, &self.options, &segment)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                assert!(
                    self.options.is_empty() && self.v4 == V4_CLIENT,
                    "IPv4 header fields or options on an IPv6 packet"
                );
                ipv6(s, d, protocol, 0x6000_0000, 64, &segment)
            }
            _ => panic!("mixed address families in one packet"),
        };
        for _ in 0..self.hops {
            p = forwarded(&p);
        }
        p
    }

    /// The Ethernet frame from MAC `src` to MAC `dst` carrying [`Packet::ip`].
    pub fn frame(&self, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        frame(dst, src, &self.ip())
    }
}
