//! `lb-soak --minutes N`: one long-lived lb-daemon on both data planes under mixed load, the
//! way an operator runs it, for N minutes; prints what failed and how the daemon's memory and
//! descriptors moved. Run by `cargo xtask soak` (root: it builds namespaces).
//!
//! The system: the test topology (a client, the balancer, three backends, on veth pairs) with
//! `web` (TCP 80) and `dns` (UDP 53) on the tc data plane (NAT, at the VIP) and `web-proxy`
//! (TCP 8080) and `dns-proxy` (UDP 5353) on the proxy (at the balancer's address), all on the
//! same three backends. While the load runs:
//! - every 10 s a reload: backend 3 leaves `web` and `web-proxy` (its flows drain) and backend
//!   1 doubles its weight, then the next reload puts them back;
//! - every 30 s one backend (in turn) stops for 5 s: its listener closes and its UDP socket
//!   goes (connections it accepted finish), then it starts again;
//! - every 10 s the daemon's resident memory and open descriptors are sampled.
//!
//! Verdict (exit 1 when one fails): no failed TCP connection on the proxy; on tc none
//! outside a stop's window (a stopped backend's refusals reach clients until its health check
//! marks it DOWN: the eBPF plane cannot retry a connection elsewhere); no lost datagram
//! outside a stop's window; every reload applied; resident memory and descriptors after the
//! warm-up (the first fifth of the run) within 10% of their mean, taking each minute's peak
//! sample (the footprint; point samples fall anywhere in the saw-tooth of periodic work).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use lb_tests::client::http_get;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::xdp::world::{service, World, DNS, WEB};
use lb_tests::xdp::{
    backend_ip, bpf_object, in_netns, udp_exchange, Mode, Path, Topology, BALANCER,
};
use lb_tests::Daemon;
use nix::sys::signal::Signal;

/// Backends in the soak's topology.
const BACKENDS: usize = 3;
/// The proxy services' ports, at the balancer's address.
const WEB_PROXY: u16 = 8080;
const DNS_PROXY: u16 = 5353;
/// Reload, stop and sample periods.
const RELOAD_EVERY: Duration = Duration::from_secs(10);
const STOP_EVERY: Duration = Duration::from_secs(30);
const STOPPED_FOR: Duration = Duration::from_secs(5);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How long after a backend comes back its stop still explains a failure: the health check
/// (200 ms interval, fall 3, rise 2) must see it DOWN and UP again.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Pause between one load thread's requests, so the load leaves the 2-core machine usable.
const PACE: Duration = Duration::from_millis(4);
/// A UDP request's timeout.
const UDP_TIMEOUT: Duration = Duration::from_secs(1);
/// Allowed drift of memory and descriptors from their mean after warm-up.
const DRIFT: f64 = 0.10;

#[derive(Parser)]
#[command(about = "lb's soak run: one daemon, both planes, mixed load, reloads and stops")]
struct Args {
    /// How long to run, in minutes.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
}

/// What one load thread saw: successes, and the times of its failures with their reasons.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: Vec<(Instant, String)>,
}

/// When backends were stopped: (stopped at, started again at, or `None` while stopped).
type Stops = Arc<Mutex<Vec<(Instant, Option<Instant>)>>>;

