//! Least privilege: once started (listeners bound, the eBPF plane loaded and attached, the
//! admin API listening, the open file limit raised), the daemon keeps only the capabilities
//! its config can still use, and sets no-new-privileges, so that a flaw in a parser or the
//! admin API cannot be turned into the host's root.
//!
//! | kept | when | for |
//! |---|---|---|
//! | `CAP_NET_BIND_SERVICE` | a service listens on a port below 1024 | binding it again (reloads, restarts of a listener) |
//! | `CAP_BPF`, `CAP_PERFMON`, `CAP_NET_ADMIN` | a service may run on the eBPF plane (`dataplane` not `proxy`, an `interface` set), or `[global] bpf_object` is set (a proxy-only config that reloads may give eBPF services) | loading the programs on a reload, attaching and detaching them (XDP, TCX, clsact) |
//! | `CAP_NET_ADMIN` | `[announce]` | writing the announced VIPs' routes |
//! | `CAP_NET_ADMIN` | a UDP service | `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`: UDP session sockets of `udp_buffer` bytes beyond `net.core.rmem_max` |
//! | `CAP_SYS_RESOURCE` | a TCP service that may run on the proxy (`dataplane` `proxy` or `auto`) | the relay's pipes of `pipe_size` bytes (two a connection) past `fs.pipe-user-pages-soft`, the kernel's page limit for all pipes of one user (root's included, shared with every root process): without it, past about 125 connections the kernel refuses the size and makes new pipes of 8 KiB, and every splice moves at most that much |
//! | `CAP_SYS_NICE` | `[global] worker_priority` below 0 (the default, -10) and `RLIMIT_NICE` could not be raised to allow it (no `CAP_SYS_RESOURCE`, `crate::priority`) | the proxy workers of the daemon an upgrade in place starts lowering their nice value |
//!
//! Everything else goes, from the effective, permitted, inheritable and ambient sets (and
//! from the bounding set while `CAP_SETPCAP` allows it). What is kept is also made
//! inheritable and ambient, so that the daemon an upgrade in place (SIGUSR2) starts from
//! this one has the same capabilities, and no more. Capabilities are not regained: a
//! reload that needs one the start-up config did not (a first service below port 1024, a
//! first eBPF service) has it refused by the kernel, and the service runs on the proxy with
//! the reason (`auto`) or the reload is refused (`xdp`, `tc`); restart the daemon for it.

use std::cell::Cell;
use std::sync::OnceLock;

use caps::{CapSet, Capability, CapsHashSet};
use tracing::info;

use crate::config::{Config, DataplaneKind, Protocol};

/// Why the capabilities could not be lowered.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// The kernel refused to read or change a capability set, or to set no-new-privileges.
    #[error("cannot drop the capabilities the config does not need: {0}")]
    Kernel(String),
}

/// The capabilities the daemon keeps for `config`: those [`needed`] names, and
/// `CAP_SYS_NICE` when the workers' priority needs it (this process's `RLIMIT_NICE` does not
/// allow `worker_priority`, see `crate::priority::needs_capability`).
pub fn kept_for(config: &Config) -> CapsHashSet {
    let mut keep = needed(config);
    if crate::priority::needs_capability(config.global.worker_priority) {
        keep.insert(Capability::CAP_SYS_NICE);
    }
    keep
}

/// The capabilities `config` can use after start-up, by the table in the module's docs (all
/// but `CAP_SYS_NICE`, which depends on the process's limits: [`kept_for`]).
pub fn needed(config: &Config) -> CapsHashSet {
    let mut keep = CapsHashSet::new();
    let ebpf = [
        Capability::CAP_BPF,
        Capability::CAP_PERFMON,
        Capability::CAP_NET_ADMIN,
    ];
    if config.global.bpf_object.is_some() {
        keep.extend(ebpf);
    }
    if config.announce.is_some() {
        // The VIP routes of `[announce]`.
        keep.insert(Capability::CAP_NET_ADMIN);
    }
    for s in &config.services {
        if s.listen.port() != 0 && s.listen.port() < 1024 {
            keep.insert(Capability::CAP_NET_BIND_SERVICE);
        }
        if s.dataplane != DataplaneKind::Proxy && s.xdp.interface.is_some() {
            keep.extend(ebpf);
        }
        if s.protocol == Protocol::Udp {
            keep.insert(Capability::CAP_NET_ADMIN);
        }
        if s.protocol == Protocol::Tcp
            && matches!(s.dataplane, DataplaneKind::Proxy | DataplaneKind::Auto)
        {
            keep.insert(Capability::CAP_SYS_RESOURCE);
        }
    }
    keep
}

