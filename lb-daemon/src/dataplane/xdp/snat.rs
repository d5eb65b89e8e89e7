//! The SNAT port range of a `nat` service: the configured one, checked against the host's
//! ephemeral ports, or by default the widest range outside them.
//!
//! The balancer's own connections (health checks, DNS) take source ports from
//! `net.ipv4.ip_local_port_range`; a SNAT port inside it could be the source port of such a
//! connection to the same backend, and the program would translate that connection's replies
//! for a client. So the two must not overlap.

use std::io;

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
}
