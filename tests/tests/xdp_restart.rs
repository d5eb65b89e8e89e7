//! The eBPF data plane outlives the daemon: its maps and program links are pinned, so when
//! lb-daemon is killed (SIGKILL, a crash) established flows go on and new ones are placed on
//! the last table; a daemon started again adopts the pinned set and the flows never notice.
//! SIGQUIT does the same on purpose (a restart): the daemon exits 0 and leaves the data plane
//! pinned. SIGTERM removes the pins. A pinned set of another map layout is replaced, with the log
//! line the docs name. tc and XDP, NAT and DSR.
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use std::time::Duration;

use lb_tests::client::{http_get, Upload};
use lb_tests::config::DaemonConfig;
use lb_tests::daemon::test_pin_dir;
use lb_tests::data::Receipt;
use lb_tests::load::run;
use lb_tests::xdp::world::{service, World, BULK, WEB};
use lb_tests::xdp::{bpf_object, in_netns, Mode, Path, Topology};
use lb_tests::Daemon;
use nix::sys::signal::Signal;

/// Each long upload's bytes before the kill, during the gap, and after the restart.
const BEFORE: u64 = 4 * 1024 * 1024;
const GAP: u64 = 4 * 1024 * 1024;
const AFTER: u64 = 8 * 1024 * 1024;
/// Long uploads open across the restart.
const UPLOADS: u64 = 5;

#[test]
fn tc_nat_flows_outlive_a_killed_daemon_and_a_restart_adopts_them() {
    if lb_tests::require_root("xdp_restart::tc_nat_flows_outlive_a_killed_daemon") {
        kill_and_restart(Path::tc(Mode::Nat), Signal::SIGKILL);
    }
}

#[test]
fn tc_dsr_flows_outlive_a_killed_daemon_and_a_restart_adopts_them() {
    if lb_tests::require_root("xdp_restart::tc_dsr_flows_outlive_a_killed_daemon") {
        kill_and_restart(Path::tc(Mode::Dsr), Signal::SIGKILL);
    }
}

#[test]
fn xdp_nat_flows_outlive_a_killed_daemon_and_a_restart_adopts_them() {
    if lb_tests::require_root("xdp_restart::xdp_nat_flows_outlive_a_killed_daemon") {
        kill_and_restart(Mode::Nat.into(), Signal::SIGKILL);
    }
}

#[test]
fn tc_nat_sigquit_leaves_the_data_plane_to_the_next_daemon() {
    if lb_tests::require_root("xdp_restart::tc_nat_sigquit_leaves_the_data_plane") {
        kill_and_restart(Path::tc(Mode::Nat), Signal::SIGQUIT);
    }
}

#[test]
fn tc_nat_upgrade_under_load_cuts_no_flow() {
    if lb_tests::require_root("xdp_restart::tc_nat_upgrade_under_load_cuts_no_flow") {
        upgrade_under_load(Path::tc(Mode::Nat));
    }
}

#[test]
fn a_service_the_new_config_lacks_drains_and_is_released() {
    if lb_tests::require_root("xdp_restart::a_service_the_new_config_lacks_drains") {
        restart_without_a_service(Path::tc(Mode::Nat));
    }
}

#[test]
fn a_nat_service_on_two_local_addresses_the_new_config_lacks_drains_its_flows() {
    if lb_tests::require_root("xdp_restart::a_nat_service_on_two_local_addresses_drains") {
        restart_without_a_two_address_service(Path::tc(Mode::Nat));
    }
}

#[test]
fn a_local_address_added_across_a_restart_carries_new_flows() {
    if lb_tests::require_root("xdp_restart::a_local_address_added_across_a_restart") {
        restart_with_a_second_local_address(Path::tc(Mode::Nat));
    }
}

#[test]
fn a_service_draining_behind_its_successor_keeps_its_id_across_a_restart() {
    if lb_tests::require_root("xdp_restart::a_service_draining_behind_its_successor") {
        restart_while_a_renamed_service_drains(Path::tc(Mode::Nat));
    }
}

#[test]
fn a_pinned_set_of_another_layout_is_replaced_with_the_documented_line() {
    if lb_tests::require_root("xdp_restart::a_pinned_set_of_another_layout_is_replaced") {
        other_layout(Path::tc(Mode::Nat));
    }
}

