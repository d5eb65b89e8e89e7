//! Real backend servers on 127.0.0.1, each with a name, for the daemon to balance across.
//!
//! All TCP servers share [`TcpServer`]: one accept thread that can be stopped (the listener is
//! closed, so new connections are refused) and restarted on the same port, and one thread per
//! connection, at most [`MAX_CONNECTIONS`] at a time. Dropping a server closes its listener,
//! shuts down its open connections and joins its accept thread.

mod hash;
mod http;
mod source;
mod udp_echo;

pub use hash::HashServer;
pub use http::HttpNameServer;
pub use source::SourceServer;
pub use udp_echo::UdpEcho;

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ports::free_addr;

/// Open connections one server serves at a time; more are closed at once.
pub const MAX_CONNECTIONS: usize = 1_024;
/// How often the accept thread looks at its stop flag.
const POLL_INTERVAL_MS: i32 = 20;
/// How long a restart keeps trying to bind its old port.
const REBIND_FOR: Duration = Duration::from_secs(3);

/// What a server does with one accepted connection; runs on that connection's own thread.
pub type Handler = Arc<dyn Fn(TcpStream) + Send + Sync + 'static>;

/// A named TCP server on 127.0.0.1 with a stoppable accept loop and one thread per connection.
pub struct TcpServer {
    name: String,
    addr: SocketAddr,
    handler: Handler,
    conns: Arc<Connections>,
    running: Option<AcceptLoop>,
}

struct AcceptLoop {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The open connections, so drop can shut them down.
#[derive(Default)]
struct Connections {
    open: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
}

impl TcpServer {
    /// Starts `name` on a free loopback port; `handler` serves each connection.
    ///
    /// Returns the bind error if the listener cannot be created.
    pub fn start(name: &str, handler: Handler) -> io::Result<TcpServer> {
        on_free_port(|addr| Self::start_on(name, addr, handler.clone()))
    }

    /// Starts `name` listening on `addr` (a loopback address).
    pub fn start_on(name: &str, addr: SocketAddr, handler: Handler) -> io::Result<TcpServer> {
        let mut server = TcpServer {
            name: name.to_string(),
            addr,
            handler,
            conns: Arc::new(Connections::default()),
            running: None,
        };
        server.listen(Duration::ZERO)?;
        Ok(server)
    }

    /// The server's name, which the HTTP and UDP servers answer with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it listens (also while stopped: the port it will come back on).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the listener is open.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Connections accepted since start (restarts included).
    pub fn accepted(&self) -> u64 {
        self.conns.accepted.load(Ordering::Relaxed)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.conns.open.lock().expect("connections lock").len()
    }

    /// Closes the listener, so new connections to the port are refused. Connections already
    /// accepted are served to their end. Does nothing when already stopped.
    pub fn stop(&mut self) {
        if let Some(l) = self.running.take() {
            l.stop.store(true, Ordering::Relaxed);
            // The thread owns the listener; joining it means the port is closed.
            let _ = l.thread.join();
        }
    }

    /// Like a crash: closes the listener and resets every open connection.
    pub fn kill(&mut self) {
        self.stop();
        self.conns.shutdown_all();
    }

    /// Listens on the same port again after [`stop`](Self::stop). Retries the bind for up to
    /// 3 s; returns the last bind error if the port stays taken.
    pub fn restart(&mut self) -> io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        self.listen(REBIND_FOR)
    }

    fn listen(&mut self, retry_for: Duration) -> io::Result<()> {
        let deadline = Instant::now() + retry_for;
        let listener = loop {
            // std sets SO_REUSEADDR, so TIME_WAIT from an earlier run does not block the bind.
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let conns = self.conns.clone();
            let handler = self.handler.clone();
            std::thread::Builder::new()
                .name(format!("{}-accept", self.name))
                .spawn(move || accept_loop(listener, &stop, &conns, &handler))?
        };
        self.running = Some(AcceptLoop { stop, thread });
        Ok(())
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Connections {
    fn shutdown_all(&self) {
        for s in self.open.lock().expect("connections lock").values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, stop: &AtomicBool, conns: &Arc<Connections>, h: &Handler) {
    while !stop.load(Ordering::Relaxed) {
        if !readable(&listener, POLL_INTERVAL_MS) {
            continue;
        }
        // Take everything queued, so a stop right after loses as few handshaken connections
        // as it can.
        loop {
            match listener.accept() {
                Ok((stream, _)) => serve(stream, conns, h),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ECONNABORTED and friends concern one connection, not the listener.
                Err(_) => break,
            }
        }
    }
}

fn serve(stream: TcpStream, conns: &Arc<Connections>, handler: &Handler) {
    conns.accepted.fetch_add(1, Ordering::Relaxed);
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let id = conns.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut open = conns.open.lock().expect("connections lock");
        if open.len() >= MAX_CONNECTIONS {
            return;
        }
        match stream.try_clone() {
            Ok(clone) => open.insert(id, clone),
            Err(_) => return,
        };
    }
    let conns2 = conns.clone();
    let handler = handler.clone();
    let spawned = std::thread::Builder::new()
        .name("backend-conn".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            handler(stream);
            conns2.open.lock().expect("connections lock").remove(&id);
        });
    if spawned.is_err() {
        conns.open.lock().expect("connections lock").remove(&id);
    }
}

/// Runs `start` on a free loopback address; when another process took the port in the
/// moment between choosing and binding it, tries the next one (5 tries).
pub(crate) fn on_free_port<T>(start: impl Fn(SocketAddr) -> io::Result<T>) -> io::Result<T> {
    let mut last = None;
    for _ in 0..5 {
        match start(free_addr()) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            other => return other,
        }
    }
    Err(last.expect("the loop ran at least once"))
}

/// Waits up to `timeout_ms` for `fd` to become readable.
pub(crate) fn readable(fd: &impl AsRawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn echo_once() -> Handler {
        Arc::new(|mut s: TcpStream| {
            let mut buf = [0u8; 16];
            if let Ok(n) = s.read(&mut buf) {
                let _ = s.write_all(&buf[..n]);
            }
        })
    }

    #[test]
    fn stopped_server_refuses_and_restarted_server_serves_on_the_same_port() {
        let mut server = TcpServer::start("echo", echo_once()).expect("server starts");
        let addr = server.addr();
        let ask = || -> io::Result<Vec<u8>> {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            c.write_all(b"hi")?;
            let mut out = Vec::new();
            c.read_to_end(&mut out)?;
            Ok(out)
        };
        assert_eq!(ask().expect("a running server answers"), b"hi");
        server.stop();
        assert!(!server.is_running());
        let err = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .expect_err("a stopped server still accepted a connection");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        server.restart().expect("restart binds the old port");
        assert_eq!(server.addr(), addr);
        assert_eq!(ask().expect("a restarted server answers"), b"hi");
        assert_eq!(server.accepted(), 2);
    }

    #[test]
    fn drop_closes_open_connections() {
        let server = TcpServer::start("echo", echo_once()).expect("server starts");
        let mut c = TcpStream::connect(server.addr()).expect("connects");
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.open_connections() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(server.open_connections(), 1);
        drop(server);
        let mut buf = [0u8; 4];
        let n = c.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "a dropped server left its connection open");
    }
}
