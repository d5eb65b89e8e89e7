//! The eBPF fast path, daemon side: loading `lb-ebpf`, attaching its balancer to the
//! services' interfaces at the XDP hook (`lb_xdp`) or at tc ingress (`lb_tc`), keeping its
//! maps in step with the services' snapshots, and detaching on exit. (The module keeps its
//! first name, `xdp`, from before the tc hook.)
//!
//! One BPF object serves every eBPF service, and both programs share its maps: one of them is
//! attached once to each interface any eBPF service names (`interface` and
//! `backend_interfaces`), and stays attached until the daemon exits, across reloads. An
//! interface carries one hook: a service that needs XDP where tc is attached (or the reverse)
//! is refused ([`XdpPlaneError::HookConflict`]). Each program is loaded (verified) when a
//! service first needs its hook. The maps are shared, with one service id per
//! service and one backend id per backend address of a service (see [`ids`] for their
//! lifecycle). Reloads add services ([`XdpPlane::add`]) and remove them
//! ([`XdpPlane::remove`]); backend changes arrive as new snapshots. See `lb_common::maps` for
//! the map contract and `docs/ARCHITECTURE.md` for the behaviour.

pub mod adopt;
mod bit_map;
pub mod bpf_map;
pub mod bridge_fdb;
mod bridge_ports;
pub mod counters;
pub mod decap;
pub mod ids;
pub mod iface_kind;
pub mod interfaces;
pub mod ip_forwarding;
pub mod limits;
pub mod loader;
pub mod map_walk;
pub mod maps;
pub mod open_flows;
pub mod peer;
pub mod pin_lock;
pub mod pins;
pub mod routes;
mod rtnl;
pub mod snat;
mod sync;
pub mod xdp_features;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::xdp::XdpLink;
use aya::programs::{SchedClassifier, Xdp};
use aya::Ebpf;
use lb_common::maps::{MAX_BACKENDS, MAX_SERVICES, PROG_BALANCER, PROG_TC};
use tracing::{error, info, warn};

use super::{Dataplane, ServiceHandle};
use crate::config::{Forwarding, XdpSettings};

pub use bpf_map::MapsError;
pub use counters::{BackendCounters, ServiceCounters, XdpCounters};
pub use loader::{AttachMode, LoadError};

/// Which hook a service asks the plane for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookRequest {
    /// `lb_xdp` at the XDP hook, native mode; `allow_generic`: generic (SKB) mode where
    /// native mode cannot attach, only for `dataplane = "xdp"`, the user's explicit choice.
    Xdp {
        /// Whether generic mode may carry the service.
        allow_generic: bool,
    },
    /// `lb_tc` at tc ingress (TCX, else a clsact qdisc).
    Tc,
}
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

    /// Whether the table the program places service `index`'s new flows by has no backend
    /// (none is eligible, or every eligible one is left out: of the other address family
    /// than the VIP, without a backend id, or with replies that would miss the program).
    /// `None` when the plane does not carry the service, or when its lock is held (a table
    /// being written): never waits.
    pub fn table_empty(&self, index: usize) -> Option<bool> {
        let st = match self.state.try_lock() {
            Ok(st) => st,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        (st.running.iter())
            .find(|r| r.service.index == index)
            .map(|r| r.slot.table_digest().is_none())
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
    /// The hook to attach at, on every interface of the service.
    pub hook: HookRequest,
    /// The node announces the VIP among others (`[announce]`): a SYN with no backend is
    /// dropped, not refused (`lb_common::maps::SERVICE_F_ANNOUNCED`).
    pub announced: bool,
    /// The service's configured backends (not a DNS name's answers): placing it needs a free
    /// backend id for each (see `adopt::claim_if_placeable`).
    pub configured: Vec<std::net::SocketAddr>,
}

/// Where the eBPF plane carries a service: each interface it is attached to, at which hook
/// and how (the service's `interface` first).
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
    /// Another daemon holds the pin directory (`pin_lock`).
    #[error(transparent)]
    PinsHeld(#[from] pin_lock::PinLockError),
    /// The service has no `interface` or no `local_address`.
    #[error("no `interface` or `local_address`")]
    NotConfigured,
    /// An interface the service names does not exist.
    #[error("there is no interface {0}")]
    NoInterface(String),
    /// An interface the service names carries the other hook already, for another service:
    /// an interface carries one hook (XDP or tc), so the two services cannot share it.
    #[error(
        "{interface} carries {has} for another service, and this one needs {wants}: an \
         interface carries one hook"
    )]
    HookConflict {
        /// The interface.
        interface: String,
        /// How the program is attached there now.
        has: AttachMode,
        /// The hook this service needs: `XDP` or `tc`.
        wants: &'static str,
    },
    /// Native XDP attached to `interface` for `auto`, but the driver does not say it can
    /// forward (`xdp-features` lacks `basic`, `redirect` or `ndo-xmit`, or the kernel has no
    /// `xdp-features` to ask: before Linux 6.3): frames redirected there could vanish, so the
    /// program was detached again.
    #[error(
        "native XDP on {interface} cannot be proven to forward ({why}); set dataplane = \"xdp\" \
         to use it anyway"
    )]
    CannotForward {
        /// The interface.
        interface: String,
        /// What its driver reports: `basic, redirect, no ndo-xmit`, or that the kernel
        /// cannot tell.
        why: String,
    },
    /// No BPF object was found, the object has no `lb_tc`, a program was refused by the
    /// kernel, or a program could not be attached to an interface.
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

