//! Keeps the maps in step with the services: the plane's shared [`State`] (the maps, the id
//! pools, the services on XDP and the ones draining out), and a thread that every [`POLL`]
//! republishes each service whose snapshot generation changed and releases what drained.
//!
//! The health checker publishes a new snapshot on every UP/DOWN transition (and a weight
//! change, a reload or a DNS answer does the same), so a change reaches the maps at most
//! `POLL` plus one table write after it is published. A write touches only the slots that
//! differ from what the inactive half holds (Maglev moves few), so it is quick after the
//! first, which writes all M. A thread rather than a tokio task because a table write is
//! blocking map updates, up to 65537 of them, which would stall the control plane's health
//! checks.

use std::net::SocketAddr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::adopt::AdoptedService;
use super::ids::IdPool;
use super::map_walk::MapWalk;
use super::snat::SnatTimes;
use super::{limits, lock, Maps, ServiceSlot};
use crate::config::{ClientLimits, Forwarding};
use crate::dataplane::ServiceHandle;

/// How often the thread compares generations and looks for drained ids.
pub const POLL: Duration = Duration::from_millis(50);

/// Everything the XDP plane writes into the maps, behind one lock: the reload path (adding,
/// removing services), the sync thread and the counters' reader take it in turn. Nothing
/// holds it for a walk of `CONNTRACK` or `CLIENTS` (see `map_walk.rs`).
pub struct State {
    /// The maps.
    pub maps: Maps,
    /// Free backend ids (`0..MAX_BACKENDS`).
    pub backend_ids: IdPool,
    /// Free service ids (`0..MAX_SERVICES`).
    pub service_ids: IdPool,
    /// How long a removed backend or service keeps its ids for the flows pinned to it.
    pub drain_timeout: Duration,
    /// The services on XDP, in the order they were placed.
    pub running: Vec<Running>,
    /// Removed services whose pinned flows may still go on, until their deadline.
    pub leaving: Vec<Leaving>,
    /// Backend ids of an adopted pinned set that no service of the config claimed (see
    /// `adopt.rs`), flagged draining, released at their deadline.
    pub orphans: Vec<(u32, Instant)>,
    /// Service ids of an adopted pinned set whose services were draining, their VIP passed
    /// on (see `adopt.rs`), released at their deadline like a removed service's.
    pub orphan_services: Vec<(u32, Instant)>,
    /// Open flows per backend id of the running services, from the last count (see
    /// `open_flows.rs`); `None` before the first.
    pub open_flows: Option<std::collections::HashMap<u32, u64>>,
    /// SNAT ports taken (in use or held) per (service id, backend) of the running `nat`
    /// services, from the last walk of `NAT_REVERSE` (every [`SNAT_EVERY`] or less often);
    /// `None` before the first.
    pub snat_in_use: Option<std::collections::HashMap<(u32, std::net::IpAddr, SocketAddr), u64>>,
    /// When the walk behind `snat_in_use` began (wall clock, for `/status` and `/metrics`):
    /// every port taken before it is in the count.
    pub snat_counted_at: Option<std::time::SystemTime>,
    /// When the counters were last read (`/status`, `/metrics`): open flows are counted only while
    /// someone looks.
    pub counters_read: Option<Instant>,
    /// The daemon is stopping: every table is empty and stays so (nothing is republished);
    /// open flows are counted every [`STOPPING_EVERY`] for the drain.
    pub stopping: bool,
    /// The bridges `lb_tc` is attached to (name → ifindex), whose forwarding databases the
    /// thread copies into `BRIDGE_FDB` (see `bridge_ports.rs`).
    pub bridges: std::collections::BTreeMap<String, u32>,
    /// Ids whose release failed (a walk cut short by the program's churn, a map error), and
    /// when to try again ([`RELEASE_RETRY`] later): in no pool meanwhile.
    pub unreleased: Vec<(Drained, Instant)>,
}

/// How long ids whose release failed wait before it is tried again.
pub const RELEASE_RETRY: Duration = Duration::from_secs(5);

/// How often open flows are counted while the daemon drains on its way out.
pub const STOPPING_EVERY: Duration = Duration::from_secs(1);

/// A service on XDP.
pub struct Running {
    /// The service.
    pub service: ServiceHandle,
    /// Its place in the maps.
    pub slot: ServiceSlot,
}

