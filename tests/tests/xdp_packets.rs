//! The XDP balancer (`lb_xdp`) and decapsulator (`lb_decap`) on crafted packets, through
//! BPF_PROG_TEST_RUN (aya's `TestRun`).
//!
//! Each test loads the lb-ebpf object named by `LB_EBPF_OBJ` (set by `cargo xtask test`), so the
//! kernel's verifier checks both programs; it makes a namespace with two veth pairs (a client
//! side and a backend side, static neighbours, forwarding on) for `bpf_fib_lookup` to route in,
//! fills the maps the way `lb_common::maps` tells the daemon to, runs packets, and compares
//! each output frame byte for byte with the frame built from scratch here, whose checksums are
//! computed here from nothing (and checked once more on the output on their own).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use lb_common::{
    flow::{IPPROTO_TCP, IPPROTO_UDP},
    flow_hash,
    maps::{
        addr_words as words, family_of as family, table_index, Backend, ClientKey, ClientState,
        CtEntry, DecapAddr, Limits, NatReverse, Service, VipKey, VipValue, BACKENDS,
        BACKEND_F_DOWN, BACKEND_F_DRAINING, BACKEND_STATS, CLIENTS, CONNTRACK, CT_F_CLOSED,
        CT_F_COUNTED, CT_REFRESH_SECS, DECAP_ADDRS, DECAP_SOURCES, DEVMAP, LIMITS,
        MIN_REPLY_PATH_MTU, MODE_DSR, MODE_NAT, NAT_REVERSE, PROG_BALANCER, PROG_DECAP, SERVICES,
        SERVICE_STATS, STATS, TABLES, VIPS, VIP_ADDRS,
    },
    Counters, FlowKey, Stat,
};
use lb_tests::{
    netns::Netns,
    require_root,
    xdp::{bpf_object, Decap},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "unknown action",
    }
}

// The lab's addresses: clients come in on `vc` (10.0.1.1, fd00:1::1), backends sit behind
// `vb` (10.0.2.1, fd00:2::1, also the balancer's SNAT / outer source address).
const VC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const VB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x64];
const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x11];
const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x12];

const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 100);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const LOCAL4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const B1_4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 11);
const B2_4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 12);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
const LOCAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
const B1_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x11);

const SNAT_MIN: u16 = 20000;
const SNAT_MAX: u16 = 20099;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

fn flow(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, protocol: u8) -> FlowKey {
    FlowKey {
        src_addr: words(src),
        dst_addr: words(dst),
        src_port: sport,
        dst_port: dport,
        protocol,
        family: family(dst),
        _pad: [0; 2],
    }
}

/// Frames built from scratch: every length and checksum computed here.
mod wire {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    pub const ETH_IP: u16 = 0x0800;
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
    pub fn tcp(
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
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
    #[derive(Clone, Copy)]
    pub struct V4 {
        pub tos: u8,
        pub id: u16,
        pub frag: u16,
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
}

/// A loaded lb-ebpf object with its maps, and the namespace its packets are routed in.
struct Lab {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, VipValue>,
    services: Array<MapData, Service>,
    backends: Array<MapData, Backend>,
    tables: Array<MapData, u32>,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    nat_reverse: HashMap<MapData, FlowKey, NatReverse>,
    stats: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    limits: Array<MapData, Limits>,
    clients: HashMap<MapData, ClientKey, ClientState>,
    decap_addrs: HashMap<MapData, DecapAddr, u32>,
    /// The VIPs' addresses, as the daemon keeps them for fragments and extension headers.
    vip_addrs: HashMap<MapData, DecapAddr, u32>,
    /// ifindex of `vc`, where clients come in.
    vc: u32,
    /// ifindex of `vb`, behind which the backends are.
    vb: u32,
    ns: Netns,
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Lab {
    fn new() -> Lab {
        let path = std::env::var("LB_EBPF_OBJ").expect(
            "LB_EBPF_OBJ must name the built lb-ebpf object (`cargo xtask test` sets it; \
             or run `cargo xtask build-ebpf --release` and point it at the printed path)",
        );
        let mut ebpf = Ebpf::load_file(&path)
            .unwrap_or_else(|e| panic!("cannot load the BPF object {path}: {e}"));
        for name in [PROG_BALANCER, PROG_DECAP] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("the object has no program {name}"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is not an XDP program: {e}"));
            prog.load()
                .unwrap_or_else(|e| panic!("the kernel's verifier rejected {name}: {e:?}"));
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .unwrap_or_else(|| panic!("the object has no map {name}"))
        };
        let vips = HashMap::try_from(take(VIPS)).expect("VIPS is a hash map of VipKey → VipValue");
        let services = Array::try_from(take(SERVICES)).expect("SERVICES is an array of Service");
        let backends = Array::try_from(take(BACKENDS)).expect("BACKENDS is an array of Backend");
        let tables = Array::try_from(take(TABLES)).expect("TABLES is an array of u32");
        let conntrack =
            HashMap::try_from(take(CONNTRACK)).expect("CONNTRACK is a hash of FlowKey → CtEntry");
        let nat_reverse = HashMap::try_from(take(NAT_REVERSE))
            .expect("NAT_REVERSE is a hash of FlowKey → NatReverse");
        let mut devmap = DevMapHash::try_from(take(DEVMAP)).expect("DEVMAP is a devmap hash");
        let stats = PerCpuArray::try_from(take(STATS)).expect("STATS is a per-CPU array of u64");
        let service_stats =
            PerCpuArray::try_from(take(SERVICE_STATS)).expect("SERVICE_STATS holds Counters");
        let backend_stats =
            PerCpuArray::try_from(take(BACKEND_STATS)).expect("BACKEND_STATS holds Counters");
        let limits = Array::try_from(take(LIMITS)).expect("LIMITS is an array of Limits");
        let clients =
            HashMap::try_from(take(CLIENTS)).expect("CLIENTS is a hash of ClientKey → ClientState");
        let mut decap_addrs: HashMap<MapData, DecapAddr, u32> =
            HashMap::try_from(take(DECAP_ADDRS)).expect("DECAP_ADDRS is a hash of DecapAddr → u32");
        // The lab is also b1's host, where `lb_decap` runs: b1's addresses are local, and
        // the balancer's (LOCAL4, LOCAL6: the services' local_addr) are the tunnels' sources.
        for addr in [IpAddr::V4(B1_4), IpAddr::V6(B1_6)] {
            decap_addrs
                .insert(DecapAddr::new(addr), 1, 0)
                .expect("write DECAP_ADDRS");
        }
        let vip_addrs: HashMap<MapData, DecapAddr, u32> =
            HashMap::try_from(take(VIP_ADDRS)).expect("VIP_ADDRS is a hash of DecapAddr → u32");
        let mut decap_sources: HashMap<MapData, DecapAddr, u32> =
            HashMap::try_from(take(DECAP_SOURCES))
                .expect("DECAP_SOURCES is a hash of DecapAddr → u32");
        for addr in [IpAddr::V4(LOCAL4), IpAddr::V6(LOCAL6)] {
            decap_sources
                .insert(DecapAddr::new(addr), 0, 0)
                .expect("write DECAP_SOURCES");
        }

        let ns = Netns::new("xdp").expect("create the lab namespace");
        let setup: &[&[&str]] = &[
            &[
                "link",
                "add",
                "vc",
                "address",
                &mac(VC_MAC),
                "type",
                "veth",
                "peer",
                "name",
                "vcp",
            ],
            &[
                "link",
                "add",
                "vb",
                "address",
                &mac(VB_MAC),
                "type",
                "veth",
                "peer",
                "name",
                "vbp",
            ],
            &["addr", "add", "10.0.1.1/24", "dev", "vc"],
            &["addr", "add", "10.0.2.1/24", "dev", "vb"],
            &["-6", "addr", "add", "fd00:1::1/64", "dev", "vc", "nodad"],
            &["-6", "addr", "add", "fd00:2::1/64", "dev", "vb", "nodad"],
            &["link", "set", "vc", "up"],
            &["link", "set", "vcp", "up"],
            &["link", "set", "vb", "up"],
            &["link", "set", "vbp", "up"],
        ];
        for args in setup {
            ns.ip(args).expect("set up the lab's interfaces");
        }
        for (addr, lladdr, dev) in [
            ("10.0.1.100", CLIENT_MAC, "vc"),
            ("fd00:1::100", CLIENT_MAC, "vc"),
            ("10.0.2.11", B1_MAC, "vb"),
            ("10.0.2.12", B2_MAC, "vb"),
            ("fd00:2::11", B1_MAC, "vb"),
        ] {
            ns.ip(&[
                "neigh",
                "add",
                addr,
                "lladdr",
                &mac(lladdr),
                "dev",
                dev,
                "nud",
                "permanent",
            ])
            .expect("add a static neighbour");
        }
        ns.sysctl("net.ipv4.ip_forward", "1")
            .expect("enable IPv4 forwarding");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")
            .expect("enable IPv6 forwarding");
        let (vc, vb) = ns
            .enter(|| {
                let index = |n: &str| nix::net::if_::if_nametoindex(n).expect("interface index");
                (index("vc"), index("vb"))
            })
            .expect("enter the lab namespace");
        // The kernel resolves a devmap entry's ifindex in the writer's namespace.
        ns.enter(|| {
            for ifindex in [vc, vb] {
                devmap
                    .insert(ifindex, ifindex, None, 0)
                    .expect("fill DEVMAP");
            }
        })
        .expect("enter the lab namespace");
        Lab {
            ebpf,
            vips,
            services,
            backends,
            tables,
            conntrack,
            nat_reverse,
            stats,
            service_stats,
            backend_stats,
            limits,
            clients,
            decap_addrs,
            vip_addrs,
            vc,
            vb,
            ns,
        }
    }

    fn backend(&mut self, id: u32, addr: IpAddr, port: u16) {
        let b = Backend {
            addr: words(addr),
            port,
            family: family(addr),
            flags: 0,
        };
        self.backends.set(id, b, 0).expect("write BACKENDS");
    }

    fn set_backend_flags(&mut self, id: u32, flags: u8) {
        let mut b = self.backends.get(&id, 0).expect("read BACKENDS");
        b.flags = flags;
        self.backends.set(id, b, 0).expect("write BACKENDS");
    }

    /// Adds service `id` for `vip`:`port`/`protocol` in `mode` with the table `slots`, in the
    /// daemon's order: table, service, VIP last.
    fn service(&mut self, id: u32, vip: IpAddr, port: u16, protocol: u8, mode: u8, slots: &[u32]) {
        let local = if vip.is_ipv4() {
            IpAddr::V4(LOCAL4)
        } else {
            IpAddr::V6(LOCAL6)
        };
        let s = Service {
            mode,
            family: family(vip),
            local_addrs: 0,
            _pad: 0,
            active_half: 0,
            table_size: [0, 0],
            local_addr: words(local),
            snat_port_min: SNAT_MIN,
            snat_port_max: SNAT_MAX,
            snat_hold_s: 0,
        };
        self.services.set(id, s, 0).expect("write SERVICES");
        self.publish(id, slots);
        let key = VipKey {
            addr: words(vip),
            port,
            protocol,
            family: family(vip),
        };
        self.vips
            .insert(key, VipValue { service: id }, 0)
            .expect("write VIPS");
        self.vip_addrs
            .insert(DecapAddr::new(vip), 0, 0)
            .expect("write VIP_ADDRS");
    }

    /// Publishes a new table for service `id` as the contract says: inactive half, its size,
    /// then the flip.
    fn publish(&mut self, id: u32, slots: &[u32]) {
        let mut s = self.services.get(&id, 0).expect("read SERVICES");
        let inactive = 1 - s.active_half;
        for (slot, backend) in slots.iter().enumerate() {
            self.tables
                .set(table_index(id, inactive, slot as u32), backend, 0)
                .expect("write TABLES");
        }
        s.table_size[inactive as usize] = slots.len() as u32;
        self.services.set(id, s, 0).expect("write SERVICES (size)");
        s.active_half = inactive;
        self.services.set(id, s, 0).expect("write SERVICES (flip)");
    }

    /// Runs `prog` on `frame` as if it arrived on `ingress`; the action and the output frame.
    fn run(&self, prog: &str, ingress: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let xdp: &Xdp = self
            .ebpf
            .program(prog)
            .expect("program present")
            .try_into()
            .expect("an XDP program");
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let md: Vec<u8> = [0, frame.len() as u32, 0, ingress, 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .ns
            .enter(|| {
                xdp.test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&md),
                    ..TestRunOptions::default()
                })
            })
            .expect("enter the lab namespace")
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {prog} failed: {e:?}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs the balancer and asserts the action.
    fn expect(&self, ingress: u32, frame: &[u8], action: u32, what: &str) -> Vec<u8> {
        let (got, out) = self.run(PROG_BALANCER, ingress, frame);
        assert_eq!(
            action_name(got),
            action_name(action),
            "{what}: the balancer answered {} instead of {}",
            action_name(got),
            action_name(action)
        );
        out
    }

    fn stat(&self, stat: Stat) -> u64 {
        self.stats
            .get(&(stat as u32), 0)
            .expect("read STATS")
            .iter()
            .sum()
    }

    fn counters(map: &PerCpuArray<MapData, Counters>, id: u32) -> Counters {
        let mut total = Counters::default();
        for c in map.get(&id, 0).expect("read counters").iter() {
            total.packets += c.packets;
            total.bytes += c.bytes;
            total.new_flows += c.new_flows;
        }
        total
    }

    fn service_counters(&self, id: u32) -> Counters {
        Self::counters(&self.service_stats, id)
    }

    fn backend_counters(&self, id: u32) -> Counters {
        Self::counters(&self.backend_stats, id)
    }
}

fn lab(test: &str) -> Option<Lab> {
    if !require_root(test) {
        return None;
    }
    Some(Lab::new())
}

/// Source port of the TCP/UDP header of an untagged frame without IP options.
fn l4_source_port(frame: &[u8]) -> u16 {
    let l4 = if frame[12..14] == [0x08, 0x00] {
        14 + 20
    } else {
        14 + 40
    };
    u16::from_be_bytes([frame[l4], frame[l4 + 1]])
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
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

#[test]
fn nat_ipv4_tcp_goes_to_the_backend_from_the_balancer_and_the_reply_back_to_the_client() {
    let Some(mut lab) = lab("nat_ipv4_tcp") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B2_4.into(), 8080);
    let slots = [0, 1, 0, 1, 0, 1, 1];
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &slots);

    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let syn = wire::frame(
        VC_MAC,
        CLIENT_MAC,
        &wire::ip(
            client,
            vip,
            6,
            &wire::tcp(client, 40000, vip, 80, TCP_SYN, b""),
        ),
    );
    let out = lab.expect(lab.vc, &syn, XDP_REDIRECT, "a SYN to the VIP");

    let key = flow(client, 40000, vip, 80, IPPROTO_TCP);
    let backend_id = slots[(flow_hash(&key) % slots.len() as u32) as usize];
    let (b_addr, b_mac) = if backend_id == 0 {
        (B1_4, B1_MAC)
    } else {
        (B2_4, B2_MAC)
    };
    let snat = l4_source_port(&out);
    assert!(
        (SNAT_MIN..=SNAT_MAX).contains(&snat),
        "the SNAT port {snat} is outside the service's range {SNAT_MIN}..={SNAT_MAX}"
    );
    let (local, backend): (IpAddr, IpAddr) = (LOCAL4.into(), b_addr.into());
    let want = wire::frame(
        b_mac,
        VB_MAC,
        &wire::forwarded(&wire::ip(
            local,
            backend,
            6,
            &wire::tcp(local, snat, backend, 8080, TCP_SYN, b""),
        )),
    );
    wire::assert_checksums(&out, "the SYN sent to the backend");
    assert_same(&out, &want, "the SYN sent to the backend");
    let entry = lab
        .conntrack
        .get(&key, 0)
        .expect("conntrack has the new flow");
    assert_eq!(
        (entry.backend, entry.snat_port),
        (backend_id, snat),
        "conntrack does not record the backend and SNAT port the packet went out with"
    );

    // The backend's SYN-ACK comes back on the backend side.
    let reply = wire::frame(
        VB_MAC,
        b_mac,
        &wire::ip(
            backend,
            local,
            6,
            &wire::tcp(backend, 8080, local, snat, TCP_SYN | TCP_ACK, b"hi"),
        ),
    );
    let out = lab.expect(lab.vb, &reply, XDP_REDIRECT, "the backend's SYN-ACK");
    let want = wire::frame(
        CLIENT_MAC,
        VC_MAC,
        &wire::forwarded(&wire::ip(
            vip,
            client,
            6,
            &wire::tcp(vip, 80, client, 40000, TCP_SYN | TCP_ACK, b"hi"),
        )),
    );
    wire::assert_checksums(&out, "the SYN-ACK sent to the client");
    assert_same(&out, &want, "the SYN-ACK sent to the client");

    assert_eq!(lab.stat(Stat::Packets), 2, "the balancer saw 2 packets");
    assert_eq!(lab.stat(Stat::Forwarded), 1, "1 client packet forwarded");
    assert_eq!(lab.stat(Stat::NatReplies), 1, "1 reply translated back");
    let want = Counters {
        packets: 1,
        bytes: syn.len() as u64,
        new_flows: 1,
    };
    assert_eq!(
        lab.service_counters(0),
        want,
        "service counters after one SYN"
    );
    assert_eq!(
        lab.backend_counters(backend_id),
        want,
        "backend counters after one SYN"
    );
    assert_eq!(
        lab.backend_counters(1 - backend_id),
        Counters::default(),
        "the other backend counted traffic it never got"
    );
}

#[test]
fn nat_ipv6_udp_request_and_reply_are_translated() {
    let Some(mut lab) = lab("nat_ipv6_udp") else {
        return;
    };
    lab.backend(3, B1_6.into(), 5300);
    lab.service(2, VIP6.into(), 53, IPPROTO_UDP, MODE_NAT, &[3, 3, 3, 3, 3]);
    let (client, vip, local, backend): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT6.into(), VIP6.into(), LOCAL6.into(), B1_6.into());

