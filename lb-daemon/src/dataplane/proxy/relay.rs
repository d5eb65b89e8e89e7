//! One direction of a TCP relay (client to backend, or back) as a pure state machine:
//! `source --splice--> pipe --splice--> destination`, poll-first, with half-close.
//!
//! The machine is told what happened ([`Outcome`]) and says what to do next ([`Step`]); it
//! does no I/O, so the same machine drives io_uring splices and `splice(2)` calls, and its
//! rules are unit-tested here without sockets.
//!
//! Rules: the pipe is filled only when empty and drained completely before the source is
//! read again, so at most one operation per direction is ever in flight. Readiness is polled
//! before a splice (an io_uring splice runs in an io-wq thread: one that would block must
//! never be issued). A read that filled the request suggests more is waiting, so the next
//! read skips the poll. End of file with an empty pipe finishes the direction: the caller
//! shuts down the destination's write side, or, when the other direction is over too,
//! closes the connection, which sends the FIN.
//!
//! TCP urgent data: a splice stops at the urgent mark (`tcp_read_sock` never reads past it)
//! while poll keeps reporting the socket readable; it then returns `EAGAIN` (which would
//! spin), or 0 once the peer has shut down (which would look like end of file and lose the
//! rest). So a splice that would block right after a readable poll, and a splice that
//! reports end of file, are followed by one copy through user space ([`Step::CopyIn`]),
//! which reads past the mark (the proxy's sockets use `SO_OOBINLINE`, so the urgent byte
//! stays in the stream). Only a copy's 0 is taken as end of file.

/// What the last operation of a direction reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The relay starts (the backend connection is up) with this many bytes already in the
    /// pipe (a PROXY protocol header), delivered before the source is read.
    Started(u32),
    /// The source poll completed: a `<poll.h>` mask, or `-errno`.
    Readable(i32),
    /// The destination poll completed: a mask, or `-errno`.
    Writable(i32),
    /// A splice from the source into the pipe completed: bytes, 0 at end of file, or `-errno`.
    SplicedIn(i32),
    /// A splice from the pipe to the destination completed: bytes, or `-errno`.
    SplicedOut(i32),
}

/// What a direction needs next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Poll the source for `POLLIN | POLLRDHUP`.
    PollReadable,
    /// Poll the destination for `POLLOUT`.
    PollWritable,
    /// Splice up to `len` bytes from the source into the pipe.
    SpliceIn(u32),
    /// Read up to `len` bytes from the source with `recv(2)` and write them into the pipe;
    /// report the result as [`Outcome::SplicedIn`].
    CopyIn(u32),
    /// Splice up to `len` bytes from the pipe to the destination.
    SpliceOut(u32),
    /// The source is at end of file and everything was delivered: shut down the
    /// destination's write side (or close the connection, when the other direction is over
    /// too). The direction is over, its pipe empty.
    Finish,
    /// The direction failed with this errno: close the connection (with a reset).
    Fail(i32),
}

/// The most one [`Step::CopyIn`] reads.
pub(super) const COPY_MAX: u32 = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    Nothing,
    Readable,
    Writable,
    SplicedIn,
    SplicedOut,
    Finished,
}

/// One direction's state.
#[derive(Debug)]
pub(super) struct Direction {
    /// Pipe capacity: the most one splice-in asks for.
    capacity: u32,
    /// Bytes in the pipe.
    buffered: u32,
    /// The last splice-in got all it asked for.
    last_read_full: bool,
    /// The splice-in in flight was issued right after a poll reported the source readable.
    after_poll: bool,
    /// The read in flight is a [`Step::CopyIn`].
    copying: bool,
    waiting: Waiting,
}

impl Direction {
    /// A direction whose pipe holds `capacity` bytes (at least 1).
    pub(super) fn new(capacity: u32) -> Direction {
        Direction {
            capacity: capacity.clamp(1, i32::MAX as u32),
            buffered: 0,
            last_read_full: false,
            after_poll: false,
            copying: false,
            waiting: Waiting::Nothing,
        }
    }

    /// Bytes spliced into this direction's pipe and not yet out of it.
    pub(super) fn buffered(&self) -> u32 {
        self.buffered
    }

