//! The access log (`access_log = true`): one `lb::access` line per connection or session,
//! with client, service, backend, bytes each way, duration and how it ended; nothing for a
//! service that did not ask for it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_tests::backend::TcpServer;
use lb_tests::client::{connect, UdpClient};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, UdpEcho};
use toml::{Table, Value};

const WAIT: Duration = Duration::from_secs(10);

/// The `key=value` fields of an access log line.
fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn echo_server() -> TcpServer {
    TcpServer::start(
        "echo",
        Arc::new(|mut s: TcpStream| {
            let mut r = s.try_clone().expect("clone the stream");
            let _ = io::copy(&mut r, &mut s);
        }),
    )
    .expect("the echo backend starts")
}

/// Refused connections the access log test makes in a burst.
const FLOOD: u64 = 50;

/// Opens a connection to `vip` that the proxy refuses with a reset (its client is over the
/// limit); returns the client's address. The address is taken before the connect: the
/// proxy's reset may beat the connect's return.
fn refused_connection(vip: std::net::SocketAddr) -> std::net::SocketAddr {
    let client =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    client
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind the client");
    let addr = client
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("client address");
    let mut buf = [0u8; 8];
    match client.connect_timeout(&vip.into(), WAIT) {
        Ok(()) => {
            let mut client: TcpStream = client.into();
            let _ = client.set_read_timeout(Some(WAIT));
            let n = client.read(&mut buf);
            assert!(
                !matches!(n, Ok(n) if n > 0),
                "a connection over the limit was served"
            );
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("a connection over the limit failed other than by a reset: {e}"),
    }
    addr
}

#[test]
fn each_connection_and_session_gets_one_line_with_what_happened() {
    let echo = echo_server();
    let udp = UdpEcho::start("u").expect("the UDP backend starts");
    let (web, quiet, dns) = (free_addr(), free_addr(), free_addr());
    let mut limits = Table::new();
    limits.insert("max_connections_per_client".into(), Value::Integer(1));
    let config = DaemonConfig::new()
        .service(
            ServiceConfig::tcp("web", web)
                .set("access_log", true)
                .set("limits", Value::Table(limits))
                .health("kind", "none")
                .backend(echo.addr(), 1),
        )
        .service(
            ServiceConfig::tcp("quiet", quiet)
                .health("kind", "none")
                .backend(echo.addr(), 1),
        )
        .service(
            ServiceConfig::udp("dns", dns)
                .set("access_log", true)
                .set("idle_timeout", "300ms")
                .backend(udp.addr(), 1),
        );
    let daemon = Daemon::start(&config.to_toml());

    // A TCP connection that sends 5 bytes, gets them back and closes.
    let mut c = connect(web).expect("connect to web");
    let me = c.local_addr().expect("client address");
    c.write_all(b"hello").expect("send");
    let mut back = [0u8; 5];
    // The echo proves the proxy admitted it: only then is the next one second in line (two
    // workers accept in no set order).
    c.read_exact(&mut back).expect("the echo");
    // While it is open, a second one from the same address is over the limit of 1.
    let second_addr = refused_connection(web);
    // A flood of refused connections writes no line per connection: at most one a second
    // per worker, the next one counting those held back.
    for _ in 0..FLOOD {
        refused_connection(web);
    }
    std::thread::sleep(Duration::from_millis(1_200));
    let mark = daemon.log_mark();
    let summed = (0..20).find_map(|_| {
        refused_connection(web);
        let lines = daemon.logs();
        let after = lines.get(mark..).unwrap_or_default();
        (after.iter())
            .find(|l| l.contains("end=limit_refused") && l.contains("similar="))
            .cloned()
            .or_else(|| {
                std::thread::sleep(Duration::from_millis(100));
                None
            })
    });
    let summed = summed.expect("no line counts the refusals held back");
    let held: u64 = fields(&summed)["similar"].parse().expect("a count");
    assert!(
        (1..=FLOOD).contains(&held),
        "the held-back count should be part of the {FLOOD} refused: {summed}"
    );
    let refused_lines = (daemon.logs().iter())
        .filter(|l| l.contains("end=limit_refused"))
        .count();
    assert!(
        refused_lines <= 6,
        "{refused_lines} access lines for {} refused connections",
        FLOOD + 2
    );
    let mut buf = [0u8; 8];
    c.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(c.read(&mut buf).expect("end of file"), 0);
    drop(c);

    let line = daemon
        .wait_for_log(&format!("client={me} "), WAIT)
        .unwrap_or_else(|e| panic!("no access log line for {me}: {e}"));
    assert!(
        line.contains("lb::access"),
        "not on the lb::access target: {line}"
    );
    assert!(line.contains(" INFO "), "not at INFO: {line}");
    let f = fields(&line);
    assert_eq!(f["service"], "web", "{line}");
    assert_eq!(f["backend"], echo.addr().to_string(), "{line}");
    assert_eq!(f["to_backend"], "5", "bytes to the backend: {line}");
    assert_eq!(f["from_backend"], "5", "bytes back to the client: {line}");
    assert_eq!(f["end"], "eof", "{line}");
    assert!(
        f["duration"].ends_with('s') && f["duration"].trim_end_matches('s').parse::<f64>().is_ok(),
        "the duration is in seconds: {line}"
    );

    let refused = daemon
        .wait_for_log(&format!("client={second_addr} "), WAIT)
        .unwrap_or_else(|e| panic!("no access log line for the refused {second_addr}: {e}"));
    let f = fields(&refused);
    assert_eq!(f["end"], "limit_refused", "{refused}");
    assert_eq!(
        f["backend"], "-",
        "a refused connection reached no backend: {refused}"
    );

    // A UDP session: two datagrams, then it goes idle.
    let u = UdpClient::new(dns).expect("a UDP client");
    let u_addr = u.local_addr().expect("UDP client address");
    for payload in [&b"abc"[..], &b"defg"[..]] {
        u.request(payload, WAIT).expect("the UDP backend answers");
    }
    let session = daemon
        .wait_for_log(&format!("client={u_addr} "), WAIT)
        .unwrap_or_else(|e| panic!("no access log line for the UDP session {u_addr}: {e}"));
    let f = fields(&session);
    assert!(session.contains("udp "), "{session}");
    assert_eq!(f["service"], "dns", "{session}");
    assert_eq!(
        f["to_backend"], "7",
        "datagram bytes to the backend: {session}"
    );
    // The echo answers `u:` + the payload.
    assert_eq!(
        f["from_backend"], "11",
        "datagram bytes to the client: {session}"
    );
    assert_eq!(f["end"], "idle", "{session}");

    // The service without access_log: traffic, and no line.
    let mut q = connect(quiet).expect("connect to quiet");
    let q_addr = q.local_addr().expect("quiet client address");
    q.write_all(b"x").expect("send");
    q.read_exact(&mut [0u8; 1]).expect("echo");
    // End of file both ways: the proxy closes the connection on the step that forwarded the
    // last FIN, well before the marker connection below is even opened.
    q.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(q.read(&mut buf).expect("end of file"), 0);
    drop(q);
    let mut marker = connect(web).expect("connect to web");
    let marker_addr = marker.local_addr().expect("marker address");
    marker.shutdown(Shutdown::Write).expect("half-close");
    let _ = marker.read(&mut buf);
    drop(marker);
    daemon
        .wait_for_log(&format!("client={marker_addr} "), WAIT)
        .unwrap_or_else(|e| panic!("no access log line for the marker connection: {e}"));
    let leaked: Vec<String> = daemon
        .logs()
        .into_iter()
        .filter(|l| l.contains("lb::access") && l.contains(&format!("client={q_addr} ")))
        .collect();
    assert!(
        leaked.is_empty(),
        "a service with access_log off logged access: {leaked:?}"
    );
}

/// Connections in [`a_stalled_log_reader_does_not_stall_the_proxy`]: their access lines
/// (about 150 bytes each) are far more than the pipe (64 KiB) and the daemon's log queue
/// (`lb_daemon::log_writer::QUEUE_LINES`) hold.
const STALLED_CONNECTIONS: usize = 6_000;

/// A log reader that stalls (a journald under load, a pipe nobody drains) does not stall the
/// proxy: its workers queue their access lines without waiting, the lines that do not fit
/// are dropped, and the daemon says how many once the reader is back.
#[test]
fn a_stalled_log_reader_does_not_stall_the_proxy() {
    let echo = echo_server();
    let vip = free_addr();
    let config = DaemonConfig::new().service(
        ServiceConfig::tcp("web", vip)
            .set("access_log", true)
            .health("kind", "none")
            .backend(echo.addr(), 1),
    );
    let daemon = Daemon::start(&config.to_toml());
    // Reads on however the test ends, so that the daemon's last lines reach its log.
    struct Resume<'a>(&'a Daemon);
    impl Drop for Resume<'_> {
        fn drop(&mut self) {
            self.0.pause_log_reader(false);
        }
    }
    daemon.pause_log_reader(true);
    let resume = Resume(&daemon);
    let started = Instant::now();
    let exchange = || -> io::Result<()> {
        let mut c = connect(vip).map_err(io::Error::other)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"x")?;
        let mut back = [0u8; 1];
        c.read_exact(&mut back)
    };
    for i in 0..STALLED_CONNECTIONS {
        if let Err(e) = exchange() {
            panic!(
                "connection {i} of {STALLED_CONNECTIONS} through the proxy failed while the \
                 log reader stalled ({:?} in): {e}",
                started.elapsed()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{i} connections took over 120 s"
        );
    }
    drop(resume);
    daemon
        .wait_for_log("log line(s) dropped", WAIT)
        .expect("the daemon says how many access lines it dropped");
}
