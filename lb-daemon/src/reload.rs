//! Hot reload: SIGHUP or `POST /reload` reads the config file again and applies the
//! difference to the running daemon.
//!
//! A file that does not parse or validate is refused with the reason and the running config
//! stays. A good one is applied as a diff, services matched by name: a new service starts,
//! a service that is gone drains (no new flows; open ones finish within `drain_timeout`), a
//! service that moved to another address or protocol is started there and drained here,
//! and a service whose backends, weights, scheduler, health checks, slow start, DNS names,
//! PROXY protocol, limits or access log changed gets a new snapshot (backends that stay keep
//! their counters and health). Established connections are never touched. The same holds on
//! XDP: new services are placed there when they can run there, removed ones drain out of the
//! maps, and backend changes reach the maps as new snapshots (`dataplane::xdp`). Changes the
//! running data plane cannot take in place are refused with the reason, so nothing is
//! half-applied and nothing is silently ignored.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{info, warn};

use crate::config::{self, Config, ConfigError, DnsBackend, Global, Service};
use crate::control::Control;
use crate::dataplane::ServiceHandle;
use crate::placement::{self, PlaceError};
use crate::service::ServiceRuntime;

/// Why a reload (or the start-up, which is a reload from an empty config) was refused. The
/// running config and services stay as they were.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not parse or validate (its file, line and field are in the error).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A change the running daemon cannot take in place: the reason names the setting and
    /// the service (see [`plan`] and [`xdp_guard`]).
    #[error("{0}")]
    NeedsRestart(String),
    /// A new service could not be placed on any data plane.
    #[error(transparent)]
    Place(#[from] PlaceError),
    /// A running `nat` service on the eBPF plane gets a backend the program could not serve
    /// (see [`placement::backends_elsewhere`]); the running config stays.
    #[error(
        "service `{service}` runs on the eBPF data plane and cannot take its new backends: \
         {reason} (the interfaces of a running eBPF service change only by restart)"
    )]
    BackendOffThePlane {
        /// The service's name.
        service: String,
        /// Why not.
        reason: placement::NotOnXdp,
    },
    /// A service's scheduler could not be built (a bug: validation should prevent it).
    #[error("service `{service}`: {source}")]
    Scheduler {
        /// The service's name.
        service: String,
        /// What went wrong.
        source: crate::scheduler::SchedulerError,
    },
    /// The daemon is stopping.
    #[error("the daemon is stopping")]
    Stopping,
    /// The reload's blocking task failed (a panic).
    #[error("the reload failed: {0}")]
    Failed(String),
}

/// What a reload would do to the running services.
#[derive(Default)]
pub struct Plan {
    /// Running services and their new config.
    pub update: Vec<(Arc<ServiceRuntime>, Service)>,
    /// Services to start.
    pub add: Vec<Service>,
    /// Running services to drain and stop.
    pub remove: Vec<Arc<ServiceRuntime>>,
}

