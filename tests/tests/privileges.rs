//! Least privilege: once started, every thread of the daemon holds only the capabilities its
//! config can use (`lb_daemon::privileges`), with no-new-privileges set, and it still serves.
//! Read from `/proc/PID/task/*/status`, as an operator would check it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_daemon::config::DEFAULT_WORKER_PRIORITY;
use lb_tests::client::http_get;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::netns::Netns;
use lb_tests::ports::free_addr;
use lb_tests::xdp::world::{World, WEB};
use lb_tests::xdp::{in_netns, Mode, Path, Topology};
use lb_tests::{Daemon, HttpNameServer};

/// Capability numbers (linux/capability.h).
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_NICE: u32 = 23;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// A proxy worker lowers its own set within its sweep period (at most a second).
const LOWERED_WITHIN: Duration = Duration::from_secs(5);

/// The mask of those of `caps` this test process has (the daemon it starts inherits its
/// capabilities, and can keep no others), plus `CAP_SYS_NICE` where the daemon keeps it for the default
/// `worker_priority`, as `lb_daemon::priority::allow` decides in the daemon this test process
/// starts (which inherits its capabilities, limits and nice value): the value is below this
/// process's, `RLIMIT_NICE` neither allows it nor can be raised to (no `CAP_SYS_RESOURCE`,
/// a hard limit too low), and the capability is there to keep.
fn mask(caps: &[u32]) -> u64 {
    let own = threads(std::process::id())
        .into_values()
        .next()
        .map_or(0, |(eff, _, _)| eff);
    let nice = DEFAULT_WORKER_PRIORITY;
    let wanted = lb_daemon::priority::limit_for(nice);
    let limit =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NICE).unwrap_or((0, 0));
    let keeps = nice < lb_tests::threads::own_nice()
        && limit.0 < wanted
        && limit.1 < wanted
        && own & 1 << CAP_SYS_RESOURCE == 0
        && own & 1 << CAP_SYS_NICE != 0;
    caps.iter()
        .fold(if keeps { 1 << CAP_SYS_NICE } else { 0 }, |m, c| m | 1 << c)
        & (own | 1 << CAP_SYS_NICE)
}

/// Each thread of process `pid`: its name, effective and permitted capability masks, and
/// whether no-new-privileges is set.
fn threads(pid: u32) -> BTreeMap<String, (u64, u64, bool)> {
    let mut out = BTreeMap::new();
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // a thread that ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let hex = |name: &str| u64::from_str_radix(&field(name), 16).unwrap_or(u64::MAX);
        out.insert(
            format!(
                "{} ({})",
                field("Name:"),
                task.file_name().to_string_lossy()
            ),
            (hex("CapEff:"), hex("CapPrm:"), field("NoNewPrivs:") == "1"),
        );
    }
    out
}

