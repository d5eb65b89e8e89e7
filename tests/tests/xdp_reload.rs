//! Reloads and DNS discovery on the XDP data plane, end to end (`nat`, see `lb_tests::xdp`):
//! backends added, removed and reweighted under load with nothing dropped and the program
//! never detached; DNS records followed into the maps; services added on XDP and drained
//! out of it by a reload; two VIPs on one port, each keeping its service as the other
//! leaves and comes back.
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lb_tests::admin::{self, cli};
use lb_tests::client::{http_get, upload, Upload};
use lb_tests::config::DaemonConfig;
use lb_tests::data::Receipt;
use lb_tests::load::wait_until_each_answers;
use lb_tests::xdp::world::{service, World, BULK, WEB};
use lb_tests::xdp::{backend_ip, bpf_object, in_netns, Mode, Path as EbpfPath, Plane, Topology};
use lb_tests::{require_root, Daemon};
use nix::sys::signal::Signal;

const MODE: Mode = Mode::Nat;
/// Time between reloads.
const STEP: Duration = Duration::from_secs(2);
const UPLOADS: u64 = 5;
const PIECE: u64 = 64 * 1024;
/// How long the test waits for the daemon to act (it acts within a poll or an interval).
const FOLLOW: Duration = Duration::from_secs(10);

fn web_vip() -> SocketAddr {
    Topology::vip(WEB)
}

fn bulk_vip() -> SocketAddr {
    Topology::vip(BULK)
}

fn backend(i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(backend_ip(i)), port)
}

/// The config: `web` and, when given, `bulk`, each with backends `(i, weight)`.
fn config(
    t: &Topology,
    drain: &str,
    web: &[(usize, u32)],
    bulk: Option<&[(usize, u32)]>,
) -> String {
    let mut c = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .global("drain_timeout", drain)
        .service(service(t, MODE, "web", web));
    if let Some(bulk) = bulk {
        c = c.service(service(t, MODE, "bulk", bulk));
    }
    c.to_toml()
}

/// A world of `n` backends, all with servers, and the daemon on `toml(topology)`, on XDP.
fn start(n: usize, checked: &[usize], toml: impl FnOnce(&Topology) -> String) -> World {
    start_at(Plane::Xdp, n, checked, toml)
}

/// [`start`] with the services at `plane`'s hook.
fn start_at(
    plane: Plane,
    n: usize,
    checked: &[usize],
    toml: impl FnOnce(&Topology) -> String,
) -> World {
    let path = EbpfPath { plane, mode: MODE };
    World::start_custom(path, n, n, checked, |t| {
        t.resolve_neighbours(WEB);
        let toml = toml(t);
        in_netns(&t.balancer, || Daemon::start(&toml)).expect("enter the balancer namespace")
    })
}

/// `/status` (the admin API listens in the balancer's namespace).
fn status(world: &World) -> serde_json::Value {
    let api = world.daemon.admin_addr();
    in_netns(&world.topology.balancer, || admin::status(api)).expect("enter the balancer namespace")
}

/// `lb-daemon reload`, run in the balancer's namespace.
fn cli_reload(world: &World) -> lb_tests::admin::CliOutcome {
    let api = world.daemon.admin_addr().to_string();
    in_netns(&world.topology.balancer, || cli(&api, &["reload"]))
        .expect("enter the balancer namespace")
}

/// Reloads by SIGHUP (`sighup`) or `lb-daemon reload`, asserts it was applied, and returns
/// the log mark taken before it.
fn reload(world: &World, text: &str, sighup: bool, what: &str) -> usize {
    let daemon = &world.daemon;
    daemon.rewrite_config(text);
    let mark = daemon.log_mark();
    if sighup {
        daemon.signal(Signal::SIGHUP).expect("the daemon runs");
    } else {
        let out = cli_reload(world);
        assert_eq!(
            out.code,
            Some(0),
            "`lb-daemon reload` ({what}) failed: {out:?}"
        );
    }
    let (_, line) = daemon
        .wait_for_log_after(mark, "reload of", FOLLOW)
        .unwrap_or_else(|e| panic!("no reload ({what}): {e}"));
    assert!(
        line.contains("applied"),
        "the reload ({what}) was refused: {line}"
    );
    mark
}

/// Waits for a new XDP table of `service` after log mark `mark`.
fn wait_for_table(world: &World, mark: usize, service: &str, what: &str) {
    let table = format!("service {service}: XDP table generation");
    world
        .daemon
        .wait_for_log_after(mark, &table, FOLLOW)
        .unwrap_or_else(|e| panic!("no new XDP table of {service} after {what}: {e}"));
}

/// `GET /` on a new connection: `"name@port"`, the answering backend's name and the client's
/// local port (a port used twice meets its old conntrack entry).
fn get_with_port(vip: SocketAddr) -> Result<String, lb_tests::client::ClientError> {
    use std::io::{Read, Write};
    let mut s = lb_tests::client::connect(vip)?;
    let port = s.local_addr()?.port();
    s.write_all(b"GET / HTTP/1.1\r\nHost: lb-test\r\nConnection: close\r\n\r\n")?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let text = String::from_utf8_lossy(&all);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(format!("{body}@{port}"))
}

