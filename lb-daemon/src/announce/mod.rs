//! Announcing VIPs for ECMP (`[announce]`): several balancer nodes announce the same VIP to
//! a router over BGP, the router spreads flows over them, and every node builds the same
//! Maglev table, so a flow the router moves to another node keeps its backend (Maglev,
//! NSDI 2016, §3.1; Katran and Unimog run the same way). lb speaks no BGP itself: it keeps a
//! route per announceable VIP in a kernel routing table ([`routes`]) that BIRD exports
//! (`config/bird.conf`).
//!
//! A VIP is announced while the node can serve it: every service listening on it is placed
//! on a data plane and has at least one eligible backend (up, weight above 0), the node is
//! not draining (`lb-daemon drain-node`), and the daemon is not stopping. The announcer looks
//! every [`INTERVAL`]; a change is logged with its reason. A VIP several services share (TCP
//! and UDP, several ports) is withdrawn when any of them cannot serve: the other nodes get
//! all of its traffic rather than this node failing part of it. Services on a wildcard
//! address (`0.0.0.0`, `::`) are no VIP and are not announced.
//!
//! What becomes of the routes when the daemon ends:
//! - SIGTERM: every route is withdrawn first, then `withdraw_wait` passes with the node still
//!   serving (the router converges away from it), then the drain starts;
//! - SIGQUIT, a dead thread: the VIPs of services on the proxy are withdrawn (the proxy
//!   stops accepting); those on the eBPF plane stay announced, since its flows go on;
//! - an upgrade (hand-over): nothing changes; the new daemon takes the routes as it finds them,
//!   and a node's drain with the sockets (`crate::handover::Offer::node_draining`); one
//!   that announces in another table withdraws the old table's routes
//!   ([`withdraw_left_behind`]);
//! - a crash: the routes stay (the eBPF plane forwards on its last table); the daemon started
//!   next corrects them within one [`INTERVAL`] of its start.

pub mod routes;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use crate::config::Announce;
use crate::control::Control;
pub use routes::{RouteError, RouteTable};

/// How often the announcer compares what should be announced with what is.
pub const INTERVAL: Duration = Duration::from_millis(200);

/// How long after taking over a daemon waits before it withdraws the routes the one it
/// replaced kept in a table this one does not use: that one's last look may still be under
/// way when it is told to stop.
const LEFT_BEHIND_AFTER: Duration = Duration::from_secs(1);

/// After an upgrade whose new config announces in another table or with another protocol
/// number (or not at all): withdraws, [`LEFT_BEHIND_AFTER`] from now, every route of
/// `protocol` in `table`, which the daemon before this one announced and no daemon looks
/// after any more. Failures are logged.
pub async fn withdraw_left_behind(table: u32, protocol: u8) {
    tokio::time::sleep(LEFT_BEHIND_AFTER).await;
    let routes = match RouteTable::open(table, protocol) {
        Ok(r) => r,
        Err(e) => {
            warn!(
                "announce: the routes the daemon before this one left in table {table} stay: {e}"
            );
            return;
        }
    };
    match routes.list().await {
        Ok(vips) => {
            for vip in vips {
                match routes.remove(vip).await {
                    Ok(()) => info!(
                        "announce: {vip} withdrawn from table {table}, where the daemon before \
                         this one announced it"
                    ),
                    Err(e) => warn!("announce: {e}"),
                }
            }
        }
        Err(e) => warn!("announce: the routes the daemon before this one left stay: {e}"),
    }
}

/// One VIP as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VipAnnouncement {
    /// The VIP.
    pub vip: IpAddr,
    /// Whether its route is in the table (announced).
    pub announced: bool,
    /// Why it is not announced; `None` while it is.
    pub reason: Option<String>,
    /// The services listening on it.
    pub services: Vec<String>,
}

/// `/status`'s `announce`: the table, whether the node drains, and every VIP.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AnnounceStatus {
    /// The kernel routing table the routes are in.
    pub table: u32,
    /// Their route protocol number.
    pub protocol: u8,
    /// Whether `drain-node` withdrew every VIP.
    pub node_draining: bool,
    /// The VIPs, in address order.
    pub vips: Vec<VipAnnouncement>,
}

