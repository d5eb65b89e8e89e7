//! The control plane's view of one service: its backends' health, weights and admin state,
//! and the snapshots it publishes to the data planes.
//!
//! Health checks, passive failures, admin calls (drain, enable, weight), reloads and DNS
//! discovery all change a backend's state; every change rebuilds the service's scheduler (and
//! so its Maglev table) from scratch and swaps the new [`ServiceSnapshot`] in whole. Changes
//! of one service are serialised by one lock, so a rebuild never publishes an older view
//! after a newer one.
//!
//! A backend is known by its address for the life of the daemon: when a reload or a DNS
//! answer keeps it, it keeps its counters and its health state. A backend that leaves the
//! config or DNS is drained (no new flows) and forgotten once its last connection closes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::task::AbortHandle;
use tracing::{error, info, warn};

use crate::admin::status::{BackendStatus, ServiceStatus};
use crate::config::{CheckKind, Service, MAX_WEIGHT};
use crate::dataplane::FlowEvents;
use crate::discovery;
use crate::health::{self, Health, HealthState, Transition};
use crate::scheduler::{self, Candidate, SchedulerError};
use crate::snapshot::{BackendStats, BackendView, ServiceSnapshot, SharedSnapshot};

/// What the data plane hot path needs of a backend, reachable without the service's lock.
struct BackendRuntime {
    address: SocketAddr,
    health: Arc<Mutex<HealthState>>,
    stats: Arc<BackendStats>,
}

/// Where a backend comes from. A backend may come from several places at once (a static
/// address that a DNS name also returns): it stays while one of them still asks for it.
/// Ordered static first, then names alphabetically (`name:port` as a string), which is the
/// order in which they give its weight: the static entry's, else that of the alphabetically
/// first name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// An `ip:port` in the config file.
    Static,
    /// A record of this `name:port` in the config file.
    Dns(String),
}

/// A backend's state as the control plane keeps it (under the service's lock).
struct BackendEntry {
    rt: Arc<BackendRuntime>,
    /// Every origin that asks for this backend now, with the weight it gives. Empty once
    /// none does: the backend is leaving (weight 0, forgotten once its last connection
    /// closes).
    owners: BTreeMap<Origin, u32>,
    /// The owners as the status shows them (`static`, `app:3000`, joined by `,`); kept as
    /// they last were while the backend is leaving.
    label: String,
    /// The weight of its first owner (see [`Origin`]): the config file's for a static
    /// address, else its first DNS name's.
    configured: u32,
    /// A weight set through the admin API; cleared when a reload changes `configured`.
    admin_weight: Option<u32>,
    /// Drained through the admin API: weight 0 until enabled.
    drained: bool,
    /// Slow start began here (the backend came up, was enabled or added).
    ramp_start: Option<Instant>,
    checker: Option<AbortHandle>,
}

impl BackendEntry {
    /// A backend that `origin` asks for with `weight`.
    fn new(rt: Arc<BackendRuntime>, origin: Origin, weight: u32) -> BackendEntry {
        let mut b = BackendEntry {
            rt,
            owners: BTreeMap::new(),
            label: String::new(),
            configured: weight,
            admin_weight: None,
            drained: false,
            ramp_start: None,
            checker: None,
        };
        b.owners.insert(origin, weight);
        b.settle();
        b
    }

    /// Gone from the config and from DNS: no origin asks for it any more.
    fn removing(&self) -> bool {
        self.owners.is_empty()
    }

    /// Records whether `origin` asks for this backend now (`Some(weight)`) or not (`None`).
    /// A backend that was leaving and is asked for again returns to service (with slow
    /// start from `now`). Returns whether anything changed.
    fn own(&mut self, origin: &Origin, weight: Option<u32>, now: Instant) -> bool {
        let was_removing = self.removing();
        let changed = match weight {
            Some(w) => self.owners.insert(origin.clone(), w) != Some(w),
            None => self.owners.remove(origin).is_some(),
        };
        if was_removing && !self.removing() {
            self.ramp_start = Some(now);
        }
        self.settle();
        changed
    }

    /// Follows the owners: the first one's weight (a new configured weight clears an admin
    /// weight) and the status label. Nothing changes while no owner is left.
    fn settle(&mut self) {
        let Some((_, &weight)) = self.owners.first_key_value() else {
            return;
        };
        if weight != self.configured {
            self.configured = weight;
            self.admin_weight = None;
        }
        let names: Vec<&str> = self
            .owners
            .keys()
            .map(|o| match o {
                Origin::Static => "static",
                Origin::Dns(name) => name.as_str(),
            })
            .collect();
        self.label = names.join(",");
    }

    fn base_weight(&self) -> u32 {
        self.admin_weight.unwrap_or(self.configured)
    }

