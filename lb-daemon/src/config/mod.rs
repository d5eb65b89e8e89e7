//! The configuration file: parsing and validation. The only module that knows TOML.
//!
//! A config is a list of `[[service]]` tables, each with its `[[service.backend]]` list and an
//! optional `[service.health]` table, plus an optional `[global]` table. `config/lb.toml`
//! documents every key. Every error names the file, the line and column, and the field
//! (`service[1].backend[0].weight`), so a user can go straight to it.
//!
//! - `mod.rs`: the validated types, `load`/`parse`, `ConfigError` and `Location`.
//! - `raw.rs`: the file's shape as serde reads it, with spans.
//! - `validate.rs`: the `Validator` core, `[global]`, `[admin]` and one `[[service]]`.
//! - `backends.rs`, `health.rs`, `limits.rs`, `xdp.rs`: the rules of those keys (`xdp.rs`
//!   also holds `XdpSettings` and `Forwarding`).

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod backends;
mod health;
mod limits;
mod proxy_only;
mod raw;
mod validate;
mod xdp;

pub use limits::{default_max_flows, open_file_limit, MAX_FLOWS};
pub use proxy_only::ProxyOnly;
use raw::RawConfig;
pub use raw::MAX_DURATION;
use validate::Validator;
pub use xdp::{Forwarding, XdpSettings, DEFAULT_SNAT_PORT_HOLD, MAX_SNAT_PORT_HOLD};

/// The longest path a unix socket can be bound at: `sun_path`'s 108 bytes less the closing
/// NUL (unix(7)). Longer `[admin] socket` and `upgrade_socket` paths are refused.
pub const MAX_SOCKET_PATH: usize = 107;

/// The largest backend weight; 0 means draining. The same range as HAProxy's `weight`.
pub const MAX_WEIGHT: u32 = 256;
pub use crate::maglev::DEFAULT_TABLE_SIZE;
/// The most proxy worker threads `global.workers` may ask for: each has a ring, listeners
/// and buffers, and more threads than this on any one host only contend.
pub const MAX_WORKERS: usize = 1024;
/// The largest Maglev table size accepted: the first prime above 2^24, about 64 MiB of u32s
/// per table. A table this large takes seconds to build, on the control plane's one thread
/// (every health change, DNS answer or slow-start step rebuilds it); sizes up to a few
/// hundred thousand build in well under a second (BENCHMARKS.md, "Micro-benchmarks").
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
    /// `[announce]`: VIP routes for a routing daemon to announce; `None` when the file has
    /// no such table (nothing announced).
    pub announce: Option<Announce>,
}

/// `[announce]`: the kernel routing table in which the daemon keeps a route per VIP it can
/// serve, for BIRD to export over BGP (see `crate::announce`, `config/bird.conf`). Fixed
/// until restart (a reload that changes it is refused).
#[derive(Debug, Clone, PartialEq)]
pub struct Announce {
    /// `table`: the routing table's id, `1..=4294967295` but not 253, 254 or 255 (the
    /// kernel's default, main and local tables); no rule should point to it.
    pub table: u32,
    /// `protocol`: the routes' protocol number (`rtm_protocol`, `ip route ... proto N`), by
    /// which the daemon knows its own routes; `5..=255` but not 12 (BIRD's own); default
    /// [`DEFAULT_ANNOUNCE_PROTOCOL`].
    pub protocol: u8,
    /// `withdraw_wait`: on SIGTERM, how long the node goes on serving after withdrawing its
    /// VIPs, for the router to move their flows elsewhere, before the drain starts; default
    /// 2 s.
    pub withdraw_wait: Duration,
}

/// The route protocol number of announced VIP routes unless `[announce] protocol` says
/// otherwise (unassigned in `/etc/iproute2/rt_protos`).
pub const DEFAULT_ANNOUNCE_PROTOCOL: u8 = 250;