/// The running eBPF data plane: the loaded object (its programs hold the attachments), the
/// maps with the services on them, and the thread that republishes snapshots into them.
pub struct XdpPlane {
    // Dropping the object closes the links: the kernel detaches the programs.
    ebpf: Option<Ebpf>,
    /// The object's path, for the loader's errors.
    path: PathBuf,
    /// Why a program could not be loaded, by name: the verifier is not run again for the
    /// next service (it takes seconds, and the object does not change).
    load_failed: BTreeMap<&'static str, String>,
    state: Arc<Mutex<sync::State>>,
    /// Every interface the program is attached to, by name.
    attached: BTreeMap<String, Attached>,
    sync: Option<sync::SyncThread>,
    /// The pinned set (`[global] bpf_pin_dir`); `None` when nothing is pinned.
    pins: Option<pins::Pins>,
    /// The links this daemon pinned, by interface; it holds them so that the last close
    /// detaches them once the pins are removed ([`XdpPlane::shutdown`]).
    pinned_links: BTreeMap<String, PinnedLink>,
    /// What the adopted pinned set holds that no service has claimed yet, until
    /// [`XdpPlane::settle_adoption`].
    adopted: Option<adopt::Adopted>,
    /// The adopted set's links not taken over yet: interface → (mode, pin).
    adopted_links: BTreeMap<String, (AttachMode, PathBuf)>,
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
    /// `[global] bpf_pin_dir`: where the maps and links are pinned (and a set left by the
    /// daemon before is adopted); `None`: nothing pinned.
    pub bpf_pin_dir: Option<PathBuf>,
}

impl XdpPlane {
    /// Finds and loads the BPF object, takes its maps and starts the sync thread, with no
    /// service and no interface yet. The programs are loaded when a service first needs
    /// their hook ([`XdpPlane::add`]). With a pin directory, the maps are opened from their
    /// pins, and a set pinned by the daemon before is adopted: its services continue under
    /// their ids as the config's services are added, and its links are taken over (see
    /// `pins.rs`, `adopt.rs`); a pin directory that cannot be used is logged and the plane
    /// runs unpinned.
    ///
    /// Returns `Err(XdpPlaneError::Load)` with the loader's reason (no object found, the
    /// kernel refused the program, a map is missing), `Err(XdpPlaneError::Maps)` when an
    /// adopted map cannot be read.
    pub fn load(start: &XdpStart) -> Result<XdpPlane, XdpPlaneError> {
        let (pins, adopting) = match start.bpf_pin_dir.as_deref().map(pins::Pins::open) {
            None => (None, false),
            Some(Ok((pins, adopting))) => (Some(pins), adopting),
            // Another daemon serves the set: neither adopted nor run beside it unpinned.
            Some(Err(pins::PinError::Held(e))) => return Err(XdpPlaneError::PinsHeld(e)),
            Some(Err(e)) => {
                warn!("eBPF: nothing is pinned ({e}): flows will end with the daemon");
                (None, false)
            }
        };
        let pinned = pins.as_ref().map(pins::map_paths).unwrap_or_default();
        let (ebpf, maps, walk, path) = load_balancer(start.bpf_object.as_deref(), &pinned)?;
        info!("eBPF: loaded {}", path.display());
        let mut adopted_links = BTreeMap::new();
        let adopted = match (&pins, adopting) {
            (Some(pins), true) => {
                let adopted = adopt::Adopted::read(&maps)?;
                for (interface, mode, pin) in pins.links() {
                    adopted_links.insert(interface, (mode, pin));
                }
                let (services, backends) = adopted.counts();
                info!(
                    "eBPF: adopting the data plane pinned in {}: {services} service(s), \
                     {backends} backend id(s), {} link(s); its flows go on",
                    pins.dir().display(),
                    adopted_links.len()
                );
                Some(adopted)
            }
            _ => None,
        };
        let (service_ids, backend_ids) = match &adopted {
            Some(a) => a.pools(),
            None => (
                ids::IdPool::new(MAX_SERVICES),
                ids::IdPool::new(MAX_BACKENDS),
            ),
        };
        let state = Arc::new(Mutex::new(sync::State {
            maps,
            backend_ids,
            service_ids,
            drain_timeout: start.drain_timeout,
            running: Vec::new(),
            leaving: Vec::new(),
            orphans: Vec::new(),
            orphan_services: Vec::new(),
            open_flows: None,
            snat_in_use: None,
            snat_counted_at: None,
            counters_read: None,
            stopping: false,
            bridges: BTreeMap::new(),
            unreleased: Vec::new(),
        }));
        let sync = sync::SyncThread::start(Arc::clone(&state), walk);
        Ok(XdpPlane {
            ebpf: Some(ebpf),
            path,
            load_failed: BTreeMap::new(),
            state,
            attached: BTreeMap::new(),
            sync: Some(sync),
            pins,
            pinned_links: BTreeMap::new(),
            adopted,
            adopted_links,
        })
    }

