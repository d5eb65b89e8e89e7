//! `[announce]` on one node, without a router: the daemon keeps a blackhole route per VIP it
//! can serve in its table (what BIRD exports), withdraws it when the service's last backend
//! goes down, on `drain-node`, and on SIGTERM before it drains (serving meanwhile), and shows
//! it in `/status` and `/metrics`. Each test runs the daemon in a namespace of its own (its
//! routing tables are the namespace's). The cluster with BIRD is `cluster.rs`.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::netns::Netns;
use lb_tests::xdp::in_netns;
use lb_tests::{Daemon, HttpNameServer};
use nix::sys::signal::Signal;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 230, 0, 1);
const ROUTE: &str = "blackhole 10.230.0.1 proto 250";

/// A namespace with the VIP on its loopback, an HTTP backend, and the daemon.
struct Node {
    daemon: Daemon,
    web: HttpNameServer,
    ns: Netns,
}

impl Node {
    fn start(withdraw_wait: &str) -> Node {
        Self::start_with_env(withdraw_wait, &[])
    }

    /// [`Node::start`] with `env` added to the daemon's environment (which an upgrade in
    /// place passes on to the new daemon).
    fn start_with_env(withdraw_wait: &str, env: &[(&str, &str)]) -> Node {
        let ns = Netns::new("an").expect("namespace");
        ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
            .expect("the VIP on lo");
        let backend = SocketAddr::from(([127, 0, 0, 1], 8080));
        let web = ns
            .enter(|| HttpNameServer::start_on("a", backend))
            .expect("enter the namespace")
            .expect("the backend starts");
        let toml = DaemonConfig::new()
            .announce("table", 100)
            .announce("withdraw_wait", withdraw_wait)
            .service(
                ServiceConfig::tcp("web", vip())
                    .fast_health("tcp")
                    .backend(backend, 1),
            )
            .to_toml();
        let daemon = in_netns(&ns, || Daemon::try_start_with_env(&toml, env))
            .expect("enter the namespace")
            .unwrap_or_else(|e| panic!("lb-daemon did not start: {e}"));
        Node { daemon, web, ns }
    }

    fn table(&self) -> String {
        let out = self
            .ns
            .run("ip", &["route", "show", "table", "100"])
            .expect("ip route show");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits up to `timeout` for the VIP's route to be there (`present`) or gone.
    fn wait_route(&self, present: bool, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.table().contains(ROUTE) == present {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "the VIP's route is {} after {timeout:?}: table 100 holds {:?}",
            if present {
                "still missing"
            } else {
                "still there"
            },
            self.table()
        );
    }

    /// SIGUSR2 on a daemon started with `LB_FAULT=pause-before-ready` (which the upgrade
    /// passes on): returns the new daemon once it has taken the sockets and waits 10 s
    /// before READY.
    fn upgrade_paused(&self) -> lb_tests::daemon::Successor {
        let mark = self.daemon.log_mark();
        let new = self
            .daemon
            .upgrade_in_place()
            .unwrap_or_else(|e| panic!("SIGUSR2 started no new daemon: {e}"));
        self.daemon
            .wait_for_log_after(mark, "LB_FAULT=pause-before-ready", Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("the new daemon never took the sockets over: {e}"));
        new
    }

    fn api(&self, method: &str, path: &str) -> lb_tests::admin::AdminReply {
        let addr = self.daemon.admin_addr();
        in_netns(&self.ns, || {
            lb_tests::admin::request(addr, method, path, "")
        })
        .expect("enter the namespace")
    }
}

fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), 8000)
}