/// The placement words `/status` shows for `service`.
fn dataplane(world: &World, service: &str) -> String {
    let st = status(world);
    st["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == service))
        .and_then(|s| s["dataplane"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn reloads_under_load_on_xdp_drop_nothing_and_keep_the_program_attached() {
    if require_root("xdp_reload::reloads_under_load_on_xdp_drop_nothing") {
        reloads_under_load(Plane::Xdp);
    }
}

#[test]
fn reloads_under_load_on_tc_drop_nothing_and_keep_the_program_attached() {
    if require_root("xdp_reload::reloads_under_load_on_tc_drop_nothing") {
        reloads_under_load(Plane::Tc);
    }
}

fn reloads_under_load(plane: Plane) {
    let mut web = vec![(1, 1), (2, 1)];
    let mut bulk = vec![(1, 1), (2, 1)];
    // Long enough that no removed bulk backend's uploads are cut during the test.
    let drain = "120s";
    let world = start_at(plane, 4, &[1, 2], |t| config(t, drain, &web, Some(&bulk)));
    let prog = |w: &World| -> Vec<Option<u64>> {
        ["l0", "l1", "l2", "l3", "l4"]
            .iter()
            .map(|i| w.topology.prog_id(i))
            .collect()
    };
    let progs = prog(&world);
    assert!(
        progs.iter().all(Option::is_some),
        "{plane:?}: the balancer program is not attached to every interface: {progs:?}"
    );
    // How the placement names the hook.
    let hook = match plane {
        Plane::Xdp => "XDP",
        Plane::Tc => "(tc)",
    };

    let stop = AtomicBool::new(false);
    // (when the request started, who answered) of every request; failures in words.
    let answers: Mutex<Vec<(Instant, String)>> = Mutex::default();
    let failures: Mutex<Vec<String>> = Mutex::default();
    let uploads = std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                in_netns(&world.topology.client, || {
                    let end = Instant::now() + Duration::from_secs(90);
                    for _ in 0..100_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > end {
                            break;
                        }
                        let at = Instant::now();
                        match get_with_port(web_vip()) {
                            Ok(who) => answers.lock().expect("lock").push((at, who)),
                            Err(e) => failures.lock().expect("lock").push(e.to_string()),
                        }
                        // Paced: NAT never frees a SNAT port before its NAT_REVERSE entry is
                        // evicted, so the flows of the test must stay well within the range.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
                .expect("enter the client namespace");
            });
        }
        let uploads: Vec<_> = (0..UPLOADS)
            .map(|seed| {
                let (stop, client) = (&stop, &world.topology.client);
                scope.spawn(move || {
                    in_netns(client, || {
                        let mut u = Upload::start(bulk_vip(), seed)
                            .map_err(|e| format!("upload {seed} could not connect: {e}"))?;
                        for _ in 0..2_000 {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            u.send(PIECE).map_err(|e| {
                                format!("upload {seed} was cut after {} bytes: {e}", u.sent())
                            })?;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        let sent = u.sent();
                        let got = u
                            .finish()
                            .map_err(|e| format!("upload {seed} got no receipt: {e}"))?;
                        Ok::<_, String>((seed, sent, got))
                    })
                    .expect("enter the client namespace")
                })
            })
            .collect();

        let t = &world.topology;
        let mut sighup = false;
        // Reloads, waits for web's new table when `web_changes`, and returns when that
        // was, before a pause.
        let mut step = |web: &[(usize, u32)], bulk: &[(usize, u32)], what: &str| -> Instant {
            sighup = !sighup;
            let mark = reload(&world, &config(t, drain, web, Some(bulk)), sighup, what);
            if what.starts_with("web") {
                wait_for_table(&world, mark, "web", what);
            }
            let applied = Instant::now();
            std::thread::sleep(STEP);
            applied
        };
        std::thread::sleep(STEP);
        web.push((3, 2));
        step(&web, &bulk, "web: add b3");
        web[0].1 = 5;
        step(&web, &bulk, "web: reweight b1 to 5");
        web.retain(|&(i, _)| i != 2);
        let b2_removed = step(&web, &bulk, "web: remove b2");

        // The invalid file: refused with the reason, the running config stays.
        let good = config(t, drain, &web, Some(&bulk));
        world
            .daemon
            .rewrite_config(&good.replacen("weight = 5", "weight = 999", 1));
        let out = cli_reload(&world);
        assert_eq!(
            out.code,
            Some(1),
            "an invalid file must be refused: {out:?}"
        );
        assert!(
            out.stderr.contains("999") && out.stderr.contains("weight"),
            "the refusal should say what is wrong in the file: {out:?}"
        );
        std::thread::sleep(STEP);

        bulk.retain(|&(i, _)| i != 1);
        bulk.push((3, 1));
        step(&web, &bulk, "bulk: remove b1, add b3");
        web.push((4, 1));
        step(&web, &bulk, "web: add b4");
        bulk[0].1 = 3;
        step(&web, &bulk, "bulk: reweight b2 to 3");
        // Flows that begin from here may reach b2 again.
        let b2_back = Instant::now();
        web.push((2, 1));
        step(&web, &bulk, "web: b2 back");
        bulk.push((1, 2));
        step(&web, &bulk, "bulk: b1 back with weight 2");
        web.retain(|&(i, _)| i != 1);
        web[0].1 = 4;
        step(&web, &bulk, "web: remove b1, reweight b3 to 4");

        stop.store(true, Ordering::Relaxed);
        let uploads: Vec<_> = uploads
            .into_iter()
            .map(|u| u.join().expect("upload thread"))
            .collect();
        (uploads, b2_removed, b2_back)
    });
    let (uploads, b2_removed, b2_back) = uploads;

    let failed = failures.lock().expect("lock").clone();
    let answers = answers.lock().expect("lock").clone();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed during the reloads; first: {:?}",
        failed.len(),
        failed.len() + answers.len(),
        failed.first()
    );
    assert!(
        answers.len() > 500,
        "only {} requests were made",
        answers.len()
    );
    let answers: Vec<(Instant, String, String)> = answers
        .into_iter()
        .map(|(at, w)| {
            let (who, port) = w.split_once('@').unwrap_or((&w, ""));
            (at, who.to_string(), port.to_string())
        })
        .collect();
    let to_b2: Vec<(Duration, &str, usize)> = answers
        .iter()
        .filter(|(at, who, _)| *at > b2_removed && *at < b2_back && who == "b2")
        .map(|(at, _, port)| {
            let uses = answers
                .iter()
                .filter(|(a, _, p)| p == port && a < at)
                .count();
            (*at - b2_removed, port.as_str(), uses)
        })
        .collect();
    assert!(
        to_b2.is_empty(),
        "b2 got {} new connections after the reload that removed it (after, client port, \
         earlier uses of that port): {:?}",
        to_b2.len(),
        &to_b2[..to_b2.len().min(10)]
    );
    let answered_by: BTreeSet<&str> = answers.iter().map(|(_, w, _)| w.as_str()).collect();
    assert!(
        answered_by.contains("b3") && answered_by.contains("b4"),
        "the backends added by reloads never answered: {answered_by:?}"
    );
    for u in uploads {
        let (seed, sent, got) = u.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            got,
            Receipt::of_stream(sent, seed),
            "upload {seed} arrived truncated or damaged after the reloads"
        );
    }
    let st = status(&world);
    assert_eq!(
        st["reloads"]["succeeded"], 9,
        "reloads applied: {}",
        st["reloads"]
    );
    assert_eq!(
        st["reloads"]["failed"], 1,
        "reloads refused: {}",
        st["reloads"]
    );
    assert!(
        dataplane(&world, "web").contains(hook) && dataplane(&world, "bulk").contains(hook),
        "after the reloads the services should still run on {plane:?}: {:?}",
        st["services"]
    );
    assert_eq!(
        prog(&world),
        progs,
        "the {plane:?} program on the interfaces changed during the reloads"
    );
}

