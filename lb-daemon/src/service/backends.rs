//! The backend set of one service: every backend the config or a DNS name asks for, where
//! each came from, and their reconciliation with what a source asks for now.
//!
//! - A backend is known by its address for the life of the daemon: while a source still asks
//!   for it, it keeps its counters and its health state.
//! - A backend may come from several sources at once (a static address that a DNS name also
//!   returns): it stays while one of them still asks for it. One that no source asks for is
//!   leaving (removing): weight 0, forgotten once its last connection closes.
//! - [`BackendSet::reconcile`] is the one place where a source's wish is applied: a reload
//!   (the config's static addresses, the DNS names' weights) and a DNS answer both go
//!   through it, so a new backend gets its slow start in one place.
//! - Pure, like [`crate::health::HealthState`]: time is passed in; spawning health checks and
//!   publishing a snapshot are the caller's ([`super::ServiceRuntime`]) side effects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::lock;
use super::weights::Weight;
use crate::config::{CheckKind, HealthCheck};
use crate::health::{Health, HealthState};
use crate::snapshot::{BackendStats, BackendView};

/// What the data plane hot path needs of a backend, reachable without the service's lock.
pub(super) struct BackendRuntime {
    /// `ip:port`.
    pub(super) address: SocketAddr,
    /// The rise/fall state that checks and passive failures update.
    pub(super) health: Arc<Mutex<HealthState>>,
    /// Live counters, shared with every snapshot.
    pub(super) stats: Arc<BackendStats>,
}

/// Where a backend comes from: the config file or a DNS name.
///
/// Ordered static first, then names alphabetically (`name:port` as a string), which is the
/// order in which they give its weight: the static entry's, else that of the alphabetically
/// first name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum BackendSource {
    /// An `ip:port` in the config file.
    Static,
    /// A record of this `name:port` in the config file.
    Dns(String),
}

impl BackendSource {
    /// As the status shows it: `static`, or the `name:port`.
    fn label(&self) -> &str {
        match self {
            BackendSource::Static => "static",
            BackendSource::Dns(name) => name,
        }
    }
}

/// A backend's state as the control plane keeps it (under the service's lock).
pub(super) struct BackendEntry {
    /// The part the data planes' reports reach without the lock.
    pub(super) rt: Arc<BackendRuntime>,
    /// Every source that asks for this backend now, with the weight it gives. Empty once
    /// none does: the backend is leaving (weight 0, forgotten once its last connection
    /// closes).
    sources: BTreeMap<BackendSource, u32>,
    /// The sources as the status shows them (`static`, `app:3000`, joined by `,`); kept as
    /// they last were while the backend is leaving.
    label: String,
    /// Configured, admin and drained weight, and slow start.
    pub(super) weight: Weight,
}

impl BackendEntry {
    /// A backend that `source` asks for with `weight`.
    fn new(rt: Arc<BackendRuntime>, source: BackendSource, weight: u32) -> BackendEntry {
        let mut b = BackendEntry {
            rt,
            sources: BTreeMap::new(),
            label: String::new(),
            weight: Weight::new(weight),
        };
        b.sources.insert(source, weight);
        b.follow_sources();
        b
    }

    /// `ip:port`.
    pub(super) fn address(&self) -> SocketAddr {
        self.rt.address
    }

    /// Gone from the config and from DNS: no source asks for it any more.
    pub(super) fn removing(&self) -> bool {
        self.sources.is_empty()
    }

    /// The sources as the status shows them, e.g. `static,app:3000`.
    pub(super) fn label(&self) -> &str {
        &self.label
    }

    /// Whether it takes new flows at `now`: up, with an effective weight above 0 (slow start
    /// aside: a ramping weight is at least 1).
    fn takes_flows(&self, now: Instant) -> bool {
        self.effective_weight(None, now) > 0 && lock(&self.rt.health).health() == Health::Up
    }

    /// The weight the scheduler gets now if the backend is up, in `WEIGHT_SCALE`ths of a
    /// configured unit (see `weights.rs`): 0 while drained or removed, ramping from 1 to the
    /// full weight × `WEIGHT_SCALE` during slow start.
    pub(super) fn effective_weight(&self, slow_start: Option<Duration>, now: Instant) -> u32 {
        if self.removing() {
            return 0;
        }
        self.weight.effective(slow_start, now)
    }

