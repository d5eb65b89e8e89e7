//! `/metrics` is valid Prometheus text and its counters match the traffic sent.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_tests::admin;
use lb_tests::client::upload;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::data::Receipt;
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, HashServer};
use prometheus_parse::{Scrape, Value};

/// Uploads and their size: small enough to be quick, large enough to need many relays.
const UPLOADS: u64 = 12;
const LEN: u64 = 300 * 1024;

fn scrape(api: SocketAddr) -> Scrape {
    let r = admin::request(api, "GET", "/metrics", "");
    assert_eq!(r.status, 200, "GET /metrics failed: {}", r.body);
    Scrape::parse(r.body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text ({e}):\n{}", r.body))
}

/// The sum of the samples named `name` whose labels include every pair in `labels`.
fn sum(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => panic!("{name} should be a plain number"),
        })
        .sum()
}

#[test]
fn metrics_parse_and_count_the_traffic_sent() {
    let a = HashServer::start("a").expect("backend starts");
    let b = HashServer::start("b").expect("backend starts");
    let vip = free_addr();
    let daemon = Daemon::start(
        &DaemonConfig::new()
            .service(
                ServiceConfig::tcp("bulk", vip)
                    .scheduler("round_robin")
                    .fast_health("tcp")
                    .backend(a.addr(), 1)
                    .backend(b.addr(), 1),
            )
            .to_toml(),
    );
    let api = daemon.admin_addr();
    let mut reply_bytes = 0u64;
    for seed in 0..UPLOADS {
        let got = upload(vip, LEN, seed).unwrap_or_else(|e| panic!("upload {seed} failed: {e}"));
        assert_eq!(
            got,
            Receipt::of_stream(LEN, seed),
            "upload {seed} arrived damaged"
        );
        // The hash server answers one receipt line.
        reply_bytes += format!("{got}\n").len() as u64;
    }
    // Counters are final once every connection is closed on the balancer's side too.
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = scrape(api);
        if sum(&m, "lb_backend_active_connections", &[("service", "bulk")]) == 0.0
            || Instant::now() >= deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let svc = [("service", "bulk")];
    assert_eq!(
        sum(&m, "lb_backend_active_connections", &svc),
        0.0,
        "every upload is finished, yet /metrics shows open connections"
    );
    assert_eq!(
        sum(&m, "lb_backend_connections_total", &svc),
        UPLOADS as f64,
        "the test opened {UPLOADS} connections through the service"
    );
    for backend in [a.addr(), b.addr()] {
        let n = sum(
            &m,
            "lb_backend_connections_total",
            &[("service", "bulk"), ("backend", &backend.to_string())],
        );
        assert_eq!(
            n,
            (UPLOADS / 2) as f64,
            "round robin over two backends should give {backend} half the connections"
        );
    }
    assert_eq!(
        sum(
            &m,
            "lb_backend_bytes_total",
            &[("service", "bulk"), ("direction", "to_backend")]
        ),
        (UPLOADS * LEN) as f64,
        "bytes to the backends should be exactly the bytes uploaded"
    );
    assert_eq!(
        sum(
            &m,
            "lb_backend_bytes_total",
            &[("service", "bulk"), ("direction", "from_backend")]
        ),
        reply_bytes as f64,
        "bytes from the backends should be exactly the receipts they sent back"
    );
    assert_eq!(sum(&m, "lb_backend_up", &svc), 2.0, "both backends are up");
    assert_eq!(sum(&m, "lb_backend_connect_failures_total", &svc), 0.0);
    assert!(
        m.docs.contains_key("lb_backend_bytes"),
        "every metric should carry its HELP text: {:?}",
        m.docs.keys().collect::<Vec<_>>()
    );
}
