//! Upgrades without a gap: `lb-daemon upgrade` takes the running daemon's listening sockets
//! over its hand-over socket (`[global] upgrade_socket`), and once it is ready the old one
//! stops accepting, lets its connections finish and exits 0. Under a loop of new TCP
//! connections and UDP requests and three long uploads: no request fails, every upload
//! arrives byte-complete, the old daemon exits after its last connection. The same through
//! SIGUSR2, the upgrade in place a service manager runs, with its notifications.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_tests::client::{http_get, udp_request, Upload};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::daemon::Successor;
use lb_tests::data::Receipt;
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, HashServer, HttpNameServer, UdpEcho};
use nix::sys::signal::Signal;

const MIB: u64 = 1024 * 1024;

/// What the load loop saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Tally {
    /// Counts the outcome `r` of a request of kind `what` that started at `started`; the
    /// first failure is kept with how long its request took and when it ended, to tell a
    /// refusal from a stall (a read timeout is `IO_TIMEOUT`, 20 s) in a failure's message.
    fn record<T, E: std::fmt::Display>(&self, what: &str, started: Instant, r: Result<T, E>) {
        match r {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_failure.lock().expect("lock");
                first.get_or_insert_with(|| {
                    format!(
                        "{what}: {e} (after {:?}, ended at {:?})",
                        started.elapsed(),
                        std::time::SystemTime::now()
                    )
                });
            }
        }
    }
}

/// The backends and addresses of one upgrade test: web (HTTP, two backends), bulk (uploads),
/// dns (UDP echo).
struct Site {
    _web_a: HttpNameServer,
    _web_b: HttpNameServer,
    _sink: HashServer,
    _echo: UdpEcho,
    web: SocketAddr,
    bulk: SocketAddr,
    dns: SocketAddr,
    config: String,
}

impl Site {
    /// The backends, and a config with `upgrade_socket` when one is given.
    fn new(upgrade_socket: Option<&std::path::Path>) -> Site {
        Site::with_admin_socket(upgrade_socket, None)
    }

    /// [`Site::new`], with the admin API on unix socket `admin_socket` too when one is given.
    fn with_admin_socket(
        upgrade_socket: Option<&std::path::Path>,
        admin_socket: Option<&std::path::Path>,
    ) -> Site {
        let web_a = HttpNameServer::start("a").expect("web backend a");
        let web_b = HttpNameServer::start("b").expect("web backend b");
        let sink = HashServer::start("sink").expect("hash backend");
        let echo = UdpEcho::start("echo").expect("udp backend");
        let (web, bulk, dns) = (free_addr(), free_addr(), free_addr());
        let mut config = DaemonConfig::new().global("drain_timeout", "20s");
        if let Some(socket) = upgrade_socket {
            config = config.global("upgrade_socket", socket.display().to_string());
        }
        if let Some(socket) = admin_socket {
            config = config.admin("socket", socket.display().to_string());
        }
        let config = config
            .service(
                ServiceConfig::tcp("web", web)
                    .fast_health("tcp")
                    .backend(web_a.addr(), 1)
                    .backend(web_b.addr(), 1),
            )
            .service(
                ServiceConfig::tcp("bulk", bulk)
                    .fast_health("tcp")
                    .backend(sink.addr(), 1),
            )
            .service(
                ServiceConfig::udp("dns", dns)
                    .health("kind", "none")
                    .backend(echo.addr(), 1),
            )
            .to_toml();
        Site {
            _web_a: web_a,
            _web_b: web_b,
            _sink: sink,
            _echo: echo,
            web,
            bulk,
            dns,
            config,
        }
    }

    /// Three uploads to bulk, 2 MiB sent on each.
    fn start_uploads(&self) -> Vec<Upload> {
        (0..3)
            .map(|seed| {
                let mut u = Upload::start(self.bulk, 90 + seed)
                    .unwrap_or_else(|e| panic!("upload {seed} cannot connect: {e}"));
                u.send(2 * MIB)
                    .unwrap_or_else(|e| panic!("upload {seed}: the first bytes failed: {e}"));
                u
            })
            .collect()
    }

