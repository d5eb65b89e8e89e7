//! Several lb nodes behind ECMP (issue 14): a router namespace running BIRD, lb nodes each
//! running lb-daemon with `[announce]` and BIRD (eBGP, BFD, `config/bird.conf`), backends
//! with a TCP echo server; see `lb_tests::cluster`. 300 long-lived flows (a message every
//! 100 ms, its echo checked) run while nodes are lost, added and drained.
//!
//! Needs root, BIRD 2 (`cargo xtask test` installs Debian's `bird2`) and the BPF object.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lb_tests::cluster::flows::{short_connections, EchoFlows, Failure};
use lb_tests::cluster::{vip, Cluster};
use lb_tests::xdp::Mode;

/// Long-lived flows per test.
const FLOWS: usize = 300;
/// BFD's detection time in config/bird.conf (3 x 100 ms), with room for BIRD to install the
/// route and a loaded machine.
const DETECTION: Duration = Duration::from_millis(1500);

fn nodes(list: &[usize]) -> BTreeSet<usize> {
    list.iter().copied().collect()
}

/// Fails unless at least `share` of the flows are alive, naming the first failures.
fn assert_survivors(flows: &EchoFlows, share: f64, when: &str) {
    let failed = flows.failures();
    let alive = flows.total() - failed.len();
    assert!(
        alive as f64 >= share * flows.total() as f64,
        "{when}: {alive} of {} flows survive, fewer than {:.0}%; first failures: {:?}",
        flows.total(),
        share * 100.0,
        &failed[..failed.len().min(5)]
    );
}

