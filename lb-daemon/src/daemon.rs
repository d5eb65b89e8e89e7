//! `lb-daemon run`: starts every service on its data plane, runs the health checks and the
//! admin API, reloads on SIGHUP, and drains on SIGTERM/SIGINT.

use std::path::Path;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::admin::api::ApiError;
use crate::config::{Config, Protocol};
use crate::control::{Control, Placed};
use crate::dataplane::proxy::{Proxy, ProxyError, ProxyOptions, ProxyService, SpliceMode};
use crate::dataplane::xdp::{self, Placement, XdpError, XdpPlane};
use crate::scheduler::SchedulerError;
use crate::service::{PassiveFeedback, ServiceRuntime, ServiceSet};

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
    /// A data plane setting cannot be used; today only a bad `LB_PROXY_SPLICE` value.
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
    /// The admin API could not listen on its address.
    #[error(transparent)]
    Admin(#[from] ApiError),
    /// A service with `dataplane = "xdp"` cannot run on XDP.
    #[error(transparent)]
    Xdp(#[from] XdpError),
    /// The signal handlers or the async runtime could not be set up.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

/// Queued passive connect outcomes before the data plane starts dropping them.
const PASSIVE_QUEUE: usize = 4096;

/// Runs `config` (read from `path`, which SIGHUP and `POST /reload` read again) until
/// SIGTERM or SIGINT, then stops accepting, lets open connections finish for up to
/// `global.drain_timeout`, and returns.
///
/// Each service runs on XDP or on the proxy as [`XdpPlane::start`] decides; the choice and
/// its reason are logged. On exit the XDP programs are detached (their flows end with them).
///
/// Returns `Err(DaemonError::Xdp)` when a `dataplane = "xdp"` service cannot run on XDP,
/// `Err(DaemonError::Proxy)` when a listener cannot be bound, `Err(DaemonError::Admin)` when
/// the admin API cannot listen.
pub fn run(config: Config, path: &Path) -> Result<(), DaemonError> {
    let set = ServiceSet::new();
    let services = config
        .services
        .iter()
        .map(|s| {
            ServiceRuntime::new(set.allocate_index(), s.clone()).map_err(|source| {
                DaemonError::Scheduler {
                    service: s.name.clone(),
                    source,
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    set.set(services.clone());

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
    let (feedback, passive_rx) = PassiveFeedback::new(PASSIVE_QUEUE);
    let proxy = Proxy::start_with(
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
        proxy_options_from_env()?,
    )?;

    // The control plane is I/O bound (checks, timers): one thread is plenty and keeps it off
    // the proxy workers' cores.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let admin = config.admin.clone();
    let placements = services
        .iter()
        .zip(&placements)
        .map(|(s, p)| {
            let placed = Placed {
                on_xdp: matches!(p, Placement::Xdp { .. }),
                words: xdp::describe(p),
            };
            (s.index(), placed)
        })
        .collect();
    let control = Control::new(path, config, set.clone(), proxy, xdp_plane, placements);
    let result = rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;
        let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Runtime)?;
        for s in &services {
            s.start();
        }
        let passive = tokio::spawn(PassiveFeedback::apply(set.clone(), passive_rx));
        let (_, api) = crate::admin::api::serve(control.clone(), &admin).await?;
        info!(
            "ready: {} services, {workers} proxy workers",
            services.len()
        );
        let why = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => {
                    info!("SIGHUP: reloading {}", control.path().display());
                    let _logged = crate::reload::reload(&control).await;
                }
            }
        };
        info!(
            "{why}: no longer accepting; draining {} open connections and sessions for up to {}",
            control.with_proxy(|p| p.active()).unwrap_or(0),
            humantime::format_duration(control.config().global.drain_timeout)
        );
        for s in set.all().iter() {
            s.stop();
        }
        for t in api {
            t.abort();
        }
        passive.abort();
        Ok::<(), DaemonError>(())
    });
    if let Some(x) = control.take_xdp() {
        x.shutdown();
    }
    let drain_timeout = control.config().global.drain_timeout;
    let cut = control
        .take_proxy()
        .map_or(0, |proxy| proxy.shutdown(drain_timeout));
    if cut > 0 {
        warn!("drain timeout reached: closed {cut} connections and sessions that were still open");
    }
    info!("stopped");
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The environment variable that picks the proxy's splice mode: `syscall` (the default) or
/// `uring`. Meant for benchmarks comparing the two (`cargo xtask bench`), not a tuning knob.
pub const SPLICE_ENV: &str = "LB_PROXY_SPLICE";

/// [`ProxyOptions`] with the splice mode `LB_PROXY_SPLICE` asks for (defaults when unset).
///
/// Returns `Err(DaemonError::Dataplane)` for a value other than `uring` or `syscall`, so a typo
/// never silently benchmarks the wrong mode.
fn proxy_options_from_env() -> Result<ProxyOptions, DaemonError> {
    let splice = match std::env::var(SPLICE_ENV).as_deref() {
        Err(_) => SpliceMode::default(),
        Ok("uring") => SpliceMode::Uring,
        Ok("syscall") => SpliceMode::Syscall,
        Ok(other) => {
            return Err(DaemonError::Dataplane {
                service: "(all)".into(),
                reason: format!("{SPLICE_ENV}={other:?}: expected \"uring\" or \"syscall\""),
            })
        }
    };
    if splice != SpliceMode::default() {
        info!("{SPLICE_ENV}: relaying with {splice:?} splice");
    }
    Ok(ProxyOptions {
        splice,
        ..ProxyOptions::default()
    })
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