    /// Records whether `source` asks for this backend now (`Some(weight)`) or not (`None`).
    /// A backend that was leaving and is asked for again, or whose weight goes from 0 to a
    /// positive one, returns to service (with slow start from `now`). Returns whether
    /// anything changed.
    fn set_source(&mut self, source: &BackendSource, weight: Option<u32>, now: Instant) -> bool {
        let was_out = self.effective_weight(None, now) == 0;
        let changed = match weight {
            Some(w) => self.sources.insert(source.clone(), w) != Some(w),
            None => self.sources.remove(source).is_some(),
        };
        self.follow_sources();
        if was_out && self.effective_weight(None, now) > 0 {
            self.weight.start_ramp(now);
        }
        changed
    }

    /// Takes the configured weight from the first source (a new one clears an admin weight)
    /// and the status label from all of them. Nothing changes while no source is left.
    fn follow_sources(&mut self) {
        let Some((_, &weight)) = self.sources.first_key_value() else {
            return;
        };
        self.weight.set_configured(weight);
        let labels: Vec<&str> = self.sources.keys().map(BackendSource::label).collect();
        self.label = labels.join(",");
    }
}

/// What one [`BackendSet::reconcile`] changed, by backend address.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Changes {
    /// Backends new to the set, in the order asked for: each needs a health check.
    pub(super) added: Vec<SocketAddr>,
    /// Backends that were leaving and are asked for again: back in service, slow start.
    pub(super) returned: Vec<SocketAddr>,
    /// Backends that no source asks for any more: they drain.
    pub(super) leaving: Vec<SocketAddr>,
    /// Backends still asked for whose sources or weights changed otherwise.
    pub(super) updated: Vec<SocketAddr>,
}

impl Changes {
    /// Whether nothing changed (no rebuild needed).
    pub(super) fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.returned.is_empty()
            && self.leaving.is_empty()
            && self.updated.is_empty()
    }
}

/// How long the health of a forgotten backend is remembered. Resolvers that answer a rotating
/// subset of a name's records make addresses leave and come back within a few answers; one
/// that comes back within this time starts from the health it had, so a backend that was
/// down stays down until `rise` checks pass, rather than starting up and taking flows it
/// fails until `fall` checks notice.
pub(super) const HEALTH_MEMORY: Duration = Duration::from_secs(600);
/// Most forgotten backends whose health one service remembers (the oldest go first).
const HEALTH_MEMORY_SIZE: usize = 4096;

/// The backends of one service, in the order they were first asked for (config order, then
/// discovered ones): the snapshot lists them, and so numbers them, in this order.
pub(super) struct BackendSet {
    entries: Vec<BackendEntry>,
    /// The service's `[service.health]`, which a new backend's health state follows.
    health: HealthCheck,
    /// Each backend forgotten in the last [`HEALTH_MEMORY`]: what it returns with.
    recent: HashMap<SocketAddr, Remembered>,
}

/// What the admin API set on a backend: drained, and an admin weight with the configured
/// weight it was set over (see `Weight::carry_over`).
pub(super) type AdminSet = (bool, Option<(u32, u32)>);

/// What a forgotten backend returns with, if it comes back within [`HEALTH_MEMORY`]: its
/// health, and what the admin API set on it (a drain, a weight and the configured weight it
/// was set over), which a rotating DNS answer must not undo.
struct Remembered {
    health: HealthState,
    drained: bool,
    admin: Option<(u32, u32)>,
    /// When it was forgotten.
    at: Instant,
}

impl BackendSet {
    /// The backends a service starts with: `statics` as (address, weight), each up and at
    /// full weight at once (there are no flows yet for slow start to protect them from).
    pub(super) fn new(health: HealthCheck, statics: &[(SocketAddr, u32)], now: Instant) -> Self {
        let mut set = BackendSet {
            entries: Vec::new(),
            health,
            recent: HashMap::new(),
        };
        for &(address, weight) in statics {
            let (rt, _) = set.new_runtime(address, now);
            set.entries
                .push(BackendEntry::new(rt, BackendSource::Static, weight));
        }
        set
    }

