//! TCP urgent data through the proxy. A splice stops at the urgent mark (the kernel's
//! `tcp_read_sock` never reads past it), and once the peer has shut down it returns 0 there,
//! as at end of file. The relay confirms such a 0 with a copy through user space that reads
//! past the mark (`SO_OOBINLINE` keeps the urgent byte in the stream), so the bytes after the
//! mark and the end of file both arrive. The urgency itself is not forwarded: the backend gets
//! the byte as ordinary data.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;

use lb_tests::backend::TcpServer;
use lb_tests::client::connect;
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::ports::free_addr;
use lb_tests::Daemon;
use socket2::SockRef;

/// Connections per case: where the mark falls against the proxy's reads varies with timing.
const ATTEMPTS: usize = 20;

/// A backend that reads each connection to its end and writes back what it read, then
/// closes. `inline`: it reads an urgent byte in the stream (`SO_OOBINLINE`); without it, an
/// urgent byte is out of band, and missing from what it reads and echoes.
fn echo_to_end(name: &str, inline: bool) -> TcpServer {
    TcpServer::start(
        name,
        Arc::new(move |mut s: TcpStream| {
            if inline {
                let _ = SockRef::from(&s).set_out_of_band_inline(true);
            }
            let mut got = Vec::new();
            if s.read_to_end(&mut got).is_ok() {
                let _ = s.write_all(&got);
            }
        }),
    )
    .expect("the backend starts")
}

/// Sends `before`, then `urgent` as urgent data (`MSG_OOB`), then `after`, shuts down the
/// write side, and reads the answer to its end (each read waits 20 s at most, `connect`'s
/// timeout). Returns the answer.
fn send_with_urgent(to: SocketAddr, before: &[u8], urgent: u8, after: &[u8]) -> Vec<u8> {
    let mut s = connect(to).expect("connect");
    s.write_all(before).expect("send the bytes before the mark");
    let n = SockRef::from(&s)
        .send_out_of_band(&[urgent])
        .expect("send(MSG_OOB)");
    assert_eq!(n, 1, "send(MSG_OOB) took {n} bytes");
    s.write_all(after).expect("send the bytes after the mark");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut got = Vec::new();
    if let Err(e) = s.read_to_end(&mut got) {
        panic!("reading the answer after {} bytes: {e}", got.len());
    }
    got
}

#[test]
fn bytes_around_an_urgent_mark_and_the_end_of_file_get_through() {
    // The reference reads the urgent byte inline; the proxy's backend does not, so a proxy
    // that passed the urgency on would lose the byte from the answer.
    let reference = echo_to_end("inline", true);
    let backend = echo_to_end("plain", false);
    let vip = free_addr();
    let _daemon = Daemon::start(
        &DaemonConfig::new()
            .service(
                ServiceConfig::tcp("urgent", vip)
                    .health("kind", "none")
                    .backend(backend.addr(), 1),
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
        let direct = send_with_urgent(reference.addr(), before, urgent, after);
        assert_eq!(direct, sent, "a direct connection (the reference)");
        for attempt in 0..ATTEMPTS {
            let got = send_with_urgent(vip, before, urgent, after);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&sent),
                "attempt {attempt}: the proxy lost or reordered bytes around the urgent mark, \
                 or forwarded the byte as urgent"
            );
        }
    }
}
