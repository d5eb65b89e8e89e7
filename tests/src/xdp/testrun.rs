//! The TestRun lab: the lb-ebpf object loaded (so the kernel's verifier checks its programs),
//! its maps taken, and a namespace with two veth pairs for `bpf_fib_lookup` to route in; a
//! test fills the maps as `lb_common::maps` tells the daemon to, runs crafted frames through a
//! program with BPF_PROG_TEST_RUN (aya's `TestRun`), and reads the maps and counters back.
//!
//! The lab's addresses: clients come in on `vc` (10.0.1.1, fd00:1::1), backends sit behind
//! `vb` (10.0.2.1, fd00:2::1, also the balancer's SNAT / outer source address).
//!
//! A lab runs the balancer at one [`Hook`]: `lb_xdp`, or `lb_tc` (the same balancer at tc
//! ingress), whose return values [`Lab::run`] reports as the XDP action with the same meaning,
//! so every test states its expectations once for both.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use lb_common::{
    maps::{
        addr_words as words, family_of as family, table_index, vip_port_bit, Backend, ClientKey,
        ClientState, CtEntry, DecapAddr, Limits, NatReverse, Service, VipKey, VipValue, BACKENDS,
        BACKEND_STATS, CLIENTS, CONNTRACK, DECAP_ADDRS, DECAP_SOURCES, DEVMAP, LIMITS, NAT_REVERSE,
        PROG_BALANCER, PROG_DECAP, PROG_DECAP_TC, PROG_TC, SERVICES, SERVICE_STATS, STATS, TABLES,
        VIPS, VIP_ADDRS, VIP_PORTS,
    },
    Counters, FlowKey, Stat,
};

use crate::{netns::Netns, require_root};

/// `XDP_DROP`: the program dropped the frame.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`: the program handed the frame to the kernel.
pub const XDP_PASS: u32 = 2;
/// `XDP_TX`: the program sent the frame back out of the interface it came in on.
pub const XDP_TX: u32 = 3;
/// `XDP_REDIRECT`: the program sent the frame out of another interface.
pub const XDP_REDIRECT: u32 = 4;

/// The name of an XDP action, for assertion messages.
pub fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "unknown action",
    }
}

/// The MAC of `vc`, the lab's client-facing interface.
pub const VC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
/// The MAC of `vb`, the lab's backend-facing interface.
pub const VB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
/// The client's MAC, a static neighbour on `vc`.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x64];
/// Backend b1's MAC, a static neighbour on `vb`.
pub const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x11];
/// Backend b2's MAC, a static neighbour on `vb`.
pub const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x12];

/// The client's IPv4 address.
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 100);
/// The IPv4 VIP the tests give their services.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// The balancer's IPv4 address on `vb`: the services' `local_addr` (SNAT / outer source).
pub const LOCAL4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// Backend b1's IPv4 address.
pub const B1_4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 11);
/// Backend b2's IPv4 address.
pub const B2_4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 12);
/// The client's IPv6 address.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x100);
/// The IPv6 VIP the tests give their services.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
/// The balancer's IPv6 address on `vb`: the services' `local_addr`.
pub const LOCAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
/// Backend b1's IPv6 address.
pub const B1_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x11);

/// The first SNAT port of every service [`Lab::service`] adds.
pub const SNAT_MIN: u16 = 20000;
/// The last SNAT port of every service [`Lab::service`] adds.
pub const SNAT_MAX: u16 = 20099;

/// The conntrack key of a flow, as `lb_xdp` builds it from a packet.
pub fn flow(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, protocol: u8) -> FlowKey {
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

/// Where a lab runs the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `lb_xdp`, on `xdp_md` frames.
    Xdp,
    /// `lb_tc`, on socket buffers at tc ingress.
    Tc,
}

/// A GSO super-packet's shape, as a tc test run gives it to the socket buffer
/// (`__sk_buff.gso_size`, `gso_segs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    /// Payload bytes per segment (the kernel's `gso_size` is 16 bits); 0 for a packet that is
    /// no super-packet.
    pub size: u16,
    /// How many segments the super-packet stands for.
    pub segs: u32,
}