/// Compares the config in force (`running`, carried by `services`) with `new`.
///
/// Returns `Err(ReloadError::NeedsRestart)` for a change that cannot be applied without a restart: `[global]
/// workers`, `worker_priority`, `bpf_pin_dir` or `upgrade_socket`, `[announce]`, the `[admin]` addresses, or a same-named service's data plane, timeouts or
/// retries at the same address (the proxy fixes them when a service starts, and replacing
/// the service on the same address would reset connections waiting to be accepted).
pub fn plan(
    running: &Config,
    new: &Config,
    services: &[Arc<ServiceRuntime>],
) -> Result<Plan, ReloadError> {
    let refuse = |why: String| Err(ReloadError::NeedsRestart(why));
    if running.global.workers != new.global.workers {
        return refuse(
            "global.workers changed; the number of proxy workers is fixed until restart".into(),
        );
    }
    if running.global.worker_priority != new.global.worker_priority {
        return refuse(
            "global.worker_priority changed; the proxy workers' priority is fixed until restart"
                .into(),
        );
    }
    if running.admin.fixed_part() != new.admin.fixed_part() {
        return refuse("the [admin] addresses changed; they are fixed until restart".into());
    }
    if running.global.bpf_pin_dir != new.global.bpf_pin_dir {
        return refuse(
            "global.bpf_pin_dir changed; the eBPF plane's pins stay where they are until restart"
                .into(),
        );
    }
    if running.global.upgrade_socket != new.global.upgrade_socket {
        return refuse(
            "global.upgrade_socket changed; the hand-over socket is fixed until restart".into(),
        );
    }
    if running.announce != new.announce {
        return refuse("[announce] changed; it is fixed until restart".into());
    }
    let mut plan = Plan::default();
    for s in &new.services {
        match services.iter().find(|r| r.name() == s.name) {
            None => plan.add.push(s.clone()),
            Some(r) => {
                let old = r.config();
                if old.listen != s.listen || old.protocol != s.protocol {
                    plan.remove.push(Arc::clone(r));
                    plan.add.push(s.clone());
                    continue;
                }
                if let Some(field) = fixed_field_changed(&old, s) {
                    return refuse(format!(
                        "service `{}`: {field} changed; a running service keeps it until restart (or rename the service to replace it)",
                        s.name
                    ));
                }
                plan.update.push((Arc::clone(r), s.clone()));
            }
        }
    }
    for r in services {
        if !new.services.iter().any(|s| s.name == r.name()) {
            plan.remove.push(Arc::clone(r));
        }
    }
    Ok(plan)
}

/// Refuses the parts of `plan` that a service on XDP cannot take in place: its XDP settings
/// (interfaces, forwarding, local address, SNAT ports) and `table_size` are written when it
/// is placed, and a config XDP could not run (another scheduler, proxy-only settings) would
/// be accepted and then ignored. Its backends, weights, health checks and DNS names change
/// live; removing or moving it drains it out of the maps. A service on the proxy (an `auto`
/// one the eBPF plane did not take) cannot take new eBPF settings either: they are read
/// only when a service is placed.
///
/// Returns `Err(ReloadError::NeedsRestart)` naming the service and why.
pub fn xdp_guard(plan: &Plan, on_xdp: impl Fn(usize) -> bool) -> Result<(), ReloadError> {
    let refuse = |why: String| Err(ReloadError::NeedsRestart(why));
    for (r, new) in &plan.update {
        let old = r.config();
        if !on_xdp(r.index()) {
            // Taking the eBPF keys out of it is no change to a service on the proxy.
            if old.xdp != new.xdp && new.xdp.interface.is_some() {
                return refuse(format!(
                    "service `{}` runs on the proxy: its eBPF settings (interfaces, \
                     forwarding, addresses, SNAT ports) are read only when it is placed, so \
                     they change by restart (or rename the service to replace it)",
                    new.name
                ));
            }
            continue;
        }
        if old.xdp != new.xdp || old.table_size != new.table_size {
            return refuse(format!(
                "service `{}` runs on the eBPF data plane: its interfaces, forwarding, \
                 addresses and table_size can change only by \
                 restart (or rename the service to replace it)",
                new.name
            ));
        }
        if let Some(why) = placement::why_not_xdp(new) {
            return refuse(format!(
                "service `{}` runs on the eBPF data plane and the new config cannot: {why}; \
                 restart to move it",
                new.name
            ));
        }
    }
    Ok(())
}

/// Refuses a reload that gives a running `nat` service on the eBPF plane (as `placed` says) a
/// backend whose replies would miss the program: routed out of an interface the program is
/// not on, or an address of this host ([`placement::backends_elsewhere`]); or gives a
/// service at the XDP hook (either forwarding) a backend routed out of a device `lb_xdp`
/// cannot send to ([`placement::backends_off_xdp`]). Only the added backends
/// are asked about (a route lookup each): the running ones were checked when they came, and
/// are asked about again every 10 s (`ServiceSlot::ask_replies_again`).
///
/// Returns `Err(ReloadError::BackendOffThePlane)` naming the service, the backend and the
/// interface.
fn backends_guard(
    plan: &Plan,
    placed: impl Fn(usize) -> Option<placement::Placement>,
) -> Result<(), ReloadError> {
    for (r, new) in &plan.update {
        let Some(placement::Placement::Ebpf { carried, .. }) = placed(r.index()) else {
            continue;
        };
        let old = r.config();
        let added: Vec<_> = (new.backends.iter().map(|b| b.address))
            .filter(|a| !old.backends.iter().any(|b| b.address == *a))
            .collect();
        let refuse = |reason| ReloadError::BackendOffThePlane {
            service: new.name.clone(),
            reason,
        };
        if let Some(reason) = placement::backends_elsewhere(new, added.iter().copied()) {
            return Err(refuse(reason));
        }
        // At the XDP hook the program sends only out of the service's interfaces.
        if carried.interfaces.iter().any(|(_, mode)| !mode.is_tc()) {
            if let Some(reason) = placement::backends_off_xdp(new, added) {
                return Err(refuse(reason));
            }
        }
    }
    Ok(())
}

