//! Stopping the daemon: SIGTERM stops new connections, lets open ones finish (up to
//! `global.drain_timeout`), then the daemon exits 0. A second SIGTERM cuts the drain short,
//! and a SIGTERM during start-up drains too instead of killing the daemon.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use lb_tests::client::{connect, Upload};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::daemon::daemon_binary;
use lb_tests::data::Receipt;
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, HashServer};
use nix::sys::signal::Signal;

const MIB: u64 = 1024 * 1024;

fn start(drain_timeout: &str, backend: SocketAddr) -> (Daemon, SocketAddr) {
    start_with(DaemonConfig::new(), drain_timeout, backend)
}

/// [`start`] on `config` (its `[global]` settings, say).
fn start_with(
    config: DaemonConfig,
    drain_timeout: &str,
    backend: SocketAddr,
) -> (Daemon, SocketAddr) {
    let vip = free_addr();
    let config = config.global("drain_timeout", drain_timeout).service(
        ServiceConfig::tcp("bulk", vip)
            .fast_health("tcp")
            .backend(backend, 1),
    );
    (Daemon::start(&config.to_toml()), vip)
}

/// Waits (up to 5 s) until `backend` has `n` open connections: the daemon has then accepted
/// and forwarded the client's connection, which a finished `connect()` alone does not prove.
fn wait_until_backend_has(backend: &HashServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend.open_connections() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        backend.open_connections() >= n,
        "the client connected to the VIP, but within 5 s the backend saw {} connections",
        backend.open_connections()
    );
}

/// Opens an upload to `vip` (stream `seed`) with `first` bytes sent, waits until `backend`
/// carries it, sends SIGTERM and waits until the daemon says it drains; returns the upload.
fn sigterm_with_an_upload(
    daemon: &Daemon,
    vip: SocketAddr,
    backend: &HashServer,
    seed: u64,
    first: u64,
) -> Upload {
    let mut up = Upload::start(vip, seed).unwrap_or_else(|e| panic!("cannot connect: {e}"));
    up.send(first).expect("the first bytes go through");
    wait_until_backend_has(backend, 1);
    let mark = daemon.log_mark();
    daemon
        .signal(Signal::SIGTERM)
        .expect("SIGTERM is delivered");
    daemon
        .wait_for_log_after(mark, "no longer accepting", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the daemon did not start draining after SIGTERM: {e}"));
    up
}

/// Whether a new connection to `vip` is still served: connected, sent a few bytes, and got
/// the hash server's receipt within a second.
fn new_connection_served(vip: SocketAddr) -> bool {
    let Ok(mut c) = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(1)) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
    if c.write_all(b"knock").is_err() || c.shutdown(Shutdown::Write).is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = c.read_to_string(&mut reply);
    Receipt::parse(&reply).is_some()
}

#[test]
fn sigterm_lets_an_open_transfer_finish_then_exits_0() {
    let backend = HashServer::start("sink").expect("hash server starts");
    let (mut daemon, vip) = start("20s", backend.addr());
    let seed = 77;
    let mut up = Upload::start(vip, seed).unwrap_or_else(|e| panic!("cannot connect: {e}"));
    up.send(4 * MIB).expect("the first 4 MiB go through");
    wait_until_backend_has(&backend, 1);

    daemon
        .signal(Signal::SIGTERM)
        .expect("SIGTERM is delivered");

    // New connections stop being served (bounded wait: the daemon needs a moment).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refused = false;
    for _ in 0..50 {
        if !new_connection_served(vip) {
            refused = true;
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        refused,
        "5 s after SIGTERM the daemon still served new connections; it should stop accepting"
    );

    std::thread::sleep(Duration::from_millis(500));
    if let Some(status) = daemon.exit_status() {
        panic!(
            "the daemon exited ({status}) while a transfer was still open; it should wait for \
             it (drain_timeout is 20 s)"
        );
    }
    up.send(12 * MIB)
        .unwrap_or_else(|e| panic!("the open transfer broke after SIGTERM: {e}"));
    let got = up
        .finish()
        .unwrap_or_else(|e| panic!("the open transfer got no receipt after SIGTERM: {e}"));
    assert_eq!(
        got,
        Receipt::of_stream(16 * MIB, seed),
        "the transfer that was open during SIGTERM arrived damaged"
    );

    let status = daemon
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| {
            panic!("the daemon did not exit within 15 s after its last connection closed")
        });
    assert_eq!(
        status.code(),
        Some(0),
        "after SIGTERM and a clean drain the daemon should exit 0, it exited with {status}"
    );
}

