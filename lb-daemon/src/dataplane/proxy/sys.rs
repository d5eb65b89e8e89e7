//! The few system calls the proxy makes outside io_uring and outside `socket2`: pipes,
//! eventfds, `splice(2)`, forced socket buffer sizes and batched datagram I/O.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use socket2::SockAddr;

/// `-errno` of the last failed call, in the convention of io_uring results.
fn neg_errno() -> i32 {
    -io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A non-blocking, close-on-exec eventfd, for waking a worker.
pub(super) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success we own the returned descriptor.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd, waking whoever polls it.
pub(super) fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if n == 8 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Resets an eventfd to 0 (errors, such as `EAGAIN` when it already is, are irrelevant).
pub(super) fn eventfd_clear(fd: BorrowedFd<'_>) {
    let mut value: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64.
    unsafe { libc::read(fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
}

/// A non-blocking pipe used as a relay buffer: bytes are spliced in from one socket and out
/// to the other without being copied to user space.
pub(super) struct Pipe {
    /// Read end.
    pub(super) read: OwnedFd,
    /// Write end.
    pub(super) write: OwnedFd,
    /// Capacity in bytes (what `F_GETPIPE_SZ` reports).
    pub(super) capacity: u32,
}

impl Pipe {
    /// Creates a pipe and asks for `size` bytes of capacity; keeps the default (64 KiB) if
    /// the kernel refuses (`pipe-max-size`, or the per-user pipe page limit).
    pub(super) fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let wanted = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on a descriptor we own; failure only leaves the default size.
        let set = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, wanted) };
        let capacity = if set > 0 {
            set
        } else {
            // SAFETY: as above.
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) }
        };
        Ok(Pipe {
            read,
            write,
            capacity: u32::try_from(capacity).unwrap_or(0).max(4096),
        })
    }

    /// Bytes waiting in the pipe (`FIONREAD`).
    pub(super) fn pending(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        check(unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut n) })?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

/// `splice(2)` of up to `len` bytes from `fd_in` to `fd_out` without blocking; returns the
/// byte count or `-errno`, like an io_uring splice completion.
pub(super) fn splice(fd_in: BorrowedFd<'_>, fd_out: BorrowedFd<'_>, len: u32) -> i32 {
    // SAFETY: null offsets (both ends are a socket or a pipe); no user memory involved.
    let n = unsafe {
        libc::splice(
            fd_in.as_raw_fd(),
            std::ptr::null_mut(),
            fd_out.as_raw_fd(),
            std::ptr::null_mut(),
            len as usize,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        neg_errno()
    } else {
        // At most `len` (a u32), which the caller keeps below i32::MAX.
        i32::try_from(n).unwrap_or(i32::MAX)
    }
}

/// Reads up to `len` bytes (at most 16 KiB) from socket `from` with `recv(2)` and writes
/// them into the empty pipe `to`, without blocking; returns the byte count, 0 at end of
/// file, or `-errno`, like a splice. Unlike a splice, `recv` reads past TCP urgent data.
pub(super) fn copy_into_pipe(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: u32) -> i32 {
    let mut buf = [0u8; 16 * 1024];
    let want = buf.len().min(len as usize);
    // SAFETY: reads at most `want` bytes into the live local buffer.
    let n = unsafe {
        libc::recv(
            from.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            want,
            libc::MSG_DONTWAIT,
        )
    };
    if n <= 0 {
        return if n == 0 { 0 } else { neg_errno() };
    }
    let n = n as usize;
    // SAFETY: writes the `n` bytes just read from the live local buffer.
    let written = unsafe { libc::write(to.as_raw_fd(), buf.as_ptr().cast(), n) };
    if written != n as isize {
        // The pipe was empty and holds far more than 16 KiB: bytes would be lost.
        return -libc::EIO;
    }
    n as i32
}

/// Whether the peer of a TCP socket is gone: the socket has an error or is closed (a reset
/// arrived). One `poll(2)` that does not wait. Unlike an io_uring poll, which always
/// reports `POLLRDHUP`, `poll(2)` asked for no event reports only `POLLERR`, `POLLHUP`
/// and `POLLNVAL`, so this works on a socket whose peer has already sent its FIN.
/// `we_sent_fin`: this side shut its writing down, so a hang-up is also what the peer's own
/// FIN gives (a clean close); then only an error counts.
pub(super) fn peer_gone(fd: BorrowedFd<'_>, we_sent_fin: bool) -> bool {
    let mut entry = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut entry, 1, 0) };
    let gone = if we_sent_fin {
        libc::POLLERR | libc::POLLNVAL
    } else {
        libc::POLLERR | libc::POLLHUP | libc::POLLNVAL
    };
    n > 0 && entry.revents & gone != 0
}

