//! A backend that answers before it has read the whole request and then closes with the rest
//! unread (an HTTP server refusing an upload with 413, say) resets the connection: its kernel
//! sends the answer, then a RST. Through the proxy, as on a direct connection, the client must
//! receive every byte of the answer and then the reset, not the reset alone.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lb_tests::client::connect;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::ports::free_addr;
use lb_tests::Daemon;

/// The early answer.
const ANSWER: &[u8] =
    b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
/// Attempts: the loss depends on which of the proxy's two directions hears of the reset first.
const ATTEMPTS: usize = 40;

/// A loopback backend that hands every connection to its `serve` function, one at a time,
/// on a thread of its own. Stops when dropped.
struct Backend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    fn start(serve: impl Fn(TcpStream) + Send + 'static) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let addr = listener.local_addr().expect("the backend's address");
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let Ok((s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                serve(s);
            }
        });
        Backend {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A backend that, for every connection, reads the first 1 KiB, writes [`ANSWER`] and closes
/// with the rest of the upload unread, which makes its kernel reset the connection.
fn early_answerer() -> Backend {
    Backend::start(|mut s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut head = [0u8; 1024];
        // A health check closes at once: nothing to answer.
        if s.read_exact(&mut head).is_err() {
            return;
        }
        let _ = s.write_all(ANSWER);
        // Closed with unread data: the kernel sends a RST after the answer.
    })
}

/// Uploads to `vip` until the connection breaks (at most 64 MiB), then reads what came back.
/// Returns the bytes received before the connection ended. (How it ended is not compared: a
/// client whose write already reported the reset reads end of file after the answer.)
fn upload_until_refused(vip: SocketAddr) -> Vec<u8> {
    let mut s = connect(vip).expect("connect to the VIP");
    let chunk = vec![0x5au8; 64 * 1024];
    for _ in 0..1024 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    got
}

#[test]
fn an_answer_sent_before_a_backend_reset_reaches_the_client() {
    let backend = early_answerer();
    // Direct, for reference: the answer always arrives.
    let direct = upload_until_refused(backend.addr);
    assert_eq!(
        direct, ANSWER,
        "the backend's answer on a direct connection (the reference)"
    );
    let vip = free_addr();
    let _daemon = Daemon::start(
        &DaemonConfig::new()
            .service(
                ServiceConfig::tcp("upload", vip)
                    .health("kind", "none")
                    .backend(backend.addr, 1),
            )
            .to_toml(),
    );
    let mut lost = 0;
    for _ in 0..ATTEMPTS {
        lost += usize::from(upload_until_refused(vip) != ANSWER);
    }
    assert_eq!(
        lost, 0,
        "{lost} of {ATTEMPTS} early answers sent before the backend's reset did not reach the \
         client through the proxy"
    );
}

/// The long answer's length: more than the proxy holds for a slow client in its pipe and the
/// client socket's send queue, so that when the reset comes, part of the answer is still to
/// be read from the backend's socket (the sweep must let that direction finish), and part
/// waits in the client socket's queue (the reset must wait for it).
const LONG: usize = 8 * 1024 * 1024;
/// How the slow client reads: at most this many bytes (its window is 32 KiB) ...
const SLOW_READ: usize = 64 * 1024;
/// ... every so often: a few MB/s, slower than the proxy could deliver.
const SLOW_PAUSE: Duration = Duration::from_millis(10);

/// The long answer's byte at `i`, a pattern that shows a gap or a reordering.
fn long_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// A backend that, for every connection, reads one byte, writes [`LONG`] bytes, waits until
/// its peer has acknowledged them all, and resets the connection (`SO_LINGER` 0: an
/// application giving up, or a server killed after sending).
fn long_answerer() -> Backend {
    let answer: Vec<u8> = (0..LONG).map(long_byte).collect();
    Backend::start(move |mut s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        let mut request = [0u8; 1];
        if s.read_exact(&mut request).is_err() || s.write_all(&answer).is_err() {
            return;
        }
        // Bounded: 10 s at most for the peer to acknowledge the answer.
        for _ in 0..1000 {
            if unacknowledged(&s) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    })
}

/// Bytes written to `s` that its peer has not acknowledged yet (`SIOCOUTQ`).
fn unacknowledged(s: &std::net::TcpStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: `TIOCOUTQ` (`SIOCOUTQ`) writes one int through the pointer.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc == 0 {
        queued
    } else {
        -1
    }
}

/// Sends a request byte to `addr`, then reads the answer [`SLOW_READ`] bytes every
/// [`SLOW_PAUSE`] (for 20 s at most) until the connection ends. Returns how many bytes came
/// in order, and whether any came out of pattern.
fn read_slowly(addr: SocketAddr) -> (usize, bool) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("a client socket");
    // A small window keeps most of the answer on the proxy's side until it is read.
    s.set_recv_buffer_size(32 * 1024).expect("SO_RCVBUF");
    s.connect_timeout(&addr.into(), Duration::from_secs(5))
        .expect("connect");
    let mut s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s.write_all(b"?").expect("send the request");
    let (mut got, mut garbled) = (0usize, false);
    let mut buf = vec![0u8; SLOW_READ];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                garbled |= buf[..n]
                    .iter()
                    .enumerate()
                    .any(|(i, &b)| b != long_byte(got + i));
                got += n;
                std::thread::sleep(SLOW_PAUSE);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    (got, garbled)
}

#[test]
fn a_slow_client_receives_all_its_backend_sent_before_a_reset() {
    let backend = long_answerer();
    // Direct, for reference: the reset comes after the whole answer was acknowledged.
    assert_eq!(
        read_slowly(backend.addr),
        (LONG, false),
        "bytes of the answer a slow client read on a direct connection (the reference)"
    );
    let vip = free_addr();
    let daemon = Daemon::start(
        &DaemonConfig::new()
            .service(
                ServiceConfig::tcp("download", vip)
                    .health("kind", "none")
                    .backend(backend.addr, 1),
            )
            .to_toml(),
    );
    let through = (0..2).map(|_| read_slowly(vip)).collect::<Vec<_>>();
    drop(daemon);
    assert!(
        through.iter().all(|&r| r == (LONG, false)),
        "bytes (of {LONG}) a slow client read through the proxy before the reset its \
         backend sent after the whole answer, and whether any were out of order: {through:?}"
    );
}
