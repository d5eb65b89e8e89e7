//! Draining a backend through the admin API while the XDP data plane carries the service:
//! the drained backend gets no new flow, a long upload pinned to it finishes byte-complete,
//! and `/status` shows it draining, its open flows going to zero and its XDP flow count
//! frozen. NAT and DSR.
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use lb_tests::admin;
use lb_tests::client::{http_get, upload, Upload};
use lb_tests::data::Receipt;
use lb_tests::load::run;
use lb_tests::xdp::world::{World, BULK, WEB};
use lb_tests::xdp::{backend_ip, in_netns, Mode, Path, Topology};

/// The part of the long upload sent before the drain, and after it.
const BEFORE: u64 = 8 * 1024 * 1024;
const AFTER: u64 = 24 * 1024 * 1024;

#[test]
fn nat_a_drained_backend_takes_no_new_flow_and_its_upload_finishes() {
    if lb_tests::require_root("xdp_drain::nat_a_drained_backend_takes_no_new_flow") {
        drain_mid_load(Mode::Nat.into());
    }
}

#[test]
fn dsr_a_drained_backend_takes_no_new_flow_and_its_upload_finishes() {
    if lb_tests::require_root("xdp_drain::dsr_a_drained_backend_takes_no_new_flow") {
        drain_mid_load(Mode::Dsr.into());
    }
}

#[test]
fn tc_nat_a_drained_backend_takes_no_new_flow_and_its_upload_finishes() {
    if lb_tests::require_root("xdp_drain::tc_nat_a_drained_backend_takes_no_new_flow") {
        drain_mid_load(Path::tc(Mode::Nat));
    }
}

#[test]
fn tc_dsr_a_drained_backend_takes_no_new_flow_and_its_upload_finishes() {
    if lb_tests::require_root("xdp_drain::tc_dsr_a_drained_backend_takes_no_new_flow") {
        drain_mid_load(Path::tc(Mode::Dsr));
    }
}

fn drain_mid_load(path: Path) {
    let mut world = World::start(path, 3, 3);
    let api = world.daemon.admin_addr();
    let status = |world: &World| {
        in_netns(&world.topology.balancer, || admin::status(api)).expect("balancer namespace")
    };

    let mut long = world
        .client(|| -> Result<Upload, lb_tests::client::ClientError> {
            let mut u = Upload::start(Topology::vip(BULK), 21)?;
            u.send(BEFORE)?;
            Ok(u)
        })
        .unwrap_or_else(|e| panic!("{path:?}: the long upload could not start: {e}"));
    let holder = world.bulk_connection_holder(3);
    let holder_addr = SocketAddr::new(IpAddr::V4(backend_ip(holder)), BULK);
    let web_drained = SocketAddr::new(IpAddr::V4(backend_ip(2)), WEB);

    let mark = world.daemon.log_mark();
    for (service, backend) in [("bulk", holder_addr), ("web", web_drained)] {
        let path = format!("/services/{service}/backends/{backend}/drain");
        let reply = in_netns(&world.topology.balancer, || {
            admin::request(api, "POST", &path, "")
        })
        .expect("balancer namespace");
        assert_eq!(reply.status, 200, "{path:?}: POST {path}: {}", reply.body);
    }
    for service in ["bulk", "web"] {
        let table = format!("service {service}: XDP table generation");
        world
            .daemon
            .wait_for_log_after(mark, &table, Duration::from_secs(10))
            .unwrap_or_else(|e| {
                panic!("{path:?}: the drain of {service} never reached the XDP table: {e}")
            });
    }
    let flows_of = |st: &serde_json::Value| -> u64 {
        admin::backend(st, "bulk", holder_addr)
            .and_then(|b| b["xdp"]["flows"].as_u64())
            .unwrap_or_else(|| panic!("{path:?}: no XDP flow count for {holder_addr}: {st}"))
    };
    let st = status(&world);
    let before = flows_of(&st);
    assert_eq!(
        admin::backend(&st, "bulk", holder_addr).map(|b| b["state"].clone()),
        Some("draining".into()),
        "{path:?}: /status does not show {holder_addr} draining: {st}"
    );

    // New flows while the long upload goes on: none reaches a drained backend.
    let web_report = world.client(|| {
        run(90, 3, Duration::from_secs(60), |_| {
            http_get(Topology::vip(WEB), "/")
        })
    });
    web_report.assert_all_answered(&format!("{path:?}: HTTP while b2 drains"));
    assert_eq!(
        web_report.tally.get("b2"),
        0,
        "{path:?}: the drained web backend b2 answered new connections: {:?}",
        web_report.tally
    );
    let bulk_report = world.client(|| {
        run(30, 3, Duration::from_secs(60), |i| {
            upload(Topology::vip(BULK), 4096, 100 + i as u64).map(|_| "ok".to_string())
        })
    });
    bulk_report.assert_all_answered(&format!("{path:?}: uploads while b{holder} drains"));
    // Status counts the open upload on the drained backend (conntrack holds it open)...
    let active_of = |st: &serde_json::Value| -> u64 {
        admin::backend(st, "bulk", holder_addr)
            .and_then(|b| b["active"].as_u64())
            .unwrap_or_else(|| panic!("{path:?}: no active count for {holder_addr}: {st}"))
    };
    let wait_active = |what: &str, ok: &dyn Fn(u64) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let st = status(&world);
            if ok(active_of(&st)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path:?}: {what} within 20 s: {}",
                admin::backend(&st, "bulk", holder_addr)
                    .cloned()
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_active(
        "/status never counted the open upload on the drained backend",
        &|n| n >= 1,
    );
    long.send(AFTER)
        .unwrap_or_else(|e| panic!("{path:?}: the upload to the drained b{holder} broke: {e}"));
    let receipt = long
        .finish()
        .unwrap_or_else(|e| panic!("{path:?}: the upload to the drained b{holder} failed: {e}"));
    assert_eq!(
        receipt,
        Receipt::of_stream(BEFORE + AFTER, 21),
        "{path:?}: the upload pinned to the drained b{holder} arrived damaged or cut"
    );
    // ...and the count goes to zero once it has finished.
    wait_active("the drained backend's open flows did not go to 0", &|n| {
        n == 0
    });
    let after = flows_of(&status(&world));
    assert_eq!(
        after,
        before,
        "{path:?}: XDP started {} new flows on the drained b{holder}",
        after - before
    );
}

