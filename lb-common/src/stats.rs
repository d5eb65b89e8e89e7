//! Counter layouts shared by the XDP programs and the daemon: the global `STATS` indexes, and
//! the per-service / per-backend [`Counters`].
//!
//! All counter maps are per-CPU: the program adds without atomics, the daemon sums the CPUs.

/// Indexes of the global per-CPU `u64` counters in the `STATS` map. Counts since load.
///
/// `Pass*` packets went to the kernel stack untouched, `Drop*` ones were dropped, `Refused*`
/// ones were turned away by a per-client limit or for want of a SNAT port (a TCP SYN answered
/// with a RST, anything else dropped), `Reset*` ones answered with a RST (or dropped when they
/// cannot be). Besides `Packets`, each packet `lb_xdp` sees lands in exactly one of the
/// `Pass*` counters, `Forwarded`, `NatReplies`, `DsrReplies`, `IcmpTranslated`,
/// `IcmpToBackend`, `FibPass`, a `Refused*`, a `Reset*` or a `Drop*` counter; `CtMissNonSyn`
/// comes on top.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Every packet `lb_xdp` saw.
    Packets = 0,
    /// Well-formed TCP/UDP (or other) packets not for a VIP and not a NAT reply: passed.
    PassNotVip = 1,
    /// IPv4 fragments (first or not) not addressed to a VIP: passed untouched (see
    /// [`Stat::DropFragment`] for those that are).
    PassFragment = 2,
    /// Malformed or truncated headers (Ethernet, VLAN, IP, TCP/UDP; IHL < 5, a total length
    /// beyond the frame): passed untouched; the kernel drops what it also finds broken.
    PassMalformed = 3,
    /// IPv6 packets with extension headers before TCP/UDP, not addressed to a VIP: passed
    /// untouched.
    PassIpv6ExtHeaders = 4,
    /// Client packets for a VIP sent on to a backend (`XDP_TX` or `XDP_REDIRECT`).
    Forwarded = 5,
    /// NAT replies translated back to VIP → client and sent on.
    NatReplies = 6,
    /// TCP packets without SYN that found no conntrack entry. On `dsr` they are placed by the
    /// table (as a new flow would be) and recorded; on `nat` they take no SNAT port and are
    /// reset ([`Stat::ResetNatNoFlow`]) unless their port's entry survived.
    CtMissNonSyn = 7,
    /// Rewritten packets passed to the kernel: the next hop's MAC is not known yet, the
    /// route lookup found no route to forward by (none at all, or a local destination), or a
    /// NAT reply's route to the client leaves by an interface XDP cannot redirect to. The
    /// kernel then resolves the neighbour and forwards, delivers, or drops the packet itself.
    FibPass = 8,
    /// Dropped: the service has no eligible backend (empty table or unused backend id), for a
    /// UDP datagram or a TCP segment that cannot be turned into a RST; a TCP segment is
    /// otherwise answered and counted in [`Stat::RefusedNoBackend`].
    DropNoBackend = 9,
    /// Dropped: every SNAT port probed for a new NAT flow was in use or held (UDP, or a SYN
    /// that could not be turned into a RST; a TCP SYN is otherwise answered and counted in
    /// [`Stat::RefusedNatPortsExhausted`]). See "SNAT ports" in `lb_common::maps`.
    DropNatPortsExhausted = 10,
    /// Dropped: `bpf_fib_lookup` found a blackhole, unreachable or prohibit route, or failed.
    DropNoRoute = 11,
    /// Dropped: the packet (after encapsulation) exceeds the egress MTU and is not answered
    /// with [`Stat::TooBigSent`]: an IPv4 packet without DF (the balancer does not fragment),
    /// one shorter than the answer's quote, a UDP NAT reply, or over the answers' rate
    /// limit.
    DropMtu = 12,
    /// Dropped: the egress interface is not in `DEVMAP`.
    DropNoDevmapEntry = 13,
    /// Dropped: `bpf_xdp_adjust_head` failed (no headroom for the encapsulation).
    DropAdjustHead = 14,
    /// Dropped: the service's entry is invalid (mode, family or SNAT range).
    DropBadService = 15,
    /// `lb_decap`: encapsulated packets stripped and passed up.
    Decapsulated = 16,
    /// `lb_decap`: packets that were not encapsulated (or malformed), passed untouched.
    DecapPassed = 17,
    /// Dropped: forwarding is disabled on the ingress interface, so `bpf_fib_lookup` refuses
    /// to route (set `net.ipv4.conf.<if>.forwarding=1` / `net.ipv6.conf.all.forwarding=1`).
    DropForwardingDisabled = 18,
    /// Refused: a new flow from a client whose token bucket is empty (the service's
    /// `new_connections_per_second` and `burst`). A TCP SYN is answered with a RST sent back
    /// out of the interface it came in on (`XDP_TX`; dropped when it has IPv4 options or the
    /// frame cannot be shortened), a UDP packet is dropped.
    RefusedClientRate = 19,
    /// Refused, as [`Stat::RefusedClientRate`]: a new TCP flow from a client that holds the
    /// service's `max_connections_per_client` already.
    RefusedClientConnections = 20,
    /// `lb_decap`: IPIP / IP6IP6 packets whose outer destination is not in `DECAP_ADDRS`
    /// (a tunnel ending on another host), passed untouched.
    DecapNotLocal = 21,
    /// ICMP errors about a NAT'ed flow (IPv4 destination unreachable, fragmentation needed
    /// among them; ICMPv6 destination unreachable, packet too big) translated back to the
    /// flow's client and sent on.
    IcmpTranslated = 22,
    /// ICMP errors a router on the client's side sent to a `nat` VIP about a reply (IPv4
    /// destination unreachable, fragmentation needed among them; ICMPv6 destination
    /// unreachable, packet too big) translated towards the flow's backend, as from
    /// `local_addr` about the backend's own reply, and sent on.
    IcmpToBackend = 23,
    /// Dropped: an ICMP error about a NAT reply (to the VIP) that claims a path MTU below
    /// [`MIN_REPLY_PATH_MTU`](crate::maps::MIN_REPLY_PATH_MTU). The backend caches a path MTU
    /// per destination, and every NAT'ed flow of a backend has the same destination
    /// (`local_addr`): translated, one client (or a forged error) would lower the MTU the
    /// backend uses for every client, for as long as its cache keeps it.
    DropIcmpLowMtu = 24,
    /// Refused: a new NAT flow found no free SNAT port (see "SNAT ports" in
    /// `lb_common::maps`); its TCP SYN is answered with a RST as for
    /// [`Stat::RefusedClientRate`], so the client fails at once. (A UDP packet in that case
    /// counts as [`Stat::DropNatPortsExhausted`].)
    RefusedNatPortsExhausted = 25,
    /// Answered with a RST (dropped if it carries one): a TCP segment without SYN of a `nat`
    /// service whose flow has no SNAT port towards the backend the table gives (its
    /// conntrack and `NAT_REVERSE` entries are gone, or its backend went down). That backend
    /// never saw the flow, so the segment takes no port, and the client learns at once that
    /// the connection is gone.
    ResetNatNoFlow = 26,
    /// Answered with a RST (dropped if it carries one, or for UDP): a packet of a `nat` flow
    /// whose SNAT port another flow took over after this one ended or idled past the
    /// service's idle timeout.
    ResetNatPortReclaimed = 27,
    /// Dropped: a TCP segment with SYN and FIN, or SYN and RST (no real stack sends one).
    DropSynFin = 28,
    /// `lb_decap`: IPIP / IP6IP6 packets for this host whose outer source is not in
    /// `DECAP_SOURCES` (not a balancer): dropped.
    DecapBadSource = 29,
    /// Dropped: an IPv4 fragment (first or later) addressed to a VIP (`VIP_ADDRS`): the
    /// balancer cannot place it, and the kernel would route it onward.
    DropFragment = 30,
    /// Dropped: an IPv6 packet with extension headers addressed to a VIP (`VIP_ADDRS`).
    DropIpv6ExtHeaders = 31,
    /// Dropped: a packet `nat` would translate (a client's to a VIP, a backend's reply) whose
    /// TTL or hop limit is 1 or 0: NAT forwards like a router and decrements it, and a router
    /// drops a packet it cannot decrement below 1 (no ICMP time exceeded is sent).
    DropTtlExpired = 32,
    /// Answered: a client's packet that would exceed the backend link's MTU (`nat`: as it
    /// is; `dsr`: once encapsulated) got an ICMP "fragmentation needed" (IPv4 with DF) or
    /// ICMPv6 "packet too big" back to the client from the VIP, announcing the MTU (less the
    /// outer header), so the client resends smaller (RFC 1191, RFC 8201); or a backend's TCP
    /// NAT reply that would exceed the route's MTU towards the client got one back to the
    /// backend from the NAT address. At most `TOO_BIG_PER_SECOND` answers a second per CPU;
    /// the rest are [`Stat::DropMtu`].
    TooBigSent = 33,
    /// Answered with a RST: a TCP segment (a SYN, or a DSR segment without a conntrack entry)
    /// of a service with no eligible backend, or one that stopped taking new flows (the daemon
    /// drains on SIGTERM), so the client fails at once instead of retrying a dropped SYN.
    RefusedNoBackend = 34,
    /// Dropped: a backend's RST answering a `nat` flow's SYN before the backend answered
    /// anything else of it (the backend refused the connection: stopped, or its port
    /// closed). The client resends its SYN (1 s later on Linux), which is placed again, on
    /// another backend once the health checks took this one out: a dead backend costs the
    /// client a second, not the connection (the proxy retries another backend the same way).
    DropRefusedSyn = 35,
    /// Replies of `dsr` services (from the VIP and port, to the client) that the balancer's
    /// host routes, sent on by `lb_tc` as the kernel would have forwarded them (TTL / hop limit
    /// decremented, nothing else changed). `lb_xdp` passes them to the kernel
    /// ([`Stat::PassNotVip`]).
    DsrReplies = 36,
}

