//! `dataplane = "auto"` decides per interface, one test per decision that can be built here:
//!
//! | interfaces of the service | auto's choice | test |
//! |---|---|---|
//! | veth (client and backends) | tc | [`auto_on_veths_runs_on_tc_and_serves`] |
//! | veth to the client, backends on a Linux bridge | tc (never generic XDP: it would not deliver into the bridge) | [`auto_with_backends_on_a_bridge_runs_on_tc_and_every_request_succeeds`] |
//! | the loopback device | proxy | [`auto_on_the_loopback_device_runs_on_the_proxy_and_serves`] |
//! | a device without Ethernet frames (tun, as WireGuard is) among them | proxy, saying so; `tc` refuses to start | [`auto_with_an_interface_without_ethernet_runs_on_the_proxy_and_tc_refuses_it`] |
//! | veth, with an object that has no `lb_tc` | proxy, saying so | [`auto_with_an_object_without_lb_tc_runs_on_the_proxy_and_says_why`] |
//! | veth that carries XDP for another service (`dataplane = "xdp"`) | proxy, saying so (an interface carries one hook) | [`auto_where_another_service_holds_xdp_runs_on_the_proxy_and_says_why`] |
//! | `nat`, a backend routed out of an interface that is not among the service's (its replies would miss the program) | proxy, saying so; `tc` refuses to start | [`auto_with_backends_behind_an_unlisted_interface_runs_on_the_proxy_and_tc_refuses_it`] |
//! | `nat`, backends routed out of a bridge whose ports are listed (their replies come in on the ports) | tc | [`auto_with_the_bridge_ports_listed_runs_on_tc_and_serves`] |
//!
//! Native XDP (every interface a NIC) needs a physical NIC, which these namespaces have not:
//! `placement::auto_hook`'s unit tests cover it, and its refusal of a backend routed out of
//! another device (`routes::off_xdp`, tested there on a macvlan). No interface, a loopback
//! VIP, no BPF object and a missing interface are in `xdp_fallback.rs`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_tests::client::http_get;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::load::run;
use lb_tests::netns::{veth, Netns};
use lb_tests::xdp::bridge_lab::{BridgeLab, ON_BRIDGE, VIP};
use lb_tests::xdp::world::{self, World, WEB};
use lb_tests::xdp::{bpf_object, in_netns, Mode, Topology};
use lb_tests::{Daemon, HttpNameServer};

/// Requests through the VIP in each serving test.
const REQUESTS: usize = 300;

/// How long the daemon may take to say where `web` runs (the verifier runs first).
const PLACED: Duration = Duration::from_secs(30);

/// Every one of [`REQUESTS`] requests to `vip`, sent from `client`, is answered, and by each
/// of `backends`.
fn assert_served(client: &Netns, vip: SocketAddr, backends: &[&str], what: &str) {
    let report = client
        .enter(|| run(REQUESTS, 4, Duration::from_secs(60), |_| http_get(vip, "/")))
        .expect("enter the client namespace");
    report.assert_all_answered(what);
    for b in backends {
        assert!(
            report.tally.get(b) > 0,
            "{what}: {b} answered none of {REQUESTS} requests ({})",
            report.tally
        );
    }
}

