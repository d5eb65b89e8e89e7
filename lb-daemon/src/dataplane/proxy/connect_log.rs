//! Warnings of failed connects to backends, limited per backend. A dead backend that stays in
//! the table (health checks off, or until they notice it) fails every connection that picks
//! it, and a line per failure would flood the log at the connection rate. Each backend gets
//! one line a second at most, with the count held back since its last line; the first failure
//! picked from a newer table generation than the backend's last line named is logged at once,
//! since the line names the generation that picked the backend (which is how a failover is
//! read from the log). Failures from an older generation (connects still in flight from
//! before a table change) go by the limit, so two generations' failures interleaving cannot
//! lift it.

use std::{collections::HashMap, net::SocketAddr, time::Instant};

use super::LogLimit;

/// Backends remembered at most; past that the memory is cleared (the counts held back are
/// lost with it), and each backend's next failure is logged as a first one. Discovery (DNS)
/// can bring new backend addresses without end; the configured ones are far fewer.
const MAX_BACKENDS: usize = 4096;

/// One worker's limits on connect-failure warnings, per (service index, backend address).
#[derive(Default)]
pub(super) struct ConnectLog {
    backends: HashMap<(usize, SocketAddr), Backend>,
}

/// The newest table generation a failure of the backend was logged for, and its rate limit.
struct Backend {
    generation: u64,
    limit: LogLimit,
}

impl ConnectLog {
    /// `Some(suffix)` when a failed connect of service `service` to backend `addr`, picked
    /// from table generation `generation`, may be logged at `now`: the suffix counts the ones
    /// held back since the backend's last line (empty if none). `None` when this one is
    /// held back (counted for the next line).
    pub(super) fn allow(
        &mut self,
        service: usize,
        addr: SocketAddr,
        generation: u64,
        now: Instant,
    ) -> Option<String> {
        if self.backends.len() >= MAX_BACKENDS && !self.backends.contains_key(&(service, addr)) {
            self.backends.clear();
        }
        let backend = self
            .backends
            .entry((service, addr))
            .or_insert_with(|| Backend {
                generation,
                limit: LogLimit::default(),
            });
        if generation > backend.generation {
            backend.generation = generation;
            // A new period, the count held back so far kept for this line's suffix.
            backend.limit.last = None;
        }
        backend.limit.allow(now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn one_line_a_second_per_backend_and_the_first_of_each_generation_at_once() {
        let mut log = ConnectLog::default();
        let t0 = Instant::now();
        assert_eq!(log.allow(0, addr(80), 1, t0).as_deref(), Some(""));
        assert_eq!(
            log.allow(0, addr(80), 1, t0),
            None,
            "a second failure in the second"
        );
        assert_eq!(log.allow(0, addr(80), 1, t0), None);
        // Another backend, or the same address in another service, has its own limit.
        assert_eq!(log.allow(0, addr(81), 1, t0).as_deref(), Some(""));
        assert_eq!(log.allow(1, addr(80), 1, t0).as_deref(), Some(""));
        // A failure picked from a new table is logged at once, with the count held back.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(
            log.allow(0, addr(80), 2, t1).as_deref(),
            Some(" (2 similar since the last report)")
        );
        assert_eq!(log.allow(0, addr(80), 2, t1), None);
        // A connect from the older table failing now is held back like any other.
        assert_eq!(log.allow(0, addr(80), 1, t1), None, "an older generation");
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(
            log.allow(0, addr(80), 2, t2).as_deref(),
            Some(" (2 similar since the last report)")
        );
    }

    #[test]
    fn the_memory_is_bounded() {
        let mut log = ConnectLog::default();
        let t0 = Instant::now();
        for port in 0..MAX_BACKENDS as u16 {
            assert!(log.allow(0, addr(port), 1, t0).is_some());
        }
        assert_eq!(log.backends.len(), MAX_BACKENDS);
        assert!(
            log.allow(0, addr(0), 1, t0).is_none(),
            "a known backend keeps its limit"
        );
        assert!(log.allow(0, addr(u16::MAX), 1, t0).is_some());
        assert_eq!(
            log.backends.len(),
            1,
            "the memory was cleared for a new backend"
        );
    }
}