/// The first setting of a running service that the proxy reads only when the service
/// starts, if it changed.
fn fixed_field_changed(old: &Service, new: &Service) -> Option<&'static str> {
    if old.dataplane != new.dataplane {
        return Some("dataplane");
    }
    if old.connect_timeout != new.connect_timeout {
        return Some("connect_timeout");
    }
    if old.idle_timeout != new.idle_timeout {
        return Some("idle_timeout");
    }
    if old.retries != new.retries {
        return Some("retries");
    }
    None
}

/// Reads the config file again and applies it. Returns a one-line summary of what changed,
/// or why the file was refused (the running config then stays). Logs and counts it either
/// way, also when this future is dropped (an HTTP client that hung up): the reload runs on a
/// task of its own, waiting for the one before it.
pub async fn reload(control: &Arc<Control>) -> Result<String, ReloadError> {
    tokio::spawn(reload_now(Arc::clone(control)))
        .await
        .unwrap_or_else(|e| Err(ReloadError::Failed(e.to_string())))
}

async fn reload_now(control: Arc<Control>) -> Result<String, ReloadError> {
    let one_at_a_time = control.reload_guard().await;
    // Starting and stopping proxy services blocks until the workers confirm. The guard goes
    // with the work.
    let c = Arc::clone(&control);
    let outcome = tokio::task::spawn_blocking(move || {
        // A pool thread started before the daemon lowered its privileges.
        crate::privileges::follow();
        let _held = one_at_a_time;
        if c.stopping() {
            return Err(ReloadError::Stopping);
        }
        apply_config(&c, config::load(c.path())?)
    })
    .await
    .unwrap_or_else(|e| Err(ReloadError::Failed(e.to_string())));
    match &outcome {
        Ok(summary) => info!("reload of {}: applied: {summary}", control.path().display()),
        Err(why) => warn!(
            "reload of {} refused, the running config stays: {why}",
            control.path().display()
        ),
    }
    control.record_reload(outcome.as_deref().map_err(|e| e.to_string()));
    outcome
}