#[test]
fn nat_sigterm_resets_new_flows_and_lets_an_open_upload_finish() {
    if lb_tests::require_root("xdp_drain::nat_sigterm_resets_new_flows") {
        stop_mid_upload(Mode::Nat.into());
    }
}

#[test]
fn tc_nat_sigterm_resets_new_flows_and_lets_an_open_upload_finish() {
    if lb_tests::require_root("xdp_drain::tc_nat_sigterm_resets_new_flows") {
        stop_mid_upload(Path::tc(Mode::Nat));
    }
}

#[test]
fn tc_dsr_sigterm_resets_new_flows_and_lets_an_open_upload_finish() {
    if lb_tests::require_root("xdp_drain::tc_dsr_sigterm_resets_new_flows") {
        stop_mid_upload(Path::tc(Mode::Dsr));
    }
}

/// SIGTERM while an upload runs through the eBPF plane: a new connection is refused with a
/// RST at once, the upload goes on and arrives byte-complete, and the daemon then exits 0
/// before its `drain_timeout` (5 s) ends, saying every flow ended.
fn stop_mid_upload(path: Path) {
    let mut world = World::start(path, 3, 3);
    let mut long = world
        .client(|| -> Result<Upload, lb_tests::client::ClientError> {
            let mut u = Upload::start(Topology::vip(BULK), 31)?;
            u.send(BEFORE)?;
            Ok(u)
        })
        .unwrap_or_else(|e| panic!("{path:?}: the long upload could not start: {e}"));
    let mark = world.daemon.log_mark();
    world
        .daemon
        .signal(nix::sys::signal::Signal::SIGTERM)
        .expect("signal the daemon");
    world
        .daemon
        .wait_for_log_after(mark, "take no new flows", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{path:?}: the daemon did not stop taking new flows: {e}"));
    let refused = world.client(|| {
        std::net::TcpStream::connect_timeout(&Topology::vip(WEB), Duration::from_secs(2))
    });
    match refused {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => {
            panic!("{path:?}: a new connection after SIGTERM must be reset at once, got {other:?}")
        }
    }
    long.send(AFTER)
        .unwrap_or_else(|e| panic!("{path:?}: the upload broke after SIGTERM: {e}"));
    let receipt = long
        .finish()
        .unwrap_or_else(|e| panic!("{path:?}: the upload failed after SIGTERM: {e}"));
    assert_eq!(
        receipt,
        Receipt::of_stream(BEFORE + AFTER, 31),
        "{path:?}: the upload open at SIGTERM arrived damaged or cut"
    );
    let status = world
        .daemon
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{path:?}: the daemon did not exit after its flows ended"));
    assert!(
        status.success(),
        "{path:?}: the daemon exited with {status}"
    );
    let logs = world.daemon.logs()[mark..].join("\n");
    assert!(
        logs.contains("eBPF: every flow ended"),
        "{path:?}: the drain did not see the flows end before its timeout:\n{logs}"
    );
}
