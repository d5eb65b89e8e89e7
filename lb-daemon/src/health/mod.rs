//! Health checks: whether a backend may receive new flows.
//!
//! - [`HealthState`]: the rise/fall state machine of one backend (HAProxy's semantics), fed by
//!   active checks and by passive failures the data plane reports; without active checks, a
//!   hold-off after passive failures (nginx's `max_fails`/`fail_timeout`).
//! - [`check`]: one active check of one backend, bounded by its timeout; each kind is its own
//!   module (`tcp.rs`, `http.rs`, `udp.rs`).
//! - [`monitor`]: the task that runs active checks of one backend every `interval` and reports
//!   state changes as [`Transition`]s.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{CheckKind, HealthCheck, ProxyProtocol};

mod http;
mod tcp;
mod udp;

/// Whether a backend receives new flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Healthy: eligible for new flows. Displays as `UP`.
    Up,
    /// Failed `fall` checks in a row and has not yet passed `rise` in a row. Displays as `DOWN`.
    Down,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Up => "UP",
            Health::Down => "DOWN",
        })
    }
}

/// Why one health check failed. The `Display` text is written to be read in a log line
/// ("connection refused", "timed out after 1s", "HTTP status 503, expected 200").
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CheckError {
    /// The check did not finish within its `timeout` (the value carried here).
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The backend refused the connection (TCP RST, or for UDP an ICMP port unreachable):
    /// `ECONNREFUSED`.
    #[error("connection refused")]
    Refused,
    /// No route to the backend: `EHOSTUNREACH` or `ENETUNREACH`.
    #[error("host or network unreachable")]
    Unreachable,
    /// An HTTP check got status `got` where it expects `want`.
    #[error("HTTP status {got}, expected {want}")]
    BadStatus {
        /// The status code the backend answered with.
        got: u16,
        /// The status code the check expects (`expect_status`).
        want: u16,
    },
    /// The backend answered, but not with what the check expects (no HTTP status line, a UDP
    /// reply without the expected prefix); the text says what was wrong.
    #[error("bad reply: {0}")]
    BadReply(String),
    /// Any other I/O error, as the OS describes it.
    #[error("I/O error: {0}")]
    Io(String),
    /// The check could not run for want of this host's own resources (a local port, a
    /// descriptor, kernel memory: see [`crate::shortage::is_local_shortage`]); the OS's text.
    /// Says nothing about the backend, so [`HealthState::record_check`] leaves its state as
    /// it is and counts the check as unknown.
    #[error("unknown: this host is short of resources ({0})")]
    Local(String),
}

impl From<io::Error> for CheckError {
    /// Maps this host's shortages to [`CheckError::Local`], `ECONNREFUSED` to
    /// [`CheckError::Refused`], `EHOSTUNREACH` and `ENETUNREACH` to
    /// [`CheckError::Unreachable`], anything else to [`CheckError::Io`] with the OS's text.
    fn from(error: io::Error) -> Self {
        if crate::shortage::is_local_shortage(&error) {
            return CheckError::Local(error.to_string());
        }
        match error.kind() {
            io::ErrorKind::ConnectionRefused => return CheckError::Refused,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                return CheckError::Unreachable
            }
            _ => {}
        }
        match error.raw_os_error() {
            Some(libc::ECONNREFUSED) => CheckError::Refused,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => CheckError::Unreachable,
            _ => CheckError::Io(error.to_string()),
        }
    }
}

/// A change of a backend's [`Health`], for the log and for rebuilding the service's snapshot;
/// or, from Down to Down, the failed first check of a backend that waited for it
/// ([`HealthState::await_first_check`]): the flows it kept while it waited are re-placed.
#[derive(Debug, Clone)]
pub struct Transition {
    /// The state the backend left.
    pub from: Health,
    /// The state the backend entered.
    pub to: Health,
    /// Why, for a log line: "3 consecutive failures, last: connection refused" or
    /// "2 consecutive successful checks".
    pub reason: String,
    /// How long the backend had been in `from`.
    pub held_for: Duration,
}

impl fmt::Display for Transition {
    /// Reads "UP -> DOWN after 12s: 3 consecutive failures, last: connection refused".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Whole milliseconds: nanosecond digits are noise in a log line.
        let held = Duration::from_millis(self.held_for.as_millis().try_into().unwrap_or(u64::MAX));
        write!(
            f,
            "{} -> {} after {}: {}",
            self.from,
            self.to,
            humantime::format_duration(held),
            self.reason
        )
    }
}