#[test]
fn sigterm_with_an_idle_connection_exits_0_after_the_drain_timeout() {
    let backend = HashServer::start("sink").expect("hash server starts");
    let (mut daemon, vip) = start("1s", backend.addr());
    let mut idle = connect(vip).unwrap_or_else(|e| panic!("cannot connect: {e}"));
    idle.write_all(b"a connection that never finishes")
        .expect("a few bytes go through");
    wait_until_backend_has(&backend, 1);

    let sent = Instant::now();
    daemon
        .signal(Signal::SIGTERM)
        .expect("SIGTERM is delivered");
    let status = daemon
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| {
            panic!("with drain_timeout = 1s the daemon was still running 15 s after SIGTERM")
        });
    assert_eq!(
        status.code(),
        Some(0),
        "after SIGTERM the daemon should exit 0 once the drain timeout ends, it exited with {status}"
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(900),
        "the daemon exited {:?} after SIGTERM, before its 1 s drain timeout, with a connection open",
        sent.elapsed()
    );
    // The connection is gone with the daemon.
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let after = idle.read(&mut buf);
    assert!(
        matches!(after, Ok(0) | Err(_)),
        "the connection cut at the drain timeout still delivered data to the client \
         ({after:?}): the backend was made to believe the upload had ended"
    );
}

#[test]
fn sigint_without_connections_exits_0() {
    let backend = HashServer::start("sink").expect("hash server starts");
    let (mut daemon, _vip) = start("5s", backend.addr());
    daemon.signal(Signal::SIGINT).expect("SIGINT is delivered");
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!("with no connection open the daemon was still running 10 s after SIGINT")
        });
    assert_eq!(
        status.code(),
        Some(0),
        "SIGINT should end the daemon with exit 0, got {status}"
    );
}

#[test]
fn a_second_sigterm_cuts_the_drain_short_and_says_how_many_it_closed() {
    let backend = HashServer::start("sink").expect("hash server starts");
    let (mut daemon, vip) = start("60s", backend.addr());
    let mut up = sigterm_with_an_upload(&daemon, vip, &backend, 5, 4 * MIB);
    std::thread::sleep(Duration::from_millis(300));
    if let Some(status) = daemon.exit_status() {
        panic!("the daemon exited ({status}) after one SIGTERM with a transfer open");
    }

    let sent = Instant::now();
    daemon
        .signal(Signal::SIGTERM)
        .expect("the second SIGTERM is delivered");
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!("the daemon was still draining 10 s after a second SIGTERM (drain_timeout 60 s)")
        });
    let took = sent.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "the daemon took {took:?} to exit after a second SIGTERM; it should cut the drain short"
    );
    assert_eq!(
        status.code(),
        Some(0),
        "a drain cut short still ends the daemon with exit 0, it exited with {status}"
    );
    let logs = daemon.logs();
    let line = logs
        .iter()
        .find(|l| l.contains("drain cut short by a second SIGTERM"))
        .unwrap_or_else(|| {
            panic!(
                "no line says the drain was cut short; last lines:\n{}",
                logs[logs.len().saturating_sub(10)..].join("\n")
            )
        });
    assert!(
        line.contains("closed 1 connections"),
        "the open transfer should be counted as closed: {line}"
    );
    // The transfer was reset, not left to finish.
    assert!(
        up.send(64 * MIB).is_err(),
        "the transfer cut off by the second SIGTERM still took 64 MiB"
    );
}

