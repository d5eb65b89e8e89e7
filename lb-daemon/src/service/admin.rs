//! What the admin API does to one service: drain, enable and weigh a backend, and show the
//! service's state in `/status`.
//!
//! Each action changes a backend's [`Weight`] under the service's lock and republishes the
//! snapshot, as a health transition does.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::backends::BackendEntry;
use super::weights::{Weight, WEIGHT_SCALE};
use super::{lock, round_ms, ServiceRuntime};
use crate::admin::status::{BackendStatus, ServiceStatus};
use crate::config::{CheckKind, MAX_WEIGHT};
use crate::handover::CarriedBackend;
use crate::health::Health;

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
    /// The backend was not given as `ip:port` (a DNS name, say): the API names backends by
    /// the addresses `/status` lists.
    #[error("`{0}` is not a backend address: give it as ip:port, as /status lists it")]
    BadAddress(String),
    /// The weight is above [`MAX_WEIGHT`].
    #[error("weight {0} is out of range 0..={MAX_WEIGHT}")]
    Weight(u32),
    /// The backend is leaving (removed from the config or DNS); it cannot be enabled.
    #[error("backend {0} is being removed (it left the config or DNS) and cannot be changed")]
    Removing(SocketAddr),
}

impl ServiceRuntime {
    /// The service and its backends as the admin API shows them; the daemon fills in the
    /// data plane and the XDP counters.
    pub fn status(&self) -> ServiceStatus {
        let st = lock(&self.state);
        let now = Instant::now();
        ServiceStatus {
            dataplane: String::new(),
            name: st.config.name.clone(),
            listen: st.config.listen,
            protocol: st.config.protocol.to_string(),
            scheduler: st.config.scheduler.to_string(),
            maglev_table: self
                .snapshot
                .load()
                .scheduler
                .as_ref()
                .and_then(|s| s.table_digest()),
            generation: self.snapshot.load().generation,
            backends: st
                .backends
                .iter()
                .map(|b| backend_status(b, &st.config.health.kind, st.config.slow_start, now))
                .collect(),
            xdp: None,
        }
    }

    /// Drains `backend`: no new flows from now on, open ones finish. Stays until
    /// [`ServiceRuntime::enable`].
    ///
    /// Returns `Err(AdminError::NoBackend)` when the service has no such backend.
    pub fn drain(&self, backend: SocketAddr) -> Result<(), AdminError> {
        self.change_backend(backend, |b, _| {
            b.weight.drain();
            Ok(())
        })?;
        info!(
            "backend {backend} of service {} is draining: no new flows",
            self.name
        );
        Ok(())
    }

    /// Ends a drain of `backend`, by `drain` or by an admin weight of 0 (its configured
    /// weight counts again); with `slow_start` its weight ramps up again. A configured
    /// weight of 0 stays (a reload changes it): the log says so.
    ///
    /// Returns `Err(AdminError::NoBackend)` when the service has no such backend and
    /// `Err(AdminError::Removing)` when it left the config or DNS.
    pub fn enable(&self, backend: SocketAddr) -> Result<(), AdminError> {
        let mut weight = 0;
        self.change_backend(backend, |b, now| {
            if b.removing() {
                return Err(AdminError::Removing(b.address()));
            }
            b.weight.enable(now);
            weight = b.weight.base();
            Ok(())
        })?;
        if weight == 0 {
            warn!(
                "backend {backend} of service {} is enabled, but its configured weight is 0: \
                 it takes no new flows",
                self.name
            );
        } else {
            info!(
                "backend {backend} of service {} is enabled: it takes new flows",
                self.name
            );
        }
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
        self.change_backend(backend, |b, now| {
            if b.removing() {
                return Err(AdminError::Removing(b.address()));
            }
            b.weight.set_admin(weight, now);
            Ok(())
        })?;
        info!(
            "backend {backend} of service {}: weight set to {weight}",
            self.name
        );
        Ok(())
    }