/// Process-wide settings (`[global]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// Proxy worker threads, each with its own io_uring; `0` in the file means one per core.
    pub workers: usize,
    /// `worker_priority`: the nice value of the proxy worker threads, -20 (most favoured) to
    /// 19; default [`DEFAULT_WORKER_PRIORITY`]. Only the workers: the control plane (health
    /// checks, admin API) keeps the daemon's own. Fixed until restart (a reload that changes
    /// it is refused).
    pub worker_priority: i32,
    /// On SIGTERM/SIGINT, how long open connections may take to finish before the daemon exits.
    pub drain_timeout: Duration,
    /// `bpf_object`: the BPF object with the XDP programs; `None` means the default search
    /// (see `dataplane::xdp::loader::find_object`).
    pub bpf_object: Option<PathBuf>,
    /// `bpf_pin_dir`: the bpffs directory where the eBPF plane pins its maps and program
    /// links, so that flows outlive the daemon (a restart adopts them); default
    /// [`DEFAULT_BPF_PIN_DIR`], `None` when the file says `""` (nothing pinned: flows end
    /// with the daemon). Fixed until restart (a reload that changes it is refused).
    pub bpf_pin_dir: Option<PathBuf>,
    /// `upgrade_socket`: the unix socket on which the daemon hands its listening sockets to
    /// the one that replaces it (`lb-daemon upgrade`, see `crate::handover`); `None`: no
    /// hand-over. Fixed until restart (a reload that changes it is refused).
    pub upgrade_socket: Option<PathBuf>,
}

/// The proxy workers' nice value unless `[global] worker_priority` says otherwise. The
/// eBPF planes forward in softirq, ahead of every task; a proxy worker at nice 0 competes
/// for a core with every busy task of its group each time a datagram or a connection wakes
/// it. At -10 it weighs about nine times a nice-0 task in the scheduler's share, and a woken
/// worker gets its core sooner. A nice value ranks threads within their group (a cgroup with
/// the cpu controller, an autogroup); between groups their weights decide. nginx's
/// `worker_priority` is the same knob (its default is 0).
pub const DEFAULT_WORKER_PRIORITY: i32 = -10;

/// Where the eBPF plane pins its state unless `[global] bpf_pin_dir` or
/// [`BPF_PIN_DIR_ENV`] says otherwise.
pub const DEFAULT_BPF_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// The environment variable that sets the pin directory when the config does not (an
/// absolute path; another value is ignored): two daemons on one host (the tests run many)
/// must not adopt each other's state.
pub const BPF_PIN_DIR_ENV: &str = "LB_BPF_PIN_DIR";

/// The pin directory of a config that sets none: [`BPF_PIN_DIR_ENV`] if it holds an
/// absolute path, else [`DEFAULT_BPF_PIN_DIR`].
pub fn default_bpf_pin_dir() -> PathBuf {
    std::env::var_os(BPF_PIN_DIR_ENV)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BPF_PIN_DIR))
}

/// The admin API (`[admin]`): status, metrics, drain/enable/weight, reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// TCP address of the HTTP admin API; default `127.0.0.1:9100`, `None` when the config
    /// says `listen = ""` (the unix socket only). Port 0 picks a free port (the daemon logs
    /// it).
    pub listen: Option<SocketAddr>,
    /// A unix socket path to serve the same API on (created mode 0660: access is the file's
    /// owner and group).
    pub socket: Option<PathBuf>,
    /// The group the socket is given (`group`), so its members may use the API.
    pub group: Option<AdminGroup>,
    /// The bearer token every request must carry (`token_file`'s contents, trimmed); required
    /// when `listen` is not a loopback address.
    pub token: Option<AdminToken>,
}

/// `[admin] group`: a group name and the id it had when the config was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminGroup {
    /// As written.
    pub name: String,
    /// Its id (`getgrnam`).
    pub gid: u32,
}

/// `[admin] token_file`: where the token was read from, and the token. Its `Debug` shows the
/// file, never the token.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// The file, as written.
    pub file: PathBuf,
    /// Its contents, trimmed; not empty.
    pub secret: String,
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AdminToken {{ file: {:?}, secret: <hidden> }}",
            self.file
        )
    }
}

impl Admin {
    /// The parts that need a restart to change: the addresses and the socket's group (the
    /// token is taken from each reload).
    pub fn fixed_part(&self) -> (Option<SocketAddr>, Option<&PathBuf>, Option<&AdminGroup>) {
        (self.listen, self.socket.as_ref(), self.group.as_ref())
    }
}

