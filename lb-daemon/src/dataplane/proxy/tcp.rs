//! TCP: a worker's connections, from accept to close: the admission, connect-and-retry and
//! relay of each. The listeners are in [`super::listener`], the relay's I/O in
//! [`super::relay_io`].
//!
//! A connection's life: accepted (multishot accept) → connecting (io_uring connect linked
//! with a timeout; on failure the next backend, up to `retries` more) → relaying (two
//! [`Direction`]s, each `socket → pipe → socket`) → closing (cancel whatever is in flight,
//! wait for every completion) → closed (file descriptors closed, slot freed).
//!
//! Invariant: a connection's sockets and pipes are closed, and its slot freed, only once no
//! operation of it is in flight (`in_flight == 0`), so the kernel never holds a file of a
//! closed connection and no completion can land on a reused slot.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use socket2::{Domain, SockRef, Socket, Type};

use super::access::{self, End};
use super::admission::admit_or_refuse;
use super::ctx::Ctx;
use super::flush::{Flushing, Progress};
use super::limits::Admission;
use super::listener::Listeners;
use super::proxy_header::{self, Transport};
use super::relay::{Direction, Outcome, Step};
use super::relay_io::{
    count_delivered, is_fd_shortage, start_step, Next, PipePool, Relaying, TO_BACKEND, TO_CLIENT,
};
use super::ring::{Completion, Kind, Token};
use super::slab::Slab;
use super::sys::{self, Pipe};
use super::{LogLimit, ServiceInfo, Shared};
use crate::config::{Protocol, ProxyProtocol};
use crate::snapshot::{flow_key, BackendId, BackendStats, ServiceSnapshot};

/// Operation numbers within a connection (the `op` of its tokens, a bit in `in_flight`).
const OP_CONNECT: u8 = 0;
const OP_TIMER: u8 = 1;
/// `OP_RELAY + way`: the one operation in flight for a direction.
const OP_RELAY: u8 = 2;

/// Connections examined per sweep tick at least (more in a slab past eight times this, see
/// `Slab::sweep_budget`), so a sweep's cost is bounded.
const SWEEP_BUDGET: u32 = 4096;
/// With `splice(2)`, steps one direction may take in a row before yielding to others.
const SYSCALL_STEPS: u32 = 16;

fn bit(op: u8) -> u8 {
    1 << op
}

struct Connecting {
    /// The snapshot the latest pick used (a retry loads the current one, so a backend marked
    /// DOWN meanwhile is not tried).
    snapshot: Arc<ServiceSnapshot>,
    /// Backends this connection failed to reach, by address (ids are per snapshot).
    tried: Vec<SocketAddr>,
    /// The attempt in flight.
    attempt: Option<Attempt>,
    /// The connect's result once its completion arrived.
    result: Option<i32>,
    /// The linked timeout fired.
    timed_out: bool,
}

/// One connect attempt in flight. It counts in its backend's `active` from the pick on, so
/// `least_conn` and `random_two` see a backend whose connects hang as busy, not idle (what
/// HAProxy counts as "served"); the count is released if the attempt fails.
struct Attempt {
    addr: SocketAddr,
    stats: Arc<BackendStats>,
    socket: OwnedFd,
}

enum Phase {
    Connecting(Connecting),
    Relaying(Relaying),
}

struct Conn {
    /// Index into [`Tcp::services`].
    service: usize,
    client: OwnedFd,
    client_addr: SocketAddr,
    phase: Phase,
    /// Bit `op` set while operation `op` is in flight.
    in_flight: u8,
    /// Why it is closing. A graceful end ([`End::graceful`]) closes with a FIN; any other
    /// with `SO_LINGER` 0, so peers get a reset: after a peer's reset ([`End::Reset`]), once
    /// the other peer's socket has its send queue acknowledged ([`super::flush`]).
    closing: Option<End>,
    last_active: Instant,
    /// When it was accepted.
    started: Instant,
    /// Whether its service logged access when it was accepted.
    access_log: bool,
    /// Its place in the service's per-client limits, given back when it closes.
    admission: Admission,
}

/// A worker's TCP services, listeners and connections.
pub(super) struct Tcp {
    services: Vec<ServiceInfo>,
    listeners: Listeners,
    conns: Slab<Conn>,
    pipes: PipePool,
    sweep_cursor: u32,
    /// Sockets of connections a peer reset, waiting for their send queues (see
    /// [`super::flush`]).
    flushing: Flushing,
    /// Per service: "no backend" warnings.
    no_backend_log: Vec<LogLimit>,
    /// Per service: access log lines of connections refused by the limits, one a second at
    /// most (a client over its limit is often a flood).
    refused_access_log: Vec<LogLimit>,
    /// Local resource shortages (sockets, pipes, accept).
    resource_log: LogLimit,
    /// The connections one accept completion gave, kept empty between completions (its
    /// allocation is reused).
    accepted_now: Vec<(usize, OwnedFd)>,
}