    /// The backends, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &BackendEntry> {
        self.entries.iter()
    }

    /// The backends, in order, to change their weight or ramp.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut BackendEntry> {
        self.entries.iter_mut()
    }

    /// The backend at `address`, if the set has it.
    pub(super) fn get(&self, address: SocketAddr) -> Option<&BackendEntry> {
        self.entries.iter().find(|b| b.address() == address)
    }

    /// The backend at `address`, if the set has it, to change.
    pub(super) fn get_mut(&mut self, address: SocketAddr) -> Option<&mut BackendEntry> {
        self.entries.iter_mut().find(|b| b.address() == address)
    }

    /// Sets the health settings that backends added from now on start with (a reload). The
    /// remembered health of forgotten backends goes when they change: it was counted by
    /// other thresholds.
    pub(super) fn set_health_settings(&mut self, health: HealthCheck) {
        if health != self.health {
            self.recent.clear();
        }
        self.health = health;
    }

    /// The DNS names that some backend comes from now, alphabetically.
    pub(super) fn dns_names(&self) -> BTreeSet<String> {
        self.entries
            .iter()
            .flat_map(|b| b.sources.keys())
            .filter_map(|s| match s {
                BackendSource::Dns(name) => Some(name.clone()),
                BackendSource::Static => None,
            })
            .collect()
    }

    /// Whether a backend that takes flows now (up, effective weight above 0) keeps a weight
    /// above 0 under a reload to `statics` (address, weight) and `names` (`name:port`, weight):
    /// whether such a reload leaves the service one up. The weight it will have is its first
    /// source's, as `BackendEntry::follow_sources` takes it: its static entry, else the
    /// first of its names the reload keeps.
    pub(super) fn up_after(
        &self,
        statics: &[(SocketAddr, u32)],
        names: &[(String, u32)],
        now: Instant,
    ) -> bool {
        self.entries.iter().any(|b| {
            let from_name = || {
                b.sources.keys().find_map(|s| match s {
                    BackendSource::Dns(n) => names.iter().find(|(m, _)| m == n).map(|&(_, w)| w),
                    BackendSource::Static => None,
                })
            };
            let weight = (statics.iter().find(|&&(a, _)| a == b.address()))
                .map(|&(_, w)| w)
                .or_else(from_name);
            weight.is_some_and(|w| w > 0) && b.takes_flows(now)
        })
    }

    /// The addresses `source` asks for now, in set order.
    pub(super) fn addresses_from(&self, source: &BackendSource) -> Vec<SocketAddr> {
        self.entries
            .iter()
            .filter(|b| b.sources.contains_key(source))
            .map(BackendEntry::address)
            .collect()
    }

    /// Makes the set follow what `source` asks for now: `desired` as (address, weight), its
    /// whole wish (an address it asked for before and not now is let go).
    ///
    /// - A new address is added with slow start from `now`: healthy as at start, or, when
    ///   `running` (the service runs and takes flows) and another backend is up to take
    ///   them, Down until its first check ([`HealthState::await_first_check`]); or with the
    ///   health, drain and admin weight it had if it was forgotten less than
    ///   [`HEALTH_MEMORY`] ago, an Up verdict then waiting for a first check the same way (a
    ///   container restarted at the same address: its process may still be starting; one
    ///   forgotten while it waited for its first check comes back as a new one). With
    ///   no other backend up (every record replaced at once), waiting would refuse every new
    ///   flow even if the new backends are ready.
    /// - A backend `source` lets go of leaves unless another source still asks for it.
    /// - A leaving backend asked for again returns, with slow start from `now`.
    /// - A weight follows the first source (see [`BackendSource`]); a new one clears the
    ///   admin weight.
    ///
    /// For an address listed twice in `desired`, the first weight counts.
    pub(super) fn reconcile(
        &mut self,
        source: &BackendSource,
        desired: &[(SocketAddr, u32)],
        running: bool,
        now: Instant,
    ) -> Changes {
        let mut changes = Changes::default();
        for b in &mut self.entries {
            let address = b.address();
            let weight = desired.iter().find(|(a, _)| *a == address).map(|&(_, w)| w);
            let was_removing = b.removing();
            if !b.set_source(source, weight, now) {
                continue;
            }
            match (was_removing, b.removing()) {
                (true, false) => changes.returned.push(address),
                (false, true) => changes.leaving.push(address),
                _ => changes.updated.push(address),
            }
        }
        let others_up = self.entries.iter().any(|b| b.takes_flows(now));
        for &(address, weight) in desired {
            if self.get(address).is_some() {
                continue;
            }
            let (rt, admin) = self.new_runtime(address, now);
            // New, or remembered Up; a remembered Down verdict still wants `rise` passes.
            let mut health = lock(&rt.health);
            if running && others_up && health.health() == Health::Up {
                health.await_first_check(now);
            }
            drop(health);
            let mut b = BackendEntry::new(rt, source.clone(), weight);
            // A configured address that a reload adds back starts afresh, as a reload
            // promises; a DNS answer that returns an address must not undo a drain.
            if let (Some((drained, admin)), BackendSource::Dns(_)) = (admin, source) {
                b.weight.carry_over(drained, admin);
            }
            b.weight.start_ramp(now);
            self.entries.push(b);
            changes.added.push(address);
        }
        changes
    }

    /// Forgets the leaving backends whose last connection closed, remembering their health,
    /// drain and admin weight for [`HEALTH_MEMORY`] from `now`; returns their addresses.
    pub(super) fn forget_idle(&mut self, now: Instant) -> Vec<SocketAddr> {
        let (gone, kept): (Vec<BackendEntry>, Vec<BackendEntry>) =
            std::mem::take(&mut self.entries)
                .into_iter()
                .partition(|b| b.removing() && b.rt.stats.active() == 0);
        self.entries = kept;
        self.recent
            .retain(|_, r| now.saturating_duration_since(r.at) < HEALTH_MEMORY);
        for b in &gone {
            let remembered = Remembered {
                health: lock(&b.rt.health).clone(),
                drained: b.weight.drained(),
                admin: b.weight.admin().map(|w| (w, b.weight.configured())),
                at: now,
            };
            self.recent.insert(b.address(), remembered);
        }
        while self.recent.len() > HEALTH_MEMORY_SIZE {
            let oldest = (self.recent.iter())
                .min_by_key(|(_, r)| r.at)
                .map(|(a, _)| *a);
            match oldest {
                Some(a) => self.recent.remove(&a),
                None => break,
            };
        }
        gone.iter().map(BackendEntry::address).collect()
    }

    /// Remembers, as if it had just been forgotten at `now`, a backend this service does not
    /// have yet: down (`down`), drained (`drained`) and with the admin weight `admin` (and
    /// the configured weight it was set over). For an upgrade's or a move's carried state of
    /// a backend a DNS name gives and has not answered yet: its first answer brings it back
    /// so (within [`HEALTH_MEMORY`]). An address it has or remembers already is left alone.
    pub(super) fn remember(
        &mut self,
        address: SocketAddr,
        (drained, admin): AdminSet,
        down: bool,
        now: Instant,
    ) {
        if self.get(address).is_some() || self.recent.contains_key(&address) {
            return;
        }
        let mut health = new_health(&self.health, now);
        if down {
            health.start_down("down before the service was restarted".into(), now);
        }
        let remembered = Remembered {
            health,
            drained,
            admin,
            at: now,
        };
        self.recent.insert(address, remembered);
    }

    /// The backends by address, for the data planes' connect reports.
    pub(super) fn by_address(&self) -> HashMap<SocketAddr, Arc<BackendRuntime>> {
        self.entries
            .iter()
            .map(|b| (b.address(), Arc::clone(&b.rt)))
            .collect()
    }

    /// The backends as a snapshot lists them: effective weight and health now.
    pub(super) fn views(&self, slow_start: Option<Duration>, now: Instant) -> Vec<BackendView> {
        self.entries
            .iter()
            .map(|b| {
                let health = lock(&b.rt.health);
                BackendView {
                    address: b.address(),
                    weight: b.effective_weight(slow_start, now),
                    up: health.health() == Health::Up,
                    awaiting_check: health.awaiting_first_check(),
                    stats: Arc::clone(&b.rt.stats),
                }
            })
            .collect()
    }

    /// The run-time part of backend `address`, new at `now` or returning with what it was
    /// forgotten with ([`Remembered`]): then also its drain and admin weight (see
    /// `Weight::carry_over`).
    fn new_runtime(
        &mut self,
        address: SocketAddr,
        now: Instant,
    ) -> (Arc<BackendRuntime>, Option<AdminSet>) {
        let (health, admin) = match self.recent.remove(&address) {
            Some(mut r) if now.saturating_duration_since(r.at) < HEALTH_MEMORY => {
                // Its checker was stopped; the one started now takes the state over.
                r.health.watched_by(0);
                r.health.resume(now);
                // One that left before its first check has no verdict to keep: it comes
                // back as a new backend does (up when no other backend is, else waiting).
                let health = if r.health.awaiting_first_check() {
                    new_health(&self.health, now)
                } else {
                    r.health
                };
                (health, Some((r.drained, r.admin)))
            }
            _ => (new_health(&self.health, now), None),
        };
        let stats = BackendStats::default();
        // Its new counters must report the success that ends a trial it left on.
        if health.on_trial() {
            stats.report_next_success();
        }
        let rt = Arc::new(BackendRuntime {
            address,
            health: Arc::new(Mutex::new(health)),
            stats: Arc::new(stats),
        });
        (rt, admin)
    }
}