/// What `/status` says of service `name`'s data plane, and the daemon-wide summary.
fn status_words(ns: &Netns, daemon: &Daemon, name: &str) -> (String, String) {
    let admin = daemon.admin_addr();
    let st = ns
        .enter(|| lb_tests::admin::status(admin))
        .expect("enter the balancer namespace");
    let service = st["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .and_then(|s| s["dataplane"].as_str())
        .unwrap_or_default()
        .to_string();
    let all = st["dataplane"].as_str().unwrap_or_default().to_string();
    (service, all)
}

#[test]
fn auto_on_veths_runs_on_tc_and_serves() {
    if !lb_tests::require_root("tc_auto::auto_on_veths_runs_on_tc_and_serves") {
        return;
    }
    let backends = [(1, 1), (2, 1), (3, 1)];
    let mut world = World::start_custom(Mode::Nat, 3, 3, &[1, 2, 3], |topology| {
        let svc = world::service(topology, Mode::Nat, "web", &backends).set("dataplane", "auto");
        let toml = DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .service(svc)
            .to_toml();
        in_netns(&topology.balancer, || Daemon::start(&toml)).expect("enter the balancer")
    });
    let line = world
        .daemon
        .wait_for_log("service web: listening", PLACED)
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("eBPF data plane (nat) on l0 (tc), l1 (tc), l2 (tc), l3 (tc)")
            && line.contains("auto chose tc because l0 is a veth"),
        "dataplane = \"auto\" on veths must run on tc and say why; the log said: {line}"
    );
    let (service, all) = status_words(&world.topology.balancer, &world.daemon, "web");
    assert!(
        service.contains("(tc)") && service.contains("auto chose tc"),
        "/status must show web on tc with the reason: {service}"
    );
    assert_eq!(all, "tc", "/status's summary of the planes");
    assert_served(
        &world.topology.client,
        Topology::vip(WEB),
        &["b1", "b2", "b3"],
        "auto on veths (tc)",
    );
    assert_eq!(
        tcx_programs(&world.topology.balancer, "l0"),
        vec!["lb_tc".to_string()],
        "l0's tc ingress while the daemon runs"
    );
    world
        .daemon
        .signal(nix::sys::signal::Signal::SIGTERM)
        .expect("signal the daemon");
    world
        .daemon
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon exits on SIGTERM");
    for interface in ["l0", "l1", "l2", "l3"] {
        assert!(
            tcx_programs(&world.topology.balancer, interface).is_empty(),
            "the daemon exited and left a tc program on {interface}"
        );
    }
}

/// The names of the programs attached at `interface`'s tc ingress through TCX, in `ns`.
fn tcx_programs(ns: &Netns, interface: &str) -> Vec<String> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let (_, programs) = ns
        .enter(|| SchedClassifier::query_tcx(interface, TcAttachType::Ingress))
        .expect("enter the balancer namespace")
        .unwrap_or_else(|e| panic!("query tc ingress of {interface}: {e}"));
    programs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn auto_with_backends_on_a_bridge_runs_on_tc_and_every_request_succeeds() {
    if !lb_tests::require_root("tc_auto::auto_with_backends_on_a_bridge") {
        return;
    }
    let (lab, servers) = bridge_lab_with_servers();
    let toml = web_on_the_bridge("auto", &["br0"]);
    let daemon = in_netns(&lab.balancer, || Daemon::start(&toml)).expect("enter the balancer");
    let line = daemon
        .wait_for_log("service web: listening", PLACED)
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("eBPF data plane (nat) on l0 (tc), br0 (tc)")
            && line.contains("auto chose tc because l0 is a veth"),
        "dataplane = \"auto\" with backends on a bridge must run on tc (generic XDP's \
         redirects vanish into a bridge); the log said: {line}"
    );
    // Health checks resolve the backends' MAC addresses before the load.
    checked_then_served(&lab, &servers, "auto with backends on a bridge (tc)");
    let (service, _) = status_words(&lab.balancer, &daemon, "web");
    assert!(service.contains("br0 (tc)"), "/status: {service}");
}

/// The bridge lab with three backends, an HTTP server `b{i}` on port [`WEB`] of each.
fn bridge_lab_with_servers() -> (BridgeLab, Vec<HttpNameServer>) {
    let lab = BridgeLab::new(3);
    let servers = lab
        .backends
        .iter()
        .enumerate()
        .map(|(k, ns)| {
            let name = format!("b{}", k + 1);
            ns.enter(|| HttpNameServer::start_on(&name, SocketAddr::from(([0, 0, 0, 0], WEB))))
                .expect("enter the backend namespace")
                .expect("a backend starts")
        })
        .collect();
    (lab, servers)
}