/// Whether service `info`'s listener is to drop the SYNs that reach it rather than accept
/// connections it can only refuse: the node announces its VIPs (`[announce]`), the service is
/// not removed, and no backend is eligible (after a hand-over in an upgrade, `Tcp::gate_syns`
/// asks nothing: the listener is the new daemon's). Such a node withdraws the VIP
/// (`announce`), and until the router has moved the traffic, a refused connection fails its
/// client where a dropped SYN is sent again: to another node once the route is gone, or to
/// this one once a backend is back.
/// The eBPF plane does the same (`SERVICE_F_ANNOUNCED`). A node that does not announce
/// refuses at once: no other node could take the SYN; nor does a service on a wildcard
/// address, which is never announced.
///
/// While an upgrade hands the listeners over, both daemons hold them and each sets the
/// filter as its own services say: they agree unless one of them has no backend, and the
/// old one stops changing it once the sockets are handed over.
fn syns_unwelcome(ctx: &Ctx, info: &ServiceInfo) -> bool {
    ctx.shared.announced.load(Ordering::Relaxed)
        && !info.listen.ip().is_unspecified()
        && !info.removed()
        && info.snapshot.load().scheduler.is_none()
}

/// A non-blocking TCP socket for a connect to `addr`, with `TCP_NODELAY` (the proxy
/// forwards what it gets at once; batching is the endpoints' business) and `SO_OOBINLINE`
/// (urgent data stays in the stream, see [`super::relay`]).
fn backend_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_nodelay(true)?;
    socket.set_out_of_band_inline(true)?;
    Ok(socket.into())
}

/// The PROXY protocol header a new connection's backend gets, if its service sends one:
/// the client's address and the local address it connected to: `listen` (the VIP, as
/// bound), or with a wildcard listener the address the client actually reached, which only
/// the accepted socket knows (one `getsockname`).
fn proxy_header_for(
    snapshot: &ServiceSnapshot,
    listen: SocketAddr,
    client: &OwnedFd,
    client_addr: SocketAddr,
) -> io::Result<Option<Vec<u8>>> {
    if snapshot.proxy_protocol == ProxyProtocol::Off {
        return Ok(None);
    }
    let vip = if listen.ip().is_unspecified() {
        SockRef::from(client)
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("the client socket has no IP address"))?
    } else {
        listen
    };
    Ok(proxy_header::header(
        snapshot.proxy_protocol,
        client_addr,
        vip,
        Transport::Stream,
    ))
}

/// How the sweep ends `conn` of `service` at `now`, if it does: [`End::Reset`] when the
/// peer of a socket nothing watches is gone (see [`Tcp::sweep`]), [`End::Stalled`] when the
/// gone peer's last bytes wait on a destination that acknowledged nothing for
/// [`super::flush::STALL`], or after `idle_timeout` without traffic with bytes in a pipe,
/// [`End::Idle`] after it without. Connections still connecting or already closing are
/// left alone.
fn sweep_verdict(conn: &Conn, service: &ServiceInfo, now: Instant) -> Option<End> {
    let Phase::Relaying(r) = &conn.phase else {
        return None;
    };
    if conn.closing.is_some() {
        return None;
    }
    // A socket is watched while the direction from it reads it, or while the direction to
    // it writes to it (a poll for room, a splice: either reports an error or hang-up). One
    // the relay sent its FIN to shows a hang-up at the peer's own FIN too, a clean close:
    // there only an error (a reset) tells that the peer is gone.
    //
    // A direction that still delivers what it read from a gone peer is let be while its
    // destination acknowledges bytes: it reads the socket again once done and meets the
    // reset there, after the gone peer's last bytes, as a direct connection would show them.
    // A destination that acknowledged nothing for `STALL`, and to which nothing is being
    // resent after a timeout (a lossy path), does not read: waiting would only hold both
    // sides until the idle timeout.
    let sockets = [
        (
            conn.client.as_fd(),
            r.backend.as_fd(),
            TO_BACKEND,
            TO_CLIENT,
        ),
        (
            r.backend.as_fd(),
            conn.client.as_fd(),
            TO_CLIENT,
            TO_BACKEND,
        ),
    ];
    for (fd, destination, from, to) in sockets {
        let (from_way, to_way) = (&r.ways[from], &r.ways[to]);
        if from_way.reading() || to_way.writing() || !sys::peer_gone(fd, to_way.finished()) {
            continue;
        }
        if !from_way.writing() {
            tracing::debug!(
                "service {}: a peer of the connection from {} is gone while nothing reads it; \
                 closing it",
                service.name,
                conn.client_addr
            );
            return Some(End::Reset);
        }
        // Acknowledged by the destination: delivered less what its socket still holds. (Less
        // the PROXY protocol header too, towards a backend: a constant once it is out.)
        let acked = r.bytes[from] as i64 - i64::from(sys::unacknowledged(destination));
        let mut progress = match r.last_bytes_of_gone_peer.get() {
            Some((way, progress)) if way == from => progress,
            _ => Progress::new(acked, now),
        };
        let stalled = progress.stalled(acked, now) && !sys::retransmitting(destination);
        r.last_bytes_of_gone_peer.set(Some((from, progress)));
        if stalled {
            tracing::debug!(
                "service {}: a peer of the connection from {} is gone and the other takes \
                 none of its last bytes; closing it",
                service.name,
                conn.client_addr
            );
            return Some(End::Stalled);
        }
    }
    let limit = service.idle_timeout;
    if now.saturating_duration_since(conn.last_active) < limit {
        return None;
    }
    // Idle with bytes still in a pipe means a peer stopped reading: a FIN would pass the cut
    // stream off as complete, so both peers get a reset instead.
    let how = if r.ways.iter().any(|w| w.buffered() > 0) {
        End::Stalled
    } else {
        End::Idle
    };
    tracing::debug!(
        "service {}: closing connection from {} idle for {limit:?} ({how:?})",
        service.name,
        conn.client_addr
    );
    Some(how)
}

