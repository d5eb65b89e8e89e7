//! `lb-daemon decap --iface IF`: runs the DSR decapsulator `lb_decap` on a backend host.
//!
//! The balancer's `dsr` services send each client packet to the backend inside an IPIP
//! (IPv4) or IP6IP6 header. The kernel here has no tunnel modules, so `lb_decap` strips that
//! header in XDP and passes the client's original packet to the stack; the backend, with the
//! VIP on its loopback, answers the client directly. Packets that are not encapsulated pass
//! untouched, so the program is also a harmless "pass" program where one is needed (a veth
//! only delivers `XDP_REDIRECT`ed frames when its peer has an XDP program).

use std::path::Path;

use lb_common::maps::{CLIENTS, CONNTRACK, NAT_REVERSE, PROG_DECAP, TABLES};
use lb_common::Stat;
use nix::sys::signal::{SigSet, Signal};
use tracing::{info, warn};

use super::loader::{self, LoadError};

/// Attaches `lb_decap` to `interface` (native mode, else generic with a warning), logs
/// `ready`, and waits for SIGTERM or SIGINT; then logs its counters and detaches.
///
/// `object`: the BPF object, or `None` for the default search ([`loader::candidates`]).
/// Returns `Err(LoadError)` when the object cannot be found or loaded, or XDP cannot attach.
pub fn run(interface: &str, object: Option<&Path>) -> Result<(), LoadError> {
    // Block the signals first, so one that arrives while attaching is not lost.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        warn!("cannot block SIGTERM/SIGINT ({e}); they will end the process without a detach log");
    }
    let path = loader::find_object(object)?;
    // The decapsulator uses none of the balancer's big maps: make them one entry each.
    let mut ebpf = loader::load_object(&path, &[TABLES, CONNTRACK, NAT_REVERSE, CLIENTS])?;
    let prog = loader::load_program(&mut ebpf, &path, PROG_DECAP)?;
    let mode = loader::attach(prog, interface)?;
    info!(
        "ready: {PROG_DECAP} decapsulating IPIP/IP6IP6 on {interface} ({mode} mode) from {}",
        path.display()
    );
    let why = signals.wait().map_or("a signal", |s| s.as_str());
    let stats = ebpf
        .map(lb_common::maps::STATS)
        .and_then(|m| aya::maps::PerCpuArray::<_, u64>::try_from(m).ok())
        .map(|m| {
            let read = |s: Stat| m.get(&(s as u32), 0).map_or(0, |v| v.iter().sum::<u64>());
            (read(Stat::Decapsulated), read(Stat::DecapPassed))
        });
    match stats {
        Some((d, p)) => info!("{why}: decapsulated={d} passed={p}; detaching from {interface}"),
        None => info!("{why}: detaching from {interface}"),
    }
    drop(ebpf);
    Ok(())
}