/// Whether a connect error is this host's own rather than the backend's answer: a shortage
/// ([`crate::shortage::is_local_shortage`]), `EAGAIN` or an operation the proxy cancelled
/// (`ECANCELED`); such errors must not count against a backend.
pub(super) fn is_local_error(err: &io::Error) -> bool {
    crate::shortage::is_local_shortage(err)
        || matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::ECANCELED))
}

/// Sets a socket's receive and send buffers to `bytes` each, beyond `net.core.rmem_max`
/// when the process may (`SO_*BUFFORCE` needs `CAP_NET_ADMIN`), else up to the limit.
pub(super) fn set_buffers(fd: BorrowedFd<'_>, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (forced, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(fd, libc::SOL_SOCKET, forced, value).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, value);
        }
    }
}

fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live int and its size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Whether `fd`'s file description is non-blocking (`O_NONBLOCK`); `false` when it cannot
/// be read.
pub(super) fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GETFL takes no argument and only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_NONBLOCK != 0
}

/// `accept4(2)` on the listening socket `fd`: the next connection of its queue, made
/// non-blocking and close-on-exec. On a non-blocking `fd` ([`is_nonblocking`]) it does not
/// wait: `Err` with `WouldBlock` when the queue is empty.
pub(super) fn accept_now(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed (the peer's address is not wanted).
    let n = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: a successful accept4 returns a new descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(n) })
    }
}

/// `TCP_CLOSE` of `include/net/tcp_states.h`: the state of a socket a reset ended.
const TCP_CLOSE: u8 = 7;

/// Whether TCP socket `fd` has failed: an error is pending, or the socket is closed (a reset
/// came and its error was already taken). Unlike [`peer_gone`], a hang-up alone does not
/// count: it is also what a FIN each way shows while the send queue still holds bytes.
pub(super) fn tcp_failed(fd: BorrowedFd<'_>) -> bool {
    peer_gone(fd, true) || tcp_info(fd).is_some_and(|i| i.tcpi_state == TCP_CLOSE)
}

/// Whether TCP socket `fd` is resending unacknowledged data after a retransmission timeout,
/// at most [`RETRIES_OF_A_LOSSY_PATH`] times in a row (`tcpi_retransmits`): its peer may be
/// reading, behind a lossy path. A peer that does not read advertises a zero window
/// instead, which the kernel probes without counting here.
pub(super) fn retransmitting(fd: BorrowedFd<'_>) -> bool {
    tcp_info(fd).is_some_and(|i| (1..=RETRIES_OF_A_LOSSY_PATH).contains(&i.tcpi_retransmits))
}

/// Retransmission timeouts in a row that still read as a lossy path: the kernel's own
/// threshold for suspecting the path (`net.ipv4.tcp_retries1`, default 3). A peer that died
/// without a reset gets more, and then counts as not reading.
const RETRIES_OF_A_LOSSY_PATH: u8 = 3;

/// `TCP_INFO` of `fd`, if the kernel tells it.
fn tcp_info(fd: BorrowedFd<'_>) -> Option<libc::tcp_info> {
    // SAFETY: `tcp_info` is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, and the new length into `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // The fields read here are in the first 8 bytes, which every kernel fills.
    (rc == 0 && len >= 8).then_some(info)
}

