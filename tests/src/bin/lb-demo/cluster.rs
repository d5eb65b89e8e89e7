//! `lb-demo --cluster`: three lb nodes behind an ECMP router (BIRD, BGP, BFD) in network
//! namespaces (`lb_tests::cluster`), 300 long-lived flows through the VIP in DSR mode, and
//! what happens to them when a node dies, a node joins and a node drains. Needs root and
//! BIRD 2 (`cargo xtask demo --cluster` installs it).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use lb_tests::cluster::flows::EchoFlows;
use lb_tests::cluster::{vip, Cluster, VIP};
use lb_tests::xdp::Mode;

/// Long-lived flows.
const FLOWS: usize = 300;

/// Runs the cluster demo; `Err` when the flows do not survive as they should.
pub fn run() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the cluster demo makes network namespaces: run it as root");
    }
    println!("lb cluster demo: a router, 3 lb nodes (DSR on tc), 3 echo backends, VIP {VIP}");
    let mut cluster = Cluster::start(Mode::Dsr, 3, 3);
    show_route(&cluster, "the router spreads the VIP over");
    let flows = EchoFlows::start(&cluster.client, vip(), FLOWS);
    flows.run_for(Duration::from_secs(2));
    for k in 1..=3 {
        println!(
            "  node {k} placed {} flows",
            cluster.node(k).flows_started()
        );
    }
    report(&flows, "300 flows, each echoing a message every 100 ms");

    println!("\nkilling node 1 (lb-daemon and BIRD) ...");
    let t = Instant::now();
    {
        let n1 = cluster.node_mut(1);
        if let Some(b) = n1.bird.as_mut() {
            b.kill();
        }
        n1.daemon = None;
    }
    cluster.wait_for_next_hops(&[2, 3].into_iter().collect(), Duration::from_secs(5));
    println!("  the router withdrew node 1 in {:?}", t.elapsed());
    flows.run_for(Duration::from_secs(3));
    report(&flows, "after node 1 died");

    println!("\nadding node 4 ...");
    cluster.add_node();
    cluster.wait_for_next_hops(&[2, 3, 4].into_iter().collect(), Duration::from_secs(30));
    show_route(&cluster, "the router spreads the VIP over");
    flows.run_for(Duration::from_secs(3));
    report(&flows, "after node 4 joined");

    println!("\nlb-daemon drain-node on node 3 ...");
    print!("  {}", cluster.node(3).cli(&["drain-node"]));
    cluster.wait_for_next_hops(&[2, 4].into_iter().collect(), Duration::from_secs(5));
    show_route(&cluster, "the router spreads the VIP over");
    flows.run_for(Duration::from_secs(3));
    report(&flows, "after node 3 drained");

    let failed = flows.stop();
    if failed.len() * 100 > FLOWS {
        bail!(
            "{} of {FLOWS} flows failed: {:?}",
            failed.len(),
            &failed[..5]
        );
    }
    println!("\ndone: {} of {FLOWS} flows failed", failed.len());
    Ok(())
}

fn show_route(cluster: &Cluster, what: &str) {
    let hops: BTreeSet<usize> = cluster.next_hops();
    let names: Vec<String> = hops.iter().map(|k| format!("node {k}")).collect();
    println!("  {what}: {}", names.join(", "));
}

fn report(flows: &EchoFlows, when: &str) {
    let failed = flows.failures();
    println!(
        "  {when}: {} of {} flows alive, {} echoes so far",
        flows.total() - failed.len(),
        flows.total(),
        flows.echoes()
    );
}
