//! Schedulers: how a new flow picks its backend. One file per algorithm.

use std::net::SocketAddr;
use std::sync::Arc;

use lb_common::FlowKey;

use crate::snapshot::{BackendId, BackendStats};

/// Chooses the backend for a new flow. Called once per new connection or session (proxy);
/// XDP uses the Maglev table directly.
pub trait Scheduler: Send + Sync {
    /// Picks an eligible backend for `flow` that is not in `tried` (backends this flow
    /// already failed to connect to). `None` when every eligible backend is in `tried`.
    fn pick(&self, flow: &FlowKey, tried: &[BackendId]) -> Option<BackendId>;
}

/// A backend that may receive new flows (up, weight > 0), as handed to a scheduler.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its id in the snapshot.
    pub id: BackendId,
    /// Its address: the identity Maglev hashes, so every balancer host builds the same table.
    pub address: SocketAddr,
    /// Its weight, `1..=MAX_WEIGHT`.
    pub weight: u32,
    /// Its live counters (active connections, for `least_conn` and `random_two`).
    pub stats: Arc<BackendStats>,
}
