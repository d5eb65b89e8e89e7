//! The userspace data plane: a TCP and UDP proxy on io_uring, one thread and one ring per
//! worker.
//!
//! - TCP ([`tcp`]): every worker has its own `SO_REUSEPORT` listener per service and a
//!   multishot accept; a new client gets a backend from the service's scheduler, a connect
//!   bounded by `connect_timeout` and retried on other backends (`retries`), then a relay
//!   that splices each direction through its own pipe ([`relay`]), with half-close, idle
//!   timeout and reset propagation.
//! - UDP ([`udp`]): every worker has its own `SO_REUSEPORT` socket on the VIP; each client
//!   address gets a session, a connected socket to its backend; replies go back through the
//!   VIP socket, so they come from the VIP. Sessions expire after `idle_timeout`.
//! - [`ring`] wraps a worker's io_uring, [`worker`] runs its loop, [`sys`] holds the few raw
//!   system calls.
//!
//! Existing flows keep their backend when a snapshot changes: the backend is chosen once, when
//! the connection or session opens.
//!
//! Services come and go while the proxy runs ([`Proxy::add_service`],
//! [`Proxy::remove_service`]): each worker gets the command through a channel and a wake-up
//! of its eventfd, and applies it between two batches of completions.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};

use crate::config::Protocol;
use crate::dataplane::{Dataplane, FlowEvents, ServiceHandle};
use crate::snapshot::SharedSnapshot;

mod access;
mod admission;
mod connect_log;
mod ctx;
mod flush;
mod limits;
mod listener;
mod proxy_header;

pub(crate) use proxy_header::local_header;
mod relay;
mod relay_io;
mod ring;
mod slab;
mod sys;
mod tcp;
mod udp;
mod worker;

/// The relay's state machine against a simulated socket pair scripted by `script` (see
/// `relay.rs`); panics when it breaks a promise. For the `relay` fuzz target.
#[doc(hidden)]
pub fn simulate_relay(script: &[u8]) {
    relay::simulate(script);
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener (TCP) or VIP socket (UDP) could not be bound, e.g. the address is in use
    /// by another program or is not local.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The service's listen address.
        addr: SocketAddr,
        /// The error from `socket`, `setsockopt`, `bind` or `listen`.
        source: io::Error,
    },
    /// A worker's io_uring or its wake-up eventfd could not be created (io_uring disabled by
    /// `kernel.io_uring_disabled` or seccomp, or out of memory or files). The proxy needs
    /// Linux 5.19 or newer (multishot accept).
    #[error("cannot set up a proxy worker's io_uring: {0}")]
    Ring(io::Error),
    /// A worker thread could not be spawned.
    #[error("cannot start a proxy worker thread: {0}")]
    Thread(io::Error),
    /// [`Proxy::add_service`] was given an index the proxy carries already (indexes are
    /// unique for the life of the daemon).
    #[error("service number {0} is already carried by the proxy")]
    DuplicateService(usize),
    /// [`Proxy::add_service`] was called while the proxy is shutting down, or a worker has
    /// exited (its ring failed); the service is not carried.
    #[error("the proxy is stopping; service {0} was not started")]
    Stopped(usize),
}

/// How relay bytes are moved between a socket and a pipe. The default is the one that
/// measured cheaper: `BENCHMARKS.md`, "io_uring splice or splice(2)?".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpliceMode {
    /// io_uring `IORING_OP_SPLICE` operations, issued after a poll reports readiness
    /// (they run in io-wq threads).
    Uring,
    /// `splice(2)` system calls on the worker thread after a poll reports readiness: no
    /// io-wq thread hop, 24-29% less balancer CPU per GB in both full benchmark runs.
    #[default]
    Syscall,
}

/// Tuning knobs of the proxy; [`Proxy::start`] uses the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyOptions {
    /// How relay bytes are moved; default [`SpliceMode::Syscall`].
    pub splice: SpliceMode,
    /// Requested capacity of each relay pipe, in bytes (two pipes per TCP connection);
    /// default 256 KiB. The kernel rounds it up to a power-of-two number of pages and may
    /// refuse it (`fs.pipe-max-size`, per-user pipe limits), leaving 64 KiB.
    pub pipe_size: usize,
    /// Receive and send buffer of each UDP socket, in bytes; default 4 MiB. Beyond
    /// `net.core.rmem_max`/`wmem_max` only with `CAP_NET_ADMIN`.
    pub udp_buffer: usize,
    /// The nice value each worker thread sets for itself when it starts (-20 to 19, see
    /// `crate::priority`); `None` (the default) leaves the threads at the priority of the
    /// thread that started them. The daemon passes `[global] worker_priority`.
    pub worker_priority: Option<i32>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            splice: SpliceMode::default(),
            pipe_size: 256 * 1024,
            udp_buffer: 4 * 1024 * 1024,
            worker_priority: None,
        }
    }
}