/// Entries of the `STATS` map: one past the highest [`Stat`].
pub const STATS_LEN: u32 = 37;

impl Stat {
    /// Every counter, in index order (`Stat::ALL[i] as u32 == i`).
    pub const ALL: [Stat; STATS_LEN as usize] = [
        Stat::Packets,
        Stat::PassNotVip,
        Stat::PassFragment,
        Stat::PassMalformed,
        Stat::PassIpv6ExtHeaders,
        Stat::Forwarded,
        Stat::NatReplies,
        Stat::CtMissNonSyn,
        Stat::FibPass,
        Stat::DropNoBackend,
        Stat::DropNatPortsExhausted,
        Stat::DropNoRoute,
        Stat::DropMtu,
        Stat::DropNoDevmapEntry,
        Stat::DropAdjustHead,
        Stat::DropBadService,
        Stat::Decapsulated,
        Stat::DecapPassed,
        Stat::DropForwardingDisabled,
        Stat::RefusedClientRate,
        Stat::RefusedClientConnections,
        Stat::DecapNotLocal,
        Stat::IcmpTranslated,
        Stat::IcmpToBackend,
        Stat::DropIcmpLowMtu,
        Stat::RefusedNatPortsExhausted,
        Stat::ResetNatNoFlow,
        Stat::ResetNatPortReclaimed,
        Stat::DropSynFin,
        Stat::DecapBadSource,
        Stat::DropFragment,
        Stat::DropIpv6ExtHeaders,
        Stat::DropTtlExpired,
        Stat::TooBigSent,
        Stat::RefusedNoBackend,
        Stat::DropRefusedSyn,
        Stat::DsrReplies,
    ];

