//! XDP `nat` SNAT ports end to end, with the documented defaults (no `snat_ports`, one
//! long-lived daemon): a minute of new connections at full speed keeps its rate (SNAT ports
//! come back), and when ports do run out, clients are reset at once instead of timing out.
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use lb_tests::client::{http_get, ClientError};
use lb_tests::config::DaemonConfig;
use lb_tests::xdp::world::{service, World, WEB};
use lb_tests::xdp::{bpf_object, in_netns, Mode, Topology};
use lb_tests::Daemon;

/// Client threads opening connections one after another.
const THREADS: usize = 8;
/// The churn run and its windows.
const RUN: Duration = Duration::from_secs(60);
const WINDOW: Duration = Duration::from_secs(10);

/// `lb_xdp_packet_outcomes_total{outcome}` from the daemon's `/metrics`.
fn outcome(world: &World, name: &str) -> f64 {
    scrape(world)
        .samples
        .iter()
        .filter(|s| {
            s.metric == "lb_xdp_packet_outcomes_total" && s.labels.get("outcome") == Some(name)
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// One read of the daemon's `/metrics`.
fn scrape(world: &World) -> prometheus_parse::Scrape {
    let api = world.daemon.admin_addr();
    let reply = in_netns(&world.topology.balancer, || {
        lb_tests::admin::request(api, "GET", "/metrics", "")
    })
    .expect("enter the balancer namespace");
    assert_eq!(reply.status, 200, "GET /metrics: {}", reply.body);
    prometheus_parse::Scrape::parse(reply.body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text ({e})"))
}

#[test]
fn a_minute_of_new_connections_keeps_its_rate_and_no_connection_fails() {
    if !lb_tests::require_root(
        "xdp_nat_churn::a_minute_of_new_connections_keeps_its_rate_and_no_connection_fails",
    ) {
        return;
    }
    let world = World::start(Mode::Nat, 3, 3);
    // The client host's own limit, not the balancer's: a client that closes first keeps
    // TIME_WAIT for 60 s, and at thousands of connections a second its ephemeral ports fill
    // up and every connect() scans them (the rate falls tenfold within a minute). A loaded
    // client host reuses them, as the benchmark's does.
    world
        .topology
        .client
        .sysctl("net.ipv4.tcp_tw_reuse", "1")
        .expect("tcp_tw_reuse in the client namespace");
    let vip = Topology::vip(WEB);
    let windows = (RUN.as_secs() / WINDOW.as_secs()) as usize;
    let done: Vec<AtomicU64> = (0..windows).map(|_| AtomicU64::new(0)).collect();
    let failed = AtomicU64::new(0);
    let first_failure = std::sync::Mutex::new(None::<String>);
    let started = Instant::now();
    world.client(|| {
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    while started.elapsed() < RUN {
                        let result = http_get(vip, "/");
                        let w = (started.elapsed().as_secs() / WINDOW.as_secs()) as usize;
                        match result {
                            Ok(_) => {
                                if let Some(c) = done.get(w) {
                                    c.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let mut f = first_failure.lock().expect("not poisoned");
                                f.get_or_insert(e.to_string());
                            }
                        }
                    }
                });
            }
        })
    });
    let rates: Vec<f64> = done
        .iter()
        .map(|c| c.load(Ordering::Relaxed) as f64 / WINDOW.as_secs_f64())
        .collect();
    eprintln!("new connections/s per {WINDOW:?} window: {rates:.0?}");
    let failed = failed.into_inner();
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed through XDP NAT; the first: {:?}",
        failed + rates.iter().sum::<f64>() as u64 * WINDOW.as_secs(),
        first_failure.into_inner().expect("not poisoned")
    );
    let (first, last) = (rates[0], rates[windows - 1]);
    // Ports that do not come back collapse the rate (refused SYNs, counted and checked below;
    // a client short of its own ports fell tenfold): half is the bound. Tighter bounds
    // measured the 2-core machine instead (this binary's other tests run alongside: one run
    // of the full suite went 10.9k/s, 8.6k, 9.7k, 9.8k, 8.3k, 8.5k).
    assert!(
        first > 0.0 && last >= 0.5 * first,
        "the connection rate fell from {first:.0}/s in the first 10 s to {last:.0}/s in the \
         last: SNAT ports do not come back ({rates:.0?})"
    );
    for name in ["drop_nat_ports_exhausted", "refused_nat_ports_exhausted"] {
        assert_eq!(
            outcome(&world, name),
            0.0,
            "the balancer ran out of SNAT ports ({name}) at {first:.0} new connections/s"
        );
    }
}

