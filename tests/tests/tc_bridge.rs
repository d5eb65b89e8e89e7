//! `lb_tc` with the backends on a Linux bridge (how Docker attaches containers), NAT and DSR,
//! end to end: a packet routed into the bridge goes straight to the port its backend is
//! behind (`BRIDGE_FDB`, copied from the bridge's forwarding database), so the bridge device
//! transmits almost nothing of an upload, and a DSR tunnel super-packet is not cut into
//! segments there (the bridge has no tunnel offloads). The upload arrives byte for byte, and
//! the DSR backends' replies, routed back through br0, are sent on by `lb_tc` (`dsr_replies`).
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use lb_tests::client::upload;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::data::Receipt;
use lb_tests::netns::Netns;
use lb_tests::xdp::bridge_lab::{self, BridgeLab, ON_BRIDGE, VIP};
use lb_tests::xdp::{bpf_object, in_netns, Decap, Mode, PeerServer};
use lb_tests::Daemon;

/// The hash servers' port.
const BULK: u16 = 81;
/// The upload through the VIP.
const UPLOAD: u64 = 64 * 1024 * 1024;

#[test]
fn nat_into_a_bridge_goes_straight_to_the_ports() {
    if lb_tests::require_root("tc_bridge::nat_into_a_bridge_goes_straight_to_the_ports") {
        upload_into_the_bridge(Mode::Nat);
    }
}

#[test]
fn dsr_into_a_bridge_goes_straight_to_the_ports() {
    if lb_tests::require_root("tc_bridge::dsr_into_a_bridge_goes_straight_to_the_ports") {
        upload_into_the_bridge(Mode::Dsr);
    }
}

/// A `mode` service on tc with two backends on `br0`; an upload of [`UPLOAD`] bytes through
/// the VIP must arrive intact while `br0` transmits under a tenth of it. The ports' own
/// transmit: NAT packets skip it too (peer redirect into the backend), DSR tunnel packets take
/// it (the backend's decapsulator may sit at its XDP hook). The backends' replies, back through
/// br0, are sent on by `lb_tc` too: the balancer's kernel forwards none.
fn upload_into_the_bridge(mode: Mode) {
    let (lab, _servers, daemon) = start(mode, 2);
    let vip = SocketAddr::new(IpAddr::V4(VIP), BULK);
    let bridge_before = tx_bytes(&lab.balancer, "br0");
    let ports_before = tx_bytes(&lab.balancer, "p1") + tx_bytes(&lab.balancer, "p2");
    let replies_before = dsr_replies(&lab.balancer, &daemon);
    let kernel_before = forwarded_by_kernel(&lab.balancer);
    let receipt = lab
        .client
        .enter(|| upload(vip, UPLOAD, 11))
        .expect("enter the client namespace")
        .unwrap_or_else(|e| panic!("{mode:?}: the upload through the VIP failed: {e}"));
    assert_eq!(
        receipt,
        Receipt::of_stream(UPLOAD, 11),
        "{mode:?}: the backend did not receive the upload byte for byte"
    );
    let bridge = tx_bytes(&lab.balancer, "br0") - bridge_before;
    let ports = tx_bytes(&lab.balancer, "p1") + tx_bytes(&lab.balancer, "p2") - ports_before;
    let replies = dsr_replies(&lab.balancer, &daemon) - replies_before;
    let kernel = forwarded_by_kernel(&lab.balancer) - kernel_before;
    eprintln!(
        "{mode:?}: during the upload br0 transmitted {bridge} bytes, its ports {ports}; \
         {replies} DSR replies sent on, {kernel} packets forwarded by the kernel"
    );
    assert!(
        bridge < UPLOAD / 10,
        "{mode:?}: br0 transmitted {bridge} bytes during the {UPLOAD}-byte upload: packets \
         routed into the bridge went through it, not straight to the backend's port"
    );
    match mode {
        Mode::Nat => assert!(
            ports < UPLOAD / 10,
            "{mode:?}: the bridge ports transmitted {ports} bytes: NAT packets were not \
             handed to the ports' peers"
        ),
        Mode::Dsr => assert!(
            ports >= UPLOAD,
            "{mode:?}: the bridge ports transmitted only {ports} bytes of the {UPLOAD}-byte \
             upload: DSR tunnel packets must take the port's transmit"
        ),
    }
    // The backends' replies come back through br0, their gateway: lb_tc sends them on (NAT
    // replies as `nat_replies`, DSR replies, from the VIP, as `dsr_replies`), so the kernel
    // forwards none of them. How many there are depends on GRO and delayed ACKs (678 DSR
    // replies in one run here), hence the low floor.
    assert_eq!(
        kernel, 0,
        "{mode:?}: the balancer's kernel forwarded {kernel} packets during the upload \
         ({replies} DSR replies sent on by lb_tc)"
    );
    match mode {
        Mode::Nat => assert_eq!(replies, 0, "{mode:?}: NAT replies counted as DSR replies"),
        Mode::Dsr => assert!(
            replies >= 20,
            "{mode:?}: lb_tc sent on {replies} DSR replies from the bridge during the upload"
        ),
    }
    drop(daemon);
}