/// Proxy-wide counts since start, summed over workers. Per-backend counts (connections,
/// bytes, connect failures) are in each backend's [`crate::snapshot::BackendStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyCounters {
    /// TCP connections closed (with a reset) and UDP datagrams dropped because no backend
    /// was eligible, or every connect attempt of the connection failed.
    pub no_backend: u64,
    /// UDP datagrams dropped for any reason (no backend, full socket buffer, draining,
    /// backend unreachable).
    pub dropped_datagrams: u64,
    /// Connections and sessions ended by an error: a reset, a failed splice or send, or a
    /// local resource shortage (sockets, pipes).
    pub errors: u64,
    /// Refusals by a service's per-client limits (`[service.limits]`), summed over
    /// services; per service see [`Proxy::limited`]. TCP: new connections refused. UDP:
    /// datagrams that would have opened a session and were dropped because their client was
    /// refused, each one counted, whether the shared table refused it or the worker still
    /// remembered a refusal of that client (for up to a second, see `limits`). A refused UDP
    /// datagram is also counted in `dropped_datagrams`.
    pub limited: u64,
}

/// State shared by the workers and the [`Proxy`] handle.
#[derive(Default)]
struct Shared {
    active: AtomicU64,
    no_backend: AtomicU64,
    dropped_datagrams: AtomicU64,
    errors: AtomicU64,
    limited: AtomicU64,
    /// Set by [`Proxy::shutdown`]: when the drain ends; [`DrainCut::now`] may move it
    /// earlier, never later.
    deadline: Mutex<Option<Instant>>,
    /// The sockets were handed to a new daemon, which reads them now: draining, the UDP
    /// VIP sockets stop reading (they still send the replies of this proxy's sessions).
    handed_over: std::sync::atomic::AtomicBool,
    /// The node announces its VIPs ([`Proxy::set_announced`]).
    announced: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lets a repeated warning through at most once per second, counting the ones held back, so
/// that a flood (every backend down, out of file descriptors) cannot flood the logs.
#[derive(Clone, Default)]
struct LogLimit {
    last: Option<Instant>,
    held: u64,
}

impl LogLimit {
    const PERIOD: Duration = Duration::from_secs(1);

    /// `Some(suffix)` when a warning may be logged now; the suffix tells how many were held
    /// back since the last one (empty if none). `None` when this one is held back.
    fn allow(&mut self, now: Instant) -> Option<String> {
        self.allow_counted(now).map(|held| match held {
            0 => String::new(),
            n => format!(" ({n} similar since the last report)"),
        })
    }