/// The rise/fall state machine of one backend, with HAProxy's semantics:
///
/// - A backend starts [`Health::Up`], so a new backend takes `fall` failures to go down rather
///   than `rise` successes to come up (HAProxy's default). A backend added to a running
///   service starts Down instead, until its first check
///   ([`await_first_check`](Self::await_first_check)).
/// - While Up, `fall` consecutive failures take it Down. Failures are failed active checks
///   ([`record_check`](Self::record_check)) and failed proxy connects
///   ([`record_passive_failure`](Self::record_passive_failure)), counted together.
/// - While Down, `rise` consecutive successful active checks bring it Up. Only active checks
///   bring a backend Up: a Down backend gets no traffic, so passive events are ignored.
/// - A successful check resets the failure streak and a failure resets the success streak. A
///   successful proxy connect ([`record_passive_success`](Self::record_passive_success))
///   takes an Up backend's failed connects out of its failure streak, not its failed checks.
///
/// A backend without active checks ([`passive_only`](Self::passive_only), for `kind =
/// "none"`) follows nginx's `max_fails`/`fail_timeout` instead, since nothing would ever bring
/// it back up:
///
/// - `fall` consecutive passive failures take it Down for the hold-off time.
/// - When the hold-off has passed, [`retry_due`](Self::retry_due) puts it back Up on trial: one
///   passive failure takes it Down again for another hold-off, and a passive success ends the
///   trial (from then on it takes `fall` failures again).
///
/// `rise` and `fall` below 1 are treated as 1. Times are passed in (`now`) so that callers
/// and tests decide the clock.
#[derive(Debug, Clone)]
pub struct HealthState {
    rise: u32,
    fall: u32,
    health: Health,
    /// When `health` last changed (or the state was created); a failed first check, Down ->
    /// Down, leaves it.
    since: Instant,
    /// Consecutive successful active checks; only counts towards `rise` while Down.
    successes: u32,
    /// Consecutive failures, active or passive; only counts towards `fall` while Up.
    failures: u32,
    /// The failed active checks among `failures`: a successful connect forgives the others.
    failed_checks: u32,
    /// The latest active check's result.
    last_check: Option<Result<(), CheckError>>,
    /// Without active checks: how long passive failures keep the backend Down. `None` with
    /// active checks (they bring it back).
    hold_off: Option<Duration>,
    /// Down without active checks: when [`retry_due`](Self::retry_due) brings it back.
    retry_at: Option<Instant>,
    /// Put back Up after a hold-off and not seen working since: one failure takes it Down.
    on_trial: bool,
    /// Down until its first active check, which brings it Up if it passes (added or given
    /// back to a running service, or carried so by an upgrade; see
    /// [`HealthState::await_first_check`]).
    awaiting_first_check: bool,
    /// The latest passive failure, as the transition reasons word it.
    last_failure: Option<String>,
    /// Why the latest transition to Down happened (Up -> Down, or a failed first check).
    down_reason: Option<String>,
    /// Active checks that could not run for want of local resources ([`CheckError::Local`]).
    unknown_checks: u64,
    /// The [`monitor`] whose results this state takes (0: none yet). A reload replaces a
    /// backend's state and its checker; a replaced checker that is past its last await when
    /// it is aborted finds another id here and records nothing.
    checker: u64,
}

impl HealthState {
    /// A backend that is Up since `now`, with thresholds `rise` and `fall` (counts of
    /// consecutive checks, see the type's docs).
    pub fn new(rise: u32, fall: u32, now: Instant) -> Self {
        HealthState {
            rise: rise.max(1),
            fall: fall.max(1),
            health: Health::Up,
            since: now,
            successes: 0,
            failures: 0,
            failed_checks: 0,
            last_check: None,
            hold_off: None,
            retry_at: None,
            on_trial: false,
            awaiting_first_check: false,
            last_failure: None,
            down_reason: None,
            unknown_checks: 0,
            checker: 0,
        }
    }

    /// Makes checker `id` (a [`monitor`]'s, unique per backend; a new state is watched by 0)
    /// the one whose results this state takes from now on; an earlier one's are ignored.
    pub fn watched_by(&mut self, id: u64) {
        self.checker = id;
    }

    /// The state of a backend that returns at `now`, some time after it was forgotten: the
    /// verdict (and a hold-off running) stays, the streaks and the verdict's time start over.
    /// Checks from before it left, minutes apart from the next ones, must not count with
    /// them: one failure would take an Up backend Down on a streak begun before it left.
    pub fn resume(&mut self, now: Instant) {
        self.since = now;
        self.successes = 0;
        self.failures = 0;
        self.failed_checks = 0;
    }

    /// The same state for a backend with no active checks: passive failures take it Down
    /// for `hold_off`, then it is tried again (see the type's docs). A zero `hold_off` is
    /// treated as 1 ms.
    pub fn passive_only(mut self, hold_off: Duration) -> Self {
        self.hold_off = Some(hold_off.max(Duration::from_millis(1)));
        self
    }

    /// Puts an Up backend Down at `now` without a transition to report (`reason`, for the
    /// status): an upgrade's new daemon taking on the old one's verdict, or a reload that
    /// restarts a Down backend's health. It then comes back as any Down backend does: `rise`
    /// successful checks, or the hold-off without them.
    pub fn start_down(&mut self, reason: String, now: Instant) {
        if self.health == Health::Up {
            self.enter(Health::Down, reason, now);
        }
    }

    /// Puts a backend that is added or given back to a running service (a DNS answer, a
    /// reload; or one an upgrade carries as waiting) Down at `now` until its first active
    /// check: a pass brings it Up at once, whatever `rise`; a
    /// failure leaves it Down, to come Up after `rise` passes as any Down backend. Started Up
    /// as at the daemon's start, a backend that is not serving yet (a container whose
    /// process is still starting) would take new flows until `fall` checks failed, and the
    /// eBPF planes cannot retry a flow's connect elsewhere. Its [`monitor`] checks it at
    /// once, as any Down backend. Does nothing without active checks (nothing would bring
    /// it Up but a hold-off).
    pub fn await_first_check(&mut self, now: Instant) {
        if self.hold_off.is_some() {
            return;
        }
        if self.health == Health::Up {
            self.enter(
                Health::Down,
                "waiting for its first health check".into(),
                now,
            );
        }
        self.awaiting_first_check = true;
    }

    /// Whether the backend is Down until its first check
    /// ([`await_first_check`](Self::await_first_check)).
    pub fn awaiting_first_check(&self) -> bool {
        self.awaiting_first_check
    }

    /// The backend's current state.
    pub fn health(&self) -> Health {
        self.health
    }

