//! The configuration file: parsing and validation. The only module that knows TOML.
//!
//! A config is a list of `[[service]]` tables, each with its `[[service.backend]]` list and an
//! optional `[service.health]` table, plus an optional `[global]` table. `config/lb.toml`
//! documents every key. Every error names the file, the line and column, and the field
//! (`service[1].backend[0].weight`), so a user can go straight to it.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// The largest backend weight; 0 means draining. The same range as HAProxy's `weight`.
pub const MAX_WEIGHT: u32 = 256;
pub use crate::maglev::DEFAULT_TABLE_SIZE;
/// The most proxy worker threads `global.workers` may ask for: each has a ring, listeners
/// and buffers, and more threads than this on any one host only contend.
pub const MAX_WORKERS: usize = 1024;
/// The largest Maglev table size accepted: 2^24 entries keeps one table under 64 MiB of u32s.
pub const MAX_TABLE_SIZE: u32 = 16_777_259;

/// A parsed and validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Process-wide settings from `[global]`.
    pub global: Global,
    /// Where the admin API listens (`[admin]`).
    pub admin: Admin,
    /// The services, in file order; names and listen addresses are unique.
    pub services: Vec<Service>,
}

/// Process-wide settings (`[global]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// Proxy worker threads, each with its own io_uring; `0` in the file means one per core.
    pub workers: usize,
    /// On SIGTERM/SIGINT, how long open connections may take to finish before the daemon exits.
    pub drain_timeout: Duration,
    /// `bpf_object`: the BPF object with the XDP programs; `None` means the default search
    /// (see `dataplane::xdp::loader::find_object`).
    pub bpf_object: Option<PathBuf>,
}

/// The admin API's addresses (`[admin]`): status, metrics, drain/enable/weight, reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// TCP address of the HTTP admin API; default `127.0.0.1:9100`. Port 0 picks a free
    /// port (the daemon logs it).
    pub listen: SocketAddr,
    /// A unix socket path to serve the same API on, too (access is the file's permissions).
    pub socket: Option<PathBuf>,
}

/// The admin API's default address: loopback only, like HAProxy's stats socket.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9100,
));

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: DEFAULT_ADMIN_LISTEN,
            socket: None,
        }
    }
}

/// One load-balanced service: a VIP and port, a protocol, a scheduler and its backends.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// Unique name, used in logs and status.
    pub name: String,
    /// The VIP and port clients connect to (IPv4 or IPv6).
    pub listen: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// How a new flow picks its backend.
    pub scheduler: SchedulerKind,
    /// Which data plane carries the flows.
    pub dataplane: DataplaneKind,
    /// TCP: how long one connect attempt to a backend may take.
    pub connect_timeout: Duration,
    /// TCP: a connection with no bytes either way for this long is closed. UDP: a client
    /// session with no datagram either way for this long is forgotten.
    pub idle_timeout: Duration,
    /// TCP: how many other backends to try after a failed connect before the client's
    /// connection is closed (nginx's `proxy_next_upstream_tries` minus one).
    pub retries: u32,
    /// The Maglev table size M, a prime (used by the `maglev` and `source_hash` schedulers).
    pub table_size: u32,
    /// Active health checking.
    pub health: HealthCheck,
    /// The backends given as `ip:port`, in file order; addresses are unique within the service.
    pub backends: Vec<Backend>,
    /// The backends given as `name:port`: each resolves to any number of backends.
    pub discovered: Vec<DnsBackend>,
    /// How often the names in `discovered` are resolved again.
    pub resolve_interval: Duration,
    /// A backend that comes up, is enabled or added ramps its weight from 1 to its full weight
    /// over this time (HAProxy's `slowstart`); `None` gives it the full weight at once.
    pub slow_start: Option<Duration>,
    /// The PROXY protocol header the proxy sends a backend before the client's bytes, so the
    /// backend learns the client's address. In XDP `dsr` mode the address is real already.
    pub proxy_protocol: ProxyProtocol,
    /// Per-client-address limits (nginx's `limit_conn` and `limit_req`).
    pub limits: ClientLimits,
    /// One line per connection or session on the `lb::access` log target (proxy only).
    pub access_log: bool,
    /// Where and how the XDP data plane forwards this service (`interface`,
    /// `backend_interfaces`, `forwarding`, `local_address`, `snat_ports`); see [`XdpSettings`].
    pub xdp: XdpSettings,
}

/// Which PROXY protocol header, if any, precedes the client's bytes towards a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    /// No header (the default).
    #[default]
    Off,
    /// The text header, version 1 (TCP only).
    V1,
    /// The binary header, version 2 (TCP, and each UDP datagram).
    V2,
}

/// Limits per client (source) address within one service. `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClientLimits {
    /// Concurrent connections (TCP) or sessions (UDP) one client address may hold.
    pub max_connections: Option<u32>,
    /// New connections or sessions per second one client address may open, on average.
    pub rate: Option<f64>,
    /// How many new connections above `rate` a client may open in a burst (a token bucket
    /// of this size, refilled at `rate`); only with `rate`.
    pub burst: u32,
}