#[test]
fn when_snat_ports_run_out_clients_are_reset_at_once_and_metrics_show_it() {
    if !lb_tests::require_root(
        "xdp_nat_churn::when_snat_ports_run_out_clients_are_reset_at_once_and_metrics_show_it",
    ) {
        return;
    }
    let (world, answered, ended) = exhaust(&[]);
    // A SYN probes 16 ports from its hash: it is refused once all 16 are held, which starts
    // around four fifths of the range in use (measured: 829; with 8 probes, 606). With ports
    // held at random, the first refusal comes before 550 flows about once in 600 runs.
    assert!(
        answered >= 550,
        "only {answered} connections got a port from 1,024 free ones"
    );
    let (used, free) = snat_gauges(&world, answered, ended);
    assert_eq!(
        used + free,
        1024.0,
        "in use ({used}) and free ({free}) SNAT ports do not add up to the range"
    );
}

/// The second local address of the pool test; the balancer need not own it: its replies
/// reach the balancer through the backends' default route, and XDP translates them.
const SECOND_LOCAL: &str = "10.200.0.3";

#[test]
fn a_pool_of_two_local_addresses_carries_twice_the_flows_and_status_shows_each() {
    if !lb_tests::require_root(
        "xdp_nat_churn::a_pool_of_two_local_addresses_carries_twice_the_flows_and_status_shows_each",
    ) {
        return;
    }
    let (world, answered, ended) = exhaust(&[SECOND_LOCAL]);
    // A flow's address is its hash's: each address carries about half the flows, and the
    // first refusal comes when either address's probes are all held, about 1.8 times one
    // address's count (measured: 829 with one address, 1,502 with two; with 8 probes 606 and
    // 975).
    assert!(
        answered >= 1_000,
        "only {answered} connections got a port from 2 x 1,024 free ones"
    );
    let (used, free) = snat_gauges(&world, answered, ended);
    assert_eq!(
        used + free,
        2048.0,
        "in use ({used}) and free ({free}) SNAT ports do not add up to the range on 2 addresses"
    );
    // The gauges above came from a count that began after the last connection; so does
    // every `/status` read after them.
    let api = world.daemon.admin_addr();
    let status = in_netns(&world.topology.balancer, || lb_tests::admin::status(api))
        .expect("enter the balancer namespace");
    let xdp = &status["services"][0]["backends"][0]["xdp"];
    let counted = xdp["snat_counted_unix_seconds"].as_f64().unwrap_or(0.0);
    assert!(
        counted >= unix_seconds(ended),
        "/status shows a SNAT count that began at {counted}, before the last connection \
         ({xdp})"
    );
    let per_address = &xdp["snat_local_addresses"];
    let list = per_address
        .as_array()
        .unwrap_or_else(|| panic!("/status shows no SNAT ports per local address: {per_address}"));
    let addresses: Vec<&str> = list.iter().filter_map(|a| a["address"].as_str()).collect();
    assert_eq!(
        addresses,
        vec![BALANCER_ADDRESS, SECOND_LOCAL],
        "/status lists the local addresses in the config's order"
    );
    for a in list {
        let in_use = a["in_use"].as_u64().unwrap_or(0);
        assert!(
            in_use >= 100,
            "{answered} connections spread over two addresses, but {a} carried few of them \
             (counted after the last)"
        );
        assert_eq!(in_use + a["free"].as_u64().unwrap_or(0), 1024, "{a}");
    }
}

/// The balancer's own address, the first local address of every XDP test service.
const BALANCER_ADDRESS: &str = "10.200.0.1";

