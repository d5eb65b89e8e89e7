//! UDP through the balancer: each client (one source address and port) is a session that
//! stays on one backend, and on loopback no datagram is lost.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_tests::client::{udp_request, UdpClient};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::load::wait_until_each_answers;
use lb_tests::ports::free_addr;
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