/// Applies `new` to the running daemon as a diff against the config in force: services
/// added, removed, moved and updated as the module docs say. Start-up is this call from an
/// empty config. Returns a one-line summary of what changed; on `Err` the running config and
/// services stay as they were (services started on the way are stopped again). One case
/// touches a running service: a proxy service that must let go of its address for an added
/// one (a rename, a move in, two services swapping addresses) is stopped before that one
/// starts, and if that one then fails, it is started again as a new service (its open
/// connections drain); its TCP listeners stay open meanwhile and pass to the service that
/// takes the address, so clients arriving in between wait in their queues and none is
/// refused. Every other added service starts before it is stopped. At start-up a refusal
/// leaves the eBPF services it placed as written (the daemon ends; see `undo_starts`).
/// Blocks while data planes take services: call it from a blocking context inside the
/// tokio runtime (it spawns the services' health checks).
pub fn apply_config(control: &Control, new: Config) -> Result<String, ReloadError> {
    // What no service of this config takes is not for the services a later reload adds:
    // carried backend state, and listeners kept open for a service at the same address.
    struct Leftovers<'a>(&'a Control);
    impl Drop for Leftovers<'_> {
        fn drop(&mut self) {
            self.0.carry(Vec::new());
            self.0.planes().close_kept();
        }
    }
    let _leftovers = Leftovers(control);
    let running = control.config();
    let services = control.services().all();
    let plan = plan(&running, &new, &services)?;
    // A service moved to another address or protocol starts anew, and its backends' drains,
    // admin weights and down verdicts go with it, as an upgrade carries them.
    let moved = (plan.remove.iter())
        .filter(|r| plan.add.iter().any(|a| a.name == r.name()))
        .flat_map(|r| r.carried());
    control.carry_also(moved);
    xdp_guard(&plan, |index| control.on_xdp(index))?;
    backends_guard(&plan, |index| control.placement(index))?;
    if running.global.bpf_object != new.global.bpf_object && control.planes().has_xdp() {
        return Err(ReloadError::NeedsRestart(
            "global.bpf_object changed; the loaded XDP program stays until restart".into(),
        ));
    }
    let drain_timeout = new.global.drain_timeout;
    control.planes().begin_batch();

    // A removed proxy service whose address an added one takes must let go of it first.
    let (early, late) = early_removals(plan.remove, &plan.add, |i| control.on_xdp(i));
    // The added services no early removal makes room for start first: when one cannot (its
    // address is taken, its plane refuses it), nothing running was touched yet.
    let (after_early, first): (Vec<&Service>, Vec<&Service>) = plan.add.iter().partition(|a| {
        early.iter().any(|r| {
            let c = r.config();
            a.listen == c.listen && a.protocol == c.protocol
        })
    });
    let answers = first_answers(&plan.add);
    let mut started: Vec<Arc<ServiceRuntime>> = Vec::new();
    for s in first {
        match start_service(control, &new.global, s, &answers) {
            Ok(runtime) => started.push(runtime),
            Err(why) => {
                undo_starts(control, &new.global, &services, &started, &[]);
                return Err(why);
            }
        }
    }
    // Their TCP listeners stay open, with the connections in their queues, for the added
    // service at their address to take: a rename or an address swap refuses no client.
    for r in &early {
        stop_service(control, r, drain_timeout, true);
    }
    // If one of these cannot start, the early ones are started again, as new services:
    // their open connections drain.
    for s in after_early {
        match start_service(control, &new.global, s, &answers) {
            Ok(runtime) => started.push(runtime),
            Err(why) => {
                undo_starts(control, &new.global, &services, &started, &early);
                return Err(why);
            }
        }
    }

    // From here the reload cannot fail: backends that leave from now on drain this long.
    control.planes().set_drain_timeout(drain_timeout);
    let mut updated = Vec::new();
    for (runtime, service) in plan.update {
        if runtime.config() != service {
            updated.push(service.name.clone());
            let unchecked = crate::config::CheckKind::None;
            if service.health.kind == unchecked
                && runtime.config().health.kind != unchecked
                && control.on_xdp(runtime.index())
            {
                crate::placement::warn_if_unchecked_on_ebpf(&service);
            }
            runtime.update(service);
        }
    }
    let removed: Vec<_> = early.iter().chain(&late).cloned().collect();
    control
        .services()
        .set(running_list(&new, &started, &services, &removed));
    for r in &late {
        // An XDP service replaced at its address by a proxy one lets go of its VIP now, so
        // new flows reach the proxy instead of its emptied table.
        let c = r.config();
        let to_proxy = started.iter().any(|n| {
            let nc = n.config();
            nc.listen == c.listen && nc.protocol == c.protocol && !control.on_xdp(n.index())
        });
        stop_service(control, r, drain_timeout, to_proxy);
    }
    control.set_config(new);

    Ok(summary(&started, &removed, &updated))
}

/// The running services after a reload, in the new file's order: the ones it `started`, and
/// the ones that were running (`services`) and stay (not in `removed`).
fn running_list(
    new: &Config,
    started: &[Arc<ServiceRuntime>],
    services: &[Arc<ServiceRuntime>],
    removed: &[Arc<ServiceRuntime>],
) -> Vec<Arc<ServiceRuntime>> {
    let stays = |r: &&Arc<ServiceRuntime>| !removed.iter().any(|x| Arc::ptr_eq(x, r));
    new.services
        .iter()
        .filter_map(|s| {
            started
                .iter()
                .find(|r| r.name() == s.name)
                .or_else(|| services.iter().filter(stays).find(|r| r.name() == s.name))
                .cloned()
        })
        .collect()
}

