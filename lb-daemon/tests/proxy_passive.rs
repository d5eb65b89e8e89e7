//! Passive health checking without active checks (`kind = "none"`, nginx's `max_fails` and
//! `fail_timeout`), through the real proxy and the real control plane: a backend that fails
//! `fall` times in a row leaves the table, and is given its share again after
//! `passive_timeout`.

mod proxy_support;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_daemon::admin::status::BackendStatus;
use lb_daemon::dataplane::proxy::{Proxy, ProxyOptions};
use lb_daemon::dataplane::ServiceHandle;
use lb_daemon::service::{PassiveFeedback, ServiceRuntime, ServiceSet};
use lb_tests::{ports::free_addr, UdpEcho};
use proxy_support::{init_logs, udp_socket, wait_until, TcpBackend, SERVICE};

/// Consecutive passive failures that take a backend out.
const FALL: u32 = 2;
/// How long it stays out. Long enough for a phase of the test to run inside it on a busy
/// machine, short enough to wait for twice.
const HOLD_OFF: Duration = Duration::from_secs(4);
/// How long a client waits for a reply before it counts its datagram as lost and resends.
const REPLY_WAIT: Duration = Duration::from_millis(300);

/// A proxy carrying one service whose health the real [`ServiceRuntime`] keeps, fed by the
/// proxy's connect reports through [`PassiveFeedback`], as in the daemon.
struct Balancer {
    proxy: Option<Proxy>,
    service: Arc<ServiceRuntime>,
    vip: SocketAddr,
    // Runs the service's ticker and the passive feedback task; dropped last.
    _runtime: tokio::runtime::Runtime,
}

impl Balancer {
    fn start(protocol: &str, backends: &[SocketAddr]) -> Balancer {
        init_logs();
        let mut text = format!(
            r#"
[[service]]
name = "passive"
listen = "127.0.0.1:0"
protocol = "{protocol}"
scheduler = "round_robin"
retries = 1
[service.health]
kind = "none"
fall = {FALL}
passive_timeout = "{}ms"
"#,
            HOLD_OFF.as_millis()
        );
        for b in backends {
            text.push_str(&format!("[[service.backend]]\naddress = \"{b}\"\n"));
        }
        let config = lb_daemon::config::parse(&text, Path::new("test.toml"))
            .expect("a valid test config")
            .services
            .remove(0);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let service = ServiceRuntime::new(SERVICE, config).expect("the service builds");
        let set = ServiceSet::new();
        set.set(vec![Arc::clone(&service)]);
        let (feedback, rx) = PassiveFeedback::new(1024);
        runtime.spawn(PassiveFeedback::apply(set, rx));
        {
            let _inside = runtime.enter();
            service.start();
        }
        let proxy = Proxy::start_with(
            vec![ServiceHandle {
                index: SERVICE,
                snapshot: service.snapshot(),
            }],
            1,
            feedback,
            ProxyOptions::default(),
        )
        .expect("the proxy starts on a free loopback port");
        let vip = proxy.listen_addr(SERVICE).expect("the service's address");
        Balancer {
            proxy: Some(proxy),
            service,
            vip,
            _runtime: runtime,
        }
    }

    fn backend(&self, i: usize) -> BackendStatus {
        self.service.status().backends[i].clone()
    }

    /// Waits (at most `limit`) until backend `i`'s health reads `health`.
    fn wait_health(&self, i: usize, health: &str, limit: Duration) -> bool {
        wait_until(limit, || self.backend(i).health == health)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.service.stop();
        // Dropping the proxy stops its workers.
        drop(self.proxy.take());
    }
}

/// A client socket on the VIP that waits [`REPLY_WAIT`] for each reply.
fn client(vip: SocketAddr) -> UdpSocket {
    let socket = udp_socket();
    socket.connect(vip).expect("connect to the VIP");
    socket
        .set_read_timeout(Some(REPLY_WAIT))
        .expect("read timeout");
    socket
}

/// Sends `payload` until a reply comes, at most 5 times; returns the name of the backend
/// that answered (`None` if none did) and how many datagrams were lost first.
fn ask(socket: &UdpSocket, payload: &str) -> (Option<String>, usize) {
    let mut buf = [0u8; 256];
    for lost in 0..5 {
        socket.send(payload.as_bytes()).expect("send to the VIP");
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let name = text.split_once(':').map(|(name, _)| name.to_string());
            return (name, lost);
        }
    }
    (None, 5)
}

/// Asks once from each of `count` new clients, in turn; returns who answered each and the
/// datagrams each lost.
fn new_clients(vip: SocketAddr, count: usize, tag: &str) -> Vec<(Option<String>, usize)> {
    (0..count)
        .map(|i| ask(&client(vip), &format!("{tag}-{i}")))
        .collect()
}

fn lost(runs: &[(Option<String>, usize)]) -> usize {
    runs.iter().map(|r| r.1).sum()
}