/// Bytes written to TCP socket `fd` that its peer has not acknowledged yet, sent or not
/// (`SIOCOUTQ`); 0 when the kernel cannot say.
pub(super) fn unacknowledged(fd: BorrowedFd<'_>) -> u32 {
    let mut queued: libc::c_int = 0;
    // SAFETY: `SIOCOUTQ` (`TIOCOUTQ`) writes one int through the pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc == 0 {
        u32::try_from(queued).unwrap_or(0)
    } else {
        0
    }
}

/// Makes closing `fd` send a reset instead of a FIN (`SO_LINGER` 0).
pub(super) fn set_reset_on_close(fd: &OwnedFd) {
    let _ = socket2::SockRef::from(fd).set_linger(Some(std::time::Duration::ZERO));
}

/// The classic BPF socket filter of [`drop_syns`]: drops a TCP segment with SYN set and ACK
/// clear (a connection's first segment) and takes every other packet whole. The kernel runs
/// a TCP socket's filter on the segment from its TCP header on (`tcp_filter`), so byte 13
/// is the flags.
const SYN_DROP: [libc::sock_filter; 5] = [
    // A = segment[13], the flags.
    bpf_insn(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 13),
    bpf_insn(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0, 0, 0x12),
    // SYN without ACK: on to the drop, else past it.
    bpf_insn(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, 0x02),
    bpf_insn(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
    bpf_insn(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
];

const fn bpf_insn(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// Makes the TCP socket `fd` drop the SYNs that reach it (`on`), unanswered, or take them
/// again (`!on`). On a listener, a dropped SYN costs its client a retransmission timeout (it
/// resends 1 s, 3 s, 7 s... after the first) where a refused connection would cost it the
/// connection; the segments of handshakes under way pass. A connection accepted while its
/// listener has the filter inherits it (the kernel copies a listener's filter to each new
/// connection), so the caller takes it off such a connection: there a dropped SYN would be
/// one RFC 5961 answers with a challenge ACK. Removing a filter that is not there is no
/// error. `Err`: the `setsockopt(2)` error (`SO_ATTACH_FILTER`, `SO_DETACH_FILTER`).
pub(super) fn drop_syns(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let socket = socket2::SockRef::from(&fd);
    if on {
        socket.attach_filter(&SYN_DROP)
    } else {
        match socket.detach_filter() {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }
}

/// Whether socket `fd` has a socket filter (the one of [`drop_syns`]: lb puts no other on
/// its sockets), as the kernel says (`SO_GET_FILTER`'s count of instructions), not as this
/// process remembers: after an upgrade two daemons hold the same listener. `Err`: the
/// `getsockopt(2)` error.
pub(super) fn has_filter(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut len: libc::socklen_t = 0;
    // SAFETY: with a length of 0 the kernel writes no value, only the count into `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_GET_FILTER,
            std::ptr::null_mut(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(len > 0)
    }
}

/// `write(2)` of `data` to `fd` (non-blocking when `fd` is); returns the bytes written.
pub(super) fn write(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a live slice of `data.len()` bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `send(2)` of one datagram on a connected socket, without blocking.
pub(super) fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a live slice of `data.len()` bytes.
    let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `sendmsg(2)` of one datagram made of `prefix` then `data` on a connected socket, without
/// blocking and without copying them together; returns the bytes sent (prefix included).
pub(super) fn send_prefixed(fd: RawFd, prefix: &[u8], data: &[u8]) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: prefix.as_ptr() as *mut libc::c_void,
            iov_len: prefix.len(),
        },
        libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        },
    ];
    // SAFETY: an all-zero msghdr is valid (no name, no control).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: `msg` points at `iov`, whose buffers are live slices; sendmsg only reads them.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The largest datagram the proxy carries: the largest UDP payload (65,507 bytes over IPv4,
/// 65,527 over IPv6) fits, so a datagram is never cut.
pub(super) const DATAGRAM_MAX: usize = 64 * 1024;
/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub(super) const BATCH: usize = 32;

/// Room for one control message with a packet-info structure, aligned as `cmsghdr` needs.
type Control = [u64; 8];

/// The local address a datagram was sent to (`IP_PKTINFO` / `IPV6_PKTINFO`), reported by a
/// socket bound to a wildcard address: replies must leave from it, or a client that sent
/// to one of several local addresses gets its reply from another and discards it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Local {
    /// From `IP_PKTINFO` on an IPv4 socket.
    V4(Ipv4Addr),
    /// From `IPV6_PKTINFO` on an IPv6 socket (IPv4 clients of a dual-stack socket show as
    /// IPv4-mapped addresses); the interface index matters for link-local addresses.
    V6(Ipv6Addr, u32),
}

impl Local {
    /// The local IP address.
    pub(super) fn ip(self) -> std::net::IpAddr {
        match self {
            Local::V4(v4) => v4.into(),
            Local::V6(v6, _) => v6.into(),
        }
    }
}

/// Asks a wildcard-bound UDP socket to report each datagram's local address (see
/// [`Local`]).
pub(super) fn enable_packet_info(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
    }
}

