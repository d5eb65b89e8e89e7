//! The io_uring proxy carrying UDP on loopback: per-client sessions, datagram integrity,
//! session expiry, ICMP unreachable, shutdown.

mod proxy_support;

use std::collections::BTreeSet;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::Duration;

use lb_daemon::config::ClientLimits;
use lb_tests::UdpEcho;
use proxy_support::{
    in_private_network, republish, udp_client as client, wait_until, Harness, ServiceSpec, SERVICE,
};

/// Datagram `seq` of client `id`: its header, then a length that varies, up to 60 000 bytes.
fn datagram(id: u8, seq: u32) -> Vec<u8> {
    let len = if seq.is_multiple_of(250) {
        60_000
    } else {
        (seq % 13) as usize * 97
    };
    let mut d = format!("c{id}#{seq:05}|").into_bytes();
    d.extend((0..len).map(|k| (k as u32 ^ seq) as u8));
    d
}

#[test]
fn three_clients_each_stay_with_their_backend_and_nothing_is_lost() {
    const DATAGRAMS: u32 = 1000;
    const WINDOW: u32 = 100;
    let backends = [
        UdpEcho::start("b0").expect("start a UDP echo backend"),
        UdpEcho::start("b1").expect("start a UDP echo backend"),
        UdpEcho::start("b2").expect("start a UDP echo backend"),
    ];
    let h = Harness::start(ServiceSpec::udp(
        backends.iter().map(|b| b.addr()).collect(),
    ));
    let clients: Vec<_> = (0..3u8)
        .map(|id| {
            let vip = h.vip;
            std::thread::spawn(move || -> Result<(String, u64), String> {
                let socket = client(vip);
                let mut seen = BTreeSet::new();
                let mut backend: Option<String> = None;
                let mut sent_bytes = 0u64;
                let mut buf = vec![0u8; 65_600];
                for window in 0..DATAGRAMS / WINDOW {
                    let seqs = window * WINDOW..(window + 1) * WINDOW;
                    for seq in seqs.clone() {
                        let d = datagram(id, seq);
                        sent_bytes += d.len() as u64;
                        socket
                            .send(&d)
                            .map_err(|e| format!("client {id}: send: {e}"))?;
                    }
                    for _ in seqs {
                        let n = socket.recv(&mut buf).map_err(|e| {
                            format!(
                                "client {id}: {} of {DATAGRAMS} replies, then: {e}",
                                seen.len()
                            )
                        })?;
                        let reply = &buf[..n];
                        let colon = reply
                            .iter()
                            .position(|&b| b == b':')
                            .ok_or(format!("client {id}: a reply without a backend name"))?;
                        let name = String::from_utf8_lossy(&reply[..colon]).into_owned();
                        let body = &reply[colon + 1..];
                        // The header is `c{id}#{seq:05}|`: the sequence number is bytes 3..8.
                        let seq: u32 = body
                            .get(3..8)
                            .and_then(|digits| std::str::from_utf8(digits).ok())
                            .and_then(|s| s.parse().ok())
                            .ok_or(format!("client {id}: a reply with a garbled header"))?;
                        if body != datagram(id, seq).as_slice() {
                            return Err(format!(
                                "client {id}: reply {seq} is not the datagram it sent ({} bytes)",
                                body.len()
                            ));
                        }
                        if !seen.insert(seq) {
                            return Err(format!("client {id}: reply {seq} arrived twice"));
                        }
                        match &backend {
                            None => backend = Some(name),
                            Some(b) if *b != name => {
                                return Err(format!(
                                    "client {id}: replies came from {b} and then {name}"
                                ))
                            }
                            Some(_) => {}
                        }
                    }
                }
                if seen.len() != DATAGRAMS as usize {
                    return Err(format!(
                        "client {id}: {} of {DATAGRAMS} replies",
                        seen.len()
                    ));
                }
                Ok((backend.unwrap_or_default(), sent_bytes))
            })
        })
        .collect();
    let results: Vec<_> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "clients failed: {failures:?}");
    assert_eq!(h.proxy().active(), 3, "one session per client");
    let sent: u64 = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.1)
        .sum();
    let to_backends: u64 = (0..3)
        .map(|b| h.stats(b).bytes_to_backend.load(Ordering::Relaxed))
        .sum();
    assert_eq!(
        to_backends, sent,
        "every byte sent is counted towards the backends"
    );
    assert_eq!(
        h.proxy().counters().dropped_datagrams,
        0,
        "no datagram dropped"
    );
    let sessions: u64 = (0..3).map(|b| h.stats(b).active()).sum();
    assert_eq!(sessions, 3, "backends count one open session per client");
}

