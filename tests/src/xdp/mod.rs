//! The XDP tests' world: a client namespace, a balancer namespace running `lb-daemon` with
//! XDP on its client-facing veth, and backend namespaces each on its own veth (XDP_REDIRECT
//! cannot send into a bridge), with real servers in them.
//!
//! ```text
//!  client ns            balancer ns                       backend ns i (1..=n)
//!  c0 10.200.0.2 ── l0 10.200.0.1   (lb_xdp)
//!                     li 10.200.i.1 (lb_xdp) ────────── b0 10.200.i.2 (+ VIP on lo for DSR)
//! ```
//! The VIP, 10.200.100.1, exists on no interface of the balancer: only XDP answers for it.
//! The client's and the backends' veth ends compute full checksums (see [`disable_tx_checksum`]).
//! `lb-daemon decap` runs on `c0` and on every `b0`: it decapsulates DSR packets, and it is
//! the XDP program a veth's peer needs before the veth will carry `XDP_REDIRECT`ed frames.

pub mod bridge_lab;
mod decap;
mod offload;
mod peers;
pub mod scenarios;
pub mod testrun;
pub mod world;

pub use decap::Decap;
pub use offload::{disable_segmentation_offload, disable_tx_checksum, set_tx_checksum};
pub use peers::{udp_exchange, PeerServer};

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::netns::{veth, Netns};

/// The VIP every XDP test balances.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 100, 1);
/// The client's address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// The balancer's address on the client side; also its `local_address` (NAT source, DSR outer
/// source), which the backends reach through their default route.
pub const BALANCER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

/// The MTU of the balancer-to-backend veths in DSR mode: the client side's 1500 plus room for
/// the encapsulation header.
pub const DSR_BACKEND_MTU: u32 = 1600;

/// Backend `i`'s address (1-based): 10.200.i.2.
pub fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, i as u8, 2)
}

/// The balancer's interface towards backend `i` (1-based).
pub fn backend_interface(i: usize) -> String {
    format!("l{i}")
}

/// The BPF object the tests load: `$LB_EBPF_OBJ`, else the workspace's
/// `target/bpf/bpfel-unknown-none/release/lb-ebpf`. Panics with what to do when it is missing.
pub fn bpf_object() -> PathBuf {
    let path = std::env::var_os("LB_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("the tests crate lives inside the workspace")
                .to_path_buf();
            root.join("target/bpf/bpfel-unknown-none/release/lb-ebpf")
        });
    assert!(
        path.is_file(),
        "the BPF object {} is missing: run `cargo xtask build-ebpf` (or set LB_EBPF_OBJ)",
        path.display()
    );
    path
}

/// Runs `f` on the calling thread while it is inside `ns`, then returns the thread to the
/// namespace it was in. Processes `f` spawns start in `ns` and, unlike with
/// [`Netns::enter`], belong to the calling thread (a [`crate::Daemon`] dies with the thread
/// that started it).
///
/// Returns `Err` when either switch fails; a failure to switch back panics, since the thread
/// would otherwise go on in the wrong namespace.
pub fn in_netns<T>(ns: &Netns, f: impl FnOnce() -> T) -> io::Result<T> {
    use nix::sched::{setns, CloneFlags};
    let home = File::open("/proc/thread-self/ns/net")?;
    let target = File::open(format!("/var/run/netns/{}", ns.name()))?;
    setns(&target, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    struct Back(File);
    impl Drop for Back {
        fn drop(&mut self) {
            if let Err(e) = setns(&self.0, CloneFlags::CLONE_NEWNET) {
                panic!("cannot return the test thread to its network namespace: {e}");
            }
        }
    }
    let _back = Back(home);
    Ok(f())
}

/// Writes `toml` to `config_file` and starts a daemon on it in `ns` through `wrapper` (its
/// own mount namespace with a private `/etc/hosts`,
/// [`crate::daemon::private_hosts_wrapper`]), waiting up to 30 s for its `ready`. Panics
/// when a step fails: a test cannot go on without it.
pub fn spawn_with_hosts(
    ns: &Netns,
    wrapper: &std::path::Path,
    config_file: &std::path::Path,
    toml: &str,
) -> crate::Daemon {
    std::fs::write(config_file, toml).expect("config written");
    in_netns(ns, || {
        crate::Daemon::spawn(wrapper, config_file, std::time::Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("lb-daemon did not start in its mount namespace: {e}"))
    })
    .expect("enter the balancer namespace")
}

/// How the balancer forwards, which decides the backends' set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Full NAT: backends see the balancer's address.
    Nat,
    /// DSR: backends have the VIP on `lo` and see the client's address.
    Dsr,
}