/// One received datagram.
pub(super) struct Datagram<'a> {
    /// The payload.
    pub(super) data: &'a [u8],
    /// The sender (for unconnected sockets).
    pub(super) from: Option<SocketAddr>,
    /// The local address it was sent to, when packet info was asked for.
    pub(super) local: Option<Local>,
    /// Cut short by the buffer: must be dropped.
    pub(super) truncated: bool,
}

/// Buffers for a batch of datagrams, received with `recvmmsg(2)` and sent with
/// `sendmmsg(2)`. One per worker; each datagram has its own 64 KiB buffer, so datagrams are
/// never merged or split.
pub(super) struct Datagrams {
    buffers: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    controls: Vec<Control>,
    lengths: [usize; BATCH],
    name_lengths: [libc::socklen_t; BATCH],
    locals: [Option<Local>; BATCH],
    truncated: [bool; BATCH],
    count: usize,
}

impl Datagrams {
    /// Allocates the batch (`BATCH` × 64 KiB).
    pub(super) fn new() -> Box<Datagrams> {
        Box::new(Datagrams {
            buffers: vec![0; BATCH * DATAGRAM_MAX],
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
            names: vec![unsafe { mem::zeroed() }; BATCH],
            controls: vec![[0; 8]; BATCH],
            lengths: [0; BATCH],
            name_lengths: [0; BATCH],
            locals: [None; BATCH],
            truncated: [false; BATCH],
            count: 0,
        })
    }

