//! A thread the daemon cannot run without that dies is not silent: the daemon logs which
//! thread and why, drains what is left, and exits non-zero, so the service manager starts it
//! again (see `lb_daemon::watchdog`). The faults are injected with `LB_FAULT`, which only a
//! debug build (the one the tests run) reads.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use lb_tests::client::http_get;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::daemon::LogWaitError;
use lb_tests::ports::free_addr;
use lb_tests::xdp::world::{service, World};
use lb_tests::xdp::{bpf_object, in_netns, Mode, Path};
use lb_tests::{Daemon, HttpNameServer};

/// How long the daemon may take to notice the death (a worker's sweep comes at least once a
/// second), drain (`drain_timeout` 1 s) and exit.
const EXIT: Duration = Duration::from_secs(15);

/// Waits for the daemon's exit after `thread` panicked; asserts it is non-zero and that the
/// log names `thread` and `why`, and has the panic's own message.
fn assert_exits_naming(daemon: &mut Daemon, thread: &str, why: &str) {
    let status = daemon.wait_exit(EXIT).unwrap_or_else(|| {
        panic!(
            "the daemon did not exit within {EXIT:?} after {thread} died; its log:\n{}",
            daemon.logs().join("\n")
        )
    });
    assert!(
        !status.success(),
        "the daemon exited with {status} after {thread} died: it must exit non-zero so the \
         service manager starts it again"
    );
    let logs = daemon.logs().join("\n");
    assert!(
        logs.contains(&format!("thread {thread} ended unexpectedly: {why}")),
        "the log must name the thread and why it ended; it said:\n{logs}"
    );
    assert!(
        daemon.logs().iter().any(|l| l.starts_with(&format!("thread '{thread}' ("))
            && l.contains(") panicked at ")),
        "the panic's own message (where it happened) must reach the log; it said:\n{logs}"
    );
}

#[test]
fn a_proxy_worker_that_panics_makes_the_daemon_exit_non_zero_and_say_why() {
    let backend = HttpNameServer::start("b1").expect("a backend starts");
    let config = DaemonConfig::new()
        .global("drain_timeout", "1s")
        .global("workers", 2)
        .service(
            ServiceConfig::tcp("web", free_addr())
                .fast_health("http")
                .backend(backend.addr(), 1),
        )
        .to_toml();
    let mut daemon = Daemon::try_start_with_env(&config, &[("LB_FAULT", "panic-proxy-worker")])
        .unwrap_or_else(|e| panic!("lb-daemon did not start: {e}"));
    assert_exits_naming(
        &mut daemon,
        "lb-proxy-0",
        "panicked: injected by LB_FAULT=panic-proxy-worker",
    );
}

/// Connections made while the log reader stalls in
/// [`a_worker_that_panics_while_the_log_reader_stalls_still_makes_the_daemon_exit`]: their
/// access lines (about 150 bytes each) fill the pipe (64 KiB), so that the daemon's writes to
/// stderr block.
const STALLING_CONNECTIONS: usize = 1_000;

/// A panic while stderr's reader stalls (a journald under load) does not leave the panicking
/// thread blocked on stderr: the daemon still exits non-zero, so the service manager starts
/// it again, rather than running on without a worker.
#[test]
fn a_worker_that_panics_while_the_log_reader_stalls_still_makes_the_daemon_exit() {
    let backend = HttpNameServer::start("b1").expect("a backend starts");
    let vip = free_addr();
    let config = DaemonConfig::new()
        .global("drain_timeout", "1s")
        .global("workers", 2)
        .service(
            ServiceConfig::tcp("web", vip)
                .set("access_log", true)
                .health("kind", "none")
                .backend(backend.addr(), 1),
        )
        .to_toml();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let armed = dir.path().join("armed");
    let armed_by = armed.display().to_string();
    let env = [
        ("LB_FAULT", "panic-proxy-worker"),
        ("LB_FAULT_ARMED_BY", armed_by.as_str()),
    ];
    let mut daemon = Daemon::try_start_with_env(&config, &env)
        .unwrap_or_else(|e| panic!("lb-daemon did not start: {e}"));
    daemon.pause_log_reader(true);
    let stalled = std::panic::catch_unwind(AssertUnwindSafe(|| {
        for i in 0..STALLING_CONNECTIONS {
            if let Err(e) = http_get(vip, "/") {
                panic!("connection {i} through the proxy failed while the log reader stalled: {e}");
            }
        }
        std::fs::write(&armed, b"").expect("arm the fault");
        daemon.wait_exit(EXIT)
    }));
    // Reads on however the test ends, so that the daemon's last lines reach its log.
    daemon.pause_log_reader(false);
    let ended = daemon.wait_for_log("(nothing: the end of the output)", EXIT);
    let status = stalled
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        .unwrap_or_else(|| {
            panic!(
                "the daemon did not exit within {EXIT:?} after lb-proxy-0 panicked while its \
                 log reader stalled: the panicking thread is stuck on stderr"
            )
        });
    assert!(
        !status.success(),
        "the daemon exited with {status} after lb-proxy-0 died: it must exit non-zero"
    );
    // The stall was real: lines that stderr never took were lost with the process.
    assert!(
        matches!(ended, Err(LogWaitError::Exited { .. })),
        "the daemon's output did not end: {ended:?}"
    );
    let access_lines = daemon
        .logs()
        .iter()
        .filter(|l| l.contains("lb::access"))
        .count();
    assert!(
        access_lines < STALLING_CONNECTIONS,
        "all {access_lines} access lines reached the log: its reader never stalled the daemon"
    );
}

#[test]
fn an_ebpf_sync_thread_that_panics_makes_the_daemon_exit_non_zero_and_say_why() {
    if !lb_tests::require_root("dead_threads::an_ebpf_sync_thread_that_panics") {
        return;
    }
    let mut world = World::start_custom(Path::tc(Mode::Nat), 1, 1, &[], |t| {
        let toml = DaemonConfig::new()
            .global("bpf_object", bpf_object().display().to_string())
            .global("drain_timeout", "1s")
            .service(service(t, Mode::Nat, "web", &[(1, 1)]))
            .to_toml();
        in_netns(&t.balancer, || {
            Daemon::try_start_with_env(&toml, &[("LB_FAULT", "panic-sync-thread")])
        })
        .expect("enter the balancer namespace")
        .unwrap_or_else(|e| panic!("lb-daemon did not start: {e}"))
    });
    assert_exits_naming(
        &mut world.daemon,
        "lb-xdp-sync",
        "panicked: injected by LB_FAULT=panic-sync-thread",
    );
}