    /// Whether the direction is over (end of file delivered, the pipe empty, the FIN sent
    /// or left to the connection's close).
    pub(super) fn finished(&self) -> bool {
        self.waiting == Waiting::Finished
    }

    /// Whether an operation of the direction's in flight is on its destination (a poll for
    /// room or a splice into it), which reports an error or hang-up of that socket.
    pub(super) fn writing(&self) -> bool {
        matches!(self.waiting, Waiting::Writable | Waiting::SplicedOut)
    }

    /// Whether the direction works on its source (reads it, or is about to): neither
    /// finished nor [`writing`](Self::writing).
    pub(super) fn reading(&self) -> bool {
        !self.finished() && !self.writing()
    }

    /// The [`Outcome`] a completion of this direction's operation in flight reports
    /// (`result`: the completion's result). With nothing in flight, an outcome that
    /// [`Direction::on`] rejects.
    pub(super) fn completed(&self, result: i32) -> Outcome {
        match self.waiting {
            Waiting::Readable => Outcome::Readable(result),
            Waiting::Writable => Outcome::Writable(result),
            Waiting::SplicedIn => Outcome::SplicedIn(result),
            Waiting::SplicedOut => Outcome::SplicedOut(result),
            Waiting::Nothing | Waiting::Finished => Outcome::Readable(-libc::EIO),
        }
    }

    /// Applies `outcome` and returns the next step. An outcome the direction was not waiting
    /// for is a bug elsewhere; it fails the direction (`EIO`) rather than corrupt the stream.
    pub(super) fn on(&mut self, outcome: Outcome) -> Step {
        let step = match (self.waiting, outcome) {
            (Waiting::Nothing, Outcome::Started(0)) => Step::PollReadable,
            (Waiting::Nothing, Outcome::Started(n)) => {
                self.buffered = n.min(self.capacity);
                self.last_read_full = false;
                Step::SpliceOut(self.buffered)
            }
            (Waiting::Readable, Outcome::Readable(r)) if r < 0 => Step::Fail(-r),
            // Errors and hang-ups surface through the splice's own result.
            (Waiting::Readable, Outcome::Readable(_)) => Step::SpliceIn(self.capacity),
            (Waiting::SplicedIn, Outcome::SplicedIn(n)) => self.after_read(n),
            (Waiting::SplicedOut, Outcome::SplicedOut(n)) => self.after_write(n),
            (Waiting::Writable, Outcome::Writable(r)) if r < 0 => Step::Fail(-r),
            (Waiting::Writable, Outcome::Writable(_)) => Step::SpliceOut(self.buffered),
            _ => Step::Fail(libc::EIO),
        };
        self.waiting = match step {
            Step::PollReadable => Waiting::Readable,
            Step::PollWritable => Waiting::Writable,
            Step::SpliceIn(_) | Step::CopyIn(_) => Waiting::SplicedIn,
            Step::SpliceOut(_) => Waiting::SplicedOut,
            Step::Finish => Waiting::Finished,
            Step::Fail(_) => Waiting::Nothing,
        };
        self.after_poll = match (outcome, step) {
            (Outcome::Readable(_), Step::SpliceIn(_)) => true,
            // An interrupted splice is retried as it was.
            (Outcome::SplicedIn(r), Step::SpliceIn(_)) if r == -libc::EINTR => self.after_poll,
            _ => false,
        };
        self.copying = matches!(step, Step::CopyIn(_));
        step
    }

    fn after_read(&mut self, n: i32) -> Step {
        match n {
            // A splice also returns 0 at an urgent mark after the peer's shutdown: confirm.
            0 if !self.copying => Step::CopyIn(self.capacity.min(COPY_MAX)),
            0 => Step::Finish,
            n if n > 0 => {
                let n = n as u32;
                self.last_read_full = n >= self.capacity;
                self.buffered = n.min(self.capacity);
                Step::SpliceOut(self.buffered)
            }
            n if -n == libc::EAGAIN && self.after_poll => Step::CopyIn(self.capacity.min(COPY_MAX)),
            n if -n == libc::EAGAIN => Step::PollReadable,
            n if -n == libc::EINTR => Step::SpliceIn(self.capacity),
            n => Step::Fail(-n),
        }
    }