    let request = wire::frame(
        VC_MAC,
        CLIENT_MAC,
        &wire::ip(client, vip, 17, &wire::udp(client, 5353, vip, 53, b"query")),
    );
    let out = lab.expect(
        lab.vc,
        &request,
        XDP_REDIRECT,
        "a UDP request to the IPv6 VIP",
    );
    let snat = l4_source_port(&out);
    assert!(
        (SNAT_MIN..=SNAT_MAX).contains(&snat),
        "SNAT port {snat} out of range"
    );
    let want = wire::frame(
        B1_MAC,
        VB_MAC,
        &wire::forwarded(&wire::ip(
            local,
            backend,
            17,
            &wire::udp(local, snat, backend, 5300, b"query"),
        )),
    );
    wire::assert_checksums(&out, "the request sent to the backend");
    assert_same(&out, &want, "the request sent to the backend");

    let reply_key = flow(backend, 5300, local, snat, IPPROTO_UDP);
    let reverse = lab
        .nat_reverse
        .get(&reply_key, 0)
        .expect("NAT_REVERSE has the flow");
    assert_eq!(
        (reverse.client_port, reverse.vip_port, reverse.service),
        (5353, 53, 2),
        "NAT_REVERSE records the wrong client, VIP port or service"
    );

    let reply = wire::frame(
        VB_MAC,
        B1_MAC,
        &wire::ip(
            backend,
            local,
            17,
            &wire::udp(backend, 5300, local, snat, b"answer"),
        ),
    );
    let out = lab.expect(lab.vb, &reply, XDP_REDIRECT, "the backend's UDP reply");
    let want = wire::frame(
        CLIENT_MAC,
        VC_MAC,
        &wire::forwarded(&wire::ip(
            vip,
            client,
            17,
            &wire::udp(vip, 53, client, 5353, b"answer"),
        )),
    );
    wire::assert_checksums(&out, "the reply sent to the client");
    assert_same(&out, &want, "the reply sent to the client");
    assert_eq!(lab.stat(Stat::NatReplies), 1, "1 reply translated back");
    assert_eq!(
        lab.backend_counters(3).new_flows,
        1,
        "one new UDP flow on the backend"
    );
}

#[test]
fn dsr_ipv4_tcp_is_encapsulated_in_ipip_and_decapsulated_on_the_backend() {
    let Some(mut lab) = lab("dsr_ipv4_tcp") else {
        return;
    };
    lab.backend(0, B1_4.into(), 0);
    lab.service(1, VIP4.into(), 80, IPPROTO_TCP, MODE_DSR, &[0, 0, 0]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let tos = wire::V4 {
        tos: 0x28,
        ..wire::V4_CLIENT
    };
    let inner = wire::ipv4(
        CLIENT4,
        VIP4,
        6,
        tos,
        &[],
        &wire::tcp(client, 41000, vip, 80, TCP_SYN, b""),
    );
    let syn = wire::frame(VC_MAC, CLIENT_MAC, &inner);
    let out = lab.expect(lab.vc, &syn, XDP_REDIRECT, "a SYN to the DSR VIP");
    let outer = wire::V4 {
        tos: 0x28,
        id: 0,
        frag: 0x4000,
        ttl: 64,
    };
    let want = wire::frame(
        B1_MAC,
        VB_MAC,
        &wire::ipv4(LOCAL4, B1_4, 4, outer, &[], &inner),
    );
    wire::assert_checksums(&out, "the IPIP packet sent to the backend");
    assert_same(&out, &want, "the IPIP packet sent to the backend");

    // The backend host's lb_decap hands the client's own packet to its stack.
    let (action, decapped) = lab.run(PROG_DECAP, lab.vb, &out);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "lb_decap must pass the inner packet up"
    );
    assert_same(
        &decapped,
        &wire::frame(B1_MAC, VB_MAC, &inner),
        "the decapsulated packet",
    );
    assert_eq!(lab.stat(Stat::Decapsulated), 1, "one packet decapsulated");

    // A client packet arriving on the interface the backend is behind leaves by XDP_TX.
    let out = lab.expect(lab.vb, &syn, XDP_TX, "a SYN arriving on the backend side");
    assert_same(
        &out,
        &want,
        "the IPIP packet sent back out of the same interface",
    );

    // lb_decap leaves packets that are not encapsulated alone.
    let (action, same) = lab.run(PROG_DECAP, lab.vb, &syn);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "lb_decap passes plain packets"
    );
    assert_same(&same, &syn, "a plain packet through lb_decap");
    assert_eq!(
        lab.stat(Stat::DecapPassed),
        1,
        "one plain packet passed by lb_decap"
    );
    assert_eq!(lab.stat(Stat::Forwarded), 2, "two client packets forwarded");
    assert_eq!(
        lab.service_counters(1),
        Counters {
            packets: 2,
            bytes: 2 * syn.len() as u64,
            new_flows: 1
        },
        "service counters after two packets of one flow"
    );
}

#[test]
fn dsr_ipv6_udp_is_encapsulated_in_ip6ip6_and_decapsulated_on_the_backend() {
    let Some(mut lab) = lab("dsr_ipv6_udp") else {
        return;
    };
    lab.backend(7, B1_6.into(), 0);
    lab.service(5, VIP6.into(), 53, IPPROTO_UDP, MODE_DSR, &[7]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT6.into(), VIP6.into());
    let inner = wire::ip(client, vip, 17, &wire::udp(client, 6000, vip, 53, b"query"));
    let request = wire::frame(VC_MAC, CLIENT_MAC, &inner);
    let out = lab.expect(
        lab.vc,
        &request,
        XDP_REDIRECT,
        "a request to the DSR IPv6 VIP",
    );
    let label = flow_hash(&flow(client, 6000, vip, 53, IPPROTO_UDP)) & 0x000f_ffff;
    let want = wire::frame(
        B1_MAC,
        VB_MAC,
        &wire::ipv6(LOCAL6, B1_6, 41, 0x6000_0000 | label, 64, &inner),
    );
    wire::assert_checksums(&out, "the IP6IP6 packet sent to the backend");
    assert_same(&out, &want, "the IP6IP6 packet sent to the backend");

    let (action, decapped) = lab.run(PROG_DECAP, lab.vb, &out);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "lb_decap must pass the inner packet up"
    );
    assert_same(
        &decapped,
        &wire::frame(B1_MAC, VB_MAC, &inner),
        "the decapsulated packet",
    );
    assert_eq!(
        lab.backend_counters(7).packets,
        1,
        "one packet counted on the backend"
    );
}

#[test]
fn a_draining_backend_keeps_its_flows_but_not_a_new_connection_on_an_old_4_tuple() {
    let Some(mut lab) = lab("conntrack_draining_backend") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B2_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0; 7]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let packet = |sport: u16, flags: u8| {
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(
                client,
                vip,
                6,
                &wire::tcp(client, sport, vip, 80, flags, b"x"),
            ),
        )
    };
    let dst_of = |frame: &[u8]| Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_SYN),
        XDP_REDIRECT,
        "flow A's SYN",
    );
    assert_eq!(
        dst_of(&out),
        B1_4,
        "flow A starts on b1, the only backend in the table"
    );

    // b1 is removed by a reload: it leaves the table and drains.
    lab.publish(0, &[1; 7]);
    lab.set_backend_flags(0, BACKEND_F_DRAINING);
    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_ACK),
        XDP_REDIRECT,
        "flow A's ACK",
    );
    assert_eq!(dst_of(&out), B1_4, "flow A left its draining backend");
    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_SYN),
        XDP_REDIRECT,
        "a new connection on flow A's 4-tuple",
    );
    assert_eq!(
        dst_of(&out),
        B2_4,
        "a new connection reusing a 4-tuple pinned to a draining backend went to it"
    );
    assert_eq!(
        lab.conntrack
            .get(&flow(client, 40001, vip, 80, IPPROTO_TCP), 0)
            .expect("the new connection recorded")
            .backend,
        1,
        "the new connection's conntrack entry"
    );
}

#[test]
fn lb_decap_leaves_tunnels_for_other_hosts_alone_and_counts_them() {
    let Some(mut lab) = lab("decap_not_local") else {
        return;
    };
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let inner = wire::ip(
        client,
        vip,
        6,
        &wire::tcp(client, 41000, vip, 80, TCP_SYN, b""),
    );
    let outer = wire::V4 {
        tos: 0,
        id: 0,
        frag: 0x4000,
        ttl: 64,
    };
    let to = |dst: Ipv4Addr| {
        wire::frame(
            B1_MAC,
            VB_MAC,
            &wire::ipv4(LOCAL4, dst, 4, outer, &[], &inner),
        )
    };
    let (action, out) = lab.run(PROG_DECAP, lab.vb, &to(B2_4));
    assert_eq!(action_name(action), "XDP_PASS");
    assert_same(
        &out,
        &to(B2_4),
        "an IPIP packet for another host through lb_decap",
    );
    let (c6, v6): (IpAddr, IpAddr) = (CLIENT6.into(), VIP6.into());
    let inner6 = wire::ip(c6, v6, 17, &wire::udp(c6, 6000, v6, 53, b"q"));
    let other6 = wire::frame(
        B1_MAC,
        VB_MAC,
        &wire::ipv6(LOCAL6, LOCAL6, 41, 0x6000_0000, 64, &inner6),
    );
    let (action, out) = lab.run(PROG_DECAP, lab.vb, &other6);
    assert_eq!(action_name(action), "XDP_PASS");
    assert_same(
        &out,
        &other6,
        "an IP6IP6 packet for another host through lb_decap",
    );
    assert_eq!(
        lab.stat(Stat::DecapNotLocal),
        2,
        "tunnels for other hosts were not counted as such"
    );
    assert_eq!(
        lab.stat(Stat::Decapsulated),
        0,
        "lb_decap stripped a tunnel for another host"
    );

    // b1's own address is decapsulated until it leaves the map (IPv4 and IPv6 keys differ
    // even where their words are alike).
    let (_, out) = lab.run(PROG_DECAP, lab.vb, &to(B1_4));
    assert_same(
        &out,
        &wire::frame(B1_MAC, VB_MAC, &inner),
        "decapsulated for b1",
    );
    lab.decap_addrs
        .remove(&DecapAddr::new(B1_4.into()))
        .expect("remove b1 from DECAP_ADDRS");
    let v6_alike = IpAddr::V6(Ipv6Addr::new(
        u16::from_be_bytes([10, 0]),
        u16::from_be_bytes([2, 11]),
        0,
        0,
        0,
        0,
        0,
        0,
    ));
    lab.decap_addrs
        .insert(DecapAddr::new(v6_alike), 1, 0)
        .expect("write DECAP_ADDRS");
    let (_, out) = lab.run(PROG_DECAP, lab.vb, &to(B1_4));
    assert_same(&out, &to(B1_4), "an address removed from DECAP_ADDRS");
    assert_eq!(lab.stat(Stat::DecapNotLocal), 3);
    assert_eq!(lab.stat(Stat::Decapsulated), 1);
}

#[test]
fn lb_decap_drops_tunnels_for_this_host_from_a_source_that_is_not_a_balancer() {
    let Some(lab) = lab("decap_bad_source") else {
        return;
    };
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let inner = wire::ip(
        client,
        vip,
        6,
        &wire::tcp(client, 41000, vip, 80, TCP_SYN, b""),
    );
    let outer = wire::V4 {
        tos: 0,
        id: 0,
        frag: 0x4000,
        ttl: 64,
    };
    let from = |src: Ipv4Addr| {
        wire::frame(
            B1_MAC,
            VB_MAC,
            &wire::ipv4(src, B1_4, 4, outer, &[], &inner),
        )
    };
    // Anyone who reaches the backend: a spoofed inner source must not get past it.
    let (action, _) = lab.run(PROG_DECAP, lab.vb, &from(CLIENT4));
    assert_eq!(
        action_name(action),
        "XDP_DROP",
        "a tunnel from a host that is not a balancer was not dropped"
    );
    let (c6, v6): (IpAddr, IpAddr) = (CLIENT6.into(), VIP6.into());
    let inner6 = wire::ip(c6, v6, 17, &wire::udp(c6, 6000, v6, 53, b"q"));
    let spoofed6 = wire::frame(
        B1_MAC,
        VB_MAC,
        &wire::ipv6(CLIENT6, B1_6, 41, 0x6000_0000, 64, &inner6),
    );
    let (action, _) = lab.run(PROG_DECAP, lab.vb, &spoofed6);
    assert_eq!(action_name(action), "XDP_DROP", "the same over IPv6");
    assert_eq!(
        (lab.stat(Stat::DecapBadSource), lab.stat(Stat::Decapsulated)),
        (2, 0),
        "tunnels from a non-balancer were stripped or not counted"
    );
    let (action, out) = lab.run(PROG_DECAP, lab.vb, &from(LOCAL4));
    assert_eq!(action_name(action), "XDP_PASS");
    assert_same(
        &out,
        &wire::frame(B1_MAC, VB_MAC, &inner),
        "a tunnel from the balancer, decapsulated",
    );
}

#[test]
fn lb_daemon_decap_accepts_its_interfaces_addresses_and_follows_their_changes() {
    if !require_root("decap_addresses") {
        return;
    }
    let ns = Netns::new("dcp").expect("create a namespace");
    for args in [
        &["link", "add", "d0", "type", "veth", "peer", "name", "d1"][..],
        &["addr", "add", "10.9.0.1/24", "dev", "d0"],
        &["-6", "addr", "add", "fd09::1/64", "dev", "d0", "nodad"],
        &["link", "set", "d0", "up"],
        &["link", "set", "d1", "up"],
    ] {
        ns.ip(args).expect("set up the interface");
    }
    let decap = Decap::start(&ns, "d0", &bpf_object(), &[LOCAL4.into()]);
    assert!(
        decap.ready_line().contains(&LOCAL4.to_string()),
        "lb-daemon decap does not say it takes tunnels from the balancer {LOCAL4}: {}",
        decap.ready_line()
    );
    for addr in ["10.9.0.1", "fd09::1"] {
        assert!(
            decap.ready_line().contains(addr),
            "lb-daemon decap does not say it decapsulates for {addr}: {}",
            decap.ready_line()
        );
    }
    // It reads them every 2 s.
    let within = std::time::Duration::from_secs(10);
    ns.ip(&["addr", "add", "10.9.0.2/24", "dev", "d0"])
        .expect("add an address");
    decap
        .wait_for("decapsulating for 10.9.0.2 too", within)
        .unwrap_or_else(|seen| panic!("an address added to d0 was not taken up: {seen:?}"));
    ns.ip(&["addr", "del", "10.9.0.1/24", "dev", "d0"])
        .expect("remove an address");
    decap
        .wait_for("no longer decapsulating for 10.9.0.1", within)
        .unwrap_or_else(|seen| panic!("an address removed from d0 was kept: {seen:?}"));
}

#[test]
fn conntrack_keeps_flows_on_their_backend_when_the_table_flips() {
    let Some(mut lab) = lab("conntrack_table_flip") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B2_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0; 7]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let packet = |sport: u16, flags: u8| {
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(
                client,
                vip,
                6,
                &wire::tcp(client, sport, vip, 80, flags, b"x"),
            ),
        )
    };
    let dst_of = |frame: &[u8]| Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);

    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_SYN),
        XDP_REDIRECT,
        "flow A's SYN",
    );
    assert_eq!(
        dst_of(&out),
        B1_4,
        "flow A starts on b1, the only backend in the table"
    );
    let snat_a = l4_source_port(&out);

    // The daemon publishes a table that names only b2.
    lab.publish(0, &[1; 7]);
    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_ACK),
        XDP_REDIRECT,
        "flow A's ACK",
    );
    assert_eq!(
        dst_of(&out),
        B1_4,
        "flow A moved off b1 when the table changed"
    );
    assert_eq!(
        l4_source_port(&out),
        snat_a,
        "flow A's SNAT port changed mid-flow"
    );
    let out = lab.expect(
        lab.vc,
        &packet(40002, TCP_SYN),
        XDP_REDIRECT,
        "flow B's SYN",
    );
    assert_eq!(
        dst_of(&out),
        B2_4,
        "a new flow after the flip must go to b2"
    );

    // A mid-flow packet nobody knows: on NAT its backend never saw the flow, so it takes no
    // SNAT port; the client gets a RST (counted), and nothing is recorded.
    assert_eq!(lab.stat(Stat::CtMissNonSyn), 0, "no conntrack miss yet");
    let out = lab.expect(lab.vc, &packet(40003, TCP_ACK), XDP_TX, "flow C's ACK");
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST,
        "an unknown mid-flow NAT packet is answered with a bare RST"
    );
    assert_eq!(
        (lab.stat(Stat::CtMissNonSyn), lab.stat(Stat::ResetNatNoFlow)),
        (1, 1),
        "the non-SYN conntrack miss and its reset were not counted"
    );
    let c = flow(client, 40003, vip, 80, IPPROTO_TCP);
    assert!(
        lab.conntrack.get(&c, 0).is_err(),
        "a NAT packet that took no port left a conntrack entry"
    );

    // b1 goes down: its flows cannot be served there any more, and on NAT another backend
    // never saw them: the client is reset instead of its segments going to b2.
    lab.set_backend_flags(0, BACKEND_F_DOWN);
    let out = lab.expect(
        lab.vc,
        &packet(40001, TCP_ACK),
        XDP_TX,
        "flow A after b1 died",
    );
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST,
        "flow A was not reset after b1 was marked down"
    );
    assert_eq!(lab.stat(Stat::ResetNatNoFlow), 2, "flow A's reset counted");

    assert_eq!(
        lab.backend_counters(0),
        Counters {
            packets: 2,
            bytes: 2 * packet(1, 0).len() as u64,
            new_flows: 1
        },
        "b1's counters"
    );
    let b2 = lab.backend_counters(1);
    assert_eq!(
        (b2.packets, b2.new_flows),
        (1, 1),
        "b2's packets and new flows"
    );
    let s = lab.service_counters(0);
    assert_eq!(
        (s.packets, s.new_flows),
        (3, 2),
        "the service's packets and new flows"
    );
    assert_eq!(lab.stat(Stat::Forwarded), 3, "3 packets forwarded");
}

