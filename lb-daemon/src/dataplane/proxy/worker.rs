//! A worker thread: its ring's event loop, the periodic sweep, the commands that add and
//! remove services, and the drain.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ctx::Ctx;
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
    /// dropped once this worker's listener for it is closed. `keep_listener`: the listening
    /// socket lives on for another service (the handle holds it), so a connection accepted
    /// as the listener closes is carried, not reset.
    Remove {
        index: usize,
        until: Instant,
        closed: Sender<()>,
        keep_listener: bool,
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
    /// This worker's part of the open file limit (the limit over the number of workers),
    /// which bounds its pool of pipes.
    pub(super) fd_share: u64,
    /// Told whether the worker's ring is enabled (then it runs) or why not (then it exits).
    pub(super) ready: std::sync::mpsc::Sender<std::io::Result<()>>,
}

/// After the drain deadline, how long cancelled operations may take to complete before the
/// worker exits anyway.
const AFTER_DEADLINE: Duration = Duration::from_secs(5);
/// Consecutive `io_uring_enter` failures after which the worker gives up.
const MAX_ENTER_FAILURES: u32 = 100;

/// The longest a worker's sweep waits while one of its listeners drops SYNs (see `tcp`):
/// once the sweep runs at this pace, a listener takes SYNs again within this of a backend
/// being back, usually before the announcer (which looks every 200 ms) announces the VIP
/// again. The sweep that follows the filter going on may still come up to a second later.
const SYN_GATE_PERIOD: Duration = Duration::from_millis(100);

