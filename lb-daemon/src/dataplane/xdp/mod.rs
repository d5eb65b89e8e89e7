//! The XDP fast path, daemon side: choosing which services run on it, loading and attaching
//! `lb-ebpf`, keeping its maps in step with the services' snapshots, and detaching on exit.
//!
//! One BPF object serves every XDP service: the balancer program `lb_xdp` is attached once to
//! each interface any XDP service names (`interface` and `backend_interfaces`), and stays
//! attached until the daemon exits, across reloads; the maps are shared, one service id per
//! service and one backend id per backend address of a service (see [`ids`] for their
//! lifecycle). Reloads add services ([`XdpPlane::add`]) and remove them
//! ([`XdpPlane::remove`]); backend changes arrive as new snapshots. See `lb_common::maps` for
//! the map contract and `docs/ARCHITECTURE.md` for the behaviour.

pub mod census;
pub mod counters;
pub mod decap;
pub mod ids;
pub mod limits;
pub mod loader;
pub mod maps;
pub mod scan;
pub mod snat;
mod sync;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::Ebpf;
use lb_common::maps::{MAX_BACKENDS, MAX_SERVICES, MAX_TABLE_SIZE, PROG_BALANCER};
use tracing::{error, info, warn};

use crate::config::{
    DataplaneKind, Forwarding, Global, Protocol, ProxyProtocol, SchedulerKind, Service,
};
use crate::service::ServiceRuntime;

pub use counters::{BackendCounters, ServiceCounters, XdpCounters};
pub use loader::{AttachMode, LoadError};
pub use maps::{Maps, MapsError, ServiceSlot};

/// Reads the XDP counters; see [`XdpPlane::counters_reader`]. It shares the plane's maps:
/// after the plane is shut down it reads maps no program writes any more.
#[derive(Clone)]
pub struct CountersReader {
    state: Arc<Mutex<sync::State>>,
}

impl CountersReader {
    /// The counters now, as [`XdpPlane::counters`]. Holds the plane's `State` lock for the
    /// reads (one per counter), and waits for it when the sync thread or a reload writes a
    /// table.
    ///
    /// Returns `Err(MapsError::Io)` when a map cannot be read.
    pub fn read(&self) -> Result<XdpCounters, MapsError> {
        let mut st = lock(&self.state);
        // Someone looks: the sync thread keeps the open-flow counts up (census.rs).
        st.counters_read = Some(Instant::now());
        counters::read(&st)
    }
}

/// Where a service's flows are carried, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// On XDP, attached to these interfaces in these modes (the service's `interface` first).
    Xdp {
        /// NAT or DSR.
        forwarding: Forwarding,
        /// Each interface and how the program is attached to it.
        interfaces: Vec<(String, AttachMode)>,
    },
    /// On the userspace proxy.
    Proxy {
        /// Why not XDP, in words for the log and status ("configured", "no `interface` ...").
        reason: String,
    },
}

/// A service with `dataplane = "xdp"` that cannot run on XDP: the daemon refuses to start.
#[derive(Debug, thiserror::Error)]
#[error("service {service}: dataplane = \"xdp\" but XDP is not possible: {reason}")]
pub struct XdpError {
    /// The service's name.
    pub service: String,
    /// Why not.
    pub reason: String,
}

/// The running XDP data plane: the loaded object (its programs hold the attachments), the
/// maps with the services on them, and the thread that republishes snapshots into them.
pub struct XdpPlane {
    // Dropping the object closes the links: the kernel detaches the programs.
    ebpf: Option<Ebpf>,
    state: Arc<Mutex<sync::State>>,
    /// Every interface the program is attached to, and how.
    attached: BTreeMap<String, AttachMode>,
    sync: Option<sync::SyncThread>,
}

