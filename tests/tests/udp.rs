//! UDP through the balancer: each client (one source address and port) is a session that
//! stays on one backend, and on loopback no datagram is lost; without active checks, a
//! backend that stops is taken out by the failures clients reveal, and tried again later.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_tests::admin;
use lb_tests::client::{udp_request, UdpClient};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::load::wait_until_each_answers;
use lb_tests::netns::Netns;
use lb_tests::ports::free_addr;
use lb_tests::xdp::in_netns;
use lb_tests::{Daemon, Tally, UdpEcho};

const CLIENTS: usize = 3;
const DATAGRAMS: usize = 1_000;
/// Datagrams a client has in flight at most.
const WINDOW: usize = 16;
/// How long a client waits for the next reply before it counts the rest as lost.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// What one client saw.
struct ClientRun {
    client: SocketAddr,
    backends: Tally,
    missing: Vec<usize>,
    problems: Vec<String>,
}

/// Sends `DATAGRAMS` numbered datagrams from one socket, at most `WINDOW` unanswered, and
/// checks every reply: it must echo a datagram that was sent and not yet answered.
fn client_run(vip: SocketAddr, id: usize) -> ClientRun {
    let c = UdpClient::new(vip).expect("a UDP client socket");
    let client = c.local_addr().expect("local address");
    let mut answered = vec![false; DATAGRAMS];
    let mut backends = Tally::new();
    let mut problems = Vec::new();
    let (mut sent, mut received) = (0, 0);
    let end = Instant::now() + Duration::from_secs(60);
    while received < DATAGRAMS && Instant::now() < end {
        while sent < DATAGRAMS && sent - received < WINDOW {
            c.send(format!("c{id}-{sent}").as_bytes())
                .expect("sending a datagram on loopback");
            sent += 1;
        }
        let reply = match c.recv(REPLY_TIMEOUT) {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                problems.push(format!("receive failed: {e}"));
                break;
            }
        };
        received += 1;
        let text = String::from_utf8_lossy(&reply).to_string();
        let Some((backend, payload)) = text.split_once(':') else {
            problems.push(format!("reply {text:?} is not `backend:payload`"));
            continue;
        };
        let seq = payload
            .strip_prefix(&format!("c{id}-"))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n < sent);
        match seq {
            Some(n) if !answered[n] => {
                answered[n] = true;
                backends.add(backend);
            }
            Some(n) => problems.push(format!("datagram {n} was answered twice")),
            None => problems.push(format!("reply {text:?} answers nothing this client sent")),
        }
    }
    let missing = (0..DATAGRAMS).filter(|&n| !answered[n]).collect();
    ClientRun {
        client,
        backends,
        missing,
        problems,
    }
}

#[test]
fn each_udp_client_stays_on_one_backend_and_nothing_is_lost() {
    let echoes: Vec<UdpEcho> = (1..=3)
        .map(|i| UdpEcho::start(&format!("u{i}")).expect("a UDP echo starts"))
        .collect();
    let vip = free_addr();
    let mut svc = ServiceConfig::udp("echo", vip)
        .scheduler("round_robin")
        .fast_health("udp")
        .health("send", "ping");
    for e in &echoes {
        svc = svc.backend(e.addr(), 1);
    }
    // One worker: round_robin's "each backend in turn" is then one sequence for all clients
    // (with several workers each may keep its own turn).
    let config = DaemonConfig::new().global("workers", 1).service(svc);
    let _daemon = Daemon::start(&config.to_toml());
    // Each probe is a new socket, so a new session: round_robin walks all backends.
    wait_until_each_answers(&["u1", "u2", "u3"], Duration::from_secs(15), || {
        let reply = udp_request(vip, b"hello", Duration::from_millis(500))?;
        let text = String::from_utf8_lossy(&reply).to_string();
        Ok(text.split(':').next().unwrap_or_default().to_string())
    })
    .unwrap_or_else(|e| panic!("the UDP service never came up on all backends: {e}"));

    let runs: Vec<ClientRun> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|id| s.spawn(move || client_run(vip, id)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });

    let mut first_backend = BTreeSet::new();
    for r in &runs {
        assert!(
            r.problems.is_empty(),
            "client {}: {}",
            r.client,
            r.problems.join("; ")
        );
        assert!(
            r.missing.is_empty(),
            "client {} lost {} of {DATAGRAMS} datagrams on loopback (first lost: {:?})",
            r.client,
            r.missing.len(),
            &r.missing[..r.missing.len().min(10)]
        );
        let served_by: Vec<&str> = r.backends.iter().map(|(b, _)| b).collect();
        assert_eq!(
            served_by.len(),
            1,
            "client {}'s datagrams were answered by several backends ({}); a client's session \
             must stay on one",
            r.client,
            r.backends
        );
        first_backend.insert(served_by[0].to_string());
    }
    assert_eq!(
        first_backend.len(),
        CLIENTS,
        "round_robin should give each of the {CLIENTS} new clients its own backend, but they \
         were served by {first_backend:?}"
    );
    let answered: u64 = echoes.iter().map(|e| e.datagrams()).sum();
    assert!(
        answered >= (CLIENTS * DATAGRAMS) as u64,
        "the backends answered {answered} datagrams for {} sent",
        CLIENTS * DATAGRAMS
    );
}