impl Mode {
    /// The service's `forwarding` key for this mode: `"nat"` or `"dsr"`.
    pub fn forwarding(self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::Dsr => "dsr",
        }
    }
}

/// The eBPF hook an end-to-end test's balancer runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// `dataplane = "xdp"`: `lb_xdp`. Its neighbours need tx checksum offload off and an XDP
    /// program on the veth peers (see [`Topology::at`]).
    Xdp,
    /// `dataplane = "tc"`: `lb_tc` at tc ingress. Nothing on the neighbours changes.
    Tc,
}

/// What an end-to-end eBPF test runs: the hook and the forwarding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Path {
    /// The hook.
    pub plane: Plane,
    /// NAT or DSR.
    pub mode: Mode,
}

impl Path {
    /// `mode` at the tc hook.
    pub fn tc(mode: Mode) -> Path {
        Path {
            plane: Plane::Tc,
            mode,
        }
    }
}

/// A mode alone is XDP's, the hook these tests were first written for.
impl From<Mode> for Path {
    fn from(mode: Mode) -> Path {
        Path {
            plane: Plane::Xdp,
            mode,
        }
    }
}

/// `Xdp Nat`, `Tc Dsr`: how assertion messages name the path.
impl std::fmt::Debug for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {:?}", self.plane, self.mode)
    }
}

/// The namespaces, veths and decapsulators of one test; all removed on drop.
pub struct Topology {
    /// The hook the balancer runs at.
    pub plane: Plane,
    /// Decapsulators, stopped before the namespaces go.
    pub decaps: Vec<Decap>,
    /// The client's namespace (`c0`, 10.200.0.2).
    pub client: Netns,
    /// The balancer's namespace (`l0` towards the client, `l1..ln` towards the backends).
    pub balancer: Netns,
    /// Backend namespaces, index 0 is backend 1 (`b0`, 10.200.i.2).
    pub backends: Vec<Netns>,
}

impl Topology {
    /// [`Topology::at`] for XDP.
    pub fn new(mode: Mode, n: usize) -> Topology {
        Topology::at(mode.into(), n)
    }

    /// Builds the namespaces for `n` backends on `path`. For XDP it turns tx checksum offload
    /// off on the client's and the backends' veths and starts `lb-daemon decap` on each of
    /// them (the XDP program a veth's peer needs before it carries redirected frames, and DSR's
    /// decapsulator); for tc it changes nothing on the neighbours, and starts the
    /// decapsulator on the backends only in DSR mode. Panics with the failing step.
    pub fn at(path: Path, n: usize) -> Topology {
        let Path { plane, mode } = path;
        let client = Netns::new("c").expect("client namespace");
        let balancer = Netns::new("lb").expect("balancer namespace");
        veth(
            &balancer,
            "l0",
            &format!("{BALANCER}/24"),
            &client,
            "c0",
            &format!("{CLIENT}/24"),
        )
        .expect("client veth");
        client
            .ip(&[
                "route",
                "add",
                &format!("{VIP}/32"),
                "via",
                &BALANCER.to_string(),
            ])
            .expect("client route to the VIP");
        // The first packet towards a neighbour not yet resolved goes through the kernel.
        balancer
            .sysctl("net.ipv4.ip_forward", "1")
            .expect("forwarding in the balancer");
        // The balancer keeps the kernel's default ephemeral ports (32768-60999), as a user's
        // host does: NAT services take the default SNAT range outside them (1024-32767).
        let mut backends = Vec::new();
        for i in 1..=n {
            let ns = Netns::new(&format!("b{i}")).expect("backend namespace");
            veth(
                &balancer,
                &backend_interface(i),
                &format!("10.200.{i}.1/24"),
                &ns,
                "b0",
                &format!("{}/24", backend_ip(i)),
            )
            .expect("backend veth");
            ns.ip(&["route", "add", "default", "via", &format!("10.200.{i}.1")])
                .expect("backend default route");
            if mode == Mode::Dsr {
                ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
                    .expect("VIP on the backend's loopback");
                // The IPIP header adds 20 bytes to a full-size client packet: with the room
                // on the balancer-to-backend link no client needs a "fragmentation needed"
                // round trip (xdp_dsr.rs has a test over a 1500-byte link without it).
                set_link_mtu(&balancer, &ns, &backend_interface(i), DSR_BACKEND_MTU);
            }
            backends.push(ns);
        }
        let object = bpf_object();
        let from = [IpAddr::V4(BALANCER)];
        let mut decaps = Vec::new();
        if plane == Plane::Xdp {
            // Local senders must write full checksums, or XDP's rewrites leave them wrong.
            disable_tx_checksum(&client, "c0").expect("tx checksum offload off on c0");
            for ns in &backends {
                disable_tx_checksum(ns, "b0").expect("tx checksum offload off on b0");
            }
            decaps.push(Decap::start(&client, "c0", &object, &from));
        }
        if plane == Plane::Xdp || mode == Mode::Dsr {
            // On tc the backends decapsulate at tc too: an XDP program on b0 would take GSO
            // from its peer, the balancer's veth.
            let hook = match plane {
                Plane::Xdp => "xdp",
                Plane::Tc => "tc",
            };
            for ns in &backends {
                decaps.push(Decap::start_at(hook, ns, "b0", &object, &from));
            }
        }
        Topology {
            plane,
            decaps,
            client,
            balancer,
            backends,
        }
    }

