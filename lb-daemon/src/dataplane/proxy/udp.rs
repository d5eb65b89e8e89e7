//! UDP: a worker's VIP sockets and its client sessions.
//!
//! Each worker owns one `SO_REUSEPORT` socket per UDP service; the kernel hashes a client's
//! 4-tuple to one of them, so all of a client's datagrams reach the same worker and session.
//! A session is a connected socket to the backend picked for the client; a client's datagram
//! is `send` on it, a backend's datagram is `sendto` the client through the VIP socket (so
//! replies come from the VIP). One datagram in, one out: never merged or split.
//!
//! Readiness comes from io_uring multishot polls; datagrams move with non-blocking
//! `recvmmsg`/`sendmmsg`/`send` on the worker thread. Why not io_uring receive operations:
//! datagrams are small and many; one poll completion followed by a `recvmmsg` batch moves
//! dozens of them with no buffer ring to manage and no io-wq thread, and the socket keeps
//! the datagrams queued (not the ring) when the worker falls behind, where its large
//! receive buffer absorbs bursts.
//!
//! A multishot poll reports new arrivals, not a level: after each completion the socket is
//! read until it would block (a VIP socket: until a batch comes back short), or, past a
//! budget, a `Nop` completion resumes the reading so one busy socket cannot starve the rest.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use super::access::{self, End};
use super::admission::{admit_or_refuse, log_turned_away};
use super::ctx::Ctx;
use super::limits::{Admission, RecentRefusals};
use super::proxy_header::{self, Transport};
use super::ring::{Completion, Kind, Token};
use super::slab::Slab;
use super::sys::{self, Datagrams, Local};
use super::{LogLimit, ServiceInfo, Shared};
use crate::config::Protocol;
use crate::snapshot::{flow_key, BackendStats, ServiceSnapshot};

/// Operation numbers of a VIP socket or a session.
const OP_POLL: u8 = 0;
const OP_RESUME: u8 = 1;

fn bit(op: u8) -> u8 {
    1 << op
}

/// Clears the bit of the operation of a VIP socket or session that `c` ends in its
/// `in_flight`: a resume, or a multishot poll that will not fire again. `false` for an
/// operation number it does not have (the completion is ignored).
fn completed(in_flight: &mut u8, c: &Completion) -> bool {
    match c.token.op {
        OP_POLL if !c.more => *in_flight &= !bit(OP_POLL),
        OP_POLL => {}
        OP_RESUME => *in_flight &= !bit(OP_RESUME),
        _ => return false,
    }
    true
}

/// Datagrams read from one socket per completion before yielding.
const READ_BUDGET: usize = 256;
/// Sessions examined per sweep tick at least (more in a slab past eight times this, see
/// `Slab::sweep_budget`).
const SWEEP_BUDGET: u32 = 4096;
/// How long a session waits for its backend's replies once the sockets were handed to a new
/// daemon (which reads the clients' datagrams now).
const HANDED_OVER_IDLE: Duration = Duration::from_secs(2);

struct Vip {
    /// Index into [`Udp::services`].
    service: usize,
    fd: Option<OwnedFd>,
    /// Bound to a wildcard address: datagrams carry their local address (see
    /// [`sys::Local`]), and replies leave from it.
    packet_info: bool,
    in_flight: u8,
    /// Shutting down: close once nothing is in flight.
    closing: bool,
    /// Handed over to a new daemon, which reads it now: no more reading here, only the
    /// replies of this worker's sessions leave through it.
    deaf: bool,
    /// Sessions whose replies leave through this socket.
    sessions: u32,
}

struct Session {
    /// Index into [`Udp::vips`].
    vip: usize,
    client: SocketAddr,
    /// `client` as a C socket address, for `sendmmsg`.
    client_name: SockAddr,
    fd: OwnedFd,
    backend: SocketAddr,
    /// The VIP address the client writes to, when the VIP socket is a wildcard.
    local: Option<Local>,
    stats: Arc<BackendStats>,
    last_active: Instant,
    in_flight: u8,
    /// Why it is closing, once it is: it takes no more client datagrams and is freed when
    /// its operations have completed.
    closing: Option<End>,
    /// The backend has answered at least once (a connect success: it ends the backend's run
    /// of failures, if it had one).
    answered: bool,
    /// The generation of the service's table this session's backend was last checked in.
    table_generation: u64,
    /// When it opened.
    started: Instant,
    /// Bytes delivered to the backend and to the client (without PROXY headers).
    bytes: [u64; 2],
    /// Whether its service logged access when it opened.
    access_log: bool,
    /// Its place in the service's limits, given back when it starts closing (`None` after).
    admission: Option<Admission>,
    /// The PROXY protocol v2 header that starts every datagram to the backend, if the
    /// service sends one.
    header: Option<Box<[u8]>>,
}

