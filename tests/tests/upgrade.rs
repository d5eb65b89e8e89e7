//! Upgrades without a gap: `lb-daemon upgrade` takes the running daemon's listening sockets
//! over its hand-over socket (`[global] upgrade_socket`), and once it is ready the old one
//! stops accepting, lets its connections finish and exits 0. Under a loop of new TCP
//! connections and UDP requests and three long uploads: no request fails, every upload
//! arrives byte-complete, the old daemon exits after its last connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_tests::client::{http_get, udp_request, Upload};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::data::Receipt;
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, HashServer, HttpNameServer, UdpEcho};

const MIB: u64 = 1024 * 1024;

/// What the load loop saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn record<T, E: std::fmt::Display>(&self, what: &str, r: Result<T, E>) {
        match r {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_failure.lock().expect("lock");
                first.get_or_insert_with(|| format!("{what}: {e}"));
            }
        }
    }
}

#[test]
fn upgrade_hands_the_sockets_over_and_no_connection_fails() {
    let web_a = HttpNameServer::start("a").expect("web backend a");
    let web_b = HttpNameServer::start("b").expect("web backend b");
    let sink = HashServer::start("sink").expect("hash backend");
    let echo = UdpEcho::start("echo").expect("udp backend");
    let (web, bulk, dns) = (free_addr(), free_addr(), free_addr());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("upgrade.sock");
    let config = DaemonConfig::new()
        .global("drain_timeout", "20s")
        .global("upgrade_socket", socket.display().to_string())
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
    let mut old = Daemon::start(&config);

    let mut uploads: Vec<Upload> = (0..3)
        .map(|seed| {
            let mut u = Upload::start(bulk, 90 + seed)
                .unwrap_or_else(|e| panic!("upload {seed} cannot connect: {e}"));
            u.send(2 * MIB)
                .unwrap_or_else(|e| panic!("upload {seed}: the first bytes failed: {e}"));
            u
        })
        .collect();

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop));
            std::thread::spawn(move || load_loop(web, dns, &tally, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let mark = old.log_mark();
    let new = Daemon::try_upgrade(&config, &[])
        .unwrap_or_else(|e| panic!("lb-daemon upgrade did not start: {e}"));
    let logs = new.logs().join("\n");
    assert!(
        logs.contains("upgrade: took") && logs.contains("listening socket(s)"),
        "the new daemon took no socket:\n{logs}"
    );
    old.wait_for_log_after(mark, "the new daemon took over", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the old daemon never handed over: {e}"));

    // The uploads are the old daemon's: they go on while it drains.
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
    // Its last connection closed: the old daemon exits, well before its drain timeout.
    let status = old
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the old daemon did not exit after its last connection"));
    assert!(status.success(), "the old daemon exited with {status}");

    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().expect("the load thread");
    }
    let (ok, failed) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    assert!(ok >= 50, "the load loop made only {ok} requests");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across the upgrade; the first: {:?}",
        ok + failed,
        tally.first_failure.lock().expect("lock")
    );
    // The new daemon serves on its own.
    http_get(web, "/").unwrap_or_else(|e| panic!("the new daemon does not serve web: {e}"));
    drop(new);
}

/// New TCP connections to `web` and UDP requests to `dns`, alternately, until `stop` (or
/// 60 s at most), each result tallied.
fn load_loop(web: SocketAddr, dns: SocketAddr, tally: &Tally, stop: &AtomicBool) {
    let end = Instant::now() + Duration::from_secs(60);
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        tally.record("http", http_get(web, "/"));
        let payload = format!("ping {k}");
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
        tally.record("udp", reply);
        k += 1;
    }
}
