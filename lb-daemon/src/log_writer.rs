//! The daemon's log lines go to stderr from a thread of their own, so that a reader that
//! stalls (a journald under load, a pipe nobody drains) cannot stall the threads that log: a
//! proxy worker writing an access line, the control thread, the admin API.
//!
//! Each line is handed over through a bounded queue of [`QUEUE_LINES`] lines without waiting.
//! When the queue is full the line is dropped and counted, and the writer says how many were
//! dropped once it can write again (HAProxy's UDP syslog loses lines under load the same way,
//! rather than slow the traffic down). The writer thread lowers its capabilities like every
//! other thread ([`crate::privileges::follow`]), within a second of start-up.
//!
//! At exit, [`LogGuard`] waits up to [`FLUSH_WAIT`] for the queue to be written, so the last
//! lines (the exit summary) are not lost to a reader that keeps up.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// Lines the queue holds (a few hundred bytes each).
pub const QUEUE_LINES: usize = 4096;
/// The longest [`LogGuard`] waits at exit for the queue to be written.
pub const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// How often the writer thread wakes without lines: to lower its capabilities once start-up
/// is done, and to report drops.
const IDLE_WAKE: Duration = Duration::from_secs(1);

enum Message {
    Line(Vec<u8>),
    /// Everything queued before it has been written: answer on the channel.
    Flush(SyncSender<()>),
}

/// A [`MakeWriter`] for `tracing_subscriber::fmt` that queues each line for the writer
/// thread (see the module's doc). Cloned into the subscriber.
#[derive(Clone)]
pub struct QueuedStderr {
    queue: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

/// Flushes the queue when dropped (at most [`FLUSH_WAIT`]); keep it until the process exits.
pub struct LogGuard {
    queue: SyncSender<Message>,
}

/// Starts the writer thread `lb-log`. Returns the writer for the subscriber and the guard for
/// `main`, or `Err` when the thread cannot be started.
pub fn start() -> io::Result<(QueuedStderr, LogGuard)> {
    let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let counted = dropped.clone();
    std::thread::Builder::new()
        .name("lb-log".to_string())
        .spawn(move || write_lines(&lines, &counted, &mut io::stderr()))?;
    Ok((
        QueuedStderr {
            queue: queue.clone(),
            dropped,
        },
        LogGuard { queue },
    ))
}

/// The writer thread: writes each queued line to `out` and reports drops, until every sender
/// is gone.
fn write_lines(lines: &Receiver<Message>, dropped: &AtomicU64, out: &mut impl Write) {
    loop {
        let message = lines.recv_timeout(IDLE_WAKE);
        report_drops(dropped, out);
        match message {
            Ok(Message::Line(line)) => {
                // A write error (stderr closed) loses the line; there is nowhere to say so.
                let _ = out.write_all(&line);
            }
            Ok(Message::Flush(done)) => {
                let _ = out.flush();
                let _ = done.send(());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        crate::privileges::follow();
    }
}

/// Writes how many lines were dropped since the last report, if any.
fn report_drops(dropped: &AtomicU64, out: &mut impl Write) {
    let n = dropped.swap(0, Ordering::Relaxed);
    if n > 0 {
        let _ = writeln!(
            out,
            "WARN lb_daemon::log_writer: {n} log line(s) dropped: stderr did not take them as \
             fast as they came (its reader stalled or fell behind)"
        );
    }
}

impl QueuedStderr {
    /// Lines dropped so far and not yet reported.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl<'a> MakeWriter<'a> for QueuedStderr {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            to: self,
            bytes: Vec::new(),
        }
    }
}

/// One log line being formatted; queued when dropped.
pub struct Line<'a> {
    to: &'a QueuedStderr,
    bytes: Vec<u8>,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if self.bytes.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.bytes);
        match self.to.queue.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.to.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The writer thread is gone (it cannot end while a sender lives, short of a
            // panic): write in place rather than lose the line.
            Err(TrySendError::Disconnected(Message::Line(line))) => {
                let _ = io::stderr().write_all(&line);
            }
            Err(TrySendError::Disconnected(Message::Flush(_))) => {}
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let deadline = Instant::now() + FLUSH_WAIT;
        let (done, written) = mpsc::sync_channel(1);
        let mut flush = Message::Flush(done);
        loop {
            match self.queue.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    flush = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = written.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer for the thread under test: what it got, shared.
    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("sink lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_past_a_full_queue_are_dropped_counted_and_reported() {
        let (queue, lines) = mpsc::sync_channel(2);
        let writer = QueuedStderr {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        for i in 0..5 {
            writeln!(writer.make_writer(), "line {i}").expect("formatting a line");
        }
        assert_eq!(writer.dropped(), 3, "two fit the queue, three did not");
        let sink = Sink::default();
        let dropped = writer.dropped.clone();
        drop(writer);
        write_lines(&lines, &dropped, &mut sink.clone());
        let got = String::from_utf8(sink.0.lock().expect("sink lock").clone()).expect("text");
        assert!(
            got.starts_with("WARN lb_daemon::log_writer: 3 log line(s) dropped"),
            "{got}"
        );
        assert!(got.ends_with("line 0\nline 1\n"), "{got}");
    }

    #[test]
    fn the_guard_waits_until_the_queue_is_written() {
        let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
        let writer = QueuedStderr {
            queue: queue.clone(),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let sink = Sink::default();
        let (out, dropped) = (sink.clone(), writer.dropped.clone());
        let thread = std::thread::spawn(move || write_lines(&lines, &dropped, &mut out.clone()));
        for i in 0..100 {
            writeln!(writer.make_writer(), "line {i}").expect("formatting a line");
        }
        drop(LogGuard { queue });
        let got = sink.0.lock().expect("sink lock").clone();
        assert!(
            String::from_utf8(got).expect("text").ends_with("line 99\n"),
            "every line queued before the guard went was written when it returned"
        );
        drop(writer);
        thread
            .join()
            .expect("the writer thread ends with its senders");
    }
}