/// A worker's UDP services, VIP sockets and sessions.
pub(super) struct Udp {
    services: Vec<ServiceInfo>,
    vips: Vec<Vip>,
    sessions: Slab<Session>,
    /// `(vip, client)` → session `(index, generation)`.
    by_client: HashMap<(usize, SocketAddr), (u32, u32)>,
    /// The receive batch, allocated on first use (2 MiB).
    batch: Option<Box<Datagrams>>,
    sweep_cursor: u32,
    /// Per service: "no backend" warnings.
    no_backend_log: Vec<LogLimit>,
    /// Per service: access log lines of datagrams refused by the limits, one a second at
    /// most.
    refused_access_log: Vec<LogLimit>,
    /// Per service: access log lines of datagrams that found no backend, one a second at
    /// most.
    no_backend_access_log: Vec<LogLimit>,
    /// Clients recently refused by a service's limits, by service (index into `services`).
    refusals: RecentRefusals,
    /// Local resource shortages (sockets).
    resource_log: LogLimit,
}

/// The PROXY protocol header that starts every datagram of a new session of `client`, if
/// the service sends one. It names the VIP the client wrote to: `local` when the VIP socket
/// is a wildcard, else the listen address.
fn session_header(
    service: &ServiceInfo,
    snapshot: &ServiceSnapshot,
    client: SocketAddr,
    local: Option<Local>,
) -> Option<Box<[u8]>> {
    let vip_addr = match local {
        Some(local) if service.listen.ip().is_unspecified() => {
            SocketAddr::new(local.ip(), service.listen.port())
        }
        _ => service.listen,
    };
    proxy_header::header(
        snapshot.proxy_protocol,
        client,
        vip_addr,
        Transport::Datagram,
    )
    .map(Vec::into_boxed_slice)
}

/// Whether `err`, from a send to or a receive from a session's backend, says the backend
/// cannot be reached: an ICMP error came back for an earlier datagram, a port unreachable
/// (`ECONNREFUSED`) or a host or network administratively prohibited, as a firewall's
/// reject sends (`EHOSTUNREACH`, `ENETUNREACH`; the plain host and network unreachable
/// reach a UDP socket only with `IP_RECVERR`, which these do not set), or the host is
/// unknown (`EHOSTDOWN`).
fn unreachable(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN)
    )
}

impl Udp {
    /// A UDP half for `sockets` (service, bound VIP socket).
    pub(super) fn new(sockets: Vec<(ServiceInfo, OwnedFd)>) -> Udp {
        let mut udp = Udp {
            services: Vec::with_capacity(sockets.len()),
            vips: Vec::with_capacity(sockets.len()),
            sessions: Slab::new(),
            by_client: HashMap::new(),
            batch: None,
            sweep_cursor: 0,
            no_backend_log: Vec::with_capacity(sockets.len()),
            refused_access_log: Vec::with_capacity(sockets.len()),
            no_backend_access_log: Vec::with_capacity(sockets.len()),
            refusals: RecentRefusals::new(),
            resource_log: LogLimit::default(),
        };
        for (info, fd) in sockets {
            udp.push(info, fd);
        }
        udp
    }

