//! The running daemon as the admin API and reloads see it: the config in force, the
//! services, the data plane, and the reload history.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::config::Config;
use crate::dataplane::proxy::{Proxy, ProxyCounters};
use crate::service::{ServiceSet, ServiceStatus};

/// The daemon's shared control state. One per process, behind an `Arc`.
pub struct Control {
    path: PathBuf,
    config: Mutex<Config>,
    services: Arc<ServiceSet>,
    proxy: Mutex<Option<Proxy>>,
    /// Service name → (runs on XDP, the placement in words), as decided at start.
    placements: HashMap<String, (bool, String)>,
    started: SystemTime,
    reloads: Mutex<ReloadHistory>,
    /// Serialises reloads (SIGHUP and `POST /reload` may race).
    reloading: tokio::sync::Mutex<()>,
}

/// Counts of reloads and the latest outcome.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadHistory {
    /// Reloads applied.
    pub succeeded: u64,
    /// Reloads refused (the running config stayed).
    pub failed: u64,
    /// The latest reload's outcome: what changed, or why it was refused.
    pub last: Option<String>,
    /// Unix time in seconds of the latest applied reload (or of start).
    pub last_success_unix_seconds: f64,
}

/// `GET /status`: the daemon and every service.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The config file.
    pub config: PathBuf,
    /// The data planes carrying the services: `"proxy"`, `"xdp"` or `"xdp+proxy"`; each
    /// service's own is in its `dataplane`.
    pub dataplane: &'static str,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// Connections and sessions open in the data plane.
    pub active: u64,
    /// Proxy-wide counters.
    pub proxy: ProxyCountersView,
    /// Reloads so far.
    pub reloads: ReloadHistory,
    /// The services, in config order.
    pub services: Vec<ServiceStatus>,
}

/// [`ProxyCounters`] for JSON.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ProxyCountersView {
    /// Connections refused and datagrams dropped for want of a backend.
    pub no_backend: u64,
    /// UDP datagrams dropped.
    pub dropped_datagrams: u64,
    /// Connections and sessions ended by an error.
    pub errors: u64,
}

impl From<ProxyCounters> for ProxyCountersView {
    fn from(c: ProxyCounters) -> Self {
        ProxyCountersView {
            no_backend: c.no_backend,
            dropped_datagrams: c.dropped_datagrams,
            errors: c.errors,
        }
    }
}

impl Control {
    /// The control state of a daemon that runs `config` (read from `path`) on `proxy` and,
    /// for the services `placements` marks (name → (on XDP, placement in words)), on XDP.
    pub fn new(
        path: &Path,
        config: Config,
        services: Arc<ServiceSet>,
        proxy: Proxy,
        placements: HashMap<String, (bool, String)>,
    ) -> Arc<Self> {
        let started = SystemTime::now();
        Arc::new(Control {
            path: path.to_path_buf(),
            config: Mutex::new(config),
            services,
            proxy: Mutex::new(Some(proxy)),
            placements,
            started,
            reloads: Mutex::new(ReloadHistory {
                last_success_unix_seconds: unix_seconds(started),
                ..ReloadHistory::default()
            }),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// The config file reloads read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The config in force.
    pub fn config(&self) -> Config {
        lock(&self.config).clone()
    }

    /// Replaces the config in force (after a reload applied it).
    pub(crate) fn set_config(&self, config: Config) {
        *lock(&self.config) = config;
    }

    /// The running services.
    pub fn services(&self) -> &Arc<ServiceSet> {
        &self.services
    }

    /// Whether service `name` runs on XDP (its maps were set up at start, so a reload may
    /// change its weights and health settings but not its backend list or address).
    pub fn on_xdp(&self, name: &str) -> bool {
        self.placements.get(name).is_some_and(|(xdp, _)| *xdp)
    }

    /// The data planes in use: `"proxy"`, `"xdp"` or `"xdp+proxy"`.
    pub fn dataplane(&self) -> &'static str {
        let names = self.services.all();
        let xdp = names.iter().filter(|s| self.on_xdp(s.name())).count();
        match (xdp, names.len() - xdp) {
            (0, _) => "proxy",
            (_, 0) => "xdp",
            _ => "xdp+proxy",
        }
    }

    /// Runs `f` on the proxy; `None` once it was taken for shutdown.
    pub fn with_proxy<T>(&self, f: impl FnOnce(&Proxy) -> T) -> Option<T> {
        lock(&self.proxy).as_ref().map(f)
    }

    /// Takes the proxy out for shutdown; later calls get `None`.
    pub fn take_proxy(&self) -> Option<Proxy> {
        lock(&self.proxy).take()
    }

    /// Waits for any reload in progress and holds off others while the guard lives.
    pub(crate) async fn reload_guard(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reloading.lock().await
    }

    /// Records a reload's outcome.
    pub(crate) fn record_reload(&self, outcome: &Result<String, String>) {
        let mut r = lock(&self.reloads);
        match outcome {
            Ok(summary) => {
                r.succeeded += 1;
                r.last = Some(format!("applied: {summary}"));
                r.last_success_unix_seconds = unix_seconds(SystemTime::now());
            }
            Err(why) => {
                r.failed += 1;
                r.last = Some(format!("refused: {why}"));
            }
        }
    }

    /// The reload history.
    pub fn reloads(&self) -> ReloadHistory {
        lock(&self.reloads).clone()
    }

    /// Unix time in seconds of the daemon's start.
    pub fn start_unix_seconds(&self) -> f64 {
        unix_seconds(self.started)
    }

    /// `GET /status`.
    pub fn status(&self) -> Status {
        let (active, counters) = self
            .with_proxy(|p| (p.active(), p.counters()))
            .unwrap_or_default();
        Status {
            config: self.path.clone(),
            dataplane: self.dataplane(),
            uptime_seconds: self.started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
            active,
            proxy: counters.into(),
            reloads: self.reloads(),
            services: self
                .services
                .all()
                .iter()
                .map(|s| {
                    let mut status = s.status();
                    status.dataplane = self.placements.get(s.name()).map_or_else(
                        || "proxy data plane (started by a reload)".to_string(),
                        |(_, words)| words.clone(),
                    );
                    status
                })
                .collect(),
        }
    }
}

/// A monotonic-clock-free Unix time, for the metrics' `_timestamp_seconds`.
fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
