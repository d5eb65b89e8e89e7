//! Sockets of closed TCP connections that are reset only once their peer has what was
//! written to them, and the measure both this and the sweep use of whether a peer still
//! takes bytes ([`Progress`]).
//!
//! When one peer of a relayed connection resets it, the proxy resets the other one too, as a
//! direct connection would show it. But a reset (`SO_LINGER` 0) throws away the socket's
//! send queue: bytes the proxy already handed to the kernel for a slow client, the tail of
//! an answer the backend sent before its reset. On a direct connection the client would
//! read them all, then meet the reset. So the surviving peer's socket is kept here until its
//! send queue is acknowledged, and reset then.
//!
//! Bounded three ways, so a peer that stopped reading holds nothing for long: a socket whose
//! peer acknowledged nothing for [`STALL`] is reset (unless the socket is resending after a
//! retransmission timeout: a lossy path, not a peer that stopped), none waits longer than
//! [`MAX_FLUSH`], and at most [`MAX_FLUSHING`] wait at once per worker, fewer under a low
//! open file limit (past that, a socket is reset at once, losing its queue as before). From
//! the drain deadline on ([`Flushing::stop`]) nothing waits.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use super::sys;

/// How long a peer may acknowledge nothing before it counts as no longer reading, unless the
/// socket is resending after a retransmission timeout (`sys::retransmitting`).
pub(super) const STALL: Duration = Duration::from_secs(2);
/// The longest a socket waits for its peer to take its send queue.
pub(super) const MAX_FLUSH: Duration = Duration::from_secs(30);
/// The most sockets waiting at once, per worker.
pub(super) const MAX_FLUSHING: usize = 1024;
/// Each waiting socket holds a descriptor: at most one per this many of the worker's part
/// of the open file limit.
const FDS_PER_FLUSHING: u64 = 16;

/// Whether a peer still takes the bytes written to it, from samples of how many it has
/// acknowledged (any count that grows as it acknowledges: bytes written less `SIOCOUTQ`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Progress {
    acked: i64,
    since: Instant,
}

impl Progress {
    /// The first sample, `acked` at `now`.
    pub(super) fn new(acked: i64, now: Instant) -> Progress {
        Progress { acked, since: now }
    }

    /// Takes the sample `acked` at `now`; returns whether the peer acknowledged nothing for
    /// [`STALL`] or longer.
    pub(super) fn stalled(&mut self, acked: i64, now: Instant) -> bool {
        if acked > self.acked {
            *self = Progress::new(acked, now);
            return false;
        }
        now.saturating_duration_since(self.since) >= STALL
    }
}

/// A socket waiting for its send queue to be acknowledged.
struct Entry {
    socket: OwnedFd,
    progress: Progress,
    /// When it began to wait.
    since: Instant,
}

/// A worker's sockets waiting to be reset (see the module's doc).
pub(super) struct Flushing {
    entries: Vec<Entry>,
    /// The most that may wait at once.
    max: usize,
    /// Set at the drain deadline: every socket is reset at once from then on.
    stopped: bool,
}

/// The sample of a waiting socket: its queue shrinks as its peer acknowledges.
fn acked(queued: u32) -> i64 {
    -i64::from(queued)
}

impl Flushing {
    /// None waiting; at most [`MAX_FLUSHING`], or one per [`FDS_PER_FLUSHING`] descriptors of
    /// `fd_share` (the worker's part of the open file limit) when that is fewer.
    pub(super) fn new(fd_share: u64) -> Flushing {
        let by_fds = usize::try_from(fd_share / FDS_PER_FLUSHING).unwrap_or(usize::MAX);
        Flushing {
            entries: Vec::new(),
            max: MAX_FLUSHING.min(by_fds),
            stopped: false,
        }
    }

    /// Resets `socket` now if its peer has all it was sent, or is gone, or too many wait, or
    /// the drain deadline passed; otherwise keeps it until [`Flushing::sweep`] finds its queue
    /// acknowledged.
    pub(super) fn reset_after_queue(&mut self, socket: OwnedFd, now: Instant) {
        let queued = sys::unacknowledged(socket.as_fd());
        if self.stopped
            || queued == 0
            || self.entries.len() >= self.max
            || sys::tcp_failed(socket.as_fd())
        {
            reset(socket);
            return;
        }
        self.entries.push(Entry {
            socket,
            progress: Progress::new(acked(queued), now),
            since: now,
        });
    }

