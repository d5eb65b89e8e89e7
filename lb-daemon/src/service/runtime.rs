//! [`ServiceRuntime`]: one configured service at run time.
//!
//! - One lock over the service's state (config, backend set, tasks) serialises every change
//!   and every snapshot publication.
//! - The tasks: one active health check per backend, one resolver per DNS name, and a ticker
//!   for slow start, passive hold-offs and forgetting drained backends.
//! - Every change ends in [`ServiceRuntime::republish`]: a new scheduler (and Maglev table)
//!   built from the backend set, swapped in whole.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::task::AbortHandle;
use tracing::{debug, error, info, warn};

use super::backends::{new_health, BackendRuntime, BackendSet, BackendSource};
use super::{lock, round_ms};
use crate::config::SchedulerKind;
use crate::config::{default_max_flows, open_file_limit, CheckKind, HealthCheck, Service};
use crate::discovery;
use crate::health::{self, Health, HealthState, Transition};
use crate::scheduler::{self, Candidate, SchedulerError, Turn};
use crate::snapshot::{ServiceSnapshot, SharedSnapshot};

/// A configured service at run time: its backends' state and its published snapshot.
pub struct ServiceRuntime {
    index: usize,
    pub(super) name: String,
    pub(super) state: Mutex<State>,
    /// The backends by address, for the data plane's connect reports (no lock taken).
    pub(super) by_address: ArcSwap<HashMap<SocketAddr, Arc<BackendRuntime>>>,
    pub(super) snapshot: SharedSnapshot,
    generation: AtomicU64,
    /// The turn counter of the round-robin and least-connections schedulers, kept across
    /// rebuilds.
    turn: Turn,
    /// Whether the last snapshot had more eligible backends than its Maglev table has
    /// slots (see [`ServiceRuntime::republish`]), so that this is logged once per change.
    over_table: AtomicBool,
    /// Whether the last snapshot had no eligible backend, so that the service's outage is
    /// logged once when it begins and once when it ends, not at every rebuild.
    no_backend: AtomicBool,
    /// Lets tasks (checks, resolvers, the ticker) hold a weak reference to the service.
    this: Weak<ServiceRuntime>,
}

/// The service's mutable state; its lock also serialises rebuilds.
pub(super) struct State {
    pub(super) config: Service,
    pub(super) backends: BackendSet,
    /// The active health check of each backend (none with `kind = "none"`).
    checkers: HashMap<SocketAddr, AbortHandle>,
    /// The id of the last checker started ([`HealthState::watched_by`]).
    next_checker: u64,
    /// Discovery tasks, one per DNS name of the config.
    resolvers: Vec<AbortHandle>,
    /// The periodic task that steps slow starts and forgets drained removed backends.
    ticker: Option<AbortHandle>,
    /// The runtime tasks are spawned on; `None` until [`ServiceRuntime::start`].
    runtime: Option<tokio::runtime::Handle>,
}

/// Warns when `health`'s active checks may take longer (`timeout`) than the time between two
/// (`interval`): a check is still running when the next is due, so a backend that does not
/// answer is checked back to back, once per `timeout`, and found down after `fall` timeouts,
/// not `fall` intervals. Allowed, as HAProxy allows a `timeout check` above `inter`.
fn warn_of_long_timeout(name: &str, health: &HealthCheck) {
    if health.kind == CheckKind::None || health.timeout <= health.interval {
        return;
    }
    let fmt = |d: Duration| humantime::format_duration(d).to_string();
    let (timeout, interval) = (fmt(health.timeout), fmt(health.interval));
    warn!(
        "service {name}: health.timeout ({timeout}) is longer than health.interval \
         ({interval}): a backend that does not answer is checked back to back, once every \
         {timeout}, and found down after {} such checks",
        health.fall
    );
}

impl ServiceRuntime {
    /// Sets up service number `index` from its validated config and publishes its first
    /// snapshot, with every static backend up (HAProxy's default: a backend needs `fall`
    /// failed checks to go down). Backends given by DNS name appear once resolved, after
    /// [`ServiceRuntime::start`].
    ///
    /// Returns `Err(SchedulerError)` only if the scheduler cannot be built from a config that
    /// validation accepted, which would be a bug.
    pub fn new(index: usize, config: Service) -> Result<Arc<Self>, SchedulerError> {
        let now = Instant::now();
        let backends = BackendSet::new(config.health.clone(), &static_backends(&config), now);
        let turn = Turn::default();
        let first = build_snapshot(&config, &backends, 1, now, &turn)?;
        let by_address = backends.by_address();
        Ok(Arc::new_cyclic(|this| ServiceRuntime {
            index,
            name: config.name.clone(),
            state: Mutex::new(State {
                config,
                backends,
                checkers: HashMap::new(),
                next_checker: 0,
                resolvers: Vec::new(),
                ticker: None,
                runtime: None,
            }),
            by_address: ArcSwap::from_pointee(by_address),
            snapshot: Arc::new(ArcSwap::from_pointee(first)),
            generation: AtomicU64::new(1),
            turn,
            over_table: AtomicBool::new(false),
            no_backend: AtomicBool::new(false),
            this: this.clone(),
        }))
    }

    /// The service's number, as data planes report it in
    /// [`FlowEvents`](crate::dataplane::FlowEvents). Unique for the daemon's lifetime.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The service's current config (a copy: reloads replace it).
    pub fn config(&self) -> Service {
        lock(&self.state).config.clone()
    }

    /// The snapshot the data planes read; it is replaced whole on every change.
    pub fn snapshot(&self) -> SharedSnapshot {
        Arc::clone(&self.snapshot)
    }

    /// Starts the service's control tasks on the current tokio runtime: one active health
    /// check per backend (none with `kind = "none"`), one resolver per DNS name, and a ticker
    /// for slow start and removals. [`ServiceRuntime::stop`] ends them.
    ///
    /// Panics outside a tokio runtime.
    pub fn start(&self) {
        let mut st = lock(&self.state);
        st.runtime = Some(tokio::runtime::Handle::current());
        let addresses: Vec<SocketAddr> = st.backends.iter().map(|b| b.address()).collect();
        for address in addresses {
            self.spawn_checker(&mut st, address);
        }
        self.spawn_resolvers(&mut st);
        self.restart_ticker(&mut st);
        warn_of_long_timeout(&self.name, &st.config.health);
    }

