//! The benchmark topologies: a client namespace, a balancer namespace and three backend
//! namespaces, the backends attached to the balancer in one of two ways ([`Network`]):
//!
//! ```text
//! veth:    client 10.77.0.2 ── 10.77.0.1 (VIP) balancer 10.77.N.1 (lN) ── 10.77.N.2 backend N
//! bridge:  client 10.77.0.2 ── 10.77.0.1 (VIP) balancer br0 10.77.10.1
//!                                                 ├─ pN ── b0 10.77.10.(N+1) backend N
//! ```
//! (N = 1..3.) The bridge topology is how Docker attaches containers: one bridge in the host
//! (the balancer's namespace) with each container's veth enslaved to it, all backends in one
//! subnet, the client coming in on its own interface. Its neighbours are left to the kernel
//! (no permanent entries), as on a Docker host.
//!
//! The client and the backends route everything through the balancer; the balancer forwards
//! (`ip_forward=1`, which the `direct` path relies on) and, like the client, has
//! `tcp_tw_reuse=1` and a wide local port range, so every path gets the same stack settings.
//!
//! For lb's packet-layer paths (XDP and tc): [`XDP_VIP`] is on no interface of the balancer
//! (only lb's program answers for it; the client reaches it through its default route) and on
//! every backend's loopback (DSR delivers the client's packet to it unchanged). On the veth
//! topology the balancer knows its neighbours' MAC addresses from the start (permanent
//! entries): XDP hands a packet for a neighbour it cannot resolve to the kernel, which drops a
//! NAT'ed one, and no path here runs health checks that would resolve them (tc's
//! `bpf_redirect_neigh` resolves them itself). What the packet-layer paths change beyond this
//! (checksum offload, MTU, decapsulators) is set up and undone around each of their runs
//! (`crate::xdp`, `crate::tc`).

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use lb_tests::netns::{veth, Netns};

/// The address clients send to on the balancer (its client-side veth address).
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The client's address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The VIP of lb's packet-layer paths (XDP and tc): on no balancer interface, on every
/// backend's loopback.
pub const XDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 1);
/// Number of backends.
pub const BACKENDS: usize = 3;

/// Backend `i`'s address on the veth topology (i in 0..BACKENDS).
pub fn backend_addr(i: usize) -> IpAddr {
    Network::Veth.backend_addr(i)
}

/// How the backends are attached to the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// Each backend on its own veth pair to the balancer, a /24 per backend.
    Veth,
    /// Every backend's veth enslaved to the Linux bridge `br0` in the balancer's namespace,
    /// one /24 for all (Docker's default bridge network, compose `--scale`).
    Bridge,
}

impl Network {
    /// Both, in report order.
    pub const ALL: [Network; 2] = [Network::Veth, Network::Bridge];

    /// Its name in reports (`veth`, `bridge`).
    pub fn name(self) -> &'static str {
        match self {
            Network::Veth => "veth",
            Network::Bridge => "bridge",
        }
    }

    /// Backend `i`'s address (i in 0..BACKENDS).
    pub fn backend_addr(self, i: usize) -> IpAddr {
        match self {
            Network::Veth => IpAddr::V4(Ipv4Addr::new(10, 77, i as u8 + 1, 2)),
            Network::Bridge => IpAddr::V4(Ipv4Addr::new(10, 77, 10, i as u8 + 2)),
        }
    }

    /// The balancer's interfaces towards the backends: one veth per backend, or the bridge.
    pub fn backend_interfaces(self) -> Vec<String> {
        match self {
            Network::Veth => (1..=BACKENDS).map(|n| format!("l{n}")).collect(),
            Network::Bridge => vec!["br0".into()],
        }
    }
}

/// The ephemeral ports of the client and of the balancer for the proxy paths: wide, so that
/// the second round's connection rate does not collapse on TIME_WAIT (see DESIGN notes).
pub const PROXY_LOCAL_PORTS: &str = "1024 65000";
/// Linux's default ephemeral ports, which the balancer keeps for the XDP paths (their NAT
/// takes its default SNAT range outside them, as on a user's host).
pub const KERNEL_LOCAL_PORTS: &str = "32768 60999";