/// The one-line summary of an applied reload: `started a, b; draining c; updated d`, or
/// `no change`.
fn summary(
    started: &[Arc<ServiceRuntime>],
    removed: &[Arc<ServiceRuntime>],
    updated: &[String],
) -> String {
    let mut parts = Vec::new();
    if !started.is_empty() {
        parts.push(format!("started {}", names(started)));
    }
    if !removed.is_empty() {
        parts.push(format!("draining {}", names(removed)));
    }
    if !updated.is_empty() {
        parts.push(format!("updated {}", updated.join(", ")));
    }
    if parts.is_empty() {
        "no change".to_string()
    } else {
        parts.join("; ")
    }
}

/// Undoes the start of a refused reload: the services it `started` stop at once, and the
/// `early` ones it removed to make room come back (under new numbers), so the running list
/// is `services` again.
fn undo_starts(
    control: &Control,
    global: &Global,
    services: &[Arc<ServiceRuntime>],
    started: &[Arc<ServiceRuntime>],
    early: &[Arc<ServiceRuntime>],
) {
    // At start-up (nothing ran before) the refusal ends the daemon: an eBPF service's table
    // stays as written, not emptied, so a pinned plane it adopted (a restart after a crash,
    // an upgrade) goes on serving on it for the next daemon to adopt.
    let starting = services.is_empty();
    // An XDP service among them gives its VIP back to the XDP service it was to replace,
    // which was not removed yet (XDP services are never removed early).
    // A proxy service at an early one's address keeps its TCP listeners open for it, started
    // again below.
    for r in started {
        let on_xdp = control.on_xdp(r.index());
        if starting && on_xdp {
            r.stop();
            continue;
        }
        let c = r.config();
        let hands_on = !on_xdp
            && (early.iter()).any(|e| {
                let ec = e.config();
                ec.listen == c.listen && ec.protocol == c.protocol
            });
        stop_service(control, r, std::time::Duration::ZERO, hands_on);
    }
    // Started again as new services, with the backends their DNS names gave and what their
    // backends had (what a move of theirs carried is not kept twice).
    let mut answers = HashMap::new();
    for r in early {
        drop(control.take_carried(r.name()));
        answers.extend(r.dns_answers());
    }
    control.carry_also(early.iter().flat_map(|r| r.carried()));
    let mut back = Vec::new();
    for r in early {
        match start_service(control, global, &r.config(), &answers) {
            Ok(n) => back.push((Arc::clone(r), n)),
            Err(e) => warn!("service {} could not be restarted: {e}", r.name()),
        }
    }
    let list = services
        .iter()
        .filter_map(|r| match back.iter().find(|(old, _)| Arc::ptr_eq(old, r)) {
            Some((_, n)) => Some(Arc::clone(n)),
            None if early.iter().any(|e| Arc::ptr_eq(e, r)) => None,
            None => Some(Arc::clone(r)),
        })
        .collect();
    control.services().set(list);
}

/// The longest a reload (or the start) waits for the first answers for the DNS names of the
/// services it adds, all looked up at once ([`first_answers`]).
const FIRST_LOOKUP_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The first answers for the DNS names of `services`, by `name:port`: each name looked up
/// once, all at the same time, for [`FIRST_LOOKUP_LIMIT`] at most (`discovery::resolve_now`).
fn first_answers(services: &[Service]) -> HashMap<String, Vec<SocketAddr>> {
    let mut names: Vec<DnsBackend> = Vec::new();
    for d in services.iter().flat_map(|s| &s.discovered) {
        if !names.iter().any(|n| n.host == d.host && n.port == d.port) {
            names.push(d.clone());
        }
    }
    if names.is_empty() {
        return HashMap::new();
    }
    (crate::discovery::resolve_now(&names, FIRST_LOOKUP_LIMIT).into_iter())
        .map(|(name, addresses)| (name.to_string(), addresses))
        .collect()
}

