//! Open flows per backend on XDP, for `/status`'s `active` and the metrics' active gauge: the
//! program sees no connection end the way the proxy's sockets do, so the sync thread counts
//! the `CONNTRACK` entries that still stand for an open flow, every [`EVERY`] (or less often
//! when a walk is long) while the counters are being read, and not at all otherwise.
//!
//! An entry counts as open when no FIN or RST of its flow closed it ([`CT_F_CLOSED`], set on
//! the ends `lb-ebpf` watches, see `lb_common::maps` "Per-client limits") and it was seen
//! within its service's idle timeout (plus the lag of the stored time, as the program ages
//! entries: "Conntrack ageing"). A TCP flow that ended unseen (the balancer missed its FIN)
//! or a UDP session that went quiet thus leaves the count within the idle timeout. The count
//! errs low in two cases: a half-closed flow (on `nat` the backend's FIN, on `dsr` the
//! client's) leaves it though data may still flow the other way, and so does a TCP
//! connection idle past the idle timeout without keepalives. A drain on XDP reaching zero is
//! therefore a strong sign its flows are done, not a proof. The walk
//! costs one lookup per entry (up to `CONNTRACK_SIZE`), on the sync thread and outside the
//! plane's lock (see `map_walk.rs`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lb_common::maps::{ct_age, CtEntry, CT_F_CLOSED, CT_REFRESH_SECS};
use lb_common::FlowKey;

/// How often the open flows are counted at most.
pub const EVERY: Duration = Duration::from_secs(5);
/// How long after a read of the counters (`/status`, `/metrics`) the counts are kept up: a
/// daemon nobody asks walks nothing.
pub const WANTED_FOR: Duration = Duration::from_secs(30);
/// A walk may take at most 1/`SHARE` of the time between two walks: a big, busy `CONNTRACK`
/// (two syscalls an entry) is counted less often rather than taking a core from the proxy
/// and the softirqs.
const SHARE: u32 = 20;

/// When the next count is due.
pub struct WalkPacing {
    next: Instant,
}

impl WalkPacing {
    /// Pacing whose first walk is due as soon as it is wanted.
    pub fn new() -> WalkPacing {
        WalkPacing {
            next: Instant::now(),
        }
    }

    /// Whether a count is due now: the counters were read within [`WANTED_FOR`] (`wanted`:
    /// when last) and the time set by [`WalkPacing::walked`] has come.
    pub fn due(&self, wanted: Option<Instant>) -> bool {
        let now = Instant::now();
        now >= self.next && wanted.is_some_and(|at| now.duration_since(at) < WANTED_FOR)
    }

    /// A walk took `took`: the next is due [`EVERY`] from now, or later for a long walk, so
    /// that walking takes at most 1/20 of the sync thread's time.
    pub fn walked(&mut self, took: Duration) {
        self.walked_within(took, EVERY);
    }

    /// Like [`walked`](Self::walked), with the next walk due `every` from now at the soonest.
    pub fn walked_within(&mut self, took: Duration, every: Duration) {
        self.next = Instant::now() + every.max(took * SHARE);
    }
}

impl Default for WalkPacing {
    fn default() -> Self {
        WalkPacing::new()
    }
}

/// Open flows per backend id among `entries` (`CONNTRACK`'s), at `now_s` (seconds of
/// `CLOCK_MONOTONIC_COARSE`, the program's clock), for the backend ids in `idle_s` (id → its
/// service's idle timeout in whole seconds, 0 for never). Entries naming other ids are left
/// out (ids of no running service); an id with no open flow is absent.
pub fn count(
    entries: impl IntoIterator<Item = (FlowKey, CtEntry)>,
    idle_s: &HashMap<u32, u32>,
    now_s: u32,
) -> HashMap<u32, u64> {
    let mut open = HashMap::new();
    for (_, e) in entries {
        let Some(&idle) = idle_s.get(&e.backend) else {
            continue;
        };
        if e.flags & CT_F_CLOSED != 0 || idle_past(&e, idle, now_s) {
            continue;
        }
        *open.entry(e.backend).or_insert(0) += 1;
    }
    open
}

/// Whether conntrack entry `e` of a service whose idle timeout is `idle` whole seconds (0:
/// never) was last seen longer ago than that at `now_s` ([`now_s`]), with the lag of the
/// stored time allowed for, as the program ages entries ("Conntrack ageing").
fn idle_past(e: &CtEntry, idle: u32, now_s: u32) -> bool {
    idle != 0 && ct_age(now_s, e.seen_s) > idle.saturating_add(CT_REFRESH_SECS + 1)
}

/// Seconds of `CLOCK_MONOTONIC_COARSE` now, the clock the program stamps conntrack and NAT
/// times with (`lb_common::maps::ct_seconds`); `None` if the clock cannot be read.
pub fn now_s() -> Option<u32> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).ok()?;
    Some(ts.tv_sec() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::CT_F_COUNTED;

    fn entry(backend: u32, flags: u16, seen_s: u32) -> (FlowKey, CtEntry) {
        (
            FlowKey::default(),
            CtEntry {
                backend,
                snat_port: 0,
                flags,
                seen_s,
            },
        )
    }

    #[test]
    fn open_flows_are_the_unclosed_entries_seen_within_the_idle_timeout() {
        let idle: HashMap<u32, u32> = [(1, 30), (2, 0)].into();
        let now = 1_000;
        let entries = [
            entry(1, 0, now),
            entry(1, CT_F_COUNTED, now - 30),
            // Within the stored time's lag of the timeout: still open.
            entry(1, 0, now - 30 - CT_REFRESH_SECS - 1),
            // Past it: a flow gone quiet.
            entry(1, 0, now - 30 - CT_REFRESH_SECS - 2),
            // Closed by a FIN or RST.
            entry(1, CT_F_CLOSED, now),
            entry(1, CT_F_COUNTED | CT_F_CLOSED, now),
            // No idle timeout: open however old.
            entry(2, 0, now.wrapping_sub(100_000)),
            // Not a running service's backend.
            entry(3, 0, now),
        ];
        let open = count(entries, &idle, now);
        assert_eq!(open.get(&1), Some(&3));
        assert_eq!(open.get(&2), Some(&1));
        assert_eq!(open.get(&3), None);
    }

    #[test]
    fn a_count_is_due_only_when_wanted_and_not_before_its_time() {
        let mut c = WalkPacing::new();
        assert!(!c.due(None), "nobody read the counters: no walk");
        assert!(c.due(Some(Instant::now())));
        c.walked(Duration::from_millis(10));
        assert!(!c.due(Some(Instant::now())), "walked just now");
        let mut slow = WalkPacing::new();
        slow.walked(Duration::from_secs(1));
        assert!(
            slow.next >= Instant::now() + Duration::from_secs(19),
            "a 1 s walk must wait 20 s"
        );
    }

    #[test]
    fn the_clock_is_the_programs() {
        assert!(now_s().is_some_and(|s| s > 0));
    }
}