    /// What of this service's backends an upgrade carries to the new daemon: each backend
    /// the admin API drained or weighed, or that is down (or awaits its first check), and
    /// not leaving.
    pub fn carried(&self) -> Vec<CarriedBackend> {
        let st = lock(&self.state);
        st.backends
            .iter()
            .filter(|b| !b.removing())
            .filter_map(|b| {
                let health = lock(&b.rt.health);
                let (down, awaiting_check) = (
                    health.health() == Health::Down,
                    health.awaiting_first_check(),
                );
                drop(health);
                let drained = b.weight.drained();
                let admin_weight = b.weight.admin().map(|w| (w, b.weight.configured()));
                (down || drained || admin_weight.is_some()).then(|| CarriedBackend {
                    service: self.name.clone(),
                    address: b.address(),
                    drained,
                    admin_weight,
                    down,
                    awaiting_check,
                })
            })
            .collect()
    }

    /// Takes on what this service's backends were before it was restarted (an upgrade's old
    /// daemon, or a reload that moved it; see [`ServiceRuntime::carried`]) for those it has
    /// now, and republishes; logs each backend so carried. An address it does not have yet
    /// is remembered, so that a DNS answer that brings it brings it back so (see
    /// `BackendSet::remember`); entries of other services are ignored.
    pub fn carry_over(&self, carried: &[CarriedBackend]) {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let mut taken = Vec::new();
        for c in carried.iter().filter(|c| c.service == self.name) {
            let Some(b) = st.backends.get_mut(c.address) else {
                // Remembered up, one awaiting its first check awaits it again when DNS gives it.
                let down = c.down && !c.awaiting_check;
                st.backends
                    .remember(c.address, (c.drained, c.admin_weight), down, now);
                taken.push(format!("{} (when DNS gives it)", c.address));
                continue;
            };
            b.weight.carry_over(c.drained, c.admin_weight);
            if c.awaiting_check {
                lock(&b.rt.health).await_first_check(now);
            } else if c.down {
                let why = "down before the service was restarted (an upgrade, or a move)";
                lock(&b.rt.health).start_down(why.into(), now);
            }
            let mut what = Vec::new();
            if c.drained {
                what.push("drained".to_string());
            }
            if let Some(w) = b.weight.admin() {
                what.push(format!("weight {w} (set through the admin API)"));
            }
            if lock(&b.rt.health).awaiting_first_check() {
                what.push("waiting for its first check".to_string());
            } else if c.down && !c.awaiting_check {
                what.push("down until its checks pass".to_string());
            }
            taken.push(format!("{} {}", c.address, what.join(", ")));
        }
        if taken.is_empty() {
            return;
        }
        self.republish(&st);
        info!(
            "service {}: carried over from before its restart (an upgrade, or a reload that \
             moved it): {}",
            self.name,
            taken.join("; ")
        );
    }

    /// Runs `change` on `backend` under the lock, then republishes.
    fn change_backend(
        &self,
        backend: SocketAddr,
        change: impl FnOnce(&mut BackendEntry, Instant) -> Result<(), AdminError>,
    ) -> Result<(), AdminError> {
        let mut st = lock(&self.state);
        let Some(b) = st.backends.get_mut(backend) else {
            return Err(AdminError::NoBackend {
                service: self.name.clone(),
                backend: backend.to_string(),
            });
        };
        change(b, Instant::now())?;
        self.republish(&st);
        Ok(())
    }
}