/// Closes `socket` of a connection that ended with `end`: with a FIN when the end is
/// graceful, else with a reset; after a peer's reset ([`End::Reset`]), once the socket's peer
/// has what the proxy wrote to it ([`Flushing`]).
fn close_socket(flushing: &mut Flushing, socket: OwnedFd, end: End, now: Instant) {
    if end.graceful() {
        drop(socket);
    } else if end == End::Reset {
        flushing.reset_after_queue(socket, now);
    } else {
        sys::set_reset_on_close(&socket);
        drop(socket);
    }
}

/// Records a failed connect attempt of connection `a` to `service` (`result`: the
/// connect's -errno): releases the attempt's count, reports the failure against the backend
/// unless it was a local shortage, and adds the backend to those tried.
fn connect_failed(
    ctx: &Ctx,
    service: &ServiceInfo,
    a: &mut Connecting,
    attempt: Attempt,
    result: i32,
    shortage_log: &mut LogLimit,
) {
    let Attempt {
        addr,
        stats,
        socket,
    } = attempt;
    let err = if a.timed_out {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {:?}", service.connect_timeout),
        )
    } else {
        io::Error::from_raw_os_error(-result)
    };
    stats.closed();
    ctx.connect_failed(
        service,
        addr,
        &stats,
        &err,
        a.snapshot.generation,
        shortage_log,
    );
    drop(socket);
    a.tried.push(addr);
}

impl Tcp {
    /// A TCP half for `listeners` (service, bound listening socket), whose pipe pool is
    /// bounded by `fd_share` descriptors (this worker's part of the open file limit).
    pub(super) fn new(listeners: Vec<(ServiceInfo, OwnedFd)>, fd_share: u64) -> Tcp {
        let mut tcp = Tcp {
            services: Vec::with_capacity(listeners.len()),
            listeners: Listeners::new(),
            conns: Slab::new(),
            pipes: PipePool::new(fd_share),
            sweep_cursor: 0,
            flushing: Flushing::new(fd_share),
            no_backend_log: vec![LogLimit::default(); listeners.len()],
            refused_access_log: vec![LogLimit::default(); listeners.len()],
            resource_log: LogLimit::default(),
            accepted_now: Vec::new(),
        };
        for (service, (info, fd)) in listeners.into_iter().enumerate() {
            tcp.services.push(info);
            tcp.listeners.push(service, fd);
        }
        tcp
    }

    /// Starts carrying a service added while running: `fd` is this worker's listener.
    pub(super) fn add(&mut self, ctx: &mut Ctx, info: ServiceInfo, fd: OwnedFd) {
        let service = self.services.len();
        self.services.push(info);
        self.no_backend_log.push(LogLimit::default());
        self.refused_access_log.push(LogLimit::default());
        let listener = self.listeners.push(service, fd);
        self.listeners.arm(ctx, listener);
    }