    /// The counter's name in logs and metrics (`lb_xdp_packet_outcomes_total{outcome}`):
    /// the variant in snake case, e.g. `drop_nat_ports_exhausted`.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Packets => "packets",
            Stat::PassNotVip => "pass_not_vip",
            Stat::PassFragment => "pass_fragment",
            Stat::PassMalformed => "pass_malformed",
            Stat::PassIpv6ExtHeaders => "pass_ipv6_ext_headers",
            Stat::Forwarded => "forwarded",
            Stat::NatReplies => "nat_replies",
            Stat::CtMissNonSyn => "ct_miss_non_syn",
            Stat::FibPass => "fib_pass",
            Stat::DropNoBackend => "drop_no_backend",
            Stat::DropNatPortsExhausted => "drop_nat_ports_exhausted",
            Stat::DropNoRoute => "drop_no_route",
            Stat::DropMtu => "drop_mtu",
            Stat::DropNoDevmapEntry => "drop_no_devmap_entry",
            Stat::DropAdjustHead => "drop_adjust_head",
            Stat::DropBadService => "drop_bad_service",
            Stat::Decapsulated => "decapsulated",
            Stat::DecapPassed => "decap_passed",
            Stat::DropForwardingDisabled => "drop_forwarding_disabled",
            Stat::RefusedClientRate => "refused_client_rate",
            Stat::RefusedClientConnections => "refused_client_connections",
            Stat::DecapNotLocal => "decap_not_local",
            Stat::IcmpTranslated => "icmp_translated",
            Stat::IcmpToBackend => "icmp_to_backend",
            Stat::DropIcmpLowMtu => "drop_icmp_low_mtu",
            Stat::RefusedNatPortsExhausted => "refused_nat_ports_exhausted",
            Stat::ResetNatNoFlow => "reset_nat_no_flow",
            Stat::ResetNatPortReclaimed => "reset_nat_port_reclaimed",
            Stat::DropSynFin => "drop_syn_fin",
            Stat::DecapBadSource => "decap_bad_source",
            Stat::DropFragment => "drop_fragment",
            Stat::DropIpv6ExtHeaders => "drop_ipv6_ext_headers",
            Stat::DropTtlExpired => "drop_ttl_expired",
            Stat::TooBigSent => "too_big_sent",
            Stat::RefusedNoBackend => "refused_no_backend",
            Stat::DropRefusedSyn => "drop_refused_syn",
            Stat::DsrReplies => "dsr_replies",
        }
    }

    /// The counter at `STATS` index `index`; `None` past the last one (a newer program).
    pub fn from_index(index: usize) -> Option<Stat> {
        Stat::ALL.get(index).copied()
    }
}