/// The TCP flags byte of an IPv4 frame without options (no VLAN tag).
fn tcp_flags_of(frame: &[u8]) -> u8 {
    frame[14 + 20 + 13]
}

/// An address no service has (IPv4, IPv6).
const NOT_VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 99);
const NOT_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x99);

/// A client's IPv4 fragment (`frag`: flags and offset) of `seg` for `dst`.
fn fragment(dst: Ipv4Addr, frag: u16, seg: &[u8]) -> Vec<u8> {
    let h = wire::V4 {
        frag,
        ..wire::V4_CLIENT
    };
    wire::frame(
        VC_MAC,
        CLIENT_MAC,
        &wire::ipv4(CLIENT4, dst, 6, h, &[], seg),
    )
}

/// A client's IPv6 packet for `dst` with hop-by-hop options (8 bytes: next header TCP, length
/// 0, PadN) before the TCP segment `seg`.
fn hop_by_hop(dst: Ipv6Addr, seg: &[u8]) -> Vec<u8> {
    let mut hbh = vec![6, 0, 1, 4, 0, 0, 0, 0];
    hbh.extend_from_slice(seg);
    wire::frame(
        VC_MAC,
        CLIENT_MAC,
        &wire::ipv6(CLIENT6, dst, 0, 0x6000_0000, 64, &hbh),
    )
}

#[test]
fn fragments_and_extension_headers_for_a_vip_are_dropped() {
    let Some(mut lab) = lab("vip_fragments") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B1_6.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    lab.service(1, VIP6.into(), 80, IPPROTO_TCP, MODE_NAT, &[1]);
    let (client, vip, client6, vip6): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), CLIENT6.into(), VIP6.into());
    let seg = wire::tcp(client, 40000, vip, 80, TCP_SYN, b"");
    let seg6 = wire::tcp(client6, 40000, vip6, 80, TCP_SYN, b"");
    // The kernel would route them onward (the VIP is not the balancer's address): dropped,
    // whatever their port, and counted.
    let cases = [
        (
            "a first fragment (MF set) for the VIP",
            fragment(VIP4, 0x2000, &seg),
            Stat::DropFragment,
        ),
        (
            "a later fragment for the VIP",
            fragment(VIP4, 0x00b9, &seg),
            Stat::DropFragment,
        ),
        (
            "an IPv6 packet with a hop-by-hop header for the VIP",
            hop_by_hop(VIP6, &seg6),
            Stat::DropIpv6ExtHeaders,
        ),
    ];
    for (what, frame, stat) in cases {
        let before = lab.stat(stat);
        lab.expect(lab.vc, &frame, XDP_DROP, what);
        assert_eq!(
            lab.stat(stat),
            before + 1,
            "{what}: not counted as {stat:?}"
        );
    }
    assert_eq!(
        lab.stat(Stat::Forwarded),
        0,
        "a fragment or extension-header packet was forwarded"
    );
}

#[test]
fn packets_the_balancer_cannot_or_need_not_handle_pass_untouched_and_are_counted() {
    let Some(mut lab) = lab("pass_rules") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B1_6.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    lab.service(1, VIP6.into(), 80, IPPROTO_TCP, MODE_NAT, &[1]);
    let (client, vip, client6, vip6): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), CLIENT6.into(), VIP6.into());
    let seg = wire::tcp(client, 40000, vip, 80, TCP_SYN, b"");
    let seg6 = wire::tcp(client6, 40000, vip6, 80, TCP_SYN, b"");
    let good = wire::frame(VC_MAC, CLIENT_MAC, &wire::ip(client, vip, 6, &seg));

    let mut cases: Vec<(&str, Vec<u8>, Stat)> = Vec::new();
    cases.push((
        "a frame cut inside the IPv4 header",
        good[..14 + 12].to_vec(),
        Stat::PassMalformed,
    ));
    cases.push((
        "a frame shorter than its IPv4 total length",
        good[..good.len() - 4].to_vec(),
        Stat::PassMalformed,
    ));
    cases.push((
        "an IPv4 packet whose TCP header is cut short",
        wire::frame(VC_MAC, CLIENT_MAC, &wire::ip(client, vip, 6, &seg[..10])),
        Stat::PassMalformed,
    ));
    // The same, padded to Ethernet's 60-byte minimum with the rest of a TCP header: bytes after
    // the IP packet's end are padding, never part of its TCP header.
    let mut padded = wire::frame(VC_MAC, CLIENT_MAC, &wire::ip(client, vip, 6, &seg[..10]));
    padded.extend_from_slice(&seg[10..20]);
    padded.resize(60, 0);
    cases.push((
        "a short IPv4 packet whose Ethernet padding would complete a TCP header",
        padded,
        Stat::PassMalformed,
    ));
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    cases.push(("an IPv4 header with IHL 4", bad_ihl, Stat::PassMalformed));
    cases.push((
        "a bare Ethernet header",
        good[..14].to_vec(),
        Stat::PassMalformed,
    ));
    // Fragments and extension headers for another host pass (for a VIP they are dropped:
    // `fragments_and_extension_headers_for_a_vip_are_dropped`).
    for (what, frag) in [
        ("a first fragment (MF set) for another host", 0x2000),
        ("a later fragment for another host", 0x00b9),
    ] {
        cases.push((what, fragment(NOT_VIP4, frag, &seg), Stat::PassFragment));
    }
    cases.push((
        "an IPv6 packet with a hop-by-hop header for another host",
        hop_by_hop(NOT_VIP6, &seg6),
        Stat::PassIpv6ExtHeaders,
    ));
    let other: IpAddr = Ipv4Addr::new(10, 0, 0, 99).into();
    cases.push((
        "TCP to an address that is no VIP",
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(
                client,
                other,
                6,
                &wire::tcp(client, 40000, other, 80, TCP_SYN, b""),
            ),
        ),
        Stat::PassNotVip,
    ));
    cases.push((
        "TCP to the VIP on a port no service uses",
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(
                client,
                vip,
                6,
                &wire::tcp(client, 40000, vip, 81, TCP_SYN, b""),
            ),
        ),
        Stat::PassNotVip,
    ));
    cases.push((
        "UDP to a TCP VIP's port",
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(client, vip, 17, &wire::udp(client, 40000, vip, 80, b"x")),
        ),
        Stat::PassNotVip,
    ));
    cases.push((
        "an ICMP echo request to the VIP",
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(client, vip, 1, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]),
        ),
        Stat::PassNotVip,
    ));
    cases.push((
        "an ARP request",
        wire::eth([0xff; 6], CLIENT_MAC, None, 0x0806, &[0; 28]),
        Stat::PassNotVip,
    ));

    for (what, frame, stat) in &cases {
        let before = lab.stat(*stat);
        let out = lab.expect(lab.vc, frame, XDP_PASS, what);
        assert_same(&out, frame, what);
        assert_eq!(
            lab.stat(*stat),
            before + 1,
            "{what} was not counted as {stat:?}"
        );
    }
    assert_eq!(
        lab.stat(Stat::Packets),
        cases.len() as u64,
        "every packet is counted once"
    );
    assert_eq!(lab.stat(Stat::Forwarded), 0, "nothing may be forwarded");
    assert_eq!(
        lab.conntrack.keys().count(),
        0,
        "nothing may enter conntrack"
    );
}

#[test]
fn vip_packets_with_ip_options_or_a_vlan_tag_are_forwarded_intact() {
    let Some(mut lab) = lab("options_and_vlan") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    let (client, vip, local, backend): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), LOCAL4.into(), B1_4.into());

    // IHL 7: a timestamp-free option block of NOPs ending in EOL.
    let options = [1, 1, 1, 1, 1, 1, 1, 0];
    let seg = wire::tcp(client, 42000, vip, 80, TCP_SYN, b"");
    let with_options = wire::frame(
        VC_MAC,
        CLIENT_MAC,
        &wire::ipv4(CLIENT4, VIP4, 6, wire::V4_CLIENT, &options, &seg),
    );
    let out = lab.expect(
        lab.vc,
        &with_options,
        XDP_REDIRECT,
        "a SYN with IPv4 options (IHL 7)",
    );
    let l4 = 14 + 28;
    let snat = u16::from_be_bytes([out[l4], out[l4 + 1]]);
    let want = wire::frame(
        B1_MAC,
        VB_MAC,
        &wire::forwarded(&wire::ipv4(
            LOCAL4,
            B1_4,
            6,
            wire::V4_CLIENT,
            &options,
            &wire::tcp(local, snat, backend, 8080, TCP_SYN, b""),
        )),
    );
    wire::assert_checksums(&out, "the SYN with options sent to the backend");
    assert_same(&out, &want, "the SYN with options sent to the backend");

    let ip = wire::ip(
        client,
        vip,
        6,
        &wire::tcp(client, 42001, vip, 80, TCP_SYN, b""),
    );
    let tagged = wire::eth(VC_MAC, CLIENT_MAC, Some(100), wire::ETH_IP, &ip);
    let out = lab.expect(
        lab.vc,
        &tagged,
        XDP_REDIRECT,
        "a VLAN-tagged SYN to the VIP",
    );
    let snat = u16::from_be_bytes([out[18 + 20], out[18 + 21]]);
    let want = wire::eth(
        B1_MAC,
        VB_MAC,
        Some(100),
        wire::ETH_IP,
        &wire::forwarded(&wire::ip(
            local,
            backend,
            6,
            &wire::tcp(local, snat, backend, 8080, TCP_SYN, b""),
        )),
    );
    wire::assert_checksums(&out, "the VLAN-tagged SYN sent to the backend");
    assert_same(
        &out,
        &want,
        "the VLAN-tagged SYN sent to the backend (tag kept)",
    );

    // DSR puts the outer header after the tag, and lb_decap takes it out from there.
    lab.service(1, vip, 8443, IPPROTO_TCP, MODE_DSR, &[0]);
    let inner = wire::ip(
        client,
        vip,
        6,
        &wire::tcp(client, 42002, vip, 8443, TCP_SYN, b""),
    );
    let tagged = wire::eth(VC_MAC, CLIENT_MAC, Some(100), wire::ETH_IP, &inner);
    let out = lab.expect(
        lab.vc,
        &tagged,
        XDP_REDIRECT,
        "a VLAN-tagged SYN to a DSR VIP",
    );
    let outer = wire::V4 {
        id: 0,
        ..wire::V4_CLIENT
    };
    let want = wire::eth(
        B1_MAC,
        VB_MAC,
        Some(100),
        wire::ETH_IP,
        &wire::ipv4(LOCAL4, B1_4, 4, outer, &[], &inner),
    );
    wire::assert_checksums(&out, "the VLAN-tagged IPIP packet");
    assert_same(
        &out,
        &want,
        "the VLAN-tagged IPIP packet (tag before the outer header)",
    );
    let (action, decapped) = lab.run(PROG_DECAP, lab.vb, &out);
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "lb_decap passes the inner packet up"
    );
    assert_same(
        &decapped,
        &wire::eth(B1_MAC, VB_MAC, Some(100), wire::ETH_IP, &inner),
        "the decapsulated VLAN-tagged packet",
    );
    assert_eq!(lab.stat(Stat::Forwarded), 3, "all three packets forwarded");
}

#[test]
fn nat_ipv4_udp_without_checksum_and_ipv6_tcp_are_translated() {
    let Some(mut lab) = lab("nat_ipv4_udp_ipv6_tcp") else {
        return;
    };
    lab.backend(0, B1_4.into(), 5300);
    lab.backend(1, B1_6.into(), 8443);
    lab.service(0, VIP4.into(), 53, IPPROTO_UDP, MODE_NAT, &[0]);
    lab.service(1, VIP6.into(), 443, IPPROTO_TCP, MODE_NAT, &[1]);
    let (client, vip, local, backend): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT4.into(), VIP4.into(), LOCAL4.into(), B1_4.into());

    // IPv4 UDP may go without a checksum (0); the translation must not invent one.
    let mut datagram = wire::udp(client, 7000, vip, 53, b"no checksum");
    datagram[6..8].copy_from_slice(&[0, 0]);
    let request = wire::frame(VC_MAC, CLIENT_MAC, &wire::ip(client, vip, 17, &datagram));
    let out = lab.expect(
        lab.vc,
        &request,
        XDP_REDIRECT,
        "a UDP request without checksum",
    );
    let snat = l4_source_port(&out);
    let mut want_udp = wire::udp(local, snat, backend, 5300, b"no checksum");
    want_udp[6..8].copy_from_slice(&[0, 0]);
    let want = wire::frame(
        B1_MAC,
        VB_MAC,
        &wire::forwarded(&wire::ip(local, backend, 17, &want_udp)),
    );
    wire::assert_checksums(&out, "the UDP request without checksum");
    assert_same(&out, &want, "the UDP request without checksum (still 0)");

    let (client, vip, local, backend): (IpAddr, IpAddr, IpAddr, IpAddr) =
        (CLIENT6.into(), VIP6.into(), LOCAL6.into(), B1_6.into());
    let syn = wire::frame(
        VC_MAC,
        CLIENT_MAC,
        &wire::ip(
            client,
            vip,
            6,
            &wire::tcp(client, 50000, vip, 443, TCP_SYN, b""),
        ),
    );
    let out = lab.expect(lab.vc, &syn, XDP_REDIRECT, "a SYN to the IPv6 VIP");
    let snat = l4_source_port(&out);
    let want = wire::frame(
        B1_MAC,
        VB_MAC,
        &wire::forwarded(&wire::ip(
            local,
            backend,
            6,
            &wire::tcp(local, snat, backend, 8443, TCP_SYN, b""),
        )),
    );
    wire::assert_checksums(&out, "the IPv6 SYN sent to the backend");
    assert_same(&out, &want, "the IPv6 SYN sent to the backend");
    let reply = wire::frame(
        VB_MAC,
        B1_MAC,
        &wire::ip(
            backend,
            local,
            6,
            &wire::tcp(backend, 8443, local, snat, TCP_SYN | TCP_ACK, b""),
        ),
    );
    let out = lab.expect(lab.vb, &reply, XDP_REDIRECT, "the backend's IPv6 SYN-ACK");
    let want = wire::frame(
        CLIENT_MAC,
        VC_MAC,
        &wire::forwarded(&wire::ip(
            vip,
            client,
            6,
            &wire::tcp(vip, 443, client, 50000, TCP_SYN | TCP_ACK, b""),
        )),
    );
    wire::assert_checksums(&out, "the IPv6 SYN-ACK sent to the client");
    assert_same(&out, &want, "the IPv6 SYN-ACK sent to the client");
}

#[test]
fn packets_that_cannot_be_forwarded_get_the_documented_action_and_are_counted() {
    let Some(mut lab) = lab("forwarding_failures") else {
        return;
    };
    // An interface the routes can choose but DEVMAP does not hold, and a blackhole route.
    for args in [
        &["link", "add", "vx", "type", "veth", "peer", "name", "vxp"][..],
        &["addr", "add", "10.0.3.1/24", "dev", "vx"],
        &["link", "set", "vx", "up"],
        &["link", "set", "vxp", "up"],
        &[
            "neigh",
            "add",
            "10.0.3.11",
            "lladdr",
            "02:00:00:00:03:11",
            "dev",
            "vx",
            "nud",
            "permanent",
        ],
        &["route", "add", "blackhole", "192.0.2.0/24"],
    ] {
        lab.ns.ip(args).expect("set up the extra routes");
    }
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, Ipv4Addr::new(10, 0, 2, 13).into(), 8080); // no neighbour entry
    lab.backend(2, Ipv4Addr::new(192, 0, 2, 1).into(), 8080); // blackholed
    lab.backend(3, Ipv4Addr::new(10, 0, 3, 11).into(), 8080); // out of an interface not in DEVMAP
    lab.service(0, vip, 80, IPPROTO_TCP, MODE_NAT, &[0]);
    lab.service(1, vip, 81, IPPROTO_TCP, MODE_NAT, &[]);
    lab.service(2, vip, 82, IPPROTO_TCP, MODE_NAT, &[0]);
    let mut one_port = lab.services.get(&2, 0).expect("read SERVICES");
    one_port.snat_port_max = one_port.snat_port_min;
    lab.services.set(2, one_port, 0).expect("write SERVICES");
    lab.service(3, vip, 83, IPPROTO_TCP, MODE_NAT, &[1]);
    lab.service(4, vip, 84, IPPROTO_TCP, MODE_NAT, &[2]);
    lab.service(5, vip, 85, IPPROTO_TCP, MODE_NAT, &[3]);
    lab.service(6, vip, 86, IPPROTO_TCP, MODE_DSR, &[0]);
    let syn = |sport: u16, dport: u16, payload: &[u8]| {
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(
                client,
                vip,
                6,
                &wire::tcp(client, sport, vip, dport, TCP_SYN, payload),
            ),
        )
    };

    let check = |frame: &[u8], action: u32, stat: Stat, what: &str| {
        let before = lab.stat(stat);
        let out = lab.expect(lab.vc, frame, action, what);
        assert_eq!(
            lab.stat(stat),
            before + 1,
            "{what}: not counted as {stat:?}"
        );
        out
    };
    check(
        &syn(1000, 81, b""),
        XDP_DROP,
        Stat::DropNoBackend,
        "a SYN to a service with an empty table",
    );
    check(
        &syn(1001, 82, b""),
        XDP_REDIRECT,
        Stat::Forwarded,
        "the first flow of a one-port SNAT range",
    );
    let out = check(
        &syn(1002, 82, b""),
        XDP_TX,
        Stat::RefusedNatPortsExhausted,
        "a second flow when the SNAT range is used up",
    );
    assert_eq!(
        tcp_flags_of(&out),
        TCP_RST | TCP_ACK,
        "a SYN that finds no SNAT port is answered with a RST+ACK, so the client fails at once"
    );
    let out = check(
        &syn(1003, 83, b""),
        XDP_PASS,
        Stat::FibPass,
        "a SYN to a backend whose MAC is unknown",
    );
    assert_eq!(
        &out[30..34],
        &[10, 0, 2, 13],
        "the packet passed to the kernel must already be translated"
    );
    check(
        &syn(1004, 84, b""),
        XDP_DROP,
        Stat::DropNoRoute,
        "a SYN to a blackholed backend",
    );
    check(
        &syn(1005, 85, b""),
        XDP_DROP,
        Stat::DropNoDevmapEntry,
        "a SYN routed out of an interface not in DEVMAP",
    );
    // 1490 bytes of IP fit vb's MTU of 1500, with the 20 bytes of IPIP they do not: the
    // client is told (see `too_big` for the answer itself).
    let big = syn(1006, 86, &[0x55; 1490 - 40]);
    check(
        &big,
        XDP_TX,
        Stat::TooBigSent,
        "a full-size packet that encapsulation makes too big",
    );
    check(
        &syn(1007, 80, &[0x55; 1490 - 40]),
        XDP_REDIRECT,
        Stat::Forwarded,
        "a full-size NAT packet (fits)",
    );
    lab.ns
        .sysctl("net.ipv4.conf.vc.forwarding", "0")
        .expect("disable forwarding on vc");
    check(
        &syn(1008, 80, b""),
        XDP_DROP,
        Stat::DropForwardingDisabled,
        "a SYN arriving where forwarding is off",
    );
    assert_eq!(
        lab.service_counters(3).packets,
        1,
        "a packet handed to the kernel for neighbour resolution still counts as forwarded"
    );
}