    /// Service `index` was removed: closes its listener (after cancelling the accept; `closed`
    /// is dropped then) and marks its connections to be cut at `until`. `keep_listener`: the
    /// socket lives on for another service (see [`Listeners::close_service`]).
    pub(super) fn remove(
        &mut self,
        ctx: &mut Ctx,
        index: usize,
        until: Instant,
        closed: &std::sync::mpsc::Sender<()>,
        keep_listener: bool,
    ) {
        for (at, info) in self.services.iter_mut().enumerate() {
            if info.index != index || info.removed() {
                continue;
            }
            info.drain_until = Some(until);
            self.listeners.close_service(ctx, at, closed, keep_listener);
        }
    }

    /// Resets the connections of removed services whose drain deadline has passed. Returns
    /// how many.
    pub(super) fn cut_removed(&mut self, ctx: &mut Ctx) -> u64 {
        let now = Instant::now();
        if !self
            .services
            .iter()
            .any(|s| s.drain_until.is_some_and(|at| at <= now))
        {
            return 0;
        }
        let services = &self.services;
        let due = self.conns.keys_where(|c| {
            c.closing.is_none() && services[c.service].drain_until.is_some_and(|at| at <= now)
        });
        self.close_all(ctx, &due, End::DrainCut)
    }

    /// Arms every listener's accept.
    pub(super) fn start(&mut self, ctx: &mut Ctx) {
        self.listeners.start(ctx);
    }

    /// Connections open on this worker (accepted and not yet closed).
    pub(super) fn open(&self) -> u64 {
        self.conns.len() as u64
    }

    /// Whether the drain is over: listeners closed, no connection left, no socket waiting
    /// for its send queue.
    pub(super) fn is_done(&self) -> bool {
        self.conns.is_empty() && self.listeners.all_closed() && self.flushing.len() == 0
    }

    /// A multishot accept completed: a new client socket, or an error.
    pub(super) fn on_accept(&mut self, ctx: &mut Ctx, c: Completion) {
        if is_fd_shortage(Some(-c.result)) {
            self.pipes.shrink();
        }
        let mut accepted = std::mem::take(&mut self.accepted_now);
        self.listeners.on_accept(
            ctx,
            c,
            &self.services,
            &mut self.resource_log,
            &mut accepted,
        );
        for (service, client) in accepted.drain(..) {
            self.accepted(ctx, service, client);
        }
        // The buffer goes back for the next completion (no allocation per accept).
        self.accepted_now = accepted;
    }

    fn accepted(&mut self, ctx: &mut Ctx, service: usize, client: OwnedFd) {
        // A connection whose handshake ended while its listener dropped SYNs got the filter
        // with its socket (a handshake that ends just as the filter comes off may keep it
        // too: then only a SYN on the open connection goes unanswered).
        if self.listeners.drops_syns_of(service) {
            let _ = sys::drop_syns(client.as_fd(), false);
        }
        let sock = SockRef::from(&client);
        let Some(client_addr) = sock.peer_addr().ok().and_then(|a| a.as_socket()) else {
            // Reset before we got to it.
            tracing::debug!("accepted a connection that is already gone");
            return;
        };
        let info = &self.services[service];
        if info.nodelay_on_accept {
            let _ = sock.set_nodelay(true);
        }
        let snapshot = info.snapshot.load_full();
        let refused_log = &mut self.refused_access_log[service];
        let Ok(admission) = admit_or_refuse(ctx, info, &snapshot, client_addr, refused_log) else {
            // A reset, not a FIN: the client learns at once that it was turned away (a FIN
            // would read as an empty answer), and the VIP keeps no TIME_WAIT socket per
            // refused connection, which a client over its limit could pile up.
            sys::set_reset_on_close(&client);
            return;
        };
        let access_log = snapshot.access_log;
        let (index, generation) = self.conns.insert(Conn {
            service,
            client,
            client_addr,
            phase: Phase::Connecting(Connecting {
                snapshot,
                tried: Vec::new(),
                attempt: None,
                result: None,
                timed_out: false,
            }),
            in_flight: 0,
            closing: None,
            last_active: ctx.now,
            started: ctx.now,
            access_log,
            admission,
        });
        ctx.shared.active.fetch_add(1, Ordering::Relaxed);
        self.connect_next(ctx, index, generation);
    }