fn main() -> Result<()> {
    let args = Args::parse();
    if !nix::unistd::Uid::effective().is_root() {
        bail!("lb-soak needs root (network namespaces, the tc data plane)");
    }
    let run_for = Duration::from_secs(args.minutes * 60);
    let mut world = World::start_custom(Path::tc(Mode::Nat), BACKENDS, BACKENDS, &[1, 2, 3], |t| {
        let toml = config(t, false);
        in_netns(&t.balancer, || Daemon::start(&toml)).expect("enter the balancer namespace")
    });
    let pid = world.daemon.pid();
    println!(
        "lb-soak: {} min, daemon pid {pid}, web/dns on tc, web-proxy/dns-proxy on the proxy",
        args.minutes
    );
    let start = Instant::now();
    let end = start + run_for;
    let stop = Arc::new(AtomicBool::new(false));
    let stops: Stops = Arc::new(Mutex::new(Vec::new()));
    let web = Topology::vip(WEB);
    let dns = Topology::vip(DNS);
    let web_proxy = SocketAddr::new(IpAddr::V4(BALANCER), WEB_PROXY);
    let dns_proxy = SocketAddr::new(IpAddr::V4(BALANCER), DNS_PROXY);
    let loads: Vec<(&str, SocketAddr, bool)> = vec![
        ("tcp tc", web, false),
        ("tcp tc", web, false),
        ("tcp proxy", web_proxy, false),
        ("tcp proxy", web_proxy, false),
        ("udp tc", dns, true),
        ("udp proxy", dns_proxy, true),
    ];
    // Threads inherit the network namespace of the thread that starts them.
    let threads: Vec<_> = world.client(|| {
        loads
            .iter()
            .map(|&(what, vip, udp)| {
                let stop = Arc::clone(&stop);
                (what, std::thread::spawn(move || load(vip, udp, &stop)))
            })
            .collect()
    });

    let mut samples: Vec<(Duration, u64, usize)> = Vec::new();
    let mut reloads = (0u32, 0u32);
    let mut next_reload = start + RELOAD_EVERY;
    let mut next_stop = start + STOP_EVERY;
    let mut next_sample = start;
    let mut stopped: Option<(usize, Instant)> = None;
    let mut turn = 0usize;
    let mut shifted = false;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_sample {
            let (rss, fds) = usage(pid)?;
            samples.push((now - start, rss, fds));
            println!(
                "t={:>5}s rss={rss} KiB fds={fds} reloads applied={} refused={}",
                (now - start).as_secs(),
                reloads.0,
                reloads.1
            );
            next_sample += SAMPLE_EVERY;
        }
        if now >= next_reload {
            shifted = !shifted;
            if reload(&world, config(&world.topology, shifted)) {
                reloads.0 += 1;
            } else {
                reloads.1 += 1;
            }
            next_reload += RELOAD_EVERY;
        }
        if stopped.is_none() && now >= next_stop {
            let i = turn % BACKENDS + 1;
            turn += 1;
            // The window opens before the listener closes: a refusal may come at once.
            stops.lock().expect("stops").push((Instant::now(), None));
            let b = world.backend(i);
            b.http.stop();
            b.udp.stop();
            stopped = Some((i, Instant::now()));
            next_stop += STOP_EVERY;
        }
        if let Some((i, at)) = stopped {
            if now >= at + STOPPED_FOR {
                // In the backend's namespace: the sockets are bound there.
                let ns = &world.topology.backends[i - 1];
                let Some(b) = world.servers[i - 1].as_mut() else {
                    bail!("backend b{i} has no servers");
                };
                ns.enter(|| -> std::io::Result<()> {
                    b.http.restart()?;
                    b.udp.restart()
                })??;
                if let Some(last) = stops.lock().expect("stops").last_mut() {
                    last.1 = Some(Instant::now());
                }
                stopped = None;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let stops = stops.lock().expect("stops").clone();
    let in_stop = |t: Instant| {
        stops
            .iter()
            .any(|&(from, to)| t >= from && to.is_none_or(|to| t <= to + STOP_GRACE))
    };

    let mut verdicts = Vec::new();
    let mut by_kind: std::collections::BTreeMap<&str, (u64, u64, u64, Vec<String>)> =
        Default::default();
    for (what, handle) in threads {
        let tally = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
        let e = by_kind.entry(what).or_default();
        e.0 += tally.ok;
        for (t, why) in tally.failed {
            if in_stop(t) {
                e.1 += 1;
            } else {
                e.2 += 1;
                if e.3.len() < 5 {
                    e.3.push(format!("t={}s: {why}", (t - start).as_secs()));
                }
            }
        }
    }
    println!("\nload (failures in a stop's window / outside it):");
    for (what, (ok, in_window, outside, examples)) in &by_kind {
        println!("  {what:<10} ok={ok} failed in a stop={in_window} failed outside={outside}");
        for e in examples {
            println!("    {e}");
        }
        let tolerated_in_window = *what != "tcp proxy";
        if *outside > 0 || (!tolerated_in_window && *in_window > 0) {
            verdicts.push(format!("{what}: {} failures", outside + in_window));
        }
        if *ok == 0 {
            verdicts.push(format!("{what}: nothing succeeded"));
        }
    }
    if reloads.1 > 0 {
        verdicts.push(format!("{} reloads refused", reloads.1));
    }
    let warm = run_for / 5;
    let after: Vec<&(Duration, u64, usize)> = samples.iter().filter(|s| s.0 >= warm).collect();
    // Each minute's highest sample: the footprint (what a MemoryMax must allow). A point sample
    // lands anywhere in the saw-tooth of the daemon's periodic walks and heap trims, which is
    // not drift.
    let mut minute_peaks: std::collections::BTreeMap<u64, (u64, usize)> = Default::default();
    for s in &after {
        let peak = minute_peaks.entry(s.0.as_secs() / 60).or_insert((0, 0));
        peak.0 = peak.0.max(s.1);
        peak.1 = peak.1.max(s.2);
    }
    for (name, values, lows) in [
        (
            "rss KiB",
            minute_peaks
                .values()
                .map(|p| p.0 as f64)
                .collect::<Vec<f64>>(),
            after.iter().map(|s| s.1).min(),
        ),
        (
            "fds",
            minute_peaks
                .values()
                .map(|p| p.1 as f64)
                .collect::<Vec<f64>>(),
            after.iter().map(|s| s.2 as u64).min(),
        ),
    ] {
        if values.is_empty() {
            continue;
        }
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let (lo, hi) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let drift = ((hi - mean).max(mean - lo)) / mean.max(1.0);
        let series: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
        println!(
            "{name}, each minute's peak after warm-up ({} minutes): min {lo:.0} max {hi:.0} mean \
             {mean:.0}, drift {:.1}% (lowest sample {}): {}",
            values.len(),
            drift * 100.0,
            lows.unwrap_or(0),
            series.join(" ")
        );
        if drift > DRIFT {
            verdicts.push(format!(
                "{name} drifted {:.1}% from its mean",
                drift * 100.0
            ));
        }
    }
    println!("reloads applied {}, refused {}", reloads.0, reloads.1);
    drop(world);
    if verdicts.is_empty() {
        println!("lb-soak: PASS");
        Ok(())
    } else {
        bail!("lb-soak: FAIL: {}", verdicts.join("; "))
    }
}

/// The soak's config: `web` and `dns` on tc at the VIP, `web-proxy` and `dns-proxy` on the
/// proxy at the balancer's address; `shifted`: backend 3 leaves the TCP services and backend
/// 1 weighs 2.
fn config(t: &Topology, shifted: bool) -> String {
    let backends: Vec<(usize, u32)> = if shifted {
        vec![(1, 2), (2, 1)]
    } else {
        (1..=BACKENDS).map(|i| (i, 1)).collect()
    };
    let all: Vec<(usize, u32)> = (1..=BACKENDS).map(|i| (i, 1)).collect();
    let proxy = |name: &str, port: u16, udp: bool, to: u16, list: &[(usize, u32)]| {
        let listen = SocketAddr::new(IpAddr::V4(BALANCER), port);
        let mut s = if udp {
            ServiceConfig::udp(name, listen).fast_health("udp")
        } else {
            ServiceConfig::tcp(name, listen).fast_health("http")
        }
        .set("dataplane", "proxy")
        .health("timeout", "2s")
        .health("fall", 3);
        for &(i, w) in list {
            s = s.backend(SocketAddr::new(IpAddr::V4(backend_ip(i)), to), w);
        }
        s
    };
    DaemonConfig::new()
        .global("bpf_object", bpf_object().display().to_string())
        .global("drain_timeout", "5s")
        .service(service(t, Mode::Nat, "web", &backends).set("dataplane", "tc"))
        .service(service(t, Mode::Nat, "dns", &all).set("dataplane", "tc"))
        .service(proxy("web-proxy", WEB_PROXY, false, WEB, &backends))
        .service(proxy("dns-proxy", DNS_PROXY, true, DNS, &all))
        .to_toml()
}

/// Rewrites the daemon's config, sends SIGHUP and waits for the outcome: whether the reload
/// was applied.
fn reload(world: &World, text: String) -> bool {
    let daemon = &world.daemon;
    daemon.rewrite_config(&text);
    let mark = daemon.log_mark();
    if daemon.signal(Signal::SIGHUP).is_err() {
        return false;
    }
    match daemon.wait_for_log_after(mark, "reload of", Duration::from_secs(20)) {
        Ok((_, line)) => {
            let applied = line.contains("applied");
            if !applied {
                println!("reload refused: {line}");
            }
            applied
        }
        Err(e) => {
            println!("reload: no outcome: {e}");
            false
        }
    }
}

/// Requests to `vip` (HTTP GET, or a UDP echo) until `stop`, each on a new connection or
/// socket, paced by [`PACE`].
fn load(vip: SocketAddr, udp: bool, stop: &AtomicBool) -> Tally {
    let mut tally = Tally::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let result = if udp {
            let payload = format!("soak {n}");
            udp_exchange(vip, &[payload.into_bytes()], UDP_TIMEOUT)
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            http_get(vip, "/").map(drop).map_err(|e| e.to_string())
        };
        match result {
            Ok(()) => tally.ok += 1,
            Err(why) => tally.failed.push((Instant::now(), why)),
        }
        std::thread::sleep(PACE);
    }
    tally
}

/// The daemon's resident memory (KiB) and open descriptors.
fn usage(pid: u32) -> Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}