/// Once the daemon has health-checked each of the bridge lab's `servers` twice (they may
/// start down), every one of [`REQUESTS`] requests to the VIP from the lab's client is
/// answered, and by each backend.
fn checked_then_served(lab: &BridgeLab, servers: &[HttpNameServer], what: &str) {
    for s in servers {
        assert!(
            s.wait_for_health_checks(2, Duration::from_secs(15)),
            "the daemon did not health-check {} within 15 s",
            s.addr()
        );
    }
    let vip = SocketAddr::new(IpAddr::V4(VIP), WEB);
    assert_served(&lab.client, vip, &["b1", "b2", "b3"], what);
}

/// The config of `web` at the bridge lab's VIP: `dataplane`, `interface = "l0"`,
/// `backend_interfaces` (left out when empty), `local_address` on the bridge, and the lab's
/// three backends with HTTP health checks.
fn web_on_the_bridge(dataplane: &str, backend_interfaces: &[&str]) -> String {
    let mut svc = ServiceConfig::tcp("web", SocketAddr::new(IpAddr::V4(VIP), WEB))
        .set("dataplane", dataplane)
        .set("interface", "l0")
        .set("local_address", ON_BRIDGE.to_string())
        .fast_health("http");
    if !backend_interfaces.is_empty() {
        let listed = backend_interfaces.iter().map(|&i| i.into()).collect();
        svc = svc.set("backend_interfaces", toml::Value::Array(listed));
    }
    for i in 1..=3 {
        svc = svc.backend(SocketAddr::new(IpAddr::V4(BridgeLab::backend(i)), WEB), 1);
    }
    DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .service(svc)
        .to_toml()
}

/// A `nat` service on `l0` alone whose backends sit behind `br0`, which the config does not
/// list in `backend_interfaces`: their replies would come in on `br0`, where no program
/// translates them, and reach the balancer's stack (which resets them). `tc` refuses to
/// start naming the backend and the interface; `auto` runs the service on the proxy, saying
/// so, and every request is served.
#[test]
fn auto_with_backends_behind_an_unlisted_interface_runs_on_the_proxy_and_tc_refuses_it() {
    if !lb_tests::require_root("tc_auto::auto_with_backends_behind_an_unlisted_interface") {
        return;
    }
    let (lab, servers) = bridge_lab_with_servers();
    // The proxy, where `auto` must put the service, needs the VIP on the host.
    lab.balancer
        .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
        .expect("the VIP on the balancer's loopback");
    let config = |dataplane: &str| web_on_the_bridge(dataplane, &[]);
    let reason = format!(
        "backend {}:{WEB} is reached through br0, which is not the service's interface or \
         one of its backend_interfaces",
        BridgeLab::backend(1)
    );
    let refused = in_netns(&lab.balancer, || {
        lb_tests::daemon::run_to_end("run", &config("tc"), Duration::from_secs(30))
    })
    .expect("enter the balancer");
    assert!(
        refused.code().is_some_and(|c| c != 0) && refused.stderr.contains(&reason),
        "dataplane = \"tc\" with the backends behind an unlisted interface must refuse to \
         start and say why; exit {:?}, stderr: {}",
        refused.status,
        refused.stderr
    );
    let daemon =
        in_netns(&lab.balancer, || Daemon::start(&config("auto"))).expect("enter the balancer");
    let line = daemon
        .wait_for_log("service web: listening", PLACED)
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("proxy data plane") && line.contains(&reason),
        "auto with the backends behind an unlisted interface must run on the proxy and say \
         why; the log said: {line}"
    );
    checked_then_served(
        &lab,
        &servers,
        "auto with the backends behind an unlisted interface (proxy)",
    );
}

