//! The io_uring proxy carrying TCP on loopback: data integrity, concurrency, half-close,
//! failover between backends, idle timeout and shutdown drain.

mod proxy_support;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use lb_daemon::dataplane::proxy::SpliceMode;
use lb_tests::ports::free_addr;
use proxy_support::{republish, tcp_listener, wait_until, Harness, ServiceSpec, TcpBackend};
use sha2::{Digest, Sha256};
use socket2::SockRef;

const TIMEOUT: Duration = Duration::from_secs(30);

fn connect(vip: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&vip, Duration::from_secs(5)).expect("connect to the VIP");
    s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    s
}

/// Writes `len` pseudo-random bytes from `seed`; returns their SHA-256.
fn send_random(w: &mut impl Write, seed: u64, len: usize) -> io::Result<[u8; 32]> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut hash = Sha256::new();
    let mut chunk = vec![0u8; 61_440];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        rng.fill(&mut chunk[..n]);
        w.write_all(&chunk[..n])?;
        hash.update(&chunk[..n]);
        left -= n;
    }
    Ok(hash.finalize().into())
}

/// Reads to end of file; returns the byte count and SHA-256.
fn receive_all(r: &mut impl Read) -> io::Result<(usize, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 65_536];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n;
    }
}

fn sixteen_mib_each_way(mode: SpliceMode) {
    const LEN: usize = 16 * 1024 * 1024;
    let (tx, rx) = mpsc::channel();
    let backend = TcpBackend::start(move |stream| {
        // Sends its own 16 MiB while reading the client's.
        let mut writer = stream.try_clone().expect("clone stream");
        let sending = std::thread::spawn(move || {
            let sent = send_random(&mut writer, 2, LEN);
            let _ = writer.shutdown(Shutdown::Write);
            sent
        });
        let mut reader = stream;
        let received = receive_all(&mut reader);
        let sent = sending.join().expect("backend writer thread");
        let _ = tx.send((
            received.map_err(|e| e.to_string()),
            sent.map_err(|e| e.to_string()),
        ));
    });
    let mut spec = ServiceSpec::tcp(vec![backend.addr]);
    spec.options.splice = mode;
    let h = Harness::start(spec);

    let client = connect(h.vip);
    let mut writer = client.try_clone().expect("clone client");
    let sending = std::thread::spawn(move || {
        let sent = send_random(&mut writer, 1, LEN);
        writer
            .shutdown(Shutdown::Write)
            .expect("client shutdown(SHUT_WR)");
        sent
    });
    let mut reader = client;
    let (client_got, client_got_hash) = receive_all(&mut reader).expect("client reads the reply");
    let client_sent_hash = sending
        .join()
        .expect("client writer thread")
        .expect("client sends");
    let (backend_got, backend_sent) = rx.recv_timeout(TIMEOUT).expect("the backend finished");
    let (backend_got, backend_got_hash) = backend_got.expect("backend reads the request");
    let backend_sent_hash = backend_sent.expect("backend sends");

    assert_eq!(
        backend_got, LEN,
        "the backend got {backend_got} of {LEN} bytes"
    );
    assert_eq!(
        client_got, LEN,
        "the client got {client_got} of {LEN} bytes"
    );
    assert_eq!(
        backend_got_hash, client_sent_hash,
        "the bytes the backend got differ from what the client sent"
    );
    assert_eq!(
        client_got_hash, backend_sent_hash,
        "the bytes the client got differ from what the backend sent"
    );
    h.wait_idle();
    let stats = h.stats(0);
    assert_eq!(stats.bytes_to_backend.load(Ordering::Relaxed), LEN as u64);
    assert_eq!(stats.bytes_from_backend.load(Ordering::Relaxed), LEN as u64);
    assert_eq!(
        stats.total.load(Ordering::Relaxed),
        1,
        "one connection opened"
    );
    assert_eq!(stats.active(), 0, "the connection is counted closed");
}

