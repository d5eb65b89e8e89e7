//! The running daemon as the admin API and reloads see it: the config in force, the
//! services, the data plane, and the reload history.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tracing::warn;

use crate::admin::status::{ReloadHistory, ServiceStatus, Status, XdpStatus, XdpTraffic};
use crate::config::{Config, Global};
use crate::dataplane::proxy::Proxy;
use crate::dataplane::xdp::{CountersReader, MapsError, XdpCounters, XdpPlane};
use crate::service::{ServiceRuntime, ServiceSet};

/// The daemon's shared control state. One per process, behind an `Arc`.
pub struct Control {
    path: PathBuf,
    config: Mutex<Config>,
    services: Arc<ServiceSet>,
    proxy: Mutex<Option<Proxy>>,
    /// The XDP data plane, when any service runs on it; taken out at shutdown.
    xdp: Mutex<Option<XdpPlane>>,
    /// Reads the XDP counters without the `xdp` lock, which a reload holds while it places a
    /// service (attach, first table write): `/status` does not wait for that.
    xdp_reader: Mutex<Option<CountersReader>>,
    /// Service index ([`ServiceRuntime::index`](crate::service::ServiceRuntime::index)) →
    /// (runs on XDP, the placement in words). A service missing here runs on the proxy.
    placements: Mutex<HashMap<usize, Placed>>,
    started: SystemTime,
    reloads: Mutex<ReloadHistory>,
    /// Serialises reloads (SIGHUP and `POST /reload` may race).
    reloading: Arc<tokio::sync::Mutex<()>>,
    /// Set when the daemon begins to stop: a reload then changes nothing (it would load an
    /// XDP plane nobody detaches, or start services on a proxy being drained).
    stopping: std::sync::atomic::AtomicBool,
    /// Services a reload removed, with the end of their drain: shown in `/status` while
    /// connections are still open on them.
    retired: Mutex<Vec<(Arc<ServiceRuntime>, Instant)>>,
    /// Whether the failing reads of the XDP counters since the last good one were logged
    /// already (logged once per outage, not per scrape).
    xdp_read_failed: std::sync::atomic::AtomicBool,
}

/// Where a service runs, as [`Control`] remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Whether the service's flows are carried by XDP.
    pub on_xdp: bool,
    /// The placement in words, for `/status` and the log.
    pub words: String,
}

