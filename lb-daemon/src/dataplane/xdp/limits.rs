//! Per-client limits on XDP, daemon side: writing each service's `[service.limits]` (and its
//! `idle_timeout`, which ages its conntrack entries) into `LIMITS`, and bounding the connection counts that conntrack evictions leak in `CLIENTS`.
//!
//! The program applies the limits (lb-ebpf's `limits.rs`); the map contract and the races it
//! allows are in `lb_common::maps` ("Per-client limits"). A service's entry is written with
//! every snapshot the sync thread publishes (a reload that changes `[service.limits]` makes
//! a new snapshot), before its VIP is published the first time.
//!
//! # The sweep
//!
//! A counted TCP flow gives its client's slot back on its first FIN or RST. If `CONNTRACK`
//! evicts the flow's entry first, or the flow ends unseen (a SYN the backend refused or
//! never answered, a client gone without a word), the slot is never given back: the
//! client's count stays one too high. Every [`SWEEP_EVERY`] (10 s), while some XDP service
//! has `max_connections_per_client`, [`Sweeper::tick`] counts the open counted flows of each
//! client in `CONNTRACK` (not closed, and whose slot has not expired: idle past the
//! service's idle timeout and a grace more, `lb_common::maps::slot_expired`) and lowers a
//! client's count that is above it. A flow whose slot expired gives it back this way only
//! (see "Per-client limits" in `lb_common::maps`). It only lowers, and only by the excess it saw in two
//! sweeps in a row: a flow admitted a moment before the count was read (its conntrack entry
//! not yet written) is not mistaken for a leak. A leak thus lasts at most two sweeps. The
//! write itself is a read and an update of one entry; a flow the program admits or closes
//! for that client between the two (microseconds) is lost from the count, one flow's error.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::time::{Duration, Instant};

use aya::maps::{Array, MapData};
use aya::Ebpf;
use lb_common::maps::{self as contract, ClientKey, Limits, VipKey, CT_F_CLOSED, CT_F_COUNTED};
use lb_common::{FlowKey, Stat};
use tracing::{info, warn};

use super::bpf_map::{io, take, MapsError};
use super::map_walk::MapWalk;
use crate::config::{ClientLimits, Protocol};

/// How often the refusal counters are looked at for the log.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// How often the sweep runs. It reads all of `CONNTRACK` and `CLIENTS` (two syscalls per
/// entry, up to some 100 ms for full maps) on the sync thread but without the `State` lock
/// (see `map_walk.rs`): it delays the sync thread's next table write by as much, never a reload
/// or a counters read.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The `LIMITS` value of `limits` for a service of `protocol` whose `idle_timeout` is
/// `idle_timeout`.
///
/// The rate becomes a token interval of `round(1e9 / rate)` ns (at least 1; rates are at most
/// 1,000,000/s, so the rounding error is below 0.05%), the bucket `burst` such intervals. The
/// connection limit is written for TCP only: the daemon keeps UDP services that have one on
/// the proxy (see `placement::why_not_xdp`), so a UDP entry never carries it.
///
/// `idle_timeout` becomes the conntrack idle timeout in whole seconds, rounded up, at least 1
/// and at most `u32::MAX` (see "Conntrack ageing" in `lb_common::maps`): for UDP it ends a
/// session as the proxy's timeout does; for TCP it only lets a SYN reusing an idle 5-tuple
/// start afresh, which the proxy would have closed by then as well.
pub fn value(limits: &ClientLimits, protocol: Protocol, idle_timeout: Duration) -> Limits {
    let interval_ns = match limits.rate {
        Some(rate) if rate > 0.0 => ((1e9 / rate).round() as u64).max(1),
        _ => 0,
    };
    let burst = u64::from(limits.burst.max(1));
    Limits {
        interval_ns,
        burst_ns: interval_ns.saturating_mul(burst),
        max_connections: match protocol {
            Protocol::Tcp => limits.max_connections.unwrap_or(0),
            Protocol::Udp => 0,
        },
        idle_timeout_s: idle_seconds(idle_timeout),
    }
}

/// `idle_timeout` in whole seconds for [`Limits::idle_timeout_s`]: rounded up (an entry is
/// never aged before the timeout), at least 1 (0 would mean never), saturating.
pub(super) fn idle_seconds(idle_timeout: Duration) -> u32 {
    let secs = idle_timeout
        .as_secs()
        .saturating_add(u64::from(idle_timeout.subsec_nanos() > 0));
    u32::try_from(secs).unwrap_or(u32::MAX).max(1)
}

