//! Per-client limits on the eBPF data plane, end to end (XDP, and tc for the connection and
//! rate limits): `lb-daemon` with XDP or tc (`nat`) in the balancer namespace, one backend
//! namespace with HTTP name servers, and a client namespace with several addresses. A client address over its connection limit or its rate is refused
//! (the program answers its SYN with a reset, so its connect fails at once), while another
//! address is served; the daemon's log and counters report the refusals, a reload changes a
//! limit live, and the daemon's sweep gives back the slot of a flow whose conntrack entry was
//! evicted.
//!
//! Needs root and the BPF object (`cargo xtask build-ebpf`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use aya::maps::{loaded_maps, HashMap as AyaHashMap, Map, MapData};
use lb_common::flow::IPPROTO_TCP;
use lb_common::maps::{addr_words, CtEntry, CONNTRACK};
use lb_common::FlowKey;
use lb_tests::client::{http_get_from, HttpConnection};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::xdp::{backend_ip, bpf_object, in_netns, Mode, Path, Plane, Topology};
use lb_tests::{Daemon, HttpNameServer};
use socket2::{Domain, SockAddr, Socket, Type};
use toml::{Table, Value};

/// The first client address (the topology's), and more on the same veth.
const A: Ipv4Addr = lb_tests::xdp::CLIENT;
const B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
/// A client whose flow's conntrack entry the test deletes; no other test uses it, so its
/// flows are found only in this test's daemon's maps.
const C: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 4);
/// `conns`: at most 2 open connections per client address.
const CONNS: u16 = 80;
/// `rate`: a burst of 3, then one new connection per 100 s.
const RATE: u16 = 81;
/// How long a connect may take to be refused (the reset comes at once; a dropped SYN would
/// only time out).
const REFUSED_WAIT: Duration = Duration::from_millis(1500);

struct Lab {
    daemon: Daemon,
    topology: Topology,
    _servers: Vec<HttpNameServer>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SIGTERM first, so the daemon logs its XDP counters (shown when a test fails).
        if self.daemon.exit_status().is_none() {
            let _ = self.daemon.signal(nix::sys::signal::Signal::SIGTERM);
            let _ = self.daemon.wait_exit(Duration::from_secs(10));
        }
    }
}

