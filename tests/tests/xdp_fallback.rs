//! `dataplane = "auto"` falls back to the userspace proxy where the eBPF data plane cannot
//! carry a service, says why in the log, and still serves; `dataplane = "xdp"` refuses to
//! start instead, and takes generic XDP where native XDP cannot attach. (Where `auto` puts a
//! service on a bridge or a veth, on tc, is in `tc_auto.rs`.)

use std::time::Duration;

use lb_tests::client::http_get;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::daemon::run_to_end;
use lb_tests::load::run;
use lb_tests::netns::{veth, Netns};
use lb_tests::ports::free_addr;
use lb_tests::xdp::in_netns;
use lb_tests::{Daemon, HttpNameServer};

/// Requests through the VIP in each serving test.
const REQUESTS: usize = 300;

fn three_backends() -> Vec<HttpNameServer> {
    (1..=3)
        .map(|i| HttpNameServer::start(&format!("b{i}")).expect("a backend starts"))
        .collect()
}

fn web(vip: std::net::SocketAddr, backends: &[HttpNameServer]) -> ServiceConfig {
    let mut svc = ServiceConfig::tcp("web", vip)
        .set("dataplane", "auto")
        .fast_health("http");
    for b in backends {
        svc = svc.backend(b.addr(), 1);
    }
    svc
}

/// Every one of `REQUESTS` requests is answered, and by every backend.
fn assert_served(vip: std::net::SocketAddr, what: &str) {
    let report = run(REQUESTS, 4, Duration::from_secs(60), |_| http_get(vip, "/"));
    report.assert_all_answered(what);
    for b in ["b1", "b2", "b3"] {
        assert!(
            report.tally.get(b) > 0,
            "{what}: {b} answered none of {REQUESTS} requests ({})",
            report.tally
        );
    }
}

#[test]
fn auto_on_a_loopback_vip_runs_on_the_proxy_and_serves() {
    let backends = three_backends();
    let vip = free_addr();
    let svc = web(vip, &backends)
        .set("interface", "lo")
        // The config refuses a loopback `local_address` (no backend could answer it).
        .set("local_address", "10.200.0.1");
    let daemon = Daemon::start(&DaemonConfig::new().service(svc).to_toml());
    let line = daemon
        .wait_for_log("service web: listening", Duration::from_secs(5))
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("proxy data plane") && line.contains("loopback"),
        "a loopback VIP with dataplane = \"auto\" must run on the proxy, and the log must say \
         it is because of the loopback; it said: {line}"
    );
    assert_served(vip, "auto on a loopback VIP");
}

#[test]
fn auto_without_an_interface_runs_on_the_proxy_and_says_so() {
    let backends = three_backends();
    let vip = free_addr();
    let daemon = Daemon::start(&DaemonConfig::new().service(web(vip, &backends)).to_toml());
    let line = daemon
        .wait_for_log("service web: listening", Duration::from_secs(5))
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("proxy data plane") && line.contains("no `interface`"),
        "without `interface` the log must say why the service is not on XDP; it said: {line}"
    );
    assert_served(vip, "auto without an interface");
}

#[test]
fn xdp_without_a_bpf_object_refuses_to_start() {
    let backends = three_backends();
    let svc = web("10.200.9.1:80".parse().expect("literal"), &backends)
        .set("dataplane", "xdp")
        .set("interface", "lbt-none0")
        .set("local_address", "10.200.9.2");
    let config = DaemonConfig::new()
        .global("bpf_object", "/nonexistent/lb-ebpf")
        .service(svc)
        .to_toml();
    let out = run_to_end("run", &config, Duration::from_secs(30));
    assert!(
        out.status.is_some_and(|s| !s.success()),
        "dataplane = \"xdp\" without a BPF object must fail the start, not fall back; exit: {:?}\n{}",
        out.status,
        out.stderr
    );
    assert!(
        out.stderr.contains("dataplane = \"xdp\"")
            && out.stderr.contains("/nonexistent/lb-ebpf")
            && out.stderr.contains("service web"),
        "the error must name the service, the data plane and the object it looked for: {}",
        out.stderr
    );
}

