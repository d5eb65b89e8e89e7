//! The XDP fast path, daemon side: choosing which services run on it, loading and attaching
//! `lb-ebpf`, keeping its maps in step with the services' snapshots, and detaching on exit.
//!
//! One BPF object serves every XDP service: the balancer program `lb_xdp` is attached once to
//! each interface any XDP service names (`interface` and `backend_interfaces`), and the maps
//! are shared, one service id and one backend id range per service. See `lb_common::maps` for
//! the map contract and `docs/ARCHITECTURE.md` for the behaviour.

pub mod counters;
pub mod decap;
pub mod limits;
pub mod loader;
pub mod maps;
mod sync;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use aya::Ebpf;
use lb_common::maps::{MAX_BACKENDS, MAX_SERVICES, MAX_TABLE_SIZE, PROG_BALANCER};
use tracing::{info, warn};

use crate::config::{
    DataplaneKind, Forwarding, Global, Protocol, ProxyProtocol, SchedulerKind, Service,
};
use crate::service::ServiceRuntime;

pub use counters::{BackendCounters, ServiceCounters, XdpCounters};
pub use loader::{AttachMode, LoadError};
pub use maps::{Maps, MapsError, ServiceSlot};

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
/// maps, and the thread that republishes snapshots into them.
pub struct XdpPlane {
    // Dropping the object closes the links: the kernel detaches the programs.
    ebpf: Option<Ebpf>,
    maps: Arc<Mutex<Maps>>,
    services: Vec<(Arc<ServiceRuntime>, Arc<Mutex<ServiceSlot>>)>,
    interfaces: Vec<(String, AttachMode)>,
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
        let refuse = |s: &Service, reason: String| -> Result<Placement, XdpError> {
            if s.dataplane == DataplaneKind::Xdp {
                Err(XdpError {
                    service: s.name.clone(),
                    reason,
                })
            } else {
                Ok(Placement::Proxy { reason })
            }
        };
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

        let loaded = load_balancer(global.bpf_object.as_deref());
        let (mut ebpf, mut maps, path) = match loaded {
            Ok(l) => l,
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
        info!("XDP: loaded {}", path.display());

        let mut attached: BTreeMap<String, AttachMode> = BTreeMap::new();
        let mut slots = Vec::new();
        let mut next_backend: u32 = 0;
        for &i in &wanted {
            let s = services[i].config();
            let result = place(
                &mut ebpf,
                &mut maps,
                &mut attached,
                &services[i],
                slots.len() as u32,
                &mut next_backend,
            );
            match result {
                Ok((slot, interfaces)) => {
                    placements[i] = Some(Placement::Xdp {
                        forwarding: s.xdp.forwarding,
                        interfaces,
                    });
                    slots.push((Arc::clone(&services[i]), Arc::new(Mutex::new(slot))));
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
        if slots.is_empty() {
            // Dropping the object detaches whatever was attached on the way.
            return Ok((None, finish(placements)));
        }
        let maps = Arc::new(Mutex::new(maps));
        let sync = sync::SyncThread::start(Arc::clone(&maps), slots.clone());
        Ok((
            Some(XdpPlane {
                ebpf: Some(ebpf),
                maps,
                services: slots,
                interfaces: attached.into_iter().collect(),
                sync: Some(sync),
            }),
            finish(placements),
        ))
    }

    /// The program's counters now: global, per service and per backend (summed over CPUs).
    ///
    /// Returns `Err(MapsError::Io)` when a map cannot be read.
    pub fn counters(&self) -> Result<XdpCounters, MapsError> {
        // Slots before maps: the sync thread takes them in that order too.
        let slots: Vec<(Arc<ServiceRuntime>, ServiceSlot)> = self
            .services
            .iter()
            .map(|(rt, slot)| (Arc::clone(rt), lock(slot).clone()))
            .collect();
        let maps = lock(&self.maps);
        counters::read(&maps, &slots)
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
            for (interface, mode) in &self.interfaces {
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
fn load_balancer(configured: Option<&std::path::Path>) -> Result<(Ebpf, Maps, PathBuf), String> {
    let path = loader::find_object(configured).map_err(|e| e.to_string())?;
    let mut ebpf = loader::load_object(&path, &[]).map_err(|e| loader::error_chain(&e))?;
    loader::load_program(&mut ebpf, &path, PROG_BALANCER).map_err(|e| loader::error_chain(&e))?;
    let maps = Maps::take(&mut ebpf).map_err(|e| e.to_string())?;
    Ok((ebpf, maps, path))
}

/// Attaches the program where `rt`'s service needs it, gives the service its ids and writes
/// its first snapshot. `Err` is the reason, in words.
fn place(
    ebpf: &mut Ebpf,
    maps: &mut Maps,
    attached: &mut BTreeMap<String, AttachMode>,
    rt: &Arc<ServiceRuntime>,
    id: u32,
    next_backend: &mut u32,
) -> Result<(ServiceSlot, Vec<(String, AttachMode)>), String> {
    let s = rt.config();
    if id >= MAX_SERVICES {
        return Err(format!(
            "the XDP maps hold {MAX_SERVICES} services and as many run on XDP already"
        ));
    }
    let n = s.backends.len() as u32;
    if *next_backend + n > MAX_BACKENDS {
        return Err(format!(
            "the XDP maps hold {MAX_BACKENDS} backends over all services, and this service's {n} do not fit"
        ));
    }
    let (Some(interface), Some(local_address)) = (&s.xdp.interface, s.xdp.local_address) else {
        return Err("no `interface` or `local_address`".into());
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
    let mut interfaces = Vec::new();
    for (name, ifindex) in wanted.iter().zip(ifindexes) {
        let mode = match attached.get(name) {
            Some(&mode) => mode,
            None => {
                // Redirects into the interface are allowed first: an interface in `attached`
                // is one other services can redirect to as well.
                maps.allow_redirect(ifindex).map_err(|e| e.to_string())?;
                let prog = program(ebpf)?;
                let mode = loader::attach(prog, name).map_err(|e| e.to_string())?;
                attached.insert(name.clone(), mode);
                info!("XDP: {PROG_BALANCER} attached to {name} ({mode} mode)");
                mode
            }
        };
        interfaces.push((name.clone(), mode));
    }
    let backend_ids: Vec<u32> = (*next_backend..*next_backend + n).collect();
    let mut slot = ServiceSlot {
        id,
        backend_ids,
        table_size: s.table_size,
        vip: s.listen,
        protocol: s.protocol,
        forwarding: s.xdp.forwarding,
        local_address,
        snat_ports: s.xdp.snat_ports,
        active_half: 0,
        table_size_live: 0,
        vip_published: false,
        halves: [None, None],
        generation: 0,
        failed_generation: None,
    };
    let snap = rt.snapshot().load_full();
    maps.publish(&mut slot, &snap).map_err(|e| e.to_string())?;
    *next_backend += n;
    Ok((slot, interfaces))
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
