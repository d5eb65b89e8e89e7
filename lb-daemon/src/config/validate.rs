//! Validation: from the file's shape ([`super::raw`]) to the typed [`super::Config`], each
//! error naming the file, line and field. The health check and XDP rules are in
//! `health.rs` and `xdp.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawConfig, RawLimits, RawService};
use super::xdp::{RawXdp, XdpContext};
use super::{
    locate, Admin, Backend, ClientLimits, Config, ConfigError, DnsBackend, Global, Protocol,
    ProxyProtocol, Service, DEFAULT_ADMIN_LISTEN, DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE, MAX_WEIGHT,
    MAX_WORKERS,
};

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) path: &'a Path,
}

impl Validator<'_> {
    pub(super) fn invalid(
        &self,
        span: Range<usize>,
        field: String,
        message: String,
    ) -> ConfigError {
        ConfigError::Invalid {
            location: locate(self.text, self.path, &span),
            field,
            message,
        }
    }

    pub(super) fn positive(
        &self,
        d: Option<Spanned<Duration>>,
        default: Duration,
        field: impl FnOnce() -> String,
    ) -> Result<Duration, ConfigError> {
        match d {
            None => Ok(default),
            Some(d) if d.get_ref().is_zero() => {
                Err(self.invalid(d.span(), field(), "must be longer than 0".into()))
            }
            Some(d) => Ok(d.into_inner()),
        }
    }

    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.service.is_empty() {
            return Err(self.invalid(
                0..0,
                "service".into(),
                "no [[service]] is configured; a config needs at least one".into(),
            ));
        }
        let global = Global {
            workers: match raw.global.workers {
                None => 0,
                Some(n) if *n.get_ref() <= MAX_WORKERS => n.into_inner(),
                Some(n) => {
                    return Err(self.invalid(
                        n.span(),
                        "global.workers".into(),
                        format!(
                            "{} is more than {MAX_WORKERS}; 0 means one per core",
                            n.get_ref()
                        ),
                    ))
                }
            },
            drain_timeout: self.positive(
                raw.global.drain_timeout,
                Duration::from_secs(30),
                || "global.drain_timeout".into(),
            )?,
            bpf_object: raw.global.bpf_object,
        };
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut listens: HashMap<(SocketAddr, Protocol), String> = HashMap::new();
        let mut services = Vec::with_capacity(raw.service.len());
        for (i, svc) in raw.service.into_iter().enumerate() {
            let svc_span = svc.span();
            let svc = svc.into_inner();
            let name_span = svc.name.span();
            let name = svc.name.get_ref().clone();
            if name.trim().is_empty() {
                return Err(self.invalid(
                    name_span,
                    format!("service[{i}].name"),
                    "is empty".into(),
                ));
            }
            if let Some(first) = names.insert(name.clone(), i) {
                return Err(self.invalid(
                    name_span,
                    format!("service[{i}].name"),
                    format!("duplicate service name `{name}` (also service[{first}])"),
                ));
            }
            let listen_span = svc.listen.span();
            let listen = *svc.listen.get_ref();
            if let Some(other) = listens.insert((listen, svc.protocol), name.clone()) {
                return Err(self.invalid(
                    listen_span,
                    format!("service[{i}].listen"),
                    format!("duplicate listen address {listen} (also service `{other}`)"),
                ));
            }
            services.push(self.service(i, svc_span, name, listen, svc)?);
        }
        let admin = Admin {
            listen: raw.admin.listen.unwrap_or(DEFAULT_ADMIN_LISTEN),
            socket: match raw.admin.socket {
                None => None,
                Some(p) if p.get_ref().is_absolute() => Some(p.into_inner()),
                Some(p) => {
                    return Err(self.invalid(
                        p.span(),
                        "admin.socket".into(),
                        format!("`{}` must be an absolute path", p.get_ref().display()),
                    ))
                }
            },
        };
        Ok(Config {
            global,
            admin,
            services,
        })
    }

    pub(super) fn service(
        &self,
        i: usize,
        svc_span: Range<usize>,
        name: String,
        listen: SocketAddr,
        svc: RawService,
    ) -> Result<Service, ConfigError> {
        let f = |k: &str| format!("service[{i}].{k}");
        let retries = match svc.retries {
            None => 2,
            Some(r) if *r.get_ref() > 100 => {
                return Err(self.invalid(r.span(), f("retries"), "must be at most 100".into()))
            }
            Some(r) => r.into_inner(),
        };
        let table_size_span = svc
            .table_size
            .as_ref()
            .map_or(svc_span.clone(), |m| m.span());
        let table_size = match svc.table_size {
            None => DEFAULT_TABLE_SIZE,
            Some(m) => {
                let v = *m.get_ref();
                if !is_prime(v) || v > MAX_TABLE_SIZE {
                    return Err(self.invalid(
                        m.span(),
                        f("table_size"),
                        format!(
                            "{v} must be a prime no larger than {MAX_TABLE_SIZE} (65537 is the default)"
                        ),
                    ));
                }
                v
            }
        };
        if svc.backend.is_empty() {
            return Err(self.invalid(
                svc_span.clone(),
                f("backend"),
                format!("service `{name}` has no [[service.backend]]; it needs at least one"),
            ));
        }
        let xdp = self.xdp(
            i,
            &XdpContext {
                name_span: svc.name.span(),
                listen,
                dataplane: svc.dataplane,
                scheduler: svc.scheduler,
                backends: &svc.backend,
            },
            RawXdp {
                interface: svc.interface.clone(),
                backend_interfaces: svc.backend_interfaces.clone(),
                forwarding: svc.forwarding.clone(),
                local_address: svc.local_address.clone(),
                snat_ports: svc.snat_ports.clone(),
                snat_port_hold: svc.snat_port_hold,
            },
        )?;
        let mut backends = Vec::with_capacity(svc.backend.len());
        let mut discovered = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (j, b) in svc.backend.into_iter().enumerate() {
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
            let weight = match b.weight {
                None => 1,
                Some(w) => {
                    let v = *w.get_ref();
                    if !(0..=i64::from(MAX_WEIGHT)).contains(&v) {
                        return Err(self.invalid(
                            w.span(),
                            format!("service[{i}].backend[{j}].weight"),
                            format!("weight {v} is out of range 0..={MAX_WEIGHT} (0 drains)"),
                        ));
                    }
                    v as u32
                }
            };
            match address {
                Ok(address) => backends.push(Backend { address, weight }),
                Err((host, port)) => discovered.push(DnsBackend { host, port, weight }),
            }
        }
        if backends
            .iter()
            .map(|b| b.weight)
            .chain(discovered.iter().map(|d| d.weight))
            .all(|w| w == 0)
        {
            return Err(self.invalid(
                svc_span.clone(),
                f("backend"),
                format!("every backend has weight 0 in service `{name}`; at least one must take new flows"),
            ));
        }
        if (table_size as usize) < backends.len() {
            return Err(self.invalid(
                table_size_span,
                f("table_size"),
                format!(
                    "table size {table_size} is smaller than the {} backends",
                    backends.len()
                ),
            ));
        }
        let health = self.health(i, svc.protocol, svc.health)?;
        Ok(Service {
            name,
            listen,
            protocol: svc.protocol,
            scheduler: svc.scheduler,
            dataplane: svc.dataplane,
            connect_timeout: self.positive(svc.connect_timeout, Duration::from_secs(5), || {
                f("connect_timeout")
            })?,
            idle_timeout: self.positive(
                svc.idle_timeout,
                match svc.protocol {
                    Protocol::Tcp => Duration::from_secs(600),
                    Protocol::Udp => Duration::from_secs(30),
                },
                || f("idle_timeout"),
            )?,
            retries,
            table_size,
            health,
            backends,
            discovered,
            resolve_interval: self.positive(
                svc.resolve_interval,
                Duration::from_secs(5),
                || f("resolve_interval"),
            )?,
            slow_start: match svc.slow_start {
                None => None,
                Some(d) => Some(self.positive(Some(d), Duration::ZERO, || f("slow_start"))?),
            },
            proxy_protocol: match svc.proxy_protocol {
                None => ProxyProtocol::Off,
                Some(p) if *p.get_ref() == ProxyProtocol::V1 && svc.protocol == Protocol::Udp => {
                    return Err(self.invalid(
                        p.span(),
                        f("proxy_protocol"),
                        "PROXY protocol v1 carries only TCP; use \"v2\" for a UDP service".into(),
                    ))
                }
                Some(p) => p.into_inner(),
            },
            limits: self.limits(i, svc.limits)?,
            access_log: svc.access_log,
            xdp,
        })
    }

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

/// A backend address: `Ok(ip:port)`, or `Err((name, port))` for a DNS name to resolve.
/// The outer `Err` says why the text is neither.
type BackendAddress = Result<SocketAddr, (String, u16)>;

fn parse_backend_address(text: &str) -> Result<BackendAddress, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
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
    if port == 0 {
        return Err(format!("`{text}` has port 0; a backend needs a real port"));
    }
    Ok(Err((name.to_string(), port)))
}

/// Whether `n` is prime (trial division; fine for table sizes up to 2^24).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}
