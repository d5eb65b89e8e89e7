//! TCP urgent data through the proxy. A splice stops at the urgent mark (the kernel's
//! `tcp_read_sock` never reads past it), and once the peer has shut down it returns 0 there,
//! as at end of file. The relay confirms such a 0 with a copy through user space that reads
//! past the mark (`SO_OOBINLINE` keeps the urgent byte in the stream), so the bytes after the
//! mark and the end of file both arrive. The urgency itself is not forwarded: the backend gets
//! the byte as ordinary data, as behind HAProxy or nginx.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lb_tests::client::connect;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::ports::free_addr;
use lb_tests::Daemon;

/// Connections per case: where the mark falls against the proxy's reads varies with timing.
const ATTEMPTS: usize = 20;

/// A loopback backend that reads each connection to its end and writes back what it read,
/// then closes. Stops when dropped.
struct EchoToEnd {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoToEnd {
    fn start() -> EchoToEnd {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let addr = listener.local_addr().expect("the backend's address");
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                // Inline, so that an urgent byte reaching the backend as one is read too.
                let _ = socket2::SockRef::from(&s).set_out_of_band_inline(true);
                let mut got = Vec::new();
                if s.read_to_end(&mut got).is_ok() {
                    let _ = s.write_all(&got);
                }
            }
        });
        EchoToEnd {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoToEnd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `before`, then `urgent` as urgent data (`MSG_OOB`), then `after`, shuts down the
/// write side, and reads the answer to its end (5 s at most). Returns the answer.
fn send_with_urgent(to: SocketAddr, before: &[u8], urgent: u8, after: &[u8]) -> Vec<u8> {
    let mut s: TcpStream = connect(to).expect("connect");
    s.set_nodelay(true).expect("TCP_NODELAY");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    s.write_all(before).expect("send the bytes before the mark");
    // SAFETY: sends one byte from a live local.
    let n = unsafe { libc::send(s.as_raw_fd(), (&raw const urgent).cast(), 1, libc::MSG_OOB) };
    assert_eq!(n, 1, "send(MSG_OOB): {}", std::io::Error::last_os_error());
    s.write_all(after).expect("send the bytes after the mark");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("reading the answer after {} bytes: {e}", got.len()),
        }
    }
    got
}

#[test]
fn bytes_around_an_urgent_mark_and_the_end_of_file_get_through() {
    let backend = EchoToEnd::start();
    let vip = free_addr();
    let _daemon = Daemon::start(
        &DaemonConfig::new()
            .service(
                ServiceConfig::tcp("urgent", vip)
                    .health("kind", "none")
                    .backend(backend.addr, 1),
            )
            .to_toml(),
    );
    // The mark mid-stream, and the mark as the last byte before the FIN (where a splice's 0
    // is not the end of file yet).
    let cases: [(&[u8], u8, &[u8]); 2] =
        [(b"before-", b'!', b"-after"), (b"last byte: ", b'!', b"")];
    for (before, urgent, after) in cases {
        let mut sent = before.to_vec();
        sent.push(urgent);
        sent.extend_from_slice(after);
        let direct = send_with_urgent(backend.addr, before, urgent, after);
        assert_eq!(direct, sent, "a direct connection (the reference)");
        for attempt in 0..ATTEMPTS {
            let got = send_with_urgent(vip, before, urgent, after);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&sent),
                "attempt {attempt}: the answer through the proxy"
            );
        }
    }
}