    fn after_write(&mut self, n: i32) -> Step {
        match n {
            n if n > 0 => {
                self.buffered = self.buffered.saturating_sub(n as u32);
                if self.buffered > 0 {
                    // A short write: the socket's send buffer is full.
                    Step::PollWritable
                } else if self.last_read_full {
                    Step::SpliceIn(self.capacity)
                } else {
                    Step::PollReadable
                }
            }
            // The pipe held data, so 0 bytes moved means the destination cannot take any.
            0 => Step::Fail(libc::EIO),
            n if -n == libc::EAGAIN => Step::PollWritable,
            n if -n == libc::EINTR => Step::SpliceOut(self.buffered),
            n => Step::Fail(-n),
        }
    }
}

/// Runs one [`Direction`] against a simulated source, pipe and destination whose every result
/// is chosen by `script` (one byte per operation; when it runs out, every operation succeeds in
/// full), and panics when the machine breaks a promise of the module docs:
///
/// - the bytes that reach the destination are the bytes the source sent, when it finishes;
/// - its count of buffered bytes is what the pipe holds, and a step never asks to splice out
///   other than all of it, nor to read while the pipe holds any;
/// - one operation at a time: an outcome is given only for the step asked, and after
///   [`Step::Finish`] or [`Step::Fail`] any outcome fails it;
/// - it fails only when an error was injected, and it ends (at most 100,000 operations).
///
/// For the fuzz target `relay` (`fuzz/`) and its corpus regression test.
pub(super) fn simulate(script: &[u8]) {
    let mut script = script.iter().copied();
    let mut next = move || script.next();
    let capacity = 1 + u32::from(next().unwrap_or(63)) % 64;
    let header = u32::from(next().unwrap_or(0)) % capacity;
    let mut source_left = u64::from(next().unwrap_or(200)) * 5;
    let sent = u64::from(header) + source_left;
    let mut pipe = header;
    let mut delivered = 0u64;
    let mut injected = false;
    let mut d = Direction::new(capacity);
    let mut step = d.on(Outcome::Started(header));
    for _ in 0..100_000 {
        assert_eq!(d.buffered(), pipe, "the machine's count of the pipe");
        let choice = next();
        let pick = choice.map_or(u32::MAX, |b| u32::from(b) % 8);
        let fails = pick == 2;
        let outcome = match step {
            Step::Finish => {
                assert!(d.finished());
                assert_eq!(source_left, 0, "finished before the source's end");
                assert_eq!(pipe, 0, "finished with bytes in the pipe");
                assert_eq!(delivered, sent, "bytes out differ from bytes in");
                assert!(matches!(d.on(Outcome::SplicedIn(1)), Step::Fail(_)));
                return;
            }
            Step::Fail(errno) => {
                assert!(injected, "failed (errno {errno}) with no error injected");
                assert!(matches!(d.on(Outcome::SplicedOut(1)), Step::Fail(_)));
                return;
            }
            Step::PollReadable if fails => Outcome::Readable(-libc::ECONNRESET),
            Step::PollReadable => Outcome::Readable(i32::from(libc::POLLIN)),
            Step::PollWritable if fails => Outcome::Writable(-libc::EPIPE),
            Step::PollWritable => Outcome::Writable(i32::from(libc::POLLOUT)),
            Step::SpliceIn(len) | Step::CopyIn(len) => {
                assert_eq!(pipe, 0, "a read while the pipe holds {pipe} bytes");
                assert!(
                    len >= 1 && len <= capacity,
                    "a read of {len} into a pipe of {capacity}"
                );
                let copy = matches!(step, Step::CopyIn(_));
                assert!(!copy || len <= COPY_MAX);
                let result = match pick {
                    0 => -libc::EAGAIN,
                    1 => -libc::EINTR,
                    2 => -libc::ECONNRESET,
                    // A splice stopped at an urgent mark after the peer's shutdown.
                    3 if !copy && source_left > 0 => 0,
                    _ => {
                        let want = choice.map_or(len, |b| 1 + u32::from(b) / 8 % len);
                        let n = u64::from(want).min(source_left);
                        source_left -= n;
                        pipe += n as u32;
                        n as i32
                    }
                };
                Outcome::SplicedIn(result)
            }
            Step::SpliceOut(len) => {
                assert_eq!(len, pipe, "a splice out of other than the whole pipe");
                let result = match pick {
                    0 => -libc::EAGAIN,
                    1 => -libc::EINTR,
                    2 => -libc::ECONNRESET,
                    _ => {
                        // Short writes: the destination takes what the script says.
                        let n = choice.map_or(len, |b| 1 + u32::from(b) / 8 % len.max(1));
                        let n = n.min(pipe);
                        pipe -= n;
                        delivered += u64::from(n);
                        n as i32
                    }
                };
                Outcome::SplicedOut(result)
            }
        };
        injected |= matches!(
            outcome,
            Outcome::Readable(r) | Outcome::Writable(r) | Outcome::SplicedIn(r)
                | Outcome::SplicedOut(r)
                if r == -libc::ECONNRESET || r == -libc::EPIPE
        );
        step = d.on(outcome);
    }
    panic!("no end after 100,000 operations");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_sources_and_destinations_keep_every_promise() {
        // Every operation succeeds in full, then scripted mixes of partial results, retries,
        // urgent marks and errors.
        simulate(&[]);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..2000usize {
            let script: Vec<u8> = (0..len % 300)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            simulate(&script);
        }
    }

    const POLLIN: i32 = libc::POLLIN as i32;
    const POLLOUT: i32 = libc::POLLOUT as i32;

    #[test]
    fn bytes_flow_poll_read_write_poll() {
        let mut d = Direction::new(1000);
        assert_eq!(d.on(Outcome::Started(0)), Step::PollReadable);
        assert_eq!(d.on(Outcome::Readable(POLLIN)), Step::SpliceIn(1000));
        assert_eq!(d.on(Outcome::SplicedIn(300)), Step::SpliceOut(300));
        assert_eq!(d.on(Outcome::SplicedOut(300)), Step::PollReadable);
    }

    #[test]
    fn bytes_already_in_the_pipe_go_out_before_the_source_is_read() {
        let mut d = Direction::new(1000);
        assert_eq!(d.on(Outcome::Started(28)), Step::SpliceOut(28));
        assert_eq!(d.on(Outcome::SplicedOut(10)), Step::PollWritable);
        assert_eq!(d.on(Outcome::Writable(POLLOUT)), Step::SpliceOut(18));
        assert_eq!(d.on(Outcome::SplicedOut(18)), Step::PollReadable);
    }

    #[test]
    fn a_short_write_waits_for_room_then_sends_the_rest() {
        let mut d = Direction::new(1000);
        d.on(Outcome::Started(0));
        d.on(Outcome::Readable(POLLIN));
        d.on(Outcome::SplicedIn(300));
        assert_eq!(d.on(Outcome::SplicedOut(100)), Step::PollWritable);
        assert!(d.writing() && !d.reading());
        assert_eq!(d.on(Outcome::Writable(POLLOUT)), Step::SpliceOut(200));
        assert!(d.writing(), "a splice into the destination is in flight");
        assert_eq!(d.on(Outcome::SplicedOut(-libc::EAGAIN)), Step::PollWritable);
        assert_eq!(d.on(Outcome::Writable(POLLOUT)), Step::SpliceOut(200));
        assert_eq!(d.on(Outcome::SplicedOut(200)), Step::PollReadable);
    }

    #[test]
    fn a_full_read_reads_again_without_polling() {
        let mut d = Direction::new(1000);
        d.on(Outcome::Started(0));
        d.on(Outcome::Readable(POLLIN));
        assert_eq!(d.on(Outcome::SplicedIn(1000)), Step::SpliceOut(1000));
        assert_eq!(d.on(Outcome::SplicedOut(1000)), Step::SpliceIn(1000));
        assert_eq!(d.on(Outcome::SplicedIn(-libc::EAGAIN)), Step::PollReadable);
    }

    #[test]
    fn a_splice_that_blocks_right_after_a_readable_poll_copies_once() {
        // TCP urgent data: poll says readable, splice cannot get past the urgent mark.
        let mut d = Direction::new(100_000);
        d.on(Outcome::Started(0));
        d.on(Outcome::Readable(POLLIN));
        assert_eq!(
            d.on(Outcome::SplicedIn(-libc::EAGAIN)),
            Step::CopyIn(COPY_MAX)
        );
        assert_eq!(d.on(Outcome::SplicedIn(4)), Step::SpliceOut(4));
        assert_eq!(d.on(Outcome::SplicedOut(4)), Step::PollReadable);
        // A copy that would block too goes back to polling: no loop without progress.
        d.on(Outcome::Readable(POLLIN));
        d.on(Outcome::SplicedIn(-libc::EAGAIN));
        assert_eq!(d.on(Outcome::SplicedIn(-libc::EAGAIN)), Step::PollReadable);
    }

    #[test]
    fn a_splice_that_blocks_without_a_poll_just_polls() {
        let mut d = Direction::new(1000);
        d.on(Outcome::Started(0));
        d.on(Outcome::Readable(POLLIN));
        d.on(Outcome::SplicedIn(1000));
        assert_eq!(d.on(Outcome::SplicedOut(1000)), Step::SpliceIn(1000));
        assert_eq!(d.on(Outcome::SplicedIn(-libc::EAGAIN)), Step::PollReadable);
    }

    #[test]
    fn end_of_file_finishes_only_after_the_pipe_is_drained() {
        let mut d = Direction::new(1000);
        d.on(Outcome::Started(0));
        d.on(Outcome::Readable(POLLIN));
        d.on(Outcome::SplicedIn(1000));
        d.on(Outcome::SplicedOut(1000));
        assert!(!d.finished());
        assert_eq!(
            d.on(Outcome::SplicedIn(0)),
            Step::CopyIn(1000),
            "a splice's end of file is confirmed by a copy"
        );
        assert!(!d.finished());
        assert_eq!(d.on(Outcome::SplicedIn(0)), Step::Finish);
        assert!(d.finished());
    }

    #[test]
    fn a_splice_end_of_file_that_was_an_urgent_mark_carries_on() {
        let mut d = Direction::new(100_000);
        d.on(Outcome::Started(0));
        d.on(Outcome::Readable(POLLIN));
        assert_eq!(d.on(Outcome::SplicedIn(0)), Step::CopyIn(COPY_MAX));
        assert_eq!(d.on(Outcome::SplicedIn(4)), Step::SpliceOut(4));
        assert_eq!(d.on(Outcome::SplicedOut(4)), Step::PollReadable);
    }

    #[test]
    fn errors_fail_the_direction() {
        let mut d = Direction::new(1000);
        d.on(Outcome::Started(0));
        d.on(Outcome::Readable(POLLIN));
        assert_eq!(
            d.on(Outcome::SplicedIn(-libc::ECONNRESET)),
            Step::Fail(libc::ECONNRESET)
        );
        let mut d = Direction::new(1000);
        d.on(Outcome::Started(0));
        d.on(Outcome::Readable(POLLIN));
        d.on(Outcome::SplicedIn(10));
        assert_eq!(
            d.on(Outcome::SplicedOut(-libc::EPIPE)),
            Step::Fail(libc::EPIPE)
        );
        let mut d = Direction::new(1000);
        d.on(Outcome::Started(0));
        assert_eq!(
            d.on(Outcome::Readable(-libc::EBADF)),
            Step::Fail(libc::EBADF)
        );
    }

    #[test]
    fn an_unexpected_outcome_fails_instead_of_corrupting() {
        let mut d = Direction::new(1000);
        d.on(Outcome::Started(0));
        assert_eq!(d.on(Outcome::SplicedOut(5)), Step::Fail(libc::EIO));
        let mut d = Direction::new(1000);
        d.on(Outcome::Started(0));
        d.on(Outcome::Readable(POLLIN));
        d.on(Outcome::SplicedIn(10));
        assert_eq!(
            d.on(Outcome::SplicedOut(0)),
            Step::Fail(libc::EIO),
            "0 bytes written from a non-empty pipe must not loop"
        );
    }

    #[test]
    fn interrupted_splices_are_retried() {
        let mut d = Direction::new(1000);
        d.on(Outcome::Started(0));
        d.on(Outcome::Readable(POLLIN));
        assert_eq!(d.on(Outcome::SplicedIn(-libc::EINTR)), Step::SpliceIn(1000));
        d.on(Outcome::SplicedIn(7));
        assert_eq!(d.on(Outcome::SplicedOut(-libc::EINTR)), Step::SpliceOut(7));
    }
}