impl Control {
    /// The control state of a daemon that runs `config` (read from `path`) on `proxy` and,
    /// for the services `placements` marks (service index → [`Placed`]), on `xdp`.
    pub fn new(
        path: &Path,
        config: Config,
        services: Arc<ServiceSet>,
        proxy: Proxy,
        xdp: Option<XdpPlane>,
        placements: HashMap<usize, Placed>,
    ) -> Arc<Self> {
        let started = SystemTime::now();
        Arc::new(Control {
            path: path.to_path_buf(),
            config: Mutex::new(config),
            services,
            proxy: Mutex::new(Some(proxy)),
            xdp_reader: Mutex::new(xdp.as_ref().map(XdpPlane::counters_reader)),
            xdp: Mutex::new(xdp),
            placements: Mutex::new(placements),
            started,
            reloads: Mutex::new(ReloadHistory {
                last_success_unix_seconds: unix_seconds(started),
                ..ReloadHistory::default()
            }),
            reloading: Arc::new(tokio::sync::Mutex::new(())),
            stopping: std::sync::atomic::AtomicBool::new(false),
            retired: Mutex::new(Vec::new()),
            xdp_read_failed: std::sync::atomic::AtomicBool::new(false),
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

    /// Whether the service with index `index` runs on XDP.
    pub fn on_xdp(&self, index: usize) -> bool {
        lock(&self.placements).get(&index).is_some_and(|p| p.on_xdp)
    }

    /// Where the service with index `index` runs; `None` for a service never placed (one a
    /// reload started on the proxy).
    pub fn placement(&self, index: usize) -> Option<Placed> {
        lock(&self.placements).get(&index).cloned()
    }

    /// Records where the service with index `index` runs (a reload started or moved it).
    pub(crate) fn set_placement(&self, index: usize, placed: Placed) {
        lock(&self.placements).insert(index, placed);
    }

    /// Forgets the placement of a service that is gone.
    pub(crate) fn forget_placement(&self, index: usize) {
        lock(&self.placements).remove(&index);
    }

    /// Runs `f` on the XDP data plane; `None` when there is none (or after shutdown took it).
    pub fn with_xdp<T>(&self, f: impl FnOnce(&mut XdpPlane) -> T) -> Option<T> {
        lock(&self.xdp).as_mut().map(f)
    }

    /// Runs `f` on the XDP data plane, loading it first ([`XdpPlane::load`], with `global`'s
    /// `bpf_object`) when none runs yet: a reload may be the first to need XDP.
    ///
    /// Returns `Err(reason)` when the plane had to be loaded and could not be.
    pub(crate) fn with_xdp_loaded<T>(
        &self,
        global: &Global,
        f: impl FnOnce(&mut XdpPlane) -> T,
    ) -> Result<T, String> {
        if self.stopping() {
            return Err("the daemon is stopping".into());
        }
        // Loaded (and verified by the kernel, a matter of seconds for a big program) without
        // the lock. Reloads are serialised (the guard goes with the work), so no other plane
        // appears meanwhile; if one did, it stays and this one is dropped.
        let missing = lock(&self.xdp).is_none();
        let loaded = if missing {
            Some(XdpPlane::load(global)?)
        } else {
            None
        };
        let mut slot = lock(&self.xdp);
        if let (Some(plane), None) = (loaded, slot.as_ref()) {
            *lock(&self.xdp_reader) = Some(plane.counters_reader());
            *slot = Some(plane);
        }
        let plane = slot.as_mut().ok_or("the XDP plane is stopped")?;
        Ok(f(plane))
    }

    /// Takes the XDP data plane out for shutdown; later calls get `None`.
    pub fn take_xdp(&self) -> Option<XdpPlane> {
        *lock(&self.xdp_reader) = None;
        lock(&self.xdp).take()
    }

    /// The XDP program's counters now; `None` when no service runs on XDP, `Err` when a map
    /// cannot be read. Does not wait for a reload placing a service (see `xdp_reader`).
    pub fn xdp_counters(&self) -> Option<Result<XdpCounters, MapsError>> {
        let reader = lock(&self.xdp_reader).clone();
        reader.map(|r| r.read())
    }

    /// The data planes in use: `"proxy"`, `"xdp"` or `"xdp+proxy"`.
    pub fn dataplane(&self) -> &'static str {
        let names = self.services.all();
        let xdp = names.iter().filter(|s| self.on_xdp(s.index())).count();
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
    ///
    /// The guard is owned, so it can go with the blocking work it protects: a reload whose
    /// caller went away (an HTTP client that hung up) still holds off the next one until its
    /// work is done.
    pub(crate) async fn reload_guard(&self) -> tokio::sync::OwnedMutexGuard<()> {
        Arc::clone(&self.reloading).lock_owned().await
    }

    /// Marks the daemon stopping: reloads from now on are refused, and
    /// [`Control::with_xdp_loaded`] loads nothing. Then waits for a reload in progress to
    /// finish, so that what it started is stopped with the rest.
    pub(crate) async fn begin_stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        drop(self.reload_guard().await);
    }

    /// Whether the daemon is stopping (see [`Control::begin_stop`]).
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
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

    /// Keeps `service`, which a reload removed, in `/status` while it still has open
    /// connections or sessions, for at most `drain_timeout`.
    pub(crate) fn retire(&self, service: Arc<ServiceRuntime>, drain_timeout: Duration) {
        lock(&self.retired).push((service, Instant::now() + drain_timeout));
        // Pruned here too, so reloads without status requests do not pile them up.
        let _ = self.draining();
    }

    /// The removed services still draining; forgets those done.
    fn draining(&self) -> Vec<Arc<ServiceRuntime>> {
        let mut retired = lock(&self.retired);
        let now = Instant::now();
        retired.retain(|(s, until)| {
            let draining = now < *until && s.active() > 0;
            if !draining {
                self.forget_placement(s.index());
            }
            draining
        });
        retired.iter().map(|(s, _)| Arc::clone(s)).collect()
    }

    /// `GET /status`.
    pub fn status(&self) -> Status {
        let (active, counters) = self
            .with_proxy(|p| (p.active(), p.counters()))
            .unwrap_or_default();
        let xdp = match self.xdp_counters() {
            None => None,
            Some(Ok(c)) => {
                // A later failure is logged again.
                self.xdp_read_failed
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                Some(Ok(c))
            }
            Some(Err(e)) => {
                let e = e.to_string();
                if !self
                    .xdp_read_failed
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    warn!("the XDP counters cannot be read: {e}; /status and /metrics miss them");
                }
                Some(Err(e))
            }
        };
        let counters_of = |s: &ServiceRuntime| match &xdp {
            Some(Ok(c)) if self.on_xdp(s.index()) => {
                c.services.iter().find(|sc| sc.index == s.index())
            }
            _ => None,
        };
        let show = |s: &Arc<ServiceRuntime>| {
            let mut status = s.status();
            status.dataplane = self
                .placement(s.index())
                .map_or_else(|| "proxy data plane".to_string(), |p| p.words);
            if let Some(c) = counters_of(s) {
                add_xdp(&mut status, c);
            }
            status
        };
        Status {
            config: self.path.clone(),
            dataplane: self.dataplane(),
            uptime_seconds: self.started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
            active,
            proxy: counters.into(),
            reloads: self.reloads(),
            services: self.services.all().iter().map(show).collect(),
            removed_services: self.draining().iter().map(show).collect(),
            xdp: xdp.map(|r| match r {
                Ok(c) => XdpStatus {
                    packets: c.global.into_iter().collect(),
                    error: None,
                },
                Err(e) => XdpStatus {
                    packets: BTreeMap::new(),
                    error: Some(e),
                },
            }),
        }
    }
}

/// Adds what XDP counted to a service's status: its own `xdp` figures, and the flows and
/// bytes folded into each backend's `total` and `bytes_to_backend`, so the columns (and the
/// metrics built from them) count traffic whichever data plane carried it.
fn add_xdp(status: &mut ServiceStatus, c: &crate::dataplane::xdp::ServiceCounters) {
    status.xdp = Some(c.counters.into());
    for b in &mut status.backends {
        if let Some(bc) = c.backends.iter().find(|bc| bc.address == b.address) {
            let t: XdpTraffic = bc.counters.into();
            b.total += t.flows;
            b.bytes_to_backend += t.bytes;
            b.active += bc.open_flows.unwrap_or(0);
            b.xdp = Some(XdpTraffic {
                open_flows: bc.open_flows,
                snat_ports_in_use: bc.snat_ports_taken,
                snat_ports_free: bc
                    .snat_ports_taken
                    .zip(c.snat_ports)
                    .map(|(taken, ports)| ports.saturating_sub(taken)),
                ..t
            });
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
