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

pub mod bpf_map;
pub mod counters;
pub mod decap;
pub mod ids;
pub mod limits;
pub mod loader;
pub mod map_walk;
pub mod maps;
pub mod open_flows;
pub mod snat;
mod sync;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::Ebpf;
use lb_common::maps::{MAX_BACKENDS, MAX_SERVICES, PROG_BALANCER};
use tracing::{error, info, warn};

use super::{Dataplane, ServiceHandle};
use crate::config::{Forwarding, XdpSettings};

pub use bpf_map::MapsError;
pub use counters::{BackendCounters, ServiceCounters, XdpCounters};
pub use loader::{AttachMode, LoadError};
pub use maps::{Maps, ServiceSlot};

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
        // Someone looks: the sync thread keeps the open-flow counts up (open_flows.rs).
        st.counters_read = Some(Instant::now());
        counters::read(&st)
    }
}

/// What the XDP plane needs of a service beyond its snapshot, given once at
/// [`XdpPlane::add`] and fixed while the service runs on XDP (a reload that changes it is
/// refused).
#[derive(Debug, Clone, PartialEq)]
pub struct XdpService {
    /// The Maglev table size M: a prime, at most `lb_common::maps::MAX_TABLE_SIZE`.
    pub table_size: u32,
    /// The service's `interface`, `backend_interfaces`, forwarding, `local_address` and SNAT
    /// settings.
    pub xdp: XdpSettings,
    /// Whether generic (SKB) XDP may carry the service where native XDP cannot attach: only
    /// for `dataplane = "xdp"`, the user's explicit choice; `auto` then goes to the proxy.
    pub allow_generic: bool,
}

/// Where the XDP plane carries a service: each interface it is attached to and how (the
/// service's `interface` first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpAttachment {
    /// NAT or DSR.
    pub forwarding: Forwarding,
    /// Each interface and how the program is attached to it.
    pub interfaces: Vec<(String, AttachMode)>,
}

/// Why the XDP plane could not start or take a service. Each leaves nothing of the service
/// in the maps.
#[derive(Debug, thiserror::Error)]
pub enum XdpPlaneError {
    /// The BPF object could not be found, loaded or verified, or lacks a map; the words are
    /// the loader's, with their causes.
    #[error("{0}")]
    Load(String),
    /// The service has no `interface` or no `local_address`.
    #[error("no `interface` or `local_address`")]
    NotConfigured,
    /// An interface the service names does not exist.
    #[error("there is no interface {0}")]
    NoInterface(String),
    /// No BPF object was found, or the program could not be attached to an interface,
    /// natively or generically.
    #[error(transparent)]
    Loader(#[from] LoadError),
    /// The SNAT range cannot be chosen or clashes with the host's ephemeral ports.
    #[error(transparent)]
    SnatRange(#[from] snat::SnatRangeError),
    /// Every service id is in use, by running or draining services.
    #[error(
        "the XDP maps hold {MAX_SERVICES} services and as many are in use (running or draining)"
    )]
    ServiceIdsFull,
    /// The service's backends need more backend ids than are free.
    #[error(
        "its {needed} backends need XDP backend ids and {free} of the {MAX_BACKENDS} are free \
         (the others are in use, live or draining)"
    )]
    BackendIdsFull {
        /// Distinct backend addresses of the service.
        needed: usize,
        /// Backend ids free now.
        free: usize,
    },
    /// A map could not be written.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The plane was shut down.
    #[error("the XDP plane is stopped")]
    Stopped,
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

/// How the XDP plane starts: which object, and how long removed services drain.
#[derive(Debug, Clone)]
pub struct XdpStart {
    /// `[global] bpf_object`: the object to load; `None` searches the default places (see
    /// [`loader::candidates`]).
    pub bpf_object: Option<PathBuf>,
    /// How long a removed backend or service keeps its ids for the flows pinned to it, until
    /// [`XdpPlane::set_drain_timeout`] changes it.
    pub drain_timeout: Duration,
}