#[test]
fn sixteen_mib_each_way_arrive_intact_with_io_uring_splice() {
    sixteen_mib_each_way(SpliceMode::Uring);
}

#[test]
fn sixteen_mib_each_way_arrive_intact_with_splice_syscalls() {
    sixteen_mib_each_way(SpliceMode::Syscall);
}

#[test]
fn two_hundred_concurrent_connections_all_complete() {
    const CLIENTS: usize = 200;
    const LEN: usize = 32 * 1024;
    let backends = [TcpBackend::echo(), TcpBackend::echo()];
    let h = Harness::start(ServiceSpec::tcp(backends.iter().map(|b| b.addr).collect()));
    let connected = Arc::new(Barrier::new(CLIENTS + 1));
    let go = Arc::new(Barrier::new(CLIENTS + 1));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (vip, connected, go) = (h.vip, connected.clone(), go.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let stream = TcpStream::connect_timeout(&vip, Duration::from_secs(10));
                connected.wait();
                go.wait();
                let mut s = stream.map_err(|e| format!("client {i}: connect: {e}"))?;
                s.set_read_timeout(Some(TIMEOUT))
                    .map_err(|e| e.to_string())?;
                let payload: Vec<u8> = (0..LEN).map(|k| (k * 7 + i) as u8).collect();
                let mut reader = s.try_clone().map_err(|e| e.to_string())?;
                let echoed = std::thread::spawn(move || {
                    let mut got = Vec::new();
                    reader.read_to_end(&mut got).map(|_| got)
                });
                s.write_all(&payload)
                    .map_err(|e| format!("client {i}: write: {e}"))?;
                s.shutdown(Shutdown::Write)
                    .map_err(|e| format!("client {i}: shutdown: {e}"))?;
                let got = echoed
                    .join()
                    .map_err(|_| format!("client {i}: reader panicked"))?
                    .map_err(|e| format!("client {i}: read: {e}"))?;
                if got != payload {
                    return Err(format!(
                        "client {i}: got {} bytes back, not its {LEN} bytes",
                        got.len()
                    ));
                }
                Ok(())
            })
        })
        .collect();
    connected.wait();
    let all_open = wait_until(Duration::from_secs(10), || {
        h.proxy().active() == CLIENTS as u64
    });
    let open = h.proxy().active();
    go.wait();
    let failures: Vec<String> = clients
        .into_iter()
        .filter_map(|c| c.join().expect("client thread").err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} clients failed: {failures:?}",
        failures.len()
    );
    assert!(
        all_open,
        "only {open} of {CLIENTS} connections were open at once"
    );
    h.wait_idle();
    let total: u64 = (0..2)
        .map(|b| h.stats(b).total.load(Ordering::Relaxed))
        .sum();
    assert_eq!(
        total, CLIENTS as u64,
        "every client got one backend connection"
    );
    assert_eq!(
        h.proxy().counters().errors,
        0,
        "no connection ended in error"
    );
}

#[test]
fn half_close_reaches_the_backend_and_the_reply_comes_back() {
    let backend = TcpBackend::start(|mut s| {
        // Replies only after the client's end of file: the client's shutdown must arrive.
        let mut request = Vec::new();
        if s.read_to_end(&mut request).is_ok() {
            let reply = format!(
                "got {} bytes: {}",
                request.len(),
                String::from_utf8_lossy(&request)
            );
            let _ = s.write_all(reply.as_bytes());
        }
    });
    let h = Harness::start(ServiceSpec::tcp(vec![backend.addr]));
    let mut client = connect(h.vip);
    client.write_all(b"hello").expect("send the request");
    client.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
    let mut reply = String::new();
    client
        .read_to_string(&mut reply)
        .expect("the reply arrives after the half-close");
    assert_eq!(reply, "got 5 bytes: hello");
    h.wait_idle();
}