/// Starts `s` as a new service (a new number) with its control tasks, on the data plane
/// [`crate::placement::Planes::place`] decides, with `first` (see [`first_answers`]) for
/// its DNS names. `Err` leaves nothing behind.
fn start_service(
    control: &Control,
    global: &Global,
    s: &Service,
    first: &HashMap<String, Vec<SocketAddr>>,
) -> Result<Arc<ServiceRuntime>, ReloadError> {
    let index = control.services().allocate_index();
    let runtime =
        ServiceRuntime::new(index, s.clone()).map_err(|source| ReloadError::Scheduler {
            service: s.name.clone(),
            source,
        })?;
    // Before the data plane reads the snapshot: backends given by DNS names are there (a
    // start or an upgrade would otherwise refuse new flows until the first answer), and an
    // upgrade's drained backends take no flow.
    runtime.take_first_answers(first);
    runtime.carry_over(&control.take_carried(&s.name));
    let handle = ServiceHandle {
        index,
        snapshot: runtime.snapshot(),
    };
    let placement = control.planes().place(global, s, &handle)?;
    control.set_placement(index, placement);
    runtime.start();
    Ok(runtime)
}

/// Splits the services a reload removes into those to stop before the new ones start and
/// those to stop after: a proxy service whose address (listen and protocol) an added service
/// takes must stop first, handing its listeners on (or, for UDP, letting the address be
/// bound again). An XDP service
/// holds no socket, so it always goes after: the new service at its VIP is placed first, and
/// no SYN finds the VIP without a table in between; and a refused reload, which restarts the
/// early ones, never has to touch it.
fn early_removals(
    remove: Vec<Arc<ServiceRuntime>>,
    add: &[Service],
    on_xdp: impl Fn(usize) -> bool,
) -> (Vec<Arc<ServiceRuntime>>, Vec<Arc<ServiceRuntime>>) {
    remove.into_iter().partition(|r| {
        let c = r.config();
        !on_xdp(r.index())
            && add
                .iter()
                .any(|a| a.listen == c.listen && a.protocol == c.protocol)
    })
}

/// Stops new flows to a service (its listeners close, or its XDP table empties), lets its
/// open ones finish within `drain_timeout`, and ends its health checks and resolvers.
/// `address_moves`: a service started next takes its address: an XDP service lets go of its
/// VIP at once (see `XdpPlane::remove`), a proxy service keeps its TCP listeners open for
/// that one (see `Proxy::remove_service_keeping_listeners`).
fn stop_service(
    control: &Control,
    r: &Arc<ServiceRuntime>,
    drain_timeout: std::time::Duration,
    address_moves: bool,
) {
    let Some(placement) = control.placement(r.index()) else {
        r.stop();
        return;
    };
    control
        .planes()
        .remove(&placement, r.index(), drain_timeout, address_moves);
    if placement.on_xdp() {
        info!(
            "service {}: removed from the XDP table; flows pinned to its backends may go on for \
             {}, then its VIP leaves the XDP maps",
            r.name(),
            humantime::format_duration(drain_timeout)
        );
    } else {
        info!(
            "service {}: stopped accepting; {} open connections and sessions may finish within {}",
            r.name(),
            r.active(),
            humantime::format_duration(drain_timeout)
        );
    }
    // Shown in `/status` while it drains (see `Control::retire`); its placement goes with it.
    control.retire(Arc::clone(r), drain_timeout);
    r.stop();
}

