//! The load generators, in Rust: bulk TCP, new connections, kept-alive request/reply, UDP
//! request/reply. Each runs for a bounded time from the calling thread's network namespace
//! (call them inside `Netns::enter`: the threads they spawn inherit it) and returns what it
//! measured. `targets`: where to connect, used in turn per flow/connection (one VIP, or the
//! three backends for `direct`).
//!
//! Why not iperf3 and wrk: iperf3 opens a control connection and separate data connections,
//! which a balancer spreads over different iperf3 servers that then refuse them; wrk speaks
//! only HTTP. These clients and the servers in [`crate::server`] speak a trivial protocol.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::server::MSG;
use crate::stats::quantile;
use crate::stop;

/// How long a connect or a reply may take before the attempt counts as failed.
const PATIENCE: Duration = Duration::from_secs(2);

/// What a bulk test moved.
#[derive(Debug, Clone, Copy)]
pub struct Bulk {
    /// Bytes the servers counted.
    pub bytes: u64,
    /// Seconds from the first connect to the last count received.
    pub seconds: f64,
}

impl Bulk {
    /// Throughput in Gbit/s.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }
}

/// `flows` TCP connections each send for `dur`, then half-close and read the byte count the
/// server received. `Err` when a flow fails (connect refused, reset, no count).
pub fn bulk(targets: &[SocketAddr], flows: usize, dur: Duration) -> io::Result<Bulk> {
    let started = Instant::now();
    let results: Vec<io::Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..flows)
            .map(|i| {
                let target = targets[i % targets.len()];
                s.spawn(move || bulk_flow(target, started + dur))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("flow panicked")))
            })
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut bytes = 0;
    for r in results {
        bytes += r?;
    }
    Ok(Bulk { bytes, seconds })
}

fn bulk_flow(target: SocketAddr, until: Instant) -> io::Result<u64> {
    let mut conn = TcpStream::connect_timeout(&target, PATIENCE)?;
    conn.set_write_timeout(Some(Duration::from_millis(200)))?;
    let buf = vec![0x5au8; 256 * 1024];
    while Instant::now() < until && !stop::requested() {
        match conn.write(&buf) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count)?;
    Ok(u64::from_be_bytes(count))
}

/// Result of a rate test.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Completed operations (connections, exchanges, replies).
    pub done: u64,
    /// Failed operations (refused, reset, timed out).
    pub failed: u64,
    /// Seconds the test ran.
    pub seconds: f64,
}

impl Rate {
    /// Completed operations per second.
    pub fn per_second(&self) -> f64 {
        self.done as f64 / self.seconds
    }
}

/// `threads` loops, each opening a connection, sending one [`MSG`]-byte request, reading the
/// reply and closing, for `dur`. Besides the [`Rate`], the failures by step and error
/// ("connect: timed out" -> count), for the report's notes.
pub fn connections(
    targets: &[SocketAddr],
    threads: usize,
    dur: Duration,
) -> (Rate, BTreeMap<String, u64>) {
    let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let kinds = Mutex::new(BTreeMap::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (done, failed, kinds) = (&done, &failed, &kinds);
            s.spawn(move || {
                let mut k = t;
                while started.elapsed() < dur && !stop::requested() {
                    let target = targets[k % targets.len()];
                    k += 1;
                    match one_exchange(target) {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut kinds) = kinds.lock() {
                                *kinds.entry(e.to_string()).or_insert(0) += 1;
                            }
                        }
                    }
                }
            });
        }
    });
    let rate = Rate {
        done: done.into_inner(),
        failed: failed.into_inner(),
        seconds: started.elapsed().as_secs_f64(),
    };
    (rate, kinds.into_inner().unwrap_or_default())
}

