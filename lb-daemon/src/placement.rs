//! Placement: which data plane carries a service, decided in one place.
//!
//! - [`why_not_xdp`]: why a service cannot run on the eBPF data plane (at either hook)
//!   whatever the kernel offers (its config).
//! - [`Planes::place`]: the decision for one service. `dataplane = "proxy"` or a `why_not_xdp`
//!   reason sends it to the proxy; otherwise the eBPF plane is tried (loaded on first need)
//!   at a hook: `xdp` and `tc` name theirs, and `auto` chooses by the interfaces' kinds
//!   ([`auto_hook`]): native XDP only when every interface is a NIC, else tc (an interface
//!   without Ethernet frames, such as tun or WireGuard, is a `why_not_xdp` reason); native XDP
//!   that fails to attach falls back to tc. When the plane cannot take it, an `auto` service
//!   goes to the proxy with the reason logged while an `xdp` or `tc` one is refused. `auto`
//!   never takes generic XDP: what it redirects into a bridge vanishes.
//! - [`Planes::remove`]: the removal, on the plane the placement names.
//!
//! Start-up and reloads both place services through here (start-up is a reload from an empty
//! config, see `crate::reload`); nothing else decides where a service runs.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tracing::{error, info, warn};

use crate::config::{CheckKind, DataplaneKind, Forwarding, Global, Protocol, ProxyOnly, Service};
use crate::dataplane::proxy::{Proxy, ProxyError};
use crate::dataplane::xdp::iface_kind::{self, InterfaceKind, KindError};
use crate::dataplane::xdp::{
    loader, AttachMode, CountersReader, HookRequest, LoadError, MapsError, XdpAttachment,
    XdpCounters, XdpPlane, XdpPlaneError, XdpService, XdpStart,
};
use crate::dataplane::{Dataplane, ServiceHandle};

/// Where a service's flows are carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// On the eBPF data plane: the forwarding, the interfaces the program is attached to and
    /// at which hook, and for `auto` why that hook.
    Ebpf {
        /// The forwarding and each interface with its hook.
        carried: XdpAttachment,
        /// Why `auto` chose the hook; `None` for `dataplane = "xdp"` or `"tc"`.
        why: Option<AutoHook>,
    },
    /// On the userspace proxy, and why not on the eBPF data plane.
    Proxy {
        /// Why not the eBPF data plane.
        reason: NotOnXdp,
    },
}

impl Placement {
    /// Whether the eBPF data plane (at the XDP or the tc hook) carries the service.
    pub fn on_xdp(&self) -> bool {
        matches!(self, Placement::Ebpf { .. })
    }

    /// The plane's short name, as `/status` sums them up: `xdp`, `tc` or `proxy`.
    pub fn plane(&self) -> &'static str {
        match self {
            Placement::Ebpf { carried, .. }
                if carried.interfaces.iter().any(|(_, m)| m.is_tc()) =>
            {
                "tc"
            }
            Placement::Ebpf { .. } => "xdp",
            Placement::Proxy { .. } => "proxy",
        }
    }
}

/// The words of the log and of `/status`: `eBPF data plane (nat) on l0 (tc), l1 (tc): auto
/// chose tc because l0 is a veth`, `eBPF data plane (dsr) on eth0 (XDP native)` or `proxy
/// data plane (REASON)`.
impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Ebpf { carried, why } => {
                let fwd = match carried.forwarding {
                    Forwarding::Nat => "nat",
                    Forwarding::Dsr => "dsr",
                };
                let on: Vec<String> = carried
                    .interfaces
                    .iter()
                    .map(|(i, m)| format!("{i} ({m})"))
                    .collect();
                write!(f, "eBPF data plane ({fwd}) on {}", on.join(", "))?;
                match why {
                    Some(why) => write!(f, ": {why}"),
                    None => Ok(()),
                }
            }
            Placement::Proxy { reason } => write!(f, "proxy data plane ({reason})"),
        }
    }
}

/// Why `auto` put a service on the hook it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoHook {
    /// XDP: every interface is a NIC and native XDP attached to each.
    AllNics,
    /// tc: `interface` is not a NIC (a veth, a bridge...), where XDP would run generic or
    /// not deliver.
    NotANic {
        /// The first interface of the service that is not a NIC.
        interface: String,
        /// What it is.
        kind: InterfaceKind,
    },
    /// tc: every interface is a NIC, but native XDP did not attach (the plane's reason).
    NoNativeXdp(String),
    /// tc: an interface already carries tc for another service (an interface carries one
    /// hook).
    TcThere(String),
    /// tc: every interface is a NIC, but a backend's route leaves by another device (a
    /// VLAN, a bond, another NIC), which `lb_xdp` cannot send to
    /// ([`routes::off_xdp`](crate::dataplane::xdp::routes::off_xdp)).
    RoutedOffXdp {
        /// The backend.
        backend: std::net::SocketAddr,
        /// The device its route leaves by.
        via: String,
    },
}

/// The reason after the placement: `auto chose tc because l0 is a veth`.
impl fmt::Display for AutoHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AutoHook::AllNics => {
                f.write_str("auto chose XDP: every interface is a NIC with native XDP")
            }
            AutoHook::NotANic { interface, kind } => {
                write!(f, "auto chose tc because {interface} is {kind}")
            }
            AutoHook::NoNativeXdp(why) => write!(f, "auto chose tc because {why}"),
            AutoHook::TcThere(interface) => write!(
                f,
                "auto chose tc because {interface} carries tc for another service"
            ),
            AutoHook::RoutedOffXdp { backend, via } => write!(
                f,
                "auto chose tc because backend {backend} is routed out of {via}, where XDP \
                 cannot send (it sends only out of the service's interfaces)"
            ),
        }
    }
}