#[test]
fn a_sigterm_during_start_up_drains_instead_of_killing_the_daemon() {
    let backend = HashServer::start("sink").expect("hash server starts");
    let config = DaemonConfig::new()
        .global("drain_timeout", "5s")
        .service(
            ServiceConfig::tcp("early", free_addr())
                .fast_health("tcp")
                .backend(backend.addr(), 1),
        )
        .to_toml();
    let mut file = tempfile::NamedTempFile::new().expect("a config file");
    file.write_all(config.as_bytes()).expect("write the config");
    let binary = daemon_binary().unwrap_or_else(|e| panic!("no daemon binary: {e}"));
    // Started by hand, not with `Daemon::start`: that waits for `ready`, and the point is to
    // signal earlier, while the data planes start.
    let mut child = std::process::Command::new(binary)
        .arg("run")
        .arg("-c")
        .arg(file.path())
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the daemon starts");
    let guard = KillOnDrop(child.id());
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stderr).lines();
    // Logged once the services are placed, before the proxy starts: the old daemon installed
    // its handlers only after the proxy had started, so this SIGTERM killed it.
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("the daemon's log");
        let placed = line.contains("service early: listening on");
        seen.push(line);
        if placed {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.contains("listening on")),
        "the daemon never logged that it placed its service:\n{}",
        seen.join("\n")
    );
    nix::sys::signal::kill(guard.pid(), Signal::SIGTERM).expect("SIGTERM is delivered");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("the daemon's exit status");
    std::mem::forget(guard);
    assert_eq!(
        status.code(),
        Some(0),
        "a SIGTERM during start-up should drain and exit 0, the daemon ended with {status}; \
         its log after the signal:\n{}",
        rest.join("\n")
    );
    assert!(
        rest.iter()
            .any(|l| l.contains("SIGTERM: no longer accepting")),
        "the daemon did not log its drain after an early SIGTERM:\n{}",
        rest.join("\n")
    );
}

/// Kills a hand-started daemon if the test fails before it exits.
struct KillOnDrop(u32);

impl KillOnDrop {
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.0).expect("a pid fits in i32"))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid(), Signal::SIGKILL);
    }
}

/// While the daemon drains after SIGTERM, its admin API no longer answers, and says so at
/// once: a connection to its address is refused rather than queued for a server that no
/// longer accepts (the listener's duplicate kept for an upgrade used to hold it open). And
/// `lb-daemon upgrade` finds no hand-over to take: it would adopt what the stopping daemon is
/// about to tear down.
#[test]
fn a_draining_daemon_refuses_admin_connections_and_upgrades() {
    let backend = HashServer::start("sink").expect("hash server starts");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("upgrade.sock");
    let config = DaemonConfig::new().global("upgrade_socket", socket.display().to_string());
    let (mut daemon, vip) = start_with(config, "20s", backend.addr());
    let api = daemon.admin_addr();
    let seed = 78;
    let up = sigterm_with_an_upload(&daemon, vip, &backend, seed, MIB);
    std::thread::sleep(Duration::from_millis(200));
    let refused = std::net::TcpStream::connect_timeout(&api, Duration::from_secs(1));
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "the admin API of a draining daemon should refuse connections, got {refused:?}"
    );
    assert!(
        !socket.exists(),
        "a draining daemon still offers its hand-over at {}",
        socket.display()
    );
    let got = up
        .finish()
        .unwrap_or_else(|e| panic!("the open transfer got no receipt after SIGTERM: {e}"));
    assert_eq!(
        got,
        Receipt::of_stream(MIB, seed),
        "the open transfer arrived damaged"
    );
    let status = daemon
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the daemon did not exit after its last connection closed"));
    assert_eq!(status.code(), Some(0), "the daemon exited with {status}");
}
