//! Per-client limits of one service (nginx's `limit_conn` and `limit_req`): concurrent
//! connections or sessions per source address, and a token bucket of new ones per source
//! address; and the service's cap on its open connections or sessions (`max_connections` /
//! `max_sessions`), one atomic count checked first.
//!
//! One table per service, shared by every worker (a client's connections are spread over the
//! workers by the kernel's `SO_REUSEPORT` hash, so a per-worker count would let a client have
//! `workers` times its limit). The table is split into [`SHARDS`] mutex-guarded maps by
//! address, so workers admitting different clients rarely contend; it is touched once when a
//! connection or session opens and once when it closes (only with a concurrency limit),
//! never per relayed byte.
//!
//! A UDP client that is refused has no session, so each of its further datagrams would ask
//! again. Each worker remembers its recent refusals instead ([`RecentRefusals`]): until the
//! refusal could have changed (the next token of the client's bucket, at most
//! [`REFUSAL_MEMORY`] later), the client's datagrams are dropped without taking a shard's
//! lock or writing a log line. They are still counted, one refusal per datagram.
//!
//! Memory is bounded: an entry whose client holds nothing and whose bucket is full again is
//! forgotten (each shard prunes at most once a second, when it is next used), and a shard
//! holds at most [`SHARD_ENTRIES`] clients. A new client arriving at a full shard is refused
//! (like nginx when its zone is full): under a flood of distinct addresses the limits keep
//! holding for the clients already tracked, rather than being silently lifted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::ClientLimits;

/// Shards of a table.
const SHARDS: usize = 16;
/// Clients one shard tracks at most (so a table holds at most 262,144, some 20 MiB).
const SHARD_ENTRIES: usize = 16_384;
/// How often a shard forgets idle clients.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// The longest a worker takes a UDP client's refusal as standing without asking again.
pub(super) const REFUSAL_MEMORY: Duration = Duration::from_secs(1);
/// Refused clients one worker remembers at most (some 3 MiB); past that, refusals of new
/// clients are not remembered and their datagrams ask the table again.
const REFUSAL_ENTRIES: usize = 65_536;

/// Why a new connection or session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The client holds `max_connections_per_client` already.
    Connections,
    /// The client's token bucket is empty; its next token comes in `next_token`.
    Rate {
        /// Time until the bucket holds one token again, if the client asks for none meanwhile.
        next_token: Duration,
    },
    /// The table is full of other clients.
    Full,
    /// The service holds `max_connections` / `max_sessions` open flows already.
    ServiceFull,
}

impl Refusal {
    /// How long this refusal stands for sure: an empty bucket until its next token (a bucket
    /// at 0.99 tokens is only milliseconds from one, not a whole `1 / rate`); a client at its
    /// session limit, or a full table, may be admitted as soon as a session ends, which is
    /// not known here, so [`REFUSAL_MEMORY`]. Never more than [`REFUSAL_MEMORY`].
    pub(super) fn stands_for(self) -> Duration {
        match self {
            Refusal::Rate { next_token } => next_token.min(REFUSAL_MEMORY),
            Refusal::Connections | Refusal::Full | Refusal::ServiceFull => REFUSAL_MEMORY,
        }
    }
}

/// A client's admission; pass it to [`ClientTable::release`] when the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Admission {
    /// The address whose concurrency count was raised, if one was.
    held: Option<IpAddr>,
    /// Whether the service's count of open flows was raised.
    counted: bool,
}

struct Entry {
    /// Connections or sessions the client holds now (counted only with a concurrency limit).
    active: u32,
    /// Tokens in the bucket at `refilled`.
    tokens: f64,
    refilled: Instant,
    /// When the bucket is full again if nothing is taken: the entry may go after that.
    full_at: Instant,
}

struct Shard {
    clients: HashMap<IpAddr, Entry>,
    pruned: Instant,
}

/// One service's per-client state, and its count of refusals.
pub(super) struct ClientTable {
    shards: Box<[Mutex<Shard>]>,
    /// The service's open connections or sessions, against its cap.
    open: AtomicU32,
    /// New connections and sessions refused by the limits since the service started.
    pub(super) refused: AtomicU64,
    /// Of those, refused because the service held its cap of open flows.
    pub(super) over_cap: AtomicU64,
}

