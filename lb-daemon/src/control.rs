//! The running daemon as the admin API and reloads see it: the config in force, the
//! services, the data plane, and the reload history.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tracing::warn;

use crate::admin::status::{
    ReloadHistory, ServiceStatus, SnatAddressUse, Status, XdpStatus, XdpTraffic,
};
use crate::announce::Announcer;
use crate::config::Config;
use crate::dataplane::proxy::Proxy;
use crate::dataplane::xdp::{MapsError, XdpCounters, XdpPlane};
use crate::placement::{Placement, Planes};
use crate::service::{ServiceRuntime, ServiceSet};

/// The daemon's shared control state. One per process, behind an `Arc`.
pub struct Control {
    path: PathBuf,
    config: Mutex<Config>,
    services: Arc<ServiceSet>,
    /// The data planes, and where services are placed on them.
    planes: Planes,
    /// Service index ([`ServiceRuntime::index`](crate::service::ServiceRuntime::index)) →
    /// where it runs. Every running or draining service has one.
    placements: Mutex<HashMap<usize, Placement>>,
    started: SystemTime,
    reloads: Mutex<ReloadHistory>,
    /// Serialises reloads (SIGHUP and `POST /reload` may race).
    reloading: Arc<tokio::sync::Mutex<()>>,
    /// Services a reload removed, with the end of their drain: shown in `/status` while
    /// connections are still open on them.
    retired: Mutex<Vec<(Arc<ServiceRuntime>, Instant)>>,
    /// Whether the failing reads of the XDP counters since the last good one were logged
    /// already (logged once per outage, not per scrape).
    xdp_read_failed: std::sync::atomic::AtomicBool,
    /// The XDP counters of the last good read: shown while reads fail, so that no counter
    /// goes back (Prometheus would take the drop for a reset, and `rate()` would spike).
    xdp_last: Mutex<Option<XdpCounters>>,
    /// The VIP announcer (`[announce]`), set once the daemon runs.
    announcer: std::sync::OnceLock<Arc<Announcer>>,
    /// The backends' state an upgrade's old daemon carried over, until each service the
    /// start places takes its own ([`Control::take_carried`]).
    carried: Mutex<Vec<crate::handover::CarriedBackend>>,
}

impl Control {
    /// The control state of a daemon that runs no service yet, on `proxy`, with `config`'s
    /// `[global]` and `[admin]` (read from `path`): start-up then applies the services as a
    /// reload would ([`crate::reload::apply_config`]).
    pub fn new(path: &Path, config: &Config, services: Arc<ServiceSet>, proxy: Proxy) -> Arc<Self> {
        let started = SystemTime::now();
        Arc::new(Control {
            path: path.to_path_buf(),
            config: Mutex::new(Config {
                services: Vec::new(),
                ..config.clone()
            }),
            services,
            planes: Planes::new(proxy),
            placements: Mutex::new(HashMap::new()),
            started,
            reloads: Mutex::new(ReloadHistory {
                last_success_unix_seconds: unix_seconds(started),
                ..ReloadHistory::default()
            }),
            reloading: Arc::new(tokio::sync::Mutex::new(())),
            retired: Mutex::new(Vec::new()),
            xdp_read_failed: std::sync::atomic::AtomicBool::new(false),
            xdp_last: Mutex::new(None),
            announcer: std::sync::OnceLock::new(),
            carried: Mutex::new(Vec::new()),
        })
    }

    /// Keeps `carried`, the backends' state the daemon an upgrade replaces handed over, for
    /// the services the start places.
    pub fn carry(&self, carried: Vec<crate::handover::CarriedBackend>) {
        *lock(&self.carried) = carried;
    }

    /// Adds `carried` to what [`Control::carry`] kept: a reload's moved services.
    pub fn carry_also(&self, carried: impl IntoIterator<Item = crate::handover::CarriedBackend>) {
        lock(&self.carried).extend(carried);
    }

    /// Takes the carried state of service `name`'s backends (see [`Control::carry`]); empty
    /// for a service the old daemon did not have, and for a service a reload adds (unless it
    /// moved a running one: [`Control::carry_also`]). `reload::apply_config` drops what no
    /// service took when it returns.
    pub fn take_carried(&self, name: &str) -> Vec<crate::handover::CarriedBackend> {
        let mut all = lock(&self.carried);
        let (mine, rest) = std::mem::take(&mut *all)
            .into_iter()
            .partition(|c| c.service == name);
        *all = rest;
        mine
    }

    /// The config file reloads read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The config in force.
    pub fn config(&self) -> Config {
        lock(&self.config).clone()
    }

    /// The admin API's bearer token in the config in force, if it sets one.
    pub fn admin_token(&self) -> Option<String> {
        lock(&self.config)
            .admin
            .token
            .as_ref()
            .map(|t| t.secret.clone())
    }