    /// `Some(held)` when a line may be logged now, `held` being how many were held back
    /// since the last one. `None` when this one is held back.
    fn allow_counted(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < Self::PERIOD)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

/// What a worker needs to know about a service, read from its snapshot at start.
#[derive(Clone)]
struct ServiceInfo {
    index: usize,
    snapshot: SharedSnapshot,
    name: Arc<str>,
    /// The bound address (the actual port when the configured one was 0).
    listen: SocketAddr,
    protocol: Protocol,
    connect_timeout: Duration,
    idle_timeout: Duration,
    retries: u32,
    /// Worker-local: set when the service was removed; its flows are cut at this instant.
    drain_until: Option<Instant>,
    /// Worker-local: the worker's listener was taken over without `TCP_NODELAY`
    /// ([`take_over_listener`]), so each socket it accepts gets it set on its own: one
    /// system call per connection, for the listener's life (until the next upgrade, which
    /// hands over the listener with the option set).
    nodelay_on_accept: bool,
    /// Per-client limits state, shared by the workers.
    clients: Arc<limits::ClientTable>,
    /// Some worker's listener drops the service's SYNs (TCP; see `tcp`): the first worker to
    /// turn its filter on or off logs it.
    syns_dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl ServiceInfo {
    fn new(service: &ServiceHandle) -> ServiceInfo {
        let snap = service.snapshot.load();
        ServiceInfo {
            index: service.index,
            name: snap.name.clone(),
            listen: snap.listen,
            protocol: snap.protocol,
            connect_timeout: snap.connect_timeout,
            idle_timeout: snap.idle_timeout,
            retries: snap.retries,
            snapshot: service.snapshot.clone(),
            drain_until: None,
            nodelay_on_accept: false,
            clients: Arc::new(limits::ClientTable::new()),
            syns_dropped: Arc::default(),
        }
    }

    /// Whether the service was removed (it takes no new connections or sessions).
    fn removed(&self) -> bool {
        self.drain_until.is_some()
    }
}

struct WorkerHandle {
    thread: Option<JoinHandle<u64>>,
    wake: Arc<OwnedFd>,
    commands: std::sync::mpsc::Sender<worker::Command>,
}

impl WorkerHandle {
    /// Queues `command` and wakes the worker. `false` when the worker has exited.
    fn send(&self, command: worker::Command) -> bool {
        if self.commands.send(command).is_err() {
            return false;
        }
        if let Err(e) = sys::eventfd_signal(self.wake.as_fd()) {
            tracing::error!("cannot wake a proxy worker: {e}");
            return false;
        }
        true
    }
}

/// A service the proxy carries, as the handle keeps it: its number, the address its
/// listeners are bound to, and its clients' limits table.
struct BoundService {
    index: usize,
    listen: SocketAddr,
    protocol: Protocol,
    clients: Arc<limits::ClientTable>,
    /// A duplicate of each worker's socket, in worker order, to hand over in an upgrade
    /// (`crate::handover`); closed when the service goes and when the drain starts.
    sockets: Vec<OwnedFd>,
}

impl BoundService {
    fn of(info: &ServiceInfo, sockets: Vec<OwnedFd>) -> BoundService {
        BoundService {
            index: info.index,
            listen: info.listen,
            protocol: info.protocol,
            clients: info.clients.clone(),
            sockets,
        }
    }
}

/// Binds one listener (TCP) or VIP socket (UDP) per service for each of `workers` workers;
/// worker 0's sockets fix the ports that were 0, which `infos` then holds. Returns the
/// sockets per worker, in `infos`' order; `Err(ProxyError::Bind)` at the first failure.
fn bind_all(
    infos: &mut [ServiceInfo],
    workers: usize,
    options: ProxyOptions,
) -> Result<Vec<Vec<OwnedFd>>, ProxyError> {
    let mut sockets: Vec<Vec<OwnedFd>> = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut mine = Vec::with_capacity(infos.len());
        for info in infos.iter_mut() {
            let (fd, bound) = bind(info, options).map_err(|source| ProxyError::Bind {
                addr: info.listen,
                source,
            })?;
            info.listen = bound;
            mine.push(fd);
        }
        sockets.push(mine);
    }
    Ok(sockets)
}

/// The running proxy: its worker threads and their listeners.
///
/// Dropping it without [`Proxy::shutdown`] stops it at once (no drain).
pub struct Proxy {
    workers: Vec<WorkerHandle>,
    shared: Arc<Shared>,
    /// The services carried now; held across [`Proxy::add_service`] and
    /// [`Proxy::remove_service`] so that they apply one at a time.
    services: Mutex<Vec<BoundService>>,
    options: ProxyOptions,
    /// Sockets taken over from the daemon this one replaces, for [`Proxy::add_service`].
    inherited: Mutex<Option<Arc<crate::handover::Inherited>>>,
    /// TCP listeners of removed services, kept open for a service added at their address
    /// ([`Proxy::remove_service_keeping_listeners`]): address, worker, socket.
    kept: Mutex<Vec<(SocketAddr, usize, OwnedFd)>>,
}

/// `listen(2)` backlog; the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 65_535;

impl Proxy {
    /// Starts `workers` worker threads (at least 1), each with its own io_uring and its own
    /// `SO_REUSEPORT` listener (TCP) or VIP socket (UDP) for every service, with default
    /// [`ProxyOptions`].
    ///
    /// Binds every listener of every worker before returning, so a bind error surfaces here:
    /// `Err(ProxyError::Bind)`. A listen port of 0 gets one free port, shared by all workers
    /// (see [`Proxy::listen_addr`]). Returns `Err(ProxyError::Ring)` when io_uring cannot be
    /// set up and `Err(ProxyError::Thread)` when a thread cannot be spawned; nothing keeps
    /// running after an error.
    pub fn start(
        services: Vec<ServiceHandle>,
        workers: usize,
        events: Arc<dyn FlowEvents>,
    ) -> Result<Proxy, ProxyError> {
        Proxy::start_with(services, workers, events, ProxyOptions::default())
    }

    /// [`Proxy::start`] with explicit [`ProxyOptions`] (benchmarks compare splice modes).
    pub fn start_with(
        services: Vec<ServiceHandle>,
        workers: usize,
        events: Arc<dyn FlowEvents>,
        options: ProxyOptions,
    ) -> Result<Proxy, ProxyError> {
        let workers = workers.max(1);
        let mut infos: Vec<ServiceInfo> = services.iter().map(ServiceInfo::new).collect();
        for (i, info) in infos.iter().enumerate() {
            if infos[..i].iter().any(|other| other.index == info.index) {
                return Err(ProxyError::DuplicateService(info.index));
            }
        }
        let sockets = bind_all(&mut infos, workers, options)?;
        let mut dups: Vec<Vec<OwnedFd>> = infos.iter().map(|_| Vec::new()).collect();
        for mine in &sockets {
            for (i, fd) in mine.iter().enumerate() {
                dups[i].push(fd.try_clone().map_err(ProxyError::Ring)?);
            }
        }
        let shared = Arc::new(Shared::default());
        let (ready, readiness) = std::sync::mpsc::channel();
        let mut setups = Vec::with_capacity(workers);
        for (id, mine) in sockets.into_iter().enumerate() {
            let ring = ring::Ring::new().map_err(ProxyError::Ring)?;
            let wake = Arc::new(sys::eventfd().map_err(ProxyError::Ring)?);
            let (commands, command_rx) = std::sync::mpsc::channel();
            let mut setup = worker::Setup {
                id,
                ring,
                wake: wake.clone(),
                commands: command_rx,
                tcp: Vec::new(),
                udp: Vec::new(),
                events: events.clone(),
                shared: shared.clone(),
                options,
                // The workers share the process's descriptors: each pools pipes for its part.
                fd_share: crate::config::open_file_limit() / workers as u64,
                ready: ready.clone(),
            };
            for (info, fd) in infos.iter().zip(mine) {
                match info.protocol {
                    Protocol::Tcp => setup.tcp.push((info.clone(), fd)),
                    Protocol::Udp => setup.udp.push((info.clone(), fd)),
                }
            }
            setups.push((setup, wake, commands));
        }
        drop(ready);
        let proxy = Proxy {
            workers: Vec::with_capacity(workers),
            shared,
            services: Mutex::new(
                infos
                    .iter()
                    .zip(dups)
                    .map(|(info, dups)| BoundService::of(info, dups))
                    .collect(),
            ),
            options,
            inherited: Mutex::new(None),
            kept: Mutex::new(Vec::new()),
        };
        let proxy = proxy.spawn_workers(setups, readiness)?;
        for info in &infos {
            tracing::info!(
                "service {}: proxying {} on {} with {workers} worker(s)",
                info.name,
                info.protocol,
                info.listen
            );
        }
        Ok(proxy)
    }