#[test]
fn a_restart_that_fails_leaves_the_pinned_plane_serving() {
    if lb_tests::require_root("xdp_restart::a_restart_that_fails_leaves_the_pinned_plane") {
        failed_restart(Path::tc(Mode::Nat), Refused::Placement);
    }
}

#[test]
fn a_restart_that_cannot_serve_its_api_leaves_the_pinned_plane_serving() {
    if lb_tests::require_root("xdp_restart::a_restart_that_cannot_serve_its_api") {
        failed_restart(Path::tc(Mode::Nat), Refused::AdminAddressTaken);
    }
}

#[test]
fn a_second_daemon_on_the_same_pins_is_refused_and_takes_nothing() {
    if lb_tests::require_root("xdp_restart::a_second_daemon_on_the_same_pins") {
        second_daemon(Path::tc(Mode::Nat));
    }
}

#[test]
fn a_service_moved_to_the_proxy_across_a_restart_takes_its_vip_at_once() {
    if lb_tests::require_root("xdp_restart::a_service_moved_to_the_proxy_across_a_restart") {
        moved_to_the_proxy(Path::tc(Mode::Nat));
    }
}

/// Why the restart in [`failed_restart`] is refused.
#[derive(Debug, Clone, Copy)]
enum Refused {
    /// A service of its config cannot be placed (`tc` on a missing interface).
    Placement,
    /// Its admin API's address is taken, once the services are placed.
    AdminAddressTaken,
}

#[test]
fn a_fresh_start_that_is_refused_leaves_no_program_behind() {
    if !lb_tests::require_root("xdp_restart::a_fresh_start_that_is_refused") {
        return;
    }
    let path = Path::tc(Mode::Nat);
    let pins = PinDir(test_pin_dir());
    let t = Topology::at(path, 1);
    let toml = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .service(service(&t, path.mode, "web", &[(1, 1)]))
        .service(service(&t, path.mode, "bulk", &[(1, 1)]).set("interface", "l9"))
        .to_toml();
    let dir = pins.0.to_string_lossy().into_owned();
    let refused = in_netns(&t.balancer, || {
        Daemon::try_start_with_env(&toml, &[(lb_tests::daemon::BPF_PIN_DIR_ENV, &dir)])
    })
    .expect("enter the balancer namespace");
    assert!(refused.is_err(), "a service on a missing interface started");
    assert_eq!(
        t.prog_id("l0"),
        None,
        "a refused start left its program on l0, serving a VIP no daemon looks after"
    );
}

/// The pin directory of one test, removed when the test ends, also when it fails.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The usual three services on `path` with 3 backends, as one config.
fn config(topology: &Topology, mode: Mode) -> String {
    config_of(topology, mode, &["web", "bulk", "dns"])
}

/// Services `names` (of the usual three) with 3 backends, and a drain timeout of 2 s.
fn config_of(topology: &Topology, mode: Mode, names: &[&str]) -> String {
    let mut config = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .global("drain_timeout", "2s");
    let backends = [(1, 1), (2, 1), (3, 1)];
    for name in names {
        config = config.service(service(topology, mode, name, &backends));
    }
    config.to_toml()
}

fn start(path: Path, pins: &PinDir) -> (World, String) {
    let mut toml = String::new();
    let world = World::start_custom(path, 3, 3, &[1, 2, 3], |topology| {
        toml = config(topology, path.mode);
        in_netns(&topology.balancer, || Daemon::start_pinned(&toml, &pins.0))
            .expect("enter the balancer namespace")
    });
    (world, toml)
}

/// Stops the daemon with `signal` (SIGKILL, or SIGQUIT: it must exit 0 saying that the data
/// plane stays) and waits until it is gone.
fn kill(world: &mut World, path: Path, signal: Signal) {
    let mark = world.daemon.log_mark();
    world.daemon.signal(signal).expect("signal the daemon");
    let status = world
        .daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{path:?}: the daemon did not exit on {signal}"));
    if signal == Signal::SIGQUIT {
        assert!(
            status.success(),
            "{path:?}: SIGQUIT: the daemon exited with {status}"
        );
        let logs = world.daemon.logs()[mark..].join("\n");
        assert!(
            logs.contains("the data plane stays attached and pinned"),
            "{path:?}: SIGQUIT did not leave the data plane:\n{logs}"
        );
    }
}