/// The same backends with the bridge's ports listed in `backend_interfaces` instead of the
/// bridge: the routes send the backends out of `br0`, but their replies come in on the
/// ports, where `lb_tc` is, so the check lets the service run on tc, and it serves.
#[test]
fn auto_with_the_bridge_ports_listed_runs_on_tc_and_serves() {
    if !lb_tests::require_root("tc_auto::auto_with_the_bridge_ports_listed") {
        return;
    }
    let (lab, servers) = bridge_lab_with_servers();
    let toml = web_on_the_bridge("auto", &["p1", "p2", "p3"]);
    let daemon = in_netns(&lab.balancer, || Daemon::start(&toml)).expect("enter the balancer");
    let line = daemon
        .wait_for_log("service web: listening", PLACED)
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("eBPF data plane (nat) on l0 (tc), p1 (tc)"),
        "with the bridge's ports listed, auto must run on tc; the log said: {line}"
    );
    checked_then_served(&lab, &servers, "auto with the bridge's ports listed (tc)");
}

#[test]
fn auto_on_the_loopback_device_runs_on_the_proxy_and_serves() {
    if !lb_tests::require_root("tc_auto::auto_on_the_loopback_device") {
        return;
    }
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
    let servers: Vec<HttpNameServer> = balancer
        .enter(|| {
            (1..=3)
                .map(|i| HttpNameServer::start(&format!("b{i}")).expect("a backend starts"))
                .collect()
        })
        .expect("enter the balancer");
    let vip: SocketAddr = "10.200.0.1:8080".parse().expect("literal");
    let mut svc = ServiceConfig::tcp("web", vip)
        .set("dataplane", "auto")
        .set("interface", "lo")
        .set("local_address", "10.200.0.1")
        .fast_health("http");
    for s in &servers {
        svc = svc.backend(s.addr(), 1);
    }
    let toml = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .service(svc)
        .to_toml();
    let daemon = in_netns(&balancer, || Daemon::start(&toml)).expect("enter the balancer");
    let line = daemon
        .wait_for_log("service web: listening", PLACED)
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("proxy data plane") && line.contains("interface lo is the loopback device"),
        "auto on the loopback device must run on the proxy and say why; the log said: {line}"
    );
    let (_, all) = status_words(&balancer, &daemon, "web");
    assert_eq!(all, "proxy", "/status's summary of the planes");
    assert_served(&client, vip, &["b1", "b2", "b3"], "auto on lo (proxy)");
}

/// A copy of `object` in `dir` whose tc program is renamed (`lb_tc` -> `lb_tX`, same length,
/// in the symbol and BTF string tables), as an object built before the tc data plane looks
/// to the daemon. An object that has no `lb_tc` already is copied unchanged.
fn without_lb_tc(object: &Path, dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(object).expect("read the BPF object");
    let from: &[u8] = b"\0lb_tc\0";
    let mut at = 0;
    while let Some(k) = bytes[at..].windows(from.len()).position(|w| w == from) {
        bytes[at + k + 5] = b'X';
        at += k + from.len();
    }
    let path = dir.join("lb-ebpf-without-tc");
    std::fs::write(&path, bytes).expect("write the copy");
    path
}

/// Three HTTP backends `b1`..`b3` in `client`'s namespace, on 10.200.0.2 (ports 8081..8083):
/// reached through `l0`, so a `nat` service on `l0` alone may run on eBPF (its backends'
/// replies come in where the program is), and the reason it does not is the test's.
fn beyond_l0(client: &Netns) -> Vec<HttpNameServer> {
    client
        .enter(|| {
            (1..=3u16)
                .map(|i| {
                    let addr = SocketAddr::from(([10, 200, 0, 2], 8080 + i));
                    HttpNameServer::start_on(&format!("b{i}"), addr).expect("a backend starts")
                })
                .collect()
        })
        .expect("enter the client namespace")
}

