//! Several lb nodes behind an ECMP router, in network namespaces made by the test: the set-up
//! of issue 14's cluster test and `lb-demo --cluster`.
//!
//! ```text
//!  client ns          router ns (BIRD, AS 65000)         lb node k = 1..=4 (lb-daemon, BIRD, AS 6500k)
//!  c0 10.220.0.2 ──── r0 10.220.0.1
//!                     rk 10.221.k.1 ─────────────────── n0 10.221.k.2  (eBPF plane at tc)
//!                     bj 10.222.j.1 ───── backend j:    b0 10.222.j.2  (TCP echo on :7000;
//!                                                        DSR: VIP on lo, decap at tc)
//! ```
//!
//! The VIP, 10.223.0.1:7000, is on no node: each node's daemon keeps a route for it in table
//! [`TABLE`] while it can serve it (`[announce]`), its BIRD (`config/bird.conf`, addresses
//! replaced) exports it to the router over eBGP with BFD, and the router's BIRD installs one
//! multipath route over every node that announces it; the router's kernel picks a node per
//! flow by the 5-tuple (`fib_multipath_hash_policy = 1`). Each node forwards on its one
//! interface, back through the router, to the backend its Maglev table names. Backends answer
//! the client directly (DSR) or through the node (NAT).

mod bird;
pub mod flows;

pub use bird::Bird;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::config::{DaemonConfig, ServiceConfig};
use crate::netns::{veth, Netns};
use crate::xdp::{bpf_object, in_netns, Decap, Mode};
use crate::{Daemon, TcpServer};

/// The VIP the cluster balances.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 223, 0, 1);
/// The echo service's port, on the VIP and on the backends.
pub const PORT: u16 = 7000;
/// The routing table the nodes' `[announce]` writes and their BIRD reads.
pub const TABLE: u32 = 100;
/// The most nodes a cluster can have (the router has a BGP session ready for each).
pub const MAX_NODES: usize = 4;
/// The bytes a backend's echo server sends first: the address it sees the connection from.
pub const GREETING: usize = 16;
/// The client's address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 220, 0, 2);

/// Node `k`'s address (1-based): 10.221.k.2.
pub fn node_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 221, k as u8, 2)
}

/// Backend `j`'s address (1-based): 10.222.j.2.
pub fn backend_ip(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 222, j as u8, 2)
}

/// The VIP and port.
pub fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), PORT)
}

/// The example BIRD config shipped with lb (`config/bird.conf`).
fn shipped_bird_conf() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/bird.conf");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Node `k`'s BIRD config: the shipped node part with this cluster's addresses, AS and
/// interface (its IPv6 session left out: the cluster is IPv4 only).
pub fn node_bird_conf(k: usize) -> String {
    let shipped = shipped_bird_conf();
    let node = shipped
        .split("# ---- router")
        .next()
        .expect("the node part");
    let node = match (node.find("protocol bgp upstream6 {"), node.rfind("\n}\n")) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{}", &node[..start], &node[end + 3..])
        }
        _ => node.to_string(),
    };
    node.replace("192.0.2.11", &node_ip(k).to_string())
        // What is left of 192.0.2.1x after the node's own is the router's address.
        .replace("192.0.2.1", &format!("10.221.{k}.1"))
        .replace("as 65001;", &format!("as {};", 65000 + k))
        .replace("interface \"eth0\"", "interface \"n0\"")
}