/// The hook `auto` tries first for a service whose interfaces (its `interface` first) are of
/// the kinds `kinds`, given how each is attached already (`has`) and the first backend routed
/// out of a device XDP cannot send to, if any (`off_xdp`, see [`backend_off_xdp`]): native
/// XDP only when every one is a NIC, none carries tc and no backend is routed elsewhere,
/// else tc. Pure: the kinds and routes are read by the caller.
///
/// Returns the hook to ask the plane for and why.
pub fn auto_hook(
    kinds: &[(String, InterfaceKind)],
    has: impl Fn(&str) -> Option<AttachMode>,
    off_xdp: Option<(std::net::SocketAddr, String)>,
) -> (HookRequest, AutoHook) {
    if let Some((name, _)) = kinds
        .iter()
        .find(|(name, _)| has(name).is_some_and(AttachMode::is_tc))
    {
        return (HookRequest::Tc, AutoHook::TcThere(name.clone()));
    }
    match kinds.iter().find(|(_, kind)| !kind.is_nic()) {
        Some((interface, kind)) => (
            HookRequest::Tc,
            AutoHook::NotANic {
                interface: interface.clone(),
                kind: kind.clone(),
            },
        ),
        None => match off_xdp {
            Some((backend, via)) => (HookRequest::Tc, AutoHook::RoutedOffXdp { backend, via }),
            None => (
                HookRequest::Xdp {
                    allow_generic: false,
                },
                AutoHook::AllNics,
            ),
        },
    }
}

/// Why a service does not run on the eBPF data plane.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotOnXdp {
    /// `dataplane = "proxy"`.
    #[error("configured (dataplane = \"proxy\")")]
    Configured,
    /// No `interface`: the eBPF program has nowhere to attach.
    #[error(
        "no `interface` is configured, so the eBPF data plane has nowhere to attach (set \
         `interface` and `local_address` to use it)"
    )]
    NoInterface,
    /// A setting only the proxy runs (see [`ProxyOnly`]).
    #[error(transparent)]
    ProxyOnly(#[from] ProxyOnly),
    /// `interface` is the loopback device.
    #[error(
        "interface {0} is the loopback device: local traffic never crosses an XDP or tc hook \
         the way a client's packets do"
    )]
    LoopbackInterface(String),
    /// An interface of the service (`interface` or one of `backend_interfaces`) carries no
    /// Ethernet frames (tun, WireGuard, an IP tunnel): the eBPF programs parse an Ethernet
    /// header first, so every packet of the VIP would be misread and the VIP would be dead.
    #[error(
        "interface {interface} is {kind}: the eBPF data plane reads Ethernet frames, which it \
         does not carry"
    )]
    NotEthernet {
        /// The interface.
        interface: String,
        /// What it is.
        kind: InterfaceKind,
    },
    /// Forwarding is off on an interface the eBPF plane takes packets in on (`interface`;
    /// in `nat` mode the backends' replies come in on `backend_interfaces` too): its route
    /// lookups would fail and every packet of the VIP would be dropped.
    #[error(
        "forwarding is off on {interface} ({key} = 0): the eBPF data plane forwards by the \
         kernel's routes, which it refuses while forwarding is off (turn it on: sysctl -w \
         {key}=1, or net.ipv4.ip_forward=1 / net.ipv6.conf.all.forwarding=1 for every \
         interface)"
    )]
    ForwardingOff {
        /// The interface.
        interface: String,
        /// The sysctl that turns it on.
        key: String,
    },
    /// Whether the kernel forwards on an interface cannot be read (`/proc/sys/net` hidden,
    /// e.g. by systemd's `ProcSubset=pid`): `auto` does not bet the VIP on it.
    #[error(
        "whether the kernel forwards on {interface} cannot be read ({key}: {error}), and the \
         eBPF data plane drops every packet where it does not"
    )]
    ForwardingUnknown {
        /// The interface.
        interface: String,
        /// The sysctl.
        key: String,
        /// Why it could not be read.
        error: String,
    },
    /// `nat`: the kernel routes a backend out of an interface the program would not be on
    /// (neither `interface` nor one of `backend_interfaces`). The translated packets would
    /// still leave, but the backend's replies would come in there and meet the host's stack,
    /// which answers them with resets: every flow to that backend would fail.
    #[error(
        "backend {backend} is reached through {via}, which is not the service's interface or \
         one of its backend_interfaces: its replies would come in where the eBPF program is \
         not (add {via} to backend_interfaces)"
    )]
    BackendElsewhere {
        /// The backend.
        backend: std::net::SocketAddr,
        /// The interface the route to it names.
        via: String,
    },
    /// A service at the XDP hook, and a backend routed out of a device that `lb_xdp` cannot
    /// send to: it sends only out of the interfaces it is attached to, and would drop every
    /// packet of that backend's flows.
    #[error(
        "backend {backend} is routed out of {via}, where the XDP program cannot send (it \
         sends only out of the service's interfaces; a service on tc can)"
    )]
    BackendOffXdp {
        /// The backend.
        backend: std::net::SocketAddr,
        /// The device its route leaves by.
        via: String,
    },
    /// A backend's address is this host's own: the eBPF plane forwards packets out of
    /// interfaces, and the host's own sockets are behind none.
    #[error(
        "backend {0} is an address of this host: the eBPF data plane forwards packets out of \
         interfaces, and this host's sockets are behind none"
    )]
    BackendLocal(std::net::SocketAddr),
    /// The eBPF plane was tried and failed: its reason (no BPF object, no `lb_tc` in it, no
    /// such interface, an interface carrying the other hook, an attach or map error, no free
    /// ids...).
    #[error("{0}")]
    Failed(String),
}