/// `LIMITS`, taken out of the loaded object with the other maps the `State` lock guards, and
/// which service ids have a connection limit.
pub struct LimitMaps {
    limits: Array<MapData, Limits>,
    /// Service ids of running services with `max_connections_per_client`: only their
    /// clients' counts are swept. A removed service leaves the set at once (its table is
    /// empty, it admits no flow, its counts no longer matter) and its `CLIENTS` entries are
    /// deleted when its id is released.
    limited: HashSet<u32>,
}

impl LimitMaps {
    /// Takes `LIMITS` out of `ebpf`.
    ///
    /// Returns `Err(MapsError::Missing)` when it is absent or has another layout.
    pub fn take(ebpf: &mut Ebpf) -> Result<LimitMaps, MapsError> {
        Ok(LimitMaps {
            limits: take(ebpf, contract::LIMITS)?,
            limited: HashSet::new(),
        })
    }

    /// Writes `limits` and `idle_timeout` (the service's) as service `id`'s `LIMITS` entry;
    /// `protocol` is the service's.
    ///
    /// Returns `Err(MapsError::Io)` when the update fails.
    pub fn write(
        &mut self,
        id: u32,
        protocol: Protocol,
        limits: &ClientLimits,
        idle_timeout: Duration,
    ) -> Result<(), MapsError> {
        let v = value(limits, protocol, idle_timeout);
        self.limits.set(id, v, 0).map_err(io(contract::LIMITS))?;
        if v.max_connections > 0 {
            self.limited.insert(id);
        } else {
            self.limited.remove(&id);
        }
        Ok(())
    }

    /// Service `id` was removed: its clients' counts are no longer swept.
    pub fn forget(&mut self, id: u32) {
        self.limited.remove(&id);
    }

    /// Service `id` is released: its `LIMITS` entry goes back to zeroes (no limit), so the
    /// next service given the id starts from what an entry never written reads as.
    ///
    /// Returns `Err(MapsError::Io)` when the update fails.
    pub fn clear(&mut self, id: u32) -> Result<(), MapsError> {
        self.limited.remove(&id);
        self.limits
            .set(id, Limits::default(), 0)
            .map_err(io(contract::LIMITS))
    }

    /// Whether service `id` has a connection limit.
    pub fn limited(&self, id: u32) -> bool {
        self.limited.contains(&id)
    }
}

/// What a sweep needs to know of the running services, copied under the `State` lock: the
/// VIP key and id of each running service with a connection limit, in the order they were
/// placed (a reload that replaces a service at the same VIP places the new one before it
/// removes the old; the later one owns the VIP and wins).
#[derive(Debug, Clone, Default)]
pub struct SweepView {
    /// (VIP key, service id).
    pub services: Vec<(VipKey, u32)>,
    /// Service id → its idle timeout in whole seconds ([`idle_seconds`]).
    pub idle_s: StdHashMap<u32, u32>,
}

impl SweepView {
    fn by_vip(&self) -> StdHashMap<VipKey, u32> {
        self.services.iter().copied().collect()
    }

    fn ids(&self) -> HashSet<u32> {
        self.services.iter().map(|&(_, id)| id).collect()
    }
}

/// Open counted flows per client of the services in `by_vip`, from `CONNTRACK`: not closed,
/// and whose slot has not expired ([`contract::slot_expired`] of the service's idle timeout,
/// `idle_s`) at `now_s` (`None`: the clock could not be read, every flow not closed counts);
/// `None` when the walk did not reach the end (the flows not reached would look like leaks).
fn tracked(
    walk: &MapWalk,
    by_vip: &StdHashMap<VipKey, u32>,
    idle_s: &StdHashMap<u32, u32>,
    now_s: Option<u32>,
) -> Option<StdHashMap<ClientKey, u64>> {
    let mut tracked = StdHashMap::new();
    // Entries evicted or added while walking may be skipped or seen (twice, after a restart
    // of the walk): the two-sweep rule absorbs that, and a count is never raised.
    let mut entries = walk.conntrack_entries();
    for (flow, entry) in entries.by_ref() {
        if entry.flags & CT_F_COUNTED == 0 || entry.flags & CT_F_CLOSED != 0 {
            continue;
        }
        let vip = VipKey {
            addr: flow.dst_addr,
            port: flow.dst_port,
            protocol: flow.protocol,
            family: vip_family(&flow),
        };
        let Some(&service) = by_vip.get(&vip) else {
            continue;
        };
        let idle = idle_s.get(&service).copied().unwrap_or(0);
        let age = |now| contract::ct_age(now, entry.seen_s);
        if now_s.is_some_and(|now| contract::slot_expired(age(now), idle)) {
            continue;
        }
        *tracked
            .entry(ClientKey {
                service,
                addr: flow.src_addr,
            })
            .or_insert(0) += 1;
    }
    if !entries.complete() {
        return None;
    }
    Some(tracked)
}

