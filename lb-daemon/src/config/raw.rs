//! The file's shape as serde sees it: every key, with its span for error messages, before
//! any rule is checked.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::{DataplaneKind, Forwarding, Protocol, ProxyProtocol, SchedulerKind};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) global: RawGlobal,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) service: Vec<Spanned<RawService>>,
    pub(super) announce: Option<Spanned<RawAnnounce>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    pub(super) table: Spanned<u32>,
    pub(super) protocol: Option<Spanned<u32>>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) withdraw_wait: Option<Spanned<Duration>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGlobal {
    pub(super) workers: Option<Spanned<usize>>,
    pub(super) worker_priority: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) drain_timeout: Option<Spanned<Duration>>,
    pub(super) bpf_object: Option<Spanned<PathBuf>>,
    pub(super) bpf_pin_dir: Option<Spanned<PathBuf>>,
    pub(super) upgrade_socket: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    /// An address, or "" for none.
    pub(super) listen: Option<Spanned<String>>,
    pub(super) socket: Option<Spanned<PathBuf>>,
    pub(super) group: Option<Spanned<String>>,
    pub(super) token_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: Spanned<String>,
    pub(super) listen: Spanned<SocketAddr>,
    pub(super) protocol: Protocol,
    #[serde(default)]
    pub(super) scheduler: SchedulerKind,
    #[serde(default)]
    pub(super) dataplane: DataplaneKind,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) connect_timeout: Option<Spanned<Duration>>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) idle_timeout: Option<Spanned<Duration>>,
    pub(super) retries: Option<Spanned<u32>>,
    pub(super) table_size: Option<Spanned<u32>>,
    pub(super) health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    pub(super) backend: Vec<Spanned<RawBackend>>,
    #[serde(default)]
    pub(super) proxy_protocol: Option<Spanned<ProxyProtocol>>,
    pub(super) limits: Option<RawLimits>,
    pub(super) max_connections: Option<Spanned<u32>>,
    pub(super) max_sessions: Option<Spanned<u32>>,
    pub(super) access_log: Option<Spanned<bool>>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) slow_start: Option<Spanned<Duration>>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) resolve_interval: Option<Spanned<Duration>>,
    // XDP keys; validated in `Validator::xdp`.
    pub(super) interface: Option<Spanned<String>>,
    pub(super) backend_interfaces: Option<Spanned<Vec<String>>>,
    pub(super) forwarding: Option<Spanned<Forwarding>>,
    pub(super) local_address: Option<Spanned<Addresses>>,
    pub(super) snat_ports: Option<Spanned<[u16; 2]>>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) snat_port_hold: Option<Spanned<Duration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections_per_client: Option<Spanned<u32>>,
    pub(super) new_connections_per_second: Option<Spanned<f64>>,
    pub(super) burst: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: Spanned<String>,
    pub(super) weight: Option<Spanned<i64>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawCheckKind {
    Tcp,
    Http,
    Udp,
    None,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) kind: Option<Spanned<RawCheckKind>>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) interval: Option<Spanned<Duration>>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) timeout: Option<Spanned<Duration>>,
    pub(super) rise: Option<Spanned<u32>>,
    pub(super) fall: Option<Spanned<u32>>,
    #[serde(default, deserialize_with = "de_duration")]
    pub(super) passive_timeout: Option<Spanned<Duration>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) expect_status: Option<Spanned<u16>>,
    pub(super) host: Option<Spanned<String>>,
    pub(super) send: Option<Spanned<String>>,
    pub(super) expect: Option<Spanned<String>>,
}

/// `local_address`: one address, or a list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Addresses(pub(super) Vec<IpAddr>);

impl<'de> Deserialize<'de> for Addresses {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OneOrMany;
        impl<'de> serde::de::Visitor<'de> for OneOrMany {
            type Value = Addresses;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an IP address, or a list of IP addresses")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Addresses, E> {
                ip(s).map(|a| Addresses(vec![a]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Addresses, A::Error> {
                let mut all = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    all.push(ip(&s)?);
                }
                Ok(Addresses(all))
            }
        }
        d.deserialize_any(OneOrMany)
    }
}

fn ip<E: serde::de::Error>(s: &str) -> Result<IpAddr, E> {
    s.trim()
        .parse()
        .map_err(|_| E::custom(format!("`{s}` is not an IP address")))
}

/// The longest duration any key takes: a year. Longer ones are mistakes, and would overflow
/// the clock arithmetic (`Instant + d`) of the timers that use them.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Durations are written in human units: "5s", "250ms", "1m 30s"; at most [`MAX_DURATION`].
pub(super) fn de_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Spanned<Duration>>, D::Error> {
    let s = Spanned::<String>::deserialize(d)?;
    let span = s.span();
    let value = humantime::parse_duration(s.get_ref().trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{}` is not a duration ({e}); write it like \"5s\" or \"250ms\"",
            s.get_ref()
        ))
    })?;
    if value > MAX_DURATION {
        return Err(serde::de::Error::custom(format!(
            "`{}` is longer than the longest duration lb takes, a year (\"365d\")",
            s.get_ref()
        )));
    }
    Ok(Some(Spanned::new(span, value)))
}

/// The XDP keys of one `[[service]]` as written, before validation.
pub(super) struct RawXdp {
    pub(super) interface: Option<Spanned<String>>,
    pub(super) backend_interfaces: Option<Spanned<Vec<String>>>,
    pub(super) forwarding: Option<Spanned<Forwarding>>,
    pub(super) local_address: Option<Spanned<Addresses>>,
    pub(super) snat_ports: Option<Spanned<[u16; 2]>>,
    pub(super) snat_port_hold: Option<Spanned<Duration>>,
}

impl RawXdp {
    /// The XDP keys of `svc`, copied out so the rest of it can be validated (and consumed)
    /// after them.
    pub(super) fn of(svc: &RawService) -> RawXdp {
        RawXdp {
            interface: svc.interface.clone(),
            backend_interfaces: svc.backend_interfaces.clone(),
            forwarding: svc.forwarding.clone(),
            local_address: svc.local_address.clone(),
            snat_ports: svc.snat_ports.clone(),
            snat_port_hold: svc.snat_port_hold.clone(),
        }
    }

    /// The first XDP key given, in the order of the fields (with `interface` only when
    /// `with_interface`), and its span.
    pub(super) fn first_given(&self, with_interface: bool) -> Option<(&'static str, Range<usize>)> {
        [
            self.interface
                .as_ref()
                .filter(|_| with_interface)
                .map(|v| ("interface", v.span())),
            self.backend_interfaces
                .as_ref()
                .map(|v| ("backend_interfaces", v.span())),
            self.forwarding.as_ref().map(|v| ("forwarding", v.span())),
            self.local_address
                .as_ref()
                .map(|v| ("local_address", v.span())),
            self.snat_ports.as_ref().map(|v| ("snat_ports", v.span())),
            self.snat_port_hold
                .as_ref()
                .map(|v| ("snat_port_hold", v.span())),
        ]
        .into_iter()
        .flatten()
        .next()
    }
}