/// Per-client limits on crafted packets: service 0 is TCP NAT on VIP4:80 with one backend,
/// service 1 UDP NAT on VIP4:53; `limits` sets service `id`'s `LIMITS` entry.
mod limits {
    use super::*;

    const CLIENT_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 101);

    fn limited(lab: &mut Lab, id: u32, limits: Limits) {
        lab.limits.set(id, limits, 0).expect("write LIMITS");
    }

    /// A TCP segment from `client`:`sport` to VIP4:80 with `flags`.
    fn tcp(client: Ipv4Addr, sport: u16, flags: u8) -> Vec<u8> {
        let (c, v): (IpAddr, IpAddr) = (client.into(), VIP4.into());
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(c, v, 6, &wire::tcp(c, sport, v, 80, flags, b"")),
        )
    }

    fn udp(client: Ipv4Addr, sport: u16) -> Vec<u8> {
        let (c, v): (IpAddr, IpAddr) = (client.into(), VIP4.into());
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(c, v, 17, &wire::udp(c, sport, v, 53, b"q")),
        )
    }

    /// The RST+ACK the balancer answers a refused SYN from `client`:`sport` to `vip`:80
    /// with: addresses, ports and MACs swapped, sequence 0, acknowledging `ack`.
    fn rst(client: IpAddr, sport: u16, vip: IpAddr, ack: u32) -> Vec<u8> {
        let mut seg = Vec::new();
        seg.extend_from_slice(&80u16.to_be_bytes());
        seg.extend_from_slice(&sport.to_be_bytes());
        seg.extend_from_slice(&0u32.to_be_bytes());
        seg.extend_from_slice(&ack.to_be_bytes());
        seg.extend_from_slice(&[5 << 4, TCP_RST | TCP_ACK, 0, 0, 0, 0, 0, 0]);
        let c = wire::checksum(&[&wire::pseudo(vip, client, 6, seg.len()), &seg]);
        seg[16..18].copy_from_slice(&c.to_be_bytes());
        let ip = match (vip, client) {
            (IpAddr::V4(v), IpAddr::V4(c)) => {
                let h = wire::V4 {
                    tos: 0,
                    id: 0,
                    frag: 0x4000,
                    ttl: 64,
                };
                wire::ipv4(v, c, 6, h, &[], &seg)
            }
            (IpAddr::V6(v), IpAddr::V6(c)) => wire::ipv6(v, c, 6, 0x6000_0000, 64, &seg),
            _ => panic!("mixed address families"),
        };
        wire::frame(CLIENT_MAC, VC_MAC, &ip)
    }

    #[test]
    fn a_refused_ipv6_syn_with_data_is_answered_and_one_with_ipv4_options_dropped() {
        let Some(mut lab) = setup("limits_rst") else {
            return;
        };
        lab.backend(3, B1_6.into(), 8080);
        lab.service(2, VIP6.into(), 80, IPPROTO_TCP, MODE_NAT, &[3]);
        let one = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        limited(&mut lab, 2, one);
        limited(&mut lab, 0, one);
        let (c6, v6): (IpAddr, IpAddr) = (CLIENT6.into(), VIP6.into());
        let syn6 = |sport: u16, data: &[u8]| {
            wire::frame(
                VC_MAC,
                CLIENT_MAC,
                &wire::ip(c6, v6, 6, &wire::tcp(c6, sport, v6, 80, TCP_SYN, data)),
            )
        };
        lab.expect(
            lab.vc,
            &syn6(43000, b""),
            XDP_REDIRECT,
            "an IPv6 SYN within the limit",
        );
        let out = lab.expect(
            lab.vc,
            &syn6(43001, b"hello"),
            XDP_TX,
            "an IPv6 SYN over it",
        );
        wire::assert_checksums(&out, "the IPv6 RST");
        // The SYN's sequence + 1 + its 5 bytes of data.
        assert_same(&out, &rst(c6, 43001, v6, 0x1122_3344 + 6), "the IPv6 RST");

        lab.expect(
            lab.vc,
            &tcp(CLIENT4, 43000, TCP_SYN),
            XDP_REDIRECT,
            "an IPv4 SYN",
        );
        let (c4, v4): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
        let with_options = wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ipv4(
                CLIENT4,
                VIP4,
                6,
                wire::V4_CLIENT,
                &[1, 1, 1, 0],
                &wire::tcp(c4, 43001, v4, 80, TCP_SYN, b""),
            ),
        );
        lab.expect(
            lab.vc,
            &with_options,
            XDP_DROP,
            "a refused SYN with IPv4 options",
        );
        assert_eq!(lab.stat(Stat::RefusedClientConnections), 2);
    }

    fn setup(test: &str) -> Option<Lab> {
        let mut lab = lab(test)?;
        lab.backend(0, B1_4.into(), 8080);
        lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
        lab.service(1, VIP4.into(), 53, IPPROTO_UDP, MODE_NAT, &[0]);
        Some(lab)
    }

    fn connections(lab: &Lab, client: Ipv4Addr) -> u64 {
        let key = ClientKey {
            service: 0,
            addr: words(client.into()),
        };
        lab.clients.get(&key, 0).map_or(0, |s| s.connections)
    }

    #[test]
    fn new_flows_over_a_clients_burst_are_refused_and_counted_and_another_client_is_not() {
        let Some(mut lab) = setup("limits_rate") else {
            return;
        };
        // One token per 100 s after a burst of 3: nothing refills during the test.
        let slow = Limits {
            interval_ns: 100_000_000_000,
            burst_ns: 300_000_000_000,
            max_connections: 0,
            idle_timeout_s: 0,
        };
        limited(&mut lab, 0, slow);
        limited(
            &mut lab,
            1,
            Limits {
                burst_ns: 200_000_000_000,
                ..slow
            },
        );
        for port in 41000..41003 {
            lab.expect(
                lab.vc,
                &tcp(CLIENT4, port, TCP_SYN),
                XDP_REDIRECT,
                "a SYN within the burst",
            );
        }
        let out = lab.expect(
            lab.vc,
            &tcp(CLIENT4, 41003, TCP_SYN),
            XDP_TX,
            "a 4th SYN; the burst is 3",
        );
        wire::assert_checksums(&out, "the RST answering a refused SYN");
        assert_same(
            &out,
            &rst(CLIENT4.into(), 41003, VIP4.into(), 0x1122_3345),
            "the RST answering a refused SYN",
        );
        assert_eq!(
            lab.stat(Stat::RefusedClientRate),
            1,
            "the refused SYN is not counted"
        );
        assert!(
            lab.conntrack
                .get(
                    &flow(CLIENT4.into(), 41003, VIP4.into(), 80, IPPROTO_TCP),
                    0
                )
                .is_err(),
            "a refused SYN left a conntrack entry"
        );
        assert_eq!(
            lab.service_counters(0).new_flows,
            3,
            "the refused SYN counted as a new flow of the service"
        );
        lab.expect(
            lab.vc,
            &tcp(CLIENT_B, 41003, TCP_SYN),
            XDP_REDIRECT,
            "another client's SYN while the first is over its rate",
        );
        // Packets of admitted flows and TCP misses without SYN are never limited.
        for _ in 0..5 {
            lab.expect(
                lab.vc,
                &tcp(CLIENT4, 41000, TCP_ACK),
                XDP_REDIRECT,
                "an ACK of an admitted flow of a client over its rate",
            );
        }
        // On NAT it takes no port (its backend never saw it): reset, but not for the limits.
        lab.expect(
            lab.vc,
            &tcp(CLIENT4, 41100, TCP_ACK),
            XDP_TX,
            "an ACK that misses conntrack (an evicted flow) from a client over its rate",
        );
        assert_eq!(
            (
                lab.stat(Stat::RefusedClientRate),
                lab.stat(Stat::ResetNatNoFlow)
            ),
            (1, 1),
            "packets of flows were refused by the limits, or the miss was not reset for NAT"
        );

        // UDP: each new source port is a new flow; a flow's later datagrams pass.
        lab.expect(
            lab.vc,
            &udp(CLIENT4, 5000),
            XDP_REDIRECT,
            "a first UDP flow",
        );
        lab.expect(
            lab.vc,
            &udp(CLIENT4, 5001),
            XDP_REDIRECT,
            "a second UDP flow",
        );
        lab.expect(
            lab.vc,
            &udp(CLIENT4, 5002),
            XDP_DROP,
            "a third UDP flow; the burst is 2",
        );
        lab.expect(
            lab.vc,
            &udp(CLIENT4, 5000),
            XDP_REDIRECT,
            "a datagram of an admitted flow",
        );
        lab.expect(
            lab.vc,
            &udp(CLIENT_B, 5002),
            XDP_REDIRECT,
            "another client's UDP flow",
        );
        assert_eq!(
            lab.stat(Stat::RefusedClientRate),
            2,
            "the refused datagram is not counted"
        );
    }

    #[test]
    fn a_client_at_its_connection_limit_is_refused_until_a_fin_or_rst_of_one_of_its_flows() {
        let Some(mut lab) = setup("limits_connections") else {
            return;
        };
        limited(
            &mut lab,
            0,
            Limits {
                max_connections: 2,
                ..Limits::default()
            },
        );
        let syn = |lab: &Lab, client, port, action, what| {
            lab.expect(lab.vc, &tcp(client, port, TCP_SYN), action, what)
        };
        let out = syn(&lab, CLIENT4, 42000, XDP_REDIRECT, "the first connection");
        let snat_42000 = l4_source_port(&out);
        let out = syn(&lab, CLIENT4, 42001, XDP_REDIRECT, "the second connection");
        let snat_42001 = l4_source_port(&out);
        // A segment from the backend to the balancer (the NAT reply path).
        let (b, local): (IpAddr, IpAddr) = (B1_4.into(), LOCAL4.into());
        let reply = |snat: u16, flags: u8| {
            wire::frame(
                VB_MAC,
                B1_MAC,
                &wire::ip(b, local, 6, &wire::tcp(b, 8080, local, snat, flags, b"")),
            )
        };
        syn(
            &lab,
            CLIENT4,
            42002,
            XDP_TX,
            "a third connection; the limit is 2",
        );
        assert_eq!(
            lab.stat(Stat::RefusedClientConnections),
            1,
            "the refusal is not counted"
        );
        syn(
            &lab,
            CLIENT_B,
            42002,
            XDP_REDIRECT,
            "another client's connection",
        );
        assert_eq!(connections(&lab, CLIENT4), 2);

        // The client half-closes its first flow: on NAT that frees nothing (the backend may
        // go on sending, and a client could free its slots by half-closing them all)...
        for _ in 0..3 {
            lab.expect(
                lab.vc,
                &tcp(CLIENT4, 42000, TCP_FIN | TCP_ACK),
                XDP_REDIRECT,
                "the client's FIN",
            );
        }
        assert_eq!(
            connections(&lab, CLIENT4),
            2,
            "the client's FIN gave its slot back on NAT"
        );
        // ...the backend's FIN ends the flow and gives its slot back, once.
        for _ in 0..2 {
            lab.expect(
                lab.vb,
                &reply(snat_42000, TCP_FIN | TCP_ACK),
                XDP_REDIRECT,
                "the backend's FIN",
            );
        }
        let key = flow(CLIENT4.into(), 42000, VIP4.into(), 80, IPPROTO_TCP);
        let entry = lab.conntrack.get(&key, 0).expect("the closed flow's entry");
        assert_eq!(
            entry.flags,
            CT_F_COUNTED | CT_F_CLOSED,
            "conntrack flags after the FIN"
        );
        assert_eq!(
            connections(&lab, CLIENT4),
            1,
            "two FINs of one flow from its backend gave back other than one slot"
        );
        let out = syn(
            &lab,
            CLIENT4,
            42002,
            XDP_REDIRECT,
            "a connection after a FIN",
        );
        let snat_42002 = l4_source_port(&out);
        syn(
            &lab,
            CLIENT4,
            42003,
            XDP_TX,
            "a third open connection again",
        );

        // The backend resets the second flow (NAT reply path): its slot goes back too.
        lab.expect(
            lab.vb,
            &reply(snat_42001, TCP_RST | TCP_ACK),
            XDP_REDIRECT,
            "the backend's RST",
        );
        assert_eq!(
            connections(&lab, CLIENT4),
            1,
            "the backend's RST gave no slot back"
        );
        syn(
            &lab,
            CLIENT4,
            42003,
            XDP_REDIRECT,
            "a connection after the backend's RST",
        );
        lab.expect(
            lab.vc,
            &tcp(CLIENT4, 42001, TCP_RST),
            XDP_REDIRECT,
            "the client's RST of a flow the backend already reset",
        );
        syn(
            &lab,
            CLIENT4,
            42004,
            XDP_TX,
            "a third open connection once more",
        );
        assert_eq!(lab.stat(Stat::RefusedClientConnections), 3);

        // A new SYN on the 5-tuple of a closed flow is a new flow: it counts again.
        syn(
            &lab,
            CLIENT4,
            42000,
            XDP_TX,
            "a SYN reusing a closed flow's port at the limit",
        );
        lab.expect(
            lab.vb,
            &reply(snat_42002, TCP_FIN | TCP_ACK),
            XDP_REDIRECT,
            "the backend's FIN of a third flow",
        );
        syn(
            &lab,
            CLIENT4,
            42000,
            XDP_REDIRECT,
            "a SYN reusing a closed flow's port below the limit",
        );
        let entry = lab
            .conntrack
            .get(&key, 0)
            .expect("the reopened flow's entry");
        assert_eq!(
            entry.flags, CT_F_COUNTED,
            "the reopened flow's conntrack flags"
        );
        assert_eq!(connections(&lab, CLIENT4), 2);
        lab.expect(
            lab.vc,
            &tcp(CLIENT4, 42000, TCP_ACK),
            XDP_REDIRECT,
            "an ACK of a flow at the limit",
        );
    }
}

/// Conntrack ageing ("Conntrack ageing" in `lb_common::maps`): the tests age an entry by
/// writing an older `seen_s` into it, rather than by waiting.
mod ageing {
    use super::*;

    /// The idle timeout the tests give their services, seconds.
    const IDLE: u32 = 30;