    /// Two threads of [`load_loop`].
    fn start_load(&self) -> Load {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..2)
            .map(|_| {
                let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop));
                let (web, dns) = (self.web, self.dns);
                std::thread::spawn(move || load_loop(web, dns, &tally, &stop))
            })
            .collect();
        Load {
            tally,
            stop,
            threads,
        }
    }
}

/// The uploads, opened before the hand-over, go on across it: 2 MiB more each, then every
/// one arrives byte-complete.
fn finish_uploads(mut uploads: Vec<Upload>) {
    for (i, u) in uploads.iter_mut().enumerate() {
        u.send(2 * MIB)
            .unwrap_or_else(|e| panic!("upload {i} broke during the hand-over: {e}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    for (i, u) in uploads.into_iter().enumerate() {
        let receipt = u
            .finish()
            .unwrap_or_else(|e| panic!("upload {i} failed during the hand-over: {e}"));
        assert_eq!(
            receipt,
            Receipt::of_stream(4 * MIB, 90 + i as u64),
            "upload {i}, open across the hand-over, arrived damaged or cut"
        );
    }
}

/// A running load loop.
struct Load {
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Stops the loop; asserts that it made requests and that none failed.
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("the load thread");
        }
        let (ok, failed) = (
            self.tally.ok.load(Ordering::Relaxed),
            self.tally.failed.load(Ordering::Relaxed),
        );
        assert!(ok >= 50, "the load loop made only {ok} requests");
        assert_eq!(
            failed,
            0,
            "{failed} of {} requests failed across the upgrade; the first: {:?}",
            ok + failed,
            self.tally.first_failure.lock().expect("lock")
        );
    }
}

#[test]
fn upgrade_hands_the_sockets_over_and_no_connection_fails() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("upgrade.sock");
    let admin_socket = dir.path().join("admin.sock");
    let site = Site::with_admin_socket(Some(&socket), Some(&admin_socket));
    let mut old = Daemon::start(&site.config);
    let uploads = site.start_uploads();
    let load = site.start_load();
    std::thread::sleep(Duration::from_millis(300));

    let mark = old.log_mark();
    let new = Daemon::try_upgrade(&site.config, &[])
        .unwrap_or_else(|e| panic!("lb-daemon upgrade did not start: {e}"));
    let logs = new.logs().join("\n");
    assert!(
        logs.contains("upgrade: took") && logs.contains("listening socket(s)"),
        "the new daemon took no socket:\n{logs}"
    );
    the_old_daemon_hands_over(&mut old, mark, uploads, load, &site);
    // The old daemon is gone: the admin socket's path leads to the new one.
    let out = lb_tests::admin::cli(&admin_socket.display().to_string(), &["status"]);
    assert_eq!(
        out.code,
        Some(0),
        "no admin API on its socket after the upgrade: {out:?}"
    );
    drop(new);
}

