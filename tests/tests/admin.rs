//! The admin API and its CLI: status shows every backend with health, weights and counters;
//! drain, enable and weight change what the scheduler does; mistakes are refused with the
//! reason and a non-zero exit.

use std::time::Duration;

use lb_tests::admin::{self, cli};
use lb_tests::client::http_get;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::load::wait_until_each_answers;
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, HttpNameServer};

#[test]
fn status_shows_backends_and_the_cli_changes_them() {
    let a = HttpNameServer::start("alpha").expect("backend starts");
    let b = HttpNameServer::start("beta").expect("backend starts");
    let vip = free_addr();
    let daemon = Daemon::start(
        &DaemonConfig::new()
            .service(
                ServiceConfig::tcp("web", vip)
                    .scheduler("round_robin")
                    .fast_health("http")
                    .backend(a.addr(), 2)
                    .backend(b.addr(), 1),
            )
            .to_toml(),
    );
    let api = daemon.admin_addr();
    wait_until_each_answers(&["alpha", "beta"], Duration::from_secs(10), || {
        http_get(vip, "/")
    })
    .unwrap_or_else(|e| panic!("both backends should answer through the service: {e}"));
    for _ in 0..8 {
        http_get(vip, "/").expect("the service answers");
    }

    // The requests can all be done within milliseconds of the start, before the first
    // health check of alpha has completed; its result is what `last_check` shows.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = admin::status(api);
        let checked = admin::backend(&status, "web", a.addr())
            .is_some_and(|alpha| !alpha["last_check"].is_null());
        if checked || std::time::Instant::now() >= deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["dataplane"], "proxy", "status: {status}");
    let alpha = admin::backend(&status, "web", a.addr())
        .unwrap_or_else(|| panic!("status does not list backend alpha: {status}"));
    assert_eq!(alpha["health"], "up", "alpha: {alpha}");
    assert_eq!(alpha["weight"], 2, "alpha's configured weight: {alpha}");
    assert_eq!(alpha["effective_weight"], 2, "alpha: {alpha}");
    assert_eq!(alpha["last_check"], "ok", "alpha: {alpha}");
    let total: u64 = ["alpha", "beta"]
        .iter()
        .zip([a.addr(), b.addr()])
        .map(|(_, addr)| {
            admin::backend(&status, "web", addr).expect("listed")["total"]
                .as_u64()
                .expect("a count")
        })
        .sum();
    assert!(
        total >= 10,
        "status counts {total} connections but the test made at least 10: {status}"
    );

    let target = api.to_string();
    let table = cli(&target, &["status"]);
    assert_eq!(table.code, Some(0), "`lb-daemon status` failed: {table:?}");
    assert!(
        table.stdout.contains("service web") && table.stdout.contains(&a.addr().to_string()),
        "the status table should name the service and its backends:\n{}",
        table.stdout
    );

    // Drain beta through the CLI: every new connection goes to alpha.
    let beta = b.addr().to_string();
    let out = cli(&target, &["drain", "web", &beta]);
    assert_eq!(out.code, Some(0), "`lb-daemon drain` failed: {out:?}");
    let before = b.requests();
    for _ in 0..10 {
        let who = http_get(vip, "/").expect("the service answers while beta drains");
        assert!(
            who.contains("alpha"),
            "a new connection went to drained beta: {who}"
        );
    }
    assert_eq!(b.requests(), before, "drained beta still got requests");
    let st = admin::status(api);
    let b_st = admin::backend(&st, "web", b.addr()).expect("beta is listed");
    assert_eq!(b_st["state"], "draining", "beta after drain: {b_st}");
    assert_eq!(b_st["effective_weight"], 0, "beta after drain: {b_st}");

    let out = cli(&target, &["enable", "web", &beta]);
    assert_eq!(out.code, Some(0), "`lb-daemon enable` failed: {out:?}");
    let out = cli(&target, &["weight", "web", &beta, "5"]);
    assert_eq!(out.code, Some(0), "`lb-daemon weight` failed: {out:?}");
    let st = admin::status(api);
    let b_st = admin::backend(&st, "web", b.addr()).expect("beta is listed");
    assert_eq!(b_st["weight"], 5, "beta after `weight 5`: {b_st}");
    assert_eq!(b_st["effective_weight"], 5, "beta after `weight 5`: {b_st}");
    wait_until_each_answers(&["beta"], Duration::from_secs(10), || http_get(vip, "/"))
        .unwrap_or_else(|e| panic!("enabled beta should get new connections again: {e}"));

    // Mistakes: refused with the reason, exit 1; nothing listening: exit 3.
    let out = cli(&target, &["weight", "web", &beta, "300"]);
    assert_eq!(out.code, Some(1), "weight 300 must be refused: {out:?}");
    assert!(
        out.stderr.contains("0..=256"),
        "the refusal should give the range: {out:?}"
    );
    let out = cli(&target, &["drain", "web", "127.0.0.1:1"]);
    assert_eq!(
        out.code,
        Some(1),
        "an unknown backend must be refused: {out:?}"
    );
    assert!(
        out.stderr.contains("no backend 127.0.0.1:1"),
        "the refusal should name the backend: {out:?}"
    );
    // A DNS name where the API wants the address /status lists: 400, saying what to give.
    let named = admin::request(api, "POST", "/services/web/backends/app:8080/drain", "");
    assert_eq!(named.status, 400, "a backend given by name: {named:?}");
    assert!(
        named.body.contains("ip:port"),
        "the refusal should say how to name a backend: {named:?}"
    );
    let out = cli(&target, &["drain", "nope", &beta]);
    assert_eq!(
        out.code,
        Some(1),
        "an unknown service must be refused: {out:?}"
    );
    assert!(
        out.stderr.contains("`nope`"),
        "the refusal should name the service: {out:?}"
    );
    let nobody = free_addr().to_string();
    let out = cli(&nobody, &["status"]);
    assert_eq!(
        out.code,
        Some(3),
        "`lb-daemon status` with nothing listening should exit 3: {out:?}"
    );
}

