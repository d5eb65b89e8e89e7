//! Shared parts of the proxy tests: a hand-built snapshot with a round-robin scheduler, a
//! recorder of flow events, backend servers that clean up after themselves, bounded waits.
//!
//! What needs no lb-daemon type comes from `lb_tests` (the UDP echo backend,
//! [`lb_tests::UdpEcho`]): lb-tests does not depend on lb-daemon, so taking it as a
//! dev-dependency here leaves one copy of lb-daemon's types. What builds lb-daemon's own
//! types (snapshots, schedulers, the in-process [`Proxy`]) stays here.
#![allow(dead_code)]

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use lb_common::FlowKey;
use lb_daemon::config::{ClientLimits, Protocol, ProxyProtocol, SchedulerKind};
use lb_daemon::dataplane::proxy::{Proxy, ProxyOptions};
use lb_daemon::dataplane::FlowEvents;
use lb_daemon::dataplane::ServiceHandle;
use lb_daemon::scheduler::Scheduler;
use lb_daemon::snapshot::{BackendId, BackendStats, BackendView, ServiceSnapshot, SharedSnapshot};
use socket2::{Domain, SockRef, Socket, Type};

/// Test-only scheduler: each backend in turn, skipping the ones already tried.
pub struct RoundRobin {
    count: usize,
    next: AtomicUsize,
}

impl Scheduler for RoundRobin {
    fn pick(&self, _flow: &FlowKey, tried: &[BackendId]) -> Option<BackendId> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.count)
            .map(|k| (start + k) % self.count)
            .find(|id| !tried.contains(id))
    }
}

/// How a test service is set up.
#[derive(Clone)]
pub struct ServiceSpec {
    /// Where the service listens; port 0 picks a free one.
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub backends: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    pub workers: usize,
    pub options: ProxyOptions,
    pub proxy_protocol: ProxyProtocol,
    pub limits: ClientLimits,
    pub access_log: bool,
}

impl ServiceSpec {
    /// A live snapshot of this service named `name`: every backend up with weight 1, the
    /// test round-robin scheduler.
    pub fn snapshot(&self, name: &str) -> SharedSnapshot {
        let spec = self;
        let backends: Vec<BackendView> = spec
            .backends
            .iter()
            .map(|&address| BackendView {
                address,
                weight: 1,
                up: true,
                awaiting_check: false,
                stats: Arc::new(BackendStats::default()),
            })
            .collect();
        Arc::new(ArcSwap::from_pointee(ServiceSnapshot {
            name: name.into(),
            listen: spec.listen,
            protocol: spec.protocol,
            scheduler_kind: SchedulerKind::RoundRobin,
            connect_timeout: spec.connect_timeout,
            idle_timeout: spec.idle_timeout,
            retries: spec.retries,
            scheduler: Some(Box::new(RoundRobin {
                count: backends.len(),
                next: AtomicUsize::new(0),
            })),
            backends,
            generation: 1,
            proxy_protocol: spec.proxy_protocol,
            limits: spec.limits,
            max_flows: u32::MAX,
            access_log: spec.access_log,
        }))
    }

    pub fn tcp(backends: Vec<SocketAddr>) -> ServiceSpec {
        ServiceSpec {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            protocol: Protocol::Tcp,
            backends,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            retries: 2,
            workers: 2,
            options: ProxyOptions::default(),
            proxy_protocol: ProxyProtocol::Off,
            limits: ClientLimits::default(),
            access_log: false,
        }
    }

    pub fn udp(backends: Vec<SocketAddr>) -> ServiceSpec {
        ServiceSpec {
            protocol: Protocol::Udp,
            ..ServiceSpec::tcp(backends)
        }
    }
}

/// A flow event as the proxy reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Failed(usize, SocketAddr, io::ErrorKind),
    Succeeded(usize, SocketAddr),
}

/// Records every flow event.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("recorder lock").clone()
    }

    pub fn failed(&self) -> Vec<(SocketAddr, io::ErrorKind)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Failed(_, addr, kind) => Some((addr, kind)),
                _ => None,
            })
            .collect()
    }

    pub fn succeeded(&self) -> Vec<SocketAddr> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Succeeded(_, addr) => Some(addr),
                _ => None,
            })
            .collect()
    }
}