#[test]
fn auto_with_an_object_without_lb_tc_runs_on_the_proxy_and_says_why() {
    if !lb_tests::require_root("tc_auto::auto_with_an_object_without_lb_tc") {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let object = without_lb_tc(&bpf_object(), dir.path());
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
    // A router's set-up: the eBPF plane forwards by the kernel's routes.
    balancer
        .sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding in the balancer");
    let servers = beyond_l0(&client);
    let vip: SocketAddr = "10.200.0.1:8080".parse().expect("literal");
    let mut svc = ServiceConfig::tcp("web", vip)
        .set("dataplane", "auto")
        .set("interface", "l0")
        .set("local_address", "10.200.0.1")
        .fast_health("http");
    for s in &servers {
        svc = svc.backend(s.addr(), 1);
    }
    let toml = DaemonConfig::new()
        .global("bpf_object", object.display().to_string())
        .service(svc)
        .to_toml();
    let daemon = in_netns(&balancer, || Daemon::start(&toml)).expect("enter the balancer");
    let line = daemon
        .wait_for_log("service web: listening", PLACED)
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("proxy data plane") && line.contains("has no lb_tc program"),
        "auto on a veth with an object without lb_tc must run on the proxy (never generic \
         XDP) and say why; the log said: {line}"
    );
    assert_served(
        &client,
        vip,
        &["b1", "b2", "b3"],
        "auto without lb_tc (proxy)",
    );
}

#[test]
fn auto_where_another_service_holds_xdp_runs_on_the_proxy_and_says_why() {
    if !lb_tests::require_root("tc_auto::auto_where_another_service_holds_xdp") {
        return;
    }
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
    // A router's set-up: the eBPF plane forwards by the kernel's routes.
    balancer
        .sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding in the balancer");
    let servers = beyond_l0(&client);
    // `xdp` takes l0 first (services are placed in the config's order); its backend need not
    // answer, only its hook matters here.
    let first = ServiceConfig::tcp("first", SocketAddr::new(IpAddr::V4(VIP), WEB))
        .set("dataplane", "xdp")
        .set("interface", "l0")
        .set("local_address", "10.200.0.1")
        .health("kind", "none")
        .backend("10.200.0.2:80".parse().expect("literal"), 1);
    let vip: SocketAddr = "10.200.0.1:8080".parse().expect("literal");
    let mut web = ServiceConfig::tcp("web", vip)
        .set("dataplane", "auto")
        .set("interface", "l0")
        .set("local_address", "10.200.0.1")
        .fast_health("http");
    for s in &servers {
        web = web.backend(s.addr(), 1);
    }
    let toml = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .service(first)
        .service(web)
        .to_toml();
    let daemon = in_netns(&balancer, || Daemon::start(&toml)).expect("enter the balancer");
    let first_line = daemon
        .wait_for_log("service first: listening", PLACED)
        .expect("the daemon logs where service first runs");
    assert!(
        first_line.contains("on l0 (XDP native)"),
        "dataplane = \"xdp\" on a veth attaches native XDP: {first_line}"
    );
    let line = daemon
        .wait_for_log("service web: listening", PLACED)
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("proxy data plane")
            && line.contains("l0 carries XDP native for another service, and this one needs tc"),
        "auto on a veth that carries XDP must not add tc there; it runs on the proxy and says \
         why; the log said: {line}"
    );
    let (_, all) = status_words(&balancer, &daemon, "web");
    assert_eq!(all, "xdp+proxy", "/status's summary of the planes");
    assert_served(&client, vip, &["b1", "b2", "b3"], "auto beside XDP (proxy)");
}

#[test]
fn auto_with_an_interface_without_ethernet_runs_on_the_proxy_and_tc_refuses_it() {
    if !lb_tests::require_root("tc_auto::auto_with_an_interface_without_ethernet") {
        return;
    }
    let (client, balancer, servers) = balancer_with_a_client();
    // Backends behind a layer-3 tunnel (a tun device, as WireGuard is): its packets start
    // with the IP header, and a program reading an Ethernet header there would misread them.
    balancer
        .ip(&["tuntap", "add", "mode", "tun", "name", "tun0"])
        .expect("a tun device");
    balancer
        .ip(&["link", "set", "tun0", "up"])
        .expect("tun0 up");
    tc_refuses_and_auto_runs_on_the_proxy(
        &client,
        &balancer,
        &servers,
        |web| web.set("backend_interfaces", vec!["tun0"]),
        "interface tun0 is a device without Ethernet frames (link type none",
        "a tun device",
    );
}