    /// Records the result of an active check finished at `now`. Returns the transition it
    /// causes, if any: Up -> Down on the `fall`-th consecutive failure, Down -> Up on the
    /// `rise`-th consecutive success, or on the first check's success for a backend
    /// [awaiting it](Self::await_first_check); Down -> Down on that first check's failure
    /// (the flows the backend kept while it waited are then re-placed). A
    /// [`CheckError::Local`] result is unknown: it neither breaks nor extends a streak, only
    /// counts in [`unknown_checks`](Self::unknown_checks), and is not a first check.
    pub fn record_check(
        &mut self,
        result: Result<(), CheckError>,
        now: Instant,
    ) -> Option<Transition> {
        let transition = match &result {
            Ok(()) => {
                self.failures = 0;
                self.failed_checks = 0;
                self.successes = self.successes.saturating_add(1);
                let first = std::mem::take(&mut self.awaiting_first_check);
                if self.health == Health::Down && first {
                    Some(self.enter(Health::Up, "its first check passed".into(), now))
                } else if self.health == Health::Down && self.successes >= self.rise {
                    let reason = if self.successes == 1 {
                        "1 successful check".to_string()
                    } else {
                        format!("{} consecutive successful checks", self.successes)
                    };
                    Some(self.enter(Health::Up, reason, now))
                } else {
                    None
                }
            }
            Err(CheckError::Local(_)) => {
                self.unknown_checks = self.unknown_checks.saturating_add(1);
                None
            }
            Err(error) => {
                let first = std::mem::take(&mut self.awaiting_first_check);
                self.failed_checks = self.failed_checks.saturating_add(1);
                match self.failure(&error.to_string(), now) {
                    // Its flows were kept while it waited (`BackendView::awaiting_check`);
                    // known dead now, they must be re-placed: the snapshot is rebuilt.
                    None if first && self.health == Health::Down => {
                        let reason = match self.rise {
                            1 => format!("its first health check failed ({error})"),
                            rise => format!(
                                "its first health check failed ({error}); it needs {rise} \
                                 passing checks"
                            ),
                        };
                        // Down since it began to wait: `since` stays.
                        let since = self.since;
                        let transition = self.enter(Health::Down, reason, now);
                        self.since = since;
                        Some(transition)
                    }
                    transition => transition,
                }
            }
        };
        self.last_check = Some(result);
        transition
    }

    /// Records a failed proxy connect to the backend at `now` (`error`: what the connect
    /// returned, for the transition's reason). While Up it counts like a failed check towards
    /// `fall` and may return the Up -> Down transition (a backend on trial goes Down at the
    /// first one); while Down it is ignored.
    pub fn record_passive_failure(&mut self, error: &str, now: Instant) -> Option<Transition> {
        match self.health {
            Health::Up => {
                let what = format!("proxied connect failed: {error}");
                self.last_failure = Some(what.clone());
                self.failure(&what, now)
            }
            Health::Down => None,
        }
    }

    /// Records a successful proxy connect: while Up it takes the failed connects out of the
    /// failure streak (failed active checks stay in it: a backend that takes connections
    /// but fails its checks still goes Down) and ends a trial. It never brings a Down
    /// backend Up; only active checks or the end of a hold-off do.
    pub fn record_passive_success(&mut self) {
        if self.health == Health::Up {
            self.failures = self.failed_checks;
            self.on_trial = false;
        }
    }

    /// Without active checks: when the Down backend is due to be tried again, `None` when
    /// it is Up or has active checks.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Without active checks: brings a Down backend back Up, on trial, once its hold-off has
    /// run out at `now`, and returns that transition. `None` before then, while Up, and with
    /// active checks.
    pub fn retry_due(&mut self, now: Instant) -> Option<Transition> {
        let hold_off = self.hold_off?;
        if self.health != Health::Down || self.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        let reason = format!(
            "tried again after a {} hold-off (no active checks); one failure takes it down again",
            humantime::format_duration(hold_off)
        );
        let transition = self.enter(Health::Up, reason, now);
        self.on_trial = true;
        Some(transition)
    }

    /// What passive failures did to a backend without active checks, for the status, at
    /// `now`: "passive: 3 consecutive failures, last: proxied connect failed: connection
    /// refused; retry in 7s" while held off, "passive: on trial after a 10s hold-off" until
    /// it works again, "passive: 1 failure of 3, last: ..." during a streak. `None` when
    /// there is nothing to say or it has active checks.
    pub fn passive_summary(&self, now: Instant) -> Option<String> {
        let hold_off = self.hold_off?;
        match self.health {
            Health::Down => {
                let left = self
                    .retry_at
                    .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
                // Whole seconds, rounded up: "retry in 0s" would read as overdue.
                let secs = left.as_millis().div_ceil(1000);
                Some(format!(
                    "passive: {}; retry in {secs}s",
                    self.down_reason.as_deref().unwrap_or("down")
                ))
            }
            Health::Up if self.on_trial => Some(format!(
                "passive: on trial after a {} hold-off",
                humantime::format_duration(hold_off)
            )),
            Health::Up if self.failures > 0 => Some(format!(
                "passive: {} failure{} of {}, last: {}",
                self.failures,
                if self.failures == 1 { "" } else { "s" },
                self.fall,
                self.last_failure.as_deref().unwrap_or("unknown")
            )),
            Health::Up => None,
        }
    }

    /// Whether the backend is Up on trial after a passive hold-off: one failure takes it
    /// Down again, and the next successful connect ends the trial.
    pub fn on_trial(&self) -> bool {
        self.health == Health::Up && self.on_trial
    }

    /// The result of the latest active check, `None` before the first one.
    pub fn last_check(&self) -> Option<&Result<(), CheckError>> {
        self.last_check.as_ref()
    }

    /// Why the backend is Down (the reason of the transition that took it there, e.g. "3
    /// consecutive failures, last: ..."); `None` while it is Up.
    pub fn down_reason(&self) -> Option<&str> {
        match self.health {
            Health::Down => self.down_reason.as_deref(),
            Health::Up => None,
        }
    }

    /// Active checks that could not run for want of this host's resources, since creation
    /// (or since the state it replaced was created: [`HealthState::carry_from`]).
    pub fn unknown_checks(&self) -> u64 {
        self.unknown_checks
    }

    /// Takes from `old`, the state this one replaces (a reload changed the service's health
    /// settings), what does not depend on the settings: the count of unknown checks (which
    /// `/metrics` exports as a counter, and a counter must not go back), the latest check's
    /// result, and, when both say the same (Up or Down), since when that holds.
    pub fn carry_from(&mut self, old: &HealthState) {
        self.unknown_checks = self.unknown_checks.saturating_add(old.unknown_checks);
        if self.last_check.is_none() {
            self.last_check = old.last_check.clone();
        }
        if self.health == old.health {
            self.since = old.since;
        }
    }