    /// The weight the scheduler gets now: 0 while drained or removed, ramping from 1 to the
    /// full weight during slow start.
    fn effective_weight(&self, slow_start: Option<Duration>, now: Instant) -> u32 {
        if self.drained || self.removing() {
            return 0;
        }
        let full = self.base_weight();
        match (slow_start, self.ramp_start) {
            (Some(ramp), Some(t)) if full > 0 && now.duration_since(t) < ramp => {
                let part = now.duration_since(t).as_secs_f64() / ramp.as_secs_f64();
                ((f64::from(full) * part) as u32).clamp(1, full)
            }
            _ => full,
        }
    }
}

/// The service's mutable state; its lock also serialises rebuilds.
struct State {
    config: Service,
    backends: Vec<BackendEntry>,
    /// Discovery tasks, one per DNS name of the config.
    resolvers: Vec<AbortHandle>,
    /// The periodic task that steps slow starts and forgets drained removed backends.
    ticker: Option<AbortHandle>,
    /// The runtime tasks are spawned on; `None` until [`ServiceRuntime::start`].
    runtime: Option<tokio::runtime::Handle>,
}

/// Why an admin call on a backend was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminError {
    /// No service has this name.
    #[error("no service is named `{0}`")]
    NoService(String),
    /// The service has no backend at this address.
    #[error("service `{service}` has no backend {backend}")]
    NoBackend {
        /// The service's name.
        service: String,
        /// The address asked for.
        backend: String,
    },
    /// The weight is above [`MAX_WEIGHT`].
    #[error("weight {0} is out of range 0..={MAX_WEIGHT}")]
    Weight(u32),
    /// The backend is leaving (removed from the config or DNS); it cannot be enabled.
    #[error("backend {0} is being removed (it left the config or DNS) and cannot be changed")]
    Removing(SocketAddr),
}

