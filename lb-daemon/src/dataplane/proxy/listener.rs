//! A worker's TCP listeners: their multishot accepts, the back-off after accept failures,
//! and their closing (service removed, shutdown).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc::Sender;

use super::ctx::Ctx;
use super::ring::{Completion, Kind, Token};
use super::{sys, LogLimit, ServiceInfo};

/// Accept failures in a row after which a listener waits for the next sweep to re-arm.
const MAX_ACCEPT_FAILURES: u32 = 8;

struct Listener {
    /// Index into the worker's TCP services.
    service: usize,
    fd: Option<OwnedFd>,
    /// The multishot accept is in flight.
    armed: bool,
    /// Shutting down: close once the accept is no longer in flight.
    closing: bool,
    /// Accept failed for lack of resources, or kept failing: re-arm at the next sweep, not
    /// in a hot loop.
    backoff: bool,
    /// Accept failures since the last accepted connection.
    failures: u32,
    /// Held while a service removal waits for this listener to close; dropped with `fd`.
    on_close: Option<Sender<()>>,
    /// Its SYN filter was on at the last look ([`Listeners::drop_syns`]).
    dropping_syns: bool,
    /// Closing, but its socket lives on for another service ([`Listeners::close_service`]).
    kept: bool,
}

impl Listener {
    /// Closes the socket (nothing of it may be in flight) and tells whoever waits for it.
    fn close_fd(&mut self) {
        self.fd = None;
        self.on_close = None;
    }
}

/// A worker's listening sockets, one per TCP service; the index of one is the `index` of
/// its accept's token.
pub(super) struct Listeners {
    list: Vec<Listener>,
}

impl Listeners {
    /// No listener yet.
    pub(super) fn new() -> Listeners {
        Listeners { list: Vec::new() }
    }

    /// Adds `fd`, listening for service `service` (an index into the worker's TCP services);
    /// returns its index, for [`Listeners::arm`]. A SYN filter the socket carries is taken
    /// off: a listener taken over from an older daemon keeps the filter that daemon set
    /// ([`Listeners::drop_syns`]), which this one would otherwise never know to remove.
    pub(super) fn push(&mut self, service: usize, fd: OwnedFd) -> usize {
        if let Err(e) = sys::drop_syns(fd.as_fd(), false) {
            tracing::warn!("a listener may still drop SYNs (removing its filter failed: {e})");
        }
        self.list.push(Listener {
            service,
            fd: Some(fd),
            armed: false,
            closing: false,
            backoff: false,
            failures: 0,
            on_close: None,
            dropping_syns: false,
            kept: false,
        });
        self.list.len() - 1
    }

    /// Makes service `service`'s listener drop the SYNs that reach it (`on`) or take them
    /// again ([`sys::drop_syns`]), unless the socket already does, as the kernel says
    /// ([`sys::has_filter`]): after an upgrade the other daemon may have changed it. A
    /// listener closing or closed is left alone. Returns `Ok(true)` when a filter changed,
    /// or the first `getsockopt(2)` / `setsockopt(2)` error (the listener is then as it was;
    /// a worker has one listener per service).
    pub(super) fn drop_syns(&mut self, service: usize, on: bool) -> io::Result<bool> {
        let mut changed = false;
        for l in &mut self.list {
            let Some(fd) = &l.fd else {
                continue;
            };
            if l.service != service || l.closing {
                continue;
            }
            if sys::has_filter(fd.as_fd())? != on {
                sys::drop_syns(fd.as_fd(), on)?;
                changed = true;
            }
            l.dropping_syns = on;
        }
        Ok(changed)
    }

    /// Whether the listener of service `service` dropped SYNs at the last look: a connection
    /// it accepts then carries the filter ([`sys::drop_syns`]).
    pub(super) fn drops_syns_of(&self, service: usize) -> bool {
        (self.list.iter()).any(|l| l.service == service && l.dropping_syns && l.fd.is_some())
    }

    /// Whether some listener drops SYNs.
    pub(super) fn dropping_syns(&self) -> bool {
        self.list.iter().any(|l| l.dropping_syns && l.fd.is_some())
    }

    /// Arms every listener's accept.
    pub(super) fn start(&mut self, ctx: &mut Ctx) {
        for i in 0..self.list.len() {
            self.arm(ctx, i);
        }
    }

    /// Starts listener `i`'s multishot accept, unless it is armed, closing or closed.
    pub(super) fn arm(&mut self, ctx: &mut Ctx, i: usize) {
        let l = &mut self.list[i];
        if let (Some(fd), false, false) = (&l.fd, l.armed, l.closing) {
            let token = Token::entry(Kind::Accept, 0, i as u32, 0);
            ctx.ring.accept_multi(fd.as_raw_fd(), token);
            l.armed = true;
            l.backoff = false;
        }
    }