/// One backend in `/status`: `kind` and `slow_start` are the service's.
fn backend_status(
    b: &BackendEntry,
    kind: &CheckKind,
    slow_start: Option<Duration>,
    now: Instant,
) -> BackendStatus {
    let h = lock(&b.rt.health);
    let up = h.health() == Health::Up;
    let effective = if up {
        b.effective_weight(slow_start, now)
    } else {
        0
    };
    let s = &b.rt.stats;
    BackendStatus {
        address: b.address(),
        origin: b.label().to_string(),
        health: if up { "up" } else { "down" },
        health_for_seconds: round_ms(now.duration_since(h.since())).as_secs_f64(),
        state: state_name(b.removing(), &b.weight, up, effective),
        // In configured units, as `weight` is; a ramp's first steps show 1.
        weight: b.weight.base(),
        configured_weight: b.weight.configured(),
        effective_weight: effective.div_ceil(WEIGHT_SCALE),
        active: s.active(),
        total: s.total.load(Ordering::Relaxed),
        connect_failures: s.connect_failures.load(Ordering::Relaxed),
        checks_unknown: h.unknown_checks(),
        bytes_to_backend: s.bytes_to_backend.load(Ordering::Relaxed),
        bytes_from_backend: s.bytes_from_backend.load(Ordering::Relaxed),
        last_check: match (kind, h.last_check()) {
            (CheckKind::None, _) => h.passive_summary(now),
            (_, None) => None,
            // Down though its last check passed: failed connects took it down, or it has
            // not passed `rise` checks yet. "ok" alone would hide why it takes no flows.
            (_, Some(Ok(()))) if !up => Some(format!(
                "ok; down: {}",
                h.down_reason().unwrap_or("awaiting rise passing checks")
            )),
            (_, Some(Ok(()))) => Some("ok".into()),
            (_, Some(Err(e))) => Some(e.to_string()),
        },
        xdp: None,
    }
}

