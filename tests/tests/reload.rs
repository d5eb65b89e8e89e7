//! Hot reload under load: 30 s of steady new connections and 5 long uploads while the config
//! is reloaded 10 times (backends added, removed and reweighted, a service added and
//! removed, one invalid file): no connection fails, no upload is cut, the invalid file is
//! reported and ignored.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_tests::admin::{self, cli};
use lb_tests::client::{connect, http_get, Upload};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::data::Receipt;
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, HashServer, HttpNameServer};
use nix::sys::signal::Signal;

const UPLOADS: u64 = 5;
const STEP: Duration = Duration::from_secs(3);
const PIECE: u64 = 128 * 1024;

/// The whole config for one step: `web` (HTTP name servers), `bulk` (hash servers, the
/// long uploads) and optionally `extra`.
fn config(
    web_vip: SocketAddr,
    web: &[(SocketAddr, u32)],
    bulk_vip: SocketAddr,
    bulk: &[(SocketAddr, u32)],
    extra: Option<(SocketAddr, SocketAddr)>,
) -> String {
    let mut w = ServiceConfig::tcp("web", web_vip)
        .scheduler("weighted_round_robin")
        .fast_health("http");
    for (a, wt) in web {
        w = w.backend(*a, *wt);
    }
    // No active checks on the hash servers: a check's connect would count as an upload.
    let mut b = ServiceConfig::tcp("bulk", bulk_vip)
        .scheduler("round_robin")
        .health("kind", "none");
    for (a, wt) in bulk {
        b = b.backend(*a, *wt);
    }
    let mut c = DaemonConfig::new().service(w).service(b);
    if let Some((vip, backend)) = extra {
        c = c.service(
            ServiceConfig::tcp("extra", vip)
                .fast_health("http")
                .backend(backend, 1),
        );
    }
    c.to_toml()
}