/// 5 uploads open through the eBPF plane, `signal` (SIGKILL or SIGQUIT), new connections and more bytes during the
/// gap, the daemon started again on the same pins (it adopts them), more bytes and new
/// connections: every upload byte-complete, no new connection failed; then SIGTERM removes
/// the pins.
fn kill_and_restart(path: Path, signal: Signal) {
    let pins = PinDir(test_pin_dir());
    let (mut world, toml) = start(path, &pins);
    let set = pins.0.join(format!("v{}", lb_common::maps::LAYOUT_VERSION));
    assert!(
        set.join("CONNTRACK").exists() && set.join("VIPS").exists(),
        "{path:?}: the daemon pinned no maps under {}",
        set.display()
    );
    let links = std::fs::read_dir(&set)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
                .count()
        })
        .unwrap_or(0);
    assert!(
        links >= 1,
        "{path:?}: no link pinned under {}",
        set.display()
    );

    let mut uploads = bulk_uploads(&world, path, UPLOADS, 40);

    kill(&mut world, path, signal);
    // No daemon: established flows go on, new ones are placed on the last table.
    for (i, u) in uploads.iter_mut().enumerate() {
        u.send(GAP)
            .unwrap_or_else(|e| panic!("{path:?}: upload {i} broke while no daemon ran: {e}"));
    }
    let gap = world.client(|| {
        run(30, 3, Duration::from_secs(30), |_| {
            http_get(Topology::vip(WEB), "/")
        })
    });
    gap.assert_all_answered(&format!("{path:?}: new connections while no daemon runs"));

    world.daemon = in_netns(&world.topology.balancer, || {
        Daemon::start_pinned(&toml, &pins.0)
    })
    .expect("enter the balancer namespace");
    let logs = world.daemon.logs().join("\n");
    assert!(
        logs.contains("eBPF: adopting the data plane pinned in"),
        "{path:?}: the new daemon did not adopt the pinned set:\n{logs}"
    );
    assert!(
        logs.contains("is adopted: the new program replaced the old one in place"),
        "{path:?}: the new daemon did not take the pinned link over:\n{logs}"
    );
    for name in ["web", "bulk", "dns"] {
        assert!(
            logs.contains(&format!("service {name}: continues the adopted service id")),
            "{path:?}: {name} did not continue under its adopted id:\n{logs}"
        );
    }
    let after = world.client(|| {
        run(60, 3, Duration::from_secs(30), |_| {
            http_get(Topology::vip(WEB), "/")
        })
    });
    after.assert_all_answered(&format!("{path:?}: new connections after the restart"));
    let answering = ["b1", "b2", "b3"]
        .iter()
        .filter(|b| after.tally.get(b) > 0)
        .count();
    assert!(
        answering >= 2,
        "{path:?}: after the restart new flows are not balanced: {:?}",
        after.tally
    );
    for (i, mut u) in uploads.into_iter().enumerate() {
        u.send(AFTER)
            .unwrap_or_else(|e| panic!("{path:?}: upload {i} broke after the restart: {e}"));
        let receipt = u
            .finish()
            .unwrap_or_else(|e| panic!("{path:?}: upload {i} failed after the restart: {e}"));
        assert_eq!(
            receipt,
            Receipt::of_stream(BEFORE + GAP + AFTER, 40 + i as u64),
            "{path:?}: upload {i}, open across the kill and the restart, arrived damaged or cut"
        );
    }

    let status = world.daemon.terminate();
    assert!(
        status.success(),
        "{path:?}: the daemon exited with {status}"
    );
    assert!(
        !set.exists(),
        "{path:?}: SIGTERM left the pins under {}",
        set.display()
    );
}