    /// Seconds and nanoseconds of `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
    fn monotonic() -> (u32, u32) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid out-pointer for the call.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
        (ts.tv_sec as u32, ts.tv_nsec as u32)
    }

    /// Two backends (b1 id 0, b2 id 1); service 0 TCP VIP4:80 and service 1 UDP VIP4:53,
    /// both NAT on a table naming only b1, both with idle timeout [`IDLE`].
    fn setup(test: &str) -> Option<Lab> {
        let mut lab = lab(test)?;
        lab.backend(0, B1_4.into(), 8080);
        lab.backend(1, B2_4.into(), 8080);
        lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
        lab.service(1, VIP4.into(), 53, IPPROTO_UDP, MODE_NAT, &[0]);
        for id in [0, 1] {
            idle_timeout(&mut lab, id, IDLE, 0);
        }
        Some(lab)
    }

    fn idle_timeout(lab: &mut Lab, id: u32, idle_timeout_s: u32, max_connections: u32) {
        let limits = Limits {
            idle_timeout_s,
            max_connections,
            ..Limits::default()
        };
        lab.limits.set(id, limits, 0).expect("write LIMITS");
    }

    fn tcp(sport: u16, flags: u8) -> Vec<u8> {
        let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(c, v, 6, &wire::tcp(c, sport, v, 80, flags, b"")),
        )
    }

    fn udp(sport: u16) -> Vec<u8> {
        let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(c, v, 17, &wire::udp(c, sport, v, 53, b"q")),
        )
    }

    fn key(sport: u16, protocol: u8) -> FlowKey {
        let port = if protocol == IPPROTO_TCP { 80 } else { 53 };
        flow(CLIENT4.into(), sport, VIP4.into(), port, protocol)
    }

    fn entry(lab: &Lab, key: &FlowKey) -> CtEntry {
        lab.conntrack
            .get(key, 0)
            .expect("the flow has a conntrack entry")
    }

    /// Makes `key`'s entry look last seen `idle` seconds before its current `seen_s`.
    fn age(lab: &mut Lab, key: &FlowKey, idle: u32) -> CtEntry {
        let mut e = entry(lab, key);
        e.seen_s = e.seen_s.wrapping_sub(idle);
        lab.conntrack.insert(key, e, 0).expect("write CONNTRACK");
        e
    }

    fn dst_of(frame: &[u8]) -> Ipv4Addr {
        Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33])
    }

    #[test]
    fn an_aged_udp_entry_is_placed_by_the_live_table_and_a_fresh_one_is_kept() {
        let Some(mut lab) = setup("ageing_udp") else {
            return;
        };
        let (before, _) = monotonic();
        let out = lab.expect(lab.vc, &udp(5000), XDP_REDIRECT, "a first datagram");
        assert_eq!(dst_of(&out), B1_4, "the session starts on b1");
        lab.expect(lab.vc, &udp(5001), XDP_REDIRECT, "another session");
        let (after, _) = monotonic();
        let seen = entry(&lab, &key(5000, IPPROTO_UDP)).seen_s;
        assert!(
            (before..=after).contains(&seen),
            "a new entry's time {seen} is not the CLOCK_MONOTONIC second it was made in \
             ({before}..={after})"
        );

        lab.publish(1, &[1]);
        // 5000 idle for just over the timeout, 5001 for just under it.
        age(
            &mut lab,
            &key(5000, IPPROTO_UDP),
            IDLE + CT_REFRESH_SECS + 2,
        );
        // The stored time may trail the last packet by CT_REFRESH_SECS + 1: an entry that
        // old past the timeout is not aged yet (a flow sending just under the timeout).
        age(
            &mut lab,
            &key(5001, IPPROTO_UDP),
            IDLE + CT_REFRESH_SECS + 1,
        );
        let out = lab.expect(
            lab.vc,
            &udp(5000),
            XDP_REDIRECT,
            "a datagram after a long idle",
        );
        assert_eq!(
            dst_of(&out),
            B2_4,
            "a session idle past its timeout kept its old backend instead of the table's"
        );
        let e = entry(&lab, &key(5000, IPPROTO_UDP));
        assert_eq!(e.backend, 1, "the re-placed session's entry names b2");
        assert!(e.seen_s >= seen, "the re-placed entry's time is not now");
        let out = lab.expect(
            lab.vc,
            &udp(5001),
            XDP_REDIRECT,
            "a datagram after a short idle",
        );
        assert_eq!(
            dst_of(&out),
            B1_4,
            "a session idle for less than its timeout lost its backend"
        );
        assert_eq!(
            lab.service_counters(1).new_flows,
            3,
            "the aged session did not count as a new flow"
        );

        // Idle timeout 0 (an entry never written): entries never age.
        idle_timeout(&mut lab, 1, 0, 0);
        age(&mut lab, &key(5001, IPPROTO_UDP), 100_000);
        let out = lab.expect(lab.vc, &udp(5001), XDP_REDIRECT, "a datagram, no timeout");
        assert_eq!(
            dst_of(&out),
            B1_4,
            "a service without a timeout aged a session"
        );
    }

    #[test]
    fn an_aged_tcp_entry_keeps_its_backend_for_packets_without_syn_and_not_for_a_syn() {
        let Some(mut lab) = setup("ageing_tcp") else {
            return;
        };
        let out = lab.expect(lab.vc, &tcp(41000, TCP_SYN), XDP_REDIRECT, "the first SYN");
        assert_eq!(dst_of(&out), B1_4, "the flow starts on b1");
        lab.publish(0, &[1]);
        let k = key(41000, IPPROTO_TCP);

        // Idle long past the timeout, but the connection may be alive: it stays on b1.
        let old = age(&mut lab, &k, 10 * IDLE);
        for flags in [TCP_ACK, TCP_ACK | TCP_SYN] {
            let out = lab.expect(lab.vc, &tcp(41000, flags), XDP_REDIRECT, "a long-idle ACK");
            assert_eq!(
                dst_of(&out),
                B1_4,
                "a packet without SYN (flags {flags:#x}) of an old TCP flow moved to the \
                 live table's backend"
            );
        }
        let e = entry(&lab, &k);
        assert!(
            e.seen_s > old.seen_s,
            "the old flow's packet did not refresh its entry"
        );
        // A SYN on a fresh entry is a retransmission: it keeps its backend.
        let out = lab.expect(lab.vc, &tcp(41000, TCP_SYN), XDP_REDIRECT, "a SYN again");
        assert_eq!(dst_of(&out), B1_4, "a retransmitted SYN moved");

        // A SYN on an aged entry starts a new flow on the reused port.
        age(&mut lab, &k, IDLE + CT_REFRESH_SECS + 2);
        let out = lab.expect(lab.vc, &tcp(41000, TCP_SYN), XDP_REDIRECT, "a SYN, aged");
        assert_eq!(
            dst_of(&out),
            B2_4,
            "a SYN reusing the 5-tuple of a long-idle flow kept its old backend"
        );
        assert_eq!(entry(&lab, &k).backend, 1, "the new flow's entry names b2");
        assert_eq!(lab.service_counters(0).new_flows, 2);
    }

    #[test]
    fn an_aged_counted_entry_gives_its_connection_slot_back_once_when_replaced() {
        let Some(mut lab) = setup("ageing_slot") else {
            return;
        };
        idle_timeout(&mut lab, 0, IDLE, 1);
        let slots = |lab: &Lab| {
            let c = ClientKey {
                service: 0,
                addr: words(CLIENT4.into()),
            };
            lab.clients.get(&c, 0).map_or(0, |s| s.connections)
        };
        lab.expect(lab.vc, &tcp(42000, TCP_SYN), XDP_REDIRECT, "the first SYN");
        lab.expect(
            lab.vc,
            &tcp(42001, TCP_SYN),
            XDP_TX,
            "a SYN over the limit of 1",
        );
        let k = key(42000, IPPROTO_TCP);
        age(&mut lab, &k, IDLE + CT_REFRESH_SECS + 2);
        // Its ACK keeps the old flow, and its slot.
        lab.expect(
            lab.vc,
            &tcp(42000, TCP_ACK),
            XDP_REDIRECT,
            "an aged flow's ACK",
        );
        assert_eq!(
            slots(&lab),
            1,
            "an ACK of an old flow changed its client's slots"
        );
        age(&mut lab, &k, IDLE + CT_REFRESH_SECS + 2);
        lab.publish(0, &[1]);
        for i in 0..3 {
            let out = lab.expect(
                lab.vc,
                &tcp(42000, TCP_SYN),
                XDP_REDIRECT,
                "a SYN replacing an aged flow that held the client's only slot",
            );
            assert_eq!(
                dst_of(&out),
                B2_4,
                "SYN {i} on the aged flow's port kept b1"
            );
        }
        assert_eq!(
            slots(&lab),
            1,
            "the replaced flow's slot was not given back exactly once (the new one holds one)"
        );
        assert_eq!(
            entry(&lab, &k).flags,
            CT_F_COUNTED,
            "the new flow's conntrack flags"
        );
        lab.expect(
            lab.vc,
            &tcp(42001, TCP_SYN),
            XDP_TX,
            "a SYN over the limit again",
        );

        // A closed flow gave its slot back with its RST (on NAT the client's FIN, a
        // half-close, does not end it): ageing must not give it again.
        lab.expect(
            lab.vc,
            &tcp(42000, TCP_RST | TCP_ACK),
            XDP_REDIRECT,
            "the client's RST",
        );
        assert_eq!(slots(&lab), 0);
        age(&mut lab, &k, IDLE + CT_REFRESH_SECS + 2);
        lab.expect(
            lab.vc,
            &tcp(42000, TCP_SYN),
            XDP_REDIRECT,
            "a SYN on an aged closed flow",
        );
        assert_eq!(
            slots(&lab),
            1,
            "a closed and aged flow's slot went back twice"
        );
        assert_eq!(lab.stat(Stat::RefusedClientConnections), 2);
    }

    #[test]
    fn an_entry_time_is_rewritten_once_it_is_due_not_per_packet() {
        let Some(mut lab) = setup("ageing_refresh") else {
            return;
        };
        lab.expect(lab.vc, &udp(6000), XDP_REDIRECT, "a first datagram");
        let k = key(6000, IPPROTO_UDP);
        // Start early in a second, so the packets below run within it.
        let (_, ns) = monotonic();
        if ns > 500_000_000 {
            std::thread::sleep(std::time::Duration::from_nanos(
                u64::from(1_000_000_000 - ns) + 10_000_000,
            ));
        }
        let (now, _) = monotonic();
        let mut e = entry(&lab, &k);
        e.seen_s = now - (CT_REFRESH_SECS - 1);
        lab.conntrack.insert(k, e, 0).expect("write CONNTRACK");
        for _ in 0..5 {
            lab.expect(lab.vc, &udp(6000), XDP_REDIRECT, "a datagram");
        }
        let (later, _) = monotonic();
        if later == now {
            assert_eq!(
                entry(&lab, &k).seen_s,
                e.seen_s,
                "a packet rewrote an entry time not yet {CT_REFRESH_SECS} s old: the \
                 refresh writes per packet"
            );
        }
        // Due: the first packet rewrites it, to now.
        e.seen_s = now - CT_REFRESH_SECS;
        lab.conntrack.insert(k, e, 0).expect("write CONNTRACK");
        lab.expect(lab.vc, &udp(6000), XDP_REDIRECT, "a datagram, entry due");
        let (later, _) = monotonic();
        let refreshed = entry(&lab, &k).seen_s;
        assert!(
            (now..=later).contains(&refreshed),
            "an entry time {CT_REFRESH_SECS} s old was not refreshed to now ({refreshed}, \
             now {now}..={later})"
        );
    }
}

/// ICMP errors about NAT'ed flows, translated back to the client, and errors about NAT
/// replies, translated towards the backend (lb-ebpf's `icmp.rs`).
mod icmp_errors {
    use super::*;