impl Gso {
    /// A plain packet.
    pub const NONE: Gso = Gso { size: 0, segs: 0 };
}

/// `TC_ACT_UNSPEC` (-1, TCX's `TCX_NEXT`): the classifier handed the packet on (to the next
/// program on the hook, or the kernel).
const TC_ACT_UNSPEC: u32 = u32::MAX;
/// `TC_ACT_SHOT`: the classifier dropped the packet.
const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: the classifier redirected the packet (`bpf_redirect*`).
const TC_ACT_REDIRECT: u32 = 7;

/// A loaded lb-ebpf object with its maps, and the namespace its packets are routed in.
pub struct Lab {
    /// The object, with `lb_xdp`, `lb_tc`, `lb_decap` and `lb_decap_tc` loaded.
    pub ebpf: Ebpf,
    /// Which programs [`Lab::run`] runs for [`PROG_BALANCER`] and [`PROG_DECAP`].
    pub hook: Hook,
    /// `VIPS`: (VIP, port, protocol) to service.
    pub vips: HashMap<MapData, VipKey, VipValue>,
    /// `SERVICES`: a service's mode, table halves and SNAT range.
    pub services: Array<MapData, Service>,
    /// `BACKENDS`: a backend's address, port and flags.
    pub backends: Array<MapData, Backend>,
    /// `TABLES`: the Maglev tables, both halves of every service.
    pub tables: Array<MapData, u32>,
    /// `CONNTRACK`: flow to backend.
    pub conntrack: HashMap<MapData, FlowKey, CtEntry>,
    /// `NAT_REVERSE`: a NAT'ed flow's reply key to the client's flow.
    pub nat_reverse: HashMap<MapData, FlowKey, NatReverse>,
    /// `STATS`: the global counters, indexed by [`Stat`].
    pub stats: PerCpuArray<MapData, u64>,
    /// `SERVICE_STATS`: per-service counters.
    pub service_stats: PerCpuArray<MapData, Counters>,
    /// `BACKEND_STATS`: per-backend counters.
    pub backend_stats: PerCpuArray<MapData, Counters>,
    /// `LIMITS`: a service's per-client limits.
    pub limits: Array<MapData, Limits>,
    /// `CLIENTS`: per-client state the limits count in.
    pub clients: HashMap<MapData, ClientKey, ClientState>,
    /// `DECAP_ADDRS`: the host's addresses `lb_decap` unwraps tunnels for (b1's).
    pub decap_addrs: HashMap<MapData, DecapAddr, u32>,
    /// The VIPs' addresses, as the daemon keeps them for fragments and extension headers.
    pub vip_addrs: HashMap<MapData, DecapAddr, u32>,
    /// The VIPs' ports, a bit each, as the daemon keeps them.
    pub vip_ports: Array<MapData, u64>,
    /// ifindex of `vc`, where clients come in.
    pub vc: u32,
    /// ifindex of `vb`, behind which the backends are.
    pub vb: u32,
    /// The namespace the programs run and route in.
    pub ns: Netns,
}