/// A backend's health state as `[service.health]` says: with no active checks, passive
/// failures hold it off for `passive_timeout`.
pub(super) fn new_health(health: &HealthCheck, now: Instant) -> HealthState {
    let state = HealthState::new(health.rise, health.fall, now);
    match health.kind {
        CheckKind::None => state.passive_only(health.passive_timeout),
        _ => state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing::service;
    use crate::service::WEIGHT_SCALE;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("literal address")
    }

    fn entry(weight: u32, ramp_start: Option<Instant>) -> BackendEntry {
        let svc = service("none");
        let mut set = BackendSet::new(svc.health, &[], Instant::now());
        let mut b = BackendEntry::new(
            set.new_runtime(addr("127.0.0.1:9001"), Instant::now()).0,
            BackendSource::Static,
            weight,
        );
        if let Some(t) = ramp_start {
            b.weight.start_ramp(t);
        }
        b
    }

    #[test]
    fn slow_start_ramps_from_one_to_the_full_weight() {
        let t0 = Instant::now();
        let ramp = Some(Duration::from_secs(10));
        let e = entry(100, Some(t0));
        assert_eq!(e.effective_weight(ramp, t0), 1, "a ramp starts at weight 1");
        let full = 100 * WEIGHT_SCALE;
        assert_eq!(
            e.effective_weight(ramp, t0 + Duration::from_secs(5)),
            full / 2
        );
        assert_eq!(e.effective_weight(ramp, t0 + Duration::from_secs(10)), full);
        assert_eq!(
            e.effective_weight(None, t0),
            full,
            "without slow_start the full weight applies at once"
        );
        let mut d = entry(100, None);
        d.weight.drain();
        assert_eq!(
            d.effective_weight(ramp, t0),
            0,
            "a drained backend has weight 0"
        );
        let mut r = entry(100, None);
        r.set_source(&BackendSource::Static, None, t0);
        assert_eq!(
            r.effective_weight(ramp, t0),
            0,
            "a removed backend has weight 0"
        );
    }

    /// A set with `statics` (weight 1 each) and health checks off.
    fn set_of(statics: &[&str], now: Instant) -> BackendSet {
        let desired: Vec<(SocketAddr, u32)> = statics.iter().map(|s| (addr(s), 1)).collect();
        BackendSet::new(service("none").health, &desired, now)
    }

    #[test]
    fn a_backend_that_returns_keeps_its_verdict_but_not_its_streaks() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(300);
        let failed = || Err(crate::health::CheckError::Refused);
        // `fall = 2`: one failure before it leaves, one after it returns.
        let mut set = BackendSet::new(service("tcp").health, &[(addr("10.0.0.1:80"), 1)], t0);
        let b = set.get(addr("10.0.0.1:80")).expect("the backend");
        assert!(lock(&b.rt.health).record_check(failed(), t0).is_none());
        set.reconcile(&BackendSource::Static, &[], false, t0);
        assert_eq!(set.forget_idle(t0), vec![addr("10.0.0.1:80")]);
        set.reconcile(
            &BackendSource::Static,
            &[(addr("10.0.0.1:80"), 1)],
            true,
            later,
        );
        let b = set.get(addr("10.0.0.1:80")).expect("the backend is back");
        let mut health = lock(&b.rt.health);
        assert_eq!(health.health(), Health::Up, "it left Up and comes back Up");
        assert!(
            health.record_check(failed(), later).is_none(),
            "one failure after it returned took it Down with one from before it left"
        );
        assert!(
            health.record_check(failed(), later).is_some(),
            "two failures in a row after it returned must take it Down"
        );
    }

    #[test]
    fn a_backend_new_to_a_running_service_is_down_until_its_first_check() {
        let t0 = Instant::now();
        let dns = BackendSource::Dns("app.test:80".into());
        let one = [(addr("10.0.0.9:80"), 1)];
        let new = |running, statics: &[(SocketAddr, u32)]| {
            let mut set = BackendSet::new(service("tcp").health, statics, t0);
            set.reconcile(&dns, &[(addr("10.0.0.1:80"), 1)], running, t0);
            let b = set.get(addr("10.0.0.1:80")).expect("added");
            let health = lock(&b.rt.health);
            (health.health(), health.awaiting_first_check())
        };
        assert_eq!(new(true, &one), (Health::Down, true));
        assert_eq!(
            new(false, &one),
            (Health::Up, false),
            "before the start: up, as at start"
        );
        assert_eq!(
            new(true, &[]),
            (Health::Up, false),
            "with no other backend up, waiting would refuse every flow"
        );
        let mut passive = BackendSet::new(service("none").health, &one, t0);
        passive.reconcile(&dns, &[(addr("10.0.0.1:80"), 1)], true, t0);
        let b = passive.get(addr("10.0.0.1:80")).expect("added");
        assert_eq!(
            lock(&b.rt.health).health(),
            Health::Up,
            "without active checks nothing would bring it up"
        );
    }

    /// A backend DNS drops while it is up and gives again (a container restarted at the same
    /// address) waits for a first check as a new one does, not up on its old verdict; one
    /// that left down stays down until `rise` passes.
    #[test]
    fn a_backend_that_returns_up_to_a_running_service_waits_for_its_first_check() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(30);
        let dns = BackendSource::Dns("app.test:80".into());
        let (up, down) = (addr("10.0.0.1:80"), addr("10.0.0.2:80"));
        let mut set = BackendSet::new(service("tcp").health, &[(addr("10.0.0.9:80"), 1)], t0);
        set.reconcile(&dns, &[(up, 1), (down, 1)], false, t0);
        let failed = || Err(crate::health::CheckError::Refused);
        let d = set.get(down).expect("added");
        for _ in 0..3 {
            lock(&d.rt.health).record_check(failed(), t0);
        }
        assert_eq!(lock(&d.rt.health).health(), Health::Down);
        set.reconcile(&dns, &[], true, t0);
        assert_eq!(set.forget_idle(t0).len(), 2, "both forgotten");
        set.reconcile(&dns, &[(up, 1), (down, 1)], true, later);
        let state = |a| {
            let b = set.get(a).expect("back");
            let health = lock(&b.rt.health);
            (health.health(), health.awaiting_first_check())
        };
        assert_eq!(
            state(up),
            (Health::Down, true),
            "a backend that left up took new flows again before any check"
        );
        assert_eq!(
            state(down),
            (Health::Down, false),
            "a backend that left down must pass `rise` checks, not one"
        );
    }

    /// A backend forgotten while it waited for its first check had no verdict: given back
    /// when no other backend is up, it starts up as a new one would, not down waiting.
    #[test]
    fn a_backend_forgotten_before_its_first_check_returns_as_a_new_one() {
        let t0 = Instant::now();
        let dns = BackendSource::Dns("app.test:80".into());
        let (fixed, w) = (addr("10.0.0.9:80"), addr("10.0.0.1:80"));
        let mut set = BackendSet::new(service("tcp").health, &[(fixed, 1)], t0);
        set.reconcile(&dns, &[(w, 1)], true, t0);
        let waiting = |set: &BackendSet| {
            let health = lock(&set.get(w).expect("listed").rt.health);
            (health.health(), health.awaiting_first_check())
        };
        assert_eq!(
            waiting(&set),
            (Health::Down, true),
            "added beside an up backend"
        );
        set.reconcile(&dns, &[], true, t0);
        assert_eq!(set.forget_idle(t0), vec![w]);
        let f = set.get(fixed).expect("static");
        for _ in 0..3 {
            lock(&f.rt.health).record_check(Err(crate::health::CheckError::Refused), t0);
        }
        set.reconcile(&dns, &[(w, 1)], true, t0 + Duration::from_secs(5));
        assert_eq!(
            waiting(&set),
            (Health::Up, false),
            "with no other backend up, waiting refuses every new flow"
        );
    }

    #[test]
    fn reconcile_adds_with_slow_start_and_lets_go_of_what_a_source_no_longer_asks_for() {
        let t0 = Instant::now();
        let ramp = Some(Duration::from_secs(10));
        let mut set = set_of(&["10.0.0.1:80", "10.0.0.2:80"], t0);
        let changes = set.reconcile(
            &BackendSource::Static,
            &[(addr("10.0.0.2:80"), 1), (addr("10.0.0.3:80"), 10)],
            false,
            t0,
        );
        assert_eq!(
            changes,
            Changes {
                added: vec![addr("10.0.0.3:80")],
                leaving: vec![addr("10.0.0.1:80")],
                ..Changes::default()
            }
        );
        let new = set.get(addr("10.0.0.3:80")).expect("10.0.0.3 was added");
        assert_eq!(
            new.effective_weight(ramp, t0),
            1,
            "a new backend must start its slow start"
        );
        let gone = set.get(addr("10.0.0.1:80")).expect("kept while it drains");
        assert!(gone.removing() && gone.effective_weight(ramp, t0) == 0);
        assert_eq!(
            set.forget_idle(t0),
            vec![addr("10.0.0.1:80")],
            "a leaving backend with no connection is forgotten"
        );
    }

    #[test]
    fn a_weight_from_0_to_more_returns_the_backend_with_slow_start() {
        let t0 = Instant::now();
        let ramp = Some(Duration::from_secs(10));
        let b = addr("10.0.0.1:80");
        let mut set = set_of(&["10.0.0.1:80"], t0);
        set.reconcile(&BackendSource::Static, &[(b, 0)], false, t0);
        let t1 = t0 + Duration::from_secs(60);
        set.reconcile(&BackendSource::Static, &[(b, 100)], false, t1);
        let got = set.get(b).expect("listed").effective_weight(ramp, t1);
        assert_eq!(
            got, 1,
            "a backend the config brings back from weight 0 must slow-start"
        );
        set.reconcile(
            &BackendSource::Static,
            &[(b, 50)],
            false,
            t1 + Duration::from_secs(60),
        );
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(
            set.get(b).expect("listed").effective_weight(ramp, t2),
            50 * WEIGHT_SCALE,
            "a weight change of a serving backend is no return to service"
        );
    }

    #[test]
    fn reconcile_of_an_unchanged_wish_changes_nothing() {
        let t0 = Instant::now();
        let mut set = set_of(&["10.0.0.1:80"], t0);
        let changes = set.reconcile(
            &BackendSource::Static,
            &[(addr("10.0.0.1:80"), 1)],
            false,
            t0,
        );
        assert!(changes.is_empty(), "nothing changed, yet {changes:?}");
    }

    #[test]
    fn the_first_source_gives_the_weight_and_the_label_lists_them_all() {
        let t0 = Instant::now();
        let mut set = set_of(&["10.0.0.1:80"], t0);
        let name = BackendSource::Dns("app:80".into());
        let changes = set.reconcile(&name, &[(addr("10.0.0.1:80"), 7)], false, t0);
        assert_eq!(changes.updated, vec![addr("10.0.0.1:80")]);
        let b = set.get(addr("10.0.0.1:80")).expect("still there");
        assert_eq!(b.label(), "static,app:80");
        assert_eq!(
            b.weight.configured(),
            1,
            "the static entry's weight comes first"
        );
        set.reconcile(&BackendSource::Static, &[], false, t0);
        let b = set
            .get(addr("10.0.0.1:80"))
            .expect("app:80 still asks for it");
        assert!(!b.removing(), "a name still returns it, yet it is leaving");
        assert_eq!((b.label(), b.weight.configured()), ("app:80", 7));
        assert_eq!(set.dns_names(), BTreeSet::from(["app:80".to_string()]));
        assert_eq!(set.addresses_from(&name), vec![addr("10.0.0.1:80")]);
    }

    #[test]
    fn a_leaving_backend_asked_for_again_returns_with_slow_start() {
        let t0 = Instant::now();
        let ramp = Some(Duration::from_secs(10));
        let mut set = set_of(&["10.0.0.1:80"], t0);
        set.reconcile(&BackendSource::Static, &[], false, t0);
        let t1 = t0 + Duration::from_secs(60);
        let changes = set.reconcile(
            &BackendSource::Static,
            &[(addr("10.0.0.1:80"), 4)],
            false,
            t1,
        );
        assert_eq!(changes.returned, vec![addr("10.0.0.1:80")]);
        let b = set.get(addr("10.0.0.1:80")).expect("kept while it drained");
        assert_eq!(b.label(), "static");
        assert_eq!(b.effective_weight(ramp, t1), 1, "a returning backend ramps");
        assert_eq!(
            b.effective_weight(ramp, t1 + Duration::from_secs(10)),
            4 * WEIGHT_SCALE
        );
    }
}