/// Sends one datagram from a new client, resending every 300 ms until it is answered (at
/// most 5 times). Returns who answered (`None` if nobody did) and the datagrams lost first.
///
/// The client's socket goes into `held`, to stay open until the test ends: the kernel picks
/// a closed socket's port again at random, and a later client on it would find the session
/// the balancer still keeps for that port (with its backend), not open a new one.
fn new_client_asks(
    vip: SocketAddr,
    payload: &str,
    held: &mut Vec<UdpClient>,
) -> (Option<String>, usize) {
    held.push(UdpClient::new(vip).expect("a UDP client socket"));
    let c = held.last().expect("just pushed");
    for lost in 0..5 {
        c.send(payload.as_bytes())
            .expect("sending a datagram on loopback");
        if let Ok(Some(reply)) = c.recv(Duration::from_millis(300)) {
            let text = String::from_utf8_lossy(&reply).to_string();
            return (text.split(':').next().map(str::to_string), lost);
        }
    }
    (None, 5)
}

#[test]
fn without_checks_a_stopped_backend_leaves_after_fall_lost_datagrams_and_returns_after_the_hold_off(
) {
    const FALL: usize = 2;
    const HOLD_OFF: Duration = Duration::from_secs(4);
    let u1 = UdpEcho::start("u1").expect("a UDP echo starts");
    let mut u2 = UdpEcho::start("u2").expect("a UDP echo starts");
    let vip = free_addr();
    let svc = ServiceConfig::udp("echo", vip)
        .scheduler("round_robin")
        .health("kind", "none")
        .health("fall", FALL as i64)
        .health("passive_timeout", "4s")
        .backend(u1.addr(), 1)
        .backend(u2.addr(), 1);
    let config = DaemonConfig::new().global("workers", 1).service(svc);
    let daemon = Daemon::start(&config.to_toml());
    // Every client socket of the test, open until it ends (see `new_client_asks`).
    let held = RefCell::new(Vec::new());
    wait_until_each_answers(&["u1", "u2"], Duration::from_secs(15), || {
        let client = UdpClient::new(vip)?;
        let reply = client.request(b"hello", Duration::from_millis(500));
        held.borrow_mut().push(client);
        let text = String::from_utf8_lossy(&reply?).to_string();
        Ok(text.split(':').next().unwrap_or_default().to_string())
    })
    .unwrap_or_else(|e| panic!("the UDP service never came up on both backends: {e}"));
    let mut held = held.into_inner();
    let u2_addr = u2.addr();
    let u2_status = || {
        admin::backend(&admin::status(daemon.admin_addr()), "echo", u2_addr)
            .expect("u2 is in the status")
            .clone()
    };

    u2.stop();
    let stopped = Instant::now();
    let runs: Vec<_> = (0..20)
        .map(|i| new_client_asks(vip, &format!("after-stop-{i}"), &mut held))
        .collect();
    let lost: usize = runs.iter().map(|r| r.1).sum();
    assert!(
        runs.iter()
            .all(|r| r.0.as_deref() == Some("u1") && r.1 <= 1),
        "every client should be answered by u1, losing at most the one datagram that revealed \
         u2 had stopped: {runs:?}"
    );
    assert_eq!(
        lost, FALL,
        "fall = {FALL} lost datagrams should take u2 out; then no new client may be sent to it: \
         {runs:?}"
    );
    let status = u2_status();
    assert_eq!(status["health"], "down", "u2 in /status: {status}");
    let why = status["last_check"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        why.starts_with("passive: 2 consecutive failures") && why.contains("retry in"),
        "/status should say why u2 is down and when it is retried: {status}"
    );

    u2.restart().expect("u2 reopens its port");
    let deadline = Instant::now() + HOLD_OFF + Duration::from_secs(5);
    let mut answered_by_u2 = false;
    while Instant::now() < deadline && !answered_by_u2 {
        answered_by_u2 = new_client_asks(vip, "back", &mut held).0.as_deref() == Some("u2");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        answered_by_u2,
        "u2 got no new client within its {HOLD_OFF:?} hold-off + 5 s after it came back: {}",
        u2_status()
    );
    // It went down after it stopped, and is tried again only a full hold-off later.
    let back_after = stopped.elapsed();
    assert!(
        back_after >= HOLD_OFF,
        "u2 got a new client {back_after:?} after it stopped, within its {HOLD_OFF:?} hold-off"
    );
    assert_eq!(u2_status()["health"], "up");
}

