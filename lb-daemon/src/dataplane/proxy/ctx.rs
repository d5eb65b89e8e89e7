//! What the TCP and UDP halves of a worker share: its ring, the proxy-wide counters and
//! options, and the time of the current batch of completions.

use std::sync::Arc;
use std::time::Instant;

use super::ring::Ring;
use super::{ProxyOptions, Shared};
use crate::dataplane::FlowEvents;

/// What the TCP and UDP halves of a worker share.
pub(super) struct Ctx {
    pub(super) ring: Ring,
    pub(super) events: Arc<dyn FlowEvents>,
    pub(super) shared: Arc<Shared>,
    pub(super) options: ProxyOptions,
    /// The time the current batch of completions was taken, for idle bookkeeping.
    pub(super) now: Instant,
    /// Set once shutdown began: no new connections or sessions.
    pub(super) draining: bool,
}
