//! `lb-daemon decap --iface IF --from ADDR...`: runs the DSR decapsulator `lb_decap` on a
//! backend host.
//!
//! The balancer's `dsr` services send each client packet to the backend inside an IPIP
//! (IPv4) or IP6IP6 header. The kernel here has no tunnel modules, so `lb_decap` strips that
//! header in XDP and passes the client's original packet to the stack; the backend, with the
//! VIP on its loopback, answers the client directly. Packets that are not encapsulated pass
//! untouched, so the program is also a harmless "pass" program where one is needed (a veth
//! only delivers `XDP_REDIRECT`ed frames when its peer has an XDP program).
//!
//! Only packets whose outer destination is one of IF's addresses are decapsulated: a tunnel
//! that ends on another host and is routed through this one passes untouched (counted as
//! `decap_not_local`). The addresses go into `DECAP_ADDRS` at start and are read again every
//! [`REFRESH_EVERY`], so an address added to or removed from IF takes effect within that.
//!
//! Only tunnels whose outer source is one of the `--from` addresses (the balancers'
//! `local_address`es, in `DECAP_SOURCES`) are stripped; a tunnel for this host from anyone
//! else is dropped (counted as `decap_bad_source`), since its inner packet could carry any
//! source address past the backend's filters.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use aya::maps::{HashMap, MapData};
use lb_common::maps::{
    DecapAddr, CLIENTS, CONNTRACK, DECAP_ADDRS, DECAP_ADDRS_SIZE, DECAP_SOURCES,
    DECAP_SOURCES_SIZE, NAT_REVERSE, PROG_DECAP, PROG_DECAP_TC, TABLES,
};
use lb_common::Stat;
use nix::sys::signal::{SigSet, Signal};
use tracing::{info, warn};

use super::loader::{self, LoadError};

/// `DECAP_ADDRS` (address -> ifindex) and `DECAP_SOURCES` (address -> 0).
type DecapMap = HashMap<MapData, DecapAddr, u32>;

/// How often the host's addresses are read again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// Why `lb-daemon decap` could not run.
#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    /// The object could not be found or loaded, or XDP could not attach.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The object has no usable `DECAP_ADDRS` or `DECAP_SOURCES`: not the lb-ebpf this
    /// daemon was built with.
    #[error("the BPF object has no usable map {name}: {reason}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// What aya reported.
        reason: String,
    },
    /// No `--from` address, or more than `DECAP_SOURCES` holds.
    #[error(
        "give the balancers' local_address(es) with --from (1 to {DECAP_SOURCES_SIZE}): \
         lb_decap strips only tunnels from them; {0} given"
    )]
    Sources(usize),
    /// The host's addresses could not be read or written into the map.
    #[error("cannot give lb_decap the addresses of {interface}: {reason}")]
    Addresses {
        /// The interface.
        interface: String,
        /// What failed.
        reason: String,
    },
}

/// The hook the decapsulator runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapHook {
    /// `lb_decap` at XDP (native, else generic with a warning): for a NIC.
    Xdp,
    /// `lb_decap_tc` at tc ingress (TCX, else clsact): for a veth or a bridge port, where an
    /// XDP program would take GSO from the interface's peer.
    Tc,
}