/// A backend server of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Where to forward flows (ip:port).
    pub address: SocketAddr,
    /// Relative share of new flows, `0..=MAX_WEIGHT`; 0 drains the backend (no new flows).
    pub weight: u32,
}

/// A backend given by DNS name (`app:3000`): every A and AAAA record of `host` becomes a
/// backend `record:port` with `weight`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsBackend {
    /// The name to resolve with the system resolver.
    pub host: String,
    /// The port of every resolved backend.
    pub port: u16,
    /// The weight of every resolved backend, `0..=MAX_WEIGHT`.
    pub weight: u32,
}

impl fmt::Display for DnsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// TCP: connections are proxied (or, in XDP, flows forwarded) whole.
    Tcp,
    /// UDP: datagrams are forwarded one by one, grouped into per-client sessions.
    Udp,
}

/// The scheduler: how a new flow picks its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    /// Weighted Maglev consistent hashing of the 5-tuple (the only one XDP can run).
    #[default]
    Maglev,
    /// Each backend in turn, ignoring weights.
    RoundRobin,
    /// Each backend in turn, as often as its weight (nginx's smooth weighted round robin).
    WeightedRoundRobin,
    /// The backend with the fewest active connections relative to its weight.
    LeastConn,
    /// Two random backends (by weight); the one with fewer active connections wins.
    RandomTwo,
    /// Weighted Maglev hashing of the client address only: a client sticks to one backend.
    SourceHash,
}

/// Which data plane carries a service's flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataplaneKind {
    /// XDP where it can attach, else the userspace proxy; the choice is logged.
    #[default]
    Auto,
    /// XDP only; the daemon refuses to start the service without it.
    Xdp,
    /// The userspace io_uring proxy only.
    Proxy,
}

/// Health checking of a service's backends: active checks (HAProxy's `check
/// inter/rise/fall`), or with [`CheckKind::None`] passive failures alone (nginx's
/// `max_fails`/`fail_timeout`).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// What one check does.
    pub kind: CheckKind,
    /// Time between the start of two checks of one backend.
    pub interval: Duration,
    /// How long one check may take before it counts as failed.
    pub timeout: Duration,
    /// Consecutive successful checks that bring a down backend up.
    pub rise: u32,
    /// Consecutive failed checks (active, or passive connect failures) that take an up
    /// backend down.
    pub fall: u32,
    /// With [`CheckKind::None`] only: how long a backend that `fall` passive failures took
    /// down stays out before it gets its share of new flows again (on trial: one more
    /// failure takes it out for as long again). Default 10 s, like nginx's `fail_timeout`.
    pub passive_timeout: Duration,
}

/// The default of [`HealthCheck::passive_timeout`].
pub const DEFAULT_PASSIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one health check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect that completes.
    Tcp,
    /// An HTTP/1.1 `GET path` whose response status is `expect_status`.
    Http {
        /// Request path, starting with `/`.
        path: String,
        /// The status code that counts as healthy.
        expect_status: u16,
    },
    /// Sends `send` in one datagram and expects any datagram back (or one that starts with
    /// `expect`, if set); an ICMP port unreachable fails it at once.
    Udp {
        /// Payload of the probe datagram.
        send: Vec<u8>,
        /// Required prefix of the reply, if any.
        expect: Option<Vec<u8>>,
    },
    /// No active checks: a backend is up until `fall` consecutive passive failures (failed
    /// proxied connects, ICMP port unreachable on a UDP session) take it down; it is tried
    /// again after `passive_timeout`.
    None,
}

/// A config that could not be read or is not valid. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The config file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown, misspelled or of the wrong type.
    #[error("{location}: {field}: {message}")]
    Syntax {
        /// File, line and column.
        location: Location,
        /// The dotted path of the offending key, e.g. `service[0].backend[2].weight`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The file parses but breaks a rule: a duplicate, an empty list, a value out of range.
    #[error("{location}: {field}: {message}")]
    Invalid {
        /// File, line and column.
        location: Location,
        /// The dotted path of the offending key.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The line (1-based) the error points at, if it points at one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Syntax { location, .. } | ConfigError::Invalid { location, .. } => {
                Some(location.line)
            }
        }
    }
}

/// A place in a config file: `path:line:column`, 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The config file as given.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
    }
}

/// Reads and validates the config at `path`.
///
/// Returns `Err(ConfigError::Io)` when the file cannot be read, `Err(ConfigError::Syntax)` for
/// bad TOML, unknown keys and wrong types, and `Err(ConfigError::Invalid)` when the rules
/// below are broken; the error names the file, line and field.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates config `text`; `path` is only used in error messages.
///
/// Rules: at least one service; service names and listen addresses unique; every service has
/// at least one backend, with unique addresses and weights in `0..=MAX_WEIGHT`, and at least
/// one non-zero weight; `rise`, `fall` and `retries` in range; durations positive; the table
/// size a prime no smaller than the backend count; an `http` check's path starts with `/`.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let raw: RawConfig = {
        let de = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = clean_path(&e.path().to_string());
            let inner = e.into_inner();
            let span = inner.span().unwrap_or(0..0);
            ConfigError::Syntax {
                location: locate(text, path, &span),
                field: if field.is_empty() || field == "." {
                    "syntax".into()
                } else {
                    field
                },
                message: inner.message().trim().replace('\n', "; "),
            }
        })?
    };
    Validator { text, path }.validate(raw)
}

