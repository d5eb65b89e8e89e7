//! `lb-daemon run`: starts every service on its data plane, runs the health checks, and
//! drains on SIGTERM/SIGINT.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::config::{Config, Protocol};
use crate::dataplane::proxy::{Proxy, ProxyError, ProxyService};
use crate::dataplane::xdp::{self, Placement, XdpError, XdpPlane};
use crate::scheduler::SchedulerError;
use crate::service::{PassiveFeedback, ServiceRuntime};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A service's scheduler could not be built (a bug: validation should prevent it).
    #[error("service {service}: {source}")]
    Scheduler {
        /// The service's name.
        service: String,
        /// What went wrong.
        source: SchedulerError,
    },
    /// A service asks for a data plane this build cannot give it.
    #[error("service {service}: {reason}")]
    Dataplane {
        /// The service's name.
        service: String,
        /// Why.
        reason: String,
    },
    /// The proxy could not start (a listen address in use, no io_uring...).
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A service with `dataplane = "xdp"` cannot run on XDP.
    #[error(transparent)]
    Xdp(#[from] XdpError),
    /// The signal handlers or the async runtime could not be set up.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

/// Queued passive connect outcomes before the data plane starts dropping them.
const PASSIVE_QUEUE: usize = 4096;

/// Runs `config` until SIGTERM or SIGINT, then stops accepting, lets open connections finish
/// for up to `global.drain_timeout`, and returns.
///
/// Each service runs on XDP or on the proxy as [`XdpPlane::start`] decides; the choice and
/// its reason are logged. On exit the XDP programs are detached (their flows end with them).
///
/// Returns `Err(DaemonError::Xdp)` when a `dataplane = "xdp"` service cannot run on XDP,
/// `Err(DaemonError::Proxy)` when a listener cannot be bound.
pub fn run(config: Config) -> Result<(), DaemonError> {
    let services = config
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            ServiceRuntime::new(i, s.clone()).map_err(|source| DaemonError::Scheduler {
                service: s.name.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let (xdp_plane, placements) = XdpPlane::start(&config.global, &services)?;
    for (s, placement) in services.iter().zip(&placements) {
        let c = s.config();
        let plane = xdp::describe(placement);
        info!(
            "service {}: listening on {}/{} with the {plane}, scheduler {:?}, {} backends",
            c.name,
            c.listen,
            match c.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            },
            c.scheduler,
            c.backends.len()
        );
    }

    raise_fd_limit();
    let workers = match config.global.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let (feedback, passive_rx) = PassiveFeedback::new(services.clone(), PASSIVE_QUEUE);
    let proxy = Proxy::start(
        services
            .iter()
            .zip(&placements)
            .filter(|(_, p)| matches!(p, Placement::Proxy { .. }))
            .map(|(s, _)| ProxyService {
                index: s.index(),
                snapshot: s.snapshot(),
            })
            .collect(),
        workers,
        feedback,
    )?;

    // The control plane is I/O bound (checks, timers): one thread is plenty and keeps it off
    // the proxy workers' cores.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let drain_timeout = config.global.drain_timeout;
    let result = rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;
        let checks: Vec<_> = services
            .iter()
            .flat_map(|s| s.spawn_health_checks())
            .collect();
        let passive = tokio::spawn(PassiveFeedback::apply(services.clone(), passive_rx));
        info!(
            "ready: {} services, {workers} proxy workers",
            services.len()
        );
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(
            "{why}: no longer accepting; draining {} open connections and sessions for up to {}",
            proxy.active(),
            humantime::format_duration(drain_timeout)
        );
        for c in checks {
            c.abort();
        }
        passive.abort();
        Ok::<(), DaemonError>(())
    });
    if let Some(x) = xdp_plane {
        x.shutdown();
    }
    let cut = proxy.shutdown(drain_timeout);
    if cut > 0 {
        warn!("drain timeout reached: closed {cut} connections and sessions that were still open");
    }
    info!("stopped");
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Raises the soft limit on open files to the hard limit: every proxied TCP connection holds
/// six descriptors (two sockets, two pipes) and every UDP session one, so the usual soft limit
/// of 1024 would cap the proxy at about 170 connections.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!("open file limit raised from {soft} to {hard}"),
            Err(e) => warn!(
                "open file limit stays at {soft} ({e}): about {} TCP connections at most",
                soft / 6
            ),
        },
        Ok((soft, _)) => info!("open file limit is {soft}"),
        Err(e) => warn!("cannot read the open file limit: {e}"),
    }
}
