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

    let status = admin::status(api);
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
