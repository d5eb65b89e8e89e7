//! A TCP server that sends a seeded byte stream: the client writes one line
//! `"{bytes} {seed}\n"`, the server answers with the first `bytes` bytes of
//! `ByteStream::new(seed)` and closes. Proves download integrity (backend -> client).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::TcpServer;
use crate::data::ByteStream;

/// How long a write may block before the server gives up on a client.
const IDLE: Duration = Duration::from_secs(30);
/// The longest request line read.
const MAX_REQUEST: u64 = 64;

/// The source server.
pub struct SourceServer {
    server: TcpServer,
    completed: Arc<AtomicU64>,
}

impl SourceServer {
    /// Starts `name` on a free loopback port. Returns the bind error if it cannot listen.
    pub fn start(name: &str) -> io::Result<SourceServer> {
        let completed = Arc::new(AtomicU64::new(0));
        let c = completed.clone();
        let server = TcpServer::start(name, Arc::new(move |s| handle(s, &c)))?;
        Ok(SourceServer { server, completed })
    }

    /// Starts `name` listening on `addr` (in the calling thread's namespace). Returns the bind
    /// error if it cannot listen.
    pub fn start_on(name: &str, addr: SocketAddr) -> io::Result<SourceServer> {
        let completed = Arc::new(AtomicU64::new(0));
        let c = completed.clone();
        let server = TcpServer::start_on(name, addr, Arc::new(move |s| handle(s, &c)))?;
        Ok(SourceServer { server, completed })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.server.name()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Streams sent to their last byte since start.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }
}

/// Parses `"{bytes} {seed}"`.
fn parse_request(line: &str) -> Option<(u64, u64)> {
    let (len, seed) = line.trim_end().split_once(' ')?;
    Some((len.parse().ok()?, seed.parse().ok()?))
}

fn handle(stream: TcpStream, completed: &AtomicU64) {
    let _ = stream.set_read_timeout(Some(IDLE));
    let _ = stream.set_write_timeout(Some(IDLE));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut input = BufReader::new(stream);
    let mut line = String::new();
    if (&mut input).take(MAX_REQUEST).read_line(&mut line).is_err() {
        return;
    }
    let Some((mut left, seed)) = parse_request(&line) else {
        return;
    };
    let mut bytes = ByteStream::new(seed);
    let mut buf = vec![0u8; 128 * 1024];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        bytes.fill(&mut buf[..n]);
        if out.write_all(&buf[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
    completed.fetch_add(1, Ordering::Relaxed);
    let _ = out.shutdown(Shutdown::Write);
    // Wait for the client's end of stream, so closing never resets bytes still in flight.
    let _ = io::copy(&mut input.take(1024 * 1024), &mut io::sink());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::download;
    use crate::data::Receipt;

    #[test]
    fn sends_exactly_the_seeded_stream() {
        let server = SourceServer::start("s1").expect("starts");
        for (len, seed) in [(0u64, 5u64), (7, 6), (2_000_001, 7)] {
            let got = download(server.addr(), len, seed).expect("download completes");
            assert_eq!(
                got,
                Receipt::of_stream(len, seed),
                "the source server sent the wrong bytes for {len} bytes"
            );
        }
        assert_eq!(server.completed(), 3);
    }

    #[test]
    fn request_line_parses() {
        assert_eq!(parse_request("10 3\n"), Some((10, 3)));
        assert_eq!(parse_request("ten 3\n"), None);
    }
}
