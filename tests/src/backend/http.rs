//! An HTTP/1.1 server that answers every request with `200 OK` and its own name as the body,
//! so a client can tell which backend served it.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::TcpServer;
use crate::http_wire::read_head;

/// How long a connection may sit idle between requests.
const IDLE: Duration = Duration::from_secs(15);
/// Requests served on one connection before the server closes it.
const MAX_REQUESTS_PER_CONNECTION: u32 = 10_000;
/// The largest request body read (and thrown away).
const MAX_BODY: usize = 1024 * 1024;

/// Which requests a name server has answered.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    health: AtomicU64,
}

/// An HTTP name server: `200 OK` with body = its name for every path, including the health
/// check's `GET /health`.
///
/// It closes the connection after each response unless the request says
/// `Connection: keep-alive` (then it waits for the next request, up to 15 s idle). That keeps
/// it correct for clients that read to end of stream as well as for keep-alive clients.
pub struct HttpNameServer {
    server: TcpServer,
    counters: Arc<Counters>,
}

impl HttpNameServer {
    /// Starts `name` on a free loopback port. Returns the bind error if it cannot listen.
    pub fn start(name: &str) -> io::Result<HttpNameServer> {
        super::on_free_port(|addr| Self::start_on(name, addr))
    }

    /// Starts `name` on `addr` (loopback).
    pub fn start_on(name: &str, addr: SocketAddr) -> io::Result<HttpNameServer> {
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let body = name.to_string();
        let server = TcpServer::start_on(name, addr, Arc::new(move |s| handle(s, &body, &c)))?;
        Ok(HttpNameServer { server, counters })
    }

    /// The name it answers with.
    pub fn name(&self) -> &str {
        self.server.name()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Requests answered for any path but `/health`, since start.
    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    /// `GET /health` requests answered since start.
    pub fn health_checks(&self) -> u64 {
        self.counters.health.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` until at least `n` `GET /health` requests have been answered
    /// since start; returns whether they were. With `n = rise + 1`, the balancer has seen
    /// `rise` good checks complete, so it counts the backend as up whatever state it started in.
    pub fn wait_for_health_checks(&self, n: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.health_checks() < n {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }

    /// Whether it listens.
    pub fn is_running(&self) -> bool {
        self.server.is_running()
    }

    /// Closes the listener: new connections are refused; requests in progress finish.
    pub fn stop(&mut self) {
        self.server.stop()
    }

    /// Listens again on the same port; returns the bind error if the port stays taken.
    pub fn restart(&mut self) -> io::Result<()> {
        self.server.restart()
    }

    /// Like a crash: closes the listener and resets open connections.
    pub fn kill(&mut self) {
        self.server.kill()
    }
}

fn handle(stream: TcpStream, name: &str, counters: &Counters) {
    let _ = stream.set_read_timeout(Some(IDLE));
    let _ = stream.set_write_timeout(Some(IDLE));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut input = BufReader::new(stream);
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let head = match read_head(&mut input) {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => break,
        };
        let mut words = head.start.split(' ');
        let (method, path, version) = (words.next(), words.next(), words.next());
        let (Some(_), Some(path), Some(version)) = (method, path, version) else {
            let _ = out.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            break;
        };
        // Throw away a body, so the next request starts where it should.
        match head.content_length() {
            Ok(n) if n <= MAX_BODY => {
                if io::copy(&mut (&mut input).take(n as u64), &mut io::sink()).ok()
                    != Some(n as u64)
                {
                    break;
                }
            }
            _ => break,
        }
        let keep_alive = head.connection_has("keep-alive") && !head.connection_has("close");
        let response = format!(
            "{version} 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{name}",
            name.len(),
            if keep_alive { "keep-alive" } else { "close" },
        );
        // Counted before the reply goes out, so a client that has its answer sees the count.
        if path == "/health" {
            counters.health.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.requests.fetch_add(1, Ordering::Relaxed);
        }
        if out.write_all(response.as_bytes()).is_err() {
            break;
        }
        if !keep_alive {
            break;
        }
    }
    let _ = out.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{http_get, HttpConnection};

    #[test]
    fn answers_with_its_name_and_counts_health_checks_apart() {
        let server = HttpNameServer::start("b1").expect("starts");
        assert_eq!(http_get(server.addr(), "/").expect("GET / answered"), "b1");
        assert_eq!(
            http_get(server.addr(), "/health").expect("GET /health answered"),
            "b1"
        );
        assert_eq!(
            http_get(server.addr(), "/x").expect("GET /x answered"),
            "b1"
        );
        assert_eq!(server.requests(), 2);
        assert_eq!(server.health_checks(), 1);
        assert!(server.wait_for_health_checks(1, Duration::ZERO));
        assert!(!server.wait_for_health_checks(2, Duration::from_millis(50)));
    }

    #[test]
    fn keeps_a_connection_alive_when_asked() {
        let server = HttpNameServer::start("b2").expect("starts");
        let mut conn = HttpConnection::open(server.addr()).expect("connects");
        for _ in 0..3 {
            assert_eq!(
                conn.get("/").expect("answered on the same connection"),
                "b2"
            );
        }
        assert_eq!(server.requests(), 3);
        assert_eq!(
            server.open_connections(),
            1,
            "the keep-alive connection was closed"
        );
    }
}