    /// Re-arms the listeners that backed off after accept failures (called each sweep).
    pub(super) fn rearm_backed_off(&mut self, ctx: &mut Ctx) {
        for i in 0..self.list.len() {
            if self.list[i].backoff {
                self.arm(ctx, i);
            }
        }
    }

    /// Closes the listener(s) of service `service` (after cancelling the accept);
    /// `closed` is dropped once each is closed. `kept`: another duplicate of the socket
    /// stays open for the service that takes the address, so a connection this accept takes
    /// before the cancel lands is carried by `service` through its drain, not reset: the
    /// client came to an address that goes on listening.
    pub(super) fn close_service(
        &mut self,
        ctx: &mut Ctx,
        service: usize,
        closed: &Sender<()>,
        kept: bool,
    ) {
        for (i, l) in self.list.iter_mut().enumerate() {
            if l.service != service || l.fd.is_none() {
                continue;
            }
            l.closing = true;
            l.kept = kept;
            if l.armed {
                l.on_close = Some(closed.clone());
                ctx.ring.cancel(Token::entry(Kind::Accept, 0, i as u32, 0));
            } else {
                l.close_fd();
            }
        }
    }

    /// Shutdown began: closes every listener (after cancelling its accept).
    pub(super) fn stop_accepting(&mut self, ctx: &mut Ctx) {
        for (i, l) in self.list.iter_mut().enumerate() {
            l.closing = true;
            if l.armed {
                ctx.ring.cancel(Token::entry(Kind::Accept, 0, i as u32, 0));
            } else {
                l.close_fd();
            }
        }
    }

    /// Whether every listener is closed.
    pub(super) fn all_closed(&self) -> bool {
        self.list.iter().all(|l| l.fd.is_none())
    }

    /// The worker is exiting: closes every listener now, whatever is in flight.
    pub(super) fn close_all(&mut self) {
        for l in &mut self.list {
            l.close_fd();
        }
    }

    /// A multishot accept completed. Pushes onto `accepted` each new client socket with its
    /// service (an index into `services`) that is to be carried; a client accepted while
    /// closing or draining is reset instead, unless the listener was handed over to a new
    /// daemon or kept for another service (then it is carried). An accept error is logged
    /// (a shortage through `resource_log`) and, for a shortage or a run of failures, makes
    /// the listener wait for the next sweep. Re-arms or closes the listener as due; a
    /// handed-over listener's queue is emptied into `accepted` before it closes (see
    /// [`take_queue`]).
    pub(super) fn on_accept(
        &mut self,
        ctx: &mut Ctx,
        c: Completion,
        services: &[ServiceInfo],
        resource_log: &mut LogLimit,
        accepted: &mut Vec<(usize, OwnedFd)>,
    ) {
        let index = c.token.index as usize;
        let Some(l) = self.list.get_mut(index) else {
            return;
        };
        if !c.more {
            l.armed = false;
        }
        // The flag is read only while stopping: an accept in service reads nothing more.
        let handed_over = || {
            ctx.shared
                .handed_over
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        if c.result >= 0 {
            l.failures = 0;
            // SAFETY: a successful accept's result is a new descriptor that we now own.
            let client = unsafe { OwnedFd::from_raw_fd(c.result) };
            // After a hand-over the listener lives on in the new daemon, and a kept one in
            // the service that takes its address: a connection this one took from its queue
            // before the cancel landed is carried through the drain like any other, not
            // reset (the new owner would have served it).
            if ((l.closing && !l.kept) || ctx.draining) && !handed_over() {
                sys::set_reset_on_close(&client);
            } else {
                accepted.push((l.service, client));
            }
        } else if c.result != -libc::ECANCELED {
            let err = io::Error::from_raw_os_error(-c.result);
            let name = &services[l.service].name;
            match -c.result {
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                    if let Some(also) = resource_log.allow(ctx.now) {
                        tracing::warn!("service {name}: cannot accept connections: {err}{also}");
                    }
                    l.backoff = true;
                }
                _ => {
                    tracing::debug!("service {name}: accept failed: {err}");
                    l.failures += 1;
                    // A persistent error (e.g. no multishot accept in this kernel) must not
                    // spin; a passing one (a client gone before accept) re-arms at once.
                    if l.failures >= MAX_ACCEPT_FAILURES {
                        if let Some(also) = resource_log.allow(ctx.now) {
                            tracing::warn!("service {name}: accept keeps failing: {err}{also}");
                        }
                        l.backoff = true;
                    }
                }
            }
        }
        if l.closing {
            if !l.armed {
                if handed_over() {
                    take_queue(l, accepted);
                }
                l.close_fd();
            }
        } else if !l.armed && !l.backoff {
            self.arm(ctx, index);
        }
    }
}