/// Why a service could not be placed on any plane. Nothing of it is left running.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// `dataplane = "xdp"` or `"tc"` and the eBPF plane cannot carry the service at that
    /// hook.
    #[error("service {service}: dataplane = \"{dataplane}\" but it is not possible: {reason}")]
    XdpImpossible {
        /// The service's name.
        service: String,
        /// `xdp` or `tc`.
        dataplane: DataplaneKind,
        /// Why not.
        reason: NotOnXdp,
    },
    /// The proxy could not take the service (its address is in use...).
    #[error("service `{service}`: {source}")]
    Proxy {
        /// The service's name.
        service: String,
        /// What the proxy said.
        source: ProxyError,
    },
    /// The daemon is stopping: no service is placed any more.
    #[error("service `{0}`: the daemon is stopping")]
    Stopping(String),
}

/// Why `service` cannot run on the eBPF data plane (XDP or tc) whatever the kernel offers,
/// or `None` if it may try.
pub fn why_not_xdp(service: &Service) -> Option<NotOnXdp> {
    if service.dataplane == DataplaneKind::Proxy {
        return Some(NotOnXdp::Configured);
    }
    let Some(interface) = &service.xdp.interface else {
        return Some(NotOnXdp::NoInterface);
    };
    if let Some(setting) = service.proxy_only() {
        Some(setting.into())
    } else if loader::is_loopback(interface) {
        Some(NotOnXdp::LoopbackInterface(interface.clone()))
    } else {
        without_ethernet(service)
    }
}

/// The first interface the eBPF plane would take `service`'s packets in on (`interface`;
/// in `nat` mode `backend_interfaces` too, where the replies come in) on which the kernel does
/// not forward the VIP's address family, or cannot be shown to, as the reason the service
/// cannot run on eBPF.
fn forwarding_off(service: &Service) -> Option<NotOnXdp> {
    let ipv6 = service.listen.is_ipv6();
    let replies_here = service.xdp.forwarding == crate::config::Forwarding::Nat;
    service
        .xdp
        .interface
        .iter()
        .chain(
            service
                .xdp
                .backend_interfaces
                .iter()
                .filter(|_| replies_here),
        )
        .find_map(|name| {
            use crate::dataplane::xdp::ip_forwarding::{check, NotForwarding};
            check(name, ipv6).map(|not| match not {
                NotForwarding::Off { key } => NotOnXdp::ForwardingOff {
                    interface: name.clone(),
                    key,
                },
                NotForwarding::Unreadable { key, error } => NotOnXdp::ForwardingUnknown {
                    interface: name.clone(),
                    key,
                    error,
                },
            })
        })
}

/// In `nat` mode, the first of `backends` whose replies would miss the program
/// (`routes::ReplyPaths::verdict`: its route, from the service's first local address of its
/// family, leaves by an interface where the program would not see them, or it is an address
/// of this host), as the reason the service cannot run on eBPF. Where it cannot be told (no
/// route, the kernel cannot be asked, a listed interface in a VRF) the backend passes; a
/// service one of whose interfaces does not exist is left to the placement (which says
/// so). Read when a service is placed and when a reload gives a running one new backends
/// (`crate::reload`); backends a DNS name brings later are left out of the table instead
/// (`ServiceSlot` in `dataplane/xdp/maps.rs`).
pub fn backends_elsewhere(
    service: &Service,
    backends: impl IntoIterator<Item = std::net::SocketAddr>,
) -> Option<NotOnXdp> {
    use crate::dataplane::xdp::routes::{Miss, ReplyPaths, Verdict};
    if service.xdp.forwarding != Forwarding::Nat {
        return None;
    }
    // A missing interface is the placement's reason to give, not a backend's.
    let paths = ReplyPaths::of(
        (service.xdp.interface.iter()).chain(service.xdp.backend_interfaces.iter()),
    )?;
    backends.into_iter().find_map(|backend| {
        match paths.verdict(backend.ip(), &service.xdp.local_addresses) {
            Verdict::Miss(Miss::Local) => Some(NotOnXdp::BackendLocal(backend)),
            Verdict::Miss(Miss::Elsewhere(via)) => {
                Some(NotOnXdp::BackendElsewhere { backend, via })
            }
            // `verdict` does not answer it: the hook's own check does (`backends_off_xdp`).
            Verdict::Miss(Miss::OffXdp(via)) => Some(NotOnXdp::BackendOffXdp { backend, via }),
            Verdict::Reach | Verdict::Unknown => None,
        }
    })
}

/// The first of `service`'s interfaces (`interface`, then `backend_interfaces`) that carries
/// no Ethernet frames, as the reason the service cannot run on eBPF. An interface whose kind
/// cannot be read is left to the placement, which names the error.
fn without_ethernet(service: &Service) -> Option<NotOnXdp> {
    service
        .xdp
        .interface
        .iter()
        .chain(service.xdp.backend_interfaces.iter())
        .find_map(|name| match iface_kind::kind_of(name) {
            Ok(kind @ InterfaceKind::NotEthernet { .. }) => Some(NotOnXdp::NotEthernet {
                interface: name.clone(),
                kind,
            }),
            _ => None,
        })
}