/// `dsr_replies` in the `/status` of `daemon`, which runs in `ns`.
fn dsr_replies(ns: &Netns, daemon: &Daemon) -> u64 {
    let api = daemon.admin_addr();
    let status = in_netns(ns, || lb_tests::admin::status(api)).expect("enter the balancer");
    status["xdp"]["packets"]["dsr_replies"]
        .as_u64()
        .unwrap_or_else(|| panic!("no dsr_replies in /status: {}", status["xdp"]))
}

/// A container restarted: its veth is deleted and a new one, with another index but the same
/// Ethernet and IP address (as Docker gives them), takes its place on the bridge. Every upload
/// through the VIP, before, right after and seconds after, arrives intact (TCP would also
/// recover from a short black hole, so this does not prove the deleted port was never used),
/// and within seconds the new port is taken straight (the bridge transmits almost nothing).
#[test]
fn a_backend_whose_bridge_port_is_replaced_keeps_being_served() {
    if !lb_tests::require_root(
        "tc_bridge::a_backend_whose_bridge_port_is_replaced_keeps_being_served",
    ) {
        return;
    }
    let (lab, servers, daemon) = start(Mode::Nat, 2);
    uploads(&lab, "before the port is replaced");
    let b2 = &lab.backends[1];
    let mac = String::from_utf8_lossy(
        &b2.run("cat", &["/sys/class/net/b0/address"])
            .expect("read b0's address")
            .stdout,
    )
    .trim()
    .to_string();
    let accepted = servers[1].accepted();
    lab.balancer
        .ip(&["link", "del", "p2"])
        .expect("delete b2's port");
    // The same addresses (Docker derives the MAC from the IP), another index.
    bridge_lab::plug(&lab.balancer, 2, b2, Some(&mac));
    // Up again: the health checks reach b2 through the new port.
    checked_again(&servers[1..], &[accepted], "b2's new port");
    uploads(&lab, "right after the port was replaced");
    std::thread::sleep(Duration::from_secs(3));
    let b2_before = rx_bytes(b2, "b0");
    let bridge_before = tx_bytes(&lab.balancer, "br0");
    uploads(&lab, "after the next copies of the forwarding database");
    let b2_got = rx_bytes(b2, "b0") - b2_before;
    let bridge = tx_bytes(&lab.balancer, "br0") - bridge_before;
    eprintln!("after the port was replaced: b2 received {b2_got} bytes, br0 transmitted {bridge}");
    assert!(
        b2_got >= 256 * 1024,
        "b2 received {b2_got} bytes: it took none of 20 uploads after its port was replaced"
    );
    assert!(
        bridge < 512 * 1024,
        "br0 transmitted {bridge} bytes of 5 MiB of uploads: the new port was not taken from \
         the bridge's forwarding database"
    );
    drop(daemon);
}

