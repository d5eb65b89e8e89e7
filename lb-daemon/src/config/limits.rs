//! A service's `[service.limits]` (per-client connection and new-connection-rate limits),
//! and its cap on open flows, `max_connections` (TCP) or `max_sessions` (UDP).

use toml::Spanned;

use super::raw::RawLimits;
use super::validate::Validator;
use super::{ClientLimits, ConfigError, Protocol};

/// The most `max_connections` / `max_sessions` may be set to.
pub const MAX_FLOWS: u32 = 10_000_000;

/// File descriptors the default caps leave to everything else: listeners, health checks,
/// the admin API, the BPF maps, logs.
const RESERVED_FDS: u64 = 256;

/// The open file limit (soft), which the daemon raises to its hard limit at start; 1024 (the
/// usual default) when it cannot be read.
pub fn open_file_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// A service's cap on open flows when the config sets none, from the open file limit
/// `nofile` (after the daemon raised it to its hard limit): a TCP connection holds about 6
/// descriptors (two sockets and the two pipes of its relay), a UDP session one socket, of
/// which the default lets UDP take half. At least 64, at most [`MAX_FLOWS`]. The default keeps
/// one service from taking every descriptor (which would fail health checks and other
/// services' accepts); several busy services on one host should set theirs lower.
pub fn default_max_flows(protocol: Protocol, nofile: u64) -> u32 {
    let budget = nofile.saturating_sub(RESERVED_FDS);
    let flows = match protocol {
        Protocol::Tcp => budget / 6,
        Protocol::Udp => budget / 2,
    };
    flows.clamp(64, u64::from(MAX_FLOWS)) as u32
}

impl Validator<'_> {
    /// `max_connections` (TCP services only) or `max_sessions` (UDP only), 1..=[`MAX_FLOWS`];
    /// `None` when not set. The key of the other protocol is an error naming it.
    pub(super) fn max_flows(
        &self,
        i: usize,
        protocol: Protocol,
        max_connections: Option<Spanned<u32>>,
        max_sessions: Option<Spanned<u32>>,
    ) -> Result<Option<u32>, ConfigError> {
        let (given, wrong, key, other) = match protocol {
            Protocol::Tcp => (
                max_connections,
                max_sessions,
                "max_connections",
                "max_sessions",
            ),
            Protocol::Udp => (
                max_sessions,
                max_connections,
                "max_sessions",
                "max_connections",
            ),
        };
        if let Some(w) = wrong {
            return Err(self.invalid(
                w.span(),
                format!("service[{i}].{other}"),
                format!("a {protocol} service caps its flows with `{key}`, not `{other}`"),
            ));
        }
        match given {
            None => Ok(None),
            Some(m) if (1..=MAX_FLOWS).contains(m.get_ref()) => Ok(Some(m.into_inner())),
            Some(m) => Err(self.invalid(
                m.span(),
                format!("service[{i}].{key}"),
                format!("{} is out of range 1..={MAX_FLOWS}", m.get_ref()),
            )),
        }
    }

    /// `max_connections_per_client`, `new_connections_per_second`, then `burst` (which needs
    /// the rate); each up to a million. No table means no limits.
    pub(super) fn limits(
        &self,
        i: usize,
        raw: Option<RawLimits>,
    ) -> Result<ClientLimits, ConfigError> {
        let f = |k: &str| format!("service[{i}].limits.{k}");
        let Some(raw) = raw else {
            return Ok(ClientLimits::default());
        };
        const MAX: u32 = 1_000_000;
        let max_connections = match raw.max_connections_per_client {
            None => None,
            Some(m) if (1..=MAX).contains(m.get_ref()) => Some(m.into_inner()),
            Some(m) => {
                return Err(self.invalid(
                    m.span(),
                    f("max_connections_per_client"),
                    format!("{} is out of range 1..={MAX}", m.get_ref()),
                ))
            }
        };
        let rate = match raw.new_connections_per_second {
            None => None,
            Some(r)
                if r.get_ref().is_finite()
                    && *r.get_ref() > 0.0
                    && *r.get_ref() <= f64::from(MAX) =>
            {
                Some(r.into_inner())
            }
            Some(r) => {
                return Err(self.invalid(
                    r.span(),
                    f("new_connections_per_second"),
                    format!("{} must be above 0 and at most {MAX}", r.get_ref()),
                ))
            }
        };
        let burst = match (raw.burst, rate) {
            (None, None) => 0,
            // Like nginx's limit_req without `burst`: no more than the rate allows.
            (None, Some(r)) => r.ceil() as u32,
            (Some(b), None) => {
                return Err(self.invalid(
                    b.span(),
                    f("burst"),
                    "burst needs new_connections_per_second".into(),
                ))
            }
            (Some(b), Some(_)) if (1..=MAX).contains(b.get_ref()) => b.into_inner(),
            (Some(b), Some(_)) => {
                return Err(self.invalid(
                    b.span(),
                    f("burst"),
                    format!("{} is out of range 1..={MAX}", b.get_ref()),
                ))
            }
        };
        Ok(ClientLimits {
            max_connections,
            rate,
            burst,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse;

    fn service(protocol: &str, extra: &str) -> String {
        format!(
            "[[service]]\nname = \"s\"\nlisten = \"127.0.0.1:5300\"\nprotocol = \"{protocol}\"\n\
             {extra}\n[[service.backend]]\naddress = \"127.0.0.1:5301\"\n"
        )
    }

    #[test]
    fn the_cap_of_each_protocol_is_its_own_key() {
        let tcp = parse(
            &service("tcp", "max_connections = 500"),
            Path::new("t.toml"),
        )
        .expect("a TCP cap");
        assert_eq!(tcp.services[0].max_flows, Some(500));
        let udp =
            parse(&service("udp", "max_sessions = 40"), Path::new("t.toml")).expect("a UDP cap");
        assert_eq!(udp.services[0].max_flows, Some(40));
        let unset = parse(&service("tcp", ""), Path::new("t.toml")).expect("no cap");
        assert_eq!(unset.services[0].max_flows, None);
        let wrong = parse(&service("udp", "max_connections = 40"), Path::new("t.toml"))
            .expect_err("max_connections on a UDP service");
        let text = wrong.to_string();
        assert!(
            text.contains("service[0].max_connections") && text.contains("max_sessions"),
            "the error names the key and the right one: {text}"
        );
        let zero = parse(&service("tcp", "max_connections = 0"), Path::new("t.toml"))
            .expect_err("a cap of 0");
        assert!(zero.to_string().contains("out of range"), "{zero}");
    }

    #[test]
    fn the_default_cap_follows_the_open_file_limit() {
        // 1,048,576 descriptors (systemd's LimitNOFILE in the unit): about 174k connections.
        assert_eq!(default_max_flows(Protocol::Tcp, 1_048_576), 174_720);
        assert_eq!(default_max_flows(Protocol::Udp, 1_048_576), 524_160);
        // The common soft limit of 1024: 128 connections, never fewer than 64.
        assert_eq!(default_max_flows(Protocol::Tcp, 1024), 128);
        assert_eq!(default_max_flows(Protocol::Tcp, 64), 64);
        assert_eq!(default_max_flows(Protocol::Udp, u64::MAX), MAX_FLOWS);
    }
}