/// A backend whose route goes away while a client's session is on it (a withdrawn route, an
/// `unreachable` route here): the first datagram that cannot be sent ends the session, the
/// next session's connect counts against the backend, so the client's next datagrams reach
/// the other backend once `fall` failures took the first out, instead of vanishing until the
/// session's idle timeout.
#[test]
fn a_session_whose_backend_becomes_unreachable_moves_to_another_backend() {
    if !lb_tests::require_root("udp::a_session_whose_backend_becomes_unreachable") {
        return;
    }
    let near = Netns::new("unreach").expect("a namespace for the balancer");
    let far = Netns::new("far").expect("a namespace for the far backend");
    lb_tests::netns::veth(&near, "v0", "10.99.0.1/24", &far, "v1", "10.99.0.2/24")
        .expect("a veth between the namespaces");
    let far_addr: SocketAddr = "10.99.0.2:5300".parse().expect("literal");
    let near_addr: SocketAddr = "127.0.0.2:5300".parse().expect("literal");
    let _u1 = in_netns(&far, || UdpEcho::start_on("u1", far_addr))
        .expect("enter the far namespace")
        .expect("u1 starts");
    let _u2 = in_netns(&near, || UdpEcho::start_on("u2", near_addr))
        .expect("enter the balancer's namespace")
        .expect("u2 starts");
    let vip: SocketAddr = "127.0.0.1:5353".parse().expect("literal");
    let svc = ServiceConfig::udp("echo", vip)
        .set("dataplane", "proxy")
        .set("idle_timeout", "60s")
        .scheduler("round_robin")
        .health("kind", "none")
        .health("fall", 2)
        .backend(far_addr, 1)
        .backend(near_addr, 1);
    let config = DaemonConfig::new().global("workers", 1).service(svc);
    let daemon = in_netns(&near, || Daemon::start(&config.to_toml()))
        .expect("enter the balancer's namespace");
    let errors = || {
        in_netns(&near, || {
            admin::status(daemon.admin_addr())["proxy"]["errors"].as_u64()
        })
        .expect("enter the balancer's namespace")
        .expect("the proxy's error count in /status")
    };

    // A client whose session is on u1 (round robin: one of the first few).
    let client = in_netns(&near, || {
        (0..10).find_map(|_| {
            let c = UdpClient::new(vip).expect("a UDP client socket");
            c.send(b"who").ok()?;
            let reply = c.recv(Duration::from_millis(500)).ok()??;
            reply.starts_with(b"u1:").then_some(c)
        })
    })
    .expect("enter the balancer's namespace")
    .expect("no client of 10 got a session on u1");

    near.ip(&["route", "add", "unreachable", "10.99.0.2/32"])
        .expect("an unreachable route to u1");
    let start = Instant::now();
    let mut answers = Vec::new();
    while start.elapsed() < Duration::from_secs(5) {
        client
            .send(b"again")
            .expect("sending a datagram on loopback");
        if let Ok(Some(reply)) = client.recv(Duration::from_millis(100)) {
            let from = String::from_utf8_lossy(&reply)
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string();
            answers.push(from.clone());
            if from == "u2" {
                break;
            }
        }
    }
    assert_eq!(
        answers.last().map(String::as_str),
        Some("u2"),
        "the client's datagrams should reach u2 once u1 became unreachable, well before the \
         session's 60 s idle timeout; in {:?} it got answers from {answers:?}",
        start.elapsed()
    );
    assert!(
        errors() >= 1,
        "the session that ended on the unreachable backend is not counted among the errors"
    );
}