/// Attaches the decapsulator at `hook` on `interface` (XDP: `lb_decap`, native mode, else
/// generic with a warning; tc: `lb_decap_tc`) with the host's addresses (every interface of its network namespace) as the accepted outer
/// destinations and `from` (the balancers' addresses) as the accepted outer sources, logs
/// `ready`, keeps the host's addresses in step every [`REFRESH_EVERY`], and waits for SIGTERM
/// or SIGINT; then logs its counters and detaches.
///
/// `object`: the BPF object, or `None` for the default search ([`loader::candidates`]).
/// Returns `Err(DecapError)` when `from` is empty or too long, the object cannot be found or
/// loaded, XDP cannot attach, or the addresses cannot be read or written at start (later
/// failures are logged and retried).
pub fn run(
    interface: &str,
    hook: DecapHook,
    object: Option<&Path>,
    from: &[IpAddr],
) -> Result<(), DecapError> {
    let from: BTreeSet<IpAddr> = from.iter().copied().collect();
    if from.is_empty() || from.len() > DECAP_SOURCES_SIZE as usize {
        return Err(DecapError::Sources(from.len()));
    }
    let signals = block_signals();
    let path = loader::find_object(object)?;
    // The decapsulator uses none of the balancer's big maps: make them one entry each.
    let mut ebpf = loader::load_object(&path, &[TABLES, CONNTRACK, NAT_REVERSE, CLIENTS], &[])?;
    // Before the attach, so no encapsulated packet for this host passes undecapsulated.
    // `sources` is out of the object: it must stay open until the detach, as the program
    // refers to it.
    let (sources, local) = fill_maps(&mut ebpf, interface, &from)?;
    let (name, mode) = match hook {
        DecapHook::Xdp => {
            let prog = loader::load_program(&mut ebpf, &path, PROG_DECAP)?;
            (PROG_DECAP, loader::attach(prog, interface, true)?.0)
        }
        DecapHook::Tc => {
            let prog = loader::load_tc_program(&mut ebpf, &path, PROG_DECAP_TC)?;
            (PROG_DECAP_TC, loader::attach_tc(prog, interface)?.mode)
        }
    };
    let balancers: Vec<String> = from.iter().map(IpAddr::to_string).collect();
    info!(
        "ready: {name} decapsulating IPIP/IP6IP6 on {interface} ({mode}) for {} \
         from the balancers {} with {}",
        local.describe(),
        balancers.join(", "),
        path.display()
    );
    let why = refresh_until_signal(local, &signals);
    log_counters(&ebpf, why, interface);
    // Dropping the object detaches the program.
    drop(ebpf);
    drop(sources);
    Ok(())
}

/// Blocks SIGTERM and SIGINT in this thread and returns them, for [`refresh_until_signal`].
///
/// First thing, so one that arrives while attaching is not lost. Threads started later
/// inherit the mask, so only the wait takes them.
fn block_signals() -> SigSet {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        warn!("cannot block SIGTERM/SIGINT ({e}); they will end the process without a detach log");
    }
    signals
}

/// Takes `DECAP_SOURCES` and `DECAP_ADDRS` out of `ebpf`, writes `from` into the first and
/// the host's addresses into the second, and returns both: `DECAP_SOURCES` to keep open until
/// the detach, `DECAP_ADDRS` (with what it holds) for the refresher.
///
/// Returns `Err(DecapError::Map)` when a map is missing or of the wrong type,
/// `Err(DecapError::Addresses)` when the addresses cannot be read or written.
fn fill_maps(
    ebpf: &mut aya::Ebpf,
    interface: &str,
    from: &BTreeSet<IpAddr>,
) -> Result<(DecapMap, LocalAddrs), DecapError> {
    let mut take = |name: &'static str| {
        ebpf.take_map(name)
            .ok_or_else(|| DecapError::Map {
                name,
                reason: "not in the object".into(),
            })
            .and_then(|m| {
                DecapMap::try_from(m).map_err(|e| DecapError::Map {
                    name,
                    reason: e.to_string(),
                })
            })
    };
    let map = take(DECAP_ADDRS)?;
    let mut sources = take(DECAP_SOURCES)?;
    for addr in from {
        sources
            .insert(DecapAddr::new(*addr), 0, 0)
            .map_err(|e| DecapError::Addresses {
                interface: interface.to_string(),
                reason: format!("cannot add the balancer address {addr}: {e}"),
            })?;
    }
    let mut local = LocalAddrs {
        interface: interface.to_string(),
        map,
        written: BTreeSet::new(),
    };
    local.sync().map_err(|reason| DecapError::Addresses {
        interface: interface.to_string(),
        reason,
    })?;
    if local.written.is_empty() {
        warn!(
            "{interface} has no address yet: {PROG_DECAP} decapsulates nothing until it gets one"
        );
    }
    Ok((sources, local))
}