impl ClientTable {
    pub(super) fn new() -> ClientTable {
        let now = Instant::now();
        ClientTable {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        clients: HashMap::new(),
                        pruned: now,
                    })
                })
                .collect(),
            open: AtomicU32::new(0),
            refused: AtomicU64::new(0),
            over_cap: AtomicU64::new(0),
        }
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<Shard> {
        // The map inside is keyed with a random SipHash key; this only spreads clients.
        let fold = match ip {
            IpAddr::V4(v4) => u32::from(*v4),
            IpAddr::V6(v6) => v6
                .segments()
                .iter()
                .fold(0u32, |h, &s| h.rotate_left(5) ^ u32::from(s)),
        };
        let mixed = fold.wrapping_mul(0x9E37_79B9) >> 28;
        &self.shards[mixed as usize % SHARDS]
    }

    /// Decides whether `ip` may open one more connection or session at `now`: first against
    /// the service's cap of `max_flows` open ones ([`Refusal::ServiceFull`]), then under the
    /// per-client `limits`. On success the service's count went up, the client's bucket lost
    /// a token and, with a concurrency limit, its count went up: release the [`Admission`]
    /// when the connection closes. A refusal is counted in [`ClientTable::refused`] (and in
    /// [`ClientTable::over_cap`] for the cap); a rate refusal says when the next token comes
    /// ([`Refusal::Rate`]), at most an hour ahead.
    pub(super) fn admit(
        &self,
        ip: IpAddr,
        limits: &ClientLimits,
        max_flows: u32,
        now: Instant,
    ) -> Result<Admission, Refusal> {
        // Taken only while under the cap: a refused flow never holds a slot, even for a
        // moment (an add-then-undo would refuse a flow racing with it although one is free).
        let taken = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < max_flows).then(|| open + 1)
            });
        if taken.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.over_cap.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::ServiceFull);
        }
        let result = if limits.max_connections.is_none() && limits.rate.is_none() {
            Ok(Admission {
                held: None,
                counted: true,
            })
        } else {
            self.decide(ip.to_canonical(), limits, now)
        };
        if result.is_err() {
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn decide(
        &self,
        ip: IpAddr,
        limits: &ClientLimits,
        now: Instant,
    ) -> Result<Admission, Refusal> {
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(shard.pruned) >= PRUNE_EVERY {
            shard.pruned = now;
            shard.clients.retain(|_, e| e.active > 0 || e.full_at > now);
        }
        if !shard.clients.contains_key(&ip) && shard.clients.len() >= SHARD_ENTRIES {
            return Err(Refusal::Full);
        }
        let burst = f64::from(limits.burst.max(1));
        let entry = shard.clients.entry(ip).or_insert(Entry {
            active: 0,
            tokens: burst,
            refilled: now,
            full_at: now,
        });
        if limits
            .max_connections
            .is_some_and(|max| entry.active >= max)
        {
            return Err(Refusal::Connections);
        }
        if let Some(rate) = limits.rate {
            let elapsed = now.saturating_duration_since(entry.refilled).as_secs_f64();
            entry.tokens = (entry.tokens + elapsed * rate).min(burst);
            entry.refilled = now;
            if entry.tokens < 1.0 {
                // Past an hour (or not finite, for a rate near 0) means "not soon" to every
                // caller, which caps it lower anyway.
                let next_token = Duration::try_from_secs_f64((1.0 - entry.tokens) / rate)
                    .map_or(Duration::from_secs(3600), |d| {
                        d.min(Duration::from_secs(3600))
                    });
                return Err(Refusal::Rate { next_token });
            }
            entry.tokens -= 1.0;
            let refill = Duration::from_secs_f64(((burst - entry.tokens) / rate).min(3600.0));
            entry.full_at = now + refill;
        }
        let held = limits.max_connections.is_some().then(|| {
            entry.active += 1;
            ip
        });
        Ok(Admission {
            held,
            counted: true,
        })
    }

    /// The connection or session admitted by `admission` has closed.
    pub(super) fn release(&self, admission: Admission) {
        if admission.counted {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
        let Some(ip) = admission.held else {
            return;
        };
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = shard.clients.get_mut(&ip) {
            e.active = e.active.saturating_sub(1);
        }
    }

    /// Clients tracked now (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.clients.len()))
            .sum()
    }
}

