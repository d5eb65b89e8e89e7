//! How new TCP connections are spread over backends, per scheduler: the shares a user expects
//! from the weights, stickiness where the scheduler promises it, and no new connection for a
//! backend with weight 0.
//!
//! Every connection is a fresh `GET /` through the VIP, answered by an HTTP name server; the
//! answer (the backend's name) is what is counted, so health checks do not disturb the count.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use lb_tests::client::{http_get, http_get_from, HttpConnection};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::load::run;
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, HttpNameServer, Tally};

/// Connections per scheduler run.
const CONNECTIONS: usize = 3_000;
/// Client threads making them.
const CLIENT_THREADS: usize = 4;
/// Upper bound for one run.
const RUN_DEADLINE: Duration = Duration::from_secs(120);
/// How long a new service may take until every backend answers.
const WARM_UP: Duration = Duration::from_secs(15);

/// Backends `b1..bN` with the given weights behind one TCP service `web`.
struct Setup {
    backends: Vec<HttpNameServer>,
    vip: SocketAddr,
    // Runs until the test ends.
    _daemon: Daemon,
}

/// Starts `b1..bN` (HTTP name servers).
fn backends(n: usize) -> Vec<HttpNameServer> {
    (1..=n)
        .map(|i| HttpNameServer::start(&format!("b{i}")).expect("a backend starts"))
        .collect()
}

/// A TCP service `name` on a fresh VIP with HTTP health checks (rise 2).
fn service(
    name: &str,
    scheduler: &str,
    backends: &[HttpNameServer],
    weights: &[u32],
) -> ServiceConfig {
    let mut svc = ServiceConfig::tcp(name, free_addr())
        .scheduler(scheduler)
        .fast_health("http");
    for (b, w) in backends.iter().zip(weights) {
        svc = svc.backend(b.addr(), *w);
    }
    svc
}

/// Waits until the daemon has seen `rise` good checks of every backend with a non-zero
/// weight, so every one of them is up, whatever state the daemon starts backends in.
/// Waiting for answers through the VIP instead would not work for every scheduler
/// (least_conn and source_hash may send every probe to the same backend).
fn wait_until_up(what: &str, backends: &[HttpNameServer], weights: &[u32]) {
    for (b, w) in backends.iter().zip(weights) {
        if *w > 0 && !b.wait_for_health_checks(3, WARM_UP) {
            panic!(
                "{what}: the daemon checked {} only {} times in {WARM_UP:?}; it should check it \
                 every 200 ms",
                b.name(),
                b.health_checks()
            );
        }
    }
}

impl Setup {
    fn start(scheduler: &str, weights: &[u32]) -> Setup {
        let backends = backends(weights.len());
        let svc = service("web", scheduler, &backends, weights);
        let vip = svc.listen();
        let daemon = Daemon::start(&DaemonConfig::new().service(svc).to_toml());
        wait_until_up(scheduler, &backends, weights);
        Setup {
            backends,
            vip,
            _daemon: daemon,
        }
    }

    /// `CONNECTIONS` new connections, each `GET /`; every one must be answered.
    fn connections(&self, what: &str) -> Tally {
        let vip = self.vip;
        let report = run(CONNECTIONS, CLIENT_THREADS, RUN_DEADLINE, |_| {
            http_get(vip, "/")
        });
        report.assert_all_answered(what);
        report.tally
    }
}

fn expected<'a>(names: &'a [&'a str], weights: &[u32]) -> Vec<(&'a str, u32)> {
    names.iter().copied().zip(weights.iter().copied()).collect()
}

fn assert_shares(tally: &Tally, weights: &[u32], tolerance: f64, what: &str) {
    let names = ["b1", "b2", "b3"];
    if let Err(e) = tally.check_shares(&expected(&names, weights), tolerance, what) {
        panic!("{e}");
    }
}

#[test]
fn round_robin_gives_each_backend_a_third() {
    let s = Setup::start("round_robin", &[1, 1, 1]);
    let tally = s.connections("round_robin");
    assert_shares(&tally, &[1, 1, 1], 0.01, "round_robin");
}