    /// Replaces the config in force (after a reload applied it).
    pub(crate) fn set_config(&self, config: Config) {
        *lock(&self.config) = config;
    }

    /// The running services.
    pub fn services(&self) -> &Arc<ServiceSet> {
        &self.services
    }

    /// The data planes.
    pub fn planes(&self) -> &Planes {
        &self.planes
    }

    /// Whether the service with index `index` runs on the eBPF data plane (XDP or tc hook).
    pub fn on_xdp(&self, index: usize) -> bool {
        lock(&self.placements)
            .get(&index)
            .is_some_and(Placement::on_xdp)
    }

    /// Whether eBPF service `index`'s table has no backend although its snapshot may have
    /// eligible ones (they can be left out of it; see `CountersReader::table_empty`); `None`
    /// when it is not on the eBPF plane or the plane is busy writing a table.
    pub fn ebpf_table_empty(&self, index: usize) -> Option<bool> {
        if !self.on_xdp(index) {
            return None;
        }
        self.planes.ebpf_table_empty(index)
    }

    /// Where the service with index `index` runs; `None` for an index never placed.
    pub fn placement(&self, index: usize) -> Option<Placement> {
        lock(&self.placements).get(&index).cloned()
    }

    /// Records where the service with index `index` runs (a start or a reload placed it).
    pub(crate) fn set_placement(&self, index: usize, placement: Placement) {
        lock(&self.placements).insert(index, placement);
    }

    /// Forgets the placement of a service that is gone.
    pub(crate) fn forget_placement(&self, index: usize) {
        lock(&self.placements).remove(&index);
    }

    /// Ends the adoption of a pinned eBPF set once the first config is placed; `false` when
    /// no eBPF plane runs. The addresses of the services placed on the proxy go with it: an
    /// adopted service at one of them lets go of its VIP at once.
    pub fn settle_adoption(&self) -> bool {
        let proxied: Vec<(std::net::SocketAddr, crate::config::Protocol)> = (self.services.all())
            .iter()
            .filter(|s| !self.on_xdp(s.index()))
            .map(|s| {
                let snap = s.snapshot().load();
                (snap.listen, snap.protocol)
            })
            .collect();
        self.planes.settle_adoption(&proxied)
    }

    /// Takes the XDP data plane out for shutdown; later calls get `None`.
    pub fn take_xdp(&self) -> Option<XdpPlane> {
        self.planes.take_xdp()
    }

    /// The XDP program's counters now; `None` when no XDP plane is loaded, `Err` when a map
    /// cannot be read. Does not wait for a reload placing a service.
    pub fn xdp_counters(&self) -> Option<Result<XdpCounters, MapsError>> {
        self.planes.xdp_counters()
    }

    /// The data planes in use, joined with `+` in the order xdp, tc, proxy: `"proxy"`,
    /// `"xdp"`, `"tc"`, `"xdp+proxy"`, `"tc+proxy"`, `"xdp+tc+proxy"`...; `"proxy"` with no
    /// service.
    pub fn dataplane(&self) -> String {
        let names = self.services.all();
        let placements = lock(&self.placements);
        let mut used = [false; 3];
        for s in names.iter() {
            match placements.get(&s.index()).map(Placement::plane) {
                Some("xdp") => used[0] = true,
                Some("tc") => used[1] = true,
                _ => used[2] = true,
            }
        }
        if !used.contains(&true) {
            return "proxy".into();
        }
        let words: Vec<&str> = ["xdp", "tc", "proxy"]
            .into_iter()
            .zip(used)
            .filter_map(|(w, u)| u.then_some(w))
            .collect();
        words.join("+")
    }

    /// Runs `f` on the proxy; `None` once it was taken for shutdown.
    pub fn with_proxy<T>(&self, f: impl FnOnce(&Proxy) -> T) -> Option<T> {
        self.planes.with_proxy(f)
    }

    /// Takes the proxy out for shutdown; later calls get `None`.
    pub fn take_proxy(&self) -> Option<Proxy> {
        self.planes.take_proxy()
    }

    /// Waits for any reload in progress and holds off others while the guard lives.
    ///
    /// The guard is owned, so it can go with the blocking work it protects: a reload whose
    /// caller went away (an HTTP client that hung up) still holds off the next one until its
    /// work is done.
    pub(crate) async fn reload_guard(&self) -> tokio::sync::OwnedMutexGuard<()> {
        Arc::clone(&self.reloading).lock_owned().await
    }

    /// Marks the daemon stopping: reloads from now on are refused, and nothing is placed on
    /// a data plane any more. Then waits for a reload in progress to finish, so that what it
    /// started is stopped with the rest.
    pub(crate) async fn begin_stop(&self) {
        self.planes.stop_placing();
        drop(self.reload_guard().await);
    }

    /// Whether the daemon is stopping (see [`Control::begin_stop`]).
    pub(crate) fn stopping(&self) -> bool {
        self.planes.stopping()
    }