/// The backends of `service` that take part (not leaving), sorted.
fn serving(api: SocketAddr, service: &str) -> Vec<SocketAddr> {
    let st = admin::status(api);
    let mut v: Vec<SocketAddr> = st["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == service))
        .and_then(|s| s["backends"].as_array())
        .map(|b| {
            b.iter()
                .filter(|b| b["state"] != "removing")
                .filter_map(|b| b["address"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn sorted(v: &[(SocketAddr, u32)]) -> Vec<SocketAddr> {
    let mut a: Vec<SocketAddr> = v.iter().map(|(a, _)| *a).collect();
    a.sort();
    a
}

#[test]
fn reloads_under_load_drop_nothing_and_an_invalid_file_is_ignored() {
    let h: Vec<HttpNameServer> = (1..=4)
        .map(|i| HttpNameServer::start(&format!("h{i}")).expect("backend starts"))
        .collect();
    let s: Vec<HashServer> = (1..=3)
        .map(|i| HashServer::start(&format!("s{i}")).expect("backend starts"))
        .collect();
    let (web_vip, bulk_vip, extra_vip) = (free_addr(), free_addr(), free_addr());
    let ha = |i: usize| h[i].addr();
    let sa = |i: usize| s[i].addr();

    let mut web = vec![(ha(0), 1), (ha(1), 1)];
    let mut bulk = vec![(sa(0), 1), (sa(1), 1)];
    let daemon = Daemon::start(&config(web_vip, &web, bulk_vip, &bulk, None));
    let api = daemon.admin_addr();
    let target = api.to_string();

    // Steady new connections, one request each, from two clients.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(60);
                for _ in 0..200_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > end {
                        break;
                    }
                    match http_get(web_vip, "/") {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failures.lock().expect("lock").push(e.to_string());
                            0
                        }
                    };
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();

    // Long uploads through `bulk`, a piece at a time for the whole test.
    let uploads: Vec<_> = (0..UPLOADS)
        .map(|seed| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut u = Upload::start(bulk_vip, seed)
                    .map_err(|e| format!("upload {seed} could not connect: {e}"))?;
                for _ in 0..2_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    u.send(PIECE).map_err(|e| {
                        format!("upload {seed} was cut after {} bytes: {e}", u.sent())
                    })?;
                    std::thread::sleep(Duration::from_millis(50));
                }
                let sent = u.sent();
                let got = u
                    .finish()
                    .map_err(|e| format!("upload {seed} got no receipt: {e}"))?;
                Ok::<_, String>((seed, sent, got))
            })
        })
        .collect();

    let mut sighup = false;
    let mut reload = |daemon: &Daemon, text: &str, what: &str| {
        daemon.rewrite_config(text);
        sighup = !sighup;
        if sighup {
            let mark = daemon.log_mark();
            daemon.signal(Signal::SIGHUP).expect("the daemon runs");
            let (_, line) = daemon
                .wait_for_log_after(mark, "reload of", Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("no reload after SIGHUP ({what}): {e}"));
            assert!(
                line.contains("applied"),
                "SIGHUP reload ({what}) was refused: {line}"
            );
        } else {
            let out = cli(&target, &["reload"]);
            assert_eq!(
                out.code,
                Some(0),
                "`lb-daemon reload` ({what}) failed: {out:?}"
            );
        }
        std::thread::sleep(STEP);
    };

    std::thread::sleep(STEP);
    web.push((ha(2), 2));
    reload(
        &daemon,
        &config(web_vip, &web, bulk_vip, &bulk, None),
        "add h3",
    );
    assert_eq!(serving(api, "web"), sorted(&web), "web after adding h3");

    web[0].1 = 5;
    reload(
        &daemon,
        &config(web_vip, &web, bulk_vip, &bulk, None),
        "reweight h1",
    );
    let st = admin::status(api);
    assert_eq!(
        admin::backend(&st, "web", ha(0)).expect("h1 listed")["weight"],
        5,
        "h1's weight after the reload"
    );

    web.retain(|(a, _)| *a != ha(1));
    reload(
        &daemon,
        &config(web_vip, &web, bulk_vip, &bulk, None),
        "remove h2",
    );
    assert_eq!(serving(api, "web"), sorted(&web), "web after removing h2");

    // The invalid file: refused with the reason, the running config stays.
    let good = config(web_vip, &web, bulk_vip, &bulk, None);
    daemon.rewrite_config(&good.replace("weight = 5", "weight = 999"));
    let out = cli(&target, &["reload"]);
    assert_eq!(
        out.code,
        Some(1),
        "an invalid file must be refused: {out:?}"
    );
    assert!(
        out.stderr.contains("999") && out.stderr.contains("weight"),
        "the refusal should say what is wrong in the file: {out:?}"
    );
    assert_eq!(
        serving(api, "web"),
        sorted(&web),
        "web after the invalid file"
    );
    std::thread::sleep(STEP);

    let extra = Some((extra_vip, ha(3)));
    reload(
        &daemon,
        &config(web_vip, &web, bulk_vip, &bulk, extra),
        "add service extra",
    );
    let who = http_get(extra_vip, "/").expect("the added service answers");
    assert!(who.contains("h4"), "service extra should reach h4: {who}");

    bulk.retain(|(a, _)| *a != sa(0));
    bulk.push((sa(2), 1));
    reload(
        &daemon,
        &config(web_vip, &web, bulk_vip, &bulk, extra),
        "replace s1 by s3",
    );

    web.push((ha(1), 1));
    web.push((ha(3), 3));
    reload(
        &daemon,
        &config(web_vip, &web, bulk_vip, &bulk, extra),
        "h2 back, h4 added",
    );

    reload(
        &daemon,
        &config(web_vip, &web, bulk_vip, &bulk, None),
        "remove service extra",
    );
    assert!(
        connect(extra_vip).is_err(),
        "the removed service still accepts connections on {extra_vip}"
    );

    bulk.push((sa(0), 2));
    reload(
        &daemon,
        &config(web_vip, &web, bulk_vip, &bulk, None),
        "s1 back, weight 2",
    );

    web.retain(|(a, _)| *a != ha(0));
    web[0].1 = 4;
    reload(
        &daemon,
        &config(web_vip, &web, bulk_vip, &bulk, None),
        "remove h1, reweight",
    );
    assert_eq!(
        serving(api, "web"),
        sorted(&web),
        "web after the last reload"
    );

    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().expect("load thread");
    }
    let failed = failures.lock().expect("lock").clone();
    let answered = ok.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} of {} connections failed during the reloads; first: {:?}",
        failed.len(),
        failed.len() as u64 + answered,
        failed.first()
    );
    assert!(answered > 500, "only {answered} requests were made in 30 s");
    for t in uploads {
        let (seed, sent, got) = t
            .join()
            .expect("upload thread")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            got,
            Receipt::of_stream(sent, seed),
            "upload {seed} arrived truncated or damaged after the reloads"
        );
    }
    let st = admin::status(api);
    assert_eq!(
        st["reloads"]["succeeded"], 9,
        "reloads applied: {}",
        st["reloads"]
    );
    assert_eq!(
        st["reloads"]["failed"], 1,
        "reloads refused: {}",
        st["reloads"]
    );
}