    /// Once per sweep tick: resets each socket whose queue was acknowledged, whose peer is
    /// gone, whose peer acknowledged nothing for [`STALL`] (and that is not resending after a
    /// retransmission timeout), or that waited [`MAX_FLUSH`].
    pub(super) fn sweep(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.entries.len() {
            let entry = &mut self.entries[i];
            let queued = sys::unacknowledged(entry.socket.as_fd());
            let done = queued == 0
                || (entry.progress.stalled(acked(queued), now)
                    && !sys::retransmitting(entry.socket.as_fd()))
                || now.saturating_duration_since(entry.since) >= MAX_FLUSH
                || sys::tcp_failed(entry.socket.as_fd());
            if done {
                reset(self.entries.swap_remove(i).socket);
            } else {
                i += 1;
            }
        }
    }

    /// Sockets waiting.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The drain deadline passed, or the worker exits: resets every socket waiting, and every
    /// one handed over from now on at once.
    pub(super) fn stop(&mut self) {
        self.stopped = true;
        for entry in self.entries.drain(..) {
            reset(entry.socket);
        }
    }
}

impl Drop for Flushing {
    fn drop(&mut self) {
        self.stop();
    }
}

fn reset(socket: OwnedFd) {
    sys::set_reset_on_close(&socket);
    drop(socket);
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// A loopback connection whose accepted side holds unacknowledged bytes: its peer, with a
    /// small window, has read nothing. Returns (accepted side, peer, bytes written).
    fn queued_pair() -> (OwnedFd, TcpStream, usize) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        peer.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        peer.connect(&listener.local_addr().expect("address").into())
            .expect("connect");
        let (mut side, _) = listener.accept().expect("accept");
        side.set_nonblocking(true).expect("non-blocking");
        let chunk = [7u8; 16 * 1024];
        let mut written = 0;
        // Bounded: the peer's window and this side's send buffer fill within a few MB.
        for _ in 0..4096 {
            match side.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        assert!(
            sys::unacknowledged(side.as_fd()) > 0,
            "bytes wait in the send queue"
        );
        (OwnedFd::from(side), peer.into(), written)
    }

    /// Reads from `peer` until the connection ends (at most 1,024 reads) and asserts that it
    /// ended with a reset (`what`: the case, for the message).
    fn assert_reset(peer: &mut TcpStream, what: &str) {
        peer.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut buf = [0u8; 64 * 1024];
        let mut end = Ok(0);
        for _ in 0..1024 {
            end = peer.read(&mut buf);
            if !matches!(end, Ok(n) if n > 0) {
                break;
            }
        }
        assert!(
            matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{what}: {end:?}"
        );
    }

    #[test]
    fn a_socket_whose_peer_reads_everything_is_reset_after_the_last_byte() {
        let (side, mut peer, written) = queued_pair();
        let mut flushing = Flushing::new(1 << 20);
        flushing.reset_after_queue(side, Instant::now());
        assert_eq!(flushing.len(), 1, "kept while its queue waits");
        peer.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut got = vec![0u8; written];
        peer.read_exact(&mut got)
            .expect("every byte written before the reset");
        for _ in 0..100 {
            flushing.sweep(Instant::now());
            if flushing.len() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(flushing.len(), 0, "reset once its queue was taken");
        assert_reset(&mut peer, "the peer meets the reset after the bytes");
    }

    #[test]
    fn a_socket_whose_peer_reads_nothing_is_reset_once_it_stalled() {
        let (side, mut peer, _) = queued_pair();
        let mut flushing = Flushing::new(1 << 20);
        let start = Instant::now();
        flushing.reset_after_queue(side, start);
        flushing.sweep(start + STALL / 2);
        assert_eq!(flushing.len(), 1, "not yet: it may still read");
        flushing.sweep(start + STALL);
        assert_eq!(
            flushing.len(),
            0,
            "nothing acknowledged for the stall time: reset"
        );
        assert_reset(&mut peer, "the peer is reset");
    }

    #[test]
    fn a_socket_with_nothing_queued_or_past_the_deadline_is_reset_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut peer =
            TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (side, _) = listener.accept().expect("accept");
        let mut flushing = Flushing::new(1 << 20);
        flushing.reset_after_queue(OwnedFd::from(side), Instant::now());
        assert_eq!(flushing.len(), 0);
        assert_reset(&mut peer, "nothing queued: reset at once");

        let (side, mut peer, _) = queued_pair();
        flushing.stop();
        flushing.reset_after_queue(side, Instant::now());
        assert_eq!(flushing.len(), 0, "nothing waits after the drain deadline");
        assert_reset(&mut peer, "after the drain deadline: reset at once");
    }

    #[test]
    fn progress_is_a_growing_count_and_a_stall_the_time_without_growth() {
        let t = Instant::now();
        let mut p = Progress::new(10, t);
        assert!(!p.stalled(10, t + STALL / 2));
        assert!(!p.stalled(11, t + STALL), "it grew: the clock starts again");
        assert!(!p.stalled(11, t + STALL + STALL / 2));
        assert!(p.stalled(11, t + STALL * 2), "nothing for the stall time");
    }
}
