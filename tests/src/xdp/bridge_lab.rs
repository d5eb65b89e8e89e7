//! The bridge topology (how Docker attaches containers): a client on a veth to the
//! balancer, and the backends on a Linux bridge in the balancer's namespace, one veth port
//! each, one subnet for all.

use std::net::Ipv4Addr;

use crate::netns::{veth, Netns};

/// A client `c0` (10.200.0.2) and a balancer `l0` (10.200.0.1) on a veth; the balancer's
/// bridge `br0` (10.200.1.1/24) with one veth port per backend namespace `b{i}`
/// (10.200.1.{i+1}), as Docker attaches replicas. All removed on drop.
pub struct BridgeLab {
    /// `c`: the client.
    pub client: Netns,
    /// `lb`: the balancer, with `l0` and `br0`.
    pub balancer: Netns,
    /// `b1`..: the backends, each with `b0` on the bridge.
    pub backends: Vec<Netns>,
}

/// The VIP, on no interface.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 100, 1);
/// The balancer's address on `br0`.
pub const ON_BRIDGE: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);

impl BridgeLab {
    /// Builds the namespaces with `n` backends; panics when a step fails.
    pub fn new(n: usize) -> BridgeLab {
        let client = Netns::new("c").expect("client namespace");
        let balancer = Netns::new("lb").expect("balancer namespace");
        veth(
            &balancer,
            "l0",
            "10.200.0.1/24",
            &client,
            "c0",
            "10.200.0.2/24",
        )
        .expect("client veth");
        client
            .ip(&["route", "add", &format!("{VIP}/32"), "via", "10.200.0.1"])
            .expect("client route to the VIP");
        balancer
            .sysctl("net.ipv4.ip_forward", "1")
            .expect("forwarding in the balancer");
        make_bridge(&balancer);
        let mut backends = Vec::new();
        for i in 1..=n {
            let ns = Netns::new(&format!("b{i}")).expect("backend namespace");
            plug(&balancer, i, &ns, None);
            backends.push(ns);
        }
        BridgeLab {
            client,
            balancer,
            backends,
        }
    }

    /// Backend `i`'s address (1-based): 10.200.1.{i+1}.
    pub fn backend(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 1, i as u8 + 1)
    }

    /// Prepares the backends for DSR: the VIP on each one's loopback, and room for the
    /// tunnel header on the bridge's links ([`super::DSR_BACKEND_MTU`]).
    pub fn prepare_dsr(&self) {
        let mtu = super::DSR_BACKEND_MTU.to_string();
        for (k, ns) in self.backends.iter().enumerate() {
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
                .expect("VIP on the backend's loopback");
            ns.ip(&["link", "set", "b0", "mtu", &mtu])
                .expect("MTU of the backend's veth");
            let port = format!("p{}", k + 1);
            self.balancer
                .ip(&["link", "set", &port, "mtu", &mtu])
                .expect("MTU of the bridge port");
        }
        self.balancer
            .ip(&["link", "set", "br0", "mtu", &mtu])
            .expect("MTU of the bridge");
    }
}

/// Makes `br0` in `balancer`, with [`ON_BRIDGE`]/24, up; panics when a step fails.
pub fn make_bridge(balancer: &Netns) {
    balancer
        .ip(&["link", "add", "br0", "type", "bridge"])
        .expect("a bridge");
    balancer
        .ip(&["addr", "add", &format!("{ON_BRIDGE}/24"), "dev", "br0"])
        .expect("bridge address");
    balancer
        .ip(&["link", "set", "br0", "up"])
        .expect("bridge up");
}

/// Connects backend namespace `ns` (the `i`-th, 1-based) to `br0` in `balancer`: port `p{i}`,
/// its peer `b0` in `ns` with [`BridgeLab::backend`]`(i)`, Ethernet address `mac` if given,
/// and a default route via the bridge. Panics when a step fails.
pub fn plug(balancer: &Netns, i: usize, ns: &Netns, mac: Option<&str>) {
    let port = format!("p{i}");
    balancer
        .ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "b0",
            "netns",
            ns.name(),
        ])
        .expect("backend veth");
    if let Some(mac) = mac {
        ns.ip(&["link", "set", "b0", "address", mac])
            .expect("the backend's Ethernet address");
    }
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", BridgeLab::backend(i)),
        "dev",
        "b0",
    ])
    .expect("backend address");
    ns.ip(&["link", "set", "b0", "up"]).expect("backend up");
    ns.ip(&["route", "add", "default", "via", &ON_BRIDGE.to_string()])
        .expect("backend default route");
    balancer
        .ip(&["link", "set", &port, "master", "br0"])
        .expect("port on the bridge");
    balancer.ip(&["link", "set", &port, "up"]).expect("port up");
}