/// Why `service` cannot run on XDP whatever the kernel offers, or `None` if it may try.
pub fn obstacle(service: &Service) -> Option<String> {
    if service.dataplane == DataplaneKind::Proxy {
        return Some("configured (dataplane = \"proxy\")".into());
    }
    let Some(interface) = &service.xdp.interface else {
        return Some(
            "no `interface` is configured, so XDP has nowhere to attach (set `interface` and \
             `local_address` to use XDP)"
                .into(),
        );
    };
    if service.scheduler != SchedulerKind::Maglev {
        return Some(format!(
            "the XDP data plane runs only the `maglev` scheduler, and this service uses {:?}",
            service.scheduler
        ));
    }
    if service.listen.ip().is_loopback() {
        return Some(format!(
            "the VIP {} is a loopback address: its packets never cross an interface's XDP hook",
            service.listen.ip()
        ));
    }
    if loader::is_loopback(interface) {
        return Some(format!(
            "interface {interface} is the loopback device: local traffic never crosses an XDP hook \
             the way a client's packets do"
        ));
    }
    if service.listen.ip().is_unspecified() {
        return Some(format!(
            "the VIP {} is a wildcard: XDP balances packets for one address",
            service.listen.ip()
        ));
    }
    if service.table_size > MAX_TABLE_SIZE {
        return Some(format!(
            "table_size {} is larger than the {MAX_TABLE_SIZE} slots the XDP maps hold",
            service.table_size
        ));
    }
    // On XDP these would silently vanish (a backend expecting a PROXY header would reject
    // every connection): they make the service a proxy one.
    if service.proxy_protocol != ProxyProtocol::Off || service.access_log {
        return Some("proxy_protocol and access_log run only in the proxy data plane".into());
    }
    if service.protocol == Protocol::Udp && service.limits.max_connections.is_some() {
        return Some(
            "max_connections_per_client of a UDP service runs only in the proxy data plane: on              XDP a UDP flow shows no end, so a client's sessions would never be given back              (new_connections_per_second alone works on XDP)"
                .into(),
        );
    }
    None
}

impl XdpPlane {
    /// Decides each service's data plane and starts the XDP one for those that get it.
    ///
    /// For each service, in order: [`obstacle`]s send it to the proxy; then the BPF object is
    /// found (`[global] bpf_object` or the default search, see [`loader::candidates`]) and
    /// loaded once, and `lb_xdp` attached to the service's interfaces, native mode first,
    /// then generic mode with a warning. A service with `dataplane = "auto"` that fails any
    /// step runs on the proxy, and the log says why; one with `"xdp"` fails the start.
    /// Services on XDP get their maps written from their current snapshot, VIP last.
    ///
    /// Returns the plane (`None` when no service runs on XDP) and one [`Placement`] per
    /// service, in order; `Err(XdpError)` for an `xdp` service that cannot run on XDP.
    pub fn start(
        global: &Global,
        services: &[Arc<ServiceRuntime>],
    ) -> Result<(Option<XdpPlane>, Vec<Placement>), XdpError> {
        let mut placements: Vec<Option<Placement>> = vec![None; services.len()];
        let mut wanted = Vec::new();
        for (i, s) in services.iter().enumerate() {
            match obstacle(&s.config()) {
                Some(reason) => placements[i] = Some(refuse(&s.config(), reason)?),
                None => wanted.push(i),
            }
        }
        if wanted.is_empty() {
            return Ok((None, finish(placements)));
        }
        let mut plane = match XdpPlane::load(global) {
            Ok(p) => p,
            Err(reason) => {
                for &i in &wanted {
                    placements[i] = Some(refuse(&services[i].config(), reason.clone())?);
                    warn!(
                        "service {}: XDP is not possible, falling back to the proxy: {reason}",
                        services[i].config().name
                    );
                }
                return Ok((None, finish(placements)));
            }
        };
        let mut placed = 0;
        for &i in &wanted {
            let s = services[i].config();
            match plane.add(&services[i]) {
                Ok(p) => {
                    placements[i] = Some(p);
                    placed += 1;
                }
                Err(reason) => {
                    placements[i] = Some(refuse(&s, reason.clone())?);
                    warn!(
                        "service {}: XDP is not possible, falling back to the proxy: {reason}",
                        s.name
                    );
                }
            }
        }
        if placed == 0 {
            // Dropping the plane detaches whatever was attached on the way.
            return Ok((None, finish(placements)));
        }
        Ok((Some(plane), finish(placements)))
    }

    /// Finds and loads the BPF object (`[global] bpf_object` or the default search), takes
    /// its maps and starts the sync thread, with no service and no interface yet.
    ///
    /// `Err` is the reason, in words, for the log.
    pub fn load(global: &Global) -> Result<XdpPlane, String> {
        let (ebpf, maps, walker, path) = load_balancer(global.bpf_object.as_deref())?;
        info!("XDP: loaded {}", path.display());
        let state = Arc::new(Mutex::new(sync::State {
            maps,
            backend_ids: ids::IdPool::new(MAX_BACKENDS),
            service_ids: ids::IdPool::new(MAX_SERVICES),
            drain_timeout: global.drain_timeout,
            running: Vec::new(),
            leaving: Vec::new(),
            open_flows: None,
            snat_in_use: None,
            counters_read: None,
        }));
        let sync = sync::SyncThread::start(Arc::clone(&state), walker);
        Ok(XdpPlane {
            ebpf: Some(ebpf),
            state,
            attached: BTreeMap::new(),
            sync: Some(sync),
        })
    }