/// A stop of the service while the old daemon drains after an upgrade (systemd's `stop` or
/// `restart` sends SIGTERM to every process of the unit, the old daemon too) lets the old
/// daemon's connections finish: only a second signal cuts its drain short. Before, that first
/// SIGTERM cut the uploads it still carried.
#[test]
fn a_stop_while_the_old_daemon_drains_after_an_upgrade_lets_its_connections_finish() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("upgrade.sock");
    let site = Site::new(Some(&socket));
    let mut old = Daemon::start(&site.config);
    let uploads = site.start_uploads();
    let mark = old.log_mark();
    let new = Daemon::try_upgrade(&site.config, &[])
        .unwrap_or_else(|e| panic!("lb-daemon upgrade did not start: {e}"));
    old.wait_for_log_after(mark, "the new daemon took over", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the old daemon never handed over: {e}"));
    // systemd's stop: SIGTERM to every process of the unit.
    new.signal(Signal::SIGTERM).expect("the new daemon runs");
    old.signal(Signal::SIGTERM).expect("the old daemon runs");
    old.wait_for_log_after(mark, "the drain goes on", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the old daemon did not go on draining: {e}"));
    finish_uploads(uploads);
    let status = old
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the old daemon did not exit after its last connection"));
    assert!(status.success(), "the old daemon exited with {status}");
    drop(new);
}

/// What the admin API set and the health checks found goes on in the new daemon: a drained
/// backend takes no new flow after the upgrade, an admin weight stays, and a backend that was
/// down stays down until its checks pass (it does not take flows for `fall` checks first).
#[test]
fn an_upgrade_keeps_drained_weighed_and_down_backends_as_they_were() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("upgrade.sock");
    let a = HttpNameServer::start("a").expect("backend a");
    let b = HttpNameServer::start("b").expect("backend b");
    let mut c = HttpNameServer::start("c").expect("backend c");
    let web = free_addr();
    let config = DaemonConfig::new()
        .global("upgrade_socket", socket.display().to_string())
        .service(
            // Checks every 5 s: the new daemon's own checks cannot take a backend down within
            // the test (two failures, 5 s apart); only what the old daemon knew can.
            ServiceConfig::tcp("web", web)
                .fast_health("tcp")
                .health("interval", "5s")
                .backend(a.addr(), 1)
                .backend(b.addr(), 1)
                .backend(c.addr(), 1),
        )
        .to_toml();
    let mut old = Daemon::start(&config);
    let admin = old.admin_addr();
    let backend = |status: &serde_json::Value, addr: SocketAddr| -> serde_json::Value {
        status["services"][0]["backends"]
            .as_array()
            .and_then(|all| all.iter().find(|x| x["address"] == addr.to_string()))
            .cloned()
            .unwrap_or_else(|| panic!("{addr} is not in /status: {status}"))
    };
    let (a_at, b_at) = (a.addr().to_string(), b.addr().to_string());
    let said = lb_tests::admin::cli(&admin.to_string(), &["drain", "web", &b_at]);
    assert_eq!(said.code, Some(0), "drain: {said:?}");
    let said = lb_tests::admin::cli(&admin.to_string(), &["weight", "web", &a_at, "5"]);
    assert_eq!(said.code, Some(0), "weight: {said:?}");
    // The old daemon learns that c is down from its failed connects (fall = 2).
    c.stop();
    let end = Instant::now() + Duration::from_secs(10);
    while backend(
        &lb_tests::admin::request(admin, "GET", "/status", "").json(),
        c.addr(),
    )["health"]
        != "down"
    {
        assert!(Instant::now() < end, "backend c never went down");
        let _ = http_get(web, "/");
    }

    let new = Daemon::try_upgrade(&config, &[])
        .unwrap_or_else(|e| panic!("lb-daemon upgrade did not start: {e}"));
    new.wait_for_log(
        "carried over from before its restart",
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("the new daemon took over no backend state: {e}"));
    // From here only the new daemon answers, on the VIP and on its admin API.
    old.wait_exit(Duration::from_secs(10))
        .expect("the old daemon exits once it has handed over");
    let admin = new.admin_addr();
    let status = lb_tests::admin::request(admin, "GET", "/status", "").json();
    assert_eq!(backend(&status, b.addr())["state"], "draining", "{status}");
    assert_eq!(backend(&status, a.addr())["weight"], 5, "{status}");
    assert_eq!(backend(&status, c.addr())["health"], "down", "{status}");
    for k in 0..30 {
        let who = http_get(web, "/").unwrap_or_else(|e| panic!("request {k}: {e}"));
        assert_ne!(who, "b", "request {k} reached the drained backend");
    }
    let status = lb_tests::admin::request(admin, "GET", "/status", "").json();
    assert_eq!(
        backend(&status, c.addr())["connect_failures"],
        0,
        "the new daemon sent connections to the backend the old one knew was down: {status}"
    );
    drop(new);
}