/// Most connections [`take_queue`] takes: the kernel's default `somaxconn`, the longest
/// accept queue a listener has unless the host raised it.
const MAX_QUEUE_TAKEN: usize = 4096;

/// Takes what waits in the queue of listener `l`, whose accept was just cancelled after a
/// hand-over, into `accepted` (carried through the drain), up to [`MAX_QUEUE_TAKEN`].
///
/// Why: io_uring's accept waits on the socket as an exclusive waiter (`EPOLLEXCLUSIVE`),
/// and a new connection wakes one waiter only. Between the hand-over and the cancel, the
/// old daemon's accept and the new daemon's both wait on the same socket; a wake-up that
/// went to the old one as it was being cancelled is lost with it, and the connection would
/// wait in the queue, unseen by the new daemon, until another connection arrived: with few
/// clients, until they time out. Once the cancel completed no wake-up can go here any more,
/// so what is queued now is taken here and what comes later wakes the new daemon.
fn take_queue(l: &Listener, accepted: &mut Vec<(usize, OwnedFd)>) {
    let Some(fd) = &l.fd else {
        return;
    };
    // The daemon binds its listeners non-blocking; one that is not (handed over by
    // something else) cannot be emptied without the risk of waiting here for good.
    if !sys::is_nonblocking(fd.as_fd()) {
        return;
    }
    for _ in 0..MAX_QUEUE_TAKEN {
        match sys::accept_now(fd.as_fd()) {
            Ok(client) => accepted.push((l.service, client)),
            // Empty (`EAGAIN`), or a client gone before it was taken (`ECONNABORTED`): the
            // new daemon's accept sees whatever comes next.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;

    /// Whether a connection to `addr` completes within `wait`.
    fn connects(addr: SocketAddr, wait: Duration) -> bool {
        TcpStream::connect_timeout(&addr, wait).is_ok()
    }

    /// What `drop_syns` does to a listener on `at` (IPv4 or IPv6 loopback, port 0).
    fn drops_syns_and_the_new_owner_takes_the_filter_off(at: &str) {
        let listener = TcpListener::bind(at).expect("bind a listener");
        let addr = listener.local_addr().expect("its address");
        let fd = OwnedFd::from(listener);
        assert!(connects(addr, Duration::from_secs(2)), "a plain listener");
        assert!(!sys::has_filter(fd.as_fd()).expect("asked"));
        sys::drop_syns(fd.as_fd(), true).expect("the filter goes on");
        assert!(sys::has_filter(fd.as_fd()).expect("asked"));
        // The client's SYN goes unanswered: the kernel would resend it after a second.
        assert!(
            !connects(addr, Duration::from_millis(300)),
            "a SYN reached the listener through its filter"
        );
        // As a listener inherited from an older daemon that left its filter on.
        let mut listeners = Listeners::new();
        listeners.push(0, fd);
        assert!(!listeners.dropping_syns());
        assert!(
            connects(addr, Duration::from_secs(2)),
            "the new owner took SYNs again"
        );
        assert!(listeners.drop_syns(0, true).expect("on"), "turned on");
        assert!(!listeners.drop_syns(0, true).expect("on"), "already on");
        assert!(listeners.dropping_syns() && listeners.drops_syns_of(0));
        assert!(!connects(addr, Duration::from_millis(300)), "dropped again");
        assert!(listeners.drop_syns(0, false).expect("off"), "turned off");
        assert!(connects(addr, Duration::from_secs(2)), "taken again");
    }

    #[test]
    fn a_listener_that_drops_syns_answers_none_and_a_new_owner_takes_the_filter_off() {
        drops_syns_and_the_new_owner_takes_the_filter_off("127.0.0.1:0");
        drops_syns_and_the_new_owner_takes_the_filter_off("[::1]:0");
    }

    #[test]
    fn the_syn_filter_lets_an_open_connections_segments_through_both_ways() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a listener");
        let mut client =
            TcpStream::connect(listener.local_addr().expect("its address")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        sys::drop_syns(server.as_fd(), true).expect("the filter goes on");
        let timeout = Some(Duration::from_secs(2));
        client.set_read_timeout(timeout).expect("timeout");
        server.set_read_timeout(timeout).expect("timeout");
        let mut got = [0u8; 5];
        client.write_all(b"hello").expect("send");
        server
            .read_exact(&mut got)
            .expect("data reaches the filtered socket");
        server.write_all(b"world").expect("send");
        client
            .read_exact(&mut got)
            .expect("its acknowledgements and data flow");
        assert_eq!(&got, b"world");
        drop(client);
        assert_eq!(server.read(&mut got).expect("the FIN passes"), 0);
    }
}