    /// Picks a backend not tried yet and starts a connect to it, or closes the client when
    /// none is left or the retries are spent.
    fn connect_next(&mut self, ctx: &mut Ctx, index: u32, generation: u32) {
        let Some(conn) = self.conns.get_mut(index, generation) else {
            return;
        };
        let Phase::Connecting(a) = &mut conn.phase else {
            return;
        };
        let service = &self.services[conn.service];
        let failed = a.tried.len();
        let target = if failed as u64 > u64::from(service.retries) {
            None
        } else {
            if failed > 0 {
                a.snapshot = service.snapshot.load_full();
            }
            let tried: Vec<BackendId> = if failed == 0 {
                Vec::new()
            } else {
                (a.snapshot.backends.iter().enumerate())
                    .filter(|(_, b)| a.tried.contains(&b.address))
                    .map(|(id, _)| id)
                    .collect()
            };
            let key = flow_key(conn.client_addr, service.listen, Protocol::Tcp);
            a.snapshot
                .pick(&key, &tried)
                .and_then(|id| a.snapshot.backends.get(id))
                .map(|b| (b.address, Arc::clone(&b.stats)))
        };
        let Some((addr, stats)) = target else {
            Shared::count(&ctx.shared.no_backend, 1);
            let client = conn.client_addr;
            let service_at = conn.service;
            self.log_no_backend(ctx, service_at, client, failed);
            self.close(ctx, index, generation, End::NoBackend);
            // The next connections' SYNs need not wait for the sweep to be dropped.
            self.gate_syns(ctx, service_at);
            return;
        };
        let socket = match backend_socket(addr) {
            Ok(s) => s,
            Err(e) => {
                if is_fd_shortage(e.raw_os_error()) {
                    self.pipes.shrink();
                }
                ctx.no_socket(&mut self.resource_log, service, addr, &e);
                self.close(ctx, index, generation, End::Error);
                return;
            }
        };
        ctx.ring.connect(
            socket.as_raw_fd(),
            addr,
            service.connect_timeout,
            Token::entry(Kind::Conn, OP_CONNECT, index, generation),
            Token::entry(Kind::Conn, OP_TIMER, index, generation),
        );
        stats.active.fetch_add(1, Ordering::Relaxed);
        a.attempt = Some(Attempt {
            addr,
            stats,
            socket,
        });
        a.result = None;
        a.timed_out = false;
        conn.in_flight |= bit(OP_CONNECT) | bit(OP_TIMER);
    }

    fn log_no_backend(&mut self, ctx: &Ctx, service: usize, client: SocketAddr, failed: usize) {
        let Some(also) = self.no_backend_log[service].allow(ctx.now) else {
            return;
        };
        let name = &self.services[service].name;
        if failed == 0 {
            tracing::warn!(
                "service {name}: no backend available; closing the connection from {client}{also}"
            );
        } else {
            tracing::warn!(
                "service {name}: {failed} connect attempt(s) failed; closing the connection \
                 from {client}{also}"
            );
        }
    }

    /// Turns service `service`'s SYN filter on or off as [`syns_unwelcome`] says (called each
    /// sweep, and when a connection found no backend); the first worker to change it logs the
    /// change.
    fn gate_syns(&mut self, ctx: &Ctx, service: usize) {
        // After a hand-over the listener is the new daemon's, filter and all.
        if ctx.shared.handed_over.load(Ordering::Relaxed) {
            return;
        }
        let info = &self.services[service];
        let on = syns_unwelcome(ctx, info);
        match self.listeners.drop_syns(service, on) {
            Ok(true) if info.syns_dropped.swap(on, Ordering::Relaxed) != on => {
                let name = &info.name;
                if on {
                    tracing::info!(
                        "service {name}: no backend while the VIP is announced: SYNs are \
                         dropped, not refused, until one is back, so that clients send them \
                         again (to another node once the VIP is withdrawn)"
                    );
                } else {
                    tracing::info!("service {name}: SYNs are taken again");
                }
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(also) = self.no_backend_log[service].allow(ctx.now) {
                    let name = &info.name;
                    tracing::warn!(
                        "service {name}: cannot {} SYNs at its listener: {e}{also}",
                        if on { "drop" } else { "take again the" }
                    );
                }
            }
        }
    }

    /// Whether some listener of this worker drops SYNs (the worker then sweeps more often,
    /// so that it takes them again soon after a backend is back).
    pub(super) fn dropping_syns(&self) -> bool {
        self.listeners.dropping_syns()
    }

