//! The SNAT ports of a `nat` service: its range (the configured one, checked against the
//! host's ephemeral ports, or by default the widest range outside them), and how many of them
//! a walk of `NAT_REVERSE` finds taken ([`snat_in_use`]).
//!
//! The balancer's own connections (health checks, DNS) take source ports from
//! `net.ipv4.ip_local_port_range`; a SNAT port inside it could be the source port of such a
//! connection to the same backend, and the program would translate that connection's replies
//! for a client. So the two must not overlap.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;

use lb_common::maps::{
    ct_age, nat_flags, nat_seen, words_addr, NatReverse, CT_REFRESH_SECS, NAT_F_CLAIMED,
    NAT_F_ENDED, NAT_F_TIME_WAIT, SNAT_QUIET_S,
};
use lb_common::FlowKey;
use thiserror::Error;

/// Where the host's ephemeral port range is read from (in the daemon's network namespace).
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// The lowest SNAT port: ports below 1024 are privileged services' ports.
const FIRST_PORT: u16 = 1024;

/// Why a service gets no SNAT range.
#[derive(Debug, Error)]
pub enum SnatRangeError {
    /// The configured `snat_ports` overlap the host's ephemeral ports.
    #[error(
        "snat_ports [{0}, {1}] overlap this host's net.ipv4.ip_local_port_range [{2}, {3}]: the \
         balancer's own connections could take a SNAT port; move one of them"
    )]
    Overlap(u16, u16, u16, u16),
    /// Outside the host's ephemeral ports there is no room for 1024 ports.
    #[error(
        "net.ipv4.ip_local_port_range [{0}, {1}] leaves fewer than 1024 ports for SNAT; narrow \
         it or set snat_ports"
    )]
    NoRoom(u16, u16),
    /// The host's range could not be read.
    #[error("cannot read {LOCAL_PORT_RANGE}: {0}")]
    Read(#[from] io::Error),
}

/// The SNAT range for a service configured with `configured` (`None`: the default), on a host
/// whose ephemeral ports are read from `/proc`. See [`choose`].
pub fn range(configured: Option<(u16, u16)>) -> Result<(u16, u16), SnatRangeError> {
    let text = std::fs::read_to_string(LOCAL_PORT_RANGE)?;
    let mut words = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (words.next(), words.next()) else {
        return Err(SnatRangeError::Read(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected two ports, found {text:?}"),
        )));
    };
    choose(configured, (lo, hi))
}

/// The SNAT range, inclusive, given the host's ephemeral range `local` (inclusive):
/// `configured` if it does not overlap `local` (`Err(Overlap)` if it does), else the larger
/// of `1024..local.0` and `local.1 + 1..=65535` (`Err(NoRoom)` when neither holds 1024
/// ports). With Linux's default ephemeral range (32768-60999) the default is 1024-32767.
pub fn choose(
    configured: Option<(u16, u16)>,
    local: (u16, u16),
) -> Result<(u16, u16), SnatRangeError> {
    let (lo, hi) = local;
    if let Some((first, last)) = configured {
        if first <= hi && lo <= last {
            return Err(SnatRangeError::Overlap(first, last, lo, hi));
        }
        return Ok((first, last));
    }
    let below = (lo > FIRST_PORT).then(|| (FIRST_PORT, lo - 1));
    let above = (hi < u16::MAX).then(|| (hi + 1, u16::MAX));
    let len = |r: &(u16, u16)| u32::from(r.1 - r.0) + 1;
    [below, above]
        .into_iter()
        .flatten()
        .filter(|r| len(r) >= 1024)
        .max_by_key(len)
        .ok_or(SnatRangeError::NoRoom(lo, hi))
}

/// How a `nat` service's SNAT ports are held, for [`snat_in_use`]: its `snat_port_hold` and
/// idle timeout, whole seconds (idle 0: never idle).
#[derive(Debug, Clone, Copy)]
pub struct SnatTimes {
    /// `Service::snat_hold_s` as written to the map.
    pub hold_s: u32,
    /// `Limits::idle_timeout_s` as written to the map.
    pub idle_s: u32,
}