/// The capability set every thread of the daemon lowers itself to, once [`lower`] set it.
static TARGET: OnceLock<CapsHashSet> = OnceLock::new();

thread_local! {
    /// Whether this thread has lowered itself to [`TARGET`].
    static LOWERED: Cell<bool> = const { Cell::new(false) };
}

/// Lowers the calling thread's capabilities to `keep` (those of them it has), sets
/// no-new-privileges, logs what was kept, and makes every other thread of the daemon follow:
/// Linux keeps capabilities per thread, so each thread running already lowers its own at its
/// next [`follow`] (a proxy worker within its sweep period, at most a second), and threads
/// started afterwards inherit the lowered set. Call it once, when start-up is done.
///
/// Returns `Err(PrivilegeError::Kernel)` when the kernel refuses a change; the thread then
/// has at most the privileges it had.
pub fn lower(keep: &CapsHashSet) -> Result<(), PrivilegeError> {
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(|e| PrivilegeError::Kernel(e.to_string()))?;
    let kept: CapsHashSet = permitted.intersection(keep).copied().collect();
    if keep.contains(&Capability::CAP_SYS_RESOURCE) && !kept.contains(&Capability::CAP_SYS_RESOURCE)
    {
        warn_pipe_limit();
    }
    let target = TARGET.get_or_init(|| kept.clone());
    lower_this_thread(target)?;
    let mut names: Vec<String> = target.iter().map(|c| c.to_string()).collect();
    names.sort();
    info!(
        "privileges: kept {} of the {} capabilities the daemon started with; no new privileges",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        },
        permitted.len()
    );
    Ok(())
}

/// Says what a daemon with TCP proxy services lacks without `CAP_SYS_RESOURCE` (a container,
/// a unit with a narrow `CapabilityBoundingSet`): its relay pipes count against
/// `fs.pipe-user-pages-soft`, and past it the kernel makes them 8 KiB. Nothing when the limit
/// is off (0) or cannot be read.
fn warn_pipe_limit() {
    let Some(pages) = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&p| p > 0)
    else {
        return;
    };
    tracing::warn!(
        "privileges: started without CAP_SYS_RESOURCE: the proxy's relay pipes (two a TCP \
         connection) share fs.pipe-user-pages-soft ({pages} pages) with every pipe of this \
         user, and past it the kernel makes them 8 KiB, so that each splice moves at most \
         that much; grant the capability or raise the limit"
    );
}

/// Lowers the calling thread to the set [`lower`] chose, once; nothing before `lower` ran.
/// Cheap enough for every turn of a loop. A refusal is logged, not returned: the thread goes
/// on with the privileges it has.
pub fn follow() {
    let Some(target) = TARGET.get() else {
        return;
    };
    if LOWERED.with(Cell::get) {
        return;
    }
    if let Err(e) = lower_this_thread(target) {
        tracing::warn!("{e}");
        // Not tried again on every turn of the caller's loop.
        LOWERED.with(|l| l.set(true));
    }
}

/// Drops every capability of the calling thread and sets no-new-privileges, for a thread
/// that needs none (the log's writer, `crate::log_writer`), whenever it starts: it then
/// holds less than [`lower`] keeps, from its first instruction on.
///
/// Returns `Err(PrivilegeError::Kernel)` when the kernel refuses a change.
pub fn drop_all_in_this_thread() -> Result<(), PrivilegeError> {
    lower_this_thread(&CapsHashSet::new())
}

