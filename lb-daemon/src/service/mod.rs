//! The control plane's view of one service: its backends' health, weights and admin state,
//! and the snapshots it publishes to the data planes.
//!
//! - Health checks, passive failures, admin calls (drain, enable, weight), reloads and DNS
//!   discovery all change a backend's state; every change rebuilds the service's scheduler
//!   (and so its Maglev table) from scratch and swaps the new
//!   [`ServiceSnapshot`](crate::snapshot::ServiceSnapshot) in whole.
//! - Changes of one service are serialised by one lock, so a rebuild never publishes an older
//!   view after a newer one.
//! - A backend is known by its address for the life of the daemon: when a reload or a DNS
//!   answer keeps it, it keeps its counters and its health state. A backend that leaves the
//!   config or DNS is drained (no new flows) and forgotten once its last connection closes.
//!
//! One concern per file:
//! - `backends.rs`: the backend set, where each backend came from, and
//!   `BackendSet::reconcile`, which both a reload and a DNS answer go through.
//! - `weights.rs`: a backend's configured, admin and effective weight; slow start.
//! - `runtime.rs`: [`ServiceRuntime`]: the lock, the tasks (checks, resolvers, the ticker),
//!   publishing snapshots.
//! - `admin.rs`: drain, enable, weight and the status, for the admin API.
//! - `feedback.rs`: [`PassiveFeedback`], the data planes' connect outcomes.
//! - here: [`ServiceSet`], the running services by number.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;

mod admin;
mod backends;
mod feedback;
mod runtime;
mod weights;

pub use admin::AdminError;
pub use backends::BackendSource;
pub use feedback::{PassiveEvent, PassiveFeedback};
pub use runtime::ServiceRuntime;
pub use weights::WEIGHT_SCALE;

/// The running services, by number. Reloads add and remove services; a number is never
/// reused, so a data plane report about a removed service finds nothing rather than the
/// wrong service.
#[derive(Default)]
pub struct ServiceSet {
    services: ArcSwap<Vec<Arc<ServiceRuntime>>>,
    next_index: AtomicUsize,
}

impl ServiceSet {
    /// An empty set.
    pub fn new() -> Arc<Self> {
        Arc::new(ServiceSet::default())
    }

    /// The next unused service number.
    pub fn allocate_index(&self) -> usize {
        self.next_index.fetch_add(1, Ordering::Relaxed)
    }

    /// The services now, in config order.
    pub fn all(&self) -> Arc<Vec<Arc<ServiceRuntime>>> {
        self.services.load_full()
    }

    /// Service number `index`, if it runs.
    pub fn get(&self, index: usize) -> Option<Arc<ServiceRuntime>> {
        self.services
            .load()
            .iter()
            .find(|s| s.index() == index)
            .cloned()
    }

    /// The service named `name`, if it runs.
    pub fn by_name(&self, name: &str) -> Option<Arc<ServiceRuntime>> {
        self.services
            .load()
            .iter()
            .find(|s| s.name() == name)
            .cloned()
    }

    /// Replaces the list (the control plane's only writer does this at start and reload).
    pub fn set(&self, services: Vec<Arc<ServiceRuntime>>) {
        self.services.store(Arc::new(services));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain counters behind, still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Service configs for the tests of this module's files.
#[cfg(test)]
mod testing {
    use std::path::Path;

    use crate::config::{self, Service};

    /// A TCP service "web" with round robin, `kind` health checks with `fall = 2`, and three
    /// backends 127.0.0.1:9001..=9003 (the last at weight 0).
    pub(super) fn service(kind: &str) -> Service {
        let text = format!(
            r#"
[[service]]
name = "web"
listen = "127.0.0.1:8080"
protocol = "tcp"
scheduler = "round_robin"
[service.health]
kind = "{kind}"
fall = 2
[[service.backend]]
address = "127.0.0.1:9001"
[[service.backend]]
address = "127.0.0.1:9002"
[[service.backend]]
address = "127.0.0.1:9003"
weight = 0
"#
        );
        config::parse(&text, Path::new("test.toml"))
            .expect("valid test config")
            .services
            .remove(0)
    }
}
