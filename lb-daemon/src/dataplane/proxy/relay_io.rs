//! The I/O side of a TCP connection's relay ([`super::relay`] is its pure state machine):
//! the relay's sockets, pipes and byte counts, carrying out one step of a direction, and
//! the pool of empty pipes.

use std::cell::Cell;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use socket2::SockRef;

use super::ctx::Ctx;
use super::flush::Progress;
use super::relay::{Direction, Outcome, Step};
use super::ring::Token;
use super::sys::{self, Pipe};
use super::SpliceMode;
use crate::snapshot::BackendStats;

/// Direction indices: client to backend, backend to client.
pub(super) const TO_BACKEND: usize = 0;
pub(super) const TO_CLIENT: usize = 1;

/// Poll masks.
const READABLE: u32 = (libc::POLLIN | libc::POLLRDHUP) as u32;
const WRITABLE: u32 = libc::POLLOUT as u32;

/// The most empty pipes a worker keeps for reuse (512 descriptors).
const PIPE_POOL: usize = 256;
/// A worker's pool holds at most one pipe per this many descriptors of the open file limit,
/// so that under a low limit pooled pipes never crowd out connections.
const FDS_PER_POOLED_PIPE: u64 = 64;

/// A connection's relay, once its connect succeeded: the backend socket and, each way
/// (index [`TO_BACKEND`], [`TO_CLIENT`]), a direction's state machine and its pipe.
pub(super) struct Relaying {
    pub(super) backend: OwnedFd,
    pub(super) backend_addr: SocketAddr,
    pub(super) stats: Arc<BackendStats>,
    pub(super) ways: [Direction; 2],
    pub(super) pipes: [Pipe; 2],
    /// Bytes delivered each way (index `TO_BACKEND`, `TO_CLIENT`), for the access log.
    pub(super) bytes: [u64; 2],
    /// Bytes of the PROXY protocol header not yet delivered: they are not client bytes.
    pub(super) header_left: u32,
    /// The backend stopped taking the client's bytes (writing to it failed with this errno,
    /// typically a reset after an early answer) while `TO_CLIENT` was still open: what the
    /// backend sent before is readable from its socket ahead of the error, so `TO_CLIENT` runs
    /// on to deliver it, and the connection then closes with a reset, as a direct one would.
    pub(super) backend_failed: Option<i32>,
    /// While the sweep lets a direction deliver the last bytes of a peer that is gone: the
    /// direction, and how its destination acknowledges them (see `tcp::sweep_verdict`). A
    /// `Cell`: the sweep sees connections through shared references.
    pub(super) last_bytes_of_gone_peer: Cell<Option<(usize, Progress)>>,
}

/// Empty pipes for reuse: creating one costs `pipe2` + `fcntl`, returning it two `close`s.
/// Bounded by the worker's part of the open file limit, and emptied when the worker runs out
/// of descriptors.
pub(super) struct PipePool {
    free: Vec<Pipe>,
    capacity: usize,
}

impl PipePool {
    /// An empty pool that keeps at most one pipe per [`FDS_PER_POOLED_PIPE`] descriptors of
    /// `nofile` (the worker's part of the open file limit), and never more than [`PIPE_POOL`].
    pub(super) fn new(nofile: u64) -> PipePool {
        PipePool {
            free: Vec::new(),
            capacity: (nofile / FDS_PER_POOLED_PIPE).min(PIPE_POOL as u64) as usize,
        }
    }

    fn take(&mut self, size: usize) -> io::Result<Pipe> {
        match self.free.pop() {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(size).inspect_err(|e| {
                if is_fd_shortage(e.raw_os_error()) {
                    self.shrink();
                }
            }),
        }
    }

    /// Closes every pooled pipe: the worker ran out of descriptors, which connections need
    /// more than a faster start.
    pub(super) fn shrink(&mut self) {
        self.free.clear();
    }

    /// Pipes pooled now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.free.len()
    }

    /// The two pipes of a new relay. Takes both even when the first fails, as a failure
    /// drops whatever was taken.
    pub(super) fn take_pair(&mut self, size: usize) -> io::Result<[Pipe; 2]> {
        match (self.take(size), self.take(size)) {
            (Ok(p0), Ok(p1)) => Ok([p0, p1]),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    /// Keeps `pipe` if it is empty and the pool has room; bytes left in a pipe belong to a
    /// connection that is gone, so such a pipe is closed. `known_empty`: the pipe's direction
    /// finished (it ends only with its pipe drained), so the kernel is not asked
    /// (`FIONREAD`); otherwise it is, as a cancelled splice may have left bytes in it.
    pub(super) fn give(&mut self, pipe: Pipe, known_empty: bool) {
        // Bytes of one connection in another's stream if the relay's rules were broken.
        debug_assert!(!known_empty || matches!(pipe.pending(), Ok(0)));
        if self.free.len() < self.capacity && (known_empty || matches!(pipe.pending(), Ok(0))) {
            self.free.push(pipe);
        }
    }
}

/// Whether `errno` says the process or the system is out of file descriptors.
pub(super) fn is_fd_shortage(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EMFILE | libc::ENFILE))
}