    /// Places `rt`'s service on XDP: a service id, the program attached to any of its
    /// interfaces it is not attached to yet, and its current snapshot written, VIP last.
    ///
    /// Returns its [`Placement::Xdp`]; `Err` is the reason, in words, and leaves nothing of
    /// the service in the maps (an interface attached on the way stays attached, passing
    /// what is not a VIP's).
    pub fn add(&mut self, rt: &Arc<ServiceRuntime>) -> Result<Placement, String> {
        let s = rt.config();
        if let Some(reason) = obstacle(&s) {
            return Err(reason);
        }
        let (Some(interface), Some(local_address)) = (&s.xdp.interface, s.xdp.local_address) else {
            return Err("no `interface` or `local_address`".into());
        };
        let snat_ports = match s.xdp.forwarding {
            Forwarding::Nat => snat::range(s.xdp.snat_ports).map_err(|e| e.to_string())?,
            Forwarding::Dsr => (0, 0),
        };
        let mut wanted = vec![interface.clone()];
        for b in &s.xdp.backend_interfaces {
            if !wanted.contains(b) {
                wanted.push(b.clone());
            }
        }
        // Every interface must exist before anything is attached, so a typo in the last one
        // leaves no program behind on the first.
        let mut ifindexes = Vec::with_capacity(wanted.len());
        for name in &wanted {
            match loader::if_index(name) {
                Some(i) => ifindexes.push(i),
                None => return Err(format!("there is no interface {name}")),
            }
        }
        if lock(&self.state).service_ids.available() == 0 {
            return Err(format!(
                "the XDP maps hold {MAX_SERVICES} services and as many are in use (running or \
                 draining)"
            ));
        }
        let ebpf = self.ebpf.as_mut().ok_or("the XDP plane is stopped")?;
        let mut interfaces = Vec::new();
        for (name, ifindex) in wanted.iter().zip(ifindexes) {
            let mode = match self.attached.get(name) {
                Some(&mode) => mode,
                None => {
                    // Redirects into the interface are allowed first: an interface in
                    // `attached` is one other services can redirect to as well.
                    lock(&self.state)
                        .maps
                        .allow_redirect(ifindex)
                        .map_err(|e| e.to_string())?;
                    // Without the State lock: attaching waits for the kernel (a driver may
                    // reset its rings), and the sync thread and counter reads go on meanwhile.
                    let prog = program(ebpf)?;
                    let mode = loader::attach(prog, name).map_err(|e| e.to_string())?;
                    self.attached.insert(name.clone(), mode);
                    info!("XDP: {PROG_BALANCER} attached to {name} ({mode} mode)");
                    mode
                }
            };
            interfaces.push((name.clone(), mode));
        }
        // The first write of the table (all M slots) holds the lock: it shares the id pools
        // and the maps with the sync thread.
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let snap = rt.snapshot().load_full();
        // A new service would start with backends left out of its table: the proxy (for
        // `auto`) serves it whole. Checked before anything is written, under the lock that
        // keeps the pool as it is until the write.
        let mut addresses: Vec<_> = snap.backends.iter().map(|b| b.address).collect();
        addresses.sort();
        addresses.dedup();
        if addresses.len() > st.backend_ids.available() {
            return Err(format!(
                "its {} backends need XDP backend ids and {} of the {MAX_BACKENDS} are free \
                 (the others are in use, live or draining)",
                addresses.len(),
                st.backend_ids.available()
            ));
        }
        let id = st.service_ids.take().ok_or("no free service id")?;
        let mut slot = ServiceSlot::new(id, &s, local_address, snat_ports);
        let deadline = Instant::now() + st.drain_timeout;
        let written = st
            .maps
            .reset_service_counters(id)
            .and_then(|()| {
                st.maps
                    .publish(&mut slot, &snap, &mut st.backend_ids, deadline)
            })
            .map(|_| ())
            .map_err(|e| e.to_string());
        if let Err(e) = written {
            // The VIP goes in last, so no packet reached the service: undo at once.
            if let Err(e) = st.maps.remove_service(&slot) {
                error!(
                    "service {}: cannot clear its XDP service entry: {e}",
                    s.name
                );
            }
            st.service_ids.give_back(id);
            if let Err(e) = st.maps.limits.clear(id) {
                error!("service {}: cannot clear its XDP limits entry: {e}", s.name);
            }
            // The VIP never went in: no flow was pinned to these ids, no walk is needed.
            let ids = slot.backend_ids_mut().take_all();
            st.release_unpublished_backend_ids(&ids);
            return Err(e);
        }
        st.running.push(sync::Running {
            rt: Arc::clone(rt),
            slot,
        });
        Ok(Placement::Xdp {
            forwarding: s.xdp.forwarding,
            interfaces,
        })
    }

