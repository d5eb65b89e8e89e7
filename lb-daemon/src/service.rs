//! The control plane's view of one service: its backends' health, and the snapshots it
//! publishes to the data planes.
//!
//! Health checks and passive failures feed each backend's [`HealthState`]; a change of state
//! rebuilds the service's scheduler (and so its Maglev table) from scratch and swaps the new
//! [`ServiceSnapshot`] in whole. Rebuilds of one service are serialised, so two concurrent
//! transitions can never publish an older view after a newer one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;
use tracing::{error, info, warn};

use crate::config::{CheckKind, Service};
use crate::dataplane::FlowEvents;
use crate::health::{self, Health, HealthState, Transition};
use crate::scheduler::{self, Candidate, SchedulerError};
use crate::snapshot::{BackendStats, BackendView, ServiceSnapshot, SharedSnapshot};

/// One backend as the control plane tracks it.
struct BackendRuntime {
    address: SocketAddr,
    weight: u32,
    health: Arc<Mutex<HealthState>>,
    stats: Arc<BackendStats>,
    /// Set by a passive failure, cleared by the next success: lets the data plane skip the
    /// control plane entirely on the common path (a connect that works after one that worked).
    failing: AtomicBool,
}

/// A configured service at run time: its backends' health and its published snapshot.
pub struct ServiceRuntime {
    index: usize,
    config: Service,
    backends: Vec<BackendRuntime>,
    by_address: HashMap<SocketAddr, usize>,
    snapshot: SharedSnapshot,
    generation: AtomicU64,
    rebuild: Mutex<()>,
}