/// The sweep period: an eighth of the shortest idle timeout, within 10 ms..1 s. A flow is
/// closed one period late at most (~12%, or 1 s for long timeouts) while its slab holds
/// 4,096 slots or fewer, else within as many periods as it takes to reach it (at most
/// eight: `Slab::sweep_budget`).
fn sweep_period<'a>(services: impl Iterator<Item = &'a ServiceInfo>) -> Duration {
    services
        .map(|s| s.idle_timeout / 8)
        .min()
        .unwrap_or(Duration::from_secs(1))
        .clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Runs a worker until its drain is over; returns how many flows it cut off.
pub(super) fn run(setup: Setup) -> u64 {
    let Some(mut worker) = Worker::start(setup) else {
        return 0;
    };
    worker.run_loop();
    worker.stop()
}

/// A running worker: its two halves, what they share, and where its drain stands.
struct Worker {
    id: usize,
    wake: Arc<OwnedFd>,
    commands: Receiver<Command>,
    ctx: Ctx,
    tcp: Tcp,
    udp: Udp,
    /// The sweep period; a service added with a shorter idle timeout shortens it.
    period: Duration,
    /// The shutdown drain's deadline, once shutdown began.
    deadline: Option<Instant>,
    /// When the flows left at the deadline were cut off.
    cut_at: Option<Instant>,
    /// Flows cut off so far.
    cut: u64,
}

impl Worker {
    /// Enables the ring and tells `start` how that went (`None` when it failed: the worker
    /// exits), then arms the listeners, VIP sockets, the wake-up poll and the sweep timer.
    fn start(setup: Setup) -> Option<Worker> {
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
            fd_share,
            ready,
        } = setup;
        // Before the ring is enabled: the kernel's io-wq threads it starts later are forked
        // from this thread and take its nice value.
        if let Some(nice) = options.worker_priority {
            if let Err(e) = crate::priority::set_this_thread(nice) {
                tracing::warn!("lb-proxy-{id}: {e}; it runs at the daemon's priority");
            }
        }
        let period = sweep_period(tcp.iter().chain(udp.iter()).map(|(s, _)| s));
        let mut ctx = Ctx {
            ring,
            events,
            shared,
            options,
            now: Instant::now(),
            draining: false,
            connect_log: Default::default(),
        };
        let io_workers = std::thread::available_parallelism().map_or(2, |n| n.get() as u32 * 2);
        if let Err(e) = ctx.ring.enable(io_workers) {
            let _ = ready.send(Err(e));
            return None;
        }
        let _ = ready.send(Ok(()));
        // Hang up, so that `start` notices a worker that died before reporting.
        drop(ready);
        let mut worker = Worker {
            id,
            wake,
            commands,
            ctx,
            tcp: Tcp::new(tcp, fd_share),
            udp: Udp::new(udp),
            period,
            deadline: None,
            cut_at: None,
            cut: 0,
        };
        worker.tcp.start(&mut worker.ctx);
        worker.udp.start(&mut worker.ctx);
        worker.arm_wake();
        worker.ctx.ring.timeout(period, Token::of(Kind::Sweep));
        Some(worker)
    }

    /// Waits for the eventfd that [`super::Proxy`] signals with each command.
    fn arm_wake(&mut self) {
        self.ctx.ring.poll(
            self.wake.as_raw_fd(),
            libc::POLLIN as u32,
            false,
            Token::of(Kind::Wake),
        );
    }

    /// Takes completions batch by batch until the ring breaks or the drain is over.
    fn run_loop(&mut self) {
        let id = self.id;
        let mut completions: Vec<Completion> = Vec::with_capacity(4096);
        let mut enter_failures = 0;
        loop {
            crate::privileges::follow();
            completions.clear();
            if let Err(e) = self.ctx.ring.wait(&mut completions) {
                enter_failures += 1;
                tracing::error!("proxy worker {id}: io_uring_enter failed: {e}");
                if enter_failures >= MAX_ENTER_FAILURES {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            enter_failures = 0;
            self.ctx.now = Instant::now();
            for c in completions.drain(..) {
                self.dispatch(c);
            }
            if self.ctx.ring.is_broken() {
                break;
            }
            if self.ctx.draining && self.drain_over() {
                break;
            }
        }
        if !self.ctx.draining {
            let why = if self.ctx.ring.is_broken() {
                "its io_uring broke"
            } else {
                "io_uring_enter kept failing"
            };
            crate::watchdog::report(&format!("lb-proxy-{id}"), format!("gave up: {why}"));
        }
    }

    /// Hands one completion to whoever it belongs to.
    fn dispatch(&mut self, c: Completion) {
        let ctx = &mut self.ctx;
        match c.token.kind {
            Kind::Ignore => {}
            // The shutdown drain's deadline is checked after the batch; this one may also be
            // a removed service's.
            Kind::Deadline => self.cut_removed(),
            Kind::Wake => self.on_wake(),
            Kind::Sweep => {
                if self.id == 0 && crate::watchdog::fault("panic-proxy-worker") {
                    panic!("injected by LB_FAULT=panic-proxy-worker");
                }
                self.tcp.sweep(ctx);
                self.udp.sweep(ctx);
                let period = if self.tcp.dropping_syns() {
                    self.period.min(SYN_GATE_PERIOD)
                } else {
                    self.period
                };
                ctx.ring.timeout(period, Token::of(Kind::Sweep));
            }
            Kind::Accept => self.tcp.on_accept(ctx, c),
            Kind::Conn => self.tcp.on_conn(ctx, c),
            Kind::Vip => self.udp.on_vip(ctx, c),
            Kind::Session => self.udp.on_session(ctx, c),
        }
    }

    /// Cuts off the flows of removed services whose drain deadline has passed.
    fn cut_removed(&mut self) {
        let n = self.tcp.cut_removed(&mut self.ctx) + self.udp.cut_removed(&mut self.ctx);
        if n > 0 {
            tracing::info!(
                "proxy worker {}: cut off {n} flow(s) of removed services at their drain \
                 deadline",
                self.id
            );
        }
    }

    /// The eventfd was signalled: applies the queued commands and notices a shutdown.
    fn on_wake(&mut self) {
        sys::eventfd_clear(self.wake.as_fd());
        while let Ok(command) = self.commands.try_recv() {
            self.apply(command);
        }
        // Commands keep coming during a drain (a removal must not wait forever).
        self.arm_wake();
        self.notice_shutdown();
    }

    fn apply(&mut self, command: Command) {
        let ctx = &mut self.ctx;
        match command {
            Command::Add { info, fd, done } => {
                if ctx.draining {
                    let _ = done.send(false);
                    return;
                }
                self.period = self.period.min(sweep_period(std::iter::once(&info)));
                match info.protocol {
                    Protocol::Tcp => self.tcp.add(ctx, info, fd),
                    Protocol::Udp => self.udp.add(ctx, info, fd),
                }
                let _ = done.send(true);
            }
            Command::Remove {
                index,
                until,
                closed,
                keep_listener,
            } => {
                self.tcp.remove(ctx, index, until, &closed, keep_listener);
                self.udp.remove(ctx, index, until);
                if until > ctx.now {
                    ctx.ring.timeout(until - ctx.now, Token::of(Kind::Deadline));
                } else {
                    self.tcp.cut_removed(ctx);
                    self.udp.cut_removed(ctx);
                }
            }
        }
    }

    /// Starts the drain when [`super::Proxy::shutdown`] set a deadline, or moves the
    /// deadline earlier when it was cut short.
    fn notice_shutdown(&mut self) {
        let ctx = &mut self.ctx;
        match ctx.shared.deadline() {
            Some(at) if !ctx.draining => {
                self.deadline = Some(at);
                ctx.draining = true;
                tracing::debug!(
                    "proxy worker {}: draining {} connection(s), {} session(s)",
                    self.id,
                    self.tcp.open(),
                    self.udp.open()
                );
                self.tcp.stop_accepting(ctx);
                self.udp.stop_accepting(ctx);
                if at > ctx.now {
                    ctx.ring.timeout(at - ctx.now, Token::of(Kind::Deadline));
                }
            }
            // Cut short (a second SIGTERM): the check after the batch cuts at once, or this
            // timeout wakes us for an earlier deadline that is not yet due.
            Some(at) if self.deadline.is_some_and(|d| at < d) => {
                self.deadline = Some(at);
                if at > ctx.now {
                    ctx.ring.timeout(at - ctx.now, Token::of(Kind::Deadline));
                }
            }
            Some(_) | None => {}
        }
    }

    /// While draining, after each batch: cuts off what is left once the deadline passed,
    /// closes idle VIP sockets, and tells whether the worker may exit (nothing left, or
    /// operations still in flight [`AFTER_DEADLINE`] after the cut).
    fn drain_over(&mut self) -> bool {
        let ctx = &mut self.ctx;
        if self.deadline.is_some_and(|at| ctx.now >= at) && self.cut_at.is_none() {
            self.cut_at = Some(ctx.now);
            self.cut += self.tcp.cut_off(ctx) + self.udp.cut_off(ctx);
        }
        self.udp.close_vips_when_idle(ctx);
        if self.tcp.is_done() && self.udp.is_done() {
            return true;
        }
        if self.cut_at.is_some_and(|at| ctx.now >= at + AFTER_DEADLINE) {
            tracing::error!(
                "proxy worker {}: operations still in flight {AFTER_DEADLINE:?} after the \
                 drain deadline; exiting anyway",
                self.id
            );
            return true;
        }
        false
    }

    /// Closes whatever is left and returns how many flows were cut off in all.
    fn stop(mut self) -> u64 {
        // Normally empty; after a ring failure or a stuck drain, whatever is left is cut off.
        self.cut += self.tcp.abandon(&mut self.ctx) + self.udp.abandon(&mut self.ctx);
        tracing::debug!(
            "proxy worker {}: stopped, {} flow(s) cut off",
            self.id,
            self.cut
        );
        self.cut
    }
}