    /// A completion of one of a connection's operations.
    pub(super) fn on_conn(&mut self, ctx: &mut Ctx, c: Completion) {
        let (index, generation, op) = (c.token.index, c.token.generation, c.token.op);
        let Some(conn) = self.conns.get_mut(index, generation) else {
            tracing::debug!("stale completion for connection slot {index}");
            return;
        };
        if op > OP_RELAY + 1 {
            return;
        }
        conn.in_flight &= !bit(op);
        if conn.closing.is_some() {
            if conn.in_flight == 0 {
                self.finish(ctx, index, generation);
            }
            return;
        }
        match op {
            OP_CONNECT | OP_TIMER => {
                if let Phase::Connecting(a) = &mut conn.phase {
                    if op == OP_CONNECT {
                        a.result = Some(c.result);
                    } else if c.result == -libc::ETIME {
                        a.timed_out = true;
                    }
                }
                // Act once both completions are in: the backend socket stays untouched
                // until the kernel is done with it.
                if conn.in_flight & (bit(OP_CONNECT) | bit(OP_TIMER)) == 0 {
                    self.connect_done(ctx, index, generation);
                }
            }
            _ => {
                let way = usize::from(op - OP_RELAY);
                let Phase::Relaying(r) = &conn.phase else {
                    // Unreachable: relay operations start only once relaying.
                    self.close(ctx, index, generation, End::Error);
                    return;
                };
                let outcome = r.ways[way].completed(c.result);
                self.drive(ctx, index, generation, way, outcome);
            }
        }
    }

    /// Both completions of a connect attempt are in: on failure tries the next backend, on
    /// success sets up the relay and starts both directions.
    fn connect_done(&mut self, ctx: &mut Ctx, index: u32, generation: u32) {
        let Some(conn) = self.conns.get_mut(index, generation) else {
            return;
        };
        let Phase::Connecting(a) = &mut conn.phase else {
            return;
        };
        let Some(attempt) = a.attempt.take() else {
            // Unreachable: both connect completions imply an attempt. Never leave a
            // connection with nothing in flight and no way out.
            self.close(ctx, index, generation, End::Error);
            return;
        };
        let result = a.result.take().unwrap_or(-libc::ECANCELED);
        if result < 0 {
            connect_failed(
                ctx,
                &self.services[conn.service],
                a,
                attempt,
                result,
                &mut self.resource_log,
            );
            self.connect_next(ctx, index, generation);
            return;
        }
        let Some((pipes, header_len)) = self.relay_pipes(ctx, index, generation) else {
            Shared::count(&ctx.shared.errors, 1);
            drop(attempt.socket);
            attempt.stats.closed();
            self.close(ctx, index, generation, End::Error);
            return;
        };
        self.start_relaying(ctx, index, generation, attempt, pipes, header_len);
    }

    /// The two relay pipes of a connection whose connect succeeded, the client-to-backend
    /// one already holding the PROXY protocol header if the service sends one, and that
    /// header's length. `None` (with a warning) when the pipes cannot be had or the header
    /// cannot be queued.
    fn relay_pipes(&mut self, ctx: &Ctx, index: u32, generation: u32) -> Option<([Pipe; 2], u32)> {
        let conn = self.conns.get_mut(index, generation)?;
        let Phase::Connecting(a) = &conn.phase else {
            return None;
        };
        let service = &self.services[conn.service];
        let pipes = match self.pipes.take_pair(ctx.options.pipe_size) {
            Ok(pipes) => pipes,
            Err(e) => {
                if let Some(also) = self.resource_log.allow(ctx.now) {
                    tracing::warn!(
                        "service {}: cannot create relay pipes: {e}{also}",
                        service.name
                    );
                }
                return None;
            }
        };
        // The PROXY protocol header goes into the empty client-to-backend pipe: the relay
        // delivers it first (with its partial writes and polls) and reads the client only
        // once it is out, so no client byte can overtake it.
        // A backend that expects a header cannot take the connection without one, so any
        // failure here closes it. A write of at most PIPE_BUF bytes into an empty pipe is
        // whole or fails.
        let queued = proxy_header_for(&a.snapshot, service.listen, &conn.client, conn.client_addr)
            .and_then(|header| match header {
                None => Ok(0),
                Some(h) => match sys::write(pipes[TO_BACKEND].write.as_fd(), &h)? {
                    n if n == h.len() => Ok(n as u32),
                    n => Err(io::Error::other(format!(
                        "only {n} of {} bytes went into the pipe",
                        h.len()
                    ))),
                },
            });
        match queued {
            Ok(header_len) => Some((pipes, header_len)),
            Err(e) => {
                tracing::warn!(
                    "service {}: cannot queue the PROXY protocol header for {}: {e}",
                    service.name,
                    conn.client_addr
                );
                None
            }
        }
    }

