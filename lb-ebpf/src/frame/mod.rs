//! The two hooks the balancer runs at, behind one trait: XDP (`xdp.rs`: a frame in the
//! driver's buffer, before the kernel made a socket buffer of it) and tc (`tc.rs`: a socket
//! buffer at the ingress hook, GSO/GRO super-packets whole). Everything else in this crate is
//! written once against [`Frame`]; the entry points `lb_xdp` and `lb_tc` instantiate it for
//! `XdpContext` and `TcContext`.
//!
//! What differs between the hooks, and only that, lives here: the return values, the packet's
//! length, how a checksum follows a rewrite (tc must keep a `CHECKSUM_PARTIAL` or
//! `CHECKSUM_COMPLETE` packet's transport checksum right, which only the kernel's helpers
//! can), how room for a header is made, and how a packet leaves (`XDP_TX` / `XDP_REDIRECT`
//! through `DEVMAP`, or `bpf_redirect` / `bpf_redirect_peer` / `bpf_redirect_neigh`).

mod tc;
mod xdp;

pub use tc::pull_headers;

use aya_ebpf::cty::c_void;
use lb_common::Stat;

/// How a checksum field relates to the change being folded into it.
#[derive(Clone, Copy)]
pub struct L4Check {
    /// The change is to the pseudo-header (addresses): a `CHECKSUM_PARTIAL` packet's field
    /// holds the pseudo-header's sum and must follow; a change to the transport header itself
    /// (ports) must then leave it alone, since the checksum is computed at transmit.
    pub pseudo: bool,
    /// UDP: a result of 0 is sent as 0xffff, and over IPv4 a field of 0 means "no checksum"
    /// and stays 0.
    pub udp: bool,
    /// IPv6 (for UDP's "no checksum" rule, and for how a tc packet's `CHECKSUM_COMPLETE`
    /// sum follows: the IPv6 header has no checksum of its own to absorb the change).
    pub v6: bool,
}

/// What [`Frame::insert_room`] makes room for.
#[derive(Clone, Copy)]
pub enum Room {
    /// The headers of an answer built from the packet (ICMP "too big"): what is left of the
    /// packet is a quote, sent back.
    Answer,
    /// An outer IPv4 (`v6` false) or IPv6 header of the packet's own family (DSR's IPIP /
    /// IP6IP6), which tc records so a GSO super-packet is segmented as a tunnelled one. `udp`:
    /// the inner packet is UDP, whose GSO segment size is its datagrams' size and must not
    /// change (a TCP super-packet's segments shrink by the header instead, to stay within
    /// the MTU).
    Tunnel {
        /// The outer header is IPv6.
        v6: bool,
        /// The inner packet is UDP.
        udp: bool,
    },
}

/// One packet at one of the balancer's hooks.
///
/// Offsets are from the start of the Ethernet header. Every pointer into the packet is taken
/// anew after a method that may move or resize it ([`Frame::l3_csum_add`],
/// [`Frame::l4_csum_add`], [`Frame::insert_room`], [`Frame::truncate`]): the verifier forgets
/// packet pointers across the helpers that change a socket buffer.
pub trait Frame {
    /// The return value that hands the packet to the kernel untouched.
    const PASS: u32;
    /// The return value that drops the packet.
    const DROP: u32;
    /// Whether an 802.1Q tag in the packet is the outer one. At XDP it is; at tc ingress the
    /// kernel has already taken the outer tag into the socket buffer's metadata (which goes
    /// with the packet when it is redirected), so a tag still in the packet is a second one,
    /// which the balancer passes like any second tag.
    const TAG_IN_PACKET: bool;
    /// Whether the hook forwards DSR replies the host routes (`dsr_reply`). tc does; XDP
    /// passes them to the kernel, which forwards them as any routed packet: its redirect can
    /// fail (an egress without a `DEVMAP` entry) where the kernel would still have forwarded
    /// the packet.
    const SENDS_DSR_REPLIES: bool;

