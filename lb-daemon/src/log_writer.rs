//! The daemon's log lines go to stderr from a thread of their own, so that a reader that
//! stalls (a journald under load, a pipe nobody drains) cannot stall the threads that log: a
//! proxy worker writing an access line, the control thread, the admin API.
//!
//! Each line is handed over through a bounded queue of [`QUEUE_LINES`] lines without waiting.
//! When the queue is full the line is dropped and counted, and the writer says how many were
//! dropped once it can write again (HAProxy's UDP syslog loses lines under load the same way,
//! rather than slow the traffic down). Lines below WARN (the access log above all) may use
//! only the first three quarters of the queue, so that a flood of them cannot push out a
//! warning or an error.
//!
//! The writer thread drops every capability and sets no-new-privileges before anything else
//! ([`crate::privileges::drop_all_in_this_thread`]): writing to stderr needs none, and a
//! thread blocked on a stalled stderr could not lower its own later. At exit, [`LogGuard`]
//! waits up to [`FLUSH_WAIT`] for the queue to be written. A panic's message is queued
//! after the lines before it, and the panicking thread waits up to [`PANIC_FLUSH_WAIT`] for
//! it to be written, never on stderr itself: a thread blocked there would not unwind, and
//! the daemon would not exit to be restarted (`watchdog`). Should the thread not start,
//! lines (a panic's message among them) are written in place.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::MakeWriter;

/// Lines the queue holds (a few hundred bytes each).
pub const QUEUE_LINES: usize = 4096;
/// Lines below WARN are dropped once this many wait.
pub const QUEUE_LINES_BELOW_WARN: usize = QUEUE_LINES * 3 / 4;
/// The last lines of the queue, kept for panics' messages: warnings and errors are dropped
/// once `QUEUE_LINES - QUEUE_LINES_FOR_PANICS` wait.
pub const QUEUE_LINES_FOR_PANICS: usize = 16;
/// The longest [`LogGuard`] waits at exit for the queue to be written.
pub const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// The longest a panicking thread waits, once its message is queued, for it to be written.
pub const PANIC_FLUSH_WAIT: Duration = Duration::from_millis(500);
/// How often the writer thread wakes without lines, to report drops.
const IDLE_WAKE: Duration = Duration::from_secs(1);

enum Message {
    Line(Vec<u8>),
    /// Everything queued before it has been written: answer on the channel.
    Flush(SyncSender<()>),
}

/// What a line is, for how much of the queue it may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Below WARN (the access log above all): the first [`QUEUE_LINES_BELOW_WARN`].
    BelowWarn,
    /// WARN or ERROR: all but the last [`QUEUE_LINES_FOR_PANICS`].
    Warn,
    /// A panic's message: the whole queue.
    Panic,
}

/// What the writer thread counts with the threads that log.
#[derive(Default)]
struct Counts {
    /// Lines queued and not yet taken by the writer thread.
    waiting: AtomicUsize,
    /// Lines dropped and not yet reported.
    dropped: AtomicU64,
}

/// The threads that log: the queue's sending end and where the writer stands.
struct Shared {
    queue: SyncSender<Message>,
    counts: Arc<Counts>,
    /// The writer thread runs: lines go through the queue, not in place.
    live: AtomicBool,
}

/// A [`MakeWriter`] for `tracing_subscriber::fmt` that queues each line for the writer
/// thread, or writes it in place before the thread runs (see the module's doc).
#[derive(Clone)]
pub struct QueuedStderr {
    shared: Arc<Shared>,
}

/// Flushes the queue when dropped (at most [`FLUSH_WAIT`]); keep it until the process exits.
pub struct LogGuard {
    shared: Arc<Shared>,
}

/// The daemon's one writer, for the panic hook.
static WRITER: Mutex<Option<Arc<Shared>>> = Mutex::new(None);