/// `serde_path_to_error` sees `toml::Spanned`'s private wrapper as a path segment; users
/// should see `service[0].backend[1].weight`.
fn clean_path(path: &str) -> String {
    path.split('.')
        .filter(|seg| !seg.starts_with("$__serde_spanned"))
        .collect::<Vec<_>>()
        .join(".")
}

/// Turns a byte span of `text` into a 1-based line and column.
fn locate(text: &str, path: &Path, span: &Range<usize>) -> Location {
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Location {
        path: path.to_path_buf(),
        line,
        column,
    }
}

// ---- the file's shape, as serde sees it ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    global: RawGlobal,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    workers: Option<Spanned<usize>>,
    #[serde(default, deserialize_with = "de_duration")]
    drain_timeout: Option<Spanned<Duration>>,
    bpf_object: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<SocketAddr>,
    socket: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    listen: Spanned<SocketAddr>,
    protocol: Protocol,
    #[serde(default)]
    scheduler: SchedulerKind,
    #[serde(default)]
    dataplane: DataplaneKind,
    #[serde(default, deserialize_with = "de_duration")]
    connect_timeout: Option<Spanned<Duration>>,
    #[serde(default, deserialize_with = "de_duration")]
    idle_timeout: Option<Spanned<Duration>>,
    retries: Option<Spanned<u32>>,
    table_size: Option<Spanned<u32>>,
    health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
    #[serde(default)]
    proxy_protocol: Option<Spanned<ProxyProtocol>>,
    limits: Option<RawLimits>,
    #[serde(default)]
    access_log: bool,
    #[serde(default, deserialize_with = "de_duration")]
    slow_start: Option<Spanned<Duration>>,
    #[serde(default, deserialize_with = "de_duration")]
    resolve_interval: Option<Spanned<Duration>>,
    // XDP keys; validated in `Validator::xdp`.
    interface: Option<Spanned<String>>,
    backend_interfaces: Option<Spanned<Vec<String>>>,
    forwarding: Option<Spanned<Forwarding>>,
    local_address: Option<Spanned<IpAddr>>,
    snat_ports: Option<Spanned<[u16; 2]>>,
    #[serde(default, deserialize_with = "de_duration")]
    snat_port_hold: Option<Spanned<Duration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections_per_client: Option<Spanned<u32>>,
    new_connections_per_second: Option<Spanned<f64>>,
    burst: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    weight: Option<Spanned<i64>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawCheckKind {
    Tcp,
    Http,
    Udp,
    None,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<Spanned<RawCheckKind>>,
    #[serde(default, deserialize_with = "de_duration")]
    interval: Option<Spanned<Duration>>,
    #[serde(default, deserialize_with = "de_duration")]
    timeout: Option<Spanned<Duration>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    #[serde(default, deserialize_with = "de_duration")]
    passive_timeout: Option<Spanned<Duration>>,
    path: Option<Spanned<String>>,
    expect_status: Option<Spanned<u16>>,
    send: Option<Spanned<String>>,
    expect: Option<Spanned<String>>,
}