/// A host as it comes (forwarding off, the default of a host and of a new namespace): the
/// eBPF plane's route lookups would fail and drop every packet of the VIP, so `auto` runs the
/// service on the proxy and says which sysctl to turn on, and `tc` refuses to start.
#[test]
fn auto_with_forwarding_off_runs_on_the_proxy_and_tc_refuses_it() {
    if !lb_tests::require_root("tc_auto::auto_with_forwarding_off") {
        return;
    }
    let (client, balancer, servers) = balancer_with_a_client();
    balancer
        .sysctl("net.ipv4.ip_forward", "0")
        .expect("forwarding off, as a host comes");
    tc_refuses_and_auto_runs_on_the_proxy(
        &client,
        &balancer,
        &servers,
        |web| web,
        "forwarding is off on l0 (net.ipv4.conf.l0.forwarding = 0)",
        "forwarding off",
    );
}

/// A client namespace and a balancer namespace joined by a veth (`c0` 10.200.0.2, `l0`
/// 10.200.0.1), and three HTTP backends on the balancer's loopback.
fn balancer_with_a_client() -> (Netns, Netns, Vec<HttpNameServer>) {
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
    let servers: Vec<HttpNameServer> = balancer
        .enter(|| {
            (1..=3)
                .map(|i| HttpNameServer::start(&format!("b{i}")).expect("a backend starts"))
                .collect()
        })
        .expect("enter the balancer");
    (client, balancer, servers)
}

/// `web` on 10.200.0.1:8080 with `interface = "l0"` (and what `keys` adds): with
/// `dataplane = "tc"` the daemon refuses to start saying `reason`; with `auto` it runs `web`
/// on the proxy saying `reason`, and every request from `client` is served.
fn tc_refuses_and_auto_runs_on_the_proxy(
    client: &Netns,
    balancer: &Netns,
    servers: &[HttpNameServer],
    keys: impl Fn(ServiceConfig) -> ServiceConfig,
    reason: &str,
    what: &str,
) {
    let vip: SocketAddr = "10.200.0.1:8080".parse().expect("literal");
    let config = |dataplane: &str| {
        let mut web = keys(
            ServiceConfig::tcp("web", vip)
                .set("dataplane", dataplane)
                .set("interface", "l0")
                .set("local_address", "10.200.0.1")
                .fast_health("http"),
        );
        for s in servers {
            web = web.backend(s.addr(), 1);
        }
        DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .service(web)
            .to_toml()
    };
    let refused = in_netns(balancer, || {
        lb_tests::daemon::run_to_end("run", &config("tc"), Duration::from_secs(30))
    })
    .expect("enter the balancer");
    assert!(
        refused.code().is_some_and(|c| c != 0) && refused.stderr.contains(reason),
        "dataplane = \"tc\" with {what} must refuse to start and say why; exit {:?}, \
         stderr: {}",
        refused.status,
        refused.stderr
    );
    let daemon = in_netns(balancer, || Daemon::start(&config("auto"))).expect("enter the balancer");
    let line = daemon
        .wait_for_log("service web: listening", PLACED)
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("proxy data plane") && line.contains(reason),
        "auto with {what} must run on the proxy and say why; the log said: {line}"
    );
    let (_, all) = status_words(balancer, &daemon, "web");
    assert_eq!(all, "proxy", "/status's summary of the planes");
    assert_served(
        client,
        vip,
        &["b1", "b2", "b3"],
        &format!("auto with {what} (proxy)"),
    );
}