#[test]
fn the_api_answers_on_its_unix_socket_too() {
    let a = HttpNameServer::start("alpha").expect("backend starts");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("admin.sock");
    let _daemon = Daemon::start(
        &DaemonConfig::new()
            .admin("socket", socket.display().to_string())
            .service(
                ServiceConfig::tcp("web", free_addr())
                    .fast_health("tcp")
                    .backend(a.addr(), 1),
            )
            .to_toml(),
    );
    let out = cli(&socket.display().to_string(), &["status", "--json"]);
    assert_eq!(
        out.code,
        Some(0),
        "status over the unix socket failed: {out:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`status --json` is not JSON ({e}): {}", out.stdout));
    assert_eq!(
        admin::backend_addresses(&v, "web"),
        vec![a.addr()],
        "status over the unix socket: {v}"
    );
}

/// Sends `head` (request line and headers, without the blank line) and `body` to the admin
/// API at `api`; returns the answer's status code.
fn raw_status(api: std::net::SocketAddr, head: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&api, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("cannot reach the admin API at {api}: {e}"));
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!(
        "{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send the request");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in the answer: {text:?}"))
}

fn one_service_daemon(admin: &[(&str, &str)]) -> (Daemon, HttpNameServer, std::net::SocketAddr) {
    let a = HttpNameServer::start("alpha").expect("backend starts");
    let vip = free_addr();
    let mut config = DaemonConfig::new();
    for (k, v) in admin {
        config = config.admin(k, *v);
    }
    let daemon = Daemon::start(
        &config
            .service(
                ServiceConfig::tcp("web", vip)
                    .health("kind", "none")
                    .backend(a.addr(), 1),
            )
            .to_toml(),
    );
    (daemon, a, vip)
}