/// Value of `SERVICE_STATS` and `BACKEND_STATS` (per CPU): client → VIP traffic the balancer
/// forwarded for that service or to that backend. NAT replies are not included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets forwarded (sent on, or passed to the kernel for a next hop without a neighbour
    /// entry: `Stat::Forwarded` + `Stat::FibPass` of this service's client packets).
    pub packets: u64,
    /// Bytes forwarded, counted as the frame arrived (Ethernet header included, before any
    /// encapsulation).
    pub bytes: u64,
    /// Of those packets, the ones that started a flow: placed by the table because conntrack
    /// had no usable entry (TCP SYNs, first UDP packets, TCP non-SYN misses also counted in
    /// [`Stat::CtMissNonSyn`], flows whose backend went down).
    pub new_flows: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_listed_at_its_index_with_a_unique_name() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, i, "Stat::ALL[{i}] is {stat:?}");
            assert_eq!(Stat::from_index(i), Some(*stat));
        }
        assert_eq!(Stat::from_index(STATS_LEN as usize), None);
        for (i, a) in Stat::ALL.iter().enumerate() {
            for b in &Stat::ALL[i + 1..] {
                assert_ne!(a.name(), b.name(), "{a:?} and {b:?} share a name");
            }
        }
        // Metric label values users already alert on.
        assert_eq!(
            Stat::DropNatPortsExhausted.name(),
            "drop_nat_ports_exhausted"
        );
        assert_eq!(Stat::RefusedClientRate.name(), "refused_client_rate");
    }
}