/// Keeps the announced routes in step with what the node can serve.
pub struct Announcer {
    routes: RouteTable,
    protocol: u8,
    /// `drain-node`: nothing is announced until `enable-node`.
    node_draining: AtomicBool,
    /// The daemon stops: nothing is announced again.
    stopped: AtomicBool,
    /// The table is no longer this announcer's to write ([`Announcer::withdraw_added`]): a
    /// look, a `drain-node` or an `enable-node` still on its way changes nothing.
    frozen: AtomicBool,
    state: Mutex<State>,
    /// eBPF services whose table was empty at the last look that could tell (by service
    /// index): a look that finds the plane busy keeps that verdict, so the VIP does not flap.
    empty_tables: Mutex<std::collections::BTreeSet<usize>>,
    /// Held by each look and each withdrawal from start to end, so that one decided before a
    /// withdrawal cannot add its routes after it.
    writing: tokio::sync::Mutex<()>,
    /// The VIPs whose routes this announcer put in the table (and has not removed since), as
    /// opposed to routes it found there, a daemon before it having put them.
    added: Mutex<std::collections::BTreeSet<IpAddr>>,
}

/// What the last look found.
#[derive(Default)]
struct State {
    vips: Vec<VipAnnouncement>,
    /// The last failure to read the table (`None`) or to write a VIP's route, each logged
    /// once.
    failed: BTreeMap<Option<IpAddr>, String>,
}

impl Announcer {
    /// An announcer for `settings`'s table. Must be called inside the tokio runtime it will
    /// run on.
    ///
    /// Returns `Err(RouteError::Socket)` when no netlink socket can be opened.
    pub fn new(settings: &Announce) -> Result<Arc<Announcer>, RouteError> {
        Ok(Arc::new(Announcer {
            routes: RouteTable::open(settings.table, settings.protocol)?,
            protocol: settings.protocol,
            node_draining: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            empty_tables: Mutex::new(std::collections::BTreeSet::new()),
            writing: tokio::sync::Mutex::new(()),
            added: Mutex::new(std::collections::BTreeSet::new()),
        }))
    }

