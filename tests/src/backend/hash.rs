//! A TCP server that proves what reached it: it reads until the client half-closes, then
//! writes back one receipt line, `"{sha256 hex} {byte count}\n"`, and closes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::TcpServer;
use crate::data::Hasher;

/// How long the server waits for the next byte before it gives up on a client.
const IDLE: Duration = Duration::from_secs(30);

/// The hash server: upload integrity (client -> backend) and half-close in one.
pub struct HashServer {
    server: TcpServer,
    receipts: Arc<AtomicU64>,
}

impl HashServer {
    /// Starts `name` on a free loopback port. Returns the bind error if it cannot listen.
    pub fn start(name: &str) -> io::Result<HashServer> {
        let receipts = Arc::new(AtomicU64::new(0));
        let r = receipts.clone();
        let server = TcpServer::start(name, Arc::new(move |s| handle(s, &r)))?;
        Ok(HashServer { server, receipts })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.server.name()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Receipts written since start: uploads that reached their end of stream.
    pub fn receipts(&self) -> u64 {
        self.receipts.load(Ordering::Relaxed)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }

    /// Closes the listener; uploads in progress finish.
    pub fn stop(&mut self) {
        self.server.stop()
    }
}

fn handle(mut stream: TcpStream, receipts: &AtomicU64) {
    let _ = stream.set_read_timeout(Some(IDLE));
    let _ = stream.set_write_timeout(Some(IDLE));
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A reset or a timeout: there is no end of stream to answer.
            Err(_) => return,
        }
    }
    let line = format!("{}\n", hasher.finish());
    receipts.fetch_add(1, Ordering::Relaxed);
    if stream.write_all(line.as_bytes()).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::upload;
    use crate::data::Receipt;

    #[test]
    fn receipt_names_exactly_what_was_sent() {
        let server = HashServer::start("h1").expect("starts");
        for (len, seed) in [(0u64, 1u64), (1, 2), (1_000_003, 3)] {
            let got = upload(server.addr(), len, seed).expect("upload answered");
            assert_eq!(
                got,
                Receipt::of_stream(len, seed),
                "the hash server's receipt for {len} bytes is wrong"
            );
        }
        assert_eq!(server.receipts(), 3);
    }

    #[test]
    fn answers_only_after_the_client_half_closes() {
        let server = HashServer::start("h2").expect("starts");
        let mut c = TcpStream::connect(server.addr()).expect("connects");
        c.write_all(b"hello").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 128];
        let early = c.read(&mut buf);
        assert!(
            matches!(&early, Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut),
            "the hash server answered before the client finished sending: {early:?}"
        );
        c.shutdown(Shutdown::Write).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply)
            .expect("reply after half-close");
        assert_eq!(Receipt::parse(&reply), Some(Receipt::of(b"hello")));
    }
}