/// A removed service, draining: its table is empty, its VIP and backend ids stay.
pub struct Leaving {
    /// The service's name, for the log.
    pub name: String,
    /// Its place in the maps.
    pub slot: ServiceSlot,
    /// When its VIP, service id and backend ids are released.
    pub deadline: Instant,
}

impl State {
    /// Per backend id of the running services, its service's conntrack idle timeout in
    /// whole seconds, as the program ages entries by it.
    /// The running `nat` services by service id: how their ports are held, how many their
    /// range has, and their name (for the log).
    fn snat_services(&self) -> std::collections::HashMap<u32, (SnatTimes, u64, String)> {
        self.running
            .iter()
            .filter(|r| r.slot.forwarding == Forwarding::Nat)
            .map(|r| {
                let snap = r.service.snapshot.load();
                let times = SnatTimes {
                    hold_s: r.slot.snat_hold_s,
                    idle_s: limits::idle_seconds(snap.idle_timeout),
                };
                (
                    r.slot.id,
                    (times, r.slot.snat_capacity(), snap.name.to_string()),
                )
            })
            .collect()
    }

    fn idle_by_backend(&self) -> std::collections::HashMap<u32, u32> {
        let mut idle = std::collections::HashMap::new();
        for r in &self.running {
            let secs = limits::idle_seconds(r.service.snapshot.load().idle_timeout);
            for id in r.slot.backend_ids().all() {
                idle.insert(id, secs);
            }
        }
        idle
    }

    /// Writes `service`'s current snapshot into `slot` when its generation is not the one
    /// written, when backends left out for want of ids may now get one, or when a backend
    /// left the table or came back to it by its route ([`ServiceSlot::ask_replies_again`],
    /// asked here once due); logs the outcome (a failure once per generation: the previous
    /// table stays and the next call tries again).
    pub fn republish_if_changed(&mut self, service: &ServiceHandle, slot: &mut ServiceSlot) {
        let snap = service.snapshot.load_full();
        // A snapshot written with backends left out for want of ids is written again once
        // ids are free.
        let waiting = slot.missing_ids > 0 && self.backend_ids.available() > 0;
        // A route changed since the last write may take a backend out or bring it back.
        let rerouted = slot.ask_replies_again(&snap, Instant::now());
        if snap.generation == slot.generation() && !waiting && !rerouted {
            return;
        }
        let started = Instant::now();
        let deadline = started + self.drain_timeout;
        let missing_before = slot.missing_ids;
        let written = self
            .maps
            .publish(slot, &snap, &mut self.backend_ids, deadline);
        if written.is_ok() && slot.missing_ids != missing_before {
            // Once per change, not per write.
            if slot.missing_ids > 0 {
                warn!(
                    "service {}: {} of its backends got no XDP backend id (all {} are in use, \
                     live or draining) and are left out of its XDP table until ids are released",
                    snap.name,
                    slot.missing_ids,
                    lb_common::maps::MAX_BACKENDS
                );
            } else {
                info!(
                    "service {}: every backend has an XDP backend id again",
                    snap.name
                );
            }
        }
        match written {
            Ok(written) => log_table(&snap, slot, written, started),
            Err(e) => {
                if slot.failed_generation != Some(snap.generation) {
                    slot.failed_generation = Some(snap.generation);
                    error!(
                        "service {}: cannot write XDP table generation {}: {e}; the previous \
                         table stays live and the write is retried",
                        snap.name, snap.generation
                    );
                }
            }
        }
    }

    /// Republishes every running service whose snapshot changed; nothing once stopping.
    fn republish_all(&mut self) {
        if self.stopping {
            return;
        }
        let mut running = std::mem::take(&mut self.running);
        for r in &mut running {
            self.republish_if_changed(&r.service, &mut r.slot);
        }
        self.running = running;
    }