#[test]
fn an_upgrade_stopped_before_it_is_ready_leaves_the_old_daemon_serving() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("upgrade.sock");
    let admin_socket = dir.path().join("admin.sock");
    let site = Site::with_admin_socket(Some(&socket), Some(&admin_socket));
    let mut old = Daemon::start(&site.config);
    // A debug build waits 10 s before READY with this fault: Ctrl-C comes meanwhile.
    let mut new = Daemon::launch_upgrade(&site.config, &[("LB_FAULT", "pause-before-ready")])
        .unwrap_or_else(|e| panic!("lb-daemon upgrade did not start: {e}"));
    new.wait_for_log("LB_FAULT=pause-before-ready", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("the new daemon never got to READY: {e}"));
    new.signal(Signal::SIGINT).expect("SIGINT the new daemon");
    let status = new
        .wait_exit(Duration::from_secs(30))
        .expect("the new daemon exits on SIGINT");
    assert!(!status.success(), "a stopped upgrade must fail: {status}");
    let logs = new.logs().join("\n");
    assert!(
        logs.contains("SIGINT before this daemon was ready"),
        "the new daemon does not say why it stopped:\n{logs}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(old.exit_status().is_none(), "the old daemon stopped");
    for k in 0..20 {
        http_get(site.web, "/")
            .unwrap_or_else(|e| panic!("request {k} after the stopped upgrade failed: {e}"));
    }
    let out = lb_tests::admin::cli(&admin_socket.display().to_string(), &["status"]);
    assert_eq!(
        out.code,
        Some(0),
        "the old daemon's admin socket stopped answering after the stopped upgrade: {out:?}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("the test's directory")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("admin.sock."))
        .collect();
    assert!(left.is_empty(), "the stopped upgrade left {left:?} behind");
}

/// Starts an `lb-daemon upgrade` of `old` that waits 10 s before READY (a debug build's
/// `pause-before-ready`), sends the old daemon SIGTERM once the new one has taken its sockets,
/// and returns the new daemon.
fn stop_the_old_daemon_while_an_upgrade_takes_over(site: &Site, old: &mut Daemon) -> Daemon {
    let new = Daemon::launch_upgrade(&site.config, &[("LB_FAULT", "pause-before-ready")])
        .unwrap_or_else(|e| panic!("lb-daemon upgrade did not start: {e}"));
    new.wait_for_log("LB_FAULT=pause-before-ready", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("the new daemon never took the sockets over: {e}"));
    old.signal(Signal::SIGTERM).expect("the old daemon runs");
    new
}

/// The new daemon of a stopped upgrade exits non-zero within 30 s (its 10 s pause and the
/// answer), saying `why` it could not take the old daemon's place.
fn the_new_daemon_gives_up(new: &mut Daemon, why: &str) {
    let status = new
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the new daemon went on after the old one stopped"));
    assert!(
        !status.success(),
        "an upgrade of a stopped daemon must fail: {status}"
    );
    let logs = new.logs().join("\n");
    assert!(
        logs.contains(&format!("{why} before this daemon was ready")),
        "the new daemon does not say why it stopped:\n{logs}"
    );
}

/// A stop of the old daemon while a new one takes over, before it is ready, wins: the old
/// daemon answers the new one's READY no, and the new one exits 1 leaving what the two share
/// as it is, while the old one lets its connections finish and exits 0. Before, the new
/// daemon went on as if it served while the old one, stopping, emptied and detached the eBPF
/// plane that the new one had adopted.
#[test]
fn a_stop_while_an_upgrade_takes_over_tells_the_new_daemon_no() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("upgrade.sock");
    let site = Site::new(Some(&socket));
    let mut old = Daemon::start(&site.config);
    let uploads = site.start_uploads();
    let mut new = stop_the_old_daemon_while_an_upgrade_takes_over(&site, &mut old);
    the_new_daemon_gives_up(&mut new, "the old daemon's refusal");
    assert!(old.exit_status().is_none(), "the old daemon cut its drain");
    finish_uploads(uploads);
    let status = old
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the old daemon did not exit after its last connection"));
    assert!(status.success(), "the old daemon exited with {status}");
}