#[test]
fn a_vip_is_announced_while_it_can_be_served() {
    if !lb_tests::require_root("announce::a_vip_is_announced_while_it_can_be_served") {
        return;
    }
    let mut node = Node::start("2s");
    node.wait_route(true, Duration::from_secs(3));
    let status = node.api("GET", "/status").json();
    assert_eq!(status["announce"]["table"], 100);
    assert_eq!(status["announce"]["vips"][0]["vip"], VIP.to_string());
    assert_eq!(status["announce"]["vips"][0]["announced"], true);
    let admin = node.daemon.admin_addr().to_string();
    let table = in_netns(&node.ns, || lb_tests::admin::cli(&admin, &["status"]))
        .expect("enter the namespace");
    assert!(
        table
            .stdout
            .contains("announce: table 100: 10.230.0.1 announced"),
        "`lb-daemon status` does not show the announced VIP:\n{}",
        table.stdout
    );
    let metrics = node.api("GET", "/metrics").body;
    assert!(
        metrics.contains("lb_vip_announced{vip=\"10.230.0.1\"} 1"),
        "/metrics: {metrics}"
    );

    // The last backend goes down: withdrawn, with the reason.
    let mark = node.daemon.log_mark();
    node.web.stop();
    node.wait_route(false, Duration::from_secs(5));
    node.daemon
        .wait_for_log_after(
            mark,
            "announce: 10.230.0.1 withdrawn: service web has no healthy backend",
            Duration::from_secs(2),
        )
        .unwrap_or_else(|e| panic!("the withdrawal was not logged: {e}"));
    let status = node.api("GET", "/status").json();
    assert_eq!(status["announce"]["vips"][0]["announced"], false);
    assert!(node
        .api("GET", "/metrics")
        .body
        .contains("lb_vip_announced{vip=\"10.230.0.1\"} 0"));
    // Bound again inside the namespace.
    let web = &mut node.web;
    node.ns
        .enter(|| web.restart())
        .expect("enter the namespace")
        .expect("the backend restarts");
    node.wait_route(true, Duration::from_secs(5));

    // drain-node withdraws at once (the answer comes once the route is gone); enable-node
    // announces again.
    let said = in_netns(&node.ns, || lb_tests::admin::cli(&admin, &["drain-node"]))
        .expect("enter the namespace");
    assert_eq!(said.code, Some(0), "drain-node: {said:?}");
    assert!(
        said.stdout.contains("announced now: none"),
        "drain-node: {}",
        said.stdout
    );
    assert!(
        !node.table().contains(ROUTE),
        "drained, yet {}",
        node.table()
    );
    assert_eq!(
        node.api("GET", "/status").json()["announce"]["node_draining"],
        true
    );
    assert!(node
        .api("GET", "/metrics")
        .body
        .contains("lb_node_draining 1"));
    // Traffic that still arrives is served: drain-node only withdraws.
    in_netns(&node.ns, || lb_tests::client::http_get(vip(), "/"))
        .expect("enter the namespace")
        .expect("a drained node still serves what reaches it");
    let r = node.api("POST", "/node/enable");
    assert_eq!(r.status, 200, "POST /node/enable: {}", r.body);
    assert!(
        node.table().contains(ROUTE),
        "enabled, yet {}",
        node.table()
    );
}

/// A proxied service whose last backend went down drops the SYNs of new connections while
/// the node announces its VIPs, rather than refusing the connections: until the router has
/// moved the VIP's traffic, the client's resent SYN can still be carried (here by this node,
/// once its backend is back; among several nodes, by another one).
#[test]
fn a_proxy_service_without_backend_drops_syns_so_that_the_resent_one_is_carried() {
    if !lb_tests::require_root("announce::a_proxy_service_without_backend_drops_syns") {
        return;
    }
    let mut node = Node::start("2s");
    node.wait_route(true, Duration::from_secs(3));
    let mark = node.daemon.log_mark();
    node.web.stop();
    node.wait_route(false, Duration::from_secs(5));
    node.daemon
        .wait_for_log_after(
            mark,
            "SYNs are dropped, not refused",
            Duration::from_secs(3),
        )
        .unwrap_or_else(|e| panic!("no listener dropped SYNs: {e}"));
    // Every worker's listener within its next sweep (at most a second).
    std::thread::sleep(Duration::from_millis(1_500));

    let exchange = || -> Result<(Duration, String), String> {
        let started = Instant::now();
        let mut c = TcpStream::connect_timeout(&vip(), Duration::from_secs(20))
            .map_err(|e| format!("connect: {e}"))?;
        let connected = started.elapsed();
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        c.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")
            .map_err(|e| format!("request: {e}"))?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)
            .map_err(|e| format!("answer: {e} (after {answer:?})"))?;
        Ok((connected, answer))
    };
    let (ns, web) = (&node.ns, &mut node.web);
    let (connected, answer) = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            ns.enter(exchange)
                .map_err(|e| format!("enter the namespace: {e}"))?
        });
        std::thread::sleep(Duration::from_millis(1_300));
        assert!(
            !client.is_finished(),
            "the connection was settled while the service had no backend"
        );
        ns.enter(|| web.restart())
            .expect("enter the namespace")
            .expect("the backend restarts");
        client
            .join()
            .expect("the client thread")
            .unwrap_or_else(|e| panic!("the resent SYN was not carried: {e}"))
    });
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("\r\n\r\na"),
        "the backend's answer, through the balancer: {answer:?}"
    );
    assert!(
        connected >= Duration::from_secs(1),
        "connected after {connected:?}: the first SYN was not dropped"
    );
    node.daemon
        .wait_for_log_after(mark, "SYNs are taken again", Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("the listeners did not take SYNs again: {e}"));
}