    /// Takes out of the bookkeeping the backend ids and the removed services whose drain
    /// ended by `now`, and does the part of their release that needs the lock: each service's
    /// VIP (see [`Maps::remove_service`]), `SERVICES` and `LIMITS` entries, and the backends'
    /// `BACKENDS` entries are cleared. The ids go back to the pools only after
    /// [`Drained::forget_in_maps`] (outside the lock) and [`State::give_back`]; meanwhile they are in
    /// no pool and no slot, so nothing reuses them.
    pub fn take_drained(&mut self, now: Instant) -> Drained {
        let mut drained = Drained::default();
        // Released again from the start: their entries cleared again, the maps walked again.
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unreleased)
            .into_iter()
            .partition(|&(_, at)| at <= now);
        self.unreleased = later;
        for (again, _) in due {
            drained.backends.extend(again.backends);
            drained.services.extend(again.services);
        }
        for r in &mut self.running {
            let name = r.service.snapshot.load().name.to_string();
            for (address, id) in r.slot.backend_ids_mut().expired(now) {
                drained.backends.push((name.clone(), Some(address), id));
            }
        }
        let (expired, orphans): (Vec<_>, Vec<_>) = std::mem::take(&mut self.orphans)
            .into_iter()
            .partition(|&(_, deadline)| deadline <= now);
        self.orphans = orphans;
        for (id, _) in expired {
            drained
                .backends
                .push(("(adopted, not in the config)".into(), None, id));
        }
        let (expired, orphans): (Vec<_>, Vec<_>) = std::mem::take(&mut self.orphan_services)
            .into_iter()
            .partition(|&(_, deadline)| deadline <= now);
        self.orphan_services = orphans;
        for (id, _) in expired {
            let name = format!("id {id} (adopted, draining, its VIP passed on)");
            let cleared = (self.maps.clear_service(id)).and_then(|()| self.maps.limits.clear(id));
            match cleared {
                Ok(()) => {
                    info!("service {name}: drained; its XDP id is released");
                    drained.services.push((name, id));
                }
                Err(e) => error!(
                    "service {name}: cannot take it out of the XDP maps: {e}; it stays reserved"
                ),
            }
        }
        let (done, left): (Vec<Leaving>, Vec<Leaving>) = std::mem::take(&mut self.leaving)
            .into_iter()
            .partition(|l| l.deadline <= now);
        self.leaving = left;
        for mut l in done {
            // The VIP goes only if VIPS still names this service: a service placed since at
            // the same VIP owns the entry, even if it is leaving too.
            let cleared = self
                .maps
                .remove_service(&l.slot)
                .and_then(|()| self.maps.limits.clear(l.slot.id));
            match cleared {
                Ok(()) => drained.services.push((l.name.clone(), l.slot.id)),
                // The id stays out of the pool: its entries may still be live.
                Err(e) => error!(
                    "service {}: cannot take it out of the XDP maps: {e}; service id {} stays \
                     reserved",
                    l.name, l.slot.id
                ),
            }
            for id in l.slot.backend_ids_mut().take_all() {
                drained.backends.push((l.name.clone(), None, id));
            }
            info!("service {}: drained; its XDP ids are released", l.name);
        }
        let ids = drained.backend_ids();
        drained.backends_cleared = match self.maps.clear_backends(&ids) {
            Ok(()) => true,
            Err(e) => {
                error!(
                    "cannot release XDP backend ids {ids:?}: {e}; they stay reserved, tried \
                     again in {}s",
                    RELEASE_RETRY.as_secs()
                );
                false
            }
        };
        drained
    }

    /// Returns to the pools the ids of `drained` that [`Drained::forget_in_maps`] left safe to
    /// reuse; the others are released again [`RELEASE_RETRY`] from `now` (see
    /// [`State::take_drained`]), not kept out of the pools for good.
    pub fn give_back(&mut self, drained: Drained, now: Instant) {
        let mut again = Drained::default();
        if !drained.backends_cleared {
            again.backends = drained.backends;
        } else {
            for (service, address, id) in drained.backends {
                self.backend_ids.give_back(id);
                if let Some(address) = address {
                    info!(
                        "service {service}: backend {address} drained; XDP backend id {id} \
                         released"
                    );
                }
            }
        }
        if !drained.clients_cleared {
            again.services = drained.services;
        } else {
            for (_, id) in drained.services {
                self.service_ids.give_back(id);
            }
        }
        if !again.is_empty() {
            self.unreleased.push((again, now + RELEASE_RETRY));
        }
    }

    /// Undoes a service's first write that failed: its `SERVICES` and `LIMITS` entries are
    /// cleared and its ids go back. The VIP goes in last, so no packet reached the service
    /// and no flow was pinned to its backend ids: no walk is needed.
    pub fn undo_add(&mut self, mut slot: ServiceSlot, name: &str) {
        if let Err(e) = self.maps.remove_service(&slot) {
            error!("service {name}: cannot clear its XDP service entry: {e}");
        }
        self.service_ids.give_back(slot.id);
        if let Err(e) = self.maps.limits.clear(slot.id) {
            error!("service {name}: cannot clear its XDP limits entry: {e}");
        }
        let ids = slot.backend_ids_mut().take_all();
        self.release_unpublished_backend_ids(&ids);
    }

    /// Undoes the first write of a service that continued `found`, an adopted service, and
    /// failed: `found`'s `SERVICES` entry is written back (the flip did not happen: packets
    /// still read its live half), and the backend ids the write took from the pool go back.
    /// The service id, the VIP and `found`'s backend ids stay: conntrack pins flows to
    /// them, and they drain with the rest of the set (see `adopt.rs`). `found`'s `LIMITS`
    /// entry keeps what the write put there until then.
    pub fn undo_resume(&mut self, mut slot: ServiceSlot, found: &AdoptedService, name: &str) {
        if let Err(e) = self.maps.restore_service(slot.id, found.entry) {
            error!("service {name}: cannot restore its adopted XDP service entry: {e}");
        }
        let adopted: std::collections::HashSet<u32> = found.backends.values().copied().collect();
        let ids: Vec<u32> = (slot.backend_ids_mut().take_all().into_iter())
            .filter(|id| !adopted.contains(id))
            .collect();
        self.release_unpublished_backend_ids(&ids);
    }

    /// Releases backend `ids` that no published table ever named (a service whose first
    /// write failed, so its VIP never went in and no flow was pinned to them): their
    /// `BACKENDS` entries are cleared and they go back to the pool, with no conntrack walk.
    /// `false` (logged) when the entries could not be cleared, and the ids then stay out of
    /// the pool.
    pub fn release_unpublished_backend_ids(&mut self, ids: &[u32]) -> bool {
        match self.maps.clear_backends(ids) {
            Ok(()) => {
                for &id in ids {
                    self.backend_ids.give_back(id);
                }
                true
            }
            Err(e) => {
                error!("cannot release XDP backend ids {ids:?}: {e}; they stay reserved");
                false
            }
        }
    }

    /// What a limits sweep needs of the running services (see [`limits::SweepView`]).
    fn sweep_view(&self) -> limits::SweepView {
        let limited = || (self.running.iter()).filter(|r| self.maps.limits.limited(r.slot.id));
        limits::SweepView {
            services: limited().map(|r| (r.slot.vip_key(), r.slot.id)).collect(),
            idle_s: limited()
                .map(|r| {
                    let idle = r.service.snapshot.load().idle_timeout;
                    (r.slot.id, limits::idle_seconds(idle))
                })
                .collect(),
        }
    }
}

