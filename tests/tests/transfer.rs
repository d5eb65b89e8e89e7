//! Bytes through a TCP service arrive unchanged: 100 MiB each way, 200 connections at once,
//! and a client that half-closes still gets the backend's reply.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lb_tests::client::{connect, download, upload, Upload};
use lb_tests::config::{DaemonConfig, ServiceConfig};
use lb_tests::data::Receipt;
use lb_tests::load::wait_until_each_answers;
use lb_tests::ports::free_addr;
use lb_tests::{Daemon, HashServer, SourceServer};

const MIB: u64 = 1024 * 1024;

/// A TCP service on a fresh VIP in front of `backends`, started and answering.
fn service(backends: &[SocketAddr]) -> (Daemon, SocketAddr) {
    let vip = free_addr();
    let mut svc = ServiceConfig::tcp("bulk", vip)
        .scheduler("round_robin")
        .fast_health("tcp");
    for b in backends {
        svc = svc.backend(*b, 1);
    }
    (
        Daemon::start(&DaemonConfig::new().service(svc).to_toml()),
        vip,
    )
}

/// The receipt of the seeded stream, computed on another thread while the transfer runs.
fn expected_in_background(len: u64, seed: u64) -> std::thread::JoinHandle<Receipt> {
    std::thread::spawn(move || Receipt::of_stream(len, seed))
}

#[test]
fn upload_of_100_mib_arrives_byte_identical() {
    let backend = HashServer::start("sink").expect("hash server starts");
    let (_daemon, vip) = service(&[backend.addr()]);
    let (len, seed) = (100 * MIB, 0x5eed_0001);
    let expected = expected_in_background(len, seed);
    let got = upload(vip, len, seed).unwrap_or_else(|e| panic!("the 100 MiB upload failed: {e}"));
    let expected = expected.join().expect("hashing thread");
    assert_eq!(
        got, expected,
        "the backend received different bytes than the client sent through the balancer \
         (received: {got}; sent: {expected})"
    );
}

#[test]
fn download_of_100_mib_arrives_byte_identical() {
    let backend = SourceServer::start("source").expect("source server starts");
    let (_daemon, vip) = service(&[backend.addr()]);
    let (len, seed) = (100 * MIB, 0x5eed_0002);
    let expected = expected_in_background(len, seed);
    let got =
        download(vip, len, seed).unwrap_or_else(|e| panic!("the 100 MiB download failed: {e}"));
    let expected = expected.join().expect("hashing thread");
    assert_eq!(
        got, expected,
        "the client received different bytes than the backend sent through the balancer \
         (received: {got}; sent: {expected})"
    );
}

#[test]
fn two_hundred_concurrent_connections_all_complete() {
    const CLIENTS: usize = 200;
    let backends: Vec<HashServer> = (1..=3)
        .map(|i| HashServer::start(&format!("h{i}")).expect("hash server starts"))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let (_daemon, vip) = service(&addrs);
    // Every backend reachable before the crowd arrives.
    let probe = std::sync::atomic::AtomicU64::new(0);
    wait_until_each_answers(&["ok"], Duration::from_secs(15), || {
        let seed = probe.fetch_add(1, Ordering::Relaxed);
        upload(vip, 10, seed).map(|_| "ok".to_string())
    })
    .unwrap_or_else(|e| panic!("the service never answered: {e}"));

    let connected = AtomicUsize::new(0);
    let all_open_by = Instant::now() + Duration::from_secs(20);
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let connected = &connected;
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(s, move || -> Result<(), String> {
                        let len = 64 * 1024 + i as u64 * 997;
                        let seed = 1_000 + i as u64;
                        let up = Upload::start(vip, seed);
                        connected.fetch_add(1, Ordering::SeqCst);
                        let mut up = up.map_err(|e| format!("client {i}: {e}"))?;
                        // Send only once all 200 are connected, so they are open at once.
                        while connected.load(Ordering::SeqCst) < CLIENTS
                            && Instant::now() < all_open_by
                        {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        up.send(len).map_err(|e| format!("client {i}: {e}"))?;
                        let got = up.finish().map_err(|e| format!("client {i}: {e}"))?;
                        let want = Receipt::of_stream(len, seed);
                        if got == want {
                            Ok(())
                        } else {
                            Err(format!("client {i}: backend got {got}, client sent {want}"))
                        }
                    })
                    .expect("a client thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client thread panicked".into()))
            })
            .collect()
    });
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {CLIENTS} concurrent connections did not complete intact: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    let served: u64 = backends.iter().map(|b| b.receipts()).sum();
    assert!(
        served >= CLIENTS as u64,
        "the backends wrote {served} receipts for {CLIENTS} uploads"
    );
}

#[test]
fn client_half_close_still_gets_the_backends_reply() {
    let backend = HashServer::start("sink").expect("hash server starts");
    let (_daemon, vip) = service(&[backend.addr()]);
    let payload = b"everything I have to say";
    let mut conn = connect(vip).unwrap_or_else(|e| panic!("cannot connect to the VIP: {e}"));
    conn.write_all(payload).expect("the request is sent");
    conn.shutdown(Shutdown::Write)
        .expect("the client half-closes (shutdown SHUT_WR)");
    // The reply is only written after the backend saw the client's end of stream; give the
    // balancer time to pass it on rather than racing it.
    std::thread::sleep(Duration::from_millis(200));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap_or_else(|e| {
        panic!("after the client half-closed, reading the backend's reply failed: {e}")
    });
    assert_eq!(
        Receipt::parse(&reply),
        Some(Receipt::of(payload)),
        "after the client half-closed, the backend's reply did not arrive intact (got {reply:?})"
    );
}