    /// Looks every [`INTERVAL`] until aborted.
    pub async fn run(self: Arc<Self>, control: Arc<Control>) {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sync(&control).await;
        }
    }

    /// Brings the table in step with what `control` can serve now; logs what changed.
    pub async fn sync(&self, control: &Control) {
        let _writing = self.writing.lock().await;
        if self.frozen.load(Ordering::SeqCst) {
            return;
        }
        let wanted = self.wanted(control);
        let installed = match self.routes.list().await {
            Ok(v) => v,
            Err(e) => {
                self.failed_once(None, e.to_string());
                return;
            }
        };
        let mut vips = Vec::with_capacity(wanted.len());
        for (vip, (services, why)) in wanted {
            let announced = match (&why, installed.contains(&vip)) {
                (None, true) => true,
                // Noted before the add: a look cut short (the task aborted) while the kernel
                // adds the route must still leave it to `withdraw_added`.
                (None, false) => {
                    self.added(vip, true);
                    match self.routes.add(vip).await {
                        Ok(()) => true,
                        Err(e) => {
                            self.added(vip, false);
                            self.failed_once(Some(vip), e.to_string());
                            false
                        }
                    }
                }
                (Some(_), false) => false,
                (Some(_), true) => match self.routes.remove(vip).await {
                    Ok(()) => {
                        self.added(vip, false);
                        false
                    }
                    Err(e) => {
                        self.failed_once(Some(vip), e.to_string());
                        true
                    }
                },
            };
            vips.push(VipAnnouncement {
                vip,
                announced,
                reason: why,
                services,
            });
        }
        // Routes of ours for VIPs no service has any more (a reload removed it, or a daemon
        // before this one put it there).
        for vip in &installed {
            if !vips.iter().any(|v| v.vip == *vip) {
                match self.routes.remove(*vip).await {
                    Ok(()) => {
                        self.added(*vip, false);
                        info!("announce: {vip} withdrawn: no service listens on it");
                    }
                    Err(e) => self.failed_once(Some(*vip), e.to_string()),
                }
            }
        }
        self.record(vips);
    }

    /// Every VIP of `control`'s services: the services on it, and why it may not be
    /// announced (`None`: it may).
    fn wanted(&self, control: &Control) -> BTreeMap<IpAddr, (Vec<String>, Option<String>)> {
        let mut wanted: BTreeMap<IpAddr, (Vec<String>, Option<String>)> = BTreeMap::new();
        let stopping = self.stopped.load(Ordering::SeqCst) || control.stopping();
        let draining = self.node_draining.load(Ordering::SeqCst);
        for s in control.services().all().iter() {
            let snapshot = s.snapshot().load_full();
            let vip = snapshot.listen.ip();
            if vip.is_unspecified() {
                continue;
            }
            let why = if stopping {
                Some("the daemon is stopping".to_string())
            } else if draining {
                Some("the node is draining (drain-node)".to_string())
            } else if control.placement(s.index()).is_none() {
                Some(format!("service {} is on no data plane", s.name()))
            } else if snapshot.eligible_count() == 0 {
                Some(format!("service {} has no healthy backend", s.name()))
            } else if self.table_empty(control, s.index()) {
                // Its program drops the VIP's SYNs, trusting the route to be withdrawn.
                Some(format!(
                    "service {} has no backend in its eBPF table (its healthy ones are left \
                     out: of the other address family, without an id, or their replies would \
                     miss the program)",
                    s.name()
                ))
            } else {
                None
            };
            let entry = wanted.entry(vip).or_default();
            entry.0.push(s.name().to_string());
            if entry.1.is_none() {
                entry.1 = why;
            }
        }
        wanted
    }

    /// Whether eBPF service `index`'s table has no backend, as the plane says, or as it said
    /// at the last look when it is busy now.
    fn table_empty(&self, control: &Control, index: usize) -> bool {
        let mut empty = self.empty_tables.lock().unwrap_or_else(|p| p.into_inner());
        match control.ebpf_table_empty(index) {
            Some(now) => {
                if now {
                    empty.insert(index);
                } else {
                    empty.remove(&index);
                }
                now
            }
            None => empty.contains(&index),
        }
    }

    /// Keeps `vips` for `/status` and logs each VIP whose state changed.
    fn record(&self, vips: Vec<VipAnnouncement>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for v in &vips {
            let before = state.vips.iter().find(|b| b.vip == v.vip);
            if before.is_some_and(|b| b.announced == v.announced && b.reason == v.reason) {
                continue;
            }
            match (&v.reason, v.announced) {
                (None, true) => info!("announce: {} announced ({})", v.vip, v.services.join(", ")),
                (Some(why), false) => {
                    if before.is_some_and(|b| b.announced) {
                        warn!("announce: {} withdrawn: {why}", v.vip);
                    } else {
                        info!("announce: {} not announced: {why}", v.vip);
                    }
                }
                // A write that failed is logged by `failed_once`.
                _ => {}
            }
            if v.reason.is_none() == v.announced {
                state.failed.remove(&Some(v.vip));
            }
        }
        state.vips = vips;
    }

    /// Logs a failure to read the table (`vip` `None`) or to write `vip`'s route, once until
    /// it changes.
    fn failed_once(&self, vip: Option<IpAddr>, error: String) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.failed.get(&vip) != Some(&error) {
            warn!("announce: {error}");
            state.failed.insert(vip, error);
        }
    }

    /// `drain-node`: withdraws every VIP now, and announces none until [`enable_node`].
    ///
    /// [`enable_node`]: Self::enable_node
    pub async fn drain_node(&self, control: &Control) {
        if !self.node_draining.swap(true, Ordering::SeqCst) {
            info!("announce: the node drains: withdrawing every VIP");
        }
        self.sync(control).await;
    }

    /// Ends a `drain-node`: VIPs are announced again as they can be served.
    pub async fn enable_node(&self, control: &Control) {
        if self.node_draining.swap(false, Ordering::SeqCst) {
            info!("announce: the node takes traffic again");
        }
        self.sync(control).await;
    }

    /// Whether `drain-node` holds every VIP back.
    pub fn node_draining(&self) -> bool {
        self.node_draining.load(Ordering::SeqCst)
    }

    /// Starts drained: the daemon this one replaced had its node drained (an upgrade
    /// carries it over), so nothing is announced until `enable-node`.
    pub fn keep_node_drained(&self) {
        self.node_draining.store(true, Ordering::SeqCst);
        info!("announce: the node stays drained, as the daemon before this one left it");
    }

    /// SIGTERM: withdraws every VIP for good; returns how many were announced.
    pub async fn withdraw_all(&self) -> usize {
        self.stopped.store(true, Ordering::SeqCst);
        let _writing = self.writing.lock().await;
        let installed = self.installed().await;
        for vip in &installed {
            match self.routes.remove(*vip).await {
                Ok(()) => info!("announce: {vip} withdrawn: the daemon is stopping"),
                Err(e) => warn!("announce: {e}"),
            }
        }
        installed.len()
    }

    /// A new daemon of an upgrade that does not take the old one's place because the old one
    /// stops (or handed over to another new daemon): withdraws, for good, the routes this
    /// announcer put in the table, that is those the old daemon had withdrawn (SIGTERM; the
    /// proxy's VIPs on SIGQUIT) and this one announced again. The routes it found there stay
    /// as the old daemon left them: an eBPF plane kept pinned serves them, or another new
    /// daemon does. Returns how many it withdrew.
    pub async fn withdraw_added(&self) -> usize {
        // Frozen, not stopped: a `drain-node` call still waiting would otherwise run a look
        // that withdraws every route, those the old daemon keeps too.
        self.frozen.store(true, Ordering::SeqCst);
        let _writing = self.writing.lock().await;
        let added: Vec<IpAddr> = std::mem::take(&mut *self.added_vips())
            .into_iter()
            .collect();
        for vip in &added {
            match self.routes.remove(*vip).await {
                Ok(()) => info!("announce: {vip} withdrawn: this daemon did not take over"),
                Err(e) => warn!("announce: {e}"),
            }
        }
        added.len()
    }

    /// Notes that this announcer put `vip`'s route in the table (`true`) or removed it.
    fn added(&self, vip: IpAddr, added: bool) {
        let mut vips = self.added_vips();
        if added {
            vips.insert(vip);
        } else {
            vips.remove(&vip);
        }
    }

    fn added_vips(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<IpAddr>> {
        self.added.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// SIGQUIT or a dead thread: withdraws the VIPs `keep` says no (those whose services
    /// the proxy carries, which stops accepting); the others stay announced.
    pub async fn withdraw_unless(&self, keep: impl Fn(IpAddr) -> bool) {
        self.stopped.store(true, Ordering::SeqCst);
        let _writing = self.writing.lock().await;
        let installed = self.installed().await;
        for vip in installed.into_iter().filter(|v| !keep(*v)) {
            match self.routes.remove(vip).await {
                Ok(()) => info!("announce: {vip} withdrawn: its proxy stops accepting"),
                Err(e) => warn!("announce: {e}"),
            }
        }
    }

    /// The VIPs whose routes are in the table; when it cannot be read (logged), those the
    /// last look announced.
    async fn installed(&self) -> Vec<IpAddr> {
        match self.routes.list().await {
            Ok(vips) => vips.into_iter().collect(),
            Err(e) => {
                warn!("announce: {e}; withdrawing what the last look announced");
                let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                state
                    .vips
                    .iter()
                    .filter(|v| v.announced)
                    .map(|v| v.vip)
                    .collect()
            }
        }
    }

    /// What the last look found, for `/status`.
    pub fn status(&self) -> AnnounceStatus {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        AnnounceStatus {
            table: self.routes.table(),
            protocol: self.protocol,
            node_draining: self.node_draining(),
            vips: state.vips.clone(),
        }
    }
}