/// The same when the old daemon, with nothing to drain, has exited before the new one is
/// ready: the new one cannot tell it READY, and exits 1 instead of going on.
#[test]
fn an_upgrade_whose_old_daemon_exited_before_it_was_ready_gives_up() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("upgrade.sock");
    let site = Site::new(Some(&socket));
    let mut old = Daemon::start(&site.config);
    let mut new = stop_the_old_daemon_while_an_upgrade_takes_over(&site, &mut old);
    let status = old
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the old daemon, with no connection, did not exit"));
    assert!(status.success(), "the old daemon exited with {status}");
    the_new_daemon_gives_up(&mut new, "the old daemon's end");
}

/// A daemon under a service manager refuses `lb-daemon upgrade`: the new daemon would run
/// outside the service, which the manager takes for ended once the old daemon exits. The new
/// daemon exits with the reason and says to upgrade in place; the old one serves on, and the
/// manager hears nothing.
#[test]
fn a_daemon_under_a_service_manager_refuses_lb_daemon_upgrade() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let notify = NotifySocket::bind(dir.path());
    let socket = dir.path().join("upgrade.sock");
    let site = Site::new(Some(&socket));
    let manager = notify.path.display().to_string();
    let mut old = Daemon::try_start_with_env(&site.config, &[("NOTIFY_SOCKET", &manager)])
        .unwrap_or_else(|e| panic!("lb-daemon did not start: {e}"));
    notify.until("READY=1", Duration::from_secs(5));
    let refused = match Daemon::try_upgrade(&site.config, &[]) {
        Ok(_) => panic!("lb-daemon upgrade took over a daemon under a service manager"),
        Err(e) => e.to_string(),
    };
    assert!(
        refused.contains("refuses to hand over") && refused.contains("kill -USR2"),
        "the new daemon does not say why it cannot take over, or what to do instead:\n{refused}"
    );
    assert_eq!(notify.next(Duration::from_millis(300)), None);
    assert!(old.exit_status().is_none(), "the old daemon stopped");
    for k in 0..20 {
        http_get(site.web, "/")
            .unwrap_or_else(|e| panic!("request {k} after the refused upgrade failed: {e}"));
    }
}

/// A new daemon whose proxy worker dies while it starts (here during the 10 s a debug build
/// waits before READY with `pause-before-ready`) does not say READY: it exits non-zero, and
/// the old daemon, never told, goes on serving. Before, READY went out, the old daemon
/// drained and left, and the new one exited for its dead thread: neither served.
#[test]
fn an_upgrade_whose_thread_dies_before_it_is_ready_leaves_the_old_daemon_serving() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("upgrade.sock");
    let site = Site::new(Some(&socket));
    let mut old = Daemon::start(&site.config);
    let mark = old.log_mark();
    let faults = [("LB_FAULT", "pause-before-ready,panic-proxy-worker")];
    let mut new = Daemon::launch_upgrade(&site.config, &faults)
        .unwrap_or_else(|e| panic!("lb-daemon upgrade did not start: {e}"));
    let status = new
        .wait_exit(Duration::from_secs(30))
        .expect("the new daemon exits once its worker died");
    assert!(
        !status.success(),
        "an upgrade with a dead thread must fail: {status}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(old.exit_status().is_none(), "the old daemon stopped");
    assert!(
        old.wait_for_log_after(mark, "took over", Duration::ZERO)
            .is_err(),
        "the old daemon handed over to a new one that cannot serve"
    );
    let logs = new.logs().join("\n");
    assert!(
        logs.contains("a thread's death before this daemon was ready"),
        "the new daemon does not say why it stopped:\n{logs}"
    );
    for k in 0..20 {
        http_get(site.web, "/")
            .unwrap_or_else(|e| panic!("request {k} after the failed upgrade failed: {e}"));
    }
}