    /// Address of the first byte the program can read directly.
    fn data(&self) -> usize;
    /// Address one past the last byte the program can read directly (XDP: the frame's end;
    /// tc: the end of the socket buffer's linear part).
    fn data_end(&self) -> usize;
    /// The whole packet's length in bytes, Ethernet header included (tc: with its paged data,
    /// a GSO super-packet's full length).
    fn len(&self) -> usize;
    /// The interface the packet came in on.
    fn ingress_ifindex(&self) -> u32;
    /// The context pointer the kernel gave the program, for helpers that take it.
    fn raw(&self) -> *mut c_void;
    /// The IP length to check against the route's MTU in `bpf_fib_lookup` for a packet that
    /// will be `ip_len` bytes: `ip_len`, or 0 (no check) for a tc GSO super-packet, whose
    /// length says nothing of its segments'. Those are not checked against the route's MTU
    /// at all yet: a route with a smaller MTU than the sender's link gets segments too large
    /// for it (a known gap; a TCP super-packet encapsulated for DSR does shrink its segments
    /// by the outer header).
    fn mtu_len(&self, ip_len: u16) -> u16;

    /// Folds `diff` (a one's-complement sum of the old values complemented and the new ones,
    /// see `csum::diff_addr`) into the IPv4 header checksum at `off`.
    fn l3_csum_add(&self, off: usize, diff: u32) -> Result<(), Stat>;
    /// Folds `diff` into the TCP / UDP checksum at `off`, under the rules `how` gives.
    fn l4_csum_add(&self, off: usize, diff: u32, how: L4Check) -> Result<(), Stat>;

    /// Makes `bytes` bytes of room in front of the IP header at `l3_off`, keeping the
    /// link-layer header (and a VLAN tag) at the packet's start, for what `room` says.
    /// `Err(Stat::DropAdjustHead)` when the room cannot be made.
    fn insert_room(&self, l3_off: usize, bytes: usize, room: Room) -> Result<(), Stat>;
    /// Removes the `bytes` bytes of the outer IPv4 (`v6` false) or IPv6 header at `l3_off`,
    /// whose inner packet is of the same family, keeping the link-layer header at the
    /// packet's start; a tc GSO super-packet stays whole, its segment size unchanged and no
    /// longer marked as tunnelled. `false` when it cannot, and the packet is as it was or, on
    /// XDP after the head moved, still starts with its link-layer header.
    fn remove_room(&self, l3_off: usize, bytes: usize, v6: bool) -> bool;
    /// Tells the kernel that bytes it summed on the way in (a tc packet's
    /// `CHECKSUM_COMPLETE` sum) changed by `diff` (old bytes complemented plus the new ones)
    /// where no checksum in the packet absorbs the change: an IPv6 hop limit, an inserted
    /// IPv6 header. Nothing on XDP, or for a packet without that sum.
    fn complete_sum_add(&self, diff: u32);
    /// Cuts the packet to its first `len` bytes (`len` at most [`Frame::len`]), all of them
    /// readable directly afterwards; `false` when it cannot.
    fn truncate(&self, len: usize) -> bool;

    /// Sends the packet back out of the interface it came in on (its addresses already
    /// turned around).
    fn turn_around(&self) -> u32;
    /// Sends the packet out of `ifindex`, its Ethernet addresses already written (`dmac`,
    /// the destination's); with `to_peer`, on tc, straight into the ingress of the peer of a
    /// veth in `VETH_PEERS`. On tc, when `ifindex` is a bridge and `BRIDGE_FDB` knows the
    /// port `dmac` is behind, out of that port instead (into its peer with `to_peer`).
    /// `Err(Stat::DropNoDevmapEntry)` when XDP may not redirect there.
    fn redirect(&self, ifindex: u32, dmac: &[u8; 6], to_peer: bool) -> Result<u32, Stat>;
    /// Sends the packet out of `ifindex`, the kernel finding the next hop by the packet's
    /// destination and resolving its Ethernet address (for a route whose neighbour has no
    /// entry yet); `None` where the hook cannot (XDP), and the packet is handed to the kernel
    /// instead.
    fn redirect_neigh(&self, ifindex: u32) -> Option<u32>;
    /// Whether the kernel would route this packet by the ingress interface's own routes: it
    /// is addressed to this host at the link layer (not another host's frame that a
    /// promiscuous interface, or a bridge with one, passes up) and carries no VLAN tag the
    /// kernel took out of it (such a packet belongs to the VLAN's device and its routes).
    /// XDP cannot tell and answers `false`.
    fn routed_here(&self) -> bool;
    /// Whether every segment of a GSO super-packet fits the MTU of interface `ifindex`
    /// (`bpf_check_mtu` with `BPF_MTU_CHK_SEGS`; `false` too when the helper fails); `true`
    /// for a packet that is not one (the route lookup checked its length) and at XDP, which
    /// has none.
    fn segments_fit(&self, ifindex: u32) -> bool;
}