/// The data planes of the daemon: the proxy (started with the daemon, with no service) and
/// the eBPF plane, `XdpPlane` for both hooks (loaded when a service first needs it). Each is
/// taken out at shutdown.
pub struct Planes {
    proxy: Mutex<Option<Proxy>>,
    /// The eBPF data plane (XDP and tc hooks), when a service needed it; taken out at
    /// shutdown.
    xdp: Mutex<Option<XdpPlane>>,
    /// Reads the XDP counters without the `xdp` lock, which placing a service holds (attach,
    /// first table write): `/status` does not wait for that.
    xdp_reader: Mutex<Option<CountersReader>>,
    /// Why the XDP plane could not be loaded, during one batch of placements (a start or a
    /// reload): the next service of the batch is not made to wait for a second failing load
    /// (the verifier takes seconds). Cleared by [`Planes::begin_batch`].
    xdp_load_failed: Mutex<Option<String>>,
    /// Set when the daemon begins to stop: nothing is placed any more (an XDP plane loaded
    /// then would stay attached with nobody to detach it).
    stopping: AtomicBool,
    /// The node announces its VIPs (`[announce]`, which only a restart changes): eBPF
    /// services drop a SYN that finds no backend instead of refusing it
    /// ([`Planes::set_announced`]).
    announced: AtomicBool,
}

impl Planes {
    /// The planes of a daemon whose proxy is `proxy` and which has no XDP plane yet.
    pub fn new(proxy: Proxy) -> Planes {
        Planes {
            proxy: Mutex::new(Some(proxy)),
            xdp: Mutex::new(None),
            xdp_reader: Mutex::new(None),
            xdp_load_failed: Mutex::new(None),
            stopping: AtomicBool::new(false),
            announced: AtomicBool::new(false),
        }
    }

    /// Whether the node announces its VIPs (`[announce]` is set): call before the first
    /// service is placed. Services then drop a SYN that finds no backend (eBPF services in the
    /// program, proxied ones at their listeners), where a node alone refuses it at once:
    /// among announcing nodes, one whose last backend went down withdraws the VIP, and the
    /// client's resent SYN reaches another node.
    pub fn set_announced(&self, on: bool) {
        self.announced.store(on, Ordering::SeqCst);
        if let Some(proxy) = lock(&self.proxy).as_ref() {
            proxy.set_announced(on);
        }
    }

    /// Starts a batch of placements (a start or a reload): an XDP plane that failed to load
    /// in an earlier batch is tried again.
    pub fn begin_batch(&self) {
        *lock(&self.xdp_load_failed) = None;
    }