#[test]
fn cross_site_and_rebound_requests_are_forbidden() {
    let (daemon, _a, _vip) = one_service_daemon(&[]);
    let api = daemon.admin_addr();
    let host = format!("Host: {api}");
    // The CSRF a web page can send: a "simple" cross-origin POST.
    let csrf = format!(
        "POST /reload HTTP/1.1\r\n{host}\r\nOrigin: http://attacker.example\r\nContent-Type: \
         text/plain"
    );
    assert_eq!(
        raw_status(api, &csrf, "x"),
        403,
        "a cross-site POST /reload"
    );
    let drain = format!(
        "POST /services/web/backends/{}/drain HTTP/1.1\r\n{host}\r\nOrigin: \
         http://attacker.example\r\nContent-Type: application/json",
        _a.addr()
    );
    assert_eq!(raw_status(api, &drain, ""), 403, "a cross-site drain");
    let plain = format!("POST /reload HTTP/1.1\r\n{host}\r\nContent-Type: text/plain");
    assert_eq!(raw_status(api, &plain, "x"), 415, "a POST that is not JSON");
    let rebound = "GET /status HTTP/1.1\r\nHost: attacker.example:9100";
    assert_eq!(
        raw_status(api, rebound, ""),
        403,
        "DNS rebinding: another Host"
    );
    let own = format!(
        "GET /status HTTP/1.1\r\n{host}\r\nOrigin: http://{api}\r\nContent-Type: application/json"
    );
    assert_eq!(raw_status(api, &own, ""), 200, "the API's own origin");
    let reload = "POST /reload HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json";
    assert_eq!(
        raw_status(api, reload, ""),
        200,
        "a local JSON POST /reload"
    );
}

#[test]
fn a_socket_only_admin_listens_on_no_tcp_port() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("admin.sock");
    let (daemon, a, vip) =
        one_service_daemon(&[("listen", ""), ("socket", &socket.display().to_string())]);
    assert!(
        !daemon
            .logs()
            .iter()
            .any(|l| l.contains("admin API listening on http://")),
        "listen = \"\" still opened a TCP listener:\n{}",
        daemon.logs().join("\n")
    );
    // Every TCP socket the daemon listens on is the service's.
    let ports = listening_tcp_ports(daemon.pid());
    assert_eq!(
        ports,
        vec![vip.port()],
        "the daemon listens on TCP ports {ports:?}; only the service's {} was expected",
        vip.port()
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&socket)
            .expect("the socket exists")
            .permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o660, "the admin socket's mode is {mode:o}");
    let out = cli(&socket.display().to_string(), &["status", "--json"]);
    assert_eq!(out.code, Some(0), "status over the socket: {out:?}");
    assert!(out.stdout.contains(&a.addr().to_string()), "{out:?}");
}

/// The TCP ports process `pid` listens on, sorted (from its descriptors and /proc/net/tcp*).
fn listening_tcp_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's descriptors")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode.
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                if let Some(port) = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                {
                    ports.push(port);
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[test]
fn with_a_token_file_every_request_needs_the_token() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").expect("write the token");
    let (daemon, _a, _vip) = one_service_daemon(&[("token_file", &token.display().to_string())]);
    let api = daemon.admin_addr();
    let get = format!("GET /status HTTP/1.1\r\nHost: {api}");
    assert_eq!(raw_status(api, &get, ""), 401, "no token");
    let wrong = format!("{get}\r\nAuthorization: Bearer s3cret-tokeN");
    assert_eq!(raw_status(api, &wrong, ""), 401, "a wrong token");
    let right = format!("{get}\r\nAuthorization: Bearer s3cret-token");
    assert_eq!(raw_status(api, &right, ""), 200, "the token");
    let out = cli(&api.to_string(), &["status"]);
    assert_eq!(
        out.code,
        Some(1),
        "the CLI without the token is refused: {out:?}"
    );
    let out = cli(
        &api.to_string(),
        &["status", "--token-file", &token.display().to_string()],
    );
    assert_eq!(out.code, Some(0), "the CLI with --token-file: {out:?}");
}