/// The limits a table write carries, for its log line: `""` when there are none, else
/// `"; per client: N connections, R/s burst B"` (what is set).
fn describe_limits(limits: &ClientLimits) -> String {
    let mut parts = Vec::new();
    if let Some(n) = limits.max_connections {
        parts.push(format!("{n} connections"));
    }
    if let Some(rate) = limits.rate {
        parts.push(format!("{rate}/s burst {}", limits.burst));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("; per client: {}", parts.join(", "))
    }
}

/// Ids whose drain ended, between [`State::take_drained`] and [`State::give_back`].
#[derive(Debug, Default)]
pub struct Drained {
    /// (service name, address when the backend left a running service, backend id).
    backends: Vec<(String, Option<SocketAddr>, u32)>,
    /// (name, service id) of removed services whose map entries are cleared.
    services: Vec<(String, u32)>,
    /// Whether the backends' `BACKENDS` entries and then their conntrack entries are
    /// cleared: their ids may be reused.
    backends_cleared: bool,
    /// Whether the services' `CLIENTS` entries are deleted: their ids may be reused.
    clients_cleared: bool,
}

impl Drained {
    /// Whether there is nothing to release.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty() && self.services.is_empty()
    }

    fn backend_ids(&self) -> Vec<u32> {
        self.backends.iter().map(|&(_, _, id)| id).collect()
    }

    /// Forgets, outside the `State` lock, the conntrack entries pinned to the released
    /// backends and the `CLIENTS` entries of the released services: one bounded walk of each
    /// map for all of them. What fails is logged and its ids stay reserved.
    pub fn forget_in_maps(&mut self, walk: &mut MapWalk) {
        let retry = RELEASE_RETRY.as_secs();
        if self.backends_cleared && !self.backends.is_empty() {
            let ids = self.backend_ids();
            let forgot = if crate::watchdog::fault("release-walk-incomplete") {
                Err(super::bpf_map::MapsError::WalkIncomplete {
                    map: lb_common::maps::CONNTRACK,
                })
            } else {
                walk.forget_flows_of(&ids)
            };
            if let Err(e) = forgot {
                error!(
                    "cannot release XDP backend ids {ids:?}: {e}; they stay reserved, tried \
                     again in {retry}s"
                );
                self.backends_cleared = false;
            }
        }
        let ids: Vec<u32> = self.services.iter().map(|&(_, id)| id).collect();
        self.clients_cleared = match walk.forget_clients_of(&ids) {
            Ok(_) => true,
            Err(e) => {
                error!(
                    "cannot forget the clients of XDP service ids {ids:?}: {e}; they stay \
                     reserved, tried again in {retry}s"
                );
                false
            }
        };
    }
}