/// Keeps `local` in step on a thread of its own until one of `signals` arrives; returns the
/// signal's name for the log, once the refresher has stopped.
fn refresh_until_signal(local: LocalAddrs, signals: &SigSet) -> &'static str {
    let interface = local.interface.clone();
    // The refresher stops when `stop` is dropped.
    let (stop, stopped) = mpsc::channel::<()>();
    let refresher = std::thread::Builder::new()
        .name("decap-addrs".into())
        .spawn(move || refresh(local, stopped));
    if let Err(e) = &refresher {
        warn!("cannot start the address refresher ({e}); {interface}'s addresses stay as read");
    }
    let why = signals.wait().map_or("a signal", |s| s.as_str());
    drop(stop);
    if let Ok(handle) = refresher {
        let _ = handle.join();
    }
    why
}

/// Logs `lb_decap`'s counters (or only `why` when they cannot be read) before the detach.
fn log_counters(ebpf: &aya::Ebpf, why: &str, interface: &str) {
    let stats = ebpf
        .map(lb_common::maps::STATS)
        .and_then(|m| aya::maps::PerCpuArray::<_, u64>::try_from(m).ok())
        .map(|m| {
            let read = |s: Stat| m.get(&(s as u32), 0).map_or(0, |v| v.iter().sum::<u64>());
            (
                read(Stat::Decapsulated),
                read(Stat::DecapPassed),
                read(Stat::DecapNotLocal),
                read(Stat::DecapBadSource),
            )
        });
    match stats {
        Some((d, p, n, b)) => info!(
            "{why}: decapsulated={d} passed={p} not_local={n} bad_source={b}; detaching from \
             {interface}"
        ),
        None => info!("{why}: detaching from {interface}"),
    }
}

/// Re-reads the addresses every [`REFRESH_EVERY`] until `stopped` says stop.
fn refresh(mut local: LocalAddrs, stopped: mpsc::Receiver<()>) {
    let mut failing = false;
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(REFRESH_EVERY) {
        match local.sync() {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                warn!("cannot refresh {}'s addresses: {e}", local.interface);
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// `DECAP_ADDRS` and what it holds: the addresses of one interface.
struct LocalAddrs {
    interface: String,
    map: DecapMap,
    written: BTreeSet<IpAddr>,
}

impl LocalAddrs {
    /// Makes the map hold exactly the host's current addresses (at most
    /// `DECAP_ADDRS_SIZE`), logging what changed after the first time. `Err` says what failed.
    fn sync(&mut self) -> Result<(), String> {
        let ifindex = nix::net::if_::if_nametoindex(self.interface.as_str())
            .map_err(|e| format!("no interface {}: {e}", self.interface))?;
        let now = local_addresses()?;
        let first = self.written.is_empty();
        // A removal that fails does not hold up the additions; it is reported at the end and
        // tried again at the next refresh.
        let mut failed = None;
        for gone in self.written.difference(&now).copied().collect::<Vec<_>>() {
            let key = DecapAddr::new(gone);
            // Already absent counts as removed (else every later refresh would fail).
            match super::bpf_map::removed(self.map.remove(&key)) {
                Ok(_) => {}
                Err(e) => {
                    failed = Some(format!("cannot remove {gone}: {e}"));
                    continue;
                }
            }
            self.written.remove(&gone);
            info!("no longer decapsulating for {gone}");
        }
        for new in now.difference(&self.written).copied().collect::<Vec<_>>() {
            if self.written.len() >= DECAP_ADDRS_SIZE as usize {
                warn!(
                    "{}: more than {DECAP_ADDRS_SIZE} addresses; not decapsulating for {new}",
                    self.interface
                );
                continue;
            }
            self.map
                .insert(DecapAddr::new(new), ifindex, 0)
                .map_err(|e| format!("cannot add {new}: {e}"))?;
            self.written.insert(new);
            if !first {
                info!("decapsulating for {new} too");
            }
        }
        failed.map_or(Ok(()), Err)
    }

    fn describe(&self) -> String {
        let list: Vec<String> = self.written.iter().map(IpAddr::to_string).collect();
        list.join(", ")
    }
}

/// Every IPv4 and IPv6 address of the network namespace: the tunnels the host may terminate.
/// A backend's address is often not on the interface the tunnels arrive on (a VLAN or bond
/// on top of it, a dummy device or `lo` holding a service address), and a tunnel for any
/// local address is this host's to open.
fn local_addresses() -> Result<BTreeSet<IpAddr>, String> {
    crate::host_addrs::local_addresses()
}
