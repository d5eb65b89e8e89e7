//! Draining a backend mid-load: it gets no new connection, its open ones finish
//! byte-complete, and status shows their count going to zero.

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