    /// Whether the plane adopted a pinned set that [`XdpPlane::settle_adoption`] has not
    /// settled yet: a daemon refused at start-up leaves such a plane pinned, as it found it.
    pub fn adopting(&self) -> bool {
        self.adopted.is_some()
    }

    /// Ends the adoption of a pinned set once the config's services are placed: the set's
    /// services that no config service continued drain as removed ones (their VIP and ids
    /// released after `drain_timeout`), so do the ids of the services that were draining
    /// with their VIP passed on, its backend ids no service took back drain too, and
    /// its links on interfaces no service uses are removed (their programs detached). Does
    /// nothing when nothing was adopted.
    ///
    /// A service of the set whose VIP a service on the proxy listens on now (`proxied`: its
    /// address, or the wildcard of its family on that port, and protocol) lets go of the VIP at once, as
    /// [`XdpPlane::remove`] does for a reload: else the program would go on answering the
    /// VIP's new connections with a RST for the whole drain. The flows it carried are cut.
    pub fn settle_adoption(&mut self, proxied: &[(std::net::SocketAddr, crate::config::Protocol)]) {
        let Some(adopted) = self.adopted.take() else {
            return;
        };
        let adopt::Unclaimed {
            services,
            backend_ids: ids,
            without_vip,
        } = adopted.unclaimed();
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let deadline = Instant::now() + st.drain_timeout;
        for id in without_vip {
            info!(
                "eBPF: the adopted service id {id} was draining (its VIP passed on); it is \
                 released after the drain timeout"
            );
            st.orphan_services.push((id, deadline));
        }
        for (key, found) in services {
            let more_local = st.maps.adopted_local_addrs(found.id, &found.entry);
            let leftover = maps::ServiceSlot::leftover(found.id, &key, &found.entry, more_local);
            let Some(mut slot) = leftover else {
                warn!(
                    "eBPF: the adopted service id {} has an unreadable VIP; it stays reserved",
                    found.id
                );
                continue;
            };
            let name = format!("{} (adopted, not in the config)", slot.vip);
            if let Err(e) = st.maps.empty_table(&mut slot) {
                error!("service {name}: cannot empty its XDP table: {e}");
            }
            let taken = proxied.iter().any(|&(listen, protocol)| {
                protocol == slot.protocol
                    && listen.port() == slot.vip.port()
                    && (listen.ip() == slot.vip.ip()
                        || listen.ip().is_unspecified() && listen.is_ipv4() == slot.vip.is_ipv4())
            });
            if taken {
                match st.maps.hand_over_vip(&slot, None) {
                    Ok(true) => warn!(
                        "service {name}: its VIP left the XDP maps now, for the service that \
                         replaces it on the proxy; the flows XDP carried for it are cut"
                    ),
                    Ok(false) => {}
                    Err(e) => error!("service {name}: cannot hand its VIP on: {e}"),
                }
            }
            info!("service {name}: drains, its flows go on for at most the drain timeout");
            st.leaving.push(sync::Leaving {
                name,
                slot,
                deadline,
            });
        }
        if let Err(e) = st.maps.flag_draining(&ids) {
            error!("eBPF: cannot flag the adopted backend ids {ids:?} draining: {e}");
        }
        st.orphans.extend(ids.into_iter().map(|id| (id, deadline)));
        drop(guard);
        for (interface, (mode, pin)) in std::mem::take(&mut self.adopted_links) {
            warn!(
                "eBPF: {interface} carries a pinned program ({mode}) no service needs now; \
                 detaching it"
            );
            if let Err(e) = std::fs::remove_file(&pin) {
                warn!("eBPF: cannot remove {}: {e}", pin.display());
            }
        }
    }