fn lower_this_thread(kept: &CapsHashSet) -> Result<(), PrivilegeError> {
    let kernel = |e: caps::errors::CapsError| PrivilegeError::Kernel(e.to_string());
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes below.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(kernel)? {
        for cap in caps::read(None, CapSet::Bounding).map_err(kernel)? {
            if !kept.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(kernel)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(kernel)?;
    let now = caps::read(None, CapSet::Permitted).map_err(kernel)?;
    let kept: CapsHashSet = now.intersection(kept).copied().collect();
    caps::set(None, CapSet::Inheritable, &kept).map_err(kernel)?;
    caps::set(None, CapSet::Effective, &kept).map_err(kernel)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(kernel)?;
    // The kept ones stay ambient, so that the daemon an upgrade in place starts (SIGUSR2,
    // the same binary as a non-root user) has them too; it can have no others.
    for cap in &kept {
        if let Err(e) = caps::raise(None, CapSet::Ambient, *cap) {
            tracing::debug!("{cap} not ambient ({e}): an upgrade in place starts without it");
        }
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| PrivilegeError::Kernel(e.to_string()))?;
    LOWERED.with(|l| l.set(true));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn needed_for(text: &str) -> Vec<Capability> {
        let config = crate::config::parse(text, Path::new("t.toml")).expect("valid");
        let mut v: Vec<Capability> = needed(&config).into_iter().collect();
        v.sort_by_key(|c| c.index());
        v
    }

    const BACKEND: &str = "[[service.backend]]\naddress = \"10.0.0.2:80\"\n";

    #[test]
    fn a_tcp_proxy_service_on_a_high_port_needs_only_its_pipes() {
        let text = format!(
            "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nprotocol = \"tcp\"\n{BACKEND}"
        );
        assert_eq!(needed_for(&text), vec![Capability::CAP_SYS_RESOURCE]);
        let tc_only = format!(
            "[[service]]\nname = \"web\"\nlisten = \"10.0.0.1:8080\"\nprotocol = \"tcp\"\n\
             dataplane = \"tc\"\ninterface = \"eth0\"\nlocal_address = \"10.0.0.1\"\n{BACKEND}"
        );
        assert!(
            !needed_for(&tc_only).contains(&Capability::CAP_SYS_RESOURCE),
            "a service only on tc has no relay pipes"
        );
    }

    #[test]
    fn a_low_port_udp_and_an_ebpf_service_each_add_theirs() {
        let low = format!(
            "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:80\"\nprotocol = \"tcp\"\n{BACKEND}"
        );
        assert_eq!(
            needed_for(&low),
            vec![
                Capability::CAP_NET_BIND_SERVICE,
                Capability::CAP_SYS_RESOURCE
            ]
        );
        let udp = format!(
            "[[service]]\nname = \"dns\"\nlisten = \"127.0.0.1:5353\"\nprotocol = \"udp\"\n{BACKEND}"
        );
        assert_eq!(needed_for(&udp), vec![Capability::CAP_NET_ADMIN]);
        let ebpf = format!(
            "[[service]]\nname = \"web\"\nlisten = \"10.0.0.1:8080\"\nprotocol = \"tcp\"\n\
             interface = \"eth0\"\nlocal_address = \"10.0.0.1\"\n{BACKEND}"
        );
        // `auto`: the proxy too, if the eBPF plane cannot deliver.
        let want = vec![
            Capability::CAP_NET_ADMIN,
            Capability::CAP_SYS_RESOURCE,
            Capability::CAP_PERFMON,
            Capability::CAP_BPF,
        ];
        assert_eq!(needed_for(&ebpf), want);
        let object = format!(
            "[global]\nbpf_object = \"/x/lb-ebpf\"\n[[service]]\nname = \"web\"\n\
             listen = \"127.0.0.1:8080\"\nprotocol = \"tcp\"\n{BACKEND}"
        );
        assert_eq!(needed_for(&object), want, "reloads may add eBPF services");
    }
}