/// The admin API's default address: loopback only, like HAProxy's stats socket.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9100,
));

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: Some(DEFAULT_ADMIN_LISTEN),
            socket: None,
            group: None,
            token: None,
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
    /// A backend that comes up, is enabled or added ramps its weight from a sixteenth of 1 to
    /// its full weight over this time (HAProxy's `slowstart`); `None` gives it the full
    /// weight at once.
    pub slow_start: Option<Duration>,
    /// The PROXY protocol header the proxy sends a backend before the client's bytes, so the
    /// backend learns the client's address. In XDP `dsr` mode the address is real already.
    pub proxy_protocol: ProxyProtocol,
    /// Per-client-address limits (nginx's `limit_conn` and `limit_req`).
    pub limits: ClientLimits,
    /// The most connections (TCP, `max_connections`) or sessions (UDP, `max_sessions`) the
    /// proxy holds open for this service at once; `None`: derived from the open file limit
    /// when the service starts (see [`default_max_flows`]).
    pub max_flows: Option<u32>,
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

impl fmt::Display for Protocol {
    /// The config spelling: `tcp` or `udp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
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

impl fmt::Display for SchedulerKind {
    /// The config spelling of `scheduler`: `maglev`, `round_robin`, `weighted_round_robin`,
    /// `least_conn`, `random_two` or `source_hash`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SchedulerKind::Maglev => "maglev",
            SchedulerKind::RoundRobin => "round_robin",
            SchedulerKind::WeightedRoundRobin => "weighted_round_robin",
            SchedulerKind::LeastConn => "least_conn",
            SchedulerKind::RandomTwo => "random_two",
            SchedulerKind::SourceHash => "source_hash",
        })
    }
}

/// Which data plane carries a service's flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataplaneKind {
    /// The eBPF data plane where it can deliver, on the hook that suits the service's
    /// interfaces (native XDP when every one is a NIC whose driver takes it, else tc), else
    /// the userspace proxy; the choice and its reason are logged.
    #[default]
    Auto,
    /// The eBPF data plane at the XDP hook (native, else generic with a warning); the daemon
    /// refuses to start the service without it.
    Xdp,
    /// The eBPF data plane at the tc ingress hook (TCX, else a clsact qdisc); the daemon
    /// refuses to start the service without it.
    Tc,
    /// The userspace io_uring proxy only.
    Proxy,
}

impl DataplaneKind {
    /// Whether the service must run on the eBPF data plane (`xdp` or `tc`): the daemon
    /// refuses to start it elsewhere.
    pub fn forces_ebpf(self) -> bool {
        matches!(self, DataplaneKind::Xdp | DataplaneKind::Tc)
    }
}

/// The value as written in the config: `auto`, `xdp`, `tc`, `proxy`.
impl fmt::Display for DataplaneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataplaneKind::Auto => "auto",
            DataplaneKind::Xdp => "xdp",
            DataplaneKind::Tc => "tc",
            DataplaneKind::Proxy => "proxy",
        })
    }
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
        /// The `Host` header's value (`host`): for a backend that serves by name (an
        /// ingress, name-based virtual hosts). `None`: the backend's address and port.
        host: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Display must print what the config file accepts, so a message or the API can be
    /// pasted back into the file.
    #[test]
    fn protocol_and_scheduler_print_their_config_spelling() {
        let schedulers = [
            SchedulerKind::Maglev,
            SchedulerKind::RoundRobin,
            SchedulerKind::WeightedRoundRobin,
            SchedulerKind::LeastConn,
            SchedulerKind::RandomTwo,
            SchedulerKind::SourceHash,
        ];
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            for scheduler in schedulers {
                let text = format!(
                    "[[service]]\nname = \"s\"\nlisten = \"127.0.0.1:80\"\nprotocol = \"{protocol}\"\n\
                     scheduler = \"{scheduler}\"\ndataplane = \"proxy\"\n\
                     [service.health]\nkind = \"none\"\n\
                     [[service.backend]]\naddress = \"127.0.0.1:81\"\n"
                );
                let config = parse(&text, Path::new("display.toml"))
                    .unwrap_or_else(|e| panic!("`{protocol}`/`{scheduler}` not accepted: {e}"));
                assert_eq!(config.services[0].protocol, protocol);
                assert_eq!(config.services[0].scheduler, scheduler);
            }
        }
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(
            SchedulerKind::WeightedRoundRobin.to_string(),
            "weighted_round_robin"
        );
    }
}