    /// The connect of `attempt` succeeded and the relay is set up: the connection starts
    /// relaying through `pipes` (`header_len` bytes of PROXY protocol header queued first).
    fn start_relaying(
        &mut self,
        ctx: &mut Ctx,
        index: u32,
        generation: u32,
        attempt: Attempt,
        pipes: [Pipe; 2],
        header_len: u32,
    ) {
        let Some(conn) = self.conns.get_mut(index, generation) else {
            // Unreachable: the caller just found it.
            attempt.stats.closed();
            return;
        };
        let Attempt {
            addr,
            stats,
            socket,
        } = attempt;
        let service = &self.services[conn.service];
        stats.connect_succeeded(|| ctx.events.connect_succeeded(service.index, addr));
        // `active` has counted this connection since the pick.
        stats.total.fetch_add(1, Ordering::Relaxed);
        conn.phase = Phase::Relaying(Relaying {
            backend: socket,
            backend_addr: addr,
            stats,
            ways: [
                Direction::new(pipes[0].capacity),
                Direction::new(pipes[1].capacity),
            ],
            pipes,
            bytes: [0, 0],
            header_left: header_len,
            backend_failed: None,
            last_bytes_of_gone_peer: Cell::new(None),
        });
        conn.last_active = ctx.now;
        self.drive(
            ctx,
            index,
            generation,
            TO_BACKEND,
            Outcome::Started(header_len),
        );
        self.drive(ctx, index, generation, TO_CLIENT, Outcome::Started(0));
    }

    /// Feeds `outcome` to direction `way` and carries out its steps until one is in flight
    /// (or the direction or connection ends).
    fn drive(&mut self, ctx: &mut Ctx, index: u32, generation: u32, way: usize, outcome: Outcome) {
        let mut outcome = outcome;
        let mut steps = 0;
        loop {
            let Some(conn) = self.conns.get_mut(index, generation) else {
                return;
            };
            if conn.closing.is_some() {
                return;
            }
            let Phase::Relaying(r) = &mut conn.phase else {
                return;
            };
            if count_delivered(r, way, outcome) {
                conn.last_active = ctx.now;
            }
            let op = OP_RELAY + way as u8;
            let token = Token::entry(Kind::Conn, op, index, generation);
            let next = match r.ways[way].on(outcome) {
                // Syscall splices yield after a few steps: the would-block outcome makes the
                // direction poll, which completes at once if it is still ready.
                Step::SpliceIn(_) if steps >= SYSCALL_STEPS => {
                    Next::Now(Outcome::SplicedIn(-libc::EAGAIN))
                }
                Step::SpliceOut(_) if steps >= SYSCALL_STEPS => {
                    Next::Now(Outcome::SplicedOut(-libc::EAGAIN))
                }
                step => start_step(ctx, conn.client.as_fd(), r, way, step, token),
            };
            match next {
                Next::InFlight => {
                    conn.in_flight |= bit(op);
                    return;
                }
                Next::Now(now) => {
                    outcome = now;
                    steps += 1;
                }
                Next::Finished => {
                    if r.ways.iter().all(Direction::finished) {
                        self.close(ctx, index, generation, End::Eof);
                    } else if let (TO_CLIENT, Some(errno)) = (way, r.backend_failed) {
                        // The backend's last bytes are delivered; now the reset it sent.
                        Shared::count(&ctx.shared.errors, 1);
                        self.close(ctx, index, generation, End::of_errno(errno));
                    }
                    return;
                }
                Next::Failed(errno)
                    if way == TO_BACKEND
                        && matches!(outcome, Outcome::SplicedOut(_) | Outcome::Writable(_))
                        && !r.ways[TO_CLIENT].finished() =>
                {
                    // Writing to the backend failed, but what it sent before (an early
                    // answer) may still wait in its socket: `TO_CLIENT` delivers it first.
                    r.backend_failed = Some(errno);
                    return;
                }
                Next::Failed(errno) => {
                    tracing::debug!(
                        "service {}: connection {} <-> {} ends: {}",
                        self.services[conn.service].name,
                        conn.client_addr,
                        r.backend_addr,
                        io::Error::from_raw_os_error(errno)
                    );
                    Shared::count(&ctx.shared.errors, 1);
                    self.close(ctx, index, generation, End::of_errno(errno));
                    return;
                }
            }
        }
    }

    /// Starts closing a connection: cancels what is in flight; the connection is freed
    /// once the last completion arrives ([`Tcp::finish`]).
    fn close(&mut self, ctx: &mut Ctx, index: u32, generation: u32, how: End) {
        let Some(conn) = self.conns.get_mut(index, generation) else {
            return;
        };
        if conn.closing.is_some() {
            return;
        }
        conn.closing = Some(how);
        for op in [OP_CONNECT, OP_RELAY, OP_RELAY + 1] {
            // The linked timer goes with its connect.
            if conn.in_flight & bit(op) != 0 {
                ctx.ring
                    .cancel(Token::entry(Kind::Conn, op, index, generation));
            }
        }
        if conn.in_flight == 0 {
            self.finish(ctx, index, generation);
        }
    }