/// `[service.limits]` keys and values.
type Limits = Vec<(&'static str, Value)>;

fn config(topology: &Topology, max_connections: i64) -> String {
    let mut config = DaemonConfig::new().global("bpf_object", bpf_object().display().to_string());
    let limits: [(u16, &str, Limits); 2] = [
        (
            CONNS,
            "conns",
            vec![("max_connections_per_client", max_connections.into())],
        ),
        (
            RATE,
            "rate",
            vec![
                ("new_connections_per_second", 0.01.into()),
                ("burst", 3.into()),
            ],
        ),
    ];
    for (port, name, keys) in limits {
        let mut table = Table::new();
        for (key, value) in keys {
            table.insert(key.into(), value);
        }
        let mut svc = ServiceConfig::tcp(name, Topology::vip(port))
            .fast_health("http")
            .health("timeout", "2s")
            .set("limits", Value::Table(table));
        for (key, value) in topology.xdp_keys(Mode::Nat) {
            svc = svc.set(key, value);
        }
        svc = svc.backend(SocketAddr::new(IpAddr::V4(backend_ip(1)), port), 1);
        config = config.service(svc);
    }
    config.to_toml()
}

fn start(plane: Plane) -> Lab {
    start_with(plane, |toml| toml)
}

/// [`start`], with the config passed through `edit` first.
fn start_with(plane: Plane, edit: impl FnOnce(String) -> String) -> Lab {
    let topology = Topology::at(
        Path {
            plane,
            mode: Mode::Nat,
        },
        1,
    );
    for extra in [B, C] {
        topology
            .client
            .ip(&["addr", "add", &format!("{extra}/24"), "dev", "c0"])
            .expect("another client address");
    }
    let servers: Vec<HttpNameServer> = topology.backends[0]
        .enter(|| {
            [CONNS, RATE]
                .map(|p| {
                    HttpNameServer::start_on("b1", SocketAddr::from(([0, 0, 0, 0], p)))
                        .expect("name server starts")
                })
                .into()
        })
        .expect("enter the backend namespace");
    let toml = edit(config(&topology, 2));
    let daemon = in_netns(&topology.balancer, || Daemon::start(&toml))
        .expect("enter the balancer namespace");
    // Health checks make the balancer resolve the backend's MAC; before that NAT'ed packets
    // go through the kernel, which drops them.
    for s in &servers {
        assert!(
            s.wait_for_health_checks(2, Duration::from_secs(15)),
            "the daemon did not health-check the backend within 15 s"
        );
    }
    Lab {
        daemon,
        topology,
        _servers: servers,
    }
}

impl Lab {
    fn client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.topology
            .client
            .enter(f)
            .expect("enter the client namespace")
    }

    /// A kept-alive connection from `from` to `port`, checked with one request.
    fn hold(&self, from: Ipv4Addr, port: u16, what: &str) -> HttpConnection {
        self.client(|| {
            let mut c = HttpConnection::open_from(Some(from.into()), Topology::vip(port))
                .unwrap_or_else(|e| panic!("{what}: connect from {from}: {e}"));
            let body = c
                .get("/")
                .unwrap_or_else(|e| panic!("{what}: request from {from}: {e}"));
            assert_eq!(body, "b1", "{what}: answered by {body}");
            c
        })
    }

    /// Like [`Lab::hold`], trying again while the connection is refused, for up to `within`
    /// (a slot given back by a backend's FIN frees a moment after the client closed).
    fn hold_within(
        &self,
        from: Ipv4Addr,
        port: u16,
        what: &str,
        within: Duration,
    ) -> HttpConnection {
        let deadline = std::time::Instant::now() + within;
        loop {
            let tried = self.client(|| {
                let mut c = HttpConnection::open_from(Some(from.into()), Topology::vip(port))?;
                let body = c.get("/")?;
                Ok::<_, lb_tests::client::ClientError>((c, body))
            });
            match tried {
                Ok((c, body)) => {
                    assert_eq!(body, "b1", "{what}: answered by {body}");
                    return c;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!(
                    "{what}: still refused after {within:?}: {e}. Daemon log:\n{}",
                    self.logs()
                ),
            }
        }
    }

    /// Whether a connect from `from` to `port` is refused (reset) within [`REFUSED_WAIT`].
    /// A connect that succeeds is closed at once.
    fn refused(&self, from: Ipv4Addr, port: u16) -> bool {
        self.client(|| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            s.bind(&SockAddr::from(SocketAddr::new(from.into(), 0)))
                .expect("bind the client address");
            match s.connect_timeout(&SockAddr::from(Topology::vip(port)), REFUSED_WAIT) {
                Ok(()) => false,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => true,
                Err(e) => panic!("a connect from {from} failed other than by a reset: {e}"),
            }
        })
    }

    fn served(&self, from: Ipv4Addr, port: u16) -> bool {
        self.client(|| http_get_from(Some(from.into()), Topology::vip(port), "/").is_ok())
    }

    /// The 5-tuple of `c` as the balancer's conntrack keys it (client → VIP).
    fn flow_of(c: &HttpConnection) -> FlowKey {
        let local = c.local_addr().expect("the connection's local address");
        FlowKey {
            src_addr: addr_words(local.ip()),
            dst_addr: addr_words(IpAddr::V4(lb_tests::xdp::VIP)),
            src_port: local.port(),
            dst_port: CONNS,
            protocol: IPPROTO_TCP,
            family: lb_common::maps::FAMILY_V4,
            _pad: [0; 2],
        }
    }

    fn logs(&self) -> String {
        self.daemon.logs().join("\n")
    }
}

#[test]
fn a_client_over_its_connection_limit_is_refused_and_another_is_not() {
    if lb_tests::require_root("xdp_limits::a_client_over_its_connection_limit_is_refused") {
        connection_limit(Plane::Xdp);
    }
}

#[test]
fn tc_a_client_over_its_connection_limit_is_refused_and_another_is_not() {
    if lb_tests::require_root("xdp_limits::tc_a_client_over_its_connection_limit_is_refused") {
        connection_limit(Plane::Tc);
    }
}

/// On tc a refused client's SYN arrives `CHECKSUM_PARTIAL` when its sender left the checksum
/// to a device (a local socket over a veth, another VM over a virtual card), and `lb_tc` builds
/// the reset from it. Here the balancer's client-facing veth has its transmit checksum
/// offload turned off, so the kernel finishes the reset's checksum at transmit as a network
/// card would: a reset whose checksum field does not account for that reaches the client
/// corrupted, is dropped, and the connect times out instead of failing at once.
#[test]
fn tc_a_reset_built_from_a_partial_checksum_syn_survives_a_checksumming_link() {
    if lb_tests::require_root("xdp_limits::tc_a_reset_built_from_a_partial_checksum_syn") {
        let lab = start(Plane::Tc);
        lb_tests::xdp::disable_tx_checksum(&lab.topology.balancer, "l0")
            .expect("tx checksum offload off on l0");
        let _first = lab.hold(A, CONNS, "A's first connection");
        let _second = lab.hold(A, CONNS, "A's second connection");
        assert!(
            lab.refused(A, CONNS),
            "a third concurrent connection from {A} was served; the limit is 2. Daemon log:\n{}",
            lab.logs()
        );
    }
}

