//! DNS discovery: a backend given as `name:port` follows the name's records. The daemon runs
//! in its own mount namespace with a private /etc/hosts that the test rewrites; records that
//! appear become backends, records that vanish are drained and removed, and a name that stops
//! resolving keeps its last backends.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use lb_tests::admin;
use lb_tests::client::http_get;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::load::wait_until_each_answers;
use lb_tests::ports::{free_addr, free_port};
use lb_tests::{require_root, Daemon, HttpNameServer};

const NAME: &str = "app.lb-test";
const INTERVAL: &str = "300ms";
/// How long the test waits for the daemon to follow a change: many intervals, so a slow
/// machine does not fail it; the daemon itself acts within one.
const FOLLOW: Duration = Duration::from_secs(10);

fn hosts(path: &Path, ips: &[IpAddr]) {
    let mut text = String::from("127.0.0.1 localhost\n");
    for ip in ips {
        text.push_str(&format!("{ip} {NAME}\n"));
    }
    // In place: the daemon's /etc/hosts is a bind mount of this very file.
    std::fs::write(path, text).expect("the test's hosts file is writable");
}

/// The backends of `app` that take new flows (not leaving), as a set.
fn serving(api: SocketAddr) -> BTreeSet<SocketAddr> {
    let st = admin::status(api);
    st["services"][0]["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter(|b| b["state"] != "removing")
                .filter_map(|b| b["address"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits up to [`FOLLOW`] for `app`'s backends to be `want` (and, with `all`, for leaving
/// ones to be gone too). Returns what status showed last.
fn wait_for(api: SocketAddr, want: &BTreeSet<SocketAddr>, all: bool) -> BTreeSet<SocketAddr> {
    let deadline = Instant::now() + FOLLOW;
    loop {
        let now = if all {
            admin::backend_addresses(&admin::status(api), "app")
                .into_iter()
                .collect()
        } else {
            serving(api)
        };
        if &now == want || Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn backends_follow_the_names_records() {
    if !require_root("dns discovery (mount namespace with a private /etc/hosts)") {
        return;
    }
    let port = free_port();
    let ips: Vec<IpAddr> = [11, 12, 13]
        .iter()
        .map(|i| IpAddr::from([127, 0, 0, *i]))
        .collect();
    let servers: Vec<HttpNameServer> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            HttpNameServer::start_on(&format!("h{}", 11 + i), SocketAddr::new(*ip, port))
                .expect("a backend on its own loopback address")
        })
        .collect();
    let addr = |i: usize| servers[i].addr();

    let dir = tempfile::tempdir().expect("a temporary directory");
    let hosts_file = dir.path().join("hosts");
    hosts(&hosts_file, &ips[..2]);
    let vip = free_addr();
    let config = dir.path().join("lb.toml");
    std::fs::write(
        &config,
        DaemonConfig::new()
            .service(
                ServiceConfig::tcp("app", vip)
                    .scheduler("round_robin")
                    .fast_health("http")
                    .set("resolve_interval", INTERVAL)
                    .backend_named(&format!("{NAME}:{port}"), 1),
            )
            .to_toml(),
    )
    .expect("config written");
    // The daemon, in a mount namespace of its own where /etc/hosts is the test's file.
    let wrapper = lb_tests::daemon::private_hosts_wrapper(dir.path(), &hosts_file);
    let daemon = Daemon::spawn(&wrapper, &config, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("lb-daemon did not start in its mount namespace: {e}"));
    let api = daemon.admin_addr();

    let want: BTreeSet<_> = [addr(0), addr(1)].into();
    let got = wait_for(api, &want, false);
    assert_eq!(
        got, want,
        "{NAME} has two records; the service should have those two backends"
    );
    wait_until_each_answers(&["h11", "h12"], FOLLOW, || http_get(vip, "/"))
        .unwrap_or_else(|e| panic!("both resolved backends should answer: {e}"));

    // .11 vanishes, .13 appears.
    hosts(&hosts_file, &ips[1..]);
    let want: BTreeSet<_> = [addr(1), addr(2)].into();
    let got = wait_for(api, &want, true);
    assert_eq!(
        got, want,
        "after {NAME} lost 127.0.0.11 and gained 127.0.0.13, the backends should follow"
    );
    let before = servers[0].requests();
    wait_until_each_answers(&["h12", "h13"], FOLLOW, || http_get(vip, "/"))
        .unwrap_or_else(|e| panic!("the backends of the new records should answer: {e}"));
    for _ in 0..10 {
        let who = http_get(vip, "/").expect("the service answers");
        assert!(
            !who.contains("h11"),
            "a vanished record's backend got a new connection"
        );
    }
    assert_eq!(
        servers[0].requests(),
        before,
        "h11 left DNS but still got requests"
    );

    // The name stops resolving: the last backends stay rather than all being drained.
    let mark = daemon.log_mark();
    hosts(&hosts_file, &[]);
    daemon
        .wait_for_log_after(mark, "cannot resolve", FOLLOW)
        .unwrap_or_else(|e| panic!("a failed lookup of {NAME} should be logged: {e}"));
    assert_eq!(
        serving(api),
        want,
        "a name that stops resolving must keep its last backends"
    );
    http_get(vip, "/").expect("the service still answers while DNS fails");

    // It resolves again, to one record.
    hosts(&hosts_file, &ips[2..]);
    let want: BTreeSet<_> = [addr(2)].into();
    let got = wait_for(api, &want, true);
    assert_eq!(got, want, "{NAME} now has one record, 127.0.0.13");
}