#[test]
fn a_half_closed_client_that_resets_releases_the_backend_before_the_idle_timeout() {
    // The client sends its request and half-closes; the backend reads it all and then says
    // nothing (a slow answer). The client gives up with a reset. The proxy must let go of
    // the backend then, not when the 60 s idle timeout comes.
    let (got_request, request_seen) = mpsc::channel();
    let got_request = std::sync::Mutex::new(got_request);
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let backend = {
        let released = released.clone();
        TcpBackend::start(move |mut s| {
            let mut request = Vec::new();
            let _ = s.read_to_end(&mut request);
            let _ = got_request.lock().expect("sender lock").send(request);
            // Quiet, holding the connection, until the test is over.
            for _ in 0..200 {
                if released.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut spec = ServiceSpec::tcp(vec![backend.addr]);
    spec.workers = 1;
    let h = Harness::start(spec);
    let mut client = connect(h.vip);
    client.write_all(b"request").expect("send");
    client.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
    let request = request_seen
        .recv_timeout(TIMEOUT)
        .expect("the backend reads the request to its end");
    assert_eq!(request, b"request");
    assert_eq!(h.proxy().active(), 1);
    SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(client); // a reset
    let gone = wait_until(Duration::from_secs(5), || h.proxy().active() == 0);
    released.store(true, Ordering::SeqCst);
    assert!(
        gone,
        "the proxy still holds the backend connection 5 s after the half-closed client reset"
    );
    assert_eq!(h.stats(0).active(), 0, "the backend's count is given back");
}

#[test]
fn a_half_closed_backend_that_resets_releases_the_client_before_the_idle_timeout() {
    // The mirror case: the backend answers and half-closes, the client keeps its side open
    // and quiet, and the backend then goes away with a reset.
    let backend = TcpBackend::start(|s| {
        let mut s = s;
        let _ = s.write_all(b"bye");
        let _ = s.shutdown(Shutdown::Write);
        std::thread::sleep(Duration::from_millis(200));
        let _ = SockRef::from(&s).set_linger(Some(Duration::ZERO));
        // Dropped here: a reset.
    });
    let mut spec = ServiceSpec::tcp(vec![backend.addr]);
    spec.workers = 1;
    let h = Harness::start(spec);
    let mut client = connect(h.vip);
    let mut reply = Vec::new();
    client
        .read_to_end(&mut reply)
        .expect("the answer and the backend's end of file arrive");
    assert_eq!(reply, b"bye");
    assert!(
        wait_until(Duration::from_secs(5), || h.proxy().active() == 0),
        "the proxy still holds the client's connection 5 s after the half-closed backend reset"
    );
    drop(client);
}

#[test]
fn a_client_that_resets_while_its_upload_waits_on_the_backend_releases_the_backend() {
    // The backend accepts and never reads: the client's upload fills every buffer on the
    // way and the proxy waits for the backend to take more, reading nothing from the
    // client. The client gives up with a reset. The backend must see it within a few sweep
    // ticks (1 s each here), not when the 60 s idle timeout comes.
    let (backend_side, client, sent, h) = upload_until_the_proxy_stops_reading(false);
    expect_reset_passed_on(&backend_side, client, sent, &h);
}

#[test]
fn a_client_that_resets_after_the_backend_finished_releases_the_backend() {
    // As above, once the backend has sent its FIN (which the proxy passed on): nothing
    // writes to the client any more either.
    let (backend_side, client, sent, h) = upload_until_the_proxy_stops_reading(true);
    expect_reset_passed_on(&backend_side, client, sent, &h);
}

#[test]
fn a_client_that_closes_cleanly_after_the_backend_finished_keeps_its_upload() {
    // Both sides have sent their FIN: the client's socket hangs up, cleanly. The sweep must
    // not take that for a reset: every byte of the upload still reaches the backend.
    let (mut backend_side, client, sent, h) = upload_until_the_proxy_stops_reading(true);
    client.shutdown(Shutdown::Write).expect("the client's FIN");
    std::thread::sleep(Duration::from_millis(3_500));
    assert_eq!(
        h.proxy().active(),
        1,
        "the proxy ended a cleanly closing connection while the backend was still to read"
    );
    backend_side
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match backend_side.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("the backend's read after {got} of {sent} bytes: {e}"),
        }
    }
    assert_eq!(got, sent, "the upload arrived cut");
}

/// A proxied connection whose backend never reads (and, with `backend_fin`, has sent its
/// FIN), and a client that uploads until nothing more goes in for 300 ms: the proxy has
/// stopped reading the client. Returns the backend's socket, the client's, the bytes sent
/// and the harness.
fn upload_until_the_proxy_stops_reading(
    backend_fin: bool,
) -> (TcpStream, TcpStream, usize, Harness) {
    let (accepted, backend_side) = mpsc::channel();
    let accepted = std::sync::Mutex::new(accepted);
    let backend = TcpBackend::start(move |s| {
        let _ = accepted.lock().expect("sender lock").send(s);
    });
    let mut spec = ServiceSpec::tcp(vec![backend.addr]);
    spec.workers = 1;
    let h = Harness::start(spec);
    let mut client = connect(h.vip);
    let backend_side: TcpStream = backend_side
        .recv_timeout(TIMEOUT)
        .expect("the backend accepts the proxy's connection");
    if backend_fin {
        backend_side
            .shutdown(Shutdown::Write)
            .expect("the backend's FIN");
        client
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        let mut b = [0u8; 1];
        assert_eq!(client.read(&mut b).expect("read"), 0, "the FIN passed on");
    }
    client.set_nonblocking(true).expect("non-blocking");
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0usize;
    let mut stuck_since = std::time::Instant::now();
    while stuck_since.elapsed() < Duration::from_millis(300) {
        match client.write(&chunk) {
            Ok(n) => {
                sent += n;
                stuck_since = std::time::Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("upload after {sent} bytes: {e}"),
        }
        assert!(sent < 1 << 30, "a backend that never reads took 1 GiB");
    }
    assert_eq!(h.proxy().active(), 1);
    (backend_side, client, sent, h)
}

/// The client resets; its reset reaches the backend within 5 s, asked without reading
/// (a read would make room and let the proxy find the reset itself), and the proxy lets
/// the connection go.
fn expect_reset_passed_on(backend_side: &TcpStream, client: TcpStream, sent: usize, h: &Harness) {
    SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(client);
    let mut seen = None;
    let reset = wait_until(Duration::from_secs(5), || {
        seen = SockRef::from(backend_side).take_error().ok().flatten();
        seen.is_some()
    });
    assert!(
        reset,
        "the backend saw nothing 5 s after the client reset ({sent} bytes uploaded, {} open)",
        h.proxy().active()
    );
    assert_eq!(
        seen.map(|e| e.kind()),
        Some(io::ErrorKind::ConnectionReset),
        "the backend is told of the client's reset"
    );
    assert!(
        wait_until(Duration::from_secs(5), || h.proxy().active() == 0),
        "the proxy still holds the connection after resetting the backend"
    );
}

#[test]
fn urgent_data_is_relayed_inline_instead_of_stalling_the_connection() {
    // A splice cannot read past TCP urgent data while poll keeps saying "readable": without
    // care the relay would spin and the bytes after the urgent one would never arrive.
    for mode in [SpliceMode::Uring, SpliceMode::Syscall] {
        let backend = TcpBackend::echo();
        let mut spec = ServiceSpec::tcp(vec![backend.addr]);
        spec.options.splice = mode;
        let h = Harness::start(spec);
        let mut client = connect(h.vip);
        client.write_all(b"abc").expect("send");
        std::thread::sleep(Duration::from_millis(20));
        let sent = SockRef::from(&client)
            .send_out_of_band(b"!")
            .expect("send urgent data");
        assert_eq!(sent, 1);
        std::thread::sleep(Duration::from_millis(20));
        client.write_all(b"def").expect("send");
        client.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
        let mut reply = Vec::new();
        client
            .read_to_end(&mut reply)
            .expect("the connection is not stuck at the urgent byte");
        assert_eq!(
            String::from_utf8_lossy(&reply),
            "abc!def",
            "{mode:?}: every byte, the urgent one in line, comes back"
        );
        h.wait_idle();
    }
}

#[test]
fn urgent_data_just_before_end_of_file_is_not_lost() {
    // Everything (urgent byte and end of file included) is queued before the relay starts:
    // the first backend hangs for the connect timeout. A splice then reports end of file at
    // the urgent mark; the bytes after it must still come through.
    let blackhole = tcp_listener(0);
    let blackhole_addr = blackhole.local_addr().expect("blackhole address");
    let _filler = TcpStream::connect(blackhole_addr).expect("fill the accept queue");
    let backend = TcpBackend::echo();
    let mut spec = ServiceSpec::tcp(vec![blackhole_addr, backend.addr]);
    spec.connect_timeout = Duration::from_millis(300);
    spec.workers = 1;
    let h = Harness::start(spec);
    let mut client = connect(h.vip);
    client.write_all(b"abc").expect("send");
    SockRef::from(&client)
        .send_out_of_band(b"!")
        .expect("send urgent data");
    client.write_all(b"def").expect("send");
    client.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).expect("the reply arrives");
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "abc!def",
        "no byte after the urgent one is lost"
    );
    h.wait_idle();
}

#[test]
fn a_refused_backend_is_retried_on_the_next_without_client_error() {
    let dead = free_addr();
    let alive = TcpBackend::echo();
    let mut spec = ServiceSpec::tcp(vec![dead, alive.addr]);
    spec.retries = 1;
    spec.workers = 1;
    let h = Harness::start(spec);
    let mut client = connect(h.vip);
    client.write_all(b"ping").expect("send");
    client.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
    let mut reply = Vec::new();
    client
        .read_to_end(&mut reply)
        .expect("the client sees no error although the first backend refused");
    assert_eq!(reply, b"ping");
    assert_eq!(
        h.events.failed(),
        vec![(dead, io::ErrorKind::ConnectionRefused)],
        "the refused connect is reported once"
    );
    assert!(
        h.events.succeeded().is_empty(),
        "{} never failed, so it has no recovery to report",
        alive.addr
    );
    assert_eq!(h.stats(0).connect_failures.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats(1).total.load(Ordering::Relaxed), 1);
    assert_eq!(h.proxy().counters().no_backend, 0);
    h.wait_idle();
}

#[test]
fn a_backend_that_failed_and_then_accepts_is_reported_recovered_once() {
    // The control plane hears of a success only when it ends a run of failures: that is
    // what resets the backend's passive failure streak. Successes after successes stay in
    // the data plane.
    let addr = free_addr();
    let mut spec = ServiceSpec::tcp(vec![addr]);
    spec.retries = 0;
    spec.workers = 1;
    let h = Harness::start(spec);
    // The proxy resets the client; the reset may even beat the end of the client's connect.
    if let Ok(mut refused) = TcpStream::connect_timeout(&h.vip, Duration::from_secs(5)) {
        refused
            .set_read_timeout(Some(TIMEOUT))
            .expect("read timeout");
        let mut nothing = Vec::new();
        let _ = refused.read_to_end(&mut nothing);
        assert!(nothing.is_empty(), "no backend could answer");
    }
    assert!(
        wait_until(TIMEOUT, || !h.events.failed().is_empty()),
        "the refused connect was never reported"
    );
    assert_eq!(
        h.events.failed(),
        vec![(addr, io::ErrorKind::ConnectionRefused)],
        "the refused connect is reported"
    );

    // The backend comes back on the same address.
    let listener = std::net::TcpListener::bind(addr).expect("bind the backend's address");
    let server = std::thread::spawn(move || {
        for _ in 0..3 {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut reader = s.try_clone().expect("clone stream");
            let _ = io::copy(&mut reader, &mut s);
        }
    });
    for k in 0..3 {
        let mut client = connect(h.vip);
        client.write_all(b"ping").expect("send");
        client.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
        let mut reply = Vec::new();
        client
            .read_to_end(&mut reply)
            .expect("the recovered backend answers");
        assert_eq!(reply, b"ping", "connection {k} was served");
    }
    server.join().expect("the backend thread ends");
    assert_eq!(
        h.events.succeeded(),
        vec![addr],
        "{addr} recovered once: the first success after the failure is reported, and only it"
    );
    assert_eq!(h.stats(0).total.load(Ordering::Relaxed), 3);
    h.wait_idle();
}

#[test]
fn a_backend_that_never_answers_times_out_and_the_next_is_tried() {
    // A listener with a full accept queue drops SYNs: connects to it hang.
    let blackhole = tcp_listener(0);
    let blackhole_addr = blackhole.local_addr().expect("blackhole address");
    let _filler = TcpStream::connect(blackhole_addr).expect("fill the accept queue");
    let alive = TcpBackend::echo();
    let mut spec = ServiceSpec::tcp(vec![blackhole_addr, alive.addr]);
    spec.connect_timeout = Duration::from_millis(200);
    spec.retries = 1;
    spec.workers = 1;
    let h = Harness::start(spec);
    let mut client = connect(h.vip);
    client.write_all(b"ping").expect("send");
    client.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
    let mut reply = Vec::new();
    client
        .read_to_end(&mut reply)
        .expect("served by the second backend");
    assert_eq!(reply, b"ping");
    assert_eq!(
        h.events.failed(),
        vec![(blackhole_addr, io::ErrorKind::TimedOut)],
        "the hanging connect is reported as a timeout"
    );
    h.wait_idle();
}

#[test]
fn a_connect_in_flight_counts_as_active_for_the_schedulers() {
    // least_conn and random_two read `active`: a backend whose connects hang must look busy
    // while they hang, not idle, or it would draw every new connection.
    let blackhole = tcp_listener(0);
    let blackhole_addr = blackhole.local_addr().expect("blackhole address");
    let _filler = TcpStream::connect(blackhole_addr).expect("fill the accept queue");
    let alive = TcpBackend::echo();
    let mut spec = ServiceSpec::tcp(vec![blackhole_addr, alive.addr]);
    spec.connect_timeout = Duration::from_millis(1500);
    spec.retries = 1;
    spec.workers = 1;
    let h = Harness::start(spec);
    let mut client = connect(h.vip);
    assert!(
        wait_until(TIMEOUT, || h.stats(0).active() == 1),
        "the hanging connect to {blackhole_addr} should count as an active connection"
    );
    assert_eq!(
        h.stats(0).total.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a connect that has not succeeded is not a connection in `total`"
    );
    client.write_all(b"ping").expect("send");
    client.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
    let mut reply = Vec::new();
    client
        .read_to_end(&mut reply)
        .expect("served by the second backend after the timeout");
    assert_eq!(reply, b"ping");
    assert_eq!(
        h.stats(0).active(),
        0,
        "the timed-out attempt must give its count back"
    );
    h.wait_idle();
}

#[test]
fn a_retry_picks_from_the_current_table() {
    // b0's connect hangs; meanwhile b0 goes DOWN and a new table sends new flows to b2 only.
    // The retry after b0's timeout must follow that table: the old one would pick b1, which
    // hangs too, and with one retry left that would cost the client its connection.
    let hang = |_| {
        let l = tcp_listener(0);
        let addr = l.local_addr().expect("blackhole address");
        let filler = TcpStream::connect(addr).expect("fill the accept queue");
        (l, filler, addr)
    };
    let (_l0, _f0, b0) = hang(0);
    let (_l1, _f1, b1) = hang(1);
    let alive = TcpBackend::echo();
    let mut spec = ServiceSpec::tcp(vec![b0, b1, alive.addr]);
    spec.connect_timeout = Duration::from_millis(800);
    spec.retries = 1;
    spec.workers = 1;
    let h = Harness::start(spec);
    let mut client = connect(h.vip);
    assert!(
        wait_until(TIMEOUT, || h.stats(0).active() == 1),
        "the first attempt should be hanging on b0"
    );
    republish(&h, 2, |b0| b0.up = false);
    let mut reply = Vec::new();
    client.write_all(b"ping").expect("send");
    client.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
    client
        .read_to_end(&mut reply)
        .expect("the retry should reach the backend the current table names, not b1");
    assert_eq!(reply, b"ping");
    h.wait_idle();
}

#[test]
fn the_client_is_reset_when_every_backend_refuses() {
    let (dead1, dead2) = (free_addr(), free_addr());
    let mut spec = ServiceSpec::tcp(vec![dead1, dead2]);
    spec.retries = 5;
    spec.workers = 1;
    let h = Harness::start(spec);
    // The reset can beat the client's own connect() to the finish line.
    match TcpStream::connect_timeout(&h.vip, Duration::from_secs(5)) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connect to the VIP: {e}"),
        Ok(mut client) => {
            client
                .set_read_timeout(Some(TIMEOUT))
                .expect("read timeout");
            let mut buf = [0u8; 16];
            match client.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                other => panic!("the client should be closed, got {other:?}"),
            }
        }
    }
    assert!(
        wait_until(Duration::from_secs(5), || h.events.failed().len() == 2),
        "both refused connects are reported, got {:?}",
        h.events.failed()
    );
    let mut failed: Vec<SocketAddr> = h.events.failed().into_iter().map(|(a, _)| a).collect();
    failed.sort();
    let mut both = vec![dead1, dead2];
    both.sort();
    assert_eq!(
        failed, both,
        "each backend tried once, however many retries are allowed"
    );
    assert!(
        wait_until(Duration::from_secs(5), || h.proxy().counters().no_backend
            == 1),
        "the closed connection is counted"
    );
    h.wait_idle();
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let (tx, rx) = mpsc::channel();
    let backend = TcpBackend::start(move |mut s| {
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        let _ = s.write_all(&buf[..n]);
        // Then wait for the proxy to close the connection.
        let _ = tx.send(s.read(&mut buf).map_err(|e| e.kind()));
    });
    let mut spec = ServiceSpec::tcp(vec![backend.addr]);
    spec.idle_timeout = Duration::from_millis(300);
    let h = Harness::start(spec);
    let mut client = connect(h.vip);
    client.write_all(b"hi").expect("send");
    let mut buf = [0u8; 2];
    client.read_exact(&mut buf).expect("echo");
    let mut rest = [0u8; 8];
    assert_eq!(
        client
            .read(&mut rest)
            .expect("the idle connection is closed, not reset"),
        0,
        "the client sees end of file after the idle timeout"
    );
    assert_eq!(
        rx.recv_timeout(TIMEOUT)
            .expect("the backend's read returns"),
        Ok(0),
        "the backend sees end of file too"
    );
    h.wait_idle();
}