/// The backends' bridge deleted and made again under its name, as `docker compose down` and
/// `up` do to a network's bridge when its name is fixed: the kernel takes `lb_tc` off with
/// the old device, and without it on the new one every NAT reply would reach the balancer's
/// stack and be answered with a reset. The daemon attaches `lb_tc` to the new `br0` within
/// seconds, and every upload through the VIP arrives intact again, on both backends.
#[test]
fn a_bridge_made_again_under_its_name_is_served_again() {
    if !lb_tests::require_root("tc_bridge::a_bridge_made_again_under_its_name_is_served_again") {
        return;
    }
    let (lab, servers, daemon) = start(Mode::Nat, 2);
    uploads_to_each(&lab, "before br0 was deleted");
    lab.balancer
        .ip(&["link", "del", "br0"])
        .expect("delete br0");
    daemon
        .wait_for_log("eBPF: br0 is gone", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the daemon did not see br0 go: {e:?}"));
    let accepted: Vec<u64> = servers.iter().map(|s| s.accepted()).collect();
    make_br0_again(&lab, servers.len());
    daemon
        .wait_for_log("eBPF: br0 was made again", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the daemon did not attach lb_tc to the new br0: {e:?}"));
    // The health checks failed while br0 was gone; both backends up again first.
    checked_again(&servers, &accepted, "the new br0");
    uploads_to_each(&lab, "after br0 was made again");
    drop(daemon);
}

/// The same while the daemon is stopped with SIGQUIT (a restart: the data plane stays,
/// pinned): the link pinned for the old `br0` is left attached to nothing, and the daemon
/// started again must not adopt it as if it carried `lb_tc` on the new `br0`; it attaches
/// afresh, and every upload through the VIP arrives intact, on both backends.
#[test]
fn a_bridge_made_again_while_the_daemon_was_stopped_is_served_after_its_restart() {
    if !lb_tests::require_root(
        "tc_bridge::a_bridge_made_again_while_the_daemon_was_stopped_is_served_after_its_restart",
    ) {
        return;
    }
    let pins = PinDir(lb_tests::daemon::test_pin_dir());
    let (lab, servers, mut daemon, toml) = start_with(Mode::Nat, 2, Some(&pins.0));
    uploads_to_each(&lab, "before the restart");
    daemon
        .signal(nix::sys::signal::Signal::SIGQUIT)
        .expect("signal the daemon");
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the daemon did not exit on SIGQUIT"));
    assert!(status.success(), "SIGQUIT: the daemon exited with {status}");
    lab.balancer
        .ip(&["link", "del", "br0"])
        .expect("delete br0");
    make_br0_again(&lab, servers.len());
    let accepted: Vec<u64> = servers.iter().map(|s| s.accepted()).collect();
    let daemon = in_netns(&lab.balancer, || Daemon::start_pinned(&toml, &pins.0))
        .expect("enter the balancer");
    ready_on_the_bridge(&daemon, &servers, &accepted, "restarted");
    uploads_to_each(
        &lab,
        "after br0 was made again while the daemon was stopped",
    );
    drop(daemon);
}

/// The pin directory of one test, removed when the test ends, also when it fails.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes `br0` again in the lab's balancer, with the ports of its `n` backends on it.
fn make_br0_again(lab: &BridgeLab, n: usize) {
    bridge_lab::make_bridge(&lab.balancer);
    for i in 1..=n {
        lab.balancer
            .ip(&["link", "set", &format!("p{i}"), "master", "br0"])
            .expect("port on the new bridge");
    }
}

/// [`uploads`], and each backend received at least one of them.
fn uploads_to_each(lab: &BridgeLab, what: &str) {
    let before: Vec<u64> = lab.backends.iter().map(|b| rx_bytes(b, "b0")).collect();
    uploads(lab, what);
    for (k, b) in lab.backends.iter().enumerate() {
        let got = rx_bytes(b, "b0") - before[k];
        assert!(
            got >= 256 * 1024,
            "{what}: backend b{} received {got} bytes: it took none of the 20 uploads",
            k + 1
        );
    }
}

/// 20 uploads of 256 KiB through the VIP from the client, each of which must arrive byte for
/// byte; `what` names the moment in a failure.
fn uploads(lab: &BridgeLab, what: &str) {
    let vip = SocketAddr::new(IpAddr::V4(VIP), BULK);
    for seed in 0..20u64 {
        let receipt = lab
            .client
            .enter(|| upload(vip, 256 * 1024, seed))
            .expect("enter the client namespace")
            .unwrap_or_else(|e| panic!("{what}: upload {seed} through the VIP failed: {e}"));
        assert_eq!(
            receipt,
            Receipt::of_stream(256 * 1024, seed),
            "{what}: upload {seed} did not arrive byte for byte"
        );
    }
}

/// Waits up to 20 s until each of `servers` has accepted three connections (health checks)
/// more than its count in `before`; panics naming `after` (what they are checked again after).
fn checked_again(servers: &[PeerServer], before: &[u64], after: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while servers
        .iter()
        .zip(before)
        .any(|(s, &before)| s.accepted() < before + 3)
    {
        assert!(
            Instant::now() < deadline,
            "the backends were not health-checked again within 20 s of {after}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lab with `n` backends on `br0`, a hash server on each, and a daemon with a `mode`
/// service on tc, once the daemon watches the bridge, has health-checked every backend and
/// has had the time to copy the bridge's forwarding database (which the health checks'
/// answers filled). The decapsulators (DSR) go with the lab's namespaces.
fn start(mode: Mode, n: usize) -> (Lab, Vec<PeerServer>, Daemon) {
    let (lab, servers, daemon, _) = start_with(mode, n, None);
    (lab, servers, daemon)
}

/// [`start`], with the daemon's pin directory `pins` when given; also returns the config.
fn start_with(
    mode: Mode,
    n: usize,
    pins: Option<&std::path::Path>,
) -> (Lab, Vec<PeerServer>, Daemon, String) {
    let lab = BridgeLab::new(n);
    let mut decaps = Vec::new();
    if mode == Mode::Dsr {
        lab.prepare_dsr();
        for ns in &lab.backends {
            decaps.push(Decap::start_at(
                "tc",
                ns,
                "b0",
                &bpf_object(),
                &[IpAddr::V4(ON_BRIDGE)],
            ));
        }
    }
    let servers: Vec<PeerServer> = lab
        .backends
        .iter()
        .enumerate()
        .map(|(k, ns)| {
            let name = format!("b{}", k + 1);
            ns.enter(|| PeerServer::start_on(&name, SocketAddr::from(([0, 0, 0, 0], BULK))))
                .expect("enter the backend namespace")
                .expect("a backend starts")
        })
        .collect();
    let vip = SocketAddr::new(IpAddr::V4(VIP), BULK);
    let forwarding = mode.forwarding();
    let mut svc = ServiceConfig::tcp("bulk", vip)
        .set("dataplane", "tc")
        .set("interface", "l0")
        .set("backend_interfaces", toml::Value::Array(vec!["br0".into()]))
        .set("local_address", ON_BRIDGE.to_string())
        .set("forwarding", forwarding)
        .fast_health("tcp");
    for i in 1..=servers.len() {
        svc = svc.backend(SocketAddr::new(IpAddr::V4(BridgeLab::backend(i)), BULK), 1);
    }
    let toml = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .service(svc)
        .to_toml();
    let accepted: Vec<u64> = servers.iter().map(|s| s.accepted()).collect();
    let daemon = in_netns(&lab.balancer, || match pins {
        Some(pins) => Daemon::start_pinned(&toml, pins),
        None => Daemon::start(&toml),
    })
    .expect("enter the balancer");
    ready_on_the_bridge(&daemon, &servers, &accepted, &format!("{mode:?}"));
    (
        Lab {
            lab,
            _decaps: decaps,
        },
        servers,
        daemon,
        toml,
    )
}

/// Waits until `daemon` watches `br0` and each of `servers` has accepted two connections
/// (health checks) more than its count in `before`, then 3 s more for the copy of the
/// bridge's forwarding database (which the health checks' answers filled; the daemon copies
/// it every second). Panics naming `what` (the set-up).
fn ready_on_the_bridge(daemon: &Daemon, servers: &[PeerServer], before: &[u64], what: &str) {
    daemon
        .wait_for_log(
            "eBPF: br0 is a bridge: lb_tc sends what is routed into it straight to the port",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{what}: the daemon did not take br0's ports: {e:?}"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while servers
        .iter()
        .zip(before)
        .any(|(s, &before)| s.accepted() < before + 2)
    {
        assert!(
            Instant::now() < deadline,
            "{what}: the daemon did not health-check both backends within 15 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
}

/// The lab and the decapsulators that must live as long as it.
struct Lab {
    lab: BridgeLab,
    _decaps: Vec<Decap>,
}

impl std::ops::Deref for Lab {
    type Target = BridgeLab;
    fn deref(&self) -> &BridgeLab {
        &self.lab
    }
}

/// The IPv4 packets `ns`'s kernel has forwarded so far.
fn forwarded_by_kernel(ns: &Netns) -> u64 {
    ns.forwarded_datagrams()
        .unwrap_or_else(|e| panic!("read the forwarding counters: {e}"))
        .0
}

/// `interface`'s `tx_bytes` in `ns`.
fn tx_bytes(ns: &Netns, interface: &str) -> u64 {
    counter(ns, interface, "tx_bytes")
}

/// `interface`'s `rx_bytes` in `ns`.
fn rx_bytes(ns: &Netns, interface: &str) -> u64 {
    counter(ns, interface, "rx_bytes")
}

/// `interface`'s statistic `name` in `ns`.
fn counter(ns: &Netns, interface: &str, name: &str) -> u64 {
    let file = format!("/sys/class/net/{interface}/statistics/{name}");
    let out = ns
        .run("cat", &[&file])
        .unwrap_or_else(|e| panic!("read {file} in {}: {e}", ns.name()));
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{file} holds `{}`: {e}", text.trim()))
}