    /// Stops every task [`ServiceRuntime::start`] started; none starts again (a resolver
    /// past its last await may still hand in an answer).
    pub fn stop(&self) {
        let mut st = lock(&self.state);
        st.runtime = None;
        for (_, c) in st.checkers.drain() {
            c.abort();
        }
        for r in st.resolvers.drain(..) {
            r.abort();
        }
        if let Some(t) = st.ticker.take() {
            t.abort();
        }
    }

    /// Connections and sessions open to this service's backends now.
    pub fn active(&self) -> u64 {
        lock(&self.state)
            .backends
            .iter()
            .map(|b| b.rt.stats.active())
            .sum()
    }

    /// Applies a reloaded config of this service. The listen address and protocol must be
    /// the same (the reload replaces a service whose are not). Static backends that stay keep
    /// their counters and health; new ones start (with slow start, if set) down until their
    /// first check while another backend is up (`BackendSet::reconcile`); the ones that left
    /// drain and are forgotten once idle; weight changes clear admin weights.
    pub fn update(&self, config: Service) {
        let mut st = lock(&self.state);
        let now = Instant::now();
        // Active checks send the service's PROXY protocol header too.
        let checks_changed = st.config.health != config.health;
        let health_changed = checks_changed
            || (st.config.proxy_protocol != config.proxy_protocol
                && config.health.kind != CheckKind::None);
        let discovery_changed = st.config.discovered != config.discovered
            || st.config.resolve_interval != config.resolve_interval;
        let slow_start_changed = st.config.slow_start != config.slow_start;
        st.config = config;
        for address in reconcile_config(&mut st, now) {
            self.spawn_checker(&mut st, address);
        }
        if health_changed {
            self.restart_health(&mut st, now);
            if checks_changed {
                warn_of_long_timeout(&self.name, &st.config.health);
            }
        }
        if discovery_changed {
            self.spawn_resolvers(&mut st);
        }
        if slow_start_changed || health_changed {
            self.restart_ticker(&mut st);
        }
        self.by_address.store(Arc::new(st.backends.by_address()));
        self.republish(&st);
    }

    /// Gives every backend a fresh health state under the new `[service.health]` and
    /// restarts its check. The verdict carries over; new thresholds, interval and kind apply
    /// from now (without active checks, a new hold-off starts now).
    fn restart_health(&self, st: &mut State, now: Instant) {
        let health = &st.config.health;
        for b in st.backends.iter() {
            // Read and replaced under one lock: a failed connect in between would be lost.
            let mut state = lock(&b.rt.health);
            let mut fresh = new_health(health, now);
            if state.awaiting_first_check() {
                fresh.await_first_check(now);
            } else if state.health() == Health::Down {
                fresh.start_down("down before the reload".into(), now);
            }
            fresh.carry_from(&state);
            *state = fresh;
        }
        let addresses: Vec<SocketAddr> = st.backends.iter().map(|b| b.address()).collect();
        for address in addresses {
            self.spawn_checker(st, address);
        }
    }

    /// Sets the backends resolved from DNS name `name` (`host:port`) to `addresses`, each
    /// with the weight the config gives the name: new addresses are added (with slow start);
    /// the name lets go of the ones it no longer returns, which leave (drain, forgotten once
    /// idle) unless the config or another name still asks for them.
    ///
    /// Does nothing when the config no longer lists `name`: a resolver task that a reload
    /// aborted may already be waiting for this lock (an abort cannot stop it there), and its
    /// answer must not bring back a name [`ServiceRuntime::update`] has just let go.
    pub fn set_discovered(&self, name: &str, addresses: &[SocketAddr]) {
        let mut st = lock(&self.state);
        let Some(weight) = st
            .config
            .discovered
            .iter()
            .find(|d| d.to_string() == name)
            .map(|d| d.weight)
        else {
            return;
        };
        let desired: Vec<(SocketAddr, u32)> = addresses.iter().map(|&a| (a, weight)).collect();
        let source = BackendSource::Dns(name.to_string());
        let running = st.runtime.is_some();
        let changes = (st.backends).reconcile(&source, &desired, running, Instant::now());
        if changes.is_empty() {
            return;
        }
        for &address in &changes.added {
            self.spawn_checker(&mut st, address);
        }
        self.by_address.store(Arc::new(st.backends.by_address()));
        let generation = self.republish(&st);
        let added: Vec<SocketAddr> = changes
            .returned
            .iter()
            .chain(&changes.added)
            .copied()
            .collect();
        info!(
            "service {}: {name} resolves to {} addresses; added {added:?}, draining {:?} (table generation {})",
            self.name,
            addresses.len(),
            changes.leaving,
            generation.map_or_else(|| "unchanged".to_string(), |g| g.to_string())
        );
    }

    /// Applies a health transition that `health` recorded for `backend`: a backend that
    /// came up starts its slow start; the snapshot is republished, then the transition
    /// logged. Does nothing when `health` is no longer the backend's state: the backend was
    /// forgotten (and perhaps added again, with a state of its own) while the transition
    /// waited for the lock.
    pub(super) fn transitioned(
        &self,
        backend: SocketAddr,
        health: &Arc<Mutex<HealthState>>,
        t: &Transition,
    ) {
        let mut st = lock(&self.state);
        let Some(b) = (st.backends.get_mut(backend)).filter(|b| Arc::ptr_eq(&b.rt.health, health))
        else {
            debug!(
                "service {}: backend {backend}'s transition {t} came after it was forgotten; \
                 ignored",
                self.name
            );
            return;
        };
        if t.to == Health::Up {
            b.weight.start_ramp(Instant::now());
        }
        // Publish before logging: once the line is out, every new flow is placed by a table
        // that reflects it. Flows placed by an older generation may still be connecting.
        let generation = self.republish(&st);
        drop(st);
        self.log_transition(backend, t, generation);
    }

    fn log_transition(&self, backend: SocketAddr, t: &Transition, generation: Option<u64>) {
        let held = humantime::format_duration(round_ms(t.held_for));
        let table = match generation {
            Some(g) => format!("table generation {g}"),
            None => "table unchanged".to_string(),
        };
        match t.to {
            Health::Down if t.from == Health::Down => warn!(
                "backend {backend} of service {} stays DOWN: {}; it waited {held} ({table})",
                self.name, t.reason
            ),
            Health::Down => warn!(
                "backend {backend} of service {} is DOWN: {}; it was {} for {held} ({table})",
                self.name, t.reason, t.from
            ),
            Health::Up => info!(
                "backend {backend} of service {} is UP: {}; it was {} for {held} ({table})",
                self.name, t.reason, t.from
            ),
        }
    }