    /// Starts draining the service with index `index` out of XDP: its table is emptied now
    /// (new flows find no backend), flows conntrack pinned to its backends go on, and after
    /// `drain_timeout` its VIP (if still its own), service id and backend ids are released.
    /// `false` when no such service runs on XDP.
    ///
    /// The VIP is handed on at once when someone else takes it: to a service still running
    /// on XDP at the same VIP (a refused reload undoing the service that replaced it), or,
    /// with `release_vip`, to the kernel (a service started on the proxy at the same address
    /// replaces it). In that last case the flows pinned to this service are cut: their
    /// packets reach the kernel stack, which does not know them. Keeping them would need the
    /// program to pass new flows of a VIP to the stack while it carries the pinned ones,
    /// which it does not do.
    pub fn remove(&mut self, index: usize, drain_timeout: Duration, release_vip: bool) -> bool {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let Some(pos) = st.running.iter().position(|r| r.rt.index() == index) else {
            return false;
        };
        let mut r = st.running.remove(pos);
        let name = r.rt.name().to_string();
        // Its clients' counts are no longer swept; its LIMITS and CLIENTS entries go when its
        // id is released.
        st.maps.limits.forget(r.slot.id);
        if let Err(e) = st.maps.empty_table(&mut r.slot) {
            error!(
                "service {name}: cannot empty its XDP table: {e}; it takes new flows until its \
                 drain ends"
            );
        }
        let key = r.slot.vip_key();
        let heir = st.running.iter().rev().find(|o| o.slot.vip_key() == key);
        let to = heir.map(|o| o.slot.id);
        if to.is_some() || release_vip {
            match st.maps.hand_over_vip(&r.slot, to) {
                Ok(true) if to.is_none() => warn!(
                    "service {name}: its VIP {} left the XDP maps now, for the service that \
                     replaces it on the proxy; the flows XDP carried for it are cut",
                    r.slot.vip
                ),
                Ok(_) => {}
                Err(e) => error!("service {name}: cannot hand its VIP on: {e}"),
            }
        }
        let deadline = Instant::now() + drain_timeout;
        r.slot.backend_ids_mut().leave_all(deadline);
        if let Err(e) = st.maps.mark_draining(r.slot.backend_ids()) {
            error!("service {name}: cannot flag its XDP backends draining: {e}");
        }
        st.leaving.push(sync::Leaving {
            name,
            slot: r.slot,
            deadline,
        });
        true
    }

    /// Sets how long backends and services removed from now on keep their ids.
    pub fn set_drain_timeout(&self, drain_timeout: Duration) {
        lock(&self.state).drain_timeout = drain_timeout;
    }

    /// The program's counters now: global, per service and per backend (summed over CPUs).
    ///
    /// Returns `Err(MapsError::Io)` when a map cannot be read.
    pub fn counters(&self) -> Result<XdpCounters, MapsError> {
        self.counters_reader().read()
    }

    /// A handle that reads the counters without borrowing the plane, so a reader need not
    /// wait for whoever holds the plane (a reload attaching to an interface).
    pub fn counters_reader(&self) -> CountersReader {
        CountersReader {
            state: Arc::clone(&self.state),
        }
    }

    /// Stops republishing, logs the final counters and detaches the programs from every
    /// interface. Flows still open on XDP are cut: their packets now reach the kernel stack,
    /// which does not know them.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(s) = self.sync.take() {
            s.stop();
        }
        match self.counters() {
            Ok(c) => c.log(),
            Err(e) => warn!("XDP counters could not be read at exit: {e}"),
        }
        if self.ebpf.take().is_some() {
            for (interface, mode) in &self.attached {
                info!("XDP detached from {interface} ({mode} mode)");
            }
        }
    }
}

impl Drop for XdpPlane {
    fn drop(&mut self) {
        if self.ebpf.is_some() {
            self.stop();
        }
    }
}

/// The placement of a service that cannot run on XDP for `reason`: the proxy for `auto`,
/// `Err` for `xdp`.
fn refuse(s: &Service, reason: String) -> Result<Placement, XdpError> {
    if s.dataplane == DataplaneKind::Xdp {
        Err(XdpError {
            service: s.name.clone(),
            reason,
        })
    } else {
        Ok(Placement::Proxy { reason })
    }
}

fn finish(placements: Vec<Option<Placement>>) -> Vec<Placement> {
    placements
        .into_iter()
        .map(|p| {
            p.unwrap_or_else(|| Placement::Proxy {
                reason: "not considered for XDP".into(),
            })
        })
        .collect()
}