#[test]
fn an_idle_session_expires_and_the_next_datagram_opens_a_new_one() {
    let backends = [
        UdpEcho::start("b0").expect("start a UDP echo backend"),
        UdpEcho::start("b1").expect("start a UDP echo backend"),
    ];
    let mut spec = ServiceSpec::udp(backends.iter().map(|b| b.addr()).collect());
    spec.idle_timeout = Duration::from_millis(300);
    let h = Harness::start(spec);
    let socket = client(h.vip);
    let mut buf = [0u8; 64];
    socket.send(b"one").expect("send");
    let n = socket.recv(&mut buf).expect("first reply");
    let first = buf[..n].to_vec();
    assert_eq!(h.proxy().active(), 1, "the first datagram opened a session");
    h.wait_idle();
    let total = |h: &Harness| -> u64 {
        (0..2)
            .map(|b| h.stats(b).total.load(Ordering::Relaxed))
            .sum()
    };
    assert_eq!(total(&h), 1);
    assert_eq!(
        h.stats(0).active() + h.stats(1).active(),
        0,
        "the session is counted closed"
    );
    socket.send(b"two").expect("send");
    let n = socket.recv(&mut buf).expect("reply after expiry");
    assert_eq!(total(&h), 2, "a new session was opened");
    // The round-robin test scheduler hands the new session the other backend.
    assert_ne!(
        first[..2],
        buf[..2],
        "the new session picked a backend afresh ({:?}, then {:?})",
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&buf[..n])
    );
}

#[test]
fn an_icmp_port_unreachable_is_reported_as_a_failed_connect() {
    let dead = {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind a probe port");
        s.local_addr().expect("probe address")
    };
    let h = Harness::start(ServiceSpec::udp(vec![dead]));
    let socket = client(h.vip);
    let reported = wait_until(Duration::from_secs(10), || {
        let _ = socket.send(b"anyone?");
        std::thread::sleep(Duration::from_millis(20));
        !h.events.failed().is_empty()
    });
    assert!(reported, "the unreachable backend was never reported");
    assert_eq!(
        h.events.failed()[0],
        (dead, io::ErrorKind::ConnectionRefused)
    );
    assert!(h.stats(0).connect_failures.load(Ordering::Relaxed) >= 1);
    assert!(
        h.events.succeeded().is_empty(),
        "a dead backend never answered"
    );
}

#[test]
fn replies_to_a_wildcard_vip_come_from_the_address_the_client_used() {
    // On a VIP bound to 0.0.0.0, a reply must leave from the address the client sent to
    // (here 127.0.0.2), not from the one routing would pick (127.0.0.1): the client's
    // connected socket discards datagrams from any other address.
    in_private_network(|| {
        let backend = UdpEcho::start("b0").expect("start a UDP echo backend");
        // IPv4, and dual-stack IPv6 where IPv4 clients appear as IPv4-mapped addresses.
        for wildcard in ["0.0.0.0:0", "[::]:0"] {
            let mut spec = ServiceSpec::udp(vec![backend.addr()]);
            spec.listen = wildcard.parse().expect("literal address");
            let h = Harness::start(spec);
            let target = SocketAddr::from(([127, 0, 0, 2], h.vip.port()));
            let socket = client(target);
            let mut buf = [0u8; 64];
            for round in 0..3 {
                socket.send(b"hello").map_err(|e| format!("send: {e}"))?;
                let n = socket.recv(&mut buf).map_err(|e| {
                    format!("VIP {wildcard}, round {round}: no reply from {target}: {e}")
                })?;
                if &buf[..n] != b"b0:hello" {
                    return Err(format!(
                        "VIP {wildcard}, round {round}: reply {:?}",
                        String::from_utf8_lossy(&buf[..n])
                    ));
                }
            }
        }
        Ok(())
    })
    .expect("replies from the VIP address");
}

