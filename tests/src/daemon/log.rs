//! The daemon's output, captured line by line for assertions.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Lines kept at most; later lines are dropped (a runaway log must not eat the machine).
const MAX_LINES: usize = 1_000_000;

/// Why [`LogBuffer::wait_for`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum LogWaitError {
    /// No matching line within the time allowed.
    #[error("no log line containing `{needle}` within {timeout:?}; last lines:\n{tail}")]
    Timeout {
        /// What was looked for.
        needle: String,
        /// How long it waited.
        timeout: Duration,
        /// The last lines of the log.
        tail: String,
    },
    /// The daemon closed its output (it exited) without logging a matching line.
    #[error("the daemon exited without logging a line containing `{needle}`; last lines:\n{tail}")]
    Exited {
        /// What was looked for.
        needle: String,
        /// The last lines of the log.
        tail: String,
    },
}

/// Lines from the daemon's stdout and stderr, ANSI colour codes removed, in arrival order.
#[derive(Default)]
pub(crate) struct LogBuffer {
    state: Mutex<State>,
    changed: Condvar,
    /// While set, the pumps read nothing, as a stalled log reader would.
    paused: AtomicBool,
}

#[derive(Default)]
struct State {
    lines: Vec<String>,
    /// Output streams still open; 0 once the daemon closed them all.
    open: usize,
}

impl LogBuffer {
    /// Registers one more stream to be read with [`LogBuffer::pump`].
    pub(crate) fn expect_stream(&self) {
        self.state.lock().expect("log lock").open += 1;
    }

    /// Reads `stream` to its end, one line at a time; `echo` copies each line to our stderr.
    pub(crate) fn pump(&self, stream: impl Read, echo: bool) {
        let mut reader = BufReader::new(stream);
        let mut raw = Vec::new();
        loop {
            while self.paused.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = strip_ansi(&String::from_utf8_lossy(&raw));
            let line = line.trim_end_matches(['\n', '\r']).to_string();
            if echo {
                eprintln!("[lb-daemon] {line}");
            }
            let mut st = self.state.lock().expect("log lock");
            if st.lines.len() < MAX_LINES {
                st.lines.push(line);
            }
            drop(st);
            self.changed.notify_all();
        }
        self.state.lock().expect("log lock").open -= 1;
        self.changed.notify_all();
    }

    /// Stops (`true`) or resumes the pumps' reading.
    pub(crate) fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// A copy of every line so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.state.lock().expect("log lock").lines.clone()
    }

    /// How many lines so far.
    pub(crate) fn len(&self) -> usize {
        self.state.lock().expect("log lock").lines.len()
    }

    /// The last `n` lines, one per line.
    pub(crate) fn tail(&self, n: usize) -> String {
        let st = self.state.lock().expect("log lock");
        if st.lines.is_empty() {
            return "(no output)".into();
        }
        let from = st.lines.len().saturating_sub(n);
        st.lines[from..].join("\n")
    }

    /// Waits up to `timeout` for a line at index `from` or later for which `matches` holds;
    /// returns its index and text.
    pub(crate) fn wait_for(
        &self,
        from: usize,
        needle: &str,
        matches: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<(usize, String), LogWaitError> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        let mut st = self.state.lock().expect("log lock");
        loop {
            if let Some(i) = (next..st.lines.len()).find(|&i| matches(&st.lines[i])) {
                return Ok((i, st.lines[i].clone()));
            }
            next = next.max(st.lines.len());
            let now = Instant::now();
            if st.open == 0 || now >= deadline {
                let tail = {
                    let from = st.lines.len().saturating_sub(30);
                    st.lines[from..].join("\n")
                };
                return Err(if st.open == 0 {
                    LogWaitError::Exited {
                        needle: needle.into(),
                        tail,
                    }
                } else {
                    LogWaitError::Timeout {
                        needle: needle.into(),
                        timeout,
                        tail,
                    }
                });
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .expect("log lock")
                .0;
        }
    }
}

/// `line` without ANSI escape sequences (CSI `ESC [ ... final byte`).
pub(crate) fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, up to the final byte (0x40..=0x7e).
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn colour_codes_are_removed() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m ready"),
            "2026  INFO ready"
        );
    }

    #[test]
    fn wait_for_sees_lines_that_arrive_later_and_reports_exit() {
        let log = Arc::new(LogBuffer::default());
        log.expect_stream();
        let (r, mut w) = std::io::pipe().expect("pipe");
        let pump = {
            let log = log.clone();
            std::thread::spawn(move || log.pump(r, false))
        };
        use std::io::Write;
        writeln!(w, "one").unwrap();
        let (i, line) = log
            .wait_for(0, "one", |l| l.contains("one"), Duration::from_secs(5))
            .expect("first line seen");
        assert_eq!((i, line.as_str()), (0, "one"));
        writeln!(w, "two").unwrap();
        let (i, _) = log
            .wait_for(1, "two", |l| l.contains("two"), Duration::from_secs(5))
            .expect("second line seen");
        assert_eq!(i, 1);
        drop(w);
        pump.join().unwrap();
        let err = log
            .wait_for(0, "three", |l| l.contains("three"), Duration::from_secs(5))
            .expect_err("a line that never came was found");
        assert!(matches!(err, LogWaitError::Exited { .. }), "{err}");
        assert_eq!(log.len(), 2);
    }
}