#[test]
fn round_robin_ignores_weights() {
    let s = Setup::start("round_robin", &[1, 2, 3]);
    let tally = s.connections("round_robin with weights 1:2:3");
    assert_shares(&tally, &[1, 1, 1], 0.01, "round_robin with weights 1:2:3");
}

#[test]
fn weighted_round_robin_follows_weights_1_2_3() {
    let s = Setup::start("weighted_round_robin", &[1, 2, 3]);
    let tally = s.connections("weighted_round_robin");
    assert_shares(&tally, &[1, 2, 3], 0.01, "weighted_round_robin 1:2:3");
}

/// Weights above 16: the schedulers count in sixteenths inside (slow start), so a cap left
/// at the configured maximum would flatten 10 : 20 : 30.
#[test]
fn weighted_round_robin_follows_weights_10_20_30() {
    let s = Setup::start("weighted_round_robin", &[10, 20, 30]);
    let tally = s.connections("weighted_round_robin 10:20:30");
    assert_shares(&tally, &[1, 2, 3], 0.01, "weighted_round_robin 10:20:30");
}

#[test]
fn maglev_spreads_connections_evenly() {
    let s = Setup::start("maglev", &[1, 1, 1]);
    let tally = s.connections("maglev");
    assert_shares(&tally, &[1, 1, 1], 0.05, "maglev");
}

#[test]
fn maglev_follows_weights_1_2_3() {
    let s = Setup::start("maglev", &[1, 2, 3]);
    let tally = s.connections("maglev 1:2:3");
    assert_shares(&tally, &[1, 2, 3], 0.05, "maglev 1:2:3");
}

#[test]
fn random_two_spreads_connections_evenly() {
    let s = Setup::start("random_two", &[1, 1, 1]);
    let tally = s.connections("random_two");
    assert_shares(&tally, &[1, 1, 1], 0.05, "random_two");
}

/// Client number `i` as a distinct loopback source address, 127.1.x.y.
fn client_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8))
}

#[test]
fn source_hash_spreads_clients_and_keeps_each_on_one_backend() {
    let s = Setup::start("source_hash", &[1, 1, 1]);
    let vip = s.vip;
    // One connection from each of 3,000 client addresses.
    let first = run(CONNECTIONS, CLIENT_THREADS, RUN_DEADLINE, |i| {
        http_get_from(Some(client_ip(i)), vip, "/")
    });
    first.assert_all_answered("source_hash, one connection per client address");
    assert_shares(
        &first.tally,
        &[1, 1, 1],
        0.05,
        "source_hash over 3,000 client addresses",
    );
    let by_client: HashMap<usize, &str> = first
        .answers
        .iter()
        .map(|(i, name)| (*i, name.as_str()))
        .collect();

    // The first 100 clients come back three times each: always to the same backend.
    let again = run(300, CLIENT_THREADS, RUN_DEADLINE, |k| {
        http_get_from(Some(client_ip(k % 100)), vip, "/")
    });
    again.assert_all_answered("source_hash, returning clients");
    let moved: Vec<String> = again
        .answers
        .iter()
        .filter(|(k, name)| by_client[&(k % 100)] != name)
        .map(|(k, name)| {
            format!(
                "client {} went to {} first, then to {name}",
                client_ip(k % 100),
                by_client[&(k % 100)]
            )
        })
        .collect();
    assert!(
        moved.is_empty(),
        "source_hash must keep a client address on one backend, but {} of 300 returning \
         connections moved: {}",
        moved.len(),
        moved.join("; ")
    );
}

/// Holds `n` keep-alive connections opened one after the other; returns them with the backend
/// each landed on.
fn hold(vip: SocketAddr, n: usize) -> Vec<(HttpConnection, String)> {
    (0..n)
        .map(|k| {
            let mut c = HttpConnection::open(vip)
                .unwrap_or_else(|e| panic!("held connection #{k} could not connect: {e}"));
            let name = c
                .get("/")
                .unwrap_or_else(|e| panic!("held connection #{k} got no answer: {e}"));
            (c, name)
        })
        .collect()
}