/// DSR: every node places a flow it has not seen by the same Maglev table, so the flows the
/// router moves (a node lost, a link down, a node added, a node drained) keep their backend.
#[test]
fn dsr_flows_survive_losing_adding_and_draining_nodes() {
    if !lb_tests::require_root("cluster::dsr_flows_survive_losing_adding_and_draining_nodes") {
        return;
    }
    let mut cluster = Cluster::start(Mode::Dsr, 3, 3);
    for k in 1..=3 {
        let table = cluster.node(k).announce_table();
        assert!(
            table.contains(&format!("blackhole {}", lb_tests::cluster::VIP)),
            "node {k} keeps no route for the VIP in its [announce] table: {table:?}"
        );
        let status = cluster.node(k).status();
        assert_eq!(
            status["announce"]["vips"][0]["announced"], true,
            "node {k}'s /status does not show the VIP announced: {}",
            status["announce"]
        );
    }
    let flows = EchoFlows::start(&cluster.client, vip(), FLOWS);
    flows.run_for(Duration::from_secs(2));
    assert_survivors(&flows, 1.0, "before any change");
    // ECMP spread the flows: every node started some.
    for k in 1..=3 {
        let started = cluster.node(k).flows_started();
        assert!(
            started >= 20,
            "node {k} started only {started} of {FLOWS} flows: ECMP does not spread them"
        );
    }

    // Node 1 dies: daemon and BIRD killed.
    let lost = Instant::now();
    {
        let n1 = cluster.node_mut(1);
        n1.bird.as_mut().expect("bird").kill();
        n1.daemon = None;
    }
    let took = cluster.wait_for_next_hops(&nodes(&[2, 3]), DETECTION);
    println!("node 1 killed: the router withdrew it in {took:?}");
    flows.run_for(Duration::from_secs(4));
    assert_survivors(&flows, 0.99, "after node 1 died");
    println!("after node 1 died: {} failed", flows.failures().len());

    // Node 2's link goes down: only BFD can tell the router.
    cluster
        .node(2)
        .ns
        .ip(&["link", "set", "n0", "down"])
        .expect("node 2's link down");
    let took = cluster.wait_for_next_hops(&nodes(&[3]), DETECTION);
    println!(
        "node 2's link down: the router withdrew it in {took:?} ({:?} after node 1 died)",
        lost.elapsed()
    );
    flows.run_for(Duration::from_secs(4));
    assert_survivors(&flows, 0.99, "after node 2's link went down");

    // Node 2 comes back and a fourth node joins.
    cluster
        .node(2)
        .ns
        .ip(&["link", "set", "n0", "up"])
        .expect("node 2's link up");
    cluster
        .node(2)
        .ns
        .ip(&["route", "replace", "default", "via", "10.221.2.1"])
        .expect("node 2's default route back");
    cluster.add_node();
    cluster.wait_for_next_hops(&nodes(&[2, 3, 4]), Duration::from_secs(30));
    flows.run_for(Duration::from_secs(4));
    assert_survivors(&flows, 0.99, "after node 2 came back and node 4 joined");
    let before_drain = flows.failures().len();

    // Node 3 drains: no flow fails, and no new flow reaches it once withdrawn.
    let said = cluster.node(3).cli(&["drain-node"]);
    assert!(
        said.contains("announced now: none"),
        "drain-node said: {said}"
    );
    cluster.wait_for_next_hops(&nodes(&[2, 4]), DETECTION);
    let started = cluster.node(3).flows_started();
    let short = short_connections(&cluster.client, vip(), 100);
    assert!(
        short.is_empty(),
        "new connections failed after the drain: {short:?}"
    );
    assert_eq!(
        cluster.node(3).flows_started(),
        started,
        "a new flow reached node 3 after it withdrew the VIP"
    );
    flows.run_for(Duration::from_secs(3));
    let drained: Vec<Failure> = flows.failures()[before_drain..].to_vec();
    assert!(
        drained.is_empty(),
        "flows failed when node 3 drained: {drained:?}"
    );
    cluster.node(3).cli(&["enable-node"]);
    cluster.wait_for_next_hops(&nodes(&[2, 3, 4]), Duration::from_secs(10));

    // Node 3 hangs (its BIRD stopped, link and BGP's TCP session up): only BFD notices.
    let before_hang = flows.failures().len();
    let bird = cluster.node(3).bird.as_ref().expect("bird").pid();
    nix::sys::signal::kill(bird, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP bird");
    let took = cluster.wait_for_next_hops(&nodes(&[2, 4]), DETECTION);
    println!("node 3 hung: BFD withdrew it in {took:?}");
    nix::sys::signal::kill(bird, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT bird");
    flows.run_for(Duration::from_secs(2));
    cluster.wait_for_next_hops(&nodes(&[2, 3, 4]), Duration::from_secs(30));
    let hung: Vec<Failure> = flows.failures()[before_hang..].to_vec();
    assert!(hung.is_empty(), "flows failed when node 3 hung: {hung:?}");

    // Every backend of the service goes out of node 4's reach: it withdraws the VIP, and
    // new connections go on succeeding (a SYN lost meanwhile is sent again to another node).
    cluster
        .node(4)
        .ns
        .ip(&["route", "add", "blackhole", "10.222.0.0/16"])
        .expect("node 4 loses its backends");
    let short = short_connections(&cluster.client, vip(), 60);
    cluster.wait_for_next_hops(&nodes(&[2, 3]), Duration::from_secs(5));
    assert!(
        short.is_empty(),
        "new connections failed while node 4 lost its backends: {short:?}"
    );
    let status = cluster.node(4).status();
    let reason = status["announce"]["vips"][0]["reason"]
        .as_str()
        .unwrap_or("");
    assert!(
        reason.contains("no healthy backend"),
        "node 4 says why the VIP is withdrawn: {}",
        status["announce"]
    );
    let failed = flows.stop();
    println!(
        "DSR: {} of {FLOWS} long-lived flows failed in all: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// NAT: a backend answers the node that translated its flow, so the flows of a lost node
/// break, and every flow of the nodes that stay goes on. Each flow knows its node from its
/// backend's greeting (the address the backend sees: the node's `local_address`). The lost
/// node is the middle next hop of the router's three: Linux picks a next hop by hash ranges
/// (hash-threshold, RFC 2992), and only when the middle one goes do the others keep all
/// their flows; when the first or the last goes, a sixth of all flows also moves between the
/// other two, and NAT loses those too (a router with resilient hashing moves none). The lost
/// share is printed.
#[test]
fn nat_flows_of_surviving_nodes_survive_a_lost_node() {
    if !lb_tests::require_root("cluster::nat_flows_of_surviving_nodes_survive_a_lost_node") {
        return;
    }
    let mut cluster = Cluster::start(Mode::Nat, 3, 3);
    let flows = EchoFlows::start(&cluster.client, vip(), FLOWS);
    flows.run_for(Duration::from_secs(2));
    assert_survivors(&flows, 1.0, "before any change");
    let lost_ip = std::net::IpAddr::V4(lb_tests::cluster::node_ip(2));
    let on_lost: BTreeSet<usize> = (0..FLOWS)
        .filter(|&i| flows.seen_from(i) == lost_ip)
        .collect();
    for k in [1, 3] {
        let ip = std::net::IpAddr::V4(lb_tests::cluster::node_ip(k));
        let n = (0..FLOWS).filter(|&i| flows.seen_from(i) == ip).count();
        assert!(n >= 20, "node {k} carries only {n} of {FLOWS} flows");
    }
    {
        let n2 = cluster.node_mut(2);
        n2.bird.as_mut().expect("bird").kill();
        n2.daemon = None;
        // A lost host: its link goes too, so nothing it held answers any more.
        n2.ns
            .ip(&["link", "set", "n0", "down"])
            .expect("node 2's link down");
    }
    cluster.wait_for_next_hops(&nodes(&[1, 3]), DETECTION);
    flows.run_for(Duration::from_secs(5));
    let failed = flows.failures();
    let of_survivors: Vec<&Failure> = failed
        .iter()
        .filter(|f| !on_lost.contains(&f.flow))
        .collect();
    println!(
        "NAT: node 2 lost: {} of {FLOWS} flows failed ({:.1}%); node 2 carried {}; flows of \
         nodes 1 and 3 failed: {}",
        failed.len(),
        100.0 * failed.len() as f64 / FLOWS as f64,
        on_lost.len(),
        of_survivors.len()
    );
    assert!(
        of_survivors.is_empty(),
        "flows that nodes 1 and 3 carried broke when node 2 was lost: {:?}",
        &of_survivors[..of_survivors.len().min(5)]
    );
    let short = short_connections(&cluster.client, vip(), 50);
    assert!(short.is_empty(), "new connections failed: {short:?}");
    drop(flows);
}
