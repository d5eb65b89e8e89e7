//! Draining a backend mid-load: it gets no new connection, its open ones finish
//! byte-complete, and status shows their count going to zero. Enabling it again with
//! `slow_start` ramps its weight up in steps.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_tests::admin::{self, cli};
use lb_tests::client::{upload, Upload};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::data::Receipt;
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, HashServer};

const MIB: u64 = 1024 * 1024;
const OPEN: u64 = 4;

fn active(api: SocketAddr, backend: SocketAddr) -> u64 {
    let st = admin::status(api);
    admin::backend(&st, "bulk", backend)
        .unwrap_or_else(|| panic!("status does not list {backend}: {st}"))["active"]
        .as_u64()
        .expect("a count")
}

#[test]
fn a_drained_backend_gets_no_new_flow_and_its_open_connections_finish() {
    let a = HashServer::start("a").expect("backend starts");
    let b = HashServer::start("b").expect("backend starts");
    let vip = free_addr();
    let daemon = Daemon::start(
        &DaemonConfig::new()
            .service(
                // No active checks: a check's connect would count as a receipt on the hash
                // servers, and this test counts what reached each backend.
                ServiceConfig::tcp("bulk", vip)
                    .scheduler("round_robin")
                    .health("kind", "none")
                    .backend(a.addr(), 1)
                    .backend(b.addr(), 1),
            )
            .to_toml(),
    );
    let api = daemon.admin_addr();

    let mut open: Vec<(u64, Upload)> = (0..OPEN)
        .map(|seed| {
            let mut u = Upload::start(vip, seed).expect("connects through the balancer");
            u.send(MIB).expect("the first MiB goes through");
            (seed, u)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while active(api, a.addr()) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let on_a = active(api, a.addr());
    assert!(
        on_a > 0,
        "round robin should have put some of the {OPEN} open uploads on backend a"
    );

    let out = cli(&api.to_string(), &["drain", "bulk", &a.addr().to_string()]);
    assert_eq!(out.code, Some(0), "`lb-daemon drain` failed: {out:?}");

    // New flows while a drains: all complete, none reaches a.
    for seed in 100..120 {
        let got = upload(vip, 64 * 1024, seed)
            .unwrap_or_else(|e| panic!("a new connection failed while a drains: {e}"));
        assert_eq!(got, Receipt::of_stream(64 * 1024, seed));
    }
    assert_eq!(
        a.receipts(),
        0,
        "drained backend a received a new connection (it has answered one)"
    );
    assert_eq!(
        b.receipts(),
        20,
        "every new connection should have gone to b"
    );
    let st = admin::status(api);
    let a_st = admin::backend(&st, "bulk", a.addr()).expect("a is listed");
    assert_eq!(a_st["state"], "draining", "a after drain: {a_st}");
    assert_eq!(
        a_st["active"].as_u64(),
        Some(on_a),
        "a's open connections must stay open while it drains: {a_st}"
    );

    // The open uploads go on and finish whole, on a as on b.
    for (_, u) in &mut open {
        u.send(MIB)
            .expect("an open upload keeps flowing while its backend drains");
    }
    for (seed, u) in open {
        let got = u
            .finish()
            .unwrap_or_else(|e| panic!("open upload {seed} was cut by the drain: {e}"));
        assert_eq!(
            got,
            Receipt::of_stream(2 * MIB, seed),
            "open upload {seed} arrived incomplete or damaged"
        );
    }
    assert_eq!(
        a.receipts(),
        on_a,
        "a should have finished exactly its open uploads"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = vec![on_a];
    loop {
        let n = active(api, a.addr());
        if seen.last() != Some(&n) {
            seen.push(n);
        }
        if n == 0 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        seen.last(),
        Some(&0),
        "status should show drained a's connections going to zero; it showed {seen:?}"
    );
}

#[test]
fn an_enabled_backend_ramps_up_with_slow_start() {
    let a = lb_tests::HttpNameServer::start("a").expect("backend starts");
    let b = lb_tests::HttpNameServer::start("b").expect("backend starts");
    let vip = free_addr();
    let daemon = Daemon::start(
        &DaemonConfig::new()
            .service(
                ServiceConfig::tcp("web", vip)
                    .scheduler("weighted_round_robin")
                    .fast_health("http")
                    .set("slow_start", "3s")
                    .backend(a.addr(), 100)
                    .backend(b.addr(), 100),
            )
            .to_toml(),
    );
    let api = daemon.admin_addr();
    let target = api.to_string();
    let b_addr = b.addr().to_string();
    let out = cli(&target, &["drain", "web", &b_addr]);
    assert_eq!(out.code, Some(0), "`lb-daemon drain` failed: {out:?}");
    let out = cli(&target, &["enable", "web", &b_addr]);
    assert_eq!(out.code, Some(0), "`lb-daemon enable` failed: {out:?}");

    // Right after enable, b takes new flows again, but far from its full share.
    let st = admin::status(api);
    let b_st = admin::backend(&st, "web", b.addr()).expect("b is listed");
    assert_eq!(b_st["state"], "slow_start", "b right after enable: {b_st}");
    let w = b_st["effective_weight"].as_u64().expect("a weight");
    assert!(
        (1..100).contains(&w),
        "an enabled backend should start its ramp low, not at its full weight 100 (it has {w})"
    );

    // The ramp ends at the full weight.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = vec![w];
    loop {
        let st = admin::status(api);
        let b_st = admin::backend(&st, "web", b.addr()).expect("b is listed");
        let w = b_st["effective_weight"].as_u64().expect("a weight");
        if seen.last() != Some(&w) {
            seen.push(w);
        }
        if (w == 100 && b_st["state"] == "active") || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        seen.last(),
        Some(&100),
        "b's weight should ramp up to 100 over slow_start; it went {seen:?}"
    );
    assert!(
        seen.len() >= 3,
        "the ramp should go up in steps, not jump: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|p| p[0] <= p[1]),
        "the ramp should only go up: {seen:?}"
    );
}

/// Slow start at the default weight of 1: a backend enabled again starts its ramp with a
/// small share of new connections, not half of them at once (weights count in sixteenths
/// inside, as HAProxy's do; with whole weights 1 could not ramp), and `/status` says it is
/// in slow start.
#[test]
fn slow_start_ramps_a_backend_of_weight_1_too() {
    let a = lb_tests::HttpNameServer::start("alpha").expect("backend starts");
    let b = lb_tests::HttpNameServer::start("beta").expect("backend starts");
    let vip = free_addr();
    let daemon = Daemon::start(
        &DaemonConfig::new()
            .service(
                ServiceConfig::tcp("web", vip)
                    .scheduler("weighted_round_robin")
                    .fast_health("http")
                    .set("slow_start", "6s")
                    .backend(a.addr(), 1)
                    .backend(b.addr(), 1),
            )
            .to_toml(),
    );
    let api = daemon.admin_addr();
    let target = api.to_string();
    let b_addr = b.addr().to_string();
    let out = cli(&target, &["drain", "web", &b_addr]);
    assert_eq!(out.code, Some(0), "`lb-daemon drain` failed: {out:?}");
    let out = cli(&target, &["enable", "web", &b_addr]);
    assert_eq!(out.code, Some(0), "`lb-daemon enable` failed: {out:?}");
    let enabled = Instant::now();
    let st = admin::status(api);
    let b_st = admin::backend(&st, "web", b.addr()).expect("beta is listed");
    assert_eq!(
        b_st["state"], "slow_start",
        "beta right after enable: {b_st}"
    );

    // Well inside the first sixth of the ramp, beta's share is at most about 1/7 of the
    // flows (2 sixteenths against alpha's 16), not the half an unramped weight 1 takes.
    let mut to_b = 0;
    let mut made = 0;
    while made < 64 && enabled.elapsed() < Duration::from_secs(1) {
        let who = lb_tests::client::http_get(vip, "/").expect("a request through the VIP");
        made += 1;
        if who.contains("beta") {
            to_b += 1;
        }
    }
    assert!(made >= 16, "only {made} requests in a second");
    assert!(
        to_b * 4 < made,
        "beta took {to_b} of {made} new connections right after it was enabled: slow start \
         did not ramp its weight of 1"
    );
}