/// Performs one splice step of a relay: the one place that moves relay bytes, so a variant
/// (e.g. for benchmarks) replaces only this. Returns `None` when the result arrives later as
/// a completion with `token`, `Some(bytes or -errno)` when it is known now.
fn splice(
    ctx: &mut Ctx,
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    len: u32,
    token: Token,
) -> Option<i32> {
    match ctx.options.splice {
        SpliceMode::Uring => {
            ctx.ring
                .splice(from.as_raw_fd(), to.as_raw_fd(), len, token);
            None
        }
        SpliceMode::Syscall => Some(sys::splice(from, to, len)),
    }
}

/// Counts the bytes an `outcome` of direction `way` delivered (the PROXY protocol header
/// not included) for the access log and the backend's stats. Returns whether bytes moved
/// at all, in or out: the connection was active.
pub(super) fn count_delivered(r: &mut Relaying, way: usize, outcome: Outcome) -> bool {
    match outcome {
        Outcome::SplicedIn(n) => n > 0,
        Outcome::SplicedOut(n) if n > 0 => {
            let mut n = n as u32;
            let counter = if way == TO_BACKEND {
                let header = n.min(r.header_left);
                r.header_left -= header;
                n -= header;
                &r.stats.bytes_to_backend
            } else {
                &r.stats.bytes_from_backend
            };
            r.bytes[way] += u64::from(n);
            counter.fetch_add(u64::from(n), Ordering::Relaxed);
            true
        }
        _ => false,
    }
}

/// What became of one step of a relay direction.
pub(super) enum Next {
    /// An operation is in flight; its completion comes with the step's token.
    InFlight,
    /// The step was carried out at once, with this outcome.
    Now(Outcome),
    /// The direction finished: its destination's write side is shut down, or, when the
    /// other direction is over too, is left for the connection's close, which the caller
    /// must then do.
    Finished,
    /// The direction failed with this errno: the connection must close.
    Failed(i32),
}

/// Carries out `step` of direction `way` of relay `r`, whose client socket is `client`:
/// issues a poll or an io_uring splice (completing with `token`), or does a splice, copy or
/// half-close now.
pub(super) fn start_step(
    ctx: &mut Ctx,
    client: BorrowedFd<'_>,
    r: &Relaying,
    way: usize,
    step: Step,
    token: Token,
) -> Next {
    let (src, dst) = if way == TO_BACKEND {
        (client, r.backend.as_fd())
    } else {
        (r.backend.as_fd(), client)
    };
    let pipe = &r.pipes[way];
    let done = match step {
        Step::PollReadable => {
            ctx.ring.poll(src.as_raw_fd(), READABLE, false, token);
            None
        }
        Step::PollWritable => {
            ctx.ring.poll(dst.as_raw_fd(), WRITABLE, false, token);
            None
        }
        Step::SpliceIn(len) => {
            splice(ctx, src, pipe.write.as_fd(), len, token).map(Outcome::SplicedIn)
        }
        Step::CopyIn(len) => Some(Outcome::SplicedIn(sys::copy_into_pipe(
            src,
            pipe.write.as_fd(),
            len,
        ))),
        Step::SpliceOut(len) => {
            splice(ctx, pipe.read.as_fd(), dst, len, token).map(Outcome::SplicedOut)
        }
        Step::Finish => {
            // Half-close: the peer of `dst` reads end of file; the other direction keeps
            // flowing. When the other direction is over too, the connection closes at once
            // and `close(2)` sends this FIN (both sources are at end of file, so no unread
            // byte turns it into a reset): one system call less per connection.
            if !r.ways.iter().all(Direction::finished) {
                if let Err(e) = SockRef::from(&dst).shutdown(Shutdown::Write) {
                    tracing::debug!("shutdown(SHUT_WR) of a relayed socket: {e}");
                }
            }
            return Next::Finished;
        }
        Step::Fail(errno) => return Next::Failed(errno),
    };
    done.map_or(Next::InFlight, Next::Now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_bounded_by_the_open_file_limit_and_empties_on_a_shortage() {
        assert_eq!(PipePool::new(64).capacity, 1);
        assert_eq!(PipePool::new(1024).capacity, 16);
        assert_eq!(PipePool::new(1 << 20).capacity, PIPE_POOL);
        let mut pool = PipePool::new(128);
        let [a, b] = pool.take_pair(4096).expect("two pipes");
        let c = Pipe::new(4096).expect("a third pipe");
        pool.give(a, false);
        pool.give(b, true);
        pool.give(c, false);
        assert_eq!(pool.len(), 2, "a pool for 128 descriptors keeps 2 pipes");
        pool.shrink();
        assert_eq!(pool.len(), 0);
    }
}
