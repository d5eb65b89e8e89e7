//! A worker thread: its ring's event loop, the periodic sweep, the commands that add and
//! remove services, and the drain.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ring::{Completion, Kind, Ring, Token};
use super::tcp::Tcp;
use super::udp::Udp;
use super::{sys, ProxyOptions, ServiceInfo, Shared};
use crate::config::Protocol;
use crate::dataplane::FlowEvents;

/// What the [`super::Proxy`] handle asks of a running worker; sent through the worker's
/// channel, then its eventfd is signalled.
pub(super) enum Command {
    /// Carry a new service on `fd`, this worker's bound listener or VIP socket. `done` gets
    /// `true` once it is armed, `false` if the worker is draining (then `fd` is closed).
    Add {
        info: ServiceInfo,
        fd: OwnedFd,
        done: Sender<bool>,
    },
    /// Stop taking new flows for service `index` and cut its flows at `until`. `closed` is
    /// dropped once this worker's listener for it is closed.
    Remove {
        index: usize,
        until: Instant,
        closed: Sender<()>,
    },
}

/// Everything a worker thread starts with.
pub(super) struct Setup {
    pub(super) id: usize,
    pub(super) ring: Ring,
    pub(super) wake: Arc<OwnedFd>,
    pub(super) commands: Receiver<Command>,
    pub(super) tcp: Vec<(ServiceInfo, OwnedFd)>,
    pub(super) udp: Vec<(ServiceInfo, OwnedFd)>,
    pub(super) events: Arc<dyn FlowEvents>,
    pub(super) shared: Arc<Shared>,
    pub(super) options: ProxyOptions,
    /// Told whether the worker's ring is enabled (then it runs) or why not (then it exits).
    pub(super) ready: std::sync::mpsc::Sender<std::io::Result<()>>,
}

/// What the TCP and UDP halves of a worker share.
pub(super) struct Ctx {
    pub(super) ring: Ring,
    pub(super) events: Arc<dyn FlowEvents>,
    pub(super) shared: Arc<Shared>,
    pub(super) options: ProxyOptions,
    /// The time the current batch of completions was taken, for idle bookkeeping.
    pub(super) now: Instant,
    /// Set once shutdown began: no new connections or sessions.
    pub(super) draining: bool,
}

/// After the drain deadline, how long cancelled operations may take to complete before the
/// worker exits anyway.
const AFTER_DEADLINE: Duration = Duration::from_secs(5);
/// Consecutive `io_uring_enter` failures after which the worker gives up.
const MAX_ENTER_FAILURES: u32 = 100;