#[test]
fn auto_without_a_bpf_object_falls_back_to_the_proxy_on_a_real_interface() {
    if !lb_tests::require_root("xdp_fallback::auto_without_a_bpf_object") {
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
    .expect("veth pair");
    // Forwarding on, as the eBPF plane needs: what is missing is only the object.
    balancer
        .sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding in the balancer");
    // The backends run in the client's namespace, reached through l0 (backends on the
    // balancer's own loopback would be a reason of their own not to run on eBPF).
    let backends = client
        .enter(|| {
            (1..=3u16)
                .map(|i| {
                    let addr = std::net::SocketAddr::from(([10, 200, 0, 2], 8080 + i));
                    HttpNameServer::start_on(&format!("b{i}"), addr).expect("a backend starts")
                })
                .collect::<Vec<_>>()
        })
        .expect("enter the client");
    let vip: std::net::SocketAddr = "10.200.0.1:8080".parse().expect("literal");
    let svc = web(vip, &backends)
        .set("interface", "l0")
        .set("local_address", "10.200.0.1");
    let config = DaemonConfig::new()
        .global("bpf_object", "/nonexistent/lb-ebpf")
        .service(svc)
        .to_toml();
    let daemon = in_netns(&balancer, || Daemon::start(&config)).expect("enter the balancer");
    let line = daemon
        .wait_for_log("service web: listening", Duration::from_secs(5))
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("proxy data plane") && line.contains("no BPF object found"),
        "with no BPF object, dataplane = \"auto\" must fall back to the proxy and say why; it \
         said: {line}"
    );
    client
        .enter(|| assert_served(vip, "auto without a BPF object, from the client namespace"))
        .expect("enter the client");
}

/// Starts a daemon in `ns` running `svc`, with the BPF object the tests use.
fn start_with_the_object(ns: &Netns, svc: ServiceConfig) -> Daemon {
    let config = DaemonConfig::new()
        .global(
            "bpf_object",
            lb_tests::xdp::bpf_object().display().to_string(),
        )
        .service(svc)
        .to_toml();
    in_netns(ns, || Daemon::start(&config)).expect("enter the namespace")
}

/// A namespace with a bridge `br0` at 10.200.0.1/24: an interface without native XDP (and on
/// which `auto` would choose tc).
fn namespace_with_a_bridge() -> Netns {
    let ns = Netns::new("lb").expect("balancer namespace");
    ns.ip(&["link", "add", "br0", "type", "bridge"])
        .expect("a bridge");
    ns.ip(&["addr", "add", "10.200.0.1/24", "dev", "br0"])
        .expect("bridge address");
    ns.ip(&["link", "set", "br0", "up"]).expect("bridge up");
    ns.sysctl("net.ipv4.ip_forward", "1")
        .expect("forwarding in the namespace");
    ns
}

#[test]
fn xdp_on_an_interface_without_native_xdp_attaches_in_generic_mode_with_a_warning() {
    if !lb_tests::require_root("xdp_fallback::xdp_on_an_interface_without_native_xdp") {
        return;
    }
    let ns = namespace_with_a_bridge();
    // Backends on br0's subnet (only the hook matters here, they need not answer): the
    // routes send them out of br0, where the program is.
    let mut svc = ServiceConfig::tcp("web", "10.200.0.100:80".parse().expect("literal"))
        .health("kind", "none");
    for i in 11..=13u8 {
        svc = svc.backend(std::net::SocketAddr::from(([10, 200, 0, i], 80)), 1);
    }
    let svc = svc
        .set("dataplane", "xdp")
        .set("interface", "br0")
        .set("local_address", "10.200.0.1");
    let daemon = start_with_the_object(&ns, svc);
    let warning = daemon
        .wait_for_log("generic (SKB) mode", Duration::from_secs(5))
        .expect("a bridge has no native XDP: the daemon must warn that it uses generic mode");
    assert!(
        warning.contains("br0"),
        "the warning must name the interface: {warning}"
    );
    let line = daemon
        .wait_for_log("service web: listening", Duration::from_secs(5))
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("eBPF data plane (nat) on br0 (XDP generic)"),
        "dataplane = \"xdp\" takes generic XDP when native cannot attach; the log said: {line}"
    );
}

#[test]
fn auto_on_a_missing_interface_falls_back_to_the_proxy_and_serves() {
    if !lb_tests::require_root("xdp_fallback::auto_on_a_missing_interface") {
        return;
    }
    let ns = namespace_with_a_bridge();
    let backends = ns.enter(three_backends).expect("enter the namespace");
    let vip: std::net::SocketAddr = "10.200.0.1:8080".parse().expect("literal");
    let svc = web(vip, &backends)
        .set("interface", "lbt-nope0")
        .set("local_address", "10.200.0.1");
    let daemon = start_with_the_object(&ns, svc);
    let line = daemon
        .wait_for_log("service web: listening", Duration::from_secs(5))
        .expect("the daemon logs where service web runs");
    assert!(
        line.contains("proxy data plane") && line.contains("no interface lbt-nope0"),
        "a missing interface with dataplane = \"auto\" must mean the proxy, with the reason; \
         the log said: {line}"
    );
    ns.enter(|| assert_served(vip, "auto on a missing interface"))
        .expect("enter the namespace");
}