    /// Records a reload's outcome: `outcome` is the summary of what changed, or why the reload was refused.
    pub(crate) fn record_reload(&self, outcome: Result<&str, String>) {
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

    /// Keeps `service`, which a reload removed, in `/status` while it drains, for at most
    /// `drain_timeout`: on the proxy while it has open connections or sessions, on the eBPF
    /// plane for all of it (see `draining`).
    pub(crate) fn retire(&self, service: Arc<ServiceRuntime>, drain_timeout: Duration) {
        lock(&self.retired).push((service, Instant::now() + drain_timeout));
        // Pruned here too, so reloads without status requests do not pile them up.
        let _ = self.draining();
    }

    /// The removed services still draining; forgets those done. A proxy service drains while
    /// it has open connections (until its deadline); an eBPF one until its deadline, as the
    /// maps keep its VIP and backends that long (the proxy's counts it has none of).
    fn draining(&self) -> Vec<Arc<ServiceRuntime>> {
        let mut retired = lock(&self.retired);
        let now = Instant::now();
        retired.retain(|(s, until)| {
            let draining = now < *until && (s.active() > 0 || self.on_xdp(s.index()));
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
        // The counters to show, and why they are not fresh.
        let xdp: Option<(Option<XdpCounters>, Option<String>)> = match self.xdp_counters() {
            None => None,
            Some(Ok(c)) => {
                // A later failure is logged again.
                self.xdp_read_failed
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                *lock(&self.xdp_last) = Some(c.clone());
                Some((Some(c), None))
            }
            Some(Err(e)) => {
                let e = e.to_string();
                if !self
                    .xdp_read_failed
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    warn!(
                        "the XDP counters cannot be read: {e}; /status and /metrics show the \
                         last ones read until they can"
                    );
                }
                Some((lock(&self.xdp_last).clone(), Some(e)))
            }
        };
        let counters_of = |s: &ServiceRuntime| match &xdp {
            Some((Some(c), _)) if self.on_xdp(s.index()) => {
                c.services.iter().find(|sc| sc.index == s.index())
            }
            _ => None,
        };
        let show = |s: &Arc<ServiceRuntime>| {
            let mut status = s.status();
            status.dataplane = self
                .placement(s.index())
                .map_or_else(|| "proxy data plane".to_string(), |p| p.to_string());
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
            xdp: xdp.map(|(c, error)| XdpStatus {
                packets: c.map_or_else(BTreeMap::new, |c| c.global.into_iter().collect()),
                error,
            }),
            announce: self.announcer().map(|a| a.status()),
        }
    }

    /// The VIP announcer, once `[announce]` started one.
    pub fn announcer(&self) -> Option<&Arc<Announcer>> {
        self.announcer.get()
    }

    /// Records the VIP announcer (start-up, once).
    pub(crate) fn set_announcer(&self, announcer: Arc<Announcer>) {
        let _ = self.announcer.set(announcer);
    }
}

/// Adds what XDP counted to a service's status: its own `xdp` figures, and the flows and
/// bytes folded into each backend's `total` and `bytes_to_backend`, so the columns (and the
/// metrics built from them) count traffic whichever data plane carried it; and the digest
/// of the program's own Maglev table as `maglev_table`.
fn add_xdp(status: &mut ServiceStatus, c: &crate::dataplane::xdp::ServiceCounters) {
    status.xdp = Some(c.counters.into());
    // The table the program places new flows by (the eBPF plane runs `maglev` alone): it
    // leaves out what the snapshot's keeps (a backend with no id, of the other family, or
    // whose replies would miss the program).
    status.maglev_table = c.table_digest;
    for b in &mut status.backends {
        if let Some(bc) = c.backends.iter().find(|bc| bc.address == b.address) {
            let t: XdpTraffic = bc.counters.into();
            b.total += t.flows;
            b.bytes_to_backend += t.bytes;
            b.active += bc.open_flows.unwrap_or(0);
            let per_address: Option<Vec<SnatAddressUse>> = bc
                .snat_ports_taken
                .as_ref()
                .zip(c.snat_ports)
                .map(|(taken, ports)| {
                    taken
                        .iter()
                        .map(|&(address, in_use)| SnatAddressUse {
                            address,
                            in_use,
                            free: ports.saturating_sub(in_use),
                        })
                        .collect()
                });
            let sum =
                |f: fn(&SnatAddressUse) -> u64| per_address.as_ref().map(|v| v.iter().map(f).sum());
            b.xdp = Some(XdpTraffic {
                open_flows: bc.open_flows,
                snat_ports_in_use: sum(|u| u.in_use),
                snat_ports_free: sum(|u| u.free),
                snat_counted_unix_seconds: per_address
                    .as_ref()
                    .and(bc.snat_counted_at)
                    .map(unix_seconds),
                snat_local_addresses: per_address,
                left_out: bc.left_out.clone(),
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