/// SNAT ports not free, per (service id, local address, backend address) among `entries`
/// (`NAT_REVERSE`'s),
/// at `now_s`, for the service ids in `services`: a port is taken while its flow is open (not
/// ended, seen within the idle timeout) and while it is held after the flow ended (the
/// program's rule, "SNAT ports" in `lb_common::maps`). Entries of other services are left
/// out; a backend with no port taken is absent.
pub fn snat_in_use(
    entries: impl IntoIterator<Item = (FlowKey, NatReverse)>,
    services: &HashMap<u32, SnatTimes>,
    now_s: u32,
) -> HashMap<(u32, std::net::IpAddr, SocketAddr), u64> {
    let mut used = HashMap::new();
    for (key, r) in entries {
        let Some(t) = services.get(&r.service) else {
            continue;
        };
        let flags = nat_flags(r.state);
        let age = ct_age(now_s, nat_seen(r.state));
        let taken = if flags & NAT_F_CLAIMED != 0 {
            true
        } else if flags & NAT_F_ENDED != 0 {
            let hold = if flags & NAT_F_TIME_WAIT != 0 {
                t.hold_s
            } else {
                t.hold_s.min(SNAT_QUIET_S)
            };
            age < hold
        } else {
            // Idle as the program sees it; a TCP port also waits out the hold (the backend
            // may have closed it into TIME_WAIT unseen).
            let idle = t.idle_s != 0 && age > t.idle_s.saturating_add(CT_REFRESH_SECS + 1);
            !(idle && (key.protocol == lb_common::flow::IPPROTO_UDP || age >= t.hold_s))
        };
        if !taken {
            continue;
        }
        // The reply key: source the backend, destination the local address.
        let (Some(backend), Some(local)) = (
            words_addr(key.family, &key.src_addr),
            words_addr(key.family, &key.dst_addr),
        ) else {
            continue;
        };
        let backend = SocketAddr::new(backend, key.src_port);
        *used.entry((r.service, local, backend)).or_insert(0) += 1;
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_widest_room_outside_the_ephemeral_ports() {
        let cases = [
            // Linux's default ephemeral range.
            ((32768, 60999), Ok((1024, 32767))),
            // The test topologies' balancer namespaces.
            ((32768, 39999), Ok((1024, 32767))),
            ((1024, 39999), Ok((40000, 65535))),
            // No room on either side.
            ((1024, 65000), Err(())),
        ];
        for (local, want) in cases {
            let got = choose(None, local).map_err(|_| ());
            assert_eq!(got, want, "ephemeral ports {local:?}");
        }
    }

    #[test]
    fn a_configured_range_must_stay_outside_the_ephemeral_ports() {
        assert_eq!(
            choose(Some((61000, 65535)), (32768, 60999)).ok(),
            Some((61000, 65535))
        );
        let e = choose(Some((60000, 62000)), (32768, 60999)).expect_err("overlap");
        assert!(e.to_string().contains("overlap"), "{e}");
    }

    #[test]
    fn snat_ports_are_taken_while_open_or_held() {
        use lb_common::maps::{addr_words, nat_state, NAT_F_FIN_BACKEND, NAT_F_FIN_CLIENT};
        let backend: SocketAddr = "10.0.2.11:8080".parse().expect("addr");
        let key = |port: u16| FlowKey {
            src_addr: addr_words(backend.ip()),
            dst_addr: addr_words("10.0.2.1".parse().expect("addr")),
            src_port: backend.port(),
            dst_port: port,
            protocol: 6,
            family: lb_common::maps::FAMILY_V4,
            _pad: [0; 2],
        };
        let entry = |port: u16, service: u32, state: u64| {
            (
                key(port),
                NatReverse {
                    service,
                    state,
                    ..NatReverse::default()
                },
            )
        };
        let now = 10_000;
        let services: HashMap<u32, SnatTimes> = [(
            0,
            SnatTimes {
                hold_s: 60,
                idle_s: 30,
            },
        )]
        .into();
        let both = NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND | NAT_F_ENDED;
        let entries = [
            // Open, seen now.
            entry(1, 0, nat_state(now, 0)),
            // Idle past the timeout and its lag, but a TCP port waits out the hold too.
            entry(2, 0, nat_state(now - 40, 0)),
            // Idle past both: free.
            entry(6, 0, nat_state(now - 70, 0)),
            // The backend closed first 10 s ago: held 60 s.
            entry(3, 0, nat_state(now - 10, both | NAT_F_TIME_WAIT)),
            // The client closed first 10 s ago: held only the quiet time.
            entry(4, 0, nat_state(now - 10, both)),
            // Another service's port.
            entry(5, 7, nat_state(now, 0)),
        ];
        let used = snat_in_use(entries, &services, now);
        let local: std::net::IpAddr = "10.0.2.1".parse().expect("addr");
        assert_eq!(used.get(&(0, local, backend)), Some(&3), "{used:?}");
        assert_eq!(used.len(), 1, "{used:?}");
    }
}