/// After log line `mark` the old daemon says the new one took over; the uploads (the old
/// daemon's connections) go on and arrive whole; the old daemon exits 0 after its last
/// connection, well before its drain timeout; the load loop saw no failure; the new daemon
/// serves on its own.
fn the_old_daemon_hands_over(
    old: &mut Daemon,
    mark: usize,
    uploads: Vec<Upload>,
    load: Load,
    site: &Site,
) {
    old.wait_for_log_after(mark, "the new daemon took over", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the old daemon never handed over: {e}"));
    finish_uploads(uploads);
    let status = old
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the old daemon did not exit after its last connection"));
    assert!(status.success(), "the old daemon exited with {status}");
    std::thread::sleep(Duration::from_millis(500));
    load.finish();
    http_get(site.web, "/").unwrap_or_else(|e| panic!("the new daemon does not serve web: {e}"));
}

/// A service manager's notification socket (systemd's `$NOTIFY_SOCKET`), read by the test
/// with each message's sender (`SO_PASSCRED`), as systemd reads it.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
}

/// One notification: the sender's pid and the text.
type Notification = (i32, String);

impl NotifySocket {
    fn bind(dir: &std::path::Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::PassCred, &true)
            .expect("SO_PASSCRED");
        NotifySocket { socket, path }
    }

    /// The next message, waited for up to `timeout`; `None` when none came.
    fn next(&self, timeout: Duration) -> Option<Notification> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixCredentials};
        use std::os::fd::AsRawFd;
        self.socket
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(UnixCredentials);
        let msg = recvmsg::<()>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .ok()?;
        let pid = msg
            .cmsgs()
            .expect("control messages")
            .find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                _ => None,
            })
            .expect("the sender's credentials");
        let n = msg.bytes;
        Some((pid, String::from_utf8_lossy(&buf[..n]).into_owned()))
    }

    /// Messages until one has a line starting with `line`, for up to `timeout`; returns them
    /// all.
    fn until(&self, line: &str, timeout: Duration) -> Vec<Notification> {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let Some(m) = self.next(left.max(Duration::from_millis(1))) else {
                break;
            };
            let done = m.1.lines().any(|l| l.starts_with(line));
            seen.push(m);
            if done {
                return seen;
            }
        }
        panic!("no {line:?} on the notify socket within {timeout:?}; got {seen:?}");
    }

    /// Asserts that every one of `said` came from `pid`, the service's main process then
    /// (what systemd's default `NotifyAccess=main` accepts).
    fn all_from(said: &[Notification], pid: u32, who: &str) {
        for (from, text) in said {
            assert_eq!(
                *from as u32, pid,
                "{text:?} came from pid {from}, not from the main process ({who}, {pid})"
            );
        }
    }
}