#[test]
fn a_stalled_stream_cut_at_the_idle_timeout_is_reset_not_ended() {
    // The backend writes more than the socket buffers and the pipe can hold; the client reads
    // nothing, so bytes sit in the proxy when the idle timeout fires. A clean end of file
    // would tell the client it had the whole stream; it must see a reset.
    let backend = TcpBackend::start(|mut s| {
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..1024 {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut spec = ServiceSpec::tcp(vec![backend.addr]);
    spec.idle_timeout = Duration::from_millis(300);
    let h = Harness::start(spec);
    let mut client = connect(h.vip);
    client
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    std::thread::sleep(Duration::from_millis(1500));
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    let end = loop {
        match client.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got += n,
            Err(e) => break Err(e.kind()),
        }
    };
    assert!(
        got < 64 << 20,
        "the client got the whole 64 MiB stream although it stalled past the idle timeout"
    );
    assert_eq!(
        end,
        Err(io::ErrorKind::ConnectionReset),
        "after {got} bytes the cut stream must end in a reset, not a clean end of file"
    );
    h.wait_idle();
}

#[test]
fn shutdown_lets_an_open_connection_finish() {
    let (release, released) = mpsc::channel::<()>();
    let released = std::sync::Mutex::new(released);
    let backend = TcpBackend::start(move |mut s| {
        let mut buf = [0u8; 7];
        if s.read_exact(&mut buf).is_ok() {
            let _ = released.lock().expect("lock").recv_timeout(TIMEOUT);
            let _ = s.write_all(b"response");
        }
    });
    let mut h = Harness::start(ServiceSpec::tcp(vec![backend.addr]));
    let mut client = connect(h.vip);
    client.write_all(b"request").expect("send");
    assert!(
        wait_until(Duration::from_secs(5), || h.stats(0).active() == 1),
        "the backend connection is open before shutdown"
    );
    let proxy = h.take();
    let vip = h.vip;
    let stopping = std::thread::spawn(move || proxy.shutdown(Duration::from_secs(20)));
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect(vip).is_err()),
        "new connections are refused once shutdown begins"
    );
    release.send(()).expect("release the backend");
    let mut reply = Vec::new();
    client
        .read_to_end(&mut reply)
        .expect("the open connection finishes");
    assert_eq!(reply, b"response");
    drop(client);
    let cut = stopping.join().expect("shutdown thread");
    assert_eq!(
        cut, 0,
        "a connection that finished within the drain is not cut off"
    );
    assert_eq!(h.stats(0).active(), 0);
}

