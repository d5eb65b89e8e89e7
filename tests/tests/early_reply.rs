//! A backend that answers before it has read the whole request and then closes with the rest
//! unread (an HTTP server refusing an upload with 413, say) resets the connection: its kernel
//! sends the answer, then a RST. Through the proxy, as on a direct connection, the client must
//! receive every byte of the answer and then the reset, not the reset alone.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
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

/// A backend that, for every connection, reads the first 1 KiB, writes [`ANSWER`] and closes
/// with the rest of the upload unread, which makes its kernel reset the connection. Stops when
/// dropped.
struct EarlyAnswerer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EarlyAnswerer {
    fn start() -> EarlyAnswerer {
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
                let mut head = [0u8; 1024];
                // A health check closes at once: nothing to answer.
                if s.read_exact(&mut head).is_err() {
                    continue;
                }
                let _ = s.write_all(ANSWER);
                // Closed with unread data: the kernel sends a RST after the answer.
                drop(s);
            }
        });
        EarlyAnswerer {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EarlyAnswerer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
    let backend = EarlyAnswerer::start();
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