    /// A router between the balancer and the backends.
    const ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 99);

    /// An ICMP(v6) message: type, code, the 4 bytes after the checksum, the quote; its
    /// checksum over `pseudo` (empty for ICMPv4) and the message.
    fn icmp(kind: u8, code: u8, rest: u32, quote: &[u8], pseudo: &[u8]) -> Vec<u8> {
        let mut m = vec![kind, code, 0, 0];
        m.extend_from_slice(&rest.to_be_bytes());
        m.extend_from_slice(quote);
        let c = wire::checksum(&[pseudo, &m]);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        m
    }

    /// The outer IPv4 header fields of the errors the router sends.
    const ROUTER_V4: wire::V4 = wire::V4 {
        tos: 0xc0,
        id: 0x4321,
        frag: 0,
        ttl: 63,
    };

    fn error4(quote: &[u8], to: Ipv4Addr) -> Vec<u8> {
        wire::frame(
            VB_MAC,
            B1_MAC,
            &wire::ipv4(
                ROUTER4,
                to,
                1,
                ROUTER_V4,
                &[],
                &icmp(3, 4, 1400, quote, &[]),
            ),
        )
    }

    #[test]
    fn a_fragmentation_needed_about_a_nat_flow_reaches_its_client_as_if_from_the_vip() {
        let Some(mut lab) = lab("icmp4") else {
            return;
        };
        lab.backend(0, B1_4.into(), 8080);
        lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
        let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
        let sent = wire::ip(
            client,
            vip,
            6,
            &wire::tcp(client, 40000, vip, 80, TCP_SYN, &[7; 64]),
        );
        let out = lab.expect(
            lab.vc,
            &wire::frame(VC_MAC, CLIENT_MAC, &sent),
            XDP_REDIRECT,
            "a client's segment",
        );
        let translated = &out[14..];

        // The router quotes the whole translated packet, or its headers and 8 bytes.
        for len in [translated.len(), 20 + 8] {
            let out = lab.expect(
                lab.vb,
                &error4(&translated[..len], LOCAL4),
                XDP_REDIRECT,
                "a fragmentation-needed error about the flow",
            );
            let want = wire::frame(
                CLIENT_MAC,
                VC_MAC,
                &wire::ipv4(
                    VIP4,
                    CLIENT4,
                    1,
                    ROUTER_V4,
                    &[],
                    &icmp(3, 4, 1400, &wire::forwarded(&sent)[..len], &[]),
                ),
            );
            assert_same(
                &out,
                &want,
                &format!("the error sent to the client (a quote of {len} bytes)"),
            );
        }
        assert_eq!(
            lab.stat(Stat::IcmpTranslated),
            2,
            "translated errors not counted"
        );

        // An error about a flow the balancer does not know, or not an error: untouched.
        let mut other = translated.to_vec();
        other[20..22].copy_from_slice(&(SNAT_MAX + 1).to_be_bytes());
        let unknown = error4(&other, LOCAL4);
        let (action, same) = lab.run(PROG_BALANCER, lab.vb, &unknown);
        assert_eq!(
            action_name(action),
            "XDP_PASS",
            "an error about no known flow"
        );
        assert_same(&same, &unknown, "an error about no known flow");
        let echo = wire::frame(
            VB_MAC,
            B1_MAC,
            &wire::ipv4(
                ROUTER4,
                LOCAL4,
                1,
                ROUTER_V4,
                &[],
                &icmp(8, 0, 1, translated, &[]),
            ),
        );
        let (action, same) = lab.run(PROG_BALANCER, lab.vb, &echo);
        assert_eq!(
            action_name(action),
            "XDP_PASS",
            "an echo request quoting a flow"
        );
        assert_same(&same, &echo, "an echo request quoting a flow");
        assert_eq!(lab.stat(Stat::PassNotVip), 2);
        assert_eq!(lab.stat(Stat::IcmpTranslated), 2);
    }

    #[test]
    fn a_packet_too_big_about_a_nat_ipv6_udp_flow_reaches_its_client() {
        let Some(mut lab) = lab("icmp6") else {
            return;
        };
        lab.backend(1, B1_6.into(), 5353);
        lab.service(1, VIP6.into(), 53, IPPROTO_UDP, MODE_NAT, &[1]);
        let (client, vip): (IpAddr, IpAddr) = (CLIENT6.into(), VIP6.into());
        let sent = wire::ip(
            client,
            vip,
            17,
            &wire::udp(client, 6000, vip, 53, &[9; 100]),
        );
        let out = lab.expect(
            lab.vc,
            &wire::frame(VC_MAC, CLIENT_MAC, &sent),
            XDP_REDIRECT,
            "a client's datagram",
        );
        let translated = &out[14..];
        let (b1, local): (IpAddr, IpAddr) = (B1_6.into(), LOCAL6.into());
        let message = icmp(
            2,
            0,
            1280,
            translated,
            &wire::pseudo(b1, local, 58, 8 + translated.len()),
        );
        let error = wire::frame(
            VB_MAC,
            B1_MAC,
            &wire::ipv6(B1_6, LOCAL6, 58, 0x6000_0000, 64, &message),
        );
        let out = lab.expect(
            lab.vb,
            &error,
            XDP_REDIRECT,
            "a packet-too-big about the flow",
        );
        let message = icmp(
            2,
            0,
            1280,
            &wire::forwarded(&sent),
            &wire::pseudo(vip, client, 58, 8 + sent.len()),
        );
        let want = wire::frame(
            CLIENT_MAC,
            VC_MAC,
            &wire::ipv6(VIP6, CLIENT6, 58, 0x6000_0000, 64, &message),
        );
        assert_same(&out, &want, "the packet-too-big sent to the client");
        assert_eq!(lab.stat(Stat::IcmpTranslated), 1);
    }

    /// A router on the clients' side, which cannot forward the balancer's replies.
    const CLIENT_ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 254);
    const CLIENT_ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0xfe);
    const CLIENT_ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xfe];

    /// A fragmentation-needed (MTU 1400) from the client-side router to `to`, quoting `quote`.
    fn error4_from_client_side(quote: &[u8], to: Ipv4Addr) -> Vec<u8> {
        wire::frame(
            VC_MAC,
            CLIENT_ROUTER_MAC,
            &wire::ipv4(
                CLIENT_ROUTER4,
                to,
                1,
                ROUTER_V4,
                &[],
                &icmp(3, 4, 1400, quote, &[]),
            ),
        )
    }

    /// Sends a client's first packet `request` (an IP packet) and the backend's answer
    /// through the balancer: the SNAT port, and the answer as the backend sent it (an IP
    /// packet, `answer(snat)`) and as the client gets it (the IP packet sent on).
    fn exchange(
        lab: &Lab,
        request: &[u8],
        answer: impl Fn(u16) -> Vec<u8>,
    ) -> (u16, Vec<u8>, Vec<u8>) {
        let out = lab.expect(
            lab.vc,
            &wire::frame(VC_MAC, CLIENT_MAC, request),
            XDP_REDIRECT,
            "a client's first packet",
        );
        let snat = l4_source_port(&out);
        let sent = answer(snat);
        let out = lab.expect(
            lab.vb,
            &wire::frame(VB_MAC, B1_MAC, &sent),
            XDP_REDIRECT,
            "the backend's answer",
        );
        (snat, sent, out[14..].to_vec())
    }

    /// A NAT TCP service on b1 with one flow whose backend sent a full-size segment back: the
    /// segment as the backend sent it and as the client got it (IP packets).
    fn big_tcp_reply4(lab: &mut Lab) -> (Vec<u8>, Vec<u8>) {
        lab.backend(0, B1_4.into(), 8080);
        lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
        let (client, vip, local, b1): (IpAddr, IpAddr, IpAddr, IpAddr) =
            (CLIENT4.into(), VIP4.into(), LOCAL4.into(), B1_4.into());
        let request = wire::ip(
            client,
            vip,
            6,
            &wire::tcp(client, 40000, vip, 80, TCP_SYN, b"GET /big"),
        );
        let (_, answer, reply) = exchange(lab, &request, |snat| {
            wire::ip(
                b1,
                local,
                6,
                &wire::tcp(b1, 8080, local, snat, TCP_ACK, &[5; 1460]),
            )
        });
        (answer, reply)
    }

    #[test]
    fn a_fragmentation_needed_about_a_nat_reply_reaches_its_backend_as_if_from_the_balancer() {
        let Some(mut lab) = lab("icmp4_reply") else {
            return;
        };
        let (answer, reply) = big_tcp_reply4(&mut lab);

        // The router quotes as much of the reply as fits in 576 bytes (RFC 1812 §4.3.2.3),
        // or (RFC 792) its IP header and 8 bytes, which leave out the TCP checksum. The short
        // one comes with an Ethernet trailer where the checksum would be: no part of the
        // message, it must leave as it came.
        for (len, trailer) in [(576 - 20 - 8, &[][..]), (20 + 8, &[0xaa; 18][..])] {
            let mut error = error4_from_client_side(&reply[..len], VIP4);
            error.extend_from_slice(trailer);
            let out = lab.expect(
                lab.vc,
                &error,
                XDP_REDIRECT,
                "a fragmentation-needed error about a reply",
            );
            let mut want = wire::frame(
                B1_MAC,
                VB_MAC,
                &wire::ipv4(
                    LOCAL4,
                    B1_4,
                    1,
                    ROUTER_V4,
                    &[],
                    &icmp(3, 4, 1400, &wire::forwarded(&answer)[..len], &[]),
                ),
            );
            want.extend_from_slice(trailer);
            assert_same(
                &out,
                &want,
                &format!("the error sent to the backend (a quote of {len} bytes)"),
            );
        }
        assert_eq!(
            lab.stat(Stat::IcmpToBackend),
            2,
            "errors translated towards the backend not counted"
        );
        assert_eq!(
            lab.stat(Stat::IcmpTranslated),
            0,
            "errors towards the backend counted as towards the client"
        );
    }

    #[test]
    fn a_packet_too_big_about_a_nat_ipv6_udp_reply_reaches_its_backend() {
        let Some(mut lab) = lab("icmp6_reply") else {
            return;
        };
        lab.backend(1, B1_6.into(), 5353);
        lab.service(1, VIP6.into(), 53, IPPROTO_UDP, MODE_NAT, &[1]);
        let (client, vip, local, b1): (IpAddr, IpAddr, IpAddr, IpAddr) =
            (CLIENT6.into(), VIP6.into(), LOCAL6.into(), B1_6.into());
        let request = wire::ip(client, vip, 17, &wire::udp(client, 6000, vip, 53, b"query"));
        let (_, answer, reply) = exchange(&lab, &request, |snat| {
            wire::ip(b1, local, 17, &wire::udp(b1, 5353, local, snat, &[3; 1300]))
        });

        // An IPv6 error quotes as much as fits in 1280 bytes (RFC 4443 §2.4).
        let len = 1280 - 40 - 8;
        let router: IpAddr = CLIENT_ROUTER6.into();
        let message = icmp(
            2,
            0,
            1280,
            &reply[..len],
            &wire::pseudo(router, vip, 58, 8 + len),
        );
        let error = wire::frame(
            VC_MAC,
            CLIENT_ROUTER_MAC,
            &wire::ipv6(CLIENT_ROUTER6, VIP6, 58, 0x6000_0000, 64, &message),
        );
        let out = lab.expect(
            lab.vc,
            &error,
            XDP_REDIRECT,
            "a packet-too-big about a reply",
        );
        let message = icmp(
            2,
            0,
            1280,
            &wire::forwarded(&answer)[..len],
            &wire::pseudo(local, b1, 58, 8 + len),
        );
        let want = wire::frame(
            B1_MAC,
            VB_MAC,
            &wire::ipv6(LOCAL6, B1_6, 58, 0x6000_0000, 64, &message),
        );
        assert_same(&out, &want, "the packet-too-big sent to the backend");
        assert_eq!(lab.stat(Stat::IcmpToBackend), 1);
    }

    #[test]
    fn an_error_about_a_reply_claiming_a_tiny_path_mtu_is_dropped_not_sent_to_the_backend() {
        let Some(mut lab) = lab("icmp4_reply_low_mtu") else {
            return;
        };
        let (_, reply) = big_tcp_reply4(&mut lab);
        // The backend caches one path MTU towards local_addr for all its NAT'ed flows: an
        // error claiming 552 bytes (forged by a client, or a client's own tiny tunnel) would
        // shrink every client's segments.
        for mtu in [552, MIN_REPLY_PATH_MTU - 1] {
            let error = wire::frame(
                VC_MAC,
                CLIENT_ROUTER_MAC,
                &wire::ipv4(
                    CLIENT_ROUTER4,
                    VIP4,
                    1,
                    ROUTER_V4,
                    &[],
                    &icmp(3, 4, mtu, &reply[..548], &[]),
                ),
            );
            let (action, _) = lab.run(PROG_BALANCER, lab.vc, &error);
            assert_eq!(
                action_name(action),
                "XDP_DROP",
                "a fragmentation-needed claiming MTU {mtu} about a reply"
            );
        }
        assert_eq!(lab.stat(Stat::DropIcmpLowMtu), 2);
        assert_eq!(lab.stat(Stat::IcmpToBackend), 0);
        // The floor itself is translated.
        let error = wire::frame(
            VC_MAC,
            CLIENT_ROUTER_MAC,
            &wire::ipv4(
                CLIENT_ROUTER4,
                VIP4,
                1,
                ROUTER_V4,
                &[],
                &icmp(3, 4, MIN_REPLY_PATH_MTU, &reply[..548], &[]),
            ),
        );
        lab.expect(
            lab.vc,
            &error,
            XDP_REDIRECT,
            "a fragmentation-needed claiming the floor MTU",
        );
        assert_eq!(lab.stat(Stat::IcmpToBackend), 1);
    }

    #[test]
    fn an_error_about_a_reply_of_no_known_flow_passes_untouched() {
        let Some(mut lab) = lab("icmp4_reply_unknown") else {
            return;
        };
        lab.backend(0, B1_4.into(), 8080);
        lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
        let (client, vip, local, b1): (IpAddr, IpAddr, IpAddr, IpAddr) =
            (CLIENT4.into(), VIP4.into(), LOCAL4.into(), B1_4.into());
        let request = wire::ip(
            client,
            vip,
            6,
            &wire::tcp(client, 40000, vip, 80, TCP_SYN, b"GET /"),
        );
        let (_, _, reply) = exchange(&lab, &request, |snat| {
            wire::ip(
                b1,
                local,
                6,
                &wire::tcp(b1, 8080, local, snat, TCP_ACK, &[5; 100]),
            )
        });
        // The same reply to another client port: conntrack has no such flow.
        let mut other = reply.clone();
        other[22..24].copy_from_slice(&40001u16.to_be_bytes());
        // And a reply from a port that is no VIP's.
        let mut no_vip = reply.clone();
        no_vip[20..22].copy_from_slice(&81u16.to_be_bytes());
        for (quote, what) in [
            (&other, "an error about a flow conntrack does not know"),
            (&no_vip, "an error about a packet from no VIP"),
        ] {
            let error = error4_from_client_side(quote, VIP4);
            let (action, same) = lab.run(PROG_BALANCER, lab.vc, &error);
            assert_eq!(action_name(action), "XDP_PASS", "{what}");
            assert_same(&same, &error, what);
        }
        assert_eq!(lab.stat(Stat::PassNotVip), 2);
        assert_eq!(lab.stat(Stat::IcmpToBackend), 0);
    }

    #[test]
    fn an_error_about_a_dsr_reply_passes_untouched() {
        let Some(mut lab) = lab("icmp4_reply_dsr") else {
            return;
        };
        lab.backend(0, B1_4.into(), 0);
        lab.service(1, VIP4.into(), 80, IPPROTO_TCP, MODE_DSR, &[0]);
        let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
        let request = wire::ip(
            client,
            vip,
            6,
            &wire::tcp(client, 40000, vip, 80, TCP_SYN, b"GET /"),
        );
        lab.expect(
            lab.vc,
            &wire::frame(VC_MAC, CLIENT_MAC, &request),
            XDP_REDIRECT,
            "a client's segment to a DSR VIP",
        );
        // The backend answered the client directly, from the VIP.
        let reply = wire::ip(
            vip,
            client,
            6,
            &wire::tcp(vip, 80, client, 40000, TCP_ACK, &[5; 100]),
        );
        let error = error4_from_client_side(&reply, VIP4);
        let (action, same) = lab.run(PROG_BALANCER, lab.vc, &error);
        assert_eq!(
            action_name(action),
            "XDP_PASS",
            "an error about a DSR reply"
        );
        assert_same(&same, &error, "an error about a DSR reply");
        assert_eq!(lab.stat(Stat::PassNotVip), 1);
        assert_eq!(lab.stat(Stat::IcmpToBackend), 0);
    }
}

/// SNAT port lifecycle (issue 10): a port comes back when its flow ends, stays out of use for
/// the service's hold time, and a SYN that finds none is reset. Service 0 is TCP NAT on
/// VIP4:80 with the one backend b1, service 1 UDP NAT on VIP4:53 with b1.
mod snat_ports {
    use super::*;

    /// Service `id`'s SNAT range becomes `first..=first + ports - 1`, held `hold_s` seconds.
    fn snat(lab: &mut Lab, id: u32, ports: u16, hold_s: u32) {
        let mut s = lab.services.get(&id, 0).expect("read SERVICES");
        s.snat_port_max = s.snat_port_min + ports - 1;
        s.snat_hold_s = hold_s;
        lab.services.set(id, s, 0).expect("write SERVICES");
    }

    fn nat_lab(test: &str, ports: u16, hold_s: u32) -> Option<Lab> {
        let mut lab = lab(test)?;
        lab.backend(0, B1_4.into(), 8080);
        lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
        snat(&mut lab, 0, ports, hold_s);
        Some(lab)
    }

    /// A client segment from CLIENT4:`sport` to VIP4:80 with `flags`.
    fn client(sport: u16, flags: u8) -> Vec<u8> {
        let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(c, v, 6, &wire::tcp(c, sport, v, 80, flags, b"")),
        )
    }

    /// b1's segment to the balancer's SNAT port `snat` with `flags`.
    fn backend(snat: u16, flags: u8) -> Vec<u8> {
        let (b, l): (IpAddr, IpAddr) = (B1_4.into(), LOCAL4.into());
        wire::frame(
            VB_MAC,
            B1_MAC,
            &wire::ip(b, l, 6, &wire::tcp(b, 8080, l, snat, flags, b"")),
        )
    }

    fn entries(lab: &Lab) -> usize {
        lab.nat_reverse.keys().filter(|k| k.is_ok()).count()
    }

    /// Opens a flow from `sport`: the SYN must be forwarded; returns its SNAT port.
    fn open(lab: &Lab, sport: u16, what: &str) -> u16 {
        let out = lab.expect(lab.vc, &client(sport, TCP_SYN), XDP_REDIRECT, what);
        l4_source_port(&out)
    }

    #[test]
    fn twenty_flows_closed_one_after_another_reuse_a_four_port_range() {
        let Some(lab) = nat_lab("snat_reuse", 4, 0) else {
            return;
        };
        for n in 0..20u16 {
            let sport = 42_000 + n;
            let port = open(&lab, sport, &format!("flow {n}'s SYN (FIN both ways)"));
            lab.expect(
                lab.vc,
                &client(sport, TCP_FIN | TCP_ACK),
                XDP_REDIRECT,
                &format!("flow {n}'s client FIN"),
            );
            lab.expect(
                lab.vb,
                &backend(port, TCP_FIN | TCP_ACK),
                XDP_REDIRECT,
                &format!("flow {n}'s backend FIN"),
            );
            assert!(
                entries(&lab) <= 4,
                "after flow {n}, NAT_REVERSE holds {} entries for a 4-port range",
                entries(&lab)
            );
        }
        for n in 0..20u16 {
            let sport = 43_000 + n;
            let port = open(&lab, sport, &format!("flow {n}'s SYN (RST)"));
            if n % 2 == 0 {
                lab.expect(
                    lab.vc,
                    &client(sport, TCP_RST | TCP_ACK),
                    XDP_REDIRECT,
                    &format!("flow {n}'s client RST"),
                );
            } else {
                lab.expect(
                    lab.vb,
                    &backend(port, TCP_RST | TCP_ACK),
                    XDP_REDIRECT,
                    &format!("flow {n}'s backend RST"),
                );
            }
            assert!(entries(&lab) <= 4, "after RST flow {n}: {}", entries(&lab));
        }
        assert_eq!(
            (
                lab.stat(Stat::DropNatPortsExhausted),
                lab.stat(Stat::RefusedNatPortsExhausted)
            ),
            (0, 0),
            "a SYN found no SNAT port though every earlier flow had ended"
        );
    }

    #[test]
    fn a_freed_port_is_held_and_a_syn_that_finds_none_is_reset() {
        let Some(mut lab) = nat_lab("snat_hold", 1, 3600) else {
            return;
        };
        let port = open(&lab, 44_000, "the first flow");
        lab.expect(
            lab.vc,
            &client(44_000, TCP_RST),
            XDP_REDIRECT,
            "the first flow's RST",
        );
        let out = lab.expect(
            lab.vc,
            &client(44_001, TCP_SYN),
            XDP_TX,
            "a second flow while the only port is held",
        );
        assert_eq!(
            tcp_flags_of(&out),
            TCP_RST | TCP_ACK,
            "the SYN that found no port is not answered with a RST+ACK"
        );
        assert_eq!(
            lab.stat(Stat::RefusedNatPortsExhausted),
            1,
            "refusal counted"
        );
        snat(&mut lab, 0, 1, 0);
        assert_eq!(
            open(&lab, 44_001, "the second flow once the hold is over"),
            port,
            "the freed port was not reused"
        );
    }

    /// The hold depends on who closed first: the backend's FIN first leaves the backend's
    /// socket in TIME_WAIT, and the port is held the whole `snat_hold_s` towards that backend
    /// (another backend may have it); the client's FIN first (the backend closed passively)
    /// holds it only `SNAT_QUIET_S`.
    #[test]
    fn a_port_is_held_for_the_hold_time_only_when_the_backend_closed_first() {
        let Some(mut lab) = nat_lab("snat_time_wait", 1, 3600) else {
            return;
        };
        lab.backend(1, B2_4.into(), 8080);
        // Flow A: the client closes first, so b1 holds no TIME_WAIT.
        let port = open(&lab, 47_000, "flow A");
        lab.expect(
            lab.vc,
            &client(47_000, TCP_FIN | TCP_ACK),
            XDP_REDIRECT,
            "flow A's client FIN",
        );
        lab.expect(
            lab.vb,
            &backend(port, TCP_FIN | TCP_ACK),
            XDP_REDIRECT,
            "flow A's backend FIN",
        );
        lab.expect(
            lab.vc,
            &client(47_001, TCP_SYN),
            XDP_TX,
            "flow B within SNAT_QUIET_S of flow A's end",
        );
        // Whole seconds of the program's clock: SNAT_QUIET_S (2) has surely passed after 3 s.
        std::thread::sleep(std::time::Duration::from_millis(3_100));
        assert_eq!(
            open(
                &lab,
                47_001,
                "flow B after SNAT_QUIET_S, though the hold is an hour"
            ),
            port,
            "a port whose client closed first was held longer than SNAT_QUIET_S"
        );
        // Flow B: b1 closes first, so it holds TIME_WAIT: the port is held the full hour.
        lab.expect(
            lab.vb,
            &backend(port, TCP_FIN | TCP_ACK),
            XDP_REDIRECT,
            "flow B's backend FIN",
        );
        lab.expect(
            lab.vc,
            &client(47_001, TCP_FIN | TCP_ACK),
            XDP_REDIRECT,
            "flow B's client FIN",
        );
        std::thread::sleep(std::time::Duration::from_millis(3_100));
        let out = lab.expect(
            lab.vc,
            &client(47_002, TCP_SYN),
            XDP_TX,
            "flow C towards b1 while b1 holds flow B's TIME_WAIT",
        );
        assert_eq!(tcp_flags_of(&out), TCP_RST | TCP_ACK, "flow C is not reset");
        assert_eq!(
            lab.stat(Stat::RefusedNatPortsExhausted),
            2,
            "the refusals of flows B and C were not counted"
        );
        assert_eq!(entries(&lab), 1, "one port towards b1, one entry");
        // The hold is per backend: towards b2 the same port number is free.
        lab.publish(0, &[1]);
        let out = lab.expect(
            lab.vc,
            &client(47_002, TCP_SYN),
            XDP_REDIRECT,
            "flow C towards b2",
        );
        assert_eq!(
            (
                Ipv4Addr::new(out[30], out[31], out[32], out[33]),
                l4_source_port(&out)
            ),
            (B2_4, port),
            "flow C did not get the port towards b2"
        );
        assert_eq!(
            lab.stat(Stat::DropNatPortsExhausted),
            0,
            "no SYN was dropped"
        );
    }

    #[test]
    fn a_late_packet_of_a_flow_whose_port_was_taken_over_is_not_translated() {
        let Some(lab) = nat_lab("snat_reclaimed", 1, 0) else {
            return;
        };
        let port = open(&lab, 45_000, "flow A");
        lab.expect(
            lab.vc,
            &client(45_000, TCP_RST),
            XDP_REDIRECT,
            "flow A's RST",
        );
        assert_eq!(
            open(&lab, 45_001, "flow B"),
            port,
            "flow B took another port"
        );
        let out = lab.expect(
            lab.vc,
            &client(45_000, TCP_ACK),
            XDP_TX,
            "a late ACK of flow A",
        );
        assert_eq!(
            tcp_flags_of(&out),
            TCP_RST,
            "flow A's late ACK is not reset"
        );
        assert_eq!(lab.stat(Stat::ResetNatPortReclaimed), 1, "reset counted");
        // The port's replies belong to flow B now.
        let out = lab.expect(lab.vb, &backend(port, TCP_ACK), XDP_REDIRECT, "b1's reply");
        assert_eq!(
            u16::from_be_bytes([out[36], out[37]]),
            45_001,
            "b1's reply on the port went to flow A's client port, not flow B's"
        );
    }

    #[test]
    fn an_ack_only_miss_takes_no_port_and_syn_fin_or_syn_rst_are_dropped() {
        let Some(lab) = nat_lab("snat_miss", 4, 0) else {
            return;
        };
        let out = lab.expect(lab.vc, &client(46_000, TCP_ACK), XDP_TX, "an ACK-only miss");
        assert_eq!(
            tcp_flags_of(&out),
            TCP_RST,
            "the miss is answered with a bare RST"
        );
        assert_eq!(entries(&lab), 0, "an ACK-only miss took a SNAT port");
        assert_eq!(
            lab.stat(Stat::ResetNatNoFlow),
            1,
            "the miss was not counted"
        );
        lab.expect(
            lab.vc,
            &client(46_001, TCP_RST),
            XDP_DROP,
            "a RST of no known flow",
        );
        for (flags, what) in [
            (TCP_SYN | TCP_FIN, "SYN+FIN"),
            (TCP_SYN | TCP_RST, "SYN+RST"),
        ] {
            lab.expect(lab.vc, &client(46_002, flags), XDP_DROP, what);
        }
        assert_eq!(lab.stat(Stat::DropSynFin), 2, "SYN+FIN and SYN+RST counted");
        assert_eq!(entries(&lab), 0, "a dropped packet took a SNAT port");
        assert!(
            lab.conntrack
                .get(
                    &flow(CLIENT4.into(), 46_002, VIP4.into(), 80, IPPROTO_TCP),
                    0
                )
                .is_err(),
            "a SYN+FIN opened a flow"
        );
    }

    #[test]
    fn a_udp_flow_idle_past_the_timeout_gives_its_port_to_a_new_flow() {
        let Some(mut lab) = lab("snat_idle") else {
            return;
        };
        lab.backend(1, B1_4.into(), 5353);
        lab.service(1, VIP4.into(), 53, IPPROTO_UDP, MODE_NAT, &[1]);
        snat(&mut lab, 1, 1, 3600);
        lab.limits
            .set(
                1,
                Limits {
                    idle_timeout_s: 1,
                    ..Limits::default()
                },
                0,
            )
            .expect("write LIMITS");
        let (c, v): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
        let datagram = |sport: u16| {
            wire::frame(
                VC_MAC,
                CLIENT_MAC,
                &wire::ip(c, v, 17, &wire::udp(c, sport, v, 53, b"q")),
            )
        };
        lab.expect(lab.vc, &datagram(5000), XDP_REDIRECT, "flow A");
        lab.expect(
            lab.vc,
            &datagram(5001),
            XDP_DROP,
            "flow B while A holds the port",
        );
        assert_eq!(
            lab.stat(Stat::DropNatPortsExhausted),
            1,
            "UDP exhaustion counted"
        );
        // Idle past the 1 s timeout plus the stored time's lag (CT_REFRESH_SECS + 1).
        std::thread::sleep(std::time::Duration::from_millis(5_200));
        lab.expect(
            lab.vc,
            &datagram(5001),
            XDP_REDIRECT,
            "flow B after A idled out",
        );
    }
}