/// Durations are written in human units: "5s", "250ms", "1m 30s".
fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Spanned<Duration>>, D::Error> {
    let s = Spanned::<String>::deserialize(d)?;
    let span = s.span();
    let value = humantime::parse_duration(s.get_ref().trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{}` is not a duration ({e}); write it like \"5s\" or \"250ms\"",
            s.get_ref()
        ))
    })?;
    Ok(Some(Spanned::new(span, value)))
}

// ---- validation ----

struct Validator<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, span: Range<usize>, field: String, message: String) -> ConfigError {
        ConfigError::Invalid {
            location: locate(self.text, self.path, &span),
            field,
            message,
        }
    }

    fn positive(
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

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
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

    fn service(
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

    fn limits(&self, i: usize, raw: Option<RawLimits>) -> Result<ClientLimits, ConfigError> {
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

    fn health(
        &self,
        i: usize,
        protocol: Protocol,
        raw: Option<Spanned<RawHealth>>,
    ) -> Result<HealthCheck, ConfigError> {
        let f = |k: &str| format!("service[{i}].health.{k}");
        let default_kind = match protocol {
            Protocol::Tcp => RawCheckKind::Tcp,
            Protocol::Udp => RawCheckKind::None,
        };
        let Some(raw) = raw else {
            return Ok(HealthCheck {
                kind: match default_kind {
                    RawCheckKind::Tcp => CheckKind::Tcp,
                    _ => CheckKind::None,
                },
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                rise: 2,
                fall: 3,
                passive_timeout: DEFAULT_PASSIVE_TIMEOUT,
            });
        };
        let raw = raw.into_inner();
        let (kind_raw, span) = match raw.kind {
            Some(k) => (*k.get_ref(), k.span()),
            None => (default_kind, 0..0),
        };
        let count = |v: Option<Spanned<u32>>, default: u32, key: &str| match v {
            None => Ok(default),
            Some(v) if (1..=100).contains(v.get_ref()) => Ok(v.into_inner()),
            Some(v) => Err(self.invalid(
                v.span(),
                f(key),
                format!("{} is out of range 1..=100", v.get_ref()),
            )),
        };
        // A key that the check kind does not use is a mistake (a forgotten `kind`, most
        // likely): say so rather than ignore it.
        let stray = [
            (
                "path",
                raw.path.as_ref().map(Spanned::span),
                RawCheckKind::Http,
            ),
            (
                "expect_status",
                raw.expect_status.as_ref().map(Spanned::span),
                RawCheckKind::Http,
            ),
            (
                "send",
                raw.send.as_ref().map(Spanned::span),
                RawCheckKind::Udp,
            ),
            (
                "expect",
                raw.expect.as_ref().map(Spanned::span),
                RawCheckKind::Udp,
            ),
            // Active checks are what bring a backend back there, not a hold-off.
            (
                "passive_timeout",
                raw.passive_timeout.as_ref().map(Spanned::span),
                RawCheckKind::None,
            ),
        ];
        for (key, span, needs) in stray {
            if let Some(span) = span.filter(|_| kind_raw != needs) {
                let needs = match needs {
                    RawCheckKind::Http => "http",
                    RawCheckKind::Udp => "udp",
                    _ => "none",
                };
                return Err(self.invalid(
                    span,
                    f(key),
                    format!("`{key}` applies only to kind = \"{needs}\""),
                ));
            }
        }
        let rise = count(raw.rise, 2, "rise")?;
        let fall = count(raw.fall, 3, "fall")?;
        let interval = self.positive(raw.interval, Duration::from_secs(2), || f("interval"))?;
        let timeout = self.positive(raw.timeout, Duration::from_secs(1), || f("timeout"))?;
        let passive_timeout =
            self.positive(raw.passive_timeout, DEFAULT_PASSIVE_TIMEOUT, || {
                f("passive_timeout")
            })?;
        let kind = match kind_raw {
            RawCheckKind::Tcp => {
                if protocol == Protocol::Udp {
                    return Err(self.invalid(
                        span,
                        f("kind"),
                        "a `tcp` check cannot check a UDP service; use `udp` or `none`".into(),
                    ));
                }
                CheckKind::Tcp
            }
            RawCheckKind::Http => {
                if protocol == Protocol::Udp {
                    return Err(self.invalid(
                        span,
                        f("kind"),
                        "an `http` check cannot check a UDP service; use `udp` or `none`".into(),
                    ));
                }
                let path = match raw.path {
                    None => "/".to_string(),
                    Some(p) if p.get_ref().starts_with('/') => p.into_inner(),
                    Some(p) => {
                        return Err(self.invalid(
                            p.span(),
                            f("path"),
                            format!("`{}` must start with `/`", p.get_ref()),
                        ))
                    }
                };
                let expect_status = match raw.expect_status {
                    None => 200,
                    Some(s) if (100..=599).contains(s.get_ref()) => s.into_inner(),
                    Some(s) => {
                        return Err(self.invalid(
                            s.span(),
                            f("expect_status"),
                            format!("{} is not an HTTP status (100..=599)", s.get_ref()),
                        ))
                    }
                };
                CheckKind::Http {
                    path,
                    expect_status,
                }
            }
            RawCheckKind::Udp => {
                if protocol == Protocol::Tcp {
                    return Err(self.invalid(
                        span,
                        f("kind"),
                        "a `udp` check cannot check a TCP service; use `tcp`, `http` or `none`"
                            .into(),
                    ));
                }
                CheckKind::Udp {
                    send: raw
                        .send
                        .map_or_else(|| "ping".into(), Spanned::into_inner)
                        .into_bytes(),
                    expect: raw.expect.map(|e| e.into_inner().into_bytes()),
                }
            }
            RawCheckKind::None => CheckKind::None,
        };
        Ok(HealthCheck {
            kind,
            interval,
            timeout,
            rise,
            fall,
            passive_timeout,
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

// ---- the XDP data plane's keys: `interface`, `backend_interfaces`, `forwarding`,
// `local_address`, `snat_ports` ----

/// How the XDP data plane carries a service's packets to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Forwarding {
    /// Full NAT: the destination becomes the backend, the source becomes `local_address` and a
    /// port from `snat_ports`, and replies come back through the balancer, which translates
    /// them back. Works with unmodified backends anywhere the balancer can route to (the
    /// default).
    #[default]
    Nat,
    /// Direct server return: the packet is encapsulated (IPIP / IP6IP6) to the backend, which
    /// decapsulates it (`lb-daemon decap`), sees the client's real address and replies to it
    /// directly from the VIP (configured on its loopback).
    Dsr,
}

/// The default `snat_port_hold`: how long a SNAT port whose flow ended stays out of use. Long
/// enough for the last ACK and a retransmitted FIN of the old flow to find their translation
/// (a few retransmission timeouts); see "SNAT ports" in `lb_common::maps` for why it is not
/// the backend's TIME_WAIT (60 s).
pub const DEFAULT_SNAT_PORT_HOLD: Duration = Duration::from_secs(2);

/// The longest `snat_port_hold` accepted: a port held longer is as good as lost.
pub const MAX_SNAT_PORT_HOLD: Duration = Duration::from_secs(3600);

/// A service's XDP settings. Only the XDP data plane reads them; `interface` is `None`
/// exactly when the service cannot use XDP (then the other fields are defaults).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XdpSettings {
    /// The network interface the VIP's traffic arrives on: the XDP program attaches there.
    /// `None`: the service cannot use XDP (`auto` then runs it on the proxy).
    pub interface: Option<String>,
    /// The interfaces backends are reached through, when not `interface` itself. The program
    /// attaches there too: NAT replies arrive there, and `XDP_REDIRECT` can only send to
    /// interfaces the daemon registered.
    pub backend_interfaces: Vec<String>,
    /// NAT or DSR.
    pub forwarding: Forwarding,
    /// The balancer's own address on the backends' side: the SNAT source (`nat`, where the
    /// backends' replies come back to) or the outer source of the encapsulated packet
    /// (`dsr`). Same family as the VIP and the backends. `Some` whenever `interface` is.
    pub local_address: Option<IpAddr>,
    /// `nat`: the SNAT source ports, inclusive; each concurrent flow to one backend takes one.
    /// `None`: the default, chosen when the service starts on XDP: the widest range of at
    /// least 1024 ports outside the host's `net.ipv4.ip_local_port_range` (1024-32767 with
    /// Linux's default), so the balancer's own connections never collide with translated
    /// flows. A configured range that overlaps it is refused then.
    pub snat_ports: Option<(u16, u16)>,
    /// `nat`: how long a SNAT port whose flow ended (both FINs, or an RST) stays out of use
    /// before another flow towards the same backend may take it; whole seconds, at most
    /// [`MAX_SNAT_PORT_HOLD`]. Default [`DEFAULT_SNAT_PORT_HOLD`].
    pub snat_port_hold: Duration,
}

/// The XDP keys of one `[[service]]` as written, before validation.
struct RawXdp {
    interface: Option<Spanned<String>>,
    backend_interfaces: Option<Spanned<Vec<String>>>,
    forwarding: Option<Spanned<Forwarding>>,
    local_address: Option<Spanned<IpAddr>>,
    snat_ports: Option<Spanned<[u16; 2]>>,
    snat_port_hold: Option<Spanned<Duration>>,
}

/// What the XDP rules need to know of the rest of a `[[service]]`.
struct XdpContext<'a> {
    name_span: Range<usize>,
    listen: SocketAddr,
    dataplane: DataplaneKind,
    scheduler: SchedulerKind,
    backends: &'a [Spanned<RawBackend>],
}

/// The longest interface name Linux accepts (IFNAMSIZ minus the NUL).
const MAX_IFNAME: usize = 15;

fn is_interface_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_IFNAME
        && !n.contains(['/', ' ', ':', '\t', '\n'])
        && n != "."
        && n != ".."
}

impl Validator<'_> {
    /// Rules: interface names are valid Linux names; `dataplane = "proxy"` takes none of the
    /// XDP keys; without `interface` none of the others; `dataplane = "xdp"` needs `interface`
    /// and the `maglev` scheduler (the only one the XDP program runs). With `interface`:
    /// `local_address` is required and of the VIP's family, as is every backend; `snat_ports`
    /// (nat only) is an ordered range of at least 1024 ports; `dsr` backends listen on the
    /// VIP's port (the packet reaches them unchanged).
    fn xdp(&self, i: usize, svc: &XdpContext<'_>, raw: RawXdp) -> Result<XdpSettings, ConfigError> {
        let f = |k: &str| format!("service[{i}].{k}");
        let name_span = svc.name_span.clone();
        let given = |with_interface: bool| {
            [
                raw.interface
                    .as_ref()
                    .filter(|_| with_interface)
                    .map(|v| ("interface", v.span())),
                raw.backend_interfaces
                    .as_ref()
                    .map(|v| ("backend_interfaces", v.span())),
                raw.forwarding.as_ref().map(|v| ("forwarding", v.span())),
                raw.local_address
                    .as_ref()
                    .map(|v| ("local_address", v.span())),
                raw.snat_ports.as_ref().map(|v| ("snat_ports", v.span())),
                raw.snat_port_hold
                    .as_ref()
                    .map(|v| ("snat_port_hold", v.span())),
            ]
            .into_iter()
            .flatten()
            .next()
        };
        if svc.dataplane == DataplaneKind::Proxy {
            if let Some((key, span)) = given(true) {
                return Err(self.invalid(
                    span,
                    f(key),
                    format!(
                        "`{key}` configures the XDP data plane, but this service has \
                         dataplane = \"proxy\"; remove it, or use \"auto\" or \"xdp\""
                    ),
                ));
            }
            return Ok(XdpSettings::default());
        }
        let Some(interface) = raw.interface else {
            if let Some((key, span)) = given(false) {
                return Err(self.invalid(
                    span,
                    f(key),
                    format!(
                        "`{key}` needs `interface` (where the VIP's traffic arrives); without \
                         it the service runs on the proxy"
                    ),
                ));
            }
            if svc.dataplane == DataplaneKind::Xdp {
                return Err(self.invalid(
                    name_span,
                    f("interface"),
                    "dataplane = \"xdp\" needs `interface`, the interface the VIP's traffic \
                     arrives on (the XDP program attaches there)"
                        .into(),
                ));
            }
            return Ok(XdpSettings::default());
        };
        if !is_interface_name(interface.get_ref()) {
            return Err(self.invalid(
                interface.span(),
                f("interface"),
                format!(
                    "`{}` is not an interface name (1 to {MAX_IFNAME} bytes, no `/`, `:` or spaces)",
                    interface.get_ref()
                ),
            ));
        }
        let backend_interfaces = match raw.backend_interfaces {
            None => Vec::new(),
            Some(list) => {
                if let Some(bad) = list.get_ref().iter().find(|n| !is_interface_name(n)) {
                    return Err(self.invalid(
                        list.span(),
                        f("backend_interfaces"),
                        format!(
                            "`{bad}` is not an interface name (1 to {MAX_IFNAME} bytes, no `/`, `:` or spaces)"
                        ),
                    ));
                }
                list.into_inner()
            }
        };
        if svc.dataplane == DataplaneKind::Xdp && svc.scheduler != SchedulerKind::Maglev {
            return Err(self.invalid(
                name_span,
                f("scheduler"),
                format!(
                    "the XDP data plane runs only the `maglev` scheduler, not `{}`; use \
                     scheduler = \"maglev\", or dataplane = \"auto\" or \"proxy\"",
                    scheduler_name(svc.scheduler)
                ),
            ));
        }
        let forwarding = raw
            .forwarding
            .as_ref()
            .map_or(Forwarding::default(), |v| *v.get_ref());
        let vip_is_v4 = svc.listen.is_ipv4();
        let local_address = match raw.local_address {
            None => {
                return Err(self.invalid(
                    interface.span(),
                    f("local_address"),
                    "an XDP service needs `local_address`, the balancer's own address on the \
                     backends' side (the NAT source, or the outer source of DSR packets)"
                        .into(),
                ))
            }
            Some(a) if a.get_ref().is_ipv4() != vip_is_v4 => {
                return Err(self.invalid(
                    a.span(),
                    f("local_address"),
                    format!(
                        "{} is not of the VIP's address family ({})",
                        a.get_ref(),
                        svc.listen.ip()
                    ),
                ))
            }
            Some(a) => a.into_inner(),
        };
        let snat_ports = match (forwarding, raw.snat_ports) {
            (Forwarding::Dsr, Some(p)) => {
                return Err(self.invalid(
                    p.span(),
                    f("snat_ports"),
                    "`snat_ports` is for forwarding = \"nat\"; with \"dsr\" the backend sees \
                     the client's own address and port"
                        .into(),
                ))
            }
            (_, None) => None,
            (Forwarding::Nat, Some(p)) => {
                let [lo, hi] = *p.get_ref();
                if lo == 0 || hi < lo || u32::from(hi - lo) + 1 < 1024 {
                    return Err(self.invalid(
                        p.span(),
                        f("snat_ports"),
                        format!(
                            "[{lo}, {hi}] must be [first, last] with 0 < first <= last and at \
                             least 1024 ports; keep it outside net.ipv4.ip_local_port_range"
                        ),
                    ));
                }
                Some((lo, hi))
            }
        };
        let snat_port_hold = match (forwarding, raw.snat_port_hold) {
            (Forwarding::Dsr, Some(h)) => {
                return Err(self.invalid(
                    h.span(),
                    f("snat_port_hold"),
                    "`snat_port_hold` is for forwarding = \"nat\"; \"dsr\" takes no SNAT ports"
                        .into(),
                ))
            }
            (_, None) => DEFAULT_SNAT_PORT_HOLD,
            (Forwarding::Nat, Some(h)) => {
                if *h.get_ref() > MAX_SNAT_PORT_HOLD {
                    return Err(self.invalid(
                        h.span(),
                        f("snat_port_hold"),
                        format!(
                            "{} is longer than the most a port may be held ({}s)",
                            humantime::format_duration(*h.get_ref()),
                            MAX_SNAT_PORT_HOLD.as_secs()
                        ),
                    ));
                }
                *h.get_ref()
            }
        };
        for (j, b) in svc.backends.iter().enumerate() {
            let text = b.get_ref().address.get_ref();
            let Ok(address) = text.parse::<SocketAddr>() else {
                // A DNS name: its records are known only at run time. Those of the other
                // family never enter the XDP table; the DSR port rule applies to the name.
                let port = text
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok());
                if let (Forwarding::Dsr, Some(port)) = (forwarding, port) {
                    if port != svc.listen.port() {
                        return Err(self.invalid(
                            b.get_ref().address.span(),
                            format!("service[{i}].backend[{j}].address"),
                            format!(
                                "with forwarding = \"dsr\" the backend receives the packet as \
                                 the client sent it, so it must listen on the VIP's port {}, not \
                                 {port}",
                                svc.listen.port()
                            ),
                        ));
                    }
                }
                continue;
            };
            if address.is_ipv4() != vip_is_v4 {
                return Err(self.invalid(
                    b.get_ref().address.span(),
                    format!("service[{i}].backend[{j}].address"),
                    format!(
                        "{address} is not of the VIP's address family: the XDP data plane \
                         forwards within one family"
                    ),
                ));
            }
            if forwarding == Forwarding::Dsr && address.port() != svc.listen.port() {
                return Err(self.invalid(
                    b.get_ref().address.span(),
                    format!("service[{i}].backend[{j}].address"),
                    format!(
                        "with forwarding = \"dsr\" the backend receives the packet as the \
                         client sent it, so it must listen on the VIP's port {}, not {}",
                        svc.listen.port(),
                        address.port()
                    ),
                ));
            }
        }
        Ok(XdpSettings {
            interface: Some(interface.into_inner()),
            backend_interfaces,
            forwarding,
            local_address: Some(local_address),
            snat_ports,
            snat_port_hold,
        })
    }
}

fn scheduler_name(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Maglev => "maglev",
        SchedulerKind::RoundRobin => "round_robin",
        SchedulerKind::WeightedRoundRobin => "weighted_round_robin",
        SchedulerKind::LeastConn => "least_conn",
        SchedulerKind::RandomTwo => "random_two",
        SchedulerKind::SourceHash => "source_hash",
    }
}

#[cfg(test)]
mod xdp_tests {
    use super::*;

    const BACKENDS: &str = r#"
[[service.backend]]
address = "10.200.1.2:80"
[[service.backend]]
address = "10.200.2.2:80"
"#;

    fn parse_service(keys: &str) -> Result<Service, ConfigError> {
        let text = format!(
            "[[service]]\nname = \"web\"\nlisten = \"10.200.100.1:80\"\nprotocol = \"tcp\"\n{keys}\n{BACKENDS}"
        );
        parse(&text, Path::new("xdp.toml")).map(|mut c| c.services.remove(0))
    }

    fn error(keys: &str) -> (String, Option<usize>) {
        let e = parse_service(keys).expect_err("the config must be refused");
        (e.to_string(), e.line())
    }

    #[test]
    fn nat_service_with_interface_parses_with_defaults() {
        let s = parse_service(
            "dataplane = \"xdp\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"",
        )
        .expect("valid");
        assert_eq!(s.xdp.interface.as_deref(), Some("eth0"));
        assert_eq!(
            s.xdp.forwarding,
            Forwarding::Nat,
            "nat is the default forwarding"
        );
        assert_eq!(s.xdp.local_address, Some("10.200.0.1".parse().expect("ip")));
        assert_eq!(
            s.xdp.snat_ports, None,
            "the default range is chosen at start"
        );
        assert_eq!(s.xdp.snat_port_hold, DEFAULT_SNAT_PORT_HOLD);
        assert!(s.xdp.backend_interfaces.is_empty());
    }

    #[test]
    fn auto_without_interface_has_no_xdp_settings() {
        let s = parse_service("").expect("valid");
        assert_eq!(s.dataplane, DataplaneKind::Auto);
        assert_eq!(s.xdp, XdpSettings::default());
    }

    #[test]
    fn xdp_needs_an_interface() {
        let (msg, line) = error("dataplane = \"xdp\"");
        assert!(
            msg.contains("service[0].interface") && msg.contains("needs `interface`"),
            "{msg}"
        );
        assert_eq!(
            line,
            Some(2),
            "the error points at the service's name line: {msg}"
        );
    }

    #[test]
    fn xdp_refuses_schedulers_other_than_maglev() {
        let (msg, line) = error(
            "dataplane = \"xdp\"\nscheduler = \"least_conn\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"",
        );
        assert!(
            msg.contains("service[0].scheduler") && msg.contains("`least_conn`"),
            "{msg}"
        );
        assert_eq!(line, Some(2), "{msg}");
    }

    #[test]
    fn auto_accepts_other_schedulers_and_leaves_the_choice_to_the_daemon() {
        let s = parse_service(
            "scheduler = \"round_robin\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"",
        )
        .expect("auto with round_robin is valid: it runs on the proxy");
        assert_eq!(s.scheduler, SchedulerKind::RoundRobin);
    }

    #[test]
    fn proxy_refuses_xdp_keys() {
        let (msg, line) = error("dataplane = \"proxy\"\ninterface = \"eth0\"");
        assert!(
            msg.contains("service[0].interface") && msg.contains("dataplane = \"proxy\""),
            "{msg}"
        );
        assert_eq!(line, Some(6), "{msg}");
    }

    #[test]
    fn xdp_keys_without_interface_are_refused_not_ignored() {
        let (msg, line) = error("forwarding = \"dsr\"");
        assert!(
            msg.contains("service[0].forwarding") && msg.contains("needs `interface`"),
            "{msg}"
        );
        assert_eq!(line, Some(5), "{msg}");
    }

    #[test]
    fn local_address_is_required_and_of_the_vips_family() {
        let (msg, line) = error("interface = \"eth0\"");
        assert!(msg.contains("service[0].local_address"), "{msg}");
        assert_eq!(line, Some(5), "{msg}");
        let (msg, line) = error("interface = \"eth0\"\nlocal_address = \"fd00::1\"");
        assert!(msg.contains("address family"), "{msg}");
        assert_eq!(line, Some(6), "{msg}");
    }

    #[test]
    fn snat_port_hold_is_a_nat_duration_of_at_most_an_hour() {
        let nat = "interface = \"eth0\"\nlocal_address = \"10.200.0.1\"\n";
        let s = parse_service(&format!("{nat}snat_port_hold = \"30s\"")).expect("valid");
        assert_eq!(s.xdp.snat_port_hold, Duration::from_secs(30));
        let (msg, line) = error(&format!("{nat}snat_port_hold = \"2h\""));
        assert!(msg.contains("service[0].snat_port_hold"), "{msg}");
        assert_eq!(line, Some(7), "{msg}");
        let (msg, _) = error(&format!(
            "{nat}forwarding = \"dsr\"\nsnat_port_hold = \"1s\""
        ));
        assert!(msg.contains("service[0].snat_port_hold"), "{msg}");
    }

    #[test]
    fn bad_interface_names_and_snat_ranges_are_refused() {
        let (msg, _) =
            error("interface = \"a-name-longer-than-15\"\nlocal_address = \"10.200.0.1\"");
        assert!(msg.contains("not an interface name"), "{msg}");
        let (msg, _) = error(
            "interface = \"eth0\"\nbackend_interfaces = [\"ok\", \"bad/name\"]\nlocal_address = \"10.200.0.1\"",
        );
        assert!(msg.contains("service[0].backend_interfaces"), "{msg}");
        let (msg, line) = error(
            "interface = \"eth0\"\nlocal_address = \"10.200.0.1\"\nsnat_ports = [62000, 61000]",
        );
        assert!(msg.contains("service[0].snat_ports"), "{msg}");
        assert_eq!(line, Some(7), "{msg}");
    }

    #[test]
    fn dsr_backends_listen_on_the_vip_port_and_take_no_snat_ports() {
        let s = parse_service(
            "forwarding = \"dsr\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"",
        )
        .expect("dsr with backends on port 80 is valid");
        assert_eq!(s.xdp.forwarding, Forwarding::Dsr);
        let (msg, _) = error(
            "forwarding = \"dsr\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"\nsnat_ports = [61000, 65000]",
        );
        assert!(msg.contains("service[0].snat_ports"), "{msg}");
        let text = "[[service]]\nname = \"web\"\nlisten = \"10.200.100.1:80\"\nprotocol = \"tcp\"\nforwarding = \"dsr\"\ninterface = \"eth0\"\nlocal_address = \"10.200.0.1\"\n[[service.backend]]\naddress = \"10.200.1.2:8080\"\n";
        let e = parse(text, Path::new("xdp.toml")).expect_err("port 8080 != VIP port 80");
        assert!(
            e.to_string().contains("service[0].backend[0].address") && e.line() == Some(9),
            "{e}"
        );
    }

    #[test]
    fn global_bpf_object_is_kept() {
        let text = format!(
            "[global]\nbpf_object = \"/opt/lb/lb-ebpf\"\n[[service]]\nname = \"web\"\nlisten = \"10.200.100.1:80\"\nprotocol = \"tcp\"\n{BACKENDS}"
        );
        let c = parse(&text, Path::new("xdp.toml")).expect("valid");
        assert_eq!(c.global.bpf_object, Some(PathBuf::from("/opt/lb/lb-ebpf")));
    }
}

#[cfg(test)]
mod xdp_examples {
    #[test]
    fn the_xdp_example_configs_are_valid() {
        for (name, text) in [
            (
                "config/xdp-nat.toml",
                include_str!("../../config/xdp-nat.toml"),
            ),
            (
                "config/xdp-dsr.toml",
                include_str!("../../config/xdp-dsr.toml"),
            ),
        ] {
            if let Err(e) = super::parse(text, std::path::Path::new(name)) {
                panic!("the example {name} no longer parses: {e}");
            }
        }
    }
}