#[test]
fn least_conn_sends_new_connections_to_the_least_busy_backend() {
    let s = Setup::start("least_conn", &[1, 1, 1]);
    // 30 connections held open, opened one at a time: least_conn keeps them 10/10/10.
    let mut held = hold(s.vip, 30);
    let mut tally = Tally::new();
    for (_, name) in &held {
        tally.add(name);
    }
    for b in ["b1", "b2", "b3"] {
        assert!(
            (9..=11).contains(&tally.get(b)),
            "least_conn with 30 open connections should hold about 10 on each backend, got {tally}"
        );
    }

    // b1's connections end; the next 8 new connections must all go to b1, which stays the
    // least busy (0..7 open against about 10 on each of the others).
    held.retain(|(_, name)| name != "b1");
    let b1 = &s.backends[0];
    let deadline = Instant::now() + Duration::from_secs(5);
    while b1.open_connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        b1.open_connections(),
        0,
        "the balancer kept b1's connections open after its clients closed them"
    );
    // Let the daemon account for the closes it has just passed on.
    std::thread::sleep(Duration::from_millis(300));
    let more = hold(s.vip, 8);
    let elsewhere: Vec<&str> = more
        .iter()
        .map(|(_, n)| n.as_str())
        .filter(|n| *n != "b1")
        .collect();
    assert!(
        elsewhere.is_empty(),
        "least_conn sent {} of 8 new connections to busy backends ({elsewhere:?}) while b1 \
         had at most 7 open and the others about 10 each",
        elsewhere.len()
    );
    drop(held);
}

#[test]
fn a_backend_with_weight_0_gets_no_new_connection_under_any_scheduler() {
    let schedulers = [
        "maglev",
        "round_robin",
        "weighted_round_robin",
        "least_conn",
        "random_two",
        "source_hash",
    ];
    // Each service its own b1, b2, b3 (weights 1, 1, 0), so each one's health checks can be
    // waited for.
    let fleets: Vec<Vec<HttpNameServer>> = schedulers.iter().map(|_| backends(3)).collect();
    let mut config = DaemonConfig::new();
    let mut vips = Vec::new();
    for (sched, fleet) in schedulers.iter().zip(&fleets) {
        let svc = service(sched, sched, fleet, &[1, 1, 0]);
        vips.push(svc.listen());
        config = config.service(svc);
    }
    let _daemon = Daemon::start(&config.to_toml());
    for ((sched, vip), fleet) in schedulers.iter().zip(&vips).zip(&fleets) {
        wait_until_up(sched, fleet, &[1, 1, 0]);
        let vip = *vip;
        // Many client addresses, so source_hash too reaches both live backends; 30 connections
        // held open at a time, so least_conn has to use both.
        let mut tally = Tally::new();
        for batch in 0..10 {
            let held: Vec<(HttpConnection, String)> = (0..30)
                .map(|k| {
                    let i = batch * 30 + k;
                    let mut c = HttpConnection::open_from(Some(client_ip(i)), vip)
                        .unwrap_or_else(|e| panic!("{sched}: connection {i} failed: {e}"));
                    let name = c
                        .get("/")
                        .unwrap_or_else(|e| panic!("{sched}: connection {i} got no answer: {e}"));
                    (c, name)
                })
                .collect();
            for (_, name) in &held {
                tally.add(name);
            }
        }
        assert_eq!(
            tally.get("b3"),
            0,
            "{sched}: b3 has weight 0 (draining) but got {} of 300 new connections ({tally})",
            tally.get("b3"),
        );
        for live in ["b1", "b2"] {
            assert!(
                tally.get(live) > 0,
                "{sched}: {live} (weight 1) got none of 300 new connections ({tally})"
            );
        }
    }
}