impl FlowEvents for Recorder {
    fn connect_failed(&self, service: usize, backend: SocketAddr, error: &io::Error) {
        self.events
            .lock()
            .expect("recorder lock")
            .push(Event::Failed(service, backend, error.kind()));
    }

    fn connect_succeeded(&self, service: usize, backend: SocketAddr) -> bool {
        self.events
            .lock()
            .expect("recorder lock")
            .push(Event::Succeeded(service, backend));
        true
    }
}

/// The service number the tests give their one service.
pub const SERVICE: usize = 7;

/// A running proxy with one service on 127.0.0.1 (a free port) and what the test checks.
pub struct Harness {
    pub proxy: Option<Proxy>,
    pub vip: SocketAddr,
    pub snapshot: SharedSnapshot,
    pub events: Arc<Recorder>,
}

impl Harness {
    pub fn start(spec: ServiceSpec) -> Harness {
        init_logs();
        let snapshot = spec.snapshot("test");
        let events = Arc::new(Recorder::default());
        let proxy = Proxy::start_with(
            vec![ServiceHandle {
                index: SERVICE,
                snapshot: snapshot.clone(),
            }],
            spec.workers,
            events.clone(),
            spec.options,
        )
        .expect("the proxy starts on a free loopback port");
        let vip = proxy
            .listen_addr(SERVICE)
            .expect("the proxy knows where the service listens");
        assert_ne!(vip.port(), 0, "port 0 must resolve to the bound port");
        Harness {
            proxy: Some(proxy),
            vip,
            snapshot,
            events,
        }
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy still running")
    }

    pub fn take(&mut self) -> Proxy {
        self.proxy.take().expect("proxy still running")
    }

    pub fn stats(&self, backend: usize) -> Arc<BackendStats> {
        self.snapshot.load().backends[backend].stats.clone()
    }

    /// Waits (at most 10 s) until the proxy has no open connection or session.
    pub fn wait_idle(&self) {
        let proxy = self.proxy();
        assert!(
            wait_until(Duration::from_secs(10), || proxy.active() == 0),
            "the proxy still counts {} open flow(s)",
            proxy.active()
        );
    }
}

/// Polls `cond` every 10 ms for at most `limit`; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every log line written so far by this test binary's proxies, at the levels `RUST_LOG`
/// asks for and always the access log (`lb::access` at INFO).
static LOGGED: Mutex<String> = Mutex::new(String::new());

/// Where log lines go: [`LOGGED`], and stderr when `RUST_LOG` is set.
#[derive(Clone, Copy)]
struct LogSink {
    echo: bool,
}