/// Starts the writer thread `lb-log` and makes the writer for the subscriber and the guard
/// for `main`; installs a panic hook that queues a panic's message as a line (see the
/// module's doc). When the thread cannot be started, lines are written in place.
pub fn start() -> (QueuedStderr, LogGuard) {
    let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
    let shared = Arc::new(Shared {
        queue,
        counts: Arc::default(),
        live: AtomicBool::new(false),
    });
    let counts = shared.counts.clone();
    let spawned = std::thread::Builder::new()
        .name("lb-log".to_string())
        .spawn(move || {
            if let Err(e) = crate::privileges::drop_all_in_this_thread() {
                let _ = writeln!(io::stderr(), "the log's writer keeps its privileges: {e}");
            }
            write_lines(&lines, &counts, &mut io::stderr());
        });
    match spawned {
        Ok(_) => shared.live.store(true, Ordering::Release),
        Err(e) => {
            let _ = writeln!(
                io::stderr(),
                "no thread for the log ({e}): lines are written in place, and a stalled \
                 reader stalls the threads that log"
            );
        }
    }
    if let Ok(mut writer) = WRITER.lock() {
        *writer = Some(shared.clone());
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // The writer thread's own panic, or one before it runs, is told in place.
        let on_writer = std::thread::current().name() == Some("lb-log");
        let shared = WRITER
            .lock()
            .ok()
            .and_then(|w| w.clone())
            .filter(|s| !on_writer && s.live.load(Ordering::Acquire));
        match shared {
            Some(shared) => shared.report_panic(panic_text(info)),
            None => previous(info),
        }
    }));
    (
        QueuedStderr {
            shared: shared.clone(),
        },
        LogGuard { shared },
    )
}

/// What a panic says: the thread (name and id), where, the message, and a backtrace when
/// `RUST_LIB_BACKTRACE` or `RUST_BACKTRACE` asks for one (`std::backtrace::Backtrace`'s
/// rule; `full` prints as `1` does). The standard hook's first line, in its own words after.
fn panic_text(info: &std::panic::PanicHookInfo<'_>) -> Vec<u8> {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>");
    let tid = nix::unistd::gettid();
    let location = info
        .location()
        .map_or_else(|| "an unknown place".to_string(), |l| l.to_string());
    let message = info.payload_as_str().unwrap_or("Box<dyn Any>");
    let backtrace = std::backtrace::Backtrace::capture();
    let tail = match backtrace.status() {
        std::backtrace::BacktraceStatus::Captured => format!("stack backtrace:\n{backtrace}\n"),
        _ => "note: set RUST_BACKTRACE=1 for a backtrace\n".to_string(),
    };
    format!("thread '{name}' ({tid}) panicked at {location}:\n{message}\n{tail}").into_bytes()
}

/// The writer thread: writes each queued line to `out` and reports drops, until every sender
/// is gone.
fn write_lines(lines: &Receiver<Message>, counts: &Counts, out: &mut impl Write) {
    loop {
        let message = lines.recv_timeout(IDLE_WAKE);
        report_drops(&counts.dropped, out);
        match message {
            Ok(Message::Line(line)) => {
                counts.waiting.fetch_sub(1, Ordering::Relaxed);
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
    }
}

/// Writes how many lines were dropped since the last report, if any, as a WARN line of the
/// subscriber's layout.
fn report_drops(dropped: &AtomicU64, out: &mut impl Write) {
    let n = dropped.swap(0, Ordering::Relaxed);
    if n == 0 {
        return;
    }
    let mut time = String::new();
    let _ = SystemTime.format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut time));
    let _ = writeln!(
        out,
        "{time}  WARN lb_daemon::log_writer: {n} log line(s) dropped: stderr did not take them \
         as fast as they came (its reader stalled or fell behind)"
    );
}