/// A set pinned by a daemon of another map layout (simulated: the set's directory renamed
/// to another version) is removed with the documented warning, and the new daemon serves
/// from a fresh set.
fn other_layout(path: Path) {
    let pins = PinDir(test_pin_dir());
    let (mut world, toml) = start(path, &pins);
    kill(&mut world, path, Signal::SIGKILL);
    std::fs::rename(
        pins.0.join(format!("v{}", lb_common::maps::LAYOUT_VERSION)),
        pins.0.join("v0"),
    )
    .expect("rename the pinned set");

    world.daemon = in_netns(&world.topology.balancer, || {
        Daemon::start_pinned(&toml, &pins.0)
    })
    .expect("enter the balancer namespace");
    let logs = world.daemon.logs().join("\n");
    assert!(
        logs.contains("holds a pinned data plane of another map layout")
            && logs.contains("the flows it carried are cut"),
        "{path:?}: the old set was not replaced with the documented line:\n{logs}"
    );
    assert!(
        !logs.contains("adopting the data plane"),
        "{path:?}: a set of another layout was adopted:\n{logs}"
    );
    assert!(
        !pins.0.join("v0").exists(),
        "{path:?}: the set of another layout is still pinned"
    );
    let report = world.client(|| {
        run(30, 3, Duration::from_secs(30), |_| {
            http_get(Topology::vip(WEB), "/")
        })
    });
    report.assert_all_answered(&format!("{path:?}: new connections on the fresh set"));
}