#[test]
fn a_service_added_by_reload_runs_on_xdp_and_a_removed_one_drains() {
    if !require_root("xdp_reload::a_service_added_by_reload_runs_on_xdp") {
        return;
    }
    let world = start(2, &[1, 2], |t| config(t, "8s", &[(1, 1), (2, 1)], None));
    let t = &world.topology;
    let with_bulk = config(t, "8s", &[(1, 1), (2, 1)], Some(&[(1, 1), (2, 1)]));
    let prog = world.topology.xdp_prog_id("l0");
    assert!(prog.is_some(), "lb_xdp is not attached to l0");

    reload(&world, &with_bulk, true, "add service bulk");
    let words = dataplane(&world, "bulk");
    assert!(
        words.contains("XDP"),
        "a service added by reload should run on XDP: {words}"
    );
    // The VIP is on no interface of the balancer: only XDP can answer it.
    let receipt = world
        .client(|| upload(bulk_vip(), 1024 * 1024, 3))
        .unwrap_or_else(|e| panic!("an upload to the added service failed: {e}"));
    assert_eq!(receipt, Receipt::of_stream(1024 * 1024, 3));

    let mut long = world
        .client(|| -> Result<Upload, lb_tests::client::ClientError> {
            let mut u = Upload::start(bulk_vip(), 9)?;
            u.send(PIECE)?;
            Ok(u)
        })
        .unwrap_or_else(|e| panic!("the long upload could not start: {e}"));
    let removed = reload(
        &world,
        &config(t, "8s", &[(1, 1), (2, 1)], None),
        false,
        "remove bulk",
    );
    for _ in 0..10 {
        long.send(PIECE)
            .unwrap_or_else(|e| panic!("the upload to the removed service was cut: {e}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = long.sent();
    let got = long
        .finish()
        .unwrap_or_else(|e| panic!("the draining upload got no receipt: {e}"));
    assert_eq!(
        got,
        Receipt::of_stream(sent, 9),
        "the upload to the removed service arrived truncated while it drained"
    );
    // Still draining (8 s): the VIP is in the maps, its table empty.
    let refused = world.client(|| {
        std::net::TcpStream::connect_timeout(&bulk_vip(), Duration::from_secs(1)).is_err()
    });
    assert!(refused, "the removed service still took a new connection");
    let st = status(&world);
    assert!(
        st["removed_services"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["name"] == "bulk")),
        "/status does not show the removed service while it drains: {st}"
    );
    world
        .daemon
        .wait_for_log_after(removed, "service bulk: drained", FOLLOW)
        .unwrap_or_else(|e| panic!("the removed service never left the XDP maps: {e}"));
    world
        .client(|| http_get(web_vip(), "/"))
        .expect("web still answers");

    // An `xdp` service that cannot be placed fails the reload, and nothing of it remains.
    let nowhere = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .global("drain_timeout", "8s")
        .service(service(t, MODE, "web", &[(1, 1), (2, 1)]))
        .service(service(t, MODE, "bulk", &[(1, 1)]).set("interface", "l9"))
        .to_toml();
    world.daemon.rewrite_config(&nowhere);
    let out = cli_reload(&world);
    assert_eq!(
        out.code,
        Some(1),
        "a reload adding an xdp service on a missing interface must be refused: {out:?}"
    );
    assert!(
        out.stderr.contains("bulk") && out.stderr.contains("no interface l9"),
        "the refusal should name the service and the reason: {out:?}"
    );
    let st = status(&world);
    let names: Vec<&str> = st["services"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        names,
        vec!["web"],
        "the refused reload left services behind"
    );
    assert!(
        world.client(|| {
            std::net::TcpStream::connect_timeout(&bulk_vip(), Duration::from_secs(1)).is_err()
        }),
        "the refused service took a connection"
    );
    world
        .client(|| http_get(web_vip(), "/"))
        .expect("web still answers after the refused reload");

    // A running `nat` service given a backend whose replies could not come back through the
    // program (here an address of the balancer itself) refuses the reload; `web` goes on
    // with the backends it had.
    let local: SocketAddr = "127.0.0.1:80".parse().expect("literal");
    let onto_the_host = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .global("drain_timeout", "8s")
        .service(service(t, MODE, "web", &[(1, 1), (2, 1)]).backend(local, 1))
        .to_toml();
    world.daemon.rewrite_config(&onto_the_host);
    let out = cli_reload(&world);
    assert_eq!(
        out.code,
        Some(1),
        "a reload giving an eBPF nat service a backend on the host itself must be refused: \
         {out:?}"
    );
    assert!(
        out.stderr.contains("web")
            && out
                .stderr
                .contains("127.0.0.1:80 is an address of this host"),
        "the refusal should name the service, the backend and the reason: {out:?}"
    );
    let backends: Vec<String> = status(&world)["services"][0]["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["address"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !backends.iter().any(|b| b == "127.0.0.1:80") && backends.len() == 2,
        "the refused reload changed web's backends: {backends:?}"
    );
    world
        .client(|| http_get(web_vip(), "/"))
        .expect("web still answers after the second refused reload");

    // At the XDP hook the program sends only out of the service's interfaces: a backend
    // routed out of a macvlan over l1 (whose replies would come in on l1) is refused too.
    let balancer = &world.topology.balancer;
    balancer
        .ip(&[
            "link", "add", "link", "l1", "name", "mv1", "type", "macvlan",
        ])
        .expect("a macvlan over l1");
    balancer
        .ip(&["addr", "add", "10.200.77.1/24", "dev", "mv1"])
        .expect("its address");
    balancer.ip(&["link", "set", "mv1", "up"]).expect("mv1 up");
    let behind: SocketAddr = "10.200.77.2:80".parse().expect("literal");
    let over_a_macvlan = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .global("drain_timeout", "8s")
        .service(service(t, MODE, "web", &[(1, 1), (2, 1)]).backend(behind, 1))
        .to_toml();
    world.daemon.rewrite_config(&over_a_macvlan);
    let out = cli_reload(&world);
    assert_eq!(
        out.code,
        Some(1),
        "a reload giving an XDP service a backend XDP cannot send to must be refused: {out:?}"
    );
    assert!(
        out.stderr.contains("10.200.77.2:80 is routed out of mv1"),
        "the refusal should name the backend and the device: {out:?}"
    );
    world
        .client(|| http_get(web_vip(), "/"))
        .expect("web still answers after the third refused reload");
    assert_eq!(
        world.topology.xdp_prog_id("l0"),
        prog,
        "the XDP program on l0 changed"
    );
}

/// A second VIP of the balancer, which the client routes to it like the first.
const VIP2: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 200, 100, 2);

/// `web` on the VIP with backend 1 (when `first`), and `web2` on [`VIP2`] at the same port
/// with backend 2 (when `second`), both on tc.
fn two_vips(t: &Topology, first: bool, second: bool) -> String {
    let mut c = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .global("drain_timeout", "2s");
    if first {
        c = c.service(service(t, MODE, "web", &[(1, 1)]));
    }
    if second {
        c = c.service(
            service(t, MODE, "web", &[(2, 1)])
                .set("name", "web2")
                .set("listen", SocketAddr::new(IpAddr::V4(VIP2), WEB).to_string()),
        );
    }
    c.to_toml()
}

#[test]
fn two_vips_on_one_port_keep_their_backends_as_either_comes_and_goes() {
    if !require_root("xdp_reload::two_vips_on_one_port") {
        return;
    }
    let world = start_at(Plane::Tc, 2, &[1, 2], |t| two_vips(t, true, true));
    let t = &world.topology;
    t.client
        .ip(&[
            "route",
            "add",
            &format!("{VIP2}/32"),
            "via",
            &lb_tests::xdp::BALANCER.to_string(),
        ])
        .expect("client route to the second VIP");
    let vip2 = SocketAddr::new(IpAddr::V4(VIP2), WEB);
    // Who answers 20 new connections to `vip`, each of which must succeed.
    let answers = |vip: SocketAddr, when: &str| -> BTreeSet<String> {
        world.client(|| {
            (0..20)
                .map(|k| {
                    http_get(vip, "/")
                        .unwrap_or_else(|e| panic!("request {k} to {vip} failed ({when}): {e}"))
                })
                .collect()
        })
    };
    let refused = |vip: SocketAddr| {
        world.client(|| std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(1)).is_err())
    };
    let only = |name: &str| BTreeSet::from([name.to_string()]);
    assert_eq!(answers(web_vip(), "both running"), only("b1"));
    assert_eq!(answers(vip2, "both running"), only("b2"));

    // `web` leaves: its VIP takes no new connection, and `web2` on the same port goes on,
    // while `web` drains and once it is gone.
    let mark = reload(&world, &two_vips(t, false, true), false, "remove web");
    assert_eq!(answers(vip2, "web draining"), only("b2"));
    world
        .daemon
        .wait_for_log_after(mark, "service web: drained", FOLLOW)
        .unwrap_or_else(|e| panic!("the removed service never left the maps: {e}"));
    assert!(refused(web_vip()), "the removed service took a connection");
    assert_eq!(answers(vip2, "web gone"), only("b2"));

    // `web` comes back beside `web2`, then `web2` leaves and `web` goes on.
    reload(&world, &two_vips(t, true, true), true, "add web again");
    assert_eq!(answers(web_vip(), "web back"), only("b1"));
    assert_eq!(answers(vip2, "web back"), only("b2"));
    let mark = reload(&world, &two_vips(t, true, false), true, "remove web2");
    world
        .daemon
        .wait_for_log_after(mark, "service web2: drained", FOLLOW)
        .unwrap_or_else(|e| panic!("the removed service never left the maps: {e}"));
    assert!(refused(vip2), "the removed service took a connection");
    assert_eq!(answers(web_vip(), "web2 gone"), only("b1"));
}

