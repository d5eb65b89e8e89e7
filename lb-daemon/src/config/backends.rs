//! A service's `[[service.backend]]` list: addresses (`ip:port` or `name:port`), unique
//! within the service, and weights.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use toml::Spanned;

use super::raw::RawBackend;
use super::validate::Validator;
use super::{Backend, ConfigError, DnsBackend, Protocol, MAX_WEIGHT};
use crate::host_addrs;

/// Every service's listen address, to refuse a backend that is one of them: its flows would
/// come back into the balancer, which would connect to itself until descriptors run out. And
/// the admin API's TCP address: a service in front of it would serve the API to its clients.
pub(super) struct OwnListens {
    listens: HashMap<(SocketAddr, Protocol), String>,
    /// `[admin] listen`, if the API listens on TCP at a fixed port.
    admin: Option<SocketAddr>,
    /// This host's addresses, read only when a listen address is a wildcard.
    local: BTreeSet<IpAddr>,
}

impl OwnListens {
    /// From the services' (listen address, protocol) -> name, and the admin API's TCP
    /// address (`admin`; port 0, a free port picked at start, is left out).
    pub(super) fn new(
        listens: HashMap<(SocketAddr, Protocol), String>,
        admin: Option<SocketAddr>,
    ) -> Self {
        let admin = admin.filter(|a| a.port() != 0);
        let wildcard =
            (listens.keys().map(|(l, _)| l).chain(&admin)).any(|l| l.ip().is_unspecified());
        let local = if wildcard {
            // Unreadable: loopback and wildcard backends are still caught.
            host_addrs::local_addresses().unwrap_or_default()
        } else {
            BTreeSet::new()
        };
        OwnListens {
            listens,
            admin,
            local,
        }
    }

    /// Whether a TCP connect to `backend` would reach the admin API.
    fn reaches_admin(&self, backend: SocketAddr) -> bool {
        (self.admin).is_some_and(|a| host_addrs::reaches_listener(backend, a, &self.local))
    }

    /// Whether a TCP connect to `name:port` would reach the admin API for certain: `name` is
    /// `localhost` (or below it, RFC 6761: always loopback) and the API listens at `port` on
    /// loopback or a wildcard. Other names are looked up only at run time.
    fn name_reaches_admin(&self, name: &str, port: u16) -> bool {
        let name = name.to_ascii_lowercase();
        let local = name == "localhost" || name.ends_with(".localhost");
        (self.admin).is_some_and(|a| {
            local && a.port() == port && (a.ip().is_loopback() || a.ip().is_unspecified())
        })
    }

    /// The service whose listener a `protocol` connect to `backend` would reach, if any.
    fn reached_by(&self, backend: SocketAddr, protocol: Protocol) -> Option<&str> {
        self.listens.iter().find_map(|((listen, p), name)| {
            (*p == protocol && host_addrs::reaches_listener(backend, *listen, &self.local))
                .then_some(name.as_str())
        })
    }
}