/// One worker's recent UDP refusals: (service, client address) → until when the refusal
/// stands. Worker-local, so no lock; bounded to [`REFUSAL_ENTRIES`] clients.
pub(super) struct RecentRefusals {
    until: HashMap<(usize, IpAddr), Instant>,
    pruned: Option<Instant>,
}

impl RecentRefusals {
    pub(super) fn new() -> RecentRefusals {
        RecentRefusals {
            until: HashMap::new(),
            pruned: None,
        }
    }

    /// Whether `ip` was refused by service `service` (the worker's number for it) and the
    /// refusal still stands at `now`.
    pub(super) fn stands(&self, service: usize, ip: IpAddr, now: Instant) -> bool {
        self.until
            .get(&(service, ip.to_canonical()))
            .is_some_and(|&until| now < until)
    }

    /// Remembers that service `service` refused `ip` at `now`, for `stands_for`. Not
    /// remembered when [`REFUSAL_ENTRIES`] other clients are.
    pub(super) fn remember(
        &mut self,
        service: usize,
        ip: IpAddr,
        now: Instant,
        stands_for: Duration,
    ) {
        let key = (service, ip.to_canonical());
        if self.until.len() >= REFUSAL_ENTRIES && !self.until.contains_key(&key) {
            self.prune(now);
            if self.until.len() >= REFUSAL_ENTRIES {
                return;
            }
        }
        self.until.insert(key, now + stands_for);
    }

    /// Forgets the refusal of `ip` by service `service`, if one is remembered: the client
    /// gave a place back, so its next datagram asks the table again.
    pub(super) fn forget(&mut self, service: usize, ip: IpAddr) {
        self.until.remove(&(service, ip.to_canonical()));
    }

    /// Forgets the refusals that no longer stand; does the work at most once per
    /// [`PRUNE_EVERY`].
    pub(super) fn prune(&mut self, now: Instant) {
        if self
            .pruned
            .is_some_and(|at| now.saturating_duration_since(at) < PRUNE_EVERY)
        {
            return;
        }
        self.pruned = Some(now);
        self.until.retain(|_, until| now < *until);
    }