/// The sweep period: an eighth of the shortest idle timeout, within 10 ms..1 s, so a flow is
/// closed at most ~12% late (or 1 s for long timeouts).
fn sweep_period<'a>(services: impl Iterator<Item = &'a ServiceInfo>) -> Duration {
    services
        .map(|s| s.idle_timeout / 8)
        .min()
        .unwrap_or(Duration::from_secs(1))
        .clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Runs a worker until its drain is over; returns how many flows it cut off.
pub(super) fn run(setup: Setup) -> u64 {
    let Setup {
        id,
        ring,
        wake,
        commands,
        tcp,
        udp,
        events,
        shared,
        options,
        ready,
    } = setup;
    let mut period = sweep_period(tcp.iter().chain(udp.iter()).map(|(s, _)| s));
    let mut ctx = Ctx {
        ring,
        events,
        shared,
        options,
        now: Instant::now(),
        draining: false,
    };
    let io_workers = std::thread::available_parallelism().map_or(2, |n| n.get() as u32 * 2);
    if let Err(e) = ctx.ring.enable(io_workers) {
        let _ = ready.send(Err(e));
        return 0;
    }
    let _ = ready.send(Ok(()));
    // Hang up, so that `start` notices a worker that died before reporting.
    drop(ready);
    let mut tcp = Tcp::new(tcp);
    let mut udp = Udp::new(udp);
    tcp.start(&mut ctx);
    udp.start(&mut ctx);
    ctx.ring.poll(
        wake.as_raw_fd(),
        libc::POLLIN as u32,
        false,
        Token::of(Kind::Wake),
    );
    ctx.ring.timeout(period, Token::of(Kind::Sweep));

    let mut completions: Vec<Completion> = Vec::with_capacity(4096);
    let mut enter_failures = 0;
    let mut deadline: Option<Instant> = None;
    let mut cut_at: Option<Instant> = None;
    let mut cut = 0;
    loop {
        completions.clear();
        if let Err(e) = ctx.ring.wait(&mut completions) {
            enter_failures += 1;
            tracing::error!("proxy worker {id}: io_uring_enter failed: {e}");
            if enter_failures >= MAX_ENTER_FAILURES {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        enter_failures = 0;
        ctx.now = Instant::now();
        for c in completions.drain(..) {
            match c.token.kind {
                Kind::Ignore => {}
                Kind::Deadline => {
                    // The shutdown drain's deadline is checked below; this one may also be a
                    // removed service's.
                    let n = tcp.cut_removed(&mut ctx) + udp.cut_removed(&mut ctx);
                    if n > 0 {
                        tracing::info!(
                            "proxy worker {id}: cut off {n} flow(s) of removed services at \
                             their drain deadline"
                        );
                    }
                }
                Kind::Wake => {
                    sys::eventfd_clear(wake.as_fd());
                    while let Ok(command) = commands.try_recv() {
                        match command {
                            Command::Add { info, fd, done } => {
                                if ctx.draining {
                                    let _ = done.send(false);
                                    continue;
                                }
                                period = period.min(sweep_period(std::iter::once(&info)));
                                match info.protocol {
                                    Protocol::Tcp => tcp.add(&mut ctx, info, fd),
                                    Protocol::Udp => udp.add(&mut ctx, info, fd),
                                }
                                let _ = done.send(true);
                            }
                            Command::Remove {
                                index,
                                until,
                                closed,
                            } => {
                                tcp.remove(&mut ctx, index, until, &closed);
                                udp.remove(&mut ctx, index, until);
                                if until > ctx.now {
                                    ctx.ring.timeout(until - ctx.now, Token::of(Kind::Deadline));
                                } else {
                                    tcp.cut_removed(&mut ctx);
                                    udp.cut_removed(&mut ctx);
                                }
                            }
                        }
                    }
                    // Commands keep coming during a drain (a removal must not wait forever).
                    ctx.ring.poll(
                        wake.as_raw_fd(),
                        libc::POLLIN as u32,
                        false,
                        Token::of(Kind::Wake),
                    );
                    match ctx.shared.deadline() {
                        Some(at) if !ctx.draining => {
                            deadline = Some(at);
                            ctx.draining = true;
                            tracing::debug!(
                                "proxy worker {id}: draining {} connection(s), {} session(s)",
                                tcp.open(),
                                udp.open()
                            );
                            tcp.stop_accepting(&mut ctx);
                            udp.stop_accepting(&mut ctx);
                            if at > ctx.now {
                                ctx.ring.timeout(at - ctx.now, Token::of(Kind::Deadline));
                            }
                        }
                        // Cut short (a second SIGTERM): the check below cuts at once, or
                        // this timeout wakes us for an earlier deadline that is not yet due.
                        Some(at) if deadline.is_some_and(|d| at < d) => {
                            deadline = Some(at);
                            if at > ctx.now {
                                ctx.ring.timeout(at - ctx.now, Token::of(Kind::Deadline));
                            }
                        }
                        Some(_) | None => {}
                    }
                }
                Kind::Sweep => {
                    tcp.sweep(&mut ctx);
                    udp.sweep(&mut ctx);
                    ctx.ring.timeout(period, Token::of(Kind::Sweep));
                }
                Kind::Accept => tcp.on_accept(&mut ctx, c),
                Kind::Conn => tcp.on_conn(&mut ctx, c),
                Kind::Vip => udp.on_vip(&mut ctx, c),
                Kind::Session => udp.on_session(&mut ctx, c),
            }
        }
        if ctx.ring.is_broken() {
            break;
        }
        if !ctx.draining {
            continue;
        }
        if let Some(at) = deadline {
            if ctx.now >= at && cut_at.is_none() {
                cut_at = Some(ctx.now);
                cut += tcp.cut_off(&mut ctx) + udp.cut_off(&mut ctx);
            }
        }
        udp.close_vips_when_idle(&mut ctx);
        if tcp.is_done() && udp.is_done() {
            break;
        }
        if cut_at.is_some_and(|at| ctx.now >= at + AFTER_DEADLINE) {
            tracing::error!(
                "proxy worker {id}: operations still in flight {AFTER_DEADLINE:?} after the \
                 drain deadline; exiting anyway"
            );
            break;
        }
    }
    // Normally empty; after a ring failure or a stuck drain, whatever is left is cut off.
    cut += tcp.abandon(&mut ctx) + udp.abandon(&mut ctx);
    tracing::debug!("proxy worker {id}: stopped, {cut} flow(s) cut off");
    cut
}