/// DSR packets that would not fit the backend link once encapsulated (vb's MTU is 1500):
/// answered with ICMP "fragmentation needed" / ICMPv6 "packet too big" from the VIP, so the
/// client lowers its path MTU, instead of vanishing; at most `TOO_BIG_PER_SECOND` a second per
/// CPU.
mod too_big {
    use super::*;
    use lb_common::maps::TOO_BIG_PER_SECOND;

    /// A TCP segment from the client to the DSR service (VIP:86) of `ip_len` bytes of IP.
    fn segment(client: IpAddr, vip: IpAddr, ip_len: usize) -> Vec<u8> {
        let hdr = if vip.is_ipv4() { 20 } else { 40 };
        let payload = vec![0x55; ip_len - hdr - 20];
        wire::ip(
            client,
            vip,
            6,
            &wire::tcp(client, 40000, vip, 86, TCP_ACK, &payload),
        )
    }

    fn dsr_lab(test: &str, backend: IpAddr, vip: IpAddr) -> Option<Lab> {
        let mut lab = lab(test)?;
        lab.backend(0, backend, 8080);
        lab.service(0, vip, 86, IPPROTO_TCP, MODE_DSR, &[0]);
        Some(lab)
    }

    #[test]
    fn an_ipv4_packet_too_big_once_encapsulated_gets_fragmentation_needed() {
        let Some(lab) = dsr_lab("too_big_v4", B1_4.into(), VIP4.into()) else {
            return;
        };
        let ip = segment(CLIENT4.into(), VIP4.into(), 1490);
        let fits = segment(CLIENT4.into(), VIP4.into(), 1480);
        let before = lab.stat(Stat::Forwarded);
        lab.expect(
            lab.vc,
            &wire::frame(VC_MAC, CLIENT_MAC, &fits),
            XDP_REDIRECT,
            "1480 bytes, 1500 with IPIP",
        );
        assert_eq!(lab.stat(Stat::Forwarded), before + 1, "1480 bytes fit");
        let out = lab.expect(
            lab.vc,
            &wire::frame(VC_MAC, CLIENT_MAC, &ip),
            XDP_TX,
            "1490 bytes, 1510 with IPIP",
        );
        assert_eq!(lab.stat(Stat::TooBigSent), 1, "the answer is counted");
        assert_eq!(
            &out[..6],
            &CLIENT_MAC,
            "the answer goes back to the client's MAC"
        );
        assert_eq!(&out[6..12], &VC_MAC, "from the interface it came in on");
        let answer = &out[14..];
        assert_eq!(
            answer.len(),
            20 + 8 + 128,
            "IP + ICMP headers + a 128-byte quote"
        );
        assert_eq!(wire::checksum(&[&answer[..20]]), 0, "IPv4 header checksum");
        assert_eq!(answer[9], 1, "ICMP");
        assert_eq!(&answer[12..16], &VIP4.octets(), "from the VIP");
        assert_eq!(&answer[16..20], &CLIENT4.octets(), "to the client");
        let icmp = &answer[20..];
        assert_eq!(
            (icmp[0], icmp[1]),
            (3, 4),
            "type 3 code 4: fragmentation needed"
        );
        wire::assert_checksums(&out, "fragmentation needed");
        assert_eq!(wire::checksum(&[icmp]), 0, "ICMP checksum");
        assert_eq!(
            u16::from_be_bytes([icmp[6], icmp[7]]),
            1480,
            "the next-hop MTU is vb's 1500 less the 20 bytes of IPIP"
        );
        assert_eq!(
            &icmp[8..],
            &ip[..128],
            "the quote is the client's packet as it came"
        );

        // Without DF the client does no path MTU discovery, and XDP cannot fragment.
        let mut no_df = ip.clone();
        no_df[6] &= !0x40;
        no_df[10..12].copy_from_slice(&[0, 0]);
        let c = wire::checksum(&[&no_df[..20]]);
        no_df[10..12].copy_from_slice(&c.to_be_bytes());
        let dropped = lab.stat(Stat::DropMtu);
        lab.expect(
            lab.vc,
            &wire::frame(VC_MAC, CLIENT_MAC, &no_df),
            XDP_DROP,
            "too big without DF",
        );
        assert_eq!(lab.stat(Stat::DropMtu), dropped + 1, "counted as drop_mtu");
        assert_eq!(lab.stat(Stat::TooBigSent), 1, "and not answered");
    }

    #[test]
    fn an_ipv6_packet_too_big_once_encapsulated_gets_packet_too_big() {
        let Some(lab) = dsr_lab("too_big_v6", B1_6.into(), VIP6.into()) else {
            return;
        };
        // 1480 bytes of IPv6 and 40 of IP6IP6 make 1520.
        let ip = segment(CLIENT6.into(), VIP6.into(), 1480);
        let out = lab.expect(
            lab.vc,
            &wire::frame(VC_MAC, CLIENT_MAC, &ip),
            XDP_TX,
            "1480 bytes, 1520 with IP6IP6",
        );
        assert_eq!(lab.stat(Stat::TooBigSent), 1, "the answer is counted");
        assert_eq!(
            &out[..6],
            &CLIENT_MAC,
            "the answer goes back to the client's MAC"
        );
        let answer = &out[14..];
        assert_eq!(
            answer.len(),
            40 + 8 + 512,
            "IPv6 + ICMPv6 headers + a 512-byte quote"
        );
        assert_eq!(
            u16::from_be_bytes([answer[4], answer[5]]),
            8 + 512,
            "payload length"
        );
        assert_eq!(answer[6], 58, "ICMPv6");
        assert_eq!(&answer[8..24], &VIP6.octets(), "from the VIP");
        assert_eq!(&answer[24..40], &CLIENT6.octets(), "to the client");
        let icmp = &answer[40..];
        assert_eq!((icmp[0], icmp[1]), (2, 0), "type 2: packet too big");
        let pseudo = wire::pseudo(VIP6.into(), CLIENT6.into(), 58, icmp.len());
        assert_eq!(wire::checksum(&[&pseudo, icmp]), 0, "ICMPv6 checksum");
        assert_eq!(
            u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
            1460,
            "the MTU is vb's 1500 less the 40 bytes of IP6IP6"
        );
        assert_eq!(
            &icmp[8..],
            &ip[..512],
            "the quote is the client's packet as it came"
        );
    }

    #[test]
    fn answers_are_rate_limited_and_the_rest_dropped_and_counted() {
        let Some(lab) = dsr_lab("too_big_rate", B1_4.into(), VIP4.into()) else {
            return;
        };
        let frame = wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &segment(CLIENT4.into(), VIP4.into(), 1490),
        );
        // Per CPU and second: this thread may run on either of two CPUs, and a second may
        // turn during the run, so at most 4 budgets are spent.
        let budget = TOO_BIG_PER_SECOND as u64;
        let runs = 4 * budget + 1000;
        let mut answered = 0;
        for _ in 0..runs {
            let (action, _) = lab.run(PROG_BALANCER, lab.vc, &frame);
            if action == XDP_TX {
                answered += 1;
            } else {
                assert_eq!(action_name(action), "XDP_DROP", "an answer or a drop");
            }
        }
        assert_eq!(
            lab.stat(Stat::TooBigSent),
            answered,
            "every answer is counted"
        );
        assert_eq!(
            lab.stat(Stat::DropMtu),
            runs - answered,
            "every packet not answered is counted as drop_mtu"
        );
        assert!(
            answered >= budget && answered <= 4 * budget,
            "{answered} answers to {runs} packets: the budget is {budget} a second per CPU"
        );
    }
}

/// A `nat` service with two local addresses (IPVS full-NAT's local address pool): each flow
/// takes its SNAT port on the address its hash names, for every packet; the pool carries as
/// many concurrent flows as the addresses' ranges together, and replies to either address are
/// translated back.
mod local_addrs {
    use super::*;
    use lb_common::maps::{local_addr_index, snat_addr_index, LOCAL_ADDRS};

    /// The second local address.
    const LOCAL4_B: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    /// SNAT ports per address.
    const PORTS: u16 = 4;

    fn client_key(sport: u16) -> FlowKey {
        FlowKey {
            src_addr: words(CLIENT4.into()),
            dst_addr: words(VIP4.into()),
            src_port: sport,
            dst_port: 80,
            protocol: IPPROTO_TCP,
            family: family(VIP4.into()),
            _pad: [0; 2],
        }
    }

    #[test]
    fn flows_spread_over_the_local_addresses_and_each_keeps_its_own() {
        let Some(mut lab) = lab("local_addrs") else {
            return;
        };
        let (client, vip, backend): (IpAddr, IpAddr, IpAddr) =
            (CLIENT4.into(), VIP4.into(), B1_4.into());
        lab.backend(0, backend, 8080);
        lab.service(0, vip, 80, IPPROTO_TCP, MODE_NAT, &[0]);
        let mut s = lab.services.get(&0, 0).expect("read SERVICES");
        s.snat_port_max = s.snat_port_min + PORTS - 1;
        s.local_addrs = 2;
        lab.services.set(0, s, 0).expect("write SERVICES");
        let mut pool: Array<&mut MapData, [u32; 4]> = Array::try_from(
            lab.ebpf
                .map_mut(LOCAL_ADDRS)
                .expect("the object has LOCAL_ADDRS"),
        )
        .expect("LOCAL_ADDRS is an array of address words");
        pool.set(local_addr_index(0, 1), words(LOCAL4_B.into()), 0)
            .expect("write LOCAL_ADDRS");
        let locals = [LOCAL4, LOCAL4_B];

        let flows: Vec<u16> = (41000..41016).collect();
        let address_of = |sport: u16| snat_addr_index(flow_hash(&client_key(sport)), 2) as usize;
        let mut per_address = [0u16; 2];
        for &sport in &flows {
            per_address[address_of(sport)] += 1;
        }
        let can_carry: u16 = per_address.iter().map(|&n| n.min(PORTS)).sum();
        assert!(
            can_carry > PORTS,
            "the test's flows must need both addresses: {per_address:?} per address"
        );

        let mut carried = Vec::new();
        for &sport in &flows {
            let syn = wire::frame(
                VC_MAC,
                CLIENT_MAC,
                &wire::ip(
                    client,
                    vip,
                    6,
                    &wire::tcp(client, sport, vip, 80, TCP_SYN, b""),
                ),
            );
            let (action, out) = lab.run(PROG_BALANCER, lab.vc, &syn);
            if action != XDP_REDIRECT {
                assert_eq!(
                    action_name(action),
                    "XDP_TX",
                    "a SYN without a port is reset"
                );
                continue;
            }
            let src: [u8; 4] = out[26..30].try_into().expect("4 bytes");
            let want = locals[address_of(sport)];
            assert_eq!(
                Ipv4Addr::from(src),
                want,
                "flow {sport} must leave from the address its hash names"
            );
            let port = u16::from_be_bytes([out[34], out[35]]);
            carried.push((sport, want, port));
        }
        assert_eq!(
            carried.len() as u16,
            can_carry,
            "with {PORTS} ports on each of 2 addresses ({per_address:?} flows per address) \
             every address's ports are used"
        );
        assert!(
            lab.stat(Stat::RefusedNatPortsExhausted) == u64::from(flows.len() as u16 - can_carry),
            "the other SYNs are refused"
        );

        for &(sport, local, port) in &carried {
            // A later packet of the flow keeps its address and port.
            let ack = wire::frame(
                VC_MAC,
                CLIENT_MAC,
                &wire::ip(
                    client,
                    vip,
                    6,
                    &wire::tcp(client, sport, vip, 80, TCP_ACK, b"x"),
                ),
            );
            let out = lab.expect(lab.vc, &ack, XDP_REDIRECT, "a later packet of the flow");
            assert_eq!(
                &out[26..30],
                &local.octets(),
                "flow {sport} changed its address"
            );
            assert_eq!(
                u16::from_be_bytes([out[34], out[35]]),
                port,
                "flow {sport} changed its port"
            );
            // The backend's reply to that address and port goes back to the client.
            let l: IpAddr = local.into();
            let reply = wire::frame(
                VB_MAC,
                B1_MAC,
                &wire::ip(
                    backend,
                    l,
                    6,
                    &wire::tcp(backend, 8080, l, port, TCP_ACK, b"y"),
                ),
            );
            let out = lab.expect(lab.vb, &reply, XDP_REDIRECT, "the backend's reply");
            let want = wire::frame(
                CLIENT_MAC,
                VC_MAC,
                &wire::forwarded(&wire::ip(
                    vip,
                    client,
                    6,
                    &wire::tcp(vip, 80, client, sport, TCP_ACK, b"y"),
                )),
            );
            wire::assert_checksums(&out, "the reply sent to the client");
            assert_same(&out, &want, "the reply sent to the client");
        }
    }
}

/// Fuzzing through BPF_PROG_TEST_RUN (issue 10): a seeded generator of frames over the grammar
/// the program parses (Ethernet with 0-2 VLAN tags; IPv4 with any IHL and options and any
/// fragment bits; IPv6 with extension headers; TCP with any data offset and flags; UDP; ICMP
/// quoting IPv4 with options; truncation anywhere), each run through `lb_xdp`, with what must
/// hold for every frame checked. `LB_FUZZ_FRAMES` (default 100,000) and `LB_FUZZ_SEED` set the
/// run (`cargo xtask fuzz-xdp --frames N --seed S`); a failure prints the seed, the frame's
/// index and its bytes.
mod fuzz {
    use super::*;