fn connection_limit(plane: Plane) {
    let lab = start(plane);
    let first = lab.hold(A, CONNS, "A's first connection");
    let second = lab.hold(A, CONNS, "A's second connection");
    assert!(
        lab.refused(A, CONNS),
        "a third concurrent connection from {A} was served; the limit is 2. Daemon log:\n{}",
        lab.logs()
    );
    let other = lab.hold(B, CONNS, "B's connection while A is at its limit");
    lab.daemon
        .wait_for_log(
            "XDP limits: refused 0 new flows over a client's rate and",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("the daemon did not report the refusal: {e}"));

    // A closes one connection: the backend's FIN in reply gives the slot back (on NAT the
    // client's own FIN, a half-close, does not), a moment after the client's.
    drop(first);
    let _refill = lab.hold_within(
        A,
        CONNS,
        "A's connection after one of its flows ended",
        Duration::from_secs(5),
    );
    assert!(
        lab.refused(A, CONNS),
        "{A} got a third concurrent connection after one ended and another began"
    );

    // A reload raises the limit to 3: the new limit reaches the XDP maps and A gets a third.
    let mark = lab.daemon.log_mark();
    lab.daemon.rewrite_config(&config(&lab.topology, 3));
    lab.daemon
        .signal(nix::sys::signal::Signal::SIGHUP)
        .expect("SIGHUP the daemon");
    lab.daemon
        .wait_for_log_after(
            mark,
            // A table write for another reason (a health change) carries the old limit.
            "per client: 3 connections",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("the reload did not reach the XDP maps: {e}\n{}", lab.logs()));
    let _third = lab.hold(
        A,
        CONNS,
        "A's third connection after the limit was raised to 3",
    );
    drop((second, other));
}

#[test]
fn a_client_over_its_rate_is_refused_after_its_burst_and_another_is_not() {
    if lb_tests::require_root("xdp_limits::a_client_over_its_rate_is_refused") {
        rate_limit(Plane::Xdp);
    }
}

#[test]
fn tc_a_client_over_its_rate_is_refused_after_its_burst_and_another_is_not() {
    if lb_tests::require_root("xdp_limits::tc_a_client_over_its_rate_is_refused") {
        rate_limit(Plane::Tc);
    }
}

fn rate_limit(plane: Plane) {
    let mut lab = start(plane);
    for k in 0..3 {
        assert!(
            lab.served(A, RATE),
            "connection {k} of {A}'s burst was not served. Daemon log:\n{}",
            lab.logs()
        );
    }
    assert!(
        lab.refused(A, RATE),
        "a fourth new connection from {A} was served; the burst is 3"
    );
    assert!(
        lab.served(B, RATE),
        "{B} was refused because of {A}'s rate. Daemon log:\n{}",
        lab.logs()
    );
    lab.daemon.terminate();
    let logs = lab.logs();
    let counters = logs
        .lines()
        .find(|l| l.contains("xdp counters: global"))
        .unwrap_or_else(|| panic!("no XDP counters at exit:\n{logs}"));
    // Every counter is printed with its name: the value is what matters.
    let refused: u64 = counters
        .split_whitespace()
        .find_map(|w| w.strip_prefix("refused_client_rate="))
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no refused_client_rate in the XDP counters: {counters}"));
    assert!(
        refused > 0,
        "the rate refusals are not counted in the XDP counters: {counters}"
    );
}

/// Deletes `flow`'s entry from the kernel's `CONNTRACK` map that holds it, as the LRU evicts
/// entries: the maps are not pinned, so every loaded map of that name is looked at, and only
/// this test's daemon's holds the flow (its client address is this test's alone). Returns
/// whether an entry was deleted.
fn evict(flow: &FlowKey) -> bool {
    with_entry(flow, |conntrack| conntrack.remove(flow).is_ok())
}

/// Makes `flow`'s entry look last seen `seconds` earlier than it was (see [`evict`] for how
/// it is found). Returns whether an entry was changed.
fn backdate(flow: &FlowKey, seconds: u32) -> bool {
    with_entry(flow, |conntrack| {
        let Ok(mut e) = conntrack.get(flow, 0) else {
            return false;
        };
        e.seen_s = e.seen_s.wrapping_sub(seconds);
        conntrack.insert(flow, e, 0).is_ok()
    })
}

