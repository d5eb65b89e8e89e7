//! `lb-daemon run`: starts every service on its data plane, runs the health checks and the
//! admin API, reloads on SIGHUP, and drains on SIGTERM/SIGINT.

use std::path::Path;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

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
/// `global.drain_timeout`, and returns. A second SIGTERM or SIGINT during the drain ends it
/// at once: what is still open is closed with a reset, as at the drain timeout. The handlers
/// are in place before anything starts, so even a signal during start-up drains.
///
/// Each service runs on XDP or on the proxy as [`XdpPlane::start`] decides; the choice and
/// its reason are logged. On exit the XDP programs are detached (their flows end with them).
///
/// Returns `Err(DaemonError::Xdp)` when a `dataplane = "xdp"` service cannot run on XDP,
/// `Err(DaemonError::Proxy)` when a listener cannot be bound, `Err(DaemonError::Admin)` when
/// the admin API cannot listen.
pub fn run(config: Config, path: &Path) -> Result<(), DaemonError> {
    // The control plane is I/O bound (checks, timers): one thread is plenty and keeps it off
    // the proxy workers' cores. Built first so that the signal handlers go in before any
    // listener opens: until then SIGTERM's default action would kill the daemon undrained.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let mut signals = {
        let _in_runtime = rt.enter();
        Signals::install().map_err(DaemonError::Runtime)?
    };
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
            match signals.next().await {
                Received::Stop(why) => break why,
                Received::Reload => {
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
        for t in api {
            t.abort();
        }
        // A reload still at work (its caller may be gone) finishes first, and none starts
        // after: what it places is then stopped with the rest, not left behind.
        control.begin_stop().await;
        for s in set.all().iter() {
            s.stop();
        }
        passive.abort();
        Ok::<(), DaemonError>(())
    });
    if let Some(x) = control.take_xdp() {
        x.shutdown();
    }
    let drain_timeout = control.config().global.drain_timeout;
    if let Some(proxy) = control.take_proxy() {
        match rt.block_on(drain(proxy, drain_timeout, &mut signals)) {
            (cut, Some(why)) => warn!(
                "drain cut short by a second {why}: closed {cut} connections and sessions that \
                 were still open"
            ),
            (0, None) => {}
            (cut, None) => warn!(
                "drain timeout reached: closed {cut} connections and sessions that were still open"
            ),
        }
    }
    info!("stopped");
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The signals the daemon acts on, each a stream that remembers a delivery until it is read.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers; from then on SIGTERM, SIGINT and SIGHUP no longer have their
    /// default action (ending the process). Must run inside the runtime (`Runtime::enter`).
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGTERM or SIGINT; returns its name.
    async fn stop(&mut self) -> &'static str {
        Self::stop_of(&mut self.term, &mut self.int).await
    }

    /// Waits for any of the three.
    async fn next(&mut self) -> Received {
        tokio::select! {
            why = Self::stop_of(&mut self.term, &mut self.int) => Received::Stop(why),
            _ = self.hup.recv() => Received::Reload,
        }
    }

    async fn stop_of(term: &mut Signal, int: &mut Signal) -> &'static str {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
}

/// What a signal asks of the daemon.
enum Received {
    /// SIGTERM or SIGINT (named): drain and exit.
    Stop(&'static str),
    /// SIGHUP: reload the config.
    Reload,
}

/// Shuts `proxy` down with a drain of up to `timeout`, cutting it short at a second SIGTERM or
/// SIGINT. Returns how many connections and sessions were cut off, and the signal that cut the
/// drain short, if one did.
async fn drain(
    proxy: Proxy,
    timeout: Duration,
    signals: &mut Signals,
) -> (u64, Option<&'static str>) {
    let cut_short = proxy.drain_cut();
    let mut shutdown = tokio::task::spawn_blocking(move || proxy.shutdown(timeout));
    let mut early = None;
    loop {
        tokio::select! {
            done = &mut shutdown => {
                let cut = done.unwrap_or_else(|e| {
                    error!("the proxy's shutdown failed: {e}");
                    0
                });
                return (cut, early);
            }
            why = signals.stop(), if early.is_none() => {
                info!("{why} during the drain: closing what is still open");
                cut_short.now();
                early = Some(why);
            }
        }
    }
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