    /// Starts one thread per worker set-up and waits until each has enabled its ring (a
    /// ring is usable only then). On any failure the workers started are stopped and
    /// `Err(ProxyError::Thread)` or `Err(ProxyError::Ring)` returned.
    fn spawn_workers(
        mut self,
        setups: Vec<(
            worker::Setup,
            Arc<OwnedFd>,
            std::sync::mpsc::Sender<worker::Command>,
        )>,
        readiness: std::sync::mpsc::Receiver<io::Result<()>>,
    ) -> Result<Proxy, ProxyError> {
        for (setup, wake, commands) in setups {
            let name = format!("lb-proxy-{}", setup.id);
            match crate::watchdog::spawn(name, move || worker::run(setup)) {
                Ok(thread) => self.workers.push(WorkerHandle {
                    thread: Some(thread),
                    wake,
                    commands,
                }),
                Err(e) => {
                    self.stop(Duration::ZERO);
                    return Err(ProxyError::Thread(e));
                }
            }
        }
        for _ in 0..self.workers.len() {
            let outcome = readiness
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("a proxy worker exited at start")));
            if let Err(e) = outcome {
                self.stop(Duration::ZERO);
                return Err(ProxyError::Ring(e));
            }
        }
        Ok(self)
    }

    /// Open TCP connections (from accept to close, including ones still connecting to a
    /// backend) plus UDP sessions, across workers.
    pub fn active(&self) -> u64 {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Proxy-wide counters since start.
    pub fn counters(&self) -> ProxyCounters {
        ProxyCounters {
            no_backend: self.shared.no_backend.load(Ordering::Relaxed),
            dropped_datagrams: self.shared.dropped_datagrams.load(Ordering::Relaxed),
            errors: self.shared.errors.load(Ordering::Relaxed),
            limited: self.shared.limited.load(Ordering::Relaxed),
        }
    }

    /// New connections (TCP) or datagrams that would have opened a session (UDP) of service
    /// `index` refused by its per-client limits since it started, as
    /// [`ProxyCounters::limited`] counts them. `None` for an index the proxy does not carry.
    pub fn limited(&self, index: usize) -> Option<u64> {
        self.bound()
            .iter()
            .find(|c| c.index == index)
            .map(|c| c.clients.refused.load(Ordering::Relaxed))
    }

    /// The address service `index` (its [`ServiceHandle::index`]) is bound to: its listen
    /// address, with the actual port if the configured one was 0. `None` for an index the
    /// proxy does not carry (never added, or removed).
    pub fn listen_addr(&self, index: usize) -> Option<SocketAddr> {
        self.bound()
            .iter()
            .find(|c| c.index == index)
            .map(|c| c.listen)
    }

    fn bound(&self) -> std::sync::MutexGuard<'_, Vec<BoundService>> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts carrying a service that was not there at start: binds its listeners on every
    /// worker.
    ///
    /// Its listen address, protocol, timeouts and retries are read from the snapshot once,
    /// here: to change them, remove the service and add it again under a new index. Backends,
    /// weights, health, the scheduler, the PROXY protocol header, the per-client limits and
    /// the access log switch are read from the current snapshot for every new connection or
    /// session.
    ///
    /// Binds one `SO_REUSEPORT` listener (TCP) or VIP socket (UDP) per worker before any
    /// worker takes it, unless a removed service kept its listeners open for this address
    /// ([`Proxy::remove_service_keeping_listeners`]) or the daemon this one replaces handed
    /// one over ([`Proxy::inherit`]): then it takes those, with the connections in their
    /// queues. A bind error surfaces here as `Err(ProxyError::Bind)` and nothing
    /// is left behind; a listen port of 0 gets one free port for all workers
    /// ([`Proxy::listen_addr`] tells which). Returns once every worker accepts on it.
    /// `Err(ProxyError::DuplicateService)` when `service.index` is carried already,
    /// `Err(ProxyError::Stopped)` when the proxy is shutting down. Blocks for the time the
    /// workers take to pick up the command (a batch of completions, normally well under a
    /// millisecond); call it from a blocking context (e.g. `spawn_blocking` in async code).
    pub fn add_service(&self, service: ServiceHandle) -> Result<(), ProxyError> {
        let mut bound = self.bound();
        if bound.iter().any(|c| c.index == service.index) {
            return Err(ProxyError::DuplicateService(service.index));
        }
        let mut info = ServiceInfo::new(&service);
        let mut sockets = Vec::with_capacity(self.workers.len());
        let mut dups = Vec::with_capacity(self.workers.len());
        let mut nodelay_on_accept = Vec::with_capacity(self.workers.len());
        let inherited = self
            .inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut from_kept = false;
        let got_all = (|| {
            for w in 0..self.workers.len() {
                let kept = self.take_kept(info.listen, info.protocol, w);
                from_kept |= kept.is_some();
                let taken = kept.or_else(|| {
                    (inherited.as_ref()).and_then(|i| i.take(info.listen, info.protocol, w))
                });
                let (fd, bound) = match taken {
                    // A removed service's listener, or the old daemon's socket: its queue
                    // and its place in the reuseport group.
                    Some(fd) => {
                        nodelay_on_accept.push(
                            info.protocol == Protocol::Tcp
                                && take_over_listener(&info.name, fd.as_fd()),
                        );
                        (fd, info.listen)
                    }
                    None => {
                        nodelay_on_accept.push(false);
                        bind(&info, self.options).map_err(|source| ProxyError::Bind {
                            addr: info.listen,
                            source,
                        })?
                    }
                };
                info.listen = bound;
                let dup = fd.try_clone();
                sockets.push(fd);
                dups.push(dup.map_err(|source| ProxyError::Bind {
                    addr: info.listen,
                    source,
                })?);
            }
            Ok(())
        })();
        if let Err(e) = got_all {
            // Kept for the service that takes the address: a refused reload restarts the
            // one that kept them.
            if from_kept {
                self.keep(info.listen, sockets);
            }
            return Err(e);
        }
        let (done, outcomes) = std::sync::mpsc::channel();
        let mut sent = 0;
        for ((w, fd), nodelay_on_accept) in self.workers.iter().zip(sockets).zip(nodelay_on_accept)
        {
            let command = worker::Command::Add {
                info: ServiceInfo {
                    nodelay_on_accept,
                    ..info.clone()
                },
                fd,
                done: done.clone(),
            };
            if w.send(command) {
                sent += 1;
            }
        }
        drop(done);
        let started = (0..sent).filter(|_| outcomes.recv() == Ok(true)).count();
        if sent < self.workers.len() || started < sent {
            // Workers that took it close their listener with the proxy; none is left open
            // for a service the caller believes failed.
            self.send_remove(info.index, Instant::now(), from_kept);
            if from_kept {
                self.keep(info.listen, dups);
            }
            return Err(ProxyError::Stopped(info.index));
        }
        bound.push(BoundService::of(&info, dups));
        tracing::info!(
            "service {}: proxying {:?} on {} with {} worker(s)",
            info.name,
            info.protocol,
            info.listen,
            self.workers.len()
        );
        Ok(())
    }

    /// Stops accepting new connections/sessions for service `index` at once; open ones
    /// finish (they are cut at `drain_timeout`). Returns once listeners are closed.
    ///
    /// TCP: every worker's listener is closed before this returns (connections still in its
    /// accept queue, not yet taken by the worker, are reset by the kernel), so the address
    /// can be bound again at once. Open connections carry on and are reset `drain_timeout`
    /// from now. UDP: no new session starts from this call on; a VIP socket stays open while
    /// sessions of the service remain (backends' replies leave through it) and closes when
    /// the last one ends (idle or cut at `drain_timeout`). If a service is added on the same
    /// UDP address meanwhile, new clients whose datagrams still land on the old socket are
    /// handed to the new service; and as the kernel's `SO_REUSEPORT` group has grown, some
    /// old clients' datagrams are hashed to the new sockets, where they start sessions on the
    /// new service, as if their old session had expired. An unknown index is ignored. Blocks like
    /// [`Proxy::add_service`].
    pub fn remove_service(&self, index: usize, drain_timeout: Duration) {
        self.remove_with(index, drain_timeout, false);
    }

    /// As [`Proxy::remove_service`], but a TCP service's listening sockets stay open, with
    /// the connections in their queues, for the service that a reload adds at the same
    /// address next (a rename, two services swapping addresses): the workers stop accepting
    /// on them and [`Proxy::add_service`] hands them to that service, so no client arriving
    /// in between is refused. A connection the old service's worker accepted as it stopped
    /// is carried by the old service through its drain. [`Proxy::close_kept`] closes the
    /// listeners no service took. A UDP service is removed as by `remove_service`.
    pub fn remove_service_keeping_listeners(&self, index: usize, drain_timeout: Duration) {
        self.remove_with(index, drain_timeout, true);
    }

    /// Closes the listeners kept by [`Proxy::remove_service_keeping_listeners`] that no
    /// added service took (connections in their queues are reset by the kernel).
    pub fn close_kept(&self) {
        let closed = std::mem::take(&mut *self.kept.lock().unwrap_or_else(|p| p.into_inner()));
        if !closed.is_empty() {
            tracing::debug!("closed {} listening sockets no service took", closed.len());
        }
    }

    /// The listener for worker `worker` kept open at `listen` for `protocol`, if any.
    fn take_kept(&self, listen: SocketAddr, protocol: Protocol, worker: usize) -> Option<OwnedFd> {
        if protocol != Protocol::Tcp {
            return None;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let at = kept
            .iter()
            .position(|(at, w, _)| *at == listen && *w == worker)?;
        Some(kept.swap_remove(at).2)
    }

    /// Adds each worker's listening socket at `listen` (in worker order) to the kept ones.
    fn keep(&self, listen: SocketAddr, sockets: Vec<OwnedFd>) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.extend(
            sockets
                .into_iter()
                .enumerate()
                .map(|(w, fd)| (listen, w, fd)),
        );
    }

    fn remove_with(&self, index: usize, drain_timeout: Duration, keep_listeners: bool) {
        let mut bound = self.bound();
        let Some(at) = bound.iter().position(|c| c.index == index) else {
            return;
        };
        let keep = keep_listeners && bound[at].protocol == Protocol::Tcp;
        let until = deadline_after(drain_timeout);
        self.send_remove(index, until, keep);
        let gone = bound.remove(at);
        if keep {
            self.keep(gone.listen, gone.sockets);
        }
    }

    /// Tells every worker that service `index` is removed, its flows cut at `until`; returns
    /// once every worker has closed its listener (or exited). `keep_listener`: the socket
    /// lives on for another service (see [`Proxy::remove_service_keeping_listeners`]).
    fn send_remove(&self, index: usize, until: Instant, keep_listener: bool) {
        let (closed, all_closed) = std::sync::mpsc::channel::<()>();
        for w in &self.workers {
            w.send(worker::Command::Remove {
                index,
                until,
                closed: closed.clone(),
                keep_listener,
            });
        }
        drop(closed);
        // Each worker drops its sender once its listener is closed: then `recv` fails.
        while all_closed.recv().is_ok() {}
    }

    /// Stops accepting at once (TCP listeners close; UDP VIP sockets take no new clients),
    /// lets open connections and sessions finish for up to `drain_timeout`, then closes the
    /// rest with a reset and joins the workers. Returns how many connections and sessions
    /// were cut off at the deadline.
    ///
    /// UDP sessions end only by going idle, so an active UDP service drains until its
    /// `idle_timeout` or `drain_timeout`, whichever comes first; its VIP sockets stay open
    /// meanwhile so that backends' replies still reach clients.
    ///
    /// Blocks for the drain; [`DrainCut::now`] from a handle taken before
    /// ([`Proxy::drain_cut`]) ends it early, as the deadline would.
    pub fn shutdown(mut self, drain_timeout: Duration) -> u64 {
        self.stop(drain_timeout)
    }

    /// A handle that cuts a drain short from another thread while [`Proxy::shutdown`] blocks.
    pub fn drain_cut(&self) -> DrainCut {
        DrainCut {
            shared: Arc::clone(&self.shared),
            wakes: self.workers.iter().map(|w| Arc::clone(&w.wake)).collect(),
        }
    }

    /// Whether the node announces its VIPs (`[announce]`): a TCP service without an eligible
    /// backend then drops the SYNs that reach its listeners instead of refusing their
    /// connections, as the eBPF plane does. Call before the first service is added.
    pub fn set_announced(&self, on: bool) {
        self.shared.announced.store(on, Ordering::Relaxed);
    }

    /// Hands the sockets of an upgrade to the new daemon from now on: it accepts on them;
    /// this proxy's drain ([`Proxy::shutdown`]) then stops reading its UDP VIP sockets at
    /// once (replies of its own sessions still leave through them).
    pub fn mark_handed_over(&self) {
        self.shared.handed_over.store(true, Ordering::Relaxed);
    }

    /// Sockets taken over from the daemon this one replaces: [`Proxy::add_service`] uses
    /// the one of each worker whose address and protocol match instead of binding anew.
    pub fn inherit(&self, sockets: Arc<crate::handover::Inherited>) {
        *self.inherited.lock().unwrap_or_else(|p| p.into_inner()) = Some(sockets);
    }

    /// A duplicate of every worker's socket of every service, described, for an upgrade's
    /// hand-over (`crate::handover`). A socket that cannot be duplicated is left out (and
    /// logged): the new daemon binds that one anew.
    pub fn offer(&self) -> Vec<(crate::handover::OfferedSocket, OwnedFd)> {
        let mut out = Vec::new();
        for s in self.bound().iter() {
            for (worker, fd) in s.sockets.iter().enumerate() {
                match fd.try_clone() {
                    Ok(dup) => out.push((
                        crate::handover::OfferedSocket {
                            listen: s.listen,
                            protocol: s.protocol.to_string(),
                            worker,
                        },
                        dup,
                    )),
                    Err(e) => tracing::warn!(
                        "upgrade: the socket of {} (worker {worker}) cannot be handed over: {e}",
                        s.listen
                    ),
                }
            }
        }
        out
    }

    fn stop(&mut self, drain_timeout: Duration) -> u64 {
        // The duplicates kept for a hand-over would hold the listeners open through the
        // drain: a new connection would wait in a queue nobody accepts.
        for s in self.bound().iter_mut() {
            s.sockets.clear();
        }
        self.close_kept();
        self.drain_cut()
            .set_deadline(|current| current.or(Some(deadline_after(drain_timeout))));
        let mut cut = 0;
        for w in &mut self.workers {
            if let Some(thread) = w.thread.take() {
                match thread.join() {
                    Ok(n) => cut += n,
                    Err(_) => tracing::error!("a proxy worker thread panicked"),
                }
            }
        }
        cut
    }
}

/// How [`Proxy`] starts as a [`Dataplane`]: with no service, which placement adds.
pub struct ProxyStart {
    /// Worker threads, at least 1.
    pub workers: usize,
    /// Where passive connect outcomes go.
    pub events: Arc<dyn FlowEvents>,
    /// Splice mode and the like.
    pub options: ProxyOptions,
}

impl Dataplane for Proxy {
    type Options = ProxyStart;
    /// The proxy needs nothing beyond the snapshot.
    type Settings = ();
    /// The address the service is bound to (the actual port when the configured one was 0).
    type Added = SocketAddr;
    type Error = ProxyError;
    type Counters = ProxyCounters;