    /// Sets the MTU of backend `i`'s link (index 0 is backend 1), both ends: the balancer's
    /// veth towards it and the backend's `b0`. Panics with the failing step.
    pub fn set_backend_link_mtu(&self, i: usize, mtu: u32) {
        set_link_mtu(
            &self.balancer,
            &self.backends[i],
            &backend_interface(i + 1),
            mtu,
        );
    }

    /// The `[[service]]` eBPF keys for this topology: `dataplane` (its plane), `interface =
    /// "l0"`, every backend veth, `local_address`, `forwarding`.
    pub fn xdp_keys(&self, mode: Mode) -> Vec<(&'static str, toml::Value)> {
        let dataplane = match self.plane {
            Plane::Xdp => "xdp",
            Plane::Tc => "tc",
        };
        let ifs: Vec<toml::Value> = (1..=self.backends.len())
            .map(|i| toml::Value::from(backend_interface(i)))
            .collect();
        vec![
            ("dataplane", dataplane.into()),
            ("interface", "l0".into()),
            ("backend_interfaces", toml::Value::Array(ifs)),
            ("local_address", BALANCER.to_string().into()),
            ("forwarding", mode.forwarding().into()),
        ]
    }

    /// The VIP with `port`.
    pub fn vip(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(VIP), port)
    }

    /// Connects from the balancer to port `port` of every backend, so it knows their MAC
    /// addresses before a backend that no health check has reached yet (one a reload adds)
    /// gets flows: until then the program hands packets to the kernel, which drops NAT'ed
    /// ones. A backend whose server does not run refuses the connect, which resolves its
    /// address as well.
    pub fn resolve_neighbours(&self, port: u16) {
        for i in 1..=self.backends.len() {
            let addr = SocketAddr::new(IpAddr::V4(backend_ip(i)), port);
            let connect = in_netns(&self.balancer, || {
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
            })
            .expect("enter the balancer namespace");
            match connect {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => panic!("the balancer cannot reach b{i} at {addr}: {e}"),
            }
        }
    }

    /// The id of the balancer program at this topology's hook on `interface` in the balancer's
    /// namespace: [`Topology::xdp_prog_id`], or on tc the first program at the interface's
    /// TCX ingress. `None` when none is attached.
    pub fn prog_id(&self, interface: &str) -> Option<u64> {
        match self.plane {
            Plane::Xdp => self.xdp_prog_id(interface),
            Plane::Tc => {
                use aya::programs::{SchedClassifier, TcAttachType};
                let (_, programs) = self
                    .balancer
                    .enter(|| SchedClassifier::query_tcx(interface, TcAttachType::Ingress))
                    .ok()?
                    .ok()?;
                programs.first().map(|p| u64::from(p.id()))
            }
        }
    }

    /// The id of the XDP program attached to `interface` in the balancer's namespace, as
    /// `ip -j link` shows it; `None` when none is attached.
    pub fn xdp_prog_id(&self, interface: &str) -> Option<u64> {
        let out = self
            .balancer
            .run("ip", &["-j", "-d", "link", "show", "dev", interface])
            .ok()?;
        let links: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        links.get(0)?.get("xdp")?.get("prog")?.get("id")?.as_u64()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Decapsulators first (they hold XDP on interfaces of these namespaces), then the
        // namespaces, whose deletion removes the veths.
        self.decaps.clear();
    }
}

/// Sets the MTU of the link between the balancer's `interface` and the backend namespace
/// `backend`'s `b0`, both ends. Panics with the failing step.
fn set_link_mtu(balancer: &Netns, backend: &Netns, interface: &str, mtu: u32) {
    let mtu = mtu.to_string();
    balancer
        .ip(&["link", "set", interface, "mtu", &mtu])
        .expect("MTU of the balancer's backend veth");
    backend
        .ip(&["link", "set", "b0", "mtu", &mtu])
        .expect("MTU of the backend's veth");
}