/// The router's BIRD config: the shipped router part, uncommented, with a session per
/// possible node (IPv4 only).
pub fn router_bird_conf() -> String {
    let shipped = shipped_bird_conf();
    let router = shipped
        .split("# ---- router")
        .nth(1)
        .expect("config/bird.conf has a router part");
    let mut text: String = router
        .lines()
        .skip(1)
        .map(|l| {
            l.strip_prefix("# ")
                .or_else(|| l.strip_prefix('#'))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n");
    if let Some(at) = text.find("# IPv6 VIPs") {
        text.truncate(at);
    }
    for k in 1..=3 {
        text = text.replace(&format!("192.0.2.1{k}"), &node_ip(k).to_string());
    }
    text = text
        .replace("router id 192.0.2.1;", "router id 10.220.0.1;")
        .replace("interface \"eth0\"", "interface \"r*\"");
    for k in 4..=MAX_NODES {
        text.push_str(&format!(
            "\nprotocol bgp lb{k} from lb_node {{\n    neighbor {} as {};\n}}\n",
            node_ip(k),
            65000 + k
        ));
    }
    text
}

/// One lb node: its namespace, daemon and BIRD.
pub struct Node {
    /// 1-based.
    pub k: usize,
    /// Its namespace.
    pub ns: Netns,
    /// Its daemon, `None` once stopped.
    pub daemon: Option<Daemon>,
    /// Its BIRD, `None` once stopped.
    pub bird: Option<Bird>,
}

impl Node {
    /// The daemon's `/status`.
    pub fn status(&self) -> serde_json::Value {
        let d = self.daemon.as_ref().expect("the node's daemon runs");
        let api = d.admin_addr();
        in_netns(&self.ns, || crate::admin::status(api)).expect("enter the node's namespace")
    }

    /// Flows the node's backends were given since start (the eBPF plane's new flows).
    pub fn flows_started(&self) -> u64 {
        let status = self.status();
        status["services"][0]["backends"].as_array().map_or(0, |b| {
            b.iter().map(|b| b["total"].as_u64().unwrap_or(0)).sum()
        })
    }

    /// Runs `lb-daemon ARGS --admin <its API>` inside the node; returns its stdout.
    /// Panics when it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let d = self.daemon.as_ref().expect("the node's daemon runs");
        let api = d.admin_addr().to_string();
        let binary = crate::daemon::daemon_binary().expect("the lb-daemon binary");
        let out = self
            .ns
            .command(&binary.display().to_string())
            .args(args)
            .args(["--admin", &api])
            .output()
            .expect("lb-daemon runs");
        assert!(
            out.status.success(),
            "`lb-daemon {}` on node {} failed: {}{}",
            args.join(" "),
            self.k,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The VIP routes the daemon keeps in [`TABLE`] (`ip route show table 100`).
    pub fn announce_table(&self) -> String {
        let out = self
            .ns
            .command("ip")
            .args(["route", "show", "table", &TABLE.to_string()])
            .output()
            .expect("ip runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A backend: its namespace and echo server.
pub struct Backend {
    /// Its namespace.
    pub ns: Netns,
    /// The echo server on :[`PORT`].
    pub server: TcpServer,
}

/// The whole cluster; everything stops and goes on drop.
pub struct Cluster {
    /// NAT or DSR.
    pub mode: Mode,
    /// The nodes, index 0 is node 1.
    pub nodes: Vec<Node>,
    /// The router's BIRD.
    pub router_bird: Bird,
    /// Decapsulators on the backends (DSR).
    decaps: Vec<Decap>,
    /// The backends.
    pub backends: Vec<Backend>,
    /// The router's namespace.
    pub router: Netns,
    /// The client's namespace.
    pub client: Netns,
    /// BIRD configs and logs.
    dir: tempfile::TempDir,
}

impl Cluster {
    /// The router, the client, `backends` backends with their echo servers, and `nodes` lb
    /// nodes forwarding in `mode`; returns once the router spreads the VIP over every node.
    /// Panics with the failing step.
    pub fn start(mode: Mode, nodes: usize, backends: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("a directory for BIRD");
        let client = Netns::new("cc").expect("client namespace");
        let router = Netns::new("cr").expect("router namespace");
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            // Backends answer from the VIP, which the router routes to the nodes.
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            router.sysctl(key, value).expect("router sysctl");
        }
        veth(
            &router,
            "r0",
            "10.220.0.1/24",
            &client,
            "c0",
            &format!("{CLIENT}/24"),
        )
        .expect("client veth");
        client
            .ip(&["route", "add", "default", "via", "10.220.0.1"])
            .expect("client default route");
        let object = bpf_object();
        let from: Vec<IpAddr> = (1..=MAX_NODES).map(|k| IpAddr::V4(node_ip(k))).collect();
        let mut decaps = Vec::new();
        let mut servers = Vec::new();
        for j in 1..=backends {
            let ns = Netns::new(&format!("cb{j}")).expect("backend namespace");
            veth(
                &router,
                &format!("b{j}"),
                &format!("10.222.{j}.1/24"),
                &ns,
                "b0",
                &format!("{}/24", backend_ip(j)),
            )
            .expect("backend veth");
            ns.ip(&["route", "add", "default", "via", &format!("10.222.{j}.1")])
                .expect("backend default route");
            if mode == Mode::Dsr {
                ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
                    .expect("VIP on the backend's loopback");
                // Room for the IPIP header on the way in.
                for (n, dev) in [(&router, format!("b{j}")), (&ns, "b0".to_string())] {
                    n.ip(&["link", "set", &dev, "mtu", "1600"])
                        .expect("backend MTU");
                }
                decaps.push(Decap::start_at("tc", &ns, "b0", &object, &from));
            }
            let name = format!("b{j}");
            let server = ns
                .enter(|| {
                    TcpServer::start_on(
                        &name,
                        SocketAddr::from(([0, 0, 0, 0], PORT)),
                        std::sync::Arc::new(echo),
                    )
                })
                .expect("enter the backend namespace")
                .expect("the echo server starts");
            servers.push(Backend { ns, server });
        }
        let router_bird = Bird::start(&router, "router", &router_bird_conf(), dir.path());
        let mut cluster = Cluster {
            mode,
            nodes: Vec::new(),
            router_bird,
            decaps,
            backends: servers,
            router,
            client,
            dir,
        };
        for _ in 0..nodes {
            cluster.add_node();
        }
        let all: BTreeSet<usize> = (1..=nodes).collect();
        cluster.wait_for_next_hops(&all, Duration::from_secs(30));
        cluster
    }

    /// Adds the next node: its namespace and link to the router, its daemon (waited for
    /// until ready) and its BIRD. Does not wait for the router to take it in.
    pub fn add_node(&mut self) -> &Node {
        let k = self.nodes.len() + 1;
        assert!(k <= MAX_NODES, "at most {MAX_NODES} nodes");
        let ns = Netns::new(&format!("cn{k}")).expect("node namespace");
        veth(
            &self.router,
            &format!("r{k}"),
            &format!("10.221.{k}.1/24"),
            &ns,
            "n0",
            &format!("{}/24", node_ip(k)),
        )
        .expect("node veth");
        ns.ip(&["route", "add", "default", "via", &format!("10.221.{k}.1")])
            .expect("node default route");
        // The eBPF plane forwards by the kernel's FIB, which refuses while forwarding is off.
        ns.sysctl("net.ipv4.ip_forward", "1")
            .expect("forwarding on the node");
        if self.mode == Mode::Dsr {
            for (n, dev) in [(&self.router, format!("r{k}")), (&ns, "n0".to_string())] {
                n.ip(&["link", "set", &dev, "mtu", "1600"])
                    .expect("node MTU");
            }
        }
        let toml = self.node_config(k);
        let daemon = in_netns(&ns, || Daemon::start(&toml)).expect("enter the node namespace");
        let bird = Bird::start(
            &ns,
            &format!("node{k}"),
            &node_bird_conf(k),
            self.dir.path(),
        );
        self.nodes.push(Node {
            k,
            ns,
            daemon: Some(daemon),
            bird: Some(bird),
        });
        &self.nodes[k - 1]
    }

    /// Node `k`'s daemon config: the echo service on the VIP with every backend, `auto`
    /// on its one interface, announced in [`TABLE`].
    pub fn node_config(&self, k: usize) -> String {
        let forwarding = self.mode.forwarding();
        let mut svc = ServiceConfig::tcp("echo", vip())
            .set("dataplane", "auto")
            .set("interface", "n0")
            .set("backend_interfaces", toml::Value::Array(vec!["n0".into()]))
            .set("local_address", node_ip(k).to_string())
            .set("forwarding", forwarding)
            .health("kind", "tcp")
            .health("interval", "200ms")
            .health("timeout", "1s")
            .health("rise", 2)
            .health("fall", 2);
        for j in 1..=self.backends.len() {
            svc = svc.backend(SocketAddr::new(IpAddr::V4(backend_ip(j)), PORT), 1);
        }
        DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .announce("table", i64::from(TABLE))
            .announce("withdraw_wait", "1s")
            .service(svc)
            .to_toml()
    }

    /// The nodes (1-based) the router's route to the VIP goes through now.
    pub fn next_hops(&self) -> BTreeSet<usize> {
        let out = self
            .router
            .command("ip")
            .args(["-4", "route", "show", &format!("{VIP}/32")])
            .output()
            .expect("ip runs");
        let text = String::from_utf8_lossy(&out.stdout);
        (1..=MAX_NODES)
            .filter(|&k| text.contains(&format!("via {} ", node_ip(k))))
            .collect()
    }

    /// Waits up to `timeout` for the router's route to the VIP to go through exactly
    /// `nodes`; returns how long it took. Panics, with both BIRDs' views, when it does not.
    pub fn wait_for_next_hops(&self, nodes: &BTreeSet<usize>, timeout: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if &self.next_hops() == nodes {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "the router's route to the VIP goes through nodes {:?}, not {nodes:?}, after \
             {timeout:?}\nrouter BIRD:\n{}\n{}",
            self.next_hops(),
            self.router_bird.protocols(),
            self.router_bird.log_tail(20)
        );
    }

    /// Node `k` (1-based).
    pub fn node(&self, k: usize) -> &Node {
        &self.nodes[k - 1]
    }

    /// Node `k` (1-based), mutable.
    pub fn node_mut(&mut self, k: usize) -> &mut Node {
        &mut self.nodes[k - 1]
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // BIRDs and daemons first, then decapsulators; the namespaces go with the fields.
        for n in &mut self.nodes {
            if let Some(b) = &mut n.bird {
                b.kill();
            }
            n.daemon = None;
        }
        self.decaps.clear();
    }
}

/// The backends' server: first says whom it sees (the peer's address, [`GREETING`] bytes,
/// padded with spaces: a node's `local_address` in NAT mode, the client's in DSR mode), then
/// echoes what it reads until the client closes.
fn echo(mut s: std::net::TcpStream) {
    use std::io::{Read, Write};
    let peer = s
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |p| p.ip().to_string());
    if s.write_all(format!("{peer:<width$}", width = GREETING).as_bytes())
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
