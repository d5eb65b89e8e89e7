//! A backend dies while clients keep connecting, then comes back: clients never notice, the
//! daemon marks it DOWN and stops trying it, and after `rise` good checks it is UP and
//! serving again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lb_tests::client::http_get;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::load::wait_until_each_answers;
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, HttpNameServer};

/// `[service.health] rise` in this test.
const RISE: u32 = 2;
/// The client stream never runs longer than this, nor makes more requests than this.
const STREAM_LIMIT: Duration = Duration::from_secs(60);
const STREAM_MAX_REQUESTS: usize = 200_000;

/// One request of the client stream: when it finished, and who answered or what failed.
struct Outcome {
    at: Instant,
    answer: Result<String, String>,
}

#[test]
fn killed_backend_is_invisible_to_clients_and_serves_again_after_restart() {
    let mut backends: Vec<HttpNameServer> = (1..=3)
        .map(|i| HttpNameServer::start(&format!("b{i}")).expect("a backend starts"))
        .collect();
    let vip = free_addr();
    let mut svc = ServiceConfig::tcp("web", vip)
        .scheduler("round_robin")
        .set("retries", 2)
        .set("connect_timeout", "1s")
        .health("kind", "http")
        .health("path", "/health")
        .health("interval", "200ms")
        .health("timeout", "500ms")
        .health("rise", RISE)
        .health("fall", 2);
    for b in &backends {
        svc = svc.backend(b.addr(), 1);
    }
    let daemon = Daemon::start(&DaemonConfig::new().service(svc).to_toml());
    wait_until_each_answers(&["b1", "b2", "b3"], Duration::from_secs(15), || {
        http_get(vip, "/")
    })
    .unwrap_or_else(|e| panic!("the service never came up: {e}"));

    let b2: SocketAddr = backends[1].addr();
    let down_line = format!("backend {b2} of service web is DOWN");
    let up_line = format!("backend {b2} of service web is UP");
    let connect_failed = format!("connect to backend {b2} failed");

    let stop = AtomicBool::new(false);
    let outcomes: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    let (down_idx, up_at, health_checks_before_up) = std::thread::scope(|s| {
        // The steady stream: one new connection after the other, bounded in count and time.
        s.spawn(|| {
            let end = Instant::now() + STREAM_LIMIT;
            for _ in 0..STREAM_MAX_REQUESTS {
                if stop.load(Ordering::Relaxed) || Instant::now() >= end {
                    break;
                }
                let answer = http_get(vip, "/").map_err(|e| e.to_string());
                outcomes.lock().unwrap().push(Outcome {
                    at: Instant::now(),
                    answer,
                });
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        // Stop everything the test thread started, even if an assertion below panics.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);

        std::thread::sleep(Duration::from_millis(500));
        let mark = daemon.log_mark();
        backends[1].stop();
        let (down_idx, _) = daemon
            .wait_for_log_after(mark, &down_line, Duration::from_secs(10))
            .unwrap_or_else(|e| {
                panic!("b2 ({b2}) was stopped but the daemon never said it is DOWN: {e}")
            });

        // Keep the stream going while b2 is down, so a daemon that still tries it would show.
        std::thread::sleep(Duration::from_millis(1_500));

        let checks_before = backends[1].health_checks();
        let mark = daemon.log_mark();
        backends[1].restart().expect("b2 restarts on its old port");
        daemon
            .wait_for_log_after(mark, &up_line, Duration::from_secs(10))
            .unwrap_or_else(|e| {
                panic!("b2 ({b2}) was restarted but the daemon never said it is UP: {e}")
            });
        let up_at = Instant::now();
        let checks = backends[1].health_checks() - checks_before;

        // Wait (bounded) until the stream shows b2 answering again.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let served = outcomes
                .lock()
                .unwrap()
                .iter()
                .any(|o| o.at > up_at && o.answer.as_deref() == Ok("b2"));
            if served {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        (down_idx, up_at, checks)
    });

    let outcomes = outcomes.into_inner().unwrap();
    let failures: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| o.answer.as_ref().err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} client requests failed while b2 was stopped and restarted (the balancer \
         should have retried another backend): {:?}",
        failures.len(),
        outcomes.len(),
        &failures[..failures.len().min(5)]
    );

    // A connect picked from the table that was current just before b2 went DOWN may still be
    // failing when the DOWN line is written; what must not happen is a connect to b2 picked
    // from the table that excludes it, or from any later one.
    let logs = daemon.logs();
    let down_generation = table_generation(&logs[down_idx]).unwrap_or_else(|| {
        panic!(
            "the DOWN line should name the table generation that excludes b2: {}",
            logs[down_idx]
        )
    });
    let late_attempts: Vec<&String> = logs[down_idx + 1..]
        .iter()
        .filter(|l| l.contains(&connect_failed))
        .filter(|l| table_generation(l).is_none_or(|g| g >= down_generation))
        .collect();
    assert!(
        late_attempts.is_empty(),
        "after the daemon marked b2 DOWN (table generation {down_generation}) it still picked \
         b2 for {} new connections, e.g. {:?}",
        late_attempts.len(),
        late_attempts.first()
    );

    assert!(
        health_checks_before_up >= u64::from(RISE),
        "the daemon said b2 is UP after only {health_checks_before_up} health checks reached \
         it; rise is {RISE}"
    );

    let after_up = outcomes
        .iter()
        .filter(|o| o.at > up_at && o.answer.as_deref() == Ok("b2"))
        .count();
    assert!(
        after_up > 0,
        "b2 was UP again but served none of the {} connections made in the 5 s after",
        outcomes.iter().filter(|o| o.at > up_at).count()
    );
}

/// The `(table generation N)` a daemon log line ends with, if any.
fn table_generation(line: &str) -> Option<u64> {
    let rest = &line[line.rfind("(table generation ")? + "(table generation ".len()..];
    rest[..rest.find(')')?].parse().ok()
}
