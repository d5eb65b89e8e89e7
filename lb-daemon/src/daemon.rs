//! `lb-daemon run`: starts every service on its data plane, runs the health checks and the
//! admin API, reloads on SIGHUP, and drains on SIGTERM/SIGINT (on SIGQUIT: drains the proxy
//! and leaves the eBPF data plane pinned for the next daemon; on SIGUSR2: starts its binary
//! anew and hands over to it, see [`crate::handover`]). It tells systemd what it does
//! ([`crate::notify`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use crate::admin::api::ApiError;
use crate::config::Config;
use crate::control::Control;
use crate::dataplane::proxy::{Proxy, ProxyError, ProxyOptions, ProxyStart, SpliceMode};
use crate::dataplane::Dataplane;
use crate::reload::ReloadError;
use crate::service::{PassiveFeedback, ServiceSet};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A data plane setting cannot be used; today only a bad `LB_PROXY_SPLICE` value.
    #[error("{0}")]
    Dataplane(String),
    /// The proxy could not start (no io_uring, no thread...).
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A service could not start: a `dataplane = "xdp"` service XDP cannot carry, a listen
    /// address in use...
    #[error(transparent)]
    Start(#[from] ReloadError),
    /// The admin API could not listen on its address.
    #[error(transparent)]
    Admin(#[from] ApiError),
    /// `[announce]` is set and its routing table cannot be reached (no netlink socket).
    #[error("announce: {0}")]
    Announce(#[from] crate::announce::RouteError),
    /// The signal handlers or the async runtime could not be set up.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    /// `lb-daemon upgrade` could not take the running daemon's sockets (no
    /// `[global] upgrade_socket`, no daemon there, a broken exchange, a refusal): nothing was
    /// started; or it was told to stop before it was ready: the old daemon goes on; or the
    /// old daemon answered its READY no (it stops, or handed over to another new daemon) or
    /// was gone: this one leaves the eBPF plane to it.
    #[error("upgrade: {0}")]
    Upgrade(String),
    /// Another daemon runs on the same `[global] bpf_pin_dir`: nothing was started.
    #[error(transparent)]
    PinLock(#[from] crate::dataplane::xdp::pin_lock::PinLockError),
    /// A thread the daemon cannot run without ended unexpectedly (see [`crate::watchdog`]):
    /// the daemon drained what was left and exits non-zero, to be started again.
    #[error("{0}; exiting so that the service manager starts lb again")]
    ThreadDied(crate::watchdog::Death),
}

/// Queued passive connect outcomes before the data plane starts dropping them.
const PASSIVE_QUEUE: usize = 4096;

/// Runs `config` (read from `path`, which SIGHUP and `POST /reload` read again) until
/// SIGTERM or SIGINT, then stops accepting, lets open connections finish for up to
/// `global.drain_timeout`, and returns. A second SIGTERM or SIGINT during the drain ends it
/// at once: what is still open is closed with a reset, as at the drain timeout. A daemon that
/// handed over to a new one drains as well; there a SIGINT or a second SIGTERM ends it (the
/// first SIGTERM is the service manager stopping both daemons). The handlers
/// are in place before anything starts, so even a signal during start-up drains.
///
/// Start-up is a reload from an empty config: the proxy starts with no service, then each
/// service is placed as [`crate::placement::Planes::place`] decides (the choice and its
/// reason are logged). On the eBPF plane the drain stops new flows (empty tables: a SYN gets
/// a RST) and waits for the open ones as the proxy does; then the programs are detached and
/// their pins removed. SIGQUIT, and a dead thread, drain the proxy only: the eBPF plane stays
/// attached and pinned (see `dataplane::xdp::pins`), so the daemon started next adopts its
/// flows.
///
/// Returns `Err(DaemonError::Start)` when a service cannot start (a `dataplane = "xdp"`
/// service XDP cannot carry, a listen address in use), `Err(DaemonError::Proxy)` when the
/// proxy's workers cannot start, `Err(DaemonError::Admin)` when the admin API cannot listen,
/// and `Err(DaemonError::ThreadDied)` after the drain when a proxy worker or the eBPF sync
/// thread ended unexpectedly (which starts the drain as SIGTERM does).
///
/// With `take_over` (`lb-daemon upgrade`), the listening sockets of the daemon serving
/// `[global] upgrade_socket` are taken over first (see [`crate::handover`]); once this one is
/// ready, that one stops accepting, drains and exits. `Err(DaemonError::Upgrade)` when they
/// cannot be taken. A daemon started by another's SIGUSR2 takes them over the descriptor
/// `$LB_UPGRADE_FD` names instead (see [`crate::handover::spawn_successor`]).
///
/// With `[announce]`, the VIPs it can serve are announced once it runs and withdrawn before
/// it drains (see [`crate::announce`]); `Err(DaemonError::Announce)` when the routing table
/// cannot be reached.
pub fn run(config: Config, path: &Path, take_over: bool) -> Result<(), DaemonError> {
    // The control plane is I/O bound (checks, timers): one thread is plenty and keeps it off
    // the proxy workers' cores. Built first so that the signal handlers go in before any
    // listener opens: until then SIGTERM's default action would kill the daemon undrained.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Blocking-pool threads started after start-up take the lowered capabilities.
        .on_thread_start(crate::privileges::follow)
        .build()
        .map_err(DaemonError::Runtime)?;
    let mut signals = {
        let _in_runtime = rt.enter();
        Signals::install().map_err(DaemonError::Runtime)?
    };
    raise_fd_limit();
    let worker_priority = config.global.worker_priority;
    let worker_priority = match crate::priority::allow(worker_priority) {
        Ok(how) => {
            let how = match how {
                crate::priority::Allowed::Capability => {
                    " (RLIMIT_NICE cannot be raised: CAP_SYS_NICE is kept for it)"
                }
                _ => "",
            };
            info!("proxy workers run at nice {worker_priority} ([global] worker_priority){how}");
            Some(worker_priority)
        }
        Err(e) => {
            warn!("{e}, nor is there CAP_SYS_NICE: the proxy workers run at the daemon's priority");
            None
        }
    };
    // Read now: after a package upgrade replaced the file, it names the new binary, which an
    // upgrade in place (SIGUSR2) starts.
    let exe = std::env::current_exe();
    let workers = match config.global.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let handover = if take_over {
        let taken = match crate::handover::take_over_from_parent() {
            // Started by the running daemon (SIGUSR2): the socket pair it made.
            Some(taken) => taken,
            None => {
                let Some(socket) = config.global.upgrade_socket.as_deref() else {
                    return Err(DaemonError::Upgrade(
                        "[global] upgrade_socket is not set: it names the running daemon's \
                         hand-over socket"
                            .into(),
                    ));
                };
                crate::handover::take_over(socket)
            }
        };
        let (inherited, taken) = taken.map_err(|e| DaemonError::Upgrade(e.to_string()))?;
        Some((Arc::new(inherited), taken))
    } else {
        None
    };
    if let Some(dir) = &config.global.bpf_pin_dir {
        claim_pin_dir(dir, &config, handover.as_ref().map(|(i, _)| &**i))?;
    }
    let inherited = handover.as_ref().map(|(i, _)| Arc::clone(i));
    let (control, passive_rx, adopted) =
        start(config, path, workers, worker_priority, &rt, inherited)?;
    let stopped = rt.block_on(serve(
        &control,
        passive_rx,
        workers,
        &mut signals,
        handover,
        exe,
    ));
    let handed_over = stopped.as_ref().is_ok_and(|s| s.handed_over);
    if handed_over {
        control.with_proxy(|p| p.mark_handed_over());
    }
    // A daemon taking over that failed before it was ready leaves the adopted eBPF plane to
    // the old daemon, which goes on with it; one that adopted a pinned set after a crash or
    // SIGQUIT leaves it pinned for the next daemon, as it found it.
    let keep = match &stopped {
        Ok(s) => s.keep_dataplane,
        Err(_) => take_over || adopted,
    };
    let stop_taken = stopped.as_ref().is_ok_and(|s| s.stop_taken);
    let result = stopped.and_then(|s| match (s.died, s.aborted) {
        (Some(d), _) => Err(DaemonError::ThreadDied(d)),
        (None, Some(why)) => Err(DaemonError::Upgrade(format!(
            "{why} before this daemon was ready: {}",
            match s.old_stopped {
                true => "the old daemon does not hand over to this one",
                false => "the old daemon goes on",
            }
        ))),
        (None, None) => Ok(()),
    });
    let mut xdp = control.take_xdp();
    if keep {
        if let Some(x) = xdp.take() {
            // Dropped without `shutdown`: the pinned programs and maps stay, for the next
            // daemon to adopt; the proxy drains as for SIGTERM.
            info!(
                "eBPF: the data plane stays attached and pinned; its flows go on, on the last \
                 table, until a daemon adopts it"
            );
            drop(x);
        }
    }
    if let Some(x) = &xdp {
        let stopped = x.stop_new_flows();
        info!(
            "eBPF: {stopped} service(s) take no new flows (a SYN is answered with a RST); the \
             flows they carry go on until they end or for {}",
            humantime::format_duration(control.config().global.drain_timeout)
        );
    }
    let drain_timeout = control.config().global.drain_timeout;
    // Not after an aborted take-over, nor after a stop the hand-over took: a stop signal
    // began that drain.
    let upgrade_drain = handed_over && result.is_ok() && !stop_taken;
    let drained = rt.block_on(drain(
        control.take_proxy(),
        xdp.as_ref(),
        drain_timeout,
        upgrade_drain,
        &mut signals,
    ));
    match drained.proxy_cut {
        0 => {}
        cut if drained.early.is_some() => warn!(
            "drain cut short by a second {}: closed {cut} connections and sessions that were \
             still open",
            drained.early.unwrap_or("signal")
        ),
        cut => warn!(
            "drain timeout reached: closed {cut} connections and sessions that were still open"
        ),
    }
    if let Some(x) = xdp {
        match drained.ebpf {
            EbpfDrain::Done => info!("eBPF: every flow ended"),
            EbpfDrain::Left(open) => {
                let open = open.map_or("an unknown number of".to_string(), |n| n.to_string());
                match drained.early {
                    Some(why) => warn!(
                        "drain cut short by a second {why}: {open} eBPF flow(s) still open are \
                         cut"
                    ),
                    None => warn!("drain timeout reached: {open} eBPF flow(s) still open are cut"),
                }
            }
        }
        x.shutdown();
    }
    info!("stopped");
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Makes pin directory `dir` this daemon's (`dataplane::xdp::pin_lock`) before anything
/// starts: the lock an old daemon handed over (`inherited`), whatever `config` holds (the
/// successor of the set's owner removes it if no service of its runs on eBPF), or else its
/// own when a service of `config` may run on the eBPF plane (the directory is made first if
/// need be). A daemon with no such service leaves another's pinned set alone
/// (`pins::remove_unused`) and runs beside it.
///
/// Returns `Err(DaemonError::PinLock)` when another daemon holds it: this one must not adopt
/// the set that daemon serves.
fn claim_pin_dir(
    dir: &Path,
    config: &Config,
    inherited: Option<&crate::handover::Inherited>,
) -> Result<(), DaemonError> {
    use crate::dataplane::xdp::pin_lock;
    let handed =
        inherited.and_then(|i| i.take_named(pin_lock::HANDOVER_ADDR, pin_lock::HANDOVER_KIND, 0));
    if handed.is_some_and(|fd| pin_lock::inherit(dir, fd)) {
        return Ok(());
    }
    let may_pin = config
        .services
        .iter()
        .any(|s| crate::placement::why_not_xdp(s).is_none());
    if may_pin {
        // Made now if it is not there yet (a first start, or the last daemon's SIGTERM
        // removed it), so that of two daemons starting at once one is refused here, before
        // it binds anything. A directory that cannot be made is the eBPF plane's to report.
        let _ = crate::dataplane::xdp::pins::make_root(dir);
        pin_lock::claim(dir)?;
    }
    Ok(())
}

/// Starts the proxy with `workers` workers (at nice `worker_priority`, `None`: the daemon's)
/// and no service, then places every service of
/// `config` as a reload from an empty config would. Returns the control state, the queue
/// of passive connect outcomes, for [`serve`], and whether the eBPF plane adopted a pinned
/// set (a restart after a crash or SIGQUIT, an upgrade).
fn start(
    config: Config,
    path: &Path,
    workers: usize,
    worker_priority: Option<i32>,
    rt: &tokio::runtime::Runtime,
    inherited: Option<Arc<crate::handover::Inherited>>,
) -> Result<(Arc<Control>, PassiveQueue, bool), DaemonError> {
    let (feedback, passive_rx) = PassiveFeedback::new(PASSIVE_QUEUE);
    let proxy = <Proxy as Dataplane>::start(ProxyStart {
        workers,
        events: feedback,
        options: ProxyOptions {
            worker_priority,
            ..proxy_options_from_env()?
        },
    })?;
    let carried = inherited.as_ref().map(|i| i.take_backends());
    if let Some(sockets) = inherited {
        proxy.inherit(sockets);
    }
    let pin_dir = config.global.bpf_pin_dir.clone();
    let control = Control::new(path, &config, ServiceSet::new(), proxy);
    control.carry(carried.unwrap_or_default());
    control.planes().set_announced(config.announce.is_some());
    {
        // The services' health checks are spawned on this runtime; they run from block_on.
        let _in_runtime = rt.enter();
        if let Err(e) = crate::reload::apply_config(&control, config) {
            // The refused start left the eBPF services it placed as written
            // (`reload::undo_starts`): a pinned set it adopted goes on serving on them for
            // the next daemon; a plane this start made itself is taken down again.
            if !control.planes().adopting() {
                if let Some(x) = control.take_xdp() {
                    x.shutdown();
                }
            }
            return Err(e.into());
        }
    }
    // A plane loaded for services that all went to the proxy would keep its programs on
    // interfaces no service uses.
    let services = control.services().all();
    if services.iter().all(|s| !control.on_xdp(s.index())) {
        if let Some(x) = control.take_xdp() {
            x.shutdown();
        }
    }
    // A set pinned by the daemon before: continued where the config has its services, the
    // rest drains; with no eBPF plane at all, its programs would go on forwarding the VIPs on
    // a frozen table.
    let adopted = control.planes().adopting();
    if !control.settle_adoption() {
        if let Some(dir) = &pin_dir {
            crate::dataplane::xdp::pins::remove_unused(dir);
        }
    }
    Ok((control, passive_rx, adopted))
}

/// Every [`FOLLOW_EVERY`] until aborted: the eBPF program attached again to interfaces
/// deleted and made again under their names (`dataplane/xdp/interfaces.rs`), on tokio's
/// blocking pool (attaching waits for the kernel, and for a reload placing a service).
///
/// [`FOLLOW_EVERY`]: crate::dataplane::xdp::interfaces::FOLLOW_EVERY
async fn follow_interfaces(control: Arc<Control>) {
    let mut ticker = tokio::time::interval(crate::dataplane::xdp::interfaces::FOLLOW_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let c = Arc::clone(&control);
        let _ = tokio::task::spawn_blocking(move || {
            // A pool thread started before the daemon lowered its privileges.
            crate::privileges::follow();
            c.planes().follow_interfaces();
        })
        .await;
    }
}

/// The passive connect outcomes the data planes queue for the control plane.
type PassiveQueue = tokio::sync::mpsc::Receiver<crate::service::PassiveEvent>;

/// Serves the admin API and applies passive outcomes and SIGHUP reloads until SIGTERM or
/// SIGINT, or until a thread the daemon cannot run without dies (returned); then stops
/// accepting reloads and the services' control tasks. The data planes are drained by the
/// caller.
async fn serve(
    control: &Arc<Control>,
    passive_rx: PassiveQueue,
    workers: usize,
    signals: &mut Signals,
    handover: Option<(Arc<crate::handover::Inherited>, crate::handover::Taken)>,
    exe: std::io::Result<std::path::PathBuf>,
) -> Result<Stopped, DaemonError> {
    let set = Arc::clone(control.services());
    let passive = tokio::spawn(PassiveFeedback::apply(Arc::clone(&set), passive_rx));
    let trim = tokio::spawn(crate::heap::trim_periodically());
    let follow = tokio::spawn(follow_interfaces(Arc::clone(control)));
    let served = crate::admin::api::serve(
        Arc::clone(control),
        &control.config().admin,
        handover.as_ref().map(|(i, _)| i.as_ref()),
    )
    .await?;
    let api = served.tasks;
    let pending_socket = served.pending;
    // Announced once the services run; withdrawn as they stop being servable.
    let announcer = match &control.config().announce {
        None => None,
        Some(settings) => {
            let announcer = crate::announce::Announcer::new(settings)?;
            // A node the old daemon drained stays drained across an upgrade.
            if handover.as_ref().is_some_and(|(i, _)| i.node_draining()) {
                announcer.keep_node_drained();
            }
            control.set_announcer(Arc::clone(&announcer));
            announcer.sync(control).await;
            let task = tokio::spawn(Arc::clone(&announcer).run(Arc::clone(control)));
            Some((announcer, task))
        }
    };
    // Routes the old daemon announced where this one does not look would be exported for
    // good: they are withdrawn once this one is ready (below), which takes CAP_NET_ADMIN.
    let ours = crate::handover::RouteTableId::of(&control.config());
    let left_behind = handover
        .as_ref()
        .and_then(|(inherited, _)| inherited.announced_in())
        .filter(|old| Some(*old) != ours);
    // An upgrade announcing where the old daemon does not: if it is stopped before READY,
    // its own routes are for it to withdraw (nobody else looks there).
    let own_table = ours.filter(|_| {
        handover
            .as_ref()
            .is_some_and(|(inherited, _)| inherited.announced_in() != ours)
    });
    // Start-up is over: listeners bound, the eBPF plane attached, the API listening.
    let mut keep = crate::privileges::kept_for(&control.config());
    if left_behind.is_some() {
        keep.insert(caps::Capability::CAP_NET_ADMIN);
    }
    if let Err(e) = crate::privileges::lower(&keep) {
        warn!("{e}");
    }
    let upgraded = Arc::new(tokio::sync::Notify::new());
    // Whether this daemon's serving ends in a hand-over or in its own stop: whichever of a
    // new daemon's READY and a stop signal comes first; the other gets its answer from it.
    let succession = crate::handover::Succession::default();
    let admin_listener: AdminListener =
        Arc::new(std::sync::Mutex::new(served.addr.zip(served.socket)));
    let offer = handover_offer(control, Arc::clone(&admin_listener));
    // Told to stop while it started as an upgrade (Ctrl-C on `lb-daemon upgrade`): the old
    // daemon, never told READY, goes on; the sockets and routes this one shares stay its.
    // Told no at READY (the old daemon stops, or handed over to another new daemon) or
    // finding it gone (`old_stopped`): this one withdraws the VIP routes it put back after
    // the old one withdrew them, and leaves the eBPF plane to the old one.
    let mut aborted = None;
    let mut old_stopped = false;
    let mut handover_socket = None;
    if let Some((inherited, taken)) = handover {
        if crate::watchdog::fault("pause-before-ready") {
            info!("LB_FAULT=pause-before-ready: READY in 10 s");
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        aborted = signals.stop_now();
        // A thread this daemon cannot run without died while it started: READY would make
        // the old daemon drain and leave, and this one exits at once; neither would serve.
        if aborted.is_none() && crate::watchdog::dead().is_some() {
            aborted = Some("a thread's death");
        }
        if aborted.is_some() {
            drop(taken);
        } else if let Some(why) = take_the_place(&inherited, taken, left_behind) {
            aborted = Some(why);
            old_stopped = true;
        } else {
            // Only after READY: until then the sockets' paths are the old daemon's.
            if let Some(pending) = pending_socket {
                if let Err(e) = pending.publish() {
                    warn!("admin API: {e}");
                }
            }
            handover_socket = serve_handover(control, &offer, &succession, &upgraded);
        }
    } else {
        // Bound before READY and the `ready` line: a daemon said to be ready can be
        // upgraded at once (`lb-daemon upgrade` right after start found no socket).
        handover_socket = serve_handover(control, &offer, &succession, &upgraded);
        crate::notify::ready();
    }
    if aborted.is_none() {
        info!(
            "ready: {} services, {workers} proxy workers",
            set.all().len()
        );
    }
    let upgrading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // An aborted take-over leaves like a daemon that handed over: the eBPF plane and the
    // sockets stay the old daemon's, and of the VIP routes it withdraws only those it put in
    // a table of its own, or put back after a stopping old daemon withdrew them.
    let mut handed_over = aborted.is_some();
    // The stop signal went to a hand-over decided an instant before it: the drain that
    // follows is not patient with the next SIGTERM (see `drain`).
    let mut stop_taken = false;
    let (why, died, keep_dataplane) = match aborted {
        Some(why) => (format!("{why} before this daemon was ready"), None, true),
        None => loop {
            tokio::select! {
                _ = upgraded.notified() => {
                    handed_over = true;
                    break ("upgrade: the new daemon took over".to_string(), None, true);
                }
                got = signals.next() => match got {
                    // A new daemon was told to go on before this stop (its READY crossed
                    // the signal): it serves now, and this one leaves it everything they
                    // share, or it would empty and detach the eBPF plane that one adopted.
                    // From here on, a READY is answered no.
                    Received::Stop(_) | Received::StopKeepingDataplane
                        if !succession.stop() =>
                    {
                        handed_over = true;
                        stop_taken = true;
                        break ("upgrade: the new daemon took over".to_string(), None, true);
                    }
                    Received::Stop(why) => break (why.to_string(), None, false),
                    Received::StopKeepingDataplane => break ("SIGQUIT".to_string(), None, true),
                    Received::Reload => {
                        info!("SIGHUP: reloading {}", control.path().display());
                        crate::notify::reloading();
                        let _logged = crate::reload::reload(control).await;
                        crate::notify::ready();
                    }
                    Received::Upgrade => upgrade_in_place(
                        control,
                        &exe,
                        &offer,
                        (&succession, &upgraded),
                        &upgrading,
                    ),
                },
                // The kernel's data plane is sound: the daemon started again adopts it.
                death = crate::watchdog::died() => {
                    handed_over = !succession.stop();
                    break (death.to_string(), Some(death), true);
                }
            }
        },
    };
    if !handed_over {
        crate::notify::stopping();
        // Before the withdrawal's wait: `lb-daemon upgrade` must find no hand-over to take
        // from now on (it would adopt an eBPF plane this daemon is about to empty and
        // detach). After a hand-over the path is the new daemon's.
        if let Some(socket) = &handover_socket {
            socket.remove();
        }
    }
    if let Some((announcer, task)) = announcer {
        task.abort();
        if old_stopped {
            announcer.withdraw_added().await;
        } else if aborted.is_some() && own_table.is_some() {
            announcer.withdraw_all().await;
        } else {
            withdraw(control, &announcer, handed_over, keep_dataplane, signals).await;
        }
    }
    info!(
        "{why}: no longer accepting; draining {} open connections and sessions for up to {}",
        control.with_proxy(|p| p.active()).unwrap_or(0),
        humantime::format_duration(control.config().global.drain_timeout)
    );
    for t in api {
        t.abort();
    }
    // The API's listener closes now (its duplicate for an upgrade was the last reference):
    // a client is refused, not queued for a server that no longer accepts.
    (admin_listener.lock())
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    // A reload still at work (its caller may be gone) finishes first, and none starts after:
    // what it places is then stopped with the rest, not left behind.
    control.begin_stop().await;
    for s in set.all().iter() {
        s.stop();
    }
    passive.abort();
    trim.abort();
    follow.abort();
    Ok(Stopped {
        died,
        keep_dataplane,
        handed_over,
        stop_taken,
        aborted,
        old_stopped,
    })
}

/// The new daemon of an upgrade takes the old one's place: closes the sockets it took and no
/// service of its config uses, tells the old one READY, and withdraws the routes the old one
/// left in a table this one does not use (`left_behind`).
///
/// Returns why it cannot take the place (then it must exit, leaving the eBPF plane to the old
/// daemon): the old daemon refused (it stops, or handed over to another new daemon), or is
/// gone. A daemon stopped by SIGTERM empties and detaches its eBPF plane, the one this daemon
/// adopted.
fn take_the_place(
    inherited: &crate::handover::Inherited,
    taken: crate::handover::Taken,
    left_behind: Option<crate::handover::RouteTableId>,
) -> Option<&'static str> {
    let unused = inherited.close_rest();
    if !unused.is_empty() {
        warn!("upgrade: closed {unused:?}, taken over but used by no service of this config");
    }
    // The service manager hears of this daemon from the old one (MAINPID=), which it
    // started: only its main process may tell it anything.
    match taken.ready() {
        Ok(true) => {}
        Ok(false) => {
            warn!(
                "upgrade: the old daemon refused to hand over (it stops, or handed over to \
                 another new daemon)"
            );
            return Some("the old daemon's refusal");
        }
        Err(e) => {
            warn!("upgrade: cannot tell the old daemon that this one is ready: {e}");
            return Some("the old daemon's end");
        }
    }
    if let Some(old) = left_behind {
        tokio::spawn(crate::announce::withdraw_left_behind(
            old.table,
            old.protocol,
        ));
    }
    None
}

/// The VIP routes as the daemon stops serving: a new daemon that took over keeps them as they
/// are (`handed_over`); with the eBPF plane kept (`keep_dataplane`: SIGQUIT, a dead thread)
/// only the VIPs of services the proxy carries are withdrawn; on SIGTERM every VIP is, and
/// the node serves `withdraw_wait` longer while the router moves their flows away (a second
/// SIGTERM or SIGINT ends the wait).
async fn withdraw(
    control: &Control,
    announcer: &crate::announce::Announcer,
    handed_over: bool,
    keep_dataplane: bool,
    signals: &mut Signals,
) {
    if handed_over {
        return;
    }
    if keep_dataplane {
        let services = control.services().all();
        announcer
            .withdraw_unless(|vip| {
                services
                    .iter()
                    .filter(|s| s.snapshot().load().listen.ip() == vip)
                    .all(|s| control.on_xdp(s.index()))
            })
            .await;
        return;
    }
    let withdrawn = announcer.withdraw_all().await;
    let wait = control
        .config()
        .announce
        .map_or(Duration::ZERO, |a| a.withdraw_wait);
    if withdrawn == 0 || wait.is_zero() {
        return;
    }
    info!(
        "announce: {withdrawn} VIP(s) withdrawn; serving for {} more while the router moves \
         their flows to other nodes",
        humantime::format_duration(wait)
    );
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        why = signals.stop() => info!("{why}: the wait after the withdrawal ends early"),
    }
}

/// What the daemon hands over in an upgrade (see `crate::handover`): the proxy's sockets
/// at that moment, the admin API's TCP listener (`admin`: its address and a duplicate), the
/// pin directory's lock (`dataplane::xdp::pin_lock`), and whether `drain-node` holds the
/// node's VIPs back.
type Offer = Arc<dyn Fn() -> crate::handover::Handing + Send + Sync>;

/// The duplicate of the admin API's TCP listener an [`Offer`] hands over, with its address;
/// taken (closed) when the daemon stops serving, so that the listener closes with the API
/// and a client is refused rather than left in its queue.
type AdminListener = Arc<std::sync::Mutex<Option<(std::net::SocketAddr, std::os::fd::OwnedFd)>>>;

/// The [`Offer`] of this daemon.
fn handover_offer(control: &Arc<Control>, admin: AdminListener) -> Offer {
    let offering = Arc::clone(control);
    Arc::new(move || {
        let mut offer = offering.with_proxy(|p| p.offer()).unwrap_or_default();
        let admin = admin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((addr, fd)) = admin.as_ref() {
            match fd.try_clone() {
                Ok(fd) => offer.push((
                    crate::handover::OfferedSocket {
                        listen: *addr,
                        protocol: crate::admin::api::ADMIN_SOCKET.into(),
                        worker: 0,
                    },
                    fd,
                )),
                Err(e) => warn!("upgrade: the admin API's listener cannot be handed over: {e}"),
            }
        }
        // With the sockets, so that the new daemon holds the pin directory from its start.
        if let Some(fd) = crate::dataplane::xdp::pin_lock::for_handover() {
            offer.push((
                crate::handover::OfferedSocket {
                    listen: crate::dataplane::xdp::pin_lock::HANDOVER_ADDR,
                    protocol: crate::dataplane::xdp::pin_lock::HANDOVER_KIND.into(),
                    worker: 0,
                },
                fd,
            ));
        }
        crate::handover::Handing {
            sockets: offer,
            node_draining: offering.announcer().is_some_and(|a| a.node_draining()),
            announced_in: crate::handover::RouteTableId::of(&offering.config()),
            backends: (offering.services().all().iter())
                .flat_map(|s| s.carried())
                .collect(),
            refused: None,
        }
    })
}

/// Why a daemon under a service manager refuses `lb-daemon upgrade`.
const MANAGED: &str = "it runs under a service manager ($NOTIFY_SOCKET is set), outside of \
     which `lb-daemon upgrade` would start the new daemon: the manager would take the service \
     for ended when this daemon exits. Upgrade it in place instead: kill -USR2 <its main pid> \
     (systemd: kill -USR2 $(systemctl show -p MainPID --value lb-daemon))";

/// With `[global] upgrade_socket`, serves the hand-over of an upgrade (`lb-daemon upgrade`)
/// there: `offer` to whoever asks, and `upgraded` notified once the new daemon is ready and
/// `succession` has handed over to it. A socket that cannot be bound is logged: `lb-daemon
/// upgrade` then cannot replace this daemon (SIGUSR2 still can). Under a service manager
/// every `lb-daemon upgrade` is refused, with the reason ([`MANAGED`]).
fn serve_handover(
    control: &Arc<Control>,
    offer: &Offer,
    succession: &crate::handover::Succession,
    upgraded: &Arc<tokio::sync::Notify>,
) -> Option<crate::handover::BoundSocket> {
    let socket = control.config().global.upgrade_socket.clone()?;
    let (offer, upgraded) = (Arc::clone(offer), Arc::clone(upgraded));
    let managed = crate::notify::under_service_manager();
    if managed {
        warn!(
            "upgrade: [global] upgrade_socket is set, but this daemon runs under a service \
             manager: `lb-daemon upgrade` is refused; upgrade in place with SIGUSR2"
        );
    }
    crate::handover::serve_handover(
        &socket,
        move || match managed {
            true => crate::handover::Handing {
                refused: Some(MANAGED.into()),
                ..Default::default()
            },
            false => offer(),
        },
        succession.clone(),
        move || upgraded.notify_one(),
    )
    .inspect_err(|e| {
        warn!(
            "upgrade: no hand-over socket, `lb-daemon upgrade` cannot replace this daemon: \
                 {e}"
        );
    })
    .ok()
}

/// SIGUSR2: the upgrade in place. Starts the binary this daemon was started from (`exe`,
/// read at start) as `upgrade` on the same config, handing it `offer` over a socket pair
/// (`crate::handover::spawn_successor`); once it is ready and `succession` has handed over to
/// it, systemd is told that it is the main process now (`MAINPID=`) and `upgraded` is
/// notified (when systemd cannot be told,
/// this daemon serves on beside the new one, with a warning). One at a time (`upgrading`): a SIGUSR2
/// while one runs is logged and ignored. A successor that fails is logged; this daemon goes
/// on.
fn upgrade_in_place(
    control: &Arc<Control>,
    exe: &std::io::Result<std::path::PathBuf>,
    offer: &Offer,
    (succession, upgraded): (&crate::handover::Succession, &Arc<tokio::sync::Notify>),
    upgrading: &Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let exe = match exe {
        Ok(exe) => exe,
        Err(e) => {
            warn!("SIGUSR2: cannot upgrade in place: this daemon's executable is unknown: {e}");
            return;
        }
    };
    if upgrading.swap(true, Ordering::SeqCst) {
        warn!("SIGUSR2: an upgrade is already under way; this one is ignored");
        return;
    }
    // A SIGUSR2 read in the same turn as the news of a hand-over: a third daemon would adopt
    // the plane the new one uses.
    if !succession.serving() {
        warn!("SIGUSR2: this daemon has handed over to a new daemon; ignored");
        return;
    }
    info!("SIGUSR2: upgrading in place: starting {}", exe.display());
    let (offer, upgraded, done) = (
        Arc::clone(offer),
        Arc::clone(upgraded),
        Arc::clone(upgrading),
    );
    let started = crate::handover::spawn_successor(
        exe,
        control.path(),
        move || offer(),
        succession.clone(),
        move |ready| match ready {
            Some(pid) => {
                // systemd follows the new daemon before this one drains and exits. If it
                // cannot be told, this one's exit would end the service (and systemd would
                // stop the new daemon with it): both serve on, this one as the main process.
                if crate::notify::main_pid(pid) {
                    upgraded.notify_one();
                } else {
                    warn!(
                        "upgrade: systemd could not be told that pid {pid} is the main process: \
                         this daemon goes on beside it; restart the service to end the overlap"
                    );
                }
            }
            None => done.store(false, Ordering::SeqCst),
        },
    );
    if let Err(e) = started {
        warn!("SIGUSR2: cannot start the new daemon: {e}; this one goes on");
        upgrading.store(false, Ordering::SeqCst);
    }
}

/// Why [`serve`] returned.
struct Stopped {
    /// A thread the daemon cannot run without died.
    died: Option<crate::watchdog::Death>,
    /// The eBPF plane stays attached and pinned for the next daemon (SIGQUIT, a dead
    /// thread), instead of draining and detaching.
    keep_dataplane: bool,
    /// A new daemon took the sockets over (`lb-daemon upgrade`, SIGUSR2; also when its READY
    /// crossed a stop signal, `stop_taken`), or this one, an upgrade, did not take the old
    /// one's place (`aborted`): either way the sockets and the eBPF plane it shares are
    /// another daemon's.
    handed_over: bool,
    /// The stop signal came an instant after a new daemon was told to go on, and was taken
    /// by the hand-over: the next SIGTERM cuts the drain.
    stop_taken: bool,
    /// This daemon, an upgrade, did not take the old daemon's place: it was told to stop
    /// before it told the old daemon READY (the signal's name; the old one goes on), or the
    /// old one answered no or was gone (`old_stopped`). This one exits with an error.
    aborted: Option<&'static str>,
    /// The old daemon of this upgrade stops without it (it answered no, or is gone).
    old_stopped: bool,
}

/// The signals the daemon acts on, each a stream that remembers a delivery until it is read.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    quit: Signal,
    usr2: Signal,
}

impl Signals {
    /// Installs the handlers; from then on SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR2 no
    /// longer have their default action (ending the process). Must run inside the runtime (`Runtime::enter`).
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Waits for SIGTERM or SIGINT; returns its name.
    async fn stop(&mut self) -> &'static str {
        Self::stop_of(&mut self.term, &mut self.int).await
    }

    /// SIGTERM, SIGINT or SIGQUIT, if one came and was not read yet; does not wait.
    fn stop_now(&mut self) -> Option<&'static str> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        [
            (&mut self.term, "SIGTERM"),
            (&mut self.int, "SIGINT"),
            (&mut self.quit, "SIGQUIT"),
        ]
        .into_iter()
        .find_map(|(signal, name)| signal.poll_recv(&mut cx).is_ready().then_some(name))
    }

    /// Waits for any of them.
    async fn next(&mut self) -> Received {
        tokio::select! {
            why = Self::stop_of(&mut self.term, &mut self.int) => Received::Stop(why),
            _ = self.hup.recv() => Received::Reload,
            _ = self.quit.recv() => Received::StopKeepingDataplane,
            _ = self.usr2.recv() => Received::Upgrade,
        }
    }

    async fn stop_of(term: &mut Signal, int: &mut Signal) -> &'static str {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
}