    /// Receives up to `BATCH` datagrams from `fd` without blocking; returns how many
    /// (never 0: `WouldBlock` when none is waiting). With `packet_info`, also collects each
    /// datagram's [`Local`] address (the socket must have [`enable_packet_info`]).
    pub(super) fn recv(&mut self, fd: RawFd, packet_info: bool) -> io::Result<usize> {
        self.count = 0;
        let (mut iovs, mut headers) = empty_batch();
        let base = self.buffers.as_mut_ptr();
        for i in 0..BATCH {
            // SAFETY: `i * DATAGRAM_MAX` is within `buffers` (BATCH * DATAGRAM_MAX bytes).
            iovs[i].iov_base = unsafe { base.add(i * DATAGRAM_MAX) }.cast();
            iovs[i].iov_len = DATAGRAM_MAX;
            let control = packet_info.then(|| {
                let c = &mut self.controls[i];
                (c.as_mut_ptr().cast(), mem::size_of::<Control>())
            });
            point_header(
                &mut headers[i].msg_hdr,
                &mut iovs[i],
                (&mut self.names[i] as *mut libc::sockaddr_storage).cast(),
                mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
                control,
            );
        }
        // SAFETY: every header points at live buffers of the stated sizes, owned by `self`
        // and the local `iovs`, all outliving the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, header) in headers.iter().enumerate().take(n) {
            self.lengths[i] = (header.msg_len as usize).min(DATAGRAM_MAX);
            self.name_lengths[i] = header.msg_hdr.msg_namelen;
            self.truncated[i] = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.locals[i] = if packet_info {
                // SAFETY: the header's control buffer is live and the kernel set its length.
                unsafe { parse_packet_info(&header.msg_hdr) }
            } else {
                None
            };
        }
        self.count = n;
        Ok(n)
    }

    /// Datagram `i` of the last receive (`i` below what it returned).
    pub(super) fn get(&self, i: usize) -> Datagram<'_> {
        let start = i * DATAGRAM_MAX;
        // SAFETY: the kernel wrote a valid address of `name_lengths[i]` bytes (or none, with
        // length 0, which as_socket rejects) into a sockaddr_storage.
        let from = unsafe { SockAddr::new(self.names[i], self.name_lengths[i]) }.as_socket();
        Datagram {
            data: &self.buffers[start..start + self.lengths[i]],
            from,
            local: self.locals[i],
            truncated: self.truncated[i],
        }
    }

    /// Sends every datagram of the last receive that was not truncated to `to` through
    /// `fd` with `sendmmsg(2)`, in order and without blocking, from the local address
    /// `local` if given. Returns how many were sent, their bytes, and the error that stopped
    /// the rest (`WouldBlock` when the socket buffer is full), if any.
    pub(super) fn send_all_to(
        &mut self,
        fd: RawFd,
        to: &SockAddr,
        local: Option<Local>,
    ) -> (usize, u64, Option<io::Error>) {
        let mut order = [0usize; BATCH];
        let mut n = 0;
        for i in 0..self.count {
            if !self.truncated[i] {
                order[n] = i;
                n += 1;
            }
        }
        let mut control: Control = [0; 8];
        let control_len = match local {
            // SAFETY: `control` is live, aligned and large enough for one packet-info message.
            Some(local) => unsafe { write_packet_info(&mut control, local) },
            None => 0,
        };
        let (mut iovs, mut headers) = empty_batch();
        let base = self.buffers.as_mut_ptr();
        for k in 0..n {
            let i = order[k];
            // SAFETY: `i < BATCH`, so the offset is within `buffers`.
            iovs[k].iov_base = unsafe { base.add(i * DATAGRAM_MAX) }.cast();
            iovs[k].iov_len = self.lengths[i];
            // sendmmsg only reads the address and the control message.
            point_header(
                &mut headers[k].msg_hdr,
                &mut iovs[k],
                to.as_ptr() as *mut libc::c_void,
                to.len(),
                (control_len > 0).then(|| (control.as_mut_ptr().cast(), control_len)),
            );
        }
        let mut sent = 0;
        let mut error = None;
        while sent < n {
            // SAFETY: headers `sent..n` point at live buffers, address and control message.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    headers.as_mut_ptr().add(sent),
                    (n - sent) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if r < 0 && e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error = Some(e);
                break;
            }
            sent += r as usize;
        }
        let bytes = order[..sent].iter().map(|&i| self.lengths[i] as u64).sum();
        (sent, bytes, error)
    }
}

/// `BATCH` empty buffer descriptors and message headers for one `recvmmsg` or `sendmmsg`,
/// to be pointed at live buffers with [`point_header`].
fn empty_batch() -> ([libc::iovec; BATCH], [libc::mmsghdr; BATCH]) {
    let iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH];
    // SAFETY: mmsghdr is plain old data; all zeroes is a valid (empty) header.
    let headers = unsafe { mem::zeroed() };
    (iovs, headers)
}

/// Points message header `h` at its one buffer `iov`, at the address `name` (`name_len`
/// bytes) and at a control buffer `(pointer, length)` if there is one. Only records the
/// pointers: the caller keeps what they point at alive until the system call returns.
fn point_header(
    h: &mut libc::msghdr,
    iov: &mut libc::iovec,
    name: *mut libc::c_void,
    name_len: libc::socklen_t,
    control: Option<(*mut libc::c_void, usize)>,
) {
    h.msg_name = name;
    h.msg_namelen = name_len;
    h.msg_iov = iov;
    h.msg_iovlen = 1;
    if let Some((buffer, len)) = control {
        h.msg_control = buffer;
        h.msg_controllen = len;
    }
}