/// SIGTERM withdraws the VIP first and keeps serving for `withdraw_wait` (the router moves
/// the flows elsewhere meanwhile), then drains and exits 0.
#[test]
fn sigterm_withdraws_then_serves_for_the_wait_then_drains() {
    if !lb_tests::require_root("announce::sigterm_withdraws_then_serves_for_the_wait") {
        return;
    }
    let mut node = Node::start("2s");
    node.wait_route(true, Duration::from_secs(3));
    let mark = node.daemon.log_mark();
    let sent = Instant::now();
    node.daemon.signal(Signal::SIGTERM).expect("SIGTERM");
    node.wait_route(false, Duration::from_secs(1));
    // Within the wait: still running, still accepting new connections.
    assert!(
        node.daemon.exit_status().is_none(),
        "exited before the wait"
    );
    in_netns(&node.ns, || lb_tests::client::http_get(vip(), "/"))
        .expect("enter the namespace")
        .expect("a new connection during withdraw_wait is served");
    let status = node
        .daemon
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon exits after the wait and the drain");
    assert!(status.success(), "exited with {status}");
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "the daemon did not wait withdraw_wait (2 s) before draining: {:?}",
        sent.elapsed()
    );
    let logs = node.daemon.logs();
    let at = |needle: &str| {
        logs.iter()
            .skip(mark)
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in the log:\n{}", logs.join("\n")))
    };
    assert!(
        at("withdrawn: the daemon is stopping") < at("no longer accepting"),
        "the VIP was withdrawn after the drain started:\n{}",
        logs.join("\n")
    );
}

/// SIGQUIT exits leaving the eBPF plane: a VIP the proxy carries is withdrawn, since the proxy
/// stops accepting.
#[test]
fn sigquit_withdraws_a_proxy_vip() {
    if !lb_tests::require_root("announce::sigquit_withdraws_a_proxy_vip") {
        return;
    }
    let mut node = Node::start("0s");
    node.wait_route(true, Duration::from_secs(3));
    node.daemon.signal(Signal::SIGQUIT).expect("SIGQUIT");
    let status = node
        .daemon
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon exits");
    assert!(status.success(), "exited with {status}");
    assert!(
        !node.table().contains(ROUTE),
        "a proxy VIP stays announced after SIGQUIT: {}",
        node.table()
    );
}