    fn start(o: ProxyStart) -> Result<Proxy, ProxyError> {
        Proxy::start_with(Vec::new(), o.workers, o.events, o.options)
    }

    fn add(&mut self, service: &ServiceHandle, _: &()) -> Result<SocketAddr, ProxyError> {
        self.add_service(service.clone())?;
        self.listen_addr(service.index)
            .ok_or(ProxyError::Stopped(service.index))
    }

    /// When the address moves, a TCP service's listeners stay open for the service that
    /// takes it ([`Proxy::remove_service_keeping_listeners`]); otherwise they close at once.
    fn remove(&mut self, index: usize, drain_timeout: Duration, address_moves: bool) {
        self.remove_with(index, drain_timeout, address_moves);
    }

    fn counters(&self) -> ProxyCounters {
        Proxy::counters(self)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.workers.iter().any(|w| w.thread.is_some()) {
            self.stop(Duration::ZERO);
        }
    }
}

/// Ends a proxy's shutdown drain early: what is still open is closed with a reset, as at the
/// drain deadline, and [`Proxy::shutdown`] returns with the count (HAProxy's and nginx's
/// second SIGTERM). Taken with [`Proxy::drain_cut`].
#[derive(Clone)]
pub struct DrainCut {
    shared: Arc<Shared>,
    wakes: Vec<Arc<OwnedFd>>,
}

impl DrainCut {
    /// Moves the drain deadline to now and wakes the workers, which cut their open
    /// connections and sessions at once. Before [`Proxy::shutdown`], it makes the shutdown
    /// start with the cut; after the drain ended, it does nothing. Never blocks.
    pub fn now(&self) {
        let now = Instant::now();
        self.set_deadline(|current| Some(current.map_or(now, |at| at.min(now))));
    }