impl io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        LOGGED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_str(&String::from_utf8_lossy(buf));
        if self.echo {
            io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Captures the proxies' logs (see [`logged_lines`]); also prints them when `RUST_LOG`
/// asks for them.
pub fn init_logs() {
    let echo = std::env::var_os("RUST_LOG").is_some();
    let filter = tracing_subscriber::EnvFilter::from_default_env()
        .add_directive("lb::access=info".parse().expect("a valid filter directive"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(move || LogSink { echo })
        .try_init();
}

/// The captured log lines that contain every one of `parts`.
pub fn logged_lines(parts: &[&str]) -> Vec<String> {
    LOGGED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .lines()
        .filter(|line| parts.iter().all(|p| line.contains(p)))
        .map(str::to_string)
        .collect()
}

/// A TCP backend on 127.0.0.1 that runs `handler` on a thread per connection, and stops
/// (joining its threads) when dropped.
pub struct TcpBackend {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    handlers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpBackend {
    pub fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> TcpBackend {
        let listener = tcp_listener(1024);
        let addr = listener.local_addr().expect("backend address");
        let stop = Arc::new(AtomicBool::new(false));
        let handlers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let handler = Arc::new(handler);
        let acceptor = {
            let (stop, handlers) = (stop.clone(), handlers.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
                    let handler = handler.clone();
                    let h = std::thread::spawn(move || handler(stream));
                    handlers.lock().expect("handlers lock").push(h);
                }
            })
        };
        TcpBackend {
            addr,
            stop,
            acceptor: Some(acceptor),
            handlers,
        }
    }

    /// A backend that echoes everything until end of file, then closes.
    pub fn echo() -> TcpBackend {
        TcpBackend::start(|mut s| {
            let mut reader = s.try_clone().expect("clone stream");
            let _ = io::copy(&mut reader, &mut s);
        })
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let handlers = std::mem::take(&mut *self.handlers.lock().expect("handlers lock"));
        for h in handlers {
            let _ = h.join();
        }
    }
}

/// A listening TCP socket on 127.0.0.1 with the given backlog.
pub fn tcp_listener(backlog: i32) -> TcpListener {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("literal").into())
        .expect("bind backend");
    socket.listen(backlog).expect("listen");
    socket.into()
}

const BUFFER: usize = 4 * 1024 * 1024;

/// A UDP socket on 127.0.0.1 with large buffers, so the test's own bursts are not dropped.
pub fn udp_socket() -> UdpSocket {
    udp_socket_at("127.0.0.1:0".parse().expect("literal address"))
}

/// [`udp_socket`] bound to `addr`.
pub fn udp_socket_at(addr: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind(addr).expect("bind a UDP socket");
    let s = SockRef::from(&socket);
    let _ = s.set_recv_buffer_size(BUFFER);
    let _ = s.set_send_buffer_size(BUFFER);
    let _ = socket.as_fd();
    socket
}

/// A UDP client socket connected to `vip`, with a 10 s read timeout.
pub fn udp_client(vip: SocketAddr) -> UdpSocket {
    let socket = udp_socket();
    socket.connect(vip).expect("connect to the VIP");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    socket
}

/// Always picks one backend: lets a test say exactly where new flows go.
pub struct Only(pub usize);

impl lb_daemon::scheduler::Scheduler for Only {
    fn pick(&self, _flow: &lb_common::FlowKey, tried: &[usize]) -> Option<usize> {
        (!tried.contains(&self.0)).then_some(self.0)
    }
}

/// Publishes a copy of the current snapshot with backend 0 changed by `change`, a scheduler
/// that sends new flows to backend `new_flows_to` only, and the next generation.
pub fn republish(
    h: &Harness,
    new_flows_to: usize,
    change: impl Fn(&mut lb_daemon::snapshot::BackendView),
) {
    republish_snapshot(&h.snapshot, new_flows_to, change);
}

/// [`republish`] for any service's live snapshot.
pub fn republish_snapshot(
    snapshot: &SharedSnapshot,
    new_flows_to: usize,
    change: impl Fn(&mut lb_daemon::snapshot::BackendView),
) {
    let old = snapshot.load_full();
    let mut backends = old.backends.clone();
    change(&mut backends[0]);
    snapshot.store(Arc::new(lb_daemon::snapshot::ServiceSnapshot {
        name: old.name.clone(),
        listen: old.listen,
        protocol: old.protocol,
        scheduler_kind: old.scheduler_kind,
        connect_timeout: old.connect_timeout,
        idle_timeout: old.idle_timeout,
        retries: old.retries,
        backends,
        scheduler: Some(Box::new(Only(new_flows_to))),
        generation: old.generation + 1,
        proxy_protocol: old.proxy_protocol,
        limits: old.limits,
        max_flows: old.max_flows,
        access_log: old.access_log,
    }));
}

/// Runs `test` on a thread of its own in a new network namespace with its loopback up, so
/// that it may bind a wildcard address without exposing anything on the machine's
/// interfaces (threads it spawns live there too; the namespace goes away with them), and
/// returns what it returned. Without the privilege to make the namespace the test is skipped
/// (`Ok`), unless `LB_REQUIRE_PRIVILEGED=1` (as in CI), so that it can never pass by skipping.
pub fn in_private_network(
    test: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<(), String> {
    std::thread::spawn(|| {
        if let Err(e) = enter_private_network() {
            if std::env::var_os("LB_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1") {
                return Err(format!(
                    "LB_REQUIRE_PRIVILEGED=1 but a private network namespace cannot be made: {e}"
                ));
            }
            eprintln!("skipped: a private network namespace needs CAP_SYS_ADMIN: {e}");
            return Ok(());
        }
        test()
    })
    .join()
    .expect("the test thread panicked")
}

/// Moves the calling thread into a new network namespace with its loopback up.
fn enter_private_network() -> io::Result<()> {
    // SAFETY: plain syscalls on values owned here; `ifreq` is plain old data.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut result = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if result == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            result = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        if result != 0 {
            return Err(err);
        }
    }
    Ok(())
}