/// A backend's `state` in `/status`: removing, draining (drained, or a weight of 0), slow
/// start or active.
fn state_name(removing: bool, weight: &Weight, up: bool, effective: u32) -> &'static str {
    if removing {
        "removing"
    } else if weight.drained() || weight.base() == 0 {
        "draining"
    } else if up && effective < weight.base() * WEIGHT_SCALE {
        "slow_start"
    } else {
        "active"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing::service;

    /// A backend that awaits its first check when the upgrade comes (a reload gave it back,
    /// and it still carries flows pinned before) awaits it in the new daemon too: down, it
    /// would need `rise` checks, and its pinned eBPF flows would be re-placed meanwhile.
    #[test]
    fn an_upgrade_carries_a_backend_awaiting_its_first_check_as_awaiting_it() {
        let b2: SocketAddr = "127.0.0.1:9002".parse().expect("literal");
        let old = ServiceRuntime::new(0, service("tcp")).expect("builds");
        {
            let st = lock(&old.state);
            let b = st.backends.get(b2).expect("a backend");
            lock(&b.rt.health).await_first_check(Instant::now());
        }
        let carried = old.carried();
        assert_eq!(
            carried
                .iter()
                .map(|c| (c.address, c.down, c.awaiting_check))
                .collect::<Vec<_>>(),
            vec![(b2, true, true)],
            "carried as awaiting, and as down for a new daemon of an earlier release"
        );

        let new = ServiceRuntime::new(1, service("tcp")).expect("builds");
        new.carry_over(&carried);
        let snap = new.snapshot().load_full();
        let b = snap.backends.iter().find(|b| b.address == b2).expect("in");
        assert!(!b.eligible(), "no new flow before its first check");
        assert!(b.keeps_flows(), "the flows already on it stay there");
        let st = lock(&new.state);
        let mut health = lock(&st.backends.get(b2).expect("a backend").rt.health);
        assert!(
            health.record_check(Ok(()), Instant::now()).is_some(),
            "its first passing check brings it up, whatever `rise`"
        );
    }

    #[test]
    fn an_upgrade_carries_drains_admin_weights_and_down_backends_to_the_new_daemon() {
        let addr = |s: &str| -> SocketAddr { s.parse().expect("literal") };
        let (b1, b2, b3) = (
            addr("127.0.0.1:9001"),
            addr("127.0.0.1:9002"),
            addr("127.0.0.1:9003"),
        );
        let old = ServiceRuntime::new(0, service("tcp")).expect("builds");
        old.drain(b1).expect("a backend");
        old.set_weight(b2, 7).expect("a backend");
        {
            let st = lock(&old.state);
            let b = st.backends.get(b2).expect("a backend");
            lock(&b.rt.health).start_down("test".into(), Instant::now());
        }
        let carried = old.carried();
        assert_eq!(
            carried,
            vec![
                CarriedBackend {
                    service: "web".into(),
                    address: b1,
                    drained: true,
                    admin_weight: None,
                    down: false,
                    awaiting_check: false,
                },
                CarriedBackend {
                    service: "web".into(),
                    address: b2,
                    drained: false,
                    admin_weight: Some((7, 1)),
                    down: true,
                    awaiting_check: false,
                },
            ],
            "b3 (configured weight 0, up, untouched) has nothing to carry"
        );
        let mut other = carried[0].clone();
        other.service = "api".into();
        other.address = b3;

        let new = ServiceRuntime::new(1, service("tcp")).expect("builds");
        new.carry_over(&[carried.clone(), vec![other]].concat());
        let snap = new.snapshot().load_full();
        let view = |a: SocketAddr| snap.backends.iter().find(|b| b.address == a).expect("in");
        assert!(!view(b1).eligible(), "drained across the upgrade");
        assert!(!view(b2).up, "down across the upgrade");
        assert_eq!(
            view(b2).weight,
            7 * WEIGHT_SCALE,
            "its admin weight is kept"
        );
        assert_eq!(new.carried(), carried, "and carried on by the next upgrade");

        // A new config that configures another weight clears the admin one, as a reload does.
        let mut svc = service("tcp");
        svc.backends[1].weight = 3;
        let new = ServiceRuntime::new(2, svc).expect("builds");
        new.carry_over(&carried);
        let snap = new.snapshot().load_full();
        let b = snap.backends.iter().find(|b| b.address == b2).expect("in");
        assert_eq!(b.weight, 3 * WEIGHT_SCALE, "the new configured weight");
    }

    /// A backend whose active checks pass but whose connects failed `fall` times is down:
    /// `/status` says why beside its passing check, not a bare "ok".
    #[test]
    fn the_status_of_a_backend_down_with_a_passing_check_says_why() {
        let rt = ServiceRuntime::new(0, service("tcp")).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let last_check = |rt: &ServiceRuntime| {
            let st = rt.status();
            let b = st.backends.into_iter().find(|b| b.address == b1);
            b.expect("listed").last_check
        };
        {
            let st = lock(&rt.state);
            let b = st.backends.get(b1).expect("a backend");
            lock(&b.rt.health).record_check(Ok(()), Instant::now());
        }
        assert_eq!(last_check(&rt).as_deref(), Some("ok"));
        rt.passive_failure(b1, "connection refused");
        rt.passive_failure(b1, "connection refused");
        let shown = last_check(&rt).unwrap_or_default();
        assert!(
            shown.starts_with("ok; down: 2 consecutive failures") && shown.contains("refused"),
            "a down backend's status hides why: {shown:?}"
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
            50 * WEIGHT_SCALE,
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
            (1..50 * WEIGHT_SCALE).contains(&w),
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
    fn enable_ends_a_drain_by_weight_0_and_the_status_calls_weight_0_draining() {
        let rt = ServiceRuntime::new(0, service("none")).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        let state = |rt: &ServiceRuntime| {
            let st = rt.status();
            let b = st
                .backends
                .iter()
                .find(|b| b.address == b1)
                .expect("listed");
            (b.state, b.weight)
        };
        rt.set_weight(b1, 0).expect("9001 is a backend");
        assert_eq!(state(&rt), ("draining", 0));
        rt.enable(b1).expect("9001 is a backend");
        assert_eq!(
            state(&rt),
            ("active", 1),
            "enable after `weight 0` left the backend out"
        );
        assert!(rt.snapshot().load().backends[0].eligible());
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
}