    /// Brings back backends whose passive hold-off ran out (no active checks), steps slow
    /// starts (a rebuild when an effective weight changed) and forgets removed backends whose
    /// last connection closed.
    pub(super) fn tick(&self) {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let current = self.snapshot.load_full();
        let mut retried = Vec::new();
        for b in st.backends.iter_mut() {
            let t = lock(&b.rt.health).retry_due(now);
            if let Some(t) = t {
                b.rt.stats.report_next_success();
                b.weight.start_ramp(now);
                retried.push((b.address(), t));
            }
        }
        let mut changed = !retried.is_empty();
        changed |= step_slow_starts(&mut st, &current, now);
        changed |= self.forget_idle(&mut st);
        if changed {
            let generation = self.republish(&st);
            drop(st);
            for (backend, t) in &retried {
                self.log_transition(*backend, t, generation);
            }
        }
    }

    /// Forgets the removed backends whose last connection closed and stops their checks.
    /// Returns whether any was forgotten.
    fn forget_idle(&self, st: &mut State) -> bool {
        let forgotten = st.backends.forget_idle(Instant::now());
        if forgotten.is_empty() {
            return false;
        }
        for address in &forgotten {
            if let Some(c) = st.checkers.remove(address) {
                c.abort();
            }
        }
        self.by_address.store(Arc::new(st.backends.by_address()));
        info!(
            "service {}: removed backends {forgotten:?} (drained, no connection left)",
            self.name
        );
        true
    }

    /// (Re)starts the active health check of `address`; with `kind = "none"` only stops the
    /// old one. Does nothing before [`ServiceRuntime::start`].
    fn spawn_checker(&self, st: &mut State, address: SocketAddr) {
        let Some(rt) = st.runtime.clone() else { return };
        if let Some(old) = st.checkers.remove(&address) {
            old.abort();
        }
        let Some(b) = st.backends.get(address) else {
            return;
        };
        // An aborted checker past its last await would still record one result.
        st.next_checker += 1;
        let checker = st.next_checker;
        lock(&b.rt.health).watched_by(checker);
        if st.config.health.kind == CheckKind::None {
            return;
        }
        let weak = self.this.clone();
        let health = Arc::clone(&b.rt.health);
        let on_transition: Arc<dyn Fn(&Transition) + Send + Sync> =
            Arc::new(move |t: &Transition| {
                if let Some(s) = weak.upgrade() {
                    s.transitioned(address, &health, t);
                }
            });
        let task = rt.spawn(health::monitor(
            address,
            st.config.health.clone(),
            st.config.proxy_protocol,
            Arc::clone(&b.rt.health),
            checker,
            on_transition,
        ));
        st.checkers.insert(address, task.abort_handle());
    }

    /// Takes `addresses`, an answer for the name `label`, for a service listening on
    /// `listen` (`local`: the host's addresses when that is a wildcard): an address that
    /// reaches the service's own listener is left out (the service would connect to itself),
    /// warned of once (`warned`).
    fn take_answer(
        &self,
        label: &str,
        addresses: &[SocketAddr],
        listen: SocketAddr,
        local: &std::collections::BTreeSet<std::net::IpAddr>,
        warned: &AtomicBool,
    ) {
        let (looped, kept): (Vec<SocketAddr>, Vec<SocketAddr>) = addresses
            .iter()
            .partition(|a| crate::host_addrs::reaches_listener(**a, listen, local));
        if !looped.is_empty() && !warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "service {}: {label} resolves to {looped:?}, the service's own listen \
                 address; ignoring it",
                self.name
            );
        }
        self.set_discovered(label, &kept);
    }

    /// The addresses each of the service's DNS names gives now, by `name:port`: to start it
    /// again as a new service with them ([`ServiceRuntime::take_first_answers`]).
    pub fn dns_answers(&self) -> HashMap<String, Vec<SocketAddr>> {
        let st = lock(&self.state);
        (st.config.discovered.iter())
            .map(|d| {
                let label = d.to_string();
                let addresses = st
                    .backends
                    .addresses_from(&BackendSource::Dns(label.clone()));
                (label, addresses)
            })
            .filter(|(_, a)| !a.is_empty())
            .collect()
    }

    /// Takes the first answers for the service's DNS names (`answers`: by `name:port`, from
    /// `discovery::resolve_now`) before the service is placed, so that its first table has
    /// those backends, at full weight at once as the configured ones (no flows yet for slow
    /// start to protect them from). A name without an answer is left to its resolver task,
    /// which [`ServiceRuntime::start`] starts.
    pub fn take_first_answers(&self, answers: &HashMap<String, Vec<SocketAddr>>) {
        let (names, listen) = {
            let st = lock(&self.state);
            (st.config.discovered.clone(), st.config.listen)
        };
        let answered: Vec<(String, &Vec<SocketAddr>)> = (names.iter())
            .filter_map(|n| answers.get(&n.to_string()).map(|a| (n.to_string(), a)))
            .collect();
        if answered.is_empty() {
            return;
        }
        let local = if listen.ip().is_unspecified() {
            crate::host_addrs::local_addresses().unwrap_or_default()
        } else {
            Default::default()
        };
        let warned = AtomicBool::new(false);
        for (label, addresses) in answered {
            self.take_answer(&label, addresses, listen, &local, &warned);
        }
        let mut st = lock(&self.state);
        let now = Instant::now();
        for b in st.backends.iter_mut() {
            b.weight.finish_ramp(None, now);
        }
        self.republish(&st);
    }

    /// (Re)starts one resolver per DNS name of the config; each hands its answers to
    /// [`ServiceRuntime::set_discovered`].
    fn spawn_resolvers(&self, st: &mut State) {
        for r in st.resolvers.drain(..) {
            r.abort();
        }
        let Some(rt) = st.runtime.clone() else { return };
        let listen = st.config.listen;
        let local = if listen.ip().is_unspecified() && !st.config.discovered.is_empty() {
            crate::host_addrs::local_addresses().unwrap_or_default()
        } else {
            Default::default()
        };
        for d in &st.config.discovered {
            let weak = self.this.clone();
            let label = d.to_string();
            let local = local.clone();
            let warned = AtomicBool::new(false);
            // The resolver holds the service weakly and ends once it is gone.
            let on_answer = move |addresses: &[SocketAddr]| {
                let Some(s) = weak.upgrade() else {
                    return ControlFlow::Break(());
                };
                s.take_answer(&label, addresses, listen, &local, &warned);
                ControlFlow::Continue(())
            };
            st.resolvers.push(
                rt.spawn(discovery::follow(
                    self.name.clone(),
                    d.clone(),
                    st.config.resolve_interval,
                    on_answer,
                ))
                .abort_handle(),
            );
        }
    }

    fn restart_ticker(&self, st: &mut State) {
        let Some(rt) = st.runtime.clone() else { return };
        if let Some(t) = st.ticker.take() {
            t.abort();
        }
        let weak = self.this.clone();
        let period = tick_period(&st.config);
        st.ticker = Some(
            rt.spawn(async move {
                let mut t = tokio::time::interval(period);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    t.tick().await;
                    let Some(s) = weak.upgrade() else { return };
                    s.tick();
                }
            })
            .abort_handle(),
        );
    }

    /// Builds a snapshot from the backends' current state and publishes it. Returns its
    /// generation, or `None` when the build failed and the previous snapshot stays. The
    /// caller holds the state lock, which serialises publications.
    pub(super) fn republish(&self, st: &MutexGuard<'_, State>) -> Option<u64> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        match build_snapshot(
            &st.config,
            &st.backends,
            generation,
            Instant::now(),
            &self.turn,
        ) {
            Ok(snap) => {
                self.note_table_room(&st.config, &snap);
                let none = snap.eligible_count() == 0;
                if self.no_backend.swap(none, Ordering::Relaxed) != none {
                    let protocol = st.config.protocol.to_string().to_uppercase();
                    if none {
                        error!(
                            "service {} has no backend up: new {protocol} flows are refused \
                             until one returns",
                            self.name
                        );
                    } else {
                        info!(
                            "service {} has a backend up again: new {protocol} flows are served",
                            self.name
                        );
                    }
                }
                self.snapshot.store(Arc::new(snap));
                Some(generation)
            }
            Err(e) => {
                error!(
                    "service {}: could not rebuild the scheduler ({e}); keeping the previous table",
                    self.name
                );
                None
            }
        }
    }
}