/// The upgrade under systemd (`Type=notify`, `NotifyAccess=main`): SIGUSR2 makes the daemon
/// start its binary anew, which takes the sockets over a socket pair (no `upgrade_socket` in
/// the config); once it is ready the old one says `MAINPID=` (the new one) on
/// `$NOTIFY_SOCKET`, drains and exits 0 without saying `STOPPING=1` (the service goes on).
/// Every message comes from the main process of the moment. Under load: no
/// request fails, the uploads arrive whole. First, a new binary that refuses the config
/// leaves the old daemon serving.
#[test]
fn sigusr2_upgrades_in_place_and_tells_the_service_manager() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let notify = NotifySocket::bind(dir.path());
    let site = Site::new(None);
    let socket = notify.path.display().to_string();
    let mut old = Daemon::try_start_with_env(&site.config, &[("NOTIFY_SOCKET", &socket)])
        .unwrap_or_else(|e| panic!("lb-daemon did not start: {e}"));
    let said = notify.until("READY=1", Duration::from_secs(5));
    NotifySocket::all_from(&said, old.pid(), "the old daemon");

    // A successor that cannot start: the old daemon goes on, the manager hears nothing.
    old.rewrite_config("[global\n");
    let mark = old.log_mark();
    old.signal(Signal::SIGUSR2).expect("SIGUSR2");
    old.wait_for_log_after(mark, "did not take over", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the failed successor was not reported: {e}"));
    assert_eq!(notify.next(Duration::from_millis(300)), None);
    http_get(site.web, "/").unwrap_or_else(|e| panic!("the old daemon stopped serving: {e}"));
    old.rewrite_config(&site.config);

    let uploads = site.start_uploads();
    let load = site.start_load();
    std::thread::sleep(Duration::from_millis(300));
    let mark = old.log_mark();
    old.signal(Signal::SIGUSR2).expect("SIGUSR2");
    // The old daemon, still the main process, names the new one.
    let said = notify.until("MAINPID=", Duration::from_secs(20));
    NotifySocket::all_from(&said, old.pid(), "the old daemon");
    let last = &said.last().expect("a message").1;
    let pid: i32 = last
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {last:?}"));
    let new = Successor::from_pid(pid);
    assert_ne!(pid as u32, old.pid(), "MAINPID names the old daemon");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the new daemon runs");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("upgrade"),
        "MAINPID names a process that is not the upgrade: {:?}",
        String::from_utf8_lossy(&cmdline)
    );
    the_old_daemon_hands_over(&mut old, mark, uploads, load, &site);
    // The old daemon's exit is no stop of the service.
    let mut after = Vec::new();
    while let Some(m) = notify.next(Duration::from_millis(200)) {
        after.push(m);
    }
    assert!(
        !after.iter().any(|m| m.1.contains("STOPPING=1")),
        "the old daemon told the manager that the service stops: {after:?}"
    );
    NotifySocket::all_from(&after, pid as u32, "the new daemon");

    // The new daemon is the service now: SIGTERM stops it, and it says so.
    nix::sys::signal::kill(new.pid(), Signal::SIGTERM).expect("SIGTERM to the new daemon");
    let said = notify.until("STOPPING=1", Duration::from_secs(10));
    NotifySocket::all_from(&said, pid as u32, "the new daemon");
    let end = Instant::now() + Duration::from_secs(30);
    while new.alive() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!new.alive(), "the new daemon did not exit on SIGTERM");
}

/// New TCP connections to `web` and UDP requests to `dns`, alternately, until `stop` (or
/// 60 s at most), each result tallied.
fn load_loop(web: SocketAddr, dns: SocketAddr, tally: &Tally, stop: &AtomicBool) {
    let end = Instant::now() + Duration::from_secs(60);
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        let started = Instant::now();
        tally.record("http", started, http_get(web, "/"));
        let payload = format!("ping {k}");
        let started = Instant::now();
        let reply = udp_request(dns, payload.as_bytes(), Duration::from_secs(2)).and_then(|r| {
            // The echo server answers `NAME:payload`.
            if r.ends_with(payload.as_bytes()) {
                Ok(())
            } else {
                Err(lb_tests::client::ClientError::BadResponse(format!(
                    "echo {:?}",
                    String::from_utf8_lossy(&r)
                )))
            }
        });
        tally.record("udp", started, reply);
        k += 1;
    }
}

/// An upgrade in place whose new main process cannot be told to the service manager (its
/// socket is gone): the old daemon does not exit, which would end the service; both serve.
#[test]
fn sigusr2_without_a_reachable_service_manager_keeps_the_old_daemon() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let gone = dir.path().join("no-manager.sock");
    let site = Site::new(None);
    let socket = gone.display().to_string();
    let mut old = Daemon::try_start_with_env(&site.config, &[("NOTIFY_SOCKET", &socket)])
        .unwrap_or_else(|e| panic!("lb-daemon did not start: {e}"));
    let mark = old.log_mark();
    let _new = old
        .upgrade_in_place()
        .unwrap_or_else(|e| panic!("SIGUSR2 started no new daemon: {e}"));
    old.wait_for_log_after(mark, "could not be told that pid", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the old daemon did not say why it stays: {e}"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        old.exit_status().is_none(),
        "the old daemon exited although systemd still takes it for the main process"
    );
    for _ in 0..20 {
        http_get(site.web, "/").unwrap_or_else(|e| panic!("web is not served: {e}"));
    }
}