/// Waits until every thread of process `pid` holds exactly `want` (effective and permitted) with
/// no-new-privileges; panics with the threads that do not.
fn assert_lowered_to(pid: u32, want: u64, what: &str) {
    let deadline = Instant::now() + LOWERED_WITHIN;
    loop {
        let all = threads(pid);
        // The log's writer drops every capability at its start (it needs none).
        let wanted = |name: &str| if name.starts_with("lb-log ") { 0 } else { want };
        let wrong: Vec<_> = all
            .iter()
            .filter(|(name, &(eff, prm, nnp))| eff != wanted(name) || prm != wanted(name) || !nnp)
            .collect();
        if wrong.is_empty() {
            assert!(!all.is_empty(), "{what}: no thread read");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: every thread should hold capabilities {want:#x} and no-new-privileges \
             {LOWERED_WITHIN:?} after start-up; these do not (name: effective, permitted, \
             no-new-privs): {wrong:x?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_proxy_only_daemon_on_a_high_port_keeps_only_what_its_pipes_need_and_serves() {
    if !lb_tests::require_root("privileges::a_proxy_only_daemon_keeps_only_what_its_pipes_need") {
        return;
    }
    let backend = HttpNameServer::start("b1").expect("a backend starts");
    let vip = free_addr();
    let svc = ServiceConfig::tcp("web", vip)
        .set("dataplane", "proxy")
        .health("kind", "none")
        .backend(backend.addr(), 1);
    let daemon = Daemon::start(&DaemonConfig::new().service(svc).to_toml());
    daemon
        .wait_for_log("privileges: kept", Duration::from_secs(5))
        .expect("the daemon logs the capabilities it kept");
    assert_lowered_to(
        daemon.pid(),
        mask(&[CAP_SYS_RESOURCE]),
        "a proxy-only daemon on a high port",
    );
    let reply = http_get(vip, "/").unwrap_or_else(|e| panic!("a request after the drop: {e}"));
    assert_eq!(reply, "b1", "the backend answered");
}

#[test]
fn a_proxy_daemon_on_port_80_with_udp_keeps_bind_and_buffer_capabilities() {
    if !lb_tests::require_root("privileges::a_proxy_daemon_on_port_80_with_udp") {
        return;
    }
    let ns = Netns::new("priv").expect("a namespace");
    let backend = in_netns(&ns, || {
        HttpNameServer::start("b1").expect("a backend starts")
    })
    .expect("enter the namespace");
    let web: SocketAddr = "127.0.0.1:80".parse().expect("literal");
    let dns: SocketAddr = "127.0.0.1:5353".parse().expect("literal");
    let toml = DaemonConfig::new()
        .service(
            ServiceConfig::tcp("web", web)
                .set("dataplane", "proxy")
                .health("kind", "none")
                .backend(backend.addr(), 1),
        )
        .service(
            ServiceConfig::udp("dns", dns)
                .set("dataplane", "proxy")
                .health("kind", "none")
                .backend("127.0.0.1:5300".parse().expect("literal"), 1),
        )
        .to_toml();
    let daemon = in_netns(&ns, || Daemon::start(&toml)).expect("enter the namespace");
    assert_lowered_to(
        daemon.pid(),
        mask(&[CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_SYS_RESOURCE]),
        "a proxy daemon on port 80 with a UDP service",
    );
    let reply = in_netns(&ns, || http_get(web, "/"))
        .expect("enter the namespace")
        .unwrap_or_else(|e| panic!("a request after the drop: {e}"));
    assert_eq!(reply, "b1", "the backend answered");
}

#[test]
fn an_ebpf_daemon_keeps_what_reloads_need_and_serves() {
    if !lb_tests::require_root("privileges::an_ebpf_daemon_keeps_what_reloads_need") {
        return;
    }
    // The test world: web (80), bulk (81) and dns (53, UDP) on tc, NAT.
    let world = World::start(Path::tc(Mode::Nat), 2, 2);
    assert_lowered_to(
        world.daemon.pid(),
        mask(&[CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF]),
        "a daemon with services on tc",
    );
    let vip = Topology::vip(WEB);
    for i in 0..20 {
        let reply = world
            .client(|| http_get(vip, "/"))
            .unwrap_or_else(|e| panic!("request {i} through tc after the drop: {e}"));
        assert!(
            reply.starts_with('b'),
            "request {i}: a backend's name, not {reply:?}"
        );
    }
}

/// Whether thread `name` is a proxy worker, or an io-wq thread the kernel forked from one
/// (which takes its nice value).
fn is_worker(name: &str) -> bool {
    name.starts_with("lb-proxy-") || name.starts_with("iou-wrk-")
}

/// Waits until every proxy worker thread of process `pid` runs at nice `workers` (and there is
/// at least one `lb-proxy-N`) and every other thread at `rest`; panics with the threads that
/// do not.
fn assert_nice(pid: u32, workers: i32, rest: i32, what: &str) {
    let deadline = Instant::now() + LOWERED_WITHIN;
    loop {
        let all = lb_tests::threads::nice_values(pid);
        let proxy = all
            .iter()
            .filter(|(n, _)| n.starts_with("lb-proxy-"))
            .count();
        let wrong: Vec<_> = all
            .iter()
            .filter(|(name, nice)| *nice != if is_worker(name) { workers } else { rest })
            .collect();
        if proxy > 0 && wrong.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the proxy workers should run at nice {workers} and the other threads at \
             {rest}; these do not (name, nice): {wrong:?} of {all:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `[global] worker_priority`: the proxy workers lower their nice value (default -10), the
/// control plane keeps the daemon's. The daemon an upgrade in place starts has only the
/// capabilities the first one kept, so its workers can lower themselves only by the
/// `RLIMIT_NICE` the first one raised, or by the `CAP_SYS_NICE` it kept where the limit
/// could not be raised (`lb_daemon::priority`); it keeps no more than the first.
#[test]
fn proxy_workers_run_at_worker_priority_also_after_an_upgrade_in_place() {
    if !lb_tests::require_root("privileges::proxy_workers_run_at_worker_priority") {
        return;
    }
    let own = lb_tests::threads::own_nice();
    let backend = HttpNameServer::start("b1").expect("a backend starts");
    let web = |vip| {
        ServiceConfig::tcp("web", vip)
            .set("dataplane", "proxy")
            .health("kind", "none")
            .backend(backend.addr(), 1)
    };
    let vip = free_addr();
    let old = Daemon::start(
        &DaemonConfig::new()
            .global("workers", 2)
            .service(web(vip))
            .to_toml(),
    );
    old.wait_for_log("privileges: kept", Duration::from_secs(5))
        .expect("the daemon logs the capabilities it kept");
    // A request first: the io-wq threads its relay may start must take the workers' value.
    assert_eq!(http_get(vip, "/").expect("a request"), "b1");
    assert_nice(
        old.pid(),
        DEFAULT_WORKER_PRIORITY,
        own,
        "the default worker_priority",
    );

    let mark = old.log_mark();
    let new = old
        .upgrade_in_place()
        .unwrap_or_else(|e| panic!("no upgrade in place: {e}"));
    old.wait_for_log_after(mark, "the new daemon took over", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the new daemon did not take over: {e}"));
    assert_eq!(
        http_get(vip, "/").expect("a request to the new daemon"),
        "b1"
    );
    let pid = new.pid().as_raw() as u32;
    assert_nice(
        pid,
        DEFAULT_WORKER_PRIORITY,
        own,
        "the daemon an upgrade in place started",
    );
    assert_lowered_to(
        pid,
        mask(&[CAP_SYS_RESOURCE]),
        "the daemon an upgrade in place started",
    );
    drop(new);

    let toml = DaemonConfig::new()
        .global("worker_priority", 3)
        .service(web(free_addr()))
        .to_toml();
    let daemon = Daemon::start(&toml);
    assert_nice(daemon.pid(), 3, own, "worker_priority = 3");
}