    /// Frees a connection with nothing in flight: closes its sockets (with a reset if so
    /// decided), recycles its pipes, updates the counts.
    fn finish(&mut self, ctx: &mut Ctx, index: u32, generation: u32) {
        let Some(conn) = self.conns.remove(index, generation) else {
            return;
        };
        let end = conn.closing.unwrap_or(End::Error);
        close_socket(&mut self.flushing, conn.client, end, ctx.now);
        let info = &self.services[conn.service];
        info.clients.release(conn.admission);
        let (backend, bytes) = match conn.phase {
            Phase::Relaying(r) => {
                close_socket(&mut self.flushing, r.backend, end, ctx.now);
                r.stats.closed();
                let [p0, p1] = r.pipes;
                self.pipes.give(p0, r.ways[TO_BACKEND].finished());
                self.pipes.give(p1, r.ways[TO_CLIENT].finished());
                (Some(r.backend_addr), r.bytes)
            }
            Phase::Connecting(a) => {
                if let Some(attempt) = a.attempt {
                    attempt.stats.closed();
                }
                (None, [0, 0])
            }
        };
        if conn.access_log {
            access::log(&access::Line {
                protocol: Protocol::Tcp,
                service: &info.name,
                client: conn.client_addr,
                backend,
                bytes,
                duration: ctx.now.saturating_duration_since(conn.started),
                end,
            });
        }
        ctx.shared.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Closes relaying connections idle for their service's `idle_timeout`, and those whose
    /// unread side's peer is gone, looking at [`SWEEP_BUDGET`] connection slots, or an eighth
    /// of them when that is more;
    /// re-arms listeners that backed off.
    ///
    /// Why the second: once a direction has finished (its source sent a FIN), or while it
    /// waits for its destination to take the pipe's bytes (a peer that does not read),
    /// nothing polls that source unless the other direction writes to it, so a reset from
    /// it (the client half-closed, or gave up on an upload, then went away) would go unseen
    /// while the other direction waits on a quiet peer or has finished, holding the other
    /// peer until the idle timeout. The sweep asks each such socket once per tick
    /// ([`sys::peer_gone`]): one `poll(2)` per such socket, none for the others. An
    /// io_uring poll cannot wait for this on a finished source, as it always reports the
    /// FIN already received (`POLLRDHUP`); on a blocked one it would cost a second
    /// operation in flight per direction.
    pub(super) fn sweep(&mut self, ctx: &mut Ctx) {
        self.listeners.rearm_backed_off(ctx);
        for service in 0..self.services.len() {
            self.gate_syns(ctx, service);
        }
        let (services, now) = (&self.services, ctx.now);
        self.flushing.sweep(now);
        let budget = self.conns.sweep_budget(SWEEP_BUDGET);
        let due = self
            .conns
            .sweep_due(&mut self.sweep_cursor, budget, |conn| {
                sweep_verdict(conn, &services[conn.service], now)
            });
        for (index, generation, how) in due {
            if how == End::Reset {
                Shared::count(&ctx.shared.errors, 1);
            }
            self.close(ctx, index, generation, how);
        }
    }

    /// Shutdown began: closes the listeners (after cancelling their accepts). Connections
    /// already accepted carry on.
    pub(super) fn stop_accepting(&mut self, ctx: &mut Ctx) {
        self.listeners.stop_accepting(ctx);
    }

    /// The drain deadline passed: resets every connection not already closing. Returns how
    /// many.
    pub(super) fn cut_off(&mut self, ctx: &mut Ctx) -> u64 {
        self.flushing.stop();
        let due = self.conns.keys_where(|c| c.closing.is_none());
        self.close_all(ctx, &due, End::DrainCut)
    }

    /// Starts closing the connections `keys` with `how`; returns how many.
    fn close_all(&mut self, ctx: &mut Ctx, keys: &[(u32, u32)], how: End) -> u64 {
        for &(index, generation) in keys {
            self.close(ctx, index, generation, how);
        }
        keys.len() as u64
    }

    /// The worker is exiting with connections left (ring failure, stuck drain): closes
    /// them now, whatever is in flight, and returns how many there were.
    pub(super) fn abandon(&mut self, ctx: &mut Ctx) -> u64 {
        let keys = self.conns.keys();
        for &(index, generation) in &keys {
            if let Some(conn) = self.conns.get_mut(index, generation) {
                conn.closing.get_or_insert(End::Error);
            }
            self.finish(ctx, index, generation);
        }
        self.listeners.close_all();
        self.flushing.stop();
        keys.len() as u64
    }
}