    /// When the current state began: the last transition, or creation.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Counts one failure (`what` describes it) and takes an Up backend Down at `fall`.
    fn failure(&mut self, what: &str, now: Instant) -> Option<Transition> {
        self.successes = 0;
        self.failures = self.failures.saturating_add(1);
        let fall = if self.on_trial { 1 } else { self.fall };
        if self.health == Health::Up && self.failures >= fall {
            let reason = if self.on_trial {
                format!("failed on trial after a hold-off: {what}")
            } else if self.failures == 1 {
                format!("1 failure: {what}")
            } else {
                format!("{} consecutive failures, last: {what}", self.failures)
            };
            Some(self.enter(Health::Down, reason, now))
        } else {
            None
        }
    }

    /// Moves to `to` at `now`; streaks start over so that the next transition needs a full
    /// `rise` or `fall` run in the new state.
    fn enter(&mut self, to: Health, reason: String, now: Instant) -> Transition {
        let transition = Transition {
            from: self.health,
            to,
            reason,
            held_for: now.saturating_duration_since(self.since),
        };
        self.health = to;
        self.since = now;
        self.successes = 0;
        self.failures = 0;
        self.failed_checks = 0;
        self.on_trial = false;
        match to {
            Health::Down => {
                self.retry_at = self.hold_off.map(|hold| now + hold);
                self.down_reason = Some(transition.reason.clone());
            }
            Health::Up => self.retry_at = None,
        }
        transition
    }
}

/// One active check of the backend at `target` as `kind` says, bounded by `timeout` (the whole
/// check: connect, request and reply).
///
/// Returns `Ok(())` when the backend passes, else why it failed: `Err(CheckError::Timeout)`
/// when `timeout` ran out, `Refused`/`Unreachable` for those connect or ICMP errors,
/// `BadStatus`/`BadReply` when it answered wrongly. [`CheckKind::None`] always passes.
pub async fn check(
    target: SocketAddr,
    kind: &CheckKind,
    timeout: Duration,
) -> Result<(), CheckError> {
    check_behind(target, kind, timeout, ProxyProtocol::Off).await
}

/// [`check`] of a backend of a service that sends `proxy` (`proxy_protocol`): the check's
/// connection, or its datagram, starts with the header of a connection of the balancer's own
/// (v1 `PROXY UNKNOWN`, v2 `LOCAL`), as HAProxy's checks of a `send-proxy` server do. A
/// backend that requires the header closes a connection without one, and would be taken
/// down; with `tcp` the header is written and the connection closed.
pub async fn check_behind(
    target: SocketAddr,
    kind: &CheckKind,
    timeout: Duration,
    proxy: ProxyProtocol,
) -> Result<(), CheckError> {
    let header = crate::dataplane::proxy::local_header(proxy);
    let header = header.as_deref();
    let exchange = async {
        match kind {
            CheckKind::Tcp => tcp::check(target, header).await,
            CheckKind::Http {
                path,
                expect_status,
                host,
            } => http::check(target, header, path, host.as_deref(), *expect_status).await,
            CheckKind::Udp { send, expect } => {
                udp::check(target, header, send, expect.as_deref()).await
            }
            CheckKind::None => Ok(()),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_elapsed) => Err(CheckError::Timeout(timeout)),
    }
}

/// Runs active checks of the backend at `target` until the task is aborted.
///
/// One check per `check.interval`, the first one at a random point of the first interval
/// ([`first_check_after`]), or right away for a backend that starts Down; a check that overruns the
/// interval delays the next one instead of bunching them up (tokio's
/// `MissedTickBehavior::Delay`). Each result goes into `state` while `state` is watched by
/// `checker` ([`HealthState::watched_by`]); when it causes a transition, `on_transition` is
/// called with it after the lock is released. Once another checker watches `state` it
/// returns, recording nothing more. With [`CheckKind::None`] it returns at once and never
/// touches `state`. `proxy`: the service's `proxy_protocol`, which the checks send too
/// ([`check_behind`]).
pub async fn monitor(
    target: SocketAddr,
    check: HealthCheck,
    proxy: ProxyProtocol,
    state: Arc<Mutex<HealthState>>,
    checker: u64,
    on_transition: Arc<dyn Fn(&Transition) + Send + Sync>,
) {
    if check.kind == CheckKind::None {
        return;
    }
    // tokio panics on a zero period; config validation already forbids it.
    let period = check.interval.max(Duration::from_millis(1));
    let starts_down = state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .health()
        == Health::Down;
    let first = if starts_down {
        Duration::ZERO
    } else {
        first_check_after(period, target, checker)
    };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A shortage lasts many checks: said once when it starts and once when it ends.
    let mut short = false;
    loop {
        ticker.tick().await;
        let result = check_behind(target, &check.kind, check.timeout, proxy).await;
        match &result {
            Err(error @ CheckError::Local(_)) => {
                if !short {
                    tracing::warn!(
                        backend = %target,
                        "health check {error}; the backend keeps its state until checks can run"
                    );
                }
                short = true;
            }
            other => {
                if std::mem::take(&mut short) {
                    tracing::info!(backend = %target, "health checks run again");
                }
                if let Err(error) = other {
                    tracing::debug!(backend = %target, %error, "health check failed");
                }
            }
        }
        let transition = {
            // A panic elsewhere while holding the lock leaves counters that are still
            // meaningful, so keep checking rather than stop monitoring the backend.
            let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.checker != checker {
                // Replaced (a reload) while this check ran: its result is of the old check.
                return;
            }
            state.record_check(result, Instant::now())
        };
        if let Some(transition) = transition {
            on_transition(&transition);
        }
    }
}