impl Validator<'_> {
    /// Service `i`'s backends in file order, split into those given as `ip:port` and those
    /// given as `name:port`. Each backend's address is checked, then its uniqueness, then
    /// its weight, before the next backend.
    ///
    /// Returns `Err` (`service[i].backend[j].address`) for an address that is not `ip:port`
    /// or `name:port` (a name ending in digits is a mistyped IPv4 address), a port 0, a
    /// duplicate, one of the config's own listen addresses (`own`) for the same `protocol`,
    /// or, for TCP, the admin API's address.
    pub(super) fn backends(
        &self,
        i: usize,
        raw: Vec<Spanned<RawBackend>>,
        protocol: Protocol,
        own: &OwnListens,
    ) -> Result<(Vec<Backend>, Vec<DnsBackend>), ConfigError> {
        let mut backends = Vec::with_capacity(raw.len());
        let mut discovered = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (j, b) in raw.into_iter().enumerate() {
            let b = b.into_inner();
            let addr_span = b.address.span();
            let text = b.address.into_inner();
            let address = parse_backend_address(text.trim()).map_err(|message| {
                self.invalid(
                    addr_span.clone(),
                    format!("service[{i}].backend[{j}].address"),
                    message,
                )
            })?;
            let key = match &address {
                Ok(a) => a.to_string(),
                Err((host, port)) => format!("{}:{port}", host.to_ascii_lowercase()),
            };
            if let Some(first) = seen.insert(key.clone(), j) {
                return Err(self.invalid(
                    addr_span,
                    format!("service[{i}].backend[{j}].address"),
                    format!("duplicate backend {key} (also backend[{first}])"),
                ));
            }
            let admin = match &address {
                Ok(a) => own.reaches_admin(*a),
                Err((name, port)) => own.name_reaches_admin(name, *port),
            };
            if protocol == Protocol::Tcp && admin {
                return Err(self.invalid(
                    addr_span,
                    format!("service[{i}].backend[{j}].address"),
                    format!(
                        "backend {key} is the admin API's address (`[admin] listen`) on this \
                         host: the service would serve the API to its clients"
                    ),
                ));
            }
            if let Ok(a) = &address {
                if let Some(service) = own.reached_by(*a, protocol) {
                    return Err(self.invalid(
                        addr_span,
                        format!("service[{i}].backend[{j}].address"),
                        format!(
                            "backend {a} is the listen address of service `{service}` on this \
                             host: its flows would come back into the balancer"
                        ),
                    ));
                }
            }
            let weight = self.weight(i, j, b.weight)?;
            match address {
                Ok(address) => backends.push(Backend { address, weight }),
                Err((host, port)) => discovered.push(DnsBackend { host, port, weight }),
            }
        }
        Ok((backends, discovered))
    }

    /// Backend `j`'s `weight`: `0..=MAX_WEIGHT`, 1 by default.
    fn weight(&self, i: usize, j: usize, raw: Option<Spanned<i64>>) -> Result<u32, ConfigError> {
        let Some(w) = raw else {
            return Ok(1);
        };
        let v = *w.get_ref();
        if !(0..=i64::from(MAX_WEIGHT)).contains(&v) {
            return Err(self.invalid(
                w.span(),
                format!("service[{i}].backend[{j}].weight"),
                format!("weight {v} is out of range 0..={MAX_WEIGHT} (0 drains)"),
            ));
        }
        // In range 0..=MAX_WEIGHT just above, so it fits.
        Ok(v as u32)
    }

    /// At least one backend of service `name` takes new flows (weight above 0).
    pub(super) fn some_weight(
        &self,
        i: usize,
        svc_span: &Range<usize>,
        name: &str,
        backends: &[Backend],
        discovered: &[DnsBackend],
    ) -> Result<(), ConfigError> {
        if backends
            .iter()
            .map(|b| b.weight)
            .chain(discovered.iter().map(|d| d.weight))
            .all(|w| w == 0)
        {
            return Err(self.invalid(
                svc_span.clone(),
                format!("service[{i}].backend"),
                format!("every backend has weight 0 in service `{name}`; at least one must take new flows"),
            ));
        }
        Ok(())
    }
}

/// A backend address: `Ok(ip:port)`, or `Err((name, port))` for a DNS name to resolve.
/// The outer `Err` says why the text is neither.
type BackendAddress = Result<SocketAddr, (String, u16)>;

/// Parses a backend's `address` text; the `Err` is the message for the user.
fn parse_backend_address(text: &str) -> Result<BackendAddress, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err(format!("`{text}` has port 0; a backend needs a real port"));
        }
        if let Some(message) = super::validate::ipv4_mapped(a.ip(), Some(a.port())) {
            return Err(message);
        }
        return Ok(Ok(a));
    }
    let hint = "write it as \"IPv4:port\", \"[IPv6]:port\" or \"name:port\"";
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("invalid socket address `{text}`: no port; {hint}"));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("invalid socket address `{text}`: `{port}` is not a port; {hint}"))?;
    // A DNS name (RFC 1123 labels); anything else, an IPv6 address without brackets say, is
    // a typo and better refused than looked up.
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
        return Err(format!(
            "invalid socket address `{text}`: `{host}` is neither an IP address nor a DNS name; {hint}"
        ));
    }
    // A name's last label is never all digits (RFC 3696 §2): `10.0.0.256` is a mistyped
    // address, and the resolver would read one such as `10.0.0.010` as octal (10.0.0.8).
    if name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|c| c.is_ascii_digit()))
    {
        return Err(format!(
            "invalid socket address `{text}`: `{host}` is not a valid IPv4 address (each part \
             0 to 255, no leading zero), and a DNS name cannot end in digits; {hint}"
        ));
    }
    if port == 0 {
        return Err(format!("`{text}` has port 0; a backend needs a real port"));
    }
    Ok(Err((name.to_string(), port)))
}
