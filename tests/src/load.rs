//! Many requests at once: N requests spread over a few client threads, each request's answer
//! (a backend name) counted, each failure kept.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::client::ClientError;
use crate::tally::Tally;

/// The result of [`run`]: who answered, and what failed.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Answers per backend name.
    pub tally: Tally,
    /// `(request index, backend name)` for each answered request, in completion order.
    pub answers: Vec<(usize, String)>,
    /// `(request index, error)` for each failed request, in completion order.
    pub failures: Vec<(usize, String)>,
    /// Requests not started because the deadline passed.
    pub not_started: usize,
}

impl LoadReport {
    /// Panics, in the user's words, if any request failed or was not started.
    pub fn assert_all_answered(&self, what: &str) {
        assert!(
            self.failures.is_empty() && self.not_started == 0,
            "{what}: {} of {} requests failed and {} were not started in time; first failures: {:?}",
            self.failures.len(),
            self.tally.total() as usize + self.failures.len() + self.not_started,
            self.not_started,
            &self.failures[..self.failures.len().min(5)]
        );
    }
}

/// Makes `count` requests with `threads` client threads; request `i` is `request(i)`, which
/// returns the answering backend's name. Stops starting requests after `deadline` has passed
/// (each request has its own timeouts).
pub fn run<F>(count: usize, threads: usize, deadline: Duration, request: F) -> LoadReport
where
    F: Fn(usize) -> Result<String, ClientError> + Sync,
{
    let next = AtomicUsize::new(0);
    let report = Mutex::new(LoadReport::default());
    let end = Instant::now() + deadline;
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut tally = Tally::new();
                let mut answers = Vec::new();
                let mut failures = Vec::new();
                let mut skipped = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    if Instant::now() >= end {
                        skipped += 1;
                        continue;
                    }
                    match request(i) {
                        Ok(name) => {
                            tally.add(&name);
                            answers.push((i, name));
                        }
                        Err(e) => failures.push((i, e.to_string())),
                    }
                }
                let mut r = report.lock().expect("report lock");
                r.tally.merge(&tally);
                r.answers.extend(answers);
                r.failures.extend(failures);
                r.not_started += skipped;
            });
        }
    });
    report.into_inner().expect("report lock")
}

/// Repeats `request` (each call a new client) until every name in `expected` has answered
/// at least once, up to `timeout` and 10,000 tries: how a test waits for a freshly started
/// service to be up on all its backends. Failed requests are retried.
///
/// Returns who answered, or `Err(message)` naming the backends that never did.
pub fn wait_until_each_answers(
    expected: &[&str],
    timeout: Duration,
    request: impl Fn() -> Result<String, ClientError>,
) -> Result<Tally, String> {
    let deadline = Instant::now() + timeout;
    let mut tally = Tally::new();
    let mut last_error = None;
    for _ in 0..10_000 {
        if expected.iter().all(|n| tally.get(n) > 0) {
            return Ok(tally);
        }
        if Instant::now() >= deadline {
            break;
        }
        match request() {
            Ok(name) => tally.add(&name),
            Err(e) => {
                last_error = Some(e.to_string());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|n| tally.get(n) == 0)
        .collect();
    if missing.is_empty() {
        return Ok(tally);
    }
    Err(format!(
        "within {timeout:?}, {} never answered through the balancer (answers: {tally}; last error: {})",
        missing.join(", "),
        last_error.as_deref().unwrap_or("none")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_is_made_once_and_counted() {
        let seen = Mutex::new(vec![0u32; 100]);
        let r = run(100, 4, Duration::from_secs(30), |i| {
            seen.lock().unwrap()[i] += 1;
            if i % 10 == 0 {
                Err(ClientError::BadResponse("test".into()))
            } else {
                Ok(format!("b{}", i % 2))
            }
        });
        assert!(seen.into_inner().unwrap().iter().all(|&n| n == 1));
        assert_eq!(r.tally.total(), 90);
        assert_eq!(r.answers.len(), 90);
        assert!(r
            .answers
            .iter()
            .all(|(i, name)| *name == format!("b{}", i % 2)));
        assert_eq!(r.failures.len(), 10);
        assert_eq!(r.not_started, 0);
    }
}