/// The namespaces; dropping it deletes them (and their veth pairs and bridge).
pub struct Topology {
    /// How the backends are attached.
    pub network: Network,
    /// Where the load generators run.
    pub client: Netns,
    /// Where the balancer under test runs (or which only routes, for `direct`).
    pub balancer: Netns,
    /// One per backend, each running the servers.
    pub backends: Vec<Netns>,
}

/// Builds the topology of `network`. `Err` with the failing `ip`/`sysctl` step (needs root).
pub fn build(network: Network) -> io::Result<Topology> {
    let client = Netns::new("bcl")?;
    let balancer = Netns::new("blb")?;
    veth(
        &client,
        "c0",
        "10.77.0.2/24",
        &balancer,
        "l0",
        "10.77.0.1/24",
    )?;
    client.ip(&["route", "add", "default", "via", "10.77.0.1"])?;
    let mut backends = Vec::with_capacity(BACKENDS);
    if network == Network::Bridge {
        balancer.ip(&["link", "add", "br0", "type", "bridge"])?;
        balancer.ip(&["addr", "add", "10.77.10.1/24", "dev", "br0"])?;
        balancer.ip(&["link", "set", "br0", "up"])?;
    }
    for i in 0..BACKENDS {
        let b = Netns::new(&format!("bb{}", i + 1))?;
        let n = i + 1;
        let gateway = match network {
            Network::Veth => {
                veth(
                    &balancer,
                    &format!("l{n}"),
                    &format!("10.77.{n}.1/24"),
                    &b,
                    "b0",
                    &format!("{}/24", network.backend_addr(i)),
                )?;
                format!("10.77.{n}.1")
            }
            Network::Bridge => {
                bridge_port(&balancer, &format!("p{n}"), &b, &network.backend_addr(i))?;
                "10.77.10.1".to_string()
            }
        };
        b.ip(&["route", "add", "default", "via", &gateway])?;
        b.ip(&["addr", "add", &format!("{XDP_VIP}/32"), "dev", "lo"])?;
        backends.push(b);
    }
    balancer.sysctl("net.ipv4.ip_forward", "1")?;
    for ns in [&client, &balancer] {
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        ns.sysctl("net.ipv4.ip_local_port_range", PROXY_LOCAL_PORTS)?;
    }
    for ns in &backends {
        // Each backend accepts thousands of connections a second.
        ns.sysctl("net.core.somaxconn", "4096")?;
    }
    balancer.sysctl("net.core.somaxconn", "4096")?;
    if network == Network::Veth {
        permanent_neighbour(&balancer, "l0", &CLIENT.to_string(), &client, "c0")?;
        for (i, b) in backends.iter().enumerate() {
            let addr = backend_addr(i).to_string();
            permanent_neighbour(&balancer, &format!("l{}", i + 1), &addr, b, "b0")?;
        }
    }
    Ok(Topology {
        network,
        client,
        balancer,
        backends,
    })
}

/// A veth pair from the bridge `br0` in `balancer` (end `port`, enslaved, no address) to
/// `backend`'s `b0` with `addr`/24, both up: a container's interface on Docker's bridge.
fn bridge_port(balancer: &Netns, port: &str, backend: &Netns, addr: &IpAddr) -> io::Result<()> {
    balancer.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        "b0",
        "netns",
        backend.name(),
    ])?;
    balancer.ip(&["link", "set", port, "master", "br0"])?;
    balancer.ip(&["link", "set", port, "up"])?;
    backend.ip(&["addr", "add", &format!("{addr}/24"), "dev", "b0"])?;
    backend.ip(&["link", "set", "b0", "up"])
}

/// Gives `ns` a permanent neighbour entry on `dev` for `addr`, the address of `peer`'s
/// `peer_dev`. `Err` when `ip` fails or prints no MAC address.
fn permanent_neighbour(
    ns: &Netns,
    dev: &str,
    addr: &str,
    peer: &Netns,
    peer_dev: &str,
) -> io::Result<()> {
    let out = peer.run("ip", &["-br", "link", "show", "dev", peer_dev])?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `b0@if5   UP   aa:bb:cc:dd:ee:ff <BROADCAST,...>`
    let mac = text
        .split_whitespace()
        .find(|w| w.len() == 17 && w.bytes().filter(|&b| b == b':').count() == 5)
        .ok_or_else(|| io::Error::other(format!("no MAC address of {peer_dev} in `{text}`")))?;
    ns.ip(&[
        "neigh",
        "replace",
        addr,
        "lladdr",
        mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ])
}