/// A configured service at run time: its backends' state and its published snapshot.
pub struct ServiceRuntime {
    index: usize,
    name: String,
    state: Mutex<State>,
    /// The backends by address, for the data plane's connect reports (no lock taken).
    by_address: ArcSwap<HashMap<SocketAddr, Arc<BackendRuntime>>>,
    snapshot: SharedSnapshot,
    generation: AtomicU64,
    /// Lets tasks (checks, the ticker) hold a weak reference to the service.
    this: Weak<ServiceRuntime>,
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
        let backends: Vec<BackendEntry> = config
            .backends
            .iter()
            .map(|b| {
                BackendEntry::new(
                    new_backend(b.address, &config, now),
                    Origin::Static,
                    b.weight,
                )
            })
            .collect();
        let first = build_snapshot(&config, &backends, 1, now)?;
        let by_address = address_map(&backends);
        Ok(Arc::new_cyclic(|this| ServiceRuntime {
            index,
            name: config.name.clone(),
            state: Mutex::new(State {
                config,
                backends,
                resolvers: Vec::new(),
                ticker: None,
                runtime: None,
            }),
            by_address: ArcSwap::from_pointee(by_address),
            snapshot: Arc::new(ArcSwap::from_pointee(first)),
            generation: AtomicU64::new(1),
            this: this.clone(),
        }))
    }

    /// The service's number, as data planes report it in [`FlowEvents`]. Unique for the
    /// daemon's lifetime.
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
        for i in 0..st.backends.len() {
            self.spawn_checker(&mut st, i);
        }
        self.spawn_resolvers(&mut st);
        self.restart_ticker(&mut st);
    }

    /// Stops every task [`ServiceRuntime::start`] started.
    pub fn stop(&self) {
        let mut st = lock(&self.state);
        for b in &mut st.backends {
            if let Some(c) = b.checker.take() {
                c.abort();
            }
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

    /// The service and its backends as the admin API shows them.
    pub fn status(&self) -> ServiceStatus {
        let st = lock(&self.state);
        let now = Instant::now();
        let slow = st.config.slow_start;
        ServiceStatus {
            dataplane: String::new(),
            name: st.config.name.clone(),
            listen: st.config.listen,
            protocol: protocol_name(&st.config),
            scheduler: scheduler_name(&st.config),
            generation: self.snapshot.load().generation,
            backends: st
                .backends
                .iter()
                .map(|b| {
                    let h = lock(&b.rt.health);
                    let up = h.health() == Health::Up;
                    let effective = if up { b.effective_weight(slow, now) } else { 0 };
                    let s = &b.rt.stats;
                    BackendStatus {
                        address: b.rt.address,
                        origin: b.label.clone(),
                        health: if up { "up" } else { "down" },
                        health_for_seconds: round_ms(now.duration_since(h.since())).as_secs_f64(),
                        state: if b.removing() {
                            "removing"
                        } else if b.drained {
                            "draining"
                        } else if up && effective < b.base_weight() {
                            "slow_start"
                        } else {
                            "active"
                        },
                        weight: b.base_weight(),
                        configured_weight: b.configured,
                        effective_weight: effective,
                        active: s.active(),
                        total: s.total.load(Ordering::Relaxed),
                        connect_failures: s.connect_failures.load(Ordering::Relaxed),
                        bytes_to_backend: s.bytes_to_backend.load(Ordering::Relaxed),
                        bytes_from_backend: s.bytes_from_backend.load(Ordering::Relaxed),
                        last_check: match (&st.config.health.kind, h.last_check()) {
                            (CheckKind::None, _) => h.passive_summary(now),
                            (_, None) => None,
                            (_, Some(Ok(()))) => Some("ok".into()),
                            (_, Some(Err(e))) => Some(e.to_string()),
                        },
                        xdp: None,
                    }
                })
                .collect(),
            xdp: None,
        }
    }

    /// Drains `backend`: no new flows from now on, open ones finish. Stays until
    /// [`ServiceRuntime::enable`].
    ///
    /// Returns `Err(AdminError::NoBackend)` when the service has no such backend.
    pub fn drain(&self, backend: SocketAddr) -> Result<(), AdminError> {
        self.admin(backend, |b, _| {
            b.drained = true;
            Ok(())
        })?;
        info!(
            "backend {backend} of service {} is draining: no new flows",
            self.name
        );
        Ok(())
    }

    /// Ends a drain of `backend`; with `slow_start` its weight ramps up again.
    ///
    /// Returns `Err(AdminError::NoBackend)` when the service has no such backend and
    /// `Err(AdminError::Removing)` when it left the config or DNS.
    pub fn enable(&self, backend: SocketAddr) -> Result<(), AdminError> {
        self.admin(backend, |b, now| {
            if b.removing() {
                return Err(AdminError::Removing(b.rt.address));
            }
            if b.drained {
                b.drained = false;
                b.ramp_start = Some(now);
            }
            Ok(())
        })?;
        info!(
            "backend {backend} of service {} is enabled: it takes new flows",
            self.name
        );
        Ok(())
    }

    /// Sets `backend`'s weight to `weight` (0 drains) until a reload changes its configured
    /// weight.
    ///
    /// Returns `Err(AdminError::Weight)` above [`MAX_WEIGHT`], `Err(AdminError::NoBackend)`
    /// when the service has no such backend and `Err(AdminError::Removing)` when it is leaving.
    pub fn set_weight(&self, backend: SocketAddr, weight: u32) -> Result<(), AdminError> {
        if weight > MAX_WEIGHT {
            return Err(AdminError::Weight(weight));
        }
        self.admin(backend, |b, now| {
            if b.removing() {
                return Err(AdminError::Removing(b.rt.address));
            }
            if b.effective_weight(None, now) == 0 && weight > 0 {
                // Weight 0 -> N is a return to service, like enable: ramp it.
                b.ramp_start = Some(now);
            }
            b.admin_weight = Some(weight);
            Ok(())
        })?;
        info!(
            "backend {backend} of service {}: weight set to {weight}",
            self.name
        );
        Ok(())
    }

    fn admin(
        &self,
        backend: SocketAddr,
        change: impl FnOnce(&mut BackendEntry, Instant) -> Result<(), AdminError>,
    ) -> Result<(), AdminError> {
        let mut st = lock(&self.state);
        let Some(b) = st.backends.iter_mut().find(|b| b.rt.address == backend) else {
            return Err(AdminError::NoBackend {
                service: self.name.clone(),
                backend: backend.to_string(),
            });
        };
        change(b, Instant::now())?;
        self.republish(&st);
        Ok(())
    }

    /// Applies a reloaded config of this service. The listen address and protocol must be
    /// the same (the reload replaces a service whose are not). Static backends that stay keep
    /// their counters and health; new ones start (with slow start, if set); the ones that
    /// left drain and are forgotten once idle; weight changes clear admin weights.
    pub fn update(&self, config: Service) {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let health_changed = st.config.health != config.health;
        let discovery_changed = st.config.discovered != config.discovered
            || st.config.resolve_interval != config.resolve_interval;
        let old_slow = st.config.slow_start;
        st.config = config;
        let config = st.config.clone();
        // Each backend learns whether the config still asks for it statically, and which of
        // its DNS names are still configured (with their weights); one that nothing asks
        // for any more leaves.
        for b in &mut st.backends {
            let address = b.rt.address;
            let weight = config
                .backends
                .iter()
                .find(|c| c.address == address)
                .map(|c| c.weight);
            b.own(&Origin::Static, weight, now);
            let names: Vec<Origin> = b
                .owners
                .keys()
                .filter(|o| matches!(o, Origin::Dns(_)))
                .cloned()
                .collect();
            for origin in names {
                let Origin::Dns(name) = &origin else { continue };
                let weight = config
                    .discovered
                    .iter()
                    .find(|d| &d.to_string() == name)
                    .map(|d| d.weight);
                b.own(&origin, weight, now);
            }
        }
        for c in &config.backends {
            if st.backends.iter().any(|b| b.rt.address == c.address) {
                continue;
            }
            let mut b = BackendEntry::new(
                new_backend(c.address, &config, now),
                Origin::Static,
                c.weight,
            );
            b.ramp_start = Some(now);
            st.backends.push(b);
            let i = st.backends.len() - 1;
            self.spawn_checker(&mut st, i);
        }
        if health_changed {
            for b in &mut st.backends {
                // The verdict carries over; new thresholds, interval and kind apply from now
                // (without active checks, a new hold-off starts now).
                let down = lock(&b.rt.health).health() == Health::Down;
                let mut fresh = new_health(&config, now);
                if down {
                    for _ in 0..config.health.fall {
                        fresh.record_passive_failure("down before the reload", now);
                    }
                }
                *lock(&b.rt.health) = fresh;
            }
            for i in 0..st.backends.len() {
                self.spawn_checker(&mut st, i);
            }
        }
        if discovery_changed {
            self.spawn_resolvers(&mut st);
        }
        if old_slow != config.slow_start || health_changed {
            self.restart_ticker(&mut st);
        }
        self.by_address.store(Arc::new(address_map(&st.backends)));
        self.republish(&st);
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
        let now = Instant::now();
        let origin = Origin::Dns(name.to_string());
        let mut changed = false;
        let mut added = Vec::new();
        let mut gone = Vec::new();
        for b in &mut st.backends {
            let present = addresses.contains(&b.rt.address);
            let was_removing = b.removing();
            if !b.own(&origin, present.then_some(weight), now) {
                continue;
            }
            changed = true;
            match (was_removing, b.removing()) {
                (true, false) => added.push(b.rt.address),
                (false, true) => gone.push(b.rt.address),
                _ => {}
            }
        }
        for &a in addresses {
            if st.backends.iter().any(|b| b.rt.address == a) {
                continue;
            }
            let config = st.config.clone();
            let mut b = BackendEntry::new(new_backend(a, &config, now), origin.clone(), weight);
            b.ramp_start = Some(now);
            st.backends.push(b);
            let i = st.backends.len() - 1;
            self.spawn_checker(&mut st, i);
            changed = true;
            added.push(a);
        }
        if changed {
            self.by_address.store(Arc::new(address_map(&st.backends)));
            let generation = self.republish(&st);
            info!(
                "service {}: {name} resolves to {} addresses; added {added:?}, draining {gone:?} (table generation {})",
                self.name,
                addresses.len(),
                generation.map_or_else(|| "unchanged".to_string(), |g| g.to_string())
            );
        }
    }

    /// Records a failed connect to `backend` seen by a data plane. It counts towards the
    /// backend's `fall` like a failed check; with `kind = "none"`, `fall` of them take the
    /// backend out for `passive_timeout` (see [`HealthState`]).
    pub fn passive_failure(&self, backend: SocketAddr, error: &str) {
        let Some(b) = self.by_address.load().get(&backend).cloned() else {
            return;
        };
        let t = lock(&b.health).record_passive_failure(error, Instant::now());
        if let Some(t) = t {
            self.transitioned(backend, &t);
        }
    }

    /// Records a successful connect to `backend` after a passive failure: the failure streak
    /// starts again, and a backend on trial after a hold-off is trusted again. Only active
    /// checks, or the end of a hold-off without them, bring a down backend back up.
    pub fn passive_success(&self, backend: SocketAddr) {
        if let Some(b) = self.by_address.load().get(&backend) {
            lock(&b.health).record_passive_success();
        }
    }

    fn transitioned(&self, backend: SocketAddr, t: &Transition) {
        let mut st = lock(&self.state);
        if t.to == Health::Up {
            if let Some(b) = st.backends.iter_mut().find(|b| b.rt.address == backend) {
                b.ramp_start = Some(Instant::now());
            }
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
    fn tick(&self) {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let slow = st.config.slow_start;
        let current = self.snapshot.load_full();
        let mut retried = Vec::new();
        for b in &mut st.backends {
            let t = lock(&b.rt.health).retry_due(now);
            if let Some(t) = t {
                b.ramp_start = Some(now);
                retried.push((b.rt.address, t));
            }
        }
        let mut changed = !retried.is_empty();
        for b in &mut st.backends {
            if let (Some(t), Some(ramp)) = (b.ramp_start, slow) {
                if now.duration_since(t) >= ramp {
                    b.ramp_start = None;
                }
            } else if slow.is_none() {
                b.ramp_start = None;
            }
            let published = current
                .backends
                .iter()
                .find(|v| v.address == b.rt.address)
                .map(|v| v.weight);
            if published.is_some_and(|w| w != b.effective_weight(slow, now)) {
                changed = true;
            }
        }
        let before = st.backends.len();
        let mut forgotten = Vec::new();
        st.backends.retain_mut(|b| {
            let keep = !b.removing() || b.rt.stats.active() > 0;
            if !keep {
                if let Some(c) = b.checker.take() {
                    c.abort();
                }
                forgotten.push(b.rt.address);
            }
            keep
        });
        if st.backends.len() != before {
            self.by_address.store(Arc::new(address_map(&st.backends)));
            info!(
                "service {}: removed backends {forgotten:?} (drained, no connection left)",
                self.name
            );
            changed = true;
        }
        if changed {
            let generation = self.republish(&st);
            drop(st);
            for (backend, t) in &retried {
                self.log_transition(*backend, t, generation);
            }
        }
    }

    fn spawn_checker(&self, st: &mut State, i: usize) {
        let Some(rt) = st.runtime.clone() else { return };
        let b = &mut st.backends[i];
        if let Some(old) = b.checker.take() {
            old.abort();
        }
        if st.config.health.kind == CheckKind::None {
            return;
        }
        let weak = self.this.clone();
        let address = b.rt.address;
        let on_transition: Arc<dyn Fn(&Transition) + Send + Sync> =
            Arc::new(move |t: &Transition| {
                if let Some(s) = weak.upgrade() {
                    s.transitioned(address, t);
                }
            });
        b.checker = Some(
            rt.spawn(health::monitor(
                address,
                st.config.health.clone(),
                Arc::clone(&b.rt.health),
                on_transition,
            ))
            .abort_handle(),
        );
    }

    fn spawn_resolvers(&self, st: &mut State) {
        for r in st.resolvers.drain(..) {
            r.abort();
        }
        let Some(rt) = st.runtime.clone() else { return };
        for d in &st.config.discovered {
            let weak = self.this.clone();
            let label = d.to_string();
            // The resolver holds the service weakly and ends once it is gone.
            let on_answer = move |addresses: &[SocketAddr]| match weak.upgrade() {
                Some(s) => {
                    s.set_discovered(&label, addresses);
                    ControlFlow::Continue(())
                }
                None => ControlFlow::Break(()),
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
    fn republish(&self, st: &MutexGuard<'_, State>) -> Option<u64> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        match build_snapshot(&st.config, &st.backends, generation, Instant::now()) {
            Ok(snap) => {
                if snap.eligible_count() == 0 {
                    error!(
                        "service {} has no backend up: new {} flows are refused until one returns",
                        self.name,
                        protocol_name(&st.config).to_uppercase()
                    );
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

/// A backend's health state as the service's `[service.health]` says: with no active checks,
/// passive failures hold it off for `passive_timeout`.
fn new_health(config: &Service, now: Instant) -> HealthState {
    let state = HealthState::new(config.health.rise, config.health.fall, now);
    match config.health.kind {
        CheckKind::None => state.passive_only(config.health.passive_timeout),
        _ => state,
    }
}

fn new_backend(address: SocketAddr, config: &Service, now: Instant) -> Arc<BackendRuntime> {
    Arc::new(BackendRuntime {
        address,
        health: Arc::new(Mutex::new(new_health(config, now))),
        stats: Arc::new(BackendStats::default()),
    })
}

fn address_map(backends: &[BackendEntry]) -> HashMap<SocketAddr, Arc<BackendRuntime>> {
    backends
        .iter()
        .map(|b| (b.rt.address, Arc::clone(&b.rt)))
        .collect()
}

fn build_snapshot(
    config: &Service,
    backends: &[BackendEntry],
    generation: u64,
    now: Instant,
) -> Result<ServiceSnapshot, SchedulerError> {
    let views: Vec<BackendView> = backends
        .iter()
        .map(|b| BackendView {
            address: b.rt.address,
            weight: b.effective_weight(config.slow_start, now),
            up: lock(&b.rt.health).health() == Health::Up,
            stats: Arc::clone(&b.rt.stats),
        })
        .collect();
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
        access_log: config.access_log,
    })
}

/// The running services, by number. Reloads add and remove services; a number is never
/// reused, so a data plane report about a removed service finds nothing rather than the
/// wrong service.
#[derive(Default)]
pub struct ServiceSet {
    services: ArcSwap<Vec<Arc<ServiceRuntime>>>,
    next_index: AtomicUsize,
}

impl ServiceSet {
    /// An empty set.
    pub fn new() -> Arc<Self> {
        Arc::new(ServiceSet::default())
    }

    /// The next unused service number.
    pub fn allocate_index(&self) -> usize {
        self.next_index.fetch_add(1, Ordering::Relaxed)
    }

    /// The services now, in config order.
    pub fn all(&self) -> Arc<Vec<Arc<ServiceRuntime>>> {
        self.services.load_full()
    }

    /// Service number `index`, if it runs.
    pub fn get(&self, index: usize) -> Option<Arc<ServiceRuntime>> {
        self.services
            .load()
            .iter()
            .find(|s| s.index == index)
            .cloned()
    }

    /// The service named `name`, if it runs.
    pub fn by_name(&self, name: &str) -> Option<Arc<ServiceRuntime>> {
        self.services
            .load()
            .iter()
            .find(|s| s.name == name)
            .cloned()
    }

    /// Replaces the list (the control plane's only writer does this at start and reload).
    pub fn set(&self, services: Vec<Arc<ServiceRuntime>>) {
        self.services.store(Arc::new(services));
    }
}

/// Carries the data planes' connect outcomes to the services' health state.
///
/// The data plane reports every failed connect, and only the first success after failures
/// (it keeps the "failing" mark in the backend's [`BackendStats`], so the common case, a
/// success after a success, never calls here). That first success resets the failure streak
/// that failed connects started, but successful connects do not cancel failed active checks
/// (two failed checks and one failed connect reach `fall = 3`). Unlike HAProxy's
/// `observe layer4`, which needs `error-limit` (10) errors to count one failed check, every
/// failed connect counts as one failure here. Both go through a bounded channel to a control
/// plane task, so a data plane thread never waits on a health lock or a table rebuild; under
/// a flood of failures, excess reports are dropped (they would only repeat what the health
/// state already knows). A dropped recovery is not lost: [`FlowEvents::connect_succeeded`]
/// says it was not delivered, the backend stays marked failing, and the next success
/// reports again.
pub struct PassiveFeedback {
    tx: tokio::sync::mpsc::Sender<PassiveEvent>,
}

/// A connect outcome queued for the control plane.
#[derive(Debug)]
pub enum PassiveEvent {
    /// A connect from service `service` to `backend` failed with `error`.
    Failed {
        /// Service number.
        service: usize,
        /// The backend.
        backend: SocketAddr,
        /// Why, for the log.
        error: String,
    },
    /// A connect from service `service` to `backend` succeeded after a failure.
    Recovered {
        /// Service number.
        service: usize,
        /// The backend.
        backend: SocketAddr,
    },
}

impl PassiveFeedback {
    /// Creates the feedback path and the receiver that [`PassiveFeedback::apply`] drains.
    /// `capacity`: queued events before drops.
    pub fn new(capacity: usize) -> (Arc<Self>, tokio::sync::mpsc::Receiver<PassiveEvent>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (Arc::new(PassiveFeedback { tx }), rx)
    }

    /// Applies queued events to the services' health state until every sender is gone.
    pub async fn apply(
        services: Arc<ServiceSet>,
        mut rx: tokio::sync::mpsc::Receiver<PassiveEvent>,
    ) {
        while let Some(ev) = rx.recv().await {
            match ev {
                PassiveEvent::Failed {
                    service,
                    backend,
                    error,
                } => {
                    if let Some(s) = services.get(service) {
                        s.passive_failure(backend, &error);
                    }
                }
                PassiveEvent::Recovered { service, backend } => {
                    if let Some(s) = services.get(service) {
                        s.passive_success(backend);
                    }
                }
            }
        }
    }
}

impl FlowEvents for PassiveFeedback {
    fn connect_failed(&self, service: usize, backend: SocketAddr, error: &std::io::Error) {
        let _dropped_when_full = self.tx.try_send(PassiveEvent::Failed {
            service,
            backend,
            error: error.to_string(),
        });
    }

    fn connect_succeeded(&self, service: usize, backend: SocketAddr) -> bool {
        self.tx
            .try_send(PassiveEvent::Recovered { service, backend })
            .is_ok()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain counters behind, still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

fn protocol_name(config: &Service) -> &'static str {
    match config.protocol {
        crate::config::Protocol::Tcp => "tcp",
        crate::config::Protocol::Udp => "udp",
    }
}

fn scheduler_name(config: &Service) -> String {
    // The config's own spelling: snake_case of the variant.
    let debug = format!("{:?}", config.scheduler);
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::path::Path;

    fn service(kind: &str) -> Service {
        let text = format!(
            r#"
[[service]]
name = "web"
listen = "127.0.0.1:8080"
protocol = "tcp"
scheduler = "round_robin"
[service.health]
kind = "{kind}"
fall = 2
[[service.backend]]
address = "127.0.0.1:9001"
[[service.backend]]
address = "127.0.0.1:9002"
[[service.backend]]
address = "127.0.0.1:9003"
weight = 0
"#
        );
        config::parse(&text, Path::new("test.toml"))
            .expect("valid test config")
            .services
            .remove(0)
    }

    fn refused() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    }

    fn entry(weight: u32, ramp_start: Option<Instant>) -> BackendEntry {
        let svc = service("none");
        let mut b = BackendEntry::new(
            new_backend(
                "127.0.0.1:9001".parse().expect("literal"),
                &svc,
                Instant::now(),
            ),
            Origin::Static,
            weight,
        );
        b.ramp_start = ramp_start;
        b
    }

    #[test]
    fn slow_start_ramps_from_one_to_the_full_weight() {
        let t0 = Instant::now();
        let ramp = Some(Duration::from_secs(10));
        let e = entry(100, Some(t0));
        assert_eq!(e.effective_weight(ramp, t0), 1, "a ramp starts at weight 1");
        assert_eq!(e.effective_weight(ramp, t0 + Duration::from_secs(5)), 50);
        assert_eq!(e.effective_weight(ramp, t0 + Duration::from_secs(10)), 100);
        assert_eq!(
            e.effective_weight(None, t0),
            100,
            "without slow_start the full weight applies at once"
        );
        let mut d = entry(100, None);
        d.drained = true;
        assert_eq!(
            d.effective_weight(ramp, t0),
            0,
            "a drained backend has weight 0"
        );
        let mut r = entry(100, None);
        r.own(&Origin::Static, None, t0);
        assert_eq!(
            r.effective_weight(ramp, t0),
            0,
            "a removed backend has weight 0"
        );
    }

    #[test]
    fn drain_then_enable_ramps_the_weight_back_with_slow_start() {
        let mut svc = service("none");
        svc.slow_start = Some(Duration::from_secs(600));
        svc.backends[0].weight = 50;
        let rt = ServiceRuntime::new(0, svc).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        assert_eq!(
            rt.snapshot().load().backends[0].weight,
            50,
            "full weight at start"
        );
        rt.drain(b1).expect("9001 is a backend");
        assert!(
            !rt.snapshot().load().backends[0].eligible(),
            "a drained backend must get no new flows"
        );
        rt.enable(b1).expect("9001 is a backend");
        let w = rt.snapshot().load().backends[0].weight;
        assert!(
            (1..50).contains(&w),
            "an enabled backend should ramp up from 1, not return at full weight {w}"
        );
        assert_eq!(
            rt.drain("127.0.0.1:1".parse().expect("literal")),
            Err(AdminError::NoBackend {
                service: "web".into(),
                backend: "127.0.0.1:1".into()
            })
        );
        assert_eq!(rt.set_weight(b1, 300), Err(AdminError::Weight(300)));
    }

    #[test]
    fn draining_backend_is_never_picked() {
        let rt = ServiceRuntime::new(0, service("tcp")).expect("builds");
        let snap = rt.snapshot().load_full();
        assert_eq!(
            snap.eligible_count(),
            2,
            "weight 0 must not count as eligible"
        );
        let key = lb_common::FlowKey::default();
        for _ in 0..30 {
            let id = snap.pick(&key, &[]).expect("two backends are up");
            assert_ne!(
                snap.backends[id].address.port(),
                9003,
                "a draining backend got a new flow"
            );
        }
    }

    #[test]
    fn passive_failures_take_a_backend_down_and_republish() {
        let rt = ServiceRuntime::new(0, service("tcp")).expect("builds");
        let before = rt.snapshot().load().generation;
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let set = ServiceSet::new();
        set.set(vec![Arc::clone(&rt)]);
        let (feedback, rx) = PassiveFeedback::new(16);
        feedback.connect_failed(0, b1, &refused());
        feedback.connect_failed(0, b1, &refused());
        drop(feedback);
        let tokio_rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        tokio_rt.block_on(PassiveFeedback::apply(set, rx));
        let snap = rt.snapshot().load_full();
        assert!(
            snap.generation > before,
            "a DOWN transition must publish a new snapshot"
        );
        assert!(
            !snap.backends[0].up,
            "two refused connects with fall = 2 must mark 9001 DOWN"
        );
        let key = lb_common::FlowKey::default();
        for _ in 0..10 {
            let id = snap.pick(&key, &[]).expect("9002 is still up");
            assert_eq!(
                snap.backends[id].address.port(),
                9002,
                "a DOWN backend got a new flow"
            );
        }
    }

    #[test]
    fn a_recovery_dropped_by_a_full_queue_still_resets_the_failure_streak() {
        let rt = ServiceRuntime::new(0, service("tcp")).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let set = ServiceSet::new();
        set.set(vec![Arc::clone(&rt)]);
        let stats = BackendStats::default();
        let (feedback, mut rx) = PassiveFeedback::new(1);
        let tokio_rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let drain = |rx: &mut tokio::sync::mpsc::Receiver<PassiveEvent>| {
            while let Ok(ev) = rx.try_recv() {
                let (tx, one) = tokio::sync::mpsc::channel(1);
                tx.try_send(ev).expect("room for one");
                drop(tx);
                tokio_rt.block_on(PassiveFeedback::apply(set.clone(), one));
            }
        };
        // One failure (fall = 2) fills the queue, so the success after it is dropped.
        stats.connect_failed(|| feedback.connect_failed(0, b1, &refused()));
        stats.connect_succeeded(|| feedback.connect_succeeded(0, b1));
        drain(&mut rx);
        // The next success must report the recovery the full queue lost.
        stats.connect_succeeded(|| feedback.connect_succeeded(0, b1));
        drain(&mut rx);
        stats.connect_failed(|| feedback.connect_failed(0, b1, &refused()));
        drain(&mut rx);
        assert!(
            rt.snapshot().load().backends[0].up,
            "9001 went DOWN after one new failure (fall = 2): the recovery between the two \
             failures was lost"
        );
    }

    #[test]
    fn without_checks_passive_failures_hold_a_backend_off_then_it_is_tried_again() {
        const HOLD_OFF: Duration = Duration::from_millis(300);
        let mut svc = service("none");
        svc.health.passive_timeout = HOLD_OFF;
        let rt = ServiceRuntime::new(0, svc).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let before = rt.snapshot().load().generation;
        rt.passive_failure(b1, "connection refused");
        assert!(
            rt.snapshot().load().backends[0].up,
            "1 failure of fall = 2 must not take 9001 out"
        );
        let note = rt.status().backends[0].last_check.clone();
        assert_eq!(
            note.as_deref(),
            Some("passive: 1 failure of 2, last: proxied connect failed: connection refused")
        );
        rt.passive_failure(b1, "connection refused");
        let snap = rt.snapshot().load_full();
        assert!(
            snap.generation > before && !snap.backends[0].up,
            "2 refused connects with fall = 2 and kind = none must take 9001 out of a new table"
        );
        let status = rt.status().backends[0].clone();
        assert_eq!(status.health, "down");
        let note = status.last_check.expect("the status says why 9001 is down");
        assert!(
            note.starts_with("passive: 2 consecutive failures, last: proxied connect failed")
                && note.ends_with("retry in 1s"),
            "unexpected status text {note:?}"
        );

        rt.tick();
        assert!(
            !rt.snapshot().load().backends[0].up,
            "9001 came back before its hold-off ran out"
        );
        std::thread::sleep(HOLD_OFF + Duration::from_millis(20));
        rt.tick();
        assert!(
            rt.snapshot().load().backends[0].up,
            "9001 must get its share again once the hold-off ran out"
        );
        assert_eq!(
            rt.status().backends[0].last_check.as_deref(),
            Some("passive: on trial after a 300ms hold-off")
        );
        rt.passive_failure(b1, "connection refused");
        assert!(
            !rt.snapshot().load().backends[0].up,
            "on trial, one more failure must take 9001 out again"
        );
    }

    #[test]
    fn a_backend_that_works_on_trial_needs_fall_failures_again() {
        let mut svc = service("none");
        svc.health.passive_timeout = Duration::from_millis(1);
        let rt = ServiceRuntime::new(0, svc).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        rt.passive_failure(b1, "connection refused");
        rt.passive_failure(b1, "connection refused");
        std::thread::sleep(Duration::from_millis(5));
        rt.tick();
        assert!(rt.snapshot().load().backends[0].up, "tried again");
        rt.passive_success(b1);
        rt.passive_failure(b1, "connection refused");
        assert!(
            rt.snapshot().load().backends[0].up,
            "after a success on trial, one failure of fall = 2 must not take 9001 out"
        );
        let note = rt.status().backends[0].last_check.clone();
        assert!(
            note.as_deref()
                .is_some_and(|n| n.starts_with("passive: 1 failure of 2")),
            "the status should show the new streak: {note:?}"
        );
    }

    #[test]
    fn a_reload_keeps_a_held_off_backend_down_for_the_new_hold_off() {
        let mut svc = service("none");
        svc.health.passive_timeout = Duration::from_secs(600);
        let rt = ServiceRuntime::new(0, svc.clone()).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        rt.passive_failure(b1, "connection refused");
        rt.passive_failure(b1, "connection refused");
        assert!(!rt.snapshot().load().backends[0].up, "held off");
        svc.health.passive_timeout = Duration::from_millis(50);
        rt.update(svc);
        assert!(
            !rt.snapshot().load().backends[0].up,
            "a reload must not bring a held-off backend back"
        );
        std::thread::sleep(Duration::from_millis(60));
        rt.tick();
        assert!(
            rt.snapshot().load().backends[0].up,
            "after the reload the new 50ms hold-off applies"
        );
    }

    #[test]
    fn success_after_failure_resets_the_streak() {
        let rt = ServiceRuntime::new(0, service("tcp")).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        rt.passive_failure(b1, "connection refused");
        rt.passive_success(b1);
        rt.passive_failure(b1, "connection refused");
        assert!(
            rt.snapshot().load().backends[0].up,
            "failures separated by a success are not consecutive"
        );
    }

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
        let rt = ServiceRuntime::new(0, with_backends(&["127.0.0.1:9001"], &["one.test:9100"]))
            .expect("builds");
        rt.set_discovered("one.test:9100", &[addr("127.0.0.1:9100")]);
        // A reload lists the discovered address statically too.
        rt.update(with_backends(
            &["127.0.0.1:9001", "127.0.0.1:9100"],
            &["one.test:9100"],
        ));
        assert_eq!(
            state_of(&rt, "127.0.0.1:9100"),
            Some(("active", "static,one.test:9100".to_string()))
        );
        rt.set_discovered("one.test:9100", &[addr("127.0.0.1:9101")]);
        assert!(
            takes_flows(&rt, "127.0.0.1:9100"),
            "the config lists 127.0.0.1:9100, yet it left when one.test stopped returning it"
        );
        assert_eq!(
            state_of(&rt, "127.0.0.1:9100"),
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