/// `m` written as `ip` takes it: 02:00:00:00:01:01.
pub fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Lab {
    /// Loads the object named by `LB_EBPF_OBJ`, takes its maps and builds the namespace; the
    /// balancer runs at `hook`. Panics with what failed (no object, the verifier's rejection,
    /// `ip` errors).
    pub fn new(hook: Hook) -> Lab {
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
        for name in [PROG_TC, PROG_DECAP_TC] {
            let tc: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("the object has no program {name}"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is not a tc classifier: {e}"));
            tc.load()
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
        let vip_ports: Array<MapData, u64> =
            Array::try_from(take(VIP_PORTS)).expect("VIP_PORTS is an array of u64");
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
            hook,
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
            vip_ports,
            vc,
            vb,
            ns,
        }
    }

    /// Writes backend `id` at `addr`:`port`, flags clear.
    pub fn backend(&mut self, id: u32, addr: IpAddr, port: u16) {
        let b = Backend {
            addr: words(addr),
            port,
            family: family(addr),
            flags: 0,
        };
        self.backends.set(id, b, 0).expect("write BACKENDS");
    }

    /// Sets backend `id`'s flags (`BACKEND_F_DOWN`, `BACKEND_F_DRAINING`).
    pub fn set_backend_flags(&mut self, id: u32, flags: u8) {
        let mut b = self.backends.get(&id, 0).expect("read BACKENDS");
        b.flags = flags;
        self.backends.set(id, b, 0).expect("write BACKENDS");
    }

    /// Adds service `id` for `vip`:`port`/`protocol` in `mode` with the table `slots`, in the
    /// daemon's order: table, service, VIP last.
    pub fn service(
        &mut self,
        id: u32,
        vip: IpAddr,
        port: u16,
        protocol: u8,
        mode: u8,
        slots: &[u32],
    ) {
        let local = if vip.is_ipv4() {
            IpAddr::V4(LOCAL4)
        } else {
            IpAddr::V6(LOCAL6)
        };
        let s = Service {
            mode,
            family: family(vip),
            local_addrs: 0,
            flags: 0,
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
        let (word, bit) = vip_port_bit(port);
        let had = self.vip_ports.get(&word, 0).expect("read VIP_PORTS");
        self.vip_ports
            .set(word, had | bit, 0)
            .expect("write VIP_PORTS");
    }

    /// Publishes a new table for service `id` as the contract says: inactive half, its size,
    /// then the flip.
    pub fn publish(&mut self, id: u32, slots: &[u32]) {
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
    /// [`PROG_BALANCER`] and [`PROG_DECAP`] run at the lab's [`Hook`] (`lb_tc` and
    /// `lb_decap_tc` on tc); on tc the action is reported as the XDP action of the same
    /// meaning (see [`Lab::run_tc`]).
    pub fn run(&self, prog: &str, ingress: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        if let Some(tc) = self.tc_form(prog) {
            return self
                .try_run_tc(tc, ingress, frame, Gso::NONE)
                .unwrap_or_else(|| {
                    panic!(
                        "BPF_PROG_TEST_RUN of {tc} refused the {}-byte frame",
                        frame.len()
                    )
                });
        }
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

    /// Runs `lb_tc` on `frame` as a socket buffer received on `ingress`. The action is given
    /// as XDP's: `TC_ACT_UNSPEC` as `XDP_PASS`, `TC_ACT_SHOT` as `XDP_DROP`, and
    /// `TC_ACT_REDIRECT` as `XDP_TX` when the frame leaves by the interface it came in on
    /// (its new source MAC is `ingress`'s: a turned-around answer, or a route back out of
    /// `ingress`), else `XDP_REDIRECT`, which is how `lb_xdp` tells them apart.
    pub fn run_tc(&self, ingress: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_tc_gso(ingress, frame, Gso::NONE)
    }

    /// [`Lab::run_tc`] on `frame` as the GSO super-packet `gso` describes (`frame` at most
    /// about 3.7 KB: a test run's socket buffer is one page, and a longer frame panics here).
    /// What a test run cannot give such a packet: its transport header offset. Without it,
    /// `bpf_check_mtu` with `BPF_MTU_CHK_SEGS` on a packet longer than the MTU reads every
    /// segment as too big for any MTU (`skb_gso_network_seglen`), or, on kernels that check
    /// for the offset, fails (and a kernel built with `CONFIG_DEBUG_NET` warns once). Either
    /// way the program finds the segments do not fit, so only that outcome of a segment check
    /// can be tested this way, whatever `gso.size` says.
    pub fn run_tc_gso(&self, ingress: u32, frame: &[u8], gso: Gso) -> (u32, Vec<u8>) {
        self.try_run_tc(PROG_TC, ingress, frame, gso)
            .unwrap_or_else(|| {
                panic!(
                    "BPF_PROG_TEST_RUN of {PROG_TC} refused the {}-byte frame ({gso:?})",
                    frame.len()
                )
            })
    }

    /// [`Lab::run`], or `None` when the kernel builds no socket buffer from `frame` for `lb_tc`
    /// (BPF_PROG_TEST_RUN answers EINVAL to an IPv4 frame cut inside its IP header; such a
    /// frame reaches XDP only).
    pub fn try_run(&self, prog: &str, ingress: u32, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
        match self.tc_form(prog) {
            Some(tc) => self.try_run_tc(tc, ingress, frame, Gso::NONE),
            None => Some(self.run(prog, ingress, frame)),
        }
    }

    /// The tc program that stands for `prog` in a tc lab, if one does.
    fn tc_form(&self, prog: &str) -> Option<&'static str> {
        match (self.hook, prog) {
            (Hook::Tc, PROG_BALANCER) => Some(PROG_TC),
            (Hook::Tc, PROG_DECAP) => Some(PROG_DECAP_TC),
            _ => None,
        }
    }

    fn try_run_tc(
        &self,
        prog: &str,
        ingress: u32,
        frame: &[u8],
        gso: Gso,
    ) -> Option<(u32, Vec<u8>)> {
        let tc: &SchedClassifier = self
            .ebpf
            .program(prog)
            .expect("program present")
            .try_into()
            .expect("a tc classifier");
        // struct __sk_buff up to `gso_size` (offset 176): the packet arrives on `ingress`,
        // with `gso`'s `gso_segs` (offset 164) and `gso_size`; every other field the kernel
        // lets a test set stays zero.
        let mut skb = [0u8; 180];
        skb[36..40].copy_from_slice(&ingress.to_ne_bytes());
        skb[40..44].copy_from_slice(&ingress.to_ne_bytes());
        skb[164..168].copy_from_slice(&gso.segs.to_ne_bytes());
        skb[176..180].copy_from_slice(&u32::from(gso.size).to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .ns
            .enter(|| {
                tc.test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&skb),
                    ..TestRunOptions::default()
                })
            })
            .expect("enter the lab namespace");
        let result = match result {
            Ok(result) => result,
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                return None
            }
            Err(e) => panic!("BPF_PROG_TEST_RUN of {prog} failed: {e:?}"),
        };
        out.truncate(result.data_size_out as usize);
        let action = match result.return_value {
            TC_ACT_UNSPEC => XDP_PASS,
            TC_ACT_SHOT => XDP_DROP,
            TC_ACT_REDIRECT if out.len() >= 12 && out[6..12] == self.mac_of(ingress) => XDP_TX,
            TC_ACT_REDIRECT => XDP_REDIRECT,
            other => 0x100 | other,
        };
        Some((action, out))
    }

    /// The MAC address of the lab's interface `ifindex` (`vc` or `vb`); all zero for another.
    fn mac_of(&self, ifindex: u32) -> [u8; 6] {
        if ifindex == self.vc {
            VC_MAC
        } else if ifindex == self.vb {
            VB_MAC
        } else {
            [0; 6]
        }
    }

    /// Runs the balancer and asserts the action.
    pub fn expect(&self, ingress: u32, frame: &[u8], action: u32, what: &str) -> Vec<u8> {
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

    /// The global counter `stat`, summed over CPUs.
    pub fn stat(&self, stat: Stat) -> u64 {
        self.stats
            .get(&(stat as u32), 0)
            .expect("read STATS")
            .iter()
            .sum()
    }

    /// Entry `id` of a per-CPU [`Counters`] map, summed over CPUs.
    pub fn counters(map: &PerCpuArray<MapData, Counters>, id: u32) -> Counters {
        let mut total = Counters::default();
        for c in map.get(&id, 0).expect("read counters").iter() {
            total.packets += c.packets;
            total.bytes += c.bytes;
            total.new_flows += c.new_flows;
        }
        total
    }

    /// Service `id`'s counters, summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Counters {
        Self::counters(&self.service_stats, id)
    }

    /// Backend `id`'s counters, summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Counters {
        Self::counters(&self.backend_stats, id)
    }
}

/// A new [`Lab`] running the balancer at `hook` when the process may load BPF programs;
/// `None` (the test skips) when not root, unless `LB_REQUIRE_PRIVILEGED=1`, when it panics.
pub fn lab_at(hook: Hook, test: &str) -> Option<Lab> {
    if !require_root(test) {
        return None;
    }
    Some(Lab::new(hook))
}