/// The family of a conntrack key's VIP: IPv4 addresses leave words 1..4 zero. (An IPv6 VIP of
/// the form `x::` would read as IPv4 here; it is then not matched, and its clients' leaks are
/// not swept.)
fn vip_family(flow: &FlowKey) -> u8 {
    if flow.dst_addr[1..] == [0, 0, 0] {
        contract::FAMILY_V4
    } else {
        contract::FAMILY_V6
    }
}

/// The periodic work of the sync thread for limits: the sweep, and a log line when the limits
/// refused flows since the last one.
pub struct Sweeper {
    reported: Instant,
    swept: Instant,
    /// Each client's excess at the previous sweep.
    excess: StdHashMap<ClientKey, u64>,
    /// `RefusedClientRate` and `RefusedClientConnections` at the previous look.
    refused: (u64, u64),
}

impl Default for Sweeper {
    fn default() -> Sweeper {
        Sweeper::new()
    }
}

impl Sweeper {
    /// A sweeper whose first sweep is [`SWEEP_EVERY`] from now.
    pub fn new() -> Sweeper {
        Sweeper {
            reported: Instant::now(),
            swept: Instant::now(),
            excess: StdHashMap::new(),
            refused: (0, 0),
        }
    }

    /// Logs refusals every [`REPORT_EVERY`], from the global counters `stats` reads (by
    /// `lb_common::Stat` index); call it often, under the `State` lock.
    pub fn report(&mut self, stats: impl FnOnce() -> Result<Vec<u64>, MapsError>) {
        if self.reported.elapsed() >= REPORT_EVERY {
            self.reported = Instant::now();
            if let Ok(stats) = stats() {
                self.log_refusals(&stats);
            }
        }
    }

    /// Whether a sweep is due ([`SWEEP_EVERY`] since the last); `true` starts the period
    /// again, so the caller then sweeps.
    pub fn due(&mut self) -> bool {
        if self.swept.elapsed() < SWEEP_EVERY {
            return false;
        }
        self.swept = Instant::now();
        true
    }

    /// Sweeps the clients of the services in `view` (see the module doc), through `walk`,
    /// without the `State` lock; logs what it gave back.
    pub fn sweep(&mut self, walk: &mut MapWalk, view: &SweepView) {
        if view.services.is_empty() {
            self.excess.clear();
            return;
        }
        let lowered = self.sweep_once(walk, view);
        if lowered > 0 {
            info!(
                "XDP limits: gave back {lowered} connection slots held by flows that ended \
                 unseen (evicted from conntrack, or idle past the idle timeout)"
            );
        }
    }

    fn log_refusals(&mut self, stats: &[u64]) {
        let get = |s: Stat| stats.get(s as usize).copied().unwrap_or(0);
        let now = (
            get(Stat::RefusedClientRate),
            get(Stat::RefusedClientConnections),
        );
        if now != self.refused {
            info!(
                "XDP limits: refused {} new flows over a client's rate and {} over a client's \
                 connections since the last report (totals: {} and {})",
                now.0.saturating_sub(self.refused.0),
                now.1.saturating_sub(self.refused.1),
                now.0,
                now.1
            );
            self.refused = now;
        }
    }

    /// One sweep; returns the slots given back.
    fn sweep_once(&mut self, walk: &mut MapWalk, view: &SweepView) -> u64 {
        // An unfinished walk proves no leak: this sweep lowers nothing, and the next one
        // compares with the sweep before it.
        let now_s = super::open_flows::now_s();
        let Some(tracked) = tracked(walk, &view.by_vip(), &view.idle_s, now_s) else {
            return 0;
        };
        let ids = view.ids();
        let mut excess = StdHashMap::new();
        let mut lowered = 0;
        let (keys, _) = walk.client_keys();
        for key in keys {
            // Only running services with a connection limit: a removed service's entries
            // wait for its release, another's have no count that matters.
            if !ids.contains(&key.service) || excess.contains_key(&key) {
                continue;
            }
            let Some(state) = walk.client(&key) else {
                continue;
            };
            let open = tracked.get(&key).copied().unwrap_or(0);
            let previous = self.excess.get(&key).copied().unwrap_or(0);
            let (now, lower) = leak(state.connections, open, previous);
            if now == 0 {
                continue;
            }
            excess.insert(key, now);
            if lower == 0 {
                continue;
            }
            match walk.lower_client(&key, lower) {
                Ok(true) => {
                    lowered += lower;
                    excess.insert(key, now - lower);
                }
                Ok(false) => {}
                Err(e) => warn!("XDP limits: cannot lower a client's connection count: {e}"),
            }
        }
        self.excess = excess;
        lowered
    }
}