/// Finds and loads the object, loads `lb_xdp` and takes the maps. `Err` is the reason, in
/// words, for the log.
fn load_balancer(
    configured: Option<&std::path::Path>,
) -> Result<(Ebpf, Maps, scan::Walker, PathBuf), String> {
    let path = loader::find_object(configured).map_err(|e| e.to_string())?;
    let mut ebpf = loader::load_object(&path, &[]).map_err(|e| loader::error_chain(&e))?;
    loader::load_program(&mut ebpf, &path, PROG_BALANCER).map_err(|e| loader::error_chain(&e))?;
    let maps = Maps::take(&mut ebpf).map_err(|e| e.to_string())?;
    let walker = scan::Walker::take(&mut ebpf).map_err(|e| e.to_string())?;
    Ok((ebpf, maps, walker, path))
}

fn program(ebpf: &mut Ebpf) -> Result<&mut aya::programs::Xdp, String> {
    ebpf.program_mut(PROG_BALANCER)
        .ok_or_else(|| format!("no program {PROG_BALANCER}"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The words a log line uses for a placement.
pub fn describe(p: &Placement) -> String {
    match p {
        Placement::Xdp {
            forwarding,
            interfaces,
        } => {
            let on: Vec<String> = interfaces
                .iter()
                .map(|(i, m)| format!("{i} ({m})"))
                .collect();
            let fwd = match forwarding {
                Forwarding::Nat => "nat",
                Forwarding::Dsr => "dsr",
            };
            format!("XDP data plane ({fwd}) on {}", on.join(", "))
        }
        Placement::Proxy { reason } => format!("proxy data plane ({reason})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn service(listen: &str, keys: &str) -> Service {
        let text = format!(
            "[[service]]\nname = \"web\"\nlisten = \"{listen}\"\nprotocol = \"tcp\"\n{keys}\n\
             [[service.backend]]\naddress = \"10.200.1.2:80\"\n"
        );
        crate::config::parse(&text, Path::new("t.toml"))
            .expect("valid")
            .services
            .remove(0)
    }

    const XDP_KEYS: &str = "interface = \"eth0\"\nlocal_address = \"10.200.0.1\"";

    #[test]
    fn a_service_with_interface_and_maglev_may_try_xdp() {
        assert_eq!(obstacle(&service("10.200.100.1:80", XDP_KEYS)), None);
    }

    #[test]
    fn limits_run_on_xdp_except_a_udp_session_limit() {
        let limits = "[service.limits]\nmax_connections_per_client = 2\n\
                      new_connections_per_second = 5.0\nburst = 10\n";
        let tcp = service("10.200.100.1:80", &format!("{XDP_KEYS}\n{limits}"));
        assert_eq!(obstacle(&tcp), None, "TCP limits run on XDP");
        let mut udp = tcp.clone();
        udp.protocol = Protocol::Udp;
        let why = obstacle(&udp).unwrap_or_default();
        assert!(
            why.contains("max_connections_per_client of a UDP service"),
            "a UDP session limit on XDP: {why}"
        );
        udp.limits.max_connections = None;
        assert_eq!(obstacle(&udp), None, "a UDP rate limit runs on XDP");
    }

    #[test]
    fn obstacles_name_their_reason() {
        let cases = [
            (
                service("10.200.100.1:80", "dataplane = \"proxy\""),
                "configured",
            ),
            (service("10.200.100.1:80", ""), "no `interface`"),
            (
                service(
                    "10.200.100.1:80",
                    &format!("scheduler = \"least_conn\"\n{XDP_KEYS}"),
                ),
                "only the `maglev` scheduler",
            ),
            (
                service(
                    "127.0.0.1:80",
                    "interface = \"eth0\"\nlocal_address = \"127.0.0.1\"",
                ),
                "loopback address",
            ),
            (
                service(
                    "10.200.100.1:80",
                    "interface = \"lo\"\nlocal_address = \"10.200.0.1\"",
                ),
                "loopback device",
            ),
            (
                service(
                    "0.0.0.0:80",
                    "interface = \"eth0\"\nlocal_address = \"10.200.0.1\"",
                ),
                "wildcard",
            ),
            (
                service(
                    "10.200.100.1:80",
                    &format!("table_size = 65539\n{XDP_KEYS}"),
                ),
                "larger than",
            ),
        ];
        for (svc, want) in cases {
            let got = obstacle(&svc).unwrap_or_default();
            assert!(
                got.contains(want),
                "expected a reason with `{want}` for {:?}/{:?}, got `{got}`",
                svc.listen,
                svc.xdp
            );
        }
    }
}