/// Runs `f` on the `CONNTRACK` map that holds `flow`; `false` when none does.
fn with_entry(
    flow: &FlowKey,
    f: impl FnOnce(&mut AyaHashMap<MapData, FlowKey, CtEntry>) -> bool,
) -> bool {
    for info in loaded_maps().flatten() {
        if info.name_as_str() != Some(CONNTRACK) {
            continue;
        }
        let Ok(data) = MapData::from_id(info.id()) else {
            continue;
        };
        let Ok(map) = Map::from_map_data(data) else {
            continue;
        };
        let Ok(mut conntrack) = AyaHashMap::<_, FlowKey, CtEntry>::try_from(map) else {
            continue;
        };
        if conntrack.get(flow, 0).is_ok() {
            return f(&mut conntrack);
        }
    }
    false
}

/// A counted flow idle past its service's idle timeout and the grace after it (a client
/// gone without a word, a SYN its backend never answered, or a connection merely idle) no
/// longer holds its client's slot: the sweep gives it back though its entry is still there.
/// If the flow then goes on, it goes on uncounted, and its end gives nothing back twice.
#[test]
fn a_slot_held_by_a_flow_idle_past_its_timeout_is_given_back_by_the_sweep() {
    if !lb_tests::require_root("xdp_limits::a_slot_held_by_a_flow_idle_past_its_timeout") {
        return;
    }
    // A 1 s idle timeout: a flow's slot expires 64 s after its last packet
    // (`lb_common::maps::slot_expired`); the test makes one look that old.
    let lab = start_with(Plane::Xdp, |toml| {
        toml.replace(
            "name = \"conns\"",
            "name = \"conns\"\nidle_timeout = \"1s\"",
        )
    });
    let mut first = lab.hold(C, CONNS, "C's first connection");
    let mut second = lab.hold(C, CONNS, "C's second connection");
    assert!(
        lab.refused(C, CONNS),
        "a third connection from {C} was served"
    );
    let mark = lab.daemon.log_mark();
    assert!(
        backdate(&Lab::flow_of(&first), 120),
        "no CONNTRACK map held the flow of C's first connection"
    );
    // Two sweeps (10 s apart) see the excess. Meanwhile both connections carry a request
    // every few seconds (the backend ends a connection idle for 15 s): the first one's
    // next packet finds its slot expired, and it goes on uncounted.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut given = false;
    while !given && std::time::Instant::now() < deadline {
        for (c, which) in [(&mut first, "first"), (&mut second, "second")] {
            let body = lab
                .client(|| c.get("/"))
                .unwrap_or_else(|e| panic!("a request on C's {which} connection: {e}"));
            assert_eq!(body, "b1");
        }
        given = lab
            .daemon
            .wait_for_log_after(
                mark,
                "XDP limits: gave back 1 connection slots",
                Duration::from_secs(3),
            )
            .is_ok();
    }
    assert!(given, "the sweep gave no slot back:\n{}", lab.logs());
    let _third = lab.hold(C, CONNS, "C's connection after the sweep");
    // The first flow ends: it held no slot any more, so C stays at its limit of 2.
    drop(first);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        lab.refused(C, CONNS),
        "the end of a flow whose slot the sweep gave back gave a slot back a second time"
    );
    drop(second);
}

#[test]
fn a_slot_held_by_an_evicted_flow_is_given_back_by_the_sweep() {
    if !lb_tests::require_root("xdp_limits::a_slot_held_by_an_evicted_flow_is_given_back") {
        return;
    }
    let lab = start(Plane::Xdp);
    let first = lab.hold(C, CONNS, "C's first connection");
    let _second = lab.hold(C, CONNS, "C's second connection");
    assert!(
        lab.refused(C, CONNS),
        "a third connection from {C} was served"
    );
    assert!(
        evict(&Lab::flow_of(&first)),
        "no CONNTRACK map held the flow of C's first connection"
    );
    // Its FIN now finds no entry: the slot is not given back by the program.
    let mark = lab.daemon.log_mark();
    drop(first);
    assert!(
        lab.refused(C, CONNS),
        "C's slot came back without its conntrack entry; the test no longer evicts"
    );
    // Two sweeps (10 s apart) see the excess; the second gives the slot back.
    lab.daemon
        .wait_for_log_after(
            mark,
            "XDP limits: gave back 1 connection slots",
            Duration::from_secs(35),
        )
        .unwrap_or_else(|e| panic!("the sweep gave no slot back: {e}\n{}", lab.logs()));
    let _third = lab.hold(C, CONNS, "C's connection after the sweep");
}