#[test]
fn a_dead_udp_backend_without_checks_goes_out_after_fall_failures_and_is_retried_later() {
    let b0 = UdpEcho::start("b0").expect("start a UDP echo backend");
    let b1 = UdpEcho::start("b1").expect("start a UDP echo backend");
    let b1_addr = b1.addr();
    let lb = Balancer::start("udp", &[b0.addr(), b1_addr]);

    // Two clients with sessions on each backend.
    let old = [client(lb.vip), client(lb.vip)];
    let first: Vec<_> = old.iter().map(|c| ask(c, "hello")).collect();
    let mut names: Vec<_> = first.iter().map(|r| r.0.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        [Some("b0".to_string()), Some("b1".to_string())],
        "round robin should give the two clients one backend each"
    );
    assert_eq!(
        lost(&first),
        0,
        "no datagram is lost while both backends run"
    );

    // b1 stops: its port answers with ICMP port unreachable.
    drop(b1);
    let mut runs: Vec<_> = old.iter().map(|c| ask(c, "again")).collect();
    runs.extend(new_clients(lb.vip, 20, "after-b1-stopped"));
    assert!(
        lb.wait_health(1, "down", Duration::from_secs(2)),
        "b1 is not DOWN after the clients' datagrams to it were refused: {:?}",
        lb.backend(1)
    );
    let down_at = Instant::now();
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(
            r.0.as_deref(),
            Some("b0"),
            "client {i} was not answered by b0 after b1 stopped: {runs:?}"
        );
        assert!(
            r.1 <= 1,
            "client {i} lost {} datagrams; only one may reveal the failure: {runs:?}",
            r.1
        );
    }
    assert_eq!(
        lost(&runs),
        FALL as usize,
        "exactly fall = {FALL} datagrams should reveal that b1 is dead, then no client may be \
         sent to it: {runs:?}"
    );
    let status = lb.backend(1);
    let why = status.last_check.clone().unwrap_or_default();
    assert!(
        why.starts_with(&format!("passive: {FALL} consecutive failures"))
            && why.contains("retry in"),
        "the status should say why b1 is down and when it is retried: {status:?}"
    );
    assert_eq!(status.effective_weight, 0);

    // The hold-off runs out while b1 is still dead: it is tried, and the first datagram it
    // refuses takes it out again.
    assert!(
        lb.wait_health(1, "up", HOLD_OFF + Duration::from_secs(3)),
        "b1 was not tried again within its {HOLD_OFF:?} hold-off (+3 s): {:?}",
        lb.backend(1)
    );
    let waited = down_at.elapsed();
    assert!(
        waited + Duration::from_millis(500) >= HOLD_OFF,
        "b1 came back after {waited:?}, before its {HOLD_OFF:?} hold-off"
    );
    let retry = new_clients(lb.vip, 10, "b1-on-trial");
    assert!(
        retry.iter().all(|r| r.0.as_deref() == Some("b0")),
        "every client should end on b0: {retry:?}"
    );
    assert_eq!(
        lost(&retry),
        1,
        "on trial, one refused datagram should take b1 out again: {retry:?}"
    );
    assert_eq!(lb.backend(1).health, "down");

    // b1 is back on its port: after the next hold-off it gets its share again.
    let b1 = UdpEcho::start_on("b1", b1_addr).expect("restart a UDP echo backend on its port");
    assert!(
        lb.wait_health(1, "up", HOLD_OFF + Duration::from_secs(3)),
        "b1 was not tried again after its second hold-off: {:?}",
        lb.backend(1)
    );
    let back = new_clients(lb.vip, 10, "b1-back");
    assert_eq!(lost(&back), 0, "b1 answers again: {back:?}");
    let on_b1 = back.iter().filter(|r| r.0.as_deref() == Some("b1")).count();
    assert!(
        on_b1 >= 4,
        "b1 should get its share of new clients again (round robin: 5 of 10), got {on_b1}: \
         {back:?}"
    );
    assert_eq!(
        lb.backend(1).last_check,
        None,
        "b1 answered, so its trial is over"
    );
    drop(b1);
}

#[test]
fn a_refusing_tcp_backend_without_checks_goes_out_and_is_retried_after_the_hold_off() {
    let live = TcpBackend::echo();
    let dead = free_addr();
    let lb = Balancer::start("tcp", &[live.addr, dead]);
    // Connections that round robin sends to the dead backend are retried on the live one,
    // so every client gets through; the dead one is only tried until it is out.
    let connect_all = |count: usize| {
        for i in 0..count {
            let mut s = std::net::TcpStream::connect(lb.vip).expect("connect to the VIP");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("read timeout");
            use std::io::{Read, Write};
            s.write_all(b"ping").expect("write through the VIP");
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf)
                .unwrap_or_else(|e| panic!("client {i} got no echo: {e}"));
            assert_eq!(&buf, b"ping");
            // Leaves the control plane time to publish a table that a refused connect
            // changed, as clients spread in time would.
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    connect_all(20);
    assert!(
        lb.wait_health(1, "down", Duration::from_secs(2)),
        "the refusing backend is not DOWN: {:?}",
        lb.backend(1)
    );
    let down_at = Instant::now();
    let failures = lb.backend(1).connect_failures;
    // A connect placed by the table published before the DOWN one may still fail.
    assert!(
        (u64::from(FALL)..=u64::from(FALL) + 1).contains(&failures),
        "fall = {FALL} refused connects should take it out, then no connect may go to it; \
         it refused {failures}"
    );
    connect_all(10);
    assert_eq!(
        lb.backend(1).connect_failures,
        failures,
        "a DOWN backend got connects"
    );
    assert!(
        lb.wait_health(1, "up", HOLD_OFF + Duration::from_secs(3)),
        "not tried again after the hold-off: {:?}",
        lb.backend(1)
    );
    let waited = down_at.elapsed();
    assert!(
        waited + Duration::from_millis(500) >= HOLD_OFF,
        "tried again after {waited:?}, before its {HOLD_OFF:?} hold-off"
    );
    connect_all(10);
    let on_trial = lb.backend(1).connect_failures - failures;
    assert!(
        (1..=2).contains(&on_trial),
        "on trial, one refused connect should take it out again (a second may race the new \
         table); it refused {on_trial}"
    );
    assert_eq!(lb.backend(1).health, "down");
}
