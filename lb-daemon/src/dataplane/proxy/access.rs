//! The access log: one line per connection or session on the `lb::access` tracing target at
//! INFO, written when it ends, for services with `access_log = true`.
//!
//! A line reads `tcp service=web client=192.0.2.7:51234 backend=10.0.0.3:8080
//! to_backend=512 from_backend=20480 duration=0.153s end=eof`; `backend=-` when none was
//! reached. Bytes count what the proxy delivered (a PROXY protocol header is not counted).
//!
//! Flows the per-client limits refuse (`end=limit_refused`: TCP connections, UDP sessions)
//! and UDP datagrams that find no backend (`end=no_backend`) would give a line each, often a
//! flood's: their lines are let through at most once a second per service and worker, the
//! next one that passes ending with `similar=N`, the lines held back since the previous one.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::Protocol;

/// How a connection or session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    /// Both sides finished (TCP: end of file each way).
    Eof,
    /// No byte either way for the service's `idle_timeout`.
    Idle,
    /// No byte moved for the service's `idle_timeout` while bytes sat in the proxy (a peer
    /// stopped reading), or a peer is gone and the other, with its last bytes still to take,
    /// acknowledged nothing for `flush::STALL`: both peers get a reset, so neither takes the
    /// cut stream as whole.
    Stalled,
    /// A peer reset the connection (or the backend went away mid-write).
    Reset,
    /// Any other failure: a splice or send error, a local resource shortage.
    Error,
    /// Still open at a drain deadline (shutdown, or the service was removed).
    DrainCut,
    /// Refused by the service's per-client limits before a backend was chosen.
    LimitRefused,
    /// No backend was eligible, or every connect attempt failed.
    NoBackend,
    /// UDP: the session's backend went down; the client's next datagram opens a new one.
    BackendDown,
}

impl End {
    /// The word in the log line.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            End::Eof => "eof",
            End::Idle => "idle",
            End::Stalled => "stalled",
            End::Reset => "reset",
            End::Error => "error",
            End::DrainCut => "drain_cut",
            End::LimitRefused => "limit_refused",
            End::NoBackend => "no_backend",
            End::BackendDown => "backend_down",
        }
    }

    /// Whether a TCP connection ending so is closed with a FIN (`true`) or a reset.
    pub(super) fn graceful(self) -> bool {
        matches!(self, End::Eof | End::Idle)
    }

    /// The end of a relay direction that failed with `errno`.
    pub(super) fn of_errno(errno: i32) -> End {
        match errno {
            libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED => End::Reset,
            _ => End::Error,
        }
    }
}

/// What one line says.
pub(super) struct Line<'a> {
    pub(super) protocol: Protocol,
    pub(super) service: &'a str,
    pub(super) client: SocketAddr,
    pub(super) backend: Option<SocketAddr>,
    /// Bytes delivered to the backend and to the client.
    pub(super) bytes: [u64; 2],
    pub(super) duration: Duration,
    pub(super) end: End,
}

impl<'a> Line<'a> {
    /// The line of a connection or session turned away before it reached a backend
    /// (`end`: [`End::LimitRefused`] or [`End::NoBackend`]): no backend, no bytes, no time.
    pub(super) fn turned_away(
        protocol: Protocol,
        service: &'a str,
        client: SocketAddr,
        end: End,
    ) -> Line<'a> {
        Line {
            protocol,
            service,
            client,
            backend: None,
            bytes: [0, 0],
            duration: Duration::ZERO,
            end,
        }
    }
}

/// Writes `line` to the `lb::access` target.
pub(super) fn log(line: &Line<'_>) {
    log_summary(line, 0);
}

/// Writes `line` to the `lb::access` target, ending with `similar={similar}` when `similar`
/// lines like it were held back before it (nothing when 0).
pub(super) fn log_summary(line: &Line<'_>, similar: u64) {
    let protocol = line.protocol;
    let backend = match line.backend {
        Some(backend) => backend.to_string(),
        None => "-".to_string(),
    };
    let similar = match similar {
        0 => String::new(),
        n => format!(" similar={n}"),
    };
    tracing::info!(
        target: "lb::access",
        "{protocol} service={} client={} backend={backend} to_backend={} from_backend={} \
         duration={:.3}s end={}{similar}",
        line.service,
        line.client,
        line.bytes[0],
        line.bytes[1],
        line.duration.as_secs_f64(),
        line.end.as_str()
    );
}