/// A daemon killed with three services and started again with two: the third (`dns`) drains
/// as a reload would remove it, then its ids are released; the other two go on.
fn restart_without_a_service(path: Path) {
    let pins = PinDir(test_pin_dir());
    let (mut world, _) = start(path, &pins);
    kill(&mut world, path, Signal::SIGKILL);
    let toml = config_of(&world.topology, path.mode, &["web", "bulk"]);
    world.daemon = in_netns(&world.topology.balancer, || {
        Daemon::start_pinned(&toml, &pins.0)
    })
    .expect("enter the balancer namespace");
    let gone = "10.200.100.1:53 (adopted, not in the config)";
    world
        .daemon
        .wait_for_log(&format!("service {gone}: drains"), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{path:?}: the service the config lacks did not drain: {e}"));
    world
        .daemon
        .wait_for_log(
            &format!("service {gone}: drained; its XDP ids are released"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{path:?}: the service the config lacks was not released: {e}"));
    let report = world.client(|| {
        run(30, 3, Duration::from_secs(30), |_| {
            http_get(Topology::vip(WEB), "/")
        })
    });
    report.assert_all_answered(&format!("{path:?}: web after a restart without dns"));
}

/// The daemon is killed; the next one adopts `web` and writes its table, then refuses to
/// start (`refused`): new connections to `web` are still served, by the pinned plane on the
/// table it wrote.
fn failed_restart(path: Path, refused: Refused) {
    let pins = PinDir(test_pin_dir());
    let (mut world, _) = start(path, &pins);
    kill(&mut world, path, Signal::SIGKILL);
    let t = &world.topology;
    let mut config = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .global("drain_timeout", "2s")
        .service(service(t, path.mode, "web", &[(1, 1), (2, 1), (3, 1)]));
    let mut _taken = None;
    match refused {
        Refused::Placement => {
            config =
                config.service(service(t, path.mode, "bulk", &[(1, 1)]).set("interface", "l9"));
        }
        Refused::AdminAddressTaken => {
            let holder = in_netns(&t.balancer, || std::net::TcpListener::bind("127.0.0.1:0"))
                .expect("enter the balancer namespace")
                .expect("hold a port");
            let held = holder.local_addr().expect("its address").to_string();
            config = config.admin("listen", held);
            _taken = Some(holder);
        }
    }
    let toml = config.to_toml();
    let dir = pins.0.to_string_lossy().into_owned();
    let why = refused;
    let refused = in_netns(&t.balancer, || {
        Daemon::try_start_with_env(&toml, &[(lb_tests::daemon::BPF_PIN_DIR_ENV, &dir)])
    })
    .expect("enter the balancer namespace");
    assert!(
        refused.is_err(),
        "{path:?}: {why:?}: the restart was not refused"
    );
    let report = world.client(|| {
        run(30, 3, Duration::from_secs(30), |_| {
            http_get(Topology::vip(WEB), "/")
        })
    });
    report.assert_all_answered(&format!("{path:?}: web after a restart refused ({why:?})"));
}

/// A daemon runs the eBPF plane pinned in one directory, and two more are started by hand on
/// the same directory: one with eBPF services of its own (web on one backend) is refused at
/// once, naming the directory, and web stays on its three backends; one with only a proxy
/// service starts and stops without removing the pinned set, so the first daemon, killed,
/// still leaves its flows to a daemon started after it.
fn second_daemon(path: Path) {
    let pins = PinDir(test_pin_dir());
    let (mut world, toml) = start(path, &pins);
    let dir = pins.0.to_string_lossy().into_owned();
    let t = &world.topology;
    let ebpf = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .service(service(t, path.mode, "web", &[(1, 1)]))
        .to_toml();
    let refused = in_netns(&t.balancer, || {
        Daemon::try_start_with_env(&ebpf, &[(lb_tests::daemon::BPF_PIN_DIR_ENV, &dir)])
    })
    .expect("enter the balancer namespace");
    match refused {
        Ok(_) => panic!("{path:?}: a second daemon started on the pins of a running one"),
        Err(e) => assert!(
            e.to_string().contains(&format!(
                "another lb-daemon runs the eBPF data plane pinned in {dir}"
            )),
            "{path:?}: the second daemon was refused for another reason: {e}"
        ),
    }
    let report = world.client(|| {
        run(60, 3, Duration::from_secs(30), |_| {
            http_get(Topology::vip(WEB), "/")
        })
    });
    report.assert_all_answered(&format!("{path:?}: web beside a refused second daemon"));
    for b in ["b1", "b2", "b3"] {
        assert!(
            report.tally.get(b) > 0,
            "{path:?}: {b} took no new flow after a second daemon was refused: {:?}",
            report.tally
        );
    }

    let proxy_only = DaemonConfig::new()
        .service(
            lb_tests::config::ServiceConfig::tcp("other", lb_tests::ports::free_addr())
                .set("dataplane", "proxy")
                .backend("127.0.0.1:9".parse().expect("addr"), 1),
        )
        .to_toml();
    let mut other = in_netns(&t.balancer, || {
        Daemon::try_start_with_env(&proxy_only, &[(lb_tests::daemon::BPF_PIN_DIR_ENV, &dir)])
    })
    .expect("enter the balancer namespace")
    .unwrap_or_else(|e| panic!("{path:?}: a proxy-only daemon beside it did not start: {e}"));
    other
        .signal(Signal::SIGTERM)
        .expect("signal the proxy-only daemon");
    other
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{path:?}: the proxy-only daemon did not stop"));
    let logs = other.logs().join("\n");
    assert!(
        !logs.contains("removing it"),
        "{path:?}: a proxy-only daemon removed the pins of a running daemon:\n{logs}"
    );

    kill(&mut world, path, Signal::SIGKILL);
    world.daemon = in_netns(&world.topology.balancer, || {
        Daemon::start_pinned(&toml, &pins.0)
    })
    .expect("enter the balancer namespace");
    let logs = world.daemon.logs().join("\n");
    assert!(
        logs.contains("eBPF: adopting the data plane pinned in"),
        "{path:?}: after a proxy-only daemon ran beside it, the set was not there to adopt:\n{logs}"
    );
}

/// A daemon with a drain far longer than the test is stopped with SIGQUIT and started again
/// with `web` on the proxy at the same VIP (`bulk` and `dns` stay on eBPF, so the adopted
/// plane is kept): the adopted `web` lets go of its VIP at once, and new connections reach
/// the proxy within seconds, not after the drain (until then the program would answer them
/// with a RST).
fn moved_to_the_proxy(path: Path) {
    let pins = PinDir(test_pin_dir());
    let drain = "60s";
    let mut world = World::start_custom(path, 2, 2, &[1, 2], |t| {
        let toml = DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .global("drain_timeout", drain)
            .service(service(t, path.mode, "web", &[(1, 1), (2, 1)]))
            .service(service(t, path.mode, "bulk", &[(1, 1)]))
            .to_toml();
        in_netns(&t.balancer, || Daemon::start_pinned(&toml, &pins.0))
            .expect("enter the balancer namespace")
    });
    kill(&mut world, path, Signal::SIGQUIT);
    let t = &world.topology;
    // The proxy needs the VIP as a local address.
    t.balancer
        .ip(&[
            "addr",
            "add",
            &format!("{}/32", Topology::vip(WEB).ip()),
            "dev",
            "lo",
        ])
        .expect("the VIP on the balancer's loopback");
    let toml = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .global("drain_timeout", drain)
        .service(
            lb_tests::config::ServiceConfig::tcp("web-proxy", Topology::vip(WEB))
                .set("dataplane", "proxy")
                .fast_health("http")
                .backend(
                    std::net::SocketAddr::from((lb_tests::xdp::backend_ip(1), WEB)),
                    1,
                )
                .backend(
                    std::net::SocketAddr::from((lb_tests::xdp::backend_ip(2), WEB)),
                    1,
                ),
        )
        .service(service(t, path.mode, "bulk", &[(1, 1)]))
        .to_toml();
    world.daemon = in_netns(&t.balancer, || Daemon::start_pinned(&toml, &pins.0))
        .expect("enter the balancer namespace");
    world
        .client(|| {
            lb_tests::load::wait_until_each_answers(&["b1", "b2"], Duration::from_secs(10), || {
                http_get(Topology::vip(WEB), "/")
            })
        })
        .unwrap_or_else(|e| {
            panic!(
                "{path:?}: new connections to web did not reach the proxy within 10 s of the \
                 restart (the drain is {drain}): {e}\n{}",
                world.daemon.logs().join("\n")
            )
        });
}

/// `lb-daemon upgrade` while 5 uploads run through the eBPF plane: the new daemon takes the
/// old one's sockets and adopts the pinned data plane, the old one exits 0; every upload
/// arrives byte-complete and no new connection fails, before, during or after.
fn upgrade_under_load(path: Path) {
    let pins = PinDir(test_pin_dir());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("upgrade.sock");
    let mut toml = String::new();
    let mut world = World::start_custom(path, 3, 3, &[1, 2, 3], |t| {
        toml = config(t, path.mode).replacen(
            "[global]",
            &format!("[global]\nupgrade_socket = \"{}\"", socket.display()),
            1,
        );
        in_netns(&t.balancer, || Daemon::start_pinned(&toml, &pins.0))
            .expect("enter the balancer namespace")
    });
    let uploads = bulk_uploads(&world, path, UPLOADS, 60);
    let dir_env = pins.0.to_string_lossy().into_owned();
    let client = &world.topology.client;
    let balancer = &world.topology.balancer;
    let upgraded = std::sync::atomic::AtomicBool::new(false);
    let new = std::thread::scope(|s| {
        // New connections all along the upgrade, and 200 more after it.
        let during = s.spawn(|| {
            client
                .enter(|| {
                    let (mut ok, mut failed, mut after) = (0u32, Vec::new(), 0);
                    let end = std::time::Instant::now() + Duration::from_secs(60);
                    while after < 200 && std::time::Instant::now() < end {
                        if upgraded.load(std::sync::atomic::Ordering::Relaxed) {
                            after += 1;
                        }
                        match http_get(Topology::vip(WEB), "/") {
                            Ok(_) => ok += 1,
                            Err(e) => failed.push(e.to_string()),
                        }
                    }
                    (ok, failed)
                })
                .expect("enter the client namespace")
        });
        std::thread::sleep(Duration::from_millis(200));
        let new = in_netns(balancer, || {
            Daemon::try_upgrade(&toml, &[(lb_tests::daemon::BPF_PIN_DIR_ENV, &dir_env)])
        })
        .expect("enter the balancer namespace")
        .unwrap_or_else(|e| panic!("{path:?}: lb-daemon upgrade did not start: {e}"));
        upgraded.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = during.join().expect("the load thread");
        assert!(
            failed.is_empty() && ok >= 200,
            "{path:?}: {} of {} new connections failed across the upgrade: {:?}",
            failed.len(),
            ok as usize + failed.len(),
            failed.first()
        );
        new
    });
    let status = world
        .daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{path:?}: the old daemon did not exit after the upgrade"));
    assert!(
        status.success(),
        "{path:?}: the old daemon exited with {status}"
    );
    let logs = new.logs().join("\n");
    assert!(
        logs.contains("eBPF: adopting the data plane pinned in"),
        "{path:?}: the new daemon did not adopt the pinned set:\n{logs}"
    );
    world.daemon = new;
    // The old daemon is gone: the pin directory's lock is the one it handed over.
    let second = in_netns(&world.topology.balancer, || {
        Daemon::try_start_with_env(&toml, &[(lb_tests::daemon::BPF_PIN_DIR_ENV, &dir_env)])
    })
    .expect("enter the balancer namespace");
    match second {
        Ok(_) => panic!("{path:?}: after the upgrade a daemon started by hand took its pins"),
        Err(e) => assert!(
            e.to_string()
                .contains("another lb-daemon runs the eBPF data plane"),
            "{path:?}: a daemon started by hand after the upgrade was refused for another \
             reason: {e}"
        ),
    }
    finish_uploads(uploads, path, 60, "upgrade");
}

/// The second local address of [`restart_with_a_second_local_address`]; the balancer need
/// not own it: the backends' replies to it reach the balancer by their default route, and
/// the program translates them.
const SECOND_LOCAL: &str = "10.200.0.3";

/// A daemon stopped with SIGQUIT and started again with a second local address for `web`
/// (a reload refuses that change; a restart is how it is made): `web` continues its adopted
/// service id, and every new connection is answered, those whose hash names the second
/// address included.
fn restart_with_a_second_local_address(path: Path) {
    let pins = PinDir(test_pin_dir());
    let (mut world, _) = start(path, &pins);
    kill(&mut world, path, Signal::SIGQUIT);
    let local = toml::Value::Array(
        [
            lb_tests::xdp::BALANCER.to_string(),
            SECOND_LOCAL.to_string(),
        ]
        .into_iter()
        .map(toml::Value::String)
        .collect(),
    );
    let backends = [(1, 1), (2, 1), (3, 1)];
    let toml = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .global("drain_timeout", "2s")
        .service(service(&world.topology, path.mode, "web", &backends).set("local_address", local))
        .service(service(&world.topology, path.mode, "bulk", &backends))
        .service(service(&world.topology, path.mode, "dns", &backends))
        .to_toml();
    world.daemon = in_netns(&world.topology.balancer, || {
        Daemon::start_pinned(&toml, &pins.0)
    })
    .expect("enter the balancer namespace");
    let logs = world.daemon.logs().join("\n");
    assert!(
        logs.contains("service web: continues the adopted service id"),
        "{path:?}: web did not continue under its adopted id:\n{logs}"
    );
    let report = world.client(|| {
        run(60, 3, Duration::from_secs(60), |_| {
            http_get(Topology::vip(WEB), "/")
        })
    });
    report.assert_all_answered(&format!(
        "{path:?}: new connections after a restart that added the local address {SECOND_LOCAL}"
    ));
}

/// `n` uploads through `bulk` (seeds `seed`, `seed + 1`, ...), each `BEFORE` bytes in.
fn bulk_uploads(world: &World, path: Path, n: u64, seed: u64) -> Vec<Upload> {
    (seed..seed + n)
        .map(|seed| {
            world
                .client(|| -> Result<Upload, lb_tests::client::ClientError> {
                    let mut u = Upload::start(Topology::vip(BULK), seed)?;
                    u.send(BEFORE)?;
                    Ok(u)
                })
                .unwrap_or_else(|e| panic!("{path:?}: upload {seed} could not start: {e}"))
        })
        .collect()
}

/// Sends `AFTER` more bytes on each of `uploads` (made by [`bulk_uploads`] from `seed`) and
/// checks that each arrives byte-complete across `what` (an upgrade, a restart).
fn finish_uploads(uploads: Vec<Upload>, path: Path, seed: u64, what: &str) {
    for (i, mut u) in uploads.into_iter().enumerate() {
        u.send(AFTER)
            .unwrap_or_else(|e| panic!("{path:?}: upload {i} broke after the {what}: {e}"));
        let receipt = u
            .finish()
            .unwrap_or_else(|e| panic!("{path:?}: upload {i} failed after the {what}: {e}"));
        assert_eq!(
            receipt,
            Receipt::of_stream(BEFORE + AFTER, seed + i as u64),
            "{path:?}: upload {i}, open across the {what}, arrived damaged or cut"
        );
    }
}

/// `bulk`, translating from two local addresses, carries 16 long uploads (hashed over both
/// addresses) when the daemon stops with SIGQUIT, and the next config lacks `bulk`: it drains
/// as a removed service, and every upload, from either address, arrives byte-complete (the
/// drain wrote back a service entry that counted one address: the flows of the second were
/// translated from the first, and cut).
fn restart_without_a_two_address_service(path: Path) {
    // All on the first address (the test then proves nothing): one chance in 65,536.
    const TWO_ADDRESS_UPLOADS: u64 = 16;
    let pins = PinDir(test_pin_dir());
    let backends = [(1, 1), (2, 1), (3, 1)];
    let config = |topology: &Topology, with_bulk: bool| {
        let local = toml::Value::Array(
            [
                lb_tests::xdp::BALANCER.to_string(),
                SECOND_LOCAL.to_string(),
            ]
            .into_iter()
            .map(toml::Value::String)
            .collect(),
        );
        let mut config = DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .global("drain_timeout", "60s")
            .service(service(topology, path.mode, "web", &backends));
        if with_bulk {
            config = config.service(
                service(topology, path.mode, "bulk", &backends).set("local_address", local),
            );
        }
        config.to_toml()
    };
    let mut world = World::start_custom(path, 3, 3, &[1, 2, 3], |topology| {
        let toml = config(topology, true);
        in_netns(&topology.balancer, || Daemon::start_pinned(&toml, &pins.0))
            .expect("enter the balancer namespace")
    });
    let uploads = bulk_uploads(&world, path, TWO_ADDRESS_UPLOADS, 60);
    kill(&mut world, path, Signal::SIGQUIT);
    let toml = config(&world.topology, false);
    world.daemon = in_netns(&world.topology.balancer, || {
        Daemon::start_pinned(&toml, &pins.0)
    })
    .expect("enter the balancer namespace");
    let gone = format!("{} (adopted, not in the config)", Topology::vip(BULK));
    world
        .daemon
        .wait_for_log(&format!("service {gone}: drains"), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{path:?}: the service the config lacks did not drain: {e}"));
    finish_uploads(uploads, path, 60, "restart");
}

/// `web` renamed `web2` by a reload (a new service at the VIP, the old one draining behind
/// it, its VIP passed on), then a SIGQUIT restart within the drain: the new daemon keeps
/// the old service's id reserved until it drains, then releases it (its clients' counts
/// deleted), and `web2` goes on.
fn restart_while_a_renamed_service_drains(path: Path) {
    let pins = PinDir(test_pin_dir());
    let backends = [(1, 1), (2, 1), (3, 1)];
    let config = |topology: &Topology, web: &str, drain: &str| {
        DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .global("drain_timeout", drain)
            .service(
                service(topology, path.mode, "web", &backends)
                    .set("name", toml::Value::String(web.into())),
            )
            .service(service(topology, path.mode, "bulk", &backends))
            .to_toml()
    };
    let mut world = World::start_custom(path, 3, 3, &[1, 2, 3], |topology| {
        let toml = config(topology, "web", "1h");
        in_netns(&topology.balancer, || Daemon::start_pinned(&toml, &pins.0))
            .expect("enter the balancer namespace")
    });
    world
        .daemon
        .rewrite_config(&config(&world.topology, "web2", "1h"));
    let mark = world.daemon.log_mark();
    world
        .daemon
        .signal(Signal::SIGHUP)
        .expect("the daemon runs");
    let (_, line) = world
        .daemon
        .wait_for_log_after(mark, "reload of", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{path:?}: no reload: {e}"));
    assert!(
        line.contains("applied"),
        "{path:?}: the rename was refused: {line}"
    );
    kill(&mut world, path, Signal::SIGQUIT);

    let toml = config(&world.topology, "web2", "2s");
    world.daemon = in_netns(&world.topology.balancer, || {
        Daemon::start_pinned(&toml, &pins.0)
    })
    .expect("enter the balancer namespace");
    let line = world
        .daemon
        .wait_for_log("was draining (its VIP passed on)", Duration::from_secs(5))
        .unwrap_or_else(|e| {
            panic!("{path:?}: the draining web's service id was not kept reserved: {e}")
        });
    let id = line
        .split("the adopted service id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{path:?}: no service id in: {line}"))
        .to_string();
    let released = format!(
        "service id {id} (adopted, draining, its VIP passed on): drained; its XDP id is released"
    );
    world
        .daemon
        .wait_for_log(&released, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{path:?}: the draining web's id was not released: {e}"));
    let report = world.client(|| {
        run(30, 3, Duration::from_secs(30), |_| {
            http_get(Topology::vip(WEB), "/")
        })
    });
    report.assert_all_answered(&format!("{path:?}: web2 after the restart"));
}