impl Shared {
    /// Queues `line` (of `class`), or drops and counts it when its part of the queue is full;
    /// writes it in place while the writer thread does not run, or once it is gone, unless
    /// it is a panic's (see [`Shared::report_panic`]).
    fn send(&self, line: Vec<u8>, class: Class) {
        if !self.live.load(Ordering::Acquire) {
            let _ = io::stderr().write_all(&line);
            return;
        }
        let room = match class {
            Class::BelowWarn => QUEUE_LINES_BELOW_WARN,
            Class::Warn => QUEUE_LINES - QUEUE_LINES_FOR_PANICS,
            Class::Panic => QUEUE_LINES,
        };
        if self.counts.waiting.fetch_add(1, Ordering::Relaxed) >= room {
            self.counts.waiting.fetch_sub(1, Ordering::Relaxed);
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.queue.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.counts.waiting.fetch_sub(1, Ordering::Relaxed);
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The writer thread is gone (it cannot end while a sender lives, short of a
            // panic): write in place rather than lose the line. Not a panic's: its thread
            // must not block on stderr.
            Err(TrySendError::Disconnected(Message::Line(line))) => {
                self.counts.waiting.fetch_sub(1, Ordering::Relaxed);
                if class != Class::Panic {
                    let _ = io::stderr().write_all(&line);
                }
            }
            Err(TrySendError::Disconnected(Message::Flush(_))) => {}
        }
    }

    /// Queues a panic's `text` (it may take the last [`QUEUE_LINES_FOR_PANICS`] lines of the
    /// queue, which warnings leave free) and waits up to [`PANIC_FLUSH_WAIT`] for it and the
    /// lines before it to be written. Never waits longer, nor on stderr itself: a panicking
    /// thread that blocked on a stalled stderr (as the standard hook's write would) would
    /// never unwind to `watchdog`, and the daemon would run on without it instead of exiting
    /// to be restarted. While stderr stalls, the text waits in the queue like any line; it is
    /// dropped and counted only when panics filled those last lines too, or the writer
    /// thread is gone.
    fn report_panic(&self, text: Vec<u8>) {
        self.send(text, Class::Panic);
        self.flush(PANIC_FLUSH_WAIT);
    }

    /// Waits up to `wait` until every line queued before the call is written; nothing while
    /// the writer thread does not run.
    fn flush(&self, wait: Duration) {
        if !self.live.load(Ordering::Acquire) {
            return;
        }
        let deadline = Instant::now() + wait;
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
impl QueuedStderr {
    /// Lines dropped so far and not yet reported.
    fn dropped(&self) -> u64 {
        self.shared.counts.dropped.load(Ordering::Relaxed)
    }
}

impl<'a> MakeWriter<'a> for QueuedStderr {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            to: &self.shared,
            bytes: Vec::new(),
            class: Class::Warn,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line<'a> {
        Line {
            to: &self.shared,
            bytes: Vec::new(),
            class: if *meta.level() <= Level::WARN {
                Class::Warn
            } else {
                Class::BelowWarn
            },
        }
    }
}

/// One log line being formatted; queued when dropped.
pub struct Line<'a> {
    to: &'a Shared,
    bytes: Vec<u8>,
    /// How much of the queue it may take.
    class: Class,
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
        if !self.bytes.is_empty() {
            self.to.send(std::mem::take(&mut self.bytes), self.class);
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.flush(FLUSH_WAIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer for the thread under test: what it got, shared.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("sink lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("sink lock").clone()).expect("text")
        }
    }

    /// A live writer with a queue of `capacity` lines, not shared with the daemon's.
    fn writer(capacity: usize) -> (QueuedStderr, Receiver<Message>) {
        let (queue, lines) = mpsc::sync_channel(capacity);
        let shared = Arc::new(Shared {
            queue,
            counts: Arc::default(),
            live: AtomicBool::new(true),
        });
        (QueuedStderr { shared }, lines)
    }

    #[test]
    fn lines_past_a_full_queue_are_dropped_counted_and_reported() {
        let (writer, lines) = writer(2);
        for i in 0..5 {
            writeln!(writer.make_writer(), "line {i}").expect("formatting a line");
        }
        assert_eq!(writer.dropped(), 3, "two fit the queue, three did not");
        let counts = writer.shared.counts.clone();
        drop(writer);
        let sink = Sink::default();
        // Ends once the queue is empty: its only sender went with the writer.
        write_lines(&lines, &counts, &mut sink.clone());
        let got = sink.text();
        assert!(
            got.contains(" WARN lb_daemon::log_writer: 3 log line(s) dropped"),
            "{got}"
        );
        assert!(got.ends_with("line 0\nline 1\n"), "{got}");
    }

    #[test]
    fn each_kind_of_line_has_its_part_of_the_queue() {
        let (writer, _lines) = writer(QUEUE_LINES);
        // Through the subscriber the daemon uses, which asks `make_writer_for` per line.
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer.clone())
            .finish();
        let below_warn = (QUEUE_LINES - QUEUE_LINES_BELOW_WARN) as u64;
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..QUEUE_LINES {
                tracing::info!("access");
            }
            assert_eq!(
                writer.dropped(),
                below_warn,
                "info lines stop at three quarters"
            );
            for _ in 0..QUEUE_LINES - QUEUE_LINES_BELOW_WARN - QUEUE_LINES_FOR_PANICS {
                tracing::warn!("warning");
            }
            assert_eq!(
                writer.dropped(),
                below_warn,
                "warnings take the last quarter"
            );
            tracing::error!("one more than warnings may take");
            assert_eq!(
                writer.dropped(),
                below_warn + 1,
                "the last lines are for panics"
            );
        });
        for _ in 0..QUEUE_LINES_FOR_PANICS {
            writer.shared.send(b"panicked\n".to_vec(), Class::Panic);
        }
        assert_eq!(
            writer.dropped(),
            below_warn + 1,
            "panics take the queue's last lines"
        );
        writer.shared.send(b"panicked\n".to_vec(), Class::Panic);
        assert_eq!(writer.dropped(), below_warn + 2, "and no more");
    }

    /// A stderr whose reader stalled: takes nothing until released.
    #[derive(Clone, Default)]
    struct Stalled {
        sink: Sink,
        released: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl Stalled {
        fn release(&self) {
            let (released, wake) = &*self.released;
            *released.lock().expect("stall lock") = true;
            wake.notify_all();
        }
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (released, wake) = &*self.released;
            let mut open = released.lock().expect("stall lock");
            while !*open {
                open = wake.wait(open).expect("stall lock");
            }
            drop(open);
            self.sink.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_panic_is_queued_after_the_lines_before_it_and_never_waits_on_a_stalled_stderr() {
        let (writer, lines) = writer(QUEUE_LINES);
        let stderr = Stalled::default();
        let out = stderr.clone();
        let counts = writer.shared.counts.clone();
        let thread = std::thread::spawn(move || write_lines(&lines, &counts, &mut out.clone()));
        writeln!(writer.make_writer(), "before").expect("formatting a line");
        let started = Instant::now();
        writer
            .shared
            .report_panic(b"thread 'lb-proxy-0' panicked at here:\nboom\n".to_vec());
        let waited = started.elapsed();
        assert!(
            waited < PANIC_FLUSH_WAIT + Duration::from_secs(2),
            "the panicking thread waited {waited:?} on a stalled stderr"
        );
        stderr.release();
        writer.shared.flush(FLUSH_WAIT);
        assert_eq!(
            stderr.sink.text(),
            "before\nthread 'lb-proxy-0' panicked at here:\nboom\n",
            "the panic's message follows the lines before it once stderr takes them"
        );
        drop(writer);
        thread
            .join()
            .expect("the writer thread ends with its sender");
    }

    #[test]
    fn a_flush_waits_until_the_queue_is_written() {
        let (writer, lines) = writer(QUEUE_LINES);
        let sink = Sink::default();
        let out = sink.clone();
        let counts = writer.shared.counts.clone();
        let thread = std::thread::spawn(move || write_lines(&lines, &counts, &mut out.clone()));
        for i in 0..100 {
            writeln!(writer.make_writer(), "line {i}").expect("formatting a line");
        }
        writer.shared.flush(FLUSH_WAIT);
        assert!(
            sink.text().ends_with("line 99\n"),
            "every line queued before the flush was written when it returned"
        );
        drop(writer);
        thread
            .join()
            .expect("the writer thread ends with its sender");
    }
}