/// Finds the packet-info control message of a received datagram.
///
/// # Safety
/// `header.msg_control` is null or points at `header.msg_controllen` live bytes filled by
/// the kernel.
unsafe fn parse_packet_info(header: &libc::msghdr) -> Option<Local> {
    if header.msg_control.is_null() {
        return None;
    }
    // SAFETY: the caller vouches for the buffer; the CMSG macros stay within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(header) };
    while !cmsg.is_null() {
        // SAFETY: a non-null CMSG_FIRSTHDR/NXTHDR result is a complete header in the buffer.
        let c = unsafe { &*cmsg };
        // SAFETY: CMSG_DATA of a valid header points at its payload; read_unaligned copes
        // with any alignment, and the type fixes the payload's size.
        unsafe {
            if c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                return Some(Local::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
            }
            if c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                return Some(Local::V6(
                    Ipv6Addr::from(info.ipi6_addr.s6_addr),
                    info.ipi6_ifindex,
                ));
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
    None
}

/// Writes the control message that makes a datagram leave from `local`; returns its length.
///
/// # Safety
/// `control` must be live and writable (its type guarantees size and alignment).
unsafe fn write_packet_info(control: &mut Control, local: Local) -> usize {
    let (level, kind, size) = match local {
        Local::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            mem::size_of::<libc::in_pktinfo>(),
        ),
        Local::V6(..) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            mem::size_of::<libc::in6_pktinfo>(),
        ),
    };
    // SAFETY: a msghdr whose control buffer is `control`; the CMSG macros stay inside it
    // (CMSG_SPACE of either structure is well under 64 bytes).
    unsafe {
        let space = libc::CMSG_SPACE(size as u32) as usize;
        let mut header: libc::msghdr = mem::zeroed();
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&header);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size as u32) as usize;
        let data = libc::CMSG_DATA(cmsg);
        match local {
            Local::V4(addr) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(addr).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(data.cast(), info);
            }
            Local::V6(addr, ifindex) => {
                // The interface only pins link-local sources; elsewhere routing decides.
                let link_local = addr.segments()[0] & 0xffc0 == 0xfe80;
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: addr.octets(),
                    },
                    ipi6_ifindex: if link_local { ifindex } else { 0 },
                };
                std::ptr::write_unaligned(data.cast(), info);
            }
        }
        space
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_errors_are_not_the_backends() {
        use std::io::Error;
        assert!(super::is_local_error(&Error::from_raw_os_error(
            libc::EADDRNOTAVAIL
        )));
        assert!(super::is_local_error(&Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!super::is_local_error(&Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
        assert!(!super::is_local_error(&Error::from_raw_os_error(
            libc::ETIMEDOUT
        )));
        assert!(!super::is_local_error(&Error::from_raw_os_error(
            libc::EHOSTUNREACH
        )));
    }

    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_pipe_reports_what_it_holds() {
        let pipe = Pipe::new(256 * 1024).expect("pipe2");
        assert!(pipe.capacity >= 4096, "capacity {}", pipe.capacity);
        assert_eq!(pipe.pending().expect("FIONREAD"), 0);
        // SAFETY: writes 3 bytes from a live array.
        let n = unsafe { libc::write(pipe.write.as_raw_fd(), b"abc".as_ptr().cast(), 3) };
        assert_eq!(n, 3);
        assert_eq!(pipe.pending().expect("FIONREAD"), 3);
    }

    #[test]
    fn datagrams_keep_their_boundaries_and_senders() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind rx");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind tx");
        let to = rx.local_addr().expect("rx addr");
        tx.send_to(b"one", to).expect("send");
        tx.send_to(b"", to).expect("send empty");
        tx.send_to(&[7u8; 60_000], to).expect("send big");
        let mut batch = Datagrams::new();
        let mut got = Vec::new();
        for _ in 0..100 {
            match batch.recv(rx.as_raw_fd(), false) {
                Ok(n) => (0..n).for_each(|i| {
                    let d = batch.get(i);
                    got.push((d.data.to_vec(), d.from, d.truncated));
                }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("recvmmsg: {e}"),
            }
            if got.len() == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let sender = Some(tx.local_addr().expect("tx addr"));
        assert_eq!(got.len(), 3, "three datagrams sent, {} received", got.len());
        assert_eq!(got[0], (b"one".to_vec(), sender, false));
        assert_eq!(got[1], (Vec::new(), sender, false));
        assert_eq!(got[2], (vec![7u8; 60_000], sender, false));
    }
}