impl ServiceRuntime {
    /// Logs when the eligible backends of `snap` come to outnumber the slots of the
    /// service's Maglev table (`maglev` and `source_hash` schedulers), and when they no
    /// longer do. Validation keeps the static backends within `table_size`, but a DNS name
    /// may answer with more addresses; the table is then built all the same and the
    /// backends whose weight share is under one slot get none (they take flows only on a
    /// retry), rather than the service keeping an old table that a health change no longer
    /// reaches.
    fn note_table_room(&self, config: &Service, snap: &ServiceSnapshot) {
        let hashed = matches!(
            config.scheduler,
            SchedulerKind::Maglev | SchedulerKind::SourceHash
        );
        let eligible = snap.eligible_count();
        let over = hashed && eligible > config.table_size as usize;
        if self.over_table.swap(over, Ordering::Relaxed) == over {
            return;
        }
        if over {
            warn!(
                "service {}: {eligible} eligible backends outnumber the {} slots of its Maglev \
                 table (table_size): some get no slot and new flows only when a retry \
                 reaches them; raise table_size",
                self.name, config.table_size
            );
        } else {
            info!(
                "service {}: its Maglev table has a slot for every eligible backend again",
                self.name
            );
        }
    }
}

/// The config's static backends as (address, weight), in config order.
fn static_backends(config: &Service) -> Vec<(SocketAddr, u32)> {
    config
        .backends
        .iter()
        .map(|b| (b.address, b.weight))
        .collect()
}

/// Makes the backend set follow a reloaded config (already in `st.config`): its static
/// addresses, then each DNS name's weight. A reload does not resolve: a name still in the
/// config keeps the addresses of its last answer, at its new weight; a name gone from it
/// lets go of them. Returns the backends added (each needs a health check).
fn reconcile_config(st: &mut State, now: Instant) -> Vec<SocketAddr> {
    st.backends.set_health_settings(st.config.health.clone());
    let statics = static_backends(&st.config);
    let names: Vec<(String, u32)> = (st.config.discovered.iter())
        .map(|d| (d.to_string(), d.weight))
        .collect();
    // The static backends a reload adds wait for their first check only while a backend
    // stays up (`BackendSet::reconcile`): not one a name this reload drops still gives.
    let running = st.runtime.is_some() && st.backends.up_after(&statics, &names, now);
    let added = st
        .backends
        .reconcile(&BackendSource::Static, &statics, running, now)
        .added;
    // Alphabetically, as a backend's sources are ordered: the first one gives its weight.
    for name in st.backends.dns_names() {
        let weight = st
            .config
            .discovered
            .iter()
            .find(|d| d.to_string() == name)
            .map(|d| d.weight);
        let source = BackendSource::Dns(name);
        let desired: Vec<(SocketAddr, u32)> = match weight {
            Some(w) => st
                .backends
                .addresses_from(&source)
                .into_iter()
                .map(|a| (a, w))
                .collect(),
            None => Vec::new(),
        };
        st.backends.reconcile(&source, &desired, running, now);
    }
    added
}

/// Ends the slow starts that ran their length. Returns whether the effective weight of a
/// backend that is up now differs from the one `current` (the published snapshot) has. A
/// down backend's ramp goes on unpublished: no scheduler holds it, and the health change
/// that brings it back publishes its weight of the moment.
fn step_slow_starts(st: &mut State, current: &ServiceSnapshot, now: Instant) -> bool {
    let slow = st.config.slow_start;
    let mut changed = false;
    for b in st.backends.iter_mut() {
        b.weight.finish_ramp(slow, now);
        let published = current.backends.iter().find(|v| v.address == b.address());
        if published.is_some_and(|v| v.up && v.weight != b.effective_weight(slow, now)) {
            changed = true;
        }
    }
    changed
}

/// How often the ticker runs: about 10 steps per slow-start ramp, and a tenth of the passive
/// hold-off without active checks (so a backend returns within 10% of it); at least every
/// 100 ms, at most every second.
fn tick_period(config: &Service) -> Duration {
    let mut period = Duration::from_secs(1);
    if let Some(ramp) = config.slow_start {
        period = period.min(ramp / 10);
    }
    if config.health.kind == CheckKind::None {
        period = period.min(config.health.passive_timeout / 10);
    }
    period.max(Duration::from_millis(100))
}