/// The running republisher; [`SyncThread::stop`] ends it.
pub struct SyncThread {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

/// How often `NAT_REVERSE` is walked at most to count the SNAT ports taken (for `/status`,
/// `/metrics` and the 80% warning), whether or not anyone reads the counters.
pub const SNAT_EVERY: Duration = Duration::from_secs(10);

/// The share of a range in use at which a warning is logged, in percent; it is logged again
/// only after the use fell below [`SNAT_CALM_PERCENT`].
const SNAT_WARN_PERCENT: u64 = 80;
const SNAT_CALM_PERCENT: u64 = 70;

/// The sync thread's count of SNAT ports: when the next walk is due, and which backends are
/// over the warning share (warned once per crossing).
#[derive(Default)]
struct SnatWatch {
    pacing: super::open_flows::WalkPacing,
    warned: std::collections::HashSet<(u32, SocketAddr)>,
}

impl SnatWatch {
    fn due(&self) -> bool {
        self.pacing.due(Some(Instant::now()))
    }

    /// Walks `NAT_REVERSE`, counts the ports taken per backend of the `nat` services in
    /// `services`, and logs a backend's range crossing [`SNAT_WARN_PERCENT`].
    fn walk(
        &mut self,
        walk: &MapWalk,
        services: &std::collections::HashMap<u32, (SnatTimes, u64, String)>,
        now: u32,
    ) -> std::collections::HashMap<(u32, std::net::IpAddr, SocketAddr), u64> {
        let started = Instant::now();
        let times = services.iter().map(|(id, (t, _, _))| (*id, *t)).collect();
        let by_address = super::snat::snat_in_use(walk.nat_entries(), &times, now);
        // The warning is about a backend's whole capacity, every local address together.
        let mut used = std::collections::HashMap::new();
        for (&(id, _, backend), n) in &by_address {
            *used.entry((id, backend)).or_insert(0) += n;
        }
        // The pacing: a long walk makes the next one later.
        self.pacing.walked(started.elapsed().max(SNAT_EVERY / 20));
        for (key @ (id, backend), n) in &used {
            let Some((_, ports, name)) = services.get(id) else {
                continue;
            };
            let percent = n * 100 / (*ports).max(1);
            if percent >= SNAT_WARN_PERCENT && self.warned.insert(*key) {
                warn!(
                    "service {name}: {n} of its {ports} SNAT ports towards {backend} are taken \
                     ({percent}%); new flows are refused with a RST when none is free: widen \
                     snat_ports or shorten snat_port_hold"
                );
            }
        }
        self.warned.retain(|key| {
            let ports = services.get(&key.0).map_or(1, |s| s.1.max(1));
            used.get(key)
                .is_some_and(|n| n * 100 / ports >= SNAT_CALM_PERCENT)
        });
        by_address
    }
}

impl SyncThread {
    /// Starts the thread over `state`, whose slots hold the generation last written.
    pub fn start(state: Arc<Mutex<State>>, mut walk: MapWalk) -> SyncThread {
        let (stop, stopped) = mpsc::channel::<()>();
        let handle = crate::watchdog::spawn("lb-xdp-sync".into(), move || {
            let mut limits = super::limits::Sweeper::new();
            let mut open_flow_walks = super::open_flows::WalkPacing::new();
            let mut snat = SnatWatch::default();
            let mut bridge_watch = super::bridge_ports::BridgeWatch::default();
            let mut bridge_left_out = 0;
            loop {
                match stopped.recv_timeout(POLL) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
                crate::privileges::follow();
                if crate::watchdog::fault("panic-sync-thread") {
                    panic!("injected by LB_FAULT=panic-sync-thread");
                }
                // The walks of CONNTRACK and CLIENTS (releases, the sweep) run between
                // two holds of the lock, so that a reload or a counters read never waits
                // for them.
                let (mut drained, view, idle, nat, bridges) = {
                    let mut st = lock(&state);
                    st.republish_all();
                    limits.report(|| st.maps.stats());
                    let view = limits.due().then(|| st.sweep_view());
                    let idle = (!st.running.is_empty() && open_flow_walks.due(st.counters_read))
                        .then(|| (st.idle_by_backend(), st.stopping));
                    let nat = snat.due().then(|| st.snat_services());
                    let bridges = bridge_watch
                        .due(&st.bridges, Instant::now())
                        .then(|| st.bridges.clone());
                    (st.take_drained(Instant::now()), view, idle, nat, bridges)
                };
                if !drained.is_empty() {
                    drained.forget_in_maps(&mut walk);
                    lock(&state).give_back(drained, Instant::now());
                }
                if let Some(view) = view {
                    limits.sweep(&mut walk, &view);
                }
                if let (Some((idle, stopping)), Some(now)) = (idle, super::open_flows::now_s()) {
                    let started = Instant::now();
                    let open = super::open_flows::count(walk.conntrack_entries(), &idle, now);
                    if stopping {
                        open_flow_walks.walked_within(started.elapsed(), STOPPING_EVERY);
                    } else {
                        open_flow_walks.walked(started.elapsed());
                    }
                    lock(&state).open_flows = Some(open);
                }
                if let (Some(nat), Some(now)) = (nat, super::open_flows::now_s()) {
                    let began = std::time::SystemTime::now();
                    let used = snat.walk(&walk, &nat, now);
                    let mut st = lock(&state);
                    st.snat_in_use = Some(used);
                    st.snat_counted_at = Some(began);
                }
                if let Some(bridges) = bridges {
                    // Read without the lock (netlink dumps), written with it.
                    let wanted = bridge_watch.read(&bridges, Instant::now());
                    match lock(&state).maps.write_bridges(&wanted) {
                        Ok(n) if n != bridge_left_out => {
                            bridge_left_out = n;
                            if n > 0 {
                                warn!(
                                    "eBPF: {n} bridge addresses or ports found no room in the \
                                     maps; their packets go through the bridge"
                                );
                            }
                        }
                        Ok(_) => {}
                        Err(e) => error!("eBPF: bridge forwarding database: {e}"),
                    }
                }
            }
        })
        .unwrap_or_else(|e| panic!("cannot start the XDP map sync thread: {e}"));
        SyncThread { stop, handle }
    }

    /// Stops the thread and waits for it (at most one table write).
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.join();
    }
}

/// Logs that `snap`'s table is live in `slot` (`written` slots, written since `started`): how
/// many backends are eligible, and how many of those it leaves out (their replies would miss
/// the program; a warning said why).
pub(super) fn log_table(
    snap: &crate::snapshot::ServiceSnapshot,
    slot: &ServiceSlot,
    written: usize,
    started: Instant,
) {
    let left_out = (snap.backends.iter())
        .filter(|b| b.eligible() && !slot.replies_reach(&b.address))
        .count();
    let also = match left_out {
        0 => String::new(),
        n => format!(", {n} more left out: their replies would miss the program"),
    };
    info!(
        "service {}: XDP table generation {} live in half {} ({} of {} backends \
         eligible{also}; {written} slots written in {} ms){}",
        snap.name,
        snap.generation,
        slot.active_half(),
        snap.eligible_count() - left_out,
        snap.backends.len(),
        started.elapsed().as_millis(),
        describe_limits(&snap.limits)
    )
}