/// What a signal asks of the daemon.
enum Received {
    /// SIGTERM or SIGINT (named): drain and exit.
    Stop(&'static str),
    /// SIGHUP: reload the config.
    Reload,
    /// SIGQUIT: drain the proxy and exit, leaving the eBPF data plane attached and pinned
    /// for the daemon started next (a restart that cuts no eBPF flow).
    StopKeepingDataplane,
    /// SIGUSR2: start the binary anew and hand over to it (an upgrade under a service
    /// manager, nginx's USR2).
    Upgrade,
}

/// How a drain ended, for [`run`]'s log.
struct Drained {
    /// Connections and sessions the proxy cut off.
    proxy_cut: u64,
    /// How the eBPF plane's flows fared.
    ebpf: EbpfDrain,
    /// The signal that cut the drain short, if one did.
    early: Option<&'static str>,
}

/// How the eBPF plane's flows fared in a drain.
enum EbpfDrain {
    /// None was left open (or there was no eBPF plane).
    Done,
    /// The drain ended with flows open: the last count, if there was one.
    Left(Option<u64>),
}

/// Drains both planes for up to `timeout`: `proxy` shuts down, letting its connections finish;
/// the flows still open on `xdp` (which [`XdpPlane::stop_new_flows`] already stopped) are
/// counted until none is left. A second SIGTERM or SIGINT cuts both short; after a hand-over
/// (`handed_over`: the upgrade began the drain), a SIGINT or a second SIGTERM does.
///
/// [`XdpPlane::stop_new_flows`]: crate::dataplane::xdp::XdpPlane::stop_new_flows
async fn drain(
    proxy: Option<Proxy>,
    xdp: Option<&crate::dataplane::xdp::XdpPlane>,
    timeout: Duration,
    handed_over: bool,
    signals: &mut Signals,
) -> Drained {
    // After a hand-over the drain began with the upgrade, not a signal: the first SIGTERM is
    // then a stop of the whole service (systemd sends it to every process of the unit, this
    // one too) and must not cut the connections this daemon still carries; a second one does,
    // as does a SIGINT (Ctrl-C at a terminal is meant for this daemon).
    let mut patient = handed_over;
    let cut_short = proxy.as_ref().map(Proxy::drain_cut);
    let mut shutdown = proxy.map(|p| tokio::task::spawn_blocking(move || p.shutdown(timeout)));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut drained = Drained {
        proxy_cut: 0,
        ebpf: if xdp.is_some() {
            EbpfDrain::Left(None)
        } else {
            EbpfDrain::Done
        },
        early: None,
    };
    // The open flows are counted once a second; a look four times as often ends the wait soon
    // after the count reaches zero.
    let mut look = tokio::time::interval(Duration::from_millis(250));
    let mut ebpf_waiting = xdp.is_some();
    while shutdown.is_some() || ebpf_waiting {
        tokio::select! {
            done = async {
                match shutdown.as_mut() {
                    Some(handle) => handle.await,
                    None => std::future::pending().await,
                }
            } => {
                shutdown = None;
                drained.proxy_cut = done.unwrap_or_else(|e| {
                    error!("the proxy's shutdown failed: {e}");
                    0
                });
            }
            _ = look.tick(), if ebpf_waiting => {
                let left = xdp.and_then(|x| x.open_flows_left());
                if left == Some(0) {
                    drained.ebpf = EbpfDrain::Done;
                    ebpf_waiting = false;
                } else {
                    if let EbpfDrain::Left(last) = &mut drained.ebpf {
                        *last = left.or(*last);
                    }
                    ebpf_waiting = tokio::time::Instant::now() < deadline;
                }
            }
            why = signals.stop(), if drained.early.is_none() => {
                if why == "SIGTERM" && std::mem::take(&mut patient) {
                    info!(
                        "{why} during the drain that follows an upgrade: the drain goes on \
                         (a second {why}, or a SIGINT, cuts it short)"
                    );
                    continue;
                }
                info!("{why} during the drain: closing what is still open");
                if let Some(c) = &cut_short {
                    c.now();
                }
                drained.early = Some(why);
                ebpf_waiting = false;
            }
        }
    }
    drained
}

/// The environment variable that picks the proxy's splice mode: `syscall` (the default) or
/// `uring`. Meant for benchmarks comparing the two (`cargo xtask bench`), not a tuning knob.
pub const SPLICE_ENV: &str = "LB_PROXY_SPLICE";

/// [`ProxyOptions`] with the splice mode `LB_PROXY_SPLICE` asks for (defaults when unset).
///
/// Returns `Err(DaemonError::Dataplane)` for a value other than `uring` or `syscall`, so a typo
/// never silently benchmarks the wrong mode.
fn proxy_options_from_env() -> Result<ProxyOptions, DaemonError> {
    let splice = match std::env::var(SPLICE_ENV).as_deref() {
        Err(_) => SpliceMode::default(),
        Ok("uring") => SpliceMode::Uring,
        Ok("syscall") => SpliceMode::Syscall,
        Ok(other) => {
            return Err(DaemonError::Dataplane(format!(
                "{SPLICE_ENV}={other:?}: expected \"uring\" or \"syscall\""
            )))
        }
    };
    if splice != SpliceMode::default() {
        info!("{SPLICE_ENV}: relaying with {splice:?} splice");
    }
    Ok(ProxyOptions {
        splice,
        ..ProxyOptions::default()
    })
}

/// Raises the soft limit on open files to the hard limit: every proxied TCP connection holds
/// six descriptors (two sockets, two pipes) and every UDP session one, so the usual soft limit
/// of 1024 would cap the proxy at about 170 connections.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!("open file limit raised from {soft} to {hard}"),
            Err(e) => warn!(
                "open file limit stays at {soft} ({e}): about {} TCP connections at most",
                soft / 6
            ),
        },
        Ok((soft, _)) => info!("open file limit is {soft}"),
        Err(e) => warn!("cannot read the open file limit: {e}"),
    }
}