    /// Sets the shared drain deadline to `update(current)` and wakes every worker to read it.
    fn set_deadline(&self, update: impl FnOnce(Option<Instant>) -> Option<Instant>) {
        {
            let mut deadline = self
                .shared
                .deadline
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *deadline = update(*deadline);
        }
        for wake in &self.wakes {
            if let Err(e) = sys::eventfd_signal(wake.as_fd()) {
                tracing::error!("cannot wake a proxy worker to stop it: {e}");
            }
        }
    }
}

/// The instant `timeout` from now; a timeout too large for the clock means "no deadline":
/// a century will do.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// Sets `TCP_NODELAY` on a TCP listener: Linux copies it to each connection whose handshake
/// completes after that, so the socket the proxy accepts has it with no system call of its
/// own (the proxy forwards what it gets at once; batching is the endpoints' business). `Err`
/// is `setsockopt`'s.
fn set_listener_nodelay(listener: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&listener).set_nodelay(true)
}

/// Prepares a TCP listener taken over from the daemon this one replaces (service `service`),
/// which may be an older lb-daemon that set `TCP_NODELAY` on each accepted socket instead
/// of on the listener: sets it there. Returns `true` when the worker must still set it on
/// each socket this listener accepts: the listener lacked it, so the connections already in
/// its queue lack it too, or it cannot be set (a warning says so). `false` when the
/// listener had it.
fn take_over_listener(service: &str, listener: BorrowedFd<'_>) -> bool {
    if SockRef::from(&listener).nodelay().unwrap_or(false) {
        return false;
    }
    if let Err(e) = set_listener_nodelay(listener) {
        tracing::warn!(
            "service {service}: TCP_NODELAY on the listener taken over: {e}; set on each \
             accepted connection instead"
        );
    }
    true
}