/// When the first check of the backend at `target` (its checker `checker`) goes out: at a
/// random point of the first `period`, as HAProxy spreads its checks. The checkers of a
/// service start together (the daemon's start, a reload of `[service.health]`) and keep one
/// period: started at once, every backend would be checked in the same millisecond of
/// every interval, a burst of connects at hosts that carry several backends, or at a
/// firewall between.
fn first_check_after(period: Duration, target: SocketAddr, checker: u64) -> Duration {
    use std::hash::BuildHasher;
    // A hash with keys of its own (random per process, and per call), over values that
    // differ between checkers: a draw without a random-number crate.
    let draw = std::collections::hash_map::RandomState::new().hash_one((target, checker));
    let nanos = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(draw % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_health_settings_keep_the_unknown_checks_the_last_result_and_the_verdicts_age() {
        let t0 = Instant::now();
        let mut old = HealthState::new(2, 2, t0);
        old.record_check(Err(CheckError::Local("no port".into())), t0);
        old.record_check(Err(CheckError::Local("no port".into())), t0);
        assert_eq!(old.unknown_checks(), 2);
        let later = t0 + Duration::from_secs(60);
        let mut new = HealthState::new(3, 3, later);
        new.carry_from(&old);
        assert_eq!(new.unknown_checks(), 2, "a counter must not go back");
        assert!(new.last_check().is_some(), "the latest result stays shown");
        assert_eq!(new.since(), t0, "still Up since t0");
        let mut down = HealthState::new(3, 3, later);
        down.start_down("down before the reload".into(), later);
        down.carry_from(&old);
        assert_eq!(
            down.since(),
            later,
            "Down since the reload, not Up since t0"
        );
    }
    use tokio::net::{TcpListener, TcpSocket};
    use tokio::sync::mpsc;

    /// A `tcp` check every `interval`, each within `timeout`, `rise` 2 and `fall` as given.
    fn tcp_check(interval: Duration, timeout: Duration, fall: u32) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Tcp,
            interval,
            timeout,
            rise: 2,
            fall,
            passive_timeout: Duration::from_secs(10),
        }
    }

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn a_new_backend_is_up_and_goes_down_after_fall_failures() {
        let t0 = Instant::now();
        let mut s = HealthState::new(2, 3, t0);
        assert_eq!(s.health(), Health::Up, "a new backend should start UP");
        assert!(s.last_check().is_none(), "no check has run yet");
        assert!(s
            .record_check(Err(CheckError::Refused), at(t0, 1))
            .is_none());
        assert!(s
            .record_check(Err(CheckError::Refused), at(t0, 2))
            .is_none());
        assert_eq!(
            s.health(),
            Health::Up,
            "2 of fall=3 failures must not take it down"
        );
        let t = s
            .record_check(Err(CheckError::Refused), at(t0, 3))
            .expect("the 3rd consecutive failure should take the backend DOWN");
        assert_eq!((t.from, t.to), (Health::Up, Health::Down));
        assert_eq!(t.reason, "3 consecutive failures, last: connection refused");
        assert_eq!(
            t.held_for,
            Duration::from_secs(3),
            "it was UP from t0 to t0+3s"
        );
        assert_eq!(s.health(), Health::Down);
        assert_eq!(s.since(), at(t0, 3));
        assert_eq!(s.last_check(), Some(&Err(CheckError::Refused)));
    }

    #[test]
    fn a_backend_added_to_a_running_service_waits_for_its_first_check() {
        let t0 = Instant::now();
        let mut passing = HealthState::new(3, 3, t0);
        passing.await_first_check(t0);
        assert_eq!(
            passing.health(),
            Health::Down,
            "no flows before the first check"
        );
        let unknown = Err(CheckError::Local("no file descriptors".into()));
        assert!(passing.record_check(unknown, at(t0, 1)).is_none());
        assert!(
            passing.awaiting_first_check(),
            "a check that could not run is not the first check"
        );
        let up = passing
            .record_check(Ok(()), at(t0, 2))
            .expect("a first check that passes brings it Up, whatever rise");
        assert_eq!((up.from, up.to), (Health::Down, Health::Up));
        assert_eq!(up.reason, "its first check passed");
        assert!(!passing.awaiting_first_check());

        let mut failing = HealthState::new(3, 3, t0);
        failing.await_first_check(t0);
        let failed = failing
            .record_check(Err(CheckError::Refused), at(t0, 1))
            .expect("a failed first check is reported: the flows kept meanwhile are re-placed");
        assert_eq!((failed.from, failed.to), (Health::Down, Health::Down));
        assert!(!failing.awaiting_first_check());
        for k in 2..4 {
            assert!(
                failing.record_check(Ok(()), at(t0, k)).is_none(),
                "after a failed first check it needs rise = 3 passes"
            );
        }
        let up = failing
            .record_check(Ok(()), at(t0, 4))
            .expect("the 3rd pass");
        assert_eq!(up.reason, "3 consecutive successful checks");

        let mut passive = HealthState::new(3, 3, t0).passive_only(Duration::from_secs(10));
        passive.await_first_check(t0);
        assert_eq!(
            passive.health(),
            Health::Up,
            "without active checks nothing would bring it Up: it starts Up"
        );
        assert!(!passive.awaiting_first_check());
    }

    #[test]
    fn a_down_backend_comes_up_after_rise_successes() {
        let t0 = Instant::now();
        let mut s = HealthState::new(2, 1, t0);
        s.record_check(Err(CheckError::Timeout(Duration::from_secs(1))), at(t0, 1))
            .expect("fall=1: one failure takes it down");
        assert!(s.record_check(Ok(()), at(t0, 2)).is_none(), "1 of rise=2");
        assert_eq!(s.health(), Health::Down);
        let t = s
            .record_check(Ok(()), at(t0, 5))
            .expect("the 2nd consecutive success should bring it UP");
        assert_eq!((t.from, t.to), (Health::Down, Health::Up));
        assert_eq!(t.reason, "2 consecutive successful checks");
        assert_eq!(
            t.held_for,
            Duration::from_secs(4),
            "DOWN from t0+1s to t0+5s"
        );
        assert_eq!(s.since(), at(t0, 5));
        assert_eq!(s.last_check(), Some(&Ok(())));
    }

    #[test]
    fn a_success_resets_the_failure_streak_and_vice_versa() {
        let t0 = Instant::now();
        let mut s = HealthState::new(2, 2, t0);
        for i in 0..5 {
            assert!(s
                .record_check(Err(CheckError::Refused), at(t0, 2 * i))
                .is_none());
            assert!(s.record_check(Ok(()), at(t0, 2 * i + 1)).is_none());
        }
        assert_eq!(
            s.health(),
            Health::Up,
            "alternating results must never reach fall=2"
        );

        s.record_check(Err(CheckError::Refused), at(t0, 20));
        s.record_check(Err(CheckError::Refused), at(t0, 21))
            .expect("2 failures in a row should take it DOWN");
        for i in 0..5 {
            assert!(s.record_check(Ok(()), at(t0, 22 + 2 * i)).is_none());
            assert!(s
                .record_check(Err(CheckError::Refused), at(t0, 23 + 2 * i))
                .is_none());
        }
        assert_eq!(
            s.health(),
            Health::Down,
            "alternating results must never reach rise=2"
        );
    }

    #[test]
    fn a_transition_needs_a_full_new_streak() {
        let t0 = Instant::now();
        let mut s = HealthState::new(1, 2, t0);
        s.record_check(Err(CheckError::Refused), at(t0, 1));
        s.record_check(Err(CheckError::Refused), at(t0, 2))
            .expect("DOWN after fall=2");
        let up = s.record_check(Ok(()), at(t0, 3)).expect("UP after rise=1");
        assert_eq!(up.reason, "1 successful check");
        assert!(
            s.record_check(Err(CheckError::Refused), at(t0, 4))
                .is_none(),
            "the failure before going DOWN must not count again after coming back UP"
        );
        assert_eq!(s.health(), Health::Up);
    }

    #[test]
    fn successful_connects_do_not_forgive_failed_checks() {
        let t0 = Instant::now();
        let mut s = HealthState::new(2, 3, t0);
        // A degraded backend: its checks fail, one connect per interval fails, the next works.
        let mut down = None;
        for k in 0..10 {
            let t = at(t0, 3 * k);
            down = down.or(s.record_check(Err(CheckError::Timeout(Duration::from_secs(1))), t));
            down = down.or(s.record_passive_failure("refused", at(t, 1)));
            s.record_passive_success();
        }
        let down = down.expect("a backend failing every check never went DOWN");
        assert_eq!(down.to, Health::Down);

        // Failed connects alone are forgiven by a successful one.
        let mut s = HealthState::new(2, 3, t0);
        for k in 0..10 {
            assert!(s.record_passive_failure("refused", at(t0, 2 * k)).is_none());
            assert!(s
                .record_passive_failure("refused", at(t0, 2 * k + 1))
                .is_none());
            s.record_passive_success();
        }
        assert_eq!(s.health(), Health::Up);
    }

    #[test]
    fn passive_failures_count_towards_fall_with_active_ones() {
        let t0 = Instant::now();
        let mut s = HealthState::new(2, 3, t0);
        assert!(s
            .record_passive_failure("Connection refused (os error 111)", at(t0, 1))
            .is_none());
        assert!(s
            .record_check(Err(CheckError::Refused), at(t0, 2))
            .is_none());
        let t = s
            .record_passive_failure("Connection refused (os error 111)", at(t0, 3))
            .expect("2 passive + 1 active failures should reach fall=3");
        assert_eq!(t.to, Health::Down);
        assert_eq!(
            t.reason,
            "3 consecutive failures, last: proxied connect failed: Connection refused (os error 111)"
        );
        assert_eq!(
            s.last_check(),
            Some(&Err(CheckError::Refused)),
            "passive events are not checks"
        );
    }

    #[test]
    fn passive_events_never_bring_a_backend_up_and_are_ignored_while_down() {
        let t0 = Instant::now();
        let mut s = HealthState::new(2, 1, t0);
        s.record_check(Err(CheckError::Refused), at(t0, 1))
            .expect("DOWN after fall=1");
        s.record_check(Ok(()), at(t0, 2));
        for _ in 0..5 {
            s.record_passive_success();
        }
        assert_eq!(
            s.health(),
            Health::Down,
            "proxied connects must not bring it UP"
        );
        assert!(s.record_passive_failure("refused", at(t0, 3)).is_none());
        let t = s
            .record_check(Ok(()), at(t0, 4))
            .expect("a passive failure while DOWN must not reset the success streak");
        assert_eq!(t.to, Health::Up);
    }

    #[test]
    fn a_passive_success_resets_the_failure_streak() {
        let t0 = Instant::now();
        let mut s = HealthState::new(2, 2, t0);
        for i in 0..5 {
            assert!(s.record_passive_failure("refused", at(t0, i)).is_none());
            s.record_passive_success();
        }
        assert_eq!(
            s.health(),
            Health::Up,
            "each success should reset the streak"
        );
        s.record_passive_failure("refused", at(t0, 10));
        assert!(s.record_passive_failure("refused", at(t0, 11)).is_some());
    }

    #[test]
    fn without_checks_fall_failures_hold_a_backend_off_until_the_hold_off_ends() {
        let t0 = Instant::now();
        let mut s = HealthState::new(2, 3, t0).passive_only(Duration::from_secs(10));
        assert!(
            s.retry_due(at(t0, 100)).is_none(),
            "an UP backend has nothing to retry"
        );
        assert!(s.record_passive_failure("refused", at(t0, 1)).is_none());
        assert!(s.record_passive_failure("refused", at(t0, 2)).is_none());
        let down = s
            .record_passive_failure("refused", at(t0, 3))
            .expect("the 3rd consecutive passive failure should take it DOWN");
        assert_eq!(
            down.reason,
            "3 consecutive failures, last: proxied connect failed: refused"
        );
        assert_eq!(
            s.retry_at(),
            Some(at(t0, 13)),
            "held off for 10s from t0+3s"
        );
        assert!(
            s.retry_due(at(t0, 12)).is_none(),
            "retried 1s before the hold-off ran out"
        );
        assert_eq!(s.health(), Health::Down);
        let up = s
            .retry_due(at(t0, 13))
            .expect("the hold-off ran out: the backend should be tried again");
        assert_eq!((up.from, up.to), (Health::Down, Health::Up));
        assert_eq!(up.held_for, Duration::from_secs(10));
        assert_eq!(
            up.reason,
            "tried again after a 10s hold-off (no active checks); one failure takes it down again"
        );
        assert_eq!(s.retry_at(), None);
        assert!(
            s.retry_due(at(t0, 30)).is_none(),
            "an UP backend must not transition again"
        );
    }

    #[test]
    fn on_trial_one_failure_takes_it_down_again_and_a_success_ends_the_trial() {
        let t0 = Instant::now();
        let mut s = HealthState::new(2, 3, t0).passive_only(Duration::from_secs(5));
        for i in 1..=3 {
            s.record_passive_failure("refused", at(t0, i));
        }
        s.retry_due(at(t0, 8)).expect("tried again at t0+8s");
        let again = s
            .record_passive_failure("refused", at(t0, 9))
            .expect("on trial, the first failure should take it DOWN again");
        assert_eq!(
            again.reason,
            "failed on trial after a hold-off: proxied connect failed: refused"
        );
        assert_eq!(s.retry_at(), Some(at(t0, 14)), "a full new hold-off");
        s.retry_due(at(t0, 14)).expect("tried again at t0+14s");
        s.record_passive_success();
        assert!(s.record_passive_failure("refused", at(t0, 15)).is_none());
        assert!(
            s.record_passive_failure("refused", at(t0, 16)).is_none(),
            "after a success on trial it takes fall = 3 failures again"
        );
        assert!(s.record_passive_failure("refused", at(t0, 17)).is_some());
    }

    #[test]
    fn the_passive_summary_says_what_passive_failures_did() {
        let t0 = Instant::now();
        let mut s = HealthState::new(2, 2, t0).passive_only(Duration::from_secs(10));
        assert_eq!(s.passive_summary(t0), None, "nothing happened yet");
        s.record_passive_failure("connection refused", t0);
        assert_eq!(
            s.passive_summary(t0).as_deref(),
            Some("passive: 1 failure of 2, last: proxied connect failed: connection refused")
        );
        s.record_passive_failure("connection refused", at(t0, 1));
        assert_eq!(
            s.passive_summary(t0 + Duration::from_millis(3_500))
                .as_deref(),
            Some(
                "passive: 2 consecutive failures, last: proxied connect failed: \
                 connection refused; retry in 8s"
            ),
            "DOWN at t0+1s for 10s: at t0+3.5s 7.5s are left, shown rounded up"
        );
        s.retry_due(at(t0, 11));
        assert_eq!(
            s.passive_summary(at(t0, 11)).as_deref(),
            Some("passive: on trial after a 10s hold-off")
        );
        s.record_passive_success();
        assert_eq!(s.passive_summary(at(t0, 12)), None);

        let mut active = HealthState::new(2, 1, t0);
        active.record_passive_failure("refused", t0);
        assert_eq!(active.health(), Health::Down);
        assert_eq!(
            active.passive_summary(t0),
            None,
            "with active checks, last_check tells"
        );
        assert_eq!(active.retry_at(), None);
        assert!(
            active.retry_due(at(t0, 3600)).is_none(),
            "with active checks only they bring a backend back"
        );
    }

    #[test]
    fn a_local_shortage_is_unknown_and_leaves_state_and_streaks_alone() {
        let t0 = Instant::now();
        let short = || {
            Err(CheckError::Local(
                "Address already in use (os error 98)".into(),
            ))
        };
        let mut s = HealthState::new(2, 2, t0);
        for i in 1..=10 {
            assert!(s.record_check(short(), at(t0, i)).is_none());
        }
        assert_eq!(s.health(), Health::Up, "a shortage took a backend down");
        assert_eq!(s.unknown_checks(), 10);
        // A failure streak goes on across unknown checks, and is not reset by them.
        s.record_check(Err(CheckError::Refused), at(t0, 11));
        s.record_check(short(), at(t0, 12));
        let down = s
            .record_check(Err(CheckError::Refused), at(t0, 13))
            .expect("the second real failure");
        assert_eq!(down.to, Health::Down);
        // Nor do they bring a Down backend up.
        for i in 14..20 {
            assert!(s.record_check(short(), at(t0, i)).is_none());
        }
        assert_eq!(s.health(), Health::Down);
        assert_eq!(
            CheckError::from(io::Error::from_raw_os_error(libc::EMFILE)),
            CheckError::Local(io::Error::from_raw_os_error(libc::EMFILE).to_string())
        );
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let t0 = Instant::now();
        let mut s = HealthState::new(0, 0, t0);
        assert!(s.record_check(Err(CheckError::Refused), t0).is_some());
        assert!(s.record_check(Ok(()), t0).is_some());
    }

    #[test]
    fn errors_and_transitions_read_well_in_a_log_line() {
        assert_eq!(CheckError::Refused.to_string(), "connection refused");
        assert_eq!(
            CheckError::Timeout(Duration::from_secs(1)).to_string(),
            "timed out after 1s"
        );
        assert_eq!(
            CheckError::Timeout(Duration::from_millis(250)).to_string(),
            "timed out after 250ms"
        );
        assert_eq!(
            CheckError::BadStatus {
                got: 503,
                want: 200
            }
            .to_string(),
            "HTTP status 503, expected 200"
        );
        assert_eq!(Health::Up.to_string(), "UP");
        assert_eq!(Health::Down.to_string(), "DOWN");
        let t = Transition {
            from: Health::Up,
            to: Health::Down,
            reason: "3 consecutive failures, last: connection refused".into(),
            held_for: Duration::from_micros(12_345_678),
        };
        assert_eq!(
            t.to_string(),
            "UP -> DOWN after 12s 345ms: 3 consecutive failures, last: connection refused"
        );
    }

    #[test]
    fn io_errors_map_to_refused_and_unreachable() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(
            CheckError::from(os(libc::ECONNREFUSED)),
            CheckError::Refused
        );
        assert_eq!(
            CheckError::from(os(libc::EHOSTUNREACH)),
            CheckError::Unreachable
        );
        assert_eq!(
            CheckError::from(os(libc::ENETUNREACH)),
            CheckError::Unreachable
        );
        assert!(matches!(
            CheckError::from(os(libc::EPIPE)),
            CheckError::Io(text) if text.contains("os error")
        ));
    }

    /// A listener on `addr` (port 0 for any) that accepts and drops connections until the
    /// returned task is aborted; SO_REUSEADDR so it can be reopened on the same port.
    fn serve(addr: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let socket = TcpSocket::new_v4().expect("create a TCP socket");
        socket.set_reuseaddr(true).expect("set SO_REUSEADDR");
        socket.bind(addr).expect("bind the backend listener");
        let listener: TcpListener = socket.listen(64).expect("listen");
        let local = listener.local_addr().expect("listener address");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        (local, task)
    }

    #[tokio::test]
    async fn monitor_reports_down_after_fall_checks_and_up_after_reopen() {
        const INTERVAL: Duration = Duration::from_millis(50);
        let (addr, server) = serve("127.0.0.1:0".parse().expect("literal address"));
        let state = Arc::new(Mutex::new(HealthState::new(2, 3, Instant::now())));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let on_transition: Arc<dyn Fn(&Transition) + Send + Sync> = Arc::new(move |t| {
            let _ = tx.send(t.clone());
        });
        let check = tcp_check(INTERVAL, Duration::from_secs(1), 3);
        let monitor = tokio::spawn(monitor(
            addr,
            check,
            ProxyProtocol::Off,
            state.clone(),
            0,
            on_transition,
        ));

        // Wait (bounded) until a check has passed against the open listener.
        let mut passed = false;
        for _ in 0..100 {
            if matches!(state.lock().expect("lock").last_check(), Some(Ok(()))) {
                passed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            passed,
            "no health check passed against an open listener within 2s"
        );
        assert!(
            rx.try_recv().is_err(),
            "an UP backend that passes must not transition"
        );

        let closed_at = Instant::now();
        server.abort();
        let _ = server.await;
        let down = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no DOWN transition within 5s of closing the backend")
            .expect("monitor stopped");
        assert_eq!((down.from, down.to), (Health::Up, Health::Down));
        assert_eq!(
            down.reason,
            "3 consecutive failures, last: connection refused"
        );
        assert_eq!(state.lock().expect("lock").health(), Health::Down);

        let (reopened, server) = serve(addr);
        assert_eq!(reopened, addr);
        let up = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no UP transition within 5s of reopening the backend")
            .expect("monitor stopped");
        assert_eq!((up.from, up.to), (Health::Down, Health::Up));
        let up_seen_at = Instant::now();
        assert_eq!(up.reason, "2 consecutive successful checks");
        // It went DOWN after the listener closed and came UP before we saw it.
        assert!(
            up.held_for > Duration::ZERO && up.held_for <= up_seen_at - closed_at,
            "DOWN for {:?}, but the listener was closed only {:?} before",
            up.held_for,
            up_seen_at - closed_at
        );
        assert_eq!(state.lock().expect("lock").health(), Health::Up);

        monitor.abort();
        server.abort();
    }

    #[tokio::test]
    async fn a_replaced_checker_records_nothing_and_returns() {
        let mut fresh = HealthState::new(2, 1, Instant::now());
        fresh.watched_by(2);
        let state = Arc::new(Mutex::new(fresh));
        let check = tcp_check(Duration::from_millis(10), Duration::from_secs(1), 1);
        // Nothing listens on port 9 of loopback: a recorded check would take it DOWN.
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("literal address");
        tokio::time::timeout(
            Duration::from_secs(5),
            monitor(
                addr,
                check,
                ProxyProtocol::Off,
                state.clone(),
                1,
                Arc::new(|_: &Transition| {}),
            ),
        )
        .await
        .expect("checker 1 went on checking a state checker 2 watches");
        let state = state.lock().expect("lock");
        assert!(state.last_check().is_none());
        assert_eq!(state.health(), Health::Up);
    }

    /// Checkers started together check their backends spread over the interval, not in one
    /// burst: 40 of them against one listener, each first connect's time.
    #[tokio::test]
    async fn checkers_started_together_spread_their_first_checks_over_the_interval() {
        const CHECKERS: u64 = 40;
        const PERIOD: Duration = Duration::from_secs(1);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("listener address");
        let check = tcp_check(PERIOD, Duration::from_millis(500), 3);
        let started = Instant::now();
        let monitors: Vec<_> = (1..=CHECKERS)
            .map(|id| {
                let state = Arc::new(Mutex::new(HealthState::new(2, 3, started)));
                state.lock().expect("fresh").watched_by(id);
                tokio::spawn(monitor(
                    addr,
                    check.clone(),
                    ProxyProtocol::Off,
                    state,
                    id,
                    Arc::new(|_: &Transition| {}),
                ))
            })
            .collect();
        let mut first = Vec::new();
        while first.len() < CHECKERS as usize {
            let accepted = tokio::time::timeout(2 * PERIOD, listener.accept()).await;
            let Ok(Ok(_)) = accepted else {
                panic!("only {} of {CHECKERS} checks came within 2 s", first.len());
            };
            first.push(started.elapsed());
        }
        for m in monitors {
            m.abort();
        }
        let spread = first[first.len() - 1].saturating_sub(first[0]);
        assert!(
            spread >= PERIOD / 2,
            "the first checks of {CHECKERS} backends came within {spread:?} of each other; \
             spread over the {PERIOD:?} interval they take most of it: {first:?}"
        );
    }

    #[tokio::test]
    async fn monitor_with_no_checks_returns_at_once() {
        let state = Arc::new(Mutex::new(HealthState::new(2, 3, Instant::now())));
        let check = HealthCheck {
            kind: CheckKind::None,
            ..tcp_check(Duration::from_millis(50), Duration::from_secs(1), 3)
        };
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("literal address");
        tokio::time::timeout(
            Duration::from_secs(5),
            monitor(
                addr,
                check,
                ProxyProtocol::Off,
                state.clone(),
                0,
                Arc::new(|_: &Transition| {}),
            ),
        )
        .await
        .expect("monitor with kind none should return at once");
        assert!(state.lock().expect("lock").last_check().is_none());
    }
}