impl ServiceRuntime {
    /// Sets up service number `index` from its validated config and publishes its first
    /// snapshot, with every backend up (HAProxy's default: a backend needs `fall` failed
    /// checks to go down).
    ///
    /// Returns `Err(SchedulerError)` only if the scheduler cannot be built from a config that
    /// validation accepted, which would be a bug.
    pub fn new(index: usize, config: Service) -> Result<Arc<Self>, SchedulerError> {
        let now = Instant::now();
        let backends: Vec<BackendRuntime> = config
            .backends
            .iter()
            .map(|b| BackendRuntime {
                address: b.address,
                weight: b.weight,
                health: Arc::new(Mutex::new(HealthState::new(
                    config.health.rise,
                    config.health.fall,
                    now,
                ))),
                stats: Arc::new(BackendStats::default()),
                failing: AtomicBool::new(false),
            })
            .collect();
        let by_address = backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.address, i))
            .collect();
        let first = Self::build_snapshot(&config, &backends, 1)?;
        Ok(Arc::new(ServiceRuntime {
            index,
            config,
            backends,
            by_address,
            snapshot: Arc::new(ArcSwap::from_pointee(first)),
            generation: AtomicU64::new(1),
            rebuild: Mutex::new(()),
        }))
    }

    /// The service's number, as data planes report it in [`FlowEvents`].
    pub fn index(&self) -> usize {
        self.index
    }

    /// The service's config.
    pub fn config(&self) -> &Service {
        &self.config
    }

    /// The snapshot the data planes read; it is replaced whole on every change.
    pub fn snapshot(&self) -> SharedSnapshot {
        Arc::clone(&self.snapshot)
    }

    /// Starts one active health check task per backend on the current tokio runtime.
    /// Returns their handles; abort them to stop checking. None with `kind = "none"`.
    pub fn spawn_health_checks(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        if self.config.health.kind == CheckKind::None {
            return Vec::new();
        }
        self.backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let this = Arc::clone(self);
                let on_transition: Arc<dyn Fn(&Transition) + Send + Sync> =
                    Arc::new(move |t: &Transition| this.transitioned(i, t));
                tokio::spawn(health::monitor(
                    b.address,
                    self.config.health.clone(),
                    Arc::clone(&b.health),
                    on_transition,
                ))
            })
            .collect()
    }

    /// Records a failed connect to `backend` seen by a data plane. It counts towards the
    /// backend's `fall` like a failed check; with `kind = "none"` it is only logged.
    pub fn passive_failure(&self, backend: SocketAddr, error: &str) {
        let Some(&i) = self.by_address.get(&backend) else {
            return;
        };
        if self.config.health.kind == CheckKind::None {
            return;
        }
        let t = lock(&self.backends[i].health).record_passive_failure(error, Instant::now());
        if let Some(t) = t {
            self.transitioned(i, &t);
        }
    }

    /// Records a successful connect to `backend` after a passive failure: the failure streak
    /// starts again. Only active checks bring a down backend back up.
    pub fn passive_success(&self, backend: SocketAddr) {
        if let Some(&i) = self.by_address.get(&backend) {
            lock(&self.backends[i].health).record_passive_success();
        }
    }

    fn transitioned(&self, backend: usize, t: &Transition) {
        // Publish before logging: once the line is out, every new flow is placed by a table
        // that reflects it. Flows placed by an older generation may still be connecting.
        let generation = self.republish();
        let b = &self.backends[backend];
        let held = humantime::format_duration(round_ms(t.held_for));
        let table = match generation {
            Some(g) => format!("table generation {g}"),
            None => "table unchanged".to_string(),
        };
        match t.to {
            Health::Down => warn!(
                "backend {} of service {} is DOWN: {}; it was {} for {held} ({table})",
                b.address, self.config.name, t.reason, t.from
            ),
            Health::Up => info!(
                "backend {} of service {} is UP: {}; it was {} for {held} ({table})",
                b.address, self.config.name, t.reason, t.from
            ),
        }
    }

    /// Builds a snapshot from the backends' current health and publishes it. Returns its
    /// generation, or `None` when the build failed and the previous snapshot stays.
    fn republish(&self) -> Option<u64> {
        let _serialised = lock(&self.rebuild);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        match Self::build_snapshot(&self.config, &self.backends, generation) {
            Ok(snap) => {
                if snap.eligible_count() == 0 {
                    error!(
                        "service {} has no backend up: new {} flows are refused until one returns",
                        self.config.name,
                        protocol_name(&self.config)
                    );
                }
                self.snapshot.store(Arc::new(snap));
                Some(generation)
            }
            Err(e) => {
                error!(
                    "service {}: could not rebuild the scheduler ({e}); keeping the previous table",
                    self.config.name
                );
                None
            }
        }
    }

    fn build_snapshot(
        config: &Service,
        backends: &[BackendRuntime],
        generation: u64,
    ) -> Result<ServiceSnapshot, SchedulerError> {
        let views: Vec<BackendView> = backends
            .iter()
            .map(|b| BackendView {
                address: b.address,
                weight: b.weight,
                up: lock(&b.health).health() == Health::Up,
                stats: Arc::clone(&b.stats),
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
}

/// Carries the data planes' connect outcomes to the services' health state.
///
/// The data plane calls it on every connect; the common case (a success after a success)
/// costs one relaxed atomic load. So only the first success after a failed connect reaches
/// the health state: it resets a failure streak that failed connects started, but successful
/// connects do not cancel failed active checks (two failed checks and one failed connect
/// reach `fall = 3`). Unlike HAProxy's `observe layer4`, which needs `error-limit` (10)
/// errors to count one failed check, every failed connect counts as one failure here. Failures and the first success after them go through a
/// bounded channel to a control plane task, so a data plane thread never waits on a health
/// lock or a table rebuild; under a flood of failures, excess reports are dropped (they
/// would only repeat what the health state already knows).
pub struct PassiveFeedback {
    services: Vec<Arc<ServiceRuntime>>,
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
    /// Creates the feedback path for `services` (indexed by their number) and the receiver
    /// that [`PassiveFeedback::apply`] drains. `capacity`: queued events before drops.
    pub fn new(
        services: Vec<Arc<ServiceRuntime>>,
        capacity: usize,
    ) -> (Arc<Self>, tokio::sync::mpsc::Receiver<PassiveEvent>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (Arc::new(PassiveFeedback { services, tx }), rx)
    }

    /// Applies queued events to the services' health state until every sender is gone.
    pub async fn apply(
        services: Vec<Arc<ServiceRuntime>>,
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

    fn backend(&self, service: usize, backend: SocketAddr) -> Option<&BackendRuntime> {
        let s = self.services.get(service)?;
        s.by_address.get(&backend).map(|&i| &s.backends[i])
    }
}

impl FlowEvents for PassiveFeedback {
    fn connect_failed(&self, service: usize, backend: SocketAddr, error: &std::io::Error) {
        if let Some(b) = self.backend(service, backend) {
            b.failing.store(true, Ordering::Relaxed);
        }
        let _dropped_when_full = self.tx.try_send(PassiveEvent::Failed {
            service,
            backend,
            error: error.to_string(),
        });
    }

    fn connect_succeeded(&self, service: usize, backend: SocketAddr) {
        let Some(b) = self.backend(service, backend) else {
            return;
        };
        if b.failing.load(Ordering::Relaxed) && b.failing.swap(false, Ordering::Relaxed) {
            let _dropped_when_full = self
                .tx
                .try_send(PassiveEvent::Recovered { service, backend });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain counters behind, still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn round_ms(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(d.as_millis() as u64)
}

fn protocol_name(config: &Service) -> &'static str {
    match config.protocol {
        crate::config::Protocol::Tcp => "TCP",
        crate::config::Protocol::Udp => "UDP",
    }
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
        let (feedback, rx) = PassiveFeedback::new(vec![Arc::clone(&rt)], 16);
        feedback.connect_failed(0, b1, &refused());
        feedback.connect_failed(0, b1, &refused());
        drop(feedback);
        let tokio_rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        tokio_rt.block_on(PassiveFeedback::apply(vec![Arc::clone(&rt)], rx));
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
    fn passive_failures_are_only_logged_without_checks() {
        let rt = ServiceRuntime::new(0, service("none")).expect("builds");
        let b1: SocketAddr = "127.0.0.1:9001".parse().expect("literal");
        for _ in 0..5 {
            rt.passive_failure(b1, "connection refused");
        }
        assert!(
            rt.snapshot().load().backends[0].up,
            "with kind = none nothing could bring the backend back, so it must stay up"
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
}