const NAME: &str = "app.lb-test";
const INTERVAL: Duration = Duration::from_millis(300);

fn hosts(path: &Path, backends: &[usize]) {
    let mut text = String::from("127.0.0.1 localhost\n");
    for &i in backends {
        text.push_str(&format!("{} {NAME}\n", backend_ip(i)));
    }
    // In place: the daemon's /etc/hosts is a bind mount of this very file.
    std::fs::write(path, text).expect("the test's hosts file is writable");
}

/// Three backends, servers on the first `running`, and a daemon in its own mount namespace
/// (its `/etc/hosts` is `hosts_file`, its config in `dir`) whose `web` has the backends
/// [`NAME`] resolves to every 300 ms, changed by `custom`; a removed backend drains for 2 s.
fn start_named(
    dir: &Path,
    hosts_file: &Path,
    running: usize,
    custom: impl FnOnce(lb_tests::config::ServiceConfig) -> lb_tests::config::ServiceConfig,
) -> World {
    let config_file = dir.join("lb.toml");
    let wrapper = lb_tests::daemon::private_hosts_wrapper(dir, hosts_file);
    World::start_custom(MODE, 3, running, &[], |t| {
        t.resolve_neighbours(WEB);
        let web = service(t, MODE, "web", &[])
            .set("resolve_interval", "300ms")
            .backend_named(&format!("{NAME}:{WEB}"), 1);
        let toml = DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .global("drain_timeout", "2s")
            .service(custom(web))
            .to_toml();
        lb_tests::xdp::spawn_with_hosts(&t.balancer, &wrapper, &config_file, &toml)
    })
}

/// Answers of 60 new connections to `web`, by backend.
fn who_answers(world: &World) -> BTreeSet<String> {
    world.client(|| {
        (0..60)
            .map(|k| {
                http_get(web_vip(), "/")
                    .unwrap_or_else(|e| panic!("request {k} through the VIP failed: {e}"))
            })
            .collect()
    })
}