/// Starts a NAT service with the smallest SNAT range the config takes (1024 ports), each
/// port held for an hour after its flow ends, one backend, and `extra` local addresses after
/// the balancer's own; opens connections one after another until one is refused. Asserts
/// the refusal is a reset (not a timeout) and counted; returns the world, how many
/// connections were answered, and when the last connection (the refused one) ended.
fn exhaust(extra: &[&str]) -> (World, usize, SystemTime) {
    let local: Vec<toml::Value> = std::iter::once(BALANCER_ADDRESS)
        .chain(extra.iter().copied())
        .map(|a| toml::Value::String(a.into()))
        .collect();
    let world = World::start_custom(Mode::Nat, 1, 1, &[1], |topology| {
        let svc = service(topology, Mode::Nat, "web", &[(1, 1)])
            .set(
                "snat_ports",
                toml::Value::Array(vec![20_000i64.into(), 21_023i64.into()]),
            )
            .set("snat_port_hold", toml::Value::String("1h".into()))
            .set("local_address", toml::Value::Array(local));
        let toml = DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .service(svc)
            .to_toml();
        in_netns(&topology.balancer, || Daemon::start(&toml)).expect("enter the balancer namespace")
    });
    let vip: SocketAddr = Topology::vip(WEB);
    let attempts = 1_500 * (1 + extra.len());
    let (answered, refused) = world.client(|| {
        let mut answered = 0;
        for _ in 0..attempts {
            let at = Instant::now();
            match http_get(vip, "/") {
                Ok(_) => answered += 1,
                Err(ClientError::Connect(e)) => {
                    assert_eq!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused,
                        "a connect without a SNAT port failed with {e}, not a reset"
                    );
                    assert!(
                        at.elapsed() < Duration::from_secs(1),
                        "a connect without a SNAT port took {:?}: a timeout, not a reset",
                        at.elapsed()
                    );
                    return (answered, true);
                }
                Err(e) => panic!("after {answered} connections one failed mid-way: {e}"),
            }
        }
        (answered, false)
    });
    let ended = SystemTime::now();
    assert!(
        refused,
        "{attempts} connections through 1,024 SNAT ports per address held for an hour were \
         all answered"
    );
    assert!(
        outcome(&world, "refused_nat_ports_exhausted") >= 1.0,
        "/metrics does not count the SYN refused for want of a SNAT port"
    );
    eprintln!(
        "{} local address(es): {answered} connections answered before the first refusal",
        1 + extra.len()
    );
    (world, answered, ended)
}

/// How long a test waits for the daemon's next count of SNAT ports: it counts every 10 s
/// (`sync::SNAT_EVERY`), later when a walk is slow or the machine loaded.
const SNAT_COUNT_WAIT: Duration = Duration::from_secs(60);

/// The SNAT port gauges of `/metrics` (in use, free) from the first count that began after
/// `ended` (a count taken while the connections were still being opened holds only a part
/// of them); asserts they are plausible: each answered connection took a port, and those
/// whose backend closed first are held for the hour.
fn snat_gauges(world: &World, answered: usize, ended: SystemTime) -> (f64, f64) {
    let deadline = Instant::now() + SNAT_COUNT_WAIT;
    let (used, free) = loop {
        let scrape = scrape(world);
        let counted = max_gauge(&scrape, "lb_xdp_snat_count_timestamp_seconds");
        if counted >= unix_seconds(ended) {
            break (
                sum_gauge(&scrape, "lb_xdp_snat_ports_in_use"),
                sum_gauge(&scrape, "lb_xdp_snat_ports_free"),
            );
        }
        assert!(
            Instant::now() < deadline,
            "no SNAT count began in the {SNAT_COUNT_WAIT:?} after the last connection (the \
             last began at Unix time {counted})"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        used > 0.0 && used <= answered as f64,
        "/metrics shows {used} SNAT ports in use after {answered} connections, most of them \
         held for an hour"
    );
    (used, free)
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The values of the gauge `name` in `scrape`.
fn gauges<'a>(
    scrape: &'a prometheus_parse::Scrape,
    name: &'a str,
) -> impl Iterator<Item = f64> + 'a {
    scrape
        .samples
        .iter()
        .filter(move |s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
}

/// The sum of the samples of the gauge `name` in `scrape`.
fn sum_gauge(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    gauges(scrape, name).sum()
}

/// The largest sample of the gauge `name` in `scrape`, 0 when it has none.
fn max_gauge(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    gauges(scrape, name).fold(0.0, f64::max)
}