impl XdpPlane {
    /// Finds and loads the BPF object, takes its maps and starts the sync thread, with no
    /// service and no interface yet.
    ///
    /// Returns `Err(XdpPlaneError::Load)` with the loader's reason (no object found, the
    /// kernel refused the program, a map is missing).
    pub fn load(start: &XdpStart) -> Result<XdpPlane, XdpPlaneError> {
        let (ebpf, maps, walk, path) = load_balancer(start.bpf_object.as_deref())?;
        info!("XDP: loaded {}", path.display());
        let state = Arc::new(Mutex::new(sync::State {
            maps,
            backend_ids: ids::IdPool::new(MAX_BACKENDS),
            service_ids: ids::IdPool::new(MAX_SERVICES),
            drain_timeout: start.drain_timeout,
            running: Vec::new(),
            leaving: Vec::new(),
            open_flows: None,
            snat_in_use: None,
            counters_read: None,
        }));
        let sync = sync::SyncThread::start(Arc::clone(&state), walk);
        Ok(XdpPlane {
            ebpf: Some(ebpf),
            state,
            attached: BTreeMap::new(),
            sync: Some(sync),
        })
    }

    /// Places `service` on XDP: a service id, the program attached to any of its interfaces
    /// it is not attached to yet, and its current snapshot written, VIP last. The sync thread
    /// writes its later snapshots.
    ///
    /// Returns where it runs; `Err` leaves nothing of the service in the maps (an interface
    /// attached on the way stays attached, passing what is not a VIP's).
    pub fn add(
        &mut self,
        service: &ServiceHandle,
        settings: &XdpService,
    ) -> Result<XdpAttachment, XdpPlaneError> {
        let xdp = &settings.xdp;
        let Some(interface) = xdp
            .interface
            .as_ref()
            .filter(|_| !xdp.local_addresses.is_empty())
        else {
            return Err(XdpPlaneError::NotConfigured);
        };
        let snat_ports = match xdp.forwarding {
            Forwarding::Nat => snat::range(xdp.snat_ports)?,
            Forwarding::Dsr => (0, 0),
        };
        let mut wanted = vec![interface.clone()];
        for b in &xdp.backend_interfaces {
            if !wanted.contains(b) {
                wanted.push(b.clone());
            }
        }
        if lock(&self.state).service_ids.available() == 0 {
            return Err(XdpPlaneError::ServiceIdsFull);
        }
        let interfaces = self.attach_all(&wanted, settings.allow_generic)?;
        // The first write of the table (all M slots) holds the lock: it shares the id pools
        // and the maps with the sync thread.
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let snap = service.snapshot.load_full();
        // A new service would start with backends left out of its table: the proxy (for
        // `auto`) serves it whole. Checked before anything is written, under the lock that
        // keeps the pool as it is until the write.
        let mut addresses: Vec<_> = snap.backends.iter().map(|b| b.address).collect();
        addresses.sort();
        addresses.dedup();
        let free = st.backend_ids.available();
        if addresses.len() > free {
            return Err(XdpPlaneError::BackendIdsFull {
                needed: addresses.len(),
                free,
            });
        }
        let id = st.service_ids.take().ok_or(XdpPlaneError::ServiceIdsFull)?;
        let mut slot = ServiceSlot::new(
            id,
            snap.listen,
            snap.protocol,
            settings,
            xdp.local_addresses.clone(),
            snat_ports,
        );
        let deadline = Instant::now() + st.drain_timeout;
        let written = st.maps.reset_service_counters(id).and_then(|()| {
            st.maps
                .publish(&mut slot, &snap, &mut st.backend_ids, deadline)
                .map(|_| ())
        });
        if let Err(e) = written {
            st.undo_add(slot, &snap.name);
            return Err(e.into());
        }
        st.running.push(sync::Running {
            service: service.clone(),
            slot,
        });
        Ok(XdpAttachment {
            forwarding: xdp.forwarding,
            interfaces,
        })
    }