/// The snapshot of `backends` now, numbered `generation`, with a scheduler over the
/// eligible ones (none when no backend is eligible).
fn build_snapshot(
    config: &Service,
    backends: &BackendSet,
    generation: u64,
    now: Instant,
    turn: &Turn,
) -> Result<ServiceSnapshot, SchedulerError> {
    let views = backends.views(config.slow_start, now);
    let candidates: Vec<Candidate> = views
        .iter()
        .enumerate()
        .filter(|(_, v)| v.eligible())
        .map(|(id, v)| Candidate {
            id,
            address: v.address,
            weight: v.weight,
            stats: Arc::clone(&v.stats),
        })
        .collect();
    let scheduler = if candidates.is_empty() {
        None
    } else {
        Some(scheduler::build(
            config.scheduler,
            candidates,
            config.table_size,
            turn,
        )?)
    };
    Ok(ServiceSnapshot {
        name: Arc::from(config.name.as_str()),
        listen: config.listen,
        protocol: config.protocol,
        scheduler_kind: config.scheduler,
        connect_timeout: config.connect_timeout,
        idle_timeout: config.idle_timeout,
        retries: config.retries,
        backends: views,
        scheduler,
        generation,
        proxy_protocol: config.proxy_protocol,
        limits: config.limits,
        max_flows: config
            .max_flows
            .unwrap_or_else(|| default_max_flows(config.protocol, open_file_limit())),
        access_log: config.access_log,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;
    use crate::service::WEIGHT_SCALE;

    /// A service with health checks off, the given static backends and DNS names (`host:port`).
    fn with_backends(statics: &[&str], names: &[&str]) -> Service {
        let mut text = String::from(
            r#"
[[service]]
name = "app"
listen = "127.0.0.1:8080"
protocol = "tcp"
scheduler = "round_robin"
[service.health]
kind = "none"
"#,
        );
        for b in statics.iter().chain(names) {
            text.push_str(&format!("[[service.backend]]\naddress = \"{b}\"\n"));
        }
        config::parse(&text, Path::new("test.toml"))
            .expect("valid test config")
            .services
            .remove(0)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("literal address")
    }

    /// `backend`'s state and origin in the status, `None` when the service has forgotten it.
    fn state_of(rt: &ServiceRuntime, backend: &str) -> Option<(&'static str, String)> {
        rt.status()
            .backends
            .into_iter()
            .find(|b| b.address == addr(backend))
            .map(|b| (b.state, b.origin))
    }

    /// Whether `backend` takes new flows in the published table.
    fn takes_flows(rt: &ServiceRuntime, backend: &str) -> bool {
        rt.snapshot()
            .load()
            .backends
            .iter()
            .any(|b| b.address == addr(backend) && b.eligible())
    }

    /// A service with `scheduler`, `table_size` (when given), passive health only
    /// (`fall = 1`), and the given static backends and DNS names.
    fn scheduled(
        scheduler: &str,
        table_size: Option<u32>,
        statics: &[&str],
        names: &[&str],
    ) -> Service {
        let mut text = format!(
            "[[service]]\nname = \"app\"\nlisten = \"127.0.0.1:8080\"\nprotocol = \"tcp\"\n\
             scheduler = \"{scheduler}\"\n"
        );
        if let Some(size) = table_size {
            text.push_str(&format!("table_size = {size}\n"));
        }
        text.push_str("[service.health]\nkind = \"none\"\nfall = 1\n");
        for b in statics.iter().chain(names) {
            text.push_str(&format!("[[service.backend]]\naddress = \"{b}\"\n"));
        }
        config::parse(&text, Path::new("test.toml"))
            .expect("valid test config")
            .services
            .remove(0)
    }

    /// The backend the published scheduler gives the flow from client port `port`.
    fn pick(rt: &ServiceRuntime, port: u16) -> Option<SocketAddr> {
        let snap = rt.snapshot().load_full();
        let flow = lb_common::FlowKey {
            src_addr: [u32::from_ne_bytes([127, 0, 0, 9]), 0, 0, 0],
            dst_addr: [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0],
            src_port: port,
            dst_port: 8080,
            protocol: lb_common::flow::IPPROTO_TCP,
            family: lb_common::maps::FAMILY_V4,
            _pad: [0; 2],
        };
        let id = snap.scheduler.as_ref()?.pick(&flow, &[])?;
        Some(snap.backends[id].address)
    }

    #[test]
    fn a_service_takes_its_names_first_answers_at_full_weight_before_it_is_placed() {
        let mut svc = scheduled("maglev", None, &["127.0.0.1:9001"], &["n.test:9100"]);
        svc.slow_start = Some(Duration::from_secs(600));
        svc.discovered[0].weight = 10;
        let rt = ServiceRuntime::new(0, svc).expect("builds");
        assert_eq!(
            rt.snapshot().load().backends.len(),
            1,
            "the configured one only"
        );
        let answers = HashMap::from([
            ("n.test:9100".to_string(), vec![addr("10.0.0.1:9100")]),
            ("other.test:9100".to_string(), vec![addr("10.0.0.9:9100")]),
        ]);
        rt.take_first_answers(&answers);
        let snap = rt.snapshot().load_full();
        let got: Vec<(SocketAddr, u32)> = (snap.backends.iter())
            .map(|b| (b.address, b.weight))
            .collect();
        assert_eq!(
            got,
            vec![
                (addr("127.0.0.1:9001"), WEIGHT_SCALE),
                (addr("10.0.0.1:9100"), 10 * WEIGHT_SCALE)
            ],
            "the name's answer, at full weight (no slow start before any flow), and no other"
        );
        assert_eq!(rt.status().backends[1].state, "active", "not in slow start");
    }

    /// A configured address that a reload removes and a later one adds back starts afresh:
    /// its drain is not remembered, as a reload promises (a DNS answer's would be).
    #[test]
    fn a_configured_backend_a_reload_adds_back_is_not_drained_any_more() {
        let both = scheduled("maglev", None, &["127.0.0.1:9001", "127.0.0.1:9002"], &[]);
        let rt = ServiceRuntime::new(0, both.clone()).expect("builds");
        let b = addr("127.0.0.1:9002");
        rt.drain(b).expect("a backend");
        rt.update(scheduled("maglev", None, &["127.0.0.1:9001"], &[]));
        rt.tick();
        assert_eq!(rt.status().backends.len(), 1, "9002 was forgotten");
        rt.update(both);
        assert!(takes_flows(&rt, "127.0.0.1:9002"), "9002 came back drained");
    }

    /// An upgrade's (or a move's) carried state of a backend that a DNS name gives and has
    /// not answered yet waits for the answer that brings the backend.
    #[test]
    fn carried_state_of_a_backend_dns_has_not_given_yet_waits_for_its_answer() {
        let rt = ServiceRuntime::new(0, scheduled("maglev", None, &[], &["n.test:9100"]))
            .expect("builds");
        let (a, b) = (addr("10.0.0.1:9100"), addr("10.0.0.2:9100"));
        let carried = |address, drained, down| crate::handover::CarriedBackend {
            service: "app".into(),
            address,
            drained,
            admin_weight: None,
            down,
            awaiting_check: false,
        };
        rt.carry_over(&[carried(a, true, false), carried(b, false, true)]);
        rt.set_discovered("n.test:9100", &[a, b, addr("10.0.0.3:9100")]);
        assert!(!takes_flows(&rt, "10.0.0.1:9100"), "a comes drained");
        assert!(!takes_flows(&rt, "10.0.0.2:9100"), "b comes down");
        assert!(takes_flows(&rt, "10.0.0.3:9100"));
    }

    /// A resolver answering a rotating subset of a name's records: an address that was down
    /// leaves one answer, is forgotten (no connection left), and comes back in the next. It
    /// must come back down, not up taking flows it fails.
    #[test]
    fn a_down_backend_that_a_dns_answer_leaves_out_briefly_comes_back_down() {
        let rt = ServiceRuntime::new(0, scheduled("maglev", None, &[], &["n.test:9100"]))
            .expect("builds");
        let (a, b) = (addr("10.0.0.1:9100"), addr("10.0.0.2:9100"));
        rt.set_discovered("n.test:9100", &[a, b]);
        rt.passive_failure(b, "connection refused");
        assert!(!takes_flows(&rt, "10.0.0.2:9100"), "b is down");
        rt.set_discovered("n.test:9100", &[a]);
        rt.tick();
        assert!(
            rt.status().backends.iter().all(|s| s.address != b),
            "b, left out and with no connection, was not forgotten"
        );
        rt.set_discovered("n.test:9100", &[a, b]);
        assert!(
            !takes_flows(&rt, "10.0.0.2:9100"),
            "b came back up from a DNS answer while it was down"
        );
        assert!(takes_flows(&rt, "10.0.0.1:9100"));
    }

    /// The same for what the admin API set: a drained address stays drained, a weighed one
    /// keeps its weight, across an answer that left them out.
    #[test]
    fn a_drained_backend_that_a_dns_answer_leaves_out_briefly_comes_back_drained() {
        let rt = ServiceRuntime::new(0, scheduled("maglev", None, &[], &["n.test:9100"]))
            .expect("builds");
        let (a, b, c) = (
            addr("10.0.0.1:9100"),
            addr("10.0.0.2:9100"),
            addr("10.0.0.3:9100"),
        );
        rt.set_discovered("n.test:9100", &[a, b, c]);
        rt.drain(b).expect("a backend");
        rt.set_weight(c, 7).expect("a backend");
        rt.set_discovered("n.test:9100", &[a]);
        rt.tick();
        assert_eq!(rt.status().backends.len(), 1, "b and c were forgotten");
        rt.set_discovered("n.test:9100", &[a, b, c]);
        assert!(
            !takes_flows(&rt, "10.0.0.2:9100"),
            "b came back from a DNS answer undrained"
        );
        let status = rt.status();
        let c_now = (status.backends.iter())
            .find(|s| s.address == c)
            .expect("c is back");
        assert_eq!(c_now.weight, 7, "c came back without its admin weight");
    }

    #[test]
    fn a_name_answering_more_addresses_than_table_slots_leaves_health_changes_in_force() {
        let rt = ServiceRuntime::new(
            0,
            scheduled("maglev", Some(3), &["127.0.0.1:9001"], &["many.test:9100"]),
        )
        .expect("builds");
        let answer: Vec<SocketAddr> = (1..=4).map(|i| addr(&format!("10.0.0.{i}:9100"))).collect();
        rt.set_discovered("many.test:9100", &answer);
        assert!(
            answer.iter().all(|a| takes_flows(&rt, &a.to_string())),
            "the answer's 4 addresses never reached the published table"
        );
        rt.passive_failure(addr("127.0.0.1:9001"), "connection refused");
        assert!(!takes_flows(&rt, "127.0.0.1:9001"));
        for port in 1..=1000 {
            let got = pick(&rt, port).expect("a backend");
            assert_ne!(
                got,
                addr("127.0.0.1:9001"),
                "flow {port} went to the backend that is down"
            );
        }
    }

    #[test]
    fn round_robin_goes_on_across_rebuilds() {
        // `least_conn` too: with no connection open every backend ties, and its scan's start
        // takes the turns.
        for scheduler in ["round_robin", "weighted_round_robin", "least_conn"] {
            let backends = [
                "127.0.0.1:9001",
                "127.0.0.1:9002",
                "127.0.0.1:9003",
                "127.0.0.1:9004",
            ];
            let rt =
                ServiceRuntime::new(0, scheduled(scheduler, None, &backends, &[])).expect("builds");
            let mut got: HashMap<SocketAddr, u32> = HashMap::new();
            // Two flows per rebuild, fewer than the backends: a slow-start ramp or a
            // flapping backend on a quiet service.
            for i in 0..100u16 {
                rt.set_weight(addr("127.0.0.1:9004"), 1 + u32::from(i % 2))
                    .expect("a known backend");
                for port in [2 * i, 2 * i + 1] {
                    *got.entry(pick(&rt, port).expect("a backend")).or_default() += 1;
                }
            }
            for b in backends {
                assert!(
                    got.get(&addr(b)).copied().unwrap_or(0) >= 20,
                    "{scheduler}: {b} got {:?} of 200 flows: {got:?}",
                    got.get(&addr(b))
                );
            }
        }
    }

    #[test]
    fn a_backend_two_names_return_stays_while_one_still_does() {
        let rt = ServiceRuntime::new(0, with_backends(&[], &["one.test:9100", "two.test:9100"]))
            .expect("builds");
        rt.set_discovered("one.test:9100", &[addr("10.0.0.5:9100")]);
        rt.set_discovered("two.test:9100", &[addr("10.0.0.5:9100")]);
        assert_eq!(
            state_of(&rt, "10.0.0.5:9100"),
            Some(("active", "one.test:9100,two.test:9100".to_string()))
        );
        rt.set_discovered("one.test:9100", &[addr("10.0.0.6:9100")]);
        assert!(
            takes_flows(&rt, "10.0.0.5:9100"),
            "two.test still returns 10.0.0.5, yet it left when one.test stopped returning it"
        );
        rt.set_discovered("two.test:9100", &[addr("10.0.0.7:9100")]);
        assert_eq!(
            state_of(&rt, "10.0.0.5:9100").map(|s| s.0),
            Some("removing"),
            "no name returns 10.0.0.5 any more"
        );
        assert!(!takes_flows(&rt, "10.0.0.5:9100"));
    }

    #[test]
    fn a_discovered_backend_the_config_also_lists_stays_when_its_name_drops_it() {
        let rt = ServiceRuntime::new(0, with_backends(&["127.0.0.1:9001"], &["one.test:9200"]))
            .expect("builds");
        rt.set_discovered("one.test:9200", &[addr("127.0.0.1:9200")]);
        // A reload lists the discovered address statically too.
        rt.update(with_backends(
            &["127.0.0.1:9001", "127.0.0.1:9200"],
            &["one.test:9200"],
        ));
        assert_eq!(
            state_of(&rt, "127.0.0.1:9200"),
            Some(("active", "static,one.test:9200".to_string()))
        );
        rt.set_discovered("one.test:9200", &[addr("127.0.0.1:9201")]);
        assert!(
            takes_flows(&rt, "127.0.0.1:9200"),
            "the config lists 127.0.0.1:9200, yet it left when one.test stopped returning it"
        );
        assert_eq!(
            state_of(&rt, "127.0.0.1:9200"),
            Some(("active", "static".to_string()))
        );
    }

    #[test]
    fn a_static_backend_a_name_also_returns_stays_when_the_config_drops_it() {
        let rt = ServiceRuntime::new(0, with_backends(&["127.0.0.1:9001"], &["one.test:9001"]))
            .expect("builds");
        rt.set_discovered("one.test:9001", &[addr("127.0.0.1:9001")]);
        rt.update(with_backends(&[], &["one.test:9001"]));
        assert!(
            takes_flows(&rt, "127.0.0.1:9001"),
            "one.test still returns 127.0.0.1:9001, yet it left with its static entry"
        );
        // The name itself leaves the config: nothing asks for the backend any more.
        rt.update(with_backends(&["127.0.0.1:9002"], &[]));
        assert_eq!(
            state_of(&rt, "127.0.0.1:9001").map(|s| s.0),
            Some("removing")
        );
        assert!(!takes_flows(&rt, "127.0.0.1:9001"));
    }

    #[test]
    fn an_answer_for_a_name_a_reload_dropped_is_ignored() {
        let rt = ServiceRuntime::new(0, with_backends(&["127.0.0.1:9001"], &["one.test:9100"]))
            .expect("builds");
        rt.set_discovered("one.test:9100", &[addr("10.0.0.5:9100")]);
        rt.update(with_backends(&["127.0.0.1:9001"], &[]));
        // The aborted resolver was already waiting for the lock with a fresh answer.
        rt.set_discovered(
            "one.test:9100",
            &[addr("10.0.0.5:9100"), addr("10.0.0.6:9100")],
        );
        assert!(
            !takes_flows(&rt, "10.0.0.5:9100"),
            "one.test left the config, yet a late answer for it kept 10.0.0.5 taking flows"
        );
        assert_eq!(
            state_of(&rt, "10.0.0.5:9100").map(|s| s.0),
            Some("removing"),
            "10.0.0.5 must drain: no configured name returns it"
        );
        assert_eq!(
            state_of(&rt, "10.0.0.6:9100"),
            None,
            "a late answer for a dropped name added a backend"
        );
    }

    /// A connect already under way when `fall` failures took a backend down succeeds during
    /// its hold-off (ignored: it is down). Tried again on trial, its next successful connect
    /// still ends the trial, and it takes `fall` failures again, not one.
    #[test]
    fn a_success_during_the_hold_off_does_not_keep_the_backend_on_trial() {
        let mut c = scheduled("round_robin", None, &["127.0.0.1:9001"], &[]);
        c.health.passive_timeout = Duration::from_millis(50);
        let rt = ServiceRuntime::new(0, c).expect("builds");
        let a = addr("127.0.0.1:9001");
        let stats = Arc::clone(&lock(&rt.state).backends.get(a).expect("listed").rt.stats);
        let succeeded = || {
            stats.connect_succeeded(|| {
                rt.passive_success(a);
                true
            })
        };
        stats.connect_failed(|| rt.passive_failure(a, "connection refused"));
        assert!(!takes_flows(&rt, "127.0.0.1:9001"), "fall = 1 took it down");
        succeeded();
        std::thread::sleep(Duration::from_millis(80));
        rt.tick();
        assert!(
            takes_flows(&rt, "127.0.0.1:9001"),
            "tried again after the hold-off"
        );
        succeeded();
        let status = rt.status();
        let b = status
            .backends
            .iter()
            .find(|b| b.address == a)
            .expect("listed");
        assert_eq!(
            b.last_check, None,
            "a successful connect on trial did not end the trial"
        );
    }

    /// A backend that went down during its slow start ramps on unpublished: the table is not
    /// rebuilt (nor "no backend up" logged again) at every tick of a ramp no scheduler uses.
    #[test]
    fn a_down_backends_ramp_rebuilds_nothing() {
        let mut c = scheduled("round_robin", None, &["127.0.0.1:9001"], &[]);
        c.slow_start = Some(Duration::from_secs(10));
        c.backends[0].weight = 100;
        let rt = ServiceRuntime::new(0, c).expect("builds");
        let a = addr("127.0.0.1:9001");
        (lock(&rt.state).backends.get_mut(a).expect("listed").weight).start_ramp(Instant::now());
        rt.passive_failure(a, "connection refused");
        assert!(!takes_flows(&rt, "127.0.0.1:9001"));
        let before = rt.snapshot().load().generation;
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(50));
            rt.tick();
        }
        assert_eq!(
            rt.snapshot().load().generation,
            before,
            "a tick rebuilt the table for the ramp of a backend that is down"
        );
    }

    #[test]
    fn a_transition_of_a_forgotten_backends_state_leaves_the_one_added_again_alone() {
        let ramp = Duration::from_secs(60);
        let config = |statics: &[&str]| {
            let mut c = scheduled("round_robin", None, statics, &[]);
            c.slow_start = Some(ramp);
            for b in &mut c.backends {
                b.weight = 100;
            }
            c
        };
        let a = addr("127.0.0.1:9001");
        let rt =
            ServiceRuntime::new(0, config(&["127.0.0.1:9001", "127.0.0.1:9002"])).expect("builds");
        let forgotten = Arc::clone(&lock(&rt.state).backends.get(a).expect("listed").rt.health);
        rt.update(config(&["127.0.0.1:9002"]));
        rt.tick();
        assert_eq!(state_of(&rt, "127.0.0.1:9001"), None, "not forgotten");
        rt.update(config(&["127.0.0.1:9001", "127.0.0.1:9002"]));
        {
            let mut st = lock(&rt.state);
            let b = st.backends.get_mut(a).expect("added again");
            b.weight.finish_ramp(Some(ramp), Instant::now() + ramp);
        }
        // The forgotten entry's checker, aborted past its last await, was waiting for the
        // lock with this.
        let up = Transition {
            from: Health::Down,
            to: Health::Up,
            reason: "2 consecutive successful checks".into(),
            held_for: Duration::from_secs(3),
        };
        rt.transitioned(a, &forgotten, &up);
        let st = lock(&rt.state);
        let b = st.backends.get(a).expect("still listed");
        assert_eq!(
            b.weight.effective(Some(ramp), Instant::now()),
            100 * WEIGHT_SCALE,
            "the forgotten entry's transition started a slow start on its successor"
        );
    }

    /// A backend waiting for its first check keeps the flows already on it (a reload gave it
    /// back); once that check fails the snapshot must say so, or the flows stay on a dead
    /// server until some other change republishes.
    #[tokio::test]
    async fn a_failed_first_check_takes_the_kept_flows_off_the_backend() {
        let checked = |statics: &[&str]| {
            let mut c = with_backends(statics, &[]);
            c.health.kind = CheckKind::Tcp;
            c.health.interval = Duration::from_secs(3600);
            c
        };
        // A port nothing listens on: the first check, sent at once, is refused.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .to_string();
        let rt = ServiceRuntime::new(0, checked(&["127.0.0.1:9001"])).expect("builds");
        rt.start();
        rt.update(checked(&["127.0.0.1:9001", &dead]));
        let view = |rt: &ServiceRuntime| {
            (rt.snapshot().load().backends.iter())
                .find(|b| b.address == addr(&dead))
                .cloned()
                .expect("listed")
        };
        let until = Instant::now() + Duration::from_secs(5);
        while view(&rt).keeps_flows() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let b = view(&rt);
        rt.stop();
        assert!(
            !b.keeps_flows(),
            "the failed first check was not published: the backend keeps its flows"
        );
        assert!(!b.eligible());
    }

    #[tokio::test]
    async fn backends_a_reload_adds_wait_for_a_check_only_while_another_stays_up() {
        // Checks every hour: none passes during the test, so a waiting backend stays down.
        let checked = |statics: &[&str], names: &[&str]| {
            let mut c = with_backends(statics, names);
            c.health.kind = CheckKind::Tcp;
            c.health.interval = Duration::from_secs(3600);
            c
        };
        let rt = ServiceRuntime::new(0, checked(&["127.0.0.1:9001"], &["one.test:9100"]))
            .expect("builds");
        rt.start();
        rt.set_discovered("one.test:9100", &[addr("10.0.0.5:9100")]);
        assert!(
            !takes_flows(&rt, "10.0.0.5:9100"),
            "a record added beside an up backend takes flows before its first check"
        );
        rt.stop();
        // A service on a name alone, up; a reload replaces the name by a static backend.
        let rt = ServiceRuntime::new(0, checked(&[], &["one.test:9100"])).expect("builds");
        rt.take_first_answers(&[("one.test:9100".to_string(), vec![addr("10.0.0.5:9100")])].into());
        rt.start();
        assert!(takes_flows(&rt, "10.0.0.5:9100"));
        rt.update(checked(&["127.0.0.1:9002"], &[]));
        assert!(
            takes_flows(&rt, "127.0.0.1:9002"),
            "the only backend a reload leaves waits for its first check: the service has none"
        );
        rt.stop();
        // The only backend, from two names; a reload sets the first to weight 0 (which then
        // gives the backend its weight) and adds a static one: that one must not wait.
        let rt =
            ServiceRuntime::new(0, checked(&[], &["a.test:9100", "b.test:9100"])).expect("builds");
        let x = vec![addr("10.0.0.5:9100")];
        rt.take_first_answers(
            &[
                ("a.test:9100".to_string(), x.clone()),
                ("b.test:9100".to_string(), x),
            ]
            .into(),
        );
        rt.start();
        let mut reloaded = checked(&["127.0.0.1:9003"], &["a.test:9100", "b.test:9100"]);
        reloaded.discovered[0].weight = 0;
        rt.update(reloaded);
        assert!(
            !takes_flows(&rt, "10.0.0.5:9100"),
            "weight 0 from its first name"
        );
        assert!(
            takes_flows(&rt, "127.0.0.1:9003"),
            "the new static backend waits for its first check while no other takes flows"
        );
        rt.stop();
        // A reload that lists a name's address statically keeps it as it was: no new ramp.
        let ramped = |statics: &[&str], names: &[&str]| {
            let mut c = checked(statics, names);
            c.slow_start = Some(Duration::from_secs(600));
            c
        };
        let rt = ServiceRuntime::new(0, ramped(&[], &["one.test:9100"])).expect("builds");
        rt.take_first_answers(&[("one.test:9100".to_string(), vec![addr("10.0.0.5:9100")])].into());
        rt.start();
        rt.update(ramped(&["10.0.0.5:9100"], &[]));
        assert_eq!(
            state_of(&rt, "10.0.0.5:9100"),
            Some(("active", "static".to_string())),
            "the backend the reload lists statically instead started over"
        );
        rt.stop();
    }

    #[tokio::test]
    async fn an_answer_after_stop_starts_no_check() {
        let mut c = with_backends(&["127.0.0.1:9001"], &["one.test:9100"]);
        c.health.kind = CheckKind::Tcp;
        let rt = ServiceRuntime::new(0, c).expect("builds");
        rt.start();
        rt.stop();
        // A resolver past its last await when stopped hands in its answer.
        rt.set_discovered("one.test:9100", &[addr("10.0.0.5:9100")]);
        assert!(
            lock(&rt.state).checkers.is_empty(),
            "a stopped service started a health check nothing will stop"
        );
    }

    #[test]
    fn a_leaving_backend_a_name_returns_again_comes_back() {
        let rt = ServiceRuntime::new(0, with_backends(&["127.0.0.1:9001"], &["one.test:9100"]))
            .expect("builds");
        rt.set_discovered("one.test:9100", &[addr("10.0.0.5:9100")]);
        rt.set_discovered("one.test:9100", &[addr("10.0.0.6:9100")]);
        assert!(!takes_flows(&rt, "10.0.0.5:9100"));
        rt.set_discovered("one.test:9100", &[addr("10.0.0.5:9100")]);
        assert_eq!(
            state_of(&rt, "10.0.0.5:9100"),
            Some(("active", "one.test:9100".to_string()))
        );
        assert!(takes_flows(&rt, "10.0.0.5:9100"));
    }
}