#[test]
fn idle_connections_are_capped_and_timed_out() {
    use std::io::Read;
    let (daemon, _a, _vip) = one_service_daemon(&[]);
    let api = daemon.admin_addr();
    // Connected, and never a byte: more than the 64 the API serves at once.
    let idle: Vec<std::net::TcpStream> = (0..70)
        .map(|_| {
            std::net::TcpStream::connect_timeout(&api, Duration::from_secs(5))
                .expect("connect to the admin API")
        })
        .collect();
    let closed = |s: &std::net::TcpStream, within: Duration| {
        let _ = s.set_read_timeout(Some(within));
        let mut reader = s;
        let mut b = [0u8; 64];
        match reader.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    let over = idle
        .iter()
        .filter(|s| closed(s, Duration::from_millis(300)))
        .count();
    assert!(
        over >= 6,
        "{over} of 70 idle connections were closed at once; the API serves at most 64"
    );
    // The header timeout (10 s) closes the others.
    std::thread::sleep(Duration::from_secs(11));
    let left = idle
        .iter()
        .filter(|s| !closed(s, Duration::from_secs(3)))
        .count();
    assert_eq!(
        left, 0,
        "{left} idle connections outlived the header timeout"
    );
    assert_eq!(admin::status(api)["services"][0]["name"], "web");
}

#[test]
fn slow_bodies_give_their_slots_back() {
    use std::io::Write;
    let (daemon, _a, _vip) = one_service_daemon(&[]);
    let api = daemon.admin_addr();
    // 64 connections, all the API serves at once, send a body's first byte and no more.
    let slow: Vec<std::net::TcpStream> = (0..64)
        .map(|_| {
            let mut s = std::net::TcpStream::connect_timeout(&api, Duration::from_secs(5))
                .expect("connect to the admin API");
            s.write_all(
                b"POST /services/web/backends/x/weight HTTP/1.1\r\nHost: localhost\r\n\
                  Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
            )
            .expect("send a header and one byte");
            s
        })
        .collect();
    slots_come_back(api, "slow bodies");
    drop(slow);
}

#[test]
fn a_client_that_takes_no_answer_loses_its_connection() {
    use std::io::{Read, Write};
    let (daemon, _a, _vip) = one_service_daemon(&[]);
    let api = daemon.admin_addr();
    // Status requests pipelined, none of the answers read: with a small receive buffer the
    // daemon's writes wait within a second or so.
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.set_recv_buffer_size(4096).expect("small receive buffer");
    s.connect_timeout(&api.into(), Duration::from_secs(5))
        .expect("connect to the admin API");
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .expect("write timeout");
    let one = b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n";
    // More answers (about 1 KB each) than the daemon's send buffer can ever hold (the
    // kernel's `tcp_wmem` maximum), or every answer would fit and no write would wait.
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2).and_then(|m| m.parse().ok()))
        .unwrap_or(4 << 20);
    let requests = (2 * wmem_max / 800).max(3000);
    let mut sent = 0;
    let mut w = &s;
    while sent < requests && w.write_all(one).is_ok() {
        sent += 1;
    }
    // Past the write-stall limit (10 s): the daemon has ended the connection, so fewer
    // answers than requests ever arrive, then the end of the stream.
    std::thread::sleep(Duration::from_secs(13));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut all = Vec::new();
    let mut r = &s;
    let end = r.read_to_end(&mut all);
    let answers = String::from_utf8_lossy(&all)
        .matches("HTTP/1.1 200")
        .count();
    // Closed with requests still unread, the daemon's socket answers with a reset.
    let ended = match &end {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        ended && answers < sent,
        "a client that took no answer kept its connection: {answers} answers to {sent} \
         requests, then {end:?}"
    );
}

/// Once the header timeout (10 s) and the body and write-stall limits (10 s each) are past,
/// the CLI gets an answer again: the connections holding every slot were closed.
fn slots_come_back(api: std::net::SocketAddr, what: &str) {
    std::thread::sleep(Duration::from_secs(13));
    let out = cli(&api.to_string(), &["status"]);
    assert_eq!(
        out.code,
        Some(0),
        "{what} still held the admin API after its time limits: {out:?}"
    );
}