    /// Decides where `service` runs and starts it there, from `handle`'s current snapshot;
    /// logs the decision (`service NAME: listening on VIP/PROTO with the PLACEMENT, ...`) and,
    /// for an `auto` service that the eBPF plane could not take, a warning with the reason;
    /// for one on the eBPF plane without active checks, [`warn_if_unchecked_on_ebpf`]'s.
    ///
    /// Returns the placement; `Err(PlaceError::XdpImpossible)` for an `xdp` or `tc` service
    /// the eBPF plane cannot carry at that hook, `Err(PlaceError::Proxy)` when the proxy cannot take it (a listen
    /// address in use), `Err(PlaceError::Stopping)` once [`Planes::stop_placing`] was called.
    /// Blocks while the proxy's workers pick the service up and while XDP attaches and writes
    /// the first table: call it from a blocking context.
    pub fn place(
        &self,
        global: &Global,
        service: &Service,
        handle: &ServiceHandle,
    ) -> Result<Placement, PlaceError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(PlaceError::Stopping(service.name.clone()));
        }
        // The host's forwarding is read when a service is placed, not when a reload checks
        // a running one: turning it off later is not a reason to move a running service.
        let tried = match why_not_xdp(service)
            .or_else(|| forwarding_off(service))
            // The configured addresses only: backends a DNS name gives are left out of the
            // table one by one (`ServiceSlot`), whenever their answers come.
            .or_else(|| backends_elsewhere(service, service.backends.iter().map(|b| b.address)))
        {
            Some(reason) => Err(reason),
            None => self.place_on_xdp(global, service, handle),
        };
        let placement = match tried {
            Ok((carried, why)) => Placement::Ebpf { carried, why },
            Err(reason) if service.dataplane.forces_ebpf() => {
                return Err(PlaceError::XdpImpossible {
                    service: service.name.clone(),
                    dataplane: service.dataplane,
                    reason,
                });
            }
            Err(reason) => {
                if let NotOnXdp::Failed(why) = &reason {
                    warn!(
                        "service {}: the eBPF data plane is not possible, starting it on the \
                         proxy: {why}",
                        service.name
                    );
                }
                if let Err(e) = self.place_on_proxy(service, handle) {
                    // Else the refusal names only the proxy's trouble (a VIP that is no
                    // address of this host cannot be bound), not why the proxy was chosen.
                    if !matches!(reason, NotOnXdp::Configured | NotOnXdp::Failed(_)) {
                        error!(
                            "service {}: the eBPF data plane cannot carry it ({reason}), and \
                             the proxy cannot take it: {e}",
                            service.name
                        );
                    }
                    return Err(e);
                }
                Placement::Proxy { reason }
            }
        };
        info!(
            "service {}: listening on {}/{} with the {placement}, scheduler {}, {} configured \
             backends",
            service.name,
            service.listen,
            service.protocol,
            service.scheduler,
            service.backends.len()
        );
        if placement.on_xdp() {
            warn_if_unchecked_on_ebpf(service);
        }
        Ok(placement)
    }

    /// Places `service` on the eBPF plane at the hook its `dataplane` names, or for `auto`
    /// the one [`auto_hook`] chooses, falling back from native XDP to tc when XDP does not
    /// attach. Returns where it runs and, for `auto`, why that hook.
    fn place_on_xdp(
        &self,
        global: &Global,
        service: &Service,
        handle: &ServiceHandle,
    ) -> Result<(XdpAttachment, Option<AutoHook>), NotOnXdp> {
        let failed = |e: XdpPlaneError| NotOnXdp::Failed(e.to_string());
        let with = |hook| XdpService {
            table_size: service.table_size,
            xdp: service.xdp.clone(),
            hook,
            announced: self.announced.load(Ordering::SeqCst),
            configured: service.backends.iter().map(|b| b.address).collect(),
        };
        let fixed = match service.dataplane {
            DataplaneKind::Xdp => Some(HookRequest::Xdp {
                allow_generic: true,
            }),
            DataplaneKind::Tc => Some(HookRequest::Tc),
            DataplaneKind::Auto | DataplaneKind::Proxy => None,
        };
        if let Some(hook) = fixed {
            return self
                .with_xdp_loaded(global, |x| x.add(handle, &with(hook)))?
                .map(|carried| (carried, None))
                .map_err(failed);
        }
        let kinds = interface_kinds(service)?;
        // Asked of the kernel before the plane's lock, and only where XDP may be chosen.
        let off_xdp = (kinds.iter().all(|(_, kind)| kind.is_nic()))
            .then(|| backend_off_xdp(service))
            .flatten();
        self.with_xdp_loaded(global, |x| {
            let (hook, why) = auto_hook(&kinds, |name| x.hook_on(name), off_xdp);
            match x.add(handle, &with(hook)) {
                Ok(carried) => Ok((carried, Some(why))),
                // Native XDP did not attach (or lb_xdp did not load): the attach left
                // nothing behind, so tc may take the same interfaces.
                Err(
                    e @ (XdpPlaneError::Loader(_)
                    | XdpPlaneError::Load(_)
                    | XdpPlaneError::CannotForward { .. }),
                ) if hook != HookRequest::Tc => {
                    let why = AutoHook::NoNativeXdp(native_failure(&e));
                    x.add(handle, &with(HookRequest::Tc))
                        .map(|carried| (carried, Some(why)))
                        .map_err(failed)
                }
                Err(e) => Err(failed(e)),
            }
        })?
    }

    fn place_on_proxy(&self, service: &Service, handle: &ServiceHandle) -> Result<(), PlaceError> {
        let added = match lock(&self.proxy).as_mut() {
            Some(p) => Dataplane::add(p, handle, &()).map(drop),
            None => Err(ProxyError::Stopped(handle.index)),
        };
        added.map_err(|source| PlaceError::Proxy {
            service: service.name.clone(),
            source,
        })
    }

    /// Runs `f` on the XDP plane, loading it first when none runs yet. `Err` is why it could
    /// not be loaded (remembered for the rest of the batch).
    fn with_xdp_loaded<T>(
        &self,
        global: &Global,
        f: impl FnOnce(&mut XdpPlane) -> T,
    ) -> Result<T, NotOnXdp> {
        if let Some(why) = lock(&self.xdp_load_failed).clone() {
            return Err(NotOnXdp::Failed(why));
        }
        // Loaded (and verified by the kernel, a matter of seconds for a big program) without
        // the lock, so counter reads go on. Placements are serialised (reloads hold their
        // guard), so no other plane appears meanwhile; if one did, it stays and this one is
        // dropped.
        let loaded = if lock(&self.xdp).is_none() {
            let start = XdpStart {
                bpf_object: global.bpf_object.clone(),
                drain_timeout: global.drain_timeout,
                bpf_pin_dir: global.bpf_pin_dir.clone(),
            };
            match XdpPlane::start(start) {
                Ok(plane) => Some(plane),
                Err(e) => {
                    let why = e.to_string();
                    *lock(&self.xdp_load_failed) = Some(why.clone());
                    return Err(NotOnXdp::Failed(why));
                }
            }
        } else {
            None
        };
        let mut slot = lock(&self.xdp);
        if let (Some(plane), None) = (loaded, slot.as_ref()) {
            *lock(&self.xdp_reader) = Some(plane.counters_reader());
            *slot = Some(plane);
        }
        let plane = slot
            .as_mut()
            .ok_or_else(|| NotOnXdp::Failed("the eBPF plane is stopped".into()))?;
        Ok(f(plane))
    }

    /// Stops new flows of service `index` on the plane `placement` names; open flows go on
    /// for at most `drain_timeout`. `address_moves`: a service added next takes its address:
    /// XDP lets go of the VIP at once, cutting its pinned flows (see [`XdpPlane::remove`];
    /// for a proxy service taking it); the proxy keeps the TCP listeners open for it to take
    /// (see [`Proxy::remove_service_keeping_listeners`]; [`Planes::close_kept`] closes what
    /// no service took).
    pub fn remove(
        &self,
        placement: &Placement,
        index: usize,
        drain_timeout: Duration,
        address_moves: bool,
    ) {
        match placement {
            Placement::Ebpf { .. } => {
                if let Some(x) = lock(&self.xdp).as_mut() {
                    Dataplane::remove(x, index, drain_timeout, address_moves);
                }
            }
            Placement::Proxy { .. } => {
                if let Some(p) = lock(&self.proxy).as_mut() {
                    Dataplane::remove(p, index, drain_timeout, address_moves);
                }
            }
        }
    }

    /// Closes the proxy listeners kept open by a removal whose address moves (see
    /// [`Planes::remove`]) that no service took: call once the reload that removed them
    /// added its services.
    pub fn close_kept(&self) {
        if let Some(p) = lock(&self.proxy).as_ref() {
            p.close_kept();
        }
    }

    /// Sets how long XDP backends and services removed from now on keep their ids.
    pub fn set_drain_timeout(&self, drain_timeout: Duration) {
        if let Some(x) = lock(&self.xdp).as_ref() {
            x.set_drain_timeout(drain_timeout);
        }
    }

    /// Whether an XDP plane is loaded.
    pub fn has_xdp(&self) -> bool {
        lock(&self.xdp).is_some()
    }

    /// The XDP program's counters now; `None` when no XDP plane is loaded, `Err` when a map
    /// cannot be read. Does not wait for a placement in progress.
    pub fn xdp_counters(&self) -> Option<Result<XdpCounters, MapsError>> {
        let reader = lock(&self.xdp_reader).clone();
        reader.map(|r| {
            if crate::watchdog::fault("xdp-counters-unreadable") {
                return Err(MapsError::Cpus(
                    "injected by LB_FAULT=xdp-counters-unreadable".into(),
                ));
            }
            r.read()
        })
    }

    /// Whether eBPF service `index`'s table has no backend (see
    /// `CountersReader::table_empty`); `None` when no eBPF plane carries it or it is busy.
    pub fn ebpf_table_empty(&self, index: usize) -> Option<bool> {
        let reader = lock(&self.xdp_reader).clone();
        reader.and_then(|r| r.table_empty(index))
    }

    /// Runs `f` on the proxy; `None` once it was taken for shutdown.
    pub fn with_proxy<T>(&self, f: impl FnOnce(&Proxy) -> T) -> Option<T> {
        lock(&self.proxy).as_ref().map(f)
    }

    /// Refuses every placement from now on (the daemon is stopping).
    pub fn stop_placing(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether [`Planes::stop_placing`] was called.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Takes the proxy out for shutdown; later calls get `None`.
    pub fn take_proxy(&self) -> Option<Proxy> {
        lock(&self.proxy).take()
    }

    /// Whether the eBPF plane adopted a pinned set not settled yet ([`XdpPlane::adopting`]).
    pub fn adopting(&self) -> bool {
        lock(&self.xdp).as_ref().is_some_and(XdpPlane::adopting)
    }

    /// Ends the adoption of a pinned eBPF set once the first config is placed (see
    /// [`XdpPlane::settle_adoption`]; `proxied`: the listen addresses of the services on the
    /// proxy); `false` when no eBPF plane runs.
    pub fn settle_adoption(&self, proxied: &[(std::net::SocketAddr, Protocol)]) -> bool {
        match lock(&self.xdp).as_mut() {
            Some(x) => {
                x.settle_adoption(proxied);
                true
            }
            None => false,
        }
    }

    /// Attaches the eBPF program again to interfaces deleted and made again under their
    /// names (see [`XdpPlane::follow_interfaces`]); nothing when no eBPF plane runs or the
    /// daemon stops placing. Waits for a placement that holds the plane. Blocks: call it
    /// from a blocking context.
    pub fn follow_interfaces(&self) {
        // A daemon on its way out (an upgrade's successor may be attaching) leaves them be.
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        if let Some(x) = lock(&self.xdp).as_mut() {
            x.follow_interfaces();
        }
    }

    /// Takes the XDP plane out for shutdown; later calls get `None`.
    pub fn take_xdp(&self) -> Option<XdpPlane> {
        *lock(&self.xdp_reader) = None;
        lock(&self.xdp).take()
    }
}

