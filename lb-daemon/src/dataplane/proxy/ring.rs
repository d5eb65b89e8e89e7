//! A worker's io_uring: typed submissions, completion tokens, and the SQ-full and CQ-overflow
//! handling, so the TCP and UDP code never touches raw SQEs or pointers.
//!
//! Memory rule: every operation here either references no user memory (poll, splice, accept,
//! cancel, nop) or references it only until submission: the ring requires
//! `IORING_FEAT_SUBMIT_STABLE` (Linux 5.5+), under which the kernel copies a connect's address
//! and a timeout's timespec while preparing the SQE inside `io_uring_enter`. Those values are
//! kept in a staging area until the SQEs that point at them have been submitted. So an
//! operation in flight never points into memory the proxy could free or move.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::SockAddr;

use super::slab::GENERATION_MASK;

/// What a completion belongs to: the top 4 bits of its `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// Nothing to do (cancel requests).
    Ignore = 0,
    /// The shutdown eventfd became readable.
    Wake = 1,
    /// The periodic idle sweep.
    Sweep = 2,
    /// The drain deadline.
    Deadline = 3,
    /// A TCP listener's multishot accept; `index` is the listener.
    Accept = 4,
    /// An operation of a TCP connection; `index`/`generation` name it, `op` says which.
    Conn = 5,
    /// A UDP VIP socket; `index` is the socket, `op` says which operation.
    Vip = 6,
    /// A UDP session; `index`/`generation` name it, `op` says which operation.
    Session = 7,
}

/// The `user_data` of an operation: kind (4 bits), op (4 bits), generation (24 bits),
/// index (32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Token {
    /// What the completion belongs to.
    pub kind: Kind,
    /// Which operation of the entry, `0..16`.
    pub op: u8,
    /// The entry's generation (see [`super::slab`]).
    pub generation: u32,
    /// The entry's index.
    pub index: u32,
}

impl Token {
    /// A token for an entry-less completion (wake, sweep, ...).
    pub(super) fn of(kind: Kind) -> Token {
        Token {
            kind,
            op: 0,
            generation: 0,
            index: 0,
        }
    }

    /// A token for operation `op` of entry `(index, generation)`.
    pub(super) fn entry(kind: Kind, op: u8, index: u32, generation: u32) -> Token {
        Token {
            kind,
            op,
            generation,
            index,
        }
    }

    fn encode(self) -> u64 {
        (self.kind as u64) << 60
            | u64::from(self.op & 0xf) << 56
            | u64::from(self.generation & GENERATION_MASK) << 32
            | u64::from(self.index)
    }

    /// Decodes a completion's `user_data`; unknown kinds decode as [`Kind::Ignore`].
    pub(super) fn decode(user_data: u64) -> Token {
        let kind = match user_data >> 60 {
            1 => Kind::Wake,
            2 => Kind::Sweep,
            3 => Kind::Deadline,
            4 => Kind::Accept,
            5 => Kind::Conn,
            6 => Kind::Vip,
            7 => Kind::Session,
            _ => Kind::Ignore,
        };
        Token {
            kind,
            op: ((user_data >> 56) & 0xf) as u8,
            generation: ((user_data >> 32) as u32) & GENERATION_MASK,
            index: user_data as u32,
        }
    }
}

/// One completion, copied out of the CQ.
#[derive(Clone, Copy, Debug)]
pub(super) struct Completion {
    /// Whose operation completed.
    pub token: Token,
    /// The operation's result: `>= 0` on success, `-errno` on failure.
    pub result: i32,
    /// Whether a multishot operation stays armed (`IORING_CQE_F_MORE`).
    pub more: bool,
}

/// SQ entries per ring; the CQ gets [`CQ_FACTOR`] times as many.
const SQ_ENTRIES: u32 = 1024;
/// Each connection can have a few operations in flight; a deep CQ makes overflow rare (and
/// the kernel keeps overflowed completions anyway, `IORING_FEAT_NODROP`).
const CQ_FACTOR: u32 = 16;
/// Attempts to make room in a full SQ before giving up on the ring as broken.
const SUBMIT_ATTEMPTS: u32 = 10_000;

