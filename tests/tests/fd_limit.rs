//! A daemon whose open file limit runs out: idle clients hold every descriptor, so accepts
//! and health checks fail with `EMFILE`. The shortage is the host's, not the backends': they
//! stay UP, and service resumes as soon as the clients close.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_tests::backend::TcpServer;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::ports::free_addr;
use lb_tests::Daemon;

/// The daemon's open file limit, soft and hard.
const NOFILE: u64 = 64;
/// Idle clients: more than the descriptors allow (each proxied connection holds several).
const CLIENTS: usize = 80;

fn echo_server(name: &str) -> TcpServer {
    TcpServer::start(
        name,
        Arc::new(|mut s: TcpStream| {
            let mut r = s.try_clone().expect("clone the stream");
            let _ = io::copy(&mut r, &mut s);
        }),
    )
    .expect("the echo backend starts")
}

/// The backends' `health` in `/status`.
fn states(daemon: &Daemon) -> Vec<String> {
    let st = lb_tests::admin::status(daemon.admin_addr());
    st["services"][0]["backends"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .map(|b| b["health"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether an echo round trip through `vip` works on a new connection.
fn served(vip: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&vip, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut back = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut back).is_ok() && &back == b"ping"
}

#[test]
fn eighty_idle_clients_under_a_limit_of_64_descriptors_leave_the_backends_up() {
    let backends = [echo_server("b1"), echo_server("b2")];
    let vip = free_addr();
    let mut svc = ServiceConfig::tcp("web", vip)
        .set("dataplane", "proxy")
        .fast_health("tcp");
    for b in &backends {
        svc = svc.backend(b.addr(), 1);
    }
    let daemon = Daemon::try_start_with_nofile(&DaemonConfig::new().service(svc).to_toml(), NOFILE)
        .unwrap_or_else(|e| panic!("lb-daemon did not start with {NOFILE} descriptors: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while states(&daemon) != ["up", "up"] {
        assert!(Instant::now() < deadline, "the backends never came UP");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served(vip), "a connection before the flood");

    // Connected and silent: each accepted one holds the daemon's descriptors until it closes.
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .filter_map(|_| TcpStream::connect_timeout(&vip, Duration::from_millis(500)).ok())
        .collect();
    // Health checks every 200 ms with fall 2: a second is five chances to take them DOWN.
    std::thread::sleep(Duration::from_millis(1500));
    // The admin API needs a descriptor too, so the log tells what happened meanwhile.
    let logs = daemon.logs();
    assert!(
        !logs.iter().any(|l| l.contains("-> DOWN")),
        "{} idle clients used up the daemon's descriptors, not the backends': they must stay \
         UP. Log:\n{}",
        clients.len(),
        logs.join("\n")
    );
    drop(clients);
    // Connections the kernel queued while the daemon could not accept them are still taken
    // (and closed) first: service has resumed when 20 in a row are served.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut in_a_row = 0;
    while in_a_row < 20 {
        assert!(
            Instant::now() < deadline,
            "service did not resume within 10 s of the idle clients closing. Log:\n{}",
            daemon.logs().join("\n")
        );
        if served(vip) {
            in_a_row += 1;
        } else {
            in_a_row = 0;
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(
        states(&daemon),
        ["up", "up"],
        "the backends after the flood"
    );
}