    /// Attaches the program to each of `wanted` that it is not attached to yet; returns
    /// every one with its mode, in order. Every interface must exist before anything is
    /// attached, so a typo in the last one leaves no program behind on the first.
    fn attach_all(
        &mut self,
        wanted: &[String],
        allow_generic: bool,
    ) -> Result<Vec<(String, AttachMode)>, XdpPlaneError> {
        let mut ifindexes = Vec::with_capacity(wanted.len());
        for name in wanted {
            let index =
                loader::if_index(name).ok_or_else(|| XdpPlaneError::NoInterface(name.clone()))?;
            ifindexes.push(index);
        }
        let ebpf = self.ebpf.as_mut().ok_or(XdpPlaneError::Stopped)?;
        let mut interfaces = Vec::new();
        for (name, ifindex) in wanted.iter().zip(ifindexes) {
            let mode = match self.attached.get(name) {
                Some(&AttachMode::Generic) if !allow_generic => {
                    return Err(XdpPlaneError::Loader(LoadError::NativeOnly {
                        interface: name.clone(),
                        native: "another service attached it in generic mode".into(),
                    }))
                }
                Some(&mode) => mode,
                None => {
                    // Redirects into the interface are allowed first: an interface in
                    // `attached` is one other services can redirect to as well.
                    lock(&self.state).maps.allow_redirect(ifindex)?;
                    // Without the State lock: attaching waits for the kernel (a driver may
                    // reset its rings), and the sync thread and counter reads go on meanwhile.
                    let mode = loader::attach(program(ebpf)?, name, allow_generic)?;
                    self.attached.insert(name.clone(), mode);
                    info!("XDP: {PROG_BALANCER} attached to {name} ({mode} mode)");
                    mode
                }
            };
            interfaces.push((name.clone(), mode));
        }
        Ok(interfaces)
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
        let Some(pos) = st.running.iter().position(|r| r.service.index == index) else {
            return false;
        };
        let mut r = st.running.remove(pos);
        let name = r.service.snapshot.load().name.to_string();
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

impl Dataplane for XdpPlane {
    type Options = XdpStart;
    type Settings = XdpService;
    type Added = XdpAttachment;
    type Error = XdpPlaneError;
    /// `Err` when a map cannot be read.
    type Counters = Result<XdpCounters, MapsError>;

    fn start(options: XdpStart) -> Result<XdpPlane, XdpPlaneError> {
        XdpPlane::load(&options)
    }

    fn add(
        &mut self,
        service: &ServiceHandle,
        settings: &XdpService,
    ) -> Result<XdpAttachment, XdpPlaneError> {
        XdpPlane::add(self, service, settings)
    }

    fn remove(&mut self, index: usize, drain_timeout: Duration, address_moves: bool) {
        XdpPlane::remove(self, index, drain_timeout, address_moves);
    }

    fn counters(&self) -> Result<XdpCounters, MapsError> {
        XdpPlane::counters(self)
    }
}

impl Drop for XdpPlane {
    fn drop(&mut self) {
        if self.ebpf.is_some() {
            self.stop();
        }
    }
}

/// Finds and loads the object, loads `lb_xdp` and takes the maps.
fn load_balancer(
    configured: Option<&std::path::Path>,
) -> Result<(Ebpf, Maps, map_walk::MapWalk, PathBuf), XdpPlaneError> {
    // The loader's errors carry their causes (the verifier's log) in the words.
    let chain = |e: LoadError| XdpPlaneError::Load(loader::error_chain(&e));
    let path = loader::find_object(configured)?;
    let mut ebpf = loader::load_object(&path, &[]).map_err(chain)?;
    loader::load_program(&mut ebpf, &path, PROG_BALANCER).map_err(chain)?;
    let maps = Maps::take(&mut ebpf)?;
    let walk = map_walk::MapWalk::take(&mut ebpf)?;
    Ok((ebpf, maps, walk, path))
}

fn program(ebpf: &mut Ebpf) -> Result<&mut aya::programs::Xdp, XdpPlaneError> {
    ebpf.program_mut(PROG_BALANCER)
        .ok_or_else(|| XdpPlaneError::Load(format!("no program {PROG_BALANCER}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| XdpPlaneError::Load(e.to_string()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
