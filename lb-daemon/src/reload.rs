//! Hot reload: SIGHUP or `POST /reload` reads the config file again and applies the
//! difference to the running daemon.
//!
//! A file that does not parse or validate is refused with the reason and the running config
//! stays. A good one is applied as a diff, services matched by name: a service whose
//! backends, weights, scheduler, health checks, slow start or DNS names changed gets a new
//! snapshot (backends that stay keep their counters and health); established connections
//! are never touched. Changes the running data plane cannot take in place are refused with
//! the reason, so nothing is half-applied and nothing is silently ignored.

use std::sync::Arc;

use tracing::{info, warn};

use crate::config::{self, Config, Service};
use crate::control::Control;
use crate::service::ServiceRuntime;

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
/// Returns `Err(reason)` for a change that cannot be applied without a restart: `[global]
/// workers`, the `[admin]` addresses, or a same-named service's data plane, timeouts,
/// retries, PROXY protocol, limits or access log; and, in this build, any service added,
/// removed, or moved to another address or protocol.
pub fn plan(
    running: &Config,
    new: &Config,
    services: &[Arc<ServiceRuntime>],
) -> Result<Plan, String> {
    if running.global.workers != new.global.workers {
        return Err(
            "global.workers changed; the number of proxy workers is fixed until restart".into(),
        );
    }
    if running.admin != new.admin {
        return Err("the [admin] addresses changed; they are fixed until restart".into());
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
                    return Err(format!(
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
    if !plan.add.is_empty() || !plan.remove.is_empty() {
        let names = |v: Vec<String>| v.join(", ");
        return Err(format!(
            "services added ({}) or removed ({}): starting and stopping services on reload is not supported yet; restart the daemon",
            names(plan.add.iter().map(|s| s.name.clone()).collect()),
            names(plan.remove.iter().map(|s| s.name().to_string()).collect()),
        ));
    }
    Ok(plan)
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
    if old.proxy_protocol != new.proxy_protocol {
        return Some("proxy_protocol");
    }
    if old.limits != new.limits {
        return Some("limits");
    }
    if old.access_log != new.access_log {
        return Some("access_log");
    }
    None
}

/// Reads the config file again and applies it. Returns a one-line summary of what changed,
/// or why the file was refused (the running config then stays). Logs either way.
pub async fn reload(control: &Control) -> Result<String, String> {
    let _one_at_a_time = control.reload_guard().await;
    let outcome = apply(control);
    match &outcome {
        Ok(summary) => info!("reload of {}: applied: {summary}", control.path().display()),
        Err(why) => warn!(
            "reload of {} refused, the running config stays: {why}",
            control.path().display()
        ),
    }
    control.record_reload(&outcome);
    outcome
}

fn apply(control: &Control) -> Result<String, String> {
    let new = config::load(control.path()).map_err(|e| e.to_string())?;
    let running = control.config();
    let services = control.services().all();
    let plan = plan(&running, &new, &services)?;
    let mut changed = Vec::new();
    for (runtime, service) in plan.update {
        let old = runtime.config();
        if old != service {
            changed.push(service.name.clone());
            runtime.update(service);
        }
    }
    control.set_config(new);
    Ok(if changed.is_empty() {
        "no change".to_string()
    } else {
        format!("updated services {}", changed.join(", "))
    })
}
