//! The backends' servers, run as threads inside the backend namespaces: a request/reply
//! server, a bulk sink, a UDP echo and a UDP packet counter. Stopped and joined on drop.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use crate::topology::{Topology, XDP_VIP};

/// Request/reply port: each request is [`MSG`] bytes, answered with [`MSG`] bytes.
pub const RR_PORT: u16 = 5000;
/// Bulk sink port: reads to EOF, then answers with the byte count (8 bytes, big endian).
pub const BULK_PORT: u16 = 5001;
/// UDP echo port.
pub const UDP_PORT: u16 = 5002;
/// UDP packet-counting port: counts every datagram, answers none (the packet-rate test).
pub const PPS_PORT: u16 = 5003;
/// Size of a request and of a reply, bytes.
pub const MSG: usize = 64;

/// How often blocked server calls wake to check the stop flag.
const TICK: Duration = Duration::from_millis(200);
/// Threads accepting request/reply connections per backend; each serves one connection at a
/// time, so this bounds kept-alive connections per backend.
const RR_THREADS: usize = 24;
/// Threads accepting bulk connections per backend (8 flows may all land on one backend).
const BULK_THREADS: usize = 8;
/// Threads answering UDP per backend.
const UDP_THREADS: usize = 2;
/// Datagrams one `recvmmsg(2)` of the packet counter takes at most.
const COUNT_BATCH: usize = 64;

/// The running servers of every backend.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Datagrams the packet counters of every backend received so far.
    counted: Arc<AtomicU64>,
}

impl Servers {
    /// Starts the four servers on every backend, twice: on the backend's own address (for
    /// `direct`, the proxies and NAT) and on the packet-layer VIP its loopback holds (DSR
    /// delivers the client's packets to the VIP unchanged, and a UDP reply must leave from
    /// the VIP). `Err` when a namespace cannot be entered or a port cannot be bound.
    pub fn start(topo: &Topology) -> io::Result<Servers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = Servers {
            stop: stop.clone(),
            threads: Vec::new(),
            counted: Arc::new(AtomicU64::new(0)),
        };
        for (i, ns) in topo.backends.iter().enumerate() {
            for ip in [topo.network.backend_addr(i), IpAddr::V4(XDP_VIP)] {
                let (rr, bulk, udp, pps) = ns.enter(|| {
                    Ok::<_, io::Error>((
                        listener(SocketAddr::new(ip, RR_PORT))?,
                        listener(SocketAddr::new(ip, BULK_PORT))?,
                        udp_socket(SocketAddr::new(ip, UDP_PORT))?,
                        udp_socket(SocketAddr::new(ip, PPS_PORT))?,
                    ))
                })??;
                servers.spawn(&rr, &bulk, &udp)?;
                let (stop, counted) = (servers.stop.clone(), servers.counted.clone());
                servers.threads.push(std::thread::spawn(move || {
                    count_loop(&pps, &stop, &counted)
                }));
            }
        }
        Ok(servers)
    }

    /// Datagrams the packet counters (on [`PPS_PORT`]) of every backend have received since
    /// they started.
    pub fn counted(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
    }

    fn spawn(&mut self, rr: &TcpListener, bulk: &TcpListener, udp: &UdpSocket) -> io::Result<()> {
        for _ in 0..RR_THREADS {
            let (l, stop) = (rr.try_clone()?, self.stop.clone());
            self.threads
                .push(std::thread::spawn(move || accept_loop(&l, &stop, serve_rr)));
        }
        for _ in 0..BULK_THREADS {
            let (l, stop) = (bulk.try_clone()?, self.stop.clone());
            self.threads.push(std::thread::spawn(move || {
                accept_loop(&l, &stop, serve_bulk)
            }));
        }
        for _ in 0..UDP_THREADS {
            let (s, stop) = (udp.try_clone()?, self.stop.clone());
            self.threads
                .push(std::thread::spawn(move || echo_loop(&s, &stop)));
        }
        Ok(())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    // accept(2) honours SO_RCVTIMEO: the threads wake to see the stop flag.
    s.set_read_timeout(Some(TICK))?;
    Ok(s.into())
}

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    s.set_read_timeout(Some(TICK))?;
    Ok(s.into())
}

fn accept_loop(l: &TcpListener, stop: &AtomicBool, serve: fn(TcpStream, &AtomicBool)) {
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((conn, _)) => {
                let _ = conn.set_read_timeout(Some(TICK));
                let _ = conn.set_nodelay(true);
                serve(conn, stop);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            // Aborted handshakes and fd exhaustion are transient: keep serving.
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Reads exactly `buf.len()` bytes, waking on the tick to check `stop`. `Ok(false)` on a
/// clean EOF before the first byte.
fn read_full(conn: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match conn.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(ErrorKind::Interrupted.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn serve_rr(mut conn: TcpStream, stop: &AtomicBool) {
    let mut buf = [0u8; MSG];
    while let Ok(true) = read_full(&mut conn, &mut buf, stop) {
        if conn.write_all(&buf).is_err() {
            return;
        }
    }
}

fn serve_bulk(mut conn: TcpStream, stop: &AtomicBool) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = conn.write_all(&total.to_be_bytes());
}

/// Counts datagrams on `s` until `stop`, taking up to [`COUNT_BATCH`] per `recvmmsg(2)` so
/// that the counter is not what limits the packet rate.
fn count_loop(s: &UdpSocket, stop: &AtomicBool, counted: &AtomicU64) {
    use std::os::fd::AsRawFd;
    let mut bufs = vec![[0u8; 64]; COUNT_BATCH];
    // SAFETY: iovec and mmsghdr are plain C structs; all-zero is a valid value of each.
    let mut iovs: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; COUNT_BATCH];
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; COUNT_BATCH];
    for ((iov, msg), buf) in iovs.iter_mut().zip(msgs.iter_mut()).zip(bufs.iter_mut()) {
        iov.iov_base = buf.as_mut_ptr().cast();
        iov.iov_len = buf.len();
        msg.msg_hdr.msg_iov = iov;
        msg.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `msgs` holds COUNT_BATCH headers, each pointing at its own live iovec and
        // buffer; the socket's receive timeout (TICK) bounds the wait.
        let n = unsafe {
            libc::recvmmsg(
                s.as_raw_fd(),
                msgs.as_mut_ptr(),
                COUNT_BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            counted.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

fn echo_loop(s: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
}