    /// xorshift64*: small, seeded, and the same on every machine.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn percent(&mut self, p: u64) -> bool {
            self.below(100) < p
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.byte()).collect()
        }
    }

    /// One generated frame: its bytes, the interface it comes in on, the client flow it
    /// carries to a VIP (if it is one), and whether it was cut short.
    struct Case {
        frame: Vec<u8>,
        ingress_is_client: bool,
        flow: Option<FlowKey>,
        truncated: bool,
    }

    const VIP4_PORTS: [u16; 3] = [80, 53, 443];

    fn l4(
        rng: &mut Rng,
        src: IpAddr,
        dst: IpAddr,
        protocol: u8,
        sport: u16,
        dport: u16,
    ) -> Vec<u8> {
        let n = rng.below(48) as usize;
        let payload = rng.bytes(n);
        match protocol {
            6 => {
                let flags = match rng.below(10) {
                    0..=3 => TCP_SYN,
                    4..=6 => TCP_ACK,
                    _ => rng.byte(),
                };
                let mut seg = wire::tcp(src, sport, dst, dport, flags, &payload);
                // Any data offset: options (random bytes) between the header and the payload.
                if rng.percent(25) {
                    let words = 1 + rng.below(10) as usize;
                    let options = rng.bytes(words * 4);
                    let mut with = seg[..20].to_vec();
                    with.extend_from_slice(&options);
                    with.extend_from_slice(&seg[20..]);
                    with[12] = ((5 + words as u8) << 4) | (with[12] & 0x0f);
                    with[16..18].copy_from_slice(&[0, 0]);
                    let c = wire::checksum(&[&wire::pseudo(src, dst, 6, with.len()), &with]);
                    with[16..18].copy_from_slice(&c.to_be_bytes());
                    seg = with;
                }
                seg
            }
            17 => {
                let mut d = wire::udp(src, sport, dst, dport, &payload);
                if src.is_ipv4() && rng.percent(10) {
                    d[6..8].copy_from_slice(&[0, 0]);
                }
                d
            }
            1 | 58 => {
                // An error quoting a packet (IPv4 with options when it can) of a flow the
                // lab knows, or anything at all.
                let quote_v4 = src.is_ipv4();
                let quote = if quote_v4 {
                    let n = 4 * rng.below(3) as usize;
                    let opts = rng.bytes(n);
                    let inner = wire::udp(
                        LOCAL4.into(),
                        20_000 + rng.below(100) as u16,
                        B1_4.into(),
                        5353,
                        b"",
                    );
                    wire::ipv4(LOCAL4, B1_4, 17, wire::V4_CLIENT, &opts, &inner)
                } else {
                    let inner = wire::tcp(
                        LOCAL6.into(),
                        20_000 + rng.below(100) as u16,
                        B1_6.into(),
                        8080,
                        TCP_ACK,
                        b"",
                    );
                    wire::ipv6(LOCAL6, B1_6, 6, 0x6000_0000, 64, &inner)
                };
                let (kind, code) = if rng.percent(70) {
                    if quote_v4 {
                        (3, 4)
                    } else {
                        (2, 0)
                    }
                } else {
                    (rng.byte(), rng.byte())
                };
                let mut m = vec![kind, code, 0, 0];
                m.extend_from_slice(&(rng.next() as u32).to_be_bytes());
                m.extend_from_slice(&quote);
                let pseudo = if quote_v4 {
                    Vec::new()
                } else {
                    wire::pseudo(src, dst, 58, m.len())
                };
                let c = wire::checksum(&[&pseudo, &m]);
                m[2..4].copy_from_slice(&c.to_be_bytes());
                m
            }
            _ => payload,
        }
    }

    fn case(rng: &mut Rng) -> Case {
        let v4 = rng.percent(60);
        let direction = rng.below(4); // 0, 1: to a VIP; 2: a reply; 3: anything
        let protocol = match rng.below(20) {
            0..=8 => 6,
            9..=15 => 17,
            16..=18 => {
                if v4 {
                    1
                } else {
                    58
                }
            }
            _ => rng.byte(),
        };
        let (src, dst, sport, dport): (IpAddr, IpAddr, u16, u16) = match (direction, v4) {
            (0 | 1, true) => (
                CLIENT4.into(),
                VIP4.into(),
                1024 + rng.below(200) as u16,
                VIP4_PORTS[rng.below(3) as usize],
            ),
            (0 | 1, false) => (
                CLIENT6.into(),
                VIP6.into(),
                1024 + rng.below(200) as u16,
                [80, 53][rng.below(2) as usize],
            ),
            (2, true) => (
                B1_4.into(),
                LOCAL4.into(),
                [8080, 5353][rng.below(2) as usize],
                20_000 + rng.below(100) as u16,
            ),
            (2, false) => (
                B1_6.into(),
                LOCAL6.into(),
                8080,
                20_000 + rng.below(100) as u16,
            ),
            (_, true) => (
                Ipv4Addr::from(rng.next() as u32).into(),
                Ipv4Addr::from(rng.next() as u32).into(),
                rng.next() as u16,
                rng.next() as u16,
            ),
            (_, false) => (
                Ipv6Addr::from(u128::from(rng.next()) << 64 | u128::from(rng.next())).into(),
                Ipv6Addr::from(u128::from(rng.next()) << 64 | u128::from(rng.next())).into(),
                rng.next() as u16,
                rng.next() as u16,
            ),
        };
        let l4 = l4(rng, src, dst, protocol, sport, dport);
        let (ip, ethertype) = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let opts = if rng.percent(20) {
                    let n = 4 * (1 + rng.below(10) as usize);
                    rng.bytes(n)
                } else {
                    Vec::new()
                };
                let frag = if rng.percent(85) {
                    0x4000
                } else {
                    rng.next() as u16
                };
                let h = wire::V4 {
                    tos: rng.byte(),
                    id: rng.next() as u16,
                    frag,
                    ttl: rng.byte(),
                };
                (wire::ipv4(s, d, protocol, h, &opts, &l4), wire::ETH_IP)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                // Extension headers (8 bytes each) before the L4 header.
                let mut payload = l4.clone();
                let mut next = protocol;
                if rng.percent(25) {
                    for _ in 0..1 + rng.below(3) {
                        let kind = [0u8, 43, 44, 60][rng.below(4) as usize];
                        let mut ext = vec![next, 0];
                        ext.extend_from_slice(&rng.bytes(6));
                        ext.extend_from_slice(&payload);
                        payload = ext;
                        next = kind;
                    }
                }
                (
                    wire::ipv6(s, d, next, 0x6000_0000, rng.byte(), &payload),
                    wire::ETH_IPV6,
                )
            }
            _ => unreachable!("one family per case"),
        };
        let ingress_is_client = match direction {
            0 | 1 => true,
            2 => false,
            _ => rng.percent(50),
        };
        let (dmac, smac) = if ingress_is_client {
            (VC_MAC, CLIENT_MAC)
        } else {
            (VB_MAC, B1_MAC)
        };
        let mut frame = match rng.below(10) {
            0..=6 => wire::eth(dmac, smac, None, ethertype, &ip),
            7 | 8 => wire::eth(dmac, smac, Some(rng.next() as u16 & 0x0fff), ethertype, &ip),
            _ => {
                // Two tags (QinQ).
                let inner = wire::eth(dmac, smac, Some(7), ethertype, &ip);
                let mut f = inner[..12].to_vec();
                f.extend_from_slice(&0x8100u16.to_be_bytes());
                f.extend_from_slice(&(rng.next() as u16 & 0x0fff).to_be_bytes());
                f.extend_from_slice(&inner[12..]);
                f
            }
        };
        let flow = (direction < 2 && (protocol == 6 || protocol == 17))
            .then(|| flow(src, sport, dst, dport, protocol));
        // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header.
        let truncated = rng.percent(15) && frame.len() > 15;
        if truncated {
            let keep = 14 + rng.below(frame.len() as u64 - 14) as usize;
            frame.truncate(keep);
        }
        Case {
            frame,
            ingress_is_client,
            flow,
            truncated,
        }
    }

    /// Where the IP header starts (after 0-2 VLAN tags) and its EtherType.
    fn l3(frame: &[u8]) -> Option<(usize, u16)> {
        let mut at = 12;
        let mut ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
        while ethertype == 0x8100 {
            at += 4;
            ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
        }
        Some((at + 2, ethertype))
    }

    /// Why a frame the program sent on is not a well-formed packet: IP lengths that do not
    /// match the frame, or a wrong IPv4 header, TCP or UDP checksum (of an encapsulated
    /// packet too). `None` when it is sound.
    fn unsound(frame: &[u8]) -> Option<String> {
        let (at, ethertype) = l3(frame)?;
        let ip = &frame[at..];
        let len = match ethertype {
            wire::ETH_IP => u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]) as usize,
            wire::ETH_IPV6 => 40 + u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]) as usize,
            other => return Some(format!("sent on with EtherType {other:#06x}")),
        };
        if len != ip.len() {
            return Some(format!("IP length {len} but {} bytes after L2", ip.len()));
        }
        std::panic::catch_unwind(|| wire::assert_checksums(frame, "fuzz"))
            .err()
            .map(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "a checksum check failed".into())
            })
    }

    fn stats(lab: &Lab) -> Vec<u64> {
        (0..lb_common::STATS_LEN)
            .map(|i| {
                lab.stats
                    .get(&i, 0)
                    .map(|v| v.iter().sum::<u64>())
                    .unwrap_or(0)
            })
            .collect()
    }

    #[test]
    fn every_generated_frame_gets_exactly_one_outcome_and_nothing_broken_leaves() {
        let Some(mut lab) = lab("fuzz") else {
            return;
        };
        let frames: u64 = std::env::var("LB_FUZZ_FRAMES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let seed: u64 = std::env::var("LB_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0x6c62_2d66_757a_7a31);
        // TCP and UDP NAT on VIP4, TCP NAT on VIP6, TCP and UDP DSR.
        lab.backend(0, B1_4.into(), 8080);
        lab.backend(1, B1_4.into(), 5353);
        lab.backend(2, B1_6.into(), 8080);
        lab.backend(3, B1_4.into(), 443);
        lab.backend(4, B1_6.into(), 53);
        lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
        lab.service(1, VIP4.into(), 53, IPPROTO_UDP, MODE_NAT, &[1]);
        lab.service(2, VIP6.into(), 80, IPPROTO_TCP, MODE_NAT, &[2]);
        lab.service(3, VIP4.into(), 443, IPPROTO_TCP, MODE_DSR, &[3]);
        lab.service(4, VIP6.into(), 53, IPPROTO_UDP, MODE_DSR, &[4]);
        let packets = Stat::Packets as usize;
        let side = Stat::CtMissNonSyn as usize;
        let mut rng = Rng(seed | 1);
        let mut before = stats(&lab);
        let mut outcomes = std::collections::BTreeMap::<&str, u64>::new();
        for n in 0..frames {
            let c = case(&mut rng);
            let fail = |why: String| -> ! {
                panic!(
                    "fuzz seed {seed} frame {n} ({} bytes, {}): {why}\n{:02x?}",
                    c.frame.len(),
                    if c.truncated { "truncated" } else { "whole" },
                    c.frame
                )
            };
            let tracked_before = c.flow.is_some_and(|k| lab.conntrack.get(&k, 0).is_ok());
            let ingress = if c.ingress_is_client { lab.vc } else { lab.vb };
            let (action, out) = lab.run(PROG_BALANCER, ingress, &c.frame);
            let after = stats(&lab);
            let changed: Vec<usize> = (0..after.len())
                .filter(|&i| i != packets && i != side && after[i] != before[i])
                .collect();
            if after[packets] != before[packets] + 1 {
                fail("`packets` did not count it once".into());
            }
            match changed.as_slice() {
                [i] if after[*i] == before[*i] + 1 => {
                    *outcomes.entry(Stat::ALL[*i].name()).or_default() += 1;
                }
                _ => fail(format!(
                    "not exactly one outcome counter went up by one: {:?}",
                    changed
                        .iter()
                        .map(|&i| (Stat::ALL[i].name(), after[i] - before[i]))
                        .collect::<Vec<_>>()
                )),
            }
            before = after;
            match action {
                XDP_PASS => {
                    if out != c.frame {
                        fail("a passed frame was changed".into());
                    }
                }
                XDP_TX | XDP_REDIRECT => {
                    if c.truncated {
                        fail(format!(
                            "a truncated frame was sent on ({})",
                            action_name(action)
                        ));
                    }
                    if let Some(why) = unsound(&out) {
                        fail(format!(
                            "sent on ({}) but unsound: {why}",
                            action_name(action)
                        ));
                    }
                }
                XDP_DROP => {}
                other => fail(format!("unknown action {other}")),
            }
            if matches!(action, XDP_PASS | XDP_DROP) && !tracked_before {
                if let Some(k) = c.flow {
                    if lab.conntrack.get(&k, 0).is_ok() {
                        fail(format!(
                            "{} but it opened a conntrack entry",
                            action_name(action)
                        ));
                    }
                }
            }
        }
        eprintln!("fuzz: seed {seed}, {frames} frames, outcomes {outcomes:?}");
        assert!(
            outcomes.len() >= 8,
            "the generator reached only {} outcomes: {outcomes:?}",
            outcomes.len()
        );
    }
}

/// An IPv4 flow and an IPv6 flow whose addresses hold the same words (the IPv6 ones with
/// their last 96 bits zero) are two flows: the conntrack key carries the family.
#[test]
fn an_ipv4_flow_and_an_ipv6_flow_with_the_same_address_words_are_apart() {
    let Some(mut lab) = lab("flow_family") else {
        return;
    };
    // The IPv6 addresses whose first 4 bytes are CLIENT4's and VIP4's, the rest zero.
    let alike = |v4: Ipv4Addr| {
        let o = v4.octets();
        Ipv6Addr::new(
            u16::from_be_bytes([o[0], o[1]]),
            u16::from_be_bytes([o[2], o[3]]),
            0,
            0,
            0,
            0,
            0,
            0,
        )
    };
    let (client6, vip6) = (alike(CLIENT4), alike(VIP4));
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B1_6.into(), 8080);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_DSR, &[0]);
    lab.service(1, vip6.into(), 80, IPPROTO_TCP, MODE_DSR, &[1]);
    let syn = |c: IpAddr, v: IpAddr| {
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ip(c, v, 6, &wire::tcp(c, 41000, v, 80, TCP_SYN, b"")),
        )
    };
    lab.expect(
        lab.vc,
        &syn(CLIENT4.into(), VIP4.into()),
        XDP_REDIRECT,
        "the IPv4 SYN",
    );
    lab.expect(
        lab.vc,
        &syn(client6.into(), vip6.into()),
        XDP_REDIRECT,
        "the IPv6 SYN",
    );
    let v4 = flow(CLIENT4.into(), 41000, VIP4.into(), 80, IPPROTO_TCP);
    let v6 = flow(client6.into(), 41000, vip6.into(), 80, IPPROTO_TCP);
    assert_eq!(
        v4.src_addr, v6.src_addr,
        "the test's addresses must hold the same words"
    );
    let backend = |k: &FlowKey| lab.conntrack.get(k, 0).map(|e| e.backend).ok();
    assert_eq!(
        (backend(&v4), backend(&v6)),
        (Some(0), Some(1)),
        "the IPv4 and IPv6 flows share a conntrack entry"
    );
}

/// NAT forwards like a router: the TTL goes down by one (see the NAT tests' expected frames),
/// and a packet at TTL 1 is dropped and counted before it takes anything; DSR leaves the
/// client's packet as it is inside the new header, and other traffic passes.
#[test]
fn nat_drops_a_packet_whose_ttl_would_run_out_and_takes_nothing_for_it() {
    let Some(mut lab) = lab("nat_ttl") else {
        return;
    };
    lab.backend(0, B1_4.into(), 8080);
    lab.backend(1, B1_4.into(), 443);
    lab.service(0, VIP4.into(), 80, IPPROTO_TCP, MODE_NAT, &[0]);
    lab.service(1, VIP4.into(), 443, IPPROTO_TCP, MODE_DSR, &[1]);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let syn = |port: u16, ttl: u8| {
        let h = wire::V4 {
            ttl,
            ..wire::V4_CLIENT
        };
        wire::frame(
            VC_MAC,
            CLIENT_MAC,
            &wire::ipv4(
                CLIENT4,
                VIP4,
                6,
                h,
                &[],
                &wire::tcp(client, 42000, vip, port, TCP_SYN, b""),
            ),
        )
    };
    lab.expect(lab.vc, &syn(80, 1), XDP_DROP, "a NAT SYN at TTL 1");
    assert_eq!(
        lab.stat(Stat::DropTtlExpired),
        1,
        "the expired TTL was not counted"
    );
    assert!(
        lab.conntrack
            .get(&flow(client, 42000, vip, 80, IPPROTO_TCP), 0)
            .is_err(),
        "a packet dropped for its TTL opened a flow"
    );
    let out = lab.expect(lab.vc, &syn(80, 2), XDP_REDIRECT, "a NAT SYN at TTL 2");
    assert_eq!(out[14 + 8], 1, "NAT did not decrement the TTL");
    wire::assert_checksums(&out, "the SYN at TTL 2");
    let out = lab.expect(lab.vc, &syn(443, 1), XDP_REDIRECT, "a DSR SYN at TTL 1");
    assert_eq!(
        out[14 + 20 + 8],
        1,
        "DSR changed the client's packet inside the tunnel"
    );
    // The reply of the TTL-2 flow, at TTL 1: dropped, counted.
    let snat = l4_source_port(&lab.expect(lab.vc, &syn(80, 64), XDP_REDIRECT, "a retransmission"));
    let (b, l): (IpAddr, IpAddr) = (B1_4.into(), LOCAL4.into());
    let h = wire::V4 {
        ttl: 1,
        ..wire::V4_CLIENT
    };
    let reply = wire::frame(
        VB_MAC,
        B1_MAC,
        &wire::ipv4(
            B1_4,
            LOCAL4,
            6,
            h,
            &[],
            &wire::tcp(b, 8080, l, snat, TCP_SYN | TCP_ACK, b""),
        ),
    );
    lab.expect(lab.vb, &reply, XDP_DROP, "a NAT reply at TTL 1");
    assert_eq!(
        lab.stat(Stat::DropTtlExpired),
        2,
        "the reply's TTL was not counted"
    );
}