/// A worker's io_uring.
pub(super) struct Ring {
    ring: IoUring,
    /// Created with `IORING_SETUP_R_DISABLED`: the worker thread enables it, becoming its
    /// single issuer.
    disabled: bool,
    /// Completions taken out of the CQ while making room to submit, handed out first by
    /// the next [`Ring::wait`].
    backlog: VecDeque<Completion>,
    /// Values the SQEs not yet submitted point at (see the module docs). Boxed: the SQEs
    /// hold their addresses, which must not move when the vectors grow.
    #[allow(clippy::vec_box)]
    staged_times: Vec<Box<types::Timespec>>,
    #[allow(clippy::vec_box)]
    staged_addrs: Vec<Box<SockAddr>>,
    /// Set when the SQ stayed full through [`SUBMIT_ATTEMPTS`] submits.
    broken: bool,
}

impl Ring {
    /// Creates a ring for one worker thread. Call [`Ring::enable`] on that thread first.
    ///
    /// Returns the `io_uring_setup` error, or `Unsupported` when the kernel lacks
    /// `IORING_FEAT_SUBMIT_STABLE` or `IORING_FEAT_NODROP`.
    pub(super) fn new() -> io::Result<Ring> {
        // Single issuer + deferred task run: completions are processed only when this
        // worker asks for them, in batches, without cross-CPU wakeups.
        let tuned = IoUring::builder()
            .setup_cqsize(SQ_ENTRIES * CQ_FACTOR)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled()
            .build(SQ_ENTRIES);
        let (ring, disabled) = match tuned {
            Ok(ring) => (ring, true),
            Err(_) => (
                IoUring::builder()
                    .setup_cqsize(SQ_ENTRIES * CQ_FACTOR)
                    .build(SQ_ENTRIES)?,
                false,
            ),
        };
        let params = ring.params();
        if !params.is_feature_submit_stable() || !params.is_feature_nodrop() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks SUBMIT_STABLE or NODROP (needs Linux 5.5 or newer)",
            ));
        }
        Ok(Ring {
            ring,
            disabled,
            backlog: VecDeque::new(),
            staged_times: Vec::new(),
            staged_addrs: Vec::new(),
            broken: false,
        })
    }

    /// Enables the ring on the calling thread (its single issuer) and caps its io-wq pool of
    /// unbounded workers (where splices run) at `max_io_workers`.
    pub(super) fn enable(&mut self, max_io_workers: u32) -> io::Result<()> {
        if self.disabled {
            self.ring.submitter().register_enable_rings()?;
            self.disabled = false;
        }
        // Splices never block (non-blocking sockets and pipes), so a few io-wq threads
        // suffice; the cap keeps a burst of splices from spawning hundreds of threads.
        let mut max = [0, max_io_workers];
        if let Err(e) = self.ring.submitter().register_iowq_max_workers(&mut max) {
            tracing::debug!("cannot cap io-wq workers: {e}");
        }
        Ok(())
    }

    /// Polls `fd` for `mask` (`<poll.h>` bits); `multi` keeps it armed after each event.
    pub(super) fn poll(&mut self, fd: RawFd, mask: u32, multi: bool, token: Token) {
        let entry = opcode::PollAdd::new(types::Fd(fd), mask)
            .multi(multi)
            .build()
            .user_data(token.encode());
        self.push(&[entry]);
    }

    /// Splices up to `len` bytes from `fd_in` to `fd_out` (one of them a pipe), never
    /// blocking: the caller keeps both non-blocking.
    pub(super) fn splice(&mut self, fd_in: RawFd, fd_out: RawFd, len: u32, token: Token) {
        let entry = opcode::Splice::new(types::Fd(fd_in), -1, types::Fd(fd_out), -1, len)
            .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
            .build()
            .user_data(token.encode());
        self.push(&[entry]);
    }

    /// Arms a multishot accept on listener `fd`; accepted sockets are non-blocking and
    /// close-on-exec.
    pub(super) fn accept_multi(&mut self, fd: RawFd, token: Token) {
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(token.encode());
        self.push(&[entry]);
    }

    /// Connects `fd` to `addr`, cancelled after `timeout`. Two completions follow: `connect`
    /// (0, `-errno`, or `-ECANCELED` on timeout) and `timer` (`-ETIME` when it fired,
    /// `-ECANCELED` when the connect finished first).
    pub(super) fn connect(
        &mut self,
        fd: RawFd,
        addr: SocketAddr,
        timeout: Duration,
        connect: Token,
        timer: Token,
    ) {
        let addr = Box::new(SockAddr::from(addr));
        let time = Box::new(types::Timespec::from(timeout));
        let first = opcode::Connect::new(types::Fd(fd), addr.as_ptr(), addr.len())
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(connect.encode());
        let second = opcode::LinkTimeout::new(&*time as *const types::Timespec)
            .build()
            .user_data(timer.encode());
        // Staged only once queued: `push` may submit (and clear the staging area) to make
        // room. Boxes keep their heap address when moved into the staging area.
        self.push(&[first, second]);
        self.staged_addrs.push(addr);
        self.staged_times.push(time);
    }

    /// A completion with `token` after `after`, with result `-ETIME`.
    pub(super) fn timeout(&mut self, after: Duration, token: Token) {
        let time = Box::new(types::Timespec::from(after));
        let entry = opcode::Timeout::new(&*time as *const types::Timespec)
            .build()
            .user_data(token.encode());
        // Staged only once queued, as in `connect`.
        self.push(&[entry]);
        self.staged_times.push(time);
    }

    /// Asks the kernel to cancel the operation of `target`; its completion still follows
    /// (with `-ECANCELED`, or its own result if it was already done). The cancel request's
    /// own completion is ignored.
    pub(super) fn cancel(&mut self, target: Token) {
        let entry = opcode::AsyncCancel::new(target.encode())
            .build()
            .user_data(Token::of(Kind::Ignore).encode());
        self.push(&[entry]);
    }

    /// A completion with `token` as soon as possible: resumes work cut short by a budget.
    pub(super) fn nop(&mut self, token: Token) {
        let entry = opcode::Nop::new().build().user_data(token.encode());
        self.push(&[entry]);
    }

    /// Queues `entries` together (a link chain must not be split across submissions),
    /// submitting first if the SQ lacks room.
    fn push(&mut self, entries: &[squeue::Entry]) {
        if self.broken {
            return;
        }
        let mut attempts = 0;
        loop {
            let mut sq = self.ring.submission();
            if sq.capacity() - sq.len() >= entries.len() {
                // SAFETY: the entries reference no memory, or memory held in the staging
                // area until they are submitted (module docs); their fds are kept open by
                // their owners until the operations complete.
                unsafe { sq.push_multiple(entries) }.expect("room was checked above");
                return;
            }
            drop(sq);
            attempts += 1;
            if attempts > SUBMIT_ATTEMPTS {
                // The kernel refuses every submission: the worker stops (see `is_broken`).
                tracing::error!("io_uring submission queue stuck full; stopping the worker");
                self.broken = true;
                return;
            }
            if let Err(e) = self.submit(false) {
                tracing::debug!("io_uring submit while the SQ is full: {e}");
                std::thread::yield_now();
            }
        }
    }

    /// Whether the ring refused submissions for good; operations pushed since were dropped,
    /// so the worker must stop.
    pub(super) fn is_broken(&self) -> bool {
        self.broken
    }

    /// Submits queued SQEs; when `wait`, blocks until at least one completion is available.
    /// On `EBUSY`/`EAGAIN` (completions pending, kernel short of memory) moves the CQ into
    /// the backlog so the next attempt can succeed.
    fn submit(&mut self, wait: bool) -> io::Result<()> {
        let result = self.ring.submit_and_wait(usize::from(wait));
        match result {
            Ok(_) => {
                if self.ring.submission().is_empty() {
                    self.staged_times.clear();
                    self.staged_addrs.clear();
                }
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    || e.raw_os_error() == Some(libc::EAGAIN) =>
            {
                self.drain_cq_into_backlog();
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    fn drain_cq_into_backlog(&mut self) {
        for cqe in self.ring.completion() {
            self.backlog.push_back(Completion {
                token: Token::decode(cqe.user_data()),
                result: cqe.result(),
                more: cqueue::more(cqe.flags()),
            });
        }
    }

    /// Submits everything queued, waits for at least one completion (unless some are
    /// already at hand) and appends all available completions to `out`.
    pub(super) fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        let wait = self.backlog.is_empty();
        match self.submit(wait) {
            Ok(()) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    || e.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) => return Err(e),
        }
        out.extend(self.backlog.drain(..));
        for cqe in self.ring.completion() {
            out.push(Completion {
                token: Token::decode(cqe.user_data()),
                result: cqe.result(),
                more: cqueue::more(cqe.flags()),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let t = Token::entry(Kind::Session, 3, 0xdead_beef, 0x00ab_cdef);
        assert_eq!(Token::decode(t.encode()), t);
        let t = Token::of(Kind::Wake);
        assert_eq!(Token::decode(t.encode()), t);
    }

    #[test]
    fn unknown_kinds_are_ignored() {
        assert_eq!(Token::decode(0xf << 60).kind, Kind::Ignore);
    }

    #[test]
    fn a_timeout_completes_with_its_token() {
        let mut ring = Ring::new().expect("io_uring is available on the test machine");
        ring.enable(2)
            .expect("the ring enables on its creating thread");
        let token = Token::of(Kind::Sweep);
        ring.timeout(Duration::from_millis(1), token);
        let mut out = Vec::new();
        for _ in 0..100 {
            ring.wait(&mut out).expect("io_uring_enter");
            if !out.is_empty() {
                break;
            }
        }
        assert_eq!(out.len(), 1, "one completion for one timeout");
        assert_eq!(out[0].token, token);
        assert_eq!(out[0].result, -libc::ETIME);
    }

    #[test]
    fn a_timeout_queued_into_a_full_sq_keeps_its_timespec() {
        // Making room submits and clears the staging area; the new timeout's timespec must
        // survive that. Freed memory is overwritten with a far-future time to expose a
        // dangling pointer: the timeout would then never fire and the guard would win.
        let mut ring = Ring::new().expect("io_uring is available on the test machine");
        ring.enable(2)
            .expect("the ring enables on its creating thread");
        ring.timeout(Duration::from_secs(5), Token::of(Kind::Deadline));
        for i in 1..SQ_ENTRIES {
            ring.nop(Token::entry(Kind::Conn, 0, i, 0));
        }
        let token = Token::of(Kind::Sweep);
        ring.timeout(Duration::from_millis(1), token);
        let scribble: Vec<Box<[i64; 2]>> = (0..1000).map(|_| Box::new([1 << 40, 0])).collect();
        let mut out = Vec::new();
        let mut fired = None;
        for _ in 0..10_000 {
            ring.wait(&mut out).expect("io_uring_enter");
            if let Some(c) = out
                .iter()
                .find(|c| c.token.kind == Kind::Sweep || c.token.kind == Kind::Deadline)
            {
                fired = Some(c.token.kind);
                break;
            }
            out.clear();
        }
        drop(scribble);
        assert_eq!(fired, Some(Kind::Sweep), "the 1 ms timeout must fire first");
    }

    #[test]
    fn a_full_sq_is_submitted_rather_than_dropped() {
        let mut ring = Ring::new().expect("io_uring is available on the test machine");
        ring.enable(2)
            .expect("the ring enables on its creating thread");
        let n = SQ_ENTRIES * 3;
        for i in 0..n {
            ring.nop(Token::entry(Kind::Conn, 0, i, 0));
        }
        let mut out = Vec::new();
        for _ in 0..1000 {
            ring.wait(&mut out).expect("io_uring_enter");
            if out.len() >= n as usize {
                break;
            }
        }
        assert_eq!(out.len(), n as usize, "every queued nop must complete once");
    }
}