#[test]
fn dns_named_backends_on_xdp_follow_the_records() {
    if !require_root("xdp_reload::dns_named_backends_on_xdp_follow_the_records") {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let hosts_file = dir.path().join("hosts");
    hosts(&hosts_file, &[1, 2]);
    let world = start_named(dir.path(), &hosts_file, 3, |web| web);
    let words = dataplane(&world, "web");
    assert!(words.contains("XDP"), "web should run on XDP: {words}");
    world
        .client(|| wait_until_each_answers(&["b1", "b2"], FOLLOW, || http_get(web_vip(), "/")))
        .unwrap_or_else(|e| panic!("both resolved backends should answer through XDP: {e}"));

    // b1 vanishes, b3 appears.
    let mark = world.daemon.log_mark();
    let changed = Instant::now();
    hosts(&hosts_file, &[2, 3]);
    let (at, _) = world
        .daemon
        .wait_for_log_after(mark, &format!("{NAME}:{WEB} resolves to"), FOLLOW)
        .unwrap_or_else(|e| panic!("the daemon did not see the new records: {e}"));
    wait_for_table(&world, at, "web", "the new records");
    let took = changed.elapsed();
    assert!(
        took < INTERVAL + Duration::from_secs(2),
        "the XDP table followed the records only after {took:?} (interval {INTERVAL:?})"
    );
    world
        .client(|| wait_until_each_answers(&["b2", "b3"], FOLLOW, || http_get(web_vip(), "/")))
        .unwrap_or_else(|e| panic!("the backends of the new records should answer: {e}"));
    let seen = who_answers(&world);
    assert!(
        !seen.contains("b1"),
        "a vanished record's backend got new connections through XDP: {seen:?}"
    );
    let removed = backend(1, WEB);
    world
        .daemon
        .wait_for_log_after(
            mark,
            &format!("backend {removed} drained; XDP backend id"),
            FOLLOW,
        )
        .unwrap_or_else(|e| panic!("b1's XDP backend id was not released after the drain: {e}"));

    // b1 comes back.
    let mark = world.daemon.log_mark();
    hosts(&hosts_file, &[1, 2, 3]);
    let (at, _) = world
        .daemon
        .wait_for_log_after(mark, &format!("{NAME}:{WEB} resolves to"), FOLLOW)
        .unwrap_or_else(|e| panic!("the daemon did not see the new records: {e}"));
    wait_for_table(&world, at, "web", "b1's record back");
    world
        .client(|| {
            wait_until_each_answers(&["b1", "b2", "b3"], FOLLOW, || http_get(web_vip(), "/"))
        })
        .unwrap_or_else(|e| panic!("all three resolved backends should answer: {e}"));
}

/// A backend that DNS adds to a running service takes no flow before its first health check
/// passes. A record appears for b3, whose server does not run yet (a container whose process
/// is still starting) while one client connects without pause: no connection fails and none
/// goes to b3. Before, b3 took its share of new flows until `fall` checks failed; the program
/// drops b3's refusal (`drop_refused_syn`), so each such client waited a second for its
/// resent SYN, which then went elsewhere. Once its server runs, b3 comes up and answers.
#[test]
fn a_backend_dns_adds_takes_no_flow_before_its_first_check() {
    if !require_root("xdp_reload::a_backend_dns_adds_takes_no_flow_before_its_first_check") {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let hosts_file = dir.path().join("hosts");
    hosts(&hosts_file, &[1, 2]);
    let mut world = start_named(dir.path(), &hosts_file, 2, |web| web);
    world
        .client(|| wait_until_each_answers(&["b1", "b2"], FOLLOW, || http_get(web_vip(), "/")))
        .unwrap_or_else(|e| panic!("both resolved backends should answer: {e}"));

    let mark = world.daemon.log_mark();
    let (answered, failed, slowest) = world.client(|| {
        let start = Instant::now();
        let (mut answered, mut failed, mut slowest) = (0_u32, Vec::new(), Duration::ZERO);
        let mut added = false;
        while start.elapsed() < Duration::from_secs(3) && answered < 20_000 {
            if !added && start.elapsed() >= INTERVAL {
                hosts(&hosts_file, &[1, 2, 3]);
                added = true;
            }
            let sent = Instant::now();
            match http_get(web_vip(), "/") {
                Ok(_) => answered += 1,
                Err(e) => failed.push(e.to_string()),
            }
            slowest = slowest.max(sent.elapsed());
        }
        (answered, failed, slowest)
    });
    // Hardly waited for (the log is read by a thread): the record must have been seen while
    // the client still connected, else the loop tested nothing.
    world
        .daemon
        .wait_for_log_after(mark, &format!("{NAME}:{WEB} resolves to"), INTERVAL)
        .unwrap_or_else(|e| panic!("the daemon saw b3's record only after the load: {e}"));
    assert!(
        failed.is_empty(),
        "{} of {} connections failed while DNS added b3, which has no server yet: {:?}",
        failed.len(),
        failed.len() + answered as usize,
        &failed[..failed.len().min(5)]
    );
    let b3 = backend(3, WEB);
    let st = status(&world);
    let listed = st["services"][0]["backends"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["address"] == b3.to_string()).cloned())
        .unwrap_or_else(|| panic!("/status does not list b3 after its record appeared: {st}"));
    assert_eq!(listed["health"], "down", "b3 has no server: {listed}");
    world
        .daemon
        .wait_for_log_after(mark, "stays DOWN: its first health check failed", FOLLOW)
        .unwrap_or_else(|e| panic!("b3's failed first check was not logged: {e}"));
    assert_eq!(
        (&listed["total"], &listed["xdp"]["flows"]),
        (&0.into(), &0.into()),
        "a flow went to b3 before it passed a check (the slowest of {answered} requests took \
         {slowest:?}; refused SYNs dropped: {}): {listed}",
        st["xdp"]["packets"]["drop_refused_syn"]
    );

    let mark = world.daemon.log_mark();
    world.start_backend(3);
    world.wait_for_table_after(mark, "web", b3, "UP", FOLLOW);
    world
        .client(|| {
            wait_until_each_answers(&["b1", "b2", "b3"], FOLLOW, || http_get(web_vip(), "/"))
        })
        .unwrap_or_else(|e| panic!("b3 should answer once its server runs: {e}"));
}

/// A DNS name that answers with a backend behind an interface the service does not list
/// (`l3`, with `backend_interfaces = ["l1", "l2"]`): that backend's replies would never pass
/// the program, so every flow placed on it would fail. It is left out of the XDP table with
/// a warning naming it and the interface (also in `/status`), and every request is answered
/// by the other two. A route changed later is followed: b1 routed out of `l3` leaves the
/// table, and comes back once the route is removed.
#[test]
fn a_dns_answer_behind_an_unlisted_interface_is_left_out_of_the_xdp_table() {
    if !require_root("xdp_reload::a_dns_answer_behind_an_unlisted_interface") {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let hosts_file = dir.path().join("hosts");
    hosts(&hosts_file, &[1, 2, 3]);
    let listed = toml::Value::Array(vec!["l1".into(), "l2".into()]);
    let world = start_named(dir.path(), &hosts_file, 3, |web| {
        web.set("backend_interfaces", listed)
    });
    let b3 = backend(3, WEB);
    world
        .daemon
        .wait_for_log(
            &format!("service web: backend {b3} is reached through l3"),
            FOLLOW,
        )
        .unwrap_or_else(|e| panic!("no warning that b3 is left out: {e}"));
    world
        .client(|| wait_until_each_answers(&["b1", "b2"], FOLLOW, || http_get(web_vip(), "/")))
        .unwrap_or_else(|e| panic!("the two reachable backends should answer: {e}"));
    // Each of 60 new connections must be answered (`who_answers` panics on a failure).
    let seen = who_answers(&world);
    assert!(
        !seen.contains("b3"),
        "the backend behind the unlisted interface got flows: {seen:?}"
    );
    // `/status` says why b3 takes no flows although its health is up; the others take theirs.
    let st = status(&world);
    for i in 1..=3 {
        let b = admin::backend(&st, "web", backend(i, WEB))
            .unwrap_or_else(|| panic!("b{i} is not in /status: {st}"));
        let left_out = b["xdp"]["left_out"].as_str();
        if i == 3 {
            assert_eq!(b["health"], "up", "b3's health: {b}");
            assert!(
                left_out.is_some_and(|why| why.contains("l3")),
                "/status does not say why b3 is left out of the eBPF table: {b}"
            );
        } else {
            assert_eq!(left_out, None, "b{i} is reported left out: {b}");
        }
    }
    // Its `maglev_table` is the program's table, of b1 and b2 only: what another balancer
    // node with the same backends reachable must show to place flows the same way.
    let size = lb_daemon::maglev::DEFAULT_TABLE_SIZE;
    let placed: Vec<lb_daemon::maglev::MaglevBackend> = [1, 2]
        .map(|i| lb_daemon::maglev::MaglevBackend {
            address: backend(i, WEB),
            weight: 1,
        })
        .to_vec();
    let want = lb_daemon::maglev::MaglevTable::build(&placed, size)
        .expect("a table of two backends")
        .digest(&placed);
    let table = &st["services"][0]["maglev_table"];
    assert_eq!(
        (table["size"].as_u64(), table["fnv1a"].as_str()),
        (
            Some(u64::from(size)),
            Some(format!("{:016x}", want.fnv1a).as_str())
        ),
        "maglev_table is not the table of b1 and b2: {table}"
    );
    // And `/metrics`, for an alert: 1 for b3 alone.
    let api = world.daemon.admin_addr();
    let metrics = in_netns(&world.topology.balancer, || {
        admin::request(api, "GET", "/metrics", "")
    })
    .expect("enter the balancer namespace");
    for i in 1..=3 {
        let backend = format!("backend=\"{}\"", backend(i, WEB));
        let value = (metrics.body.lines())
            .find(|l| l.starts_with("lb_xdp_backend_left_out{") && l.contains(&backend))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no lb_xdp_backend_left_out for b{i}:\n{}", metrics.body));
        let want = if i == 3 { "1" } else { "0" };
        assert_eq!(value, want, "lb_xdp_backend_left_out of b{i}");
    }
    let logs = world.daemon.logs().join("\n");
    assert!(
        logs.contains("(2 of 3 backends eligible, 1 more left out"),
        "the table's log line does not count b3 as left out:\n{logs}"
    );

    // A route changed later is followed: b1 routed out of l3 leaves the table, and comes
    // back once the route is gone.
    let b1 = backend(1, WEB);
    let route = [&format!("{}/32", b1.ip()), "dev", "l3"];
    let mark = world.daemon.log_mark();
    world
        .topology
        .balancer
        .ip(&[&["route", "add"][..], &route[..]].concat())
        .expect("a route to b1 out of l3");
    world
        .daemon
        .wait_for_log_after(
            mark,
            &format!("service web: backend {b1} is reached through l3"),
            REROUTE,
        )
        .unwrap_or_else(|e| panic!("b1, routed out of l3, was not left out: {e}"));
    let b = admin::backend(&status(&world), "web", b1).cloned();
    assert!(
        b.as_ref()
            .and_then(|b| b["xdp"]["left_out"].as_str())
            .is_some_and(|why| why.contains("l3")),
        "/status does not say why b1 is left out: {b:?}"
    );
    let mark = world.daemon.log_mark();
    world
        .topology
        .balancer
        .ip(&[&["route", "del"][..], &route[..]].concat())
        .expect("the route to b1 out of l3 removed");
    world
        .daemon
        .wait_for_log_after(
            mark,
            &format!("service web: backend {b1}'s replies reach the eBPF program again"),
            REROUTE,
        )
        .unwrap_or_else(|e| panic!("b1, routed back, did not come back to the table: {e}"));
    world
        .client(|| wait_until_each_answers(&["b1", "b2"], FOLLOW, || http_get(web_vip(), "/")))
        .unwrap_or_else(|e| panic!("b1 should answer again once its route is back: {e}"));

    // At the XDP hook the program sends only out of the service's interfaces: b1 routed out
    // of a macvlan over l1 (where its replies would still come in) is left out too.
    route_out_of_a_macvlan(&world, b1);
}

/// DSR at the XDP hook: `lb_xdp` sends the encapsulated packets only out of the service's
/// interfaces, so a backend whose route comes to leave by another device (a macvlan over
/// `l1`) would take flows it never gets. The periodic route check leaves it out of the table
/// (logged, in `/status`), every new connection is answered by the others, and it comes back
/// once the route is gone.
#[test]
fn a_dsr_backend_routed_off_the_xdp_interfaces_is_left_out() {
    if !require_root("xdp_reload::a_dsr_backend_routed_off_the_xdp_interfaces") {
        return;
    }
    let world = World::start(Mode::Dsr, 3, 3);
    let b1 = backend(1, WEB);
    let route = route_out_of_a_macvlan(&world, b1);
    let b = admin::backend(&status(&world), "web", b1).cloned();
    assert!(
        b.as_ref()
            .and_then(|b| b["xdp"]["left_out"].as_str())
            .is_some_and(|why| why.contains("mv1")),
        "/status does not say why b1 is left out: {b:?}"
    );
    let mark = world.daemon.log_mark();
    let del: Vec<&str> = ["route", "del"]
        .into_iter()
        .chain(route.iter().map(String::as_str))
        .collect();
    world
        .topology
        .balancer
        .ip(&del)
        .expect("the route to b1 out of mv1 removed");
    world
        .daemon
        .wait_for_log_after(
            mark,
            &format!(
                "service web: backend {b1} is routed out of an interface of the service again"
            ),
            REROUTE,
        )
        .unwrap_or_else(|e| panic!("b1, routed back, did not come back to the table: {e}"));
    world
        .client(|| {
            wait_until_each_answers(&["b1", "b2", "b3"], FOLLOW, || http_get(web_vip(), "/"))
        })
        .unwrap_or_else(|e| panic!("b1 should answer again once its route is back: {e}"));
}

/// At the XDP hook the program sends only out of the service's interfaces: routes `b1`
/// (web's backend) out of `mv1`, a macvlan made over `l1`, and checks that web leaves it out
/// of its table (logged) and that 60 new connections go to the others. Returns the route's
/// `ip route` arguments, to delete it.
fn route_out_of_a_macvlan(world: &World, b1: SocketAddr) -> [String; 3] {
    let balancer = &world.topology.balancer;
    balancer
        .ip(&[
            "link", "add", "link", "l1", "name", "mv1", "type", "macvlan",
        ])
        .expect("a macvlan over l1");
    balancer.ip(&["link", "set", "mv1", "up"]).expect("mv1 up");
    let route = [format!("{}/32", b1.ip()), "dev".into(), "mv1".into()];
    let mark = world.daemon.log_mark();
    let add: Vec<&str> = ["route", "add"]
        .into_iter()
        .chain(route.iter().map(String::as_str))
        .collect();
    balancer.ip(&add).expect("a route to b1 out of mv1");
    world
        .daemon
        .wait_for_log_after(
            mark,
            &format!("service web: backend {b1} is routed out of mv1"),
            REROUTE,
        )
        .unwrap_or_else(|e| panic!("b1, routed out of mv1, was not left out: {e}"));
    wait_for_table(world, mark, "web", "b1 routed out of mv1");
    let seen = who_answers(world);
    assert!(
        !seen.contains("b1"),
        "the backend XDP cannot send to got flows: {seen:?}"
    );
    route
}

/// How long a route change may take to be followed: `REPLIES_EVERY` (10 s) and a margin.
const REROUTE: Duration = Duration::from_secs(15);

#[test]
fn the_first_reload_that_needs_xdp_loads_it() {
    if !require_root("xdp_reload::the_first_reload_that_needs_xdp_loads_it") {
        return;
    }
    // A proxy service on the balancer's loopback, and `web` on XDP when `web`.
    let config = |t: &Topology, web: bool| {
        let local =
            lb_tests::config::ServiceConfig::tcp("local", SocketAddr::from(([127, 0, 0, 1], 8080)))
                .set("dataplane", "proxy")
                .backend(backend(1, WEB), 1);
        let mut c = DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .service(local);
        if web {
            c = c.service(service(t, MODE, "web", &[(1, 1), (2, 1)]));
        }
        c.to_toml()
    };
    let world = start(2, &[], |t| config(t, false));
    assert_eq!(
        world.topology.xdp_prog_id("l0"),
        None,
        "XDP was attached although no service needed it"
    );
    reload(
        &world,
        &config(&world.topology, true),
        true,
        "add web on XDP",
    );
    let words = dataplane(&world, "web");
    assert!(
        words.contains("XDP"),
        "the first XDP service added by a reload should run on XDP: {words}"
    );
    assert!(
        world.topology.xdp_prog_id("l0").is_some(),
        "lb_xdp is not attached to l0 after the reload"
    );
    world
        .client(|| wait_until_each_answers(&["b1", "b2"], FOLLOW, || http_get(web_vip(), "/")))
        .unwrap_or_else(|e| panic!("web should answer through XDP: {e}"));
}

#[test]
fn an_xdp_service_replaced_at_its_vip_by_a_proxy_one_hands_the_vip_over_at_once() {
    if !require_root("xdp_reload::an_xdp_service_replaced_at_its_vip_by_a_proxy_one") {
        return;
    }
    // A drain far longer than the test: new flows must reach the proxy long before it ends.
    let world = start(2, &[], |t| config(t, "60s", &[(1, 1), (2, 1)], None));
    world
        .client(|| wait_until_each_answers(&["b1", "b2"], FOLLOW, || http_get(web_vip(), "/")))
        .unwrap_or_else(|e| panic!("web should answer through XDP: {e}"));
    // The proxy needs the VIP as a local address; XDP, in front, answers for it meanwhile.
    world
        .topology
        .balancer
        .ip(&[
            "addr",
            "add",
            &format!("{}/32", web_vip().ip()),
            "dev",
            "lo",
        ])
        .expect("the VIP on the balancer's loopback");
    // Renamed to change its data plane: `web` drains out of XDP, `web-proxy` starts on the
    // proxy at the same VIP.
    let toml = DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .global("drain_timeout", "60s")
        .service(
            lb_tests::config::ServiceConfig::tcp("web-proxy", web_vip())
                .set("dataplane", "proxy")
                .fast_health("http")
                .backend(backend(1, WEB), 1)
                .backend(backend(2, WEB), 1),
        )
        .to_toml();
    let mark = reload(&world, &toml, true, "web moved to the proxy");
    let words = dataplane(&world, "web-proxy");
    assert!(
        words.contains("proxy"),
        "web-proxy should run on the proxy: {words}"
    );
    world
        .client(|| wait_until_each_answers(&["b1", "b2"], FOLLOW, || http_get(web_vip(), "/")))
        .unwrap_or_else(|e| {
            panic!(
                "new connections to the VIP did not reach the proxy within {FOLLOW:?} of the \
                 reload (the drain is 60 s): {e}\n{}",
                world.daemon.logs().join("\n")
            )
        });
    world
        .daemon
        .wait_for_log_after(
            mark,
            "for the service that replaces it on the proxy",
            FOLLOW,
        )
        .unwrap_or_else(|e| {
            panic!(
                "web did not let go of its VIP: {e}\n{}",
                world.daemon.logs().join("\n")
            )
        });
}

/// A tc world of 3 backends, `web` on all three with a 1 s drain, its daemon started with
/// fault point `fault` (`LB_FAULT`) injected while the file `armed` exists.
fn start_with_fault(fault: &str, armed: &Path) -> World {
    let armed = armed.display().to_string();
    let env = [("LB_FAULT", fault), ("LB_FAULT_ARMED_BY", armed.as_str())];
    let path = EbpfPath {
        plane: Plane::Tc,
        mode: MODE,
    };
    World::start_custom(path, 3, 3, &[1, 2, 3], |t| {
        t.resolve_neighbours(WEB);
        let toml = config(t, "1s", &[(1, 1), (2, 1), (3, 1)], None);
        in_netns(&t.balancer, || Daemon::try_start_with_env(&toml, &env))
            .expect("enter the balancer namespace")
            .expect("the daemon starts")
    })
}

/// A backend removed by a reload whose id release fails (the walk of `CONNTRACK` cut short,
/// as the program's churn can cut it; injected with `LB_FAULT=release-walk-incomplete` while
/// a file exists) keeps its id reserved, and the release is tried again until it succeeds:
/// the id is released once the fault ends, not kept out of the pool until a restart.
#[test]
fn a_failed_id_release_is_tried_again() {
    if !require_root("xdp_reload::a_failed_id_release_is_tried_again") {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let armed = dir.path().join("armed");
    std::fs::write(&armed, "").expect("arm the fault");
    let world = start_with_fault("release-walk-incomplete", &armed);
    let removed = backend(3, WEB);
    let mark = reload(
        &world,
        &config(&world.topology, "1s", &[(1, 1), (2, 1)], None),
        false,
        "remove b3",
    );
    world
        .daemon
        .wait_for_log_after(mark, "cannot release XDP backend ids", FOLLOW)
        .unwrap_or_else(|e| panic!("the injected failure did not happen: {e}"));
    std::fs::remove_file(&armed).expect("end the fault");
    world
        .daemon
        .wait_for_log_after(
            mark,
            &format!("backend {removed} drained; XDP backend id"),
            FOLLOW + Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("b3's id was not released once the fault ended: {e}"));
}

/// While the XDP counters cannot be read (injected with `LB_FAULT=xdp-counters-unreadable`
/// while a file exists), `/metrics` shows the last ones read, so that no counter goes back
/// (Prometheus would take the drop for a reset, and `rate()` would spike), and `/status`
/// says why; once they can be read again, they go on from there.
#[test]
fn unreadable_xdp_counters_never_go_back() {
    if !require_root("xdp_reload::unreadable_xdp_counters_never_go_back") {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let armed = dir.path().join("armed");
    let world = start_with_fault("xdp-counters-unreadable", &armed);
    let api = world.daemon.admin_addr();
    // (lb_xdp_packets_total, web's lb_xdp_backend_packets_total)
    let counters = || {
        let body = in_netns(&world.topology.balancer, || {
            admin::request(api, "GET", "/metrics", "").body
        })
        .expect("enter the balancer namespace");
        let value = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        let seen = body
            .lines()
            .find(|l| l.starts_with("lb_xdp_packets_total "))
            .and_then(value)
            .unwrap_or(0.0);
        let web: f64 = body
            .lines()
            .filter(|l| l.starts_with("lb_xdp_backend_packets_total{"))
            .filter(|l| l.contains("service=\"web\""))
            .filter_map(value)
            .sum();
        (seen, web)
    };
    let traffic = || {
        world.client(|| {
            for k in 0..30 {
                http_get(web_vip(), "/")
                    .unwrap_or_else(|e| panic!("request {k} through the VIP failed: {e}"));
            }
        })
    };
    traffic();
    let before = counters();
    assert!(
        before.0 > 0.0 && before.1 > 0.0,
        "30 requests went through XDP, yet the counters show {before:?}"
    );
    std::fs::write(&armed, "").expect("start the fault");
    traffic();
    let during = counters();
    assert!(
        during.0 >= before.0 && during.1 >= before.1,
        "while the counters cannot be read they went back: {before:?} then {during:?}"
    );
    let error = status(&world)["xdp"]["error"].clone();
    assert!(
        error.as_str().is_some_and(|e| e.contains("injected")),
        "/status should say why the counters are old: {error}"
    );
    std::fs::remove_file(&armed).expect("end the fault");
    let after = counters();
    assert!(
        after.0 > during.0 && after.1 > during.1,
        "once readable again the counters should show the traffic sent meanwhile: {during:?} \
         then {after:?}"
    );
    assert!(
        status(&world)["xdp"]["error"].is_null(),
        "the error should be gone"
    );
}

/// With `[announce]`, an eBPF service whose only healthy backend is left out of its table
/// (here: a DNS name answering with an IPv6 address for an IPv4 VIP) is not announced: its
/// program would drop the VIP's SYNs while the node drew its share of them. Once the name
/// also answers with an IPv4 backend, the VIP is announced.
#[test]
fn a_vip_whose_table_is_empty_is_not_announced() {
    if !require_root("xdp_reload::a_vip_whose_table_is_empty_is_not_announced") {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let hosts_file = dir.path().join("hosts");
    let write_hosts = |v4: bool| {
        let mut text = format!("127.0.0.1 localhost\nfd00:98::2 {NAME}\n");
        if v4 {
            text.push_str(&format!("{} {NAME}\n", backend_ip(1)));
        }
        std::fs::write(&hosts_file, text).expect("the test's hosts file is writable");
    };
    write_hosts(false);
    let config_file = dir.path().join("lb.toml");
    let wrapper = lb_tests::daemon::private_hosts_wrapper(dir.path(), &hosts_file);
    let path = EbpfPath {
        plane: Plane::Tc,
        mode: MODE,
    };
    let world = World::start_custom(path, 3, 3, &[], |t| {
        t.resolve_neighbours(WEB);
        let web = service(t, MODE, "web", &[])
            .set("resolve_interval", "300ms")
            .without_health("path")
            .health("kind", "none")
            .backend_named(&format!("{NAME}:{WEB}"), 1);
        let toml = DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .announce("table", 100)
            .service(web)
            .to_toml();
        lb_tests::xdp::spawn_with_hosts(&t.balancer, &wrapper, &config_file, &toml)
    });
    let announced = || {
        let st = status(&world);
        let vips = st["announce"]["vips"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ours = vips
            .iter()
            .find(|v| v["vip"].as_str() == Some(&web_vip().ip().to_string()))
            .cloned();
        ours.unwrap_or_else(|| panic!("/status lists no announcement of the VIP: {st}"))
    };
    let words = dataplane(&world, "web");
    assert!(
        words.contains("tc"),
        "web should run on the eBPF plane: {words}"
    );
    // Several announcer rounds (one every 200 ms) with the IPv6 backend alone.
    std::thread::sleep(Duration::from_secs(1));
    let v = announced();
    assert_eq!(
        v["announced"], false,
        "a VIP whose eBPF table has no backend was announced: {v}"
    );
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("eBPF table")),
        "the reason should say the table is empty: {v}"
    );
    write_hosts(true);
    let deadline = Instant::now() + FOLLOW;
    while announced()["announced"] != true && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = announced();
    assert_eq!(
        v["announced"], true,
        "the VIP should be announced once an IPv4 backend is in the table: {v}"
    );
}