/// A router between the balancer and the backend with a smaller MTU on the backend's side
/// answers a datagram too big for it with "fragmentation needed": the datagram is lost, but
/// the session stays, so the client's next datagrams (fragmented to fit now) reach the same
/// backend, from the same source port, instead of a new session on another backend.
#[test]
fn a_smaller_mtu_on_the_way_to_the_backend_keeps_the_session_on_its_backend() {
    if !lb_tests::require_root("udp::a_smaller_mtu_on_the_way_to_the_backend_keeps_the_session") {
        return;
    }
    let near = Netns::new("pmtu").expect("a namespace for the balancer");
    let router = Netns::new("rtr").expect("a namespace for the router");
    let far = Netns::new("far").expect("a namespace for the backends");
    lb_tests::netns::veth(&near, "v0", "10.98.1.1/24", &router, "r0", "10.98.1.2/24")
        .expect("a veth from the balancer to the router");
    lb_tests::netns::veth(&router, "r1", "10.98.2.1/24", &far, "v1", "10.98.2.2/24")
        .expect("a veth from the router to the backends");
    for (ns, dev) in [(&router, "r1"), (&far, "v1")] {
        ns.ip(&["link", "set", dev, "mtu", "1280"])
            .expect("a smaller MTU on the backends' side");
    }
    router
        .sysctl("net.ipv4.ip_forward", "1")
        .expect("the router forwards");
    near.ip(&["route", "add", "10.98.2.0/24", "via", "10.98.1.2"])
        .expect("a route to the backends");
    far.ip(&["route", "add", "default", "via", "10.98.2.1"])
        .expect("a route back");
    let (a1, a2): (SocketAddr, SocketAddr) = (
        "10.98.2.2:5300".parse().expect("literal"),
        "10.98.2.2:5301".parse().expect("literal"),
    );
    let _u = in_netns(&far, || {
        (UdpEcho::start_on("u1", a1), UdpEcho::start_on("u2", a2))
    })
    .expect("enter the backends' namespace");
    let vip: SocketAddr = "127.0.0.1:5353".parse().expect("literal");
    let svc = ServiceConfig::udp("echo", vip)
        .set("dataplane", "proxy")
        .set("idle_timeout", "60s")
        .scheduler("round_robin")
        .health("kind", "none")
        .backend(a1, 1)
        .backend(a2, 1);
    let config = DaemonConfig::new().global("workers", 1).service(svc);
    let _daemon = in_netns(&near, || Daemon::start(&config.to_toml()))
        .expect("enter the balancer's namespace");

    let (first, answers) = in_netns(&near, || {
        let client = UdpClient::new(vip).expect("a UDP client socket");
        let name = |reply: &[u8]| {
            String::from_utf8_lossy(reply)
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string()
        };
        let first = name(
            &client
                .request(b"small", Duration::from_secs(2))
                .expect("a first answer"),
        );
        // 1,400 bytes: too big for the router's way out, sent with "don't fragment" until
        // the router's answer lowers the path MTU; then fragmented, and answered.
        let big = vec![b'x'; 1_400];
        let (mut answers, mut sent) = (Vec::new(), 0);
        let start = Instant::now();
        while answers.len() < 5 && start.elapsed() < Duration::from_secs(5) {
            client.send(&big).expect("sending a datagram on loopback");
            sent += 1;
            if let Ok(Some(reply)) = client.recv(Duration::from_millis(200)) {
                assert_eq!(
                    reply.len(),
                    3 + big.len(),
                    "a whole answer to the big datagram"
                );
                answers.push(name(&reply));
            }
        }
        // The router's answer cost the first big datagram: else nothing was tested.
        assert!(
            sent > answers.len(),
            "every big datagram was answered: the router sent no \"fragmentation needed\""
        );
        (first, answers)
    })
    .expect("enter the balancer's namespace");
    assert!(
        answers.len() == 5 && answers.iter().all(|a| *a == first),
        "after the router's \"fragmentation needed\", the client's datagrams should go on to \
         {first}, its session's backend; they got answers from {answers:?}"
    );
}