/// One client in a sweep: its count `connections`, its `open` counted flows in conntrack and
/// its excess at the previous sweep. Returns its excess now and how much to lower the count:
/// the excess seen in both sweeps, so a moment's difference is never taken for a leak.
///
/// A count the program reads as negative (two releases raced past zero, see
/// `lb-ebpf/src/limits.rs`) is no leak: the program's next admission brings it back.
fn leak(connections: u64, open: u64, previous: u64) -> (u64, u64) {
    if (connections as i64) < 0 {
        return (0, 0);
    }
    let now = connections.saturating_sub(open);
    (now, now.min(previous))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vip_is_swept_under_the_service_placed_last_there() {
        let vip = VipKey::new("10.200.100.1:80".parse().expect("literal"), 6);
        let other = VipKey::new("10.200.100.2:80".parse().expect("literal"), 6);
        // Service 7 replaced service 3 at the same VIP (placed after it, removed later).
        let view = SweepView {
            services: vec![(vip, 3), (other, 5), (vip, 7)],
            idle_s: StdHashMap::new(),
        };
        let by_vip = view.by_vip();
        assert_eq!(
            by_vip.get(&vip),
            Some(&7),
            "the newest service owns the VIP"
        );
        assert_eq!(by_vip.get(&other), Some(&5));
    }

    #[test]
    fn only_an_excess_seen_twice_is_given_back_and_counts_are_never_raised() {
        assert_eq!(leak(3, 1, 0), (2, 0), "a first sighting is not a leak yet");
        assert_eq!(leak(3, 1, 2), (2, 2), "seen twice: give back 2");
        assert_eq!(
            leak(3, 2, 2),
            (1, 1),
            "a flow tracked late lowers the excess"
        );
        assert_eq!(leak(2, 1, 1), (1, 1));
        assert_eq!(
            leak(u64::MAX, 0, 5),
            (0, 0),
            "a count wrapped to -1 by racing releases is not a leak of 2^64 slots"
        );
        assert_eq!(
            leak(1, 3, 5),
            (0, 0),
            "more tracked flows than counted: nothing to lower, never raised"
        );
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn idle_timeouts_become_whole_seconds_rounded_up_and_never_zero() {
        let idle = |d: Duration| value(&ClientLimits::default(), Protocol::Udp, d).idle_timeout_s;
        assert_eq!(idle(MINUTE), 60);
        assert_eq!(idle(Duration::from_millis(1500)), 2, "rounded up");
        assert_eq!(idle(Duration::from_millis(1)), 1, "0 would mean never");
        assert_eq!(idle(Duration::from_secs(u64::MAX)), u32::MAX, "saturates");
    }

    #[test]
    fn rates_become_token_intervals_and_bursts_their_multiples() {
        let l = value(
            &ClientLimits {
                max_connections: Some(3),
                rate: Some(0.01),
                burst: 4,
            },
            Protocol::Tcp,
            MINUTE,
        );
        assert_eq!(l.interval_ns, 100_000_000_000, "0.01/s is one per 100 s");
        assert_eq!(l.burst_ns, 400_000_000_000);
        assert_eq!(l.max_connections, 3);

        let l = value(
            &ClientLimits {
                max_connections: None,
                rate: Some(1_000_000.0),
                burst: 1_000_000,
            },
            Protocol::Tcp,
            MINUTE,
        );
        assert_eq!((l.interval_ns, l.burst_ns), (1_000, 1_000_000_000));
        assert_eq!(l.max_connections, 0, "no connection limit is written as 0");
    }

    #[test]
    fn no_limits_is_all_zeroes_and_udp_never_carries_a_connection_limit() {
        assert_eq!(
            value(&ClientLimits::default(), Protocol::Tcp, MINUTE),
            Limits {
                idle_timeout_s: 60,
                ..Limits::default()
            },
            "an unlimited service must read as the zeroes of an entry never written, \
             but for its idle timeout"
        );
        let udp = value(
            &ClientLimits {
                max_connections: Some(2),
                rate: Some(3.0),
                burst: 3,
            },
            Protocol::Udp,
            MINUTE,
        );
        assert_eq!(udp.max_connections, 0);
        assert_eq!(udp.interval_ns, 333_333_333);
    }
}