#[test]
fn shutdown_cuts_off_a_connection_that_outlives_the_drain() {
    let backend = TcpBackend::start(|mut s| {
        let mut buf = [0u8; 64];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut h = Harness::start(ServiceSpec::tcp(vec![backend.addr]));
    let mut client = connect(h.vip);
    client.write_all(b"x").expect("send");
    assert!(
        wait_until(Duration::from_secs(5), || h.stats(0).active() == 1),
        "the backend connection is open before shutdown"
    );
    let cut = h.take().shutdown(Duration::from_millis(200));
    assert_eq!(cut, 1, "the open connection is cut off at the deadline");
    let mut buf = [0u8; 8];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("the cut-off client should be closed, got {other:?}"),
    }
    assert_eq!(
        h.stats(0).active(),
        0,
        "the cut-off connection is counted closed"
    );
}

#[test]
fn a_drain_cut_short_closes_what_is_open_at_once() {
    let backend = TcpBackend::start(|mut s| {
        let mut buf = [0u8; 64];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut h = Harness::start(ServiceSpec::tcp(vec![backend.addr]));
    let mut client = connect(h.vip);
    client.write_all(b"x").expect("send");
    assert!(
        wait_until(Duration::from_secs(5), || h.stats(0).active() == 1),
        "the backend connection is open before shutdown"
    );
    let proxy = h.take();
    let cut_short = proxy.drain_cut();
    let vip = h.vip;
    let stopping = std::thread::spawn(move || proxy.shutdown(Duration::from_secs(60)));
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect(vip).is_err()),
        "new connections are refused once shutdown begins"
    );
    let asked = std::time::Instant::now();
    cut_short.now();
    let cut = stopping.join().expect("shutdown thread");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the drain went on for {:?} after it was cut short",
        asked.elapsed()
    );
    assert_eq!(cut, 1, "the open connection is counted as cut off");
    let mut buf = [0u8; 8];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("the cut-off client should be closed, got {other:?}"),
    }
    assert_eq!(h.stats(0).active(), 0);
}