/// A drained node stays drained across an upgrade in place (SIGUSR2): the new daemon takes
/// the drain over and announces nothing until `enable-node`.
#[test]
fn a_drained_node_stays_drained_across_an_upgrade() {
    if !lb_tests::require_root("announce::a_drained_node_stays_drained_across_an_upgrade") {
        return;
    }
    let mut node = Node::start("0s");
    node.wait_route(true, Duration::from_secs(3));
    assert_eq!(node.api("POST", "/node/drain").status, 200);
    assert!(
        !node.table().contains(ROUTE),
        "drained, yet {}",
        node.table()
    );
    let mark = node.daemon.log_mark();
    let _new = node
        .daemon
        .upgrade_in_place()
        .unwrap_or_else(|e| panic!("SIGUSR2 started no new daemon: {e}"));
    // The new daemon's lines come through the old one's output, which it inherited.
    let (_, line) = node
        .daemon
        .wait_for_log_after(
            mark,
            "admin API listening on http://",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("the new daemon did not start: {e}"));
    let new_api: SocketAddr = line
        .rsplit("http://")
        .next()
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line}"));
    node.daemon
        .wait_for_log_after(mark, "the node stays drained", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the new daemon did not take the drain over: {e}"));
    let status = node
        .daemon
        .wait_exit(Duration::from_secs(15))
        .expect("the old daemon exits after the hand-over");
    assert!(status.success(), "the old daemon exited with {status}");
    // Several looks of the new daemon later: still nothing announced.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !node.table().contains(ROUTE),
        "the new daemon announced a drained node's VIP: {}",
        node.table()
    );
    let r = in_netns(&node.ns, || {
        lb_tests::admin::request(new_api, "GET", "/status", "")
    })
    .expect("enter the namespace");
    assert_eq!(r.json()["announce"]["node_draining"], true);
    let r = in_netns(&node.ns, || {
        lb_tests::admin::request(new_api, "POST", "/node/enable", "")
    })
    .expect("enter the namespace");
    assert_eq!(r.status, 200, "enable-node on the new daemon: {}", r.body);
    node.wait_route(true, Duration::from_secs(3));
}

/// An upgrade whose config announces in another table: the new daemon announces there and
/// withdraws what the old one left in the old table, which no daemon would look after.
#[test]
fn an_upgrade_to_another_table_leaves_nothing_in_the_old_one() {
    if !lb_tests::require_root("announce::an_upgrade_to_another_table") {
        return;
    }
    let mut node = Node::start("0s");
    node.wait_route(true, Duration::from_secs(3));
    let text = std::fs::read_to_string(node.daemon.config_path()).expect("the config");
    node.daemon
        .rewrite_config(&text.replace("table = 100", "table = 101"));
    let _new = node
        .daemon
        .upgrade_in_place()
        .unwrap_or_else(|e| panic!("SIGUSR2 started no new daemon: {e}"));
    node.daemon
        .wait_exit(Duration::from_secs(15))
        .expect("the old daemon exits after the hand-over");
    node.wait_route(false, Duration::from_secs(5));
    let end = Instant::now() + Duration::from_secs(5);
    let in_101 = || {
        let out = node
            .ns
            .run("ip", &["route", "show", "table", "101"])
            .expect("ip route show");
        String::from_utf8_lossy(&out.stdout).contains(ROUTE)
    };
    while !in_101() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(in_101(), "the new daemon does not announce in table 101");
}

#[test]
fn an_upgrade_to_a_config_without_announce_withdraws_the_old_routes() {
    if !lb_tests::require_root("announce::an_upgrade_to_a_config_without_announce") {
        return;
    }
    let mut node = Node::start("0s");
    node.wait_route(true, Duration::from_secs(3));
    let text = std::fs::read_to_string(node.daemon.config_path()).expect("the config");
    let mut config: toml::Table = text.parse().expect("the test's config is TOML");
    config.remove("announce");
    // A proxy service on a high port and no [announce]: the new daemon keeps no capability
    // of its own for routes.
    node.daemon
        .rewrite_config(&toml::to_string(&config).expect("serializes"));
    let _new = node
        .daemon
        .upgrade_in_place()
        .unwrap_or_else(|e| panic!("SIGUSR2 started no new daemon: {e}"));
    node.daemon
        .wait_exit(Duration::from_secs(15))
        .expect("the old daemon exits after the hand-over");
    node.wait_route(false, Duration::from_secs(5));
}

#[test]
fn an_upgrade_to_another_table_stopped_before_ready_withdraws_what_it_announced() {
    if !lb_tests::require_root("announce::an_upgrade_to_another_table_stopped") {
        return;
    }
    // The upgrade in place passes the fault on: the new daemon announces, then waits 10 s
    // before READY.
    let node = Node::start_with_env("0s", &[("LB_FAULT", "pause-before-ready")]);
    node.wait_route(true, Duration::from_secs(3));
    let text = std::fs::read_to_string(node.daemon.config_path()).expect("the config");
    node.daemon
        .rewrite_config(&text.replace("table = 100", "table = 101"));
    let new = node.upgrade_paused();
    let table_101 = || {
        let out = node
            .ns
            .run("ip", &["route", "show", "table", "101"])
            .expect("ip route show");
        String::from_utf8_lossy(&out.stdout).contains(ROUTE)
    };
    assert!(
        wait_until(Duration::from_secs(5), table_101),
        "the new daemon did not announce in table 101"
    );
    nix::sys::signal::kill(new.pid(), nix::sys::signal::Signal::SIGINT).expect("SIGINT it");
    assert!(
        wait_until(Duration::from_secs(15), || !new.alive()),
        "the stopped upgrade did not exit"
    );
    assert!(
        !table_101(),
        "the stopped upgrade left its routes in table 101, where nobody looks"
    );
    node.wait_route(true, Duration::from_secs(1));
}