    fn push(&mut self, info: ServiceInfo, fd: OwnedFd) {
        let packet_info = info.listen.ip().is_unspecified()
            && match sys::enable_packet_info(fd.as_fd(), info.listen.is_ipv6()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "service {}: cannot learn the local address of datagrams on {}; \
                         replies leave from the routing's choice: {e}",
                        info.name,
                        info.listen
                    );
                    false
                }
            };
        self.vips.push(Vip {
            service: self.services.len(),
            fd: Some(fd),
            packet_info,
            in_flight: 0,
            closing: false,
            deaf: false,
            sessions: 0,
        });
        self.services.push(info);
        self.no_backend_log.push(LogLimit::default());
        self.refused_access_log.push(LogLimit::default());
        self.no_backend_access_log.push(LogLimit::default());
    }

    /// Starts carrying a service added while running: `fd` is this worker's VIP socket.
    pub(super) fn add(&mut self, ctx: &mut Ctx, info: ServiceInfo, fd: OwnedFd) {
        self.push(info, fd);
        self.arm_vip(ctx, self.vips.len() - 1);
    }

    /// Service `index` was removed: no new session starts on it; its VIP socket closes once
    /// its last session has ended; sessions are cut at `until`.
    pub(super) fn remove(&mut self, ctx: &mut Ctx, index: usize, until: Instant) {
        for at in 0..self.services.len() {
            let info = &mut self.services[at];
            if info.index != index || info.removed() {
                continue;
            }
            info.drain_until = Some(until);
            for i in 0..self.vips.len() {
                if self.vips[i].service == at && self.vips[i].sessions == 0 {
                    self.close_vip(ctx, i);
                }
            }
        }
    }

    /// Ends the sessions of removed services whose drain deadline has passed (their VIP
    /// sockets close when the sessions are freed). Returns how many.
    pub(super) fn cut_removed(&mut self, ctx: &mut Ctx) -> u64 {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.vips.len())
            .filter(|&i| {
                self.services[self.vips[i].service]
                    .drain_until
                    .is_some_and(|at| at <= now)
            })
            .collect();
        if due.is_empty() {
            return 0;
        }
        let cut = self.close_all(
            ctx,
            |s| s.closing.is_none() && due.contains(&s.vip),
            End::DrainCut,
        );
        for i in due {
            if self.vips[i].sessions == 0 {
                self.close_vip(ctx, i);
            }
        }
        cut
    }

    /// The VIP socket a new client of `vip` starts its session on: `vip` itself, or, when its
    /// service was removed, a live socket of a service added on the same address (`None` if
    /// there is none: the datagram is dropped).
    fn successor(&self, vip: usize) -> Option<usize> {
        let service = &self.services[self.vips[vip].service];
        if !service.removed() {
            return Some(vip);
        }
        self.vips.iter().position(|v| {
            let s = &self.services[v.service];
            v.fd.is_some() && !v.closing && !s.removed() && s.listen == service.listen
        })
    }

    /// Arms every VIP socket's poll.
    pub(super) fn start(&mut self, ctx: &mut Ctx) {
        for i in 0..self.vips.len() {
            self.arm_vip(ctx, i);
        }
    }

    fn arm_vip(&mut self, ctx: &mut Ctx, vip: usize) {
        let v = &mut self.vips[vip];
        if let (Some(fd), false, false) = (&v.fd, v.closing, v.deaf) {
            if v.in_flight & bit(OP_POLL) == 0 {
                let token = Token::entry(Kind::Vip, OP_POLL, vip as u32, 0);
                ctx.ring
                    .poll(fd.as_raw_fd(), libc::POLLIN as u32, true, token);
                v.in_flight |= bit(OP_POLL);
            }
        }
    }

    /// Sessions open on this worker.
    pub(super) fn open(&self) -> u64 {
        self.sessions.len() as u64
    }

    /// Whether the drain is over: no session left, VIP sockets closed.
    pub(super) fn is_done(&self) -> bool {
        self.sessions.is_empty() && self.vips.iter().all(|v| v.fd.is_none())
    }

    /// A VIP socket's poll or resume completed: read the clients' datagrams.
    pub(super) fn on_vip(&mut self, ctx: &mut Ctx, c: Completion) {
        let vip = c.token.index as usize;
        let Some(v) = self.vips.get_mut(vip) else {
            return;
        };
        if !completed(&mut v.in_flight, &c) {
            return;
        }
        if v.closing {
            if v.in_flight == 0 {
                v.fd = None;
            }
            return;
        }
        if v.deaf {
            return;
        }
        if c.result < 0 && c.token.op == OP_POLL {
            tracing::debug!(
                "service {}: VIP socket poll failed: {}",
                self.services[v.service].name,
                io::Error::from_raw_os_error(-c.result)
            );
        } else {
            self.read_clients(ctx, vip);
        }
        self.arm_vip(ctx, vip);
    }

    fn read_clients(&mut self, ctx: &mut Ctx, vip: usize) {
        let Some(fd) = self.vips[vip].fd.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        let packet_info = self.vips[vip].packet_info;
        let mut batch = self.batch.take().unwrap_or_else(Datagrams::new);
        let mut read = 0;
        loop {
            if read >= READ_BUDGET {
                let v = &mut self.vips[vip];
                if v.in_flight & bit(OP_RESUME) == 0 {
                    ctx.ring
                        .nop(Token::entry(Kind::Vip, OP_RESUME, vip as u32, 0));
                    v.in_flight |= bit(OP_RESUME);
                }
                break;
            }
            let n = match batch.recv(fd, packet_info) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(
                        "service {}: receive on the VIP socket: {e}",
                        self.services[self.vips[vip].service].name
                    );
                    break;
                }
            };
            read += n.max(1);
            for i in 0..n {
                let d = batch.get(i);
                match d.from {
                    Some(client) if !d.truncated => {
                        self.forward_to_backend(ctx, vip, client, d.local, d.data)
                    }
                    _ => Shared::count(&ctx.shared.dropped_datagrams, 1),
                }
            }
            // A short batch already found the queue empty: `recvmmsg(2)` stops early only
            // when a receive fails, and on this unconnected socket (no `IP_RECVERR` or
            // `IPV6_RECVERR`, see `bind`) that is the `EAGAIN` one more read would return. A
            // datagram that arrives later wakes the multishot poll (or, if that poll ended,
            // completes the one `arm_vip` arms at once), as one after that read would. (A
            // session's connected socket reads on to `WouldBlock`: there the failure may be
            // an ICMP error, which a short batch leaves in the socket's error slot without a
            // wake-up.)
            if n < sys::BATCH {
                break;
            }
        }
        self.batch = Some(batch);
    }

    /// Forwards one client datagram to its session's backend, opening the session first.
    fn forward_to_backend(
        &mut self,
        ctx: &mut Ctx,
        vip: usize,
        client: SocketAddr,
        local: Option<Local>,
        data: &[u8],
    ) {
        // A client of a removed service may have its session on the service that replaced
        // it at the same address (see `successor`): its datagrams can still reach the old
        // socket, and must find that session, with the same backend check.
        let found = match self.live_session(ctx, vip, client) {
            Some(key) => Some(key),
            None => match self.successor(vip) {
                Some(next) if next != vip => self.live_session(ctx, next, client),
                _ => None,
            },
        };
        let key = match found {
            Some(key) => key,
            None if ctx.draining => {
                Shared::count(&ctx.shared.dropped_datagrams, 1);
                return;
            }
            None => {
                let opened = match self.successor(vip) {
                    Some(next) => self.open_session(ctx, next, client, local),
                    None => None,
                };
                match opened {
                    Some(key) => key,
                    None => {
                        Shared::count(&ctx.shared.dropped_datagrams, 1);
                        return;
                    }
                }
            }
        };
        let Some(s) = self.sessions.get_mut(key.0, key.1) else {
            // Unreachable: `live_session` and `open_session` return open sessions only.
            Shared::count(&ctx.shared.dropped_datagrams, 1);
            return;
        };
        if local.is_some() {
            s.local = local;
        }
        let sent = match &s.header {
            None => sys::send(s.fd.as_raw_fd(), data),
            Some(header) => sys::send_prefixed(s.fd.as_raw_fd(), header, data)
                .map(|n| n.saturating_sub(header.len())),
        };
        match sent {
            Ok(n) => {
                s.stats
                    .bytes_to_backend
                    .fetch_add(n as u64, Ordering::Relaxed);
                s.bytes[0] += n as u64;
                s.last_active = ctx.now;
            }
            Err(e) => {
                Shared::count(&ctx.shared.dropped_datagrams, 1);
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EHOSTUNREACH | libc::ENETUNREACH)
                ) {
                    // On a send, most likely this host's routing (the route to the backend
                    // gone), which is not the backend's fault: the session ends, and if the
                    // route stays gone, the next session's connect says so against it.
                    tracing::debug!("send to backend {}: {e}; ending the session", s.backend);
                    Shared::count(&ctx.shared.errors, 1);
                    self.close(ctx, key, End::Error);
                } else if unreachable(&e) {
                    self.unreachable(ctx, key, e);
                } else {
                    tracing::debug!("send to backend {}: {e}", s.backend);
                }
            }
        }
    }

    /// The open session of `client` on VIP socket `vip`, if its backend is still up. A
    /// session whose backend went DOWN is closed, as IPVS's `expire_nodest_conn` does, so
    /// that the client's next datagram opens a session to a backend that is up instead of
    /// feeding a dead one until the idle timeout.
    fn live_session(
        &mut self,
        ctx: &mut Ctx,
        vip: usize,
        client: SocketAddr,
    ) -> Option<(u32, u32)> {
        let key = *self.by_client.get(&(vip, client))?;
        if self.sessions.get_mut(key.0, key.1).is_none() {
            // Unreachable: closing a session forgets its entry. Never keep a stale one.
            self.by_client.remove(&(vip, client));
            return None;
        }
        if self.backend_still_up(key) {
            return Some(key);
        }
        self.close(ctx, key, End::BackendDown);
        None
    }

    /// Opens a session for `client` on VIP socket `vip` (`local`: the address the client
    /// wrote to, when the socket is a wildcard); `None` when it was refused or failed (the
    /// caller drops the datagram).
    fn open_session(
        &mut self,
        ctx: &mut Ctx,
        vip: usize,
        client: SocketAddr,
        local: Option<Local>,
    ) -> Option<(u32, u32)> {
        let service_at = self.vips[vip].service;
        let snapshot = self.services[service_at].snapshot.load();
        let admission = self.admit(ctx, service_at, &snapshot, client)?;
        let opened = self
            .pick_backend(ctx, service_at, &snapshot, client)
            .and_then(|(addr, stats)| {
                let fd = self.connect_backend(ctx, service_at, &snapshot, addr, &stats)?;
                Some((addr, stats, fd))
            });
        let service = &self.services[service_at];
        let Some((backend, stats, fd)) = opened else {
            service.clients.release(admission);
            return None;
        };
        let raw = fd.as_raw_fd();
        let (index, generation) = self.sessions.insert(Session {
            vip,
            client,
            client_name: SockAddr::from(client),
            fd,
            backend,
            local: None,
            stats: stats.clone(),
            last_active: ctx.now,
            in_flight: bit(OP_POLL),
            closing: None,
            answered: false,
            table_generation: snapshot.generation,
            started: ctx.now,
            bytes: [0, 0],
            access_log: snapshot.access_log,
            admission: Some(admission),
            header: session_header(service, &snapshot, client, local),
        });
        ctx.ring.poll(
            raw,
            libc::POLLIN as u32,
            true,
            Token::entry(Kind::Session, OP_POLL, index, generation),
        );
        self.by_client.insert((vip, client), (index, generation));
        self.vips[vip].sessions += 1;
        stats.opened();
        ctx.shared.active.fetch_add(1, Ordering::Relaxed);
        Some((index, generation))
    }

    /// The per-client limits' answer to a new session of `client` on service `service_at`
    /// ([`admit_or_refuse`]); a refusal is remembered for as long as it stands, so that the
    /// client's next datagrams are refused without asking the shared table again.
    fn admit(
        &mut self,
        ctx: &Ctx,
        service_at: usize,
        snapshot: &ServiceSnapshot,
        client: SocketAddr,
    ) -> Option<Admission> {
        let service = &self.services[service_at];
        // Every session counts against the service's cap, so any client may have been refused.
        if self.refusals.stands(service_at, client.ip(), ctx.now) {
            // Refused a moment ago and bound to be refused again: drop it at the cost of a
            // hash lookup, with no lock and no log line, but counted like any refusal.
            Shared::count(&ctx.shared.limited, 1);
            service.clients.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let refused_log = &mut self.refused_access_log[service_at];
        match admit_or_refuse(ctx, service, snapshot, client, refused_log) {
            Ok(admission) => Some(admission),
            Err(why) => {
                self.refusals
                    .remember(service_at, client.ip(), ctx.now, why.stands_for());
                None
            }
        }
    }

    /// The backend a new session of `client` goes to, and its stats; `None` (counted and
    /// logged) when no backend is eligible.
    fn pick_backend(
        &mut self,
        ctx: &Ctx,
        service_at: usize,
        snapshot: &ServiceSnapshot,
        client: SocketAddr,
    ) -> Option<(SocketAddr, Arc<BackendStats>)> {
        let service = &self.services[service_at];
        let key = flow_key(client, service.listen, Protocol::Udp);
        if let Some(b) = snapshot
            .pick(&key, &[])
            .and_then(|id| snapshot.backends.get(id))
        {
            return Some((b.address, b.stats.clone()));
        }
        Shared::count(&ctx.shared.no_backend, 1);
        if snapshot.access_log {
            let limit = &mut self.no_backend_access_log[service_at];
            log_turned_away(ctx, service, client, End::NoBackend, limit);
        }
        self.log_no_backend(ctx, service_at, client);
        None
    }

    /// A non-blocking UDP socket connected to backend `addr`; `None` (counted and logged)
    /// when it cannot be opened or connected. A failed connect counts against the backend
    /// unless it was a local shortage.
    fn connect_backend(
        &mut self,
        ctx: &Ctx,
        service_at: usize,
        snapshot: &ServiceSnapshot,
        addr: SocketAddr,
        stats: &BackendStats,
    ) -> Option<OwnedFd> {
        let service = &self.services[service_at];
        let socket = match Socket::new(
            Domain::for_address(addr),
            Type::DGRAM.nonblocking().cloexec(),
            None,
        ) {
            Ok(s) => s,
            Err(e) => {
                ctx.no_socket(&mut self.resource_log, service, addr, &e);
                return None;
            }
        };
        sys::set_buffers(socket.as_fd(), ctx.options.udp_buffer);
        if let Err(e) = socket.connect(&addr.into()) {
            ctx.connect_failed(
                service,
                addr,
                stats,
                &e,
                snapshot.generation,
                &mut self.resource_log,
            );
            return None;
        }
        Some(socket.into())
    }

    fn log_no_backend(&mut self, ctx: &Ctx, service: usize, client: SocketAddr) {
        if let Some(also) = self.no_backend_log[service].allow(ctx.now) {
            tracing::warn!(
                "service {}: no backend available; dropping datagrams from {client}{also}",
                self.services[service].name
            );
        }
    }

    /// A session's poll or resume completed: relay the backend's datagrams to the client.
    pub(super) fn on_session(&mut self, ctx: &mut Ctx, c: Completion) {
        let (index, generation) = (c.token.index, c.token.generation);
        let Some(s) = self.sessions.get_mut(index, generation) else {
            tracing::debug!("stale completion for session slot {index}");
            return;
        };
        if !completed(&mut s.in_flight, &c) {
            return;
        }
        if s.closing.is_some() {
            if s.in_flight == 0 {
                self.finish(ctx, index, generation);
            }
            return;
        }
        self.read_backend(ctx, (index, generation));
        if let Some(s) = self.sessions.get_mut(index, generation) {
            if s.closing.is_none() && s.in_flight & bit(OP_POLL) == 0 {
                ctx.ring.poll(
                    s.fd.as_raw_fd(),
                    libc::POLLIN as u32,
                    true,
                    Token::entry(Kind::Session, OP_POLL, index, generation),
                );
                s.in_flight |= bit(OP_POLL);
            }
        }
    }

    fn read_backend(&mut self, ctx: &mut Ctx, key: (u32, u32)) {
        let mut batch = self.batch.take().unwrap_or_else(Datagrams::new);
        let mut read = 0;
        while let Some(s) = self.sessions.get_mut(key.0, key.1) {
            if read >= READ_BUDGET {
                if s.in_flight & bit(OP_RESUME) == 0 {
                    ctx.ring
                        .nop(Token::entry(Kind::Session, OP_RESUME, key.0, key.1));
                    s.in_flight |= bit(OP_RESUME);
                }
                break;
            }
            let n = match batch.recv(s.fd.as_raw_fd(), false) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if unreachable(&e) => {
                    self.unreachable(ctx, key, e);
                    break;
                }
                // A router on the way said a datagram was too big ("fragmentation needed",
                // "packet too big"): the kernel lowered the path MTU towards the backend and
                // fragments the next datagrams to fit. That datagram is lost, the session is
                // not: its client keeps its backend and the source port the backend knows it
                // by (QUIC, WireGuard).
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    tracing::debug!("backend {}: {e}; the path MTU to it is lower", s.backend);
                    continue;
                }
                Err(e) => {
                    tracing::debug!("receive from backend {}: {e}", s.backend);
                    Shared::count(&ctx.shared.errors, 1);
                    self.close(ctx, key, End::Error);
                    break;
                }
            };
            read += n.max(1);
            s.last_active = ctx.now;
            if !s.answered {
                s.answered = true;
                let service = self.services[self.vips[s.vip].service].index;
                let backend = s.backend;
                s.stats
                    .connect_succeeded(|| ctx.events.connect_succeeded(service, backend));
            }
            let Some(vip_fd) = self.vips[s.vip].fd.as_ref().map(|f| f.as_raw_fd()) else {
                Shared::count(&ctx.shared.dropped_datagrams, n as u64);
                continue;
            };
            let (sent, bytes, error) = batch.send_all_to(vip_fd, &s.client_name, s.local);
            s.stats
                .bytes_from_backend
                .fetch_add(bytes, Ordering::Relaxed);
            s.bytes[1] += bytes;
            if sent < n {
                Shared::count(&ctx.shared.dropped_datagrams, (n - sent) as u64);
                if let Some(e) = error {
                    tracing::debug!("send to client {}: {e}", s.client);
                }
            }
        }
        self.batch = Some(batch);
    }

    /// The backend cannot be reached ([`unreachable`]): report it against the backend (as a
    /// failed connect, which passive health checking counts) and end the session, so the
    /// client's next datagram picks a backend again instead of feeding this one until the
    /// idle timeout.
    fn unreachable(&mut self, ctx: &mut Ctx, key: (u32, u32), err: io::Error) {
        let Some(s) = self.sessions.get_mut(key.0, key.1) else {
            return;
        };
        let service = &self.services[self.vips[s.vip].service];
        ctx.connect_failed(
            service,
            s.backend,
            &s.stats,
            &err,
            s.table_generation,
            &mut self.resource_log,
        );
        Shared::count(&ctx.shared.errors, 1);
        self.close(ctx, key, End::Error);
    }

    /// Whether session `key`'s backend is still up in the service's current table. A
    /// drained backend keeps its sessions, and so does one a reload removed (it stays in the
    /// table at weight 0 until its last session ends: established flows are never cut), and
    /// one awaiting its first check; a DOWN one does not. Costs one snapshot load per
    /// datagram, and a scan of the backends only when the table changed.
    fn backend_still_up(&mut self, key: (u32, u32)) -> bool {
        let Some(s) = self.sessions.get_mut(key.0, key.1) else {
            return false;
        };
        let snapshot = self.services[self.vips[s.vip].service].snapshot.load();
        if snapshot.generation == s.table_generation {
            return true;
        }
        s.table_generation = snapshot.generation;
        snapshot
            .backends
            .iter()
            .any(|b| b.address == s.backend && b.keeps_flows())
    }

    /// Starts closing a session: it stops receiving client datagrams and gives its place in
    /// the service's limits back at once, and is freed when its operations have completed.
    /// So a closing session no longer counts against `max_sessions` or the client's limit,
    /// although its socket stays open until its poll's cancel completes.
    fn close(&mut self, ctx: &mut Ctx, key: (u32, u32), end: End) {
        let Some(s) = self.sessions.get_mut(key.0, key.1) else {
            return;
        };
        if s.closing.is_some() {
            return;
        }
        s.closing = Some(end);
        // Not in `finish`: the cancel completes in a later batch, and the client's next
        // datagram, often in this one, opens the session that replaces this one. Admitted
        // against a place still held, it would be refused, and the refusal remembered for a
        // second. A refusal of the client remembered earlier (another of its ports, over
        // the limit) no longer stands either.
        if let Some(admission) = s.admission.take() {
            let service_at = self.vips[s.vip].service;
            self.services[service_at].clients.release(admission);
            self.refusals.forget(service_at, s.client.ip());
        }
        if self.by_client.get(&(s.vip, s.client)) == Some(&key) {
            self.by_client.remove(&(s.vip, s.client));
        }
        if s.in_flight & bit(OP_POLL) != 0 {
            ctx.ring
                .cancel(Token::entry(Kind::Session, OP_POLL, key.0, key.1));
        }
        if s.in_flight == 0 {
            self.finish(ctx, key.0, key.1);
        }
    }

    fn finish(&mut self, ctx: &mut Ctx, index: u32, generation: u32) {
        let Some(s) = self.sessions.remove(index, generation) else {
            return;
        };
        if self.by_client.get(&(s.vip, s.client)) == Some(&(index, generation)) {
            self.by_client.remove(&(s.vip, s.client));
        }
        s.stats.closed();
        ctx.shared.active.fetch_sub(1, Ordering::Relaxed);
        let info = &self.services[self.vips[s.vip].service];
        // Still held only when the session is cut without closing (`abandon`).
        if let Some(admission) = s.admission {
            info.clients.release(admission);
        }
        if s.access_log {
            access::log(&access::Line {
                protocol: Protocol::Udp,
                service: &info.name,
                client: s.client,
                backend: Some(s.backend),
                bytes: s.bytes,
                duration: ctx.now.saturating_duration_since(s.started),
                end: s.closing.unwrap_or(End::Error),
            });
        }
        let v = &mut self.vips[s.vip];
        v.sessions = v.sessions.saturating_sub(1);
        if v.sessions == 0 && self.services[v.service].removed() {
            self.close_vip(ctx, s.vip);
        }
    }

    /// Ends sessions idle for their service's `idle_timeout` (after a hand-over, for at most
    /// [`HANDED_OVER_IDLE`]), looking at [`SWEEP_BUDGET`] session slots, or an eighth of
    /// them when that is more.
    pub(super) fn sweep(&mut self, ctx: &mut Ctx) {
        self.refusals.prune(ctx.now);
        let (services, vips, now) = (&self.services, &self.vips, ctx.now);
        // Handed over: the clients' datagrams go to the new daemon; a session here only
        // waits for its backend's last replies.
        let cap = if ctx
            .shared
            .handed_over
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            HANDED_OVER_IDLE
        } else {
            Duration::MAX
        };
        let budget = self.sessions.sweep_budget(SWEEP_BUDGET);
        let idle = self
            .sessions
            .sweep_due(&mut self.sweep_cursor, budget, |s| {
                let limit = services[vips[s.vip].service].idle_timeout.min(cap);
                let idle =
                    s.closing.is_none() && now.saturating_duration_since(s.last_active) >= limit;
                if idle {
                    tracing::debug!(
                        "session {} -> {} idle for {limit:?}; closing it",
                        s.client,
                        s.backend
                    );
                }
                idle.then_some(())
            });
        for (index, generation, ()) in idle {
            self.close(ctx, (index, generation), End::Idle);
        }
    }

    /// Shutdown began: no new sessions (enforced through `ctx.draining`); VIP sockets stay
    /// open so backends' replies still reach clients until the sessions end. After a
    /// hand-over they stop reading at once: the new daemon reads them, and a client's
    /// datagram read here would find no session and be dropped.
    pub(super) fn stop_accepting(&mut self, ctx: &mut Ctx) {
        if !ctx
            .shared
            .handed_over
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        for (i, v) in self.vips.iter_mut().enumerate() {
            v.deaf = true;
            if v.in_flight & bit(OP_POLL) != 0 {
                ctx.ring
                    .cancel(Token::entry(Kind::Vip, OP_POLL, i as u32, 0));
            }
        }
    }

    /// While draining: closes the VIP sockets once no session is left.
    pub(super) fn close_vips_when_idle(&mut self, ctx: &mut Ctx) {
        if self.sessions.is_empty() {
            self.close_vips(ctx);
        }
    }

    fn close_vips(&mut self, ctx: &mut Ctx) {
        for i in 0..self.vips.len() {
            self.close_vip(ctx, i);
        }
    }

    /// Closes VIP socket `i`: at once if nothing of it is in flight, else when the last
    /// completion arrives.
    fn close_vip(&mut self, ctx: &mut Ctx, i: usize) {
        let v = &mut self.vips[i];
        if v.fd.is_none() || v.closing {
            return;
        }
        v.closing = true;
        if v.in_flight & bit(OP_POLL) != 0 {
            ctx.ring
                .cancel(Token::entry(Kind::Vip, OP_POLL, i as u32, 0));
        }
        if v.in_flight == 0 {
            v.fd = None;
        }
    }

    /// The drain deadline passed: ends every session and closes the VIP sockets. Returns
    /// how many sessions were open.
    pub(super) fn cut_off(&mut self, ctx: &mut Ctx) -> u64 {
        let cut = self.close_all(ctx, |s| s.closing.is_none(), End::DrainCut);
        self.close_vips(ctx);
        cut
    }

    /// Starts closing the sessions for which `pick` holds, with `end`; returns how many.
    fn close_all(&mut self, ctx: &mut Ctx, pick: impl FnMut(&Session) -> bool, end: End) -> u64 {
        let keys = self.sessions.keys_where(pick);
        for &key in &keys {
            self.close(ctx, key, end);
        }
        keys.len() as u64
    }

    /// The worker is exiting with sessions left: ends them now and returns how many there
    /// were.
    pub(super) fn abandon(&mut self, ctx: &mut Ctx) -> u64 {
        let keys = self.sessions.keys();
        for &(index, generation) in &keys {
            self.finish(ctx, index, generation);
        }
        for v in &mut self.vips {
            v.fd = None;
        }
        keys.len() as u64
    }
}