/// Binds one worker's socket for `info`; returns it and the address it got. A UDP VIP
/// socket must not get `IP_RECVERR` (or `IPV6_RECVERR`): `udp::Udp`'s reading of it takes a
/// short `recvmmsg` batch for an empty queue, which an ICMP error would make untrue.
fn bind(info: &ServiceInfo, options: ProxyOptions) -> io::Result<(OwnedFd, SocketAddr)> {
    let ty = match info.protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let socket = Socket::new(
        Domain::for_address(info.listen),
        ty.nonblocking().cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    // Every worker binds the same address; the kernel spreads flows by 4-tuple hash.
    socket.set_reuse_port(true)?;
    if info.protocol == Protocol::Udp {
        sys::set_buffers(socket.as_fd(), options.udp_buffer);
    }
    socket.bind(&info.listen.into())?;
    if info.protocol == Protocol::Tcp {
        // Inherited by accepted sockets: urgent data stays in the stream (see `relay`).
        socket.set_out_of_band_inline(true)?;
        set_listener_nodelay(socket.as_fd())?;
        socket.listen(LISTEN_BACKLOG)?;
    }
    let bound = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
    Ok((socket.into(), bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handle_can_move_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Proxy>();
        shareable::<ProxyError>();
    }

    #[test]
    fn a_repeated_warning_is_held_back_and_counted() {
        let mut limit = LogLimit::default();
        let t0 = Instant::now();
        assert_eq!(limit.allow(t0), Some(String::new()));
        assert_eq!(limit.allow(t0 + Duration::from_millis(10)), None);
        assert_eq!(limit.allow(t0 + Duration::from_millis(20)), None);
        let next = limit.allow(t0 + LogLimit::PERIOD);
        assert_eq!(next.as_deref(), Some(" (2 similar since the last report)"));
    }

    /// A TCP service `name` on `listen` without backends.
    fn tcp_service(name: &str, listen: SocketAddr) -> SharedSnapshot {
        Arc::new(arc_swap::ArcSwap::from_pointee(
            crate::snapshot::ServiceSnapshot {
                name: name.into(),
                listen,
                protocol: Protocol::Tcp,
                scheduler_kind: crate::config::SchedulerKind::RoundRobin,
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
                retries: 0,
                backends: Vec::new(),
                scheduler: None,
                generation: 1,
                proxy_protocol: Default::default(),
                limits: Default::default(),
                max_flows: u32::MAX,
                access_log: false,
            },
        ))
    }

    /// For a listener it bound, the accept path sets no option of its own: it relies on the
    /// kernel copying the listener's `TCP_NODELAY` and `SO_OOBINLINE` to each accepted
    /// socket.
    #[test]
    fn an_accepted_socket_has_the_listeners_nodelay_and_oobinline() {
        let snapshot = tcp_service("web", "127.0.0.1:0".parse().expect("address"));
        let info = ServiceInfo::new(&ServiceHandle { index: 0, snapshot });
        let (listener, bound) = bind(&info, ProxyOptions::default()).expect("bind");
        let _client = std::net::TcpStream::connect(bound).expect("connect");
        let listener = Socket::from(listener);
        let accepted = (0..200)
            .find_map(|_| match listener.accept() {
                Ok((s, _)) => Some(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    None
                }
                Err(e) => panic!("accept: {e}"),
            })
            .expect("the connection within a second");
        assert!(accepted.nodelay().expect("TCP_NODELAY"), "TCP_NODELAY");
        assert!(
            accepted.out_of_band_inline().expect("SO_OOBINLINE"),
            "SO_OOBINLINE"
        );
    }

    /// A listener taken over without `TCP_NODELAY` gets it, and its worker is told to set
    /// it on each accepted socket as well (connections queued before have not got it).
    #[test]
    fn a_listener_taken_over_without_nodelay_gets_it() {
        let old = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("address");
        old.bind(&addr.into()).expect("bind");
        old.listen(8).expect("listen");
        let bound = old
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("bound address");
        let _queued = std::net::TcpStream::connect(bound).expect("connect");
        assert!(
            take_over_listener("web", old.as_fd()),
            "it lacked TCP_NODELAY"
        );
        assert!(
            old.nodelay().expect("TCP_NODELAY"),
            "now set on the listener"
        );
        // Established before: it has the listener's options of then (the worker's own
        // setsockopt covers it).
        drop(old.accept().expect("accept the queued connection"));
        let _later = std::net::TcpStream::connect(bound).expect("connect again");
        let (later, _) = old.accept().expect("accept");
        assert!(
            later.nodelay().expect("TCP_NODELAY"),
            "copied from the listener"
        );
        assert!(
            !take_over_listener("web", old.as_fd()),
            "a listener that has it needs nothing per connection"
        );
    }

    #[test]
    fn start_reports_an_address_in_use() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
        let addr = taken.local_addr().expect("its address");
        let snapshot = tcp_service("taken", addr);
        struct Nothing;
        impl FlowEvents for Nothing {
            fn connect_failed(&self, _: usize, _: SocketAddr, _: &io::Error) {}
            fn connect_succeeded(&self, _: usize, _: SocketAddr) -> bool {
                true
            }
        }
        let result = Proxy::start(
            vec![ServiceHandle { index: 0, snapshot }],
            2,
            Arc::new(Nothing),
        );
        match result {
            Err(ProxyError::Bind { addr: a, source }) => {
                assert_eq!(a, addr, "the error names the service's address");
                assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
            }
            Err(e) => panic!("expected a bind error, got {e}"),
            Ok(_) => panic!("a port held without SO_REUSEPORT must not be shared"),
        }
    }
}