fn names(v: &[Arc<ServiceRuntime>]) -> String {
    v.iter()
        .map(|r| r.name().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"
[[service]]
name = "web"
listen = "127.0.0.1:8080"
protocol = "tcp"
{extra}
[[service.backend]]
address = "127.0.0.1:9001"
"#
        );
        config::parse(&text, Path::new("test.toml")).expect("valid test config")
    }

    fn running(c: &Config) -> Vec<Arc<ServiceRuntime>> {
        c.services
            .iter()
            .enumerate()
            .map(|(i, s)| ServiceRuntime::new(i, s.clone()).expect("builds"))
            .collect()
    }

    #[test]
    fn a_service_on_xdp_takes_weights_but_not_what_xdp_would_ignore() {
        let xdp = |extra: &str, weight: u32| {
            let text = format!(
                "[[service]]\nname = \"web\"\nlisten = \"10.200.100.1:80\"\nprotocol = \"tcp\"\n\
                 interface = \"eth0\"\nlocal_address = \"10.200.0.1\"\n{extra}\n\
                 [[service.backend]]\naddress = \"10.200.1.1:80\"\nweight = {weight}\n"
            );
            config::parse(&text, Path::new("test.toml")).expect("valid XDP test config")
        };
        let old = xdp("", 1);
        let on_xdp = |index: usize| index == 0;
        let p = plan(&old, &xdp("", 5), &running(&old)).expect("a weight change");
        xdp_guard(&p, on_xdp).expect("a weight change applies on XDP");
        let limits = "[service.limits]\nmax_connections_per_client = 3\n";
        let p = plan(&old, &xdp(limits, 1), &running(&old)).expect("a limits change");
        xdp_guard(&p, on_xdp).expect("a limits change applies on XDP");
        for (extra, words) in [
            ("scheduler = \"least_conn\"", "only the `maglev` scheduler"),
            ("access_log = true", "only in the proxy"),
            ("table_size = 65521", "table_size"),
        ] {
            let p = plan(&old, &xdp(extra, 1), &running(&old)).expect("planned");
            let why = xdp_guard(&p, on_xdp).expect_err(extra).to_string();
            assert!(why.contains(words), "`{extra}` on an XDP service: {why}");
        }
        // The same `auto` service on the proxy (the eBPF plane did not take it): new eBPF
        // settings would be reported as applied and be ignored until a restart.
        let on_proxy = |_: usize| false;
        let p = plan(&old, &xdp("forwarding = \"dsr\"", 1), &running(&old)).expect("planned");
        let why = xdp_guard(&p, on_proxy)
            .expect_err("dsr on a proxy service")
            .to_string();
        assert!(why.contains("runs on the proxy"), "{why}");
        let p = plan(&old, &xdp("access_log = true", 5), &running(&old)).expect("planned");
        xdp_guard(&p, on_proxy).expect("the proxy takes its own settings in place");
        let without_keys = config::parse(
            "[[service]]\nname = \"web\"\nlisten = \"10.200.100.1:80\"\nprotocol = \"tcp\"\n\
             [[service.backend]]\naddress = \"10.200.1.1:80\"\n",
            Path::new("test.toml"),
        )
        .expect("valid");
        let p = plan(&old, &without_keys, &running(&old)).expect("planned");
        assert_eq!(p.update.len(), 1, "the same service, updated");
        xdp_guard(&p, on_proxy).expect("taking the eBPF keys out changes nothing on the proxy");
    }

    #[test]
    fn a_service_on_xdp_takes_new_backends_and_may_be_removed_or_moved() {
        let xdp = |name: &str, listen: &str, backends: &[&str]| {
            let mut text = format!(
                "[[service]]\nname = \"{name}\"\nlisten = \"{listen}\"\nprotocol = \"tcp\"\n\
                 interface = \"eth0\"\nlocal_address = \"10.200.0.1\"\n"
            );
            for b in backends {
                text.push_str(&format!("[[service.backend]]\naddress = \"{b}\"\n"));
            }
            config::parse(&text, Path::new("test.toml")).expect("valid XDP test config")
        };
        let old = xdp("web", "10.200.100.1:80", &["10.200.1.1:80"]);
        let on_xdp = |index: usize| index == 0;
        for (new, what) in [
            (
                xdp(
                    "web",
                    "10.200.100.1:80",
                    &["10.200.1.1:80", "10.200.2.1:80"],
                ),
                "a backend added",
            ),
            (
                xdp("web", "10.200.100.1:80", &["10.200.2.1:80"]),
                "a backend replaced",
            ),
            (xdp("web", "10.200.100.1:80", &["app:80"]), "a DNS name"),
            (xdp("web", "10.200.100.2:80", &["10.200.1.1:80"]), "a move"),
            (
                xdp("api", "10.200.100.1:80", &["10.200.1.1:80"]),
                "a rename",
            ),
        ] {
            let p = plan(&old, &new, &running(&old)).expect(what);
            xdp_guard(&p, on_xdp).unwrap_or_else(|e| panic!("{what} on XDP was refused: {e}"));
        }
    }

    #[test]
    fn only_proxy_services_are_removed_before_their_replacement_starts() {
        let old = config("");
        let mut two = old.clone();
        let mut other = old.services[0].clone();
        other.name = "xdp".into();
        other.listen = "10.200.100.1:80".parse().expect("literal");
        two.services.push(other);
        let services = running(&two);
        // Both move to new names at the same addresses: the proxy one (index 0) must free
        // its address first, the XDP one (index 1) must not go before its heir is placed.
        let add: Vec<Service> = two
            .services
            .iter()
            .map(|s| Service {
                name: format!("{}-new", s.name),
                ..s.clone()
            })
            .collect();
        let (early, late) = early_removals(services.clone(), &add, |i| i == 1);
        let names = |v: &[Arc<ServiceRuntime>]| -> Vec<String> {
            v.iter().map(|r| r.name().to_string()).collect()
        };
        assert_eq!(names(&early), vec!["web"], "early removals");
        assert_eq!(names(&late), vec!["xdp"], "late removals");
        let (early, _) = early_removals(services, &[], |i| i == 1);
        assert!(early.is_empty(), "nothing takes their addresses");
    }

    #[test]
    fn backend_and_limit_changes_update_in_place() {
        let old = config("");
        let new = config("slow_start = \"10s\"\naccess_log = true\n");
        let p = plan(&old, &new, &running(&old)).expect("a hot change");
        assert_eq!(p.update.len(), 1, "the service is updated in place");
        assert!(p.add.is_empty() && p.remove.is_empty());
    }

    #[test]
    fn timeouts_of_a_running_service_need_a_restart() {
        let old = config("");
        let new = config("connect_timeout = \"1s\"\n");
        let why = plan(&old, &new, &running(&old))
            .err()
            .expect("must be refused")
            .to_string();
        assert!(
            why.contains("connect_timeout") && why.contains("web"),
            "the refusal should name the service and the key: {why}"
        );
    }

    #[test]
    fn a_moved_service_is_replaced_and_a_renamed_one_is_added_and_removed() {
        let old = config("");
        let moved = config("").services[0].clone();
        let mut new = old.clone();
        new.services[0].listen = "127.0.0.1:8081".parse().expect("literal");
        let p = plan(&old, &new, &running(&old)).expect("a move is applied");
        assert_eq!((p.add.len(), p.remove.len(), p.update.len()), (1, 1, 0));
        let mut renamed = old.clone();
        renamed.services[0] = Service {
            name: "api".into(),
            ..moved
        };
        let p = plan(&old, &renamed, &running(&old)).expect("a rename is applied");
        assert_eq!(p.add[0].name, "api");
        assert_eq!(p.remove[0].name(), "web");
    }

    #[test]
    fn workers_and_admin_need_a_restart() {
        let old = config("");
        let mut new = old.clone();
        new.global.workers = 7;
        assert!(plan(&old, &new, &running(&old))
            .err()
            .is_some_and(|w| w.to_string().contains("workers")));
        let mut new = old.clone();
        new.global.worker_priority = 0;
        assert!(plan(&old, &new, &running(&old))
            .err()
            .is_some_and(|w| w.to_string().contains("worker_priority")));
        let mut new = old.clone();
        new.admin.listen = Some("127.0.0.1:9999".parse().expect("literal"));
        assert!(plan(&old, &new, &running(&old))
            .err()
            .is_some_and(|w| w.to_string().contains("admin")));
        let mut new = old.clone();
        new.global.bpf_pin_dir = None;
        assert!(plan(&old, &new, &running(&old))
            .err()
            .is_some_and(|w| w.to_string().contains("bpf_pin_dir")));
        let mut new = old.clone();
        new.global.upgrade_socket = Some("/run/lb/other.sock".into());
        assert!(plan(&old, &new, &running(&old))
            .err()
            .is_some_and(|w| w.to_string().contains("upgrade_socket")));
        let mut new = old.clone();
        new.announce = Some(crate::config::Announce {
            table: 100,
            protocol: 250,
            withdraw_wait: std::time::Duration::from_secs(2),
        });
        assert!(plan(&old, &new, &running(&old))
            .err()
            .is_some_and(|w| w.to_string().contains("[announce]")));
    }
}
