//! Sockets of closed TCP connections that are reset only once their peer has what was
//! written to them.
//!
//! When one peer of a relayed connection resets it, the proxy resets the other one too, as a
//! direct connection would show it. But a reset (`SO_LINGER` 0) throws away the socket's
//! send queue: bytes the proxy already handed to the kernel for a slow client, the tail of
//! an answer the backend sent before its reset. On a direct connection the client would
//! read them all, then meet the reset. So the surviving peer's socket is kept here until its
//! send queue is acknowledged, and reset then.
//!
//! Bounded three ways, so a peer that stopped reading holds nothing for long: a socket whose
//! queue did not shrink for one sweep tick is reset at that tick, none stays longer than
//! [`MAX_FLUSH`], and at most [`MAX_FLUSHING`] wait at once per worker (past that, a socket
//! is reset at once, losing its queue as before).

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use super::sys;

/// The longest a socket waits for its peer to take its send queue.
pub(super) const MAX_FLUSH: Duration = Duration::from_secs(30);
/// The most sockets waiting at once, per worker (each holds a file descriptor).
pub(super) const MAX_FLUSHING: usize = 1024;

/// A socket waiting for its send queue to be acknowledged.
struct Entry {
    socket: OwnedFd,
    /// Its unacknowledged bytes at the last look.
    queued: u32,
    /// When it began to wait.
    since: Instant,
}

/// A worker's sockets waiting to be reset (see the module's doc).
#[derive(Default)]
pub(super) struct Flushing {
    entries: Vec<Entry>,
}

impl Flushing {
    /// Resets `socket` now if its peer has all it was sent (or is gone, or too many wait);
    /// otherwise keeps it until [`Flushing::sweep`] finds its queue acknowledged.
    pub(super) fn reset_after_queue(&mut self, socket: OwnedFd, now: Instant) {
        let queued = sys::unacknowledged(socket.as_fd());
        if queued == 0
            || self.entries.len() >= MAX_FLUSHING
            || sys::peer_gone(socket.as_fd(), false)
        {
            reset(socket);
            return;
        }
        self.entries.push(Entry {
            socket,
            queued,
            since: now,
        });
    }

    /// Once per sweep tick: resets each socket whose queue was acknowledged, whose peer is
    /// gone, whose queue did not shrink since the last tick, or that waited [`MAX_FLUSH`].
    pub(super) fn sweep(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.entries.len() {
            let entry = &mut self.entries[i];
            let queued = sys::unacknowledged(entry.socket.as_fd());
            let done = queued == 0
                || queued >= entry.queued
                || now.saturating_duration_since(entry.since) >= MAX_FLUSH
                || sys::peer_gone(entry.socket.as_fd(), false);
            if done {
                reset(self.entries.swap_remove(i).socket);
            } else {
                entry.queued = queued;
                i += 1;
            }
        }
    }

    /// Sockets waiting.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Resets every socket waiting (the drain deadline, or the worker exits).
    pub(super) fn reset_all(&mut self) {
        for entry in self.entries.drain(..) {
            reset(entry.socket);
        }
    }
}

impl Drop for Flushing {
    fn drop(&mut self) {
        self.reset_all();
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
        assert!(unacknowledged_of(&side) > 0, "bytes wait in the send queue");
        (OwnedFd::from(side), peer.into(), written)
    }

    fn unacknowledged_of(s: &TcpStream) -> u32 {
        sys::unacknowledged(s.as_fd())
    }

    #[test]
    fn a_socket_whose_peer_reads_everything_is_reset_after_the_last_byte() {
        let (side, mut peer, written) = queued_pair();
        let mut flushing = Flushing::default();
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
        let mut more = [0u8; 1];
        let end = peer.read(&mut more);
        assert!(
            matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "the peer meets the reset after the bytes: {end:?}"
        );
    }

    #[test]
    fn a_socket_whose_peer_reads_nothing_is_reset_at_the_next_sweep() {
        let (side, mut peer, _) = queued_pair();
        let mut flushing = Flushing::default();
        flushing.reset_after_queue(side, Instant::now());
        assert_eq!(flushing.len(), 1);
        flushing.sweep(Instant::now());
        assert_eq!(flushing.len(), 0, "no progress for a tick: reset");
        peer.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut buf = [0u8; 64 * 1024];
        // Bounded: what the peer had received, then the reset.
        let mut end = Ok(0);
        for _ in 0..1024 {
            end = peer.read(&mut buf);
            if !matches!(end, Ok(n) if n > 0) {
                break;
            }
        }
        assert!(
            matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "the peer is reset: {end:?}"
        );
    }

    #[test]
    fn a_socket_with_nothing_queued_is_reset_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut peer =
            TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (side, _) = listener.accept().expect("accept");
        let mut flushing = Flushing::default();
        flushing.reset_after_queue(OwnedFd::from(side), Instant::now());
        assert_eq!(flushing.len(), 0);
        peer.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let end = peer.read(&mut [0u8; 1]);
        assert!(
            matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{end:?}"
        );
    }
}