/// The kind of each of `service`'s interfaces (`interface` first, then
/// `backend_interfaces`, each once). `Err` names the first interface that does not exist or
/// cannot be read.
fn interface_kinds(service: &Service) -> Result<Vec<(String, InterfaceKind)>, NotOnXdp> {
    let names = service
        .xdp
        .interface
        .iter()
        .chain(service.xdp.backend_interfaces.iter());
    let mut kinds: Vec<(String, InterfaceKind)> = Vec::new();
    for name in names {
        if kinds.iter().any(|(n, _)| n == name) {
            continue;
        }
        let kind =
            iface_kind::kind_of(name).map_err(|e: KindError| NotOnXdp::Failed(e.to_string()))?;
        kinds.push((name.clone(), kind));
    }
    Ok(kinds)
}

/// The first of `backends` routed out of a device that `lb_xdp` cannot send to
/// ([`routes::off_xdp`](crate::dataplane::xdp::routes::off_xdp)), as the reason a service at
/// the XDP hook cannot take it; `None` when every route leaves by one of `service`'s
/// interfaces or cannot be told. One route lookup per backend. Read when a reload gives a
/// running XDP service new backends (`crate::reload`).
pub fn backends_off_xdp(
    service: &Service,
    backends: impl IntoIterator<Item = std::net::SocketAddr>,
) -> Option<NotOnXdp> {
    use crate::dataplane::xdp::routes;
    let attached = attached_indexes(service);
    backends.into_iter().find_map(|backend| {
        routes::off_xdp(&attached, backend.ip(), &service.xdp.local_addresses)
            .map(|via| NotOnXdp::BackendOffXdp { backend, via })
    })
}