/// A service a reload removes stays in `/status` (and the CLI's table) under
/// `removed_services` while a connection is still open on it, with that connection counted,
/// and leaves once the connection has finished, byte-complete.
#[test]
fn a_removed_service_is_shown_draining_until_its_last_connection_ends() {
    let h = HttpNameServer::start("h1").expect("backend starts");
    let s = HashServer::start("s1").expect("backend starts");
    let (web_vip, bulk_vip) = (free_addr(), free_addr());
    let web = [(h.addr(), 1)];
    let daemon = Daemon::start(&config(web_vip, &web, bulk_vip, &[(s.addr(), 1)], None));
    let api = daemon.admin_addr();
    let active_of = |st: &serde_json::Value, list: &str| -> Option<u64> {
        let svc = st[list]
            .as_array()?
            .iter()
            .find(|svc| svc["name"] == "bulk")?;
        Some(
            svc["backends"]
                .as_array()?
                .iter()
                .filter_map(|b| b["active"].as_u64())
                .sum(),
        )
    };
    let wait_for = |what: &str, ok: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = admin::status(api);
            if ok(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within 10 s; /status: {st}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let mut upload = Upload::start(bulk_vip, 7).expect("upload connects");
    upload.send(PIECE).expect("first piece");
    wait_for("the open upload counted on `bulk`", &|st| {
        active_of(st, "services") == Some(1)
    });

    // A config without `bulk`: it drains.
    daemon.rewrite_config(
        &DaemonConfig::new()
            .service(
                ServiceConfig::tcp("web", web_vip)
                    .scheduler("weighted_round_robin")
                    .fast_health("http")
                    .backend(h.addr(), 1),
            )
            .to_toml(),
    );
    daemon.signal(Signal::SIGHUP).expect("SIGHUP");
    let st = wait_for("`bulk` under removed_services with its connection", &|st| {
        active_of(st, "services").is_none() && active_of(st, "removed_services") == Some(1)
    });
    assert_eq!(
        st["active"], 1,
        "the daemon-wide count misses the draining connection: {st}"
    );
    let table = cli(&api.to_string(), &["status"]);
    assert!(
        table
            .stdout
            .contains("removed by a reload, draining: service bulk"),
        "the CLI's table does not show the draining service:\n{}\n(/status: {st})",
        table.stdout
    );

    upload
        .send(PIECE)
        .expect("the drained service still carries the upload");
    let got = upload.finish().expect("the upload finishes");
    assert_eq!(
        got,
        Receipt::of_stream(2 * PIECE, 7),
        "the upload arrived damaged"
    );
    wait_for(
        "`bulk` gone from /status after its last connection",
        &|st| active_of(st, "removed_services").is_none(),
    );
}

#[test]
fn a_refused_reload_that_renames_a_service_leaves_it_running_with_its_connections() {
    let s = HashServer::start("s1").expect("backend starts");
    let (bulk_vip, extra_vip) = (free_addr(), free_addr());
    let drain = Duration::from_secs(2);
    let bulk = |name: &str| {
        ServiceConfig::tcp(name, bulk_vip)
            .health("kind", "none")
            .backend(s.addr(), 1)
    };
    let daemon = Daemon::start(
        &DaemonConfig::new()
            .global("drain_timeout", "2s")
            .service(bulk("bulk"))
            .to_toml(),
    );
    let api = daemon.admin_addr();
    let mut upload = Upload::start(bulk_vip, 11).expect("upload connects");
    upload.send(PIECE).expect("first piece");

    // `bulk` renamed at its address (it must let go of the address first), and a new
    // service on an address another socket holds: the reload is refused.
    let _taken = std::net::TcpListener::bind(extra_vip).expect("hold the extra address");
    daemon.rewrite_config(
        &DaemonConfig::new()
            .global("drain_timeout", "2s")
            .service(bulk("renamed"))
            .service(
                ServiceConfig::tcp("extra", extra_vip)
                    .health("kind", "none")
                    .backend(s.addr(), 1),
            )
            .to_toml(),
    );
    let out = cli(&api.to_string(), &["reload"]);
    assert_eq!(out.code, Some(1), "the reload should be refused: {out:?}");

    let st = admin::status(api);
    let names: Vec<&str> = st["services"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        names,
        vec!["bulk"],
        "the refused reload changed the services: {st}"
    );
    assert!(
        st["removed_services"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "the refused reload left a service draining: {st}"
    );
    // Past the drain timeout a removed service's connections are cut; this one's must not be.
    std::thread::sleep(drain + Duration::from_secs(1));
    upload
        .send(PIECE)
        .expect("the upload was cut after the refused reload");
    let got = upload.finish().expect("the upload finishes");
    assert_eq!(
        got,
        Receipt::of_stream(2 * PIECE, 11),
        "the upload arrived damaged"
    );
    let mut again = Upload::start(bulk_vip, 12).expect("a new connection after the refusal");
    again.send(PIECE).expect("send");
    assert_eq!(
        again.finish().expect("finish"),
        Receipt::of_stream(PIECE, 12)
    );
}

/// A reload that moves a service to another address starts it anew, but what the admin API
/// set on its backends goes with it: a drained backend stays drained at the new address.
#[test]
fn a_moved_service_keeps_its_drained_backend_drained() {
    let a = HttpNameServer::start("a").expect("backend starts");
    let b = HttpNameServer::start("b").expect("backend starts");
    let s = HashServer::start("s1").expect("backend starts");
    let (web_vip, moved_vip, bulk_vip) = (free_addr(), free_addr(), free_addr());
    let web = [(a.addr(), 1), (b.addr(), 1)];
    let bulk = [(s.addr(), 1)];
    let daemon = Daemon::start(&config(web_vip, &web, bulk_vip, &bulk, None));
    let api = daemon.admin_addr();
    let said = cli(&api.to_string(), &["drain", "web", &b.addr().to_string()]);
    assert_eq!(said.code, Some(0), "drain: {said:?}");

    let mark = daemon.log_mark();
    daemon.rewrite_config(&config(moved_vip, &web, bulk_vip, &bulk, None));
    daemon.signal(Signal::SIGHUP).expect("SIGHUP");
    let (_, line) = daemon
        .wait_for_log_after(mark, "reload of", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("no reload after SIGHUP: {e}"));
    assert!(line.contains("applied"), "the reload was refused: {line}");
    daemon
        .wait_for_log_after(mark, "carried over", Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("the moved service took over no backend state: {e}"));
    let st = admin::status(api);
    let web = st["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "web"))
        .unwrap_or_else(|| panic!("no service web: {st}"));
    assert_eq!(web["listen"], moved_vip.to_string(), "{st}");
    let b_now = (web["backends"].as_array())
        .and_then(|all| all.iter().find(|x| x["address"] == b.addr().to_string()))
        .unwrap_or_else(|| panic!("no backend b: {st}"));
    assert_eq!(b_now["state"], "draining", "{st}");
    for k in 0..20 {
        let who = http_get(moved_vip, "/").unwrap_or_else(|e| panic!("request {k}: {e}"));
        assert_eq!(
            who, "a",
            "request {k} at the new address reached the drained backend"
        );
    }
}

/// Reload after reload renames two services and swaps their addresses while clients connect
/// to both addresses without pause: no connection is refused (the removed service's
/// listeners pass to the added one at their address, with what waits in their queues), and
/// after each reload each address answers from the backend the new file gives it.
#[test]
fn renaming_and_swapping_services_refuses_no_connection() {
    const RELOADS: usize = 12;
    let h1 = HttpNameServer::start("h1").expect("backend starts");
    let h2 = HttpNameServer::start("h2").expect("backend starts");
    let (x, y) = (free_addr(), free_addr());
    // Step `i`: the services are `one{i}` (h1) and `two{i}` (h2); even steps put h1 at x.
    let file = |i: usize| {
        let (at1, at2) = if i.is_multiple_of(2) { (x, y) } else { (y, x) };
        let service = |name: String, vip, backend| {
            ServiceConfig::tcp(&name, vip)
                .health("kind", "none")
                .backend(backend, 1)
        };
        DaemonConfig::new()
            .service(service(format!("one{i}"), at1, h1.addr()))
            .service(service(format!("two{i}"), at2, h2.addr()))
            .to_toml()
    };
    let daemon = Daemon::start(&file(0));
    let api = daemon.admin_addr().to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let load: Vec<_> = [x, y]
        .into_iter()
        .map(|vip| {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(60);
                for _ in 0..300_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > end {
                        break;
                    }
                    match http_get(vip, "/") {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failures.lock().expect("lock").push(format!("{vip}: {e}"));
                            0
                        }
                    };
                }
            })
        })
        .collect();

    for i in 1..=RELOADS {
        std::thread::sleep(Duration::from_millis(300));
        daemon.rewrite_config(&file(i));
        let out = cli(&api, &["reload"]);
        assert_eq!(out.code, Some(0), "reload {i} failed: {out:?}");
        let (at_x, at_y) = if i.is_multiple_of(2) {
            ("h1", "h2")
        } else {
            ("h2", "h1")
        };
        for (vip, name) in [(x, at_x), (y, at_y)] {
            let who = http_get(vip, "/").expect("the address answers after the reload");
            assert!(
                who.contains(name),
                "after reload {i}, {vip} should reach {name}: {who}"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().expect("load thread");
    }
    let failed = failures.lock().expect("lock").clone();
    let answered = ok.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} of {} connections failed across {RELOADS} reloads; first: {:?}",
        failed.len(),
        failed.len() as u64 + answered,
        failed.first()
    );
    assert!(answered > 1_000, "only {answered} requests were made");
}