/// [`connections`] for `dur`, counted per `window`: one [`Rate`] per whole window, in order
/// (a last partial window is left out). `Err` when `window` is zero or longer than `dur`.
pub fn connections_timeline(
    targets: &[SocketAddr],
    threads: usize,
    dur: Duration,
    window: Duration,
) -> io::Result<Vec<Rate>> {
    if window.is_zero() || window > dur {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("window {window:?} must be non-zero and at most the run ({dur:?})"),
        ));
    }
    let windows = (dur.as_nanos() / window.as_nanos()) as usize;
    let done: Vec<AtomicU64> = (0..windows).map(|_| AtomicU64::new(0)).collect();
    let failed: Vec<AtomicU64> = (0..windows).map(|_| AtomicU64::new(0)).collect();
    let started = Instant::now();
    let end = window * windows as u32;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (done, failed) = (&done, &failed);
            s.spawn(move || {
                let mut k = t;
                while started.elapsed() < end && !stop::requested() {
                    let target = targets[k % targets.len()];
                    k += 1;
                    let ok = one_exchange(target).is_ok();
                    // Counted in the window the exchange ended in.
                    let w = (started.elapsed().as_nanos() / window.as_nanos()) as usize;
                    if let Some(slot) = if ok { done.get(w) } else { failed.get(w) } {
                        slot.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    Ok(done
        .into_iter()
        .zip(failed)
        .map(|(d, f)| Rate {
            done: d.into_inner(),
            failed: f.into_inner(),
            seconds: window.as_secs_f64(),
        })
        .collect())
}

/// One connection, request and reply; the error names the step that failed.
fn one_exchange(target: SocketAddr) -> io::Result<()> {
    let step =
        |what: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let mut conn = TcpStream::connect_timeout(&target, PATIENCE).map_err(step("connect"))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(PATIENCE))?;
    let mut buf = [7u8; MSG];
    conn.write_all(&buf).map_err(step("request"))?;
    conn.read_exact(&mut buf).map_err(step("reply"))?;
    Ok(())
}

/// `conns` kept-alive connections, each sending [`MSG`]-byte requests one after the other
/// and reading each reply, for `dur`. `Err` when a connection cannot be opened.
pub fn kept_alive(targets: &[SocketAddr], conns: usize, dur: Duration) -> io::Result<Rate> {
    let mut streams = Vec::with_capacity(conns);
    for i in 0..conns {
        let c = TcpStream::connect_timeout(&targets[i % targets.len()], PATIENCE)?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(PATIENCE))?;
        streams.push(c);
    }
    let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|s| {
        for mut conn in streams {
            let (done, failed) = (&done, &failed);
            s.spawn(move || {
                let mut buf = [9u8; MSG];
                while started.elapsed() < dur && !stop::requested() {
                    if conn
                        .write_all(&buf)
                        .and_then(|_| conn.read_exact(&mut buf))
                        .is_err()
                    {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    Ok(Rate {
        done: done.into_inner(),
        failed: failed.into_inner(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Result of the UDP test.
#[derive(Debug, Clone, Copy)]
pub struct Udp {
    /// Replies received and requests lost.
    pub rate: Rate,
    /// Median request/reply latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
}

/// `sockets` UDP sockets, each sending a [`MSG`]-byte datagram and waiting for its echo
/// (up to 200 ms, then it counts as lost) before the next, for `dur`. `Err` when a socket
/// cannot be opened or nothing came back.
pub fn udp(targets: &[SocketAddr], sockets: usize, dur: Duration) -> io::Result<Udp> {
    let started = Instant::now();
    let per_socket: Vec<io::Result<(Vec<u32>, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..sockets)
            .map(|i| {
                let target = targets[i % targets.len()];
                s.spawn(move || udp_socket_loop(target, started, dur))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("socket panicked")))
            })
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut lost = 0;
    for r in per_socket {
        let (l, n) = r?;
        latencies.extend(l);
        lost += n;
    }
    latencies.sort_unstable();
    let p = |q| quantile(&latencies, q).map(f64::from);
    match (p(0.5), p(0.99)) {
        (Some(p50_us), Some(p99_us)) => Ok(Udp {
            rate: Rate {
                done: latencies.len() as u64,
                failed: lost,
                seconds,
            },
            p50_us,
            p99_us,
        }),
        _ => Err(io::Error::other(format!(
            "no UDP reply came back ({lost} lost)"
        ))),
    }
}

/// Latency samples kept per socket; beyond this the test keeps counting but stops recording.
const MAX_SAMPLES: usize = 2_000_000;

fn udp_socket_loop(
    target: SocketAddr,
    started: Instant,
    dur: Duration,
) -> io::Result<(Vec<u32>, u64)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(target)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut latencies = Vec::new();
    let mut lost = 0;
    let mut seq: u64 = 0;
    let mut out = [0u8; MSG];
    let mut back = [0u8; 2048];
    while started.elapsed() < dur && !stop::requested() {
        seq += 1;
        out[..8].copy_from_slice(&seq.to_be_bytes());
        let sent = Instant::now();
        s.send(&out)?;
        loop {
            match s.recv(&mut back) {
                // A late echo of an earlier request: keep waiting for this one.
                Ok(n) if n < 8 || back[..8] != seq.to_be_bytes() => continue,
                Ok(_) => {
                    if latencies.len() < MAX_SAMPLES {
                        let us = sent.elapsed().as_micros();
                        latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
                    }
                    break;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    lost += 1;
                    break;
                }
                // ECONNREFUSED from an earlier ICMP error: count it and go on.
                Err(_) => {
                    lost += 1;
                    break;
                }
            }
        }
    }
    Ok((latencies, lost))
}

/// UDP payload of the packet-rate test: with the UDP (8), IPv4 (20) and Ethernet (14) headers
/// and the 4-byte frame check sequence, a 64-byte frame, the smallest Ethernet allows (the
/// size packet rates are usually quoted for).
pub const BLAST_PAYLOAD: usize = 18;
/// Datagrams one `sendmmsg(2)` hands the kernel.
const BLAST_BATCH: usize = 32;

/// What a packet-rate test sent.
#[derive(Debug, Clone, Copy)]
pub struct Blast {
    /// Datagrams the kernel accepted.
    pub datagrams: u64,
    /// Seconds from the first send to the last.
    pub seconds: f64,
}

/// Sends [`BLAST_PAYLOAD`]-byte UDP datagrams as fast as `sendmmsg(2)` goes, one way, from
/// `flows` sockets (each its own source port: one flow per socket and target) spread over
/// `threads` threads, each socket connected to `targets[i % len]`, in batches of 32 per call,
/// socket after socket. Stops after `dur` or when `max` datagrams went out, whichever comes
/// first. Send errors (a full queue, an ICMP error reported back) count nothing and do not
/// stop it. `Err` when a socket cannot be opened or connected, or nothing could be sent.
pub fn blast(
    targets: &[SocketAddr],
    flows: usize,
    threads: usize,
    dur: Duration,
    max: u64,
) -> io::Result<Blast> {
    let threads = threads.clamp(1, flows.max(1));
    let mut sockets: Vec<Vec<UdpSocket>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..flows {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(targets[i % targets.len()])?;
        // Bounds a send blocked on a full queue, so the time limit holds.
        s.set_write_timeout(Some(Duration::from_millis(100)))?;
        sockets[i % threads].push(s);
    }
    let sent = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for socks in &sockets {
            let sent = &sent;
            s.spawn(move || blast_loop(socks, sent, started, dur, max));
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let datagrams = sent.into_inner();
    if datagrams == 0 {
        return Err(io::Error::other("no datagram could be sent"));
    }
    Ok(Blast { datagrams, seconds })
}

fn blast_loop(sockets: &[UdpSocket], sent: &AtomicU64, started: Instant, dur: Duration, max: u64) {
    use std::os::fd::AsRawFd;
    let mut payload = [0u8; BLAST_PAYLOAD];
    // SAFETY: iovec and mmsghdr are plain C structs; all-zero is a valid value of each.
    let mut iov: libc::iovec = unsafe { std::mem::zeroed() };
    iov.iov_base = payload.as_mut_ptr().cast();
    iov.iov_len = payload.len();
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BLAST_BATCH];
    for m in &mut msgs {
        // Every message sends the same payload to the socket's connected peer.
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut k = 0;
    while started.elapsed() < dur && !stop::requested() && sent.load(Ordering::Relaxed) < max {
        let s = &sockets[k % sockets.len()];
        k += 1;
        // SAFETY: `msgs` holds BLAST_BATCH headers pointing at `iov` and `payload`, which
        // outlive the call; the socket is connected, so no address is needed.
        let n = unsafe {
            libc::sendmmsg(
                s.as_raw_fd(),
                msgs.as_mut_ptr(),
                BLAST_BATCH as libc::c_uint,
                0,
            )
        };
        if n > 0 {
            sent.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}