/// The indexes of `service`'s interfaces that exist.
fn attached_indexes(service: &Service) -> Vec<u32> {
    (service.xdp.interface.iter())
        .chain(&service.xdp.backend_interfaces)
        .filter_map(|name| loader::if_index(name))
        .collect()
}

/// The first configured backend of `service` (not one a DNS name gives: those are left out
/// of the table one by one, whenever their answers come) whose route leaves by a device that
/// `lb_xdp` cannot send to ([`routes::off_xdp`](crate::dataplane::xdp::routes::off_xdp)),
/// with that device; `None` when every route leaves by one of `service`'s interfaces or
/// cannot be told. One route lookup per backend.
fn backend_off_xdp(service: &Service) -> Option<(std::net::SocketAddr, String)> {
    use crate::dataplane::xdp::routes;
    let attached = attached_indexes(service);
    service.backends.iter().find_map(|b| {
        routes::off_xdp(&attached, b.address.ip(), &service.xdp.local_addresses)
            .map(|via| (b.address, via))
    })
}

/// The words for native XDP's failure on a NIC: `native XDP did not attach to eth1 (...)`,
/// without the advice about `dataplane = "xdp"`.
fn native_failure(e: &XdpPlaneError) -> String {
    match e {
        XdpPlaneError::Loader(LoadError::NativeOnly { interface, native }) => {
            format!("native XDP did not attach to {interface} ({native})")
        }
        e @ XdpPlaneError::CannotForward { .. } => e.to_string(),
        other => format!("XDP is not possible: {other}"),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Warns that `service`, on the eBPF data plane, has no active health checks (health kind
/// "none", a UDP service's default): the proxy counts failed connects and ICMP errors as
/// failures, the eBPF plane sees none, so a backend that stops answering keeps its share of
/// flows. Called when the service is placed and when a reload turns its checks off.
pub fn warn_if_unchecked_on_ebpf(service: &Service) {
    if service.health.kind != CheckKind::None {
        return;
    }
    let advice = match (service.protocol, service.xdp.forwarding) {
        (Protocol::Tcp, _) => "kind = \"tcp\"",
        // A DSR backend answers its clients from the VIP, not from the address checked.
        (Protocol::Udp, Forwarding::Dsr) => {
            "kind = \"udp\" (with DSR, each backend must also answer the check on its own \
             address)"
        }
        (Protocol::Udp, _) => "kind = \"udp\"",
    };
    warn!(
        "service {}: no active health checks (health kind \"none\"), and the eBPF data plane \
         sees no failed connects: a backend that stops answering keeps its share of flows. \
         Set [service.health] {advice} to take dead backends out",
        service.name
    );
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

    /// Only `nat` asks where its backends are (DSR replies bypass the balancer), and a
    /// missing interface is left to the placement; `lo` and its address exist on any host.
    #[test]
    fn a_nat_backend_at_an_address_of_this_host_is_a_reason() {
        let on_host: std::net::SocketAddr = "127.0.0.1:80".parse().expect("literal");
        let keys = |interface: &str, forwarding: &str| {
            format!(
                "interface = \"{interface}\"\nlocal_address = \"10.200.0.1\"\n\
                 forwarding = \"{forwarding}\""
            )
        };
        // The route to a backend on this host is asked from an address of the host; the
        // config refuses a loopback `local_address`, so it is set here past the validation.
        let on_loopback = |mut s: Service| {
            s.xdp.local_addresses = vec![on_host.ip()];
            s
        };
        let nat = on_loopback(service("10.200.100.1:80", &keys("lo", "nat")));
        let got = backends_elsewhere(&nat, [on_host]);
        assert_eq!(got, Some(NotOnXdp::BackendLocal(on_host)));
        assert!(got
            .expect("a reason")
            .to_string()
            .contains("127.0.0.1:80 is an address of this host"));
        let dsr = on_loopback(service("10.200.100.1:80", &keys("lo", "dsr")));
        assert_eq!(backends_elsewhere(&dsr, [on_host]), None);
        let missing = on_loopback(service("10.200.100.1:80", &keys("lbt-none0", "nat")));
        assert_eq!(backends_elsewhere(&missing, [on_host]), None);
    }

    #[test]
    fn a_service_with_interface_and_maglev_may_try_xdp() {
        assert_eq!(why_not_xdp(&service("10.200.100.1:80", XDP_KEYS)), None);
    }

    #[test]
    fn limits_run_on_xdp_except_a_udp_session_limit() {
        let limits = "[service.limits]\nmax_connections_per_client = 2\n\
                      new_connections_per_second = 5.0\nburst = 10\n";
        let tcp = service("10.200.100.1:80", &format!("{XDP_KEYS}\n{limits}"));
        assert_eq!(why_not_xdp(&tcp), None, "TCP limits run on XDP");
        let mut udp = tcp.clone();
        udp.protocol = Protocol::Udp;
        let why = why_not_xdp(&udp).map(|r| r.to_string()).unwrap_or_default();
        assert!(
            why.contains("max_connections_per_client of a UDP service"),
            "a UDP session limit on XDP: {why}"
        );
        udp.limits.max_connections = None;
        assert_eq!(why_not_xdp(&udp), None, "a UDP rate limit runs on XDP");
    }

    #[test]
    fn every_reason_not_to_use_xdp_names_itself() {
        let cases = [
            (
                "10.200.100.1:80",
                "dataplane = \"proxy\"".to_string(),
                "configured",
            ),
            ("10.200.100.1:80", String::new(), "no `interface`"),
            (
                "10.200.100.1:80",
                format!("scheduler = \"least_conn\"\n{XDP_KEYS}"),
                "only the `maglev` scheduler",
            ),
            (
                "127.0.0.1:80",
                "interface = \"eth0\"\nlocal_address = \"10.200.0.1\"".to_string(),
                "loopback address",
            ),
            (
                "10.200.100.1:80",
                "interface = \"lo\"\nlocal_address = \"10.200.0.1\"".to_string(),
                "loopback device",
            ),
            (
                "0.0.0.0:80",
                "interface = \"eth0\"\nlocal_address = \"10.200.0.1\"".to_string(),
                "wildcard",
            ),
            (
                "10.200.100.1:80",
                format!("table_size = 65539\n{XDP_KEYS}"),
                "larger than",
            ),
        ];
        for (listen, keys, want) in cases {
            let svc = service(listen, &keys);
            let got = why_not_xdp(&svc).map(|r| r.to_string()).unwrap_or_default();
            assert!(
                got.contains(want),
                "expected a reason with `{want}` for {listen} with {keys:?}, got `{got}`"
            );
        }
    }

    fn nic(driver: &str) -> InterfaceKind {
        InterfaceKind::Nic {
            driver: driver.into(),
        }
    }

    #[test]
    fn auto_takes_native_xdp_only_when_every_interface_is_a_nic() {
        let none = |_: &str| None;
        let kinds = [
            ("eth0".to_string(), nic("ixgbe")),
            ("eth1".into(), nic("mlx5_core")),
        ];
        assert_eq!(
            auto_hook(&kinds, none, None),
            (
                HookRequest::Xdp {
                    allow_generic: false
                },
                AutoHook::AllNics
            )
        );
        for (other, kind) in [
            ("l0", InterfaceKind::Veth),
            ("br0", InterfaceKind::Bridge),
            ("bond0", InterfaceKind::Bond),
            ("eth0.7", InterfaceKind::Vlan),
            ("mv0", InterfaceKind::Macvlan),
            ("d0", InterfaceKind::Dummy),
            ("vx0", InterfaceKind::OtherVirtual("vxlan".into())),
        ] {
            let kinds = [
                ("eth0".to_string(), nic("ixgbe")),
                (other.into(), kind.clone()),
            ];
            let (hook, why) = auto_hook(&kinds, none, None);
            assert_eq!(hook, HookRequest::Tc, "a NIC with {kind} goes on tc");
            assert_eq!(
                why.to_string(),
                format!("auto chose tc because {other} is {kind}")
            );
        }
        let tc_on_eth1 = |n: &str| (n == "eth1").then_some(AttachMode::Tcx);
        let (hook, why) = auto_hook(&kinds, tc_on_eth1, None);
        assert_eq!(hook, HookRequest::Tc, "an interface carries one hook");
        assert_eq!(
            why.to_string(),
            "auto chose tc because eth1 carries tc for another service"
        );
        let xdp_on_eth1 = |n: &str| (n == "eth1").then_some(AttachMode::Native);
        assert!(matches!(
            auto_hook(&kinds, xdp_on_eth1, None).1,
            AutoHook::AllNics
        ));
        // A backend behind a VLAN on eth1: lb_xdp could only drop its packets.
        let backend = "10.0.7.5:80".parse().expect("literal");
        let (hook, why) = auto_hook(&kinds, none, Some((backend, "eth1.7".into())));
        assert_eq!(hook, HookRequest::Tc, "XDP cannot send out of eth1.7");
        assert_eq!(
            why.to_string(),
            "auto chose tc because backend 10.0.7.5:80 is routed out of eth1.7, where XDP \
             cannot send (it sends only out of the service's interfaces)"
        );
    }

    #[test]
    fn a_placement_reads_as_the_log_says_it() {
        let xdp = Placement::Ebpf {
            carried: XdpAttachment {
                forwarding: Forwarding::Nat,
                interfaces: vec![
                    ("l0".into(), AttachMode::Native),
                    ("br0".into(), AttachMode::Generic),
                ],
            },
            why: None,
        };
        assert_eq!(
            xdp.to_string(),
            "eBPF data plane (nat) on l0 (XDP native), br0 (XDP generic)"
        );
        let tc = Placement::Ebpf {
            carried: XdpAttachment {
                forwarding: Forwarding::Dsr,
                interfaces: vec![
                    ("l0".into(), AttachMode::Tcx),
                    ("l1".into(), AttachMode::Clsact),
                ],
            },
            why: Some(AutoHook::NotANic {
                interface: "l0".into(),
                kind: InterfaceKind::Veth,
            }),
        };
        assert_eq!(
            tc.to_string(),
            "eBPF data plane (dsr) on l0 (tc), l1 (tc clsact): auto chose tc because l0 is a veth"
        );
        let proxy = Placement::Proxy {
            reason: NotOnXdp::Configured,
        };
        assert_eq!(
            proxy.to_string(),
            "proxy data plane (configured (dataplane = \"proxy\"))"
        );
    }
}