#[test]
fn shutdown_cuts_off_sessions_open_at_the_deadline() {
    let backend = UdpEcho::start("b0").expect("start a UDP echo backend");
    let mut h = Harness::start(ServiceSpec::udp(vec![backend.addr()]));
    let socket = client(h.vip);
    let mut buf = [0u8; 64];
    socket.send(b"hello").expect("send");
    socket.recv(&mut buf).expect("reply");
    let cut = h.take().shutdown(Duration::from_millis(100));
    assert_eq!(cut, 1, "the open session is cut off at the deadline");
    assert_eq!(h.stats(0).active(), 0, "the session is counted closed");
}

/// Sends `payload` through the VIP and returns the reply, or says why there was none.
fn ask(socket: &UdpSocket, payload: &[u8]) -> Result<String, String> {
    let mut buf = [0u8; 64];
    socket
        .send(payload)
        .map_err(|e| format!("send {:?}: {e}", String::from_utf8_lossy(payload)))?;
    let n = socket
        .recv(&mut buf)
        .map_err(|e| format!("no reply to {:?}: {e}", String::from_utf8_lossy(payload)))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// With `socket`'s session on b0 (backend 0 of two): b0 drains and the session stays; b0
/// goes DOWN and the very next datagram reaches b1 on a new session.
fn stays_while_b0_drains_and_moves_when_it_goes_down(h: &Harness, socket: &UdpSocket) {
    republish(h, 1, |b0| b0.weight = 0);
    assert_eq!(
        ask(socket, b"two"),
        Ok("b0:two".into()),
        "a draining backend (weight 0) must keep the sessions it has"
    );

    republish(h, 1, |b0| b0.up = false);
    assert_eq!(
        ask(socket, b"three"),
        Ok("b1:three".into()),
        "after b0 went DOWN the client's next datagram must reach a backend that is up"
    );
    assert_eq!(
        h.stats(0).active(),
        0,
        "the session to the DOWN backend is closed"
    );
    assert_eq!(h.stats(1).active(), 1, "the client has a new session on b1");
}

#[test]
fn a_session_stays_on_a_draining_backend_and_moves_off_a_down_one() {
    let backends = [
        UdpEcho::start("b0").expect("start a UDP echo backend"),
        UdpEcho::start("b1").expect("start a UDP echo backend"),
    ];
    let h = Harness::start(ServiceSpec::udp(
        backends.iter().map(|b| b.addr()).collect(),
    ));
    let socket = client(h.vip);
    assert_eq!(
        ask(&socket, b"one"),
        Ok("b0:one".into()),
        "the round-robin test scheduler starts with b0"
    );
    stays_while_b0_drains_and_moves_when_it_goes_down(&h, &socket);
}

#[test]
fn a_client_at_its_session_limit_moves_off_a_down_backend_at_once() {
    let backends = [
        UdpEcho::start("b0").expect("start a UDP echo backend"),
        UdpEcho::start("b1").expect("start a UDP echo backend"),
    ];
    let mut spec = ServiceSpec::udp(backends.iter().map(|b| b.addr()).collect());
    spec.limits = ClientLimits {
        max_connections: Some(1),
        ..ClientLimits::default()
    };
    // One worker, so that both of the client's sockets meet the same worker's memory of
    // refusals.
    spec.workers = 1;
    let h = Harness::start(spec);
    let socket = client(h.vip);
    assert_eq!(
        ask(&socket, b"one"),
        Ok("b0:one".into()),
        "the round-robin test scheduler starts with b0"
    );
    // The same address from another port is over its limit of one session: refused, and
    // the refusal remembered by the worker.
    let other = client(h.vip);
    other.send(b"over the limit").expect("send to the VIP");
    assert!(
        wait_until(Duration::from_secs(10), || h.proxy().limited(SERVICE)
            == Some(1)),
        "a second session of a client limited to one was not refused"
    );
    stays_while_b0_drains_and_moves_when_it_goes_down(&h, &socket);
    assert_eq!(
        h.proxy().limited(SERVICE),
        Some(1),
        "a datagram of the client was refused on its way to b1"
    );
}