    /// Places `service` on the eBPF plane: a service id, the program of its hook attached to
    /// any of its interfaces it is not attached to yet, and its current snapshot written, VIP
    /// last. The sync thread writes its later snapshots.
    ///
    /// Returns where it runs; `Err` leaves nothing of the service in the maps (a service of
    /// an adopted set it would have continued stays the set's, to drain at
    /// [`XdpPlane::settle_adoption`]) and no attachment made for it if the attaching failed
    /// (so `auto` may try the other hook on the same interfaces); one made before a later
    /// step failed (ids, maps) stays, passing what is not a VIP's.
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
        // Refused before anything is attached when it would need a new service id and none
        // is free; one that continues a service of an adopted set keeps that one's id.
        let key = {
            let snap = service.snapshot.load();
            ServiceSlot::vip_key_of(snap.listen, snap.protocol)
        };
        if lock(&self.state).service_ids.available() == 0
            && !(self.adopted.as_ref()).is_some_and(|a| a.continues(&key, xdp.forwarding))
        {
            return Err(XdpPlaneError::ServiceIdsFull);
        }
        let interfaces = self.attach_all(&wanted, settings.hook)?;
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
        let mut slot = ServiceSlot::new(
            0,
            snap.listen,
            snap.protocol,
            settings,
            xdp.local_addresses.clone(),
            snat_ports,
        );
        // A service of an adopted pinned set at the same VIP continues under its ids: the
        // flows conntrack pinned to its backends go on. Taken only once the ids the service
        // needs besides are known to be free: a refused service leaves it to drain.
        let key = slot.vip_key();
        let required: Vec<std::net::SocketAddr> = (settings.configured.iter())
            .filter(|a| addresses.contains(a))
            .copied()
            .collect();
        let claimed = adopt::claim_if_placeable(
            self.adopted.as_mut(),
            &key,
            xdp.forwarding,
            (&addresses, &required),
            st.service_ids.available(),
            st.backend_ids.available(),
        )?;
        slot.id = match &claimed {
            Some(c) => {
                info!(
                    "service {}: continues the adopted service id {} ({} backend(s))",
                    snap.name,
                    c.id,
                    c.backends.len()
                );
                slot.resume(&c.entry, c.backends.clone());
                c.id
            }
            None => st.service_ids.take().ok_or(XdpPlaneError::ServiceIdsFull)?,
        };
        let id = slot.id;
        let started = Instant::now();
        let deadline = started + st.drain_timeout;
        // An adopted service keeps its counters.
        let reset = if claimed.is_some() {
            Ok(())
        } else {
            st.maps.reset_service_counters(id)
        };
        let written = reset.and_then(|()| {
            st.maps
                .publish(&mut slot, &snap, &mut st.backend_ids, deadline)
        });
        if let Ok(written) = written {
            sync::log_table(&snap, &slot, written, started);
        }
        if let Err(e) = written {
            match claimed {
                // Its VIP, live table and ids stay the set's, to drain at settle.
                Some(c) => {
                    st.undo_resume(slot, &c, &snap.name);
                    if let Some(adopted) = self.adopted.as_mut() {
                        adopted.give_back(key, c);
                    }
                }
                None => st.undo_add(slot, &snap.name),
            }
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

    /// How the program is attached to `interface`, if it is.
    pub fn hook_on(&self, interface: &str) -> Option<AttachMode> {
        self.attached.get(interface).map(|a| a.mode)
    }

    /// Attaches the program of `hook` to each of `wanted` that it is not attached to yet;
    /// returns every one with its mode, in order. Every interface must exist and carry no
    /// other hook before anything is attached, so a typo or a conflict in the last one leaves
    /// no program behind on the first; when an attach fails, those this call made are
    /// detached again.
    fn attach_all(
        &mut self,
        wanted: &[String],
        hook: HookRequest,
    ) -> Result<Vec<(String, AttachMode)>, XdpPlaneError> {
        let mut ifindexes = Vec::with_capacity(wanted.len());
        for name in wanted {
            let index =
                loader::if_index(name).ok_or_else(|| XdpPlaneError::NoInterface(name.clone()))?;
            ifindexes.push(index);
            if let Some(has) = self.attached.get(name) {
                check_hook(name, has.mode, hook)?;
            }
        }
        let mut interfaces = Vec::new();
        let mut made: Vec<(String, u32, Link)> = Vec::new();
        let mut adopted = Vec::new();
        for (name, ifindex) in wanted.iter().zip(ifindexes) {
            if self
                .attached
                .get(name)
                .is_some_and(|a| a.ifindex != ifindex)
            {
                // Made again since the last look (`interfaces.rs`): not left to it.
                self.attach_again(name, ifindex);
            }
            if let Some(a) = self.attached.get(name) {
                interfaces.push((name.clone(), a.mode));
                continue;
            }
            if let Some((mode, pin)) = self.adopted_links.remove(name) {
                match self.adopt_link(name, ifindex, mode, &pin, hook) {
                    Ok(link) => {
                        info!(
                            "eBPF: the pinned {mode} link on {name} is adopted: the new program \
                             replaced the old one in place"
                        );
                        interfaces.push((name.clone(), mode));
                        adopted.push((name.clone(), ifindex, mode, link));
                        continue;
                    }
                    Err(e) => {
                        warn!(
                            "eBPF: the pinned {mode} link on {name} cannot be adopted ({e}); \
                             replacing it: the flows it carried are cut"
                        );
                        if let Err(e) = std::fs::remove_file(&pin) {
                            warn!("eBPF: cannot remove {}: {e}", pin.display());
                        }
                    }
                }
            }
            match self.attach_one(name, ifindex, hook) {
                Ok((mode, link)) => {
                    made.push((name.clone(), ifindex, link));
                    interfaces.push((name.clone(), mode));
                }
                Err(e) => {
                    self.detach_made(made);
                    return Err(e);
                }
            }
        }
        if hook
            == (HookRequest::Xdp {
                allow_generic: false,
            })
        {
            // `auto`: some drivers only offer `ndo-xmit` once a program is attached
            // (virtio_net), so the proof comes after the attach.
            if let Err(e) = prove_forwarding(wanted) {
                self.detach_made(made);
                return Err(e);
            }
        }
        for (name, ifindex, link) in made {
            if let Some(&mode) = interfaces.iter().find(|(n, _)| *n == name).map(|(_, m)| m) {
                let link = self.pin_link(&name, mode, link);
                info!("eBPF: {} attached to {name} ({mode})", mode.program());
                self.attached
                    .insert(name, Attached::new(mode, ifindex, link));
            }
        }
        for (name, ifindex, mode, link) in adopted {
            self.attached
                .insert(name, Attached::new(mode, ifindex, Some(link)));
        }
        Ok(interfaces)
    }

    /// Takes over the adopted set's link on `name` (index `ifindex`, attached in `mode`,
    /// pinned at `pin`) for a service that asks for `hook`: the program this daemon loaded
    /// replaces the old one in the link, atomically (`bpf_link_update`), so no packet misses
    /// the hook. Returns the link, which aya holds from then on (its pin stays). `Err` says
    /// why not (the other hook, generic where native is needed, a pin that is not such a
    /// link); nothing changed then.
    fn adopt_link(
        &mut self,
        name: &str,
        ifindex: u32,
        mode: AttachMode,
        pin: &std::path::Path,
        hook: HookRequest,
    ) -> Result<Link, XdpPlaneError> {
        check_hook(name, mode, hook)?;
        let failed = |e: String| XdpPlaneError::Load(format!("{}: {e}", pin.display()));
        let link: FdLink = PinnedLink::from_pin(pin)
            .map_err(|e| failed(loader::error_chain(&e)))?
            .into();
        lock(&self.state).maps.allow_redirect(ifindex)?;
        if mode.is_tc() {
            self.allow_peer_redirect(name, ifindex);
            self.watch_bridge(name, ifindex);
            let link =
                SchedClassifierLink::try_from(link).map_err(|e| failed(loader::error_chain(&e)))?;
            self.tc_program()?
                .attach_to_link(link)
                .map(Link::Tc)
                .map_err(|e| failed(loader::error_chain(&e)))
        } else {
            let link = XdpLink::try_from(link).map_err(|e| failed(loader::error_chain(&e)))?;
            self.xdp_program()?
                .attach_to_link(link)
                .map(Link::Xdp)
                .map_err(|e| failed(loader::error_chain(&e)))
        }
    }

    /// Pins the link made on `name` in `mode`, so the attachment outlives the daemon. Not
    /// for `clsact` (no link to pin) or without a pin directory. A pin that fails is logged
    /// and the interface attached again, unpinned. Returns the link when aya still holds it
    /// (not pinned), `None` when it is pinned (in `pinned_links`) or lost.
    fn pin_link(&mut self, name: &str, mode: AttachMode, link: Link) -> Option<Link> {
        let Some(pin) = self.pins.as_ref().and_then(|p| p.link_path(name, mode)) else {
            return Some(link);
        };
        if !mode.is_tc() && !xdp_links() {
            return Some(link);
        }
        // A pin left by a link no longer attached (its interface went away and came back).
        let _ = std::fs::remove_file(&pin);
        let ebpf = self.ebpf.as_mut()?;
        let failed = |e: &dyn std::error::Error| XdpPlaneError::Load(loader::error_chain(e));
        let fd = match link {
            Link::Xdp(id) => program_as::<Xdp>(ebpf, PROG_BALANCER)
                .and_then(|p| p.take_link(id).map_err(|e| failed(&e)))
                .and_then(|l| FdLink::try_from(l).map_err(|e| failed(&e))),
            Link::Tc(id) => program_as::<SchedClassifier>(ebpf, PROG_TC)
                .and_then(|p| p.take_link(id).map_err(|e| failed(&e)))
                .and_then(|l| FdLink::try_from(l).map_err(|e| failed(&e))),
        };
        let pinned = fd.and_then(|fd| fd.pin(&pin).map_err(|e| failed(&e)));
        match pinned {
            Ok(p) => {
                self.pinned_links.insert(name.to_string(), p);
                None
            }
            Err(e) => {
                error!(
                    "eBPF: cannot pin the link on {name} at {}: {e}; attaching it again, \
                     unpinned (its flows end with the daemon)",
                    pin.display()
                );
                let hook = if mode.is_tc() {
                    HookRequest::Tc
                } else {
                    HookRequest::Xdp {
                        allow_generic: mode == AttachMode::Generic,
                    }
                };
                let again = loader::if_index(name)
                    .ok_or_else(|| XdpPlaneError::NoInterface(name.to_string()))
                    .and_then(|ifindex| self.attach_one(name, ifindex, hook));
                match again {
                    Ok((_, link)) => Some(link),
                    Err(e) => {
                        error!("eBPF: {name} could not be attached again: {e}");
                        None
                    }
                }
            }
        }
    }

    /// Attaches the program of `hook` to `name` (index `ifindex`), loading the program first
    /// if no service needed it yet.
    fn attach_one(
        &mut self,
        name: &str,
        ifindex: u32,
        hook: HookRequest,
    ) -> Result<(AttachMode, Link), XdpPlaneError> {
        // Redirects into the interface are allowed first: an interface in `attached` is one
        // other services can redirect to as well (lb_xdp's DEVMAP; lb_tc does not use it).
        lock(&self.state).maps.allow_redirect(ifindex)?;
        // Without the State lock: attaching waits for the kernel (a driver may reset its
        // rings), and the sync thread and counter reads go on meanwhile.
        match hook {
            HookRequest::Xdp { allow_generic } => {
                let (mode, link) = loader::attach(self.xdp_program()?, name, allow_generic)?;
                Ok((mode, Link::Xdp(link)))
            }
            HookRequest::Tc => {
                self.allow_peer_redirect(name, ifindex);
                self.watch_bridge(name, ifindex);
                let attached = loader::attach_tc(self.tc_program()?, name)?;
                Ok((attached.mode, Link::Tc(attached.link)))
            }
        }
    }

    /// Before `lb_tc` goes on `name` (index `ifindex`): if it is a veth whose peer is in
    /// another namespace, lets the program hand translated packets out of it straight to the
    /// peer (`VETH_PEERS`, see `peer.rs`). Only a way to go faster: an interface the kernel
    /// cannot say that of, or one the map has no room for (the kernel drops an entry when
    /// its interface goes away), is logged and sent to the usual way.
    fn allow_peer_redirect(&mut self, name: &str, ifindex: u32) {
        match peer::peer_elsewhere(ifindex) {
            Ok(true) => match lock(&self.state).maps.allow_peer_redirect(ifindex) {
                Ok(()) => info!(
                    "eBPF: {name} is a veth with its peer in another namespace: lb_tc hands \
                     translated packets to the peer directly"
                ),
                Err(e) => warn!("eBPF: {e}; packets out of {name} take the veth's transmit"),
            },
            Ok(false) => {}
            Err(e) => warn!(
                "eBPF: cannot tell whether {name} is a veth with a peer elsewhere ({e}); \
                 packets out of it take the usual way"
            ),
        }
    }

    /// Before `lb_tc` goes on `name` (index `ifindex`): if it is a bridge, the sync thread
    /// copies its forwarding database into `BRIDGE_FDB` from now on, so that what is routed
    /// into it goes straight to the port of its next hop (see `bridge_ports.rs`). Only a way
    /// to go faster: when the kernel cannot say, packets go through the bridge, logged.
    fn watch_bridge(&mut self, name: &str, ifindex: u32) {
        match bridge_fdb::is_bridge(ifindex) {
            Ok(true) => {
                lock(&self.state).bridges.insert(name.to_string(), ifindex);
            }
            Ok(false) => {}
            Err(e) => warn!(
                "eBPF: cannot tell whether {name} is a bridge ({e}); packets into it go \
                 through it"
            ),
        }
    }

    /// Detaches what [`XdpPlane::attach_all`] attached before a later interface failed.
    fn detach_made(&mut self, made: Vec<(String, u32, Link)>) {
        for (name, _, link) in made {
            if let Err(e) = self.detach(link) {
                warn!("eBPF: cannot detach from {name} after a failed attach: {e}");
            }
        }
    }

    /// Detaches `link`, which aya holds, and forgets it. `Err` when the kernel refuses (a
    /// link whose device is gone may say so); aya forgets the link all the same.
    fn detach(&mut self, link: Link) -> Result<(), XdpPlaneError> {
        let ebpf = self.ebpf.as_mut().ok_or(XdpPlaneError::Stopped)?;
        let failed = |e: aya::programs::ProgramError| XdpPlaneError::Load(loader::error_chain(&e));
        match link {
            Link::Xdp(id) => {
                program_as::<Xdp>(ebpf, PROG_BALANCER).and_then(|p| p.detach(id).map_err(failed))
            }
            Link::Tc(id) => program_as::<SchedClassifier>(ebpf, PROG_TC)
                .and_then(|p| p.detach(id).map_err(failed)),
        }
    }

    /// `lb_xdp`, loaded (verified) on first use.
    fn xdp_program(&mut self) -> Result<&mut Xdp, XdpPlaneError> {
        if let Some(why) = self.load_failed.get(PROG_BALANCER) {
            return Err(XdpPlaneError::Load(why.clone()));
        }
        let ebpf = self.ebpf.as_mut().ok_or(XdpPlaneError::Stopped)?;
        match loader::load_program(ebpf, &self.path, PROG_BALANCER) {
            Ok(_) => {}
            Err(e) => {
                let why = loader::error_chain(&e);
                self.load_failed.insert(PROG_BALANCER, why.clone());
                return Err(XdpPlaneError::Load(why));
            }
        }
        program_as::<Xdp>(ebpf, PROG_BALANCER)
    }

    /// `lb_tc`, loaded (verified) on first use. `Err(XdpPlaneError::Loader(NoTcProgram))`
    /// for an object built before the tc data plane.
    fn tc_program(&mut self) -> Result<&mut SchedClassifier, XdpPlaneError> {
        if let Some(why) = self.load_failed.get(PROG_TC) {
            return Err(XdpPlaneError::Load(why.clone()));
        }
        let ebpf = self.ebpf.as_mut().ok_or(XdpPlaneError::Stopped)?;
        match loader::load_tc_program(ebpf, &self.path, PROG_TC) {
            Ok(_) => {}
            Err(e) => {
                let why = loader::error_chain(&e);
                self.load_failed.insert(PROG_TC, why.clone());
                return Err(match e {
                    LoadError::NoTcProgram { .. } => XdpPlaneError::Loader(e),
                    _ => XdpPlaneError::Load(why),
                });
            }
        }
        program_as::<SchedClassifier>(ebpf, PROG_TC)
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

    /// The first step of a drain on the way out (SIGTERM): every service's table is emptied
    /// and stays empty, so the program answers a new TCP flow with a RST and drops a new UDP
    /// one, while the flows conntrack already carries go on to their backends. Open flows
    /// are counted from now on every [`sync::STOPPING_EVERY`] (see
    /// [`open_flows_left`](Self::open_flows_left)). Returns the number of services stopped.
    pub fn stop_new_flows(&self) -> usize {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        st.stopping = true;
        st.open_flows = None;
        let mut running = std::mem::take(&mut st.running);
        for r in &mut running {
            if let Err(e) = st.maps.empty_table(&mut r.slot) {
                error!(
                    "service {}: cannot empty its XDP table: {e}; it takes new flows until the \
                     daemon exits",
                    r.service.snapshot.load().name
                );
            }
        }
        let stopped = running.len();
        st.running = running;
        stopped
    }

    /// After [`stop_new_flows`](Self::stop_new_flows): the flows still open on the eBPF plane
    /// (conntrack entries not closed by a FIN or RST and seen within their idle timeout, see
    /// `open_flows.rs`), or `None` until the first count since the stop.
    pub fn open_flows_left(&self) -> Option<u64> {
        let mut st = lock(&self.state);
        // The sync thread counts while someone reads.
        st.counters_read = Some(Instant::now());
        st.open_flows.as_ref().map(|open| open.values().sum())
    }

    /// Stops republishing, logs the final counters, removes the pins and detaches the
    /// programs from every interface. Flows still open on XDP are cut: their packets now
    /// reach the kernel stack, which does not know them.
    pub fn shutdown(mut self) {
        self.pinned_links.clear();
        self.stop();
        if let Some(pins) = self.pins.take() {
            pins.remove();
        }
        for (interface, a) in &self.attached {
            info!("eBPF detached from {interface} ({})", a.mode);
        }
    }

    /// Stops republishing and logs the final counters; the programs stay attached where
    /// their links are pinned (the daemon leaves without [`XdpPlane::shutdown`]: an error
    /// exit, a dead thread), and are detached elsewhere.
    fn stop(&mut self) {
        if let Some(s) = self.sync.take() {
            s.stop();
        }
        match self.counters() {
            Ok(c) => c.log(),
            Err(e) => warn!("XDP counters could not be read at exit: {e}"),
        }
        self.ebpf.take();
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
            if let Some(pins) = &self.pins {
                warn!(
                    "eBPF: the data plane stays pinned in {}: its flows go on, on the last \
                     table, until a daemon adopts it",
                    pins.dir().display()
                );
            }
        }
    }
}

/// Finds and loads the object and takes the maps; the programs are loaded on first use.
fn load_balancer(
    configured: Option<&std::path::Path>,
    pinned: &[(&'static str, PathBuf)],
) -> Result<(Ebpf, Maps, map_walk::MapWalk, PathBuf), XdpPlaneError> {
    // The loader's errors carry their causes in the words.
    let chain = |e: LoadError| XdpPlaneError::Load(loader::error_chain(&e));
    let path = loader::find_object(configured)?;
    let mut ebpf = loader::load_object(&path, &[], pinned).map_err(chain)?;
    let maps = Maps::take(&mut ebpf)?;
    let walk = map_walk::MapWalk::take(&mut ebpf)?;
    Ok((ebpf, maps, walk, path))
}

/// A link aya holds for one of the programs (not pinned): what [`XdpPlane::detach`] takes.
enum Link {
    Xdp(aya::programs::xdp::XdpLinkId),
    Tc(aya::programs::tc::SchedClassifierLinkId),
}

/// An interface the program is attached to.
struct Attached {
    /// How.
    mode: AttachMode,
    /// The interface's index when the program went on it (a device deleted and made again
    /// under the same name has another: `interfaces.rs`).
    ifindex: u32,
    /// The link while aya holds it; `None` when it is pinned (`pinned_links`) or was lost.
    link: Option<Link>,
    /// No interface has the name (since the last look; logged once).
    gone: bool,
}

impl Attached {
    fn new(mode: AttachMode, ifindex: u32, link: Option<Link>) -> Attached {
        Attached {
            mode,
            ifindex,
            link,
            gone: false,
        }
    }
}

/// Whether an interface attached as `has` can take a service that asks for `hook`.
///
/// Returns `Err(XdpPlaneError::HookConflict)` for the other hook, and
/// `Err(LoadError::NativeOnly)` for an XDP service that may not run generic where another
/// service attached XDP in generic mode.
fn check_hook(interface: &str, has: AttachMode, hook: HookRequest) -> Result<(), XdpPlaneError> {
    let conflict = |wants| XdpPlaneError::HookConflict {
        interface: interface.to_string(),
        has,
        wants,
    };
    match (hook, has) {
        (HookRequest::Tc, m) if !m.is_tc() => Err(conflict("tc")),
        (HookRequest::Xdp { .. }, m) if m.is_tc() => Err(conflict("XDP")),
        (
            HookRequest::Xdp {
                allow_generic: false,
            },
            AttachMode::Generic,
        ) => Err(XdpPlaneError::Loader(LoadError::NativeOnly {
            interface: interface.to_string(),
            native: "another service attached it in generic mode".into(),
        })),
        _ => Ok(()),
    }
}

/// Program `name` of `ebpf` as a `P` (`Xdp`, `SchedClassifier`).
fn program_as<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, XdpPlaneError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| XdpPlaneError::Load(format!("no program {name}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| XdpPlaneError::Load(e.to_string()))
}

/// `Ok` when every one of `interfaces` reports the `xdp-features` native XDP forwarding
/// needs (see `xdp_features.rs`); else `Err(XdpPlaneError::CannotForward)` naming the first
/// that does not, or cannot be asked.
fn prove_forwarding(interfaces: &[String]) -> Result<(), XdpPlaneError> {
    for name in interfaces {
        let cannot = |why: String| XdpPlaneError::CannotForward {
            interface: name.clone(),
            why,
        };
        let ifindex =
            loader::if_index(name).ok_or_else(|| XdpPlaneError::NoInterface(name.clone()))?;
        match xdp_features::of(ifindex) {
            Ok(Some(f)) if f.forwards() => {}
            Ok(Some(f)) => return Err(cannot(format!("its driver reports {f}"))),
            Ok(None) => {
                return Err(cannot(
                    "this kernel reports no xdp-features (Linux 6.3 or newer does)".into(),
                ))
            }
            Err(e) => return Err(cannot(format!("xdp-features cannot be read: {e}"))),
        }
    }
    Ok(())
}

/// Whether XDP attachments are links that can be pinned (Linux 5.9 and later; aya attaches
/// through netlink before).
fn xdp_links() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 9, 0))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_cannot_prove_forwarding_on_a_device_without_xdp_features() {
        // The loopback device reports none; on a kernel before 6.3 nothing can be proven.
        let e = prove_forwarding(&["lo".into()]).expect_err("lo does not forward XDP");
        let text = e.to_string();
        assert!(
            matches!(&e, XdpPlaneError::CannotForward { interface, .. } if interface == "lo"),
            "{text}"
        );
        assert!(
            text.contains("no ndo-xmit") || text.contains("no xdp-features"),
            "the reason names what is missing: {text}"
        );
    }

    #[test]
    fn an_interface_carries_one_hook() {
        let xdp = HookRequest::Xdp {
            allow_generic: true,
        };
        let native_only = HookRequest::Xdp {
            allow_generic: false,
        };
        assert!(check_hook("l0", AttachMode::Tcx, HookRequest::Tc).is_ok());
        assert!(check_hook("l0", AttachMode::Clsact, HookRequest::Tc).is_ok());
        assert!(check_hook("l0", AttachMode::Native, xdp).is_ok());
        assert!(check_hook("l0", AttachMode::Generic, xdp).is_ok());
        assert!(check_hook("l0", AttachMode::Native, native_only).is_ok());
        let e = check_hook("l0", AttachMode::Native, HookRequest::Tc).expect_err("XDP there");
        assert_eq!(
            e.to_string(),
            "l0 carries XDP native for another service, and this one needs tc: an interface \
             carries one hook"
        );
        let e = check_hook("l0", AttachMode::Tcx, xdp).expect_err("tc there");
        assert!(
            matches!(e, XdpPlaneError::HookConflict { wants: "XDP", .. }),
            "{e}"
        );
        let e = check_hook("br0", AttachMode::Generic, native_only).expect_err("generic there");
        assert!(e.to_string().contains("no native XDP on br0"), "{e}");
    }
}