    /// Clients remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cap no test reaches.
    const NO_CAP: u32 = u32::MAX;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal address")
    }

    #[test]
    fn a_client_over_its_connection_limit_is_refused_until_one_closes() {
        let table = ClientTable::new();
        let limits = ClientLimits {
            max_connections: Some(2),
            ..ClientLimits::default()
        };
        let now = Instant::now();
        let a = table
            .admit(ip("10.0.0.1"), &limits, NO_CAP, now)
            .expect("first");
        table
            .admit(ip("10.0.0.1"), &limits, NO_CAP, now)
            .expect("second");
        assert_eq!(
            table.admit(ip("10.0.0.1"), &limits, NO_CAP, now),
            Err(Refusal::Connections)
        );
        table
            .admit(ip("10.0.0.2"), &limits, NO_CAP, now)
            .expect("another client is not affected");
        table.release(a);
        table
            .admit(ip("10.0.0.1"), &limits, NO_CAP, now)
            .expect("a closed connection frees a place");
        assert_eq!(table.refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_rate_allows_a_burst_then_refills_at_the_rate() {
        let table = ClientTable::new();
        let limits = ClientLimits {
            max_connections: None,
            rate: Some(2.0),
            burst: 3,
        };
        let t0 = Instant::now();
        for k in 0..3 {
            assert!(
                table.admit(ip("10.0.0.1"), &limits, NO_CAP, t0).is_ok(),
                "connection {k} of the burst"
            );
        }
        assert_eq!(
            table.admit(ip("10.0.0.1"), &limits, NO_CAP, t0),
            Err(Refusal::Rate {
                next_token: Duration::from_millis(500)
            })
        );
        let later = t0 + Duration::from_millis(500);
        assert!(
            table.admit(ip("10.0.0.1"), &limits, NO_CAP, later).is_ok(),
            "one token after 0.5 s at 2/s"
        );
        assert_eq!(
            table.admit(ip("10.0.0.1"), &limits, NO_CAP, later),
            Err(Refusal::Rate {
                next_token: Duration::from_millis(500)
            })
        );
    }

    #[test]
    fn an_ipv4_mapped_client_is_the_same_client() {
        let table = ClientTable::new();
        let limits = ClientLimits {
            max_connections: Some(1),
            ..ClientLimits::default()
        };
        let now = Instant::now();
        table
            .admit(ip("10.0.0.1"), &limits, NO_CAP, now)
            .expect("first");
        assert_eq!(
            table.admit(ip("::ffff:10.0.0.1"), &limits, NO_CAP, now),
            Err(Refusal::Connections)
        );
    }

    #[test]
    fn idle_clients_are_forgotten() {
        let table = ClientTable::new();
        let limits = ClientLimits {
            max_connections: Some(5),
            rate: Some(10.0),
            burst: 10,
        };
        let t0 = Instant::now();
        for k in 0..100u32 {
            let a = table
                .admit(
                    IpAddr::from(std::net::Ipv4Addr::from(k)),
                    &limits,
                    NO_CAP,
                    t0,
                )
                .expect("admitted");
            table.release(a);
        }
        let held = table
            .admit(ip("10.9.9.9"), &limits, NO_CAP, t0)
            .expect("admitted");
        assert_eq!(table.tracked(), 101);
        // Every bucket is full again after 0.1 s; pruning happens on the next use of a
        // shard after a second, so touch every shard.
        let later = t0 + Duration::from_secs(2);
        for k in 0..1000u32 {
            let a = table
                .admit(
                    IpAddr::from(std::net::Ipv4Addr::from(k + 1_000_000)),
                    &limits,
                    NO_CAP,
                    later,
                )
                .expect("admitted");
            table.release(a);
        }
        assert!(
            table.tracked() <= 1001,
            "idle clients are still tracked: {}",
            table.tracked()
        );
        table.release(held);
    }

    #[test]
    fn no_per_client_limits_track_no_client_but_count_against_the_cap() {
        let table = ClientTable::new();
        let now = Instant::now();
        let mut held = Vec::new();
        for _ in 0..10 {
            let a = table
                .admit(ip("10.0.0.1"), &ClientLimits::default(), NO_CAP, now)
                .expect("no limit refuses");
            assert_eq!(a.held, None);
            held.push(a);
        }
        assert_eq!(table.tracked(), 0);
        assert_eq!(table.open.load(Ordering::Relaxed), 10);
        for a in held {
            table.release(a);
        }
        assert_eq!(table.open.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_service_cap_refuses_every_client_until_a_flow_closes() {
        let table = ClientTable::new();
        let now = Instant::now();
        let limits = ClientLimits::default();
        let a = table.admit(ip("10.0.0.1"), &limits, 2, now).expect("first");
        let b = table
            .admit(ip("10.0.0.2"), &limits, 2, now)
            .expect("second");
        assert_eq!(
            table.admit(ip("10.0.0.3"), &limits, 2, now),
            Err(Refusal::ServiceFull)
        );
        assert_eq!(table.over_cap.load(Ordering::Relaxed), 1);
        assert_eq!(table.refused.load(Ordering::Relaxed), 1);
        table.release(a);
        let c = table
            .admit(ip("10.0.0.3"), &limits, 2, now)
            .expect("a slot came free");
        // A per-client refusal gives the service's slot back at once.
        let strict = ClientLimits {
            max_connections: Some(1),
            ..ClientLimits::default()
        };
        table.release(b);
        let d = table
            .admit(ip("10.0.0.4"), &strict, 3, now)
            .expect("fourth");
        assert_eq!(
            table.admit(ip("10.0.0.4"), &strict, 3, now),
            Err(Refusal::Connections)
        );
        assert_eq!(table.open.load(Ordering::Relaxed), 2);
        table.release(c);
        table.release(d);
        assert_eq!(table.open.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_refusal_stands_until_the_next_token_and_never_past_a_second() {
        let table = ClientTable::new();
        let limits = ClientLimits {
            max_connections: None,
            rate: Some(1.0),
            burst: 1,
        };
        let t0 = Instant::now();
        table
            .admit(ip("10.0.0.1"), &limits, NO_CAP, t0)
            .expect("the burst");
        let refusal = table
            .admit(
                ip("10.0.0.1"),
                &limits,
                NO_CAP,
                t0 + Duration::from_millis(990),
            )
            .expect_err("0.99 tokens is not a token");
        let stands = refusal.stands_for();
        assert!(
            stands > Duration::from_millis(9) && stands <= Duration::from_millis(10),
            "a bucket 10 ms from its next token kept refusing for {stands:?}"
        );
        assert!(
            table
                .admit(
                    ip("10.0.0.1"),
                    &limits,
                    NO_CAP,
                    t0 + Duration::from_millis(990) + stands
                )
                .is_ok(),
            "the token was there when the refusal stopped standing"
        );
        assert_eq!(Refusal::Connections.stands_for(), REFUSAL_MEMORY);
        assert_eq!(Refusal::Full.stands_for(), REFUSAL_MEMORY);
        let slow = ClientLimits {
            rate: Some(0.1),
            ..limits
        };
        table
            .admit(ip("10.0.0.2"), &slow, NO_CAP, t0)
            .expect("the burst");
        let refusal = table
            .admit(ip("10.0.0.2"), &slow, NO_CAP, t0)
            .expect_err("an empty bucket");
        assert_eq!(
            refusal,
            Refusal::Rate {
                next_token: Duration::from_secs(10)
            }
        );
        assert_eq!(refusal.stands_for(), REFUSAL_MEMORY);
    }

    #[test]
    fn a_worker_remembers_a_refusal_for_its_service_and_client_only_while_it_stands() {
        let mut recent = RecentRefusals::new();
        let t0 = Instant::now();
        recent.remember(3, ip("10.0.0.1"), t0, Duration::from_millis(500));
        assert!(recent.stands(3, ip("10.0.0.1"), t0 + Duration::from_millis(499)));
        assert!(
            recent.stands(3, ip("::ffff:10.0.0.1"), t0),
            "an IPv4-mapped address is the same client"
        );
        assert!(!recent.stands(3, ip("10.0.0.2"), t0), "another client");
        assert!(!recent.stands(4, ip("10.0.0.1"), t0), "another service");
        assert!(
            !recent.stands(3, ip("10.0.0.1"), t0 + Duration::from_millis(500)),
            "the refusal no longer stands once its time is up"
        );
        recent.remember(3, ip("10.0.0.1"), t0, REFUSAL_MEMORY);
        recent.forget(3, ip("::ffff:10.0.0.1"));
        assert!(
            !recent.stands(3, ip("10.0.0.1"), t0),
            "a forgotten refusal no longer stands"
        );
        recent.prune(t0 + Duration::from_secs(2));
        assert_eq!(
            recent.len(),
            0,
            "a refusal that no longer stands is forgotten"
        );
    }

    #[test]
    fn a_worker_remembers_a_bounded_number_of_refused_clients() {
        let mut recent = RecentRefusals::new();
        let t0 = Instant::now();
        for k in 0..(REFUSAL_ENTRIES as u32 + 100) {
            let client = IpAddr::from(std::net::Ipv4Addr::from(k));
            recent.remember(0, client, t0, REFUSAL_MEMORY);
        }
        assert_eq!(recent.len(), REFUSAL_ENTRIES);
        // Once the old ones no longer stand, new ones are remembered again.
        let later = t0 + REFUSAL_MEMORY + PRUNE_EVERY;
        recent.remember(0, ip("192.0.2.1"), later, REFUSAL_MEMORY);
        assert!(recent.stands(0, ip("192.0.2.1"), later));
        assert_eq!(recent.len(), 1);
    }
}