/// A stop of the old daemon while an upgrade takes over, before it is ready: the old daemon
/// withdraws the VIP and, with nothing to drain, exits; the new one, which announced it again
/// meanwhile, finds the old one gone at READY and exits 1 withdrawing it too. Before, the
/// route stayed exported with no daemon left to serve the VIP.
#[test]
fn a_stop_while_an_upgrade_takes_over_leaves_no_route() {
    if !lb_tests::require_root("announce::a_stop_while_an_upgrade_takes_over") {
        return;
    }
    let mut node = Node::start_with_env("0s", &[("LB_FAULT", "pause-before-ready")]);
    node.wait_route(true, Duration::from_secs(3));
    let new = node.upgrade_paused();
    node.daemon.signal(Signal::SIGTERM).expect("SIGTERM");
    let status = node
        .daemon
        .wait_exit(Duration::from_secs(10))
        .expect("the old daemon, with nothing to drain, exits");
    assert!(status.success(), "the old daemon exited with {status}");
    assert!(
        wait_until(Duration::from_secs(20), || !new.alive()),
        "the new daemon went on although the old one stopped before it was ready"
    );
    assert!(
        !node.table().contains(ROUTE),
        "the VIP stays announced with no daemon to serve it: {}",
        node.table()
    );
}

/// Whether `done` holds within `limit`, asked every 20 ms.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// An IPv6 VIP is announced as a /128 in the same table, and withdrawn with its backend.
#[test]
fn an_ipv6_vip_is_announced_as_a_host_route() {
    if !lb_tests::require_root("announce::an_ipv6_vip_is_announced_as_a_host_route") {
        return;
    }
    let ns = Netns::new("an6").expect("namespace");
    ns.ip(&["-6", "addr", "add", "fd00:230::1/128", "dev", "lo", "nodad"])
        .expect("the VIP on lo");
    let backend = SocketAddr::from(([127, 0, 0, 1], 8080));
    let mut web = ns
        .enter(|| HttpNameServer::start_on("a", backend))
        .expect("enter the namespace")
        .expect("the backend starts");
    let vip: SocketAddr = "[fd00:230::1]:8000".parse().expect("literal");
    let toml = DaemonConfig::new()
        .announce("table", 100)
        .service(
            ServiceConfig::tcp("web6", vip)
                .fast_health("tcp")
                .backend(backend, 1),
        )
        .to_toml();
    let _daemon = in_netns(&ns, || Daemon::start(&toml)).expect("enter the namespace");
    let table = || {
        let out = ns
            .run("ip", &["-6", "route", "show", "table", "100"])
            .expect("ip route show");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let wait = |present: bool| {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            // IPv6 blackhole routes show `dev lo` between the address and the protocol.
            let t = table();
            let there = t.contains("blackhole fd00:230::1 ") && t.contains("proto 250");
            if there == present {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the IPv6 VIP's route is not {present}: {:?}", table());
    };
    wait(true);
    web.stop();
    wait(false);
}

#[test]
fn a_bad_announce_table_is_refused_with_its_line() {
    let text = "[[service]]\nname = \"web\"\nlisten = \"10.230.0.1:8000\"\nprotocol = \"tcp\"\n\
                [[service.backend]]\naddress = \"127.0.0.1:8080\"\n\n[announce]\ntable = 254\n";
    let out = lb_tests::daemon::check_config(text);
    assert_eq!(out.code(), Some(2), "check: {}", out.stderr);
    assert!(
        out.stderr.contains("announce.table") && out.stderr.contains(":9:"),
        "the error names the field and line: {}",
        out.stderr
    );
}
